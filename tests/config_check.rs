//! `outboxd config check` against the real binary: it shows the configuration `serve` would run
//! with, each value with where it came from (the file, an environment variable, a flag or the
//! default), never a secret's value, and refuses what `serve` refuses, with the same message and
//! exit status 2.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// `outboxd ARGS` in `dir` with `env` and no `OUTBOXD_` setting or `RUST_LOG` inherited.
fn outboxd(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outboxd"));
    cmd.args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("OUTBOXD_") {
            cmd.env_remove(&k);
        }
    }
    cmd.envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run outboxd");
    // A `serve` that should have refused its configuration would run until killed: end it,
    // and let the exit status (a signal, no code) fail the test instead of hanging it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait for outboxd").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("outboxd's output")
}

/// A config file in `dir` with `body`; the admin API off so no port is needed.
fn config_file(dir: &Path, body: &str) -> String {
    let path = dir.join("outboxd.toml");
    std::fs::write(&path, format!("[server]\nadmin_listen = \"\"\n{body}")).expect("write config");
    path.display().to_string()
}

/// The row of `name` in the table: its value and where it came from.
fn row<'a>(stdout: &'a str, name: &str) -> (&'a str, &'a str) {
    let line = stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row for {name}:\n{stdout}"));
    let rest = line[name.len()..].trim_start();
    let (value, from) = rest
        .split_once("  ")
        .unwrap_or_else(|| panic!("row without columns: {line:?}"));
    (value.trim(), from.trim())
}

#[test]
fn check_shows_each_value_with_its_origin_and_hides_secrets() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_file(dir.path(), "max_connections = 77\n");
    let data = dir.path().join("somewhere");
    let out = outboxd(
        dir.path(),
        &[
            "config",
            "check",
            "--config",
            &config,
            "--data",
            data.to_str().expect("utf-8 path"),
        ],
        &[
            ("OUTBOXD_HEARTBEAT__INTERVAL_MS", "1234"),
            ("OUTBOXD_ADMIN__TOKEN", "tok-do-not-print-42"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_eq!(row(&stdout, "server.max_connections"), ("77", "file"));
    assert_eq!(
        row(&stdout, "heartbeat.interval_ms"),
        ("1234", "env OUTBOXD_HEARTBEAT__INTERVAL_MS")
    );
    assert_eq!(
        row(&stdout, "admin.token"),
        ("<set>", "env OUTBOXD_ADMIN__TOKEN")
    );
    assert_eq!(row(&stdout, "auth.hmac_secret"), ("<empty>", "default"));
    assert_eq!(
        row(&stdout, "storage.data_dir"),
        (
            format!("{:?}", data.display().to_string()).as_str(),
            "flag --data"
        )
    );
    assert_eq!(
        row(&stdout, "server.listen"),
        ("\"127.0.0.1:8080\"", "default")
    );
    assert!(!stdout.contains("tok-do-not-print-42"), "{stdout}");
    assert!(!stderr.contains("tok-do-not-print-42"), "{stderr}");
    // Nothing was created: the check opens no data directory.
    assert!(!data.exists());
}

#[test]
fn check_json_is_one_object_with_every_setting() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_file(
        dir.path(),
        "[postgres]\nurl = \"postgres://u:pw-hidden@db/x\"\n",
    );
    let out = outboxd(
        dir.path(),
        &["config", "check", "--config", &config, "--json"],
        &[("OUTBOXD_LOG__FORMAT", "json")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(!stdout.contains("pw-hidden"), "{stdout}");
    assert_eq!(stdout.trim_end().lines().count(), 1, "{stdout}");
    let v: Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(v["valid"], true);
    assert_eq!(v["file"]["read"], true);
    let s = &v["settings"];
    assert_eq!(s["postgres.url"]["value"], "<set>");
    assert_eq!(s["postgres.url"]["origin"], "file");
    assert_eq!(s["log.format"]["value"], "json");
    assert_eq!(s["log.format"]["variable"], "OUTBOXD_LOG__FORMAT");
    assert_eq!(s["server.max_connections"]["value"], 10_000);
    assert_eq!(s["server.require_origin"]["value"], false);
    assert!(s["server.allowed_origins"]["value"].is_array(), "{s}");
    assert!(s.as_object().is_some_and(|o| o.len() > 40), "{s}");
}

/// What a refusal case is: its name, the flags and the environment that cause it.
type Case = (
    &'static str,
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
);

#[test]
fn an_invalid_configuration_exits_2_with_the_message_serve_gives() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_file(dir.path(), "");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let cases: [Case; 5] = [
        (
            "a value out of range from the environment",
            &[],
            &[("OUTBOXD_SERVER__MAX_CONNECTIONS", "0")],
        ),
        (
            "a rule between two keys",
            &[],
            &[("OUTBOXD_HEARTBEAT__TIMEOUT_MS", "10")],
        ),
        (
            "a misspelt log level",
            &[],
            &[("OUTBOXD_LOG__LEVEL", "inof")],
        ),
        ("an address from a flag", &["--listen", "nowhere"], &[]),
        (
            "an open broker on a public address",
            &["--listen", "0.0.0.0:0"],
            &[],
        ),
    ];
    for (case, flags, env) in cases {
        let mut check = vec!["config", "check", "--config", &config, "--data", data];
        check.extend_from_slice(flags);
        let checked = outboxd(dir.path(), &check, env);
        let mut serve = vec!["serve", "--config", &config, "--data", data];
        serve.extend_from_slice(flags);
        let served = outboxd(dir.path(), &serve, env);
        let checked_err = String::from_utf8_lossy(&checked.stderr);
        let served_err = String::from_utf8_lossy(&served.stderr);
        assert_eq!(checked.status.code(), Some(2), "{case}: {checked_err}");
        assert_eq!(served.status.code(), Some(2), "{case}: {served_err}");
        assert!(
            checked_err.starts_with("outboxd: "),
            "{case}: {checked_err}"
        );
        assert_eq!(checked_err, served_err, "{case}");
        assert!(checked.stdout.is_empty(), "{case}");
    }
}
