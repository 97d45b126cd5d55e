//! Pause, resume and retry (issue 16) through the built daemon: a pause taken on one
//! instance stops the other's claims at once and shows in its status and metrics; resume
//! restarts them; a failed task retried runs again (its side effect happens twice), a
//! succeeded one is refused with 409; retries are counted apart from final failures. The
//! store-level rules (filters, run slots, the state machine) are checked at the end.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use common::daemon::{Daemon, bounded, http_client, submit_task, task_status};
use common::{TestDb, bin, eventually, promtool_check_metrics};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use taskwarden::agents::{Agent, AgentEntry, AgentError, AgentOutput, BoxFuture, TaskContext};
use taskwarden::config::Config;
use taskwarden::db::Db;
use taskwarden::metrics::parse_value;
use taskwarden::orchestrator::registry::RunningTasks;
use taskwarden::orchestrator::{Orchestrator, OrchestratorParts};
use taskwarden::store::{NewTask, RetryFilter, Store, StoreError, TaskStatus, TransitionArgs};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const LIMIT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(200);

/// A daemon config with one command agent `rec` running `script` (LOG replaced by `log`).
fn config(t: &TestDb, log: &Path, script: &str) -> String {
    let script = script.replace("LOG", log.to_str().unwrap());
    format!(
        "[database]\napplication_name = {:?}\npool_size = 4\nmax_overflow = 2\n\
         [supervisor]\ninterval = \"300ms\"\n\
         [workers]\nconcurrency = 4\nlease = \"3s\"\npoll_interval = \"{}ms\"\n\
         retry_backoff = \"10ms\"\nretry_backoff_max = \"20ms\"\n\
         [agents.rec]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", {script:?}]\nconcurrency = 4\n",
        t.application_name,
        POLL.as_millis()
    )
}

fn start(dir: &Path, cfg: &str, url: &str) -> (Daemon, String) {
    let mut d = Daemon::start(dir, cfg, &[("TASKWARDEN_DATABASE_URL", url)]);
    let base = d.base_url();
    (d, base)
}

/// Lines of the agent's log.
fn lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// How often the agent recorded payload `n`.
fn runs_of(log: &Path, n: i64) -> usize {
    lines(log)
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["n"].as_i64() == Some(n))
        .count()
}

