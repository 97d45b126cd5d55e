//! A small throwaway PostgreSQL server of a test's own, for tests about the whole server
//! (its connection limit, say) that must not crowd the shared one other tests run on.
//!
//! Unix socket only, in the cluster's own directory; trust authentication for the
//! superuser `taskwarden`. As root every server binary runs as `postgres` (or `nobody`).
//! Every command is bounded; dropping the cluster stops the server immediately and removes
//! its directory.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::unistd::User;

use super::replica::{bindir, free_port};

const COMMAND_LIMIT: Duration = Duration::from_secs(60);

pub struct Cluster {
    dir: tempfile::TempDir,
    pub port: u16,
    run_as: Option<String>,
}

impl Cluster {
    /// A running server; `opts` are extra `-c name=value` settings.
    pub fn start(opts: &str) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("taskwarden-cluster")
            .tempdir()
            .unwrap();
        let run_as = nix::unistd::geteuid().is_root().then(|| {
            ["postgres", "nobody"]
                .into_iter()
                .find(|n| matches!(User::from_name(n), Ok(Some(_))))
                .expect("running as root without a postgres or nobody user")
                .to_string()
        });
        if let Some(u) = &run_as {
            let u = User::from_name(u).unwrap().unwrap();
            nix::unistd::chown(dir.path(), Some(u.uid), Some(u.gid)).unwrap();
        }
        let c = Cluster {
            dir,
            port: free_port(),
            run_as,
        };
        let pgdata = c.dir.path().join("pgdata");
        c.run("initdb", |cmd| {
            cmd.arg("-D")
                .arg(&pgdata)
                .args([
                    "-U",
                    "taskwarden",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ])
                .arg("--no-instructions");
        });
        let server_opts = format!(
            "-p {} -c listen_addresses= -c unix_socket_directories={} -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off {opts}",
            c.port,
            c.dir.path().display()
        );
        let log = c.dir.path().join("server.log");
        c.run("pg_ctl", |cmd| {
            cmd.arg("-D").arg(&pgdata).arg("-l").arg(&log).args([
                "-w",
                "-t",
                "60",
                "-o",
                &server_opts,
                "start",
            ]);
        });
        c
    }

    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A libpq URL for `db` as `user`.
    pub fn url(&self, user: &str, db: &str) -> String {
        format!(
            "postgresql://{user}@/{db}?host={}&port={}",
            self.dir.path().display(),
            self.port
        )
    }

    /// A tokio-postgres config for `db` as `user`.
    pub fn pg(&self, user: &str, db: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host_path(self.dir.path())
            .port(self.port)
            .user(user)
            .dbname(db);
        c
    }

    /// One statement through psql as the superuser; its unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(bindir().join("psql"))
            .arg("-h")
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "taskwarden",
                "-d",
                "postgres",
            ])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn run(&self, bin: &str, args: impl FnOnce(&mut Command)) {
        let exe = bindir().join(bin);
        let mut cmd = match &self.run_as {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.current_dir(self.dir.path()).stdin(Stdio::null());
        args(&mut cmd);
        // pg_ctl's postmaster keeps what it is given: a file, not a pipe.
        let out_path = self.dir.path().join(format!("{bin}.out"));
        let f = std::fs::File::create(&out_path).unwrap();
        cmd.stdout(f.try_clone().unwrap()).stderr(f);
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + COMMAND_LIMIT;
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{bin}: no end within {COMMAND_LIMIT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            st.success(),
            "{bin}: {st}\n{}",
            std::fs::read_to_string(&out_path).unwrap_or_default()
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let pgdata = self.dir.path().join("pgdata");
        let mut cmd = match &self.run_as {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(bindir().join("pg_ctl"));
                c
            }
            None => Command::new(bindir().join("pg_ctl")),
        };
        let _ = cmd
            .arg("-D")
            .arg(&pgdata)
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
