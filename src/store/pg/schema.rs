//! The PostgreSQL schema: its tables, and the migrations that make an empty or older database
//! the current one. Each migration runs in its own transaction under an advisory lock, so
//! brokers starting together apply it once; a database newer than this broker is refused.
//!
//! - `outboxd_clients`: one row per outbox (the meta sled keeps under `M`), with the connection
//!   generation and the broker that holds the client's connection;
//! - `outboxd_messages`: stored messages by (client number, seq);
//! - `outboxd_missed`: tombstones of messages removed unacked (TTL, purge), for `missed`;
//! - `outboxd_subs`: durable subscriptions; `outboxd_dedup`: idempotency keys in their window;
//! - `outboxd_message_id`: message ids, handed out in blocks;
//! - `outboxd_store`: the PostgreSQL cluster the outboxes were written in.
//!
//! The epochs: each outbox has one, as on sled. A database copied into another cluster (a
//! `pg_dump` restored) may have lost what was written after the copy, so at start a broker
//! that finds itself in another cluster than the one recorded gives every outbox a new epoch,
//! and each client learns at its next connect that its position no longer holds. A loss the
//! broker cannot see (a point-in-time recovery, a failover to a standby that was not
//! synchronous) takes `outboxd repair --accept-loss`, which does the same.

use tokio_postgres::Client;
use tracing::info;

use super::failed;
use crate::store::StoreError;

/// The schema version this broker writes (shown where sled shows its record format).
pub(crate) const SCHEMA_VERSION: u8 = 3;

/// How many message ids one `nextval` hands a broker.
pub(super) const ID_BLOCK: u64 = 4096;

/// Migration N makes version N from version N-1.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE outboxd_clients (
        cid bigserial PRIMARY KEY,
        name text NOT NULL UNIQUE,
        epoch text NOT NULL,
        next_seq bigint NOT NULL DEFAULT 1,
        acked bigint NOT NULL DEFAULT 0,
        pending bigint NOT NULL DEFAULT 0,
        bytes bigint NOT NULL DEFAULT 0,
        last_seen bigint NOT NULL DEFAULT 0,
        conn_gen bigint NOT NULL DEFAULT 0,
        node text
     );
     CREATE TABLE outboxd_messages (
        cid bigint NOT NULL,
        seq bigint NOT NULL,
        id bigint NOT NULL,
        ts bigint NOT NULL,
        sender text,
        topic text,
        is_json boolean NOT NULL,
        body bytea NOT NULL,
        expires_at bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (cid, seq)
     ) WITH (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_cost_delay = 0);
     CREATE INDEX outboxd_messages_expiry ON outboxd_messages (expires_at)
        WHERE expires_at > 0;
     CREATE TABLE outboxd_missed (
        cid bigint NOT NULL,
        seq bigint NOT NULL,
        PRIMARY KEY (cid, seq)
     );
     CREATE TABLE outboxd_subs (
        topic text NOT NULL,
        cid bigint NOT NULL,
        PRIMARY KEY (topic, cid)
     );
     CREATE INDEX outboxd_subs_cid ON outboxd_subs (cid);
     CREATE TABLE outboxd_dedup (
        dkey bytea PRIMARY KEY,
        id bigint NOT NULL,
        ts bigint NOT NULL,
        recipients bigint NOT NULL
     );
     CREATE INDEX outboxd_dedup_ts ON outboxd_dedup (ts);
     CREATE SEQUENCE outboxd_message_id INCREMENT BY 4096 MINVALUE 1;",
    // 2: which PostgreSQL cluster the outboxes were written in (see `check_cluster`).
    "CREATE TABLE outboxd_store (system_identifier bigint NOT NULL);
     INSERT INTO outboxd_store SELECT system_identifier FROM pg_control_system();",
    // 3: what each idempotency key remembers of its publish (`store::records::fingerprint`),
    // so the key named for another message is refused; 0 for the keys stored before.
    "ALTER TABLE outboxd_dedup ADD COLUMN fp bigint NOT NULL DEFAULT 0;",
];

