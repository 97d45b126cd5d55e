//! The applications' sessions: `[watch.NAME]` rules applied to the whole server's
//! `pg_stat_activity`, and the server's connection use against what it admits.
//!
//! The seeds' leaks were in the applications beside the task runner: sessions opened and
//! never closed until the application's pool (and then the server) ran out. Each tick
//! this reads every client session once, matches each rule (application_name glob, role,
//! database, network), records the figures, fires `watch_sessions_high` at the rule's
//! budget, logs each session past a limit once (with its caller, which the client helpers
//! in `examples/clients/` put into `application_name`), and — only with
//! `action = "terminate"` — ends it. Sessions no rule matches are never touched, and
//! neither are taskwarden's own (its pool, its agents') which have their own checks.
//!
//! Every signal is sent by a statement that checks the session is still the one seen
//! (same pid, same start, same state since the same moment), so a pid reused or a
//! transaction that moved on in between is left alone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;

use super::{Supervisor, SupervisorError};
use crate::alerts::{self, Severity};
use crate::config::Config;
use crate::config::watch::{Cidr, WatchAction, WatchConfig, glob_match};
use crate::metrics as m;
use crate::store::activity::{self, ClientSession, ServerUse, Signal, SignalRequest};

/// Sessions listed per rule in `/v1/status` (oldest first); the figures count them all.
pub const WATCH_LIST_MAX: usize = 20;
/// Roles with a connection limit listed in `/v1/status` (the fullest first).
pub const ROLES_LIST_MAX: usize = 20;
/// The first characters of a session's query kept for logs and status.
const QUERY_PREFIX_CHARS: usize = 200;
/// Names (role, database, application) are at most 63 bytes in PostgreSQL.
const NAME_CHARS: usize = 63;
/// Callers (application names) named in a `watch_sessions_high` alert.
const TOP_CALLERS: usize = 5;

/// The session states the figures use (`state` label).
const STATES: [&str; 4] = ["active", "idle", "idle_in_transaction", "unknown"];

/// The limits, as the `reason` label and the config key name them.
const IDLE_IN_TRANSACTION: &str = "idle_in_transaction_max";
const SESSION_AGE: &str = "session_max_age";
const QUERY_DURATION: &str = "query_max_duration";

/// One client session of the server, as `pg_stat_activity` shows it to this role.
#[derive(Debug, Clone)]
struct Session {
    pid: i32,
    user: String,
    database: String,
    application_name: String,
    client_addr: Option<String>,
    state: Option<String>,
    /// Epoch seconds of `backend_start`, `state_change`, `query_start`: what the signal
    /// statement compares, so it acts only on the session seen.
    started: f64,
    state_since: Option<f64>,
    query_since: Option<f64>,
    age: f64,
    state_age: Option<f64>,
    query_age: Option<f64>,
    query: String,
}

impl Session {
    fn state_label(&self) -> &'static str {
        match self.state.as_deref() {
            None => "unknown",
            Some("idle") => "idle",
            Some("idle in transaction" | "idle in transaction (aborted)") => "idle_in_transaction",
            // active, fastpath function call, disabled: working, as far as a budget goes.
            Some(_) => "active",
        }
    }

    fn matches(&self, w: &WatchConfig, net: Option<&Cidr>) -> bool {
        glob_match(&w.application_name, &self.application_name)
            && w.user.as_deref().is_none_or(|u| glob_match(u, &self.user))
            && w.database
                .as_deref()
                .is_none_or(|d| glob_match(d, &self.database))
            && net.is_none_or(|n| {
                self.client_addr
                    .as_deref()
                    .and_then(|a| a.parse::<IpAddr>().ok())
                    .is_some_and(|a| n.contains(a))
            })
    }

    /// The limits of `w` this session is past now.
    fn over(&self, w: &WatchConfig) -> Vec<&'static str> {
        let past = |age: Option<f64>, limit: Option<crate::config::Dur>| matches!((age, limit), (Some(a), Some(l)) if a > l.get().as_secs_f64());
        let mut out = Vec::new();
        if self.state_label() == "idle_in_transaction"
            && past(self.state_age, w.idle_in_transaction_max)
        {
            out.push(IDLE_IN_TRANSACTION);
        }
        if past(Some(self.age), w.session_max_age) {
            out.push(SESSION_AGE);
        }
        if self.state.as_deref() == Some("active") && past(self.query_age, w.query_max_duration) {
            out.push(QUERY_DURATION);
        }
        out
    }

    /// Which session this is, across ticks: a pid is reused, a pid and start are not.
    fn key(&self) -> (i32, u64) {
        (self.pid, self.started.to_bits())
    }
}

