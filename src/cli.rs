//! The command line: argument parsing, logging set-up, signals, exit codes.
//!
//! `main` only calls [`main`] here; everything a subcommand does lives in the library so the
//! tests drive the same code.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::Config;
use crate::server::{self, Faults, ServeError};

/// outboxd: a WebSocket message broker that never loses a message.
///
/// Every message is written durably to its recipient's outbox before it is sent or confirmed;
/// an ack deletes it; a reconnecting client resumes from its last acked seq and gets exactly
/// the gap.
#[derive(Debug, Parser)]
#[command(name = "outboxd", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker (the default when no command is given).
    ///
    /// Reads ./config.toml (or --config), then OUTBOXD_<SECTION>__<KEY> environment variables,
    /// then the flags below. Prints `outboxd ready: ws://ADDR/ws` on stdout once clients can
    /// connect; logs go to stderr (filter with RUST_LOG, e.g. RUST_LOG=outboxd=debug).
    /// SIGTERM or SIGINT: stop accepting, close clients with 1001, commit what is queued, exit 0.
    Serve(ServeArgs),
    /// Show what is stored: clients, one outbox, topics, totals.
    ///
    /// Offline (--data DIR, or storage.data_dir from the config) it reads a private copy of a
    /// data directory that no broker holds, and never changes it. Online (--admin URL) it asks
    /// a running broker's admin API. Human tables by default; --json for scripts.
    Inspect(crate::inspect::InspectArgs),
    /// Write a consistent copy of the store to a new directory.
    ///
    /// Online (--admin URL) the running broker writes it between two writes (the path is on the
    /// broker's machine); offline (--data DIR) it is copied from a directory no broker holds.
    /// The copy is a data directory: start a broker on it, or use `outboxd restore`.
    Backup(crate::inspect::BackupArgs),
    /// Make a data directory from a backup (offline; the target must be new or empty).
    Restore(crate::inspect::RestoreArgs),
}

#[derive(Debug, Args, Default)]
struct ServeArgs {
    /// Config file [default: ./config.toml, used only if present].
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// WebSocket listen address, overriding server.listen (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Data directory, overriding storage.data_dir.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve(ServeArgs::default()));
    // The broker logs what it does; the tools only warn, their output is on stdout.
    init_logging(if matches!(command, Command::Serve(_)) {
        "info"
    } else {
        "warn"
    });
    match command {
        Command::Serve(args) => serve(args),
        Command::Inspect(args) => crate::inspect::inspect(args),
        Command::Backup(args) => crate::inspect::backup(args),
        Command::Restore(args) => crate::inspect::restore(args),
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn serve(args: ServeArgs) -> ExitCode {
    let (path, required) = match args.config {
        Some(p) => (p, true),
        None => (PathBuf::from("config.toml"), false),
    };
    let mut cfg = match Config::load(&path, required, std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outboxd: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(listen) = args.listen {
        cfg.server.listen = listen;
    }
    if let Some(data) = args.data {
        cfg.storage.data_dir = data;
    }
    if let Err(e) = cfg.validate() {
        eprintln!("outboxd: {e}");
        return ExitCode::from(2);
    }
    let faults = Faults {
        fail_fsync_after: std::env::var("OUTBOXD_FAULT_FSYNC_FAIL_AFTER")
            .ok()
            .and_then(|v| v.parse().ok()),
    };
    if faults.fail_fsync_after.is_some() {
        tracing::warn!("fault injection is on (OUTBOXD_FAULT_FSYNC_FAIL_AFTER): for tests only");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outboxd: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(wait_for_signal(shutdown.clone()));
        let r = server::serve(cfg, faults, shutdown, |addr| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "outboxd ready: ws://{addr}/ws");
            let _ = out.flush();
        })
        .await;
        signals.abort();
        r
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ ServeError::Config(_)) => {
            eprintln!("outboxd: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            error!(error = %e, "outboxd stopped");
            eprintln!("outboxd: {e}");
            ExitCode::from(1)
        }
    }
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            error!("cannot install signal handlers; stop the broker with SIGKILL");
            return;
        }
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = name, "shutdown requested");
    shutdown.cancel();
}
