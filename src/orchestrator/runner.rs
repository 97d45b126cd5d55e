//! One attempt of one task: run the agent under its cancel token and time limit, write
//! the output it kept during an outage, then hand the outcome (what the state machine
//! writes for it, and its event) to the batched outcome writer, which keeps the lease
//! until it is written; a permit whose run ended starts the next prefetched task.
//!
//! [`Runner`] owns no state: one attempt's state lives in its future. It is the handle
//! the claimer and the run slots start runs through, and it reaches the roles a run
//! hands work to (the claimer's prefetch, capacity, the run slots, the outcome writer)
//! only through their methods.

use super::Inner;
use super::capacity::RunPermit;
use super::outcome::{
    AttemptOf, Decision, Outcome, decide, make_storable, retry_backoff, retry_pause,
};
use super::outcome_writer::PendingOutcome;
use super::planner::apply_plan;
use super::slots::SlotRun;
use crate::agents::AgentEntry;
use crate::agents::AgentOutput;
use crate::agents::OutputWriter;
use crate::agents::TaskContext;
use crate::db::tracker::Owner;
use crate::metrics as m;
use crate::orchestrator::registry::Registration;
use crate::store::OutcomeRow;
use crate::store::Task;
use crate::store::TaskStatus;
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Starts runs and sees each through to its outcome. Cheap to clone.
#[derive(Clone)]
pub(super) struct Runner {
    inner: Arc<Inner>,
}

impl Runner {
    pub(super) fn new(inner: Arc<Inner>) -> Runner {
        Runner { inner }
    }

    /// Runs one attempt of `task` (already running under our lease) on its own task.
    pub(super) fn spawn_run(
        &self,
        task: Task,
        entry: AgentEntry,
        cancel: CancellationToken,
        slot: Option<SlotRun>,
    ) {
        let permit = RunPermit::take(&self.inner, &task.agent);
        let i = &self.inner.ctx;
        let registration = i.running.register(task.id, &task.agent, cancel.clone());
        let this = self.clone();
        i.tasks.spawn(async move {
            let Some(slot) = slot else {
                this.run_attempt(&task, &entry, &cancel, registration).await;
                // The permit this run held starts the next task claimed ahead at once:
                // waiting for the claimer would stall every freed permit behind its claim
                // round trip, about a third of the time with short tasks.
                while let Some((task, entry, cancel, registration)) = this
                    .inner
                    .claimer
                    .next_prefetched(&this.inner.ctx, &this.inner.capacity, &permit)
                {
                    this.run_attempt(&task, &entry, &cancel, registration).await;
                }
                return;
            };
            let run = this.run_attempt(&task, &entry, &cancel, registration);
            this.inner.slots.run_to_end(task.id, slot, run).await;
            drop(permit);
        });
    }

    /// Runs a task the claimer claimed (or took from its prefetch) on a permit of its own.
    pub(super) fn start_claimed(&self, task: Task, entry: AgentEntry) {
        self.spawn_run(task, entry, CancellationToken::new(), None);
    }

    /// One attempt and its outcome, queued for the outcome writer (a cancel: written at once).
    async fn run_attempt(
        &self,
        task: &Task,
        entry: &AgentEntry,
        cancel: &CancellationToken,
        registration: Registration,
    ) {
        let mut outcome = self.attempt(task, entry, cancel, &registration).await;
        // A snoozed planner has no plan yet: it runs again later.
        if entry.planner
            && let Outcome::Succeeded(out) = &outcome
            && out.snooze.is_none()
            && let Err(e) = apply_plan(&self.inner.ctx, task, &out.result).await
        {
            outcome = Outcome::Failed(e);
        }
        self.finish(task, outcome, registration).await;
    }

    async fn attempt(
        &self,
        task: &Task,
        entry: &AgentEntry,
        cancel: &CancellationToken,
        registration: &Registration,
    ) -> Outcome {
        let i = &self.inner.ctx;
        let limit = entry
            .timeout
            .min(i.config.load().supervisor.max_task_duration.get());
        if let Some(started) = task.started_at {
            let wait = (started - task.run_after.max(task.created_at))
                .to_std()
                .unwrap_or_default();
            i.metrics
                .histogram(m::TASK_QUEUE_WAIT_SECONDS, &[])
                .record(wait.as_secs_f64());
        }
        let limits = crate::agents::storable::Limits::of(&i.config.load().workers);
        let owner = Owner {
            task_id: task.id,
            cancel: cancel.clone(),
        };
        let running = Arc::clone(&i.running);
        let task_id = task.id;
        let ctx = TaskContext::new(
            task,
            cancel.clone(),
            i.store.for_task(owner),
            i.hub.clone(),
            i.metrics.clone(),
        )
        .on_process_tree(Arc::new(move |pid| running.set_tree_root(task_id, pid)))
        .in_schema(i.db.schema())
        .with_limits(limits);
        tracing::info!(task_id = task.id, agent = %task.agent, attempt = task.attempts, max_attempts = task.max_attempts, "task started");
        let output = ctx.output();
        let outcome = tokio::select! {
            biased;
            _ = cancel.cancelled() => match i.running.kill_reason(task.id) {
                Some(k) => Outcome::Killed(k),
                None => Outcome::Cancelled,
            },
            r = tokio::time::timeout(limit, entry.agent.run(ctx)) => match r {
                Ok(Ok(out)) => Outcome::Succeeded(out),
                Ok(Err(e)) => Outcome::Failed(e),
                Err(_) => Outcome::TimedOut(limit),
            },
        };
        // From here on the attempt's output and outcome wait to be written: the outcome
        // lag the supervisor watches starts now, kept output included.
        registration.run_ended();
        if !matches!(outcome, Outcome::Cancelled) {
            self.flush_output(task, &output, cancel).await;
        }
        make_storable(outcome, &limits)
    }

