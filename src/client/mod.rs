//! The command-line clients (`status`, `submit`, `objective`, `pause`, `resume`, `retry`):
//! thin callers of the HTTP API that print tables for people, or the API's JSON with
//! `--json`.

use std::time::Duration;

use serde_json::Value;

use crate::config::{Config, ConfigError};

mod render;

use render::s;
pub use render::{
    render_event_line, render_events, render_objective, render_status, render_task,
    render_task_detail, render_task_list, table,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach taskwarden at {url}: {message}{hint}")]
    Unreachable {
        url: String,
        /// The whole cause chain (e.g. "... tcp connect error: Connection refused").
        message: String,
        hint: String,
    },
    #[error("taskwarden answered {status}: {message}{hint}")]
    Api {
        status: u16,
        message: String,
        hint: String,
    },
    #[error("task {id} ended {status}")]
    NotSucceeded { id: i64, status: String },
    #[error("gave up after {waited:?}: task {id} is still {status}")]
    StillRunning {
        id: i64,
        status: String,
        waited: Duration,
    },
    #[error("{0}")]
    Input(String),
}

/// The exit code of a client command (documented in docs/cli.md).
impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::NotSucceeded { .. } => 1,
            ClientError::StillRunning { .. } => 3,
            ClientError::Unreachable { .. } | ClientError::Api { .. } => 2,
            ClientError::Input(_) => 2,
        }
    }
}

/// Where the daemon is and how to authenticate.
pub struct Client {
    base: String,
    token: Option<String>,
    /// Where the token came from, for the hint on a 401.
    token_source: String,
    http: reqwest::Client,
}

/// The final statuses a task can reach (it may still be retried by hand).
pub fn is_final(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "cancelled" | "timed_out")
}

/// The error and its causes, each once ("error sending request: ... tcp connect error:
/// Connection refused (os error 111)").
fn cause_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = c.source();
    }
    out
}

