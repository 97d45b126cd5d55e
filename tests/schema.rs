//! Issue 24, "a schema of its own" and "a least-privilege role is enough", against the
//! built binary and a real PostgreSQL:
//!
//! - beside an application's own `public.tasks` and `objectives`, as a role with only
//!   `CONNECT, CREATE ON DATABASE`: the daemon creates its schema, migrates and runs, the
//!   application's tables are untouched, and an application role with only the grants
//!   docs/managed-postgres.md gives can enqueue and cannot read the tables;
//! - an installation made by the migrations of before v8 (every table in `public`, tasks
//!   in every state, events, pauses, schedules) is moved into the schema in place: no row
//!   lost, ids and sequences kept, the old `taskwarden_enqueue` still works for the role
//!   that used it;
//! - two deployments with different schemas in one database see nothing of each other.
//!
//! The limits only guard against hangs; each assertion is about rows, ids or outcomes.

mod common;

use std::path::Path;
use std::time::Duration;

use common::daemon::{Daemon, bounded, http_client, submit_task, task_status};
use common::{TestDb, count, eventually, payload_counts};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const TEST_LIMIT: Duration = Duration::from_secs(240);
const LIMIT: Duration = Duration::from_secs(60);
const ENQUEUE_ARGS: &str = "text, jsonb, integer, integer, timestamptz, text, text, interval, text";

fn config(t: &TestDb, dir: &Path, log: &str, schema: Option<&str>) -> String {
    config_with(t, dir, log, schema, "", "")
}

fn config_with(
    t: &TestDb,
    dir: &Path,
    log: &str,
    schema: Option<&str>,
    supervisor: &str,
    agents: &str,
) -> String {
    let log = dir.join(log);
    let schema = schema
        .map(|s| format!("schema = {s:?}\n"))
        .unwrap_or_default();
    format!(
        "[database]\napplication_name = {:?}\npool_size = 3\nmax_overflow = 1\n{schema}\
         [workers]\nconcurrency = 2\npoll_interval = \"200ms\"\nmax_attempts = 1\n\
         [supervisor]\ninterval = \"500ms\"\n{supervisor}\n\
         [agents.rec]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", {:?}]\nconcurrency = 2\n{agents}",
        t.application_name,
        format!("cat >> {}", log.display())
    )
}

fn start(dir: &Path, cfg: &str, url: &str) -> (Daemon, String) {
    tokio::task::block_in_place(|| {
        let mut d = Daemon::start(dir, cfg, &[("TASKWARDEN_DATABASE_URL", url)]);
        let base = d.base_url();
        (d, base)
    })
}

fn stop(mut d: Daemon) -> String {
    d.signal(Signal::SIGTERM);
    let st = tokio::task::block_in_place(|| d.wait_exit(LIMIT));
    let out = d.drain();
    assert!(st.success(), "daemon exit {st:?}; output:\n{out}");
    out
}

/// `taskwarden migrate` with `cfg`'s [database] section and `url`: (success, output).
fn migrate_cli(dir: &Path, url: &str, schema: &str) -> (bool, String) {
    let cfg = dir.join("migrate.toml");
    std::fs::write(
        &cfg,
        format!("[database]\nurl = {url:?}\nschema = {schema:?}\n"),
    )
    .unwrap();
    let o = std::process::Command::new(common::bin())
        .args(["migrate", "--config"])
        .arg(&cfg)
        .env_remove("TASKWARDEN_DATABASE_URL")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
    )
}

/// The test database's URL for another role (the test server trusts local connections).
fn url_as(t: &TestDb, role: &str) -> String {
    let user = t.pg.get_user().unwrap_or("postgres");
    t.url().replacen(
        &format!("postgresql://{user}"),
        &format!("postgresql://{role}"),
        1,
    )
}

async fn connect_as(t: &TestDb, role: &str) -> tokio_postgres::Client {
    let mut pg = t.pg.clone();
    pg.user(role);
    let (c, conn) = pg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    c
}

fn role(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xffffff
    )
}

async fn wait_status(http: &reqwest::Client, base: &str, id: i64, want: &str) -> bool {
    eventually(LIMIT, || async {
        task_status(http, base, id).await.as_deref() == Some(want)
    })
    .await
}

