//! Periodic tasks, per-agent rate limits and snooze, driven through the built binary
//! against real PostgreSQL: two daemons share one database and coordinate through it only.

mod common;

use std::path::Path;
use std::time::Duration;

use common::daemon::Daemon;
use common::{TestDb, count, eventually, promtool_check_metrics};
use nix::sys::signal::Signal;

const READY: &str = "taskwarden ready";
const LIMIT: Duration = Duration::from_secs(120);

/// A config with one command agent `rec` running `script` (LOG replaced by `log`), plus
/// `extra` (agent keys such as `rate`, then further sections).
fn config(t: &TestDb, log: &Path, script: &str, agent_extra: &str, extra: &str) -> String {
    let script = script.replace("LOG", log.to_str().unwrap());
    format!(
        "[database]\napplication_name = {:?}\npool_size = 6\nmax_overflow = 2\n\
         [workers]\nconcurrency = 8\nlease = \"2s\"\npoll_interval = \"100ms\"\n\
         [agents.rec]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", {script:?}]\nconcurrency = 8\n\
         {agent_extra}\n{extra}\n",
        t.application_name
    )
}

fn start(dir: &Path, cfg: &str, url: &str) -> Daemon {
    let mut d = Daemon::start(dir, cfg, &[("TASKWARDEN_DATABASE_URL", url)]);
    let ready = d.wait_for(READY, LIMIT);
    assert!(ready.is_some(), "never ready:\n{}", d.output());
    d
}

fn start_two(t: &TestDb, cfg_a: &str, cfg_b: &str, da: &Path, db: &Path) -> (Daemon, Daemon) {
    let url = t.url();
    tokio::task::block_in_place(|| (start(da, cfg_a, &url), start(db, cfg_b, &url)))
}

fn stop(mut ds: Vec<Daemon>) {
    for d in &ds {
        d.signal(Signal::SIGTERM);
    }
    tokio::task::block_in_place(|| {
        for d in &mut ds {
            assert!(d.wait_exit(LIMIT).success(), "{}", d.output());
        }
    });
}

