//! Who owns the embedded PostgreSQL: the daemon's own cluster under `database.data_dir`
//! must not be taken over, stopped or restarted behind a running daemon's back — not by a
//! second `taskwarden run`, not by `taskwarden migrate` — and the daemon must stop it in
//! order on Ctrl-C and notice when it dies.
//!
//! The `eventually` limits below only guard against hangs; they are not timing assertions.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, alive};
use common::{bin, eventually};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use taskwarden::db::embedded::{Cluster, ClusterOptions, EMBEDDED_DB};

/// Upper bound of one test, whatever happens.
const TEST_LIMIT: Duration = Duration::from_secs(180);
const LIMIT: Duration = Duration::from_secs(60);
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
const READY: &str = "taskwarden ready";

fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("pgdata/postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// A config for an embedded daemon on `data`, plus keys of `[workers]` and more sections.
fn embedded_config(data: &Path, workers: &str, extra: &str) -> String {
    format!(
        "[database]\ndata_dir = {:?}\n[workers]\npoll_interval = \"200ms\"\n{workers}\
         [agents.cat]\nkind = \"command\"\ncommand = [\"cat\"]\n{extra}",
        data.display().to_string()
    )
}

async fn bounded(body: impl std::future::Future<Output = ()>) {
    common::daemon::bounded(TEST_LIMIT, body).await
}

fn client() -> reqwest::Client {
    common::daemon::http_client(HTTP_TIMEOUT)
}

fn ready(d: &mut Daemon) -> String {
    d.base_url()
}

async fn readyz(http: &reqwest::Client, base: &str) -> u16 {
    http.get(format!("{base}/readyz"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn submit(http: &reqwest::Client, base: &str, agent: &str, payload: Value) -> Option<i64> {
    common::daemon::submit_task(http, base, agent, payload).await
}

async fn task_status(http: &reqwest::Client, base: &str, id: i64) -> Option<String> {
    common::daemon::task_status(http, base, id).await
}

/// Within `limit`: /readyz is 200 and a task submitted now (retried until the API takes
/// it) succeeds.
async fn serving(http: &reqwest::Client, base: &str, limit: Duration) -> bool {
    let probe = std::cell::Cell::new(None);
    eventually(limit, || async {
        if readyz(http, base).await != 200 {
            return false;
        }
        match probe.get() {
            None => {
                probe.set(submit(http, base, "cat", json!({"probe": true})).await);
                false
            }
            Some(id) => task_status(http, base, id).await.as_deref() == Some("succeeded"),
        }
    })
    .await
}

/// Whether `pid` appears in `text` as a number of its own (not inside a longer one).
fn mentions_pid(text: &str, pid: u32) -> bool {
    let p = pid.to_string();
    text.match_indices(&p).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + p.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_digit()) && !after.is_some_and(|c| c.is_ascii_digit())
    })
}

fn sigterm_and_wait(d: &mut Daemon) -> std::process::ExitStatus {
    d.signal(Signal::SIGTERM);
    tokio::task::block_in_place(|| d.wait_exit(LIMIT))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_on_the_same_data_dir_is_refused_and_the_first_keeps_serving() {
    bounded(async {
        let dir1 = tempfile::tempdir().unwrap();
        let dir2 = tempfile::tempdir().unwrap();
        let data = dir1.path().join("data");
        let config = embedded_config(&data, "", "");
        let mut d1 = Daemon::start(dir1.path(), &config, &[]);
        let base = ready(&mut d1);
        let pg = postmaster_pid(&data).expect("postmaster.pid of the first daemon");
        assert!(alive(pg));
        let first_pid = d1.child.id();

        // Same data_dir, its own HTTP port (the harness picks 127.0.0.1:0).
        let mut d2 = Daemon::start(dir2.path(), &config, &[]);
        let deadline = Instant::now() + LIMIT;
        let st = loop {
            if let Some(st) = d2.child.try_wait().unwrap() {
                break st;
            }
            if tokio::task::block_in_place(|| d2.wait_for(READY, Duration::from_millis(200)))
                .is_some()
            {
                panic!(
                    "a second daemon started on the same data_dir and became ready; postmaster \
                     now {:?} (was {pg}, alive: {}); second daemon output:\n{}",
                    postmaster_pid(&data),
                    alive(pg),
                    d2.drain()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the second daemon neither exited nor became ready; output:\n{}",
                d2.drain()
            );
        };
        tokio::task::block_in_place(|| d2.wait_exit(Duration::from_secs(5)));
        let out2 = d2.output();
        println!("second daemon: {st:?}\n{out2}");
        assert!(!st.success(), "second daemon exited 0:\n{out2}");
        assert!(
            mentions_pid(&out2, first_pid),
            "the refusal does not name the running daemon's pid {first_pid}:\n{out2}"
        );

        let http = client();
        assert!(
            serving(&http, &base, Duration::from_secs(30)).await,
            "the first daemon stopped serving; output:\n{}",
            d1.drain()
        );
        assert_eq!(
            postmaster_pid(&data),
            Some(pg),
            "the first daemon's PostgreSQL was replaced"
        );
        assert!(alive(pg), "the first daemon's PostgreSQL {pg} died");

        let st = sigterm_and_wait(&mut d1);
        assert!(st.success(), "exit {st:?}; output:\n{}", d1.output());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_on_a_running_data_dir_leaves_the_daemon_serving() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let config = embedded_config(&data, "", "");
        let mut d = Daemon::start(dir.path(), &config, &[]);
        let base = ready(&mut d);
        let pg = postmaster_pid(&data).expect("postmaster.pid");

        let out_path = dir.path().join("migrate.out");
        let out = std::fs::File::create(&out_path).unwrap();
        let mut m = Command::new(bin())
            .arg("migrate")
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .current_dir(dir.path())
            .env_remove("TASKWARDEN_DATABASE_URL")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(90);
        let st = loop {
            if let Some(st) = m.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = m.kill();
                let _ = m.wait();
                panic!(
                    "taskwarden migrate did not exit; output:\n{}",
                    std::fs::read_to_string(&out_path).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        println!("migrate: {st:?}\n{text}");
        // README: on a data_dir a running daemon owns, `migrate` migrates through that
        // daemon's server — it succeeds, it does not refuse.
        assert!(
            st.success(),
            "migrate on a running daemon's data_dir failed ({st:?}):\n{text}"
        );

        let http = client();
        assert!(
            serving(&http, &base, Duration::from_secs(30)).await,
            "the daemon stopped serving after `taskwarden migrate` (postmaster now {:?}, was {pg}, alive: {}); output:\n{}",
            postmaster_pid(&data),
            alive(pg),
            d.drain()
        );
        assert_eq!(
            postmaster_pid(&data),
            Some(pg),
            "migrate replaced the daemon's PostgreSQL"
        );
        assert!(alive(pg), "the daemon's PostgreSQL {pg} died");

        let st = sigterm_and_wait(&mut d);
        assert!(st.success(), "exit {st:?}; output:\n{}", d.output());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_to_the_whole_process_group_stops_in_order_and_exits_0() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let config = embedded_config(
            &data,
            "shutdown_grace = \"1s\"\n",
            "[agents.sleepy]\nkind = \"command\"\ncommand = [\"sleep\", \"30\"]\n",
        );
        // As a shell runs a foreground job: the daemon leads its own process group, and a
        // terminal's Ctrl-C goes to the whole group.
        let mut d = Daemon::start_in_own_group(dir.path(), &config, &[]);
        let base = ready(&mut d);
        let pg = postmaster_pid(&data).expect("postmaster.pid");
        let http = client();
        let mut ids = Vec::new();
        for n in 0..2 {
            ids.push(
                submit(&http, &base, "sleepy", json!({ "n": n }))
                    .await
                    .expect("task accepted"),
            );
        }
        for &id in &ids {
            assert!(
                eventually(LIMIT, || async {
                    task_status(&http, &base, id).await.as_deref() == Some("running")
                })
                .await,
                "task {id} never ran; output:\n{}",
                d.drain()
            );
        }

        let pgid = Pid::from_raw(d.child.id() as i32);
        killpg(pgid, Signal::SIGINT).unwrap();
        let st = tokio::task::block_in_place(|| d.wait_exit(LIMIT));
        let out = d.output();
        println!("exit {st:?}; output:\n{out}");
        let stopped = eventually(Duration::from_secs(15), || async { !alive(pg) }).await;
        let errors: Vec<&str> = out
            .lines()
            .filter(|l| l.contains(" ERROR ") || l.contains("\"level\":\"ERROR\""))
            .collect();

        // What the daemon left in its database.
        let cluster = Cluster::start(&data, ClusterOptions::default())
            .await
            .expect("restart the cluster to inspect it");
        let (c, conn) = cluster
            .pg_config(EMBEDDED_DB)
            .connect(tokio_postgres::NoTls)
            .await
            .expect("connect to the embedded cluster");
        let conn = tokio::spawn(conn);
        let running: Vec<(i64, Option<String>)> = c
            .query(
                "SELECT id, lease_owner FROM tasks WHERE status = 'running' ORDER BY id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        for r in c
            .query(
                "SELECT id, status, attempts, lease_owner, error FROM tasks ORDER BY id",
                &[],
            )
            .await
            .unwrap()
        {
            println!(
                "after Ctrl-C: task {} {} attempts={} lease_owner={:?} error={:?}",
                r.get::<_, i64>(0),
                r.get::<_, String>(1),
                r.get::<_, i32>(2),
                r.get::<_, Option<String>>(3),
                r.get::<_, Option<String>>(4)
            );
        }
        drop(c);
        let _ = conn.await;
        cluster.stop().await;

        // Every finding at once, so one run shows the whole picture.
        let mut problems = Vec::new();
        if st.code() != Some(0) {
            problems.push(format!("exit {st:?} on Ctrl-C (want 0)"));
        }
        if !stopped {
            problems.push(format!("the embedded PostgreSQL {pg} is still running"));
        }
        if !errors.is_empty() {
            problems.push(format!("ERROR lines on Ctrl-C:\n{}", errors.join("\n")));
        }
        if !running.is_empty() {
            problems.push(format!(
                "tasks left marked running after Ctrl-C (id, lease_owner): {running:?}"
            ));
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    })
    .await
}

/// `taskwarden_embedded_postgres_restarts_total` as /metrics shows it (0 while absent).
async fn restarts_total(http: &reqwest::Client, base: &str) -> Option<f64> {
    let r = http.get(format!("{base}/metrics")).send().await.ok()?;
    let text = r.text().await.ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with("taskwarden_embedded_postgres_restarts_total"))
            .find_map(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or(0.0),
    )
}

/// README: a postmaster that dies under the daemon is started again — at most 3 times in
/// 10 minutes, counted in `taskwarden_embedded_postgres_restarts_total` — or else the
/// daemon exits non-zero. Killed four times in a row, it is restarted (a new pid, the
/// counter one up, tasks run again) three times, and the fourth kill ends the daemon with
/// a non-zero status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_postmaster_is_restarted_three_times_then_the_daemon_exits_nonzero() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let data: PathBuf = dir.path().join("data");
        let config = embedded_config(&data, "", "");
        let mut d = Daemon::start(dir.path(), &config, &[]);
        let base = ready(&mut d);
        let http = client();
        let mut pg = postmaster_pid(&data).expect("postmaster.pid");
        assert_eq!(restarts_total(&http, &base).await, Some(0.0));

        for n in 1..=3u32 {
            kill(Pid::from_raw(pg), Signal::SIGKILL).unwrap();
            // Hang guard only: the restart and the probe task must happen, however long
            // they take within this bound.
            let deadline = Instant::now() + Duration::from_secs(40);
            let mut probe: Option<i64> = None;
            loop {
                if let Some(st) = d.child.try_wait().unwrap() {
                    panic!(
                        "kill {n} of 3: the daemon exited ({st:?}) instead of restarting its \
                         PostgreSQL; output:\n{}",
                        d.drain()
                    );
                }
                let now_pid = postmaster_pid(&data);
                let restarted = now_pid.is_some_and(|p| p != pg && alive(p));
                if restarted && readyz(&http, &base).await == 200 {
                    match probe {
                        None => probe = submit(&http, &base, "cat", json!({"after_kill": n})).await,
                        Some(id) => {
                            if task_status(&http, &base, id).await.as_deref() == Some("succeeded")
                                && restarts_total(&http, &base).await == Some(f64::from(n))
                            {
                                break;
                            }
                        }
                    }
                }
                if Instant::now() > deadline {
                    panic!(
                        "kill {n} of 3: 40 s after its PostgreSQL {pg} was SIGKILLed the daemon \
                         had not restarted it and served again (postmaster now {now_pid:?}, \
                         readyz {}, probe task {probe:?}, restarts_total {:?}); output:\n{}",
                        readyz(&http, &base).await,
                        restarts_total(&http, &base).await,
                        d.drain()
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let new_pg = postmaster_pid(&data).unwrap();
            println!("kill {n}: postmaster {pg} -> {new_pg}");
            assert!(!alive(pg), "the killed postmaster {pg} is still alive");
            pg = new_pg;
        }

        // The fourth exit within 10 minutes is past the cap: the daemon gives up.
        kill(Pid::from_raw(pg), Signal::SIGKILL).unwrap();
        let st = tokio::task::block_in_place(|| d.wait_exit(LIMIT));
        println!("exit after the 4th kill: {st:?}; output:\n{}", d.output());
        assert!(
            !st.success(),
            "the daemon exited 0 after its PostgreSQL died a 4th time; output:\n{}",
            d.output()
        );
        assert!(
            st.code().is_some(),
            "the daemon did not exit by itself after the 4th kill ({st:?}); output:\n{}",
            d.output()
        );
    })
    .await
}
