//! A subscriber that survives restarts of itself and of the broker.
//!
//! ```sh
//! cargo run --example subscriber -- ws://127.0.0.1:8080/ws bob [TOPIC]...
//! ```
//!
//! Prints every message addressed to `bob` (and to the topics given, which it subscribes to),
//! once, in order, and acks each after printing. Its position is kept in `./bob.position.json`:
//! stop it, publish more, start it again, and it continues where it stopped. Stop it with
//! Ctrl-C.

use std::convert::Infallible;

use outboxd::client::{Client, Event, FilePositionStore, Incoming};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:8080/ws".into());
    let id = args.next().unwrap_or_else(|| "bob".into());
    let topics: Vec<String> = args.collect();

    let mut client = Client::builder(url, id.clone())
        .position_store(FilePositionStore::new(format!("{id}.position.json")))
        .connect()
        .await?;
    for topic in &topics {
        client.subscribe(topic).await?;
    }

    // `run` acks each delivery after the handler returns Ok.
    let handling = client.run(|item| async move {
        match item {
            Incoming::Delivery(d) => {
                let payload = d.payload.as_json_text().unwrap_or("<binary>");
                let from = d.from.as_deref().unwrap_or("?");
                println!("#{} from {from}: {payload}", d.seq);
            }
            Incoming::Event(Event::Missed { count, .. }) => {
                eprintln!("{count} message(s) expired before we could read them");
            }
            Incoming::Event(e) => eprintln!("{e:?}"),
        }
        Ok::<(), Infallible>(())
    });
    tokio::select! {
        r = handling => r?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
