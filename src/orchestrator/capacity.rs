//! Capacity: how many runs this instance has going, per agent and in all, counted here and
//! nowhere else. A run holds a [`RunPermit`] for as long as it runs (a claimed task, the
//! prefetched tasks its permit is handed on to, or a run-slot run); dropping the permit
//! frees the capacity, records the finish and wakes the claimer, so no path that ends a
//! run (an error, a panic, a cancel) can leak capacity or forget to look for more work.
//!
//! The finishes are kept here rather than in the claimer because the permit is what sees
//! a run end; the claimer reads them as its prefetch measure ([`Capacity::finished_within`]).

use super::Inner;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Default)]
pub(super) struct Capacity {
    /// Runs going here, by agent (claimed or slot runs).
    per_agent: Mutex<HashMap<String, usize>>,
    total: AtomicUsize,
    /// When recent runs ended (at most `workers.prefetch` kept).
    finishes: Mutex<VecDeque<Instant>>,
}

impl Capacity {
    fn counts(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        self.per_agent.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn finishes(&self) -> MutexGuard<'_, VecDeque<Instant>> {
        self.finishes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs going here right now.
    pub(super) fn running(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// How many more runs of `agent` fit within its own limit and the instance's.
    pub(super) fn free_for(&self, agent: &str, agent_limit: usize, total_limit: usize) -> usize {
        let total_free = total_limit.saturating_sub(self.running());
        let here = self.counts().get(agent).copied().unwrap_or(0);
        agent_limit.saturating_sub(here).min(total_free)
    }

    /// Whether `agent`, or the instance, runs more than its limit (a reload lowered it).
    pub(super) fn over(&self, agent: &str, agent_limit: usize, total_limit: usize) -> bool {
        let here = self.counts().get(agent).copied().unwrap_or(0);
        here > agent_limit || self.running() > total_limit
    }

    /// How many runs ended here within `horizon`, at most `max`.
    pub(super) fn finished_within(&self, horizon: Duration, max: usize) -> usize {
        if max == 0 {
            return 0;
        }
        let finishes = self.finishes();
        let now = Instant::now();
        // Oldest first: a binary search, not a walk over every recent finish (this runs
        // once per task started).
        let old = finishes.partition_point(|t| now.saturating_duration_since(*t) > horizon);
        (finishes.len() - old).min(max)
    }

    fn note_finish(&self, keep: usize) {
        let mut f = self.finishes();
        f.push_back(Instant::now());
        while f.len() > keep {
            f.pop_front();
        }
    }
}

/// One unit of capacity, held by a run from its start to its end.
pub(super) struct RunPermit {
    inner: Arc<Inner>,
    agent: String,
}

impl RunPermit {
    /// Counts one more run of `agent`. Never refused: the claimer asked
    /// [`Capacity::free_for`] first, and run slots are bounded by their own semaphore.
    pub(super) fn take(inner: &Arc<Inner>, agent: &str) -> RunPermit {
        let c = &inner.capacity;
        c.total.fetch_add(1, Ordering::Relaxed);
        *c.counts().entry(agent.to_string()).or_insert(0) += 1;
        RunPermit {
            inner: Arc::clone(inner),
            agent: agent.to_string(),
        }
    }

    pub(super) fn agent(&self) -> &str {
        &self.agent
    }

    /// The run ended and this permit goes on to the next task claimed ahead for its agent:
    /// the finish counts as any other, the capacity stays taken.
    pub(super) fn handed_on(&self) {
        self.note_finish();
    }

    fn note_finish(&self) {
        let keep = self.inner.ctx.config.load().workers.prefetch as usize;
        self.inner.capacity.note_finish(keep);
    }
}

impl Drop for RunPermit {
    fn drop(&mut self) {
        self.note_finish();
        let c = &self.inner.capacity;
        c.total.fetch_sub(1, Ordering::Relaxed);
        if let Some(n) = c.counts().get_mut(&self.agent) {
            *n = n.saturating_sub(1);
        }
        // Capacity freed: look for more work.
        self.inner.ctx.wake.notify_one();
    }
}
