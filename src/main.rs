//! The `taskwarden` binary: parses the command line and hands over to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use taskwarden::config::{Config, ConfigError};

#[derive(Parser)]
#[command(
    name = "taskwarden",
    version,
    about = "Runs agent tasks on PostgreSQL and watches its own DB sessions, pool and tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Config file; without it ./config.toml is used if present, else the built-in defaults.
    #[arg(long, short = 'c', env = "TASKWARDEN_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground.
    Run(ConfigArg),
    /// Parse and validate the config; report every problem by key.
    CheckConfig(ConfigArg),
    /// Apply schema migrations and exit.
    Migrate(ConfigArg),
    /// Show pool, sessions, tasks, alerts and instances of a running daemon.
    Status {
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Queue a task, or with --session run it now in that session's run slot.
    Submit {
        #[command(flatten)]
        conn: ClientArgs,
        #[arg(long)]
        agent: String,
        /// JSON payload given to the agent.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// Run in this session's slot, replacing its running task.
        #[arg(long)]
        session: Option<String>,
    },
    /// Pause an agent's queue on every instance: its queued tasks stay queued, running ones finish.
    Pause {
        #[command(flatten)]
        conn: ClientArgs,
        agent: String,
        /// Why (shown in the API's answer and kept with the pause).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resume a paused agent's queue.
    Resume {
        #[command(flatten)]
        conn: ClientArgs,
        agent: String,
    },
    /// Queue a failed, cancelled or timed-out task again: one by ID, or those matching --agent/--status.
    Retry {
        #[command(flatten)]
        conn: ClientArgs,
        /// The task; without it, --agent and/or --status select the tasks.
        #[arg(required_unless_present_any = ["agent", "status"], conflicts_with_all = ["agent", "status", "limit"])]
        id: Option<i64>,
        #[arg(long)]
        agent: Option<String>,
        /// failed, cancelled or timed_out (default: all three).
        #[arg(long)]
        status: Option<String>,
        /// Most tasks retried by a filter (1..=1000).
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Attempts granted: max_attempts becomes at least attempts + this (default 1).
        #[arg(long)]
        extra_attempts: Option<i32>,
    },
    /// Internal: run a command agent's program under the subreaper shim.
    #[command(name = "agent-shim", hide = true)]
    AgentShim {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        argv: Vec<String>,
    },
    /// Create an objective from a JSON file: {"title": ..., "steps": [{"key", "agent", "payload", "depends_on"}]}.
    Objective {
        #[command(flatten)]
        conn: ClientArgs,
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct ClientArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The daemon's base URL; default from http.listen in the config.
    #[arg(long, env = "TASKWARDEN_URL")]
    url: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long)]
    json: bool,
}

