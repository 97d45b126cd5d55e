//! What operators install and watch: the Prometheus rules and Grafana dashboard (checked
//! against a real Prometheus scraping a running daemon), the systemd unit, and sd_notify.

mod common;

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
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

/// `promtool check rules` on a rules file: its output, asserted to succeed.
fn promtool_check_rules(path: &Path) -> String {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(path)
        .output()
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    text
}

/// Each rule of a rules file: its name and its lines up to the next rule.
fn rule_blocks(rules: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            out.push((name.to_string(), String::new()));
        } else if let Some((_, block)) = out.last_mut() {
            block.push_str(line.trim());
            block.push('\n');
        }
    }
    out
}

const RULE_COUNT: usize = 21;

#[test]
fn promtool_accepts_the_alert_rules() {
    let text = promtool_check_rules(&root().join("dashboards/alerts.yml"));
    assert!(
        text.contains(&format!("SUCCESS: {RULE_COUNT} rules found")),
        "{text}"
    );
    // Every rule has a severity, a `for:`, and links its runbook (a section of
    // docs/runbooks.md) under the standard annotation, at an absolute URL.
    let rules = std::fs::read_to_string(root().join("dashboards/alerts.yml")).unwrap();
    assert!(!rules.contains(" runbook:"), "a rule carries `runbook`");
    let runbooks = std::fs::read_to_string(root().join("docs/runbooks.md")).unwrap();
    let tests = std::fs::read_to_string(root().join("dashboards/alerts_test.yml")).unwrap();
    let blocks = rule_blocks(&rules);
    assert_eq!(blocks.len(), RULE_COUNT);
    for (name, block) in &blocks {
        assert!(
            block.lines().any(|l| l.starts_with("for: ")),
            "{name}: no `for:`"
        );
        assert!(
            block.contains("severity: warning\n") || block.contains("severity: critical\n"),
            "{name}: no severity"
        );
        let anchor = format!(
            "runbook_url: \"{}#{}\"",
            taskwarden::alert_rules::DEFAULT_RUNBOOK_BASE,
            name.to_lowercase()
        );
        assert!(block.contains(&anchor), "{name}: no {anchor}");
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

/// `taskwarden alerts --runbook-base URL --job NAME`: the rules an operator installs pass
/// promtool, every runbook link is at their base with its alert's anchor, the instance-down
/// rule watches their job, and the unit tests pass on them too (with the expected links
/// and series moved the same way). Without options it prints the committed file.
#[test]
fn the_alerts_command_puts_runbooks_at_the_given_base_and_job() {
    let committed = std::fs::read_to_string(root().join("dashboards/alerts.yml")).unwrap();
    let plain = Command::new(bin()).arg("alerts").output().unwrap();
    assert!(plain.status.success(), "{plain:?}");
    assert_eq!(String::from_utf8_lossy(&plain.stdout), committed);

    let base = "https://wiki.example.org/ops/taskwarden-runbooks";
    let out = Command::new(bin())
        .args(["alerts", "--runbook-base", base, "--job", "tw-prod"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let rules = String::from_utf8(out.stdout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("alerts.yml"), &rules).unwrap();
    let text = promtool_check_rules(&dir.path().join("alerts.yml"));
    assert!(
        text.contains(&format!("SUCCESS: {RULE_COUNT} rules found")),
        "{text}"
    );
    let blocks = rule_blocks(&rules);
    assert_eq!(blocks.len(), RULE_COUNT);
    for (name, block) in &blocks {
        let links: Vec<&str> = block
            .lines()
            .filter(|l| l.starts_with("runbook_url: "))
            .collect();
        assert_eq!(
            links,
            [format!("runbook_url: \"{base}#{}\"", name.to_lowercase())],
            "{name}"
        );
    }
    assert!(rules.contains("up{job=\"tw-prod\"} == 0"), "{rules}");
    assert!(
        !rules.contains(taskwarden::alert_rules::DEFAULT_RUNBOOK_BASE),
        "{rules}"
    );

    let tests = std::fs::read_to_string(root().join("dashboards/alerts_test.yml"))
        .unwrap()
        .replace(taskwarden::alert_rules::DEFAULT_RUNBOOK_BASE, base)
        .replace("up{job=\"taskwarden\"", "up{job=\"tw-prod\"")
        .replace("job: taskwarden,", "job: tw-prod,");
    std::fs::write(dir.path().join("alerts_test.yml"), tests).unwrap();
    let unit = Command::new("promtool")
        .args(["test", "rules"])
        .arg(dir.path().join("alerts_test.yml"))
        .output()
        .unwrap();
    assert!(
        unit.status.success(),
        "{}{}",
        String::from_utf8_lossy(&unit.stdout),
        String::from_utf8_lossy(&unit.stderr)
    );

    // A relative base is what the rules had before: refused, naming the option.
    let bad = Command::new(bin())
        .args(["alerts", "--runbook-base", "docs/runbooks.md"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--runbook-base"),
        "{bad:?}"
    );
    assert!(bad.stdout.is_empty(), "{bad:?}");
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

/// What is wrong with a dashboard, as the lint sees it: importable (`__inputs` asks for
/// a Prometheus data source, a data-source variable that every panel and query follows,
/// no data-source uid of someone's Grafana), no hard-coded job (every metric selector
/// filtered by the `job` and `instance` variables), every query naming only metrics the
/// daemon exports, and every per-agent resource and session metric on it.
fn dashboard_lint(d: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let inputs = d["__inputs"].as_array().cloned().unwrap_or_default();
    if !inputs.iter().any(|i| {
        i["name"] == "DS_PROMETHEUS" && i["type"] == "datasource" && i["pluginId"] == "prometheus"
    }) {
        out.push(format!(
            "no DS_PROMETHEUS data-source input in __inputs: {inputs:?}"
        ));
    }
    let vars = d["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = vars.iter().filter_map(|v| v["name"].as_str()).collect();
    if names != ["datasource", "job", "instance"] {
        out.push(format!(
            "template variables {names:?}, not datasource, job, instance"
        ));
    }
    if let Some(ds) = vars.iter().find(|v| v["name"] == "datasource") {
        if ds["type"] != "datasource" || ds["query"] != "prometheus" {
            out.push(format!(
                "the datasource variable is no Prometheus data-source variable: {ds}"
            ));
        }
        if ds["current"]["value"] != "${DS_PROMETHEUS}" {
            out.push("the datasource variable does not default to the imported data source".into());
        }
    }
    // A data source is named only through the variable, wherever one is named.
    fn datasources(v: &Value, at: &str, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if k == "datasource" && at != "templating" {
                        if x["uid"] != "${datasource}" {
                            out.push(format!("a data source other than ${{datasource}}: {x}"));
                        }
                    } else {
                        datasources(x, if k == "templating" { "templating" } else { at }, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| datasources(x, at, out)),
            _ => {}
        }
    }
    datasources(&d["panels"], "", &mut out);
    for v in &vars {
        if v["type"] == "query" && v["datasource"]["uid"] != "${datasource}" {
            out.push(format!(
                "variable {} queries another data source",
                v["name"]
            ));
        }
        let q = v["query"]["query"].as_str().unwrap_or("");
        if v["name"] == "instance" && !q.contains("job=~\"$job\"") {
            out.push(format!("the instance variable ignores $job: {q}"));
        }
    }
    let mut exported: BTreeSet<String> = BTreeSet::new();
    for def in DEFS {
        exported.insert(def.name.to_string());
        if def.kind == Kind::Histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                exported.insert(format!("{}{suffix}", def.name));
            }
        }
    }
    for name in taskwarden::metrics::PROCESS_DEFS.iter().map(|p| p.0) {
        exported.insert(name.to_string());
    }
    let mut queried: BTreeSet<String> = BTreeSet::new();
    for p in d["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["type"] != "row")
    {
        let title = p["title"].as_str().unwrap_or("");
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or("");
            for (name, selector) in selectors(expr) {
                if !exported.contains(&name) {
                    out.push(format!("{title}: {name} is not exported by the daemon"));
                }
                if !selector.contains("job=~\"$job\"")
                    || !selector.contains("instance=~\"$instance\"")
                {
                    out.push(format!(
                        "{title}: {name}{selector} is not filtered by $job and $instance"
                    ));
                }
                queried.insert(name);
            }
            // Whatever the matcher (=, =~, !=, !~), a job is only ever the variable.
            let mut rest = expr;
            while let Some(i) = rest.find("job") {
                let after = rest[i + 3..].trim_start();
                let op = ["=~", "!~", "!=", "="]
                    .into_iter()
                    .find(|o| after.starts_with(o));
                if let Some(op) = op
                    && !after[op.len()..].trim_start().starts_with("\"$job\"")
                {
                    out.push(format!("{title}: a hard-coded job in {expr}"));
                }
                rest = &rest[i + 3..];
            }
        }
    }
    for def in DEFS
        .iter()
        .filter(|d| d.name.starts_with("taskwarden_agent_"))
    {
        let name = if def.kind == Kind::Histogram {
            format!("{}_bucket", def.name)
        } else {
            def.name.to_string()
        };
        if !queried.contains(&name) {
            out.push(format!("per-agent metric {} is on no panel", def.name));
        }
    }
    out
}

/// Each metric a PromQL expression names (taskwarden's and the standard `process_`
/// ones), with the `{...}` selector right after it ("" when none).
fn selectors(expr: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < expr.len() {
        let tail = &expr[i..];
        let starts = (tail.starts_with("taskwarden_") || tail.starts_with("process_"))
            && !expr[..i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !starts {
            i += tail.chars().next().map_or(1, char::len_utf8);
            continue;
        }
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let sel = tail[end..]
            .strip_prefix('{')
            .and_then(|r| r.find('}').map(|e| format!("{{{}}}", &r[..e])))
            .unwrap_or_default();
        out.push((tail[..end].to_string(), sel));
        i += end;
    }
    out
}

#[test]
fn the_dashboard_is_complete_and_names_only_exported_metrics() {
    let d = dashboard();
    let problems = dashboard_lint(&d);
    assert!(
        problems.is_empty(),
        "dashboard lint:\n{}",
        problems.join("\n")
    );
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
            "Agents",
            "Applications sharing the database",
            "LLM usage",
            "Daemon"
        ]
    );
    // Panels do not overlap on Grafana's 24-column grid.
    let mut cells: BTreeSet<(i64, i64)> = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_i64().unwrap(),
            g["y"].as_i64().unwrap(),
            g["w"].as_i64().unwrap(),
            g["h"].as_i64().unwrap(),
        );
        assert!(x + w <= 24, "{}: off the grid", p["title"]);
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(
                    cells.insert((cx, cy)),
                    "{} overlaps another panel",
                    p["title"]
                );
            }
        }
    }
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
            assert!(
                !t["expr"].as_str().unwrap().is_empty(),
                "{title}: empty query"
            );
        }
    }
}

