//! `/v1/tasks`: submit (one task or a bulk), read, list (bounded in rows and bytes),
//! cancel, retry (one task or by filter).

#[allow(unused_imports)]
use super::*;

/// `POST /v1/tasks`: a task object, or an array of them (a bulk, at most
/// `http.max_bulk_items`, written all or none). One task answers 201 with the task, or 200
/// with the task already holding its unique key; both carry `"duplicate"`. A bulk answers
/// an array of those, 201 when it created any task, else 200.
pub(super) async fn create_task(
    State(s): State<ApiState>,
    JsonBody(body): JsonBody<serde_json::Value>,
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
        .map(|(i, v)| from_value_named::<NewTask>(v, &format!("items[{i}].")))
        .collect::<Result<Vec<_>, _>>()?;
    let out = s.orchestrator.enqueue_many(&tasks).await?;
    let status = if out.iter().any(|e| !e.duplicate) {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(out)).into_response())
}

pub(super) async fn get_task(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, "id")?;
    Ok(axum::Json(s.store.get_task(id).await?).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    status: Option<String>,
    /// Tasks of one run slot; `?session=` is its older name.
    #[serde(alias = "session")]
    slot: Option<String>,
    objective: Option<i64>,
    agent: Option<String>,
    after: Option<i64>,
    limit: Option<i64>,
}

pub(super) async fn list_tasks(
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
    Ok(
        axum::Json(json!({ "tasks": tasks, "truncated": truncated, "next_after": next_after }))
            .into_response(),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    after: Option<i64>,
    limit: Option<i64>,
}

/// `GET /v1/tasks/{id}/events?after=&limit=` → `{"task_id", "status", "events",
/// "truncated", "next_after"}`: the task's events after `after` (an event id), oldest
/// first, at most `limit` (100 by default, 1..=1000) and `http.max_response_bytes` of data.
/// `status` is read before the events, so once it is final the page holds every event up
/// to the end (a follower stops when it is final and no page is left).
pub(super) async fn task_events(
    State(s): State<ApiState>,
    Path(id): Path<String>,
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
    let (events, truncated) = s
        .store
        .task_events_page(id, after, limit, s.config.load().http.max_response_bytes)
        .await?;
    let next_after = (truncated || events.len() as i64 == limit)
        .then(|| events.last().map(|e| e.id))
        .flatten();
    Ok(axum::Json(json!({
        "task_id": id,
        "status": task.status,
        "events": events,
        "truncated": truncated,
        "next_after": next_after,
    }))
    .into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct CancelBody {
    reason: Option<String>,
}

pub(super) async fn cancel_task(
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

/// How many more attempts a retry grants when the body does not say.
const DEFAULT_EXTRA_ATTEMPTS: i32 = 1;

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RetryBody {
    extra_attempts: Option<i32>,
}

/// `POST /v1/tasks/{id}/retry` `{"extra_attempts"?}` → the task, queued again; 409 unless
/// it failed, was cancelled or timed out.
pub(super) async fn retry_task(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, "id")?;
    let extra = if body.is_empty() {
        None
    } else {
        parse_json::<RetryBody>(&body)?.extra_attempts
    };
    let task = s
        .orchestrator
        .retry(id, extra.unwrap_or(DEFAULT_EXTRA_ATTEMPTS))
        .await?;
    Ok(axum::Json(task).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RetryFilterBody {
    agent: Option<String>,
    status: Option<TaskStatus>,
    limit: Option<i64>,
    extra_attempts: Option<i32>,
}

/// `POST /v1/tasks/retry` `{"agent"?, "status"?, "limit"?, "extra_attempts"?}` → `{"count",
/// "tasks"}`: the tasks queued again (at most `limit`, 100 by default, in id order).
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
    Ok(axum::Json(json!({ "count": tasks.len(), "tasks": tasks })).into_response())
}
