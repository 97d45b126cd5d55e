//! Bad input, generated: the config parser and the API's JSON inputs never panic, and every
//! rejection is a named config error or a 4xx naming what is wrong.

mod common;

use std::time::Duration;

use common::TestDb;
use common::daemon::Daemon;
use nix::sys::signal::Signal;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::Value;
use taskwarden::config::{Config, ParseError};
use taskwarden::store::{NewObjective, NewTask, validate_objective};

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

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn any_text_parses_or_is_refused_without_panic(text in "\\PC{0,200}") {
        let _ = Config::parse(&text);
    }

    #[test]
    fn generated_configs_are_accepted_or_refused_by_key(text in config_text()) {
        match Config::parse(&text) {
            Ok(c) => prop_assert!(c.validate().is_empty()),
            Err(ParseError::Syntax(m)) => prop_assert!(!m.is_empty()),
            Err(ParseError::Invalid(issues)) => {
                prop_assert!(!issues.is_empty());
                for i in issues {
                    prop_assert!(!i.key.is_empty() && !i.message.is_empty(), "{i:?}");
                    let known = ["database", "supervisor", "workers", "http", "alerts", "logging", "agents", "bogus", "(file)"];
                    prop_assert!(known.iter().any(|s| i.key.starts_with(s)), "{i:?}");
                }
            }
        }
    }

    #[test]
    fn task_and_objective_json_never_panics(v in json_value()) {
        if let Ok(o) = serde_json::from_value::<NewObjective>(v.clone()) {
            let _ = validate_objective(&o, None);
        }
        let _ = serde_json::from_value::<NewTask>(v);
    }
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
        let answer: Value = r.json().await.unwrap_or(Value::Null);
        assert!(
            status == 201 || (400..500).contains(&status),
            "{path} {body} -> {status} {answer}"
        );
        if status != 201 {
            assert!(
                answer["error"].is_string(),
                "{path} {body} -> {status} without a JSON error: {answer}"
            );
        }
        *seen.entry(status).or_insert(0) += 1;
    }
    println!("statuses: {seen:?}");
    assert!(seen.keys().any(|s| *s >= 400));
    d.signal(Signal::SIGTERM);
    assert!(tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(120))).success());
}
