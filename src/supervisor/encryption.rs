//! Whether this instance's database sessions are encrypted, as the server sees them
//! (`pg_stat_ssl`): what `/v1/status` and `taskwarden status` show beside the `sslmode` in
//! force, so "TLS is on" is a reading, not a belief.

use super::Supervisor;
use super::SupervisorError;
use crate::config::Config;
use crate::metrics as m;

/// The last reading.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Encryption {
    /// `database.sslmode` in force (a URL's own `sslmode=` wins).
    pub sslmode: String,
    /// This instance's sessions the server lists (pool, listener, supervisor), and how
    /// many of them are encrypted.
    pub sessions: i64,
    pub encrypted: i64,
    /// TLS version and cipher of one encrypted session, when there is one.
    pub version: Option<String>,
    pub cipher: Option<String>,
}

impl Supervisor {
    pub(super) async fn check_encryption(&mut self, cfg: &Config) -> Result<(), SupervisorError> {
        // The mode only: building the connector would read the certificates every tick.
        let sslmode = crate::db::target::mode_for_url(&cfg.database.effective_url(), &cfg.database)
            .map(|m| m.as_str().to_string())
            .unwrap_or_else(|e| format!("invalid: {e}"));
        let app = self.application_name.clone();
        let admin = self.admin().await?;
        let row = admin
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE s.ssl), \
                        max(s.version) FILTER (WHERE s.ssl), max(s.cipher) FILTER (WHERE s.ssl) \
                 FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid \
                 WHERE a.datname = current_database() \
                   AND (a.application_name = $1 OR starts_with(a.application_name, $1 || ':'))",
                &[&app],
            )
            .await?;
        let seen = Encryption {
            sslmode,
            sessions: row.get(0),
            encrypted: row.get(1),
            version: row.get(2),
            cipher: row.get(3),
        };
        self.metrics
            .gauge(m::DB_SESSIONS_ENCRYPTED, &[])
            .set(seen.encrypted as f64);
        self.heartbeat.set_encryption(seen);
        Ok(())
    }
}
