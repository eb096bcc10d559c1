//! The client side of the v1 protocol as a state machine: no sockets, no clocks, no files.
//!
//! [`Machine`] takes what happened (a frame arrived, the connection closed, the application
//! acked or asked to publish) and queues what to do about it as [`Action`]s: frames to send,
//! positions to save, messages and events to hand to the application, requests to complete.
//! The driver (`driver.rs`) only executes them, so every rule below is unit-tested here.
//!
//! The rules that keep the promise "nothing lost, nothing handed twice":
//! - Dedup: within one epoch, a message is handed to the application only if its seq is above
//!   every seq handed before (`delivered`). A duplicate of a message the application already
//!   acked is acked again (its ack was lost); a duplicate of one it still holds is dropped, and
//!   the application's ack, when it comes, goes out on whatever connection is current.
//! - Position: `acked` is the highest seq such that every message handed out at or below it is
//!   acked. It is what `hello` resumes from and what is saved. A save comes before the `ack
//!   upto` frames it covers, so a crash in between leaves a saved position the broker never
//!   heard of (harmless: the next resume acks it) rather than the reverse.
//! - Reset: a `welcome` with `resumed:false` means the broker does not know our position (first
//!   connection, another epoch, or a position from the future): the dedup state starts over from
//!   the broker's watermark, and a stale delivery's ack can no longer touch the new epoch.
//! - Requests (publish, subscribe, unsubscribe) are kept until answered and sent again, with the
//!   same frame (so the same idempotency key), on every new connection; never more than the
//!   broker's `max_inflight` wait for an answer on one connection.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use serde_json::Value;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::error::{RequestError, StopReason};
use super::payload::Payload;
use super::position::{Epoch, Position};
use crate::model::{Ack, ClientId, Resume, Target, Topic};
use crate::protocol::{
    self, close, BrokerFrame, BrokerFrameError, ErrorFrame, MsgFrame, OkFrame, WelcomeFrame,
};

/// A message the broker delivered, as handed to the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The outbox incarnation the seq belongs to.
    pub epoch: Epoch,
    /// Position in this client's outbox; strictly increasing within an epoch.
    pub seq: u64,
    /// The message id, the same for every recipient of one publish.
    pub id: String,
    /// When the broker accepted the publish, in ms since the Unix epoch.
    pub ts: u64,
    /// The publisher's client id.
    pub from: Option<String>,
    /// The topic, for topic messages.
    pub topic: Option<String>,
    pub payload: Payload,
    /// The broker says it may have sent this message before (to an earlier connection or an
    /// earlier process of this client). The client has not handed it to the application before.
    pub redelivered: bool,
}

/// Something the application should know that is not a message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A session began (after the broker's `welcome`).
    Connected {
        epoch: Epoch,
        /// The broker accepted the position the client resumed from.
        resumed: bool,
        /// Messages stored for this client and not yet acked.
        pending: u64,
    },
    /// The session ended; the client reconnects with backoff.
    Disconnected { reason: String },
    /// A connection attempt failed; the next one follows after `retry_in`.
    ConnectFailed { error: String, retry_in: Duration },
    /// The broker removed `count` messages for this client before they were acked (a retention
    /// rule such as a TTL): the application will never see them.
    Missed { count: u64, epoch: Epoch },
    /// The broker did not accept the client's position (its outbox was recreated, or the
    /// position is ahead of anything it assigned). Dedup starts over in `epoch`; acks of
    /// deliveries from before are ignored.
    Reset {
        previous: Position,
        epoch: Epoch,
        reason: String,
    },
    /// The position could not be saved. The client carries on (the broker still gets the acks),
    /// but a restarted application may see some acked messages again.
    PositionNotSaved { error: String },
    /// The client stopped for good; the stream ends after this event.
    Stopped { reason: StopReason },
}

