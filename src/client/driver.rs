//! The client's one background task: sockets, timers and the position store, around the
//! I/O-free [`Machine`].
//!
//! It loops: connect (WebSocket + `hello`), run the session until it ends, wait a backoff,
//! connect again, until the application closes the client or the broker says reconnecting
//! would not help. During a session it reads every frame (so protocol pings are answered and
//! the watchdog sees signs of life), applies the application's commands (acks, requests), and
//! executes what the machine decides. Writes go through a bounded queue to a writer task, so a
//! slow socket never stops the reader.
//!
//! The dead-server watchdog: before the `welcome`, the whole handshake must finish within
//! `handshake_timeout`; after it, a session that hears nothing (no frame of any kind) for the
//! broker's `heartbeat_ms` plus `heartbeat_grace` is declared dead and replaced.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{SplitSink, StreamExt};
use futures_util::SinkExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, info, warn};

use super::backoff::{Backoff, Rng};
use super::error::{RequestError, StopReason};
use super::position::{Epoch, Position, PositionStore};
use super::state::{Action, Ended, Event, Machine, Reply, RequestKind};
use super::{AckHandle, Delivery, Incoming};
use crate::model::ClientId;
use crate::protocol::SUBPROTOCOL;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Commands applied together before the driver acts on them (see `Driver::commands_ready`).
const COMMAND_BURST: usize = 1024;

/// What the application's handles ask of the driver.
pub(crate) enum Command {
    Ack {
        epoch: Epoch,
        generation: u64,
        seq: u64,
    },
    Request {
        id: u64,
        kind: RequestKind,
        reply: oneshot::Sender<Result<Reply, RequestError>>,
    },
    Cancel(u64),
    /// Stop after saving the position and sending the acks; answer when done.
    Close(oneshot::Sender<()>),
}

/// The connection settings, fixed when the client is built.
pub(crate) struct Settings {
    pub url: String,
    pub heartbeat_grace: Duration,
    pub handshake_timeout: Duration,
    pub backoff: Backoff,
    pub ws_config: WebSocketConfig,
    pub write_queue_frames: usize,
    /// For a `wss://` URL: whom to trust.
    pub tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    pub token_source: Option<TokenSource>,
    /// Stop, instead of retrying, when the first connection attempt fails.
    pub fail_fast: bool,
}

/// Hands out the token to use (see `ClientBuilder::token_source`).
pub(crate) type TokenSource = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// The channels between the driver and the application's handles.
pub(crate) struct Wiring {
    pub commands: mpsc::UnboundedReceiver<Command>,
    pub acker: mpsc::WeakUnboundedSender<Command>,
    pub incoming: mpsc::UnboundedSender<Incoming>,
    /// Answered once, at the first welcome (or when the client stops before one).
    pub first: oneshot::Sender<Result<(), StopReason>>,
    /// The last connection error, for the message of a connect timeout.
    pub last_error: Arc<Mutex<String>>,
}

pub(crate) struct Driver {
    machine: Machine,
    settings: Settings,
    client_id: ClientId,
    store: Arc<dyn PositionStore>,
    commands: mpsc::UnboundedReceiver<Command>,
    acker: mpsc::WeakUnboundedSender<Command>,
    incoming: mpsc::UnboundedSender<Incoming>,
    first: Option<oneshot::Sender<Result<(), StopReason>>>,
    last_error: Arc<Mutex<String>>,
    replies: HashMap<u64, oneshot::Sender<Result<Reply, RequestError>>>,
    closers: Vec<oneshot::Sender<()>>,
    rng: Rng,
    /// The current session got its welcome.
    up: bool,
    /// Some session ever got a welcome (HTTP refusals are final only before that).
    ever_up: bool,
    /// The last save failed (report the next failure only after a success).
    save_failing: bool,
}

