//! Issue 19: the web console in a real browser. The daemon (token set, a pool of 2) serves
//! `/ui`; tests/ui/console.mjs drives Debian's Chromium through playwright-core: log in with
//! the token; see the pool at 100 % and the two sessions this test holds, with their
//! callers; cancel a running task and retry a failed one from their pages (checked through
//! the API); see the overview update without a reload when a task finishes; every page
//! drawn, readable on a phone, no request leaving the daemon. Screenshots go to
//! `target/ui-screenshots/`.
//!
//! `scripts/test.sh` installs Chromium (Debian's package) and playwright-core (npm, pinned
//! in tests/ui/package-lock.json); a missing one fails this test.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::TestDb;
use common::daemon::{Daemon, bounded, http_client};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

const TOKEN: &str = "console-secret";
/// The application_name of the leaked session the overview must list under its rule.
const LEAKED_APP: &str = "uiapp:task_tracking.py:41:create_task_in_db";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_an_incident_and_acts_on_tasks_in_chromium() {
    bounded(Duration::from_secs(300), async {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        assert!(
            root.join("tests/ui/node_modules/playwright-core").exists(),
            "playwright-core missing: npm ci --prefix tests/ui (scripts/test.sh does it)"
        );
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "[database]\napplication_name = {:?}\npool_size = 2\nmax_overflow = 0\n\
             statement_timeout = \"60s\"\nquery_timeout = \"90s\"\ncheckout_timeout = \"60s\"\n\
             [http]\nlisten = \"127.0.0.1:0\"\napi_token = {TOKEN:?}\n\
             [supervisor]\ninterval = \"500ms\"\n\
             [workers]\npoll_interval = \"200ms\"\nretry_backoff = \"10ms\"\nretry_backoff_max = \"20ms\"\nshutdown_grace = \"1s\"\n\
             [agents.ok]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"cat >/dev/null; echo '{{\\\"result\\\": 1}}'\"]\n\
             [agents.bad]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"cat >/dev/null; echo '{{\\\"progress\\\": \\\"trying\\\"}}'; echo refused >&2; exit 3\"]\n\
             [agents.slow]\nkind = \"command\"\ncommand = [\"sleep\", \"120\"]\n\
             [watch.leaky]\napplication_name = \"uiapp*\"\nmax_sessions = 10\n",
            t.application_name
        );
        let url = t.url();
        let mut d = Daemon::start(dir.path(), &config, &[("TASKWARDEN_DATABASE_URL", &url)]);
        let base = d.base_url();
        let http = http_client(Duration::from_secs(90));
        let post = |path: &str, body: Value| {
            http.post(format!("{base}{path}"))
                .bearer_auth(TOKEN)
                .json(&body)
                .send()
        };
        let get = |path: String| http.get(format!("{base}{path}")).bearer_auth(TOKEN).send();

        // A running task, a failed one, an objective of two levels.
        let running: Value = post("/v1/tasks", json!({"agent": "slow"})).await.unwrap().json().await.unwrap();
        let failed: Value = post("/v1/tasks", json!({"agent": "bad", "max_attempts": 1})).await.unwrap().json().await.unwrap();
        let objective: Value = post(
            "/v1/objectives",
            json!({"title": "two levels", "steps": [
                {"key": "fetch", "agent": "ok"},
                {"key": "report", "agent": "ok", "depends_on": ["fetch"]}]}),
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        let (running_id, failed_id) = (running["id"].as_i64().unwrap(), failed["id"].as_i64().unwrap());
        for (id, want) in [(running_id, "running"), (failed_id, "failed")] {
            assert!(
                common::eventually(Duration::from_secs(30), || async {
                    let v: Value = get(format!("/v1/tasks/{id}")).await.unwrap().json().await.unwrap();
                    v["status"] == want
                })
                .await,
                "task {id} never {want}"
            );
        }

        // The incident: inserts into paused_agents wait on this lock, so two pause requests
        // hold both pooled connections (reads go on: EXCLUSIVE lets them through).
        let mut admin = t.admin().await;
        let tx = admin.transaction().await.unwrap();
        tx.batch_execute("LOCK TABLE paused_agents IN EXCLUSIVE MODE").await.unwrap();
        let held: Vec<_> = ["slow", "bad"]
            .into_iter()
            .map(|agent| {
                let req = http
                    .post(format!("{base}/v1/agents/{agent}/pause"))
                    .bearer_auth(TOKEN)
                    .json(&json!({"reason": "console test"}))
                    .send();
                tokio::spawn(req)
            })
            .collect();

        let shots = root.join("target/ui-screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        // An application's session leaked idle in its transaction, named by its caller:
        // the overview lists it under its watch rule.
        let mut leaked = std::process::Command::new(common::replica::bindir().join("psql"))
            .args(["-X", "-q", "-d", &url])
            .env("PGAPPNAME", LEAKED_APP)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let stdin = leaked.stdin.as_mut().unwrap();
            stdin.write_all(b"BEGIN; SELECT 1;\n").unwrap();
            stdin.flush().unwrap();
        }
        let mut node = tokio::process::Command::new("node")
            .arg(root.join("tests/ui/console.mjs"))
            .env("BASE", &base)
            .env("TOKEN", TOKEN)
            .env("RUNNING_ID", running_id.to_string())
            .env("FAILED_ID", failed_id.to_string())
            .env("OBJECTIVE_ID", objective["id"].to_string())
            .env("SHOTS", &shots)
            .env("LEAKED_APP", LEAKED_APP)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node (Node 20)");
        let mut lines = tokio::io::BufReader::new(node.stdout.take().unwrap()).lines();
        let mut said = Vec::new();
        let mut tx = Some(tx);
        while let Some(line) = lines.next_line().await.unwrap() {
            println!("{line}");
            if line == "HELD-OK"
                && let Some(tx) = tx.take()
            {
                tx.rollback().await.unwrap();
            }
            said.push(line);
        }
        let out = node.wait_with_output().await.unwrap();
        let _ = leaked.kill();
        let _ = leaked.wait();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "the console script failed:\n{}\n{err}",
            said.join("\n")
        );
        assert!(said.iter().any(|l| l == "HELD-OK"), "{said:?}");
        drop(tx);
        for h in held {
            let r = h.await.unwrap().unwrap();
            assert_eq!(r.status().as_u16(), 200);
        }
        for shot in ["overview-incident", "overview", "task-cancelled", "task-retried", "tasks", "agents", "objective", "overview-phone"] {
            let p: PathBuf = shots.join(format!("{shot}.png"));
            assert!(std::fs::metadata(&p).map(|m| m.len() > 1000).unwrap_or(false), "{p:?}");
        }
        d.signal(nix::sys::signal::Signal::SIGTERM);
        d.wait_exit(Duration::from_secs(60));
    })
    .await;
}
