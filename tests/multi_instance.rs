//! Two daemon processes on one database: claims never double-run a task, and a SIGKILLed
//! instance's tasks are re-queued when their lease expires and finished by the other.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::daemon::Daemon;
use common::{TestDb, count, eventually, payload_counts};
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
    // Each daemon's agents append to a log of their own, so the logs say who ran what.
    // One write per line: concurrent appends of whole lines do not interleave.
    let (log_a, log_b) = (da.path().join("log"), db.path().join("log"));
    let script = "read p; echo \"$p\" >> LOG";
    let (cfg_a, cfg_b) = (config(&t, &log_a, script), config(&t, &log_b, script));
    let url = t.url();
    let (mut a, mut b) = tokio::task::block_in_place(|| {
        (
            start(da.path(), &cfg_a, &url),
            start(db.path(), &cfg_b, &url),
        )
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
    let (by_a, by_b) = (payload_counts(&log_a), payload_counts(&log_b));
    println!("daemon A ran {} tasks, daemon B {}", by_a.len(), by_b.len());
    // Both daemons took part...
    assert!(!by_a.is_empty(), "daemon A never ran a task");
    assert!(!by_b.is_empty(), "daemon B never ran a task");
    // ...and between them every task ran exactly once.
    let mut seen = by_a.clone();
    for (n, k) in &by_b {
        *seen.entry(*n).or_insert(0) += k;
    }
    let missing: Vec<i64> = (1..=2000).filter(|n| !seen.contains_key(n)).collect();
    assert!(missing.is_empty(), "never ran: {missing:?}");
    assert_eq!(seen.len(), 2000, "payloads outside 1..=2000 ran");
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
    let (log_a, log_b) = (da.path().join("log"), db.path().join("log"));
    // Read the payload, work for a while, then record completion (per daemon).
    let script = "read p; sleep 1; echo \"$p\" >> LOG";
    let (cfg_a, cfg_b) = (config(&t, &log_a, script), config(&t, &log_b, script));
    let url = t.url();
    let (mut a, mut b) = tokio::task::block_in_place(|| {
        (
            start(da.path(), &cfg_a, &url),
            start(db.path(), &cfg_b, &url),
        )
    });

    let c = t.admin().await;
    c.batch_execute("INSERT INTO tasks (agent, payload) SELECT 'rec', jsonb_build_object('n', i) FROM generate_series(1, 120) i")
        .await
        .unwrap();
    // Kill A while it holds running tasks.
    let a_pid = a.child.id();
    let a_running = format!(
        "SELECT (payload->>'n')::bigint FROM tasks WHERE status = 'running' AND lease_owner LIKE '%:{a_pid}:%'"
    );
    let a_busy = eventually(Duration::from_secs(60), || async {
        c.query(&a_running, &[]).await.unwrap().len() >= 4
    })
    .await;
    assert!(a_busy, "instance A never ran anything");
    a.signal(Signal::SIGKILL);
    tokio::task::block_in_place(|| a.wait_exit(LIMIT));
    // What A had in flight at the kill, read as soon as it is dead: its leases are still
    // in force (they were renewed until the kill), so no other instance has touched them.
    let in_flight: BTreeSet<i64> = c
        .query(&a_running, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(in_flight.len() >= 4, "{in_flight:?}");
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
    // A's interrupted tasks, and only those, were re-queued after their lease expired and
    // run again, in a second attempt...
    let reclaimed: BTreeSet<i64> = c
        .query(
            &format!(
                "SELECT (payload->>'n')::bigint FROM tasks WHERE attempts = 2 \
                 AND error LIKE 'lease expired (held by %:{a_pid}:%'"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        reclaimed, in_flight,
        "re-queued vs in flight on A at the kill"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM tasks WHERE attempts <> 1").await,
        in_flight.len() as i64,
        "a task not in flight on A took more than one attempt"
    );
    // ...finished by B...
    let (by_a, by_b) = (payload_counts(&log_a), payload_counts(&log_b));
    let not_by_b: Vec<&i64> = in_flight.iter().filter(|n| !by_b.contains_key(n)).collect();
    assert!(
        not_by_b.is_empty(),
        "in flight on A, never finished by B: {not_by_b:?}"
    );
    // ...and every task completed, a repeat (at-least-once, docs/job-queue.md, "Delivery semantics")
    // only for one A had in flight at the kill: its program may have finished just before
    // the kill, with the outcome not yet written.
    let mut seen = by_a.clone();
    for (n, k) in &by_b {
        *seen.entry(*n).or_insert(0) += k;
    }
    let missing: Vec<i64> = (1..=120).filter(|n| !seen.contains_key(n)).collect();
    assert!(missing.is_empty(), "never completed: {missing:?}");
    assert_eq!(seen.len(), 120);
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    for (n, k) in &twice {
        assert!(
            in_flight.contains(n),
            "task {n} completed {k} times but was not in flight on A at the kill"
        );
        assert_eq!(**k, 2, "task {n} completed {k} times");
        assert_eq!(by_a.get(n), Some(&1), "task {n} repeated within one daemon");
    }
    println!(
        "in flight on A at the kill: {in_flight:?}; completed twice: {:?}",
        twice.iter().map(|(n, _)| **n).collect::<Vec<_>>()
    );

    b.signal(Signal::SIGTERM);
    tokio::task::block_in_place(|| assert!(b.wait_exit(LIMIT).success(), "{}", b.output()));
}
