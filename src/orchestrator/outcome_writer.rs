//! The outcome writer: attempts' outcomes (successes, retries, failures, snoozes, and
//! their events) written in batches, one statement each, retried with backoff while the
//! database is unreachable; drained at shutdown.

use super::Context;
use super::outcome::retry_pause;
use super::registry::Registration;
use crate::db::DbError;
use crate::metrics as m;
use crate::store::OutcomeRow;
use crate::store::StoreError;
use crate::store::Task;
use crate::store::TaskStatus;
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Most outcomes written in one statement; also the channel's bound (a runner waits when
/// it is full, which holds its permit: backpressure, not loss).
pub const OUTCOME_BATCH: usize = 512;

/// An attempt's outcome on its way from a runner to the writer.
pub(super) struct PendingOutcome {
    pub(super) task: Task,
    /// What to write; `row.to` with `label` names the outcome in logs and metrics.
    pub(super) row: OutcomeRow,
    pub(super) label: &'static str,
    pub(super) ran: Duration,
    /// Kept until the outcome is written, so the lease keeper keeps the lease alive (and the
    /// leader does not re-queue it) while the database is unreachable.
    pub(super) _registration: Registration,
}

/// The writer's state: both ends of the channel from the runners (the receiver until the
/// writer's loop takes it), and the write stall readiness reads.
pub(super) struct OutcomeWriter {
    tx: mpsc::Sender<PendingOutcome>,
    rx: Mutex<Option<mpsc::Receiver<PendingOutcome>>>,
    /// Since when this instance's writes have found the database unreachable or silent, and
    /// the latest such failure; `None` once one succeeds. See `Orchestrator::write_stall`.
    stall: Mutex<Option<(Instant, String)>>,
}

impl OutcomeWriter {
    pub(super) fn new() -> OutcomeWriter {
        let (tx, rx) = mpsc::channel(OUTCOME_BATCH);
        OutcomeWriter {
            tx,
            rx: Mutex::new(Some(rx)),
            stall: Mutex::new(None),
        }
    }

    /// The channel's receiving end, once: for the writer's loop.
    pub(super) fn take_receiver(&self) -> Option<mpsc::Receiver<PendingOutcome>> {
        self.rx.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Queues an outcome for the writer, waiting while the channel is full; gives it back
    /// when the writer has stopped (shutdown).
    pub(super) async fn send(&self, c: PendingOutcome) -> Result<(), PendingOutcome> {
        self.tx.send(c).await.map_err(|mpsc::error::SendError(c)| c)
    }

    /// Records how one of the loops' writes (a claim, an outcome batch, a lease beat)
    /// ended, for readiness: rows written (`rows` of the result) clear the stall — a
    /// statement that changed nothing committed nothing, so it proves nothing; a failure
    /// that says the database could not be reached or did not answer starts the stall (or
    /// extends it); any other failure (a refused statement, a busy pool) says nothing
    /// about the database and is ignored.
    pub(super) fn record_write<T>(
        &self,
        writer: &'static str,
        r: &Result<T, StoreError>,
        rows: impl FnOnce(&T) -> usize,
    ) {
        let mut stall = self.stall.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Ok(v) if rows(v) > 0 => *stall = None,
            Ok(_) => {}
            Err(e) if unreachable(e) => {
                let since = stall.as_ref().map_or_else(Instant::now, |(t, _)| *t);
                *stall = Some((since, format!("{writer}: {e}")));
            }
            Err(_) => {}
        }
    }

    /// The write stall as `/readyz` words it, if there is one.
    pub(super) fn stall(&self) -> Option<String> {
        let stall = self.stall.lock().unwrap_or_else(|p| p.into_inner());
        stall.as_ref().map(|(since, e)| {
            format!(
                "database takes no writes (for {:.1}s): {e}",
                since.elapsed().as_secs_f64()
            )
        })
    }

    /// Writes outcomes (successes, retries, failures, snoozes) in batches: one statement
    /// for everything queued, so a busy instance pays one commit per batch instead of one
    /// per task. On shutdown it
    /// drains what is queued before it stops.
    pub(super) async fn run(&self, ctx: &Context) {
        let Some(mut rx) = self.take_receiver() else {
            return;
        };
        let mut batch: Vec<PendingOutcome> = Vec::with_capacity(OUTCOME_BATCH);
        loop {
            tokio::select! {
                biased;
                n = rx.recv_many(&mut batch, OUTCOME_BATCH) => {
                    if n == 0 {
                        return;
                    }
                }
                _ = ctx.shutdown.cancelled() => {
                    while let Ok(c) = rx.try_recv() {
                        batch.push(c);
                    }
                    if batch.is_empty() {
                        return;
                    }
                }
            }
            self.gather(ctx, &mut rx, &mut batch).await;
            self.write_outcomes(ctx, &mut batch).await;
            if ctx.shutdown.is_cancelled() && rx.is_empty() {
                return;
            }
        }
    }

