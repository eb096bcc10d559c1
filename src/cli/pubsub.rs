//! `outboxd pub` and `outboxd sub`: the Rust client for people at a terminal and for scripts.
//!
//! Both are thin: argument handling, output format and exit codes here; connecting, resuming,
//! dedup, retries and acks are the client library's (`crate::client`), so the tests of the
//! library cover what these commands promise. `pub` exits 0 only when the broker confirmed
//! every message; `sub` acks a message only after it has been written to stdout, and keeps its
//! position in a file so a restarted `sub` prints nothing twice.

use std::collections::VecDeque;
use std::io::{BufRead as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine as _;
use clap::Args;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::client::{
    Client, ClientBuilder, ClientError, Event, FilePositionStore, Incoming, Message, Payload,
    PendingPublish, Published, RequestError, Rng, StopReason,
};
use crate::config::Config;
use crate::model::ClientId;
use crate::model::Target;

/// Publishes in flight at once when reading stdin; more wait for a confirmation first.
const PUB_WINDOW: usize = 256;

/// Where to reach the broker and how to say who we are.
#[derive(Debug, Args)]
pub struct ConnArgs {
    /// Broker URL, ws:// or wss:// [default: ws://<server.listen of ./config.toml>/ws, i.e.
    /// ws://127.0.0.1:8080/ws without a config file; wss:// when that config turns TLS on, and
    /// then its tls.cert_file is trusted too]
    #[arg(long, env = "OUTBOXD_URL", value_name = "URL")]
    url: Option<String>,
    /// For wss://: also trust the certificates in this PEM file (a private CA, or the broker's
    /// self-signed certificate); the public certificate authorities are always trusted. May be
    /// given more than once
    #[arg(long = "ca", value_name = "FILE")]
    ca: Vec<PathBuf>,
    /// Credential sent in hello as `token`
    #[arg(
        long,
        env = "OUTBOXD_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Read the token from this file before every hello, and again shortly before it expires
    /// (its `exp`), so a long run outlives one token while something else renews the file
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Retry the first connection for up to DURATION (30s, 5m, 1h; 0 waits for ever) until the
    /// broker answers. A bare --wait retries for as long as --timeout (pub) or
    /// --connect-timeout (sub) says. Without it, a first attempt that fails ends the command at
    /// once (exit status 3). A rejected TLS certificate is never retried
    #[arg(
        long,
        value_name = "DURATION",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = ""
    )]
    wait: Option<String>,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  outboxd pub --to client:bob '{\"text\":\"hi\"}'     # a JSON object
  outboxd pub --to topic:news/eu 'plain words'      # not JSON: sent as a string
  tail -f app.log | outboxd pub --to client:ops -   # one message per line

