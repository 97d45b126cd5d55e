//! Issue 17: the OpenAPI document. The daemon serves at `/openapi.json` exactly the
//! committed `docs/openapi.json`, without a token; every operation in it is routed; and
//! schemathesis, run against the live daemon with that document, finds no server error, no
//! answer that breaks its schema or documented statuses, no invalid input accepted (and,
//! where the schema can say it, no valid input refused; `tests/schemathesis.toml` names the
//! exceptions and why).
//!
//! Schemathesis comes from PyPI: `scripts/test.sh` installs the pinned version and sets
//! `TASKWARDEN_SCHEMATHESIS`; without it, `schemathesis` must be on PATH.

mod common;

use std::path::Path;
use std::time::Duration;

use common::TestDb;
use common::daemon::{Daemon, bounded, http_client};
use serde_json::Value;

const TOKEN: &str = "openapi-secret";

const AGENTS: &str = r#"
[agents.ok]
kind = "command"
command = ["sh", "-c", "cat >/dev/null; echo '{\"progress\": \"half\"}'; echo '{\"result\": \"done\"}'"]
[agents.bad]
kind = "command"
command = ["sh", "-c", "cat >/dev/null; echo 'refused' >&2; exit 3"]
"#;

fn schemathesis() -> String {
    std::env::var("TASKWARDEN_SCHEMATHESIS").unwrap_or_else(|_| "schemathesis".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_document_is_committed_routed_and_schemathesis_finds_no_fault() {
    bounded(Duration::from_secs(600), async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "[database]\napplication_name = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\napi_token = {TOKEN:?}\n\
             [supervisor]\ninterval = \"500ms\"\n[workers]\npoll_interval = \"200ms\"\n\
             retry_backoff = \"10ms\"\nretry_backoff_max = \"20ms\"\nshutdown_grace = \"1s\"\n{AGENTS}",
            t.application_name
        );
        let url = t.url();
        let mut d = Daemon::start(dir.path(), &config, &[("TASKWARDEN_DATABASE_URL", &url)]);
        let base = d.base_url();
        let http = http_client(Duration::from_secs(10));

        // Served without a token, byte for byte the committed document.
        let r = http.get(format!("{base}/openapi.json")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(
            r.headers()["content-type"].to_str().unwrap(),
            "application/json"
        );
        let served = r.text().await.unwrap();
        let committed =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json"))
                .unwrap();
        assert!(served == committed, "served document differs from docs/openapi.json");
        let doc: Value = serde_json::from_str(&served).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");

        // Every operation in the document is routed: with ids and names filled in, none
        // meets the fallback's "no such route" or a 405.
        let mut operations = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            let concrete = path.replace("{id}", "1").replace("{name}", "ok");
            for method in item.as_object().unwrap().keys() {
                let req = match method.as_str() {
                    "get" => http.get(format!("{base}{concrete}")),
                    "post" => http
                        .post(format!("{base}{concrete}"))
                        .header("content-type", "application/json")
                        .body("{}"),
                    m => panic!("method {m} in the document"),
                };
                // Event streams answer with their head at once; the body is not read.
                let r = req.bearer_auth(TOKEN).send().await.unwrap();
                let status = r.status().as_u16();
                let is_stream = r
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v.to_str().unwrap_or("").starts_with("text/event-stream"));
                let body = if is_stream {
                    String::new()
                } else {
                    r.text().await.unwrap()
                };
                assert!(
                    status != 405 && !body.contains("no such route"),
                    "{method} {path}: {status} {body}"
                );
                operations += 1;
            }
        }
        assert_eq!(operations, 21, "operations in the document");

        // Something to read: a task that succeeded, one that failed, one queued far ahead.
        for body in [
            r#"{"agent": "ok"}"#,
            r#"{"agent": "bad", "max_attempts": 1}"#,
            r#"{"agent": "ok", "run_after": "2999-01-01T00:00:00Z"}"#,
        ] {
            let r = http
                .post(format!("{base}/v1/tasks"))
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
        }

        let report = dir.path().join("schemathesis-junit.xml");
        let out = tokio::task::block_in_place(|| {
            std::process::Command::new("timeout")
                .arg("400")
                .arg(schemathesis())
                .arg("--config-file")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis.toml"))
                .args(["run", &format!("{base}/openapi.json")])
                .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
                .args(["--phases", "examples,coverage,fuzzing"])
                .args(["--max-examples", "15", "--seed", "17"])
                // One worker: CPython 3.11's ast.parse is not thread-safe, and Hypothesis
                // calls it from schemathesis' worker threads.
                .args(["--workers", "1"])
                // A NUL character in any string is refused with a 400 naming the field, by
                // design (PostgreSQL cannot store one; tests/adversary.rs proves it); the
                // schemas do not spell that out on every string.
                .args(["--generation-allow-x00", "false"])
                .args(["--suppress-health-check", "all", "--no-color"])
                .args(["--report", "junit", "--report-junit-path"])
                .arg(&report)
                .output()
                .unwrap_or_else(|e| {
                    panic!(
                        "{} (schemathesis from PyPI; scripts/test.sh installs it): {e}",
                        schemathesis()
                    )
                })
        });
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        println!("{said}");
        assert!(out.status.success(), "schemathesis failed:\n{said}");
        // Every operation was selected and tested ("Selected: N/N", "Tested: N").
        let figure = |label: &str| {
            said.lines()
                .find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| panic!("no {label:?} in:\n{said}"))
        };
        let selected = figure("Selected:");
        let (n, total) = selected.split_once('/').unwrap();
        assert_eq!(n, total, "{said}");
        assert_eq!(figure("Tested:"), n, "{said}");
        assert!(
            said.contains("✅ Coverage") && said.contains("✅ Fuzzing"),
            "{said}"
        );

        // Nothing it sent made the daemon log an error.
        d.signal(nix::sys::signal::Signal::SIGTERM);
        d.wait_exit(Duration::from_secs(30));
        let log = d.drain();
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
        assert!(errors.is_empty(), "{errors:#?}");
    })
    .await;
}
