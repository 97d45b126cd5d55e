//! The orchestrator against a real PostgreSQL: run slots (the third seed's four
//! scenarios), churn, command and HTTP agents, retries, objectives.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use common::{TestDb, count, eventually};
use taskwarden::agents::{Agent, AgentEntry, AgentError, AgentOutput, BoxFuture, TaskContext};
use taskwarden::config::Config;
use taskwarden::daemon::Parts;
use taskwarden::db::Db;
use taskwarden::orchestrator::registry::RunningTasks;
use taskwarden::orchestrator::{Orchestrator, OrchestratorError};
use taskwarden::store::{
    NewObjective, NewStep, NewTask, ObjectiveStatus, Store, StoreError, Task, TaskStatus,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A library agent that does nothing: for churn.
struct Noop;
impl Agent for Noop {
    fn run(&self, _ctx: TaskContext) -> BoxFuture<Result<AgentOutput, AgentError>> {
        Box::pin(async { Ok(AgentOutput::default()) })
    }
}

/// A library agent whose every attempt fails at once, for good or retryably as the
/// payload's `retry` says.
struct FailNow;
impl Agent for FailNow {
    fn run(&self, ctx: TaskContext) -> BoxFuture<Result<AgentOutput, AgentError>> {
        let retry = ctx.payload["retry"].as_bool().unwrap_or(false);
        Box::pin(async move {
            Err(AgentError {
                message: "no".into(),
                retryable: retry,
            })
        })
    }
}

struct Rig {
    t: TestDb,
    /// Wired as the daemon wires it (`Parts::start`); the fields below are its parts.
    parts: Parts,
    orch: Orchestrator,
    store: Store,
    db: Db,
    running: Arc<RunningTasks>,
    dir: tempfile::TempDir,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.parts.shutdown.cancel();
        self.running.cancel_all();
    }
}

/// `agents` is TOML for `[agents.*]`; `{dir}` in it is replaced by a temp dir.
async fn rig(agents: &str, extra: &str) -> Rig {
    rig_with(agents, extra, |_| {}).await
}

/// [`rig`], with `tweak` applied to the parsed configuration.
async fn rig_with(agents: &str, extra: &str, tweak: impl FnOnce(&mut Config)) -> Rig {
    let t = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[workers]\nconcurrency = 20\nlease = \"5s\"\npoll_interval = \"200ms\"\nretry_backoff = \"10ms\"\nretry_backoff_max = \"50ms\"\n{extra}\n{}",
        agents.replace("{dir}", dir.path().to_str().unwrap())
    );
    let mut cfg = Config::parse(&text).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
    cfg.database = t.config(10, 5, Duration::from_secs(5));
    tweak(&mut cfg);
    let mut extra_agents = BTreeMap::new();
    extra_agents.insert(
        "noop".to_string(),
        AgentEntry {
            agent: Arc::new(Noop),
            concurrency: 20,
            timeout: Duration::from_secs(60),
            planner: false,
        },
    );
    extra_agents.insert(
        "fail".to_string(),
        AgentEntry {
            agent: Arc::new(FailNow),
            concurrency: 20,
            timeout: Duration::from_secs(60),
            planner: false,
        },
    );
    let parts = Parts::start(
        t.pg.clone(),
        Arc::new(ArcSwap::from_pointee(cfg)),
        extra_agents,
    )
    .await
    .unwrap();
    Rig {
        t,
        orch: parts.orchestrator.clone(),
        store: parts.store.clone(),
        db: parts.db.clone(),
        running: Arc::clone(&parts.running),
        parts,
        dir,
    }
}

impl Rig {
    async fn wait_status(&self, id: i64, status: TaskStatus) -> Task {
        let ok = eventually(Duration::from_secs(30), || async {
            self.store.get_task(id).await.unwrap().status == status
        })
        .await;
        let t = self.store.get_task(id).await.unwrap();
        assert!(
            ok,
            "task {id} is {} ({:?}), expected {status}",
            t.status, t.error
        );
        t
    }
    async fn events(&self, id: i64) -> Vec<taskwarden::store::TaskEvent> {
        self.store.task_events(id, 0, 1000).await.unwrap()
    }
}

fn task(agent: &str, payload: serde_json::Value) -> NewTask {
    NewTask::new(agent, payload)
}

