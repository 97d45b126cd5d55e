//! TLS to PostgreSQL, for every connection the daemon makes (pool, direct, listener,
//! migrations, cancel requests), with rustls and libpq's `sslmode` meanings:
//!
//! | sslmode | encrypts | verifies |
//! |---|---|---|
//! | `disable` | never | — |
//! | `allow` | only if the server refuses a plaintext session | nothing |
//! | `prefer` (default) | when the server offers it | nothing (the chain, when `sslrootcert` is given) |
//! | `require` | always | nothing (the chain, when `sslrootcert` is given) |
//! | `verify-ca` | always | the chain up to `sslrootcert` |
//! | `verify-full` | always | the chain and the host name |
//!
//! tokio-postgres knows only `disable`, `prefer` and `require` and refuses the rest in a
//! URL, so the TLS parameters (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`) are taken out
//! of a URL here ([`parse_url`]) and the rest handed to it. A URL's parameters win over the
//! `[database]` keys of the same name. Unix-socket connections are never encrypted
//! (PostgreSQL does not offer TLS on them), whatever the mode.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{VerifierBuilderError, WebPkiServerVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::SslMode as WireMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::DatabaseConfig;

pub use crate::config::SslMode;

/// `mode` from its libpq name, or the error naming the word.
pub(super) fn parse_mode(s: &str) -> Result<SslMode, TlsError> {
    SslMode::parse(s).ok_or_else(|| TlsError::Mode(s.to_string()))
}

/// What tokio-postgres is told: it encrypts or not; verification is ours.
fn wire(mode: SslMode) -> WireMode {
    match mode {
        SslMode::Disable | SslMode::Allow => WireMode::Disable,
        SslMode::Prefer => WireMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => WireMode::Require,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("sslmode {0:?} is not one of disable, allow, prefer, require, verify-ca, verify-full")]
    Mode(String),
    #[error("sslmode={0} needs a root certificate: set sslrootcert (a PEM file, or \"system\")")]
    NoRoot(&'static str),
    #[error("sslrootcert {path}: {reason}")]
    Root { path: String, reason: String },
    #[error("sslcert {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("sslkey {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("sslcert and sslkey must be given together")]
    CertWithoutKey,
    #[error("the client certificate and key do not go together: {0}")]
    ClientAuth(String),
    #[error("invalid connection string: {0}")]
    Url(String),
    #[error("{0}")]
    Environment(String),
}

/// The TLS parameters, from a URL or the `[database]` keys (empty: not given).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsParams {
    pub mode: Option<SslMode>,
    pub root_cert: String,
    pub cert: String,
    pub key: String,
}

impl TlsParams {
    /// `self`, with what `over` gives taking its place.
    pub(super) fn overridden_by(mut self, over: TlsParams) -> TlsParams {
        if over.mode.is_some() {
            self.mode = over.mode;
        }
        for (mine, theirs) in [
            (&mut self.root_cert, over.root_cert),
            (&mut self.cert, over.cert),
            (&mut self.key, over.key),
        ] {
            if !theirs.is_empty() {
                *mine = theirs;
            }
        }
        self
    }

    pub(super) fn of_config(cfg: &DatabaseConfig) -> TlsParams {
        TlsParams {
            mode: Some(cfg.sslmode),
            root_cert: cfg.sslrootcert.clone(),
            cert: cfg.sslcert.clone(),
            key: cfg.sslkey.clone(),
        }
    }
}

