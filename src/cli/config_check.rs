//! `outboxd config check`: the configuration `serve` would run with, checked the way `serve`
//! checks it, and every setting's effective value with where it came from (default, the file,
//! an environment variable or a flag). Secrets are only said to be set or empty.
//!
//! The loading is `serve`'s own ([`super::load_settings`]), so the two cannot disagree about
//! which value wins or what is refused; the certificate files are loaded too, as at start.
//! Nothing is bound or opened: a listen address in use or an unusable data directory is
//! found only by `serve`.

use std::path::Path;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

use crate::config::{Config, Origin, Setting, SettingValue};

#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Load the configuration exactly as `serve` would and print every setting.
    ///
    /// Reads ./config.toml (or --config), then OUTBOXD_<SECTION>__<KEY> environment variables,
    /// then the flags, checks the result like `serve` does (the TLS certificate and key files
    /// included), and prints each setting's value and where it came from: default, file,
    /// env VARIABLE or flag --NAME. admin.token, auth.hmac_secret and postgres.url show as
    /// <set> or <empty>. It does not bind addresses or open the data directory.
    ///
    /// Exit status: 0 valid; 2 refused, with the message `serve` would give.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
struct CheckArgs {
    #[command(flatten)]
    settings: super::SettingsArgs,
    /// One JSON object: {"valid", "file": {"path", "read"}, "settings": {KEY: {"value",
    /// "origin", and "variable" or "flag"}}, "rust_log"}.
    #[arg(long)]
    json: bool,
}

/// Runs `outboxd config ...`.
pub fn config(args: ConfigArgs) -> ExitCode {
    match args.command {
        ConfigCommand::Check(args) => check(args),
    }
}

fn check(args: CheckArgs) -> ExitCode {
    let cfg = match super::load_settings(&args.settings) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("outboxd: {e}");
            return ExitCode::from(2);
        }
    };
    // `serve` loads these before it opens the store, and refuses an unusable pair the same way.
    if let Err(e) = crate::net::tls::Tls::load(&cfg.tls) {
        eprintln!(
            "outboxd: {}",
            crate::config::ConfigError::Invalid {
                key: e.key(),
                reason: e.to_string(),
            }
        );
        return ExitCode::from(2);
    }
    let (path, required) = match &args.settings.config {
        Some(p) => (p.as_path(), true),
        None => (Path::new("config.toml"), false),
    };
    let file_read = required || path.exists();
    let rust_log = std::env::var("RUST_LOG").ok();
    let text = if args.json {
        json_report(&cfg, path, file_read, rust_log.as_deref())
    } else {
        table(&cfg, path, file_read, rust_log.as_deref())
    };
    print!("{text}");
    ExitCode::SUCCESS
}

/// The human report: the file, then one aligned row per setting.
fn table(cfg: &Config, path: &Path, file_read: bool, rust_log: Option<&str>) -> String {
    let rows: Vec<[String; 3]> = cfg
        .settings()
        .map(|s| [s.name.to_string(), s.value.to_string(), s.origin.describe()])
        .collect();
    let header = ["SETTING", "VALUE", "FROM"].map(String::from);
    let width = |col: usize| {
        rows.iter()
            .chain(std::iter::once(&header))
            .map(|r| r[col].chars().count())
            .max()
            .unwrap_or(0)
    };
    let (w0, w1) = (width(0), width(1));
    let mut out = format!(
        "config file: {} ({})\n",
        path.display(),
        if file_read {
            "read"
        } else {
            "not found: defaults and environment only"
        }
    );
    for [name, value, from] in std::iter::once(header).chain(rows) {
        out.push_str(&format!("{name:<w0$}  {value:<w1$}  {from}\n"));
    }
    if let Some(filter) = rust_log {
        out.push_str(&format!(
            "note: RUST_LOG is set ({filter:?}) and replaces log.level\n"
        ));
    }
    out.push_str("the configuration is valid\n");
    out
}

/// The JSON report: one object, one line.
fn json_report(cfg: &Config, path: &Path, file_read: bool, rust_log: Option<&str>) -> String {
    let settings: Map<String, Value> = cfg
        .settings()
        .map(|s| (s.name.to_string(), setting_json(&s)))
        .collect();
    let report = json!({
        "valid": true,
        "file": {"path": path.display().to_string(), "read": file_read},
        "settings": settings,
        "rust_log": rust_log,
    });
    format!("{report}\n")
}

fn setting_json(s: &Setting) -> Value {
    let value = match &s.value {
        SettingValue::Whole(n) => json!(n),
        SettingValue::Bool(b) => json!(b),
        SettingValue::Text(t) => json!(t),
        SettingValue::List(items) => json!(items),
        secret @ SettingValue::Secret { .. } => json!(secret.to_string()),
    };
    let mut o = json!({"value": value});
    let (origin, detail) = match &s.origin {
        Origin::Default => ("default", None),
        Origin::File => ("file", None),
        Origin::Env(name) => ("env", Some(("variable", name.to_string()))),
        Origin::Flag(name) => ("flag", Some(("flag", name.to_string()))),
    };
    o["origin"] = json!(origin);
    if let Some((k, v)) = detail {
        o[k] = json!(v);
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(env: &[(&str, &str)]) -> Config {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load(Path::new("/nonexistent/outboxd.toml"), false, env).unwrap()
    }

    #[test]
    fn table_rows_are_aligned_in_columns() {
        let cfg = config(&[("OUTBOXD_SERVER__ALLOWED_ORIGINS", "https://a.example")]);
        let text = table(&cfg, Path::new("config.toml"), false, None);
        let rows: Vec<&str> = text
            .lines()
            .skip(1)
            .take_while(|l| !l.starts_with("the configuration"))
            .collect();
        assert!(rows.len() > 30, "{text}");
        let value_col = rows[0].find("VALUE").unwrap();
        let from_col = rows[0].find("FROM").unwrap();
        for row in &rows {
            assert_eq!(row.as_bytes()[value_col - 1], b' ', "{row}");
            assert_ne!(row.as_bytes()[value_col], b' ', "{row}");
            assert_ne!(row.as_bytes()[from_col], b' ', "{row}");
        }
        assert!(
            text.contains("env OUTBOXD_SERVER__ALLOWED_ORIGINS"),
            "{text}"
        );
    }

    #[test]
    fn json_report_names_origin_and_hides_secrets() {
        let cfg = config(&[
            ("OUTBOXD_ADMIN__TOKEN", "hunter22"),
            ("OUTBOXD_SERVER__MAX_CONNECTIONS", "7"),
        ]);
        let text = json_report(&cfg, Path::new("config.toml"), false, Some("debug"));
        assert!(!text.contains("hunter22"), "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let token = &v["settings"]["admin.token"];
        assert_eq!(token["value"], "<set>");
        assert_eq!(token["origin"], "env");
        assert_eq!(token["variable"], "OUTBOXD_ADMIN__TOKEN");
        assert_eq!(v["settings"]["server.max_connections"]["value"], 7);
        assert_eq!(v["settings"]["server.listen"]["origin"], "default");
        assert_eq!(v["rust_log"], "debug");
        assert_eq!(v["file"]["read"], false);
    }
}
