//! The session guard and the pool against a real PostgreSQL: the seeds' leak and
//! exhaustion stories must not be reproducible.

mod common;

use std::time::Duration;

use common::{TestDb, eventually};
use taskwarden::db::{Db, DbError};
use taskwarden::store::{NewTask, Store, StoreError};

async fn task_count(t: &TestDb) -> i64 {
    t.admin()
        .await
        .query_one("SELECT count(*) FROM tasks", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn thousand_task_creations_on_a_pool_of_two_leave_nothing_checked_out() {
    let t = TestDb::new().await;
    let db = t.pool(2, 0, Duration::from_secs(5));
    let store = Store::new(db.clone(), 3);
    for i in 0..1000 {
        store
            .create_task(&NewTask::new("echo", serde_json::json!({ "i": i })))
            .await
            .unwrap_or_else(|e| panic!("creation {i} failed: {e}"));
    }
    let status = db.status();
    assert_eq!(status.in_use, 0, "{status}");
    assert!(status.size <= 2, "{status}");
    let counts = db.tracker().counts();
    assert_eq!(counts.open, 0);
    assert_eq!(counts.opened, 1000);
    assert_eq!(counts.closed, 1000);
    assert_eq!(task_count(&t).await, 1000);
    // The server agrees: never more than the pool's bound.
    assert!(t.backends().await.len() <= 2);
}

/// A function that fails half-way through a transaction, the way real code does: `?`.
async fn insert_then_fail(db: &Db) -> Result<(), DbError> {
    let mut s = db.session("test.insert_then_fail").await?;
    let tx = s.transaction().await?;
    tx.execute("INSERT INTO tasks (agent) VALUES ('half-written')", &[])
        .await?;
    tx.query_one("SELECT 1 / 0", &[]).await?;
    tx.commit().await
}

#[tokio::test]
async fn error_mid_transaction_leaves_no_row_and_returns_the_connection() {
    let t = TestDb::new().await;
    let db = t.pool(1, 0, Duration::from_secs(5));
    let pid_before = db.session("test.pid").await.unwrap().backend_pid();

    let err = insert_then_fail(&db).await.unwrap_err();
    assert!(
        err.sqlstate().is_some(),
        "expected a server error, got {err}"
    );
    assert_eq!(db.status().in_use, 0);
    assert_eq!(task_count(&t).await, 0);

    // The one connection came back clean: same backend, not stuck in an aborted transaction.
    let s = db.session("test.after").await.unwrap();
    assert_eq!(s.backend_pid(), pid_before);
    s.execute("INSERT INTO tasks (agent) VALUES ('ok')", &[])
        .await
        .unwrap();
    drop(s);
    assert_eq!(task_count(&t).await, 1);
}

#[tokio::test]
async fn a_transaction_abandoned_by_cancellation_is_rolled_back() {
    let t = TestDb::new().await;
    // The server's own statement_timeout and the client's query deadline are set far beyond
    // the test's waits, so only the cancel sent for the abandoned statement can end it in
    // time: without that cancel the pg_sleep(30) stays active past the 10 s check below.
    let mut cfg = t.config(1, 0, Duration::from_secs(5));
    cfg.statement_timeout = taskwarden::config::Dur::secs(120);
    cfg.query_timeout = taskwarden::config::Dur::secs(120);
    let db = Db::new(t.pg.clone(), &cfg, &taskwarden::metrics::Metrics::new()).unwrap();
    let work = {
        let db = db.clone();
        async move {
            let mut s = db.session("test.cancelled").await?;
            let tx = s.transaction().await?;
            tx.execute("INSERT INTO tasks (agent) VALUES ('never')", &[])
                .await?;
            tx.execute("SELECT pg_sleep(30)", &[]).await?;
            tx.commit().await
        }
    };
    let abandoned_pid = db.session("test.pid").await.unwrap().backend_pid();
    let admin = t.admin().await;
    let sleeping = || async {
        admin
            .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND query LIKE '%pg_sleep(30)%' AND state = 'active'", &[&abandoned_pid])
            .await
            .unwrap()
            .is_some()
    };
    // The work runs on its own until the server shows its statement executing inside the
    // open transaction; only then does the caller give up on it (a request timeout, a
    // cancelled task): the future is dropped mid-statement.
    let mut work = Box::pin(work);
    let seen_running = tokio::select! {
        r = &mut work => panic!("the work ended before it was abandoned: {r:?}"),
        seen = eventually(Duration::from_secs(20), || async { sleeping().await }) => seen,
    };
    assert!(
        seen_running,
        "the transaction's pg_sleep(30) never showed as active on backend {abandoned_pid}"
    );
    assert_eq!(db.status().in_use, 1);
    drop(work);
    assert_eq!(db.status().in_use, 0);
    // The abandoned statement is cancelled on the server, not left sleeping for 30 s...
    assert!(eventually(Duration::from_secs(10), || async { !sleeping().await }).await);
    // ...and its connection is not handed out again.
    let s = db.session("test.next").await.unwrap();
    assert_ne!(s.backend_pid(), abandoned_pid);
    let n: i64 = s
        .query_one("SELECT count(*) FROM tasks", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    assert_eq!(task_count(&t).await, 0);
}

#[tokio::test]
async fn checkout_timeout_is_a_typed_error_and_capacity_returns() {
    let t = TestDb::new().await;
    let db = t.pool(2, 0, Duration::from_millis(300));
    let a = db.session("test.hold_a").await.unwrap();
    let _b = db.session("test.hold_b").await.unwrap();

    // The error reports the configured timeout; the wait itself is measured here, so a
    // checkout that gave up early (or never gave up) fails the test.
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(30), db.session("test.starved"))
        .await
        .expect("a starved checkout must end with an error, not hang")
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300),
        "the checkout gave up after {elapsed:?}, before its 300ms checkout_timeout"
    );
    // Generous: only guards against a checkout that waits far beyond its timeout.
    assert!(
        elapsed < Duration::from_secs(20),
        "the checkout waited {elapsed:?} for a 300ms checkout_timeout"
    );
    match &err {
        DbError::CheckoutTimeout {
            label,
            pool,
            waited,
            ..
        } => {
            assert_eq!(*label, "test.starved");
            assert_eq!(pool.in_use, 2);
            assert_eq!(pool.max, 2);
            assert_eq!(*waited, Duration::from_millis(300));
        }
        other => panic!("expected CheckoutTimeout, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("in_use=2") && msg.contains("test.starved") && msg.contains("db_sessions.rs"),
        "{msg}"
    );

    drop(a);
    let s = db.session("test.after_return").await.unwrap();
    let one: i32 = s.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn pre_ping_replaces_connections_the_server_terminated() {
    let t = TestDb::new().await;
    let mut cfg = t.config(3, 0, Duration::from_secs(5));
    cfg.pre_ping = true;
    cfg.pre_ping_idle = taskwarden::config::Dur(Duration::from_millis(50));
    let db = Db::new(t.pg.clone(), &cfg, &taskwarden::metrics::Metrics::new()).unwrap();
    let held: Vec<_> = futures_join(&db, 3).await;
    let old_pids: Vec<i32> = held.iter().map(|s| s.backend_pid()).collect();
    drop(held);
    assert_eq!(db.status().idle, 3);

    // The backends are ended from another thread with a runtime of its own, and this
    // (current-thread) runtime is blocked meanwhile: the pool's connection tasks never run,
    // so the client has not read the server's goodbye and its socket still looks open.
    // Only a ping finds out (with `pre_ping = false` the checkout hands out a dead
    // connection and the query below fails). The wait also idles the connections well past
    // `pre_ping_idle`.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let admin = t.admin().await;
                    let killed: i64 = admin
                        .query_one(
                            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) \
                             FROM pg_stat_activity \
                             WHERE application_name = $1 AND pid <> pg_backend_pid()) k",
                            &[&t.application_name],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    assert_eq!(killed, 3);
                    assert!(
                        eventually(Duration::from_secs(10), || async {
                            t.backends().await.is_empty()
                        })
                        .await
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                });
            })
            .join()
            .unwrap();
    });

    let s = db.session("test.after_terminate").await.unwrap();
    let one: i32 = s
        .query_one("SELECT 1", &[])
        .await
        .expect("the checkout after the server ended every backend handed out a dead connection")
        .get(0);
    assert_eq!(one, 1);
    assert!(!old_pids.contains(&s.backend_pid()));
}

