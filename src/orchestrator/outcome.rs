//! What an attempt's outcome leads to, decided without the database: the transition it
//! writes ([`decide`]), the delay before a retry ([`retry_backoff`]), and the pause
//! between tries to write an outcome while the database is unreachable
//! ([`write_retry_pause`], waited out by [`retry_pause`]). The runner and the outcome
//! writer do the writing.

use super::registry::Kill;
use crate::agents::AgentError;
use crate::agents::AgentOutput;
use crate::agents::storable;
use crate::store::TaskStatus;
use crate::store::TransitionArgs;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How one attempt ended.
pub(super) enum Outcome {
    Succeeded(AgentOutput),
    Failed(AgentError),
    TimedOut(Duration),
    Cancelled,
    /// Ended by the supervisor: a resource limit of the agent, or one of its database
    /// sessions past `session_max_age`.
    Killed(Kill),
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

/// Waits [`write_retry_pause`] before the next try to write, and counts the try. False
/// when the daemon is shutting down first (the outcome is then left to lease expiry).
pub(super) async fn retry_pause(shutdown: &CancellationToken, attempt: &mut u32) -> bool {
    let pause = write_retry_pause(*attempt);
    *attempt += 1;
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(pause) => true,
    }
}

/// An attempt's outcome as the database can store it ([`crate::agents::storable`]): the
/// result cleaned (or, when it is too deep or too large, the attempt failed saying so),
/// the error and a kill's reason cleaned and bounded. The runner applies it to every
/// outcome of every agent kind before anything is written.
pub(super) fn make_storable(outcome: Outcome, limits: &storable::Limits) -> Outcome {
    match outcome {
        Outcome::Succeeded(AgentOutput {
            result: Some(r),
            snooze,
        }) => match storable::result(r, limits) {
            Ok(r) => Outcome::Succeeded(AgentOutput {
                result: Some(r),
                snooze,
            }),
            // A snooze ignores its result anyway.
            Err(_) if snooze.is_some() => Outcome::Succeeded(AgentOutput {
                result: None,
                snooze,
            }),
            Err(e) => Outcome::Failed(AgentError::fatal(format!("result refused: it {e}"))),
        },
        Outcome::Failed(e) => Outcome::Failed(AgentError {
            message: storable::error(&e.message),
            retryable: e.retryable,
        }),
        Outcome::Killed(mut k) => {
            k.reason = storable::error(&k.reason);
            Outcome::Killed(k)
        }
        other => other,
    }
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
    /// Succeeded: the result goes to the batched outcome writer.
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
/// cancels it. A snooze goes back to the queue after its delay (at most
/// [`crate::agents::MAX_SNOOZE`]) and gives the attempt back, even at shutdown. `now`
/// dates the retry or the snooze.
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
        Outcome::Succeeded(AgentOutput {
            snooze: Some(delay),
            ..
        }) => {
            let run_after = chrono::Duration::from_std(delay.min(crate::agents::MAX_SNOOZE))
                .ok()
                .and_then(|d| now.checked_add_signed(d))
                .unwrap_or(now);
            let args = TransitionArgs {
                expected_owner: Some(attempt.owner.to_string()),
                run_after: Some(run_after),
                give_back_attempt: true,
                ..Default::default()
            };
            (TaskStatus::Queued, args, "snoozed")
        }
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
        Outcome::Killed(k) => (k.status, args(k.reason), k.label),
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
    fn success_goes_to_the_outcome_writer_even_at_shutdown() {
        for shutting_down in [false, true] {
            let out = AgentOutput::result(serde_json::json!({"answer": 42}));
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
    fn a_snooze_requeues_after_its_delay_and_gives_the_attempt_back() {
        for (shutting_down, n, max) in [(false, 1, 3), (true, 3, 3)] {
            let out = AgentOutput {
                result: Some(serde_json::json!("ignored")),
                snooze: Some(Duration::from_secs(90)),
            };
            let (to, args, label) = write(decide(
                Outcome::Succeeded(out),
                &attempt(n, max),
                shutting_down,
                now(),
                no_backoff,
            ));
            assert_eq!((to, label), (TaskStatus::Queued, "snoozed"));
            assert!(args.give_back_attempt);
            assert_eq!(args.run_after, Some(now() + chrono::Duration::seconds(90)));
            assert_eq!((args.error, args.result), (None, None));
        }
        // A library agent's snooze longer than the bound is cut to it.
        let (_, args, _) = write(decide(
            Outcome::Succeeded(AgentOutput::snooze(Duration::from_secs(u64::MAX))),
            &attempt(1, 3),
            false,
            now(),
            no_backoff,
        ));
        assert_eq!(
            args.run_after,
            Some(now() + chrono::Duration::days(30)),
            "capped at MAX_SNOOZE"
        );
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
    fn every_outcome_is_made_storable() {
        let l = storable::Limits {
            result_bytes: 32,
            event_bytes: 32,
        };
        let ok = make_storable(
            Outcome::Succeeded(AgentOutput::result(serde_json::json!({"a\u{0}": "b\u{0}"}))),
            &l,
        );
        match ok {
            Outcome::Succeeded(o) => {
                assert_eq!(
                    o.result,
                    Some(serde_json::json!({"a\u{FFFD}": "b\u{FFFD}"}))
                )
            }
            _ => panic!("a cleaned result still succeeds"),
        }
        let big = make_storable(
            Outcome::Succeeded(AgentOutput::result(serde_json::json!("x".repeat(100)))),
            &l,
        );
        match big {
            Outcome::Failed(e) => {
                assert!(!e.retryable);
                assert!(e.message.contains("workers.max_result_bytes = 32"), "{e}");
            }
            _ => panic!("a result over the bound fails the attempt"),
        }
        let snoozed = make_storable(
            Outcome::Succeeded(AgentOutput {
                result: Some(serde_json::json!("x".repeat(100))),
                snooze: Some(Duration::from_secs(1)),
            }),
            &l,
        );
        assert!(matches!(
            snoozed,
            Outcome::Succeeded(AgentOutput {
                result: None,
                snooze: Some(_)
            })
        ));
        let failed = make_storable(
            Outcome::Failed(AgentError::retryable(format!(
                "bad\u{0}byte{}",
                "y".repeat(20_000)
            ))),
            &l,
        );
        match failed {
            Outcome::Failed(e) => {
                assert!(e.retryable);
                assert!(e.message.starts_with("bad\u{FFFD}byte"));
                assert!(e.message.len() <= storable::MAX_ERROR_BYTES + 40);
            }
            _ => panic!("a failure stays a failure"),
        }
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