/// Brings the database to [`SCHEMA_VERSION`].
///
/// Errors: the database was made by a newer outboxd (its version is named); a statement fails.
pub(super) async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS outboxd_schema (
                version integer PRIMARY KEY,
                applied_ms bigint NOT NULL
             )",
        )
        .await
        .or_else(|e| {
            // Two brokers creating it at once: the loser sees a unique violation.
            if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
                Ok(())
            } else {
                Err(failed(e))
            }
        })?;
    for (n, sql) in MIGRATIONS.iter().enumerate() {
        let version = i32::try_from(n + 1).unwrap_or(i32::MAX);
        let tx = client.transaction().await.map_err(failed)?;
        // One broker at a time; the others wait and then find the version applied.
        tx.execute("SELECT pg_advisory_xact_lock(7297110853)", &[])
            .await
            .map_err(failed)?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM outboxd_schema WHERE version = $1",
                &[&version],
            )
            .await
            .map_err(failed)?
            .is_some();
        if !done {
            tx.batch_execute(sql).await.map_err(failed)?;
            tx.execute(
                "INSERT INTO outboxd_schema VALUES ($1, \
                   (extract(epoch from clock_timestamp()) * 1000)::bigint)",
                &[&version],
            )
            .await
            .map_err(failed)?;
            info!(version, "database schema migrated");
        }
        tx.commit().await.map_err(failed)?;
    }
    let newest: Option<i32> = client
        .query_one("SELECT max(version) FROM outboxd_schema", &[])
        .await
        .map_err(failed)?
        .try_get(0)
        .map_err(failed)?;
    if let Some(v) = newest.filter(|v| *v > i32::from(SCHEMA_VERSION)) {
        return Err(StoreError::Database(format!(
            "the database's outboxd schema is version {v}, newer than this broker's \
             ({SCHEMA_VERSION}): run a newer outboxd"
        )));
    }
    Ok(())
}

/// Every outbox to a new, random epoch.
const NEW_EPOCHS: &str = "UPDATE outboxd_clients SET \
    epoch = substr(md5(random()::text || clock_timestamp()::text || name), 1, 16)";

/// Gives every outbox a new epoch, in one transaction; returns how many.
pub(super) async fn new_epochs(client: &mut Client) -> Result<u64, StoreError> {
    let tx = client.transaction().await.map_err(failed)?;
    let n = tx.execute(NEW_EPOCHS, &[]).await.map_err(failed)?;
    tx.commit().await.map_err(failed)?;
    Ok(n)
}

/// Moves every outbox to a new epoch when the database is no longer in the PostgreSQL cluster
/// it was written in (its `system_identifier` changed: a logical copy restored elsewhere).
pub(super) async fn check_cluster(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(failed)?;
    tx.execute("SELECT pg_advisory_xact_lock(7297110853)", &[])
        .await
        .map_err(failed)?;
    let row = tx
        .query_one(
            "SELECT s.system_identifier, c.system_identifier \
             FROM outboxd_store s, pg_control_system() c",
            &[],
        )
        .await
        .map_err(failed)?;
    let (written, now): (i64, i64) = (
        row.try_get(0).map_err(failed)?,
        row.try_get(1).map_err(failed)?,
    );
    if written != now {
        let n = tx.execute(NEW_EPOCHS, &[]).await.map_err(failed)?;
        tx.execute("UPDATE outboxd_store SET system_identifier = $1", &[&now])
            .await
            .map_err(failed)?;
        tracing::warn!(
            outboxes = n,
            "this database was written in another PostgreSQL cluster (restored from a copy?): \
             what was confirmed after the copy may be gone, so every outbox moves to a new \
             epoch and each client is told at its next connect"
        );
    }
    tx.commit().await.map_err(failed)?;
    Ok(())
}