/// Takes the TLS parameters out of a connection string (a `postgresql://` URL or
/// `key=value` pairs): the string tokio-postgres can parse, and what was taken.
pub fn split_tls_params(conn: &str) -> Result<(String, TlsParams), TlsError> {
    let mut params = TlsParams::default();
    let mut take = |k: &str, v: String| -> Result<bool, TlsError> {
        match k {
            "sslmode" => params.mode = Some(parse_mode(&v)?),
            "sslrootcert" => params.root_cert = v,
            "sslcert" => params.cert = v,
            "sslkey" => params.key = v,
            _ => return Ok(false),
        }
        Ok(true)
    };
    let trimmed = conn.trim();
    if let Some(query_at) = uri_query_start(trimmed) {
        let Some(query_at) = query_at else {
            return Ok((trimmed.to_string(), params));
        };
        let (base, query) = (&trimmed[..query_at], &trimmed[query_at + 1..]);
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            // Only ours are decoded here (tokio-postgres decodes the rest), and an error
            // names the key, never the value: it may be a password.
            if !TLS_KEYS.contains(&k) || !take(k, percent_decode(k, v)?)? {
                kept.push(pair);
            }
        }
        let clean = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((clean, params));
    }
    // key=value pairs; a value may be quoted with '...' (backslash escapes), as libpq's.
    let mut kept = Vec::new();
    let mut rest = trimmed;
    while !rest.is_empty() {
        let (pair, value, after) = next_pair(rest)?;
        if !take(pair.0, value)? {
            kept.push(pair.1);
        }
        rest = after.trim_start();
    }
    Ok((kept.join(" "), params))
}

/// The URL keys taken out here.
const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// For a `postgresql://` URI, where its query string starts (`Some(None)`: it has none);
/// `None` for a `key=value` string. As libpq reads a URI, the user and password run to
/// the first `@` (before any `/`), so a `?` inside a password does not start the query.
fn uri_query_start(conn: &str) -> Option<Option<usize>> {
    let scheme = ["postgresql://", "postgres://"]
        .into_iter()
        .find(|p| conn.starts_with(p))?;
    let rest = &conn[scheme.len()..];
    let authority_from = match rest.find(['@', '/']) {
        Some(i) if rest.as_bytes()[i] == b'@' => i + 1,
        _ => 0,
    };
    Some(
        rest[authority_from..]
            .find('?')
            .map(|i| scheme.len() + authority_from + i),
    )
}

/// Whether the connection string names a port itself (in a URI's host part or as
/// `port=`), so `PGPORT` must not apply.
pub(super) fn names_port(conn: &str) -> bool {
    let conn = conn.trim();
    match uri_query_start(conn) {
        Some(query_at) => {
            let scheme = if conn.starts_with("postgresql://") {
                13
            } else {
                11
            };
            let end = query_at.unwrap_or(conn.len());
            let rest = &conn[scheme..end];
            let host_from = match rest.find(['@', '/']) {
                Some(i) if rest.as_bytes()[i] == b'@' => i + 1,
                _ => 0,
            };
            let hosts = rest[host_from..].split('/').next().unwrap_or("");
            let in_hosts = hosts.split(',').any(|h| {
                let after_v6 = h.rfind(']').map_or(h, |i| &h[i + 1..]);
                after_v6.contains(':')
            });
            let in_query = query_at.is_some_and(|q| {
                conn[q + 1..]
                    .split('&')
                    .any(|p| p.split_once('=').map_or(p, |(k, _)| k) == "port")
            });
            in_hosts || in_query
        }
        None => conn
            .split_whitespace()
            .any(|p| p.split_once('=').is_some_and(|(k, _)| k.trim() == "port")),
    }
}

/// `conn` (which names no port) with `ports` (PGPORT: one, or one per host) written in: after
/// each host of a URI's host part (a `port=` beside a written host would be a second port
/// to tokio-postgres), else as a `port` parameter.
pub(super) fn with_port(conn: &str, ports: &str) -> String {
    let Some(query_at) = uri_query_start(conn) else {
        return format!("{conn} port={ports}");
    };
    let scheme = if conn.starts_with("postgresql://") {
        13
    } else {
        11
    };
    let end = query_at.unwrap_or(conn.len());
    let rest = &conn[scheme..end];
    let host_from = scheme
        + match rest.find(['@', '/']) {
            Some(i) if rest.as_bytes()[i] == b'@' => i + 1,
            _ => 0,
        };
    let host_end = conn[host_from..end]
        .find('/')
        .map_or(end, |i| host_from + i);
    let hosts = &conn[host_from..host_end];
    if hosts.is_empty() {
        let sep = if query_at.is_some() { '&' } else { '?' };
        return format!("{conn}{sep}port={ports}");
    }
    let ports: Vec<&str> = ports.split(',').collect();
    let written: Vec<String> = hosts
        .split(',')
        .enumerate()
        .map(|(i, h)| {
            let p = ports.get(i).or(ports.first()).copied().unwrap_or("5432");
            format!("{h}:{p}")
        })
        .collect();
    format!(
        "{}{}{}",
        &conn[..host_from],
        written.join(","),
        &conn[host_end..]
    )
}

