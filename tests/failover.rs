//! Failover to a promoted synchronous standby (issue 13): the daemon is pointed at a
//! multi-host URL (`target_session_attrs=read-write`), the primary is stopped with
//! `-m immediate` while tasks are in flight, and the standby is promoted. The daemon must
//! reconnect by itself, say it is not ready during the gap, and then finish every task it
//! answered 201 for, each exactly once.
//!
//! What "exactly once" means here (docs/state_machine.md): every task answered 201 ends
//! `succeeded` (with synchronous replication no acknowledged write is lost), its success
//! written by one `running → succeeded` transition (`finished_at` set); and its program
//! ran once. The daemon survives the failover and keeps its leases (its own runs are never
//! re-queued by the leader), so nothing that ran needs to run again: a task whose claim
//! committed but whose answer was lost in the crash is re-queued when that lease expires
//! and runs then, once; a completion that committed but whose answer was lost is found
//! already written. Every program run appends `<task id> <attempt>` to a file, so a second
//! run of any task, acknowledged or not, shows.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, bounded, http_client, submit_task};
use common::eventually;
use common::replica::{PairOptions, ReplicaPair};
use futures_util::StreamExt;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// Tasks submitted before the primary stops (most still queued then), and how many more
/// must be acknowledged from the stop on.
const BEFORE: usize = 300;
const DURING: usize = 60;
/// Programs run before the primary is stopped.
const RAN_BEFORE_STOP: usize = 60;
/// How long after the promotion every acknowledged task may take to succeed.
const COMPLETION_LIMIT: Duration = Duration::from_secs(90);
const TEST_LIMIT: Duration = Duration::from_secs(400);

/// Program runs per task id (the attempts), from the side-effect file.
fn runs(log: &Path) -> BTreeMap<i64, Vec<i32>> {
    let mut m: BTreeMap<i64, Vec<i32>> = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let mut it = line.split_whitespace();
        if let (Some(Ok(id)), Some(Ok(attempt))) = (
            it.next().map(str::parse::<i64>),
            it.next().map(str::parse::<i32>),
        ) {
            m.entry(id).or_default().push(attempt);
        }
    }
    m
}

/// `/readyz` answers (status, error reason) since the poller started, with when.
type Answers = Arc<Mutex<Vec<(Instant, u16, String)>>>;

