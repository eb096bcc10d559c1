//! Retention: messages past their TTL are removed unacked (a tombstone under `X` tells the
//! client, in `missed`), and idempotency keys older than the dedup window are forgotten.
//!
//! It runs on the writer thread between commands (every `writer::SWEEP_EVERY` when idle), removes at most
//! [`SWEEP_BATCH`] records per sweep so a backlog never stalls the writer, and writes into the
//! commit group like every other command. The dedup expiry index is one record per commit
//! group (`G` for keys stored one per record, `H` for runs; `D` per key in data dirs from
//! before), so forgetting a group's keys is one range scan.
//!
//! The same sweep compacts the body log: the bodies still stored in a mostly dead segment are
//! appended again and their chunks rewritten, so the segment can go (see `bodies`).

use std::collections::HashMap;

use sled::IVec;
use tracing::{debug, info};

use super::bodies::{self, BodyRef, Lane};
use super::records::{decode, decode_dedup};
use super::writer::WriterState;
use super::{chunks, group, keys, StoreError};
use crate::codec::DedupEntry;
use crate::model::now_ms;

/// The most messages, or idempotency keys, one retention sweep removes: a backlog of expired
/// records is worked off over several sweeps instead of stalling the writer in one.
const SWEEP_BATCH: usize = 10_000;

impl WriterState {
    /// One step of the body log's compaction, when one is due: the chunks that still refer to
    /// the oldest mostly dead segment get those bodies appended again (once per body, however
    /// many chunks share it) and are rewritten; once that is durable, nothing refers to the
    /// segment and it is deleted. Its writes join the group.
    pub(super) fn compact_bodies(&mut self) -> Result<(), StoreError> {
        if self.disk.is_latched() || self.disk.bodies().compaction().is_none() {
            return Ok(());
        }
        // The chunks are read from the tree, and the references counted, as the group leaves
        // them.
        self.apply_group()?;
        let Some((seg, keys)) = self.disk.bodies().compaction() else {
            return Ok(());
        };
        let mut moved: HashMap<BodyRef, BodyRef> = HashMap::new();
        let mut records = 0usize;
        for key in keys {
            let Some(value) = self.disk.tree().get(&key)? else {
                continue;
            };
            if key.first() == Some(&keys::DEDUP_RUN) {
                let Some((r, first)) = bodies::decode_place(&value) else {
                    continue;
                };
                if r.seg == seg {
                    let new = self.move_body(&key, r, &mut moved)?;
                    let value = bodies::encode_place(new, first);
                    self.disk.group_mut()?.insert(&key, value);
                    records += 1;
                }
                continue;
            }
            let Ok(chunk) = <[u8; 17]>::try_from(key.as_slice()) else {
                continue;
            };
            let mut entries = chunks::split(&key, &value)?;
            let mut changed = false;
            for (_, entry) in &mut entries {
                let Some((r, facts)) = BodyRef::decode(entry) else {
                    continue;
                };
                if r.seg != seg {
                    continue;
                }
                *entry = IVec::from(self.move_body(&key, r, &mut moved)?.encode(facts));
                changed = true;
            }
            if changed {
                self.disk.group_mut()?.put_chunk(chunk, entries);
                records += 1;
            }
        }
        // Routine: at 16 KiB saturation a nearly dead segment is compacted many times a second.
        debug!(
            segment = format!("{seg:016x}"),
            bodies = moved.len(),
            records,
            "body log: moved the bodies still stored in a mostly dead segment forward"
        );
        Ok(())
    }

    /// Appends the body `r` (held by the record under `key`) again, to the cold head: once
    /// per body, however many records share it (`moved`).
    fn move_body(
        &mut self,
        key: &[u8],
        r: BodyRef,
        moved: &mut HashMap<BodyRef, BodyRef>,
    ) -> Result<BodyRef, StoreError> {
        if let Some(n) = moved.get(&r) {
            return Ok(*n);
        }
        let body = chunks::stored_body(key, r, self.disk.bodies())?;
        let n = self.disk.body_log_mut()?.append(Lane::Cold, &body);
        moved.insert(r, n);
        Ok(n)
    }

