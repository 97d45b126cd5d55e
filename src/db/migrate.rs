//! Schema migrations (refinery, SQL files under `migrations/` embedded in the binary).
//!
//! Several daemons may start at once against one database, so migrations run under a
//! session-level advisory lock on a dedicated connection outside the pool: the first
//! instance applies them, the others wait, then find nothing to do.
//!
//! Every round trip is bounded: the lock is polled (`pg_try_advisory_lock`, each poll under
//! `query_timeout`) for at most [`LOCK_WAIT`], and the whole run is bounded by
//! `MIGRATION_RUN_FACTOR × query_timeout`, each statement by `statement_timeout`.

use std::time::{Duration, Instant};

use crate::config::DatabaseConfig;
use crate::db::{DbError, connect_direct};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Advisory-lock key for migrations: "twmigrat" as a big-endian i64.
const MIGRATION_LOCK_KEY: i64 = 0x7477_6d69_6772_6174;
/// How long an instance waits for another one's migrations before giving up.
pub const LOCK_WAIT: Duration = Duration::from_secs(300);
/// The whole run may take this many `query_timeout`s.
pub const MIGRATION_RUN_FACTOR: u32 = 20;
/// refinery's history table.
pub const HISTORY_TABLE: &str = "refinery_schema_history";

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("taking the migration lock failed: {0}")]
    Lock(#[source] DbError),
    #[error("another instance held the migration lock for more than {0:?}")]
    LockWait(Duration),
    #[error("migrations did not finish within {0:?}")]
    RunDeadline(Duration),
    #[error("migration failed: {0}")]
    Refinery(#[from] refinery::Error),
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub applied: Vec<String>,
    pub latest: i32,
}

/// The newest migration version this binary knows.
pub fn latest_version() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version() as i32)
        .max()
        .unwrap_or(0)
}

/// Applies pending migrations under the advisory lock.
pub async fn run(
    pg: &tokio_postgres::Config,
    cfg: &DatabaseConfig,
) -> Result<MigrationReport, MigrateError> {
    let mut client = connect_direct(pg, cfg, "migrate").await?;
    let waited = Instant::now();
    loop {
        let got: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await
            .map_err(MigrateError::Lock)?
            .get(0);
        if got {
            break;
        }
        if waited.elapsed() > LOCK_WAIT {
            return Err(MigrateError::LockWait(LOCK_WAIT));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let limit = client.deadline().saturating_mul(MIGRATION_RUN_FACTOR);
    let result = tokio::time::timeout(
        limit,
        embedded::migrations::runner()
            .set_abort_divergent(true)
            .run_async(client.raw_mut()),
    )
    .await;
    let Ok(result) = result else {
        // The connection (and with it the session lock) goes with the client.
        return Err(MigrateError::RunDeadline(limit));
    };
    // Unlock even if the run failed; dropping the connection would release it too.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let report = result?;
    let applied: Vec<String> = report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect();
    for m in &applied {
        tracing::info!(migration = %m, "migration applied");
    }
    Ok(MigrationReport {
        applied,
        latest: latest_version(),
    })
}
