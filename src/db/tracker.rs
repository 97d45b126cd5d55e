//! The session tracker: a registry of every live DB-session guard — who checked it out
//! (caller location, label), when, which backend it talks to and which task owns it — and
//! the lifetime counts (opened, closed, force-closed).
//!
//! It sits on the checkout path, so it must be cheap: one short critical section on a
//! plain mutex per checkout and per return, never held across an `.await`. The supervisor
//! reads snapshots; it never holds the registry while doing I/O.

use std::backtrace::Backtrace;
use std::collections::HashMap;
use std::panic::Location;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Who owns a session: the task it works for, and how to cancel that task.
#[derive(Debug, Clone)]
pub struct Owner {
    pub task_id: i64,
    pub cancel: CancellationToken,
}

/// What the tracker knows about one live session. Shared between the guard and the
/// registry, so the supervisor can flag a guard for discard while its holder still runs.
#[derive(Debug)]
pub struct SessionInfo {
    pub id: u64,
    pub caller: &'static Location<'static>,
    pub label: &'static str,
    pub checked_out_at: Instant,
    pub backend_pid: i32,
    pub owner: Option<Owner>,
    pub backtrace: Option<Backtrace>,
    discard: AtomicBool,
    warned: AtomicBool,
    in_flight: AtomicBool,
    force_closed: AtomicBool,
    lent: AtomicBool,
}

impl SessionInfo {
    /// Set before a statement is sent and cleared only when its result is in. If the guard
    /// is dropped while set, the caller's future was cancelled mid-statement: the server
    /// may still be executing it, so the connection must not be reused as is.
    pub fn begin_statement(&self) {
        self.in_flight.store(true, Ordering::Release);
    }
    pub fn end_statement(&self) {
        self.in_flight.store(false, Ordering::Release);
    }
    pub fn statement_in_flight(&self) -> bool {
        self.in_flight.load(Ordering::Acquire)
    }
    /// True the first time only: a session is force-closed once.
    pub fn mark_force_closed(&self) -> bool {
        !self.force_closed.swap(true, Ordering::AcqRel)
    }
    pub fn is_force_closed(&self) -> bool {
        self.force_closed.load(Ordering::Acquire)
    }
    /// True the first time only: the pool lends one slot for a force-closed guard that
    /// its holder keeps; the slot is taken back when the guard finally drops.
    pub fn mark_lent(&self) -> bool {
        !self.lent.swap(true, Ordering::AcqRel)
    }
    pub fn is_lent(&self) -> bool {
        self.lent.load(Ordering::Acquire)
    }
    pub fn age(&self) -> Duration {
        self.checked_out_at.elapsed()
    }
    /// Whether the connection must be closed rather than returned to the pool.
    pub fn discard_requested(&self) -> bool {
        self.discard.load(Ordering::Acquire)
    }
    pub fn request_discard(&self) {
        self.discard.store(true, Ordering::Release);
    }
    /// True the first time only: the long-lived warning is logged once per session.
    pub fn mark_warned(&self) -> bool {
        !self.warned.swap(true, Ordering::AcqRel)
    }
}

/// A point-in-time copy of one session for status output.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct SessionSnapshot {
    pub id: u64,
    pub caller: String,
    #[schema(value_type = String)]
    pub label: &'static str,
    pub age_seconds: f64,
    pub backend_pid: i32,
    pub task_id: Option<i64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TrackerCounts {
    pub open: u64,
    pub opened: u64,
    pub closed: u64,
    pub force_closed: u64,
}

#[derive(Debug, Default)]
pub struct Tracker {
    live: Mutex<HashMap<u64, Arc<SessionInfo>>>,
    next_id: AtomicU64,
    opened: AtomicU64,
    closed: AtomicU64,
    force_closed: AtomicU64,
}

