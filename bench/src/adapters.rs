//! One publisher and one durable, acking subscriber per system, behind the same calls:
//! - outboxd: the project's own Rust client (`outboxd::client`) over WebSocket;
//! - Mosquitto: rumqttc, MQTT 3.1.1, QoS 1, `clean_session = false`, manual acks; over TCP, or
//!   over WebSocket (`mosquitto-ws`, rumqttc's `websocket` transport);
//! - NATS JetStream: async-nats, an R1 file stream, durable pull consumers, explicit acks; over
//!   TCP, or over WebSocket (`nats-ws`, a `ws://` URL).
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
use crate::stats::{PubStats, SubStats};

/// Same window everywhere: outboxd's default `delivery.max_inflight`.
pub const DELIVERY_WINDOW: usize = 1024;
const STREAM: &str = "BENCH";
const NATS_SUBJECT: &str = "bench.t";
const MQTT_TOPIC: &str = "bench/t";
const OUTBOXD_TOPIC: &str = "bench/t";
const MAX_PACKET: usize = 1 << 20;

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

/// Creates what a system needs before anyone subscribes (NATS: the stream).
pub async fn setup(system: System, endpoint: &str) -> Result<()> {
    if system.protocol() == Protocol::Nats {
        let client = async_nats::connect(endpoint).await?;
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
    let client = async_nats::connect(endpoint).await?;
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
            Ok(Subscriber { task, _mqtt: None })
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
            Ok(Subscriber { task, _mqtt: None })
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
                let client = async_nats::connect(endpoint).await?;
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
        }
    }

    /// Hands one message to the client library. Errors only when the client refuses it
    /// outright; broker refusals are counted in [`PubStats`].
    pub async fn send(&self, body: Vec<u8>) -> Result<()> {
        match self {
            Publisher::Outboxd {
                publisher,
                target,
                pending,
                ..
            } => {
                let text = String::from_utf8(body)?;
                let payload = Payload::json_text(text)?;
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
                let ack = js
                    .publish(subject.clone(), body.into())
                    .await
                    .map_err(|e| anyhow!("nats publish: {e}"))?;
                pending
                    .send(ack)
                    .map_err(|_| anyhow!("the confirmation collector stopped"))?;
            }
        }
        Ok(())
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        match self {
            Publisher::Outboxd { collector, .. } | Publisher::Nats { collector, .. } => {
                collector.abort()
            }
            Publisher::Mqtt { events, .. } => events.abort(),
        }
    }
}
