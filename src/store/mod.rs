//! The task store: tasks, objectives and their steps, task events, and the one state
//! machine every status change goes through. All access is through [`Db`] sessions.
//!
//! Status changes are a single conditional `UPDATE ... WHERE status = ANY(allowed)`; the
//! allowed set comes from [`TaskStatus::allowed_from`], so the rules live in one place and
//! a concurrent writer can never slip an illegal transition past a read-then-write race.
//! When the update matches nothing, a follow-up read tells "no such task" from "illegal".

mod usage;

pub use usage::Usage;

mod events;

pub use events::{MAX_EVENTS_PER_TASK, TaskEvent};

mod enqueue;

pub use enqueue::{Enqueued, MAX_BULK_ITEMS};

pub mod activity;
pub mod leader;
mod leases;
mod objectives;
mod queue;
pub mod rate_limit;
mod retention;
mod schedules;
mod task;
mod view;
pub mod watchdog;

pub use crate::task_state::TaskStatus;
pub use leases::{Claimed, OutcomeRow};
pub use objectives::{NewObjective, NewStep, Objective, ObjectiveStatus, validate_objective};
pub use queue::{MAX_EXTRA_ATTEMPTS, PausedAgent, RetryFilter};
pub use retention::{Deleted, RetentionAges};
pub use schedules::{Fired, ScheduledTask};
pub(crate) use task::TASK_COLUMNS;
pub use task::{MAX_NAME_LEN, MAX_STEPS, NewTask, Task, UniqueScope};
pub use view::{DbView, QueueView, STATUS_INSTANCE_SILENCE, VIEW_LIST_MAX};

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::db::tracker::Owner;
use crate::db::{Db, DbError, Session};

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
    #[error("task {id} cannot be retried: {reason}")]
    NotRetryable { id: i64, reason: String },
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

    /// Whether the server refused a statement for what a row holds (SQLSTATE class 22, a
    /// data exception such as NUL in text; 23, a constraint; 54, a program limit such as
    /// nesting or size), or the store refused a row itself: splitting a batch isolates the
    /// row. A time-out, a lock time-out, a lost connection or a closed pool say nothing
    /// about any row.
    pub fn is_row_refusal(&self) -> bool {
        match self {
            StoreError::Db(DbError::Query(e)) => e
                .code()
                .is_some_and(|c| matches!(&c.code()[..2], "22" | "23" | "54")),
            StoreError::IllegalTransition { .. } | StoreError::Invalid { .. } => true,
            _ => false,
        }
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
    /// For running → queued: the attempt that ends is not counted (a snooze): `attempts`
    /// goes back down by one.
    pub give_back_attempt: bool,
}

#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub status: Option<TaskStatus>,
    /// Only tasks of this run slot.
    pub slot_id: Option<String>,
    pub objective_id: Option<i64>,
    /// Only tasks of this agent.
    pub agent: Option<String>,
    /// Return tasks with id greater than this (keyset pagination).
    pub after_id: Option<i64>,
    pub limit: Option<i64>,
}

/// Most rows one list call returns.
pub const MAX_LIST_LIMIT: i64 = 1000;

/// Persistent tasks and objectives. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
    default_max_attempts: i32,
    /// Set for a store used on behalf of one task: its sessions carry the task's id and
    /// cancel token, so the supervisor can cancel the task through them.
    owner: Option<Owner>,
}

