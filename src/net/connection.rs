//! One WebSocket connection, from the upgrade to the close.
//!
//! The connection task runs the handshake and the hello under one deadline, then a loop that
//! turns socket frames, durable-store wake-ups and timers into actions decided by the I/O-free
//! state machines in [`crate::broker::session`]. A second task per connection owns the socket's write
//! half and drains a bounded queue (`server.write_queue_frames`). Stored messages enter that
//! queue only while it has room beyond a reserve kept for replies and control frames; the rest
//! wait in the outbox until the writer has drained the queue. When a reply (to a publish, a
//! subscribe, a ping, a bad frame) finds the queue full, the peer is too slow and is closed with
//! 4029; its messages stay stored. A heartbeat ping that finds it full is skipped instead.
//!
//! Delivery order inside the loop: messages are read from the store only below the outbox's
//! durable frontier (see [`crate::store`]), so nothing is sent before an fsync covers it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, warn, Instrument};

use crate::auth::Grants;
use crate::broker::registry::{Kick, SessionGen, Ticket};
use crate::broker::session::{Beat, Liveness, RateLimit, Window};
use crate::broker::{store_error_message, Shared};
use crate::metrics::{CloseReason, Metrics};
use crate::model::ClientId;
use crate::net::read_ahead::ReadAhead;
use crate::net::replies::{Replies, Reply};
use crate::net::tls::Tls;
use crate::net::write_queue::{self, TrySendError};
use crate::protocol::{
    self, close, encode_error, encode_msg, ClientFrame, ErrorCode, MsgView, Publish, Welcome,
    SUBPROTOCOL,
};
use crate::store::{Delivery, OutboxHandle, PublishRequest, ResumeRefused, StoreError};

type Ws = WebSocketStream<ReadAhead<crate::net::tls::Stream>>;

/// Why a connection ends, and what the peer is told.
#[derive(Debug)]
enum End {
    Shutdown,
    Replaced,
    Purged,
    Dead,
    TooSlow,
    Protocol(String),
    /// A text frame (or a close reason) that is not UTF-8: RFC 6455 asks for 1007.
    InvalidUtf8,
    TooBig,
    Policy(String),
    NoHello,
    Internal(String),
    /// The peer closed or the socket failed: nothing more to say.
    Gone,
}

impl End {
    /// The `reason` label this end is counted under.
    fn reason(&self) -> CloseReason {
        match self {
            End::Shutdown => CloseReason::Shutdown,
            End::Replaced => CloseReason::Replaced,
            End::Purged => CloseReason::Purged,
            End::Dead => CloseReason::HeartbeatTimeout,
            End::TooSlow => CloseReason::TooSlow,
            End::Protocol(_) | End::InvalidUtf8 => CloseReason::ProtocolError,
            End::TooBig => CloseReason::TooBig,
            End::Policy(_) => CloseReason::Policy,
            End::NoHello => CloseReason::NoHello,
            End::Internal(_) => CloseReason::Internal,
            End::Gone => CloseReason::PeerClosed,
        }
    }

    /// What a failed read from the peer means: a frame over `server.max_frame_bytes` (1009), a
    /// broken WebSocket protocol (1002, or 1007 for text that is not UTF-8, as RFC 6455 asks), or
    /// a socket that is gone, to which nothing can be said.
    fn from_read(e: WsError) -> End {
        use tokio_tungstenite::tungstenite::error::ProtocolError as P;
        match e {
            WsError::Capacity(_) => End::TooBig,
            WsError::Utf8(_) => End::InvalidUtf8,
            WsError::Protocol(
                p @ (P::NonZeroReservedBits
                | P::UnmaskedFrameFromClient
                | P::FragmentedControlFrame
                | P::ControlFrameTooBig
                | P::UnknownControlFrameType(_)
                | P::UnknownDataFrameType(_)
                | P::UnexpectedContinueFrame
                | P::ExpectedFragment(_)
                | P::InvalidOpcode(_)
                | P::InvalidCloseSequence),
            ) => End::Protocol(format!("WebSocket protocol error: {p}")),
            other => {
                debug!(error = %other, "socket error");
                End::Gone
            }
        }
    }

    fn close(&self, cfg: &crate::config::Config) -> Option<(u16, String)> {
        let frame = match self {
            End::Shutdown => (
                close::GOING_AWAY,
                "broker shutting down; reconnect".to_string(),
            ),
            End::Replaced => (
                close::REPLACED,
                "replaced by a newer connection".to_string(),
            ),
            End::Purged => (
                close::PURGED,
                "outbox purged by an operator; reconnect".to_string(),
            ),
            End::Dead => (
                close::HEARTBEAT_TIMEOUT,
                format!(
                    "heartbeat timeout: nothing heard for {} ms",
                    cfg.heartbeat.timeout_ms
                ),
            ),
            End::TooSlow => (close::TOO_SLOW, "too slow: write queue full".to_string()),
            End::Protocol(m) => (close::PROTOCOL_ERROR, m.clone()),
            End::InvalidUtf8 => (
                close::INVALID_DATA,
                "text that is not valid UTF-8".to_string(),
            ),
            End::TooBig => (
                close::TOO_BIG,
                format!("frame larger than {} bytes", cfg.server.max_frame_bytes),
            ),
            End::Policy(m) => (close::POLICY, m.clone()),
            End::NoHello => (
                close::NO_HELLO,
                format!("no hello within {} ms", cfg.server.hello_timeout_ms),
            ),
            End::Internal(m) => (close::INTERNAL, m.clone()),
            End::Gone => return None,
        };
        Some(frame)
    }
}

