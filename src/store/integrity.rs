//! Whether the store still holds everything it confirmed: the commit seal, the check every
//! open runs, and the repair that accepts a loss.
//!
//! sled recovers its log up to the first record that does not check out, which is right for a
//! torn tail after a crash (those writes were never confirmed) and silently wrong for damage
//! in the middle of the log (a cut file, a flipped bit): everything written after the damage is
//! gone, and the store opens as if whole, with seqs that will be assigned again. Two things
//! make that loud:
//!
//! - **The seal.** Every commit group that will be confirmed carries its number in the record
//!   `C` (in the same journal record or batch as its messages). Once the commit's fdatasync
//!   returned, the writer writes that number to a small file of its own, [`SEAL_FILE`], which
//!   sled's recovery never touches. So the seal never exceeds the number of a commit that is on
//!   disk, and at open a `C` below the seal means confirmed commits are missing. A crash in the
//!   middle of an unconfirmed write leaves `C` at or above the seal: a quiet, normal recovery.
//!   The seal has two slots written in turn, each with a checksum, so a torn write of one leaves
//!   the other. It is fdatasynced at most once a second ([`SEAL_SYNC_EVERY`]) and at shutdown:
//!   after a power loss it may be a little behind (never ahead), which only narrows what it
//!   can prove about the last second.
//! - **The scan.** Every record of both trees is read at open: sled checks each page it reads,
//!   the codec checks each record's checksum, and each outbox's stored messages must match its
//!   meta (count, and no seq at or above its `next_seq`, which would be assigned again).
//!
//! A store that fails either is not served ([`Damage`]); `outboxd repair --accept-loss`
//! ([`repair`]) makes it consistent and moves every outbox to a new epoch, so each client
//! learns at its next hello that its position no longer holds.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{info, warn};

use super::bodies::{self, Bodies, BodyRef, Segments};
use super::engine::{remove_stale_snapshots, sled_config};
use super::records::{decode, encode, fresh_meta, new_epoch, payload_len};
use super::{chunks, keys, StoreError};
use crate::codec::{self, ClientMeta, CodecError, DedupEntry, DedupRun};

/// The seal's file name in the data dir.
pub const SEAL_FILE: &str = "outboxd.seal";
const MAGIC: &[u8; 8] = b"OBXSEAL1";
/// Each slot: magic, commit number (u64 BE), CRC-32 of both (u32 LE). Slots sit a sector
/// apart, so one torn write cannot damage both.
const SLOT_BYTES: usize = 20;
const SLOT_OFFSETS: [u64; 2] = [0, 512];
/// How often the seal is fdatasynced while commits go on.
const SEAL_SYNC_EVERY: Duration = Duration::from_secs(1);

/// What was found wrong with a store, for a human: what is damaged and what it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage(pub String);

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The error for a store in `dir` that lost what it confirmed.
pub(super) fn damaged(dir: &Path, what: impl std::fmt::Display) -> StoreError {
    StoreError::Damaged {
        path: dir.to_path_buf(),
        damage: Damage(what.to_string()),
    }
}

/// Runs `f`, which reads a store that may be damaged, turning a panic inside sled (it panics
/// on some damaged records instead of returning an error) into [`Damage`] naming what it said.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, Damage> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let said = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Damage(format!(
            "the storage engine failed while {what}, on a damaged record ({said})"
        ))
    })
}

/// What the seal file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealRead {
    Missing,
    Valid(u64),
    Damaged(String),
}

fn slot_bytes(n: u64) -> [u8; SLOT_BYTES] {
    let mut b = [0u8; SLOT_BYTES];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&n.to_be_bytes());
    let crc = crc32fast::hash(&b[..16]);
    b[16..].copy_from_slice(&crc.to_le_bytes());
    b
}

fn parse_slot(b: &[u8]) -> Option<u64> {
    let b = b.get(..SLOT_BYTES)?;
    let crc = u32::from_le_bytes(b[16..20].try_into().ok()?);
    (b[..8] == MAGIC[..] && crc32fast::hash(&b[..16]) == crc)
        .then(|| b[8..16].try_into().ok().map(u64::from_be_bytes))
        .flatten()
}

