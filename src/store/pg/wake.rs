//! Wake-ups and takeovers between brokers sharing one database.
//!
//! Each broker listens on its own channel (`outboxd_<node>`). Another broker's writer, after a
//! commit, sends it `w<cid>:<next_seq>` for each outbox it wrote whose client is connected
//! here, and `k<cid>:<generation>` when a newer connection of a client held here said hello
//! there. Notifications are lost while the listening connection is down, so the listener also
//! re-reads `next_seq` and `conn_gen` of every outbox a connection here watches, every
//! `postgres.recheck_ms` and after each reconnect: a lost wake-up only delays a delivery, and
//! an older connection is closed within that time. Both ends live here: [`notify`], which the
//! writer calls after a commit, and the listener.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::Client;
use tracing::{debug, info, warn};

use super::{connect, i, u, Live, OnMessage, Target};

/// The notification channel of broker `node`.
pub(super) fn channel(node: &str) -> String {
    format!("outboxd_{node}")
}

/// Tells other brokers what a commit means for them: `w<cid>:<next_seq>` for each outbox of
/// `wake` (node → client number → next_seq) and `<kind><cid>:<generation>` for each of `kicks`
/// (node → kind, client number, generation).
pub(super) async fn notify(
    client: &Client,
    wake: HashMap<String, BTreeMap<u64, u64>>,
    kicks: HashMap<String, Vec<(char, u64, u64)>>,
) {
    let mut notes: Vec<(String, String)> = Vec::new();
    for (node, cids) in wake {
        let items: Vec<String> = cids.iter().map(|(c, n)| format!("w{c}:{n}")).collect();
        notes.extend(payloads(&node, items));
    }
    for (node, taken) in kicks {
        let items: Vec<String> = taken
            .iter()
            .map(|(kind, c, g)| format!("{kind}{c}:{g}"))
            .collect();
        notes.extend(payloads(&node, items));
    }
    for (channel, payload) in notes {
        // Best effort: the other broker's periodic re-check covers a lost one.
        if let Err(e) = client
            .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
            .await
        {
            debug!(error = %e, "wake-up not sent");
        }
    }
}

/// The channel and payloads that tell `node` of `items`, each payload under PostgreSQL's limit.
fn payloads(node: &str, items: Vec<String>) -> Vec<(String, String)> {
    let channel = channel(node);
    let mut out = Vec::new();
    let mut payload = String::new();
    for item in items {
        if !payload.is_empty() && payload.len() + item.len() + 1 > 7000 {
            out.push((channel.clone(), std::mem::take(&mut payload)));
        }
        if !payload.is_empty() {
            payload.push(',');
        }
        payload.push_str(&item);
    }
    if !payload.is_empty() {
        out.push((channel, payload));
    }
    out
}

/// Applies one notification's items to the live handles.
fn apply(live: &Live, payload: &str) {
    for item in payload.split(',') {
        let (kind, rest) = item.split_at(item.len().min(1));
        let Some((cid, value)) = rest.split_once(':') else {
            continue;
        };
        let (Ok(cid), Ok(value)) = (cid.parse::<u64>(), value.parse::<u64>()) else {
            continue;
        };
        let Some(h) = live.get(cid) else { continue };
        match kind {
            "w" => {
                h.advance(value);
            }
            "p" => {
                info!(cid, "outbox purged or deleted through another broker");
                h.end_purged(value);
            }
            "k" if h.supersede(value) => {
                info!(
                    cid,
                    "a newer connection of this client said hello on another broker"
                );
            }
            _ => {}
        }
    }
}

/// Re-reads the outboxes connections here watch.
async fn recheck(
    client: &tokio_postgres::Client,
    live: &Live,
    node: &str,
) -> Result<(), tokio_postgres::Error> {
    let watched = live.watched();
    if watched.is_empty() {
        return Ok(());
    }
    let cids: Vec<i64> = watched.iter().map(|h| i(h.cid)).collect();
    let rows = client
        .query(
            "SELECT cid, next_seq, conn_gen, node FROM outboxd_clients WHERE cid = ANY($1)",
            &[&cids],
        )
        .await?;
    for row in rows {
        let cid = u(row.try_get(0)?);
        if let Some(h) = live.get(cid) {
            h.advance(u(row.try_get(1)?));
            // A takeover on this broker is the registry's business; one elsewhere is ours.
            let holder: Option<String> = row.try_get(3)?;
            if holder.is_some_and(|n| n != node) && h.supersede(u(row.try_get(2)?)) {
                info!(
                    cid,
                    "a newer connection of this client said hello on another broker"
                );
            }
        }
    }
    Ok(())
}

/// Listens for this broker's notifications and re-checks periodically, reconnecting as
/// needed; runs until aborted.
pub(super) async fn listen(target: Target, live: Arc<Live>, recheck_ms: u64) {
    let every = Duration::from_millis(recheck_ms.max(10));
    loop {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let client = match connect(&target, OnMessage::Listener(tx)).await {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "wake-up listener cannot connect; retrying");
                tokio::time::sleep(every).await;
                continue;
            }
        };
        let listen = format!("LISTEN {}", channel(&target.node));
        if let Err(e) = client.batch_execute(&listen).await {
            warn!(error = %e, "cannot listen for wake-ups; retrying");
            tokio::time::sleep(every).await;
            continue;
        }
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                note = rx.recv() => match note {
                    Some(payload) => apply(&live, &payload),
                    None => break,
                },
                _ = tick.tick() => {
                    if let Err(e) = recheck(&client, &live, &target.node).await {
                        warn!(error = %e, "re-check of connected outboxes failed");
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}
