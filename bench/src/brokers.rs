//! Starting and stopping the brokers on fresh data directories (outboxd, Mosquitto, NATS
//! JetStream, Redis, RabbitMQ; Mosquitto and NATS with or without their WebSocket listener;
//! outboxd on PostgreSQL, one broker or three on one database), and reading their processes'
//! CPU, memory, disk writes and fsync calls.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::pg;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum System {
    #[default]
    Outboxd,
    Mosquitto,
    Nats,
    /// Mosquitto through its WebSocket listener (MQTT over WebSocket, rumqttc's `websocket`
    /// transport).
    #[serde(rename = "mosquitto-ws")]
    MosquittoWs,
    /// nats-server through its WebSocket listener (async-nats over `ws://`).
    #[serde(rename = "nats-ws")]
    NatsWs,
    /// Redis Streams with the append-only file fsync'd before every reply (`appendfsync
    /// always`): a peer that makes outboxd's promise.
    Redis,
    /// outboxd with `storage.backend = "postgres"`: one broker on a fresh database of a
    /// primary with a synchronous standby (see [`crate::pg`]).
    #[serde(rename = "outboxd-pg")]
    #[value(name = "outboxd-pg")]
    OutboxdPg,
    /// Three outboxd brokers on the same PostgreSQL database; the clients spread over them
    /// round-robin (see [`Deployment::subscriber_endpoint`]).
    #[serde(rename = "outboxd-pg3")]
    #[value(name = "outboxd-pg3")]
    OutboxdPg3,
    /// RabbitMQ 3.10 with one quorum queue per subscriber, persistent messages and publisher
    /// confirms: a peer that makes outboxd's promise (a quorum queue confirms once the Raft
    /// log holding the message is fsync'd).
    Rabbitmq,
}

/// The protocol a system speaks, whatever its transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Outboxd,
    Mqtt,
    Nats,
    /// RESP2 over TCP (Redis).
    Redis,
    /// AMQP 0-9-1 over TCP (RabbitMQ).
    Amqp,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Outboxd => "outboxd",
            System::Mosquitto => "mosquitto",
            System::Nats => "nats",
            System::MosquittoWs => "mosquitto-ws",
            System::NatsWs => "nats-ws",
            System::Redis => "redis",
            System::OutboxdPg => "outboxd-pg",
            System::OutboxdPg3 => "outboxd-pg3",
            System::Rabbitmq => "rabbitmq",
        }
    }

    /// outboxd, on whichever store: not a peer it is compared with.
    pub fn is_outboxd(self) -> bool {
        self.protocol() == Protocol::Outboxd
    }

    /// outboxd on PostgreSQL: needs the run's cluster.
    pub fn uses_postgres(self) -> bool {
        matches!(self, System::OutboxdPg | System::OutboxdPg3)
    }

    /// Broker processes one case of this system runs.
    pub fn broker_count(self) -> usize {
        match self {
            System::OutboxdPg3 => 3,
            _ => 1,
        }
    }

    pub fn protocol(self) -> Protocol {
        match self {
            System::Outboxd | System::OutboxdPg | System::OutboxdPg3 => Protocol::Outboxd,
            System::Mosquitto | System::MosquittoWs => Protocol::Mqtt,
            System::Nats | System::NatsWs => Protocol::Nats,
            System::Redis => Protocol::Redis,
            System::Rabbitmq => Protocol::Amqp,
        }
    }

    /// A peer reached through its WebSocket listener instead of its native TCP protocol
    /// (outboxd speaks only WebSocket, so it is not one).
    pub fn is_peer_over_websocket(self) -> bool {
        matches!(self, System::MosquittoWs | System::NatsWs)
    }

    /// Whether the system fsyncs a message before it confirms it, as configured here.
    pub fn fsync_before_confirm(self) -> &'static str {
        match self {
            System::Outboxd => "yes (durability = fsync: fdatasync before ok and before msg)",
            System::Mosquitto | System::MosquittoWs => {
                "no (in memory; persistence file written at shutdown/autosave only)"
            }
            System::Nats | System::NatsWs => {
                "no (JetStream file store: write() per message, fsync on a timer)"
            }
            System::Redis => {
                "yes (appendfsync always: the AOF is written and fdatasync'd before the event loop sends its replies)"
            }
            System::OutboxdPg | System::OutboxdPg3 => {
                "yes (PostgreSQL, synchronous_commit = on with a synchronous standby: the ok follows a COMMIT that the primary fsync'd and the standby flushed)"
            }
            System::Rabbitmq => {
                "yes (quorum queues, persistent messages, publisher confirms: a message is confirmed once it is in the queue's Raft log, and the log's WAL is fdatasync'd before the Raft server learns of the write)"
            }
        }
    }

    /// The yes/no of [`System::fsync_before_confirm`], for table cells.
    pub fn fsyncs_before_confirm(self) -> bool {
        matches!(
            self,
            System::Outboxd
                | System::Redis
                | System::Rabbitmq
                | System::OutboxdPg
                | System::OutboxdPg3
        )
    }
}

