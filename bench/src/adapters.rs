//! One publisher and one durable, acking subscriber per system, behind the same calls:
//! - outboxd: the project's own Rust client (`outboxd::client`) over WebSocket;
//! - Mosquitto: rumqttc, MQTT 3.1.1, QoS 1, `clean_session = false`, manual acks; over TCP, or
//!   over WebSocket (`mosquitto-ws`, rumqttc's `websocket` transport);
//! - NATS JetStream: async-nats, an R1 file stream, durable pull consumers, explicit acks; over
//!   TCP, or over WebSocket (`nats-ws`, a `ws://` URL);
//! - Redis Streams (`appendfsync always`): the bench's own RESP2 client ([`crate::resp`], which
//!   says why not the `redis` crate). One stream per subscriber, `bench:sub-N`, is its outbox:
//!   the publisher XADDs to it (pipelined; the XADD's reply is the confirmation, and Redis sends
//!   it only after the AOF holding the entry is fdatasync'd); the subscriber reads it through a
//!   consumer group (`XREADGROUP ... COUNT 512 BLOCK`) and, per batch, `XACK`s and `XDEL`s what
//!   it recorded, so acked messages are gone as from an outbox. Fan-out keeps that shape: one
//!   stream per subscriber, and the publisher writes every copy in one `MULTI`/`EXEC` (all
//!   copies or none, confirmed by the EXEC's reply), as outboxd writes one copy per outbox
//!   before its `ok`. One shared stream with a group per subscriber would write one copy, a
//!   different (cheaper) promise from the one outboxd keeps, and would leave acked entries in
//!   the stream until every group acked them.
//! - RabbitMQ (quorum queues): lapin, AMQP 0-9-1. One durable quorum queue per subscriber,
//!   `bench.sub-N`, is its outbox: a direct publish goes to it through the default exchange
//!   (routing key = the queue's name); fan-out goes through the fanout exchange `bench.fanout`,
//!   to which every subscriber binds its own queue, so each publish is stored once per
//!   subscriber, as outboxd writes one copy per outbox. Messages are persistent
//!   (`delivery_mode` 2) and published `mandatory` on a channel in confirm mode: the confirm
//!   (sent once every queue it went to has the message in its fsync'd Raft log) is the
//!   confirmation, and a returned (unroutable) message counts as a failure. The subscriber
//!   consumes with manual acks and a prefetch of [`DELIVERY_WINDOW`].
//!
//! A subscriber hands every delivery to its [`SubStats`] and then acks it. A publisher returns
//! from [`Publisher::send`] once the message is handed to its client library; the broker's
//! confirmation is counted later in [`PubStats`] (and frees one slot of its window).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use outboxd::client::{Client, Incoming, Payload};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::brokers::{Protocol, System};
use crate::resp::{self, Value};
use crate::stats::{PubStats, SubStats};

/// Same window everywhere: outboxd's default `delivery.max_inflight`.
pub const DELIVERY_WINDOW: usize = 1024;
const STREAM: &str = "BENCH";
const NATS_SUBJECT: &str = "bench.t";
const MQTT_TOPIC: &str = "bench/t";
const OUTBOXD_TOPIC: &str = "bench/t";
const MAX_PACKET: usize = 1 << 20;
/// The consumer group every Redis subscriber reads its stream through.
const REDIS_GROUP: &str = "bench";
/// The set of the streams subscribed to the topic (fan-out).
const REDIS_TOPIC_SET: &str = "bench:topic";
/// The field of a stream entry that holds the body.
const REDIS_FIELD: &str = "b";
/// Entries one XREADGROUP may return: the subscriber's window of unacked messages.
const REDIS_READ_COUNT: &str = "512";
/// How long an XREADGROUP waits for entries, ms (then it asks again).
const REDIS_BLOCK_MS: &str = "1000";
/// Bytes of queued commands a Redis publisher writes at once.
const REDIS_WRITE_BATCH: usize = 1 << 20;
/// The exchange every RabbitMQ subscriber of the topic binds its queue to (fan-out).
const AMQP_FANOUT: &str = "bench.fanout";

/// Where one publisher's messages go.
#[derive(Debug, Clone, Copy)]
pub enum Route {
    /// To one subscriber, `sub-0` (outboxd: a direct publish to `client:sub-0`).
    One,
    /// To every subscriber (outboxd: a topic publish, fan-out on write).
    All,
    /// Pair `i`: to subscriber `sub-i` only (outboxd: a direct publish to `client:sub-i`;
    /// MQTT: topic `bench/t/i`; NATS: subject `bench.t.i`, the consumer filtered on it).
    Pair(usize),
}

impl Route {
    fn outboxd_target(self) -> String {
        match self {
            Route::One => "client:sub-0".into(),
            Route::Pair(i) => format!("client:sub-{i}"),
            Route::All => format!("topic:{OUTBOXD_TOPIC}"),
        }
    }

