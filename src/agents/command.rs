//! A local program as an agent. The payload JSON goes to its stdin (one line, then EOF);
//! each stdout line that is a JSON object is a task event, `{"usage": {...}}` is token
//! usage, and an object's `result` field (the last one seen) is the task's result. Exit 0
//! is success; anything else fails the attempt with the tail of stderr. An object with a
//! `snooze` field (`{"snooze": SECONDS}`, 0 to 30 days) ends a successful exit as snoozed:
//! the task runs again after that delay, and the attempt is not counted.
//!
//! The program runs under the agent shim ([`super::shim`], `taskwarden agent-shim`), a
//! subreaper in its own process group: when the attempt ends — finished, cancelled, timed
//! out, or the future dropped — the shim gets SIGTERM and kills the program's whole tree,
//! including what called `setsid` or double-forked; when the daemon dies, however it died,
//! the shim notices and does the same. Without a shim binary (an embedding program), the
//! program's process group is killed instead, which a `setsid` escapes.

use std::collections::VecDeque;
use std::process::Stdio;

use futures_util::StreamExt;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{AnyDelimiterCodec, FramedRead};

use super::{Agent, AgentError, AgentOutput, BoxFuture, TaskContext};

/// Longest stdout line accepted; a longer one fails the attempt.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;
/// How much of stderr is kept for the error message.
pub const STDERR_TAIL_BYTES: usize = 4096;

pub struct CommandAgent {
    argv: Vec<String>,
}

impl CommandAgent {
    pub fn new(argv: Vec<String>) -> Self {
        CommandAgent { argv }
    }
}

/// Ends the program's whole tree when dropped.
struct TreeKill {
    pid: Pid,
    shim: bool,
}

/// How long the shim gets to clean up after SIGTERM before its group is SIGKILLed.
const SHIM_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

impl Drop for TreeKill {
    fn drop(&mut self) {
        if !self.shim {
            // ESRCH (already gone) is fine.
            let _ = killpg(self.pid, Signal::SIGKILL);
            return;
        }
        // The shim kills the tree and exits; SIGKILL would orphan what it must kill.
        if kill(self.pid, Signal::SIGTERM).is_err() {
            return;
        }
        let pid = self.pid;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep(SHIM_GRACE).await;
                // Still our shim (not a reused pid)? Its group goes, as a last resort.
                if is_our_shim(pid) {
                    tracing::warn!(
                        pid = pid.as_raw(),
                        "agent shim did not exit after SIGTERM; killing its group"
                    );
                    let _ = killpg(pid, Signal::SIGKILL);
                }
            });
        }
    }
}

fn is_our_shim(pid: Pid) -> bool {
    let Ok(raw) = u32::try_from(pid.as_raw()) else {
        return false;
    };
    crate::process::Stat::read(raw).is_some_and(|s| s.ppid == std::process::id())
        && super::shim::is_shim(raw)
}

fn shim_path() -> Option<&'static std::path::Path> {
    static SHIM: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    SHIM.get_or_init(|| {
        let p = super::shim::locate();
        if p.is_none() {
            tracing::warn!("taskwarden binary not found for the agent shim (set TASKWARDEN_SHIM); command agents run without it, and a process that calls setsid can outlive its task");
        }
        p
    })
    .as_deref()
}

impl Agent for CommandAgent {
    fn run(&self, ctx: TaskContext) -> BoxFuture<Result<AgentOutput, AgentError>> {
        let argv = self.argv.clone();
        Box::pin(async move { run(argv, ctx).await })
    }
}

