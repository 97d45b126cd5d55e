//! Operator controls over the queue: pausing an agent (a row in `paused_agents` that the
//! claim statement checks) and retrying tasks that ended without success — the one way
//! out of a final status (see `TaskStatus::can_retry` and docs/state_machine.md).

use super::MAX_LIST_LIMIT;
use super::Store;
use super::StoreError;
use super::events::MAX_EVENTS_PER_TASK;
use super::invalid;
use super::leases::END_LEASE;
use super::task::MAX_NAME_LEN;
use super::task::TASK_COLUMNS;
use super::task::Task;
use crate::task_state::TaskStatus;
use chrono::DateTime;
use chrono::Utc;
use serde::Serialize;
use tokio_postgres::Row;

/// A paused agent, as `paused_agents` holds it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PausedAgent {
    pub agent: String,
    pub paused_at: DateTime<Utc>,
    /// The instance that took the pause request.
    pub paused_by: String,
    pub reason: Option<String>,
}

impl PausedAgent {
    fn from_row(r: &Row) -> Result<PausedAgent, StoreError> {
        Ok(PausedAgent {
            agent: r.try_get("agent")?,
            paused_at: r.try_get("paused_at")?,
            paused_by: r.try_get("paused_by")?,
            reason: r.try_get("reason")?,
        })
    }
}

/// Which tasks a retry by filter takes: every retryable status, or one of them; every
/// agent, or one; at most `limit` (1..=[`MAX_LIST_LIMIT`]) in id order.
#[derive(Debug, Clone, Default)]
pub struct RetryFilter {
    pub agent: Option<String>,
    pub status: Option<TaskStatus>,
    pub limit: i64,
}

/// Most further attempts one retry may grant.
pub const MAX_EXTRA_ATTEMPTS: i32 = 1000;

/// Longest pause reason kept.
pub const MAX_REASON_LEN: usize = 1000;

/// The retry statement. `{pick}` selects the candidates (`pick_id`, `was`, `was_error`)
/// with their row locks; the update re-checks the allowed set (`$1`), grants `$2` more
/// attempts (`max_attempts` becomes at least `attempts + $2`, so a task with budget left
/// keeps it), clears the outcome, and one `retried` event per task keeps the history:
/// the status and error it had. `$3` is the per-task event bound.
fn retry_sql(pick: &str) -> String {
    format!(
        "WITH pick AS ({pick}), \
         done AS ( \
           UPDATE taskwarden.tasks t SET status = 'queued', run_after = now(), updated_at = now(), \
             finished_at = NULL, error = NULL, result = NULL, {END_LEASE}, \
             max_attempts = GREATEST(t.max_attempts, t.attempts + $2) \
           FROM pick WHERE t.id = pick.pick_id AND t.status = ANY($1) \
           RETURNING {TASK_COLUMNS}, pick.was, pick.was_error), \
         ev AS ( \
           INSERT INTO taskwarden.task_events (task_id, kind, data) \
           SELECT d.id, 'retried', jsonb_build_object('from', d.was, 'error', d.was_error, \
             'attempts', d.attempts, 'max_attempts', d.max_attempts) \
           FROM done d \
           WHERE (SELECT count(*) FROM taskwarden.task_events e WHERE e.task_id = d.id) < $3) \
         SELECT * FROM done ORDER BY id"
    )
}

impl Store {
    /// Pauses `agent` cluster-wide (idempotent: a second pause keeps the first one's time
    /// and reason). Returns the row.
    pub async fn pause_agent(
        &self,
        agent: &str,
        by: &str,
        reason: Option<&str>,
    ) -> Result<PausedAgent, StoreError> {
        validate_agent_name(agent)?;
        if reason.is_some_and(|r| r.len() > MAX_REASON_LEN) {
            return Err(invalid(
                "reason",
                format!("must be at most {MAX_REASON_LEN} bytes"),
            ));
        }
        let s = self.session("store.pause_agent").await?;
        let row = s
            .query_one(
                // On conflict the row is "updated" to itself, so it is returned as it was.
                "INSERT INTO taskwarden.paused_agents (agent, paused_by, reason) VALUES ($1, $2, $3) \
                 ON CONFLICT (agent) DO UPDATE SET agent = EXCLUDED.agent \
                 RETURNING agent, paused_at, paused_by, reason",
                &[&agent, &by, &reason],
            )
            .await?;
        PausedAgent::from_row(&row)
    }

    /// Resumes `agent`; true when it was paused. Wakes every instance's claimer.
    pub async fn resume_agent(&self, agent: &str) -> Result<bool, StoreError> {
        validate_agent_name(agent)?;
        let s = self.session("store.resume_agent").await?;
        let n = s
            .execute(
                "DELETE FROM taskwarden.paused_agents WHERE agent = $1",
                &[&agent],
            )
            .await?;
        if n > 0 {
            s.execute("SELECT pg_notify($1, '')", &[&s.schema().channel()])
                .await?;
        }
        Ok(n > 0)
    }

    /// Every paused agent, by name.
    pub async fn paused_agents(&self) -> Result<Vec<PausedAgent>, StoreError> {
        let s = self.session("store.paused_agents").await?;
        let rows = s
            .query(
                "SELECT agent, paused_at, paused_by, reason FROM taskwarden.paused_agents ORDER BY agent",
                &[],
            )
            .await?;
        rows.iter().map(PausedAgent::from_row).collect()
    }

