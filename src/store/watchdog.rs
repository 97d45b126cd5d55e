//! What the watchdog (the supervisor) reads and writes of task data on its own admin
//! connection, usually inside its lock-timeout transaction ([`crate::db::DirectTx`]):
//! overdue tasks timed out, which tasks still run anywhere, and the dated view. Each
//! function takes whichever [`Query`] handle the caller holds, so the transaction, and the
//! `lock_timeout` each statement runs under, stay the caller's choice.

use std::collections::HashSet;
use std::time::Duration;

use super::leases::{RUNNING_AMONG_SQL, TIME_OUT_OVERDUE_SQL};
use crate::db::{DbError, Query};
use crate::task_state::TaskStatus;

/// A task [`time_out_overdue`] marked `timed_out`.
#[derive(Debug, Clone, PartialEq)]
pub struct TimedOut {
    pub id: i64,
    pub agent: String,
    /// How long it had run, by the database's clock.
    pub ran_seconds: f64,
}

/// Marks every task running longer than `max` `timed_out` (along the state machine's
/// allowed set, ending its lease), with `error` as its error; one statement.
pub async fn time_out_overdue(
    q: &impl Query,
    max: Duration,
    error: &str,
) -> Result<Vec<TimedOut>, DbError> {
    let limit_s = max.as_secs_f64();
    let allowed = TaskStatus::allowed_from(TaskStatus::TimedOut);
    let rows = q
        .query(TIME_OUT_OVERDUE_SQL, &[&limit_s, &allowed, &error])
        .await?;
    rows.iter()
        .map(|r| {
            Ok(TimedOut {
                id: r.try_get(0)?,
                agent: r.try_get(1)?,
                ran_seconds: r.try_get(2)?,
            })
        })
        .collect()
}

/// Which of `ids` are running (on any instance).
pub async fn running_among(q: &impl Query, ids: &[i64]) -> Result<HashSet<i64>, DbError> {
    let rows = q.query(RUNNING_AMONG_SQL, &[&ids]).await?;
    rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
}
