//! libpq's conventions for what a connection string leaves out, applied in libpq's order:
//! the string first, then the `PG*` environment variables, then libpq's defaults, and for
//! the password last the password file (`PGPASSFILE`, else `~/.pgpass`). A URL that
//! works for `psql` in the daemon's environment works for the daemon.
//!
//! The TLS settings taken from the environment (`PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`,
//! `PGSSLKEY`) sit between the URL's own and the `[database]` keys, which are the
//! daemon's defaults. `PGAPPNAME` is not read: the daemon names its sessions itself
//! (`database.application_name`), which is how the watchdog tells them apart.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio_postgres::config::Host;

use super::tls::{TlsError, TlsParams};

/// The variables read, in the order docs/managed-postgres.md lists them.
pub const VARS: [&str; 11] = [
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSSLMODE",
    "PGSSLROOTCERT",
    "PGSSLCERT",
    "PGSSLKEY",
];

/// libpq's default port.
const DEFAULT_PORT: u16 = 5432;

/// A snapshot of what libpq would read from the process: its `PG*` variables, `HOME` and
/// the user it runs as.
#[derive(Debug, Clone, Default)]
pub struct Env {
    vars: HashMap<String, String>,
    home: Option<PathBuf>,
    os_user: Option<String>,
}

impl Env {
    /// The running process's environment.
    pub fn process() -> Env {
        let user = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten();
        let vars = Env::vars_only().vars;
        Env {
            vars,
            // An empty HOME counts as unset, as libpq has it.
            home: std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(PathBuf::from)
                .or_else(|| user.as_ref().map(|u| u.dir.clone())),
            os_user: user.map(|u| u.name),
        }
    }

    /// The `PG*` variables alone, without the user database lookup: enough for the TLS
    /// settings, which the supervisor reads every tick.
    pub fn vars_only() -> Env {
        let vars = VARS
            .iter()
            .filter_map(|k| {
                std::env::var(k)
                    .ok()
                    .filter(|v| !v.is_empty())
                    .map(|v| (k.to_string(), v))
            })
            .collect();
        Env {
            vars,
            home: None,
            os_user: None,
        }
    }

    /// An environment given whole (tests).
    pub fn of(vars: &[(&str, &str)], home: Option<&Path>, os_user: Option<&str>) -> Env {
        Env {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            home: home.map(Path::to_path_buf),
            os_user: os_user.map(str::to_string),
        }
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.vars.get(k).map(String::as_str)
    }

    /// `PGPORT`, checked: one port or a comma-separated list, each 1..=65535.
    pub(super) fn port(&self) -> Result<Option<String>, EnvError> {
        let Some(ports) = self.get("PGPORT").map(str::trim).filter(|p| !p.is_empty()) else {
            return Ok(None);
        };
        let ok: Option<Vec<u16>> = ports
            .split(',')
            .map(|p| p.trim().parse::<u16>().ok().filter(|p| *p != 0))
            .collect();
        match ok {
            Some(list) => Ok(Some(
                list.iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            )),
            None => Err(EnvError::Port(ports.to_string())),
        }
    }
}

