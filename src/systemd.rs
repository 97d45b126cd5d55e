//! systemd integration without libsystemd: `sd_notify` datagrams to `$NOTIFY_SOCKET`
//! (READY, RELOADING, STOPPING, STATUS) and the watchdog keep-alive, sent only while the
//! supervisor ticks on time — so a wedged daemon stops petting the watchdog and systemd
//! restarts it.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::supervisor::Liveness;

/// Where notifications go: systemd's socket, or nowhere.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    socket: Option<String>,
}

impl Notifier {
    /// `$NOTIFY_SOCKET`, as systemd sets it (a path, or `@name` for the abstract namespace).
    pub fn from_env() -> Notifier {
        Notifier {
            socket: std::env::var_os("NOTIFY_SOCKET").map(|p| p.to_string_lossy().to_string()),
        }
    }

    pub fn to_socket(path: impl Into<String>) -> Notifier {
        Notifier {
            socket: Some(path.into()),
        }
    }

    /// Sends one notification; a no-op without a socket. Errors are logged, never fatal.
    pub fn send(&self, state: &str) {
        let Some(path) = &self.socket else { return };
        let addr = if let Some(abstract_name) = path.strip_prefix('@') {
            SocketAddr::from_abstract_name(abstract_name.as_bytes())
        } else {
            SocketAddr::from_pathname(path)
        };
        let result = addr.and_then(|addr| {
            let sock = UnixDatagram::unbound()?;
            sock.send_to_addr(state.as_bytes(), &addr).map(|_| ())
        });
        if let Err(e) = result {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }
}

pub use crate::process::{MAIN_PROCESS_ENV, scrub_child_env};

/// Sends one notification to `$NOTIFY_SOCKET`; a no-op outside systemd.
pub fn notify(state: &str) {
    Notifier::from_env().send(state);
}

/// `RELOADING=1` must carry the monotonic time (systemd ≥ 253 checks it for notify-reload).
pub fn notify_reloading() {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

/// The watchdog period systemd asked for, if any (and if it is meant for this process).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pets the watchdog every half period unless a restart would mend what is wrong
/// ([`crate::supervisor::restart_would_mend`]): the supervisor has not ticked within
/// [`crate::supervisor::stall_bound`] — the bound `/readyz` uses — or outcomes are stalled
/// while the database answers. A database that is merely unreachable makes `/readyz` 503
/// but does not stop the keep-alive: a restart cannot mend a remote database and would
/// kill the work running here; a wedged loop can.
/// Stops at shutdown.
pub async fn watchdog(
    notifier: Notifier,
    period: Duration,
    liveness: Arc<Liveness>,
    config: Arc<ArcSwap<Config>>,
    shutdown: CancellationToken,
) {
    let mut stalled_logged = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period / 2) => {}
        }
        match crate::supervisor::restart_would_mend(&liveness, &config.load()) {
            None => {
                notifier.send("WATCHDOG=1");
                stalled_logged = false;
            }
            Some(why) => {
                if !stalled_logged {
                    tracing::error!(reason = %why, "withholding the systemd watchdog keep-alive");
                    stalled_logged = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_lose_what_systemd_gave_the_main_process() {
        let mut cmd = std::process::Command::new("true");
        cmd.env("NOTIFY_SOCKET", "/run/systemd/notify")
            .env("WATCHDOG_PID", "1")
            .env("TASKWARDEN_TASK_ID", "7");
        scrub_child_env(&mut cmd);
        let envs: Vec<_> = cmd.get_envs().collect();
        for name in MAIN_PROCESS_ENV {
            assert!(
                envs.contains(&(std::ffi::OsStr::new(name), None)),
                "{name} not removed: {envs:?}"
            );
        }
        assert!(envs.contains(&(
            std::ffi::OsStr::new("TASKWARDEN_TASK_ID"),
            Some(std::ffi::OsStr::new("7"))
        )));
    }
}
