//! Client numbers and row locks: the writer learns each outbox's number once (making the outbox
//! of a new name), and a group locks every meta row it will touch at once, in client-number
//! order, so writers of several brokers wait for one another but never deadlock.

use std::collections::BTreeSet;

use tokio_postgres::Transaction;
use tracing::info;

use super::prepared::Prepared;
use super::writer::{PgWriter, Touches};
use super::{i, u, Pg};
use crate::model::ClientId;

impl PgWriter {
    /// The client number of `name`, its outbox made when new.
    async fn ensure(&mut self, tx: &Transaction<'_>, name: &ClientId) -> Result<u64, Pg> {
        if let Some(c) = self.cids.get(name) {
            return Ok(*c);
        }
        let made = tx
            .query_opt(
                "INSERT INTO outboxd_clients (name, epoch) \
                   VALUES ($1, substr(md5(random()::text || clock_timestamp()::text || $1), 1, 16)) \
                 ON CONFLICT (name) DO NOTHING RETURNING cid, epoch",
                &[&name.as_str()],
            )
            .await?;
        let cid = match made {
            Some(row) => {
                let cid = u(row.try_get(0)?);
                let epoch: String = row.try_get(1)?;
                info!(client = %name, cid, epoch = %epoch, "outbox created");
                cid
            }
            None => u(tx
                .query_one(
                    "SELECT cid FROM outboxd_clients WHERE name = $1",
                    &[&name.as_str()],
                )
                .await?
                .try_get(0)?),
        };
        self.cids.insert(name.clone(), cid);
        Ok(cid)
    }

    /// Locks the meta rows of every outbox `touches` names, in client-number order, making the
    /// outboxes of new names the group's hellos, subscribes and direct publishes need.
    pub(super) async fn lock_all(
        &mut self,
        tx: &Transaction<'_>,
        prepared: &Prepared,
        touches: Touches,
    ) -> Result<(), Pg> {
        let Touches {
            make,
            find,
            topics,
            mut cids,
        } = touches;
        // Numbers learnt before may name rows deleted since: the lock below finds out, and the
        // commands make them anew (`lock_client`, `publish`).
        self.ensure_all(tx, &make).await?;
        for n in &make {
            if let Some(c) = self.cids.get(n) {
                cids.insert(*c);
            }
        }
        if !find.is_empty() {
            let names: Vec<&str> = find.iter().map(|n| n.as_str()).collect();
            for row in tx
                .query(
                    "SELECT cid FROM outboxd_clients WHERE name = ANY($1)",
                    &[&names],
                )
                .await?
            {
                cids.insert(u(row.try_get(0)?));
            }
        }
        if !topics.is_empty() {
            let topics: Vec<&str> = topics.iter().map(|t| t.as_str()).collect();
            for row in tx
                .query(
                    "SELECT cid FROM outboxd_subs WHERE topic = ANY($1)",
                    &[&topics],
                )
                .await?
            {
                cids.insert(u(row.try_get(0)?));
            }
        }
        if !cids.is_empty() {
            let all: Vec<i64> = cids.into_iter().map(i).collect();
            tx.query(&prepared.lock_metas, &[&all]).await?;
        }
        Ok(())
    }

    /// The client number of `name` with its row locked, its outbox made when new, also when a
    /// number learnt before names a row that is gone (deleted through another broker).
    pub(super) async fn lock_client(
        &mut self,
        tx: &Transaction<'_>,
        name: &ClientId,
    ) -> Result<u64, Pg> {
        for _ in 0..2 {
            let cid = self.ensure(tx, name).await?;
            let held = tx
                .query_opt(
                    "SELECT 1 FROM outboxd_clients WHERE cid = $1 FOR UPDATE",
                    &[&i(cid)],
                )
                .await?;
            if held.is_some() {
                return Ok(cid);
            }
            self.cids.remove(name);
        }
        // Made in this very transaction: it is there.
        self.ensure(tx, name).await
    }

    /// Client numbers of `names`, outboxes made for the new ones.
    pub(super) async fn ensure_all(
        &mut self,
        tx: &Transaction<'_>,
        names: &[ClientId],
    ) -> Result<(), Pg> {
        let missing: BTreeSet<&str> = names
            .iter()
            .filter(|n| !self.cids.contains_key(*n))
            .map(|n| n.as_str())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let missing: Vec<&str> = missing.into_iter().collect();
        let made = tx
            .query(
                "INSERT INTO outboxd_clients (name, epoch) \
                   SELECT n, substr(md5(random()::text || clock_timestamp()::text || n), 1, 16) \
                   FROM unnest($1::text[]) AS n \
                 ON CONFLICT (name) DO NOTHING RETURNING name, cid, epoch",
                &[&missing],
            )
            .await?;
        for row in &made {
            let name: String = row.try_get(0)?;
            let epoch: String = row.try_get(2)?;
            info!(client = %name, cid = u(row.try_get(1)?), epoch = %epoch, "outbox created");
        }
        let rows = tx
            .query(
                "SELECT name, cid FROM outboxd_clients WHERE name = ANY($1)",
                &[&missing],
            )
            .await?;
        for row in &rows {
            let name: String = row.try_get(0)?;
            if let Ok(n) = ClientId::new(&name) {
                self.cids.insert(n, u(row.try_get(1)?));
            }
        }
        Ok(())
    }
}
