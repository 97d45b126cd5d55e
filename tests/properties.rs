//! Bad input, generated: the config parser and the API's JSON inputs never panic, and every
//! rejection is a named config error or a 4xx naming what is wrong.

mod common;

use std::time::Duration;

use common::TestDb;
use common::daemon::Daemon;
use nix::sys::signal::Signal;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{TestCaseError, TestRunner};
use serde_json::Value;
use taskwarden::config::{AgentConfig, Config, ConfigIssue, ParseError};
use taskwarden::store::{NewObjective, NewStep, NewTask, StoreError, validate_objective};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-z_]{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("echo"),
            Just("agent"),
            Just("key"),
            Just("steps"),
            Just("depends_on"),
            Just("payload")
        ]
        .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("agent".to_string()),
                    Just("payload".to_string()),
                    Just("priority".to_string()),
                    Just("session_id".to_string()),
                    Just("max_attempts".to_string()),
                    Just("title".to_string()),
                    Just("steps".to_string()),
                    Just("key".to_string()),
                    Just("depends_on".to_string()),
                    "[a-z]{1,8}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        "-?[0-9]{1,4}(\\.[0-9]{1,3})?".prop_map(|s| s),
        "\"-?[0-9]{0,4}(ms|s|m|h|x)?\"",
        "\"[a-z:/.0-9 ]{0,20}\"",
        Just("[1, 2]".to_string()),
        Just("[\"sh\", \"-c\"]".to_string()),
    ]
}

fn config_text() -> impl Strategy<Value = String> {
    let section = prop_oneof![
        Just("database"),
        Just("supervisor"),
        Just("workers"),
        Just("http"),
        Just("alerts"),
        Just("logging"),
        Just("agents.x"),
        Just("bogus"),
    ];
    let key = prop_oneof![
        Just("pool_size"),
        Just("max_overflow"),
        Just("checkout_timeout"),
        Just("interval"),
        Just("pool_alert_ratio"),
        Just("pool_clear_ratio"),
        Just("concurrency"),
        Just("lease"),
        Just("listen"),
        Just("level"),
        Just("format"),
        Just("kind"),
        Just("command"),
        Just("url"),
        Just("timeout"),
        Just("nonsense"),
    ];
    prop::collection::vec(
        (section, prop::collection::vec((key, toml_value()), 0..5)),
        0..5,
    )
    .prop_map(|secs| {
        let mut out = String::new();
        let mut seen = std::collections::HashSet::new();
        for (sec, kvs) in secs {
            if !seen.insert(sec) {
                continue;
            }
            out.push_str(&format!("[{sec}]\n"));
            let mut keys = std::collections::HashSet::new();
            for (k, v) in kvs {
                if keys.insert(k) {
                    out.push_str(&format!("{k} = {v}\n"));
                }
            }
        }
        out
    })
}

/// Where a refusal's key points in the input: `Some(None)` when the whole dotted key is a
/// key of the input, `Some(Some((section, leaf)))` when it is a key `leaf` missing from a
/// table `section` that is in the input, `None` when it points at nothing in the input.
/// Keys are matched against the input's own (possibly dotted) names, longest first.
fn locate<'a>(table: &toml::Table, key: &'a str) -> Option<Option<(String, &'a str)>> {
    fn walk<'a>(
        table: &toml::Table,
        prefix: &str,
        key: &'a str,
    ) -> Option<Option<(String, &'a str)>> {
        if table.contains_key(key) {
            return Some(None);
        }
        let mut names: Vec<&String> = table.keys().collect();
        names.sort_by_key(|n| std::cmp::Reverse(n.len()));
        for name in names {
            if let Some(rest) = key
                .strip_prefix(name.as_str())
                .and_then(|r| r.strip_prefix('.'))
                && let Some(sub) = table[name].as_table()
            {
                let here = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                return match walk(sub, &here, rest) {
                    Some(found) => Some(found),
                    None if !rest.contains('.') => Some(Some((here, rest))),
                    None => None,
                };
            }
        }
        None
    }
    walk(table, "", key)
}

