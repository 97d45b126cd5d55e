//! Validation of each section, one function per section, called by `Config::validate`
//! (every problem reported with its dotted key, none hiding another).

use super::Config;
use super::MAX_EVENT_BYTES;
use super::MAX_HTTP_CONNECTIONS;
use super::MAX_PREFETCH;
use super::MAX_RESULT_BYTES;
use super::sections::AgentKind;
use std::time::Duration;

impl Config {
    /// The pool and connection settings.
    pub(super) fn validate_database(&self, bad: &mut dyn FnMut(&str, String)) {
        let db = &self.database;
        if db.pool_size == 0 {
            bad("database.pool_size", "must be at least 1".into());
        }
        if db.max_connections() > 10_000 {
            bad(
                "database.max_overflow",
                "pool_size + max_overflow must be at most 10000".into(),
            );
        }
        for (key, d) in [
            ("database.checkout_timeout", db.checkout_timeout),
            ("database.connect_timeout", db.connect_timeout),
            ("database.query_timeout", db.query_timeout),
        ] {
            if d.get().is_zero() {
                bad(key, "must be greater than zero".into());
            }
        }
        if !db.statement_timeout.get().is_zero() && db.query_timeout <= db.statement_timeout {
            bad(
                "database.query_timeout",
                format!(
                    "{} must be longer than database.statement_timeout ({}), so the server's own \
                     cancel comes first and only a dead link hits the client-side deadline",
                    humantime::format_duration(db.query_timeout.get()),
                    humantime::format_duration(db.statement_timeout.get())
                ),
            );
        }
        if let Err(why) = super::schema_name::validate(&db.schema) {
            bad("database.schema", why);
        }
        if db.application_name.is_empty() {
            bad("database.application_name", "must not be empty".into());
        } else if db.application_name.len() > 63 {
            bad(
                "database.application_name",
                "PostgreSQL keeps at most 63 bytes".into(),
            );
        } else if !db
            .application_name
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b))
        {
            // The server shows other bytes as '?' (or \xNN from 16 on): the daemon would
            // not recognise its own sessions, and its checks would take them for others'.
            bad(
                "database.application_name",
                "printable ASCII only: PostgreSQL rewrites other characters, and the daemon must find its own sessions by this name".into(),
            );
        }
        if (1..1024).contains(&db.embedded_listen_port) {
            bad(
                "database.embedded_listen_port",
                "must be 0 (off) or in 1024..=65535 (the server does not run as root)".into(),
            );
        }
    }

    /// Watchdog thresholds and intervals.
    pub(super) fn validate_supervisor(&self, bad: &mut dyn FnMut(&str, String)) {
        let s = &self.supervisor;
        for (key, d) in [
            ("supervisor.interval", s.interval),
            ("supervisor.session_warn_age", s.session_warn_age),
            ("supervisor.session_max_age", s.session_max_age),
            ("supervisor.max_task_duration", s.max_task_duration),
            ("supervisor.resource_log_interval", s.resource_log_interval),
            ("supervisor.outcome_stall_after", s.outcome_stall_after),
        ] {
            if d.get().is_zero() {
                bad(key, "must be greater than zero".into());
            }
        }
        for (key, r) in [
            ("supervisor.pool_alert_ratio", s.pool_alert_ratio),
            ("supervisor.pool_clear_ratio", s.pool_clear_ratio),
            ("supervisor.memory_alert_ratio", s.memory_alert_ratio),
        ] {
            if !(r > 0.0 && r <= 1.0) {
                bad(key, format!("{r} is not a ratio in (0, 1]"));
            }
        }
        if s.pool_clear_ratio >= s.pool_alert_ratio {
            bad(
                "supervisor.pool_clear_ratio",
                format!(
                    "{} must be below supervisor.pool_alert_ratio ({}), or the alert would flap",
                    s.pool_clear_ratio, s.pool_alert_ratio
                ),
            );
        }
        if s.session_warn_age >= s.session_max_age {
            bad(
                "supervisor.session_warn_age",
                "must be shorter than supervisor.session_max_age".into(),
            );
        }
    }

    /// Concurrency, leases and retries.
    pub(super) fn validate_workers(&self, bad: &mut dyn FnMut(&str, String)) {
        let w = &self.workers;
        if w.concurrency == 0 {
            bad("workers.concurrency", "must be at least 1".into());
        }
        if w.max_attempts == 0 {
            bad("workers.max_attempts", "must be at least 1".into());
        }
        for (key, d) in [
            ("workers.lease", w.lease),
            ("workers.poll_interval", w.poll_interval),
            ("workers.retry_backoff", w.retry_backoff),
        ] {
            if d.get().is_zero() {
                bad(key, "must be greater than zero".into());
            }
        }
        if w.retry_backoff_max < w.retry_backoff {
            bad(
                "workers.retry_backoff_max",
                "must not be shorter than workers.retry_backoff".into(),
            );
        }
        if w.prefetch > MAX_PREFETCH {
            bad(
                "workers.prefetch",
                format!("must be at most {MAX_PREFETCH}"),
            );
        }
        if w.completion_window.get() > Duration::from_secs(1) {
            bad("workers.completion_window", "must be at most 1s".into());
        }
        for (key, v, max) in [
            (
                "workers.max_result_bytes",
                w.max_result_bytes,
                MAX_RESULT_BYTES,
            ),
            (
                "workers.max_event_bytes",
                w.max_event_bytes,
                MAX_EVENT_BYTES,
            ),
        ] {
            if v == 0 || v > max {
                bad(key, format!("must be in 1..={max}"));
            }
        }
    }

    /// Each agent: a name, a kind with what the kind needs, limits.
    pub(super) fn validate_agents(&self, bad: &mut dyn FnMut(&str, String)) {
        for (name, a) in &self.agents {
            let key = |k: &str| format!("agents.{name}.{k}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                bad(
                    &format!("agents.{name}"),
                    "agent names use letters, digits, '_' and '-'".into(),
                );
            }
            match a.kind {
                None => bad(&key("kind"), "missing; one of \"command\", \"http\"".into()),
                Some(AgentKind::Command) if a.command.is_empty() => {
                    bad(&key("command"), "a command agent needs an argv list".into())
                }
                Some(AgentKind::Http)
                    if !(a.url.starts_with("http://") || a.url.starts_with("https://")) =>
                {
                    bad(
                        &key("url"),
                        "an http agent needs an http:// or https:// url".into(),
                    )
                }
                _ => {}
            }
            if a.concurrency == 0 {
                bad(&key("concurrency"), "must be at least 1".into());
            }
            if a.timeout.get().is_zero() {
                bad(&key("timeout"), "must be greater than zero".into());
            }
            match (a.rate, a.burst) {
                (None, Some(_)) => bad(
                    &key("burst"),
                    "a burst needs a rate (e.g. rate = \"60/min\")".into(),
                ),
                (Some(r), Some(b)) if !(1..=r.count).contains(&b) => bad(
                    &key("burst"),
                    format!(
                        "must be in 1..={} (the rate's count: a burst of B lets N + B - 1 start in one period)",
                        r.count
                    ),
                ),
                _ => {}
            }
            if a.memory_max.is_some_and(|m| m.0 < 1 << 20) {
                bad(&key("memory_max"), "must be at least 1MiB".into());
            }
            if a.processes_max == Some(0) {
                bad(&key("processes_max"), "must be at least 1".into());
            }
            if a.cpu_time_max.is_some_and(|c| c.get().is_zero()) {
                bad(&key("cpu_time_max"), "must be greater than zero".into());
            }
        }
    }

    /// Retention: the run's period and bounds (ages may be zero: kept forever).
    pub(super) fn validate_retention(&self, bad: &mut dyn FnMut(&str, String)) {
        let r = &self.retention;
        if r.interval.get().is_zero() {
            bad("retention.interval", "must be greater than zero".into());
        }
        if !(1..=10_000).contains(&r.batch_size) {
            bad("retention.batch_size", "must be in 1..=10000".into());
        }
        if !(1..=1000).contains(&r.max_batches) {
            bad("retention.max_batches", "must be in 1..=1000".into());
        }
    }

    /// HTTP, alerts and logging.
    pub(super) fn validate_edges(&self, bad: &mut dyn FnMut(&str, String)) {
        if self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            bad(
                "http.listen",
                format!("{:?} is not an address:port", self.http.listen),
            );
        }
        if !self.http.api_token.is_empty() && !self.http.api_token_file.is_empty() {
            bad(
                "http.api_token_file",
                "set api_token or api_token_file, not both".into(),
            );
        }
        if self.http.max_body_bytes == 0 {
            bad("http.max_body_bytes", "must be greater than zero".into());
        }
        if !(1..=crate::config::MAX_BULK_ITEMS).contains(&self.http.max_bulk_items) {
            bad(
                "http.max_bulk_items",
                format!("must be in 1..={}", crate::config::MAX_BULK_ITEMS),
            );
        }
        if !(1024..=1024 * 1024 * 1024).contains(&self.http.max_response_bytes) {
            bad(
                "http.max_response_bytes",
                "must be between 1 KiB and 1 GiB".into(),
            );
        }
        let h = &self.http;
        let t = h.header_read_timeout.get();
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&t) {
            bad(
                "http.header_read_timeout",
                "must be between 1s and 1h".into(),
            );
        }
        let t = h.write_timeout.get();
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&t) {
            bad("http.write_timeout", "must be between 1s and 1h".into());
        }
        if !(1..=MAX_HTTP_CONNECTIONS).contains(&h.max_connections) {
            bad(
                "http.max_connections",
                format!("must be in 1..={MAX_HTTP_CONNECTIONS}"),
            );
        }
        if !(1..=MAX_HTTP_CONNECTIONS).contains(&h.max_streams) {
            bad(
                "http.max_streams",
                format!("must be in 1..={MAX_HTTP_CONNECTIONS}"),
            );
        }
        let hook = &self.alerts.webhook_url;
        if !(hook.is_empty() || hook.starts_with("http://") || hook.starts_with("https://")) {
            bad(
                "alerts.webhook_url",
                "must be an http:// or https:// url".into(),
            );
        }
        if tracing_subscriber::EnvFilter::try_new(&self.logging.level).is_err() {
            bad(
                "logging.level",
                format!(
                    "{:?} is not a level or filter (e.g. \"info\", \"taskwarden=debug\")",
                    self.logging.level
                ),
            );
        }
    }
}
