//! Acks on PostgreSQL: a run of them is gathered per outbox (a newer connection's acks replace
//! an older one's) and applied at its place in the group, with the sled store's rules: nothing
//! at or past the durable frontier can have been sent, and only a cumulative ack drops
//! tombstones.

use std::collections::BTreeMap;

use tokio_postgres::Transaction;
use tracing::debug;

use super::prepared::Prepared;
use super::{i, u, Pg};
use crate::model::{now_ms, Ack};
use crate::store::StoreOptions;

/// Acks of one outbox waiting for the next ack transaction.
pub(super) struct AckBatch {
    generation: u64,
    durable_next: u64,
    upto: Option<u64>,
    seqs: Vec<u64>,
}

/// Adds one ack to the run being gathered; a newer connection's acks replace an older one's.
pub(super) fn add_ack(
    acks: &mut BTreeMap<u64, AckBatch>,
    cid: u64,
    generation: u64,
    durable_next: u64,
    ack: Ack,
) {
    let b = acks.entry(cid).or_insert(AckBatch {
        generation,
        durable_next,
        upto: None,
        seqs: Vec::new(),
    });
    if generation > b.generation {
        *b = AckBatch {
            generation,
            durable_next,
            upto: None,
            seqs: Vec::new(),
        };
    } else if generation < b.generation {
        return;
    }
    b.durable_next = b.durable_next.max(durable_next);
    match ack {
        Ack::Upto(n) => b.upto = Some(b.upto.map_or(n, |m| m.max(n))),
        Ack::Seq(s) => b.seqs.push(s),
    }
}

/// Applies a run of acks, the outboxes locked in client-number order; acks of a connection
/// that was taken over (its generation is no longer the outbox's) are dropped.
pub(super) async fn apply_acks(
    tx: &Transaction<'_>,
    prepared: &Prepared,
    acks: BTreeMap<u64, AckBatch>,
    opts: &StoreOptions,
) -> Result<(), Pg> {
    let cids: Vec<i64> = acks.keys().map(|c| i(*c)).collect();
    let rows = tx
        .query(
            "SELECT cid, acked, conn_gen FROM outboxd_clients WHERE cid = ANY($1) \
             ORDER BY cid FOR UPDATE",
            &[&cids],
        )
        .await?;
    for row in rows {
        let cid = u(row.try_get(0)?);
        let mut acked = u(row.try_get(1)?);
        let current = u(row.try_get(2)?);
        let Some(b) = acks.get(&cid) else { continue };
        if current != b.generation {
            debug!(cid, "acks of a connection that was taken over dropped");
            continue;
        }
        if let Some(upto) = b.upto {
            acked = ack_one(
                tx,
                prepared,
                cid,
                Ack::Upto(upto),
                acked,
                b.durable_next,
                opts,
            )
            .await?
            .max(acked);
        }
        for s in &b.seqs {
            acked = ack_one(tx, prepared, cid, Ack::Seq(*s), acked, b.durable_next, opts)
                .await?
                .max(acked);
        }
    }
    Ok(())
}

/// Applies one ack to outbox `cid` (its row locked by the caller, `acked` its watermark) and
/// returns the new watermark. Mirrors the sled store's rules: nothing at or past
/// `durable_next` can have been sent, so an ack reaches no further; only a cumulative ack
/// drops tombstones.
pub(super) async fn ack_one(
    tx: &Transaction<'_>,
    prepared: &Prepared,
    cid: u64,
    ack: Ack,
    acked: u64,
    durable_next: u64,
    opts: &StoreOptions,
) -> Result<u64, Pg> {
    let last_sent = durable_next.saturating_sub(1);
    let (lo, hi) = match ack {
        Ack::Seq(s) if s > acked && s <= last_sent => (s, s),
        Ack::Upto(n) if n > acked => (acked + 1, n.min(last_sent)),
        _ => return Ok(acked),
    };
    if lo > hi {
        return Ok(acked);
    }
    let (base, tombstones) = match ack {
        Ack::Upto(_) => (hi, i(hi)),
        Ack::Seq(_) => (acked, -1),
    };
    let row = tx
        .query_one(
            &prepared.ack,
            &[
                &i(cid),
                &i(lo),
                &i(hi),
                &tombstones,
                &i(base),
                &i(durable_next),
            ],
        )
        .await?;
    let published: Vec<i64> = row.try_get(1)?;
    let m = &opts.metrics;
    m.acked.add(published.len() as u64);
    let now = now_ms();
    for ts in published {
        m.publish_to_ack_seconds
            .observe(now.saturating_sub(u(ts)) as f64 / 1000.0);
    }
    Ok(u(row.try_get(0)?))
}