/// The lint finds what it is for: each fault put into the shipped dashboard is reported.
#[test]
fn the_dashboard_lint_finds_a_hard_coded_job_and_a_missing_input() {
    let d = dashboard();
    let expr = "/panels/1/targets/0/expr";
    let with = |f: &dyn Fn(&mut Value)| {
        let mut d = d.clone();
        f(&mut d);
        dashboard_lint(&d)
    };
    let set_expr =
        |e: &'static str| move |d: &mut Value| *d.pointer_mut(expr).unwrap() = Value::from(e);
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "hard-coded job",
            with(&set_expr(
                "taskwarden_db_pool_in_use{job=\"taskwarden\", job=~\"$job\", instance=~\"$instance\"}",
            )),
        ),
        (
            "hard-coded job",
            with(&set_expr(
                "taskwarden_db_pool_in_use{job =~ \"task.*\", instance=~\"$instance\"}",
            )),
        ),
        (
            "not filtered by $job",
            with(&set_expr(
                "taskwarden_db_pool_in_use{instance=~\"$instance\"}",
            )),
        ),
        (
            "process_resident_memory_bytes{instance",
            with(&set_expr(
                "process_resident_memory_bytes{instance=~\"$instance\"}",
            )),
        ),
        (
            "not exported",
            with(&set_expr(
                "taskwarden_no_such_metric{job=~\"$job\", instance=~\"$instance\"}",
            )),
        ),
        (
            "DS_PROMETHEUS",
            with(&|d: &mut Value| {
                d.as_object_mut().unwrap().remove("__inputs");
            }),
        ),
        (
            "a data source other than",
            with(&|d: &mut Value| {
                d["panels"][1]["datasource"]["uid"] = Value::from("P1809F7CD0C75ACF3");
            }),
        ),
        (
            "template variables",
            with(&|d: &mut Value| {
                d["templating"]["list"].as_array_mut().unwrap().remove(1);
            }),
        ),
        (
            "per-agent metric taskwarden_agent_db_sessions ",
            with(&|d: &mut Value| {
                let panels = d["panels"].as_array_mut().unwrap();
                panels.retain(|p| p["title"] != "Agent DB sessions by agent (budget dashed)");
            }),
        ),
    ];
    for (want, found) in cases {
        assert!(
            found.iter().any(|p| p.contains(want)),
            "{want:?} not reported: {found:?}"
        );
    }
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

