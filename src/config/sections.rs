//! The config sections, one struct each, with their defaults — the numbers from the seeds.
//! `config.toml` at the repository root shows every key with its default and its bound.

use super::DATABASE_URL_ENV;
use super::LOG_RESOURCE_USAGE_ENV;
use super::duration::ByteSize;
use super::duration::Dur;
use super::schedule::Rate;
use serde::Deserialize;
use serde::Deserializer;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Empty: run the embedded PostgreSQL under `data_dir`.
    pub url: String,
    /// Where the embedded cluster lives. Empty: `$STATE_DIRECTORY` (systemd) or `./data`.
    pub data_dir: String,
    pub pool_size: u32,
    pub max_overflow: u32,
    pub checkout_timeout: Dur,
    pub connect_timeout: Dur,
    pub pre_ping: bool,
    /// Pre-ping only a connection idle at least this long (0: every checkout).
    pub pre_ping_idle: Dur,
    pub application_name: String,
    /// The schema taskwarden's tables, functions and migration history live in.
    pub schema: String,
    pub statement_timeout: Dur,
    pub idle_in_transaction_timeout: Dur,
    /// Client-side deadline of every round trip; a connection that misses it is discarded.
    pub query_timeout: Dur,
    /// TCP keepalive idle time on database connections (0 = off); probes follow every
    /// third of it, three of them.
    pub tcp_keepalive: Dur,
    /// TCP_USER_TIMEOUT on database connections (0 = the kernel's default).
    pub tcp_user_timeout: Dur,
    pub capture_backtraces: bool,
    /// What sits between the daemon and PostgreSQL: decides which session features the
    /// daemon may use (see [`Pooler`]).
    pub pooler: Pooler,
    /// A URL straight to PostgreSQL (bypassing the pooler) for what needs a session of its
    /// own: LISTEN, the migration lock, the supervisor's admin connection. Empty: those go
    /// through `url`, and behind a transaction pooler the daemon polls instead of LISTEN.
    pub direct_url: String,
    /// The embedded PostgreSQL also listens on 127.0.0.1 at this port, so local
    /// applications can enqueue from their own transactions (0 = unix socket only).
    pub embedded_listen_port: u16,
    /// libpq's `sslmode` for `url` and `direct_url` (their own `sslmode=` wins).
    pub sslmode: SslMode,
    /// Root certificate(s) to verify the server against: a PEM file, or `system`.
    pub sslrootcert: String,
    /// A client certificate (PEM) and its key, for `cert` authentication.
    pub sslcert: String,
    pub sslkey: String,
}

/// The connection pooler in front of PostgreSQL, as `database.pooler` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooler {
    /// Straight to PostgreSQL: every feature, backends matched to sessions by pid.
    #[default]
    None,
    /// A session pooler (pgbouncer `pool_mode = session`): one server connection per client
    /// connection while it lasts; the pooler's idle server connections are not ours to
    /// terminate.
    Session,
    /// A transaction pooler (pgbouncer `pool_mode = transaction`): no startup options, no
    /// named prepared statements, no session state outside a transaction, no backend pids.
    Transaction,
}

impl Pooler {
    pub fn as_str(self) -> &'static str {
        match self {
            Pooler::None => "none",
            Pooler::Session => "session",
            Pooler::Transaction => "transaction",
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            data_dir: String::new(),
            pool_size: 20,
            max_overflow: 10,
            checkout_timeout: Dur::secs(5),
            connect_timeout: Dur::secs(10),
            pre_ping: true,
            pre_ping_idle: Dur::millis(500),
            application_name: "taskwarden".into(),
            schema: super::schema_name::DEFAULT.into(),
            statement_timeout: Dur::secs(10),
            idle_in_transaction_timeout: Dur::secs(15),
            query_timeout: Dur::secs(15),
            tcp_keepalive: Dur::secs(15),
            tcp_user_timeout: Dur::secs(30),
            capture_backtraces: false,
            pooler: Pooler::None,
            direct_url: String::new(),
            embedded_listen_port: 0,
            sslmode: Default::default(),
            sslrootcert: String::new(),
            sslcert: String::new(),
            sslkey: String::new(),
        }
    }
}

impl DatabaseConfig {
    /// The hard maximum of pooled connections: base size plus overflow.
    pub fn max_connections(&self) -> usize {
        self.pool_size as usize + self.max_overflow as usize
    }

