//! `/v1/objectives`: create (steps or a planner) and read.

#[allow(unused_imports)]
use super::*;

pub(super) async fn create_objective(
    State(s): State<ApiState>,
    JsonBody(o): JsonBody<NewObjective>,
) -> Result<Response, ApiError> {
    let obj = s.orchestrator.create_objective(&o).await?;
    Ok((StatusCode::CREATED, axum::Json(obj)).into_response())
}

pub(super) async fn get_objective(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, "id")?;
    Ok(axum::Json(s.store.get_objective(id).await?).into_response())
}
