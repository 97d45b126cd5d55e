//! The claimer: wakes on a notification, on freed capacity, or every `poll_interval`,
//! starts prefetched tasks in the free slots, and claims more per agent in one statement.
//!
//! Claiming only for free slots made a busy instance claim a handful of tasks per round
//! trip, one claim per freed slot. Instead each agent keeps a small local queue of tasks
//! claimed ahead (leased to this instance, registered so the lease keeper extends them):
//! a freed slot starts the next one at once, and a claim refills the queue when it is half
//! empty. The queue's size adapts to the work: at most what this instance finished in the
//! last [`PREFETCH_HORIZON`] (so slow agents prefetch nothing, other instances are not
//! starved, and a newly queued higher-priority task waits behind at most that much work),
//! and never more than `workers.prefetch`. At shutdown the queue is handed back.

use super::Orchestrator;
use crate::agents::AgentEntry;
use crate::metrics as m;
use crate::orchestrator::registry::Registration;
use crate::store::StoreError;
use crate::store::Task;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// The prefetch holds at most what this instance finished within this long.
pub const PREFETCH_HORIZON: Duration = Duration::from_millis(50);

/// A task claimed ahead and not started yet. Its registration keeps its lease extended and
/// lets a cancel reach it.
pub(super) struct Prefetched {
    task: Task,
    registration: Registration,
}

