//! The outcome duty of a tick: progress is watched, not assumed. A finished run whose
//! outcome waits to be written longer than `supervisor.outcome_stall_after` — the writer
//! stuck on something, the database refusing or not answering — makes the instance
//! unready (the reason names the task), fires `outcomes_stalled` and shows in
//! `taskwarden_outcome_write_lag_seconds`; the systemd watchdog reads the same verdict.

use super::Supervisor;
use crate::alerts;
use crate::alerts::Severity;
use crate::config::Config;
use crate::metrics as m;
use serde_json::json;

impl Supervisor {
    /// Measures the outcome lag, fires or resolves `outcomes_stalled`, and records the
    /// verdict in the liveness. Needs no database: it reads the running-task registry.
    pub(super) fn check_outcomes(&mut self, cfg: &Config) {
        let oldest = self.running.oldest_unwritten();
        let lag = oldest.map(|(_, d)| d).unwrap_or_default();
        self.metrics
            .gauge(m::OUTCOME_WRITE_LAG_SECONDS, &[])
            .set(lag.as_secs_f64());
        let bound = cfg.supervisor.outcome_stall_after.get();
        let stalled = oldest.filter(|(_, d)| *d > bound);
        let firing = self.alerts.is_firing(alerts::OUTCOMES_STALLED);
        match stalled {
            Some((task_id, waited)) => {
                let reason = format!(
                    "outcomes stalled: task {task_id} finished {:.1}s ago and its outcome is not written yet (bound supervisor.outcome_stall_after = {:.0}s)",
                    waited.as_secs_f64(),
                    bound.as_secs_f64()
                );
                if !firing {
                    self.alerts.fire(
                        alerts::OUTCOMES_STALLED,
                        Severity::Critical,
                        reason.clone(),
                        json!({ "task_id": task_id, "waited_seconds": waited.as_secs_f64() }),
                    );
                }
                self.liveness.set_outcome_stall(Some(reason));
            }
            None => {
                if firing {
                    self.alerts.resolve(
                        alerts::OUTCOMES_STALLED,
                        "outcomes are written again".into(),
                        json!({ "lag_seconds": lag.as_secs_f64() }),
                    );
                }
                self.liveness.set_outcome_stall(None);
            }
        }
    }
}
