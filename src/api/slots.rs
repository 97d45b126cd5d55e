//! Run slots: `POST /v1/slots/{id}/run` and the slot's event stream
//! `GET /v1/slots/{id}/events` (SSE, resumable). The paths under `/v1/sessions/` that
//! named them before are served by the same handlers.

use super::ApiState;
use super::body::JsonBody;
use super::body::SlotParam;
use super::body::check_slot_param;
use super::body::event_id;
use super::body::last_event_id;
use super::errors::ApiError;
use super::errors::ErrorBody;
use crate::store::NewTask;
use crate::store::Task;
use axum::extract::OriginalUri;
use axum::extract::Path;
use axum::extract::Query;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::response::Response;
use axum::response::sse::Event;
use axum::response::sse::KeepAlive;
use axum::response::sse::Sse;
use serde::Deserialize;
use serde_json::json;
use std::convert::Infallible;
use std::time::Duration;

/// Events replayed per database page when a subscriber resumes.
pub(super) const REPLAY_PAGE: i64 = 500;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RunBody {
    /// One of the daemon's configured agents.
    #[schema(min_length = 1, max_length = 200)]
    agent: String,
    #[serde(default)]
    payload: serde_json::Value,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000)]
    max_attempts: Option<i32>,
}

/// Runs a task now in a run slot, cancelling the task the slot runs (chat-style: the
/// newest message wins).
#[utoipa::path(post, path = "/v1/slots/{id}/run", tag = "slots", params(SlotParam), request_body = RunBody,
    responses((status = 201, body = Task), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 503, description = "No run slot free, or the database is down", body = ErrorBody)))]
pub(super) async fn run_in_slot(
    State(s): State<ApiState>,
    OriginalUri(uri): OriginalUri,
    Path(slot): Path<String>,
    JsonBody(b): JsonBody<RunBody>,
) -> Result<Response, ApiError> {
    check_slot_param(&slot, slot_param_name(&uri))?;
    let t = NewTask {
        agent: b.agent,
        payload: b.payload,
        slot_id: None,
        priority: b.priority,
        max_attempts: b.max_attempts,
        ..NewTask::default()
    };
    let task = s.orchestrator.run_in_slot(&slot, t).await?;
    Ok((StatusCode::CREATED, axum::Json(task)).into_response())
}