    /// Writes the events and usage the attempt kept during a database outage, before its
    /// outcome; retried with backoff while the database is unreachable (the lease is kept
    /// meanwhile), given up on shutdown, cancellation or a refusal by the database.
    async fn flush_output(&self, task: &Task, output: &OutputWriter, cancel: &CancellationToken) {
        let mut attempt = 0u32;
        while !output.is_flushed() {
            match output.flush().await {
                Ok(()) => {
                    tracing::info!(task_id = task.id, agent = %task.agent, "kept task output written after a database outage");
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(task_id = task.id, agent = %task.agent, attempt, error = %e, "writing kept task output failed; retrying");
                    if cancel.is_cancelled()
                        || !retry_pause(&self.inner.ctx.shutdown, &mut attempt).await
                    {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(task_id = task.id, agent = %task.agent, error = %e, "kept task output refused by the database; dropped");
                    return;
                }
            }
        }
    }

    /// Records an attempt's outcome: queued for the batch writer with the event it
    /// carries (`attempt_failed`, `snoozed`). `registration` lives until the write is
    /// done, so the lease is kept meanwhile.
    async fn finish(&self, task: &Task, outcome: Outcome, registration: Registration) {
        let i = &self.inner.ctx;
        registration.run_ended();
        let ran = task
            .started_at
            .map(|s| (chrono::Utc::now() - s).to_std().unwrap_or_default())
            .unwrap_or_default();
        let event = match &outcome {
            Outcome::Succeeded(AgentOutput {
                snooze: Some(d), ..
            }) => Some((
                "snoozed",
                serde_json::json!({ "attempt": task.attempts, "seconds": d.min(&crate::agents::MAX_SNOOZE).as_secs_f64() }),
            )),
            Outcome::Failed(e) => Some((
                "attempt_failed",
                serde_json::json!({ "attempt": task.attempts, "error": e.message }),
            )),
            _ => None,
        };
        let attempt = AttemptOf {
            number: task.attempts,
            max: task.max_attempts,
            owner: &i.instance_id,
        };
        let shutting_down = i.shutdown.is_cancelled();
        let decision = decide(outcome, &attempt, shutting_down, chrono::Utc::now(), |a| {
            self.backoff(a)
        });
        let (row, label) = match decision {
            Decision::Complete(result) => (OutcomeRow::succeeded(task.id, result), "succeeded"),
            Decision::LeaveToShutdown => {
                tracing::debug!(task_id = task.id, "task interrupted by shutdown");
                return;
            }
            Decision::Write { to, args, label } => (
                OutcomeRow {
                    id: task.id,
                    to,
                    result: None,
                    error: args.error,
                    run_after: args.run_after,
                    give_back_attempt: args.give_back_attempt,
                    event,
                },
                label,
            ),
        };
        let c = PendingOutcome {
            task: task.clone(),
            row,
            label,
            ran,
            _registration: registration,
        };
        if c.row.to == TaskStatus::Cancelled {
            // Written here, at once: whoever cancelled (a run slot replacing its run, an
            // API call) waits for the run to end, and it ends when its outcome is written.
            self.inner
                .writer
                .write_outcomes(&self.inner.ctx, &mut vec![c])
                .await;
            return;
        }
        if let Err(c) = self.inner.writer.send(c).await {
            // The writer has stopped (shutdown): write this one here, once.
            self.inner
                .writer
                .write_outcomes(&self.inner.ctx, &mut vec![c])
                .await;
        }
    }

    /// The delay before the next attempt, with the configured base and cap and a random
    /// 50–100 % jitter ([`retry_backoff`]).
    fn backoff(&self, attempt: i32) -> Duration {
        let w = &self.inner.ctx.config.load().workers;
        retry_backoff(
            w.retry_backoff.get(),
            w.retry_backoff_max.get(),
            attempt,
            rand::thread_rng().gen_range(0.5..=1.0),
        )
    }
}