/// The application's own `tasks` and `objectives` in `public`, a daemon role with only
/// `CONNECT, CREATE ON DATABASE`, and an application role given only what docs/managed-postgres.md says an
/// enqueuing application needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_least_privilege_role_installs_beside_the_applications_own_tables() {
    bounded(TEST_LIMIT, async {
        let t = TestDb::new_unmigrated().await;
        let admin = t.admin().await;
        let daemon_role = role("twd");
        let app_role = role("twapp");
        admin
            .batch_execute(&format!(
                "CREATE TABLE public.tasks (id serial PRIMARY KEY, title text NOT NULL, done boolean NOT NULL DEFAULT false);
                 CREATE TABLE public.objectives (id serial PRIMARY KEY, name text NOT NULL);
                 INSERT INTO public.tasks (title) VALUES ('write the report'), ('call the bank');
                 INSERT INTO public.objectives (name) VALUES ('q4');
                 REVOKE CREATE ON SCHEMA public FROM PUBLIC;
                 CREATE ROLE {daemon_role} LOGIN;
                 CREATE ROLE {app_role} LOGIN;
                 GRANT CONNECT, CREATE ON DATABASE {db} TO {daemon_role};
                 GRANT CONNECT ON DATABASE {db} TO {app_role};",
                db = t.name
            ))
            .await
            .unwrap();
        let app_tables = "SELECT string_agg(format('%s:%s', c.relname, c.relkind), ',' ORDER BY c.relname) \
                          FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace";
        let before_tables: String = admin.query_one(app_tables, &[]).await.unwrap().get(0);
        let app_rows = "SELECT (SELECT string_agg(id || title || done, ',' ORDER BY id) FROM public.tasks) \
                        || '/' || (SELECT string_agg(id || name, ',' ORDER BY id) FROM public.objectives)";
        let before_rows: String = admin.query_one(app_rows, &[]).await.unwrap().get(0);

        // A schema someone else made and did not give the role: refused, naming the grant.
        admin.batch_execute("CREATE SCHEMA adminmade").await.unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let (ok, said) = migrate_cli(scratch.path(), &url_as(&t, &daemon_role), "adminmade");
        assert!(!ok, "{said}");
        assert!(
            said.contains("may not use it")
                && said.contains(&format!("GRANT USAGE, CREATE ON SCHEMA adminmade TO {daemon_role}")),
            "{said}"
        );

        // An agent that connects as the application's role and sits idle in a transaction
        // past agent_idle_in_transaction_max: ended by the watchdog only when the daemon's
        // role may see and signal it.
        let idle_agent = format!(
            "[agents.idler]\nkind = \"command\"\ncommand = [\"psql\", {:?}, \"-X\", \"-q\", \"-v\", \"ON_ERROR_STOP=1\", \
             \"-c\", \"BEGIN\", \"-c\", \"SELECT 1\", \"-c\", \"\\\\! sleep 8\", \"-c\", \"COMMIT\"]\n",
            url_as(&t, &app_role)
        );
        let dir = tempfile::tempdir().unwrap();
        let cfg = config_with(
            &t,
            dir.path(),
            "ran.log",
            None,
            "agent_idle_in_transaction_max = \"1s\"",
            &idle_agent,
        );
        let (mut d, base) = start(dir.path(), &cfg, &url_as(&t, &daemon_role));
        let http = http_client(Duration::from_secs(20));

        let id = submit_task(&http, &base, "rec", json!({"n": 1}))
            .await
            .expect("submit through the API");
        assert!(wait_status(&http, &base, id, "succeeded").await, "task {id} never succeeded");

        // The daemon's role created and owns the schema and its tables.
        let owners: Vec<(String, String)> = admin
            .query(
                "SELECT c.relname::text, pg_get_userbyid(c.relowner)::text FROM pg_class c \
                 WHERE c.relnamespace = 'taskwarden'::regnamespace AND c.relkind = 'r' ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert!(owners.iter().any(|(t, _)| t == "tasks"), "{owners:?}");
        assert!(owners.iter().any(|(t, _)| t == "refinery_schema_history"), "{owners:?}");
        assert!(owners.iter().all(|(_, o)| *o == daemon_role), "{owners:?}");

        // The application role: nothing before the grants; after the documented grants, it can
        // enqueue inside its own transaction and still cannot read taskwarden's tables.
        let app = connect_as(&t, &app_role).await;
        let refused = app
            .query_one("SELECT taskwarden.enqueue('rec', '{\"n\": 2}')", &[])
            .await
            .expect_err("enqueue before any grant");
        assert_eq!(
            refused.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{refused:?}"
        );
        let owner = connect_as(&t, &daemon_role).await;
        owner
            .batch_execute(&format!(
                "GRANT USAGE ON SCHEMA taskwarden TO {app_role};
                 GRANT EXECUTE ON FUNCTION taskwarden.enqueue({ENQUEUE_ARGS}),
                                           taskwarden.enqueue_detailed({ENQUEUE_ARGS}) TO {app_role};"
            ))
            .await
            .unwrap();
        app.batch_execute("BEGIN").await.unwrap();
        let queued: i64 = app
            .query_one("SELECT taskwarden.enqueue('rec', '{\"n\": 2}')", &[])
            .await
            .expect("enqueue with the documented grants")
            .get(0);
        app.batch_execute("COMMIT").await.unwrap();
        let (dup_id, dup): (i64, bool) = {
            let r = app
                .query_one(
                    "SELECT task_id, duplicate FROM taskwarden.enqueue_detailed('rec', '{\"n\": 3}', unique_key => 'k1')",
                    &[],
                )
                .await
                .expect("enqueue_detailed with the documented grants");
            (r.get(0), r.get(1))
        };
        assert!(!dup && dup_id > queued);
        let read = app
            .query_one("SELECT count(*) FROM taskwarden.tasks", &[])
            .await
            .expect_err("the application role reads taskwarden's table");
        assert_eq!(
            read.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
        );
        assert!(wait_status(&http, &base, queued, "succeeded").await);
        assert!(wait_status(&http, &base, dup_id, "succeeded").await);
        let ran = payload_counts(&dir.path().join("ran.log"));
        assert_eq!(ran.get(&2), Some(&1), "{ran:?}");

        // Without pg_read_all_stats the idle agent session of another role is invisible
        // in state: it is left alone (the task succeeds), and the daemon says so once.
        let lenient = submit_task(&http, &base, "idler", json!({})).await.unwrap();
        let lenient2 = submit_task(&http, &base, "idler", json!({})).await.unwrap();
        assert!(wait_status(&http, &base, lenient, "succeeded").await);
        assert!(wait_status(&http, &base, lenient2, "succeeded").await);
        let out = tokio::task::block_in_place(|| d.drain());
        assert_eq!(
            out.matches("missing_grant=\"pg_read_all_stats\"").count()
                + out.matches("missing_grant=pg_read_all_stats").count(),
            1,
            "the missing grant is said once:\n{out}"
        );
        // With pg_read_all_stats alone the sessions are seen but cannot be ended: the
        // agent's idle session and a session of another role named like the daemon's
        // (idle in a transaction, so it looks orphaned) are left alone, each said once,
        // and the supervisor keeps ticking without an error.
        admin
            .batch_execute(&format!("GRANT pg_read_all_stats TO {daemon_role}"))
            .await
            .unwrap();
        let mut lookalike = t.pg.clone();
        lookalike.user(&app_role).application_name(&t.application_name);
        let (lookalike, conn) = lookalike.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        lookalike.batch_execute("BEGIN; SELECT 1").await.unwrap();
        let seen = submit_task(&http, &base, "idler", json!({})).await.unwrap();
        assert!(wait_status(&http, &base, seen, "succeeded").await);
        assert!(
            lookalike.query_one("SELECT 1", &[]).await.is_ok(),
            "the other role's session was ended"
        );
        let out = tokio::task::block_in_place(|| d.drain());
        assert!(!out.contains("supervisor tick failed"), "{out}");
        for what in ["cannot end agent sessions", "carry our application_name"] {
            assert_eq!(out.matches(what).count(), 1, "{what:?} said once:\n{out}");
        }
        lookalike.batch_execute("COMMIT").await.unwrap();
        // With both grants the docs name, the same agent's session is ended.
        admin
            .batch_execute(&format!("GRANT pg_signal_backend TO {daemon_role}"))
            .await
            .unwrap();
        let strict = submit_task(&http, &base, "idler", json!({})).await.unwrap();
        assert!(
            wait_status(&http, &base, strict, "failed").await,
            "the idle session was not ended once the daemon could see it"
        );

        // The application's tables and rows, exactly as they were.
        let after_tables: String = admin.query_one(app_tables, &[]).await.unwrap().get(0);
        let after_rows: String = admin.query_one(app_rows, &[]).await.unwrap().get(0);
        assert_eq!(before_tables, after_tables);
        assert_eq!(before_rows, after_rows);
        stop(d);
    })
    .await;
}

