//! The black-box harness: runs the real `outboxd` binary in a temporary data directory and
//! talks to it over real WebSockets, so the tests check exactly what a deployed broker does.
//!
//! - [`Broker`]: starts `outboxd serve` on `127.0.0.1:0`, waits for its ready line, and can
//!   SIGKILL, SIGTERM and restart it on the same data directory.
//! - [`Client`]: a WebSocket client that speaks the JSON protocol and fails loudly (with a
//!   timeout) instead of hanging or dropping frames it did not expect.
//! - [`Proxy`]: a TCP relay that can stop one direction or cut the connection, to play a
//!   peer that has gone silent or a network that died.

#![allow(dead_code)] // each test file uses a different part of the harness

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long the broker may take to print its ready line.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a test waits for a frame that must come. Generous: a slow, shared machine must not
/// turn into a flaky failure; a broken broker still fails, only later.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a test watches for a frame that must *not* come.
pub const QUIET: Duration = Duration::from_millis(400);

// ---------------------------------------------------------------------------------------------
// Broker process
// ---------------------------------------------------------------------------------------------

/// Settings for one broker: config overrides (passed as `OUTBOXD_<SECTION>__<KEY>`) and any
/// other environment variables (the fault hook).
#[derive(Debug, Clone, Default)]
pub struct Opts {
    env: BTreeMap<String, String>,
}

impl Opts {
    pub fn new() -> Self {
        Self::default()
    }

    /// A config override, e.g. `.set("heartbeat", "interval_ms", 200)`.
    pub fn set(mut self, section: &str, key: &str, value: impl ToString) -> Self {
        let name = format!(
            "OUTBOXD_{}__{}",
            section.to_ascii_uppercase(),
            key.to_ascii_uppercase()
        );
        self.env.insert(name, value.to_string());
        self
    }

    /// A raw environment variable for the broker process.
    pub fn env(mut self, name: &str, value: impl ToString) -> Self {
        self.env.insert(name.to_string(), value.to_string());
        self
    }

    /// Drops a raw environment variable (e.g. a fault hook before a restart).
    pub fn without_env(mut self, name: &str) -> Self {
        self.env.remove(name);
        self
    }
}

/// A running (or stopped) `outboxd` with its own temporary directory.
pub struct Broker {
    dir: tempfile::TempDir,
    opts: Opts,
    child: Option<Child>,
    /// `ws://127.0.0.1:PORT/ws` as printed by the broker.
    pub url: String,
    pub addr: SocketAddr,
    /// The admin API's address from the broker's `outboxd admin:` line; None when it is off.
    pub admin: Option<SocketAddr>,
    stderr: Arc<Mutex<String>>,
}

