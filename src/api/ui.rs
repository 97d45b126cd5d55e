//! The web console at `/ui`: one HTML page, one script and one stylesheet, built into the
//! binary (no Node toolchain to build the daemon, no CDN, no request leaves the daemon).
//! Every path under `/ui/` answers the same page; the script reads the path and draws the
//! overview, tasks, a task, an objective or the agents, from the JSON API under `/v1` with
//! the token the user typed (kept in the tab's sessionStorage, sent as a Bearer header,
//! never put in a URL). Live parts follow server-sent events read with `fetch`
//! (`/v1/status/stream`, a task's events), never a polling loop.

use axum::http::header;
use axum::response::IntoResponse;
use axum::response::Response;

const INDEX: &str = include_str!("../../ui/index.html");
const SCRIPT: &str = include_str!("../../ui/app.js");
const STYLE: &str = include_str!("../../ui/app.css");

/// Scripts and styles from this origin only; data from this origin only; no frames.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `/ui` and every page under it: the console's page.
pub(super) async fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

pub(super) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

pub(super) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}