/// What the runner before v8 did: every file applied with the server's default
/// search_path (so into `public`), its history in `public.refinery_schema_history`.
async fn install_as_before_v8(c: &tokio_postgres::Client) {
    c.batch_execute(
        "CREATE TABLE public.refinery_schema_history (version INT4 PRIMARY KEY, \
         name VARCHAR(255), applied_on VARCHAR(255), checksum VARCHAR(255))",
    )
    .await
    .unwrap();
    for m in taskwarden::db::migrate::known()
        .into_iter()
        .filter(|m| m.version <= 7)
    {
        c.batch_execute(&m.sql).await.unwrap();
        c.execute(
            "INSERT INTO public.refinery_schema_history VALUES ($1, $2, '2026-11-01T00:00:00Z', $3)",
            &[&m.version, &m.name, &m.checksum],
        )
        .await
        .unwrap();
    }
}

/// Rows, ids and text of everything a moved installation must keep.
const SNAPSHOT: &[&str] = &[
    "SELECT string_agg(format('%s|%s|%s|%s|%s|%s|%s|%s', id, agent, status, payload, attempts, \
     coalesce(error, ''), coalesce(step_key, ''), coalesce(objective_id::text, '')), E'\\n' ORDER BY id) FROM SCHEMA.tasks",
    "SELECT string_agg(format('%s|%s|%s|%s', id, task_id, kind, data), E'\\n' ORDER BY id) FROM SCHEMA.task_events",
    "SELECT string_agg(format('%s|%s', id, title), E'\\n' ORDER BY id) FROM SCHEMA.objectives",
    "SELECT string_agg(format('%s|%s', agent, reason), E'\\n' ORDER BY agent) FROM SCHEMA.paused_agents",
    "SELECT string_agg(format('%s|%s', name, last_due), E'\\n' ORDER BY name) FROM SCHEMA.schedules",
];

