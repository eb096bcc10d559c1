//! `outboxd inspect`, `outboxd backup` and `outboxd restore`: the operator's view of the store.
//!
//! Every view comes from one of two sources that answer with the same shapes
//! ([`crate::views`]): a data directory read offline through [`crate::store::Inspector`]
//! (which never writes to it), or a running broker's admin API. Printing is separate from
//! fetching: human tables (payload previews cut to the terminal width) or `--json` (one JSON
//! document; NDJSON for message dumps).

use std::io::{IsTerminal as _, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::config::{Backend, Config, ConfigError};
use crate::model::now_ms;
use crate::store::{Inspector, StoreError};
use crate::views::{ClientView, OutboxPage, SortBy, StatsView, TopicView};

#[derive(Debug, Error)]
pub enum ToolError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("admin API at {url}: {message}")]
    Admin { url: String, message: String },
    #[error("no client {0:?} has an outbox here")]
    NoSuchClient(String),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

impl ToolError {
    fn exit_code(&self) -> ExitCode {
        match self {
            ToolError::Config(_) => ExitCode::from(2),
            ToolError::NoSuchClient(_) => ExitCode::from(3),
            ToolError::Store(StoreError::Damaged { .. }) => ExitCode::from(DAMAGED_EXIT),
            _ => ExitCode::from(1),
        }
    }
}

/// The exit status of every command that finds the store damaged (`serve` included).
pub const DAMAGED_EXIT: u8 = 4;

/// Where the stored state is read from.
#[derive(Debug, Args, Clone, Default)]
pub struct SourceArgs {
    /// Config file [default: ./config.toml, used only if present].
    #[arg(long, value_name = "PATH", global = true)]
    config: Option<PathBuf>,
    /// Read this data directory offline [default: storage.data_dir]. A broker must not be
    /// running on it; use --admin for a running one.
    #[arg(long, value_name = "DIR", global = true, conflicts_with = "admin")]
    data: Option<PathBuf>,
    /// Ask a running broker's admin API at URL, http:// or https:// [default:
    /// http://<server.admin_listen>, https:// when the config sets tls.admin, and then its
    /// tls.cert_file is trusted]: `--admin URL`, `--admin=URL`, or a bare `--admin` (also
    /// right before the subcommand: `inspect --admin stats`).
    #[arg(long, value_name = "URL", global = true, num_args = 0..=1, default_missing_value = "")]
    admin: Option<String>,
    /// Bearer token for the admin API [default: admin.token from the config].
    #[arg(
        long,
        value_name = "TOKEN",
        global = true,
        env = "OUTBOXD_ADMIN__TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// For an https:// admin API: trust the certificates in this PEM file (a private CA, or
    /// the broker's self-signed certificate) instead of the public certificate authorities.
    /// May be given more than once
    #[arg(long = "ca", value_name = "FILE", global = true)]
    ca: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Print JSON (one document; one JSON object per line for `outbox`).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// Every client with an outbox: pending messages and bytes, positions, oldest unacked age.
    Clients {
        /// Order: most pending messages, most bytes, oldest unacked message first, or by name.
        #[arg(long, default_value = "pending", value_parser = SortBy::NAMES)]
        sort: String,
        /// Show at most N clients (0: all).
        #[arg(long, value_name = "N", default_value_t = 0)]
        limit: usize,
    },
    /// The stored (unacked) messages of one client, in seq order.
    Outbox {
        /// The client id.
        client: String,
        /// Start at this seq.
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        from: u64,
        /// Show at most N messages (0: all).
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: usize,
    },
    /// Topics and their durable subscribers.
    Topics,
    /// Totals: clients, pending messages and bytes, disk use, oldest message, format version.
    Stats,
}

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

#[derive(Debug, Args)]
pub struct ClientArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Do not ask before a destructive change (required when stdin is not a terminal).
    #[arg(long, global = true)]
    yes: bool,
    /// Print the broker's answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    action: ClientAction,
}

