//! The daemon's configuration: the TOML schema, its defaults (the seeds' numbers) and
//! validation that reports every problem at once, each named by its dotted key.
//!
//! Parsing is two-pass on purpose. serde stops at the first bad field, but an operator
//! fixing a file wants the whole list; so each key is first deserialized on its own (type
//! errors and unknown keys), then the assembled config is checked as a whole (ranges and
//! relations between keys, such as the clear ratio being below the alert ratio).

mod duration;
mod schedule;
pub mod schema_name;

/// Bound of `workers.prefetch`.
pub const MAX_PREFETCH: u32 = 10_000;
/// Bound of `workers.max_result_bytes` (64 MiB: far below PostgreSQL's 1 GB per value).
pub const MAX_RESULT_BYTES: u64 = 64 << 20;
/// Bound of `workers.max_event_bytes`.
pub const MAX_EVENT_BYTES: u64 = 16 << 20;
/// Upper bound of `http.max_connections` (each is a file descriptor).
pub const MAX_HTTP_CONNECTIONS: usize = 1 << 16;
pub mod reload;
mod sections;
mod validate;
pub mod watch;

pub use duration::{ByteSize, Dur, MAX_DURATION};
pub use schedule::{MAX_RATE_COUNT, Rate, ScheduleConfig, parse_cron};
pub use sections::*;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Env var that overrides `database.url`, so a secret URL need not live in the file.
pub const DATABASE_URL_ENV: &str = "TASKWARDEN_DATABASE_URL";
/// Env var that turns on the periodic resource status line (the second seed's switch).
pub const LOG_RESOURCE_USAGE_ENV: &str = "LOG_RESOURCE_USAGE";

/// One problem found in a config file, named by its dotted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config file {path} has {} problem(s):\n{}", .issues.len(), render_issues(.issues))]
    Invalid {
        path: PathBuf,
        issues: Vec<ConfigIssue>,
    },
}

fn render_issues(issues: &[ConfigIssue]) -> String {
    issues
        .iter()
        .map(|i| format!("  - {i}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub supervisor: SupervisorConfig,
    pub workers: WorkersConfig,
    pub agents: BTreeMap<String, AgentConfig>,
    pub http: HttpConfig,
    pub alerts: AlertsConfig,
    pub logging: LoggingConfig,
    pub retention: RetentionConfig,
    /// `[schedules.NAME]`: periodic tasks.
    pub schedules: BTreeMap<String, ScheduleConfig>,
    /// `[watch.NAME]`: the sessions of applications sharing the database.
    pub watch: BTreeMap<String, watch::WatchConfig>,
}

impl Config {
    /// Reads and validates a config file. Every problem is reported, not just the first.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ParseError::Syntax(message) => ConfigError::Syntax {
                path: path.to_path_buf(),
                message,
            },
            ParseError::Invalid(issues) => ConfigError::Invalid {
                path: path.to_path_buf(),
                issues,
            },
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ParseError> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| ParseError::Syntax(e.message().to_string()))?;
        let mut issues = Vec::new();
        check_keys(&table, &mut issues);
        if !issues.is_empty() {
            return Err(ParseError::Invalid(issues));
        }
        let config: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    ParseError::Invalid(vec![ConfigIssue {
                        key: "(file)".into(),
                        message: e.message().to_string(),
                    }])
                })?;
        let issues = config.validate();
        if issues.is_empty() {
            Ok(config)
        } else {
            Err(ParseError::Invalid(issues))
        }
    }

    /// Range and cross-key checks on an assembled config.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut v = Vec::new();
        let mut bad = |key: &str, message: String| {
            v.push(ConfigIssue {
                key: key.into(),
                message,
            })
        };
        self.validate_database(&mut bad);
        self.validate_supervisor(&mut bad);
        self.validate_workers(&mut bad);
        self.validate_agents(&mut bad);
        self.validate_edges(&mut bad);
        self.validate_retention(&mut bad);
        self.validate_schedules(&mut bad);
        self.validate_watch(&mut bad);
        v
    }
}

/// Whether `name` may name a `[section.NAME]` (a schedule, a watch rule): 1..=`max`
/// letters, digits, '_' and '-', so it is safe as a metric label and in a dotted key.
pub(crate) fn is_section_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    Syntax(String),
    Invalid(Vec<ConfigIssue>),
}