impl From<ClientSession> for Session {
    fn from(s: ClientSession) -> Session {
        Session {
            pid: s.pid,
            // Names are input (a role or database may be named with a newline): kept
            // printable and within PostgreSQL's 63 bytes, as the query's start is.
            user: prefix(&s.user, NAME_CHARS),
            database: prefix(&s.database, NAME_CHARS),
            application_name: prefix(&s.application_name, NAME_CHARS),
            client_addr: s.client_addr,
            state: s.state,
            started: s.started,
            state_since: s.state_since,
            query_since: s.query_since,
            age: s.age,
            state_age: s.state_age,
            query_age: s.query_age,
            query: prefix(&s.query, QUERY_PREFIX_CHARS),
        }
    }
}

/// What ends a session past `reason`: its query cancelled past `query_max_duration`, the
/// session terminated past the others.
fn signal_for(reason: &str) -> Signal {
    match reason {
        IDLE_IN_TRANSACTION => Signal::EndIdleTransaction,
        QUERY_DURATION => Signal::CancelQuery,
        _ => Signal::EndSession,
    }
}

/// A watched session as `/v1/status` lists it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WatchedSession {
    pub pid: i32,
    pub user: String,
    pub database: String,
    /// With the client helpers, `app:file.py:line:function` of the code that opened it.
    pub application_name: String,
    pub client_addr: Option<String>,
    /// As PostgreSQL says (`idle in transaction`, …); null where this role may not see it.
    pub state: Option<String>,
    /// Since the session connected.
    pub age_seconds: f64,
    /// Since it entered its current state.
    pub state_seconds: Option<f64>,
    /// The first 200 characters of its current or last query.
    pub query: String,
    /// The rule's limits it is past now.
    #[schema(value_type = Vec<String>)]
    pub over_limit: Vec<&'static str>,
}

/// One rule's sessions, as `/v1/status` shows them.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WatchRuleView {
    pub application_name: String,
    /// `alert` or `terminate`.
    pub action: &'static str,
    pub max_sessions: Option<u32>,
    /// Sessions it matches, listed or not.
    pub sessions_total: usize,
    /// By state: active, idle, idle_in_transaction, unknown.
    pub by_state: BTreeMap<&'static str, usize>,
    pub oldest_age_seconds: f64,
    /// Oldest first, at most 20 (`sessions_total` counts them all).
    pub sessions: Vec<WatchedSession>,
}

/// A role with a connection limit, and its connections.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RoleConnections {
    pub role: String,
    pub connections: i64,
    pub limit: i64,
}

/// The whole server's client connections against what it admits.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct ServerConnections {
    /// Client connections, every application's.
    pub in_use: i64,
    /// max_connections minus the reserved slots: what ordinary roles may open.
    pub max: i64,
    /// in_use / max.
    pub utilization: f64,
    pub by_state: BTreeMap<String, i64>,
    /// Roles with a connection limit (`rolconnlimit`), the fullest first, at most 20.
    pub roles: Vec<RoleConnections>,
}

/// What the supervisor last saw of the applications' sessions.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WatchView {
    pub as_of: DateTime<Utc>,
    pub server: ServerConnections,
    /// Per `[watch.NAME]` rule.
    pub rules: BTreeMap<String, WatchRuleView>,
}

