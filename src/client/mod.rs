//! The Rust client: connects, resumes, deduplicates, acks, publishes idempotently, and
//! reconnects by itself, so an application gets every message once, in order.
//!
//! ```no_run
//! use outboxd::client::{Client, Incoming};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let mut client = Client::builder("ws://127.0.0.1:8080/ws", "bob").connect().await?;
//! client.publish("client:alice", serde_json::json!({"text": "hi"})).await?;
//! while let Some(item) = client.next().await {
//!     match item {
//!         Incoming::Delivery(d) => {
//!             println!("#{} {:?}", d.seq, d.payload.as_json_text());
//!             d.ack()?;
//!         }
//!         Incoming::Event(e) => eprintln!("{e:?}"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! What it does for the application (docs/clients.md has the full story):
//! - Deliveries come in seq order, each handed out once per epoch: duplicates the broker sends
//!   after a reconnect or an ack timeout are dropped by seq. A `welcome` with `resumed:false`
//!   starts the dedup state over (an [`Event::Reset`]).
//! - Every reconnect resumes from the saved [`Position`] (epoch + last acked seq). The position
//!   lives in a [`PositionStore`]: in memory by default, in a file with [`FilePositionStore`]
//!   so a restarted application resumes where it stopped.
//! - [`Client::publish`] keeps a publish until the broker confirms it, sending it again on
//!   every new connection with the same idempotency key (generated when none is given), so it
//!   is written once.
//! - Losses caused by retention are reported as [`Event::Missed`].
//! - A broker that sends nothing (not even its heartbeat ping) for `heartbeat_ms` plus a grace
//!   is declared dead; the client reconnects with exponential backoff, jittered and capped.
//!
//! Layout: `state` is the protocol state machine (no I/O, unit-tested), `driver` the one
//! background task that runs it, `position` the position stores, `payload` message bodies,
//! `backoff` reconnect delays, `tls` whom a `wss://` connection trusts.

mod backoff;
mod driver;
mod error;
mod payload;
mod position;
mod state;
pub(crate) mod tls;

use std::future::{Future, IntoFuture};
use std::ops::Deref;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub use error::{AckError, ClientError, RequestError, StopReason};
pub use payload::Payload;
pub use position::{
    Epoch, FilePositionStore, MemoryPositionStore, Position, PositionError, PositionStore,
};
pub use state::{token_subject, Event, Message, Published, RefusedRecipient};

use backoff::Backoff;
pub(crate) use backoff::Rng;
use driver::{Command, Driver, Settings, Wiring};
use state::{Machine, Reply, RequestKind};

use crate::model::{ClientId, Target, Topic};
use crate::protocol::{MAX_KEY_LEN, PAYLOAD_CEILING};

/// Settings for a [`Client`]; [`ClientBuilder::connect`] starts it.
pub struct ClientBuilder {
    url: String,
    client_id: String,
    token: Option<String>,
    backoff_initial: Duration,
    backoff_max: Duration,
    heartbeat_grace: Duration,
    handshake_timeout: Duration,
    connect_timeout: Option<Duration>,
    store: Option<Arc<dyn PositionStore>>,
    max_message_bytes: usize,
    write_queue_frames: usize,
    tls_ca_files: Vec<PathBuf>,
    token_source: Option<driver::TokenSource>,
    fail_fast: bool,
    transient: bool,
}

impl ClientBuilder {
    /// Where the client gets its token, for a broker that checks JWTs and ends a session when
    /// its token expires: called before every `hello`, and while a session is up, shortly
    /// before the current token's `exp` (a fifth of the time left, between 1 s and 60 s
    /// before it), to hand the broker a new one with a `refresh` frame. `None` keeps the token
    /// in use (asked again every second until it expires, then the client reconnects with
    /// what the source gives). A session that ends because its token expired is reconnected,
    /// not stopped. Called on the client's task: it must not block (hand out a token that
    /// another task keeps fresh).
    pub fn token_source(
        mut self,
        source: impl Fn() -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.token_source = Some(Arc::new(source));
        self
    }

