//! The HTTP listener's connection handling: what bounds a client can reach before any
//! handler runs. `axum::serve` keeps every connection it accepts for as long as the peer
//! likes (a half-sent header is held for good), so connections are served here with
//! hyper directly:
//!
//! - at most `http.max_connections` are open; one more is answered `503` with a JSON
//!   error and closed at once (`http_refused_total{reason="connections"}`);
//! - a connection must finish a request header within `http.header_read_timeout` of
//!   opening, and again of the end of each response: that is the half-sent-request bound
//!   and the idle keep-alive bound in one clock (hyper's, which starts whenever the
//!   connection waits for a request head);
//! - a response that makes no write progress for `http.write_timeout` closes its
//!   connection (see [`super::write_stall`]);
//! - at shutdown the accept loop stops and open connections are asked to finish their
//!   request in flight and close.
//!
//! Event streams are bounded by the handlers (see [`Gate`] and `slots::async_stream`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::write_stall::WriteStall;
use crate::config::Config;
use crate::metrics::{self as m, Metrics};

/// How long shutdown lets open connections finish the request in flight.
pub const DRAIN: Duration = Duration::from_secs(3);

/// After `accept` fails (out of file descriptors, most often), the loop waits this long
/// before the next: it must not spin, and fds come back as connections close.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A count of things open (connections, event streams) with a bound read at each entry,
/// so a reload that changes the bound applies to the next one. Its gauge moves by one
/// on each entry and leave, never by a `set` of a count read earlier: two permits that
/// leave at once on two threads would otherwise write their counts in either order and
/// leave the gauge one off for good (seen as a stream "still open" that was not).
#[derive(Debug, Default)]
pub struct Gate {
    open: AtomicUsize,
}

/// One place in a [`Gate`]; leaving gives it back.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<Gate>,
    on_leave: Option<(Metrics, &'static str)>,
}

impl Gate {
    /// A place, unless `max` are taken. `gauge` (a metric name) follows the count.
    pub fn try_enter(
        gate: &Arc<Gate>,
        max: usize,
        metrics: &Metrics,
        gauge: &'static str,
    ) -> Option<Permit> {
        gate.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        metrics.gauge(gauge, &[]).increment(1.0);
        Some(Permit {
            gate: Arc::clone(gate),
            on_leave: Some((metrics.clone(), gauge)),
        })
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.open.fetch_sub(1, Ordering::AcqRel);
        if let Some((metrics, gauge)) = self.on_leave.take() {
            metrics.gauge(gauge, &[]).decrement(1.0);
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, within the bounds above.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: Arc<ArcSwap<Config>>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let connections = Arc::new(Gate::default());
    metrics.gauge(m::HTTP_CONNECTIONS, &[]).set(0.0);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accepting an HTTP connection failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let cfg = config.load();
        let max = cfg.http.max_connections;
        let Some(permit) = Gate::try_enter(&connections, max, &metrics, m::HTTP_CONNECTIONS) else {
            metrics
                .counter(m::HTTP_REFUSED_TOTAL, &[("reason", "connections")])
                .increment(1);
            refuse(&stream, max);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(cfg.http.header_read_timeout.get());
        let io = WriteStall::new(stream, cfg.http.write_timeout.get(), metrics.clone());
        let conn =
            http.serve_connection(TokioIo::new(io), TowerToHyperService::new(router.clone()));
        let conn = graceful.watch(conn);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.await {
                if let Some(io) = std::error::Error::source(&e)
                    .and_then(|s| s.downcast_ref::<std::io::Error>())
                    .filter(|io| io.kind() == std::io::ErrorKind::TimedOut)
                {
                    tracing::info!(%peer, error = %io, "HTTP connection closed: the client stopped reading");
                } else if e.is_timeout() {
                    metrics
                        .counter(m::HTTP_HEADER_TIMEOUTS_TOTAL, &[])
                        .increment(1);
                    tracing::debug!(%peer, "HTTP connection closed: no request header in time");
                } else {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.open(),
            drain_ms = DRAIN.as_millis() as u64,
            "HTTP connections still open after the drain; leaving them"
        );
    }
}

/// Answers a connection past `http.max_connections` and closes it. One non-blocking write
/// into a fresh socket's empty send buffer: a client that never reads costs nothing.
fn refuse(stream: &tokio::net::TcpStream, max: usize) {
    let body = serde_json::json!({
        "error": format!(
            "too many HTTP connections open (http.max_connections = {max}); retry later"
        )
    })
    .to_string();
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(reply.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Permits given back on several threads at the same instant (as when thirty stream
    /// clients leave at once) leave the gauge where the count is: zero once all have left.
    #[test]
    fn the_gauge_follows_the_count_under_concurrent_leaves() {
        const THREADS: usize = 4;
        let metrics = Metrics::new();
        let gate = Arc::new(Gate::default());
        let barrier = std::sync::Barrier::new(THREADS);
        let mut off = 0;
        for _ in 0..500 {
            std::thread::scope(|s| {
                for _ in 0..THREADS {
                    s.spawn(|| {
                        let p = Gate::try_enter(&gate, 1_000, &metrics, m::HTTP_STREAMS);
                        assert!(p.is_some());
                        barrier.wait();
                        drop(p);
                    });
                }
            });
            assert_eq!(gate.open(), 0);
            if m::parse_value(&metrics.render(), m::HTTP_STREAMS, &[]) != Some(0.0) {
                off += 1;
            }
        }
        assert_eq!(off, 0, "rounds whose gauge stayed off the count");
    }
}