/// The broker's confirmation of a publish: every recipient's outbox write is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The message id its recipients see.
    pub id: String,
    /// Outboxes written.
    pub recipients: u64,
    /// The key was seen before: nothing new was written (an earlier attempt got through).
    pub duplicate: bool,
    /// Topic subscribers the message could not be written for.
    pub refused: Vec<RefusedRecipient>,
    /// The idempotency key the publish went out with (given or generated).
    pub key: String,
}

/// A subscriber a topic publish skipped, and why (e.g. `outbox_full`).
pub use crate::protocol::Refused as RefusedRecipient;

/// A request waiting for the broker's answer.
#[derive(Debug, Clone)]
pub(crate) enum RequestKind {
    Publish {
        to: Target,
        payload: Payload,
        key: String,
        ttl_ms: Option<u64>,
    },
    Subscribe(Topic),
    Unsubscribe(Topic),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Published(Published),
    Done,
}

/// What the driver must do, in order.
#[derive(Debug)]
pub(crate) enum Action {
    /// Send this text frame on the current connection.
    Send(Utf8Bytes),
    /// Save this position; wait for it before the next action (which may be an ack it covers).
    Save(Position),
    /// Hand a message to the application; `generation` goes into its ack handle.
    Deliver(Message, u64),
    Event(Event),
    /// Answer the request with this id.
    Complete(u64, Result<Reply, RequestError>),
}

/// Why a connection must end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Drop it and connect again after a backoff.
    Reconnect(String),
    /// Stop the client.
    Stop(StopReason),
}

#[derive(Debug)]
enum Conn {
    Down,
    /// `hello` sent, resuming from this position (if any); waiting for `welcome`.
    Hello(Option<Position>),
    Up(Up),
}

#[derive(Debug)]
struct Up {
    heartbeat: Duration,
    max_inflight: usize,
    /// The position the welcome put in force.
    base: u64,
    /// Highest seq seen on this connection.
    max_seen: Option<u64>,
    /// Requests sent on this connection and not answered yet.
    unanswered: usize,
}

#[derive(Debug)]
struct Pending {
    kind: RequestKind,
    /// Kept for a resend after a reconnect; each send shares it.
    frame: Utf8Bytes,
    sent: bool,
    /// The caller gave up; forget it once the broker answers (or the connection drops).
    cancelled: bool,
}

/// Losses the application has been told of, so one removal is reported once even when the
/// broker reports it again at the next `welcome` (it keeps a record until the client's
/// position passes it).
#[derive(Debug, Default)]
struct LossBook {
    /// Seqs known removed (from gaps), all above the acked position.
    ranges: Vec<(u64, u64)>,
    /// Losses a welcome reported after `base` whose seqs are not known yet: (base, count).
    anonymous: Option<(u64, u64)>,
}

impl LossBook {
    fn count_above(&self, base: u64) -> u64 {
        self.ranges
            .iter()
            .filter(|(_, hi)| *hi > base)
            .map(|&(lo, hi)| hi - lo.max(base.saturating_add(1)) + 1)
            .sum()
    }

    /// A welcome counted `missed` removals after `base`; returns how many are news.
    fn welcome(&mut self, base: u64, missed: u64) -> u64 {
        let located = self.count_above(base);
        let told_anonymous = self
            .anonymous
            .filter(|(b, _)| *b == base)
            .map_or(0, |(_, n)| n);
        let anonymous = missed.saturating_sub(located);
        self.anonymous = (anonymous > 0).then_some((base, anonymous));
        missed.saturating_sub(located.saturating_add(told_anonymous))
    }

