//! `/v1/tasks`: submit (one task or a bulk), read, list (bounded in rows and bytes),
//! cancel, retry (one task or by filter).

use super::ApiState;
use super::body::AnyJson;
use super::body::IdParam;
use super::body::JsonBody;
use super::body::from_object_named;
use super::body::from_value_named;
use super::body::last_event_id;
use super::body::opt_integer;
use super::body::parse_id;
use super::body::parse_optional_json;
use super::errors::ApiError;
use super::errors::ErrorBody;
use crate::store::NewTask;
use crate::store::RetryFilter;
use crate::store::Task;
use crate::store::TaskFilter;
use crate::store::TaskStatus;
use axum::body::Bytes;
use axum::extract::Path;
use axum::extract::Query;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::http::header;
use axum::response::IntoResponse;
use axum::response::Response;
use serde::Deserialize;
use serde::Serialize;
use std::time::Duration;

/// The body of `POST /v1/tasks`: one task, or a bulk (an array, written all or none).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // the document's shape; the handler reads a serde_json::Value
pub(super) enum SubmitBody {
    One(NewTask),
    Many(Vec<NewTask>),
}

/// The answer of `POST /v1/tasks`: the task (or one per item of a bulk), each with
/// `duplicate`.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub(super) enum SubmitAnswer {
    One(Box<crate::store::Enqueued>),
    Many(Vec<crate::store::Enqueued>),
}

/// `POST /v1/tasks`: a task object, or an array of them (a bulk, at most
/// `http.max_bulk_items`, written all or none). One task answers 201 with the task, or 200
/// with the task already holding its unique key; both carry `"duplicate"`. A bulk answers
/// an array of those, 201 when it created any task, else 200.
#[utoipa::path(post, path = "/v1/tasks", tag = "tasks",
    request_body(content = SubmitBody, description = "A task, or an array of at most http.max_bulk_items tasks"),
    responses(
        (status = 201, description = "Created (a bulk: at least one task created)", body = SubmitAnswer),
        (status = 200, description = "Every task was a duplicate: the holders of the unique keys", body = SubmitAnswer),
        (status = 400, description = "Bad input, named by field (`items[i].` in a bulk); an unknown agent lists the known ones", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 503, body = ErrorBody),
    ))]
pub(super) async fn create_task(
    State(s): State<ApiState>,
    AnyJson(body): AnyJson,
) -> Result<Response, ApiError> {
    match body {
        serde_json::Value::Array(items) => create_tasks(s, items).await,
        v @ serde_json::Value::Object(_) => {
            let t: NewTask = from_value_named(v, "")?;
            let e = s.orchestrator.enqueue(&t).await?;
            let status = if e.duplicate {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            Ok((status, axum::Json(e)).into_response())
        }
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body must be a task object or an array of task objects",
        )),
    }
}

async fn create_tasks(s: ApiState, items: Vec<serde_json::Value>) -> Result<Response, ApiError> {
    let max = s.config.load().http.max_bulk_items;
    if items.is_empty() {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "items",
            "give at least one task",
        ));
    }
    if items.len() > max {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "items",
            format!(
                "{} tasks in one submit; at most {max} (http.max_bulk_items)",
                items.len()
            ),
        ));
    }
    let tasks = items
        .into_iter()
        .enumerate()
        .map(|(i, v)| from_object_named::<NewTask>(v, &format!("items[{i}].")))
        .collect::<Result<Vec<_>, _>>()?;
    let out = s.orchestrator.enqueue_many(&tasks).await?;
    let status = if out.iter().any(|e| !e.duplicate) {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(out)).into_response())
}

