//! Issue 26: the caller helpers in `examples/clients/` (SQLAlchemy sync and asyncio,
//! psycopg, node-postgres) against real PostgreSQL, by their own test script: each sets
//! `application_name` to `app:file:line:function` of the code that took the connection,
//! as another session reads it in `pg_stat_activity`, and back to `app` on release.
//!
//! `scripts/test.sh` installs their packages (`ensure_clients` in scripts/lib.sh) and
//! exports `TASKWARDEN_CLIENTS_PYTHON`; without it this test fails, saying so.

mod common;

use std::path::Path;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caller_helpers_name_the_code_that_took_each_connection() {
    let t = common::TestDb::new().await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tokio::task::block_in_place(|| {
        Command::new(common::clients_python())
            .arg(root.join("examples/clients/test_clients.py"))
            .env("TASKWARDEN_TEST_DATABASE_URL", t.url())
            .output()
            .unwrap()
    });
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    // Each helper's test ran and passed (the script prints PASS name per test).
    for test in [
        "test_sqlalchemy_sync_psycopg",
        "test_sqlalchemy_asyncio_asyncpg",
        "test_sqlalchemy_asyncio_psycopg",
        "test_psycopg_connect_and_pool",
        "test_truncation_63_bytes",
        "test_node_pg",
    ] {
        assert!(
            text.contains(&format!("PASS {test} ")),
            "{test} did not pass:\n{text}"
        );
    }
    assert!(text.contains(" 0 failed"), "{text}");
}
