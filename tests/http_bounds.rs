//! Issue 23 "Poison-proof", items 2 and 3: what HTTP clients can hold of the daemon,
//! against the built binary and a real PostgreSQL.
//!
//! - Connections that send half a request header are closed after
//!   `http.header_read_timeout`; past `http.max_connections` a new one is answered 503.
//! - Event streams whose clients left end (their producers stop and stop reading the
//!   database), and past `http.max_streams` a new one is answered 503.
//!
//! The limits only guard against hangs; each assertion is about a count.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::daemon::{Daemon, bounded, http_client, scrape};
use common::{TestDb, eventually};
use nix::sys::signal::Signal;
use taskwarden::metrics::{self as m, parse_value};

const TEST_LIMIT: Duration = Duration::from_secs(240);
const LIMIT: Duration = Duration::from_secs(60);

fn config(t: &TestDb, http: &str) -> String {
    format!(
        "[database]\napplication_name = {:?}\npool_size = 4\nmax_overflow = 2\n\
         [workers]\nconcurrency = 2\npoll_interval = \"200ms\"\n\
         [http]\nlisten = \"127.0.0.1:0\"\n{http}\n\
         [agents.cat]\nkind = \"command\"\ncommand = [\"cat\"]\n",
        t.application_name
    )
}

fn start(dir: &Path, cfg: &str, t: &TestDb) -> (Daemon, String) {
    tokio::task::block_in_place(|| {
        let mut d = Daemon::start(dir, cfg, &[("TASKWARDEN_DATABASE_URL", &t.url())]);
        let base = d.base_url();
        (d, base)
    })
}

fn stop(mut d: Daemon) {
    d.signal(Signal::SIGTERM);
    let st = tokio::task::block_in_place(|| d.wait_exit(LIMIT));
    assert!(st.success(), "daemon exit {st:?}; output:\n{}", d.output());
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

async fn value(http: &reqwest::Client, base: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    parse_value(&scrape(http, base).await, name, labels).unwrap_or(f64::NAN)
}

/// Opens a connection and sends half a request header (no blank line): a slow-loris.
fn half_sent(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    s
}

/// What the server sends on `s` before it closes it, within `limit` (None: still open).
fn read_to_close(s: &mut TcpStream, limit: Duration) -> Option<String> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => Some(String::from_utf8_lossy(&got).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            Some(String::from_utf8_lossy(&got).into_owned())
        }
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_closed_and_connections_are_capped() {
    bounded(TEST_LIMIT, async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&t, "header_read_timeout = \"2s\"\nmax_connections = 40");
        let (d, base) = start(dir.path(), &cfg, &t);
        let addr = base.trim_start_matches("http://").to_string();
        let pid = d.child.id();
        let http = http_client(Duration::from_secs(10));
        let idle_fds = fds(pid);

        // 40 half-sent requests take every place.
        let mut held: Vec<TcpStream> = (0..40).map(|_| half_sent(&addr)).collect();
        // (No scrape while they are held: it would be refused.)
        let taken = eventually(LIMIT, || async { fds(pid) >= idle_fds + 40 }).await;
        assert!(taken, "the 40 connections never showed: fds {}", fds(pid));
        // One more is refused at once, saying why.
        let mut extra = tokio::task::block_in_place(|| half_sent(&addr));
        let refused =
            tokio::task::block_in_place(|| read_to_close(&mut extra, Duration::from_secs(5)));
        let refused = refused.expect("a connection past max_connections was held");
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        assert!(refused.contains("http.max_connections = 40"), "{refused}");

        // Each half-sent request is closed once its header is late.
        let closed = tokio::task::block_in_place(|| {
            held.iter_mut()
                .map(|s| read_to_close(s, Duration::from_secs(20)))
                .filter(Option::is_some)
                .count()
        });
        assert_eq!(closed, 40, "half-sent requests still held after 20 s");
        drop(held);
        let back = eventually(LIMIT, || async { fds(pid) <= idle_fds + 10 }).await;
        assert!(back, "fds {} (idle {idle_fds})", fds(pid));
        let text = scrape(&http, &base).await;
        let timeouts = parse_value(&text, m::HTTP_HEADER_TIMEOUTS_TOTAL, &[]).unwrap_or(0.0);
        assert!(timeouts >= 40.0, "header timeouts {timeouts}");
        assert!(
            parse_value(&text, m::HTTP_REFUSED_TOTAL, &[("reason", "connections")]).unwrap_or(0.0)
                >= 1.0
        );

        // A kept-alive connection left idle is closed by the same clock.
        let mut ka = TcpStream::connect(&addr).unwrap();
        ka.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let answered =
            tokio::task::block_in_place(|| read_to_close(&mut ka, Duration::from_secs(20)));
        let answered = answered.expect("an idle keep-alive connection was held");
        assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
        stop(d);
    })
    .await;
}

