//! The dated view of task counts and instances that `/v1/status` and the supervisor's
//! gauges serve without needing the database at that moment.

use std::time::Duration;

use tokio_postgres::Row;

use super::*;

impl Store {
    /// Reads the [`DbView`] on a pooled session, waiting at most `wait` for one.
    pub async fn read_view(&self, wait: Duration) -> Result<DbView, StoreError> {
        let s = self.db.session_within("store.read_view", wait).await?;
        let counts = s.query(DbView::COUNTS_SQL, &[]).await?;
        let instances = s.query(DbView::INSTANCES_SQL, &[]).await?;
        Ok(DbView::from_rows(&counts, &instances))
    }

    /// Task counts by status (every status present, zero when none).
    pub async fn count_by_status(&self) -> Result<Vec<(TaskStatus, i64)>, StoreError> {
        let s = self.session("store.count_by_status").await?;
        let rows = s
            .query("SELECT status, count(*) FROM tasks GROUP BY status", &[])
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

/// Task counts and instances as read at one moment: what `/v1/status` shows and the
/// supervisor's task gauges record. Kept with its time so a reader that cannot reach the
/// database (pool exhausted, link down) can still answer, saying how old it is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DbView {
    pub as_of: chrono::DateTime<chrono::Utc>,
    /// Every status, zero when none.
    pub tasks_by_status: std::collections::BTreeMap<String, i64>,
    pub oldest_running_seconds: f64,
    pub instances: Vec<serde_json::Value>,
}

impl DbView {
    pub const COUNTS_SQL: &str = "SELECT status, count(*), \
        extract(epoch FROM now() - min(started_at))::float8 FROM tasks GROUP BY status";
    pub const INSTANCES_SQL: &str = "SELECT i.id, i.hostname, i.pid, i.version, i.started_at, \
        i.heartbeat_at, COALESCE(l.leader_id = i.id AND l.expires_at > now(), false) \
        FROM instances i LEFT JOIN leader l ON true ORDER BY i.started_at";

    pub fn from_rows(counts: &[Row], instances: &[Row]) -> DbView {
        let mut tasks_by_status: std::collections::BTreeMap<String, i64> = TaskStatus::ALL
            .iter()
            .map(|st| (st.as_str().to_string(), 0))
            .collect();
        let mut oldest_running_seconds = 0.0;
        for r in counts {
            let status: String = r.get(0);
            if status == "running" {
                oldest_running_seconds = r.get::<_, Option<f64>>(2).unwrap_or(0.0);
            }
            tasks_by_status.insert(status, r.get(1));
        }
        DbView {
            as_of: chrono::Utc::now(),
            tasks_by_status,
            oldest_running_seconds,
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