/// One `key=value` (or `key='quoted value'`) at the start of `s`: ((key, the pair's text),
/// the value, what follows).
fn next_pair(s: &str) -> Result<((&str, &str), String, &str), TlsError> {
    let eq = s
        .find('=')
        // The text may hold a password: say what is wrong, not what was written.
        .ok_or_else(|| TlsError::Url("expected key=value: a word without '='".into()))?;
    let key = s[..eq].trim();
    let after_eq = s[eq + 1..].trim_start();
    let start = s.len() - after_eq.len();
    if let Some(q) = after_eq.strip_prefix('\'') {
        let mut value = String::new();
        let mut chars = q.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(n);
                    }
                }
                '\'' => {
                    let end = start + 1 + i + 1;
                    return Ok(((key, &s[..end]), value, &s[end..]));
                }
                c => value.push(c),
            }
        }
        return Err(TlsError::Url(format!(
            "the quoted value of {key} is not closed"
        )));
    }
    let len = after_eq.find(char::is_whitespace).unwrap_or(after_eq.len());
    let end = start + len;
    Ok(((key, &s[..end]), after_eq[..len].to_string(), &s[end..]))
}

fn percent_decode(key: &str, v: &str) -> Result<String, TlsError> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = v
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    TlsError::Url(format!("bad percent escape in the value of {key}"))
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| TlsError::Url(format!("the value of {key} is not UTF-8")))
}

/// The TLS of one target, built once (certificates read) and cheap to clone.
#[derive(Clone)]
pub struct Tls {
    pub mode: SslMode,
    connector: Connector,
}

/// The rustls connector, and a name for the hosts it is given none or no valid one for (a
/// unix socket, which is never encrypted; a bare `hostaddr`): `verify-full` then fails on
/// the name, as libpq's does, and the other modes go on.
#[derive(Clone)]
pub struct Connector(MakeRustlsConnect);

const NO_HOST_NAME: &str = "invalid.invalid";

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for Connector
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::Stream;
    type TlsConnect = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::TlsConnect;
    type Error = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::Error;

    fn make_tls_connect(&mut self, hostname: &str) -> Result<Self::TlsConnect, Self::Error> {
        let name = if ServerName::try_from(hostname).is_ok() {
            hostname
        } else {
            NO_HOST_NAME
        };
        <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::make_tls_connect(
            &mut self.0,
            name,
        )
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("mode", &self.mode).finish()
    }
}