/// Close reasons must fit a control frame (123 bytes).
fn close_frame(code: u16, reason: &str) -> CloseFrame {
    let mut r = reason.to_string();
    while r.len() > 120 {
        r.pop();
    }
    CloseFrame {
        code: CloseCode::from(code),
        reason: r.into(),
    }
}

/// Counts a connection as open while it lives, and as closed (by `reason`) when it is dropped,
/// so every accepted connection is counted closed exactly once, whatever path it leaves by.
struct Counted {
    metrics: Arc<Metrics>,
    reason: CloseReason,
}

impl Counted {
    fn new(metrics: Arc<Metrics>, reason: CloseReason) -> Self {
        metrics.connections_total.inc();
        metrics.connections.inc();
        Counted { metrics, reason }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.metrics.connections.dec();
        self.metrics.closed(self.reason);
    }
}

fn refuse(status: StatusCode, body: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(format!("{body}\n")));
    *r.status_mut() = status;
    r
}

/// Serves one accepted TCP connection until it closes. Never panics on peer input.
///
/// This future lives as long as the connection, so its size is memory every idle connection
/// holds: the handshake and the hello run in boxed futures of their own, freed before the
/// session starts, and only the session's state stays.
pub async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    permit: Option<OwnedSemaphorePermit>,
    ip_slot: Option<crate::broker::registry::IpSlot>,
    tls: Option<Tls>,
    shared: Arc<Shared>,
) {
    let deadline = tokio::time::Instant::now() + shared.cfg.hello_timeout();
    let has_permit = permit.is_some();
    // Counted from accept, so sockets that trickle their headers count against the limit too;
    // the slot is held until this function returns.
    let ip_ok = ip_slot.is_some();
    let mut counted = Counted::new(
        Arc::clone(&shared.metrics),
        match (has_permit, ip_ok) {
            (true, true) => CloseReason::Handshake,
            (false, _) => CloseReason::OverLimit,
            (true, false) => CloseReason::OverIpLimit,
        },
    );
    let Some(ws) = Box::pin(handshake(
        tcp, peer, has_permit, ip_ok, tls, &shared, deadline,
    ))
    .await
    else {
        return;
    };
    let (sink, mut stream) = ws.split();
    let queue = usize::try_from(shared.cfg.server.write_queue_frames).unwrap_or(256);
    let (tx, rx) = write_queue::channel(queue);
    let writer = shared.tracker.spawn(write_loop(sink, rx));
    let out = Outgoing {
        tx,
        reserve: (queue / 4).clamp(1, 64),
    };
    counted.reason = run(&mut stream, out, deadline, peer, &shared, permit).await;
    Box::pin(finish_close(
        &mut stream,
        writer,
        shared.cfg.close_timeout(),
        peer,
    ))
    .await;
}

/// How long the writer may take to put out what is queued and the close frame: a peer that
/// never reads cannot hold its connection longer.
const WRITER_GRACE: Duration = Duration::from_secs(5);

/// The end of the close handshake (RFC 6455, 7.1.1): once the writer has put out the close
/// frame, waits up to `close_timeout` (`server.close_timeout_ms`) for the peer's close frame,
/// and only then lets the TCP connection drop. Meanwhile whatever the peer still sends is read
/// and dropped unanswered (the session is over): a socket closed with unread data sends a TCP
/// reset instead of a FIN, and a reset can destroy the close frame before the peer has read
/// it. Returns as soon as both are done; at once for a stream that has already ended (the
/// peer closed first, or the read failed: after a WebSocket protocol error nothing more is
/// read). A writer still busy after [`WRITER_GRACE`] is stopped, which drops the socket.
async fn finish_close(
    stream: &mut SplitStream<Ws>,
    mut writer: tokio::task::JoinHandle<()>,
    close_timeout: Duration,
    peer: SocketAddr,
) {
    let mut deadline = tokio::time::Instant::now() + WRITER_GRACE;
    let mut written = false;
    let mut peer_done = false;
    while !(written && peer_done) {
        // Both branches are cancel-safe: a JoinHandle and `next()` lose nothing when dropped.
        tokio::select! {
            _ = &mut writer, if !written => {
                written = true;
                deadline = deadline.min(tokio::time::Instant::now() + close_timeout);
            }
            msg = stream.next(), if !peer_done => {
                peer_done = matches!(msg, None | Some(Err(_) | Ok(Message::Close(_))));
            }
            _ = tokio::time::sleep_until(deadline) => {
                if written {
                    debug!(%peer, "no close frame from the peer within server.close_timeout_ms; dropping the socket");
                } else {
                    debug!(%peer, "writer did not finish within 5 s; dropping the socket");
                    writer.abort();
                }
                return;
            }
        }
    }
}