impl Broker {
    /// Starts a broker with fresh, empty storage.
    pub fn start(opts: Opts) -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("outboxd-test-")
            .tempdir()
            .expect("create a temp dir");
        let mut b = Broker {
            dir,
            opts,
            child: None,
            url: String::new(),
            addr: "127.0.0.1:0".parse().expect("addr"),
            admin: None,
            stderr: Arc::new(Mutex::new(String::new())),
        };
        b.spawn();
        b
    }

    /// The data directory, kept across restarts.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// What the broker wrote to stderr so far (all incarnations).
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Whether the broker's stderr shows `needle` within `wait`. Its stderr is read by a
    /// thread of its own, so a line the broker wrote a moment ago may not be here yet.
    pub fn stderr_shows(&self, needle: &str, wait: Duration) -> bool {
        let deadline = std::time::Instant::now() + wait;
        loop {
            if self.stderr().contains(needle) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("broker is not running").id()
    }

    fn spawn(&mut self) {
        blocking(|| self.spawn_blocking())
    }

    fn spawn_blocking(&mut self) {
        assert!(
            self.child.is_none(),
            "spawn while a broker is still running"
        );
        let mut cmd = serve_command(self.dir.path());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        // A free port for the admin API too, so parallel brokers never collide on 9090; a
        // test's own setting (Opts) overrides it.
        cmd.env("OUTBOXD_SERVER__ADMIN_LISTEN", "127.0.0.1:0");
        if backend_is_postgres() && !self.opts.env.contains_key("OUTBOXD_STORAGE__BACKEND") {
            // This run's brokers keep their outboxes in PostgreSQL, a database each, kept
            // across restarts like a data dir.
            let url = self
                .opts
                .env
                .entry("OUTBOXD_POSTGRES__URL".to_string())
                .or_insert_with(fresh_database)
                .clone();
            cmd.env("OUTBOXD_STORAGE__BACKEND", "postgres");
            cmd.env("OUTBOXD_POSTGRES__URL", url);
        }
        cmd.envs(&self.opts.env);
        let mut child = cmd.spawn().expect("spawn the outboxd binary");

        // Drain both pipes for the child's whole life so it never blocks on a full pipe.
        let stdout = child.stdout.take().expect("stdout piped");
        let stderr = child.stderr.take().expect("stderr piped");
        let (ready_tx, ready_rx) = std_mpsc::channel::<String>();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break, // EOF: the sender drops, the waiter sees it
                    Ok(_) => {
                        let _ = ready_tx.send(line.trim_end().to_string());
                    }
                }
            }
        });
        let sink = Arc::clone(&self.stderr);
        if let Ok(mut s) = sink.lock() {
            s.push_str(&format!("--- outboxd pid {} ---\n", child.id()));
        }
        std::thread::spawn(move || {
            let mut stderr = stderr;
            let mut buf = [0u8; 8192];
            loop {
                match stderr.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if let Ok(mut s) = sink.lock() {
                            s.push_str(&String::from_utf8_lossy(&buf[..n]));
                        }
                    }
                }
            }
        });

        let deadline = Instant::now() + START_TIMEOUT;
        let mut admin = None;
        let url = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match ready_rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("outboxd ready: ") {
                        break url.to_string();
                    }
                    // Printed before the ready line when the admin API is on.
                    // `https://` when the admin listener speaks TLS (`tls.admin`).
                    if let Some(a) = line
                        .strip_prefix("outboxd admin: http://")
                        .or_else(|| line.strip_prefix("outboxd admin: https://"))
                    {
                        admin = Some(
                            a.parse::<SocketAddr>()
                                .unwrap_or_else(|e| panic!("admin line address {a:?}: {e}")),
                        );
                        continue;
                    }
                    // Other stdout lines are not part of the contract; keep them for diagnosis.
                    if let Ok(mut s) = self.stderr.lock() {
                        s.push_str(&format!("[stdout] {line}\n"));
                    }
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().ok();
                    std::thread::sleep(Duration::from_millis(100)); // let stderr drain
                    panic!(
                        "outboxd exited before it was ready (status {status:?}); stderr:\n{}",
                        self.stderr()
                    );
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    std::thread::sleep(Duration::from_millis(100));
                    panic!(
                        "outboxd printed no ready line within {START_TIMEOUT:?}; stderr:\n{}",
                        self.stderr()
                    );
                }
            }
        };
        // Keep draining stdout in the background (the thread above owns the pipe).
        std::thread::spawn(move || while ready_rx.recv().is_ok() {});

        let hostport = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("wss://")) // TLS on
            .and_then(|r| r.strip_suffix("/ws"))
            .unwrap_or_else(|| panic!("ready line has an unexpected url: {url:?}"));
        self.addr = hostport
            .parse()
            .unwrap_or_else(|e| panic!("ready line address {hostport:?}: {e}"));
        self.url = url;
        self.admin = admin;
        self.child = Some(child);
    }

    /// SIGKILL and reap: a crash, nothing gets to run.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // std's kill is SIGKILL on Unix
            blocking(|| {
                let _ = child.wait();
            });
        }
    }

    /// Sends SIGTERM without waiting; pair with [`Broker::wait_exit`].
    pub fn send_sigterm(&self) {
        let pid = self.pid();
        let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(
            rc,
            0,
            "kill(SIGTERM) failed: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Waits for the broker to exit on its own; SIGKILLs it and panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        blocking(|| self.wait_exit_blocking(timeout))
    }

    fn wait_exit_blocking(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("broker is not running");
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "outboxd did not exit within {timeout:?}; stderr:\n{}",
                        self.stderr()
                    );
                }
                Err(e) => panic!("waiting for outboxd: {e}"),
            }
        }
    }

    /// SIGTERM, then waits (up to 20 s) for the exit status.
    pub fn sigterm(&mut self) -> ExitStatus {
        self.send_sigterm();
        self.wait_exit(Duration::from_secs(20))
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Starts the broker again on the same data directory with the same settings (the port
    /// changes). A broker still running is SIGKILLed first: callers that mean a graceful
    /// restart call [`Broker::sigterm`] before.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Like [`Broker::restart`] with new settings (e.g. without a fault hook).
    pub fn restart_with(&mut self, opts: Opts) {
        self.kill9();
        // The same store: on PostgreSQL, the same database.
        let db = self.opts.env.get("OUTBOXD_POSTGRES__URL").cloned();
        self.opts = opts;
        if let Some(db) = db {
            self.opts
                .env
                .entry("OUTBOXD_POSTGRES__URL".to_string())
                .or_insert(db);
        }
        self.spawn();
    }

    /// Connects a client and says hello without resume; returns the client and its welcome.
    pub async fn client(&self, client_id: &str) -> (Client, Value) {
        let mut c = Client::connect(&self.url).await;
        let w = c.hello(client_id, None).await;
        (c, w)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            // The broker's side of the story, for the failed test's output.
            let log = self.stderr();
            let mut start = log.len().saturating_sub(8000);
            while !log.is_char_boundary(start) {
                start += 1;
            }
            eprintln!("--- outboxd stderr (tail) ---\n{}", &log[start..]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------------------------

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What arrived on a connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A text frame, parsed as JSON.
    Frame(Value),
    /// A close frame: its code (None when the frame had no payload) and reason.
    Close(Option<u16>, String),
    /// The connection ended without a close frame (or failed).
    Ended(String),
    /// Nothing within the wait.
    Timeout,
}

pub struct Client {
    ws: Ws,
    closed: bool,
}

impl Client {
    /// Opens a WebSocket to `url`; panics if the upgrade fails.
    pub async fn connect(url: &str) -> Client {
        // Large limits on the client side: the tests decide what is too big, not the client.
        let cfg = WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        let (ws, _resp) = tokio::time::timeout(
            RECV_TIMEOUT,
            tokio_tungstenite::connect_async_with_config(url, Some(cfg), true),
        )
        .await
        .unwrap_or_else(|_| panic!("WebSocket connect to {url} timed out"))
        .unwrap_or_else(|e| panic!("WebSocket connect to {url}: {e}"));
        Client { ws, closed: false }
    }

    /// Opens a WebSocket to `url`; None when the broker cannot be reached (for tests where
    /// brokers die).
    pub async fn try_connect(url: &str) -> Option<Client> {
        let attempt = tokio_tungstenite::connect_async(url);
        match tokio::time::timeout(RECV_TIMEOUT, attempt).await {
            Ok(Ok((ws, _))) => Some(Client { ws, closed: false }),
            _ => None,
        }
    }

    /// The next frame other than a ping (pings answered) within `wait`; None when the
    /// connection ended, closed or stayed silent.
    pub async fn try_frame(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Event::Frame(v) if v["type"] == "ping" => {
                    let pong = Message::text(json!({"type": "pong"}).to_string());
                    if self.ws.send(pong).await.is_err() {
                        return None;
                    }
                }
                Event::Frame(v) => return Some(v),
                _ => return None,
            }
        }
    }

    /// Says hello as `client_id`; None when the connection fails or refuses.
    pub async fn try_hello(&mut self, client_id: &str) -> Option<Value> {
        self.try_hello_resume(client_id, None).await
    }

    /// Says hello, resuming from `(epoch, last_seq)` when given; None when the connection
    /// fails or answers with anything but a welcome.
    pub async fn try_hello_resume(
        &mut self,
        client_id: &str,
        resume: Option<(&str, u64)>,
    ) -> Option<Value> {
        let mut frame = json!({"type": "hello", "client_id": client_id});
        if let Some((epoch, last_seq)) = resume {
            frame["resume"] = json!({"epoch": epoch, "last_seq": last_seq});
        }
        self.ws.send(Message::text(frame.to_string())).await.ok()?;
        self.try_frame(RECV_TIMEOUT)
            .await
            .filter(|w| w["type"] == "welcome")
    }

    /// Sends a frame with a `ref` and returns the `ok` or `error` answering it; None when the
    /// connection fails first.
    pub async fn try_request(&mut self, frame: Value) -> Option<Value> {
        let reference = frame["ref"].clone();
        self.ws.send(Message::text(frame.to_string())).await.ok()?;
        loop {
            let a = self.try_frame(RECV_TIMEOUT * 3).await?;
            if a["ref"] == reference {
                return Some(a);
            }
        }
    }

    /// The next `msg` within `wait`; None when the connection ended or nothing came.
    pub async fn try_recv_msg(&mut self, wait: Duration) -> Option<Value> {
        loop {
            let v = self.try_frame(wait).await?;
            if v["type"] == "msg" {
                return Some(v);
            }
        }
    }

    /// Opens a WebSocket over TLS (`wss://`) with this rustls client config; panics if the
    /// TLS handshake or the upgrade fails.
    pub async fn connect_tls(url: &str, tls: Arc<tokio_rustls::rustls::ClientConfig>) -> Client {
        Self::try_connect_tls(url, tls)
            .await
            .unwrap_or_else(|e| panic!("WebSocket connect to {url}: {e}"))
    }

    /// As [`Client::connect_tls`], returning the failure instead of panicking.
    pub async fn try_connect_tls(
        url: &str,
        tls: Arc<tokio_rustls::rustls::ClientConfig>,
    ) -> Result<Client, String> {
        let cfg = WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        let (ws, _resp) = tokio::time::timeout(
            RECV_TIMEOUT,
            tokio_tungstenite::connect_async_tls_with_config(
                url,
                Some(cfg),
                true,
                Some(tokio_tungstenite::Connector::Rustls(tls)),
            ),
        )
        .await
        .map_err(|_| format!("WebSocket connect to {url} timed out"))?
        .map_err(|e| e.to_string())?;
        Ok(Client { ws, closed: false })
    }

    /// The DER of the certificate the broker presented; None on a plain connection.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        match self.ws.get_ref() {
            MaybeTlsStream::Rustls(tls) => tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec()),
            _ => None,
        }
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text.to_string()))
            .await
            .unwrap_or_else(|e| panic!("send {text:.200}: {e}"));
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws
            .send(Message::binary(bytes))
            .await
            .unwrap_or_else(|e| panic!("send binary frame: {e}"));
    }

    /// The next event within `wait`. WebSocket-level pings/pongs are handled by the library
    /// and not reported; protocol-level `{"type":"ping"}` frames are reported like any frame.
    pub async fn next_event(&mut self, wait: Duration) -> Event {
        if self.closed {
            return Event::Ended("connection already closed".into());
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Event::Timeout,
                Ok(n) => n,
            };
            match next {
                None => {
                    self.closed = true;
                    return Event::Ended("stream ended".into());
                }
                Some(Err(e)) => {
                    self.closed = true;
                    return Event::Ended(e.to_string());
                }
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("broker sent a non-JSON text frame {t:?}: {e}"));
                    assert!(v.is_object(), "broker sent a non-object frame: {v}");
                    return Event::Frame(v);
                }
                Some(Ok(Message::Binary(b))) => {
                    panic!(
                        "broker sent a binary frame ({} bytes); the protocol is text only",
                        b.len()
                    )
                }
                Some(Ok(Message::Close(frame))) => {
                    // The library answers the close; the next read reports the end.
                    return match frame {
                        Some(f) => Event::Close(Some(u16::from(f.code)), f.reason.to_string()),
                        None => Event::Close(None, String::new()),
                    };
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            }
        }
    }

    /// The next JSON frame, pings included. Panics on close, end or timeout.
    pub async fn recv(&mut self) -> Value {
        self.recv_within(RECV_TIMEOUT).await
    }

    pub async fn recv_within(&mut self, wait: Duration) -> Value {
        match self.next_event(wait).await {
            Event::Frame(v) => v,
            other => panic!("expected a frame within {wait:?}, got {other:?}"),
        }
    }

    /// The next JSON frame that is not a broker `ping`; every skipped ping is answered with
    /// `pong`, as a live client does.
    pub async fn recv_skip_pings(&mut self) -> Value {
        let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Event::Frame(v) if v["type"] == "ping" => self.send(json!({"type": "pong"})).await,
                Event::Frame(v) => return v,
                other => panic!("expected a frame within {RECV_TIMEOUT:?}, got {other:?}"),
            }
        }
    }

    /// Says hello (optionally resuming from `(epoch, last_seq)`) and returns the `welcome`.
    pub async fn hello(&mut self, client_id: &str, resume: Option<(&str, u64)>) -> Value {
        let mut frame = json!({"type": "hello", "client_id": client_id});
        if let Some((epoch, last_seq)) = resume {
            frame["resume"] = json!({"epoch": epoch, "last_seq": last_seq});
        }
        self.send(frame).await;
        let w = self.recv_skip_pings().await;
        assert_eq!(w["type"], "welcome", "hello as {client_id:?} got {w}");
        assert_eq!(
            w["client_id"], client_id,
            "welcome names another client: {w}"
        );
        w
    }

    /// Waits for the close frame and asserts its code; returns the frames that came before it
    /// (pings included) so a test can check them.
    pub async fn expect_close(&mut self, code: u16) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Event::Frame(v) => before.push(v),
                Event::Close(got, reason) => {
                    assert_eq!(
                        got,
                        Some(code),
                        "expected close {code}, got close {got:?} ({reason:?}) after {before:?}"
                    );
                    // Finish the closing handshake so the broker is not left waiting.
                    let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.next()).await;
                    self.closed = true;
                    return before;
                }
                other => panic!("expected close {code}, got {other:?} after {before:?}"),
            }
        }
    }

    /// Sends a frame that carries a `ref` and waits for the `ok` or `error` with that ref.
    /// Broker pings in between are answered; any other frame fails the test.
    pub async fn request(&mut self, frame: Value) -> Value {
        let reference = frame["ref"].clone();
        assert!(!reference.is_null(), "request without a ref: {frame}");
        self.send(frame.clone()).await;
        let answer = self.recv_skip_pings().await;
        assert!(
            (answer["type"] == "ok" || answer["type"] == "error") && answer["ref"] == reference,
            "expected ok/error for ref {reference} ({frame}), got {answer}"
        );
        answer
    }

    /// Publishes a JSON payload and returns the `ok` or `error` answer.
    pub async fn publish(&mut self, reference: &str, to: &str, payload: Value) -> Value {
        self.request(json!({"type": "publish", "ref": reference, "to": to, "payload": payload}))
            .await
    }

    /// Publishes and asserts the answer is `ok`.
    pub async fn publish_ok(&mut self, reference: &str, to: &str, payload: Value) -> Value {
        let a = self.publish(reference, to, payload).await;
        assert_eq!(a["type"], "ok", "publish {reference} to {to} refused: {a}");
        a
    }

    pub async fn subscribe(&mut self, reference: &str, topic: &str) -> Value {
        self.request(json!({"type": "subscribe", "ref": reference, "topic": topic}))
            .await
    }

    pub async fn unsubscribe(&mut self, reference: &str, topic: &str) -> Value {
        self.request(json!({"type": "unsubscribe", "ref": reference, "topic": topic}))
            .await
    }

    /// The next `msg` frame (pings answered); any other frame fails the test.
    pub async fn recv_msg(&mut self) -> Value {
        let v = self.recv_skip_pings().await;
        assert_eq!(v["type"], "msg", "expected a msg, got {v}");
        v
    }

    pub async fn ack(&mut self, seq: u64) {
        self.send(json!({"type": "ack", "seq": seq})).await;
    }

    pub async fn ack_upto(&mut self, upto: u64) {
        self.send(json!({"type": "ack", "upto": upto})).await;
    }

    /// A protocol ping/pong round trip: since the broker handles one connection's frames in
    /// order, everything sent before (acks included) has been processed when the pong comes.
    /// Returns the frames (other than broker pings) that arrived before the pong.
    pub async fn sync(&mut self) -> Vec<Value> {
        self.send(json!({"type": "ping"})).await;
        let mut before = Vec::new();
        loop {
            let v = self.recv_skip_pings().await;
            if v["type"] == "pong" {
                return before;
            }
            before.push(v);
        }
    }

    /// Asserts that no frame other than a broker ping arrives within `wait` (pings are
    /// answered) and that the connection stays open.
    pub async fn expect_quiet(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Event::Timeout => return,
                Event::Frame(v) if v["type"] == "ping" => self.send(json!({"type": "pong"})).await,
                other => panic!("expected nothing for {wait:?}, got {other:?}"),
            }
        }
    }

    /// Keeps the connection alive for `wait`: answers every broker ping, and fails on any
    /// other frame or a close. Returns how many pings were answered.
    pub async fn stay_responsive(&mut self, wait: Duration) -> usize {
        self.stay_responsive_until(tokio::time::sleep(wait)).await
    }

    /// Like [`Client::stay_responsive`], until `until` resolves.
    pub async fn stay_responsive_until(
        &mut self,
        until: impl std::future::Future<Output = ()>,
    ) -> usize {
        let mut until = std::pin::pin!(until);
        let mut pings = 0;
        loop {
            let event = tokio::select! {
                _ = &mut until => return pings,
                // Cancel-safe: next_event only polls the stream and a timer.
                e = self.next_event(RECV_TIMEOUT) => e,
            };
            match event {
                Event::Timeout => {}
                Event::Frame(v) if v["type"] == "ping" => {
                    pings += 1;
                    self.send(json!({"type": "pong"})).await;
                }
                other => panic!("a responsive client got {other:?}"),
            }
        }
    }

    /// Receives `n` messages (pings answered, any other frame fails the test).
    pub async fn recv_msgs(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.recv_msg().await);
        }
        out
    }

    /// Closes the connection with 1000 and waits for the broker's answer.
    pub async fn close(mut self) {
        if self.closed {
            return;
        }
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }

    /// The raw stream, for tests that need to split it (pipelining).
    pub fn into_inner(self) -> Ws {
        self.ws
    }
}

