//! The database layer: the bounded connection pool and the one guard, [`Session`], through
//! which all code reaches PostgreSQL.
//!
//! The seeds' first failure was sessions that were never returned. Here that cannot be
//! written: the pooled client is a private field of [`Session`], which registers itself in
//! the [`Tracker`] at checkout and, when dropped, rolls back what it did not commit,
//! unregisters, and returns (or discards) the connection. There is no accessor that hands
//! out the raw client.
//!
//! The pool is deadpool-postgres with a thin manager around it that remembers each
//! connection's backend pid (so the supervisor can match guards to `pg_stat_activity`).
//! Connections above `pool_size` are overflow: they are closed when returned instead of
//! being kept idle, so the pool shrinks back by itself.

mod guard;

pub use guard::{Session, Tx};

mod direct;
mod error;
pub mod param;
mod query;

pub use query::Query;

pub use param::{Param, Params, SqlType};

pub use direct::{DirectClient, DirectTx, connect_direct};
pub use error::{DbError, describe_pg_error};

pub mod config_check;
pub mod embedded;
pub mod libpq_env;
pub mod migrate;
pub mod preflight;
pub mod schema;
pub mod tracker;
pub use config_check::load_config;
pub use schema::Schema;
pub mod target;
pub mod tls;

use std::fmt;
use std::panic::Location;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use deadpool::managed::{
    self, Metrics as PoolMetrics, PoolError, RecycleResult, TimeoutType, Timeouts,
};
use deadpool_postgres::{ClientWrapper, ManagerConfig, RecyclingMethod};

use crate::config::{DatabaseConfig, Pooler};
use crate::db::tracker::{NewSession, Owner, SessionInfo, Tracker};
use crate::metrics::Metrics;

/// A pre-ping (`database.pre_ping`) slower than this discards the idle connection.
pub const PING_LIMIT: Duration = Duration::from_secs(1);

/// How long a cancel request for an abandoned statement may take before we give up on it.
const CANCEL_REQUEST_LIMIT: Duration = Duration::from_secs(10);

/// Pool figures at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PoolStatus {
    /// Hard maximum: pool_size + max_overflow.
    pub max: usize,
    /// Base size; connections above it are overflow.
    pub base: usize,
    pub size: usize,
    pub in_use: usize,
    pub idle: usize,
    pub waiting: usize,
}

impl PoolStatus {
    pub fn utilization(&self) -> f64 {
        if self.max == 0 {
            0.0
        } else {
            self.in_use as f64 / self.max as f64
        }
    }
}

impl fmt::Display for PoolStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "max={} size={} in_use={} idle={} waiting={}",
            self.max, self.size, self.in_use, self.idle, self.waiting
        )
    }
}

/// A pooled connection plus what we learnt about it when it was opened.
pub struct PgConn {
    client: ClientWrapper,
    backend_pid: i32,
    /// When a guard last gave it back to the pool.
    returned: Option<Instant>,
}

/// deadpool-postgres' manager, plus one `pg_backend_pid()` per new connection.
pub struct PgManager {
    inner: deadpool_postgres::Manager,
    /// `sslmode=allow`'s second attempt, encrypted.
    encrypted: Option<deadpool_postgres::Manager>,
    /// Session mode: settings each new connection gets with a SET (no startup options
    /// pass the pooler). Transaction mode: none (they are SET LOCAL per transaction).
    on_connect: Option<String>,
    /// Whether `pg_backend_pid()` names this connection's backend for its whole life (not
    /// behind a transaction pooler).
    stable_backend: bool,
    /// `database.pre_ping`, for connections idle at least `database.pre_ping_idle`.
    pre_ping: bool,
    ping_idle_after: Duration,
}

impl managed::Manager for PgManager {
    type Type = PgConn;
    type Error = tokio_postgres::Error;