async fn futures_join(db: &Db, n: usize) -> Vec<taskwarden::db::Session> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(db.session("test.hold").await.unwrap());
    }
    v
}

#[tokio::test]
async fn overflow_connections_are_closed_when_returned() {
    let t = TestDb::new().await;
    let db = t.pool(1, 2, Duration::from_secs(5));
    let held = futures_join(&db, 3).await;
    assert_eq!(db.status().size, 3);
    assert_eq!(t.backends().await.len(), 3);
    drop(held);
    let st = db.status();
    assert_eq!((st.size, st.in_use, st.idle), (1, 0, 1), "{st}");
    assert!(
        eventually(Duration::from_secs(10), || async {
            t.backends().await.len() == 1
        })
        .await
    );
    // And the hard maximum holds: a fourth concurrent checkout waits and times out.
    let db = t.pool(1, 1, Duration::from_millis(200));
    let _held = futures_join(&db, 2).await;
    assert!(matches!(
        db.session("test.fourth").await,
        Err(DbError::CheckoutTimeout { .. })
    ));
}

#[tokio::test]
async fn every_connection_carries_the_configured_settings() {
    let t = TestDb::new().await;
    let mut cfg = t.config(3, 0, Duration::from_secs(5));
    cfg.statement_timeout = taskwarden::config::Dur::millis(1500);
    cfg.idle_in_transaction_timeout = taskwarden::config::Dur::secs(7);
    let db = Db::new(t.pg.clone(), &cfg, &taskwarden::metrics::Metrics::new()).unwrap();
    // The whole pool checked out at once: three distinct connections, each asked in turn.
    let held = futures_join(&db, 3).await;
    let mut pids: Vec<i32> = held.iter().map(|s| s.backend_pid()).collect();
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 3, "three checkouts, three backends: {pids:?}");
    for s in &held {
        let row = s
            .query_one(
                "SELECT current_setting('application_name'), current_setting('statement_timeout'), \
                 current_setting('idle_in_transaction_session_timeout'), pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        let pid = s.backend_pid();
        assert_eq!(row.get::<_, i32>(3), pid);
        assert_eq!(row.get::<_, String>(0), t.application_name, "backend {pid}");
        assert_eq!(row.get::<_, String>(1), "1500ms", "backend {pid}");
        assert_eq!(row.get::<_, String>(2), "7s", "backend {pid}");
        // statement_timeout is enforced by the server on every connection.
        let err = s.execute("SELECT pg_sleep(5)", &[]).await.unwrap_err();
        assert_eq!(
            err.sqlstate(),
            Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
            "backend {pid}: {err}"
        );
    }
    // The server sees the same: every one of our backends carries the application_name.
    let mut ours = t.backends().await;
    ours.sort();
    assert_eq!(ours, pids);
}