impl Client {
    /// `url` (or `$TASKWARDEN_URL`) wins; else the config's `http.listen`. The token is
    /// `token` (`--token`, or `$TASKWARDEN_API_TOKEN` through it), else the config's;
    /// `config_path` names the file it was read from, for hints.
    pub fn new(
        url: Option<String>,
        token: Option<String>,
        config: &Config,
        config_path: &str,
    ) -> Result<Client, ClientError> {
        let base = url
            .or_else(|| {
                std::env::var("TASKWARDEN_URL")
                    .ok()
                    .filter(|v| !v.is_empty())
            })
            .unwrap_or_else(|| format!("http://{}", config.http.listen));
        let (token, token_source) = match token.filter(|t| !t.is_empty()) {
            Some(t) => (Some(t), "--token/TASKWARDEN_API_TOKEN".to_string()),
            None => {
                let t = crate::config::resolve_token(config)
                    .map_err(|e| ClientError::Input(format!("http.api_token_file: {e}")))?;
                let source = if t.is_some() {
                    format!("http.api_token in {config_path}")
                } else {
                    format!(
                        "none given (no --token, TASKWARDEN_API_TOKEN or http.api_token in {config_path})"
                    )
                };
                (t, source)
            }
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ClientError::Input(e.to_string()))?;
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            token_source,
            http,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| {
            let message = cause_chain(&e.without_url());
            let hint = if message.contains("Connection refused") {
                " (connection refused: is the daemon running there? `systemctl status taskwarden`; \
                 another address: --url or TASKWARDEN_URL)"
                    .to_string()
            } else {
                String::new()
            };
            ClientError::Unreachable {
                url: self.base.clone(),
                message,
                hint,
            }
        })?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !(200..300).contains(&status) {
            let mut message = v["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            if let Some(f) = v["field"].as_str() {
                message = format!("{f}: {message}");
            }
            let hint = if status == 401 {
                format!(
                    " — the daemon wants its API token: give --token or set TASKWARDEN_API_TOKEN \
                     (token used: {})",
                    self.token_source
                )
            } else {
                String::new()
            };
            return Err(ClientError::Api {
                status,
                message,
                hint,
            });
        }
        Ok(v)
    }

    pub async fn status(&self) -> Result<Value, ClientError> {
        self.call(reqwest::Method::GET, "/v1/status", None).await
    }

    /// Queues a task (`POST /v1/tasks`), or runs it now in a run slot.
    pub async fn submit(&self, t: &Submit) -> Result<Value, ClientError> {
        let mut body = serde_json::json!({ "agent": t.agent, "payload": t.payload });
        let queue_only = [
            ("priority", t.priority.map(Value::from)),
            ("max_attempts", t.max_attempts.map(Value::from)),
            ("run_after", t.run_after.clone().map(Value::from)),
        ];
        let unique = [
            ("unique_key", &t.unique_key),
            ("unique_scope", &t.unique_scope),
            ("unique_for", &t.unique_for),
        ];
        match &t.slot {
            Some(s) => {
                if let Some((k, _)) = unique.iter().find(|(_, v)| v.is_some()) {
                    return Err(ClientError::Input(format!(
                        "--{} does not apply to --slot (a run slot's task runs at once)",
                        k.replace('_', "-")
                    )));
                }
                if let Some((k, _)) = queue_only.iter().find(|(_, v)| v.is_some()) {
                    return Err(ClientError::Input(format!(
                        "--{} does not apply to --slot (a run slot's task runs at once)",
                        k.replace('_', "-")
                    )));
                }
                let path = format!("/v1/slots/{}/run", urlencode(s));
                self.call(reqwest::Method::POST, &path, Some(&body)).await
            }
            None => {
                for (k, v) in unique {
                    if let Some(v) = v {
                        body[k] = Value::String(v.clone());
                    }
                }
                for (k, v) in queue_only {
                    if let Some(v) = v {
                        body[k] = v;
                    }
                }
                self.call(reqwest::Method::POST, "/v1/tasks", Some(&body))
                    .await
            }
        }
    }

    /// Pauses an agent's queue cluster-wide.
    pub async fn pause(&self, agent: &str, reason: Option<&str>) -> Result<Value, ClientError> {
        let path = format!("/v1/agents/{}/pause", urlencode(agent));
        let body = serde_json::json!({ "reason": reason });
        self.call(reqwest::Method::POST, &path, Some(&body)).await
    }

    pub async fn resume(&self, agent: &str) -> Result<Value, ClientError> {
        let path = format!("/v1/agents/{}/resume", urlencode(agent));
        self.call(reqwest::Method::POST, &path, None).await
    }

    /// Retries one task.
    pub async fn retry(&self, id: i64, extra_attempts: Option<i32>) -> Result<Value, ClientError> {
        let body = serde_json::json!({ "extra_attempts": extra_attempts });
        self.call(
            reqwest::Method::POST,
            &format!("/v1/tasks/{id}/retry"),
            Some(&body),
        )
        .await
    }

    /// Retries the tasks matching a filter (`{"agent"?, "status"?, "limit"?,
    /// "extra_attempts"?}`).
    pub async fn retry_matching(&self, filter: &Value) -> Result<Value, ClientError> {
        self.call(reqwest::Method::POST, "/v1/tasks/retry", Some(filter))
            .await
    }

    /// One task.
    pub async fn task(&self, id: i64) -> Result<Value, ClientError> {
        self.call(reqwest::Method::GET, &format!("/v1/tasks/{id}"), None)
            .await
    }

    /// A page of tasks (`{"tasks", "truncated", "next_after"}`).
    pub async fn tasks(
        &self,
        status: Option<&str>,
        agent: Option<&str>,
        limit: i64,
    ) -> Result<Value, ClientError> {
        let mut q = format!("?limit={limit}");
        if let Some(s) = status {
            q.push_str(&format!("&status={}", urlencode(s)));
        }
        if let Some(a) = agent {
            q.push_str(&format!("&agent={}", urlencode(a)));
        }
        self.call(reqwest::Method::GET, &format!("/v1/tasks{q}"), None)
            .await
    }

    /// A page of a task's events after event `after`.
    pub async fn task_events(&self, id: i64, after: i64, limit: i64) -> Result<Value, ClientError> {
        self.call(
            reqwest::Method::GET,
            &format!("/v1/tasks/{id}/events?after={after}&limit={limit}"),
            None,
        )
        .await
    }

    /// Every event of a task after `after` (pages followed, at most [`MAX_EVENT_PAGES`]),
    /// with the task's status as read before the first page.
    pub async fn all_task_events(
        &self,
        id: i64,
        mut after: i64,
    ) -> Result<(String, Vec<Value>), ClientError> {
        let mut out = Vec::new();
        let mut status = None;
        for _ in 0..MAX_EVENT_PAGES {
            let page = self.task_events(id, after, 1000).await?;
            status.get_or_insert_with(|| s(&page["status"]));
            let events = page["events"].as_array().cloned().unwrap_or_default();
            if let Some(last) = events.last().and_then(|e| e["id"].as_i64()) {
                after = last;
            }
            out.extend(events);
            if page["next_after"].is_null() {
                break;
            }
        }
        Ok((status.unwrap_or_default(), out))
    }

    pub async fn cancel(&self, id: i64, reason: Option<&str>) -> Result<Value, ClientError> {
        let body = serde_json::json!({ "reason": reason });
        self.call(
            reqwest::Method::POST,
            &format!("/v1/tasks/{id}/cancel"),
            Some(&body),
        )
        .await
    }

    /// Polls a task every [`POLL`] until its status is final (or `limit` passed), calling
    /// `on_events` with each batch of new events (none when `events` is false). The task
    /// as last read; [`ClientError::StillRunning`] past the limit.
    pub async fn follow(
        &self,
        id: i64,
        limit: Duration,
        events: bool,
        mut on_events: impl FnMut(&[Value]),
    ) -> Result<Value, ClientError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut after = 0;
        loop {
            let status = if events {
                let (status, batch) = self.all_task_events(id, after).await?;
                if let Some(last) = batch.last().and_then(|e| e["id"].as_i64()) {
                    after = last;
                }
                on_events(&batch);
                status
            } else {
                s(&self.task(id).await?["status"])
            };
            // The status was read before the events: final means every event was seen.
            if is_final(&status) {
                return self.task(id).await;
            }
            if tokio::time::Instant::now() + POLL > deadline {
                return Err(ClientError::StillRunning {
                    id,
                    status,
                    waited: limit,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub async fn objective(&self, objective: &Value) -> Result<Value, ClientError> {
        self.call(reqwest::Method::POST, "/v1/objectives", Some(objective))
            .await
    }
}

/// Where the install puts the config; client commands read it when given no `--config`
/// and there is no `./config.toml`.
pub const SYSTEM_CONFIG: &str = "/etc/taskwarden/config.toml";

/// The config file a client command reads when given none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientConfig {
    File(std::path::PathBuf),
    /// The built-in defaults, and why (for the 401 hint).
    Defaults(String),
}

/// The config a client command reaches the daemon with, from the file at `path`. A client
/// needs only `[http]` (where the daemon listens, its token): when the file has problems
/// elsewhere — the state right after a refused reload, with the daemon still running on
/// the config it had — the `[http]` section alone is used, and the second value says so.
/// A file that is not TOML at all, or whose `[http]` itself is wrong, is still an error.
pub fn client_config(path: &std::path::Path) -> Result<(Config, Option<String>), ConfigError> {
    match Config::load(path) {
        Ok(c) => Ok((c, None)),
        Err(ConfigError::Invalid { path, issues }) => {
            let http_only = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.parse::<toml::Table>().ok())
                .and_then(|t| match t.get("http") {
                    Some(h) => h.clone().try_into::<crate::config::HttpConfig>().ok(),
                    None => Some(crate::config::HttpConfig::default()),
                });
            match http_only {
                Some(http) if !issues.iter().any(|i| i.key.starts_with("http.")) => {
                    let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
                    Ok((
                        Config {
                            http,
                            ..Config::default()
                        },
                        Some(format!(
                            "{} has problems ({}; `taskwarden check-config` names them): reaching the daemon with its [http] section only",
                            path.display(),
                            keys.join(", ")
                        )),
                    ))
                }
                _ => Err(ConfigError::Invalid { path, issues }),
            }
        }
        Err(e) => Err(e),
    }
}

/// `local` (./config.toml) when it exists, else `system` when it exists and this user may
/// read it, else the defaults with the reason.
pub fn pick_client_config(local: &std::path::Path, system: &std::path::Path) -> ClientConfig {
    if local.exists() {
        return ClientConfig::File(local.to_path_buf());
    }
    if !system.exists() {
        return ClientConfig::Defaults(format!(
            "the defaults; no {} or {}",
            local.display(),
            system.display()
        ));
    }
    match std::fs::File::open(system) {
        Ok(_) => ClientConfig::File(system.to_path_buf()),
        // Readable by the service's group only: say so when the token is missing.
        Err(e) => ClientConfig::Defaults(format!(
            "the defaults; {} is not readable by this user: {e}",
            system.display()
        )),
    }
}

/// How often `follow` and `submit --wait` poll.
pub const POLL: Duration = Duration::from_secs(1);

/// Most pages of events one read follows (1,000 events each; a task keeps at most 1,000).
pub const MAX_EVENT_PAGES: usize = 10;

/// What `taskwarden submit` sends: a task, optionally with a unique key (its scope and
/// period as the API takes them), or a run in a session's slot.
#[derive(Debug, Clone, Default)]
pub struct Submit {
    pub agent: String,
    pub payload: Value,
    /// Run now in this run slot instead of queueing.
    pub slot: Option<String>,
    pub unique_key: Option<String>,
    pub unique_scope: Option<String>,
    pub unique_for: Option<String>,
    pub priority: Option<i32>,
    pub max_attempts: Option<i32>,
    /// RFC 3339 time the task may run from.
    pub run_after: Option<String>,
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_config_is_local_then_system_then_defaults() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let local = dir.path().join("config.toml");
        let system = dir.path().join("etc.toml");
        assert!(matches!(
            pick_client_config(&local, &system),
            ClientConfig::Defaults(why) if why.contains("etc.toml")
        ));
        std::fs::write(&system, "").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            pick_client_config(&local, &system),
            ClientConfig::File(system.clone())
        );
        std::fs::write(&local, "").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            pick_client_config(&local, &system),
            ClientConfig::File(local.clone())
        );
    }

    #[test]
    fn tables_align_and_status_renders_every_section() {
        let t = table(&["A", "LONGER"], &[vec!["xxxx".into(), "1".into()]]);
        assert_eq!(t, "A     LONGER\nxxxx  1\n");
        let v = serde_json::json!({
            "version": "0.1.0", "instance": "h:1:ab", "config": {"version": "abc", "loaded_at": "now"},
            "pool": {"in_use": 3, "max": 30, "utilization": 0.1, "alert_ratio": 0.8, "idle": 2, "waiting": 0, "size": 5},
            "sessions": {"open": 1, "opened": 9, "force_closed": 0, "warn_age_seconds": 60.0, "max_age_seconds": 1800.0,
                "live": [{"id": 4, "age_seconds": 1.5, "label": "store.x", "caller": "src/a.rs:1:2", "backend_pid": 77, "task_id": null}]},
            "tasks": {"by_status": {"queued": 2, "running": 1}, "running_here": [{"task_id": 5, "agent": "echo", "running_seconds": 2.0}]},
            "alerts_firing": [], "instances": [{"id": "h:1:ab", "version": "0.1.0", "heartbeat_at": "t"}],
            "queues": {"mailer": {"queued": 7, "oldest_queued_seconds": 12.5, "paused": true, "paused_at": "t0"}}
        });
        let out = render_status(&v);
        for needle in [
            "in use 3/30",
            "store.x",
            "src/a.rs:1:2",
            "queued 2",
            "running 1",
            "none firing",
            "echo",
            "h:1:ab",
            "mailer  7",
            "12.5s",
            "paused since t0",
        ] {
            assert!(out.contains(needle), "{needle} missing from:\n{out}");
        }
    }
}
