//! The embedded PostgreSQL: with no `database.url`, the daemon runs its own cluster under
//! `data_dir` — initdb once, a unix socket inside the cluster directory, no TCP port — and
//! stops it on shutdown. The test harness uses the same code for its throwaway clusters.
//!
//! PostgreSQL refuses to run as root. When we are root (a container, a CI box), the server
//! runs as the `postgres` system user if it exists, else `nobody`, and the cluster
//! directory is handed to that user.
//!
//! The postmaster is spawned from a dedicated thread that lives exactly as long as the
//! server and asks the kernel (PR_SET_PDEATHSIG) to send the server SIGINT (fast shutdown)
//! if that thread dies. So even a SIGKILLed daemon or a test process that exits without
//! running destructors does not leave a server behind. It runs in a session of its own, so
//! a terminal's Ctrl-C reaches only the daemon, which then stops it in order.
//!
//! The cluster is owned exclusively: [`Cluster::start`] takes an `flock` on
//! `data_dir/taskwarden.lock` (holding our pid) for the cluster's whole life. A second
//! process on the same `data_dir` gets [`EmbeddedError::InUse`] naming the owner's pid; it
//! never stops the live server. Only the lock's holder ever stops a postmaster it finds
//! left in the directory (one whose daemon died). If the postmaster exits on its own, the
//! owner learns it through [`Cluster::exited`] and may [`Cluster::restart`] it.

mod binaries;

pub use binaries::PgBinaries;

mod lock;
mod postmaster;

use postmaster::stop_stale_postmaster;

pub use lock::{DataDirLock, LOCK_FILE};

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User};

/// Superuser and database the embedded cluster is created with.
pub const EMBEDDED_USER: &str = "taskwarden";
pub const EMBEDDED_DB: &str = "taskwarden";
/// The socket file is named after the port even with TCP off; the socket directory is
/// private to the cluster, so the fixed number cannot collide with another server.
pub const EMBEDDED_PORT: u16 = 5432;
/// Env var naming the directory of initdb and postgres, overriding the search.
pub const PG_BINDIR_ENV: &str = "TASKWARDEN_PG_BINDIR";

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "data_dir {} is in use by a running taskwarden (pid {}); stop it first, or give \
         this one another database.data_dir",
        .data_dir.display(), .pid.map(|p| p.to_string()).unwrap_or_else(|| "unknown".into())
    )]
    InUse { data_dir: PathBuf, pid: Option<i32> },
    #[error(
        "PostgreSQL server binaries (initdb, postgres) were not found ($TASKWARDEN_PG_BINDIR, \
         PATH, /usr/lib/postgresql/*/bin); install them with `apt-get install postgresql` \
         (Debian package `postgresql`), or set database.url to use an existing server"
    )]
    BinariesNotFound,
    #[error("cannot prepare data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "running as root, but neither the `postgres` nor the `nobody` user exists to run PostgreSQL as"
    )]
    NoUnprivilegedUser,
    #[error("initdb failed ({status}): {output}")]
    Initdb { status: String, output: String },
    #[error("cannot start PostgreSQL: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("PostgreSQL exited during start-up; last lines of {log}:\n{tail}")]
    StartFailed { log: PathBuf, tail: String },
    #[error("PostgreSQL did not accept connections within {0:?}; see {1}")]
    StartTimeout(Duration, PathBuf),
    #[error("cannot create database {EMBEDDED_DB}: {}", crate::db::describe_pg_error(.0))]
    CreateDb(#[source] tokio_postgres::Error),
    #[error("embedded PostgreSQL: {what} did not finish within {limit:?}")]
    Deadline { what: &'static str, limit: Duration },
    #[error("embedded PostgreSQL restart cancelled (shutting down)")]
    Cancelled,
}

/// The most one control round trip to the embedded server may take (connect, look up
/// or create the database): a server that accepts the socket but never answers must not
/// hold start-up or a restart for ever.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// Options for a cluster; the daemon uses the defaults, tests trade durability for speed.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// fsync off and friends: only for throwaway test clusters.
    pub unsafe_fast: bool,
    pub max_connections: Option<u32>,
    /// Also listen on 127.0.0.1 at this port (`database.embedded_listen_port`); the unix
    /// socket is then named after it too. None: unix socket only.
    pub listen_port: Option<u16>,
}

