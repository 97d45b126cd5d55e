//! Session run slots: `POST /v1/sessions/{id}/run` starts the new run at once, then
//! cancels the one it replaces and waits for it outside every lock (the third seed's
//! deadlock, done right).

#[allow(unused_imports)]
use super::*;

impl Orchestrator {
    /// Runs a task for `session_id` now, replacing the session's running task.
    pub async fn run_for_session(
        &self,
        session_id: &str,
        mut t: NewTask,
    ) -> Result<Task, OrchestratorError> {
        let i = &self.inner;
        t.session_id = Some(session_id.to_string());
        let Some(entry) = i.agents.load().get(&t.agent).cloned() else {
            return Err(OrchestratorError::UnknownAgent(t.agent.clone()));
        };
        if i.claiming.is_cancelled() {
            return Err(OrchestratorError::ShuttingDown);
        }
        let permit = Arc::clone(&i.session_runs)
            .try_acquire_owned()
            .map_err(|_| OrchestratorError::NoRunSlot(i.session_run_limit))?;
        let lease = i.config.load().workers.lease.get();
        let task = i.store.create_running(&t, &i.instance_id, lease).await?;

        // Register, swapping the slot under a plain mutex: no await in here. The slot keeps
        // the newest task (highest id); a call that lost a race cancels its own task.
        let cancel = CancellationToken::new();
        let done = CancellationToken::new();
        let old = {
            let mut slots = i.slots();
            match slots.get(session_id) {
                Some(cur) if cur.task_id > task.id => {
                    cancel.cancel();
                    None
                }
                _ => slots.insert(
                    session_id.to_string(),
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
            Some((session_id.to_string(), done, permit)),
        );

        // Replaced tasks end as cancelled in the database, with the reason; local ones
        // are cancelled here, ones running elsewhere at their instance's next heartbeat.
        let replaced = self.cancel_older_session_runs(session_id, task.id).await;
        if let Err(e) = &replaced {
            tracing::warn!(session_id, task_id = task.id, error = %e, "could not record replaced session tasks");
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
                session_id,
                old_task_id = o.task_id,
                "replaced task still ending after the wait"
            );
        }
        Ok(task)
    }

    pub(super) async fn cancel_older_session_runs(
        &self,
        session_id: &str,
        newest: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let reason = format!("replaced by task {newest}");
        let ids = self
            .inner
            .store
            .cancel_slot_runs_before(session_id, newest, &reason)
            .await?;
        for id in &ids {
            self.inner.running.cancel(*id);
        }
        Ok(ids)
    }
}
