//! Consistent copies of a store: a new sled db holding every record of the two trees.
//!
//! The copy is logical (record by record), not a copy of sled's files, so it never catches a
//! file half-written and the result is compact. Online, the writer thread makes it between two
//! writes, so it is one consistent moment; offline it reads an [`super::Inspector`]'s private
//! copy. The result is a data directory: a broker started on it serves what was stored.
//!
//! The target must lie outside the directory being copied: a copy inside the live data
//! directory would sit in the store's own files (sled's directory, copied again by every later
//! backup, restore and offline inspect, and lost with the disk it was meant to survive).
//! [`check_target`] resolves `..` and symlinks before it compares.

use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use tracing::info;

use super::bodies::Bodies;
use super::{chunks, keys, BackupOutcome, StoreError};

/// Records between two progress lines in the log.
const PROGRESS_EVERY: u64 = 100_000;

/// Refuses a backup target inside `data_dir` (or equal to it), however the path reaches it:
/// through `..`, or through a symlink in any of its existing directories.
///
/// Errors: [`StoreError::BackupInsideDataDir`]; [`StoreError::Io`] when a path cannot be
/// resolved (for example, no permission to look into a directory on the way).
pub fn check_target(data_dir: &Path, to: &Path) -> Result<(), StoreError> {
    let data = data_dir.canonicalize()?;
    let resolved = resolve(to)?;
    if resolved.starts_with(&data) {
        return Err(StoreError::BackupInsideDataDir {
            to: to.to_path_buf(),
            resolved,
            data_dir: data,
        });
    }
    Ok(())
}

/// `path` made absolute and resolved the way the file system will when the backup creates
/// it: a component that exists is resolved on disk (symlinks followed), one that does not is
/// taken as the plain directory the backup will create. The result never holds a symlink, so
/// `..` is its parent.
fn resolve(path: &Path) -> Result<PathBuf, StoreError> {
    let mut resolved = PathBuf::new();
    for c in std::path::absolute(path)?.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => resolved.push(c),
            Component::CurDir => {}
            Component::ParentDir => {
                resolved.pop();
            }
            Component::Normal(_) => match resolved.join(c).canonicalize() {
                Ok(real) => resolved = real,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                    ) =>
                {
                    resolved.push(c);
                }
                Err(e) => return Err(e.into()),
            },
        }
    }
    Ok(resolved)
}

/// Copies `clients` and `outbox` (the store in `data_dir`) into a new store at `to`, which
/// must not exist or be empty and must lie outside `data_dir` ([`check_target`]), and makes
/// the copy durable before returning.
///
/// The copy holds every body and every run of idempotency keys inline (see `chunks::inline`):
/// it stands without the body log, so a copy is one sled db, as before the body log.
pub(super) fn copy_trees(
    clients: &sled::Tree,
    outbox: &sled::Tree,
    bodies: &dyn Bodies,
    data_dir: &Path,
    to: &Path,
) -> Result<BackupOutcome, StoreError> {
    check_target(data_dir, to)?;
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
    let db = super::engine::sled_config(to)
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
            let v = match k.first() {
                Some(&keys::MSG) if name == "outbox" => match chunks::inline(&k, &v, bodies)? {
                    Some(v) => v,
                    None => continue,
                },
                Some(&keys::DEDUP_RUN) if name == "outbox" && super::bodies::is_ref(&v) => {
                    sled::IVec::from(super::records::encode_dedup(&super::dedup::run(
                        &k, &v, bodies,
                    )?)?)
                }
                _ => v,
            };
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
