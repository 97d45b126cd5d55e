//! Issue 23, item 1: no agent output can wedge an instance. Against the built daemon and
//! real PostgreSQL, agents of every kind emit what the database cannot store as it is —
//! NUL in stderr, in a JSON result, in an event, in an HTTP agent's error body and reply;
//! invalid UTF-8; token counts and costs beyond their columns; results too large or too
//! deep; events too large — mixed with healthy tasks. Every task must reach a final state
//! with what it emitted made storable (or its refusal named), `/readyz` must stay 200, and
//! the writer must never loop on a refused batch.

mod common;

use std::time::Duration;

use common::TestDb;
use common::daemon::{Daemon, bounded, http_client, scrape};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(90);

/// A one-connection-at-a-time HTTP agent on loopback: each request is answered with the
/// next of `replies` (status line, content type, body).
async fn http_agent(replies: Vec<(&'static str, &'static str, Vec<u8>)>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut replies = replies.into_iter().cycle();
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let (status, ctype, body) = replies.next().unwrap();
            tokio::spawn(async move {
                // Read the request head and its JSON body (small; one read is enough here,
                // but read until the body's end to be sure it is not cut).
                let mut buf = vec![0u8; 65536];
                let mut got = 0;
                loop {
                    let Ok(n) = s.read(&mut buf[got..]).await else {
                        return;
                    };
                    got += n;
                    let text = String::from_utf8_lossy(&buf[..got]);
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let len = text[..head_end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if got >= head_end + 4 + len {
                            break;
                        }
                    }
                    if n == 0 {
                        return;
                    }
                }
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
                let _ = s.shutdown().await;
            });
        }
    });
    format!("http://{addr}/")
}

