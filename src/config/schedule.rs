//! Job-queue config beyond one section: periodic tasks (`[schedules.NAME]`, a cron
//! expression in UTC) and an agent's rate limit (`rate = "N/sec|min|hour|PERIOD"`).

use super::Config;
use serde::Deserialize;
use serde::Deserializer;
use serde::Serialize;
use serde::Serializer;
use std::fmt;
use std::time::Duration;

/// Most starts a rate may allow per period.
pub const MAX_RATE_COUNT: u32 = 1_000_000;
/// Shortest period a rate may name.
pub const MIN_RATE_PERIOD: Duration = Duration::from_secs(1);
/// Longest period a rate may name (a day).
pub const MAX_RATE_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// A cluster-wide rate limit: at most `count` starts per `window` (a period of 1 s to a
/// day), over every instance together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub window: Duration,
}

impl Rate {
    fn unit(&self) -> Option<&'static str> {
        match self.window.as_secs() {
            _ if self.window.subsec_nanos() != 0 => None,
            1 => Some("sec"),
            60 => Some("min"),
            3600 => Some("hour"),
            _ => None,
        }
    }
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid rate {s:?}; write N/sec, N/min, N/hour or N/PERIOD, e.g. \"60/min\" or \"20/5s\""
            )
        };
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        let unit = unit.trim();
        let window = match unit {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            // A period with a number: "5s", "10min", "1h 30m" (humantime's syntax).
            _ if unit.starts_with(|c: char| c.is_ascii_digit()) => {
                humantime::parse_duration(unit).map_err(|_| bad())?
            }
            _ => return Err(bad()),
        };
        if !(MIN_RATE_PERIOD..=MAX_RATE_PERIOD).contains(&window) {
            return Err(format!("rate {s:?}: the period must be from 1s to 24h"));
        }
        if !(1..=MAX_RATE_COUNT).contains(&count) {
            return Err(format!(
                "rate {s:?}: the count must be in 1..={MAX_RATE_COUNT}"
            ));
        }
        Ok(Rate { count, window })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.unit() {
            Some(u) => write!(f, "{}/{u}", self.count),
            None => write!(
                f,
                "{}/{}",
                self.count,
                humantime::format_duration(self.window)
            ),
        }
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// `[schedules.NAME]`: a task of `agent` with `payload` is queued at every due time of
/// `cron` (UTC; 5 fields, or 6 with seconds first).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    pub cron: String,
    pub agent: String,
    /// A JSON object (a TOML table in the file).
    pub payload: serde_json::Value,
    pub priority: i32,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            cron: String::new(),
            agent: String::new(),
            payload: serde_json::Value::Object(Default::default()),
            priority: 0,
        }
    }
}

/// Parses a cron expression: 5 fields (minute first) or 6 (seconds first), croner's syntax
/// (ranges, steps, names, `L`, `#`, `W`, `@hourly` and the like). Evaluated in UTC.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    use std::str::FromStr;
    croner::Cron::from_str(expr.trim())
        .map_err(|e| format!("invalid cron expression {expr:?}: {e}"))
}

