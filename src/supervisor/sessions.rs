//! DB sessions as the watchdog sees them: a warning once for each past
//! `session_warn_age`; a force-close past `session_max_age` (discard flag, backend
//! terminated, owner cancelled); lent pool capacity for one whose holder keeps it anyway;
//! and the callers holding the most, for the pool alert.

use super::Supervisor;
use super::SupervisorError;
use super::TickReport;
use crate::alerts;
use crate::alerts::Severity;
use crate::config::Config;
use crate::db::tracker::SessionInfo;
use crate::metrics as m;
use crate::store::activity;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// One caller's share of the live sessions, as the pool alert reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CallerSessions {
    /// Where the sessions were checked out, with their label: `file:line:col (label)`.
    pub caller: String,
    pub sessions: usize,
    pub oldest_age_seconds: f64,
}

/// The `n` callers holding the most sessions, most first (ties by name, so the alert
/// reads the same on every tick), each with the age of its oldest session. `live` is
/// each session's caller and age.
pub fn top_callers(
    live: impl IntoIterator<Item = (String, Duration)>,
    n: usize,
) -> Vec<CallerSessions> {
    let mut by: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    for (caller, age) in live {
        let e = by.entry(caller).or_default();
        e.0 += 1;
        e.1 = e.1.max(age.as_secs_f64());
    }
    let mut v: Vec<_> = by.into_iter().collect();
    v.sort_by(|a, b| b.1.0.cmp(&a.1.0).then(a.0.cmp(&b.0)));
    v.into_iter()
        .take(n)
        .map(|(caller, (sessions, oldest))| CallerSessions {
            caller,
            sessions,
            oldest_age_seconds: oldest,
        })
        .collect()
}

impl Supervisor {
    /// Callers holding the most sessions right now ([`top_callers`]).
    pub(super) fn top_callers(&self, n: usize) -> Vec<CallerSessions> {
        let live = self.db.tracker().live_sessions();
        top_callers(
            live.iter()
                .map(|s| (format!("{} ({})", s.caller, s.label), s.age())),
            n,
        )
    }

    /// Warns once about each session past `session_warn_age`; force-closes each past
    /// `session_max_age`, and lends the pool capacity for one still held a tick later.
    pub(super) async fn check_sessions(
        &mut self,
        cfg: &Config,
        report: &mut TickReport,
    ) -> Result<(), SupervisorError> {
        let tracker = Arc::clone(self.db.tracker());
        let live = tracker.live_sessions();
        report.sessions_open = live.len();
        let s = &cfg.supervisor;
        let mut to_force_close = Vec::new();
        for info in &live {
            let age = info.age();
            if age < s.session_warn_age.get() {
                break; // oldest first: the rest are younger
            }
            self.warn_long_lived(info, age, report);
            if age < s.session_max_age.get() {
                continue;
            }
            if info.mark_force_closed() {
                // Flag first: whatever happens next, this connection is not recycled.
                info.request_discard();
                to_force_close.push(Arc::clone(info));
                tracker.record_force_close();
                report.sessions_force_closed += 1;
                self.alert_force_closed(info, age, cfg);
            } else if self.db.lend_capacity_for(info) {
                // Force-closed on an earlier tick and still held: its holder ignores
                // cancellation. Give the pool its connection of capacity back anyway.
                report.capacity_lent += 1;
                tracing::error!(session_id = info.id, caller = %info.caller, label = info.label, lent = self.db.lent(), "force-closed session still held; pool lends one connection of capacity until it is dropped");
            }
        }
        if to_force_close.is_empty() {
            return Ok(());
        }
        self.metrics
            .counter(m::DB_SESSIONS_FORCE_CLOSED_TOTAL, &[])
            .absolute(tracker.counts().force_closed);
        self.force_close(&to_force_close).await
    }

    /// Logs a long-lived session once, with who holds it.
    fn warn_long_lived(&self, info: &SessionInfo, age: Duration, report: &mut TickReport) {
        if !info.mark_warned() {
            return;
        }
        report.sessions_warned += 1;
        self.metrics
            .counter(m::DB_SESSIONS_LONG_LIVED_TOTAL, &[])
            .increment(1);
        tracing::warn!(
            session_id = info.id,
            caller = %info.caller,
            label = info.label,
            age_s = age.as_secs_f64(),
            backend_pid = info.backend_pid,
            task_id = info.owner.as_ref().map(|o| o.task_id),
            backtrace = info.backtrace.as_ref().map(|b| b.to_string()),
            "long-lived database session"
        );
    }

