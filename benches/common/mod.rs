//! Shared by the benchmarks: a throwaway PostgreSQL and an in-process orchestrator with
//! library agents, so figures measure taskwarden and the database, not process spawning.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

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

pub async fn database() -> Bench {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::start(
        dir.path(),
        ClusterOptions {
            unsafe_fast: false,
            max_connections: Some(200),
            ..Default::default()
        },
    )
    .await
    .expect("start PostgreSQL");
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

pub struct Running {
    pub orch: Orchestrator,
    pub db: Db,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Running {
    pub async fn stop(self) {
        self.orch.stop_claiming();
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.db.close();
    }
}

/// Starts an orchestrator with the daemon's defaults (`Config::default()`: pool, lease,
/// intervals) except `workers.concurrency` when given; its library agent `name` waits
/// `wait` per task and may run as many tasks at once as the workers do (an embedding
/// program sets a library agent's concurrency itself).
pub fn orchestrator(
    pg: &tokio_postgres::Config,
    concurrency: Option<u32>,
    name: &str,
    wait: Duration,
) -> Running {
    let mut cfg = Config::default();
    if let Some(c) = concurrency {
        cfg.workers.concurrency = c;
    }
    orchestrator_with(pg, cfg, name, wait)
}

/// [`orchestrator`] with a config of the caller's.
pub fn orchestrator_with(
    pg: &tokio_postgres::Config,
    cfg: Config,
    name: &str,
    wait: Duration,
) -> Running {
    let concurrency = cfg.workers.concurrency;
    let metrics = Metrics::new();
    let db = Db::new(pg.clone(), &cfg.database, &metrics).expect("pool");
    let store = Store::new(db.clone(), cfg.workers.max_attempts);
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
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
    let orch = Orchestrator::new(OrchestratorParts {
        config: Arc::new(ArcSwap::from_pointee(cfg)),
        pg: pg.clone(),
        db: db.clone(),
        store,
        running: RunningTasks::new(),
        hub: EventHub::default(),
        metrics,
        instance_id: format!("bench-{name}"),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
        extra_agents: extra,
    });
    orch.start();
    Running {
        orch,
        db,
        shutdown,
        tasks,
    }
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