    /// For a `wss://` URL: trust the certificates in this PEM file too (a private CA, or the
    /// broker's own self-signed certificate). The public certificate authorities are always
    /// trusted. May be given more than once.
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca_files.push(path.into());
        self
    }

    /// Sent in `hello` as `token` (for a broker that checks credentials).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Reconnect delays: about `initial` after the first failure, doubling up to `max`, each
    /// picked at random in the upper half of its range. Defaults: 100 ms, 10 s.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max;
        self
    }

    /// How much longer than the broker's `heartbeat_ms` the client waits, hearing nothing,
    /// before it declares the connection dead and reconnects. Default 5 s.
    pub fn heartbeat_grace(mut self, grace: Duration) -> Self {
        self.heartbeat_grace = grace;
        self
    }

    /// Limit for one connection attempt: TCP connect, WebSocket upgrade and the broker's
    /// `welcome`. Default 10 s.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// How long [`connect`](Self::connect) keeps trying to get a first session before it
    /// gives up; `None` waits for ever. Default 30 s. Later reconnects never give up.
    pub fn connect_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// When `true`, [`connect`](Self::connect) fails as soon as the first connection attempt
    /// fails (nothing listening, no handshake within the handshake timeout), with
    /// [`StopReason::Unreachable`] naming the URL and the cause, instead of retrying for up to
    /// the connect timeout. Reconnects after a first session are retried as always. Default
    /// `false`. A rejected TLS certificate is never retried, whatever this says.
    pub fn fail_fast(mut self, fail_fast: bool) -> Self {
        self.fail_fast = fail_fast;
        self
    }

    /// For a client that only publishes: when a connection ends and nothing is stored for
    /// this client (no message, no subscription, no loss to tell), the broker forgets it
    /// rather than keep an empty outbox. Default `false`.
    pub fn transient(mut self, transient: bool) -> Self {
        self.transient = transient;
        self
    }

    /// Where the position is kept (default: a fresh [`MemoryPositionStore`]).
    pub fn position_store(mut self, store: impl PositionStore) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// The largest frame accepted from the broker. Default 1 MiB (the broker's frames are
    /// bounded by its own `max_frame_bytes`, 128 KiB by default).
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// Frames queued for the socket before a send waits. Default 1024.
    pub fn write_queue_frames(mut self, frames: usize) -> Self {
        self.write_queue_frames = frames;
        self
    }

    /// Starts the client and waits for its first session (the broker's `welcome`), retrying
    /// with backoff for up to the connect timeout. Must run inside a tokio runtime.
    ///
    /// Errors: an invalid client id or URL, an unreadable saved position, no session within the
    /// connect timeout, or a refusal that retrying cannot fix (the client id refused, the
    /// upgrade refused with a 4xx).
    pub async fn connect(self) -> Result<Client, ClientError> {
        let client_id = ClientId::new(&self.client_id)?;
        let request = driver::ws_request(&self.url).map_err(|reason| ClientError::Url {
            url: self.url.clone(),
            reason,
        })?;
        let tls = match request.uri().scheme_str() {
            Some("wss") => Some(
                tls::client_config(&self.tls_ca_files)
                    .map_err(|e| ClientError::Tls(e.to_string()))?,
            ),
            _ => None,
        };
        let store: Arc<dyn PositionStore> = match self.store {
            Some(s) => s,
            None => Arc::new(MemoryPositionStore::new()),
        };
        let position = {
            let store = Arc::clone(&store);
            let id = client_id.clone();
            tokio::task::spawn_blocking(move || store.load(&id))
                .await
                .map_err(|e| PositionError::Other(format!("the load task failed: {e}")))??
        };
        let (commands_tx, commands) = mpsc::unbounded_channel();
        let (incoming_tx, incoming) = mpsc::unbounded_channel();
        let (first_tx, first) = oneshot::channel();
        let last_error = Arc::new(Mutex::new(String::from("none yet")));
        let max_message = self.max_message_bytes.max(1024);
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message))
            .read_buffer_size(16 * 1024)
            .write_buffer_size(64 * 1024)
            .max_write_buffer_size(max_message.saturating_mul(4).max(1 << 20));
        let settings = Settings {
            url: self.url,
            heartbeat_grace: self.heartbeat_grace,
            handshake_timeout: self.handshake_timeout,
            backoff: Backoff::new(self.backoff_initial, self.backoff_max),
            ws_config,
            write_queue_frames: self.write_queue_frames,
            tls,
            token_source: self.token_source,
            fail_fast: self.fail_fast,
        };
        let mut machine =
            Machine::new(client_id.clone(), self.token, position).transient(self.transient);
        if settings.token_source.is_some() {
            machine = machine.with_renewable_token();
        }
        let wiring = Wiring {
            commands,
            acker: commands_tx.downgrade(),
            incoming: incoming_tx,
            first: first_tx,
            last_error: Arc::clone(&last_error),
        };
        tokio::spawn(Driver::new(machine, settings, client_id.clone(), store, wiring).run());

        let first = match self.connect_timeout {
            Some(after) => match tokio::time::timeout(after, first).await {
                Ok(r) => r,
                Err(_) => {
                    let last = last_error.lock().map(|s| s.clone()).unwrap_or_default();
                    // Dropping the handles stops the driver.
                    return Err(ClientError::ConnectTimeout { after, last });
                }
            },
            None => first.await,
        };
        match first {
            Ok(Ok(())) => Ok(Client {
                publisher: Publisher {
                    shared: Arc::new(Shared {
                        commands: commands_tx,
                        next_id: AtomicU64::new(1),
                        key_prefix: Rng::seeded().key(),
                        next_key: AtomicU64::new(0),
                    }),
                },
                client_id,
                incoming,
            }),
            Ok(Err(reason)) => Err(ClientError::Stopped(reason)),
            Err(_) => Err(ClientError::Stopped(StopReason::Closed)),
        }
    }
}

