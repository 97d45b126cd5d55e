//! Dead links to PostgreSQL: connections that stay open but never answer again (a NAT
//! that forgot the flow, a peer that vanished without FIN or RST), made with a loopback
//! proxy between the daemon and the real test server (tests/common/proxy.rs).
//!
//! What is expected of the daemon (some of it not implemented yet):
//! - every database round trip is bounded by `database.query_timeout` (a new key), so a
//!   loop stuck on a frozen connection gives up, discards that connection and reconnects;
//! - the supervisor, claimer, lease keeper and leader all recover by themselves once new
//!   connections work again; an instance that cannot reach the database loses leadership
//!   to one that can;
//! - `/readyz` answers 503 with a reason while the database is unreachable, and
//!   200 again once it is back; `/healthz` stays 200;
//! - `/v1/status` answers (200, without a pool connection) even with the pool exhausted.
//!
//! The `eventually` limits below only guard against hangs; they are not timing assertions.

mod common;

use std::cell::{Cell, RefCell};
use std::time::Duration;

use common::daemon::Daemon;
use common::proxy::Proxy;
use common::{TestDb, eventually};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// Upper bound of one test, whatever happens.
const TEST_LIMIT: Duration = Duration::from_secs(180);
/// Bound of each "eventually" after a fault.
const RECOVERY: Duration = Duration::from_secs(60);
const EXIT_LIMIT: Duration = Duration::from_secs(30);
/// Every HTTP call is bounded.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// The short settings every test here uses, plus `extra` (agents, overrides).
fn short_config(t: &TestDb, extra: &str) -> String {
    format!(
        "[database]\napplication_name = {:?}\nquery_timeout = \"2s\"\nstatement_timeout = \"1s\"\n\
         [supervisor]\ninterval = \"1s\"\n\
         [workers]\nlease = \"3s\"\npoll_interval = \"500ms\"\n{extra}",
        t.application_name
    )
}

const CAT_AGENT: &str = "[agents.cat]\nkind = \"command\"\ncommand = [\"cat\"]\n";

async fn bounded(body: impl std::future::Future<Output = ()>) {
    common::daemon::bounded(TEST_LIMIT, body).await
}

fn client() -> reqwest::Client {
    common::daemon::http_client(HTTP_TIMEOUT)
}

/// Waits for the ready line; the base URL.
fn ready(d: &mut Daemon) -> String {
    d.base_url()
}

