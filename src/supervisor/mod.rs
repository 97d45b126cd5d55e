//! The watchdog. Every `supervisor.interval` it looks at the pool, the live sessions, the
//! running tasks, PostgreSQL's view of our backends, and the process's memory; it records
//! every figure as a metric, alerts (once, with hysteresis), and cleans up:
//!
//! - a session older than `session_warn_age` is logged once with its caller;
//! - one older than `session_max_age` is force-closed: backend terminated, owning task
//!   cancelled, connection discarded instead of recycled; if its holder still keeps the
//!   guard a tick later, the pool lends capacity so it comes back regardless;
//! - a task running longer than `max_task_duration` is marked `timed_out` and cancelled;
//! - a backend with our `application_name` that no guard and no idle pooled connection
//!   accounts for, and that sits idle in a transaction or unchanged past `session_max_age`,
//!   is terminated;
//! - above `memory_alert_ratio`, idle connections are closed (emergency cleanup);
//! - each running task's agent — its process tree and its own database sessions — is
//!   sampled and held to its agent's limits (`agents.rs`).
//!
//! The DB-session duties are in `sessions.rs`, the process's in `process.rs`, the
//! applications' sessions (`[watch.NAME]` rules, server-wide connection use) in
//! `watch.rs`, and what the API and systemd read of the supervisor in `liveness.rs`.
//!
//! It talks to PostgreSQL on its own admin connection, never through the pool: the pool
//! being exhausted is exactly when it must keep working. It may cancel tasks and flag
//! guards, but it never holds a pooled connection and never waits on a task it cancelled.
//! A failing tick is logged and counted; the loop itself never stops until shutdown.

mod agents;

mod encryption;

pub use encryption::Encryption;

mod outcomes;

mod process;

mod sessions;

pub use sessions::{CallerSessions, top_callers};

mod liveness;

mod watch;

pub use watch::{RoleConnections, ServerConnections, WatchRuleView, WatchView, WatchedSession};

use liveness::unix_ms;
pub use liveness::{
    Liveness, not_ready_reason, record_live_gauges, restart_would_mend, stall_bound,
};

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::alerts::{self, Alerts, Severity};
use crate::config::Config;
use crate::db::{Db, DbError, DirectClient, PoolStatus, connect_direct};
use crate::metrics::{self as m, Metrics};
use crate::orchestrator::registry::RunningTasks;
use crate::periodic::{Periodic, Ran};
use crate::store::{DbView, activity, watchdog};

/// While the database is unreachable, the supervisor ticks this often (or every
/// `supervisor.interval`, if shorter), so readiness comes back soon after the database.
pub const UNREACHABLE_RETRY: Duration = Duration::from_millis(500);

/// Bounds of the supervisor's `lock_timeout` on taskwarden's tables: a quarter of the
/// interval, so the reads of one tick cannot eat it, within these.
const LOCK_TIMEOUT_MIN: Duration = Duration::from_millis(10);
const LOCK_TIMEOUT_MAX: Duration = Duration::from_secs(1);

/// How long the supervisor's statements on taskwarden's tables wait for a lock: min(interval
/// / 4, 1 s), at least 10 ms. A session holding a lock on `tasks` must not hold the
/// watchdog back: its checks are for exactly that moment.
pub fn lock_timeout_for(interval: Duration) -> Duration {
    (interval / 4).clamp(LOCK_TIMEOUT_MIN, LOCK_TIMEOUT_MAX)
}

/// How often the wait between ticks looks whether the admin connection is gone (an
/// in-memory check, no round trip).
const ADMIN_WATCH: Duration = Duration::from_millis(100);

/// Completes once the admin connection is closed or presumed dead; never without one.
async fn admin_lost(admin: Option<&DirectClient>) {
    let Some(c) = admin else {
        return std::future::pending().await;
    };
    while !c.is_broken() {
        tokio::time::sleep(ADMIN_WATCH).await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("admin connection: {0}")]
    Db(#[from] DbError),
}

/// What one tick saw and did (returned for tests and benchmarks; also logged).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TickReport {
    pub pool: Option<PoolStatus>,
    pub sessions_open: usize,
    pub sessions_warned: usize,
    pub sessions_force_closed: usize,
    pub capacity_lent: usize,
    pub tasks_timed_out: Vec<i64>,
    pub orphans_terminated: Vec<i32>,
    pub resident_memory_bytes: u64,
    pub emergency_cleanup: bool,
}

