//! Retention (issue 16): the leader's run deletes exactly the finished tasks past the age
//! of their final status — and their events — in bounded statements; objectives only as
//! a whole; statuses kept forever, unfinished tasks and young ones stay.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use common::{TestDb, eventually};
use taskwarden::config::Config;
use taskwarden::db::Db;
use taskwarden::metrics::{self as m, Metrics};
use taskwarden::orchestrator::registry::RunningTasks;
use taskwarden::orchestrator::{Orchestrator, OrchestratorParts};
use taskwarden::store::{Store, TaskStatus};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

struct Rig {
    t: TestDb,
    orch: Orchestrator,
    config: Arc<ArcSwap<Config>>,
    metrics: Metrics,
    shutdown: CancellationToken,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn rig(retention: &str) -> Rig {
    let t = TestDb::new().await;
    let text =
        format!("[workers]\nlease = \"1s\"\npoll_interval = \"200ms\"\n[retention]\n{retention}");
    let mut cfg = Config::parse(&text).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
    cfg.database = t.config(4, 0, Duration::from_secs(5));
    let metrics = Metrics::new();
    let db = Db::new(t.pg.clone(), &cfg.database, &metrics).unwrap();
    let store = Store::new(db.clone(), cfg.workers.max_attempts);
    let config = Arc::new(ArcSwap::from_pointee(cfg));
    let shutdown = CancellationToken::new();
    let orch = Orchestrator::new(OrchestratorParts {
        config: Arc::clone(&config),
        pg: t.pg.clone(),
        db,
        store,
        running: RunningTasks::new(),
        hub: Default::default(),
        metrics: metrics.clone(),
        instance_id: format!("test-{}", t.name),
        shutdown: shutdown.clone(),
        tasks: TaskTracker::new(),
        extra_agents: BTreeMap::new(),
    });
    Rig {
        t,
        orch,
        config,
        metrics,
        shutdown,
    }
}

/// Inserts a task with `status`, finished `finished_min` minutes ago (None: not
/// finished), in `objective`, with two events. Returns its id.
async fn task(
    c: &tokio_postgres::Client,
    status: &str,
    finished_min: Option<f64>,
    objective: Option<i64>,
    key: &str,
) -> i64 {
    // One statement: a leader running retention meanwhile must not delete the task
    // between its insert and its events'.
    c.query_one(
        "WITH t AS ( \
           INSERT INTO tasks (agent, status, objective_id, step_key, created_at, run_after, \
             started_at, finished_at) \
           VALUES ('a', $1, $2, CASE WHEN $2::bigint IS NULL THEN NULL ELSE $3 END, \
             now() - interval '20 years', now() - interval '20 years', \
             CASE WHEN $1 = 'queued' THEN NULL ELSE now() - interval '20 years' END, \
             now() - make_interval(secs => $4::float8 * 60)) RETURNING id), \
         e AS (INSERT INTO task_events (task_id, kind) \
           SELECT id, k FROM t, (VALUES ('one'), ('two')) AS v(k)) \
         SELECT id FROM t",
        &[&status, &objective, &key, &finished_min],
    )
    .await
    .unwrap()
    .get(0)
}

async fn objective(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        "INSERT INTO objectives (title, created_at) VALUES ('o', now() - interval '20 years') RETURNING id",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

async fn ids(c: &tokio_postgres::Client, sql: &str) -> BTreeSet<i64> {
    c.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

const AGES: &str = "succeeded = \"1h\"\nfailed = \"2h\"\ncancelled = \"3h\"\ntimed_out = \"0\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_exactly_what_is_past_its_age() {
    let r = rig(&format!("{AGES}batch_size = 2\nmax_batches = 1\n")).await;
    let c = r.t.admin().await;
    let mut gone = BTreeSet::new();
    let mut kept = BTreeSet::new();
    // Per status with an age: two just past it, one just inside it (a minute either side).
    for (status, age_min) in [("succeeded", 60.0), ("failed", 120.0), ("cancelled", 180.0)] {
        for _ in 0..2 {
            gone.insert(task(&c, status, Some(age_min + 1.0), None, "").await);
        }
        kept.insert(task(&c, status, Some(age_min - 1.0), None, "").await);
    }
    // Kept forever (timed_out = "0"), and never finished ones however old.
    kept.insert(task(&c, "timed_out", Some(10.0 * 365.0 * 24.0 * 60.0), None, "").await);
    kept.insert(task(&c, "queued", None, None, "").await);
    kept.insert(task(&c, "running", None, None, "").await);
    // Objectives: every step past its age (deleted whole); one step unfinished, one step
    // inside its age, one step kept forever (all three kept whole).
    let o_gone = objective(&c).await;
    gone.insert(task(&c, "succeeded", Some(120.0), Some(o_gone), "s1").await);
    gone.insert(task(&c, "failed", Some(180.0), Some(o_gone), "s2").await);
    let mut o_kept = Vec::new();
    for second in [
        ("queued", None),
        ("cancelled", Some(179.0)),
        ("timed_out", Some(1e6)),
    ] {
        let o = objective(&c).await;
        o_kept.push(o);
        kept.insert(task(&c, "succeeded", Some(120.0), Some(o), "s1").await);
        kept.insert(task(&c, second.0, second.1, Some(o), "s2").await);
    }

    // Bounded: one statement of two tasks.
    let first = r.orch.retention_once().await.unwrap();
    assert_eq!((first.statements, first.total()), (1, 2), "{first:?}");

    // Unbounded statements (still two tasks each): everything past its age goes.
    let mut cfg = (**r.config.load()).clone();
    cfg.retention.max_batches = 100;
    r.config.store(Arc::new(cfg));
    let rest = r.orch.retention_once().await.unwrap();
    assert!(rest.statements >= 4, "{rest:?}");
    let mut deleted = first.deleted.clone();
    for (s, n) in &rest.deleted {
        *deleted.entry(*s).or_insert(0) += n;
    }
    assert_eq!(
        deleted,
        BTreeMap::from([
            (TaskStatus::Succeeded, 3),
            (TaskStatus::Failed, 3),
            (TaskStatus::Cancelled, 2),
        ])
    );
    let left = ids(&c, "SELECT id FROM tasks").await;
    assert_eq!(left, kept, "deleted {:?}", gone.difference(&left));
    // Events went with their tasks, and only with them.
    let with_events = ids(&c, "SELECT DISTINCT task_id FROM task_events").await;
    assert_eq!(with_events, kept);
    let n: i64 = c
        .query_one("SELECT count(*) FROM task_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2 * kept.len() as i64);
    // The objective went whole; the others stayed.
    let objectives = ids(&c, "SELECT id FROM objectives").await;
    assert_eq!(objectives, o_kept.iter().copied().collect());
    for (status, n) in [
        ("succeeded", 3.0),
        ("failed", 3.0),
        ("cancelled", 2.0),
        ("timed_out", 0.0),
    ] {
        assert_eq!(
            r.metrics
                .value(m::TASKS_DELETED_TOTAL, &[("status", status)]),
            Some(n),
            "{status}"
        );
    }
    // Nothing more to do.
    let again = r.orch.retention_once().await.unwrap();
    assert_eq!(again.total(), 0, "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_runs_retention_every_interval() {
    let r = rig(&format!("{AGES}interval = \"200ms\"\n")).await;
    let c = r.t.admin().await;
    r.orch.start();
    let young = task(&c, "succeeded", Some(30.0), None, "").await;
    // Inserted while the leader runs: gone within a few intervals.
    for _ in 0..3 {
        let old = task(&c, "succeeded", Some(61.0), None, "").await;
        let deleted = eventually(Duration::from_secs(30), || async {
            ids(&c, "SELECT id FROM tasks").await == BTreeSet::from([young])
        })
        .await;
        assert!(
            deleted,
            "task {old} past its age was not deleted by the leader"
        );
    }
    assert_eq!(
        r.metrics
            .value(m::TASKS_DELETED_TOTAL, &[("status", "succeeded")]),
        Some(3.0)
    );
}
