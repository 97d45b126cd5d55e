//! Starting the postmaster: its command line, spawning it from a thread of its own (in its
//! own session, with a parent-death signal), waiting until it accepts connections, and
//! clearing a stale one left by a killed daemon.

use super::Cluster;
use super::ClusterOptions;
use super::EmbeddedError;
use super::as_user;
use super::binaries::PgBinaries;
use super::lock::DataDirLock;
use nix::sys::signal::Signal;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use nix::unistd::User;
use std::fs;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;
use std::time::Instant;

impl Cluster {
    /// The postmaster's command line: a unix socket in `pgdata` and no TCP, output to our
    /// log, its own session, and a parent-death signal (see the module header).
    pub(super) fn postmaster_command(
        bins: &PgBinaries,
        pgdata: &Path,
        opts: &ClusterOptions,
        user: &Option<User>,
        log: fs::File,
        log_err: fs::File,
    ) -> Command {
        let mut cmd = Command::new(&bins.postgres);
        cmd.arg("-D")
            .arg(pgdata)
            .arg("-k")
            .arg(pgdata)
            .args(["-p", &opts.port().to_string()])
            .args([
                "-c",
                match opts.listen_port {
                    Some(_) => "listen_addresses=127.0.0.1",
                    None => "listen_addresses=",
                },
            ])
            // No JIT: it needs writable-and-executable memory, which the systemd unit's
            // MemoryDenyWriteExecute forbids (every query past jit_above_cost would fail),
            // and the daemon's short queries gain nothing from it.
            .args(["-c", "jit=off"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        if let Some(n) = opts.max_connections {
            cmd.args(["-c", &format!("max_connections={n}")]);
        }
        if opts.unsafe_fast {
            cmd.args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]);
        }
        as_user(&mut cmd, user);
        crate::process::scrub_child_env(&mut cmd);
        // SAFETY: setsid and prctl are async-signal-safe; they run in the child after
        // setuid (so the credential change cannot clear the death signal) and before exec.
        unsafe {
            cmd.pre_exec(|| {
                // Its own session: a terminal's Ctrl-C (sent to our process group) does
                // not reach it; the daemon stops it in order.
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Spawns the server from a thread that lives exactly as long as it (the parent-death
    /// signal is tied to that thread); the receiver and the token learn when it exits.
    pub(super) fn spawn_postmaster(
        mut cmd: Command,
    ) -> Result<(u32, mpsc::Receiver<()>, tokio_util::sync::CancellationToken), EmbeddedError> {
        let (pid_tx, pid_rx) = mpsc::channel::<Result<u32, std::io::Error>>();
        let (exit_tx, exit_rx) = mpsc::channel::<()>();
        let exit_token = tokio_util::sync::CancellationToken::new();
        let exit_signal = exit_token.clone();
        std::thread::Builder::new()
            .name("embedded-postgres".into())
            .spawn(move || match cmd.spawn() {
                Ok(mut child) => {
                    let _ = pid_tx.send(Ok(child.id()));
                    let _ = child.wait();
                    let _ = exit_tx.send(());
                    exit_signal.cancel();
                }
                Err(e) => {
                    let _ = pid_tx.send(Err(e));
                }
            })
            .map_err(EmbeddedError::Spawn)?;
        let pid = pid_rx
            .recv()
            .map_err(|e| EmbeddedError::Spawn(std::io::Error::other(e)))?
            .map_err(EmbeddedError::Spawn)?;
        Ok((pid, exit_rx, exit_token))
    }

    /// Waits (at most 60 s) until the server just spawned accepts connections; only then
    /// does the cluster take the `data_dir` lock.
    pub(super) fn wait_until_ready(
        mut cluster: Cluster,
        log_path: PathBuf,
        log_offset: u64,
        lock: &mut Option<DataDirLock>,
    ) -> Result<Cluster, EmbeddedError> {
        let pid = cluster.pid();
        let deadline = Instant::now() + Duration::from_secs(60);
        let socket = cluster
            .pgdata
            .join(format!(".s.PGSQL.{}", cluster.opts.port()));
        let pid_file = cluster.pgdata.join("postmaster.pid");
        loop {
            if cluster.exited_within(Duration::ZERO) {
                cluster.stopped = true;
                return Err(EmbeddedError::StartFailed {
                    tail: log_tail(&log_path, log_offset),
                    log: log_path,
                });
            }
            // postmaster.pid's 8th line reads "ready" once connections are accepted; its
            // first line must be our server's pid (a dead one's file may still say ready).
            let ready = fs::read_to_string(&pid_file)
                .map(|s| {
                    s.lines().next().map(str::trim) == Some(pid.to_string().as_str())
                        && s.lines().nth(7).is_some_and(|l| l.trim() == "ready")
                })
                .unwrap_or(false);
            if ready && socket.exists() {
                cluster.lock = lock.take();
                return Ok(cluster);
            }
            if Instant::now() > deadline {
                cluster.stop_blocking();
                return Err(EmbeddedError::StartTimeout(
                    Duration::from_secs(60),
                    log_path,
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A postmaster left by a daemon that was SIGKILLed before its server noticed: stop it so
/// ours can start. PostgreSQL itself cleans a pid file whose process is gone. Called only
/// with the `data_dir` lock held, so the server found here has no live daemon.
pub(super) fn stop_stale_postmaster(pgdata: &Path) {
    let Ok(text) = fs::read_to_string(pgdata.join("postmaster.pid")) else {
        return;
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
    else {
        return;
    };
    // The pid may have been reused by an unrelated process since: only a postgres counts.
    let comm = u32::try_from(pid)
        .ok()
        .and_then(crate::process::comm)
        .unwrap_or_default();
    if !comm.starts_with("postgres") {
        return;
    }
    let pid = Pid::from_raw(pid);
    tracing::warn!(pid = pid.as_raw(), pgdata = %pgdata.display(), "stopping a PostgreSQL left running in our data directory");
    let _ = kill(pid, Signal::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(30);
    while kill(pid, None).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(super) fn log_tail(path: &Path, from: u64) -> String {
    let mut s = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        use std::io::Seek;
        let _ = f.seek(std::io::SeekFrom::Start(from));
        let _ = f.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