/// Server-sent events of a run slot's tasks. `Last-Event-ID` (or `?after=`) resumes after
/// that event: missed events are read from the database, then live ones follow. A
/// subscriber that falls behind the live buffer is caught up from the database again.
#[utoipa::path(get, path = "/v1/slots/{id}/events", tag = "slots",
    params(SlotParam,
        ("after" = Option<i64>, Query, nullable = false, minimum = 0, description = "Resume after this event id (or the Last-Event-ID header)"),
        ("Last-Event-ID" = Option<i64>, Header, nullable = false, minimum = 0, description = "Resume after this event id")),
    responses((status = 200, description = "Server-sent events: each `id:` an event id, `data:` a task event as JSON", content_type = "text/event-stream", body = SseEvent),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn slot_events(
    State(s): State<ApiState>,
    OriginalUri(uri): OriginalUri,
    Path(slot): Path<String>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Response, ApiError> {
    check_slot_param(&slot, slot_param_name(&uri))?;
    // Each is checked when given; the header (what a reconnecting EventSource sends) wins.
    let from_header = last_event_id(&headers)?;
    let from_query = event_id(q.get("after").map(String::as_str), "after")?;
    let after = from_header.or(from_query).unwrap_or(0);
    // Subscribe before replaying, so nothing falls between the two.
    let mut live = s.orchestrator.hub().subscribe();
    let store = s.store.clone();
    let shutdown = s.shutdown.clone();
    let permit = s.open_stream()?;
    let stream = async_stream(shutdown, permit, move |tx| async move {
        let mut last = after;
        loop {
            // Catch up from the database.
            loop {
                let page = match store.slot_events(&slot, last, REPLAY_PAGE).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(slot_id = %slot, error = %e, "event replay failed");
                        return;
                    }
                };
                let n = page.len();
                for e in page {
                    last = e.id;
                    if tx.send(to_sse(&e)).await.is_err() {
                        return;
                    }
                }
                if (n as i64) < REPLAY_PAGE {
                    break;
                }
            }
            // Then follow live events.
            loop {
                match live.recv().await {
                    Ok(ev)
                        if ev.slot_id.as_deref() == Some(slot.as_str()) && ev.event.id > last =>
                    {
                        last = ev.event.id;
                        if tx.send(to_sse(&ev.event)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    });
    Ok(sse_response(stream))
}

/// How errors name the slot id in the path: `slot`, or `session` under the old
/// `/v1/sessions/` paths, as they always did there.
fn slot_param_name(uri: &axum::http::Uri) -> &'static str {
    if uri.path().starts_with("/v1/sessions/") {
        "session"
    } else {
        "slot"
    }
}

/// One server-sent event of a run slot's stream.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // the document's shape; to_sse writes it
pub(super) struct SseEvent {
    /// The event's id: send it back as Last-Event-ID (or `after=`) to resume after it.
    id: String,
    /// The event's kind (`progress`, `attempt_failed`, `succeeded`, ...).
    event: String,
    /// JSON: `{"task_id", "kind", "data", "at"}`.
    data: String,
}

pub(super) fn to_sse(e: &crate::store::TaskEvent) -> Result<Event, Infallible> {
    let data = json!({ "task_id": e.task_id, "kind": e.kind, "data": e.data, "at": e.created_at });
    Ok(Event::default()
        .id(e.id.to_string())
        .event(e.kind.clone())
        .data(data.to_string()))
}

/// How often an event stream with nothing to say sends a comment line. Its write is how a
/// client that vanished without closing is found (the write fails), and it keeps proxies
/// from timing the stream out.
pub(super) const STREAM_KEEPALIVE: Duration = Duration::from_secs(5);

/// A stream fed by a producer task through a small bounded channel. The producer ends
/// when the client goes away even if it has nothing to send (the response body, and with
/// it the receiver, is dropped once hyper sees the connection close, a keep-alive write
/// fail or the writes stall past `http.write_timeout`), at shutdown, or when it returns.
/// The stream's place among `http.max_streams` is held by the response body, not the
/// producer: a producer that has queued its last events and returned still leaves them
/// (up to the channel's 64) to be written, and that is what the bound is for.
pub(super) fn async_stream<F, Fut>(
    shutdown: tokio_util::sync::CancellationToken,
    permit: super::server::Permit,
    produce: F,
) -> HeldStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Event, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let gone = tx.clone();
    let fut = produce(tx);
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = gone.closed() => {}
            _ = fut => {}
        }
    });
    HeldStream {
        events: tokio_stream::wrappers::ReceiverStream::new(rx),
        _permit: permit,
    }
}

/// An event stream's body together with its place among `http.max_streams`.
pub(super) struct HeldStream {
    events: tokio_stream::wrappers::ReceiverStream<Result<Event, Infallible>>,
    _permit: super::server::Permit,
}

impl tokio_stream::Stream for HeldStream {
    type Item = Result<Event, Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.events).poll_next(cx)
    }
}

/// The response of an event stream, with its keep-alive.
pub(super) fn sse_response(stream: HeldStream) -> Response {
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(STREAM_KEEPALIVE))
        .into_response()
}

/// `POST /v1/sessions/{id}/run`: the run slot's path before slots were called slots.
#[utoipa::path(post, path = "/v1/sessions/{id}/run", tag = "slots", params(SlotParam), request_body = RunBody,
    responses((status = 201, body = Task), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 503, description = "No run slot free, or the database is down", body = ErrorBody)))]
#[deprecated(note = "use POST /v1/slots/{id}/run")]
pub(super) async fn run_in_session(
    state: State<ApiState>,
    uri: OriginalUri,
    slot: Path<String>,
    body: JsonBody<RunBody>,
) -> Result<Response, ApiError> {
    run_in_slot(state, uri, slot, body).await
}

/// `GET /v1/sessions/{id}/events`: the run slot's path before slots were called slots.
#[utoipa::path(get, path = "/v1/sessions/{id}/events", tag = "slots",
    params(SlotParam,
        ("after" = Option<i64>, Query, nullable = false, minimum = 0, description = "Resume after this event id (or the Last-Event-ID header)"),
        ("Last-Event-ID" = Option<i64>, Header, nullable = false, minimum = 0, description = "Resume after this event id")),
    responses((status = 200, description = "Server-sent events: each `id:` an event id, `data:` a task event as JSON", content_type = "text/event-stream", body = SseEvent),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
#[deprecated(note = "use GET /v1/slots/{id}/events")]
pub(super) async fn session_events(
    state: State<ApiState>,
    uri: OriginalUri,
    slot: Path<String>,
    headers: HeaderMap,
    q: Query<std::collections::HashMap<String, String>>,
) -> Result<Response, ApiError> {
    slot_events(state, uri, slot, headers, q).await
}