/// Polls `/readyz` every 50 ms until the rig drops its handle on `alive`.
async fn poll_readiness(http: reqwest::Client, base: String, seen: Answers, alive: Arc<()>) {
    while Arc::strong_count(&alive) > 1 {
        let (code, reason) = match http.get(format!("{base}/readyz")).send().await {
            Ok(r) => {
                let code = r.status().as_u16();
                let body: Value = r.json().await.unwrap_or_default();
                (code, body["error"].as_str().unwrap_or_default().to_string())
            }
            Err(e) => (0, e.to_string()),
        };
        seen.lock().unwrap().push((Instant::now(), code, reason));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A replica pair, a daemon on its multi-host URL with a recording agent, and a
/// readiness poller.
struct Rig {
    pair: ReplicaPair,
    d: Daemon,
    base: String,
    http: reqwest::Client,
    log: PathBuf,
    readiness: Answers,
    poller_alive: Arc<()>,
    acknowledged: Vec<i64>,
    _dir: tempfile::TempDir,
}

impl Rig {
    async fn start(opts: PairOptions) -> Rig {
        let pair = tokio::task::block_in_place(|| ReplicaPair::start_with("taskwarden", opts));
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("runs");
        // Defaults everywhere else, as an operator would run it: workers.concurrency 10,
        // lease 30 s, supervisor interval 5 s, query_timeout 15 s.
        let config = format!(
            "[database]\nurl = {:?}\napplication_name = \"twt_failover\"\n\
             [agents.rec]\nkind = \"command\"\n\
             command = [\"sh\", \"-c\", \"sleep 0.1; echo \\\"$TASKWARDEN_TASK_ID $TASKWARDEN_ATTEMPT\\\" >> {}\"]\n\
             concurrency = 10\n",
            pair.url(),
            log.display()
        );
        let mut d = Daemon::start(dir.path(), &config, &[]);
        let base = d.base_url();
        let http = http_client(Duration::from_secs(10));
        let readiness: Answers = Arc::default();
        let poller_alive = Arc::new(());
        tokio::spawn(poll_readiness(
            http.clone(),
            base.clone(),
            Arc::clone(&readiness),
            Arc::clone(&poller_alive),
        ));
        Rig {
            pair,
            d,
            base,
            http,
            log,
            readiness,
            poller_alive,
            acknowledged: Vec::new(),
            _dir: dir,
        }
    }

    /// Submits [`BEFORE`] tasks eight at a time, then waits until [`RAN_BEFORE_STOP`] ran:
    /// most are still queued, ten are running.
    async fn load(&mut self) {
        let mut submits = futures_util::stream::iter(0..BEFORE)
            .map(|n| {
                let (http, base) = (self.http.clone(), self.base.clone());
                async move { (n, submit_task(&http, &base, "rec", json!({ "n": n })).await) }
            })
            .buffer_unordered(8);
        while let Some((n, id)) = submits.next().await {
            self.acknowledged
                .push(id.unwrap_or_else(|| panic!("submit {n} refused before the failover")));
        }
        let log = self.log.clone();
        assert!(
            eventually(Duration::from_secs(60), || async {
                runs(&log).len() >= RAN_BEFORE_STOP
            })
            .await,
            "tasks did not run before the failover:\n{}",
            self.d.drain()
        );
    }

    /// Goes on submitting from now (through the gap) until [`DURING`] more are answered
    /// 201 or 30 s pass; each submit waits at most 3 s. Returns the ids answered 201.
    fn keep_submitting(&self) -> tokio::task::JoinHandle<Vec<i64>> {
        let (http, base) = (self.http.clone(), self.base.clone());
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(30);
            let mut ids = Vec::new();
            let mut answers: BTreeMap<String, usize> = BTreeMap::new();
            for n in BEFORE.. {
                if ids.len() >= DURING || Instant::now() > until {
                    break;
                }
                let sent = http
                    .post(format!("{base}/v1/tasks"))
                    .json(&json!({ "agent": "rec", "payload": { "n": n } }))
                    .timeout(Duration::from_secs(3))
                    .send()
                    .await;
                let answer = match sent {
                    Ok(r) if r.status().as_u16() == 201 => {
                        let v: Value = r.json().await.unwrap_or_default();
                        match v["id"].as_i64() {
                            Some(id) => {
                                ids.push(id);
                                "201".to_string()
                            }
                            None => "201 without an id".to_string(),
                        }
                    }
                    Ok(r) => r.status().as_u16().to_string(),
                    Err(e) if e.is_timeout() => "no answer within 3s".to_string(),
                    Err(_) => "connection error".to_string(),
                };
                *answers.entry(answer).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            println!("submits from the stop on: {answers:?}");
            ids
        })
    }

    /// Stops the primary with `-m immediate`; when it was stopped.
    fn stop_primary(&self) -> Instant {
        let at = Instant::now();
        tokio::task::block_in_place(|| self.pair.stop_primary_immediate());
        println!(
            "primary stopped with {} of {BEFORE} programs run",
            runs(&self.log).len()
        );
        at
    }

    /// Promotes the standby; when it accepted writes.
    fn promote(&self) -> Instant {
        tokio::task::block_in_place(|| self.pair.promote_standby());
        Instant::now()
    }

    /// The first `/readyz` answer after `after` with status `code`.
    fn first_answer(&self, after: Instant, code: u16) -> Option<(Instant, String)> {
        self.readiness
            .lock()
            .unwrap()
            .iter()
            .find(|(t, c, _)| *t > after && *c == code)
            .map(|(t, _, r)| (*t, r.clone()))
    }

    async fn wait_answer(&self, after: Instant, code: u16, limit: Duration) -> Option<Instant> {
        eventually(limit, || async { self.first_answer(after, code).is_some() }).await;
        self.first_answer(after, code).map(|(t, _)| t)
    }

    /// `/readyz` answers from `from` on, for a failure message.
    fn answers_since(&self, from: Instant) -> String {
        let mut out = Vec::new();
        let mut last = None;
        for (t, c, r) in self.readiness.lock().unwrap().iter() {
            if *t >= from && last != Some(*c) {
                out.push(format!("{:.2}s {c} {r}", (*t - from).as_secs_f64()));
                last = Some(*c);
            }
        }
        out.join("\n")
    }

    /// Every acknowledged task succeeds within [`COMPLETION_LIMIT`] of `since`, its
    /// success written once; every program ran once.
    async fn assert_all_completed_once(&mut self, since: Instant) {
        let (client, conn) = self
            .pair
            .pg(&self.pair.standby)
            .connect(tokio_postgres::NoTls)
            .await
            .expect("connect to the promoted standby");
        tokio::spawn(conn);
        let ids = self.acknowledged.clone();
        let statuses = || async {
            client
                .query(
                    "SELECT id, status, finished_at IS NOT NULL FROM tasks WHERE id = ANY($1)",
                    &[&ids],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r.get::<_, i64>(0),
                        (r.get::<_, String>(1), r.get::<_, bool>(2)),
                    )
                })
                .collect::<BTreeMap<i64, (String, bool)>>()
        };
        let all_succeeded = eventually(COMPLETION_LIMIT, || async {
            let s = statuses().await;
            s.values().filter(|(st, _)| st == "succeeded").count() == ids.len()
        })
        .await;
        println!(
            "every acknowledged task succeeded {:.2}s after the database took writes again: {all_succeeded}",
            since.elapsed().as_secs_f64()
        );
        let tasks = statuses().await;
        let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
        for (s, _) in tasks.values() {
            *by_status.entry(s.as_str()).or_default() += 1;
        }
        assert!(
            all_succeeded,
            "not every acknowledged task succeeded within {COMPLETION_LIMIT:?}: {} acknowledged, \
             by status {by_status:?}, {} missing from the table; daemon output:\n{}",
            ids.len(),
            ids.iter().filter(|id| !tasks.contains_key(id)).count(),
            self.d.drain()
        );
        let unfinished: Vec<_> = tasks.iter().filter(|(_, (_, f))| !f).collect();
        assert!(
            unfinished.is_empty(),
            "succeeded without finished_at: {unfinished:?}"
        );
        let unique: BTreeSet<i64> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "an id answered 201 twice");

        let runs = runs(&self.log);
        let twice: Vec<_> = runs.iter().filter(|(_, a)| a.len() > 1).collect();
        assert!(
            twice.is_empty(),
            "ran more than once (task id: attempts): {twice:?}"
        );
        let never: Vec<&i64> = ids.iter().filter(|id| !runs.contains_key(id)).collect();
        assert!(never.is_empty(), "succeeded but never ran: {never:?}");
    }

    async fn stop(mut self) {
        drop(self.poller_alive);
        self.d.signal(Signal::SIGTERM);
        let st = tokio::task::block_in_place(|| self.d.wait_exit(Duration::from_secs(60)));
        assert!(st.success(), "daemon exit {st}:\n{}", self.d.output());
        drop(self.pair);
    }
}

