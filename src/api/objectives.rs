//! `/v1/objectives`: create (steps or a planner) and read.

use super::ApiState;
use super::body::IdParam;
use super::body::JsonBody;
use super::body::parse_id;
use super::errors::ApiError;
use super::errors::ErrorBody;
use crate::store::NewObjective;
use axum::extract::Path;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::response::Response;

/// Creates an objective from its steps (or a planner's), written whole or not at all.
#[utoipa::path(post, path = "/v1/objectives", tag = "objectives", request_body = NewObjective,
    responses((status = 201, body = crate::store::Objective),
        (status = 400, description = "Bad steps (keys, dependencies, cycle) or agent, named by field", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn create_objective(
    State(s): State<ApiState>,
    JsonBody(o): JsonBody<NewObjective>,
) -> Result<Response, ApiError> {
    let obj = s.orchestrator.create_objective(&o).await?;
    Ok((StatusCode::CREATED, axum::Json(obj)).into_response())
}

#[utoipa::path(get, path = "/v1/objectives/{id}", tag = "objectives", params(IdParam),
    responses((status = 200, body = crate::store::Objective), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn get_objective(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, "id")?;
    Ok(axum::Json(s.store.get_objective(id).await?).into_response())
}
