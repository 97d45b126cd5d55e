//! The in-memory registry of tasks running in this process: id, agent, start time and the
//! token that cancels the task.
//!
//! The seed's deadlock came from awaiting a cancelled task while holding the registry's
//! lock. Here the lock is a plain mutex around map operations: cancelling is a flag set
//! inside it, and whoever waits for a cancelled task to end does so after releasing it.
//! Registrations are removed by their guard, and only the registration that created an
//! entry can remove it, so a late-finishing old run never unregisters its replacement.
//!
//! An entry also holds what the supervisor learns of the attempt's agent: the root of its
//! process tree (set by a command agent when it starts one), the latest sample of that
//! tree and of the agent's own database sessions, and why the supervisor ended it when a
//! limit did ([`Kill`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

#[derive(Debug)]
struct Entry {
    generation: u64,
    agent: String,
    started: Instant,
    cancel: CancellationToken,
    /// The pid at the root of the agent's process tree (the shim, or the program).
    tree_root: Option<u32>,
    usage: AgentUsage,
    kill: Option<Kill>,
    /// When the run ended, while its outcome waits to be written (the entry goes when the
    /// outcome is written and its registration dropped).
    ended: Option<Instant>,
}

/// What the supervisor last saw of a running task's agent: its process tree (every
/// process under the root, the shim itself not counted) and its own database sessions
/// (backends whose `application_name` is `<schema>/task/<id>`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct AgentUsage {
    /// Processes in the tree (none sampled yet, or an in-process agent: 0).
    pub processes: u64,
    pub resident_memory_bytes: u64,
    /// CPU time of the tree: live processes and the children they have reaped.
    pub cpu_seconds: f64,
    pub db_sessions: u64,
    /// Age of the oldest of those sessions.
    pub oldest_db_session_seconds: Option<f64>,
    /// How many of them are idle in a transaction.
    pub db_sessions_idle_in_transaction: u64,
}

/// Why the supervisor ended a running task, and how it is to be recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Kill {
    /// `Failed` for a resource limit (`over_limit` in metrics), `Cancelled` for an agent
    /// session past `session_max_age`.
    pub status: crate::store::TaskStatus,
    /// The outcome label in metrics and logs.
    pub label: &'static str,
    /// The task's error: which limit, and the figure.
    pub reason: String,
}

/// A running task as seen by status output and the supervisor.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct RunningTask {
    pub task_id: i64,
    pub agent: String,
    pub running_seconds: f64,
    /// Its agent's processes and database sessions, as last sampled.
    pub usage: AgentUsage,
}

#[derive(Debug, Default)]
pub struct RunningTasks {
    entries: Mutex<HashMap<i64, Entry>>,
    generation: AtomicU64,
}

/// Removes its registration when dropped (the task ended, however it ended).
#[derive(Debug)]
pub struct Registration {
    registry: Arc<RunningTasks>,
    task_id: i64,
    generation: u64,
    cancel: CancellationToken,
}

impl Registration {
    pub fn token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Marks the run ended: from now until this registration drops, its outcome is
    /// waiting to be written, and [`RunningTasks::oldest_unwritten`] counts it.
    pub fn run_ended(&self) {
        if let Some(e) = self.registry.lock().get_mut(&self.task_id)
            && e.generation == self.generation
        {
            e.ended.get_or_insert_with(Instant::now);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut entries = self.registry.lock();
        if entries
            .get(&self.task_id)
            .is_some_and(|e| e.generation == self.generation)
        {
            entries.remove(&self.task_id);
        }
    }
}

impl RunningTasks {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i64, Entry>> {
        // Map operations only: a panic cannot leave it half-updated.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a task as running here. A previous registration of the same id is
    /// cancelled (not awaited: that is the caller's business, outside any lock).
    pub fn register(
        self: &Arc<Self>,
        task_id: i64,
        agent: &str,
        cancel: CancellationToken,
    ) -> Registration {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let old = self.lock().insert(
            task_id,
            Entry {
                generation,
                agent: agent.to_string(),
                started: Instant::now(),
                cancel: cancel.clone(),
                tree_root: None,
                usage: AgentUsage::default(),
                kill: None,
                ended: None,
            },
        );
        if let Some(old) = old {
            old.cancel.cancel();
        }
        Registration {
            registry: Arc::clone(self),
            task_id,
            generation,
            cancel,
        }
    }

