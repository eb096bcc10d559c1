//! The outboxes: what each command does to them. Hello and resume, publish (to a client or
//! fanned out to a topic's subscribers, with idempotency keys and quotas), acks, purge,
//! subscriptions, and the tombstones that tell a client what retention removed unacked.
//!
//! Everything here runs on the writer thread and writes only into the commit group (or, for the
//! few writes that must be in the tree at once, through [`super::commit::Disk`]), so the latch
//! and the commit order are not this module's concern. Reads look at the group before the tree:
//! until the group is applied, the tree does not show its writes (see `group`).

use std::sync::Arc;

use sled::IVec;

use tracing::info;

use super::bodies::{BodyRef, ChunkKey, Facts};
use super::chunks::{self, Entries};
use super::group::Writes;
use super::records::{decode_dedup, encode, fingerprint, fresh_meta, new_epoch, stored_payload};
use super::writer::WriterState;
use super::{dedup, keys, records, StoreError};
use super::{HelloOutcome, PublishOutcome, PublishRequest, PurgeOutcome, ResumeRefused};
use crate::codec::{self, DedupEntry, StoredMessage};
use crate::model::{now_ms, Ack, ClientId, Resume, Target, Topic};

/// The message chunks a removal deletes, with their body log references.
type Released = Vec<(ChunkKey, Vec<BodyRef>)>;

impl WriterState {
    /// Finds or creates the client's outbox. Creation writes the name first, so a client number
    /// on disk always has its name.
    fn ensure_client(&mut self, name: &ClientId) -> Result<u64, StoreError> {
        if let Some(c) = self.clients.get(name) {
            return Ok(c.handle.cid);
        }
        let cid = self.next_cid;
        self.disk.name_client(name, cid)?;
        self.next_cid += 1;
        let meta = fresh_meta(name, cid);
        self.disk.insert(keys::meta(cid), encode(&meta)?)?;
        info!(client = %name, cid, epoch = %meta.epoch, "outbox created");
        self.clients.install(&self.handles, name.clone(), cid, meta);
        self.touched.push(cid);
        Ok(cid)
    }