impl Config {
    /// Schedules: a valid name, a cron expression that parses, an agent this config runs,
    /// an object payload.
    pub(super) fn validate_schedules(&self, bad: &mut dyn FnMut(&str, String)) {
        for (name, s) in &self.schedules {
            let key = |k: &str| format!("schedules.{name}.{k}");
            if !super::is_section_name(name, 200) {
                bad(
                    &format!("schedules.{name}"),
                    "schedule names use 1..=200 letters, digits, '_' and '-'".into(),
                );
            }
            if s.cron.trim().is_empty() {
                bad(&key("cron"), "missing; e.g. \"0 * * * *\" (UTC)".into());
            } else if let Err(e) = parse_cron(&s.cron) {
                bad(&key("cron"), e);
            }
            if s.agent.is_empty() {
                bad(&key("agent"), "missing; the agent that runs it".into());
            } else if !self.agents.contains_key(&s.agent) {
                bad(
                    &key("agent"),
                    format!("unknown agent {:?} (no [agents.{}])", s.agent, s.agent),
                );
            }
            if !s.payload.is_object() {
                bad(&key("payload"), "must be a table (a JSON object)".into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigIssue, ParseError};

    #[test]
    fn rates_parse_and_print() {
        for (s, count, secs, shown) in [
            ("60/min", 60, 60, "60/min"),
            ("10/sec", 10, 1, "10/sec"),
            (" 5 / hour ", 5, 3600, "5/hour"),
            ("1/s", 1, 1, "1/sec"),
            ("1000000/h", 1_000_000, 3600, "1000000/hour"),
            ("20/5s", 20, 5, "20/5s"),
            ("3/90s", 3, 90, "3/1m 30s"),
            ("1/1h 30m", 1, 5400, "1/1h 30m"),
            ("7/24h", 7, 86400, "7/1day"),
            ("2/60s", 2, 60, "2/min"),
        ] {
            let r: Rate = s.parse().unwrap();
            assert_eq!((r.count, r.window.as_secs()), (count, secs), "{s}");
            assert_eq!(r.to_string(), shown);
        }
        for s in [
            "",
            "60",
            "0/min",
            "-1/min",
            "60/day",
            "x/min",
            "1000001/sec",
            "1/500ms",
            "1/25h",
            "1/0s",
            "1/-5s",
            "1/5 parsecs",
        ] {
            assert!(s.parse::<Rate>().is_err(), "{s}");
        }
    }

    #[test]
    fn a_burst_needs_a_rate_and_stays_within_its_count() {
        let agent = |extra: &str| {
            format!("[agents.a]\nkind = \"command\"\ncommand = [\"true\"]\n{extra}\n")
        };
        let ok = Config::parse(&agent("rate = \"20/5s\"\nburst = 20")).unwrap();
        assert_eq!(ok.agents["a"].burst, Some(20));
        assert_eq!(ok.agents["a"].rate.map(|r| r.window.as_secs()), Some(5));
        for (extra, says) in [
            ("burst = 3", "needs a rate"),
            ("rate = \"20/5s\"\nburst = 0", "must be in 1..=20"),
            ("rate = \"20/5s\"\nburst = 21", "must be in 1..=20"),
        ] {
            let found = issues(&agent(extra));
            assert_eq!(found.len(), 1, "{extra}: {found:?}");
            assert_eq!(found[0].key, "agents.a.burst", "{extra}");
            assert!(found[0].message.contains(says), "{extra}: {found:?}");
        }
        // A negative burst is refused by type, named by key.
        let found = issues(&agent("rate = \"20/5s\"\nburst = -1"));
        assert!(found.iter().any(|i| i.key == "agents.a.burst"), "{found:?}");
    }

    #[test]
    fn cron_takes_five_or_six_fields() {
        assert!(parse_cron("*/2 * * * * *").is_ok());
        assert!(parse_cron("0 3 * * *").is_ok());
        assert!(parse_cron("@hourly").is_ok());
        assert!(parse_cron("61 * * * *").is_err());
        assert!(parse_cron("every minute").is_err());
    }

    fn issues(text: &str) -> Vec<ConfigIssue> {
        match Config::parse(text) {
            Ok(_) => Vec::new(),
            Err(ParseError::Invalid(v)) => v,
            Err(ParseError::Syntax(m)) => panic!("syntax: {m}"),
        }
    }

    #[test]
    fn schedules_and_rates_are_checked_and_named_by_key() {
        let ok = Config::parse(
            "[agents.a]\nkind = \"command\"\ncommand = [\"true\"]\nrate = \"60/min\"\n\
             [schedules.nightly]\ncron = \"0 3 * * *\"\nagent = \"a\"\npayload = { x = 1, y = [\"z\"] }\npriority = 5\n",
        )
        .unwrap();
        let s = &ok.schedules["nightly"];
        assert_eq!(s.payload, serde_json::json!({"x": 1, "y": ["z"]}));
        assert_eq!(s.priority, 5);
        assert_eq!(
            ok.agents["a"].rate.map(|r| r.to_string()).as_deref(),
            Some("60/min")
        );

        let found = issues(
            "[agents.a]\nkind = \"command\"\ncommand = [\"true\"]\nrate = \"60/day\"\n\
             [schedules.bad]\ncron = \"61 * * * *\"\nagent = \"nope\"\n\
             [schedules.empty]\n\
             [schedules.typo]\ncron = \"* * * * *\"\nagent = \"a\"\ncolour = 1\n",
        );
        let keys: Vec<&str> = found.iter().map(|i| i.key.as_str()).collect();
        // First pass: types and unknown keys.
        assert!(keys.contains(&"agents.a.rate"), "{found:?}");
        assert!(keys.contains(&"schedules.typo.colour"), "{found:?}");
        let found = issues(
            "[agents.a]\nkind = \"command\"\ncommand = [\"true\"]\n\
             [schedules.bad]\ncron = \"61 * * * *\"\nagent = \"nope\"\n\
             [schedules.empty]\n",
        );
        let keys: Vec<&str> = found.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "schedules.bad.cron",
                "schedules.bad.agent",
                "schedules.empty.cron",
                "schedules.empty.agent"
            ],
            "{found:?}"
        );
        assert!(
            found[1].message.contains("unknown agent \"nope\""),
            "{found:?}"
        );
    }
}
