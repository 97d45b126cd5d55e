//! The HTTP surface: one listener with `/metrics`, `/healthz`, `/readyz` and the JSON API
//! under `/v1` (Bearer token when one is configured).
//!
//! Every error is JSON — `{"error": "...", "field": "..."}` when a field is to blame — with
//! the status a client can act on: 400 bad input, 401 token, 404, 409 illegal transition,
//! 413 body too large, 503 no capacity or database down. Bodies are bounded by
//! `http.max_body_bytes`; a request (not an event stream) is bounded by [`REQUEST_TIMEOUT`].
//! Handlers only call the store, orchestrator and tracker; they hold no lock across an await.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::alerts::Alerts;
use crate::config::Config;
use crate::db::{Db, DbError};
use crate::metrics::Metrics;
use crate::orchestrator::registry::RunningTasks;
use crate::orchestrator::{Orchestrator, OrchestratorError};
use crate::store::{NewObjective, NewTask, Store, StoreError, TaskFilter, TaskStatus};
use crate::supervisor::Heartbeat;

/// Longest time a request may take to produce its response head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Events replayed per database page when a subscriber resumes.
const REPLAY_PAGE: i64 = 500;

/// Which config is in force, for status output (never the content: it holds secrets).
#[derive(Debug, Clone, serde::Serialize)]
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

/// The API token in force: `http.api_token`, or the first line of `http.api_token_file`.
pub fn resolve_token(cfg: &Config) -> Result<Option<String>, std::io::Error> {
    if !cfg.http.api_token.is_empty() {
        return Ok(Some(cfg.http.api_token.clone()));
    }
    if !cfg.http.api_token_file.is_empty() {
        let t = std::fs::read_to_string(&cfg.http.api_token_file)?;
        let t = t.lines().next().unwrap_or("").trim().to_string();
        if t.is_empty() {
            return Err(std::io::Error::other(format!(
                "{} is empty",
                cfg.http.api_token_file
            )));
        }
        return Ok(Some(t));
    }
    Ok(None)
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
    pub heartbeat: Arc<Heartbeat>,
    pub running: Arc<RunningTasks>,
    /// Ends event streams at shutdown, so the server can drain.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// A JSON error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: None,
        }
    }
    fn field(status: StatusCode, field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: Some(field.into()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(f) = self.field {
            body["field"] = json!(f);
        }
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::CheckoutTimeout { .. }
            | DbError::ConnectTimeout(_)
            | DbError::Deadline(_)
            | DbError::Connect(_)
            | DbError::PoolClosed => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            // A data exception is the input's fault, whatever validation missed.
            DbError::Query(ref q) if q.code().is_some_and(|c| c.code().starts_with("22")) => {
                tracing::warn!(error = %e, "input refused by the database");
                ApiError::new(StatusCode::BAD_REQUEST, format!("invalid input: {e}"))
            }
            other => {
                tracing::error!(error = %other, "database error in API handler");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "database error")
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Db(d) => d.into(),
            StoreError::TaskNotFound(_) | StoreError::ObjectiveNotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, e.to_string())
            }
            StoreError::IllegalTransition { .. } | StoreError::LeaseLost { .. } => {
                ApiError::new(StatusCode::CONFLICT, e.to_string())
            }
            StoreError::Invalid { field, message } => {
                ApiError::field(StatusCode::BAD_REQUEST, field, message)
            }
            StoreError::Corrupt(_) => {
                tracing::error!(error = %e, "corrupt row");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "corrupt row")
            }
        }
    }
}

impl From<OrchestratorError> for ApiError {
    fn from(e: OrchestratorError) -> Self {
        match e {
            OrchestratorError::UnknownAgent(a) => ApiError::field(
                StatusCode::BAD_REQUEST,
                "agent",
                format!("unknown agent {a:?}"),
            ),
            OrchestratorError::NoRunSlot(_) | OrchestratorError::ShuttingDown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            OrchestratorError::Store(s) => s.into(),
            OrchestratorError::Db(d) => d.into(),
        }
    }
}

/// A JSON body whose errors name the offending field (serde_path_to_error).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e: BytesRejection| {
                let status = e.status();
                if status == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(status, "request body larger than http.max_body_bytes")
                } else {
                    ApiError::new(status, e.body_text())
                }
            })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses a JSON body into `T`: a syntax error, a NUL character anywhere, or a field of
