//! The agents under the watchdog: each running task's process tree (every process under
//! the shim, which a subreaper keeps together even when they double-fork or call setsid)
//! and the agent's own PostgreSQL sessions (`application_name = <schema>/task/<id>`, `taskwarden/task/<id>` by default,
//! which command agents get as `PGAPPNAME`). Every tick samples both, exports them per
//! agent, stores them per task for status, and enforces:
//!
//! - `memory_max`, `processes_max`, `cpu_time_max` of the agent: the task is ended (its
//!   tree killed by the shim) and fails with `over_limit`, the error naming the limit and
//!   the figure;
//! - an agent session older than `session_max_age`: terminated, and its task cancelled;
//! - one idle in a transaction past `agent_idle_in_transaction_max`: terminated (the task
//!   goes on and sees its connection closed);
//! - one whose task is not running (ended, or waiting for a retry): terminated, so a
//!   crashed agent's backends do not linger;
//! - one past `session_warn_age`: logged once.
//!
//! An agent may connect as a role other than the daemon's. Without `pg_read_all_stats`
//! the daemon sees such a session (its application_name) but not its state or ages, so
//! it counts it and applies no age rule; without `pg_signal_backend` it cannot end it.
//! Either is logged once per role, naming the grant, and the rest of the watch goes on.
//!
//! Only sessions in taskwarden's own database are watched: task ids are numbers of that
//! database, and another deployment on the same cluster has tasks with the same ids (its
//! sessions are its own supervisor's business).
//!
//! Limits are enforced by sampling, so a tree can pass a limit for up to one interval
//! before it is killed (with systemd `Delegate=yes` the kernel's cgroup limits would be
//! exact; not used yet).

use super::Supervisor;
use super::SupervisorError;
use super::lock_timeout_for;
use crate::config::Config;
use crate::metrics as m;
use crate::orchestrator::registry::{AgentUsage, Kill};
use crate::store::{TaskStatus, activity, watchdog};
use std::collections::BTreeMap;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// One process as the supervisor sums it up.
#[derive(Debug, Clone, Copy)]
struct Proc {
    ppid: u32,
    zombie: bool,
    rss_pages: u64,
    /// utime + stime, and cutime + cstime, in clock ticks.
    own_ticks: u64,
    reaped_ticks: u64,
}

impl From<crate::process::Stat> for Proc {
    fn from(s: crate::process::Stat) -> Proc {
        Proc {
            ppid: s.ppid,
            zombie: s.zombie(),
            rss_pages: s.rss_pages,
            own_ticks: s.utime.saturating_add(s.stime),
            reaped_ticks: s.cutime.saturating_add(s.cstime),
        }
    }
}

/// Every process on the machine, by pid (read once per tick).
fn all_procs() -> HashMap<u32, Proc> {
    crate::process::all()
        .into_iter()
        .map(|(pid, s)| (pid, Proc::from(s)))
        .collect()
}

/// The tree under `root` as a usage figure: processes, resident bytes, CPU seconds. The
/// shim at the root is not counted as a process of the agent, but what it reaped is CPU
/// time of the agent.
fn tree_usage(
    root: u32,
    procs: &HashMap<u32, Proc>,
    children: &HashMap<u32, Vec<u32>>,
) -> AgentUsage {
    // SAFETY-free: sysconf is a plain libc call with no pointers.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .unwrap_or(100)
        .max(1);
    let Some(r) = procs.get(&root) else {
        return AgentUsage::default();
    };
    let shim = crate::agents::shim::is_shim(root);
    let mut u = AgentUsage::default();
    let mut ticks = r.reaped_ticks;
    if !shim {
        u.processes = 1;
        u.resident_memory_bytes = r.rss_pages.saturating_mul(page);
        ticks = ticks.saturating_add(r.own_ticks);
    }
    let mut stack: Vec<u32> = children.get(&root).cloned().unwrap_or_default();
    let mut seen: HashSet<u32> = HashSet::from([root]);
    while let Some(pid) = stack.pop() {
        if !seen.insert(pid) {
            continue;
        }
        let Some(p) = procs.get(&pid) else { continue };
        if !p.zombie {
            u.processes += 1;
            u.resident_memory_bytes = u
                .resident_memory_bytes
                .saturating_add(p.rss_pages.saturating_mul(page));
        }
        ticks = ticks.saturating_add(p.own_ticks);
        if let Some(c) = children.get(&pid) {
            stack.extend(c);
        }
    }
    u.cpu_seconds = ticks as f64 / hz as f64;
    u
}

