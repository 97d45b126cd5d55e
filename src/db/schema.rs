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

/// The schema named in the SQL as written.
pub const DEFAULT: &str = "taskwarden";

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

    /// `sql` with its objects in this schema.
    pub fn sql<'a>(&self, sql: &'a str) -> Cow<'a, str> {
        if &*self.name == DEFAULT || !sql.contains(WRITTEN) {
            Cow::Borrowed(sql)
        } else {
            Cow::Owned(sql.replace(WRITTEN, &self.qualifier))
        }
    }

    /// The channel the task table's insert trigger notifies (`<schema>_tasks`; the
    /// default's is the `taskwarden_tasks` of earlier versions).
    pub fn channel(&self) -> String {
        format!("{}_tasks", self.name)
    }
}

/// Whether `name` can be a schema here: a lower-case SQL identifier that needs no quoting
/// (so it reads the same in every statement, in `psql` and in the grants README gives),
/// and not one PostgreSQL or the applications sharing the database own.
pub fn validate(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    if !first_ok
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(format!(
            "{name:?} is not a plain lower-case identifier (a-z, 0-9, _; not starting with a digit)"
        ));
    }
    if name.len() > 50 {
        return Err(format!(
            "{name:?} is longer than 50 bytes (its notification channel, <schema>_tasks, must fit PostgreSQL's 63)"
        ));
    }
    if name == "public" || name == "information_schema" || name.starts_with("pg_") {
        return Err(format!(
            "{name:?} is not taskwarden's to use: name a schema of its own (the default is \"{DEFAULT}\")"
        ));
    }
    Ok(())
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

    #[test]
    fn refuses_names_that_need_quoting_or_are_not_ours() {
        for bad in [
            "",
            "Tasks",
            "1x",
            "a-b",
            "a b",
            "x\"y",
            "public",
            "pg_x",
            "information_schema",
        ] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
        assert!(validate(&"a".repeat(51)).is_err());
        for good in ["taskwarden", "jobs", "_tw2", "app_queue"] {
            assert!(validate(good).is_ok(), "{good:?}");
        }
    }
}
