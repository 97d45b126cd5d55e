//! End-to-end task throughput: no-op tasks run by the orchestrator, next to a plain-SQL
//! loop on the same database in the same run (a batched `FOR UPDATE SKIP LOCKED` claim of
//! 100 plus one completing `UPDATE`, with no daemon around it). Every contender, the
//! baseline included, starts from the same state: the table truncated, refilled with N
//! queued rows and `VACUUM ANALYZE`d.
//!
//! Run: `cargo bench --bench throughput` (starts its own throwaway PostgreSQL).
//! `TASKWARDEN_BENCH_TASKS` sets N (default 100,000); `TASKWARDEN_BENCH_QUICK=1` runs
//! only the baselines and the defaults (for profiling one change at a time).

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/common/pgbouncer.rs"]
mod pgbouncer;

use std::time::{Duration, Instant};

use common::{
    count, database, orchestrator, orchestrator_with, print_statements, reset_statements,
};

/// N when `TASKWARDEN_BENCH_TASKS` is not set.
const DEFAULT_TASKS: i64 = 100_000;

async fn enqueue(c: &tokio_postgres::Client, n: i64) -> Duration {
    let t = Instant::now();
    let mut left = n;
    while left > 0 {
        let batch = left.min(1000);
        c.execute(
            "INSERT INTO taskwarden.tasks (agent, payload) SELECT 'noop', jsonb_build_object('i', i) FROM generate_series(1, $1::bigint) i",
            &[&batch],
        )
        .await
        .expect("enqueue");
        left -= batch;
    }
    t.elapsed()
}

/// The same starting point for every contender: an empty table refilled with `n` queued
/// rows, vacuumed and analyzed. Returns the time the refill (the enqueue) took.
async fn prepare(c: &tokio_postgres::Client, n: i64) -> Duration {
    c.batch_execute("TRUNCATE tasks CASCADE")
        .await
        .expect("truncate");
    let took = enqueue(c, n).await;
    c.batch_execute("VACUUM ANALYZE taskwarden.tasks")
        .await
        .expect("vacuum analyze");
    took
}