/// What the client hands to the application, in order.
#[derive(Debug)]
pub enum Incoming {
    Delivery(Delivery),
    Event(Event),
}

/// A message for the application, with the means to ack it.
///
/// Ack it once it is processed: the ack deletes it from the outbox, and the position the
/// client resumes from moves only over acked messages. A delivery never acked stays in the
/// outbox and is handed out again by the next client with this id (not by this one).
#[derive(Debug)]
pub struct Delivery {
    message: Message,
    handle: AckHandle,
}

impl Delivery {
    /// Acks this message. Returns at once; the client saves its position and tells the broker
    /// in the background (acks made close together share one save). Acking twice is harmless.
    pub fn ack(&self) -> Result<(), AckError> {
        self.handle.ack()
    }

    /// A handle that acks this message later, from anywhere.
    pub fn ack_handle(&self) -> AckHandle {
        self.handle.clone()
    }

    pub fn message(&self) -> &Message {
        &self.message
    }

    pub fn into_message(self) -> Message {
        self.message
    }
}

impl Deref for Delivery {
    type Target = Message;

    fn deref(&self) -> &Message {
        &self.message
    }
}

/// Acks one delivery; cheap to clone and send to another task.
#[derive(Debug, Clone)]
pub struct AckHandle {
    commands: mpsc::WeakUnboundedSender<Command>,
    epoch: Epoch,
    generation: u64,
    seq: u64,
}

impl AckHandle {
    /// See [`Delivery::ack`]. Fails only when the client has stopped.
    pub fn ack(&self) -> Result<(), AckError> {
        let commands = self.commands.upgrade().ok_or(AckError)?;
        commands
            .send(Command::Ack {
                epoch: self.epoch.clone(),
                generation: self.generation,
                seq: self.seq,
            })
            .map_err(|_| AckError)
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }
}

struct Shared {
    commands: mpsc::UnboundedSender<Command>,
    next_id: AtomicU64,
    /// 128 random bits drawn once per client; generated keys add the request's number to them.
    /// Keys in order land at the end of the broker's key index instead of all over it.
    key_prefix: String,
    next_key: AtomicU64,
}

/// Publishes and subscribes on behalf of a [`Client`], from any task. Cheap to clone. The
/// client keeps running while a `Publisher` exists, even if the `Client` is dropped.
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
}

impl Publisher {
    /// Publishes `payload` to `to` (`"client:ID"` or `"topic:NAME"`). Await the returned
    /// request (after setting `.key()`, `.ttl()`, `.timeout()` if wanted).
    pub fn publish(&self, to: impl Into<String>, payload: impl Into<Payload>) -> PublishRequest {
        PublishRequest {
            publisher: self.clone(),
            to: to.into(),
            payload: payload.into(),
            key: None,
            ttl: None,
            timeout: None,
        }
    }

    /// Subscribes this client to `topic` (durable, idempotent); retried across reconnects
    /// until the broker confirms.
    pub async fn subscribe(&self, topic: &str) -> Result<(), RequestError> {
        let topic = Topic::new(topic).map_err(|e| RequestError::Invalid(e.to_string()))?;
        self.submit(RequestKind::Subscribe(topic), None, None)
            .await
            .map(|_| ())
    }

    /// Ends this client's subscription to `topic`; retried until confirmed.
    pub async fn unsubscribe(&self, topic: &str) -> Result<(), RequestError> {
        let topic = Topic::new(topic).map_err(|e| RequestError::Invalid(e.to_string()))?;
        self.submit(RequestKind::Unsubscribe(topic), None, None)
            .await
            .map(|_| ())
    }

