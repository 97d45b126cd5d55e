//! A real pgbouncer (Debian's package) in front of the test server, started by the test
//! and killed when dropped. Stock settings apart from what a test names: the pool mode,
//! where it listens, trust auth for the test user, and a catch-all database entry.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct PgBouncer {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

fn binary() -> PathBuf {
    for p in ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("pgbouncer is not installed (scripts/test.sh installs Debian's package)");
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl PgBouncer {
    /// Starts pgbouncer with `pool_mode` in front of the server `server` points at (its
    /// host, port and user; every database name is passed through).
    pub fn start(server: &tokio_postgres::Config, pool_mode: &str) -> PgBouncer {
        let dir = tempfile::Builder::new()
            .prefix("taskwarden-pgbouncer")
            .tempdir()
            .unwrap();
        let (host, port) = match (server.get_hosts().first(), server.get_ports().first()) {
            (Some(tokio_postgres::config::Host::Unix(p)), Some(port)) => {
                (p.display().to_string(), *port)
            }
            (Some(tokio_postgres::config::Host::Tcp(h)), Some(port)) => (h.clone(), *port),
            other => panic!("test server address not understood: {other:?}"),
        };
        let user = server.get_user().unwrap_or("postgres").to_string();
        let listen = free_port();
        std::fs::write(dir.path().join("users.txt"), format!("\"{user}\" \"\"\n")).unwrap();
        let ini = format!(
            "[databases]\n* = host={host} port={port}\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {listen}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {d}/users.txt\npool_mode = {pool_mode}\n\
             logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n",
            d = dir.path().display()
        );
        let ini_path = dir.path().join("pgbouncer.ini");
        std::fs::write(&ini_path, ini).unwrap();
        let mut cmd = Command::new(binary());
        if nix::unistd::geteuid().is_root() {
            // pgbouncer refuses to run as root; it switches to this user itself.
            let pguser = if nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .is_some()
            {
                "postgres"
            } else {
                "nobody"
            };
            let u = nix::unistd::User::from_name(pguser).unwrap().unwrap();
            nix::unistd::chown(dir.path(), Some(u.uid), Some(u.gid)).unwrap();
            for f in ["users.txt", "pgbouncer.ini"] {
                nix::unistd::chown(&dir.path().join(f), Some(u.uid), Some(u.gid)).unwrap();
            }
            cmd.arg("-u").arg(pguser);
        }
        let child = cmd
            .arg(&ini_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut b = PgBouncer {
            child,
            port: listen,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", listen)).is_err() {
            if let Ok(Some(st)) = b.child.try_wait() {
                panic!("pgbouncer exited ({st}):\n{}", b.log());
            }
            assert!(
                Instant::now() < deadline,
                "pgbouncer never listened:\n{}",
                b.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        b
    }

    /// A URL to `server`'s database `dbname` through this pgbouncer.
    pub fn url(&self, server: &tokio_postgres::Config, dbname: &str) -> String {
        let user = server.get_user().unwrap_or("postgres");
        format!("postgresql://{user}@127.0.0.1:{}/{dbname}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
