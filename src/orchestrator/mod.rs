//! The orchestrator: claims runnable tasks, runs them on their agents, records the
//! outcome, and coordinates with other instances through PostgreSQL only. One file per
//! role, each role a type that owns its state (`Claimer`, `Capacity`, `OutcomeWriter`,
//! `Scheduler`, `Listener`, `RunSlots`; `Leader`, built by its loop; `Runner` and
//! `LeaseKeeper` own none) and is handed the shared [`Context`] (config, store, pool,
//! agents, metrics, the running registry, the event hub, the instance id, shutdown and
//! the claimer's wake-up). [`Inner`] is that context plus one field per role. What stays
//! on `Orchestrator` is the façade the API and the daemon call (submit, queue controls,
//! run slots, start, reload, drain), each a thin call into the role that does it:
//!
//! - [`submit`]: tasks, objectives and cancels coming in from the API;
//! - [`slots`]: run slots (`/v1/slots/{id}/run`), replace-then-await;
//! - [`claimer`]: starts prefetched tasks on free capacity and claims more in one
//!   statement, woken by [`notifications`], freed capacity, or `poll_interval`; it owns
//!   the prefetch queue and the pause list it last read;
//! - [`capacity`]: what runs here, per agent and in all; a run holds a `RunPermit`;
//! - [`runner`]: one attempt — agent, time limit, cancel, outcome — and [`planner`] for a
//!   planner agent's reply; [`outcome`] decides what the outcome writes, and every
//!   outcome goes down a bounded channel to the [`outcome_writer`], which writes them in
//!   batches and then does what follows a written outcome (metrics, the log line, an
//!   objective's dependants);
//! - [`leases`]: the lease keeper, keeping this instance's leases and `instances` row fresh;
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

mod capacity;
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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agents::{AgentEntry, Agents, EventHub};
use crate::config::Config;
use crate::db::{Db, DbError};
use crate::metrics::Metrics;
use crate::orchestrator::registry::RunningTasks;
use crate::store::{NewTask, Task};
use crate::store::{Store, StoreError};
use leader::Leader;
use leases::LeaseKeeper;
use runner::Runner;

pub use outcome_writer::OUTCOME_BATCH;
pub use retention::RetentionReport;
pub use scheduler::ScheduleState;
pub use slots::REPLACE_WAIT;

/// The step a planner objective starts with.
pub const PLAN_STEP: &str = "plan";

fn invalid(field: &str, message: impl Into<String>) -> OrchestratorError {
    OrchestratorError::Store(StoreError::Invalid {
        field: field.into(),
        message: message.into(),
    })
}

/// The error for a request naming an agent this instance does not run.
fn unknown_agent(ctx: &Context, agent: &str) -> OrchestratorError {
    OrchestratorError::UnknownAgent {
        agent: agent.to_string(),
        known: ctx.agents.load().names().into_iter().collect(),
    }
}

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

/// What every role reads and none owns. A role's own state is not here but in its file
/// (see [`Inner`]), so what one role keeps cannot be reached by another except through
/// that role's methods.
struct Context {
    config: Arc<ArcSwap<Config>>,
    db: Db,
    store: Store,
    agents: AgentSet,
    running: Arc<RunningTasks>,
    hub: EventHub,
    metrics: Metrics,
    instance_id: String,
    /// Wakes the claimer: new work, freed capacity, a resume, a reload.
    wake: Notify,
    shutdown: CancellationToken,
    /// Cancelled first at shutdown: no new claims or slot runs, running ones finish.
    claiming: CancellationToken,
    tasks: TaskTracker,
}

/// The agents in force: rebuilt from the config at a reload, with the ones an embedding
/// program supplied kept beside them.
struct AgentSet {
    live: ArcSwap<Agents>,
    extra: BTreeMap<String, AgentEntry>,
}

impl AgentSet {
    fn load(&self) -> arc_swap::Guard<Arc<Agents>> {
        self.live.load()
    }
    fn load_full(&self) -> Arc<Agents> {
        self.live.load_full()
    }
    fn rebuild(&self, cfg: &Config) {
        self.live
            .store(Arc::new(Agents::from_config(cfg, &self.extra)));
    }
}

/// The shared context and, one field each, the state every role owns.
struct Inner {
    ctx: Context,
    claimer: claimer::Claimer,
    capacity: capacity::Capacity,
    slots: slots::RunSlots,
    scheduler: scheduler::Scheduler,
    writer: outcome_writer::OutcomeWriter,
    listener: notifications::Listener,
}

/// The orchestrator of one daemon. Cheap to clone.
#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
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

impl Orchestrator {
    pub fn new(p: OrchestratorParts) -> Orchestrator {
        let cfg = p.config.load();
        let agents = Agents::from_config(&cfg, &p.extra_agents);
        let limit = cfg.workers.concurrency as usize;
        Orchestrator {
            inner: Arc::new(Inner {
                ctx: Context {
                    config: Arc::clone(&p.config),
                    db: p.db,
                    store: p.store,
                    agents: AgentSet {
                        live: ArcSwap::from_pointee(agents),
                        extra: p.extra_agents,
                    },
                    running: p.running,
                    hub: p.hub,
                    metrics: p.metrics,
                    instance_id: p.instance_id,
                    wake: Notify::new(),
                    claiming: p.shutdown.child_token(),
                    shutdown: p.shutdown,
                    tasks: p.tasks,
                },
                claimer: claimer::Claimer::default(),
                capacity: capacity::Capacity::default(),
                slots: slots::RunSlots::new(limit),
                scheduler: scheduler::Scheduler::default(),
                writer: outcome_writer::OutcomeWriter::new(),
                listener: notifications::Listener { pg: p.pg },
            }),
        }
    }