    /// Retention: expire messages past their TTL (leaving a tombstone so the client is told)
    /// and forget idempotency keys older than the dedup window. Its writes join the group.
    pub(super) fn sweep(&mut self) -> Result<(), StoreError> {
        // Retention only writes: a latched store keeps what it has.
        if self.disk.is_latched() {
            return Ok(());
        }
        let now = now_ms();
        let horizon = now.saturating_sub(self.opts.dedup_window_ms);
        if self.due_expiries(now)?.is_empty() && !self.any_stale_dedup(horizon)? {
            return Ok(());
        }
        // The scans must not see what this group's acks already deleted.
        self.apply_group()?;
        for (at, cid, seq) in self.due_expiries(now)? {
            self.disk.group_mut()?.remove(keys::expiry(at, cid, seq));
            let Some((key, mut entries)) = self.chunk_holding(cid, seq)? else {
                continue;
            };
            let Some(i) = entries.iter().position(|(s, _)| *s == seq) else {
                continue;
            };
            let (_, body) = entries.remove(i);
            let m = chunks::facts(&key, &body)?;
            self.disk.group_mut()?.put_chunk(key, entries);
            self.disk
                .group_mut()?
                .insert(keys::seq_key(keys::MISSED, cid, seq), &[][..]);
            self.forget_fresh(cid, seq, seq);
            if let Some(c) = self.clients.state_mut(cid) {
                c.meta.pending = c.meta.pending.saturating_sub(1);
                c.meta.bytes = c.meta.bytes.saturating_sub(m.size);
                self.disk.group_mut()?.touch_meta(cid);
            }
            self.opts.metrics.expired.inc();
            info!(
                cid,
                seq, "message expired unacked (TTL); the client will see it in `missed`"
            );
        }
        for (record, listed) in self.stale_dedups(horizon)? {
            for (ts, body) in listed {
                let dk = keys::dedup(&body);
                if let Some(v) = self.disk.tree().get(&dk)? {
                    let e: DedupEntry = decode_dedup(&dk, &v)?;
                    // A later publish under the same key (after the window) owns it now.
                    if e.ts == ts {
                        self.disk.group_mut()?.remove(dk);
                    }
                }
            }
            self.disk.group_mut()?.remove(record);
        }
        for (record, listed) in self.stale_lists(keys::DEDUP_RUN_LIST, horizon)?.0 {
            // A run is never rewritten, and no other run can take its key while it exists (that
            // key is inside its range), so the run a list names is the one it listed.
            for (_, body) in listed {
                self.disk.group_mut()?.remove(keys::dedup_run(&body));
            }
            self.disk.group_mut()?.remove(record);
        }
        // The tombstones just written must be in the tree for the next hello's `missed` count
        // (the overlay does not show inserts), so this group is not held back.
        self.apply_group()
    }

    /// Expiry entries due at `now`, oldest first (at most [`SWEEP_BATCH`] per sweep).
    fn due_expiries(&self, now: u64) -> Result<Vec<(u64, u64, u64)>, StoreError> {
        let mut due = Vec::new();
        for item in self
            .disk
            .tree()
            .range([keys::EXPIRY].as_slice()..keys::expiry(now, 0, 0).as_slice())
            .keys()
        {
            if let Some(e) = keys::parse_expiry(&item?) {
                due.push(e);
            }
            if due.len() >= SWEEP_BATCH {
                break;
            }
        }
        Ok(due)
    }

    /// True when some dedup expiry record is older than `horizon`.
    fn any_stale_dedup(&self, horizon: u64) -> Result<bool, StoreError> {
        let mut legacy = vec![keys::DEDUP_EXPIRY];
        legacy.extend_from_slice(&0u64.to_be_bytes());
        let stale = |kind| keys::group_list(kind, 0, 0)..keys::group_list(kind, horizon, 0);
        Ok(self
            .disk
            .tree()
            .range(stale(keys::DEDUP_LIST))
            .next()
            .transpose()?
            .is_some()
            || self
                .disk
                .tree()
                .range(stale(keys::DEDUP_RUN_LIST))
                .next()
                .transpose()?
                .is_some()
            || self
                .disk
                .tree()
                .range(legacy..keys::dedup_expiry(horizon, &[]))
                .next()
                .transpose()?
                .is_some())
    }

    /// A group's dedup lists of one kind (`G` or `H`, see [`keys::group_list`]) older than
    /// `horizon`, listing at most about [`SWEEP_BATCH`] entries and at least one list: each
    /// list's key and what it lists, and how many entries that is. A list names many records,
    /// so the bound is on the entries and one sweep stays short.
    fn stale_lists(
        &self,
        kind: u8,
        horizon: u64,
    ) -> Result<(Vec<(sled::IVec, group::Expiring)>, usize), StoreError> {
        let mut stale = Vec::new();
        let mut listed = 0usize;
        let range = keys::group_list(kind, 0, 0)..keys::group_list(kind, horizon, 0);
        for item in self.disk.tree().range(range) {
            let (k, v) = item?;
            let entries: group::Expiring = decode(&k, &v)?;
            listed += entries.len();
            stale.push((k, entries));
            if listed >= SWEEP_BATCH {
                break;
            }
        }
        Ok((stale, listed))
    }

    /// Dedup expiry records older than `horizon` (listing at most about [`SWEEP_BATCH`] keys
    /// per sweep, and at least one record): each record's key
    /// and the (time, scope + key) of the idempotency keys it lists. A group's record (`G`)
    /// lists all the keys it stored; data dirs from before hold one `D` record per key.
    fn stale_dedups(&self, horizon: u64) -> Result<Vec<(sled::IVec, group::Expiring)>, StoreError> {
        let (mut stale, keys_listed) = self.stale_lists(keys::DEDUP_LIST, horizon)?;
        if keys_listed >= SWEEP_BATCH {
            return Ok(stale);
        }
        let mut lo = vec![keys::DEDUP_EXPIRY];
        lo.extend_from_slice(&0u64.to_be_bytes());
        let hi = keys::dedup_expiry(horizon, &[]);
        for item in self.disk.tree().range(lo..hi).keys() {
            let k = item?;
            let ts = k
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes);
            if let (Some(ts), Some(body)) = (ts, k.get(9..)) {
                let listed = vec![(ts, body.to_vec())];
                stale.push((k, listed));
            }
            if keys_listed + stale.len() >= SWEEP_BATCH {
                break;
            }
        }
        Ok(stale)
    }
}
