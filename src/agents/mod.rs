//! Agents: what actually does a task's work. An [`Agent`] gets a [`TaskContext`] (the
//! payload, a cancellation token, and a sink for events and LLM usage) and returns the
//! task's result or an error.
//!
//! Two kinds come from config: [`command::CommandAgent`] (a local program) and
//! [`http::HttpAgent`] (an HTTP agent service). A program embedding taskwarden as a library
//! registers its own by implementing the trait. Agents never touch the database directly:
//! events and usage go through the context, whose sessions carry the task's id.

pub mod command;
pub mod http;
pub mod shim;
pub mod storable;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, AgentKind, Config};
use crate::metrics::{self, Metrics};
use crate::store::{Store, StoreError, TaskEvent, Usage};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Why an attempt failed. `retryable = false` fails the task without further attempts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    pub message: String,
    pub retryable: bool,
}

impl AgentError {
    pub fn retryable(message: impl Into<String>) -> Self {
        AgentError {
            message: message.into(),
            retryable: true,
        }
    }
    pub fn fatal(message: impl Into<String>) -> Self {
        AgentError {
            message: message.into(),
            retryable: false,
        }
    }
}

impl From<StoreError> for AgentError {
    fn from(e: StoreError) -> Self {
        AgentError::retryable(format!("recording task output failed: {e}"))
    }
}

/// What a successful attempt returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentOutput {
    pub result: Option<Value>,
    /// "Run me again in this long": the attempt ends as snoozed — the task goes back to the
    /// queue, due after this delay (at most [`MAX_SNOOZE`]; longer is cut to it), and the
    /// attempt is not counted. `result` is then ignored.
    pub snooze: Option<Duration>,
}

/// Longest snooze an agent may ask for (30 days).
pub const MAX_SNOOZE: Duration = Duration::from_secs(30 * 24 * 3600);

impl AgentOutput {
    /// A successful attempt with this result.
    pub fn result(result: Value) -> Self {
        AgentOutput {
            result: Some(result),
            snooze: None,
        }
    }

    /// Ends the attempt as snoozed: run the task again after `delay`, without using up an
    /// attempt (River's `JobSnooze`, Oban's `{:snooze, seconds}`).
    pub fn snooze(delay: Duration) -> Self {
        AgentOutput {
            result: None,
            snooze: Some(delay),
        }
    }
}

/// The delay of a `{"snooze": SECONDS}` line: a number of seconds in 0..=[`MAX_SNOOZE`]
/// (fractions allowed); anything else is refused with the reason.
pub fn snooze_seconds(v: &Value) -> Result<Duration, AgentError> {
    let max = MAX_SNOOZE.as_secs_f64();
    match v.as_f64() {
        Some(s) if (0.0..=max).contains(&s) => Ok(Duration::from_secs_f64(s)),
        _ => Err(AgentError::retryable(format!(
            "snooze must be a number of seconds in 0..={max}, got {v}"
        ))),
    }
}

/// A task's work. Implementations must be cancel-safe: the orchestrator drops the future
/// on cancellation or timeout, so resources must be released in `Drop`.
pub trait Agent: Send + Sync + 'static {
    fn run(&self, ctx: TaskContext) -> BoxFuture<Result<AgentOutput, AgentError>>;
}

/// A stored task event, as broadcast to live subscribers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LiveEvent {
    /// The run slot of the event's task (`session_id` when serialized).
    #[serde(rename = "session_id")]
    pub slot_id: Option<String>,
    #[serde(flatten)]
    pub event: TaskEvent,
}

/// Fan-out of stored events to live subscribers (SSE). Bounded: a subscriber that falls
/// more than [`EVENT_BUFFER`] behind loses the oldest and must resume from the database.
#[derive(Debug, Clone)]
pub struct EventHub {
    tx: broadcast::Sender<LiveEvent>,
}

pub const EVENT_BUFFER: usize = 1024;

impl Default for EventHub {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(EVENT_BUFFER);
        EventHub { tx }
    }
}

impl EventHub {
    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.tx.subscribe()
    }
    pub fn publish(&self, e: LiveEvent) {
        // No subscriber is not an error.
        let _ = self.tx.send(e);
    }
}

/// Most events an attempt keeps while the database cannot take them; beyond it the oldest
/// are dropped (logged and counted in the task's `events_dropped` event once written).
pub const MAX_PENDING_EVENTS: usize = 1000;

