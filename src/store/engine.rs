//! What this store asks of sled before any record is read: the config a data directory was made
//! with (its own segment size, see [`SEGMENT_BYTES`]) and the removal of what a crash during a
//! snapshot leaves behind. Opening for the broker (`open`), offline reads (`inspect`), backups
//! and `outboxd repair` all start here, so they open a data dir alike.

use std::path::Path;

use tracing::warn;

use super::{StoreError, SEGMENT_BYTES};

/// The segment size recorded in an existing sled data dir (its `conf` file: text lines such as
/// `segment_size: 524288`, then a checksum); None for a new one.
pub(super) fn existing_segment_bytes(dir: &Path) -> Option<usize> {
    let raw = std::fs::read(dir.join("conf")).ok()?;
    String::from_utf8_lossy(&raw)
        .lines()
        .find_map(|l| l.strip_prefix("segment_size:"))
        .and_then(|v| v.trim().parse().ok())
}

/// sled's config for a data dir: its own segment size if it exists, else [`SEGMENT_BYTES`].
pub(super) fn sled_config(dir: &Path) -> sled::Config {
    sled::Config::new()
        .path(dir)
        .segment_size(existing_segment_bytes(dir).unwrap_or(SEGMENT_BYTES))
}

/// Removes `snap.*.generating` files a crash during a snapshot left behind: sled refuses to
/// open with them present although the data is intact.
pub(super) fn remove_stale_snapshots(dir: &Path) -> Result<(), StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            warn!(file = %entry.path().display(), "removing an unfinished snapshot left by a crash");
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}