/// `seq` of a `msg` frame.
/// `outboxd serve` on 127.0.0.1:0 with its data in `dir/data`, run in `dir` (no config.toml
/// there: built-in defaults plus the caller's overrides), its output piped, and no `OUTBOXD_`
/// setting inherited from the developer's shell.
pub fn serve_command(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outboxd"));
    cmd.arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data")
        .arg(dir.join("data"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("OUTBOXD_") {
            cmd.env_remove(&k);
        }
    }
    cmd
}

pub fn seq(msg: &Value) -> u64 {
    msg["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("msg without a u64 seq: {msg}"))
}

/// The `seq`s of a list of `msg` frames.
pub fn seqs(msgs: &[Value]) -> Vec<u64> {
    msgs.iter().map(seq).collect()
}

/// `true` when the frame says it may have been sent before.
pub fn redelivered(msg: &Value) -> bool {
    msg.get("redelivered")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Asserts an `error` frame with this code.
pub fn assert_error(frame: &Value, code: &str) {
    assert_eq!(frame["type"], "error", "expected error {code}, got {frame}");
    assert_eq!(
        frame["code"], code,
        "expected error code {code}, got {frame}"
    );
    assert!(
        frame["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without a human message: {frame}"
    );
}

/// Runs blocking process work (spawn, wait) without stalling the async tests' runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

// ---------------------------------------------------------------------------------------------
// TCP proxy
// ---------------------------------------------------------------------------------------------

/// A TCP relay in front of the broker. Every connection through it obeys the same switches:
/// a direction can be paused (bytes are held back, not lost or forwarded) and every connection
/// can be cut (both sockets dropped, no close frame).
pub struct Proxy {
    pub addr: SocketAddr,
    /// `ws://ADDR/ws` through the proxy.
    pub url: String,
    to_broker: watch::Sender<bool>,
    to_client: watch::Sender<bool>,
    cut: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and relays each accepted connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let (to_broker, _) = watch::channel(true);
        let (to_client, _) = watch::channel(true);
        let (cut, _) = watch::channel(false);
        let (tb, tc, ct) = (to_broker.clone(), to_client.clone(), cut.clone());
        let accept = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let _ = down.set_nodelay(true);
                let _ = up.set_nodelay(true);
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(pump(dr, uw, tb.subscribe(), ct.subscribe()));
                tokio::spawn(pump(ur, dw, tc.subscribe(), ct.subscribe()));
            }
        });
        Proxy {
            addr,
            url: format!("ws://{addr}/ws"),
            to_broker,
            to_client,
            cut,
            accept,
        }
    }

    /// Stops relaying client -> broker: the broker hears nothing more from the client.
    pub fn pause_to_broker(&self) {
        self.to_broker.send_replace(false);
    }

    /// Stops relaying broker -> client: the client hears nothing more from the broker.
    pub fn pause_to_client(&self) {
        self.to_client.send_replace(false);
    }

    pub fn resume_both(&self) {
        self.to_broker.send_replace(true);
        self.to_client.send_replace(true);
    }

    /// Drops every relayed connection at once, without a close frame.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut.send_replace(true);
        self.accept.abort();
    }
}