    /// Starts the outcome writer, claimer, listener, lease keeper, leader and scheduler loops.
    pub fn start(&self) {
        let i = &self.inner.ctx;
        let o = Arc::clone(&self.inner);
        i.tasks.spawn(async move { o.writer.run(&o.ctx).await });
        let runner = self.runner();
        let o = Arc::clone(&self.inner);
        i.tasks.spawn(async move {
            let start = |task, entry| runner.start_claimed(task, entry);
            o.claimer.run(&o.ctx, &o.capacity, &o.writer, &start).await
        });
        let cfg = i.config.load();
        if crate::db::can_listen(&cfg.database) {
            let o = Arc::clone(&self.inner);
            i.tasks.spawn(async move { o.listener.run(&o.ctx).await });
        } else {
            tracing::info!(
                poll_interval = %humantime::format_duration(cfg.workers.poll_interval.get()),
                "behind a transaction pooler without database.direct_url: no LISTEN, new tasks are found by polling"
            );
        }
        let o = Arc::clone(&self.inner);
        i.tasks.spawn(async move {
            LeaseKeeper {
                ctx: &o.ctx,
                writer: &o.writer,
            }
            .run()
            .await
        });
        let o = Arc::clone(&self.inner);
        i.tasks
            .spawn(async move { Leader::new(&o.ctx).run(&o.ctx).await });
        let o = Arc::clone(&self.inner);
        i.tasks.spawn(async move { o.scheduler.run(&o.ctx).await });
    }

    /// Stops taking new work (claims and slot runs); running tasks go on.
    pub fn stop_claiming(&self) {
        self.inner.ctx.claiming.cancel();
    }

    /// Rebuilds the agents after a config reload (running tasks keep the agent they had).
    pub fn reload_agents(&self) {
        let ctx = &self.inner.ctx;
        ctx.agents.rebuild(&ctx.config.load());
        ctx.wake.notify_one();
    }

    /// The error for a request naming an agent this instance does not run.
    pub(crate) fn unknown_agent(&self, agent: &str) -> OrchestratorError {
        unknown_agent(&self.inner.ctx, agent)
    }

    /// The runner: what the claimer and the run slots start runs through.
    fn runner(&self) -> Runner {
        Runner::new(Arc::clone(&self.inner))
    }

    /// Runs a task in run slot `slot_id` now, replacing the slot's running task (see
    /// `slots`).
    pub async fn run_in_slot(&self, slot_id: &str, t: NewTask) -> Result<Task, OrchestratorError> {
        let i = &self.inner;
        i.slots.run(&i.ctx, &self.runner(), slot_id, t).await
    }

    pub fn agents(&self) -> Arc<Agents> {
        self.inner.ctx.agents.load_full()
    }

    pub fn hub(&self) -> &EventHub {
        &self.inner.ctx.hub
    }

    pub fn instance_id(&self) -> &str {
        &self.inner.ctx.instance_id
    }

    /// Tasks running here right now.
    pub fn running_here(&self) -> usize {
        self.inner.capacity.running()
    }

    /// Why this instance cannot do its work, if its writes fail: the latest claim,
    /// outcome batch or lease beat found the database unreachable or got no answer
    /// within `query_timeout`, and none has succeeded since. A server that answers the
    /// supervisor's reads but commits nothing (a promoted standby still waiting for a
    /// synchronous standby of its own, a full disk) shows here, not there. `/readyz` reads
    /// it beside the supervisor's view.
    pub fn write_stall(&self) -> Option<String> {
        self.inner.writer.stall()
    }

    /// One claim round over every agent with free capacity, as the claimer does when woken;
    /// returns how many tasks it started or prefetched.
    pub async fn claim_once(&self) -> Result<usize, StoreError> {
        let i = &self.inner;
        let runner = self.runner();
        let start = |task, entry| runner.start_claimed(task, entry);
        i.claimer
            .claim_once(&i.ctx, &i.capacity, &i.writer, &start)
            .await
    }

    /// Extends this instance's leases once, as the lease keeper does every third of
    /// `workers.lease` (see `leases`).
    pub async fn beat(&self, lease: Duration) -> Result<(), StoreError> {
        let i = &self.inner;
        LeaseKeeper {
            ctx: &i.ctx,
            writer: &i.writer,
        }
        .beat(lease)
        .await
    }

    /// One retention run with the configuration in force, as the leader does it (without
    /// the leadership check: for tests and tools).
    pub async fn retention_once(&self) -> Result<RetentionReport, StoreError> {
        let ctx = &self.inner.ctx;
        let cfg = ctx.config.load_full();
        retention::retain(ctx, &cfg.retention, &|| true).await
    }

    /// Each schedule as this instance last saw it.
    pub fn schedules_status(&self) -> BTreeMap<String, ScheduleState> {
        self.inner.scheduler.status()
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