/// The task list's statement: `$1` status, `$2` run slot, `$3` objective, `$4` after id,
/// `$5` limit, `$6` byte budget, `$7` agent (each filter NULL for none). Public so a test can
/// EXPLAIN it at 100,000 rows: every filter walks an index in id order
/// (`tasks_status_idx`, `tasks_session_idx`, `tasks_objective_idx`, `tasks_agent_idx`).
pub fn list_tasks_sql() -> String {
    format!(
        "WITH page AS ( \
           SELECT id, octet_length(payload::text) \
                  + COALESCE(octet_length(result::text), 0) AS bytes \
           FROM taskwarden.tasks \
           WHERE ($1::text IS NULL OR status = $1) \
             AND ($2::text IS NULL OR session_id = $2) \
             AND ($3::bigint IS NULL OR objective_id = $3) \
             AND ($7::text IS NULL OR agent = $7) \
             AND id > COALESCE($4::bigint, 0) \
           ORDER BY id LIMIT $5), \
         sized AS (SELECT id, sum(bytes) OVER (ORDER BY id) - bytes AS before, \
                          count(*) OVER () AS n FROM page) \
         SELECT {TASK_COLUMNS}, sized.n FROM sized JOIN taskwarden.tasks USING (id) \
         WHERE sized.before < $6 OR sized.before = 0 ORDER BY id"
    )
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

    /// Queues a task; with a unique key held by another task, returns that one instead
    /// (see [`Store::enqueue`] to learn which).
    pub async fn create_task(&self, t: &NewTask) -> Result<Task, StoreError> {
        Ok(self.enqueue(t).await?.task)
    }

    /// Creates a task already running under `lease_owner` (a slot run that starts at
    /// once). Insert and queued → running happen in one transaction, so no worker can
    /// claim the row in between.
    pub async fn create_running(
        &self,
        t: &NewTask,
        lease_owner: &str,
        lease: Duration,
    ) -> Result<Task, StoreError> {
        t.validate("")?;
        t.no_unique_key("", "a run slot's task")?;
        let allowed = TaskStatus::allowed_from(TaskStatus::Running);
        let lease_ms = lease.as_millis().min(i64::MAX as u128) as i64;
        let mut s = self.session("store.create_running").await?;
        let tx = s.transaction().await?;
        let row = tx
            .query_one(
                "INSERT INTO taskwarden.tasks (agent, payload, session_id, priority, max_attempts, run_after) \
                 VALUES ($1, $2, $3, $4, $5, now()) RETURNING id",
                &[
                    &t.agent,
                    &t.payload,
                    &t.slot_id,
                    &t.priority,
                    &t.max_attempts.unwrap_or(self.default_max_attempts),
                ],
            )
            .await?;
        let id: i64 = row.try_get(0)?;
        let row = tx
            .query_one(
                &format!(
                    "UPDATE taskwarden.tasks SET status = 'running', attempts = attempts + 1, started_at = now(), \
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

    pub async fn get_task(&self, id: i64) -> Result<Task, StoreError> {
        let s = self.session("store.get_task").await?;
        let row = s
            .query_opt(
                &format!("SELECT {TASK_COLUMNS} FROM taskwarden.tasks WHERE id = $1"),
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
                &list_tasks_sql(),
                &[
                    &status,
                    &f.slot_id,
                    &f.objective_id,
                    &f.after_id,
                    &limit,
                    &budget,
                    &f.agent,
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
                    "UPDATE taskwarden.tasks SET status = $2, updated_at = now(), \
                       attempts = greatest(attempts + CASE WHEN $2 = 'running' THEN 1 ELSE 0 END \
                         - CASE WHEN $10 AND $2 = 'queued' THEN 1 ELSE 0 END, 0), \
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
                    &args.give_back_attempt,
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
                "SELECT status, lease_owner FROM taskwarden.tasks WHERE id = $1",
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

    /// Puts every task this instance holds as running back in the queue (graceful
    /// shutdown). The interrupted attempt is not counted against the task.
    pub async fn requeue_running_owned_by(&self, lease_owner: &str) -> Result<u64, StoreError> {
        debug_assert!(TaskStatus::Running.can_transition_to(TaskStatus::Queued));
        let s = self.session("store.requeue_running").await?;
        let n = s
            .execute(
                "UPDATE taskwarden.tasks SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL, \
                   attempts = GREATEST(attempts - 1, 0), updated_at = now() \
                 WHERE status = 'running' AND lease_owner = $1",
                &[&lease_owner],
            )
            .await?;
        Ok(n)
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
        // Out of a final status only an explicit retry leads, and only back to the queue.
        assert_eq!(
            TaskStatus::retry_allowed_from(),
            vec!["failed", "cancelled", "timed_out"]
        );
        assert!(!Succeeded.can_retry());
        assert!(!Queued.can_retry() && !Running.can_retry());
        assert!(!Queued.can_transition_to(Queued));
        assert_eq!(
            TaskStatus::allowed_from(Cancelled),
            vec!["queued", "running"]
        );
        for s in TaskStatus::ALL {
            assert_eq!(s.as_str().parse::<TaskStatus>(), Ok(s));
        }
    }
}