/// The primary stops, the standby is promoted `promote_after` later: `/readyz` is 503 in
/// the gap and 200 after, every acknowledged task completes once. Returns the gap (from
/// the stop to the first 200 after the promotion).
async fn failover(promote_after: Duration) -> Duration {
    let mut rig = Rig::start(PairOptions::default()).await;
    rig.load().await;
    let stopped = rig.stop_primary();
    let submitter = rig.keep_submitting();
    tokio::time::sleep(promote_after).await;
    let promoted = rig.promote();
    println!(
        "standby promoted {:.2}s after the stop",
        (promoted - stopped).as_secs_f64()
    );
    let back = rig
        .wait_answer(promoted, 200, Duration::from_secs(60))
        .await;
    rig.acknowledged.extend(submitter.await.unwrap());
    rig.assert_all_completed_once(promoted).await;

    let unready = rig.first_answer(stopped, 503);
    let gap = match (unready, back) {
        (Some((u, reason)), Some(b)) if u < b => {
            println!(
                "/readyz 503 {:.2}s after the stop ({reason}), 200 again {:.2}s after it",
                (u - stopped).as_secs_f64(),
                (b - stopped).as_secs_f64()
            );
            b - stopped
        }
        _ => panic!(
            "/readyz was not 503 during the gap and 200 after; answers from the stop on:\n{}",
            rig.answers_since(stopped)
        ),
    };
    rig.stop().await;
    gap
}

