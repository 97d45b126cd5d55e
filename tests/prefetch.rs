//! The claimer's prefetch: a busy instance holds tasks claimed ahead (more rows `running`
//! under its lease than it has slots), and at shutdown hands back the ones it never
//! started, so nothing waits for a lease to lapse and nothing runs twice.

mod common;

use std::path::Path;
use std::time::Duration;

use common::daemon::Daemon;
use common::{TestDb, count, eventually, payload_counts};
use nix::sys::signal::Signal;

const LIMIT: Duration = Duration::from_secs(120);
const TASKS: i64 = 3000;
const CONCURRENCY: i64 = 4;
/// Stops tried before the test gives up on catching the local queue non-empty.
const STOPS: usize = 5;

fn config(t: &TestDb, log: &Path) -> String {
    let script = format!("read p; echo \"$p\" >> {}", log.display());
    format!(
        "[database]\napplication_name = {:?}\n\
         [workers]\nconcurrency = {CONCURRENCY}\nlease = \"30s\"\nshutdown_grace = \"10s\"\n\
         [agents.rec]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", {script:?}]\nconcurrency = {CONCURRENCY}\n",
        t.application_name
    )
}

/// A daemon on `cfg`, once it says it is ready.
fn start_ready(dir: &Path, cfg: &str, env: &[(&str, &str)]) -> Daemon {
    let mut d = Daemon::start(dir, cfg, env);
    assert!(
        d.wait_for("taskwarden ready", LIMIT).is_some(),
        "{}",
        d.output()
    );
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetched_tasks_are_handed_back_at_shutdown_and_run_once() {
    let t = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let cfg = config(&t, &log);
    let url = t.url();
    let env = [("TASKWARDEN_DATABASE_URL", url.as_str())];
    let c = t.admin().await;
    c.batch_execute(&format!(
        "INSERT INTO tasks (agent, payload) SELECT 'rec', jsonb_build_object('n', i) \
         FROM generate_series(1, {TASKS}) i"
    ))
    .await
    .unwrap();
    // The local queue's size follows the finishes of the last moments, so at the instant
    // the signal lands it may just have been emptied into freed slots: then there is
    // nothing to hand back, and this stop proves nothing. Stop and start again until a stop
    // catches tasks claimed ahead (one CI run in many saw an empty queue);
    // every stop must leave nothing leased to the stopped instance either way.
    let mut handed_back = false;
    for round in 1..=STOPS {
        let mut d = start_ready(dir.path(), &cfg, &env);
        let before = count(&c, "SELECT count(*) FROM tasks WHERE status = 'succeeded'").await;
        // Claimed ahead: more rows running under this instance's lease than it has
        // slots, seen once the instance is in its stride.
        let most = std::sync::atomic::AtomicI64::new(0);
        let prefetching = eventually(Duration::from_secs(60), || async {
            let running = count(&c, "SELECT count(*) FROM tasks WHERE status = 'running'").await;
            most.fetch_max(running, std::sync::atomic::Ordering::Relaxed);
            running > CONCURRENCY
                && count(&c, "SELECT count(*) FROM tasks WHERE status = 'succeeded'").await
                    >= before + 200
        })
        .await;
        assert!(
            prefetching,
            "round {round}: never more than {most:?} running with {CONCURRENCY} slots"
        );
        d.signal(Signal::SIGTERM);
        let st = tokio::task::block_in_place(|| d.wait_exit(LIMIT));
        assert!(st.success(), "{}", d.output());
        // Nothing is left leased to the stopped instance, and what was handed back looks
        // untouched: no attempt used, no lease.
        assert_eq!(
            count(&c, "SELECT count(*) FROM tasks WHERE status = 'running'").await,
            0,
            "round {round}: {}",
            d.output()
        );
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM tasks WHERE status = 'queued' \
                 AND (attempts <> 0 OR lease_owner IS NOT NULL OR lease_expires_at IS NOT NULL)"
            )
            .await,
            0
        );
        let queued = count(&c, "SELECT count(*) FROM tasks WHERE status = 'queued'").await;
        assert!(
            queued > 0,
            "everything finished before the stop; nothing to hand back"
        );
        if d.output().contains("prefetched tasks handed back") {
            handed_back = true;
            break;
        }
    }
    assert!(
        handed_back,
        "{STOPS} stops, none with tasks claimed ahead to hand back"
    );

    // A new instance finishes the rest; every task ran exactly once.
    let mut d = start_ready(dir.path(), &cfg, &env);
    let done = eventually(Duration::from_secs(240), || async {
        count(&c, "SELECT count(*) FROM tasks WHERE status = 'succeeded'").await == TASKS
    })
    .await;
    assert!(done, "not all succeeded:\n{}", d.drain());
    let ran = payload_counts(&log);
    assert_eq!(ran.len() as i64, TASKS);
    let twice: Vec<_> = ran.iter().filter(|(_, k)| **k != 1).collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM tasks WHERE attempts <> 1").await,
        0
    );
}

/// Work queued before the daemon starts sends no notification: the claimer's first round
/// must not wait for `poll_interval` (here a minute; it did, costing a second per start
/// at the default and the whole interval at a long one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_queued_before_the_start_runs_without_waiting_a_poll_interval() {
    let t = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let cfg = config(&t, &log).replace("[workers]\n", "[workers]\npoll_interval = \"60s\"\n");
    let c = t.admin().await;
    c.batch_execute(
        "INSERT INTO tasks (agent, payload) SELECT 'rec', jsonb_build_object('n', i) \
         FROM generate_series(1, 20) i",
    )
    .await
    .unwrap();
    let url = t.url();
    let env = [("TASKWARDEN_DATABASE_URL", url.as_str())];
    let mut d = start_ready(dir.path(), &cfg, &env);
    // Half the poll interval: generous for 20 shell commands, short of the first poll.
    let done = eventually(Duration::from_secs(30), || async {
        count(&c, "SELECT count(*) FROM tasks WHERE status = 'succeeded'").await == 20
    })
    .await;
    assert!(done, "the backlog waited for a poll:\n{}", d.drain());
}
