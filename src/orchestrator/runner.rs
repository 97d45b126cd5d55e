//! One attempt of one task: run the agent under its cancel token and time limit, write
//! the output it kept during an outage, then record the outcome (successes go to the
//! batched completion writer; the rest through the state machine, retried while the
//! database is unreachable, with the lease held).

#[allow(unused_imports)]
use super::*;

impl Orchestrator {
    /// Runs one attempt of `task` (already running under our lease) on its own task.
    pub(super) fn spawn_run(
        &self,
        task: Task,
        entry: AgentEntry,
        cancel: CancellationToken,
        slot: Option<(String, CancellationToken, tokio::sync::OwnedSemaphorePermit)>,
    ) {
        let i = Arc::clone(&self.inner);
        i.total.fetch_add(1, Ordering::Relaxed);
        *i.counts().entry(task.agent.clone()).or_insert(0) += 1;
        let count = RunCount {
            inner: Arc::clone(&i),
            agent: task.agent.clone(),
        };
        let registration = i.running.register(task.id, &task.agent, cancel.clone());
        let this = self.clone();
        i.tasks.spawn(async move {
            let _count = count;
            // Whatever happens, the slot's waiters learn that this run ended.
            let _done = slot.as_ref().map(|(_, done, _)| done.clone().drop_guard());
            let mut outcome = this.attempt(&task, &entry, &cancel).await;
            if entry.planner
                && let Outcome::Succeeded(out) = &outcome
                && let Err(e) = this.apply_plan(&task, &out.result).await
            {
                outcome = Outcome::Failed(e);
            }
            this.finish(&task, outcome, registration).await;
            if let Some((session, _, _permit)) = &slot {
                let mut slots = this.inner.slots();
                if slots.get(session).is_some_and(|e| e.task_id == task.id) {
                    slots.remove(session);
                }
            }
        });
    }

    pub(super) async fn attempt(
        &self,
        task: &Task,
        entry: &AgentEntry,
        cancel: &CancellationToken,
    ) -> Outcome {
        let i = &self.inner;
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
        let owner = Owner {
            task_id: task.id,
            cancel: cancel.clone(),
        };
        let ctx = TaskContext::new(
            task,
            cancel.clone(),
            i.store.for_task(owner),
            i.hub.clone(),
            i.metrics.clone(),
        );
        tracing::debug!(task_id = task.id, agent = %task.agent, attempt = task.attempts, "task started");
        let output = ctx.output();
        let outcome = tokio::select! {
            biased;
            _ = cancel.cancelled() => Outcome::Cancelled,
            r = tokio::time::timeout(limit, entry.agent.run(ctx)) => match r {
                Ok(Ok(out)) => Outcome::Succeeded(out),
                Ok(Err(e)) => Outcome::Failed(e),
                Err(_) => Outcome::TimedOut(limit),
            },
        };
        if !matches!(outcome, Outcome::Cancelled) {
            self.flush_output(task, &output, cancel).await;
        }
        outcome
    }

