//! Issue 24, TLS: the daemon against a PostgreSQL that accepts only `hostssl`, with a CA,
//! a server certificate for `localhost` and a client certificate generated here (openssl).
//!
//! - `verify-full` with the CA runs tasks end to end; the server lists every session of
//!   the daemon as encrypted (`pg_stat_ssl`) and `/v1/status` says so.
//! - A certificate from another CA, and a host name the certificate does not name, are
//!   refused under `verify-full`, with errors that say which; `verify-ca` accepts the
//!   second; `disable` fails with the server's reason; `require` encrypts without a CA.
//! - A client certificate with `cert` authentication works.
//!
//! The refusals are seen through `taskwarden migrate` (it connects once and exits).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::daemon::{Daemon, bounded, http_client, submit_task, task_status};
use common::eventually;
use common::replica::{bindir, free_port};
use nix::sys::signal::Signal;
use nix::unistd::User;

const LIMIT: Duration = Duration::from_secs(60);

fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// A CA (`{name}.crt`, `{name}.key`) in `dir`.
fn ca(dir: &Path, name: &str) {
    run(
        "openssl req (CA)",
        Command::new("openssl")
            .current_dir(dir)
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "2", "-subj", &format!("/CN={name}")])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .args([
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.crt"),
            ]),
    );
}

