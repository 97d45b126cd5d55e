//! The server's catalogs as the watchdog reads them: sessions in `pg_stat_activity`
//! (taskwarden's orphans, its agents', every application's), the signals that end them,
//! the encryption of this instance's sessions (`pg_stat_ssl`), and the server's and roles'
//! connection limits. Every function takes any [`Query`] handle and returns typed rows;
//! what to do with them (the rules, the figures, the logs) is the supervisor's.
//!
//! A session of another role shows a NULL state, ages and `backend_start` unless this
//! role has `pg_read_all_stats`; and `pg_terminate_backend` (or `pg_cancel_backend`)
//! raises 42501 for a session this role may not signal, failing the whole statement. So
//! every statement that signals an application's sessions asks [`MAY_SIGNAL`] first and
//! answers NULL where it may not; the pool's own backends (`terminate_listed`) are ours to
//! end, and `terminate_backends` is given only pids its caller found signalable.

use std::collections::BTreeMap;

use crate::db::{DbError, Query};

/// Whether this role may signal the row's backend (over `pg_stat_activity`'s `usesysid`):
/// its own role's (or a member's), or any with `pg_signal_backend`, and a superuser's only
/// as a superuser. It asks for the role's privileges (`USAGE`: membership that inherits),
/// as the server's own check does; a NOINHERIT membership is not enough.
const MAY_SIGNAL: &str = "coalesce((pg_has_role(usesysid, 'USAGE') OR pg_has_role('pg_signal_backend', 'USAGE')) \
     AND (NOT coalesce((SELECT r.rolsuper FROM pg_roles r WHERE r.oid = usesysid), false) \
          OR (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user)), false)";

/// A client session, as `pg_stat_activity` shows it to any role: another role's sessions
/// have a NULL `backend_type` (and state, ages) unless this role has `pg_read_all_stats`,
/// so a row with a role and no type counts as a client too.
macro_rules! client {
    () => {
        "(backend_type = 'client backend' OR (backend_type IS NULL AND usesysid IS NOT NULL))"
    };
}

/// A backend with taskwarden's `application_name` that looked orphaned, and what
/// [`terminate_orphans`] did to it.
#[derive(Debug, Clone, PartialEq)]
pub struct OrphanBackend {
    pub pid: i32,
    pub state: Option<String>,
    /// Whether `pg_terminate_backend` signalled it; None: this role may not signal it.
    pub terminated: Option<bool>,
    pub role: String,
}

/// Terminates the backends in this database named `application_name` that none of
/// `accounted` (backends behind live guards and idle pooled connections) is, and that sit
/// idle in a transaction for more than `grace_seconds` or unchanged for more than
/// `max_age_seconds`. One statement; this connection's own backend is never listed.
pub async fn terminate_orphans(
    q: &impl Query,
    application_name: &str,
    accounted: &[i32],
    grace_seconds: f64,
    max_age_seconds: f64,
) -> Result<Vec<OrphanBackend>, DbError> {
    let rows = q
        .query(
            &format!(
                "SELECT pid, state, CASE WHEN {MAY_SIGNAL} THEN pg_terminate_backend(pid) END, \
                    coalesce(usename::text, '') \
                 FROM pg_stat_activity \
                 WHERE application_name = $1 AND datname = current_database() \
                   AND pid <> pg_backend_pid() AND NOT (pid = ANY($2)) \
                   AND ((state IN ('idle in transaction', 'idle in transaction (aborted)') \
                         AND state_change < now() - make_interval(secs => $3)) \
                     OR state_change < now() - make_interval(secs => $4))"
            ),
            &[
                &application_name,
                &accounted,
                &grace_seconds,
                &max_age_seconds,
            ],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(OrphanBackend {
                pid: r.try_get(0)?,
                state: r.try_get(1)?,
                terminated: r.try_get(2)?,
                role: r.try_get(3)?,
            })
        })
        .collect()
}

/// Terminates those of `pids` that `pg_stat_activity` lists; how many were signalled.
pub async fn terminate_listed(q: &impl Query, pids: &[i32]) -> Result<usize, DbError> {
    let rows = q
        .query(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY($1)",
            &[&pids],
        )
        .await?;
    let mut n = 0;
    for r in &rows {
        if r.try_get::<_, bool>(1)? {
            n += 1;
        }
    }
    Ok(n)
}

