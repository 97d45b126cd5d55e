//! The outcome writer: attempts' outcomes (successes, retries, failures, snoozes, and
//! their events) written in batches, one statement each, retried with backoff while the
//! database is unreachable; drained at shutdown.

#[allow(unused_imports)]
use super::*;

impl Orchestrator {
    /// Writes succeeded outcomes in batches: one statement for everything queued, so a
    /// busy instance pays one commit per batch instead of one per task. On shutdown it
    /// drains what is queued before it stops.
    pub(super) async fn completion_writer(self, mut rx: mpsc::Receiver<Completion>) {
        let i = Arc::clone(&self.inner);
        let mut batch: Vec<Completion> = Vec::with_capacity(COMPLETION_BATCH);
        loop {
            tokio::select! {
                biased;
                n = rx.recv_many(&mut batch, COMPLETION_BATCH) => {
                    if n == 0 {
                        return;
                    }
                }
                _ = i.shutdown.cancelled() => {
                    while let Ok(c) = rx.try_recv() {
                        batch.push(c);
                    }
                    if batch.is_empty() {
                        return;
                    }
                }
            }
            self.gather(&mut rx, &mut batch).await;
            self.write_completions(&mut batch).await;
            if i.shutdown.is_cancelled() && rx.is_empty() {
                return;
            }
        }
    }

    /// Waits up to `workers.completion_window` for more successes to join the batch, so a
    /// busy instance writes many per statement instead of whatever was queued the moment
    /// the writer became free.
    async fn gather(&self, rx: &mut mpsc::Receiver<Completion>, batch: &mut Vec<Completion>) {
        let i = &self.inner;
        let window = i.config.load().workers.completion_window.get();
        if window.is_zero() || i.shutdown.is_cancelled() {
            return;
        }
        let until = tokio::time::Instant::now() + window;
        while batch.len() < COMPLETION_BATCH {
            tokio::select! {
                biased;
                n = rx.recv_many(batch, COMPLETION_BATCH - batch.len()) => if n == 0 { return },
                _ = tokio::time::sleep_until(until) => return,
                _ = i.shutdown.cancelled() => return,
            }
        }
    }

    pub(super) async fn write_completions(&self, batch: &mut Vec<Completion>) {
        let i = &self.inner;
        let rows: Vec<crate::store::OutcomeRow> = batch.iter().map(|c| c.row.clone()).collect();
        let mut written: Option<HashSet<i64>> = None;
        let mut attempt = 0u32;
        loop {
            let r = i.store.write_outcomes(&rows, &i.instance_id).await;
            i.record_write("completion writer", &r, HashSet::len);
            match r {
                Ok(ids) => {
                    written = Some(ids);
                    break;
                }
                Err(e) => {
                    if e.is_transient() {
                        tracing::warn!(tasks = rows.len(), attempt, error = %e, "writing task outcomes failed; retrying");
                    } else {
                        tracing::error!(tasks = rows.len(), attempt, error = %e, "writing task outcomes failed; retrying");
                    }
                    if !self.retry_pause(&mut attempt).await {
                        break;
                    }
                }
            }
        }
        let written = written.unwrap_or_default();
        for c in batch.drain(..) {
            if written.contains(&c.task.id) {
                self.finished(&c.task, c.row.to, c.label, c.ran, c.row.error.as_deref())
                    .await;
            } else {
                tracing::info!(
                    task_id = c.task.id,
                    agent = %c.task.agent,
                    outcome = c.label,
                    "task outcome not recorded: status or lease changed meanwhile"
                );
            }
        }
    }
}