/// The case: the standby promoted about a second after the primary went away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_failover_to_a_promoted_synchronous_standby_completes_every_acknowledged_task_once()
{
    bounded(TEST_LIMIT, async {
        let gap = failover(Duration::from_millis(800)).await;
        println!("failover gap: {:.2}s", gap.as_secs_f64());
    })
    .await;
}

/// A slower promotion (an operator, a failover manager's detection delay): longer than a
/// third of the lease, so the leader, the lease keeper and the supervisor all fail at
/// least once meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_failover_that_outlasts_the_leader_renewal_completes_every_acknowledged_task_once() {
    bounded(TEST_LIMIT, async {
        let gap = failover(Duration::from_secs(12)).await;
        println!("failover gap: {:.2}s", gap.as_secs_f64());
    })
    .await;
}

/// A promoted standby that kept `synchronous_standby_names` (the same postgresql.conf on
/// both servers) answers reads but acknowledges no commit: nothing can be claimed or
/// completed. The daemon must not say it is ready meanwhile, and must carry on by itself
/// once the operator lets the server commit alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_that_acknowledges_no_commit_is_not_ready_and_recovers_once_it_does() {
    bounded(TEST_LIMIT, async {
        let mut rig = Rig::start(PairOptions {
            standby_keeps_sync: true,
        })
        .await;
        rig.load().await;
        let stopped = rig.stop_primary();
        let submitter = rig.keep_submitting();
        tokio::time::sleep(Duration::from_millis(800)).await;
        let promoted = rig.promote();
        // Reads work at once; every write waits for a standby that is not there, until the
        // round trip's deadline (query_timeout, 15 s) drops it. Readiness must say so by
        // then (a lease beat writes every 10 s) and never say ready meanwhile.
        let limit = Duration::from_secs(15 + 10 + 5);
        let said_so = eventually(limit, || async {
            rig.readiness
                .lock()
                .unwrap()
                .last()
                .is_some_and(|(t, c, r)| *t > promoted && *c == 503 && r.contains("query_timeout"))
        })
        .await;
        assert!(
            said_so,
            "/readyz did not say within {limit:?} that writes get no answer; answers from the stop on:\n{}\ndaemon output:\n{}",
            rig.answers_since(stopped),
            rig.d.drain()
        );
        let reason = rig
            .readiness
            .lock()
            .unwrap()
            .last()
            .map(|(_, _, r)| r.clone())
            .unwrap_or_default();
        println!(
            "{:.1}s after the promotion, with no commit acknowledged: /readyz 503 ({reason})",
            promoted.elapsed().as_secs_f64()
        );
        assert!(
            rig.first_answer(promoted, 200).is_none(),
            "/readyz said ready while the database took no write; answers from the stop on:\n{}",
            rig.answers_since(stopped)
        );

        // The operator lets the promoted server commit alone.
        tokio::task::block_in_place(|| rig.pair.release_sync(&rig.pair.standby.clone()));
        let released = Instant::now();
        let back = rig
            .wait_answer(released, 200, Duration::from_secs(60))
            .await;
        assert!(
            back.is_some(),
            "/readyz not 200 again after writes were acknowledged; answers from the stop on:\n{}",
            rig.answers_since(stopped)
        );
        rig.acknowledged.extend(submitter.await.unwrap());
        rig.assert_all_completed_once(released).await;
        rig.stop().await;
    })
    .await;
}
