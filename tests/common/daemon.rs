//! Drives the built binary: start with a config, read its log lines, signal it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::bin;

/// A running daemon whose stdout lines are collected on a thread.
pub struct Daemon {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Daemon {
    pub fn start(dir: &Path, config: &str, env: &[(&str, &str)]) -> Daemon {
        Self::start_with(dir, config, env, false)
    }

    /// Like [`Daemon::start`], with the daemon leading a process group of its own (pgid =
    /// its pid), as a shell starts a foreground job: a terminal's Ctrl-C then reaches the
    /// daemon and every child it did not move to another group.
    pub fn start_in_own_group(dir: &Path, config: &str, env: &[(&str, &str)]) -> Daemon {
        Self::start_with(dir, config, env, true)
    }

    fn start_with(dir: &Path, config: &str, env: &[(&str, &str)], own_group: bool) -> Daemon {
        let cfg = dir.join("config.toml");
        // Tests run side by side: each daemon gets its own port unless the test chose one.
        let config = if config.contains("[http]") {
            config.to_string()
        } else {
            format!("{config}\n[http]\nlisten = \"127.0.0.1:0\"\n")
        };
        std::fs::write(&cfg, config).unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&cfg)
            .current_dir(dir)
            .env_remove("TASKWARDEN_DATABASE_URL")
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        if own_group {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let mut child = cmd.spawn().unwrap();
        let rx = output_lines(&mut child);
        Daemon {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a log line containing `needle`; the limit only guards against a hang.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> Option<String> {
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return Some(l.clone());
        }
        let deadline = std::time::Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return Some(l);
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }

    /// The address the daemon listens on, from its ready line (pretty or JSON logs).
    pub fn addr(&mut self) -> Option<String> {
        let line = self.wait_for("taskwarden ready", Duration::from_secs(120))?;
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            return v["listen"].as_str().map(str::to_string);
        }
        line.split("listen=")
            .nth(1)?
            .split_whitespace()
            .next()
            .map(str::to_string)
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Drain what is left of the output.
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(l);
                }
                return st;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("daemon did not exit; output:\n{}", self.seen.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn output(&self) -> String {
        self.seen.join("\n")
    }

    /// Collects the lines printed so far without waiting, and returns the whole output.
    pub fn drain(&mut self) -> String {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        self.output()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines a child writes to stdout and stderr (both piped), as they come, by one
/// reader thread each; the channel ends when both streams close.
pub fn output_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    rx
}

pub fn alive(pid: i32) -> bool {
    // A zombie is not a running server; /proc tells the difference.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.split_whitespace().nth(2).is_none_or(|st| st != "Z"),
        Err(_) => false,
    }
}

impl Daemon {
    /// Waits for readiness; the base URL, or a panic with the daemon's output.
    pub fn base_url(&mut self) -> String {
        match tokio::task::block_in_place(|| self.addr()) {
            Some(a) => format!("http://{a}"),
            None => {
                let st = self.child.try_wait().ok().flatten();
                panic!(
                    "daemon never became ready (exit status: {st:?}); output:\n{}",
                    self.drain()
                )
            }
        }
    }
}

/// Runs a test body under an overall limit, so a regression fails instead of hanging.
pub async fn bounded(limit: Duration, body: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(limit, body).await.is_err() {
        panic!("test did not finish within {limit:?}");
    }
}

/// An HTTP client whose every call is bounded, with no kept-alive connections.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// Submits a task through the API; its id when the API accepted it (201), else None.
pub async fn submit_task(
    http: &reqwest::Client,
    base: &str,
    agent: &str,
    payload: serde_json::Value,
) -> Option<i64> {
    let r = http
        .post(format!("{base}/v1/tasks"))
        .json(&serde_json::json!({ "agent": agent, "payload": payload }))
        .send()
        .await
        .ok()?;
    if r.status().as_u16() != 201 {
        return None;
    }
    r.json::<serde_json::Value>().await.ok()?["id"].as_i64()
}

/// A task's status through the API, if the API answered 200.
pub async fn task_status(http: &reqwest::Client, base: &str, id: i64) -> Option<String> {
    let r = http
        .get(format!("{base}/v1/tasks/{id}"))
        .send()
        .await
        .ok()?;
    if r.status().as_u16() != 200 {
        return None;
    }
    r.json::<serde_json::Value>().await.ok()?["status"]
        .as_str()
        .map(str::to_string)
}

/// The daemon's `/metrics` text.
pub async fn scrape(http: &reqwest::Client, base: &str) -> String {
    http.get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// `GET /v1/status` as JSON.
pub async fn status_json(http: &reqwest::Client, base: &str) -> serde_json::Value {
    http.get(format!("{base}/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Whether a status answer lists `alert` firing (for `subject`, an alert that fires per
/// thing; `None` for one that has none).
pub fn firing_for(status: &serde_json::Value, alert: &str, subject: Option<&str>) -> bool {
    status["alerts_firing"].as_array().is_some_and(|a| {
        a.iter()
            .any(|x| x["alert"] == alert && x["subject"].as_str() == subject)
    })
}

/// A series' value in a `/metrics` scrape (`name{labels}` as rendered), 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}