impl ClusterOptions {
    /// The server's port: the TCP one when listening, else [`EMBEDDED_PORT`] (which only
    /// names the socket file).
    pub fn port(&self) -> u16 {
        self.listen_port.unwrap_or(EMBEDDED_PORT)
    }
}

/// Start attempts after an unexpected exit before a restart counts as failed.
const RESTART_TRIES: u32 = 10;

/// A running embedded cluster. Call [`Cluster::stop`] to shut it down cleanly; dropping it
/// also stops it (blocking briefly), so no path leaves a server running.
#[derive(Debug)]
pub struct Cluster {
    data_dir: PathBuf,
    pgdata: PathBuf,
    opts: ClusterOptions,
    pid: Pid,
    // In a Mutex only to make Cluster Sync; one owner ever waits on it.
    exited: Mutex<mpsc::Receiver<()>>,
    /// Cancelled by the spawning thread when the postmaster exits, for async watchers.
    exit_token: tokio_util::sync::CancellationToken,
    stopped: bool,
    lock: Option<DataDirLock>,
}

fn run_as_user() -> Result<Option<User>, EmbeddedError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        if let Ok(Some(u)) = User::from_name(name) {
            return Ok(Some(u));
        }
    }
    Err(EmbeddedError::NoUnprivilegedUser)
}

/// The error for a failed operation on `path` in the data directory.
fn dd_err(path: &Path) -> impl FnOnce(std::io::Error) -> EmbeddedError + use<> {
    let path = path.to_path_buf();
    move |source| EmbeddedError::DataDir { path, source }
}

fn as_user(cmd: &mut Command, user: &Option<User>) {
    if let Some(u) = user {
        // std drops supplementary groups itself when root sets a uid.
        cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
    }
}

impl Cluster {
    /// initdb `data_dir/pgdata` if it is not a cluster yet, start the server, wait until it
    /// accepts connections and make sure the `taskwarden` database exists.
    pub async fn start(data_dir: &Path, opts: ClusterOptions) -> Result<Cluster, EmbeddedError> {
        let data_dir = data_dir.to_path_buf();
        let cluster =
            tokio::task::spawn_blocking(move || Self::start_blocking(&data_dir, &opts, &mut None))
                .await
                .map_err(|e| EmbeddedError::Spawn(std::io::Error::other(e)))??;
        cluster.ensure_database().await?;
        Ok(cluster)
    }

    /// A token cancelled when the postmaster exits, whoever made it exit.
    pub fn exited(&self) -> tokio_util::sync::CancellationToken {
        self.exit_token.clone()
    }

    /// Starts the server again after it exited on its own, keeping the `data_dir` lock
    /// throughout, so no other process can slip in between.
    pub async fn restart(self) -> Result<Cluster, EmbeddedError> {
        self.restart_unless(tokio_util::sync::CancellationToken::new())
            .await
    }