impl Tls {
    /// Reads the certificates `p` names.
    pub fn build(p: &TlsParams) -> Result<Tls, TlsError> {
        let mode = p.mode.unwrap_or_default();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = match (mode, p.root_cert.as_str()) {
            (SslMode::VerifyCa | SslMode::VerifyFull, "") => {
                return Err(TlsError::NoRoot(mode.as_str()));
            }
            (_, "") => None,
            (_, path) => Some(load_roots(path)?),
        };
        let verifier: Arc<dyn ServerCertVerifier> = match roots {
            None => Arc::new(AnyCertificate(Arc::clone(&provider))),
            Some(roots) => {
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e: VerifierBuilderError| TlsError::Root {
                            path: p.root_cert.clone(),
                            reason: e.to_string(),
                        })?;
                if mode == SslMode::VerifyFull {
                    webpki
                } else {
                    // libpq: verify-ca, and require/prefer with a root certificate, check
                    // the chain but not the name.
                    Arc::new(ChainOnly(webpki))
                }
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::ClientAuth(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (p.cert.as_str(), p.key.as_str()) {
            ("", "") => builder.with_no_client_auth(),
            ("", _) | (_, "") => return Err(TlsError::CertWithoutKey),
            (cert, key) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| TlsError::Cert {
                        path: cert.into(),
                        reason: e.to_string(),
                    })?;
                if chain.is_empty() {
                    return Err(TlsError::Cert {
                        path: cert.into(),
                        reason: "no certificate in the file".into(),
                    });
                }
                let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
                    path: key.into(),
                    reason: e.to_string(),
                })?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| TlsError::ClientAuth(e.to_string()))?
            }
        };
        Ok(Tls {
            mode,
            connector: Connector(MakeRustlsConnect::new(config)),
        })
    }

    /// Sets what tokio-postgres must do on the wire for this mode. PostgreSQL offers no
    /// TLS on a unix socket: a target of sockets only is never asked for it.
    pub fn apply(&self, pg: &mut tokio_postgres::Config) {
        let sockets_only = !pg.get_hosts().is_empty()
            && pg
                .get_hosts()
                .iter()
                .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
        pg.ssl_mode(if sockets_only {
            WireMode::Disable
        } else {
            wire(self.mode)
        });
    }

    /// The connector every connect and cancel request of this target uses.
    pub fn connector(&self) -> Connector {
        self.connector.clone()
    }

    /// `sslmode=allow`: the server refused a plaintext session; try once more encrypted.
    pub fn retry_encrypted(&self, e: &tokio_postgres::Error) -> bool {
        self.mode == SslMode::Allow && e.as_db_error().is_some()
    }
}

/// Connects to `pg` with `tls` (its mode applied), honouring `allow`'s second attempt.
pub async fn connect(
    pg: &tokio_postgres::Config,
    tls: &Tls,
) -> Result<
    (
        tokio_postgres::Client,
        tokio_postgres::Connection<
            tokio_postgres::Socket,
            <Connector as tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>>::Stream,
        >,
    ),
    tokio_postgres::Error,
> {
    let mut pg = pg.clone();
    tls.apply(&mut pg);
    let plain = pg.get_ssl_mode() == WireMode::Disable;
    match pg.connect(tls.connector()).await {
        Err(e) if plain && tls.retry_encrypted(&e) => {
            pg.ssl_mode(WireMode::Require);
            pg.connect(tls.connector()).await
        }
        other => other,
    }
}