pub struct Supervisor {
    config: Arc<ArcSwap<Config>>,
    pg: tokio_postgres::Config,
    db: Db,
    running: Arc<RunningTasks>,
    alerts: Alerts,
    metrics: Metrics,
    liveness: Arc<Liveness>,
    admin: Option<DirectClient>,
    application_name: String,
    memory: crate::process::MemoryReader,
    last_resource_log: Option<Instant>,
    /// A lock_timeout refusal was logged; cleared once the task figures are read again.
    lock_refusal_logged: bool,
    /// Each running task's tree CPU seconds at the last sample (the counter grows by the
    /// difference); pruned to running tasks every tick.
    agent_cpu: std::collections::HashMap<i64, f64>,
    /// Agent sessions already warned about (pruned to live ones every tick).
    agent_sessions_warned: std::collections::HashSet<i32>,
    /// (role, what cannot be done) pairs: sessions of roles this one may not see the state
    /// of, or may not end,
    /// already logged (each once an hour while it lasts; bounded by
    /// [`agents::PRIVILEGE_WARNED_MAX`]).
    privilege_warned: std::collections::HashSet<(String, &'static str)>,
    /// Since when `privilege_warned` holds what it holds.
    privilege_warned_since: Option<Instant>,
    /// What the watch rules already logged (see `watch.rs`).
    watch: watch::WatchMemory,
}

impl Supervisor {
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        pg: tokio_postgres::Config,
        db: Db,
        running: Arc<RunningTasks>,
        alerts: Alerts,
        metrics: Metrics,
    ) -> Supervisor {
        Supervisor {
            application_name: config.load().database.application_name.clone(),
            config,
            pg,
            db,
            running,
            alerts,
            metrics,
            liveness: Arc::new(Liveness::default()),
            admin: None,
            memory: crate::process::MemoryReader::default(),
            last_resource_log: None,
            lock_refusal_logged: false,
            agent_cpu: Default::default(),
            agent_sessions_warned: Default::default(),
            privilege_warned: Default::default(),
            privilege_warned_since: None,
            watch: Default::default(),
        }
    }

    pub fn liveness(&self) -> Arc<Liveness> {
        Arc::clone(&self.liveness)
    }

