//! README's quick start, followed literally (issue 27): the commands are read out of the
//! fenced blocks of its "Quick start" section, so a change to README that breaks them
//! fails this test, and a command this test does not know fails it too (teach it the new
//! step rather than let README drift from what is run).
//!
//! What is run as written: `taskwarden run` (in the directory holding the shipped
//! `config.toml`, the embedded PostgreSQL under `./data`), every `taskwarden ...` command
//! of the later blocks through `sh -c` in that directory, the console URL, and the stop
//! (SIGINT to the daemon's process group, which is what Ctrl-C sends).
//!
//! What is substituted, and why:
//! - `cargo install --path . --locked` is not run: the binary this test suite built is put
//!   on PATH instead (as `taskwarden`, alone in a directory of its own), which is what
//!   that command does with a fresh build.
//! - `./scripts/test.sh` is not run: it is the suite this test is part of.
//! - `sudo apt-get install -y postgresql` is not run: CI (`.ci/run` through
//!   `scripts/test.sh`) installs PostgreSQL, and so does any machine that runs the tests.
//! - The shipped `config.toml` is copied into a temporary directory (a clone holds
//!   nothing else the quick start uses) with `http.listen`'s port 9187 replaced by a free
//!   one, and 9187 in the console URL with it: tests run side by side on one machine.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::bin;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

const LIMIT: Duration = Duration::from_secs(180);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README's quick start: the section's prose and its fenced `sh` blocks, in order.
struct QuickStart {
    prose: String,
    blocks: Vec<Vec<String>>,
}

/// The "## Quick start" section of `readme`, up to the next `## ` heading.
fn quick_start(readme: &str) -> Option<QuickStart> {
    let start = readme.find("\n## Quick start\n")?;
    let body = &readme[start + 1..];
    let body = &body[body.find('\n')? + 1..];
    let body = match body.find("\n## ") {
        Some(end) => &body[..end],
        None => body,
    };
    let mut prose = String::new();
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in body.lines() {
        let t = line.trim();
        match current.as_mut() {
            Some(_) if t == "```" => blocks.extend(current.take()),
            Some(b) => {
                if !t.is_empty() {
                    b.push(t.to_string());
                }
            }
            None if t == "```sh" || t == "```bash" || t == "```shell" => {
                current = Some(Vec::new());
            }
            None => {
                prose.push_str(line);
                prose.push('\n');
            }
        }
    }
    Some(QuickStart { prose, blocks })
}

/// The command of a shell line, without its trailing comment.
fn command(line: &str) -> &str {
    line.split(" #").next().unwrap_or(line).trim()
}

/// What the test does with each line of the quick start.
#[derive(Debug, PartialEq)]
enum Step {
    /// `cargo install ...`: replaced by the built binary on PATH.
    Install,
    /// `./scripts/test.sh`: the suite itself.
    TestSuite,
    /// `sudo apt-get install ...`: a prerequisite CI provides.
    Prerequisite,
    /// `taskwarden run ...`: the daemon, in the background.
    Daemon(String),
    /// Any other `taskwarden ...` command, run and required to exit 0.
    Cli(String),
}

fn classify(line: &str) -> Result<Step, String> {
    let c = command(line);
    if c.starts_with("cargo install ") {
        return Ok(Step::Install);
    }
    if c == "./scripts/test.sh" {
        return Ok(Step::TestSuite);
    }
    if c.starts_with("sudo apt-get install ") || c.starts_with("apt-get install ") {
        return Ok(Step::Prerequisite);
    }
    if c.starts_with("taskwarden run") {
        return Ok(Step::Daemon(line.to_string()));
    }
    if c.starts_with("taskwarden ") {
        return Ok(Step::Cli(line.to_string()));
    }
    Err(format!(
        "README's quick start has a command tests/quickstart.rs does not know: {line:?}"
    ))
}

/// The text between the first `open` after `after` and the next `close`.
fn between<'a>(text: &'a str, after: &str, open: &str, close: &str) -> Option<&'a str> {
    let rest = &text[text.find(after)? + after.len()..];
    let rest = &rest[rest.find(open)? + open.len()..];
    Some(&rest[..rest.find(close)?])
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The status code of `GET url` (plain `http://host:port/path`), over a bare socket.
fn http_status(url: &str) -> Result<u16, String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").ok_or("not an http:// URL")?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = std::net::TcpStream::connect(host).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut head = String::new();
    s.read_to_string(&mut head).map_err(|e| e.to_string())?;
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line in {head:?}"))
}

