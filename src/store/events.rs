//! Task events: stored in order, bounded per task, replayed by task or by run slot.

use super::MAX_LIST_LIMIT;
use super::Store;
use super::StoreError;
use super::invalid;
use chrono::DateTime;
use chrono::Utc;
use serde::Serialize;
use tokio_postgres::Row;

/// Most events stored per task; later ones are dropped (and the drop is logged).
pub const MAX_EVENTS_PER_TASK: i64 = 1000;

/// One stored task event.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
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

impl Store {
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
                "INSERT INTO taskwarden.task_events (task_id, kind, data) \
                 SELECT $1, $2, $3 WHERE (SELECT count(*) FROM taskwarden.task_events WHERE task_id = $1) < $4 \
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
                "SELECT id, task_id, kind, data, created_at FROM taskwarden.task_events \
                 WHERE task_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                &[&task_id, &after_id, &limit.clamp(1, MAX_LIST_LIMIT)],
            )
            .await?;
        rows.iter().map(TaskEvent::from_row).collect()
    }

    /// A page of one task's events after `after_id`, oldest first: at most `limit` rows
    /// and, past the first row, at most `max_bytes` of event data (measured by the server,
    /// as [`Store::list_tasks`] does). Returns the page and whether the byte budget cut it.
    pub async fn task_events_page(
        &self,
        task_id: i64,
        after_id: i64,
        limit: i64,
        max_bytes: u64,
    ) -> Result<(Vec<TaskEvent>, bool), StoreError> {
        if !(1..=MAX_LIST_LIMIT).contains(&limit) {
            return Err(invalid("limit", format!("must be in 1..={MAX_LIST_LIMIT}")));
        }
        let budget = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let s = self.session("store.task_events_page").await?;
        let rows = s
            .query(
                "WITH page AS ( \
                   SELECT id, octet_length(data::text) + octet_length(kind) AS bytes \
                   FROM taskwarden.task_events WHERE task_id = $1 AND id > $2 ORDER BY id LIMIT $3), \
                 sized AS (SELECT id, sum(bytes) OVER (ORDER BY id) - bytes AS before, \
                                  count(*) OVER () AS n FROM page) \
                 SELECT e.id, e.task_id, e.kind, e.data, e.created_at, sized.n \
                 FROM sized JOIN taskwarden.task_events e USING (id) \
                 WHERE sized.before < $4 OR sized.before = 0 ORDER BY e.id",
                &[&task_id, &after_id, &limit, &budget],
            )
            .await?;
        let cut = rows
            .first()
            .is_some_and(|r| r.get::<_, i64>("n") > rows.len() as i64);
        let events = rows
            .iter()
            .map(TaskEvent::from_row)
            .collect::<Result<_, _>>()?;
        Ok((events, cut))
    }

    /// Events of every task of run slot `slot_id` after `after_id` (resuming an event
    /// stream).
    pub async fn slot_events(
        &self,
        slot_id: &str,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<TaskEvent>, StoreError> {
        let s = self.session("store.slot_events").await?;
        let rows = s
            .query(
                "SELECT e.id, e.task_id, e.kind, e.data, e.created_at FROM taskwarden.task_events e \
                 JOIN taskwarden.tasks t ON t.id = e.task_id \
                 WHERE t.session_id = $1 AND e.id > $2 ORDER BY e.id LIMIT $3",
                &[&slot_id, &after_id, &limit.clamp(1, MAX_LIST_LIMIT)],
            )
            .await?;
        rows.iter().map(TaskEvent::from_row).collect()
    }
}
