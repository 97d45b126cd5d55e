//! Retention: finished tasks deleted once past the age configured for their final status,
//! their events with them (`task_events` cascades). Each call is one bounded statement;
//! the leader decides how many to run (`orchestrator::retention`).
//!
//! A task of an objective is never deleted alone: an objective goes as a whole — its row
//! and every step — once every step has finished and each is past the age of its own
//! status. A step still queued or running (or one kept forever) keeps the whole objective,
//! so dependency checks and the objective's derived status never see a half-deleted graph.

use super::Store;
use super::StoreError;
use crate::task_state::TaskStatus;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_postgres::Row;

/// How long finished tasks are kept, per final status; `None` keeps them forever.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetentionAges {
    pub by_status: Vec<(TaskStatus, Duration)>,
}

impl RetentionAges {
    /// The statuses with an age, and their ages in seconds (the statement's arrays).
    fn arrays(&self) -> (Vec<&'static str>, Vec<f64>) {
        self.by_status
            .iter()
            .filter(|(st, _)| st.is_terminal())
            .map(|(st, d)| (st.as_str(), d.as_secs_f64()))
            .unzip()
    }
}

/// Rows deleted by one statement, by status.
pub type Deleted = BTreeMap<TaskStatus, u64>;

impl Store {
    /// Deletes up to `limit` finished tasks outside objectives that are past their
    /// status's age, oldest first per status (rows another writer holds are skipped; a row
    /// that changed since the statement's snapshot is re-checked and left alone). Returns
    /// the count per status. Each status is one range of `tasks_finished_idx` (the literal
    /// status list and `objective_id IS NULL` match its predicate), so a run that finds
    /// nothing reads no table rows.
    pub async fn delete_expired_tasks(
        &self,
        ages: &RetentionAges,
        limit: i64,
    ) -> Result<Deleted, StoreError> {
        let (statuses, secs) = ages.arrays();
        if statuses.is_empty() {
            return Ok(Deleted::new());
        }
        let s = self.session("store.delete_expired_tasks").await?;
        let rows = s
            .query(
                "WITH r AS (SELECT * FROM unnest($1::text[], $2::float8[]) AS r(status, secs)), \
                 doomed AS ( \
                   SELECT d.id, d.status, d.finished_at FROM r CROSS JOIN LATERAL ( \
                     SELECT t.id, t.status, t.finished_at FROM taskwarden.tasks t \
                     WHERE t.status = r.status AND t.objective_id IS NULL \
                       AND t.status IN ('succeeded', 'failed', 'cancelled', 'timed_out') \
                       AND t.finished_at < now() - make_interval(secs => r.secs) \
                     ORDER BY t.finished_at LIMIT $3 FOR UPDATE SKIP LOCKED) d \
                   LIMIT $3), \
                 gone AS ( \
                   DELETE FROM taskwarden.tasks t USING doomed d \
                   WHERE t.id = d.id AND t.status = d.status AND t.finished_at = d.finished_at \
                   RETURNING t.status) \
                 SELECT status, count(*) FROM gone GROUP BY status",
                &[&statuses, &secs, &limit],
            )
            .await?;
        deleted(&rows)
    }

    /// Deletes whole objectives (row, steps, events) whose every step finished and is past
    /// its status's age: objectives in id order, as many as fit in `limit` steps (at least
    /// one). Each step is locked and checked again before anything is deleted, so a step
    /// retried meanwhile keeps its objective. Returns the deleted steps per status.
    pub async fn delete_expired_objectives(
        &self,
        ages: &RetentionAges,
        limit: i64,
    ) -> Result<Deleted, StoreError> {
        let (statuses, secs) = ages.arrays();
        let Some(youngest) = secs.iter().copied().reduce(f64::min) else {
            return Ok(Deleted::new());
        };
        let s = self.session("store.delete_expired_objectives").await?;
        let rows = s
            .query(
                "WITH r AS (SELECT * FROM unnest($1::text[], $2::float8[]) AS r(status, secs)), \
                 cand AS ( \
                   SELECT o.id, (SELECT count(*) FROM taskwarden.tasks t WHERE t.objective_id = o.id) AS steps \
                   FROM taskwarden.objectives o \
                   WHERE o.created_at < now() - make_interval(secs => $4) \
                     AND EXISTS (SELECT 1 FROM taskwarden.tasks t WHERE t.objective_id = o.id) \
                     AND NOT EXISTS ( \
                       SELECT 1 FROM taskwarden.tasks t LEFT JOIN r ON r.status = t.status \
                       WHERE t.objective_id = o.id \
                         AND (r.secs IS NULL OR t.finished_at IS NULL \
                              OR t.finished_at >= now() - make_interval(secs => r.secs))) \
                   ORDER BY o.id LIMIT $3), \
                 pick AS ( \
                   SELECT id FROM ( \
                     SELECT id, sum(steps) OVER (ORDER BY id) AS upto, \
                            row_number() OVER (ORDER BY id) AS n FROM cand) x \
                   WHERE upto <= $3 OR n = 1), \
                 locked AS ( \
                   SELECT t.objective_id, t.status, t.finished_at FROM taskwarden.tasks t \
                   JOIN pick ON t.objective_id = pick.id FOR UPDATE OF t), \
                 ok AS ( \
                   SELECT l.objective_id FROM locked l LEFT JOIN r ON r.status = l.status \
                   GROUP BY l.objective_id \
                   HAVING bool_and(r.secs IS NOT NULL AND l.finished_at IS NOT NULL \
                     AND l.finished_at < now() - make_interval(secs => r.secs))), \
                 gone AS ( \
                   DELETE FROM taskwarden.tasks t USING ok WHERE t.objective_id = ok.objective_id \
                   RETURNING t.status), \
                 obj AS (DELETE FROM taskwarden.objectives o USING ok WHERE o.id = ok.objective_id) \
                 SELECT status, count(*) FROM gone GROUP BY status",
                &[&statuses, &secs, &limit, &youngest],
            )
            .await?;
        deleted(&rows)
    }
}

fn deleted(rows: &[Row]) -> Result<Deleted, StoreError> {
    let mut out = Deleted::new();
    for r in rows {
        let status: TaskStatus = r
            .try_get::<_, String>(0)?
            .parse()
            .map_err(StoreError::Corrupt)?;
        let n: i64 = r.try_get(1)?;
        out.insert(status, u64::try_from(n).unwrap_or(0));
    }
    Ok(out)
}
