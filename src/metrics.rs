//! The broker's counters, gauges and histograms, and their Prometheus text rendering.
//!
//! One [`Metrics`] value, shared through an `Arc` by the listener, every connection, the store's
//! writer thread and the admin API. Every field is an atomic, so recording never takes a lock
//! and never waits: the writer thread and the session loops must not stall on a metrics call.
//! Values that would need a scan to keep exact (pending messages and bytes per outbox) are not
//! kept here: the admin API computes them at scrape time ([`ScrapeGauges`]).
//!
//! [`Metrics::render`] writes the Prometheus text exposition format, version 0.0.4, by hand:
//! the format is small and stable, and a hand-written renderer keeps the dependency tree lean.
//! The metric names and labels are part of the operator contract (docs/admin-api.md).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::protocol::ErrorCode;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        // Relaxed: each counter is independent; a scrape needs no ordering between them.
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (never below zero).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(&self) {
        // Saturating: an unpaired dec must not wrap around to 2^64.
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(1))
            });
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
}

/// A histogram with fixed upper bounds (`le`), cumulative only when rendered.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, plus one for `+Inf`; not cumulative.
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    /// The sum of observed values, as `f64` bits.
    sum: AtomicU64,
}

impl Histogram {
    /// `bounds` must be sorted ascending.
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn observe(&self, value: f64) {
        let value = if value.is_finite() { value } else { 0.0 };
        let i = self.bounds.partition_point(|b| *b < value);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum.load(Ordering::Relaxed))
    }
}

/// Why a WebSocket connection ended, as the `reason` label of
/// `outboxd_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Refused before the upgrade: `server.max_connections` reached (HTTP 503).
    OverLimit,
    /// Refused before the upgrade: `server.max_connections_per_ip` reached (HTTP 429).
    OverIpLimit,
    /// The WebSocket upgrade failed or was refused (wrong path, subprotocol, timeout, garbage).
    Handshake,
    /// Broker shutdown (1001).
    Shutdown,
    /// A newer connection with the same client id took over (4000).
    Replaced,
    /// An operator purged the outbox (4002).
    Purged,
    /// Nothing heard for `heartbeat.timeout_ms` (4001).
    HeartbeatTimeout,
    /// The write queue was full (4029).
    TooSlow,
    /// First frame not a valid hello, too many bad frames, or a frame that breaks the
    /// WebSocket protocol (1002; 1007 for text that is not UTF-8).
    ProtocolError,
    /// A frame over `server.max_frame_bytes` (1009).
    TooBig,
    /// An invalid client id in hello (1008).
    Policy,
    /// No hello within `server.hello_timeout_ms` (4008).
    NoHello,
    /// The broker could not serve the outbox (1011).
    Internal,
    /// The peer closed the connection, or the socket failed.
    PeerClosed,
}