/// First pass: each key deserialized on its own, so one bad key cannot hide another.
fn check_keys(table: &toml::Table, issues: &mut Vec<ConfigIssue>) {
    for (section, value) in table {
        match section.as_str() {
            "database" => check_section::<DatabaseConfig>(section, value, issues),
            "supervisor" => check_section::<SupervisorConfig>(section, value, issues),
            "workers" => check_section::<WorkersConfig>(section, value, issues),
            "http" => check_section::<HttpConfig>(section, value, issues),
            "alerts" => check_section::<AlertsConfig>(section, value, issues),
            "logging" => check_section::<LoggingConfig>(section, value, issues),
            "retention" => check_section::<RetentionConfig>(section, value, issues),
            "schedules" => match value.as_table() {
                Some(schedules) => {
                    for (name, s) in schedules {
                        check_section::<ScheduleConfig>(&format!("schedules.{name}"), s, issues);
                    }
                }
                None => issues.push(ConfigIssue {
                    key: "schedules".into(),
                    message: "must be a table of [schedules.NAME] sections".into(),
                }),
            },
            "watch" => match value.as_table() {
                Some(rules) => {
                    for (name, w) in rules {
                        check_section::<watch::WatchConfig>(&format!("watch.{name}"), w, issues);
                    }
                }
                None => issues.push(ConfigIssue {
                    key: "watch".into(),
                    message: "must be a table of [watch.NAME] sections".into(),
                }),
            },
            "agents" => match value.as_table() {
                Some(agents) => {
                    for (name, agent) in agents {
                        check_section::<AgentConfig>(&format!("agents.{name}"), agent, issues);
                    }
                }
                None => issues.push(ConfigIssue {
                    key: "agents".into(),
                    message: "must be a table of [agents.NAME] sections".into(),
                }),
            },
            _ => issues.push(ConfigIssue {
                key: section.clone(),
                message: "unknown section".into(),
            }),
        }
    }
}

fn check_section<T: DeserializeOwned>(
    prefix: &str,
    value: &toml::Value,
    issues: &mut Vec<ConfigIssue>,
) {
    let Some(table) = value.as_table() else {
        issues.push(ConfigIssue {
            key: prefix.into(),
            message: "must be a table".into(),
        });
        return;
    };
    for (key, v) in table {
        let mut one = toml::Table::new();
        one.insert(key.clone(), v.clone());
        if let Err(e) = toml::Value::Table(one).try_into::<T>() {
            let msg = e.message().to_string();
            let message = if msg.starts_with("unknown field") {
                "unknown key".to_string()
            } else {
                msg
            };
            issues.push(ConfigIssue {
                key: format!("{prefix}.{key}"),
                message,
            });
        }
    }
}

