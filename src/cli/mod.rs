//! The command line: argument parsing, logging set-up, signals, exit codes.
//!
//! `main` only calls [`main`] here; everything a subcommand does lives in the library so the
//! tests drive the same code.

mod admin_client;
mod backup;
mod client;
mod config_check;
mod inspect;
mod manual;
mod postgres;
mod pubsub;
mod render;
mod repair;
mod source;
mod tool_error;

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory as _, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::{Config, Flag, LogFormat};
use crate::faults::Faults;
use crate::net::{self, ServeError};

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
    /// then the flags below. Prints `outboxd ready: ws://ADDR/ws` (`wss://` with TLS) on stdout
    /// once clients can connect; logs go to stderr, as text or JSON lines ([log] format), at
    /// [log] level (RUST_LOG, e.g. RUST_LOG=outboxd=debug, replaces it).
    /// SIGTERM or SIGINT: stop accepting, close clients with 1001, commit what is queued, exit 0.
    /// SIGHUP: reload the TLS certificate and key (new connections get them).
    Serve(ServeArgs),
    /// Show what is stored: clients, one outbox, topics, totals.
    ///
    /// Offline (--data DIR, or storage.data_dir from the config) it reads a private copy of a
    /// data directory that no broker holds, and never changes it. With storage.backend =
    /// "postgres" (and no --data) it reads the database of postgres.url, brokers running or
    /// not. Online (--admin URL) it asks a running broker's admin API. Human tables by
    /// default; --json for scripts.
    Inspect(crate::cli::inspect::InspectArgs),
    /// Write a consistent copy of the store to a new directory.
    ///
    /// Online (--admin URL) the running broker writes it between two writes (the path is on the
    /// broker's machine); offline (--data DIR) it is copied from a directory no broker holds.
    /// The copy is a data directory: start a broker on it, or use `outboxd restore`.
    /// sled only: a PostgreSQL store is backed up with PostgreSQL's own tools (pg_dump, or base
    /// backups and a WAL archive); see docs/scale-out.md.
    Backup(crate::cli::backup::BackupArgs),
    /// Make a data directory from a backup (offline; the target must be new or empty).
    ///
    /// sled only: a PostgreSQL store is restored with PostgreSQL's own tools; brokers that
    /// start on a copy restored into another cluster give every outbox a new epoch.
    Restore(crate::cli::backup::RestoreArgs),
    /// Copy a sled data directory into an empty PostgreSQL database (moving to scale-out).
    ///
    /// Reads a data directory no broker holds (or a backup of one) and writes every outbox,
    /// with its epoch, seqs, acked position, stored messages, tombstones and subscriptions, into
    /// the database of postgres.url, in one transaction: clients resume on brokers running on
    /// PostgreSQL as if nothing happened. Idempotency keys are not copied. The database must
    /// hold no outboxes. Progress on stderr; the totals on stdout. See docs/scale-out.md.
    Import(crate::cli::postgres::ImportArgs),
    /// Create or migrate the outboxd schema in the PostgreSQL database of postgres.url.
    ///
    /// Every broker does it at start (under a lock, so brokers starting together migrate
    /// once); run it first where the brokers' database role may not create tables, with a
    /// role that may. A database made by a newer outboxd is refused.
    Migrate(crate::cli::postgres::MigrateArgs),
    /// Change one client through a running broker: delete it, purge its outbox, or end one of
    /// its subscriptions.
    ///
    /// Uses the admin API (--admin URL, default http://<server.admin_listen>, with admin.token
    /// from the config or --token). delete and purge ask for confirmation on a terminal; pass
    /// --yes in scripts.
    Client(crate::cli::client::ClientArgs),
    /// Check a data directory no broker holds, and with --accept-loss repair a damaged one.
    ///
    /// Every start checks the store: that sled recovered every confirmed commit (the seal),
    /// and that every record reads back. A damaged store is not served (exit status 4). Then
    /// either restore the last backup, or run this with --accept-loss: every outbox moves to a
    /// new epoch, so each client learns at its next connect that its position no longer holds.
    /// With storage.backend = "postgres", --accept-loss moves every outbox to a new epoch: run
    /// it after a point-in-time recovery or a failover to a standby that was not synchronous.
    /// Exit status: 0 whole or repaired, 4 damaged (and not repaired), 1 other errors.
    Repair(crate::cli::repair::RepairArgs),
    /// Mint a JWT for a client from the configured auth.hmac_secret (for development).
    ///
    /// Prints the token on stdout. Production tokens should come from your own identity
    /// service, signed with the private key whose public half is auth.public_key_file.
    Token(TokenArgs),
    /// Publish messages; exit 0 only when the broker confirmed every one.
    ///
    /// Confirmed means durable in every recipient's outbox. Retries across reconnects with
    /// the same idempotency key, so a message is written once. PAYLOAD that parses as JSON is
    /// sent as that JSON value, any other text as a string; `-` reads stdin, one message per
    /// line. See docs/clients.md.
    Pub(crate::cli::pubsub::PubArgs),
    /// Print the messages of a client's outbox as they arrive, acking each after printing.
    ///
    /// Resumes across disconnects and broker restarts, and across runs (the position is kept
    /// in a file), printing every message once and in order. See docs/clients.md.
    Sub(crate::cli::pubsub::SubArgs),
    /// Check the configuration and show where each setting comes from.
    Config(crate::cli::config_check::ConfigArgs),
    /// Print a shell completion script on stdout.
    ///
    /// For example: `outboxd completions bash > /etc/bash_completion.d/outboxd`, or
    /// `outboxd completions zsh > "${fpath[1]}/_outboxd"`, or
    /// `outboxd completions fish > ~/.config/fish/completions/outboxd.fish`.
    Completions(crate::cli::manual::CompletionsArgs),
    /// Print the man page on stdout, or write a page per command into a directory.
    ///
    /// `outboxd man | man -l -` reads it; `outboxd man --dir /usr/local/share/man/man1` installs
    /// outboxd.1 and a page per command (outboxd-serve.1, ...).
    Man(crate::cli::manual::ManArgs),
}

