//! `/v1/tasks`: submit, read, list (bounded in rows and bytes), cancel, retry (one task or
//! by filter).

#[allow(unused_imports)]
use super::*;

pub(super) async fn create_task(
    State(s): State<ApiState>,
    JsonBody(t): JsonBody<NewTask>,
) -> Result<Response, ApiError> {
    let task = s.orchestrator.submit(&t).await?;
    Ok((StatusCode::CREATED, axum::Json(task)).into_response())
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
    session: Option<String>,
    objective: Option<i64>,
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