/// Copies bytes one way while `on` is true; bytes read while paused are held until resumed.
/// Ends (dropping both halves) when either side ends or when `cut` is set.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut on: watch::Receiver<bool>,
    mut cut: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            _ = is_set(&mut cut) => return,
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => { let _ = to.shutdown().await; return; }
                Ok(n) => n,
            },
        };
        // Checked after the read, so nothing read after a pause slips through.
        tokio::select! {
            _ = is_set(&mut cut) => return,
            _ = is_set(&mut on) => {}
        }
        tokio::select! {
            _ = is_set(&mut cut) => return,
            r = to.write_all(&buf[..n]) => if r.is_err() { return },
        }
    }
}

/// Resolves once the switch is true; never, if its sender is gone while it is false.
async fn is_set(switch: &mut watch::Receiver<bool>) {
    if switch.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Admin HTTP client
// ---------------------------------------------------------------------------------------------

/// An answer from the admin API.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The body as JSON; panics (showing the body) when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "admin answer {} is not JSON ({e}): {:.500}",
                self.status, self.body
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Asserts an error answer: this status, and `{"error":{"code":CODE,"message":...}}`.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            self.status, status,
            "expected {status} {code}, got {self:?}"
        );
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "expected error code {code}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "error without a message: {v}"
        );
    }
}

