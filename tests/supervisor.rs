//! The watchdog against a real PostgreSQL, with short limits: alerts without storms,
//! force-closes that give capacity back, timed-out tasks, orphan backends, and a loop that
//! keeps ticking when the pool is exhausted.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use common::{TestDb, eventually};
use taskwarden::alerts::{self, Alerts};
use taskwarden::config::{Config, Dur};
use taskwarden::db::tracker::Owner;
use taskwarden::db::{Db, DbError};
use taskwarden::metrics::{self as m, Metrics};
use taskwarden::orchestrator::registry::RunningTasks;
use taskwarden::store::{NewTask, Store, TaskStatus, TransitionArgs};
use taskwarden::supervisor::{Supervisor, TickReport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bound of one supervisor tick: a hang guard (docs/testing.md: every test is bounded in
/// time), far beyond any tick these short limits make.
const TICK_LIMIT: Duration = Duration::from_secs(60);

/// One tick, bounded by [`TICK_LIMIT`]; a failed or hung tick fails the test.
async fn tick(sup: &mut Supervisor) -> TickReport {
    tokio::time::timeout(TICK_LIMIT, sup.tick())
        .await
        .unwrap_or_else(|_| panic!("a supervisor tick did not end within {TICK_LIMIT:?}"))
        .unwrap()
}

struct Rig {
    t: TestDb,
    config: Arc<ArcSwap<Config>>,
    db: Db,
    metrics: Metrics,
    running: Arc<RunningTasks>,
    alerts: Alerts,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Rig {
    async fn new(pool_size: u32, tune: impl FnOnce(&mut Config)) -> Rig {
        let t = TestDb::new().await;
        let mut c = Config {
            database: t.config(pool_size, 0, Duration::from_millis(300)),
            ..Config::default()
        };
        c.supervisor.interval = Dur::millis(100);
        c.supervisor.session_warn_age = Dur::secs(1);
        c.supervisor.session_max_age = Dur::secs(2);
        c.supervisor.max_task_duration = Dur::secs(1);
        tune(&mut c);
        let metrics = Metrics::new();
        let db = Db::new(t.pg.clone(), &c.database, &metrics).unwrap();
        let config = Arc::new(ArcSwap::from_pointee(c));
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let alerts = Alerts::new(
            metrics.clone(),
            Arc::clone(&config),
            &tasks,
            shutdown.clone(),
        );
        Rig {
            t,
            config,
            db,
            metrics,
            running: RunningTasks::new(),
            alerts,
            tasks,
            shutdown,
        }
    }

    fn supervisor(&self) -> Supervisor {
        Supervisor::new(
            Arc::clone(&self.config),
            self.t.pg.clone(),
            self.db.clone(),
            Arc::clone(&self.running),
            self.alerts.clone(),
            self.metrics.clone(),
        )
    }

    /// Starts the real loop.
    fn start(&self) -> Arc<taskwarden::supervisor::Liveness> {
        let s = self.supervisor();
        let hb = s.liveness();
        self.tasks.spawn(s.run(self.shutdown.clone()));
        hb
    }

    /// A metric's value; a series that is not exported at all fails the test (it is
    /// never read as zero).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metrics
            .value(name, labels)
            .unwrap_or_else(|| panic!("metric {name} {labels:?} is not exported"))
    }

    /// A metric's value, `None` while the series does not exist (for polling).
    fn value_opt(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.metrics.value(name, labels)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A webhook receiver on loopback that records every JSON body it is sent.
async fn webhook_receiver() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&got);
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let sink = Arc::clone(&sink);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let Some(head_end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let len = text[..head_end]
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    if buf.len() < head_end + 4 + len {
                        continue;
                    }
                    let body = &buf[head_end + 4..head_end + 4 + len];
                    if let Ok(v) = serde_json::from_slice(body) {
                        sink.lock().unwrap().push(v);
                    }
                    let _ = sock
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                    return;
                }
            });
        }
    });
    (url, got)
}

