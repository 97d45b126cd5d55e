//! A throwaway primary with a synchronous streaming standby, for failover tests.
//!
//! Both servers listen on 127.0.0.1 on free ports (and on a unix socket in the pair's own
//! directory). The primary runs with `wal_level = replica` and `synchronous_commit = on`;
//! the standby is a `pg_basebackup -R` copy, and only once it streams does the primary get
//! `synchronous_standby_names = '*'` (ALTER SYSTEM), so every commit it acknowledges from
//! then on is on the standby too. The standby does not inherit that setting: once
//! promoted it commits alone, as an operator's promoted standby with no replica would.
//!
//! PostgreSQL refuses to run as root: then every server binary runs as `postgres` (or
//! `nobody`) through `runuser`, and the pair's directory is handed to that user. Every wait
//! is bounded; dropping the pair stops both servers (SIGQUIT to the postmaster named in
//! its pid file, then SIGKILL) and removes everything.
#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User};

use super::daemon::alive;

/// Superuser of the pair (trust authentication on loopback and the socket).
pub const USER: &str = "taskwarden";
/// Bound on every server command (start, stop, promote, base backup).
const COMMAND_LIMIT: Duration = Duration::from_secs(60);
/// Bound on waiting for the standby to stream synchronously.
const SYNC_LIMIT: Duration = Duration::from_secs(60);

/// One server of the pair.
#[derive(Debug, Clone)]
pub struct Node {
    pub pgdata: PathBuf,
    pub port: u16,
    pub log: PathBuf,
}

pub struct ReplicaPair {
    dir: Option<tempfile::TempDir>,
    bindir: PathBuf,
    /// The user servers run as when we are root.
    run_as: Option<String>,
    pub primary: Node,
    pub standby: Node,
    pub dbname: String,
}

