//! The schema taskwarden's tables, functions and migration history live in
//! (`database.schema`, default `taskwarden`), and the one place SQL learns its name.
//!
//! Every statement in the code names its objects `taskwarden.<object>`: readable, and
//! correct as written for the default. For another schema the guard and the direct
//! connections rewrite that qualifier before a statement is sent, so no statement depends
//! on `search_path` (a transaction pooler may hand each one to a different server
//! session) and two deployments in one database, each with its schema, never meet.

use std::borrow::Cow;
use std::sync::Arc;

pub use crate::config::schema_name::{DEFAULT, MAX_LEN, validate};

/// The qualifier the SQL is written with.
const WRITTEN: &str = "taskwarden.";

/// A validated schema name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schema {
    name: Arc<str>,
    qualifier: Arc<str>,
}

impl Default for Schema {
    fn default() -> Self {
        Schema::new(DEFAULT)
    }
}

impl Schema {
    /// The schema `name`, which [`validate`] has accepted.
    pub fn new(name: &str) -> Self {
        Schema {
            name: Arc::from(name),
            qualifier: Arc::from(format!("{name}.")),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `sql` with its objects in this schema: every `taskwarden.` that begins a name (not
    /// the tail of a longer one, such as an already rewritten `staging_taskwarden.`).
    pub fn sql<'a>(&self, sql: &'a str) -> Cow<'a, str> {
        if &*self.name == DEFAULT || !sql.contains(WRITTEN) {
            return Cow::Borrowed(sql);
        }
        let mut out = String::with_capacity(sql.len() + 16);
        let mut rest = sql;
        while let Some(at) = rest.find(WRITTEN) {
            let (before, after) = rest.split_at(at);
            out.push_str(before);
            let tail_of_name = out
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$' || c == '"');
            out.push_str(if tail_of_name {
                WRITTEN
            } else {
                &self.qualifier
            });
            rest = &after[WRITTEN.len()..];
        }
        out.push_str(rest);
        Cow::Owned(out)
    }

    /// What the `application_name` of every agent session of this deployment starts with
    /// (`<schema>/task/`; the default's is the `taskwarden/task/` of earlier versions), so
    /// two deployments in one database never take each other's sessions for their own.
    pub fn task_sessions_prefix(&self) -> String {
        format!("{}/task/", self.name)
    }

    /// The `application_name` an agent's own sessions carry for `task_id` (`PGAPPNAME`).
    /// At most 38 + 6 + 20 bytes: within PostgreSQL's 63, so it is never cut.
    pub fn task_application_name(&self, task_id: i64) -> String {
        format!("{}{task_id}", self.task_sessions_prefix())
    }

    /// The channel the task table's insert trigger notifies (`<schema>_tasks`; the
    /// default's is the `taskwarden_tasks` of earlier versions).
    pub fn channel(&self) -> String {
        format!("{}_tasks", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_only_for_another_schema() {
        let sql = "SELECT id FROM taskwarden.tasks t JOIN taskwarden.objectives o ON o.id = t.objective_id";
        assert!(matches!(Schema::default().sql(sql), Cow::Borrowed(_)));
        assert_eq!(
            Schema::new("jobs").sql(sql),
            "SELECT id FROM jobs.tasks t JOIN jobs.objectives o ON o.id = t.objective_id"
        );
        assert!(matches!(
            Schema::new("jobs").sql("SELECT 1"),
            Cow::Borrowed(_)
        ));
        assert_eq!(Schema::new("jobs").channel(), "jobs_tasks");
        assert_eq!(Schema::default().channel(), "taskwarden_tasks");
    }
}
