//! The HTTP surface: one listener with `/metrics`, `/healthz`, `/readyz` and the JSON API
//! under `/v1` (Bearer token when one is configured).
//!
//! Every error is JSON — `{"error": "...", "field": "..."}` when a field is to blame — with
//! the status a client can act on: 400 bad input, 401 token, 404, 409 illegal transition,
//! 413 body too large, 503 no capacity or database down. Bodies are bounded by
//! `http.max_body_bytes`; a request (not an event stream) is bounded by [`REQUEST_TIMEOUT`].
//! Handlers only call the store, orchestrator and tracker; they hold no lock across an await.

mod agents;
mod auth;
mod body;
mod errors;
mod health;
mod objectives;
mod openapi;
pub mod server;
mod slots;
mod tasks;
mod ui;
mod write_stall;

use agents::{pause_agent, resume_agent};
use auth::auth;
pub use body::JsonBody;
use body::{method_not_allowed, reject_nul};
pub use errors::ApiError;
use health::{healthz, metrics, readyz, status, status_stream};
use objectives::{create_objective, get_objective};
pub use openapi::document as openapi_document;
use openapi::openapi_json;
#[allow(deprecated)] // the old routes stay served for one release
use slots::{run_in_session, run_in_slot, session_events, slot_events};
use tasks::{cancel_task, create_task, get_task, list_tasks, retry_task, retry_tasks, task_events};

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware::{self};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};

use crate::alerts::Alerts;
use crate::config::Config;
use crate::db::Db;
use crate::metrics::Metrics;
use crate::orchestrator::Orchestrator;
use crate::orchestrator::registry::RunningTasks;
use crate::store::Store;
use crate::supervisor::Liveness;

/// Longest time a request may take to produce its response head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Which config is in force, for status output (never the content: it holds secrets).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ConfigMeta {
    pub version: String,
    pub loaded_at: DateTime<Utc>,
    pub path: String,
}

impl ConfigMeta {
    pub fn of(config: &Config, path: &std::path::Path) -> ConfigMeta {
        use std::hash::{Hash, Hasher};
        let text = toml::to_string(config).unwrap_or_default();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        ConfigMeta {
            version: format!("{:016x}", h.finish()),
            loaded_at: Utc::now(),
            path: path.display().to_string(),
        }
    }
}

#[derive(Clone)]
pub struct ApiState {
    pub config: Arc<ArcSwap<Config>>,
    pub config_meta: Arc<ArcSwap<ConfigMeta>>,
    pub token: Arc<ArcSwap<Option<String>>>,
    pub db: Db,
    pub store: Store,
    pub orchestrator: Orchestrator,
    pub metrics: Metrics,
    pub alerts: Alerts,
    pub liveness: Arc<Liveness>,
    pub running: Arc<RunningTasks>,
    /// Ends event streams at shutdown, so the server can drain.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Event streams open, bounded by `http.max_streams`.
    pub streams: Arc<server::Gate>,
}

impl ApiState {
    /// A place for one more event stream, or the 503 that says the bound is reached.
    fn open_stream(&self) -> Result<server::Permit, ApiError> {
        let max = self.config.load().http.max_streams;
        server::Gate::try_enter(
            &self.streams,
            max,
            &self.metrics,
            crate::metrics::HTTP_STREAMS,
        )
        .ok_or_else(|| {
            self.metrics
                .counter(crate::metrics::HTTP_REFUSED_TOTAL, &[("reason", "streams")])
                .increment(1);
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "too many event streams open (http.max_streams = {max}); close one or retry later"
                ),
            )
        })
    }
}

/// Builds the router.
#[allow(deprecated)] // the run slots' older paths are served, and documented as deprecated
pub fn router(state: ApiState) -> Router {
    let max_body = state.config.load().http.max_body_bytes as usize;
    let v1 = Router::new()
        .route("/tasks", post(create_task).get(list_tasks))
        .route("/tasks/{id}", get(get_task))
        .route("/tasks/retry", post(retry_tasks))
        .route("/tasks/{id}/events", get(task_events))
        .route("/tasks/{id}/cancel", post(cancel_task))
        .route("/tasks/{id}/retry", post(retry_task))
        .route("/agents/{name}/pause", post(pause_agent))
        .route("/agents/{name}/resume", post(resume_agent))
        .route("/objectives", post(create_objective))
        .route("/objectives/{id}", get(get_objective))
        .route("/slots/{id}/run", post(run_in_slot))
        .route("/slots/{id}/events", get(slot_events))
        // The run slots' paths before they were called slots; kept for existing clients.
        .route("/sessions/{id}/run", post(run_in_session))
        .route("/sessions/{id}/events", get(session_events))
        .route("/status", get(status))
        .route("/status/stream", get(status_stream))
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi_json))
        .route("/ui", get(ui::page))
        .route("/ui/assets/app.js", get(ui::script))
        .route("/ui/assets/app.css", get(ui::style))
        .route("/ui/{*page}", get(ui::page))
        .nest("/v1", v1)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(reject_nul))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
        .with_state(state)
}
