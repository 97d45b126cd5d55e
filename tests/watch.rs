//! Issue 26: the applications' sessions under `[watch.NAME]` rules, against the built
//! daemon and real `psql` sessions. With `action = "terminate"` a watched session idle in
//! a transaction past the limit is terminated, its long query cancelled, a session past
//! `session_max_age` terminated, the budget alert fires and clears; an unwatched
//! application's sessions are never touched. With `action = "alert"` the same is logged
//! and counted and nothing is ended. Server-wide connection use fires
//! `server_connections_high` on a small cluster of the test's own, and clears.

mod common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::daemon::{
    Daemon, bounded, firing_for, http_client, metric_value as metric, scrape, status_json as status,
};
use common::{TestDb, count, eventually};

const LIMIT: Duration = Duration::from_secs(30);

/// A psql session named `app`, fed `sql` on stdin and then kept open (stdin stays open
/// until the session is dropped).
struct Psql {
    child: Child,
}

impl Psql {
    fn open(url: &str, app: &str, sql: &str) -> Psql {
        let mut child = Command::new(common::replica::bindir().join("psql"))
            .args(["-X", "-q", "-d", url])
            .env("PGAPPNAME", app)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if let Some(stdin) = child.stdin.as_mut() {
            stdin.write_all(sql.as_bytes()).unwrap();
            stdin.write_all(b"\n").unwrap();
            stdin.flush().unwrap();
        }
        Psql { child }
    }
}

