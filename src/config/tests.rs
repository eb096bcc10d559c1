use super::*;

fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml).unwrap();
    Config::load(
        &path,
        true,
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

#[test]
fn defaults_are_valid() {
    let c = load("", &[]).unwrap();
    assert_eq!(c.server.max_connections, 10_000);
    assert_eq!(c.storage.durability, Durability::Fsync);
}

#[test]
fn environment_overrides_with_double_underscore_keys() {
    let c = load(
        "[server]\nmax_connections = 5\n",
        &[
            ("OUTBOXD_SERVER__MAX_CONNECTIONS", "7"),
            ("OUTBOXD_STORAGE__DURABILITY", "relaxed"),
            ("OUTBOXD_FAULT_FSYNC_FAIL_AFTER", "3"),
        ],
    )
    .unwrap();
    assert_eq!(c.server.max_connections, 7);
    assert_eq!(c.storage.durability, Durability::Relaxed);
}

#[test]
fn invalid_values_name_their_key() {
    let e = load("[heartbeat]\ninterval_ms = 100\ntimeout_ms = 50\n", &[]).unwrap_err();
    assert!(e.to_string().contains("heartbeat.timeout_ms"), "{e}");
    let e = load("[limits]\nmax_payload_bytes = 200000\n", &[]).unwrap_err();
    assert!(e.to_string().contains("limits.max_payload_bytes"), "{e}");
    let e = load("", &[("OUTBOXD_SERVER__MAX_CONNECTIONS", "lots")]).unwrap_err();
    assert!(e.to_string().contains("max_connections"), "{e}");
    let e = load("[server]\nlisten = \"nowhere\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("server.listen"), "{e}");
}

#[test]
fn fractions_words_and_out_of_range_numbers_are_not_coerced() {
    for toml in [
        "[server]\nmax_connections = 1.5\n",
        "[server]\nhello_timeout_ms = 1e3\n",
        "[server]\nmax_connections = 2.0\n",
        "[server]\nmax_connections = 99999999999999999999\n",
        "[server]\nrequire_origin = \"yes\"\n",
        "[server]\nrequire_origin = 1\n",
        "[storage]\ndurability = \"Relaxed\"\n",
    ] {
        let e = load(toml, &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Value { .. }), "{toml}: {e}");
    }
    for (var, value) in [
        ("OUTBOXD_SERVER__MAX_CONNECTIONS", "1.5"),
        ("OUTBOXD_SERVER__MAX_CONNECTIONS", "-1"),
        ("OUTBOXD_SERVER__MAX_CONNECTIONS", "4294967296"),
        ("OUTBOXD_SERVER__REQUIRE_ORIGIN", "yes"),
        ("OUTBOXD_SERVER__REQUIRE_ORIGIN", "on"),
        ("OUTBOXD_SERVER__REQUIRE_ORIGIN", "1"),
    ] {
        let e = load("", &[(var, value)]).unwrap_err().to_string();
        assert!(e.contains(var) && e.contains(&format!("{value:?}")), "{e}");
    }
    let c = load(
        "",
        &[
            ("OUTBOXD_SERVER__MAX_CONNECTIONS", "4294967295"),
            ("OUTBOXD_SERVER__REQUIRE_ORIGIN", "true"),
            (
                "OUTBOXD_SERVER__ALLOWED_ORIGINS",
                "https://a.example,http://b.example:8080",
            ),
        ],
    )
    .unwrap();
    assert_eq!(c.server.max_connections, u32::MAX);
    assert!(c.server.require_origin);
    assert_eq!(c.server.allowed_origins.len(), 2);
}

#[test]
fn the_shipped_config_file_loads_with_every_key_known() {
    // A setting added to the config and config.toml but not to KEYS is refused as unknown.
    let c = load(include_str!("../../config.toml"), &[]).unwrap();
    assert_eq!(c.server.close_timeout_ms, 1000);
}

#[test]
fn every_key_in_the_table_is_a_setting_of_the_config() {
    // A name in KEYS that no field has would pass the check and fail in the deserializer
    // without a word about the key.
    for key in KEYS {
        let value = match key.kind {
            Kind::Whole { min, .. } => min.to_string(),
            Kind::Bool { .. } => "false".to_string(),
            Kind::Text { .. } | Kind::TextList { .. } => String::new(),
            Kind::OneOf { words, .. } => words[0].to_string(),
        };
        let var = format!("OUTBOXD_{}", key.name.replacen('.', "__", 1)).to_uppercase();
        if let Err(e) = load("", &[(&var, &value)]) {
            assert!(
                !matches!(e, ConfigError::Load(_) | ConfigError::Unknown { .. }),
                "{var}={value}: {e}"
            );
        }
    }
}

#[test]
fn settings_show_the_value_each_key_was_given() {
    // Guards the getters in the table of keys: a getter that reads another field (or a
    // default) shows a value other than the one this key was set to.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    for (i, key) in KEYS.iter().enumerate() {
        let n = u64::try_from(i).unwrap();
        let (given, shown) = match key.kind {
            Kind::Whole { min, max, .. } => {
                let v = min.saturating_add(7 + n).min(max);
                (v.to_string(), SettingValue::Whole(v))
            }
            Kind::Bool { get } => {
                let v = !get(&Config::default());
                (v.to_string(), SettingValue::Bool(v))
            }
            Kind::Text { .. } => (format!("v{i}"), SettingValue::Text(format!("v{i}"))),
            Kind::OneOf { words, get } => {
                let default = get(&Config::default());
                let w = words.iter().find(|w| **w != default).unwrap();
                (w.to_string(), SettingValue::Text(w.to_string()))
            }
            Kind::TextList { .. } => (
                format!("a{i},b{i}"),
                SettingValue::List(vec![format!("a{i}"), format!("b{i}")]),
            ),
        };
        let shown = if key.secret {
            SettingValue::Secret { set: true }
        } else {
            shown
        };
        let var = format!("OUTBOXD_{}", key.name.replacen('.', "__", 1)).to_uppercase();
        let c = Config::read_layers(&path, false, [(var.clone(), given.clone())]).unwrap();
        let setting = c.settings().find(|s| s.name == key.name).unwrap();
        assert_eq!(setting.value, shown, "{var}={given}");
        assert_eq!(setting.origin, Origin::Env(var.clone()));
        assert!(
            !key.secret || !setting.value.to_string().contains(&given),
            "{var}: a secret is shown"
        );
    }
}