/// What the environment and the password file could not supply.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("PGPORT {0:?} is not a port number (1..=65535, or a comma-separated list)")]
    Port(String),
    #[error("PGHOSTADDR {0:?} is not an IP address (or a comma-separated list)")]
    HostAddr(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Fills the TLS parameters a connection string did not give from `PGSSL*`.
pub fn fill_tls(p: &mut TlsParams, env: &Env) -> Result<(), TlsError> {
    if p.mode.is_none()
        && let Some(m) = env.get("PGSSLMODE")
    {
        p.mode = Some(super::tls::parse_mode(m)?);
    }
    for (field, var) in [
        (&mut p.root_cert, "PGSSLROOTCERT"),
        (&mut p.cert, "PGSSLCERT"),
        (&mut p.key, "PGSSLKEY"),
    ] {
        if field.is_empty()
            && let Some(v) = env.get(var)
        {
            *field = v.to_string();
        }
    }
    Ok(())
}

/// Fills what the connection string left out of `pg`: hosts, ports, user, database and
/// password from the environment, then libpq's defaults (the local socket directory,
/// 5432, the OS user), then the password from the password file.
pub fn fill(pg: &mut tokio_postgres::Config, env: &Env) -> Result<(), EnvError> {
    if pg.get_hosts().is_empty() && pg.get_hostaddrs().is_empty() {
        if let Some(hosts) = env.get("PGHOST") {
            for h in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
                if h.starts_with('/') {
                    pg.host_path(h);
                } else {
                    pg.host(h);
                }
            }
        }
        if let Some(addrs) = env.get("PGHOSTADDR") {
            for a in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                let ip = a
                    .parse()
                    .map_err(|_| EnvError::HostAddr(addrs.to_string()))?;
                pg.hostaddr(ip);
            }
        }
        if pg.get_hosts().is_empty() && pg.get_hostaddrs().is_empty() {
            pg.host_path(default_socket_dir());
        }
    }
    if pg.get_ports().is_empty()
        && let Some(ports) = env.get("PGPORT")
    {
        for p in ports.split(',').map(str::trim) {
            let port: u16 = p
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| EnvError::Port(ports.to_string()))?;
            pg.port(port);
        }
    }
    if pg.get_user().is_none() {
        if let Some(u) = env.get("PGUSER").or(env.os_user.as_deref()) {
            pg.user(u);
        }
    }
    if pg.get_dbname().is_none()
        && let Some(d) = env.get("PGDATABASE")
    {
        pg.dbname(d);
    }
    // An empty password is no password: libpq then looks further, as here.
    if pg.get_password().is_none_or(<[u8]>::is_empty) {
        if let Some(pw) = env.get("PGPASSWORD") {
            pg.password(pw);
        } else if let Some(pw) = from_password_file(pg, env) {
            pg.password(pw);
        }
    }
    Ok(())
}

/// Where libpq looks for the server's socket when no host is given: Debian's compiled-in
/// directory, else upstream's.
fn default_socket_dir() -> &'static str {
    if Path::new("/var/run/postgresql").is_dir() {
        "/var/run/postgresql"
    } else {
        "/tmp"
    }
}

/// The password file's entry for `pg`'s first host, as libpq reads it: the file must be a
/// plain file without group or world access (else it is ignored, with a warning); `#`
/// lines are comments; fields are `host:port:database:user:password`, `*` matches
/// anything, `\:` and `\\` escape. A socket connection to the default directory matches
/// `localhost`. With several hosts only the first is looked up (one password serves the
/// connection).
fn from_password_file(pg: &tokio_postgres::Config, env: &Env) -> Option<String> {
    let path = env
        .get("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| env.home.as_ref().map(|h| h.join(".pgpass")))?;
    let meta = std::fs::metadata(&path).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            "password file has group or world access and is ignored (as libpq does); chmod 0600 it"
        );
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) if p == Path::new(default_socket_dir()) => "localhost".into(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => pg
            .get_hostaddrs()
            .first()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "localhost".into()),
    };
    let port = pg
        .get_ports()
        .first()
        .copied()
        .unwrap_or(DEFAULT_PORT)
        .to_string();
    let user = pg.get_user().unwrap_or_default();
    let db = pg.get_dbname().unwrap_or(user);
    lookup(&text, [&host, &port, db, user])
}