/// The API token in force: `http.api_token`, or the first line of `http.api_token_file`.
pub fn resolve_token(cfg: &Config) -> Result<Option<String>, std::io::Error> {
    if !cfg.http.api_token.is_empty() {
        return Ok(Some(cfg.http.api_token.clone()));
    }
    if !cfg.http.api_token_file.is_empty() {
        let t = std::fs::read_to_string(&cfg.http.api_token_file)?;
        let t = t.lines().next().unwrap_or("").trim().to_string();
        if t.is_empty() {
            return Err(std::io::Error::other(format!(
                "{} is empty",
                cfg.http.api_token_file
            )));
        }
        return Ok(Some(t));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn issues(text: &str) -> Vec<ConfigIssue> {
        match Config::parse(text) {
            Err(ParseError::Invalid(i)) => i,
            other => panic!("expected invalid config, got {other:?}"),
        }
    }

    #[test]
    fn empty_file_gives_seed_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.database.pool_size, 20);
        assert_eq!(c.database.max_overflow, 10);
        assert_eq!(c.database.max_connections(), 30);
        assert_eq!(
            c.supervisor.session_max_age.get(),
            Duration::from_secs(1800)
        );
        assert_eq!(
            c.supervisor.max_task_duration.get(),
            Duration::from_secs(1800)
        );
        assert_eq!(
            c.supervisor.resource_log_interval.get(),
            Duration::from_secs(300)
        );
        assert_eq!(c.supervisor.pool_alert_ratio, 0.80);
    }

    #[test]
    fn shipped_config_is_valid_and_matches_defaults() {
        let text = include_str!("../../config.toml");
        let c = Config::parse(text).unwrap();
        let d = Config::default();
        assert_eq!(c.database, d.database);
        assert_eq!(c.supervisor, d.supervisor);
        assert_eq!(c.workers, d.workers);
        assert_eq!(c.http, d.http);
        assert_eq!(c.logging, d.logging);
        assert_eq!(c.retention, d.retention);
        assert_eq!(c.schedules, d.schedules);
    }

    #[test]
    fn retention_ages_zero_or_empty_keep_forever() {
        let c =
            Config::parse("[retention]\nsucceeded = \"0\"\nfailed = \"\"\ncancelled = \"90m\"\n")
                .unwrap();
        use crate::task_state::TaskStatus as T;
        assert_eq!(
            c.retention.ages(),
            vec![
                (T::Cancelled, Duration::from_secs(90 * 60)),
                (T::TimedOut, Duration::from_secs(7 * 24 * 3600)),
            ]
        );
        let d = Config::default().retention;
        assert_eq!(d.succeeded.get(), Duration::from_secs(24 * 3600));
        assert_eq!(d.failed.get(), Duration::from_secs(7 * 24 * 3600));
        let found = issues(
            "[retention]\nsucceeded = \"-1d\"\nbatch_size = 0\nmax_batches = 5000\ninterval = \"0s\"\n",
        );
        let keys: Vec<&str> = found.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, vec!["retention.succeeded"], "{found:?}");
        let found = issues("[retention]\nbatch_size = 0\nmax_batches = 5000\ninterval = \"0s\"\n");
        let keys: Vec<&str> = found.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "retention.interval",
                "retention.batch_size",
                "retention.max_batches"
            ],
            "{found:?}"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let found = issues(
            r#"
            [database]
            pool_size = "twenty"
            checkout_timeout = "-5s"
            colour = "blue"
            [supervisor]
            pool_alert_ratio = 0.5
            pool_clear_ratio = 0.9
            [nonsense]
            x = 1
            "#,
        );
        let keys: Vec<&str> = found.iter().map(|i| i.key.as_str()).collect();
        assert!(keys.contains(&"database.pool_size"), "{found:?}");
        assert!(keys.contains(&"database.checkout_timeout"), "{found:?}");
        assert!(keys.contains(&"database.colour"), "{found:?}");
        assert!(keys.contains(&"nonsense"), "{found:?}");
        // the ratio relation is checked in the second pass, once types are right
        let found = issues("[supervisor]\npool_alert_ratio = 0.5\npool_clear_ratio = 0.9\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].key, "supervisor.pool_clear_ratio");
    }

    #[test]
    fn semantic_checks_name_their_keys() {
        let found = issues(
            r#"
            [database]
            pool_size = 0
            [workers]
            concurrency = 0
            [agents.bad]
            kind = "command"
            [http]
            listen = "nowhere"
            [logging]
            level = "loud=="
            "#,
        );
        let keys: Vec<&str> = found.iter().map(|i| i.key.as_str()).collect();
        for k in [
            "database.pool_size",
            "workers.concurrency",
            "agents.bad.command",
            "http.listen",
        ] {
            assert!(keys.contains(&k), "missing {k} in {found:?}");
        }
    }

    #[test]
    fn enqueue_bounds_name_their_keys() {
        for (text, key) in [
            ("[http]\nmax_bulk_items = 0\n", Some("http.max_bulk_items")),
            (
                "[http]\nmax_bulk_items = 10001\n",
                Some("http.max_bulk_items"),
            ),
            ("[http]\nmax_bulk_items = 10000\n", None),
            (
                "[database]\nembedded_listen_port = 80\n",
                Some("database.embedded_listen_port"),
            ),
            ("[database]\nembedded_listen_port = 15432\n", None),
        ] {
            match key {
                Some(key) => {
                    let found = issues(text);
                    let keys: Vec<&str> = found.iter().map(|i| i.key.as_str()).collect();
                    assert_eq!(keys, vec![key], "{text}");
                }
                None => assert!(Config::parse(text).is_ok(), "{text}"),
            }
        }
    }

    #[test]
    fn negative_number_is_a_type_error() {
        let found = issues("[database]\nmax_overflow = -1\n");
        assert_eq!(found[0].key, "database.max_overflow");
    }
}
