//! The command-line clients (`status`, `submit`, `objective`, `pause`, `resume`, `retry`):
//! thin callers of the HTTP API that print tables for people, or the API's JSON with
//! `--json`.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach taskwarden at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("taskwarden answered {status}: {message}")]
    Api { status: u16, message: String },
    #[error("{0}")]
    Input(String),
}

/// Where the daemon is and how to authenticate.
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// `url` (or `$TASKWARDEN_URL`) wins; else the config's `http.listen`. The token is
    /// `$TASKWARDEN_API_TOKEN`, else the config's.
    pub fn new(url: Option<String>, config: &Config) -> Result<Client, ClientError> {
        let base = url
            .or_else(|| {
                std::env::var("TASKWARDEN_URL")
                    .ok()
                    .filter(|v| !v.is_empty())
            })
            .unwrap_or_else(|| format!("http://{}", config.http.listen));
        let token = match std::env::var("TASKWARDEN_API_TOKEN") {
            Ok(t) if !t.is_empty() => Some(t),
            _ => crate::api::resolve_token(config)
                .map_err(|e| ClientError::Input(format!("http.api_token_file: {e}")))?,
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ClientError::Input(e.to_string()))?;
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        })
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
        let resp = req.send().await.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            message: e.without_url().to_string(),
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
            return Err(ClientError::Api { status, message });
        }
        Ok(v)
    }

    pub async fn status(&self) -> Result<Value, ClientError> {
        self.call(reqwest::Method::GET, "/v1/status", None).await
    }

    pub async fn submit(
        &self,
        agent: &str,
        payload: Value,
        session: Option<&str>,
    ) -> Result<Value, ClientError> {
        match session {
            Some(s) => {
                let body = serde_json::json!({ "agent": agent, "payload": payload });
                let path = format!("/v1/sessions/{}/run", urlencode(s));
                self.call(reqwest::Method::POST, &path, Some(&body)).await
            }
            None => {
                let body = serde_json::json!({ "agent": agent, "payload": payload });
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

    pub async fn objective(&self, objective: &Value) -> Result<Value, ClientError> {
        self.call(reqwest::Method::POST, "/v1/objectives", Some(objective))
            .await
    }
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

/// Left-aligned columns with a header row.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        let _ = writeln!(out, "{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect(), &mut out);
    for r in rows {
        line(r.clone(), &mut out);
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// The human-readable form of `GET /v1/status`.
pub fn render_status(v: &Value) -> String {
    let mut out = String::new();
    let p = &v["pool"];
    let _ = writeln!(
        out,
        "taskwarden {} — instance {}, config {} (loaded {})\n",
        s(&v["version"]),
        s(&v["instance"]),
        s(&v["config"]["version"]),
        s(&v["config"]["loaded_at"])
    );
    let _ = writeln!(
        out,
        "POOL  in use {}/{} ({:.0}%, alert at {:.0}%)  idle {}  waiting {}  open {}",
        s(&p["in_use"]),
        s(&p["max"]),
        p["utilization"].as_f64().unwrap_or(0.0) * 100.0,
        p["alert_ratio"].as_f64().unwrap_or(0.0) * 100.0,
        s(&p["idle"]),
        s(&p["waiting"]),
        s(&p["size"])
    );
    let ss = &v["sessions"];
    let _ = writeln!(
        out,
        "\nSESSIONS  open {}  opened {}  force-closed {}  (warn at {}s, force-close at {}s)",
        s(&ss["open"]),
        s(&ss["opened"]),
        s(&ss["force_closed"]),
        s(&ss["warn_age_seconds"]),
        s(&ss["max_age_seconds"])
    );
    let rows: Vec<Vec<String>> = ss["live"]
        .as_array()
        .map(|a| {
            a.iter()
                .take(20)
                .map(|x| {
                    vec![
                        s(&x["id"]),
                        format!("{:.1}s", x["age_seconds"].as_f64().unwrap_or(0.0)),
                        s(&x["label"]),
                        s(&x["caller"]),
                        s(&x["backend_pid"]),
                        s(&x["task_id"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if !rows.is_empty() {
        out.push_str(&table(
            &["ID", "AGE", "LABEL", "CALLER", "PID", "TASK"],
            &rows,
        ));
    }
    let by = &v["tasks"]["by_status"];
    let counts: Vec<String> = [
        "queued",
        "running",
        "succeeded",
        "failed",
        "cancelled",
        "timed_out",
    ]
    .iter()
    .map(|k| format!("{k} {}", s(&by[*k])))
    .collect();
    let _ = writeln!(out, "\nTASKS  {}", counts.join("  "));
    let rows: Vec<Vec<String>> = v["tasks"]["running_here"]
        .as_array()
        .map(|a| {
            a.iter()
                .take(20)
                .map(|t| {
                    vec![
                        s(&t["task_id"]),
                        s(&t["agent"]),
                        format!("{:.1}s", t["running_seconds"].as_f64().unwrap_or(0.0)),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if !rows.is_empty() {
        out.push_str(&table(&["TASK", "AGENT", "RUNNING"], &rows));
    }
    let queues: Vec<Vec<String>> = v["queues"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(agent, q)| {
                    vec![
                        agent.clone(),
                        s(&q["queued"]),
                        format!("{:.1}s", q["oldest_queued_seconds"].as_f64().unwrap_or(0.0)),
                        if q["paused"] == Value::Bool(true) {
                            format!("paused since {}", s(&q["paused_at"]))
                        } else {
                            String::new()
                        },
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if !queues.is_empty() {
        out.push_str("\nQUEUES\n");
        out.push_str(&table(&["AGENT", "QUEUED", "OLDEST", "STATE"], &queues));
    }
    let alerts: Vec<Vec<String>> = v["alerts_firing"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    vec![
                        s(&x["alert"]),
                        s(&x["severity"]),
                        s(&x["since"]),
                        s(&x["summary"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if alerts.is_empty() {
        out.push_str("\nALERTS  none firing\n");
    } else {
        out.push_str("\nALERTS\n");
        out.push_str(&table(&["ALERT", "SEVERITY", "SINCE", "SUMMARY"], &alerts));
    }
    let inst: Vec<Vec<String>> = v["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    vec![
                        s(&x["id"]),
                        s(&x["version"]),
                        s(&x["heartbeat_at"]),
                        if x["leader"] == Value::Bool(true) {
                            "leader".into()
                        } else {
                            String::new()
                        },
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if !inst.is_empty() {
        out.push_str("\nINSTANCES\n");
        out.push_str(&table(&["ID", "VERSION", "HEARTBEAT", "ROLE"], &inst));
    }
    out
}

/// One line for a task, for `submit`.
pub fn render_task(v: &Value) -> String {
    format!(
        "task {} {} (agent {}{})",
        s(&v["id"]),
        s(&v["status"]),
        s(&v["agent"]),
        v["session_id"]
            .as_str()
            .map(|x| format!(", session {x}"))
            .unwrap_or_default()
    )
}

/// An objective and its steps, for `objective`.
pub fn render_objective(v: &Value) -> String {
    let mut out = format!(
        "objective {} {:?}: {}\n",
        s(&v["id"]),
        s(&v["title"]),
        s(&v["status"])
    );
    let rows: Vec<Vec<String>> = v["tasks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| {
                    let deps = t["depends_on"]
                        .as_array()
                        .map(|d| d.iter().map(s).collect::<Vec<_>>().join(","))
                        .unwrap_or_default();
                    vec![
                        s(&t["step_key"]),
                        s(&t["id"]),
                        s(&t["agent"]),
                        s(&t["status"]),
                        deps,
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    out.push_str(&table(
        &["STEP", "TASK", "AGENT", "STATUS", "DEPENDS ON"],
        &rows,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