/// The password of the first line of a password file matching `want` (host, port,
/// database, user).
pub fn lookup(text: &str, want: [&str; 4]) -> Option<String> {
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_fields(line);
        if fields.len() < 5 {
            continue;
        }
        if fields[..4]
            .iter()
            .zip(want)
            .all(|(f, w)| f == "*" || f == w)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

/// A line's fields: split on `:` not escaped by `\` (the password ends at the next one, as
/// libpq reads it).
fn split_fields(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next()
                    && let Some(last) = out.last_mut()
                {
                    last.push(n);
                }
            }
            ':' if out.len() < 5 => out.push(String::new()),
            ':' => break,
            c => {
                if let Some(last) = out.last_mut() {
                    last.push(c);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SslMode;

    #[test]
    fn password_file_lines_match_as_libpq_reads_them() {
        let text = "# comment\n\
                    db.example.com:5432:app:alice:first\n\
                    db.example.com:*:*:alice:second\n\
                    *:*:*:bob:pa\\:ss\\\\word\n\
                    short:line\n\
                    localhost:5432:*:carol:with:colons:in:it\n";
        assert_eq!(
            lookup(text, ["db.example.com", "5432", "app", "alice"]).as_deref(),
            Some("first")
        );
        assert_eq!(
            lookup(text, ["db.example.com", "6432", "other", "alice"]).as_deref(),
            Some("second")
        );
        assert_eq!(
            lookup(text, ["anywhere", "1", "x", "bob"]).as_deref(),
            Some("pa:ss\\word")
        );
        assert_eq!(
            lookup(text, ["localhost", "5432", "d", "carol"]).as_deref(),
            Some("with")
        );
        assert_eq!(lookup(text, ["elsewhere", "5432", "app", "alice"]), None);
    }

    #[test]
    fn the_url_wins_then_the_environment_then_defaults() {
        let env = Env::of(
            &[
                ("PGHOST", "envhost,/run/sock"),
                ("PGPORT", "6001,6002"),
                ("PGUSER", "envuser"),
                ("PGDATABASE", "envdb"),
                ("PGPASSWORD", "envpw"),
                ("PGSSLMODE", "verify-full"),
                ("PGSSLROOTCERT", "/etc/ca.pem"),
            ],
            None,
            Some("osuser"),
        );
        let mut pg: tokio_postgres::Config =
            "postgresql://urluser@urlhost:7000/urldb".parse().unwrap();
        fill(&mut pg, &env).unwrap();
        assert_eq!(pg.get_hosts(), &[Host::Tcp("urlhost".into())]);
        assert_eq!(pg.get_ports(), &[7000]);
        assert_eq!(pg.get_user(), Some("urluser"));
        assert_eq!(pg.get_dbname(), Some("urldb"));
        assert_eq!(pg.get_password(), Some(&b"envpw"[..]));

        let mut pg: tokio_postgres::Config = "postgresql://".parse().unwrap();
        fill(&mut pg, &env).unwrap();
        assert_eq!(
            pg.get_hosts(),
            &[Host::Tcp("envhost".into()), Host::Unix("/run/sock".into())]
        );
        assert_eq!(pg.get_ports(), &[6001, 6002]);
        assert_eq!(pg.get_user(), Some("envuser"));
        assert_eq!(pg.get_dbname(), Some("envdb"));

        let mut p = TlsParams {
            mode: Some(SslMode::Require),
            ..Default::default()
        };
        fill_tls(&mut p, &env).unwrap();
        assert_eq!(p.mode, Some(SslMode::Require));
        assert_eq!(p.root_cert, "/etc/ca.pem");

        let bare = Env::of(&[], None, Some("osuser"));
        let mut pg: tokio_postgres::Config = "postgresql://".parse().unwrap();
        fill(&mut pg, &bare).unwrap();
        assert_eq!(pg.get_user(), Some("osuser"));
        assert_eq!(pg.get_hosts(), &[Host::Unix(default_socket_dir().into())]);
        assert_eq!(pg.get_password(), None);
    }

    #[test]
    fn an_empty_password_is_no_password() {
        let env = Env::of(&[("PGPASSWORD", "from-env")], None, Some("u"));
        let mut pg: tokio_postgres::Config = "postgresql://u:@h/d".parse().unwrap();
        fill(&mut pg, &env).unwrap();
        assert_eq!(pg.get_password(), Some(&b"from-env"[..]));
    }

    #[test]
    fn bad_variables_are_errors_naming_them() {
        let mut pg: tokio_postgres::Config = "postgresql://".parse().unwrap();
        let e = fill(&mut pg, &Env::of(&[("PGPORT", "54x")], None, None)).unwrap_err();
        assert!(e.to_string().contains("PGPORT"), "{e}");
        let mut p = TlsParams::default();
        assert!(fill_tls(&mut p, &Env::of(&[("PGSSLMODE", "sometimes")], None, None)).is_err());
    }

    #[test]
    fn a_password_file_others_can_read_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pgpass");
        std::fs::write(&f, "*:*:*:*:secret\n").unwrap();
        let env = Env::of(&[("PGPASSFILE", f.to_str().unwrap())], None, Some("u"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut pg: tokio_postgres::Config = "postgresql://u@h/d".parse().unwrap();
        fill(&mut pg, &env).unwrap();
        assert_eq!(pg.get_password(), None);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        fill(&mut pg, &env).unwrap();
        assert_eq!(pg.get_password(), Some(&b"secret"[..]));
    }
}
