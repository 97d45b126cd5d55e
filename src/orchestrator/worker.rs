//! The orchestrator proper: claims runnable tasks, runs them on their agents, records the
//! outcome, and coordinates with other instances through PostgreSQL only.
//!
//! Loops (each takes the shutdown token and runs on the daemon's task tracker):
//! - **claimer**: wakes on `LISTEN taskwarden_tasks`, on a finished task, or every
//!   `poll_interval`; claims with `FOR UPDATE SKIP LOCKED` in batches up to the free
//!   capacity (global `workers.concurrency` and each agent's `concurrency`), priority then
//!   age, honouring `run_after` and objective dependencies.
//! - **heartbeat**: every lease/3 extends the leases of tasks running here; a task whose row
//!   is no longer running under our lease (cancelled elsewhere, timed out, re-queued) is
//!   cancelled here. It also refreshes this instance's row in `instances`.
//! - **leader**: the instance holding the `leader` row (see [`super::elector`]) re-queues
//!   tasks whose lease expired (a dead instance's), reaps dead instances and cancels
//!   dependants of failed steps. A leader that cannot renew the row steps down at once,
//!   and another instance takes over when the row expires.
//!
//! A task runs as one future raced against its cancellation token and its time limit; on
//! cancellation the future — and every session guard and child process it holds — is
//! dropped at once. Session runs replace the session's running task: the new one is
//! registered and started first, the old one is cancelled, and awaiting its end happens
//! after every lock is released (the third seed's deadlock, done right).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::{FutureExt, StreamExt};
use rand::Rng;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agents::{
    AgentEntry, AgentError, AgentOutput, Agents, EventHub, OutputWriter, TaskContext,
};
use crate::config::Config;
use crate::db::{Db, DbError};
use crate::metrics::{self as m, Metrics};
use crate::orchestrator::elector::Elector;
use crate::orchestrator::registry::{Registration, RunningTasks};
use crate::store::{
    NewObjective, NewStep, NewTask, Objective, Store, StoreError, TASK_COLUMNS, Task, TaskStatus,
    TransitionArgs,
};
use crate::tracker::Owner;

/// The step a planner objective starts with.
pub const PLAN_STEP: &str = "plan";

fn invalid(field: &str, message: impl Into<String>) -> OrchestratorError {
    OrchestratorError::Store(StoreError::Invalid {
        field: field.into(),
        message: message.into(),
    })
}

/// The NOTIFY channel new tasks are announced on.
pub const NOTIFY_CHANNEL: &str = "taskwarden_tasks";
/// How long a session run waits for the task it replaced to end before answering.
pub const REPLACE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    #[error("agent: unknown agent {0:?}")]
    UnknownAgent(String),
    #[error("no run slot free: {0} session runs already running (workers.concurrency)")]
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
    /// Tasks this instance runs, by agent (claimed or session runs).
    per_agent: Mutex<HashMap<String, usize>>,
    total: AtomicUsize,
    session_runs: Arc<Semaphore>,
    session_run_limit: usize,
    slots: Mutex<HashMap<String, SlotEntry>>,
    /// Successful outcomes waiting to be written in one batch.
    completions: mpsc::Sender<Completion>,
    completions_rx: Mutex<Option<mpsc::Receiver<Completion>>>,
    shutdown: CancellationToken,
    /// Cancelled first at shutdown: no new claims or session runs, running ones finish.
    claiming: CancellationToken,
    tasks: TaskTracker,
}

/// A succeeded attempt waiting for the batch writer.
struct Completion {
    task: Task,
    result: Option<serde_json::Value>,
    ran: Duration,
    /// Kept until the outcome is written, so the heartbeat keeps the lease alive (and the
    /// leader does not re-queue it) while the database is unreachable.
    _registration: Registration,
}

/// Most completions written in one statement; also the queue's bound (a runner waits when
/// it is full, which holds its concurrency slot: backpressure, not loss).
pub const COMPLETION_BATCH: usize = 512;

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
}