/// Sends one HTTP/1.1 request (`Connection: close`) and reads the whole answer. A tiny client
/// on purpose: the tests need nothing more, and it shows exactly what goes over the wire.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> HttpResponse {
    let exchange = async {
        let mut tcp = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect to the admin API at {addr}: {e}"));
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        if let Some(t) = token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        if let Some(b) = body {
            req.push_str(b);
        }
        // A server may answer (e.g. 413) and close before it has read a large body: keep what
        // it sent even when the write or the end of the read fails with a reset.
        let sent = tcp.write_all(req.as_bytes()).await;
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
        if raw.is_empty() {
            panic!("{method} {path}: no answer (send: {sent:?})");
        }
        raw
    };
    let raw = tokio::time::timeout(RECV_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within {RECV_TIMEOUT:?}"));
    parse_http(&raw).unwrap_or_else(|| {
        panic!(
            "{method} {path}: not an HTTP answer: {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

/// Parses a raw HTTP/1.1 answer (for tests that bring their own transport, e.g. TLS).
pub fn parse_http(raw: &[u8]) -> Option<HttpResponse> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut rest = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let body = if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut out = Vec::new();
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n")?;
            let size_text = std::str::from_utf8(&rest[..eol]).ok()?;
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            rest = &rest[eol + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size)?);
            rest = rest.get(size + 2..)?;
        }
        out
    } else if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        rest.get(..len)?.to_vec()
    } else {
        rest.to_vec()
    };
    Some(HttpResponse {
        status,
        headers,
        body: String::from_utf8(body).ok()?,
    })
}