/// Terminates each of `pids` (whose signalling the caller has checked); how many were
/// signalled.
pub async fn terminate_backends(q: &impl Query, pids: &[i32]) -> Result<i64, DbError> {
    let row = q
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(p)) FROM unnest($1::int4[]) AS p",
            &[&pids],
        )
        .await?;
    Ok(row.try_get(0)?)
}

/// One session in this database whose `application_name` begins with an agent prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSessionRow {
    pub pid: i32,
    pub application_name: String,
    pub idle_in_transaction: bool,
    /// Since `backend_start`, and since `state_change`; 0 where this role may not see them.
    pub age_seconds: f64,
    pub state_seconds: f64,
    /// Its state and ages are visible to this role (its own, or `pg_read_all_stats`).
    pub visible: bool,
    /// This role may end it ([`MAY_SIGNAL`]).
    pub signalable: bool,
    pub role: String,
}

/// The sessions in this database (but this connection's) whose `application_name` begins
/// with `prefix`.
pub async fn agent_sessions(q: &impl Query, prefix: &str) -> Result<Vec<AgentSessionRow>, DbError> {
    // backend_start is NULL exactly when the row is another role's and this one lacks
    // pg_read_all_stats.
    let rows = q
        .query(
            &format!(
                "SELECT pid, application_name, coalesce(state, '') = 'idle in transaction', \
                   coalesce(extract(epoch FROM now() - backend_start)::float8, 0), \
                   coalesce(extract(epoch FROM now() - state_change)::float8, 0), \
                   backend_start IS NOT NULL, {MAY_SIGNAL}, coalesce(usename::text, '') \
                 FROM pg_stat_activity WHERE left(application_name, length($1)) = $1 \
                   AND datname = current_database() AND pid <> pg_backend_pid()"
            ),
            &[&prefix],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(AgentSessionRow {
                pid: r.try_get(0)?,
                application_name: r.try_get(1)?,
                idle_in_transaction: r.try_get(2)?,
                age_seconds: r.try_get(3)?,
                state_seconds: r.try_get(4)?,
                visible: r.try_get(5)?,
                signalable: r.try_get(6)?,
                role: r.try_get(7)?,
            })
        })
        .collect()
}

/// This instance's sessions as `pg_stat_ssl` sees them.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionEncryption {
    /// Sessions in this database named `application_name` or `application_name:…`.
    pub sessions: i64,
    pub encrypted: i64,
    /// TLS version and cipher of one encrypted session, when there is one.
    pub version: Option<String>,
    pub cipher: Option<String>,
}

/// Reads how many of the sessions named `application_name` (the pool's) or
/// `application_name:…` (the direct connections') are encrypted.
pub async fn encryption(
    q: &impl Query,
    application_name: &str,
) -> Result<SessionEncryption, DbError> {
    let row = q
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl), \
                    max(s.version) FILTER (WHERE s.ssl), max(s.cipher) FILTER (WHERE s.ssl) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid \
             WHERE a.datname = current_database() \
               AND (a.application_name = $1 OR starts_with(a.application_name, $1 || ':'))",
            &[&application_name],
        )
        .await?;
    Ok(SessionEncryption {
        sessions: row.try_get(0)?,
        encrypted: row.try_get(1)?,
        version: row.try_get(2)?,
        cipher: row.try_get(3)?,
    })
}

/// One client session of the server (any database), as `pg_stat_activity` shows it to
/// this role. Names and the query are as the server holds them: input, which the caller
/// makes printable before it logs them.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientSession {
    pub pid: i32,
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub client_addr: Option<String>,
    pub state: Option<String>,
    /// Epoch seconds of `backend_start` (0 where not visible), `state_change`,
    /// `query_start`: what [`signal_sessions`] compares, so it acts only on the session
    /// seen.
    pub started: f64,
    pub state_since: Option<f64>,
    pub query_since: Option<f64>,
    /// Seconds since `backend_start` (0 where not visible), `state_change`, `query_start`,
    /// by the server's clock.
    pub age: f64,
    pub state_age: Option<f64>,
    pub query_age: Option<f64>,
    /// The first 200 characters of its current or last query.
    pub query: String,
}