    /// Seqs `lo..=hi` never arrived; returns how many of them are news.
    fn gap(&mut self, lo: u64, hi: u64) -> u64 {
        let overlap: u64 = self
            .ranges
            .iter()
            .filter(|(a, b)| *a <= hi && *b >= lo)
            .map(|&(a, b)| b.min(hi) - a.max(lo) + 1)
            .sum();
        let fresh = (hi - lo + 1).saturating_sub(overlap);
        self.ranges.push((lo, hi));
        self.ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.ranges.len());
        for &(a, b) in &self.ranges {
            match merged.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        self.ranges = merged;
        // A welcome may already have counted these without knowing where they were.
        let from_welcome = self.anonymous.map_or(0, |(_, n)| n).min(fresh);
        if let Some((base, n)) = self.anonymous {
            self.anonymous = (n > from_welcome).then_some((base, n - from_welcome));
        }
        fresh - from_welcome
    }

    /// The position moved to `acked`: removals at or below it are history.
    fn prune(&mut self, acked: u64) {
        self.ranges.retain(|(_, hi)| *hi > acked);
        for r in &mut self.ranges {
            r.0 = r.0.max(acked.saturating_add(1));
        }
        if self.anonymous.is_some_and(|(base, _)| base < acked) {
            self.anonymous = None;
        }
    }
}

/// The `exp` claim (Unix seconds) of a JSON Web Token, read without checking the signature
/// (only the broker can check it; the client only needs to know when to renew). None when the
/// token is not a JWT or has no numeric `exp`.
pub(crate) fn token_expiry(token: &str) -> Option<u64> {
    let claims = token_claims(token)?;
    let exp = claims.get("exp")?;
    exp.as_u64()
        .or_else(|| exp.as_f64().filter(|e| *e >= 0.0).map(|e| e as u64))
}

/// The `sub` claim of a JSON Web Token (the client id it was issued for), read without
/// checking the signature. None when the token is not a JWT or has no string `sub`.
pub fn token_subject(token: &str) -> Option<String> {
    token_claims(token)?.get("sub")?.as_str().map(str::to_owned)
}

/// The claims of a JSON Web Token, unverified.
fn token_claims(token: &str) -> Option<Value> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn request_frame(id: u64, kind: &RequestKind) -> String {
    match kind {
        RequestKind::Publish {
            to,
            payload,
            key,
            ttl_ms,
        } => protocol::encode_publish(id, to, Some(key), *ttl_ms, payload.wire()),
        RequestKind::Subscribe(t) => protocol::encode_subscribe(id, t),
        RequestKind::Unsubscribe(t) => protocol::encode_unsubscribe(id, t),
    }
}

/// The client's protocol state across connections. See the module docs for its rules.
#[derive(Debug)]
pub(crate) struct Machine {
    client_id: ClientId,
    token: Option<String>,
    /// The application can hand over new tokens (a token source): a session closed because
    /// its token expired is then reconnected, with a new one, instead of ending the client.
    renewable: bool,
    /// Said in `hello`: the broker forgets this client when a connection ends with nothing
    /// stored for it (a client that only publishes).
    transient: bool,
    epoch: Option<Epoch>,
    /// Every seq handed out at or below this is acked: the position.
    acked: u64,
    /// Highest seq handed to the application in this epoch.
    delivered: u64,
    /// Handed to the application, not acked yet.
    outstanding: BTreeSet<u64>,
    /// Bumped at every reset, so acks of deliveries from before cannot touch what came after.
    generation: u64,
    /// The position changed since the last save.
    save_due: bool,
    /// An `ack upto` that goes out once the save covering it is done.
    upto_after_save: Option<u64>,
    losses: LossBook,
    conn: Conn,
    requests: BTreeMap<u64, Pending>,
    /// Ids of requests that wait to be sent, in order.
    unsent: BTreeSet<u64>,
    out: VecDeque<Action>,
}

impl Machine {
    /// A client starting from `position` (its saved position, if any).
    pub fn new(client_id: ClientId, token: Option<String>, position: Option<Position>) -> Self {
        let (epoch, acked) = match position {
            Some(p) => (Some(p.epoch), p.last_seq),
            None => (None, 0),
        };
        Self {
            client_id,
            token,
            renewable: false,
            transient: false,
            epoch,
            acked,
            delivered: acked,
            outstanding: BTreeSet::new(),
            generation: 0,
            save_due: false,
            upto_after_save: None,
            losses: LossBook::default(),
            conn: Conn::Down,
            requests: BTreeMap::new(),
            unsent: BTreeSet::new(),
            out: VecDeque::new(),
        }
    }