/// Parses the Prometheus text exposition into `name{labels}` -> value, checking that every
/// sample line has that shape.
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("metrics line without a value: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|e| panic!("metrics line {line:?}: value: {e}"));
        out.insert(key.to_string(), value);
    }
    out
}

impl Broker {
    /// The admin API's address; panics when the broker runs without one.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .unwrap_or_else(|| panic!("this broker printed no `outboxd admin:` line"))
    }

    pub async fn admin_get(&self, path: &str) -> HttpResponse {
        http(self.admin_addr(), "GET", path, None, None).await
    }

    pub async fn admin_post(&self, path: &str, body: Value) -> HttpResponse {
        http(
            self.admin_addr(),
            "POST",
            path,
            None,
            Some(&body.to_string()),
        )
        .await
    }

    pub async fn admin_delete(&self, path: &str) -> HttpResponse {
        http(self.admin_addr(), "DELETE", path, None, None).await
    }

    /// Scrapes `/metrics` (no token) and parses it.
    pub async fn metrics(&self) -> BTreeMap<String, f64> {
        let r = self.admin_get("/metrics").await;
        assert_eq!(r.status, 200, "GET /metrics: {r:?}");
        parse_metrics(&r.body)
    }

    /// Waits until this broker has counted at least `n` acks and holds no write that is not
    /// durable (acks are held back to share a batch): from then on they hold after a kill -9,
    /// and another broker on the same database sees them. Panics after 30 s.
    pub async fn until_acks_durable(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut counted = false;
        loop {
            let m = self.metrics().await;
            counted = counted || m["outboxd_acked_total"] >= n as f64;
            if counted && m["outboxd_writes_not_durable"] == 0.0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{n} acks were not made durable within 30 s: acked {}, writes not durable {}",
                m["outboxd_acked_total"],
                m["outboxd_writes_not_durable"]
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Relay: a TCP proxy whose failures hit only the connections open at the time
// ---------------------------------------------------------------------------------------------

/// A TCP relay for client tests. Unlike [`Proxy`], its switches act on the connections open at
/// the moment they are flipped, and every later connection is relayed normally: a network that
/// fails once and recovers, which a reconnecting client must ride through. Its upstream can be
/// moved, so a client keeps one URL while the broker restarts on a new port.
pub struct Relay {
    pub addr: SocketAddr,
    /// `ws://ADDR/ws` through the relay.
    pub url: String,
    upstream: Arc<Mutex<SocketAddr>>,
    /// Connections numbered below this are dropped (no close frame).
    cut_below: watch::Sender<u64>,
    /// Connections numbered below this relay nothing more toward the client.
    mute_down_below: watch::Sender<u64>,
    /// Connections numbered below this relay nothing more toward the broker.
    mute_up_below: watch::Sender<u64>,
    accepted: Arc<std::sync::atomic::AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Listens on `127.0.0.1:0` and relays each accepted connection to the current upstream.
    pub async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("relay bind");
        let addr = listener.local_addr().expect("relay addr");
        let upstream = Arc::new(Mutex::new(upstream));
        let (cut_below, _) = watch::channel(0u64);
        let (mute_down_below, _) = watch::channel(0u64);
        let (mute_up_below, _) = watch::channel(0u64);
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (up, cut, down_mute, up_mute, count) = (
            Arc::clone(&upstream),
            cut_below.clone(),
            mute_down_below.clone(),
            mute_up_below.clone(),
            Arc::clone(&accepted),
        );
        let accept = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let target = *up.lock().expect("relay upstream lock");
                // Broker down: drop the client's connection, as a refused connect would.
                let Ok(upc) = TcpStream::connect(target).await else {
                    continue;
                };
                let _ = down.set_nodelay(true);
                let _ = upc.set_nodelay(true);
                let (dr, dw) = down.into_split();
                let (ur, uw) = upc.into_split();
                tokio::spawn(relay_pump(dr, uw, n, cut.subscribe(), up_mute.subscribe()));
                tokio::spawn(relay_pump(
                    ur,
                    dw,
                    n,
                    cut.subscribe(),
                    down_mute.subscribe(),
                ));
            }
        });
        Relay {
            addr,
            url: format!("ws://{addr}/ws"),
            upstream,
            cut_below,
            mute_down_below,
            mute_up_below,
            accepted,
            accept,
        }
    }

    /// Later connections go to `addr` (e.g. the broker after a restart).
    pub fn set_upstream(&self, addr: SocketAddr) {
        *self.upstream.lock().expect("relay upstream lock") = addr;
    }

    /// How many connections the relay has accepted so far.
    pub fn connections(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Drops every open connection at once, without a close frame; new ones are relayed.
    pub fn cut_all(&self) {
        self.cut_below.send_replace(self.connections());
    }

    /// The open connections carry nothing more from the broker to the client (the client's
    /// frames still arrive): the broker's answers and pings vanish.
    pub fn silence_to_client(&self) {
        self.mute_down_below.send_replace(self.connections());
    }

    /// The open connections carry nothing more either way, but stay open: a dead peer that
    /// never closes. New connections work.
    pub fn go_silent(&self) {
        let n = self.connections();
        self.mute_down_below.send_replace(n);
        self.mute_up_below.send_replace(n);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut_below.send_replace(u64::MAX);
        self.accept.abort();
    }
}

