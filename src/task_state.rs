//! The task state machine: the statuses and which transitions are legal. Every status
//! write in the store names `allowed_from(to)` in its WHERE (see docs/state_machine.md).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 6] = [
        TaskStatus::Queued,
        TaskStatus::Running,
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
        TaskStatus::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Running => "running",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
            TaskStatus::TimedOut => "timed_out",
        }
    }

    /// The final statuses, written once here: a task in one of them is done.
    pub const FINAL: [TaskStatus; 4] = [
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
        TaskStatus::TimedOut,
    ];

    pub fn is_terminal(self) -> bool {
        TaskStatus::FINAL.contains(&self)
    }

    /// The state machine: queued → running → succeeded | failed | cancelled | timed_out;
    /// running → queued (retry, lease expiry, shutdown); queued → cancelled. Final statuses
    /// are left only by an explicit retry ([`TaskStatus::can_retry`]), never here.
    pub fn can_transition_to(self, to: TaskStatus) -> bool {
        use TaskStatus::*;
        matches!(
            (self, to),
            (Queued, Running)
                | (Queued, Cancelled)
                | (Running, Succeeded)
                | (Running, Failed)
                | (Running, Cancelled)
                | (Running, TimedOut)
                | (Running, Queued)
        )
    }

    /// The one edge out of a final status: an explicit retry (`Store::retry_task` / `Store::retry_tasks`, from the API
    /// or the CLI) may put a failed, cancelled or timed-out task back in the queue. No other
    /// writer may: [`TaskStatus::can_transition_to`] keeps final statuses final, so
    /// `Store::transition` and every loop still refuse `failed -> queued`.
    pub fn can_retry(self) -> bool {
        matches!(
            self,
            TaskStatus::Failed | TaskStatus::Cancelled | TaskStatus::TimedOut
        )
    }

    /// The statuses a retry moves to `queued` from (the allowed set of `Store::retry_task` / `Store::retry_tasks`).
    pub fn retry_allowed_from() -> Vec<&'static str> {
        TaskStatus::ALL
            .iter()
            .filter(|from| from.can_retry())
            .map(|s| s.as_str())
            .collect()
    }

    /// Every status from which `to` may be reached.
    pub fn allowed_from(to: TaskStatus) -> Vec<&'static str> {
        TaskStatus::ALL
            .iter()
            .filter(|from| from.can_transition_to(to))
            .map(|s| s.as_str())
            .collect()
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskStatus::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown task status {s:?}"))
    }
}