fn load_roots(path: &str) -> Result<rustls::RootCertStore, TlsError> {
    let bad = |reason: String| TlsError::Root {
        path: path.to_string(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    if path == "system" {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            let why: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
            return Err(bad(format!(
                "no usable root certificate in the system's store{}",
                if why.is_empty() {
                    String::new()
                } else {
                    format!(": {}", why.join("; "))
                }
            )));
        }
        return Ok(roots);
    }
    let certs = CertificateDer::pem_file_iter(Path::new(path))
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(e.to_string()))?;
    for c in certs {
        roots.add(c).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    Ok(roots)
}

/// `sslmode=prefer`/`require` without a root certificate: encryption without
/// authentication, as libpq does (the handshake signature is still checked).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to the root certificate; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_question_mark_in_the_password_does_not_start_the_query() {
        let (clean, p) = split_tls_params(
            "postgresql://qq:pa?ss@db:5432/app?sslmode=require&application_name=x",
        )
        .unwrap();
        assert_eq!(p.mode, Some(SslMode::Require));
        assert_eq!(
            clean,
            "postgresql://qq:pa?ss@db:5432/app?application_name=x"
        );
        assert_eq!(uri_query_start("postgresql://h/db"), Some(None));
        assert_eq!(uri_query_start("host=h"), None);
    }

    #[test]
    fn errors_never_show_a_value() {
        for conn in [
            "postgresql://u@h/db?password=S3cr3t%zz&sslmode=require",
            "postgresql://u@h/db?sslrootcert=S3cr3t%zz",
            "postgresql://u@h/db?sslkey=S3cr3t%ff",
            "host=/tmp user=u password='S3cr3t",
            "host=/tmp S3cr3t",
        ] {
            match split_tls_params(conn) {
                Ok(_) => {}
                Err(e) => assert!(!e.to_string().contains("S3cr3t"), "{conn}: {e}"),
            }
        }
    }

    #[test]
    fn pgport_is_written_where_the_string_names_none() {
        assert_eq!(
            with_port("postgresql://u:p@h/db?x=1", "5499"),
            "postgresql://u:p@h:5499/db?x=1"
        );
        assert_eq!(
            with_port("postgresql://h1,h2", "1,2"),
            "postgresql://h1:1,h2:2"
        );
        assert_eq!(
            with_port("postgresql://%2Ftmp%2Fs/db", "7"),
            "postgresql://%2Ftmp%2Fs:7/db"
        );
        assert_eq!(with_port("postgresql://", "7"), "postgresql://?port=7");
        assert_eq!(
            with_port("postgresql:///db?host=/s", "7"),
            "postgresql:///db?host=/s&port=7"
        );
        assert_eq!(with_port("host=h", "7"), "host=h port=7");
    }

    #[test]
    fn a_port_is_named_in_the_host_part_or_as_a_key() {
        assert!(names_port("postgresql://u:p@h:5499/db"));
        assert!(names_port("postgresql://u@h1:1,h2:2/db"));
        assert!(names_port("postgresql://u@[::1]:5499/db"));
        assert!(names_port("postgresql://u@h/db?port=5499"));
        assert!(names_port("host=h port=5499"));
        assert!(!names_port("postgresql://u:pa:ss@h/db"));
        assert!(!names_port("postgresql://u@[::1]/db"));
        assert!(!names_port("postgresql://"));
        assert!(!names_port("host=h user=u"));
    }

    #[test]
    fn tls_parameters_leave_the_url_and_the_rest_stays() {
        let (clean, p) = split_tls_params(
            "postgresql://u:p@db.example.com:5432/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(
            clean,
            "postgresql://u:p@db.example.com:5432/app?application_name=x"
        );
        assert_eq!(p.mode, Some(SslMode::VerifyFull));
        assert_eq!(p.root_cert, "/etc/ca.pem");
        let (clean, p) =
            split_tls_params("postgresql://u@h/db?sslmode=require&sslcert=/c&sslkey=/k").unwrap();
        assert_eq!(clean, "postgresql://u@h/db");
        assert_eq!((p.cert.as_str(), p.key.as_str()), ("/c", "/k"));
        let (clean, p) =
            split_tls_params("host=h user=u sslmode=verify-ca sslrootcert='/a b/ca.pem' dbname=d")
                .unwrap();
        assert_eq!(clean, "host=h user=u dbname=d");
        assert_eq!(p.mode, Some(SslMode::VerifyCa));
        assert_eq!(p.root_cert, "/a b/ca.pem");
        assert!(matches!(
            split_tls_params("postgresql://h/db?sslmode=sometimes"),
            Err(TlsError::Mode(_))
        ));
        assert!(crate::db::target::parse_url("postgresql://u@h/db?sslmode=verify-full").is_ok());
    }

    #[test]
    fn a_verifying_mode_needs_a_root_and_files_are_named_in_errors() {
        let p = TlsParams {
            mode: Some(SslMode::VerifyFull),
            ..Default::default()
        };
        assert!(matches!(
            Tls::build(&p),
            Err(TlsError::NoRoot("verify-full"))
        ));
        let p = TlsParams {
            mode: Some(SslMode::VerifyCa),
            root_cert: "/nonexistent/ca.pem".into(),
            ..Default::default()
        };
        let e = Tls::build(&p).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let p = TlsParams {
            mode: Some(SslMode::Require),
            cert: "/c".into(),
            ..Default::default()
        };
        assert!(matches!(Tls::build(&p), Err(TlsError::CertWithoutKey)));
        assert!(
            Tls::build(&TlsParams::default()).is_ok(),
            "prefer needs nothing"
        );
    }
}
