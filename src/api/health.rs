//! What operators and probes read: `/metrics`, `/healthz`, `/readyz`, `/v1/status` — none
//! needs a free pool connection.

#[allow(unused_imports)]
use super::*;

/// The Prometheus exposition (text format 0.0.4); no token needed.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub(super) async fn metrics(State(s): State<ApiState>) -> impl IntoResponse {
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

/// `{"status": ...}` of `/healthz` and `/readyz`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct Health {
    /// `ok` (alive) or `ready`.
    status: &'static str,
}

/// Alive: the process answers HTTP. No token needed.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Health)))]
pub(super) async fn healthz() -> impl IntoResponse {
    axum::Json(Health { status: "ok" })
}

/// Why the daemon is not ready, if it is not: the supervisor's rule (ticks on time, the
/// last one reached the database), then whether the orchestrator's writes go through (a
/// database that answers reads but commits nothing). Memory only.
fn not_ready(s: &ApiState) -> Option<String> {
    let cfg = s.config.load();
    crate::supervisor::not_ready_reason(&s.heartbeat, &cfg).or_else(|| s.orchestrator.write_stall())
}

/// Ready when the supervisor completes ticks on time, its last tick reached the database
/// and the orchestrator's writes go through; otherwise 503 with the reason. Reads only
/// memory: it answers whatever the database or the pool is doing.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, body = Health), (status = 503, description = "Not ready; `error` says why", body = ErrorBody)))]
pub(super) async fn readyz(State(s): State<ApiState>) -> Response {
    match not_ready(&s) {
        Some(reason) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
        None => axum::Json(Health { status: "ready" }).into_response(),
    }
}

/// The most `/v1/status` spends trying a live read before it answers from the supervisor's
/// last one.
pub(super) const STATUS_LIVE_LIMIT: Duration = Duration::from_millis(400);

/// The pool as `/v1/status` shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct PoolReport {
    /// pool_size + max_overflow.
    max: usize,
    /// pool_size; connections above it are overflow.
    base: usize,
    size: usize,
    in_use: usize,
    idle: usize,
    /// Callers waiting for a connection.
    waiting: usize,
    /// in_use / max.
    utilization: f64,
    alert_ratio: f64,
    clear_ratio: f64,
    /// Connections lent to running tasks.
    lent: usize,
}

/// The tracked DB sessions (this daemon's own connections in use).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct SessionsReport {
    open: u64,
    opened: u64,
    closed: u64,
    force_closed: u64,
    warn_age_seconds: f64,
    max_age_seconds: f64,
    /// Open sessions, oldest first.
    live: Vec<crate::tracker::SessionSnapshot>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct TasksReport {
    /// Tasks per status across the cluster; null when the database could not be read and
    /// the supervisor has no reading yet.
    by_status: Option<std::collections::BTreeMap<String, i64>>,
    running_here: Vec<crate::orchestrator::registry::RunningTask>,
    max_task_duration_seconds: f64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct SupervisorReport {
    ticks: u64,
    seconds_since_last_tick: Option<f64>,
    interval_seconds: f64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct LoggingReport {
    level: String,
}

/// What an operator reads first in an incident. Cluster-wide parts (tasks, queues,
/// instances) are live when the database answers within 400 ms, else the supervisor's
/// last reading, dated by `database_view_as_of`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct StatusReport {
    instance: String,
    version: &'static str,
    pool: PoolReport,
    sessions: SessionsReport,
    ready: bool,
    not_ready_reason: Option<String>,
    database_view_as_of: Option<DateTime<Utc>>,
    tasks: TasksReport,
    /// Per agent with queued tasks or a pause.
    queues: Option<std::collections::BTreeMap<String, crate::store::QueueView>>,
    paused_agents: Option<Vec<String>>,
    schedules: std::collections::BTreeMap<String, crate::orchestrator::ScheduleState>,
    alerts_firing: Vec<crate::alerts::FiringAlert>,
    supervisor: SupervisorReport,
    /// Instances heard from in the last 10 minutes.
    #[schema(value_type = Option<Vec<Object>>)]
    instances: Option<Vec<serde_json::Value>>,
    config: ConfigMeta,
    logging: LoggingReport,
}

/// What an operator reads first in an incident.
#[utoipa::path(get, path = "/v1/status", tag = "operations",
    responses((status = 200, body = StatusReport), (status = 401, body = ErrorBody)))]
pub(super) async fn status(State(s): State<ApiState>) -> Result<Response, ApiError> {
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
    let paused_agents = view.as_ref().map(|v| {
        v.queues
            .iter()
            .filter(|(_, q)| q.paused)
            .map(|(a, _)| a.clone())
            .collect::<Vec<_>>()
    });
    let not_ready = not_ready(&s);
    Ok(axum::Json(StatusReport {
        instance: s.orchestrator.instance_id().to_string(),
        version: env!("CARGO_PKG_VERSION"),
        pool: PoolReport {
            max: pool.max,
            base: pool.base,
            size: pool.size,
            in_use: pool.in_use,
            idle: pool.idle,
            waiting: pool.waiting,
            utilization: pool.utilization(),
            alert_ratio: cfg.supervisor.pool_alert_ratio,
            clear_ratio: cfg.supervisor.pool_clear_ratio,
            lent: s.db.lent(),
        },
        sessions: SessionsReport {
            open: counts.open,
            opened: counts.opened,
            closed: counts.closed,
            force_closed: counts.force_closed,
            warn_age_seconds: cfg.supervisor.session_warn_age.get().as_secs_f64(),
            max_age_seconds: cfg.supervisor.session_max_age.get().as_secs_f64(),
            live: sessions,
        },
        ready: not_ready.is_none(),
        not_ready_reason: not_ready,
        database_view_as_of: view.as_ref().map(|v| v.as_of),
        tasks: TasksReport {
            by_status: view.as_ref().map(|v| v.tasks_by_status.clone()),
            running_here: s.running.snapshot(),
            max_task_duration_seconds: cfg.supervisor.max_task_duration.get().as_secs_f64(),
        },
        queues: view.as_ref().map(|v| v.queues.clone()),
        paused_agents,
        schedules: s.orchestrator.schedules_status(),
        alerts_firing: s.alerts.firing(),
        supervisor: SupervisorReport {
            ticks: s.heartbeat.ticks(),
            seconds_since_last_tick: s.heartbeat.since_last_tick().map(|d| d.as_secs_f64()),
            interval_seconds: cfg.supervisor.interval.get().as_secs_f64(),
        },
        instances: view.as_ref().map(|v| v.instances.clone()),
        config: (**s.config_meta.load()).clone(),
        logging: LoggingReport {
            level: cfg.logging.level.clone(),
        },
    })
    .into_response())
}
