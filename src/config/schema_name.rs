//! The rules for `database.schema`: which names can be taskwarden's schema (the SQL
//! rewriting that uses it is `db/schema.rs`).

/// The schema named in the SQL as written.
pub const DEFAULT: &str = "taskwarden";

/// The longest schema name: `<schema>/task/<id>` must fit in 63 bytes for any task id.
pub const MAX_LEN: usize = 38;

/// PostgreSQL 15's reserved key words and those reserved but allowed as function or type
/// names (`pg_get_keywords()` categories R and T): neither can stand for a schema in
/// `<schema>.<table>` without quotes.
const RESERVED: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "column",
    "constraint",
    "create",
    "current_catalog",
    "current_date",
    "current_role",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "from",
    "grant",
    "group",
    "having",
    "in",
    "initially",
    "intersect",
    "into",
    "lateral",
    "leading",
    "limit",
    "localtime",
    "localtimestamp",
    "not",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "placing",
    "primary",
    "references",
    "returning",
    "select",
    "session_user",
    "some",
    "symmetric",
    "table",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "when",
    "where",
    "window",
    "with",
    "authorization",
    "binary",
    "collation",
    "concurrently",
    "cross",
    "current_schema",
    "freeze",
    "full",
    "ilike",
    "inner",
    "is",
    "isnull",
    "join",
    "left",
    "like",
    "natural",
    "notnull",
    "outer",
    "overlaps",
    "right",
    "similar",
    "tablesample",
    "verbose",
];

/// Whether `name` can be a schema here: a lower-case SQL identifier that needs no quoting
/// (so it reads the same in every statement, in `psql` and in the grants
/// docs/managed-postgres.md gives), and not one PostgreSQL or the applications sharing the
/// database own.
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
    if name.len() > MAX_LEN {
        return Err(format!(
            "{name:?} is longer than {MAX_LEN} bytes (the names derived from it, such as its agents' session name <schema>/task/<id>, must fit PostgreSQL's 63)"
        ));
    }
    if RESERVED.contains(&name) {
        return Err(format!(
            "{name:?} is a reserved word in PostgreSQL's SQL and cannot name a schema unquoted: choose another name"
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
        assert!(validate(&"a".repeat(MAX_LEN + 1)).is_err());
        for good in [
            "taskwarden",
            "jobs",
            "_tw2",
            "app_queue",
            "time",
            "values",
            "int",
        ] {
            assert!(validate(good).is_ok(), "{good:?}");
        }
    }
}