    fn alert_force_closed(&self, info: &SessionInfo, age: Duration, cfg: &Config) {
        self.alerts.event(
            alerts::SESSION_FORCE_CLOSED,
            Severity::Critical,
            format!(
                "force-closed a database session held {:.0}s (limit {:.0}s) by {}",
                age.as_secs_f64(),
                cfg.supervisor.session_max_age.get().as_secs_f64(),
                info.caller
            ),
            json!({
                "session_id": info.id, "caller": info.caller.to_string(), "label": info.label,
                "age_seconds": age.as_secs_f64(), "backend_pid": info.backend_pid,
                "task_id": info.owner.as_ref().map(|o| o.task_id),
            }),
        );
    }

    /// Terminates the sessions' backends before waking their owners, so nothing more runs
    /// on them; the owners are cancelled even if the admin connection is down.
    async fn force_close(&mut self, sessions: &[Arc<SessionInfo>]) -> Result<(), SupervisorError> {
        // Pid 0: behind a transaction pooler no backend is ours to terminate; the owner's
        // cancel and the discarded connection end the transaction (SET LOCAL limits bound
        // it on the server meanwhile).
        let pids: Vec<i32> = sessions
            .iter()
            .map(|i| i.backend_pid)
            .filter(|p| *p > 0)
            .collect();
        let terminated = self.terminate(&pids).await;
        for info in sessions {
            if let Some(owner) = &info.owner {
                owner.cancel.cancel();
            }
        }
        let n = terminated?;
        self.metrics
            .counter(m::DB_BACKENDS_TERMINATED_TOTAL, &[])
            .increment(n as u64);
        Ok(())
    }

    /// pg_terminate_backend on each pid; returns how many were terminated.
    async fn terminate(&mut self, pids: &[i32]) -> Result<usize, SupervisorError> {
        Ok(activity::terminate_listed(self.admin().await?, pids).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn top_callers_counts_per_caller_and_keeps_the_oldest_age() {
        let live = [
            ("a.rs:1:1 (store.x)", secs(5)),
            ("b.rs:2:2 (store.y)", secs(1)),
            ("a.rs:1:1 (store.x)", secs(9)),
            ("c.rs:3:3 (store.z)", secs(2)),
            ("b.rs:2:2 (store.y)", secs(3)),
            ("a.rs:1:1 (store.x)", secs(4)),
        ]
        .map(|(c, a)| (c.to_string(), a));
        let top = top_callers(live, 5);
        let got: Vec<(&str, usize, f64)> = top
            .iter()
            .map(|c| (c.caller.as_str(), c.sessions, c.oldest_age_seconds))
            .collect();
        assert_eq!(
            got,
            [
                ("a.rs:1:1 (store.x)", 3, 9.0),
                ("b.rs:2:2 (store.y)", 2, 3.0),
                ("c.rs:3:3 (store.z)", 1, 2.0),
            ]
        );
    }

    #[test]
    fn top_callers_breaks_ties_by_name_and_keeps_n() {
        let live = ["z", "m", "a", "m", "z"].map(|c| (c.to_string(), secs(1)));
        let names = |n| -> Vec<String> {
            top_callers(live.clone(), n)
                .into_iter()
                .map(|c| c.caller)
                .collect()
        };
        assert_eq!(names(5), ["m", "z", "a"]);
        assert_eq!(names(2), ["m", "z"]);
        assert!(names(0).is_empty());
        assert!(top_callers(Vec::new(), 5).is_empty());
    }

    #[test]
    fn top_callers_serialize_as_the_alert_reports_them() {
        let top = top_callers(
            [("a.rs:1:1 (x)".to_string(), Duration::from_millis(1500))],
            1,
        );
        assert_eq!(
            serde_json::to_value(&top).unwrap_or_default(),
            json!([{ "caller": "a.rs:1:1 (x)", "sessions": 1, "oldest_age_seconds": 1.5 }])
        );
    }
}
