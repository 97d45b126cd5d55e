//! Request input: JSON bodies (bounded, NUL-free, fields named on error), path and query
//! parameters, and the JSON 405.

use super::errors::ApiError;
use axum::body::Bytes;
use axum::extract::FromRequest;
use axum::extract::Request;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// A JSON object body whose errors name the offending field (serde_path_to_error).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = json_bytes(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Any JSON body (an object or an array: the submit route takes either), NUL-free.
pub(super) struct AnyJson(pub serde_json::Value);

impl<S: Send + Sync> FromRequest<S> for AnyJson {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = json_bytes(req, state).await?;
        parse_json_value(&bytes).map(AnyJson)
    }
}

/// The body of a request that says it is JSON, bounded by `http.max_body_bytes`.
async fn json_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send Content-Type: application/json",
            ));
        }
        Bytes::from_request(req, state)
            .await
            .map_err(|e: BytesRejection| {
                let status = e.status();
                if status == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(status, "request body larger than http.max_body_bytes")
                } else {
                    ApiError::new(status, e.body_text())
                }
            })
    }
}

/// Parses a JSON object body into `T`: a syntax error, a NUL character anywhere, a body
/// that is not an object, or a field of the wrong shape is a 400 that names where it was.
pub(super) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    from_object_named(parse_json_value(bytes)?, "")
}

/// An optional JSON object body: empty or `null` is `T::default()`, else as [`parse_json`].
pub(super) fn parse_optional_json<T: DeserializeOwned + Default>(
    bytes: &[u8],
) -> Result<T, ApiError> {
    let text = bytes.trim_ascii();
    if text.is_empty() || text == b"null" {
        return Ok(T::default());
    }
    parse_json(text)
}

/// Parses any JSON body: a syntax error or a NUL character anywhere is a 400 that names
/// where it was.
pub(super) fn parse_json_value(bytes: &[u8]) -> Result<serde_json::Value, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))?;
    if let Some(path) = nul_in(&value, String::new()) {
        // A bulk's items are named `items[3]...`, as its other errors are.
        let path = match path.as_str() {
            "" => "body".into(),
            p if p.starts_with('[') => format!("items{p}"),
            _ => path,
        };
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            path,
            "contains a NUL character (\\u0000), which PostgreSQL cannot store",
        ));
    }
    Ok(value)
}

/// [`from_value_named`] for a value that must be a JSON object (serde would also take a
/// struct from an array of its fields in order, which no client means).
pub(super) fn from_object_named<T: DeserializeOwned>(
    value: serde_json::Value,
    prefix: &str,
) -> Result<T, ApiError> {
    if !value.is_object() {
        return Err(match prefix.strip_suffix('.') {
            Some(item) if !item.is_empty() => {
                ApiError::field(StatusCode::BAD_REQUEST, item, "must be a JSON object")
            }
            _ => ApiError::new(StatusCode::BAD_REQUEST, "the body must be a JSON object"),
        });
    }
    from_value_named(value, prefix)
}

/// Deserializes `T` from a parsed body (or one item of it); a field of the wrong shape is
/// a 400 naming it, after `prefix` (e.g. `items[3].`).
pub(super) fn from_value_named<T: DeserializeOwned>(
    value: serde_json::Value,
    prefix: &str,
) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            match prefix.strip_suffix('.') {
                Some(item) if !item.is_empty() => {
                    ApiError::field(StatusCode::BAD_REQUEST, item, inner.to_string())
                }
                _ => ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON: {inner}")),
            }
        } else {
            ApiError::field(
                StatusCode::BAD_REQUEST,
                format!("{prefix}{path}"),
                inner.to_string(),
            )
        }
    })
}

