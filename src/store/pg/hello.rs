//! A connection's own commands on its outbox: hello takes the outbox over (a new connection
//! generation; the broker that held it is told to let go) and applies the resume position;
//! subscribe adds or removes a durable subscription.

use tokio_postgres::Transaction;

use super::acks::ack_one;
use super::pending::HelloDone;
use super::prepared::Prepared;
use super::writer::PgWriter;
use super::{i, u, Pg};
use crate::model::{now_ms, Ack, ClientId, Resume, Topic};
use crate::store::{ResumeRefused, StoreError};

impl PgWriter {
    /// Takes the outbox over for a new connection and applies its resume position.
    pub(super) async fn hello(
        &mut self,
        tx: &Transaction<'_>,
        prepared: &Prepared,
        name: &ClientId,
        resume: Option<Resume>,
        latched: bool,
    ) -> Result<HelloDone, Pg> {
        let cid = self.lock_client(tx, name).await?;
        let row = tx
            .query_one(
                "SELECT epoch, next_seq, acked, node, conn_gen FROM outboxd_clients \
                 WHERE cid = $1 FOR UPDATE",
                &[&i(cid)],
            )
            .await?;
        let epoch: String = row.try_get(0)?;
        let next_seq = u(row.try_get(1)?);
        let acked = u(row.try_get(2)?);
        let node: Option<String> = row.try_get(3)?;
        let mut generation = u(row.try_get(4)?);
        // Everything below next_seq is committed, so it may have been sent.
        let (resumed, reason, last_seq) = match resume {
            Some(r) if r.epoch != epoch => (false, Some(ResumeRefused::EpochMismatch), acked),
            Some(r) if r.last_seq >= next_seq => (false, Some(ResumeRefused::Ahead), acked),
            Some(r) => {
                if !latched {
                    if r.last_seq > acked {
                        ack_one(
                            tx,
                            prepared,
                            cid,
                            Ack::Upto(r.last_seq),
                            acked,
                            next_seq,
                            &self.opts,
                        )
                        .await?;
                    } else {
                        tx.execute(
                            "DELETE FROM outboxd_missed WHERE cid = $1 AND seq <= $2",
                            &[&i(cid), &i(r.last_seq)],
                        )
                        .await?;
                    }
                }
                (true, None, r.last_seq)
            }
            None => (false, None, acked),
        };
        let after = if resumed { last_seq } else { 0 };
        let missed: i64 = tx
            .query_one(
                "SELECT count(*) FROM outboxd_missed WHERE cid = $1 AND seq > $2",
                &[&i(cid), &i(after)],
            )
            .await?
            .try_get(0)?;
        let pending = if latched {
            u(tx.query_one(
                "SELECT pending FROM outboxd_clients WHERE cid = $1",
                &[&i(cid)],
            )
            .await?
            .try_get(0)?)
        } else {
            let row = tx
                .query_one(
                    "UPDATE outboxd_clients SET last_seen = $2, conn_gen = conn_gen + 1, \
                       node = $3 WHERE cid = $1 RETURNING conn_gen, pending",
                    &[&i(cid), &i(now_ms()), &&*self.target.node],
                )
                .await?;
            generation = u(row.try_get(0)?);
            u(row.try_get(1)?)
        };
        Ok(HelloDone {
            cid,
            name: name.clone(),
            epoch,
            resumed,
            reason,
            last_seq,
            next_seq,
            pending,
            missed: u(missed),
            generation,
            ever_connected: node.is_some(),
            previous: node.filter(|n| **n != *self.target.node),
        })
    }

    /// Adds or removes a durable subscription (limited by `limits.max_subscriptions`).
    pub(super) async fn subscribe(
        &mut self,
        tx: &Transaction<'_>,
        name: &ClientId,
        topic: &Topic,
        on: bool,
    ) -> Result<Result<(), StoreError>, Pg> {
        let cid = i(self.lock_client(tx, name).await?);
        if !on {
            tx.execute(
                "DELETE FROM outboxd_subs WHERE topic = $1 AND cid = $2",
                &[&topic.as_str(), &cid],
            )
            .await?;
            return Ok(Ok(()));
        }
        let limit = self.opts.max_subscriptions;
        if limit > 0 {
            let row = tx
                .query_one(
                    "SELECT count(*), count(*) FILTER (WHERE topic = $2) FROM outboxd_subs \
                     WHERE cid = $1",
                    &[&cid, &topic.as_str()],
                )
                .await?;
            let (held, already): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
            if already == 0 && u(held) >= u64::from(limit) {
                return Ok(Err(StoreError::TooManySubscriptions { limit }));
            }
        }
        tx.execute(
            "INSERT INTO outboxd_subs (topic, cid) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&topic.as_str(), &cid],
        )
        .await?;
        Ok(Ok(()))
    }
}
