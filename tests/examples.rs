//! The example agents of `examples/agents/` run end to end (issue 27), driven as a user
//! would: the built binary's daemon with the agents declared by `examples/agents/config.toml`
//! (the sections docs/agents.md tells you to add), the HTTP agent's server started the
//! way its doc says, tasks submitted with `taskwarden submit`, the objective with
//! `taskwarden objective examples/agents/objective.json`, and what a user sees read back
//! with `taskwarden tasks show --json` and the API.
//!
//! Two substitutions, because tests run side by side in temporary directories: the
//! config's relative `examples/agents/` paths are made absolute (the doc says run from the
//! repository root, or make them absolute), and the HTTP agent's port 8080 is the free one
//! it bound (`--port 0`).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::daemon::{Daemon, bounded, http_client};
use common::{TestDb, bin, eventually};
use nix::sys::signal::Signal;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The HTTP agent's server, killed with the test.
struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `examples/agents/http_agent.py --port 0`; the server and its URL from the line
/// it prints once it listens.
fn start_http_agent() -> (Server, String) {
    let mut child = Command::new("python3")
        .arg(root().join("examples/agents/http_agent.py"))
        .args(["--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3");
    let stdout = child.stdout.take().unwrap();
    let server = Server(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("http_agent.py never said it listens");
    let url = line
        .strip_prefix("http_agent listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .to_string();
    (server, url)
}

/// Runs the CLI from `dir` against the daemon at `base`, bounded.
fn cli(dir: &Path, base: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("90")
        .arg(bin())
        .args(args)
        .arg("--url")
        .arg(base)
        .current_dir(dir)
        .env_remove("TASKWARDEN_API_TOKEN")
        .env_remove("TASKWARDEN_URL")
        .env_remove("TASKWARDEN_CONFIG")
        .output()
        .unwrap()
}

fn out_err(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn json_of(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", out_err(o)))
}

/// `submit --wait --json`: the exit code and the task's final state.
fn submit(dir: &Path, base: &str, agent: &str, payload: &str) -> (Option<i32>, Value, String) {
    let o = cli(
        dir,
        base,
        &[
            "submit",
            "--agent",
            agent,
            "--payload",
            payload,
            "--wait",
            "--json",
        ],
    );
    (o.status.code(), json_of(&o), out_err(&o))
}

/// `tasks show ID --json`: the task with its events.
fn show(dir: &Path, base: &str, id: i64) -> Value {
    let o = cli(dir, base, &["tasks", "show", &id.to_string(), "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", out_err(&o));
    json_of(&o)
}

fn events_of(task: &Value, kind: &str) -> Vec<Value> {
    task["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == kind)
        .map(|e| e["data"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_agents_run_end_to_end() {
    bounded(Duration::from_secs(400), async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let (_server, agent_url) = tokio::task::block_in_place(start_http_agent);
        let examples = root().join("examples/agents/");
        let agents = std::fs::read_to_string(root().join("examples/agents/config.toml"))
            .unwrap()
            .replace("\"examples/agents/", &format!("\"{}", examples.display()))
            .replace("http://127.0.0.1:8080/run", &agent_url);
        assert!(
            agents.contains(&agent_url) && agents.contains(examples.to_str().unwrap()),
            "examples/agents/config.toml no longer names the agents as this test expects:\n{agents}"
        );
        let config = format!(
            "[database]\napplication_name = {:?}\n[supervisor]\ninterval = \"300ms\"\n\
             [workers]\npoll_interval = \"200ms\"\nretry_backoff = \"10ms\"\n\
             retry_backoff_max = \"20ms\"\nshutdown_grace = \"1s\"\n{agents}",
            t.application_name
        );
        let url = t.url();
        let mut d = Daemon::start(dir.path(), &config, &[("TASKWARDEN_DATABASE_URL", &url)]);
        let base = d.base_url();
        let cwd = dir.path().to_path_buf();
        let run = |f: &dyn Fn() -> (Option<i32>, Value, String)| tokio::task::block_in_place(f);

        // The command agent: progress events, usage, a result, and the environment.
        let text = "one two three four five six seven eight nine ten";
        let (code, task, all) = run(&|| {
            submit(
                &cwd,
                &base,
                "summarise",
                &format!("{{\"text\": \"{text}\", \"max_words\": 3}}"),
            )
        });
        assert_eq!(code, Some(0), "{all}");
        assert_eq!(task["status"], "succeeded", "{task}");
        let id = task["id"].as_i64().unwrap();
        assert_eq!(task["result"]["summary"], "one two three ...", "{task}");
        assert_eq!(task["result"]["words"], 10, "{task}");
        assert_eq!(task["result"]["task_id"], id, "{task}");
        assert_eq!(
            (
                task["prompt_tokens"].as_i64(),
                task["completion_tokens"].as_i64()
            ),
            (Some(10), Some(3)),
            "{task}"
        );
        assert!(
            (task["cost_usd"].as_f64().unwrap() - 0.001).abs() < 1e-9,
            "{task}"
        );
        let shown = tokio::task::block_in_place(|| show(&cwd, &base, id));
        let progress: Vec<Value> = events_of(&shown, "output")
            .into_iter()
            .filter_map(|e| e.get("progress").cloned())
            .collect();
        assert_eq!(progress, ["reading", "summarising"], "{shown}");
        let first = &events_of(&shown, "output")[0];
        assert_eq!(first["attempt"], 1, "TASKWARDEN_ATTEMPT: {shown}");

        // Its error path: a non-zero exit, retried, then failed with stderr's message.
        let (code, task, all) = run(&|| submit(&cwd, &base, "summarise", "{\"max_words\": 3}"));
        assert_eq!(code, Some(1), "{all}");
        assert_eq!(task["status"], "failed", "{task}");
        assert_eq!(task["attempts"], 3, "{task}");
        let error = task["error"].as_str().unwrap_or("");
        assert!(
            error.contains("summarise: the payload has no \"text\" to summarise"),
            "{task}"
        );
        let shown = tokio::task::block_in_place(|| show(&cwd, &base, task["id"].as_i64().unwrap()));
        // One `attempt_failed` per attempt, the last one's too.
        assert_eq!(events_of(&shown, "attempt_failed").len(), 3, "{shown}");

        // The HTTP agent: its JSON answer is the result, its usage taken out of it, and the
        // headers taskwarden sent come back in it.
        let (code, task, all) =
            run(&|| submit(&cwd, &base, "publish", "{\"text\": \"hello there\"}"));
        assert_eq!(code, Some(0), "{all}");
        let id = task["id"].as_i64().unwrap();
        assert_eq!(task["result"]["shouted"], "HELLO THERE", "{task}");
        assert_eq!(task["result"]["task_id"], id, "{task}");
        assert_eq!(task["result"]["attempt"], 1, "{task}");
        assert!(task["result"].get("usage").is_none(), "{task}");
        assert_eq!(task["prompt_tokens"], 2, "{task}");
        assert_eq!(task["completion_tokens"], 1, "{task}");

        // A 503 is retried: the second attempt succeeds, the first one's error kept.
        let (code, task, all) = run(&|| {
            submit(
                &cwd,
                &base,
                "publish",
                "{\"text\": \"again\", \"flaky\": true}",
            )
        });
        assert_eq!(code, Some(0), "{all}");
        assert_eq!(task["attempts"], 2, "{task}");
        assert_eq!(task["result"]["attempt"], 2, "{task}");
        let shown = tokio::task::block_in_place(|| show(&cwd, &base, task["id"].as_i64().unwrap()));
        let failed = events_of(&shown, "attempt_failed");
        assert_eq!(failed.len(), 1, "{shown}");
        assert!(
            failed[0].to_string().contains("http agent replied 503")
                && failed[0].to_string().contains("warming up"),
            "{shown}"
        );

        // A 4xx fails the task for good, at once, with the body in the error.
        let (code, task, all) = run(&|| submit(&cwd, &base, "publish", "{\"no\": \"text\"}"));
        assert_eq!(code, Some(1), "{all}");
        assert_eq!(task["status"], "failed", "{task}");
        assert_eq!(task["attempts"], 1, "{task}");
        let error = task["error"].as_str().unwrap_or("");
        assert!(
            error.contains("http agent replied 422") && error.contains("payload has no text"),
            "{task}"
        );

        // The stream: events as they come, usage, the last result.
        let (code, task, all) = run(&|| {
            submit(
                &cwd,
                &base,
                "publish",
                "{\"text\": \"streamed\", \"stream\": true}",
            )
        });
        assert_eq!(code, Some(0), "{all}");
        assert_eq!(task["result"]["shouted"], "STREAMED", "{task}");
        assert_eq!(task["prompt_tokens"], 1, "{task}");
        let shown = tokio::task::block_in_place(|| show(&cwd, &base, task["id"].as_i64().unwrap()));
        assert!(
            events_of(&shown, "output")
                .iter()
                .any(|e| e["progress"] == "shouting"),
            "{shown}"
        );

        // The planner and the objective file: `plan`, one summary per document, then
        // the publish step, all succeeded.
        let objective = root().join("examples/agents/objective.json");
        let o = tokio::task::block_in_place(|| {
            cli(
                &cwd,
                &base,
                &["objective", objective.to_str().unwrap(), "--json"],
            )
        });
        assert_eq!(o.status.code(), Some(0), "{}", out_err(&o));
        let oid = json_of(&o)["id"].as_i64().unwrap();
        let http = http_client(Duration::from_secs(30));
        let get = || async {
            http.get(format!("{base}/v1/objectives/{oid}"))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        };
        let done = eventually(LIMIT, || async {
            let v = get().await;
            v["status"] == "succeeded" || v["status"] == "failed"
        })
        .await;
        let v = get().await;
        assert!(done, "objective never ended: {v}");
        assert_eq!(v["status"], "succeeded", "{v}");
        let mut steps: Vec<(String, String)> = v["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["step_key"].as_str().unwrap_or("").to_string(),
                    t["status"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        steps.sort();
        let want: Vec<(String, String)> = ["plan", "publish", "summarise-0", "summarise-1"]
            .iter()
            .map(|k| (k.to_string(), "succeeded".to_string()))
            .collect();
        assert_eq!(steps, want, "{v}");
        let publish = v["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["step_key"] == "publish")
            .unwrap();
        assert_eq!(publish["result"]["shouted"], "WEEKLY DIGEST", "{v}");

        d.signal(Signal::SIGTERM);
        let st = tokio::task::block_in_place(|| d.wait_exit(LIMIT));
        assert!(st.success(), "{st:?}\n{}", d.output());
    })
    .await;
}