    /// Tombstones of `cid` above `after`: messages retention removed unacked, for `missed`.
    fn count_missed(&self, cid: u64, after: u64) -> Result<u64, StoreError> {
        let lo = keys::seq_key(keys::MISSED, cid, after.saturating_add(1));
        let hi = keys::seq_key(keys::MISSED, cid, u64::MAX);
        let mut n = 0;
        for k in self.disk.tree().range(lo..=hi).keys() {
            if !self.disk.group().is_removed(&k?) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Creates the outbox when new and applies the resume position (a cumulative ack) when it
    /// holds; answers with the position in force and what was missed.
    pub(super) fn hello(
        &mut self,
        client: &ClientId,
        resume: Option<Resume>,
    ) -> Result<HelloOutcome, StoreError> {
        let cid = self.ensure_client(client)?;
        let (epoch, durable_next, acked) = {
            let c = self.clients.state_mut(cid).ok_or(StoreError::Closed)?;
            (c.meta.epoch.clone(), c.durable_next(), c.meta.acked)
        };
        let (resumed, reason, last_seq) = match resume {
            Some(r) if r.epoch != epoch => (false, Some(ResumeRefused::EpochMismatch), acked),
            // Nothing at or past the durable frontier has been sent to anyone.
            Some(r) if r.last_seq >= durable_next => (false, Some(ResumeRefused::Ahead), acked),
            Some(r) => {
                // A latched store still answers a hello from what is durable; the position
                // it states is not applied.
                if !self.disk.is_latched() {
                    if r.last_seq > acked {
                        self.ack(cid, Ack::Upto(r.last_seq))?;
                    } else {
                        self.drop_tombstones(cid, r.last_seq)?;
                    }
                }
                (true, None, r.last_seq)
            }
            None => (false, None, acked),
        };
        let missed = self.count_missed(cid, if resumed { last_seq } else { 0 })?;
        if let Ok(group) = self.disk.group_mut() {
            group.touch_meta(cid);
            if let Some(c) = self.clients.state_mut(cid) {
                c.meta.last_seen = now_ms();
            }
        }
        let c = self.clients.state_mut(cid).ok_or(StoreError::Closed)?;
        // Read first: the watch's read lock must be released before the write.
        let next = c.handle.generation.borrow().saturating_add(1);
        let generation = c.handle.note_generation(next);
        Ok(HelloOutcome {
            epoch,
            resumed,
            reason,
            last_seq,
            next_seq: c.meta.next_seq,
            pending: c.meta.pending,
            missed,
            handle: Arc::clone(&c.handle),
            generation,
        })
    }

    /// Writes a publish into the group: one message per recipient under its quota, or the
    /// answer of the first publish under the same idempotency key.
    pub(super) fn publish(&mut self, req: PublishRequest) -> Result<PublishOutcome, StoreError> {
        self.disk.writable()?;
        // `published` already counts this publish.
        if let Some(e) = self.opts.faults.write_error(self.published) {
            return Err(StoreError::Io(e));
        }
        let now = now_ms();
        let dedup_body = req
            .key
            .as_ref()
            .map(|k| keys::dedup_body(req.from.as_ref().map(|c| c.as_str()).unwrap_or(""), k));
        // Kept only with a key: a publish without one is not checked against anything.
        let fp = match &dedup_body {
            Some(_) => fingerprint(&req.to, &req.payload),
            None => 0,
        };
        if let Some(body) = &dedup_body {
            if let Some(entry) = self.find_dedup(body, now)? {
                if entry.fp != 0 && entry.fp != fp {
                    return Err(StoreError::KeyReused {
                        key: req.key.unwrap_or_default(),
                    });
                }
                return Ok(PublishOutcome {
                    id: format!("{:x}", entry.id),
                    recipients: entry.recipients,
                    duplicate: true,
                    full: Vec::new(),
                });
            }
        }
        let (recipients, topic): (Vec<u64>, Option<String>) = match &req.to {
            Target::Client(name) => (vec![self.ensure_client(name)?], None),
            Target::Topic(t) => (
                self.subscribers
                    .get(t)
                    .map(|s| s.iter().copied().collect())
                    .unwrap_or_default(),
                Some(t.as_str().to_owned()),
            ),
        };
        let id = self.disk.db().generate_id()?;
        let ttl = req
            .ttl_ms
            .filter(|t| *t > 0)
            .or((self.opts.message_ttl_ms > 0).then_some(self.opts.message_ttl_ms));
        let expires_at = ttl.map(|t| now.saturating_add(t)).unwrap_or(0);
        let size = u64::try_from(req.payload.len()).unwrap_or(u64::MAX);
        let record = StoredMessage {
            id,
            ts: now,
            from: req.from.as_ref().map(|c| c.as_str().to_owned()),
            topic,
            payload: stored_payload(req.payload),
            expires_at,
        };
        // The body goes to the body log once, however many outboxes it reaches; each chunk
        // holds its reference (see `bodies`).
        let body = if recipients.is_empty() {
            sled::IVec::default()
        } else if self.opts.faults.inline_bodies() {
            sled::IVec::from(codec::encode_body(&record).map_err(StoreError::Encode)?)
        } else {
            let facts = Facts {
                ts: now,
                expires_at,
                size,
            };
            sled::IVec::from(self.disk.append_body(&record, facts)?)
        };
        // Its seq is each outbox's own: the list of fresh messages sets it when it hands it out.
        let fresh = Arc::new(records::delivery(0, record));
        let (max_msgs, max_bytes) = (self.opts.max_outbox_messages, self.opts.max_outbox_bytes);
        if max_msgs > 0 || max_bytes > 0 {
            for cid in &recipients {
                self.settle_acks_of(*cid);
            }
        }
        let mut written = 0u64;
        let mut full = Vec::new();
        let group = self.disk.group_mut()?;
        for cid in recipients {
            let Some(c) = self.clients.state_mut(cid) else {
                continue;
            };
            let m = &mut c.meta;
            let over = (max_msgs > 0 && m.pending >= max_msgs)
                || (max_bytes > 0 && m.bytes.saturating_add(size) > max_bytes);
            if over {
                full.push(c.handle.name.clone());
                continue;
            }
            let seq = m.next_seq;
            m.next_seq += 1;
            m.pending += 1;
            m.bytes += size;
            group.append(cid, seq, body.clone());
            if expires_at > 0 {
                group.insert(keys::expiry(expires_at, cid, seq), &[]);
            }
            group.touch_meta(cid);
            if c.handle.is_watched() {
                self.fresh.push((cid, seq, Arc::clone(&fresh)));
            }
            self.touched.push(cid);
            written += 1;
        }
        if written > 0 || matches!(req.to, Target::Topic(_)) {
            if let Some(body) = &dedup_body {
                let entry = DedupEntry {
                    id,
                    ts: now,
                    recipients: written,
                    fp,
                };
                group.store_dedup(body, entry);
            }
        }
        // The messages, their metas and the dedup key land in the group's one batch, so they
        // are durable all-or-nothing.
        Ok(PublishOutcome {
            id: format!("{id:x}"),
            recipients: written,
            duplicate: false,
            full,
        })
    }

    /// The entry of an idempotency key (scope + key) stored within the dedup window, from this
    /// group, a record of its own or a run. A key named again after its window has a newer
    /// record of its own beside its old entry, which only retention has yet to delete.
    fn find_dedup(&mut self, body: &[u8], now: u64) -> Result<Option<DedupEntry>, StoreError> {
        let window = self.opts.dedup_window_ms;
        let fresh = |e: &DedupEntry| e.ts.saturating_add(window) > now;
        if let Some(e) = self.disk.group().dedup(body) {
            return Ok(Some(e.clone()));
        }
        if self.disk.may_hold_single(body)? {
            let k = keys::dedup(body);
            if let Some(v) = self.disk.tree().get(&k)? {
                let e: DedupEntry = decode_dedup(&k, &v)?;
                if fresh(&e) {
                    return Ok(Some(e));
                }
            }
        }
        Ok(dedup::find(self.disk.runs(), self.disk.bodies(), body)?.filter(fresh))
    }

    /// Adds to the group the removal of the tombstones at or below `upto`.
    fn drop_tombstones(&mut self, cid: u64, upto: u64) -> Result<(), StoreError> {
        let range = keys::seq_key(keys::MISSED, cid, 0)..=keys::seq_key(keys::MISSED, cid, upto);
        let found: Vec<sled::IVec> = self
            .disk
            .tree()
            .range(range)
            .keys()
            .collect::<Result<_, _>>()?;
        for k in found {
            if let (Some(seq), false) = (keys::seq_of(&k), self.disk.group().is_removed(&k)) {
                self.disk
                    .group_mut()?
                    .remove_tombstone(keys::seq_key(keys::MISSED, cid, seq));
            }
        }
        Ok(())
    }

    /// Deletes acked messages and advances the acked watermark. Tombstones of expired messages
    /// are dropped only up to a cumulative position the client stated (`upto`).
    ///
    /// Only messages below the durable frontier can have been sent, so an ack reaches no
    /// further; that also keeps it off the group's own publishes, which the tree does not
    /// show yet. Messages an earlier ack in this group deleted are skipped the same way.
    pub(super) fn ack(&mut self, cid: u64, ack: Ack) -> Result<(), StoreError> {
        let (acked, durable_next) = match self.clients.state_mut(cid) {
            Some(c) => (c.meta.acked, c.durable_next()),
            None => return Ok(()),
        };
        let last_sent = durable_next.saturating_sub(1);
        let (lo, hi) = match ack {
            Ack::Seq(s) if s > acked && s <= last_sent => (s, s),
            Ack::Upto(u) if u > acked => (acked + 1, u.min(last_sent)),
            _ => return Ok(()),
        };
        if lo > hi {
            return Ok(());
        }
        let mut freed = 0u64;
        let mut freed_bytes = 0u64;
        // Publish times of the deleted messages, for the publish-to-ack histogram.
        let mut published_at = Vec::new();
        let mut next = self.chunk_holding(cid, lo)?;
        while let Some((key, entries)) = next {
            let (gone, keep): (Entries, Entries) = entries
                .into_iter()
                .partition(|(s, _)| (lo..=hi).contains(s));
            if !gone.is_empty() {
                for (seq, body) in &gone {
                    let m = chunks::facts(&key, body)?;
                    if m.expires_at > 0 {
                        self.disk
                            .group_mut()?
                            .remove(keys::expiry(m.expires_at, cid, *seq));
                    }
                    freed_bytes += m.size;
                    freed += 1;
                    published_at.push(m.ts);
                }
                self.disk.group_mut()?.put_chunk(key, keep);
            }
            next = match keys::seq_of(&key) {
                Some(at) if at < hi => self.chunk_after(cid, at, hi)?,
                _ => None,
            };
        }
        // The new watermark: just below the first message still stored once the group lands.
        let base = if matches!(ack, Ack::Upto(_)) {
            hi
        } else {
            acked
        };
        let first_left = self.first_stored_after(cid, base, durable_next)?;
        let watermark = first_left
            .map_or(last_sent, |s| s.saturating_sub(1))
            .max(acked);
        // Only a position the client stated (`upto`) says it has moved past a removed message;
        // a watermark that jumps over one after per-seq acks must keep it, or `missed` would
        // never report it.
        if let Ack::Upto(u) = ack {
            self.drop_tombstones(cid, u.min(last_sent))?;
        }
        let Some(c) = self.clients.state_mut(cid) else {
            return Ok(());
        };
        self.disk.group_mut()?.touch_meta(cid);
        c.handle.fresh().remove(lo, hi);
        c.meta.pending = c.meta.pending.saturating_sub(freed);
        c.meta.bytes = c.meta.bytes.saturating_sub(freed_bytes);
        c.meta.acked = watermark;
        // Before the count: whoever sees the ack counted sees its writes waiting.
        self.disk.show_pending();
        let m = &self.opts.metrics;
        m.acked.add(freed);
        let now = now_ms();
        for ts in published_at {
            m.publish_to_ack_seconds
                .observe(now.saturating_sub(ts) as f64 / 1000.0);
        }
        Ok(())
    }

    /// The chunk of `cid` that can hold `seq` (greatest key at or below it), as the tree will
    /// hold it once the group is applied.
    pub(super) fn chunk_holding(
        &self,
        cid: u64,
        seq: u64,
    ) -> Result<Option<([u8; 17], Entries)>, StoreError> {
        // A stored chunk the group deleted cannot hold `seq`: any chunk before it ends below it.
        let stored = match chunks::holding(self.disk.tree(), cid, seq)? {
            Some((k, v)) => self.as_grouped(&k, &v)?,
            None => None,
        };
        let grouped = self.disk.group().last_chunk_in(cid, 0, seq);
        Ok(match (stored, grouped) {
            (Some(s), Some((gk, _))) if s.0 >= gk => Some(s),
            (_, Some((gk, e))) => Some((gk, e.clone())),
            (s, None) => s,
        })
    }

    /// The stored chunk `key` → `value` as the group leaves it: None when the group deleted it.
    fn as_grouped(
        &self,
        key: &[u8],
        value: &sled::IVec,
    ) -> Result<Option<([u8; 17], Entries)>, StoreError> {
        let Ok(k) = <[u8; 17]>::try_from(key) else {
            return Ok(None);
        };
        Ok(match self.disk.group().chunk(key) {
            Some(None) => None,
            Some(Some(e)) => Some((k, e.clone())),
            None => Some((k, chunks::split(key, value)?)),
        })
    }

    /// The first chunk of `cid` with a key in `after+1..=to`, as the tree will hold it once the
    /// group is applied.
    fn chunk_after(
        &self,
        cid: u64,
        after: u64,
        to: u64,
    ) -> Result<Option<([u8; 17], Entries)>, StoreError> {
        if after >= to {
            return Ok(None);
        }
        let lo = keys::seq_key(keys::MSG, cid, after + 1);
        let hi = keys::seq_key(keys::MSG, cid, to);
        let mut stored = None;
        for item in self.disk.tree().range(lo..=hi) {
            let (k, v) = item?;
            stored = self.as_grouped(&k, &v)?;
            if stored.is_some() {
                break;
            }
        }
        let grouped = self.disk.group().first_chunk_in(cid, after + 1, to);
        Ok(match (stored, grouped) {
            (Some(s), Some((gk, _))) if s.0 <= gk => Some(s),
            (_, Some((gk, e))) => Some((gk, e.clone())),
            (s, None) => s,
        })
    }

    /// The first seq of `cid` stored above `base` and below `end`, once the group is applied.
    fn first_stored_after(&self, cid: u64, base: u64, end: u64) -> Result<Option<u64>, StoreError> {
        let Some(from) = base.checked_add(1).filter(|f| *f < end) else {
            return Ok(None);
        };
        if let Some((_, entries)) = self.chunk_holding(cid, from)? {
            if let Some((s, _)) = entries.iter().find(|(s, _)| *s >= from) {
                return Ok(Some(*s).filter(|s| *s < end));
            }
        }
        // Every message of a later chunk is above `from`: its first is the one.
        Ok(self
            .chunk_after(cid, from, end - 1)?
            .and_then(|(_, e)| e.first().map(|(s, _)| *s))
            .filter(|s| *s < end))
    }

    /// Adds to `batch` the removal of every stored message of outbox `cid` and of their expiry
    /// entries, with a tombstone for each when `tombstones`. Returns how many messages it
    /// removes and the body log references of the chunks it deletes (released once `batch` is
    /// applied). The group must have been applied: the scan reads the tree.
    fn remove_messages(
        &self,
        cid: u64,
        batch: &mut Writes,
        tombstones: bool,
    ) -> Result<(u64, Released), StoreError> {
        let mut removed = 0u64;
        let mut released = Vec::new();
        for item in self
            .disk
            .tree()
            .scan_prefix(keys::seq_prefix(keys::MSG, cid))
        {
            let (k, v) = item?;
            for (seq, body) in chunks::split(&k, &v)? {
                let m = chunks::facts(&k, &body)?;
                if m.expires_at > 0 {
                    batch.insert(IVec::from(&keys::expiry(m.expires_at, cid, seq)[..]), None);
                }
                if tombstones {
                    batch.insert(
                        IVec::from(&keys::seq_key(keys::MISSED, cid, seq)[..]),
                        Some(IVec::default()),
                    );
                }
                removed += 1;
            }
            if let Ok(key) = <[u8; 17]>::try_from(k.as_ref()) {
                released.push((key, chunks::refs(&k, &v)?));
            }
            batch.insert(k, None);
        }
        Ok((removed, released))
    }

    /// Removes every stored message of `client` (leaving tombstones) and moves its outbox to a
    /// new epoch; written at once, since the scan must see every message.
    pub(super) fn purge(&mut self, client: &ClientId) -> Result<Option<PurgeOutcome>, StoreError> {
        self.disk.writable()?;
        let Some(cid) = self.clients.get(client).map(|c| c.handle.cid) else {
            return Ok(None);
        };
        // The scan below must see every message, including this group's.
        self.apply_group()?;
        let mut batch = Writes::new();
        let (removed, released) = self.remove_messages(cid, &mut batch, true)?;
        self.forget_fresh(cid, 0, u64::MAX);
        let Some(c) = self.clients.state_mut(cid) else {
            return Ok(None);
        };
        c.handle.forget_sends(Ack::Upto(u64::MAX));
        c.meta.epoch = new_epoch(cid);
        c.meta.pending = 0;
        c.meta.bytes = 0;
        c.meta.acked = c.meta.next_seq.saturating_sub(1);
        let epoch = c.meta.epoch.clone();
        batch.insert(
            IVec::from(&keys::meta(cid)[..]),
            Some(encode(&c.meta)?.into()),
        );
        self.disk.apply_batch(batch)?;
        self.disk.release_bodies(released);
        self.touched.push(cid);
        Ok(Some(PurgeOutcome { removed, epoch }))
    }

    /// Deletes the outbox of `client` and everything under it (messages, tombstones,
    /// subscriptions, its name); written at once. Returns the messages removed unacked, None
    /// when the client has no outbox. Its next hello makes a new outbox, with a new epoch.
    pub(super) fn delete(&mut self, client: &ClientId) -> Result<Option<u64>, StoreError> {
        self.disk.writable()?;
        let Some(cid) = self.clients.get(client).map(|c| c.handle.cid) else {
            return Ok(None);
        };
        // The scans below must see every record, including this group's.
        self.apply_group()?;
        let mut batch = Writes::new();
        let (removed, released) = self.remove_messages(cid, &mut batch, false)?;
        for k in self
            .disk
            .tree()
            .scan_prefix(keys::seq_prefix(keys::MISSED, cid))
            .keys()
        {
            batch.insert(k?, None);
        }
        let topics: Vec<Topic> = self
            .subscribers
            .iter()
            .filter(|(_, s)| s.contains(&cid))
            .map(|(t, _)| t.clone())
            .collect();
        for t in &topics {
            batch.insert(IVec::from(keys::sub(t.as_str(), cid)), None);
            if let Some(set) = self.subscribers.get_mut(t) {
                set.remove(&cid);
                if set.is_empty() {
                    self.subscribers.remove(t);
                }
            }
        }
        batch.insert(IVec::from(&keys::meta(cid)[..]), None);
        self.disk.apply_batch(batch)?;
        self.disk.release_bodies(released);
        // The name last: a crash before it leaves a name without records, which the next
        // open gives a fresh, empty outbox.
        self.disk.unname_client(client)?;
        self.forget_fresh(cid, 0, u64::MAX);
        self.clients.remove(&self.handles, cid);
        self.uptos.remove(&cid);
        self.touched.push(cid);
        info!(client = %client, cid, removed, "outbox deleted");
        Ok(Some(removed))
    }

    /// Deletes the outbox of `client` when nothing is stored for it (no message, no
    /// subscription, no tombstone) and its newest connection is the one of `generation`.
    pub(super) fn forget_if_idle(
        &mut self,
        client: &ClientId,
        generation: u64,
    ) -> Result<bool, StoreError> {
        let Some(c) = self.clients.get(client) else {
            return Ok(false);
        };
        let cid = c.handle.cid;
        let newest = *c.handle.generation.borrow();
        if c.meta.pending > 0 || newest != generation || self.uptos.contains_key(&cid) {
            return Ok(false);
        }
        if self.subscribers.values().any(|s| s.contains(&cid)) || self.count_missed(cid, 0)? > 0 {
            return Ok(false);
        }
        Ok(self.delete(client)?.is_some())
    }

    /// Adds or removes a durable subscription (limited by `limits.max_subscriptions`).
    pub(super) fn subscribe(
        &mut self,
        client: &ClientId,
        topic: &Topic,
        on: bool,
    ) -> Result<(), StoreError> {
        self.disk.writable()?;
        let cid = self.ensure_client(client)?;
        let key = keys::sub(topic.as_str(), cid);
        if on {
            let limit = self.opts.max_subscriptions;
            let already = self
                .subscribers
                .get(topic)
                .is_some_and(|s| s.contains(&cid));
            if limit > 0 && !already {
                let held = self
                    .subscribers
                    .values()
                    .filter(|s| s.contains(&cid))
                    .count();
                if held >= usize::try_from(limit).unwrap_or(usize::MAX) {
                    return Err(StoreError::TooManySubscriptions { limit });
                }
            }
            self.disk.insert(key, Vec::new())?;
            self.subscribers
                .entry(topic.clone())
                .or_default()
                .insert(cid);
        } else {
            self.disk.remove(key)?;
            if let Some(set) = self.subscribers.get_mut(topic) {
                set.remove(&cid);
                if set.is_empty() {
                    self.subscribers.remove(topic);
                }
            }
        }
        // Any write needs the next commit before the reply.
        self.touched.push(cid);
        Ok(())
    }
}
