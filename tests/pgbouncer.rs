//! Behind a real pgbouncer (Debian's 1.18, stock settings apart from the pool mode): two
//! daemons in transaction mode, with and without `direct_url`, run every task exactly once,
//! do the leader's duties, serve the API, and log no error.

mod common;

use std::path::Path;
use std::time::Duration;

use common::daemon::{Daemon, http_client, submit_task};
use common::pgbouncer::PgBouncer;
use common::{TestDb, count, eventually, payload_counts};
use nix::sys::signal::Signal;

const READY: &str = "taskwarden ready";
const LIMIT: Duration = Duration::from_secs(120);
const TASKS: i64 = 2000;
/// Submitted over the API (through the pooler) on top of the bulk insert.
const API_TASKS: i64 = 40;

fn config(t: &TestDb, log: &Path, pooler: &str, direct_url: Option<&str>) -> String {
    let script = format!("read p; echo \"$p\" >> {}", log.display());
    let direct = direct_url
        .map(|u| format!("direct_url = {u:?}\n"))
        .unwrap_or_default();
    format!(
        "[database]\napplication_name = {:?}\npool_size = 6\nmax_overflow = 2\n\
         pooler = {pooler:?}\n{direct}\
         [supervisor]\ninterval = \"500ms\"\n\
         [workers]\nconcurrency = 8\nlease = \"2s\"\npoll_interval = \"200ms\"\n\
         [agents.rec]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", {script:?}]\nconcurrency = 8\n",
        t.application_name
    )
}

fn error_lines(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| {
            l.contains(" ERROR ")
                || l.contains("\"level\":\"ERROR\"")
                || l.contains("db error")
                || l.contains("database error")
        })
        .collect()
}