    /// Cancels a running task; false if it is not running here.
    pub fn cancel(&self, task_id: i64) -> bool {
        let token = self.lock().get(&task_id).map(|e| e.cancel.clone());
        match token {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        }
    }

    /// Records the root of the task's process tree (a command agent's shim or program).
    pub fn set_tree_root(&self, task_id: i64, pid: u32) {
        if let Some(e) = self.lock().get_mut(&task_id) {
            e.tree_root = Some(pid);
        }
    }

    /// Running tasks with their agent and process-tree root, for the supervisor's sample.
    pub fn trees(&self) -> Vec<(i64, String, Option<u32>)> {
        self.lock()
            .iter()
            .map(|(id, e)| (*id, e.agent.clone(), e.tree_root))
            .collect()
    }

    /// Stores the supervisor's latest sample of a task's agent.
    pub fn set_usage(&self, task_id: i64, usage: AgentUsage) {
        if let Some(e) = self.lock().get_mut(&task_id) {
            e.usage = usage;
        }
    }

    /// Ends a running task for the reason given (the first reason stands): the runner
    /// records it as `kill.status` with `kill.reason`. False if it is not running here.
    pub fn kill(&self, task_id: i64, kill: Kill) -> bool {
        let token = {
            let mut entries = self.lock();
            let Some(e) = entries.get_mut(&task_id) else {
                return false;
            };
            e.kill.get_or_insert(kill);
            e.cancel.clone()
        };
        token.cancel();
        true
    }

    /// Why the supervisor ended the task, if it did.
    pub fn kill_reason(&self, task_id: i64) -> Option<Kill> {
        self.lock().get(&task_id).and_then(|e| e.kill.clone())
    }

    /// The run here that ended longest ago and whose outcome is still not written: its
    /// task and how long it has waited. The supervisor watches it (outcome lag).
    pub fn oldest_unwritten(&self) -> Option<(i64, Duration)> {
        self.lock()
            .iter()
            .filter_map(|(id, e)| e.ended.map(|t| (*id, t.elapsed())))
            .max_by_key(|(_, d)| *d)
    }

    /// Cancels everything (shutdown).
    pub fn cancel_all(&self) -> usize {
        let tokens: Vec<CancellationToken> =
            self.lock().values().map(|e| e.cancel.clone()).collect();
        tokens.iter().for_each(CancellationToken::cancel);
        tokens.len()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Running tasks, longest-running first.
    pub fn snapshot(&self) -> Vec<RunningTask> {
        let mut v: Vec<(Duration, RunningTask)> = self
            .lock()
            .iter()
            .map(|(id, e)| {
                let d = e.started.elapsed();
                (
                    d,
                    RunningTask {
                        task_id: *id,
                        agent: e.agent.clone(),
                        running_seconds: d.as_secs_f64(),
                        usage: e.usage.clone(),
                    },
                )
            })
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.0));
        v.into_iter().map(|(_, t)| t).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacement_cancels_the_old_run_and_survives_its_end() {
        let r = RunningTasks::new();
        let old = r.register(7, "echo", CancellationToken::new());
        let new = r.register(7, "echo", CancellationToken::new());
        assert!(old.token().is_cancelled());
        assert!(!new.token().is_cancelled());
        drop(old); // the old run ending must not unregister the new one
        assert_eq!(r.len(), 1);
        assert!(r.cancel(7));
        assert!(new.token().is_cancelled());
        drop(new);
        assert!(r.is_empty());
        assert!(!r.cancel(7));
    }

    #[test]
    fn an_ended_run_counts_as_unwritten_until_its_registration_drops() {
        let r = RunningTasks::new();
        let a = r.register(1, "echo", CancellationToken::new());
        let b = r.register(2, "echo", CancellationToken::new());
        assert_eq!(r.oldest_unwritten(), None, "running is not waiting");
        b.run_ended();
        std::thread::sleep(Duration::from_millis(5));
        a.run_ended();
        assert_eq!(r.oldest_unwritten().map(|(id, _)| id), Some(2));
        drop(b);
        assert_eq!(r.oldest_unwritten().map(|(id, _)| id), Some(1));
        drop(a);
        assert_eq!(r.oldest_unwritten(), None);
    }
}
