//! `/v1/agents/{name}/pause` and `/resume`: an agent's queue, paused cluster-wide.

use super::ApiState;
use super::body::AgentParam;
use super::body::parse_optional_json;
use super::errors::ApiError;
use super::errors::ErrorBody;
use axum::body::Bytes;
use axum::extract::Path;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::response::Response;
use chrono::DateTime;
use chrono::Utc;
use serde::Deserialize;
use serde::Serialize;

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub(super) struct PauseBody {
    /// Why (kept with the pause, shown in status).
    reason: Option<String>,
}

/// A paused agent.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct Paused {
    agent: String,
    /// Always true.
    paused: bool,
    /// When the pause in force began (a second pause keeps the first one's time and reason).
    paused_at: DateTime<Utc>,
    /// The instance that took the pause request.
    paused_by: String,
    reason: Option<String>,
}

/// A resumed agent.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct Resumed {
    agent: String,
    /// Always false.
    paused: bool,
    /// Whether it was paused before this request.
    was_paused: bool,
}

/// An agent name taken from the path: what the store accepts, NUL-free.
fn check_agent_param(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > crate::store::MAX_NAME_LEN {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "agent",
            format!("must be 1..={} characters", crate::store::MAX_NAME_LEN),
        ));
    }
    if name.contains('\0') {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "agent",
            "contains a NUL character (%00)",
        ));
    }
    Ok(())
}

/// Pauses a known agent: `{"agent", "paused": true, "paused_at", "paused_by", "reason"}`.
/// Pausing a paused agent answers the same, with the first pause's time and reason.
#[utoipa::path(post, path = "/v1/agents/{name}/pause", tag = "agents", params(AgentParam),
    request_body(content = Option<PauseBody>, description = "Optional"),
    responses((status = 200, body = Paused), (status = 400, description = "Bad or unknown agent (the known ones listed)", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn pause_agent(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_agent_param(&name)?;
    let reason = parse_optional_json::<PauseBody>(&body)?.reason;
    let p = s.orchestrator.pause(&name, reason.as_deref()).await?;
    Ok(axum::Json(Paused {
        agent: p.agent,
        paused: true,
        paused_at: p.paused_at,
        paused_by: p.paused_by,
        reason: p.reason,
    })
    .into_response())
}

/// Resumes an agent: `{"agent", "paused": false, "was_paused"}`.
#[utoipa::path(post, path = "/v1/agents/{name}/resume", tag = "agents", params(AgentParam),
    responses((status = 200, body = Resumed), (status = 400, description = "Bad or unknown agent (the known ones listed)", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn resume_agent(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    check_agent_param(&name)?;
    let was = s.orchestrator.resume(&name).await?;
    Ok(axum::Json(Resumed {
        agent: name,
        paused: false,
        was_paused: was,
    })
    .into_response())
}
