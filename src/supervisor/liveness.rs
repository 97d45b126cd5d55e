//! What the rest of the daemon reads of the supervisor: its liveness (last tick, last
//! database error, the dated database view), the one readiness rule `/readyz` and the
//! systemd watchdog share, and the live pool and session gauges written at each scrape.

use crate::config::Config;
use crate::db::Db;
use crate::db::PoolStatus;
use crate::metrics as m;
use crate::metrics::Metrics;
use crate::store::DbView;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

/// Shared view of the loop's liveness, for readiness, the systemd watchdog and status.
#[derive(Debug, Default)]
pub struct Liveness {
    last_tick_unix_ms: AtomicU64,
    ticks: AtomicU64,
    /// Why the last tick could not reach the database, if it could not.
    db_error: std::sync::Mutex<Option<String>>,
    view: std::sync::Mutex<Option<Arc<DbView>>>,
    /// Why outcomes are stalled, if they are (see `supervisor::outcomes`).
    outcome_stall: std::sync::Mutex<Option<String>>,
    /// The view is from an earlier tick: the last read was refused by lock_timeout.
    view_stale: std::sync::atomic::AtomicBool,
    /// Whether this instance's sessions are encrypted, as last read.
    encryption: std::sync::Mutex<Option<super::Encryption>>,
    /// The applications' sessions and the server's connections, as last read.
    watch: std::sync::Mutex<Option<Arc<super::WatchView>>>,
}

/// Why the daemon is not ready, if it is not: the supervisor has not completed a tick
/// within `bound`, or its last tick could not reach the database. `/readyz` and the systemd
/// watchdog both ask this, so they tell the same truth.
pub fn not_ready_reason(liveness: &Liveness, cfg: &Config) -> Option<String> {
    let bound = stall_bound(cfg);
    match liveness.since_last_tick() {
        None => {
            return Some("the supervisor has not completed its first tick yet".into());
        }
        Some(d) if d > bound => {
            return Some(format!(
                "the supervisor has not completed a tick for {:.1}s (bound {:.1}s)",
                d.as_secs_f64(),
                bound.as_secs_f64()
            ));
        }
        Some(_) => {}
    }
    liveness
        .database_error()
        .map(|e| format!("database unreachable: {e}"))
        .or_else(|| liveness.outcome_stall())
}

/// Whether a restart would mend what is wrong: the supervisor stalled, or outcomes are
/// stalled while the database answers the supervisor (a wedged writer). A database that
/// cannot be reached is not mended by restarting the daemon, which would kill the work
/// running here; the systemd watchdog withholds its keep-alive only when this is true.
pub fn restart_would_mend(liveness: &Liveness, cfg: &Config) -> Option<String> {
    match liveness.since_last_tick() {
        Some(d) if d <= stall_bound(cfg) => {}
        other => {
            return Some(format!(
                "supervisor stalled (last tick {:?} ago)",
                other.map(|d| d.as_secs_f64())
            ));
        }
    }
    if liveness.database_error().is_some() {
        return None;
    }
    liveness.outcome_stall()
}

/// Longest a healthy supervisor goes between completed ticks: two intervals, plus the
/// worst a dead link can cost one tick (one connect and one round trip, each bounded).
pub fn stall_bound(cfg: &Config) -> Duration {
    let d = &cfg.database;
    cfg.supervisor
        .interval
        .get()
        .saturating_mul(2)
        .saturating_add(d.connect_timeout.get())
        .saturating_add(d.query_timeout.get())
}

/// Writes the pool and session gauges from live in-memory state. The supervisor calls it
/// each tick and `/metrics` at every scrape, so these gauges are never stale.
pub fn record_live_gauges(metrics: &Metrics, db: &Db) -> PoolStatus {
    let p = db.status();
    metrics
        .gauge(m::DB_POOL_MAX_CONNECTIONS, &[])
        .set(p.max as f64);
    metrics
        .gauge(m::DB_POOL_CONNECTIONS, &[])
        .set(p.size as f64);
    metrics.gauge(m::DB_POOL_IN_USE, &[]).set(p.in_use as f64);
    metrics.gauge(m::DB_POOL_IDLE, &[]).set(p.idle as f64);
    metrics.gauge(m::DB_POOL_WAITING, &[]).set(p.waiting as f64);
    metrics
        .gauge(m::DB_POOL_UTILIZATION_RATIO, &[])
        .set(p.utilization());
    let tracker = db.tracker();
    let counts = tracker.counts();
    metrics
        .gauge(m::DB_SESSIONS_OPEN, &[])
        .set(counts.open as f64);
    metrics
        .counter(m::DB_SESSIONS_OPENED_TOTAL, &[])
        .absolute(counts.opened);
    metrics
        .counter(m::DB_SESSIONS_FORCE_CLOSED_TOTAL, &[])
        .absolute(counts.force_closed);
    metrics
        .gauge(m::DB_SESSION_OLDEST_AGE_SECONDS, &[])
        .set(tracker.oldest_age().map(|a| a.as_secs_f64()).unwrap_or(0.0));
    p
}

impl Liveness {
    /// The last database view, if a tick has read one.
    pub fn view(&self) -> Option<Arc<DbView>> {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub(super) fn set_view(&self, v: DbView) {
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(v));
    }
    /// The watch rules' sessions and the server's connections, if a tick has read them.
    pub fn watch(&self) -> Option<Arc<super::WatchView>> {
        self.watch.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub(super) fn set_watch(&self, v: super::WatchView) {
        *self.watch.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(v));
    }
    /// Whether the view is older than the last tick (its read was refused by a lock).
    pub fn view_stale(&self) -> bool {
        self.view_stale.load(Ordering::Relaxed)
    }
    pub(super) fn set_view_stale(&self, stale: bool) {
        self.view_stale.store(stale, Ordering::Relaxed);
    }
    pub fn database_error(&self) -> Option<String> {
        self.db_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    pub(super) fn set_database_error(&self, e: Option<String>) {
        *self.db_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }
    pub fn outcome_stall(&self) -> Option<String> {
        self.outcome_stall
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    pub fn encryption(&self) -> Option<super::Encryption> {
        self.encryption
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    pub(super) fn set_encryption(&self, seen: super::Encryption) {
        *self.encryption.lock().unwrap_or_else(|p| p.into_inner()) = Some(seen);
    }
    pub(super) fn set_outcome_stall(&self, why: Option<String>) {
        *self.outcome_stall.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }
    pub fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }
    /// Time since the last completed tick, if there was one.
    pub fn since_last_tick(&self) -> Option<Duration> {
        let ms = self.last_tick_unix_ms.load(Ordering::Relaxed);
        if ms == 0 {
            return None;
        }
        let now = unix_ms();
        Some(Duration::from_millis(now.saturating_sub(ms)))
    }
    pub(super) fn ticked(&self) {
        self.last_tick_unix_ms.store(unix_ms(), Ordering::Relaxed);
        self.ticks.fetch_add(1, Ordering::Relaxed);
    }
}

pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
