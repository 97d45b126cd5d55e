//! Test harness: a real PostgreSQL for every test, never a mock.
//!
//! With `TASKWARDEN_TEST_DATABASE_URL` set (scripts/test.sh starts one throwaway cluster
//! for the whole run and sets it), tests use that server. Without it, the first test in a
//! process starts a throwaway cluster of its own with the daemon's embedded-PostgreSQL code;
//! the kernel stops that server when the test process exits.
//!
//! Either way each test gets a fresh database with the schema applied, and a unique
//! `application_name`, so tests that terminate "our" backends only ever touch their own.
#![allow(dead_code)]

pub mod cluster;
pub mod daemon;
pub mod pgbouncer;
pub mod proxy;
pub mod replica;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use taskwarden::config::{DatabaseConfig, Dur};
use taskwarden::db::Db;
use taskwarden::db::embedded::{Cluster, ClusterOptions};
use tokio::sync::OnceCell;

pub const TEST_DATABASE_URL_ENV: &str = "TASKWARDEN_TEST_DATABASE_URL";

struct Server {
    /// Connection settings for the server's `postgres` database (dbname is replaced).
    admin: tokio_postgres::Config,
    _cluster: Option<Cluster>,
    _dir: Option<tempfile::TempDir>,
}

static SERVER: OnceCell<Server> = OnceCell::const_new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

async fn server() -> &'static Server {
    SERVER
        .get_or_init(|| async {
            if let Ok(url) = std::env::var(TEST_DATABASE_URL_ENV)
                && !url.trim().is_empty()
            {
                let admin: tokio_postgres::Config = url
                    .parse()
                    .expect("TASKWARDEN_TEST_DATABASE_URL is not a valid URL");
                return Server {
                    admin,
                    _cluster: None,
                    _dir: None,
                };
            }
            let dir = tempfile::Builder::new()
                .prefix("taskwarden-test-pg")
                .tempdir()
                .expect("temp dir");
            let cluster = Cluster::start(
                dir.path(),
                ClusterOptions {
                    unsafe_fast: true,
                    max_connections: Some(300),
                    ..Default::default()
                },
            )
            .await
            .expect("start throwaway PostgreSQL");
            Server {
                admin: cluster.pg_config("postgres"),
                _cluster: Some(cluster),
                _dir: Some(dir),
            }
        })
        .await
}

/// A fresh database for one test ([`TestDb::new`] applies the schema).
pub struct TestDb {
    pub name: String,
    pub pg: tokio_postgres::Config,
    pub application_name: String,
}

/// The database goes with the test. Kept, each test's database (8 MB from the template
/// plus what the test wrote) would stay until the cluster stops: gigabytes over the suite,
/// on a CI machine whose free disk nobody promised. `WITH (FORCE)` ends the sessions a
/// daemon under test may still hold. Set `TASKWARDEN_KEEP_TEST_DATABASES=1` to look at
/// one after a failure.
impl Drop for TestDb {
    fn drop(&mut self) {
        if std::env::var_os("TASKWARDEN_KEEP_TEST_DATABASES").is_some() {
            return;
        }
        let mut admin = self.pg.clone();
        admin.dbname("postgres");
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop cannot await, and may run inside the test's runtime: a thread of its own
        // with its own runtime, bounded, and a failure here never fails the test.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async move {
                tokio::time::timeout(Duration::from_secs(15), async move {
                    let (client, conn) = admin.connect(tokio_postgres::NoTls).await.ok()?;
                    tokio::spawn(conn);
                    client.batch_execute(&sql).await.ok()
                })
                .await
                .ok()
                .flatten()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("test database {} was not dropped", self.name);
        }
    }
}

impl TestDb {
    pub async fn new() -> TestDb {
        let db = Self::new_unmigrated().await;
        taskwarden::db::migrate::run(&db.pg, &db.config(2, 0, Duration::from_secs(5)))
            .await
            .expect("migrate test database");
        db
    }