/// Opens an event stream and reads its response head: the status.
async fn open_stream(http: &reqwest::Client, url: &str) -> (u16, reqwest::Response) {
    let r = http
        .get(url)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_event_streams_end_and_streams_are_capped() {
    bounded(TEST_LIMIT, async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let (d, base) = start(dir.path(), &config(&t, "max_streams = 30"), &t);
        let http = http_client(Duration::from_secs(10));
        // A task queued for tomorrow: its stream has nothing to send.
        let r: serde_json::Value = http
            .post(format!("{base}/v1/tasks"))
            .json(&serde_json::json!({
                "agent": "cat", "payload": {},
                "run_after": (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339()
            }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = r["id"].as_i64().unwrap();
        let streaming = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let mut open = Vec::new();
        for i in 0..30 {
            let url = if i % 3 == 0 {
                format!("{base}/v1/slots/idle-{i}/events")
            } else if i % 3 == 1 {
                format!("{base}/v1/status/stream")
            } else {
                format!("{base}/v1/tasks/{id}/events")
            };
            let (status, resp) = open_stream(&streaming, &url).await;
            assert_eq!(status, 200, "{url}");
            open.push(resp);
        }
        assert_eq!(value(&http, &base, m::HTTP_STREAMS, &[]).await, 30.0);
        // The 31st is refused, saying why.
        let (status, resp) = open_stream(&streaming, &format!("{base}/v1/tasks/{id}/events")).await;
        assert_eq!(status, 503);
        let body = resp.text().await.unwrap();
        assert!(body.contains("http.max_streams = 30"), "{body}");

        // The clients leave: every producer ends, though none had anything to send.
        drop(open);
        let ended = eventually(Duration::from_secs(20), || async {
            value(&http, &base, m::HTTP_STREAMS, &[]).await == 0.0
        })
        .await;
        assert!(
            ended,
            "streams still open 20 s after their clients left: {}",
            value(&http, &base, m::HTTP_STREAMS, &[]).await
        );
        // And with nobody listening, nothing reads the database for them: checkouts over
        // 4 s are what an idle daemon does (its own loops), not 30 streams' polls.
        let before = value(&http, &base, m::DB_SESSIONS_OPENED_TOTAL, &[]).await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        let after = value(&http, &base, m::DB_SESSIONS_OPENED_TOTAL, &[]).await;
        assert!(
            after - before < 60.0,
            "{} checkouts in 4 s with no stream open",
            after - before
        );
        // A new stream is served again.
        let (status, _resp) =
            open_stream(&streaming, &format!("{base}/v1/tasks/{id}/events")).await;
        assert_eq!(status, 200);
        stop(d);
    })
    .await;
}

/// Sends `GET path` (with `accept`) and reads only the status line, then nothing more.
fn request_and_stop_reading(addr: &str, path: &str, accept: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200", "{path}");
    s
}

/// F3 of the issue-23 review: a client that asks for a big answer — an event stream
/// replaying megabytes, an 8 MB task list — and then never reads (keeping its connection
/// open, so the kernel never gives up) held the connection, its buffers and the stream's
/// place and producer for good. Now writes that make no progress for `http.write_timeout`
/// end the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_are_cut() {
    bounded(TEST_LIMIT, async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let chatty = "[agents.chatty]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \
             \"pad=$(head -c 500000 /dev/zero | tr '\\\\0' x); for i in $(seq 1 40); do \
             echo \\\"{\\\\\\\"n\\\\\\\":$i,\\\\\\\"pad\\\\\\\":\\\\\\\"$pad\\\\\\\"}\\\"; done\"]\n";
        let cfg = format!("{}{chatty}", config(&t, "write_timeout = \"2s\""))
            .replace("[workers]\n", "[workers]\nmax_event_bytes = 1000000\n");
        let (d, base) = start(dir.path(), &cfg, &t);
        let addr = base.trim_start_matches("http://").to_string();
        let http = http_client(Duration::from_secs(30));

        // A finished task with 40 events of 500 KB: its event stream replays 20 MB.
        let r: serde_json::Value = http
            .post(format!("{base}/v1/tasks"))
            .json(&serde_json::json!({"agent": "chatty", "payload": {}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = r["id"].as_i64().unwrap();
        let done = eventually(LIMIT, || async {
            common::daemon::task_status(&http, &base, id).await.as_deref() == Some("succeeded")
        })
        .await;
        assert!(done, "the chatty task did not succeed:\n{}", d.output());
        let events: serde_json::Value = http
            .get(format!("{base}/v1/tasks/{id}/events"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        // (A page of them is already the 8 MB of http.max_response_bytes.)
        let n = events["events"].as_array().map_or(0, Vec::len);
        assert!(
            n >= 15 && events["truncated"] == true,
            "the chatty task stored {n} events, truncated {}",
            events["truncated"]
        );
        // Tasks whose payloads fill an 8 MB list.
        let pad = "y".repeat(900_000);
        for _ in 0..10 {
            let st = http
                .post(format!("{base}/v1/tasks"))
                .json(&serde_json::json!({
                    "agent": "cat", "payload": {"pad": pad},
                    "run_after": (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339()
                }))
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(st, 201);
        }
        let stalls_before = value(&http, &base, m::HTTP_WRITE_STALLS_TOTAL, &[]).await;
        assert_eq!(stalls_before, 0.0);

        let stream = tokio::task::block_in_place(|| {
            request_and_stop_reading(&addr, &format!("/v1/tasks/{id}/events"), "text/event-stream")
        });
        let list = tokio::task::block_in_place(|| {
            request_and_stop_reading(&addr, "/v1/tasks?status=queued&limit=100", "application/json")
        });
        assert_eq!(value(&http, &base, m::HTTP_STREAMS, &[]).await, 1.0);

        // Both are cut once their writes have waited 2 s, though their clients are still
        // connected; the stream's place goes with it.
        let cut = eventually(Duration::from_secs(30), || async {
            value(&http, &base, m::HTTP_WRITE_STALLS_TOTAL, &[]).await >= 2.0
                && value(&http, &base, m::HTTP_STREAMS, &[]).await == 0.0
        })
        .await;
        assert!(
            cut,
            "stalled writes {} and streams {} 30 s after the clients stopped reading",
            value(&http, &base, m::HTTP_WRITE_STALLS_TOTAL, &[]).await,
            value(&http, &base, m::HTTP_STREAMS, &[]).await
        );
        // What the clients find when they read again: part of the answer, then the end.
        for (mut s, what) in [(stream, "stream"), (list, "list")] {
            let got = tokio::task::block_in_place(|| read_to_close(&mut s, Duration::from_secs(20)));
            let got = got.unwrap_or_else(|| panic!("the {what} connection is still open"));
            assert!(got.len() < 20_000_000, "the {what} got {} bytes", got.len());
        }
        // A client that reads gets the whole list.
        let full: serde_json::Value = http
            .get(format!("{base}/v1/tasks?status=queued&limit=100"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(full["tasks"].as_array().map_or(0, Vec::len) >= 8, "list: {}", full["truncated"]);
        stop(d);
    })
    .await;
}

/// Review of issue 23: a request that meets the database's weather — a statement timed out
/// behind someone's lock, the server restarting — answered `500 database error`, which
/// tells a client to give up. Every error the guard counts transient is now a 503 with
/// `Retry-After`, and the same request succeeds once the weather passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_database_errors_answer_503_with_retry_after() {
    bounded(TEST_LIMIT, async {
        let t = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&t, "").replace(
            "[database]\n",
            "[database]\nstatement_timeout = \"1s\"\nquery_timeout = \"3s\"\n",
        );
        let (d, base) = start(dir.path(), &cfg, &t);
        let http = http_client(Duration::from_secs(30));
        let submit = || async {
            let r = http
                .post(format!("{base}/v1/tasks"))
                .json(&serde_json::json!({"agent": "cat", "payload": {"n": 1}}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            (status, retry, r.text().await.unwrap())
        };
        assert_eq!(submit().await.0, 201);

        let mut locker = t.admin().await;
        let tx = locker.transaction().await.unwrap();
        tx.batch_execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        let (status, retry, body) = submit().await;
        assert_eq!(status, 503, "a submit behind a lock: {body}");
        assert_eq!(retry.as_deref(), Some("1"), "{body}");
        assert!(body.contains("try again"), "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v["error"].is_string(), "{body}");
        tx.rollback().await.unwrap();
        let (status, _, body) = submit().await;
        assert_eq!(status, 201, "after the lock went: {body}");
        stop(d);
    })
    .await;
}
