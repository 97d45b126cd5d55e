//! Issue 26: the first seed, reproduced with its own stack and caught by a watch rule.
//!
//! `examples/clients/first_seed/app.py` is an asyncio SQLAlchemy application (asyncpg,
//! pool 20 + overflow 10, as the second seed configures it) whose task-creation function
//! opens a session and never closes it (the first seed's bug), with the SQLAlchemy caller
//! helper installed. Driven at 5 tasks a second it exhausts its pool in about 6 s. With a
//! `[watch]` rule (budget 30, `idle_in_transaction_max` 10 s, `terminate`) taskwarden must
//! fire `watch_sessions_high` before the pool is full, name the leaking function in its log
//! and in `/v1/status`, and end the leaked idle-in-transaction sessions, after which the
//! application creates tasks again (its housekeeping invalidates the sessions whose
//! connection the server closed; see app.py).

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::daemon::{Daemon, bounded, firing_for, http_client, metric_value, scrape, status_json};
use common::{TestDb, eventually};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaking_sqlalchemy_application_is_caught_named_and_unwedged() {
    bounded(Duration::from_secs(150), async {
        let t = TestDb::new().await;
        // The cluster is shared with other tests: names of this test's own.
        let app = format!("seed{}", std::process::id());
        let dir = tempfile::tempdir().unwrap();
        let url = t.url();
        let config = format!(
            "[database]\napplication_name = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [supervisor]\ninterval = \"300ms\"\n\
             [watch.seedapp]\napplication_name = \"{app}*\"\nmax_sessions = 30\n\
             idle_in_transaction_max = \"10s\"\naction = \"terminate\"\n",
            t.application_name
        );
        let mut d = Daemon::start(
            dir.path(),
            &config,
            &[("TASKWARDEN_DATABASE_URL", url.as_str())],
        );
        let base = d.base_url();
        let http = http_client(Duration::from_secs(10));

        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut child = Command::new(common::clients_python())
            .arg(root.join("examples/clients/first_seed/app.py"))
            .args(["--url", &url, "--rate", "5/s", "--duration", "30", "--app", &app])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<Value>();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    let _ = tx.send(v);
                }
            }
        });

        // While the application leaks: the budget alert, the sessions named by caller.
        let fired = eventually(Duration::from_secs(30), || async {
            firing_for(
                &status_json(&http, &base).await,
                "watch_sessions_high",
                Some("seedapp"),
            )
        })
        .await;
        assert!(fired, "watch_sessions_high never fired:\n{}", d.drain());
        let s = status_json(&http, &base).await;
        let rule = &s["watch"]["rules"]["seedapp"];
        let named = rule["sessions"].as_array().unwrap().iter().any(|x| {
            x["application_name"]
                .as_str()
                .is_some_and(|a| a.contains(":task_tracking.py:") && a.ends_with(":create_task_in_db"))
                && x["state"] == "idle in transaction"
        });
        assert!(named, "the leaking function is not named in /v1/status: {rule}");
        let cli = Command::new(common::bin())
            .arg("status")
            .env("TASKWARDEN_URL", &base)
            .output()
            .unwrap();
        let cli = String::from_utf8_lossy(&cli.stdout).to_string();
        assert!(cli.contains("create_task_in_db"), "{cli}");
        println!("taskwarden status during the leak:\n{cli}");
        // The alert fired before the pool was full: its line says how many sessions.
        let line = d
            .wait_for("watch_sessions_high", Duration::from_secs(5))
            .unwrap();
        let at: u32 = line
            .split(" has ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count in {line}"));
        assert!(at < 30, "fired only with the pool full: {line}");
        println!("alert: {line}");

        // The leaked sessions pass 10 s idle in their transaction: logged with the
        // function, terminated; the application creates tasks again.
        let logged = d
            .wait_for("past its rule's idle_in_transaction_max", Duration::from_secs(40))
            .unwrap_or_else(|| panic!("never logged:\n{}", d.drain()));
        assert!(logged.contains("create_task_in_db"), "{logged}");
        println!("log: {logged}");
        let mut exhausted = false;
        let mut recovered = false;
        let mut last = Value::Null;
        while let Ok(v) = rx.recv_timeout(Duration::from_secs(40)) {
            if v["event"] == "tick" {
                if v["checked_out"] == 30 && v["failed_1s"].as_u64().unwrap_or(0) > 0 {
                    exhausted = true;
                }
                if exhausted && v["ok_1s"].as_u64().unwrap_or(0) > 0 {
                    recovered = true;
                }
            }
            if v["event"] == "end" {
                last = v;
                break;
            }
        }
        let _ = child.wait();
        assert!(exhausted, "the application's pool was never exhausted: {last}");
        assert!(recovered, "the application never created tasks again: {last}");
        assert!(last["created"].as_u64().unwrap_or(0) > 30, "{last}");
        let text = scrape(&http, &base).await;
        let terminated = metric_value(
            &text,
            "taskwarden_watch_sessions_terminated_total{watch=\"seedapp\",reason=\"idle_in_transaction_max\"}",
        );
        assert!(terminated >= 30.0, "{terminated} terminated\n{text}");
    })
    .await;
}
