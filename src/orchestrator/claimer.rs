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
        let mut started = 0;
        for (name, entry) in agents.iter() {
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
            let claimed = self
                .claim(name, want as i64, cfg.workers.lease.get())
                .await?;
            for t in claimed {
                started += 1;
                self.spawn_run(t, entry.clone(), CancellationToken::new(), None);
            }
        }
        Ok(started)
    }

    pub(super) async fn claim(
        &self,
        agent: &str,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<Task>, StoreError> {
        let allowed = TaskStatus::allowed_from(TaskStatus::Running);
        let lease_s = lease.as_secs_f64();
        let s = self.inner.db.session("orchestrator.claim").await?;
        let rows = s
            .query(
                &format!(
                    "WITH c AS ( \
                       SELECT t.id AS claim_id FROM tasks t \
                       WHERE t.status = 'queued' AND t.agent = $1 AND t.run_after <= now() \
                         AND (cardinality(t.depends_on) = 0 OR NOT EXISTS ( \
                           SELECT 1 FROM tasks d WHERE d.objective_id = t.objective_id \
                             AND d.step_key = ANY(t.depends_on) AND d.status <> 'succeeded')) \
                       ORDER BY t.priority DESC, t.run_after, t.id \
                       LIMIT $2 FOR UPDATE SKIP LOCKED) \
                     UPDATE tasks SET status = 'running', attempts = attempts + 1, started_at = now(), \
                       updated_at = now(), lease_owner = $3, \
                       lease_expires_at = now() + make_interval(secs => $4) \
                     FROM c WHERE tasks.id = c.claim_id AND tasks.status = ANY($5) \
                     RETURNING {TASK_COLUMNS}"
                ),
                &[&agent, &limit, &self.inner.instance_id, &lease_s, &allowed],
            )
            .await?;
        rows.iter().map(Task::from_row).collect()
    }
}
