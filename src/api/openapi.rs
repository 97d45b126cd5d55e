//! The OpenAPI 3.1 document of the HTTP surface, generated from the handlers' annotations
//! and the types they read and answer, served at `/openapi.json` and committed as
//! `docs/openapi.json` (a unit test below fails when the two differ; `taskwarden openapi >
//! docs/openapi.json` writes it again).

use axum::http::header;
use axum::response::IntoResponse;

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "taskwarden",
        description = "Runs agent and background tasks on PostgreSQL and watches its own DB sessions, pool, tasks and memory. \
Every error is `{\"error\", \"field\"?}`. Routes under /v1 need `Authorization: Bearer <token>` when http.api_token (or \
api_token_file) is set; /metrics, /healthz, /readyz and /openapi.json never do.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        super::tasks::create_task,
        super::tasks::list_tasks,
        super::tasks::get_task,
        super::tasks::task_events,
        super::tasks::cancel_task,
        super::tasks::retry_task,
        super::tasks::retry_tasks,
        super::agents::pause_agent,
        super::agents::resume_agent,
        super::objectives::create_objective,
        super::objectives::get_objective,
        super::slots::run_in_slot,
        super::slots::slot_events,
        super::slots::run_in_session,
        super::slots::session_events,
        super::health::status,
        super::health::status_stream,
        super::health::metrics,
        super::health::healthz,
        super::health::readyz,
        openapi_json,
    ),
    components(schemas(crate::store::UniqueScope, crate::store::ObjectiveStatus)),
    modifiers(&BearerToken),
    tags(
        (name = "tasks", description = "Submit, read, list, cancel and retry tasks"),
        (name = "agents", description = "Pause and resume an agent's queue, cluster-wide"),
        (name = "objectives", description = "Steps with dependencies, or a planner's"),
        (name = "slots", description = "Chat-style run slots: the newest task replaces the running one"),
        (name = "operations", description = "Probes, metrics, status and this document"),
    )
)]
struct ApiDoc;

/// Bearer token on every /v1 route (the document says so once, globally per operation).
struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        let required =
            utoipa::openapi::security::SecurityRequirement::new::<_, _, &str>("bearer", []);
        for (path, item) in doc.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") {
                continue;
            }
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                op.security = Some(vec![required.clone()]);
            }
        }
    }
}

/// The document as served and committed: pretty JSON with a final newline.
pub fn document() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let mut text = doc
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"openapi document: {e}\"}}"));
    text.push('\n');
    text
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object)))]
pub(super) async fn openapi_json() -> impl IntoResponse {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOC.get_or_init(document).as_str(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_document_matches_the_code() {
        let committed = include_str!("../../docs/openapi.json");
        assert!(
            committed == super::document(),
            "docs/openapi.json is not what the code generates; run \
             `cargo run -- openapi > docs/openapi.json` and commit it"
        );
    }

    /// The route table of docs/http-api.md names every operation of the document as
    /// `METHOD /path`.
    #[test]
    fn the_api_docs_name_every_documented_route() {
        let docs = include_str!("../../docs/http-api.md");
        let doc: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        let mut missing = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                let route = format!("`{} {path}", method.to_uppercase());
                if !docs.contains(&route) {
                    missing.push(route);
                }
            }
        }
        assert!(
            missing.is_empty(),
            "docs/http-api.md's route table lacks {missing:?}"
        );
    }
}
