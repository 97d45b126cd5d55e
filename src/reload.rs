//! `taskwarden reload`: what the unit's `ExecReload=` runs. A bare SIGHUP (`kill -HUP`)
//! tells systemd nothing about the outcome, so `systemctl reload` succeeded even for a file
//! the daemon then refused. This signals the daemon and waits for its verdict instead:
//! it reads `taskwarden_config_reloads_total{result}` from `/metrics` (no token needed),
//! sends SIGHUP, and waits until one of the two counts moves — the daemon counts a reload
//! only once the new config is in force, or once it has refused the file. Exit 0 when it
//! applied the file; otherwise an error naming the problems (the same `db::load_config` the
//! daemon ran, on the same file, as the same user).

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::config::Config;
use crate::metrics::{CONFIG_RELOADS_TOTAL, parse_value};

/// How often the daemon's counts are read while waiting.
const POLL: Duration = Duration::from_millis(100);
/// One `/metrics` request may take this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(
        "cannot read the reload count of taskwarden at {url}: {message}; not signalling \
         pid {pid}, since the outcome could not be confirmed (is it running, and is the \
         file's http.listen the one it started with? that key changes only at restart)"
    )]
    Unreachable {
        url: String,
        pid: i32,
        message: String,
    },
    #[error("cannot send SIGHUP to pid {pid}: {source}")]
    Signal {
        pid: i32,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("taskwarden (pid {pid}) refused {}; it keeps its running config. {reason}", .path.display())]
    Refused {
        pid: i32,
        path: PathBuf,
        reason: String,
    },
    #[error("taskwarden (pid {pid}) did not report the reload within {timeout:?}; see its log")]
    Timeout { pid: i32, timeout: Duration },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// What `taskwarden reload` was asked to do.
#[derive(Debug, Clone)]
pub struct Request {
    /// The daemon's pid (systemd passes `$MAINPID`).
    pub pid: i32,
    /// The daemon's config file: it names the listener, and explains a refusal.
    pub config_path: PathBuf,
    /// The daemon's base URL; `None`: `http://` + the file's `http.listen`.
    pub url: Option<String>,
    /// How long to wait for the verdict.
    pub timeout: Duration,
}

/// Signals the daemon and waits for its verdict; `Ok` once the new config is in force.
pub async fn run(req: &Request) -> Result<(), ReloadError> {
    let url = req
        .url
        .clone()
        .unwrap_or_else(|| format!("http://{}", listen_of(&req.config_path)));
    let url = url.trim_end_matches('/').to_string();
    let http = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| ReloadError::Client(e.to_string()))?;
    let before = counts(&http, &url)
        .await
        .map_err(|message| ReloadError::Unreachable {
            url: url.clone(),
            pid: req.pid,
            message,
        })?;
    kill(Pid::from_raw(req.pid), Signal::SIGHUP).map_err(|source| ReloadError::Signal {
        pid: req.pid,
        source,
    })?;
    let deadline = tokio::time::Instant::now() + req.timeout;
    loop {
        tokio::time::sleep(POLL).await;
        // A failed read while waiting is retried: the listener may be busy.
        if let Ok(now) = counts(&http, &url).await {
            if now.ok > before.ok {
                return Ok(());
            }
            if now.error > before.error {
                return Err(ReloadError::Refused {
                    pid: req.pid,
                    path: req.config_path.clone(),
                    reason: refusal_reason(&req.config_path),
                });
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ReloadError::Timeout {
                pid: req.pid,
                timeout: req.timeout,
            });
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Counts {
    ok: f64,
    error: f64,
}

/// The daemon's reload counts, or why they could not be read.
async fn counts(http: &reqwest::Client, url: &str) -> Result<Counts, String> {
    let resp = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    if !resp.status().is_success() {
        return Err(format!("/metrics answered {}", resp.status()));
    }
    let text = resp.text().await.map_err(|e| e.without_url().to_string())?;
    let get = |result| parse_value(&text, CONFIG_RELOADS_TOTAL, &[("result", result)]);
    match (get("ok"), get("error")) {
        (Some(ok), Some(error)) => Ok(Counts { ok, error }),
        _ => Err(format!("/metrics has no {CONFIG_RELOADS_TOTAL}")),
    }
}

/// The listener named in the file: from the validated config when it loads, else read
/// from the raw TOML (a file the daemon will refuse still names where the daemon is),
/// else the default.
pub fn listen_of(path: &Path) -> String {
    if let Ok(c) = crate::db::load_config(path) {
        return c.http.listen;
    }
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| t.get("http")?.get("listen")?.as_str().map(str::to_string))
        .unwrap_or_else(|| Config::default().http.listen)
}

/// Why the daemon refused the file: the problems `db::load_config` reports, every one by key.
fn refusal_reason(path: &Path) -> String {
    match crate::db::load_config(path) {
        Err(e) => e.to_string(),
        Ok(_) => "The file is valid now (changed since?); the daemon's log line \
                  `config reload failed` has its reason."
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_of_reads_an_invalid_file_and_falls_back_to_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let invalid = dir.path().join("invalid.toml");
        std::fs::write(
            &invalid,
            "[http]\nlisten = \"127.0.0.1:9999\"\n[supervisor]\npool_alert_ratio = 7\n",
        )
        .unwrap();
        assert!(crate::db::load_config(&invalid).is_err());
        assert_eq!(listen_of(&invalid), "127.0.0.1:9999");

        let not_toml = dir.path().join("broken.toml");
        std::fs::write(&not_toml, "this is not toml").unwrap();
        assert_eq!(listen_of(&not_toml), Config::default().http.listen);
        assert_eq!(
            listen_of(&dir.path().join("missing.toml")),
            Config::default().http.listen
        );
    }
}