/// A certificate `{name}.crt`/`.key` signed by CA `by`, for `cn` with `san` (or none).
fn leaf(dir: &Path, name: &str, by: &str, cn: &str, san: Option<&str>) {
    run(
        "openssl req (leaf)",
        Command::new("openssl")
            .current_dir(dir)
            .args([
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-subj", &format!("/CN={cn}")])
            .args([
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ]),
    );
    let ext = dir.join(format!("{name}.ext"));
    let mut text = String::from("basicConstraints=CA:FALSE\n");
    if let Some(san) = san {
        text.push_str(&format!("subjectAltName={san}\n"));
    }
    std::fs::write(&ext, text).unwrap();
    run(
        "openssl x509 (sign)",
        Command::new("openssl")
            .current_dir(dir)
            .args(["x509", "-req", "-in", &format!("{name}.csr"), "-days", "2"])
            .args(["-CA", &format!("{by}.crt"), "-CAkey", &format!("{by}.key")])
            .args(["-CAcreateserial", "-out", &format!("{name}.crt")])
            .arg("-extfile")
            .arg(&ext),
    );
}

/// A throwaway server with `ssl = on` that accepts TCP only as `hostssl`.
struct TlsServer {
    dir: tempfile::TempDir,
    port: u16,
    run_as: Option<String>,
}

impl TlsServer {
    fn start() -> TlsServer {
        let dir = tempfile::Builder::new()
            .prefix("taskwarden-tls")
            .tempdir()
            .unwrap();
        let d = dir.path();
        ca(d, "ca");
        ca(d, "other-ca");
        leaf(d, "server", "ca", "localhost", Some("DNS:localhost"));
        leaf(
            d,
            "stranger",
            "other-ca",
            "localhost",
            Some("DNS:localhost"),
        );
        // `cert` authentication maps the certificate's CN to the role.
        leaf(d, "client", "ca", "certuser", None);
        let run_as = nix::unistd::geteuid().is_root().then(|| {
            let name = ["postgres", "nobody"]
                .into_iter()
                .find(|n| matches!(User::from_name(n), Ok(Some(_))))
                .expect("running as root without a postgres or nobody user");
            name.to_string()
        });
        let pgdata = d.join("pgdata");
        if let Some(user) = &run_as {
            let u = User::from_name(user).unwrap().unwrap();
            for f in ["", "server.key", "server.crt", "ca.crt"] {
                nix::unistd::chown(&d.join(f), Some(u.uid), Some(u.gid)).unwrap();
            }
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.join("server.key"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let s = TlsServer {
            dir,
            port: free_port(),
            run_as,
        };
        s.server_cmd("initdb", |c| {
            c.arg("-D")
                .arg(&pgdata)
                .args([
                    "-U",
                    "taskwarden",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ])
                .arg("--no-instructions");
        });
        std::fs::write(
            pgdata.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all certuser 127.0.0.1/32 cert\n\
             hostssl all pwuser 127.0.0.1/32 scram-sha-256\n\
             hostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        let d = s.dir.path();
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c ssl=on \
             -c ssl_cert_file={} -c ssl_key_file={} -c ssl_ca_file={} \
             -c max_connections=100 -c fsync=off",
            s.port,
            d.display(),
            d.join("server.crt").display(),
            d.join("server.key").display(),
            d.join("ca.crt").display(),
        );
        let log = d.join("server.log");
        s.server_cmd("pg_ctl", |c| {
            c.arg("-D")
                .arg(&pgdata)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "-o", &opts, "start"]);
        });
        s.psql_in("postgres", "CREATE ROLE certuser LOGIN");
        s.psql_in(
            "postgres",
            &format!("CREATE ROLE pwuser LOGIN PASSWORD '{PWUSER_PASSWORD}'"),
        );
        s.psql_in("postgres", "CREATE DATABASE app");
        s.psql_in("postgres", "CREATE DATABASE certdb OWNER certuser");
        s.psql_in("postgres", "GRANT CREATE ON DATABASE app TO pwuser");
        s
    }

    fn server_cmd(&self, bin: &str, args: impl FnOnce(&mut Command)) {
        let exe = bindir().join(bin);
        let mut c = match &self.run_as {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        c.current_dir(self.dir.path());
        args(&mut c);
        // pg_ctl's postmaster keeps what it is given: a file, not a pipe.
        let out = self.dir.path().join(format!("{bin}.out"));
        let f = std::fs::File::create(&out).unwrap();
        c.stdout(f.try_clone().unwrap()).stderr(f);
        let st = c.stdin(Stdio::null()).status().unwrap();
        assert!(
            st.success(),
            "{bin}: {st}\n{}",
            std::fs::read_to_string(&out).unwrap_or_default()
        );
    }

    /// One statement in `app` on the unix socket (trusted); its unaligned output.
    fn psql(&self, sql: &str) -> String {
        self.psql_in("app", sql)
    }

    fn psql_in(&self, db: &str, sql: &str) -> String {
        run(
            "psql",
            Command::new(bindir().join("psql"))
                .args(["-h"])
                .arg(self.dir.path())
                .args(["-p", &self.port.to_string(), "-U", "taskwarden", "-d", db])
                .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]),
        )
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn url(&self, host: &str, user: &str, db: &str, params: &str) -> String {
        format!("postgresql://{user}@{host}:{}/{db}?{params}", self.port)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let pgdata = self.dir.path().join("pgdata");
        let exe = bindir().join("pg_ctl");
        let mut c = match &self.run_as {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let _ = c
            .arg("-D")
            .arg(pgdata)
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The password of the role that must authenticate (scram-sha-256).
const PWUSER_PASSWORD: &str = "c0rrect:h0rse\\staple";

/// `taskwarden migrate` against `url`: it connects, migrates and exits.
fn migrate(dir: &Path, url: &str, extra: &str) -> Output {
    migrate_env(dir, url, extra, &[])
}

/// [`migrate`] with an environment of libpq's variables (and no others of the test's).
fn migrate_env(dir: &Path, url: &str, extra: &str, env: &[(&str, &str)]) -> Output {
    let cfg = dir.join("migrate.toml");
    std::fs::write(
        &cfg,
        format!("[database]\nurl = {url:?}\nconnect_timeout = \"5s\"\n{extra}\n"),
    )
    .unwrap();
    let mut cmd = Command::new(common::bin());
    cmd.args(["migrate", "--config"])
        .arg(&cfg)
        .env_remove("TASKWARDEN_DATABASE_URL")
        .env("HOME", dir)
        .stdin(Stdio::null());
    for k in taskwarden::db::libpq_env::VARS {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// libpq's conventions: `PG*` variables fill what the URL leaves out (the URL wins), and
/// the password comes from the password file, which is ignored when others can read it.
/// The role here must give a password (scram-sha-256), over verified TLS.
#[test]
fn libpq_environment_variables_and_the_password_file() {
    use std::os::unix::fs::PermissionsExt;
    let s = TlsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let ca = s.file("ca.crt").display().to_string();
    let port = s.port.to_string();
    let base: Vec<(&str, &str)> = vec![
        ("PGHOST", "localhost"),
        ("PGPORT", &port),
        ("PGUSER", "pwuser"),
        ("PGDATABASE", "app"),
        ("PGSSLMODE", "verify-full"),
        ("PGSSLROOTCERT", &ca),
    ];
    fn plus<'a>(
        base: &[(&'a str, &'a str)],
        extra: &[(&'a str, &'a str)],
    ) -> Vec<(&'a str, &'a str)> {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        v
    }
    let with = |extra: &[(&'static str, &'static str)]| plus(&base, extra);

    // Everything from the environment, but no password anywhere: the server's refusal.
    let o = migrate_env(dir.path(), "postgresql://", "", &base);
    assert!(!o.status.success(), "{}", said(&o));
    assert!(said(&o).contains("password"), "{}", said(&o));

    // PGPASSWORD.
    let o = migrate_env(
        dir.path(),
        "postgresql://",
        "",
        &with(&[("PGPASSWORD", PWUSER_PASSWORD)]),
    );
    assert!(o.status.success(), "PGPASSWORD: {}", said(&o));
    let schema = s.psql("SELECT nspowner::regrole FROM pg_namespace WHERE nspname = 'taskwarden'");
    assert_eq!(schema.trim(), "pwuser", "the schema is the role's own");

    // The password file, with libpq's escapes for ':' and '\'.
    let passfile = dir.path().join("pgpass");
    let escaped = PWUSER_PASSWORD.replace('\\', "\\\\").replace(':', "\\:");
    std::fs::write(
        &passfile,
        format!("# taskwarden\nelsewhere:*:*:*:wrong\nlocalhost:{port}:app:pwuser:{escaped}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    let pf = passfile.display().to_string();
    let o = migrate_env(
        dir.path(),
        "postgresql://",
        "",
        &plus(&base, &[("PGPASSFILE", &pf)]),
    );
    assert!(o.status.success(), "PGPASSFILE: {}", said(&o));
    // ~/.pgpass when PGPASSFILE is not set (HOME is the test's directory).
    std::fs::copy(&passfile, dir.path().join(".pgpass")).unwrap();
    std::fs::set_permissions(
        dir.path().join(".pgpass"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let o = migrate_env(dir.path(), "postgresql://", "", &base);
    assert!(o.status.success(), "~/.pgpass: {}", said(&o));

    // A password file others can read is ignored, and the daemon says why.
    std::fs::set_permissions(
        dir.path().join(".pgpass"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let o = migrate_env(dir.path(), "postgresql://", "", &base);
    assert!(!o.status.success(), "{}", said(&o));
    assert!(said(&o).contains("group or world access"), "{}", said(&o));

    // The URL wins over the environment: its user, database and sslmode.
    let o = migrate_env(
        dir.path(),
        &format!(
            "postgresql://taskwarden@localhost:{port}/app?sslmode=verify-full&sslrootcert={ca}"
        ),
        "",
        &with(&[("PGPASSWORD", "wrong"), ("PGSSLMODE", "disable")]),
    );
    assert!(o.status.success(), "URL over environment: {}", said(&o));
    // A URL naming its host but no port takes PGPORT (tokio-postgres alone would put
    // 5432 there), and an empty password in it is no password: PGPASSWORD applies.
    let o = migrate_env(
        dir.path(),
        &format!("postgresql://pwuser:@localhost/app?sslmode=verify-full&sslrootcert={ca}"),
        "",
        &with(&[("PGPASSWORD", PWUSER_PASSWORD)]),
    );
    assert!(
        o.status.success(),
        "host-only URL with PGPORT: {}",
        said(&o)
    );
    // PGSSLMODE applies where the URL says nothing: disable meets hostssl-only.
    let o = migrate_env(
        dir.path(),
        "postgresql://",
        "",
        &with(&[("PGPASSWORD", PWUSER_PASSWORD), ("PGSSLMODE", "disable")]),
    );
    assert!(!o.status.success());
    assert!(said(&o).contains("no encryption"), "{}", said(&o));
    // A bad variable is named.
    let o = migrate_env(dir.path(), "postgresql://", "", &with(&[("PGPORT", "54x")]));
    assert!(!o.status.success());
    assert!(said(&o).contains("PGPORT"), "{}", said(&o));
}

fn said(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

#[test]
fn sslmodes_verify_refuse_and_say_why() {
    let s = TlsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let ca = s.file("ca.crt").display().to_string();
    let other = s.file("other-ca.crt").display().to_string();

    let o = migrate(
        dir.path(),
        &s.url(
            "localhost",
            "taskwarden",
            "app",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
        "",
    );
    assert!(o.status.success(), "verify-full with the CA: {}", said(&o));

    // Another CA's roots: the server's certificate has an unknown issuer.
    let o = migrate(
        dir.path(),
        &s.url(
            "localhost",
            "taskwarden",
            "app",
            &format!("sslmode=verify-full&sslrootcert={other}"),
        ),
        "",
    );
    assert!(!o.status.success());
    assert!(said(&o).contains("UnknownIssuer"), "{}", said(&o));

    // The certificate names localhost, not 127.0.0.1.
    let o = migrate(
        dir.path(),
        &s.url(
            "127.0.0.1",
            "taskwarden",
            "app",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
        "",
    );
    assert!(!o.status.success());
    assert!(said(&o).contains("not valid for name"), "{}", said(&o));
    // verify-ca checks the chain only.
    let o = migrate(
        dir.path(),
        &s.url(
            "127.0.0.1",
            "taskwarden",
            "app",
            &format!("sslmode=verify-ca&sslrootcert={ca}"),
        ),
        "",
    );
    assert!(o.status.success(), "verify-ca: {}", said(&o));
    // ... but not a chain to another CA.
    let o = migrate(
        dir.path(),
        &s.url(
            "127.0.0.1",
            "taskwarden",
            "app",
            &format!("sslmode=verify-ca&sslrootcert={other}"),
        ),
        "",
    );
    assert!(!o.status.success());
    assert!(said(&o).contains("UnknownIssuer"), "{}", said(&o));

    // disable: the server's own refusal (hostssl only), with its SQLSTATE.
    let o = migrate(
        dir.path(),
        &s.url("localhost", "taskwarden", "app", "sslmode=disable"),
        "",
    );
    assert!(!o.status.success());
    let text = said(&o);
    assert!(
        text.contains("28000") && text.contains("no encryption"),
        "{text}"
    );

    // require (and prefer, the default, and allow after the plaintext refusal) encrypt
    // without a CA; the [database] keys work as well as the URL's.
    for mode in ["require", "prefer", "allow"] {
        let o = migrate(
            dir.path(),
            &s.url("localhost", "taskwarden", "app", "application_name=x"),
            &format!("sslmode = {mode:?}"),
        );
        assert!(o.status.success(), "{mode}: {}", said(&o));
    }
    // A verifying mode without a root certificate is a config error, found before
    // connecting.
    let o = migrate(
        dir.path(),
        &s.url("localhost", "taskwarden", "app", "sslmode=verify-full"),
        "",
    );
    assert!(!o.status.success());
    assert!(said(&o).contains("sslrootcert"), "{}", said(&o));

    // A client certificate, `cert` authentication (no password, no trust).
    let o = migrate(
        dir.path(),
        &s.url("localhost", "certuser", "certdb", "sslmode=verify-full"),
        &format!(
            "sslrootcert = {ca:?}\nsslcert = {:?}\nsslkey = {:?}",
            s.file("client.crt").display().to_string(),
            s.file("client.key").display().to_string()
        ),
    );
    assert!(o.status.success(), "cert auth: {}", said(&o));
    // Without it, that role is refused.
    let o = migrate(
        dir.path(),
        &s.url("localhost", "certuser", "certdb", "sslmode=verify-full"),
        &format!("sslrootcert = {ca:?}"),
    );
    assert!(!o.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_runs_tasks_on_encrypted_sessions_only() {
    bounded(Duration::from_secs(240), async {
        let s = tokio::task::block_in_place(TlsServer::start);
        let dir = tempfile::tempdir().unwrap();
        let ca = s.file("ca.crt").display().to_string();
        let url = s.url(
            "localhost",
            "taskwarden",
            "app",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        );
        let cfg = format!(
            "[database]\nurl = {url:?}\napplication_name = \"tw-tls\"\npool_size = 3\n\
             [supervisor]\ninterval = \"500ms\"\n\
             [agents.cat]\nkind = \"command\"\ncommand = [\"cat\"]\n"
        );
        let mut d = tokio::task::block_in_place(|| Daemon::start(dir.path(), &cfg, &[]));
        let base = d.base_url();
        let http = http_client(Duration::from_secs(10));
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(
                submit_task(&http, &base, "cat", serde_json::json!({ "n": i }))
                    .await
                    .expect("submit"),
            );
        }
        for id in &ids {
            let done = eventually(LIMIT, || async {
                task_status(&http, &base, *id).await.as_deref() == Some("succeeded")
            })
            .await;
            assert!(done, "task {id} did not succeed:\n{}", d.output());
        }
        // Every session of the daemon's the server lists is encrypted.
        let seen = s.psql(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.application_name LIKE 'tw-tls%'",
        );
        let (n, enc) = seen.trim().split_once('|').unwrap();
        assert!(n.parse::<i64>().unwrap() >= 2, "{seen}");
        assert_eq!(n, enc, "unencrypted sessions: {seen}");
        // The server's end of each session probes a dead client as the daemon's end does
        // (tcp_keepalive 15 s), not after the kernel's two hours: a frozen link does not
        // leave the server holding the session. `ss` shows the server sockets' timers.
        let ss = std::process::Command::new("ss")
            .args([
                "-tnoH",
                "state",
                "established",
                "sport",
                "=",
                &format!(":{}", s.port),
            ])
            .output()
            .expect("ss");
        let ss = String::from_utf8_lossy(&ss.stdout).into_owned();
        let timers: Vec<&str> = ss
            .lines()
            .filter_map(|l| l.split("timer:(keepalive,").nth(1))
            .map(|t| t.split(',').next().unwrap_or(""))
            .collect();
        assert!(timers.len() >= 2, "server sockets:\n{ss}");
        assert!(
            timers
                .iter()
                .all(|t| t.ends_with("sec") || t.ends_with("ms")),
            "a server socket keeps the kernel's keepalive: {timers:?}\n{ss}"
        );
        // And the daemon says so.
        let shown = eventually(LIMIT, || async {
            let v: serde_json::Value = http
                .get(format!("{base}/v1/status"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let t = &v["database_tls"];
            t["sslmode"] == "verify-full"
                && t["sessions"].as_i64().unwrap_or(0) >= 2
                && t["sessions"] == t["encrypted"]
                && t["version"]
                    .as_str()
                    .is_some_and(|v| v.starts_with("TLSv1"))
        })
        .await;
        assert!(shown, "/v1/status does not show the encryption");
        d.signal(Signal::SIGTERM);
        assert!(tokio::task::block_in_place(|| d.wait_exit(LIMIT)).success());
    })
    .await;
}

/// The start-up check on the server's connection limit: a pool that could take more than
/// the server allows is warned about, naming both figures (the server here has
/// `max_connections = 100`; the role is a superuser, so none is reserved for it); one that
/// fits is not.
#[test]
fn a_pool_larger_than_the_server_allows_is_warned_about_at_start() {
    let s = TlsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let ca = s.file("ca.crt").display().to_string();
    let url = s.url(
        "localhost",
        "taskwarden",
        "app",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let o = migrate(dir.path(), &url, "pool_size = 90\nmax_overflow = 20");
    assert!(o.status.success(), "{}", said(&o));
    assert!(
        said(&o).contains("may open 112 connections")
            // The daemon's role here is a superuser, which may use the reserved slots.
            && said(&o).contains("the server allows 100 (max_connections 100 - 0 reserved)"),
        "{}",
        said(&o)
    );
    let o = migrate(dir.path(), &url, "pool_size = 20\nmax_overflow = 10");
    assert!(o.status.success(), "{}", said(&o));
    assert!(!said(&o).contains("may open"), "{}", said(&o));
}
