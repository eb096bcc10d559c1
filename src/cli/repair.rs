//! `outboxd repair`: checks a store, and with `--accept-loss` makes a damaged one servable
//! again (sled: records that no longer read back removed, outboxes recounted; PostgreSQL: every
//! outbox moved to a new epoch).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::tool_error::{finish, ToolError};
use crate::config::{Backend, Config};
use crate::store::Inspector;

#[derive(Debug, Args)]
pub struct RepairArgs {
    /// Config file [default: ./config.toml, used only if present].
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// The data directory [default: storage.data_dir]. No broker may be running on it.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Make a damaged store servable again, accepting what it lost: records that no longer
    /// read back are removed, every outbox is recounted from what it holds and moved to a new
    /// epoch (its client is told at its next connect), and what can be counted is counted in
    /// `missed`. Take a copy of the directory first if you may want to try recovering more.
    /// Without this flag the store is only checked.
    #[arg(long)]
    accept_loss: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `outboxd repair`.
pub fn repair(args: RepairArgs) -> ExitCode {
    finish(run_repair(args))
}

fn run_repair(args: RepairArgs) -> Result<(), ToolError> {
    let cfg = Config::for_command(args.config.as_deref())?;
    if args.data.is_none() && cfg.storage.backend == Backend::Postgres {
        return repair_postgres(&cfg, args.accept_loss, args.json);
    }
    let dir = args.data.unwrap_or(cfg.storage.data_dir);
    let mut out = std::io::stdout().lock();
    if !args.accept_loss {
        // The same check every open runs, on a private copy.
        Inspector::open_offline(&dir)?;
        if args.json {
            let v = serde_json::json!({ "data": dir.display().to_string(), "damaged": false });
            writeln!(out, "{v}")?;
        } else {
            writeln!(
                out,
                "{}: the store is whole; nothing to repair",
                dir.display()
            )?;
        }
        return Ok(());
    }
    let report = crate::store::integrity::repair_dir(&dir)?;
    if args.json {
        let mut v = serde_json::to_value(&report).unwrap_or_default();
        v["data"] = serde_json::json!(dir.display().to_string());
        writeln!(out, "{v}")?;
    } else if let Some(damage) = &report.damage {
        writeln!(
            out,
            "{}: repaired, accepting the loss.\n  damage found: {damage}\n  {} outboxes moved to a \
             new epoch ({} messages still stored), {} damaged records removed, {} lost messages \
             counted in `missed`.\n  Each client gets `resumed:false` at its next connect.",
            dir.display(),
            report.outboxes,
            report.messages,
            report.removed_records,
            report.counted_missed
        )?;
    } else {
        writeln!(
            out,
            "{}: the store is whole; nothing changed",
            dir.display()
        )?;
    }
    Ok(())
}

/// `outboxd repair` on the PostgreSQL backend: the database is checked by PostgreSQL itself;
/// `--accept-loss` moves every outbox to a new epoch, after a loss the broker cannot see.
fn repair_postgres(cfg: &Config, accept_loss: bool, json: bool) -> Result<(), ToolError> {
    let opts = crate::store::StoreOptions::from_config(cfg);
    let mut out = std::io::stdout().lock();
    if !accept_loss {
        Inspector::open_postgres(&opts)?;
        if json {
            writeln!(
                out,
                "{}",
                serde_json::json!({ "backend": "postgres", "damaged": false })
            )?;
        } else {
            writeln!(
                out,
                "postgres: the database holds an outboxd store; its integrity is PostgreSQL's \
                 (checksums, WAL). After a point-in-time recovery or a failover to a standby \
                 that was not synchronous, run this with --accept-loss"
            )?;
        }
        return Ok(());
    }
    let moved = crate::store::pg::accept_loss(&opts)?;
    if json {
        writeln!(
            out,
            "{}",
            serde_json::json!({ "backend": "postgres", "outboxes": moved })
        )?;
    } else {
        writeln!(
            out,
            "postgres: {moved} outboxes moved to a new epoch, accepting the loss.\n  Each client \
             gets `resumed:false` at its next connect."
        )?;
    }
    Ok(())
}
