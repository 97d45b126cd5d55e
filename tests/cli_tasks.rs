//! Issue 17: a task's events through the API (paged, bounded in bytes) and the task
//! commands of the built CLI against a running daemon — `submit --wait/--priority/
//! --max-attempts/--run-after`, `tasks list|show|cancel|retry|events|follow` — with their exit codes, the
//! errors a user meets (daemon down, no token, unknown agent), and the task lifecycle in
//! the daemon's info log.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::daemon::{Daemon, bounded, http_client};
use common::{TestDb, bin};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(120);
const TOKEN: &str = "cli-tasks-secret";

/// `ok` reports progress, usage and a result; `bad` reports progress and fails; `slow`
/// sleeps; `steps` prints a line a second, three times; `chatty` prints 40 events of
/// about 100 bytes.
const AGENTS: &str = r#"
[agents.ok]
kind = "command"
command = ["sh", "-c", "cat >/dev/null; echo '{\"progress\": \"half\"}'; echo '{\"usage\": {\"prompt_tokens\": 10, \"completion_tokens\": 5, \"cost_usd\": 0.25}}'; echo '{\"result\": \"done\"}'"]
[agents.bad]
kind = "command"
command = ["sh", "-c", "cat >/dev/null; echo '{\"progress\": \"trying\"}'; echo 'the model refused' >&2; exit 3"]
[agents.slow]
kind = "command"
command = ["sleep", "60"]
[agents.steps]
kind = "command"
command = ["sh", "-c", "cat >/dev/null; for i in 1 2 3; do echo \"{\\\"step\\\": $i}\"; sleep 1; done"]
[agents.chatty]
kind = "command"
command = ["sh", "-c", "cat >/dev/null; i=0; while [ $i -lt 40 ]; do i=$((i+1)); echo \"{\\\"n\\\": $i, \\\"pad\\\": \\\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\\\"}\"; done"]
"#;