#[derive(Debug, Args, Default)]
struct ServeArgs {
    #[command(flatten)]
    settings: SettingsArgs,
}

/// Where `serve` takes its configuration from; `config check` takes the same flags.
#[derive(Debug, Args, Default)]
struct SettingsArgs {
    /// Config file [default: ./config.toml, used only if present].
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// WebSocket listen address, overriding server.listen (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Data directory, overriding storage.data_dir.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Allow auth.mode = "none" on an address beyond loopback, where anyone can claim any
    /// client id and read its outbox. A warning is logged at every start.
    #[arg(long)]
    insecure: bool,
}

#[derive(Debug, Args)]
struct TokenArgs {
    /// The client id (the token's `sub`).
    #[arg(long, value_name = "ID")]
    client: String,
    /// Lifetime: a number with s, m, h or d (e.g. 90s, 15m, 1h, 7d).
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    ttl: String,
    /// Allow publishing only to these targets (client:ID, topic:NAME; a trailing * is a
    /// prefix). Repeat for more; without it, every target is allowed.
    #[arg(long = "pub", value_name = "PATTERN")]
    publish: Vec<String>,
    /// Allow subscribing only to these topics (a trailing * is a prefix). Repeat for more;
    /// without it, every topic is allowed.
    #[arg(long = "sub", value_name = "PATTERN")]
    subscribe: Vec<String>,
    /// Config file [default: ./config.toml, used only if present].
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
}

/// `90s`, `15m`, `1h`, `7d` as seconds.
fn parse_ttl(s: &str) -> Option<u64> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = n.parse().ok()?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(mult).filter(|&v| v > 0)
}

fn token(args: TokenArgs) -> ExitCode {
    let cfg = match Config::for_command(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outboxd: {e}");
            return ExitCode::from(2);
        }
    };
    if cfg.auth.hmac_secret.is_empty() {
        eprintln!(
            "outboxd: `outboxd token` signs with auth.hmac_secret (HS256), which is not set; \
             with auth.public_key_file, sign tokens with the matching private key instead"
        );
        return ExitCode::from(2);
    }
    if cfg.auth.hmac_secret.len() < 32 {
        eprintln!(
            "outboxd: auth.hmac_secret is {} bytes; `outboxd serve` refuses a secret under 32 \
             bytes, so a token signed with it would never be accepted. Set a longer one, e.g. \
             `openssl rand -base64 48`",
            cfg.auth.hmac_secret.len()
        );
        return ExitCode::from(2);
    }
    if crate::model::ClientId::new(&args.client).is_err() {
        eprintln!("outboxd: {:?} is not a valid client id", args.client);
        return ExitCode::from(2);
    }
    let Some(ttl) = parse_ttl(&args.ttl) else {
        eprintln!(
            "outboxd: --ttl {:?}: write a number with s, m, h or d, e.g. 1h",
            args.ttl
        );
        return ExitCode::from(2);
    };
    let now = crate::model::now_ms() / 1000;
    let claims = crate::auth::Claims {
        sub: args.client,
        exp: now + ttl,
        nbf: None,
        publish: (!args.publish.is_empty()).then_some(args.publish),
        subscribe: (!args.subscribe.is_empty()).then_some(args.subscribe),
    };
    match crate::auth::mint_hs256(&cfg.auth.hmac_secret, &claims) {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outboxd: cannot sign the token: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let args = crate::cli::inspect::bare_admin_before_subcommand(
        std::env::args_os().collect(),
        &Cli::command(),
    );
    let cli = Cli::parse_from(args);
    let command = cli.command.unwrap_or(Command::Serve(ServeArgs::default()));
    // The broker logs what it does, as its configuration says (set up once that is read); the
    // tools only warn, as text: their output is on stdout.
    if !matches!(command, Command::Serve(_)) {
        init_logging("warn", LogFormat::Text);
    }
    match command {
        Command::Serve(args) => serve(args),
        Command::Inspect(args) => crate::cli::inspect::inspect(args),
        Command::Backup(args) => crate::cli::backup::backup(args),
        Command::Restore(args) => crate::cli::backup::restore(args),
        Command::Repair(args) => crate::cli::repair::repair(args),
        Command::Import(args) => crate::cli::postgres::import(args),
        Command::Migrate(args) => crate::cli::postgres::migrate(args),
        Command::Client(args) => crate::cli::client::client(args),
        Command::Token(args) => token(args),
        Command::Pub(args) => crate::cli::pubsub::publish(args),
        Command::Sub(args) => crate::cli::pubsub::subscribe(args),
        Command::Config(args) => crate::cli::config_check::config(args),
        Command::Completions(args) => crate::cli::manual::completions(args, Cli::command()),
        Command::Man(args) => crate::cli::manual::man(args, Cli::command()),
    }
}

