//! Queueing tasks: one, or a bulk of them in one statement, with optional unique keys.
//!
//! A task with a `unique_key` goes through the SQL function `taskwarden.enqueue_detailed`
//! (migrations V4 and V8), the same one applications call from their own transactions, so the key
//! rules are written once: `INSERT ... ON CONFLICT DO NOTHING` against the partial unique
//! index `tasks_unique_key_idx`, then the holder is read; when the holder stopped holding
//! in between, the insert is tried again. Race-free across instances: the index, not a
//! check-then-insert, decides. Tasks without a key take a plain `INSERT`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::Store;
use super::StoreError;
use super::invalid;
use super::task::MAX_NAME_LEN;
use super::task::NewTask;
use super::task::TASK_COLUMNS;
use super::task::Task;
use super::task::UniqueScope;
use crate::db::Session;
use chrono::DateTime;
use chrono::Utc;
use std::time::Duration;

pub use crate::config::MAX_BULK_ITEMS;

/// Shortest period of `unique_scope = "period"`.
const MIN_UNIQUE_FOR: Duration = Duration::from_secs(1);

/// A submit's answer: the task, and whether it already existed (its unique key was held).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Enqueued {
    #[serde(flatten)]
    pub task: Task,
    pub duplicate: bool,
}

impl NewTask {
    /// The unique-key fields: a key of 1..=200 characters; a scope or period only with a
    /// key; a period exactly with the `period` scope, 1 s to 365 days.
    pub(super) fn validate_unique(&self, prefix: &str) -> Result<(), StoreError> {
        let f = |k: &str| format!("{prefix}{k}");
        let Some(key) = &self.unique_key else {
            if self.unique_scope.is_some() {
                return Err(invalid(f("unique_scope"), "needs a unique_key"));
            }
            if self.unique_for.is_some() {
                return Err(invalid(f("unique_for"), "needs a unique_key"));
            }
            return Ok(());
        };
        if key.is_empty() || key.len() > MAX_NAME_LEN {
            return Err(invalid(
                f("unique_key"),
                format!("must be 1..={MAX_NAME_LEN} characters"),
            ));
        }
        match (self.scope(), self.unique_for) {
            (Some(UniqueScope::Period), None) => Err(invalid(
                f("unique_for"),
                "the period scope needs unique_for (e.g. \"1h\")",
            )),
            (Some(s), Some(_)) if s != UniqueScope::Period => Err(invalid(
                f("unique_for"),
                format!("applies to unique_scope \"period\", not {:?}", s.as_str()),
            )),
            (_, Some(d)) if d.get() < MIN_UNIQUE_FOR => {
                Err(invalid(f("unique_for"), "must be at least 1s"))
            }
            _ => Ok(()),
        }
    }

    /// The scope in force: the one given, else `period` with `unique_for`, else `active`;
    /// none without a key.
    fn scope(&self) -> Option<UniqueScope> {
        self.unique_key.as_ref()?;
        Some(match (self.unique_scope, self.unique_for) {
            (Some(s), _) => s,
            (None, Some(_)) => UniqueScope::Period,
            (None, None) => UniqueScope::Active,
        })
    }

    /// Refuses a unique key where it has no meaning (`what`: e.g. an objective's step).
    pub(super) fn no_unique_key(&self, prefix: &str, what: &str) -> Result<(), StoreError> {
        if self.unique_key.is_some() || self.unique_scope.is_some() || self.unique_for.is_some() {
            return Err(invalid(
                format!("{prefix}unique_key"),
                format!("unique keys are not supported for {what}"),
            ));
        }
        Ok(())
    }
}