    /// Puts one failed, cancelled or timed-out task back in the queue with at least
    /// `extra_attempts` attempts left; its previous status and error stay in a `retried`
    /// event. Refused for any other status ([`StoreError::IllegalTransition`]) and for a
    /// run-slot task ([`StoreError::NotRetryable`]: its slot decides what runs).
    pub async fn retry_task(&self, id: i64, extra_attempts: i32) -> Result<Task, StoreError> {
        validate_extra_attempts(extra_attempts)?;
        let allowed = TaskStatus::retry_allowed_from();
        let s = self.session("store.retry_task").await?;
        let rows = s
            .query(
                &retry_sql(
                    "SELECT id AS pick_id, status AS was, error AS was_error FROM taskwarden.tasks \
                     WHERE id = $4 AND status = ANY($1) AND session_id IS NULL FOR UPDATE",
                ),
                &[&allowed, &extra_attempts, &MAX_EVENTS_PER_TASK, &id],
            )
            .await
            .map_err(|e| key_taken(e, id))?;
        if let Some(row) = rows.first() {
            let t = Task::from_row(row)?;
            s.execute("SELECT pg_notify($1, '')", &[&s.schema().channel()])
                .await?;
            tracing::info!(
                task_id = id,
                attempts = t.attempts,
                max_attempts = t.max_attempts,
                "task retried"
            );
            return Ok(t);
        }
        let cur = s
            .query_opt(
                "SELECT status, session_id FROM taskwarden.tasks WHERE id = $1",
                &[&id],
            )
            .await?
            .ok_or(StoreError::TaskNotFound(id))?;
        let from: TaskStatus = cur
            .try_get::<_, String>(0)?
            .parse()
            .map_err(StoreError::Corrupt)?;
        let session: Option<String> = cur.try_get(1)?;
        if from.can_retry()
            && let Some(session) = session
        {
            return Err(StoreError::NotRetryable {
                id,
                reason: format!(
                    "it ran in run slot {session:?}; start a new run there (POST /v1/sessions/{{id}}/run)"
                ),
            });
        }
        Err(StoreError::IllegalTransition {
            id,
            from,
            to: TaskStatus::Queued,
        })
    }

    /// [`Store::retry_task`] for every task matching `f` (run-slot tasks left out), in id
    /// order, skipping rows another writer holds and tasks whose `active` unique key another
    /// task holds now. Returns the retried tasks.
    pub async fn retry_tasks(
        &self,
        f: &RetryFilter,
        extra_attempts: i32,
    ) -> Result<Vec<Task>, StoreError> {
        validate_extra_attempts(extra_attempts)?;
        if !(1..=MAX_LIST_LIMIT).contains(&f.limit) {
            return Err(invalid("limit", format!("must be in 1..={MAX_LIST_LIMIT}")));
        }
        if let Some(a) = &f.agent {
            validate_agent_name(a)?;
        }
        let allowed: Vec<&'static str> = match f.status {
            Some(st) if !st.can_retry() => {
                return Err(invalid(
                    "status",
                    "must be failed, cancelled or timed_out (the statuses a retry leaves)",
                ));
            }
            Some(st) => vec![st.as_str()],
            None => TaskStatus::retry_allowed_from(),
        };
        let s = self.session("store.retry_tasks").await?;
        let rows = s
            .query(
                &retry_sql(
                    &"SELECT id AS pick_id, status AS was, error AS was_error FROM taskwarden.tasks \
                     WHERE status = ANY($1) AND session_id IS NULL \
                       AND ($4::text IS NULL OR agent = $4) \
                       AND NOT (unique_scope = 'active' AND EXISTS ( \
                         SELECT 1 FROM taskwarden.tasks o WHERE o.unique_key = tasks.unique_key \
                           AND o.id <> tasks.id AND (KEY_HELD))) \
                     ORDER BY id LIMIT $5 FOR UPDATE SKIP LOCKED"
                        .replace("KEY_HELD", KEY_HELD_BY_O),
                ),
                &[
                    &allowed,
                    &extra_attempts,
                    &MAX_EVENTS_PER_TASK,
                    &f.agent,
                    &f.limit,
                ],
            )
            .await
            .map_err(|e| key_taken(e, 0))?;
        let tasks: Vec<Task> = rows.iter().map(Task::from_row).collect::<Result<_, _>>()?;
        if !tasks.is_empty() {
            s.execute("SELECT pg_notify($1, '')", &[&s.schema().channel()])
                .await?;
            tracing::info!(retried = tasks.len(), agent = ?f.agent, status = ?f.status.map(|s| s.as_str()), "tasks retried by filter");
        }
        Ok(tasks)
    }
}

fn validate_agent_name(agent: &str) -> Result<(), StoreError> {
    if agent.is_empty() || agent.len() > MAX_NAME_LEN {
        return Err(invalid(
            "agent",
            format!("must be 1..={MAX_NAME_LEN} characters"),
        ));
    }
    Ok(())
}

fn validate_extra_attempts(n: i32) -> Result<(), StoreError> {
    if !(1..=MAX_EXTRA_ATTEMPTS).contains(&n) {
        return Err(invalid(
            "extra_attempts",
            format!("must be in 1..={MAX_EXTRA_ATTEMPTS}"),
        ));
    }
    Ok(())
}

/// "Another task holds this unique key" as `tasks_unique_key_idx` (migration V4) defines
/// holding it, for a row aliased `o`.
const KEY_HELD_BY_O: &str = "(o.unique_scope = 'queued' AND o.status = 'queued' AND o.started_at IS NULL) \
     OR (o.unique_scope = 'active' AND o.status IN ('queued', 'running')) \
     OR (o.unique_scope = 'period' AND o.unique_until IS NOT NULL)";

/// A retry that would put a task back in the queue while another task holds its `active`
/// unique key breaks `tasks_unique_key_idx` (23505): a conflict, not a server error.
fn key_taken(e: crate::db::DbError, id: i64) -> StoreError {
    if e.sqlstate() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
        return StoreError::NotRetryable {
            id,
            reason: "another task holds its unique_key now".into(),
        };
    }
    StoreError::from(e)
}
