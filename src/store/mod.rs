//! The task store: tasks, objectives and their steps, task events, and the one state
//! machine every status change goes through. All access is through [`Db`] sessions.
//!
//! Status changes are a single conditional `UPDATE ... WHERE status = ANY(allowed)`; the
//! allowed set comes from [`TaskStatus::allowed_from`], so the rules live in one place and
//! a concurrent writer can never slip an illegal transition past a read-then-write race.
//! When the update matches nothing, a follow-up read tells "no such task" from "illegal".

mod leases;

pub use leases::{END_LEASE, NOTIFY_CHANNEL, TIME_OUT_OVERDUE_SQL};

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;

use crate::db::{Db, DbError, Session};
use crate::tracker::Owner;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 6] = [
        TaskStatus::Queued,
        TaskStatus::Running,
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
        TaskStatus::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Running => "running",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
            TaskStatus::TimedOut => "timed_out",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Succeeded
                | TaskStatus::Failed
                | TaskStatus::Cancelled
                | TaskStatus::TimedOut
        )
    }

    /// The state machine: queued → running → succeeded | failed | cancelled | timed_out;
    /// running → queued (retry, lease expiry, shutdown); queued → cancelled.
    pub fn can_transition_to(self, to: TaskStatus) -> bool {
        use TaskStatus::*;
        matches!(
            (self, to),
            (Queued, Running)
                | (Queued, Cancelled)
                | (Running, Succeeded)
                | (Running, Failed)
                | (Running, Cancelled)
                | (Running, TimedOut)
                | (Running, Queued)
        )
    }

    /// Every status from which `to` may be reached.
    pub fn allowed_from(to: TaskStatus) -> Vec<&'static str> {
        TaskStatus::ALL
            .iter()
            .filter(|from| from.can_transition_to(to))
            .map(|s| s.as_str())
            .collect()
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskStatus::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown task status {s:?}"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("task {0} not found")]
    TaskNotFound(i64),
    #[error("objective {0} not found")]
    ObjectiveNotFound(i64),
    #[error("task {id}: illegal status transition {from} -> {to}")]
    IllegalTransition {
        id: i64,
        from: TaskStatus,
        to: TaskStatus,
    },
    #[error("task {id}: lease no longer ours (held by {holder:?})")]
    LeaseLost { id: i64, holder: Option<String> },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("stored task row is malformed: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// See [`DbError::is_transient`].
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Db(e) if e.is_transient())
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Db(DbError::Query(e))
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> StoreError {
    StoreError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: i64,
    pub objective_id: Option<i64>,
    pub step_key: Option<String>,
    pub depends_on: Vec<String>,
    pub agent: String,
    pub payload: serde_json::Value,
    pub session_id: Option<String>,
    pub status: TaskStatus,
    pub priority: i32,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_after: DateTime<Utc>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: f64,
    /// The agent's final reply, once it succeeded.
    pub result: Option<serde_json::Value>,
}

/// Columns read back for a [`Task`]; `cost_usd` leaves numeric as float8 for the client.
pub(crate) const TASK_COLUMNS: &str = "id, objective_id, step_key, depends_on, agent, payload, session_id, status, \
     priority, attempts, max_attempts, run_after, lease_owner, lease_expires_at, created_at, \
     updated_at, started_at, finished_at, error, prompt_tokens, completion_tokens, cost_usd::float8 AS cost_usd, result";

impl Task {
    pub(crate) fn from_row(r: &Row) -> Result<Task, StoreError> {
        let status: String = r.try_get("status")?;
        Ok(Task {
            id: r.try_get("id")?,
            objective_id: r.try_get("objective_id")?,
            step_key: r.try_get("step_key")?,
            depends_on: r.try_get("depends_on")?,
            agent: r.try_get("agent")?,
            payload: r.try_get("payload")?,
            session_id: r.try_get("session_id")?,
            status: status.parse().map_err(StoreError::Corrupt)?,
            priority: r.try_get("priority")?,
            attempts: r.try_get("attempts")?,
            max_attempts: r.try_get("max_attempts")?,
            run_after: r.try_get("run_after")?,
            lease_owner: r.try_get("lease_owner")?,
            lease_expires_at: r.try_get("lease_expires_at")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
            error: r.try_get("error")?,
            prompt_tokens: r.try_get("prompt_tokens")?,
            completion_tokens: r.try_get("completion_tokens")?,
            cost_usd: r.try_get("cost_usd")?,
            result: r.try_get("result")?,
        })
    }
}

