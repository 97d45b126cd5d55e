//! What operators and probes read: `/metrics`, `/healthz`, `/readyz`, `/v1/status` — none
//! needs a free pool connection.

use super::ApiState;
use super::ConfigMeta;
use super::errors::ApiError;
use super::errors::ErrorBody;
use crate::config::Config;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header;
use axum::response::IntoResponse;
use axum::response::Response;
use axum::response::sse::Event;
use chrono::DateTime;
use chrono::Utc;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

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
    crate::supervisor::not_ready_reason(&s.liveness, &cfg).or_else(|| s.orchestrator.write_stall())
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
    /// Open sessions, oldest first; at most 100 (see `truncated`).
    live: Vec<crate::db::tracker::SessionSnapshot>,
    /// Open sessions, listed or not.
    live_total: usize,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct TasksReport {
    /// Tasks per status across the cluster; null when the database could not be read and
    /// the supervisor has no reading yet.
    by_status: Option<std::collections::BTreeMap<String, i64>>,
    /// At most 100 (see `truncated`).
    running_here: Vec<crate::orchestrator::registry::RunningTask>,
    /// Tasks running here, listed or not.
    running_here_total: usize,
    max_task_duration_seconds: f64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct SupervisorReport {
    ticks: u64,
    seconds_since_last_tick: Option<f64>,
    interval_seconds: f64,
    /// The task figures (counts, queues, instances) are from an earlier tick: the last
    /// read was refused by the supervisor's lock_timeout (another session locks the
    /// tables); `database_view_as_of` dates them.
    task_figures_stale: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct LoggingReport {
    level: String,
}

/// A configured agent, as the console's agents page shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct AgentReport {
    /// `command` or `http`.
    kind: Option<String>,
    concurrency: u32,
    timeout_seconds: f64,
    planner: bool,
    /// Cluster-wide rate limit on starts (`N/sec|min|hour` or `N/PERIOD`), if any: at
    /// most N start in any window of the period (N + burst - 1 with a burst).
    rate: Option<String>,
    /// How many of the rate's starts may come at once (1 unless configured); null
    /// without a rate.
    burst: Option<u32>,
    memory_max_bytes: Option<u64>,
    processes_max: Option<u64>,
    cpu_time_max_seconds: Option<f64>,
    db_sessions_max: Option<u64>,
    /// Its tasks running on this instance now.
    running_here: usize,
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
    /// Per agent with queued tasks or a pause: every configured agent with one, and at
    /// most 100 more (the longest queues; see `truncated`).
    queues: Option<std::collections::BTreeMap<String, crate::store::QueueView>>,
    /// Agents with queued tasks or a pause, listed or not.
    queues_total: Option<i64>,
    /// At most 100 beyond the configured agents (see `truncated`).
    paused_agents: Option<Vec<String>>,
    paused_agents_total: Option<i64>,
    /// At most 100 (see `truncated`).
    schedules: std::collections::BTreeMap<String, crate::orchestrator::ScheduleState>,
    schedules_total: usize,
    alerts_firing: Vec<crate::alerts::FiringAlert>,
    supervisor: SupervisorReport,
    /// Instances heard from in the last 10 minutes, at most 100 (see `truncated`).
    #[schema(value_type = Option<Vec<Object>>)]
    instances: Option<Vec<serde_json::Value>>,
    instances_total: Option<i64>,
    /// The lists cut short, by field name (`queues`, `paused_agents`, `instances`,
    /// `schedules`, `sessions.live`, `tasks.running_here`): each shows at most 100 entries
    /// (queues and paused agents: beyond the configured agents), its `*_total` how many
    /// there are. Names from input (agents queued by SQL) must not grow this answer.
    truncated: Vec<&'static str>,
    config: ConfigMeta,
    /// `sslmode` in force and how many of this instance's sessions the server lists as
    /// encrypted (supervisor's last reading; null before its first).
    database_tls: Option<crate::supervisor::Encryption>,
    logging: LoggingReport,
    /// The agents this instance runs, with their limits.
    agents: std::collections::BTreeMap<String, AgentReport>,
    /// The server's client connections and each `[watch.NAME]` rule's sessions, oldest
    /// first (supervisor's last reading; null before its first).
    watch: Option<crate::supervisor::WatchView>,
}

/// The most entries `/v1/status` lists of each list (beyond the configured agents, for
/// queues and paused agents).
pub(super) const STATUS_LIST_MAX: usize = crate::store::VIEW_LIST_MAX as usize;

/// What an operator reads first in an incident.
#[utoipa::path(get, path = "/v1/status", tag = "operations",
    responses((status = 200, body = StatusReport), (status = 401, body = ErrorBody)))]
pub(super) async fn status(State(s): State<ApiState>) -> Result<Response, ApiError> {
    Ok(axum::Json(status_report(&s).await).into_response())
}

/// One event of `/v1/status/stream`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // the document's shape; status_stream writes it
pub(super) struct StatusEvent {
    /// Always `status`.
    event: String,
    /// The `/v1/status` answer (a StatusReport) as JSON.
    data: String,
}

/// How often `/v1/status/stream` sends the status.
pub(super) const STATUS_STREAM_EVERY: Duration = Duration::from_secs(2);

/// The status as server-sent events (`event: status`, `data:` the `/v1/status` answer),
/// one at once and then one every 2 s, until the client leaves or the daemon stops: what
/// the web console's overview follows instead of polling.
#[utoipa::path(get, path = "/v1/status/stream", tag = "operations",
    responses((status = 200, description = "Server-sent events, `event: status`, `data:` a StatusReport as JSON", content_type = "text/event-stream", body = StatusEvent),
        (status = 401, body = ErrorBody),
        (status = 503, description = "http.max_streams event streams are open already", body = ErrorBody)))]