async fn snapshot(c: &tokio_postgres::Client, schema: &str) -> Vec<String> {
    let mut out = Vec::new();
    for q in SNAPSHOT {
        let row = c
            .query_one(&q.replace("SCHEMA", schema), &[])
            .await
            .unwrap();
        out.push(row.get::<_, Option<String>>(0).unwrap_or_default());
    }
    out
}

/// A database built by the migrations of before v8, with tasks in every state, their
/// events, an objective with steps, a pause and a schedule, and an application role
/// that enqueued through `public.taskwarden_enqueue`: the new daemon moves it all into
/// `taskwarden` without a row lost or changed, and the old function still enqueues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installation_in_public_is_moved_in_place() {
    moved_in_place(None).await;
}

/// The same into a schema whose name ends in the default's (the SQL's qualifier is
/// rewritten once, not again inside the new name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installation_in_public_is_moved_into_a_schema_named_like_the_default() {
    moved_in_place(Some("staging_taskwarden")).await;
}

async fn moved_in_place(schema: Option<&str>) {
    let target = schema.unwrap_or("taskwarden");
    bounded(TEST_LIMIT, async {
        let t = TestDb::new_unmigrated().await;
        let admin = t.admin().await;
        admin.batch_execute("SET search_path = public").await.unwrap();
        install_as_before_v8(&admin).await;
        let app_role = role("twold");
        admin
            .batch_execute(&format!(
                "CREATE ROLE {app_role} LOGIN;
                 GRANT CONNECT ON DATABASE {db} TO {app_role};
                 GRANT USAGE ON SCHEMA public TO {app_role};
                 GRANT SELECT, INSERT ON public.tasks TO {app_role};
                 GRANT SELECT ON public.enqueue_defaults TO {app_role};
                 GRANT USAGE ON SEQUENCE public.tasks_id_seq TO {app_role};

                 INSERT INTO public.objectives (title) VALUES ('quarterly close');
                 INSERT INTO public.tasks (agent, payload, status, attempts, error, finished_at, started_at)
                 VALUES ('rec', '{{\"n\": 101}}', 'succeeded', 1, NULL, now(), now()),
                        ('rec', '{{\"n\": 102}}', 'failed', 3, 'exit status 3: bad', now(), now()),
                        ('rec', '{{\"n\": 103}}', 'cancelled', 0, 'cancelled by operator', now(), NULL),
                        ('rec', '{{\"n\": 104}}', 'timed_out', 1, 'ran past 30s', now(), now());
                 -- A task another (dead) instance was running, with a lease far ahead, and
                 -- one queued for much later: both must survive untouched.
                 INSERT INTO public.tasks (agent, payload, status, attempts, lease_owner, lease_expires_at, started_at)
                 VALUES ('elsewhere', '{{\"n\": 105}}', 'running', 1, 'gone-instance', now() + interval '1 hour', now());
                 INSERT INTO public.tasks (agent, payload, run_after)
                 VALUES ('rec', '{{\"n\": 106}}', now() + interval '1 day');
                 INSERT INTO public.tasks (objective_id, step_key, depends_on, agent, payload, status, finished_at)
                 VALUES (1, 'fetch', '{{}}', 'rec', '{{\"n\": 107}}', 'succeeded', now()),
                        (1, 'sum', '{{fetch}}', 'rec', '{{\"n\": 108}}', 'succeeded', now());
                 INSERT INTO public.task_events (task_id, kind, data)
                 SELECT id, 'log', jsonb_build_object('line', 'event of ' || id) FROM public.tasks;
                 INSERT INTO public.paused_agents (agent, paused_by, reason) VALUES ('elsewhere', 'ops', 'vendor down');
                 INSERT INTO public.schedules (name, last_due) VALUES ('nightly', '2026-11-30T00:00:00Z');",
                db = t.name
            ))
            .await
            .unwrap();
        // The application's enqueue, as it was written against the old version.
        let app = connect_as(&t, &app_role).await;
        let old_id: i64 = app
            .query_one("SELECT taskwarden_enqueue('rec', '{\"n\": 109}')", &[])
            .await
            .unwrap()
            .get(0);
        let before = snapshot(&admin, "public").await;
        assert!(before[0].lines().count() == 9 && before[1].lines().count() == 8, "{before:?}");

        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&t, dir.path(), "ran.log", schema);
        let (mut d, base) = start(dir.path(), &cfg, &t.url());
        assert!(
            tokio::task::block_in_place(|| d.wait_for("moved into the schema", LIMIT)).is_some(),
            "no word of the move in the log:\n{}",
            d.output()
        );
        let http = http_client(Duration::from_secs(20));
        // The task the old enqueue queued runs (the tables, trigger and sequence moved).
        assert!(wait_status(&http, &base, old_id, "succeeded").await);

        // Nothing left in public; everything in taskwarden, as it was (the one queued
        // task that ran is compared apart).
        let leftovers = count(
            &admin,
            "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'S')",
        )
        .await;
        assert_eq!(leftovers, 0, "tables or sequences left in public");
        let after = snapshot(&admin, target).await;
        let strip = |s: &str| {
            s.lines()
                .filter(|l| !l.starts_with(&format!("{old_id}|")))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(strip(&before[0]), strip(&after[0]), "tasks changed in the move");
        assert!(after[1].starts_with(&before[1]), "events changed in the move");
        assert_eq!(before[2..], after[2..], "objectives, pauses or schedules changed");
        let ran = payload_counts(&dir.path().join("ran.log"));
        assert_eq!(ran.keys().copied().collect::<Vec<_>>(), vec![109], "{ran:?}");

        // The old name, now a wrapper in public, still enqueues for the role that used
        // it; the sequence went on from where it was.
        let new_id: i64 = app
            .query_one("SELECT taskwarden_enqueue('rec', '{\"n\": 110}')", &[])
            .await
            .expect("the old enqueue after the move")
            .get(0);
        assert!(new_id > old_id);
        let via_new: i64 = app
            .query_one(&format!("SELECT {target}.enqueue('rec', '{{\"n\": 111}}')"), &[])
            .await
            .expect("the new enqueue for a role that could enqueue before")
            .get(0);
        assert!(wait_status(&http, &base, new_id, "succeeded").await);
        assert!(wait_status(&http, &base, via_new, "succeeded").await);
        stop(d);

        // A second start finds nothing to move and nothing to apply.
        let (d, _) = start(dir.path(), &cfg, &t.url());
        let out = stop(d);
        assert!(!out.contains("moved into the schema"), "{out}");
        assert!(!out.contains("migration applied"), "{out}");
    })
    .await;
}

