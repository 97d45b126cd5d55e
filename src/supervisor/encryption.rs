//! Whether this instance's database sessions are encrypted, as the server sees them
//! (`pg_stat_ssl`): what `/v1/status` and `taskwarden status` show beside the `sslmode` in
//! force, so "TLS is on" is a reading, not a belief.

use super::Supervisor;
use super::SupervisorError;
use crate::config::Config;
use crate::metrics as m;
use crate::store::activity;

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
        let seen = activity::encryption(admin, &app).await?;
        let seen = Encryption {
            sslmode,
            sessions: seen.sessions,
            encrypted: seen.encrypted,
            version: seen.version,
            cipher: seen.cipher,
        };
        self.metrics
            .gauge(m::DB_SESSIONS_ENCRYPTED, &[])
            .set(seen.encrypted as f64);
        self.liveness.set_encryption(seen);
        Ok(())
    }
}