async fn two_daemons_through(pool_mode: &str, pooler: &str, with_direct_url: bool) {
    let t = TestDb::new().await;
    let bouncer = PgBouncer::start(&t.pg, pool_mode);
    let url = bouncer.url(&t.pg, &t.name);
    let direct = with_direct_url.then(|| t.url());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (log_a, log_b) = (da.path().join("log"), db.path().join("log"));
    let cfg_a = config(&t, &log_a, pooler, direct.as_deref());
    let cfg_b = config(&t, &log_b, pooler, direct.as_deref());

    // A task an instance that no longer exists was running: its lease ran out a minute
    // ago, so the leader must re-queue it and someone must run it again.
    let c = t.admin().await;
    c.batch_execute(&format!(
        "INSERT INTO tasks (agent, payload, status, attempts, started_at, lease_owner, lease_expires_at) \
         VALUES ('rec', jsonb_build_object('n', {}), 'running', 1, now() - interval '2 minutes', \
                 'ghost:1:gone', now() - interval '1 minute')",
        TASKS + 1
    ))
    .await
    .unwrap();

    let start = |dir: &Path, cfg: &str| {
        let mut d = Daemon::start(dir, cfg, &[("TASKWARDEN_DATABASE_URL", url.as_str())]);
        let ready = d.wait_for(READY, LIMIT);
        assert!(
            ready.is_some(),
            "never ready:\n{}\npgbouncer:\n{}",
            d.output(),
            bouncer.log()
        );
        d
    };
    let (mut a, mut b) =
        tokio::task::block_in_place(|| (start(da.path(), &cfg_a), start(db.path(), &cfg_b)));

    // API writes go through the pooler too.
    let http = http_client(Duration::from_secs(10));
    let (base_a, base_b) = (a.base_url(), b.base_url());
    for n in 1..=API_TASKS {
        let base = if n % 2 == 0 { &base_a } else { &base_b };
        submit_task(&http, base, "rec", serde_json::json!({ "n": n }))
            .await
            .unwrap_or_else(|| panic!("submit {n} through pgbouncer refused\n{}", a.drain()));
    }
    c.batch_execute(&format!(
        "INSERT INTO tasks (agent, payload) SELECT 'rec', jsonb_build_object('n', i) \
         FROM generate_series({}, {TASKS}) i",
        API_TASKS + 1
    ))
    .await
    .unwrap();

    let total = TASKS + 1;
    let done = eventually(Duration::from_secs(300), || async {
        count(&c, "SELECT count(*) FROM tasks WHERE status = 'succeeded'").await == total
    })
    .await;
    assert!(
        done,
        "not all succeeded: {} left\nA:\n{}\nB:\n{}",
        count(&c, "SELECT count(*) FROM tasks WHERE status <> 'succeeded'").await,
        a.drain(),
        b.drain()
    );
    let (by_a, by_b) = (payload_counts(&log_a), payload_counts(&log_b));
    println!("daemon A ran {} tasks, daemon B {}", by_a.len(), by_b.len());
    assert!(
        !by_a.is_empty() && !by_b.is_empty(),
        "one daemon ran nothing"
    );
    let mut seen = by_a.clone();
    for (n, k) in &by_b {
        *seen.entry(*n).or_insert(0) += k;
    }
    let missing: Vec<i64> = (1..=total).filter(|n| !seen.contains_key(n)).collect();
    assert!(missing.is_empty(), "never ran: {missing:?}");
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "run more than once: {twice:?}");
    // Only the abandoned task took a second attempt, and the leader's re-queue said why.
    let requeued: Vec<(i64, i32, Option<String>)> = c
        .query(
            "SELECT (payload->>'n')::bigint, attempts, error FROM tasks WHERE attempts <> 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(requeued.len(), 1, "{requeued:?}");
    assert_eq!((requeued[0].0, requeued[0].1), (total, 2), "{requeued:?}");

    // The status page (the supervisor's view and live reads) works through the pooler.
    let status = http
        .get(format!("{base_a}/v1/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(status.status(), 200);
    let ready = http.get(format!("{base_b}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "{}", ready.text().await.unwrap());

    for d in [&a, &b] {
        d.signal(Signal::SIGTERM);
    }
    tokio::task::block_in_place(|| {
        assert!(a.wait_exit(LIMIT).success(), "{}", a.output());
        assert!(b.wait_exit(LIMIT).success(), "{}", b.output());
    });
    for (name, d) in [("A", &a), ("B", &b)] {
        let out = d.output();
        let errors = error_lines(&out);
        assert!(
            errors.is_empty(),
            "daemon {name} logged errors:\n{}",
            errors.join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_without_direct_url_runs_every_task_once() {
    two_daemons_through("transaction", "transaction", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_with_direct_url_runs_every_task_once() {
    two_daemons_through("transaction", "transaction", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_runs_every_task_once() {
    two_daemons_through("session", "session", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_through_a_transaction_pooler_apply_once() {
    // An empty database behind pgbouncer in transaction mode: the migration lock must be
    // transaction-scoped (a session lock would stay behind on a server connection) and
    // every statement unnamed.
    let t = TestDb::new_unmigrated().await;
    let bouncer = PgBouncer::start(&t.pg, "transaction");
    let pg: tokio_postgres::Config = bouncer.url(&t.pg, &t.name).parse().unwrap();
    let mut cfg = t.config(1, 0, Duration::from_secs(5));
    cfg.pooler = taskwarden::config::Pooler::Transaction;
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let (pg, cfg) = (pg.clone(), cfg.clone());
            tokio::spawn(async move { taskwarden::db::migrate::run(&pg, &cfg).await })
        })
        .collect();
    let mut appliers = 0;
    for r in runs {
        let report = tokio::time::timeout(Duration::from_secs(120), r)
            .await
            .expect("a migration run hung")
            .unwrap()
            .unwrap_or_else(|e| {
                panic!("migration through pgbouncer failed: {e}\n{}", bouncer.log())
            });
        assert_eq!(report.latest, taskwarden::db::migrate::latest_version());
        appliers += usize::from(!report.applied.is_empty());
    }
    assert_eq!(appliers, 1, "migrations applied by {appliers} runs");
    let c = t.admin().await;
    // Every migration file once, the latest last (versions need not be contiguous).
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".sql"))
        })
        .count() as i64;
    let (versions, latest): (i64, Option<i32>) = c
        .query_one(
            "SELECT count(*), max(version) FROM refinery_schema_history",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(versions, files);
    assert_eq!(latest, Some(taskwarden::db::migrate::latest_version()));
    // No advisory lock is left behind on any server connection.
    let locks: i64 = c
        .query_one(
            // pg_locks is server-wide: other tests take the same key in their databases.
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(locks, 0);
}