/// Copies bytes one way for connection `n` until either side ends or the connection is cut;
/// bytes read while it is muted are dropped, as a dead link drops them.
async fn relay_pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    n: u64,
    mut cut_below: watch::Receiver<u64>,
    mute_below: watch::Receiver<u64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            _ = above(&mut cut_below, n) => return,
            r = from.read(&mut buf) => r,
        };
        let len = match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(len) => len,
        };
        if *mute_below.borrow() > n {
            continue;
        }
        tokio::select! {
            _ = above(&mut cut_below, n) => return,
            r = to.write_all(&buf[..len]) => if r.is_err() { return },
        }
    }
}

/// Resolves once the switch exceeds `n`; never, if its sender is gone.
async fn above(switch: &mut watch::Receiver<u64>, n: u64) {
    if switch.wait_for(|v| *v > n).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// A fresh self-signed certificate for 127.0.0.1 and localhost, written as PEM files in a temp
/// dir that lives as long as this value; `opts()` points a broker's `[tls]` at them.
pub struct TlsFiles {
    _dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    pub fn new() -> TlsFiles {
        let c = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
        ])
        .expect("generate a test certificate");
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, c.cert.pem()).expect("write cert");
        std::fs::write(&key, c.signing_key.serialize_pem()).expect("write key");
        TlsFiles {
            _dir: dir,
            cert,
            key,
        }
    }

    /// Broker options with TLS on these files.
    pub fn opts(&self) -> Opts {
        Opts::new()
            .set("tls", "cert_file", self.cert.display())
            .set("tls", "key_file", self.key.display())
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

/// True when this test run's brokers use the PostgreSQL backend: `OUTBOXD_TEST_BACKEND=postgres`
/// (`.ci/run` runs a named part of the suite that way). Brokers then get a fresh database each
/// on one PostgreSQL server the run starts for itself (see [`postgres`]).
pub fn backend_is_postgres() -> bool {
    std::env::var("OUTBOXD_TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

/// A PostgreSQL server (and, when asked for, a synchronous standby) started by
/// `tools/pg-cluster.sh` in a temporary directory.
pub struct PgCluster {
    pub dir: PathBuf,
    /// `postgres://postgres@127.0.0.1:PORT/postgres` of the primary.
    pub primary: String,
    /// The standby's URL, when there is one.
    pub standby: Option<String>,
    pub bindir: PathBuf,
}

fn pg_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/pg-cluster.sh")
}

/// True when PostgreSQL's programs are installed. Without them a PostgreSQL test skips, saying
/// so, unless `OUTBOXD_REQUIRE_POSTGRES` is set (CI installs them and sets it).
pub fn postgres_available() -> bool {
    let ok = Command::new(pg_script())
        .arg("check")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok || std::env::var_os("OUTBOXD_REQUIRE_POSTGRES").is_none(),
        "PostgreSQL's programs are missing (apt-get install postgresql), and \
         OUTBOXD_REQUIRE_POSTGRES is set"
    );
    if !ok {
        eprintln!("skipped: PostgreSQL's programs are missing (apt-get install postgresql)");
    }
    ok
}

impl PgCluster {
    /// Starts a primary (and a synchronous standby with `standby`). It is stopped, and its
    /// directory removed, when dropped, and also when the test process ends without dropping
    /// it (a watchdog waits for the process).
    pub fn start(standby: bool) -> PgCluster {
        let dir = tempfile::Builder::new()
            .prefix("outboxd-pg-")
            .tempdir()
            .expect("temp dir for PostgreSQL")
            .keep();
        let mut cmd = Command::new(pg_script());
        cmd.arg("start").arg(&dir);
        if standby {
            cmd.arg("--standby");
        }
        let out = cmd.output().expect("run tools/pg-cluster.sh");
        assert!(
            out.status.success(),
            "tools/pg-cluster.sh start failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let env = std::fs::read_to_string(dir.join("cluster.env")).expect("cluster.env");
        let get = |k: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_owned)
        };
        let cluster = PgCluster {
            primary: get("PRIMARY_URL").expect("PRIMARY_URL in cluster.env"),
            standby: get("STANDBY_URL"),
            bindir: PathBuf::from(get("PG_BINDIR").expect("PG_BINDIR in cluster.env")),
            dir,
        };
        // Stops the servers once this process is gone, however it ends.
        let watchdog = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {script} stop {dir} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            script = pg_script().display(),
            dir = cluster.dir.display(),
        );
        let _ = Command::new("setsid")
            .args(["bash", "-c", &watchdog])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        cluster
    }

    /// Runs `sql` on the primary's `postgres` database with psql; returns its output.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_on(&self.primary, sql)
    }

    /// Runs `sql` with psql against `url`; returns its output (unaligned, tuples only).
    pub fn psql_on(&self, url: &str, sql: &str) -> String {
        let out = Command::new(self.bindir.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                url,
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A new, empty database on the primary; its URL.
    pub fn database(&self) -> String {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("t{}_{n}", std::process::id());
        self.psql(&format!("CREATE DATABASE {name}"));
        self.url_of(&self.primary, &name)
    }

    /// `url` with its database replaced by `name`.
    pub fn url_of(&self, url: &str, name: &str) -> String {
        let base = url.rsplit_once('/').map(|(b, _)| b).unwrap_or(url);
        format!("{base}/{name}")
    }

    /// Runs `tools/pg-cluster.sh COMMAND DIR` (kill-primary, promote, restart, ...).
    pub fn run(&self, command: &str, args: &[&str]) {
        let out = Command::new(pg_script())
            .arg(command)
            .arg(&self.dir)
            .args(args)
            .output()
            .expect("run tools/pg-cluster.sh");
        assert!(
            out.status.success(),
            "tools/pg-cluster.sh {command} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = Command::new(pg_script())
            .arg("stop")
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The PostgreSQL server this test process shares among its brokers, started on first use.
pub fn postgres() -> &'static PgCluster {
    static CLUSTER: std::sync::OnceLock<PgCluster> = std::sync::OnceLock::new();
    CLUSTER.get_or_init(|| {
        assert!(
            postgres_available(),
            "OUTBOXD_TEST_BACKEND=postgres needs PostgreSQL's programs (apt-get install postgresql)"
        );
        PgCluster::start(false)
    })
}

/// A fresh database on the shared server; its URL.
pub fn fresh_database() -> String {
    postgres().database()
}

/// Options for a broker on the PostgreSQL database `url` (several brokers may share one).
pub fn on_postgres(url: &str) -> Opts {
    Opts::new()
        .set("storage", "backend", "postgres")
        .set("postgres", "url", url)
}
