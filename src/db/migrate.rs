//! Schema migrations: SQL files under `migrations/`, embedded in the binary (refinery's
//! `embed_migrations!`), applied by our own small runner into refinery's history table.
//!
//! Several daemons may start at once against one database, so migrations run in one
//! transaction under a transaction-scoped advisory lock: the first instance applies them,
//! the others wait, then find nothing to do. A transaction-scoped lock (not a session one)
//! is what works through a transaction pooler, where a session lock would stay behind on
//! whichever server connection took it.
//!
//! Everything is created in the configured schema (`database.schema`): the runner creates
//! the schema when it is missing (so a role with only `CREATE ON DATABASE` can install),
//! applies each file with `search_path` set to it (the files name no schema), and keeps its
//! history there. An installation made before v8, with its tables in `public`, is moved
//! into the schema in place first (tables with their rows, indexes, sequences and
//! trigger; see [`move_from_public`]).
//!
//! Every round trip is bounded: the lock is polled (`pg_try_advisory_xact_lock`, one short
//! transaction per poll, each under `query_timeout`) for at most [`LOCK_WAIT`], and the
//! whole run is bounded by `MIGRATION_RUN_FACTOR × query_timeout`, each statement by
//! `statement_timeout`.

use std::time::{Duration, Instant};

use crate::config::DatabaseConfig;
use crate::db::{DbError, DirectClient, Schema, connect_direct};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Advisory-lock key for migrations: "twmigrat" as a big-endian i64 (the default
/// schema's; another schema's is derived from it, see [`lock_key`]).
const MIGRATION_LOCK_KEY: i64 = 0x7477_6d69_6772_6174;

/// The migration lock of `schema`: deployments in other schemas of the same database
/// migrate without waiting for each other. The default schema keeps the key of earlier
/// versions, so an older instance starting meanwhile still waits its turn.
fn lock_key(schema: &Schema) -> i64 {
    if schema.name() == crate::db::schema::DEFAULT {
        return MIGRATION_LOCK_KEY;
    }
    // FNV-1a: stable across builds and platforms (std's hasher is not).
    let h = schema
        .name()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    MIGRATION_LOCK_KEY ^ (h as i64)
}
/// How long an instance waits for another one's migrations before giving up.
pub const LOCK_WAIT: Duration = Duration::from_secs(300);
/// The whole run may take this many `query_timeout`s.
pub const MIGRATION_RUN_FACTOR: u32 = 20;
/// refinery's history table, in the configured schema.
pub const HISTORY_TABLE: &str = "refinery_schema_history";

/// The tables of an installation made before v8 (each present from the version that
/// created it), moved from `public` into the schema.
const LEGACY_TABLES: [&str; 10] = [
    "objectives",
    "tasks",
    "task_events",
    "instances",
    "leader",
    "enqueue_defaults",
    "paused_agents",
    "schedules",
    "rate_windows",
    HISTORY_TABLE,
];
/// The argument list of the SQL enqueue functions (V4, V8).
const ENQUEUE_ARGS: &str = "text, jsonb, integer, integer, timestamptz, text, text, interval, text";

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Preflight(#[from] crate::db::preflight::PreflightError),
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
    #[error(
        "cannot create schema {schema}: {source}; grant the role CREATE ON DATABASE, or create the schema for it (CREATE SCHEMA {schema} AUTHORIZATION <role>), see docs/managed-postgres.md"
    )]
    CreateSchema {
        schema: String,
        #[source]
        source: DbError,
    },
    #[error(
        "schema {schema} exists (owned by {owner}) but role {role} may not use it: ALTER SCHEMA {schema} OWNER TO {role}, or GRANT USAGE, CREATE ON SCHEMA {schema} TO {role}"
    )]
    SchemaPrivileges {
        schema: String,
        role: String,
        owner: String,
    },
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub applied: Vec<String>,
    pub latest: i32,
    /// The tables were found in `public` (an installation made before v8) and moved.
    pub moved_from_public: bool,
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