/// GET returning status and JSON body; Err on no answer within `timeout`.
async fn get_json(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<(u16, Value), String> {
    let r = http.get(url).timeout(timeout).send().await.map_err(|e| {
        if e.is_timeout() {
            format!("GET {url}: no answer within {timeout:?}")
        } else {
            format!("GET {url}: {e:?}")
        }
    })?;
    let status = r.status().as_u16();
    let body = r
        .json::<Value>()
        .await
        .map_err(|e| format!("GET {url}: body: {e}"))?;
    Ok((status, body))
}

/// Submits a task; its id when the API accepted it (201).
async fn submit(http: &reqwest::Client, base: &str, agent: &str, payload: Value) -> Option<i64> {
    common::daemon::submit_task(http, base, agent, payload).await
}

/// A task's status through the API, if the API answered.
async fn api_status(http: &reqwest::Client, base: &str, id: i64) -> Option<String> {
    let (code, v) = get_json(http, &format!("{base}/v1/tasks/{id}"), HTTP_TIMEOUT)
        .await
        .ok()?;
    (code == 200).then(|| v["status"].as_str().map(str::to_string))?
}

async fn supervisor_ticks(http: &reqwest::Client, base: &str, timeout: Duration) -> Option<u64> {
    let (code, v) = get_json(http, &format!("{base}/v1/status"), timeout)
        .await
        .ok()?;
    (code == 200).then(|| v["supervisor"]["ticks"].as_u64())?
}

/// A task held by an instance that no longer exists: running, lease expired a minute ago.
async fn insert_ghost_task(c: &tokio_postgres::Client, agent: &str) -> i64 {
    c.query_one(
        "INSERT INTO tasks (agent, payload, status, attempts, lease_owner, started_at, lease_expires_at) \
         VALUES ($1, '{\"ghost\": true}'::jsonb, 'running', 1, 'ghost-instance', \
                 now() - interval '1 minute', now() - interval '1 minute') RETURNING id",
        &[&agent],
    )
    .await
    .expect("insert ghost task")
    .get(0)
}

/// (status, attempts, lease_owner) of a task, read on the test's own connection.
async fn row(c: &tokio_postgres::Client, id: i64) -> (String, i32, Option<String>) {
    let r = c
        .query_one(
            "SELECT status, attempts, lease_owner FROM tasks WHERE id = $1",
            &[&id],
        )
        .await
        .expect("read task");
    (r.get(0), r.get(1), r.get(2))
}

/// Waits until the ghost task was taken from the ghost, run again and succeeded.
async fn ghost_requeued_and_succeeded(c: &tokio_postgres::Client, id: i64) -> bool {
    let seen_requeued = Cell::new(false);
    let ok = eventually(RECOVERY, || async {
        let (status, _, owner) = row(c, id).await;
        if owner.as_deref() != Some("ghost-instance") {
            seen_requeued.set(true);
        }
        status == "succeeded"
    })
    .await;
    let (status, attempts, owner) = row(c, id).await;
    println!(
        "ghost task {id}: status={status} attempts={attempts} lease_owner={owner:?} (taken from the ghost: {})",
        seen_requeued.get()
    );
    // Claimed again after the ghost's attempt: a second attempt.
    ok && attempts >= 2
}

fn sigterm_and_expect_success(d: &mut Daemon) {
    d.signal(Signal::SIGTERM);
    let st = tokio::task::block_in_place(|| d.wait_exit(EXIT_LIMIT));
    assert!(
        st.success(),
        "exit {st:?} after SIGTERM; output:\n{}",
        d.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn frozen_connections_are_discarded_and_every_loop_recovers() {
    bounded(async {
        let t = TestDb::new().await;
        let proxy = Proxy::for_db(&t).await;
        let dir = tempfile::tempdir().unwrap();
        let config = short_config(&t, CAT_AGENT);
        let url = proxy.url(&t);
        let mut d = Daemon::start(dir.path(), &config, &[("TASKWARDEN_DATABASE_URL", &url)]);
        let base = ready(&mut d);
        let http = client();
        let c = t.admin().await;

        let first = submit(&http, &base, "cat", json!({"n": 1}))
            .await
            .expect("first task accepted");
        assert!(
            eventually(RECOVERY, || async {
                api_status(&http, &base, first).await.as_deref() == Some("succeeded")
            })
            .await,
            "the first task (before any fault) did not succeed; output:\n{}",
            d.drain()
        );
        assert!(proxy.accepted() > 0, "the daemon did not go through the proxy");

        // Every connection the daemon holds now is a dead link from here on.
        let before = supervisor_ticks(&http, &base, HTTP_TIMEOUT)
            .await
            .expect("status before the freeze");
        proxy.freeze_existing();
        // Read right after the freeze; the status call may itself be stuck on a frozen
        // pool connection, so fall back to the value before it. Either way, at least one
        // tick must complete that started after the freeze.
        let after = supervisor_ticks(&http, &base, Duration::from_secs(2)).await;
        let floor = after.unwrap_or(0).max(before + 1);
        println!("ticks: {before} before the freeze, {after:?} right after; waiting for > {floor}");

        let last = Cell::new(None);
        let ticking = eventually(RECOVERY, || async {
            let now = supervisor_ticks(&http, &base, HTTP_TIMEOUT).await;
            last.set(now.or(last.get()));
            now.is_some_and(|n| n > floor)
        })
        .await;
        assert!(
            ticking,
            "supervisor ticks did not advance past {floor} after the freeze (last read {:?}); output:\n{}",
            last.get(),
            d.drain()
        );

        let id = Cell::new(None);
        let ran = eventually(RECOVERY, || async {
            match id.get() {
                None => {
                    id.set(submit(&http, &base, "cat", json!({"n": 2})).await);
                    false
                }
                Some(id) => api_status(&http, &base, id).await.as_deref() == Some("succeeded"),
            }
        })
        .await;
        assert!(
            ran,
            "a task submitted after the freeze did not succeed (accepted as {:?}); output:\n{}",
            id.get(),
            d.drain()
        );

        let ghost = insert_ghost_task(&c, "cat").await;
        assert!(
            ghost_requeued_and_succeeded(&c, ghost).await,
            "the expired-lease task {ghost} was not re-queued and run (leader loop stuck?); row {:?}; output:\n{}",
            row(&c, ghost).await,
            d.drain()
        );

        sigterm_and_expect_success(&mut d);
        drop(proxy);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_instance_that_is_not_frozen_takes_over_leadership() {
    bounded(async {
        let t = TestDb::new().await;
        let proxy = Proxy::for_db(&t).await;
        let config = short_config(&t, CAT_AGENT);
        let dir_a = tempfile::tempdir().unwrap();
        let dir_b = tempfile::tempdir().unwrap();
        let url_a = proxy.url(&t);
        let url_b = t.url();

        let mut a = Daemon::start(
            dir_a.path(),
            &config,
            &[("TASKWARDEN_DATABASE_URL", &url_a)],
        );
        let base_a = ready(&mut a);
        let led = tokio::task::block_in_place(|| a.wait_for("became leader", RECOVERY));
        assert!(
            led.is_some(),
            "A never became leader; output:\n{}",
            a.drain()
        );

        let mut b = Daemon::start(
            dir_b.path(),
            &config,
            &[("TASKWARDEN_DATABASE_URL", &url_b)],
        );
        ready(&mut b);
        // While A is healthy, B does not lead (or the check below would prove nothing).
        let early = tokio::task::block_in_place(|| b.wait_for("became leader", Duration::from_secs(3)));
        assert!(
            early.is_none(),
            "B became leader while A was healthy: {early:?}"
        );

        proxy.black_hole();
        let c = t.admin().await;
        let ghost = insert_ghost_task(&c, "cat").await;

        let took_over = tokio::task::block_in_place(|| b.wait_for("became leader", RECOVERY));
        assert!(
            took_over.is_some(),
            "B never became leader with A cut off; B output:\n{}\n--- A output:\n{}",
            b.drain(),
            a.drain()
        );
        // A cannot reach the database: whoever runs the task is B.
        assert!(
            ghost_requeued_and_succeeded(&c, ghost).await,
            "the expired-lease task {ghost} was not re-queued and run by B; row {:?}; B output:\n{}",
            row(&c, ghost).await,
            b.drain()
        );

        // A stepped down by itself (ARCHITECTURE.md: failing to renew steps down at once):
        // it says so, and its leader gauge — served without the database — is 0. The wait
        // is a hang guard only.
        let stepped = tokio::task::block_in_place(|| a.wait_for("stepping down", RECOVERY));
        assert!(
            stepped.is_some(),
            "A never stepped down while cut off from the database; A output:\n{}",
            a.drain()
        );
        let http = client();
        let gauge = common::daemon::scrape(&http, &base_a).await;
        assert_eq!(
            taskwarden::metrics::parse_value(&gauge, "taskwarden_leader", &[]),
            Some(0.0),
            "A still reports itself leader after stepping down"
        );

        // A may be wedged: its Drop kills it.
        drop(a);
        sigterm_and_expect_success(&mut b);
        drop(proxy);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_30s_black_hole_turns_readyz_503_and_heals_by_itself() {
    bounded(async {
        let t = TestDb::new().await;
        let proxy = Proxy::for_db(&t).await;
        let dir = tempfile::tempdir().unwrap();
        let config = short_config(
            &t,
            "[agents.slow]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"sleep 0.3\"]\nconcurrency = 4\n",
        );
        let url = proxy.url(&t);
        let mut d = Daemon::start(dir.path(), &config, &[("TASKWARDEN_DATABASE_URL", &url)]);
        let base = ready(&mut d);
        let http = client();
        let c = t.admin().await;

        let mut ids = Vec::new();
        for n in 0..20 {
            let id = submit(&http, &base, "slow", json!({ "n": n }))
                .await
                .unwrap_or_else(|| panic!("task {n} not accepted before the outage"));
            ids.push(id);
        }

        proxy.black_hole();
        let outage = Duration::from_secs(30);
        let started = tokio::time::Instant::now();
        let mut unready: Option<Value> = None;
        let mut submits = Vec::new();
        let mut k = 0;
        while started.elapsed() < outage {
            // /readyz must answer at all, and quickly; /healthz stays 200.
            let (code, body) = get_json(&http, &format!("{base}/readyz"), HTTP_TIMEOUT)
                .await
                .unwrap_or_else(|e| {
                    panic!("/readyz did not answer during the outage: {e}; output:\n{}", d.drain())
                });
            if code == 503 && unready.is_none() {
                println!(
                    "/readyz 503 after {:?} of outage: {body}",
                    started.elapsed()
                );
                unready = Some(body);
            }
            let (hcode, _) = get_json(&http, &format!("{base}/healthz"), HTTP_TIMEOUT)
                .await
                .unwrap_or_else(|e| panic!("/healthz did not answer during the outage: {e}"));
            assert_eq!(hcode, 200, "/healthz during the outage");
            // Now and then a submission; what the API accepts must not be lost.
            if k % 6 == 0 {
                let http = http.clone();
                let base = base.clone();
                let n = 100 + k;
                submits.push(tokio::spawn(async move {
                    submit(&http, &base, "slow", json!({ "n": n })).await
                }));
            }
            k += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let body = unready.unwrap_or_else(|| {
            panic!("/readyz never answered 503 during a {outage:?} outage; output:\n{}", d.drain())
        });
        let reason = body["error"].as_str().unwrap_or_default().to_string();
        assert!(
            !reason.is_empty(),
            "503 from /readyz without an error reason: {body}"
        );
        let lower = reason.to_lowercase();
        assert!(
            ["database", "supervisor", "timed out", "timeout", "unreachable"]
                .iter()
                .any(|w| lower.contains(w)),
            "/readyz reason names no cause: {reason:?}"
        );

        proxy.heal();
        let healed = eventually(RECOVERY, || async {
            matches!(
                get_json(&http, &format!("{base}/readyz"), HTTP_TIMEOUT).await,
                Ok((200, _))
            )
        })
        .await;
        assert!(
            healed,
            "/readyz not 200 within {RECOVERY:?} after heal; last: {:?}; output:\n{}",
            get_json(&http, &format!("{base}/readyz"), HTTP_TIMEOUT).await,
            d.drain()
        );

        let mut accepted_during = Vec::new();
        for s in submits {
            if let Ok(Some(id)) = s.await {
                accepted_during.push(id);
            }
        }
        println!("accepted during the outage: {accepted_during:?}");
        ids.extend(&accepted_during);

        let pending: RefCell<Vec<(i64, String)>> = RefCell::new(Vec::new());
        let done = eventually(RECOVERY, || async {
            let rows = c
                .query("SELECT id, status FROM tasks ORDER BY id", &[])
                .await
                .unwrap();
            let present: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            let mut p: Vec<(i64, String)> = rows
                .iter()
                .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
                .filter(|(_, s)| s != "succeeded")
                .collect();
            // A task the API accepted but the table lacks is lost.
            p.extend(
                ids.iter()
                    .filter(|id| !present.contains(id))
                    .map(|id| (*id, "missing".to_string())),
            );
            let ok = p.is_empty();
            *pending.borrow_mut() = p;
            ok
        })
        .await;
        assert!(
            done,
            "not every task succeeded after heal (lost or stuck: {:?}); output:\n{}",
            pending.borrow(),
            d.drain()
        );

        sigterm_and_expect_success(&mut d);
        drop(proxy);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_answers_with_the_pool_exhausted() {
    bounded(async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "[database]\napplication_name = {:?}\npool_size = 2\nmax_overflow = 0\n\
             checkout_timeout = \"5s\"\nstatement_timeout = \"20s\"\nquery_timeout = \"30s\"\n{CAT_AGENT}",
            t.application_name
        );
        let url = t.url();
        let mut d = Daemon::start(dir.path(), &config, &[("TASKWARDEN_DATABASE_URL", &url)]);
        let base = ready(&mut d);
        let http = client();

        // Every write to tasks now waits on the test's lock, holding its pool connection.
        let mut lock = t.admin().await;
        let tx = lock.transaction().await.unwrap();
        tx.batch_execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();

        let posts: Vec<_> = (0..6)
            .map(|n| {
                let http = http.clone();
                let base = base.clone();
                tokio::spawn(async move {
                    http.post(format!("{base}/v1/tasks"))
                        .json(&json!({ "agent": "cat", "payload": { "n": n } }))
                        .timeout(Duration::from_secs(40))
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                })
            })
            .collect();

        // A hang guard, not a speed check: longer than the 5 s checkout_timeout, so a
        // status that waited for a pool connection would answer 503 (and fail the 200
        // below) rather than trip this bound; the lock is held far longer (until rollback).
        let guard = Duration::from_secs(15);
        let last: RefCell<Option<Result<(u16, Value), String>>> = RefCell::new(None);
        let exhausted = eventually(Duration::from_secs(20), || async {
            let r = get_json(&http, &format!("{base}/v1/status"), guard).await;
            let full = matches!(&r, Ok((200, v)) if v["pool"]["in_use"].as_u64() == Some(2));
            *last.borrow_mut() = Some(r);
            full
        })
        .await;
        assert!(
            exhausted,
            "GET /v1/status never answered within {guard:?} showing pool.in_use == 2 \
             (pool exhausted by requests waiting on a lock); last: {:?}",
            last.borrow()
        );
        let (code, v) = get_json(&http, &format!("{base}/v1/status"), guard)
            .await
            .unwrap_or_else(|e| panic!("status with the pool exhausted: {e}"));
        assert_eq!(code, 200, "{v}");
        assert_eq!(
            v["pool"]["in_use"], v["pool"]["max"],
            "pool not reported exhausted: {}",
            v["pool"]
        );

        tx.rollback().await.unwrap();
        for p in posts {
            let r = p.await.unwrap();
            println!("POST while locked: {r:?}");
            assert!(
                matches!(r, Ok(201) | Ok(503)),
                "a blocked POST ended with {r:?}"
            );
        }
        sigterm_and_expect_success(&mut d);
    })
    .await
}

/// The proxy itself behaves as the tests above assume (passes today).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_freezes_black_holes_and_heals_as_these_tests_assume() {
    bounded(async {
        let t = TestDb::new().await;
        let proxy = Proxy::for_db(&t).await;
        let pg: tokio_postgres::Config = proxy.url(&t).parse().unwrap();
        let short = Duration::from_secs(2);

        // A TCP target too: a proxy in front of the proxy.
        {
            let outer = Proxy::start(common::proxy::Target::Tcp(proxy.addr().to_string())).await;
            let pg: tokio_postgres::Config = outer.url(&t).parse().unwrap();
            let o = common::connect(&pg).await;
            o.simple_query("SELECT 1")
                .await
                .expect("through a proxy with a TCP target");
        }

        let a = common::connect(&pg).await;
        a.simple_query("SELECT 1").await.expect("through the proxy");
        proxy.freeze_existing();
        assert!(
            tokio::time::timeout(short, a.simple_query("SELECT 1"))
                .await
                .is_err(),
            "a frozen connection answered"
        );
        assert!(!a.is_closed(), "a frozen connection was closed");

        let b = common::connect(&pg).await;
        b.simple_query("SELECT 1")
            .await
            .expect("a connection opened after the freeze works");

        proxy.black_hole();
        assert!(
            tokio::time::timeout(short, b.simple_query("SELECT 1"))
                .await
                .is_err(),
            "black hole: an existing connection answered"
        );
        let accepted = proxy.accepted();
        assert!(
            tokio::time::timeout(short, pg.connect(tokio_postgres::NoTls))
                .await
                .is_err(),
            "black hole: a new connection got through"
        );
        assert_eq!(proxy.accepted(), accepted + 1, "black hole: not accepted");

        proxy.heal();
        let c = common::connect(&pg).await;
        c.simple_query("SELECT 1").await.expect("healed");
        assert!(
            tokio::time::timeout(Duration::from_millis(500), a.simple_query("SELECT 1"))
                .await
                .is_err(),
            "a frozen connection came back after heal"
        );

        // Dropping the proxy closes everything it held.
        drop(proxy);
        assert!(
            eventually(Duration::from_secs(10), || async {
                a.is_closed() && b.is_closed() && c.is_closed()
            })
            .await,
            "sockets still open after the proxy was dropped"
        );
    })
    .await
}