/// What an attempt produced but could not store yet because the database was unreachable
/// (restarting, link down): events in order and summed usage. The orchestrator writes it
/// before the attempt's outcome, keeping the lease meanwhile, so a database outage never
/// turns a finished program into a failed attempt that runs again.
#[derive(Debug, Default)]
pub struct PendingOutput {
    events: std::collections::VecDeque<(String, Value)>,
    usage: Option<Usage>,
    dropped: u64,
}

impl PendingOutput {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.usage.is_none() && self.dropped == 0
    }

    fn push_event(&mut self, kind: &str, data: Value) {
        if self.events.len() >= MAX_PENDING_EVENTS {
            self.events.pop_front();
            self.dropped += 1;
        }
        self.events.push_back((kind.to_string(), data));
    }

    fn add_usage(&mut self, u: Usage) {
        let sum = self.usage.get_or_insert_with(Usage::default);
        sum.prompt_tokens = sum.prompt_tokens.saturating_add(u.prompt_tokens);
        sum.completion_tokens = sum.completion_tokens.saturating_add(u.completion_tokens);
        sum.cost_usd = (sum.cost_usd + u.cost_usd).min(storable::MAX_COST_USD);
    }
}

/// Shared between an attempt's context and the orchestrator, which flushes it at the end.
pub type Pending = Arc<std::sync::Mutex<PendingOutput>>;

fn lock(p: &Pending) -> std::sync::MutexGuard<'_, PendingOutput> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// Everything an agent gets for one attempt.
pub struct TaskContext {
    pub task_id: i64,
    pub agent: String,
    pub payload: Value,
    pub attempt: i32,
    /// The run slot the task runs in, if any.
    pub slot_id: Option<String>,
    /// The `application_name` the agent's own database sessions should carry
    /// (`<schema>/task/<id>`; command agents get it as `PGAPPNAME`), by which the
    /// supervisor finds them in `pg_stat_activity`.
    pub application_name: String,
    /// Cancelled when the task is cancelled, replaced or timed out. Agents that do work
    /// between awaits should check it; the orchestrator also drops the future.
    pub cancel: CancellationToken,
    metrics: Metrics,
    out: OutputWriter,
    /// Told the root pid of a process tree the agent starts, so the supervisor can sample
    /// and limit it.
    process_tree: Option<ProcessTreeHook>,
}

/// Receives the root pid of an agent's process tree.
pub type ProcessTreeHook = Arc<dyn Fn(u32) + Send + Sync>;

/// Writes an attempt's events and usage, keeping them in [`PendingOutput`] while the
/// database is unreachable. Cheap to clone: the orchestrator keeps one to flush what is
/// left after the agent returned.
#[derive(Clone)]
pub struct OutputWriter {
    task_id: i64,
    slot_id: Option<String>,
    store: Store,
    hub: EventHub,
    truncated: Arc<AtomicBool>,
    pending: Pending,
    /// What [`storable`] lets through.
    limits: storable::Limits,
}

impl TaskContext {
    pub fn new(
        task: &crate::store::Task,
        cancel: CancellationToken,
        store: Store,
        hub: EventHub,
        metrics: Metrics,
    ) -> TaskContext {
        TaskContext {
            task_id: task.id,
            agent: task.agent.clone(),
            payload: task.payload.clone(),
            attempt: task.attempts,
            slot_id: task.slot_id.clone(),
            application_name: crate::db::Schema::default().task_application_name(task.id),
            cancel,
            metrics,
            out: OutputWriter {
                task_id: task.id,
                slot_id: task.slot_id.clone(),
                store,
                hub,
                truncated: Arc::new(AtomicBool::new(false)),
                pending: Arc::default(),
                limits: storable::Limits::default(),
            },
            process_tree: None,
        }
    }

    /// The bounds its output is held to (`[workers]` max_result_bytes, max_event_bytes).
    pub fn with_limits(mut self, limits: storable::Limits) -> TaskContext {
        self.out.limits = limits;
        self
    }

    /// The schema of the deployment the task belongs to (names its agent sessions).
    pub fn in_schema(mut self, schema: &crate::db::Schema) -> TaskContext {
        self.application_name = schema.task_application_name(self.task_id);
        self
    }

