//! Operator controls over the queue: pause and resume an agent (cluster-wide, persisted in
//! `paused_agents`) and retry tasks that ended without success. A local pause or resume
//! tells the claimer its pause list is stale, so claims here follow at once.

use super::Orchestrator;
use super::OrchestratorError;
use crate::metrics as m;
use crate::store::PausedAgent;
use crate::store::RetryFilter;
use crate::store::Task;

impl Orchestrator {
    /// A local pause or resume: the pause list is read again at the next claim round, and
    /// the gauge follows at once (the supervisor's next reading confirms it). The gauge is
    /// only written for an agent that is known here or had a row, so resuming arbitrary
    /// names cannot add series.
    fn paused_changed(&self, agent: &str, paused: bool, had_row: bool) {
        let i = &self.inner.ctx;
        self.inner.claimer.pause_list_changed();
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
        if self.inner.ctx.agents.load().get(agent).is_none() {
            return Err(self.unknown_agent(agent));
        }
        let p = self
            .inner
            .ctx
            .store
            .pause_agent(agent, &self.inner.ctx.instance_id, reason)
            .await?;
        self.paused_changed(agent, true, true);
        tracing::info!(agent, reason = ?p.reason, paused_at = %p.paused_at, "agent paused");
        Ok(p)
    }

    /// Resumes an agent (any name: an agent since removed from the config may still have a
    /// row); true when it was paused. Claims restart at once here, within one
    /// `poll_interval` elsewhere.
    pub async fn resume(&self, agent: &str) -> Result<bool, OrchestratorError> {
        let was = self.inner.ctx.store.resume_agent(agent).await?;
        self.paused_changed(agent, false, was);
        self.inner.ctx.wake.notify_one();
        tracing::info!(agent, was_paused = was, "agent resumed");
        Ok(was)
    }

    /// Puts a failed, cancelled or timed-out task back in the queue with at least
    /// `extra_attempts` attempts left (see `Store::retry_task`).
    pub async fn retry(&self, id: i64, extra_attempts: i32) -> Result<Task, OrchestratorError> {
        let t = self.inner.ctx.store.retry_task(id, extra_attempts).await?;
        self.inner.ctx.wake.notify_one();
        Ok(t)
    }

    /// [`Orchestrator::retry`] for every task matching `f`, up to its limit.
    pub async fn retry_matching(
        &self,
        f: &RetryFilter,
        extra_attempts: i32,
    ) -> Result<Vec<Task>, OrchestratorError> {
        let tasks = self.inner.ctx.store.retry_tasks(f, extra_attempts).await?;
        if !tasks.is_empty() {
            self.inner.ctx.wake.notify_one();
        }
        Ok(tasks)
    }
}