impl CloseReason {
    pub const ALL: [CloseReason; 14] = [
        CloseReason::OverLimit,
        CloseReason::OverIpLimit,
        CloseReason::Handshake,
        CloseReason::Shutdown,
        CloseReason::Replaced,
        CloseReason::Purged,
        CloseReason::HeartbeatTimeout,
        CloseReason::TooSlow,
        CloseReason::ProtocolError,
        CloseReason::TooBig,
        CloseReason::Policy,
        CloseReason::NoHello,
        CloseReason::Internal,
        CloseReason::PeerClosed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::OverLimit => "over_limit",
            CloseReason::OverIpLimit => "over_ip_limit",
            CloseReason::Handshake => "handshake",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Replaced => "replaced",
            CloseReason::Purged => "purged",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::TooSlow => "too_slow",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::TooBig => "too_big",
            CloseReason::Policy => "policy",
            CloseReason::NoHello => "no_hello",
            CloseReason::Internal => "internal",
            CloseReason::PeerClosed => "peer_closed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Every error code, in the order `outboxd_refused_total` lists them.
const ERROR_CODES: [ErrorCode; 12] = [
    ErrorCode::BadFrame,
    ErrorCode::UnknownType,
    ErrorCode::BadClientId,
    ErrorCode::BadTopic,
    ErrorCode::PayloadTooLarge,
    ErrorCode::OutboxFull,
    ErrorCode::Internal,
    ErrorCode::Unauthorized,
    ErrorCode::Forbidden,
    ErrorCode::RateLimited,
    ErrorCode::BadAck,
    ErrorCode::KeyReused,
];

fn code_index(code: ErrorCode) -> usize {
    // Exhaustive on purpose: a new code must get a slot here before it compiles.
    match code {
        ErrorCode::BadFrame => 0,
        ErrorCode::UnknownType => 1,
        ErrorCode::BadClientId => 2,
        ErrorCode::BadTopic => 3,
        ErrorCode::PayloadTooLarge => 4,
        ErrorCode::OutboxFull => 5,
        ErrorCode::Internal => 6,
        ErrorCode::Unauthorized => 7,
        ErrorCode::Forbidden => 8,
        ErrorCode::RateLimited => 9,
        ErrorCode::BadAck => 10,
        ErrorCode::KeyReused => 11,
    }
}

/// Upper bounds of the commit (flush + fdatasync) latency histogram, in seconds.
const COMMIT_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Upper bounds of the publishes-per-commit histogram.
const GROUP_SIZES: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];
/// Upper bounds of the publish-to-ack latency histogram, in seconds (an ack can come days
/// later, after the client was offline).
const ACK_SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
    3600.0, 21600.0, 86400.0,
];

/// Everything the broker counts. Shared via `Arc`; see the module docs.
#[derive(Debug)]
pub struct Metrics {
    /// WebSocket connections open now (accepted TCP connections not yet closed).
    pub connections: Gauge,
    pub connections_total: Counter,
    closed: [Counter; CloseReason::ALL.len()],
    /// Publishes confirmed after their commit (duplicates and `outbox_full` refusals
    /// excluded); a topic publish counts once, whatever its recipients.
    pub published: Counter,
    /// Message copies written to outboxes (one per recipient of a publish).
    pub stored: Counter,
    /// Publishes answered `duplicate:true` (idempotency key seen).
    pub duplicates: Counter,
    /// `msg` frames queued for sending, redeliveries included.
    pub delivered: Counter,
    /// `msg` frames sent with `redelivered:true`.
    pub redelivered: Counter,
    /// Messages deleted by an ack (or a `resume` position).
    pub acked: Counter,
    /// Messages removed unacked by TTL retention.
    pub expired: Counter,
    /// Messages removed unacked by an operator's purge.
    pub purged: Counter,
    refused: [Counter; ERROR_CODES.len()],
    /// Successful commits (one flush + fdatasync, or one relaxed group).
    pub commit_groups: Counter,
    /// Publishes per commit group.
    pub commit_group_publishes: Histogram,
    /// Duration of one flush + fdatasync.
    pub commit_seconds: Histogram,
    /// Duration of one checkpoint (sled's flush and fsyncs, on the checkpoint's thread).
    pub checkpoint_seconds: Histogram,
    /// Commit journal bytes written since the last checkpoint began: what an open after a
    /// crash now would read and apply again.
    pub journal_bytes: Gauge,
    /// Writes applied outside a commit (held acks mostly) that neither a commit nor a
    /// checkpoint has made durable yet: a crash now would send those messages again.
    pub writes_not_durable: Gauge,
    /// Time from a message's publish to the ack that deleted it.
    pub publish_to_ack_seconds: Histogram,
    pub heartbeat_timeouts: Counter,
    pub takeovers: Counter,
    /// Failed store operations (I/O, storage engine, corrupt records, failed commits).
    pub store_errors: Counter,
    /// Requests to the admin API refused for a missing or wrong bearer token.
    pub admin_unauthorized: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            connections: Gauge::default(),
            connections_total: Counter::default(),
            closed: Default::default(),
            published: Counter::default(),
            stored: Counter::default(),
            duplicates: Counter::default(),
            delivered: Counter::default(),
            redelivered: Counter::default(),
            acked: Counter::default(),
            expired: Counter::default(),
            purged: Counter::default(),
            refused: Default::default(),
            commit_groups: Counter::default(),
            commit_group_publishes: Histogram::new(GROUP_SIZES),
            commit_seconds: Histogram::new(COMMIT_SECONDS),
            checkpoint_seconds: Histogram::new(COMMIT_SECONDS),
            journal_bytes: Gauge::default(),
            writes_not_durable: Gauge::default(),
            publish_to_ack_seconds: Histogram::new(ACK_SECONDS),
            heartbeat_timeouts: Counter::default(),
            takeovers: Counter::default(),
            store_errors: Counter::default(),
            admin_unauthorized: Counter::default(),
        }
    }
}

