//! Alerts: a structured log event, the `alerts_firing`/`alerts_total` metrics, and an
//! optional JSON webhook.
//!
//! A *state* alert (pool utilization, memory) fires once and resolves once: the caller
//! decides the thresholds (with hysteresis), this module only refuses to fire what is
//! already firing. An *event* alert (a force-close, a timed-out task) is counted and sent
//! each time. Webhook delivery runs on its own task behind a bounded queue, so the
//! supervisor never waits on a slow receiver; when the queue is full the event is dropped
//! and counted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::{self, Metrics};

/// Alert names (the `alert` label).
pub const POOL_UTILIZATION_HIGH: &str = "pool_utilization_high";
pub const MEMORY_HIGH: &str = "memory_high";
/// Finished runs whose outcomes wait past `supervisor.outcome_stall_after` to be written.
pub const OUTCOMES_STALLED: &str = "outcomes_stalled";
pub const SESSION_FORCE_CLOSED: &str = "session_force_closed";
pub const TASK_TIMED_OUT: &str = "task_timed_out";
pub const ORPHAN_BACKEND_TERMINATED: &str = "orphan_backend_terminated";
/// A `[watch.NAME]` rule's sessions at or above `pool_alert_ratio` of its `max_sessions`;
/// fires once per rule (its subject is the rule's name).
pub const WATCH_SESSIONS_HIGH: &str = "watch_sessions_high";
/// The server's client connections (or a role's, against its connection limit) at or
/// above `pool_alert_ratio` of what it admits.
pub const SERVER_CONNECTIONS_HIGH: &str = "server_connections_high";
/// A session of a watched application past a limit of its rule (logged once per session).
pub const WATCH_SESSION_OVER_LIMIT: &str = "watch_session_over_limit";

/// Events waiting for webhook delivery; beyond this they are dropped and counted.
pub const WEBHOOK_QUEUE: usize = 256;
/// Delivery attempts per event.
pub const WEBHOOK_ATTEMPTS: u32 = 3;
/// Per-attempt time limit.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Critical,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Firing,
    Resolved,
    Event,
}

/// What is logged and sent for one alert change.
#[derive(Debug, Clone, Serialize)]
pub struct AlertEvent {
    pub alert: &'static str,
    /// What it is about, for an alert that can fire for several things at once (a watch
    /// rule's name for `watch_sessions_high`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub state: AlertState,
    pub severity: Severity,
    pub summary: String,
    pub details: serde_json::Value,
    pub at: DateTime<Utc>,
}

/// A firing alert as status output shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FiringAlert {
    #[schema(value_type = String)]
    pub alert: &'static str,
    /// What it is about, for an alert that can fire for several things at once (a watch
    /// rule's name for `watch_sessions_high`); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub severity: Severity,
    pub summary: String,
    pub since: DateTime<Utc>,
}

#[derive(Clone)]
pub struct Alerts {
    inner: Arc<Inner>,
}