/// TLS (when on) and the WebSocket upgrade, both before `deadline`. None when the peer was
/// refused, failed or was too slow (logged here), or the broker is shutting down.
// The upgrade callback's error type is tungstenite's HTTP response; its size is not ours.
#[allow(clippy::result_large_err)]
async fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    has_permit: bool,
    ip_ok: bool,
    tls: Option<Tls>,
    shared: &Shared,
    deadline: tokio::time::Instant,
) -> Option<Ws> {
    let cfg = &shared.cfg;
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(%peer, error = %e, "cannot set TCP_NODELAY");
    }
    let allowed_origins: Vec<String> = cfg
        .server
        .allowed_origins
        .iter()
        .map(|o| o.to_ascii_lowercase())
        .collect();
    let require_origin = cfg.server.require_origin;
    let callback = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != "/ws" {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                "not found: the WebSocket endpoint is /ws",
            ));
        }
        if !has_permit {
            return Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections (server.max_connections); retry later",
            ));
        }
        if !ip_ok {
            return Err(refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections from your address (server.max_connections_per_ip)",
            ));
        }
        match req.headers().get(header::ORIGIN).map(|v| v.to_str()) {
            None if require_origin => {
                return Err(refuse(
                    StatusCode::FORBIDDEN,
                    "an Origin header is required (server.require_origin)",
                ));
            }
            None => {}
            Some(Ok(o))
                if allowed_origins.is_empty()
                    || allowed_origins.contains(&o.to_ascii_lowercase()) => {}
            Some(_) => {
                return Err(refuse(
                    StatusCode::FORBIDDEN,
                    "this Origin is not allowed (server.allowed_origins)",
                ));
            }
        }
        let offered: Vec<String> = req
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if !offered.is_empty() {
            if offered.iter().any(|p| p == SUBPROTOCOL) {
                resp.headers_mut().insert(
                    header::SEC_WEBSOCKET_PROTOCOL,
                    HeaderValue::from_static(SUBPROTOCOL),
                );
            } else {
                return Err(refuse(
                    StatusCode::BAD_REQUEST,
                    "unsupported subprotocol: this broker speaks outboxd.v1.json",
                ));
            }
        }
        Ok(resp)
    };
    let frame = usize::try_from(cfg.server.max_frame_bytes).unwrap_or(usize::MAX);
    // tungstenite zero-fills the whole read buffer on its first read, so its size is resident
    // memory for every idle connection; a bigger frame grows the buffer as it needs, and a busy
    // peer's bytes are read ahead underneath (`net::read_ahead`).
    let ws_cfg = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(32 * 1024)
        .max_write_buffer_size(32 * 1024 + 2 * frame + 1024)
        .max_message_size(Some(frame))
        .max_frame_size(Some(frame));
    // TLS (when on) under the same deadline as the upgrade and the hello.
    // A shutdown does not wait for half-open handshakes.
    let shutdown = shared.shutdown.clone();
    let stream = tokio::select! {
        _ = shutdown.cancelled() => return None,
        r = crate::net::tls::accept(tls.as_ref(), tcp, deadline) => match r {
            Ok(s) => s,
            Err(e) => {
                debug!(%peer, error = %e, "TLS handshake failed");
                return None;
            }
        },
    };
    let upgrade = tokio::select! {
        _ = shutdown.cancelled() => return None,
        r = tokio::time::timeout_at(
            deadline,
            tokio_tungstenite::accept_hdr_async_with_config(ReadAhead::new(stream), callback, Some(ws_cfg)),
        ) => r,
    };
    match upgrade {
        Ok(Ok(ws)) => Some(ws),
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "WebSocket handshake refused or failed");
            None
        }
        Err(_) => {
            debug!(%peer, "WebSocket handshake not finished within hello_timeout_ms");
            None
        }
    }
}

/// The queue to the write half.
struct Outgoing {
    /// Bounded by `server.write_queue_frames`; the writer signals its `drained` handle each
    /// time it has written a batch.
    tx: write_queue::Sender<Message>,
    /// Slots kept free of stored messages, for replies and control frames.
    reserve: usize,
}

impl Outgoing {
    /// Room for stored messages: what the queue holds free beyond the reserve.
    fn room_for_messages(&self) -> usize {
        self.tx.capacity().saturating_sub(self.reserve)
    }

    fn text(&self, s: String) -> Result<(), End> {
        match self.tx.try_send(Message::text(s)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(End::TooSlow),
            Err(TrySendError::Closed(_)) => Err(End::Gone),
        }
    }