    fn mqtt_topic(self) -> String {
        match self {
            Route::Pair(i) => format!("{MQTT_TOPIC}/{i}"),
            Route::One | Route::All => MQTT_TOPIC.into(),
        }
    }

    fn nats_subject(self) -> String {
        match self {
            Route::Pair(i) => format!("{NATS_SUBJECT}.{i}"),
            Route::One | Route::All => NATS_SUBJECT.into(),
        }
    }

    /// The subscriber streams a Redis publisher writes to (`None`: those subscribed to the
    /// topic, read from [`REDIS_TOPIC_SET`]).
    fn redis_streams(self) -> Option<Vec<String>> {
        match self {
            Route::One => Some(vec![redis_stream("sub-0")]),
            Route::Pair(i) => Some(vec![redis_stream(&format!("sub-{i}"))]),
            Route::All => None,
        }
    }

    /// The exchange and routing key a RabbitMQ publisher publishes with: the default exchange
    /// and the subscriber's queue, or the fanout exchange.
    fn amqp_target(self) -> (&'static str, String) {
        match self {
            Route::One => ("", amqp_queue("sub-0")),
            Route::Pair(i) => ("", amqp_queue(&format!("sub-{i}"))),
            Route::All => (AMQP_FANOUT, String::new()),
        }
    }

    /// The subject a NATS consumer is filtered on; `None`: the whole stream.
    fn nats_filter(self) -> Option<String> {
        match self {
            Route::Pair(_) => Some(self.nats_subject()),
            Route::One | Route::All => None,
        }
    }
}

/// Where and how an MQTT client connects, and nothing else: `HOST:PORT` is MQTT over TCP,
/// `ws://HOST:PORT/PATH` MQTT over WebSocket.
///
/// Errors when the endpoint is neither.
pub fn mqtt_connect_options(endpoint: &str, name: &str) -> Result<MqttOptions> {
    if endpoint.starts_with("ws://") {
        // For WebSocket, rumqttc takes the host and port from the URL and ignores the port
        // argument.
        let mut o = MqttOptions::new(name, endpoint, 0);
        o.set_transport(Transport::Ws);
        return Ok(o);
    }
    let (host, port) = endpoint
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("bad MQTT endpoint {endpoint}"))?;
    Ok(MqttOptions::new(name, host, port.parse()?))
}

/// Subscriber `name`'s stream: its outbox.
fn redis_stream(name: &str) -> String {
    format!("bench:{name}")
}

/// Subscriber `name`'s quorum queue: its outbox.
fn amqp_queue(name: &str) -> String {
    format!("bench.{name}")
}

/// AMQP's smallest frame (bytes), asked for by the clients of the many-connection workloads.
///
/// lapin gives every connection a send and a receive buffer of 32 frames each, filled in
/// when allocated: at RabbitMQ's default `frame_max` (128 KiB) that is 8 MiB of the load
/// generator's memory per connection, 8 GiB for 1 000 idle connections, and more than this
/// machine has for the pairs and idle workloads. With 4 KiB frames it is 256 KiB; a larger
/// message just takes several body frames.
pub const AMQP_SMALL_FRAME_MAX: u32 = 4096;

/// `endpoint` with `frame_max` set to [`AMQP_SMALL_FRAME_MAX`], for workloads of many
/// connections, and `extra` query parameters (`key=value&...`, or empty).
pub fn amqp_small_uri(endpoint: &str, extra: &str) -> String {
    let sep = if extra.is_empty() { "" } else { "&" };
    format!("{endpoint}?frame_max={AMQP_SMALL_FRAME_MAX}{sep}{extra}")
}

/// Connects to RabbitMQ at `endpoint` (`amqp://...`), naming the connection `name`; a pair's
/// client (the pairs workload: thousands of connections) asks for small frames.
async fn amqp_connect(endpoint: &str, name: &str, route: Route) -> Result<lapin::Connection> {
    let uri = match route {
        Route::Pair(_) => amqp_small_uri(endpoint, ""),
        Route::One | Route::All => endpoint.to_string(),
    };
    lapin::Connection::connect(
        &uri,
        lapin::ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await
    .with_context(|| format!("rabbitmq: connecting {name}"))
}

/// A lapin call that is under way: it queued its frames when first polled; what is left is
/// waiting for them to be written (and whatever the call awaits after that).
type AmqpCall<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// Polls `call` once and returns the rest of it. lapin queues a call's frames for its
/// connection's I/O thread on the first poll and then waits for the thread to write them;
/// awaiting each publish or ack in turn would hand every message from a tokio worker to that
/// thread and back, one at a time. Polled once here, the calls queue in order, and their
/// completions are awaited in order by a collector task.
async fn amqp_start<T: Send + 'static>(
    call: impl std::future::Future<Output = T> + Send + 'static,
) -> AmqpCall<T> {
    let mut call: AmqpCall<T> = Box::pin(call);
    match futures_util::poll!(&mut call) {
        std::task::Poll::Ready(v) => Box::pin(std::future::ready(v)),
        std::task::Poll::Pending => call,
    }
}

