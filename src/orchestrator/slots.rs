//! Run slots: `POST /v1/slots/{id}/run` (formerly `/v1/sessions/{id}/run`, still served)
//! starts the new run at once, then cancels the one it replaces and waits for it outside
//! every lock (the third seed's deadlock, done right). At most one task runs per slot.

use super::runner::Runner;
use super::{Context, OrchestratorError, unknown_agent};
use crate::store::NewTask;
use crate::store::StoreError;
use crate::store::Task;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// How long a slot run waits for the task it replaced to end before answering.
pub const REPLACE_WAIT: Duration = Duration::from_secs(10);

/// The run slots of this instance: which task runs in each, and the bound on how many
/// slot runs go at once (they do not wait for free capacity as claims do).
pub(super) struct RunSlots {
    entries: Mutex<HashMap<String, SlotEntry>>,
    runs: Arc<Semaphore>,
    limit: usize,
}

struct SlotEntry {
    task_id: i64,
    cancel: CancellationToken,
    done: CancellationToken,
}

/// What a run started in a run slot carries to its end: the slot, the token its
/// replacer waits on, and its share of the slot-run bound.
pub(super) struct SlotRun {
    slot_id: String,
    done: CancellationToken,
    _bound: OwnedSemaphorePermit,
}

impl RunSlots {
    pub(super) fn new(limit: usize) -> RunSlots {
        RunSlots {
            entries: Mutex::new(HashMap::new()),
            runs: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<String, SlotEntry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The run in `run.slot_id` ended: the slot is emptied unless a newer run took it, and
    /// whoever replaced it learns so (also when the run panicked: the guard fires on drop).
    pub(super) async fn run_to_end<F: Future<Output = ()>>(
        &self,
        task_id: i64,
        run: SlotRun,
        f: F,
    ) {
        let SlotRun {
            slot_id,
            done,
            _bound,
        } = run;
        let _done = done.drop_guard();
        f.await;
        let mut slots = self.entries();
        if slots.get(&slot_id).is_some_and(|e| e.task_id == task_id) {
            slots.remove(&slot_id);
        }
    }

    /// Runs a task in run slot `slot_id` now, replacing the slot's running task.
    pub(super) async fn run(
        &self,
        i: &Context,
        runner: &Runner,
        slot_id: &str,
        mut t: NewTask,
    ) -> Result<Task, OrchestratorError> {
        t.slot_id = Some(slot_id.to_string());
        let Some(entry) = i.agents.load().get(&t.agent).cloned() else {
            return Err(unknown_agent(i, &t.agent));
        };
        if i.claiming.is_cancelled() {
            return Err(OrchestratorError::ShuttingDown);
        }
        let state = self;
        let bound = Arc::clone(&state.runs)
            .try_acquire_owned()
            .map_err(|_| OrchestratorError::NoRunSlot(state.limit))?;
        let lease = i.config.load().workers.lease.get();
        let task = i.store.create_running(&t, &i.instance_id, lease).await?;

        // Register, swapping the slot under a plain mutex: no await in here. The slot keeps
        // the newest task (highest id); a call that lost a race cancels its own task.
        let cancel = CancellationToken::new();
        let done = CancellationToken::new();
        let old = {
            let mut slots = state.entries();
            match slots.get(slot_id) {
                Some(cur) if cur.task_id > task.id => {
                    cancel.cancel();
                    None
                }
                _ => slots.insert(
                    slot_id.to_string(),
                    SlotEntry {
                        task_id: task.id,
                        cancel: cancel.clone(),
                        done: done.clone(),
                    },
                ),
            }
        };
        // Start the new task at once.
        runner.spawn_run(
            task.clone(),
            entry,
            cancel,
            Some(SlotRun {
                slot_id: slot_id.to_string(),
                done,
                _bound: bound,
            }),
        );

        // Replaced tasks end as cancelled in the database, with the reason; local ones
        // are cancelled here, ones running elsewhere at their instance's next lease-keeper pass.
        let replaced = cancel_older_slot_runs(i, slot_id, task.id).await;
        if let Err(e) = &replaced {
            tracing::warn!(slot_id, task_id = task.id, error = %e, "could not record replaced slot tasks");
        }
        if let Some(o) = &old {
            o.cancel.cancel();
        }
        // Wait for the local old task to end — outside every lock, bounded.
        if let Some(o) = old
            && tokio::time::timeout(REPLACE_WAIT, o.done.cancelled())
                .await
                .is_err()
        {
            tracing::warn!(
                slot_id,
                old_task_id = o.task_id,
                "replaced task still ending after the wait"
            );
        }
        Ok(task)
    }
}

/// Ends the runs of `slot_id` older than `newest` as cancelled, with the reason; the
/// ones running here are cancelled now, the others at their instance's next lease beat.
async fn cancel_older_slot_runs(
    i: &Context,
    slot_id: &str,
    newest: i64,
) -> Result<Vec<i64>, StoreError> {
    let reason = format!("replaced by task {newest}");
    let ids = i
        .store
        .cancel_slot_runs_before(slot_id, newest, &reason)
        .await?;
    for id in &ids {
        i.running.cancel(*id);
    }
    Ok(ids)
}
