//! The claimer: wakes on a notification, on freed capacity, or every `poll_interval`,
//! starts prefetched tasks on the free permits, and claims more per agent in one statement.
//!
//! Claiming only for free permits made a busy instance claim a handful of tasks per round
//! trip, one claim per freed permit. Instead each agent keeps a small local queue of tasks
//! claimed ahead (leased to this instance, registered so the lease keeper extends them):
//! a freed permit starts the next one at once, and a claim refills the queue when it is half
//! empty. The queue's size adapts to the work: at most what this instance finished in the
//! last [`PREFETCH_HORIZON`] (so slow agents prefetch nothing, other instances are not
//! starved, and a newly queued higher-priority task waits behind at most that much work),
//! and never more than `workers.prefetch`. At shutdown the queue is handed back.
//!
//! The claimer also keeps the cluster's pause list as it last read it, to spare a round
//! trip per paused agent. The claim statement itself refuses a paused agent, so a pause
//! stops every instance's claims from its next statement whatever this cache says; it is
//! read again once it is `poll_interval` old, so a resume elsewhere restarts claims here
//! within one poll (at once on the instance that took the resume).

use super::Context;
use super::capacity::{Capacity, RunPermit};
use super::outcome_writer::OutcomeWriter;
use crate::agents::AgentEntry;
use crate::metrics as m;
use crate::orchestrator::registry::Registration;
use crate::store::StoreError;
use crate::store::Task;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// The prefetch holds at most what this instance finished within this long.
pub const PREFETCH_HORIZON: Duration = Duration::from_millis(50);

/// A task claimed ahead and not started yet. Its registration keeps its lease extended and
/// lets a cancel reach it.
struct Prefetched {
    task: Task,
    registration: Registration,
}

/// What the claimer keeps between rounds: the tasks claimed ahead and the pause list.
#[derive(Default)]
pub(super) struct Claimer {
    /// Tasks claimed ahead per agent, not started yet.
    prefetched: Mutex<HashMap<String, VecDeque<Prefetched>>>,
    /// The agents paused cluster-wide, as last read.
    paused: Mutex<PausedCache>,
    /// When the earliest rate-throttled agent may start again: the loop wakes then
    /// instead of a poll later (a `1/250ms` rate claims four times a second).
    rate_wake: Mutex<Option<Instant>>,
}

/// The paused agents as last read, and when; `generation` grows at every local pause or
/// resume, so a read that raced with one is not kept.
#[derive(Default)]
struct PausedCache {
    agents: Arc<HashSet<String>>,
    read_at: Option<Instant>,
    generation: u64,
}

impl Claimer {
    fn rate_wake(&self) -> MutexGuard<'_, Option<Instant>> {
        self.rate_wake.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the loop `after` from now unless it already wakes sooner.
    fn wake_for_rate(&self, after: Duration) {
        let at = Instant::now().checked_add(after);
        let mut w = self.rate_wake();
        if let Some(at) = at
            && w.is_none_or(|cur| at < cur)
        {
            *w = Some(at);
        }
    }

    fn prefetched(&self) -> MutexGuard<'_, HashMap<String, VecDeque<Prefetched>>> {
        self.prefetched.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn paused_cache(&self) -> MutexGuard<'_, PausedCache> {
        self.paused.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Up to `n` prefetched tasks of `agent`, oldest claim first; ones cancelled while
    /// waiting (their row was cancelled through the API) are dropped.
    fn take(&self, agent: &str, n: usize) -> Vec<Prefetched> {
        let mut out = Vec::new();
        if n == 0 {
            return out;
        }
        let mut all = self.prefetched();
        let Some(q) = all.get_mut(agent) else {
            return out;
        };
        while out.len() < n {
            let Some(p) = q.pop_front() else { break };
            if !p.registration.token().is_cancelled() {
                out.push(p);
            }
        }
        out
    }

    fn len(&self, agent: &str) -> usize {
        self.prefetched().get(agent).map_or(0, |q| q.len())
    }

    /// Whether `agent` was paused at the last read of the pause list (no round trip; the
    /// claim statement refuses paused agents regardless).
    fn paused_as_last_read(&self, agent: &str) -> bool {
        self.paused_cache().agents.contains(agent)
    }

    /// A local pause or resume: the pause list is read again at the next claim round.
    pub(super) fn pause_list_changed(&self) {
        let mut c = self.paused_cache();
        c.generation += 1;
        c.read_at = None;
    }

