//! Load and fault tests, bounded in count and time, loopback only: pool exhaustion storm,
//! PostgreSQL restart mid-load, SIGKILL and restart, a storm of reloads.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::daemon::Daemon;
use common::{TestDb, eventually};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use taskwarden::db::embedded::{Cluster, ClusterOptions};

const LIMIT: Duration = Duration::from_secs(120);

/// Appends each payload line once per completed run.
const RECORDER: &str = "[agents.rec]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"read p; sleep 0.2; echo \\\"$p\\\" >> LOG\"]\nconcurrency = 8\n";

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

fn assert_exactly_once(log: &Path, n: i64) {
    let seen = counts(log);
    let missing: Vec<i64> = (1..=n).filter(|i| !seen.contains_key(i)).collect();
    let twice: Vec<_> = seen.iter().filter(|(_, c)| **c != 1).collect();
    assert!(missing.is_empty(), "never completed: {missing:?}");
    assert!(twice.is_empty(), "completed more than once: {twice:?}");
}

async fn submit_all(http: &reqwest::Client, base: &str, n: i64) {
    for i in 1..=n {
        let r = http
            .post(format!("{base}/v1/tasks"))
            .json(&json!({"agent": "rec", "payload": {"n": i}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_500_requests_on_a_pool_of_5_gets_answers_and_leaves_nothing_checked_out() {
    let t = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[database]\napplication_name = {:?}\npool_size = 5\nmax_overflow = 0\ncheckout_timeout = \"1s\"\n\
         [agents.idle]\nkind = \"command\"\ncommand = [\"true\"]\n[workers]\nconcurrency = 1\n",
        t.application_name
    );
    let url = t.url();
    let mut d = Daemon::start(dir.path(), &config, &[("TASKWARDEN_DATABASE_URL", &url)]);
    let base = format!(
        "http://{}",
        tokio::task::block_in_place(|| d.addr()).expect("ready")
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();

    let health = {
        let http = http.clone();
        let base = base.clone();
        tokio::spawn(async move {
            let mut answers = 0;
            for _ in 0..40 {
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    http.get(format!("{base}/healthz")).send(),
                )
                .await;
                assert!(
                    matches!(&r, Ok(Ok(resp)) if resp.status() == 200),
                    "healthz did not answer: {r:?}"
                );
                answers += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            answers
        })
    };
    let reqs: Vec<_> = (0..500)
        .map(|i| {
            let http = http.clone();
            let base = base.clone();
            tokio::spawn(async move {
                let r = if i % 2 == 0 {
                    http.post(format!("{base}/v1/tasks"))
                        .json(&json!({"agent": "idle", "payload": {"i": i}}))
                        .send()
                        .await
                } else {
                    http.get(format!("{base}/v1/status")).send().await
                };
                let r = r.expect("no answer");
                let status = r.status().as_u16();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                (status, body)
            })
        })
        .collect();
    let mut ok = 0;
    let mut busy = 0;
    for r in reqs {
        let (status, body) = r.await.unwrap();
        match status {
            200 | 201 => ok += 1,
            503 => {
                busy += 1;
                assert!(
                    body["error"].as_str().unwrap_or("").contains("pool"),
                    "503 without the pool named: {body}"
                );
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(ok + busy, 500);
    assert!(ok > 0);
    assert_eq!(health.await.unwrap(), 40);
    // Afterwards nothing is left checked out.
    let drained = eventually(Duration::from_secs(30), || async {
        let v: Value = http
            .get(format!("{base}/v1/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["sessions"]["open"].as_u64() == Some(0) || v["pool"]["in_use"].as_u64() == Some(0)
    })
    .await;
    assert!(drained);
    println!("storm: {ok} answered with success, {busy} with 503 naming the pool");
    d.signal(Signal::SIGTERM);
    assert!(tokio::task::block_in_place(|| d.wait_exit(LIMIT)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_load_is_survived_and_every_task_completes_once() {
    // This test owns its server: it stops and starts it.
    let pgdir = tempfile::tempdir().unwrap();
    let opts = ClusterOptions {
        unsafe_fast: true,
        max_connections: Some(60),
    };
    let cluster = Cluster::start(pgdir.path(), opts.clone()).await.unwrap();
    let url = cluster.url("taskwarden");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let config = format!(
        "[database]\npool_size = 5\ncheckout_timeout = \"1s\"\nconnect_timeout = \"1s\"\n\
         [supervisor]\ninterval = \"200ms\"\n[workers]\nconcurrency = 8\nlease = \"3s\"\npoll_interval = \"200ms\"\n{}",
        RECORDER.replace("LOG", log.to_str().unwrap())
    );
    let mut d = Daemon::start(dir.path(), &config, &[("TASKWARDEN_DATABASE_URL", &url)]);
    let base = format!(
        "http://{}",
        tokio::task::block_in_place(|| d.addr()).unwrap_or_else(|| panic!("{}", d.output()))
    );
    let http = reqwest::Client::new();
    let ready = |http: reqwest::Client, base: String| async move {
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    assert!(
        eventually(Duration::from_secs(20), || async {
            ready(http.clone(), base.clone()).await == 200
        })
        .await
    );
    submit_all(&http, &base, 60).await;
    // Let some run, then stop the server under load.
    assert!(
        eventually(Duration::from_secs(30), || async {
            counts(&log).len() >= 5
        })
        .await
    );
    cluster.stop().await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            ready(http.clone(), base.clone()).await == 503
        })
        .await,
        "readyz never reported the database down"
    );
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cluster = Cluster::start(pgdir.path(), opts).await.unwrap();
    assert!(
        eventually(Duration::from_secs(60), || async {
            ready(http.clone(), base.clone()).await == 200
        })
        .await,
        "never ready again:\n{}",
        d.output()
    );
    let all = eventually(Duration::from_secs(120), || async {
        counts(&log).len() == 60
    })
    .await;
    assert!(all, "completed {} of 60", counts(&log).len());
    // Every task is recorded as succeeded exactly once.
    let done = eventually(Duration::from_secs(60), || async {
        let v: Value = http
            .get(format!("{base}/v1/tasks?status=succeeded&limit=1000"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["tasks"].as_array().map(|a| a.len()) == Some(60)
    })
    .await;
    assert!(done);
    assert_exactly_once(&log, 60);
    d.signal(Signal::SIGTERM);
    assert!(
        tokio::task::block_in_place(|| d.wait_exit(LIMIT)).success(),
        "{}",
        d.output()
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_and_restart_loses_nothing_and_repeats_only_what_was_in_flight() {
    let t = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let config = format!(
        "[database]\napplication_name = {:?}\n[workers]\nconcurrency = 8\nlease = \"2s\"\npoll_interval = \"200ms\"\n{}",
        t.application_name,
        RECORDER.replace("LOG", log.to_str().unwrap())
    );
    let url = t.url();
    let mut d = Daemon::start(dir.path(), &config, &[("TASKWARDEN_DATABASE_URL", &url)]);
    let base = format!(
        "http://{}",
        tokio::task::block_in_place(|| d.addr()).expect("ready")
    );
    let http = reqwest::Client::new();
    submit_all(&http, &base, 80).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            counts(&log).len() >= 10
        })
        .await
    );
    d.signal(Signal::SIGKILL);
    tokio::task::block_in_place(|| d.wait_exit(LIMIT));

    let mut d = Daemon::start(dir.path(), &config, &[("TASKWARDEN_DATABASE_URL", &url)]);
    tokio::task::block_in_place(|| d.addr()).expect("ready after restart");
    let c = t.admin().await;
    let all = eventually(Duration::from_secs(120), || async {
        let n: i64 = c
            .query_one("SELECT count(*) FROM tasks WHERE status = 'succeeded'", &[])
            .await
            .unwrap()
            .get(0);
        n == 80
    })
    .await;
    assert!(all, "not all succeeded after restart:\n{}", d.output());
    // Nothing lost: every task ran to completion. Delivery is at-least-once: a task whose
    // program had finished when the daemon died, but whose outcome was not yet written, runs
    // again after its lease expires. Only those in flight at the kill (at most the
    // concurrency, 8) may repeat, and each such one shows its second attempt.
    let seen = counts(&log);
    assert!(
        (1..=80).all(|i| seen.contains_key(&i)),
        "lost tasks: {seen:?}"
    );
    let repeated: Vec<i64> = seen
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, _)| *n)
        .collect();
    assert!(
        repeated.len() <= 8,
        "more repeats than were in flight: {repeated:?}"
    );
    for n in &repeated {
        let attempts: i32 = c
            .query_one(
                "SELECT attempts FROM tasks WHERE payload->>'n' = $1",
                &[&n.to_string()],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(attempts, 2, "task {n} repeated without a second attempt");
    }
    let once: i64 = c
        .query_one(
            "SELECT count(*) FROM tasks WHERE status = 'succeeded' AND finished_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(once, 80);
    d.signal(Signal::SIGTERM);
    assert!(tokio::task::block_in_place(|| d.wait_exit(LIMIT)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_while_tasks_run_lose_nothing_and_end_consistent() {
    let t = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let base_config = format!(
        "[database]\napplication_name = {:?}\n[workers]\nconcurrency = 8\npoll_interval = \"200ms\"\n{}\n[http]\nlisten = \"127.0.0.1:0\"\n",
        t.application_name,
        RECORDER.replace("LOG", log.to_str().unwrap())
    );
    let with_ratio = |r: f64| {
        format!("{base_config}[supervisor]\npool_alert_ratio = {r}\npool_clear_ratio = 0.5\n")
    };
    let url = t.url();
    let mut d = Daemon::start(
        dir.path(),
        &with_ratio(0.9),
        &[("TASKWARDEN_DATABASE_URL", &url)],
    );
    let base = format!(
        "http://{}",
        tokio::task::block_in_place(|| d.addr()).expect("ready")
    );
    let http = reqwest::Client::new();
    submit_all(&http, &base, 60).await;
    let cfg_path = dir.path().join("config.toml");
    let mut last = 0.0;
    for i in 0..50 {
        last = if i % 2 == 0 { 0.75 } else { 0.85 };
        std::fs::write(&cfg_path, with_ratio(last)).unwrap();
        d.signal(Signal::SIGHUP);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let all = eventually(Duration::from_secs(120), || async {
        counts(&log).len() == 60
    })
    .await;
    assert!(all, "completed {} of 60", counts(&log).len());
    assert_exactly_once(&log, 60);
    // The config in force is the last one written.
    let consistent = eventually(Duration::from_secs(10), || async {
        let v: Value = http
            .get(format!("{base}/v1/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["pool"]["alert_ratio"].as_f64() == Some(last)
    })
    .await;
    assert!(consistent);
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let ok = taskwarden::metrics::parse_value(
        &metrics,
        "taskwarden_config_reloads_total",
        &[("result", "ok")],
    )
    .unwrap();
    let err = taskwarden::metrics::parse_value(
        &metrics,
        "taskwarden_config_reloads_total",
        &[("result", "error")],
    )
    .unwrap();
    // Signals that arrive together are delivered once; none may fail.
    assert!((1.0..=50.0).contains(&ok), "{ok}");
    assert_eq!(err, 0.0);
    d.signal(Signal::SIGTERM);
    assert!(tokio::task::block_in_place(|| d.wait_exit(LIMIT)).success());
}