/// Reads the seal of the data dir `dir`: the higher of its valid slots.
pub fn read_seal(dir: &Path) -> io::Result<SealRead> {
    let raw = match std::fs::read(dir.join(SEAL_FILE)) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(SealRead::Missing),
        Err(e) => return Err(e),
    };
    let best = SLOT_OFFSETS
        .iter()
        .filter_map(|at| raw.get(usize::try_from(*at).ok()?..).and_then(parse_slot))
        .max();
    Ok(match best {
        Some(n) => SealRead::Valid(n),
        None => SealRead::Damaged(format!(
            "neither copy of the commit number in {SEAL_FILE} checks out ({} bytes)",
            raw.len()
        )),
    })
}

/// The seal of a store in use: the writer advances it after each confirmed commit.
#[derive(Debug)]
pub struct Seal {
    file: File,
    n: u64,
    synced_at: Instant,
    dirty: bool,
}

impl Seal {
    /// Opens (or creates) the seal of `dir` at `n`, durably (file and directory entry).
    pub fn open(dir: &Path, n: u64) -> io::Result<Seal> {
        let path = dir.join(SEAL_FILE);
        let created = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let seal = Seal {
            file,
            n,
            synced_at: Instant::now(),
            dirty: false,
        };
        for at in SLOT_OFFSETS {
            seal.file.write_all_at(&slot_bytes(n), at)?;
        }
        seal.file.sync_data()?;
        if created {
            File::open(dir)?.sync_all()?;
        }
        Ok(seal)
    }

    /// The number of the last commit sealed.
    pub fn sealed(&self) -> u64 {
        self.n
    }

    /// Records that commit `n` is durable. Call only after its fdatasync returned.
    pub fn advance(&mut self, n: u64) -> io::Result<()> {
        let slot = SLOT_OFFSETS[usize::from(n % 2 == 1)];
        self.file.write_all_at(&slot_bytes(n), slot)?;
        self.n = n;
        self.dirty = true;
        if self.synced_at.elapsed() >= SEAL_SYNC_EVERY {
            self.sync()?;
        }
        Ok(())
    }

    /// Makes the last advance durable.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.dirty {
            self.file.sync_data()?;
            self.dirty = false;
        }
        self.synced_at = Instant::now();
        Ok(())
    }
}

/// Checks sled's settings file (`conf`: its segment size, then a CRC-32). sled itself only
/// warns on a bad checksum, and takes a cut file for no file at all, then opens the log with
/// other settings than it was written with.
pub fn check_conf(dir: &Path) -> Result<(), Damage> {
    let db_len = std::fs::metadata(dir.join("db")).map_or(0, |m| m.len());
    if db_len == 0 {
        return Ok(()); // a new store: sled writes its settings
    }
    let raw = std::fs::read(dir.join("conf"))
        .map_err(|e| Damage(format!("sled's settings file `conf` cannot be read: {e}")))?;
    let ok = raw.len() > 4 && {
        let (body, crc) = raw.split_at(raw.len() - 4);
        crc32fast::hash(body).to_le_bytes() == crc
    };
    if ok {
        Ok(())
    } else {
        Err(Damage(
            "sled's settings file `conf` is damaged (its checksum does not match)".into(),
        ))
    }
}

/// The number of the last commit sled recovered (record `C`), None in a store without one.
pub fn stored_commit(outbox: &sled::Tree) -> Result<Option<u64>, StoreError> {
    match outbox.get(keys::commit())? {
        Some(v) => Ok(Some(decode(&keys::commit(), &v)?)),
        None => Ok(None),
    }
}

