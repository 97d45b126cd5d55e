//! The HTTP API and the CLI clients, driven against the built daemon on loopback.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::daemon::Daemon;
use common::{TestDb, bin, eventually};
use futures_util::StreamExt;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(120);
/// Every HTTP call is bounded, so a regression fails instead of hanging the run: a
/// request may take this long in total (event streams use [`READ_LIMIT`] per read).
const CALL_LIMIT: Duration = Duration::from_secs(30);
const READ_LIMIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "s3cret-token-for-tests";

struct Api {
    d: Daemon,
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
    t: TestDb,
}

const AGENTS: &str = "[agents.talk]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"cat > /dev/null; echo '{\\\"n\\\": 1}'; echo '{\\\"n\\\": 2}'; echo '{\\\"n\\\": 3, \\\"result\\\": \\\"ok\\\"}'\"]\n\
     [agents.sleepy]\nkind = \"command\"\ncommand = [\"sleep\", \"30\"]\n";

async fn start(extra: &str) -> Api {
    let t = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[database]\napplication_name = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\napi_token = {TOKEN:?}\nmax_body_bytes = 2048\n\
         [supervisor]\ninterval = \"200ms\"\n[workers]\nshutdown_grace = \"1s\"\n{AGENTS}{extra}",
        t.application_name
    );
    let url = t.url();
    let mut d = Daemon::start(dir.path(), &config, &[("TASKWARDEN_DATABASE_URL", &url)]);
    let addr = tokio::task::block_in_place(|| d.addr())
        .unwrap_or_else(|| panic!("not ready:\n{}", d.output()));
    Api {
        d,
        base: format!("http://{addr}"),
        // Per read, not per request: event streams stay open as long as events come.
        http: reqwest::Client::builder()
            .connect_timeout(CALL_LIMIT)
            .read_timeout(READ_LIMIT)
            .build()
            .unwrap(),
        _dir: dir,
        t,
    }
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(CALL_LIMIT);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None, Some(TOKEN))
            .await
    }
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body), Some(TOKEN))
            .await
    }
    fn stop(mut self) {
        self.d.signal(Signal::SIGTERM);
        let st = tokio::task::block_in_place(|| self.d.wait_exit(LIMIT));
        assert!(st.success(), "{}", self.d.output());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_json_with_the_right_status_and_field() {
    let a = start("").await;
    // 401 without or with a wrong token; health and metrics need none.
    let (st, v) = a.call(reqwest::Method::GET, "/v1/status", None, None).await;
    assert_eq!(st, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("Bearer"));
    assert_eq!(
        a.call(reqwest::Method::GET, "/v1/status", None, Some("nope"))
            .await
            .0,
        401
    );
    assert_eq!(
        a.call(reqwest::Method::GET, "/healthz", None, None).await.0,
        200
    );
    assert_eq!(
        a.call(reqwest::Method::GET, "/metrics", None, None).await.0,
        200
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            a.call(reqwest::Method::GET, "/readyz", None, None).await.0 == 200
        })
        .await
    );

    // 400 naming the field.
    let (st, v) = a.post("/v1/tasks", json!({"agent": 5})).await;
    assert_eq!((st, v["field"].as_str()), (400, Some("agent")), "{v}");
    let (st, v) = a.post("/v1/tasks", json!({"agent": "ghost"})).await;
    assert_eq!((st, v["field"].as_str()), (400, Some("agent")), "{v}");
    let (st, v) = a
        .post("/v1/tasks", json!({"agent": "talk", "priority": "high"}))
        .await;
    assert_eq!((st, v["field"].as_str()), (400, Some("priority")), "{v}");
    let (st, v) = a
        .post("/v1/tasks", json!({"agent": "talk", "colour": 1}))
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("colour"), "{v}");
    let resp = a
        .http
        .post(format!("{}/v1/tasks", a.base))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .timeout(CALL_LIMIT)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let (st, v) = a
        .post("/v1/objectives", json!({"title": "c", "steps": [{"key": "a", "agent": "talk", "depends_on": ["b"]}, {"key": "b", "agent": "talk", "depends_on": ["a"]}]}))
        .await;
    assert_eq!((st, v["field"].as_str()), (400, Some("steps")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("cycle"));
    let (st, v) = a.get("/v1/tasks?status=bogus").await;
    assert_eq!((st, v["field"].as_str()), (400, Some("status")), "{v}");

    // 413 over http.max_body_bytes (2048).
    let (st, v) = a
        .post(
            "/v1/tasks",
            json!({"agent": "talk", "payload": {"blob": "x".repeat(4000)}}),
        )
        .await;
    assert_eq!(st, 413, "{v}");
    assert!(v["error"].is_string());

    // 404 and 409.
    assert_eq!(a.get("/v1/tasks/99999").await.0, 404);
    assert_eq!(a.get("/v1/nowhere").await.0, 404);
    let (st, t) = a.post("/v1/tasks", json!({"agent": "sleepy"})).await;
    assert_eq!(st, 201, "{t}");
    let id = t["id"].as_i64().unwrap();
    let (st, c) = a
        .post(&format!("/v1/tasks/{id}/cancel"), json!({"reason": "test"}))
        .await;
    assert_eq!((st, c["status"].as_str()), (200, Some("cancelled")), "{c}");
    let (st, v) = a.post(&format!("/v1/tasks/{id}/cancel"), json!({})).await;
    assert_eq!(st, 409, "{v}");
    // Nothing half-written: only the one task exists.
    let (_, list) = a.get("/v1/tasks").await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 1);
    a.stop();
}

