//! Watchdog cost, measured against baselines in the same run on the same database:
//!
//! 1. session-guard checkout (tracker registration, metrics, return) against a plain
//!    deadpool-postgres checkout of the same server, with pre-ping on and off, and with
//!    one `SELECT 1` per checkout;
//! 2. one supervisor tick with no sessions, with 10,000 open tracked sessions, and with
//!    10,000 sessions plus 10,000 running tasks.
//!
//! Run: `cargo bench --bench watchdog` (starts its own throwaway PostgreSQL; set
//! TASKWARDEN_BENCH_CHECKOUTS to change the checkout count). Figures are medians of
//! interleaved rounds; compare ratios, not absolute numbers, on a shared machine.

#[path = "common/mod.rs"]
mod common;

use std::panic::Location;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use deadpool_postgres::{ManagerConfig, RecyclingMethod};
use taskwarden::alerts::Alerts;
use taskwarden::config::{Config, DatabaseConfig};
use taskwarden::db::tracker::NewSession;
use taskwarden::db::{Db, session_settings};
use taskwarden::metrics::Metrics;
use taskwarden::orchestrator::registry::RunningTasks;
use taskwarden::supervisor::Supervisor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const ROUNDS: usize = 5;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn plain_pool(pg: &tokio_postgres::Config, cfg: &DatabaseConfig) -> deadpool_postgres::Pool {
    let mut pg = pg.clone();
    session_settings(&mut pg, cfg);
    let recycling_method = if cfg.pre_ping {
        RecyclingMethod::Verified
    } else {
        RecyclingMethod::Fast
    };
    let mgr = deadpool_postgres::Manager::from_config(
        pg,
        tokio_postgres::NoTls,
        ManagerConfig { recycling_method },
    );
    deadpool_postgres::Pool::builder(mgr)
        .max_size(cfg.max_connections())
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(cfg.checkout_timeout.get()))
        .build()
        .expect("plain pool")
}

async fn bench_checkout(
    pg: &tokio_postgres::Config,
    pre_ping: bool,
    query: bool,
    n: usize,
) -> (Duration, Duration) {
    let cfg = DatabaseConfig {
        pool_size: 4,
        max_overflow: 0,
        pre_ping,
        ..DatabaseConfig::default()
    };
    let plain = plain_pool(pg, &cfg);
    let ours = Db::new(pg.clone(), &cfg, &Metrics::new()).expect("pool");
    // Warm both pools and their statement caches.
    for _ in 0..200 {
        let c = plain.get().await.expect("plain checkout");
        if query {
            let st = c.prepare_cached("SELECT 1").await.expect("prepare");
            c.query_one(&st, &[]).await.expect("query");
        }
        let s = ours.session("bench.checkout").await.expect("checkout");
        if query {
            s.query_one("SELECT 1", &[]).await.expect("query");
        }
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..n {
            let c = plain.get().await.expect("plain checkout");
            if query {
                let st = c.prepare_cached("SELECT 1").await.expect("prepare");
                c.query_one(&st, &[]).await.expect("query");
            }
        }
        a.push(t.elapsed() / n as u32);
        let t = Instant::now();
        for _ in 0..n {
            let s = ours.session("bench.checkout").await.expect("checkout");
            if query {
                s.query_one("SELECT 1", &[]).await.expect("query");
            }
        }
        b.push(t.elapsed() / n as u32);
    }
    (median(a), median(b))
}

async fn tick_time(sup: &mut Supervisor, rounds: usize) -> Duration {
    let mut v = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        sup.tick().await.expect("tick");
        v.push(t.elapsed());
    }
    median(v)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("TASKWARDEN_BENCH_CHECKOUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let bench = common::database().await;
    let pg = bench.pg.clone();

    println!(
        "== session checkout: taskwarden guard vs plain deadpool-postgres ({n} checkouts x {ROUNDS} rounds, median per checkout)"
    );
    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "case", "plain", "guard", "ratio"
    );
    for (label, pre_ping, query) in [
        ("checkout, pre_ping on", true, false),
        ("checkout, pre_ping off", false, false),
        ("checkout + SELECT 1, pre_ping off", false, true),
    ] {
        let (plain, ours) = bench_checkout(&pg, pre_ping, query, n).await;
        println!(
            "{:<34} {:>10.2}us {:>10.2}us {:>7.3}x",
            label,
            plain.as_secs_f64() * 1e6,
            ours.as_secs_f64() * 1e6,
            ours.as_secs_f64() / plain.as_secs_f64()
        );
    }

    println!("\n== supervisor tick (median of 21 ticks)");
    let config = Arc::new(ArcSwap::from_pointee(Config::default()));
    let metrics = Metrics::new();
    let db = Db::new(pg.clone(), &config.load().database, &metrics).expect("pool");
    let tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    let alerts = Alerts::new(
        metrics.clone(),
        Arc::clone(&config),
        &tasks,
        shutdown.clone(),
    );
    let mut sup = Supervisor::new(
        Arc::clone(&config),
        pg.clone(),
        db.clone(),
        RunningTasks::new(),
        alerts,
        metrics,
    );
    sup.tick().await.expect("warm-up tick");
    let empty = tick_time(&mut sup, 21).await;

    let tracker = Arc::clone(db.tracker());
    let ids: Vec<u64> = (0..10_000)
        .map(|i| {
            tracker
                .register(NewSession {
                    caller: Location::caller(),
                    label: "bench.fake",
                    backend_pid: 1_000_000 + i,
                    owner: None,
                    capture_backtrace: false,
                })
                .id
        })
        .collect();
    let with_sessions = tick_time(&mut sup, 21).await;

    bench
        .admin
        .batch_execute(
            "INSERT INTO taskwarden.tasks (agent, status, attempts, started_at, lease_owner, lease_expires_at) \
             SELECT 'bench', 'running', 1, now(), 'bench', now() + interval '1 hour' FROM generate_series(1, 10000); \
             INSERT INTO taskwarden.tasks (agent) SELECT 'bench' FROM generate_series(1, 10000); ANALYZE taskwarden.tasks;",
        )
        .await
        .expect("seed tasks");
    let with_tasks = tick_time(&mut sup, 21).await;
    for id in ids {
        tracker.unregister(id);
    }
    println!(
        "{:<52} {:>10.2}ms",
        "no sessions, empty tasks table",
        empty.as_secs_f64() * 1e3
    );
    println!(
        "{:<52} {:>10.2}ms  ({:.2}x empty)",
        "10,000 open tracked sessions",
        with_sessions.as_secs_f64() * 1e3,
        with_sessions.as_secs_f64() / empty.as_secs_f64()
    );
    println!(
        "{:<52} {:>10.2}ms  ({:.2}x empty)",
        "10,000 sessions + 10,000 running + 10,000 queued tasks",
        with_tasks.as_secs_f64() * 1e3,
        with_tasks.as_secs_f64() / empty.as_secs_f64()
    );
    println!(
        "tick interval default: 5000ms; the tick's share of one core at 10k/10k: {:.3}%",
        with_tasks.as_secs_f64() / 5.0 * 100.0
    );
    shutdown.cancel();
    drop(db);
    drop(bench.admin);
    bench.cluster.stop().await;
}
