//! Retention, a leader duty: finished tasks past the age configured for their final status
//! are deleted with their events (objectives only as a whole; see `store::retention`), in
//! statements of at most `retention.batch_size` tasks, at most `retention.max_batches`
//! per run, one run every `retention.interval`. Each statement starts only while this
//! instance still leads and within the run's time budget; what is left waits for the next
//! run. Counted in `taskwarden_tasks_deleted_total{status}`.

use super::Context;
use super::leader::Leader;
use crate::config::Config;
use crate::metrics as m;
use crate::store::StoreError;
use std::time::Instant;

use crate::config::RetentionConfig;
use crate::store::{Deleted, RetentionAges};

/// What one retention run deleted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetentionReport {
    /// Tasks deleted, by final status (objective steps included).
    pub deleted: Deleted,
    /// Delete statements run.
    pub statements: u32,
}

impl RetentionReport {
    pub fn total(&self) -> u64 {
        self.deleted.values().sum()
    }
}

impl Leader {
    /// Runs retention when `retention.interval` has passed since the last run here.
    pub(super) async fn retain_if_due(
        &mut self,
        ctx: &Context,
        cfg: &Config,
    ) -> Result<(), StoreError> {
        let last = &mut self.last_retention;
        if last.is_some_and(|t| t.elapsed() < cfg.retention.interval.get()) {
            return Ok(());
        }
        *last = Some(Instant::now());
        // Leave most of the leader's period to its other duties and the next renewal.
        let budget = cfg.workers.lease.get() / 6;
        let started = Instant::now();
        let go_on = || self.is_leading() && started.elapsed() < budget;
        retain(ctx, &cfg.retention, &go_on).await.map(|_| ())
    }
}

/// Deletes expired tasks, then expired objectives, one bounded statement at a time
/// while `go_on` says so; each statement's deletions are counted as they commit.
pub(super) async fn retain(
    ctx: &Context,
    r: &RetentionConfig,
    go_on: &(dyn Fn() -> bool + Sync),
) -> Result<RetentionReport, StoreError> {
    let ages = RetentionAges {
        by_status: r.ages(),
    };
    let limit = i64::from(r.batch_size);
    let mut report = RetentionReport::default();
    let mut tasks_left = !ages.by_status.is_empty();
    let mut objectives_left = tasks_left;
    while (tasks_left || objectives_left) && report.statements < r.max_batches && go_on() {
        let deleted = if tasks_left {
            let d = ctx.store.delete_expired_tasks(&ages, limit).await?;
            tasks_left = d.values().sum::<u64>() >= u64::from(r.batch_size);
            d
        } else {
            let d = ctx.store.delete_expired_objectives(&ages, limit).await?;
            objectives_left = d.values().sum::<u64>() > 0;
            d
        };
        report.statements += 1;
        for (status, n) in deleted {
            ctx.metrics
                .counter(m::TASKS_DELETED_TOTAL, &[("status", status.as_str())])
                .increment(n);
            *report.deleted.entry(status).or_insert(0) += n;
        }
    }
    if report.total() > 0 {
        tracing::info!(
            deleted = report.total(),
            by_status = ?report.deleted,
            statements = report.statements,
            "retention deleted finished tasks and their events"
        );
    }
    Ok(report)
}