/// Reads an SSE response event by event, keeping what is left of the last chunk.
struct Events {
    stream: futures_util::stream::BoxStream<'static, reqwest::Result<String>>,
    buf: String,
    id: i64,
}

impl Events {
    fn new(resp: reqwest::Response) -> Events {
        Events {
            stream: resp
                .bytes_stream()
                .map(|c| c.map(|b| String::from_utf8_lossy(&b).into_owned()))
                .boxed(),
            buf: String::new(),
            id: 0,
        }
    }

    /// The next `n` events as (id, data) pairs; the limit only guards against a hang.
    async fn next(&mut self, n: usize) -> Vec<(i64, Value)> {
        let mut out = Vec::new();
        loop {
            while let Some(pos) = self.buf.find('\n') {
                let line: String = self.buf.drain(..=pos).collect();
                let line = line.trim_end();
                if let Some(v) = line.strip_prefix("id:") {
                    self.id = v.trim().parse().unwrap();
                } else if let Some(d) = line.strip_prefix("data:") {
                    out.push((self.id, serde_json::from_str(d.trim()).unwrap()));
                    if out.len() == n {
                        return out;
                    }
                }
            }
            let chunk = tokio::time::timeout(READ_LIMIT, self.stream.next())
                .await
                .expect("event stream stalled")
                .expect("stream ended")
                .unwrap();
            self.buf.push_str(&chunk);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_runs_stream_events_and_resume_with_last_event_id() {
    let a = start("").await;
    let (st, t) = a
        .post(
            "/v1/sessions/chat-1/run",
            json!({"agent": "talk", "payload": {"q": "hi"}}),
        )
        .await;
    assert_eq!((st, t["status"].as_str()), (201, Some("running")), "{t}");
    let id = t["id"].as_i64().unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            a.get(&format!("/v1/tasks/{id}")).await.1["status"] == "succeeded"
        })
        .await
    );
    let url = format!("{}/v1/sessions/chat-1/events", a.base);
    let resp = a.http.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let all = Events::new(resp).next(3).await;
    assert_eq!(
        all.iter()
            .map(|(_, d)| d["data"]["n"].clone())
            .collect::<Vec<_>>(),
        vec![json!(1), json!(2), json!(3)]
    );
    assert!(all.iter().all(|(_, d)| d["task_id"] == id));
    // Resume after the first: the two missed ones come first...
    let resp = a
        .http
        .get(&url)
        .bearer_auth(TOKEN)
        .header("Last-Event-ID", all[0].0.to_string())
        .send()
        .await
        .unwrap();
    let mut resumed = Events::new(resp);
    let mut got = resumed.next(2).await;
    assert_eq!(
        got.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![all[1].0, all[2].0]
    );
    // ...then, on the same open stream, a new run's events as they happen.
    let (st, t2) = a
        .post("/v1/sessions/chat-1/run", json!({"agent": "talk"}))
        .await;
    assert_eq!(st, 201, "{t2}");
    let id2 = t2["id"].as_i64().unwrap();
    let live = resumed.next(3).await;
    assert_eq!(
        live.iter()
            .map(|(_, d)| (d["task_id"].clone(), d["data"]["n"].clone()))
            .collect::<Vec<_>>(),
        vec![
            (json!(id2), json!(1)),
            (json!(id2), json!(2)),
            (json!(id2), json!(3))
        ],
        "{live:?}"
    );
    got.extend(live);
    // Ids strictly increase: no event twice, none out of order.
    let ids: Vec<i64> = got.iter().map(|(i, _)| *i).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "duplicate or out-of-order events: {ids:?}"
    );
    a.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_slots_answer_under_slots_and_their_old_sessions_paths() {
    let a = start("").await;
    let (st, first) = a
        .post("/v1/slots/chat-2/run", json!({"agent": "sleepy"}))
        .await;
    assert_eq!(
        (st, first["status"].as_str()),
        (201, Some("running")),
        "{first}"
    );
    assert_eq!(first["session_id"], "chat-2", "{first}");
    // The old path reaches the same slot: the new run replaces the first.
    let (st, second) = a
        .post("/v1/sessions/chat-2/run", json!({"agent": "sleepy"}))
        .await;
    assert_eq!(st, 201, "{second}");
    let first_id = first["id"].as_i64().unwrap();
    assert_eq!(
        a.get(&format!("/v1/tasks/{first_id}")).await.1["status"],
        "cancelled"
    );
    for query in ["slot", "session"] {
        let (st, list) = a.get(&format!("/v1/tasks?{query}=chat-2")).await;
        assert_eq!(st, 200, "{list}");
        let ids: Vec<i64> = list["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_i64().unwrap())
            .collect();
        assert_eq!(ids, [first_id, second["id"].as_i64().unwrap()], "?{query}=");
    }
    // Errors name the path parameter as each path calls it.
    let long = "x".repeat(201);
    for (path, field) in [("slots", "slot"), ("sessions", "session")] {
        let (st, e) = a
            .post(
                &format!("/v1/{path}/{long}/run"),
                json!({"agent": "sleepy"}),
            )
            .await;
        assert_eq!((st, e["field"].as_str()), (400, Some(field)), "{path}: {e}");
        let (st, e) = a.get(&format!("/v1/{path}/{long}/events")).await;
        assert_eq!((st, e["field"].as_str()), (400, Some(field)), "{path}: {e}");
    }
    for path in ["slots", "sessions"] {
        let resp = a
            .http
            .get(format!("{}/v1/{path}/chat-2/events", a.base))
            .bearer_auth(TOKEN)
            .timeout(CALL_LIMIT)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        assert_eq!(
            resp.headers()["content-type"],
            "text/event-stream",
            "{path}"
        );
    }
    a.stop();
}

fn cli(args: &[&str], base: &str, dir: &Path) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .current_dir(dir)
        .env("TASKWARDEN_URL", base)
        .env("TASKWARDEN_API_TOKEN", TOKEN)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_status_submit_and_objective() {
    let a = start("").await;
    let dir = tempfile::tempdir().unwrap();
    let out = cli(
        &["submit", "--agent", "sleepy", "--session", "s-9"],
        &a.base,
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        line.contains("running") && line.contains("session s-9"),
        "{line}"
    );

    let out = cli(&["status"], &a.base, dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    for needle in [
        "POOL",
        "SESSIONS",
        "TASKS",
        "running 1",
        "sleepy",
        "ALERTS",
        "INSTANCES",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    println!("taskwarden status:\n{text}");

    let file = dir.path().join("obj.json");
    std::fs::write(&file, r#"{"title": "two steps", "steps": [{"key": "a", "agent": "talk"}, {"key": "b", "agent": "talk", "depends_on": ["a"]}]}"#).unwrap();
    let out = cli(
        &["objective", file.to_str().unwrap(), "--json"],
        &a.base,
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tasks"].as_array().unwrap().len(), 2);

    let out = cli(&["submit", "--agent", "ghost"], &a.base, dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("agent: unknown agent"));
    let out = Command::new(bin())
        .args(["status"])
        .current_dir(dir.path())
        .env("TASKWARDEN_URL", &a.base)
        .env_remove("TASKWARDEN_API_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    a.stop();
}

/// Posts a `talk` task, checks it was accepted, waits until it succeeded; returns its id.
async fn post_task_and_wait(a: &Api) -> i64 {
    let (st, t) = a.post("/v1/tasks", json!({"agent": "talk"})).await;
    assert_eq!(st, 201, "{t}");
    let id = t["id"].as_i64().unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            a.get(&format!("/v1/tasks/{id}")).await.1["status"] == "succeeded"
        })
        .await,
        "task {id} did not succeed"
    );
    id
}

/// The start of the debug line the worker logs when it starts task `id` (pretty format).
/// The command agent's debug line for a task ("task started" is at info).
fn started_line(id: i64) -> String {
    format!("command agent started task_id={id} ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_live_keys_and_keeps_the_old_config_when_broken() {
    let mut a = start("").await;
    let cfg_path = a._dir.path().join("config.toml");
    let (_, before) = a.get("/v1/status").await;
    assert_eq!(before["pool"]["alert_ratio"], 0.8);
    assert_eq!(before["logging"]["level"], "info");
    // At info level a task runs without its debug lines.
    let quiet = post_task_and_wait(&a).await;

    let text = std::fs::read_to_string(&cfg_path).unwrap();
    let changed = format!("{text}\n[logging]\nlevel = \"debug\"\n").replace(
        "[supervisor]\ninterval = \"200ms\"\n",
        "[supervisor]\ninterval = \"200ms\"\npool_alert_ratio = 0.5\npool_clear_ratio = 0.4\n",
    );
    std::fs::write(&cfg_path, &changed).unwrap();
    a.d.signal(Signal::SIGHUP);
    let reloaded = tokio::task::block_in_place(|| a.d.wait_for("config reloaded", LIMIT)).unwrap();
    assert!(
        reloaded.contains("pool_alert_ratio") && reloaded.contains("logging.level"),
        "{reloaded}"
    );
    // Everything the first task logged was printed before the reload line, which
    // wait_for has read: its debug line would be there if debug had been on.
    assert!(
        !a.d.output().contains(&started_line(quiet)),
        "a debug line at info level:\n{}",
        a.d.output()
    );
    let (_, after) = a.get("/v1/status").await;
    assert_eq!(after["pool"]["alert_ratio"], 0.5);
    assert_eq!(after["logging"]["level"], "debug");
    assert_ne!(after["config"]["version"], before["config"]["version"]);
    // Behaviour follows: a task posted after the reload logs its debug line.
    let loud = post_task_and_wait(&a).await;
    let line = tokio::task::block_in_place(|| a.d.wait_for(&started_line(loud), LIMIT))
        .unwrap_or_else(|| panic!("no debug line for task {loud}:\n{}", a.d.output()));
    assert!(line.contains("DEBUG"), "{line}");

    // A broken file: the daemon keeps running with the values it had, and counts it.
    std::fs::write(
        &cfg_path,
        format!("{changed}\n[supervisor]\ninterval = \"-1s\"\n"),
    )
    .unwrap();
    a.d.signal(Signal::SIGHUP);
    assert!(tokio::task::block_in_place(|| a.d.wait_for("config reload failed", LIMIT)).is_some());
    let (st, still) = a.get("/v1/status").await;
    assert_eq!(st, 200);
    assert_eq!(still["pool"]["alert_ratio"], 0.5);
    assert_eq!(still["config"]["version"], after["config"]["version"]);
    let metrics = a.call(reqwest::Method::GET, "/metrics", None, None).await.1;
    let m = metrics.as_str().unwrap();
    assert_eq!(
        taskwarden::metrics::parse_value(
            m,
            "taskwarden_config_reloads_total",
            &[("result", "error")]
        ),
        Some(1.0)
    );
    assert_eq!(
        taskwarden::metrics::parse_value(m, "taskwarden_config_reloads_total", &[("result", "ok")]),
        Some(1.0)
    );
    // The last reload's result is what the ConfigReloadFailed alert reads: 0 now, and 1
    // again as soon as a good file is reloaded.
    assert_eq!(
        taskwarden::metrics::parse_value(m, "taskwarden_config_last_reload_successful", &[]),
        Some(0.0)
    );
    std::fs::write(&cfg_path, &changed).unwrap();
    a.d.signal(Signal::SIGHUP);
    let fixed = eventually(LIMIT, || async {
        let metrics = a.call(reqwest::Method::GET, "/metrics", None, None).await.1;
        let m = metrics.as_str().unwrap_or("").to_string();
        taskwarden::metrics::parse_value(&m, "taskwarden_config_last_reload_successful", &[])
            == Some(1.0)
            && taskwarden::metrics::parse_value(
                &m,
                "taskwarden_config_reloads_total",
                &[("result", "ok")],
            ) == Some(2.0)
    })
    .await;
    assert!(fixed, "the good reload did not set the gauge back to 1");
    // No secret in logs, status or metrics.
    assert!(!a.d.output().contains(TOKEN));
    assert!(!still.to_string().contains(TOKEN));
    assert!(!m.contains(TOKEN));
    let _ = &a.t;
    a.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_do_not_hold_up_others() {
    let a = start("").await;
    let addr = a.base.trim_start_matches("http://").to_string();
    // 50 clients that send half the headers and then nothing (slowloris).
    let mut stalled = Vec::new();
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        use tokio::io::AsyncWriteExt;
        s.write_all(b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Le")
            .await
            .unwrap();
        stalled.push(s);
    }
    // Everyone else is still served, each call bounded so a held-up server fails the
    // test instead of hanging it.
    let fast = reqwest::Client::builder()
        .timeout(CALL_LIMIT)
        .build()
        .unwrap();
    for path in [
        "/v1/status",
        "/v1/tasks",
        "/healthz",
        "/v1/status",
        "/healthz",
    ] {
        let resp = fast
            .get(format!("{}{path}", a.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path} not answered while slow clients wait: {e}"));
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        resp.text()
            .await
            .unwrap_or_else(|e| panic!("{path} body not sent while slow clients wait: {e}"));
    }
    // ...while every slow client is still connected and unanswered: the server neither
    // replied to nor dropped them to make room.
    // (Asked of the kernel, not of tokio's cached readiness.)
    for (i, s) in stalled.iter().enumerate() {
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 256];
        // SAFETY: `buf` is ours and its length is passed; MSG_PEEK leaves the data queued.
        let n = unsafe {
            libc::recv(
                s.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => panic!("slow client {i} was disconnected"),
            n if n > 0 => panic!(
                "slow client {i} got a reply: {}",
                String::from_utf8_lossy(&buf[..n as usize])
            ),
            _ => {
                let e = std::io::Error::last_os_error();
                assert_eq!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock,
                    "slow client {i}: {e}"
                );
            }
        }
    }
    drop(stalled);
    a.stop();
}

/// A reload that changes keys which only take effect at start says so, and does not apply
/// them: not the body limit, and not the application_name the orphan sweep matches (a
/// foreign session that now carries the new name is left alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reports_restart_only_keys_and_does_not_apply_them() {
    let mut a = start("").await;
    let cfg_path = a._dir.path().join("config.toml");
    let foreign_name = format!("{}_foreign", a.t.application_name);
    let mut pg = a.t.pg.clone();
    pg.application_name(&foreign_name);
    let foreign = common::connect(&pg).await;
    foreign.batch_execute("BEGIN; SELECT 1").await.unwrap();

    let text = std::fs::read_to_string(&cfg_path).unwrap();
    let changed = text
        .replace(
            &format!("application_name = {:?}", a.t.application_name),
            &format!("application_name = {foreign_name:?}"),
        )
        .replace("max_body_bytes = 2048", "max_body_bytes = 1048576");
    assert_ne!(changed, text);
    std::fs::write(&cfg_path, &changed).unwrap();
    a.d.signal(Signal::SIGHUP);
    let line = tokio::task::block_in_place(|| a.d.wait_for("config reloaded", LIMIT)).unwrap();
    let restart_part = line.split("needs_restart").nth(1).unwrap_or("");
    assert!(
        restart_part.contains("database.application_name")
            && restart_part.contains("http.max_body_bytes"),
        "restart-only keys not reported as such: {line}"
    );

    // The old body limit is still the one in force.
    let big = json!({ "agent": "talk", "payload": { "pad": "x".repeat(4000) } });
    assert_eq!(a.post("/v1/tasks", big).await.0, 413);
    // Many supervisor ticks (200 ms) later, the foreign session idle in its transaction
    // is still there: the sweep still matches the name our connections were opened with.
    // The ticks are counted, not assumed: at least 10 more must have run.
    let ticks = || async {
        let m = a.call(reqwest::Method::GET, "/metrics", None, None).await.1;
        taskwarden::metrics::parse_value(
            m.as_str().unwrap_or(""),
            "taskwarden_supervisor_ticks_total",
            &[("result", "ok")],
        )
        .unwrap_or(0.0)
    };
    let ticks_before = ticks().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            ticks().await >= ticks_before + 10.0
        })
        .await,
        "the supervisor did not tick 10 times after the reload (ok ticks {ticks_before} -> {})",
        ticks().await
    );
    foreign
        .batch_execute("SELECT 1; COMMIT")
        .await
        .expect("the supervisor terminated a foreign session after the reload");
    a.stop();
}
