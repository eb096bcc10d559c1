//! Refusals of the configuration against the real binary: a value of the wrong type, out of
//! range, not one of the allowed words, a data directory that cannot be used or a listen
//! address in use stops `outboxd serve` with exit status 2 and a message naming the key, the
//! value given and what is allowed. The same holds for `config.toml`, for the
//! `OUTBOXD_<SECTION>__<KEY>` environment overrides and for the `--listen` and `--data` flags.

mod common;

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Broker, Opts};

/// How long a broker that should refuse its configuration may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// How `outboxd serve` ended: exit status (None: it was still running and got killed) and stderr.
struct Outcome {
    code: Option<i32>,
    stderr: String,
}

impl Outcome {
    /// Asserts exit status 2 and a message holding every one of `needles`.
    fn assert_refused(&self, case: &str, needles: &[&str]) {
        assert_eq!(
            self.code,
            Some(2),
            "{case}: expected exit status 2, stderr: {}",
            self.stderr
        );
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "{case}: the message must contain {n:?}: {}",
                self.stderr
            );
        }
    }
}

/// A config file: the settings a test needs to run side by side with others (API off, a free
/// port, data in `dir`), with `settings` (section, key, TOML literal) added or replacing them.
fn config_file(dir: &Path, settings: &[(&str, &str, &str)]) -> std::path::PathBuf {
    let mut sections: BTreeMap<&str, BTreeMap<&str, String>> = BTreeMap::new();
    let data = format!("{:?}", dir.join("data").display().to_string());
    for (section, key, literal) in [
        ("server", "listen", "\"127.0.0.1:0\"".to_string()),
        ("server", "admin_listen", "\"\"".to_string()),
        ("storage", "data_dir", data),
    ]
    .into_iter()
    .chain(settings.iter().map(|(s, k, l)| (*s, *k, (*l).to_string())))
    {
        sections.entry(section).or_default().insert(key, literal);
    }
    let mut text = String::new();
    for (section, keys) in sections {
        text.push_str(&format!("[{section}]\n"));
        for (key, literal) in keys {
            text.push_str(&format!("{key} = {literal}\n"));
        }
    }
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config.toml");
    path
}

