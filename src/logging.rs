//! Log set-up: `tracing` events to stdout (journald picks them up under systemd), as
//! human-readable lines or JSON, with a level filter that SIGHUP can change live.
//!
//! JSON lines are flat (`{"timestamp","level","target","message",<fields>…}`), the shape
//! Loki, Elastic and Datadog parse without a pipeline. When stdout is the journal's stream
//! (`JOURNAL_STREAM` names it), each line starts with its syslog priority (`<3>` error,
//! `<4>` warning, `<6>` info, `<7>` debug), which journald strips and records, so
//! `journalctl -u taskwarden -p warning` shows exactly the warnings and errors.

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

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
    let journal = stdout_is_journal();
    let result = match cfg.format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(Prefixed {
                        inner: tracing_subscriber::fmt::format()
                            .json()
                            .flatten_event(true)
                            .with_current_span(false)
                            .with_span_list(false),
                        journal,
                    })
                    .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                    .with_writer(std::io::stdout),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(Prefixed {
                        inner: tracing_subscriber::fmt::format()
                            .with_ansi(!journal && std::io::stdout().is_terminal()),
                        journal,
                    })
                    .with_ansi(!journal && std::io::stdout().is_terminal())
                    .with_writer(std::io::stdout),
            )
            .try_init(),
    };
    result.map_err(|_| LoggingError::AlreadyInstalled)?;
    Ok(LogHandle { handle })
}

/// The syslog priority journald reads from a line's `<N>` prefix.
pub fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// A formatter that, writing to the journal, starts each line with its priority.
struct Prefixed<F> {
    inner: F,
    journal: bool,
}

impl<S, N, F> FormatEvent<S, N> for Prefixed<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if self.journal {
            write!(writer, "<{}>", syslog_priority(event.metadata().level()))?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

/// Whether stdout is the stream systemd connected to the journal: `JOURNAL_STREAM` is
/// `device:inode` of it, and must match fd 1 (a child that inherited the variable but
/// writes elsewhere must not get prefixes).
fn stdout_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&std::io::stdout())) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}