/// A migration this binary carries, as the history table records it.
#[derive(Debug, Clone)]
pub struct Known {
    pub version: i32,
    pub name: String,
    pub checksum: String,
    pub sql: String,
}

/// Every migration this binary carries, in version order (what `migrate` would apply to
/// an empty database; tests rebuild an older installation from it).
pub fn known() -> Vec<Known> {
    let mut out: Vec<Known> = embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| Known {
            version: m.version() as i32,
            name: m.name().to_string(),
            checksum: m.checksum().to_string(),
            sql: m.sql().unwrap_or_default().to_string(),
        })
        .collect();
    out.sort_by_key(|k| k.version);
    out
}

/// Applies pending migrations under the advisory lock.
pub async fn run(
    pg: &tokio_postgres::Config,
    cfg: &DatabaseConfig,
) -> Result<MigrationReport, MigrateError> {
    let client = connect_direct(pg, cfg, "migrate").await?;
    crate::db::preflight::check(&client, cfg).await?;
    let waited = Instant::now();
    let limit = client.deadline().saturating_mul(MIGRATION_RUN_FACTOR);
    loop {
        client.batch_execute("BEGIN").await?;
        let got: bool = client
            .query_one(
                "SELECT pg_try_advisory_xact_lock($1)",
                &[&lock_key(client.schema())],
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
    let (applied, moved_from_public) = tokio::time::timeout(limit, apply_locked(&client))
        .await
        .map_err(|_| MigrateError::RunDeadline(limit))??;
    client.batch_execute("COMMIT").await?;
    if moved_from_public {
        tracing::warn!(
            schema = client.schema().name(),
            "taskwarden's tables were in public (an installation made before v8): moved into the schema; public.taskwarden_enqueue and taskwarden_enqueue_detailed now call the schema's enqueue functions and will be removed in a later release"
        );
    }
    for m in &applied {
        tracing::info!(migration = %m, "migration applied");
    }
    Ok(MigrationReport {
        applied,
        latest: latest_version(),
        moved_from_public,
    })
}

/// Inside the locked transaction: the schema, the move from `public`, then the files.
async fn apply_locked(client: &DirectClient) -> Result<(Vec<String>, bool), MigrateError> {
    let schema = client.schema().clone();
    ensure_schema(client, &schema).await?;
    let moved = move_from_public(client, &schema).await?;
    // The files name no schema: what they create lands in ours. LOCAL: it ends with the
    // transaction, so a pooled server session is left as it was found.
    client
        .batch_execute(&format!(
            "SET LOCAL search_path TO {}, pg_temp",
            schema.name()
        ))
        .await?;
    let applied = apply_pending(client).await?;
    if let Some(moved) = &moved {
        legacy_wrappers(client, &schema, moved).await?;
    }
    Ok((applied, moved.is_some()))
}

/// Creates the schema when it does not exist. Checked first because `CREATE SCHEMA IF NOT
/// EXISTS` needs CREATE on the database even when the schema is there (a role given a
/// ready-made schema has no such right, and needs none).
async fn ensure_schema(client: &DirectClient, schema: &Schema) -> Result<(), MigrateError> {
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema.name()],
        )
        .await?
        .get(0);
    if !exists {
        // A failed statement aborts the transaction; a savepoint would not help, the
        // run stops here anyway.
        client
            .batch_execute(&format!("CREATE SCHEMA {}", schema.name()))
            .await
            .map_err(|source| MigrateError::CreateSchema {
                schema: schema.name().to_string(),
                source,
            })?;
        return Ok(());
    }
    // Someone else's schema: say which grant is missing, not a bare 42501 later.
    let r = client
        .query_one(
            "SELECT has_schema_privilege($1, 'USAGE'), has_schema_privilege($1, 'CREATE'), \
                    current_user::text, pg_get_userbyid(nspowner)::text \
             FROM pg_namespace WHERE nspname = $1",
            &[&schema.name()],
        )
        .await?;
    let (usage, create): (bool, bool) = (r.get(0), r.get(1));
    if !(usage && create) {
        return Err(MigrateError::SchemaPrivileges {
            schema: schema.name().to_string(),
            role: r.get(2),
            owner: r.get(3),
        });
    }
    Ok(())
}