fn load(arg: &ConfigArg) -> Result<(PathBuf, Config), ConfigError> {
    match &arg.config {
        Some(p) => Ok((p.clone(), Config::load(p)?)),
        None => {
            let p = Path::new("config.toml");
            if p.exists() {
                Ok((p.to_path_buf(), Config::load(p)?))
            } else {
                Ok((p.to_path_buf(), Config::default()))
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig(arg) => match load(&arg) {
            Ok((path, _)) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Run(arg) => report(run(&arg)),
        Command::AgentShim { argv } => {
            let code = taskwarden::agents::shim::run(&argv);
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Command::Migrate(arg) => report(migrate(&arg)),
        Command::Status { conn } => client_report(client(&conn, |c| async move {
            let v = c.status().await?;
            Ok((v.clone(), taskwarden::client::render_status(&v)))
        })),
        Command::Submit {
            conn,
            agent,
            payload,
            session,
        } => client_report(client(&conn, |c| async move {
            let payload: serde_json::Value = serde_json::from_str(&payload).map_err(|e| {
                taskwarden::client::ClientError::Input(format!("--payload is not JSON: {e}"))
            })?;
            let v = c.submit(&agent, payload, session.as_deref()).await?;
            Ok((v.clone(), taskwarden::client::render_task(&v)))
        })),
        Command::Pause {
            conn,
            agent,
            reason,
        } => client_report(client(&conn, |c| async move {
            let v = c.pause(&agent, reason.as_deref()).await?;
            let text = format!("agent {agent} paused since {}", v["paused_at"]);
            Ok((v, text))
        })),
        Command::Resume { conn, agent } => client_report(client(&conn, |c| async move {
            let v = c.resume(&agent).await?;
            let text = if v["was_paused"] == serde_json::Value::Bool(true) {
                format!("agent {agent} resumed")
            } else {
                format!("agent {agent} was not paused")
            };
            Ok((v, text))
        })),
        Command::Retry {
            conn,
            id,
            agent,
            status,
            limit,
            extra_attempts,
        } => client_report(client(&conn, |c| async move {
            if let Some(id) = id {
                let v = c.retry(id, extra_attempts).await?;
                return Ok((v.clone(), taskwarden::client::render_task(&v)));
            }
            let filter = serde_json::json!({
                "agent": agent, "status": status, "limit": limit, "extra_attempts": extra_attempts,
            });
            let v = c.retry_matching(&filter).await?;
            let ids: Vec<String> = v["tasks"]
                .as_array()
                .map(|a| a.iter().map(|t| t["id"].to_string()).collect())
                .unwrap_or_default();
            let text = format!("{} task(s) queued again: {}", v["count"], ids.join(" "));
            Ok((v, text))
        })),
        Command::Objective { conn, file } => client_report(client(&conn, |c| async move {
            let text = std::fs::read_to_string(&file).map_err(|e| {
                taskwarden::client::ClientError::Input(format!("{}: {e}", file.display()))
            })?;
            let body: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                taskwarden::client::ClientError::Input(format!(
                    "{} is not JSON: {e}",
                    file.display()
                ))
            })?;
            let v = c.objective(&body).await?;
            Ok((v.clone(), taskwarden::client::render_objective(&v)))
        })),
    }
}

/// Runs a client call; prints JSON or the rendered text.
fn client<F, Fut>(args: &ClientArgs, call: F) -> anyhow::Result<()>
where
    F: FnOnce(taskwarden::client::Client) -> Fut,
    Fut: std::future::Future<
            Output = Result<(serde_json::Value, String), taskwarden::client::ClientError>,
        >,
{
    let (_, config) = load(&args.config)?;
    let c = taskwarden::client::Client::new(args.url.clone(), &config)?;
    let (json, text) = runtime()?.block_on(call(c))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{text}");
        if !text.ends_with('\n') {
            println!();
        }
    }
    Ok(())
}

fn client_report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("taskwarden: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = chain(&e);
            tracing::error!(error = %text, "taskwarden failed");
            eprintln!("taskwarden: {text}");
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, leaving out a cause whose text its parent already shows.
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let t = cause.to_string();
        if out.contains(&t) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&t);
    }
    out
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("taskwarden")
        .build()
        .context("cannot start the async runtime")
}

fn run(arg: &ConfigArg) -> anyhow::Result<()> {
    let (path, config) = load(arg)?;
    let log = taskwarden::logging::init(&config.logging)?;
    runtime()?.block_on(taskwarden::daemon::run(&path, config, log))?;
    Ok(())
}

fn migrate(arg: &ConfigArg) -> anyhow::Result<()> {
    let (_, config) = load(arg)?;
    taskwarden::logging::init(&config.logging)?;
    runtime()?.block_on(async {
        // A daemon running on the same data_dir keeps its cluster: migrate through it.
        let db = taskwarden::daemon::Database::open_shared(&config).await?;
        let r = taskwarden::db::migrate::run(&db.pg, &config.database).await;
        db.close().await;
        let r = r?;
        tracing::info!(
            applied = r.applied.len(),
            schema_version = r.latest,
            "migrations done"
        );
        Ok::<_, anyhow::Error>(())
    })
}
