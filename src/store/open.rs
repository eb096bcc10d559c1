//! Opening a data directory for the broker: the sled config it was made with (`engine`), the
//! leftovers of a crash removed, sled's recovery guarded against its
//! panics on damaged records, the commit groups sled had not yet recovered replayed from the
//! body log's journal (`journal`), the open check (`integrity`), and then the writer thread
//! started over what was read.
//!
//! `Inspector::open_offline` and `outboxd repair` take the same steps, each with its own answer
//! to a damaged store, from `engine` and `integrity`.

use std::fs::File;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::bodies::{self, BodyLog};
use super::chunks;
use super::commit::Files;
use super::engine::{existing_segment_bytes, remove_stale_snapshots};
use super::integrity::{self, damaged};
use super::writer::{WriterState, QUEUE_DEPTH};
use super::SEGMENT_BYTES;
use super::{journal, keys, Engine, Handles, SledFiles, Store, StoreError, StoreOptions, Writer};
use crate::config::Durability;

/// Opens (or creates) the store in `opts.data_dir` and starts its writer thread.
///
/// Errors: [`StoreError::Unusable`] when the directory cannot be created or used (the
/// broker reports it as a configuration error); [`StoreError::Open`] when another process
/// holds it or sled cannot recover it; a stored record that does not decode.
pub(super) fn open(opts: StoreOptions) -> Result<(Store, Writer), StoreError> {
    let dir = opts.data_dir.clone();
    let unusable = |source| StoreError::Unusable {
        path: dir.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(unusable)?;
    remove_stale_snapshots(&dir).map_err(|e| match e {
        StoreError::Io(source) => unusable(source),
        other => other,
    })?;
    integrity::check_conf(&dir).map_err(|d| damaged(&dir, d))?;
    let segment = existing_segment_bytes(&dir)
        .or(opts.faults.segment_bytes())
        .unwrap_or(SEGMENT_BYTES);
    if segment * 4 < SEGMENT_BYTES {
        warn!(
            dir = %dir.display(),
            segment_bytes = segment,
            "this data dir was created with small sled segments: a leaf of large messages is \
             stored as a blob file, which the commit fsyncs but sled's own flush does not. \
             To move it to the current layout, stop the broker, `outboxd backup --to NEW` \
             and `outboxd restore` from NEW into an empty data dir"
        );
    }
    let opened = integrity::guarded("recovering it", || {
        sled::Config::new()
            .path(&dir)
            .segment_size(segment)
            .cache_capacity(opts.cache_capacity_bytes)
            // No flush of sled's own: durability comes from the commit journal and the
            // checkpoints. sled's background flush every half second (its default) wrote and
            // synced its log at the same moments as the commits' fdatasyncs, and the commits
            // of those moments took 2 to 5 ms instead of a fraction of one.
            .flush_every_ms(None)
            .open()
    })
    .map_err(|d| damaged(&dir, d))?;
    let db = opened.map_err(|e| match e {
            sled::Error::Io(io)
                if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("could not acquire lock") =>
            {
                StoreError::Open {
                    path: dir.clone(),
                    reason: "another process (a running outboxd?) holds it; stop it or pick another data_dir".to_string(),
                }
            }
            sled::Error::Io(io) => unusable(io),
            sled::Error::Corruption { .. } => damaged(&dir, format!("sled cannot recover it: {e}")),
            other => StoreError::Open {
                path: dir.clone(),
                reason: other.to_string(),
            },
        })?;
    let clients = db.open_tree("clients")?;
    let outbox = db.open_tree("outbox")?;
    match journal::recover(&dir, &db) {
        Ok(r) => {
            if let Some(writes) = r.old_record {
                info!(
                    writes,
                    "finished the last commit group, which a crash had cut short"
                );
            }
        }
        Err(e @ StoreError::Corrupt { .. }) => return Err(damaged(&dir, e)),
        Err(e) => return Err(e),
    }
    let commit = integrity::check_seal(&dir, &outbox)?.map_err(|d| damaged(&dir, d))?;
    let started = Instant::now();
    let segments = bodies::Segments::open(&dir, true)?;
    let checked = integrity::verify(&clients, &outbox, &segments).map_err(|d| damaged(&dir, d))?;
    info!(
        took_ms = started.elapsed().as_millis() as u64,
        commit, "store checked: every record reads back and every outbox is whole"
    );
    // Our own handle on sled's log, for the fdatasync its flush does not do.
    let log = File::open(dir.join("db"))?;
    // What sled recovered (and what was replayed) may so far be only in the page cache (a
    // crash between a write and its fsync): make it durable before the seal vouches for it and
    // before the body log deletes what nothing refers to.
    db.flush()?;
    log.sync_data()?;
    let seal = integrity::Seal::open(&dir, commit)?;
    let latched = Arc::new(AtomicBool::new(false));
    let handles = Handles::default();
    let bodies = BodyLog::open(
        segments,
        chunks::stored_refs(&outbox)?,
        bodies::Settings {
            fsync: opts.durability == Durability::Fsync,
            segment_bytes: opts.faults.body_segment_bytes(),
            compact_after: opts.faults.body_compact_after(),
            spares: opts.spare_segments,
        },
    )?;
    // The commit journal starts in the new young head.
    let (seg, off) = bodies.journal_end();
    outbox.insert(keys::checkpoint(), journal::encode_checkpoint(seg, off))?;
    db.flush()?;
    log.sync_data()?;
    let read_bodies = bodies.segments();
    let files = Files {
        bodies,
        db: db.clone(),
        clients: clients.clone(),
        outbox: outbox.clone(),
        log,
        seal,
    };
    let state = WriterState::load(
        files,
        checked,
        opts,
        Arc::clone(&latched),
        Arc::clone(&handles),
    )?;
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let thread = std::thread::Builder::new()
        .name("outboxd-writer".into())
        .spawn(move || state.run(rx))?;
    Ok((
        Store {
            tx,
            latched,
            handles,
            engine: Engine::Sled(Arc::new(SledFiles {
                db: std::mem::ManuallyDrop::new(db),
                clients: std::mem::ManuallyDrop::new(clients),
                outbox: std::mem::ManuallyDrop::new(outbox),
                bodies: read_bodies,
                dir,
            })),
        },
        Writer {
            thread: Some(thread),
        },
    ))
}