    /// The URL in force: the env override if set, else the file's.
    pub fn effective_url(&self) -> String {
        match std::env::var(DATABASE_URL_ENV) {
            Ok(v) if !v.trim().is_empty() => v,
            _ => self.url.clone(),
        }
    }

    /// The directory of the embedded cluster.
    pub fn effective_data_dir(&self) -> PathBuf {
        if !self.data_dir.is_empty() {
            return PathBuf::from(&self.data_dir);
        }
        match std::env::var("STATE_DIRECTORY") {
            // systemd may pass several colon-separated dirs; the first is ours.
            Ok(v) if !v.is_empty() => PathBuf::from(v.split(':').next().unwrap_or(&v)),
            _ => PathBuf::from("data"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisorConfig {
    pub interval: Dur,
    pub pool_alert_ratio: f64,
    pub pool_clear_ratio: f64,
    pub session_warn_age: Dur,
    pub session_max_age: Dur,
    pub max_task_duration: Dur,
    pub memory_alert_ratio: f64,
    pub log_resource_usage: bool,
    pub resource_log_interval: Dur,
    /// An agent's own database session (application_name `<schema>/task/<id>`) idle in
    /// a transaction longer than this is terminated; the task goes on.
    pub agent_idle_in_transaction_max: Dur,
    /// A finished run whose outcome has waited longer than this to be written makes the
    /// instance unready (`/readyz` 503), fires `outcomes_stalled`, and — while the database
    /// itself answers — withholds the systemd watchdog's keep-alive.
    pub outcome_stall_after: Dur,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            interval: Dur::secs(5),
            pool_alert_ratio: 0.80,
            pool_clear_ratio: 0.70,
            session_warn_age: Dur::secs(60),
            session_max_age: Dur::secs(30 * 60),
            max_task_duration: Dur::secs(1800),
            memory_alert_ratio: 0.90,
            log_resource_usage: false,
            resource_log_interval: Dur::secs(300),
            agent_idle_in_transaction_max: Dur::secs(60),
            outcome_stall_after: Dur::secs(60),
        }
    }
}

impl SupervisorConfig {
    /// The file's switch, or `LOG_RESOURCE_USAGE=true` in the environment.
    pub fn resource_logging_enabled(&self) -> bool {
        self.log_resource_usage
            || std::env::var(LOG_RESOURCE_USAGE_ENV)
                .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
                .unwrap_or(false)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkersConfig {
    pub concurrency: u32,
    pub lease: Dur,
    pub poll_interval: Dur,
    pub max_attempts: u32,
    pub retry_backoff: Dur,
    pub retry_backoff_max: Dur,
    /// How long shutdown waits for running work before re-queueing it and exiting.
    pub shutdown_grace: Dur,
    /// Most tasks claimed ahead per agent, beyond the free permits, held here until a
    /// permit frees (see `orchestrator::claimer`). 0: claim only for free permits.
    pub prefetch: u32,
    /// How long the outcome writer gathers outcomes before writing them in one
    /// statement (0: write whatever is queued at once).
    pub completion_window: Dur,
    /// Largest result (serialized JSON) an attempt may return; a larger one fails the
    /// attempt, naming this key (see `agents::storable`).
    pub max_result_bytes: u64,
    /// Largest event data stored; a larger event is stored as a marker saying so.
    pub max_event_bytes: u64,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            concurrency: 10,
            lease: Dur::secs(30),
            poll_interval: Dur::secs(1),
            max_attempts: 3,
            retry_backoff: Dur::secs(1),
            retry_backoff_max: Dur::secs(300),
            shutdown_grace: Dur::secs(10),
            prefetch: 400,
            completion_window: Dur::millis(5),
            max_result_bytes: 1024 * 1024,
            max_event_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentKind {
    Command,
    Http,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    pub kind: Option<AgentKind>,
    /// argv for `kind = "command"`.
    pub command: Vec<String>,
    /// Endpoint for `kind = "http"`.
    pub url: String,
    pub concurrency: u32,
    pub timeout: Dur,
    /// The agent's reply is the list of steps of an objective.
    pub planner: bool,
    /// Cluster-wide rate limit on starts of this agent's tasks (`"N/sec|min|hour"` or
    /// `"N/PERIOD"` such as `"20/5s"`), held in every window of the period (GCRA, see
    /// `store::rate_limit`); none when absent.
    pub rate: Option<Rate>,
    /// How many of the rate's starts may come at once (1..=N, default 1). With B, any
    /// window of the rate's period holds at most N + B - 1 starts.
    pub burst: Option<u32>,
    /// A task whose process tree holds more resident memory than this (summed over the
    /// tree, sampled every supervisor.interval) is killed, whole tree, and fails; none
    /// when absent.
    pub memory_max: Option<ByteSize>,
    /// The same for the number of processes in the tree.
    pub processes_max: Option<u64>,
    /// The same for the tree's CPU time (live processes and the children they reaped).
    pub cpu_time_max: Option<Dur>,
    /// A budget of the agent's own database sessions over its running tasks here,
    /// exported as `taskwarden_agent_db_sessions_max` for the alert
    /// TaskwardenAgentSessionsOverBudget; nothing is terminated for it. None when absent.
    pub db_sessions_max: Option<u64>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            kind: None,
            command: Vec::new(),
            url: String::new(),
            concurrency: 4,
            timeout: Dur::secs(1800),
            planner: false,
            rate: None,
            burst: None,
            memory_max: None,
            processes_max: None,
            cpu_time_max: None,
            db_sessions_max: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
    pub api_token: String,
    pub api_token_file: String,
    pub max_body_bytes: u64,
    /// A list answer stops adding rows once their payloads and results pass this many bytes
    /// (it says so with `truncated` and where to go on with `next_after`).
    pub max_response_bytes: u64,
    /// Most tasks one bulk submit (`POST /v1/tasks` with an array) may carry.
    pub max_bulk_items: usize,
    /// A connection must finish a request header within this of opening and of the end of
    /// each response, or it is closed (half-sent requests, idle keep-alives).
    pub header_read_timeout: Dur,
    /// A response whose writes make no progress for this long (the client stopped reading)
    /// has its connection closed, and an event stream its producer ended.
    pub write_timeout: Dur,
    /// Most HTTP connections open at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Most event streams open at once; one more is answered 503.
    pub max_streams: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9187".into(),
            api_token: String::new(),
            api_token_file: String::new(),
            max_body_bytes: 1024 * 1024,
            max_response_bytes: 8 * 1024 * 1024,
            max_bulk_items: 1000,
            header_read_timeout: Dur::secs(10),
            write_timeout: Dur::secs(30),
            max_connections: 1024,
            max_streams: 256,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsConfig {
    pub webhook_url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    pub level: String,
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Pretty,
        }
    }
}

/// How long finished tasks and their events are kept, per final status, and how the leader
/// deletes them. An age of `"0"` (or `""`) keeps that status forever.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    #[serde(deserialize_with = "keep_or_age")]
    pub succeeded: Dur,
    #[serde(deserialize_with = "keep_or_age")]
    pub failed: Dur,
    #[serde(deserialize_with = "keep_or_age")]
    pub cancelled: Dur,
    #[serde(deserialize_with = "keep_or_age")]
    pub timed_out: Dur,
    /// How often the leader runs retention.
    pub interval: Dur,
    /// Tasks deleted per statement.
    pub batch_size: u32,
    /// Statements per run at most.
    pub max_batches: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            succeeded: Dur::secs(24 * 3600),
            failed: Dur::secs(7 * 24 * 3600),
            cancelled: Dur::secs(7 * 24 * 3600),
            timed_out: Dur::secs(7 * 24 * 3600),
            interval: Dur::secs(60),
            batch_size: 1000,
            max_batches: 10,
        }
    }
}

impl RetentionConfig {
    /// The age of each final status that is not kept forever.
    pub fn ages(&self) -> Vec<(crate::task_state::TaskStatus, Duration)> {
        use crate::task_state::TaskStatus as T;
        [
            (T::Succeeded, self.succeeded),
            (T::Failed, self.failed),
            (T::Cancelled, self.cancelled),
            (T::TimedOut, self.timed_out),
        ]
        .into_iter()
        .filter(|(_, d)| !d.get().is_zero())
        .map(|(st, d)| (st, d.get()))
        .collect()
    }
}

/// A retention age: a duration, or `""` for zero (keep forever), like `"0"`.
fn keep_or_age<'de, D: Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
    let s = String::deserialize(d)?;
    if s.trim().is_empty() {
        return Ok(Dur(Duration::ZERO));
    }
    Dur::deserialize(serde::de::value::StringDeserializer::<D::Error>::new(s))
}

/// Most tasks one bulk submit may carry, whatever `http.max_bulk_items` says.
pub const MAX_BULK_ITEMS: usize = 10_000;

/// libpq's `sslmode` (what each means for a connection is `db/tls.rs`'s business).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// libpq's name for it, or `None` for a word that is not one of them.
    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }
}