    /// Says that new tokens will come (see [`Machine::renew_token`]).
    pub fn with_renewable_token(mut self) -> Self {
        self.renewable = true;
        self
    }

    /// Says `transient` in every `hello` (see [`crate::client::ClientBuilder::transient`]).
    pub fn transient(mut self, transient: bool) -> Self {
        self.transient = transient;
        self
    }

    /// Replaces the token: the next `hello` carries it. While a session is up, returns the
    /// `refresh` frame that hands it to the broker for this session too. The frame has no
    /// `ref`: the broker's `ok` needs no answer, and a refusal is logged (the session then ends
    /// at the old token's expiry, and the next `hello` carries the new token).
    pub fn renew_token(&mut self, token: String) -> Option<String> {
        let frame = self.is_up().then(|| protocol::encode_refresh(&token));
        self.token = Some(token);
        frame
    }

    /// The token in use.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The position resumed from at the next `hello`.
    pub fn position(&self) -> Option<Position> {
        self.epoch.as_ref().map(|e| Position {
            epoch: e.clone(),
            last_seq: self.acked,
        })
    }

    pub fn is_up(&self) -> bool {
        matches!(self.conn, Conn::Up(_))
    }

    /// The broker's ping interval on the current session.
    pub fn heartbeat(&self) -> Option<Duration> {
        match &self.conn {
            Conn::Up(up) => Some(up.heartbeat),
            _ => None,
        }
    }

    /// A new connection is open: the `hello` to send first.
    pub fn hello(&mut self) -> String {
        self.drop_sends();
        let resume = self.position();
        let frame = protocol::encode_hello(
            &self.client_id,
            self.token.as_deref(),
            resume
                .as_ref()
                .map(|p| Resume {
                    epoch: p.epoch.as_str().to_owned(),
                    last_seq: p.last_seq,
                })
                .as_ref(),
            self.transient,
        );
        self.conn = Conn::Hello(resume);
        frame
    }

    /// A text frame from the broker.
    pub fn on_text(&mut self, text: &str) -> Result<(), Ended> {
        let frame =
            protocol::parse_broker_frame(text).map_err(|e| Ended::Reconnect(self.unreadable(e)))?;
        match frame {
            BrokerFrame::Welcome(w) => self.on_welcome(w),
            BrokerFrame::Msg(m) => self.on_msg(m),
            BrokerFrame::Ok(ok) => {
                let id = ok.reference.as_ref().and_then(Value::as_u64);
                self.on_answer(id, Ok(ok));
                Ok(())
            }
            BrokerFrame::Error(e) => self.on_error(e),
            BrokerFrame::Ping => {
                if !matches!(self.conn, Conn::Down) {
                    self.out
                        .push_back(Action::Send(Utf8Bytes::from_static(protocol::PONG)));
                }
                Ok(())
            }
            BrokerFrame::Pong => Ok(()),
            BrokerFrame::Unknown(kind) => {
                // A newer broker may say more; nothing in v1 requires an answer to it.
                tracing::debug!(frame_type = kind, "ignoring a frame of unknown type");
                Ok(())
            }
        }
    }

    /// Why a frame the codec could not read ends the connection. A welcome or msg out of turn
    /// is named for that first, whatever else is wrong with it.
    fn unreadable(&self, e: BrokerFrameError) -> String {
        match e {
            BrokerFrameError::IncompleteWelcome if !matches!(self.conn, Conn::Hello(_)) => {
                "welcome out of turn".into()
            }
            BrokerFrameError::MsgWithoutSeq
                if !matches!(self.conn, Conn::Up(_)) || self.epoch.is_none() =>
            {
                "msg before welcome".into()
            }
            e => e.to_string(),
        }
    }

