//! Resident memory of a daemon (in-process, wired by `Parts::start` as `taskwarden run`
//! does, with the default config: pool, supervisor, orchestrator and their loops): idle, with 10,000 queued tasks, and with 1,000 tasks running at once
//! (workers.concurrency = 1,000, an agent that sleeps 30 s; the reading is taken only when
//! all 1,000 are running, here and in the database).
//!
//! Run: `cargo bench --bench memory` (starts its own throwaway PostgreSQL).

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{count, database, orchestrator, rss_bytes};

const RUNNING: usize = 1000;
/// Long enough that the first task started is still running when the last one starts.
const TASK_TIME: Duration = Duration::from_secs(30);

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let b = database().await;
    let c = &b.admin;
    let before = rss_bytes();
    let run = orchestrator(&b.pg, Some(RUNNING as u32), "wait", TASK_TIME).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_bytes();
    // Queued work lives in PostgreSQL, not in the daemon: tasks for an agent it does not run.
    c.batch_execute(
        "INSERT INTO taskwarden.tasks (agent) SELECT 'elsewhere' FROM generate_series(1, 10000)",
    )
    .await
    .expect("queue");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let queued = rss_bytes();
    let started = Instant::now();
    c.batch_execute(&format!(
        "INSERT INTO taskwarden.tasks (agent) SELECT 'wait' FROM generate_series(1, {RUNNING})"
    ))
    .await
    .expect("queue");
    // Wait until every one of them runs; the first ones end after TASK_TIME, so the
    // reading must come before that.
    while run.orchestrator.running_here() < RUNNING {
        assert!(
            started.elapsed() < TASK_TIME - Duration::from_secs(5),
            "only {} of {RUNNING} tasks running after {:?}",
            run.orchestrator.running_here(),
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let here_before = run.orchestrator.running_here();
    let with_running = rss_bytes();
    let here_after = run.orchestrator.running_here();
    let in_db = count(
        c,
        "SELECT count(*) FROM taskwarden.tasks WHERE status = 'running'",
    )
    .await;
    assert_eq!(
        (here_before, here_after, in_db),
        (RUNNING, RUNNING, RUNNING as i64),
        "not all {RUNNING} running at the reading"
    );
    assert!(
        started.elapsed() < TASK_TIME,
        "the reading came after the first tasks could have ended"
    );
    println!("== resident memory of the bench process (daemon in-process, default config)");
    println!(
        "before the daemon started           {:>8.1} MiB",
        mib(before)
    );
    println!("daemon idle                         {:>8.1} MiB", mib(idle));
    println!(
        "10,000 tasks queued                 {:>8.1} MiB",
        mib(queued)
    );
    println!(
        "{here_before:>5} tasks running at once          {:>8.1} MiB  ({:.1} KiB per running task over the queued reading; running here {here_before}/{here_after}, in the database {in_db})",
        mib(with_running),
        (with_running.saturating_sub(queued)) as f64 / 1024.0 / RUNNING as f64
    );
    let deadline = Instant::now() + TASK_TIME * 4;
    while count(
        c,
        "SELECT count(*) FROM taskwarden.tasks WHERE status = 'succeeded'",
    )
    .await
        < RUNNING as i64
    {
        assert!(
            Instant::now() < deadline,
            "the running tasks did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run.stop().await.expect("stop");
    b.cluster.stop().await;
}
