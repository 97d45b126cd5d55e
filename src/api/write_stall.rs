//! The bound on a client that stops reading. Whatever the response (an event stream, an
//! 8 MB task list, `/metrics`), once the kernel's send buffer is full a write waits for the
//! peer to read, and a peer that never reads (but keeps its TCP window open, so the kernel
//! never gives up) would hold the connection, its buffers and an event stream's producer
//! for good. So every connection's I/O goes through [`WriteStall`]: a write or flush that
//! makes no progress for `http.write_timeout` fails with `TimedOut`, hyper drops the
//! connection, and the response body (with its stream producer) goes with it.
//!
//! A slow reader that keeps taking bytes is not stalled; its memory is bounded by the
//! response bounds and `http.max_connections`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::{self as m, Metrics};

/// A byte stream whose writes must make progress within a limit.
pub struct WriteStall<T> {
    io: T,
    limit: Duration,
    /// Armed when a write first waits; disarmed by any write that goes through.
    timer: Pin<Box<Sleep>>,
    armed: bool,
    /// Once timed out, every later write fails too (and is counted once).
    fired: bool,
    metrics: Metrics,
}

impl<T> WriteStall<T> {
    pub fn new(io: T, limit: Duration, metrics: Metrics) -> Self {
        WriteStall {
            io,
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
            armed: false,
            fired: false,
            metrics,
        }
    }

    /// After a write returned `Pending`: `Pending` still, or the time-out once the writes
    /// have waited `limit` in a row. Polling the timer registers this task to wake at it.
    fn waited<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        if !self.armed {
            let Some(at) = Instant::now().checked_add(self.limit) else {
                return Poll::Pending;
            };
            self.timer.as_mut().reset(at);
            self.armed = true;
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.fired = true;
                self.metrics
                    .counter(m::HTTP_WRITE_STALLS_TOTAL, &[])
                    .increment(1);
                Poll::Ready(Err(self.timed_out()))
            }
        }
    }

    fn timed_out(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client read nothing for {} (http.write_timeout)",
                humantime::format_duration(self.limit)
            ),
        )
    }

    fn progressed<R>(
        &mut self,
        r: Poll<io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<R>> {
        if self.fired {
            return Poll::Ready(Err(self.timed_out()));
        }
        match r {
            Poll::Pending => self.waited(cx),
            ready => {
                self.armed = false;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteStall<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteStall<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.progressed(r, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.progressed(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.progressed(r, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_shutdown(cx);
        this.progressed(r, cx)
    }
}