/// Every client session of the server but this connection's own.
pub async fn client_sessions(q: &impl Query) -> Result<Vec<ClientSession>, DbError> {
    const SQL: &str = concat!(
        "SELECT pid, coalesce(usename::text, '') AS usename, \
            coalesce(datname::text, '') AS datname, coalesce(application_name, '') AS app, \
            host(client_addr) AS client_addr, state, \
            extract(epoch FROM backend_start)::float8 AS started, \
            extract(epoch FROM state_change)::float8 AS state_since, \
            extract(epoch FROM query_start)::float8 AS query_since, \
            coalesce(extract(epoch FROM now() - backend_start)::float8, 0) AS age, \
            extract(epoch FROM now() - state_change)::float8 AS state_age, \
            extract(epoch FROM now() - query_start)::float8 AS query_age, \
            coalesce(left(query, 200), '') AS query \
         FROM pg_stat_activity WHERE ",
        client!(),
        " AND pid <> pg_backend_pid()"
    );
    let rows = q.query(SQL, &[]).await?;
    rows.iter()
        .map(|r| {
            Ok(ClientSession {
                pid: r.try_get("pid")?,
                user: r.try_get("usename")?,
                database: r.try_get("datname")?,
                application_name: r.try_get("app")?,
                client_addr: r.try_get("client_addr")?,
                state: r.try_get("state")?,
                started: r.try_get::<_, Option<f64>>("started")?.unwrap_or_default(),
                state_since: r.try_get("state_since")?,
                query_since: r.try_get("query_since")?,
                age: r.try_get("age")?,
                state_age: r.try_get("state_age")?,
                query_age: r.try_get("query_age")?,
                query: r.try_get("query")?,
            })
        })
        .collect()
}

/// A role with a connection limit (`rolconnlimit`), and its client connections.
#[derive(Debug, Clone, PartialEq)]
pub struct RoleUse {
    pub role: String,
    pub limit: i64,
    pub connections: i64,
}

/// The whole server's client connections against what it admits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerUse {
    /// Client connections by state: `active`, `idle`, `idle_in_transaction`, `unknown`
    /// (a state this role may not see); states with none are absent.
    pub by_state: BTreeMap<String, i64>,
    /// max_connections minus the reserved slots: what ordinary roles may open.
    pub max: i64,
    /// Roles with a connection limit, the fullest first, at most `roles_max`.
    pub roles: Vec<RoleUse>,
}

/// Reads the server's connection use (three statements, in this order).
pub async fn server_use(q: &impl Query, roles_max: usize) -> Result<ServerUse, DbError> {
    const BY_STATE: &str = concat!(
        "SELECT coalesce(CASE WHEN state LIKE 'idle in transaction%' \
            THEN 'idle_in_transaction' WHEN state = 'idle' THEN 'idle' \
            WHEN state IS NULL THEN 'unknown' ELSE 'active' END, 'unknown') AS state, \
            count(*) AS n \
         FROM pg_stat_activity WHERE ",
        client!(),
        " GROUP BY 1"
    );
    const MAX: &str = "SELECT current_setting('max_connections')::int8 \
            - current_setting('superuser_reserved_connections')::int8 \
            - coalesce(current_setting('reserved_connections', true)::int8, 0) AS max";
    const ROLES: &str = "SELECT r.rolname::text AS role, r.rolconnlimit::int8 AS lim, \
            count(a.pid) AS n \
         FROM pg_roles r LEFT JOIN pg_stat_activity a \
           ON a.usesysid = r.oid \
          AND (a.backend_type = 'client backend' OR a.backend_type IS NULL) \
         WHERE r.rolconnlimit >= 0 GROUP BY r.rolname, r.rolconnlimit \
         ORDER BY count(a.pid)::float8 / greatest(r.rolconnlimit, 1) DESC, 1 LIMIT $1";
    let mut by_state = BTreeMap::new();
    for r in q.query(BY_STATE, &[]).await? {
        by_state.insert(r.try_get("state")?, r.try_get("n")?);
    }
    let max = match q.query(MAX, &[]).await?.first() {
        Some(r) => r.try_get("max")?,
        None => 0,
    };
    let roles_max = i64::try_from(roles_max).unwrap_or(i64::MAX);
    let roles = q
        .query(ROLES, &[&roles_max])
        .await?
        .iter()
        .map(|r| {
            Ok(RoleUse {
                role: r.try_get("role")?,
                limit: r.try_get("lim")?,
                connections: r.try_get("n")?,
            })
        })
        .collect::<Result<_, DbError>>()?;
    Ok(ServerUse {
        by_state,
        max,
        roles,
    })
}

