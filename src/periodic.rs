//! One shape for every periodic loop: wait until the next run is due, run one pass under a
//! deadline and raced against shutdown, measure lateness and overruns, never fire a burst
//! of catch-up runs after a stall. The supervisor, the lease keeper and the leader use it;
//! the claimer and the notification listener are event-driven and do not.
//!
//! ```ignore
//! let mut every = Periodic::new("leader", metrics, shutdown);
//! while every.wait(period).await {
//!     match every.run(deadline, work()).await { Ran::Done(r) => .., Ran::Missed => .., Ran::Shutdown => break }
//! }
//! ```

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{self as m, Metrics};

/// How one pass ended.
#[derive(Debug)]
pub enum Ran<T> {
    Done(T),
    /// The pass missed its deadline and was dropped (counted and logged).
    Missed,
    /// Shutdown came first; the loop should end.
    Shutdown,
}

pub struct Periodic {
    name: &'static str,
    metrics: Metrics,
    shutdown: CancellationToken,
    next: Instant,
    period: Duration,
}

impl Periodic {
    /// The first run is due at once.
    pub fn new(name: &'static str, metrics: Metrics, shutdown: CancellationToken) -> Periodic {
        Periodic {
            name,
            metrics,
            shutdown,
            next: Instant::now(),
            period: Duration::ZERO,
        }
    }

    /// Sleeps until the next run is due; false at shutdown. `period` (re-read by the
    /// caller each time, so a reload applies) spaces this run from the next.
    pub async fn wait(&mut self, period: Duration) -> bool {
        self.wait_or(period, std::future::pending()).await
    }

    /// Like [`Periodic::wait`], but the run is due at once if `early` completes first:
    /// something happened that the next run must look at now (a dropped connection).
    pub async fn wait_or(&mut self, period: Duration, early: impl Future<Output = ()>) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => return false,
            _ = tokio::time::sleep_until(self.next) => {}
            _ = early => self.next = Instant::now(),
        }
        self.period = period;
        let lateness = Instant::now().saturating_duration_since(self.next);
        self.metrics
            .gauge(m::LOOP_LATENESS_SECONDS, &[("loop", self.name)])
            .set(lateness.as_secs_f64());
        true
    }

    /// Brings the next run forward to `within` from now, if it is due later (a pass that
    /// failed and is worth retrying sooner than the period).
    pub fn due_within(&mut self, within: Duration) {
        let soon = Instant::now() + within;
        if soon < self.next {
            self.next = soon;
        }
    }

    /// Runs one pass under `deadline`, raced against shutdown, and schedules the next.
    pub async fn run<T>(&mut self, deadline: Duration, pass: impl Future<Output = T>) -> Ran<T> {
        let started = Instant::now();
        let ran = tokio::select! {
            _ = self.shutdown.cancelled() => Ran::Shutdown,
            r = tokio::time::timeout(deadline, pass) => match r {
                Ok(v) => Ran::Done(v),
                Err(_) => Ran::Missed,
            },
        };
        let took = started.elapsed();
        self.metrics
            .histogram(m::LOOP_RUN_SECONDS, &[("loop", self.name)])
            .record(took.as_secs_f64());
        if matches!(ran, Ran::Missed) {
            self.metrics
                .counter(m::LOOP_DEADLINE_MISSES_TOTAL, &[("loop", self.name)])
                .increment(1);
            tracing::error!(
                r#loop = self.name,
                deadline_ms = deadline.as_millis() as u64,
                "periodic pass missed its deadline and was dropped"
            );
        } else if took > self.period {
            self.metrics
                .counter(m::LOOP_OVERRUNS_TOTAL, &[("loop", self.name)])
                .increment(1);
            tracing::warn!(
                r#loop = self.name,
                took_ms = took.as_millis() as u64,
                period_ms = self.period.as_millis() as u64,
                "periodic pass overran its period"
            );
        }
        self.next = self.next.checked_add(self.period).unwrap_or(self.next);
        // After a long stall, do not fire a burst of catch-up runs.
        let now = Instant::now();
        if self.next < now {
            self.next = now;
        }
        ran
    }
}
