//! The claimer: wakes on a notification, on freed capacity, or every `poll_interval`,
//! and claims runnable tasks per agent up to the free capacity.

#[allow(unused_imports)]
use super::*;

impl Orchestrator {
    pub(super) async fn claimer(self) {
        let i = Arc::clone(&self.inner);
        loop {
            let poll = i.config.load().workers.poll_interval.get();
            tokio::select! {
                _ = i.claiming.cancelled() => return,
                _ = i.wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
            // Keep claiming while there is both capacity and work.
            loop {
                if i.claiming.is_cancelled() {
                    return;
                }
                match self.claim_once().await {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming tasks failed");
                        break;
                    }
                }
            }
        }
    }

    /// One claim round over every agent with free capacity; returns how many started.
    pub async fn claim_once(&self) -> Result<usize, StoreError> {
        let i = &self.inner;
        let cfg = i.config.load();
        let agents = i.agents.load_full();
        // Paused agents are skipped here; the claim statement refuses them regardless.
        let paused = self.paused_agents().await?;
        let mut started = 0;
        for (name, entry) in agents.iter() {
            if paused.contains(name) {
                continue;
            }
            let total_free =
                (cfg.workers.concurrency as usize).saturating_sub(i.total.load(Ordering::Relaxed));
            if total_free == 0 {
                break;
            }
            let running_here = i.counts().get(name).copied().unwrap_or(0);
            let want = entry
                .concurrency
                .saturating_sub(running_here)
                .min(total_free);
            if want == 0 {
                continue;
            }
            let claimed = i
                .store
                .claim(name, want as i64, &i.instance_id, cfg.workers.lease.get())
                .await?;
            for t in claimed {
                started += 1;
                self.spawn_run(t, entry.clone(), CancellationToken::new(), None);
            }
        }
        Ok(started)
    }
}
