//! `/v1/tasks`: submit, read, list (bounded in rows and bytes), cancel.

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
    /// Tasks of one run slot; `?session=` is its older name.
    #[serde(alias = "session")]
    slot: Option<String>,
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
                slot_id: q.slot.filter(|v| !v.is_empty()),
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
