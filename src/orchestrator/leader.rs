//! The leader's duties, done only while [`super::elector`] says this instance leads:
//! re-queue expired leases, reap dead instances, cancel dependants of failed steps, and
//! delete finished tasks past their retention age ([`super::retention`]).

use super::Context;
use crate::config::Config;
use crate::orchestrator::elector::Elector;
use crate::periodic::Periodic;
use crate::periodic::Ran;
use crate::store::StoreError;
use std::time::Duration;
use std::time::Instant;

/// The leader: its elector and when it last ran retention, both kept by its loop alone.
pub(super) struct Leader {
    elector: Elector,
    pub(super) last_retention: Option<Instant>,
}

impl Leader {
    pub(super) fn new(ctx: &Context) -> Leader {
        Leader {
            elector: Elector::new(ctx.instance_id.clone(), ctx.db.clone(), ctx.metrics.clone()),
            last_retention: None,
        }
    }

    /// Whether this instance may do leader work right now.
    pub(super) fn is_leading(&self) -> bool {
        self.elector.is_leading()
    }

    /// Holds or seeks leadership every third of its time to live (`workers.lease`), and
    /// while leading does the cluster-wide duties. Resigns at shutdown.
    pub(super) async fn run(mut self, ctx: &Context) {
        let mut every = Periodic::new("leader", ctx.metrics.clone(), ctx.shutdown.clone());
        loop {
            let cfg = ctx.config.load_full();
            let ttl = cfg.workers.lease.get();
            if !every.wait((ttl / 3).max(Duration::from_millis(100))).await {
                break;
            }
            let pass = async {
                if self.elector.run_once(ttl).await {
                    self.lead_once(ctx, &cfg).await?;
                    self.retain_if_due(ctx, &cfg).await
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
                // A renewal that never came back (a frozen link) was dropped with the pass:
                // the leadership it would have extended has lapsed by now.
                Ran::Missed => self.elector.step_down_if_lapsed(),
                Ran::Done(Ok(())) => {}
            }
        }
        self.elector.resign().await;
    }

    /// The leader's duties; each step starts only while leadership is still ours.
    async fn lead_once(&self, ctx: &Context, cfg: &Config) -> Result<(), StoreError> {
        let elector = &self.elector;
        // Our own runs (including outcomes still waiting to be written) are not expired,
        // whatever the lease column says after an outage.
        let local: Vec<i64> = ctx.running.snapshot().iter().map(|t| t.task_id).collect();
        if !elector.is_leading() {
            return Ok(());
        }
        let requeued = ctx.store.requeue_expired(&ctx.instance_id, &local).await?;
        if !requeued.is_empty() {
            tracing::warn!(tasks = ?requeued, "re-queued tasks whose lease expired");
            ctx.wake.notify_one();
        }
        if !elector.is_leading() {
            return Ok(());
        }
        let dead_after = cfg.workers.lease.get().saturating_mul(3);
        for id in ctx.store.reap_instances(dead_after).await? {
            tracing::warn!(instance = %id, "reaped a dead instance");
        }
        if elector.is_leading() {
            super::outcome_writer::cancel_blocked_dependants(&ctx.store).await;
        }
        Ok(())
    }
}