    fn on_welcome(&mut self, f: WelcomeFrame) -> Result<(), Ended> {
        let Conn::Hello(claimed) = std::mem::replace(&mut self.conn, Conn::Down) else {
            return Err(Ended::Reconnect("welcome out of turn".into()));
        };
        let WelcomeFrame {
            client_id,
            epoch,
            resumed,
            reason,
            last_seq,
            pending,
            missed,
            heartbeat_ms,
            max_inflight,
        } = f;
        if client_id.as_deref() != Some(self.client_id.as_str()) {
            return Err(Ended::Reconnect(format!(
                "welcome names client {:?}, not {:?}",
                client_id,
                self.client_id.as_str()
            )));
        }
        let epoch = Epoch::new(epoch);
        self.out.push_back(Action::Event(Event::Connected {
            epoch: epoch.clone(),
            resumed,
            pending,
        }));
        let accepted = resumed && claimed.as_ref().is_some_and(|p| p.epoch == epoch);
        if accepted {
            // Same incarnation: the dedup state stands. Acks made while the hello was on its
            // way are not in the resume: state them now.
            if self.acked > last_seq {
                self.out.push_back(Action::Send(
                    protocol::encode_ack(Ack::Upto(self.acked)).into(),
                ));
            }
        } else {
            if let Some(previous) = claimed {
                self.out.push_back(Action::Event(Event::Reset {
                    previous,
                    epoch: epoch.clone(),
                    reason: reason.unwrap_or_else(|| "not resumed".into()),
                }));
            }
            self.epoch = Some(epoch.clone());
            self.acked = last_seq;
            self.delivered = last_seq;
            self.outstanding.clear();
            self.losses = LossBook::default();
            self.upto_after_save = None;
            self.generation = self.generation.wrapping_add(1);
            self.save_due = true;
        }
        let news = self.losses.welcome(last_seq, missed);
        if news > 0 {
            self.out
                .push_back(Action::Event(Event::Missed { count: news, epoch }));
        }
        self.conn = Conn::Up(Up {
            heartbeat: Duration::from_millis(heartbeat_ms),
            max_inflight: usize::try_from(max_inflight).unwrap_or(usize::MAX).max(1),
            base: last_seq,
            max_seen: None,
            unanswered: 0,
        });
        self.pump_requests();
        Ok(())
    }

    fn on_msg(&mut self, f: MsgFrame) -> Result<(), Ended> {
        let (Conn::Up(up), Some(epoch)) = (&mut self.conn, &self.epoch) else {
            return Err(Ended::Reconnect("msg before welcome".into()));
        };
        let seq = f.seq;
        let epoch = epoch.clone();
        let previous = up.max_seen.unwrap_or(up.base);
        up.max_seen = Some(previous.max(seq));
        // Seqs are contiguous in an outbox: what is skipped above what we already have was
        // removed by retention.
        let lo = previous.max(self.delivered).saturating_add(1);
        if seq > lo {
            let news = self.losses.gap(lo, seq - 1);
            if news > 0 {
                self.out.push_back(Action::Event(Event::Missed {
                    count: news,
                    epoch: epoch.clone(),
                }));
            }
        }
        if seq <= self.delivered {
            if !self.outstanding.contains(&seq) {
                // Processed and acked before; that ack was lost on the way.
                self.out
                    .push_back(Action::Send(protocol::encode_ack(Ack::Seq(seq)).into()));
            }
            return Ok(());
        }
        let payload = Payload::from_wire(f.payload.map_err(Ended::Reconnect)?);
        self.delivered = seq;
        self.outstanding.insert(seq);
        self.out.push_back(Action::Deliver(
            Message {
                epoch,
                seq,
                id: f.id,
                ts: f.ts,
                from: f.from,
                topic: f.topic,
                payload,
                redelivered: f.redelivered,
            },
            self.generation,
        ));
        Ok(())
    }

