//! Lease keeping: every lease/3 this instance refreshes its `instances` row and extends
//! the leases of the tasks it runs; a task whose row is no longer ours is cancelled here.

#[allow(unused_imports)]
use super::*;

impl Orchestrator {
    pub(super) async fn heartbeat(self) {
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
        i.store.touch_instance(&i.instance_id, &hostname()).await?;
        if ids.is_empty() {
            return Ok(());
        }
        let still = i.store.extend_leases(&ids, &i.instance_id, lease).await?;
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
}
