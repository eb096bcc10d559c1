//! Fault injection for tests: the `OUTBOXD_FAULT_*` hooks, read once from the environment.
//!
//! The crash and failure tests (`tests/durability.rs`, `tests/damage.rs`, the durability audit
//! in `tools/`) need the real binary to fail at chosen moments: a flush or fsync that fails, a
//! write to the tree that fails, a crash between a journaled commit's fsync and its writes
//! reaching the tree, a data dir with sled's old small segments. They are not configuration,
//! so they live here, in one value the store asks at the points where a fault can strike,
//! instead of as fields threaded through the broker. With no variable set, every question is
//! answered "no fault" and nothing changes.

/// The hooks in force. `Faults::default()` injects nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// `OUTBOXD_FAULT_FSYNC_FAIL_AFTER`: the commit after this many successful ones fails its
    /// fsync.
    fsync_fail_after: Option<u64>,
    /// `OUTBOXD_FAULT_FLUSH_FAIL_AFTER`: the commit after this many successful ones fails its
    /// flush.
    flush_fail_after: Option<u64>,
    /// `OUTBOXD_FAULT_WRITE_FAIL_AFTER`: the publish after this many fails its write to the
    /// tree.
    write_fail_after: Option<u64>,
    /// `OUTBOXD_FAULT_CRASH_BEFORE_APPLY_AFTER`: the first journaled commit after this many
    /// commits aborts the process once it is durable, before its writes reach the tree (a
    /// crash at the one moment only the journal holds a group).
    crash_before_apply_after: Option<u64>,
    /// `OUTBOXD_FAULT_SEGMENT_BYTES`: sled's segment size for a new data dir, instead of
    /// [`crate::store::SEGMENT_BYTES`]: a small one brings back sled's blob files, for the
    /// durability audit to see.
    segment_bytes: Option<usize>,
    /// `OUTBOXD_FAULT_INLINE_BODIES` (any number): message bodies stay inline in their chunks,
    /// as in a data dir written before the body log (with small segments, sled's blob files
    /// come back with them).
    inline_bodies: bool,
    /// `OUTBOXD_FAULT_BODY_SEGMENT_BYTES`: the body log starts a new segment at this size
    /// instead of `store::bodies::SEGMENT_BYTES`, so tests see many segments.
    body_segment_bytes: Option<u64>,
    /// `OUTBOXD_FAULT_BODY_COMPACT_AFTER_MS`: how long after it filled a body log segment may
    /// be compacted, instead of a minute.
    body_compact_after_ms: Option<u64>,
    /// `OUTBOXD_FAULT_CHECKPOINT_EVERY_MS`: a checkpoint this often instead of every 50 ms.
    /// The trees reach the disk only at checkpoints (sled's own background flush is off), so a
    /// kill -9 before one leaves the commit journal alone to recover from.
    checkpoint_every_ms: Option<u64>,
}

impl Faults {
    /// Reads every `OUTBOXD_FAULT_*` variable; one that is unset or not a number is off.
    pub fn from_env() -> Faults {
        fn var<T: std::str::FromStr>(name: &str) -> Option<T> {
            std::env::var(name).ok().and_then(|v| v.parse().ok())
        }
        Faults {
            fsync_fail_after: var("OUTBOXD_FAULT_FSYNC_FAIL_AFTER"),
            flush_fail_after: var("OUTBOXD_FAULT_FLUSH_FAIL_AFTER"),
            write_fail_after: var("OUTBOXD_FAULT_WRITE_FAIL_AFTER"),
            crash_before_apply_after: var("OUTBOXD_FAULT_CRASH_BEFORE_APPLY_AFTER"),
            segment_bytes: var("OUTBOXD_FAULT_SEGMENT_BYTES"),
            inline_bodies: var::<u64>("OUTBOXD_FAULT_INLINE_BODIES").is_some(),
            body_segment_bytes: var("OUTBOXD_FAULT_BODY_SEGMENT_BYTES"),
            body_compact_after_ms: var("OUTBOXD_FAULT_BODY_COMPACT_AFTER_MS"),
            checkpoint_every_ms: var("OUTBOXD_FAULT_CHECKPOINT_EVERY_MS"),
        }
    }

    /// True when any hook is set (the broker warns: tests only).
    pub fn any(&self) -> bool {
        self.fsync_fail_after.is_some()
            || self.flush_fail_after.is_some()
            || self.write_fail_after.is_some()
            || self.crash_before_apply_after.is_some()
            || self.segment_bytes.is_some()
            || self.inline_bodies
            || self.body_segment_bytes.is_some()
            || self.body_compact_after_ms.is_some()
            || self.checkpoint_every_ms.is_some()
    }

    /// The error a commit's flush fails with, after `commits` successful commits.
    pub fn flush_error(&self, commits: u64) -> Option<String> {
        self.flush_fail_after
            .is_some_and(|n| commits >= n)
            .then(|| "flush failed: injected fault (OUTBOXD_FAULT_FLUSH_FAIL_AFTER)".into())
    }

    /// The error a commit's fsync fails with, after `commits` successful commits.
    pub fn fsync_error(&self, commits: u64) -> Option<String> {
        self.fsync_fail_after
            .is_some_and(|n| commits >= n)
            .then(|| "fsync failed: injected fault (OUTBOXD_FAULT_FSYNC_FAIL_AFTER)".into())
    }

    /// The error the write of a publish fails with, `published` counting it.
    pub fn write_error(&self, published: u64) -> Option<std::io::Error> {
        self.write_fail_after
            .is_some_and(|n| published > n)
            .then(|| {
                std::io::Error::other(
                    "write failed: injected fault (OUTBOXD_FAULT_WRITE_FAIL_AFTER)",
                )
            })
    }

    /// True when a journaled commit, durable after `commits` successful ones, must crash the
    /// process before its writes reach the tree.
    pub fn crash_before_apply(&self, commits: u64) -> bool {
        self.crash_before_apply_after.is_some_and(|n| commits > n)
    }

    /// Whether new message bodies stay inline in their chunks (no body log).
    pub fn inline_bodies(&self) -> bool {
        self.inline_bodies
    }

    /// The body log's segment size, when a test sets one.
    pub fn body_segment_bytes(&self) -> Option<u64> {
        self.body_segment_bytes
    }

    /// How long a full body log segment waits before it may be compacted, when a test sets it.
    pub fn body_compact_after(&self) -> Option<std::time::Duration> {
        self.body_compact_after_ms
            .map(std::time::Duration::from_millis)
    }

    /// How often the store makes a checkpoint, when a test sets it (sled then never flushes on
    /// its own).
    pub fn checkpoint_every(&self) -> Option<std::time::Duration> {
        self.checkpoint_every_ms
            .map(std::time::Duration::from_millis)
    }

    /// sled's segment size for a new data dir, when a test sets one.
    pub fn segment_bytes(&self) -> Option<usize> {
        self.segment_bytes
    }
}
