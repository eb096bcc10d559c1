//! TLS on the WebSocket and admin listeners, against the real binary: a round trip over wss
//! with a certificate made in the test, the admin API over https, the handshake held to the
//! connection's handshake deadline, peers that do not speak TLS, and the certificate reload on
//! SIGHUP (new connections get the new one, open ones keep working, a bad one is refused and
//! the old one stays).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{parse_http, Broker, Client, HttpResponse, Opts, RECV_TIMEOUT};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

/// A self-signed certificate for 127.0.0.1 and localhost, made fresh for each use.
struct TestCert {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl TestCert {
    fn new() -> TestCert {
        let c = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
        ])
        .expect("generate a test certificate");
        TestCert {
            cert_pem: c.cert.pem(),
            key_pem: c.signing_key.serialize_pem(),
            der: c.cert.der().to_vec(),
        }
    }
}

/// The certificate and key files the broker is pointed at.
struct CertFiles {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl CertFiles {
    fn new(c: &TestCert) -> CertFiles {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = CertFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            _dir: dir,
        };
        files.write(c);
        files
    }

    fn write(&self, c: &TestCert) {
        write_file(&self.cert, &c.cert_pem);
        write_file(&self.key, &c.key_pem);
    }

    fn opts(&self) -> Opts {
        Opts::new()
            .set("tls", "cert_file", self.cert.display())
            .set("tls", "key_file", self.key.display())
    }
}

fn write_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A rustls client that trusts exactly these certificates.
fn trusting(certs: &[&TestCert]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots
            .add(CertificateDer::from(c.der.clone()))
            .expect("trust the test certificate");
    }
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

async fn wss(broker: &Broker, tls: &Arc<ClientConfig>) -> Client {
    assert!(
        broker.url.starts_with("wss://"),
        "ready line: {}",
        broker.url
    );
    Client::connect_tls(&broker.url, Arc::clone(tls)).await
}

/// One HTTP/1.1 request over TLS; returns the answer and the certificate the server showed.
async fn https_get(
    addr: SocketAddr,
    tls: &Arc<ClientConfig>,
    path: &str,
) -> Result<(HttpResponse, Vec<u8>), String> {
    let exchange = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let mut s = TlsConnector::from(Arc::clone(tls))
            .connect(ServerName::from(addr.ip()), tcp)
            .await
            .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
        let der = s
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .ok_or("no peer certificate")?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 8192];
        // The server may close without close_notify: keep what arrived before the error.
        while let Ok(n @ 1..) = s.read(&mut buf).await {
            raw.extend_from_slice(&buf[..n]);
        }
        let answer = parse_http(&raw)
            .ok_or_else(|| format!("not HTTP: {:?}", String::from_utf8_lossy(&raw)))?;
        Ok((answer, der))
    };
    tokio::time::timeout(RECV_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("GET {path} over TLS: no answer within {RECV_TIMEOUT:?}"))?
}

fn sighup(broker: &Broker) {
    let pid = libc::pid_t::try_from(broker.pid()).expect("pid fits pid_t");
    // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
    let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
    assert_eq!(rc, 0, "kill(SIGHUP): {}", std::io::Error::last_os_error());
}