    /// Sends the close frame after everything queued, or at once when the queue is full.
    fn close(self, code: u16, reason: &str) {
        let frame = Message::Close(Some(close_frame(code, reason)));
        if code == close::TOO_SLOW {
            self.tx.kill(frame);
            return;
        }
        if let Err(e) = self.tx.try_send(frame) {
            self.tx.kill(e.into_inner());
        }
    }
}

enum WriteStep {
    More,
    Done,
    Failed,
    Kill(Message),
}

async fn write_loop(mut sink: SplitSink<Ws, Message>, rx: write_queue::Receiver<Message>) {
    loop {
        let step = tokio::select! {
            biased;
            frame = rx.killed() => WriteStep::Kill(frame),
            step = write_some(&mut sink, &rx) => step,
        };
        match step {
            WriteStep::More => rx.batch_written(),
            WriteStep::Done | WriteStep::Failed => break,
            WriteStep::Kill(frame) => {
                let _ = tokio::time::timeout(Duration::from_millis(500), sink.send(frame)).await;
                break;
            }
        }
    }
}

/// Writes whatever is queued with one flush. `Done` after a close frame or once the queue is
/// closed and empty; `More` otherwise.
async fn write_some(
    sink: &mut SplitSink<Ws, Message>,
    rx: &write_queue::Receiver<Message>,
) -> WriteStep {
    let Some(first) = rx.recv().await else {
        let _ = sink.close().await;
        return WriteStep::Done;
    };
    let mut msg = first;
    loop {
        let closing = matches!(msg, Message::Close(_));
        if sink.feed(msg).await.is_err() {
            return WriteStep::Failed;
        }
        if closing {
            let _ = sink.flush().await;
            return WriteStep::Done;
        }
        match rx.try_recv() {
            Some(next) => msg = next,
            None => break,
        }
    }
    if sink.flush().await.is_err() {
        return WriteStep::Failed;
    }
    WriteStep::More
}

/// Waits for the first text frame, skipping control frames.
async fn next_frame(stream: &mut SplitStream<Ws>) -> Option<Result<Message, WsError>> {
    loop {
        match stream.next().await {
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            other => return other,
        }
    }
}

async fn run(
    stream: &mut SplitStream<Ws>,
    out: Outgoing,
    deadline: tokio::time::Instant,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    _permit: Option<OwnedSemaphorePermit>,
) -> CloseReason {
    let (mut conn, ticket, span, welcomed) =
        match Box::pin(open(stream, out, deadline, peer, shared)).await {
            Ok(opened) => opened,
            Err(reason) => return reason,
        };
    let end = match welcomed {
        Ok(()) => conn.session(stream, &ticket).instrument(span.clone()).await,
        Err(e) => e,
    };
    shared.registry.detach(&conn.client, ticket.gen);
    conn.handle.connection_ended();
    if conn.transient && !matches!(end, End::Replaced) {
        // A client that only publishes leaves nothing behind when nothing is stored for it.
        match shared
            .store
            .forget_if_idle(conn.client.clone(), conn.generation)
            .await
        {
            Ok(true) => debug!(parent: &span, "transient client forgotten"),
            Ok(false) => {}
            Err(e) => debug!(parent: &span, error = %e, "transient client kept"),
        }
    }
    let reason = end.reason();
    conn.finish(end, ticket.gen, &span);
    reason
}

/// The session as the hello opens it, the ticket that attached it, its span, and whether the
/// welcome was queued.
type Opened = (Conn, Ticket, tracing::Span, Result<(), End>);