fn lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_second_schedule_on_two_daemons_queues_each_due_time_once() {
    let t = TestDb::new().await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (log_a, log_b) = (da.path().join("log"), db.path().join("log"));
    let script = "read p; echo \"$TASKWARDEN_TASK_ID\" >> LOG";
    let sched = "[schedules.tick]\ncron = \"*/2 * * * * *\"\nagent = \"rec\"\npayload = { kind = \"tick\" }\n";
    let cfg_a = config(&t, &log_a, script, "", sched);
    let cfg_b = config(&t, &log_b, script, "", sched);
    let (mut a, mut b) = start_two(&t, &cfg_a, &cfg_b, da.path(), db.path());
    let c = t.admin().await;

    // Ten seconds of both daemons running the schedule, dated by the database's clock.
    let t0: chrono::DateTime<chrono::Utc> = c.query_one("SELECT now()", &[]).await.unwrap().get(0);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let t1: chrono::DateTime<chrono::Utc> = c.query_one("SELECT now()", &[]).await.unwrap().get(0);
    // Let the last due time's run finish.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let rows = c
        .query(
            "SELECT id, scheduled_at, payload, status FROM tasks WHERE schedule = 'tick' \
             AND scheduled_at > $1 AND scheduled_at <= $2 ORDER BY scheduled_at",
            &[&t0, &t1],
        )
        .await
        .unwrap();
    let dues: Vec<chrono::DateTime<chrono::Utc>> = rows.iter().map(|r| r.get(1)).collect();
    println!("due times queued in 10 s: {dues:?}");
    assert!(
        (4..=6).contains(&dues.len()),
        "expected 5 ± 1 runs, got {}:\n{}",
        dues.len(),
        tokio::task::block_in_place(|| a.drain())
    );
    // Due times on the schedule's grid, each once: consecutive ones 2 s apart (a multiple
    // of 2 s only if a pass ran more than a period late, which the missed-run policy
    // collapses; never less).
    for w in dues.windows(2) {
        let gap = (w[1] - w[0]).num_milliseconds();
        assert!(gap >= 2000 && gap % 2000 == 0, "{dues:?}");
    }
    for r in &rows {
        assert_eq!(
            r.get::<_, serde_json::Value>(2),
            serde_json::json!({"kind": "tick"})
        );
    }
    // Nothing queued twice overall: one task per due time, and every queued task came
    // from one insert that a daemon logged (a second insert could not have been logged).
    assert_eq!(
        count(
            &c,
            "SELECT count(*) - count(DISTINCT scheduled_at) FROM tasks WHERE schedule = 'tick'"
        )
        .await,
        0
    );
    let total = count(&c, "SELECT count(*) FROM tasks WHERE schedule = 'tick'").await;
    let (by_a, by_b) = tokio::task::block_in_place(|| {
        (
            a.drain().matches("periodic task queued").count(),
            b.drain().matches("periodic task queued").count(),
        )
    });
    println!("runs queued by daemon A: {by_a}, by daemon B: {by_b}");
    let logged = by_a + by_b;
    assert_eq!(logged as i64, total, "queue log lines vs tasks");
    // And each ran once (the agents' side-effect logs, both daemons together).
    let ran: Vec<String> = lines(&log_a).into_iter().chain(lines(&log_b)).collect();
    let mut uniq = ran.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), ran.len(), "a scheduled task ran twice: {ran:?}");
    for r in &rows {
        let id: i64 = r.get(0);
        assert!(ran.contains(&id.to_string()), "task {id} never ran");
    }
    // The schedules row holds the latest due time.
    let last: chrono::DateTime<chrono::Utc> = c
        .query_one("SELECT last_due FROM schedules WHERE name = 'tick'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(last >= *dues.last().unwrap());

    // Status shows the schedule with its next and last due time.
    let base = tokio::task::block_in_place(|| a.base_url());
    let st: serde_json::Value = reqwest::get(format!("{base}/v1/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let s = &st["schedules"]["tick"];
    assert_eq!(s["cron"], "*/2 * * * * *", "{st}");
    assert!(
        s["last_due"].is_string() && s["next_due"].is_string(),
        "{s}"
    );
    stop(vec![a, b]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_of_ten_per_second_holds_over_two_daemons() {
    let t = TestDb::new().await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (log_a, log_b) = (da.path().join("log"), db.path().join("log"));
    let script = "read p; echo \"$TASKWARDEN_TASK_ID\" >> LOG";
    let rate = "rate = \"10/sec\"";
    let cfg_a = config(&t, &log_a, script, rate, "");
    let cfg_b = config(&t, &log_b, script, rate, "");
    let (mut a, b) = start_two(&t, &cfg_a, &cfg_b, da.path(), db.path());
    let c = t.admin().await;
    c.batch_execute(
        "INSERT INTO tasks (agent, payload) SELECT 'rec', jsonb_build_object('n', i) FROM generate_series(1, 300) i",
    )
    .await
    .unwrap();
    let t0: chrono::DateTime<chrono::Utc> = c.query_one("SELECT now()", &[]).await.unwrap().get(0);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Starts per aligned one-second window (a rated claim dates started_at with the
    // instant its rate row allowed it): never more than 10, whichever daemon claimed.
    let per_window = c
        .query(
            "SELECT floor(extract(epoch FROM started_at))::bigint AS w, count(*) FROM tasks \
             WHERE started_at IS NOT NULL GROUP BY w ORDER BY w",
            &[],
        )
        .await
        .unwrap();
    let windows: Vec<(i64, i64)> = per_window.iter().map(|r| (r.get(0), r.get(1))).collect();
    println!("claims per second: {windows:?}");
    assert!(windows.iter().all(|(_, n)| *n <= 10), "{windows:?}");
    let first3: i64 = c
        .query_one(
            "SELECT count(*) FROM tasks WHERE started_at >= $1 \
             AND started_at < $1 + interval '3 s'",
            &[&t0],
        )
        .await
        .unwrap()
        .get(0);
    println!("started in the first 3 s: {first3}");
    assert!(first3 <= 40, "{first3} started in 3 s at 10/sec");
    assert!(
        first3 >= 10,
        "only {first3} started in 3 s at 10/sec:\n{}",
        tokio::task::block_in_place(|| a.drain())
    );
    // Both daemons took part, and neither ran a task twice.
    let (ra, rb) = (lines(&log_a), lines(&log_b));
    assert!(
        !ra.is_empty() && !rb.is_empty(),
        "a: {}, b: {}",
        ra.len(),
        rb.len()
    );
    // Throttled claims are counted, and the exposition passes promtool.
    let base = a.base_url();
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("taskwarden_claims_throttled_total{agent=\"rec\"}")),
        "{text}"
    );
    promtool_check_metrics(&text);
    stop(vec![a, b]);
    let ran = count(&c, "SELECT count(*) FROM tasks WHERE status = 'succeeded'").await;
    assert_eq!(ran as usize, lines(&log_a).len() + lines(&log_b).len());
}

/// The most starts of `times` (sorted) within any half-open window `[s, s + period)`.
fn most_in_any_window(times: &[f64], period: f64) -> usize {
    let mut most = 0;
    let mut lo = 0;
    for hi in 0..times.len() {
        while times[hi] - times[lo] >= period {
            lo += 1;
        }
        most = most.max(hi - lo + 1);
    }
    most
}

/// Sleeps until the database's clock is `phase` seconds into a `period`-second window
/// aligned to the epoch (the old fixed windows' boundaries).
async fn sleep_until_phase(c: &tokio_postgres::Client, period: f64, phase: f64) {
    let now: f64 = c
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .await
        .unwrap()
        .get(0);
    let into = now.rem_euclid(period);
    let wait = (phase - into).rem_euclid(period);
    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
}

/// `rate = "20/5s"` on two daemons: a burst submitted just before a 5-second boundary
/// of the clock (where a fixed window turns) never starts more than 20 tasks in any
/// 5 seconds — checked from the tasks' `started_at` (the database's clock) and from the
/// agent's own log of every attempt it began (retries included, the host's clock), with
/// a big prefetch configured that must not claim ahead of the rate — and every task
/// still succeeds, none lost or run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_holds_in_every_window_of_its_period_across_a_boundary_on_two_daemons() {
    let t = TestDb::new().await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (log_a, log_b) = (da.path().join("log"), db.path().join("log"));
    // Every attempt logs its start; a fifth of the tasks fail their first attempt.
    let script = "read p; echo \"$(date +%s.%N) $TASKWARDEN_TASK_ID $TASKWARDEN_ATTEMPT\" >> LOG; \
                  if [ \"$TASKWARDEN_ATTEMPT\" = 1 ] && [ $((TASKWARDEN_TASK_ID % 5)) = 0 ]; then exit 1; fi";
    let rate = "rate = \"20/5s\"";
    let workers =
        "[workers]\nprefetch = 400\nretry_backoff = \"100ms\"\nretry_backoff_max = \"200ms\"\n";
    let cfg = |log: &Path| {
        config(&t, log, script, rate, "")
            .replace("[workers]\n", workers)
            .replace("poll_interval = \"100ms\"", "poll_interval = \"5s\"")
    };
    let (cfg_a, cfg_b) = (cfg(&log_a), cfg(&log_b));
    let (mut a, b) = start_two(&t, &cfg_a, &cfg_b, da.path(), db.path());
    let c = t.admin().await;
    const TASKS: i64 = 50;
    // 4.2 s into a 5-second window: the old fixed window let 20 start now and 20 more
    // in 0.8 s.
    sleep_until_phase(&c, 5.0, 4.2).await;
    c.batch_execute(&format!(
        "INSERT INTO tasks (agent, payload) SELECT 'rec', jsonb_build_object('n', i) \
         FROM generate_series(1, {TASKS}) i"
    ))
    .await
    .unwrap();
    let done = eventually(Duration::from_secs(60), || async {
        count(&c, "SELECT count(*) FROM tasks WHERE status = 'succeeded'").await == TASKS
    })
    .await;
    let started: Vec<f64> = c
        .query(
            "SELECT extract(epoch FROM started_at)::float8 FROM tasks \
             WHERE started_at IS NOT NULL ORDER BY started_at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut begun: Vec<(f64, String)> = lines(&log_a)
        .into_iter()
        .chain(lines(&log_b))
        .filter_map(|l| {
            let (at, which) = l.split_once(' ')?;
            Some((at.parse().ok()?, which.to_string()))
        })
        .collect();
    begun.sort_by(|x, y| x.0.total_cmp(&y.0));
    let begun_at: Vec<f64> = begun.iter().map(|b| b.0).collect();
    let t0 = started.first().copied().unwrap_or_default();
    println!(
        "starts (s after the first, database clock): {:?}",
        started
            .iter()
            .map(|s| ((s - t0) * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>()
    );
    let in_db = most_in_any_window(&started, 5.0);
    let in_log = most_in_any_window(&begun_at, 4.0);
    println!(
        "most starts in any 5 s (started_at): {in_db}; in any 4 s (the agent's log of all {} attempts): {in_log}",
        begun.len()
    );
    assert!(
        done,
        "not every task succeeded:\n{}",
        tokio::task::block_in_place(|| a.drain())
    );
    assert!(in_db <= 20, "{in_db} tasks started within 5 s at 20/5s");
    // The agent's log is dated by the host when the program ran, a little after the
    // claim: a second of slack for spawning under load.
    assert!(in_log <= 20, "{in_log} attempts began within 4 s at 20/5s");
    // Every attempt ran once: one line per (task, attempt), as many as the attempts.
    let mut which: Vec<&String> = begun.iter().map(|b| &b.1).collect();
    which.sort();
    which.dedup();
    assert_eq!(which.len(), begun.len(), "an attempt ran twice");
    let attempts = count(&c, "SELECT sum(attempts)::bigint FROM tasks").await;
    assert_eq!(attempts as usize, begun.len());
    assert!(attempts > TASKS, "no task was retried: {attempts} attempts");
    // How close to the rate the starts came: printed, not asserted (no test checks how
    // fast). With poll_interval at 5 s, a claimer that waited for its poll after each
    // throttled claim instead of the schedule's next start would miss the 60 s above.
    let span = begun_at.last().unwrap() - begun_at.first().unwrap();
    let ideal = (attempts - 1) as f64 / 4.0;
    println!("{attempts} attempts over {span:.2} s (ideal {ideal:.2} s)");
    // Both daemons took part.
    assert!(!lines(&log_a).is_empty() && !lines(&log_b).is_empty());
    stop(vec![a, b]);
}

/// After downtime over several due times, one run is queued — for the latest missed due
/// time — and the others are counted as skipped; a second call at once queues nothing.
#[tokio::test]
async fn missed_due_times_queue_one_run_for_the_latest() {
    use taskwarden::store::{Fired, ScheduledTask, Store};
    let t = TestDb::new().await;
    let store = Store::new(t.pool(2, 0, Duration::from_secs(5)), 3);
    let c = t.admin().await;
    // The schedule last ran 10 min ago: 10 due times of "* * * * *" have passed since.
    c.batch_execute(
        "INSERT INTO schedules (name, last_due) \
         VALUES ('m', date_trunc('minute', now()) - interval '10 min')",
    )
    .await
    .unwrap();
    let cron = taskwarden::config::parse_cron("* * * * *").unwrap();
    let payload = serde_json::json!({"n": 1});
    let task = ScheduledTask {
        schedule: "m",
        agent: "rec",
        payload: &payload,
        priority: 2,
    };
    let Fired::Queued {
        due,
        task_id,
        skipped,
        ..
    } = store.fire_schedule(&cron, &task).await.unwrap()
    else {
        panic!("nothing queued")
    };
    assert_eq!(skipped, 9);
    let row = c
        .query_one(
            "SELECT date_trunc('minute', now()), scheduled_at, schedule, priority, payload, max_attempts \
             FROM tasks WHERE id = $1",
            &[&task_id],
        )
        .await
        .unwrap();
    let latest: chrono::DateTime<chrono::Utc> = row.get(0);
    assert_eq!(due, latest);
    assert_eq!(row.get::<_, chrono::DateTime<chrono::Utc>>(1), latest);
    assert_eq!(row.get::<_, String>(2), "m");
    assert_eq!(row.get::<_, i32>(3), 2);
    assert_eq!(row.get::<_, serde_json::Value>(4), payload);
    assert_eq!(row.get::<_, i32>(5), 3);
    assert!(matches!(
        store.fire_schedule(&cron, &task).await.unwrap(),
        Fired::NotDue { .. }
    ));
    assert_eq!(count(&c, "SELECT count(*) FROM tasks").await, 1);
    // A schedule never seen before starts now: nothing is queued for past due times.
    let fresh = ScheduledTask {
        schedule: "fresh",
        ..task
    };
    assert!(matches!(
        store.fire_schedule(&cron, &fresh).await.unwrap(),
        Fired::NotDue { .. }
    ));
    assert_eq!(count(&c, "SELECT count(*) FROM schedules").await, 2);
}

/// A command agent that snoozes once (`{"snooze": 2}`) and then succeeds: the task ends
/// succeeded with one counted attempt, ran twice, the second time not before the snooze
/// time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snooze_runs_again_later_without_using_an_attempt() {
    let t = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let script = "read p; echo \"$TASKWARDEN_ATTEMPT\" >> LOG; \
                  if [ -e LOG.snoozed ]; then echo '{\"result\": \"done\"}'; \
                  else touch LOG.snoozed; echo '{\"snooze\": 2}'; fi";
    let cfg = config(&t, &log, script, "", "");
    let url = t.url();
    let d = tokio::task::block_in_place(|| start(dir.path(), &cfg, &url));
    let c = t.admin().await;
    // One attempt only: were the snooze counted, the second run would be a second attempt.
    let id: i64 = c
        .query_one(
            "INSERT INTO tasks (agent, payload, max_attempts) VALUES ('rec', '{}', 1) RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // Snoozed: back in the queue, the attempt given back, due 2 s after the snooze.
    let snoozed = format!(
        "SELECT count(*) FROM tasks WHERE id = {id} AND status = 'queued' AND attempts = 0 \
         AND run_after > now() + interval '1 s'"
    );
    let seen = eventually(Duration::from_secs(30), || async {
        count(&c, &snoozed).await == 1
    })
    .await;
    assert!(seen, "never seen snoozed");
    let snooze_until: chrono::DateTime<chrono::Utc> = c
        .query_one("SELECT run_after FROM tasks WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    let done = eventually(Duration::from_secs(30), || async {
        count(
            &c,
            &format!("SELECT count(*) FROM tasks WHERE id = {id} AND status = 'succeeded'"),
        )
        .await
            == 1
    })
    .await;
    assert!(done, "never succeeded");
    let row = c
        .query_one(
            "SELECT attempts, started_at, result, \
             (SELECT count(*) FROM task_events WHERE task_id = $1 AND kind = 'snoozed') \
             FROM tasks WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1, "one counted attempt");
    let second_start: chrono::DateTime<chrono::Utc> = row.get(1);
    assert!(
        second_start >= snooze_until,
        "ran again at {second_start}, before the snooze time {snooze_until}"
    );
    assert_eq!(
        row.get::<_, serde_json::Value>(2),
        serde_json::json!("done")
    );
    assert_eq!(row.get::<_, i64>(3), 1, "one snoozed event");
    // Ran twice, each time as attempt 1.
    assert_eq!(lines(&log), ["1", "1"]);
    stop(vec![d]);
}

/// A library agent snoozes with `AgentOutput::snooze` on its first call and succeeds on its
/// second: the same outcome as a command agent's `{"snooze": N}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_agent_snoozes_with_agent_output_snooze() {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use arc_swap::ArcSwap;
    use taskwarden::agents::{Agent, AgentEntry, AgentError, AgentOutput, BoxFuture, TaskContext};
    use taskwarden::config::Config;
    use taskwarden::db::Db;
    use taskwarden::orchestrator::registry::RunningTasks;
    use taskwarden::orchestrator::{Orchestrator, OrchestratorParts};
    use taskwarden::store::{NewTask, Store, TaskStatus};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    struct SnoozeOnce(Arc<AtomicUsize>);
    impl Agent for SnoozeOnce {
        fn run(&self, _ctx: TaskContext) -> BoxFuture<Result<AgentOutput, AgentError>> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                Ok(if n == 0 {
                    AgentOutput::snooze(Duration::from_millis(1500))
                } else {
                    AgentOutput::result(serde_json::json!("done"))
                })
            })
        }
    }

    let db_admin = TestDb::new().await;
    let t = &db_admin;
    let mut cfg = Config::parse("[workers]\nlease = \"5s\"\npoll_interval = \"100ms\"\n").unwrap();
    cfg.database = t.config(4, 0, Duration::from_secs(5));
    let metrics = taskwarden::metrics::Metrics::new();
    let db = Db::new(t.pg.clone(), &cfg.database, &metrics).unwrap();
    let store = Store::new(db.clone(), 3);
    let runs = Arc::new(AtomicUsize::new(0));
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let orch = Orchestrator::new(OrchestratorParts {
        config: Arc::new(ArcSwap::from_pointee(cfg)),
        pg: t.pg.clone(),
        db,
        store: store.clone(),
        running: RunningTasks::new(),
        hub: Default::default(),
        metrics,
        instance_id: "here".into(),
        shutdown,
        tasks: TaskTracker::new(),
        extra_agents: BTreeMap::from([(
            "lib".to_string(),
            AgentEntry {
                agent: Arc::new(SnoozeOnce(Arc::clone(&runs))),
                concurrency: 1,
                timeout: Duration::from_secs(60),
                planner: false,
            },
        )]),
    });
    orch.start();
    let mut task = NewTask::new("lib", serde_json::json!({}));
    task.max_attempts = Some(1);
    let id = orch.submit(&task).await.unwrap().id;
    let done = eventually(Duration::from_secs(30), || async {
        store.get_task(id).await.unwrap().status == TaskStatus::Succeeded
    })
    .await;
    assert!(done, "never succeeded");
    let task = store.get_task(id).await.unwrap();
    assert_eq!(task.attempts, 1, "the snoozed attempt is not counted");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    // The second start came at least the snooze's delay after the snooze was recorded.
    let c = db_admin.admin().await;
    let gap: f64 = c
        .query_one(
            "SELECT extract(epoch FROM t.started_at - e.created_at)::float8 \
             FROM tasks t JOIN task_events e ON e.task_id = t.id AND e.kind = 'snoozed' \
             WHERE t.id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(gap >= 1.4, "ran again {gap} s after the snooze");
}
