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
        let s = i.db.session("orchestrator.heartbeat").await?;
        s.execute(
            "INSERT INTO instances (id, hostname, pid, version) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
            &[
                &i.instance_id,
                &hostname(),
                &(std::process::id() as i32),
                &env!("CARGO_PKG_VERSION"),
            ],
        )
        .await?;
        if ids.is_empty() {
            return Ok(());
        }
        let rows = s
            .query(
                "UPDATE tasks SET lease_expires_at = now() + make_interval(secs => $3) \
                 WHERE id = ANY($1) AND lease_owner = $2 AND status = 'running' RETURNING id",
                &[&ids, &i.instance_id, &lease.as_secs_f64()],
            )
            .await?;
        drop(s);
        let still: HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
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
