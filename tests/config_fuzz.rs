//! The config loader against arbitrary files and environment values: it never panics, and a
//! refusal names the key at fault (or says the file cannot be read), so an operator knows what
//! to fix.

use std::collections::HashMap;

use outboxd::config::Config;
use proptest::prelude::*;

/// Every key of config.toml, as section and key.
const KEYS: &[(&str, &str)] = &[
    ("server", "listen"),
    ("server", "admin_listen"),
    ("server", "max_connections"),
    ("server", "max_frame_bytes"),
    ("server", "hello_timeout_ms"),
    ("server", "close_timeout_ms"),
    ("server", "write_queue_frames"),
    ("server", "max_bad_frames"),
    ("server", "max_connections_per_ip"),
    ("server", "require_origin"),
    ("storage", "data_dir"),
    ("storage", "durability"),
    ("storage", "group_commit_max_delay_us"),
    ("storage", "cache_capacity_bytes"),
    ("heartbeat", "interval_ms"),
    ("heartbeat", "timeout_ms"),
    ("delivery", "max_inflight"),
    ("delivery", "ack_timeout_ms"),
    ("limits", "max_payload_bytes"),
    ("limits", "max_outbox_messages"),
    ("limits", "max_outbox_bytes"),
    ("limits", "message_ttl_ms"),
    ("limits", "dedup_window_ms"),
    ("limits", "publish_rate_per_sec"),
    ("limits", "publish_burst"),
    ("limits", "max_subscriptions"),
    ("auth", "mode"),
    ("auth", "leeway_ms"),
];

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        any::<u64>().prop_map(|v| v.to_string()),
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("true".to_string()),
        Just("fsync".to_string()),
        Just("relaxed".to_string()),
        Just("jwt".to_string()),
        Just("127.0.0.1:0".to_string()),
        Just("".to_string()),
        "\\PC{0,20}",
    ]
}

fn load_env(pairs: &[(String, String)]) -> Result<Config, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("missing.toml");
    Config::load(&path, false, pairs.iter().cloned()).map_err(|e| e.to_string())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn any_environment_value_loads_or_is_refused_naming_its_key(
        k in 0..KEYS.len(),
        v in value(),
    ) {
        let (section, key) = KEYS[k];
        let name = format!("OUTBOXD_{}__{}", section.to_uppercase(), key.to_uppercase());
        if let Err(e) = load_env(&[(name, v.clone())]) {
            let dotted = format!("{section}.{key}");
            prop_assert!(
                e.contains(&dotted) || e.contains(key) || e.contains("cannot read config"),
                "{dotted} = {v:?} was refused without naming it: {e}"
            );
        }
    }

    #[test]
    fn any_file_text_loads_or_is_refused_without_a_panic(text in "\\PC{0,300}") {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, &text).unwrap();
        let _ = Config::load(&path, true, HashMap::<String, String>::new());
    }

    #[test]
    fn any_toml_table_of_known_keys_loads_or_names_a_key(
        picks in proptest::collection::vec((0..KEYS.len(), value()), 0..6),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let mut text = String::new();
        let mut sections: HashMap<&str, Vec<String>> = HashMap::new();
        for (k, v) in &picks {
            let (section, key) = KEYS[*k];
            let literal = if v.parse::<i64>().is_ok() || v == "true" {
                v.clone()
            } else {
                format!("{v:?}")
            };
            sections.entry(section).or_default().push(format!("{key} = {literal}"));
        }
        for (section, lines) in &sections {
            text.push_str(&format!("[{section}]\n"));
            let mut seen = std::collections::HashSet::new();
            for l in lines {
                if seen.insert(l.split(' ').next().unwrap_or("").to_string()) {
                    text.push_str(l);
                    text.push('\n');
                }
            }
        }
        std::fs::write(&path, &text).unwrap();
        if let Err(e) = Config::load(&path, true, HashMap::<String, String>::new()) {
            let e = e.to_string();
            prop_assert!(
                e.contains('`') || e.contains("cannot read config") || KEYS.iter().any(|(_, k)| e.contains(k)),
                "refused without naming a key: {e}\n{text}"
            );
        }
    }
}