    /// [`Cluster::restart`], given up between two start attempts (and before the
    /// database check) once `cancel` is cancelled: a shutdown waits for one attempt at
    /// most, not for all of them.
    pub async fn restart_unless(
        mut self,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<Cluster, EmbeddedError> {
        // It is gone already: nothing to stop, and its pid may be reused by now.
        self.stopped = true;
        let mut lock = self.lock.take();
        let data_dir = self.data_dir.clone();
        let opts = self.opts.clone();
        let stop = cancel.clone();
        let cluster = tokio::task::spawn_blocking(move || {
            // The dead postmaster's backends may still hold its shared memory for a moment;
            // PostgreSQL refuses to start until they are gone.
            let mut tries = 0;
            loop {
                if stop.is_cancelled() {
                    return Err(EmbeddedError::Cancelled);
                }
                match Self::start_blocking(&data_dir, &opts, &mut lock) {
                    Err(EmbeddedError::StartFailed { .. } | EmbeddedError::StartTimeout(..))
                        if tries < RESTART_TRIES =>
                    {
                        tries += 1;
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    other => return other,
                }
            }
        })
        .await
        .map_err(|e| EmbeddedError::Spawn(std::io::Error::other(e)))??;
        if cancel.is_cancelled() {
            // Dropping it stops the server it just started.
            return Err(EmbeddedError::Cancelled);
        }
        cluster.ensure_database().await?;
        Ok(cluster)
    }

    /// `lock` is taken (or acquired, when empty) only by a successful start, so a failed
    /// restart keeps it for the next try.
    fn start_blocking(
        data_dir: &Path,
        opts: &ClusterOptions,
        lock: &mut Option<DataDirLock>,
    ) -> Result<Cluster, EmbeddedError> {
        let bins = PgBinaries::find()?;
        let user = run_as_user()?;
        fs::create_dir_all(data_dir).map_err(dd_err(data_dir))?;
        let data_dir = fs::canonicalize(data_dir).map_err(dd_err(data_dir))?;
        // Ownership before anything that could touch a live server.
        if lock.is_none() {
            *lock = Some(DataDirLock::acquire(&data_dir)?);
        }
        let pgdata = data_dir.join("pgdata");
        Self::init_if_needed(&bins, &pgdata, &user)?;
        stop_stale_postmaster(&pgdata);

        // The log goes beside the cluster, owned by us: the server writes to an inherited fd.
        let log_path = data_dir.join("postgresql.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(dd_err(&log_path))?;
        let log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log_err = log.try_clone().map_err(dd_err(&log_path))?;
        let cmd = Self::postmaster_command(&bins, &pgdata, opts, &user, log, log_err);
        let (pid, exit_rx, exit_token) = Self::spawn_postmaster(cmd)?;
        let cluster = Cluster {
            data_dir: data_dir.clone(),
            pgdata,
            opts: opts.clone(),
            pid: Pid::from_raw(pid as i32),
            exited: Mutex::new(exit_rx),
            exit_token,
            stopped: false,
            lock: None,
        };
        Self::wait_until_ready(cluster, log_path, log_offset, lock)
    }

    /// initdb `pgdata` unless it already holds a cluster.
    fn init_if_needed(
        bins: &PgBinaries,
        pgdata: &Path,
        user: &Option<User>,
    ) -> Result<(), EmbeddedError> {
        if !pgdata.join("PG_VERSION").is_file() {
            fs::create_dir_all(pgdata).map_err(dd_err(pgdata))?;
            fs::set_permissions(pgdata, fs::Permissions::from_mode(0o700))
                .map_err(dd_err(pgdata))?;
            if let Some(u) = &user {
                nix::unistd::chown(pgdata, Some(u.uid), Some(u.gid))
                    .map_err(|e| dd_err(pgdata)(std::io::Error::from(e)))?;
            }
            let mut cmd = Command::new(&bins.initdb);
            cmd.arg("-D")
                .arg(pgdata)
                .args([
                    "-U",
                    EMBEDDED_USER,
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-instructions",
                ])
                .stdin(Stdio::null());
            as_user(&mut cmd, user);
            crate::process::scrub_child_env(&mut cmd);
            let out = cmd.output().map_err(EmbeddedError::Spawn)?;
            if !out.status.success() {
                return Err(EmbeddedError::Initdb {
                    status: out.status.to_string(),
                    output: format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ),
                });
            }
            tracing::info!(pgdata = %pgdata.display(), "embedded PostgreSQL cluster initialised");
        }
        Ok(())
    }

    /// Connection settings for this cluster's socket; `dbname` picks the database.
    pub fn pg_config(&self, dbname: &str) -> tokio_postgres::Config {
        socket_config_at(&self.pgdata, self.opts.port(), dbname)
    }

    /// A libpq-style URL for this cluster, for tools and child processes.
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "postgresql://{EMBEDDED_USER}@/{dbname}?host={}&port={}",
            self.pgdata.display(),
            self.opts.port()
        )
    }

