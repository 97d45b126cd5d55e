//! Every metric the daemon exports: its name, kind, unit and help, in one table
//! ([`DEFS`]), and the registry they are recorded into.
//!
//! The registry is an instance, not the process-global `metrics` recorder: a daemon owns
//! one, and so does each test, so figures never leak between them. `/metrics` renders it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    /// A counter whose increments are fractional (dollars): the `metrics` crate's counters
    /// are integers, so these are kept and rendered by [`Metrics`] itself.
    FloatCounter,
    Gauge,
    Histogram,
}

/// One exported metric.
#[derive(Debug, Clone, Copy)]
pub struct Def {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Unit,
    pub help: &'static str,
    /// Label names it carries.
    pub labels: &'static [&'static str],
}

macro_rules! metrics_table {
    ($( $ident:ident = $name:literal, $kind:ident, $unit:ident, [$($label:literal),*], $help:literal; )*) => {
        $( pub const $ident: &str = concat!("taskwarden_", $name); )*
        /// The whole table, in export order.
        pub const DEFS: &[Def] = &[
            $( Def { name: $ident, kind: Kind::$kind, unit: Unit::$unit, help: $help, labels: &[$($label),*] }, )*
        ];
    };
}

metrics_table! {
    DB_POOL_MAX_CONNECTIONS = "db_pool_max_connections", Gauge, Count, [], "Hard maximum of pooled connections (pool_size + max_overflow).";
    DB_POOL_CONNECTIONS = "db_pool_connections", Gauge, Count, [], "Open pooled connections, in use or idle.";
    DB_POOL_IN_USE = "db_pool_in_use", Gauge, Count, [], "Pooled connections checked out by a DB session guard.";
    DB_POOL_IDLE = "db_pool_idle", Gauge, Count, [], "Open pooled connections waiting in the pool.";
    DB_POOL_WAITING = "db_pool_waiting", Gauge, Count, [], "Callers waiting for a connection.";
    DB_POOL_UTILIZATION_RATIO = "db_pool_utilization_ratio", Gauge, Percent, [], "In use divided by the hard maximum, 0 to 1.";
    DB_CHECKOUT_WAIT_SECONDS = "db_checkout_wait_seconds", Histogram, Seconds, [], "Time from asking for a connection to getting one (successful checkouts).";
    DB_CHECKOUT_TIMEOUTS_TOTAL = "db_checkout_timeouts_total", Counter, Count, [], "Checkouts that failed after waiting checkout_timeout.";
    DB_SESSIONS_OPEN = "db_sessions_open", Gauge, Count, [], "Live DB session guards (checked-out pooled connections).";
    DB_SESSIONS_ENCRYPTED = "db_sessions_encrypted", Gauge, Count, [], "This instance's database sessions the server lists as encrypted (pg_stat_ssl; supervisor's last reading).";
    DB_SESSIONS_OPENED_TOTAL = "db_sessions_opened_total", Counter, Count, [], "DB session guards handed out.";
    DB_SESSION_OLDEST_AGE_SECONDS = "db_session_oldest_age_seconds", Gauge, Seconds, [], "Age of the oldest live DB session guard (0 when none).";
    DB_SESSIONS_LONG_LIVED_TOTAL = "db_sessions_long_lived_total", Counter, Count, [], "DB sessions that outlived session_warn_age (counted once each).";
    DB_SESSIONS_FORCE_CLOSED_TOTAL = "db_sessions_force_closed_total", Counter, Count, [], "DB sessions force-closed after session_max_age.";
    DB_BACKENDS_TERMINATED_TOTAL = "db_backends_terminated_total", Counter, Count, [], "PostgreSQL backends terminated by the supervisor (force-closes and orphans).";
    TASKS = "tasks", Gauge, Count, ["status"], "Tasks in the database by status.";
    WATCH_SESSIONS = "watch_sessions", Gauge, Count, ["watch", "state"], "Sessions a [watch.NAME] rule matches, by state: active, idle, idle_in_transaction, unknown (this role may not see the state: grant pg_read_all_stats) (supervisor's last reading).";
    WATCH_MAX_SESSIONS = "watch_max_sessions", Gauge, Count, ["watch"], "The rule's max_sessions (the application's session budget; absent when it has none).";
    WATCH_SESSION_OLDEST_AGE_SECONDS = "watch_session_oldest_age_seconds", Gauge, Seconds, ["watch"], "Age of the oldest session the rule matches (0 when none).";
    WATCH_SESSIONS_OVER_LIMIT_TOTAL = "watch_sessions_over_limit_total", Counter, Count, ["watch", "reason"], "Sessions found past a limit of their rule, once per session and limit, reason = idle_in_transaction_max, session_max_age or query_max_duration (with action = alert, nothing more is done).";
    WATCH_SESSIONS_TERMINATED_TOTAL = "watch_sessions_terminated_total", Counter, Count, ["watch", "reason"], "Sessions a rule with action = terminate ended (pg_terminate_backend), reason = idle_in_transaction_max or session_max_age.";
    WATCH_SIGNALS_REFUSED_TOTAL = "watch_signals_refused_total", Counter, Count, ["watch"], "Sessions or queries a rule with action = terminate could not end because this role may not signal them (pg_signal_backend; a superuser's need a superuser), each pass they are past a limit.";
    WATCH_QUERIES_CANCELLED_TOTAL = "watch_queries_cancelled_total", Counter, Count, ["watch"], "Queries past query_max_duration a rule with action = terminate cancelled (pg_cancel_backend).";
    SERVER_CONNECTIONS = "server_connections", Gauge, Count, ["state"], "Client connections to the whole PostgreSQL server, every application's, by state: active, idle, idle_in_transaction, unknown (supervisor's last reading).";
    SERVER_MAX_CONNECTIONS = "server_max_connections", Gauge, Count, [], "Client connections the server admits to ordinary roles: max_connections minus the reserved slots.";
    TASKS_FINISHED_TOTAL = "tasks_finished_total", Counter, Count, ["agent", "outcome"], "Task attempts finished, by agent and outcome: succeeded, failed (final: no attempt left or a fatal error), retried (failed, will run again after backoff), timed_out, cancelled, snoozed (the agent asked to run again later; the attempt is not counted), over_limit (killed for passing its agent's memory_max, processes_max or cpu_time_max; final).";
    AGENT_RESIDENT_MEMORY_BYTES = "agent_resident_memory_bytes", Gauge, Bytes, ["agent"], "Resident memory of the process trees of the agent's tasks running here (sum over tasks; supervisor's last sample).";
    AGENT_PROCESSES = "agent_processes", Gauge, Count, ["agent"], "Processes in the trees of the agent's tasks running here (the shim not counted).";
    AGENT_CPU_SECONDS_TOTAL = "agent_cpu_seconds_total", FloatCounter, Seconds, ["agent"], "CPU time used by the process trees of the agent's tasks here (grows by each sample's increase).";
    AGENT_DB_SESSIONS = "agent_db_sessions", Gauge, Count, ["agent"], "The agent's own PostgreSQL sessions (application_name <schema>/task/<id>) of its tasks running here.";
    AGENT_DB_SESSIONS_MAX = "agent_db_sessions_max", Gauge, Count, ["agent"], "The agent's db_sessions_max (its session budget; absent when it has none).";
    AGENT_LIMITS_HIT_TOTAL = "agent_limits_hit_total", Counter, Count, ["agent", "limit"], "Tasks killed for passing a limit of their agent (memory_max, processes_max, cpu_time_max, session_max_age), and agent sessions terminated (idle_in_transaction, task_ended).";
    QUEUE_DEPTH = "queue_depth", Gauge, Count, ["agent"], "Queued tasks per agent, due or not (supervisor's last reading).";
    QUEUE_OLDEST_SECONDS = "queue_oldest_seconds", Gauge, Seconds, ["agent"], "How long the agent's oldest due queued task has waited since it became due (queue latency; 0 when none; steps waiting for dependencies not counted).";
    AGENT_PAUSED = "agent_paused", Gauge, Count, ["agent"], "1 while the agent's queue is paused cluster-wide (its queued tasks are not claimed), else 0.";
    TASKS_DELETED_TOTAL = "tasks_deleted_total", Counter, Count, ["status"], "Finished tasks deleted by retention (with their events), by final status.";
    SCHEDULE_RUNS_TOTAL = "schedule_runs_total", Counter, Count, ["schedule"], "Runs of a periodic task this instance queued (each due time is queued by one instance: sum over instances).";
    SCHEDULE_SKIPPED_TOTAL = "schedule_skipped_total", Counter, Count, ["schedule"], "Due times of a periodic task not run because they were missed (downtime): only the latest missed one runs.";
    CLAIMS_THROTTLED_TOTAL = "claims_throttled_total", Counter, Count, ["agent"], "Claims of an agent cut short by its cluster-wide rate limit (its schedule allowed fewer starts than asked for).";
    TASK_DURATION_SECONDS = "task_duration_seconds", Histogram, Seconds, ["agent"], "Run time of finished task attempts.";
    TASK_QUEUE_WAIT_SECONDS = "task_queue_wait_seconds", Histogram, Seconds, [], "Time from runnable to started.";
    TASKS_TIMED_OUT_TOTAL = "tasks_timed_out_total", Counter, Count, [], "Tasks that ended timed_out: past their agent's timeout or supervisor.max_task_duration.";
    TASK_RUNNING_OLDEST_SECONDS = "task_running_oldest_seconds", Gauge, Seconds, [], "Run time so far of the oldest running task (0 when none).";
    OUTCOMES_REFUSED_TOTAL = "outcomes_refused_total", Counter, Count, ["result"], "Outcomes the database refused for what their row held (a batch is split until the row is found): failed (the task was failed instead, naming the refusal) or lost (even that was refused; the task is left to lease expiry).";
    OUTCOME_WRITE_LAG_SECONDS = "outcome_write_lag_seconds", Gauge, Seconds, [], "How long the oldest finished run here has waited for its outcome to be written (0 when none waits); past supervisor.outcome_stall_after the instance is not ready and outcomes_stalled fires.";
    LLM_TOKENS_TOTAL = "llm_tokens_total", Counter, Count, ["agent", "kind"], "LLM tokens reported by agents, kind = prompt or completion.";
    LLM_COST_USD_TOTAL = "llm_cost_usd_total", FloatCounter, Count, ["agent"], "LLM cost reported by agents to this instance since it started, in US dollars.";
    ALERTS_FIRING = "alerts_firing", Gauge, Count, ["alert"], "1 while the alert is firing, else 0.";
    ALERTS_TOTAL = "alerts_total", Counter, Count, ["alert"], "Times the alert fired.";
    HTTP_CONNECTIONS = "http_connections", Gauge, Count, [], "HTTP connections open (bounded by http.max_connections).";
    HTTP_STREAMS = "http_streams", Gauge, Count, [], "Event streams open (task, slot and status streams; bounded by http.max_streams).";
    HTTP_REFUSED_TOTAL = "http_refused_total", Counter, Count, ["reason"], "HTTP connections or requests refused with 503 at a bound, by reason: connections (http.max_connections open), streams (http.max_streams open).";
    HTTP_HEADER_TIMEOUTS_TOTAL = "http_header_timeouts_total", Counter, Count, [], "HTTP connections closed for not finishing a request header within http.header_read_timeout of opening or of their last response (half-sent requests and idle keep-alives).";
    HTTP_WRITE_STALLS_TOTAL = "http_write_stalls_total", Counter, Count, [], "HTTP connections closed because a response made no write progress for http.write_timeout (the client stopped reading).";
    SUPERVISOR_TICK_SECONDS = "supervisor_tick_seconds", Histogram, Seconds, [], "Duration of one supervisor tick.";
    SUPERVISOR_LAST_TICK_TIMESTAMP_SECONDS = "supervisor_last_tick_timestamp_seconds", Gauge, Seconds, [], "Unix time the last supervisor tick finished.";
    SUPERVISOR_TICKS_TOTAL = "supervisor_ticks_total", Counter, Count, ["result"], "Supervisor ticks, result = ok or error.";
    SUPERVISOR_LOCK_TIMEOUTS_TOTAL = "supervisor_lock_timeouts_total", Counter, Count, ["check"], "Supervisor statements on taskwarden's tables refused by its lock_timeout (another session held a conflicting lock), by check: time_out (tasks past max_task_duration), task_view (task counts, queues, instances), agent_sessions (whether an agent session's task still runs).";
    SUPERVISOR_WATCH_ERRORS_TOTAL = "supervisor_watch_errors_total", Counter, Count, [], "Supervisor passes whose watch of the applications' sessions the server refused (logged once per message; the other checks go on).";
    SUPERVISOR_TASK_FIGURES_STALE = "supervisor_task_figures_stale", Gauge, Count, [], "1 while the task and queue figures are from an earlier supervisor pass (the last read was refused by lock_timeout), else 0.";
    LOOP_LATENESS_SECONDS = "loop_lateness_seconds", Gauge, Seconds, ["loop"], "How late the periodic loop's last pass started against its schedule (supervisor, lease_keeper, leader, scheduler).";
    LOOP_RUN_SECONDS = "loop_run_seconds", Histogram, Seconds, ["loop"], "Duration of one pass of a periodic loop.";
    LOOP_OVERRUNS_TOTAL = "loop_overruns_total", Counter, Count, ["loop"], "Passes of a periodic loop that took longer than its period.";
    LOOP_DEADLINE_MISSES_TOTAL = "loop_deadline_misses_total", Counter, Count, ["loop"], "Passes of a periodic loop dropped for missing their deadline.";
    PROCESS_MEMORY_LIMIT_BYTES = "process_memory_limit_bytes", Gauge, Bytes, [], "Memory the alert ratio is measured against (cgroup limit or machine total).";
    EMERGENCY_CLEANUPS_TOTAL = "emergency_cleanups_total", Counter, Count, [], "Emergency cleanups run on memory pressure.";
    LEADER = "leader", Gauge, Count, [], "1 while this instance holds cluster leadership (re-queueing expired leases, reaping dead instances), else 0.";
    EMBEDDED_POSTGRES_RESTARTS_TOTAL = "embedded_postgres_restarts_total", Counter, Count, [], "Times the embedded PostgreSQL exited unexpectedly and was started again.";
    CONFIG_RELOADS_TOTAL = "config_reloads_total", Counter, Count, ["result"], "SIGHUP reloads, result = ok or error.";
    CONFIG_LAST_RELOAD_SUCCESSFUL = "config_last_reload_successful", Gauge, Count, [], "1 when the last SIGHUP reload was applied (or none happened since start), 0 when it was refused.";
    ALERT_WEBHOOK_FAILURES_TOTAL = "alert_webhook_failures_total", Counter, Count, [], "Alert webhook deliveries given up after retries, or dropped because the queue was full.";
    BUILD_INFO = "build_info", Gauge, Count, ["version"], "Always 1; the version label says which build runs.";
}

