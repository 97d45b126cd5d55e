//! Job-queue enqueue (issue 16): transactional enqueue from SQL, bulk submit, unique keys.
//!
//! The daemon tests drive the built binary with a command agent that appends its payload
//! to a log file, so what ran is observed in the agent's side effects as well as in rows
//! and API answers. The `eventually` limits only guard against hangs unless a test says
//! otherwise.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::daemon::{Daemon, bounded, http_client};
use common::{TestDb, eventually};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use taskwarden::config::Dur;
use taskwarden::store::{NewTask, Store, StoreError, TaskStatus, UniqueScope};

const TEST_LIMIT: Duration = Duration::from_secs(600);
const LIMIT: Duration = Duration::from_secs(120);

/// How many times each payload number appears in the agent's log.
fn counts(log: &Path) -> BTreeMap<i64, usize> {
    let mut m = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        if let Ok(v) = serde_json::from_str::<Value>(line)
            && let Some(n) = v["n"].as_i64()
        {
            *m.entry(n).or_insert(0) += 1;
        }
    }
    m
}

/// A config for a daemon on the test database: agent `rec` runs `script` (LOG replaced by
/// `log`); `extra` goes into `[workers]`.
fn config(t: &TestDb, log: &Path, script: &str, workers: &str) -> String {
    let script = script.replace("LOG", log.to_str().unwrap());
    format!(
        "[database]\napplication_name = {:?}\npool_size = 6\nmax_overflow = 2\n\
         [workers]\nconcurrency = 8\npoll_interval = \"200ms\"\n{workers}\n\
         [agents.rec]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", {script:?}]\nconcurrency = 8\n",
        t.application_name
    )
}

fn start(dir: &Path, cfg: &str, env: &[(&str, &str)]) -> (Daemon, String) {
    tokio::task::block_in_place(|| {
        let mut d = Daemon::start(dir, cfg, env);
        let base = d.base_url();
        (d, base)
    })
}

fn stop(mut d: Daemon) {
    d.signal(Signal::SIGTERM);
    tokio::task::block_in_place(|| {
        let st = d.wait_exit(LIMIT);
        assert!(st.success(), "daemon exited {st:?}:\n{}", d.output());
    });
}

async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

async fn post(http: &reqwest::Client, base: &str, body: &Value) -> (u16, Value) {
    let r = http
        .post(format!("{base}/v1/tasks"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// A free loopback port (bound, then released for the daemon's PostgreSQL).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// An application on the embedded database's loopback listener enqueues in its own
/// transactions: a rolled-back enqueue never runs; an uncommitted one does not run until
/// its commit, and then runs at once — woken by NOTIFY, since the daemon's poll interval
/// is an hour. Without `max_attempts` it gets the daemon's `workers.max_attempts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_runs_only_if_its_transaction_commits() {
    bounded(TEST_LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let port = free_port();
        let cfg = format!(
            "[database]\ndata_dir = {:?}\nembedded_listen_port = {port}\n\
             [workers]\npoll_interval = \"1h\"\nmax_attempts = 5\n\
             [agents.rec]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", {:?}]\n",
            dir.path().join("data").display().to_string(),
            format!("read p; echo \"$p\" >> {}", log.display())
        );
        let (d, _base) = start(dir.path(), &cfg, &[]);

        // The application: plain TCP to 127.0.0.1, as a local program would connect.
        let mut pg = tokio_postgres::Config::new();
        pg.host("127.0.0.1")
            .port(port)
            .user("taskwarden")
            .dbname("taskwarden");
        let mut app = common::connect(&pg).await;
        // The daemon's listener is up (its LISTEN went through) before we rely on NOTIFY.
        let listening = eventually(LIMIT, || async {
            count(
                &app,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'taskwarden:listener' \
                 AND (query LIKE 'LISTEN%' OR query = 'SELECT 1')",
            )
            .await
                == 1
        })
        .await;
        assert!(listening, "the daemon never listened for notifications");

        let tx = app.transaction().await.unwrap();
        tx.query_one("SELECT taskwarden.enqueue('rec', '{\"n\": 1}')", &[])
            .await
            .unwrap();
        tx.rollback().await.unwrap();

        let tx = app.transaction().await.unwrap();
        let id: i64 = tx
            .query_one("SELECT taskwarden.enqueue('rec', '{\"n\": 2}', priority => 1)", &[])
            .await
            .unwrap()
            .get(0);
        // (That the uncommitted row does not run before the commit is PostgreSQL's MVCC —
        // no session sees another's uncommitted row — not taskwarden's doing, so it is not
        // checked here. What is taskwarden's: the rolled-back enqueue never runs, the
        // committed one runs once with its payload, woken by the NOTIFY the commit sends.)
        tx.commit().await.unwrap();

        // Woken by NOTIFY: well within the hour-long poll interval (a hang guard of 60 s,
        // not a timing assertion).
        let ran = eventually(Duration::from_secs(60), || async {
            app.query_one("SELECT status FROM tasks WHERE id = $1", &[&id])
                .await
                .map(|r| r.get::<_, String>(0) == "succeeded")
                .unwrap_or(false)
        })
        .await;
        assert!(ran, "the committed enqueue never ran");
        assert_eq!(counts(&log), BTreeMap::from([(2, 1)]), "what the agent ran");
        assert_eq!(count(&app, "SELECT count(*) FROM tasks").await, 1);
        let max: i32 = app
            .query_one("SELECT max_attempts FROM tasks WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(max, 5, "the daemon's workers.max_attempts");
        drop(app);
        stop(d);
    })
    .await
}

fn items(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"agent": "rec", "payload": {"n": i}}))
        .collect()
}