async fn post(http: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let r = http.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(http: &reqwest::Client, url: String) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

async fn metric(http: &reqwest::Client, base: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    parse_value(&text, name, labels).unwrap_or(f64::NAN)
}

/// The CLI, run in `dir` (no config.toml there: built-in defaults, no token).
fn cli(args: &[&str], base: &str, dir: &Path) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .env("TASKWARDEN_URL", base)
        .env_remove("TASKWARDEN_API_TOKEN")
        .env_remove("TASKWARDEN_CONFIG")
        .current_dir(dir)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_on_one_instance_stops_claims_everywhere_and_resume_restarts_them() {
    bounded(Duration::from_secs(300), async {
        let t = TestDb::new().await;
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        // One log for both daemons: the agent records each payload as it starts; a "slow"
        // one then works for a while.
        let log = da.path().join("log");
        let script = "read p; echo \"$p\" >> LOG; case \"$p\" in *slow*) sleep 2;; esac";
        let cfg = config(&t, &log, script);
        let url = t.url();
        let ((mut a, base_a), (mut b, base_b)) = tokio::task::block_in_place(|| {
            (start(da.path(), &cfg, &url), start(db.path(), &cfg, &url))
        });
        let http = http_client(Duration::from_secs(30));
        let cli_dir = tempfile::tempdir().unwrap();

        // A task running when the pause comes finishes.
        let slow = submit_task(&http, &base_b, "rec", json!({"n": 1, "slow": true}))
            .await
            .unwrap();
        assert!(
            eventually(LIMIT, || async { runs_of(&log, 1) == 1 }).await,
            "the slow task never started"
        );

        // Pause through the CLI on A; at once, submit to B.
        let out = tokio::task::block_in_place(|| {
            cli(
                &["pause", "rec", "--reason", "provider outage", "--json"],
                &base_a,
                cli_dir.path(),
            )
        });
        assert!(out.status.success(), "{out:?}");
        let paused: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(paused["paused"], true, "{paused}");
        assert_eq!(paused["reason"], "provider outage", "{paused}");
        let submitted_at = Instant::now();
        let waiting = submit_task(&http, &base_b, "rec", json!({"n": 2}))
            .await
            .unwrap();

        // The running task finishes; the new one stays queued for many polls, on both
        // instances, and its program never starts.
        assert!(
            eventually(LIMIT, || async {
                task_status(&http, &base_a, slow).await.as_deref() == Some("succeeded")
            })
            .await,
            "the task running at the pause did not finish"
        );
        while submitted_at.elapsed() < POLL * 15 {
            tokio::time::sleep(POLL / 2).await;
            assert_eq!(
                task_status(&http, &base_a, waiting).await.as_deref(),
                Some("queued"),
                "claimed while paused"
            );
        }
        assert_eq!(runs_of(&log, 2), 0, "the agent ran while paused");

        // B, which did not take the pause, shows it: status (live read) and metrics (its
        // supervisor's reading), with the queue it holds back.
        let status = get(&http, format!("{base_b}/v1/status")).await;
        assert_eq!(status["paused_agents"], json!(["rec"]), "{status}");
        assert_eq!(status["queues"]["rec"]["paused"], true, "{status}");
        assert_eq!(status["queues"]["rec"]["queued"], 1, "{status}");
        let metrics_show_it = eventually(LIMIT, || async {
            metric(
                &http,
                &base_b,
                "taskwarden_agent_paused",
                &[("agent", "rec")],
            )
            .await
                == 1.0
                && metric(
                    &http,
                    &base_b,
                    "taskwarden_queue_depth",
                    &[("agent", "rec")],
                )
                .await
                    == 1.0
                && metric(
                    &http,
                    &base_b,
                    "taskwarden_queue_oldest_seconds",
                    &[("agent", "rec")],
                )
                .await
                    >= 1.0
        })
        .await;
        assert!(
            metrics_show_it,
            "B's metrics never showed the pause: paused {} depth {} oldest {}",
            metric(
                &http,
                &base_b,
                "taskwarden_agent_paused",
                &[("agent", "rec")]
            )
            .await,
            metric(
                &http,
                &base_b,
                "taskwarden_queue_depth",
                &[("agent", "rec")]
            )
            .await,
            metric(
                &http,
                &base_b,
                "taskwarden_queue_oldest_seconds",
                &[("agent", "rec")]
            )
            .await,
        );
        // The exposition with these series is what Prometheus accepts.
        let text = http
            .get(format!("{base_b}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        promtool_check_metrics(&text);

        // Resume through the API on B: the task runs, and the gauges come back down.
        let resumed_at = Instant::now();
        let (st, v) = post(&http, format!("{base_b}/v1/agents/rec/resume"), json!({})).await;
        assert_eq!((st, &v["was_paused"]), (200, &json!(true)), "{v}");
        assert!(
            eventually(LIMIT, || async {
                task_status(&http, &base_a, waiting).await.as_deref() == Some("succeeded")
            })
            .await,
            "not run after resume"
        );
        println!(
            "resume to success: {:?} (poll_interval {:?})",
            resumed_at.elapsed(),
            POLL
        );
        assert_eq!(runs_of(&log, 2), 1);
        let gauges_clear = eventually(LIMIT, || async {
            metric(
                &http,
                &base_a,
                "taskwarden_agent_paused",
                &[("agent", "rec")],
            )
            .await
                == 0.0
                && metric(
                    &http,
                    &base_a,
                    "taskwarden_queue_depth",
                    &[("agent", "rec")],
                )
                .await
                    == 0.0
        })
        .await;
        assert!(gauges_clear, "A's gauges still show a paused queue");
        // Resuming again says it was not paused; pausing an unknown agent is refused.
        let (st, v) = post(&http, format!("{base_a}/v1/agents/rec/resume"), json!({})).await;
        assert_eq!((st, &v["was_paused"]), (200, &json!(false)), "{v}");
        let (st, v) = post(&http, format!("{base_a}/v1/agents/nobody/pause"), json!({})).await;
        assert_eq!((st, &v["field"]), (400, &json!("agent")), "{v}");
        let (st, v) = post(&http, format!("{base_a}/v1/agents/a%00b/resume"), json!({})).await;
        assert_eq!((st, &v["field"]), (400, &json!("agent")), "{v}");

        for d in [&a, &b] {
            d.signal(Signal::SIGTERM);
        }
        tokio::task::block_in_place(|| {
            assert!(a.wait_exit(LIMIT).success(), "{}", a.output());
            assert!(b.wait_exit(LIMIT).success(), "{}", b.output());
        });
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_runs_a_failed_task_again_and_refuses_a_succeeded_one() {
    bounded(Duration::from_secs(300), async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        // Records every attempt; the first attempt at each payload fails.
        let script = "read p; echo \"$p\" >> LOG; \
                      if [ \"$(grep -cxF \"$p\" LOG)\" -lt 2 ]; then echo \"first try fails\" >&2; exit 1; fi";
        let cfg = config(&t, &log, script);
        let (mut d, base) =
            tokio::task::block_in_place(|| start(dir.path(), &cfg, &t.url()));
        let http = http_client(Duration::from_secs(30));
        let cli_dir = tempfile::tempdir().unwrap();

        // One attempt only: the task fails for good.
        let (st, v) = post(
            &http,
            format!("{base}/v1/tasks"),
            json!({"agent": "rec", "payload": {"n": 1}, "max_attempts": 1}),
        )
        .await;
        assert_eq!(st, 201, "{v}");
        let id = v["id"].as_i64().unwrap();
        assert!(
            eventually(LIMIT, || async {
                task_status(&http, &base, id).await.as_deref() == Some("failed")
            })
            .await
        );
        assert_eq!(runs_of(&log, 1), 1);

        // Retry through the CLI: queued again with one more attempt, then it runs again.
        let out = tokio::task::block_in_place(|| {
            cli(&["retry", &id.to_string(), "--json"], &base, cli_dir.path())
        });
        assert!(out.status.success(), "{out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["attempts"], 1, "{v}");
        assert_eq!(v["max_attempts"], 2, "{v}");
        assert_eq!(v["error"], Value::Null, "{v}");
        assert!(
            eventually(LIMIT, || async {
                task_status(&http, &base, id).await.as_deref() == Some("succeeded")
            })
            .await,
            "the retried task did not succeed"
        );
        assert_eq!(runs_of(&log, 1), 2, "the agent's side effect did not happen twice");
        let task = get(&http, format!("{base}/v1/tasks/{id}")).await;
        assert_eq!(task["attempts"], 2, "{task}");
        // The history: the failed attempt and the retry, with the error it had.
        let c = t.admin().await;
        let kinds: Vec<(String, Value)> = c
            .query(
                "SELECT kind, data FROM task_events WHERE task_id = $1 ORDER BY id",
                &[&id],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let retried = kinds.iter().find(|(k, _)| k == "retried").map(|(_, d)| d);
        assert!(
            kinds.iter().any(|(k, _)| k == "attempt_failed"),
            "{kinds:?}"
        );
        let retried = retried.unwrap_or_else(|| panic!("no retried event: {kinds:?}"));
        assert_eq!(retried["from"], "failed", "{retried}");
        assert!(
            retried["error"]
                .as_str()
                .is_some_and(|e| e.contains("first try fails")),
            "{retried}"
        );

        // A succeeded task is not retried: 409, and it does not run again.
        let (st, v) = post(&http, format!("{base}/v1/tasks/{id}/retry"), json!({})).await;
        assert_eq!(st, 409, "{v}");
        let (st, _) = post(&http, format!("{base}/v1/tasks/999999/retry"), json!({})).await;
        assert_eq!(st, 404);
        // By filter, a status no retry leaves is named; nothing retryable is left here.
        let (st, v) = post(
            &http,
            format!("{base}/v1/tasks/retry"),
            json!({"status": "succeeded"}),
        )
        .await;
        assert_eq!((st, &v["field"]), (400, &json!("status")), "{v}");
        let (st, v) = post(&http, format!("{base}/v1/tasks/retry"), json!({"agent": "rec"})).await;
        assert_eq!((st, &v["count"]), (200, &json!(0)), "{v}");

        // Two attempts allowed: the first failure is a retry, not a final failure.
        let (st, v) = post(
            &http,
            format!("{base}/v1/tasks"),
            json!({"agent": "rec", "payload": {"n": 2}, "max_attempts": 2}),
        )
        .await;
        assert_eq!(st, 201, "{v}");
        let id2 = v["id"].as_i64().unwrap();
        assert!(
            eventually(LIMIT, || async {
                task_status(&http, &base, id2).await.as_deref() == Some("succeeded")
            })
            .await
        );
        let rec = |outcome: &'static str| {
            let http = http.clone();
            let base = base.clone();
            async move {
                metric(
                    &http,
                    &base,
                    "taskwarden_tasks_finished_total",
                    &[("agent", "rec"), ("outcome", outcome)],
                )
                .await
            }
        };
        assert_eq!(rec("failed").await, 1.0, "final failures");
        assert_eq!(rec("retried").await, 1.0, "retries");
        assert_eq!(rec("succeeded").await, 2.0, "successes");
        tokio::time::sleep(POLL * 3).await;
        assert_eq!(runs_of(&log, 1), 2, "the succeeded task ran again");

        d.signal(Signal::SIGTERM);
        tokio::task::block_in_place(|| assert!(d.wait_exit(LIMIT).success(), "{}", d.output()));
    })
    .await;
}

/// Store-level rules of retry: only failed, cancelled and timed-out tasks, never a run-slot
/// task, never through the ordinary transition; by filter bounded and narrowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_by_filter_takes_only_retryable_tasks_within_its_limit() {
    let t = TestDb::new().await;
    let db: Db = t.pool(2, 0, Duration::from_secs(5));
    let store = Store::new(db, 3);
    let c = t.admin().await;
    // Three failed "a" tasks, a cancelled and a timed-out "a", a failed "b", a succeeded
    // "a", a queued "a", and a failed run-slot task.
    let mut ids = Vec::new();
    for (agent, status, session) in [
        ("a", "failed", None),
        ("a", "failed", None),
        ("a", "failed", None),
        ("a", "cancelled", None),
        ("a", "timed_out", None),
        ("b", "failed", None),
        ("a", "succeeded", None),
        ("a", "queued", None),
        ("a", "failed", Some("slot-1")),
    ] {
        let id: i64 = c
            .query_one(
                "INSERT INTO tasks (agent, status, attempts, max_attempts, session_id, error, finished_at) \
                 VALUES ($1, $2, 3, 3, $3, CASE WHEN $2 = 'queued' THEN NULL ELSE 'boom' END, \
                         CASE WHEN $2 = 'queued' THEN NULL ELSE now() END) RETURNING id",
                &[&agent, &status, &session],
            )
            .await
            .unwrap()
            .get(0);
        ids.push(id);
    }
    // The ordinary transition still refuses failed -> queued: only a retry leaves it.
    match store
        .transition(ids[0], TaskStatus::Queued, &TransitionArgs::default())
        .await
    {
        Err(StoreError::IllegalTransition { .. }) => {}
        other => panic!("failed -> queued through transition: {other:?}"),
    }
    // By filter: agent a, failed, at most two — the two lowest ids.
    let f = RetryFilter {
        agent: Some("a".into()),
        status: Some(TaskStatus::Failed),
        limit: 2,
    };
    let got: Vec<i64> = store
        .retry_tasks(&f, 1)
        .await
        .unwrap()
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(got, vec![ids[0], ids[1]]);
    // Every retryable status of agent a, with five more attempts: the rest of a's.
    let f = RetryFilter {
        agent: Some("a".into()),
        status: None,
        limit: 100,
    };
    let again = store.retry_tasks(&f, 5).await.unwrap();
    let got: Vec<i64> = again.iter().map(|t| t.id).collect();
    assert_eq!(got, vec![ids[2], ids[3], ids[4]]);
    assert!(
        again
            .iter()
            .all(|t| t.status == TaskStatus::Queued && t.max_attempts == 8 && t.attempts == 3)
    );
    // Nothing else moved: b's failed task, the succeeded, the queued and the run-slot task.
    let statuses: Vec<String> = c
        .query(
            "SELECT status FROM tasks WHERE id = ANY($1) ORDER BY id",
            &[&ids[5..].to_vec()],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(statuses, vec!["failed", "succeeded", "queued", "failed"]);
    // One by one: succeeded and queued are illegal (409), the run-slot task is refused.
    for id in [ids[6], ids[7]] {
        assert!(
            matches!(
                store.retry_task(id, 1).await,
                Err(StoreError::IllegalTransition { .. })
            ),
            "task {id}"
        );
    }
    assert!(matches!(
        store.retry_task(ids[8], 1).await,
        Err(StoreError::NotRetryable { .. })
    ));
    // A filter on a status no retry leaves, or an unbounded limit, is refused by field.
    for (f, field) in [
        (
            RetryFilter {
                agent: None,
                status: Some(TaskStatus::Succeeded),
                limit: 10,
            },
            "status",
        ),
        (
            RetryFilter {
                agent: None,
                status: None,
                limit: 0,
            },
            "limit",
        ),
    ] {
        match store.retry_tasks(&f, 1).await {
            Err(StoreError::Invalid { field: got, .. }) => assert_eq!(got, field),
            other => panic!("{f:?}: {other:?}"),
        }
    }
    // Each retry left one event with the status and error it had.
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM task_events WHERE kind = 'retried' AND data->>'error' = 'boom'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 5);
    // A retried task is claimable again.
    let claimed = store
        .claim("a", 10, "me", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(claimed.iter().any(|t| t.id == ids[0]), "{claimed:?}");
}

/// A library agent that counts its runs.
struct Counting(Arc<AtomicUsize>);
impl Agent for Counting {
    fn run(&self, _ctx: TaskContext) -> BoxFuture<Result<AgentOutput, AgentError>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(AgentOutput::default()) })
    }
}

/// A pause and a resume made by another instance (straight in the database here) reach
/// this instance's claimer: the claim statement refuses the paused agent at once, and the
/// cached pause state is read again within a poll, so the resume restarts claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_and_resume_made_elsewhere_reach_this_claimer() {
    let t = TestDb::new().await;
    let text = format!(
        "[workers]\nlease = \"5s\"\npoll_interval = \"{}ms\"\n",
        POLL.as_millis()
    );
    let mut cfg = Config::parse(&text).unwrap();
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
            "count".to_string(),
            AgentEntry {
                agent: Arc::new(Counting(Arc::clone(&runs))),
                concurrency: 4,
                timeout: Duration::from_secs(60),
                planner: false,
            },
        )]),
    });
    // Paused before this instance starts: its claimer's first reading sees the pause.
    store.pause_agent("count", "elsewhere", None).await.unwrap();
    orch.start();
    let id = orch
        .submit(&NewTask::new("count", json!({})))
        .await
        .unwrap()
        .id;
    let submitted = Instant::now();
    while submitted.elapsed() < POLL * 10 {
        tokio::time::sleep(POLL / 4).await;
        assert_eq!(
            store.get_task(id).await.unwrap().status,
            TaskStatus::Queued,
            "claimed while paused"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);

    store.resume_agent("count").await.unwrap();
    let resumed = Instant::now();
    assert!(
        eventually(LIMIT, || async {
            store.get_task(id).await.unwrap().status == TaskStatus::Succeeded
        })
        .await,
        "a resume made elsewhere never restarted this instance's claims"
    );
    println!(
        "resume elsewhere to success here: {:?} (poll_interval {POLL:?})",
        resumed.elapsed()
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_never_takes_an_active_unique_key_another_task_holds() {
    let t = TestDb::new().await;
    let db: Db = t.pool(2, 0, Duration::from_secs(5));
    let store = Store::new(db, 3);
    let c = t.admin().await;
    // A failed task that held key k, and a newer queued task that holds k now.
    let mut ids = Vec::new();
    for status in ["failed", "queued"] {
        let id: i64 = c
            .query_one(
                "INSERT INTO tasks (agent, status, attempts, max_attempts, error, finished_at, unique_key, unique_scope) \
                 VALUES ('a', $1, 1, 1, CASE WHEN $1 = 'failed' THEN 'boom' END, \
                         CASE WHEN $1 = 'failed' THEN now() END, 'k', 'active') RETURNING id",
                &[&status],
            )
            .await
            .unwrap()
            .get(0);
        ids.push(id);
    }
    match store.retry_task(ids[0], 1).await {
        Err(StoreError::NotRetryable { id, reason }) => {
            assert_eq!(id, ids[0]);
            assert!(reason.contains("unique_key"), "{reason}");
        }
        other => panic!("retry while the key is held elsewhere: {other:?}"),
    }
    // By filter it is skipped, not an error.
    let f = RetryFilter {
        agent: Some("a".into()),
        status: Some(TaskStatus::Failed),
        limit: 10,
    };
    assert!(store.retry_tasks(&f, 1).await.unwrap().is_empty());
    // Once the holder has finished, the retry goes through.
    c.execute(
        "UPDATE tasks SET status = 'succeeded', finished_at = now() WHERE id = $1",
        &[&ids[1]],
    )
    .await
    .unwrap();
    let again = store.retry_task(ids[0], 1).await.unwrap();
    assert_eq!(again.status, TaskStatus::Queued);
}
