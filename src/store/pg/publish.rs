//! A run of publishes written with one set of statements whatever its size: idempotency keys
//! claimed, recipients found and locked, outbox quotas applied, then messages and metas written
//! as arrays through `unnest`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use tokio_postgres::Transaction;

use super::prepared::Prepared;
use super::schema::ID_BLOCK;
use super::writer::{Effects, PgWriter};
use super::{i, u, Pg};
use crate::model::{now_ms, ClientId, Payload, Target as To};
use crate::store::records::fingerprint;
use crate::store::{PublishOutcome, PublishRequest, StoreError};

impl PgWriter {
    /// The next message id, from this broker's block (a new block when it ran out).
    async fn next_id(&mut self, tx: &Transaction<'_>) -> Result<u64, Pg> {
        if self.ids.is_empty() {
            let start: i64 = tx
                .query_one("SELECT nextval('outboxd_message_id')", &[])
                .await?
                .try_get(0)?;
            let start = u(start);
            self.ids = start..start.saturating_add(ID_BLOCK);
        }
        let id = self.ids.start;
        self.ids.start += 1;
        Ok(id)
    }

    /// Writes a run of publishes: dedup, recipients, quotas, messages, metas.
    pub(super) async fn publish(
        &mut self,
        tx: &Transaction<'_>,
        prepared: &Prepared,
        reqs: Vec<PublishRequest>,
        fx: &mut Effects,
    ) -> Result<Vec<Result<PublishOutcome, StoreError>>, Pg> {
        let now = now_ms();
        let window = self.opts.dedup_window_ms;
        // Idempotency keys: each claimed in the table (a fresh entry there makes it a
        // duplicate); the same key twice in the run answers like its first.
        let dkeys: Vec<Option<Vec<u8>>> = reqs
            .iter()
            .map(|r| {
                r.key.as_ref().map(|k| {
                    let mut b = r
                        .from
                        .as_ref()
                        .map(|c| c.as_str())
                        .unwrap_or("")
                        .as_bytes()
                        .to_vec();
                    b.push(0);
                    b.extend_from_slice(k.as_bytes());
                    b
                })
            })
            .collect();
        // What each key is claimed with: the fingerprint of the first publish naming it.
        let fps: Vec<i64> = reqs
            .iter()
            .map(|r| match r.key {
                Some(_) => i64::from(fingerprint(&r.to, &r.payload)),
                None => 0,
            })
            .collect();
        let mut unique: BTreeMap<&Vec<u8>, i64> = BTreeMap::new();
        for (k, fp) in dkeys.iter().zip(&fps) {
            if let Some(k) = k {
                unique.entry(k).or_insert(*fp);
            }
        }
        // A key stored before: the answer of its publish and that publish's fingerprint.
        let mut earlier: HashMap<Vec<u8>, (PublishOutcome, i64)> = HashMap::new();
        if !unique.is_empty() {
            let keys: Vec<&[u8]> = unique.keys().map(|k| k.as_slice()).collect();
            let key_fps: Vec<i64> = unique.values().copied().collect();
            let horizon = i(now.saturating_sub(window));
            let claimed: HashSet<Vec<u8>> = tx
                .query(
                    "INSERT INTO outboxd_dedup (dkey, id, ts, recipients, fp) \
                       SELECT k, 0, $2, 0, fp FROM unnest($1::bytea[], $4::bigint[]) AS v(k, fp) \
                     ON CONFLICT (dkey) DO UPDATE SET id = 0, ts = EXCLUDED.ts, recipients = 0, \
                       fp = EXCLUDED.fp \
                       WHERE outboxd_dedup.ts <= $3 \
                     RETURNING dkey",
                    &[&keys, &i(now), &horizon, &key_fps],
                )
                .await?
                .iter()
                .map(|r| r.try_get::<_, Vec<u8>>(0))
                .collect::<Result<_, _>>()?;
            let taken: Vec<&[u8]> = keys
                .iter()
                .copied()
                .filter(|k| !claimed.contains(*k))
                .collect();
            if !taken.is_empty() {
                for row in tx
                    .query(
                        "SELECT dkey, id, recipients, fp FROM outboxd_dedup WHERE dkey = ANY($1)",
                        &[&taken],
                    )
                    .await?
                {
                    earlier.insert(
                        row.try_get(0)?,
                        (
                            PublishOutcome {
                                id: format!("{:x}", u(row.try_get(1)?)),
                                recipients: u(row.try_get(2)?),
                                duplicate: true,
                                full: Vec::new(),
                            },
                            row.try_get(3)?,
                        ),
                    );
                }
            }
        }
        // Recipients: direct ones by name, topics' subscribers from the table.
        let names: Vec<ClientId> = reqs
            .iter()
            .filter_map(|r| match &r.to {
                To::Client(n) => Some(n.clone()),
                To::Topic(_) => None,
            })
            .collect();
        self.ensure_all(tx, &names).await?;
        let topics: BTreeSet<&str> = reqs
            .iter()
            .filter_map(|r| match &r.to {
                To::Topic(t) => Some(t.as_str()),
                To::Client(_) => None,
            })
            .collect();
        let mut subscribers: HashMap<String, Vec<u64>> = HashMap::new();
        if !topics.is_empty() {
            let topics: Vec<&str> = topics.into_iter().collect();
            for row in tx
                .query(
                    "SELECT topic, cid FROM outboxd_subs WHERE topic = ANY($1) ORDER BY cid",
                    &[&topics],
                )
                .await?
            {
                subscribers
                    .entry(row.try_get(0)?)
                    .or_default()
                    .push(u(row.try_get(1)?));
            }
        }
        let recipients_of = |r: &PublishRequest, cids: &HashMap<ClientId, u64>| -> Vec<u64> {
            match &r.to {
                To::Client(n) => cids.get(n).copied().into_iter().collect(),
                To::Topic(t) => subscribers.get(t.as_str()).cloned().unwrap_or_default(),
            }
        };
        // Lock every recipient's meta row, in client-number order.
        let all: BTreeSet<u64> = reqs
            .iter()
            .flat_map(|r| recipients_of(r, &self.cids))
            .collect();
        let all: Vec<i64> = all.into_iter().map(i).collect();
        struct Meta {
            name: String,
            next_seq: u64,
            pending: u64,
            bytes: u64,
            node: Option<String>,
            changed: bool,
        }
        let mut metas: BTreeMap<u64, Meta> = BTreeMap::new();
        let lock = |cids: Vec<i64>| async move { tx.query(&prepared.lock_metas, &[&cids]).await };
        let mut locked = if all.is_empty() {
            Vec::new()
        } else {
            lock(all).await?
        };
        // A direct recipient whose row is gone was deleted through another broker since its
        // number was learnt: its outbox is made anew, as for any new name.
        let found: BTreeSet<u64> = locked
            .iter()
            .map(|r| r.try_get::<_, i64>(0).map(u))
            .collect::<Result<_, _>>()?;
        let gone: Vec<ClientId> = names
            .iter()
            .filter(|n| self.cids.get(*n).is_none_or(|c| !found.contains(c)))
            .cloned()
            .collect();
        if !gone.is_empty() {
            for n in &gone {
                self.cids.remove(n);
            }
            self.ensure_all(tx, &gone).await?;
            let again: Vec<i64> = gone
                .iter()
                .filter_map(|n| self.cids.get(n).map(|c| i(*c)))
                .collect();
            locked.extend(lock(again).await?);
        }
        for row in locked {
            metas.insert(
                u(row.try_get(0)?),
                Meta {
                    name: row.try_get(1)?,
                    next_seq: u(row.try_get(2)?),
                    pending: u(row.try_get(3)?),
                    bytes: u(row.try_get(4)?),
                    node: row.try_get(5)?,
                    changed: false,
                },
            );
        }
        let (max_msgs, max_bytes) = (self.opts.max_outbox_messages, self.opts.max_outbox_bytes);
        let mut rows = MessageRows::default();
        let mut outcomes = Vec::with_capacity(reqs.len());
        let mut dedup_rows: Vec<(Vec<u8>, i64, i64)> = Vec::new();
        let mut unclaim: Vec<Vec<u8>> = Vec::new();
        for ((req, dkey), fp) in reqs.into_iter().zip(dkeys).zip(fps) {
            if let Some((o, first_fp)) = dkey.as_ref().and_then(|k| earlier.get(k)) {
                if *first_fp != 0 && *first_fp != fp {
                    outcomes.push(Err(StoreError::KeyReused {
                        key: req.key.unwrap_or_default(),
                    }));
                } else {
                    fx.duplicates += 1;
                    outcomes.push(Ok(o.clone()));
                }
                continue;
            }
            let recipients = recipients_of(&req, &self.cids);
            let id = self.next_id(tx).await?;
            let ttl = req
                .ttl_ms
                .filter(|t| *t > 0)
                .or((self.opts.message_ttl_ms > 0).then_some(self.opts.message_ttl_ms));
            let expires_at = ttl.map(|t| now.saturating_add(t)).unwrap_or(0);
            let topic = match &req.to {
                To::Topic(t) => Some(t.as_str().to_owned()),
                To::Client(_) => None,
            };
            let (is_json, body) = match req.payload {
                Payload::Json(s) => (true, s.into_bytes()),
                Payload::Binary(b) => (false, b),
            };
            let size = body.len() as u64;
            let mut written = 0u64;
            let mut full = Vec::new();
            for cid in recipients {
                let Some(m) = metas.get_mut(&cid) else {
                    continue;
                };
                let over = (max_msgs > 0 && m.pending >= max_msgs)
                    || (max_bytes > 0 && m.bytes.saturating_add(size) > max_bytes);
                if over {
                    if let Ok(n) = ClientId::new(&m.name) {
                        full.push(n);
                    }
                    continue;
                }
                let seq = m.next_seq;
                m.next_seq += 1;
                m.pending += 1;
                m.bytes += size;
                m.changed = true;
                rows.push(
                    cid,
                    seq,
                    id,
                    now,
                    req.from.as_ref(),
                    topic.as_deref(),
                    is_json,
                    &body,
                    expires_at,
                );
                written += 1;
            }
            fx.stored += written;
            // A direct publish refused (outbox_full) is counted where the refusal is answered.
            if topic.is_some() || full.is_empty() {
                fx.published += 1;
            }
            let outcome = PublishOutcome {
                id: format!("{id:x}"),
                recipients: written,
                duplicate: false,
                full,
            };
            if let Some(k) = dkey {
                if written > 0 || topic.is_some() {
                    dedup_rows.push((k.clone(), i(id), i(written)));
                } else {
                    unclaim.push(k.clone());
                }
                let mut again = outcome.clone();
                again.duplicate = true;
                again.full = Vec::new();
                earlier.insert(k, (again, fp));
            }
            outcomes.push(Ok(outcome));
        }
        if !rows.cid.is_empty() {
            let changed: Vec<(&u64, &Meta)> = metas.iter().filter(|(_, m)| m.changed).collect();
            let cids: Vec<i64> = changed.iter().map(|(c, _)| i(**c)).collect();
            let next: Vec<i64> = changed.iter().map(|(_, m)| i(m.next_seq)).collect();
            let pending: Vec<i64> = changed.iter().map(|(_, m)| i(m.pending)).collect();
            let bytes: Vec<i64> = changed.iter().map(|(_, m)| i(m.bytes)).collect();
            // Both at once: the connection pipelines them, one round trip instead of two.
            let message_params: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
                &rows.cid,
                &rows.seq,
                &rows.id,
                &rows.ts,
                &rows.sender,
                &rows.topic,
                &rows.is_json,
                &rows.body,
                &rows.expires,
            ];
            let meta_params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
                [&cids, &next, &pending, &bytes];
            let insert = tx.execute(&prepared.insert_messages, &message_params);
            let update = tx.execute(&prepared.update_metas, &meta_params);
            futures_util::future::try_join(insert, update).await?;
            for (cid, m) in changed {
                fx.advanced.insert(*cid, m.next_seq);
                if let Some(node) = m.node.as_ref().filter(|n| **n != *self.target.node) {
                    fx.wake
                        .entry(node.clone())
                        .or_default()
                        .insert(*cid, m.next_seq);
                }
            }
        }
        if !dedup_rows.is_empty() {
            let keys: Vec<&[u8]> = dedup_rows.iter().map(|(k, _, _)| k.as_slice()).collect();
            let ids: Vec<i64> = dedup_rows.iter().map(|(_, id, _)| *id).collect();
            let counts: Vec<i64> = dedup_rows.iter().map(|(_, _, n)| *n).collect();
            tx.execute(
                "UPDATE outboxd_dedup d SET id = v.id, recipients = v.n \
                 FROM unnest($1::bytea[], $2::bigint[], $3::bigint[]) AS v(k, id, n) \
                 WHERE d.dkey = v.k",
                &[&keys, &ids, &counts],
            )
            .await?;
        }
        if !unclaim.is_empty() {
            let keys: Vec<&[u8]> = unclaim.iter().map(|k| k.as_slice()).collect();
            tx.execute("DELETE FROM outboxd_dedup WHERE dkey = ANY($1)", &[&keys])
                .await?;
        }
        Ok(outcomes)
    }
}

/// The rows of a run's messages, as arrays for one `unnest` insert.
#[derive(Default)]
struct MessageRows {
    cid: Vec<i64>,
    seq: Vec<i64>,
    id: Vec<i64>,
    ts: Vec<i64>,
    sender: Vec<Option<String>>,
    topic: Vec<Option<String>>,
    is_json: Vec<bool>,
    body: Vec<Vec<u8>>,
    expires: Vec<i64>,
}

impl MessageRows {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        cid: u64,
        seq: u64,
        id: u64,
        ts: u64,
        from: Option<&ClientId>,
        topic: Option<&str>,
        is_json: bool,
        body: &[u8],
        expires: u64,
    ) {
        self.cid.push(i(cid));
        self.seq.push(i(seq));
        self.id.push(i(id));
        self.ts.push(i(ts));
        self.sender.push(from.map(|c| c.as_str().to_owned()));
        self.topic.push(topic.map(str::to_owned));
        self.is_json.push(is_json);
        self.body.push(body.to_vec());
        self.expires.push(i(expires));
    }
}