    /// Ticks every `supervisor.interval` (re-read each time, so a reload applies) until
    /// `shutdown`. Late ticks are measured; a failed tick is counted and the loop goes on.
    ///
    /// Readiness follows the database both ways without waiting for the interval: a tick
    /// comes at once when the admin connection drops (a server that stops or crashes
    /// closes it), and while the database is unreachable ticks come every
    /// [`UNREACHABLE_RETRY`], so `/readyz` is 200 again soon after the database is back
    /// (a failover to a promoted standby, a restart).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut every = Periodic::new("supervisor", self.metrics.clone(), shutdown);
        // Since the first tick that could not reach the database, while none has since.
        let mut unreachable_since: Option<Instant> = None;
        loop {
            let cfg = self.config.load_full();
            let interval = cfg.supervisor.interval.get();
            if !every
                .wait_or(interval, admin_lost(self.admin.as_ref()))
                .await
            {
                break;
            }
            // Each round trip is bounded already; the pass as a whole gets the stall bound.
            let result = match every.run(stall_bound(&cfg), self.tick()).await {
                Ran::Done(r) => r,
                Ran::Missed => Err(SupervisorError::Db(DbError::Deadline(stall_bound(&cfg)))),
                Ran::Shutdown => break,
            };
            match result {
                Ok(_) => {
                    self.metrics
                        .counter(m::SUPERVISOR_TICKS_TOTAL, &[("result", "ok")])
                        .increment(1);
                    if let Some(since) = unreachable_since.take() {
                        tracing::info!(
                            unreachable_ms = since.elapsed().as_millis() as u64,
                            "supervisor reached the database again"
                        );
                    }
                }
                Err(e) => {
                    self.metrics
                        .counter(m::SUPERVISOR_TICKS_TOTAL, &[("result", "error")])
                        .increment(1);
                    // Logged once per outage; the retries in between (every
                    // UNREACHABLE_RETRY) are counted, and /readyz names the latest error.
                    if unreachable_since.is_none() {
                        tracing::error!(error = %e, "supervisor tick failed");
                    } else {
                        tracing::debug!(error = %e, "supervisor tick failed again");
                    }
                    unreachable_since.get_or_insert_with(Instant::now);
                    every.due_within(interval.min(UNREACHABLE_RETRY));
                    // A broken admin connection is rebuilt next tick.
                    self.admin = None;
                }
            }
        }
        tracing::debug!("supervisor stopped");
    }

    async fn admin(&mut self) -> Result<&DirectClient, SupervisorError> {
        if self.admin.as_ref().is_some_and(|c| c.is_broken()) {
            self.admin = None;
        }
        if self.admin.is_none() {
            let cfg = self.config.load();
            self.admin = Some(connect_direct(&self.pg, &cfg.database, "supervisor").await?);
        }
        match self.admin.as_ref() {
            Some(c) => Ok(c),
            None => Err(SupervisorError::Db(DbError::PoolClosed)),
        }
    }

    /// One pass over everything. Public so benchmarks and tests can drive it directly.
    pub async fn tick(&mut self) -> Result<TickReport, SupervisorError> {
        let started = Instant::now();
        let cfg = self.config.load_full();
        let mut report = TickReport::default();

        self.check_pool(&cfg, &mut report);
        self.check_outcomes(&cfg);
        // Session checks need no database for the parts that matter most (cancel, discard,
        // lend), so a dead admin connection does not stop them.
        let admin_err = self.check_sessions(&cfg, &mut report).await.err();
        let db_result = async {
            self.check_tasks(&cfg, &mut report).await?;
            self.check_backends(&cfg, &mut report).await?;
            self.check_agents(&cfg).await?;
            self.check_watch(&cfg).await?;
            self.check_encryption(&cfg).await
        }
        .await;
        self.check_process(&cfg, &mut report).await;
        self.maybe_log_resources(&cfg, &report);

        self.metrics.upkeep();
        let took = started.elapsed();
        self.metrics
            .histogram(m::SUPERVISOR_TICK_SECONDS, &[])
            .record(took.as_secs_f64());
        self.metrics
            .gauge(m::SUPERVISOR_LAST_TICK_TIMESTAMP_SECONDS, &[])
            .set(unix_ms() as f64 / 1000.0);
        let db_error = admin_err
            .as_ref()
            .map(|e| e.to_string())
            .or_else(|| db_result.as_ref().err().map(|e| e.to_string()));
        self.liveness.set_database_error(db_error);
        self.liveness.ticked();
        if let Some(e) = admin_err {
            return Err(e);
        }
        db_result.map(|_| report)
    }

    fn check_pool(&mut self, cfg: &Config, report: &mut TickReport) {
        let p = record_live_gauges(&self.metrics, &self.db);
        let util = p.utilization();
        let s = &cfg.supervisor;
        if util >= s.pool_alert_ratio && !self.alerts.is_firing(alerts::POOL_UTILIZATION_HIGH) {
            let top = self.top_callers(5);
            self.alerts.fire(
                alerts::POOL_UTILIZATION_HIGH,
                Severity::Warning,
                format!(
                    "database pool {:.0}% in use ({} of {}), at or above the {:.0}% alert line",
                    util * 100.0,
                    p.in_use,
                    p.max,
                    s.pool_alert_ratio * 100.0
                ),
                json!({ "pool": p, "utilization": util, "top_callers": top }),
            );
        } else if util < s.pool_clear_ratio && self.alerts.is_firing(alerts::POOL_UTILIZATION_HIGH)
        {
            self.alerts.resolve(
                alerts::POOL_UTILIZATION_HIGH,
                format!("database pool back to {:.0}% in use", util * 100.0),
                json!({ "pool": p, "utilization": util }),
            );
        }
        report.pool = Some(p);
    }

    async fn check_tasks(
        &mut self,
        cfg: &Config,
        report: &mut TickReport,
    ) -> Result<(), SupervisorError> {
        let max = cfg.supervisor.max_task_duration.get();
        let limit_s = max.as_secs_f64();
        let message = format!("exceeded max_task_duration ({limit_s:.0}s)");
        let lock = lock_timeout_for(cfg.supervisor.interval.get());
        let timed_out = match self.within_lock_timeout(lock).await {
            Ok(tx) => {
                let r = watchdog::time_out_overdue(&tx, max, &message).await;
                tx.finish(r).await.map_err(SupervisorError::from)
            }
            Err(e) => Err(e),
        };
        let timed_out = match timed_out {
            Ok(t) => t,
            // The overdue tasks are still overdue next tick; nothing was written.
            Err(SupervisorError::Db(e)) if e.is_lock_timeout() => {
                self.lock_refused("time_out", &e, lock);
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        for t in &timed_out {
            let (id, agent, ran) = (t.id, &t.agent, t.ran_seconds);
            let here = self.running.cancel(id);
            report.tasks_timed_out.push(id);
            self.metrics
                .counter(m::TASKS_TIMED_OUT_TOTAL, &[])
                .increment(1);
            self.metrics
                .counter(
                    m::TASKS_FINISHED_TOTAL,
                    &[
                        (
                            "agent",
                            m::agent_label(cfg.agents.contains_key(agent), agent),
                        ),
                        ("outcome", "timed_out"),
                    ],
                )
                .increment(1);
            self.alerts.event(
                alerts::TASK_TIMED_OUT,
                Severity::Warning,
                format!("task {id} ({agent}) ran {ran:.0}s, past max_task_duration {limit_s:.0}s; marked timed_out"),
                json!({ "task_id": id, "agent": agent, "running_seconds": ran, "cancelled_here": here }),
            );
        }
        let known: Vec<String> = cfg.agents.keys().cloned().collect();
        let read = match self.within_lock_timeout(lock).await {
            Ok(tx) => {
                let r = DbView::read(&tx, &known).await;
                tx.finish(r).await.map_err(SupervisorError::from)
            }
            Err(e) => Err(e),
        };
        let view = match read {
            Ok(view) => view,
            // The figures keep their last value, marked stale; the rest of the tick goes on.
            Err(SupervisorError::Db(e)) if e.is_lock_timeout() => {
                self.lock_refused("task_view", &e, lock);
                self.set_task_figures_stale(true);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        self.set_task_figures_stale(false);
        for (status, n) in &view.tasks_by_status {
            self.metrics
                .gauge(m::TASKS, &[("status", status)])
                .set(*n as f64);
        }
        self.metrics
            .gauge(m::TASK_RUNNING_OLDEST_SECONDS, &[])
            .set(view.oldest_running_seconds);
        self.record_queue_gauges(cfg, &view);
        self.liveness.set_view(view);
        Ok(())
    }

    /// A transaction on the admin connection whose every lock wait ends after
    /// `lock_timeout` ([`DirectClient::transaction_with_lock_timeout`]), so the watchdog
    /// never queues behind a session that locked taskwarden's tables. The caller ends it
    /// with [`crate::db::DirectTx::finish`].
    async fn within_lock_timeout(
        &mut self,
        lock_timeout: Duration,
    ) -> Result<crate::db::DirectTx<'_>, SupervisorError> {
        let admin = self.admin().await?;
        Ok(admin.transaction_with_lock_timeout(lock_timeout).await?)
    }

    /// A statement refused by lock_timeout: counted every time, logged once per episode
    /// (until the task figures are read again).
    fn lock_refused(&mut self, check: &'static str, e: &DbError, lock_timeout: Duration) {
        self.metrics
            .counter(m::SUPERVISOR_LOCK_TIMEOUTS_TOTAL, &[("check", check)])
            .increment(1);
        if !self.lock_refusal_logged {
            self.lock_refusal_logged = true;
            tracing::warn!(
                check,
                sqlstate = "55P03",
                error = %e,
                lock_timeout_ms = lock_timeout.as_millis() as u64,
                "supervisor read refused: another session holds a lock on taskwarden's tables; \
                 task figures kept from the last pass, the other checks go on"
            );
        }
    }

    fn set_task_figures_stale(&mut self, stale: bool) {
        if !stale && self.liveness.view_stale() {
            tracing::info!("supervisor task figures read again");
        }
        if !stale {
            self.lock_refusal_logged = false;
        }
        self.liveness.set_view_stale(stale);
        self.metrics
            .gauge(m::SUPERVISOR_TASK_FIGURES_STALE, &[])
            .set(if stale { 1.0 } else { 0.0 });
    }

    /// Queue depth, latency and pause per agent: every configured agent (0 when it has
    /// no queue), and the agents no config knows summed in one series
    /// ([`m::UNKNOWN_AGENT`]) while they have a queue or a pause. Every other agent's
    /// series is dropped, so neither input nor a reload leaves series behind.
    fn record_queue_gauges(&mut self, cfg: &Config, view: &DbView) {
        let empty = crate::store::QueueView::default();
        let unknown = (view.unknown_agents_count > 0).then_some(&view.unknown_agents);
        let queues = cfg
            .agents
            .keys()
            .map(|a| (a.as_str(), view.queues.get(a).unwrap_or(&empty)))
            .chain(unknown.map(|q| (m::UNKNOWN_AGENT, q)));
        for (agent, q) in queues {
            let labels = [("agent", agent)];
            self.metrics
                .gauge(m::QUEUE_DEPTH, &labels)
                .set(q.queued as f64);
            self.metrics
                .gauge(m::QUEUE_OLDEST_SECONDS, &labels)
                .set(q.oldest_queued_seconds);
            self.metrics
                .gauge(m::AGENT_PAUSED, &labels)
                .set(if q.paused { 1.0 } else { 0.0 });
        }
        let keep =
            |a: &str| cfg.agents.contains_key(a) || (a == m::UNKNOWN_AGENT && unknown.is_some());
        for name in [m::QUEUE_DEPTH, m::QUEUE_OLDEST_SECONDS, m::AGENT_PAUSED] {
            self.metrics.retain_gauges(name, "agent", keep);
        }
    }

    /// Terminates backends with our `application_name` that look orphaned (see the
    /// module doc); one whose role this one may not signal is left alone, and said once.
    async fn check_backends(
        &mut self,
        cfg: &Config,
        report: &mut TickReport,
    ) -> Result<(), SupervisorError> {
        // Behind a pooler the server's backends belong to the pooler: an idle one still
        // named like us is not an orphan of ours, and terminating it would hit whoever the
        // pooler hands it to next. The pooler's own timeouts bound them.
        if cfg.database.pooler != crate::config::Pooler::None {
            return Ok(());
        }
        // Accounted for: backends behind live guards and idle pooled connections. Read both before
        // querying the server, so a connection created meanwhile is simply not listed yet.
        let mut ours: Vec<i32> = self.db.tracker().owned_backends();
        ours.extend(self.db.idle_backends());
        let grace_s = cfg.supervisor.interval.get().as_secs_f64();
        let max_age_s = cfg.supervisor.session_max_age.get().as_secs_f64();
        // The name our connections were opened with: application_name only changes at a
        // restart, and a reloaded value must not make foreign sessions look like ours.
        let app = self.application_name.clone();
        let admin = self.admin().await?;
        let orphans = activity::terminate_orphans(admin, &app, &ours, grace_s, max_age_s).await?;
        for o in orphans {
            let (pid, state) = (o.pid, o.state);
            let Some(terminated) = o.terminated else {
                self.privilege_missing(
                    &o.role,
                    "pg_signal_backend",
                    "cannot end sessions of this role that carry our application_name and look orphaned: they are left alone",
                );
                continue;
            };
            if terminated {
                report.orphans_terminated.push(pid);
                self.metrics
                    .counter(m::DB_BACKENDS_TERMINATED_TOTAL, &[])
                    .increment(1);
                self.alerts.event(
                    alerts::ORPHAN_BACKEND_TERMINATED,
                    Severity::Warning,
                    format!(
                        "terminated backend {pid} ({}) that no session of ours owns",
                        state.as_deref().unwrap_or("?")
                    ),
                    json!({ "backend_pid": pid, "state": state, "application_name": app }),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_timeout_is_a_quarter_interval_within_bounds() {
        assert_eq!(
            lock_timeout_for(Duration::from_secs(1)),
            Duration::from_millis(250)
        );
        assert_eq!(lock_timeout_for(Duration::from_secs(60)), LOCK_TIMEOUT_MAX);
        assert_eq!(lock_timeout_for(Duration::from_millis(1)), LOCK_TIMEOUT_MIN);
        assert_eq!(lock_timeout_for(Duration::ZERO), LOCK_TIMEOUT_MIN);
        assert_eq!(lock_timeout_for(Duration::MAX), LOCK_TIMEOUT_MAX);
    }
}