#[derive(Debug, Subcommand)]
enum ClientAction {
    /// Delete a client's outbox and everything under it (stored messages, tombstones,
    /// subscriptions). A connected client is closed with 4002; if it comes back it gets a new,
    /// empty outbox with a new epoch, and is told its position no longer holds.
    Delete {
        /// The client id.
        client: String,
    },
    /// Remove every stored message of a client; its outbox moves to a new epoch and the client
    /// sees the removed messages in `missed` at its next connect (closed with 4002 if connected).
    Purge {
        /// The client id.
        client: String,
    },
    /// End one durable subscription of a client (a mistyped topic, say).
    Unsubscribe {
        /// The client id.
        client: String,
        /// The topic.
        topic: String,
    },
}

/// Runs `outboxd client`: an operator's change to one client, made by a running broker
/// through its admin API.
pub fn client(args: ClientArgs) -> ExitCode {
    finish(run_client(args))
}

fn run_client(args: ClientArgs) -> Result<(), ToolError> {
    let mut source = args.source.clone();
    // The change is the running broker's to make: the admin API, at its default address
    // when no URL is given.
    source.admin.get_or_insert_with(String::new);
    source.data = None;
    let Source::Online(admin) = Source::open(&source)? else {
        return Err(ToolError::Admin {
            url: String::new(),
            message: "`outboxd client` needs a running broker's admin API (--admin URL)".into(),
        });
    };
    let (question, path, who) = match &args.action {
        ClientAction::Delete { client } => (
            Some(format!(
                "Delete client {client} and every message stored for it? This cannot be undone."
            )),
            format!("/v1/clients/{client}"),
            client,
        ),
        ClientAction::Purge { client } => (
            Some(format!(
                "Remove every stored message of {client}? It will be told how many it missed."
            )),
            format!("/v1/clients/{client}/outbox"),
            client,
        ),
        ClientAction::Unsubscribe { client, topic } => (
            None,
            format!("/v1/clients/{client}/subscriptions/{topic}"),
            client,
        ),
    };
    if let Some(q) = question.filter(|_| !args.yes) {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            return Err(ToolError::Config(ConfigError::Invalid {
                key: "--yes",
                reason: format!("{q} Pass --yes to confirm (stdin is not a terminal)"),
            }));
        }
        eprint!("{q} [y/N] ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("outboxd client: nothing changed");
            return Ok(());
        }
    }
    let v = admin.delete(&path, who)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{v}")?;
        return Ok(());
    }
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    let connected = v.get("disconnected").and_then(|d| d.as_bool()) == Some(true);
    let closed = if connected {
        " (its connection was closed with 4002)"
    } else {
        ""
    };
    match &args.action {
        ClientAction::Delete { client } => writeln!(
            out,
            "deleted client {client}: {} stored messages removed{closed}",
            n("removed")
        )?,
        ClientAction::Purge { client } => writeln!(
            out,
            "purged {client}: {} messages removed, new epoch {}{closed}",
            n("removed"),
            v.get("epoch").and_then(|e| e.as_str()).unwrap_or("?")
        )?,
        ClientAction::Unsubscribe { client, topic } => {
            writeln!(out, "{client} is no longer subscribed to {topic}")?
        }
    }
    Ok(())
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
    let (path, required) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("config.toml"), false),
    };
    let cfg = Config::load(&path, required, std::env::vars())?;
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

/// Runs `outboxd migrate`.
pub fn migrate(args: MigrateArgs) -> ExitCode {
    finish(run_migrate(args))
}

fn run_migrate(args: MigrateArgs) -> Result<(), ToolError> {
    let (path, required) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("config.toml"), false),
    };
    let cfg = Config::load(&path, required, std::env::vars())?;
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
    let (path, required) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("config.toml"), false),
    };
    let cfg = Config::load(&path, required, std::env::vars())?;
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

/// Runs `outboxd inspect`.
pub fn inspect(args: InspectArgs) -> ExitCode {
    finish(run_inspect(args))
}