    /// The broker answered request `id` (the `ref` of its answer, when it is a number).
    fn on_answer(&mut self, id: Option<u64>, answer: Result<OkFrame, ErrorFrame>) {
        let Some(id) = id else {
            return;
        };
        if !self.requests.get(&id).is_some_and(|p| p.sent) {
            return;
        }
        let Some(p) = self.requests.remove(&id) else {
            return;
        };
        if let Conn::Up(up) = &mut self.conn {
            up.unanswered = up.unanswered.saturating_sub(1);
        }
        if !p.cancelled {
            let result = match answer {
                Ok(f) => Ok(match p.kind {
                    RequestKind::Publish { key, .. } => Reply::Published(Published {
                        id: f.id.unwrap_or_default(),
                        recipients: f.recipients.unwrap_or(0),
                        duplicate: f.duplicate,
                        refused: f.refused,
                        key,
                    }),
                    RequestKind::Subscribe(_) | RequestKind::Unsubscribe(_) => Reply::Done,
                }),
                Err(f) => Err(RequestError::Refused {
                    code: f.code.unwrap_or_else(|| "internal".into()),
                    message: f.message.unwrap_or_default(),
                }),
            };
            self.out.push_back(Action::Complete(id, result));
        }
        self.pump_requests();
    }

    fn on_error(&mut self, f: ErrorFrame) -> Result<(), Ended> {
        if matches!(self.conn, Conn::Hello(_)) {
            let code = f.code.unwrap_or_else(|| "internal".into());
            let message = f.message.unwrap_or_default();
            return Err(match code.as_str() {
                // Asking again with the same hello gets the same answer.
                "bad_client_id" | "unauthorized" | "forbidden" | "bad_frame" => {
                    Ended::Stop(StopReason::Refused { code, message })
                }
                _ => Ended::Reconnect(format!("hello refused: {code}: {message}")),
            });
        }
        if f.reference.is_none() {
            tracing::warn!(
                code = f.code.as_deref().unwrap_or(""),
                message = f.message.as_deref().unwrap_or(""),
                "the broker refused a frame of this client"
            );
            return Ok(());
        }
        let id = f.reference.as_ref().and_then(Value::as_u64);
        self.on_answer(id, Err(f));
        Ok(())
    }

    /// The broker closed the connection with `code`.
    pub fn on_close(&mut self, code: Option<u16>, reason: &str) -> Ended {
        if code == Some(close::TOO_BIG) {
            // The broker does not say which frame was too big; the largest unanswered one is
            // the suspect, and sending it again would only repeat the close.
            let largest = self
                .requests
                .iter()
                .filter(|(_, p)| p.sent)
                .max_by_key(|(_, p)| p.frame.len())
                .map(|(id, _)| *id);
            if let Some(id) = largest {
                if let Some(p) = self.requests.remove(&id) {
                    if !p.cancelled {
                        self.out.push_back(Action::Complete(
                            id,
                            Err(RequestError::Refused {
                                code: "frame_too_large".into(),
                                message: format!(
                                    "the broker closed the connection with 1009 after a {}-byte frame",
                                    p.frame.len()
                                ),
                            }),
                        ));
                    }
                }
            }
        }
        self.on_lost();
        let reason = reason.to_owned();
        match code {
            Some(close::REPLACED) => Ended::Stop(StopReason::Replaced),
            Some(close::POLICY) if self.renewable && reason.starts_with("token expired") => {
                Ended::Reconnect(format!(
                    "the session ended with its token ({reason}); reconnecting with a new one"
                ))
            }
            Some(c @ (close::PROTOCOL_ERROR | close::POLICY)) => {
                Ended::Stop(StopReason::Terminated { code: c, reason })
            }
            Some(c) if reason.is_empty() => {
                Ended::Reconnect(format!("the broker closed the connection with {c}"))
            }
            Some(c) => Ended::Reconnect(format!(
                "the broker closed the connection with {c} ({reason})"
            )),
            None => Ended::Reconnect("the broker closed the connection".into()),
        }
    }

