//! Periodic tasks: each `[schedules.NAME]` has a row in `schedules` (migration V6) holding
//! the due time it last enqueued. [`Store::fire_schedule`] locks that row
//! (`FOR UPDATE SKIP LOCKED`), finds the latest due time not after the database's `now()`,
//! and — when it is later than the row's — inserts the task and advances the row in one
//! transaction. Any number of instances may call it at the same due time: one locks the
//! row and enqueues, the others skip it or find it advanced, so each due time is enqueued
//! once. The partial unique index `tasks_schedule_due_idx` (schedule, due time) guards
//! the same thing a second time.
//!
//! Missed runs (every instance was down over several due times) are not replayed: the
//! first pass after the gap enqueues one run, for the latest due time, and counts the
//! others as skipped.

use chrono::{DateTime, Utc};

use super::Store;
use super::StoreError;

/// Most missed due times counted after a gap (the count is a log figure, not a loop over
/// them all).
const MAX_MISSED_COUNTED: usize = 10_000;

/// What one call of [`Store::fire_schedule`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Fired {
    /// Queued task `task_id` for due time `due`; `skipped` earlier due times since the
    /// row's last one were not run (downtime), at most [`MAX_MISSED_COUNTED`].
    Queued {
        due: DateTime<Utc>,
        task_id: i64,
        skipped: u64,
        now: DateTime<Utc>,
    },
    /// Nothing due: the last due time was already enqueued (`last_due`); `now` is the
    /// database's clock, to date the next wake-up by.
    NotDue {
        last_due: DateTime<Utc>,
        now: DateTime<Utc>,
    },
    /// Another instance holds the row right now (it is enqueueing this due time).
    Busy,
}

/// A task a schedule queues at each due time.
#[derive(Debug, Clone)]
pub struct ScheduledTask<'a> {
    pub schedule: &'a str,
    pub agent: &'a str,
    pub payload: &'a serde_json::Value,
    pub priority: i32,
}

impl Store {
    /// Enqueues `task` for the latest due time of `cron` (UTC) not after the database's
    /// `now()`, if the schedule's row has not enqueued it yet. A schedule seen for the
    /// first time starts now: its first run is its next due time.
    pub async fn fire_schedule(
        &self,
        cron: &croner::Cron,
        task: &ScheduledTask<'_>,
    ) -> Result<Fired, StoreError> {
        let mut s = self.session("store.fire_schedule").await?;
        let tx = s.transaction().await?;
        tx.execute(
            "INSERT INTO taskwarden.schedules (name, last_due) VALUES ($1, now()) ON CONFLICT DO NOTHING",
            &[&task.schedule],
        )
        .await?;
        let Some(row) = tx
            .query_opt(
                "SELECT last_due, now() FROM taskwarden.schedules WHERE name = $1 FOR UPDATE SKIP LOCKED",
                &[&task.schedule],
            )
            .await?
        else {
            return Ok(Fired::Busy);
        };
        let last_due: DateTime<Utc> = row.try_get(0)?;
        let now: DateTime<Utc> = row.try_get(1)?;
        let due = match cron.find_previous_occurrence(&now, true) {
            Ok(d) if d > last_due => d,
            _ => {
                // Keeps the row of a schedule seen for the first time.
                tx.commit().await?;
                return Ok(Fired::NotDue { last_due, now });
            }
        };
        let skipped = cron
            .iter_after(last_due)
            .take_while(|d| *d < due)
            .take(MAX_MISSED_COUNTED)
            .count() as u64;
        let inserted = tx
            .query_opt(
                "INSERT INTO taskwarden.tasks (agent, payload, priority, max_attempts, run_after, \
                   schedule, scheduled_at) \
                 VALUES ($1, $2, $3, $4, now(), $5, $6) ON CONFLICT DO NOTHING RETURNING id",
                &[
                    &task.agent,
                    task.payload,
                    &task.priority,
                    &self.default_max_attempts,
                    &task.schedule,
                    &due,
                ],
            )
            .await?;
        let task_id: Option<i64> = match inserted {
            Some(r) => Some(r.try_get(0)?),
            None => None,
        };
        tx.execute(
            "UPDATE taskwarden.schedules SET last_due = $2, last_task_id = COALESCE($3, last_task_id), \
               updated_at = now() WHERE name = $1",
            &[&task.schedule, &due, &task_id],
        )
        .await?;
        tx.commit().await?;
        match task_id {
            Some(task_id) => Ok(Fired::Queued {
                due,
                task_id,
                skipped,
                now,
            }),
            // The unique index already had this due time (a row reset by hand): advanced,
            // nothing queued twice.
            None => Ok(Fired::NotDue { last_due: due, now }),
        }
    }

    /// Each schedule row's last due time and the task it queued, by name.
    pub async fn schedule_rows(
        &self,
    ) -> Result<Vec<(String, DateTime<Utc>, Option<i64>)>, StoreError> {
        let s = self.session("store.schedule_rows").await?;
        let rows = s
            .query(
                "SELECT name, last_due, last_task_id FROM taskwarden.schedules ORDER BY name",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }
}
