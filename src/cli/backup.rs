//! `outboxd backup` and `outboxd restore`: a consistent copy of a store, written offline from a
//! data directory or by a running broker (through its admin API), and a new data directory made
//! from such a copy.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use super::render::human_bytes;
use super::source::{Source, SourceArgs};
use super::tool_error::{finish, ToolError};
use crate::store::{Inspector, StoreError};

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// The new directory to write (must not exist or be empty). With --admin it is a path on
    /// the broker's machine.
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup directory (written by `outboxd backup`).
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    /// The data directory to create (must not exist or be empty); then start the broker with
    /// `--data DIR` or storage.data_dir = DIR.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `outboxd backup`.
pub fn backup(args: BackupArgs) -> ExitCode {
    finish(run_backup(args))
}

/// Runs `outboxd restore`.
pub fn restore(args: RestoreArgs) -> ExitCode {
    finish(run_restore(args))
}

fn run_backup(args: BackupArgs) -> Result<(), ToolError> {
    let source = Source::open(&args.source)?;
    let (records, bytes) = match &source {
        Source::Offline(i) => {
            let o = i.backup(&args.to)?;
            (o.records, o.bytes)
        }
        Source::Online(a) => {
            let to = args.to.to_string_lossy().into_owned();
            let v: serde_json::Value = a.post("/v1/backup", &serde_json::json!({ "to": to }))?;
            let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
            (n("records"), n("bytes"))
        }
    };
    report_copy(args.json, &args.to, records, bytes)
}

fn run_restore(args: RestoreArgs) -> Result<(), ToolError> {
    // Say which argument is wrong: the backup read (--from) or the directory written (--data).
    let from = Inspector::open_offline(&args.from).map_err(|e| match e {
        StoreError::Open { path, .. } => StoreError::Open {
            path,
            reason: "no outboxd backup here (no `db` file); check --from".into(),
        },
        other => other,
    })?;
    let o = from.backup(&args.data)?;
    report_copy(args.json, &args.data, o.records, o.bytes)
}

fn report_copy(json: bool, to: &Path, records: u64, bytes: u64) -> Result<(), ToolError> {
    let mut out = std::io::stdout().lock();
    if json {
        let v = serde_json::json!({ "to": to.display().to_string(), "records": records, "bytes": bytes });
        writeln!(out, "{v}")?;
    } else {
        writeln!(
            out,
            "wrote {records} records ({}) to {}",
            human_bytes(bytes),
            to.display()
        )?;
    }
    Ok(())
}
