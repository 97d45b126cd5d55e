//! Every metric the daemon exports: its name, kind, unit and help, in one table
//! ([`DEFS`]), and the registry they are recorded into.
//!
//! The registry is an instance, not the process-global `metrics` recorder: a daemon owns
//! one, and so does each test, so figures never leak between them. `/metrics` renders it.

use std::sync::Arc;

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
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
    DB_SESSIONS_OPENED_TOTAL = "db_sessions_opened_total", Counter, Count, [], "DB session guards handed out.";
    DB_SESSION_OLDEST_AGE_SECONDS = "db_session_oldest_age_seconds", Gauge, Seconds, [], "Age of the oldest live DB session guard (0 when none).";
    DB_SESSIONS_LONG_LIVED_TOTAL = "db_sessions_long_lived_total", Counter, Count, [], "DB sessions that outlived session_warn_age (counted once each).";
    DB_SESSIONS_FORCE_CLOSED_TOTAL = "db_sessions_force_closed_total", Counter, Count, [], "DB sessions force-closed after session_max_age.";
    DB_BACKENDS_TERMINATED_TOTAL = "db_backends_terminated_total", Counter, Count, [], "PostgreSQL backends terminated by the supervisor (force-closes and orphans).";
    TASKS = "tasks", Gauge, Count, ["status"], "Tasks in the database by status.";
    TASKS_FINISHED_TOTAL = "tasks_finished_total", Counter, Count, ["agent", "outcome"], "Task attempts finished, by agent and outcome: succeeded, failed (final: no attempt left or a fatal error), retried (failed, will run again after backoff), timed_out, cancelled, snoozed (the agent asked to run again later; the attempt is not counted).";
    QUEUE_DEPTH = "queue_depth", Gauge, Count, ["agent"], "Queued tasks per agent, due or not (supervisor's last reading).";
    QUEUE_OLDEST_SECONDS = "queue_oldest_seconds", Gauge, Seconds, ["agent"], "How long the agent's oldest due queued task has waited since it became due (queue latency; 0 when none; steps waiting for dependencies not counted).";
    AGENT_PAUSED = "agent_paused", Gauge, Count, ["agent"], "1 while the agent's queue is paused cluster-wide (its queued tasks are not claimed), else 0.";
    TASKS_DELETED_TOTAL = "tasks_deleted_total", Counter, Count, ["status"], "Finished tasks deleted by retention (with their events), by final status.";
    SCHEDULE_RUNS_TOTAL = "schedule_runs_total", Counter, Count, ["schedule"], "Runs of a periodic task this instance queued (each due time is queued by one instance: sum over instances).";
    SCHEDULE_SKIPPED_TOTAL = "schedule_skipped_total", Counter, Count, ["schedule"], "Due times of a periodic task not run because they were missed (downtime): only the latest missed one runs.";
    CLAIMS_THROTTLED_TOTAL = "claims_throttled_total", Counter, Count, ["agent"], "Claims of an agent cut short by its cluster-wide rate limit (the window had fewer starts left than asked for).";
    TASK_DURATION_SECONDS = "task_duration_seconds", Histogram, Seconds, ["agent"], "Run time of finished task attempts.";
    TASK_QUEUE_WAIT_SECONDS = "task_queue_wait_seconds", Histogram, Seconds, [], "Time from runnable to started.";
    TASKS_TIMED_OUT_TOTAL = "tasks_timed_out_total", Counter, Count, [], "Running tasks stopped for exceeding max_task_duration.";
    TASK_RUNNING_OLDEST_SECONDS = "task_running_oldest_seconds", Gauge, Seconds, [], "Run time so far of the oldest running task (0 when none).";
    LLM_TOKENS_TOTAL = "llm_tokens_total", Counter, Count, ["agent", "kind"], "LLM tokens reported by agents, kind = prompt or completion.";
    LLM_COST_USD_TOTAL = "llm_cost_usd_total", Gauge, Count, ["agent"], "LLM cost reported by agents since start, in US dollars (only increases; a float, hence a gauge).";
    ALERTS_FIRING = "alerts_firing", Gauge, Count, ["alert"], "1 while the alert is firing, else 0.";
    ALERTS_TOTAL = "alerts_total", Counter, Count, ["alert"], "Times the alert fired.";
    SUPERVISOR_TICK_SECONDS = "supervisor_tick_seconds", Histogram, Seconds, [], "Duration of one supervisor tick.";
    SUPERVISOR_LAST_TICK_TIMESTAMP_SECONDS = "supervisor_last_tick_timestamp_seconds", Gauge, Seconds, [], "Unix time the last supervisor tick finished.";
    SUPERVISOR_TICKS_TOTAL = "supervisor_ticks_total", Counter, Count, ["result"], "Supervisor ticks, result = ok or error.";
    LOOP_LATENESS_SECONDS = "loop_lateness_seconds", Gauge, Seconds, ["loop"], "How late the periodic loop's last pass started against its schedule (supervisor, lease_keeper, leader).";
    LOOP_RUN_SECONDS = "loop_run_seconds", Histogram, Seconds, ["loop"], "Duration of one pass of a periodic loop.";
    LOOP_OVERRUNS_TOTAL = "loop_overruns_total", Counter, Count, ["loop"], "Passes of a periodic loop that took longer than its period.";
    LOOP_DEADLINE_MISSES_TOTAL = "loop_deadline_misses_total", Counter, Count, ["loop"], "Passes of a periodic loop dropped for missing their deadline.";
    PROCESS_RESIDENT_MEMORY_BYTES = "process_resident_memory_bytes", Gauge, Bytes, [], "Resident memory of the daemon process.";
    PROCESS_MEMORY_LIMIT_BYTES = "process_memory_limit_bytes", Gauge, Bytes, [], "Memory the alert ratio is measured against (cgroup limit or machine total).";
    PROCESS_CPU_RATIO = "process_cpu_ratio", Gauge, Percent, [], "CPU used by the daemon over the last tick, in cores (1.0 = one core).";
    EMERGENCY_CLEANUPS_TOTAL = "emergency_cleanups_total", Counter, Count, [], "Emergency cleanups run on memory pressure.";
    LEADER = "leader", Gauge, Count, [], "1 while this instance holds cluster leadership (re-queueing expired leases, reaping dead instances), else 0.";
    EMBEDDED_POSTGRES_RESTARTS_TOTAL = "embedded_postgres_restarts_total", Counter, Count, [], "Times the embedded PostgreSQL exited unexpectedly and was started again.";
    CONFIG_RELOADS_TOTAL = "config_reloads_total", Counter, Count, ["result"], "SIGHUP reloads, result = ok or error.";
    ALERT_WEBHOOK_FAILURES_TOTAL = "alert_webhook_failures_total", Counter, Count, [], "Alert webhook deliveries given up after retries, or dropped because the queue was full.";
    BUILD_INFO = "build_info", Gauge, Count, ["version"], "Always 1; the version label says which build runs.";
}

