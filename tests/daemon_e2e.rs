//! End to end: the built `taskwarden` binary, driven as a user drives it (CLI, signals,
//! files), against real PostgreSQL — its own embedded one, or the test server.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::daemon::{Daemon, alive};
use common::{TestDb, bin, eventually};
use nix::sys::signal::Signal;

fn postmaster_pid(data_dir: &Path) -> i32 {
    let text = std::fs::read_to_string(data_dir.join("pgdata/postmaster.pid")).unwrap();
    text.lines().next().unwrap().trim().parse().unwrap()
}

const READY: &str = "taskwarden ready";
const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn embedded_default_starts_is_ready_and_stops_its_postgres_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state");
    let config = format!(
        "[database]\ndata_dir = {:?}\n[logging]\nformat = \"json\"\n",
        data.display().to_string()
    );

    let mut d = Daemon::start(dir.path(), &config, &[]);
    let ready = d
        .wait_for(READY, LIMIT)
        .unwrap_or_else(|| panic!("never ready:\n{}", d.output()));
    // JSON logs carry fields, not prose, flat (what Loki, Elastic and Datadog parse).
    let v: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(v["pool_max"], 30, "{ready}");
    assert_eq!(v["level"], "INFO", "{ready}");
    assert!(v["message"].as_str().unwrap().contains(READY), "{ready}");
    assert!(v.get("fields").is_none(), "{ready}");
    assert!(d.output().contains("cluster initialised"));
    let pg = postmaster_pid(&data);
    assert!(alive(pg));

    d.signal(Signal::SIGTERM);
    let st = d.wait_exit(LIMIT);
    assert!(st.success(), "exit {st:?}; output:\n{}", d.output());
    assert!(!alive(pg), "PostgreSQL {pg} still running after shutdown");
    assert!(!data.join("pgdata/postmaster.pid").exists());
    assert!(d.output().contains("embedded PostgreSQL stopped"));

    // A second start reuses the cluster (no initdb) and SIGINT stops it as well.
    let mut d = Daemon::start(dir.path(), &config, &[]);
    d.wait_for(READY, LIMIT)
        .unwrap_or_else(|| panic!("never ready:\n{}", d.output()));
    assert!(!d.output().contains("cluster initialised"));
    let pg = postmaster_pid(&data);
    d.signal(Signal::SIGINT);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.output());
    assert!(!alive(pg));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_resource_usage_env_prints_status_lines_with_fields() {
    let t = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[database]\napplication_name = {:?}\n[supervisor]\ninterval = \"100ms\"\nresource_log_interval = \"200ms\"\n\
         [logging]\nformat = \"json\"\n",
        t.application_name
    );
    let url = t.url();
    let mut d = Daemon::start(
        dir.path(),
        &config,
        &[
            ("TASKWARDEN_DATABASE_URL", &url),
            ("LOG_RESOURCE_USAGE", "true"),
            // Not this process's stdout: no journal priority prefixes.
            ("JOURNAL_STREAM", "1:1"),
        ],
    );
    let line = tokio::task::block_in_place(|| d.wait_for("resource status", LIMIT));
    let line = line.unwrap_or_else(|| panic!("no status line:\n{}", d.output()));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let f = &v;
    assert_eq!(f["pool_max"], 30, "{line}");
    assert!(f["resident_memory_bytes"].as_u64().unwrap() > 0, "{line}");
    assert!(
        f.get("sessions_open").is_some() && f.get("pool_in_use").is_some(),
        "{line}"
    );
    d.signal(Signal::SIGTERM);
    assert!(tokio::task::block_in_place(|| d.wait_exit(LIMIT)).success());
}

#[test]
fn missing_server_binaries_give_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("no-postgres-here");
    std::fs::create_dir(&empty).unwrap();
    let config = format!(
        "[database]\ndata_dir = {:?}\n",
        dir.path().join("state").display().to_string()
    );
    let mut d = Daemon::start(
        dir.path(),
        &config,
        &[("TASKWARDEN_PG_BINDIR", empty.to_str().unwrap())],
    );
    let st = d.wait_exit(LIMIT);
    assert!(!st.success());
    let out = d.output();
    assert!(out.contains("apt-get install postgresql"), "{out}");
    assert!(!out.contains(READY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_database_sigterm_requeues_and_closes_every_connection() {
    let t = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[database]\napplication_name = {:?}\npool_size = 3\nmax_overflow = 0\n",
        t.application_name
    );
    let url = t.url();
    let mut d = Daemon::start(dir.path(), &config, &[("TASKWARDEN_DATABASE_URL", &url)]);
    let ready = tokio::task::block_in_place(|| d.wait_for(READY, LIMIT));
    let ready = ready.unwrap_or_else(|| panic!("never ready:\n{}", d.output()));
    // The URL (it could hold a password) is not logged; host/db are.
    assert!(!ready.contains("postgresql://"), "{ready}");
    assert!(ready.contains(&t.name), "{ready}");
    let instance = ready
        .split("instance=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_string();

    // A task this instance holds as running, as a worker of it would.
    let c = t.admin().await;
    let id: i64 = c
        .query_one(
            "INSERT INTO tasks (agent, status, attempts, lease_owner, lease_expires_at, started_at) \
             VALUES ('echo', 'running', 1, $1, now() + interval '30s', now()) RETURNING id",
            &[&instance],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        !t.backends().await.is_empty(),
        "daemon holds no connection at all?"
    );

    d.signal(Signal::SIGTERM);
    let st = tokio::task::block_in_place(|| d.wait_exit(LIMIT));
    assert!(st.success(), "{}", d.output());
    let status: String = c
        .query_one("SELECT status FROM tasks WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "queued");
    assert!(
        eventually(Duration::from_secs(10), || async {
            t.backends().await.is_empty()
        })
        .await,
        "connections left open: {:?}",
        t.backends().await
    );
}

#[test]
fn check_config_names_every_problem_and_accepts_the_shipped_file() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&shipped)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[database]\npool_size = -3\nsession_timeout = \"5s\"\n\
         [supervisor]\ninterval = \"-1s\"\npool_alert_ratio = \"high\"\n\
         [workers]\nlease = 30\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "database.pool_size",
        "database.session_timeout",
        "supervisor.interval",
        "supervisor.pool_alert_ratio",
        "workers.lease",
    ] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }

    std::fs::write(
        &bad,
        "[supervisor]\npool_alert_ratio = 0.6\npool_clear_ratio = 0.9\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("supervisor.pool_clear_ratio"));
}

#[tokio::test]
async fn migrate_command_applies_the_schema() {
    let t = TestDb::new().await;
    let c = t.admin().await;
    c.batch_execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .arg("migrate")
        .current_dir(dir.path())
        .env("TASKWARDEN_DATABASE_URL", t.url())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n: i64 = c
        .query_one("SELECT count(*) FROM information_schema.tables WHERE table_name IN ('tasks','objectives','task_events')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
}