impl Drop for Psql {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The backend pids carrying `app` exactly.
async fn pids(c: &tokio_postgres::Client, app: &str) -> Vec<i32> {
    c.query(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
        &[&app],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn config(t: &TestDb, rules: &str) -> String {
    format!(
        "[database]\napplication_name = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n\
         [supervisor]\ninterval = \"300ms\"\n{rules}",
        t.application_name
    )
}

/// A daemon on this test's database with `rules`, once it is ready: the daemon, its base
/// URL, an HTTP client, and the directory its config lives in (kept while it runs).
fn start(t: &TestDb, rules: &str) -> (Daemon, String, reqwest::Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = t.url();
    let mut d = Daemon::start(
        dir.path(),
        &config(t, rules),
        &[("TASKWARDEN_DATABASE_URL", url.as_str())],
    );
    let base = d.base_url();
    (d, base, http_client(Duration::from_secs(10)), dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminate_rule_ends_what_passes_its_limits_and_nothing_unwatched() {
    bounded(Duration::from_secs(120), async {
        let t = TestDb::new().await;
        // Names of this test's own: the cluster is shared with tests running beside it.
        let tag = format!("w{}", std::process::id());
        let app = format!("{tag}-myapp");
        let rules = format!(
            "[watch.myapp]\napplication_name = \"{app}*\"\nmax_sessions = 5\n\
             idle_in_transaction_max = \"3s\"\nsession_max_age = \"20s\"\n\
             query_max_duration = \"2s\"\naction = \"terminate\"\n"
        );
        let url = t.url();
        let (mut d, base, http, _dir) = start(&t, &rules);
        let c = t.admin().await;

        let leaked_name = format!("{app}:task_tracking.py:41:create_task_in_db");
        let other_name = format!("{tag}-other-app");
        let query_name = format!("{app}:report.py:7:slow_report");
        let _leaked = Psql::open(&url, &leaked_name, "BEGIN; SELECT 1;");
        let _other = Psql::open(&url, &other_name, "BEGIN; SELECT 1;");
        let _slow = Psql::open(&url, &query_name, "SELECT pg_sleep(60);");
        assert!(
            eventually(LIMIT, || async {
                pids(&c, &leaked_name).await.len() == 1
                    && pids(&c, &other_name).await.len() == 1
                    && pids(&c, &query_name).await.len() == 1
            })
            .await
        );
        let other_pid = pids(&c, &other_name).await[0];
        let query_pid = pids(&c, &query_name).await[0];

        // The watched session idle in its transaction is terminated after 3 s; the
        // unwatched one stays; the long query is cancelled, its session kept.
        let gone = eventually(LIMIT, || async { pids(&c, &leaked_name).await.is_empty() }).await;
        assert!(gone, "not terminated:\n{}", d.drain());
        // psql goes on after the cancelled statement: the query ends, the session stays
        // (same backend), idle.
        let ended = eventually(LIMIT, || async {
            count(
                &c,
                &format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{query_name}' \
                     AND state = 'idle' AND pid = {query_pid}"
                ),
            )
            .await
                == 1
        })
        .await;
        assert!(ended, "the long query was not cancelled:\n{}", d.drain());
        assert_eq!(
            pids(&c, &other_name).await,
            vec![other_pid],
            "an unwatched session was touched"
        );
        let out = d.drain();
        assert!(
            out.contains("past its rule's idle_in_transaction_max") && out.contains(&leaked_name),
            "{out}"
        );
        assert!(
            out.contains("terminated a watched application's session"),
            "{out}"
        );
        assert!(
            out.contains("cancelled a watched application's query"),
            "{out}"
        );

        // Five watched sessions: the budget alert fires for this rule, naming the caller.
        let caller = format!("{app}:handlers.py:88:create_task");
        let _five: Vec<Psql> = (0..4).map(|_| Psql::open(&url, &caller, "SELECT 1;")).collect();
        let fired = eventually(LIMIT, || async {
            firing_for(&status(&http, &base).await, "watch_sessions_high", Some("myapp"))
        })
        .await;
        assert!(fired, "watch_sessions_high did not fire:\n{}", d.drain());
        let s = status(&http, &base).await;
        let rule = &s["watch"]["rules"]["myapp"];
        assert_eq!(rule["sessions_total"], 5, "{rule}");
        let listed = rule["sessions"].as_array().unwrap();
        let ages: Vec<f64> = listed
            .iter()
            .map(|x| x["age_seconds"].as_f64().unwrap())
            .collect();
        assert!(ages.windows(2).all(|w| w[0] >= w[1]), "not oldest first: {ages:?}");
        assert!(
            listed.iter().any(|x| x["application_name"] == caller.as_str()),
            "{rule}"
        );
        assert!(d.drain().contains("most opened by") && d.output().contains(&caller));
        let cli = Command::new(common::bin())
            .arg("status")
            .env("TASKWARDEN_URL", &base)
            .output()
            .unwrap();
        let cli = String::from_utf8_lossy(&cli.stdout);
        assert!(cli.contains("WATCH myapp") && cli.contains(&caller), "{cli}");
        let text = scrape(&http, &base).await;
        assert_eq!(
            metric(&text, "taskwarden_watch_sessions{watch=\"myapp\",state=\"idle\"}"),
            5.0,
            "{text}"
        );
        assert_eq!(metric(&text, "taskwarden_watch_max_sessions{watch=\"myapp\"}"), 5.0);
        assert_eq!(
            metric(
                &text,
                "taskwarden_watch_sessions_terminated_total{watch=\"myapp\",reason=\"idle_in_transaction_max\"}"
            ),
            1.0
        );
        assert_eq!(
            metric(&text, "taskwarden_watch_queries_cancelled_total{watch=\"myapp\"}"),
            1.0
        );
        common::promtool_check_metrics(&text);

        // Past session_max_age (20 s) every watched session is terminated, the alert
        // clears; the unwatched one, as old, is still there.
        let all_gone = eventually(Duration::from_secs(40), || async {
            pids(&c, &caller).await.is_empty() && pids(&c, &query_name).await.is_empty()
        })
        .await;
        assert!(all_gone, "sessions past session_max_age remain:\n{}", d.drain());
        let cleared = eventually(LIMIT, || async {
            !firing_for(&status(&http, &base).await, "watch_sessions_high", Some("myapp"))
        })
        .await;
        assert!(cleared, "watch_sessions_high did not clear");
        assert_eq!(pids(&c, &other_name).await, vec![other_pid]);
        let text = scrape(&http, &base).await;
        assert_eq!(
            metric(
                &text,
                "taskwarden_watch_sessions_terminated_total{watch=\"myapp\",reason=\"session_max_age\"}"
            ),
            5.0,
            "{text}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_rule_logs_and_counts_and_ends_nothing() {
    bounded(Duration::from_secs(90), async {
        let t = TestDb::new().await;
        let tag = format!("a{}", std::process::id());
        let app = format!("{tag}-myapp");
        let rules = format!(
            "[watch.myapp]\napplication_name = \"{app}*\"\nmax_sessions = 5\n\
             idle_in_transaction_max = \"1s\"\nsession_max_age = \"4s\"\n\
             query_max_duration = \"1s\"\n"
        );
        let url = t.url();
        let (mut d, base, http, _dir) = start(&t, &rules);
        let c = t.admin().await;
        let idle_tx = format!("{app}:task_tracking.py:41:create_task_in_db");
        let slow = format!("{app}:report.py:7:slow_report");
        let _a = Psql::open(&url, &idle_tx, "BEGIN; SELECT 1;");
        let _b = Psql::open(&url, &slow, "SELECT pg_sleep(60);");
        let counted = eventually(LIMIT, || async {
            let text = scrape(&http, &base).await;
            ["idle_in_transaction_max", "session_max_age", "query_max_duration"]
                .iter()
                .all(|r| {
                    metric(
                        &text,
                        &format!(
                            "taskwarden_watch_sessions_over_limit_total{{watch=\"myapp\",reason=\"{r}\"}}"
                        ),
                    ) >= 1.0
                })
        })
        .await;
        assert!(counted, "{}", d.drain());
        // Logged once per session and limit, however many ticks see it.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let out = d.drain();
        assert_eq!(
            out.matches("past its rule's idle_in_transaction_max").count(),
            1,
            "{out}"
        );
        assert_eq!(out.matches("past its rule's session_max_age").count(), 2, "{out}");
        assert!(!out.contains("terminated a watched"), "{out}");
        assert!(!out.contains("cancelled a watched"), "{out}");
        assert_eq!(pids(&c, &idle_tx).await.len(), 1, "alert-only ended a session");
        let still_sleeping: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state = 'active'",
                &[&slow],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(still_sleeping, 1, "alert-only cancelled a query");
        let text = scrape(&http, &base).await;
        assert_eq!(
            metric(
                &text,
                "taskwarden_watch_sessions_terminated_total{watch=\"myapp\",reason=\"session_max_age\"}"
            ),
            0.0
        );
    })
    .await;
}

/// Server-wide use on a server of the test's own (20 connections, 3 reserved: 17 for
/// ordinary roles): connections opened until `server_connections_high` fires, closed
/// until it clears; then a role at its connection limit fires it alone. The rules are
/// reloaded with SIGHUP: a rule added to the file applies without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_connections_high_fires_and_clears_and_rules_reload() {
    bounded(Duration::from_secs(120), async {
        let cluster = common::cluster::Cluster::start(
            "-c max_connections=20 -c superuser_reserved_connections=3",
        );
        cluster.psql("CREATE ROLE capped LOGIN CONNECTION LIMIT 4");
        let dir = tempfile::tempdir().unwrap();
        let url = cluster.url("taskwarden", "postgres");
        let base_cfg = "[database]\npool_size = 2\nmax_overflow = 0\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [supervisor]\ninterval = \"300ms\"\n";
        let mut d = Daemon::start(
            dir.path(),
            base_cfg,
            &[("TASKWARDEN_DATABASE_URL", url.as_str())],
        );
        let base = d.base_url();
        let http = http_client(Duration::from_secs(10));
        let read = eventually(LIMIT, || async {
            !status(&http, &base).await["watch"].is_null()
        })
        .await;
        assert!(read, "no watch reading:\n{}", d.drain());
        let s = status(&http, &base).await;
        assert_eq!(s["watch"]["server"]["max"], 17, "{}", s["watch"]);

        let mut held = Vec::new();
        let mut fired = false;
        for _ in 0..17 {
            let pg = cluster.pg("taskwarden", "postgres");
            let Ok((client, conn)) = pg.connect(tokio_postgres::NoTls).await else {
                break;
            };
            tokio::spawn(conn);
            held.push(client);
            fired = eventually(Duration::from_secs(1), || async {
                firing_for(&status(&http, &base).await, "server_connections_high", None)
            })
            .await;
            if fired {
                break;
            }
        }
        assert!(fired, "never fired with {} more connections:\n{}", held.len(), d.drain());
        let s = status(&http, &base).await;
        let srv = &s["watch"]["server"];
        assert!(
            srv["utilization"].as_f64().unwrap() >= 0.8,
            "fired below the line: {srv}"
        );
        let text = scrape(&http, &base).await;
        assert_eq!(metric(&text, "taskwarden_server_max_connections"), 17.0);
        assert!(metric(&text, "taskwarden_server_connections{state=\"idle\"}") >= 1.0);
        held.clear();
        let cleared = eventually(LIMIT, || async {
            !firing_for(&status(&http, &base).await, "server_connections_high", None)
        })
        .await;
        assert!(cleared, "did not clear:\n{}", d.drain());

        // A role at its own limit (4 of 4) fires it, the server being far from full.
        for _ in 0..4 {
            let (client, conn) = cluster
                .pg("capped", "postgres")
                .connect(tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            held.push(client);
        }
        let fired = eventually(LIMIT, || async {
            firing_for(&status(&http, &base).await, "server_connections_high", None)
        })
        .await;
        assert!(fired, "a role at its limit did not fire it:\n{}", d.drain());
        assert!(d.drain().contains("capped 4 of 4"), "{}", d.output());

        // A rule added to the file applies at SIGHUP.
        let _app = Psql::open(&cluster.url("capped", "postgres"), "reloaded-app", "SELECT 1;");
        held.pop();
        std::fs::write(
            dir.path().join("config.toml"),
            format!("{base_cfg}[watch.late]\napplication_name = \"reloaded-*\"\n"),
        )
        .unwrap();
        d.signal(nix::sys::signal::Signal::SIGHUP);
        let seen = eventually(LIMIT, || async {
            status(&http, &base).await["watch"]["rules"]["late"]["sessions_total"] == 1
        })
        .await;
        assert!(seen, "the reloaded rule does not apply:\n{}", d.drain());
    })
    .await;
}

/// A terminate rule as wide as `*` (in this test's database) ends an application's session
/// past its age, and never the daemon's own: its pool's, its listener's and supervisor's
/// (`<name>:listener`, `<name>:supervisor`). Tasks keep running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_as_wide_as_everything_spares_the_daemons_own_sessions() {
    bounded(Duration::from_secs(90), async {
        let t = TestDb::new().await;
        let rules = format!(
            "[watch.all]\napplication_name = \"*\"\ndatabase = \"{}\"\n\
             session_max_age = \"2s\"\naction = \"terminate\"\n\
             [agents.ok]\nkind = \"command\"\ncommand = [\"cat\"]\n",
            t.name
        );
        let url = t.url();
        let (mut d, base, http, _dir) = start(&t, &rules);
        let victim = format!("v{}-victim", std::process::id());
        let _v = Psql::open(&url, &victim, "SELECT 1;");
        // Each check on a connection of its own, younger than the rule's 2 s.
        let gone = eventually(LIMIT, || async {
            let c = t.admin().await;
            count(
                &c,
                &format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{victim}'"),
            )
            .await
                == 0
        })
        .await;
        assert!(gone, "the application's session was not ended:\n{}", d.drain());
        // Several ages of 2 s later, the daemon's own sessions are all still there.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let out = d.drain();
        let ours = &t.application_name;
        assert!(
            !out.lines().any(|l| l.contains("terminated a watched") && l.contains(ours.as_str())),
            "the daemon ended its own sessions:\n{out}"
        );
        assert!(!out.contains("lost its connection"), "{out}");
        let c = t.admin().await;
        let own = count(
            &c,
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name IN ('{ours}:listener', '{ours}:supervisor')"
            ),
        )
        .await;
        assert_eq!(own, 2, "{out}");
        let id = common::daemon::submit_task(&http, &base, "ok", serde_json::json!({}))
            .await
            .unwrap();
        let done = eventually(LIMIT, || async {
            common::daemon::task_status(&http, &base, id).await.as_deref() == Some("succeeded")
        })
        .await;
        assert!(done, "{}", d.drain());
    })
    .await;
}

/// Run by a role without `pg_read_all_stats`, the daemon still sees another role's
/// sessions a rule matches (PostgreSQL hides their type, state and ages): counted as
/// `unknown`, in the server's figures too, the missing grant said once, nothing ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pg_read_all_stats_other_roles_sessions_still_count() {
    bounded(Duration::from_secs(90), async {
        let t = TestDb::new_unmigrated().await;
        let low = format!("watchlow{}", std::process::id());
        let c = t.admin().await;
        c.batch_execute(&format!(
            "CREATE ROLE {low} LOGIN; GRANT CONNECT, CREATE ON DATABASE {db} TO {low};",
            db = t.name
        ))
        .await
        .unwrap();
        let tag = format!("u{}", std::process::id());
        let rules = format!(
            "[watch.app]\napplication_name = \"{tag}-*\"\nmax_sessions = 100\n\
             idle_in_transaction_max = \"1s\"\naction = \"terminate\"\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let user = t.pg.get_user().unwrap_or("postgres").to_string();
        let url_low = t.url().replacen(
            &format!("postgresql://{user}"),
            &format!("postgresql://{low}"),
            1,
        );
        let mut d = Daemon::start(
            dir.path(),
            &config(&t, &rules),
            &[("TASKWARDEN_DATABASE_URL", url_low.as_str())],
        );
        let base = d.base_url();
        let http = http_client(Duration::from_secs(10));
        // The superuser's session, idle in a transaction: invisible in detail to `low`.
        let name = format!("{tag}-app:jobs.py:3:run");
        let _s = Psql::open(&t.url(), &name, "BEGIN; SELECT 1;");
        let seen = eventually(LIMIT, || async {
            let s = status(&http, &base).await;
            s["watch"]["rules"]["app"]["sessions_total"] == 1
                && s["watch"]["rules"]["app"]["by_state"]["unknown"] == 1
        })
        .await;
        assert!(seen, "{}", status(&http, &base).await["watch"]);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let out = d.drain();
        assert_eq!(
            out.matches("missing_grant=\"pg_read_all_stats\"").count()
                + out.matches("missing_grant=pg_read_all_stats").count(),
            1,
            "{out}"
        );
        assert_eq!(
            pids(&c, &name).await.len(),
            1,
            "a session it cannot see was ended"
        );
        let s = status(&http, &base).await;
        assert!(
            s["watch"]["server"]["by_state"]["unknown"]
                .as_i64()
                .unwrap_or(0)
                >= 1,
            "{}",
            s["watch"]["server"]
        );
        assert!(s["ready"] == true, "{s}");
    })
    .await;
}
