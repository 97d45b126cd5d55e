//! A task as the store reads it (`Task`, the columns it is read from) and as a caller
//! submits it (`NewTask`, validated before any statement).

use super::StoreError;
use super::invalid;
use crate::task_state::TaskStatus;
use chrono::DateTime;
use chrono::Utc;
use serde::Deserialize;
use serde::Serialize;
use tokio_postgres::Row;

/// How long a task holds its unique key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum UniqueScope {
    /// Until it first starts running (a retry back in the queue does not take it again).
    Queued,
    /// While queued or running: any final status frees it.
    Active,
    /// For `unique_for` after it was created, whatever its status.
    Period,
}

impl UniqueScope {
    pub fn as_str(self) -> &'static str {
        match self {
            UniqueScope::Queued => "queued",
            UniqueScope::Active => "active",
            UniqueScope::Period => "period",
        }
    }
}

impl std::str::FromStr for UniqueScope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "queued" => Ok(UniqueScope::Queued),
            "active" => Ok(UniqueScope::Active),
            "period" => Ok(UniqueScope::Period),
            other => Err(format!("unknown unique scope {other:?}")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Task {
    pub id: i64,
    pub objective_id: Option<i64>,
    pub step_key: Option<String>,
    pub depends_on: Vec<String>,
    pub agent: String,
    pub payload: serde_json::Value,
    /// The run slot the task ran in; `session_id` on the wire and in the table.
    #[serde(rename = "session_id")]
    pub slot_id: Option<String>,
    pub status: TaskStatus,
    pub priority: i32,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_after: DateTime<Utc>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: f64,
    /// The agent's final reply, once it succeeded.
    pub result: Option<serde_json::Value>,
    /// The task's unique key, if it was submitted with one, and how long it holds it.
    #[serde(default)]
    pub unique_key: Option<String>,
    #[serde(default)]
    pub unique_scope: Option<UniqueScope>,
    /// For `unique_scope = "period"`: until when it holds its key (cleared once a later
    /// submit of the key found it passed).
    #[serde(default)]
    pub unique_until: Option<DateTime<Utc>>,
}

/// Columns read back for a [`Task`]; `cost_usd` leaves numeric as float8 for the client.
pub(crate) const TASK_COLUMNS: &str = "id, objective_id, step_key, depends_on, agent, payload, session_id, status, \
     priority, attempts, max_attempts, run_after, lease_owner, lease_expires_at, created_at, \
     updated_at, started_at, finished_at, error, prompt_tokens, completion_tokens, cost_usd::float8 AS cost_usd, result, \
     unique_key, unique_scope, unique_until";

impl Task {
    pub(crate) fn from_row(r: &Row) -> Result<Task, StoreError> {
        let status: String = r.try_get("status")?;
        Ok(Task {
            id: r.try_get("id")?,
            objective_id: r.try_get("objective_id")?,
            step_key: r.try_get("step_key")?,
            depends_on: r.try_get("depends_on")?,
            agent: r.try_get("agent")?,
            payload: r.try_get("payload")?,
            slot_id: r.try_get("session_id")?,
            status: status.parse().map_err(StoreError::Corrupt)?,
            priority: r.try_get("priority")?,
            attempts: r.try_get("attempts")?,
            max_attempts: r.try_get("max_attempts")?,
            run_after: r.try_get("run_after")?,
            lease_owner: r.try_get("lease_owner")?,
            lease_expires_at: r.try_get("lease_expires_at")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
            error: r.try_get("error")?,
            prompt_tokens: r.try_get("prompt_tokens")?,
            completion_tokens: r.try_get("completion_tokens")?,
            cost_usd: r.try_get("cost_usd")?,
            result: r.try_get("result")?,
            unique_key: r.try_get("unique_key")?,
            unique_scope: r
                .try_get::<_, Option<String>>("unique_scope")?
                .map(|s| s.parse())
                .transpose()
                .map_err(StoreError::Corrupt)?,
            unique_until: r.try_get("unique_until")?,
        })
    }
}

/// Longest accepted agent name, run slot id and step key.
pub const MAX_NAME_LEN: usize = 200;
/// Most steps one objective may have.
pub const MAX_STEPS: usize = 1000;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct NewTask {
    /// One of the daemon's configured agents (an unknown one is a 400 that lists them).
    #[schema(min_length = 1, max_length = 200)]
    pub agent: String,
    /// Given to the agent as it is.
    pub payload: serde_json::Value,
    /// Set by a run slot (`Orchestrator::run_in_slot`); `session_id` on the wire.
    #[serde(rename = "session_id")]
    #[schema(min_length = 1, max_length = 200)]
    pub slot_id: Option<String>,
    /// Higher runs first among the agent's due tasks.
    pub priority: i32,
    /// Defaults to `[workers] max_attempts` when absent.
    #[schema(minimum = 1, maximum = 1000)]
    pub max_attempts: Option<i32>,
    /// Earliest start (between the years 1970 and 9999); now when absent.
    pub run_after: Option<DateTime<Utc>>,
    /// A duplicate submit (same key, held by a task) returns the holder instead of a new
    /// task; see [`UniqueScope`] for how long a task holds its key.
    #[schema(min_length = 1, max_length = 200)]
    pub unique_key: Option<String>,
    /// Absent: `period` when `unique_for` is given, else `active`.
    pub unique_scope: Option<UniqueScope>,
    /// The period of `unique_scope = "period"` (1 s to 365 days), e.g. `"1h"`.
    #[schema(value_type = Option<String>)]
    pub unique_for: Option<crate::config::Dur>,
}

impl NewTask {
    pub fn new(agent: impl Into<String>, payload: serde_json::Value) -> Self {
        NewTask {
            agent: agent.into(),
            payload,
            ..Default::default()
        }
    }

    pub(super) fn validate(&self, prefix: &str) -> Result<(), StoreError> {
        let f = |k: &str| format!("{prefix}{k}");
        if self.agent.is_empty() || self.agent.len() > MAX_NAME_LEN {
            return Err(invalid(
                f("agent"),
                format!("must be 1..={MAX_NAME_LEN} characters"),
            ));
        }
        if let Some(s) = &self.slot_id
            && (s.is_empty() || s.len() > MAX_NAME_LEN)
        {
            return Err(invalid(
                f("session_id"),
                format!("must be 1..={MAX_NAME_LEN} characters"),
            ));
        }
        if let Some(m) = self.max_attempts
            && !(1..=1000).contains(&m)
        {
            return Err(invalid(f("max_attempts"), "must be in 1..=1000"));
        }
        if let Some(t) = self.run_after {
            use chrono::Datelike;
            if !(1970..=9999).contains(&t.year()) {
                return Err(invalid(
                    f("run_after"),
                    "must be a time between the years 1970 and 9999",
                ));
            }
        }
        self.validate_unique(prefix)
    }
}
