//! Makes sled's blob files durable, which sled itself never does.
//!
//! sled writes any log record over a quarter of its segment (128 KiB) to its own file under
//! `<data_dir>/blobs` and leaves only a pointer in the log. That happens to messages near the
//! payload cap, and also to consolidated tree nodes: a leaf holds up to 16 values, so a leaf of
//! 16 KiB messages is already a blob. sled writes blob files without fsync, so a commit that
//! synced only the log could confirm a message whose bytes were still in the page cache.
//! Before every commit's log fdatasync the writer calls [`BlobSync::sync_new`], which fsyncs
//! each blob file it has not synced before, then the directory that names them.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::PathBuf;

pub(super) struct BlobSync {
    dir: PathBuf,
    /// Blob files already synced (sled removes old ones; names no longer listed are dropped).
    synced: HashSet<OsString>,
}

impl BlobSync {
    pub(super) fn new(data_dir: &std::path::Path) -> Self {
        BlobSync {
            dir: data_dir.join("blobs"),
            synced: HashSet::new(),
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
        let mut listed = HashSet::with_capacity(self.synced.len());
        let mut synced = 0;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !self.synced.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_data()?,
                    // Garbage-collected by sled between the listing and the open: nothing
                    // refers to it any more.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                synced += 1;
            }
            listed.insert(name);
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
        std::fs::write(dir.path().join("blobs/100"), b"x").unwrap();
        std::fs::write(dir.path().join("blobs/200"), b"y").unwrap();
        assert_eq!(b.sync_new().unwrap(), 2);
        assert_eq!(b.sync_new().unwrap(), 0);
        std::fs::remove_file(dir.path().join("blobs/100")).unwrap();
        std::fs::write(dir.path().join("blobs/300"), b"z").unwrap();
        assert_eq!(b.sync_new().unwrap(), 1);
        assert_eq!(b.synced.len(), 2, "removed files are forgotten");
    }
}