/// A bulk with one bad item writes nothing and names the item; so does one over the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_with_one_bad_item_writes_nothing_and_names_its_index() {
    bounded(TEST_LIMIT, async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&t, &dir.path().join("log"), "cat >/dev/null", "");
        let (d, base) = start(dir.path(), &cfg, &[("TASKWARDEN_DATABASE_URL", &t.url())]);
        let http = http_client(Duration::from_secs(30));
        let c = t.admin().await;

        let cases: [(usize, Value, &str); 5] = [
            (
                7,
                json!({"agent": "rec", "payload": {"s": "a\u{0}b"}}),
                "items[7].payload.s",
            ),
            (
                637,
                json!({"agent": "nope", "payload": {}}),
                "items[637].agent",
            ),
            (
                412,
                json!({"agent": "rec", "max_attempts": 0}),
                "items[412].max_attempts",
            ),
            (
                5,
                json!({"agent": "rec", "priority": "high"}),
                "items[5].priority",
            ),
            (
                999,
                json!({"agent": "rec", "unique_scope": "queued"}),
                "items[999].unique_scope",
            ),
        ];
        for (i, bad, field) in cases {
            let mut body = items(1000);
            body[i] = bad;
            let (status, v) = post(&http, &base, &Value::Array(body)).await;
            assert_eq!(status, 400, "{v}");
            assert_eq!(v["field"], field, "{v}");
            assert_eq!(count(&c, "SELECT count(*) FROM tasks").await, 0, "{field}");
        }
        let (status, v) = post(&http, &base, &Value::Array(items(1001))).await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["field"], "items", "{v}");
        assert!(v["error"].as_str().unwrap().contains("1000"), "{v}");
        assert_eq!(count(&c, "SELECT count(*) FROM tasks").await, 0);
        stop(d);
    })
    .await
}