/// What the watch check remembers between ticks.
#[derive(Debug, Default)]
pub(super) struct WatchMemory {
    /// (rule, session, limit) already logged and counted; pruned to live sessions.
    logged: HashSet<(String, (i32, u64), &'static str)>,
    /// The last refusal logged, so a lasting one is logged once.
    refused: Option<String>,
}

/// The first `n` characters, with control characters shown as spaces (a query is
/// input: it must not break a log line).
fn prefix(s: &str, n: usize) -> String {
    s.chars()
        .take(n)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl Supervisor {
    /// The watch rules and the server's connection use (see the module doc). A statement
    /// the server refuses (a managed server that hides a catalog, say) is logged once per
    /// message and leaves the rest of the tick, and readiness, alone; a connection that
    /// fails is the tick's error like any other.
    pub(super) async fn check_watch(&mut self, cfg: &Config) -> Result<(), SupervisorError> {
        match self.watch_pass(cfg).await {
            // Refused by a server that answers; a connection terminated, a time-out or a
            // shutdown (transient) is the tick's error, and rebuilds the connection.
            Err(SupervisorError::Db(e)) if e.sqlstate().is_some() && !e.is_transient() => {
                let message = e.to_string();
                if self.watch.refused.as_deref() != Some(message.as_str()) {
                    tracing::warn!(error = %message, "watching the applications' sessions failed; the other checks go on");
                    self.watch.refused = Some(message);
                }
                self.metrics
                    .counter(m::SUPERVISOR_WATCH_ERRORS_TOTAL, &[])
                    .increment(1);
                Ok(())
            }
            Err(e) => Err(e),
            Ok(()) => {
                self.watch.refused = None;
                Ok(())
            }
        }
    }

    async fn watch_pass(&mut self, cfg: &Config) -> Result<(), SupervisorError> {
        let server = self.read_server().await?;
        self.record_server(cfg, &server);
        let mut rules = BTreeMap::new();
        if !cfg.watch.is_empty() {
            let sessions = self.read_sessions().await?;
            let live: HashSet<(i32, u64)> = sessions.iter().map(Session::key).collect();
            self.watch
                .logged
                .retain(|(rule, key, _)| live.contains(key) && cfg.watch.contains_key(rule));
            let mut signals: Vec<(&Session, &'static str, &str)> = Vec::new();
            // One signal per session: the first rule and limit (in config order) that ends
            // it; a session to be terminated has no query to cancel.
            let mut signalled: HashMap<(i32, u64), &'static str> = HashMap::new();
            for (name, w) in &cfg.watch {
                // Validated at load and reload; a network that would not parse must match
                // nothing, never everything.
                let net = match w.client_addr.as_deref().map(Cidr::parse) {
                    None => None,
                    Some(Ok(n)) => Some(n),
                    Some(Err(_)) => continue,
                };
                let mine: Vec<&Session> = sessions
                    .iter()
                    .filter(|s| s.matches(w, net.as_ref()))
                    .collect();
                // A flood (hundreds of sessions past a limit at once) is logged as its first
                // WATCH_LIST_MAX and one line for the rest; every one is counted.
                let mut logged = 0;
                let mut unlogged = 0;
                for s in &mine {
                    if s.state.is_none() {
                        self.privilege_missing(
                            &s.user,
                            "pg_read_all_stats",
                            "cannot see the state and ages of this role's sessions that a watch rule matches: they count as unknown and no limit applies to them",
                        );
                    }
                    for reason in s.over(w) {
                        let quiet = logged >= WATCH_LIST_MAX;
                        if self.over_limit(name, w, s, reason, quiet) {
                            if quiet {
                                unlogged += 1;
                            } else {
                                logged += 1;
                            }
                        }
                        if w.action == WatchAction::Terminate {
                            let first = signalled.get(&s.key()).copied();
                            let ends = reason != QUERY_DURATION;
                            match first {
                                None => {
                                    signalled.insert(s.key(), reason);
                                    signals.push((s, reason, name));
                                }
                                // A cancel listed first gives way to a termination.
                                Some(QUERY_DURATION) if ends => {
                                    signalled.insert(s.key(), reason);
                                    signals.retain(|(o, _, _)| o.key() != s.key());
                                    signals.push((s, reason, name));
                                }
                                Some(_) => {}
                            }
                        }
                    }
                }
                if unlogged > 0 {
                    tracing::warn!(
                        watch = %name,
                        sessions = unlogged,
                        "{unlogged} more sessions of a watched application are past a limit of their rule this pass (not logged one by one; counted in taskwarden_watch_sessions_over_limit_total; `taskwarden status` lists them)"
                    );
                }
                rules.insert(name.clone(), self.record_rule(cfg, name, w, &mine));
            }
            self.signal(&signals).await?;
        }
        self.forget_rules(cfg);
        self.liveness.set_watch(WatchView {
            as_of: Utc::now(),
            server,
            rules,
        });
        Ok(())
    }

    async fn read_sessions(&mut self) -> Result<Vec<Session>, SupervisorError> {
        let ours = self.application_name.clone();
        let agents =
            crate::db::Schema::new(&self.config.load().database.schema).task_sessions_prefix();
        let rows = activity::client_sessions(self.admin().await?).await?;
        Ok(rows
            .into_iter()
            .map(Session::from)
            // taskwarden's own sessions (every instance's pool, its agents') have their
            // own checks; a rule as wide as "*" must not end them.
            .filter(|s| !is_ours(&s.application_name, &ours, &agents))
            .collect())
    }

    async fn read_server(&mut self) -> Result<ServerConnections, SupervisorError> {
        let ServerUse {
            by_state,
            max,
            roles,
        } = activity::server_use(self.admin().await?, ROLES_LIST_MAX).await?;
        let roles = roles
            .into_iter()
            .map(|r| RoleConnections {
                role: prefix(&r.role, NAME_CHARS),
                limit: r.limit,
                connections: r.connections,
            })
            .collect();
        let in_use = by_state.values().sum();
        Ok(ServerConnections {
            in_use,
            max,
            utilization: if max > 0 {
                in_use as f64 / max as f64
            } else {
                0.0
            },
            by_state,
            roles,
        })
    }

    /// Server-wide use: gauges, and `server_connections_high` at the pool's alert line
    /// (for the server, or for a role against its connection limit), cleared below the
    /// clear line for all of them.
    fn record_server(&mut self, cfg: &Config, s: &ServerConnections) {
        for state in STATES {
            self.metrics
                .gauge(m::SERVER_CONNECTIONS, &[("state", state)])
                .set(s.by_state.get(state).copied().unwrap_or(0) as f64);
        }
        self.metrics
            .gauge(m::SERVER_MAX_CONNECTIONS, &[])
            .set(s.max as f64);
        let (alert, clear) = (
            cfg.supervisor.pool_alert_ratio,
            cfg.supervisor.pool_clear_ratio,
        );
        let ratio = |n: i64, max: i64| if max > 0 { n as f64 / max as f64 } else { 0.0 };
        let full_roles: Vec<&RoleConnections> = s
            .roles
            .iter()
            .filter(|r| ratio(r.connections, r.limit) >= alert)
            .collect();
        let firing = self.alerts.is_firing(alerts::SERVER_CONNECTIONS_HIGH);
        if !firing && (s.utilization >= alert || !full_roles.is_empty()) {
            let summary = if s.utilization >= alert {
                format!(
                    "the PostgreSQL server has {} of {} client connections in use ({:.0}%), at or above the {:.0}% alert line",
                    s.in_use,
                    s.max,
                    s.utilization * 100.0,
                    alert * 100.0
                )
            } else {
                let names: Vec<String> = full_roles
                    .iter()
                    .map(|r| format!("{} {} of {}", r.role, r.connections, r.limit))
                    .collect();
                format!(
                    "roles at or above the {:.0}% line of their connection limit: {}",
                    alert * 100.0,
                    names.join(", ")
                )
            };
            self.alerts.fire(
                alerts::SERVER_CONNECTIONS_HIGH,
                Severity::Warning,
                summary,
                json!({ "server": s, "roles_high": full_roles }),
            );
        } else if firing
            && s.utilization < clear
            && s.roles
                .iter()
                .all(|r| ratio(r.connections, r.limit) < clear)
        {
            self.alerts.resolve(
                alerts::SERVER_CONNECTIONS_HIGH,
                format!(
                    "the PostgreSQL server's client connections back to {} of {} ({:.0}%)",
                    s.in_use,
                    s.max,
                    s.utilization * 100.0
                ),
                json!({ "server": s }),
            );
        }
    }

    /// A session past a limit of its rule: counted once per session and limit, and logged
    /// unless `quiet` (the rule has logged [`WATCH_LIST_MAX`] this tick already). Whether
    /// it was new.
    fn over_limit(
        &mut self,
        rule: &str,
        w: &WatchConfig,
        s: &Session,
        reason: &'static str,
        quiet: bool,
    ) -> bool {
        if !self
            .watch
            .logged
            .insert((rule.to_string(), s.key(), reason))
        {
            return false;
        }
        self.metrics
            .counter(
                m::WATCH_SESSIONS_OVER_LIMIT_TOTAL,
                &[("watch", rule), ("reason", reason)],
            )
            .increment(1);
        let limit_s = match reason {
            IDLE_IN_TRANSACTION => w.idle_in_transaction_max,
            SESSION_AGE => w.session_max_age,
            _ => w.query_max_duration,
        }
        .map(|d| d.get().as_secs_f64())
        .unwrap_or_default();
        if quiet {
            return true;
        }
        tracing::warn!(
            watch = rule,
            reason,
            limit_seconds = limit_s,
            action = w.action.as_str(),
            pid = s.pid,
            // Quoted: names and the query are input, and must not pose as other fields.
            user = ?s.user,
            database = ?s.database,
            application_name = ?s.application_name,
            client_addr = s.client_addr.as_deref().unwrap_or("local"),
            state = s.state.as_deref().unwrap_or("unknown"),
            age_seconds = s.age.round(),
            state_seconds = s.state_age.unwrap_or_default().round(),
            query = ?s.query,
            "a watched application's session is past its rule's {reason} ({limit_s}s): opened by {:?}",
            s.application_name
        );
        true
    }

    /// Terminates (or, for a query, cancels) the sessions listed, each only if unchanged.
    async fn signal(
        &mut self,
        list: &[(&Session, &'static str, &str)],
    ) -> Result<(), SupervisorError> {
        if list.is_empty() {
            return Ok(());
        }
        let results = match self.signal_batch(list).await {
            Ok(r) => r,
            // A refusal the privilege check did not foresee (42501) fails the whole
            // statement: signal one by one, so one session only fails its own.
            Err(SupervisorError::Db(e))
                if e.sqlstate()
                    == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
            {
                let mut all = HashMap::new();
                for one in list.chunks(1) {
                    match self.signal_batch(one).await {
                        Ok(r) => all.extend(r),
                        Err(SupervisorError::Db(e))
                            if e.sqlstate()
                                == Some(
                                    &tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE,
                                ) =>
                        {
                            self.privilege_missing(
                                &one[0].0.user,
                                "pg_signal_backend",
                                "the server refused to end sessions of this role that a watch rule with action = \"terminate\" matches: they are only logged",
                            );
                        }
                        Err(e) => return Err(e),
                    }
                }
                all
            }
            Err(e) => return Err(e),
        };
        // In the order listed (rules as configured): the first rule and limit that ended
        // a session names it, and a session is counted once. At most WATCH_LIST_MAX lines
        // per rule and pass, then one for the rest.
        let mut counted: HashSet<(i32, &str)> = HashSet::new();
        let mut lines: HashMap<&str, usize> = HashMap::new();
        let mut refused: HashMap<&str, u64> = HashMap::new();
        for (s, reason, rule) in list {
            let Some((done, role)) = results.get(&(s.pid, *reason)) else {
                continue;
            };
            let Some(ok) = done else {
                *refused.entry(rule).or_default() += 1;
                self.privilege_missing(
                    role,
                    "pg_signal_backend",
                    "cannot end sessions of this role that a watch rule with action = \"terminate\" matches: they are only logged",
                );
                continue;
            };
            let what = if *reason == QUERY_DURATION {
                "query"
            } else {
                "session"
            };
            if !ok || !counted.insert((s.pid, what)) {
                continue;
            }
            let n = lines.entry(rule).or_default();
            *n += 1;
            let quiet = *n > WATCH_LIST_MAX;
            if *reason == QUERY_DURATION {
                self.metrics
                    .counter(m::WATCH_QUERIES_CANCELLED_TOTAL, &[("watch", rule)])
                    .increment(1);
                if !quiet {
                    tracing::warn!(watch = rule, reason, pid = s.pid, application_name = ?s.application_name, query = ?s.query, "cancelled a watched application's query past its rule's {reason}");
                }
            } else {
                self.metrics
                    .counter(
                        m::WATCH_SESSIONS_TERMINATED_TOTAL,
                        &[("watch", rule), ("reason", reason)],
                    )
                    .increment(1);
                if !quiet {
                    tracing::warn!(watch = rule, reason, pid = s.pid, application_name = ?s.application_name, state = s.state.as_deref().unwrap_or("unknown"), "terminated a watched application's session past its rule's {reason}");
                }
            }
        }
        for (rule, n) in lines {
            if n > WATCH_LIST_MAX {
                tracing::warn!(
                    watch = rule,
                    signalled = n,
                    "{} more sessions or queries of a watched application were ended this pass (not logged one by one; counted in the watch metrics)",
                    n - WATCH_LIST_MAX
                );
            }
        }
        for (rule, n) in refused {
            self.metrics
                .counter(m::WATCH_SIGNALS_REFUSED_TOTAL, &[("watch", rule)])
                .increment(n);
        }
        Ok(())
    }

    /// One signal statement for `list`: per (pid, limit) signalled, whether it went out
    /// (None: this role may not signal that session) and the session's role.
    async fn signal_batch(
        &mut self,
        list: &[(&Session, &'static str, &str)],
    ) -> Result<HashMap<(i32, &'static str), (Option<bool>, String)>, SupervisorError> {
        let requests: Vec<SignalRequest> = list
            .iter()
            .map(|(s, reason, _)| SignalRequest {
                pid: s.pid,
                started: s.started,
                signal: signal_for(reason),
                since: match *reason {
                    IDLE_IN_TRANSACTION => s.state_since.unwrap_or_default(),
                    QUERY_DURATION => s.query_since.unwrap_or_default(),
                    _ => 0.0,
                },
            })
            .collect();
        let done = activity::signal_sessions(self.admin().await?, &requests).await?;
        let mut out = HashMap::new();
        for d in done {
            let Some(reason) = [IDLE_IN_TRANSACTION, SESSION_AGE, QUERY_DURATION]
                .into_iter()
                .find(|r| signal_for(r) == d.signal)
            else {
                continue;
            };
            out.insert((d.pid, reason), (d.done, prefix(&d.role, NAME_CHARS)));
        }
        Ok(out)
    }

    /// A rule's gauges and budget alert; returns what status shows of it.
    fn record_rule(
        &mut self,
        cfg: &Config,
        name: &str,
        w: &WatchConfig,
        mine: &[&Session],
    ) -> WatchRuleView {
        let mut by_state: BTreeMap<&'static str, usize> = STATES.iter().map(|s| (*s, 0)).collect();
        for s in mine {
            *by_state.entry(s.state_label()).or_default() += 1;
        }
        for (state, n) in &by_state {
            self.metrics
                .gauge(m::WATCH_SESSIONS, &[("watch", name), ("state", state)])
                .set(*n as f64);
        }
        let oldest = mine.iter().map(|s| s.age).fold(0.0, f64::max);
        self.metrics
            .gauge(m::WATCH_SESSION_OLDEST_AGE_SECONDS, &[("watch", name)])
            .set(oldest);
        match w.max_sessions {
            Some(max) => self
                .metrics
                .gauge(m::WATCH_MAX_SESSIONS, &[("watch", name)])
                .set(f64::from(max)),
            None => self
                .metrics
                .retain_gauges(m::WATCH_MAX_SESSIONS, "watch", |r| r != name),
        }
        if let Some(max) = w.max_sessions {
            let ratio = mine.len() as f64 / f64::from(max.max(1));
            let firing = self
                .alerts
                .is_firing_for(alerts::WATCH_SESSIONS_HIGH, Some(name));
            if !firing && ratio >= cfg.supervisor.pool_alert_ratio {
                let callers = top_callers(mine);
                self.alerts.fire_for(
                    alerts::WATCH_SESSIONS_HIGH,
                    Some(name),
                    Severity::Warning,
                    format!(
                        "watched application {name:?} has {} of its {max} sessions ({:.0}%), at or above the {:.0}% alert line; most opened by {}",
                        mine.len(),
                        ratio * 100.0,
                        cfg.supervisor.pool_alert_ratio * 100.0,
                        callers.first().map_or("?", |(c, _)| c.as_str()),
                    ),
                    json!({ "watch": name, "sessions": mine.len(), "max_sessions": max,
                            "by_state": by_state, "top_callers": callers }),
                );
            } else if firing && ratio < cfg.supervisor.pool_clear_ratio {
                self.alerts.resolve_for(
                    alerts::WATCH_SESSIONS_HIGH,
                    Some(name),
                    format!(
                        "watched application {name:?} back to {} of its {max} sessions",
                        mine.len()
                    ),
                    json!({ "watch": name, "sessions": mine.len(), "max_sessions": max }),
                );
            }
        }
        let mut listed: Vec<&&Session> = mine.iter().collect();
        listed.sort_by(|a, b| b.age.total_cmp(&a.age));
        WatchRuleView {
            application_name: w.application_name.clone(),
            action: w.action.as_str(),
            max_sessions: w.max_sessions,
            sessions_total: mine.len(),
            by_state,
            oldest_age_seconds: oldest,
            sessions: listed
                .into_iter()
                .take(WATCH_LIST_MAX)
                .map(|s| WatchedSession {
                    pid: s.pid,
                    user: s.user.clone(),
                    database: s.database.clone(),
                    application_name: s.application_name.clone(),
                    client_addr: s.client_addr.clone(),
                    state: s.state.clone(),
                    age_seconds: s.age,
                    state_seconds: s.state_age,
                    query: s.query.clone(),
                    over_limit: s.over(w),
                })
                .collect(),
        }
    }

    /// Rules removed by a reload: their gauges go and their alert resolves.
    fn forget_rules(&mut self, cfg: &Config) {
        let keep = |r: &str| cfg.watch.contains_key(r);
        for name in [
            m::WATCH_SESSIONS,
            m::WATCH_SESSION_OLDEST_AGE_SECONDS,
            m::WATCH_MAX_SESSIONS,
        ] {
            self.metrics.retain_gauges(name, "watch", keep);
        }
        for rule in self.alerts.firing_subjects(alerts::WATCH_SESSIONS_HIGH) {
            if !keep(&rule) {
                self.alerts.resolve_for(
                    alerts::WATCH_SESSIONS_HIGH,
                    Some(&rule),
                    format!("watch rule {rule:?} removed"),
                    json!({ "watch": rule }),
                );
            }
        }
    }
}

/// Whether `app` names one of taskwarden's own sessions: its pool's (`ours`), its direct
/// connections' (`ours:listener`, `ours:supervisor`, … — cut at 63 bytes by the server, so
/// a prefix), its agents' (`<schema>/task/<id>`).
fn is_ours(app: &str, ours: &str, agents: &str) -> bool {
    app == ours
        || app
            .strip_prefix(ours)
            .is_some_and(|rest| rest.starts_with(':'))
        || app.starts_with(agents)
}

/// The application names most of `sessions` carry, with their counts, most first: with
/// the client helpers, the code that opened them.
fn top_callers(sessions: &[&Session]) -> Vec<(String, usize)> {
    let mut by: HashMap<&str, usize> = HashMap::new();
    for s in sessions {
        *by.entry(s.application_name.as_str()).or_default() += 1;
    }
    let mut v: Vec<(String, usize)> = by.into_iter().map(|(a, n)| (a.to_string(), n)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(TOP_CALLERS);
    v
}