/// The program under the shim (or alone without one): payload on stdin, events on
/// stdout, in a process group of its own with a parent-death signal.
fn command(
    prog: &str,
    args: &[String],
    shim: Option<&std::path::Path>,
    ctx: &TaskContext,
) -> tokio::process::Command {
    let mut cmd = match shim {
        Some(path) => {
            let mut c = tokio::process::Command::new(path);
            c.arg(super::shim::SUBCOMMAND)
                .arg("--")
                .arg(prog)
                .args(args);
            c
        }
        None => {
            let mut c = tokio::process::Command::new(prog);
            c.args(args);
            c
        }
    };
    crate::process::scrub_child_env(cmd.as_std_mut());
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("TASKWARDEN_TASK_ID", ctx.task_id.to_string())
        .env("TASKWARDEN_ATTEMPT", ctx.attempt.to_string())
        // libpq, psycopg, node-postgres, JDBC (via PGAPPNAME in their drivers) label the
        // agent's own backends with it: the supervisor finds them in pg_stat_activity.
        .env("PGAPPNAME", &ctx.application_name)
        .env(
            "TASKWARDEN_SESSION_ID",
            ctx.slot_id.clone().unwrap_or_default(),
        )
        .process_group(0)
        // Dropping the future must not SIGKILL the shim: TreeKill asks it to clean up.
        .kill_on_drop(shim.is_none());
    // The shim is told by SIGTERM to kill its tree; a program without one is killed.
    let death_signal = if shim.is_some() {
        libc::SIGTERM
    } else {
        libc::SIGKILL
    };
    // SAFETY: prctl is async-signal-safe and only affects the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

async fn run(argv: Vec<String>, ctx: TaskContext) -> Result<AgentOutput, AgentError> {
    let Some((prog, args)) = argv.split_first() else {
        return Err(AgentError::fatal("command agent has an empty argv"));
    };
    let shim = shim_path();
    let mut child = command(prog, args, shim, &ctx)
        .spawn()
        .map_err(|e| AgentError::fatal(format!("cannot start {prog:?}: {e}")))?;
    let Some(pid) = child.id() else {
        return Err(AgentError::retryable(
            "command exited before it could be tracked",
        ));
    };
    let _tree = TreeKill {
        pid: Pid::from_raw(pid as i32),
        shim: shim.is_some(),
    };
    ctx.track_process_tree(pid);
    tracing::debug!(task_id = ctx.task_id, pid, program = %prog, "command agent started");

    let payload = serde_json::to_vec(&ctx.payload).map_err(|e| AgentError::fatal(e.to_string()))?;
    let ((), stderr_tail, result) = tokio::join!(
        feed_stdin(child.stdin.take(), payload),
        stderr_tail(child.stderr.take()),
        read_stdout(child.stdout.take(), &ctx),
    );
    let (result, snooze) = result?;
    let status = child
        .wait()
        .await
        .map_err(|e| AgentError::retryable(format!("waiting for the command: {e}")))?;
    if status.success() {
        Ok(AgentOutput { result, snooze })
    } else {
        let mut msg = format!("command {prog:?} exited with {status}");
        if !stderr_tail.is_empty() {
            msg.push_str(": ");
            msg.push_str(&stderr_tail);
        }
        Err(AgentError::retryable(msg))
    }
}

/// The payload as one line, then EOF.
async fn feed_stdin(stdin: Option<tokio::process::ChildStdin>, payload: Vec<u8>) {
    if let Some(mut w) = stdin {
        // A program that does not read its stdin is not an error.
        let _ = w.write_all(&payload).await;
        let _ = w.write_all(b"\n").await;
        let _ = w.shutdown().await;
    }
}

/// The last [`STDERR_TAIL_BYTES`] of stderr, for the error message.
async fn stderr_tail(stderr: Option<tokio::process::ChildStderr>) -> String {
    let mut tail: VecDeque<u8> = VecDeque::with_capacity(STDERR_TAIL_BYTES);
    if let Some(mut e) = stderr {
        let mut buf = [0u8; 4096];
        while let Ok(n) = e.read(&mut buf).await {
            if n == 0 {
                break;
            }
            tail.extend(&buf[..n]);
            while tail.len() > STDERR_TAIL_BYTES {
                tail.pop_front();
            }
        }
    }
    String::from_utf8_lossy(tail.make_contiguous())
        .trim()
        .to_string()
}

/// Each stdout line that is a JSON object goes to the task context; the last `result`
/// seen is the task's, the last `snooze` its snooze.
async fn read_stdout(
    stdout: Option<tokio::process::ChildStdout>,
    ctx: &TaskContext,
) -> Result<(Option<serde_json::Value>, Option<std::time::Duration>), AgentError> {
    let mut result = None;
    let mut snooze = None;
    if let Some(out) = stdout {
        let codec =
            AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), Vec::new(), MAX_LINE_BYTES);
        let mut lines = FramedRead::new(out, codec);
        while let Some(line) = lines.next().await {
            let line = line.map_err(|e| AgentError::fatal(format!("reading stdout: {e}")))?;
            // A program may print any bytes: invalid UTF-8 becomes U+FFFD, never an error.
            let line = String::from_utf8_lossy(&line);
            let line = line.trim();
            if !line.starts_with('{') {
                continue;
            }
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if let Some(s) = v.get("snooze") {
                    snooze = Some(super::snooze_seconds(s)?);
                }
                if let Some(r) = ctx.emit_json(v).await? {
                    result = Some(r);
                }
            }
        }
    }
    Ok((result, snooze))
}
