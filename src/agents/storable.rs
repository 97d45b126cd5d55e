//! The one boundary between what agents emit and what PostgreSQL can store. Everything an
//! attempt hands the orchestrator — its result, its error, each event, each usage report —
//! passes through here once, whatever the agent's kind (command, HTTP, library), so a byte
//! the database refuses can never reach an outcome write and wedge the writer (issue 23).
//!
//! The rules, each unit-tested below:
//! - text: NUL (which `text` and `jsonb` refuse, SQLSTATE 22021 / 22P05) becomes U+FFFD;
//!   invalid UTF-8 never gets this far (readers decode lossily, also to U+FFFD); an error
//!   longer than [`MAX_ERROR_BYTES`] keeps its head and says how much was cut;
//! - JSON: NUL in every string and key becomes U+FFFD; nesting deeper than
//!   [`MAX_JSON_DEPTH`] is refused (PostgreSQL and our own serializer recurse per level);
//!   a result over `workers.max_result_bytes` fails the attempt, an event over
//!   `workers.max_event_bytes` is stored as a marker that says what it was;
//! - usage: token counts and cost are clamped to what their columns hold.

use std::borrow::Cow;

use serde_json::Value;

use crate::store::Usage;

/// Longest error text kept on a task (the head; the rest is counted, not stored).
pub const MAX_ERROR_BYTES: usize = 8 * 1024;
/// Deepest nesting of arrays and objects stored from an agent.
pub const MAX_JSON_DEPTH: usize = 64;
/// Largest cost one usage report adds (the `numeric(20, 8)` column holds less than 10^12).
pub const MAX_COST_USD: f64 = 1e11;
/// Largest token count one usage report adds; the sums saturate in SQL.
pub const MAX_TOKENS: i64 = 1 << 50;

/// What the boundary may let through, from `[workers]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub result_bytes: usize,
    pub event_bytes: usize,
}

impl Limits {
    pub fn of(w: &crate::config::WorkersConfig) -> Limits {
        Limits {
            result_bytes: usize::try_from(w.max_result_bytes).unwrap_or(usize::MAX),
            event_bytes: usize::try_from(w.max_event_bytes).unwrap_or(usize::MAX),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::of(&crate::config::WorkersConfig::default())
    }
}

/// Why a JSON value cannot be stored as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unstorable {
    #[error("nests deeper than {MAX_JSON_DEPTH} levels")]
    TooDeep,
    #[error("is {bytes} bytes, over {key} = {limit}")]
    TooLarge {
        bytes: usize,
        limit: usize,
        key: &'static str,
    },
}

/// `s` without NUL and at most `max` bytes long (cut at a character boundary, with a note
/// of how much was cut).
pub fn text(s: &str, max: usize) -> Cow<'_, str> {
    let clean: Cow<'_, str> = if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    };
    if clean.len() <= max {
        return clean;
    }
    let mut end = max;
    while end > 0 && !clean.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!(
        "{} … ({} bytes cut)",
        &clean[..end],
        clean.len() - end
    ))
}

/// An agent's error message, storable.
pub fn error(s: &str) -> String {
    text(s, MAX_ERROR_BYTES).into_owned()
}