pub(super) async fn status_stream(State(s): State<ApiState>) -> Result<Response, ApiError> {
    let shutdown = s.shutdown.clone();
    let permit = s.open_stream()?;
    let stream = super::slots::async_stream(shutdown, permit, move |tx| async move {
        loop {
            let report = status_report(&s).await;
            let data = serde_json::to_string(&report).unwrap_or_default();
            if tx
                .send(Ok(Event::default().event("status").data(data)))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(STATUS_STREAM_EVERY).await;
        }
    });
    Ok(super::slots::sse_response(stream))
}

fn agents_report(s: &ApiState, cfg: &Config) -> std::collections::BTreeMap<String, AgentReport> {
    let running = s.running.snapshot();
    cfg.agents
        .iter()
        .map(|(name, a)| {
            let report = AgentReport {
                kind: a.kind.map(|k| match k {
                    crate::config::AgentKind::Command => "command".to_string(),
                    crate::config::AgentKind::Http => "http".to_string(),
                }),
                concurrency: a.concurrency,
                timeout_seconds: a.timeout.get().as_secs_f64(),
                planner: a.planner,
                rate: a.rate.as_ref().map(|r| r.to_string()),
                burst: a.rate.map(|_| a.burst.unwrap_or(1)),
                memory_max_bytes: a.memory_max.map(|m| m.0),
                processes_max: a.processes_max,
                cpu_time_max_seconds: a.cpu_time_max.map(|c| c.get().as_secs_f64()),
                db_sessions_max: a.db_sessions_max,
                running_here: running.iter().filter(|t| &t.agent == name).count(),
            };
            (name.clone(), report)
        })
        .collect()
}

async fn status_report(s: &ApiState) -> StatusReport {
    let cfg = s.config.load();
    let pool = s.db.status();
    let sessions = s.db.tracker().snapshot();
    let counts = s.db.tracker().counts();
    // This is the page an operator opens when the pool is exhausted or the link is down:
    // task counts and instances are read live only if that takes under STATUS_LIVE_LIMIT,
    // else they are the supervisor's last reading, dated.
    let known: Vec<String> = cfg.agents.keys().cloned().collect();
    let live = tokio::time::timeout(
        STATUS_LIVE_LIMIT,
        s.store.read_view(STATUS_LIVE_LIMIT / 2, &known),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .map(Arc::new);
    let read_live = live.is_some();
    let view = live.or_else(|| s.liveness.view());
    let paused_agents = view.as_ref().map(|v| {
        v.queues
            .iter()
            .filter(|(_, q)| q.paused)
            .map(|(a, _)| a.clone())
            .collect::<Vec<_>>()
    });
    let not_ready = not_ready(s);
    let mut truncated = Vec::new();
    let mut cut = |name: &'static str, shown: usize, total: usize| {
        if shown < total {
            truncated.push(name);
        }
    };
    let sessions_total = sessions.len();
    let sessions: Vec<_> = sessions.into_iter().take(STATUS_LIST_MAX).collect();
    cut("sessions.live", sessions.len(), sessions_total);
    let running_here = s.running.snapshot();
    let running_here_total = running_here.len();
    let running_here: Vec<_> = running_here.into_iter().take(STATUS_LIST_MAX).collect();
    cut("tasks.running_here", running_here.len(), running_here_total);
    let schedules = s.orchestrator.schedules_status();
    let schedules_total = schedules.len();
    let schedules: std::collections::BTreeMap<_, _> =
        schedules.into_iter().take(STATUS_LIST_MAX).collect();
    cut("schedules", schedules.len(), schedules_total);
    if let Some(v) = &view {
        let total = |n: i64| usize::try_from(n).unwrap_or(0);
        cut("queues", v.queues.len(), total(v.queues_total));
        let paused = paused_agents.as_ref().map(Vec::len).unwrap_or(0);
        cut("paused_agents", paused, total(v.paused_total));
        cut("instances", v.instances.len(), total(v.instances_total));
    }
    StatusReport {
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
            live_total: sessions_total,
        },
        ready: not_ready.is_none(),
        not_ready_reason: not_ready,
        database_view_as_of: view.as_ref().map(|v| v.as_of),
        tasks: TasksReport {
            by_status: view.as_ref().map(|v| v.tasks_by_status.clone()),
            running_here,
            running_here_total,
            max_task_duration_seconds: cfg.supervisor.max_task_duration.get().as_secs_f64(),
        },
        queues: view.as_ref().map(|v| v.queues.clone()),
        queues_total: view.as_ref().map(|v| v.queues_total),
        paused_agents,
        paused_agents_total: view.as_ref().map(|v| v.paused_total),
        schedules,
        schedules_total,
        alerts_firing: s.alerts.firing(),
        supervisor: SupervisorReport {
            ticks: s.liveness.ticks(),
            seconds_since_last_tick: s.liveness.since_last_tick().map(|d| d.as_secs_f64()),
            interval_seconds: cfg.supervisor.interval.get().as_secs_f64(),
            task_figures_stale: !read_live && s.liveness.view_stale(),
        },
        instances: view.as_ref().map(|v| v.instances.clone()),
        instances_total: view.as_ref().map(|v| v.instances_total),
        truncated,
        config: (**s.config_meta.load()).clone(),
        database_tls: s.liveness.encryption(),
        logging: LoggingReport {
            level: cfg.logging.level.clone(),
        },
        agents: agents_report(s, &cfg),
        watch: s.liveness.watch().map(|w| (*w).clone()),
    }
}
