//! What operators install and watch: the Prometheus rules and Grafana dashboard (checked
//! against a real Prometheus scraping a running daemon), the systemd unit, and sd_notify.

mod common;

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use common::daemon::Daemon;
use common::{TestDb, bin, eventually, promtool_check_metrics};
use nix::sys::signal::Signal;
use serde_json::Value;
use taskwarden::config::{Config, Dur};
use taskwarden::db::migrate::{HISTORY_TABLE, latest_version};
use taskwarden::metrics::{DEFS, Kind};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dashboard() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(root().join("dashboards/taskwarden.json")).unwrap(),
    )
    .unwrap()
}

/// Every PromQL expression in the dashboard.
fn dashboard_exprs(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            continue;
        }
        for t in p["targets"].as_array().unwrap() {
            out.push((
                p["title"].as_str().unwrap().to_string(),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(root().join("dashboards/alerts.yml"))
        .output()
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SUCCESS: 18 rules found"), "{text}");
    // Every rule links its runbook (a section of docs/runbooks.md) under the standard
    // annotation.
    let rules = std::fs::read_to_string(root().join("dashboards/alerts.yml")).unwrap();
    assert!(!rules.contains(" runbook:"), "a rule carries `runbook`");
    let runbooks = std::fs::read_to_string(root().join("docs/runbooks.md")).unwrap();
    let tests = std::fs::read_to_string(root().join("dashboards/alerts_test.yml")).unwrap();
    let names: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert_eq!(names.len(), 18);
    for name in names {
        let anchor = format!("runbook_url: \"docs/runbooks.md#{}\"", name.to_lowercase());
        assert!(rules.contains(&anchor), "{name}: no {anchor}");
        assert!(
            runbooks.contains(&format!("\n## {name}\n")),
            "{name}: no runbook"
        );
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "{name}: no promtool unit test"
        );
    }
}

/// `promtool test rules`: each rule fires on synthetic series and resolves after, the
/// reload alert as soon as a reload succeeded.
#[test]
fn promtool_unit_tests_of_the_alert_rules_pass() {
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(root().join("dashboards/alerts_test.yml"))
        .output()
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn the_dashboard_is_complete_and_names_only_exported_metrics() {
    let d = dashboard();
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, vec!["datasource", "instance"]);
    let mut exported: BTreeSet<String> = BTreeSet::new();
    for def in DEFS {
        exported.insert(def.name.to_string());
        if def.kind == Kind::Histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                exported.insert(format!("{}{suffix}", def.name));
            }
        }
    }
    let rows: Vec<&str> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    assert_eq!(
        rows,
        vec![
            "Pool",
            "Sessions",
            "Tasks",
            "Applications sharing the database",
            "LLM usage",
            "Daemon"
        ]
    );
    for p in d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
    {
        let title = p["title"].as_str().unwrap_or("");
        assert!(!title.is_empty(), "panel without a title: {p}");
        let description = p["description"].as_str().unwrap_or("");
        assert!(description.len() > 20, "{title}: no description");
        // A threshold line (the 80 % pool line, the 30-minute limits) is inside the
        // y axis even while the series sits far below it.
        let defaults = &p["fieldConfig"]["defaults"];
        let line = defaults["thresholds"]["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["value"].as_f64())
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        if let Some(line) = line {
            let top = defaults["max"]
                .as_f64()
                .or(defaults["custom"]["axisSoftMax"].as_f64());
            assert!(
                top.is_some_and(|t| t >= line),
                "{title}: the line at {line} is off the axis ({top:?})"
            );
        }
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert!(!expr.is_empty(), "{title}: empty query");
            for name in metric_names(expr) {
                assert!(
                    exported.contains(&name),
                    "{title}: {name} is not exported by the daemon"
                );
            }
        }
    }
}

fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("taskwarden_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    // Missing tool is a failure, not a skip: scripts/test.sh installs it.
    let version = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .expect("systemd-analyze (Debian package systemd; scripts/test.sh installs it)");
    assert!(version.status.success(), "{version:?}");
    let unit = std::fs::read_to_string(root().join("systemd/taskwarden.service")).unwrap();
    for must in [
        "Type=notify",
        "WatchdogSec=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "User=taskwarden",
        "StateDirectory=taskwarden",
        "MemoryDenyWriteExecute=yes",
        "ExecReload=/usr/local/bin/taskwarden reload ",
    ] {
        assert!(unit.contains(must), "unit lacks {must}");
    }
    // A minimal system has neither /bin/kill (procps) nor nss-systemd for a DynamicUser
    // (scripts/systemd-e2e.sh boots one).
    let settings: Vec<&str> = unit
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    for must_not in ["/bin/kill", "DynamicUser=yes"] {
        assert!(
            !settings.iter().any(|l| l.contains(must_not)),
            "unit has {must_not}"
        );
    }
    // verify checks that ExecStart exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("taskwarden.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/taskwarden", bin().to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("taskwarden.service"),
        "warnings about the unit:\n{text}"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Prometheus(Child);
impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An instant query; `Null` while Prometheus is not up yet.
async fn prom_query(http: &reqwest::Client, base: &str, q: &str) -> Value {
    match http
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", q)])
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_daemon_and_every_dashboard_query_has_data() {
    let t = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let script = r#"cat >/dev/null; echo '{"step": 1}'; echo '{"usage": {"prompt_tokens": 12, "completion_tokens": 3, "cost_usd": 0.002}}'"#;
    let config = format!(
        "[database]\napplication_name = {:?}\n[supervisor]\ninterval = \"500ms\"\n\
         [workers]\nretry_backoff = \"10ms\"\nretry_backoff_max = \"20ms\"\n\
         [agents.llm]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", {script:?}]\n\
         [agents.flaky]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"cat >/dev/null; exit 1\"]\n\
         [watch.everyone]\napplication_name = \"*\"\nmax_sessions = 10000\n",
        t.application_name
    );
    let url = t.url();
    let mut d = Daemon::start(dir.path(), &config, &[("TASKWARDEN_DATABASE_URL", &url)]);
    let addr = tokio::task::block_in_place(|| d.addr())
        .unwrap_or_else(|| panic!("not ready:\n{}", d.output()));

    let port = free_port();
    let prom_dir = dir.path().join("prom");
    std::fs::create_dir_all(&prom_dir).unwrap();
    std::fs::copy(
        root().join("dashboards/alerts.yml"),
        prom_dir.join("alerts.yml"),
    )
    .unwrap();
    std::fs::write(
        prom_dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [alerts.yml]\n\
             scrape_configs:\n  - job_name: taskwarden\n    static_configs:\n      - targets: ['{addr}']\n"
        ),
    )
    .unwrap();
    let prom = Prometheus(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                prom_dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                prom_dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package prometheus; scripts/test.sh installs it)"),
    );
    let base = format!("http://127.0.0.1:{port}");
    // Every call bounded: a stuck daemon or Prometheus fails the test, not hangs it.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    // Some work for the task and LLM panels.
    let api = format!("http://{addr}");
    for _ in 0..5 {
        let r = http
            .post(format!("{api}/v1/tasks"))
            .json(&serde_json::json!({"agent": "llm"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
    }
    let up = eventually(Duration::from_secs(60), || async {
        let v = prom_query(&http, &base, "up{job=\"taskwarden\"}").await;
        v["data"]["result"][0]["value"][1] == "1"
    })
    .await;
    assert!(up, "Prometheus never scraped the daemon");
    // More work after the first scrapes, so rates see it change; and a task that fails
    // (twice retried, then failed) for the failures panel.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for agent in ["llm", "llm", "llm", "llm", "llm", "flaky"] {
        let r = http
            .post(format!("{api}/v1/tasks"))
            .json(&serde_json::json!({"agent": agent}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
    }
    let exprs = dashboard_exprs(&dashboard());
    let all_have_data = eventually(Duration::from_secs(60), || {
        let exprs = exprs.clone();
        let http = http.clone();
        let base = base.clone();
        async move {
            for (_, e) in &exprs {
                let q = e
                    .replace("$instance", ".*")
                    .replace("$__rate_interval", "1m");
                let v = prom_query(&http, &base, &q).await;
                if v["status"] != "success"
                    || v["data"]["result"].as_array().is_none_or(|r| r.is_empty())
                {
                    return false;
                }
            }
            true
        }
    })
    .await;
    let mut missing = Vec::new();
    if !all_have_data {
        for (title, e) in &exprs {
            let q = e
                .replace("$instance", ".*")
                .replace("$__rate_interval", "1m");
            let v = prom_query(&http, &base, &q).await;
            if v["status"] != "success"
                || v["data"]["result"].as_array().is_none_or(|r| r.is_empty())
            {
                missing.push(format!("{title}: {q} -> {v}"));
            }
        }
    }
    assert!(
        all_have_data,
        "dashboard queries without data (or failing) within the limit:\n{}",
        missing.join("\n")
    );
    // The exposition, with LLM usage recorded (cost, tokens) and the process metrics,
    // passes promtool's checks.
    let text = http
        .get(format!("{api}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("# TYPE taskwarden_llm_cost_usd_total counter"),
        "{text}"
    );
    for name in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(
            text.contains(&format!("\n{name} ")),
            "{name} missing:\n{text}"
        );
    }
    promtool_check_metrics(&text);
    // The alert rules load in the same Prometheus.
    let rules: Value = http
        .get(format!("{base}/api/v1/rules"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let n: usize = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["rules"].as_array().unwrap().len())
        .sum();
    assert_eq!(n, 18);
    drop(prom);
    d.signal(Signal::SIGTERM);
    assert!(tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(120))).success());
}

/// Every notification that arrives within `within` (a window: it always lasts that long).
fn recv_all(sock: &UnixDatagram, within: Duration) -> Vec<String> {
    let deadline = std::time::Instant::now() + within;
    let mut out = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match recv_one(sock, left) {
            Some(m) => out.push(m),
            None => break,
        }
    }
    out
}

/// One notification, or `None` when none arrives within `within`.
fn recv_one(sock: &UnixDatagram, within: Duration) -> Option<String> {
    let mut buf = [0u8; 4096];
    sock.set_read_timeout(Some(within.max(Duration::from_millis(1))))
        .unwrap();
    sock.recv(&mut buf)
        .ok()
        .map(|n| String::from_utf8_lossy(&buf[..n]).to_string())
}

/// Notifications until `done` holds for those received so far; panics when `limit` (a
/// guard against hangs, not a timing bound) passes first.
fn recv_until(
    sock: &UnixDatagram,
    limit: Duration,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let deadline = std::time::Instant::now() + limit;
    let mut out = Vec::new();
    while !done(&out) {
        let left = deadline
            .checked_duration_since(std::time::Instant::now())
            .unwrap_or_else(|| panic!("condition not reached within {limit:?}; got {out:?}"));
        if let Some(m) = recv_one(sock, left) {
            out.push(m);
        }
    }
    out
}

fn keepalives(msgs: &[String]) -> usize {
    msgs.iter().filter(|m| *m == "WATCHDOG=1").count()
}

/// READY=1 comes once the daemon's own migrations ran and its listener is up (docs/operations.md,
/// "Install as a service"): at the moment it arrives, the schema of a database the daemon found empty
/// is at the newest version and the address READY names answers HTTP. Then WATCHDOG=1
/// while the supervisor ticks, and STOPPING=1 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_ready_after_migrations_and_listener_then_watchdog_and_stopping() {
    let t = TestDb::new().await;
    // TestDb's database is migrated already; the daemon gets an empty one.
    let fresh = format!("{}_fresh", t.name);
    t.admin()
        .await
        .batch_execute(&format!("CREATE DATABASE {fresh}"))
        .await
        .unwrap();
    let mut fresh_pg = t.pg.clone();
    fresh_pg.dbname(&fresh);
    let url = t
        .url()
        .replace(&format!("/{}?", t.name), &format!("/{fresh}?"));
    assert!(url.contains(&fresh), "{url}");
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let config = format!(
        "[database]\napplication_name = {:?}\n[supervisor]\ninterval = \"200ms\"\n",
        t.application_name
    );
    let mut d = Daemon::start(
        dir.path(),
        &config,
        &[
            ("TASKWARDEN_DATABASE_URL", &url),
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let first = tokio::task::block_in_place(|| recv_one(&sock, Duration::from_secs(120)))
        .unwrap_or_else(|| panic!("no notification:\n{}", d.drain()));
    assert!(first.starts_with("READY=1"), "{first}");
    let addr = first
        .split("listening on ")
        .nth(1)
        .unwrap_or_else(|| panic!("READY without the address: {first:?}"))
        .trim()
        .to_string();
    // Checked at once, each exactly once, side by side: no retry could hide an early READY.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let (health, schema) = tokio::join!(http.get(format!("http://{addr}/healthz")).send(), async {
        let (c, conn) = fresh_pg.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c.query_one(
            &format!("SELECT max(version) FROM taskwarden.{HISTORY_TABLE}"),
            &[],
        )
        .await
        .map(|r| r.get::<_, Option<i32>>(0))
    });
    let health = health.unwrap_or_else(|e| panic!("listener not up when READY=1 came: {e}"));
    assert_eq!(health.status().as_u16(), 200);
    let schema = schema.unwrap_or_else(|e| panic!("no schema when READY=1 came: {e}"));
    assert_eq!(
        schema,
        Some(latest_version()),
        "schema not migrated when READY=1 came"
    );
    assert!(
        tokio::task::block_in_place(|| d.wait_for("taskwarden ready", Duration::from_secs(60)))
            .is_some()
    );
    // Keep-alives while the supervisor ticks.
    tokio::task::block_in_place(|| {
        recv_until(&sock, Duration::from_secs(60), |m| keepalives(m) >= 2)
    });
    d.signal(Signal::SIGTERM);
    tokio::task::block_in_place(|| {
        recv_until(&sock, Duration::from_secs(60), |m| {
            m.iter().any(|m| m == "STOPPING=1")
        })
    });
    assert!(tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(120))).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_keepalives_stop_when_the_supervisor_stalls() {
    let t = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("wd.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let mut cfg = Config {
        database: t.config(2, 0, Duration::from_secs(5)),
        ..Config::default()
    };
    cfg.supervisor.interval = Dur::millis(100);
    // The stall bound is 2 intervals + connect_timeout + query_timeout (0.9 s here).
    cfg.database.connect_timeout = Dur::millis(300);
    cfg.database.query_timeout = Dur::millis(400);
    let config = Arc::new(ArcSwap::from_pointee(cfg));
    let metrics = taskwarden::metrics::Metrics::new();
    let db = taskwarden::db::Db::new(t.pg.clone(), &config.load().database, &metrics).unwrap();
    let tasks = tokio_util::task::TaskTracker::new();
    let all = tokio_util::sync::CancellationToken::new();
    let alerts =
        taskwarden::alerts::Alerts::new(metrics.clone(), Arc::clone(&config), &tasks, all.clone());
    let sup = taskwarden::supervisor::Supervisor::new(
        Arc::clone(&config),
        t.pg.clone(),
        db,
        taskwarden::orchestrator::registry::RunningTasks::new(),
        alerts,
        metrics,
    );
    let hb = sup.liveness();
    // Keep-alives every half period (100 ms) while the supervisor is on time.
    const PERIOD: Duration = Duration::from_millis(200);
    // Longer than the period, so a quiet window means keep-alives stopped.
    const QUIET: Duration = Duration::from_millis(1000);
    tokio::spawn(taskwarden::systemd::watchdog(
        taskwarden::systemd::Notifier::to_socket(sock_path.to_str().unwrap()),
        PERIOD,
        Arc::clone(&hb),
        Arc::clone(&config),
        all.clone(),
    ));
    // Never ticked: nothing, for several periods.
    let before = tokio::task::block_in_place(|| recv_all(&sock, QUIET));
    assert!(before.is_empty(), "keep-alives before any tick: {before:?}");
    // Ticking: keep-alives arrive.
    let sup_stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(sup.run(sup_stop.clone()));
    tokio::task::block_in_place(|| {
        recv_until(&sock, Duration::from_secs(60), |m| keepalives(m) >= 3)
    });
    // Stalled (the loop is gone): they stop once the last tick is older than the bound —
    // wait for a quiet window, then check it stays quiet for several more periods.
    sup_stop.cancel();
    running.await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut while_stopping = Vec::new();
    while let Some(m) = tokio::task::block_in_place(|| recv_one(&sock, QUIET)) {
        while_stopping.push(m);
        assert!(
            std::time::Instant::now() < deadline,
            "keep-alives never stopped after the supervisor stalled: {} so far",
            while_stopping.len()
        );
    }
    let after = tokio::task::block_in_place(|| recv_all(&sock, 2 * QUIET));
    assert!(after.is_empty(), "keep-alives while stalled: {after:?}");
    all.cancel();
}
