//! The orchestrator: claims runnable tasks, runs them on their agents, records the
//! outcome, and coordinates with other instances through PostgreSQL only. One file per
//! role, each an `impl Orchestrator` block over the shared state defined here:
//!
//! - [`submit`]: tasks, objectives and cancels coming in from the API;
//! - [`slots`]: run slots (`/v1/slots/{id}/run`), replace-then-await;
//! - [`claimer`]: starts tasks in free slots from a small adaptive prefetch and claims
//!   more in one statement, woken by [`notifications`], freed capacity, or `poll_interval`;
//! - [`runner`]: one attempt — agent, time limit, cancel, outcome — and [`planner`] for a
//!   planner agent's reply; [`outcome`] decides what the outcome writes, and every
//!   outcome goes down a bounded channel to the [`outcome_writer`], which writes them in
//!   batches and then does what follows a written outcome (metrics, the log line, an
//!   objective's dependants);
//! - [`leases`]: keeps this instance's leases and `instances` row fresh;
//! - [`elector`] and [`leader`]: leadership as a row with an expiry, and the leader's duties,
//!   among them [`retention`];
//! - [`scheduler`]: queues the runs of `[schedules.NAME]` at their due times (every
//!   instance; once per due time through the schedule's row);
//! - [`queue`]: pause and resume an agent, retry finished tasks;
//! - [`registry`]: the tasks running here and their cancel tokens.
//!
//! A task runs as one future raced against its cancellation token and its time limit; on
//! cancellation the future — and every DB guard and child process it holds — is dropped at
//! once. No lock is held across an await anywhere here.

mod claimer;
pub mod elector;
mod leader;
mod leases;
mod notifications;
mod outcome;
mod outcome_writer;
mod planner;
mod queue;
pub mod registry;
mod retention;
mod runner;
mod scheduler;
mod slots;
mod submit;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agents::{AgentEntry, AgentError, AgentOutput, Agents, EventHub};
use crate::config::Config;
use crate::db::{Db, DbError};
use crate::metrics::Metrics;
use crate::orchestrator::registry::{Registration, RunningTasks};
use crate::store::{Store, StoreError, Task};

pub use retention::RetentionReport;
pub use scheduler::ScheduleState;

/// The step a planner objective starts with.
pub const PLAN_STEP: &str = "plan";

fn invalid(field: &str, message: impl Into<String>) -> OrchestratorError {
    OrchestratorError::Store(StoreError::Invalid {
        field: field.into(),
        message: message.into(),
    })
}

/// How long a slot run waits for the task it replaced to end before answering.
pub const REPLACE_WAIT: Duration = Duration::from_secs(10);

