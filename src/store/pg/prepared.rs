//! The writer's hot statements (the meta-row lock, the message and meta writes of a run of
//! publishes, one ack), prepared once per connection: the writer prepares them again on every
//! new connection, so they live apart from the commands that run them.

use tokio_postgres::{Client, Statement};

use super::Pg;

/// The writer's hot statements, prepared once per connection (a statement given as text is
/// parsed again, one more round trip, every time it runs).
pub(super) struct Prepared {
    pub(super) lock_metas: Statement,
    pub(super) insert_messages: Statement,
    pub(super) update_metas: Statement,
    pub(super) ack: Statement,
}

impl Prepared {
    pub(super) async fn on(client: &Client) -> Result<Prepared, Pg> {
        Ok(Prepared {
            lock_metas: client
                .prepare(
                    "SELECT cid, name, next_seq, pending, bytes, node FROM outboxd_clients \
                     WHERE cid = ANY($1) ORDER BY cid FOR UPDATE",
                )
                .await?,
            insert_messages: client
                .prepare(
                    "INSERT INTO outboxd_messages \
                       (cid, seq, id, ts, sender, topic, is_json, body, expires_at) \
                     SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], \
                       $4::bigint[], $5::text[], $6::text[], $7::boolean[], $8::bytea[], \
                       $9::bigint[])",
                )
                .await?,
            update_metas: client
                .prepare(
                    "UPDATE outboxd_clients c SET next_seq = v.n, pending = v.p, bytes = v.b \
                     FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[]) \
                       AS v(cid, n, p, b) WHERE c.cid = v.cid",
                )
                .await?,
            ack: client.prepare(ACK).await?,
        })
    }
}

/// One ack: deletes what it covers, drops tombstones up to `$4` (-1: none), and moves the
/// watermark to just below the first message still stored above `$5` and below `$6` (the
/// durable frontier), all from one snapshot (hence `NOT IN d`).
const ACK: &str =
    "WITH d AS (DELETE FROM outboxd_messages WHERE cid = $1 AND seq BETWEEN $2 AND $3 \
       RETURNING seq, ts, octet_length(body) AS len), \
     t AS (DELETE FROM outboxd_missed WHERE cid = $1 AND seq <= $4) \
     UPDATE outboxd_clients SET \
       pending = pending - (SELECT count(*) FROM d), \
       bytes = bytes - (SELECT coalesce(sum(len), 0) FROM d)::bigint, \
       acked = greatest(acked, coalesce((SELECT min(seq) FROM outboxd_messages \
         WHERE cid = $1 AND seq > $5 AND seq < $6 \
           AND seq NOT IN (SELECT seq FROM d)) - 1, $6 - 1)) \
     WHERE cid = $1 \
     RETURNING acked, coalesce((SELECT array_agg(ts) FROM d), '{}')";