/// Declares the fanout exchange of the topic (idempotent).
async fn amqp_declare_fanout(ch: &lapin::Channel) -> Result<()> {
    ch.exchange_declare(
        AMQP_FANOUT.into(),
        lapin::ExchangeKind::Fanout,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .context("rabbitmq: declaring the fanout exchange")
}

/// Declares subscriber `name`'s quorum queue if missing (and, for the topic, binds it to the
/// fanout exchange), so messages published from now on are kept for it. Returns its name.
async fn amqp_register(ch: &lapin::Channel, name: &str, route: Route) -> Result<String> {
    use lapin::types::{AMQPValue, FieldTable};
    let queue = amqp_queue(name);
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        queue.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .with_context(|| format!("rabbitmq: declaring the quorum queue {queue}"))?;
    if let Route::All = route {
        amqp_declare_fanout(ch).await?;
        ch.queue_bind(
            queue.as_str().into(),
            AMQP_FANOUT.into(),
            "".into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("rabbitmq: binding {queue} to {AMQP_FANOUT}"))?;
    }
    Ok(queue)
}

/// Creates subscriber `name`'s stream and consumer group if missing (and, for the topic, adds
/// the stream to the topic's set), so messages published from now on are kept for it.
async fn redis_register(conn: &mut resp::Conn, name: &str, route: Route) -> Result<String> {
    let stream = redis_stream(name);
    let created = conn
        .pipeline(&[&[
            "XGROUP",
            "CREATE",
            stream.as_str(),
            REDIS_GROUP,
            "0",
            "MKSTREAM",
        ]])
        .await?;
    match created.into_iter().next() {
        Some(Value::Error(e)) if e.starts_with("BUSYGROUP") => {}
        Some(v) => {
            v.ok()?;
        }
        None => bail!("redis: no reply to XGROUP CREATE"),
    }
    if let Route::All = route {
        conn.call(&["SADD", REDIS_TOPIC_SET, stream.as_str()])
            .await?;
    }
    Ok(stream)
}

/// One Redis subscriber's life: reads its stream through the group, records every entry, and
/// acks and deletes each batch in the same write as the next read. Returns on a connection
/// error (the caller reconnects); entries read but not acked stay pending in the group and are
/// read again, from `0`, after the reconnect.
async fn redis_subscribe(conn: &mut resp::Conn, stream: &str, stats: &SubStats) -> Result<()> {
    // Pending entries first (delivered to an earlier connection, never acked), then new ones.
    let mut from = "0";
    let mut done: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut cmds: Vec<Vec<&[u8]>> = Vec::with_capacity(3);
        if !done.is_empty() {
            for verb in ["XACK", "XDEL"] {
                let mut c: Vec<&[u8]> = vec![verb.as_bytes(), stream.as_bytes()];
                if verb == "XACK" {
                    c.push(REDIS_GROUP.as_bytes());
                }
                c.extend(done.iter().map(|id| id.as_slice()));
                cmds.push(c);
            }
        }
        cmds.push(
            [
                "XREADGROUP",
                "GROUP",
                REDIS_GROUP,
                "c",
                "COUNT",
                REDIS_READ_COUNT,
                "BLOCK",
                REDIS_BLOCK_MS,
                "STREAMS",
                stream,
                from,
            ]
            .iter()
            .map(|a| a.as_bytes())
            .collect(),
        );
        let refs: Vec<&[&[u8]]> = cmds.iter().map(|c| c.as_slice()).collect();
        let mut replies = conn.pipeline(&refs).await?;
        let read = replies
            .pop()
            .ok_or_else(|| anyhow!("redis: no reply to XREADGROUP"))?;
        for r in replies {
            r.ok()?;
        }
        done.clear();
        // [[stream, [[id, [field, value, ...] or nil], ...]]], or nil when BLOCK timed out.
        let mut entries = Vec::new();
        for per_stream in read.into_array()? {
            let mut parts = per_stream.into_array()?.into_iter();
            entries.extend(
                parts
                    .nth(1)
                    .map(Value::into_array)
                    .transpose()?
                    .into_iter()
                    .flatten(),
            );
        }
        if from == "0" && entries.is_empty() {
            from = ">";
        }
        for entry in entries {
            let mut parts = entry.into_array()?.into_iter();
            let id = parts
                .next()
                .ok_or_else(|| anyhow!("redis: an entry without an id"))?
                .into_bytes()?;
            // A pending entry deleted meanwhile comes back with nil fields: nothing to record.
            let fields = parts
                .next()
                .map(Value::into_array)
                .transpose()?
                .unwrap_or_default();
            let mut it = fields.into_iter();
            while let (Some(f), Some(v)) = (it.next(), it.next()) {
                if f.into_bytes()? == REDIS_FIELD.as_bytes() {
                    stats.on_delivery(&v.into_bytes()?);
                }
            }
            done.push(id);
        }
    }
}