/// The standard process metrics (the names every Prometheus client library exports, so
/// stock dashboards and rules work), read from `/proc/self` at each scrape.
pub const PROCESS_RESIDENT_MEMORY_BYTES: &str = "process_resident_memory_bytes";
pub const PROCESS_VIRTUAL_MEMORY_BYTES: &str = "process_virtual_memory_bytes";
pub const PROCESS_CPU_SECONDS_TOTAL: &str = "process_cpu_seconds_total";
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
pub const PROCESS_START_TIME_SECONDS: &str = "process_start_time_seconds";

/// The process metrics: name, Prometheus type, help.
pub const PROCESS_DEFS: &[(&str, &str, &str)] = &[
    (
        PROCESS_CPU_SECONDS_TOTAL,
        "counter",
        "Total user and system CPU time spent in seconds.",
    ),
    (
        PROCESS_OPEN_FDS,
        "gauge",
        "Number of open file descriptors.",
    ),
    (
        PROCESS_MAX_FDS,
        "gauge",
        "Maximum number of open file descriptors.",
    ),
    (
        PROCESS_VIRTUAL_MEMORY_BYTES,
        "gauge",
        "Virtual memory size in bytes.",
    ),
    (
        PROCESS_RESIDENT_MEMORY_BYTES,
        "gauge",
        "Resident memory size in bytes.",
    ),
    (
        PROCESS_START_TIME_SECONDS,
        "gauge",
        "Start time of the process since unix epoch in seconds.",
    ),
];