    /// A fresh, empty database on the same server: no migration has run on it.
    pub async fn new_unmigrated() -> TestDb {
        let server = server().await;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "tw_{}_{}_{:06x}",
            std::process::id(),
            n,
            rand::random::<u32>() & 0xffffff
        );
        let admin = connect(&server.admin).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let mut pg = server.admin.clone();
        pg.dbname(&name);
        TestDb {
            application_name: format!("twt_{}_{}", std::process::id(), n),
            name,
            pg,
        }
    }

    /// A database config for this test's pool.
    pub fn config(
        &self,
        pool_size: u32,
        max_overflow: u32,
        checkout_timeout: Duration,
    ) -> DatabaseConfig {
        DatabaseConfig {
            pool_size,
            max_overflow,
            checkout_timeout: Dur(checkout_timeout),
            application_name: self.application_name.clone(),
            ..DatabaseConfig::default()
        }
    }

    pub fn pool(&self, pool_size: u32, max_overflow: u32, checkout_timeout: Duration) -> Db {
        Db::new(
            self.pg.clone(),
            &self.config(pool_size, max_overflow, checkout_timeout),
            &taskwarden::metrics::Metrics::new(),
        )
        .expect("build pool")
    }

    /// A plain connection outside any pool, for the test's own checks.
    pub async fn admin(&self) -> tokio_postgres::Client {
        connect(&self.pg).await
    }

    /// A libpq URL for this database (for the binary under test).
    pub fn url(&self) -> String {
        let host = match self.pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            None => "localhost".into(),
        };
        let port = self.pg.get_ports().first().copied().unwrap_or(5432);
        let user = self.pg.get_user().unwrap_or("postgres");
        let pw = self
            .pg
            .get_password()
            .map(|p| format!(":{}", String::from_utf8_lossy(p)))
            .unwrap_or_default();
        format!(
            "postgresql://{user}{pw}@/{}?host={host}&port={port}",
            self.name
        )
    }

    /// Our backends (by application_name) as pg_stat_activity sees them.
    pub async fn backends(&self) -> Vec<i32> {
        let c = self.admin().await;
        c.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()",
            &[&self.application_name],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|r| r.get(0))
        .collect()
    }
}

/// A plain connection for a test's own SQL. Its search_path finds taskwarden's tables
/// (in the `taskwarden` schema) by their bare names, so a test reads as SQL written by hand
/// would; the daemon's own sessions keep the server's default path, which does not, so the
/// suite also checks that every statement of the daemon names its schema.
pub async fn connect(pg: &tokio_postgres::Config) -> tokio_postgres::Client {
    let (client, conn) = pg
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect to test PostgreSQL");
    tokio::spawn(conn);
    client
        .batch_execute("SET search_path = taskwarden, public")
        .await
        .expect("set the test session's search_path");
    client
}

/// Polls `f` until it returns true or `limit` passes; a guard against hangs, not a timing
/// assertion (the limit is generous).
pub async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// How many times each payload's `n` appears in a log an agent appends its payloads to
/// (the tests' side-effect record of what ran).
pub fn payload_counts(log: &std::path::Path) -> std::collections::BTreeMap<i64, usize> {
    let mut m = std::collections::BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line)
            && let Some(n) = v["n"].as_i64()
        {
            *m.entry(n).or_insert(0) += 1;
        }
    }
    m
}

/// The single bigint a query such as `SELECT count(*) ...` returns.
pub async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_taskwarden"))
}

/// `promtool check metrics` on an exposition; fails the test on any complaint.
pub fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
}

/// Live processes whose command line holds `marker`.
pub fn marked(marker: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if !daemon::alive(pid) {
            continue;
        }
        // An argv element of its own: the shell script that mentions it does not count.
        if cmd
            .split(|b| *b == 0)
            .any(|a| String::from_utf8_lossy(a).starts_with(marker))
        {
            out.push(pid);
        }
    }
    out
}

/// The python of the virtualenv with the client examples' packages (SQLAlchemy, asyncpg,
/// psycopg): `ensure_clients` in scripts/lib.sh installs them and exports
/// `TASKWARDEN_CLIENTS_PYTHON`; without it a test that needs them fails, saying so.
pub fn clients_python() -> String {
    std::env::var("TASKWARDEN_CLIENTS_PYTHON").unwrap_or_else(|_| {
        panic!(
            "TASKWARDEN_CLIENTS_PYTHON is not set: run scripts/test.sh, or \
             `. scripts/lib.sh && ensure_clients` first"
        )
    })
}
