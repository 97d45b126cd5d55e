//! The dated view of task counts and instances that `/v1/status` and the supervisor's
//! gauges serve without needing the database at that moment.

use std::time::Duration;

use tokio_postgres::Row;

use super::Store;
use super::StoreError;
use crate::db::{DbError, Query};
use crate::task_state::TaskStatus;
use std::collections::HashMap;

impl Store {
    /// Reads the [`DbView`] on a pooled session, waiting at most `wait` for one; `known`
    /// are the configured agents (always listed; the others are capped and summed).
    pub async fn read_view(&self, wait: Duration, known: &[String]) -> Result<DbView, StoreError> {
        let s = self.db.session_within("store.read_view", wait).await?;
        Ok(DbView::read(&s, known).await?)
    }

    /// Task counts by status (every status present, zero when none).
    pub async fn count_by_status(&self) -> Result<Vec<(TaskStatus, i64)>, StoreError> {
        let s = self.session("store.count_by_status").await?;
        let rows = s
            .query(
                "SELECT status, count(*) FROM taskwarden.tasks GROUP BY status",
                &[],
            )
            .await?;
        let mut counts: HashMap<String, i64> = HashMap::new();
        for r in rows {
            counts.insert(r.try_get(0)?, r.try_get(1)?);
        }
        Ok(TaskStatus::ALL
            .iter()
            .map(|s| (*s, counts.get(s.as_str()).copied().unwrap_or(0)))
            .collect())
    }
}

/// The most entries of each list the view keeps (queues, paused agents, instances) beyond
/// the configured agents, and so the most `/v1/status` shows: agent names come from
/// input (`taskwarden.enqueue` takes any), and the view's size must not.
pub const VIEW_LIST_MAX: i64 = 100;

/// Task counts, queues and instances as read at one moment: what `/v1/status` shows and
/// the supervisor's task and queue gauges record. Kept with its time so a reader that
/// cannot reach the database (pool exhausted, link down) can still answer, saying how old
/// it is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DbView {
    pub as_of: chrono::DateTime<chrono::Utc>,
    /// Every status, zero when none.
    pub tasks_by_status: std::collections::BTreeMap<String, i64>,
    pub oldest_running_seconds: f64,
    /// Per agent with queued tasks or a pause: its queue. Every configured agent with
    /// one, and at most [`VIEW_LIST_MAX`] entries in all beyond those (the longest
    /// queues first).
    pub queues: std::collections::BTreeMap<String, QueueView>,
    /// Agents with queued tasks or a pause, listed or not.
    pub queues_total: i64,
    /// The queues of every agent no configured name matches, summed (depth), the oldest
    /// (latency), paused when any of them is.
    pub unknown_agents: QueueView,
    /// How many agents no configured name matches have a queue or a pause.
    pub unknown_agents_count: i64,
    /// Paused agents, listed in `queues` or not.
    pub paused_total: i64,
    /// At most [`VIEW_LIST_MAX`].
    pub instances: Vec<serde_json::Value>,
    /// Instances heard from within [`STATUS_INSTANCE_SILENCE`], listed or not.
    pub instances_total: i64,
}

/// One agent's queue.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct QueueView {
    /// Queued tasks, due or not (backoff, `run_after`, steps waiting for dependencies).
    pub queued: i64,
    /// How long the oldest due task has waited since it became due (Sidekiq's latency):
    /// queued tasks whose `run_after` has passed and that wait for no dependency; 0 when
    /// none.
    pub oldest_queued_seconds: f64,
    pub paused: bool,
    pub paused_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// How long an instance may be silent (no heartbeat) and still be listed in status;
/// [`DbView::INSTANCES_SQL`] says the same in SQL.
pub const STATUS_INSTANCE_SILENCE: Duration = Duration::from_secs(600);