/// What the guard passes in at checkout.
pub struct NewSession {
    pub caller: &'static Location<'static>,
    pub label: &'static str,
    pub backend_pid: i32,
    pub owner: Option<Owner>,
    pub capture_backtrace: bool,
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    fn live(&self) -> MutexGuard<'_, HashMap<u64, Arc<SessionInfo>>> {
        // A panic while holding this lock cannot leave the map half-updated (single
        // insert/remove), so a poisoned lock is safe to keep using.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(&self, s: NewSession) -> Arc<SessionInfo> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let info = Arc::new(SessionInfo {
            id,
            caller: s.caller,
            label: s.label,
            checked_out_at: Instant::now(),
            backend_pid: s.backend_pid,
            owner: s.owner,
            backtrace: s.capture_backtrace.then(Backtrace::force_capture),
            discard: AtomicBool::new(false),
            warned: AtomicBool::new(false),
            in_flight: AtomicBool::new(false),
            force_closed: AtomicBool::new(false),
            lent: AtomicBool::new(false),
        });
        self.live().insert(id, Arc::clone(&info));
        self.opened.fetch_add(1, Ordering::Relaxed);
        info
    }

    pub fn unregister(&self, id: u64) {
        if self.live().remove(&id).is_some() {
            self.closed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a force-close done by the supervisor.
    pub fn record_force_close(&self) {
        self.force_closed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn counts(&self) -> TrackerCounts {
        let open = self.live().len() as u64;
        TrackerCounts {
            open,
            opened: self.opened.load(Ordering::Relaxed),
            closed: self.closed.load(Ordering::Relaxed),
            force_closed: self.force_closed.load(Ordering::Relaxed),
        }
    }

    /// Age of the oldest live session, if any (one pass, no allocation of a snapshot).
    pub fn oldest_age(&self) -> Option<std::time::Duration> {
        self.live()
            .values()
            .map(|s| s.checked_out_at)
            .min()
            .map(|t| t.elapsed())
    }

    pub fn open_count(&self) -> usize {
        self.live().len()
    }

    /// Live sessions, oldest first. Clones the Arcs under the lock and sorts outside it.
    pub fn live_sessions(&self) -> Vec<Arc<SessionInfo>> {
        let mut v: Vec<Arc<SessionInfo>> = self.live().values().cloned().collect();
        v.sort_by_key(|s| s.checked_out_at);
        v
    }

    pub fn snapshot(&self) -> Vec<SessionSnapshot> {
        self.live_sessions()
            .iter()
            .map(|s| SessionSnapshot {
                id: s.id,
                caller: s.caller.to_string(),
                label: s.label,
                age_seconds: s.age().as_secs_f64(),
                backend_pid: s.backend_pid,
                task_id: s.owner.as_ref().map(|o| o.task_id),
            })
            .collect()
    }

    /// Backend pids owned by live guards.
    pub fn owned_backends(&self) -> Vec<i32> {
        self.live().values().map(|s| s.backend_pid).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(label: &'static str) -> NewSession {
        NewSession {
            caller: Location::caller(),
            label,
            backend_pid: 42,
            owner: None,
            capture_backtrace: false,
        }
    }

    #[test]
    fn counts_follow_register_and_unregister() {
        let t = Tracker::new();
        let a = t.register(new("a"));
        let b = t.register(new("b"));
        assert_eq!(t.counts().open, 2);
        t.unregister(a.id);
        t.unregister(a.id); // a second return is not counted twice
        let c = t.counts();
        assert_eq!((c.open, c.opened, c.closed), (1, 2, 1));
        assert_eq!(t.snapshot()[0].label, "b");
        assert!(b.mark_warned());
        assert!(!b.mark_warned());
    }

    #[test]
    fn snapshot_is_oldest_first() {
        let t = Tracker::new();
        let _a = t.register(new("first"));
        std::thread::sleep(Duration::from_millis(2));
        let _b = t.register(new("second"));
        let s = t.snapshot();
        assert_eq!(s[0].label, "first");
        assert!(s[0].age_seconds >= s[1].age_seconds);
        assert!(s[0].caller.contains("tracker.rs"));
    }
}