/// Values the admin API computes at scrape time, from the registry and the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScrapeGauges {
    /// Clients with an outbox.
    pub outboxes: u64,
    /// Clients with a live session (past `hello`).
    pub sessions: u64,
    pub pending_messages: u64,
    pub pending_bytes: u64,
    pub max_pending_messages: u64,
    pub max_pending_bytes: u64,
    pub latched: bool,
}

impl Metrics {
    /// Counts a connection that ended, by reason.
    pub fn closed(&self, reason: CloseReason) {
        if let Some(c) = self.closed.get(reason.index()) {
            c.inc();
        }
        if reason == CloseReason::HeartbeatTimeout {
            self.heartbeat_timeouts.inc();
        }
    }

    pub fn closed_count(&self, reason: CloseReason) -> u64 {
        self.closed.get(reason.index()).map_or(0, Counter::get)
    }

    /// Counts a request answered with `error` (or, for a topic publish, one skipped recipient).
    pub fn refused(&self, code: ErrorCode) {
        self.refused_n(code, 1);
    }

    pub fn refused_n(&self, code: ErrorCode, n: u64) {
        if let Some(c) = self.refused.get(code_index(code)) {
            c.add(n);
        }
    }

    pub fn refused_count(&self, code: ErrorCode) -> u64 {
        self.refused.get(code_index(code)).map_or(0, Counter::get)
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub fn render(&self, g: &ScrapeGauges) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let o = &mut out;
        gauge(
            o,
            "outboxd_connections",
            "WebSocket connections open now.",
            self.connections.get(),
        );
        counter(
            o,
            "outboxd_connections_total",
            "TCP connections accepted on the WebSocket listener.",
            self.connections_total.get(),
        );
        header(
            o,
            "outboxd_connections_closed_total",
            "WebSocket connections closed, by reason.",
            "counter",
        );
        for r in CloseReason::ALL {
            let _ = writeln!(
                o,
                "outboxd_connections_closed_total{{reason=\"{}\"}} {}",
                r.as_str(),
                self.closed_count(r)
            );
        }
        gauge(
            o,
            "outboxd_sessions",
            "Clients with a live session (past hello).",
            g.sessions,
        );
        counter(
            o,
            "outboxd_published_total",
            "Publishes confirmed (ok) after their commit, WebSocket and HTTP; duplicates and outbox_full refusals excluded.",
            self.published.get(),
        );
        counter(
            o,
            "outboxd_stored_messages_total",
            "Message copies written to outboxes (one per recipient).",
            self.stored.get(),
        );
        counter(
            o,
            "outboxd_publish_duplicates_total",
            "Publishes answered duplicate:true (idempotency key seen).",
            self.duplicates.get(),
        );
        counter(
            o,
            "outboxd_delivered_total",
            "msg frames sent to clients, redeliveries included.",
            self.delivered.get(),
        );
        counter(
            o,
            "outboxd_redelivered_total",
            "msg frames sent with redelivered:true.",
            self.redelivered.get(),
        );
        counter(
            o,
            "outboxd_acked_total",
            "Messages deleted by an ack or a resume position.",
            self.acked.get(),
        );
        counter(
            o,
            "outboxd_expired_total",
            "Messages removed unacked by TTL retention (counted in the client's missed).",
            self.expired.get(),
        );
        counter(
            o,
            "outboxd_purged_total",
            "Messages removed unacked by an operator's purge (counted in the client's missed).",
            self.purged.get(),
        );
        header(
            o,
            "outboxd_refused_total",
            "Requests answered with an error, by error code; each recipient a topic publish skipped counts under outbox_full.",
            "counter",
        );
        for code in ERROR_CODES {
            let _ = writeln!(
                o,
                "outboxd_refused_total{{code=\"{}\"}} {}",
                code.as_str(),
                self.refused_count(code)
            );
        }
        gauge(o, "outboxd_outboxes", "Clients with an outbox.", g.outboxes);
        gauge(
            o,
            "outboxd_outbox_pending_messages",
            "Stored (unacked) messages over all outboxes.",
            g.pending_messages,
        );
        gauge(
            o,
            "outboxd_outbox_pending_bytes",
            "Payload bytes of stored messages over all outboxes.",
            g.pending_bytes,
        );
        gauge(
            o,
            "outboxd_outbox_max_pending_messages",
            "Stored messages of the fullest outbox.",
            g.max_pending_messages,
        );
        gauge(
            o,
            "outboxd_outbox_max_pending_bytes",
            "Payload bytes of the largest outbox.",
            g.max_pending_bytes,
        );
        counter(
            o,
            "outboxd_commit_groups_total",
            "Commits of the store (each one flush + fdatasync in fsync mode).",
            self.commit_groups.get(),
        );
        histogram(
            o,
            "outboxd_commit_group_publishes",
            "Publishes confirmed by one commit.",
            &self.commit_group_publishes,
        );
        histogram(
            o,
            "outboxd_commit_duration_seconds",
            "Time one commit's flush + fdatasync took.",
            &self.commit_seconds,
        );
        histogram(
            o,
            "outboxd_checkpoint_duration_seconds",
            "Time one checkpoint (sled's flush and fsyncs, off the commit path) took.",
            &self.checkpoint_seconds,
        );
        gauge(
            o,
            "outboxd_journal_bytes",
            "Commit journal bytes no checkpoint covers yet: what an open after a crash applies again.",
            self.journal_bytes.get(),
        );
        gauge(
            o,
            "outboxd_writes_not_durable",
            "Writes applied outside a commit (held acks mostly) not yet durable: a crash now redelivers them.",
            self.writes_not_durable.get(),
        );
        histogram(
            o,
            "outboxd_publish_to_ack_seconds",
            "Time from a message's publish to the ack that deleted it.",
            &self.publish_to_ack_seconds,
        );
        counter(
            o,
            "outboxd_heartbeat_timeouts_total",
            "Connections closed with 4001: nothing heard for heartbeat.timeout_ms.",
            self.heartbeat_timeouts.get(),
        );
        counter(
            o,
            "outboxd_takeovers_total",
            "Connections replaced by a newer one with the same client id (4000).",
            self.takeovers.get(),
        );
        counter(
            o,
            "outboxd_store_errors_total",
            "Failed store operations (I/O, storage engine, corrupt records, failed commits).",
            self.store_errors.get(),
        );
        gauge(
            o,
            "outboxd_store_latched",
            "1 when the store refuses writes after a failure, else 0.",
            u64::from(g.latched),
        );
        counter(
            o,
            "outboxd_admin_unauthorized_total",
            "Admin API requests refused for a missing or wrong bearer token.",
            self.admin_unauthorized.get(),
        );
        out
    }
}