/// Bucket bounds per histogram family, fitted to what each measures: one list for all
/// would put every microsecond checkout in its first bucket and every hour-long task in
/// `+Inf`. Every [`Kind::Histogram`] of [`DEFS`] has its row (a unit test checks).
pub const HISTOGRAM_BUCKETS: &[(&str, &[f64])] = &[
    // A checkout from a warm pool takes microseconds; a starved one waits up to
    // checkout_timeout + connect_timeout (5 s + 10 s by default).
    (
        DB_CHECKOUT_WAIT_SECONDS,
        &[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0, 15.0,
        ],
    ),
    // Agent runs: from a shell one-liner (milliseconds) to a long model session, bounded
    // by the agent's timeout and supervisor.max_task_duration (hours at most).
    (
        TASK_DURATION_SECONDS,
        &[
            0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0,
            14400.0,
        ],
    ),
    // Queue latency: milliseconds on an idle daemon, up to hours behind a backlog or a
    // rate limit.
    (
        TASK_QUEUE_WAIT_SECONDS,
        &[
            0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
            14400.0,
        ],
    ),
    // One pass of the watchdog or a periodic loop: a few round trips (sub-millisecond
    // to milliseconds); seconds only near its deadline (query_timeout, 15 s by default).
    (SUPERVISOR_TICK_SECONDS, LOOP_BUCKETS),
    (LOOP_RUN_SECONDS, LOOP_BUCKETS),
];