/// A bulk of 1,000 good items: one answer per item in their order, and every one runs
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_of_a_thousand_good_items_all_run() {
    bounded(TEST_LIMIT, async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let cfg = config(&t, &log, "read p; echo \"$p\" >> LOG", "");
        let (d, base) = start(dir.path(), &cfg, &[("TASKWARDEN_DATABASE_URL", &t.url())]);
        let http = http_client(Duration::from_secs(30));
        let c = t.admin().await;

        let (status, v) = post(&http, &base, &Value::Array(items(1000))).await;
        assert_eq!(status, 201, "{v}");
        let answers = v.as_array().unwrap();
        assert_eq!(answers.len(), 1000);
        let mut ids = BTreeSet::new();
        for (i, a) in answers.iter().enumerate() {
            assert_eq!(a["payload"]["n"], i, "answer {i} is not item {i}");
            assert_eq!(a["duplicate"], false);
            ids.insert(a["id"].as_i64().unwrap());
        }
        assert_eq!(ids.len(), 1000, "ids not distinct");
        assert_eq!(count(&c, "SELECT count(*) FROM tasks").await, 1000);

        let done = eventually(Duration::from_secs(400), || async {
            count(&c, "SELECT count(*) FROM tasks WHERE status = 'succeeded'").await == 1000
        })
        .await;
        assert!(
            done,
            "not all succeeded: {}",
            count(&c, "SELECT count(*) FROM tasks WHERE status <> 'succeeded'").await
        );
        let ran = counts(&log);
        assert_eq!(ran.len(), 1000, "payloads run");
        assert!(ran.values().all(|k| *k == 1), "some ran twice");
        assert_eq!(
            ran.keys().copied().collect::<Vec<_>>(),
            (0..1000).collect::<Vec<_>>()
        );
        stop(d);
    })
    .await
}

/// Twenty concurrent submits of one unique key, ten to each of two daemons, create one
/// task: one answer 201, nineteen 200 with `"duplicate": true` and the same id. While that
/// task is queued or running the key stays held; once it finished, the key creates a new
/// task (the default "active" scope).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submits_of_one_key_on_two_daemons_create_one_task() {
    bounded(TEST_LIMIT, async {
        let t = TestDb::new().await;
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let shared = tempfile::tempdir().unwrap();
        let (log, go) = (shared.path().join("log"), shared.path().join("go"));
        // Runs until the test creates `go`, so the task holds its key meanwhile.
        let script = format!(
            "read p; while [ ! -e {} ]; do sleep 0.05; done; echo \"$p\" >> LOG",
            go.display()
        );
        let cfg = config(&t, &log, &script, "");
        let env = [("TASKWARDEN_DATABASE_URL", t.url())];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (a, base_a) = start(da.path(), &cfg, &env);
        let (b, base_b) = start(db.path(), &cfg, &env);
        let http = http_client(Duration::from_secs(30));
        let c = t.admin().await;

        let barrier = Arc::new(tokio::sync::Barrier::new(20));
        let mut joins = Vec::new();
        for i in 0..20 {
            let (http, barrier) = (http.clone(), Arc::clone(&barrier));
            let base = if i % 2 == 0 { &base_a } else { &base_b }.clone();
            joins.push(tokio::spawn(async move {
                let body = json!({"agent": "rec", "payload": {"n": i}, "unique_key": "report-42"});
                barrier.wait().await;
                post(&http, &base, &body).await
            }));
        }
        let mut answers = Vec::new();
        for j in joins {
            answers.push(j.await.unwrap());
        }
        let brief: Vec<(u16, Value, Value)> = answers
            .iter()
            .map(|(s, v)| (*s, v["id"].clone(), v["duplicate"].clone()))
            .collect();
        let created: Vec<&(u16, Value)> = answers.iter().filter(|(s, _)| *s == 201).collect();
        let dups: Vec<&(u16, Value)> = answers.iter().filter(|(s, _)| *s == 200).collect();
        assert_eq!(created.len(), 1, "(status, id, duplicate): {brief:?}");
        assert_eq!(dups.len(), 19, "(status, id, duplicate): {brief:?}");
        let id = created[0].1["id"].as_i64().unwrap();
        assert_eq!(created[0].1["duplicate"], false);
        for (_, v) in &dups {
            assert_eq!(v["duplicate"], true, "{v}");
            assert_eq!(v["id"].as_i64(), Some(id), "{v}");
        }
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM tasks WHERE unique_key = 'report-42'"
            )
            .await,
            1
        );
        assert_eq!(count(&c, "SELECT count(*) FROM tasks").await, 1);

        // Running now: still held.
        let running = eventually(LIMIT, || async {
            common::daemon::task_status(&http, &base_b, id)
                .await
                .as_deref()
                == Some("running")
        })
        .await;
        assert!(running, "the task never started");
        // Through the CLI this time: it says so, and answers the holder.
        let out = std::process::Command::new(common::bin())
            .args([
                "submit",
                "--url",
                &base_b,
                "--agent",
                "rec",
                "--payload",
                r#"{"n": 100}"#,
            ])
            .args(["--unique-key", "report-42"])
            .env_remove("TASKWARDEN_API_TOKEN")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        assert!(text.starts_with(&format!("task {id} running")), "{text}");
        assert!(text.contains("duplicate"), "{text}");
        let again = json!({"agent": "rec", "payload": {"n": 100}, "unique_key": "report-42"});

        // Finished: the key is free and makes a new task.
        std::fs::write(&go, b"").unwrap();
        let finished = eventually(LIMIT, || async {
            common::daemon::task_status(&http, &base_a, id)
                .await
                .as_deref()
                == Some("succeeded")
        })
        .await;
        assert!(finished, "the task never finished");
        let (status, v) = post(&http, &base_a, &again).await;
        assert_eq!(status, 201, "{v}");
        assert_eq!(v["duplicate"], false);
        let second = v["id"].as_i64().unwrap();
        assert_ne!(second, id);
        let done = eventually(LIMIT, || async {
            common::daemon::task_status(&http, &base_a, second)
                .await
                .as_deref()
                == Some("succeeded")
        })
        .await;
        assert!(done, "the second task never finished");
        // The agent ran exactly the first submit and the post-finish one.
        let ran = counts(&log);
        assert_eq!(ran.get(&100), Some(&1), "{ran:?}");
        assert_eq!(ran.len(), 2, "{ran:?}");
        stop(a);
        stop(b);
    })
    .await
}