/// Waits until the broker's log holds `needle` at least `times` times.
async fn wait_for_log(broker: &Broker, needle: &str, times: usize) {
    let deadline = Instant::now() + RECV_TIMEOUT;
    while broker.stderr().matches(needle).count() < times {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} (x{times}) in the log within {RECV_TIMEOUT:?}:\n{}",
            broker.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const RELOADED: &str = "TLS certificate reloaded";
const RELOAD_FAILED: &str = "TLS certificate reload failed";

/// Alice publishes to bob; bob receives it and acks. Both are connected already.
async fn round_trip(alice: &mut Client, bob: &mut Client, reference: &str) {
    alice
        .publish_ok(
            reference,
            "client:bob",
            json!({"over": "tls", "ref": reference}),
        )
        .await;
    let m = bob.recv_msg().await;
    assert_eq!(m["payload"]["ref"], reference, "{m}");
    bob.ack(common::seq(&m)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_publish_and_receive_over_wss() {
    // Catches a TLS listener that does not complete the handshake, serves the wrong
    // certificate, or breaks framing above TLS; and a ready line that still says ws://.
    let cert = TestCert::new();
    let files = CertFiles::new(&cert);
    let broker = Broker::start(files.opts());
    let tls = trusting(&[&cert]);
    let mut alice = wss(&broker, &tls).await;
    let mut bob = wss(&broker, &tls).await;
    assert_eq!(alice.peer_certificate().as_deref(), Some(&cert.der[..]));
    alice.hello("alice", None).await;
    bob.hello("bob", None).await;
    for i in 0..3 {
        round_trip(&mut alice, &mut bob, &format!("r{i}")).await;
    }
    // Without tls.admin the admin API stays plain HTTP.
    let r = broker.admin_get("/healthz").await;
    assert_eq!(r.status, 200, "{r:?}");
    alice.close().await;
    bob.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_speaks_https_with_tls_admin() {
    // Catches an admin listener that ignores tls.admin, prints http:// for an https port, or
    // is stopped by a client that speaks plain HTTP to it.
    let cert = TestCert::new();
    let files = CertFiles::new(&cert);
    let broker = Broker::start(files.opts().set("tls", "admin", true));
    let tls = trusting(&[&cert]);
    let (r, der) = https_get(broker.admin_addr(), &tls, "/healthz")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), json!({"status": "ok"}));
    assert_eq!(der, cert.der);
    // Plain HTTP to the TLS port: no HTTP answer, and nothing else is affected.
    let mut tcp = TcpStream::connect(broker.admin_addr()).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(RECV_TIMEOUT, tcp.read_to_end(&mut raw)).await;
    assert!(
        !raw.starts_with(b"HTTP/"),
        "a plain request got an HTTP answer"
    );
    let (r, _) = https_get(broker.admin_addr(), &tls, "/readyz")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_do_not_speak_tls_fail_only_their_own_handshake() {
    // Catches a TLS error that ends the listener or the broker, a broker that answers a
    // plain upgrade on its TLS port, or one that logs what any peer can provoke above debug.
    let cert = TestCert::new();
    let files = CertFiles::new(&cert);
    let mut broker = Broker::start(files.opts().set("server", "hello_timeout_ms", 1000));
    let plain_url = broker.url.replacen("wss://", "ws://", 1);
    let r = tokio::time::timeout(
        RECV_TIMEOUT,
        tokio_tungstenite::connect_async(plain_url.as_str()),
    )
    .await
    .expect("a plain client must get an answer (a failure), not hang");
    assert!(
        r.is_err(),
        "a plain WebSocket upgrade on the TLS port worked"
    );
    // Garbage, a lone TLS warning alert (close_notify), and a client that does not trust the
    // certificate.
    for bytes in [
        &[0u8; 64][..],
        &[0x15, 0x03, 0x03, 0x00, 0x02, 0x01, 0x00][..],
    ] {
        let mut tcp = TcpStream::connect(broker.addr).await.unwrap();
        tcp.write_all(bytes).await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(RECV_TIMEOUT, tcp.read_to_end(&mut sink)).await;
    }
    let stranger = trusting(&[&TestCert::new()]);
    assert!(
        Client::try_connect_tls(&broker.url, stranger)
            .await
            .is_err(),
        "a client that trusts another certificate connected"
    );
    // The broker is fine, and said nothing above debug about any of them.
    assert!(broker.is_running());
    let log = broker.stderr();
    assert!(
        !log.contains(" WARN ") && !log.contains(" ERROR "),
        "peers that fail their TLS handshake must be logged at debug only:\n{log}"
    );
    // Each failed handshake is counted: a plain upgrade, two raw sockets, one stranger.
    let m = broker.metrics().await;
    let failed = m
        .get(r#"outboxd_connections_closed_total{reason="handshake"}"#)
        .copied()
        .unwrap_or(0.0);
    assert!(failed >= 4.0, "handshake closes counted: {failed}");
    let tls = trusting(&[&cert]);
    let mut alice = wss(&broker, &tls).await;
    let mut bob = wss(&broker, &tls).await;
    alice.hello("alice", None).await;
    bob.hello("bob", None).await;
    round_trip(&mut alice, &mut bob, "after").await;
}

/// Opens a TCP connection, sends `first` and then nothing, and returns how long the broker
/// took to drop it.
async fn time_until_dropped(addr: SocketAddr, first: &[u8]) -> Duration {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let start = Instant::now();
    tcp.write_all(first).await.unwrap();
    let mut sink = Vec::new();
    tokio::time::timeout(RECV_TIMEOUT, tcp.read_to_end(&mut sink))
        .await
        .unwrap_or_else(|_| panic!("a silent socket was not dropped within {RECV_TIMEOUT:?}"))
        .ok();
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_dropped_at_the_handshake_deadline() {
    // Catches a TLS handshake without a deadline: sockets that never finish it (silent, or a
    // ClientHello that stops after its first bytes) would hold connection slots forever.
    let cert = TestCert::new();
    let files = CertFiles::new(&cert);
    let broker = Broker::start(files.opts().set("tls", "admin", true).set(
        "server",
        "hello_timeout_ms",
        500,
    ));
    // A TLS record header announcing a handshake message that never comes.
    let partial_hello = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
    for (addr, first) in [
        (broker.addr, &[][..]),
        (broker.addr, &partial_hello[..]),
        (broker.admin_addr(), &[][..]),
        (broker.admin_addr(), &partial_hello[..]),
    ] {
        let took = time_until_dropped(addr, first).await;
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_secs(5),
            "socket to {addr} sending {first:?} dropped after {took:?}, expected ~500 ms"
        );
    }
    // One deadline covers TLS and the hello: a client that finishes TLS but never says hello
    // is closed with 4008.
    let tls = trusting(&[&cert]);
    let mut idle = wss(&broker, &tls).await;
    idle.expect_close(4008).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_gives_new_connections_the_new_certificate_and_open_ones_keep_working() {
    // Catches a reload that is not picked up by new handshakes (WebSocket or admin), that
    // drops or breaks the connections already open, or a SIGHUP that stops the broker.
    let old = TestCert::new();
    let new = TestCert::new();
    let files = CertFiles::new(&old);
    let mut broker = Broker::start(files.opts().set("tls", "admin", true));
    let both = trusting(&[&old, &new]);
    let mut alice = wss(&broker, &both).await;
    let mut bob = wss(&broker, &both).await;
    alice.hello("alice", None).await;
    bob.hello("bob", None).await;
    round_trip(&mut alice, &mut bob, "before").await;

    files.write(&new);
    sighup(&broker);
    wait_for_log(&broker, RELOADED, 1).await;
    assert!(broker.is_running(), "SIGHUP stopped the broker");

    let mut carol = wss(&broker, &both).await;
    assert_eq!(carol.peer_certificate().as_deref(), Some(&new.der[..]));
    let (r, der) = https_get(broker.admin_addr(), &both, "/healthz")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        der, new.der,
        "the admin API still shows the old certificate"
    );
    // A client that trusts only the old certificate cannot connect any more.
    assert!(Client::try_connect_tls(&broker.url, trusting(&[&old]))
        .await
        .is_err());

    // The connections opened before the reload still work, both ways, on the old session.
    assert_eq!(alice.peer_certificate().as_deref(), Some(&old.der[..]));
    round_trip(&mut alice, &mut bob, "after").await;
    carol.hello("carol", None).await;
    round_trip(&mut carol, &mut bob, "new-to-old").await;
    carol
        .publish_ok("to-alice", "client:alice", json!("from carol"))
        .await;
    let m = alice.recv_msg().await;
    assert_eq!(m["payload"], "from carol", "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_on_reload_is_logged_and_the_old_one_stays() {
    // Catches a reload that installs (or half-installs) files that do not work, leaving the
    // broker unable to accept anyone, or that fails silently.
    let good = TestCert::new();
    let other = TestCert::new();
    let files = CertFiles::new(&good);
    let mut broker = Broker::start(files.opts());
    let tls = trusting(&[&good, &other]);

    // Not a certificate at all.
    write_file(&files.cert, "this is not PEM\n");
    sighup(&broker);
    wait_for_log(&broker, RELOAD_FAILED, 1).await;
    // A certificate with a key that is not its own.
    write_file(&files.cert, &other.cert_pem);
    write_file(&files.key, &good.key_pem);
    sighup(&broker);
    wait_for_log(&broker, RELOAD_FAILED, 2).await;
    let log = broker.stderr();
    assert!(
        log.contains("ERROR"),
        "a failed reload must log an error:\n{log}"
    );
    assert!(
        log.contains("tls.cert_file"),
        "the error names the key:\n{log}"
    );
    assert!(!log.contains(RELOADED), "nothing was reloaded:\n{log}");
    assert!(broker.is_running());

    let mut alice = wss(&broker, &tls).await;
    assert_eq!(alice.peer_certificate().as_deref(), Some(&good.der[..]));
    let mut bob = wss(&broker, &tls).await;
    alice.hello("alice", None).await;
    bob.hello("bob", None).await;
    round_trip(&mut alice, &mut bob, "still").await;

    // Fixing the files and sending SIGHUP again works.
    files.write(&other);
    sighup(&broker);
    wait_for_log(&broker, RELOADED, 1).await;
    let carol = wss(&broker, &tls).await;
    assert_eq!(carol.peer_certificate().as_deref(), Some(&other.der[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_tls_changes_nothing() {
    // Catches a SIGHUP that ends a broker without TLS (the default action) instead of the
    // graceful shutdown a supervisor's SIGTERM gets.
    let mut broker = Broker::start(Opts::new());
    sighup(&broker);
    wait_for_log(&broker, "nothing to reload", 1).await;
    assert!(broker.is_running());
    let (mut alice, _) = broker.client("alice").await;
    let (mut bob, _) = broker.client("bob").await;
    round_trip(&mut alice, &mut bob, "plain").await;
}

/// Runs `outboxd serve` with these config overrides until it exits; (status, stderr).
fn run_to_exit(env: &[(&str, String)]) -> (Option<i32>, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = common::serve_command(dir.path());
    cmd.env("OUTBOXD_SERVER__ADMIN_LISTEN", "127.0.0.1:0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run outboxd");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("outboxd ready"),
        "it must not have started"
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        dir,
    )
}

#[test]
fn an_unusable_certificate_at_start_stops_the_broker_naming_the_key() {
    // Catches a broker that starts without TLS (or with a half-loaded config) when its
    // certificate or key cannot be used, or an error that does not say which setting is wrong.
    let cert = TestCert::new();
    let other = TestCert::new();
    let files = CertFiles::new(&cert);
    let missing = files.cert.with_file_name("missing.pem");
    let cases: [(&str, &Path, &Path); 3] = [
        ("tls.cert_file", &missing, &files.key),
        ("tls.key_file", &files.cert, &missing),
        ("tls.cert_file", &files.cert, &files.key),
    ];
    for (i, (key, cert_file, key_file)) in cases.into_iter().enumerate() {
        if i == 2 {
            // The key of another certificate.
            write_file(&files.key, &other.key_pem);
        }
        let (code, stderr, dir) = run_to_exit(&[
            ("OUTBOXD_TLS__CERT_FILE", cert_file.display().to_string()),
            ("OUTBOXD_TLS__KEY_FILE", key_file.display().to_string()),
        ]);
        assert_eq!(code, Some(2), "case {i}: stderr: {stderr}");
        assert!(stderr.contains(key), "case {i}: must name {key}: {stderr}");
        assert!(
            !dir.path().join("data").exists(),
            "case {i}: nothing may be created before the refusal"
        );
    }
    // A key without a certificate is refused by the config check.
    let (code, stderr, _) =
        run_to_exit(&[("OUTBOXD_TLS__KEY_FILE", files.key.display().to_string())]);
    assert_eq!(code, Some(2), "stderr: {stderr}");
    assert!(stderr.contains("tls.cert_file"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_and_outboxd_pub_speak_wss_once_told_to_trust_the_certificate() {
    // Catches a client that cannot use wss:// (or ignores --ca / tls_ca_file), and one that
    // trusts a certificate nobody told it to trust.
    use outboxd::client::{Client as RustClient, ClientError, Incoming, StopReason};
    let cert = TestCert::new();
    let files = CertFiles::new(&cert);
    let broker = Broker::start(files.opts());
    assert!(broker.url.starts_with("wss://"), "{}", broker.url);

    // Rejected at the first attempt, not retried until the connect timeout.
    let started = std::time::Instant::now();
    let untrusting = RustClient::builder(broker.url.clone(), "bob")
        .connect_timeout(Some(Duration::from_secs(20)))
        .connect()
        .await;
    match untrusting {
        Err(ClientError::Stopped(StopReason::Certificate { reason, .. })) => {
            assert!(reason.contains("not signed by a trusted"), "{reason}")
        }
        Err(other) => panic!("expected a certificate rejection, got {other}"),
        Ok(_) => panic!("a self-signed certificate nobody trusts was accepted"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );

    let mut bob = RustClient::builder(broker.url.clone(), "bob")
        .tls_ca_file(&files.cert)
        .connect()
        .await
        .expect("bob connects over wss");
    let alice = RustClient::builder(broker.url.clone(), "alice")
        .tls_ca_file(&files.cert)
        .connect()
        .await
        .expect("alice connects over wss");
    let sent = alice
        .publish("client:bob", json!({"over": "tls"}))
        .await
        .expect("confirmed");
    assert_eq!(sent.recipients, 1);

    let out = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["pub", "--url", &broker.url, "--ca"])
        .arg(&files.cert)
        .args(["--client", "cli", "--to", "client:bob", r#"{"from":"cli"}"#])
        .stdin(Stdio::null())
        .output()
        .expect("run outboxd pub");
    assert!(
        out.status.success(),
        "outboxd pub over wss: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A CA file that is not there is an error naming it, not a silent fallback.
    let out = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["pub", "--url", &broker.url, "--ca", "/nonexistent/ca.pem"])
        .args(["--to", "client:bob", "never"])
        .stdin(Stdio::null())
        .output()
        .expect("run outboxd pub");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("/nonexistent/ca.pem"), "{stderr}");

    let mut payloads = Vec::new();
    while payloads.len() < 2 {
        match tokio::time::timeout(RECV_TIMEOUT, bob.next()).await {
            Ok(Some(Incoming::Delivery(d))) => {
                payloads.push(d.payload.to_json::<serde_json::Value>().expect("JSON"));
                d.ack().expect("ack");
            }
            Ok(Some(Incoming::Event(_))) => {}
            other => panic!("expected deliveries over wss, got {other:?}"),
        }
    }
    assert_eq!(
        payloads,
        vec![json!({"over": "tls"}), json!({"from": "cli"})]
    );
    alice.close().await;
    bob.close().await;
}