/// Connects an async-nats client to `endpoint` (`nats://` or `ws://`).
///
/// Over `ws://`, async-nats (0.51, and 0.52 alike) opens its socket through tokio-websockets
/// and, unlike on its TCP path, never sets `TCP_NODELAY` on it. A pull consumer then stalls:
/// its acks and its next pull request are small writes, Nagle's algorithm holds the pull
/// request back until the server ACKs the acks, and the server's delayed ACK comes 40 ms
/// later, so a subscriber got one batch of 200 (async-nats's default) per 40 ms, about 5k
/// msg/s whatever the broker could do. The harness sets the option itself once the client is
/// connected (see [`set_nodelay_towards`]), as async-nats does over TCP.
async fn nats_connect(endpoint: &str) -> Result<async_nats::Client> {
    let client = async_nats::connect(endpoint).await?;
    if let Some(rest) = endpoint.strip_prefix("ws://") {
        let authority = rest.split('/').next().unwrap_or(rest);
        let peer: std::net::SocketAddr = authority
            .parse()
            .with_context(|| format!("nats-ws endpoint {endpoint}: not IP:PORT"))?;
        let set = set_nodelay_towards(peer)?;
        if set == 0 {
            bail!("nats-ws: found no socket of this process connected to {peer} to set TCP_NODELAY on");
        }
    }
    Ok(client)
}

/// Sets `TCP_NODELAY` on every TCP socket of this process whose peer is `peer`; returns how
/// many such sockets there are. Reads the process's open files from /proc/self/fd (Linux).
fn set_nodelay_towards(peer: std::net::SocketAddr) -> Result<usize> {
    use std::os::fd::{BorrowedFd, RawFd};
    let mut found = 0;
    for entry in std::fs::read_dir("/proc/self/fd").context("listing /proc/self/fd")? {
        let Ok(entry) = entry else { continue };
        let is_socket = std::fs::read_link(entry.path())
            .map(|t| t.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false);
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // SAFETY: the descriptor is open (just listed) and only borrowed for the two calls
        // below, which fail harmlessly if another task closed it meanwhile.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let to_peer = sock
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .is_some_and(|a| a == peer);
        if to_peer && sock.r#type().ok() == Some(socket2::Type::STREAM) {
            sock.set_tcp_nodelay(true)
                .with_context(|| format!("setting TCP_NODELAY on a socket to {peer}"))?;
            found += 1;
        }
    }
    Ok(found)
}

/// Creates what a system needs before anyone subscribes (NATS: the stream).
pub async fn setup(system: System, endpoint: &str) -> Result<()> {
    if system.protocol() == Protocol::Nats {
        let client = nats_connect(endpoint).await?;
        let js = jetstream::new(client);
        js.get_or_create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec!["bench.>".into()],
            storage: stream::StorageType::File,
            num_replicas: 1,
            // Like an outbox: a message is removed once every consumer has acked it.
            retention: stream::RetentionPolicy::Interest,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("creating the stream: {e}"))?;
    }
    Ok(())
}

