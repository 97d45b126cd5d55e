//! The SQL of claiming, leasing and finishing tasks: what the orchestrator's claimer,
//! lease keeper, leader, outcome writer and session slots do to `tasks` and
//! `instances`. Every status write names the state machine's allowed set for its target
//! (the outcome batch, whose rows all leave `running`, checks each target against it
//! before it asks the database). Of the statements that write several rows this
//! instance may also touch in another statement, the lease extension never waits for a
//! row lock (`SKIP LOCKED`), and the hand-back (id order, `ORDER BY id FOR UPDATE`)
//! takes only tasks that never started, which no outcome batch holds; so the outcome
//! batch may lock rows in the order it finds them.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::rate_limit::Gcra;
use super::{MAX_EVENTS_PER_TASK, Store, StoreError, TASK_COLUMNS, Task, TaskStatus};

/// Ends a task's lease; part of every write that takes a task out of `running`.
pub const END_LEASE: &str = "lease_owner = NULL, lease_expires_at = NULL";

/// Marks tasks running past `max_task_duration` as timed out. `$1` the limit in seconds,
/// `$2` the allowed set into `timed_out`, `$3` the error text. Returns id, agent, seconds
/// run. Shared by the supervisor's admin connection.
/// Which of the task ids `$1` are running (anywhere): the supervisor leaves an agent's
/// database sessions alone while their task runs on another instance.
pub const RUNNING_AMONG_SQL: &str =
    "SELECT id FROM taskwarden.tasks WHERE id = ANY($1) AND status = 'running'";

pub const TIME_OUT_OVERDUE_SQL: &str = "UPDATE taskwarden.tasks SET status = 'timed_out', \
     finished_at = now(), updated_at = now(), lease_owner = NULL, lease_expires_at = NULL, \
     error = $3 \
     WHERE status = ANY($2) AND started_at < now() - make_interval(secs => $1) \
     RETURNING id, agent, extract(epoch FROM now() - started_at)::float8";

/// The claim statement: `$1` agent, `$2` limit, `$3` owner, `$4` lease in seconds, `$5`
/// the allowed set into `running`.
fn claim_sql() -> String {
    claim_sql_started("now()")
}

/// The claim statement with `started` as the tasks' `started_at` (the rated claim dates
/// its starts with the instant its rate row allowed them).
fn claim_sql_started(started: &str) -> String {
    format!(
        "WITH c AS ( \
           SELECT t.id AS claim_id FROM taskwarden.tasks t \
           WHERE t.status = 'queued' AND t.agent = $1 AND t.run_after <= now() \
             AND NOT EXISTS (SELECT 1 FROM taskwarden.paused_agents p WHERE p.agent = $1) \
             AND (cardinality(t.depends_on) = 0 OR NOT EXISTS ( \
               SELECT 1 FROM taskwarden.tasks d WHERE d.objective_id = t.objective_id \
                 AND d.step_key = ANY(t.depends_on) AND d.status <> 'succeeded')) \
           ORDER BY t.priority DESC, t.run_after, t.id \
           LIMIT $2 FOR UPDATE SKIP LOCKED) \
         UPDATE taskwarden.tasks SET status = 'running', attempts = attempts + 1, started_at = {started}, \
           updated_at = now(), lease_owner = $3, \
           lease_expires_at = now() + make_interval(secs => $4) \
         FROM c WHERE tasks.id = c.claim_id AND tasks.status = ANY($5) \
         RETURNING {TASK_COLUMNS}"
    )
}