#[tokio::test]
async fn tracker_sees_live_sessions_with_caller_and_backend() {
    let t = TestDb::new().await;
    let db = t.pool(2, 0, Duration::from_secs(5));
    let s = db.session("test.visible").await.unwrap();
    let snap = db.tracker().snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].label, "test.visible");
    assert!(
        snap[0].caller.contains("db_sessions.rs"),
        "{}",
        snap[0].caller
    );
    assert_eq!(snap[0].backend_pid, s.backend_pid());
    assert!(t.backends().await.contains(&s.backend_pid()));
    drop(s);
    assert!(db.tracker().snapshot().is_empty());
}

#[tokio::test]
async fn store_errors_wrap_pool_errors() {
    let t = TestDb::new().await;
    let db = t.pool(1, 0, Duration::from_millis(200));
    let store = Store::new(db.clone(), 3);
    let _hold = db.session("test.hold").await.unwrap();
    let err = store
        .create_task(&NewTask::new("echo", serde_json::json!({})))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Db(DbError::CheckoutTimeout { .. })),
        "{err:?}"
    );
}

/// The statement pg_stat_activity last saw on `pid`.
async fn last_query(admin: &tokio_postgres::Client, pid: i32) -> String {
    admin
        .query_one("SELECT query FROM pg_stat_activity WHERE pid = $1", &[&pid])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn pre_ping_skips_connections_given_back_a_moment_ago() {
    // A ping is an empty simple query: pg_stat_activity then shows "" as the backend's
    // last statement instead of ours.
    let t = TestDb::new().await;
    let db = t.pool(1, 0, Duration::from_secs(5));
    let admin = t.admin().await;
    let s = db.session("test.mark").await.unwrap();
    let pid = s.backend_pid();
    s.batch_execute("SELECT 'marker'").await.unwrap();
    drop(s);
    // Checked out again at once: within database.pre_ping_idle (500 ms), no ping.
    let s = db.session("test.again").await.unwrap();
    assert_eq!(s.backend_pid(), pid);
    assert_eq!(last_query(&admin, pid).await, "SELECT 'marker'");
    drop(s);
    // Idle longer than the window: pinged before it is handed out.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let s = db.session("test.later").await.unwrap();
    assert_eq!(s.backend_pid(), pid);
    assert_eq!(last_query(&admin, pid).await, "");
}
