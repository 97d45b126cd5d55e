//! `taskwarden run`: brings the subsystems up in order (database, migrations, pool, store),
//! announces readiness, serves signals, and takes everything down within the grace.
//!
//! Shutdown order matters: stop taking work, give running work the grace to finish, put
//! what is still running back in the queue, close the pool, and only then stop the embedded
//! PostgreSQL — so no task is left marked running and no connection is left open.

mod wiring;

pub use wiring::Parts;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;

use crate::api::{self, ApiState, ConfigMeta};
use crate::config::resolve_token;
use crate::config::{Config, ConfigError};
use crate::db::DbError;
use crate::db::embedded::{Cluster, ClusterOptions, EMBEDDED_DB, EmbeddedError};
use crate::db::migrate::{self, MigrateError};
use crate::logging::LogHandle;
use crate::metrics;
use crate::store::StoreError;
use crate::systemd;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid database.url: {0}")]
    Url(String),
    #[error("embedded PostgreSQL: {0}")]
    Embedded(#[from] crate::db::embedded::EmbeddedError),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("http.api_token_file: {0}")]
    Token(String),
    #[error("cannot listen on http.listen {0}: {1}")]
    Listen(String, #[source] std::io::Error),
    #[error("cannot install signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error(
        "the embedded PostgreSQL exited {restarts} times within {window:?} and could not be \
         kept running (last: {last}); exiting so the service manager restarts us"
    )]
    EmbeddedDied {
        restarts: usize,
        window: Duration,
        last: String,
    },
}

/// Restarts of the embedded PostgreSQL allowed within [`EMBEDDED_RESTART_WINDOW`]; one
/// more exit and the daemon exits non-zero instead of staying up unready.
pub const EMBEDDED_RESTARTS: usize = 3;
pub const EMBEDDED_RESTART_WINDOW: Duration = Duration::from_secs(600);

/// How long shutdown waits for a restart of the embedded PostgreSQL under way (cancelled
/// first, so it ends after the start attempt in progress) before leaving it behind: the
/// server it may still start dies with the thread that spawned it.
pub const EMBEDDED_RESTART_SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// The database a daemon talks to: a server it was pointed at, or its own.
pub struct Database {
    pub pg: tokio_postgres::Config,
    /// None while a restart is under way (the restart task holds it).
    pub cluster: Option<Cluster>,
    restarting: Option<PendingRestart>,
}

/// A restart of the embedded PostgreSQL running on a task of its own, so the signal loop
/// never waits for it (SIGTERM and SIGHUP are answered at once).
struct PendingRestart {
    handle: tokio::task::JoinHandle<Result<Cluster, EmbeddedError>>,
    cancel: tokio_util::sync::CancellationToken,
    old_pid: u32,
}

impl Database {
    /// For `taskwarden migrate`: like [`Database::open`], but when a running daemon owns
    /// the embedded cluster, connects to it through its socket instead of failing (and
    /// never stops it).
    pub async fn open_shared(cfg: &Config) -> Result<Database, DaemonError> {
        match Self::open(cfg).await {
            Err(DaemonError::Embedded(EmbeddedError::InUse { data_dir, pid })) => {
                let data_dir = std::fs::canonicalize(&data_dir).unwrap_or(data_dir);
                tracing::info!(data_dir = %data_dir.display(), owner_pid = ?pid, "data_dir in use by a running taskwarden; using its PostgreSQL");
                Ok(Database {
                    pg: crate::db::embedded::socket_config(&data_dir.join("pgdata"), EMBEDDED_DB),
                    cluster: None,
                    restarting: None,
                })
            }
            other => other,
        }
    }