/// Runs `outboxd backup`.
pub fn backup(args: BackupArgs) -> ExitCode {
    finish(run_backup(args))
}

/// Runs `outboxd restore`.
pub fn restore(args: RestoreArgs) -> ExitCode {
    finish(run_restore(args))
}

fn finish(r: Result<(), ToolError>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(ToolError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outboxd: {e}");
            e.exit_code()
        }
    }
}

/// Makes a bare `--admin` in front of an `inspect` subcommand mean the default URL.
///
/// `--admin` takes an optional URL, and clap gives it whatever word follows: in
/// `outboxd inspect --admin stats` that is `stats`, leaving no subcommand. A word after
/// `--admin` that names a subcommand of `inspect` is that subcommand, so the `--admin` is
/// rewritten as `--admin=` (the default URL). URLs (`--admin URL`, `--admin=URL`) and every
/// other command line pass unchanged.
pub(crate) fn bare_admin_before_subcommand(
    args: Vec<std::ffi::OsString>,
    cli: &clap::Command,
) -> Vec<std::ffi::OsString> {
    let is_inspect = args.get(1).is_some_and(|a| a == "inspect");
    let Some(inspect) = cli.find_subcommand("inspect").filter(|_| is_inspect) else {
        return args;
    };
    let names: Vec<&str> = inspect
        .get_subcommands()
        .flat_map(|c| std::iter::once(c.get_name()).chain(c.get_all_aliases()))
        .collect();
    let mut out = Vec::with_capacity(args.len());
    let mut words = args.into_iter().peekable();
    while let Some(word) = words.next() {
        if word == "--" {
            out.push(word);
            out.extend(words);
            break;
        }
        let subcommand_next = words
            .peek()
            .and_then(|w| w.to_str())
            .is_some_and(|w| names.contains(&w));
        if word == "--admin" && subcommand_next {
            out.push("--admin=".into());
        } else {
            out.push(word);
        }
    }
    out
}

/// Where the views come from.
enum Source {
    Offline(Inspector),
    Online(Admin),
}

impl Source {
    fn open(args: &SourceArgs) -> Result<Source, ToolError> {
        let (path, required) = match &args.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from("config.toml"), false),
        };
        let cfg = Config::load(&path, required, std::env::vars())?;
        if let Some(url) = &args.admin {
            let mut ca = args.ca.clone();
            let base = if !url.is_empty() {
                url.trim_end_matches('/').to_string()
            } else if cfg.tls.admin && cfg.tls.enabled() {
                // The broker's own certificate, as `pub` and `sub` trust it for wss://.
                ca.push(cfg.tls.cert_file.clone());
                format!("https://{}", cfg.server.admin_listen)
            } else {
                format!("http://{}", cfg.server.admin_listen)
            };
            let token = args.token.clone().or_else(|| admin_token(&cfg));
            return Ok(Source::Online(Admin::new(base, token, &ca)?));
        }
        if args.data.is_none() && cfg.storage.backend == Backend::Postgres {
            let opts = crate::store::StoreOptions::from_config(&cfg);
            return Ok(Source::Offline(Inspector::open_postgres(&opts)?));
        }
        let dir = args
            .data
            .clone()
            .unwrap_or_else(|| cfg.storage.data_dir.clone());
        Ok(Source::Offline(Inspector::open_offline(&dir)?))
    }

    fn clients(&self, sort: SortBy, limit: usize) -> Result<Vec<ClientView>, ToolError> {
        let mut clients = match self {
            Source::Offline(i) => i
                .clients()?
                .into_iter()
                .map(ClientView::from)
                .collect::<Vec<_>>(),
            Source::Online(a) => {
                a.get(&format!("/v1/clients?sort={}&limit={limit}", sort.as_str()))?
            }
        };
        sort.sort(&mut clients);
        if limit > 0 {
            clients.truncate(limit);
        }
        Ok(clients)
    }

    fn outbox(&self, client: &str, from: u64, limit: usize) -> Result<OutboxPage, ToolError> {
        let limit = if limit == 0 { usize::MAX } else { limit };
        match self {
            Source::Offline(i) => i
                .outbox(client, from, limit)?
                .map(OutboxPage::from)
                .ok_or_else(|| ToolError::NoSuchClient(client.to_string())),
            Source::Online(a) => {
                // Page through the API so a large dump does not need one huge response.
                let mut page: Option<OutboxPage> = None;
                let mut next = Some(from);
                while let Some(from) = next {
                    let have = page.as_ref().map_or(0, |p| p.messages.len());
                    let want = (limit - have).min(1000);
                    let path = format!(
                        "/v1/clients/{}/outbox?from={from}&limit={want}",
                        encode_path(client)
                    );
                    let got: OutboxPage = a.get_client(&path, client)?;
                    next = got.next_from;
                    match &mut page {
                        None => page = Some(got),
                        Some(p) => p.messages.extend(got.messages),
                    }
                    if page.as_ref().map_or(0, |p| p.messages.len()) >= limit {
                        break;
                    }
                }
                let mut page = page.ok_or_else(|| ToolError::NoSuchClient(client.to_string()))?;
                page.next_from = next;
                Ok(page)
            }
        }
    }

    fn topics(&self) -> Result<Vec<TopicView>, ToolError> {
        match self {
            Source::Offline(i) => Ok(i.topics()?.into_iter().map(TopicView::from).collect()),
            Source::Online(a) => a.get("/v1/topics"),
        }
    }

    fn stats(&self) -> Result<StatsView, ToolError> {
        match self {
            Source::Offline(i) => Ok(i.stats()?.into()),
            Source::Online(a) => a.get("/v1/stats"),
        }
    }
}

