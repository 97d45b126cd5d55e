//! A planner agent's reply becomes the objective's next steps.

use super::Context;
use crate::agents::AgentError;
use crate::store::NewStep;
use crate::store::StoreError;
use crate::store::Task;

/// A planner's reply is the objective's next steps: `[...]` or `{"steps": [...]}`.
/// They are added before the plan step counts as succeeded; a bad plan fails it.
pub(super) async fn apply_plan(
    ctx: &Context,
    task: &Task,
    result: &Option<serde_json::Value>,
) -> Result<(), AgentError> {
    let Some(objective_id) = task.objective_id else {
        return Ok(());
    };
    let steps = parse_plan(result)?;
    let known = ctx.agents.load().names();
    let added = ctx
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
    ctx.wake.notify_one();
    Ok(())
}

/// The steps in a planner's reply: `[...]` or `{"steps": [...]}`, each a step as in
/// `POST /v1/objectives`. A reply of another shape cannot be retried into a plan: fatal.
pub(super) fn parse_plan(result: &Option<serde_json::Value>) -> Result<Vec<NewStep>, AgentError> {
    let steps = match result {
        Some(serde_json::Value::Array(a)) => serde_json::Value::Array(a.clone()),
        Some(serde_json::Value::Object(o)) if o.contains_key("steps") => o["steps"].clone(),
        _ => {
            return Err(AgentError::fatal(
                "planner reply: expected a list of steps or {\"steps\": [...]}",
            ));
        }
    };
    serde_json::from_value(steps).map_err(|e| AgentError::fatal(format!("planner reply: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys(steps: &[NewStep]) -> Vec<(&str, &str, Vec<&str>)> {
        steps
            .iter()
            .map(|s| {
                let deps = s.depends_on.iter().map(String::as_str).collect();
                (s.key.as_str(), s.task.agent.as_str(), deps)
            })
            .collect()
    }

    #[test]
    fn a_plan_is_a_list_or_an_object_with_steps() {
        let list =
            json!([{"key": "a", "agent": "x"}, {"key": "b", "agent": "y", "depends_on": ["a"]}]);
        let want = vec![("a", "x", vec![]), ("b", "y", vec!["a"])];
        assert_eq!(keys(&parse_plan(&Some(list.clone())).unwrap()), want);
        let wrapped = json!({"steps": list, "note": "ignored"});
        assert_eq!(keys(&parse_plan(&Some(wrapped)).unwrap()), want);
        assert!(parse_plan(&Some(json!([]))).unwrap().is_empty());
    }

    #[test]
    fn other_replies_fail_the_plan_step_for_good() {
        for reply in [
            None,
            Some(json!("a, b")),
            Some(json!({"plan": []})),
            Some(json!({"steps": "a"})),
            Some(json!([{"key": "b", "agent": "x", "bogus": 1}])),
            Some(json!([{"key": "a", "agent": 7}])),
        ] {
            match parse_plan(&reply) {
                Err(e) => {
                    assert!(!e.retryable, "{reply:?}: {e:?}");
                    assert!(e.message.starts_with("planner reply: "), "{reply:?}: {e:?}");
                }
                Ok(steps) => panic!("{reply:?} parsed as {steps:?}"),
            }
        }
    }
}