/// What the move from `public` found, for the wrappers written after the files ran.
struct Moved {
    /// `public.taskwarden_enqueue*` existed (V4 had been applied): callers may use them.
    had_enqueue: bool,
    /// Roles (quoted, or PUBLIC) that held a privilege on a moved table.
    grantees: Vec<String>,
    /// Of those, the ones that could insert tasks (and so could enqueue).
    enqueuers: Vec<String>,
}

/// Moves an installation made before v8 from `public` into the schema, in place: `ALTER
/// TABLE ... SET SCHEMA` carries rows, indexes, constraints, owned sequences and the
/// trigger, and takes no copy. Only when the schema has no history of its own yet and
/// `public`'s history is taskwarden's (its V1 has our name and checksum), so an
/// application's own `public.tasks` is never taken. Roles that had privileges on the old
/// tables keep reaching them (USAGE on the schema, EXECUTE on the enqueue functions for
/// those that could insert tasks).
async fn move_from_public(
    client: &DirectClient,
    schema: &Schema,
) -> Result<Option<Moved>, MigrateError> {
    let ours_already: bool = client
        .query_one(
            "SELECT to_regclass(format('%I.%I', $1::text, $2::text)) IS NOT NULL",
            &[&schema.name(), &HISTORY_TABLE],
        )
        .await?
        .get(0);
    if ours_already {
        return Ok(None);
    }
    // Looked up by name first: naming a missing table fails the statement, and with it
    // the transaction.
    let legacy: bool = client
        .query_one(
            "SELECT to_regclass('public.refinery_schema_history') IS NOT NULL \
                    AND to_regclass('public.tasks') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !legacy {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT name::text, checksum::text FROM public.refinery_schema_history WHERE version = 1",
            &[],
        )
        .await?;
    let Some(row) = rows.into_iter().next() else {
        return Ok(None);
    };
    let known = embedded::migrations::runner().get_migrations().to_vec();
    let ours = known.iter().any(|m| {
        m.version() == 1
            && row.get::<_, Option<String>>(0).as_deref() == Some(m.name())
            && row.get::<_, Option<String>>(1) == Some(m.checksum().to_string())
    });
    if !ours {
        return Ok(None);
    }
    let present: Vec<String> = client
        .query(
            "SELECT t FROM unnest($1::text[]) t WHERE to_regclass('public.' || t) IS NOT NULL",
            &[&LEGACY_TABLES.to_vec()],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let grants = client
        .query(
            "SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END, \
                    bool_or(c.relname = 'tasks' AND a.privilege_type = 'INSERT') \
             FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a \
             LEFT JOIN pg_roles r ON r.oid = a.grantee \
             WHERE c.relnamespace = 'public'::regnamespace AND c.relname = ANY($1) \
               AND a.grantee <> c.relowner \
             GROUP BY 1",
            &[&present],
        )
        .await?;
    let grantees: Vec<String> = grants.iter().map(|r| r.get(0)).collect();
    let enqueuers: Vec<String> = grants
        .iter()
        .filter(|r| r.get::<_, bool>(1))
        .map(|r| r.get(0))
        .collect();
    for t in &present {
        client
            .batch_execute(&format!(
                "ALTER TABLE public.{t} SET SCHEMA {}",
                schema.name()
            ))
            .await?;
    }
    let fns: (bool, bool) = {
        let r = client
            .query_one(
                &format!(
                    "SELECT to_regprocedure('public.taskwarden_notify_tasks()') IS NOT NULL, \
                            to_regprocedure('public.taskwarden_enqueue_detailed({ENQUEUE_ARGS})') IS NOT NULL"
                ),
                &[],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    if fns.0 {
        client
            .batch_execute(&format!(
                "ALTER FUNCTION public.taskwarden_notify_tasks() SET SCHEMA {}",
                schema.name()
            ))
            .await?;
    }
    Ok(Some(Moved {
        had_enqueue: fns.1,
        grantees,
        enqueuers,
    }))
}

/// After the files ran on a moved installation: the old enqueue names in `public` call
/// the schema's functions (replaced in place, so their grants stay), and the roles that
/// used the old tables are granted what reaches the new ones.
async fn legacy_wrappers(
    client: &DirectClient,
    schema: &Schema,
    moved: &Moved,
) -> Result<(), MigrateError> {
    let s = schema.name();
    if moved.had_enqueue {
        client
            .batch_execute(&format!(
                "CREATE OR REPLACE FUNCTION public.taskwarden_enqueue_detailed(
                    agent text, payload jsonb DEFAULT '{{}}', priority integer DEFAULT 0,
                    max_attempts integer DEFAULT NULL, run_after timestamptz DEFAULT now(),
                    unique_key text DEFAULT NULL, unique_scope text DEFAULT NULL,
                    unique_for interval DEFAULT NULL, session_id text DEFAULT NULL)
                 RETURNS TABLE (task_id bigint, duplicate boolean)
                 LANGUAGE sql VOLATILE
                 AS $fn$ SELECT * FROM {s}.enqueue_detailed($1, $2, $3, $4, $5, $6, $7, $8, $9) $fn$;
                 COMMENT ON FUNCTION public.taskwarden_enqueue_detailed({ENQUEUE_ARGS}) IS
                    'Deprecated: call {s}.enqueue_detailed. Kept for one release after the move from public.';
                 CREATE OR REPLACE FUNCTION public.taskwarden_enqueue(
                    agent text, payload jsonb DEFAULT '{{}}', priority integer DEFAULT 0,
                    max_attempts integer DEFAULT NULL, run_after timestamptz DEFAULT now(),
                    unique_key text DEFAULT NULL, unique_scope text DEFAULT NULL,
                    unique_for interval DEFAULT NULL, session_id text DEFAULT NULL)
                 RETURNS bigint
                 LANGUAGE sql VOLATILE
                 AS $fn$ SELECT {s}.enqueue($1, $2, $3, $4, $5, $6, $7, $8, $9) $fn$;
                 COMMENT ON FUNCTION public.taskwarden_enqueue({ENQUEUE_ARGS}) IS
                    'Deprecated: call {s}.enqueue. Kept for one release after the move from public.';"
            ))
            .await?;
    }
    for g in &moved.grantees {
        client
            .batch_execute(&format!("GRANT USAGE ON SCHEMA {s} TO {g}"))
            .await?;
    }
    for g in &moved.enqueuers {
        client
            .batch_execute(&format!(
                "GRANT EXECUTE ON FUNCTION {s}.enqueue({ENQUEUE_ARGS}), \
                 {s}.enqueue_detailed({ENQUEUE_ARGS}) TO {g}"
            ))
            .await?;
    }
    Ok(())
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
            "CREATE TABLE IF NOT EXISTS taskwarden.{HISTORY_TABLE} (version INT4 PRIMARY KEY, \
             name VARCHAR(255), applied_on VARCHAR(255), checksum VARCHAR(255))"
        ))
        .await?;
    let history: Vec<Applied> = client
        .query(
            &format!(
                "SELECT version, name, checksum FROM taskwarden.{HISTORY_TABLE} ORDER BY version"
            ),
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
                    "INSERT INTO taskwarden.{HISTORY_TABLE} (version, name, applied_on, checksum) \
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