#[test]
fn settings_name_every_origin_and_hide_secrets() {
    let mut c = load(
        "[server]\nmax_connections = 5\n[admin]\ntoken = \"hunter22\"\n",
        &[("OUTBOXD_STORAGE__DURABILITY", "relaxed")],
    )
    .unwrap();
    c.apply_flag(Flag::Data(PathBuf::from("/srv/outboxd")));
    let all: BTreeMap<&str, Setting> = c.settings().map(|s| (s.name, s)).collect();
    assert_eq!(all.len(), KEYS.len());
    let s = &all["server.max_connections"];
    assert_eq!(
        (&s.value, &s.origin),
        (&SettingValue::Whole(5), &Origin::File)
    );
    let s = &all["storage.durability"];
    assert_eq!(s.value.to_string(), "\"relaxed\"");
    assert_eq!(s.origin.describe(), "env OUTBOXD_STORAGE__DURABILITY");
    let s = &all["storage.data_dir"];
    assert_eq!(s.origin.describe(), "flag --data");
    assert_eq!(s.value.to_string(), "\"/srv/outboxd\"");
    assert_eq!(all["server.listen"].origin.describe(), "default");
    assert_eq!(all["admin.token"].value.to_string(), "<set>");
    assert_eq!(all["auth.hmac_secret"].value.to_string(), "<empty>");
    assert_eq!(all["postgres.url"].value.to_string(), "<empty>");
}

#[test]
fn log_level_takes_levels_and_target_pairs_only() {
    for ok in [
        "info",
        "warn,outboxd=debug",
        "off",
        "error, outboxd::store=trace",
    ] {
        let c = load("", &[("OUTBOXD_LOG__LEVEL", ok)]).unwrap();
        assert_eq!(c.log.level, ok);
    }
    for bad in [
        "inof",
        "",
        "outboxd=loud",
        "=debug",
        "info,",
        "outboxd[span]=debug",
    ] {
        let e = load("", &[("OUTBOXD_LOG__LEVEL", bad)]).unwrap_err();
        assert!(
            e.to_string().contains("log.level") && e.to_string().contains("OUTBOXD_LOG__LEVEL"),
            "{bad:?}: {e}"
        );
    }
    let e = load("[log]\nformat = \"xml\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("\"text\", \"json\""), "{e}");
    let c = load("[log]\nformat = \"json\"\n", &[]).unwrap();
    assert_eq!(c.log.format, LogFormat::Json);
}