impl Orchestrator {
    pub fn new(p: OrchestratorParts) -> Orchestrator {
        let cfg = p.config.load();
        let agents = Agents::from_config(&cfg, &p.extra_agents);
        let limit = cfg.workers.concurrency as usize;
        let (ctx, crx) = mpsc::channel(COMPLETION_BATCH);
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
                session_runs: Arc::new(Semaphore::new(limit)),
                session_run_limit: limit,
                slots: Mutex::new(HashMap::new()),
                completions: ctx,
                completions_rx: Mutex::new(Some(crx)),
                claiming: p.shutdown.child_token(),
                shutdown: p.shutdown,
                tasks: p.tasks,
            }),
        }
    }

    /// Starts the claimer, listener, heartbeat and leader loops.
    pub fn start(&self) {
        let i = &self.inner;
        let rx = i
            .completions_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(rx) = rx {
            i.tasks.spawn(self.clone().completion_writer(rx));
        }
        i.tasks.spawn(self.clone().claimer());
        i.tasks.spawn(self.clone().listener());
        i.tasks.spawn(self.clone().heartbeat());
        i.tasks.spawn(self.clone().leader());
    }

    /// Stops taking new work (claims and session runs); running tasks go on.
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

    pub fn agents(&self) -> Arc<Agents> {
        self.inner.agents.load_full()
    }

    pub fn hub(&self) -> &EventHub {
        &self.inner.hub
    }

    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    /// Queues a task (agent must be known). Workers anywhere may run it.
    pub async fn submit(&self, t: &NewTask) -> Result<Task, OrchestratorError> {
        if self.inner.agents.load().get(&t.agent).is_none() {
            return Err(OrchestratorError::UnknownAgent(t.agent.clone()));
        }
        let task = self.inner.store.create_task(t).await?;
        self.inner.wake.notify_one();
        Ok(task)
    }

    /// Creates an objective whose steps all name known agents.
    pub async fn create_objective(&self, o: &NewObjective) -> Result<Objective, OrchestratorError> {
        let agents = self.inner.agents.load_full();
        let known = agents.names();
        let planned;
        let o = match &o.planner {
            None => o,
            Some(p) => {
                if !o.steps.is_empty() {
                    return Err(invalid("steps", "give steps or a planner, not both"));
                }
                if !agents.get(p).is_some_and(|e| e.planner) {
                    return Err(invalid(
                        "planner",
                        format!("{p:?} is not an agent with planner = true"),
                    ));
                }
                planned = NewObjective {
                    title: o.title.clone(),
                    steps: vec![NewStep {
                        key: PLAN_STEP.into(),
                        depends_on: vec![],
                        task: NewTask::new(
                            p.clone(),
                            serde_json::json!({ "title": o.title, "input": o.input }),
                        ),
                    }],
                    ..Default::default()
                };
                &planned
            }
        };
        let obj = self.inner.store.create_objective(o, Some(&known)).await?;
        self.inner.wake.notify_one();
        Ok(obj)
    }

    /// Cancels a queued or running task, wherever it runs (another instance notices at
    /// its next heartbeat).
    pub async fn cancel(&self, id: i64, reason: &str) -> Result<Task, OrchestratorError> {
        let t = self
            .inner
            .store
            .transition(
                id,
                TaskStatus::Cancelled,
                &TransitionArgs {
                    error: Some(reason.to_string()),
                    ..Default::default()
                },
            )
            .await?;
        self.inner.running.cancel(id);
        self.cascade().await;
        Ok(t)
    }

    /// Runs a task for `session_id` now, replacing the session's running task.
    pub async fn run_for_session(
        &self,
        session_id: &str,
        mut t: NewTask,
    ) -> Result<Task, OrchestratorError> {
        let i = &self.inner;
        t.session_id = Some(session_id.to_string());
        let Some(entry) = i.agents.load().get(&t.agent).cloned() else {
            return Err(OrchestratorError::UnknownAgent(t.agent.clone()));
        };
        if i.claiming.is_cancelled() {
            return Err(OrchestratorError::ShuttingDown);
        }
        let permit = Arc::clone(&i.session_runs)
            .try_acquire_owned()
            .map_err(|_| OrchestratorError::NoRunSlot(i.session_run_limit))?;
        let lease = i.config.load().workers.lease.get();
        let task = i.store.create_running(&t, &i.instance_id, lease).await?;

        // Register, swapping the slot under a plain mutex: no await in here. The slot keeps
        // the newest task (highest id); a call that lost a race cancels its own task.
        let cancel = CancellationToken::new();
        let done = CancellationToken::new();
        let old = {
            let mut slots = i.slots();
            match slots.get(session_id) {
                Some(cur) if cur.task_id > task.id => {
                    cancel.cancel();
                    None
                }
                _ => slots.insert(
                    session_id.to_string(),
                    SlotEntry {
                        task_id: task.id,
                        cancel: cancel.clone(),
                        done: done.clone(),
                    },
                ),
            }
        };
        // Start the new task at once.
        self.spawn_run(
            task.clone(),
            entry,
            cancel,
            Some((session_id.to_string(), done, permit)),
        );

        // Replaced tasks end as cancelled in the database, with the reason; local ones
        // are cancelled here, ones running elsewhere at their instance's next heartbeat.
        let replaced = self.cancel_older_session_runs(session_id, task.id).await;
        if let Err(e) = &replaced {
            tracing::warn!(session_id, task_id = task.id, error = %e, "could not record replaced session tasks");
        }
        if let Some(o) = &old {
            o.cancel.cancel();
        }
        // Wait for the local old task to end — outside every lock, bounded.
        if let Some(o) = old
            && tokio::time::timeout(REPLACE_WAIT, o.done.cancelled())
                .await
                .is_err()
        {
            tracing::warn!(
                session_id,
                old_task_id = o.task_id,
                "replaced task still ending after the wait"
            );
        }
        Ok(task)
    }

    async fn cancel_older_session_runs(
        &self,
        session_id: &str,
        newest: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let allowed = TaskStatus::allowed_from(TaskStatus::Cancelled);
        let reason = format!("replaced by task {newest}");
        let s = self
            .inner
            .db
            .session("orchestrator.replace_session_run")
            .await?;
        let rows = s
            .query(
                "UPDATE tasks SET status = 'cancelled', finished_at = now(), updated_at = now(), \
                   lease_owner = NULL, lease_expires_at = NULL, error = $3 \
                 WHERE session_id = $1 AND status = 'running' AND status = ANY($4) AND id < $2 RETURNING id",
                &[&session_id, &newest, &reason, &allowed],
            )
            .await?;
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        for id in &ids {
            self.inner.running.cancel(*id);
        }
        Ok(ids)
    }

    /// Runs one attempt of `task` (already running under our lease) on its own task.
    fn spawn_run(
        &self,
        task: Task,
        entry: AgentEntry,
        cancel: CancellationToken,
        slot: Option<(String, CancellationToken, tokio::sync::OwnedSemaphorePermit)>,
    ) {
        let i = Arc::clone(&self.inner);
        i.total.fetch_add(1, Ordering::Relaxed);
        *i.counts().entry(task.agent.clone()).or_insert(0) += 1;
        let count = RunCount {
            inner: Arc::clone(&i),
            agent: task.agent.clone(),
        };
        let registration = i.running.register(task.id, &task.agent, cancel.clone());
        let this = self.clone();
        i.tasks.spawn(async move {
            let _count = count;
            // Whatever happens, the slot's waiters learn that this run ended.
            let _done = slot.as_ref().map(|(_, done, _)| done.clone().drop_guard());
            let mut outcome = this.attempt(&task, &entry, &cancel).await;
            if entry.planner
                && let Outcome::Succeeded(out) = &outcome
                && let Err(e) = this.apply_plan(&task, &out.result).await
            {
                outcome = Outcome::Failed(e);
            }
            this.finish(&task, outcome, registration).await;
            if let Some((session, _, _permit)) = &slot {
                let mut slots = this.inner.slots();
                if slots.get(session).is_some_and(|e| e.task_id == task.id) {
                    slots.remove(session);
                }
            }
        });
    }

    /// A planner's reply is the objective's next steps: `[...]` or `{"steps": [...]}`.
    /// They are added before the plan step counts as succeeded; a bad plan fails it.
    async fn apply_plan(
        &self,
        task: &Task,
        result: &Option<serde_json::Value>,
    ) -> Result<(), AgentError> {
        let Some(objective_id) = task.objective_id else {
            return Ok(());
        };
        let steps = match result {
            Some(serde_json::Value::Array(a)) => serde_json::Value::Array(a.clone()),
            Some(serde_json::Value::Object(o)) if o.contains_key("steps") => o["steps"].clone(),
            _ => {
                return Err(AgentError::fatal(
                    "planner reply: expected a list of steps or {\"steps\": [...]}",
                ));
            }
        };
        let steps: Vec<NewStep> = serde_json::from_value(steps)
            .map_err(|e| AgentError::fatal(format!("planner reply: {e}")))?;
        let known = self.inner.agents.load().names();
        let added = self
            .inner
            .store
            .add_steps(objective_id, &steps, Some(&known))
            .await
            .map_err(|e| match e {
                StoreError::Invalid { .. } => AgentError::fatal(format!("planner reply: {e}")),
                other => AgentError::retryable(format!("planner reply: {other}")),
            })?;
        tracing::info!(
            task_id = task.id,
            objective_id,
            steps = added.len(),
            "planner added steps"
        );
        self.inner.wake.notify_one();
        Ok(())
    }

    async fn attempt(
        &self,
        task: &Task,
        entry: &AgentEntry,
        cancel: &CancellationToken,
    ) -> Outcome {
        let i = &self.inner;
        let limit = entry
            .timeout
            .min(i.config.load().supervisor.max_task_duration.get());
        if let Some(started) = task.started_at {
            let wait = (started - task.run_after.max(task.created_at))
                .to_std()
                .unwrap_or_default();
            i.metrics
                .histogram(m::TASK_QUEUE_WAIT_SECONDS, &[])
                .record(wait.as_secs_f64());
        }
        let owner = Owner {
            task_id: task.id,
            cancel: cancel.clone(),
        };
        let ctx = TaskContext::new(
            task,
            cancel.clone(),
            i.store.for_task(owner),
            i.hub.clone(),
            i.metrics.clone(),
        );
        tracing::debug!(task_id = task.id, agent = %task.agent, attempt = task.attempts, "task started");
        let output = ctx.output();
        let outcome = tokio::select! {
            biased;
            _ = cancel.cancelled() => Outcome::Cancelled,
            r = tokio::time::timeout(limit, entry.agent.run(ctx)) => match r {
                Ok(Ok(out)) => Outcome::Succeeded(out),
                Ok(Err(e)) => Outcome::Failed(e),
                Err(_) => Outcome::TimedOut(limit),
            },
        };
        if !matches!(outcome, Outcome::Cancelled) {
            self.flush_output(task, &output, cancel).await;
        }
        outcome
    }

    /// Writes the events and usage the attempt kept during a database outage, before its
    /// outcome; retried with backoff while the database is unreachable (the lease is kept
    /// meanwhile), given up on shutdown, cancellation or a refusal by the database.
    async fn flush_output(&self, task: &Task, output: &OutputWriter, cancel: &CancellationToken) {
        let mut attempt = 0u32;
        while !output.is_flushed() {
            match output.flush().await {
                Ok(()) => {
                    tracing::info!(task_id = task.id, agent = %task.agent, "kept task output written after a database outage");
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(task_id = task.id, agent = %task.agent, attempt, error = %e, "writing kept task output failed; retrying");
                    if cancel.is_cancelled() || !self.retry_pause(&mut attempt).await {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(task_id = task.id, agent = %task.agent, error = %e, "kept task output refused by the database; dropped");
                    return;
                }
            }
        }
    }

    /// Records an attempt's outcome. `registration` lives until the write is done.
    async fn finish(&self, task: &Task, outcome: Outcome, registration: Registration) {
        let i = &self.inner;
        let ran = task
            .started_at
            .map(|s| (chrono::Utc::now() - s).to_std().unwrap_or_default())
            .unwrap_or_default();
        let me = Some(i.instance_id.clone());
        let (to, args, label) = match outcome {
            Outcome::Succeeded(out) => {
                let c = Completion {
                    task: task.clone(),
                    result: out.result,
                    ran,
                    _registration: registration,
                };
                if i.completions.send(c).await.is_err() {
                    tracing::warn!(
                        task_id = task.id,
                        "completion writer gone (shutting down); the lease will re-queue the task"
                    );
                }
                return;
            }
            Outcome::Failed(e) if e.retryable && task.attempts < task.max_attempts => {
                let delay = self.backoff(task.attempts);
                let _ = i
                    .store
                    .add_event(
                        task.id,
                        "attempt_failed",
                        &serde_json::json!({ "attempt": task.attempts, "error": e.message }),
                    )
                    .await;
                (
                    TaskStatus::Queued,
                    TransitionArgs {
                        expected_owner: me,
                        error: Some(format!("attempt {}: {}", task.attempts, e.message)),
                        run_after: chrono::Duration::from_std(delay)
                            .ok()
                            .and_then(|d| chrono::Utc::now().checked_add_signed(d))
                            .or_else(|| Some(chrono::Utc::now())),
                        ..Default::default()
                    },
                    "retried",
                )
            }
            Outcome::Failed(e) => {
                let _ = i
                    .store
                    .add_event(
                        task.id,
                        "attempt_failed",
                        &serde_json::json!({ "attempt": task.attempts, "error": e.message }),
                    )
                    .await;
                (
                    TaskStatus::Failed,
                    TransitionArgs {
                        expected_owner: me,
                        error: Some(format!("attempt {}: {}", task.attempts, e.message)),
                        ..Default::default()
                    },
                    "failed",
                )
            }
            Outcome::TimedOut(limit) => (
                TaskStatus::TimedOut,
                TransitionArgs {
                    expected_owner: me,
                    error: Some(format!("exceeded its time limit ({}s)", limit.as_secs())),
                    ..Default::default()
                },
                "timed_out",
            ),
            Outcome::Cancelled if i.shutdown.is_cancelled() => {
                // Shutdown puts it back in the queue (daemon::stop); nothing to write here.
                tracing::debug!(task_id = task.id, "task interrupted by shutdown");
                return;
            }
            Outcome::Cancelled => (
                TaskStatus::Cancelled,
                TransitionArgs {
                    expected_owner: me,
                    error: Some("cancelled".into()),
                    ..Default::default()
                },
                "cancelled",
            ),
        };
        let mut written = false;
        let mut attempt = 0u32;
        loop {
            match i.store.transition(task.id, to, &args).await {
                Ok(_) => {
                    written = true;
                    break;
                }
                Err(StoreError::IllegalTransition { from, .. }) => {
                    // Someone else decided first (cancel, supervisor timeout, lease expiry).
                    tracing::info!(task_id = task.id, outcome = label, now = %from, "task outcome not recorded: status already changed");
                    break;
                }
                Err(StoreError::LeaseLost { holder, .. }) => {
                    tracing::warn!(
                        task_id = task.id,
                        outcome = label,
                        ?holder,
                        "task outcome not recorded: lease lost"
                    );
                    break;
                }
                Err(e) => {
                    // The database may be restarting: keep the outcome (and the lease,
                    // through the registration) until it can be written, or until shutdown.
                    tracing::error!(task_id = task.id, outcome = label, attempt, error = %e, "recording task outcome failed; retrying");
                    if !self.retry_pause(&mut attempt).await {
                        break;
                    }
                }
            }
        }
        drop(registration);
        if written {
            self.finished(task, to, label, ran).await;
        }
    }

    /// Bookkeeping after an outcome was written: metrics, log, objective follow-ups.
    async fn finished(&self, task: &Task, to: TaskStatus, label: &str, ran: Duration) {
        let i = &self.inner;
        let outcome = if label == "retried" { "failed" } else { label };
        i.metrics
            .counter(
                m::TASKS_FINISHED_TOTAL,
                &[("agent", &task.agent), ("outcome", outcome)],
            )
            .increment(1);
        i.metrics
            .histogram(m::TASK_DURATION_SECONDS, &[("agent", &task.agent)])
            .record(ran.as_secs_f64());
        tracing::debug!(task_id = task.id, agent = %task.agent, outcome = label, ran_ms = ran.as_millis() as u64, "task finished");
        if task.objective_id.is_some() {
            if to != TaskStatus::Succeeded && to != TaskStatus::Queued {
                self.cascade().await;
            }
            // Dependants may be runnable now, here or elsewhere.
            i.wake.notify_one();
            if let Ok(s) = i.db.session("orchestrator.notify").await {
                let _ = s
                    .execute("SELECT pg_notify($1, '')", &[&NOTIFY_CHANNEL])
                    .await;
            }
        }
    }

    /// Writes succeeded outcomes in batches: one statement for everything queued, so a
    /// busy instance pays one commit per batch instead of one per task. On shutdown it
    /// drains what is queued before it stops.
    async fn completion_writer(self, mut rx: mpsc::Receiver<Completion>) {
        let i = Arc::clone(&self.inner);
        let mut batch: Vec<Completion> = Vec::with_capacity(COMPLETION_BATCH);
        loop {
            tokio::select! {
                biased;
                n = rx.recv_many(&mut batch, COMPLETION_BATCH) => {
                    if n == 0 {
                        return;
                    }
                }
                _ = i.shutdown.cancelled() => {
                    while let Ok(c) = rx.try_recv() {
                        batch.push(c);
                    }
                    if batch.is_empty() {
                        return;
                    }
                }
            }
            self.write_completions(&mut batch).await;
            if i.shutdown.is_cancelled() && rx.is_empty() {
                return;
            }
        }
    }

    async fn write_completions(&self, batch: &mut Vec<Completion>) {
        let i = &self.inner;
        let ids: Vec<i64> = batch.iter().map(|c| c.task.id).collect();
        let results: Vec<Option<serde_json::Value>> =
            batch.iter().map(|c| c.result.clone()).collect();
        let allowed = TaskStatus::allowed_from(TaskStatus::Succeeded);
        let mut written: Option<HashSet<i64>> = None;
        let mut attempt = 0u32;
        loop {
            let r = async {
                let s = i.db.session("orchestrator.complete_batch").await?;
                s.query(
                    "UPDATE tasks t SET status = 'succeeded', finished_at = now(), updated_at = now(), \
                       lease_owner = NULL, lease_expires_at = NULL, result = v.result \
                     FROM unnest($1::bigint[], $2::jsonb[]) AS v(id, result) \
                     WHERE t.id = v.id AND t.status = ANY($3) AND t.lease_owner = $4 RETURNING t.id",
                    &[&ids, &results, &allowed, &i.instance_id],
                )
                .await
            }
            .await;
            match r {
                Ok(rows) => {
                    written = Some(rows.iter().map(|r| r.get(0)).collect());
                    break;
                }
                Err(e) => {
                    tracing::error!(tasks = ids.len(), attempt, error = %e, "writing task completions failed; retrying");
                    if !self.retry_pause(&mut attempt).await {
                        break;
                    }
                }
            }
        }
        let written = written.unwrap_or_default();
        for c in batch.drain(..) {
            if written.contains(&c.task.id) {
                self.finished(&c.task, TaskStatus::Succeeded, "succeeded", c.ran)
                    .await;
            } else {
                tracing::info!(
                    task_id = c.task.id,
                    "task success not recorded: status or lease changed meanwhile"
                );
            }
        }
    }

    /// Backoff between attempts to write an outcome: 200 ms doubling to 5 s. False when
    /// the daemon is shutting down (the outcome is then left to lease expiry).
    async fn retry_pause(&self, attempt: &mut u32) -> bool {
        let pause = Duration::from_millis(200u64 << (*attempt).min(5)).min(Duration::from_secs(5));
        *attempt += 1;
        tokio::select! {
            _ = self.inner.shutdown.cancelled() => false,
            _ = tokio::time::sleep(pause) => true,
        }
    }

    async fn cascade(&self) {
        match self.inner.store.cancel_blocked_dependants().await {
            Ok(ids) if !ids.is_empty() => {
                tracing::info!(cancelled = ?ids, "dependants of a failed step cancelled")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cancelling dependants failed; the leader retries")
            }
        }
    }

    /// Exponential backoff with jitter: base·2^(attempt-1), capped, then a random 50–100 %.
    fn backoff(&self, attempt: i32) -> Duration {
        let w = &self.inner.config.load().workers;
        let exp = w
            .retry_backoff
            .get()
            .saturating_mul(1u32 << (attempt.clamp(1, 20) - 1) as u32);
        let capped = exp.min(w.retry_backoff_max.get());
        capped.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
    }

    async fn claimer(self) {
        let i = Arc::clone(&self.inner);
        loop {
            let poll = i.config.load().workers.poll_interval.get();
            tokio::select! {
                _ = i.claiming.cancelled() => return,
                _ = i.wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
            // Keep claiming while there is both capacity and work.
            loop {
                if i.claiming.is_cancelled() {
                    return;
                }
                match self.claim_once().await {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming tasks failed");
                        break;
                    }
                }
            }
        }
    }

    /// One claim round over every agent with free capacity; returns how many started.
    pub async fn claim_once(&self) -> Result<usize, StoreError> {
        let i = &self.inner;
        let cfg = i.config.load();
        let agents = i.agents.load_full();
        let mut started = 0;
        for (name, entry) in agents.iter() {
            let total_free =
                (cfg.workers.concurrency as usize).saturating_sub(i.total.load(Ordering::Relaxed));
            if total_free == 0 {
                break;
            }
            let running_here = i.counts().get(name).copied().unwrap_or(0);
            let want = entry
                .concurrency
                .saturating_sub(running_here)
                .min(total_free);
            if want == 0 {
                continue;
            }
            let claimed = self
                .claim(name, want as i64, cfg.workers.lease.get())
                .await?;
            for t in claimed {
                started += 1;
                self.spawn_run(t, entry.clone(), CancellationToken::new(), None);
            }
        }
        Ok(started)
    }

    async fn claim(
        &self,
        agent: &str,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<Task>, StoreError> {
        let allowed = TaskStatus::allowed_from(TaskStatus::Running);
        let lease_s = lease.as_secs_f64();
        let s = self.inner.db.session("orchestrator.claim").await?;
        let rows = s
            .query(
                &format!(
                    "WITH c AS ( \
                       SELECT t.id AS claim_id FROM tasks t \
                       WHERE t.status = 'queued' AND t.agent = $1 AND t.run_after <= now() \
                         AND (cardinality(t.depends_on) = 0 OR NOT EXISTS ( \
                           SELECT 1 FROM tasks d WHERE d.objective_id = t.objective_id \
                             AND d.step_key = ANY(t.depends_on) AND d.status <> 'succeeded')) \
                       ORDER BY t.priority DESC, t.run_after, t.id \
                       LIMIT $2 FOR UPDATE SKIP LOCKED) \
                     UPDATE tasks SET status = 'running', attempts = attempts + 1, started_at = now(), \
                       updated_at = now(), lease_owner = $3, \
                       lease_expires_at = now() + make_interval(secs => $4) \
                     FROM c WHERE tasks.id = c.claim_id AND tasks.status = ANY($5) \
                     RETURNING {TASK_COLUMNS}"
                ),
                &[&agent, &limit, &self.inner.instance_id, &lease_s, &allowed],
            )
            .await?;
        rows.iter().map(Task::from_row).collect()
    }

    async fn listener(self) {
        let i = Arc::clone(&self.inner);
        while !i.shutdown.is_cancelled() {
            if let Err(e) = self.listen_once().await {
                tracing::warn!(error = %e, "task notification listener lost its connection; polling meanwhile");
            }
            let poll = i.config.load().workers.poll_interval.get();
            tokio::select! {
                _ = i.shutdown.cancelled() => return,
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }

    /// One LISTEN connection's life. Connect and LISTEN are bounded; while idle, a probe
    /// round trip every `query_timeout` proves the link alive, so a frozen connection is
    /// replaced within two deadlines instead of silently delivering nothing.
    async fn listen_once(&self) -> Result<(), DbError> {
        let i = &self.inner;
        let cfg = i.config.load_full();
        let deadline = cfg.database.query_timeout.get();
        let mut pg = i.pg.clone();
        crate::db::session_settings(&mut pg, &cfg.database);
        pg.application_name(format!("{}:listener", cfg.database.application_name));
        let connect_limit = cfg.database.connect_timeout.get();
        let (client, mut conn) =
            match tokio::time::timeout(connect_limit, pg.connect(tokio_postgres::NoTls)).await {
                Ok(r) => r.map_err(DbError::Connect)?,
                Err(_) => return Err(DbError::ConnectTimeout(connect_limit)),
            };
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        let on_message =
            |m: Option<Result<tokio_postgres::AsyncMessage, tokio_postgres::Error>>| match m {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                    i.wake.notify_one();
                    Ok(true)
                }
                Some(Ok(_)) => Ok(true),
                Some(Err(e)) => Err(DbError::Connect(e)),
                None => Ok(false),
            };
        // The connection is driven (messages polled) while each round trip runs.
        let sql = format!("LISTEN {NOTIFY_CHANNEL}");
        let mut round_trip = Some(client.batch_execute(&sql).boxed());
        let mut next_probe = tokio::time::Instant::now() + deadline;
        loop {
            match round_trip.as_mut() {
                Some(rt) => {
                    let expires = tokio::time::sleep(deadline);
                    tokio::pin!(expires);
                    loop {
                        tokio::select! {
                            _ = i.shutdown.cancelled() => return Ok(()),
                            r = &mut *rt => { r?; break; }
                            m = messages.next() => if !on_message(m)? { return Ok(()) },
                            _ = &mut expires => return Err(DbError::Deadline(deadline)),
                        }
                    }
                    round_trip = None;
                    next_probe = tokio::time::Instant::now() + deadline;
                }
                None => {
                    tokio::select! {
                        _ = i.shutdown.cancelled() => return Ok(()),
                        m = messages.next() => if !on_message(m)? { return Ok(()) },
                        _ = tokio::time::sleep_until(next_probe) => {
                            round_trip = Some(client.batch_execute("SELECT 1").boxed());
                        }
                    }
                }
            }
        }
    }

    async fn heartbeat(self) {
        let i = Arc::clone(&self.inner);
        loop {
            let lease = i.config.load().workers.lease.get();
            if let Err(e) = self.beat(lease).await {
                tracing::warn!(error = %e, "lease heartbeat failed");
            }
            tokio::select! {
                _ = i.shutdown.cancelled() => return,
                _ = tokio::time::sleep(lease / 3) => {}
            }
        }
    }

    /// Extends our leases; cancels local runs whose row says they are no longer ours.
    pub async fn beat(&self, lease: Duration) -> Result<(), StoreError> {
        let i = &self.inner;
        let ids: Vec<i64> = i.running.snapshot().iter().map(|t| t.task_id).collect();
        let s = i.db.session("orchestrator.heartbeat").await?;
        s.execute(
            "INSERT INTO instances (id, hostname, pid, version) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
            &[
                &i.instance_id,
                &hostname(),
                &(std::process::id() as i32),
                &env!("CARGO_PKG_VERSION"),
            ],
        )
        .await?;
        if ids.is_empty() {
            return Ok(());
        }
        let rows = s
            .query(
                "UPDATE tasks SET lease_expires_at = now() + make_interval(secs => $3) \
                 WHERE id = ANY($1) AND lease_owner = $2 AND status = 'running' RETURNING id",
                &[&ids, &i.instance_id, &lease.as_secs_f64()],
            )
            .await?;
        drop(s);
        let still: HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
        for id in ids.into_iter().filter(|id| !still.contains(id)) {
            if i.running.cancel(id) {
                tracing::info!(
                    task_id = id,
                    "task no longer running under our lease; cancelled here"
                );
            }
        }
        Ok(())
    }

    /// Holds or seeks leadership every third of its time to live (`workers.lease`), and
    /// while leading does the cluster-wide duties. Resigns at shutdown.
    async fn leader(self) {
        let i = Arc::clone(&self.inner);
        let mut elector = Elector::new(i.instance_id.clone(), i.db.clone(), i.metrics.clone());
        loop {
            let cfg = i.config.load_full();
            let ttl = cfg.workers.lease.get();
            let period = (ttl / 3).max(Duration::from_millis(100));
            if elector.run_once(ttl).await
                && let Err(e) = self.lead_once(&elector, &cfg).await
            {
                tracing::warn!(error = %e, sqlstate = ?e.sqlstate().map(|c| c.code()), "leader duties failed; retrying next round");
            }
            tokio::select! {
                _ = i.shutdown.cancelled() => {
                    elector.resign().await;
                    return;
                }
                _ = tokio::time::sleep(period) => {}
            }
        }
    }

    /// The leader's duties; each step starts only while leadership is still ours.
    async fn lead_once(&self, elector: &Elector, cfg: &Config) -> Result<(), DbError> {
        let i = &self.inner;
        // Our own runs (including outcomes still waiting to be written) are not expired,
        // whatever the lease column says after an outage.
        let local: Vec<i64> = i.running.snapshot().iter().map(|t| t.task_id).collect();
        let s = i.db.session("orchestrator.leader").await?;
        if !elector.is_leading() {
            return Ok(());
        }
        let requeued = s
            .query(
                "UPDATE tasks SET \
                   status = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END, \
                   finished_at = CASE WHEN attempts >= max_attempts THEN now() END, \
                   error = 'lease expired (held by ' || COALESCE(lease_owner, '?') || ')', \
                   lease_owner = NULL, lease_expires_at = NULL, run_after = now(), updated_at = now() \
                 WHERE status = 'running' AND lease_expires_at < now() \
                   AND NOT (lease_owner = $1 AND id = ANY($2)) RETURNING id, status",
                &[&i.instance_id, &local],
            )
            .await?;
        if !requeued.is_empty() {
            let ids: Vec<i64> = requeued.iter().map(|r| r.get(0)).collect();
            tracing::warn!(tasks = ?ids, "re-queued tasks whose lease expired");
            i.wake.notify_one();
            s.execute("SELECT pg_notify($1, '')", &[&NOTIFY_CHANNEL])
                .await?;
        }
        if !elector.is_leading() {
            return Ok(());
        }
        let dead_after = cfg.workers.lease.get().as_secs_f64() * 3.0;
        let reaped = s
            .query(
                "DELETE FROM instances WHERE heartbeat_at < now() - make_interval(secs => $1) RETURNING id",
                &[&dead_after],
            )
            .await?;
        drop(s);
        for r in &reaped {
            let id: String = r.get(0);
            tracing::warn!(instance = %id, "reaped a dead instance");
        }
        if elector.is_leading() {
            self.cascade().await;
        }
        Ok(())
    }

    /// Tasks running here right now.
    pub fn running_here(&self) -> usize {
        self.inner.total.load(Ordering::Relaxed)
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
