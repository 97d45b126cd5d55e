//! A connection target: a connection string with what libpq would take from the
//! environment (`PG*` variables, the password file) and the `[database]` keys, made into a
//! tokio-postgres config and the TLS to reach it with.
//!
//! It sits above both halves it joins: `tls` (the TLS parameters and the connector) and
//! `libpq_env` (the environment), so that neither needs the other's caller.

use super::libpq_env::{self, Env};
use super::tls::{Tls, TlsError, TlsParams, names_port, split_tls_params, with_port};
use crate::config::{DatabaseConfig, SslMode};

/// Parses a connection string whose TLS parameters may be any of libpq's; the TLS ones
/// are returned beside the tokio-postgres config.
pub fn parse_url(conn: &str) -> Result<(tokio_postgres::Config, TlsParams), TlsError> {
    let env = Env::process();
    let (mut clean, params) = url_params(conn, &env)?;
    // tokio-postgres gives a URI's host port 5432 when none is written, where libpq would
    // take PGPORT: so PGPORT is written into the string first.
    let port = env
        .port()
        .map_err(|e| TlsError::Environment(e.to_string()))?;
    if let Some(port) = port.filter(|_| !names_port(&clean)) {
        clean = with_port(&clean, &port);
    }
    let mut pg = clean
        .parse::<tokio_postgres::Config>()
        .map_err(|e| TlsError::Url(e.to_string()))?;
    libpq_env::fill(&mut pg, &env).map_err(|e| TlsError::Environment(e.to_string()))?;
    Ok((pg, params))
}

/// The TLS parameters of a connection string with what it leaves out taken from the
/// environment (`PGSSL*`), and the rest of the string.
pub(super) fn url_params(conn: &str, env: &Env) -> Result<(String, TlsParams), TlsError> {
    let (clean, mut params) = split_tls_params(conn)?;
    libpq_env::fill_tls(&mut params, env)?;
    Ok((clean, params))
}

/// The `sslmode` in force for `url` under `cfg`, without reading any certificate (what
/// status shows; [`tls_for_url`] builds the connector).
pub fn mode_for_url(url: &str, cfg: &DatabaseConfig) -> Result<SslMode, TlsError> {
    let from_url = if url.trim().is_empty() {
        None
    } else {
        url_params(url, &Env::vars_only())?.1.mode
    };
    Ok(from_url.unwrap_or(cfg.sslmode))
}

/// The TLS for the connection string `url` (empty: a target given without one, such as
/// the embedded server's socket) under `cfg`'s `[database]` keys.
pub fn tls_for_url(url: &str, cfg: &DatabaseConfig) -> Result<Tls, TlsError> {
    let from_url = if url.trim().is_empty() {
        TlsParams::default()
    } else {
        url_params(url, &Env::vars_only())?.1
    };
    Tls::build(&TlsParams::of_config(cfg).overridden_by(from_url))
}
