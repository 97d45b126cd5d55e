//! Database errors: typed, with SQLSTATE, message, detail and hint when the server sent
//! them, and whether a retry may succeed; and the client-side deadline of a round trip.

use super::PoolStatus;
use std::panic::Location;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(
        "no database connection free after waiting {waited:?} (checkout_timeout) for {label} at {caller}; pool {pool}"
    )]
    CheckoutTimeout {
        waited: Duration,
        label: &'static str,
        caller: &'static Location<'static>,
        pool: PoolStatus,
    },
    #[error("could not open a database connection within {0:?} (connect_timeout)")]
    ConnectTimeout(Duration),
    #[error("could not connect to the database: {}", describe_pg_error(.0))]
    Connect(#[source] tokio_postgres::Error),
    #[error("the connection pool is closed (shutting down)")]
    PoolClosed,
    #[error("{}", describe_pg_error(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error(
        "no answer from the database within {0:?} (query_timeout); the connection was discarded"
    )]
    Deadline(Duration),
    #[error("invalid database configuration: {0}")]
    Config(String),
    #[error("database TLS: {0}")]
    Tls(#[from] crate::db::tls::TlsError),
}

/// A PostgreSQL error as an operator wants it in a log line: SQLSTATE and message for a
/// server error, the cause chain for a client-side one (tokio-postgres' own Display says
/// only "db error").
pub fn describe_pg_error(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("database error {}: {}", db.code().code(), db.message());
    }
    let mut s = format!("database error: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(&format!(": {cause}"));
        src = cause.source();
    }
    s
}

/// Runs one round trip under the client-side deadline.
pub(crate) async fn with_deadline<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, DbError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(DbError::Deadline(limit)),
    }
}

impl DbError {
    /// SQLSTATE 55P03 (lock_not_available): the statement gave up waiting for a lock
    /// after `lock_timeout`; nothing is wrong with the link or the statement.
    pub fn is_lock_timeout(&self) -> bool {
        matches!(self, DbError::Query(e) if e.code().is_some_and(|c| c.code() == "55P03"))
    }

    /// Whether this error says the database could not be reached or answered (link down,
    /// server restarting, pool busy) rather than that the statement itself was refused:
    /// the same write may succeed later.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::CheckoutTimeout { .. }
            | DbError::ConnectTimeout(_)
            | DbError::Connect(_)
            | DbError::Deadline(_) => true,
            DbError::PoolClosed | DbError::Config(_) | DbError::Tls(_) => false,
            DbError::Query(e) => match e.code() {
                // No server error at all: the connection broke (I/O, closed).
                None => true,
                Some(code) => {
                    let c = code.code();
                    // 08: connection exception, 57P: operator intervention (shutdown,
                    // terminated), 53: insufficient resources, 40001/40P01: retryable, 57014/55P03:
                    // statement or lock time-out.
                    c.starts_with("08")
                        || c.starts_with("57P")
                        || c.starts_with("53")
                        || c == "40001"
                        || c == "40P01"
                        // A statement or lock time-out: something held a lock or the
                        // server was slow; the same statement may well pass later.
                        || c == "57014"
                        || c == "55P03"
                }
            },
        }
    }

    /// The SQLSTATE of a server-side error, if this is one.
    pub fn sqlstate(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            DbError::Query(e) | DbError::Connect(e) => e.code(),
            _ => None,
        }
    }
}
