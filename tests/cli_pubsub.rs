//! `outboxd pub` and `outboxd sub` as a user runs them: subprocesses of the real binary against
//! the real broker, checked by their output and exit status.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use common::{Broker, Opts, Relay, TlsFiles};
use serde_json::{json, Value};

/// How long a command may run before the test calls it hung.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// `outboxd` with no `OUTBOXD_*` settings from the developer's shell.
fn outboxd(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outboxd"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("OUTBOXD_") {
            cmd.env_remove(&k);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Waits for `child`, killing it and failing the test after `RUN_TIMEOUT`.
fn finish(mut child: Child) -> Output {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        match child.try_wait().expect("wait") {
            Some(_) => return child.wait_with_output().expect("output"),
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!(
                    "outboxd did not finish within {RUN_TIMEOUT:?}; stdout:\n{}\nstderr:\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// Runs a command to the end, feeding `stdin` if given.
fn run(mut cmd: Command, stdin: Option<&str>) -> Output {
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawn outboxd");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin piped");
        pipe.write_all(text.as_bytes()).expect("write stdin");
    }
    finish(child)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The `payload` of each `--json` line.
fn payloads(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}"));
            v["payload"].clone()
        })
        .collect()
}

fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: stdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn pub_then_sub_prints_each_message_once_in_order_and_acks_it() {
    // Catches pub lines that are sent with the wrong type or not at all, a sub that prints out
    // of order or without acking, and a position file that is not written.
    let broker = Broker::start(Opts::new());
    let dir = tempfile::tempdir().expect("tempdir");
    let position = dir.path().join("bob.json");
    let position = position.to_str().expect("utf-8 path");

    let out = run(
        outboxd(&["pub", "--url", &broker.url, "--to", "client:bob", "-"]),
        Some("{\"n\": 1}\nhello world\n\n42\n"),
    );
    assert_exit(&out, 0, "pub from stdin");
    let out = run(
        outboxd(&[
            "pub",
            "--url",
            &broker.url,
            "--to",
            "client:bob",
            "--string",
            "42",
        ]),
        None,
    );
    assert_exit(&out, 0, "pub --string");

    let sub = |count: &str| {
        run(
            outboxd(&[
                "sub",
                "--url",
                &broker.url,
                "--client",
                "bob",
                "--json",
                "--count",
                count,
                "--position",
                position,
            ]),
            None,
        )
    };
    let out = sub("4");
    assert_exit(&out, 0, "sub --count 4");
    assert_eq!(
        payloads(&text(&out.stdout)),
        vec![
            json!({"n": 1}),
            json!("hello world"),
            json!(42),
            json!("42")
        ]
    );
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(position).expect("position file"))
            .expect("position is JSON");
    assert_eq!(saved["last_seq"], 4, "{saved}");
    assert_eq!(saved["client_id"], "bob", "{saved}");

    // Everything printed was acked: a second run prints only what comes next.
    let out = run(
        outboxd(&["pub", "--url", &broker.url, "--to", "client:bob", "five"]),
        None,
    );
    assert_exit(&out, 0, "pub five");
    let out = sub("1");
    assert_exit(&out, 0, "second sub");
    assert_eq!(payloads(&text(&out.stdout)), vec![json!("five")]);
}

#[test]
fn human_output_names_the_seq_sender_and_payload() {
    // Catches a default output format that drops who sent what.
    let broker = Broker::start(Opts::new());
    let out = run(
        outboxd(&[
            "pub",
            "--url",
            &broker.url,
            "--client",
            "alice",
            "--to",
            "client:bob",
            "{\"a\":[1, 2]}",
        ]),
        None,
    );
    assert_exit(&out, 0, "pub");
    let out = run(
        outboxd(&[
            "sub",
            "--url",
            &broker.url,
            "--client",
            "bob",
            "--count",
            "1",
            "--no-position",
        ]),
        None,
    );
    assert_exit(&out, 0, "sub");
    assert_eq!(text(&out.stdout), "#1 from alice: {\"a\":[1,2]}\n");
}

