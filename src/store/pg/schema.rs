//! The PostgreSQL schema: its tables, and the migrations that make an empty or older database
//! the current one. Each migration runs in its own transaction under an advisory lock, so
//! brokers starting together apply it once; a database newer than this broker is refused.
//!
//! - `outboxd_clients`: one row per outbox (the meta sled keeps under `M`), with the connection
//!   generation and the broker that holds the client's connection;
//! - `outboxd_messages`: stored messages by (client number, seq);
//! - `outboxd_missed`: tombstones of messages removed unacked (TTL, purge), for `missed`;
//! - `outboxd_subs`: durable subscriptions; `outboxd_dedup`: idempotency keys in their window;
//! - `outboxd_message_id`: message ids, handed out in blocks.

use tokio_postgres::Client;
use tracing::info;

use super::failed;
use crate::store::StoreError;

/// The schema version this broker writes (shown where sled shows its record format).
pub(crate) const SCHEMA_VERSION: u8 = 1;

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
