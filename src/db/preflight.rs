//! Checks of the server made once at start, before migrating, that save an incident: a
//! server older than the oldest version taskwarden is tested against is refused (the SQL
//! and the watchdog's catalog reads are only known to hold from there), and a pool that
//! could take more connections than the server has left is warned about, naming both
//! figures, while there is still time to fix the config.

use crate::config::{DatabaseConfig, Pooler};
use crate::db::{DbError, DirectClient};

/// The oldest PostgreSQL major version the suite runs against (and the oldest one
/// PostgreSQL itself still supports).
pub const OLDEST_SERVER: i32 = 15;

/// Connections an instance opens besides its pool: the listener and the supervisor's
/// admin connection.
pub const OUTSIDE_POOL: i64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(
        "the server is PostgreSQL {0}, older than {OLDEST_SERVER}, the oldest version taskwarden is tested against: upgrade the server"
    )]
    TooOld(String),
}

/// What the server said of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFacts {
    pub version: String,
    pub version_num: i32,
    pub max_connections: i64,
    /// `superuser_reserved_connections` (unless this role is a superuser, which may use
    /// them) plus, from PostgreSQL 16, `reserved_connections`.
    pub reserved: i64,
    /// Client backends connected now besides this check's own (another role's count too:
    /// without `pg_read_all_stats` their `backend_type` reads NULL).
    pub in_use: i64,
}

const FACTS_SQL: &str = "SELECT current_setting('server_version'), \
       current_setting('server_version_num')::int4, \
       current_setting('max_connections')::int8, \
       CASE WHEN (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN 0 \
            ELSE current_setting('superuser_reserved_connections')::int8 END \
         + coalesce(current_setting('reserved_connections', true)::int8, 0), \
       (SELECT count(*) FROM pg_stat_activity \
         WHERE (backend_type = 'client backend' OR (backend_type IS NULL AND usesysid IS NOT NULL)) \
           AND pid <> pg_backend_pid())";

/// Reads the facts and applies the checks: `Err` for a server too old, a WARN (returned
/// too, for tests and `migrate`'s report) when the pool could outgrow what is left.
pub async fn check(
    client: &DirectClient,
    cfg: &DatabaseConfig,
) -> Result<(ServerFacts, Option<String>), PreflightError> {
    let r = client.query_one(FACTS_SQL, &[]).await?;
    let facts = ServerFacts {
        version: r.get(0),
        version_num: r.get(1),
        max_connections: r.get(2),
        reserved: r.get(3),
        in_use: r.get(4),
    };
    refuse_old(&facts)?;
    let warning = connections_warning(&facts, cfg);
    if let Some(w) = &warning {
        tracing::warn!(
            max_connections = facts.max_connections,
            reserved = facts.reserved,
            in_use = facts.in_use,
            instance_max = cfg.max_connections() as i64 + OUTSIDE_POOL,
            "{w}"
        );
    }
    Ok((facts, warning))
}

/// Refuses a server whose major version is below [`OLDEST_SERVER`].
pub fn refuse_old(f: &ServerFacts) -> Result<(), PreflightError> {
    if f.version_num / 10_000 < OLDEST_SERVER {
        return Err(PreflightError::TooOld(f.version.clone()));
    }
    Ok(())
}

/// The warning for a pool (plus the connections outside it) larger than what the server
/// has left for ordinary roles, or than what is free now. Behind a pooler the server's
/// limit is the pooler's business (its `default_pool_size`), so nothing is said.
pub fn connections_warning(f: &ServerFacts, cfg: &DatabaseConfig) -> Option<String> {
    if cfg.pooler != Pooler::None {
        return None;
    }
    let usable = f.max_connections.saturating_sub(f.reserved);
    let mine = cfg.max_connections() as i64 + OUTSIDE_POOL;
    if mine > usable {
        Some(format!(
            "this instance may open {mine} connections (database.pool_size {} + max_overflow {} + {OUTSIDE_POOL}) but the server allows {usable} (max_connections {} - {} reserved): lower the pool or raise max_connections, or checkouts will fail with 53300 under load",
            cfg.pool_size, cfg.max_overflow, f.max_connections, f.reserved
        ))
    } else if mine > usable.saturating_sub(f.in_use) {
        Some(format!(
            "this instance may open {mine} connections (database.pool_size {} + max_overflow {} + {OUTSIDE_POOL}) but only {} of the server's {usable} are free now ({} in use): under load its checkouts may fail with 53300",
            cfg.pool_size,
            cfg.max_overflow,
            usable.saturating_sub(f.in_use),
            f.in_use
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(max: i64, reserved: i64, in_use: i64) -> ServerFacts {
        ServerFacts {
            version: "15.8".into(),
            version_num: 150008,
            max_connections: max,
            reserved,
            in_use,
        }
    }

    #[test]
    fn servers_older_than_the_oldest_tested_are_refused() {
        let old = ServerFacts {
            version: "14.13 (Debian 14.13-1)".into(),
            version_num: 140013,
            ..facts(100, 3, 0)
        };
        let e = refuse_old(&old).unwrap_err().to_string();
        assert!(
            e.contains("PostgreSQL 14.13") && e.contains("older than 15"),
            "{e}"
        );
        assert!(refuse_old(&facts(100, 3, 0)).is_ok());
        let newer = ServerFacts {
            version_num: 170002,
            ..facts(100, 3, 0)
        };
        assert!(refuse_old(&newer).is_ok());
    }

    #[test]
    fn warns_when_the_pool_outgrows_the_server() {
        let cfg = DatabaseConfig::default(); // 20 + 10, so 32 with the two outside
        assert_eq!(connections_warning(&facts(100, 3, 10), &cfg), None);
        let w = connections_warning(&facts(30, 3, 1), &cfg).unwrap();
        assert!(w.contains("may open 32") && w.contains("allows 27"), "{w}");
        let w = connections_warning(&facts(100, 3, 80), &cfg).unwrap();
        assert!(w.contains("only 17") && w.contains("80 in use"), "{w}");
        let behind = DatabaseConfig {
            pooler: Pooler::Transaction,
            ..DatabaseConfig::default()
        };
        assert_eq!(connections_warning(&facts(30, 3, 1), &behind), None);
    }
}