/// Reads the hello (before `deadline`), authenticates it, opens the client's outbox and
/// queues the welcome. On refusal, says why to the peer and returns the close reason.
async fn open(
    stream: &mut SplitStream<Ws>,
    out: Outgoing,
    deadline: tokio::time::Instant,
    peer: SocketAddr,
    shared: &Arc<Shared>,
) -> Result<Opened, CloseReason> {
    let cfg = &shared.cfg;
    let metrics = &shared.metrics;
    let max_payload = usize::try_from(cfg.limits.max_payload_bytes).unwrap_or(usize::MAX);
    // Hello: the first frame, before the deadline.
    let first = tokio::select! {
        _ = shared.shutdown.cancelled() => Err(End::Shutdown),
        r = tokio::time::timeout_at(deadline, next_frame(stream)) => match r {
            Err(_) => Err(End::NoHello),
            Ok(None) => Err(End::Gone),
            Ok(Some(Err(e))) => Err(End::from_read(e)),
            Ok(Some(Ok(Message::Text(t)))) => Ok(t),
            Ok(Some(Ok(Message::Binary(_)))) => {
                metrics.refused(ErrorCode::BadFrame);
                let _ = out.text(encode_error(None, ErrorCode::BadFrame, "binary frames are not accepted: send JSON text frames"));
                Err(End::Protocol("the first frame must be a JSON hello".into()))
            }
            Ok(Some(Ok(_))) => Err(End::Gone),
        },
    };
    let hello = first.and_then(
        |text| match protocol::parse_client_frame(&text, max_payload) {
            Ok(ClientFrame::Hello {
                client_id,
                resume,
                token,
                transient,
            }) => Ok((client_id, resume, token, transient)),
            Ok(_) => {
                metrics.refused(ErrorCode::BadFrame);
                let _ = out.text(encode_error(
                    None,
                    ErrorCode::BadFrame,
                    "the first frame must be hello",
                ));
                Err(End::Protocol("the first frame must be hello".into()))
            }
            Err(e) if e.code == ErrorCode::BadClientId => {
                metrics.refused(e.code);
                let _ = out.text(encode_error(e.reference.as_deref(), e.code, &e.message));
                Err(End::Policy(e.message))
            }
            Err(e) => {
                let message = format!("the first frame must be a valid hello: {}", e.message);
                metrics.refused(ErrorCode::BadFrame);
                let _ = out.text(encode_error(
                    e.reference.as_deref(),
                    ErrorCode::BadFrame,
                    &message,
                ));
                Err(End::Protocol(message))
            }
        },
    );
    let (client, resume, token, transient) = match hello {
        Ok(h) => h,
        Err(end) => {
            debug!(%peer, reason = ?end, "connection ended before hello");
            if let Some((code, reason)) = end.close(cfg) {
                out.close(code, &reason);
            }
            return Err(end.reason());
        }
    };
    // Authentication comes before the store is touched: a refused client creates nothing,
    // moves no position.
    let grants = match &shared.auth {
        None => Grants::all(),
        Some(verifier) => match verifier.verify(token.as_deref(), client.as_str()) {
            Ok(g) => g,
            Err(e) => {
                warn!(%peer, client = %client, reason = %e, "hello refused: authentication failed");
                metrics.refused(ErrorCode::Unauthorized);
                let _ = out.text(encode_error(None, ErrorCode::Unauthorized, &e.to_string()));
                out.close(close::POLICY, "unauthorized");
                return Err(CloseReason::Policy);
            }
        },
    };
    let outcome = match shared.store.hello(client.clone(), resume).await {
        Ok(o) => o,
        Err(e) => {
            warn!(%peer, client = %client, error = %e, "hello refused: store failure");
            metrics.refused(ErrorCode::Internal);
            let _ = out.text(encode_error(
                None,
                ErrorCode::Internal,
                &format!("the broker cannot open this outbox: {e}"),
            ));
            out.close(close::INTERNAL, "store failure");
            return Err(CloseReason::Internal);
        }
    };
    let (ticket, replaced) = shared.registry.attach(&client);
    if replaced {
        metrics.takeovers.inc();
    }
    let gen = ticket.gen;
    let span = tracing::info_span!("session", client = %client, gen = gen.0);
    let reason = outcome.reason.map(resume_refusal);
    info!(parent: &span, %peer, resumed = outcome.resumed, reason = reason.unwrap_or(""),
          last_seq = outcome.last_seq, next_seq = outcome.next_seq, pending = outcome.pending, missed = outcome.missed,
          replaced, "client connected");
    let welcome = Welcome {
        client_id: client.as_str().to_owned(),
        epoch: outcome.epoch.clone(),
        resumed: outcome.resumed,
        reason,
        last_seq: outcome.last_seq,
        next_seq: outcome.next_seq,
        pending: outcome.pending,
        missed: outcome.missed,
        heartbeat_ms: cfg.heartbeat.interval_ms,
        max_inflight: cfg.delivery.max_inflight,
    };
    let conn = Conn {
        shared: Arc::clone(shared),
        window: Window::new(
            usize::try_from(cfg.delivery.max_inflight).unwrap_or(usize::MAX),
            outcome.last_seq,
        ),
        live: Liveness::new(
            cfg.heartbeat_interval(),
            cfg.heartbeat_timeout(),
            Instant::now(),
        ),
        handle: outcome.handle,
        transient,
        generation: outcome.generation,
        client: client.clone(),
        out,
        bad_frames: 0,
        max_payload,
        expires: expiry_instant(grants.expires_at_ms),
        grants,
        rate: RateLimit::new(
            cfg.limits.publish_rate_per_sec,
            cfg.limits.publish_burst,
            Instant::now(),
        ),
    };
    let welcomed = conn.out.text(protocol::encode_welcome(&welcome));
    Ok((conn, ticket, span, welcomed))
}

struct Conn {
    shared: Arc<Shared>,
    out: Outgoing,
    handle: Arc<OutboxHandle>,
    /// Said in hello: forget the client at the end when nothing is stored for it.
    transient: bool,
    /// This connection's generation ([`crate::store::HelloOutcome::generation`]).
    generation: u64,
    client: ClientId,
    window: Window,
    live: Liveness,
    bad_frames: u32,
    max_payload: usize,
    /// What the client's token allows (everything in auth mode "none").
    grants: Grants,
    /// When the token expires and the session ends unless refreshed.
    expires: Option<Instant>,
    rate: Option<RateLimit>,
}