fn sh(dir: &Path, path: &str, line: &str) -> Output {
    Command::new("timeout")
        .args(["120", "sh", "-c", line])
        .current_dir(dir)
        .env("PATH", path)
        .env_remove("TASKWARDEN_DATABASE_URL")
        .env_remove("TASKWARDEN_URL")
        .env_remove("TASKWARDEN_CONFIG")
        .env_remove("TASKWARDEN_API_TOKEN")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn shown(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn readme_quick_start_runs_as_written() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let qs = quick_start(&readme).expect("README.md has no \"## Quick start\" section");
    let steps: Vec<Vec<Step>> = qs
        .blocks
        .iter()
        .map(|b| b.iter().map(|l| classify(l)).collect::<Result<_, _>>())
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e}"));
    let flat: Vec<&Step> = steps.iter().flatten().collect();
    // What the quick start must keep telling a newcomer: how `taskwarden` gets on PATH,
    // the test command, the daemon, and a submitted task that is waited for.
    assert!(
        flat.contains(&&Step::Install),
        "no `cargo install`: {flat:?}"
    );
    assert!(
        flat.contains(&&Step::TestSuite),
        "no test command: {flat:?}"
    );
    assert!(
        root().join("scripts/test.sh").exists(),
        "scripts/test.sh is gone"
    );
    let daemons: Vec<&String> = flat
        .iter()
        .filter_map(|s| match s {
            Step::Daemon(l) => Some(l),
            _ => None,
        })
        .collect();
    assert_eq!(daemons.len(), 1, "one `taskwarden run`: {flat:?}");
    let cli: Vec<&String> = flat
        .iter()
        .filter_map(|s| match s {
            Step::Cli(l) => Some(l),
            _ => None,
        })
        .collect();
    let submit = cli
        .iter()
        .position(|l| command(l).starts_with("taskwarden submit ") && command(l).contains("--wait"))
        .unwrap_or_else(|| panic!("no `taskwarden submit ... --wait`: {cli:?}"));
    let ready = between(&qs.prose, "It is ready when it logs", "`", "`")
        .expect("the quick start no longer says which line means ready");
    let ui = between(&qs.prose, "Watch it in the console", "<", ">")
        .expect("the quick start no longer links the console");
    assert!(ui.ends_with("/ui"), "{ui}");
    assert!(
        qs.prose.contains("exits 0"),
        "the quick start no longer says the daemon exits 0 when stopped"
    );

    // A clone's config.toml, on a port of its own.
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(root().join("config.toml")).unwrap();
    let port = free_port();
    let shipped = "listen = \"127.0.0.1:9187\"";
    assert!(config.contains(shipped), "config.toml's http.listen moved");
    std::fs::write(
        dir.path().join("config.toml"),
        config.replace(shipped, &format!("listen = \"127.0.0.1:{port}\"")),
    )
    .unwrap();
    let ui = ui.replace(":9187", &format!(":{port}"));
    // `cargo install` puts the binary on PATH: this build's, alone in its directory.
    let bindir = dir.path().join("cargo-bin");
    std::fs::create_dir(&bindir).unwrap();
    std::os::unix::fs::symlink(bin(), bindir.join("taskwarden")).unwrap();
    let path = format!(
        "{}:{}",
        bindir.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    // Terminal one: the daemon, a foreground job (a process group of its own, as a shell
    // makes one), exec'd by sh so that the signal reaches taskwarden itself.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("exec {}", daemons[0]))
        .current_dir(dir.path())
        .env("PATH", &path)
        .env_remove("TASKWARDEN_DATABASE_URL")
        .env_remove("TASKWARDEN_CONFIG")
        .env_remove("RUST_LOG")
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = common::daemon::output_lines(&mut child);
    let pgid = Pid::from_raw(child.id() as i32);
    let mut log = Vec::new();
    let deadline = Instant::now() + LIMIT;
    let mut is_ready = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) => {
                is_ready = l.contains(ready);
                log.push(l);
                if is_ready {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    if !is_ready {
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = child.wait();
        panic!("never logged {ready:?}:\n{}", log.join("\n"));
    }

    // Terminal two: every command as written.
    for (i, line) in cli.iter().enumerate() {
        let o = sh(dir.path(), &path, line);
        if !o.status.success() {
            let _ = killpg(pgid, Signal::SIGKILL);
            let _ = child.wait();
            panic!("{line}\n{}\ndaemon:\n{}", shown(&o), log.join("\n"));
        }
        let out = String::from_utf8_lossy(&o.stdout);
        if i == submit {
            // The shipped `echo` agent prints the payload back: the task succeeded.
            assert!(
                out.trim().starts_with("task 1 succeeded (agent echo)"),
                "{line}\n{}",
                shown(&o)
            );
        }
        if command(line) == "taskwarden tasks show 1" {
            assert!(
                out.contains("succeeded") && out.contains("hello"),
                "{line}\n{}",
                shown(&o)
            );
        }
    }

    // The console answers.
    let status = http_status(&ui).unwrap_or_else(|e| panic!("{ui}: {e}"));
    assert_eq!(status, 200, "{ui}");

    // Ctrl-C: SIGINT to the foreground job; exit 0, the embedded PostgreSQL stopped.
    killpg(pgid, Signal::SIGINT).unwrap();
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = killpg(pgid, Signal::SIGKILL);
            panic!("the daemon did not stop on SIGINT:\n{}", log.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    while let Ok(l) = rx.recv_timeout(Duration::from_millis(500)) {
        log.push(l);
    }
    assert_eq!(status.code(), Some(0), "{}", log.join("\n"));
    assert!(
        !dir.path().join("data/pgdata/postmaster.pid").exists(),
        "the embedded PostgreSQL is still running:\n{}",
        log.join("\n")
    );
}

/// The parser finds what the test depends on, and refuses a step it does not know.
#[test]
fn the_quick_start_parser_reads_blocks_and_refuses_unknown_steps() {
    let readme = "# x\n\n## Quick start\n\nIt is ready when it logs `up`.\n\n```sh\n\
                  cargo install --path .   # builds\n./scripts/test.sh\n```\n\n```sh\n\
                  taskwarden run\n```\n\n## Next\n\n```sh\nrm -rf /\n```\n";
    let qs = quick_start(readme).unwrap();
    assert_eq!(qs.blocks.len(), 2, "a block past the section was read");
    assert_eq!(classify(&qs.blocks[0][0]), Ok(Step::Install));
    assert_eq!(classify(&qs.blocks[0][1]), Ok(Step::TestSuite));
    assert_eq!(
        classify(&qs.blocks[1][0]),
        Ok(Step::Daemon("taskwarden run".into()))
    );
    assert_eq!(
        between(&qs.prose, "It is ready when it logs", "`", "`"),
        Some("up")
    );
    assert!(classify("curl -s 127.0.0.1:9187/ui").is_err());
    assert!(classify("pip install taskwarden").is_err());
    assert!(quick_start("# x\n## Quickstart\n").is_none());
}
