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
        Command::Migrate(arg) => report(migrate(&arg)),
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "taskwarden failed");
            eprintln!("taskwarden: {e:#}");
            ExitCode::FAILURE
        }
    }
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
        let db = taskwarden::daemon::Database::open(&config).await?;
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
