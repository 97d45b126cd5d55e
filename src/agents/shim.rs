//! `taskwarden agent-shim -- PROGRAM ARGS...`: the small process between the daemon and a
//! command agent, so that no process an agent started outlives its task or the daemon.
//!
//! Why a process and not the daemon's process group kill alone: a grandchild that calls
//! `setsid` (or double-forks) leaves the group, and the kernel's parent-death signal only
//! reaches a direct child. The shim is a *child subreaper* (`PR_SET_CHILD_SUBREAPER`):
//! every orphan in the agent's tree is re-parented to it, never to init, so "the tree" is
//! exactly the shim's descendants, whatever they did. It kills that whole tree:
//! - when the program exits (the task is over: stragglers go with it);
//! - on SIGTERM/SIGINT/SIGHUP (the daemon cancels the task, or is stopping);
//! - when the daemon dies, however it died: parent-death signal, and a `getppid` check
//!   every [`POLL`] in case the signal was missed.
//!
//! Why not a cgroup per task: that needs a delegated cgroup subtree, which a plain
//! `taskwarden run`, a container or a test does not have; the subreaper works everywhere
//! Linux runs. The shim uses no async runtime and only a few syscalls.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, getppid};

/// How often the shim looks at its program, its parent and its signals.
pub const POLL: Duration = Duration::from_millis(50);
/// How long the shim keeps killing a tree that keeps forking before it gives up.
const KILL_LIMIT: Duration = Duration::from_secs(5);
/// The subcommand name the daemon runs the shim with.
pub const SUBCOMMAND: &str = "agent-shim";

/// Whether process `pid` runs the shim (its argv holds [`SUBCOMMAND`]).
pub fn is_shim(pid: u32) -> bool {
    crate::process::argv(pid)
        .iter()
        .any(|a| a == SUBCOMMAND.as_bytes())
}

/// Runs the program under the shim; returns the exit code to exit with.
pub fn run(argv: &[String]) -> i32 {
    let Some((prog, args)) = argv.split_first() else {
        eprintln!("taskwarden agent-shim: no program given");
        return 127;
    };
    // SAFETY: prctl with integer arguments only affects this process.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        eprintln!(
            "taskwarden agent-shim: cannot become a subreaper: {}",
            std::io::Error::last_os_error()
        );
        return 126;
    }
    let parent = getppid();
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        if let Err(e) = signal_hook::flag::register(sig, Arc::clone(&stop)) {
            eprintln!("taskwarden agent-shim: cannot handle signal {sig}: {e}");
            return 126;
        }
    }
    // The daemon may have died between spawning us and the check above.
    if parent.as_raw() == 1 {
        return 128 + libc::SIGTERM;
    }
    let child = match Command::new(prog).args(args).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("taskwarden agent-shim: cannot start {prog:?}: {e}");
            return 127;
        }
    };
    let child_pid = Pid::from_raw(child.id() as i32);
    // std's Child is not waited on: waitpid(-1) below reaps it with the rest of the tree.
    std::mem::forget(child);
    let mut code = None;
    loop {
        // Reap whatever ended: the program, and any orphan re-parented to us.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, c)) if pid == child_pid => code = Some(c),
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child_pid => {
                    code = Some(128 + sig as i32)
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
        if let Some(c) = code {
            kill_tree();
            return c;
        }
        if stop.load(Ordering::Relaxed) || getppid() != parent {
            kill_tree();
            return 128 + libc::SIGTERM;
        }
        std::thread::sleep(POLL);
    }
}

/// SIGKILLs every descendant of this process until none is left (or [`KILL_LIMIT`]),
/// reaping them. Descendants are found through /proc's parent links; as a subreaper we are
/// an ancestor of every process the program's tree still has.
fn kill_tree() {
    let me = std::process::id() as i32;
    let started = Instant::now();
    loop {
        let ours = descendants(me);
        if ours.is_empty() {
            return;
        }
        for pid in &ours {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        while let Ok(s) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            if s == WaitStatus::StillAlive {
                break;
            }
        }
        if started.elapsed() > KILL_LIMIT {
            eprintln!(
                "taskwarden agent-shim: {} processes survived SIGKILL for {KILL_LIMIT:?}",
                ours.len()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Pids of every live (not zombie) process whose parent chain reaches `root`.
pub fn descendants(root: i32) -> Vec<i32> {
    let parent_of: std::collections::HashMap<i32, i32> = crate::process::all()
        .into_iter()
        .filter(|(_, s)| !s.zombie())
        .filter_map(|(pid, s)| Some((i32::try_from(pid).ok()?, i32::try_from(s.ppid).ok()?)))
        .collect();
    let mut out = Vec::new();
    for &pid in parent_of.keys() {
        let mut p = pid;
        // Bounded walk: a chain is never longer than the process count.
        for _ in 0..parent_of.len() {
            match parent_of.get(&p) {
                Some(&pp) if pp == root => {
                    out.push(pid);
                    break;
                }
                Some(&pp) if pp > 1 => p = pp,
                _ => break,
            }
        }
    }
    out
}

/// Where the shim binary is: `$TASKWARDEN_SHIM`, else this executable if it is
/// `taskwarden`, else a `taskwarden` beside it or one directory up (an embedding program
/// or a test binary in `target/*/deps`). None: agents run without the shim.
pub fn locate() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("TASKWARDEN_SHIM").filter(|p| !p.is_empty()) {
        return Some(p.into());
    }
    let exe = std::env::current_exe().ok()?;
    if exe.file_name().is_some_and(|n| n == "taskwarden") {
        return Some(exe);
    }
    let dir = exe.parent()?;
    [dir.join("taskwarden"), dir.parent()?.join("taskwarden")]
        .into_iter()
        .find(|p| p.is_file())
}