    async fn create(&self) -> Result<PgConn, tokio_postgres::Error> {
        let client = match (self.inner.create().await, &self.encrypted) {
            (Err(e), Some(encrypted)) if e.as_db_error().is_some() => encrypted.create().await?,
            (r, _) => r?,
        };
        if let Some(sql) = &self.on_connect {
            client.batch_execute(sql).await?;
        }
        // 0 where no backend belongs to the connection: the supervisor never acts on it.
        let backend_pid = if self.stable_backend {
            backend_pid(&client).await?
        } else {
            0
        };
        Ok(PgConn {
            backend_pid,
            client,
            returned: None,
        })
    }

    async fn recycle(
        &self,
        conn: &mut PgConn,
        metrics: &PoolMetrics,
    ) -> RecycleResult<tokio_postgres::Error> {
        // The inner manager only checks that the socket is open; the ping is ours, and only
        // for a connection idle long enough to have gone stale unnoticed (HikariCP's alive
        // bypass window): a busy pool pays no round trip per checkout.
        self.inner.recycle(&mut conn.client, metrics).await?;
        let idle = conn.returned.map_or(Duration::MAX, |t| t.elapsed());
        if self.pre_ping && idle >= self.ping_idle_after {
            conn.client.simple_query("").await?;
        }
        Ok(())
    }

    fn detach(&self, conn: &mut PgConn) {
        self.inner.detach(&mut conn.client)
    }
}

/// `pg_backend_pid()` over the simple protocol (no statement to prepare).
async fn backend_pid(client: &tokio_postgres::Client) -> Result<i32, tokio_postgres::Error> {
    let msgs = client.simple_query("SELECT pg_backend_pid()").await?;
    Ok(msgs
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .unwrap_or(0))
}

/// `SET` (or `SET LOCAL`) statements carrying the server-side limits.
fn limit_settings(cfg: &DatabaseConfig, local: bool) -> String {
    let set = if local { "SET LOCAL" } else { "SET" };
    format!(
        "{set} statement_timeout = {}; {set} idle_in_transaction_session_timeout = {}",
        cfg.statement_timeout.get().as_millis(),
        cfg.idle_in_transaction_timeout.get().as_millis()
    )
}

type Pool = managed::Pool<PgManager>;

struct DbInner {
    pool: Pool,
    tracker: Arc<Tracker>,
    base_size: AtomicUsize,
    /// Configured hard maximum, and slots lent for force-closed guards still held.
    max_size: AtomicUsize,
    lent: AtomicUsize,
    checkout_wait: metrics::Histogram,
    checkout_timeouts: metrics::Counter,
    checkout_timeout: Duration,
    connect_timeout: Duration,
    query_timeout: Duration,
    capture_backtraces: bool,
    /// For cancel requests, which open a connection of their own.
    tls: tls::Connector,
    /// Behind a transaction pooler: unnamed statements only, limits SET LOCAL per
    /// transaction (this SQL).
    unnamed: bool,
    set_local: Option<String>,
    /// Where taskwarden's objects are; every statement is rewritten for it.
    schema: Schema,
}

/// The pool and its tracker. Cheap to clone; all clones share one pool.
#[derive(Clone)]
pub struct Db {
    inner: Arc<DbInner>,
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Db").field("pool", &self.status()).finish()
    }
}

/// Applies the per-connection settings every pooled connection carries.
pub fn session_settings(pg: &mut tokio_postgres::Config, cfg: &DatabaseConfig) {
    session_settings_via(pg, cfg, cfg.pooler);
}