    fn new_key(&self) -> String {
        let n = self.shared.next_key.fetch_add(1, Ordering::Relaxed);
        let prefix = &self.shared.key_prefix;
        // Built at its final size: one allocation per publish, no formatter.
        let mut key = String::with_capacity(prefix.len() + 17);
        key.push_str(prefix);
        key.push('-');
        push_hex16(&mut key, n);
        key
    }

    /// Queues a request now (so requests started one after the other go out in that order)
    /// and returns the wait for its answer. Dropping the wait, or its timeout, withdraws the
    /// request (one already sent may still take effect).
    fn submit(
        &self,
        kind: RequestKind,
        timeout: Option<Duration>,
        key: Option<String>,
    ) -> impl Future<Output = Result<Reply, RequestError>> + Send + 'static {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let queued = self
            .shared
            .commands
            .send(Command::Request { id, kind, reply })
            .is_ok();
        let guard = CancelOnDrop {
            commands: self.shared.commands.clone(),
            id,
            armed: queued,
        };
        async move {
            let mut guard = guard;
            if !queued {
                return Err(RequestError::Stopped(StopReason::Closed));
            }
            let answer = match timeout {
                Some(after) => match tokio::time::timeout(after, answer).await {
                    Ok(a) => a,
                    Err(_) => return Err(RequestError::Timeout { after, key }),
                },
                None => answer.await,
            };
            guard.armed = false;
            answer.unwrap_or(Err(RequestError::Stopped(StopReason::Closed)))
        }
    }
}

/// Appends `n` to `s` as 16 lowercase hex digits (what `{:016x}` writes).
fn push_hex16(s: &mut String, n: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for shift in (0..16).rev() {
        s.push(char::from(DIGITS[((n >> (shift * 4)) & 0xf) as usize]));
    }
}

/// Withdraws a request whose caller stopped waiting.
struct CancelOnDrop {
    commands: mpsc::UnboundedSender<Command>,
    id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.commands.send(Command::Cancel(self.id));
        }
    }
}

/// A publish being prepared; await it (or call [`send`](Self::send)) to publish.
#[must_use = "a publish does nothing until it is awaited"]
pub struct PublishRequest {
    publisher: Publisher,
    to: String,
    payload: Payload,
    key: Option<String>,
    ttl: Option<Duration>,
    timeout: Option<Duration>,
}

impl PublishRequest {
    /// The idempotency key (1 to 256 bytes). The broker writes a key at most once per dedup
    /// window and publisher id, so reusing it after a crash or in a retry is safe. Without
    /// one the client generates a unique key (random per client, then numbered), which covers
    /// its own retries.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// How long the recipients' copies live unacked before retention removes them.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Give up waiting after `timeout` (default: wait until confirmed or the client stops).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Publishes and waits for the broker's `ok`: the message is durable in every recipient's
    /// outbox. Retried on every new connection with the same key until answered.
    ///
    /// Errors: [`RequestError::Invalid`] (bad target, key or payload size; nothing was sent),
    /// [`RequestError::Refused`] (the broker's `error`, e.g. `outbox_full`: nothing was
    /// written), [`RequestError::Timeout`], [`RequestError::Stopped`].
    pub async fn send(self) -> Result<Published, RequestError> {
        self.start().await
    }

    /// Queues the publish at once and returns the wait for its confirmation. Publishes started
    /// one after the other are sent, and written to each outbox, in that order, even when many
    /// are in flight: the way to pipeline in order. (`.await` on the request starts it too.)
    pub fn start(self) -> PendingPublish {
        // Queued here, not at the first poll: publishes started one after the other go out
        // together even when their confirmations are awaited one at a time.
        let submitted = self
            .check()
            .map(|(publisher, kind, timeout, key)| publisher.submit(kind, timeout, key));
        PendingPublish(Box::pin(async move {
            match submitted?.await? {
                Reply::Published(p) => Ok(p),
                Reply::Done => Err(RequestError::Invalid(
                    "the broker answered a publish without an id".into(),
                )),
            }
        }))
    }

    /// The publisher, the request, its timeout, and its key again when a timeout may have to
    /// name it.
    #[allow(clippy::type_complexity)]
    fn check(
        self,
    ) -> Result<(Publisher, RequestKind, Option<Duration>, Option<String>), RequestError> {
        let to = Target::parse(&self.to).map_err(|e| RequestError::Invalid(e.to_string()))?;
        if let Some(k) = &self.key {
            if k.is_empty() || k.len() > MAX_KEY_LEN {
                return Err(RequestError::Invalid(format!(
                    "the key must be 1 to {MAX_KEY_LEN} bytes"
                )));
            }
        }
        let size = u64::try_from(self.payload.len()).unwrap_or(u64::MAX);
        if size > PAYLOAD_CEILING {
            return Err(RequestError::Invalid(format!(
                "the payload is {size} bytes; no broker accepts more than {PAYLOAD_CEILING}"
            )));
        }
        let key = self.key.unwrap_or_else(|| self.publisher.new_key());
        let ttl_ms = self
            .ttl
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1));
        let named = self.timeout.is_some().then(|| key.clone());
        let kind = RequestKind::Publish {
            to,
            payload: self.payload,
            key,
            ttl_ms,
        };
        Ok((self.publisher, kind, self.timeout, named))
    }
}