/// Longest accepted agent name, session id and step key.
pub const MAX_NAME_LEN: usize = 200;
/// Most steps one objective may have.
pub const MAX_STEPS: usize = 1000;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NewTask {
    pub agent: String,
    pub payload: serde_json::Value,
    pub session_id: Option<String>,
    pub priority: i32,
    /// Defaults to `[workers] max_attempts` when absent.
    pub max_attempts: Option<i32>,
    /// Earliest start; now when absent.
    pub run_after: Option<DateTime<Utc>>,
}

impl NewTask {
    pub fn new(agent: impl Into<String>, payload: serde_json::Value) -> Self {
        NewTask {
            agent: agent.into(),
            payload,
            ..Default::default()
        }
    }

    fn validate(&self, prefix: &str) -> Result<(), StoreError> {
        let f = |k: &str| format!("{prefix}{k}");
        if self.agent.is_empty() || self.agent.len() > MAX_NAME_LEN {
            return Err(invalid(
                f("agent"),
                format!("must be 1..={MAX_NAME_LEN} characters"),
            ));
        }
        if let Some(s) = &self.session_id
            && (s.is_empty() || s.len() > MAX_NAME_LEN)
        {
            return Err(invalid(
                f("session_id"),
                format!("must be 1..={MAX_NAME_LEN} characters"),
            ));
        }
        if let Some(m) = self.max_attempts
            && !(1..=1000).contains(&m)
        {
            return Err(invalid(f("max_attempts"), "must be in 1..=1000"));
        }
        if let Some(t) = self.run_after {
            use chrono::Datelike;
            if !(1970..=9999).contains(&t.year()) {
                return Err(invalid(
                    f("run_after"),
                    "must be a time between the years 1970 and 9999",
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NewStep {
    pub key: String,
    pub depends_on: Vec<String>,
    #[serde(flatten)]
    pub task: NewTask,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NewObjective {
    pub title: String,
    pub steps: Vec<NewStep>,
    /// A planner agent that returns the steps, instead of `steps`.
    pub planner: Option<String>,
    /// Given to the planner, with the title.
    pub input: serde_json::Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectiveStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl ObjectiveStatus {
    /// Derived from the steps: any failure or timeout fails it; all succeeded succeeds;
    /// otherwise any step started means running; all ended otherwise means cancelled.
    pub fn derive(tasks: &[Task]) -> ObjectiveStatus {
        use TaskStatus as T;
        if tasks
            .iter()
            .any(|t| matches!(t.status, T::Failed | T::TimedOut))
        {
            ObjectiveStatus::Failed
        } else if !tasks.is_empty() && tasks.iter().all(|t| t.status == T::Succeeded) {
            ObjectiveStatus::Succeeded
        } else if tasks.iter().all(|t| t.status.is_terminal()) {
            ObjectiveStatus::Cancelled
        } else if tasks.iter().any(|t| t.status != T::Queued) {
            ObjectiveStatus::Running
        } else {
            ObjectiveStatus::Queued
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Objective {
    pub id: i64,
    pub title: String,
    pub status: ObjectiveStatus,
    pub created_at: DateTime<Utc>,
    pub tasks: Vec<Task>,
}

/// Checks an objective's steps before anything is written: keys unique and non-empty,
/// dependencies known, no cycle, and (if given) every agent known.
pub fn validate_objective(
    o: &NewObjective,
    known_agents: Option<&BTreeSet<String>>,
) -> Result<(), StoreError> {
    if o.steps.is_empty() {
        return Err(invalid("steps", "an objective needs at least one step"));
    }
    if o.steps.len() > MAX_STEPS {
        return Err(invalid("steps", format!("at most {MAX_STEPS} steps")));
    }
    let mut keys = HashSet::new();
    for (i, s) in o.steps.iter().enumerate() {
        if s.key.is_empty() || s.key.len() > MAX_NAME_LEN {
            return Err(invalid(
                format!("steps[{i}].key"),
                format!("must be 1..={MAX_NAME_LEN} characters"),
            ));
        }
        if !keys.insert(s.key.as_str()) {
            return Err(invalid(
                format!("steps[{i}].key"),
                format!("duplicate step key {:?}", s.key),
            ));
        }
        s.task.validate(&format!("steps[{i}]."))?;
        if let Some(agents) = known_agents
            && !agents.contains(&s.task.agent)
        {
            return Err(invalid(
                format!("steps[{i}].agent"),
                format!("unknown agent {:?}", s.task.agent),
            ));
        }
    }
    for (i, s) in o.steps.iter().enumerate() {
        for d in &s.depends_on {
            if !keys.contains(d.as_str()) {
                return Err(invalid(
                    format!("steps[{i}].depends_on"),
                    format!("unknown step key {d:?}"),
                ));
            }
            if d == &s.key {
                return Err(invalid(
                    format!("steps[{i}].depends_on"),
                    "a step cannot depend on itself",
                ));
            }
        }
        let mut seen = HashSet::new();
        if let Some(d) = s.depends_on.iter().find(|d| !seen.insert(d.as_str())) {
            return Err(invalid(
                format!("steps[{i}].depends_on"),
                format!("duplicate dependency {d:?}"),
            ));
        }
    }
    // Kahn's algorithm: whatever cannot be ordered is on a cycle.
    let mut indegree: HashMap<&str, usize> = o
        .steps
        .iter()
        .map(|s| (s.key.as_str(), s.depends_on.len()))
        .collect();
    let mut ready: Vec<&str> = indegree
        .iter()
        .filter(|(_, d)| **d == 0)
        .map(|(k, _)| *k)
        .collect();
    let mut ordered = 0;
    while let Some(k) = ready.pop() {
        ordered += 1;
        for s in o
            .steps
            .iter()
            .filter(|s| s.depends_on.iter().any(|d| d == k))
        {
            if let Some(d) = indegree.get_mut(s.key.as_str()) {
                *d -= 1;
                if *d == 0 {
                    ready.push(s.key.as_str());
                }
            }
        }
    }
    if ordered < o.steps.len() {
        let mut on_cycle: Vec<&str> = indegree
            .iter()
            .filter(|(_, d)| **d > 0)
            .map(|(k, _)| *k)
            .collect();
        on_cycle.sort_unstable();
        return Err(invalid(
            "steps",
            format!("dependency cycle among steps {on_cycle:?}"),
        ));
    }
    Ok(())
}

/// Extra fields written with a status change.
#[derive(Debug, Clone, Default)]
pub struct TransitionArgs {
    /// For → running: the instance taking the lease, and its length.
    pub lease_owner: Option<String>,
    pub lease: Option<Duration>,
    /// Kept on the row (the last attempt's error).
    pub error: Option<String>,
    /// For → queued: when it may run again (retry backoff).
    pub run_after: Option<DateTime<Utc>>,
    /// Only if this instance still holds the lease (a worker finishing its own task).
    pub expected_owner: Option<String>,
    /// For → succeeded: the agent's reply.
    pub result: Option<serde_json::Value>,
}

/// Token usage reported by an agent, added to the task's totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: f64,
}

#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub status: Option<TaskStatus>,
    pub session_id: Option<String>,
    pub objective_id: Option<i64>,
    /// Return tasks with id greater than this (keyset pagination).
    pub after_id: Option<i64>,
    pub limit: Option<i64>,
}

/// Most rows one list call returns.
pub const MAX_LIST_LIMIT: i64 = 1000;

/// Most events stored per task; later ones are dropped (and the drop is logged).
pub const MAX_EVENTS_PER_TASK: i64 = 1000;

/// One stored task event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskEvent {
    pub id: i64,
    pub task_id: i64,
    pub kind: String,
    pub data: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

impl TaskEvent {
    fn from_row(r: &Row) -> Result<TaskEvent, StoreError> {
        Ok(TaskEvent {
            id: r.try_get("id")?,
            task_id: r.try_get("task_id")?,
            kind: r.try_get("kind")?,
            data: r.try_get("data")?,
            created_at: r.try_get("created_at")?,
        })
    }
}

/// Persistent tasks and objectives. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
    default_max_attempts: i32,
    /// Set for a store used on behalf of one task: its sessions carry the task's id and
    /// cancel token, so the supervisor can cancel the task through them.
    owner: Option<Owner>,
}

impl Store {
    pub fn new(db: Db, default_max_attempts: u32) -> Self {
        Store {
            db,
            default_max_attempts: default_max_attempts.clamp(1, 1000) as i32,
            owner: None,
        }
    }

    /// This store, with every session it opens owned by `owner`.
    pub fn for_task(&self, owner: Owner) -> Store {
        Store {
            owner: Some(owner),
            ..self.clone()
        }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    #[track_caller]
    fn session(
        &self,
        label: &'static str,
    ) -> impl Future<Output = Result<Session, DbError>> + Send + 'static {
        match &self.owner {
            Some(o) => {
                let f = self.db.session_for_task(label, o.clone());
                futures_util::future::Either::Left(f)
            }
            None => futures_util::future::Either::Right(self.db.session(label)),
        }
    }

    /// Stores an event for a task, unless it already has [`MAX_EVENTS_PER_TASK`].
    /// Returns the event, or `None` when the bound dropped it.
    pub async fn add_event(
        &self,
        task_id: i64,
        kind: &str,
        data: &serde_json::Value,
    ) -> Result<Option<TaskEvent>, StoreError> {
        let s = self.session("store.add_event").await?;
        let row = s
            .query_opt(
                "INSERT INTO task_events (task_id, kind, data) \
                 SELECT $1, $2, $3 WHERE (SELECT count(*) FROM task_events WHERE task_id = $1) < $4 \
                 RETURNING id, task_id, kind, data, created_at",
                &[&task_id, &kind, data, &MAX_EVENTS_PER_TASK],
            )
            .await?;
        row.as_ref().map(TaskEvent::from_row).transpose()
    }

    /// Events of one task after `after_id`, oldest first (at most `limit`).
    pub async fn task_events(
        &self,
        task_id: i64,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<TaskEvent>, StoreError> {
        let s = self.session("store.task_events").await?;
        let rows = s
            .query(
                "SELECT id, task_id, kind, data, created_at FROM task_events \
                 WHERE task_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                &[&task_id, &after_id, &limit.clamp(1, MAX_LIST_LIMIT)],
            )
            .await?;
        rows.iter().map(TaskEvent::from_row).collect()
    }

    /// Events of every task of a session after `after_id` (resuming an event stream).
    pub async fn session_events(
        &self,
        session_id: &str,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<TaskEvent>, StoreError> {
        let s = self.session("store.session_events").await?;
        let rows = s
            .query(
                "SELECT e.id, e.task_id, e.kind, e.data, e.created_at FROM task_events e \
                 JOIN tasks t ON t.id = e.task_id \
                 WHERE t.session_id = $1 AND e.id > $2 ORDER BY e.id LIMIT $3",
                &[&session_id, &after_id, &limit.clamp(1, MAX_LIST_LIMIT)],
            )
            .await?;
        rows.iter().map(TaskEvent::from_row).collect()
    }

    pub async fn create_task(&self, t: &NewTask) -> Result<Task, StoreError> {
        t.validate("")?;
        let s = self.session("store.create_task").await?;
        let row = s
            .query_one(
                &format!(
                    "INSERT INTO tasks (agent, payload, session_id, priority, max_attempts, run_after) \
                     VALUES ($1, $2, $3, $4, $5, COALESCE($6, now())) RETURNING {TASK_COLUMNS}"
                ),
                &[
                    &t.agent,
                    &t.payload,
                    &t.session_id,
                    &t.priority,
                    &t.max_attempts.unwrap_or(self.default_max_attempts),
                    &t.run_after,
                ],
            )
            .await?;
        let task = Task::from_row(&row)?;
        tracing::debug!(task_id = task.id, agent = %task.agent, "task created");
        Ok(task)
    }

    /// Creates a task already running under `lease_owner` (a session run that starts at
    /// once). Insert and queued → running happen in one transaction, so no worker can
    /// claim the row in between.
    pub async fn create_running(
        &self,
        t: &NewTask,
        lease_owner: &str,
        lease: Duration,
    ) -> Result<Task, StoreError> {
        t.validate("")?;
        let allowed = TaskStatus::allowed_from(TaskStatus::Running);
        let lease_ms = lease.as_millis().min(i64::MAX as u128) as i64;
        let mut s = self.session("store.create_running").await?;
        let tx = s.transaction().await?;
        let row = tx
            .query_one(
                "INSERT INTO tasks (agent, payload, session_id, priority, max_attempts, run_after) \
                 VALUES ($1, $2, $3, $4, $5, now()) RETURNING id",
                &[
                    &t.agent,
                    &t.payload,
                    &t.session_id,
                    &t.priority,
                    &t.max_attempts.unwrap_or(self.default_max_attempts),
                ],
            )
            .await?;
        let id: i64 = row.try_get(0)?;
        let row = tx
            .query_one(
                &format!(
                    "UPDATE tasks SET status = 'running', attempts = attempts + 1, started_at = now(), \
                       updated_at = now(), lease_owner = $2, \
                       lease_expires_at = now() + make_interval(secs => $3::bigint / 1000.0) \
                     WHERE id = $1 AND status = ANY($4) RETURNING {TASK_COLUMNS}"
                ),
                &[&id, &lease_owner, &lease_ms, &allowed],
            )
            .await?;
        tx.commit().await?;
        Task::from_row(&row)
    }

    /// Cancels queued tasks whose dependency ended without succeeding, level by level
    /// until none is left; returns the cancelled ids.
    pub async fn cancel_blocked_dependants(&self) -> Result<Vec<i64>, StoreError> {
        let allowed = TaskStatus::allowed_from(TaskStatus::Cancelled);
        let s = self.session("store.cancel_blocked_dependants").await?;
        let mut all = Vec::new();
        for _ in 0..MAX_STEPS {
            let rows = s
                .query(
                    "UPDATE tasks t SET status = 'cancelled', finished_at = now(), updated_at = now(), \
                       error = 'dependency ' || d.step_key || ' ended ' || d.status \
                     FROM tasks d \
                     WHERE t.status = 'queued' AND t.status = ANY($1) AND t.objective_id IS NOT NULL \
                       AND d.objective_id = t.objective_id AND d.step_key = ANY(t.depends_on) \
                       AND d.status IN ('failed', 'cancelled', 'timed_out') \
                     RETURNING t.id",
                    &[&allowed],
                )
                .await?;
            if rows.is_empty() {
                break;
            }
            for r in rows {
                all.push(r.try_get(0)?);
            }
        }
        Ok(all)
    }

    /// Adds planned steps to an objective, all or nothing. They may depend on each other;
    /// their keys must be new in the objective.
    pub async fn add_steps(
        &self,
        objective_id: i64,
        steps: &[NewStep],
        known_agents: Option<&BTreeSet<String>>,
    ) -> Result<Vec<Task>, StoreError> {
        validate_objective(
            &NewObjective {
                steps: steps.to_vec(),
                ..Default::default()
            },
            known_agents,
        )?;
        let mut s = self.session("store.add_steps").await?;
        let tx = s.transaction().await?;
        let existing: Vec<String> = tx
            .query(
                "SELECT step_key FROM tasks WHERE objective_id = $1 AND step_key IS NOT NULL",
                &[&objective_id],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if let Some((i, st)) = steps
            .iter()
            .enumerate()
            .find(|(_, st)| existing.contains(&st.key))
        {
            return Err(invalid(
                format!("steps[{i}].key"),
                format!("step key {:?} already exists in the objective", st.key),
            ));
        }
        let mut tasks = Vec::with_capacity(steps.len());
        for step in steps {
            let t = &step.task;
            let row = tx
                .query_one(
                    &format!(
                        "INSERT INTO tasks (objective_id, step_key, depends_on, agent, payload, session_id, \
                         priority, max_attempts, run_after) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, COALESCE($9, now())) RETURNING {TASK_COLUMNS}"
                    ),
                    &[
                        &objective_id,
                        &step.key,
                        &step.depends_on,
                        &t.agent,
                        &t.payload,
                        &t.session_id,
                        &t.priority,
                        &t.max_attempts.unwrap_or(self.default_max_attempts),
                        &t.run_after,
                    ],
                )
                .await?;
            tasks.push(Task::from_row(&row)?);
        }
        tx.commit().await?;
        Ok(tasks)
    }

    /// Creates an objective and all its steps in one transaction: all or nothing.
    pub async fn create_objective(
        &self,
        o: &NewObjective,
        known_agents: Option<&BTreeSet<String>>,
    ) -> Result<Objective, StoreError> {
        validate_objective(o, known_agents)?;
        let mut s = self.session("store.create_objective").await?;
        let tx = s.transaction().await?;
        let row = tx
            .query_one(
                "INSERT INTO objectives (title) VALUES ($1) RETURNING id, title, created_at",
                &[&o.title],
            )
            .await?;
        let id: i64 = row.try_get("id")?;
        let mut tasks = Vec::with_capacity(o.steps.len());
        for step in &o.steps {
            let t = &step.task;
            let row = tx
                .query_one(
                    &format!(
                        "INSERT INTO tasks (objective_id, step_key, depends_on, agent, payload, session_id, \
                         priority, max_attempts, run_after) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, COALESCE($9, now())) RETURNING {TASK_COLUMNS}"
                    ),
                    &[
                        &id,
                        &step.key,
                        &step.depends_on,
                        &t.agent,
                        &t.payload,
                        &t.session_id,
                        &t.priority,
                        &t.max_attempts.unwrap_or(self.default_max_attempts),
                        &t.run_after,
                    ],
                )
                .await?;
            tasks.push(Task::from_row(&row)?);
        }
        tx.commit().await?;
        Ok(Objective {
            id,
            title: row.try_get("title")?,
            status: ObjectiveStatus::derive(&tasks),
            created_at: row.try_get("created_at")?,
            tasks,
        })
    }

    pub async fn get_objective(&self, id: i64) -> Result<Objective, StoreError> {
        let s = self.session("store.get_objective").await?;
        let row = s
            .query_opt(
                "SELECT id, title, created_at FROM objectives WHERE id = $1",
                &[&id],
            )
            .await?
            .ok_or(StoreError::ObjectiveNotFound(id))?;
        let rows = s
            .query(
                &format!("SELECT {TASK_COLUMNS} FROM tasks WHERE objective_id = $1 ORDER BY id"),
                &[&id],
            )
            .await?;
        let tasks: Vec<Task> = rows.iter().map(Task::from_row).collect::<Result<_, _>>()?;
        Ok(Objective {
            id,
            title: row.try_get("title")?,
            status: ObjectiveStatus::derive(&tasks),
            created_at: row.try_get("created_at")?,
            tasks,
        })
    }

    pub async fn get_task(&self, id: i64) -> Result<Task, StoreError> {
        let s = self.session("store.get_task").await?;
        let row = s
            .query_opt(
                &format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1"),
                &[&id],
            )
            .await?
            .ok_or(StoreError::TaskNotFound(id))?;
        Task::from_row(&row)
    }

    /// A page of tasks in id order: at most `limit` rows and, past the first row, at most
    /// `max_bytes` of payload and result JSON (measured by the server, so large rows are
    /// never all loaded here). Returns the page and whether it was cut by the byte budget.
    pub async fn list_tasks(
        &self,
        f: &TaskFilter,
        max_bytes: u64,
    ) -> Result<(Vec<Task>, bool), StoreError> {
        let limit = f.limit.unwrap_or(100);
        if !(1..=MAX_LIST_LIMIT).contains(&limit) {
            return Err(invalid("limit", format!("must be in 1..={MAX_LIST_LIMIT}")));
        }
        let status = f.status.map(|s| s.as_str());
        let budget = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let s = self.session("store.list_tasks").await?;
        let rows = s
            .query(
                &format!(
                    "WITH page AS ( \
                       SELECT id, octet_length(payload::text) \
                              + COALESCE(octet_length(result::text), 0) AS bytes \
                       FROM tasks \
                       WHERE ($1::text IS NULL OR status = $1) \
                         AND ($2::text IS NULL OR session_id = $2) \
                         AND ($3::bigint IS NULL OR objective_id = $3) \
                         AND id > COALESCE($4::bigint, 0) \
                       ORDER BY id LIMIT $5), \
                     sized AS (SELECT id, sum(bytes) OVER (ORDER BY id) - bytes AS before, \
                                      count(*) OVER () AS n FROM page) \
                     SELECT {TASK_COLUMNS}, sized.n FROM sized JOIN tasks USING (id) \
                     WHERE sized.before < $6 OR sized.before = 0 ORDER BY id"
                ),
                &[
                    &status,
                    &f.session_id,
                    &f.objective_id,
                    &f.after_id,
                    &limit,
                    &budget,
                ],
            )
            .await?;
        let cut = rows
            .first()
            .is_some_and(|r| r.get::<_, i64>("n") > rows.len() as i64);
        let tasks = rows.iter().map(Task::from_row).collect::<Result<_, _>>()?;
        Ok((tasks, cut))
    }

    /// Moves a task to `to` if the state machine allows it from its current status.
    pub async fn transition(
        &self,
        id: i64,
        to: TaskStatus,
        args: &TransitionArgs,
    ) -> Result<Task, StoreError> {
        let allowed = TaskStatus::allowed_from(to);
        let lease_ms = args
            .lease
            .map(|d| d.as_millis().min(i64::MAX as u128) as i64);
        let s = self.session("store.transition").await?;
        let row = s
            .query_opt(
                &format!(
                    "UPDATE tasks SET status = $2, updated_at = now(), \
                       attempts = attempts + CASE WHEN $2 = 'running' THEN 1 ELSE 0 END, \
                       started_at = CASE WHEN $2 = 'running' THEN now() ELSE started_at END, \
                       finished_at = CASE WHEN $2 IN ('succeeded','failed','cancelled','timed_out') THEN now() END, \
                       lease_owner = CASE WHEN $2 = 'running' THEN $4 END, \
                       lease_expires_at = CASE WHEN $2 = 'running' THEN now() + make_interval(secs => $5::bigint / 1000.0) END, \
                       error = COALESCE($6, error), \
                       run_after = COALESCE($7, run_after), \
                       result = COALESCE($9, result) \
                     WHERE id = $1 AND status = ANY($3) \
                       AND ($8::text IS NULL OR lease_owner = $8) RETURNING {TASK_COLUMNS}"
                ),
                &[
                    &id,
                    &to.as_str(),
                    &allowed,
                    &args.lease_owner,
                    &lease_ms.unwrap_or(0),
                    &args.error,
                    &args.run_after,
                    &args.expected_owner,
                    &args.result,
                ],
            )
            .await?;
        if let Some(row) = row {
            let t = Task::from_row(&row)?;
            tracing::debug!(task_id = id, status = %to, "task status changed");
            return Ok(t);
        }
        let cur = s
            .query_opt(
                "SELECT status, lease_owner FROM tasks WHERE id = $1",
                &[&id],
            )
            .await?
            .ok_or(StoreError::TaskNotFound(id))?;
        let from: TaskStatus = cur
            .try_get::<_, String>(0)?
            .parse()
            .map_err(StoreError::Corrupt)?;
        let holder: Option<String> = cur.try_get(1)?;
        if from.can_transition_to(to)
            && args.expected_owner.is_some()
            && holder != args.expected_owner
        {
            return Err(StoreError::LeaseLost { id, holder });
        }
        Err(StoreError::IllegalTransition { id, from, to })
    }

    /// Adds reported LLM usage to the task's totals; returns the new totals.
    pub async fn record_usage(&self, id: i64, u: Usage) -> Result<Usage, StoreError> {
        if u.prompt_tokens < 0 {
            return Err(invalid("usage.prompt_tokens", "must not be negative"));
        }
        if u.completion_tokens < 0 {
            return Err(invalid("usage.completion_tokens", "must not be negative"));
        }
        if !u.cost_usd.is_finite() || u.cost_usd < 0.0 {
            return Err(invalid(
                "usage.cost_usd",
                "must be a finite, non-negative number",
            ));
        }
        let s = self.session("store.record_usage").await?;
        let row = s
            .query_opt(
                "UPDATE tasks SET prompt_tokens = prompt_tokens + $2, \
                   completion_tokens = completion_tokens + $3, \
                   cost_usd = cost_usd + $4::float8::numeric, updated_at = now() \
                 WHERE id = $1 RETURNING prompt_tokens, completion_tokens, cost_usd::float8",
                &[&id, &u.prompt_tokens, &u.completion_tokens, &u.cost_usd],
            )
            .await?
            .ok_or(StoreError::TaskNotFound(id))?;
        Ok(Usage {
            prompt_tokens: row.try_get(0)?,
            completion_tokens: row.try_get(1)?,
            cost_usd: row.try_get(2)?,
        })
    }

    /// Puts every task this instance holds as running back in the queue (graceful
    /// shutdown). The interrupted attempt is not counted against the task.
    pub async fn requeue_running_owned_by(&self, lease_owner: &str) -> Result<u64, StoreError> {
        debug_assert!(TaskStatus::Running.can_transition_to(TaskStatus::Queued));
        let s = self.session("store.requeue_running").await?;
        let n = s
            .execute(
                "UPDATE tasks SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL, \
                   attempts = GREATEST(attempts - 1, 0), updated_at = now() \
                 WHERE status = 'running' AND lease_owner = $1",
                &[&lease_owner],
            )
            .await?;
        Ok(n)
    }

    /// Reads the [`DbView`] on a pooled session, waiting at most `wait` for one.
    pub async fn read_view(&self, wait: Duration) -> Result<DbView, StoreError> {
        let s = self.db.session_within("store.read_view", wait).await?;
        let counts = s.query(DbView::COUNTS_SQL, &[]).await?;
        let instances = s.query(DbView::INSTANCES_SQL, &[]).await?;
        Ok(DbView::from_rows(&counts, &instances))
    }

    /// Task counts by status (every status present, zero when none).
    pub async fn count_by_status(&self) -> Result<Vec<(TaskStatus, i64)>, StoreError> {
        let s = self.session("store.count_by_status").await?;
        let rows = s
            .query("SELECT status, count(*) FROM tasks GROUP BY status", &[])
            .await?;
        let mut counts: HashMap<String, i64> = HashMap::new();
        for r in rows {
            counts.insert(r.try_get(0)?, r.try_get(1)?);
        }
        Ok(TaskStatus::ALL
            .iter()
            .map(|s| (*s, counts.get(s.as_str()).copied().unwrap_or(0)))
            .collect())
    }
}

/// Task counts and instances as read at one moment: what `/v1/status` shows and the
/// supervisor's task gauges record. Kept with its time so a reader that cannot reach the
/// database (pool exhausted, link down) can still answer, saying how old it is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DbView {
    pub as_of: chrono::DateTime<chrono::Utc>,
    /// Every status, zero when none.
    pub tasks_by_status: std::collections::BTreeMap<String, i64>,
    pub oldest_running_seconds: f64,
    pub instances: Vec<serde_json::Value>,
}

impl DbView {
    pub const COUNTS_SQL: &str = "SELECT status, count(*), \
        extract(epoch FROM now() - min(started_at))::float8 FROM tasks GROUP BY status";
    pub const INSTANCES_SQL: &str = "SELECT i.id, i.hostname, i.pid, i.version, i.started_at, \
        i.heartbeat_at, COALESCE(l.leader_id = i.id AND l.expires_at > now(), false) \
        FROM instances i LEFT JOIN leader l ON true ORDER BY i.started_at";

    pub fn from_rows(counts: &[Row], instances: &[Row]) -> DbView {
        let mut tasks_by_status: std::collections::BTreeMap<String, i64> = TaskStatus::ALL
            .iter()
            .map(|st| (st.as_str().to_string(), 0))
            .collect();
        let mut oldest_running_seconds = 0.0;
        for r in counts {
            let status: String = r.get(0);
            if status == "running" {
                oldest_running_seconds = r.get::<_, Option<f64>>(2).unwrap_or(0.0);
            }
            tasks_by_status.insert(status, r.get(1));
        }
        DbView {
            as_of: chrono::Utc::now(),
            tasks_by_status,
            oldest_running_seconds,
            instances: instances
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "id": r.get::<_, String>(0), "hostname": r.get::<_, String>(1),
                        "pid": r.get::<_, i32>(2), "version": r.get::<_, String>(3),
                        "started_at": r.get::<_, chrono::DateTime<chrono::Utc>>(4),
                        "heartbeat_at": r.get::<_, chrono::DateTime<chrono::Utc>>(5),
                        "leader": r.get::<_, bool>(6),
                    })
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_machine_matches_design() {
        use TaskStatus::*;
        assert!(Queued.can_transition_to(Running));
        assert!(Queued.can_transition_to(Cancelled));
        assert!(Running.can_transition_to(Queued));
        for t in [Succeeded, Failed, Cancelled, TimedOut] {
            assert!(Running.can_transition_to(t));
            assert!(t.is_terminal());
            for to in TaskStatus::ALL {
                assert!(!t.can_transition_to(to), "{t} -> {to} must be illegal");
            }
        }
        assert!(!Queued.can_transition_to(Succeeded));
        assert!(!Queued.can_transition_to(Queued));
        assert_eq!(
            TaskStatus::allowed_from(Cancelled),
            vec!["queued", "running"]
        );
        for s in TaskStatus::ALL {
            assert_eq!(s.as_str().parse::<TaskStatus>(), Ok(s));
        }
    }

    fn step(key: &str, deps: &[&str]) -> NewStep {
        NewStep {
            key: key.into(),
            depends_on: deps.iter().map(|s| s.to_string()).collect(),
            task: NewTask::new("echo", serde_json::json!({})),
        }
    }

    fn field_of(r: Result<(), StoreError>) -> String {
        match r {
            Err(StoreError::Invalid { field, message }) => format!("{field}: {message}"),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn objective_validation_names_the_problem() {
        let ok = NewObjective {
            title: "t".into(),
            steps: vec![step("a", &[]), step("b", &["a"]), step("c", &["a", "b"])],
            ..Default::default()
        };
        validate_objective(&ok, None).unwrap();

        let cyc = NewObjective {
            title: "t".into(),
            steps: vec![
                step("a", &["c"]),
                step("b", &["a"]),
                step("c", &["b"]),
                step("d", &[]),
            ],
            ..Default::default()
        };
        let msg = field_of(validate_objective(&cyc, None));
        assert!(
            msg.contains("cycle") && msg.contains("\"a\"") && !msg.contains("\"d\""),
            "{msg}"
        );

        let unknown = NewObjective {
            title: "t".into(),
            steps: vec![step("a", &["zzz"])],
            ..Default::default()
        };
        assert!(field_of(validate_objective(&unknown, None)).starts_with("steps[0].depends_on"));

        let dup = NewObjective {
            title: "t".into(),
            steps: vec![step("a", &[]), step("a", &[])],
            ..Default::default()
        };
        assert!(field_of(validate_objective(&dup, None)).starts_with("steps[1].key"));

        let agents: BTreeSet<String> = ["other".to_string()].into();
        assert!(field_of(validate_objective(&ok, Some(&agents))).starts_with("steps[0].agent"));
    }
}

#[cfg(test)]
mod json_tests {
    use super::*;

    #[test]
    fn steps_parse_flat_and_refuse_unknown_fields() {
        let s: NewStep = serde_json::from_str(
            r#"{"key": "a", "agent": "x", "depends_on": ["b"], "payload": {"q": 1}}"#,
        )
        .unwrap();
        assert_eq!((s.key.as_str(), s.task.agent.as_str()), ("a", "x"));
        assert_eq!(s.task.payload, serde_json::json!({"q": 1}));
        let bad = serde_json::from_str::<NewStep>(r#"{"key": "a", "agent": "x", "bogus": 1}"#);
        assert!(bad.is_err(), "{bad:?}");
    }
}