impl Store {
    /// Queues one task, or — when its unique key is held — returns the holder with
    /// `duplicate = true`.
    pub async fn enqueue(&self, t: &NewTask) -> Result<Enqueued, StoreError> {
        t.validate("")?;
        if t.unique_key.is_some() {
            let mut v = self.write_bulk(std::slice::from_ref(t)).await?;
            return v
                .pop()
                .ok_or_else(|| StoreError::Corrupt("enqueue returned no row".into()));
        }
        let s = self.session("store.create_task").await?;
        let row = s
            .query_one(
                &format!(
                    "INSERT INTO taskwarden.tasks (agent, payload, session_id, priority, max_attempts, run_after) \
                     VALUES ($1, $2, $3, $4, $5, COALESCE($6, now())) RETURNING {TASK_COLUMNS}"
                ),
                &[
                    &t.agent,
                    &t.payload,
                    &t.slot_id,
                    &t.priority,
                    &t.max_attempts.unwrap_or(self.default_max_attempts),
                    &t.run_after,
                ],
            )
            .await?;
        let task = Task::from_row(&row)?;
        tracing::debug!(task_id = task.id, agent = %task.agent, "task created");
        Ok(Enqueued {
            task,
            duplicate: false,
        })
    }

    /// Queues `items` in one statement — all or none — answering in their order. Each item
    /// is validated first; a bad one is named by its index (`items[3].agent`). Items with
    /// a unique key held by a task (or by an earlier item of the same bulk) answer that
    /// task with `duplicate = true`.
    pub async fn enqueue_many(&self, items: &[NewTask]) -> Result<Vec<Enqueued>, StoreError> {
        if items.is_empty() {
            return Err(invalid("items", "give at least one task"));
        }
        if items.len() > MAX_BULK_ITEMS {
            return Err(invalid(
                "items",
                format!("at most {MAX_BULK_ITEMS} tasks in one submit"),
            ));
        }
        for (i, t) in items.iter().enumerate() {
            t.validate(&format!("items[{i}]."))?;
        }
        self.write_bulk(items).await
    }

    /// Writes validated items in one statement.
    async fn write_bulk(&self, items: &[NewTask]) -> Result<Vec<Enqueued>, StoreError> {
        let cols = Columns::of(items, self.default_max_attempts);
        let s = self.session("store.enqueue_many").await?;
        if items.iter().all(|t| t.unique_key.is_none()) {
            insert_plain(&s, &cols, items.len()).await
        } else {
            insert_keyed(&s, &cols, items).await
        }
    }

    /// Records this instance's `workers.max_attempts` as the default of enqueues from SQL
    /// that give none (one row; the instance started last wins).
    pub async fn record_enqueue_defaults(&self, set_by: &str) -> Result<(), StoreError> {
        let s = self.session("store.enqueue_defaults").await?;
        s.execute(
            "INSERT INTO taskwarden.enqueue_defaults (name, max_attempts, set_by) VALUES ('default', $1, $2) \
             ON CONFLICT (name) DO UPDATE SET max_attempts = EXCLUDED.max_attempts, \
               set_by = EXCLUDED.set_by, updated_at = now()",
            &[&self.default_max_attempts, &set_by],
        )
        .await?;
        Ok(())
    }
}

/// The items' fields as column arrays, for `unnest`.
struct Columns<'a> {
    agents: Vec<&'a str>,
    payloads: Vec<&'a serde_json::Value>,
    sessions: Vec<Option<&'a str>>,
    priorities: Vec<i32>,
    max_attempts: Vec<i32>,
    run_after: Vec<Option<DateTime<Utc>>>,
}

impl<'a> Columns<'a> {
    fn of(items: &'a [NewTask], default_max_attempts: i32) -> Self {
        Columns {
            agents: items.iter().map(|t| t.agent.as_str()).collect(),
            payloads: items.iter().map(|t| &t.payload).collect(),
            sessions: items.iter().map(|t| t.slot_id.as_deref()).collect(),
            priorities: items.iter().map(|t| t.priority).collect(),
            max_attempts: items
                .iter()
                .map(|t| t.max_attempts.unwrap_or(default_max_attempts))
                .collect(),
            run_after: items.iter().map(|t| t.run_after).collect(),
        }
    }
}