/// A port nobody listens on right now on 127.0.0.1 (the kernel's choice).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// The PostgreSQL bin directory the tests use: $TASKWARDEN_PG_BINDIR, else the newest
/// under /usr/lib/postgresql.
pub fn bindir() -> PathBuf {
    if let Ok(d) = std::env::var("TASKWARDEN_PG_BINDIR")
        && !d.is_empty()
    {
        return PathBuf::from(d);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    found.retain(|p| p.join("pg_basebackup").exists());
    // Newest major version first (directories are named by it).
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found
        .pop()
        .expect("PostgreSQL server binaries not found under /usr/lib/postgresql")
}

/// How to set the pair up.
#[derive(Debug, Clone, Default)]
pub struct PairOptions {
    /// The standby gets `synchronous_standby_names = '*'` too (the same postgresql.conf
    /// on both servers): once promoted, with no standby of its own, it acknowledges no
    /// commit until [`ReplicaPair::release_sync`].
    pub standby_keeps_sync: bool,
}

impl ReplicaPair {
    /// [`ReplicaPair::start_with`] the default options.
    pub fn start(dbname: &str) -> ReplicaPair {
        Self::start_with(dbname, PairOptions::default())
    }

    /// Starts the primary, creates `dbname` on it, clones the standby and waits until the
    /// standby streams synchronously. Blocking (call it under `block_in_place`).
    pub fn start_with(dbname: &str, opts: PairOptions) -> ReplicaPair {
        let dir = tempfile::Builder::new()
            .prefix("taskwarden-replica")
            .tempdir()
            .expect("temp dir");
        let run_as = if nix::unistd::geteuid().is_root() {
            let name = ["postgres", "nobody"]
                .into_iter()
                .find(|n| matches!(User::from_name(n), Ok(Some(_))))
                .expect("running as root without a postgres or nobody user");
            let u = User::from_name(name).unwrap().unwrap();
            nix::unistd::chown(dir.path(), Some(u.uid), Some(u.gid)).expect("chown pair dir");
            Some(name.to_string())
        } else {
            None
        };
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod pair dir");
        let node = |name: &str| Node {
            pgdata: dir.path().join(name),
            port: free_port(),
            log: dir.path().join(format!("{name}.log")),
        };
        let pair = ReplicaPair {
            bindir: bindir(),
            run_as,
            primary: node("primary"),
            standby: node("standby"),
            dbname: dbname.to_string(),
            dir: Some(dir),
        };
        pair.init_primary();
        pair.start_node(&pair.primary.clone(), true);
        pair.psql(
            pair.primary.port,
            "postgres",
            &format!("CREATE DATABASE {dbname}"),
        );
        pair.clone_standby();
        if opts.standby_keeps_sync {
            pair.append_conf(&pair.standby, "synchronous_standby_names = '*'");
        }
        pair.start_node(&pair.standby.clone(), false);
        // Synchronous only now: with no standby yet, every commit above would wait for one.
        // Set after the base backup, so the standby does not inherit it.
        pair.psql(
            pair.primary.port,
            "postgres",
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
        );
        pair.psql(pair.primary.port, "postgres", "SELECT pg_reload_conf()");
        pair.wait_sync();
        pair
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("pair directory").path()
    }

    /// A server binary of the pair's version, run as the server user when we are root.
    fn command(&self, bin: &str) -> Command {
        let exe = self.bindir.join(bin);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.current_dir(self.dir()).stdin(Stdio::null());
        cmd
    }

    /// Runs `cmd` to its end within [`COMMAND_LIMIT`]; panics with its output otherwise.
    /// The output goes to a file, not a pipe: `pg_ctl start` leaves the postmaster holding
    /// whatever it was given.
    fn run(&self, what: &str, mut cmd: Command) -> String {
        let out_path = self.dir().join(format!("{what}.out"));
        let out = std::fs::File::create(&out_path).expect("command output file");
        cmd.stdout(out.try_clone().expect("dup output file"))
            .stderr(out);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: cannot spawn: {e}"));
        let deadline = Instant::now() + COMMAND_LIMIT;
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait for command") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{what}: no end within {COMMAND_LIMIT:?}; output:\n{}",
                    std::fs::read_to_string(&out_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        assert!(status.success(), "{what} failed ({status}):\n{text}");
        text
    }

    fn init_primary(&self) {
        let mut cmd = self.command("initdb");
        cmd.arg("-D")
            .arg(&self.primary.pgdata)
            .args(["-U", USER, "--auth=trust", "-E", "UTF8", "--locale=C"])
            .arg("--no-instructions");
        self.run("initdb", cmd);
    }

    fn clone_standby(&self) {
        let mut cmd = self.command("pg_basebackup");
        cmd.args(["-h", "127.0.0.1", "-p", &self.primary.port.to_string()])
            .args(["-U", USER, "-D"])
            .arg(&self.standby.pgdata)
            .args(["-R", "-X", "stream", "-c", "fast"]);
        self.run("pg_basebackup", cmd);
    }

    /// Server options on the command line (`synchronous_commit = on` is also the default).
    fn start_node(&self, node: &Node, primary: bool) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c max_connections=200 -c fsync=off -c full_page_writes=off \
             -c wal_level=replica -c max_wal_senders=5 -c hot_standby=on \
             -c synchronous_commit=on",
            node.port,
            self.dir().display()
        );
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(&node.pgdata)
            .arg("-l")
            .arg(&node.log)
            .args(["-w", "-t", "60", "-o", &opts, "start"]);
        let what = if primary {
            "start-primary"
        } else {
            "start-standby"
        };
        self.run(what, cmd);
    }

    /// One statement through psql on the unix socket; its unaligned output.
    pub fn psql(&self, port: u16, db: &str, sql: &str) -> String {
        let mut cmd = Command::new(self.bindir.join("psql"));
        cmd.current_dir(self.dir())
            .stdin(Stdio::null())
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h"])
            .arg(self.dir())
            .args(["-p", &port.to_string(), "-U", USER, "-d", db, "-c", sql]);
        self.run("psql", cmd).trim().to_string()
    }

    /// Waits until the primary reports the standby as its synchronous standby.
    fn wait_sync(&self) {
        let deadline = Instant::now() + SYNC_LIMIT;
        loop {
            let state = self.psql(
                self.primary.port,
                "postgres",
                "SELECT string_agg(sync_state, ',') FROM pg_stat_replication WHERE state = 'streaming'",
            );
            if state == "sync" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the standby never streamed synchronously (sync_state {state:?}); standby log:\n{}",
                std::fs::read_to_string(&self.standby.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Appends a line to a server's `postgresql.auto.conf` (read at its next start or
    /// reload), as the server's user.
    fn append_conf(&self, node: &Node, line: &str) {
        use std::io::Write;
        let path = node.pgdata.join("postgresql.auto.conf");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        writeln!(f, "{line}").expect("append to postgresql.auto.conf");
    }

    /// Lets `node` commit without a synchronous standby (what an operator does after
    /// promoting a standby that has none): `synchronous_standby_names` reset, reloaded.
    /// Commits waiting for a standby are released.
    pub fn release_sync(&self, node: &Node) {
        self.psql(
            node.port,
            "postgres",
            "ALTER SYSTEM RESET synchronous_standby_names",
        );
        self.psql(node.port, "postgres", "SELECT pg_reload_conf()");
    }

    /// `postgresql://taskwarden@127.0.0.1:P1,127.0.0.1:P2/DB?target_session_attrs=read-write`:
    /// the primary first, then the standby; a client takes the first that accepts writes.
    pub fn url(&self) -> String {
        format!(
            "postgresql://{USER}@127.0.0.1:{},127.0.0.1:{}/{}?target_session_attrs=read-write",
            self.primary.port, self.standby.port, self.dbname
        )
    }

    /// Connection settings for one server of the pair (the test's own checks).
    pub fn pg(&self, node: &Node) -> tokio_postgres::Config {
        let mut pg = tokio_postgres::Config::new();
        pg.host("127.0.0.1")
            .port(node.port)
            .user(USER)
            .dbname(&self.dbname)
            .connect_timeout(Duration::from_secs(5));
        pg
    }

    /// The pid in a server's `postmaster.pid`, if it has one.
    pub fn postmaster_pid(node: &Node) -> Option<i32> {
        std::fs::read_to_string(node.pgdata.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// `pg_ctl stop -m immediate` on the primary: no checkpoint, every backend killed at
    /// once, as a crash would.
    pub fn stop_primary_immediate(&self) {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.primary.pgdata)
            .args(["-m", "immediate", "-w", "-t", "60", "stop"]);
        self.run("stop-primary", cmd);
    }

    /// `pg_ctl promote` on the standby, waiting until it accepts writes.
    pub fn promote_standby(&self) {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.standby.pgdata)
            .args(["-w", "-t", "60", "promote"]);
        self.run("promote-standby", cmd);
    }

    /// Stops a server by its pid file: SIGQUIT (immediate shutdown), SIGKILL if it is
    /// still there after a few seconds.
    fn kill_node(node: &Node) {
        let Some(pid) = Self::postmaster_pid(node) else {
            return;
        };
        if !alive(pid) {
            return;
        }
        let _ = kill(Pid::from_raw(pid), Signal::SIGQUIT);
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

impl Drop for ReplicaPair {
    fn drop(&mut self) {
        Self::kill_node(&self.primary);
        Self::kill_node(&self.standby);
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if dir.close().is_err() {
                let _ = std::fs::remove_dir_all(path);
            }
        }
    }
}