/// Settings that differ between workloads (outboxd env overrides; peers use one config).
#[derive(Debug, Clone, Default)]
pub struct Tuning {
    /// Heartbeat interval for the idle-connections case, in ms.
    pub heartbeat_ms: Option<u64>,
}

pub struct Paths {
    pub outboxd_bin: PathBuf,
}

/// One running broker.
pub struct Broker {
    child: Child,
    /// A helper the broker needs for as long as it runs, stopped after it (RabbitMQ: its own
    /// epmd, on a port of its own).
    helper: Option<Child>,
    /// The process to watch: the broker's (RabbitMQ: beam.smp, which `child` becomes by exec).
    pub pid: u32,
    /// outboxd: `ws://HOST:PORT/ws`; mosquitto: `HOST:PORT`; mosquitto-ws:
    /// `ws://HOST:PORT/mqtt`; nats: `nats://HOST:PORT`; nats-ws: `ws://HOST:PORT`; redis:
    /// `HOST:PORT`; rabbitmq: `amqp://guest:guest@HOST:PORT/%2f`.
    pub endpoint: String,
    /// outboxd's admin API (`http://HOST:PORT`), for its commit counter.
    pub admin: Option<String>,
    /// From spawn to accepting clients.
    pub ready_after: Duration,
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a probe port")?;
    Ok(l.local_addr()?.port())
}

