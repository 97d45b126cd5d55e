//! Run slots: `POST /v1/slots/{id}/run` (formerly `/v1/sessions/{id}/run`, still served)
//! starts the new run at once, then cancels the one it replaces and waits for it outside
//! every lock (the third seed's deadlock, done right). At most one task runs per slot.

use super::Orchestrator;
use super::OrchestratorError;
use super::REPLACE_WAIT;
use super::SlotEntry;
use crate::store::NewTask;
use crate::store::StoreError;
use crate::store::Task;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

impl Orchestrator {
    /// Runs a task in run slot `slot_id` now, replacing the slot's running task.
    pub async fn run_in_slot(
        &self,
        slot_id: &str,
        mut t: NewTask,
    ) -> Result<Task, OrchestratorError> {
        let i = &self.inner;
        t.slot_id = Some(slot_id.to_string());
        let Some(entry) = i.agents.load().get(&t.agent).cloned() else {
            return Err(self.unknown_agent(&t.agent));
        };
        if i.claiming.is_cancelled() {
            return Err(OrchestratorError::ShuttingDown);
        }
        let permit = Arc::clone(&i.slot_runs)
            .try_acquire_owned()
            .map_err(|_| OrchestratorError::NoRunSlot(i.slot_run_limit))?;
        let lease = i.config.load().workers.lease.get();
        let task = i.store.create_running(&t, &i.instance_id, lease).await?;

        // Register, swapping the slot under a plain mutex: no await in here. The slot keeps
        // the newest task (highest id); a call that lost a race cancels its own task.
        let cancel = CancellationToken::new();
        let done = CancellationToken::new();
        let old = {
            let mut slots = i.slots();
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
        self.spawn_run(
            task.clone(),
            entry,
            cancel,
            Some((slot_id.to_string(), done, permit)),
        );

        // Replaced tasks end as cancelled in the database, with the reason; local ones
        // are cancelled here, ones running elsewhere at their instance's next lease-keeper pass.
        let replaced = self.cancel_older_slot_runs(slot_id, task.id).await;
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

    pub(super) async fn cancel_older_slot_runs(
        &self,
        slot_id: &str,
        newest: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let reason = format!("replaced by task {newest}");
        let ids = self
            .inner
            .store
            .cancel_slot_runs_before(slot_id, newest, &reason)
            .await?;
        for id in &ids {
            self.inner.running.cancel(*id);
        }
        Ok(ids)
    }
}