impl Orchestrator {
    pub(super) async fn claimer(self) {
        let i = Arc::clone(&self.inner);
        // The first round runs at once: work queued before the start would otherwise
        // wait a whole poll interval (no notification comes for it).
        let mut first = true;
        loop {
            if !first {
                let poll = i.config.load().workers.poll_interval.get();
                tokio::select! {
                    _ = i.claiming.cancelled() => break,
                    _ = i.wake.notified() => {}
                    _ = tokio::time::sleep(poll) => {}
                }
            }
            first = false;
            // Keep claiming while there is both capacity and work.
            loop {
                if i.claiming.is_cancelled() {
                    break;
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
        self.hand_back_prefetched().await;
    }

    /// One claim round over every agent with free capacity; returns how many tasks it
    /// started or prefetched.
    pub async fn claim_once(&self) -> Result<usize, StoreError> {
        let i = &self.inner;
        let cfg = i.config.load();
        let agents = i.agents.load_full();
        let target = self.prefetch_target(cfg.workers.prefetch as usize);
        // Paused agents are skipped here; the claim statement refuses them regardless.
        let paused = self.paused_agents().await?;
        let mut moved = 0;
        for (name, entry) in agents.iter() {
            if paused.contains(name) {
                // What was claimed ahead goes back: a paused agent's tasks stay queued.
                let held = self.take_prefetched(name, usize::MAX);
                self.release_prefetched(held).await;
                continue;
            }
            let total_free =
                (cfg.workers.concurrency as usize).saturating_sub(i.total.load(Ordering::Relaxed));
            let running_here = i.counts().get(name).copied().unwrap_or(0);
            let mut free = entry
                .concurrency
                .saturating_sub(running_here)
                .min(total_free);
            for p in self.take_prefetched(name, free) {
                free -= 1;
                moved += 1;
                // Its own registration replaces the prefetch one.
                drop(p.registration);
                self.spawn_run(p.task, entry.clone(), CancellationToken::new(), None);
            }
            let queued = self.prefetched_len(name);
            // Refill when half empty; claim for free slots whenever there are some.
            let ahead = if queued * 2 <= target {
                target - queued
            } else {
                0
            };
            if free + ahead == 0 {
                continue;
            }
            // A rate-limited agent claims at most what its window has left, prefetch
            // included: the rate counts claims, not starts.
            let rate = cfg.agents.get(name).and_then(|a| a.rate);
            let claimed = i
                .store
                .claim_rated(
                    name,
                    (free + ahead) as i64,
                    &i.instance_id,
                    cfg.workers.lease.get(),
                    rate,
                )
                .await;
            i.record_write("claimer", &claimed, |c| c.tasks.len());
            let claimed = claimed?;
            if claimed.throttled {
                i.metrics
                    .counter(m::CLAIMS_THROTTLED_TOTAL, &[("agent", name.as_str())])
                    .increment(1);
                tracing::debug!(agent = %name, claimed = claimed.tasks.len(), rate = ?rate.map(|r| r.to_string()), "claim cut short by the agent's rate limit");
            }
            let claimed = claimed.tasks;
            let mut ahead_claimed = Vec::new();
            for t in claimed {
                moved += 1;
                if free > 0 {
                    free -= 1;
                    self.spawn_run(t, entry.clone(), CancellationToken::new(), None);
                } else {
                    let registration = i.running.register(t.id, &t.agent, CancellationToken::new());
                    ahead_claimed.push(Prefetched {
                        task: t,
                        registration,
                    });
                }
            }
            if !ahead_claimed.is_empty() {
                i.prefetched()
                    .entry(name.clone())
                    .or_default()
                    .extend(ahead_claimed);
            }
        }
        Ok(moved)
    }

    /// Up to `n` prefetched tasks of `agent`, oldest claim first; ones cancelled while
    /// waiting (their row was cancelled through the API) are dropped.
    fn take_prefetched(&self, agent: &str, n: usize) -> Vec<Prefetched> {
        let mut out = Vec::new();
        if n == 0 {
            return out;
        }
        let mut all = self.inner.prefetched();
        let Some(q) = all.get_mut(agent) else {
            return out;
        };
        while out.len() < n {
            let Some(p) = q.pop_front() else { break };
            if !p.registration.token().is_cancelled() {
                out.push(p);
            }
        }
        out
    }

    /// For a run that just ended in a slot of `agent`: the next task claimed ahead for
    /// it, to run in the same slot, unless claiming stopped (shutdown), the agent is
    /// paused or gone, or the slot is no longer within the limits (a reload lowered
    /// them). Wakes the claimer when the local queue is down to its refill mark.
    pub(super) fn next_prefetched(
        &self,
        agent: &str,
    ) -> Option<(Task, AgentEntry, CancellationToken, Registration)> {
        let i = &self.inner;
        if i.claiming.is_cancelled() || i.paused_as_last_read(agent) {
            return None;
        }
        let cfg = i.config.load();
        let entry = i.agents.load().get(agent).cloned()?;
        let here = i.counts().get(agent).copied().unwrap_or(0);
        if here > entry.concurrency
            || i.total.load(Ordering::Relaxed) > cfg.workers.concurrency as usize
        {
            return None;
        }
        let p = self.take_prefetched(agent, 1).pop();
        if p.is_some() {
            // The run that ended keeps its slot; without a next task, the slot's RunCount
            // counts the finish as it drops.
            i.note_finish();
        }
        if self.prefetched_len(agent) * 2 <= self.prefetch_target(cfg.workers.prefetch as usize) {
            i.wake.notify_one();
        }
        let p = p?;
        // Its own registration replaces the prefetch one (as in claim_once).
        drop(p.registration);
        let cancel = CancellationToken::new();
        let registration = i.running.register(p.task.id, &p.task.agent, cancel.clone());
        Some((p.task, entry, cancel, registration))
    }

    fn prefetched_len(&self, agent: &str) -> usize {
        self.inner.prefetched().get(agent).map_or(0, |q| q.len())
    }

    /// How many tasks to hold ahead per agent now: what finished here within
    /// [`PREFETCH_HORIZON`], at most `max`.
    fn prefetch_target(&self, max: usize) -> usize {
        if max == 0 {
            return 0;
        }
        let finishes = self.inner.finishes();
        let now = Instant::now();
        // Oldest first: a binary search, not a walk over every recent finish (this runs
        // once per task started).
        let old =
            finishes.partition_point(|t| now.saturating_duration_since(*t) > PREFETCH_HORIZON);
        (finishes.len() - old).min(max)
    }

    /// At shutdown: prefetched tasks never started go back to the queue at once, for any
    /// instance to take (instead of waiting for their leases to lapse).
    pub(super) async fn hand_back_prefetched(&self) {
        let all: Vec<Prefetched> = self
            .inner
            .prefetched()
            .drain()
            .flat_map(|(_, q)| q)
            .collect();
        self.release_prefetched(all).await;
    }

    /// Hands tasks claimed ahead back to the queue; their registrations (which keep the
    /// leases extended) go only once that is written.
    async fn release_prefetched(&self, held: Vec<Prefetched>) {
        let i = &self.inner;
        if held.is_empty() {
            return;
        }
        let ids: Vec<i64> = held.iter().map(|p| p.task.id).collect();
        match i.store.release(&ids, &i.instance_id).await {
            Ok(n) => tracing::info!(tasks = n, "prefetched tasks handed back to the queue"),
            Err(e) => {
                tracing::warn!(tasks = ids.len(), error = %e, "handing back prefetched tasks failed; their leases will lapse and re-queue them")
            }
        }
        drop(held);
    }
}