/// What [`signal_sessions`] does to a session, and what it re-checks first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Signal {
    /// Terminates it (still the session that started then).
    EndSession,
    /// Terminates it if it is still idle in the transaction it was idle in then.
    EndIdleTransaction,
    /// Cancels its query if it is still running the query that started then.
    CancelQuery,
}

impl Signal {
    const ALL: [Signal; 3] = [
        Signal::EndSession,
        Signal::EndIdleTransaction,
        Signal::CancelQuery,
    ];

    /// Its name in the statement.
    fn as_str(self) -> &'static str {
        match self {
            Signal::EndSession => "session",
            Signal::EndIdleTransaction => "idle_in_transaction",
            Signal::CancelQuery => "query",
        }
    }
}

/// One session to signal, as it was seen ([`ClientSession`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SignalRequest {
    pub pid: i32,
    /// [`ClientSession::started`].
    pub started: f64,
    pub signal: Signal,
    /// [`ClientSession::state_since`] for [`Signal::EndIdleTransaction`],
    /// [`ClientSession::query_since`] for [`Signal::CancelQuery`]; unused otherwise.
    pub since: f64,
}

/// A session [`signal_sessions`] found unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct Signalled {
    pub pid: i32,
    pub signal: Signal,
    /// Whether the signal went out; None: this role may not signal that session.
    pub done: Option<bool>,
    pub role: String,
}

/// Signals the sessions listed, in one statement, each only if it is still the one seen:
/// same pid and start, and for an idle transaction or a query, the same since-when. A
/// session that changed is not in the answer.
pub async fn signal_sessions(
    q: &impl Query,
    list: &[SignalRequest],
) -> Result<Vec<Signalled>, DbError> {
    let (session, idle, query) = (
        Signal::EndSession.as_str(),
        Signal::EndIdleTransaction.as_str(),
        Signal::CancelQuery.as_str(),
    );
    let sql = format!(
        "SELECT a.pid, t.kind, CASE WHEN {MAY_SIGNAL} THEN \
            CASE WHEN t.kind = '{query}' THEN pg_cancel_backend(a.pid) \
                 ELSE pg_terminate_backend(a.pid) END END AS done, \
            coalesce(a.usename::text, '') AS usename \
         FROM pg_stat_activity a \
         JOIN unnest($1::int4[], $2::float8[], $3::text[], $4::float8[]) \
           AS t(pid, started, kind, since) ON a.pid = t.pid \
         WHERE extract(epoch FROM a.backend_start)::float8 = t.started \
           AND (t.kind = '{session}' \
             OR (t.kind = '{idle}' AND a.state LIKE 'idle in transaction%' \
                 AND extract(epoch FROM a.state_change)::float8 = t.since) \
             OR (t.kind = '{query}' AND a.state = 'active' \
                 AND extract(epoch FROM a.query_start)::float8 = t.since))"
    );
    let pids: Vec<i32> = list.iter().map(|s| s.pid).collect();
    let started: Vec<f64> = list.iter().map(|s| s.started).collect();
    let kinds: Vec<&str> = list.iter().map(|s| s.signal.as_str()).collect();
    let since: Vec<f64> = list.iter().map(|s| s.since).collect();
    let rows = q.query(&sql, &[&pids, &started, &kinds, &since]).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let kind: String = r.try_get("kind")?;
        let Some(signal) = Signal::ALL.into_iter().find(|s| s.as_str() == kind) else {
            continue;
        };
        out.push(Signalled {
            pid: r.try_get("pid")?,
            signal,
            done: r.try_get("done")?,
            role: r.try_get("usename")?,
        });
    }
    Ok(out)
}