const LOOP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0,
    30.0, 60.0,
];

// The exporter refuses an empty bucket list: make one a compile error, not a silent
// fallback at start-up.
const _: () = {
    let mut i = 0;
    while i < HISTOGRAM_BUCKETS.len() {
        assert!(!HISTOGRAM_BUCKETS[i].1.is_empty());
        i += 1;
    }
};

/// Series of [`Kind::FloatCounter`] metrics: (name, labels) to value.
type FloatSeries = BTreeMap<(&'static str, Vec<(&'static str, String)>), f64>;

/// The `agent` label of a series about an agent no loaded config knows (names queued by
/// SQL, agents removed by a reload): they share this one series, so input cannot add
/// series. Parentheses are refused in agent names (config validation), so no configured
/// agent can collide with it.
pub const UNKNOWN_AGENT: &str = "(unknown)";

/// The `agent` label for `name`: itself when configured, else [`UNKNOWN_AGENT`].
pub fn agent_label(known: bool, name: &str) -> &str {
    if known { name } else { UNKNOWN_AGENT }
}

/// A gauge whose series the registry can drop (see [`removable`]).
#[derive(Debug, Default)]
struct RemovableGauge(AtomicU64);

impl metrics::GaugeFn for RemovableGauge {
    fn increment(&self, by: f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((f64::from_bits(b) + by).to_bits())
            });
    }
    fn decrement(&self, by: f64) {
        self.increment(-by);
    }
    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
}