#[test]
fn pub_exits_nonzero_when_the_broker_refuses_the_message() {
    // Catches a pub that reports success for a message that was never written.
    let broker = Broker::start(Opts::new().set("limits", "max_outbox_messages", 1));
    let publish = |payload: &str| {
        run(
            outboxd(&["pub", "--url", &broker.url, "--to", "client:bob", payload]),
            None,
        )
    };
    assert_exit(&publish("first"), 0, "first publish");
    let out = publish("second");
    assert_exit(&out, 1, "publish to a full outbox");
    assert!(
        text(&out.stderr).contains("outbox_full"),
        "{}",
        text(&out.stderr)
    );
}

/// A loopback URL where nothing listens.
fn closed_url() -> String {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    format!("ws://127.0.0.1:{port}/ws")
}

#[test]
fn pub_with_wait_exits_3_when_no_broker_answers_within_the_wait() {
    // Catches a pub that hangs for ever, or exits 0, when it cannot reach the broker.
    let url = closed_url();
    let started = Instant::now();
    let out = run(
        outboxd(&["pub", "--url", &url, "--to", "client:bob", "--wait=1s", "x"]),
        None,
    );
    assert_exit(&out, 3, "pub --wait=1s with no broker");
    assert!(
        started.elapsed() >= Duration::from_secs(1) && started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        text(&out.stderr).contains("no session"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn pub_and_sub_fail_at_once_when_nothing_listens_naming_the_url_and_the_os_error() {
    // Catches a first connection that is retried for 30 s by default (mosquitto_pub fails in
    // milliseconds), and a failure that does not say where and why.
    let url = closed_url();
    for args in [
        vec!["pub", "--url", &url, "--to", "client:bob", "x"],
        vec!["sub", "--url", &url, "--client", "bob", "--no-position"],
    ] {
        let started = Instant::now();
        let out = run(outboxd(&args), None);
        assert_exit(&out, 3, args[0]);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{}: took {:?}",
            args[0],
            started.elapsed()
        );
        let err = text(&out.stderr);
        assert!(err.contains(&url), "{}: {err}", args[0]);
        assert!(err.contains("Connection refused"), "{}: {err}", args[0]);
    }
}

#[test]
fn a_rejected_tls_certificate_is_not_retried_and_is_said_in_words() {
    // Catches a certificate nobody trusts being retried until --wait runs out, and a message
    // that names only rustls's variant (UnknownIssuer).
    let tls = TlsFiles::new();
    let cert_file = &tls.cert;
    let broker = Broker::start(tls.opts());
    assert!(broker.url.starts_with("wss://"), "{}", broker.url);
    let started = Instant::now();
    let out = run(
        outboxd(&[
            "pub",
            "--url",
            &broker.url,
            "--to",
            "client:bob",
            "--wait=20s",
            "x",
        ]),
        None,
    );
    assert_exit(&out, 3, "pub to an untrusted certificate");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let err = text(&out.stderr);
    assert!(err.contains("certificate"), "{err}");
    assert!(err.contains("not signed by a trusted"), "{err}");
    // Trusted with --ca, the same broker is reachable.
    let out = run(
        outboxd(&[
            "pub",
            "--url",
            &broker.url,
            "--ca",
            &cert_file.display().to_string(),
            "--to",
            "client:bob",
            "x",
        ]),
        None,
    );
    assert_exit(&out, 0, "pub with --ca");
}

#[test]
fn pub_exits_nonzero_when_the_broker_dies_before_confirming_a_line() {
    // Catches a pub that counts a message as sent when it was only written to a socket.
    let mut broker = Broker::start(Opts::new());
    let mut cmd = outboxd(&[
        "pub",
        "--url",
        &broker.url,
        "--client",
        "alice",
        "--to",
        "client:bob",
        "--timeout",
        "2",
        "-v",
        "-",
    ]);
    cmd.stdin(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn pub");
    let mut stdin = child.stdin.take().expect("stdin piped");
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = std_mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    writeln!(stdin, "one").expect("write line 1");
    let ok = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("line 1 confirmed");
    assert!(ok.starts_with("ok line 1 "), "{ok}");

    broker.kill9();
    writeln!(stdin, "two").expect("write line 2");
    drop(stdin);
    let out = finish(child);
    assert_exit(&out, 1, "pub with the broker gone");
    let rest: Vec<String> = rx.iter().collect();
    assert!(
        rest.iter()
            .any(|l| l.contains("line 2") && l.contains("not confirmed")),
        "{rest:?}"
    );
    assert!(rest.iter().any(|l| l.contains("1 of 2")), "{rest:?}");
}

#[test]
fn pub_and_sub_refuse_invalid_arguments_with_status_2() {
    // Catches bad arguments that are sent to the broker, or fail like a network error.
    let out = run(
        outboxd(&[
            "pub",
            "--url",
            "ws://127.0.0.1:1/ws",
            "--to",
            "queue:bob",
            "x",
        ]),
        None,
    );
    assert_exit(&out, 2, "pub --to queue:bob");
    let out = run(
        outboxd(&["sub", "--url", "ws://127.0.0.1:1/ws", "--client", "a b"]),
        None,
    );
    assert_exit(&out, 2, "sub --client 'a b'");
}

#[test]
fn a_ca_certificate_used_as_the_brokers_own_is_said_in_words() {
    // Catches "Other(OtherError(CaUsedAsEndEntity))": what `openssl req -x509` makes by
    // default is a CA certificate, which no client accepts as a server's, --ca or not.
    let mut params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("certificate params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params
        .self_signed(&key)
        .expect("self-signed CA certificate");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).expect("write cert");
    std::fs::write(&key_file, key.serialize_pem()).expect("write key");
    let broker = Broker::start(
        Opts::new()
            .set("tls", "cert_file", cert_file.display())
            .set("tls", "key_file", key_file.display()),
    );
    let ca = cert_file.display().to_string();
    let out = run(
        outboxd(&[
            "pub",
            "--url",
            &broker.url,
            "--ca",
            &ca,
            "--to",
            "client:bob",
            "x",
        ]),
        None,
    );
    assert_exit(&out, 3, "pub to a broker whose certificate is a CA's");
    let err = text(&out.stderr);
    assert!(err.contains("is a CA certificate"), "{err}");
    assert!(!err.contains("OtherError"), "{err}");
}

#[test]
fn a_bad_url_is_a_usage_error_with_status_2_that_names_it() {
    // Catches a malformed --url that exits 1, like a broker that is down, though the docs
    // promise 2 for invalid arguments.
    for url in [
        "localhost:8080",
        "http://127.0.0.1:1/ws",
        "ws://",
        "not a url",
    ] {
        for args in [
            vec!["pub", "--url", url, "--to", "client:bob", "x"],
            vec!["sub", "--url", url, "--client", "bob", "--no-position"],
        ] {
            let out = run(outboxd(&args), None);
            assert_exit(&out, 2, &format!("{} --url {url:?}", args[0]));
            let err = text(&out.stderr);
            assert!(err.contains(&format!("{url:?}")), "{err}");
            assert!(err.contains("ws://HOST:PORT/ws"), "{err}");
        }
    }
}

#[test]
fn pub_and_sub_without_url_use_server_listen_from_config_toml() {
    // Catches a default --url that ignores the config the broker itself reads.
    let broker = Broker::start(Opts::new());
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("config.toml"),
        format!("[server]\nlisten = \"{}\"\n", broker.addr),
    )
    .expect("write config.toml");
    let in_dir = |args: &[&str]| {
        let mut cmd = outboxd(args);
        cmd.current_dir(dir.path());
        run(cmd, None)
    };
    assert_exit(&in_dir(&["pub", "--to", "client:bob", "7"]), 0, "pub");
    let out = in_dir(&[
        "sub",
        "--client",
        "bob",
        "--count",
        "1",
        "--json",
        "--no-position",
    ]);
    assert_exit(&out, 0, "sub");
    assert_eq!(payloads(&text(&out.stdout)), vec![json!(7)]);
}

#[test]
fn sub_with_topic_subscribes_durably_then_prints_topic_messages() {
    // Catches --topic that subscribes too late (after messages were published) or not at all.
    let broker = Broker::start(Opts::new());
    let dir = tempfile::tempdir().expect("tempdir");
    let position = dir.path().join("bob.json");
    let position = position.to_str().expect("utf-8 path");
    // --count 0: subscribe and exit.
    let out = run(
        outboxd(&[
            "sub",
            "--url",
            &broker.url,
            "--client",
            "bob",
            "--topic",
            "news/eu",
            "--count",
            "0",
            "--position",
            position,
        ]),
        None,
    );
    assert_exit(&out, 0, "subscribe only");
    assert_exit(
        &run(
            outboxd(&["pub", "--url", &broker.url, "--to", "topic:news/eu", "hot"]),
            None,
        ),
        0,
        "pub to the topic",
    );
    let out = run(
        outboxd(&[
            "sub",
            "--url",
            &broker.url,
            "--client",
            "bob",
            "--count",
            "1",
            "--json",
            "--position",
            position,
        ]),
        None,
    );
    assert_exit(&out, 0, "sub");
    let line: Value = serde_json::from_str(text(&out.stdout).trim()).expect("one JSON line");
    assert_eq!(line["topic"], "news/eu");
    assert_eq!(line["payload"], "hot");
}

/// Reads a child's stdout lines as they come.
fn lines_of(child: &mut Child) -> std_mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std_mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn expect_lines(rx: &std_mpsc::Receiver<String>, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            rx.recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("line {} of {n} did not come: {e}", i + 1))
        })
        .collect()
}

