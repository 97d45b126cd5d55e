//! Taking work in: submitting tasks, creating objectives (with a planner step when asked),
//! and cancelling. Everything here answers an API call.

use super::Orchestrator;
use super::OrchestratorError;
use super::PLAN_STEP;
use super::invalid;
use crate::store::Enqueued;
use crate::store::NewObjective;
use crate::store::NewStep;
use crate::store::NewTask;
use crate::store::Objective;
use crate::store::Task;
use crate::store::TaskStatus;
use crate::store::TransitionArgs;

impl Orchestrator {
    /// Queues a task (agent must be known). Workers anywhere may run it.
    pub async fn submit(&self, t: &NewTask) -> Result<Task, OrchestratorError> {
        Ok(self.enqueue(t).await?.task)
    }

    /// Queues a task (agent must be known), or answers the task holding its unique key.
    pub async fn enqueue(&self, t: &NewTask) -> Result<Enqueued, OrchestratorError> {
        if self.inner.ctx.agents.load().get(&t.agent).is_none() {
            return Err(self.unknown_agent(&t.agent));
        }
        let e = self.inner.ctx.store.enqueue(t).await?;
        if e.duplicate {
            tracing::debug!(task_id = e.task.id, unique_key = ?e.task.unique_key, "duplicate submit answered with the key's holder");
        } else {
            self.inner.ctx.wake.notify_one();
        }
        Ok(e)
    }

    /// Queues a bulk of tasks in one statement, all or none; every agent must be known
    /// (a bad item is named by its index, `items[3].agent`).
    pub async fn enqueue_many(
        &self,
        items: &[NewTask],
    ) -> Result<Vec<Enqueued>, OrchestratorError> {
        let agents = self.inner.ctx.agents.load();
        if let Some((i, t)) = items
            .iter()
            .enumerate()
            .find(|(_, t)| agents.get(&t.agent).is_none())
        {
            return Err(invalid(
                &format!("items[{i}].agent"),
                format!(
                    "unknown agent {:?}; {}",
                    t.agent,
                    super::known_agents(&agents.names().into_iter().collect::<Vec<_>>())
                ),
            ));
        }
        let out = self.inner.ctx.store.enqueue_many(items).await?;
        let created = out.iter().filter(|e| !e.duplicate).count();
        tracing::info!(
            items = out.len(),
            created,
            duplicates = out.len() - created,
            "bulk submit"
        );
        if created > 0 {
            self.inner.ctx.wake.notify_one();
        }
        Ok(out)
    }

    /// Creates an objective whose steps all name known agents.
    pub async fn create_objective(&self, o: &NewObjective) -> Result<Objective, OrchestratorError> {
        let agents = self.inner.ctx.agents.load_full();
        let known = agents.names();
        let planned;
        let o = match &o.planner {
            None => o,
            Some(p) => {
                if !o.steps.is_empty() {
                    return Err(invalid("steps", "give steps or a planner, not both"));
                }
                if !agents.get(p).is_some_and(|e| e.planner) {
                    return Err(invalid(
                        "planner",
                        format!("{p:?} is not an agent with planner = true"),
                    ));
                }
                planned = NewObjective {
                    title: o.title.clone(),
                    steps: vec![NewStep {
                        key: PLAN_STEP.into(),
                        depends_on: vec![],
                        task: NewTask::new(
                            p.clone(),
                            serde_json::json!({ "title": o.title, "input": o.input }),
                        ),
                    }],
                    ..Default::default()
                };
                &planned
            }
        };
        let obj = self
            .inner
            .ctx
            .store
            .create_objective(o, Some(&known))
            .await?;
        self.inner.ctx.wake.notify_one();
        Ok(obj)
    }

    /// Cancels a queued or running task, wherever it runs (another instance notices at
    /// its lease keeper's next pass).
    pub async fn cancel(&self, id: i64, reason: &str) -> Result<Task, OrchestratorError> {
        let t = self
            .inner
            .ctx
            .store
            .transition(
                id,
                TaskStatus::Cancelled,
                &TransitionArgs {
                    error: Some(reason.to_string()),
                    ..Default::default()
                },
            )
            .await?;
        self.inner.ctx.running.cancel(id);
        super::outcome_writer::cancel_blocked_dependants(&self.inner.ctx.store).await;
        Ok(t)
    }
}