/// the wrong shape is a 400 that names where it was.
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))?;
    if let Some(path) = nul_in(&value, String::new()) {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            if path.is_empty() { "body".into() } else { path },
            "contains a NUL character (\\u0000), which PostgreSQL cannot store",
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON: {inner}"))
        } else {
            ApiError::field(StatusCode::BAD_REQUEST, path, inner.to_string())
        }
    })
}

/// The dotted path of the first string or key in `v` that holds a NUL character.
fn nul_in(v: &serde_json::Value, here: String) -> Option<String> {
    use serde_json::Value;
    let join = |k: &str| {
        if here.is_empty() {
            k.to_string()
        } else {
            format!("{here}.{k}")
        }
    };
    match v {
        Value::String(s) if s.contains('\0') => Some(here),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, x)| nul_in(x, format!("{here}[{i}]"))),
        Value::Object(o) => o.iter().find_map(|(k, x)| {
            if k.contains('\0') {
                Some(join(&k.replace('\0', "\\u0000")))
            } else {
                nul_in(x, join(k))
            }
        }),
        _ => None,
    }
}

/// Refuses a NUL character (`%00`) in a query parameter before any handler sees it:
/// PostgreSQL cannot store one, and the answer must name where it was. (Path parameters
/// are checked by the handlers, which know their names.)
async fn reject_nul(req: Request, next: Next) -> Result<Response, ApiError> {
    let uri = req.uri();
    let has_nul = |s: &str| s.to_ascii_lowercase().contains("%00");
    if let Some(q) = uri.query()
        && has_nul(q)
    {
        let name = q
            .split('&')
            .find(|kv| has_nul(kv))
            .map(|kv| kv.split('=').next().unwrap_or(kv).to_string())
            .unwrap_or_else(|| "query".into());
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            name,
            "contains a NUL character (%00)",
        ));
    }
    Ok(next.run(req).await)
}

/// A session id taken from the path: what the store would accept in `session_id`.
fn check_session_param(session: &str) -> Result<(), ApiError> {
    if session.is_empty() || session.len() > crate::store::MAX_NAME_LEN {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "session",
            format!("must be 1..={} characters", crate::store::MAX_NAME_LEN),
        ));
    }
    if session.contains('\0') {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "session",
            "contains a NUL character (%00)",
        ));
    }
    Ok(())
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}

/// Builds the router.
pub fn router(state: ApiState) -> Router {
    let max_body = state.config.load().http.max_body_bytes as usize;
    let v1 = Router::new()
        .route("/tasks", post(create_task).get(list_tasks))
        .route("/tasks/{id}", get(get_task))
        .route("/tasks/{id}/cancel", post(cancel_task))
        .route("/objectives", post(create_objective))
        .route("/objectives/{id}", get(get_objective))
        .route("/sessions/{id}/run", post(run_session))
        .route("/sessions/{id}/events", get(session_events))
        .route("/status", get(status))
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
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

/// Compares a presented token with the secret in time that depends only on the secret's
/// length, never on the presented one's length or content.
fn constant_time_eq(presented: &[u8], secret: &[u8]) -> bool {
    let mut acc = u8::from(presented.len() != secret.len());
    for (i, s) in secret.iter().enumerate() {
        acc |= s ^ presented.get(i).copied().unwrap_or(!*s);
    }
    acc == 0
}

async fn auth(
    State(s): State<ApiState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let token = s.token.load();
    if let Some(want) = token.as_ref() {
        let got = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                // The scheme is case-insensitive (RFC 7235).
                let (scheme, token) = v.trim_start().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        match got {
            Some(g) if constant_time_eq(g.as_bytes(), want.as_bytes()) => {}
            Some(_) => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "wrong bearer token",
                ));
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "missing Authorization: Bearer token",
                ));
            }
        }
    }
    Ok(next.run(req).await)
}

