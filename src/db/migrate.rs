//! Schema migrations: SQL files under `migrations/`, embedded in the binary (refinery's
//! `embed_migrations!`), applied by our own small runner into refinery's history table.
//!
//! Several daemons may start at once against one database, so migrations run in one
//! transaction under a transaction-scoped advisory lock: the first instance applies them,
//! the others wait, then find nothing to do. A transaction-scoped lock (not a session one)
//! is what works through a transaction pooler, where a session lock would stay behind on
//! whichever server connection took it.
//!
//! Every round trip is bounded: the lock is polled (`pg_try_advisory_xact_lock`, one short
//! transaction per poll, each under `query_timeout`) for at most [`LOCK_WAIT`], and the
//! whole run is bounded by `MIGRATION_RUN_FACTOR × query_timeout`, each statement by
//! `statement_timeout`.

use std::time::{Duration, Instant};

use crate::config::DatabaseConfig;
use crate::db::{DbError, DirectClient, connect_direct};

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
    #[error(
        "the database has migration version {0} applied, which this binary does not know (a newer taskwarden migrated it)"
    )]
    Unknown(i32),
    #[error("migration {0} differs from the one applied to the database (name or checksum)")]
    Divergent(String),
    #[error("migration {0} is not applied but the database is already at version {1}")]
    OutOfOrder(String, i32),
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
    let client = connect_direct(pg, cfg, "migrate").await?;
    let waited = Instant::now();
    let limit = client.deadline().saturating_mul(MIGRATION_RUN_FACTOR);
    loop {
        client.batch_execute("BEGIN").await?;
        let got: bool = client
            .query_one(
                "SELECT pg_try_advisory_xact_lock($1)",
                &[&MIGRATION_LOCK_KEY],
            )
            .await
            .map_err(MigrateError::Lock)?
            .get(0);
        if got {
            break;
        }
        client.batch_execute("ROLLBACK").await?;
        if waited.elapsed() > LOCK_WAIT {
            return Err(MigrateError::LockWait(LOCK_WAIT));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Dropping the client on any error below closes the connection, which rolls the
    // transaction back and releases the lock.
    let applied = tokio::time::timeout(limit, apply_pending(&client))
        .await
        .map_err(|_| MigrateError::RunDeadline(limit))??;
    client.batch_execute("COMMIT").await?;
    for m in &applied {
        tracing::info!(migration = %m, "migration applied");
    }
    Ok(MigrationReport {
        applied,
        latest: latest_version(),
    })
}

/// A migration as the history table records it.
struct Applied {
    version: i32,
    name: String,
    checksum: String,
}

/// Inside the locked transaction: checks the history against the embedded migrations
/// (a changed or unknown applied migration stops the run, as refinery would), then applies
/// what is missing in version order and records each one.
async fn apply_pending(client: &DirectClient) -> Result<Vec<String>, MigrateError> {
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {HISTORY_TABLE} (version INT4 PRIMARY KEY, \
             name VARCHAR(255), applied_on VARCHAR(255), checksum VARCHAR(255))"
        ))
        .await?;
    let history: Vec<Applied> = client
        .query(
            &format!("SELECT version, name, checksum FROM {HISTORY_TABLE} ORDER BY version"),
            &[],
        )
        .await?
        .iter()
        .map(|r| Applied {
            version: r.get(0),
            name: r.get::<_, Option<String>>(1).unwrap_or_default(),
            checksum: r.get::<_, Option<String>>(2).unwrap_or_default(),
        })
        .collect();
    let mut known = embedded::migrations::runner().get_migrations().to_vec();
    known.sort_by_key(|m| m.version());
    let pending = pending(&history, &known)?;
    let mut applied = Vec::new();
    for m in pending {
        let sql = m.sql().unwrap_or_default();
        client.batch_execute(sql).await?;
        let version = m.version() as i32;
        let name = m.name().to_string();
        let checksum = m.checksum().to_string();
        let applied_on = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        client
            .execute(
                &format!(
                    "INSERT INTO {HISTORY_TABLE} (version, name, applied_on, checksum) \
                     VALUES ($1, $2, $3, $4)"
                ),
                &[&version, &name, &applied_on, &checksum],
            )
            .await?;
        applied.push(m.to_string());
    }
    Ok(applied)
}

/// The embedded migrations still to apply, or why the database's history forbids it.
fn pending<'a>(
    history: &[Applied],
    known: &'a [refinery::Migration],
) -> Result<Vec<&'a refinery::Migration>, MigrateError> {
    for h in history {
        match known.iter().find(|m| m.version() as i32 == h.version) {
            None => return Err(MigrateError::Unknown(h.version)),
            Some(m) if m.name() != h.name || m.checksum().to_string() != h.checksum => {
                return Err(MigrateError::Divergent(m.to_string()));
            }
            Some(_) => {}
        }
    }
    let current = history.iter().map(|h| h.version).max().unwrap_or(-1);
    let mut out = Vec::new();
    for m in known {
        if history.iter().any(|h| h.version == m.version() as i32) {
            continue;
        }
        if (m.version() as i32) < current {
            return Err(MigrateError::OutOfOrder(m.to_string(), current));
        }
        out.push(m);
    }
    Ok(out)
}