    /// Writes the events and usage the attempt kept during a database outage, before its
    /// outcome; retried with backoff while the database is unreachable (the lease is kept
    /// meanwhile), given up on shutdown, cancellation or a refusal by the database.
    pub(super) async fn flush_output(
        &self,
        task: &Task,
        output: &OutputWriter,
        cancel: &CancellationToken,
    ) {
        let mut attempt = 0u32;
        while !output.is_flushed() {
            match output.flush().await {
                Ok(()) => {
                    tracing::info!(task_id = task.id, agent = %task.agent, "kept task output written after a database outage");
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(task_id = task.id, agent = %task.agent, attempt, error = %e, "writing kept task output failed; retrying");
                    if cancel.is_cancelled() || !self.retry_pause(&mut attempt).await {
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

    /// Records an attempt's outcome. `registration` lives until the write is done.
    pub(super) async fn finish(&self, task: &Task, outcome: Outcome, registration: Registration) {
        let i = &self.inner;
        let ran = task
            .started_at
            .map(|s| (chrono::Utc::now() - s).to_std().unwrap_or_default())
            .unwrap_or_default();
        if let Outcome::Failed(e) = &outcome {
            let _ = i
                .store
                .add_event(
                    task.id,
                    "attempt_failed",
                    &serde_json::json!({ "attempt": task.attempts, "error": e.message }),
                )
                .await;
        }
        let attempt = AttemptOf {
            number: task.attempts,
            max: task.max_attempts,
            owner: &i.instance_id,
        };
        let shutting_down = i.shutdown.is_cancelled();
        let decision = decide(outcome, &attempt, shutting_down, chrono::Utc::now(), |a| {
            self.backoff(a)
        });
        match decision {
            Decision::Complete(result) => {
                let c = Completion {
                    task: task.clone(),
                    result,
                    ran,
                    _registration: registration,
                };
                if i.completions.send(c).await.is_err() {
                    tracing::warn!(
                        task_id = task.id,
                        "completion writer gone (shutting down); the lease will re-queue the task"
                    );
                }
            }
            Decision::LeaveToShutdown => {
                tracing::debug!(task_id = task.id, "task interrupted by shutdown");
            }
            Decision::Write { to, args, label } => {
                let written = self.record_outcome(task, to, &args, label).await;
                drop(registration);
                if written {
                    self.finished(task, to, label, ran).await;
                }
            }
        }
    }

    /// Writes a non-success outcome through the state machine, retrying while the
    /// database is unreachable (the caller holds the lease meanwhile); gives up when someone
    /// else decided first, the lease was lost, or the daemon stops. True when written.
    async fn record_outcome(
        &self,
        task: &Task,
        to: TaskStatus,
        args: &TransitionArgs,
        label: &str,
    ) -> bool {
        let i = &self.inner;
        let mut written = false;
        let mut attempt = 0u32;
        loop {
            match i.store.transition(task.id, to, args).await {
                Ok(_) => {
                    written = true;
                    break;
                }
                Err(StoreError::IllegalTransition { from, .. }) => {
                    // Someone else decided first (cancel, supervisor timeout, lease expiry).
                    tracing::info!(task_id = task.id, outcome = label, now = %from, "task outcome not recorded: status already changed");
                    break;
                }
                Err(StoreError::LeaseLost { holder, .. }) => {
                    tracing::warn!(
                        task_id = task.id,
                        outcome = label,
                        ?holder,
                        "task outcome not recorded: lease lost"
                    );
                    break;
                }
                Err(e) => {
                    // The database may be restarting: keep the outcome (and the lease,
                    // through the registration) until it can be written, or until shutdown.
                    tracing::error!(task_id = task.id, outcome = label, attempt, error = %e, "recording task outcome failed; retrying");
                    if !self.retry_pause(&mut attempt).await {
                        break;
                    }
                }
            }
        }
        written
    }

    /// Bookkeeping after an outcome was written: metrics, log, objective follow-ups.
    pub(super) async fn finished(&self, task: &Task, to: TaskStatus, label: &str, ran: Duration) {
        let i = &self.inner;
        let outcome = if label == "retried" { "failed" } else { label };
        i.metrics
            .counter(
                m::TASKS_FINISHED_TOTAL,
                &[("agent", &task.agent), ("outcome", outcome)],
            )
            .increment(1);
        i.metrics
            .histogram(m::TASK_DURATION_SECONDS, &[("agent", &task.agent)])
            .record(ran.as_secs_f64());
        tracing::debug!(task_id = task.id, agent = %task.agent, outcome = label, ran_ms = ran.as_millis() as u64, "task finished");
        if task.objective_id.is_some() {
            if to != TaskStatus::Succeeded && to != TaskStatus::Queued {
                self.cascade().await;
            }
            // Dependants may be runnable now, here or elsewhere.
            i.wake.notify_one();
            let _ = i.store.notify_runnable().await;
        }
    }

    /// Backoff between attempts to write an outcome ([`write_retry_pause`]). False when
    /// the daemon is shutting down (the outcome is then left to lease expiry).
    pub(super) async fn retry_pause(&self, attempt: &mut u32) -> bool {
        let pause = write_retry_pause(*attempt);
        *attempt += 1;
        tokio::select! {
            _ = self.inner.shutdown.cancelled() => false,
            _ = tokio::time::sleep(pause) => true,
        }
    }

    /// The delay before the next attempt, with the configured base and cap and a random
    /// 50–100 % jitter ([`retry_backoff`]).
    pub(super) fn backoff(&self, attempt: i32) -> Duration {
        let w = &self.inner.config.load().workers;
        retry_backoff(
            w.retry_backoff.get(),
            w.retry_backoff_max.get(),
            attempt,
            rand::thread_rng().gen_range(0.5..=1.0),
        )
    }
}

/// Exponential backoff between attempts of a task: base·2^(attempt-1) (attempt clamped to
/// 1..=20), capped at `max`, then scaled by `jitter` so retries of many tasks that failed
/// together spread out.
pub(super) fn retry_backoff(base: Duration, max: Duration, attempt: i32, jitter: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << (attempt.clamp(1, 20) - 1) as u32);
    exp.min(max).mul_f64(jitter)
}

/// Pause before retrying a failed write of an outcome or of kept output: 200 ms doubling
/// to 5 s. No jitter: a restarting database is retried by few writers at a time.
pub(super) fn write_retry_pause(attempt: u32) -> Duration {
    Duration::from_millis(200u64 << attempt.min(5)).min(Duration::from_secs(5))
}

/// Which attempt of a task ended, and whose lease it runs under.
pub(super) struct AttemptOf<'a> {
    pub number: i32,
    pub max: i32,
    pub owner: &'a str,
}

/// What an attempt's outcome asks to be written.
#[derive(Debug)]
pub(super) enum Decision {
    /// Succeeded: the result goes to the batched completion writer.
    Complete(Option<serde_json::Value>),
    /// Cancelled by shutdown: nothing is written; shutdown re-queues the task.
    LeaveToShutdown,
    /// A status change through the state machine, under our lease; `label` names the
    /// outcome in logs and metrics.
    Write {
        to: TaskStatus,
        args: TransitionArgs,
        label: &'static str,
    },
}

/// Maps an attempt's outcome to the state transition it makes, without the database: a
/// retryable failure with attempts left goes back to the queue after `backoff(attempt)`,
/// any other failure fails the task, a time-out times it out, a cancel (not by shutdown)
/// cancels it. `now` dates the retry.
pub(super) fn decide(
    outcome: Outcome,
    attempt: &AttemptOf<'_>,
    shutting_down: bool,
    now: chrono::DateTime<chrono::Utc>,
    backoff: impl FnOnce(i32) -> Duration,
) -> Decision {
    let args = |error: String| TransitionArgs {
        expected_owner: Some(attempt.owner.to_string()),
        error: Some(error),
        ..Default::default()
    };
    let (to, args, label) = match outcome {
        Outcome::Succeeded(out) => return Decision::Complete(out.result),
        Outcome::Failed(e) => {
            let error = format!("attempt {}: {}", attempt.number, e.message);
            if e.retryable && attempt.number < attempt.max {
                // A delay too large to add to `now` retries at once rather than never.
                let run_after = chrono::Duration::from_std(backoff(attempt.number))
                    .ok()
                    .and_then(|d| now.checked_add_signed(d))
                    .unwrap_or(now);
                let args = TransitionArgs {
                    run_after: Some(run_after),
                    ..args(error)
                };
                (TaskStatus::Queued, args, "retried")
            } else {
                (TaskStatus::Failed, args(error), "failed")
            }
        }
        Outcome::TimedOut(limit) => (
            TaskStatus::TimedOut,
            args(format!("exceeded its time limit ({}s)", limit.as_secs())),
            "timed_out",
        ),
        Outcome::Cancelled if shutting_down => return Decision::LeaveToShutdown,
        Outcome::Cancelled => (TaskStatus::Cancelled, args("cancelled".into()), "cancelled"),
    };
    Decision::Write { to, args, label }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: &str = "host:1:abc";

    fn now() -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default()
    }

    fn attempt(number: i32, max: i32) -> AttemptOf<'static> {
        AttemptOf {
            number,
            max,
            owner: OWNER,
        }
    }

    fn no_backoff(_: i32) -> Duration {
        panic!("backoff asked for an outcome that is not retried")
    }

    /// The write a decision makes; panics on the two that write nothing here.
    fn write(d: Decision) -> (TaskStatus, TransitionArgs, &'static str) {
        match d {
            Decision::Write { to, args, label } => {
                // Every outcome is written from `running`, through the state machine.
                assert!(TaskStatus::Running.can_transition_to(to), "running -> {to}");
                assert_eq!(args.expected_owner.as_deref(), Some(OWNER));
                (to, args, label)
            }
            other => panic!("expected a write, got {other:?}"),
        }
    }

    #[test]
    fn success_goes_to_the_completion_writer_even_at_shutdown() {
        for shutting_down in [false, true] {
            let out = AgentOutput {
                result: Some(serde_json::json!({"answer": 42})),
            };
            match decide(
                Outcome::Succeeded(out),
                &attempt(1, 3),
                shutting_down,
                now(),
                no_backoff,
            ) {
                Decision::Complete(r) => assert_eq!(r, Some(serde_json::json!({"answer": 42}))),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_retryable_failure_with_attempts_left_is_requeued_after_the_backoff() {
        let mut asked = None;
        let d = decide(
            Outcome::Failed(AgentError::retryable("boom")),
            &attempt(2, 3),
            false,
            now(),
            |a| {
                asked = Some(a);
                Duration::from_secs(7)
            },
        );
        let (to, args, label) = write(d);
        assert_eq!((to, label), (TaskStatus::Queued, "retried"));
        assert_eq!(asked, Some(2));
        assert_eq!(args.run_after, Some(now() + chrono::Duration::seconds(7)));
        assert_eq!(args.error.as_deref(), Some("attempt 2: boom"));
    }

    #[test]
    fn a_failure_fails_the_task_when_fatal_or_out_of_attempts() {
        for (err, n, max) in [
            (AgentError::retryable("boom"), 3, 3),
            (AgentError::retryable("boom"), 4, 3),
            (AgentError::fatal("boom"), 1, 3),
        ] {
            let (to, args, label) = write(decide(
                Outcome::Failed(err),
                &attempt(n, max),
                false,
                now(),
                no_backoff,
            ));
            assert_eq!((to, label), (TaskStatus::Failed, "failed"));
            assert_eq!(args.run_after, None);
            assert_eq!(args.error, Some(format!("attempt {n}: boom")));
        }
        // Shutdown does not stop a failure from being written.
        let d = decide(
            Outcome::Failed(AgentError::fatal("x")),
            &attempt(1, 1),
            true,
            now(),
            no_backoff,
        );
        assert_eq!(write(d).0, TaskStatus::Failed);
    }

    #[test]
    fn a_backoff_too_large_for_the_calendar_retries_at_once() {
        let d = decide(
            Outcome::Failed(AgentError::retryable("boom")),
            &attempt(1, 3),
            false,
            now(),
            |_| Duration::from_secs(u64::MAX),
        );
        assert_eq!(write(d).1.run_after, Some(now()));
    }

    #[test]
    fn time_outs_and_cancels_end_the_task_unless_shutdown_cancelled_it() {
        let d = decide(
            Outcome::TimedOut(Duration::from_secs(30)),
            &attempt(1, 3),
            false,
            now(),
            no_backoff,
        );
        let (to, args, label) = write(d);
        assert_eq!((to, label), (TaskStatus::TimedOut, "timed_out"));
        assert_eq!(args.error.as_deref(), Some("exceeded its time limit (30s)"));

        let (to, args, label) = write(decide(
            Outcome::Cancelled,
            &attempt(1, 3),
            false,
            now(),
            no_backoff,
        ));
        assert_eq!((to, label), (TaskStatus::Cancelled, "cancelled"));
        assert_eq!(args.error.as_deref(), Some("cancelled"));

        let d = decide(Outcome::Cancelled, &attempt(1, 3), true, now(), no_backoff);
        assert!(matches!(d, Decision::LeaveToShutdown), "{d:?}");
    }

    #[test]
    fn backoff_doubles_from_the_base_up_to_the_cap() {
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(1));
        let full: Vec<u128> = (1..=6)
            .map(|a| retry_backoff(base, max, a, 1.0).as_millis())
            .collect();
        assert_eq!(full, [100, 200, 400, 800, 1000, 1000]);
        // Attempts below 1 count as the first; jitter scales the capped delay.
        assert_eq!(retry_backoff(base, max, 0, 1.0), base);
        assert_eq!(retry_backoff(base, max, -5, 1.0), base);
        assert_eq!(retry_backoff(base, max, 3, 0.5), Duration::from_millis(200));
        assert_eq!(retry_backoff(base, max, 9, 0.5), Duration::from_millis(500));
    }

    #[test]
    fn backoff_never_overflows() {
        // Config durations are at most 365 days; a doubling past Duration::MAX saturates
        // and the cap applies.
        let year = Duration::from_secs(365 * 86_400);
        let huge = Duration::from_secs(u64::MAX / 2);
        assert_eq!(retry_backoff(huge, year, 20, 1.0), year);
        assert_eq!(retry_backoff(year, year, i32::MAX, 0.5), year / 2);
        assert_eq!(
            retry_backoff(
                Duration::from_secs(1),
                Duration::from_secs(60),
                i32::MAX,
                1.0
            ),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn write_retries_pause_200ms_doubling_to_5s() {
        let pauses: Vec<u128> = (0..8).map(|a| write_retry_pause(a).as_millis()).collect();
        assert_eq!(pauses, [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        assert_eq!(write_retry_pause(u32::MAX), Duration::from_secs(5));
    }
}