/// One of an agent's own sessions, from pg_stat_activity.
struct AgentSession {
    pid: i32,
    task_id: i64,
    idle_in_transaction: bool,
    age_seconds: f64,
    state_seconds: f64,
    /// Its state and ages are visible to this role (its own, or `pg_read_all_stats`).
    visible: bool,
    /// This role may end it (its own, or `pg_signal_backend`, and not a superuser's):
    /// `pg_terminate_backend` would raise 42501 for one it may not, failing the batch.
    signalable: bool,
    role: String,
}

/// How many (role, missing grant) pairs are remembered as logged.
pub(super) const PRIVILEGE_WARNED_MAX: usize = 64;
/// How often a lasting missing grant is said again.
pub(super) const PRIVILEGE_REWARN: Duration = Duration::from_secs(3600);

impl Supervisor {
    /// Samples every running task's process tree and agent sessions, records them, and
    /// applies the limits (see the module doc).
    pub(super) async fn check_agents(&mut self, cfg: &Config) -> Result<(), SupervisorError> {
        let running = self.running.trees();
        let procs = if running.iter().any(|(_, _, root)| root.is_some()) {
            all_procs()
        } else {
            HashMap::new()
        };
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for (pid, p) in &procs {
            children.entry(p.ppid).or_default().push(*pid);
        }
        let sessions = self.agent_sessions().await?;
        let here: HashMap<i64, &str> = running.iter().map(|(id, a, _)| (*id, a.as_str())).collect();
        let mut by_task: HashMap<i64, Vec<&AgentSession>> = HashMap::new();
        for s in &sessions {
            by_task.entry(s.task_id).or_default().push(s);
        }
        let mut terminate: Vec<(i32, &'static str)> = Vec::new();
        self.orphan_agent_sessions(&sessions, &here, &mut terminate)
            .await?;

        let mut per_agent: BTreeMap<String, AgentUsage> = cfg
            .agents
            .keys()
            .map(|a| (a.clone(), AgentUsage::default()))
            .collect();
        for (task_id, agent, root) in &running {
            let mut u = root
                .map(|r| tree_usage(r, &procs, &children))
                .unwrap_or_default();
            let mine = by_task.get(task_id).map(Vec::as_slice).unwrap_or(&[]);
            u.db_sessions = mine.len() as u64;
            u.db_sessions_idle_in_transaction =
                mine.iter().filter(|s| s.idle_in_transaction).count() as u64;
            u.oldest_db_session_seconds = mine.iter().map(|s| s.age_seconds).reduce(f64::max);
            self.agent_session_rules(cfg, *task_id, agent, mine, &mut terminate);
            if let Some(a) = cfg.agents.get(agent) {
                self.agent_limits(a, *task_id, agent, &u);
            }
            let delta =
                (u.cpu_seconds - self.agent_cpu.get(task_id).copied().unwrap_or(0.0)).max(0.0);
            self.agent_cpu.insert(*task_id, u.cpu_seconds);
            // A task can outlive its agent's config (removed by a reload): its figures go
            // to the one series of unknown agents.
            let label = m::agent_label(cfg.agents.contains_key(agent), agent);
            self.metrics
                .add_float(m::AGENT_CPU_SECONDS_TOTAL, &[("agent", label)], delta);
            let sum = per_agent.entry(label.to_string()).or_default();
            sum.processes += u.processes;
            sum.resident_memory_bytes += u.resident_memory_bytes;
            sum.db_sessions += u.db_sessions;
            self.running.set_usage(*task_id, u);
        }
        self.agent_cpu.retain(|id, _| here.contains_key(id));
        for (agent, u) in &per_agent {
            let l = [("agent", agent.as_str())];
            self.metrics
                .gauge(m::AGENT_RESIDENT_MEMORY_BYTES, &l)
                .set(u.resident_memory_bytes as f64);
            self.metrics
                .gauge(m::AGENT_PROCESSES, &l)
                .set(u.processes as f64);
            self.metrics
                .gauge(m::AGENT_DB_SESSIONS, &l)
                .set(u.db_sessions as f64);
            if let Some(max) = cfg.agents.get(agent).and_then(|a| a.db_sessions_max) {
                self.metrics
                    .gauge(m::AGENT_DB_SESSIONS_MAX, &l)
                    .set(max as f64);
            }
        }
        // Series of agents neither configured nor running here any more are dropped.
        for name in [
            m::AGENT_RESIDENT_MEMORY_BYTES,
            m::AGENT_PROCESSES,
            m::AGENT_DB_SESSIONS,
            m::AGENT_DB_SESSIONS_MAX,
        ] {
            self.metrics
                .retain_gauges(name, "agent", |a| per_agent.contains_key(a));
        }
        self.terminate_agent_sessions(&terminate, &sessions, &here)
            .await
    }

    async fn agent_sessions(&mut self) -> Result<Vec<AgentSession>, SupervisorError> {
        let prefix =
            crate::db::Schema::new(&self.config.load().database.schema).task_sessions_prefix();
        let rows = activity::agent_sessions(self.admin().await?, &prefix).await?;
        // Forget the warnings of sessions that are gone (bounded by what exists now).
        let live: HashSet<i32> = rows.iter().map(|r| r.pid).collect();
        self.agent_sessions_warned.retain(|p| live.contains(p));
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                Some(AgentSession {
                    pid: r.pid,
                    task_id: r
                        .application_name
                        .strip_prefix(prefix.as_str())?
                        .parse()
                        .ok()?,
                    idle_in_transaction: r.idle_in_transaction,
                    age_seconds: r.age_seconds,
                    state_seconds: r.state_seconds,
                    visible: r.visible,
                    signalable: r.signalable,
                    role: r.role,
                })
            })
            .collect())
    }

    /// Sessions of tasks not running here: terminated unless the task runs on another
    /// instance (that instance's supervisor watches them).
    async fn orphan_agent_sessions(
        &mut self,
        sessions: &[AgentSession],
        here: &HashMap<i64, &str>,
        terminate: &mut Vec<(i32, &'static str)>,
    ) -> Result<(), SupervisorError> {
        let elsewhere: Vec<i64> = sessions
            .iter()
            .map(|s| s.task_id)
            .filter(|id| !here.contains_key(id))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if elsewhere.is_empty() {
            return Ok(());
        }
        let lock = lock_timeout_for(self.config.load().supervisor.interval.get());
        let read = match self.within_lock_timeout(lock).await {
            Ok(tx) => {
                let r = watchdog::running_among(&tx, &elsewhere).await;
                tx.finish(r).await.map_err(SupervisorError::from)
            }
            Err(e) => Err(e),
        };
        let running = match read {
            Ok(r) => r,
            // Whether those tasks still run is unknown this tick: terminate none of them.
            Err(SupervisorError::Db(e)) if e.is_lock_timeout() => {
                self.lock_refused("agent_sessions", &e, lock);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        for s in sessions {
            if !here.contains_key(&s.task_id) && !running.contains(&s.task_id) {
                terminate.push((s.pid, "task_ended"));
            }
        }
        Ok(())
    }

    fn agent_session_rules(
        &mut self,
        cfg: &Config,
        task_id: i64,
        agent: &str,
        mine: &[&AgentSession],
        terminate: &mut Vec<(i32, &'static str)>,
    ) {
        let sup = &cfg.supervisor;
        let max_age = sup.session_max_age.get().as_secs_f64();
        let idle_max = sup.agent_idle_in_transaction_max.get().as_secs_f64();
        let warn = sup.session_warn_age.get().as_secs_f64();
        for s in mine {
            if !s.visible {
                self.privilege_missing(
                    &s.role,
                    "pg_read_all_stats",
                    "cannot see the state or age of agent sessions of this role: they are counted, but session_max_age, agent_idle_in_transaction_max and session_warn_age do not apply to them",
                );
                continue;
            }
            if s.age_seconds >= max_age {
                terminate.push((s.pid, "session_max_age"));
                let reason = format!(
                    "its agent's database session (backend pid {}) was open {:.0}s, past supervisor.session_max_age ({max_age:.0}s)",
                    s.pid, s.age_seconds
                );
                tracing::warn!(
                    task_id,
                    agent,
                    backend_pid = s.pid,
                    age_seconds = s.age_seconds,
                    "agent session past session_max_age: terminated, task cancelled"
                );
                self.running.kill(
                    task_id,
                    Kill {
                        status: TaskStatus::Cancelled,
                        label: "cancelled",
                        reason,
                    },
                );
            } else if s.idle_in_transaction && s.state_seconds >= idle_max {
                tracing::warn!(
                    task_id,
                    agent,
                    backend_pid = s.pid,
                    idle_seconds = s.state_seconds,
                    "agent session idle in a transaction past agent_idle_in_transaction_max: terminated"
                );
                terminate.push((s.pid, "idle_in_transaction"));
            } else if s.age_seconds >= warn && self.agent_sessions_warned.insert(s.pid) {
                tracing::warn!(
                    task_id,
                    agent,
                    backend_pid = s.pid,
                    age_seconds = s.age_seconds,
                    "agent session open past session_warn_age"
                );
            }
        }
    }

    /// Kills the task when its tree passes one of its agent's limits (the first found).
    fn agent_limits(
        &self,
        a: &crate::config::AgentConfig,
        task_id: i64,
        agent: &str,
        u: &AgentUsage,
    ) {
        use crate::config::ByteSize;
        let memory = a
            .memory_max
            .filter(|m| u.resident_memory_bytes > m.0)
            .map(|max| {
                let now = ByteSize(u.resident_memory_bytes);
                (
                    "memory_max",
                    format!("resident memory {now} > memory_max {max}"),
                )
            });
        let processes = || {
            a.processes_max.filter(|m| u.processes > *m).map(|max| {
                let n = u.processes;
                (
                    "processes_max",
                    format!("{n} processes > processes_max {max}"),
                )
            })
        };
        let cpu = || {
            a.cpu_time_max
                .map(|m| m.get().as_secs_f64())
                .filter(|m| u.cpu_seconds > *m)
                .map(|max| {
                    let now = u.cpu_seconds;
                    (
                        "cpu_time_max",
                        format!("CPU time {now:.1}s > cpu_time_max {max:.1}s"),
                    )
                })
        };
        let over = memory.or_else(processes).or_else(cpu);
        let Some((limit, figure)) = over else { return };
        let reason =
            format!("over its agent's {limit}: {figure}; the whole process tree was killed");
        if self.running.kill_reason(task_id).is_none() {
            tracing::warn!(task_id, agent, limit, %figure, "task over its agent's limit: killed");
            self.metrics
                .counter(
                    m::AGENT_LIMITS_HIT_TOTAL,
                    &[("agent", agent), ("limit", limit)],
                )
                .increment(1);
        }
        self.running.kill(
            task_id,
            Kill {
                status: TaskStatus::Failed,
                label: "over_limit",
                reason,
            },
        );
    }

    async fn terminate_agent_sessions(
        &mut self,
        terminate: &[(i32, &'static str)],
        sessions: &[AgentSession],
        here: &HashMap<i64, &str>,
    ) -> Result<(), SupervisorError> {
        let mut allowed = Vec::with_capacity(terminate.len());
        for t in terminate {
            match sessions.iter().find(|s| s.pid == t.0) {
                Some(s) if !s.signalable => self.privilege_missing(
                    &s.role,
                    "pg_signal_backend",
                    "cannot end agent sessions of this role: the watchdog's terminations of them are skipped",
                ),
                _ => allowed.push(*t),
            }
        }
        let terminate = allowed.as_slice();
        if terminate.is_empty() {
            return Ok(());
        }
        let pids: Vec<i32> = terminate.iter().map(|(p, _)| *p).collect();
        activity::terminate_backends(self.admin().await?, &pids).await?;
        for (pid, why) in terminate {
            let task_id = sessions.iter().find(|s| s.pid == *pid).map(|s| s.task_id);
            let agent = task_id.and_then(|t| here.get(&t).copied()).unwrap_or("");
            tracing::info!(
                backend_pid = pid,
                task_id,
                agent,
                reason = why,
                "agent database session terminated"
            );
            self.metrics
                .counter(
                    m::AGENT_LIMITS_HIT_TOTAL,
                    &[("agent", agent), ("limit", why)],
                )
                .increment(1);
            self.metrics
                .counter(m::DB_BACKENDS_TERMINATED_TOTAL, &[])
                .increment(1);
        }
        Ok(())
    }

    /// Logs, once per role and grant, what the watch cannot do without the grant.
    pub(super) fn privilege_missing(
        &mut self,
        role: &str,
        grant: &'static str,
        what: &'static str,
    ) {
        // Said again every PRIVILEGE_REWARN while it lasts: a grant revoked at runtime, or
        // roles beyond the cap, are not silenced for good.
        let now = Instant::now();
        if self
            .privilege_warned_since
            .is_none_or(|t| now.saturating_duration_since(t) >= PRIVILEGE_REWARN)
        {
            self.privilege_warned.clear();
            self.privilege_warned_since = Some(now);
        }
        if self.privilege_warned.len() >= PRIVILEGE_WARNED_MAX {
            return;
        }
        if self.privilege_warned.insert((role.to_string(), what)) {
            tracing::warn!(
                session_role = role,
                missing_grant = grant,
                "{what} (GRANT {grant} TO the daemon's role to watch them fully)"
            );
        }
    }
}
