//! The checks of `[database]` that need the connection code: URLs that parse as libpq's,
//! and TLS settings whose certificates can be read. `Config::load` knows nothing of them
//! (config sits below db); [`load_config`] is `Config::load` plus these, and is what the
//! daemon, its CLI and the reload use, so `check-config` and a refused SIGHUP name a
//! missing CA file by key like any other problem.

use std::path::Path;

use crate::config::{Config, ConfigError, ConfigIssue, DatabaseConfig};

/// The problems of `db`'s connection strings and TLS settings, by key.
pub fn check(db: &DatabaseConfig) -> Vec<ConfigIssue> {
    let mut out = Vec::new();
    for (key, url) in [
        ("database.url", &db.url),
        ("database.direct_url", &db.direct_url),
    ] {
        if url.is_empty() {
            continue;
        }
        let message = if let Err(e) = super::target::parse_url(url) {
            match e {
                // A PG* variable, not the URL, is what cannot be used.
                super::tls::TlsError::Environment(why) => format!("from the environment: {why}"),
                e => format!("not a PostgreSQL connection URL (postgresql://user@host/db): {e}"),
            }
        } else if let Err(e) = super::target::tls_for_url(url, db) {
            // Certificates are read now, so a missing CA file is found by check-config.
            e.to_string()
        } else {
            continue;
        };
        out.push(ConfigIssue {
            key: key.into(),
            message,
        });
    }
    out
}

/// [`Config::load`] and [`check`]: every problem of the file, the connection's included.
pub fn load_config(path: &Path) -> Result<Config, ConfigError> {
    match Config::load(path) {
        Ok(c) => {
            let issues = check(&c.database);
            if issues.is_empty() {
                Ok(c)
            } else {
                Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    issues,
                })
            }
        }
        // Other problems too: the connection's are reported with them when the
        // [database] section itself could be read.
        Err(ConfigError::Invalid { path, mut issues }) => {
            if let Some(db) = database_section(&path) {
                issues.extend(check(&db));
            }
            Err(ConfigError::Invalid { path, issues })
        }
        Err(e) => Err(e),
    }
}

fn database_section(path: &Path) -> Option<DatabaseConfig> {
    let text = std::fs::read_to_string(path).ok()?;
    let table: toml::Table = toml::from_str(&text).ok()?;
    match table.get("database") {
        Some(v) => v.clone().try_into().ok(),
        None => Some(DatabaseConfig::default()),
    }
}