fn admin_token(cfg: &Config) -> Option<String> {
    let t = cfg.admin.token.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Percent-encodes a path segment (client ids may hold characters a URL path does not).
fn encode_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A running broker's admin API.
struct Admin {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Admin {
    /// Trusts the certificates in `ca_files` for https://, or the public certificate
    /// authorities when there are none. Reads the files.
    fn new(base: String, token: Option<String>, ca_files: &[PathBuf]) -> Result<Admin, ToolError> {
        let fail = |message: String| ToolError::Admin {
            url: base.clone(),
            message,
        };
        let mut roots = Vec::new();
        for path in ca_files {
            let pem = std::fs::read(path)
                .map_err(|e| fail(format!("cannot read --ca {}: {e}", path.display())))?;
            let before = roots.len();
            for item in ureq::tls::parse_pem(&pem) {
                match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => roots.push(c),
                    Ok(_) => {}
                    Err(e) => {
                        return Err(fail(format!("{} is not valid PEM: {e}", path.display())))
                    }
                }
            }
            if roots.len() == before {
                return Err(fail(format!(
                    "{} holds no PEM certificate (\"BEGIN CERTIFICATE\")",
                    path.display()
                )));
            }
        }
        let root_certs = if roots.is_empty() {
            ureq::tls::RootCerts::WebPki
        } else {
            ureq::tls::RootCerts::from(roots)
        };
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .http_status_as_error(false)
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(root_certs)
                    .build(),
            )
            .build()
            .into();
        Ok(Admin { base, token, agent })
    }

    fn fail(&self, message: impl Into<String>) -> ToolError {
        ToolError::Admin {
            url: self.base.clone(),
            message: message.into(),
        }
    }

    fn call(
        &self,
        req: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
    ) -> Result<(u16, String), ToolError> {
        let req = match &self.token {
            Some(t) => req.header("Authorization", &format!("Bearer {t}")),
            None => req,
        };
        self.read(req.call())
    }

    fn read(
        &self,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(u16, String), ToolError> {
        let mut resp = r.map_err(|e| match rejected_certificate(&e) {
            Some(words) => self.fail(format!("its TLS certificate was rejected: {words}")),
            None => self.fail(format!(
                "{e} (is the broker running, and is its admin API on this address?)"
            )),
        })?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| self.fail(e.to_string()))?;
        Ok((status, body))
    }

    fn decode<T: DeserializeOwned>(&self, status: u16, body: &str) -> Result<T, ToolError> {
        if status == 401 || status == 403 {
            return Err(self.fail(format!(
                "refused ({status}): pass the admin token with --token or OUTBOXD_ADMIN__TOKEN"
            )));
        }
        if !(200..300).contains(&status) {
            return Err(self.fail(format!("HTTP {status}: {}", error_message(body))));
        }
        serde_json::from_str(body).map_err(|e| self.fail(format!("unexpected answer: {e}")))
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ToolError> {
        let (status, body) = self.call(self.agent.get(&format!("{}{path}", self.base)))?;
        self.decode(status, &body)
    }

    /// Like [`Admin::get`], with a 404 meaning the client has no outbox.
    fn get_client<T: DeserializeOwned>(&self, path: &str, client: &str) -> Result<T, ToolError> {
        let (status, body) = self.call(self.agent.get(&format!("{}{path}", self.base)))?;
        if status == 404 {
            return Err(ToolError::NoSuchClient(client.to_string()));
        }
        self.decode(status, &body)
    }

    /// A DELETE; a 404 means the client (or its subscription) does not exist.
    fn delete(&self, path: &str, client: &str) -> Result<serde_json::Value, ToolError> {
        let (status, body) = self.call(self.agent.delete(&format!("{}{path}", self.base)))?;
        if status == 404 && body.contains("not subscribed") {
            return Err(self.fail(error_message(&body)));
        }
        if status == 404 {
            return Err(ToolError::NoSuchClient(client.to_string()));
        }
        self.decode(status, &body)
    }

    fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, ToolError> {
        let req = self.agent.post(&format!("{}{path}", self.base));
        let req = match &self.token {
            Some(t) => req.header("Authorization", &format!("Bearer {t}")),
            None => req,
        };
        let (status, text) = self.read(req.send_json(body))?;
        self.decode(status, &text)
    }
}

/// The reason in words when `e` is the admin API's certificate failing verification.
fn rejected_certificate(e: &ureq::Error) -> Option<String> {
    let tls = match e {
        ureq::Error::Rustls(tls) => tls,
        ureq::Error::Io(io) => io
            .get_ref()?
            .downcast_ref::<tokio_rustls::rustls::Error>()?,
        _ => return None,
    };
    crate::client::tls::rejection_in_words(tls)
}

/// The `message` of an API error body, or the body itself.
fn error_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let e = v.get("error")?;
            let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("error");
            let msg = e.get("message").and_then(|m| m.as_str()).unwrap_or("");
            Some(format!("{code}: {msg}"))
        })
        .unwrap_or_else(|| body.trim().chars().take(300).collect())
}