/// A firing alert's key: its name and its subject ("" for none).
type FiringKey = (&'static str, String);

struct Inner {
    firing: Mutex<BTreeMap<FiringKey, FiringAlert>>,
    metrics: Metrics,
    config: Arc<ArcSwap<Config>>,
    webhook: mpsc::Sender<AlertEvent>,
}

impl Alerts {
    /// Starts the webhook sender on `tasks`; it stops when `shutdown` fires.
    pub fn new(
        metrics: Metrics,
        config: Arc<ArcSwap<Config>>,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Alerts {
        // The state alerts, at 0 until they fire, so dashboards and rules see them.
        for alert in [
            POOL_UTILIZATION_HIGH,
            MEMORY_HIGH,
            OUTCOMES_STALLED,
            WATCH_SESSIONS_HIGH,
            SERVER_CONNECTIONS_HIGH,
        ] {
            metrics
                .gauge(metrics::ALERTS_FIRING, &[("alert", alert)])
                .set(0.0);
            metrics
                .counter(metrics::ALERTS_TOTAL, &[("alert", alert)])
                .absolute(0);
        }
        let (tx, rx) = mpsc::channel(WEBHOOK_QUEUE);
        tasks.spawn(deliver(rx, Arc::clone(&config), metrics.clone(), shutdown));
        Alerts {
            inner: Arc::new(Inner {
                firing: Mutex::new(BTreeMap::new()),
                metrics,
                config,
                webhook: tx,
            }),
        }
    }

    fn firing_map(&self) -> MutexGuard<'_, BTreeMap<FiringKey, FiringAlert>> {
        self.inner.firing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fires a state alert; false (and nothing logged or sent) if it is already firing.
    pub fn fire(
        &self,
        alert: &'static str,
        severity: Severity,
        summary: String,
        details: serde_json::Value,
    ) -> bool {
        self.fire_for(alert, None, severity, summary, details)
    }

    /// Fires a state alert for one `subject` of several (a watch rule); false if it is
    /// already firing for it. `alerts_firing{alert}` counts the subjects firing.
    pub fn fire_for(
        &self,
        alert: &'static str,
        subject: Option<&str>,
        severity: Severity,
        summary: String,
        details: serde_json::Value,
    ) -> bool {
        let at = Utc::now();
        let key = (alert, subject.unwrap_or_default().to_string());
        let n = {
            let mut f = self.firing_map();
            if f.contains_key(&key) {
                return false;
            }
            f.insert(
                key,
                FiringAlert {
                    alert,
                    subject: subject.map(str::to_string),
                    severity,
                    summary: summary.clone(),
                    since: at,
                },
            );
            f.keys().filter(|(a, _)| *a == alert).count()
        };
        self.inner
            .metrics
            .gauge(metrics::ALERTS_FIRING, &[("alert", alert)])
            .set(n as f64);
        self.emit(AlertEvent {
            alert,
            subject: subject.map(str::to_string),
            state: AlertState::Firing,
            severity,
            summary,
            details,
            at,
        });
        true
    }

    /// Resolves a state alert; false if it was not firing.
    pub fn resolve(
        &self,
        alert: &'static str,
        summary: String,
        details: serde_json::Value,
    ) -> bool {
        self.resolve_for(alert, None, summary, details)
    }

    /// Resolves a state alert for one subject; false if it was not firing for it.
    pub fn resolve_for(
        &self,
        alert: &'static str,
        subject: Option<&str>,
        summary: String,
        details: serde_json::Value,
    ) -> bool {
        let key = (alert, subject.unwrap_or_default().to_string());
        let (was, n) = {
            let mut f = self.firing_map();
            let Some(was) = f.remove(&key) else {
                return false;
            };
            (was, f.keys().filter(|(a, _)| *a == alert).count())
        };
        self.inner
            .metrics
            .gauge(metrics::ALERTS_FIRING, &[("alert", alert)])
            .set(n as f64);
        self.emit(AlertEvent {
            alert,
            subject: subject.map(str::to_string),
            state: AlertState::Resolved,
            severity: was.severity,
            summary,
            details,
            at: Utc::now(),
        });
        true
    }

    /// A one-off alert: counted, logged and sent every time.
    pub fn event(
        &self,
        alert: &'static str,
        severity: Severity,
        summary: String,
        details: serde_json::Value,
    ) {
        self.emit(AlertEvent {
            alert,
            subject: None,
            state: AlertState::Event,
            severity,
            summary,
            details,
            at: Utc::now(),
        });
    }

    /// Whether `alert` fires (for no subject: the alerts that have none).
    pub fn is_firing(&self, alert: &'static str) -> bool {
        self.is_firing_for(alert, None)
    }

    pub fn is_firing_for(&self, alert: &'static str, subject: Option<&str>) -> bool {
        self.firing_map()
            .contains_key(&(alert, subject.unwrap_or_default().to_string()))
    }

    /// The subjects `alert` fires for.
    pub fn firing_subjects(&self, alert: &'static str) -> Vec<String> {
        self.firing_map()
            .keys()
            .filter(|(a, _)| *a == alert)
            .map(|(_, s)| s.clone())
            .collect()
    }

    pub fn firing(&self) -> Vec<FiringAlert> {
        self.firing_map().values().cloned().collect()
    }

    fn emit(&self, e: AlertEvent) {
        if e.state != AlertState::Resolved {
            self.inner
                .metrics
                .counter(metrics::ALERTS_TOTAL, &[("alert", e.alert)])
                .increment(1);
        }
        let details = e.details.to_string();
        let subject = e.subject.as_deref();
        match (e.severity, e.state) {
            (_, AlertState::Resolved) => {
                tracing::info!(alert = e.alert, subject, state = "resolved", details = %details, "{}", e.summary)
            }
            (Severity::Warning, _) => {
                tracing::warn!(alert = e.alert, subject, state = ?e.state, details = %details, "{}", e.summary)
            }
            (Severity::Critical, _) => {
                tracing::error!(alert = e.alert, subject, state = ?e.state, details = %details, "{}", e.summary)
            }
        }
        if self.inner.config.load().alerts.webhook_url.is_empty() {
            return;
        }
        if self.inner.webhook.try_send(e).is_err() {
            self.inner
                .metrics
                .counter(metrics::ALERT_WEBHOOK_FAILURES_TOTAL, &[])
                .increment(1);
            tracing::warn!(
                queue = WEBHOOK_QUEUE,
                "alert webhook queue full or closed; event dropped"
            );
        }
    }
}

async fn deliver(
    mut rx: mpsc::Receiver<AlertEvent>,
    config: Arc<ArcSwap<Config>>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let client = match reqwest::Client::builder().timeout(WEBHOOK_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the alert webhook client; webhooks are off");
            return;
        }
    };
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = rx.recv() => match e { Some(e) => e, None => return },
        };
        let url = config.load().alerts.webhook_url.clone();
        if url.is_empty() {
            continue;
        }
        let mut delivered = false;
        for attempt in 1..=WEBHOOK_ATTEMPTS {
            match client.post(&url).json(&event).send().await {
                Ok(r) if r.status().is_success() => {
                    delivered = true;
                    break;
                }
                Ok(r) => tracing::warn!(
                    alert = event.alert,
                    attempt,
                    status = r.status().as_u16(),
                    "alert webhook refused the event"
                ),
                Err(e) => {
                    tracing::warn!(alert = event.alert, attempt, error = %e.without_url(), "alert webhook delivery failed")
                }
            }
            if attempt < WEBHOOK_ATTEMPTS {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(250 << attempt)) => {}
                }
            }
        }
        if !delivered {
            metrics
                .counter(metrics::ALERT_WEBHOOK_FAILURES_TOTAL, &[])
                .increment(1);
        }
    }
}