/// Compares the seal with what sled recovered. Returns the commit number to go on from.
pub fn check_seal(dir: &Path, outbox: &sled::Tree) -> Result<Result<u64, Damage>, StoreError> {
    let stored = match stored_commit(outbox) {
        Ok(s) => s,
        Err(StoreError::Corrupt { source, .. }) => {
            return Ok(Err(Damage(format!(
                "the store's commit record is damaged ({source})"
            ))))
        }
        Err(e) => return Err(e),
    };
    Ok(match (read_seal(dir)?, stored) {
        (SealRead::Missing, None) => Ok(0),
        (SealRead::Missing, Some(c)) => Err(Damage(format!(
            "{SEAL_FILE} is missing from a store that has made {c} commits, so nothing proves \
             that sled recovered all of them"
        ))),
        (SealRead::Damaged(why), _) => Err(Damage(format!("{SEAL_FILE} is damaged: {why}"))),
        (SealRead::Valid(s), c) if c.unwrap_or(0) < s => {
            let c = c.unwrap_or(0);
            Err(Damage(format!(
                "{s} commits were confirmed, but sled recovered the store only as of commit {c}: \
                 the writes of the last {} commits are lost (its log file was damaged or cut)",
                s - c
            )))
        }
        (SealRead::Valid(_), c) => Ok(c.unwrap_or(0)),
    })
}

/// What one outbox holds, as the scan counted it.
#[derive(Debug, Default, Clone, Copy)]
struct Counted {
    messages: u64,
    max_seq: u64,
}

/// What the check read of the outboxes, so that the writer starts from it instead of reading
/// the client table and every meta a second time.
#[derive(Debug, Default)]
pub struct Checked {
    /// The client table in key order: name (as stored) and client number.
    pub clients: Vec<(sled::IVec, u64)>,
    /// Every outbox's meta by client number.
    pub metas: BTreeMap<u64, ClientMeta>,
}

/// Reads every record of both trees and checks them against each other. sled checks each page
/// it reads; the codec checks each record. A panic inside sled on a damaged page is reported as
/// damage too.
///
/// Every body a chunk refers to is read from the body log's `segments` and checked too.
pub(super) fn verify(
    clients: &sled::Tree,
    outbox: &sled::Tree,
    segments: &Segments,
) -> Result<Checked, Damage> {
    guarded("reading it", || verify_trees(clients, outbox, segments))?
}

fn unreadable(what: &str, e: &dyn std::fmt::Display) -> Damage {
    Damage(format!("a page of {what} cannot be read: {e}"))
}

fn verify_trees(
    clients: &sled::Tree,
    outbox: &sled::Tree,
    segments: &Segments,
) -> Result<Checked, Damage> {
    let mut names: HashMap<u64, String> = HashMap::new();
    let mut table = Vec::new();
    for item in clients.iter() {
        let (k, v) = item.map_err(|e| unreadable("the client table", &e))?;
        let name = String::from_utf8_lossy(&k).into_owned();
        let cid = <[u8; 8]>::try_from(v.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| Damage(format!("the client table's entry for {name:?} is damaged")))?;
        names.insert(cid, name);
        table.push((k, cid));
    }
    let mut metas: BTreeMap<u64, ClientMeta> = BTreeMap::new();
    for item in outbox.scan_prefix([keys::META]) {
        let (k, v) = item.map_err(|e| unreadable("the outboxes", &e))?;
        let meta = codec::decode(&v).map_err(|e| bad(&k, &e))?;
        metas.insert(cid_of(&k).ok_or_else(|| bad(&k, &"short key"))?, meta);
    }
    // The messages are most of the store: read them in two halves at once (2 cores make the
    // check of a large store take half as long), the other records beside them.
    let split = message_split(&metas);
    let (lo, hi, start, end) = ([keys::MSG], [keys::MSG + 1], &split[..], &split[..]);
    let parts = std::thread::scope(|scope| {
        let others = scope.spawn(|| {
            // No messages here; the references are those of key runs.
            let (_, mut refs) = scan(outbox.range(..&lo[..]))?;
            refs.extend(scan(outbox.range(&hi[..]..))?.1);
            Ok((HashMap::new(), refs))
        });
        let first = scope.spawn(|| scan(outbox.range(&lo[..]..end)));
        let second = scan(outbox.range(start..&hi[..]));
        [others.join(), first.join(), Ok(second)]
    });
    let mut counted: HashMap<u64, Counted> = HashMap::new();
    let mut refs = Vec::new();
    for part in parts {
        let (part, part_refs) = part.map_err(|_| {
            Damage("the storage engine failed while reading a damaged page".into())
        })??;
        refs.extend(part_refs);
        for (cid, c) in part {
            let t = counted.entry(cid).or_default();
            t.messages += c.messages;
            t.max_seq = t.max_seq.max(c.max_seq);
        }
    }
    segments.check(refs).map_err(|(cid, seq, why)| {
        if cid == KEY_RUN {
            return Damage(format!("a run of idempotency keys in the body log {why}"));
        }
        let who = names.get(&cid).map_or("?", String::as_str);
        Damage(format!(
            "the body of message {seq} in the outbox of {who:?} (#{cid}) {why}"
        ))
    })?;
    for (cid, meta) in &metas {
        let who = names.get(cid).ok_or_else(|| {
            Damage(format!(
                "outbox #{cid} ({:?}) has lost its entry in the client table",
                meta.name
            ))
        })?;
        let c = counted.remove(cid).unwrap_or_default();
        if c.messages != meta.pending {
            return Err(Damage(format!(
                "outbox {who:?} holds {} messages but its count says {}",
                c.messages, meta.pending
            )));
        }
        if c.messages > 0 && c.max_seq >= meta.next_seq {
            return Err(Damage(format!(
                "outbox {who:?} holds seq {} but would assign {} next",
                c.max_seq, meta.next_seq
            )));
        }
    }
    if let Some((cid, c)) = counted.into_iter().next() {
        return Err(Damage(format!(
            "{} messages of outbox #{cid} are stored without the outbox's record",
            c.messages
        )));
    }
    Ok(Checked {
        clients: table,
        metas,
    })
}