/// How a failed store read ends the session: a newer connection of the client took over (on
/// another broker sharing the store), or the store failed.
fn read_failed(e: StoreError, handle: &OutboxHandle) -> End {
    match e {
        StoreError::Superseded if handle.take_purged() => End::Purged,
        StoreError::Superseded => End::Replaced,
        e => End::Internal(format!("store read failed: {e}")),
    }
}

/// The wire's name for why a hello's resume position does not hold (`welcome.reason`).
fn resume_refusal(r: ResumeRefused) -> &'static str {
    match r {
        ResumeRefused::EpochMismatch => "epoch_mismatch",
        ResumeRefused::Ahead => "ahead",
    }
}

/// The instant a token that expires at Unix ms `at` runs out.
fn expiry_instant(at: Option<u64>) -> Option<Instant> {
    let at = at?;
    let now_ms = crate::model::now_ms();
    Some(Instant::now() + Duration::from_millis(at.saturating_sub(now_ms)))
}

impl Conn {
    async fn session(&mut self, stream: &mut SplitStream<Ws>, ticket: &Ticket) -> End {
        let mut durable = self.handle.watch_durable();
        let mut taken = self.handle.watch_generation();
        let mut replies = Replies::default();
        let metrics = Arc::clone(&self.shared.metrics);
        let max_pending = usize::try_from(self.shared.cfg.delivery.max_inflight).unwrap_or(1024);
        let shutdown = self.shared.shutdown.clone();
        let drained = self.out.tx.drained();
        // Made once, not at every turn of the loop: each one registers a waiter when first
        // polled and unregisters it when dropped, about 5 % of the broker's CPU at saturation
        // when the loop made them anew for every frame.
        let stopping = shutdown.cancelled();
        let kicked = ticket.token.cancelled();
        tokio::pin!(stopping, kicked);
        let end = loop {
            let queue_bound = match self.fill().await {
                Ok(b) => b,
                Err(end) => break end,
            };
            let wake = tokio::time::Instant::from_std(self.next_wake());
            // Every branch is cancel-safe: a dropped `next()` or `changed()` loses nothing.
            tokio::select! {
                biased;
                _ = &mut stopping => break End::Shutdown,
                _ = &mut kicked => break match ticket.why() {
                    Kick::Replaced => End::Replaced,
                    Kick::Purged => End::Purged,
                },
                // A newer connection of this client, here or on another broker sharing the
                // store: this one may no longer read or ack.
                changed = taken.changed() => {
                    if changed.is_err() || *taken.borrow_and_update() > self.generation {
                        if self.handle.take_purged() {
                            break End::Purged;
                        }
                        self.shared.metrics.takeovers.inc();
                        break End::Replaced;
                    }
                }
                // Replies wait for room in the write queue: a publisher that pipelines and
                // reads its replies is never too slow, only one that stops reading.
                Some(frame) = replies.next(&metrics), if !replies.is_empty() && self.out.tx.capacity() > 0 => {
                    if let Err(end) = self.out.text(frame) {
                        break end;
                    }
                }
                msg = stream.next(), if replies.len() < max_pending => {
                    // Boxed: handling a frame needs more state than waiting does, and this
                    // loop's state is what every idle connection holds.
                    if let Err(end) = Box::pin(self.on_message(msg, &mut replies)).await {
                        break end;
                    }
                }
                _ = drained.notified(), if queue_bound || (!replies.is_empty() && self.out.tx.capacity() == 0) => {}
                changed = durable.changed() => {
                    if changed.is_err() {
                        break End::Internal("store closed".into());
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    if let Err(end) = self.on_timer().await {
                        break end;
                    }
                }
            }
        };
        if matches!(end, End::Shutdown) {
            // Publishes already queued are committed by the store; tell their publishers.
            let drain = async {
                while let Some(frame) = replies.next(&metrics).await {
                    if self.out.text(frame).is_err() {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        }
        end
    }

    fn finish(self, end: End, gen: SessionGen, span: &tracing::Span) {
        let cfg = &self.shared.cfg;
        match end.close(cfg) {
            Some((code, reason)) => {
                info!(parent: span, gen = gen.0, code, reason = %reason, inflight = self.window.inflight(),
                      "connection closed by the broker");
                self.out.close(code, &reason);
            }
            None => {
                info!(parent: span, inflight = self.window.inflight(), "connection closed by the peer");
            }
        }
    }

    fn next_wake(&self) -> Instant {
        let beat = self.live.next_deadline();
        let beat = self.expires.map_or(beat, |e| beat.min(e));
        match self
            .shared
            .cfg
            .ack_timeout()
            .and_then(|t| self.window.next_due(t))
        {
            Some(due) => beat.min(due),
            None => beat,
        }
    }

    /// Sends stored messages while both the window and the write queue have room. Returns
    /// true when the write queue, not the window or the outbox, stopped it.
    async fn fill(&mut self) -> Result<bool, End> {
        let handle = Arc::clone(&self.handle);
        let read_failed = |e| read_failed(e, &handle);
        while self.window.room() > 0 {
            let room = self.window.room().min(self.out.room_for_messages());
            if room == 0 {
                return Ok(true);
            }
            let batch = self
                .shared
                .store
                .read(&self.handle, self.generation, self.window.cursor(), room)
                .await
                .map_err(read_failed)?;
            let now = Instant::now();
            let got = batch.items.len();
            for d in batch.items {
                let redelivered = self.handle.was_sent(d.seq);
                self.send_msg(d.seq, &d, redelivered)?;
                self.window.sent(d.seq, now);
            }
            self.window.skip_to(batch.covered_to);
            if got == 0 {
                break;
            }
        }
        Ok(false)
    }

    fn send_msg(&mut self, seq: u64, m: &Delivery, redelivered: bool) -> Result<(), End> {
        let frame = encode_msg(&MsgView {
            seq,
            id: &m.id,
            ts: m.ts,
            from: m.from.as_deref(),
            topic: m.topic.as_deref(),
            payload: &m.payload,
            redelivered,
        });
        self.out.text(frame)?;
        self.handle.mark_sent(seq);
        self.handle.count_send(seq);
        let m = &self.shared.metrics;
        m.delivered.inc();
        if redelivered {
            m.redelivered.inc();
        }
        Ok(())
    }

    async fn on_timer(&mut self) -> Result<(), End> {
        let now = Instant::now();
        if self.expires.is_some_and(|e| now >= e) {
            warn!("session ended: its token expired and no refresh came");
            return Err(End::Policy(
                "token expired: send a refresh frame with a new token before it runs out".into(),
            ));
        }
        match self.live.poll(now) {
            Beat::Dead => return Err(End::Dead),
            // A ping only asks for a sign of life; when the queue is full of messages the peer
            // has not read yet, skip it (its acks count as signs of life) rather than close.
            Beat::SendPing if self.out.tx.capacity() == 0 => {}
            Beat::SendPing => self.out.text(protocol::PING.to_string())?,
            Beat::Nothing => {}
        }
        if let Some(timeout) = self.shared.cfg.ack_timeout() {
            for seq in self.window.due(now, timeout) {
                match self
                    .shared
                    .store
                    .get(&self.handle, self.generation, seq)
                    .await
                {
                    Ok(Some(m)) => {
                        self.send_msg(seq, &m, true)?;
                        self.window.resent(seq, now);
                    }
                    Ok(None) => self.window.forget(seq),
                    Err(e) => return Err(read_failed(e, &self.handle)),
                }
            }
        }
        Ok(())
    }

    fn bad_frame(
        &mut self,
        reference: Option<&serde_json::value::RawValue>,
        code: ErrorCode,
        message: &str,
    ) -> Result<(), End> {
        self.bad_frames += 1;
        self.shared.metrics.refused(code);
        debug!(code = code.as_str(), message, "bad frame");
        self.out.text(encode_error(reference, code, message))?;
        if self.bad_frames >= self.shared.cfg.server.max_bad_frames {
            return Err(End::Protocol(format!(
                "too many bad frames ({})",
                self.bad_frames
            )));
        }
        Ok(())
    }

    async fn on_message(
        &mut self,
        msg: Option<Result<Message, WsError>>,
        replies: &mut Replies,
    ) -> Result<(), End> {
        let text = match msg {
            None => return Err(End::Gone),
            Some(Err(e)) => return Err(End::from_read(e)),
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(_))) => {
                self.live.heard(Instant::now());
                return self.bad_frame(
                    None,
                    ErrorCode::BadFrame,
                    "binary frames are not accepted: send JSON text frames",
                );
            }
            Some(Ok(Message::Close(_))) => return Err(End::Gone),
            Some(Ok(_)) => {
                self.live.heard(Instant::now());
                return Ok(());
            }
        };
        self.live.heard(Instant::now());
        let frame = match protocol::parse_client_frame(&text, self.max_payload) {
            Ok(f) => f,
            Err(e) => return self.bad_frame(e.reference.as_deref(), e.code, &e.message),
        };
        match frame {
            ClientFrame::Hello { .. } => self.bad_frame(
                None,
                ErrorCode::BadFrame,
                "hello was already received on this connection",
            ),
            ClientFrame::Ack(ack) => {
                let last = self.handle.last_durable();
                let acked = self.window.ack(ack, last);
                self.handle.forget_sends(ack);
                self.shared
                    .store
                    .ack(&self.handle, self.generation, ack)
                    .await
                    .map_err(|e| End::Internal(e.to_string()))?;
                match acked.beyond {
                    // Applied to what exists (above); the rest is a client bug worth telling.
                    Some(seq) => self.bad_frame(
                        None,
                        ErrorCode::BadAck,
                        &format!(
                            "ack of seq {seq}, which this outbox has not assigned (the last is {last}): \
                             only seqs up to {last} were acknowledged; later messages will still be sent"
                        ),
                    ),
                    None => Ok(()),
                }
            }
            ClientFrame::Publish(p) => self.publish(p, replies).await,
            ClientFrame::Subscribe { reference, topic } => {
                if !self.grants.may_subscribe(topic.as_str()) {
                    let message = format!(
                        "your token does not allow subscribing to {:?}",
                        topic.as_str()
                    );
                    return self.refuse(reference.as_deref(), ErrorCode::Forbidden, &message);
                }
                self.subscription(reference, topic, true, replies);
                Ok(())
            }
            ClientFrame::Unsubscribe { reference, topic } => {
                self.subscription(reference, topic, false, replies);
                Ok(())
            }
            ClientFrame::Ping => self.out.text(protocol::PONG.to_string()),
            ClientFrame::Pong => Ok(()),
            ClientFrame::Refresh { reference, token } => self.refresh(reference, &token),
        }
    }

    /// A fresh token for this session: new grants and a new expiry, or `unauthorized` (the
    /// session then still ends when the old token expires).
    fn refresh(
        &mut self,
        reference: Option<Box<serde_json::value::RawValue>>,
        token: &str,
    ) -> Result<(), End> {
        let Some(verifier) = &self.shared.auth else {
            return self.out.text(protocol::encode_ok(reference.as_deref()));
        };
        match verifier.verify(Some(token), self.client.as_str()) {
            Ok(grants) => {
                self.expires = expiry_instant(grants.expires_at_ms);
                self.grants = grants;
                info!("token refreshed");
                self.out.text(protocol::encode_ok(reference.as_deref()))
            }
            Err(e) => {
                warn!(reason = %e, "token refresh refused");
                self.shared.metrics.refused(ErrorCode::Unauthorized);
                self.out.text(encode_error(
                    reference.as_deref(),
                    ErrorCode::Unauthorized,
                    &e.to_string(),
                ))
            }
        }
    }

    /// Refuses a frame with `code`; nothing is written.
    fn refuse(
        &mut self,
        reference: Option<&serde_json::value::RawValue>,
        code: ErrorCode,
        message: &str,
    ) -> Result<(), End> {
        self.shared.metrics.refused(code);
        self.out.text(encode_error(reference, code, message))
    }

    fn subscription(
        &self,
        reference: Option<Box<serde_json::value::RawValue>>,
        topic: crate::model::Topic,
        on: bool,
        replies: &mut Replies,
    ) {
        let store = self.shared.store.clone();
        let metrics = Arc::clone(&self.shared.metrics);
        let client = self.client.clone();
        replies.push_back(Reply::Other(Box::pin(async move {
            match store.subscribe(client, topic, on).await {
                Ok(()) => protocol::encode_ok(reference.as_deref()),
                Err(e) => {
                    metrics.refused(match e {
                        StoreError::TooManySubscriptions { .. } => ErrorCode::Forbidden,
                        _ => ErrorCode::Internal,
                    });
                    store_error_frame(reference.as_deref(), &e)
                }
            }
        })));
    }

    async fn publish(&mut self, p: Publish, replies: &mut Replies) -> Result<(), End> {
        let Publish {
            reference,
            to,
            payload,
            key,
            ttl_ms,
        } = p;
        let target = to.wire();
        if !self.grants.may_publish(&target) {
            let message = format!("your token does not allow publishing to {target}");
            return self.refuse(reference.as_deref(), ErrorCode::Forbidden, &message);
        }
        if let Some(rate) = &mut self.rate {
            if !rate.try_take(Instant::now()) {
                let l = &self.shared.cfg.limits;
                let message = format!(
                    "over {} publishes per second (burst {}) on this connection; nothing was written, retry later",
                    l.publish_rate_per_sec, l.publish_burst
                );
                return self.refuse(reference.as_deref(), ErrorCode::RateLimited, &message);
            }
        }
        let direct = match &to {
            crate::model::Target::Client(c) => Some(c.clone()),
            crate::model::Target::Topic(_) => None,
        };
        let req = PublishRequest {
            from: Some(self.client.clone()),
            to,
            payload,
            key,
            ttl_ms,
        };
        let rx = match self.shared.store.submit_publish(req).await {
            Ok(rx) => rx,
            Err(e) => {
                self.shared.metrics.refused(ErrorCode::Internal);
                return self.out.text(store_error_frame(reference.as_deref(), &e));
            }
        };
        replies.push_back(Reply::Publish {
            rx,
            reference,
            direct,
        });
        Ok(())
    }
}

fn store_error_frame(reference: Option<&serde_json::value::RawValue>, e: &StoreError) -> String {
    let code = match e {
        StoreError::TooManySubscriptions { .. } => ErrorCode::Forbidden,
        _ => ErrorCode::Internal,
    };
    encode_error(reference, code, &store_error_message(e))
}