/// One per-agent gauge series read for rendering: name, labels, value.
type GaugeSample = (&'static str, Vec<(&'static str, String)>, f64);

type GaugeSeries = BTreeMap<(&'static str, Vec<(&'static str, String)>), Arc<RemovableGauge>>;

/// Per-agent and per-rule gauges: their label values come and go with agents and watch
/// rules, and the exporter's recorder cannot forget a series, so [`Metrics`] keeps these
/// itself and can drop them ([`Metrics::retain_gauges`]).
fn removable(name: &str) -> bool {
    DEFS.iter().any(|d| {
        d.name == name
            && d.kind == Kind::Gauge
            && (d.labels.contains(&"agent") || d.labels.contains(&"watch"))
    })
}

/// A metrics registry. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    floats: Arc<Mutex<FloatSeries>>,
    gauges: Arc<Mutex<GaugeSeries>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

const META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

impl Metrics {
    pub fn new() -> Metrics {
        // Only an empty bucket list is refused, and none of ours is (checked when
        // compiling, below the table).
        let builder = HISTOGRAM_BUCKETS
            .iter()
            .try_fold(PrometheusBuilder::new(), |b, (name, buckets)| {
                b.set_buckets_for_metric(Matcher::Full((*name).to_string()), buckets)
            })
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        for d in DEFS {
            let name = KeyName::from_const_str(d.name);
            let help = SharedString::const_str(d.help);
            match d.kind {
                Kind::Counter => recorder.describe_counter(name, Some(d.unit), help),
                // Rendered by `render` with its help.
                Kind::Gauge if removable(d.name) => {}
                Kind::Gauge => recorder.describe_gauge(name, Some(d.unit), help),
                Kind::Histogram => recorder.describe_histogram(name, Some(d.unit), help),
                // Rendered by `render` with its help.
                Kind::FloatCounter => {}
            }
        }
        let m = Metrics {
            recorder: Arc::new(recorder),
            handle,
            floats: Arc::default(),
            gauges: Arc::default(),
        };
        m.gauge(CONFIG_LAST_RELOAD_SUCCESSFUL, &[]).set(1.0);
        m.gauge(BUILD_INFO, &[("version", env!("CARGO_PKG_VERSION"))])
            .set(1.0);
        // Series that should exist from the start, at zero, so rates and alerts work
        // before the first event.
        for name in [
            DB_CHECKOUT_TIMEOUTS_TOTAL,
            DB_SESSIONS_OPENED_TOTAL,
            DB_SESSIONS_LONG_LIVED_TOTAL,
            DB_SESSIONS_FORCE_CLOSED_TOTAL,
            DB_BACKENDS_TERMINATED_TOTAL,
            TASKS_TIMED_OUT_TOTAL,
            EMERGENCY_CLEANUPS_TOTAL,
            ALERT_WEBHOOK_FAILURES_TOTAL,
            SUPERVISOR_WATCH_ERRORS_TOTAL,
        ] {
            m.counter(name, &[]).absolute(0);
        }
        for result in ["failed", "lost"] {
            m.counter(OUTCOMES_REFUSED_TOTAL, &[("result", result)])
                .absolute(0);
        }
        m.gauge(OUTCOME_WRITE_LAG_SECONDS, &[]).set(0.0);
        for name in ["supervisor", "lease_keeper", "leader"] {
            m.counter(LOOP_OVERRUNS_TOTAL, &[("loop", name)])
                .absolute(0);
            m.counter(LOOP_DEADLINE_MISSES_TOTAL, &[("loop", name)])
                .absolute(0);
        }
        for status in crate::task_state::TaskStatus::FINAL.map(|s| s.as_str()) {
            m.counter(TASKS_DELETED_TOTAL, &[("status", status)])
                .absolute(0);
        }
        for reason in ["connections", "streams"] {
            m.counter(HTTP_REFUSED_TOTAL, &[("reason", reason)])
                .absolute(0);
        }
        m.counter(HTTP_HEADER_TIMEOUTS_TOTAL, &[]).absolute(0);
        m.counter(HTTP_WRITE_STALLS_TOTAL, &[]).absolute(0);
        m.gauge(HTTP_STREAMS, &[]).set(0.0);
        for check in ["time_out", "task_view", "agent_sessions"] {
            m.counter(SUPERVISOR_LOCK_TIMEOUTS_TOTAL, &[("check", check)])
                .absolute(0);
        }
        m.gauge(SUPERVISOR_TASK_FIGURES_STALE, &[]).set(0.0);
        for result in ["ok", "error"] {
            m.counter(CONFIG_RELOADS_TOTAL, &[("result", result)])
                .absolute(0);
            m.counter(SUPERVISOR_TICKS_TOTAL, &[("result", result)])
                .absolute(0);
        }
        m
    }

    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.to_string()))
            .collect();
        Key::from_parts(name, labels)
    }

    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder
            .register_counter(&Self::key(name, labels), &META)
    }

    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        if removable(name) {
            let key = (
                name,
                labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            );
            let mut gauges = self.gauges.lock().unwrap_or_else(PoisonError::into_inner);
            return Gauge::from_arc(Arc::clone(gauges.entry(key).or_default()));
        }
        self.recorder
            .register_gauge(&Self::key(name, labels), &META)
    }

    /// Drops the series of the per-agent gauge `name` whose `label` value `keep` refuses
    /// (an agent that is gone). A handle still held on a dropped series writes to nothing
    /// visible; the next [`Metrics::gauge`] call creates the series again.
    pub fn retain_gauges(&self, name: &'static str, label: &str, keep: impl Fn(&str) -> bool) {
        let mut gauges = self.gauges.lock().unwrap_or_else(PoisonError::into_inner);
        gauges.retain(|(n, labels), _| {
            *n != name
                || labels
                    .iter()
                    .find(|(k, _)| *k == label)
                    .is_none_or(|(_, v)| keep(v))
        });
    }

    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder
            .register_histogram(&Self::key(name, labels), &META)
    }

    /// Adds `by` (negative or NaN: ignored) to a [`Kind::FloatCounter`] series.
    pub fn add_float(&self, name: &'static str, labels: &[(&'static str, &str)], by: f64) {
        if !(by >= 0.0 && by.is_finite()) {
            return;
        }
        let key = (
            name,
            labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        );
        let mut floats = self.floats.lock().unwrap_or_else(PoisonError::into_inner);
        *floats.entry(key).or_insert(0.0) += by;
    }

    /// Folds recorded histogram samples into their buckets; the supervisor calls this every
    /// tick so sample buffers stay bounded between scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = self.handle.render();
        self.render_gauges(&mut text);
        self.render_floats(&mut text);
        render_process(&mut text);
        text
    }

    fn render_gauges(&self, out: &mut String) {
        let series: Vec<GaugeSample> = self
            .gauges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|((n, l), g)| (*n, l.clone(), f64::from_bits(g.0.load(Ordering::Relaxed))))
            .collect();
        for d in DEFS.iter().filter(|d| removable(d.name)) {
            let mine: Vec<_> = series.iter().filter(|(n, _, _)| *n == d.name).collect();
            if mine.is_empty() {
                continue;
            }
            let _ = writeln!(out, "# HELP {} {}", d.name, d.help);
            let _ = writeln!(out, "# TYPE {} gauge", d.name);
            for (name, labels, v) in mine {
                write_series(out, name, labels, *v);
            }
            out.push('\n');
        }
    }

    fn render_floats(&self, out: &mut String) {
        let floats = self
            .floats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for d in DEFS.iter().filter(|d| d.kind == Kind::FloatCounter) {
            let series: Vec<_> = floats.iter().filter(|((n, _), _)| *n == d.name).collect();
            if series.is_empty() {
                continue;
            }
            let _ = writeln!(out, "# HELP {} {}", d.name, d.help);
            let _ = writeln!(out, "# TYPE {} counter", d.name);
            for ((name, labels), v) in series {
                write_series(out, name, labels, *v);
            }
            out.push('\n');
        }
    }

    /// The value of one series in the rendered output (for tests and `status`): the sum of
    /// all lines of `name` whose labels include every pair in `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        parse_value(&self.render(), name, labels)
    }
}

