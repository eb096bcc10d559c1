//! Emptying and removing outboxes: purge (every message removed, tombstones left, a new epoch),
//! delete (the outbox and everything under it) and forget (a delete only while nothing is
//! stored for the client and its newest connection is the one asking).

use tokio_postgres::Transaction;
use tracing::info;

use super::pending::{Deleted, Purged};
use super::writer::PgWriter;
use super::{i, u, Pg};
use crate::model::ClientId;
use crate::store::PurgeOutcome;

impl PgWriter {
    /// Deletes the outbox of `name` when nothing is stored for it (no message, no subscription,
    /// no tombstone) and its newest connection is the one of `generation`.
    pub(super) async fn forget_if_idle(
        &mut self,
        tx: &Transaction<'_>,
        name: &ClientId,
        generation: u64,
    ) -> Result<Option<Deleted>, Pg> {
        let idle = tx
            .query_opt(
                "SELECT 1 FROM outboxd_clients c WHERE c.name = $1 AND c.pending = 0 \
                   AND c.conn_gen = $2 \
                   AND NOT EXISTS (SELECT 1 FROM outboxd_subs s WHERE s.cid = c.cid) \
                   AND NOT EXISTS (SELECT 1 FROM outboxd_missed m WHERE m.cid = c.cid) \
                 FOR UPDATE",
                &[&name.as_str(), &i(generation)],
            )
            .await?;
        if idle.is_none() {
            return Ok(None);
        }
        self.delete(tx, name).await
    }

    /// Deletes the outbox of `name` and everything under it; returns the messages removed
    /// unacked, None when it has no outbox.
    pub(super) async fn delete(
        &mut self,
        tx: &Transaction<'_>,
        name: &ClientId,
    ) -> Result<Option<Deleted>, Pg> {
        let Some(row) = tx
            .query_opt(
                "SELECT cid, node, conn_gen FROM outboxd_clients WHERE name = $1 FOR UPDATE",
                &[&name.as_str()],
            )
            .await?
        else {
            return Ok(None);
        };
        let cid: i64 = row.try_get(0)?;
        let node: Option<String> = row.try_get(1)?;
        let generation = u(row.try_get(2)?).saturating_add(1);
        let removed = tx
            .execute("DELETE FROM outboxd_messages WHERE cid = $1", &[&cid])
            .await?;
        tx.execute("DELETE FROM outboxd_missed WHERE cid = $1", &[&cid])
            .await?;
        tx.execute("DELETE FROM outboxd_subs WHERE cid = $1", &[&cid])
            .await?;
        tx.execute("DELETE FROM outboxd_clients WHERE cid = $1", &[&cid])
            .await?;
        self.cids.remove(name);
        info!(client = %name, cid, removed, "outbox deleted");
        Ok(Some(Deleted {
            cid: u(cid),
            name: name.clone(),
            removed,
            holder: node,
            generation,
        }))
    }

    /// Removes every stored message of `name` (leaving tombstones) and gives its outbox a new
    /// epoch; None when it has no outbox.
    pub(super) async fn purge(
        &mut self,
        tx: &Transaction<'_>,
        name: &ClientId,
    ) -> Result<Option<Purged>, Pg> {
        let Some(row) = tx
            .query_opt(
                "SELECT cid FROM outboxd_clients WHERE name = $1 FOR UPDATE",
                &[&name.as_str()],
            )
            .await?
        else {
            return Ok(None);
        };
        let cid: i64 = row.try_get(0)?;
        let removed: i64 = tx
            .query_one(
                "WITH d AS (DELETE FROM outboxd_messages WHERE cid = $1 RETURNING seq), \
                   t AS (INSERT INTO outboxd_missed SELECT $1, seq FROM d ON CONFLICT DO NOTHING) \
                 SELECT count(*) FROM d",
                &[&cid],
            )
            .await?
            .try_get(0)?;
        let epoch = tx
            .query_one(
                "UPDATE outboxd_clients SET pending = 0, bytes = 0, acked = next_seq - 1, \
                   conn_gen = conn_gen + 1, \
                   epoch = substr(md5(random()::text || clock_timestamp()::text || name), 1, 16) \
                 WHERE cid = $1 RETURNING epoch, node, conn_gen",
                &[&cid],
            )
            .await?;
        let node: Option<String> = epoch.try_get(1)?;
        let generation = u(epoch.try_get(2)?);
        let epoch: String = epoch.try_get(0)?;
        Ok(Some(Purged {
            cid: u(cid),
            outcome: PurgeOutcome {
                removed: u(removed),
                epoch,
            },
            // The purge also fences the connection: its reads and acks are refused from now.
            holder: node,
            generation,
        }))
    }
}