fn store(t: &TestDb) -> Store {
    Store::new(t.pool(2, 0, Duration::from_secs(5)), 3)
}

fn keyed(key: &str, scope: Option<UniqueScope>, period: Option<Duration>) -> NewTask {
    NewTask {
        unique_key: Some(key.into()),
        unique_scope: scope,
        unique_for: period.map(Dur),
        ..NewTask::new("echo", json!({}))
    }
}

/// The "queued" scope holds a key until the task first starts (a retry back to the queue
/// does not take it again); "period" holds it for its period, whatever the status.
#[tokio::test]
async fn queued_and_period_scopes_free_their_keys() {
    let t = TestDb::new().await;
    let s = store(&t);

    let q = keyed("q", Some(UniqueScope::Queued), None);
    let first = s.enqueue(&q).await.unwrap();
    assert!(!first.duplicate);
    let dup = s.enqueue(&q).await.unwrap();
    assert!(dup.duplicate);
    assert_eq!(dup.task.id, first.task.id);
    let claimed = s
        .claim("echo", 10, "me", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let second = s.enqueue(&q).await.unwrap();
    assert!(
        !second.duplicate,
        "a started task still held a queued-scope key"
    );
    // The first one fails its attempt and goes back to the queue: no clash with the second.
    let back = s
        .transition(
            first.task.id,
            TaskStatus::Queued,
            &taskwarden::store::TransitionArgs {
                expected_owner: Some("me".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(back.status, TaskStatus::Queued);
    assert_eq!(s.enqueue(&q).await.unwrap().task.id, second.task.id);

    let p = keyed("p", None, Some(Duration::from_secs(1)));
    let first = s.enqueue(&p).await.unwrap();
    assert_eq!(first.task.unique_scope, Some(UniqueScope::Period));
    assert!(first.task.unique_until.is_some());
    let c = t.admin().await;
    c.execute(
        "UPDATE tasks SET status = 'cancelled', finished_at = now() WHERE id = $1",
        &[&first.task.id],
    )
    .await
    .unwrap();
    // Finished, but inside its period: still held.
    assert_eq!(s.enqueue(&p).await.unwrap().task.id, first.task.id);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let next = s.enqueue(&p).await.unwrap();
    assert!(!next.duplicate, "the key outlived its period");
    assert_eq!(s.get_task(first.task.id).await.unwrap().unique_until, None);
}

/// Inside one bulk a repeated key answers its first item; a bulk the database refuses
/// (a payload string PostgreSQL cannot store, at item 500) writes nothing.
#[tokio::test]
async fn bulk_keys_and_atomicity() {
    let t = TestDb::new().await;
    let s = store(&t);
    let c = t.admin().await;
    let mut items: Vec<NewTask> = (0..6)
        .map(|i| NewTask::new("echo", json!({ "n": i })))
        .collect();
    items[1].unique_key = Some("k".into());
    items[4].unique_key = Some("k".into());
    let out = s.enqueue_many(&items).await.unwrap();
    assert_eq!(out.len(), 6);
    assert!(out[4].duplicate);
    assert_eq!(out[4].task.id, out[1].task.id);
    assert_eq!(out[4].task.payload, json!({"n": 1}));
    for (i, e) in out.iter().enumerate() {
        if i != 4 {
            assert!(!e.duplicate);
            assert_eq!(e.task.payload, json!({ "n": i }));
        }
    }
    assert_eq!(count(&c, "SELECT count(*) FROM tasks").await, 5);

    for keyed in [false, true] {
        let mut items: Vec<NewTask> = (0..1000)
            .map(|i| NewTask::new("echo", json!({ "n": i })))
            .collect();
        if keyed {
            items[3].unique_key = Some("other".into());
        }
        items[500].payload = json!({ "s": "a\u{0}b" });
        let err = s.enqueue_many(&items).await.unwrap_err();
        assert!(matches!(err, StoreError::Db(_)), "{err:?}");
        assert_eq!(
            count(&c, "SELECT count(*) FROM tasks").await,
            5,
            "keyed: {keyed}"
        );
    }
    let err = s
        .enqueue_many(&[
            NewTask::new("echo", json!({})),
            keyed("x", Some(UniqueScope::Period), None),
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid { field, .. } if field == "items[1].unique_for"),
        "{err:?}"
    );
}

/// The SQL function checks its arguments (22023, naming the argument) and answers the
/// key's holder on a duplicate.
#[tokio::test]
async fn the_sql_function_checks_arguments_and_answers_duplicates() {
    let t = TestDb::new().await;
    let c = t.admin().await;
    for (sql, says) in [
        ("SELECT taskwarden.enqueue('')", "agent"),
        (
            "SELECT taskwarden.enqueue('a', max_attempts => 0)",
            "max_attempts",
        ),
        (
            "SELECT taskwarden.enqueue('a', unique_for => '1h')",
            "unique_key",
        ),
        (
            "SELECT taskwarden.enqueue('a', unique_key => 'k', unique_scope => 'sometimes')",
            "unique_scope",
        ),
    ] {
        let err = c.query_one(sql, &[]).await.unwrap_err();
        let db = err.as_db_error().unwrap();
        assert_eq!(db.code().code(), "22023", "{sql}: {db:?}");
        assert!(db.message().contains(says), "{sql}: {}", db.message());
    }
    let a: i64 = c
        .query_one("SELECT taskwarden.enqueue('a', unique_key => 'k')", &[])
        .await
        .unwrap()
        .get(0);
    let row = c
        .query_one(
            "SELECT task_id, duplicate FROM taskwarden.enqueue_detailed('a', unique_key => 'k')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, bool>(1)), (a, true));
    // No instance recorded a default yet: the column default.
    let max: i32 = c
        .query_one("SELECT max_attempts FROM tasks WHERE id = $1", &[&a])
        .await
        .unwrap()
        .get(0);
    assert_eq!(max, 3);
}