fn bad(k: &[u8], e: &dyn std::fmt::Display) -> Damage {
    Damage(format!("record {k:02x?} is damaged: {e}"))
}

fn cid_of(k: &[u8]) -> Option<u64> {
    k.get(1..9)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
}

/// A key that splits the message records into two halves of about as many messages, from the
/// outboxes' counts (seqs taken as dense within an outbox).
fn message_split(metas: &BTreeMap<u64, ClientMeta>) -> Vec<u8> {
    let total: u64 = metas.values().map(|m| m.pending).sum();
    let mut before = 0u64;
    for (cid, m) in metas {
        if before + m.pending >= total / 2 {
            let seq = m.acked.saturating_add(1).saturating_add(total / 2 - before);
            return keys::seq_key(keys::MSG, *cid, seq).to_vec();
        }
        before += m.pending;
    }
    vec![keys::MSG + 1]
}

/// Checks every record `records` yields; counts the messages of each outbox.
/// In the references [`scan`] collects, the outbox number of a run of idempotency keys (the
/// others belong to messages).
const KEY_RUN: u64 = u64::MAX;

/// What [`scan`] read: the messages of each outbox, and the body log references the chunks
/// hold, with the outbox and seq of each.
type Scanned = (HashMap<u64, Counted>, Vec<(BodyRef, u64, u64)>);

fn scan(
    records: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
) -> Result<Scanned, Damage> {
    let mut counted: HashMap<u64, Counted> = HashMap::new();
    let mut refs = Vec::new();
    for item in records {
        let (k, v) = item.map_err(|e| unreadable("the outboxes", &e))?;
        let bad = |e: &dyn std::fmt::Display| bad(&k, e);
        match k.first().copied() {
            Some(keys::META) => {
                codec::decode::<ClientMeta>(&v).map_err(|e| bad(&e))?;
            }
            Some(keys::MSG) => {
                let entries = chunks::split(&k, &v).map_err(|e| bad(&e))?;
                let cid = cid_of(&k).ok_or_else(|| bad(&"short key"))?;
                for (seq, entry) in &entries {
                    if bodies::is_ref(entry) {
                        let (r, _) = BodyRef::decode(entry)
                            .ok_or_else(|| bad(&format!("seq {seq} has a malformed reference")))?;
                        refs.push((r, cid, *seq));
                    }
                }
                let c = counted.entry(cid).or_default();
                c.messages += entries.len() as u64;
                if let Some((last, _)) = entries.last() {
                    c.max_seq = c.max_seq.max(*last);
                }
            }
            Some(keys::COMMIT) => {
                codec::decode::<u64>(&v).map_err(|e| bad(&e))?;
            }
            Some(keys::DEDUP_RUN) if bodies::is_ref(&v) => {
                let (r, _) = bodies::decode_place(&v)
                    .ok_or_else(|| bad(&"a malformed reference into the body log"))?;
                refs.push((r, KEY_RUN, 0));
            }
            kind => match kind.and_then(|kind| reads_back(kind, &v)) {
                Some(r) => r.map_err(|e| bad(&e))?,
                None => return Err(bad(&"a record of no kind the store writes")),
            },
        }
    }
    Ok((counted, refs))
}