async fn metrics(State(s): State<ApiState>) -> impl IntoResponse {
    // Pool and session gauges come from live state at every scrape, so a stalled loop
    // cannot leave them stale; task gauges are the supervisor's last reading, dated by
    // supervisor_last_tick_timestamp_seconds.
    crate::supervisor::record_live_gauges(&s.metrics, &s.db);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

/// Ready when the supervisor completes ticks on time and its last tick reached the
/// database; otherwise 503 with the reason. Reads only memory: it answers whatever the
/// database or the pool is doing.
async fn readyz(State(s): State<ApiState>) -> Response {
    let cfg = s.config.load();
    match crate::supervisor::not_ready_reason(&s.heartbeat, &cfg) {
        Some(reason) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
        None => axum::Json(json!({ "status": "ready" })).into_response(),
    }
}

async fn create_task(
    State(s): State<ApiState>,
    JsonBody(t): JsonBody<NewTask>,
) -> Result<Response, ApiError> {
    let task = s.orchestrator.submit(&t).await?;
    Ok((StatusCode::CREATED, axum::Json(task)).into_response())
}

fn parse_id(raw: &str, what: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>().ok().filter(|v| *v > 0).ok_or_else(|| {
        ApiError::field(
            StatusCode::BAD_REQUEST,
            what,
            format!("{raw:?} is not a positive integer id"),
        )
    })
}

async fn get_task(State(s): State<ApiState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = parse_id(&id, "id")?;
    Ok(axum::Json(s.store.get_task(id).await?).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    session: Option<String>,
    objective: Option<i64>,
    after: Option<i64>,
    limit: Option<i64>,
}

async fn list_tasks(
    State(s): State<ApiState>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(v) => Some(
            v.parse::<TaskStatus>()
                .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, "status", e))?,
        ),
    };
    let limit = q.limit.unwrap_or(100);
    let (tasks, truncated) = s
        .store
        .list_tasks(
            &TaskFilter {
                status,
                session_id: q.session.filter(|v| !v.is_empty()),
                objective_id: q.objective,
                after_id: q.after,
                limit: Some(limit),
            },
            s.config.load().http.max_response_bytes,
        )
        .await?;
    // Where the next page starts, when there may be one.
    let next_after = (truncated || tasks.len() as i64 == limit)
        .then(|| tasks.last().map(|t| t.id))
        .flatten();
    Ok(
        axum::Json(json!({ "tasks": tasks, "truncated": truncated, "next_after": next_after }))
            .into_response(),
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct CancelBody {
    reason: Option<String>,
}

async fn cancel_task(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, "id")?;
    let reason = if body.is_empty() {
        None
    } else {
        let b: CancelBody = parse_json(&body)?;
        b.reason
    };
    let reason = reason.unwrap_or_else(|| "cancelled through the API".into());
    Ok(axum::Json(s.orchestrator.cancel(id, &reason).await?).into_response())
}

async fn create_objective(
    State(s): State<ApiState>,
    JsonBody(o): JsonBody<NewObjective>,
) -> Result<Response, ApiError> {
    let obj = s.orchestrator.create_objective(&o).await?;
    Ok((StatusCode::CREATED, axum::Json(obj)).into_response())
}

