//! LLM usage reported by agents: validated, then added to the task's counters.

use super::Store;
use super::StoreError;
use super::invalid;
use serde::Deserialize;
use serde::Serialize;

/// Token usage reported by an agent, added to the task's totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct Usage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: f64,
}

impl Store {
    /// Adds reported LLM usage to the task's totals; returns the new totals.
    pub async fn record_usage(&self, id: i64, u: Usage) -> Result<Usage, StoreError> {
        if u.prompt_tokens < 0 {
            return Err(invalid("usage.prompt_tokens", "must not be negative"));
        }
        if u.completion_tokens < 0 {
            return Err(invalid("usage.completion_tokens", "must not be negative"));
        }
        if !u.cost_usd.is_finite() || u.cost_usd < 0.0 {
            return Err(invalid(
                "usage.cost_usd",
                "must be a finite, non-negative number",
            ));
        }
        let s = self.session("store.record_usage").await?;
        let row = s
            .query_opt(
                // Sums saturate at what the columns hold (bigint, numeric(20, 8)): an
                // overflow would refuse the report and, worse, every report after it.
                "UPDATE taskwarden.tasks SET \
                   prompt_tokens = LEAST(prompt_tokens::numeric + $2::bigint, 9223372036854775807)::bigint, \
                   completion_tokens = LEAST(completion_tokens::numeric + $3::bigint, 9223372036854775807)::bigint, \
                   cost_usd = LEAST(cost_usd + $4::float8::numeric, 999999999999.99999999), \
                   updated_at = now() \
                 WHERE id = $1 RETURNING prompt_tokens, completion_tokens, cost_usd::float8",
                &[&id, &u.prompt_tokens, &u.completion_tokens, &u.cost_usd],
            )
            .await?
            .ok_or(StoreError::TaskNotFound(id))?;
        Ok(Usage {
            prompt_tokens: row.try_get(0)?,
            completion_tokens: row.try_get(1)?,
            cost_usd: row.try_get(2)?,
        })
    }
}
