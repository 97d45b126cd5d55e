//! What a SIGHUP may change: which keys apply live and which only at restart, and the
//! dotted keys that differ between two configs. The daemon applies the live ones
//! (`daemon::reload`) and reports the others as needing a restart.

use std::collections::BTreeMap;

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
    "database.schema",
    "database.statement_timeout",
    "database.idle_in_transaction_timeout",
    "database.query_timeout",
    "database.tcp_keepalive",
    "database.tcp_user_timeout",
    "database.capture_backtraces",
    "database.pooler",
    "database.direct_url",
    "database.embedded_listen_port",
    "database.sslmode",
    "database.sslrootcert",
    "database.sslcert",
    "database.sslkey",
    "http.listen",
    "http.max_body_bytes",
    "logging.format",
];

/// Dotted keys whose values differ between two configs (a key present in one only
/// counts), sorted.
pub fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    let (Ok(va), Ok(vb)) = (toml::Value::try_from(a), toml::Value::try_from(b)) else {
        return Vec::new();
    };
    let (fa, fb) = (dotted(&va), dotted(&vb));
    let mut keys: Vec<String> = fa.keys().chain(fb.keys()).cloned().collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| fa.get(k) != fb.get(k))
        .collect()
}

/// Every leaf of a TOML value under its dotted key.
fn dotted(v: &toml::Value) -> BTreeMap<String, toml::Value> {
    fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, toml::Value>) {
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
    let mut out = BTreeMap::new();
    flatten("", v, &mut out);
    out
}

/// Splits changed keys into those that need a restart and those applied live.
pub fn split_restart_only(changed: &[String]) -> (Vec<&String>, Vec<&String>) {
    changed
        .iter()
        .partition(|k| RESTART_ONLY.contains(&k.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text).unwrap_or_else(|e| panic!("{e:?}\n{text}"))
    }

    #[test]
    fn equal_configs_have_no_changed_keys() {
        assert!(changed_keys(&Config::default(), &parse("")).is_empty());
        // The same value in another spelling is not a change.
        let a = parse("[supervisor]\ninterval = \"5s\"\n");
        let b = parse("[supervisor]\ninterval = \"5000ms\"\n");
        assert!(changed_keys(&a, &b).is_empty());
    }

    #[test]
    fn changed_keys_are_dotted_sorted_and_symmetric() {
        let a = parse("");
        let b = parse(
            "[workers]\nconcurrency = 3\n[database]\npool_size = 7\n[logging]\nlevel = \"debug\"\n",
        );
        let want = ["database.pool_size", "logging.level", "workers.concurrency"];
        assert_eq!(changed_keys(&a, &b), want);
        assert_eq!(changed_keys(&b, &a), want);
    }

    #[test]
    fn an_agent_added_or_removed_shows_as_its_keys() {
        let none = parse("");
        let one = parse("[agents.echo]\nkind = \"command\"\ncommand = [\"cat\"]\n");
        let added = changed_keys(&none, &one);
        assert!(!added.is_empty());
        assert!(
            added.iter().all(|k| k.starts_with("agents.echo.")),
            "{added:?}"
        );
        assert!(
            added.contains(&"agents.echo.command".to_string()),
            "{added:?}"
        );
        assert_eq!(changed_keys(&one, &none), added);
        let other = parse("[agents.echo]\nkind = \"command\"\ncommand = [\"tac\"]\n");
        assert_eq!(changed_keys(&one, &other), ["agents.echo.command"]);
    }

    #[test]
    fn every_restart_only_key_is_a_key_of_the_config() {
        let v = toml::Value::try_from(Config::default()).unwrap_or_else(|e| panic!("{e}"));
        let keys = dotted(&v);
        for k in RESTART_ONLY {
            assert!(keys.contains_key(*k), "{k} is not a config key");
        }
    }

    #[test]
    fn restart_only_keys_are_split_from_live_ones() {
        let changed: Vec<String> = [
            "database.pool_size",
            "http.listen",
            "logging.level",
            "logging.format",
        ]
        .map(String::from)
        .to_vec();
        let (restart, live) = split_restart_only(&changed);
        assert_eq!(restart, ["http.listen", "logging.format"]);
        assert_eq!(live, ["database.pool_size", "logging.level"]);
    }
}
