//! The Prometheus alerting rules operators install (`dashboards/alerts.yml`, built into the
//! binary), printed by `taskwarden alerts` with their runbook links at the operator's own
//! base URL and the `up{job=...}` rule at their scrape job.
//!
//! The committed file is the source: promtool checks and unit-tests it as it is, and the
//! command only swaps the two things that differ between installations, so what an
//! operator loads is what was tested.

/// The rules as committed.
pub const RULES: &str = include_str!("../dashboards/alerts.yml");

/// Where the committed rules point their `runbook_url`s: docs/runbooks.md as published.
/// A reserved `.example` host, so nobody mistakes it for a working link: an operator sets
/// theirs with `taskwarden alerts --runbook-base URL`.
pub const DEFAULT_RUNBOOK_BASE: &str = "https://taskwarden.example/docs/runbooks.md";

/// The scrape job the committed `TaskwardenInstanceDown` rule watches (docs/operations.md's
/// scrape config names it so).
pub const DEFAULT_JOB: &str = "taskwarden";

/// The rules with each `runbook_url` at `runbook_base` (the URL of the runbooks page; the
/// alert's anchor, `#<alert name in lower case>`, is appended) and `up` filtered by `job`.
pub fn prometheus_rules(runbook_base: &str, job: &str) -> Result<String, String> {
    let base = runbook_base.trim_end_matches('/');
    let scheme_ok = ["https://", "http://"]
        .iter()
        .any(|s| base.strip_prefix(s).is_some_and(|rest| !rest.is_empty()));
    // The base lands inside a double-quoted YAML string and before `#anchor`.
    if !scheme_ok || base.contains(['"', '\\', '#', '{', '}']) || base.contains(char::is_whitespace)
    {
        return Err(format!(
            "--runbook-base {runbook_base:?}: not an absolute http(s) URL without '#', quotes, braces or spaces"
        ));
    }
    // A Prometheus label value inside a double-quoted YAML string inside PromQL.
    if job.is_empty() || job.contains(['"', '\\', '\'']) || job.chars().any(char::is_control) {
        return Err(format!(
            "--job {job:?}: empty, or has quotes, backslashes or control characters"
        ));
    }
    let out = RULES
        .replace(
            &format!("runbook_url: \"{DEFAULT_RUNBOOK_BASE}#"),
            &format!("runbook_url: \"{base}#"),
        )
        .replace(
            &format!("up{{job=\"{DEFAULT_JOB}\"}}"),
            &format!("up{{job=\"{job}\"}}"),
        );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_give_the_committed_file_and_bad_input_is_refused() {
        assert_eq!(
            prometheus_rules(DEFAULT_RUNBOOK_BASE, DEFAULT_JOB).unwrap(),
            RULES
        );
        for bad in [
            "docs/runbooks.md",
            "https://",
            "ftp://wiki/runbooks",
            "https://wiki/run books",
            "https://wiki/runbooks#x",
            "https://wiki/\"runbooks",
            "https://wiki/{{ $labels.instance }}",
        ] {
            assert!(prometheus_rules(bad, DEFAULT_JOB).is_err(), "{bad}");
        }
        for bad in ["", "a\"b", "a\\b", "a\nb"] {
            assert!(
                prometheus_rules(DEFAULT_RUNBOOK_BASE, bad).is_err(),
                "{bad:?}"
            );
        }
        let r = prometheus_rules("https://wiki.example.org/ops/", "tw").unwrap();
        assert!(r.contains("runbook_url: \"https://wiki.example.org/ops#taskwardennoleader\""));
        assert!(r.contains("up{job=\"tw\"}"));
        assert!(!r.contains(DEFAULT_RUNBOOK_BASE));
    }
}