/// Two deployments, schemas `alpha` and `beta`, in one database: each runs, lists and
/// wakes only for its own tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schemas_in_one_database_see_nothing_of_each_other() {
    bounded(TEST_LIMIT, async {
        let t = TestDb::new_unmigrated().await;
        let admin = t.admin().await;
        // Another deployment's migration holds the default schema's lock the whole time:
        // each schema migrates under its own.
        admin
            .batch_execute("SELECT pg_advisory_lock(x'74776d6967726174'::int8)")
            .await
            .unwrap();
        // An agent holding a database session for a few seconds; ended early, psql fails
        // and so does the task (max_attempts 1).
        let sleeper = format!(
            "[agents.sleeper]\nkind = \"command\"\ncommand = [\"psql\", {:?}, \"-X\", \"-q\", \"-v\", \"ON_ERROR_STOP=1\", \"-c\", \"SELECT pg_sleep(4)\"]\n",
            t.url()
        );
        let dir_a = tempfile::tempdir().unwrap();
        let dir_b = tempfile::tempdir().unwrap();
        let (da, base_a) = start(
            dir_a.path(),
            &config_with(&t, dir_a.path(), "ran.log", Some("alpha"), "", &sleeper),
            &t.url(),
        );
        let (db, base_b) = start(
            dir_b.path(),
            &config_with(&t, dir_b.path(), "ran.log", Some("beta"), "", &sleeper),
            &t.url(),
        )
;
        let http = http_client(Duration::from_secs(20));
        let mut ids_a = Vec::new();
        for n in 1..=5 {
            ids_a.push(
                submit_task(&http, &base_a, "rec", json!({"n": n}))
                    .await
                    .unwrap(),
            );
        }
        let mut ids_b = Vec::new();
        for n in 11..=13 {
            ids_b.push(
                submit_task(&http, &base_b, "rec", json!({"n": n}))
                    .await
                    .unwrap(),
            );
        }
        // Task ids are each schema's own, so alpha's first task and beta's share id 1: the
        // other deployment's supervisor must not take alpha's agent session for its own
        // (nor end it as the session of a task that is not running).
        let slept = submit_task(&http, &base_a, "sleeper", json!({})).await.unwrap();
        // Enqueued from SQL into one schema: the other deployment never sees it.
        let sql_id: i64 = admin
            .query_one("SELECT alpha.enqueue('rec', '{\"n\": 100}')", &[])
            .await
            .unwrap()
            .get(0);
        ids_a.push(sql_id);
        for id in &ids_a {
            assert!(
                wait_status(&http, &base_a, *id, "succeeded").await,
                "alpha task {id}"
            );
        }
        for id in &ids_b {
            assert!(
                wait_status(&http, &base_b, *id, "succeeded").await,
                "beta task {id}"
            );
        }
        assert!(
            wait_status(&http, &base_a, slept, "succeeded").await,
            "alpha's agent session was ended"
        );
        let text = common::daemon::scrape(&http, &base_b).await;
        assert_eq!(
            taskwarden::metrics::parse_value(
                &text,
                taskwarden::metrics::DB_BACKENDS_TERMINATED_TOTAL,
                &[]
            ),
            Some(0.0),
            "beta terminated a backend"
        );
        let ran_a = payload_counts(&dir_a.path().join("ran.log"));
        let ran_b = payload_counts(&dir_b.path().join("ran.log"));
        assert_eq!(
            ran_a.keys().copied().collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5, 100]
        );
        assert_eq!(ran_b.keys().copied().collect::<Vec<_>>(), vec![11, 12, 13]);

        // Ids are each schema's own, and each API lists only its own.
        let list = |base: String| {
            let http = http.clone();
            async move {
                let v: Value = http
                    .get(format!("{base}/v1/tasks?limit=100"))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                v["tasks"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|t| t["payload"]["n"].as_i64())
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            }
        };
        assert_eq!(list(base_a.clone()).await, vec![1, 2, 3, 4, 5, 100]);
        assert_eq!(list(base_b.clone()).await, vec![11, 12, 13]);
        assert_eq!(
            count(&admin, "SELECT count(*) FROM alpha.instances").await,
            1
        );
        assert_eq!(
            count(&admin, "SELECT count(*) FROM beta.instances").await,
            1
        );
        assert_eq!(
            count(
                &admin,
                "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
            )
            .await,
            0,
            "nothing is created in public"
        );
        stop(da);
        stop(db);
    })
    .await;
}