    /// The agents paused cluster-wide, read again when the last reading is older than
    /// `poll_interval` (or a local pause or resume made it stale).
    async fn paused_agents(&self, ctx: &Context) -> Result<Arc<HashSet<String>>, StoreError> {
        let poll = ctx.config.load().workers.poll_interval.get();
        let generation = {
            let c = self.paused_cache();
            if c.read_at.is_some_and(|t| t.elapsed() < poll) {
                return Ok(Arc::clone(&c.agents));
            }
            c.generation
        };
        let read_at = Instant::now();
        let agents: HashSet<String> = ctx
            .store
            .paused_agents()
            .await?
            .into_iter()
            .map(|p| p.agent)
            .collect();
        let agents = Arc::new(agents);
        let mut c = self.paused_cache();
        if c.generation == generation {
            c.agents = Arc::clone(&agents);
            c.read_at = Some(read_at);
        }
        Ok(agents)
    }

    /// The claimer's loop: claim rounds until claiming stops, then the prefetch goes back.
    /// `start` runs a task on the runner.
    pub(super) async fn run(
        &self,
        ctx: &Context,
        capacity: &Capacity,
        writer: &OutcomeWriter,
        start: &(dyn Fn(Task, AgentEntry) + Sync),
    ) {
        // The first round runs at once: work queued before the start would otherwise
        // wait a whole poll interval (no notification comes for it).
        let mut first = true;
        loop {
            if !first {
                let mut poll = ctx.config.load().workers.poll_interval.get();
                if let Some(at) = self.rate_wake().take() {
                    poll = poll.min(at.saturating_duration_since(Instant::now()));
                }
                tokio::select! {
                    _ = ctx.claiming.cancelled() => break,
                    _ = ctx.wake.notified() => {}
                    _ = tokio::time::sleep(poll) => {}
                }
            }
            first = false;
            // Keep claiming while there is both capacity and work.
            loop {
                if ctx.claiming.is_cancelled() {
                    break;
                }
                match self.claim_once(ctx, capacity, writer, start).await {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming tasks failed");
                        break;
                    }
                }
            }
        }
        self.hand_back_prefetched(ctx).await;
    }

    /// One claim round over every agent with free capacity; returns how many tasks it
    /// started or prefetched.
    pub(super) async fn claim_once(
        &self,
        ctx: &Context,
        capacity: &Capacity,
        writer: &OutcomeWriter,
        start: &(dyn Fn(Task, AgentEntry) + Sync),
    ) -> Result<usize, StoreError> {
        let cfg = ctx.config.load();
        let agents = ctx.agents.load_full();
        let target = prefetch_target(capacity, cfg.workers.prefetch as usize);
        // Paused agents are skipped here; the claim statement refuses them regardless.
        let paused = self.paused_agents(ctx).await?;
        let mut moved = 0;
        for (name, entry) in agents.iter() {
            if paused.contains(name) {
                // What was claimed ahead goes back: a paused agent's tasks stay queued.
                let held = self.take(name, usize::MAX);
                self.release_prefetched(ctx, held).await;
                continue;
            }
            // A rated agent claims for its free permits only: a task claimed ahead under
            // the rate would start later, in a bunch with the next claim's (its prefetch
            // from before a reload that added the rate goes back to the queue).
            let agent_cfg = cfg.agents.get(name);
            let rate = agent_cfg.and_then(|a| a.rate);
            let burst = agent_cfg.and_then(|a| a.burst).unwrap_or(1);
            if rate.is_some() && self.len(name) > 0 {
                let held = self.take(name, usize::MAX);
                self.release_prefetched(ctx, held).await;
            }
            let mut free =
                capacity.free_for(name, entry.concurrency, cfg.workers.concurrency as usize);
            for p in self.take(name, free) {
                free -= 1;
                moved += 1;
                // Its own registration replaces the prefetch one.
                drop(p.registration);
                start(p.task, entry.clone());
            }
            let queued = self.len(name);
            // Refill when half empty; claim for free permits whenever there are some.
            let ahead = if rate.is_none() && queued * 2 <= target {
                target - queued
            } else {
                0
            };
            if free + ahead == 0 {
                continue;
            }
            let claimed = ctx
                .store
                .claim_rated(
                    name,
                    (free + ahead) as i64,
                    &ctx.instance_id,
                    cfg.workers.lease.get(),
                    rate,
                    burst,
                )
                .await;
            writer.record_write("claimer", &claimed, |c| c.tasks.len());
            let claimed = claimed?;
            if claimed.throttled {
                ctx.metrics
                    .counter(m::CLAIMS_THROTTLED_TOTAL, &[("agent", name.as_str())])
                    .increment(1);
                if let Some(after) = claimed.next_start_in.filter(|d| !d.is_zero()) {
                    self.wake_for_rate(after);
                }
                tracing::debug!(agent = %name, claimed = claimed.tasks.len(), rate = ?rate.map(|r| r.to_string()), next_start_in = ?claimed.next_start_in, "claim cut short by the agent's rate limit");
            }
            let claimed = claimed.tasks;
            let mut ahead_claimed = Vec::new();
            for t in claimed {
                moved += 1;
                if free > 0 {
                    free -= 1;
                    start(t, entry.clone());
                } else {
                    let registration =
                        ctx.running
                            .register(t.id, &t.agent, CancellationToken::new());
                    ahead_claimed.push(Prefetched {
                        task: t,
                        registration,
                    });
                }
            }
            if !ahead_claimed.is_empty() {
                self.prefetched()
                    .entry(name.clone())
                    .or_default()
                    .extend(ahead_claimed);
            }
        }
        Ok(moved)
    }

    /// For a run that just ended holding `permit`: the next task claimed ahead for its
    /// agent, to run on the same permit, unless claiming stopped (shutdown), the agent is
    /// paused or gone, or the permit is no longer within the limits (a reload lowered
    /// them). Wakes the claimer when the local queue is down to its refill mark.
    pub(super) fn next_prefetched(
        &self,
        ctx: &Context,
        capacity: &Capacity,
        permit: &RunPermit,
    ) -> Option<(Task, AgentEntry, CancellationToken, Registration)> {
        let agent = permit.agent();
        if ctx.claiming.is_cancelled() || self.paused_as_last_read(agent) {
            return None;
        }
        let cfg = ctx.config.load();
        // A rate added by a reload: what was claimed ahead without it goes back to the
        // queue at the next claim round, never starts here uncounted.
        if cfg.agents.get(agent).is_some_and(|a| a.rate.is_some()) {
            return None;
        }
        let entry = ctx.agents.load().get(agent).cloned()?;
        if capacity.over(agent, entry.concurrency, cfg.workers.concurrency as usize) {
            return None;
        }
        let p = self.take(agent, 1).pop();
        if p.is_some() {
            // Without a next task, the permit records the finish as it drops.
            permit.handed_on();
        }
        if self.len(agent) * 2 <= prefetch_target(capacity, cfg.workers.prefetch as usize) {
            ctx.wake.notify_one();
        }
        let p = p?;
        // Its own registration replaces the prefetch one (as in claim_once).
        drop(p.registration);
        let cancel = CancellationToken::new();
        let registration = ctx
            .running
            .register(p.task.id, &p.task.agent, cancel.clone());
        Some((p.task, entry, cancel, registration))
    }

    /// At shutdown: prefetched tasks never started go back to the queue at once, for any
    /// instance to take (instead of waiting for their leases to lapse).
    async fn hand_back_prefetched(&self, ctx: &Context) {
        let all: Vec<Prefetched> = self.prefetched().drain().flat_map(|(_, q)| q).collect();
        self.release_prefetched(ctx, all).await;
    }

    /// Hands tasks claimed ahead back to the queue; their registrations (which keep the
    /// leases extended) go only once that is written.
    async fn release_prefetched(&self, ctx: &Context, held: Vec<Prefetched>) {
        if held.is_empty() {
            return;
        }
        let ids: Vec<i64> = held.iter().map(|p| p.task.id).collect();
        match ctx.store.release(&ids, &ctx.instance_id).await {
            Ok(n) => tracing::info!(tasks = n, "prefetched tasks handed back to the queue"),
            Err(e) => {
                tracing::warn!(tasks = ids.len(), error = %e, "handing back prefetched tasks failed; their leases will lapse and re-queue them")
            }
        }
        drop(held);
    }
}

/// How many tasks to hold ahead per agent now: what finished here within
/// [`PREFETCH_HORIZON`], at most `max`.
fn prefetch_target(capacity: &Capacity, max: usize) -> usize {
    capacity.finished_within(PREFETCH_HORIZON, max)
}