fn run_inspect(args: InspectArgs) -> Result<(), ToolError> {
    let source = Source::open(&args.source)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let now = now_ms();
    match args.what {
        What::Clients { sort, limit } => {
            let sort = SortBy::parse(&sort).unwrap_or(SortBy::Pending);
            let clients = source.clients(sort, limit)?;
            if args.json {
                writeln!(out, "{}", to_json(&clients))?;
            } else {
                print_clients(&mut out, &clients, now)?;
            }
        }
        What::Outbox {
            client,
            from,
            limit,
        } => {
            let page = source.outbox(&client, from, limit)?;
            if args.json {
                for m in &page.messages {
                    writeln!(out, "{}", to_json(m))?;
                }
            } else {
                print_outbox(&mut out, &page, now, width())?;
            }
        }
        What::Topics => {
            let topics = source.topics()?;
            if args.json {
                writeln!(out, "{}", to_json(&topics))?;
            } else {
                print_topics(&mut out, &topics)?;
            }
        }
        What::Stats => {
            let stats = source.stats()?;
            if args.json {
                writeln!(out, "{}", to_json(&stats))?;
            } else {
                print_stats(&mut out, &stats, now)?;
            }
        }
    }
    out.flush()?;
    Ok(())
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

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// The width to cut lines at: the terminal's, or $COLUMNS, or no cut when piped.
fn width() -> Option<usize> {
    if let Some(c) = std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()) {
        return Some(c);
    }
    if std::io::stdout().is_terminal() {
        return terminal_size::terminal_size().map(|(w, _)| usize::from(w.0));
    }
    None
}