fn publish_cli(url: &str, payload: &str) {
    let out = run(
        outboxd(&["pub", "--url", url, "--to", "client:bob", payload]),
        None,
    );
    assert_exit(&out, 0, "pub");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_sub_rides_through_a_broker_sigkill_and_prints_everything_once() {
    // Catches a sub that exits or stalls when the broker crashes, or prints again after the
    // restart what it printed before.
    let mut broker = Broker::start(Opts::new());
    let relay = Relay::start(broker.addr).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let position = dir.path().join("bob.json");
    let mut child = outboxd(&[
        "sub",
        "--url",
        &relay.url,
        "--client",
        "bob",
        "--json",
        "--count",
        "6",
        "--position",
        position.to_str().expect("utf-8 path"),
    ])
    .spawn()
    .expect("spawn sub");
    let rx = lines_of(&mut child);

    let got = tokio::task::block_in_place(|| {
        for i in 1..=3 {
            publish_cli(&broker.url, &i.to_string());
        }
        let mut got = expect_lines(&rx, 3);
        broker.kill9();
        broker.restart();
        relay.set_upstream(broker.addr);
        for i in 4..=6 {
            publish_cli(&broker.url, &i.to_string());
        }
        got.extend(expect_lines(&rx, 3));
        got
    });
    let out = tokio::task::block_in_place(|| finish(child));
    assert_exit(&out, 0, "sub --count 6");
    assert_eq!(
        payloads(&got.join("\n")),
        (1..=6).map(|i| json!(i)).collect::<Vec<_>>(),
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn sub_exits_nonzero_when_another_connection_takes_its_client_id() {
    // Catches two subscribers with one id fighting over the connection for ever.
    let broker = Broker::start(Opts::new());
    let mut child = outboxd(&[
        "sub",
        "--url",
        &broker.url,
        "--client",
        "bob",
        "--no-position",
        "-v",
    ])
    .spawn()
    .expect("spawn sub");
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = std_mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // -v says when the session is up.
    let connected = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("sub reports its connection");
    assert!(connected.contains("connected as bob"), "{connected}");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _thief = rt.block_on(async {
        let mut thief = common::Client::connect(&broker.url).await;
        thief.hello("bob", None).await;
        thief
    });
    let out = finish(child);
    assert_exit(&out, 1, "replaced sub");
    // The reader ends at the exited child's end of stderr.
    let rest: Vec<String> = rx.iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("replaced")),
        "stderr after connecting: {rest:?}"
    );
}

#[test]
fn pub_without_a_client_id_leaves_no_client_behind() {
    // Catches every `outboxd pub` run leaving a permanent, empty `pub-<hex>` outbox.
    let broker = Broker::start(Opts::new());
    for payload in ["one", "two"] {
        let out = run(
            outboxd(&["pub", "--url", &broker.url, "--to", "client:bob", payload]),
            None,
        );
        assert_exit(&out, 0, "pub");
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // The forget follows the connection's end: look until it is done.
    let deadline = Instant::now() + common::RECV_TIMEOUT;
    let names = loop {
        let clients = rt.block_on(broker.admin_get("/v1/clients")).json();
        let names: Vec<String> = clients
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|c| c["client_id"].as_str().map(str::to_owned))
            .collect();
        if names == ["bob"] || Instant::now() > deadline {
            break names;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(names, ["bob"], "only the recipient has an outbox");
    // The messages are there, from the forgotten publishers.
    let outbox = rt.block_on(broker.admin_get("/v1/clients/bob")).json();
    assert_eq!(outbox["pending"], 2, "{outbox}");
}