/// One attempt's outcome for [`Store::write_outcomes`].
#[derive(Debug, Clone)]
pub struct OutcomeRow {
    pub id: i64,
    pub to: TaskStatus,
    /// For → succeeded: the agent's reply.
    pub result: Option<serde_json::Value>,
    /// Kept on the row (the attempt's error); `None` keeps the one there.
    pub error: Option<String>,
    /// For → queued: when it may run again.
    pub run_after: Option<DateTime<Utc>>,
    /// For → queued: the attempt is not counted (a snooze).
    pub give_back_attempt: bool,
    /// An event stored with the outcome (kind, data): `attempt_failed`, `snoozed`.
    pub event: Option<(&'static str, serde_json::Value)>,
}

impl OutcomeRow {
    pub fn succeeded(id: i64, result: Option<serde_json::Value>) -> OutcomeRow {
        OutcomeRow {
            id,
            to: TaskStatus::Succeeded,
            result,
            error: None,
            run_after: None,
            give_back_attempt: false,
            event: None,
        }
    }
}

/// What a rate-limited claim got.
#[derive(Debug)]
pub struct Claimed {
    pub tasks: Vec<Task>,
    /// The rate's schedule allowed less than was asked for.
    pub throttled: bool,
    /// When throttled: how long until the schedule allows the next start.
    pub next_start_in: Option<Duration>,
}

impl Store {
    /// Claims up to `limit` runnable tasks of `agent` for `owner` (priority, then age;
    /// `run_after` due; dependencies succeeded), skipping rows other claimers hold. Claims
    /// nothing while the agent is paused (a row in `paused_agents`; one index probe, done
    /// once per statement): a pause stops every instance's claims from the next statement.
    pub async fn claim(
        &self,
        agent: &str,
        limit: i64,
        owner: &str,
        lease: Duration,
    ) -> Result<Vec<Task>, StoreError> {
        let allowed = TaskStatus::allowed_from(TaskStatus::Running);
        let s = self.session("store.claim").await?;
        let rows = s
            .query(
                &claim_sql(),
                &[&agent, &limit, &owner, &lease.as_secs_f64(), &allowed],
            )
            .await?;
        rows.iter().map(Task::from_row).collect()
    }

    /// [`Store::claim`] under a cluster-wide rate limit (`rate`, if any, with `burst`):
    /// in one transaction the agent's `rate_limits` row is upserted and locked, the
    /// database's clock is read under that lock, at most what the GCRA schedule allows at
    /// that instant is claimed (the tasks' `started_at` is that instant), and the row
    /// moves on by what was claimed (see `rate_limit`). Every instance's claims of the
    /// agent queue on that row, so together they start at most N + burst − 1 in any
    /// window of the period. `throttled` says the schedule allowed less than `limit`;
    /// `next_start_in`, when the next start conforms.
    pub async fn claim_rated(
        &self,
        agent: &str,
        limit: i64,
        owner: &str,
        lease: Duration,
        rate: Option<crate::config::Rate>,
        burst: u32,
    ) -> Result<Claimed, StoreError> {
        let Some(rate) = rate else {
            let tasks = self.claim(agent, limit, owner, lease).await?;
            return Ok(Claimed {
                tasks,
                throttled: false,
                next_start_in: None,
            });
        };
        let gcra = Gcra::new(rate, burst);
        let allowed = TaskStatus::allowed_from(TaskStatus::Running);
        let mut s = self.session("store.claim_rated").await?;
        let tx = s.transaction().await?;
        let (interval, tolerance) = gcra.constants();
        // RETURNING runs once the row is locked: the clock read there is after every
        // earlier claim of this agent committed, so claims are ordered by that clock.
        let row = tx
            .query_one(
                "INSERT INTO taskwarden.rate_limits AS r (agent, tat, interval_us, tolerance_us) \
                 VALUES ($1, clock_timestamp(), $2, $3) \
                 ON CONFLICT (agent) DO UPDATE SET tat = r.tat \
                 RETURNING (extract(epoch FROM r.tat) * 1000000)::int8, \
                   (extract(epoch FROM clock_timestamp()) * 1000000)::int8, \
                   r.interval_us, r.tolerance_us",
                &[&agent, &interval, &tolerance],
            )
            .await?;
        let (mut tat, now): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        let kept_under: (i64, i64) = (row.try_get(2)?, row.try_get(3)?);
        let rebased = kept_under != (interval, tolerance);
        if rebased {
            tat = gcra.rebase(tat, now);
        }
        let allowance = gcra.allowance(tat, now);
        let take = limit.min(allowance.count);
        let tasks: Vec<Task> = if take > 0 {
            let rows = tx
                .query(
                    &claim_sql_started("to_timestamp(0) + $6::int8 * interval '1 microsecond'"),
                    &[&agent, &take, &owner, &lease.as_secs_f64(), &allowed, &now],
                )
                .await?;
            rows.iter().map(Task::from_row).collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        let taken = i64::try_from(tasks.len()).unwrap_or(i64::MAX);
        let tat = gcra.after(allowance, taken);
        if taken > 0 || rebased {
            tx.execute(
                "UPDATE taskwarden.rate_limits \
                 SET tat = to_timestamp(0) + $2::int8 * interval '1 microsecond', \
                   interval_us = $3, tolerance_us = $4 WHERE agent = $1",
                &[&agent, &tat, &interval, &tolerance],
            )
            .await?;
        }
        tx.commit().await?;
        // Throttled only when the schedule was what held the claim back (it took all
        // the schedule allowed, and that was less than asked): an agent with nothing to
        // claim is not throttled, and its claimer does not wake for it.
        let throttled = allowance.count < limit && taken == allowance.count;
        Ok(Claimed {
            tasks,
            throttled,
            next_start_in: throttled.then(|| gcra.wait(tat, now)),
        })
    }

    /// Hands claimed tasks that never started back to the queue (prefetched tasks at
    /// shutdown or on pause): the claim's attempt is given back too, since nothing ran.
    /// `started_at` stays, as everywhere: the claim counted as the first start, so a
    /// `queued`-scope unique key it let go is not taken again (docs/state_machine.md).
    pub async fn release(&self, ids: &[i64], owner: &str) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let allowed = TaskStatus::allowed_from(TaskStatus::Queued);
        let s = self.session("store.release").await?;
        let n = s
            .execute(
                &format!(
                    "WITH l AS (SELECT id FROM taskwarden.tasks WHERE id = ANY($1) AND lease_owner = $2 \
                       AND status = 'running' AND status = ANY($3) ORDER BY id FOR UPDATE) \
                     UPDATE taskwarden.tasks t SET status = 'queued', attempts = greatest(t.attempts - 1, 0), \
                       {END_LEASE}, updated_at = now() \
                     FROM l WHERE t.id = l.id"
                ),
                &[&ids, &owner, &allowed],
            )
            .await?;
        if n > 0 {
            s.execute("SELECT pg_notify($1, '')", &[&s.schema().channel()])
                .await?;
        }
        Ok(n)
    }