/// "3d4h", "12m5s", "800ms": how long ago `then` (Unix ms) was.
pub fn age(now: u64, then: u64) -> String {
    let ms = now.saturating_sub(then);
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Cuts `s` to at most `max` characters, marking the cut with an ellipsis.
pub fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Prints rows as left-aligned columns; the last column is cut so lines fit `width`.
fn table(
    out: &mut impl Write,
    header: &[&str],
    rows: &[Vec<String>],
    width: Option<usize>,
) -> std::io::Result<()> {
    let n = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, cell) in r.iter().enumerate().take(n.saturating_sub(1)) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let lead: usize = widths.iter().take(n.saturating_sub(1)).map(|w| w + 2).sum();
    let last_room = width.map(|w| w.saturating_sub(lead).max(8));
    let line = |cells: &[String]| -> String {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == n {
                match last_room {
                    Some(room) => s.push_str(&cut(cell, room)),
                    None => s.push_str(cell),
                }
            } else {
                s.push_str(cell);
                let pad = widths[i].saturating_sub(cell.chars().count()) + 2;
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        s.trim_end().to_string()
    };
    let head: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    writeln!(out, "{}", line(&head))?;
    for r in rows {
        writeln!(out, "{}", line(r))?;
    }
    Ok(())
}

fn print_clients(out: &mut impl Write, clients: &[ClientView], now: u64) -> std::io::Result<()> {
    if clients.is_empty() {
        return writeln!(out, "no clients");
    }
    let rows: Vec<Vec<String>> = clients
        .iter()
        .map(|c| {
            vec![
                c.client_id.clone(),
                c.epoch.clone(),
                c.pending.to_string(),
                human_bytes(c.bytes),
                c.next_seq.to_string(),
                c.acked.to_string(),
                c.oldest_unacked_ts.map_or("-".into(), |t| age(now, t)),
                c.last_seen
                    .map_or("never".into(), |t| format!("{} ago", age(now, t))),
                match c.connected {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => "-".into(),
                },
                if c.subscriptions.is_empty() {
                    "-".into()
                } else {
                    c.subscriptions.join(",")
                },
            ]
        })
        .collect();
    table(
        out,
        &[
            "CLIENT",
            "EPOCH",
            "PENDING",
            "BYTES",
            "NEXT_SEQ",
            "ACKED",
            "OLDEST",
            "LAST_SEEN",
            "CONNECTED",
            "TOPICS",
        ],
        &rows,
        width(),
    )
}

fn print_outbox(
    out: &mut impl Write,
    page: &OutboxPage,
    now: u64,
    width: Option<usize>,
) -> std::io::Result<()> {
    writeln!(
        out,
        "outbox of {} (epoch {}): {} message(s) shown",
        page.client_id,
        page.epoch,
        page.messages.len()
    )?;
    if !page.messages.is_empty() {
        let rows: Vec<Vec<String>> = page
            .messages
            .iter()
            .map(|m| {
                let preview = match (&m.payload, &m.payload_b64, &m.payload_text) {
                    (Some(p), _, _) => p.as_str().to_string(),
                    (None, Some(b), _) => format!("base64:{b}"),
                    (None, None, Some(t)) => format!("text:{}", t.replace(['\n', '\r', '\t'], " ")),
                    (None, None, None) => String::new(),
                };
                vec![
                    m.seq.to_string(),
                    m.id.clone(),
                    age(now, m.ts),
                    m.from.clone().unwrap_or_else(|| "-".into()),
                    m.topic.clone().unwrap_or_else(|| "-".into()),
                    m.size.to_string(),
                    m.deliveries.map_or("-".into(), |d| d.to_string()),
                    preview,
                ]
            })
            .collect();
        table(
            out,
            &[
                "SEQ", "ID", "AGE", "FROM", "TOPIC", "SIZE", "SENT", "PAYLOAD",
            ],
            &rows,
            width,
        )?;
    }
    if let Some(next) = page.next_from {
        writeln!(
            out,
            "more from seq {next} (use --from {next}, or --limit 0 for all)"
        )?;
    }
    Ok(())
}

fn print_topics(out: &mut impl Write, topics: &[TopicView]) -> std::io::Result<()> {
    if topics.is_empty() {
        return writeln!(out, "no topics with subscribers");
    }
    let rows: Vec<Vec<String>> = topics
        .iter()
        .map(|t| {
            vec![
                t.topic.clone(),
                t.subscribers.len().to_string(),
                t.subscribers.join(","),
            ]
        })
        .collect();
    table(out, &["TOPIC", "COUNT", "SUBSCRIBERS"], &rows, width())
}

fn print_stats(out: &mut impl Write, s: &StatsView, now: u64) -> std::io::Result<()> {
    let lines = [
        ("data dir", s.data_dir.clone()),
        ("format version", s.format_version.to_string()),
        ("clients", s.clients.to_string()),
        ("topics", s.topics.to_string()),
        ("subscriptions", s.subscriptions.to_string()),
        ("pending messages", s.pending_messages.to_string()),
        ("pending bytes", human_bytes(s.pending_bytes)),
        (
            "max pending (one client)",
            format!(
                "{} messages, {}",
                s.max_pending_messages,
                human_bytes(s.max_pending_bytes)
            ),
        ),
        (
            "oldest message",
            s.oldest_message_ts
                .map_or("-".into(), |t| format!("{} ago", age(now, t))),
        ),
        ("live data", human_bytes(s.live_bytes)),
        ("on disk", human_bytes(s.disk_bytes)),
    ];
    for (k, v) in lines {
        writeln!(out, "{:<26}{v}", format!("{k}:"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_admin_before_an_inspect_subcommand_means_the_default_url() {
        use clap::CommandFactory as _;
        let cli = crate::cli::Cli::command();
        let fixed = |words: &[&str]| -> Vec<String> {
            let args = words.iter().map(std::ffi::OsString::from).collect();
            bare_admin_before_subcommand(args, &cli)
                .into_iter()
                .map(|w| w.to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            fixed(&["outboxd", "inspect", "--admin", "stats"]),
            ["outboxd", "inspect", "--admin=", "stats"]
        );
        let unchanged: [&[&str]; 4] = [
            &["outboxd", "inspect", "--admin", "http://h:9090", "stats"],
            &["outboxd", "inspect", "--admin=http://h:9090", "stats"],
            &["outboxd", "inspect", "outbox", "--", "--admin", "stats"],
            &["outboxd", "backup", "--admin", "--to", "d"],
        ];
        for words in unchanged {
            assert_eq!(fixed(words), words);
        }
    }

    #[test]
    fn table_cuts_only_the_last_column_to_the_width() {
        let mut out = Vec::new();
        let rows = vec![vec!["1".to_string(), "x".repeat(100)]];
        table(&mut out, &["SEQ", "PAYLOAD"], &rows, Some(20)).unwrap();
        let text = String::from_utf8(out).unwrap();
        for line in text.lines() {
            assert!(line.chars().count() <= 20, "{line:?}");
        }
        assert!(text.contains('…'));
    }

    #[test]
    fn ages_and_sizes_read_like_a_human_wrote_them() {
        assert_eq!(age(10_000, 9_500), "500ms");
        assert_eq!(age(200_000, 0), "3m20s");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(encode_path("a b/c"), "a%20b%2Fc");
    }
}
