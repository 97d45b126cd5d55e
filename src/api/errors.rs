//! API errors: one JSON shape, `{"error", "field"?}`, and the status a client can act on.

use crate::db::DbError;
use crate::orchestrator::OrchestratorError;
use crate::store::StoreError;
use axum::http::StatusCode;
use axum::http::header;
use axum::response::IntoResponse;
use axum::response::Response;

/// A JSON error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: None,
        }
    }
    pub(super) fn field(
        status: StatusCode,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: Some(field.into()),
        }
    }
}

/// Every error's body.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong and, where there is one, what to do about it.
    pub error: String,
    /// The input to blame, when one is (`agent`, `items[3].payload`, `limit`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            field: self.field,
        };
        let mut r = (self.status, axum::Json(body)).into_response();
        // Every 503 here is capacity or the database's weather: say when to come back.
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        r
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::CheckoutTimeout { .. }
            | DbError::ConnectTimeout(_)
            | DbError::Deadline(_)
            | DbError::Connect(_)
            | DbError::PoolClosed => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            // A data exception is the input's fault, whatever validation missed.
            DbError::Query(ref q) if q.code().is_some_and(|c| c.code().starts_with("22")) => {
                tracing::warn!(error = %e, "input refused by the database");
                ApiError::new(StatusCode::BAD_REQUEST, format!("invalid input: {e}"))
            }
            // Everything the guard would retry — a serialization race, a deadlock, a
            // statement or lock time-out behind someone's lock, the server shutting down
            // or out of connections, a broken connection: the request did nothing that
            // stays, and the same request may succeed shortly. A 500 would tell the client
            // to give up on something that is the server's weather.
            ref t if t.is_transient() => {
                tracing::warn!(error = %e, "request failed on a transient database error");
                let why = match t {
                    DbError::Query(q) => match q.as_db_error() {
                        Some(d) => format!("{} {}", d.code().code(), d.message()),
                        None => "the database connection broke".to_string(),
                    },
                    other => other.to_string(),
                };
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("try again: the database could not answer now ({why})"),
                )
            }
            other => {
                tracing::error!(error = %other, "database error in API handler");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "database error")
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Db(d) => d.into(),
            StoreError::TaskNotFound(_) | StoreError::ObjectiveNotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, e.to_string())
            }
            StoreError::IllegalTransition { .. }
            | StoreError::LeaseLost { .. }
            | StoreError::NotRetryable { .. } => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            StoreError::Invalid { field, message } => {
                ApiError::field(StatusCode::BAD_REQUEST, field, message)
            }
            StoreError::Corrupt(_) => {
                tracing::error!(error = %e, "corrupt row");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "corrupt row")
            }
        }
    }
}

impl From<OrchestratorError> for ApiError {
    fn from(e: OrchestratorError) -> Self {
        match e {
            OrchestratorError::UnknownAgent { agent, known } => ApiError::field(
                StatusCode::BAD_REQUEST,
                "agent",
                format!(
                    "unknown agent {agent:?}; {}",
                    crate::orchestrator::known_agents(&known)
                ),
            ),
            OrchestratorError::NoRunSlot(_) | OrchestratorError::ShuttingDown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            OrchestratorError::Store(s) => s.into(),
            OrchestratorError::Db(d) => d.into(),
        }
    }
}
