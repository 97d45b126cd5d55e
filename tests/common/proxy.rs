//! A loopback TCP proxy in front of the test PostgreSQL, for link-fault tests.
//!
//! It listens on `127.0.0.1:0` and forwards bytes both ways for each accepted connection,
//! to a unix socket (the usual test server) or a TCP address. The test switches it at run
//! time:
//!
//! - [`Proxy::freeze_existing`]: every connection accepted so far stops forwarding in both
//!   directions, but both of its sockets stay open — no FIN, no RST. To the daemon this is
//!   a dead link (a NAT that forgot the flow, a peer that vanished): writes are buffered,
//!   reads never return, the kernel still answers keepalives on the loopback side.
//!   Connections accepted afterwards forward normally.
//! - [`Proxy::black_hole`]: the existing connections are frozen as above, and new ones are
//!   accepted but never connected upstream nor forwarded (their socket stays open).
//! - [`Proxy::heal`]: new connections forward again. Frozen and black-holed ones stay dead
//!   for good: the daemon has to notice and drop them itself.
//!
//! Everything is bounded by the `Proxy` value: dropping it cancels the accept loop and
//! every connection task, which closes all sockets.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::TestDb;

/// Where the proxy forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A unix socket file, e.g. `<dir>/.s.PGSQL.5432`.
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

impl Target {
    /// The server behind a tokio-postgres config: for a unix host (a directory) and port
    /// `p`, the socket file `<dir>/.s.PGSQL.<p>`; for a TCP host, `host:port`.
    pub fn of(pg: &tokio_postgres::Config) -> Target {
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        match pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Unix(dir)) => {
                Target::Unix(dir.join(format!(".s.PGSQL.{port}")))
            }
            Some(tokio_postgres::config::Host::Tcp(h)) => Target::Tcp(format!("{h}:{port}")),
            None => Target::Tcp(format!("localhost:{port}")),
        }
    }
}

/// Either kind of upstream socket.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

struct Shared {
    target: Target,
    /// Connections with an id below this are frozen.
    frozen_below: watch::Sender<u64>,
    next_id: AtomicU64,
    black_hole: AtomicBool,
    accepted: AtomicU64,
    cancel: CancellationToken,
}

/// The running proxy. Dropping it closes every socket it holds.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Starts listening on an ephemeral loopback port and forwarding to `target`.
    pub async fn start(target: Target) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy: local addr");
        let (frozen_below, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            target,
            frozen_below,
            next_id: AtomicU64::new(0),
            black_hole: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            cancel: CancellationToken::new(),
        });
        tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Proxy { addr, shared }
    }

    /// A proxy in front of a test database's server.
    pub async fn for_db(t: &TestDb) -> Proxy {
        Proxy::start(Target::of(&t.pg)).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connections accepted so far (forwarded or not).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// `postgresql://user[:pw]@127.0.0.1:PORT/dbname` for `t`'s database through this proxy.
    pub fn url(&self, t: &TestDb) -> String {
        let user = t.pg.get_user().unwrap_or("postgres");
        let pw =
            t.pg.get_password()
                .map(|p| format!(":{}", String::from_utf8_lossy(p)))
                .unwrap_or_default();
        format!(
            "postgresql://{user}{pw}@127.0.0.1:{}/{}",
            self.port(),
            t.name
        )
    }

    /// Every connection accepted so far stops forwarding (sockets stay open); later ones
    /// forward normally (unless black-holed).
    pub fn freeze_existing(&self) {
        let below = self.shared.next_id.load(Ordering::SeqCst);
        self.shared
            .frozen_below
            .send_modify(|v| *v = (*v).max(below));
    }

    /// Existing connections are frozen, new ones are accepted and left unanswered.
    pub fn black_hole(&self) {
        // Flag first, then freeze: a connection accepted in between is caught by one or
        // the other.
        self.shared.black_hole.store(true, Ordering::SeqCst);
        self.freeze_existing();
    }

    /// New connections forward again; frozen ones stay dead.
    pub fn heal(&self) {
        self.shared.black_hole.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (client, _) = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => continue,
            },
        };
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let holed = shared.black_hole.load(Ordering::SeqCst);
        tokio::spawn(connection(id, holed, client, Arc::clone(&shared)));
    }
}

async fn connect_upstream(target: &Target) -> std::io::Result<Box<dyn Stream>> {
    Ok(match target {
        Target::Unix(p) => Box::new(UnixStream::connect(p).await?),
        Target::Tcp(a) => {
            let s = TcpStream::connect(a.as_str()).await?;
            let _ = s.set_nodelay(true);
            Box::new(s)
        }
    })
}

async fn connection(id: u64, black_holed: bool, mut client: TcpStream, shared: Arc<Shared>) {
    let cancel = shared.cancel.clone();
    if black_holed {
        // Accepted, never answered, never closed (until the proxy goes).
        cancel.cancelled().await;
        drop(client);
        return;
    }
    let _ = client.set_nodelay(true);
    let mut upstream = tokio::select! {
        _ = cancel.cancelled() => return,
        r = connect_upstream(&shared.target) => match r {
            Ok(u) => u,
            // The client sees the connection close, as it would with the server down.
            Err(_) => return,
        },
    };
    let mut frozen = shared.frozen_below.subscribe();
    let froze = tokio::select! {
        _ = cancel.cancelled() => false,
        r = frozen.wait_for(|below| id < *below) => r.is_ok(),
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => false,
    };
    if froze {
        // A dead link: stop reading and writing, but keep both sockets open.
        cancel.cancelled().await;
    }
    drop(upstream);
    drop(client);
}
