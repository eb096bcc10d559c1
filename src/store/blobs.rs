//! Makes sled's blob files durable, which sled itself never does.
//!
//! sled writes any log record over a quarter of its segment to its own file under
//! `<data_dir>/blobs` and leaves only a pointer in the log. Data dirs created by this broker use
//! segments large enough that no record gets there ([`super::SEGMENT_BYTES`]); data dirs from
//! before used sled's 512 KiB default, where a consolidated leaf of 16 KiB messages is already a
//! blob, written by whichever thread touched the leaf and never fsynced.
//!
//! For those, every checkpoint (`store::checkpoint`, on its own thread) calls
//! [`BlobSync::sync_new`] before the log's fdatasync and again after it, before the checkpoint
//! counts as made: sled writes a blob whole before the log names it, so the second pass finds
//! every blob the synced log can point at. A file is synced again when its size
//! changed or it was written within the last [`RECENT`] (it may have been listed while sled was
//! still writing it: sled's last write can leave the size as it was, and file times are
//! coarser than one write). What this cannot close is sled's
//! own periodic log fsync making a pointer durable before the blob is; that window is why new
//! data dirs avoid blobs altogether.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// A blob file modified this recently may still be in the middle of sled's writes: synced
/// again at every listing until it is older.
const RECENT: Duration = Duration::from_secs(1);

pub(super) struct BlobSync {
    dir: PathBuf,
    /// Blob files already synced, with their size then (sled removes old ones; names no longer
    /// listed are dropped).
    synced: HashMap<OsString, u64>,
    /// [`RECENT`] (a parameter so tests can look at old files without waiting).
    recent: Duration,
}

impl BlobSync {
    pub(super) fn new(data_dir: &std::path::Path) -> Self {
        BlobSync {
            dir: data_dir.join("blobs"),
            synced: HashMap::new(),
            recent: RECENT,
        }
    }

    /// Fsyncs the blob files written since the last call, then the directory. Returns how many
    /// files it synced.
    pub(super) fn sync_new(&mut self) -> io::Result<usize> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut listed = HashMap::with_capacity(self.synced.len());
        let mut synced = 0;
        let recent = SystemTime::now()
            .checked_sub(self.recent)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let (len, young) = match entry.metadata() {
                Ok(m) => (
                    m.len(),
                    !self.recent.is_zero() && m.modified().map_or(true, |t| t >= recent),
                ),
                // Garbage-collected by sled since the listing: nothing refers to it any more.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if young || self.synced.get(&name) != Some(&len) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_data()?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                synced += 1;
            }
            listed.insert(name, len);
        }
        if synced > 0 {
            File::open(&self.dir)?.sync_all()?;
        }
        self.synced = listed;
        Ok(synced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_blob_dir_is_nothing_to_sync() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(BlobSync::new(dir.path()).sync_new().unwrap(), 0);
    }

    #[test]
    fn each_blob_file_is_synced_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        let mut b = BlobSync::new(dir.path());
        b.recent = Duration::ZERO;
        std::fs::write(dir.path().join("blobs/100"), b"x").unwrap();
        std::fs::write(dir.path().join("blobs/200"), b"y").unwrap();
        assert_eq!(b.sync_new().unwrap(), 2);
        assert_eq!(b.sync_new().unwrap(), 0);
        std::fs::remove_file(dir.path().join("blobs/100")).unwrap();
        std::fs::write(dir.path().join("blobs/300"), b"z").unwrap();
        assert_eq!(b.sync_new().unwrap(), 1);
        assert_eq!(b.synced.len(), 2, "removed files are forgotten");
    }

    #[test]
    fn a_blob_written_after_it_was_synced_is_synced_again() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        let mut b = BlobSync::new(dir.path());
        b.recent = Duration::ZERO;
        std::fs::write(dir.path().join("blobs/100"), b"").unwrap();
        assert_eq!(b.sync_new().unwrap(), 1);
        std::fs::write(dir.path().join("blobs/100"), b"the node").unwrap();
        assert_eq!(b.sync_new().unwrap(), 1);
        assert_eq!(b.sync_new().unwrap(), 0);
    }

    #[test]
    fn a_blob_written_within_the_last_second_is_synced_at_every_listing() {
        // sled may still be writing it, and its last write need not change its size.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        let mut b = BlobSync::new(dir.path());
        std::fs::write(dir.path().join("blobs/100"), b"the node").unwrap();
        assert_eq!(b.sync_new().unwrap(), 1);
        assert_eq!(b.sync_new().unwrap(), 1, "still young: synced again");
    }
}
