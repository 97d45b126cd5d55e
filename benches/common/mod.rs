//! Shared by the benchmarks: a throwaway PostgreSQL and an in-process taskwarden, wired as
//! the daemon wires it, with library agents, so figures measure taskwarden and the
//! database, not process spawning.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use taskwarden::agents::{Agent, AgentEntry, AgentError, AgentOutput, BoxFuture, TaskContext};
use taskwarden::config::{Config, DatabaseConfig};
use taskwarden::daemon::Parts;
use taskwarden::db::embedded::{Cluster, ClusterOptions};

/// An agent that waits `0` (no-op) or a fixed time.
pub struct Wait(pub Duration);
impl Agent for Wait {
    fn run(&self, _ctx: TaskContext) -> BoxFuture<Result<AgentOutput, AgentError>> {
        let d = self.0;
        Box::pin(async move {
            if !d.is_zero() {
                tokio::time::sleep(d).await;
            }
            Ok(AgentOutput::default())
        })
    }
}

pub struct Bench {
    pub cluster: Cluster,
    pub pg: tokio_postgres::Config,
    pub admin: tokio_postgres::Client,
    _dir: tempfile::TempDir,
}

/// The bench cluster: default durability (fsync and synchronous_commit on).
async fn start_cluster(dir: &std::path::Path) -> Cluster {
    let opts = ClusterOptions {
        unsafe_fast: false,
        max_connections: Some(200),
        ..Default::default()
    };
    Cluster::start(dir, opts).await.expect("start PostgreSQL")
}

/// One statement as the cluster's superuser, on a connection of its own.
async fn run_sql(cluster: &Cluster, sql: &str) {
    let (c, conn) = cluster
        .pg_config("taskwarden")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    c.batch_execute(sql).await.expect(sql);
}

pub async fn database() -> Bench {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = start_cluster(dir.path()).await;
    let cluster = if statements_enabled() {
        with_statement_stats(cluster, dir.path()).await
    } else {
        cluster
    };
    let pg = cluster.pg_config("taskwarden");
    taskwarden::db::migrate::run(&pg, &DatabaseConfig::default())
        .await
        .expect("migrate");
    let (admin, conn) = pg.connect(tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    Bench {
        cluster,
        pg,
        admin,
        _dir: dir,
    }
}

/// Starts taskwarden as the daemon wires it (`Parts::start`: pool, supervisor,
/// orchestrator and their loops; no HTTP listener) with the daemon's defaults
/// (`Config::default()`) except `workers.concurrency` when given; its library agent `name`
/// waits `wait` per task and may run as many tasks at once as the workers do (an embedding
/// program sets a library agent's concurrency itself). Stop it with `Parts::stop`.
pub async fn orchestrator(
    pg: &tokio_postgres::Config,
    concurrency: Option<u32>,
    name: &str,
    wait: Duration,
) -> Parts {
    let mut cfg = Config::default();
    if let Some(c) = concurrency {
        cfg.workers.concurrency = c;
    }
    orchestrator_with(pg, cfg, name, wait).await
}

/// [`orchestrator`] with a config of the caller's.
pub async fn orchestrator_with(
    pg: &tokio_postgres::Config,
    cfg: Config,
    name: &str,
    wait: Duration,
) -> Parts {
    let concurrency = cfg.workers.concurrency;
    let mut extra = BTreeMap::new();
    extra.insert(
        name.to_string(),
        AgentEntry {
            agent: Arc::new(Wait(wait)),
            concurrency: concurrency as usize,
            timeout: Duration::from_secs(600),
            planner: false,
        },
    );
    Parts::start(pg.clone(), Arc::new(ArcSwap::from_pointee(cfg)), extra)
        .await
        .expect("start taskwarden")
}

pub async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.expect("count").get(0)
}

/// Resident memory of this process, from /proc.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// `TASKWARDEN_BENCH_STATEMENTS=1`: the cluster loads pg_stat_statements, and the benches
/// print what each contender's statements cost (calls, rows, time).
pub fn statements_enabled() -> bool {
    std::env::var_os("TASKWARDEN_BENCH_STATEMENTS").is_some()
}

async fn with_statement_stats(cluster: Cluster, dir: &std::path::Path) -> Cluster {
    run_sql(
        &cluster,
        "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'",
    )
    .await;
    cluster.stop().await;
    let cluster = start_cluster(dir).await;
    run_sql(
        &cluster,
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
    )
    .await;
    cluster
}

/// Forgets the statement statistics so far (with `TASKWARDEN_BENCH_STATEMENTS`).
pub async fn reset_statements(c: &tokio_postgres::Client) {
    if statements_enabled() {
        c.batch_execute("SELECT pg_stat_statements_reset()")
            .await
            .expect("reset statements");
    }
}

/// Prints the statements run since the last reset, most total time first (with
/// `TASKWARDEN_BENCH_STATEMENTS`).
pub async fn print_statements(c: &tokio_postgres::Client) {
    if !statements_enabled() {
        return;
    }
    let rows = c
        .query(
            "SELECT calls, rows, total_exec_time, left(regexp_replace(query, '\\s+', ' ', 'g'), 110) \
             FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat_statements%' \
             ORDER BY total_exec_time DESC LIMIT 12",
            &[],
        )
        .await
        .expect("statements");
    println!("    {:>8} {:>9} {:>9}  statement", "calls", "rows", "ms");
    for r in rows {
        let (calls, n, ms, q): (i64, i64, f64, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
        println!("    {calls:>8} {n:>9} {ms:>9.0}  {q}");
    }
}