/// [`session_settings`] for a connection that goes through `pooler` (which may differ
/// from `database.pooler`: `direct_url` bypasses it).
pub fn session_settings_via(pg: &mut tokio_postgres::Config, cfg: &DatabaseConfig, pooler: Pooler) {
    let keepalive = cfg.tcp_keepalive.get();
    pg.keepalives(!keepalive.is_zero());
    if !keepalive.is_zero() {
        pg.keepalives_idle(keepalive)
            .keepalives_interval((keepalive / 3).max(Duration::from_secs(1)))
            .keepalives_retries(3);
    }
    if !cfg.tcp_user_timeout.get().is_zero() {
        pg.tcp_user_timeout(cfg.tcp_user_timeout.get());
    }
    pg.application_name(&cfg.application_name)
        .connect_timeout(cfg.connect_timeout.get());
    // A pooler refuses startup options (pgbouncer: "unsupported startup parameter").
    if pooler == Pooler::None {
        let mut options = format!(
            "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
            cfg.statement_timeout.get().as_millis(),
            cfg.idle_in_transaction_timeout.get().as_millis()
        );
        // The same keepalives on the server's end: when the link freezes, our side
        // gives up at query_timeout, and the server's session (with whatever it holds:
        // an open transaction's locks, the migration's advisory lock) would otherwise
        // wait for the kernel's two hours. (Ignored on unix sockets.)
        if !keepalive.is_zero() {
            let idle = keepalive.as_secs().max(1);
            options.push_str(&format!(
                " -c tcp_keepalives_idle={idle} -c tcp_keepalives_interval={} \
                 -c tcp_keepalives_count=3",
                (idle / 3).max(1)
            ));
        }
        pg.options(options);
    }
}

/// Where a connection that needs a session of its own (LISTEN, the migration lock, the
/// supervisor's admin connection) goes: `direct_url` when set, straight to PostgreSQL;
/// else `pg` (the pool's target), through whatever pooler is there. With the TLS of that
/// target.
pub fn session_target(
    pg: &tokio_postgres::Config,
    cfg: &DatabaseConfig,
) -> Result<(tokio_postgres::Config, Pooler, tls::Tls), DbError> {
    if cfg.direct_url.trim().is_empty() {
        return Ok((pg.clone(), cfg.pooler, pool_tls(cfg)?));
    }
    let (direct, _) = target::parse_url(&cfg.direct_url)
        .map_err(|e| DbError::Config(format!("database.direct_url: {e}")))?;
    Ok((
        direct,
        Pooler::None,
        target::tls_for_url(&cfg.direct_url, cfg)?,
    ))
}

/// The TLS of the pool's target: `database.url` (or its env override) and the
/// `[database]` TLS keys.
pub fn pool_tls(cfg: &DatabaseConfig) -> Result<tls::Tls, DbError> {
    Ok(target::tls_for_url(&cfg.effective_url(), cfg)?)
}

/// Parses a connection URL, whatever libpq TLS parameters it carries (see [`tls`]).
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, DbError> {
    Ok(target::parse_url(url)?.0)
}

/// Whether notifications can be listened for: LISTEN needs a session that lasts, which a
/// transaction pooler does not give; `direct_url` does.
pub fn can_listen(cfg: &DatabaseConfig) -> bool {
    cfg.pooler != Pooler::Transaction || !cfg.direct_url.trim().is_empty()
}