/// "known agents: a, b" (or that none is configured), for unknown-agent errors.
pub fn known_agents(known: &[String]) -> String {
    if known.is_empty() {
        "no agent is configured on this instance ([agents.NAME] in the config)".to_string()
    } else {
        format!("known agents: {}", known.join(", "))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    #[error("agent: unknown agent {agent:?}; {}", known_agents(known))]
    UnknownAgent { agent: String, known: Vec<String> },
    #[error("no run slot free: {0} slot runs already running (workers.concurrency)")]
    NoRunSlot(usize),
    #[error("shutting down: not starting new work")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// How one attempt ended.
enum Outcome {
    Succeeded(AgentOutput),
    Failed(AgentError),
    TimedOut(Duration),
    Cancelled,
    /// Ended by the supervisor: a resource limit of the agent, or one of its database
    /// sessions past `session_max_age`.
    Killed(registry::Kill),
}

struct SlotEntry {
    task_id: i64,
    cancel: CancellationToken,
    done: CancellationToken,
}

struct Inner {
    config: Arc<ArcSwap<Config>>,
    pg: tokio_postgres::Config,
    db: Db,
    store: Store,
    agents: ArcSwap<Agents>,
    extra_agents: BTreeMap<String, AgentEntry>,
    running: Arc<RunningTasks>,
    hub: EventHub,
    metrics: Metrics,
    instance_id: String,
    wake: Notify,
    /// Tasks this instance runs, by agent (claimed or slot runs).
    per_agent: Mutex<HashMap<String, usize>>,
    total: AtomicUsize,
    /// Bounds the runs started in run slots, which do not wait for free capacity as claims do.
    slot_runs: Arc<Semaphore>,
    slot_run_limit: usize,
    slots: Mutex<HashMap<String, SlotEntry>>,
    /// Tasks claimed ahead per agent, not started yet (see `claimer`).
    prefetched: Mutex<HashMap<String, VecDeque<claimer::Prefetched>>>,
    /// When recent runs ended (at most `workers.prefetch` kept): the prefetch's measure.
    finishes: Mutex<VecDeque<Instant>>,
    /// The agents paused cluster-wide, as the claimer last read them.
    paused: Mutex<queue::PausedCache>,
    /// Outcomes on their way to the outcome writer (bounded: a runner waits when full).
    outcomes: mpsc::Sender<PendingOutcome>,
    outcomes_rx: Mutex<Option<mpsc::Receiver<PendingOutcome>>>,
    shutdown: CancellationToken,
    /// Cancelled first at shutdown: no new claims or slot runs, running ones finish.
    claiming: CancellationToken,
    tasks: TaskTracker,
    /// Since when this instance's writes have found the database unreachable or silent, and
    /// the latest such failure; `None` once one succeeds. See [`Orchestrator::write_stall`].
    write_stall: Mutex<Option<(Instant, String)>>,
    /// The schedules as the scheduler last saw them (for `/v1/status`).
    schedules: Mutex<BTreeMap<String, scheduler::ScheduleState>>,
}

/// An attempt's outcome waiting for the batch writer.
struct PendingOutcome {
    task: Task,
    /// What to write; `row.to` with `label` names the outcome in logs and metrics.
    row: crate::store::OutcomeRow,
    label: &'static str,
    ran: Duration,
    /// Kept until the outcome is written, so the lease keeper keeps the lease alive (and the
    /// leader does not re-queue it) while the database is unreachable.
    _registration: Registration,
}

/// Most outcomes written in one statement; also the queue's bound (a runner waits when
/// it is full, which holds its concurrency slot: backpressure, not loss).
pub const OUTCOME_BATCH: usize = 512;

/// The orchestrator of one daemon. Cheap to clone.
#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

/// Decrements the per-agent and total counts when a run ends.
struct RunCount {
    inner: Arc<Inner>,
    agent: String,
}

impl Drop for RunCount {
    fn drop(&mut self) {
        self.inner.note_finish();
        self.inner.total.fetch_sub(1, Ordering::Relaxed);
        if let Some(n) = self.inner.counts().get_mut(&self.agent) {
            *n = n.saturating_sub(1);
        }
        // Capacity freed: look for more work.
        self.inner.wake.notify_one();
    }
}

pub struct OrchestratorParts {
    pub config: Arc<ArcSwap<Config>>,
    pub pg: tokio_postgres::Config,
    pub db: Db,
    pub store: Store,
    pub running: Arc<RunningTasks>,
    pub hub: EventHub,
    pub metrics: Metrics,
    pub instance_id: String,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    /// Agents supplied by an embedding program, beside the configured ones.
    pub extra_agents: BTreeMap<String, AgentEntry>,
}

impl Inner {
    fn counts(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        self.per_agent.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn slots(&self) -> MutexGuard<'_, HashMap<String, SlotEntry>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn prefetched(&self) -> MutexGuard<'_, HashMap<String, VecDeque<claimer::Prefetched>>> {
        self.prefetched.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// A run ended: counted for the prefetch horizon ([`claimer::PREFETCH_HORIZON`]).
    fn note_finish(&self) {
        let keep = self.config.load().workers.prefetch as usize;
        let mut f = self.finishes();
        f.push_back(Instant::now());
        while f.len() > keep {
            f.pop_front();
        }
    }

    fn finishes(&self) -> MutexGuard<'_, VecDeque<Instant>> {
        self.finishes.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn schedules(&self) -> MutexGuard<'_, BTreeMap<String, scheduler::ScheduleState>> {
        self.schedules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records how one of the loops' writes (a claim, a completion batch, a lease beat)
    /// ended, for readiness: rows written (`rows` of the result) clear the stall — a
    /// statement that changed nothing committed nothing, so it proves nothing; a failure
    /// that says the database could not be reached or did not answer starts the stall (or
    /// extends it); any other failure (a refused statement, a busy pool) says nothing
    /// about the database and is ignored.
    fn record_write<T>(
        &self,
        writer: &'static str,
        r: &Result<T, StoreError>,
        rows: impl FnOnce(&T) -> usize,
    ) {
        let mut stall = self.write_stall.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Ok(v) if rows(v) > 0 => *stall = None,
            Ok(_) => {}
            Err(e) if unreachable(e) => {
                let since = stall.as_ref().map_or_else(Instant::now, |(t, _)| *t);
                *stall = Some((since, format!("{writer}: {e}")));
            }
            Err(_) => {}
        }
    }
}

/// Whether `e` says the database could not be reached or did not answer in time (rather
/// than refusing one statement, or the pool being busy).
fn unreachable(e: &StoreError) -> bool {
    match e {
        StoreError::Db(
            d @ (DbError::Deadline(_)
            | DbError::Connect(_)
            | DbError::ConnectTimeout(_)
            | DbError::Query(_)),
        ) => {
            d.is_transient()
                && !matches!(
                    d.sqlstate().map(|c| c.code()),
                    // Serialization failure, deadlock, a statement or lock time-out: the
                    // database works (a lock is watched as outcome lag instead).
                    Some("40001" | "40P01" | "57014" | "55P03")
                )
        }
        _ => false,
    }
}

impl Orchestrator {
    pub fn new(p: OrchestratorParts) -> Orchestrator {
        let cfg = p.config.load();
        let agents = Agents::from_config(&cfg, &p.extra_agents);
        let limit = cfg.workers.concurrency as usize;
        let (ctx, crx) = mpsc::channel(OUTCOME_BATCH);
        Orchestrator {
            inner: Arc::new(Inner {
                config: Arc::clone(&p.config),
                pg: p.pg,
                db: p.db,
                store: p.store,
                agents: ArcSwap::from_pointee(agents),
                extra_agents: p.extra_agents,
                running: p.running,
                hub: p.hub,
                metrics: p.metrics,
                instance_id: p.instance_id,
                wake: Notify::new(),
                per_agent: Mutex::new(HashMap::new()),
                total: AtomicUsize::new(0),
                slot_runs: Arc::new(Semaphore::new(limit)),
                slot_run_limit: limit,
                slots: Mutex::new(HashMap::new()),
                prefetched: Mutex::new(HashMap::new()),
                finishes: Mutex::new(VecDeque::new()),
                paused: Mutex::default(),
                outcomes: ctx,
                outcomes_rx: Mutex::new(Some(crx)),
                claiming: p.shutdown.child_token(),
                shutdown: p.shutdown,
                tasks: p.tasks,
                write_stall: Mutex::new(None),
                schedules: Mutex::default(),
            }),
        }
    }

    /// Starts the outcome writer, claimer, listener, lease keeper, leader and scheduler loops.
    pub fn start(&self) {
        let i = &self.inner;
        let rx = i
            .outcomes_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(rx) = rx {
            i.tasks.spawn(self.clone().outcome_writer(rx));
        }
        i.tasks.spawn(self.clone().claimer());
        let cfg = i.config.load();
        if crate::db::can_listen(&cfg.database) {
            i.tasks.spawn(self.clone().listener());
        } else {
            tracing::info!(
                poll_interval = %humantime::format_duration(cfg.workers.poll_interval.get()),
                "behind a transaction pooler without database.direct_url: no LISTEN, new tasks are found by polling"
            );
        }
        i.tasks.spawn(self.clone().keep_leases());
        i.tasks.spawn(self.clone().leader());
        i.tasks.spawn(self.clone().scheduler());
    }

    /// Stops taking new work (claims and slot runs); running tasks go on.
    pub fn stop_claiming(&self) {
        self.inner.claiming.cancel();
    }

    /// Rebuilds the agents after a config reload (running tasks keep the agent they had).
    pub fn reload_agents(&self) {
        let cfg = self.inner.config.load();
        self.inner.agents.store(Arc::new(Agents::from_config(
            &cfg,
            &self.inner.extra_agents,
        )));
        self.inner.wake.notify_one();
    }

    /// The error for a request naming an agent this instance does not run.
    pub(crate) fn unknown_agent(&self, agent: &str) -> OrchestratorError {
        OrchestratorError::UnknownAgent {
            agent: agent.to_string(),
            known: self.inner.agents.load().names().into_iter().collect(),
        }
    }

    pub fn agents(&self) -> Arc<Agents> {
        self.inner.agents.load_full()
    }

    pub fn hub(&self) -> &EventHub {
        &self.inner.hub
    }

    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    /// Tasks running here right now.
    pub fn running_here(&self) -> usize {
        self.inner.total.load(Ordering::Relaxed)
    }

    /// Why this instance cannot do its work, if its writes fail: the latest claim,
    /// completion batch or lease beat found the database unreachable or got no answer
    /// within `query_timeout`, and none has succeeded since. A server that answers the
    /// supervisor's reads but commits nothing (a promoted standby still waiting for a
    /// synchronous standby of its own, a full disk) shows here, not there. `/readyz` reads
    /// it beside the supervisor's view.
    pub fn write_stall(&self) -> Option<String> {
        let stall = self
            .inner
            .write_stall
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        stall.as_ref().map(|(since, e)| {
            format!(
                "database takes no writes (for {:.1}s): {e}",
                since.elapsed().as_secs_f64()
            )
        })
    }

    /// Waits until no run started here is still going (for shutdown), up to `limit`.
    pub async fn drain(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.running_here() > 0 {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into())
}