    /// Waits up to `workers.completion_window` for more outcomes to join the batch, so a
    /// busy instance writes many per statement instead of whatever was queued the moment
    /// the writer became free.
    async fn gather(
        &self,
        ctx: &Context,
        rx: &mut mpsc::Receiver<PendingOutcome>,
        batch: &mut Vec<PendingOutcome>,
    ) {
        let window = ctx.config.load().workers.completion_window.get();
        if window.is_zero() || ctx.shutdown.is_cancelled() {
            return;
        }
        let until = tokio::time::Instant::now() + window;
        while batch.len() < OUTCOME_BATCH {
            tokio::select! {
                biased;
                n = rx.recv_many(batch, OUTCOME_BATCH - batch.len()) => if n == 0 { return },
                _ = tokio::time::sleep_until(until) => return,
                _ = ctx.shutdown.cancelled() => return,
            }
        }
    }

    /// Writes a batch of outcomes and does the bookkeeping of those written. A batch the
    /// database refuses for what a row holds is split until the row is found, so the
    /// others are written at once; that row's task is failed instead, with an error naming
    /// the refusal. Transient failures are retried with backoff (the outcomes and their
    /// leases are kept meanwhile) until shutdown.
    pub(super) async fn write_outcomes(&self, ctx: &Context, batch: &mut Vec<PendingOutcome>) {
        let all: Vec<usize> = (0..batch.len()).collect();
        let (mut written, refused) = self.write_isolating(ctx, batch, all).await;
        if !refused.is_empty() {
            let mut again = Vec::with_capacity(refused.len());
            for (idx, e) in refused {
                let c = &mut batch[idx];
                tracing::error!(task_id = c.task.id, agent = %c.task.agent, outcome = c.label, field = suspect_field(&c.row), error = %e, "task outcome refused by the database; failing the task instead");
                c.row = refused_row(&c.row, c.label, &e);
                c.label = "failed";
                again.push(idx);
            }
            let (ids, lost) = self.write_isolating(ctx, batch, again).await;
            let failed = ids.len();
            written.extend(ids);
            let metric = |result| {
                ctx.metrics
                    .counter(m::OUTCOMES_REFUSED_TOTAL, &[("result", result)])
            };
            metric("failed").increment(failed as u64);
            metric("lost").increment(lost.len() as u64);
            for (idx, e) in lost {
                let c = &batch[idx];
                tracing::error!(task_id = c.task.id, agent = %c.task.agent, error = %e, "task outcome refused even as a failure; left to lease expiry");
            }
        }
        for c in batch.drain(..) {
            if written.contains(&c.task.id) {
                self.after_written(
                    ctx,
                    &c.task,
                    c.row.to,
                    c.label,
                    c.ran,
                    c.row.error.as_deref(),
                )
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

    /// Writes the outcomes `batch[idxs]`, one statement per group, splitting a group in
    /// halves when the database refuses it for a row's content (at most about
    /// 2·log2(n) extra statements per refused row). Returns the ids written and each row
    /// refused on its own. Transient failures pause and retry the same group; shutdown
    /// gives up on what is left (leases then expire and others re-run it).
    async fn write_isolating(
        &self,
        ctx: &Context,
        batch: &[PendingOutcome],
        idxs: Vec<usize>,
    ) -> (HashSet<i64>, Vec<(usize, StoreError)>) {
        let mut written = HashSet::new();
        let mut refused = Vec::new();
        let mut todo = vec![idxs];
        let mut attempt = 0u32;
        while let Some(group) = todo.pop() {
            if group.is_empty() {
                continue;
            }
            let rows: Vec<OutcomeRow> = group.iter().map(|&k| batch[k].row.clone()).collect();
            let r = ctx.store.write_outcomes(&rows, &ctx.instance_id).await;
            self.record_write("outcome writer", &r, HashSet::len);
            match r {
                Ok(ids) => {
                    written.extend(ids);
                    attempt = 0;
                }
                Err(e) if e.is_row_refusal() => {
                    if group.len() == 1 {
                        refused.push((group[0], e));
                    } else {
                        tracing::warn!(tasks = group.len(), error = %e, "outcome batch refused by the database; splitting it to find the row");
                        let mut first = group;
                        let second = first.split_off(first.len() / 2);
                        todo.push(second);
                        todo.push(first);
                    }
                }
                Err(e) => {
                    if e.is_transient() {
                        tracing::warn!(tasks = group.len(), attempt, error = %e, "writing task outcomes failed; retrying");
                    } else {
                        tracing::error!(tasks = group.len(), attempt, error = %e, "writing task outcomes failed; retrying");
                    }
                    todo.push(group);
                    if !retry_pause(&ctx.shutdown, &mut attempt).await {
                        break;
                    }
                }
            }
        }
        (written, refused)
    }

    /// Bookkeeping after an outcome was written: metrics, log, objective follow-ups.
    async fn after_written(
        &self,
        ctx: &Context,
        task: &Task,
        to: TaskStatus,
        label: &str,
        ran: Duration,
        error: Option<&str>,
    ) {
        // "retried" is its own outcome: "failed" counts final failures only.
        ctx.metrics
            .counter(
                m::TASKS_FINISHED_TOTAL,
                &[("agent", &task.agent), ("outcome", label)],
            )
            .increment(1);
        ctx.metrics
            .histogram(m::TASK_DURATION_SECONDS, &[("agent", &task.agent)])
            .record(ran.as_secs_f64());
        if to == TaskStatus::TimedOut {
            // Past the agent's own timeout here; the supervisor counts its own timeouts
            // (max_task_duration), which never reach this write.
            ctx.metrics
                .counter(m::TASKS_TIMED_OUT_TOTAL, &[])
                .increment(1);
        }
        let error = error.unwrap_or("");
        if to == TaskStatus::Queued {
            tracing::info!(task_id = task.id, agent = %task.agent, attempt = task.attempts, outcome = label, ran_ms = ran.as_millis() as u64, error, "task attempt failed; will retry");
        } else {
            tracing::info!(task_id = task.id, agent = %task.agent, attempt = task.attempts, outcome = label, ran_ms = ran.as_millis() as u64, error, "task finished");
        }
        if task.objective_id.is_some() {
            if to != TaskStatus::Succeeded && to != TaskStatus::Queued {
                cancel_blocked_dependants(&ctx.store).await;
            }
            // Dependants may be runnable now, here or elsewhere.
            ctx.wake.notify_one();
            let _ = ctx.store.notify_runnable().await;
        }
    }
}

/// Whether `e` says the database could not be reached or did not answer in time (rather
/// than refusing one statement, or the pool being busy).
fn unreachable(e: &StoreError) -> bool {
    match e {
        StoreError::Db(
            d @ (DbError::Deadline(_)
            | DbError::Connect(_)
            | DbError::ConnectTimeout(_)
            | DbError::Query(_)),
        ) => {
            d.is_transient()
                && !matches!(
                    d.sqlstate().map(|c| c.code()),
                    // Serialization failure, deadlock, a statement or lock time-out: the
                    // database works (a lock is watched as outcome lag instead).
                    Some("40001" | "40P01" | "57014" | "55P03")
                )
        }
        _ => false,
    }
}

/// The field of an outcome row the database most likely refused, for the log and the
/// task's error: the one holding a NUL, else the largest.
fn suspect_field(row: &OutcomeRow) -> &'static str {
    let nul_json = |v: &serde_json::Value| v.to_string().contains("\\u0000");
    if row.error.as_deref().is_some_and(|e| e.contains('\0')) {
        "error"
    } else if row.result.as_ref().is_some_and(nul_json) {
        "result"
    } else if row.event.as_ref().is_some_and(|(_, d)| nul_json(d)) {
        "event"
    } else if row.result.is_some() {
        "result"
    } else {
        "row"
    }
}

/// What is written instead of an outcome the database refused: the task failed, with an
/// error (and an `outcome_refused` event) that says what was refused and why, nothing of
/// the refused content kept.
fn refused_row(row: &OutcomeRow, label: &str, e: &StoreError) -> OutcomeRow {
    let field = suspect_field(row);
    let why = crate::agents::storable::error(&e.to_string());
    let error = format!("outcome ({label}) refused by the database; {field}: {why}");
    OutcomeRow {
        id: row.id,
        to: TaskStatus::Failed,
        result: None,
        error: Some(error),
        run_after: None,
        give_back_attempt: false,
        event: Some((
            "outcome_refused",
            serde_json::json!({ "outcome": label, "field": field, "error": why }),
        )),
    }
}

/// Cancels the steps that can no longer run because a step they depend on ended without
/// succeeding (after an outcome is written, after a cancel, and by the leader as a
/// sweep). A failure is only logged: the leader's sweep retries it.
pub(super) async fn cancel_blocked_dependants(store: &crate::store::Store) {
    match store.cancel_blocked_dependants().await {
        Ok(ids) if !ids.is_empty() => {
            tracing::info!(cancelled = ?ids, "dependants of a failed step cancelled")
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cancelling dependants failed; the leader retries")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_outcome_becomes_a_storable_failure_naming_the_field() {
        let mut row = OutcomeRow::succeeded(7, Some(serde_json::json!("a\u{0}")));
        assert_eq!(suspect_field(&row), "result");
        row.error = Some("x\0".into());
        assert_eq!(suspect_field(&row), "error");
        let e = StoreError::Invalid {
            field: "result".into(),
            message: "bad\0".into(),
        };
        let f = refused_row(&row, "succeeded", &e);
        assert_eq!((f.id, f.to, f.result), (7, TaskStatus::Failed, None));
        let err = f.error.unwrap_or_default();
        assert!(
            err.starts_with("outcome (succeeded) refused by the database; error: "),
            "{err}"
        );
        assert!(!err.contains('\0'));
        assert_eq!(f.event.map(|(k, _)| k), Some("outcome_refused"));
    }
}