fn events(got: &Arc<Mutex<Vec<serde_json::Value>>>, alert: &str, state: &str) -> usize {
    got.lock()
        .unwrap()
        .iter()
        .filter(|e| e["alert"] == alert && e["state"] == state)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_alert_fires_once_and_resolves_once() {
    let (url, got) = webhook_receiver().await;
    let rig = Rig::new(10, |c| c.alerts.webhook_url = url.clone()).await;
    let mut sup = rig.supervisor();

    let mut held = Vec::new();
    for _ in 0..9 {
        held.push(rig.db.session("test.hold").await.unwrap());
    }
    for _ in 0..3 {
        tick(&mut sup).await;
    }
    assert!(rig.alerts.is_firing(alerts::POOL_UTILIZATION_HIGH));
    assert_eq!(
        rig.value(m::ALERTS_TOTAL, &[("alert", "pool_utilization_high")]),
        1.0
    );
    assert_eq!(
        rig.value(m::ALERTS_FIRING, &[("alert", "pool_utilization_high")]),
        1.0
    );
    assert_eq!(rig.value(m::DB_POOL_UTILIZATION_RATIO, &[]), 0.9);

    // Between the lines (0.8, then exactly the 0.7 clear line): no flapping.
    held.truncate(8);
    tick(&mut sup).await;
    held.truncate(7);
    tick(&mut sup).await;
    assert!(rig.alerts.is_firing(alerts::POOL_UTILIZATION_HIGH));

    held.clear();
    for _ in 0..3 {
        tick(&mut sup).await;
    }
    assert!(!rig.alerts.is_firing(alerts::POOL_UTILIZATION_HIGH));
    assert_eq!(
        rig.value(m::ALERTS_FIRING, &[("alert", "pool_utilization_high")]),
        0.0
    );
    assert_eq!(
        rig.value(m::ALERTS_TOTAL, &[("alert", "pool_utilization_high")]),
        1.0
    );

    assert!(
        eventually(Duration::from_secs(10), || async {
            events(&got, "pool_utilization_high", "resolved") == 1
        })
        .await
    );
    assert_eq!(events(&got, "pool_utilization_high", "firing"), 1);
    // The firing event names who holds the sessions.
    let firing = got
        .lock()
        .unwrap()
        .iter()
        .find(|e| e["state"] == "firing")
        .cloned()
        .unwrap();
    let top = &firing["details"]["top_callers"][0];
    assert_eq!(top["sessions"], 9);
    assert!(
        top["caller"].as_str().unwrap().contains("supervisor.rs"),
        "{top}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaked_session_is_force_closed_its_task_cancelled_and_capacity_returns() {
    let rig = Rig::new(1, |_| {}).await;
    let store = Store::new(rig.db.clone(), 3);
    let task = store
        .create_task(&NewTask::new("leaky", serde_json::json!({})))
        .await
        .unwrap();

    // A task that takes the only connection and never finishes, run the way the
    // orchestrator runs tasks: raced against its cancellation token.
    let token = CancellationToken::new();
    let owner = Owner {
        task_id: task.id,
        cancel: token.clone(),
    };
    let (pid_tx, pid_rx) = tokio::sync::oneshot::channel();
    let db = rig.db.clone();
    let leaker = tokio::spawn(async move {
        tokio::select! {
            _ = token.cancelled() => "cancelled",
            _ = async {
                let s = db.session_for_task("test.leak", owner).await.unwrap();
                let _ = pid_tx.send(s.backend_pid());
                std::future::pending::<()>().await;
            } => "finished",
        }
    });
    let leaked_pid = pid_rx.await.unwrap();
    assert!(matches!(
        rig.db.session("test.starved").await,
        Err(DbError::CheckoutTimeout { .. })
    ));

    rig.start();
    // session_max_age (2 s) + 2 intervals, with room for a loaded machine.
    let outcome = tokio::time::timeout(Duration::from_secs(20), leaker)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, "cancelled");
    assert!(
        eventually(Duration::from_secs(10), || async {
            !rig.t.backends().await.contains(&leaked_pid)
        })
        .await
    );
    let s = rig.db.session("test.after").await.unwrap();
    assert_ne!(s.backend_pid(), leaked_pid);
    let one: i32 = s.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    drop(s);
    assert!(
        eventually(Duration::from_secs(5), || async {
            rig.value_opt(m::DB_SESSIONS_FORCE_CLOSED_TOTAL, &[]) == Some(1.0)
        })
        .await
    );
    assert!(rig.value(m::DB_BACKENDS_TERMINATED_TOTAL, &[]) >= 1.0);
    assert!(rig.value(m::DB_SESSIONS_LONG_LIVED_TOTAL, &[]) >= 1.0);
    assert_eq!(rig.db.tracker().counts().force_closed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_held_past_cancellation_gets_its_slot_lent_back() {
    let rig = Rig::new(1, |_| {}).await;
    // No owner to cancel: code that simply keeps the guard.
    let stubborn = rig.db.session("test.stubborn").await.unwrap();
    let mut sup = rig.supervisor();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r1 = tick(&mut sup).await;
    assert_eq!(r1.sessions_force_closed, 1);
    let r2 = tick(&mut sup).await;
    assert_eq!(r2.capacity_lent, 1);
    // Capacity is back while the stubborn guard still exists...
    let s = rig.db.session("test.lent").await.unwrap();
    s.query_one("SELECT 1", &[]).await.unwrap();
    drop(s);
    assert_eq!(rig.db.lent(), 1);
    // ...and is taken back when it finally drops: the pool is at its configured bound.
    drop(stubborn);
    assert_eq!(rig.db.lent(), 0);
    assert_eq!(rig.db.status().max, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_past_max_task_duration_ends_timed_out_and_returns_its_session() {
    let rig = Rig::new(2, |_| {}).await;
    let store = Store::new(rig.db.clone(), 3);
    let task = store
        .create_task(&NewTask::new("slow", serde_json::json!({})))
        .await
        .unwrap();
    store
        .transition(
            task.id,
            TaskStatus::Running,
            &TransitionArgs {
                lease_owner: Some("me".into()),
                lease: Some(Duration::from_secs(60)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let reg = rig
        .running
        .register(task.id, "slow", CancellationToken::new());
    let token = reg.token().clone();
    let db = rig.db.clone();
    let owner = Owner {
        task_id: task.id,
        cancel: token.clone(),
    };
    let worker = tokio::spawn(async move {
        let _reg = reg;
        tokio::select! {
            _ = token.cancelled() => "cancelled",
            _ = async {
                let s = db.session_for_task("test.slow", owner).await.unwrap();
                s.execute("SELECT pg_sleep(60)", &[]).await.ok();
            } => "finished",
        }
    });
    rig.start();
    let outcome = tokio::time::timeout(Duration::from_secs(20), worker)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, "cancelled");
    let t = store.get_task(task.id).await.unwrap();
    assert_eq!(t.status, TaskStatus::TimedOut);
    assert!(t.error.unwrap().contains("max_task_duration"));
    assert!(
        eventually(Duration::from_secs(5), || async {
            rig.db.status().in_use == 0
        })
        .await
    );
    assert!(rig.running.is_empty());
    assert!(
        eventually(Duration::from_secs(5), || async {
            rig.value_opt(m::TASKS_TIMED_OUT_TOTAL, &[]) == Some(1.0)
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            rig.value_opt(m::TASKS, &[("status", "timed_out")]) == Some(1.0)
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_backend_idle_in_transaction_is_terminated_but_ours_are_not() {
    let rig = Rig::new(2, |c| c.supervisor.interval = Dur::millis(200)).await;
    // Our own idle pooled connection and our own guard idle in a transaction stay.
    let idle_pid = rig.db.session("test.idle").await.unwrap().backend_pid();
    let mut mine = rig.db.session("test.in_tx").await.unwrap();
    let my_pid = mine.backend_pid();
    let tx = mine.transaction().await.unwrap();
    tx.query_one("SELECT 1", &[]).await.unwrap();

    // A stray connection with our application_name, outside the pool, idle in transaction.
    let mut pg = rig.t.pg.clone();
    pg.application_name(&rig.t.application_name);
    let (stray, conn) = pg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    stray.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let stray_pid: i32 = rig
        .t
        .admin()
        .await
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND state = 'idle in transaction' AND pid <> $2",
            &[&rig.t.application_name, &my_pid],
        )
        .await
        .unwrap()
        .get(0);

    rig.start();
    assert!(eventually(Duration::from_secs(20), || async { stray.is_closed() }).await);
    assert!(!rig.t.backends().await.contains(&stray_pid));
    assert!(rig.value(m::DB_BACKENDS_TERMINATED_TOTAL, &[]) >= 1.0);
    let left = rig.t.backends().await;
    assert!(
        left.contains(&idle_pid) && left.contains(&my_pid),
        "{left:?}"
    );
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisor_keeps_ticking_with_the_pool_exhausted() {
    let rig = Rig::new(2, |c| c.supervisor.session_max_age = Dur::secs(600)).await;
    let _a = rig.db.session("test.a").await.unwrap();
    let _b = rig.db.session("test.b").await.unwrap();
    assert!(rig.db.session("test.c").await.is_err());
    let hb = rig.start();
    assert!(eventually(Duration::from_secs(10), || async { hb.ticks() >= 2 }).await);
    let first = rig.value(m::SUPERVISOR_LAST_TICK_TIMESTAMP_SECONDS, &[]);
    let ok_before = rig.value(m::SUPERVISOR_TICKS_TOTAL, &[("result", "ok")]);
    assert!(eventually(Duration::from_secs(10), || async { hb.ticks() >= 5 }).await);
    assert!(rig.value(m::SUPERVISOR_LAST_TICK_TIMESTAMP_SECONDS, &[]) > first);
    assert!(rig.value(m::SUPERVISOR_TICKS_TOTAL, &[("result", "ok")]) > ok_before);
    assert_eq!(rig.value(m::DB_POOL_IN_USE, &[]), 2.0);
    assert_eq!(rig.value(m::DB_POOL_UTILIZATION_RATIO, &[]), 1.0);
    assert!(rig.alerts.is_firing(alerts::POOL_UTILIZATION_HIGH));
    assert!(rig.value("taskwarden_supervisor_tick_seconds_count", &[]) >= 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_pressure_alerts_and_closes_idle_connections() {
    // A tiny ratio puts any process over the line.
    let rig = Rig::new(3, |c| c.supervisor.memory_alert_ratio = 0.000_001).await;
    let held: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(rig.db.session("test.warm").await.unwrap());
        }
        v
    };
    let mut idle_pids: Vec<i32> = held.iter().map(|s| s.backend_pid()).collect();
    idle_pids.sort();
    drop(held);
    assert_eq!(rig.db.status().idle, 3);
    // The server sees the three idle backends before the cleanup.
    let mut before = rig.t.backends().await;
    before.sort();
    assert_eq!(before, idle_pids);
    let mut sup = rig.supervisor();
    let r = tick(&mut sup).await;
    assert!(r.resident_memory_bytes > 0);
    assert!(r.emergency_cleanup);
    assert!(rig.alerts.is_firing(alerts::MEMORY_HIGH));
    assert_eq!(rig.db.status().idle, 0);
    // Closed for real: the idle connections' backends are gone from the server.
    let admin = rig.t.admin().await;
    let still_there = || async {
        admin
            .query(
                "SELECT pid FROM pg_stat_activity WHERE pid = ANY($1)",
                &[&idle_pids],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, i32>(0))
            .collect::<Vec<_>>()
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            still_there().await.is_empty()
        })
        .await,
        "backends of the closed idle connections still on the server: {:?}",
        still_there().await
    );
    assert_eq!(rig.value(m::EMERGENCY_CLEANUPS_TOTAL, &[]), 1.0);
    assert!(rig.value(m::PROCESS_RESIDENT_MEMORY_BYTES, &[]) > 0.0);
    // Still firing on the next tick: no second alert, no second cleanup.
    let r = tick(&mut sup).await;
    assert!(!r.emergency_cleanup);
    assert_eq!(rig.value(m::ALERTS_TOTAL, &[("alert", "memory_high")]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_session_is_warned_about_once() {
    let rig = Rig::new(2, |c| c.supervisor.session_max_age = Dur::secs(600)).await;
    let _s = rig.db.session("test.long").await.unwrap();
    let mut sup = rig.supervisor();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(tick(&mut sup).await.sessions_warned, 1);
    assert_eq!(tick(&mut sup).await.sessions_warned, 0);
    assert_eq!(rig.value(m::DB_SESSIONS_LONG_LIVED_TOTAL, &[]), 1.0);
    assert!(rig.value(m::DB_SESSION_OLDEST_AGE_SECONDS, &[]) >= 1.0);
}

/// One store function, written once over `db::Query`, runs on every handle: a pooled
/// session, its transaction, a direct connection and its lock-timeout transaction — and in
/// a spawned task (its future is `Send`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_functions_take_any_query_handle() {
    use taskwarden::db::connect_direct;
    use taskwarden::store::watchdog;
    let rig = Rig::new(2, |_| {}).await;
    let store = Store::new(rig.db.clone(), 3);
    let id = store
        .enqueue(&NewTask::new("echo", serde_json::json!({})))
        .await
        .unwrap()
        .task
        .id;
    rig.t
        .admin()
        .await
        .execute(
            "UPDATE taskwarden.tasks SET status = 'running', started_at = now() WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let ids = [id, id + 1_000_000];
    let want = std::collections::HashSet::from([id]);
    let mut s = rig.db.session("test.query").await.unwrap();
    assert_eq!(watchdog::running_among(&s, &ids).await.unwrap(), want);
    let tx = s.transaction().await.unwrap();
    assert_eq!(watchdog::running_among(&tx, &ids).await.unwrap(), want);
    tx.commit().await.unwrap();
    let cfg = rig.config.load();
    let direct = connect_direct(&rig.t.pg, &cfg.database, "test")
        .await
        .unwrap();
    assert_eq!(watchdog::running_among(&direct, &ids).await.unwrap(), want);
    let dtx = direct
        .transaction_with_lock_timeout(Duration::from_millis(100))
        .await
        .unwrap();
    let r = watchdog::running_among(&dtx, &ids).await;
    assert_eq!(dtx.finish(r).await.unwrap(), want);
    assert!(!direct.is_broken());
    let spawned = tokio::spawn(async move {
        let got = watchdog::running_among(&s, &ids).await;
        drop(s);
        got
    });
    assert_eq!(spawned.await.unwrap().unwrap(), want);
}

/// The lock-timeout transaction gives up on a locked table with 55P03, leaves the
/// connection usable once rolled back, and marks it broken when dropped open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_timeout_transaction_refuses_a_locked_table_and_is_never_left_open() {
    use taskwarden::db::connect_direct;
    use taskwarden::store::watchdog;
    let rig = Rig::new(2, |_| {}).await;
    let cfg = rig.config.load();
    let direct = connect_direct(&rig.t.pg, &cfg.database, "test")
        .await
        .unwrap();
    let mut holder = rig.db.session("test.lock").await.unwrap();
    let lock = holder.transaction().await.unwrap();
    lock.execute("LOCK TABLE taskwarden.tasks IN ACCESS EXCLUSIVE MODE", &[])
        .await
        .unwrap();
    let dtx = direct
        .transaction_with_lock_timeout(Duration::from_millis(50))
        .await
        .unwrap();
    let r = watchdog::running_among(&dtx, &[1]).await;
    let e = dtx.finish(r).await.unwrap_err();
    assert!(e.is_lock_timeout(), "{e}");
    assert!(!direct.is_broken());
    lock.rollback().await.unwrap();
    assert!(
        watchdog::running_among(&direct, &[1])
            .await
            .unwrap()
            .is_empty()
    );
    let dtx = direct
        .transaction_with_lock_timeout(Duration::from_millis(50))
        .await
        .unwrap();
    drop(dtx);
    assert!(direct.is_broken());
}