fn header(o: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} {kind}");
}

fn counter(o: &mut String, name: &str, help: &str, v: u64) {
    header(o, name, help, "counter");
    let _ = writeln!(o, "{name} {v}");
}

fn gauge(o: &mut String, name: &str, help: &str, v: u64) {
    header(o, name, help, "gauge");
    let _ = writeln!(o, "{name} {v}");
}

fn histogram(o: &mut String, name: &str, help: &str, h: &Histogram) {
    header(o, name, help, "histogram");
    let mut cumulative = 0u64;
    for (i, bound) in h.bounds.iter().enumerate() {
        cumulative += h.buckets.get(i).map_or(0, |b| b.load(Ordering::Relaxed));
        let _ = writeln!(o, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    cumulative += h
        .buckets
        .get(h.bounds.len())
        .map_or(0, |b| b.load(Ordering::Relaxed));
    // `+Inf` equals `_count` by definition; both come from the buckets, so a scrape that
    // races an observation still sees a consistent histogram.
    let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(o, "{name}_sum {}", h.sum());
    let _ = writeln!(o, "{name}_count {cumulative}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// `name{labels}` -> value, from the exposition text; checks the line grammar on the way.
    fn parse(text: &str) -> HashMap<String, f64> {
        let mut out = HashMap::new();
        for line in text.lines() {
            if line.starts_with('#') {
                assert!(
                    line.starts_with("# HELP outboxd_") || line.starts_with("# TYPE outboxd_"),
                    "{line}"
                );
                continue;
            }
            let (key, value) = line.rsplit_once(' ').unwrap();
            out.insert(key.to_string(), value.parse::<f64>().unwrap());
        }
        out
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_inf() {
        let m = Metrics::default();
        m.commit_group_publishes.observe(1.0);
        m.commit_group_publishes.observe(3.0);
        m.commit_group_publishes.observe(100_000.0);
        let v = parse(&m.render(&ScrapeGauges::default()));
        assert_eq!(v["outboxd_commit_group_publishes_bucket{le=\"1\"}"], 1.0);
        assert_eq!(v["outboxd_commit_group_publishes_bucket{le=\"2\"}"], 1.0);
        assert_eq!(v["outboxd_commit_group_publishes_bucket{le=\"4\"}"], 2.0);
        assert_eq!(v["outboxd_commit_group_publishes_bucket{le=\"4096\"}"], 2.0);
        assert_eq!(v["outboxd_commit_group_publishes_bucket{le=\"+Inf\"}"], 3.0);
        assert_eq!(v["outboxd_commit_group_publishes_count"], 3.0);
        assert_eq!(v["outboxd_commit_group_publishes_sum"], 100_004.0);
    }

    #[test]
    fn a_value_on_a_bound_falls_in_that_bucket() {
        let m = Metrics::default();
        m.commit_seconds.observe(0.001);
        let v = parse(&m.render(&ScrapeGauges::default()));
        assert_eq!(
            v["outboxd_commit_duration_seconds_bucket{le=\"0.0005\"}"],
            0.0
        );
        assert_eq!(
            v["outboxd_commit_duration_seconds_bucket{le=\"0.001\"}"],
            1.0
        );
    }

    #[test]
    fn labelled_counters_list_every_label_value_even_at_zero() {
        let m = Metrics::default();
        m.closed(CloseReason::HeartbeatTimeout);
        m.refused(ErrorCode::OutboxFull);
        m.refused_n(ErrorCode::OutboxFull, 2);
        let v = parse(&m.render(&ScrapeGauges::default()));
        for r in CloseReason::ALL {
            assert!(v.contains_key(&format!(
                "outboxd_connections_closed_total{{reason=\"{}\"}}",
                r.as_str()
            )));
        }
        assert_eq!(
            v["outboxd_connections_closed_total{reason=\"heartbeat_timeout\"}"],
            1.0
        );
        assert_eq!(v["outboxd_heartbeat_timeouts_total"], 1.0);
        assert_eq!(v["outboxd_refused_total{code=\"outbox_full\"}"], 3.0);
        assert_eq!(v["outboxd_refused_total{code=\"bad_frame\"}"], 0.0);
    }

    #[test]
    fn every_metric_has_help_and_type_once() {
        let text = Metrics::default().render(&ScrapeGauges {
            latched: true,
            ..ScrapeGauges::default()
        });
        let mut seen = std::collections::HashSet::new();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).unwrap();
            assert!(seen.insert(name.to_string()), "{name} declared twice");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no HELP"
            );
        }
        assert!(text.contains("\noutboxd_store_latched 1\n"));
    }

    #[test]
    fn gauge_never_goes_below_zero() {
        let g = Gauge::default();
        g.dec();
        assert_eq!(g.get(), 0);
        g.inc();
        g.dec();
        assert_eq!(g.get(), 0);
    }

    #[test]
    fn close_reasons_index_their_own_slot() {
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        for (i, c) in ERROR_CODES.iter().enumerate() {
            assert_eq!(code_index(*c), i);
        }
    }
}
