//! The scheduler: queues the runs of `[schedules.NAME]` at their due times (cron, UTC).
//!
//! Every instance runs it, not only the leader: a schedule may be due every second, and
//! leadership can lapse for up to one `workers.lease` in a failover, which would stall
//! every schedule meanwhile; exactly-once does not need a leader, since it comes from
//! PostgreSQL (`Store::fire_schedule`: the schedule's row, locked, and advanced in the
//! transaction that inserts the task). Each instance wakes at each due time (dated by the
//! database's clock, so skewed hosts agree), tries, and one of them queues the run.
//!
//! Missed runs (no instance was up over several due times) are not replayed as a burst:
//! one run is queued for the latest missed due time, and the others are counted in
//! `taskwarden_schedule_skipped_total` and logged.

use super::Context;
use crate::metrics as m;
use crate::periodic::Periodic;
use crate::periodic::Ran;
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use std::time::Instant;

use chrono::{DateTime, Utc};

use crate::store::{Fired, ScheduledTask};

/// The longest the scheduler sleeps between passes (a reload adding a schedule applies
/// within it).
pub const SCHEDULER_MAX_SLEEP: Duration = Duration::from_secs(1);
/// Woken this long after a due time, so the database's clock has surely passed it.
const AFTER_DUE: Duration = Duration::from_millis(5);
/// Tried again this soon when another instance held the row.
const BUSY_RETRY: Duration = Duration::from_millis(200);

/// What this instance knows of one schedule, for `/v1/status`.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct ScheduleState {
    pub cron: String,
    pub agent: String,
    /// The latest due time queued (by any instance), as last read here.
    pub last_due: Option<DateTime<Utc>>,
    pub last_task_id: Option<i64>,
    /// The next due time after `last_due` (or after now).
    pub next_due: Option<DateTime<Utc>>,
    /// When this instance tries next.
    #[serde(skip)]
    wake_at: Option<Instant>,
}

/// The schedules as the scheduler last saw them (for `/v1/status` and its next wake-up).
#[derive(Default)]
pub(super) struct Scheduler {
    schedules: Mutex<BTreeMap<String, ScheduleState>>,
}

impl Scheduler {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, ScheduleState>> {
        self.schedules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The scheduler loop (see the module doc); under the periodic driver.
    pub(super) async fn run(&self, ctx: &Context) {
        let mut every = Periodic::new("scheduler", ctx.metrics.clone(), ctx.shutdown.clone());
        loop {
            if !every.wait(SCHEDULER_MAX_SLEEP).await {
                break;
            }
            let deadline = ctx.config.load().database.query_timeout.get() * 2;
            match every.run(deadline, self.run_once(ctx)).await {
                Ran::Done(Some(wake)) => every.due_within(wake),
                Ran::Done(None) | Ran::Missed => {}
                Ran::Shutdown => break,
            }
        }
    }

    /// One pass: tries every schedule whose wake-up time has come; returns how soon the
    /// next one is due (None: none within [`SCHEDULER_MAX_SLEEP`]).
    pub(super) async fn run_once(&self, ctx: &Context) -> Option<Duration> {
        let cfg = ctx.config.load_full();
        tracing::debug!(schedules = cfg.schedules.len(), "scheduler pass");
        {
            // Drop what a reload removed.
            let mut st = self.lock();
            st.retain(|name, _| cfg.schedules.contains_key(name));
        }
        for (name, sc) in &cfg.schedules {
            let wake_at = {
                let mut st = self.lock();
                let e = st.entry(name.clone()).or_default();
                if e.cron != sc.cron || e.agent != sc.agent {
                    // New, or changed by a reload: try at once.
                    e.cron = sc.cron.clone();
                    e.agent = sc.agent.clone();
                    e.wake_at = None;
                }
                e.wake_at
            };
            if wake_at.is_some_and(|w| w > Instant::now()) {
                continue;
            }
            let cron = match crate::config::parse_cron(&sc.cron) {
                Ok(c) => c,
                Err(e) => {
                    // Validation refuses such a config; never reached in practice.
                    tracing::error!(schedule = %name, error = %e, "schedule skipped");
                    continue;
                }
            };
            let task = ScheduledTask {
                schedule: name,
                agent: &sc.agent,
                payload: &sc.payload,
                priority: sc.priority,
            };
            let fired = ctx.store.fire_schedule(&cron, &task).await;
            let mut st = self.lock();
            let e = st.entry(name.clone()).or_default();
            let next_in = match fired {
                Ok(Fired::Queued {
                    due,
                    task_id,
                    skipped,
                    now,
                }) => {
                    ctx.metrics
                        .counter(m::SCHEDULE_RUNS_TOTAL, &[("schedule", name.as_str())])
                        .increment(1);
                    if skipped > 0 {
                        ctx.metrics
                            .counter(m::SCHEDULE_SKIPPED_TOTAL, &[("schedule", name.as_str())])
                            .increment(skipped);
                        tracing::warn!(schedule = %name, %due, skipped, "missed due times not run; queued the latest one only");
                    }
                    tracing::info!(schedule = %name, %due, task_id, agent = %sc.agent, "periodic task queued");
                    e.last_due = Some(due);
                    e.last_task_id = Some(task_id);
                    next_after(&cron, e, due, now)
                }
                Ok(Fired::NotDue { last_due, now }) => {
                    e.last_due = Some(last_due);
                    next_after(&cron, e, last_due.max(now), now)
                }
                Ok(Fired::Busy) => BUSY_RETRY,
                Err(err) => {
                    tracing::warn!(schedule = %name, error = %err, "queueing a periodic task failed; retrying");
                    SCHEDULER_MAX_SLEEP
                }
            };
            e.wake_at = Some(Instant::now() + next_in);
        }
        let now = Instant::now();
        self.lock()
            .values()
            .filter_map(|e| e.wake_at)
            .map(|w| w.saturating_duration_since(now))
            .min()
    }

    /// Each schedule as this instance last saw it.
    pub(super) fn status(&self) -> BTreeMap<String, ScheduleState> {
        self.lock().clone()
    }
}

/// Records the next due time after `after` and returns how long until it, by the
/// database's clock `now` (at most [`SCHEDULER_MAX_SLEEP`], so reloads apply).
fn next_after(
    cron: &croner::Cron,
    e: &mut ScheduleState,
    after: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Duration {
    e.next_due = cron.find_next_occurrence(&after, false).ok();
    match e.next_due {
        Some(next) => (next - now)
            .to_std()
            .unwrap_or(Duration::ZERO)
            .saturating_add(AFTER_DUE)
            .min(SCHEDULER_MAX_SLEEP),
        None => SCHEDULER_MAX_SLEEP,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64, ms: u32) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, ms * 1_000_000).unwrap_or_default()
    }

    #[test]
    fn the_next_wake_is_just_after_the_next_due_time_by_the_database_clock() {
        let cron = crate::config::parse_cron("*/2 * * * * *").unwrap();
        let mut e = ScheduleState::default();
        // 1_700_000_000 is even: due times fall on even seconds.
        let d = next_after(&cron, &mut e, at(0, 0), at(0, 300));
        assert_eq!(e.next_due, Some(at(2, 0)));
        assert_eq!(d, Duration::from_millis(1700).min(SCHEDULER_MAX_SLEEP));
        let d = next_after(&cron, &mut e, at(0, 0), at(1, 500));
        assert_eq!(d, Duration::from_millis(505));
        // Already past (a slow pass): at once, plus the margin.
        let d = next_after(&cron, &mut e, at(0, 0), at(3, 0));
        assert_eq!(d, AFTER_DUE);
    }
}
