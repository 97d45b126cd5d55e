//! Resident memory of a daemon (an in-process orchestrator with its pool and loops): idle,
//! with 10,000 queued tasks, and with 1,000 tasks running at once.
//!
//! Run: `cargo bench --bench memory` (starts its own throwaway PostgreSQL).

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use common::{count, database, orchestrator, rss_bytes};

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let b = database().await;
    let c = &b.admin;
    let before = rss_bytes();
    let run = orchestrator(&b.pg, 1000, "wait", Duration::from_secs(5));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_bytes();
    // Queued work lives in PostgreSQL, not in the daemon: tasks for an agent it does not run.
    c.batch_execute("INSERT INTO tasks (agent) SELECT 'elsewhere' FROM generate_series(1, 10000)")
        .await
        .expect("queue");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let queued = rss_bytes();
    c.batch_execute("INSERT INTO tasks (agent) SELECT 'wait' FROM generate_series(1, 1000)")
        .await
        .expect("queue");
    let mut peak_running = 0;
    let mut with_running = 0;
    for _ in 0..200 {
        let n = run.orch.running_here();
        if n > peak_running {
            peak_running = n;
            with_running = rss_bytes();
        }
        if n == 1000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("== resident memory of the bench process (daemon in-process)");
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
        "{peak_running:>5} no-op tasks running at once    {:>8.1} MiB  ({:.1} KiB per running task over idle)",
        mib(with_running),
        (with_running.saturating_sub(queued)) as f64 / 1024.0 / peak_running.max(1) as f64
    );
    while count(c, "SELECT count(*) FROM tasks WHERE status = 'succeeded'").await < 1000 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run.stop().await;
    b.cluster.stop().await;
}
