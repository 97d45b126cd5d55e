//! `/v1/agents/{name}/pause` and `/resume`: an agent's queue, paused cluster-wide.

#[allow(unused_imports)]
use super::*;

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct PauseBody {
    reason: Option<String>,
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
pub(super) async fn pause_agent(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_agent_param(&name)?;
    let reason = if body.is_empty() {
        None
    } else {
        parse_json::<PauseBody>(&body)?.reason
    };
    let p = s.orchestrator.pause(&name, reason.as_deref()).await?;
    Ok(axum::Json(json!({
        "agent": p.agent, "paused": true, "paused_at": p.paused_at,
        "paused_by": p.paused_by, "reason": p.reason,
    }))
    .into_response())
}

/// Resumes an agent: `{"agent", "paused": false, "was_paused"}`.
pub(super) async fn resume_agent(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    check_agent_param(&name)?;
    let was = s.orchestrator.resume(&name).await?;
    Ok(axum::Json(json!({ "agent": name, "paused": false, "was_paused": was })).into_response())
}