/// The dotted path of the first string or key in `v` that holds a NUL character.
pub(super) fn nul_in(v: &serde_json::Value, here: String) -> Option<String> {
    use serde_json::Value;
    let join = |k: &str| {
        if here.is_empty() {
            k.to_string()
        } else {
            format!("{here}.{k}")
        }
    };
    match v {
        Value::String(s) if s.contains('\0') => Some(here),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, x)| nul_in(x, format!("{here}[{i}]"))),
        Value::Object(o) => o.iter().find_map(|(k, x)| {
            if k.contains('\0') {
                Some(join(&k.replace('\0', "\\u0000")))
            } else {
                nul_in(x, join(k))
            }
        }),
        _ => None,
    }
}

/// Refuses a NUL character (`%00`) in a query parameter before any handler sees it:
/// PostgreSQL cannot store one, and the answer must name where it was. (Path parameters
/// are checked by the handlers, which know their names.)
pub(super) async fn reject_nul(req: Request, next: Next) -> Result<Response, ApiError> {
    let uri = req.uri();
    let has_nul = |s: &str| s.to_ascii_lowercase().contains("%00");
    if let Some(q) = uri.query()
        && has_nul(q)
    {
        let name = q
            .split('&')
            .find(|kv| has_nul(kv))
            .map(|kv| kv.split('=').next().unwrap_or(kv).to_string())
            .unwrap_or_else(|| "query".into());
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            name,
            "contains a NUL character (%00)",
        ));
    }
    Ok(next.run(req).await)
}

/// A run slot id taken from the path (named `field` in errors): what the store would
/// accept in a task's `session_id`.
pub(super) fn check_slot_param(slot: &str, field: &str) -> Result<(), ApiError> {
    if slot.is_empty() || slot.len() > crate::store::MAX_NAME_LEN {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            field,
            format!("must be 1..={} characters", crate::store::MAX_NAME_LEN),
        ));
    }
    if slot.contains('\0') {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            field,
            "contains a NUL character (%00)",
        ));
    }
    Ok(())
}

pub(super) async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}

/// A task's or objective's id in the path.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // the document's shape; handlers read the segment with parse_id
pub(super) struct IdParam {
    /// A positive integer id (anything else is a 400 naming `id`).
    #[param(minimum = 1)]
    id: i64,
}

/// A run slot's id in the path.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub(super) struct SlotParam {
    /// The run slot: 1 to 200 characters, no NUL.
    #[param(min_length = 1, max_length = 200)]
    id: String,
}

/// An agent's name in the path.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub(super) struct AgentParam {
    /// One of the daemon's configured agents: 1 to 200 characters, no NUL.
    #[param(min_length = 1, max_length = 200)]
    name: String,
}

/// An event id given as `field` (a `Last-Event-ID` header or an `after=` parameter): none,
/// or a non-negative integer; anything else is a 400 naming the field.
pub(super) fn event_id(v: Option<&str>, field: &str) -> Result<Option<i64>, ApiError> {
    v.map(|v| {
        v.trim()
            .parse::<i64>()
            .ok()
            .filter(|id| *id >= 0)
            .ok_or_else(|| {
                ApiError::field(
                    StatusCode::BAD_REQUEST,
                    field,
                    "must be an event id (0 or more)",
                )
            })
    })
    .transpose()
}

/// The `Last-Event-ID` a reconnecting client sends, checked as [`event_id`].
pub(super) fn last_event_id(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let header = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("\u{fffd}"));
    event_id(header, "Last-Event-ID")
}

pub(super) fn parse_id(raw: &str, what: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>().ok().filter(|v| *v > 0).ok_or_else(|| {
        ApiError::field(
            StatusCode::BAD_REQUEST,
            what,
            format!("{raw:?} is not a positive integer id"),
        )
    })
}

/// An optional integer field that also takes an integral JSON number written as a float
/// (`98.0`): JSON Schema's `integer` admits it, and serde's integers would not.
pub(super) fn opt_integer<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64>,
{
    use serde::de::Error;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let whole = n.as_i64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
            .map(|f| f as i64)
    });
    whole
        .and_then(|v| T::try_from(v).ok())
        .map(Some)
        .ok_or_else(|| D::Error::custom(format!("{n} is not an integer in range")))
}