/// Runs the CLI in `dir` (no config.toml there) against `base`, with `--token` unless
/// `token` is None; bounded by `timeout`.
fn cli(dir: &Path, base: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.arg("60").arg(bin()).args(args).arg("--url").arg(base);
    if let Some(t) = token {
        cmd.arg("--token").arg(t);
    }
    cmd.current_dir(dir)
        .env_remove("TASKWARDEN_API_TOKEN")
        .env_remove("TASKWARDEN_URL")
        .env_remove("TASKWARDEN_CONFIG")
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn json_of(o: &Output) -> Value {
    let (out, err) = text(o);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}\n{err}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_events_route_and_task_commands_end_to_end() {
    bounded(Duration::from_secs(300), async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "[database]\napplication_name = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\napi_token = {TOKEN:?}\n\
             max_response_bytes = 1024\n[supervisor]\ninterval = \"300ms\"\n\
             [workers]\npoll_interval = \"200ms\"\nretry_backoff = \"10ms\"\nretry_backoff_max = \"20ms\"\n\
             shutdown_grace = \"1s\"\n{AGENTS}",
            t.application_name
        );
        let url = t.url();
        let mut d = Daemon::start(dir.path(), &config, &[("TASKWARDEN_DATABASE_URL", &url)]);
        let base = d.base_url();
        let cwd = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let base = base.clone();
            let cwd = cwd.path().to_path_buf();
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            tokio::task::block_in_place(move || {
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                cli(&cwd, &base, Some(TOKEN), &a)
            })
        };

        // submit --wait: a success exits 0 with the final state, the options reach the row.
        let o = run(&[
            "submit", "--agent", "ok", "--priority", "5", "--max-attempts", "2", "--wait", "--json",
        ]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
        let ok = json_of(&o);
        assert_eq!(ok["status"], "succeeded", "{ok}");
        assert_eq!((ok["priority"].as_i64(), ok["max_attempts"].as_i64()), (Some(5), Some(2)));
        assert!(err.contains("waiting for it to end"), "{err}");
        let ok_id = ok["id"].as_i64().unwrap();

        // A task that fails twice: --wait exits 1 naming the status.
        let o = run(&["submit", "--agent", "bad", "--max-attempts", "2", "--wait"]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
        assert!(out.contains("failed") && err.contains("ended failed"), "{out}\n{err}");
        let bad_id: i64 = err
            .split_whitespace()
            .skip_while(|w| *w != "task")
            .nth(1)
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("no task id in: {err}"));

        // tasks show: the failed task with its events — progress lines and each attempt's
        // error.
        let o = run(&["tasks", "show", &bad_id.to_string()]);
        let (show, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{err}");
        println!("$ taskwarden tasks show {bad_id}\n{show}");
        assert!(show.contains("status        failed"), "{show}");
        assert_eq!(show.matches("attempt_failed").count(), 2, "{show}");
        assert_eq!(show.matches("trying").count(), 2, "{show}");
        assert!(show.contains("the model refused"), "{show}");
        let o = run(&["tasks", "show", &ok_id.to_string(), "--json"]);
        let v = json_of(&o);
        // The progress line and the result line (usage is not an event, but in the row).
        assert_eq!(v["events"].as_array().map(Vec::len), Some(2), "{v}");
        assert_eq!(v["events"][0]["data"]["progress"], "half");
        assert_eq!(v["events"][1]["data"]["result"], "done");
        assert_eq!(v["cost_usd"], 0.25, "{v}");

        // tasks list, filtered by status and agent.
        let o = run(&["tasks", "list", "--status", "failed", "--agent", "bad", "--json"]);
        let v = json_of(&o);
        let ids: Vec<i64> = v["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_i64().unwrap())
            .collect();
        assert_eq!(ids, vec![bad_id]);
        let o = run(&["tasks", "list", "--agent", "ok"]);
        let (list, _) = text(&o);
        assert!(list.starts_with("ID") && list.contains("succeeded") && !list.contains("failed"), "{list}");

        // tasks follow: the events as they come, then exit 0 on success.
        let o = run(&["submit", "--agent", "steps", "--json"]);
        let steps_id = json_of(&o)["id"].as_i64().unwrap();
        let o = run(&["tasks", "follow", &steps_id.to_string()]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
        for i in 1..=3 {
            assert!(out.contains(&format!("{{\"step\":{i}}}")), "step {i} missing:\n{out}");
        }
        assert!(out.trim_end().ends_with(")") && out.contains("succeeded"), "{out}");

        // cancel, then follow exits 1 (cancelled); --run-after holds a task back.
        let o = run(&["submit", "--agent", "slow", "--json"]);
        let slow_id = json_of(&o)["id"].as_i64().unwrap();
        let o = run(&["tasks", "cancel", &slow_id.to_string(), "--reason", "not needed"]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
        assert!(out.contains("cancelled"), "{out}");
        let o = run(&["tasks", "follow", &slow_id.to_string()]);
        assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
        // `tasks events --follow` is `tasks follow`; plain `tasks events` prints them once.
        let o = run(&["tasks", "events", &slow_id.to_string(), "--follow"]);
        assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
        let o = run(&["tasks", "events", &steps_id.to_string()]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
        assert_eq!(out.matches("\"step\"").count(), 3, "{out}");
        let o = run(&["tasks", "events", &steps_id.to_string(), "--json"]);
        assert_eq!(json_of(&o).as_array().map(Vec::len), Some(3), "the 3 step lines");
        // `tasks retry`: the cancelled task is queued again, with an attempt left.
        let o = run(&["tasks", "retry", &slow_id.to_string(), "--json"]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
        let retried = json_of(&o);
        assert_eq!(retried["status"], "queued", "{retried}");
        let (attempts, max) = (retried["attempts"].as_i64(), retried["max_attempts"].as_i64());
        assert!(max >= attempts.map(|a| a + 1), "{retried}");
        let o = run(&["tasks", "retry", &steps_id.to_string()]);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "a succeeded task is not retried: {err}");
        assert!(err.contains("409"), "{err}");
        let o = run(&["tasks", "cancel", &slow_id.to_string()]);
        assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
        let o = run(&["submit", "--agent", "ok", "--run-after", "1h", "--json"]);
        let later = json_of(&o);
        let run_after = chrono::DateTime::parse_from_rfc3339(later["run_after"].as_str().unwrap())
            .unwrap();
        assert!(run_after > chrono::Utc::now() + chrono::Duration::minutes(50), "{later}");
        // Waiting for it gives up at the limit with exit 3.
        let o = run(&[
            "tasks", "follow", &later["id"].to_string(), "--limit", "2s",
        ]);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(3), "{err}");
        assert!(err.contains("still queued"), "{err}");

        // The events route: pages by `after`/`limit` and by bytes, 404 and 400s.
        let http = http_client(Duration::from_secs(30));
        let get = |path: String| {
            let http = http.clone();
            let base = base.clone();
            async move {
                let r = http
                    .get(format!("{base}{path}"))
                    .bearer_auth(TOKEN)
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
            }
        };
        let (st, page) = get(format!("/v1/tasks/{bad_id}/events?limit=2")).await;
        assert_eq!(st, 200, "{page}");
        assert_eq!(page["status"], "failed");
        assert_eq!(page["events"].as_array().unwrap().len(), 2);
        let next = page["next_after"].as_i64().unwrap();
        let (_, rest) = get(format!("/v1/tasks/{bad_id}/events?after={next}")).await;
        assert_eq!(rest["events"].as_array().unwrap().len(), 2, "{rest}");
        assert!(rest["next_after"].is_null(), "{rest}");
        // 40 events of ~120 bytes against max_response_bytes = 1024: cut by bytes.
        let o = run(&["submit", "--agent", "chatty", "--wait", "--json"]);
        let chatty = json_of(&o)["id"].as_i64().unwrap();
        let (_, cut) = get(format!("/v1/tasks/{chatty}/events?limit=1000")).await;
        let n = cut["events"].as_array().unwrap().len();
        assert!(cut["truncated"] == json!(true) && n > 0 && n < 40, "{n} events: {cut}");
        let o = run(&["tasks", "show", &chatty.to_string(), "--json"]);
        assert_eq!(json_of(&o)["events"].as_array().map(Vec::len), Some(40));
        let (st, v) = get("/v1/tasks/999999/events".into()).await;
        assert_eq!(st, 404, "{v}");
        let (st, v) = get(format!("/v1/tasks/{bad_id}/events?limit=0")).await;
        assert_eq!((st, &v["field"]), (400, &json!("limit")), "{v}");
        let (st, v) = get(format!("/v1/tasks/{bad_id}/events?bogus=1")).await;
        assert_eq!(st, 400, "{v}");

        // With Accept: text/event-stream the route follows the task: each event as it is
        // stored (ids to resume by), and the stream ends by itself when the task ends.
        let o = run(&["submit", "--agent", "steps", "--json"]);
        let live = json_of(&o)["id"].as_i64().unwrap();
        let mut r = http
            .get(format!("{base}/v1/tasks/{live}/events"))
            .bearer_auth(TOKEN)
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        // Read as it arrives: the first event must come while the task still runs (the
        // agent prints a step a second), not in one piece once it has ended.
        let mut body = String::new();
        let mut status_at_first_event: Option<String> = None;
        while let Some(chunk) = r.chunk().await.unwrap() {
            body.push_str(&String::from_utf8_lossy(&chunk));
            if status_at_first_event.is_none()
                && body.lines().any(|l| l.starts_with("data: ") && l.contains("\"step\""))
            {
                let (_, t) = get(format!("/v1/tasks/{live}")).await;
                status_at_first_event = Some(t["status"].as_str().unwrap_or("?").to_string());
            }
        }
        assert_eq!(
            status_at_first_event.as_deref(),
            Some("running"),
            "the first event came only after the task had ended (or never): {body}"
        );
        let data: Vec<Value> = body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let steps: Vec<i64> = data.iter().filter_map(|d| d["data"]["step"].as_i64()).collect();
        assert_eq!(steps, vec![1, 2, 3], "{body}");
        assert!(data.iter().all(|d| d["task_id"] == live), "{body}");
        let ids: Vec<i64> = body
            .lines()
            .filter_map(|l| l.strip_prefix("id: "))
            .map(|i| i.parse().unwrap())
            .collect();
        assert_eq!(ids.len(), 3, "{body}");
        // Resumed after the first event, the stream of the ended task holds the other two.
        let r = http
            .get(format!("{base}/v1/tasks/{live}/events"))
            .bearer_auth(TOKEN)
            .header("accept", "text/event-stream")
            .header("last-event-id", ids[0].to_string())
            .send()
            .await
            .unwrap();
        let rest = r.text().await.unwrap();
        assert_eq!(rest.matches("\"step\"").count(), 2, "{rest}");
        assert!(!rest.contains("\"step\":1"), "{rest}");

        // Errors that say what to do. Unknown agent: the valid ones are listed.
        let o = run(&["submit", "--agent", "nope"]);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(
            err.contains("unknown agent \"nope\"; known agents: bad, chatty, ok, slow, steps"),
            "{err}"
        );
        // No token: 401 names TASKWARDEN_API_TOKEN and --token.
        let o = tokio::task::block_in_place(|| cli(cwd.path(), &base, None, &["status"]));
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(
            err.contains("401") && err.contains("TASKWARDEN_API_TOKEN") && err.contains("--token"),
            "{err}"
        );
        // Daemon down (a port nobody listens on): "connection refused" with the URL.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let down = format!("http://127.0.0.1:{closed}");
        let o = tokio::task::block_in_place(|| cli(cwd.path(), &down, Some(TOKEN), &["status"]));
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(
            err.contains(&down) && err.contains("Connection refused") && err.contains("connection refused"),
            "{err}"
        );

        // The lifecycle at info, with task_id and agent.
        d.signal(Signal::SIGTERM);
        tokio::task::block_in_place(|| assert!(d.wait_exit(LIMIT).success()));
        let log = d.output();
        let line = |needle: &str, id: i64, extra: &str| {
            log.lines().any(|l| {
                l.contains("INFO")
                    && l.contains(needle)
                    && l.contains(&format!("task_id={id} "))
                    && l.contains(extra)
            })
        };
        assert!(line("task started", ok_id, "agent=ok"), "{log}");
        assert!(line("task finished", ok_id, "outcome=\"succeeded\""), "{log}");
        assert!(line("will retry", bad_id, "agent=bad"), "{log}");
        assert!(line("task finished", bad_id, "outcome=\"failed\""), "{log}");
        assert!(line("task finished", bad_id, "the model refused"), "{log}");
    })
    .await;
}

/// Issue 27, item 5: after the config file was broken (a reload refused it, the daemon
/// runs on), `taskwarden status --config FILE` still reaches the daemon through the
/// file's `[http]` section and says what is wrong; a file whose `[http]` is itself wrong,
/// or that is not TOML, is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reaches_the_daemon_past_a_broken_config_file() {
    bounded(LIMIT, async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let good = format!(
            "[database]\napplication_name = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\napi_token = \"{TOKEN}\"\n{AGENTS}",
            t.application_name
        );
        let mut d = tokio::task::block_in_place(|| {
            let mut d = Daemon::start(
                dir.path(),
                &good,
                &[("TASKWARDEN_DATABASE_URL", &t.url())],
            );
            d.base_url();
            d
        });
        let cfg = dir.path().join("config.toml");
        let status = |extra: &str| {
            std::fs::write(&cfg, format!("{good}\n{extra}")).unwrap();
            let o = Command::new("timeout")
                .arg("60")
                .arg(bin())
                .args(["status", "--json", "--config"])
                .arg(&cfg)
                .current_dir(dir.path())
                .env_remove("TASKWARDEN_API_TOKEN")
                .env_remove("TASKWARDEN_URL")
                .env_remove("TASKWARDEN_CONFIG")
                .output()
                .unwrap();
            (o.status.code(), text(&o))
        };
        let (code, (out, err)) = status("[workers]\nconcurrency = 0\n");
        assert_eq!(code, Some(0), "{out}\n{err}");
        assert!(
            err.contains("has problems (workers.concurrency")
                && err.contains("[http] section only"),
            "{err}"
        );
        let v: Value = serde_json::from_str(&out).unwrap();
        assert!(v["pool"].is_object(), "not the daemon's status: {out}");
        // [http] itself wrong: where the daemon listens is not known, so refused.
        let (code, (_, err)) = status("[http.extra]\n");
        assert!(code != Some(0) && err.contains("http.extra"), "{err}");
        let (code, (_, err)) = status("this is not toml [");
        assert!(code != Some(0) && err.contains("not valid TOML"), "{err}");
        std::fs::write(&cfg, &good).unwrap();
        d.signal(Signal::SIGTERM);
        assert!(tokio::task::block_in_place(|| d.wait_exit(LIMIT)).success());
    })
    .await;
}