/// Installs the log subscriber: stderr, events at `default` or as `RUST_LOG` says, each as a
/// text line or a JSON object.
fn init_logging(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // rustls is built with its `log` feature (ureq, the admin client, asks for it), and logs
    // every alert and protocol error a peer causes at warn and error. The broker reports a
    // peer's failed handshake itself, at debug: a peer must not be able to fill the log. So
    // rustls speaks only when RUST_LOG names it.
    let names_rustls = std::env::var("RUST_LOG").is_ok_and(|s| s.contains("rustls"));
    let filter = match "rustls=off".parse() {
        Ok(quiet) if !names_rustls => filter.add_directive(quiet),
        _ => filter,
    };
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).init(),
        // One object per line, the event's fields kept as fields.
        LogFormat::Json => fmt.json().with_ansi(false).init(),
    }
}

/// Why the configuration `serve` would run with is refused: the message `serve` prints
/// (exit status 2).
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(
        "server.listen ({listen}) is not a loopback address and auth.mode = \"none\": \
         anyone could claim any client id and read its outbox. Configure [auth] \
         (mode = \"jwt\"), listen on 127.0.0.1 behind a proxy that authenticates, or \
         pass --insecure to accept the risk"
    )]
    OpenToAll { listen: String },
}

/// The configuration `serve` runs with: the file, then the environment, then the flags, then
/// the checks between keys and the refusal of an open broker on a public address. Reads only
/// the config file; addresses, the data directory and TLS files are checked by their users.
fn load_settings(args: &SettingsArgs) -> Result<Config, Refused> {
    let mut cfg = Config::for_command(args.config.as_deref())?;
    if let Some(listen) = &args.listen {
        cfg.apply_flag(Flag::Listen(listen.clone()));
    }
    if let Some(data) = &args.data {
        cfg.apply_flag(Flag::Data(data.clone()));
    }
    cfg.validate()?;
    if open_to_all(&cfg) && !args.insecure {
        return Err(Refused::OpenToAll {
            listen: cfg.server.listen.clone(),
        });
    }
    Ok(cfg)
}

/// `auth.mode = "none"` on an address beyond loopback: anyone can claim any client id.
fn open_to_all(cfg: &Config) -> bool {
    cfg.auth.mode == crate::auth::AuthMode::None
        && cfg.listen_addr().is_ok_and(|a| !a.ip().is_loopback())
}

fn serve(args: ServeArgs) -> ExitCode {
    let cfg = match load_settings(&args.settings) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outboxd: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&cfg.log.filter(), cfg.log.format);
    // With JSON logs every line on stderr is a JSON object: a fatal error is logged, not
    // printed as well.
    let json_log = cfg.log.format == LogFormat::Json;
    let fatal = |e: &dyn std::fmt::Display| {
        if !json_log {
            eprintln!("outboxd: {e}");
        }
    };
    if open_to_all(&cfg) {
        tracing::warn!(listen = %cfg.server.listen,
            "INSECURE: auth.mode = \"none\" on an address beyond loopback (--insecure): any client can claim any client id");
    }
    let faults = Faults::from_env();
    if faults.any() {
        tracing::warn!(
            ?faults,
            "fault injection is on (OUTBOXD_FAULT_*): for tests only"
        );
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            fatal(&format_args!("cannot start the runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(wait_for_signal(shutdown.clone()));
        let scheme = if cfg.tls.enabled() { "wss" } else { "ws" };
        let r = net::serve(cfg, faults, shutdown, |addr| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "outboxd ready: {scheme}://{addr}/ws");
            let _ = out.flush();
        })
        .await;
        signals.abort();
        r
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ ServeError::Config(_)) => {
            if json_log {
                error!(error = %e, "outboxd refused its configuration");
            }
            fatal(&e);
            ExitCode::from(2)
        }
        Err(ServeError::Store(e @ crate::store::StoreError::Damaged { .. })) => {
            error!(error = %e, "outboxd refused to serve a damaged store");
            fatal(&e);
            ExitCode::from(crate::cli::tool_error::DAMAGED_EXIT)
        }
        Err(e) => {
            error!(error = %e, "outboxd stopped");
            fatal(&e);
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