impl Db {
    /// Builds the pool. No connection is opened until the first checkout.
    pub fn new(
        mut pg: tokio_postgres::Config,
        cfg: &DatabaseConfig,
        metrics: &Metrics,
    ) -> Result<Db, DbError> {
        session_settings(&mut pg, cfg);
        let tls = pool_tls(cfg)?;
        tls.apply(&mut pg);
        // sslmode=allow: a plaintext session first, an encrypted one if the server refuses.
        let encrypted = (tls.mode == tls::SslMode::Allow
            && pg.get_ssl_mode() == tokio_postgres::config::SslMode::Disable
            && pg
                .get_hosts()
                .iter()
                .any(|h| matches!(h, tokio_postgres::config::Host::Tcp(_))))
        .then(|| {
            let mut pg = pg.clone();
            pg.ssl_mode(tokio_postgres::config::SslMode::Require);
            deadpool_postgres::Manager::from_config(
                pg,
                tls.connector(),
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            )
        });
        let recycling_method = RecyclingMethod::Fast;
        let manager = PgManager {
            inner: deadpool_postgres::Manager::from_config(
                pg,
                tls.connector(),
                ManagerConfig { recycling_method },
            ),
            encrypted,
            on_connect: (cfg.pooler == Pooler::Session).then(|| limit_settings(cfg, false)),
            stable_backend: cfg.pooler != Pooler::Transaction,
            pre_ping: cfg.pre_ping,
            ping_idle_after: cfg.pre_ping_idle.get(),
        };
        let pool = Pool::builder(manager)
            .max_size(cfg.max_connections())
            .runtime(deadpool::Runtime::Tokio1)
            .timeouts(Timeouts {
                wait: Some(cfg.checkout_timeout.get()),
                create: Some(cfg.connect_timeout.get()),
                // A ping on a dead link must not eat the checkout: the connection is
                // dropped and the next one tried.
                recycle: Some(PING_LIMIT.min(cfg.checkout_timeout.get() / 2)),
            })
            .build()
            .map_err(|e| DbError::Config(e.to_string()))?;
        Ok(Db {
            inner: Arc::new(DbInner {
                pool,
                tracker: Arc::new(Tracker::new()),
                base_size: AtomicUsize::new(cfg.pool_size as usize),
                max_size: AtomicUsize::new(cfg.max_connections()),
                lent: AtomicUsize::new(0),
                checkout_wait: metrics.histogram(crate::metrics::DB_CHECKOUT_WAIT_SECONDS, &[]),
                checkout_timeouts: metrics.counter(crate::metrics::DB_CHECKOUT_TIMEOUTS_TOTAL, &[]),
                checkout_timeout: cfg.checkout_timeout.get(),
                connect_timeout: cfg.connect_timeout.get(),
                query_timeout: cfg.query_timeout.get(),
                capture_backtraces: cfg.capture_backtraces,
                tls: tls.connector(),
                unnamed: cfg.pooler == Pooler::Transaction,
                set_local: (cfg.pooler == Pooler::Transaction).then(|| limit_settings(cfg, true)),
                schema: Schema::new(&cfg.schema),
            }),
        })
    }