    /// Uses `database.url` (or its env override); with none, starts the embedded cluster.
    pub async fn open(cfg: &Config) -> Result<Database, DaemonError> {
        let url = cfg.database.effective_url();
        if !url.trim().is_empty() {
            let pg = crate::db::parse_url(&url).map_err(|e| DaemonError::Url(e.to_string()))?;
            tracing::info!(target_db = %describe(&pg), "using external PostgreSQL");
            return Ok(Database {
                pg,
                cluster: None,
                restarting: None,
            });
        }
        let data_dir = cfg.database.effective_data_dir();
        let opts = ClusterOptions {
            unsafe_fast: false,
            // Room for the pool at its hard maximum, the admin and migration connections,
            // and an operator's psql.
            max_connections: Some((cfg.database.max_connections() as u32 + 10).max(50)),
            listen_port: Some(cfg.database.embedded_listen_port).filter(|p| *p != 0),
        };
        let cluster = Cluster::start(&data_dir, opts.clone()).await?;
        tracing::info!(data_dir = %data_dir.display(), socket_dir = %cluster.pgdata().display(), pid = cluster.pid(), "embedded PostgreSQL started");
        if let Some(port) = opts.listen_port {
            tracing::warn!(
                listen = %format!("127.0.0.1:{port}"),
                user = crate::db::embedded::EMBEDDED_USER,
                database = EMBEDDED_DB,
                "embedded PostgreSQL listens on loopback TCP with trust authentication: \
                 every local user and process can connect as its superuser"
            );
        }
        Ok(Database {
            pg: cluster.pg_config(EMBEDDED_DB),
            cluster: Some(cluster),
            restarting: None,
        })
    }

    pub async fn close(self) {
        if let Some(mut r) = self.restarting {
            r.cancel.cancel();
            match tokio::time::timeout(EMBEDDED_RESTART_SHUTDOWN_WAIT, &mut r.handle).await {
                Ok(Ok(Ok(c))) => c.stop().await,
                Ok(Ok(Err(e))) => {
                    tracing::info!(error = %e, old_pid = r.old_pid, "embedded PostgreSQL restart ended for shutdown");
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "embedded PostgreSQL restart task failed")
                }
                Err(_) => tracing::warn!(
                    waited_ms = EMBEDDED_RESTART_SHUTDOWN_WAIT.as_millis() as u64,
                    "embedded PostgreSQL restart still under way at shutdown; leaving it"
                ),
            }
        }
        if let Some(c) = self.cluster {
            c.stop().await;
        }
    }
}

/// Where a config points, without the password.
pub fn describe(pg: &tokio_postgres::Config) -> String {
    let host = pg
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "{}@{}/{}",
        pg.get_user().unwrap_or(""),
        host,
        pg.get_dbname().unwrap_or("")
    )
}