fn wait_for_port(port: u16, child: &mut Child, within: Duration) -> Result<()> {
    let until = Instant::now() + within;
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("the broker exited before listening: {status}");
        }
        if Instant::now() > until {
            bail!("nothing listened on port {port} within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Broker {
    /// Starts `system` on the data directory `dir` (created if missing; kept across a restart);
    /// outboxd on the PostgreSQL database at `postgres_url` when one is given.
    fn start(
        system: System,
        dir: &Path,
        paths: &Paths,
        tuning: &Tuning,
        postgres_url: Option<&str>,
    ) -> Result<Broker> {
        fs::create_dir_all(dir)?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{}.log", system.name())))?;
        let started = Instant::now();
        match system {
            System::Outboxd | System::OutboxdPg | System::OutboxdPg3 => {
                Broker::start_outboxd(dir, log, started, paths, tuning, postgres_url)
            }
            System::Mosquitto | System::MosquittoWs => {
                let port = free_port()?;
                let persist = dir.join("mosquitto");
                fs::create_dir_all(&persist)?;
                // Mosquitto 2.0.11 refuses to start with WebSocket listeners only ("Unable to
                // start any listening sockets"), so the WebSocket listener comes on top of the
                // plain one; the clients use only the one `endpoint` names.
                let ws_port = match system {
                    System::MosquittoWs => Some(free_port()?),
                    _ => None,
                };
                let ws_listener = ws_port
                    .map(|p| {
                        format!(
                            "# MQTT over WebSocket (libwebsockets, built into Debian's package)\n\
                             listener {p} 127.0.0.1\n\
                             protocol websockets\n"
                        )
                    })
                    .unwrap_or_default();
                let conf = dir.join("mosquitto.conf");
                fs::write(
                    &conf,
                    format!(
                        "# written by outboxd-bench\n\
                         listener {port} 127.0.0.1\n\
                         allow_anonymous true\n\
                         # run as root so the data dir is writable (else persistence does nothing)\n\
                         user root\n\
                         persistence true\n\
                         persistence_location {}/\n\
                         # 0 = no limit: never drop QoS 1 messages for a slow or offline client\n\
                         max_queued_messages 0\n\
                         max_queued_bytes 0\n\
                         # same in-flight window as outboxd's delivery.max_inflight\n\
                         max_inflight_messages 1024\n\
                         log_dest stderr\n\
                         log_type error\n\
                         log_type warning\n\
                         {ws_listener}",
                        persist.display()
                    ),
                )?;
                let mut child = Command::new("mosquitto")
                    .arg("-c")
                    .arg(&conf)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .context("starting mosquitto (apt-get install mosquitto)")?;
                wait_for_port(port, &mut child, Duration::from_secs(60))?;
                let endpoint = match ws_port {
                    Some(p) => {
                        wait_for_port(p, &mut child, Duration::from_secs(60))?;
                        // rumqttc sends `Sec-WebSocket-Protocol: mqtt`; the path is not checked.
                        format!("ws://127.0.0.1:{p}/mqtt")
                    }
                    None => format!("127.0.0.1:{port}"),
                };
                Ok(Broker {
                    pid: child.id(),
                    child,
                    helper: None,
                    endpoint,
                    admin: None,
                    ready_after: started.elapsed(),
                })
            }
            System::Nats | System::NatsWs => {
                let port = free_port()?;
                let store = dir.join("jetstream");
                let mut cmd = Command::new("nats-server");
                cmd.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
                    .arg(&store);
                // The WebSocket listener exists only in the config file; the flags above
                // still apply on top of it.
                let ws_port = match system {
                    System::NatsWs => {
                        let p = free_port()?;
                        let conf = dir.join("nats.conf");
                        fs::write(
                            &conf,
                            format!(
                                "# written by outboxd-bench\n\
                                 websocket {{\n  host: 127.0.0.1\n  port: {p}\n  no_tls: true\n}}\n"
                            ),
                        )?;
                        cmd.arg("-c").arg(&conf);
                        Some(p)
                    }
                    _ => None,
                };
                let mut child = cmd
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .context("starting nats-server (apt-get install nats-server)")?;
                wait_for_port(port, &mut child, Duration::from_secs(120))?;
                let endpoint = match ws_port {
                    Some(p) => {
                        wait_for_port(p, &mut child, Duration::from_secs(120))?;
                        format!("ws://127.0.0.1:{p}")
                    }
                    None => format!("nats://127.0.0.1:{port}"),
                };
                Ok(Broker {
                    pid: child.id(),
                    child,
                    helper: None,
                    endpoint,
                    admin: None,
                    ready_after: started.elapsed(),
                })
            }
            System::Redis => Broker::start_redis(dir, log, started),
            System::Rabbitmq => Broker::start_rabbitmq(dir, log, started),
        }
    }

    /// Starts outboxd in `dir` on its sled store in `dir/data`, or, with `postgres_url`, on
    /// that PostgreSQL database (the data dir is then not used); returns once it printed its
    /// ready line.
    fn start_outboxd(
        dir: &Path,
        log: fs::File,
        started: Instant,
        paths: &Paths,
        tuning: &Tuning,
        postgres_url: Option<&str>,
    ) -> Result<Broker> {
        let mut cmd = Command::new(&paths.outboxd_bin);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir.join("data"))
            // No config.toml there: the defaults, plus the overrides below.
            .current_dir(dir)
            .env("OUTBOXD_SERVER__ADMIN_LISTEN", "127.0.0.1:0")
            .env("OUTBOXD_STORAGE__DURABILITY", "fsync")
            // Limits that would refuse benchmark traffic (see docs/benchmarks.md).
            .env("OUTBOXD_LIMITS__PUBLISH_RATE_PER_SEC", "0")
            .env("OUTBOXD_LIMITS__MAX_OUTBOX_MESSAGES", "0")
            .env("OUTBOXD_LIMITS__MAX_OUTBOX_BYTES", "0")
            .env("OUTBOXD_SERVER__MAX_CONNECTIONS_PER_IP", "0")
            .env("OUTBOXD_SERVER__MAX_CONNECTIONS", "60000")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        if let Some(hb) = tuning.heartbeat_ms {
            cmd.env("OUTBOXD_HEARTBEAT__INTERVAL_MS", hb.to_string())
                .env("OUTBOXD_HEARTBEAT__TIMEOUT_MS", (hb * 3).to_string());
        }
        if let Some(url) = postgres_url {
            cmd.env("OUTBOXD_STORAGE__BACKEND", "postgres")
                .env("OUTBOXD_POSTGRES__URL", url);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", paths.outboxd_bin.display()))?;
        let pid = child.id();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout pipe"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the two address lines, then keeps draining stdout so the broker never
        // blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut admin = None;
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    bail!("outboxd printed no ready line within 60 s");
                }
            };
            if let Some(a) = line.strip_prefix("outboxd admin: ") {
                admin = Some(a.trim().trim_end_matches('/').to_string());
            } else if let Some(ws) = line.strip_prefix("outboxd ready: ") {
                return Ok(Broker {
                    child,
                    helper: None,
                    pid,
                    endpoint: ws.trim().to_string(),
                    admin,
                    ready_after: started.elapsed(),
                });
            }
        }
    }

    /// Starts redis-server on `dir/redis` (kept across a restart: the AOF is read back) and
    /// returns once it answers PING, that is once it has loaded its AOF.
    fn start_redis(dir: &Path, log: fs::File, started: Instant) -> Result<Broker> {
        let port = free_port()?;
        let data = dir.join("redis");
        fs::create_dir_all(&data)?;
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&data)
            .args([
                // The promise under test: every write in the AOF, fdatasync'd before the
                // replies of that event-loop turn are sent.
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                // No RDB snapshots (the AOF is the only persistence).
                "--save",
                "",
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
                // As many clients as the idle and pairs cases open (Redis lowers it to what
                // the file limit allows, and says so in its log).
                "--maxclients",
                "60000",
                "--loglevel",
                "warning",
                "--logfile",
                "",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting redis-server (apt-get install redis-server)")?;
        wait_for_port(port, &mut child, Duration::from_secs(60))?;
        // Redis accepts connections while it loads the AOF, answering -LOADING until done.
        let until = Instant::now() + Duration::from_secs(300);
        while !redis_answers_ping(port) {
            if let Some(status) = child.try_wait()? {
                bail!("redis-server exited while loading: {status}");
            }
            if Instant::now() > until {
                bail!("redis-server did not answer PING within 300 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Broker {
            pid: child.id(),
            child,
            helper: None,
            endpoint: format!("127.0.0.1:{port}"),
            admin: None,
            ready_after: started.elapsed(),
        })
    }

    /// Starts RabbitMQ on `dir/rabbitmq` (kept across a restart, with its node name: the
    /// node's database is named after it) as a plain process, and returns once it answers the
    /// AMQP handshake, which it does only after booting and recovering its queues.
    ///
    /// Everything the node would otherwise take from the system is its own: an Erlang cookie
    /// in its own `HOME`, its own epmd on a free port (`ERL_EPMD_PORT`, so neither another
    /// user's epmd nor the Debian service's node is touched, and the epmd goes with the
    /// broker), the distribution port, the AMQP port, the config file and an empty
    /// `enabled_plugins` (no management plugin), its database (`RABBITMQ_MNESIA_BASE`) and
    /// logs (`RABBITMQ_LOG_BASE`).
    fn start_rabbitmq(dir: &Path, log: fs::File, started: Instant) -> Result<Broker> {
        let base = dir.join("rabbitmq");
        let home = base.join("home");
        fs::create_dir_all(&home)?;
        // The node name stays the same across a restart of the same case.
        let name_file = base.join("nodename");
        let node = match fs::read_to_string(&name_file) {
            Ok(n) if !n.trim().is_empty() => n.trim().to_string(),
            _ => {
                static NODES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let k = NODES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let n = format!("outboxd-bench-{}-{k}@localhost", std::process::id());
                fs::write(&name_file, &n)?;
                n
            }
        };
        // The node and any CLI tool read the cookie from $HOME; it must not be readable by
        // others, or Erlang refuses it.
        let cookie = home.join(".erlang.cookie");
        if !cookie.exists() {
            use std::io::Read;
            use std::os::unix::fs::PermissionsExt;
            let mut raw = [0u8; 16];
            fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
            let text: String = raw.iter().map(|b| format!("{b:02X}")).collect();
            fs::write(&cookie, text)?;
            fs::set_permissions(&cookie, fs::Permissions::from_mode(0o400))?;
        }
        let enabled_plugins = base.join("enabled_plugins");
        fs::write(&enabled_plugins, "[].\n")?;
        let env_file = base.join("rabbitmq-env.conf");
        fs::write(
            &env_file,
            "# written by outboxd-bench: nothing from /etc/rabbitmq\n",
        )?;
        let port = free_port()?;
        let dist_port = free_port()?;
        let epmd_port = free_port()?;
        let conf = base.join("rabbitmq.conf");
        fs::write(
            &conf,
            format!(
                "# written by outboxd-bench\n\
                 listeners.tcp.default = 127.0.0.1:{port}\n\
                 loopback_users = none\n\
                 log.console = false\n\
                 log.file.level = warning\n"
            ),
        )?;
        let mut epmd = Command::new("epmd")
            .args(["-port", &epmd_port.to_string(), "-address", "127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.try_clone()?)
            .spawn()
            .context("starting epmd (apt-get install rabbitmq-server brings it)")?;
        if let Err(e) = wait_for_port(epmd_port, &mut epmd, Duration::from_secs(30)) {
            let _ = epmd.kill();
            let _ = epmd.wait();
            return Err(e.context("epmd"));
        }
        // The script itself, not /usr/sbin/rabbitmq-server (which switches to the rabbitmq
        // user). With RABBITMQ_ALLOW_INPUT it execs erl, which execs beam.smp, so the child is
        // the node itself; -noinput keeps the Erlang shell off all the same.
        let spawned = Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server")
            .env("HOME", &home)
            .env("ERL_EPMD_PORT", epmd_port.to_string())
            .env("RABBITMQ_ALLOW_INPUT", "1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-noinput -kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("RABBITMQ_CONF_ENV_FILE", &env_file)
            .env("RABBITMQ_CONFIG_FILE", &conf)
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                base.join("advanced.config"),
            )
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", &enabled_plugins)
            .env("RABBITMQ_MNESIA_BASE", base.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", base.join("log"))
            .env("RABBITMQ_PID_FILE", base.join("pid"))
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_USE_LONGNAME", "false")
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting rabbitmq-server (apt-get install rabbitmq-server)");
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = epmd.kill();
                let _ = epmd.wait();
                return Err(e);
            }
        };
        let ready = wait_for_port(port, &mut child, Duration::from_secs(300)).and_then(|()| {
            let until = Instant::now() + Duration::from_secs(60);
            loop {
                match amqp_handshake(port) {
                    Ok(()) => return Ok(()),
                    Err(e) if Instant::now() > until => {
                        return Err(e.context("rabbitmq: no AMQP handshake within 60 s"))
                    }
                    Err(_) => {}
                }
                if let Some(status) = child.try_wait()? {
                    bail!("rabbitmq-server exited while starting: {status}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        if let Err(e) = ready {
            let _ = child.kill();
            let _ = child.wait();
            let _ = epmd.kill();
            let _ = epmd.wait();
            return Err(e.context(format!(
                "rabbitmq node {node} (its logs: {})",
                base.join("log").display()
            )));
        }
        let pid = beam_of(child.id());
        Ok(Broker {
            pid,
            child,
            helper: Some(epmd),
            endpoint: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            admin: None,
            ready_after: started.elapsed(),
        })
    }

    /// Ends the broker: SIGTERM and a wait (graceful), or SIGKILL.
    pub fn stop(mut self, kill: bool) -> Result<()> {
        self.stop_broker(kill)?;
        if let Some(mut h) = self.helper.take() {
            let _ = h.kill();
            h.wait()?;
        }
        Ok(())
    }

    fn stop_broker(&mut self, kill: bool) -> Result<()> {
        if kill {
            // The process watched, if the child is only a wrapper around it.
            if self.pid != self.child.id() {
                signal(self.pid, "KILL");
            }
            self.child.kill()?;
        } else {
            signal(self.pid, "TERM");
            let until = Instant::now() + Duration::from_secs(60);
            while self.child.try_wait()?.is_none() {
                if Instant::now() > until {
                    self.child.kill()?;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.child.wait()?;
        Ok(())
    }
}

/// The brokers of one case: one process, or three outboxd on one PostgreSQL database, and
/// that case's database. Dropping it kills the brokers, then drops the database.
pub struct Deployment<'c> {
    pub system: System,
    // Declared before `db`: the brokers go before their database is dropped.
    brokers: Vec<Broker>,
    db: Option<pg::Database<'c>>,
}

impl<'c> Deployment<'c> {
    /// Starts `system` on `dir` (its brokers in `dir/broker-K` when there are several); a
    /// PostgreSQL system on a fresh database of `cluster`.
    ///
    /// Errors when a broker does not come up, or a PostgreSQL system has no cluster.
    pub fn start(
        system: System,
        dir: &Path,
        paths: &Paths,
        tuning: &Tuning,
        cluster: Option<&'c pg::Cluster>,
    ) -> Result<Deployment<'c>> {
        let db = match (system.uses_postgres(), cluster) {
            (false, _) => None,
            (true, Some(c)) => Some(c.database()?),
            (true, None) => bail!("{} needs the run's PostgreSQL cluster", system.name()),
        };
        let mut d = Deployment {
            system,
            brokers: Vec::new(),
            db,
        };
        d.start_brokers(dir, paths, tuning)?;
        Ok(d)
    }

    /// Starts the brokers one after the other: the first creates the schema, the others find
    /// it (several migrating an empty database at once is not what is being measured).
    fn start_brokers(&mut self, dir: &Path, paths: &Paths, tuning: &Tuning) -> Result<()> {
        let n = self.system.broker_count();
        for k in 0..n {
            let own = if n == 1 {
                dir.to_path_buf()
            } else {
                dir.join(format!("broker-{k}"))
            };
            let url = self.db.as_ref().map(|d| d.url.as_str());
            let b = Broker::start(self.system, &own, paths, tuning, url)
                .with_context(|| format!("{} broker {k}", self.system.name()))?;
            self.brokers.push(b);
        }
        Ok(())
    }

    /// Stops every broker (SIGKILL, or SIGTERM and a wait), keeping the data dirs and the
    /// database for [`Deployment::start_again`].
    pub fn stop_brokers(&mut self, kill: bool) -> Result<()> {
        for b in self.brokers.drain(..) {
            b.stop(kill)?;
        }
        Ok(())
    }

    /// Starts the brokers stopped by [`Deployment::stop_brokers`] again, on the same data dirs
    /// and database.
    pub fn start_again(&mut self, dir: &Path, paths: &Paths, tuning: &Tuning) -> Result<()> {
        self.start_brokers(dir, paths, tuning)
    }

    /// The first broker's endpoint, for set-up and single-client cases.
    pub fn endpoint(&self) -> &str {
        self.brokers.first().map_or("", |b| b.endpoint.as_str())
    }

    /// Where subscriber `i` connects: broker `i mod N`.
    pub fn subscriber_endpoint(&self, i: usize) -> &str {
        self.nth_endpoint(i)
    }

    /// Where publisher `i` connects: broker `(i + 1) mod N`, so with several brokers a
    /// publisher never shares its broker with the subscriber of the same index (1 → 1 and
    /// every pair cross from one broker to another).
    pub fn publisher_endpoint(&self, i: usize) -> &str {
        self.nth_endpoint(i + 1)
    }

    fn nth_endpoint(&self, i: usize) -> &str {
        match self.brokers.len() {
            0 => "",
            n => self.brokers[i % n].endpoint.as_str(),
        }
    }

    /// The broker processes.
    pub fn pids(&self) -> Vec<u32> {
        self.brokers.iter().map(|b| b.pid).collect()
    }

    /// The brokers' admin APIs.
    pub fn admins(&self) -> Vec<String> {
        self.brokers
            .iter()
            .filter_map(|b| b.admin.clone())
            .collect()
    }

    /// From spawn to accepting clients, the slowest broker's.
    pub fn ready_after(&self) -> Duration {
        self.brokers
            .iter()
            .map(|b| b.ready_after)
            .max()
            .unwrap_or_default()
    }

    /// Stops the brokers (SIGKILL, or SIGTERM and a wait), then drops the database.
    pub fn stop(mut self, kill: bool) -> Result<()> {
        self.stop_brokers(kill)
    }
}

/// outboxd's commit-group count (one fdatasync each in fsync mode), from its admin API's
/// /metrics at `admin` (`http://HOST:PORT`).
pub fn commit_groups_at(admin: &str) -> Option<u64> {
    let body = http_get(&format!("{admin}/metrics")).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix("outboxd_commit_groups_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.pid != self.child.id() && matches!(self.child.try_wait(), Ok(None)) {
            signal(self.pid, "KILL");
        }
        for c in std::iter::once(&mut self.child).chain(self.helper.as_mut()) {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Opens an AMQP 0-9-1 connection to 127.0.0.1:`port` far enough to read the server's first
/// frame; Ok when it is a method frame (`connection.start`).
fn amqp_handshake(port: u16) -> Result<()> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"AMQP\x00\x00\x09\x01")?;
    let mut head = [0u8; 7];
    s.read_exact(&mut head)?;
    if head[0] != 1 {
        bail!(
            "rabbitmq answered the AMQP header with frame type {}",
            head[0]
        );
    }
    Ok(())
}

/// The beam.smp process of a node started as `pid`: `pid` itself when the start script
/// exec'd into it (as it does here), else its first descendant named beam.smp.
fn beam_of(pid: u32) -> u32 {
    let comm = |p: u32| fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
    if comm(pid).trim() == "beam.smp" {
        return pid;
    }
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        let children = fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        for c in children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            if comm(c).trim() == "beam.smp" {
                return c;
            }
            frontier.push(c);
        }
    }
    pid
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Whether the Redis on `port` answers `PING` with `+PONG` (not `-LOADING`).
fn redis_answers_ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// A minimal HTTP/1.0 GET against the loopback admin API (avoids an HTTP client dependency).
fn http_get(url: &str) -> Result<String> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("not http: {url}"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// One reading of a process's counters from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    pub at: Option<Instant>,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub rss_kib: u64,
    pub write_bytes: u64,
}

/// The sum of [`sample`] over `pids` (several brokers as one system).
pub fn sample_all(pids: &[u32]) -> ProcSample {
    let mut total = ProcSample {
        at: Some(Instant::now()),
        ..ProcSample::default()
    };
    for pid in pids {
        let s = sample(*pid);
        total.cpu_ticks += s.cpu_ticks;
        total.rss_kib += s.rss_kib;
        total.write_bytes += s.write_bytes;
    }
    total
}

/// CPU ticks (utime + stime) of each of `pids` still alive.
pub fn cpu_ticks_by_pid(pids: &[u32]) -> BTreeMap<u32, u64> {
    pids.iter()
        .filter_map(|p| {
            let s = sample(*p);
            (s.cpu_ticks > 0 || s.rss_kib > 0).then_some((*p, s.cpu_ticks))
        })
        .collect()
}

pub fn sample(pid: u32) -> ProcSample {
    let mut s = ProcSample {
        at: Some(Instant::now()),
        ..ProcSample::default()
    };
    if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Fields after the command name (which may hold spaces) start at field 3.
        if let Some((_, rest)) = stat.rsplit_once(')') {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
            let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
            s.cpu_ticks = utime + stime;
        }
    }
    if let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) {
        s.rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
    }
    if let Ok(io) = fs::read_to_string(format!("/proc/{pid}/io")) {
        s.write_bytes = io
            .lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
    }
    s
}

pub fn clock_ticks_per_sec() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// Counts a process's fsync and fdatasync calls with `perf stat` on the syscall tracepoints
/// (counted in the kernel, so far cheaper than strace). `None` when perf cannot do it here.
pub struct FsyncCounter {
    child: Child,
    out: PathBuf,
}

const FSYNC_EVENTS: &str = "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync";

pub fn perf_works() -> bool {
    Command::new("perf")
        .args(["stat", "-x", ",", "-e", FSYNC_EVENTS, "--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

impl FsyncCounter {
    /// Counts the calls of every process in `pids`, together.
    pub fn start(pids: &[u32], out: PathBuf) -> Option<FsyncCounter> {
        if pids.is_empty() {
            return None;
        }
        let pids: Vec<String> = pids.iter().map(|p| p.to_string()).collect();
        let child = Command::new("perf")
            .args([
                "stat",
                "-x",
                ",",
                "-e",
                FSYNC_EVENTS,
                "-p",
                &pids.join(","),
                "-o",
            ])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(FsyncCounter { child, out })
    }

    /// Stops counting; the number of fsync + fdatasync calls seen.
    pub fn finish(mut self) -> Option<u64> {
        signal(self.child.id(), "INT");
        let _ = self.child.wait();
        let text = fs::read_to_string(&self.out).ok()?;
        let mut total = 0u64;
        let mut seen = false;
        for line in text.lines() {
            let mut f = line.split(',');
            if let (Some(count), Some(_), Some(event)) = (f.next(), f.next(), f.next()) {
                if event.starts_with("syscalls:") {
                    if let Ok(n) = count.trim().parse::<u64>() {
                        total += n;
                        seen = true;
                    }
                }
            }
        }
        seen.then_some(total)
    }
}

/// The version each system reports.
pub fn version(system: System, paths: &Paths) -> String {
    let out = match system {
        System::Outboxd | System::OutboxdPg | System::OutboxdPg3 => {
            Command::new(&paths.outboxd_bin).arg("--version").output()
        }
        System::Mosquitto | System::MosquittoWs => Command::new("mosquitto").arg("-h").output(),
        System::Nats | System::NatsWs => Command::new("nats-server").arg("--version").output(),
        System::Redis => Command::new("redis-server").arg("--version").output(),
        System::Rabbitmq => Command::new("dpkg-query")
            .args(["-W", "-f", "rabbitmq-server ${Version}\\n"])
            .arg("rabbitmq-server")
            .output(),
    };
    match out {
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("unknown").trim().to_string()
        }
        Err(e) => format!("not available ({e})"),
    }
}
