//! Consistent copies of a store: a new sled db holding every record of the two trees.
//!
//! The copy is logical (record by record), not a copy of sled's files, so it never catches a
//! file half-written and the result is compact. Online, the writer thread makes it between two
//! writes, so it is one consistent moment; offline it reads an [`super::Inspector`]'s private
//! copy. The result is a data directory: a broker started on it serves what was stored.

use std::fs::File;
use std::path::Path;
use std::time::Instant;

use tracing::info;

use super::{BackupOutcome, StoreError};

/// Records between two progress lines in the log.
const PROGRESS_EVERY: u64 = 100_000;

/// Copies `clients` and `outbox` into a new store at `to`, which must not exist or be empty,
/// and makes the copy durable before returning.
pub(super) fn copy_trees(
    clients: &sled::Tree,
    outbox: &sled::Tree,
    to: &Path,
) -> Result<BackupOutcome, StoreError> {
    let refuse = |reason: &str| StoreError::Open {
        path: to.to_path_buf(),
        reason: reason.to_string(),
    };
    match std::fs::read_dir(to) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(refuse(
                    "the backup target exists and is not empty; pick a new directory",
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(to)?,
        Err(e) => return Err(e.into()),
    }
    let started = Instant::now();
    let db = super::sled_config(to)
        .open()
        .map_err(|e| refuse(&e.to_string()))?;
    let mut out = BackupOutcome {
        records: 0,
        bytes: 0,
    };
    for (name, tree) in [("clients", clients), ("outbox", outbox)] {
        let target = db.open_tree(name)?;
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        for item in tree.iter() {
            let (k, v) = item?;
            out.bytes += (k.len() + v.len()) as u64;
            batch.insert(k, v);
            in_batch += 1;
            out.records += 1;
            if in_batch == 10_000 {
                target.apply_batch(std::mem::take(&mut batch))?;
                in_batch = 0;
            }
            if out.records.is_multiple_of(PROGRESS_EVERY) {
                info!(records = out.records, bytes = out.bytes, to = %to.display(), "backup in progress");
            }
        }
        target.apply_batch(batch)?;
    }
    db.flush()?;
    File::open(to.join("db"))?.sync_all()?;
    // The copy holds every commit it lists: its seal says so (see `integrity`).
    let commit = super::integrity::stored_commit(&db.open_tree("outbox")?)?.unwrap_or(0);
    super::integrity::Seal::open(to, commit)?;
    drop(db);
    // The directory entries of the new files must be durable too.
    File::open(to)?.sync_all()?;
    info!(records = out.records, bytes = out.bytes, to = %to.display(),
          took_ms = started.elapsed().as_millis() as u64, "backup written");
    Ok(out)
}
