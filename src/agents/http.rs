//! An HTTP agent service as an agent: the payload is POSTed as JSON to `url` (with the
//! task id and attempt in `X-Taskwarden-*` headers). A JSON reply is the result (its
//! `usage` field, if any, is recorded); a `text/event-stream` reply is read event by event,
//! each `data:` JSON object becoming a task event under the same usage convention. A non-2xx
//! status fails the attempt with the start of the body.

use std::time::Duration;

use futures_util::StreamExt;

use super::{Agent, AgentError, AgentOutput, BoxFuture, TaskContext};

/// How long connecting may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence between bytes of a reply (a stream may be long, but not mute).
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest JSON reply, and largest single SSE event, accepted.
pub const MAX_REPLY_BYTES: usize = 8 * 1024 * 1024;

pub struct HttpAgent {
    url: String,
    client: reqwest::Client,
}

impl HttpAgent {
    pub fn new(url: &str, timeout: Duration) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT.min(timeout))
            .build()?;
        Ok(HttpAgent {
            url: url.to_string(),
            client,
        })
    }
}

impl Agent for HttpAgent {
    fn run(&self, ctx: TaskContext) -> BoxFuture<Result<AgentOutput, AgentError>> {
        let req = self
            .client
            .post(&self.url)
            .header("X-Taskwarden-Task-Id", ctx.task_id.to_string())
            .header("X-Taskwarden-Attempt", ctx.attempt.to_string())
            .header(
                "X-Taskwarden-Session-Id",
                ctx.slot_id.clone().unwrap_or_default(),
            )
            .header("Accept", "application/json, text/event-stream")
            .json(&ctx.payload);
        Box::pin(async move { run(req, ctx).await })
    }
}

fn transport(e: reqwest::Error) -> AgentError {
    // The URL may carry credentials; leave it out of stored errors.
    AgentError::retryable(format!("http agent: {}", e.without_url()))
}

async fn run(req: reqwest::RequestBuilder, ctx: TaskContext) -> Result<AgentOutput, AgentError> {
    let resp = req.send().await.map_err(transport)?;
    let status = resp.status();
    let is_sse = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !status.is_success() {
        let head = read_head(resp, 2048).await;
        let retryable = status.is_server_error() || status.as_u16() == 429;
        return Err(AgentError {
            message: format!("http agent replied {status}: {head}"),
            retryable,
        });
    }
    if is_sse {
        return read_sse(resp, &ctx).await;
    }
    let bytes = read_limited(resp).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(AgentOutput::default());
    }
    // Invalid UTF-8 in a reply's strings becomes U+FFFD rather than failing the task.
    let mut v: serde_json::Value = serde_json::from_str(&String::from_utf8_lossy(&bytes))
        .map_err(|e| AgentError::fatal(format!("http agent reply is not JSON: {e}")))?;
    if let Some(obj) = v.as_object_mut()
        && let Some(u) = obj.remove("usage")
    {
        let usage = serde_json::from_value(u)
            .map_err(|e| AgentError::fatal(format!("malformed usage object: {e}")))?;
        ctx.usage(usage).await?;
    }
    Ok(AgentOutput::result(v))
}

/// The first `max` bytes of an error reply (lossily decoded), without reading the rest:
/// an error body may be as large as the agent likes.
async fn read_head(resp: reqwest::Response, max: usize) -> String {
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while out.len() < max {
        match stream.next().await {
            Some(Ok(chunk)) => out.extend_from_slice(&chunk),
            _ => break,
        }
    }
    out.truncate(max);
    String::from_utf8_lossy(&out).into_owned()
}

async fn read_limited(resp: reqwest::Response) -> Result<Vec<u8>, AgentError> {
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(transport)?;
        if out.len() + chunk.len() > MAX_REPLY_BYTES {
            return Err(AgentError::fatal(format!(
                "http agent reply larger than {MAX_REPLY_BYTES} bytes"
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Reads a `text/event-stream` body: events end at a blank line; `data:` lines of one
/// event are joined with newlines; comments and other fields are ignored.
async fn read_sse(resp: reqwest::Response, ctx: &TaskContext) -> Result<AgentOutput, AgentError> {
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    // Where the search for the next newline goes on: a reply that never sends one is
    // scanned once, not once per chunk.
    let mut scanned = 0;
    let mut data: Vec<String> = Vec::new();
    // One event's `data:` lines together are bounded like a line: a reply of endless
    // `data:` lines without the blank line that ends an event must not grow memory.
    let mut data_bytes = 0usize;
    let too_large = || AgentError::fatal("http agent event larger than the limit");
    let mut result = None;
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.map_err(transport)?);
        if buf.len() > MAX_REPLY_BYTES {
            return Err(too_large());
        }
        while let Some(found) = buf[scanned..].iter().position(|b| *b == b'\n') {
            let pos = scanned + found;
            scanned = 0;
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if !data.is_empty() {
                    let joined = data.join("\n");
                    data.clear();
                    data_bytes = 0;
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&joined)
                        && let Some(r) = ctx.emit_json(v).await?
                    {
                        result = Some(r);
                    }
                }
            } else if let Some(d) = line.strip_prefix("data:") {
                let d = d.strip_prefix(' ').unwrap_or(d);
                data_bytes = data_bytes.saturating_add(d.len() + 1);
                if data_bytes > MAX_REPLY_BYTES {
                    return Err(too_large());
                }
                data.push(d.to_string());
            }
        }
        scanned = buf.len();
    }
    if !data.is_empty()
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(&data.join("\n"))
        && let Some(r) = ctx.emit_json(v).await?
    {
        result = Some(r);
    }
    Ok(AgentOutput {
        result,
        snooze: None,
    })
}
