//! Processes the daemon starts or reads: the one reader of `/proc/<pid>/stat` (the
//! supervisor's agent trees, the agent shim's descendants, the command agent's check of
//! its shim, the daemon's own figures on `/metrics`) and the one scrubber of a child's
//! environment (every process the daemon starts: initdb, the postmaster, the shim, an
//! agent program). Low in the tree: it knows nothing of the daemon's other parts.

use std::collections::HashMap;

/// What systemd hands the service's main process alone. A child that inherits them talks
/// to systemd as if it were the service — PostgreSQL sends READY=1 when it sees
/// `NOTIFY_SOCKET` ("reception only permitted for main PID"), and `WATCHDOG_PID` would
/// name a process that is not the child's own.
pub const MAIN_PROCESS_ENV: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// Removes [`MAIN_PROCESS_ENV`] from a child's environment: every process the daemon
/// starts (initdb, the postmaster, the agent shim or an agent program) goes through this.
pub fn scrub_child_env(cmd: &mut std::process::Command) -> &mut std::process::Command {
    for name in MAIN_PROCESS_ENV {
        cmd.env_remove(name);
    }
    cmd
}

/// One process as `/proc/<pid>/stat` shows it (the fields the daemon uses; see proc(5)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stat {
    /// Field 3: `R`, `S`, `Z`, ...
    pub state: char,
    pub ppid: u32,
    /// Fields 14-17, in clock ticks: its own user and system time, and its reaped
    /// children's.
    pub utime: u64,
    pub stime: u64,
    pub cutime: u64,
    pub cstime: u64,
    /// Field 22: clock ticks after boot.
    pub starttime: u64,
    /// Field 23, bytes.
    pub vsize: u64,
    /// Field 24, pages.
    pub rss_pages: u64,
}

impl Stat {
    /// Parses a stat line. The command name (field 2) may hold spaces and parentheses, so
    /// the fields are counted from after the last `)`.
    pub fn parse(line: &str) -> Option<Stat> {
        let (_, rest) = line.rsplit_once(')')?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // f[0] is field 3.
        let num = |field: usize| {
            f.get(field - 3)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Some(Stat {
            state: f.first()?.chars().next()?,
            ppid: u32::try_from(num(4)).ok()?,
            utime: num(14),
            stime: num(15),
            cutime: num(16),
            cstime: num(17),
            starttime: num(22),
            vsize: num(23),
            rss_pages: num(24),
        })
    }

    /// The process `pid`, if it exists (and can be read).
    pub fn read(pid: u32) -> Option<Stat> {
        Stat::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    pub fn zombie(&self) -> bool {
        self.state == 'Z'
    }
}

/// Every process on the machine, by pid (one read of `/proc`).
pub fn all() -> HashMap<u32, Stat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, Stat::read(pid)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_count_from_after_the_last_parenthesis() {
        let line = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 3 2 1 20 0 1 0 555 1048576 64 18446744073709551615";
        let s = Stat::parse(line).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1);
        assert_eq!((s.utime, s.stime, s.cutime, s.cstime), (7, 3, 2, 1));
        assert_eq!((s.starttime, s.vsize, s.rss_pages), (555, 1_048_576, 64));
        assert!(Stat::parse("garbage").is_none());
        let me = Stat::read(std::process::id()).unwrap();
        assert!(!me.zombie() && me.rss_pages > 0);
    }
}