/// A dashboard query as Grafana sends it with every variable at "All".
fn grafana_vars(expr: &str) -> String {
    expr.replace("$instance", ".*")
        .replace("$job", ".*")
        .replace("$__rate_interval", "1m")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_daemon_and_every_dashboard_query_has_data() {
    let t = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let script = r#"cat >/dev/null; echo '{"step": 1}'; echo '{"usage": {"prompt_tokens": 12, "completion_tokens": 3, "cost_usd": 0.002}}'"#;
    let config = format!(
        "[database]\napplication_name = {:?}\n[supervisor]\ninterval = \"500ms\"\n\
         [workers]\nretry_backoff = \"10ms\"\nretry_backoff_max = \"20ms\"\nshutdown_grace = \"1s\"\n\
         [agents.llm]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", {script:?}]\n\
         [agents.flaky]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"cat >/dev/null; exit 1\"]\n\
         [agents.worker]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"cat >/dev/null; sleep 600\"]\ndb_sessions_max = 5\n\
         [agents.forky]\nkind = \"command\"\nprocesses_max = 2\n\
         command = [\"sh\", \"-c\", \"cat >/dev/null; sleep 60 & sleep 60 & sleep 60 & wait\"]\n\
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
    // A long task for the agent panels (its process tree and session budget while it
    // runs), and one over its processes_max for the limits panel.
    for agent in [
        "llm", "llm", "llm", "llm", "llm", "flaky", "worker", "forky",
    ] {
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
                let v = prom_query(&http, &base, &grafana_vars(e)).await;
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
            let q = grafana_vars(e);
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
    assert_eq!(n, RULE_COUNT);
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