/// A process-unique name for this instance: leases and shutdown re-queueing use it.
pub fn instance_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into());
    format!(
        "{host}:{}:{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// What the running daemon shares between its parts.
pub struct Daemon {
    pub parts: Parts,
    pub config_meta: Arc<ArcSwap<ConfigMeta>>,
    pub token: Arc<ArcSwap<Option<String>>>,
    pub config_path: PathBuf,
}

impl std::ops::Deref for Daemon {
    type Target = Parts;
    fn deref(&self) -> &Parts {
        &self.parts
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config_path: &Path, config: Config, log: LogHandle) -> Result<(), DaemonError> {
    // Install handlers first: a signal during start-up must not kill us half-way.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(DaemonError::Signal)?;

    let mut database = Database::open(&config).await?;
    let result = serve(config_path, config, log, &mut database, &mut signals).await;
    database.close().await;
    if result.is_ok() {
        tracing::info!("taskwarden stopped");
    }
    result
}

async fn serve(
    config_path: &Path,
    config: Config,
    log: LogHandle,
    database: &mut Database,
    signals: &mut Signals,
) -> Result<(), DaemonError> {
    migrate_schema(database, &config).await?;
    let token = resolve_token(&config).map_err(|e| DaemonError::Token(e.to_string()))?;
    let listener = listen(&config.http.listen)
        .await
        .map_err(|e| DaemonError::Listen(config.http.listen.clone(), e))?;
    let config_meta = Arc::new(ArcSwap::from_pointee(ConfigMeta::of(&config, config_path)));
    let parts = Parts::start(
        database.pg.clone(),
        Arc::new(ArcSwap::from_pointee(config)),
        Default::default(),
    )
    .await?;
    let daemon = Daemon {
        parts,
        config_meta,
        token: Arc::new(ArcSwap::from_pointee(token)),
        config_path: config_path.to_path_buf(),
    };
    let local = daemon.spawn_http(listener)?;
    daemon.spawn_watchdog();
    daemon.announce_ready(database, local);

    let died = daemon.serve_signals(database, signals, &log, local).await;
    systemd::notify("STOPPING=1");
    let stopped = stop(&daemon).await;
    match died {
        Some(e) => Err(e),
        None => stopped,
    }
}

async fn migrate_schema(database: &Database, config: &Config) -> Result<(), DaemonError> {
    let report = migrate::run(&database.pg, &config.database).await?;
    tracing::info!(
        applied = report.applied.len(),
        schema_version = report.latest,
        "schema up to date"
    );
    Ok(())
}

impl Daemon {
    fn api_state(&self) -> ApiState {
        ApiState {
            config: Arc::clone(&self.config),
            config_meta: Arc::clone(&self.config_meta),
            token: Arc::clone(&self.token),
            db: self.db.clone(),
            store: self.store.clone(),
            orchestrator: self.orchestrator.clone(),
            metrics: self.metrics.clone(),
            alerts: self.alerts.clone(),
            liveness: Arc::clone(&self.liveness),
            running: Arc::clone(&self.running),
            shutdown: self.shutdown.clone(),
            streams: Default::default(),
        }
    }

    /// Serves the API on `listener` until shutdown; returns the address it listens on.
    fn spawn_http(
        &self,
        listener: tokio::net::TcpListener,
    ) -> Result<std::net::SocketAddr, DaemonError> {
        let api = api::router(self.api_state());
        let local = listener
            .local_addr()
            .map_err(|e| DaemonError::Listen(self.config.load().http.listen.clone(), e))?;
        self.tasks.spawn(api::server::serve(
            listener,
            api,
            Arc::clone(&self.config),
            self.metrics.clone(),
            self.shutdown.clone(),
        ));
        Ok(local)
    }

    /// Pets systemd's watchdog, when the unit asks for one.
    fn spawn_watchdog(&self) {
        if let Some(period) = systemd::watchdog_interval() {
            self.tasks.spawn(systemd::watchdog(
                systemd::Notifier::from_env(),
                period,
                Arc::clone(&self.liveness),
                Arc::clone(&self.config),
                self.shutdown.clone(),
            ));
        }
    }

    fn announce_ready(&self, database: &Database, local: std::net::SocketAddr) {
        let cfg = self.config.load();
        tracing::info!(
            instance = %self.instance_id,
            database = %describe(&database.pg),
            listen = %local,
            pool_max = cfg.database.max_connections(),
            "taskwarden ready"
        );
        systemd::notify(&format!("READY=1\nSTATUS=ready; listening on {local}"));
    }

    /// Reloads on SIGHUP and restarts the embedded PostgreSQL when it exits, until
    /// SIGTERM or SIGINT; the error when the embedded server could not be kept running.
    /// A restart runs on its own task: signals are served while it is under way, and a
    /// shutdown leaves it to [`Database::close`].
    async fn serve_signals(
        &self,
        database: &mut Database,
        signals: &mut Signals,
        log: &LogHandle,
        local: std::net::SocketAddr,
    ) -> Option<DaemonError> {
        let mut restarts: Vec<tokio::time::Instant> = Vec::new();
        loop {
            let postmaster = database.cluster.as_ref().map(|c| c.exited());
            tokio::select! {
                sig = signals.next() => match sig {
                    Some(SIGHUP) => {
                        // systemd shows the unit "reloading" until READY=1; `taskwarden
                        // reload` (ExecReload) reads the verdict from the reload counts.
                        systemd::notify_reloading();
                        let outcome = if reload(self, log) {
                            "config reloaded"
                        } else {
                            "config reload refused; running config kept"
                        };
                        systemd::notify(&format!(
                            "READY=1\nSTATUS=ready; listening on {local}; {outcome}"
                        ));
                    }
                    Some(s) => {
                        let name = if s == SIGINT { "SIGINT" } else { "SIGTERM" };
                        tracing::info!(
                            signal = name,
                            embedded_restart_under_way = database.restarting.is_some(),
                            "shutting down"
                        );
                        return None;
                    }
                    None => return None,
                },
                _ = async {
                    match &postmaster {
                        Some(t) => t.cancelled().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Err(e) = start_restart(database, &mut restarts) {
                        tracing::error!(error = %e, "embedded PostgreSQL cannot be kept running; shutting down");
                        return Some(e);
                    }
                }
                done = async {
                    match database.restarting.as_mut() {
                        Some(r) => (&mut r.handle).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let old_pid = database.restarting.take().map(|r| r.old_pid).unwrap_or(0);
                    match done {
                        Ok(Ok(c)) => {
                            self.metrics
                                .counter(metrics::EMBEDDED_POSTGRES_RESTARTS_TOTAL, &[])
                                .increment(1);
                            tracing::warn!(pid = c.pid(), old_pid, "embedded PostgreSQL restarted");
                            database.cluster = Some(c);
                        }
                        failed => {
                            let last = match failed {
                                Ok(Err(e)) => e.to_string(),
                                Err(e) => format!("restart task failed: {e}"),
                                Ok(Ok(_)) => String::new(),
                            };
                            let e = DaemonError::EmbeddedDied {
                                restarts: restarts.len(),
                                window: EMBEDDED_RESTART_WINDOW,
                                last,
                            };
                            tracing::error!(error = %e, "embedded PostgreSQL cannot be kept running; shutting down");
                            return Some(e);
                        }
                    }
                }
            }
        }
    }
}

/// The embedded postmaster exited while we run (killed, crashed, OOM): start it again on a
/// task of its own, at most [`EMBEDDED_RESTARTS`] times within
/// [`EMBEDDED_RESTART_WINDOW`]. The pool and every loop reconnect by themselves once the
/// socket is back.
fn start_restart(
    database: &mut Database,
    restarts: &mut Vec<tokio::time::Instant>,
) -> Result<(), DaemonError> {
    let now = tokio::time::Instant::now();
    restarts.retain(|t| now.saturating_duration_since(*t) < EMBEDDED_RESTART_WINDOW);
    let Some(cluster) = database.cluster.take() else {
        return Ok(());
    };
    let old_pid = cluster.pid();
    if restarts.len() >= EMBEDDED_RESTARTS {
        return Err(DaemonError::EmbeddedDied {
            restarts: restarts.len(),
            window: EMBEDDED_RESTART_WINDOW,
            last: format!("pid {old_pid} exited"),
        });
    }
    restarts.push(now);
    tracing::error!(
        pid = old_pid,
        attempt = restarts.len(),
        limit = EMBEDDED_RESTARTS,
        "embedded PostgreSQL exited unexpectedly; restarting it"
    );
    let cancel = tokio_util::sync::CancellationToken::new();
    database.restarting = Some(PendingRestart {
        handle: tokio::spawn(cluster.restart_unless(cancel.clone())),
        cancel,
        old_pid,
    });
    Ok(())
}

/// Pending connections the kernel queues for the listener before it refuses more (the
/// default 128 reset about a tenth of 1,000 simultaneous connections).
pub const LISTEN_BACKLOG: u32 = 1024;

/// Binds the HTTP listener with [`LISTEN_BACKLOG`].
async fn listen(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(LISTEN_BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("the address resolved to nothing")))
}

/// Stop claiming; let running tasks finish within `workers.shutdown_grace`; cancel what is
/// left and put it back in the queue; stop every loop; close the pool.
async fn stop(d: &Daemon) -> Result<(), DaemonError> {
    stop_parts(d).await
}

async fn stop_parts(d: &Parts) -> Result<(), DaemonError> {
    let grace = d.config.load().workers.shutdown_grace.get();
    d.orchestrator.stop_claiming();
    if !d.orchestrator.drain(grace).await {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            running = d.orchestrator.running_here(),
            "tasks still running after the grace; cancelling them"
        );
    }
    // Shutdown first, so cancelled runs know not to record "cancelled".
    d.shutdown.cancel();
    let cancelled = d.running.cancel_all();
    if cancelled > 0 {
        tracing::info!(cancelled, "cancelled running tasks for shutdown");
    }
    d.tasks.close();
    if tokio::time::timeout(Duration::from_secs(5), d.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("background loops did not stop within 5s; abandoning them");
    }
    let requeued = d.store.requeue_running_owned_by(&d.instance_id).await?;
    if requeued > 0 {
        tracing::info!(requeued, "running tasks put back in the queue");
    }
    d.db.close();
    // Guards still held by abandoned work close their connections when dropped; give
    // them a moment so the server sees clean disconnects.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while d.db.tracker().open_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// SIGHUP: re-read the file; apply what can change live, keep the old config if invalid
/// (then `false`, after logging every problem). A successful reload is counted only once
/// the new config is in force, so whoever sees the count (`taskwarden reload`) sees it.
fn reload(d: &Daemon, log: &LogHandle) -> bool {
    let new = match crate::db::load_config(&d.config_path) {
        Ok(c) => c,
        Err(e) => {
            d.metrics
                .gauge(metrics::CONFIG_LAST_RELOAD_SUCCESSFUL, &[])
                .set(0.0);
            d.metrics
                .counter(metrics::CONFIG_RELOADS_TOTAL, &[("result", "error")])
                .increment(1);
            tracing::error!(path = %d.config_path.display(), error = %e, "config reload failed; keeping the running config");
            return false;
        }
    };
    // Counted only once it is in force, so a reader that sees the count sees the config.
    let counted = || {
        d.metrics
            .gauge(metrics::CONFIG_LAST_RELOAD_SUCCESSFUL, &[])
            .set(1.0);
        d.metrics
            .counter(metrics::CONFIG_RELOADS_TOTAL, &[("result", "ok")])
            .increment(1)
    };
    let old = d.config.load_full();
    let changed = crate::config::reload::changed_keys(&old, &new);
    if changed.is_empty() {
        counted();
        tracing::info!("config reloaded; nothing changed");
        return true;
    }
    let (restart, live) = crate::config::reload::split_restart_only(&changed);
    if new.logging.level != old.logging.level
        && let Err(e) = log.set_level(&new.logging.level)
    {
        tracing::error!(error = %e, "cannot apply logging.level");
    }
    if new.database.max_connections() != old.database.max_connections()
        || new.database.pool_size != old.database.pool_size
    {
        d.db.resize(&new.database);
    }
    match resolve_token(&new) {
        Ok(t) => d.token.store(Arc::new(t)),
        Err(e) => {
            tracing::error!(error = %e, "http.api_token_file unreadable; keeping the previous token")
        }
    }
    d.config_meta
        .store(Arc::new(ConfigMeta::of(&new, &d.config_path)));
    d.config.store(Arc::new(new));
    if live.iter().any(|k| k.starts_with("agents.")) {
        d.orchestrator.reload_agents();
    }
    counted();
    tracing::info!(changed = ?live, needs_restart = ?restart, "config reloaded");
    true
}