    /// Where the agent reports the root of a process tree it starts.
    pub fn on_process_tree(mut self, hook: ProcessTreeHook) -> TaskContext {
        self.process_tree = Some(hook);
        self
    }

    /// Reports the root pid of the process tree this attempt started (a command agent's
    /// shim); its processes, memory and CPU are then sampled and limited.
    pub fn track_process_tree(&self, pid: u32) {
        if let Some(hook) = &self.process_tree {
            hook(pid);
        }
    }

    /// A handle on this attempt's output writer, for flushing after the agent returned.
    pub fn output(&self) -> OutputWriter {
        self.out.clone()
    }

    /// Stores and broadcasts one event of this task. With the database unreachable the
    /// event is kept (see [`PendingOutput`]) and the agent goes on.
    pub async fn event(&self, kind: &str, data: Value) -> Result<(), AgentError> {
        self.out.event(kind, data).await
    }
}

impl OutputWriter {
    /// Whether nothing waits to be written.
    pub fn is_flushed(&self) -> bool {
        lock(&self.pending).is_empty()
    }

    async fn event(&self, kind: &str, data: Value) -> Result<(), AgentError> {
        // Every event of every agent kind passes here: made storable before it is written
        // or kept, so no byte of it can be refused by the database.
        let (kind, data) = storable::event(kind, data, &self.limits);
        let kind = kind.as_str();
        // Order is kept: nothing new is written while older events wait.
        // Read under the lock, then release it: flush takes it again.
        let waiting = !lock(&self.pending).is_empty();
        if waiting && self.flush().await.is_err() {
            lock(&self.pending).push_event(kind, data);
            return Ok(());
        }
        match self.store.add_event(self.task_id, kind, &data).await {
            Ok(stored) => self.published(stored),
            Err(e) if e.is_transient() => {
                tracing::warn!(task_id = self.task_id, error = %e, "task event kept until the database is back");
                lock(&self.pending).push_event(kind, data);
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    fn published(&self, stored: Option<crate::store::TaskEvent>) {
        match stored {
            Some(event) => self.hub.publish(LiveEvent {
                slot_id: self.slot_id.clone(),
                event,
            }),
            None => {
                if !self.truncated.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        task_id = self.task_id,
                        limit = crate::store::MAX_EVENTS_PER_TASK,
                        "task event limit reached; further events are dropped"
                    );
                }
            }
        }
    }

    /// Writes what was kept during an outage, oldest first; on failure what is left stays
    /// kept. The orchestrator calls it (retrying) before it records the outcome.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let mut taken = std::mem::take(&mut *lock(&self.pending));
        let r = async {
            if taken.dropped > 0 {
                let n = taken.dropped;
                let stored = self
                    .store
                    .add_event(self.task_id, "events_dropped", &serde_json::json!({ "dropped": n, "reason": "database unreachable; oldest kept events dropped" }))
                    .await?;
                self.published(stored);
                taken.dropped = 0;
            }
            if let Some(u) = taken.usage {
                self.store.record_usage(self.task_id, u).await?;
                taken.usage = None;
            }
            while let Some((kind, data)) = taken.events.front() {
                let stored = self.store.add_event(self.task_id, kind, data).await?;
                self.published(stored);
                taken.events.pop_front();
            }
            Ok(())
        }
        .await;
        if r.is_err() {
            // Put back what is left, before anything kept meanwhile.
            let mut p = lock(&self.pending);
            let newer = std::mem::take(&mut *p);
            *p = taken;
            p.dropped += newer.dropped;
            if let Some(u) = newer.usage {
                p.add_usage(u);
            }
            for (k, d) in newer.events {
                p.push_event(&k, d);
            }
        }
        r
    }

    async fn usage(&self, u: Usage) -> Result<(), AgentError> {
        match self.store.record_usage(self.task_id, u).await {
            Ok(_) => Ok(()),
            Err(StoreError::Invalid { field, message }) => {
                Err(AgentError::fatal(format!("{field}: {message}")))
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(task_id = self.task_id, error = %e, "task usage kept until the database is back");
                lock(&self.pending).add_usage(u);
                Ok(())
            }
            Err(e) => Err(AgentError::from(e)),
        }
    }
}