/// Runs `outboxd serve --config FILE ARGS` with `env` until it exits (or kills it after
/// [`EXIT_TIMEOUT`]: a broker that starts on a bad configuration is what these tests catch).
fn serve(dir: &Path, config: &Path, env: &[(&str, &str)], args: &[&str]) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outboxd"));
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("OUTBOXD_") {
            cmd.env_remove(&k);
        }
    }
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().expect("spawn outboxd");
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let code = loop {
        match child.try_wait().expect("wait for outboxd") {
            Some(status) => break status.code(),
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    Outcome { code, stderr }
}

/// A file with `settings` in it, served.
fn serve_file(settings: &[(&str, &str, &str)]) -> Outcome {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_file(dir.path(), settings);
    serve(dir.path(), &config, &[], &[])
}

/// The base file, with one environment override, served.
fn serve_env(name: &str, value: &str) -> Outcome {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_file(dir.path(), &[]);
    serve(dir.path(), &config, &[(name, value)], &[])
}

#[test]
fn fractional_numbers_are_refused_naming_key_value_and_range() {
    // Catches a loader that rounds 1.5 to 2 (and admits two connections) or reads 1e3 as 1000.
    let cases = [
        (
            "server",
            "max_connections",
            "1.5",
            "between 1 and 4294967295",
        ),
        ("server", "hello_timeout_ms", "1e3", "whole number"),
        ("heartbeat", "interval_ms", "200.0", "whole number"),
        (
            "delivery",
            "max_inflight",
            "8.5",
            "between 1 and 4294967295",
        ),
    ];
    for (section, key, literal, allowed) in cases {
        let dotted = format!("{section}.{key}");
        serve_file(&[(section, key, literal)]).assert_refused(
            &format!("file {dotted} = {literal}"),
            &[&dotted, literal, allowed],
        );
        let env = format!("OUTBOXD_{}__{}", section.to_uppercase(), key.to_uppercase());
        serve_env(&env, literal).assert_refused(
            &format!("{env}={literal}"),
            &[&dotted, &env, literal, allowed],
        );
    }
}

#[test]
fn booleans_accept_only_true_and_false() {
    // Catches `require_origin = "yes"`, `1` or `"on"` silently meaning true.
    for literal in ["\"yes\"", "1", "\"on\"", "\"true\""] {
        serve_file(&[("server", "require_origin", literal)]).assert_refused(
            &format!("file require_origin = {literal}"),
            &["server.require_origin", literal, "true or false"],
        );
    }
    for value in ["yes", "1", "on", "TRUE", ""] {
        serve_env("OUTBOXD_SERVER__REQUIRE_ORIGIN", value).assert_refused(
            &format!("OUTBOXD_SERVER__REQUIRE_ORIGIN={value}"),
            &[
                "server.require_origin",
                &format!("{value:?}"),
                "true or false",
            ],
        );
    }
}

#[test]
fn numbers_beyond_a_keys_range_are_refused_naming_the_key() {
    // Catches "number too large to fit in target type" without the key, and a range that is
    // not stated.
    for literal in ["99999999999999999999", "5000000000", "-1", "0"] {
        serve_file(&[("server", "max_connections", literal)]).assert_refused(
            &format!("file max_connections = {literal}"),
            &[
                "server.max_connections",
                literal,
                "between 1 and 4294967295",
            ],
        );
    }
    serve_file(&[("limits", "max_outbox_bytes", "99999999999999999999")]).assert_refused(
        "file max_outbox_bytes",
        &[
            "limits.max_outbox_bytes",
            "99999999999999999999",
            "between 0 and 18446744073709551615",
        ],
    );
    for value in ["99999999999999999999", "-1", "+5", " 5", "0x10", "1_000"] {
        serve_env("OUTBOXD_SERVER__MAX_CONNECTIONS", value).assert_refused(
            &format!("OUTBOXD_SERVER__MAX_CONNECTIONS={value}"),
            &[
                "server.max_connections",
                &format!("{value:?}"),
                "between 1 and 4294967295",
            ],
        );
    }
}

#[test]
fn an_unknown_word_lists_the_allowed_ones() {
    // Catches "enum Durability does not have variant constructor fast", which does not say
    // what would have been right.
    serve_file(&[("storage", "durability", "\"fast\"")]).assert_refused(
        "file durability",
        &["storage.durability", "\"fast\"", "\"fsync\", \"relaxed\""],
    );
    serve_env("OUTBOXD_STORAGE__DURABILITY", "fast").assert_refused(
        "env durability",
        &["storage.durability", "\"fast\"", "\"fsync\", \"relaxed\""],
    );
    serve_file(&[("auth", "mode", "\"JWT\"")]).assert_refused(
        "file auth.mode",
        &["auth.mode", "\"JWT\"", "\"none\", \"jwt\""],
    );
    serve_file(&[("storage", "durability", "1")]).assert_refused(
        "file durability = 1",
        &["storage.durability", "= 1:", "\"fsync\", \"relaxed\""],
    );
}

#[test]
fn a_value_of_the_wrong_type_is_refused_naming_key_and_value() {
    // Catches a number taken as a string (or a string as a list) without a word.
    serve_file(&[("server", "listen", "8080")]).assert_refused(
        "file listen = 8080",
        &["server.listen", "8080", "expected a string"],
    );
    serve_file(&[("server", "allowed_origins", "\"https://a.example\"")]).assert_refused(
        "file allowed_origins = string",
        &[
            "server.allowed_origins",
            "https://a.example",
            "list of strings",
        ],
    );
    serve_file(&[("server", "max_connectons", "5")]).assert_refused(
        "file unknown key",
        &["server.max_connectons", "max_connections"],
    );
    serve_env("OUTBOXD_SERVER__MAX_CONNECTONS", "5").assert_refused(
        "env unknown key",
        &["OUTBOXD_SERVER__MAX_CONNECTONS", "server.max_connectons"],
    );
}

#[test]
fn an_unusable_data_dir_exits_2_naming_storage_data_dir() {
    // Catches exit status 1 and a bare I/O error when the data directory cannot be created.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").expect("write");
    let under_file = file.join("data");
    let shown = under_file.display().to_string();

    let config = config_file(
        dir.path(),
        &[("storage", "data_dir", &format!("{shown:?}"))],
    );
    serve(dir.path(), &config, &[], &[]).assert_refused(
        "file data_dir",
        &["storage.data_dir", &shown, "cannot be used"],
    );

    let config = config_file(dir.path(), &[]);
    serve(
        dir.path(),
        &config,
        &[("OUTBOXD_STORAGE__DATA_DIR", &shown)],
        &[],
    )
    .assert_refused(
        "env data_dir",
        &[
            "storage.data_dir",
            "OUTBOXD_STORAGE__DATA_DIR",
            &shown,
            "cannot be used",
        ],
    );
    serve(dir.path(), &config, &[], &["--data", &shown]).assert_refused(
        "--data",
        &["storage.data_dir", "--data", &shown, "cannot be used"],
    );
}

#[test]
fn a_listen_address_in_use_exits_2_naming_server_listen() {
    // Catches exit status 1 without the key when another process holds the port.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("temp dir");

    let config = config_file(dir.path(), &[("server", "listen", &format!("{addr:?}"))]);
    serve(dir.path(), &config, &[], &[])
        .assert_refused("file listen", &["server.listen", &addr, "in use"]);

    let config = config_file(dir.path(), &[]);
    serve(
        dir.path(),
        &config,
        &[("OUTBOXD_SERVER__LISTEN", &addr)],
        &[],
    )
    .assert_refused(
        "env listen",
        &["server.listen", "OUTBOXD_SERVER__LISTEN", &addr, "in use"],
    );
    serve(dir.path(), &config, &[], &["--listen", &addr])
        .assert_refused("--listen", &["server.listen", "--listen", &addr, "in use"]);
    serve(dir.path(), &config, &[], &["--listen", "nowhere"]).assert_refused(
        "--listen nowhere",
        &["server.listen", "--listen", "\"nowhere\"", "HOST:PORT"],
    );

    // The admin API's address likewise.
    let config = config_file(
        dir.path(),
        &[("server", "admin_listen", &format!("{addr:?}"))],
    );
    serve(dir.path(), &config, &[], &[]).assert_refused(
        "file admin_listen",
        &["server.admin_listen", &addr, "in use"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_numbers_and_booleans_from_the_environment_still_parse() {
    // Catches a strict loader that refuses what the environment can only send as text.
    let broker = Broker::start(
        Opts::new()
            .set("server", "max_connections", 7)
            .set("server", "require_origin", "false")
            .set("delivery", "max_inflight", "0016")
            .set("storage", "durability", "relaxed")
            .set(
                "server",
                "allowed_origins",
                "https://a.example,https://b.example",
            ),
    );
    let (mut bob, _) = broker.client("bob").await;
    bob.send(serde_json::json!({"type": "ping"})).await;
    assert_eq!(bob.recv().await, serde_json::json!({"type": "pong"}));
}
