//! Lease keeping: every lease/3 this instance refreshes its `instances` row and extends
//! the leases of the tasks it runs; a task whose row is no longer ours is cancelled here.

use super::Context;
use super::outcome_writer::OutcomeWriter;
use crate::periodic::Periodic;
use crate::periodic::Ran;
use crate::store::StoreError;
use std::collections::HashSet;
use std::time::Duration;

/// The lease keeper: no state of its own, only what it reads and the write stall it
/// feeds (every beat writes, so it tells readiness whether writes get through when
/// nothing else is written).
pub(super) struct LeaseKeeper<'a> {
    pub(super) ctx: &'a Context,
    pub(super) writer: &'a OutcomeWriter,
}

impl LeaseKeeper<'_> {
    /// Every third of `workers.lease`; a pass may take at most one lease (later, the
    /// leases it would extend have lapsed anyway).
    pub(super) async fn run(self) {
        let ctx = self.ctx;
        let mut every = Periodic::new("lease_keeper", ctx.metrics.clone(), ctx.shutdown.clone());
        loop {
            let lease = ctx.config.load().workers.lease.get();
            if !every.wait(lease / 3).await {
                return;
            }
            match every.run(lease, self.beat(lease)).await {
                Ran::Done(Err(e)) => tracing::warn!(error = %e, "extending leases failed"),
                Ran::Shutdown => return,
                Ran::Done(Ok(())) | Ran::Missed => {}
            }
        }
    }

    /// Extends our leases; cancels local runs whose row says they are no longer ours.
    /// Every beat writes (the instance row), so it also tells readiness whether writes
    /// reach the database when nothing else is written.
    pub(super) async fn beat(&self, lease: Duration) -> Result<(), StoreError> {
        let ctx = self.ctx;
        let ids: Vec<i64> = ctx.running.snapshot().iter().map(|t| t.task_id).collect();
        let touched = ctx
            .store
            .touch_instance(&ctx.instance_id, &hostname())
            .await;
        self.writer.record_write("lease keeper", &touched, |_| 1);
        touched?;
        if ids.is_empty() {
            return Ok(());
        }
        let still = ctx.store.extend_leases(&ids, &ctx.instance_id, lease).await;
        self.writer
            .record_write("lease keeper", &still, HashSet::len);
        let still = still?;
        for id in ids.into_iter().filter(|id| !still.contains(id)) {
            if ctx.running.cancel(id) {
                tracing::info!(
                    task_id = id,
                    "task no longer running under our lease; cancelled here"
                );
            }
        }
        Ok(())
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into())
}
