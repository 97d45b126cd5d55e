//! What a SIGHUP may change: which keys apply live and which only at restart, and the
//! dotted keys that differ between two configs. The daemon applies the live ones
//! (`daemon::reload`) and reports the others as needing a restart.

use super::Config;

/// Keys that only take effect at start.
pub const RESTART_ONLY: &[&str] = &[
    "database.url",
    "database.data_dir",
    "database.checkout_timeout",
    "database.connect_timeout",
    "database.pre_ping",
    "database.pre_ping_idle",
    "database.application_name",
    "database.statement_timeout",
    "database.idle_in_transaction_timeout",
    "database.query_timeout",
    "database.tcp_keepalive",
    "database.tcp_user_timeout",
    "database.capture_backtraces",
    "database.pooler",
    "database.direct_url",
    "database.embedded_listen_port",
    "http.listen",
    "http.max_body_bytes",
    "logging.format",
];

/// Dotted keys whose values differ between two configs.
pub fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    fn flatten(
        prefix: &str,
        v: &toml::Value,
        out: &mut std::collections::BTreeMap<String, toml::Value>,
    ) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let (mut fa, mut fb) = (Default::default(), Default::default());
    if let (Ok(va), Ok(vb)) = (toml::Value::try_from(a), toml::Value::try_from(b)) {
        flatten("", &va, &mut fa);
        flatten("", &vb, &mut fb);
    }
    let mut keys: Vec<String> = fa.keys().chain(fb.keys()).cloned().collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| fa.get(k) != fb.get(k))
        .collect()
}
