//! The in-memory registry of tasks running in this process: id, agent, start time and the
//! token that cancels the task.
//!
//! The seed's deadlock came from awaiting a cancelled task while holding the registry's
//! lock. Here the lock is a plain mutex around map operations: cancelling is a flag set
//! inside it, and whoever waits for a cancelled task to end does so after releasing it.
//! Registrations are removed by their guard, and only the registration that created an
//! entry can remove it, so a late-finishing old run never unregisters its replacement.

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
}

/// A running task as seen by status output and the supervisor.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct RunningTask {
    pub task_id: i64,
    pub agent: String,
    pub running_seconds: f64,
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
}