/// One sample line of the text format.
fn write_series(out: &mut String, name: &str, labels: &[(&'static str, String)], v: f64) {
    let labels: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
        .collect();
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {v}");
    } else {
        let _ = writeln!(out, "{name}{{{}}} {v}", labels.join(","));
    }
}

/// A label value escaped for the text format.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Appends the process families to an exposition.
fn render_process(out: &mut String) {
    let f = crate::process::ProcessFigures::read();
    for (name, kind, help) in PROCESS_DEFS {
        let v = match *name {
            PROCESS_CPU_SECONDS_TOTAL => f.cpu_seconds,
            PROCESS_OPEN_FDS => f.open_fds,
            PROCESS_MAX_FDS => f.max_fds,
            PROCESS_VIRTUAL_MEMORY_BYTES => f.virtual_memory_bytes,
            PROCESS_RESIDENT_MEMORY_BYTES => f.resident_memory_bytes,
            PROCESS_START_TIME_SECONDS => f.start_time_seconds,
            _ => None,
        };
        if let Some(v) = v {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            );
        }
    }
}

/// Finds a series in Prometheus text output; `None` if no line matches.
pub fn parse_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found: Option<f64> = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_part, value) = if let Some(r) = rest.strip_prefix('{') {
            let Some(end) = r.find('}') else { continue };
            (&r[..end], r[end + 1..].trim())
        } else if rest.starts_with(' ') {
            ("", rest.trim())
        } else {
            continue;
        };
        if labels
            .iter()
            .all(|(k, v)| label_part.split(',').any(|p| p == format!("{k}=\"{v}\"")))
            && let Ok(v) = value.parse::<f64>()
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_prefixed_and_described() {
        let mut names: Vec<&str> = DEFS.iter().map(|d| d.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DEFS.len());
        for d in DEFS {
            assert!(d.name.starts_with("taskwarden_"));
            assert!(!d.help.is_empty());
            if matches!(d.kind, Kind::Counter | Kind::FloatCounter) {
                assert!(d.name.ends_with("_total"), "{}", d.name);
            }
        }
    }

    #[test]
    fn every_histogram_has_buckets_fitted_to_its_family() {
        for d in DEFS.iter().filter(|d| d.kind == Kind::Histogram) {
            let buckets = HISTOGRAM_BUCKETS
                .iter()
                .find(|(n, _)| *n == d.name)
                .map(|(_, b)| *b)
                .unwrap_or_else(|| panic!("{} has no row in HISTOGRAM_BUCKETS", d.name));
            assert!(buckets.len() >= 10, "{}: {buckets:?}", d.name);
            assert!(
                buckets.windows(2).all(|w| w[0] < w[1]),
                "{}: not ascending: {buckets:?}",
                d.name
            );
        }
        for (name, _) in HISTOGRAM_BUCKETS {
            assert!(
                DEFS.iter()
                    .any(|d| d.name == *name && d.kind == Kind::Histogram),
                "{name} is no histogram of DEFS"
            );
        }
        // What is exported: a 150 µs checkout lands in the 250 µs bucket, not the first
        // millisecond; a two-hour task below the 4-hour bound, not in +Inf.
        let m = Metrics::new();
        m.histogram(DB_CHECKOUT_WAIT_SECONDS, &[]).record(0.00015);
        m.histogram(TASK_DURATION_SECONDS, &[("agent", "a")])
            .record(7000.0);
        m.histogram(SUPERVISOR_TICK_SECONDS, &[]).record(0.0007);
        let text = m.render();
        let line = |series: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        };
        assert_eq!(
            line("taskwarden_db_checkout_wait_seconds_bucket{le=\"0.0001\"}"),
            0.0
        );
        assert_eq!(
            line("taskwarden_db_checkout_wait_seconds_bucket{le=\"0.00025\"}"),
            1.0
        );
        assert_eq!(
            line("taskwarden_task_duration_seconds_bucket{agent=\"a\",le=\"3600\"}"),
            0.0
        );
        assert_eq!(
            line("taskwarden_task_duration_seconds_bucket{agent=\"a\",le=\"7200\"}"),
            1.0
        );
        assert_eq!(
            line("taskwarden_supervisor_tick_seconds_bucket{le=\"0.001\"}"),
            1.0
        );
        assert!(
            !text.contains("taskwarden_task_duration_seconds_bucket{agent=\"a\",le=\"0.0001\"}"),
            "{text}"
        );
    }

    #[test]
    fn recorded_values_render_with_help() {
        let m = Metrics::new();
        m.gauge(DB_POOL_IN_USE, &[]).set(3.0);
        m.counter(ALERTS_TOTAL, &[("alert", "pool_utilization_high")])
            .increment(2);
        m.histogram(SUPERVISOR_TICK_SECONDS, &[]).record(0.02);
        let text = m.render();
        assert!(text.contains("# HELP taskwarden_db_pool_in_use"), "{text}");
        assert_eq!(m.value(DB_POOL_IN_USE, &[]), Some(3.0));
        assert_eq!(
            m.value(ALERTS_TOTAL, &[("alert", "pool_utilization_high")]),
            Some(2.0)
        );
        assert_eq!(m.value(ALERTS_TOTAL, &[("alert", "other")]), None);
        assert_eq!(
            m.value("taskwarden_supervisor_tick_seconds_count", &[]),
            Some(1.0)
        );
        assert_eq!(m.value(BUILD_INFO, &[]), Some(1.0));
        m.add_float(LLM_COST_USD_TOTAL, &[("agent", "a")], 0.25);
        m.add_float(LLM_COST_USD_TOTAL, &[("agent", "a")], 0.5);
        m.add_float(LLM_COST_USD_TOTAL, &[("agent", "a")], -1.0);
        let text = m.render();
        assert!(
            text.contains("# TYPE taskwarden_llm_cost_usd_total counter"),
            "{text}"
        );
        assert_eq!(m.value(LLM_COST_USD_TOTAL, &[("agent", "a")]), Some(0.75));
        assert!(
            m.value(PROCESS_RESIDENT_MEMORY_BYTES, &[])
                .is_some_and(|v| v > 0.0)
        );
        assert!(m.value(PROCESS_CPU_SECONDS_TOTAL, &[]).is_some());
        // Per-agent gauges can be dropped, and come back when written again.
        m.gauge(QUEUE_DEPTH, &[("agent", "a")]).set(4.0);
        m.gauge(QUEUE_DEPTH, &[("agent", "b")]).set(5.0);
        m.gauge(QUEUE_DEPTH, &[("agent", "b")]).increment(1.0);
        let text = m.render();
        assert_eq!(
            text.matches("# TYPE taskwarden_queue_depth gauge").count(),
            1,
            "{text}"
        );
        assert_eq!(m.value(QUEUE_DEPTH, &[("agent", "b")]), Some(6.0));
        m.retain_gauges(QUEUE_DEPTH, "agent", |a| a == "a");
        assert_eq!(m.value(QUEUE_DEPTH, &[("agent", "b")]), None);
        assert_eq!(m.value(QUEUE_DEPTH, &[("agent", "a")]), Some(4.0));
        m.retain_gauges(QUEUE_DEPTH, "agent", |_| false);
        assert!(!m.render().contains("taskwarden_queue_depth"));
        m.gauge(QUEUE_DEPTH, &[("agent", "a")]).set(1.0);
        assert_eq!(m.value(QUEUE_DEPTH, &[("agent", "a")]), Some(1.0));
        assert_eq!(agent_label(false, "x"), UNKNOWN_AGENT);
        assert_eq!(agent_label(true, "x"), "x");
        // A second registry is independent.
        assert_eq!(Metrics::new().value(DB_POOL_IN_USE, &[]), None);
    }
}
