//! The `taskwarden` binary: parses the command line and hands over to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

mod cli;

use cli::{Cli, ClientArgs, Command, ConfigArg, RetryArgs, SubmitArgs, TasksCommand};
use taskwarden::client::ClientError;
use taskwarden::config::{Config, ConfigError};

/// The config a client command uses, and a name for where it came from (for hints):
/// --config, else ./config.toml, else /etc/taskwarden/config.toml, else the defaults.
/// A file with problems outside `[http]` still reaches the daemon (see `client_config`),
/// with a warning on stderr.
fn load_client(arg: &ConfigArg) -> Result<(String, Config), ConfigError> {
    use taskwarden::client::{ClientConfig, SYSTEM_CONFIG, client_config, pick_client_config};
    let path = match &arg.config {
        Some(p) => p.clone(),
        None => match pick_client_config(Path::new("config.toml"), Path::new(SYSTEM_CONFIG)) {
            ClientConfig::File(p) => p,
            ClientConfig::Defaults(why) => return Ok((why, Config::default())),
        },
    };
    let (config, warning) = client_config(&path)?;
    if let Some(w) = warning {
        eprintln!("taskwarden: warning: {w}");
    }
    Ok((path.display().to_string(), config))
}

fn load(arg: &ConfigArg) -> Result<(PathBuf, Config), ConfigError> {
    match &arg.config {
        Some(p) => Ok((p.clone(), taskwarden::db::load_config(p)?)),
        None => {
            let p = Path::new("config.toml");
            if p.exists() {
                Ok((p.to_path_buf(), taskwarden::db::load_config(p)?))
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
        Command::Submit(args) => submit(args),
        Command::Tasks { command } => tasks(command),
        Command::Alerts { runbook_base, job } => {
            match taskwarden::alert_rules::prometheus_rules(&runbook_base, &job) {
                Ok(rules) => {
                    print!("{rules}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("taskwarden alerts: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Openapi => {
            print!("{}", taskwarden::api::openapi_document());
            ExitCode::SUCCESS
        }
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
        Command::Retry(args) => retry(args),
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

/// `submit`: queue a task (or run it in a slot), and with `--wait` follow it to its end.
fn submit(args: SubmitArgs) -> ExitCode {
    let SubmitArgs {
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
    } = args;
    client_report(
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
    )
}

/// `retry`: one task by id, or those matching a filter.
fn retry(args: RetryArgs) -> ExitCode {
    let RetryArgs {
        conn,
        id,
        agent,
        status,
        limit,
        extra_attempts,
    } = args;
    client_report(client(&conn, |c| async move {
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
    }))
}

/// `tasks list|show|cancel|retry|events|follow`.
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
        TasksCommand::Retry {
            conn,
            id,
            extra_attempts,
        } => client_report(client(&conn, |c| async move {
            let v = c.retry(id, extra_attempts).await?;
            Ok((v.clone(), render_task(&v)))
        })),
        TasksCommand::Events {
            conn,
            id,
            follow: false,
            ..
        } => client_report(client(&conn, |c| async move {
            let (_, events) = c.all_task_events(id, 0).await?;
            let text = events
                .iter()
                .map(render_event_line)
                .collect::<Vec<_>>()
                .join("\n");
            Ok((serde_json::Value::Array(events), text))
        })),
        TasksCommand::Events {
            conn,
            id,
            follow: true,
            limit,
        }
        | TasksCommand::Follow { conn, id, limit } => {
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