async fn get(http: &reqwest::Client, url: String) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_agent_output_of_any_kind_wedges_the_outcome_writer() {
    bounded(LIMIT, async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let script = |name: &str, body: &str| {
            let p = dir.path().join(format!("{name}.sh"));
            std::fs::write(&p, body).unwrap();
            p.display().to_string()
        };
        // What each agent prints; each is max_attempts 1.
        let agents = [
            ("nul_stderr", "printf 'bad\\000byte\\n' >&2; exit 3\n".to_string()),
            ("nul_result", "printf '{\"result\": \"a\\\\u0000b\", \"k\\\\u0000\": 1}\\n'\n".into()),
            ("nul_event", "printf '{\"progress\": \"x\\\\u0000y\"}\\n'; printf '{\"result\": 1}\\n'\n".into()),
            ("bad_utf8", "printf '{\"result\": \"\\377\\376ok\"}\\n'\n".into()),
            (
                "huge_usage",
                "for i in 1 2; do printf '{\"usage\": {\"prompt_tokens\": 9223372036854775807, \"completion_tokens\": 9223372036854775807, \"cost_usd\": 1e30}}\\n'; done; printf '{\"result\": 2}\\n'\n".into(),
            ),
            ("big_result", "printf '{\"result\": \"%05000d\"}\\n' 0\n".into()),
            ("big_event", "printf '{\"blob\": \"%05000d\"}\\n' 0; printf '{\"result\": 3}\\n'\n".into()),
            (
                "deep_result",
                // 100 levels: within serde_json's parser limit, past the store's bound.
                "python3 -c 'import sys; sys.stdout.write(\"{\\\"result\\\": \" + \"[\" * 100 + \"]\" * 100 + \"}\\n\")'\n".into(),
            ),
        ];
        let mut cfg = format!(
            "[database]\napplication_name = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [supervisor]\ninterval = \"300ms\"\n\
             [workers]\npoll_interval = \"200ms\"\nshutdown_grace = \"1s\"\n\
             max_result_bytes = 2000\nmax_event_bytes = 2000\n\
             [agents.echo]\nkind = \"command\"\ncommand = [\"cat\"]\n",
            t.application_name
        );
        for (name, body) in &agents {
            let path = script(name, body);
            cfg.push_str(&format!(
                "[agents.{name}]\nkind = \"command\"\ncommand = [\"sh\", {path:?}]\n"
            ));
        }
        let http_err = http_agent(vec![(
            "400 Bad Request",
            "text/plain",
            b"refused\x00with a NUL\xff\xfe".to_vec(),
        )])
        .await;
        let http_nul = http_agent(vec![(
            "200 OK",
            "application/json",
            br#"{"answer": "x\u0000y", "bytes": "a"}"#.to_vec(),
        )])
        .await;
        let http_sse = http_agent(vec![(
            "200 OK",
            "text/event-stream",
            b"data: {\"step\": \"s\\u0000\"}\n\ndata: {\"result\": \"r\\u0000\"}\n\n".to_vec(),
        )])
        .await;
        // Endless `data:` lines with no blank line to end the event: 9 MiB of them, past
        // the 8 MiB an event may hold (it used to be gathered whole, however large).
        let line = format!("data: {}\n", "x".repeat(4000));
        let http_sse_flood =
            http_agent(vec![("200 OK", "text/event-stream", line.repeat(2400).into_bytes())])
                .await;
        cfg.push_str(&format!(
            "[agents.http_err]\nkind = \"http\"\nurl = {http_err:?}\n\
             [agents.http_nul]\nkind = \"http\"\nurl = {http_nul:?}\n\
             [agents.http_sse]\nkind = \"http\"\nurl = {http_sse:?}\n\
             [agents.http_sse_flood]\nkind = \"http\"\nurl = {http_sse_flood:?}\n"
        ));
        let url = t.url();
        let mut d = Daemon::start(dir.path(), &cfg, &[("TASKWARDEN_DATABASE_URL", &url)]);
        let base = d.base_url();
        let http = http_client(Duration::from_secs(10));

        let submit = |agent: String, payload: Value| {
            let http = http.clone();
            let base = base.clone();
            async move {
                let r = http
                    .post(format!("{base}/v1/tasks"))
                    .json(&json!({ "agent": agent, "payload": payload, "max_attempts": 1 }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 201, "{agent}");
                r.json::<Value>().await.unwrap()["id"].as_i64().unwrap()
            }
        };
        let mut ids = Vec::new();
        let names: Vec<&str> = agents
            .iter()
            .map(|(n, _)| *n)
            .chain(["http_err", "http_nul", "http_sse", "http_sse_flood"])
            .collect();
        for name in &names {
            ids.push((name.to_string(), submit(name.to_string(), json!({})).await));
        }
        // Healthy work after the poison: the outcomes the issue saw wedged behind it.
        for k in 0..5 {
            ids.push(("echo".into(), submit("echo".into(), json!({ "k": k })).await));
        }

        let mut tasks = std::collections::BTreeMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
        for (name, id) in &ids {
            loop {
                let task = get(&http, format!("{base}/v1/tasks/{id}")).await;
                if !matches!(task["status"].as_str(), Some("queued" | "running")) {
                    tasks.insert(name.clone(), task);
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "task {id} ({name}) never reached a final state: {task}\n{}",
                    d.drain()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let status = |n: &str| tasks[n]["status"].as_str().unwrap_or("").to_string();
        let error = |n: &str| tasks[n]["error"].as_str().unwrap_or("").to_string();
        let result = |n: &str| tasks[n]["result"].clone();

        assert_eq!(status("echo"), "succeeded");
        assert_eq!(status("nul_stderr"), "failed");
        assert!(error("nul_stderr").contains("bad\u{FFFD}byte"), "{}", error("nul_stderr"));
        assert_eq!(status("nul_result"), "succeeded");
        assert_eq!(result("nul_result"), json!("a\u{FFFD}b"));
        assert_eq!(status("nul_event"), "succeeded");
        assert_eq!(status("bad_utf8"), "succeeded");
        assert_eq!(result("bad_utf8"), json!("\u{FFFD}\u{FFFD}ok"));
        assert_eq!(status("huge_usage"), "succeeded", "{}", tasks["huge_usage"]);
        // Each report is clamped to 2^50 tokens (the sums saturate at the column's bound).
        assert_eq!(tasks["huge_usage"]["prompt_tokens"], json!(2i64 << 50), "clamped, not refused");
        assert!(tasks["huge_usage"]["cost_usd"].as_f64().unwrap() >= 1e11);
        assert_eq!(status("big_result"), "failed");
        assert!(error("big_result").contains("workers.max_result_bytes = 2000"), "{}", error("big_result"));
        assert_eq!(status("big_event"), "succeeded");
        assert_eq!(status("deep_result"), "failed");
        assert!(error("deep_result").contains("deeper than 64"), "{}", error("deep_result"));
        assert_eq!(status("http_err"), "failed");
        assert!(error("http_err").contains("refused\u{FFFD}with a NUL"), "{}", error("http_err"));
        assert_eq!(status("http_nul"), "succeeded");
        assert_eq!(result("http_nul")["answer"], json!("x\u{FFFD}y"));
        assert_eq!(status("http_sse"), "succeeded");
        assert_eq!(result("http_sse"), json!("r\u{FFFD}"));
        assert_eq!(status("http_sse_flood"), "failed");
        assert!(error("http_sse_flood").contains("larger than the limit"), "{}", error("http_sse_flood"));

        // The events were stored cleaned, or as a marker saying why not.
        let events = |name: &str| {
            let id = ids.iter().find(|(n, _)| n == name).unwrap().1;
            let http = http.clone();
            let base = base.clone();
            async move { get(&http, format!("{base}/v1/tasks/{id}/events")).await }
        };
        let ev = events("nul_event").await;
        assert!(ev.to_string().contains("x\u{FFFD}y"), "{ev}");
        let ev = events("big_event").await;
        assert!(ev.to_string().contains("over workers.max_event_bytes = 2000"), "{ev}");
        let ev = events("http_sse").await;
        assert!(ev.to_string().contains("s\u{FFFD}"), "{ev}");

        // Ready all along, nothing stalled, and the writer never looped on a refusal.
        let r = http.get(format!("{base}/readyz")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let metrics = scrape(&http, &base).await;
        assert!(
            metrics.contains("taskwarden_outcome_write_lag_seconds 0"),
            "{}",
            metrics.lines().filter(|l| l.contains("outcome")).collect::<Vec<_>>().join("\n")
        );
        let log = d.drain();
        assert!(
            !log.contains("writing task outcomes failed"),
            "the outcome writer retried a refused batch:\n{log}"
        );
    })
    .await;
}

/// The issue's own reproduction, with nothing but the shipped config keys: one NUL byte
/// on a failing agent's stderr, then five tasks of `cat`. Before the fix every outcome
/// after it stayed `running` while `/readyz` said ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_nul_byte_on_stderr_leaves_no_task_running() {
    bounded(LIMIT, async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = format!(
            "[database]\napplication_name = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [supervisor]\ninterval = \"300ms\"\n\
             [workers]\npoll_interval = \"200ms\"\nshutdown_grace = \"1s\"\n\
             [agents.echo]\nkind = \"command\"\ncommand = [\"cat\"]\n\
             [agents.poison]\nkind = \"command\"\n\
             command = [\"sh\", \"-c\", \"printf 'bad\\\\000byte\\\\n' >&2; exit 3\"]\n",
            t.application_name
        );
        let url = t.url();
        let mut d = Daemon::start(dir.path(), &cfg, &[("TASKWARDEN_DATABASE_URL", &url)]);
        let base = d.base_url();
        let http = http_client(Duration::from_secs(10));
        let mut ids = Vec::new();
        for (agent, n) in [("poison", 1), ("echo", 5)] {
            for _ in 0..n {
                let r = http
                    .post(format!("{base}/v1/tasks"))
                    .json(&json!({ "agent": agent, "max_attempts": 1 }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 201);
                ids.push(r.json::<Value>().await.unwrap()["id"].as_i64().unwrap());
            }
        }
        let admin = t.admin().await;
        let mut left = i64::MAX;
        for _ in 0..100 {
            left = common::count(
                &admin,
                "SELECT count(*) FROM tasks WHERE status IN ('queued', 'running')",
            )
            .await;
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(left, 0, "tasks left unfinished 20 s on:\n{}", d.drain());
        let failed: String = admin
            .query_one("SELECT error FROM tasks WHERE id = $1", &[&ids[0]])
            .await
            .unwrap()
            .get(0);
        assert!(failed.contains("bad\u{FFFD}byte"), "{failed}");
        let ok = common::count(
            &admin,
            "SELECT count(*) FROM tasks WHERE status = 'succeeded'",
        )
        .await;
        assert_eq!(ok, 5);
    })
    .await;
}

fn plain_config(t: &TestDb, extra_workers: &str, extra_supervisor: &str, agents: &str) -> String {
    format!(
        "[database]\napplication_name = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n\
         [supervisor]\ninterval = \"200ms\"\n{extra_supervisor}\n\
         [workers]\npoll_interval = \"200ms\"\nshutdown_grace = \"1s\"\n{extra_workers}\n{agents}",
        t.application_name
    )
}

async fn wait_final(admin: &tokio_postgres::Client, ids: &[i64], limit: Duration) -> bool {
    common::eventually(limit, || async {
        common::count(
            admin,
            &format!(
                "SELECT count(*) FROM tasks WHERE id = ANY('{{{}}}') AND status IN ('queued', 'running')",
                ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
            ),
        )
        .await
            == 0
    })
    .await
}

/// The writer's second line of defence: a row the database refuses for any reason the
/// boundary did not foresee (here a trigger raising a data exception on one result) is
/// found by splitting its batch; the others in the batch are written, and that task fails
/// naming the refusal instead of wedging every outcome behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_row_fails_only_its_own_task_and_its_batch_is_written() {
    bounded(LIMIT, async {
        let t = TestDb::new().await;
        let admin = t.admin().await;
        admin
            .batch_execute(
                "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN \
                   IF NEW.status = 'succeeded' AND NEW.result ? 'poison' THEN \
                     RAISE EXCEPTION 'poisoned result' USING ERRCODE = '22023'; \
                   END IF; \
                   RETURN NEW; \
                 END $$; \
                 CREATE TRIGGER refuse_poison BEFORE UPDATE ON tasks \
                   FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
            )
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        // A wide window, so the poisoned outcome shares its batch with the healthy ones.
        let cfg = plain_config(
            &t,
            "completion_window = \"300ms\"",
            "",
            "[agents.echo]\nkind = \"command\"\ncommand = [\"cat\"]\n",
        );
        let url = t.url();
        let mut d = Daemon::start(dir.path(), &cfg, &[("TASKWARDEN_DATABASE_URL", &url)]);
        let base = d.base_url();
        let http = http_client(Duration::from_secs(10));
        let mut ids = Vec::new();
        for k in 0..9 {
            let result = if k == 4 {
                json!({"poison": true})
            } else {
                json!({"k": k})
            };
            let r = http
                .post(format!("{base}/v1/tasks"))
                .json(
                    &json!({ "agent": "echo", "payload": { "result": result }, "max_attempts": 1 }),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 201);
            ids.push(r.json::<Value>().await.unwrap()["id"].as_i64().unwrap());
        }
        assert!(
            wait_final(&admin, &ids, Duration::from_secs(20)).await,
            "tasks left unfinished:\n{}",
            d.drain()
        );
        let rows = admin
            .query("SELECT id, status, error FROM tasks ORDER BY id", &[])
            .await
            .unwrap();
        for r in &rows {
            let (id, status, error): (i64, String, Option<String>) = (r.get(0), r.get(1), r.get(2));
            if id == ids[4] {
                assert_eq!(status, "failed");
                let e = error.unwrap_or_default();
                assert!(
                    e.contains("outcome (succeeded) refused by the database")
                        && e.contains("22023")
                        && e.contains("poisoned result"),
                    "{e}"
                );
            } else {
                assert_eq!(status, "succeeded", "task {id}: {error:?}");
            }
        }
        let events = common::count(
            &admin,
            &format!(
                "SELECT count(*) FROM task_events WHERE task_id = {} AND kind = 'outcome_refused'",
                ids[4]
            ),
        )
        .await;
        assert_eq!(events, 1);
        let m = scrape(&http, &base).await;
        assert!(
            m.contains("taskwarden_outcomes_refused_total{result=\"failed\"} 1"),
            "{m}"
        );
        assert!(!d.drain().contains("writing task outcomes failed"));
    })
    .await;
}

/// Progress is watched: an outcome that cannot be written (its row locked by another
/// session) makes the instance unready past `supervisor.outcome_stall_after`, with the
/// reason, the alert and the lag metric; once the lock goes the outcome is written and the
/// instance is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_that_cannot_be_written_makes_the_instance_unready_until_it_is() {
    bounded(LIMIT, async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = plain_config(
            &t,
            "",
            "outcome_stall_after = \"1s\"",
            "[agents.slow]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"sleep 1; echo '{\\\"result\\\": 1}'\"]\n",
        );
        let url = t.url();
        let mut d = Daemon::start(dir.path(), &cfg, &[("TASKWARDEN_DATABASE_URL", &url)]);
        let base = d.base_url();
        let http = http_client(Duration::from_secs(10));
        let r = http
            .post(format!("{base}/v1/tasks"))
            .json(&json!({ "agent": "slow", "max_attempts": 1 }))
            .send()
            .await
            .unwrap();
        let id = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
        // Lock the row while it runs: its outcome write then waits behind the lock.
        let mut locker = t.admin().await;
        let admin = t.admin().await;
        assert!(
            common::eventually(Duration::from_secs(10), || async {
                common::count(&admin, &format!("SELECT count(*) FROM tasks WHERE id = {id} AND status = 'running'")).await == 1
            })
            .await
        );
        let tx = locker.transaction().await.unwrap();
        tx.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", &[&id])
            .await
            .unwrap();
        let reason = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stalled = common::eventually(Duration::from_secs(15), || {
            let http = http.clone();
            let base = base.clone();
            let reason = reason.clone();
            async move {
                let r = http.get(format!("{base}/readyz")).send().await.unwrap();
                let code = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                let hit = code == 503 && text.contains("outcomes stalled") && text.contains(&format!("task {id}"));
                *reason.lock().unwrap() = text;
                hit
            }
        })
        .await;
        let reason = reason.lock().unwrap().clone();
        assert!(stalled, "never unready for the stalled outcome; last: {reason}\n{}", d.drain());
        let m = scrape(&http, &base).await;
        assert!(m.contains("taskwarden_alerts_firing{alert=\"outcomes_stalled\"} 1"), "{m}");
        let lag: f64 = m
            .lines()
            .find_map(|l| l.strip_prefix("taskwarden_outcome_write_lag_seconds "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!(lag > 1.0, "lag {lag}");
        tx.rollback().await.unwrap();
        assert!(wait_final(&admin, &[id], Duration::from_secs(20)).await);
        let row = admin
            .query_one("SELECT status, error FROM tasks WHERE id = $1", &[&id])
            .await
            .unwrap();
        let (status, error): (String, Option<String>) = (row.get(0), row.get(1));
        assert_eq!(status, "succeeded", "{error:?}\n{}", d.drain());
        let ready = common::eventually(Duration::from_secs(10), || {
            let http = http.clone();
            let base = base.clone();
            async move {
                http.get(format!("{base}/readyz")).send().await.map(|r| r.status().as_u16()).unwrap_or(0) == 200
            }
        })
        .await;
        assert!(ready, "not ready again after the outcome was written");
        let m = scrape(&http, &base).await;
        assert!(m.contains("taskwarden_alerts_firing{alert=\"outcomes_stalled\"} 0"), "{m}");
    })
    .await;
}