    /// Records that instance `id` is alive (inserting its row the first time).
    pub async fn touch_instance(&self, id: &str, hostname: &str) -> Result<(), StoreError> {
        let s = self.session("store.touch_instance").await?;
        s.execute(
            "INSERT INTO taskwarden.instances (id, hostname, pid, version) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
            &[
                &id,
                &hostname,
                &(std::process::id() as i32),
                &env!("CARGO_PKG_VERSION"),
            ],
        )
        .await?;
        Ok(())
    }

    /// Extends `owner`'s leases on `ids`; returns the ids still running under its lease as
    /// of the last commit. A row another transaction is writing (the outcome writer
    /// finishing it, an API cancel) is skipped, not waited for: the lease keeper never
    /// waits for a row lock, so it cannot deadlock with a completion batch however either
    /// orders its rows, and a row that is being finished needs no longer lease. Such a
    /// row still counts as ours until a commit says otherwise.
    pub async fn extend_leases(
        &self,
        ids: &[i64],
        owner: &str,
        lease: Duration,
    ) -> Result<HashSet<i64>, StoreError> {
        let s = self.session("store.extend_leases").await?;
        // The final SELECT reads the statement's snapshot, from before the UPDATE: every
        // row that was ours then, extended or skipped.
        let rows = s
            .query(
                "WITH l AS (SELECT id FROM taskwarden.tasks WHERE id = ANY($1) AND lease_owner = $2 \
                   AND status = 'running' FOR UPDATE SKIP LOCKED), \
                 u AS (UPDATE taskwarden.tasks t SET lease_expires_at = now() + make_interval(secs => $3) \
                   FROM l WHERE t.id = l.id RETURNING t.id) \
                 SELECT id FROM taskwarden.tasks WHERE id = ANY($1) AND lease_owner = $2 AND status = 'running'",
                &[&ids, &owner, &lease.as_secs_f64()],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Leader duty: tasks whose lease expired go back to the queue (or fail, with no
    /// attempts left), except `owner`'s own runs in `local` (an outcome still waiting to
    /// be written keeps its task, whatever the lease column says after an outage).
    /// Returns the ids, and notifies the claimers when there are any.
    pub async fn requeue_expired(
        &self,
        owner: &str,
        local: &[i64],
    ) -> Result<Vec<i64>, StoreError> {
        let to_queued = TaskStatus::allowed_from(TaskStatus::Queued);
        let to_failed = TaskStatus::allowed_from(TaskStatus::Failed);
        let s = self.session("store.requeue_expired").await?;
        let rows = s
            .query(
                &format!(
                    "WITH l AS (SELECT id FROM taskwarden.tasks WHERE status = 'running' \
                       AND status = ANY($3) AND status = ANY($4) AND lease_expires_at < now() \
                       AND NOT (lease_owner = $1 AND id = ANY($2)) \
                       ORDER BY id FOR UPDATE SKIP LOCKED) \
                     UPDATE taskwarden.tasks t SET \
                       status = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END, \
                       finished_at = CASE WHEN attempts >= max_attempts THEN now() END, \
                       error = 'lease expired (held by ' || COALESCE(lease_owner, '?') || ')', \
                       {END_LEASE}, run_after = now(), updated_at = now() \
                     FROM l WHERE t.id = l.id RETURNING t.id"
                ),
                &[&owner, &local, &to_queued, &to_failed],
            )
            .await?;
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        if !ids.is_empty() {
            s.execute("SELECT pg_notify($1, '')", &[&s.schema().channel()])
                .await?;
        }
        Ok(ids)
    }

    /// Leader duty: removes instances silent for `dead_after`; returns their ids.
    pub async fn reap_instances(&self, dead_after: Duration) -> Result<Vec<String>, StoreError> {
        let s = self.session("store.reap_instances").await?;
        let rows = s
            .query(
                "DELETE FROM taskwarden.instances WHERE heartbeat_at < now() - make_interval(secs => $1) \
                 RETURNING id",
                &[&dead_after.as_secs_f64()],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Writes a batch of successes held under `owner`'s lease, in one statement; returns
    /// the ids written (a task whose status or lease changed meanwhile is left alone).
    pub async fn complete_batch(
        &self,
        ids: &[i64],
        results: &[Option<serde_json::Value>],
        owner: &str,
    ) -> Result<HashSet<i64>, StoreError> {
        let rows: Vec<OutcomeRow> = ids
            .iter()
            .zip(results)
            .map(|(&id, result)| OutcomeRow::succeeded(id, result.clone()))
            .collect();
        self.write_outcomes(&rows, owner).await
    }

    /// Writes the outcomes of attempts that ran under `owner`'s lease — successes,
    /// retries, failures, time-outs, cancels, snoozes — and their events, in one
    /// statement; returns the ids written. A task whose status or lease changed meanwhile
    /// is left alone (its event is still stored: the attempt did end so). Every outcome
    /// here leaves `running`, which the state machine allows for each; a row asking for
    /// anything else is refused before the database is asked. No `FOR UPDATE` pass first:
    /// it cost a quarter of the statement, and the only other batch writer of our running
    /// rows, the lease keeper, never waits for a row lock ([`Store::extend_leases`]).
    pub async fn write_outcomes(
        &self,
        rows: &[OutcomeRow],
        owner: &str,
    ) -> Result<HashSet<i64>, StoreError> {
        if let Some(r) = rows
            .iter()
            .find(|r| !TaskStatus::Running.can_transition_to(r.to))
        {
            return Err(StoreError::IllegalTransition {
                id: r.id,
                from: TaskStatus::Running,
                to: r.to,
            });
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let to: Vec<&str> = rows.iter().map(|r| r.to.as_str()).collect();
        let results: Vec<Option<serde_json::Value>> =
            rows.iter().map(|r| r.result.clone()).collect();
        let errors: Vec<Option<&str>> = rows.iter().map(|r| r.error.as_deref()).collect();
        let run_after: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.run_after).collect();
        let give_back: Vec<bool> = rows.iter().map(|r| r.give_back_attempt).collect();
        let with_event: Vec<&OutcomeRow> = rows.iter().filter(|r| r.event.is_some()).collect();
        let ev_ids: Vec<i64> = with_event.iter().map(|r| r.id).collect();
        let ev_kinds: Vec<&str> = with_event
            .iter()
            .filter_map(|r| r.event.as_ref().map(|(k, _)| *k))
            .collect();
        let ev_data: Vec<&serde_json::Value> = with_event
            .iter()
            .filter_map(|r| r.event.as_ref().map(|(_, d)| d))
            .collect();
        let s = self.session("store.write_outcomes").await?;
        let written = s
            .query(
                &format!(
                    "WITH v AS (SELECT * FROM unnest($1::bigint[], $2::text[], $3::jsonb[], \
                       $4::text[], $5::timestamptz[], $6::bool[]) \
                       AS v(id, to_status, result, error, run_after, give_back)), \
                     u AS (UPDATE taskwarden.tasks t SET status = v.to_status, updated_at = now(), \
                       attempts = CASE WHEN v.give_back AND v.to_status = 'queued' \
                         THEN greatest(t.attempts - 1, 0) ELSE t.attempts END, \
                       finished_at = CASE WHEN v.to_status IN ('succeeded','failed','cancelled','timed_out') \
                         THEN now() END, \
                       {END_LEASE}, error = COALESCE(v.error, t.error), \
                       run_after = COALESCE(v.run_after, t.run_after), \
                       result = CASE WHEN v.to_status = 'succeeded' THEN v.result ELSE t.result END \
                     FROM v WHERE t.id = v.id AND t.status = 'running' AND t.lease_owner = $7 \
                     RETURNING t.id), \
                     e AS (INSERT INTO taskwarden.task_events (task_id, kind, data) \
                       SELECT ev.id, ev.kind, ev.data \
                       FROM unnest($8::bigint[], $9::text[], $10::jsonb[]) AS ev(id, kind, data) \
                       WHERE EXISTS (SELECT 1 FROM taskwarden.tasks x WHERE x.id = ev.id) \
                         AND (SELECT count(*) FROM taskwarden.task_events te WHERE te.task_id = ev.id) < $11) \
                     SELECT id FROM u"
                ),
                &[
                    &ids,
                    &to,
                    &results,
                    &errors,
                    &run_after,
                    &give_back,
                    &owner,
                    &ev_ids,
                    &ev_kinds,
                    &ev_data,
                    &MAX_EVENTS_PER_TASK,
                ],
            )
            .await?;
        Ok(written.iter().map(|r| r.get(0)).collect())
    }

    /// Cancels the running tasks of run slot `slot_id` older than `newest`, with
    /// `reason`; returns their ids.
    pub async fn cancel_slot_runs_before(
        &self,
        slot_id: &str,
        newest: i64,
        reason: &str,
    ) -> Result<Vec<i64>, StoreError> {
        let allowed = TaskStatus::allowed_from(TaskStatus::Cancelled);
        let s = self.session("store.cancel_slot_runs").await?;
        let rows = s
            .query(
                &format!(
                    "UPDATE taskwarden.tasks SET status = 'cancelled', finished_at = now(), \
                       updated_at = now(), {END_LEASE}, error = $3 \
                     WHERE session_id = $1 AND status = 'running' AND status = ANY($4) \
                       AND id < $2 RETURNING id"
                ),
                &[&slot_id, &newest, &reason, &allowed],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Wakes every instance's claimer (dependants may be runnable now).
    pub async fn notify_runnable(&self) -> Result<(), StoreError> {
        let s = self.session("store.notify").await?;
        s.execute("SELECT pg_notify($1, '')", &[&s.schema().channel()])
            .await?;
        Ok(())
    }
}
