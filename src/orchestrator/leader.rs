//! The leader's duties, done only while [`super::elector`] says this instance leads:
//! re-queue expired leases, reap dead instances, cancel dependants of failed steps, and
//! delete finished tasks past their retention age ([`super::retention`]).

use super::Orchestrator;
use crate::config::Config;
use crate::orchestrator::elector::Elector;
use crate::periodic::Periodic;
use crate::periodic::Ran;
use crate::store::StoreError;
use std::time::Duration;
use std::time::Instant;

impl Orchestrator {
    /// Holds or seeks leadership every third of its time to live (`workers.lease`), and
    /// while leading does the cluster-wide duties. Resigns at shutdown.
    pub(super) async fn leader(self) {
        let i = &self.inner.ctx;
        let mut elector = Elector::new(i.instance_id.clone(), i.db.clone(), i.metrics.clone());
        let mut every = Periodic::new("leader", i.metrics.clone(), i.shutdown.clone());
        let mut last_retention: Option<Instant> = None;
        loop {
            let cfg = i.config.load_full();
            let ttl = cfg.workers.lease.get();
            if !every.wait((ttl / 3).max(Duration::from_millis(100))).await {
                break;
            }
            let pass = async {
                if elector.run_once(ttl).await {
                    self.lead_once(&elector, &cfg).await?;
                    self.retain_if_due(&elector, &cfg, &mut last_retention)
                        .await
                } else {
                    Ok(())
                }
            };
            // A pass longer than the TTL is pointless: leadership has lapsed meanwhile.
            match every.run(ttl, pass).await {
                Ran::Done(Err(e)) => {
                    tracing::warn!(error = %e, "leader duties failed; retrying next round")
                }
                Ran::Shutdown => break,
                Ran::Done(Ok(())) | Ran::Missed => {}
            }
        }
        elector.resign().await;
    }

    /// The leader's duties; each step starts only while leadership is still ours.
    pub(super) async fn lead_once(
        &self,
        elector: &Elector,
        cfg: &Config,
    ) -> Result<(), StoreError> {
        let i = &self.inner.ctx;
        // Our own runs (including outcomes still waiting to be written) are not expired,
        // whatever the lease column says after an outage.
        let local: Vec<i64> = i.running.snapshot().iter().map(|t| t.task_id).collect();
        if !elector.is_leading() {
            return Ok(());
        }
        let requeued = i.store.requeue_expired(&i.instance_id, &local).await?;
        if !requeued.is_empty() {
            tracing::warn!(tasks = ?requeued, "re-queued tasks whose lease expired");
            i.wake.notify_one();
        }
        if !elector.is_leading() {
            return Ok(());
        }
        let dead_after = cfg.workers.lease.get().saturating_mul(3);
        for id in i.store.reap_instances(dead_after).await? {
            tracing::warn!(instance = %id, "reaped a dead instance");
        }
        if elector.is_leading() {
            super::outcome_writer::cancel_blocked_dependants(&self.inner.ctx.store).await;
        }
        Ok(())
    }
}
