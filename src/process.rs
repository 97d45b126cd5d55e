//! Processes the daemon starts or reads: the one reader of `/proc` (stat lines for the
//! supervisor's agent trees and the agent shim's descendants, argv for the command
//! agent's and the supervisor's check of a shim, the command name for a postmaster left
//! running, the daemon's own figures on `/metrics` and its memory for the supervisor's
//! alert, with sysinfo for the memory limit) and the one scrubber of a child's
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

/// What `/proc/self` says of the daemon's own process, for the standard `process_*`
/// families on `/metrics`; `None` where it cannot be read (not Linux), and then the
/// family is left out.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcessFigures {
    pub cpu_seconds: Option<f64>,
    pub open_fds: Option<f64>,
    pub max_fds: Option<f64>,
    pub virtual_memory_bytes: Option<f64>,
    pub resident_memory_bytes: Option<f64>,
    pub start_time_seconds: Option<f64>,
}

impl ProcessFigures {
    /// Reads the figures of this process.
    pub fn read() -> ProcessFigures {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        let limits = std::fs::read_to_string("/proc/self/limits").ok();
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as f64);
        let mut f = parse_proc_stat(
            stat.as_deref().unwrap_or(""),
            clock_ticks() as f64,
            page_size() as f64,
            boot,
        );
        f.open_fds = open_fds;
        f.max_fds = limits.as_deref().and_then(parse_max_fds);
        f
    }
}

/// The CPU, memory and start-time figures of a `/proc/<pid>/stat` line.
pub fn parse_proc_stat(stat: &str, ticks: f64, page: f64, boot: Option<f64>) -> ProcessFigures {
    let Some(s) = Stat::parse(stat) else {
        return ProcessFigures::default();
    };
    ProcessFigures {
        cpu_seconds: Some(s.utime.saturating_add(s.stime) as f64 / ticks),
        virtual_memory_bytes: Some(s.vsize as f64),
        resident_memory_bytes: Some(s.rss_pages as f64 * page),
        start_time_seconds: boot.map(|b| b + s.starttime as f64 / ticks),
        ..ProcessFigures::default()
    }
}

/// The soft limit of open files from `/proc/<pid>/limits`.
fn parse_max_fds(limits: &str) -> Option<f64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    soft.parse::<f64>().ok()
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of a stat line's times.
pub fn clock_ticks() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// Bytes per page (`sysconf(_SC_PAGESIZE)`), the unit of a stat line's resident set.
pub fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(4096)
}

/// The arguments process `pid` was started with (`/proc/<pid>/cmdline`), empty if it
/// is gone or cannot be read.
pub fn argv(pid: u32) -> Vec<Vec<u8>> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// The command name of process `pid` (`/proc/<pid>/comm`, at most 15 bytes), if it
/// exists.
pub fn comm(pid: u32) -> Option<String> {
    let c = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(c.trim().to_string())
}

/// The daemon's resident memory and the memory it may use (its cgroup's limit, else the
/// machine's), for the supervisor's memory alert. sysinfo reads the limit: it knows
/// cgroup v1 and v2; the resident set is this module's own stat line.
pub struct MemoryReader {
    sys: sysinfo::System,
}

impl Default for MemoryReader {
    fn default() -> MemoryReader {
        MemoryReader {
            sys: sysinfo::System::new(),
        }
    }
}

impl MemoryReader {
    /// `(resident bytes, limit bytes)`; `None` if this process's stat cannot be read. A
    /// limit of 0 means none could be found.
    pub fn read(&mut self) -> Option<(u64, u64)> {
        let me = Stat::read(std::process::id())?;
        let rss = me.rss_pages.saturating_mul(page_size());
        self.sys.refresh_memory();
        let limit = self
            .sys
            .cgroup_limits()
            .map(|c| c.total_memory)
            .filter(|t| *t > 0)
            .unwrap_or_else(|| self.sys.total_memory());
        Some((rss, limit))
    }
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

    #[test]
    fn proc_stat_fields_are_read_after_the_command_name() {
        // A command name with a space and a parenthesis.
        let line = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1000 \
                    123456 7 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let f = parse_proc_stat(line, 100.0, 4096.0, Some(1_000_000.0));
        assert_eq!(f.cpu_seconds, Some(3.0));
        assert_eq!(f.virtual_memory_bytes, Some(123456.0));
        assert_eq!(f.resident_memory_bytes, Some(7.0 * 4096.0));
        assert_eq!(f.start_time_seconds, Some(1_000_010.0));
        assert_eq!(
            parse_proc_stat("garbage", 100.0, 4096.0, None),
            ProcessFigures::default()
        );
        assert_eq!(
            parse_max_fds(
                "Limit Soft Hard Units\nMax open files            1024                 524288               files\n"
            ),
            Some(1024.0)
        );
    }

    #[test]
    fn argv_and_comm_name_this_process() {
        let me = std::process::id();
        let args = argv(me);
        assert!(!args.is_empty(), "no argv for our own pid");
        assert!(comm(me).is_some_and(|c| !c.is_empty()));
        assert!(argv(u32::MAX).is_empty() && comm(u32::MAX).is_none());
        let (rss, limit) = MemoryReader::default().read().unwrap();
        assert!(rss > 0 && limit > 0, "rss {rss}, limit {limit}");
    }
}