impl DbView {
    /// One statement, one row per figure (`kind`, `key`, count, seconds, paused_at): task
    /// counts by status (with the oldest running task's age); queued tasks by agent (the
    /// partial index `tasks_runnable_idx` holds exactly these rows), the configured agents
    /// (`$1`) first and at most `$2` rows beyond them, longest first; paused agents, the
    /// same way; and the totals: the unknown agents' queues summed (`unknown`), how many
    /// unknown agents are paused (`unknown_paused`) and have a queue or pause
    /// (`unknown_agents`), how many agents in all (`agents`), how many paused (`paused_total`).
    const COUNTS_SQL: &str = "\
        WITH q AS (SELECT agent, count(*) AS n, \
            COALESCE(extract(epoch FROM now() - min(run_after) \
              FILTER (WHERE run_after <= now() AND cardinality(depends_on) = 0))::float8, 0) AS secs, \
            agent = ANY($1::text[]) AS known \
          FROM taskwarden.tasks WHERE status = 'queued' GROUP BY agent), \
        p AS (SELECT agent, paused_at, agent = ANY($1::text[]) AS known FROM taskwarden.paused_agents), \
        a AS (SELECT agent, bool_or(known) AS known FROM \
            (SELECT agent, known FROM q UNION ALL SELECT agent, known FROM p) x GROUP BY agent) \
        SELECT 'status' AS kind, status AS key, count(*) AS n, \
          extract(epoch FROM now() - min(started_at))::float8 AS secs, \
          NULL::timestamptz AS paused_at \
        FROM taskwarden.tasks GROUP BY status \
        UNION ALL \
        (SELECT 'queue', agent, n, secs, NULL FROM q \
          ORDER BY known DESC, n DESC, agent \
          LIMIT $2::int8 + (SELECT count(*) FROM q WHERE known)) \
        UNION ALL \
        SELECT 'unknown', '', COALESCE(sum(n), 0)::int8, COALESCE(max(secs), 0), NULL \
          FROM q WHERE NOT known \
        UNION ALL \
        (SELECT 'paused', agent, 0, 0, paused_at FROM p \
          ORDER BY known DESC, agent LIMIT $2::int8 + (SELECT count(*) FROM p WHERE known)) \
        UNION ALL \
        SELECT 'unknown_paused', '', count(*), 0, NULL FROM p WHERE NOT known \
        UNION ALL \
        SELECT 'paused_total', '', count(*), 0, NULL FROM p \
        UNION ALL \
        SELECT 'unknown_agents', '', count(*) FILTER (WHERE NOT known), 0, NULL FROM a \
        UNION ALL \
        SELECT 'agents', '', count(*), 0, NULL FROM a";
    /// Instances heard from within [`STATUS_INSTANCE_SILENCE`] (10 minutes), at most `$1`
    /// of them (the oldest first), each row with the total: the leader reaps a dead one
    /// after 3 × `workers.lease`, but with no leader running (or one that cannot write)
    /// status does not list the dead for ever.
    const INSTANCES_SQL: &str = "SELECT i.id, i.hostname, i.pid, i.version, i.started_at, \
        i.heartbeat_at, COALESCE(l.leader_id = i.id AND l.expires_at > now(), false), \
        count(*) OVER () \
        FROM taskwarden.instances i LEFT JOIN taskwarden.leader l ON true \
        WHERE i.heartbeat_at > now() - interval '10 minutes' ORDER BY i.started_at LIMIT $1::int8";

    /// Reads the view on any handle (two statements, in order); `known` are the
    /// configured agents (always listed; the others are capped and summed).
    pub async fn read(q: &impl Query, known: &[String]) -> Result<DbView, DbError> {
        let known = known.to_vec();
        let counts = q
            .query(DbView::COUNTS_SQL, &[&known, &VIEW_LIST_MAX])
            .await?;
        let instances = q.query(DbView::INSTANCES_SQL, &[&VIEW_LIST_MAX]).await?;
        Ok(DbView::from_rows(&counts, &instances))
    }

    fn from_rows(counts: &[Row], instances: &[Row]) -> DbView {
        let mut tasks_by_status: std::collections::BTreeMap<String, i64> = TaskStatus::ALL
            .iter()
            .map(|st| (st.as_str().to_string(), 0))
            .collect();
        let mut oldest_running_seconds = 0.0;
        let mut queues: std::collections::BTreeMap<String, QueueView> = Default::default();
        let mut unknown_agents = QueueView::default();
        let (mut unknown_agents_count, mut queues_total, mut paused_total) = (0, 0, 0);
        for r in counts {
            let (Ok(kind), Ok(key)) = (r.try_get::<_, &str>(0), r.try_get::<_, String>(1)) else {
                continue;
            };
            let n: i64 = r.try_get(2).unwrap_or(0);
            let secs: f64 = r.try_get::<_, Option<f64>>(3).ok().flatten().unwrap_or(0.0);
            match kind {
                "status" => {
                    if key == "running" {
                        oldest_running_seconds = secs;
                    }
                    tasks_by_status.insert(key, n);
                }
                "queue" => {
                    let q = queues.entry(key).or_default();
                    q.queued = n;
                    q.oldest_queued_seconds = secs.max(0.0);
                }
                "paused" => {
                    let q = queues.entry(key).or_default();
                    q.paused = true;
                    q.paused_at = r.try_get(4).ok().flatten();
                }
                "unknown" => {
                    unknown_agents.queued = n;
                    unknown_agents.oldest_queued_seconds = secs.max(0.0);
                }
                "unknown_paused" => unknown_agents.paused = n > 0,
                "unknown_agents" => unknown_agents_count = n,
                "agents" => queues_total = n,
                "paused_total" => paused_total = n,
                _ => {}
            }
        }
        DbView {
            as_of: chrono::Utc::now(),
            tasks_by_status,
            oldest_running_seconds,
            queues,
            queues_total,
            unknown_agents,
            unknown_agents_count,
            paused_total,
            instances_total: instances
                .first()
                .and_then(|r| r.try_get::<_, i64>(7).ok())
                .unwrap_or(0),
            instances: instances
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "id": r.get::<_, String>(0), "hostname": r.get::<_, String>(1),
                        "pid": r.get::<_, i32>(2), "version": r.get::<_, String>(3),
                        "started_at": r.get::<_, chrono::DateTime<chrono::Utc>>(4),
                        "heartbeat_at": r.get::<_, chrono::DateTime<chrono::Utc>>(5),
                        "leader": r.get::<_, bool>(6),
                    })
                })
                .collect(),
        }
    }
}