/// A running subscriber; dropping it stops it (abruptly, like a crash).
pub struct Subscriber {
    task: JoinHandle<()>,
    /// Kept so the MQTT connection is closed with its client.
    _mqtt: Option<AsyncClient>,
    /// Kept so the AMQP connection lives as long as the subscriber.
    _amqp: Option<lapin::Connection>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn outboxd_client(endpoint: &str, name: &str) -> outboxd::client::ClientBuilder {
    Client::builder(endpoint, name)
        .backoff(Duration::from_millis(50), Duration::from_secs(1))
        .connect_timeout(Some(Duration::from_secs(60)))
}

fn mqtt_options(
    endpoint: &str,
    name: &str,
    clean: bool,
    keep_alive: Duration,
) -> Result<MqttOptions> {
    let mut o = mqtt_connect_options(endpoint, name)?;
    o.set_clean_session(clean)
        .set_keep_alive(keep_alive)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_inflight(u16::try_from(DELIVERY_WINDOW).unwrap_or(u16::MAX))
        .set_request_channel_capacity(16 * 1024);
    Ok(o)
}

async fn nats_consumer(
    endpoint: &str,
    name: &str,
    route: Route,
) -> Result<(async_nats::Client, consumer::PullConsumer)> {
    let client = nats_connect(endpoint).await?;
    let js = jetstream::new(client.clone());
    let stream = js
        .get_stream(STREAM)
        .await
        .map_err(|e| anyhow!("getting the stream: {e}"))?;
    let consumer = stream
        .get_or_create_consumer(
            name,
            consumer::pull::Config {
                durable_name: Some(name.to_string()),
                ack_policy: consumer::AckPolicy::Explicit,
                deliver_policy: consumer::DeliverPolicy::All,
                filter_subject: route.nats_filter().unwrap_or_default(),
                max_ack_pending: i64::try_from(DELIVERY_WINDOW).unwrap_or(1000),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| anyhow!("creating consumer {name}: {e}"))?;
    Ok((client, consumer))
}

/// Makes `name` a durable subscriber of the route and disconnects, so messages published
/// while it is away are kept for it (the offline-backlog case).
pub async fn register_offline(
    system: System,
    endpoint: &str,
    name: &str,
    route: Route,
) -> Result<()> {
    match system.protocol() {
        Protocol::Outboxd => {
            let client = outboxd_client(endpoint, name).connect().await?;
            if let Route::All = route {
                client.subscribe(OUTBOXD_TOPIC).await?;
            }
            client.close().await;
        }
        Protocol::Mqtt => {
            let (client, mut events) = AsyncClient::new(
                mqtt_options(endpoint, name, false, Duration::from_secs(60))?,
                64,
            );
            client
                .subscribe(route.mqtt_topic(), QoS::AtLeastOnce)
                .await?;
            loop {
                match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => bail!("mqtt subscribe: {e}"),
                    Err(_) => bail!("mqtt subscribe: no SubAck within 10 s"),
                }
            }
            client.disconnect().await?;
            // Let the event loop send the DISCONNECT.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while events.poll().await.is_ok() {}
            })
            .await;
        }
        Protocol::Nats => {
            let (client, _consumer) = nats_consumer(endpoint, name, route).await?;
            client.flush().await?;
        }
        Protocol::Redis => {
            let mut conn = resp::Conn::open(endpoint).await?;
            redis_register(&mut conn, name, route).await?;
        }
        Protocol::Amqp => {
            let conn = amqp_connect(endpoint, name, route).await?;
            let ch = conn.create_channel().await?;
            amqp_register(&ch, name, route).await?;
            conn.close(200, "registered".into()).await?;
        }
    }
    Ok(())
}