/// Whether a record the check only has to read back (idempotency keys, their expiry lists, the
/// empty markers) does; None for a kind the store does not write (and for `M`, `O` and `C`,
/// which the check reads itself).
fn reads_back(kind: u8, v: &[u8]) -> Option<Result<(), CodecError>> {
    Some(match kind {
        keys::DEDUP => codec::decode_dedup::<DedupEntry>(v).map(drop),
        keys::DEDUP_RUN => codec::decode_dedup::<DedupRun>(v).map(drop),
        keys::DEDUP_LIST | keys::DEDUP_RUN_LIST => {
            codec::decode::<super::group::Expiring>(v).map(drop)
        }
        keys::MISSED | keys::EXPIRY | keys::SUB | keys::DEDUP_EXPIRY | keys::JOURNAL => Ok(()),
        keys::CHECKPOINT => match super::journal::decode_checkpoint(v) {
            Some(_) => Ok(()),
            None => Err(CodecError::Body(
                "the journal's checkpoint is not a position".into(),
            )),
        },
        _ => return None,
    })
}

/// What `outboxd repair --accept-loss` did.
#[derive(Debug, Default, Serialize)]
pub struct RepairReport {
    /// The damage found before the repair (None: the store was whole and nothing changed).
    pub damage: Option<String>,
    /// Outboxes moved to a new epoch.
    pub outboxes: u64,
    /// Messages still stored after the repair.
    pub messages: u64,
    /// Records that did not decode and were removed.
    pub removed_records: u64,
    /// Messages known lost (a count said more than was found), now counted in `missed`.
    pub counted_missed: u64,
}

/// Opens the data dir `dir` (no broker may hold it) and repairs it with [`repair`]; then checks
/// the result as every open does.
///
/// Errors: [`StoreError::Locked`] when a broker holds it; [`StoreError::Damaged`] when sled
/// cannot read it (then only a backup helps) or the repaired store still does not check out.
pub fn repair_dir(dir: &Path) -> Result<RepairReport, StoreError> {
    if !dir.join("db").is_file() {
        return Err(StoreError::Open {
            path: dir.to_path_buf(),
            reason: "no outboxd store here (no `db` file); check --data or storage.data_dir".into(),
        });
    }
    remove_stale_snapshots(dir)?;
    let unrepairable = |what: String| StoreError::Damaged {
        path: dir.to_path_buf(),
        damage: Damage(format!("{what}; this cannot be repaired in place")),
    };
    check_conf(dir).map_err(|d| unrepairable(d.0))?;
    let opened =
        guarded("recovering it", || sled_config(dir).open()).map_err(|d| unrepairable(d.0))?;
    let db = opened.map_err(|e| match e {
        sled::Error::Io(io)
            if io.kind() == io::ErrorKind::WouldBlock
                || io.to_string().contains("could not acquire lock") =>
        {
            StoreError::Locked {
                path: dir.to_path_buf(),
            }
        }
        e => unrepairable(format!("sled cannot open it: {e}")),
    })?;
    let outbox = db.open_tree("outbox")?;
    match super::journal::recover(dir, &db) {
        Ok(_) => {}
        Err(e @ StoreError::Corrupt { .. }) => {
            // What the journal holds from the damage on is part of the loss accepted; the
            // check below finds what it was.
            warn!(error = %e, "the commit journal is damaged: dropping what it holds from there on");
            outbox.remove([keys::JOURNAL])?;
            outbox.remove(keys::checkpoint())?;
        }
        Err(e) => return Err(e),
    }
    let report = guarded("reading it", || repair(dir, &db))
        .map_err(|d| unrepairable(d.0))?
        .map_err(|e| match e {
            StoreError::Sled(e) => unrepairable(format!("a page cannot be read: {e}")),
            e => e,
        })?;
    let clients = db.open_tree("clients")?;
    let still = |d: Damage| StoreError::Damaged {
        path: dir.to_path_buf(),
        damage: Damage(format!("after the repair: {d}")),
    };
    check_seal(dir, &outbox)?.map_err(still)?;
    verify(&clients, &outbox, &*Segments::open(dir, false)?).map_err(still)?;
    Ok(report)
}