/// Bucket bounds for second-valued histograms: 1 ms to 30 min.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 1800.0,
];

/// A metrics registry. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
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
        // Only an empty bucket list is refused, and ours is not empty.
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        for d in DEFS {
            let name = KeyName::from_const_str(d.name);
            let help = SharedString::const_str(d.help);
            match d.kind {
                Kind::Counter => recorder.describe_counter(name, Some(d.unit), help),
                Kind::Gauge => recorder.describe_gauge(name, Some(d.unit), help),
                Kind::Histogram => recorder.describe_histogram(name, Some(d.unit), help),
            }
        }
        let m = Metrics {
            recorder: Arc::new(recorder),
            handle,
        };
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
        ] {
            m.counter(name, &[]).absolute(0);
        }
        // The state alerts, at 0 until they fire, so dashboards and rules see them.
        for alert in [
            crate::alerts::POOL_UTILIZATION_HIGH,
            crate::alerts::MEMORY_HIGH,
        ] {
            m.gauge(ALERTS_FIRING, &[("alert", alert)]).set(0.0);
            m.counter(ALERTS_TOTAL, &[("alert", alert)]).absolute(0);
        }
        for name in ["supervisor", "lease_keeper", "leader"] {
            m.counter(LOOP_OVERRUNS_TOTAL, &[("loop", name)])
                .absolute(0);
            m.counter(LOOP_DEADLINE_MISSES_TOTAL, &[("loop", name)])
                .absolute(0);
        }
        for status in ["succeeded", "failed", "cancelled", "timed_out"] {
            m.counter(TASKS_DELETED_TOTAL, &[("status", status)])
                .absolute(0);
        }
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
        self.recorder
            .register_gauge(&Self::key(name, labels), &META)
    }

    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder
            .register_histogram(&Self::key(name, labels), &META)
    }

    /// Folds recorded histogram samples into their buckets; the supervisor calls this every
    /// tick so sample buffers stay bounded between scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// The value of one series in the rendered output (for tests and `status`): the sum of
    /// all lines of `name` whose labels include every pair in `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        parse_value(&self.render(), name, labels)
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
            if d.kind == Kind::Counter {
                assert!(d.name.ends_with("_total"), "{}", d.name);
            }
        }
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
        // A second registry is independent.
        assert_eq!(Metrics::new().value(DB_POOL_IN_USE, &[]), None);
    }
}
