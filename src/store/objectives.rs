//! Objectives: steps with dependencies, validated as a graph (unique keys, known
//! dependencies, no cycle) before anything is written, then written whole or not at all;
//! a step whose dependency did not succeed is cancelled.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::Store;
use super::StoreError;
use super::invalid;
use super::task::MAX_NAME_LEN;
use super::task::MAX_STEPS;
use super::task::NewTask;
use super::task::TASK_COLUMNS;
use super::task::Task;
use crate::task_state::TaskStatus;
use chrono::DateTime;
use chrono::Utc;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct NewStep {
    /// Unique within the objective.
    #[schema(min_length = 1, max_length = 200)]
    pub key: String,
    /// Keys of other steps that must succeed first (no duplicates, no cycle).
    pub depends_on: Vec<String>,
    #[serde(flatten)]
    pub task: NewTask,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct NewObjective {
    pub title: String,
    /// At most 1,000 steps; at least one unless a `planner` gives them.
    #[schema(max_items = 1000)]
    pub steps: Vec<NewStep>,
    /// A planner agent that returns the steps, instead of `steps`.
    pub planner: Option<String>,
    /// Given to the planner, with the title.
    pub input: serde_json::Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ObjectiveStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl ObjectiveStatus {
    /// Derived from the steps: any failure or timeout fails it; all succeeded succeeds;
    /// otherwise any step started means running; all ended otherwise means cancelled.
    pub fn derive(tasks: &[Task]) -> ObjectiveStatus {
        use TaskStatus as T;
        if tasks
            .iter()
            .any(|t| matches!(t.status, T::Failed | T::TimedOut))
        {
            ObjectiveStatus::Failed
        } else if !tasks.is_empty() && tasks.iter().all(|t| t.status == T::Succeeded) {
            ObjectiveStatus::Succeeded
        } else if tasks.iter().all(|t| t.status.is_terminal()) {
            ObjectiveStatus::Cancelled
        } else if tasks.iter().any(|t| t.status != T::Queued) {
            ObjectiveStatus::Running
        } else {
            ObjectiveStatus::Queued
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Objective {
    pub id: i64,
    pub title: String,
    pub status: ObjectiveStatus,
    pub created_at: DateTime<Utc>,
    pub tasks: Vec<Task>,
}

/// Checks an objective's steps before anything is written: keys unique and non-empty,
/// dependencies known, no cycle, and (if given) every agent known. The first problem found
/// is named by its field.
pub fn validate_objective(
    o: &NewObjective,
    known_agents: Option<&BTreeSet<String>>,
) -> Result<(), StoreError> {
    if o.steps.is_empty() {
        return Err(invalid("steps", "an objective needs at least one step"));
    }
    if o.steps.len() > MAX_STEPS {
        return Err(invalid("steps", format!("at most {MAX_STEPS} steps")));
    }
    let keys = check_steps(&o.steps, known_agents)?;
    check_dependencies(&o.steps, &keys)?;
    check_acyclic(&o.steps)
}

/// Each step on its own: key (1..=MAX_NAME_LEN, unique), task fields, agent. Returns the keys.
fn check_steps<'a>(
    steps: &'a [NewStep],
    known_agents: Option<&BTreeSet<String>>,
) -> Result<HashSet<&'a str>, StoreError> {
    let mut keys = HashSet::new();
    for (i, s) in steps.iter().enumerate() {
        if s.key.is_empty() || s.key.len() > MAX_NAME_LEN {
            return Err(invalid(
                format!("steps[{i}].key"),
                format!("must be 1..={MAX_NAME_LEN} characters"),
            ));
        }
        if !keys.insert(s.key.as_str()) {
            return Err(invalid(
                format!("steps[{i}].key"),
                format!("duplicate step key {:?}", s.key),
            ));
        }
        s.task.validate(&format!("steps[{i}]."))?;
        s.task
            .no_unique_key(&format!("steps[{i}]."), "an objective's step")?;
        if let Some(agents) = known_agents
            && !agents.contains(&s.task.agent)
        {
            return Err(invalid(
                format!("steps[{i}].agent"),
                format!(
                    "unknown agent {:?}; known agents: {}",
                    s.task.agent,
                    agents.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    Ok(keys)
}

/// Every dependency names another step of the objective, once.
fn check_dependencies(steps: &[NewStep], keys: &HashSet<&str>) -> Result<(), StoreError> {
    for (i, s) in steps.iter().enumerate() {
        for d in &s.depends_on {
            if !keys.contains(d.as_str()) {
                return Err(invalid(
                    format!("steps[{i}].depends_on"),
                    format!("unknown step key {d:?}"),
                ));
            }
            if d == &s.key {
                return Err(invalid(
                    format!("steps[{i}].depends_on"),
                    "a step cannot depend on itself",
                ));
            }
        }
        let mut seen = HashSet::new();
        if let Some(d) = s.depends_on.iter().find(|d| !seen.insert(d.as_str())) {
            return Err(invalid(
                format!("steps[{i}].depends_on"),
                format!("duplicate dependency {d:?}"),
            ));
        }
    }
    Ok(())
}

/// No dependency cycle. Kahn's algorithm: whatever cannot be ordered is on a cycle (or
/// waits on one); those keys are named, sorted.
fn check_acyclic(steps: &[NewStep]) -> Result<(), StoreError> {
    let mut indegree: HashMap<&str, usize> = steps
        .iter()
        .map(|s| (s.key.as_str(), s.depends_on.len()))
        .collect();
    let mut ready: Vec<&str> = indegree
        .iter()
        .filter(|(_, d)| **d == 0)
        .map(|(k, _)| *k)
        .collect();
    let mut ordered = 0;
    while let Some(k) = ready.pop() {
        ordered += 1;
        for s in steps.iter().filter(|s| s.depends_on.iter().any(|d| d == k)) {
            if let Some(d) = indegree.get_mut(s.key.as_str()) {
                *d -= 1;
                if *d == 0 {
                    ready.push(s.key.as_str());
                }
            }
        }
    }
    if ordered < steps.len() {
        let mut on_cycle: Vec<&str> = indegree
            .iter()
            .filter(|(_, d)| **d > 0)
            .map(|(k, _)| *k)
            .collect();
        on_cycle.sort_unstable();
        return Err(invalid(
            "steps",
            format!("dependency cycle among steps {on_cycle:?}"),
        ));
    }
    Ok(())
}

impl Store {
    /// Cancels queued tasks whose dependency ended without succeeding, level by level
    /// until none is left; returns the cancelled ids.
    pub async fn cancel_blocked_dependants(&self) -> Result<Vec<i64>, StoreError> {
        let allowed = TaskStatus::allowed_from(TaskStatus::Cancelled);
        let s = self.session("store.cancel_blocked_dependants").await?;
        let mut all = Vec::new();
        for _ in 0..MAX_STEPS {
            let rows = s
                .query(
                    "UPDATE taskwarden.tasks t SET status = 'cancelled', finished_at = now(), updated_at = now(), \
                       error = 'dependency ' || d.step_key || ' ended ' || d.status \
                     FROM taskwarden.tasks d \
                     WHERE t.status = 'queued' AND t.status = ANY($1) AND t.objective_id IS NOT NULL \
                       AND d.objective_id = t.objective_id AND d.step_key = ANY(t.depends_on) \
                       AND d.status IN ('failed', 'cancelled', 'timed_out') \
                     RETURNING t.id",
                    &[&allowed],
                )
                .await?;
            if rows.is_empty() {
                break;
            }
            for r in rows {
                all.push(r.try_get(0)?);
            }
        }
        Ok(all)
    }

    /// Adds planned steps to an objective, all or nothing. They may depend on each other;
    /// their keys must be new in the objective.
    pub async fn add_steps(
        &self,
        objective_id: i64,
        steps: &[NewStep],
        known_agents: Option<&BTreeSet<String>>,
    ) -> Result<Vec<Task>, StoreError> {
        validate_objective(
            &NewObjective {
                steps: steps.to_vec(),
                ..Default::default()
            },
            known_agents,
        )?;
        let mut s = self.session("store.add_steps").await?;
        let tx = s.transaction().await?;
        let existing: Vec<String> = tx
            .query(
                "SELECT step_key FROM taskwarden.tasks WHERE objective_id = $1 AND step_key IS NOT NULL",
                &[&objective_id],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if let Some((i, st)) = steps
            .iter()
            .enumerate()
            .find(|(_, st)| existing.contains(&st.key))
        {
            return Err(invalid(
                format!("steps[{i}].key"),
                format!("step key {:?} already exists in the objective", st.key),
            ));
        }
        let tasks = self.insert_steps(&tx, objective_id, steps).await?;
        tx.commit().await?;
        Ok(tasks)
    }

    /// Inserts an objective's steps inside the caller's transaction.
    async fn insert_steps(
        &self,
        tx: &crate::db::Tx<'_>,
        objective_id: i64,
        steps: &[NewStep],
    ) -> Result<Vec<Task>, StoreError> {
        let mut tasks = Vec::with_capacity(steps.len());
        for step in steps {
            let t = &step.task;
            let row = tx
                .query_one(
                    &format!(
                        "INSERT INTO taskwarden.tasks (objective_id, step_key, depends_on, agent, payload, session_id, \
                         priority, max_attempts, run_after) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, COALESCE($9, now())) RETURNING {TASK_COLUMNS}"
                    ),
                    &[
                        &objective_id,
                        &step.key,
                        &step.depends_on,
                        &t.agent,
                        &t.payload,
                        &t.slot_id,
                        &t.priority,
                        &t.max_attempts.unwrap_or(self.default_max_attempts),
                        &t.run_after,
                    ],
                )
                .await?;
            tasks.push(Task::from_row(&row)?);
        }
        Ok(tasks)
    }

    /// Creates an objective and all its steps in one transaction: all or nothing.
    pub async fn create_objective(
        &self,
        o: &NewObjective,
        known_agents: Option<&BTreeSet<String>>,
    ) -> Result<Objective, StoreError> {
        validate_objective(o, known_agents)?;
        let mut s = self.session("store.create_objective").await?;
        let tx = s.transaction().await?;
        let row = tx
            .query_one(
                "INSERT INTO taskwarden.objectives (title) VALUES ($1) RETURNING id, title, created_at",
                &[&o.title],
            )
            .await?;
        let id: i64 = row.try_get("id")?;
        let tasks = self.insert_steps(&tx, id, &o.steps).await?;
        tx.commit().await?;
        Ok(Objective {
            id,
            title: row.try_get("title")?,
            status: ObjectiveStatus::derive(&tasks),
            created_at: row.try_get("created_at")?,
            tasks,
        })
    }

    pub async fn get_objective(&self, id: i64) -> Result<Objective, StoreError> {
        let s = self.session("store.get_objective").await?;
        let row = s
            .query_opt(
                "SELECT id, title, created_at FROM taskwarden.objectives WHERE id = $1",
                &[&id],
            )
            .await?
            .ok_or(StoreError::ObjectiveNotFound(id))?;
        let rows = s
            .query(
                &format!("SELECT {TASK_COLUMNS} FROM taskwarden.tasks WHERE objective_id = $1 ORDER BY id"),
                &[&id],
            )
            .await?;
        let tasks: Vec<Task> = rows.iter().map(Task::from_row).collect::<Result<_, _>>()?;
        Ok(Objective {
            id,
            title: row.try_get("title")?,
            status: ObjectiveStatus::derive(&tasks),
            created_at: row.try_get("created_at")?,
            tasks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(key: &str, deps: &[&str]) -> NewStep {
        NewStep {
            key: key.into(),
            depends_on: deps.iter().map(|s| s.to_string()).collect(),
            task: NewTask::new("echo", serde_json::json!({})),
        }
    }

    fn field_of(r: Result<(), StoreError>) -> String {
        match r {
            Err(StoreError::Invalid { field, message }) => format!("{field}: {message}"),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn objective_validation_names_the_problem() {
        let ok = NewObjective {
            title: "t".into(),
            steps: vec![step("a", &[]), step("b", &["a"]), step("c", &["a", "b"])],
            ..Default::default()
        };
        validate_objective(&ok, None).unwrap();

        let cyc = NewObjective {
            title: "t".into(),
            steps: vec![
                step("a", &["c"]),
                step("b", &["a"]),
                step("c", &["b"]),
                step("d", &[]),
            ],
            ..Default::default()
        };
        let msg = field_of(validate_objective(&cyc, None));
        assert!(
            msg.contains("cycle") && msg.contains("\"a\"") && !msg.contains("\"d\""),
            "{msg}"
        );

        let unknown = NewObjective {
            title: "t".into(),
            steps: vec![step("a", &["zzz"])],
            ..Default::default()
        };
        assert!(field_of(validate_objective(&unknown, None)).starts_with("steps[0].depends_on"));

        let dup = NewObjective {
            title: "t".into(),
            steps: vec![step("a", &[]), step("a", &[])],
            ..Default::default()
        };
        assert!(field_of(validate_objective(&dup, None)).starts_with("steps[1].key"));

        let agents: BTreeSet<String> = ["other".to_string()].into();
        assert!(field_of(validate_objective(&ok, Some(&agents))).starts_with("steps[0].agent"));
    }

    fn objective(steps: Vec<NewStep>) -> NewObjective {
        NewObjective {
            title: "t".into(),
            steps,
            ..Default::default()
        }
    }

    #[test]
    fn step_count_and_keys_are_bounded() {
        assert_eq!(
            field_of(validate_objective(&objective(vec![]), None)),
            "steps: an objective needs at least one step"
        );
        let many = (0..=MAX_STEPS)
            .map(|i| step(&format!("s{i}"), &[]))
            .collect();
        assert!(field_of(validate_objective(&objective(many), None)).starts_with("steps: at most"));
        let exactly = (0..MAX_STEPS)
            .map(|i| step(&format!("s{i}"), &[]))
            .collect();
        validate_objective(&objective(exactly), None).unwrap();

        let long = "k".repeat(MAX_NAME_LEN + 1);
        let r = validate_objective(&objective(vec![step("a", &[]), step(&long, &[])]), None);
        assert!(field_of(r).starts_with("steps[1].key: must be"));
        let r = validate_objective(&objective(vec![step("", &[])]), None);
        assert!(field_of(r).starts_with("steps[0].key: must be"));
        let longest = "k".repeat(MAX_NAME_LEN);
        validate_objective(&objective(vec![step(&longest, &[])]), None).unwrap();
    }

    #[test]
    fn a_steps_own_fields_are_named_with_its_index() {
        let mut bad = step("b", &[]);
        bad.task.max_attempts = Some(0);
        let r = validate_objective(&objective(vec![step("a", &[]), bad]), None);
        assert!(field_of(r).starts_with("steps[1].max_attempts"));
    }

    #[test]
    fn dependencies_must_name_other_steps_once() {
        let own = objective(vec![step("a", &[]), step("b", &["b"])]);
        assert_eq!(
            field_of(validate_objective(&own, None)),
            "steps[1].depends_on: a step cannot depend on itself"
        );
        let twice = objective(vec![step("a", &[]), step("b", &["a", "a"])]);
        assert_eq!(
            field_of(validate_objective(&twice, None)),
            "steps[1].depends_on: duplicate dependency \"a\""
        );
        // A dependency on a step listed later is fine: order in the list does not matter.
        validate_objective(&objective(vec![step("b", &["a"]), step("a", &[])]), None).unwrap();
    }

    #[test]
    fn cycles_name_the_steps_that_cannot_be_ordered() {
        let diamond = objective(vec![
            step("a", &[]),
            step("b", &["a"]),
            step("c", &["a"]),
            step("d", &["b", "c"]),
        ]);
        validate_objective(&diamond, None).unwrap();

        let two = objective(vec![step("x", &["y"]), step("y", &["x"])]);
        assert_eq!(
            field_of(validate_objective(&two, None)),
            "steps: dependency cycle among steps [\"x\", \"y\"]"
        );
        // A step waiting on a cycle cannot be ordered either, and is named with it.
        let downstream = objective(vec![
            step("root", &[]),
            step("p", &["q", "root"]),
            step("q", &["p"]),
            step("after", &["q"]),
        ]);
        assert_eq!(
            field_of(validate_objective(&downstream, None)),
            "steps: dependency cycle among steps [\"after\", \"p\", \"q\"]"
        );
    }
}

#[cfg(test)]
mod json_tests {
    use super::*;

    #[test]
    fn steps_parse_flat_and_refuse_unknown_fields() {
        let s: NewStep = serde_json::from_str(
            r#"{"key": "a", "agent": "x", "depends_on": ["b"], "payload": {"q": 1}}"#,
        )
        .unwrap();
        assert_eq!((s.key.as_str(), s.task.agent.as_str()), ("a", "x"));
        assert_eq!(s.task.payload, serde_json::json!({"q": 1}));
        let bad = serde_json::from_str::<NewStep>(r#"{"key": "a", "agent": "x", "bogus": 1}"#);
        assert!(bad.is_err(), "{bad:?}");
    }
}
