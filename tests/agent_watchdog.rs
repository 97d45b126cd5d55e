//! Issue 18: the agents under the watchdog. Real processes and real PostgreSQL sessions,
//! against the built daemon: a tree over `memory_max`, `processes_max` or `cpu_time_max` is killed whole
//! (checked by a unique marker in argv) and its task fails naming the limit; an agent's
//! own sessions (psql, labelled by `PGAPPNAME`) show under its task in `/v1/status`, the
//! one idle in a transaction is terminated past the limit, none remains once the task
//! ends, a session of a task that is not running is terminated, and a session past
//! `session_max_age` is terminated and its task cancelled.

mod common;

use std::time::Duration;

use common::daemon::{Daemon, bounded, http_client, scrape};
use common::{TestDb, eventually, marked};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(30);

fn config(t: &TestDb, supervisor: &str, agents: &str) -> String {
    format!(
        "[database]\napplication_name = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n\
         [supervisor]\ninterval = \"300ms\"\n{supervisor}\n\
         [workers]\npoll_interval = \"200ms\"\nshutdown_grace = \"1s\"\n{agents}",
        t.application_name
    )
}

async fn submit(http: &reqwest::Client, base: &str, agent: &str) -> i64 {
    let r = http
        .post(format!("{base}/v1/tasks"))
        .json(&serde_json::json!({ "agent": agent, "max_attempts": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    r.json::<Value>().await.unwrap()["id"].as_i64().unwrap()
}

async fn task(http: &reqwest::Client, base: &str, id: i64) -> Value {
    http.get(format!("{base}/v1/tasks/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn ended(http: &reqwest::Client, base: &str, id: i64) -> Value {
    let mut last = Value::Null;
    for _ in 0..150 {
        last = task(http, base, id).await;
        if !matches!(last["status"].as_str(), Some("queued" | "running")) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("task {id} did not end: {last}");
}

/// The task's usage as `/v1/status` shows it while it runs here.
async fn usage(http: &reqwest::Client, base: &str, id: i64) -> Option<Value> {
    let s: Value = http
        .get(format!("{base}/v1/status"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    s["tasks"]["running_here"]
        .as_array()?
        .iter()
        .find(|t| t["task_id"] == id)
        .map(|t| t["usage"].clone())
}

/// Polls the task's usage until `ok` holds (true) or the limit passes (false); the last
/// reading either way.
async fn usage_until(
    http: &reqwest::Client,
    base: &str,
    id: i64,
    ok: impl Fn(&Value) -> bool,
) -> (bool, Option<Value>) {
    let until = std::time::Instant::now() + LIMIT;
    loop {
        let u = usage(http, base, id).await;
        if u.as_ref().is_some_and(&ok) {
            return (true, u);
        }
        if std::time::Instant::now() > until {
            return (false, u);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn marker() -> String {
    format!("TWAGENT{:08x}", rand::random::<u32>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_over_memory_max_or_processes_max_is_killed_whole_and_the_task_names_the_limit() {
    bounded(Duration::from_secs(120), async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let mem = marker();
        let procs = marker();
        let calm = marker();
        // A child that allocates 200 MiB and touches it, then sleeps; fifty sleeping shells;
        // a small tree that stays under both limits.
        let hog = format!(
            "python3 -c 'b = bytearray(200 << 20); import time; time.sleep(60)' {mem}_child; echo '{{}}'"
        );
        let fork = format!(
            "for i in $(seq 50); do sh -c 'sleep 60; :' {procs}_child & done; wait"
        );
        let small = format!("sh -c 'sleep 3; :' {calm}_child; echo '{{\"result\": 1}}'");
        let agents = format!(
            "[agents.hog]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", {hog:?}]\nmemory_max = \"100MiB\"\n\
             [agents.fork]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", {fork:?}]\nprocesses_max = 20\n\
             [agents.calm]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", {small:?}]\nmemory_max = \"100MiB\"\nprocesses_max = 20\n"
        );
        let url = t.url();
        let mut d = Daemon::start(
            dir.path(),
            &config(&t, "", &agents),
            &[("TASKWARDEN_DATABASE_URL", &url)],
        );
        let base = d.base_url();
        let http = http_client(Duration::from_secs(10));
        let calm_id = submit(&http, &base, "calm").await;
        // The calm tree is sampled while it runs: two processes (sh and its sleeping sh),
        // some memory.
        let (ok, seen) = usage_until(&http, &base, calm_id, |u| {
            u["processes"].as_u64() >= Some(2) && u["resident_memory_bytes"].as_u64() > Some(0)
        })
        .await;
        assert!(ok, "calm task's tree never sampled: {seen:?}");
        let hog_id = submit(&http, &base, "hog").await;
        let fork_id = submit(&http, &base, "fork").await;

        let h = ended(&http, &base, hog_id).await;
        assert_eq!(h["status"], "failed", "{h}");
        let err = h["error"].as_str().unwrap();
        assert!(err.contains("memory_max") && err.contains("MiB"), "{err}");
        let f = ended(&http, &base, fork_id).await;
        assert_eq!(f["status"], "failed", "{f}");
        let err = f["error"].as_str().unwrap();
        assert!(err.contains("processes_max 20"), "{err}");
        // Whole trees gone: nothing with either marker lives.
        for m in [&mem, &procs] {
            let m = format!("{m}_child");
            assert!(
                eventually(Duration::from_secs(10), || async { marked(&m).is_empty() }).await,
                "{m} still running: {:?}",
                marked(&m)
            );
        }
        // The calm task was left alone.
        let c = ended(&http, &base, calm_id).await;
        assert_eq!(c["status"], "succeeded", "{c}");

        let metrics = scrape(&http, &base).await;
        for line in [
            "taskwarden_agent_limits_hit_total{agent=\"hog\",limit=\"memory_max\"} 1",
            "taskwarden_agent_limits_hit_total{agent=\"fork\",limit=\"processes_max\"} 1",
            "taskwarden_tasks_finished_total{agent=\"hog\",outcome=\"over_limit\"} 1",
        ] {
            assert!(metrics.contains(line), "{line} missing:\n{metrics}");
        }
        assert!(metrics.contains("taskwarden_agent_cpu_seconds_total{agent=\"calm\"}"));
        common::promtool_check_metrics(&metrics);
        d.signal(nix::sys::signal::Signal::SIGTERM);
        d.wait_exit(LIMIT);
    })
    .await;
}

/// README: a tree past its agent's `cpu_time_max` is killed whole and its task fails with
/// outcome `over_limit`, naming the limit and the figure; a tree under it is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_over_cpu_time_max_is_killed_whole_and_the_task_names_the_limit() {
    bounded(Duration::from_secs(120), async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let spin = marker();
        let calm = marker();
        // A child that burns CPU until killed; a child that sleeps (next to no CPU time).
        let burn = format!("sh -c 'while :; do :; done' {spin}_child; echo '{{}}'");
        let small = format!("sh -c 'sleep 3; :' {calm}_child; echo '{{\"result\": 1}}'");
        let agents = format!(
            "[agents.spin]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", {burn:?}]\ncpu_time_max = \"1s\"\n\
             [agents.calm]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", {small:?}]\ncpu_time_max = \"1s\"\n"
        );
        let url = t.url();
        let mut d = Daemon::start(
            dir.path(),
            &config(&t, "", &agents),
            &[("TASKWARDEN_DATABASE_URL", &url)],
        );
        let base = d.base_url();
        let http = http_client(Duration::from_secs(10));
        let calm_id = submit(&http, &base, "calm").await;
        let spin_id = submit(&http, &base, "spin").await;

        let s = ended(&http, &base, spin_id).await;
        assert_eq!(s["status"], "failed", "{s}");
        let err = s["error"].as_str().unwrap();
        assert!(
            err.contains("CPU time") && err.contains("cpu_time_max 1.0s"),
            "{err}"
        );
        let m = format!("{spin}_child");
        assert!(
            eventually(Duration::from_secs(10), || async { marked(&m).is_empty() }).await,
            "{m} still running: {:?}",
            marked(&m)
        );
        let c = ended(&http, &base, calm_id).await;
        assert_eq!(c["status"], "succeeded", "{c}");

        let metrics = scrape(&http, &base).await;
        for line in [
            "taskwarden_agent_limits_hit_total{agent=\"spin\",limit=\"cpu_time_max\"} 1",
            "taskwarden_tasks_finished_total{agent=\"spin\",outcome=\"over_limit\"} 1",
        ] {
            assert!(metrics.contains(line), "{line} missing:\n{metrics}");
        }
        assert!(
            !metrics.contains("taskwarden_agent_limits_hit_total{agent=\"calm\""),
            "the calm tree was counted over a limit:\n{metrics}"
        );
        d.signal(nix::sys::signal::Signal::SIGTERM);
        d.wait_exit(LIMIT);
    })
    .await;
}

fn psql() -> String {
    common::replica::bindir().join("psql").display().to_string()
}

async fn agent_backends(c: &tokio_postgres::Client, id: i64) -> Vec<(i32, String)> {
    c.query(
        "SELECT pid, coalesce(state, '') FROM pg_stat_activity WHERE application_name = $1",
        &[&format!("taskwarden/task/{id}")],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_own_sessions_are_seen_held_to_the_rules_and_gone_with_the_task() {
    bounded(Duration::from_secs(120), async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let psql = psql();
        // Two sessions that sleep in a query and one left idle in a transaction, all
        // labelled by PGAPPNAME from the daemon; then the agent waits.
        let script = format!(
            "{psql} -X -q -d \"$TASKWARDEN_DATABASE_URL\" -c 'SELECT pg_sleep(60)' & \
             {psql} -X -q -d \"$TASKWARDEN_DATABASE_URL\" -c 'SELECT pg_sleep(60)' & \
             (echo 'BEGIN; SELECT 1;'; sleep 60) | {psql} -X -q -d \"$TASKWARDEN_DATABASE_URL\" >/dev/null & \
             sleep 60"
        );
        let agents = format!(
            "[agents.db]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", {script:?}]\ndb_sessions_max = 2\n"
        );
        let url = t.url();
        let mut d = Daemon::start(
            dir.path(),
            &config(&t, "agent_idle_in_transaction_max = \"2s\"", &agents),
            &[("TASKWARDEN_DATABASE_URL", &url)],
        );
        let base = d.base_url();
        let http = http_client(Duration::from_secs(10));
        let admin = t.admin().await;
        let id = submit(&http, &base, "db").await;

        // Three sessions under the task in /v1/status, one idle in a transaction.
        let (ok, seen) = usage_until(&http, &base, id, |u| {
            u["db_sessions"] == 3 && u["db_sessions_idle_in_transaction"] == 1
        })
        .await;
        assert!(
            ok,
            "status never showed three sessions: {seen:?} / {:?}",
            agent_backends(&admin, id).await
        );
        // Per agent: three sessions against a budget of two (the alert's two series).
        let metrics = scrape(&http, &base).await;
        for line in [
            "taskwarden_agent_db_sessions{agent=\"db\"} 3",
            "taskwarden_agent_db_sessions_max{agent=\"db\"} 2",
        ] {
            assert!(metrics.contains(line), "{line} missing:\n{metrics}");
        }
        let idle: Vec<i32> = agent_backends(&admin, id)
            .await
            .into_iter()
            .filter(|(_, s)| s == "idle in transaction")
            .map(|(p, _)| p)
            .collect();
        assert_eq!(idle.len(), 1);
        // Past agent_idle_in_transaction_max it is terminated; the others and the task go on.
        assert!(
            eventually(Duration::from_secs(15), || async {
                let now = agent_backends(&admin, id).await;
                !now.iter().any(|(p, _)| *p == idle[0]) && now.len() == 2
            })
            .await,
            "idle-in-transaction session not terminated: {:?}",
            agent_backends(&admin, id).await
        );
        assert_eq!(task(&http, &base, id).await["status"], "running");

        // The task ends (cancelled): none of its backends remains.
        let r = http
            .post(format!("{base}/v1/tasks/{id}/cancel"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(
            eventually(Duration::from_secs(10), || async {
                agent_backends(&admin, id).await.is_empty()
            })
            .await,
            "backends left after the task ended: {:?}",
            agent_backends(&admin, id).await
        );

        // A session that claims a task which is not running (an agent that crashed and
        // left its connection, or one on a host that lost its task) is terminated.
        let mut pg = t.pg.clone();
        pg.application_name(format!("taskwarden/task/{id}"));
        let (stray, conn) = pg.connect(tokio_postgres::NoTls).await.unwrap();
        let conn = tokio::spawn(conn);
        assert_eq!(agent_backends(&admin, id).await.len(), 1);
        assert!(
            eventually(Duration::from_secs(10), || async {
                agent_backends(&admin, id).await.is_empty()
            })
            .await,
            "a session of an ended task was left alone"
        );
        assert!(stray.simple_query("SELECT 1").await.is_err());
        let _ = conn.await;

        d.signal(nix::sys::signal::Signal::SIGTERM);
        d.wait_exit(LIMIT);
        let log = d.drain();
        assert!(
            log.contains("agent database session terminated") && log.contains("idle_in_transaction"),
            "{log}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_session_past_session_max_age_is_terminated_and_its_task_cancelled() {
    bounded(Duration::from_secs(120), async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let psql = psql();
        let script = format!(
            "{psql} -X -q -d \"$TASKWARDEN_DATABASE_URL\" -c 'SELECT pg_sleep(60)'; sleep 60"
        );
        let agents = format!(
            "[agents.holder]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", {script:?}]\n"
        );
        let url = t.url();
        let mut d = Daemon::start(
            dir.path(),
            &config(
                &t,
                "session_warn_age = \"1s\"\nsession_max_age = \"3s\"",
                &agents,
            ),
            &[("TASKWARDEN_DATABASE_URL", &url)],
        );
        let base = d.base_url();
        let http = http_client(Duration::from_secs(10));
        let admin = t.admin().await;
        let id = submit(&http, &base, "holder").await;
        assert!(
            eventually(LIMIT, || async {
                !agent_backends(&admin, id).await.is_empty()
            })
            .await,
            "the agent never opened its session"
        );
        let done = ended(&http, &base, id).await;
        assert_eq!(done["status"], "cancelled", "{done}");
        let err = done["error"].as_str().unwrap();
        assert!(
            err.contains("session_max_age") && err.contains("backend pid"),
            "{err}"
        );
        assert!(
            eventually(Duration::from_secs(10), || async {
                agent_backends(&admin, id).await.is_empty()
            })
            .await
        );
        d.signal(nix::sys::signal::Signal::SIGTERM);
        d.wait_exit(LIMIT);
        let log = d.drain();
        let line = log
            .lines()
            .find(|l| l.contains("agent session past session_max_age"))
            .unwrap_or_else(|| panic!("no log line:\n{log}"));
        assert!(line.contains(&format!("task_id={id}")), "{line}");
        assert!(
            log.lines()
                .any(|l| l.contains("agent session open past session_warn_age")),
            "{log}"
        );
    })
    .await;
}