    /// The schema taskwarden's objects are in.
    pub fn schema(&self) -> &Schema {
        &self.inner.schema
    }

    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.inner.tracker
    }

    pub fn status(&self) -> PoolStatus {
        let s = self.inner.pool.status();
        PoolStatus {
            max: s.max_size,
            base: self.inner.base_size.load(Ordering::Relaxed),
            size: s.size,
            in_use: s.size.saturating_sub(s.available),
            idle: s.available,
            waiting: s.waiting,
        }
    }

    /// Checks out a session for `label`. The caller's source location is recorded.
    #[track_caller]
    pub fn session(
        &self,
        label: &'static str,
    ) -> impl Future<Output = Result<Session, DbError>> + Send + 'static {
        let caller = Location::caller();
        let db = self.clone();
        async move { db.checkout(label, caller, None, None).await }
    }

    /// Like [`Db::session`], but waits at most `wait` for a free connection (for readers
    /// that have a cheaper answer when the pool is busy, such as `/v1/status`).
    #[track_caller]
    pub fn session_within(
        &self,
        label: &'static str,
        wait: Duration,
    ) -> impl Future<Output = Result<Session, DbError>> + Send + 'static {
        let caller = Location::caller();
        let db = self.clone();
        async move { db.checkout(label, caller, None, Some(wait)).await }
    }

    /// Checks out a session that works for a task; the supervisor can cancel the task
    /// through `owner` when it force-closes the session.
    #[track_caller]
    pub fn session_for_task(
        &self,
        label: &'static str,
        owner: Owner,
    ) -> impl Future<Output = Result<Session, DbError>> + Send + 'static {
        let caller = Location::caller();
        let db = self.clone();
        async move { db.checkout(label, caller, Some(owner), None).await }
    }

    async fn checkout(
        &self,
        label: &'static str,
        caller: &'static Location<'static>,
        owner: Option<Owner>,
        wait: Option<Duration>,
    ) -> Result<Session, DbError> {
        let started = Instant::now();
        let mut timeouts = self.inner.pool.timeouts();
        if let Some(w) = wait {
            timeouts.wait = Some(w.min(self.inner.checkout_timeout));
        }
        // deadpool bounds the wait for a slot, each ping and each connect separately; this
        // bounds their sum, so several dead idle connections cannot add up.
        let hard_limit = timeouts
            .wait
            .unwrap_or(self.inner.checkout_timeout)
            .saturating_add(self.inner.connect_timeout);
        let got = tokio::time::timeout(hard_limit, self.inner.pool.timeout_get(&timeouts))
            .await
            .unwrap_or(Err(PoolError::Timeout(TimeoutType::Wait)));
        let obj = match got {
            Ok(obj) => obj,
            Err(PoolError::Timeout(TimeoutType::Create)) => {
                return Err(DbError::ConnectTimeout(self.inner.connect_timeout));
            }
            Err(PoolError::Timeout(_)) => {
                self.inner.checkout_timeouts.increment(1);
                let pool = self.status();
                tracing::warn!(caller = %caller, label, waited_ms = started.elapsed().as_millis() as u64, %pool, "database checkout timed out");
                return Err(DbError::CheckoutTimeout {
                    waited: wait.unwrap_or(self.inner.checkout_timeout),
                    label,
                    caller,
                    pool,
                });
            }
            Err(PoolError::Backend(e)) => return Err(DbError::Connect(e)),
            Err(PoolError::PostCreateHook(e)) => return Err(DbError::Config(e.to_string())),
            Err(PoolError::Closed) => return Err(DbError::PoolClosed),
            Err(PoolError::NoRuntimeSpecified) => return Err(DbError::Config("no runtime".into())),
        };
        self.inner
            .checkout_wait
            .record(started.elapsed().as_secs_f64());
        let info = self.inner.tracker.register(NewSession {
            caller,
            label,
            backend_pid: obj.backend_pid,
            owner,
            capture_backtrace: self.inner.capture_backtraces,
        });
        tracing::trace!(session_id = info.id, caller = %caller, label, backend_pid = obj.backend_pid, "session checked out");
        Ok(Session {
            obj: Some(obj),
            info,
            timeout: self.inner.query_timeout,
            unnamed: self.inner.unnamed,
            schema: self.inner.schema.clone(),
            db: self.clone(),
        })
    }

    /// Changes the pool's hard maximum and base size (live reload).
    pub fn resize(&self, cfg: &DatabaseConfig) {
        self.inner
            .base_size
            .store(cfg.pool_size as usize, Ordering::Relaxed);
        self.inner
            .max_size
            .store(cfg.max_connections(), Ordering::Relaxed);
        self.apply_size();
    }

    fn apply_size(&self) {
        let max =
            self.inner.max_size.load(Ordering::Relaxed) + self.inner.lent.load(Ordering::Relaxed);
        self.inner.pool.resize(max);
    }

    /// Lends the pool one extra slot for a force-closed guard whose holder has not let go
    /// (its backend is already terminated, so the server-side bound still holds). Capacity
    /// comes back at once; the slot is taken back when the guard drops.
    pub fn lend_capacity_for(&self, info: &SessionInfo) -> bool {
        if !info.mark_lent() {
            return false;
        }
        self.inner.lent.fetch_add(1, Ordering::Relaxed);
        self.apply_size();
        true
    }

    /// Slots currently lent for held force-closed guards.
    pub fn lent(&self) -> usize {
        self.inner.lent.load(Ordering::Relaxed)
    }

    /// Backend pids of idle pooled connections (not checked out).
    pub fn idle_backends(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        self.inner.pool.retain(|conn, _| {
            pids.push(conn.backend_pid);
            true
        });
        pids
    }

    /// Closes the pool: waiting and future checkouts fail, idle connections are closed,
    /// checked-out ones are closed when their guards drop.
    pub fn close(&self) {
        self.inner.pool.close();
    }

    /// Closes idle connections above `keep` (emergency cleanup); returns how many.
    pub fn close_idle(&self, keep: usize) -> usize {
        let mut kept = 0usize;
        let r = self.inner.pool.retain(|_, _| {
            kept += 1;
            kept <= keep
        });
        r.removed.len()
    }
}
