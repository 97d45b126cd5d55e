//! `[watch.NAME]`: rules for the sessions of the applications that share the database.
//!
//! taskwarden guards its own pool by construction; the applications beside it leak
//! exactly as the seeds describe (a session opened and never closed, a pool with no
//! monitoring). A rule picks an application's sessions out of `pg_stat_activity` by
//! `application_name` (a glob) and optionally role, database and client network, gives
//! them a budget and age limits, and says whether passing a limit only alerts or also
//! ends the session. The supervisor applies the rules (`supervisor::watch`).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{Config, Dur};

/// Most `[watch.NAME]` rules: each is a label value of the `taskwarden_watch_*` series
/// and one more list in `/v1/status`.
pub const MAX_WATCH_RULES: usize = 32;

/// What a rule does with a session past one of its limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchAction {
    /// Logged once and counted; the session is left alone (someone else's sessions are
    /// only ended when the operator says so).
    #[default]
    Alert,
    /// As `alert`, and the session is terminated (`pg_terminate_backend`); a query past
    /// `query_max_duration` is cancelled (`pg_cancel_backend`).
    Terminate,
}

impl WatchAction {
    pub fn as_str(self) -> &'static str {
        match self {
            WatchAction::Alert => "alert",
            WatchAction::Terminate => "terminate",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WatchConfig {
    /// A glob over `application_name` (`*` any run of characters, `?` one); required.
    pub application_name: String,
    /// A glob over the session's role name; any role when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// A glob over the session's database name; any database when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// An address or a CIDR network (`10.0.0.0/8`, `::1`); sessions over the unix socket
    /// have no address and never match a rule that names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_addr: Option<String>,
    /// The application's session budget: `watch_sessions_high` fires at
    /// `supervisor.pool_alert_ratio` of it and clears below `pool_clear_ratio`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_sessions: Option<u32>,
    /// A session idle inside a transaction longer than this is past its limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_in_transaction_max: Option<Dur>,
    /// A session connected longer than this is past its limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_max_age: Option<Dur>,
    /// A query running longer than this is past its limit (cancelled, not terminated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_max_duration: Option<Dur>,
    pub action: WatchAction,
}

/// A parsed `client_addr`: a network and its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or a CIDR network"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?,
        };
        // A network written as IPv4-mapped IPv6 (`::ffff:10.0.0.0/104`) is the IPv4 one:
        // PostgreSQL shows such clients by their IPv4 address.
        if let IpAddr::V6(v6) = net
            && let Some(v4) = v6.to_ipv4_mapped()
            && prefix >= 96
        {
            return Ok(Cidr {
                net: IpAddr::V4(v4),
                prefix: prefix - 96,
            });
        }
        Ok(Cidr { net, prefix })
    }

    pub fn contains(&self, a: IpAddr) -> bool {
        // An IPv4 client seen through an IPv6 socket is written ::ffff:a.b.c.d.
        let a = match a {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, a) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Whether `text` matches the glob `pattern`: `*` any run of characters (none too), `?`
/// exactly one, everything else itself. At most pattern × text steps: only the last `*`
/// is retried, so patterns like `*a*a*a*b` cannot blow up.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and the text position it has absorbed up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(c) if *c == '?' || *c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

impl Config {
    /// Watch rules: a valid name, at most [`MAX_WATCH_RULES`], an application_name glob,
    /// a valid network, limits above zero.
    pub(super) fn validate_watch(&self, bad: &mut dyn FnMut(&str, String)) {
        if self.watch.len() > MAX_WATCH_RULES {
            bad(
                "watch",
                format!(
                    "{} rules; at most {MAX_WATCH_RULES} (each is a label value of the watch metrics)",
                    self.watch.len()
                ),
            );
        }
        for (name, w) in &self.watch {
            let key = |k: &str| format!("watch.{name}.{k}");
            if !super::is_section_name(name, 64) {
                bad(
                    &format!("watch.{name}"),
                    "rule names use 1..=64 letters, digits, '_' and '-'".into(),
                );
            }
            if w.application_name.is_empty() {
                bad(
                    &key("application_name"),
                    "missing; a glob such as \"myapp*\" (use \"*\" for every application)".into(),
                );
            }
            for (k, v) in [("user", &w.user), ("database", &w.database)] {
                if v.as_deref() == Some("") {
                    bad(&key(k), "empty; leave it out to match any".into());
                }
            }
            if let Some(c) = &w.client_addr
                && let Err(e) = Cidr::parse(c)
            {
                bad(&key("client_addr"), e);
            }
            if w.max_sessions == Some(0) {
                bad(&key("max_sessions"), "must be at least 1".into());
            }
            for (k, d) in [
                ("idle_in_transaction_max", w.idle_in_transaction_max),
                ("session_max_age", w.session_max_age),
                ("query_max_duration", w.query_max_duration),
            ] {
                if d.is_some_and(|d| d.get().is_zero()) {
                    bad(
                        &key(k),
                        "must be above zero; leave it out for no limit".into(),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ParseError;

    #[test]
    fn globs_match_as_shells_do() {
        assert!(glob_match("myapp*", "myapp"));
        assert!(glob_match("myapp*", "myapp:tasks.py:12:create"));
        assert!(!glob_match("myapp*", "other-app"));
        assert!(!glob_match("myapp*", "xmyapp"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*a*b", "xxaxxb"));
        assert!(!glob_match("*a*b", "xxaxxbx"));
        assert!(glob_match("é*", "été"));
        assert!(!glob_match("", "x"));
        // Naive backtracking would take ages on this.
        let long = "a".repeat(5000);
        assert!(!glob_match("*a*a*a*a*a*a*a*a*c", &format!("{long}b")));
    }

    #[test]
    fn networks_contain_their_addresses() {
        let n = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one = Cidr::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert!(
            Cidr::parse("::1/128")
                .unwrap()
                .contains("::1".parse().unwrap())
        );
        let mapped = Cidr::parse("::ffff:127.0.0.0/104").unwrap();
        assert!(mapped.contains("127.0.0.1".parse().unwrap()));
        assert!(!mapped.contains("128.0.0.1".parse().unwrap()));
        assert!(
            Cidr::parse("::ffff:127.0.0.1")
                .unwrap()
                .contains("127.0.0.1".parse().unwrap())
        );
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("myhost").is_err());
    }

    #[test]
    fn the_daemons_own_name_is_printable_ascii_so_rules_can_tell_it_apart() {
        // PostgreSQL 15 shows "advdémon" as "advd??mon": the daemon would take its own
        // sessions for an application's.
        // As written in the TOML file.
        for bad in [r#""advdémon""#, r#""tab\there""#, r#""ctl\u0001""#] {
            let Err(ParseError::Invalid(issues)) =
                Config::parse(&format!("[database]\napplication_name = {bad}\n"))
            else {
                panic!("{bad:?} accepted");
            };
            assert_eq!(issues[0].key, "database.application_name", "{issues:?}");
        }
        assert!(Config::parse("[database]\napplication_name = \"my-app_1 (prod)\"\n").is_ok());
    }

    #[test]
    fn rules_are_checked() {
        let ok = Config::parse(
            "[watch.myapp]\napplication_name = \"myapp*\"\nmax_sessions = 5\n\
             idle_in_transaction_max = \"3s\"\naction = \"terminate\"\nclient_addr = \"10.0.0.0/8\"\n",
        )
        .unwrap();
        let w = &ok.watch["myapp"];
        assert_eq!(w.action, WatchAction::Terminate);
        assert_eq!(w.max_sessions, Some(5));
        let Err(ParseError::Invalid(issues)) = Config::parse(
            "[watch.\"bad name\"]\nmax_sessions = 0\nclient_addr = \"nope\"\n\
             session_max_age = \"0s\"\nuser = \"\"\n",
        ) else {
            panic!("accepted");
        };
        let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
        for k in [
            "watch.bad name",
            "watch.bad name.application_name",
            "watch.bad name.max_sessions",
            "watch.bad name.client_addr",
            "watch.bad name.session_max_age",
            "watch.bad name.user",
        ] {
            assert!(keys.contains(&k), "{k} not in {keys:?}");
        }
        let Err(ParseError::Invalid(issues)) =
            Config::parse("[watch.a]\napplication_name = \"a\"\naction = \"kill\"\n")
        else {
            panic!("accepted");
        };
        assert_eq!(issues[0].key, "watch.a.action");
        let many: String = (0..=MAX_WATCH_RULES)
            .map(|i| format!("[watch.r{i}]\napplication_name = \"a\"\n"))
            .collect();
        assert!(Config::parse(&many).is_err());
    }
}