#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks", params(IdParam),
    responses((status = 200, body = Task), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn get_task(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, "id")?;
    Ok(axum::Json(s.store.get_task(id).await?).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// Only tasks in this status.
    #[param(value_type = Option<TaskStatus>)]
    status: Option<String>,
    /// Tasks of one run slot; `?session=` is its older name.
    #[serde(alias = "session")]
    slot: Option<String>,
    /// Steps of one objective.
    objective: Option<i64>,
    /// Tasks of one agent.
    agent: Option<String>,
    /// Tasks with a greater id (the previous page's `next_after`).
    after: Option<i64>,
    /// Most tasks listed (100 by default).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// A page of tasks, oldest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct TaskPage {
    tasks: Vec<Task>,
    /// The page stopped at `http.max_response_bytes` before `limit`.
    truncated: bool,
    /// Where the next page starts (`after=`), when there may be one.
    next_after: Option<i64>,
}

#[utoipa::path(get, path = "/v1/tasks", tag = "tasks", params(ListQuery),
    responses((status = 200, body = TaskPage), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn list_tasks(
    State(s): State<ApiState>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let status = match q.status.as_deref() {
        None => None,
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
                slot_id: q.slot.filter(|v| !v.is_empty()),
                objective_id: q.objective,
                agent: q.agent.filter(|v| !v.is_empty()),
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
    Ok(axum::Json(TaskPage {
        tasks,
        truncated,
        next_after,
    })
    .into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct EventsQuery {
    /// Events after this event id (the previous page's `next_after`).
    #[param(minimum = 0)]
    after: Option<i64>,
    /// Most events in the page (100 by default).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// A page of a task's events, oldest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct EventPage {
    task_id: i64,
    /// The task's status, read before the events: once final, no event follows the page.
    status: TaskStatus,
    events: Vec<crate::store::TaskEvent>,
    /// The page stopped at `http.max_response_bytes` before `limit`.
    truncated: bool,
    /// Where the next page starts (`after=`), when there may be one.
    next_after: Option<i64>,
}

/// `GET /v1/tasks/{id}/events?after=&limit=` → `{"task_id", "status", "events",
/// "truncated", "next_after"}`: the task's events after `after` (an event id), oldest
/// first, at most `limit` (100 by default, 1..=1000) and `http.max_response_bytes` of data.
/// `status` is read before the events, so once it is final the page holds every event up
/// to the end (a follower stops when it is final and no page is left).
#[utoipa::path(get, path = "/v1/tasks/{id}/events", tag = "tasks", params(IdParam, EventsQuery),
    responses((status = 200, description = "A page of events; with `Accept: text/event-stream`, every event after `after` (or `Last-Event-ID`) as it is stored, until the task ends",
            content((EventPage = "application/json"), (super::slots::SseEvent = "text/event-stream"))),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn task_events(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, "id")?;
    let Query(q) = q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let after = q.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "after",
            "must be an event id (0 or more)",
        ));
    }
    let limit = q.limit.unwrap_or(100);
    let task = s.store.get_task(id).await?;
    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if wants_stream {
        let resume = last_event_id(&headers)?;
        return follow_task_events(s, id, resume.unwrap_or(after));
    }
    let (events, truncated) = s
        .store
        .task_events_page(id, after, limit, s.config.load().http.max_response_bytes)
        .await?;
    let next_after = (truncated || events.len() as i64 == limit)
        .then(|| events.last().map(|e| e.id))
        .flatten();
    Ok(axum::Json(EventPage {
        task_id: id,
        status: task.status,
        events,
        truncated,
        next_after,
    })
    .into_response())
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub(super) struct CancelBody {
    /// Kept as the task's error ("cancelled through the API" when absent).
    reason: Option<String>,
}

/// Cancels a queued or running task (a running one's process tree is stopped).
#[utoipa::path(post, path = "/v1/tasks/{id}/cancel", tag = "tasks", params(IdParam),
    request_body(content = Option<CancelBody>, description = "Optional"),
    responses((status = 200, body = Task), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "The task already ended", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn cancel_task(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, "id")?;
    let reason = parse_optional_json::<CancelBody>(&body)?.reason;
    let reason = reason.unwrap_or_else(|| "cancelled through the API".into());
    Ok(axum::Json(s.orchestrator.cancel(id, &reason).await?).into_response())
}

/// How many more attempts a retry grants when the body does not say.
const DEFAULT_EXTRA_ATTEMPTS: i32 = 1;

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RetryBody {
    /// Attempts granted: max_attempts becomes at least attempts + this (1 by default).
    #[schema(minimum = 1, maximum = 1000)]
    #[serde(deserialize_with = "opt_integer")]
    extra_attempts: Option<i32>,
}

/// `POST /v1/tasks/{id}/retry` `{"extra_attempts"?}` → the task, queued again; 409 unless
/// it failed, was cancelled or timed out.
#[utoipa::path(post, path = "/v1/tasks/{id}/retry", tag = "tasks", params(IdParam),
    request_body(content = Option<RetryBody>, description = "Optional"),
    responses((status = 200, description = "The task, queued again", body = Task),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "Not failed, cancelled or timed out, or its unique key is held by another task", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn retry_task(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, "id")?;
    let extra = parse_optional_json::<RetryBody>(&body)?.extra_attempts;
    let task = s
        .orchestrator
        .retry(id, extra.unwrap_or(DEFAULT_EXTRA_ATTEMPTS))
        .await?;
    Ok(axum::Json(task).into_response())
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RetryFilterBody {
    /// Only this agent's tasks.
    #[schema(min_length = 1, max_length = 200)]
    agent: Option<String>,
    /// failed, cancelled or timed_out (all three when absent).
    #[schema(value_type = Option<RetryableStatus>)]
    status: Option<TaskStatus>,
    /// Most tasks retried (100 by default), in id order.
    #[schema(minimum = 1, maximum = 1000)]
    #[serde(deserialize_with = "opt_integer")]
    limit: Option<i64>,
    /// Attempts granted to each (1 by default).
    #[schema(minimum = 1, maximum = 1000)]
    #[serde(deserialize_with = "opt_integer")]
    extra_attempts: Option<i32>,
}

/// The statuses a retry leaves (the document's name for them; the body reads a TaskStatus
/// and refuses the others).
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub(super) enum RetryableStatus {
    Failed,
    Cancelled,
    TimedOut,
}

/// The tasks a retry by filter queued again.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct Retried {
    count: usize,
    tasks: Vec<Task>,
}

/// `POST /v1/tasks/retry` `{"agent"?, "status"?, "limit"?, "extra_attempts"?}` → `{"count",
/// "tasks"}`: the tasks queued again (at most `limit`, 100 by default, in id order).
#[utoipa::path(post, path = "/v1/tasks/retry", tag = "tasks", request_body = RetryFilterBody,
    responses((status = 200, body = Retried), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn retry_tasks(
    State(s): State<ApiState>,
    JsonBody(b): JsonBody<RetryFilterBody>,
) -> Result<Response, ApiError> {
    let filter = RetryFilter {
        agent: b.agent,
        status: b.status,
        limit: b.limit.unwrap_or(100),
    };
    let tasks = s
        .orchestrator
        .retry_matching(&filter, b.extra_attempts.unwrap_or(DEFAULT_EXTRA_ATTEMPTS))
        .await?;
    Ok(axum::Json(Retried {
        count: tasks.len(),
        tasks,
    })
    .into_response())
}

/// How often a task's event stream reads the database for new events while they come,
/// and the longest it waits once they stop (the wait doubles each quiet read). Events are
/// read from the table, not from this instance's memory, so a task running on another
/// instance is followed the same way; an event this instance stores for the task wakes the
/// stream at once.
const FOLLOW_POLL: Duration = Duration::from_millis(250);
const FOLLOW_POLL_MAX: Duration = Duration::from_secs(2);

/// The events of task `id` after event `after`, as server-sent events, until the task is
/// final and every event up to its end was sent (or the client leaves, or shutdown).
fn follow_task_events(s: ApiState, id: i64, after: i64) -> Result<Response, ApiError> {
    let store = s.store.clone();
    let max_bytes = s.config.load().http.max_response_bytes;
    let permit = s.open_stream()?;
    let mut live = s.orchestrator.hub().subscribe();
    let stream = super::slots::async_stream(s.shutdown.clone(), permit, move |tx| async move {
        let mut last = after;
        let mut wait = FOLLOW_POLL;
        loop {
            // The status first: once it is final, the page read after it holds the end.
            let done = match store.get_task(id).await {
                Ok(t) => t.status.is_terminal(),
                Err(e) => {
                    tracing::warn!(task_id = id, error = %e, "event stream: task read failed");
                    return;
                }
            };
            let before = last;
            loop {
                let (page, truncated) = match store.task_events_page(id, last, 500, max_bytes).await
                {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(task_id = id, error = %e, "event stream: read failed");
                        return;
                    }
                };
                let n = page.len();
                for e in page {
                    last = e.id;
                    if tx.send(super::slots::to_sse(&e)).await.is_err() {
                        return;
                    }
                }
                if !truncated && n < 500 {
                    break;
                }
            }
            if done {
                return;
            }
            wait = if last > before {
                FOLLOW_POLL
            } else {
                wait.saturating_mul(2).min(FOLLOW_POLL_MAX)
            };
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    ev = live.recv() => match ev {
                        Ok(ev) if ev.event.task_id == id => {
                            wait = FOLLOW_POLL;
                            break;
                        }
                        Ok(_) => {}
                        // Behind or closed: the next read catches up either way.
                        Err(_) => {
                            (&mut sleep).await;
                            break;
                        }
                    },
                }
            }
        }
    });
    Ok(super::slots::sse_response(stream))
}