/// A publish that has been queued; await it for the broker's confirmation. Dropping it
/// withdraws the publish if it has not been sent yet.
#[must_use = "dropping it withdraws the publish"]
pub struct PendingPublish(Pin<Box<dyn Future<Output = Result<Published, RequestError>> + Send>>);

impl Future for PendingPublish {
    type Output = Result<Published, RequestError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

impl IntoFuture for PublishRequest {
    type Output = Result<Published, RequestError>;
    type IntoFuture = PendingPublish;

    fn into_future(self) -> PendingPublish {
        self.start()
    }
}

/// A connected client. Read deliveries and events with [`next`](Self::next) (or as a
/// `Stream`), or hand them to [`run`](Self::run).
pub struct Client {
    publisher: Publisher,
    client_id: ClientId,
    incoming: mpsc::UnboundedReceiver<Incoming>,
}

impl Client {
    /// Settings for a client `client_id` of the broker at `url` (`ws://HOST:PORT/ws`).
    pub fn builder(url: impl Into<String>, client_id: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            client_id: client_id.into(),
            token: None,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            heartbeat_grace: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Some(Duration::from_secs(30)),
            transient: false,
            store: None,
            max_message_bytes: 1 << 20,
            write_queue_frames: 1024,
            tls_ca_files: Vec::new(),
            token_source: None,
            fail_fast: false,
        }
    }

    pub fn client_id(&self) -> &ClientId {
        &self.client_id
    }

    /// The next delivery or event; `None` once the client has stopped (after
    /// [`Event::Stopped`]). Cancel-safe.
    pub async fn next(&mut self) -> Option<Incoming> {
        self.incoming.recv().await
    }

    /// Hands every delivery and event to `handler`, and acks each delivery after the handler
    /// returned `Ok` for it. An `Err` stops the loop and is returned; that delivery stays
    /// unacked (the broker has it, and it comes again after a restart). Returns `Ok` when the
    /// client stops.
    pub async fn run<F, Fut, E>(&mut self, mut handler: F) -> Result<(), E>
    where
        F: FnMut(Incoming) -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        while let Some(item) = self.next().await {
            let ack = match &item {
                Incoming::Delivery(d) => Some(d.ack_handle()),
                Incoming::Event(_) => None,
            };
            handler(item).await?;
            if let Some(ack) = ack {
                // A stopped client cannot ack; the message comes again later.
                let _ = ack.ack();
            }
        }
        Ok(())
    }

    /// See [`Publisher::publish`].
    pub fn publish(&self, to: impl Into<String>, payload: impl Into<Payload>) -> PublishRequest {
        self.publisher.publish(to, payload)
    }

    /// See [`Publisher::subscribe`].
    pub async fn subscribe(&self, topic: &str) -> Result<(), RequestError> {
        self.publisher.subscribe(topic).await
    }

    /// See [`Publisher::unsubscribe`].
    pub async fn unsubscribe(&self, topic: &str) -> Result<(), RequestError> {
        self.publisher.unsubscribe(topic).await
    }

    /// A handle for publishing from other tasks.
    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// Saves the position, sends the acks made so far, closes the connection with 1000 and
    /// waits for all of it. Requests still waiting fail with [`StopReason::Closed`].
    pub async fn close(self) {
        let (done, wait) = oneshot::channel();
        if self
            .publisher
            .shared
            .commands
            .send(Command::Close(done))
            .is_ok()
        {
            let _ = wait.await;
        }
    }
}

impl futures_util::Stream for Client {
    type Item = Incoming;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Incoming>> {
        self.incoming.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::push_hex16;

    #[test]
    fn a_generated_key_number_is_written_as_format_writes_it() {
        for n in [0, 1, 0xabc, 0x0123_4567_89ab_cdef, u64::MAX] {
            let mut s = String::from("prefix-");
            push_hex16(&mut s, n);
            assert_eq!(s, format!("prefix-{n:016x}"));
        }
    }
}
