//! End-to-end task throughput: no-op tasks run by the orchestrator, next to a plain-SQL
//! loop on the same database in the same run (a batched `FOR UPDATE SKIP LOCKED` claim of
//! 100 plus one completing `UPDATE`, with no daemon around it).
//!
//! Run: `cargo bench --bench throughput` (starts its own throwaway PostgreSQL).
//! `TASKWARDEN_BENCH_TASKS` sets N (default 20,000).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use taskwarden::agents::{
    Agent, AgentEntry, AgentError, AgentOutput, BoxFuture, EventHub, TaskContext,
};
use taskwarden::config::{Config, DatabaseConfig};
use taskwarden::db::Db;
use taskwarden::db::embedded::{Cluster, ClusterOptions};
use taskwarden::metrics::Metrics;
use taskwarden::orchestrator::registry::RunningTasks;
use taskwarden::orchestrator::{Orchestrator, OrchestratorParts};
use taskwarden::store::Store;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

struct Noop;
impl Agent for Noop {
    fn run(&self, _ctx: TaskContext) -> BoxFuture<Result<AgentOutput, AgentError>> {
        Box::pin(async { Ok(AgentOutput::default()) })
    }
}

async fn enqueue(c: &tokio_postgres::Client, n: i64) -> Duration {
    let t = Instant::now();
    let mut left = n;
    while left > 0 {
        let batch = left.min(1000);
        c.execute(
            "INSERT INTO tasks (agent, payload) SELECT 'noop', jsonb_build_object('i', i) FROM generate_series(1, $1::bigint) i",
            &[&batch],
        )
        .await
        .expect("enqueue");
        left -= batch;
    }
    t.elapsed()
}

async fn succeeded(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM tasks WHERE status = 'succeeded'", &[])
        .await
        .expect("count")
        .get(0)
}

async fn baseline(c: &tokio_postgres::Client, n: i64) -> Duration {
    let t = Instant::now();
    let mut done = 0i64;
    while done < n {
        let rows = c
            .query(
                "WITH c AS (SELECT id FROM tasks WHERE status = 'queued' AND run_after <= now() \
                   ORDER BY priority DESC, run_after, id LIMIT 100 FOR UPDATE SKIP LOCKED) \
                 UPDATE tasks t SET status = 'running', attempts = attempts + 1, started_at = now(), \
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
            "UPDATE tasks SET status = 'succeeded', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .expect("complete");
        done += ids.len() as i64;
    }
    t.elapsed()
}

async fn orchestrated(
    pg: &tokio_postgres::Config,
    c: &tokio_postgres::Client,
    n: i64,
    concurrency: u32,
) -> Duration {
    let mut cfg = Config::default();
    cfg.workers.concurrency = concurrency;
    cfg.database = DatabaseConfig {
        pool_size: 10,
        ..DatabaseConfig::default()
    };
    let metrics = Metrics::new();
    let db = Db::new(pg.clone(), &cfg.database, &metrics).expect("pool");
    let store = Store::new(db.clone(), 3);
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let running = RunningTasks::new();
    let mut extra = BTreeMap::new();
    extra.insert(
        "noop".to_string(),
        AgentEntry {
            agent: Arc::new(Noop),
            concurrency: concurrency as usize,
            timeout: Duration::from_secs(60),
            planner: false,
        },
    );
    let orch = Orchestrator::new(OrchestratorParts {
        config: Arc::new(ArcSwap::from_pointee(cfg)),
        pg: pg.clone(),
        db: db.clone(),
        store,
        running: Arc::clone(&running),
        hub: EventHub::default(),
        metrics,
        instance_id: "bench".into(),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
        extra_agents: extra,
    });
    let before = succeeded(c).await;
    let t = Instant::now();
    orch.start();
    while succeeded(c).await - before < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = t.elapsed();
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    db.close();
    took
}

fn rate(n: i64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: i64 = std::env::var("TASKWARDEN_BENCH_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::start(
        dir.path(),
        ClusterOptions {
            unsafe_fast: false,
            max_connections: Some(100),
        },
    )
    .await
    .expect("start PostgreSQL");
    let pg = cluster.pg_config("taskwarden");
    taskwarden::db::migrate::run(&pg, &DatabaseConfig::default())
        .await
        .expect("migrate");
    let (c, conn) = pg.connect(tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);

    println!("== {n} no-op tasks, same database, same run");
    let e1 = enqueue(&c, n).await;
    let base = baseline(&c, n).await;
    println!(
        "enqueue (batches of 1000)           {:>10.0} tasks/s",
        rate(n, e1)
    );
    println!(
        "plain SQL claim 100 + complete       {:>10.0} tasks/s  (baseline)",
        rate(n, base)
    );
    for conc in [10u32, 50, 100] {
        c.batch_execute("TRUNCATE tasks CASCADE")
            .await
            .expect("truncate");
        enqueue(&c, n).await;
        let orch = orchestrated(&pg, &c, n, conc).await;
        println!(
            "taskwarden, concurrency {conc:<3}         {:>10.0} tasks/s  ({:.2} of baseline)",
            rate(n, orch),
            base.as_secs_f64() / orch.as_secs_f64()
        );
    }
    drop(c);
    cluster.stop().await;
}