Exit status: 0 when the broker confirmed every message (durable in every recipient's outbox),
1 when any was refused, not confirmed within --timeout, or not written for some topic
subscriber, 2 for invalid arguments (a malformed --url too), 3 when no session with the broker
came (nothing was sent: the first connection failed, or --wait ran out, or the broker's TLS
certificate was rejected).")]
pub struct PubArgs {
    /// Recipient: client:ID (one client's outbox) or topic:NAME (every subscriber's)
    #[arg(long, value_name = "client:ID|topic:NAME")]
    to: String,
    /// The message. Text that parses as JSON is sent as that JSON value, any other text as a
    /// JSON string. `-` reads stdin: one message per line, empty lines skipped
    #[arg(value_name = "PAYLOAD|-")]
    payload: String,
    /// The publisher's client id [default: the token's subject with --token, else `pub-` and
    /// random hex digits, new each run and forgotten by the broker when the run ends]. Give
    /// one to make --key retries of an earlier run idempotent: the broker remembers keys per
    /// publisher id
    #[arg(long, value_name = "ID")]
    client: Option<String>,
    /// Idempotency key: the broker writes a key at most once within its dedup window. With
    /// stdin, line N gets KEY:N. Without it, each message gets a generated key, which makes this
    /// run's own retries (after a reconnect) safe
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
    /// Send every payload as a JSON string, without trying to parse it
    #[arg(long)]
    string: bool,
    /// Lifetime of the message in each outbox, in milliseconds (default: the broker's
    /// limits.message_ttl_ms)
    #[arg(long, value_name = "MS")]
    ttl_ms: Option<u64>,
    /// Seconds to wait for each message's confirmation (retrying across reconnects
    /// meanwhile), and with a bare --wait for the first connection; 0 waits for ever
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    timeout: u64,
    /// Print `ok <line> id=<id> recipients=<n>` on stderr for each confirmed message
    #[arg(short, long)]
    verbose: bool,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Output: one line per message. Default: `#SEQ [from ID] [on TOPIC] [(redelivered)]: PAYLOAD`,
the payload as JSON text (binary payloads as base64:...). With --json: one JSON object per
line with epoch, seq, id, ts, from, topic, redelivered and payload (or payload_b64).

Each message is acked after its line is written and flushed. The position (epoch and last
acked seq) is kept in a file, so a restarted `outboxd sub --client ID` resumes where the last
one stopped and prints nothing twice; without one, it may print again what the previous run
printed but could not ack. Default position file: $XDG_STATE_HOME/outboxd/sub/ID.json
($HOME/.local/state/outboxd/sub/ID.json when XDG_STATE_HOME is unset).

Broker restarts, dropped and silent connections are ridden through: `sub` reconnects with
backoff and resumes. Losses by retention (TTL) and position resets are reported on stderr.
Exit status: 0 after --count messages or on SIGINT/SIGTERM; 1 when the client stopped for
good (e.g. replaced by another connection with the same id) or stdout failed; 2 for invalid
arguments (a malformed --url too); 3 when no first session came (the first connection failed,
or --wait ran out, or the broker's TLS certificate was rejected). Once connected, `sub`
reconnects for ever.")]
pub struct SubArgs {
    /// This subscriber's client id: its outbox is what gets printed
    #[arg(long, value_name = "ID")]
    client: String,
    /// Subscribe to TOPIC before printing (durable: it stays until unsubscribed). Repeatable
    #[arg(long = "topic", value_name = "TOPIC")]
    topics: Vec<String>,
    /// One JSON object per line, for scripts
    #[arg(long)]
    json: bool,
    /// Keep the position in FILE
    #[arg(long, value_name = "FILE")]
    position: Option<PathBuf>,
    /// Keep the position in memory only (a restart may print unacked messages again)
    #[arg(long, conflicts_with = "position")]
    no_position: bool,
    /// Exit 0 after printing (and acking) N messages
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Seconds to wait for the subscriptions, and with a bare --wait for the first connection;
    /// 0 waits for ever
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    connect_timeout: u64,
    /// Report connections and disconnections on stderr
    #[arg(short, long)]
    verbose: bool,
    #[command(flatten)]
    conn: ConnArgs,
}

/// Exit status for invalid arguments (the same as the broker's for a bad config).
const USAGE: u8 = 2;
/// Exit status when no first session came: nothing was sent.
const UNREACHABLE: u8 = 3;

/// How the first connection is made, from `--wait[=DURATION]`: `(fail_fast, connect_timeout)`.
/// A bare `--wait` keeps `default`, the command's own timeout.
fn first_connect(
    wait: Option<&str>,
    default: Option<Duration>,
) -> Result<(bool, Option<Duration>), String> {
    let Some(wait) = wait else {
        return Ok((true, default));
    };
    let limit = match wait {
        "" => default,
        "0" => None,
        w if w.bytes().all(|b| b.is_ascii_digit()) => w.parse().ok().map(Duration::from_secs),
        w => super::parse_ttl(w).map(Duration::from_secs),
    };
    match limit {
        None if !matches!(wait, "" | "0") => Err(format!(
            "--wait={wait}: write a number with s, m, h or d, e.g. --wait=30s"
        )),
        limit => Ok((false, limit)),
    }
}

/// The message and exit status for a client that could not start.
fn connect_failed(e: ClientError) -> (String, u8) {
    match e {
        ClientError::Stopped(StopReason::Unreachable(why)) => (
            format!("{why} (--wait retries the first connection)"),
            UNREACHABLE,
        ),
        e @ (ClientError::Stopped(StopReason::Certificate { .. })
        | ClientError::ConnectTimeout { .. }) => (e.to_string(), UNREACHABLE),
        // The library's reason may start with the URL again.
        ClientError::Url { url, reason } => {
            let reason = reason.strip_prefix(&format!("{url}: ")).unwrap_or(&reason);
            (
                format!(
                    "invalid broker URL {url:?}: {reason} (write ws://HOST:PORT/ws, or wss:// \
                     for TLS)"
                ),
                USAGE,
            )
        }
        e => (e.to_string(), 1),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// `outboxd pub`.
pub fn publish(args: PubArgs) -> ExitCode {
    match runtime() {
        Ok(rt) => rt.block_on(run_pub(args)),
        Err(e) => {
            eprintln!("outboxd pub: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `outboxd sub`.
pub fn subscribe(args: SubArgs) -> ExitCode {
    match runtime() {
        Ok(rt) => rt.block_on(run_sub(args)),
        Err(e) => {
            eprintln!("outboxd sub: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--url`, or the URL of the broker ./config.toml (and `OUTBOXD_SERVER__LISTEN`) describes:
/// `ws://<server.listen>/ws`, an unspecified address (0.0.0.0, ::) meaning this machine, or
/// `wss://` with its own certificate trusted when it turns TLS on. Returns the URL and the
/// certificate files to trust besides `--ca`.
fn resolve_url(url: Option<String>) -> Result<(String, Option<PathBuf>), String> {
    if let Some(url) = url {
        return Ok((url, None));
    }
    let cfg = Config::load(Path::new("config.toml"), false, std::env::vars())
        .map_err(|e| format!("no --url, and ./config.toml cannot give one: {e}"))?;
    let addr = cfg.listen_addr().map_err(|e| e.to_string())?;
    if addr.port() == 0 {
        return Err("no --url, and server.listen has port 0: pass --url".into());
    }
    let tls = cfg.tls.enabled();
    Ok((ws_url(addr, tls), tls.then(|| cfg.tls.cert_file.clone())))
}

/// The WebSocket URL of a broker listening on `addr`.
fn ws_url(addr: SocketAddr, tls: bool) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(v) if v.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v) if v.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let scheme = if tls { "wss" } else { "ws" };
    format!("{scheme}://{}/ws", SocketAddr::new(ip, addr.port()))
}

fn seconds(s: u64) -> Option<Duration> {
    (s > 0).then(|| Duration::from_secs(s))
}

fn builder(
    (url, own_cert): (String, Option<PathBuf>),
    client: &str,
    conn: ConnArgs,
    (fail_fast, connect_timeout): (bool, Option<Duration>),
) -> ClientBuilder {
    let mut b = Client::builder(url, client)
        .connect_timeout(connect_timeout)
        .fail_fast(fail_fast);
    if let Some(token) = conn.token {
        b = b.token(token);
    }
    if let Some(path) = conn.token_file {
        b = b.token_source(move || match std::fs::read_to_string(&path) {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_owned()),
            Ok(_) => {
                tracing::warn!(file = %path.display(), "the token file is empty; keeping the token in use");
                None
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the token file; keeping the token in use");
                None
            }
        });
    }
    for ca in own_cert.into_iter().chain(conn.ca) {
        b = b.tls_ca_file(ca);
    }
    b
}

/// A line of input as a payload: its JSON value when it is JSON, else the text as a string.
fn payload_of(text: &str, as_string: bool) -> Payload {
    if !as_string {
        if let Ok(p) = Payload::json_text(text.trim()) {
            return p;
        }
    }
    Payload::from(text)
}

async fn run_pub(args: PubArgs) -> ExitCode {
    let fail = |msg: String, code: u8| {
        eprintln!("outboxd pub: {msg}");
        ExitCode::from(code)
    };
    if let Err(msg) = Target::parse(&args.to) {
        return fail(format!("--to: {msg}"), USAGE);
    }
    // A token names the client it was issued for: publish as that one.
    let subject = args
        .conn
        .token
        .as_deref()
        .and_then(crate::client::token_subject);
    // A made-up id is this run's alone: the broker forgets it when the run ends (transient),
    // so runs leave no empty outboxes behind.
    let (client_id, transient) = match (args.client.clone(), subject) {
        (Some(id), _) => (id, false),
        (None, Some(sub)) => (sub, false),
        (None, None) => (format!("pub-{:016x}", Rng::seeded().next_u64()), true),
    };
    if let Err(e) = ClientId::new(&client_id) {
        return fail(format!("--client: {e}"), USAGE);
    }
    let from_stdin = args.payload == "-";
    if let Some(k) = &args.key {
        // Room for the ":N" suffix of stdin lines.
        let max = crate::protocol::MAX_KEY_LEN - if from_stdin { 21 } else { 0 };
        if k.is_empty() || k.len() > max {
            return fail(format!("--key must be 1 to {max} bytes"), USAGE);
        }
    }
    let url = match resolve_url(args.conn.url.clone()) {
        Ok(u) => u,
        Err(e) => return fail(e, USAGE),
    };
    let timeout = seconds(args.timeout);
    let first = match first_connect(args.conn.wait.as_deref(), timeout) {
        Ok(f) => f,
        Err(e) => return fail(e, USAGE),
    };
    let client = match builder(url, &client_id, args.conn, first)
        .transient(transient)
        .connect()
        .await
    {
        Ok(c) => c,
        Err(e) => {
            let (msg, code) = connect_failed(e);
            return fail(msg, code);
        }
    };

    // Lines (number, text) from the positional payload or stdin.
    let (lines_tx, mut lines) = mpsc::channel::<(u64, String)>(PUB_WINDOW);
    if from_stdin {
        // A plain thread: std's stdin blocks, and must not hold a runtime worker.
        std::thread::spawn(move || {
            for (i, line) in std::io::stdin().lock().lines().enumerate() {
                let Ok(line) = line else { break };
                let n = u64::try_from(i).unwrap_or(u64::MAX).saturating_add(1);
                if lines_tx.blocking_send((n, line)).is_err() {
                    break;
                }
            }
        });
    } else {
        let _ = lines_tx.send((1, args.payload.clone())).await;
        drop(lines_tx);
    }

    // Publishes started in line order (so written in that order), reported in that order as
    // their confirmations come, while more lines are read.
    let mut in_flight: VecDeque<(u64, Option<String>, PendingPublish)> = VecDeque::new();
    let mut input_done = false;
    let mut failed = 0u64;
    let mut confirmed = 0u64;
    while !(input_done && in_flight.is_empty()) {
        let step = tokio::select! {
            result = oldest(&mut in_flight), if !in_flight.is_empty() => Step::Answered(result),
            line = lines.recv(), if !input_done && in_flight.len() < PUB_WINDOW => Step::Line(line),
        };
        match step {
            Step::Line(None) => input_done = true,
            Step::Line(Some((n, text))) => {
                let text = text.strip_suffix('\r').unwrap_or(&text);
                if from_stdin && text.trim().is_empty() {
                    continue;
                }
                let key = args.key.as_ref().map(|k| {
                    if from_stdin {
                        format!("{k}:{n}")
                    } else {
                        k.clone()
                    }
                });
                let mut req = client.publish(args.to.clone(), payload_of(text, args.string));
                if let Some(k) = &key {
                    req = req.key(k.clone());
                }
                if let Some(ms) = args.ttl_ms {
                    req = req.ttl(Duration::from_millis(ms));
                }
                if let Some(t) = timeout {
                    req = req.timeout(t);
                }
                in_flight.push_back((n, key, req.start()));
            }
            Step::Answered(result) => {
                let Some((n, key, _)) = in_flight.pop_front() else {
                    continue;
                };
                let label = if from_stdin {
                    format!("line {n}")
                } else {
                    "the message".to_string()
                };
                let key = match &result {
                    Err(RequestError::Timeout { key: Some(k), .. }) => Some(k.clone()),
                    _ => key,
                };
                let hint = !from_stdin;
                if report_publish(
                    &label,
                    &client_id,
                    key.as_deref(),
                    hint,
                    result,
                    args.verbose,
                ) {
                    confirmed += 1;
                } else {
                    failed += 1;
                }
            }
        }
    }
    client.close().await;
    if failed > 0 {
        eprintln!(
            "outboxd pub: {failed} of {} message(s) not confirmed",
            failed + confirmed
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

enum Step {
    Line(Option<(u64, String)>),
    Answered(Result<Published, RequestError>),
}

/// The answer to the oldest publish in flight (cancel-safe: the publish stays in the queue).
async fn oldest(
    in_flight: &mut VecDeque<(u64, Option<String>, PendingPublish)>,
) -> Result<Published, RequestError> {
    match in_flight.front_mut() {
        Some((_, _, pending)) => pending.await,
        None => std::future::pending().await,
    }
}

/// Says what became of one message; `true` when it is in every recipient's outbox.
fn report_publish(
    label: &str,
    client_id: &str,
    key: Option<&str>,
    retry_hint: bool,
    result: Result<Published, RequestError>,
    verbose: bool,
) -> bool {
    match result {
        Ok(p) if p.refused.is_empty() => {
            if verbose {
                let dup = if p.duplicate { " duplicate" } else { "" };
                eprintln!("ok {label} id={} recipients={}{dup}", p.id, p.recipients);
            }
            true
        }
        Ok(p) => {
            for r in &p.refused {
                eprintln!(
                    "outboxd pub: {label} was not written for subscriber {} ({})",
                    r.client_id, r.code
                );
            }
            false
        }
        Err(e @ RequestError::Timeout { .. }) => {
            match key.filter(|_| retry_hint) {
                // One message: say how to retry it without a duplicate.
                Some(key) => eprintln!(
                    "outboxd pub: {label}: {e}; it may have been written: to retry without a \
                     duplicate, run again with --client {client_id} --key {key}"
                ),
                None => eprintln!("outboxd pub: {label}: {e}; it may have been written"),
            }
            false
        }
        Err(e) => {
            eprintln!("outboxd pub: {label}: {e}");
            false
        }
    }
}

/// `$XDG_STATE_HOME/outboxd/sub/ID.json`, `$HOME/.local/state/outboxd/sub/ID.json`, or
/// `./.outboxd-sub-ID.json` when neither is set.
fn default_position_path(client: &str) -> PathBuf {
    let nonempty = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    match nonempty("XDG_STATE_HOME").or_else(|| nonempty("HOME").map(|h| h.join(".local/state"))) {
        Some(base) => base
            .join("outboxd")
            .join("sub")
            .join(format!("{client}.json")),
        None => PathBuf::from(format!(".outboxd-sub-{client}.json")),
    }
}

async fn run_sub(args: SubArgs) -> ExitCode {
    let fail = |msg: String, code: u8| {
        eprintln!("outboxd sub: {msg}");
        ExitCode::from(code)
    };
    if let Err(e) = ClientId::new(&args.client) {
        return fail(format!("--client: {e}"), USAGE);
    }
    for t in &args.topics {
        if let Err(e) = crate::model::Topic::new(t) {
            return fail(format!("--topic: {e}"), USAGE);
        }
    }
    let url = match resolve_url(args.conn.url.clone()) {
        Ok(u) => u,
        Err(e) => return fail(e, USAGE),
    };
    let connect_timeout = seconds(args.connect_timeout);
    let first = match first_connect(args.conn.wait.as_deref(), connect_timeout) {
        Ok(f) => f,
        Err(e) => return fail(e, USAGE),
    };
    let mut b = builder(url, &args.client, args.conn, first);
    if !args.no_position {
        let path = args
            .position
            .clone()
            .unwrap_or_else(|| default_position_path(&args.client));
        b = b.position_store(FilePositionStore::new(path));
    }
    let mut client = match b.connect().await {
        Ok(c) => c,
        Err(e) => {
            let (msg, code) = connect_failed(e);
            return fail(msg, code);
        }
    };
    for topic in &args.topics {
        let subscribed = match connect_timeout {
            Some(t) => tokio::time::timeout(t, client.subscribe(topic))
                .await
                .unwrap_or(Err(RequestError::Timeout {
                    after: t,
                    key: None,
                })),
            None => client.subscribe(topic).await,
        };
        if let Err(e) = subscribed {
            client.close().await;
            return fail(format!("subscribe {topic}: {e}"), 1);
        }
    }

    let mut stop = std::pin::pin!(shutdown_signal());
    let mut printed = 0u64;
    let status = loop {
        if args.count.is_some_and(|n| printed >= n) {
            break ExitCode::SUCCESS;
        }
        let item = tokio::select! {
            _ = &mut stop => break ExitCode::SUCCESS,
            item = client.next() => item,
        };
        match item {
            Some(Incoming::Delivery(d)) => {
                if let Err(e) = print_line(&d, args.json) {
                    // Not acked: the message stays in the outbox for the next run.
                    if e.kind() != std::io::ErrorKind::BrokenPipe {
                        eprintln!("outboxd sub: cannot write to stdout: {e}");
                    }
                    break ExitCode::FAILURE;
                }
                if d.ack().is_err() {
                    break ExitCode::FAILURE;
                }
                printed += 1;
            }
            Some(Incoming::Event(event)) => {
                if let Some(code) = report_event(&args.client, &event, args.verbose) {
                    break code;
                }
            }
            None => break ExitCode::FAILURE,
        }
    };
    client.close().await;
    status
}

/// Tells the user about an event on stderr; `Some(exit status)` when `sub` must stop.
fn report_event(client: &str, event: &Event, verbose: bool) -> Option<ExitCode> {
    match event {
        Event::Missed { count, epoch } => eprintln!(
            "outboxd sub: {count} message(s) for {client} were removed by retention before \
             they were delivered (epoch {epoch})"
        ),
        Event::Reset {
            previous,
            epoch,
            reason,
        } => eprintln!(
            "outboxd sub: the broker did not accept position {}:{} ({reason}); starting over \
             in epoch {epoch}",
            previous.epoch, previous.last_seq
        ),
        Event::PositionNotSaved { error } => {
            eprintln!("outboxd sub: warning: {error} (a restart may print acked messages again)")
        }
        Event::Stopped { reason } => {
            if *reason != StopReason::Closed {
                eprintln!("outboxd sub: stopped: {reason}");
            }
            return Some(ExitCode::FAILURE);
        }
        Event::Connected {
            epoch,
            resumed,
            pending,
        } if verbose => eprintln!(
            "outboxd sub: connected as {client} (epoch {epoch}, {}, {pending} pending)",
            if *resumed { "resumed" } else { "not resumed" }
        ),
        Event::Disconnected { reason } if verbose => {
            eprintln!("outboxd sub: disconnected: {reason}; reconnecting")
        }
        Event::ConnectFailed { error, retry_in } if verbose => {
            eprintln!("outboxd sub: {error}; retrying in {retry_in:?}")
        }
        _ => {}
    }
    None
}

#[derive(Serialize)]
struct JsonLine<'a> {
    epoch: &'a str,
    seq: u64,
    id: &'a str,
    ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    redelivered: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_b64: Option<String>,
}

fn format_line(m: &Message, json: bool) -> String {
    let compact = m.payload.compact_json_text();
    let b64 = m
        .payload
        .as_binary()
        .map(|b| base64::engine::general_purpose::STANDARD.encode(b));
    if json {
        let line = JsonLine {
            epoch: m.epoch.as_str(),
            seq: m.seq,
            id: &m.id,
            ts: m.ts,
            from: m.from.as_deref(),
            topic: m.topic.as_deref(),
            redelivered: m.redelivered,
            payload: compact.and_then(|t| RawValue::from_string(t).ok()),
            payload_b64: b64,
        };
        return serde_json::to_string(&line).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    }
    let mut out = format!("#{}", m.seq);
    if let Some(from) = &m.from {
        out.push_str(&format!(" from {from}"));
    }
    if let Some(topic) = &m.topic {
        out.push_str(&format!(" on {topic}"));
    }
    if m.redelivered {
        out.push_str(" (redelivered)");
    }
    out.push_str(": ");
    match (compact, b64) {
        (Some(text), _) => out.push_str(&text),
        (None, Some(b)) => {
            out.push_str("base64:");
            out.push_str(&b);
        }
        (None, None) => {}
    }
    out
}

/// Writes and flushes one line, so the ack that follows never acks something unprinted.
fn print_line(m: &Message, json: bool) -> std::io::Result<()> {
    let line = format_line(m, json);
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without handlers the default action (exit) applies; nothing to wait for here.
        _ => std::future::pending::<()>().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Epoch;

    fn message(payload: Payload) -> Message {
        Message {
            epoch: Epoch::new("E"),
            seq: 3,
            id: "2a".into(),
            ts: 77,
            from: Some("alice".into()),
            topic: None,
            payload,
            redelivered: true,
        }
    }

    #[test]
    fn lines_that_parse_as_json_are_json_and_others_strings() {
        assert_eq!(
            payload_of(" {\"a\":1} ", false).as_json_text(),
            Some("{\"a\":1}")
        );
        assert_eq!(payload_of("42", false).as_json_text(), Some("42"));
        assert_eq!(
            payload_of("hello world", false).as_json_text(),
            Some("\"hello world\"")
        );
        assert_eq!(payload_of("42", true).as_json_text(), Some("\"42\""));
    }

    #[test]
    fn human_lines_name_seq_sender_and_keep_json_on_one_line() {
        let m = message(Payload::json_text("{\n \"b\": 1,\n \"a\": \"x y\"\n}").unwrap());
        assert_eq!(
            format_line(&m, false),
            r#"#3 from alice (redelivered): {"b":1,"a":"x y"}"#
        );
        let m = message(Payload::binary(vec![0, 255, 1]));
        assert_eq!(
            format_line(&m, false),
            "#3 from alice (redelivered): base64:AP8B"
        );
    }

    #[test]
    fn json_lines_carry_the_message_fields_and_the_payload_verbatim() {
        let m = message(Payload::json_text(r#"{"z":1,"a":2}"#).unwrap());
        assert_eq!(
            format_line(&m, true),
            r#"{"epoch":"E","seq":3,"id":"2a","ts":77,"from":"alice","redelivered":true,"payload":{"z":1,"a":2}}"#
        );
    }

    #[test]
    fn wait_fails_fast_by_default_and_a_bare_wait_keeps_the_command_timeout() {
        let thirty = Some(Duration::from_secs(30));
        assert_eq!(first_connect(None, thirty), Ok((true, thirty)));
        assert_eq!(first_connect(Some(""), thirty), Ok((false, thirty)));
        assert_eq!(
            first_connect(Some("5m"), thirty),
            Ok((false, Some(Duration::from_secs(300))))
        );
        assert_eq!(
            first_connect(Some("7"), thirty),
            Ok((false, Some(Duration::from_secs(7))))
        );
        assert_eq!(first_connect(Some("0"), thirty), Ok((false, None)));
        assert!(first_connect(Some("soon"), thirty).is_err());
    }

    #[test]
    fn default_url_maps_an_unspecified_listen_address_to_loopback() {
        let url = |a: &str| ws_url(a.parse().unwrap(), false);
        assert_eq!(url("0.0.0.0:8080"), "ws://127.0.0.1:8080/ws");
        assert_eq!(url("[::]:9000"), "ws://[::1]:9000/ws");
        assert_eq!(url("10.1.2.3:80"), "ws://10.1.2.3:80/ws");
        assert_eq!(
            ws_url("0.0.0.0:8443".parse().unwrap(), true),
            "wss://127.0.0.1:8443/ws"
        );
    }
}
