//! A program that embeds taskwarden with an agent written in Rust: it starts the embedded
//! PostgreSQL in a temporary directory, applies the migrations, wires taskwarden the same
//! way `taskwarden run` does (`daemon::Parts::start`) with one extra agent, submits a task,
//! waits for its result and stops in order.
//!
//! Run it with `cargo run --example embed_agent` (PostgreSQL server binaries must be
//! installed; see README).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use taskwarden::agents::{Agent, AgentEntry, AgentError, AgentOutput, BoxFuture, TaskContext};
use taskwarden::config::Config;
use taskwarden::daemon::{Database, Parts};
use taskwarden::store::{NewTask, TaskStatus};

/// Upper-cases the payload's `text`, reporting one progress event on the way.
struct Shout;

impl Agent for Shout {
    fn run(&self, ctx: TaskContext) -> BoxFuture<Result<AgentOutput, AgentError>> {
        Box::pin(async move {
            let text = ctx.payload["text"]
                .as_str()
                .ok_or_else(|| AgentError::fatal("payload.text: a string is required"))?
                .to_uppercase();
            ctx.event("progress", serde_json::json!({ "chars": text.len() }))
                .await?;
            Ok(AgentOutput::result(serde_json::json!({ "text": text })))
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = Config::default();
    config.database.data_dir = dir.path().join("data").display().to_string();
    let database = Database::open(&config).await?;
    taskwarden::db::migrate::run(&database.pg, &config.database).await?;

    let mut agents = BTreeMap::new();
    agents.insert(
        "shout".to_string(),
        AgentEntry {
            agent: Arc::new(Shout),
            concurrency: 4,
            timeout: Duration::from_secs(30),
            planner: false,
        },
    );
    let parts = Parts::start(
        database.pg.clone(),
        Arc::new(ArcSwap::from_pointee(config)),
        agents,
    )
    .await?;

    let task = parts
        .orchestrator
        .submit(&NewTask::new(
            "shout",
            serde_json::json!({ "text": "hello from an embedded agent" }),
        ))
        .await?;
    let done = loop {
        let t = parts.store.get_task(task.id).await?;
        if t.status.is_terminal() {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "task {} {}: {}",
        done.id,
        done.status,
        done.result.unwrap_or_default()
    );
    let ok = done.status == TaskStatus::Succeeded;

    parts.stop().await?;
    database.close().await;
    anyhow::ensure!(ok, "the task did not succeed");
    Ok(())
}
