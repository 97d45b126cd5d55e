//! Operator controls over the queue: pause and resume an agent (cluster-wide, persisted in
//! `paused_agents`), retry tasks that ended without success, and the claimer's cached
//! view of which agents are paused.
//!
//! The claim statement itself refuses a paused agent, so a pause stops every instance's
//! claims from its next statement whatever this cache says. The cache only spares the
//! claimer a round trip per paused agent: it is read again once it is `poll_interval`
//! old, so a resume elsewhere restarts claims here within one poll (at once on the
//! instance that took the resume).

use super::Inner;
use super::Orchestrator;
use super::OrchestratorError;
use crate::metrics as m;
use crate::store::PausedAgent;
use crate::store::RetryFilter;
use crate::store::StoreError;
use crate::store::Task;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::MutexGuard;
use std::time::Instant;

/// The paused agents as last read, and when; `generation` grows at every local pause or
/// resume, so a read that raced with one is not kept.
#[derive(Default)]
pub(super) struct PausedCache {
    agents: Arc<HashSet<String>>,
    read_at: Option<Instant>,
    generation: u64,
}

impl Inner {
    /// Whether `agent` was paused at the last read of the pause list (no round trip; the
    /// claim statement refuses paused agents regardless).
    pub(super) fn paused_as_last_read(&self, agent: &str) -> bool {
        self.paused_cache().agents.contains(agent)
    }

    fn paused_cache(&self) -> MutexGuard<'_, PausedCache> {
        self.paused.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Orchestrator {
    /// The agents paused cluster-wide, read again when the last reading is older than
    /// `poll_interval` (or a local pause or resume made it stale).
    pub(super) async fn paused_agents(&self) -> Result<Arc<HashSet<String>>, StoreError> {
        let i = &self.inner;
        let poll = i.config.load().workers.poll_interval.get();
        let generation = {
            let c = i.paused_cache();
            if c.read_at.is_some_and(|t| t.elapsed() < poll) {
                return Ok(Arc::clone(&c.agents));
            }
            c.generation
        };
        let read_at = Instant::now();
        let agents: HashSet<String> = i
            .store
            .paused_agents()
            .await?
            .into_iter()
            .map(|p| p.agent)
            .collect();
        let agents = Arc::new(agents);
        let mut c = i.paused_cache();
        if c.generation == generation {
            c.agents = Arc::clone(&agents);
            c.read_at = Some(read_at);
        }
        Ok(agents)
    }

    /// A local pause or resume: the pause list is read again at the next claim round, and
    /// the gauge follows at once (the supervisor's next reading confirms it). The gauge is
    /// only written for an agent that is known here or had a row, so resuming arbitrary
    /// names cannot add series.
    fn paused_changed(&self, agent: &str, paused: bool, had_row: bool) {
        let i = &self.inner;
        {
            let mut c = i.paused_cache();
            c.generation += 1;
            c.read_at = None;
        }
        if had_row || i.agents.load().get(agent).is_some() {
            i.metrics
                .gauge(m::AGENT_PAUSED, &[("agent", agent)])
                .set(if paused { 1.0 } else { 0.0 });
        }
    }

    /// Pauses a known agent's queue on every instance: its queued tasks stay queued and
    /// are not claimed; running ones finish. Idempotent.
    pub async fn pause(
        &self,
        agent: &str,
        reason: Option<&str>,
    ) -> Result<PausedAgent, OrchestratorError> {
        if self.inner.agents.load().get(agent).is_none() {
            return Err(self.unknown_agent(agent));
        }
        let p = self
            .inner
            .store
            .pause_agent(agent, &self.inner.instance_id, reason)
            .await?;
        self.paused_changed(agent, true, true);
        tracing::info!(agent, reason = ?p.reason, paused_at = %p.paused_at, "agent paused");
        Ok(p)
    }

    /// Resumes an agent (any name: an agent since removed from the config may still have a
    /// row); true when it was paused. Claims restart at once here, within one
    /// `poll_interval` elsewhere.
    pub async fn resume(&self, agent: &str) -> Result<bool, OrchestratorError> {
        let was = self.inner.store.resume_agent(agent).await?;
        self.paused_changed(agent, false, was);
        self.inner.wake.notify_one();
        tracing::info!(agent, was_paused = was, "agent resumed");
        Ok(was)
    }

    /// Puts a failed, cancelled or timed-out task back in the queue with at least
    /// `extra_attempts` attempts left (see `Store::retry_task`).
    pub async fn retry(&self, id: i64, extra_attempts: i32) -> Result<Task, OrchestratorError> {
        let t = self.inner.store.retry_task(id, extra_attempts).await?;
        self.inner.wake.notify_one();
        Ok(t)
    }

    /// [`Orchestrator::retry`] for every task matching `f`, up to its limit.
    pub async fn retry_matching(
        &self,
        f: &RetryFilter,
        extra_attempts: i32,
    ) -> Result<Vec<Task>, OrchestratorError> {
        let tasks = self.inner.store.retry_tasks(f, extra_attempts).await?;
        if !tasks.is_empty() {
            self.inner.wake.notify_one();
        }
        Ok(tasks)
    }
}
