//! A publisher whose messages are written once, even across reconnects.
//!
//! ```sh
//! cargo run --example publisher -- ws://127.0.0.1:8080/ws client:bob 10
//! ```
//!
//! Publishes N messages to the target (`client:ID` or `topic:NAME`), up to 100 in flight at
//! once, and exits when the broker has confirmed every one: each is then durable in its
//! recipients' outboxes. Kill and restart the broker while it runs: the publisher reconnects,
//! sends the unconfirmed messages again with the same idempotency keys, and none is written
//! twice. The keys name this run and the target, so a second run (to the same target or
//! another) publishes new messages instead of being answered "already written".

use std::time::Duration;

use outboxd::client::Client;
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:8080/ws".into());
    let to = args.next().unwrap_or_else(|| "client:bob".into());
    let n: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10);

    let client = Client::builder(url, "example-publisher").connect().await?;
    // One name per run: retries inside the run share their keys, another run does not.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let mut pending = Vec::new();
    for i in 1..=n {
        // start() queues the publish at once: they are written in this order.
        let publish = client
            .publish(to.clone(), json!({"n": i, "text": format!("message {i}")}))
            .key(format!("example-{run}-{to}-{i}"))
            .timeout(Duration::from_secs(60))
            .start();
        pending.push(publish);
        if pending.len() == 100 || i == n {
            for p in pending.drain(..) {
                let ok = p.await?;
                println!(
                    "confirmed id={} recipients={}{}",
                    ok.id,
                    ok.recipients,
                    if ok.duplicate {
                        " (already written)"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    client.close().await;
    Ok(())
}