/// No unique keys: one plain INSERT. Ids come from the sequence in the SELECT's order, so
/// sorting by id gives the items' order back.
async fn insert_plain(s: &Session, c: &Columns<'_>, n: usize) -> Result<Vec<Enqueued>, StoreError> {
    let rows = s
        .query(
            &format!(
                "INSERT INTO taskwarden.tasks (agent, payload, session_id, priority, max_attempts, run_after) \
                 SELECT agent, payload, session_id, priority, max_attempts, COALESCE(run_after, now()) \
                 FROM unnest($1::text[], $2::jsonb[], $3::text[], $4::int4[], $5::int4[], \
                             $6::timestamptz[]) WITH ORDINALITY \
                      AS i(agent, payload, session_id, priority, max_attempts, run_after, n) \
                 ORDER BY n RETURNING {TASK_COLUMNS}"
            ),
            &[
                &c.agents,
                &c.payloads,
                &c.sessions,
                &c.priorities,
                &c.max_attempts,
                &c.run_after,
            ],
        )
        .await?;
    let mut tasks = rows
        .iter()
        .map(Task::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    if tasks.len() != n {
        return Err(StoreError::Corrupt(format!(
            "bulk insert wrote {} rows for {n} items",
            tasks.len()
        )));
    }
    tasks.sort_by_key(|t| t.id);
    tracing::debug!(count = tasks.len(), "tasks created in bulk");
    Ok(tasks
        .into_iter()
        .map(|task| Enqueued {
            task,
            duplicate: false,
        })
        .collect())
}

/// With unique keys: one statement in which the SQL function runs per item in the items'
/// order, each call seeing the rows of the calls before it, so a key repeated within the
/// bulk is a duplicate of its first item; then the tasks it answered, read afresh.
async fn insert_keyed(
    s: &Session,
    c: &Columns<'_>,
    items: &[NewTask],
) -> Result<Vec<Enqueued>, StoreError> {
    let keys: Vec<Option<&str>> = items.iter().map(|t| t.unique_key.as_deref()).collect();
    let scopes: Vec<Option<&str>> = items
        .iter()
        .map(|t| t.scope().map(|s| s.as_str()))
        .collect();
    let periods: Vec<Option<f64>> = items
        .iter()
        .map(|t| t.unique_for.map(|d| d.get().as_secs_f64()))
        .collect();
    let rows = s
        .query(
            "SELECT e.task_id, e.duplicate \
             FROM unnest($1::text[], $2::jsonb[], $3::text[], $4::int4[], $5::int4[], \
                         $6::timestamptz[], $7::text[], $8::text[], $9::float8[]) WITH ORDINALITY \
                  AS i(agent, payload, session_id, priority, max_attempts, run_after, \
                       unique_key, unique_scope, unique_for, n) \
             CROSS JOIN LATERAL taskwarden.enqueue_detailed( \
                 i.agent, i.payload, i.priority, i.max_attempts, COALESCE(i.run_after, now()), \
                 i.unique_key, i.unique_scope, make_interval(secs => i.unique_for), i.session_id) e \
             ORDER BY i.n",
            &[
                &c.agents,
                &c.payloads,
                &c.sessions,
                &c.priorities,
                &c.max_attempts,
                &c.run_after,
                &keys,
                &scopes,
                &periods,
            ],
        )
        .await?;
    let mut answers = Vec::with_capacity(rows.len());
    for r in &rows {
        answers.push((r.try_get::<_, i64>(0)?, r.try_get::<_, bool>(1)?));
    }
    if answers.len() != items.len() {
        return Err(StoreError::Corrupt(format!(
            "enqueue answered {} rows for {} items",
            answers.len(),
            items.len()
        )));
    }
    let ids: Vec<i64> = answers.iter().map(|(id, _)| *id).collect();
    // A fresh statement sees the rows the function wrote and the holders it found.
    let rows = s
        .query(
            &format!("SELECT {TASK_COLUMNS} FROM taskwarden.tasks WHERE id = ANY($1)"),
            &[&ids],
        )
        .await?;
    let mut by_id = HashMap::with_capacity(rows.len());
    for r in &rows {
        let t = Task::from_row(r)?;
        by_id.insert(t.id, t);
    }
    let duplicates = answers.iter().filter(|(_, d)| *d).count();
    tracing::debug!(
        count = answers.len(),
        duplicates,
        "tasks enqueued with unique keys"
    );
    answers
        .into_iter()
        .map(|(id, duplicate)| {
            by_id
                .get(&id)
                .cloned()
                .map(|task| Enqueued { task, duplicate })
                .ok_or(StoreError::TaskNotFound(id))
        })
        .collect()
}
