//! The leader's duties, done only while [`super::elector`] says this instance leads:
//! re-queue expired leases, reap dead instances, cancel dependants of failed steps.

#[allow(unused_imports)]
use super::*;

impl Orchestrator {
    pub(super) async fn cascade(&self) {
        match self.inner.store.cancel_blocked_dependants().await {
            Ok(ids) if !ids.is_empty() => {
                tracing::info!(cancelled = ?ids, "dependants of a failed step cancelled")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cancelling dependants failed; the leader retries")
            }
        }
    }

    /// Holds or seeks leadership every third of its time to live (`workers.lease`), and
    /// while leading does the cluster-wide duties. Resigns at shutdown.
    pub(super) async fn leader(self) {
        let i = Arc::clone(&self.inner);
        let mut elector = Elector::new(i.instance_id.clone(), i.db.clone(), i.metrics.clone());
        loop {
            let cfg = i.config.load_full();
            let ttl = cfg.workers.lease.get();
            let period = (ttl / 3).max(Duration::from_millis(100));
            if elector.run_once(ttl).await
                && let Err(e) = self.lead_once(&elector, &cfg).await
            {
                tracing::warn!(error = %e, sqlstate = ?e.sqlstate().map(|c| c.code()), "leader duties failed; retrying next round");
            }
            tokio::select! {
                _ = i.shutdown.cancelled() => {
                    elector.resign().await;
                    return;
                }
                _ = tokio::time::sleep(period) => {}
            }
        }
    }

    /// The leader's duties; each step starts only while leadership is still ours.
    pub(super) async fn lead_once(&self, elector: &Elector, cfg: &Config) -> Result<(), DbError> {
        let i = &self.inner;
        // Our own runs (including outcomes still waiting to be written) are not expired,
        // whatever the lease column says after an outage.
        let local: Vec<i64> = i.running.snapshot().iter().map(|t| t.task_id).collect();
        let s = i.db.session("orchestrator.leader").await?;
        if !elector.is_leading() {
            return Ok(());
        }
        let requeued = s
            .query(
                "UPDATE tasks SET \
                   status = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END, \
                   finished_at = CASE WHEN attempts >= max_attempts THEN now() END, \
                   error = 'lease expired (held by ' || COALESCE(lease_owner, '?') || ')', \
                   lease_owner = NULL, lease_expires_at = NULL, run_after = now(), updated_at = now() \
                 WHERE status = 'running' AND lease_expires_at < now() \
                   AND NOT (lease_owner = $1 AND id = ANY($2)) RETURNING id, status",
                &[&i.instance_id, &local],
            )
            .await?;
        if !requeued.is_empty() {
            let ids: Vec<i64> = requeued.iter().map(|r| r.get(0)).collect();
            tracing::warn!(tasks = ?ids, "re-queued tasks whose lease expired");
            i.wake.notify_one();
            s.execute("SELECT pg_notify($1, '')", &[&NOTIFY_CHANNEL])
                .await?;
        }
        if !elector.is_leading() {
            return Ok(());
        }
        let dead_after = cfg.workers.lease.get().as_secs_f64() * 3.0;
        let reaped = s
            .query(
                "DELETE FROM instances WHERE heartbeat_at < now() - make_interval(secs => $1) RETURNING id",
                &[&dead_after],
            )
            .await?;
        drop(s);
        for r in &reaped {
            let id: String = r.get(0);
            tracing::warn!(instance = %id, "reaped a dead instance");
        }
        if elector.is_leading() {
            self.cascade().await;
        }
        Ok(())
    }
}
