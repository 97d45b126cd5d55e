//! The process itself: resident memory against the cgroup limit or the machine, the
//! memory alert and its emergency cleanup, and the periodic resource status line.

use super::Supervisor;
use super::TickReport;
use crate::alerts;
use crate::alerts::Severity;
use crate::config::Config;
use crate::metrics as m;
use serde_json::json;
use std::time::Instant;

impl Supervisor {
    pub(super) async fn check_process(&mut self, cfg: &Config, report: &mut TickReport) {
        let Some((rss, limit)) = self.memory.read() else {
            return;
        };
        report.resident_memory_bytes = rss;
        // process_resident_memory_bytes and process_cpu_seconds_total are read from /proc
        // at each scrape (process::ProcessFigures); the limit is ours.
        self.metrics
            .gauge(m::PROCESS_MEMORY_LIMIT_BYTES, &[])
            .set(limit as f64);
        if limit == 0 {
            return;
        }
        let ratio = rss as f64 / limit as f64;
        let alert_at = cfg.supervisor.memory_alert_ratio;
        if ratio >= alert_at {
            let fired = self.alerts.fire(
                alerts::MEMORY_HIGH,
                Severity::Critical,
                format!(
                    "resident memory {:.1}% of {} bytes, at or above the {:.0}% alert line",
                    ratio * 100.0,
                    limit,
                    alert_at * 100.0
                ),
                json!({ "resident_memory_bytes": rss, "limit_bytes": limit, "ratio": ratio }),
            );
            if fired {
                self.emergency_cleanup(report);
            }
        } else if ratio < alert_at * 0.9 {
            self.alerts.resolve(
                alerts::MEMORY_HIGH,
                format!("resident memory back to {:.1}%", ratio * 100.0),
                json!({ "resident_memory_bytes": rss, "limit_bytes": limit, "ratio": ratio }),
            );
        }
    }

    /// Frees what can be freed without losing work: idle pooled connections. Overdue
    /// tasks are already timed out by this same tick.
    pub(super) fn emergency_cleanup(&mut self, report: &mut TickReport) {
        let closed = self.db.close_idle(0);
        report.emergency_cleanup = true;
        self.metrics
            .counter(m::EMERGENCY_CLEANUPS_TOTAL, &[])
            .increment(1);
        tracing::warn!(
            idle_connections_closed = closed,
            tasks_timed_out = report.tasks_timed_out.len(),
            sessions_force_closed = report.sessions_force_closed,
            "emergency cleanup on memory pressure"
        );
    }

    pub(super) fn maybe_log_resources(&mut self, cfg: &Config, report: &TickReport) {
        if !cfg.supervisor.resource_logging_enabled() {
            return;
        }
        let every = cfg.supervisor.resource_log_interval.get();
        if self.last_resource_log.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.last_resource_log = Some(Instant::now());
        let p = report.pool.unwrap_or_else(|| self.db.status());
        let oldest = self
            .db
            .tracker()
            .live_sessions()
            .first()
            .map(|s| s.age().as_secs_f64())
            .unwrap_or(0.0);
        tracing::info!(
            pool_in_use = p.in_use,
            pool_idle = p.idle,
            pool_max = p.max,
            pool_waiting = p.waiting,
            sessions_open = report.sessions_open,
            session_oldest_age_s = oldest,
            tasks_running_here = self.running.len(),
            resident_memory_bytes = report.resident_memory_bytes,
            alerts_firing = self.alerts.firing().len(),
            "resource status"
        );
    }
}
