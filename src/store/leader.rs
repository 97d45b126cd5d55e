//! The `leader` row (migration V3) the elector holds: taken when absent or expired,
//! renewed by its holder, deleted when it resigns. See `orchestrator::elector` for why
//! holding it is safe.

use std::time::Duration;

use crate::db::{DbError, Query};

/// One statement: inserts the row for `instance_id` with `ttl`, renews it if it is
/// `instance_id`'s, or takes it if it has expired. Whether `instance_id` holds it now.
pub async fn hold(q: &impl Query, instance_id: &str, ttl: Duration) -> Result<bool, DbError> {
    let row = q
        .query_opt(
            "INSERT INTO taskwarden.leader (name, leader_id, elected_at, expires_at) \
             VALUES ('default', $1, now(), now() + make_interval(secs => $2)) \
             ON CONFLICT (name) DO UPDATE SET \
               leader_id = EXCLUDED.leader_id, \
               elected_at = CASE WHEN leader.leader_id = EXCLUDED.leader_id \
                            THEN leader.elected_at ELSE now() END, \
               expires_at = EXCLUDED.expires_at \
             WHERE leader.leader_id = EXCLUDED.leader_id OR leader.expires_at < now() \
             RETURNING leader_id",
            &[&instance_id, &ttl.as_secs_f64()],
        )
        .await?;
    Ok(row.is_some())
}

/// Deletes the row if `instance_id` holds it; whether it did.
pub async fn resign(q: &impl Query, instance_id: &str) -> Result<bool, DbError> {
    let n = q
        .execute(
            "DELETE FROM taskwarden.leader WHERE leader_id = $1",
            &[&instance_id],
        )
        .await?;
    Ok(n > 0)
}