    /// The connection is gone (closed, failed, or declared dead).
    pub fn on_lost(&mut self) {
        self.conn = Conn::Down;
        self.upto_after_save = None;
        self.drop_sends();
        self.requests.retain(|_, p| !p.cancelled);
        for p in self.requests.values_mut() {
            p.sent = false;
        }
        self.unsent = self.requests.keys().copied().collect();
    }

    /// Frames queued for a connection that is gone must not reach the next one before its hello.
    fn drop_sends(&mut self) {
        self.out.retain(|a| !matches!(a, Action::Send(_)));
    }

    /// The client stops: every request fails with `reason`.
    pub fn stop(&mut self, reason: &StopReason) {
        self.on_lost();
        for id in std::mem::take(&mut self.requests).into_keys() {
            self.out.push_back(Action::Complete(
                id,
                Err(RequestError::Stopped(reason.clone())),
            ));
        }
        self.unsent.clear();
    }

    /// The application acked the delivery `seq` of `epoch` (handed out in `generation`).
    pub fn ack(&mut self, epoch: &Epoch, generation: u64, seq: u64) {
        if self.epoch.as_ref() != Some(epoch) || generation != self.generation {
            return; // a delivery from before a reset: its seq means nothing now
        }
        if !self.outstanding.remove(&seq) {
            return; // acked twice
        }
        let mark = self
            .outstanding
            .first()
            .map_or(self.delivered, |first| first.saturating_sub(1));
        if mark > self.acked {
            self.acked = mark;
            self.save_due = true;
            self.losses.prune(mark);
            if self.is_up() {
                self.upto_after_save = Some(mark);
            }
        }
        if seq > self.acked && self.is_up() {
            // Out of order: the position cannot cover it yet, the broker can delete it now.
            self.out
                .push_back(Action::Send(protocol::encode_ack(Ack::Seq(seq)).into()));
        }
    }

    /// The application wants `kind` done; `id` is unique and increasing.
    pub fn request(&mut self, id: u64, kind: RequestKind) {
        let frame = request_frame(id, &kind).into();
        self.requests.insert(
            id,
            Pending {
                kind,
                frame,
                sent: false,
                cancelled: false,
            },
        );
        self.unsent.insert(id);
        self.pump_requests();
    }

    /// The application no longer waits for request `id`. One not sent yet is never sent; one
    /// already sent is forgotten when answered (it may still take effect at the broker).
    pub fn cancel(&mut self, id: u64) {
        if self.unsent.remove(&id) {
            self.requests.remove(&id);
        } else if let Some(p) = self.requests.get_mut(&id) {
            p.cancelled = true;
        }
    }

    fn pump_requests(&mut self) {
        let Conn::Up(up) = &mut self.conn else {
            return;
        };
        while up.unanswered < up.max_inflight {
            let Some(id) = self.unsent.pop_first() else {
                break;
            };
            if let Some(p) = self.requests.get_mut(&id) {
                p.sent = true;
                up.unanswered += 1;
                self.out.push_back(Action::Send(p.frame.clone()));
            }
        }
    }

    /// The next thing to do. A `Save` must finish before the driver asks again: the action
    /// after it may be the ack it covers.
    pub fn poll(&mut self) -> Option<Action> {
        if self.save_due {
            if let Some(position) = self.position() {
                self.save_due = false;
                if let Some(upto) = self.upto_after_save.take() {
                    self.out
                        .push_front(Action::Send(protocol::encode_ack(Ack::Upto(upto)).into()));
                }
                return Some(Action::Save(position));
            }
        }
        self.out.pop_front()
    }
}

#[cfg(test)]
mod tests;
