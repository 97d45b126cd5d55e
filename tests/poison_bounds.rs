//! Issue 23 "Poison-proof", items 4 and 5: what input and other sessions can do to the
//! daemon's own figures, against the built binary and a real PostgreSQL.
//!
//! - Agent names from SQL (`taskwarden.enqueue` for names no config knows) must not grow
//!   `/metrics` or `/v1/status` without bound, and their series must go once their
//!   tasks are gone.
//! - A session holding `LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE` must not slow the
//!   supervisor's ticks down to one per `statement_timeout`.
//! - An embedded daemon whose postmaster is being restarted still answers SIGTERM.
//!
//! The limits only guard against hangs; each assertion is about a count or a size.

mod common;

use std::path::Path;
use std::time::Duration;

use common::daemon::{Daemon, bounded, http_client, scrape};
use common::{TestDb, eventually};
use nix::sys::signal::Signal;
use serde_json::Value;
use taskwarden::metrics as m;

const TEST_LIMIT: Duration = Duration::from_secs(300);
const LIMIT: Duration = Duration::from_secs(60);

fn config(t: &TestDb, dir: &Path, supervisor: &str) -> String {
    let log = dir.join("ran.log");
    format!(
        "[database]\napplication_name = {:?}\npool_size = 4\nmax_overflow = 2\n\
         [workers]\nconcurrency = 2\npoll_interval = \"200ms\"\n\
         [supervisor]\n{supervisor}\n\
         [agents.rec]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", {:?}]\nconcurrency = 2\n",
        t.application_name,
        format!("cat >> {}", log.display())
    )
}

fn start(dir: &Path, cfg: &str, env: &[(&str, &str)]) -> (Daemon, String) {
    tokio::task::block_in_place(|| {
        let mut d = Daemon::start(dir, cfg, env);
        let base = d.base_url();
        (d, base)
    })
}

fn stop(mut d: Daemon) {
    d.signal(Signal::SIGTERM);
    let st = tokio::task::block_in_place(|| d.wait_exit(LIMIT));
    assert!(st.success(), "daemon exit {st:?}; output:\n{}", d.output());
}

async fn status(http: &reqwest::Client, base: &str) -> (usize, Value) {
    let body = http
        .get(format!("{base}/v1/status"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    (body.len(), serde_json::from_str(&body).unwrap())
}

/// Scrapes until `done` holds of the exposition (or [`LIMIT`] passes): whether it did,
/// and the last exposition.
async fn scrape_until(
    http: &reqwest::Client,
    base: &str,
    done: impl Fn(&str) -> bool,
) -> (bool, String) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let text = scrape(http, base).await;
        if done(&text) {
            return (true, text);
        }
        if tokio::time::Instant::now() > deadline {
            return (false, text);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn agent_series(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains("agent=\""))
        .count()
}

/// 3,000 tasks for 3,000 agent names no config knows, queued by SQL as any application
/// may: `/metrics` stays within a few lines of its baseline, `/v1/status` under 64 KB and
/// says its lists were cut; once the tasks are gone, so are the unknown agents' series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_agent_names_do_not_grow_metrics_or_status() {
    bounded(TEST_LIMIT, async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&t, dir.path(), "interval = \"200ms\"");
        let (d, base) = start(dir.path(), &cfg, &[("TASKWARDEN_DATABASE_URL", &t.url())]);
        let http = http_client(Duration::from_secs(20));
        let admin = t.admin().await;

        // The baseline, once the supervisor has written its gauges a few times and every
        // route the test calls has its HTTP series.
        assert!(
            eventually(LIMIT, || async {
                let text = scrape(&http, &base).await;
                m::parse_value(&text, m::QUEUE_DEPTH, &[("agent", "rec")]).is_some()
                    && m::parse_value(&text, m::SUPERVISOR_TICKS_TOTAL, &[]).unwrap_or(0.0) >= 3.0
            })
            .await
        );
        let (status_before, _) = status(&http, &base).await;
        let before = scrape(&http, &base).await;

        admin
            .batch_execute(
                "SELECT taskwarden.enqueue('stranger-' || i, jsonb_build_object('n', i)) \
                 FROM generate_series(1, 3000) AS i",
            )
            .await
            .unwrap();
        // The supervisor's view has seen them once the unknown agents' queue says 3,000.
        let (seen, after) = scrape_until(&http, &base, |text| {
            m::parse_value(text, m::QUEUE_DEPTH, &[]).unwrap_or(0.0) >= 3000.0
        })
        .await;
        let (status_size, st) = status(&http, &base).await;
        println!(
            "/metrics lines {} -> {}, agent series {} -> {}; /v1/status {status_before} -> {status_size} bytes",
            before.lines().count(),
            after.lines().count(),
            agent_series(&before),
            agent_series(&after),
        );
        assert!(seen, "the queue gauges never counted the 3,000 tasks:\n{after}");
        assert!(
            after.lines().count() <= before.lines().count() + 20,
            "/metrics grew from {} to {} lines",
            before.lines().count(),
            after.lines().count()
        );
        assert!(status_size < 64 * 1024, "/v1/status is {status_size} bytes");
        assert_eq!(st["queues_total"], 3000, "{}", st["queues_total"]);
        assert!(
            st["truncated"]
                .as_array()
                .is_some_and(|a| a.iter().any(|l| l == "queues")),
            "truncated: {}",
            st["truncated"]
        );
        common::promtool_check_metrics(&after);

        // Gone from the table: the unknown agents' series go too.
        admin
            .batch_execute("DELETE FROM tasks WHERE agent LIKE 'stranger-%'")
            .await
            .unwrap();
        let (gone, last) =
            scrape_until(&http, &base, |text| agent_series(text) <= agent_series(&before)).await;
        assert!(gone, "series left after the tasks went:\n{last}");
        let (_, st) = status(&http, &base).await;
        assert_eq!(st["truncated"], serde_json::json!([]), "{st}");
        stop(d);
    })
    .await;
}

