//! Log set-up: `tracing` events to stdout (journald picks them up under systemd), as
//! human-readable lines or JSON, with a level filter that SIGHUP can change live.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::{LogFormat, LoggingConfig};

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("invalid log filter {0:?}: {1}")]
    Filter(String, String),
    #[error("a global logger is already installed")]
    AlreadyInstalled,
    #[error("cannot change the log filter: {0}")]
    Reload(String),
}

/// Changes the level filter of the installed logger.
#[derive(Clone)]
pub struct LogHandle {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl LogHandle {
    pub fn set_level(&self, level: &str) -> Result<(), LoggingError> {
        let filter = EnvFilter::try_new(level)
            .map_err(|e| LoggingError::Filter(level.into(), e.to_string()))?;
        self.handle
            .reload(filter)
            .map_err(|e| LoggingError::Reload(e.to_string()))
    }
}

/// Installs the global logger. `RUST_LOG`, when set, wins over the configured level.
pub fn init(cfg: &LoggingConfig) -> Result<LogHandle, LoggingError> {
    let level = std::env::var("RUST_LOG").unwrap_or_else(|_| cfg.level.clone());
    let filter = EnvFilter::try_new(&level)
        .map_err(|e| LoggingError::Filter(level.clone(), e.to_string()))?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match cfg.format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_writer(std::io::stdout),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stdout().is_terminal())
                    .with_writer(std::io::stdout),
            )
            .try_init(),
    };
    result.map_err(|_| LoggingError::AlreadyInstalled)?;
    Ok(LogHandle { handle })
}