/// Connects subscriber `name` and returns once its subscription is in place.
pub async fn subscriber(
    system: System,
    endpoint: &str,
    name: &str,
    route: Route,
    stats: Arc<SubStats>,
) -> Result<Subscriber> {
    match system.protocol() {
        Protocol::Outboxd => {
            let mut client = outboxd_client(endpoint, name).connect().await?;
            if let Route::All = route {
                client.subscribe(OUTBOXD_TOPIC).await?;
            }
            let task = tokio::spawn(async move {
                while let Some(item) = client.next().await {
                    if let Incoming::Delivery(d) = item {
                        stats.on_delivery(d.payload.as_json_text().unwrap_or("").as_bytes());
                        let _ = d.ack();
                    }
                }
            });
            Ok(Subscriber {
                task,
                _mqtt: None,
                _amqp: None,
            })
        }
        Protocol::Mqtt => {
            let mut opts = mqtt_options(endpoint, name, false, Duration::from_secs(60))?;
            opts.set_manual_acks(true);
            let (client, mut events) = AsyncClient::new(opts, 16 * 1024);
            client
                .subscribe(route.mqtt_topic(), QoS::AtLeastOnce)
                .await?;
            let (ready_tx, ready) = oneshot::channel::<()>();
            let acker = client.clone();
            let task = tokio::spawn(async move {
                let mut ready_tx = Some(ready_tx);
                loop {
                    match events.poll().await {
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            stats.on_delivery(&p.payload);
                            if acker.try_ack(&p).is_err() {
                                let _ = acker.ack(&p).await;
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(tx) = ready_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            eprintln!("mqtt subscriber: {e}; reconnecting");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
            tokio::time::timeout(Duration::from_secs(30), ready)
                .await
                .context("mqtt: no SubAck within 30 s")?
                .map_err(|_| anyhow!("mqtt subscriber ended before its SubAck"))?;
            Ok(Subscriber {
                task,
                _mqtt: Some(client),
                _amqp: None,
            })
        }
        Protocol::Nats => {
            let (_client, consumer) = nats_consumer(endpoint, name, route).await?;
            let mut messages = consumer
                .messages()
                .await
                .map_err(|e| anyhow!("consumer messages: {e}"))?;
            let task = tokio::spawn(async move {
                while let Some(m) = messages.next().await {
                    match m {
                        Ok(m) => {
                            stats.on_delivery(&m.payload);
                            let _ = m.ack().await;
                        }
                        Err(e) => eprintln!("nats subscriber: {e}"),
                    }
                }
            });
            Ok(Subscriber {
                task,
                _mqtt: None,
                _amqp: None,
            })
        }
        Protocol::Redis => {
            let mut conn = resp::Conn::open(endpoint).await?;
            let stream = redis_register(&mut conn, name, route).await?;
            let endpoint = endpoint.to_string();
            let task = tokio::spawn(async move {
                loop {
                    if let Err(e) = redis_subscribe(&mut conn, &stream, &stats).await {
                        eprintln!("redis subscriber: {e:#}; reconnecting");
                    }
                    loop {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        match resp::Conn::open(&endpoint).await {
                            Ok(c) => {
                                conn = c;
                                break;
                            }
                            Err(e) => eprintln!("redis subscriber: {e:#}"),
                        }
                    }
                }
            });
            Ok(Subscriber {
                task,
                _mqtt: None,
                _amqp: None,
            })
        }
        Protocol::Amqp => {
            use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
            let conn = amqp_connect(endpoint, name, route).await?;
            let ch = conn.create_channel().await?;
            let queue = amqp_register(&ch, name, route).await?;
            // The subscriber's window of unacked deliveries, as for the other systems.
            ch.basic_qos(
                u16::try_from(DELIVERY_WINDOW).unwrap_or(u16::MAX),
                BasicQosOptions::default(),
            )
            .await?;
            let mut consumer = ch
                .basic_consume(
                    queue.as_str().into(),
                    name.into(),
                    BasicConsumeOptions::default(),
                    lapin::types::FieldTable::default(),
                )
                .await
                .with_context(|| format!("rabbitmq: consuming from {queue}"))?;
            // One basic.ack per delivery, queued in order (see `amqp_start`); their
            // completions are awaited by a second task.
            let (acks, mut acked) = mpsc::unbounded_channel::<AmqpCall<lapin::Result<()>>>();
            let task = tokio::spawn(async move {
                let collector = tokio::spawn(async move {
                    while let Some(a) = acked.recv().await {
                        if let Err(e) = a.await {
                            eprintln!("rabbitmq subscriber: ack: {e}");
                        }
                    }
                });
                while let Some(d) = consumer.next().await {
                    match d {
                        Ok(d) => {
                            stats.on_delivery(&d.data);
                            let ch = ch.clone();
                            let tag = d.delivery_tag;
                            let ack = amqp_start(async move {
                                ch.basic_ack(tag, BasicAckOptions::default()).await
                            })
                            .await;
                            if acks.send(ack).is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            eprintln!("rabbitmq subscriber: {e}");
                            break;
                        }
                    }
                }
                collector.abort();
            });
            Ok(Subscriber {
                task,
                _mqtt: None,
                _amqp: Some(conn),
            })
        }
    }
}

/// The broker's answer to one outboxd publish.
type Confirmation = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// A connected publisher.
pub enum Publisher {
    Outboxd {
        _client: Client,
        publisher: outboxd::client::Publisher,
        target: String,
        pending: mpsc::UnboundedSender<Confirmation>,
        collector: JoinHandle<()>,
    },
    Mqtt {
        client: AsyncClient,
        topic: String,
        events: JoinHandle<()>,
    },
    Nats {
        js: jetstream::Context,
        subject: String,
        pending: mpsc::UnboundedSender<jetstream::context::PublishAckFuture>,
        collector: JoinHandle<()>,
    },
    Redis {
        /// The subscribers' streams every message goes to (one, or all of the topic's).
        streams: Vec<String>,
        /// Encoded commands, one message's at a time, to the writer task.
        queue: mpsc::UnboundedSender<Vec<u8>>,
        writer: JoinHandle<()>,
        collector: JoinHandle<()>,
    },
    Amqp {
        _conn: lapin::Connection,
        channel: lapin::Channel,
        exchange: &'static str,
        routing_key: String,
        pending: mpsc::UnboundedSender<AmqpCall<lapin::Result<lapin::PublisherConfirm>>>,
        collector: JoinHandle<()>,
    },
}

impl Publisher {
    pub async fn connect(
        system: System,
        endpoint: &str,
        name: &str,
        route: Route,
        stats: Arc<PubStats>,
    ) -> Result<Publisher> {
        match system.protocol() {
            Protocol::Outboxd => {
                let client = outboxd_client(endpoint, name).connect().await?;
                let target = route.outboxd_target();
                let (pending, mut rx) = mpsc::unbounded_channel::<Confirmation>();
                // Confirmations come back in publish order, so awaiting them in order is exact.
                let collector = tokio::spawn(async move {
                    while let Some(p) = rx.recv().await {
                        match p.await {
                            Ok(()) => stats.confirm(),
                            Err(e) => stats.fail(e),
                        }
                    }
                });
                Ok(Publisher::Outboxd {
                    publisher: client.publisher(),
                    _client: client,
                    target,
                    pending,
                    collector,
                })
            }
            Protocol::Mqtt => {
                let (client, mut ev) = AsyncClient::new(
                    mqtt_options(endpoint, name, true, Duration::from_secs(60))?,
                    16 * 1024,
                );
                let (ready_tx, ready) = oneshot::channel::<()>();
                let events = tokio::spawn(async move {
                    let mut ready_tx = Some(ready_tx);
                    loop {
                        match ev.poll().await {
                            Ok(Event::Incoming(Packet::PubAck(_))) => stats.confirm(),
                            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                if let Some(tx) = ready_tx.take() {
                                    let _ = tx.send(());
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                stats.fail(format!("mqtt publisher connection: {e}"));
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                });
                tokio::time::timeout(Duration::from_secs(30), ready)
                    .await
                    .context("mqtt: no ConnAck within 30 s")?
                    .map_err(|_| anyhow!("mqtt publisher ended before its ConnAck"))?;
                Ok(Publisher::Mqtt {
                    client,
                    topic: route.mqtt_topic(),
                    events,
                })
            }
            Protocol::Nats => {
                let client = nats_connect(endpoint).await?;
                let js = jetstream::new(client);
                let (pending, mut rx) =
                    mpsc::unbounded_channel::<jetstream::context::PublishAckFuture>();
                let collector = tokio::spawn(async move {
                    while let Some(p) = rx.recv().await {
                        match p.await {
                            Ok(_) => stats.confirm(),
                            Err(e) => stats.fail(e.to_string()),
                        }
                    }
                });
                Ok(Publisher::Nats {
                    js,
                    subject: route.nats_subject(),
                    pending,
                    collector,
                })
            }
            Protocol::Redis => {
                let (mut replies, mut write) = resp::connect(endpoint).await?;
                let streams = match route.redis_streams() {
                    Some(s) => s,
                    None => {
                        let mut conn = resp::Conn::open(endpoint).await?;
                        let mut s: Vec<String> = conn
                            .call(&["SMEMBERS", REDIS_TOPIC_SET])
                            .await?
                            .into_array()?
                            .into_iter()
                            .map(|v| v.into_bytes().map(|b| String::from_utf8_lossy(&b).into()))
                            .collect::<Result<_>>()?;
                        s.sort();
                        s
                    }
                };
                if streams.is_empty() {
                    bail!("redis: no subscriber streams to publish to");
                }
                // One reply per message, or MULTI's +OK, a +QUEUED per copy and EXEC's array.
                let per_message = if streams.len() == 1 {
                    1
                } else {
                    streams.len() + 2
                };
                let (queue, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
                // Everything queued since the last write goes out in one write: the pipeline.
                let writer_stats = Arc::clone(&stats);
                let writer = tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    while let Some(mut buf) = rx.recv().await {
                        while buf.len() < REDIS_WRITE_BATCH {
                            match rx.try_recv() {
                                Ok(more) => buf.extend_from_slice(&more),
                                Err(_) => break,
                            }
                        }
                        if let Err(e) = write.write_all(&buf).await {
                            writer_stats.fail(format!("redis publisher: writing: {e}"));
                            return;
                        }
                    }
                });
                // Replies come back in command order: every `per_message` replies answer one
                // message, the last of them its confirmation.
                let collector = tokio::spawn(async move {
                    let mut failed: Option<String> = None;
                    let mut at = 0;
                    loop {
                        let v = match replies.next().await {
                            Ok(v) => v,
                            Err(e) => {
                                stats.fail(format!("redis publisher: {e:#}"));
                                return;
                            }
                        };
                        at += 1;
                        match v {
                            Value::Error(e) => {
                                failed.get_or_insert(e);
                            }
                            // An EXEC that discarded its transaction.
                            Value::Array(None) if at == per_message && per_message > 1 => {
                                failed.get_or_insert("EXEC aborted".into());
                            }
                            _ => {}
                        }
                        if at == per_message {
                            match failed.take() {
                                None => stats.confirm(),
                                Some(e) => stats.fail(format!("redis: {e}")),
                            }
                            at = 0;
                        }
                    }
                });
                Ok(Publisher::Redis {
                    streams,
                    queue,
                    writer,
                    collector,
                })
            }
            Protocol::Amqp => {
                let conn = amqp_connect(endpoint, name, route).await?;
                let channel = conn.create_channel().await?;
                channel
                    .confirm_select(lapin::options::ConfirmSelectOptions::default())
                    .await?;
                let (exchange, routing_key) = route.amqp_target();
                if !exchange.is_empty() {
                    amqp_declare_fanout(&channel).await?;
                }
                let (pending, mut rx) =
                    mpsc::unbounded_channel::<AmqpCall<lapin::Result<lapin::PublisherConfirm>>>();
                // Confirms come back in publish order on one channel (possibly several at
                // once, `multiple`), so awaiting them in order is exact: first the publish's
                // write, then its confirm.
                let collector = tokio::spawn(async move {
                    while let Some(p) = rx.recv().await {
                        let confirmed = match p.await {
                            Ok(c) => c.await,
                            Err(e) => Err(e),
                        };
                        match confirmed {
                            Ok(lapin::Confirmation::Ack(None)) => stats.confirm(),
                            Ok(lapin::Confirmation::Ack(Some(m))) => stats.fail(format!(
                                "rabbitmq: returned unroutable: {} {}",
                                m.reply_code, m.reply_text
                            )),
                            Ok(lapin::Confirmation::Nack(_)) => stats.fail("rabbitmq: nack".into()),
                            Ok(lapin::Confirmation::NotRequested) => {
                                stats.fail("rabbitmq: the channel is not in confirm mode".into())
                            }
                            Err(e) => stats.fail(format!("rabbitmq: {e}")),
                        }
                    }
                });
                Ok(Publisher::Amqp {
                    _conn: conn,
                    channel,
                    exchange,
                    routing_key,
                    pending,
                    collector,
                })
            }
        }
    }

    /// Hands one message to the client library. Errors only when the client refuses it
    /// outright; broker refusals are counted in [`PubStats`].
    pub async fn send(&self, body: String) -> Result<()> {
        match self {
            Publisher::Outboxd {
                publisher,
                target,
                pending,
                ..
            } => {
                let payload = Payload::json_text(body)?;
                let mut p = publisher.publish(target.as_str(), payload).start();
                // `start()` (outboxd::client) queues the request only when its future is first
                // polled, despite its doc; awaiting confirmations one by one would then send
                // one publish at a time. Polling once here queues it now, in send order.
                let answer: Confirmation = match futures_util::poll!(&mut p) {
                    std::task::Poll::Ready(r) => {
                        Box::pin(std::future::ready(r.map(|_| ()).map_err(|e| e.to_string())))
                    }
                    std::task::Poll::Pending => {
                        Box::pin(async move { p.await.map(|_| ()).map_err(|e| e.to_string()) })
                    }
                };
                pending
                    .send(answer)
                    .map_err(|_| anyhow!("the confirmation collector stopped"))?;
            }
            Publisher::Mqtt { client, topic, .. } => {
                let body = body.into_bytes();
                client
                    .publish(topic.as_str(), QoS::AtLeastOnce, false, body)
                    .await?;
            }
            Publisher::Nats {
                js,
                subject,
                pending,
                ..
            } => {
                let body = body.into_bytes();
                let ack = js
                    .publish(subject.clone(), body.into())
                    .await
                    .map_err(|e| anyhow!("nats publish: {e}"))?;
                pending
                    .send(ack)
                    .map_err(|_| anyhow!("the confirmation collector stopped"))?;
            }
            Publisher::Redis { streams, queue, .. } => {
                let body = body.into_bytes();
                let mut cmd = Vec::with_capacity(streams.len() * (body.len() + 64) + 32);
                let many = streams.len() > 1;
                if many {
                    resp::encode(&["MULTI"], &mut cmd);
                }
                for s in streams {
                    resp::encode(
                        &[b"XADD", s.as_bytes(), b"*", REDIS_FIELD.as_bytes(), &body],
                        &mut cmd,
                    );
                }
                if many {
                    resp::encode(&["EXEC"], &mut cmd);
                }
                queue
                    .send(cmd)
                    .map_err(|_| anyhow!("the redis writer stopped"))?;
            }
            Publisher::Amqp {
                channel,
                exchange,
                routing_key,
                pending,
                ..
            } => {
                let channel = channel.clone();
                let exchange: lapin::types::ShortString = (*exchange).into();
                let routing_key: lapin::types::ShortString = routing_key.as_str().into();
                let publish = amqp_start(async move {
                    channel
                        .basic_publish(
                            exchange,
                            routing_key,
                            lapin::options::BasicPublishOptions {
                                mandatory: true,
                                ..Default::default()
                            },
                            body.as_bytes(),
                            // 2: persistent.
                            lapin::BasicProperties::default().with_delivery_mode(2),
                        )
                        .await
                })
                .await;
                pending
                    .send(publish)
                    .map_err(|_| anyhow!("the confirmation collector stopped"))?;
            }
        }
        Ok(())
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        match self {
            Publisher::Outboxd { collector, .. }
            | Publisher::Nats { collector, .. }
            | Publisher::Amqp { collector, .. } => collector.abort(),
            Publisher::Mqtt { events, .. } => events.abort(),
            Publisher::Redis {
                writer, collector, ..
            } => {
                writer.abort();
                collector.abort();
            }
        }
    }
}