/// A session holds `LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE` for 6 s with
/// `supervisor.interval = "1s"`: the supervisor completes a tick about every second
/// regardless (at least 4 in the 6 s), its task figures marked stale and the refusals
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_task_table_does_not_slow_the_supervisor() {
    bounded(TEST_LIMIT, async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&t, dir.path(), "interval = \"1s\"");
        let (d, base) = start(dir.path(), &cfg, &[("TASKWARDEN_DATABASE_URL", &t.url())]);
        let http = http_client(Duration::from_secs(20));
        let ticks =
            |text: &str| m::parse_value(text, m::SUPERVISOR_TICKS_TOTAL, &[]).unwrap_or(0.0);
        assert!(
            eventually(LIMIT, || async {
                ticks(&scrape(&http, &base).await) >= 2.0
            })
            .await
        );

        let mut locker = t.admin().await;
        let tx = locker.transaction().await.unwrap();
        tx.batch_execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        let start_ticks = ticks(&scrape(&http, &base).await);
        tokio::time::sleep(Duration::from_secs(6)).await;
        let held = scrape(&http, &base).await;
        let during = ticks(&held) - start_ticks;
        let (_, st) = status(&http, &base).await;
        tx.rollback().await.unwrap();
        println!(
            "ticks in 6 s under the lock: {during}; stale={:?}; refused={:?}",
            m::parse_value(&held, m::SUPERVISOR_TASK_FIGURES_STALE, &[]),
            m::parse_value(&held, m::SUPERVISOR_LOCK_TIMEOUTS_TOTAL, &[])
        );
        assert!(during >= 4.0, "only {during} supervisor ticks in 6 s");
        assert_eq!(
            m::parse_value(&held, m::SUPERVISOR_TICKS_TOTAL, &[("result", "error")]),
            Some(0.0)
        );
        assert_eq!(
            m::parse_value(&held, m::SUPERVISOR_TASK_FIGURES_STALE, &[]),
            Some(1.0)
        );
        assert!(
            m::parse_value(&held, m::SUPERVISOR_LOCK_TIMEOUTS_TOTAL, &[]).unwrap_or(0.0) >= 4.0
        );
        assert_eq!(
            st["supervisor"]["task_figures_stale"], true,
            "{}",
            st["supervisor"]
        );
        // Once the lock is gone the figures are fresh again.
        assert!(
            eventually(LIMIT, || async {
                m::parse_value(
                    &scrape(&http, &base).await,
                    m::SUPERVISOR_TASK_FIGURES_STALE,
                    &[],
                ) == Some(0.0)
            })
            .await
        );
        stop(d);
    })
    .await;
}

fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("pgdata/postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// The processes whose parent is `pid`.
fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|v| v.parse::<i32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

/// Kills the stopped backend whatever the test's outcome.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0), Signal::SIGKILL);
    }
}

/// An embedded daemon whose postmaster was killed while one of its backends is stopped
/// (it keeps the dead server's shared memory attached, so every start attempt of the
/// restart fails for a while) answers SIGHUP and then SIGTERM at once, and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_are_served_while_the_embedded_server_restarts() {
    bounded(TEST_LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let cfg = format!(
            "[database]\ndata_dir = {:?}\n[agents.cat]\nkind = \"command\"\ncommand = [\"cat\"]\n",
            data.display().to_string()
        );
        let (mut d, _base) = start(dir.path(), &cfg, &[]);
        let pg = postmaster_pid(&data).expect("postmaster.pid");
        let backend = *children(pg).first().expect("a child of the postmaster");
        let _guard = KillOnDrop(backend);
        let signal = |pid: i32, s: Signal| {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), s).unwrap()
        };
        signal(backend, Signal::SIGSTOP);
        signal(pg, Signal::SIGKILL);
        let restarting =
            tokio::task::block_in_place(|| d.wait_for("exited unexpectedly; restarting it", LIMIT));
        assert!(restarting.is_some(), "no restart began:\n{}", d.drain());
        // Inside the start attempts, which fail while the stopped backend holds on.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            d.output()
                .lines()
                .all(|l| !l.contains("embedded PostgreSQL restarted")),
            "the restart did not wait for the stopped backend:\n{}",
            d.output()
        );

        d.signal(Signal::SIGHUP);
        let t = std::time::Instant::now();
        let reloaded =
            tokio::task::block_in_place(|| d.wait_for("config reloaded", Duration::from_secs(5)));
        println!("SIGHUP answered after {:?}", t.elapsed());
        assert!(
            reloaded.is_some(),
            "SIGHUP not answered during the restart:\n{}",
            d.drain()
        );

        d.signal(Signal::SIGTERM);
        let t = std::time::Instant::now();
        let stopping =
            tokio::task::block_in_place(|| d.wait_for("shutting down", Duration::from_secs(5)));
        println!("SIGTERM answered after {:?}", t.elapsed());
        assert!(
            stopping.is_some(),
            "SIGTERM not answered during the restart:\n{}",
            d.drain()
        );
        tokio::task::block_in_place(|| d.wait_exit(LIMIT));
        println!("exited {:?} after SIGTERM", t.elapsed());
        // No server is left running on the data_dir.
        if let Some(p) = postmaster_pid(&data) {
            assert!(
                !common::daemon::alive(p) || p == pg,
                "postmaster {p} outlived the daemon"
            );
        }
    })
    .await;
}
