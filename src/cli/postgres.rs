//! `outboxd migrate` and `outboxd import`: the PostgreSQL store's own commands, which bring its
//! schema up to date and copy a sled data directory into it.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::render::to_json;
use super::tool_error::{finish, ToolError};
use crate::config::{Backend, Config, ConfigError};
use crate::store::Inspector;

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Config file with storage.backend = "postgres" and postgres.url [default:
    /// ./config.toml, used only if present; OUTBOXD_POSTGRES__URL works too].
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Config file with storage.backend = "postgres" and postgres.url [default:
    /// ./config.toml, used only if present; OUTBOXD_POSTGRES__URL works too].
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// The sled data directory (or backup) to copy; no broker may be running on it.
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    /// Print the totals as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `outboxd migrate`.
pub fn migrate(args: MigrateArgs) -> ExitCode {
    finish(run_migrate(args))
}

fn run_migrate(args: MigrateArgs) -> Result<(), ToolError> {
    let cfg = Config::for_command(args.config.as_deref())?;
    if cfg.storage.backend != Backend::Postgres {
        return Err(ToolError::Config(ConfigError::Invalid {
            key: "storage.backend",
            reason: "must be \"postgres\": only the PostgreSQL store has a schema to migrate \
                     (a sled data directory is brought up to date when a broker opens it)"
                .into(),
        }));
    }
    let version = crate::store::pg::migrate(&crate::store::StoreOptions::from_config(&cfg))?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::json!({ "schema_version": version }))?;
    } else {
        writeln!(out, "postgres: the outboxd schema is at version {version}")?;
    }
    Ok(())
}

/// Runs `outboxd import`.
pub fn import(args: ImportArgs) -> ExitCode {
    finish(run_import(args))
}

fn run_import(args: ImportArgs) -> Result<(), ToolError> {
    let cfg = Config::for_command(args.config.as_deref())?;
    if cfg.storage.backend != Backend::Postgres {
        return Err(ToolError::Config(ConfigError::Invalid {
            key: "storage.backend",
            reason: "must be \"postgres\" to import into PostgreSQL (set it in the config or \
                     OUTBOXD_STORAGE__BACKEND=postgres, with postgres.url)"
                .into(),
        }));
    }
    let from = Inspector::open_offline(&args.from)?;
    let opts = crate::store::StoreOptions::from_config(&cfg);
    let mut last = std::time::Instant::now();
    let done = crate::store::pg::import(&opts, &from, &mut |p| {
        if last.elapsed() >= std::time::Duration::from_secs(1) {
            last = std::time::Instant::now();
            eprintln!(
                "outboxd import: {} outboxes, {} messages so far",
                p.outboxes, p.messages
            );
        }
    })?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", to_json(&done))?;
    } else {
        writeln!(
            out,
            "imported {} outboxes, {} messages, {} tombstones, {} subscriptions from {}",
            done.outboxes,
            done.messages,
            done.tombstones,
            done.subscriptions,
            args.from.display()
        )?;
    }
    Ok(())
}
