//! Where a client stands in its outbox (epoch + last acked seq), and where that is kept.
//!
//! The client resumes from this position on every reconnect, and after a restart of the
//! application when the store outlives the process. [`MemoryPositionStore`] (the default) keeps
//! it for the life of the process; [`FilePositionStore`] keeps it in a file, replaced atomically
//! (temporary file, fsync, rename, fsync of the directory), so a crash leaves either the old
//! position or the new one, never a torn file.
//!
//! Why it matters: an ack that was sent but never reached the broker leaves the message in the
//! outbox. A restarted application that resumes from a saved position tells the broker "all up to
//! here is done", and gets nothing it already processed. Without the saved position it would
//! get those messages again (still at-least-once, but duplicates for the application).

use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::ClientId;

/// One incarnation of a client's outbox, as named by the broker. Seqs mean something only
/// together with their epoch.
///
/// Every delivered message and every ack carries its epoch, so the text is shared: a clone
/// costs a reference count, not a copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Epoch(Arc<str>);

impl Epoch {
    pub fn new(s: impl Into<String>) -> Self {
        Epoch(Arc::from(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Epoch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Epoch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Epoch::new)
    }
}

/// Every message of `epoch` with a seq at or below `last_seq` has been processed and acked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: Epoch,
    pub last_seq: u64,
}

/// Why a position could not be loaded or saved.
#[derive(Debug, Error)]
pub enum PositionError {
    #[error("cannot read position file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write position file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid position file ({reason}); move it away to start over")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path} holds the position of client {found:?}, not {expected:?}")]
    OtherClient {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("position store failed: {0}")]
    Other(String),
}

/// Keeps a client's position. The client calls it from a blocking thread, so implementations
/// may do file or network I/O. `save` returns once the position is as durable as the store
/// promises; the client sends the acks a save covers only after it returned.
pub trait PositionStore: Send + Sync + 'static {
    /// The last saved position of `client`; `Ok(None)` when there is none.
    fn load(&self, client: &ClientId) -> Result<Option<Position>, PositionError>;
    /// Records `position` for `client`, replacing the previous one.
    fn save(&self, client: &ClientId, position: &Position) -> Result<(), PositionError>;
}

/// Positions in memory, for the life of the process. Clones share the same positions, so a new
/// [`Client`](super::Client) built with a clone resumes where an earlier one stopped.
#[derive(Debug, Clone, Default)]
pub struct MemoryPositionStore {
    // A std mutex: held only to copy a small value, never across an await.
    positions: Arc<Mutex<HashMap<ClientId, Position>>>,
}

impl MemoryPositionStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl PositionStore for MemoryPositionStore {
    fn load(&self, client: &ClientId) -> Result<Option<Position>, PositionError> {
        let map = self
            .positions
            .lock()
            .map_err(|_| PositionError::Other("memory store lock poisoned".into()))?;
        Ok(map.get(client).cloned())
    }

    fn save(&self, client: &ClientId, position: &Position) -> Result<(), PositionError> {
        let mut map = self
            .positions
            .lock()
            .map_err(|_| PositionError::Other("memory store lock poisoned".into()))?;
        map.insert(client.clone(), position.clone());
        Ok(())
    }
}

/// One client's position in one JSON file:
/// `{"version":1,"client_id":"bob","epoch":"…","last_seq":41}`.
///
/// `save` writes a temporary file in the same directory, fsyncs it, renames it over the old
/// one and fsyncs the directory: after a crash the file holds the old or the new position.
/// The parent directory is created when missing. `load` refuses a file that names another
/// client (two clients sharing one file would resume from each other's positions).
#[derive(Debug, Clone)]
pub struct FilePositionStore {
    path: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    client_id: String,
    epoch: Epoch,
    last_seq: u64,
}

const FILE_VERSION: u32 = 1;

impl FilePositionStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_err(&self, source: std::io::Error) -> PositionError {
        PositionError::Write {
            path: self.path.clone(),
            source,
        }
    }
}

impl PositionStore for FilePositionStore {
    fn load(&self, client: &ClientId) -> Result<Option<Position>, PositionError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(PositionError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let f: FileFormat = serde_json::from_str(&text).map_err(|e| PositionError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        if f.version != FILE_VERSION {
            return Err(PositionError::Corrupt {
                path: self.path.clone(),
                reason: format!("format version {} is not {FILE_VERSION}", f.version),
            });
        }
        if f.client_id != client.as_str() {
            return Err(PositionError::OtherClient {
                path: self.path.clone(),
                found: f.client_id,
                expected: client.to_string(),
            });
        }
        Ok(Some(Position {
            epoch: f.epoch,
            last_seq: f.last_seq,
        }))
    }

    fn save(&self, client: &ClientId, position: &Position) -> Result<(), PositionError> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(|e| self.write_err(e))?;
        let body = FileFormat {
            version: FILE_VERSION,
            client_id: client.to_string(),
            epoch: position.epoch.clone(),
            last_seq: position.last_seq,
        };
        let mut text =
            serde_json::to_string(&body).map_err(|e| self.write_err(std::io::Error::other(e)))?;
        text.push('\n');
        let mut tmp = tempfile::Builder::new()
            .prefix(".position-")
            .suffix(".tmp")
            .tempfile_in(&dir)
            .map_err(|e| self.write_err(e))?;
        tmp.write_all(text.as_bytes())
            .map_err(|e| self.write_err(e))?;
        // The data must be on disk before the rename makes it the position.
        tmp.as_file().sync_all().map_err(|e| self.write_err(e))?;
        tmp.persist(&self.path)
            .map_err(|e| self.write_err(e.error))?;
        // And the rename itself must survive a crash.
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.write_err(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bob() -> ClientId {
        ClientId::new("bob").unwrap()
    }

    fn pos(e: &str, s: u64) -> Position {
        Position {
            epoch: Epoch::new(e),
            last_seq: s,
        }
    }

    #[test]
    fn file_store_round_trips_and_replaces_the_position() {
        let dir = tempfile::tempdir().unwrap();
        let store = FilePositionStore::new(dir.path().join("sub/bob.json"));
        assert!(store.load(&bob()).unwrap().is_none());
        store.save(&bob(), &pos("E1", 4)).unwrap();
        store.save(&bob(), &pos("E1", 9)).unwrap();
        assert_eq!(store.load(&bob()).unwrap(), Some(pos("E1", 9)));
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("bob.json")]);
    }

    #[test]
    fn file_store_refuses_another_clients_file_and_a_corrupt_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        let store = FilePositionStore::new(&path);
        store.save(&bob(), &pos("E", 1)).unwrap();
        let alice = ClientId::new("alice").unwrap();
        assert!(matches!(
            store.load(&alice),
            Err(PositionError::OtherClient { .. })
        ));
        std::fs::write(&path, "{ half").unwrap();
        let e = store.load(&bob()).unwrap_err();
        assert!(matches!(e, PositionError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("p.json"), "{e}");
    }

    #[test]
    fn memory_store_clones_share_positions() {
        let a = MemoryPositionStore::new();
        let b = a.clone();
        a.save(&bob(), &pos("E", 3)).unwrap();
        assert_eq!(b.load(&bob()).unwrap(), Some(pos("E", 3)));
    }
}