/// The reason in words when `e` is the broker's certificate failing verification: asking
/// again would get the same certificate, checked against the same roots.
fn rejected_certificate(e: &tungstenite::Error) -> Option<String> {
    let tungstenite::Error::Io(io) = e else {
        return None;
    };
    let tls = io
        .get_ref()?
        .downcast_ref::<tokio_rustls::rustls::Error>()?;
    super::tls::rejection_in_words(tls)
}

/// Aborts the connection's writer task when the session ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Driver {
    pub fn new(
        machine: Machine,
        settings: Settings,
        client_id: ClientId,
        store: Arc<dyn PositionStore>,
        wiring: Wiring,
    ) -> Self {
        Self {
            machine,
            settings,
            client_id,
            store,
            commands: wiring.commands,
            acker: wiring.acker,
            incoming: wiring.incoming,
            first: Some(wiring.first),
            last_error: wiring.last_error,
            replies: HashMap::new(),
            closers: Vec::new(),
            rng: Rng::seeded(),
            up: false,
            ever_up: false,
            save_failing: false,
        }
    }

    /// Runs until the client stops.
    pub async fn run(mut self) {
        let reason = loop {
            let why = match self.session().await {
                Ended::Stop(reason) => break reason,
                Ended::Reconnect(why) if self.settings.fail_fast && !self.ever_up => {
                    break StopReason::Unreachable(why)
                }
                Ended::Reconnect(why) => why,
            };
            let delay = self.settings.backoff.next_delay(self.rng.next_u64());
            if let Ok(mut last) = self.last_error.lock() {
                last.clone_from(&why);
            }
            let event = if self.up {
                info!(client = %self.client_id, reason = %why, "disconnected; reconnecting");
                Event::Disconnected { reason: why }
            } else {
                debug!(client = %self.client_id, error = %why, ?delay, "connection attempt failed");
                Event::ConnectFailed {
                    error: why,
                    retry_in: delay,
                }
            };
            self.emit(event);
            if let Some(reason) = self.idle(delay).await {
                break reason;
            }
        };
        self.finish(reason).await;
    }

    /// Waits out a backoff while still taking commands (acks and requests keep, a close stops).
    async fn idle(&mut self, delay: Duration) -> Option<StopReason> {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return None,
                cmd = self.commands.recv() => {
                    if let Some(reason) = self.commands_ready(cmd) {
                        return Some(reason);
                    }
                    // No connection: only saves and answers can happen.
                    let _ = self.execute(None, None).await;
                }
            }
        }
    }

    /// One connection from the TCP connect to its end.
    async fn session(&mut self) -> Ended {
        self.up = false;
        let request = match ws_request(&self.settings.url) {
            Ok(r) => r,
            Err(e) => return Ended::Stop(StopReason::Upgrade(e)),
        };
        let handshake = self.settings.handshake_timeout;
        let opened = Instant::now();
        let connecting = tokio::time::timeout(
            handshake,
            tokio_tungstenite::connect_async_tls_with_config(
                request,
                Some(self.settings.ws_config),
                true,
                Some(match &self.settings.tls {
                    Some(config) => tokio_tungstenite::Connector::Rustls(Arc::clone(config)),
                    None => tokio_tungstenite::Connector::Plain,
                }),
            ),
        );
        tokio::pin!(connecting);
        let ws = loop {
            tokio::select! {
                r = &mut connecting => match r {
                    Err(_) => return Ended::Reconnect(format!(
                        "no WebSocket handshake with {} within {handshake:?}", self.settings.url
                    )),
                    Ok(Err(e)) => return self.connect_error(e),
                    Ok(Ok((ws, _response))) => break ws,
                },
                cmd = self.commands.recv() => {
                    if let Some(reason) = self.commands_ready(cmd) {
                        return Ended::Stop(reason);
                    }
                    let _ = self.execute(None, None).await;
                }
            }
        };
        self.run_session(ws, opened).await
    }

    async fn run_session(&mut self, ws: Ws, opened: Instant) -> Ended {
        let (sink, mut stream) = ws.split();
        let (writes, queue) = mpsc::channel(self.settings.write_queue_frames.max(2));
        let writer = AbortOnDrop(tokio::spawn(write_loop(sink, queue)));
        if let Some(token) = self.settings.token_source.as_ref().and_then(|s| s()) {
            self.machine.renew_token(token);
        }
        let hello = self.machine.hello();
        if writes.send(WsMessage::text(hello)).await.is_err() {
            self.machine.on_lost();
            return Ended::Reconnect("the connection closed before the hello".into());
        }
        let mut last_heard = Instant::now();
        // When to ask the token source for the next token (set once the session is up).
        let mut renew_at: Option<Instant> = None;
        let ended = loop {
            if renew_at.is_none() && self.machine.is_up() {
                renew_at = self.renew_deadline();
            }
            let deadline = match self.machine.heartbeat() {
                Some(hb) => last_heard + hb + self.settings.heartbeat_grace,
                None => opened + self.settings.handshake_timeout,
            };
            if let Err(why) = self.execute(Some(&writes), Some(deadline)).await {
                self.machine.on_lost();
                break Ended::Reconnect(why);
            }
            tokio::select! {
                // Cancel-safe: an mpsc receive, a stream's next item, a timer.
                cmd = self.commands.recv() => {
                    if let Some(reason) = self.commands_ready(cmd) {
                        // Closing: the position is saved and the acks go out before the close.
                        let _ = self.execute(Some(&writes), Some(deadline)).await;
                        close_gracefully(&writes, &mut stream).await;
                        self.machine.on_lost();
                        break Ended::Stop(reason);
                    }
                }
                frame = stream.next() => match frame {
                    Some(Ok(WsMessage::Text(text))) => {
                        last_heard = Instant::now();
                        if let Err(ended) = self.machine.on_text(text.as_str()) {
                            if let Ended::Reconnect(why) = &ended {
                                warn!(client = %self.client_id, reason = %why, "dropping the connection");
                                self.machine.on_lost();
                            }
                            break ended;
                        }
                    }
                    Some(Ok(WsMessage::Close(frame))) => {
                        let (code, reason) = match frame {
                            Some(f) => (Some(u16::from(f.code)), f.reason.to_string()),
                            None => (None, String::new()),
                        };
                        break self.machine.on_close(code, &reason);
                    }
                    Some(Ok(_)) => last_heard = Instant::now(),
                    Some(Err(e)) => {
                        self.machine.on_lost();
                        break Ended::Reconnect(format!("the connection failed: {e}"));
                    }
                    None => {
                        self.machine.on_lost();
                        break Ended::Reconnect("the connection closed".into());
                    }
                },
                _ = tokio::time::sleep_until(renew_at.unwrap_or(deadline)), if renew_at.is_some() => {
                    renew_at = None;
                    let token = self.settings.token_source.as_ref().and_then(|s| s());
                    match token {
                        Some(t) if Some(t.as_str()) != self.machine.token() => {
                            if let Some(frame) = self.machine.renew_token(t) {
                                debug!(client = %self.client_id, "sending a new token (refresh)");
                                if writes.send(WsMessage::text(frame)).await.is_err() {
                                    self.machine.on_lost();
                                    break Ended::Reconnect("the connection closed".into());
                                }
                            }
                        }
                        // Nothing new yet (or a file caught mid-write): ask again shortly,
                        // until the token runs out.
                        _ => renew_at = Some(Instant::now() + self.renew_retry()),
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    self.machine.on_lost();
                    let why = if self.up {
                        format!(
                            "nothing heard from the broker for heartbeat_ms + {} ms grace: the connection is dead",
                            self.settings.heartbeat_grace.as_millis()
                        )
                    } else {
                        format!("no welcome within {:?}", self.settings.handshake_timeout)
                    };
                    break Ended::Reconnect(why);
                }
            }
        };
        drop(writer);
        // Answers and events the end produced (a 1009 refusal, a save) still go out.
        let _ = self.execute(None, None).await;
        ended
    }

    /// When to ask the token source for a new token: a fifth of the current token's time left
    /// before its `exp` (between 1 s and 60 s before it). None without a source or an `exp`.
    fn renew_deadline(&self) -> Option<Instant> {
        self.settings.token_source.as_ref()?;
        let left = self.token_left()?;
        let margin = (left / 5)
            .clamp(Duration::from_secs(1), Duration::from_secs(60))
            .min(left);
        Some(Instant::now() + (left - margin))
    }

    /// How soon to ask the token source again after it gave nothing new: a quarter of the
    /// current token's time left, between 100 ms and 1 s, so a source that missed once still
    /// gets a few more tries before the token runs out.
    fn renew_retry(&self) -> Duration {
        self.token_left().map_or(Duration::from_secs(1), |left| {
            (left / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
        })
    }

    /// The current token's time left before its `exp`; None without a token or an `exp`.
    fn token_left(&self) -> Option<Duration> {
        let exp = super::state::token_expiry(self.machine.token()?)?;
        let now = Duration::from_millis(crate::model::now_ms());
        Some(Duration::from_secs(exp).saturating_sub(now))
    }

    /// Sorts a failed WebSocket connect into retry or stop.
    fn connect_error(&self, e: tungstenite::Error) -> Ended {
        if let tungstenite::Error::Http(response) = &e {
            let status = response.status();
            let body = response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).trim().to_string())
                .unwrap_or_default();
            let text = format!("HTTP {status} {body}").trim_end().to_string();
            // A refusal of the request itself (wrong path, subprotocol) will not change by
            // asking again; 503 (too many connections), 408 and 429 may.
            let lasting = status.is_client_error() && !matches!(status.as_u16(), 408 | 429);
            if lasting && !self.ever_up {
                return Ended::Stop(StopReason::Upgrade(text));
            }
            return Ended::Reconnect(format!("the upgrade was refused: {text}"));
        }
        if let Some(reason) = rejected_certificate(&e) {
            return Ended::Stop(StopReason::Certificate {
                url: self.settings.url.clone(),
                reason,
            });
        }
        Ended::Reconnect(format!("cannot connect to {}: {e}", self.settings.url))
    }

    /// Applies `first` and whatever other commands are already queued (up to a bound), so a
    /// burst of acks costs one position save and one `ack upto` frame, not one per message.
    fn commands_ready(&mut self, first: Option<Command>) -> Option<StopReason> {
        if let Some(reason) = self.command(first) {
            return Some(reason);
        }
        for _ in 0..COMMAND_BURST {
            let Ok(cmd) = self.commands.try_recv() else {
                break;
            };
            if let Some(reason) = self.command(Some(cmd)) {
                return Some(reason);
            }
        }
        None
    }

    /// Applies one command; `Some` when the client must stop.
    fn command(&mut self, cmd: Option<Command>) -> Option<StopReason> {
        match cmd {
            // Every handle is gone: nobody can ack or publish any more.
            None => Some(StopReason::Closed),
            Some(Command::Close(done)) => {
                self.closers.push(done);
                Some(StopReason::Closed)
            }
            Some(Command::Ack {
                epoch,
                generation,
                seq,
            }) => {
                self.machine.ack(&epoch, generation, seq);
                None
            }
            Some(Command::Request { id, kind, reply }) => {
                self.replies.insert(id, reply);
                self.machine.request(id, kind);
                None
            }
            Some(Command::Cancel(id)) => {
                self.replies.remove(&id);
                self.machine.cancel(id);
                None
            }
        }
    }

    /// Executes the machine's actions. `writes` is the current connection's queue (None: no
    /// connection, frames are dropped; the next hello states the position). A frame that cannot
    /// be queued before `deadline` means the connection is stuck.
    async fn execute(
        &mut self,
        writes: Option<&mpsc::Sender<WsMessage>>,
        deadline: Option<Instant>,
    ) -> Result<(), String> {
        while let Some(action) = self.machine.poll() {
            match action {
                Action::Send(text) => {
                    let Some(w) = writes else { continue };
                    let send = w.send(WsMessage::text(text));
                    let sent = match deadline {
                        Some(d) => tokio::time::timeout_at(d, send)
                            .await
                            .map_err(|_| "the connection stopped taking frames".to_string())?,
                        None => send.await,
                    };
                    sent.map_err(|_| "the connection's writer ended".to_string())?;
                }
                Action::Save(position) => self.save(position).await,
                Action::Deliver(message, generation) => {
                    let handle = AckHandle {
                        commands: self.acker.clone(),
                        epoch: message.epoch.clone(),
                        generation,
                        seq: message.seq,
                    };
                    // Nobody reading: the message stays unacked and comes again later.
                    let _ = self
                        .incoming
                        .send(Incoming::Delivery(Delivery { message, handle }));
                }
                Action::Event(event) => {
                    if let Event::Connected {
                        epoch,
                        resumed,
                        pending,
                    } = &event
                    {
                        info!(client = %self.client_id, %epoch, resumed, pending, "connected");
                        self.up = true;
                        self.ever_up = true;
                        self.settings.backoff.reset();
                        if let Some(first) = self.first.take() {
                            let _ = first.send(Ok(()));
                        }
                    }
                    self.emit(event);
                }
                Action::Complete(id, result) => {
                    if let Some(reply) = self.replies.remove(&id) {
                        let _ = reply.send(result);
                    }
                }
            }
        }
        Ok(())
    }

    async fn save(&mut self, position: Position) {
        let store = Arc::clone(&self.store);
        let client = self.client_id.clone();
        let saved = tokio::task::spawn_blocking(move || store.save(&client, &position)).await;
        let error = match saved {
            Ok(Ok(())) => {
                self.save_failing = false;
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("the save task failed: {e}"),
        };
        if !self.save_failing {
            warn!(client = %self.client_id, %error, "cannot save the position");
            self.save_failing = true;
            self.emit(Event::PositionNotSaved { error });
        }
    }

    fn emit(&self, event: Event) {
        let _ = self.incoming.send(Incoming::Event(event));
    }

    async fn finish(mut self, reason: StopReason) {
        info!(client = %self.client_id, %reason, "client stopped");
        self.machine.stop(&reason);
        let _ = self.execute(None, None).await;
        if let Some(first) = self.first.take() {
            let _ = first.send(Err(reason.clone()));
        }
        self.emit(Event::Stopped { reason });
        for done in self.closers.drain(..) {
            let _ = done.send(());
        }
    }
}

/// The upgrade request: the URL plus our subprotocol.
pub(crate) fn ws_request(url: &str) -> Result<tungstenite::handshake::client::Request, String> {
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    if !matches!(request.uri().scheme_str(), Some("ws" | "wss")) {
        return Err(format!("{url}: the URL must start with ws:// or wss://"));
    }
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(SUBPROTOCOL),
    );
    Ok(request)
}

/// Feeds queued frames to the socket, many per flush.
async fn write_loop(mut sink: SplitSink<Ws, WsMessage>, mut queue: mpsc::Receiver<WsMessage>) {
    while let Some(m) = queue.recv().await {
        if sink.feed(m).await.is_err() {
            return;
        }
        while let Ok(m) = queue.try_recv() {
            if sink.feed(m).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}

/// Sends a 1000 close and waits briefly for the broker's answer, so it does not see an abrupt
/// end (and does not log one).
async fn close_gracefully(
    writes: &mpsc::Sender<WsMessage>,
    stream: &mut futures_util::stream::SplitStream<Ws>,
) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    if writes.send(WsMessage::Close(Some(frame))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}
