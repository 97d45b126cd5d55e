//! Two daemon processes on one database: claims never double-run a task, and a SIGKILLed
//! instance's tasks are re-queued when their lease expires and finished by the other.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::daemon::Daemon;
use common::{TestDb, eventually};
use nix::sys::signal::Signal;

const READY: &str = "taskwarden ready";
const LIMIT: Duration = Duration::from_secs(120);

fn config(t: &TestDb, log: &Path, script: &str) -> String {
    let script = script.replace("LOG", log.to_str().unwrap());
    format!(
        "[database]\napplication_name = {:?}\npool_size = 6\nmax_overflow = 2\n\
         [workers]\nconcurrency = 8\nlease = \"2s\"\npoll_interval = \"200ms\"\n\
         [agents.rec]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", {script:?}]\nconcurrency = 8\n",
        t.application_name
    )
}

/// How many times each payload number appears in the log the agent appends to.
fn counts(log: &Path) -> BTreeMap<i64, usize> {
    let mut m = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line)
            && let Some(n) = v["n"].as_i64()
        {
            *m.entry(n).or_insert(0) += 1;
        }
    }
    m
}

async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

fn start(dir: &Path, cfg: &str, url: &str) -> Daemon {
    let mut d = Daemon::start(dir, cfg, &[("TASKWARDEN_DATABASE_URL", url)]);
    let ready = d.wait_for(READY, LIMIT);
    assert!(ready.is_some(), "never ready:\n{}", d.output());
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_run_two_thousand_tasks_each_exactly_once() {
    let t = TestDb::new().await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let log = da.path().join("log");
    // One write per line: concurrent appends of whole lines do not interleave.
    let cfg = config(&t, &log, "read p; echo \"$p\" >> LOG");
    let url = t.url();
    let (mut a, mut b) = tokio::task::block_in_place(|| {
        (start(da.path(), &cfg, &url), start(db.path(), &cfg, &url))
    });

    let c = t.admin().await;
    c.batch_execute("INSERT INTO tasks (agent, payload) SELECT 'rec', jsonb_build_object('n', i) FROM generate_series(1, 2000) i")
        .await
        .unwrap();
    let done = eventually(Duration::from_secs(300), || async {
        count(&c, "SELECT count(*) FROM tasks WHERE status = 'succeeded'").await == 2000
    })
    .await;
    assert!(
        done,
        "not all succeeded: {}",
        count(&c, "SELECT count(*) FROM tasks WHERE status <> 'succeeded'").await
    );
    let seen = counts(&log);
    assert_eq!(seen.len(), 2000);
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "run more than once: {twice:?}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM tasks WHERE attempts <> 1").await,
        0
    );
    assert_eq!(count(&c, "SELECT count(*) FROM instances").await, 2);

    for d in [&a, &b] {
        d.signal(Signal::SIGTERM);
    }
    tokio::task::block_in_place(|| {
        assert!(a.wait_exit(LIMIT).success(), "{}", a.output());
        assert!(b.wait_exit(LIMIT).success(), "{}", b.output());
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_instances_tasks_are_finished_by_the_other() {
    let t = TestDb::new().await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let log = da.path().join("log");
    // Read the payload, work for a while, then record completion.
    let cfg = config(&t, &log, "read p; sleep 1; echo \"$p\" >> LOG");
    let url = t.url();
    let (a, mut b) = tokio::task::block_in_place(|| {
        (start(da.path(), &cfg, &url), start(db.path(), &cfg, &url))
    });

    let c = t.admin().await;
    c.batch_execute("INSERT INTO tasks (agent, payload) SELECT 'rec', jsonb_build_object('n', i) FROM generate_series(1, 120) i")
        .await
        .unwrap();
    // Kill A while it holds running tasks.
    let a_pid = a.child.id();
    let a_busy = eventually(Duration::from_secs(60), || async {
        let sql = format!(
            "SELECT count(*) FROM tasks WHERE status = 'running' AND lease_owner LIKE '%:{a_pid}:%'"
        );
        count(&c, &sql).await >= 4
    })
    .await;
    assert!(a_busy, "instance A never ran anything");
    a.signal(Signal::SIGKILL);
    drop(a);

    let done = eventually(Duration::from_secs(300), || async {
        count(&c, "SELECT count(*) FROM tasks WHERE status = 'succeeded'").await == 120
    })
    .await;
    assert!(
        done,
        "not all succeeded: {}",
        count(&c, "SELECT count(*) FROM tasks WHERE status <> 'succeeded'").await
    );
    // A's interrupted tasks were re-queued after their lease expired and run again by B...
    assert!(
        count(
            &c,
            "SELECT count(*) FROM tasks WHERE attempts = 2 AND error LIKE 'lease expired%'"
        )
        .await
            >= 4
    );
    // ...and nothing completed twice: the killed agents died with their daemon.
    let seen = counts(&log);
    assert_eq!(seen.len(), 120);
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "completed more than once: {twice:?}");

    b.signal(Signal::SIGTERM);
    tokio::task::block_in_place(|| assert!(b.wait_exit(LIMIT).success(), "{}", b.output()));
}