/// Waits until `run` has recorded `n` successes, read from its own metrics: the counter
/// moves only once a completion is committed, and reading it costs the database nothing.
/// (Counting the table every 20 ms instead cost PostgreSQL ~13 µs per task at N = 100,000,
/// a quarter of a core the baselines, which never poll, did not pay.)
async fn wait_finished(run: &taskwarden::daemon::Parts, n: i64) {
    loop {
        let done = run
            .metrics
            .value(
                taskwarden::metrics::TASKS_FINISHED_TOTAL,
                &[("outcome", "succeeded")],
            )
            .unwrap_or(0.0);
        if done >= n as f64 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn succeeded(c: &tokio_postgres::Client) -> i64 {
    count(
        c,
        "SELECT count(*) FROM taskwarden.tasks WHERE status = 'succeeded'",
    )
    .await
}

async fn baseline(c: &tokio_postgres::Client, n: i64) -> Duration {
    let t = Instant::now();
    let mut done = 0i64;
    while done < n {
        let rows = c
            .query(
                "WITH c AS (SELECT id FROM taskwarden.tasks WHERE status = 'queued' AND run_after <= now() \
                   ORDER BY priority DESC, run_after, id LIMIT 100 FOR UPDATE SKIP LOCKED) \
                 UPDATE taskwarden.tasks t SET status = 'running', attempts = attempts + 1, started_at = now(), \
                   lease_owner = 'baseline', lease_expires_at = now() + interval '30s' \
                 FROM c WHERE t.id = c.id RETURNING t.id",
                &[],
            )
            .await
            .expect("claim");
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        if ids.is_empty() {
            break;
        }
        c.execute(
            "UPDATE taskwarden.tasks SET status = 'succeeded', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .expect("complete");
        done += ids.len() as i64;
    }
    t.elapsed()
}

/// The plain-SQL loop on `conns` connections at once, until every task succeeded.
async fn baseline_on(pg: &tokio_postgres::Config, n: i64, conns: usize) -> Duration {
    let mut clients = Vec::new();
    for _ in 0..conns {
        let (client, conn) = pg.connect(tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(conn);
        clients.push(client);
    }
    let t = Instant::now();
    let runs: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(async move { baseline(&c, n).await }))
        .collect();
    for r in runs {
        r.await.expect("baseline connection");
    }
    t.elapsed()
}

async fn orchestrated(
    pg: &tokio_postgres::Config,
    c: &tokio_postgres::Client,
    n: i64,
    concurrency: Option<u32>,
) -> Duration {
    let before = succeeded(c).await;
    let started: f64 = c
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .await
        .expect("clock")
        .get(0);
    let t = Instant::now();
    let run = orchestrator(pg, concurrency, "noop", Duration::ZERO).await;
    wait_finished(&run, n).await;
    let took = t.elapsed();
    run.stop().await.expect("stop");
    assert_eq!(
        succeeded(c).await - before,
        n,
        "tasks reported finished are not succeeded"
    );
    let first: f64 = c
        .query_one(
            "SELECT extract(epoch FROM min(started_at))::float8 - $1 FROM taskwarden.tasks",
            &[&started],
        )
        .await
        .expect("first start")
        .get(0);
    println!(
        "  (first task started {:.0} ms after the start)",
        first * 1e3
    );
    took
}

/// Where the database's write-transaction counter (the next transaction id: only a
/// transaction that writes takes one) and its WAL stood.
struct Mark {
    xid: i64,
    lsn: String,
}

async fn mark(c: &tokio_postgres::Client) -> Mark {
    let r = c
        .query_one(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint, pg_current_wal_lsn()::text",
            &[],
        )
        .await
        .expect("mark");
    Mark {
        xid: r.get(0),
        lsn: r.get(1),
    }
}

/// Write transactions per 1,000 tasks and WAL bytes per task since `m`.
async fn cost(c: &tokio_postgres::Client, m: &Mark, n: i64) -> String {
    let r = c
        .query_one(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint - $1, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), $2::text::pg_lsn)::float8",
            &[&m.xid, &m.lsn],
        )
        .await
        .expect("cost");
    let (xacts, wal): (i64, f64) = (r.get(0), r.get(1));
    format!(
        "{:>6.1} write tx/1000 tasks {:>7.0} WAL B/task",
        xacts as f64 * 1000.0 / n as f64,
        wal / n as f64
    )
}

fn rate(n: i64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: i64 = std::env::var("TASKWARDEN_BENCH_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_TASKS);
    let b = database().await;
    let (pg, c) = (&b.pg, &b.admin);
    let defaults = taskwarden::config::Config::default();

    println!(
        "== throughput: {n} no-op tasks, same database, same run; before each contender the \
         table is truncated, refilled and VACUUM ANALYZEd"
    );
    let e1 = prepare(c, n).await;
    reset_statements(c).await;
    let m = mark(c).await;
    let base = baseline(c, n).await;
    let base_cost = cost(c, &m, n).await;
    // Checked before the next prepare truncates the table.
    assert_eq!(
        succeeded(c).await,
        n,
        "the 1-connection baseline did not finish every task"
    );
    print_statements(c).await;
    prepare(c, n).await;
    let m4 = mark(c).await;
    let base4 = baseline_on(pg, n, 4).await;
    let base4_cost = cost(c, &m4, n).await;
    assert_eq!(
        succeeded(c).await,
        n,
        "the 4-connection baseline did not finish every task"
    );
    println!(
        "{:<52} {:>10.0} tasks/s",
        "enqueue (batches of 1000)",
        rate(n, e1)
    );
    println!(
        "{:<52} {:>10.0} tasks/s  (baseline)  {base_cost}",
        "plain SQL claim 100 + complete, 1 connection",
        rate(n, base)
    );
    println!(
        "{:<52} {:>10.0} tasks/s  (baseline 4)  {base4_cost}",
        "plain SQL claim 100 + complete, 4 connections",
        rate(n, base4)
    );
    let quick = std::env::var_os("TASKWARDEN_BENCH_QUICK").is_some();
    let contenders: &[Option<u32>] = if quick { &[None] } else { &[None, Some(100)] };
    for &conc in contenders {
        prepare(c, n).await;
        reset_statements(c).await;
        let m = mark(c).await;
        let orch = orchestrated(pg, c, n, conc).await;
        let spent = cost(c, &m, n).await;
        let label = match conc {
            None => format!(
                "defaults (concurrency {}, pool {}+{})",
                defaults.workers.concurrency,
                defaults.database.pool_size,
                defaults.database.max_overflow
            ),
            Some(k) => format!("concurrency {k}"),
        };
        println!(
            "{:<52} {:>10.0} tasks/s  ({:.2} of baseline, {:.2} of baseline 4)  {spent}",
            format!("taskwarden, {label}"),
            rate(n, orch),
            base.as_secs_f64() / orch.as_secs_f64(),
            base4.as_secs_f64() / orch.as_secs_f64()
        );
        print_statements(c).await;
    }
    if quick {
        drop(b.admin);
        b.cluster.stop().await;
        return;
    }

    // The defaults again, through pgbouncer in transaction mode (unnamed statements, SET
    // LOCAL per transaction, polling instead of LISTEN), next to the direct figure above.
    if std::path::Path::new("/usr/sbin/pgbouncer").exists() {
        let bouncer = pgbouncer::PgBouncer::start(pg, "transaction");
        let dbname = pg.get_dbname().unwrap_or("taskwarden");
        let via: tokio_postgres::Config = bouncer.url(pg, dbname).parse().expect("pgbouncer url");
        for direct_url in [false, true] {
            prepare(c, n).await;
            let mut cfg = taskwarden::config::Config::default();
            cfg.database.pooler = taskwarden::config::Pooler::Transaction;
            let mut label = "taskwarden, defaults, via pgbouncer transaction mode".to_string();
            if direct_url {
                cfg.database.direct_url = cluster_url(pg);
                label.push_str(" + direct_url");
            }
            let before = succeeded(c).await;
            let m = mark(c).await;
            let t = Instant::now();
            let run = orchestrator_with(&via, cfg, "noop", Duration::ZERO).await;
            wait_finished(&run, n).await;
            let took = t.elapsed();
            run.stop().await.expect("stop");
            assert_eq!(
                succeeded(c).await - before,
                n,
                "tasks reported finished are not succeeded"
            );
            let spent = cost(c, &m, n).await;
            println!(
                "{:<52} {:>10.0} tasks/s  ({:.2} of baseline, {:.2} of baseline 4)  {spent}",
                label,
                rate(n, took),
                base.as_secs_f64() / took.as_secs_f64(),
                base4.as_secs_f64() / took.as_secs_f64()
            );
        }
    } else {
        println!("(pgbouncer not installed: no pooler figures)");
    }

    println!("\n== enqueue-to-start latency (started_at - created_at), default config");
    c.batch_execute("TRUNCATE tasks CASCADE")
        .await
        .expect("truncate");
    let run = orchestrator(pg, None, "noop", Duration::ZERO).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..300 {
        c.execute("INSERT INTO taskwarden.tasks (agent) VALUES ('noop')", &[])
            .await
            .expect("insert");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while succeeded(c).await < 300 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    print_latency(c, "idle workers (LISTEN/NOTIFY), 300 tasks").await;
    run.stop().await.expect("stop");
    c.batch_execute("TRUNCATE tasks CASCADE")
        .await
        .expect("truncate");
    c.batch_execute("VACUUM ANALYZE taskwarden.tasks")
        .await
        .expect("vacuum analyze");
    // A running, idle daemon; then 10,000 tasks arrive in one INSERT.
    let run = orchestrator(pg, None, "noop", Duration::ZERO).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.batch_execute(
        "INSERT INTO taskwarden.tasks (agent, payload) SELECT 'noop', jsonb_build_object('i', i) FROM generate_series(1, 10000) i",
    )
    .await
    .expect("backlog");
    // While the backlog drains, 20 higher-priority tasks arrive one by one: each should
    // start after at most what was already claimed ahead, not after the whole backlog.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..20 {
        c.execute(
            "INSERT INTO taskwarden.tasks (agent, priority) VALUES ('noop', 10)",
            &[],
        )
        .await
        .expect("insert");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while succeeded(c).await < 10_020 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    print_latency_of(
        c,
        &format!(
            "10,000-task backlog, concurrency {}",
            defaults.workers.concurrency
        ),
        "priority = 0",
    )
    .await;
    print_latency_of(
        c,
        "  20 higher-priority tasks arriving during it",
        "priority = 10",
    )
    .await;
    run.stop().await.expect("stop");
    drop(b.admin);
    b.cluster.stop().await;
}

/// A libpq URL for the bench cluster itself (for `direct_url`).
fn cluster_url(pg: &tokio_postgres::Config) -> String {
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        None => "localhost".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgresql://{}@/{}?host={host}&port={port}",
        pg.get_user().unwrap_or("postgres"),
        pg.get_dbname().unwrap_or("taskwarden")
    )
}

async fn print_latency(c: &tokio_postgres::Client, label: &str) {
    print_latency_of(c, label, "true").await
}

/// p50/p99 of `started_at - created_at` over the succeeded tasks matching `filter` (SQL).
async fn print_latency_of(c: &tokio_postgres::Client, label: &str, filter: &str) {
    let r = c
        .query_one(
            &format!(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at)), \
                        percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at)) \
                 FROM taskwarden.tasks WHERE status = 'succeeded' AND {filter}"
            ),
            &[],
        )
        .await
        .expect("latency");
    let (p50, p99): (f64, f64) = (r.get(0), r.get(1));
    println!(
        "{label:<52} p50 {:>9.2} ms   p99 {:>9.2} ms",
        p50 * 1e3,
        p99 * 1e3
    );
}
