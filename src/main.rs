//! The `taskwarden` binary: parses the command line and hands over to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use taskwarden::client::ClientError;
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
    /// Reload a running daemon's config and wait for its verdict (the unit's ExecReload):
    /// SIGHUP, then exit 0 once the file is in force, or 1 with its problems when refused.
    Reload {
        #[command(flatten)]
        config: ConfigArg,
        /// The daemon's pid; systemd passes it as $MAINPID.
        #[arg(long, env = "MAINPID", value_parser = clap::value_parser!(i32).range(2..))]
        pid: i32,
        /// The daemon's base URL; default from http.listen in the config.
        #[arg(long, env = "TASKWARDEN_URL")]
        url: Option<String>,
        /// How long to wait for the daemon's verdict.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Show pool, DB sessions, tasks, alerts and instances of a running daemon.
    Status {
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Queue a task, or with --slot run it now in that run slot.
    Submit {
        #[command(flatten)]
        conn: ClientArgs,
        #[arg(long)]
        agent: String,
        /// JSON payload given to the agent.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// Run now in this run slot, replacing its running task (`--session` is the
        /// option's older name).
        #[arg(long, alias = "session")]
        slot: Option<String>,
        /// A duplicate submit (this key held by a task) answers that task instead of
        /// queueing another.
        #[arg(long)]
        unique_key: Option<String>,
        /// How long a task holds its key: queued (until it starts), active (while queued
        /// or running; the default) or period (with --unique-for).
        #[arg(long, value_parser = ["queued", "active", "period"])]
        unique_scope: Option<String>,
        /// Hold the key for this long after creation, e.g. "1h" (implies --unique-scope period).
        #[arg(long)]
        unique_for: Option<String>,
        /// Higher runs first among due tasks of the agent (default 0).
        #[arg(long, allow_hyphen_values = true)]
        priority: Option<i32>,
        /// Attempts before the task fails (default: the daemon's workers.max_attempts).
        #[arg(long)]
        max_attempts: Option<i32>,
        /// Not before this time: RFC 3339 ("2026-01-02T03:04:05Z") or a delay from now ("10m").
        #[arg(long)]
        run_after: Option<String>,
        /// Wait until the task ends and print its final state: exit 0 if it succeeded, 1 if
        /// it failed, was cancelled or timed out, 3 if --wait-limit passed first.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits at most.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        wait_limit: std::time::Duration,
    },
    /// List, show, cancel or follow tasks.
    Tasks {
        #[command(subcommand)]
        command: TasksCommand,
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

#[derive(Subcommand)]
enum TasksCommand {
    /// A page of tasks, oldest first.
    List {
        #[command(flatten)]
        conn: ClientArgs,
        /// queued, running, succeeded, failed, cancelled or timed_out.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        agent: Option<String>,
        /// Most tasks listed (1..=1000).
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// One task with its events (progress lines, per-attempt errors).
    Show {
        #[command(flatten)]
        conn: ClientArgs,
        id: i64,
    },
    /// Cancel a queued or running task.
    Cancel {
        #[command(flatten)]
        conn: ClientArgs,
        id: i64,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Print a task's events as they come until it ends: exit 0 if it succeeded, 1 if it
    /// failed, was cancelled or timed out, 3 if --limit passed first.
    Follow {
        #[command(flatten)]
        conn: ClientArgs,
        id: i64,
        /// How long to follow at most.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        limit: std::time::Duration,
    },
}

#[derive(clap::Args)]
struct ClientArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The daemon's base URL; default from http.listen in the config.
    #[arg(long, env = "TASKWARDEN_URL")]
    url: Option<String>,
    /// The API token (http.api_token); default $TASKWARDEN_API_TOKEN, else the config's.
    #[arg(long, env = "TASKWARDEN_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// The config a client command uses, and a name for where it came from (for hints):
/// --config, else ./config.toml, else /etc/taskwarden/config.toml, else the defaults.
fn load_client(arg: &ConfigArg) -> Result<(String, Config), ConfigError> {
    use taskwarden::client::{ClientConfig, SYSTEM_CONFIG, pick_client_config};
    if let Some(p) = &arg.config {
        return Ok((p.display().to_string(), Config::load(p)?));
    }
    match pick_client_config(Path::new("config.toml"), Path::new(SYSTEM_CONFIG)) {
        ClientConfig::File(p) => Ok((p.display().to_string(), Config::load(&p)?)),
        ClientConfig::Defaults(why) => Ok((why, Config::default())),
    }
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
        Command::Reload {
            config,
            pid,
            url,
            timeout,
        } => client_report(reload(config, pid, url, timeout)),
        Command::Status { conn } => client_report(client(&conn, |c| async move {
            let v = c.status().await?;
            Ok((v.clone(), taskwarden::client::render_status(&v)))
        })),
        Command::Submit {
            conn,
            agent,
            payload,
            slot,
            unique_key,
            unique_scope,
            unique_for,
            priority,
            max_attempts,
            run_after,
            wait,
            wait_limit,
        } => client_report(
            client(&conn, |c| async move {
                let payload: serde_json::Value = serde_json::from_str(&payload)
                    .map_err(|e| ClientError::Input(format!("--payload is not JSON: {e}")))?;
                let run_after = run_after.as_deref().map(parse_run_after).transpose()?;
                let v = c
                    .submit(&taskwarden::client::Submit {
                        agent,
                        payload,
                        slot,
                        unique_key,
                        unique_scope,
                        unique_for,
                        priority,
                        max_attempts,
                        run_after,
                    })
                    .await?;
                if !wait {
                    return Ok((v.clone(), taskwarden::client::render_task(&v)));
                }
                let id = v["id"]
                    .as_i64()
                    .ok_or_else(|| ClientError::Input(format!("no task id in the answer: {v}")))?;
                eprintln!(
                    "{}; waiting for it to end",
                    taskwarden::client::render_task(&v)
                );
                let done = c.follow(id, wait_limit, false, |_| {}).await?;
                Ok((done.clone(), taskwarden::client::render_task(&done)))
            })
            .and_then(|v| succeeded(&v, wait)),
        ),
        Command::Tasks { command } => tasks(command),
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

/// `tasks list|show|cancel|follow`.
fn tasks(command: TasksCommand) -> ExitCode {
    use taskwarden::client::{
        render_event_line, render_task, render_task_detail, render_task_list,
    };
    match command {
        TasksCommand::List {
            conn,
            status,
            agent,
            limit,
        } => client_report(client(&conn, |c| async move {
            let v = c.tasks(status.as_deref(), agent.as_deref(), limit).await?;
            Ok((v.clone(), render_task_list(&v)))
        })),
        TasksCommand::Show { conn, id } => client_report(client(&conn, |c| async move {
            let mut t = c.task(id).await?;
            let (_, events) = c.all_task_events(id, 0).await?;
            let text = render_task_detail(&t, &events);
            t["events"] = serde_json::Value::Array(events);
            Ok((t, text))
        })),
        TasksCommand::Cancel { conn, id, reason } => client_report(client(&conn, |c| async move {
            let v = c.cancel(id, reason.as_deref()).await?;
            Ok((v.clone(), render_task(&v)))
        })),
        TasksCommand::Follow { conn, id, limit } => {
            let json = conn.json;
            client_report(
                client(&conn, |c| async move {
                    let done = c
                        .follow(id, limit, true, |events| {
                            for e in events {
                                if json {
                                    println!("{e}");
                                } else {
                                    println!("{}", render_event_line(e));
                                }
                            }
                        })
                        .await?;
                    if json {
                        println!("{done}");
                        return Ok((done, String::new()));
                    }
                    let text = render_task(&done);
                    Ok((done, text))
                })
                .and_then(|v| succeeded(&v, true)),
            )
        }
    }
}

/// With `wait`, an error (exit 1) unless the task succeeded.
fn succeeded(v: &serde_json::Value, wait: bool) -> anyhow::Result<()> {
    let status = v["status"].as_str().unwrap_or("");
    if wait && status != "succeeded" {
        return Err(ClientError::NotSucceeded {
            id: v["id"].as_i64().unwrap_or(0),
            status: status.to_string(),
        }
        .into());
    }
    Ok(())
}

/// `--run-after`: RFC 3339, or a delay from now ("10m").
fn parse_run_after(v: &str) -> Result<String, ClientError> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(v) {
        return Ok(t.to_rfc3339());
    }
    let d = humantime::parse_duration(v).map_err(|e| {
        ClientError::Input(format!(
            "--run-after {v:?} is neither an RFC 3339 time nor a delay like 10m: {e}"
        ))
    })?;
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| chrono::Utc::now().checked_add_signed(d))
        .map(|t| t.to_rfc3339())
        .ok_or_else(|| ClientError::Input(format!("--run-after {v:?} is too far away")))
}

/// Runs a client call; prints JSON (unless the call printed it: `Null`) or the rendered
/// text. The JSON, for the caller's exit status.
fn client<F, Fut>(args: &ClientArgs, call: F) -> anyhow::Result<serde_json::Value>
where
    F: FnOnce(taskwarden::client::Client) -> Fut,
    Fut: std::future::Future<Output = Result<(serde_json::Value, String), ClientError>>,
{
    let (source, config) = load_client(&args.config)?;
    let c =
        taskwarden::client::Client::new(args.url.clone(), args.token.clone(), &config, &source)?;
    let (json, text) = runtime()?.block_on(call(c))?;
    if args.json {
        if !text.is_empty() {
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
    } else if !text.is_empty() {
        print!("{text}");
        if !text.ends_with('\n') {
            println!();
        }
    }
    Ok(json)
}

/// Exit status of a client command: 0; 1 when a waited-for task did not succeed (and for
/// `reload`'s refused file); 3 when waiting gave up; 2 when the daemon was unreachable or
/// refused the request, or the input was bad.
fn client_report<T>(r: anyhow::Result<T>) -> ExitCode {
    match r {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("taskwarden: {e:#}");
            let code = e
                .downcast_ref::<ClientError>()
                .map(ClientError::exit_code)
                .unwrap_or(1);
            ExitCode::from(code)
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

fn reload(
    config: ConfigArg,
    pid: i32,
    url: Option<String>,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let req = taskwarden::reload::Request {
        pid,
        config_path: config
            .config
            .unwrap_or_else(|| PathBuf::from("config.toml")),
        url,
        timeout,
    };
    runtime()?.block_on(taskwarden::reload::run(&req))?;
    println!(
        "taskwarden (pid {pid}) reloaded {}",
        req.config_path.display()
    );
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