const SLEEPY: &str =
    "[agents.sleepy]\nkind = \"command\"\ncommand = [\"sleep\", \"30\"]\nconcurrency = 20\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_run_is_running_when_the_call_returns() {
    let r = rig(SLEEPY, "").await;
    let t = r
        .orch
        .run_in_slot("s1", task("sleepy", serde_json::json!({})))
        .await
        .unwrap();
    assert_eq!(t.status, TaskStatus::Running);
    // Not only in the returned value: in the database and in this process.
    assert_eq!(
        r.store.get_task(t.id).await.unwrap().status,
        TaskStatus::Running
    );
    assert_eq!(r.running.snapshot()[0].task_id, t.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitted_task_is_picked_up_and_finished() {
    let r = rig(
        "[agents.ok]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"cat >/dev/null; echo '{\\\"result\\\": 42}'\"]\n",
        "",
    )
    .await;
    let t = r
        .orch
        .submit(&task("ok", serde_json::json!({"q": 1})))
        .await
        .unwrap();
    let done = r.wait_status(t.id, TaskStatus::Succeeded).await;
    assert_eq!(done.result, Some(serde_json::json!(42)));
    assert_eq!(done.attempts, 1);
    assert!(matches!(
        r.orch.submit(&task("nobody", serde_json::json!({}))).await,
        Err(OrchestratorError::UnknownAgent { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_a_long_task_starts_the_new_one_at_once_and_cancels_the_old() {
    let r = rig(SLEEPY, "").await;
    let old = r
        .orch
        .run_in_slot("s", task("sleepy", serde_json::json!({})))
        .await
        .unwrap();
    // The old run would sleep 30 s: the call must not wait for it. The limit only guards
    // against a hang.
    let new = tokio::time::timeout(
        Duration::from_secs(60),
        r.orch
            .run_in_slot("s", task("sleepy", serde_json::json!({}))),
    )
    .await
    .expect("the replacing call did not return")
    .unwrap();
    // When the call returns, the old run has ended here (the call cancels and awaits it
    // before returning): only the new one still runs. Read first, before any other await.
    let here: Vec<i64> = r.running.snapshot().iter().map(|t| t.task_id).collect();
    assert_eq!(here, vec![new.id]);
    // The new task runs (returned, and in the database)...
    assert_eq!(new.status, TaskStatus::Running);
    assert_eq!(
        r.store.get_task(new.id).await.unwrap().status,
        TaskStatus::Running
    );
    // ...and the old one is cancelled in the database, with the reason.
    let old = r.store.get_task(old.id).await.unwrap();
    assert_eq!(old.status, TaskStatus::Cancelled);
    assert_eq!(
        old.error.as_deref(),
        Some(&*format!("replaced by task {}", new.id))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_rapid_registrations_leave_exactly_one_running() {
    let r = rig(SLEEPY, "").await;
    let calls: Vec<_> = (0..10)
        .map(|i| {
            let o = r.orch.clone();
            tokio::spawn(async move {
                o.run_in_slot("rapid", task("sleepy", serde_json::json!({ "i": i })))
                    .await
            })
        })
        .collect();
    let mut ids = Vec::new();
    for c in calls {
        ids.push(c.await.unwrap().unwrap().id);
    }
    let newest = *ids.iter().max().unwrap();
    let settled = eventually(Duration::from_secs(30), || async {
        let ts = r
            .store
            .list_tasks(
                &taskwarden::store::TaskFilter {
                    slot_id: Some("rapid".into()),
                    ..Default::default()
                },
                u64::MAX,
            )
            .await
            .unwrap()
            .0;
        ts.iter()
            .filter(|t| t.status == TaskStatus::Running)
            .count()
            == 1
            && ts
                .iter()
                .filter(|t| t.status == TaskStatus::Cancelled)
                .count()
                == 9
    })
    .await;
    assert!(settled, "not exactly one running and nine cancelled");
    assert_eq!(
        r.store.get_task(newest).await.unwrap().status,
        TaskStatus::Running
    );
    assert!(eventually(Duration::from_secs(10), || async { r.running.len() == 1 }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_keeps_running_after_the_request_that_created_it_returned() {
    // The program says it started, then waits for the test's "go" (at most 60 s) before it
    // does its work: what happens before and after the request returned is told apart by
    // that file, not by a sleep.
    let r = rig(
        "[agents.later]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"touch {dir}/started; i=0; while [ ! -e {dir}/go ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; [ -e {dir}/go ] && echo ran > {dir}/ran\"]\n",
        "",
    )
    .await;
    // The "request handler": starts the run and returns; its future is gone.
    let orch = r.orch.clone();
    let handler = tokio::spawn(async move {
        orch.run_in_slot("req", task("later", serde_json::json!({})))
            .await
    });
    let t = handler.await.unwrap().unwrap();
    assert_eq!(t.status, TaskStatus::Running);
    // The program is running, waiting, after the handler finished.
    assert!(
        eventually(Duration::from_secs(30), || async {
            r.dir.path().join("started").exists()
        })
        .await,
        "the program never started"
    );
    assert_eq!(
        r.store.get_task(t.id).await.unwrap().status,
        TaskStatus::Running
    );
    assert!(!r.dir.path().join("ran").exists(), "ran before the go");
    std::fs::write(r.dir.path().join("go"), "").unwrap();
    r.wait_status(t.id, TaskStatus::Succeeded).await;
    assert!(r.dir.path().join("ran").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_of_ten_thousand_noop_tasks_leaves_nothing_behind() {
    let r = rig("", "").await;
    let c = r.t.admin().await;
    c.batch_execute(
        "INSERT INTO tasks (agent, payload) SELECT 'noop', '{}' FROM generate_series(1, 10000)",
    )
    .await
    .unwrap();
    let all_done = eventually(Duration::from_secs(180), || async {
        let n: i64 = c
            .query_one("SELECT count(*) FROM tasks WHERE status = 'succeeded'", &[])
            .await
            .unwrap()
            .get(0);
        n == 10_000
    })
    .await;
    assert!(all_done);
    let running: i64 = c
        .query_one(
            "SELECT count(*) FROM tasks WHERE status <> 'succeeded'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(running, 0);
    assert!(
        eventually(Duration::from_secs(10), || async {
            r.running.is_empty() && r.orch.running_here() == 0
        })
        .await
    );
    assert_eq!(r.db.tracker().counts().open, 0);
    assert_eq!(r.db.status().in_use, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_agent_events_usage_and_result() {
    let script = r#"read payload; echo "{\"got\": $payload}"; echo '{"usage": {"prompt_tokens": 10, "completion_tokens": 5, "cost_usd": 0.01}}'; echo 'not json'; echo '{"result": "done"}'"#;
    let r = rig(
        &format!("[agents.talk]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", {script:?}]\n"),
        "",
    )
    .await;
    let t = r
        .orch
        .submit(&task("talk", serde_json::json!({"x": 1})))
        .await
        .unwrap();
    let done = r.wait_status(t.id, TaskStatus::Succeeded).await;
    assert_eq!(done.result, Some(serde_json::json!("done")));
    assert_eq!((done.prompt_tokens, done.completion_tokens), (10, 5));
    assert!((done.cost_usd - 0.01).abs() < 1e-9);
    let ev = r.events(t.id).await;
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert_eq!(ev[0].data, serde_json::json!({"got": {"x": 1}}));
    assert_eq!(ev[1].data, serde_json::json!({"result": "done"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_keep_stderr_retry_with_backoff_then_fail() {
    // A base far above the claim loop's own latency (poll_interval 200 ms), so a retry
    // without backoff cannot pass for one with it.
    const BASE: Duration = Duration::from_secs(1);
    let r = rig_with(
        "[agents.bad]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"echo boom-$TASKWARDEN_ATTEMPT >&2; exit 3\"]\n",
        "",
        |cfg| {
            cfg.workers.retry_backoff = taskwarden::config::Dur(BASE);
            cfg.workers.retry_backoff_max = taskwarden::config::Dur(Duration::from_secs(60));
        },
    )
    .await;
    let mut n = task("bad", serde_json::json!({}));
    n.max_attempts = Some(3);
    let t = r.orch.submit(&n).await.unwrap();
    let failed = r.wait_status(t.id, TaskStatus::Failed).await;
    assert_eq!(failed.attempts, 3);
    let err = failed.error.clone().unwrap();
    assert!(
        err.contains("boom-3") && err.contains("exit status: 3"),
        "{err}"
    );
    let attempts: Vec<taskwarden::store::TaskEvent> = r
        .events(t.id)
        .await
        .into_iter()
        .filter(|e| e.kind == "attempt_failed")
        .collect();
    assert_eq!(
        attempts
            .iter()
            .map(|e| e.data["attempt"].clone())
            .collect::<Vec<_>>(),
        vec![
            serde_json::json!(1),
            serde_json::json!(2),
            serde_json::json!(3)
        ]
    );
    let errors: Vec<&str> = attempts
        .iter()
        .map(|e| e.data["error"].as_str().unwrap())
        .collect();
    assert!(
        errors[0].contains("boom-1") && errors[1].contains("boom-2"),
        "{errors:?}"
    );
    // Backoff after attempt n is base·2^(n-1), then 50–100 % of it: the task was not
    // claimed again before its failure time + half that. Each attempt_failed event is
    // written before run_after is computed, and the next one after the next claim, so
    // consecutive events are at least that far apart.
    let min_backoff = |n: u32| (BASE * 2u32.pow(n - 1)) / 2;
    for (i, w) in attempts.windows(2).enumerate() {
        let gap = (w[1].created_at - w[0].created_at)
            .to_std()
            .unwrap_or_default();
        let least = min_backoff(i as u32 + 1);
        assert!(
            gap >= least,
            "attempt {} was retried {gap:?} after attempt {} failed; backoff is at least {least:?}",
            i + 2,
            i + 1
        );
    }
    // The last retry's run_after is still on the row: at least the minimum backoff after
    // attempt 2 failed, and attempt 3 was not claimed before it.
    let run_after = failed.run_after;
    let least = chrono::Duration::from_std(min_backoff(2)).unwrap();
    assert!(
        run_after >= attempts[1].created_at + least,
        "run_after {run_after} is less than {least} after attempt 2 failed at {}",
        attempts[1].created_at
    );
    let started = failed.started_at.unwrap();
    assert!(
        started >= run_after,
        "attempt 3 started at {started}, before its run_after {run_after}"
    );
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_kills_the_whole_process_group() {
    let r = rig(
        "[agents.hang]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"sleep 60 & echo $! > {dir}/child; echo $$ > {dir}/parent; wait\"]\ntimeout = \"1s\"\n",
        "",
    )
    .await;
    let t = r
        .orch
        .submit(&task("hang", serde_json::json!({})))
        .await
        .unwrap();
    let done = r.wait_status(t.id, TaskStatus::TimedOut).await;
    assert!(done.error.unwrap().contains("time limit"));
    // The agent's own timeout counts as a timeout (the TasksTimingOut alert reads it), not
    // only the supervisor's max_task_duration.
    let m = r.parts.metrics.clone();
    assert!(
        eventually(Duration::from_secs(10), || async {
            m.value(taskwarden::metrics::TASKS_TIMED_OUT_TOTAL, &[]) == Some(1.0)
        })
        .await,
        "timed_out_total: {:?}",
        m.value(taskwarden::metrics::TASKS_TIMED_OUT_TOTAL, &[])
    );
    assert_eq!(
        m.value(
            taskwarden::metrics::TASKS_FINISHED_TOTAL,
            &[("agent", "hang"), ("outcome", "timed_out")]
        ),
        Some(1.0)
    );
    let read = |f: &str| -> i32 {
        std::fs::read_to_string(r.dir.path().join(f))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (child, parent) = (read("child"), read("parent"));
    assert!(
        eventually(Duration::from_secs(10), || async {
            !alive(child) && !alive(parent)
        })
        .await,
        "child {child} or parent {parent} survived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_task_kills_its_program() {
    let r = rig(
        "[agents.hang]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"echo $$ > {dir}/pid; sleep 60\"]\n",
        "",
    )
    .await;
    let t = r
        .orch
        .submit(&task("hang", serde_json::json!({})))
        .await
        .unwrap();
    r.wait_status(t.id, TaskStatus::Running).await;
    let pidfile = r.dir.path().join("pid");
    let read_pid = || {
        std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
    };
    // The shell creates the file before it writes the number.
    assert!(eventually(Duration::from_secs(10), || async { read_pid().is_some() }).await);
    let pid = read_pid().unwrap();
    let c = r.orch.cancel(t.id, "user asked").await.unwrap();
    assert_eq!(c.status, TaskStatus::Cancelled);
    assert!(eventually(Duration::from_secs(10), || async { !alive(pid) }).await);
    assert!(matches!(
        r.orch.cancel(t.id, "again").await,
        Err(OrchestratorError::Store(
            StoreError::IllegalTransition { .. }
        ))
    ));
}

/// A one-route HTTP server on loopback replying with `content_type` and `body`.
async fn http_server(content_type: &'static str, body: String) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/agent", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                loop {
                    let n = sock.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got);
                    if let Some(h) = text.find("\r\n\r\n") {
                        let len: usize = text[..h]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if got.len() >= h + 4 + len {
                            break;
                        }
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body.as_bytes()).await;
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_agent_json_and_sse_replies() {
    let json_url = http_server(
        "application/json",
        r#"{"answer": 7, "usage": {"prompt_tokens": 3, "completion_tokens": 4, "cost_usd": 0.5}}"#
            .into(),
    )
    .await;
    let sse_url = http_server(
        "text/event-stream",
        "data: {\"delta\": \"he\"}\n\n: comment\n\ndata: {\"usage\": {\"prompt_tokens\": 1, \"completion_tokens\": 2}}\n\ndata: {\"result\": \"hello\"}\n\n".into(),
    )
    .await;
    let r = rig(
        &format!("[agents.json]\nkind = \"http\"\nurl = {json_url:?}\n[agents.sse]\nkind = \"http\"\nurl = {sse_url:?}\n"),
        "",
    )
    .await;
    let j = r
        .orch
        .submit(&task("json", serde_json::json!({"q": "?"})))
        .await
        .unwrap();
    let s = r
        .orch
        .submit(&task("sse", serde_json::json!({"q": "?"})))
        .await
        .unwrap();
    let j = r.wait_status(j.id, TaskStatus::Succeeded).await;
    assert_eq!(j.result, Some(serde_json::json!({"answer": 7})));
    assert_eq!((j.prompt_tokens, j.completion_tokens), (3, 4));
    let s = r.wait_status(s.id, TaskStatus::Succeeded).await;
    assert_eq!(s.result, Some(serde_json::json!("hello")));
    assert_eq!((s.prompt_tokens, s.completion_tokens), (1, 2));
    let ev: Vec<serde_json::Value> = r.events(s.id).await.into_iter().map(|e| e.data).collect();
    assert_eq!(
        ev,
        vec![
            serde_json::json!({"delta": "he"}),
            serde_json::json!({"result": "hello"})
        ]
    );
}

fn step(key: &str, agent: &str, deps: &[&str]) -> NewStep {
    NewStep {
        key: key.into(),
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        task: task(agent, serde_json::json!({ "key": key })),
    }
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objective_steps_run_in_dependency_order_and_failures_propagate() {
    let r = rig(
        "[agents.log]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"cat >> {dir}/order; echo >> {dir}/order\"]\n\
         [agents.fail]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"exit 1\"]\n",
        "",
    )
    .await;
    // c depends on b depends on a; d depends on a and c. Submitted in reverse order.
    let o = r
        .orch
        .create_objective(&NewObjective {
            title: "ordered".into(),
            steps: vec![
                step("d", "log", &["a", "c"]),
                step("c", "log", &["b"]),
                step("b", "log", &["a"]),
                step("a", "log", &[]),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    let done = eventually(Duration::from_secs(60), || async {
        r.store.get_objective(o.id).await.unwrap().status == ObjectiveStatus::Succeeded
    })
    .await;
    assert!(done);
    let order: Vec<String> = lines(&r.dir.path().join("order"))
        .iter()
        .filter(|l| !l.is_empty())
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["key"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(order, vec!["a", "b", "c", "d"]);

    let mut f = step("a", "fail", &[]);
    f.task.max_attempts = Some(1);
    let o = r
        .orch
        .create_objective(&NewObjective {
            title: "doomed".into(),
            steps: vec![
                f,
                step("b", "log", &["a"]),
                step("c", "log", &["b"]),
                step("z", "log", &[]),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    let settled = eventually(Duration::from_secs(60), || async {
        r.store
            .get_objective(o.id)
            .await
            .unwrap()
            .tasks
            .iter()
            .all(|t| t.status.is_terminal())
    })
    .await;
    assert!(settled);
    let o = r.store.get_objective(o.id).await.unwrap();
    assert_eq!(o.status, ObjectiveStatus::Failed);
    let by_key = |k: &str| {
        o.tasks
            .iter()
            .find(|t| t.step_key.as_deref() == Some(k))
            .unwrap()
            .clone()
    };
    assert_eq!(by_key("a").status, TaskStatus::Failed);
    assert_eq!(by_key("b").status, TaskStatus::Cancelled);
    assert_eq!(
        by_key("b").error.as_deref(),
        Some("dependency a ended failed")
    );
    assert_eq!(by_key("c").status, TaskStatus::Cancelled);
    assert_eq!(by_key("z").status, TaskStatus::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_objectives_write_nothing() {
    let r = rig(
        "[agents.log]\nkind = \"command\"\ncommand = [\"true\"]\n",
        "",
    )
    .await;
    let cyc = r
        .orch
        .create_objective(&NewObjective {
            title: "cycle".into(),
            steps: vec![step("a", "log", &["b"]), step("b", "log", &["a"])],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(cyc, OrchestratorError::Store(StoreError::Invalid { .. })),
        "{cyc:?}"
    );
    let unknown = r
        .orch
        .create_objective(&NewObjective {
            title: "who".into(),
            steps: vec![step("a", "ghost", &[])],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(unknown, OrchestratorError::Store(StoreError::Invalid { ref field, .. }) if field == "steps[0].agent")
    );
    // Neither the objective nor any of its steps' tasks (or their events) was written.
    let c = r.t.admin().await;
    for table in ["objectives", "tasks", "task_events"] {
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "rows in {table} after invalid objectives");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planner_agent_supplies_the_steps() {
    let plan = r#"read p; echo '{"result": {"steps": [{"key": "a", "agent": "log"}, {"key": "b", "agent": "log", "depends_on": ["a"]}]}}'"#;
    let bad = r#"read p; echo '{"result": [{"key": "x", "agent": "log", "depends_on": ["y"]}, {"key": "y", "agent": "log", "depends_on": ["x"]}]}'"#;
    let r = rig(
        &format!(
            "[agents.log]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"cat >> {{dir}}/order; echo >> {{dir}}/order\"]\n\
             [agents.planner]\nkind = \"command\"\nplanner = true\ncommand = [\"sh\", \"-c\", {plan:?}]\n\
             [agents.badplanner]\nkind = \"command\"\nplanner = true\ncommand = [\"sh\", \"-c\", {bad:?}]\n"
        ),
        "",
    )
    .await;
    let o = r
        .orch
        .create_objective(&NewObjective {
            title: "planned".into(),
            planner: Some("planner".into()),
            input: serde_json::json!({"goal": "g"}),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(o.tasks.len(), 1);
    assert_eq!(
        o.tasks[0].payload,
        serde_json::json!({"title": "planned", "input": {"goal": "g"}})
    );
    let done = eventually(Duration::from_secs(60), || async {
        r.store.get_objective(o.id).await.unwrap().status == ObjectiveStatus::Succeeded
    })
    .await;
    assert!(done);
    let o = r.store.get_objective(o.id).await.unwrap();
    let keys: Vec<_> = o
        .tasks
        .iter()
        .map(|t| t.step_key.clone().unwrap())
        .collect();
    assert_eq!(keys, vec!["plan", "a", "b"]);

    // A plan with a cycle fails the plan step and adds nothing.
    let o = r
        .orch
        .create_objective(&NewObjective {
            title: "cyclic".into(),
            planner: Some("badplanner".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let t = r.wait_status(o.tasks[0].id, TaskStatus::Failed).await;
    assert!(t.error.unwrap().contains("planner reply"), "bad plan error");
    assert_eq!(r.store.get_objective(o.id).await.unwrap().tasks.len(), 1);
    // Only planner agents plan.
    let err = r
        .orch
        .create_objective(&NewObjective {
            title: "no".into(),
            planner: Some("log".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, OrchestratorError::Store(StoreError::Invalid { ref field, .. }) if field == "planner")
    );
}

/// Failures are written like successes: in batches, one statement each, with their
/// `attempt_failed` events in the same statement (issue 15). Each task's `finished_at`
/// and its event's `created_at` are the writing transaction's time, so a batch shows as
/// many tasks sharing one; written one by one (as before), 300 failures had 300.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_and_their_events_are_written_in_batches() {
    let r = rig_with("", "", |c| {
        c.workers.completion_window = taskwarden::config::Dur::millis(100);
    })
    .await;
    let c = r.t.admin().await;
    c.batch_execute(
        "INSERT INTO tasks (agent, max_attempts, payload) \
         SELECT 'fail', 1, jsonb_build_object('retry', false) FROM generate_series(1, 300)",
    )
    .await
    .unwrap();
    let done = eventually(Duration::from_secs(60), || async {
        count(&c, "SELECT count(*) FROM tasks WHERE status = 'failed'").await == 300
    })
    .await;
    assert!(done, "not all 300 failed");
    let writes = count(&c, "SELECT count(DISTINCT finished_at) FROM tasks").await;
    assert!(writes <= 30, "300 failures took {writes} writes");
    // One event per failure, stored by the statement that wrote the failure.
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM tasks t JOIN task_events e ON e.task_id = t.id \
             WHERE e.kind = 'attempt_failed' AND e.created_at = t.finished_at \
               AND t.error = 'attempt 1: no' AND t.lease_owner IS NULL"
        )
        .await,
        300
    );
    assert_eq!(count(&c, "SELECT count(*) FROM task_events").await, 300);
}