/// Makes `v` storable in place: NUL in strings and keys replaced; refused when it nests
/// deeper than [`MAX_JSON_DEPTH`]. Iterative, so a value of any depth cannot overflow the
/// stack here.
pub fn scrub(v: &mut Value) -> Result<(), Unstorable> {
    let mut stack: Vec<(&mut Value, usize)> = vec![(v, 1)];
    while let Some((v, depth)) = stack.pop() {
        match v {
            Value::String(s) => {
                if s.contains('\0') {
                    *s = s.replace('\0', "\u{FFFD}");
                }
            }
            Value::Array(items) => {
                if depth > MAX_JSON_DEPTH {
                    return Err(Unstorable::TooDeep);
                }
                stack.extend(items.iter_mut().map(|i| (i, depth + 1)));
            }
            Value::Object(map) => {
                if depth > MAX_JSON_DEPTH {
                    return Err(Unstorable::TooDeep);
                }
                if map.keys().any(|k| k.contains('\0')) {
                    let old = std::mem::take(map);
                    for (k, val) in old {
                        map.insert(k.replace('\0', "\u{FFFD}"), val);
                    }
                }
                stack.extend(map.values_mut().map(|i| (i, depth + 1)));
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    Ok(())
}

/// Serialized size of `v` in bytes (only call on a value [`scrub`] accepted: the
/// serializer recurses).
fn json_bytes(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 = self.0.saturating_add(b.len());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Writing to a counter cannot fail.
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// Drops a value without recursing (serde_json's own drop recurses once per level, which
/// a value refused as too deep could overflow).
pub fn drop_flat(v: Value) {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.into_iter().map(|(_, v)| v)),
            _ => {}
        }
    }
}

/// An attempt's result, storable, or why it cannot be (the attempt then fails).
pub fn result(mut v: Value, limits: &Limits) -> Result<Value, Unstorable> {
    if let Err(e) = scrub(&mut v) {
        drop_flat(v);
        return Err(e);
    }
    let bytes = json_bytes(&v);
    if bytes > limits.result_bytes {
        return Err(Unstorable::TooLarge {
            bytes,
            limit: limits.result_bytes,
            key: "workers.max_result_bytes",
        });
    }
    Ok(v)
}

/// An event, storable: its kind cleaned and bounded, its data cleaned, or replaced by a
/// marker saying why it could not be kept (the event itself is never lost silently).
pub fn event(kind: &str, mut data: Value, limits: &Limits) -> (String, Value) {
    let kind = text(kind, 200).into_owned();
    let why = match scrub(&mut data) {
        Err(e) => {
            drop_flat(data);
            e
        }
        Ok(()) => {
            let bytes = json_bytes(&data);
            if bytes <= limits.event_bytes {
                return (kind, data);
            }
            Unstorable::TooLarge {
                bytes,
                limit: limits.event_bytes,
                key: "workers.max_event_bytes",
            }
        }
    };
    let marker = serde_json::json!({ "unstorable": true, "reason": format!("event data {why}") });
    (kind, marker)
}

/// A usage report, within what the task's columns hold. Negative figures are left for
/// the store to refuse (they are an agent's bug, not an overflow).
pub fn usage(u: Usage) -> (Usage, bool) {
    let clamped = Usage {
        prompt_tokens: u.prompt_tokens.min(MAX_TOKENS),
        completion_tokens: u.completion_tokens.min(MAX_TOKENS),
        cost_usd: if u.cost_usd.is_finite() {
            u.cost_usd.min(MAX_COST_USD)
        } else {
            u.cost_usd
        },
    };
    let changed = clamped != u;
    (clamped, changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits(result_bytes: usize, event_bytes: usize) -> Limits {
        Limits {
            result_bytes,
            event_bytes,
        }
    }

    #[test]
    fn text_replaces_nul_and_keeps_the_head_of_long_text() {
        assert_eq!(text("bad\0byte", 100), "bad\u{FFFD}byte");
        assert!(matches!(text("clean", 100), Cow::Borrowed("clean")));
        let long = "é".repeat(100); // 200 bytes, 2 per char
        let cut = text(&long, 11);
        assert!(cut.starts_with(&"é".repeat(5)), "{cut}");
        assert!(cut.ends_with("(190 bytes cut)"), "{cut}");
        assert!(!error(&"x".repeat(100_000)).contains('\0'));
        assert!(error(&"x".repeat(100_000)).len() < MAX_ERROR_BYTES + 40);
    }

    #[test]
    fn scrub_replaces_nul_in_strings_and_keys_at_every_depth() {
        let mut v = json!({"a\u{0}": ["x\u{0}y", {"k": "\u{0}"}], "n": 1, "t": true});
        scrub(&mut v).unwrap();
        assert_eq!(
            v,
            json!({"a\u{FFFD}": ["x\u{FFFD}y", {"k": "\u{FFFD}"}], "n": 1, "t": true})
        );
        assert!(!v.to_string().contains("\\u0000"));
    }

    fn nested(depth: usize) -> Value {
        let mut v = json!(1);
        for _ in 0..depth {
            v = Value::Array(vec![v]);
        }
        v
    }

    #[test]
    fn scrub_refuses_nesting_past_the_bound_without_recursing() {
        assert_eq!(scrub(&mut nested(MAX_JSON_DEPTH)), Ok(()));
        assert_eq!(
            scrub(&mut nested(MAX_JSON_DEPTH + 1)),
            Err(Unstorable::TooDeep)
        );
        // Deep enough to overflow any recursive walk.
        let mut deep = nested(200_000);
        assert_eq!(scrub(&mut deep), Err(Unstorable::TooDeep));
        drop_flat(deep);
        assert_eq!(
            result(nested(200_000), &Limits::default()),
            Err(Unstorable::TooDeep)
        );
    }

    #[test]
    fn a_result_over_its_bound_is_refused_naming_the_key() {
        let l = limits(10, 10);
        assert_eq!(result(json!("ok"), &l), Ok(json!("ok")));
        let e = result(json!("0123456789abc"), &l).unwrap_err();
        assert_eq!(
            e.to_string(),
            "is 15 bytes, over workers.max_result_bytes = 10"
        );
        assert_eq!(result(json!("a\u{0}"), &l), Ok(json!("a\u{FFFD}")));
    }

    #[test]
    fn an_event_over_its_bound_becomes_a_marker_that_says_why() {
        let l = limits(10, 20);
        assert_eq!(
            event("output", json!({"a": 1}), &l),
            ("output".into(), json!({"a": 1}))
        );
        let (kind, data) = event("out\0put", json!({"big": "x".repeat(100)}), &l);
        assert_eq!(kind, "out\u{FFFD}put");
        assert_eq!(data["unstorable"], true);
        assert!(
            data["reason"]
                .as_str()
                .unwrap()
                .contains("over workers.max_event_bytes = 20"),
            "{data}"
        );
        let (_, data) = event("output", nested(100), &l);
        assert!(
            data["reason"].as_str().unwrap().contains("deeper"),
            "{data}"
        );
    }

    #[test]
    fn usage_is_clamped_to_what_the_columns_hold() {
        let (u, changed) = usage(Usage {
            prompt_tokens: i64::MAX,
            completion_tokens: 5,
            cost_usd: 1e30,
        });
        assert!(changed);
        assert_eq!(u.prompt_tokens, MAX_TOKENS);
        assert_eq!(u.completion_tokens, 5);
        assert_eq!(u.cost_usd, MAX_COST_USD);
        let fine = Usage {
            prompt_tokens: 10,
            completion_tokens: 20,
            cost_usd: 0.5,
        };
        assert_eq!(usage(fine), (fine, false));
    }
}
