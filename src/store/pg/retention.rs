//! Retention on PostgreSQL: messages past their TTL are removed unacked (a tombstone tells the
//! client, in `missed`), and idempotency keys older than the dedup window are forgotten. The
//! writer runs a pass between groups, on its own connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::{info, warn};

use super::writer::PgWriter;
use super::{i, u, Pg};
use crate::model::now_ms;

/// Idempotency keys are forgotten every this many retention passes.
const DEDUP_SWEEP_EVERY: u32 = 10;
/// The most messages (or idempotency keys) one retention pass removes.
const SWEEP_BATCH: i64 = 10_000;

impl PgWriter {
    /// Retention: messages past their TTL are removed unacked (a tombstone tells the client,
    /// in `missed`), and idempotency keys older than the dedup window are forgotten.
    pub(super) async fn sweep(&mut self) {
        if self.latched.load(Ordering::Acquire) {
            return;
        }
        let now = i(now_ms());
        let horizon = i(now_ms().saturating_sub(self.opts.dedup_window_ms));
        let metrics = Arc::clone(&self.opts.metrics);
        self.sweeps = self.sweeps.wrapping_add(1);
        let dedup_pass = self.sweeps.is_multiple_of(DEDUP_SWEEP_EVERY);
        let Ok(client) = self.connection().await else {
            return;
        };
        let result: Result<u64, Pg> = async {
            let due = client
                .query(
                    "SELECT cid, seq FROM outboxd_messages WHERE expires_at > 0 \
                     AND expires_at <= $1 ORDER BY expires_at LIMIT $2",
                    &[&now, &SWEEP_BATCH],
                )
                .await?;
            let mut expired = 0u64;
            if !due.is_empty() {
                let mut cids = Vec::with_capacity(due.len());
                let mut seqs = Vec::with_capacity(due.len());
                for r in &due {
                    cids.push(r.try_get::<_, i64>(0)?);
                    seqs.push(r.try_get::<_, i64>(1)?);
                }
                let mut lock: Vec<i64> = cids.clone();
                lock.sort_unstable();
                lock.dedup();
                let tx = client.transaction().await?;
                tx.execute(
                    "SELECT 1 FROM outboxd_clients WHERE cid = ANY($1) ORDER BY cid FOR UPDATE",
                    &[&lock],
                )
                .await?;
                let rows = tx
                    .query(
                        "WITH d AS (DELETE FROM outboxd_messages m \
                           USING unnest($1::bigint[], $2::bigint[]) AS v(cid, seq) \
                           WHERE m.cid = v.cid AND m.seq = v.seq AND m.expires_at > 0 \
                             AND m.expires_at <= $3 \
                           RETURNING m.cid, m.seq, octet_length(m.body) AS len), \
                         t AS (INSERT INTO outboxd_missed SELECT cid, seq FROM d \
                           ON CONFLICT DO NOTHING), \
                         s AS (SELECT cid, count(*) AS n, sum(len) AS b FROM d GROUP BY cid) \
                         UPDATE outboxd_clients c SET pending = c.pending - s.n, \
                           bytes = c.bytes - s.b::bigint FROM s WHERE c.cid = s.cid \
                         RETURNING c.cid, s.n",
                        &[&cids, &seqs, &now],
                    )
                    .await?;
                tx.commit().await?;
                for r in &rows {
                    let (cid, n): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
                    info!(
                        cid,
                        messages = n,
                        "messages expired unacked (TTL); the client will see them in `missed`"
                    );
                    expired += u(n);
                }
            }
            if dedup_pass {
                client
                    .execute(
                        "DELETE FROM outboxd_dedup WHERE dkey IN \
                           (SELECT dkey FROM outboxd_dedup WHERE ts <= $1 LIMIT $2)",
                        &[&horizon, &SWEEP_BATCH],
                    )
                    .await?;
            }
            Ok(expired)
        }
        .await;
        match result {
            Ok(n) => metrics.expired.add(n),
            Err(e) => {
                warn!(error = %e, "retention pass failed; it runs again shortly");
                self.broke(&e);
            }
        }
    }
}