#[test]
fn a_refusal_names_the_variable_or_flag_that_set_the_value() {
    let e = load("", &[("OUTBOXD_SERVER__LISTEN", "nowhere")]).unwrap_err();
    assert!(
        e.to_string().contains("(from OUTBOXD_SERVER__LISTEN)"),
        "{e}"
    );
    let mut c = load("", &[]).unwrap();
    c.apply_flag(Flag::Listen("nowhere".into()));
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("server.listen = \"nowhere\" (from --listen)"),
        "{e}"
    );
    c.apply_flag(Flag::Data(PathBuf::new()));
    c.apply_flag(Flag::Listen("127.0.0.1:0".into()));
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("storage.data_dir = \"\" (from --data)"), "{e}");
}

#[test]
fn secrets_are_not_repeated_in_refusals() {
    let e = load("[admin]\ntoken = 123456789\n", &[]).unwrap_err();
    assert!(!e.to_string().contains("123456789"), "{e}");
}

#[test]
fn admin_api_beyond_loopback_needs_a_token() {
    let e = load("[server]\nadmin_listen = \"0.0.0.0:9090\"\n", &[]).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("admin.token") && msg.contains("server.admin_listen"),
        "{msg}"
    );
    let c = load(
        "[server]\nadmin_listen = \"0.0.0.0:9090\"\n",
        &[("OUTBOXD_ADMIN__TOKEN", "s3cret")],
    )
    .unwrap();
    assert_eq!(c.admin.token, "s3cret");
    // A token that looks like a number stays the string it was.
    let c = load("", &[("OUTBOXD_ADMIN__TOKEN", "0123")]).unwrap();
    assert_eq!(c.admin.token, "0123");
    let c = load("[server]\nadmin_listen = \"[::1]:0\"\n", &[]).unwrap();
    assert!(c.admin_addr().unwrap().unwrap().ip().is_loopback());
}

#[test]
fn empty_admin_listen_turns_the_admin_api_off() {
    let c = load("[server]\nadmin_listen = \"\"\n", &[]).unwrap();
    assert_eq!(c.admin_addr().unwrap(), None);
    let e = load("[server]\nadmin_listen = \"nowhere\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("server.admin_listen"), "{e}");
}

#[test]
fn the_token_is_not_in_debug_output() {
    let c = load("", &[("OUTBOXD_ADMIN__TOKEN", "s3cret")]).unwrap();
    assert!(!format!("{c:?}").contains("s3cret"));
}

#[test]
fn the_shipped_config_toml_loads_and_holds_the_defaults() {
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"));
    let c = Config::load(path, true, Vec::new()).unwrap();
    let d = Config::default();
    assert_eq!(c.server.admin_listen, d.server.admin_listen);
    assert_eq!(c.admin.token, d.admin.token);
    assert_eq!(c.server.listen, d.server.listen);
}

#[test]
fn tls_certificate_and_key_come_together() {
    let c = load("", &[]).unwrap();
    assert!(!c.tls.enabled());
    let e = load("[tls]\ncert_file = \"cert.pem\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("tls.key_file"), "{e}");
    let e = load("[tls]\nkey_file = \"key.pem\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("tls.cert_file"), "{e}");
    let e = load("[tls]\nadmin = true\n", &[]).unwrap_err();
    assert!(e.to_string().contains("tls.admin"), "{e}");
    let c = load(
        "",
        &[
            ("OUTBOXD_TLS__CERT_FILE", "/etc/outboxd/cert.pem"),
            ("OUTBOXD_TLS__KEY_FILE", "/etc/outboxd/key.pem"),
            ("OUTBOXD_TLS__ADMIN", "true"),
        ],
    )
    .unwrap();
    assert!(c.tls.enabled() && c.tls.admin);
    assert_eq!(c.tls.key_file, Path::new("/etc/outboxd/key.pem"));
}

#[test]
fn unknown_keys_are_refused() {
    let e = load("[server]\nmax_conections = 5\n", &[]).unwrap_err();
    assert!(e.to_string().contains("max_conections"), "{e}");
}

#[test]
fn missing_required_file_is_an_error() {
    let e = Config::load(Path::new("/nonexistent/outboxd.toml"), true, Vec::new()).unwrap_err();
    assert!(matches!(e, ConfigError::Missing(_)));
}
