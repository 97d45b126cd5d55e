//! The binary's command line (clap): every subcommand and its options. The binary only;
//! the library knows nothing of it.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "taskwarden",
    version,
    about = "Runs agent tasks on PostgreSQL and watches its own DB sessions, pool and tasks"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Args)]
pub struct ConfigArg {
    /// Config file; without it ./config.toml is used if present, else the built-in defaults.
    #[arg(long, short = 'c', env = "TASKWARDEN_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum Command {
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
    Submit(SubmitArgs),
    /// List, show, cancel, retry or follow tasks, or print a task's events.
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
    Retry(RetryArgs),
    /// Print the HTTP API's OpenAPI 3.1 document (the one served at /openapi.json).
    Openapi,
    /// Print the Prometheus alerting rules (dashboards/alerts.yml) with the runbook links at
    /// your base URL and the instance-down rule at your scrape job.
    Alerts {
        /// URL of the runbooks page (docs/runbooks.md as you publish it); each rule's
        /// runbook_url is this plus `#<alert name in lower case>`.
        #[arg(long, default_value = taskwarden::alert_rules::DEFAULT_RUNBOOK_BASE)]
        runbook_base: String,
        /// The `job` label Prometheus gives taskwarden's scrapes.
        #[arg(long, default_value = taskwarden::alert_rules::DEFAULT_JOB)]
        job: String,
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
pub enum TasksCommand {
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
    /// Queue a failed, cancelled or timed-out task again (`taskwarden retry ID`).
    Retry {
        #[command(flatten)]
        conn: ClientArgs,
        id: i64,
        /// Attempts granted: max_attempts becomes at least attempts + this (default 1).
        #[arg(long)]
        extra_attempts: Option<i32>,
    },
    /// A task's events (progress lines, per-attempt errors), oldest first; with --follow,
    /// as they come until the task ends (then as `tasks follow`).
    Events {
        #[command(flatten)]
        conn: ClientArgs,
        id: i64,
        /// Keep printing until the task ends: exit 0 if it succeeded, 1 if it failed, was
        /// cancelled or timed out, 3 if --limit passed first.
        #[arg(long)]
        follow: bool,
        /// With --follow: how long to follow at most.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        limit: std::time::Duration,
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

/// `taskwarden submit`.
#[derive(clap::Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub conn: ClientArgs,
    #[arg(long)]
    pub agent: String,
    /// JSON payload given to the agent.
    #[arg(long, default_value = "{}")]
    pub payload: String,
    /// Run now in this run slot, replacing its running task (`--session` is the
    /// option's older name).
    #[arg(long, alias = "session")]
    pub slot: Option<String>,
    /// A duplicate submit (this key held by a task) answers that task instead of
    /// queueing another.
    #[arg(long)]
    pub unique_key: Option<String>,
    /// How long a task holds its key: queued (until it starts), active (while queued
    /// or running; the default) or period (with --unique-for).
    #[arg(long, value_parser = ["queued", "active", "period"])]
    pub unique_scope: Option<String>,
    /// Hold the key for this long after creation, e.g. "1h" (implies --unique-scope period).
    #[arg(long)]
    pub unique_for: Option<String>,
    /// Higher runs first among due tasks of the agent (default 0).
    #[arg(long, allow_hyphen_values = true)]
    pub priority: Option<i32>,
    /// Attempts before the task fails (default: the daemon's workers.max_attempts).
    #[arg(long)]
    pub max_attempts: Option<i32>,
    /// Not before this time: RFC 3339 ("2026-01-02T03:04:05Z") or a delay from now ("10m").
    #[arg(long)]
    pub run_after: Option<String>,
    /// Wait until the task ends and print its final state: exit 0 if it succeeded, 1 if
    /// it failed, was cancelled or timed out, 3 if --wait-limit passed first.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits at most.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub wait_limit: std::time::Duration,
}

/// `taskwarden retry`.
#[derive(clap::Args)]
pub struct RetryArgs {
    #[command(flatten)]
    pub conn: ClientArgs,
    /// The task; without it, --agent and/or --status select the tasks.
    #[arg(required_unless_present_any = ["agent", "status"], conflicts_with_all = ["agent", "status", "limit"])]
    pub id: Option<i64>,
    #[arg(long)]
    pub agent: Option<String>,
    /// failed, cancelled or timed_out (default: all three).
    #[arg(long)]
    pub status: Option<String>,
    /// Most tasks retried by a filter (1..=1000).
    #[arg(long, default_value_t = 100)]
    pub limit: i64,
    /// Attempts granted: max_attempts becomes at least attempts + this (default 1).
    #[arg(long)]
    pub extra_attempts: Option<i32>,
}

#[derive(clap::Args)]
pub struct ClientArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The daemon's base URL; default from http.listen in the config.
    #[arg(long, env = "TASKWARDEN_URL")]
    pub url: Option<String>,
    /// The API token (http.api_token); default $TASKWARDEN_API_TOKEN, else the config's.
    #[arg(long, env = "TASKWARDEN_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}
