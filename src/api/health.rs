//! What operators and probes read: `/metrics`, `/healthz`, `/readyz`, `/v1/status` — none
//! needs a free pool connection.

#[allow(unused_imports)]
use super::*;

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

pub(super) async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
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
pub(super) async fn readyz(State(s): State<ApiState>) -> Response {
    match not_ready(&s) {
        Some(reason) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
        None => axum::Json(json!({ "status": "ready" })).into_response(),
    }
}

/// The most `/v1/status` spends trying a live read before it answers from the supervisor's
/// last one.
pub(super) const STATUS_LIVE_LIMIT: Duration = Duration::from_millis(400);

/// What an operator reads first in an incident.
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
    let tasks_by_status = view.as_ref().map(|v| json!(v.tasks_by_status));
    let instances = view.as_ref().map(|v| json!(v.instances));
    let queues = view.as_ref().map(|v| json!(v.queues));
    let paused_agents = view.as_ref().map(|v| {
        v.queues
            .iter()
            .filter(|(_, q)| q.paused)
            .map(|(a, _)| a.clone())
            .collect::<Vec<_>>()
    });
    let as_of = view.as_ref().map(|v| v.as_of);
    let not_ready = not_ready(&s);
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
        "queues": queues,
        "paused_agents": paused_agents,
        "schedules": s.orchestrator.schedules_status(),
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