/// Makes a damaged store consistent and accepts the loss: removes records that do not decode,
/// recounts every outbox from what it holds, gives every outbox a new epoch (its clients get
/// `resumed:false` at their next hello), counts in `missed` what is countable, and seals the
/// result. A store whose pages sled cannot read is not repaired here: restore a backup.
pub fn repair(dir: &Path, db: &sled::Db) -> Result<RepairReport, StoreError> {
    let clients = db.open_tree("clients")?;
    let outbox = db.open_tree("outbox")?;
    let sealed = check_seal(dir, &outbox)?;
    let segments = Segments::open(dir, false)?;
    let damage = match (sealed, verify(&clients, &outbox, &segments)) {
        (Ok(_), Ok(_)) => return Ok(RepairReport::default()),
        (Err(d), _) | (Ok(_), Err(d)) => d,
    };
    warn!(damage = %damage, "repairing a damaged store: accepting the loss");
    let mut report = RepairReport {
        damage: Some(damage.0),
        ..RepairReport::default()
    };
    let mut batch = sled::Batch::default();
    let mut names: HashMap<u64, String> = HashMap::new();
    for item in clients.iter() {
        let (k, v) = item?;
        match <[u8; 8]>::try_from(v.as_ref()) {
            Ok(b) => {
                names.insert(
                    u64::from_be_bytes(b),
                    String::from_utf8_lossy(&k).into_owned(),
                );
            }
            Err(_) => {
                clients.remove(&k)?;
                report.removed_records += 1;
            }
        }
    }
    #[derive(Default)]
    struct Found {
        messages: u64,
        bytes: u64,
        max_seq: u64,
        /// First seqs of message records that did not decode: where a loss can be counted.
        lost_at: Vec<u64>,
    }
    let mut metas: BTreeMap<u64, Option<ClientMeta>> = BTreeMap::new();
    let mut found: BTreeMap<u64, Found> = BTreeMap::new();
    let mut commit = 0u64;
    for item in outbox.iter() {
        let (k, v) = item?;
        let cid = k
            .get(1..9)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes);
        let ok = match (k.first().copied(), cid) {
            (Some(keys::META), Some(cid)) => match codec::decode::<ClientMeta>(&v) {
                Ok(m) => {
                    metas.insert(cid, Some(m));
                    true
                }
                Err(_) => {
                    metas.entry(cid).or_insert(None);
                    false
                }
            },
            (Some(keys::MSG), Some(cid)) => {
                let f = found.entry(cid).or_default();
                match chunks::split(&k, &v).and_then(|entries| {
                    entries
                        .iter()
                        .map(|(s, body)| {
                            chunks::stored_message(&k, body, &*segments as &dyn Bodies)
                                .map(|m| (*s, payload_len(&m.payload)))
                        })
                        .collect::<Result<Vec<_>, _>>()
                }) {
                    Ok(messages) => {
                        for (seq, len) in messages {
                            f.messages += 1;
                            f.bytes += len;
                            f.max_seq = f.max_seq.max(seq);
                        }
                        true
                    }
                    Err(_) => {
                        f.lost_at.extend(keys::seq_of(&k));
                        false
                    }
                }
            }
            (Some(keys::COMMIT), _) => {
                commit = codec::decode::<u64>(&v).unwrap_or(0);
                true
            }
            (Some(keys::DEDUP_RUN), _) if bodies::is_ref(&v) => {
                super::dedup::run(&k, &v, &*segments).is_ok()
            }
            (kind, _) => kind
                .and_then(|kind| reads_back(kind, &v))
                .is_some_and(|r| r.is_ok()),
        };
        if !ok {
            batch.remove(k);
            report.removed_records += 1;
        }
    }
    let cids: std::collections::BTreeSet<u64> = metas.keys().chain(found.keys()).copied().collect();
    for cid in cids {
        let f = found.remove(&cid).unwrap_or_default();
        let old = metas.remove(&cid).flatten();
        let name = match (names.get(&cid), &old) {
            (Some(n), _) => n.clone(),
            (None, Some(m)) => {
                // The meta names its client: put the client table's entry back.
                clients.insert(m.name.as_bytes(), &cid.to_be_bytes())?;
                m.name.clone()
            }
            (None, None) => {
                // Messages of a client nobody can name any more: nothing can deliver them.
                for item in outbox.scan_prefix(keys::seq_prefix(keys::MSG, cid)) {
                    let (k, _) = item?;
                    batch.remove(k);
                }
                report.removed_records += 1;
                continue;
            }
        };
        let Ok(id) = crate::model::ClientId::new(&name) else {
            continue;
        };
        let mut meta = old.clone().unwrap_or_else(|| fresh_meta(&id, cid));
        // Countable: a count that says more than was found, placed at seqs of the records lost.
        let short = old
            .as_ref()
            .map_or(0, |m| m.pending.saturating_sub(f.messages));
        let mut counted = 0u64;
        for first in &f.lost_at {
            for seq in *first.. {
                if counted >= short || seq >= meta.next_seq {
                    break;
                }
                batch.insert(&keys::seq_key(keys::MISSED, cid, seq), &[]);
                counted += 1;
            }
        }
        report.counted_missed += counted;
        meta.epoch = new_epoch(cid);
        meta.pending = f.messages;
        meta.bytes = f.bytes;
        meta.next_seq = meta.next_seq.max(f.max_seq.saturating_add(1));
        meta.acked = meta.acked.min(meta.next_seq.saturating_sub(1));
        batch.insert(&keys::meta(cid), encode(&meta)?);
        report.outboxes += 1;
        report.messages += f.messages;
        info!(client = %name, epoch = %meta.epoch, messages = f.messages, counted_missed = counted, "outbox repaired: new epoch");
    }
    let seal = match read_seal(dir)? {
        SealRead::Valid(s) => s,
        _ => 0,
    };
    let next = commit.max(seal).saturating_add(1);
    batch.insert(&keys::commit(), encode(&next)?);
    outbox.apply_batch(batch)?;
    db.flush()?;
    File::open(dir.join("db"))?.sync_all()?;
    let mut s = Seal::open(dir, next)?;
    s.sync()?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seal_reads_back_the_last_number_written_and_survives_one_torn_slot() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_seal(dir.path()).unwrap(), SealRead::Missing);
        let mut s = Seal::open(dir.path(), 0).unwrap();
        for n in 1..=5 {
            s.advance(n).unwrap();
        }
        assert_eq!(read_seal(dir.path()).unwrap(), SealRead::Valid(5));
        // Tear the slot of 5: the other slot still proves 4.
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join(SEAL_FILE))
            .unwrap();
        f.write_all_at(&[0xff; 4], SLOT_OFFSETS[1] + 9).unwrap();
        assert_eq!(read_seal(dir.path()).unwrap(), SealRead::Valid(4));
        f.write_all_at(&[0xff; 4], SLOT_OFFSETS[0] + 9).unwrap();
        assert!(matches!(
            read_seal(dir.path()).unwrap(),
            SealRead::Damaged(_)
        ));
    }
}