/// The keys each config section knows, from the defaults (agents: `agents.*`).
fn known_keys() -> std::collections::BTreeMap<String, Vec<String>> {
    let keys_of = |v: Value| -> Vec<String> {
        v.as_object()
            .expect("a section serializes as an object")
            .keys()
            .cloned()
            .collect()
    };
    let mut known = std::collections::BTreeMap::new();
    let defaults = serde_json::to_value(Config::default()).unwrap();
    for (section, v) in defaults.as_object().unwrap() {
        if section != "agents" {
            known.insert(section.clone(), keys_of(v.clone()));
        }
    }
    known.insert(
        "agents.*".into(),
        keys_of(serde_json::to_value(AgentConfig::default()).unwrap()),
    );
    known
}

/// The classification every input must get: accepted (and then valid), refused as not
/// TOML (and the toml crate agrees it is not), or refused with issues each of which
/// names a key of the input, or a known key of a section the input has (a cross-key
/// check: `pool_clear_ratio` refused because of the `pool_alert_ratio` the input set).
fn check_classification(text: &str) -> Result<(), TestCaseError> {
    classify(text, Config::parse(text))
}

fn classify(text: &str, result: Result<Config, ParseError>) -> Result<(), TestCaseError> {
    let parsed = toml::from_str::<toml::Table>(text);
    match result {
        Ok(c) => {
            prop_assert!(parsed.is_ok(), "accepted text that is not TOML: {text:?}");
            let issues = c.validate();
            prop_assert!(
                issues.is_empty(),
                "accepted with issues {issues:?}: {text:?}"
            );
        }
        Err(ParseError::Syntax(m)) => {
            prop_assert!(!m.is_empty());
            prop_assert!(
                parsed.is_err(),
                "refused as not TOML ({m}), but it is TOML: {text:?}"
            );
        }
        Err(ParseError::Invalid(issues)) => {
            let table = match parsed {
                Ok(t) => t,
                Err(e) => {
                    return Err(TestCaseError::fail(format!(
                        "not TOML ({e}) but refused by key: {issues:?}"
                    )));
                }
            };
            prop_assert!(!issues.is_empty(), "refused with no issue: {text:?}");
            let known = known_keys();
            for i in &issues {
                prop_assert!(!i.message.is_empty(), "{i:?}");
                match locate(&table, &i.key) {
                    Some(None) => {}
                    Some(Some((section, leaf))) => {
                        let kind = if section.starts_with("agents.") {
                            "agents.*"
                        } else {
                            section.as_str()
                        };
                        prop_assert!(
                            known.get(kind).is_some_and(|k| k.iter().any(|k| k == leaf)),
                            "issue {i:?} names {leaf:?}, neither in the input's [{section}] \
                             nor a key of that section; input: {text:?}"
                        );
                    }
                    None => {
                        return Err(TestCaseError::fail(format!(
                            "issue {i:?} names no key of the input: {text:?}"
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The fields a JSON object may carry to be read as `T`.
fn fields_of<T: serde::Serialize + Default>() -> Vec<String> {
    serde_json::to_value(T::default())
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[test]
fn the_classification_check_refuses_what_breaks_it() {
    let issue = |key: &str| ConfigIssue {
        key: key.into(),
        message: "bad".into(),
    };
    let text = "[supervisor]\npool_alert_ratio = 0.1\n[agents.x]\nurl = \"u\"\n";
    // What the parser may say about this input.
    for ok in [
        "supervisor.pool_alert_ratio",
        "supervisor.pool_clear_ratio",
        "agents.x",
        "agents.x.url",
        "agents.x.kind",
    ] {
        classify(text, Err(ParseError::Invalid(vec![issue(ok)]))).expect(ok);
    }
    // What it may not: a key of a section the input lacks, an unknown key the input lacks,
    // a key of no section, an empty refusal, a syntax error for valid TOML, an acceptance
    // of text that is not TOML.
    for bad in [
        "database.pool_size",
        "supervisor.colour",
        "agents.y.kind",
        "(file)",
        "",
    ] {
        assert!(
            classify(text, Err(ParseError::Invalid(vec![issue(bad)]))).is_err(),
            "{bad:?} passed"
        );
    }
    assert!(classify(text, Err(ParseError::Invalid(vec![]))).is_err());
    assert!(classify(text, Err(ParseError::Syntax("x".into()))).is_err());
    assert!(classify("[[[", Ok(Config::default())).is_err());
    assert!(classify("[[[", Err(ParseError::Invalid(vec![issue("x")]))).is_err());
}

#[test]
fn generated_configs_reach_every_outcome() {
    // The generator is worth its cases only if it produces all three answers.
    let mut runner = TestRunner::deterministic();
    let strategy = config_text();
    let (mut ok, mut syntax, mut invalid) = (0, 0, 0);
    for _ in 0..512 {
        let text = strategy.new_tree(&mut runner).unwrap().current();
        match Config::parse(&text) {
            Ok(_) => ok += 1,
            Err(ParseError::Syntax(_)) => syntax += 1,
            Err(ParseError::Invalid(_)) => invalid += 1,
        }
    }
    println!("accepted {ok}, not TOML {syntax}, refused by key {invalid}");
    assert!(ok > 0 && syntax > 0 && invalid > 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn any_text_is_accepted_or_refused_by_syntax_or_key(text in "\\PC{0,200}") {
        check_classification(&text)?;
    }

    #[test]
    fn generated_configs_are_accepted_or_refused_by_key(text in config_text()) {
        check_classification(&text)?;
    }

    #[test]
    fn task_and_objective_json_is_read_faithfully_or_refused_by_field(v in json_value()) {
        // A task: read only from an object of known fields, each read as given.
        let task_fields = fields_of::<NewTask>();
        match serde_json::from_value::<NewTask>(v.clone()) {
            Ok(t) => {
                if let Some(obj) = v.as_object() {
                    let back = serde_json::to_value(&t).unwrap();
                    for (k, given) in obj {
                        prop_assert!(task_fields.contains(k), "accepted unknown field {k:?}: {v}");
                        prop_assert_eq!(&back[k], given, "field {} read differently: {}", k, v);
                    }
                }
            }
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
                // Refused by field: an unknown field named in the message, or a known field
                // of the wrong shape at the error's path.
                let named = serde_path_to_error::deserialize::<_, NewTask>(v.clone())
                    .expect_err("serde_path_to_error accepted what serde_json refused");
                let path = named.path().to_string();
                let msg = named.inner().to_string();
                if let Some(obj) = v.as_object() {
                    if let Some(k) = msg
                        .strip_prefix("unknown field `")
                        .and_then(|r| r.split('`').next())
                    {
                        prop_assert!(
                            obj.contains_key(k) && !task_fields.iter().any(|f| f == k),
                            "refused {v} naming {k:?}, which is not an unknown field of it: {msg}"
                        );
                    } else {
                        let top = path.split(['.', '[']).next().unwrap_or("");
                        prop_assert!(
                            obj.contains_key(top) && task_fields.iter().any(|f| f == top),
                            "refused {v} at {path:?}, not at a field it holds: {msg}"
                        );
                    }
                } else {
                    prop_assert!(msg.contains("invalid"), "refused {v} with {msg}");
                }
            }
        }
        // An objective: accepted, or refused naming a field of what was read.
        if let Ok(o) = serde_json::from_value::<NewObjective>(v.clone()) {
            let step_fields: Vec<String> =
                fields_of::<NewStep>().into_iter().chain(task_fields.iter().cloned()).collect();
            match validate_objective(&o, None) {
                Ok(()) => prop_assert!(!o.steps.is_empty()),
                Err(StoreError::Invalid { field, message }) => {
                    prop_assert!(!message.is_empty());
                    if field != "steps" {
                        let (index, leaf) = field
                            .strip_prefix("steps[")
                            .and_then(|r| r.split_once("]."))
                            .unwrap_or_else(|| panic!("field {field:?} is not steps[i].name"));
                        let index: usize = index.parse().unwrap();
                        prop_assert!(index < o.steps.len(), "{field} for {} steps", o.steps.len());
                        prop_assert!(step_fields.iter().any(|f| f == leaf), "{field}: unknown leaf");
                    }
                }
                Err(other) => prop_assert!(false, "an objective refused with {other:?}: {v}"),
            }
        }
    }
}

/// Whether a rejection of `body` blames an input by name: its `field` is a field of the
/// request (a key of the body, a field of a task, objective or step, an item of a bulk, or
/// the body itself), or, for a body that is no object, its error says the body must be
/// one (`the body must be ...`) or is not JSON it can read, or its error quotes an
/// unknown field of the body or a required field it lacks.
fn names_the_field(body: &Value, answer: &Value) -> bool {
    let known: Vec<String> = fields_of::<NewTask>()
        .into_iter()
        .chain(fields_of::<NewObjective>())
        .chain(fields_of::<NewStep>())
        .collect();
    let error = answer["error"].as_str().unwrap_or("");
    if let Some(field) = answer["field"].as_str() {
        let top = field.split(['.', '[']).next().unwrap_or("");
        return !field.is_empty()
            && (field == "body"
                || (body.is_array() && (field == "items" || field.starts_with("items[")))
                || body.as_object().is_some_and(|o| o.contains_key(top))
                || known.iter().any(|k| k == top));
    }
    if !body.is_object() {
        return error.starts_with("the body must be") || error.starts_with("invalid JSON");
    }
    let quoted = |after: &str| {
        error
            .split(after)
            .nth(1)
            .and_then(|r| r.split('`').next())
            .map(str::to_string)
    };
    let obj = body.as_object();
    quoted("unknown field `").is_some_and(|k| obj.is_some_and(|o| o.contains_key(&k)))
        || quoted("missing field `")
            .is_some_and(|k| known.contains(&k) && obj.is_some_and(|o| !o.contains_key(&k)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_generated_bodies_with_4xx_or_success_never_5xx() {
    let t = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[database]\napplication_name = {:?}\n[agents.echo]\nkind = \"command\"\ncommand = [\"true\"]\n[workers]\nshutdown_grace = \"1s\"\n",
        t.application_name
    );
    let url = t.url();
    let mut d = Daemon::start(dir.path(), &config, &[("TASKWARDEN_DATABASE_URL", &url)]);
    let base = format!(
        "http://{}",
        tokio::task::block_in_place(|| d.addr()).expect("ready")
    );
    let http = reqwest::Client::new();
    let mut runner = TestRunner::deterministic();
    let strategy = json_value();
    let mut seen = std::collections::BTreeMap::new();
    for i in 0..300 {
        let body = strategy.new_tree(&mut runner).unwrap().current();
        let path = match i % 3 {
            0 => "/v1/tasks",
            1 => "/v1/objectives",
            _ => "/v1/sessions/fuzz/run",
        };
        let r = http
            .post(format!("{base}{path}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let answer: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("{path} {body} -> {status} with a non-JSON body ({e}): {text:?}")
        });
        assert!(
            status == 201 || (400..500).contains(&status),
            "{path} {body} -> {status} {answer}"
        );
        if status != 201 {
            assert!(
                answer["error"].is_string(),
                "{path} {body} -> {status} without a JSON error: {answer}"
            );
            assert!(
                names_the_field(&body, &answer),
                "{path} {body} -> {status}: the rejection names no field of the body: {answer}"
            );
        }
        *seen.entry(status).or_insert(0) += 1;
    }
    println!("statuses: {seen:?}");
    assert!(seen.keys().any(|s| *s >= 400));
    d.signal(Signal::SIGTERM);
    assert!(tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(120))).success());
}