impl TaskContext {
    /// Adds reported LLM usage to the task and the metrics. With the database unreachable
    /// it is kept and written before the outcome.
    pub async fn usage(&self, u: Usage) -> Result<(), AgentError> {
        let (u, clamped) = storable::usage(u);
        if clamped {
            tracing::warn!(task_id = self.task_id, agent = %self.agent, "usage report beyond what the task's columns hold; clamped");
        }
        self.out.usage(u).await?;
        let a = self.agent.as_str();
        self.metrics
            .counter(
                metrics::LLM_TOKENS_TOTAL,
                &[("agent", a), ("kind", "prompt")],
            )
            .increment(u.prompt_tokens.max(0) as u64);
        self.metrics
            .counter(
                metrics::LLM_TOKENS_TOTAL,
                &[("agent", a), ("kind", "completion")],
            )
            .increment(u.completion_tokens.max(0) as u64);
        // Dollars are fractional: a float counter the registry renders itself.
        self.metrics
            .add_float(metrics::LLM_COST_USD_TOTAL, &[("agent", a)], u.cost_usd);
        Ok(())
    }

    /// Handles one JSON value an agent emitted: `{"usage": {...}}` is usage, any other
    /// object is an event. Returns the object's `result` field, if any.
    pub async fn emit_json(&self, v: Value) -> Result<Option<Value>, AgentError> {
        let Value::Object(mut obj) = v else {
            return Ok(None);
        };
        if let Some(u) = obj.remove("usage") {
            let usage: Usage = serde_json::from_value(u)
                .map_err(|e| AgentError::fatal(format!("malformed usage object: {e}")))?;
            self.usage(usage).await?;
            if obj.is_empty() {
                return Ok(None);
            }
        }
        let result = obj.get("result").cloned();
        self.event("output", Value::Object(obj)).await?;
        Ok(result)
    }
}

/// A configured agent with its limits.
#[derive(Clone)]
pub struct AgentEntry {
    pub agent: Arc<dyn Agent>,
    pub concurrency: usize,
    pub timeout: Duration,
    pub planner: bool,
}

/// The agents this daemon can run, by name.
#[derive(Clone, Default)]
pub struct Agents {
    map: BTreeMap<String, AgentEntry>,
}

impl Agents {
    /// Builds the configured agents, plus `extra` ones supplied by an embedding program
    /// (an extra agent wins over a configured one of the same name).
    pub fn from_config(cfg: &Config, extra: &BTreeMap<String, AgentEntry>) -> Agents {
        let mut map = BTreeMap::new();
        for (name, a) in &cfg.agents {
            if let Some(agent) = build(name, a) {
                map.insert(
                    name.clone(),
                    AgentEntry {
                        agent,
                        concurrency: a.concurrency as usize,
                        timeout: a.timeout.get(),
                        planner: a.planner,
                    },
                );
            }
        }
        for (name, e) in extra {
            map.insert(name.clone(), e.clone());
        }
        Agents { map }
    }

    pub fn get(&self, name: &str) -> Option<&AgentEntry> {
        self.map.get(name)
    }

    pub fn names(&self) -> BTreeSet<String> {
        self.map.keys().cloned().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &AgentEntry)> {
        self.map.iter()
    }
}

fn build(name: &str, a: &AgentConfig) -> Option<Arc<dyn Agent>> {
    match a.kind? {
        AgentKind::Command => Some(Arc::new(command::CommandAgent::new(a.command.clone()))),
        AgentKind::Http => match http::HttpAgent::new(&a.url, a.timeout.get()) {
            Ok(h) => Some(Arc::new(h)),
            Err(e) => {
                tracing::error!(agent = name, error = %e, "cannot build http agent");
                None
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snooze_seconds_are_bounded() {
        let secs = |v: Value| snooze_seconds(&v).map(|d| d.as_secs_f64());
        assert_eq!(secs(serde_json::json!(5)), Ok(5.0));
        assert_eq!(secs(serde_json::json!(0.5)), Ok(0.5));
        assert_eq!(secs(serde_json::json!(0)), Ok(0.0));
        assert_eq!(secs(serde_json::json!(2_592_000)), Ok(2_592_000.0));
        for bad in [
            serde_json::json!(2_592_001),
            serde_json::json!(-1),
            serde_json::json!("5"),
            serde_json::json!(null),
            serde_json::json!({"s": 5}),
        ] {
            let e = snooze_seconds(&bad).unwrap_err();
            assert!(e.message.contains("snooze must be"), "{e}");
        }
    }
}
