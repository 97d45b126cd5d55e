//! Schema migrations (refinery, SQL files under `migrations/` embedded in the binary).
//!
//! Several daemons may start at once against one database, so migrations run under a
//! session-level advisory lock on a dedicated connection outside the pool: the first
//! instance applies them, the others wait, then find nothing to do.

use crate::config::DatabaseConfig;
use crate::db::{DbError, connect_direct};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Advisory-lock key for migrations: "twmigrat" as a big-endian i64.
const MIGRATION_LOCK_KEY: i64 = 0x7477_6d69_6772_6174;
/// refinery's history table.
pub const HISTORY_TABLE: &str = "refinery_schema_history";

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("taking the migration lock failed: {0}")]
    Lock(#[source] tokio_postgres::Error),
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
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(MigrateError::Lock)?;
    let result = embedded::migrations::runner()
        .set_abort_divergent(true)
        .run_async(&mut client)
        .await;
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