async fn get_objective(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, "id")?;
    Ok(axum::Json(s.store.get_objective(id).await?).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunBody {
    agent: String,
    #[serde(default)]
    payload: serde_json::Value,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    max_attempts: Option<i32>,
}

async fn run_session(
    State(s): State<ApiState>,
    Path(session): Path<String>,
    JsonBody(b): JsonBody<RunBody>,
) -> Result<Response, ApiError> {
    check_session_param(&session)?;
    let t = NewTask {
        agent: b.agent,
        payload: b.payload,
        session_id: None,
        priority: b.priority,
        max_attempts: b.max_attempts,
        run_after: None,
    };
    let task = s.orchestrator.run_for_session(&session, t).await?;
    Ok((StatusCode::CREATED, axum::Json(task)).into_response())
}

/// Server-sent events of a session's tasks. `Last-Event-ID` (or `?after=`) resumes after
/// that event: missed events are read from the database, then live ones follow. A
/// subscriber that falls behind the live buffer is caught up from the database again.
async fn session_events(
    State(s): State<ApiState>,
    Path(session): Path<String>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Response, ApiError> {
    check_session_param(&session)?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(q.get("after").map(String::as_str))
        .map(|v| v.trim().parse::<i64>())
        .transpose()
        .map_err(|_| {
            ApiError::field(
                StatusCode::BAD_REQUEST,
                "Last-Event-ID",
                "must be an event id",
            )
        })?
        .unwrap_or(0);
    // Subscribe before replaying, so nothing falls between the two.
    let mut live = s.orchestrator.hub().subscribe();
    let store = s.store.clone();
    let shutdown = s.shutdown.clone();
    let stream = async_stream(shutdown, move |tx| async move {
        let mut last = after;
        loop {
            // Catch up from the database.
            loop {
                let page = match store.session_events(&session, last, REPLAY_PAGE).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(session_id = %session, error = %e, "event replay failed");
                        return;
                    }
                };
                let n = page.len();
                for e in page {
                    last = e.id;
                    if tx.send(to_sse(&e)).await.is_err() {
                        return;
                    }
                }
                if (n as i64) < REPLAY_PAGE {
                    break;
                }
            }
            // Then follow live events.
            loop {
                match live.recv().await {
                    Ok(ev)
                        if ev.session_id.as_deref() == Some(session.as_str())
                            && ev.event.id > last =>
                    {
                        last = ev.event.id;
                        if tx.send(to_sse(&ev.event)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn to_sse(e: &crate::store::TaskEvent) -> Result<Event, Infallible> {
    let data = json!({ "task_id": e.task_id, "kind": e.kind, "data": e.data, "at": e.created_at });
    Ok(Event::default()
        .id(e.id.to_string())
        .event(e.kind.clone())
        .data(data.to_string()))
}

/// A stream fed by a producer task through a small bounded channel; the producer stops
/// when the client goes away (the receiver is dropped).
fn async_stream<F, Fut>(
    shutdown: tokio_util::sync::CancellationToken,
    produce: F,
) -> tokio_stream::wrappers::ReceiverStream<Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Event, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let fut = produce(tx);
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = fut => {}
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The most `/v1/status` spends trying a live read before it answers from the supervisor's
/// last one.
const STATUS_LIVE_LIMIT: Duration = Duration::from_millis(400);

/// What an operator reads first in an incident.
async fn status(State(s): State<ApiState>) -> Result<Response, ApiError> {
    let cfg = s.config.load();
    let pool = s.db.status();
    let sessions = s.db.tracker().snapshot();
    let counts = s.db.tracker().counts();
    // This is the page an operator opens when the pool is exhausted or the link is down:
    // task counts and instances are read live only if that takes under STATUS_LIVE_LIMIT,
    // else they are the supervisor's last reading, dated.
    let live = tokio::time::timeout(STATUS_LIVE_LIMIT, s.store.read_view(STATUS_LIVE_LIMIT / 2))
        .await
        .ok()
        .and_then(Result::ok)
        .map(Arc::new);
    let view = live.or_else(|| s.heartbeat.view());
    let tasks_by_status = view.as_ref().map(|v| json!(v.tasks_by_status));
    let instances = view.as_ref().map(|v| json!(v.instances));
    let as_of = view.as_ref().map(|v| v.as_of);
    let not_ready = crate::supervisor::not_ready_reason(&s.heartbeat, &cfg);
    Ok(axum::Json(json!({
        "instance": s.orchestrator.instance_id(),
        "version": env!("CARGO_PKG_VERSION"),
        "pool": {
            "max": pool.max, "base": pool.base, "size": pool.size, "in_use": pool.in_use,
            "idle": pool.idle, "waiting": pool.waiting, "utilization": pool.utilization(),
            "alert_ratio": cfg.supervisor.pool_alert_ratio, "clear_ratio": cfg.supervisor.pool_clear_ratio,
            "lent": s.db.lent(),
        },
        "sessions": {
            "open": counts.open, "opened": counts.opened, "closed": counts.closed,
            "force_closed": counts.force_closed,
            "warn_age_seconds": cfg.supervisor.session_warn_age.get().as_secs_f64(),
            "max_age_seconds": cfg.supervisor.session_max_age.get().as_secs_f64(),
            "live": sessions,
        },
        "ready": not_ready.is_none(),
        "not_ready_reason": not_ready,
        "database_view_as_of": as_of,
        "tasks": {
            "by_status": tasks_by_status,
            "running_here": s.running.snapshot(),
            "max_task_duration_seconds": cfg.supervisor.max_task_duration.get().as_secs_f64(),
        },
        "alerts_firing": s.alerts.firing(),
        "supervisor": {
            "ticks": s.heartbeat.ticks(),
            "seconds_since_last_tick": s.heartbeat.since_last_tick().map(|d| d.as_secs_f64()),
            "interval_seconds": cfg.supervisor.interval.get().as_secs_f64(),
        },
        "instances": instances,
        "config": &**s.config_meta.load(),
        "logging": { "level": cfg.logging.level },
    }))
    .into_response())
}
