//! A planner agent's reply becomes the objective's next steps.

#[allow(unused_imports)]
use super::*;

impl Orchestrator {
    /// A planner's reply is the objective's next steps: `[...]` or `{"steps": [...]}`.
    /// They are added before the plan step counts as succeeded; a bad plan fails it.
    pub(super) async fn apply_plan(
        &self,
        task: &Task,
        result: &Option<serde_json::Value>,
    ) -> Result<(), AgentError> {
        let Some(objective_id) = task.objective_id else {
            return Ok(());
        };
        let steps = match result {
            Some(serde_json::Value::Array(a)) => serde_json::Value::Array(a.clone()),
            Some(serde_json::Value::Object(o)) if o.contains_key("steps") => o["steps"].clone(),
            _ => {
                return Err(AgentError::fatal(
                    "planner reply: expected a list of steps or {\"steps\": [...]}",
                ));
            }
        };
        let steps: Vec<NewStep> = serde_json::from_value(steps)
            .map_err(|e| AgentError::fatal(format!("planner reply: {e}")))?;
        let known = self.inner.agents.load().names();
        let added = self
            .inner
            .store
            .add_steps(objective_id, &steps, Some(&known))
            .await
            .map_err(|e| match e {
                StoreError::Invalid { .. } => AgentError::fatal(format!("planner reply: {e}")),
                other => AgentError::retryable(format!("planner reply: {other}")),
            })?;
        tracing::info!(
            task_id = task.id,
            objective_id,
            steps = added.len(),
            "planner added steps"
        );
        self.inner.wake.notify_one();
        Ok(())
    }
}