    pub fn pgdata(&self) -> &Path {
        &self.pgdata
    }

    pub fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// Creates the `taskwarden` database unless it exists, within [`CONTROL_TIMEOUT`].
    async fn ensure_database(&self) -> Result<(), EmbeddedError> {
        let mut pg = self.pg_config("postgres");
        pg.connect_timeout(CONTROL_TIMEOUT);
        let (client, conn) =
            tokio::time::timeout(CONTROL_TIMEOUT, pg.connect(tokio_postgres::NoTls))
                .await
                .map_err(|_| EmbeddedError::Deadline {
                    what: "connecting to check the database",
                    limit: CONTROL_TIMEOUT,
                })?
                .map_err(EmbeddedError::CreateDb)?;
        let conn = tokio::spawn(conn);
        let checked =
            tokio::time::timeout(CONTROL_TIMEOUT, Self::create_database_if_missing(&client)).await;
        drop(client);
        // The connection task ends once the client is gone; abort it if the server hangs.
        let abort = conn.abort_handle();
        if tokio::time::timeout(CONTROL_TIMEOUT, conn).await.is_err() {
            abort.abort();
        }
        checked.map_err(|_| EmbeddedError::Deadline {
            what: "checking or creating the database",
            limit: CONTROL_TIMEOUT,
        })?
    }

    async fn create_database_if_missing(
        client: &tokio_postgres::Client,
    ) -> Result<(), EmbeddedError> {
        let exists = client
            .query_opt(
                "SELECT 1 FROM pg_database WHERE datname = $1",
                &[&EMBEDDED_DB],
            )
            .await
            .map_err(EmbeddedError::CreateDb)?
            .is_some();
        if !exists {
            client
                .batch_execute(&format!("CREATE DATABASE {EMBEDDED_DB}"))
                .await
                .map_err(EmbeddedError::CreateDb)?;
        }
        Ok(())
    }

    /// Fast shutdown (SIGINT: disconnect clients, checkpoint, exit) and wait for the exit.
    pub async fn stop(mut self) {
        let _ = tokio::task::spawn_blocking(move || self.stop_blocking()).await;
    }

    /// Whether the server process has exited (waiting up to `limit`).
    fn exited_within(&self, limit: Duration) -> bool {
        let rx = self.exited.lock().unwrap_or_else(|p| p.into_inner());
        match rx.recv_timeout(limit) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => true,
            Err(mpsc::RecvTimeoutError::Timeout) => false,
        }
    }

    fn stop_blocking(&mut self) {
        if self.stopped || self.exit_token.is_cancelled() {
            // Already gone: signalling its pid could hit an unrelated process.
            self.stopped = true;
            return;
        }
        self.stopped = true;
        let _ = kill(self.pid, Signal::SIGINT);
        if !self.exited_within(Duration::from_secs(30)) {
            tracing::warn!(
                pid = self.pid.as_raw(),
                "embedded PostgreSQL ignored fast shutdown; sending SIGQUIT"
            );
            let _ = kill(self.pid, Signal::SIGQUIT);
            self.exited_within(Duration::from_secs(10));
        }
        tracing::info!(pid = self.pid.as_raw(), "embedded PostgreSQL stopped");
    }
}

/// Connection settings for the embedded cluster whose `pgdata` this is (the socket lives
/// there); used to reach a cluster another process owns. The port (which names the socket)
/// is the running server's, from `postmaster.pid`.
pub fn socket_config(pgdata: &Path, dbname: &str) -> tokio_postgres::Config {
    // postmaster.pid's 4th line is the port.
    let port = fs::read_to_string(pgdata.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().nth(3).and_then(|l| l.trim().parse::<u16>().ok()))
        .unwrap_or(EMBEDDED_PORT);
    socket_config_at(pgdata, port, dbname)
}

fn socket_config_at(pgdata: &Path, port: u16, dbname: &str) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host_path(pgdata)
        .port(port)
        .user(EMBEDDED_USER)
        .dbname(dbname);
    c
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_blocking();
    }
}
