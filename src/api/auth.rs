//! Bearer-token authentication for `/v1`: case-insensitive scheme, a comparison whose
//! time depends only on the secret.

use super::ApiState;
use super::errors::ApiError;
use axum::extract::Request;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

/// Compares a presented token with the secret in time that depends only on the secret's
/// length, never on the presented one's length or content.
pub(super) fn constant_time_eq(presented: &[u8], secret: &[u8]) -> bool {
    let mut acc = u8::from(presented.len() != secret.len());
    for (i, s) in secret.iter().enumerate() {
        acc |= s ^ presented.get(i).copied().unwrap_or(!*s);
    }
    acc == 0
}

pub(super) async fn auth(
    State(s): State<ApiState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let token = s.token.load();
    if let Some(want) = token.as_ref() {
        let got = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                // The scheme is case-insensitive (RFC 7235).
                let (scheme, token) = v.trim_start().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        match got {
            Some(g) if constant_time_eq(g.as_bytes(), want.as_bytes()) => {}
            Some(_) => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "wrong bearer token",
                ));
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "missing Authorization: Bearer token",
                ));
            }
        }
    }
    Ok(next.run(req).await)
}
