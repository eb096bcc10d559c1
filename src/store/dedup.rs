//! Idempotency keys: how a commit group stores the keys its publishes named, and how a key is
//! found again within the dedup window.
//!
//! A key stored as a sled key of its own (`K len scope key` -> [`DedupEntry`]) costs one tree
//! insert per publish, and at saturation those inserts were most of what the writer did. So the
//! keys one group stores for one scope (the publisher) go, where they can, into one record: a
//! *run* (`R len scope last-key` -> [`DedupRun`]), which holds a sorted range of keys and their
//! entries and is stored under the greatest of them. Publishers that number their keys (the
//! keys the project's clients generate: a random prefix, then a fixed-width counter) produce
//! keys above every run they stored before, so each group adds one run per publisher.
//!
//! One invariant lets a lookup find a key with one forward seek: the runs of one scope cover
//! disjoint ranges `[first, last]`. So the only run that can hold key `k` is the one with the
//! least `last` at or above `k`, and it holds `k` only if its `first` is at or below `k` (read
//! from the record's head). A group therefore puts a new key into a run only where no stored
//! run covers it, and only beside keys like it (same length, different in the last
//! [`RUN_SPREAD`] bytes at most), so runs stay narrow ([`place`]). A key left alone, or inside
//! a stored run's range (a key named again after its window), is stored as a `K` record as
//! before; random keys all are, and so are the rest of a scope's keys in a group once placing
//! them has stepped over [`MAX_SEEKS`] stored runs. A lookup reads both forms ([`find`]). Runs are
//! never rewritten: retention deletes a run whole once its newest key is out of the window
//! (`H ts id` lists a group's runs, as `G ts id` lists its `K` records).
//!
//! A run is written to the body log (see `bodies`), and its record in the tree holds only where
//! it is and its first key: kept in sled, a run cost the store several times its size in
//! rewrites (about 700 bytes per message at saturation). Runs written before the body log are
//! the record itself; [`run`] reads both.
//!
//! The writer keeps the run records (not the runs) in memory, in [`Runs`]: the seek a lookup
//! and a placement make is then a map lookup, not a range scan of sled's tree (which copies a
//! tree node per step, and cost a fifth of the writer's time at saturation with every publish
//! keyed). A record is about 60 bytes and stands for up to [`MAX_RUN_KEYS`] keys; the map
//! holds what the tree holds, as every write of the tree goes through `commit`, which notes
//! the runs it writes or removes ([`Runs::note`]).

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use sled::IVec;

use super::bodies::{self, Bodies};
use super::group::Writes;
use super::records::decode_dedup;
use super::{chunks, keys, StoreError};
use crate::codec::{self, DedupEntry, DedupRun, DedupRunHead};

/// The most keys one run holds.
const MAX_RUN_KEYS: usize = 512;
/// The most key bytes one run holds (far below the codec's 1 MiB and sled's blob threshold).
const MAX_RUN_BYTES: usize = 48 << 10;
/// Stored runs one group may step over for one scope before it stores the rest of that
/// scope's keys as `K` records (random keys would otherwise seek once per key).
const MAX_SEEKS: usize = 8;
/// Keys share a run only when they have the same length and differ at most in their last
/// this many bytes: numbered keys do, random ones do not, so a run's range stays narrow and
/// random keys are not caught inside it.
const RUN_SPREAD: usize = 4;

/// Where one group's idempotency keys go.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Placement {
    /// Keys stored one record each (`K`): (scope + key, entry).
    pub singles: Vec<(Vec<u8>, DedupEntry)>,
    /// New runs: the scope + key of their last key, and the run.
    pub runs: Vec<(Vec<u8>, DedupRun)>,
}

/// The length of the scope prefix (length byte and scope) of a dedup body.
fn scope_len(body: &[u8]) -> usize {
    body.first()
        .map_or(0, |l| usize::from(*l) + 1)
        .min(body.len())
}

/// Whether two keys (without scope) may share a run.
fn similar(a: &[u8], b: &[u8]) -> bool {
    let common = a.len().saturating_sub(RUN_SPREAD);
    a.len() == b.len() && a[..common] == b[..common]
}

/// What the writer keeps in memory of the tree's idempotency records: every run record
/// (`R scope last-key` -> where the run is and its first key), and, for the scopes looked at
/// since open, the greatest `K` record of that scope.
///
/// A lookup reads the `K` record of its key before the runs. A numbered key is above every
/// key its publisher named before, so it has none: with the bound known, a lookup of a key above
/// it skips that read (a sled lookup per keyed publish otherwise).
#[derive(Debug, Default)]
pub(super) struct Runs {
    runs: BTreeMap<IVec, IVec>,
    /// Scope (length byte and name) -> the greatest `K` record of it the tree holds (None: it
    /// holds none). Absent: not known, found out with one seek. A `K` record written above it
    /// raises it; one removed makes it unknown again, so it is looked at anew once retention
    /// has deleted keys.
    singles: HashMap<Vec<u8>, Option<IVec>>,
}

impl Runs {
    /// Every run record `tree` holds.
    pub(super) fn load(tree: &sled::Tree) -> Result<Runs, StoreError> {
        let mut runs = BTreeMap::new();
        for item in tree.scan_prefix([keys::DEDUP_RUN]) {
            let (k, v) = item?;
            runs.insert(k, v);
        }
        Ok(Runs {
            runs,
            singles: HashMap::new(),
        })
    }

    /// Notes a write of the tree (`None` = a removal); any key but a run record's or a `K`
    /// record's is ignored.
    pub(super) fn note(&mut self, key: &IVec, value: Option<&IVec>) {
        match key.first() {
            Some(&keys::DEDUP_RUN) => {
                match value {
                    Some(v) => self.runs.insert(key.clone(), v.clone()),
                    None => self.runs.remove(key),
                };
            }
            Some(&keys::DEDUP) => {
                let body = &key[1..];
                let scope = &body[..scope_len(body)];
                match value {
                    Some(_) => {
                        if let Some(greatest) = self.singles.get_mut(scope) {
                            if greatest.as_ref().is_none_or(|g| key > g) {
                                *greatest = Some(key.clone());
                            }
                        }
                    }
                    None => {
                        self.singles.remove(scope);
                    }
                }
            }
            _ => {}
        }
    }

    /// Notes every run record and `K` record among `writes` (sorted by key, so each kind is
    /// one range of it).
    pub(super) fn note_all(&mut self, writes: &Writes) {
        for kind in [keys::DEDUP, keys::DEDUP_RUN] {
            let range = IVec::from(&[kind][..])..IVec::from(&[kind + 1][..]);
            for (k, v) in writes.range(range) {
                self.note(k, v.as_ref());
            }
        }
    }

    /// Whether `tree` may hold the `K` record of `body` (scope and key): false only when it
    /// is above the greatest one of its scope.
    pub(super) fn may_hold_single(
        &mut self,
        tree: &sled::Tree,
        body: &[u8],
    ) -> Result<bool, StoreError> {
        let scope = &body[..scope_len(body)];
        let greatest = match self.singles.get(scope) {
            Some(g) => g,
            None => {
                let g = tree
                    .scan_prefix(keys::dedup(scope))
                    .keys()
                    .next_back()
                    .transpose()?;
                self.singles.entry(scope.to_vec()).or_insert(g)
            }
        };
        // `g` is a `K` key: the kind byte, then a body of this scope. Compared as bodies, so
        // the lookup's key is not built here too.
        Ok(greatest.as_ref().is_some_and(|g| body <= &g[1..]))
    }

    /// How many run records there are.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.runs.len()
    }
}

/// The stored run with the least last key at or above `body`, in `body`'s scope: its key, its
/// value and its first key (read without decoding the rest).
fn run_at_or_after(
    runs: &Runs,
    body: &[u8],
) -> Result<Option<(sled::IVec, sled::IVec, Vec<u8>)>, StoreError> {
    let key = keys::dedup_run(body);
    let scope = &key[..1 + scope_len(body)];
    let next = runs
        .runs
        .range::<[u8], _>((Bound::Included(key.as_slice()), Bound::Unbounded))
        .next();
    match next {
        Some((k, v)) if k.starts_with(scope) => {
            let (k, v) = (k.clone(), v.clone());
            if let Some((_, first)) = bodies::decode_place(&v) {
                let first = first.to_vec();
                return Ok(Some((k, v, first)));
            }
            let head: DedupRunHead =
                codec::decode_head(&v).map_err(|source| StoreError::Corrupt {
                    key: format!("{:02x?}", &k[..]),
                    source,
                })?;
            Ok(Some((k, v, head.first)))
        }
        _ => Ok(None),
    }
}

/// The run stored under `k`: in the body log (the record says where), or in the record itself
/// (runs stored before the body log).
pub(super) fn run(k: &[u8], v: &[u8], bodies: &dyn Bodies) -> Result<DedupRun, StoreError> {
    match bodies::decode_place(v) {
        Some((r, _)) => decode_dedup(k, &chunks::stored_body(k, r, bodies)?),
        None => decode_dedup(k, v),
    }
}

/// The entry a stored run holds for `body` (scope + key), if any.
pub(super) fn find(
    runs: &Runs,
    bodies: &dyn Bodies,
    body: &[u8],
) -> Result<Option<DedupEntry>, StoreError> {
    let Some((k, v, first)) = run_at_or_after(runs, body)? else {
        return Ok(None);
    };
    let key = &body[scope_len(body)..];
    if first.as_slice() > key {
        return Ok(None);
    }
    let run = run(&k, &v, bodies)?;
    Ok(run
        .entries
        .binary_search_by(|(k, _)| k.as_slice().cmp(key))
        .ok()
        .and_then(|i| run.entries.get(i))
        .map(|(_, e)| e.clone()))
}

/// Decides where a group's new keys go: into new runs where no stored run covers them, into
/// `K` records elsewhere. `new` is keyed by scope + key, so one scope's keys come together and
/// in order.
pub(super) fn place(
    runs: &Runs,
    new: BTreeMap<Vec<u8>, DedupEntry>,
) -> Result<Placement, StoreError> {
    let mut out = Placement::default();
    let mut scope: Vec<u8> = Vec::new();
    let mut this: Vec<(Vec<u8>, DedupEntry)> = Vec::new();
    for (body, entry) in new {
        let s = &body[..scope_len(&body)];
        if s != scope.as_slice() {
            place_scope(runs, &scope, std::mem::take(&mut this), &mut out)?;
            scope = s.to_vec();
        }
        this.push((body, entry));
    }
    place_scope(runs, &scope, this, &mut out)?;
    Ok(out)
}

/// What is known of the stored run at or after the key being placed.
enum Next {
    /// Not looked up yet (or the key passed it).
    Unknown,
    /// No stored run at or after the key in this scope.
    None,
    /// A stored run's range, scope stripped.
    Run { first: Vec<u8>, last: Vec<u8> },
}

/// [`place`] for the keys of one scope, in order.
fn place_scope(
    runs: &Runs,
    scope: &[u8],
    keys_in_order: Vec<(Vec<u8>, DedupEntry)>,
    out: &mut Placement,
) -> Result<(), StoreError> {
    let mut run = RunBuilder::default();
    let mut next = Next::Unknown;
    let mut seeks = 0;
    for (body, entry) in keys_in_order {
        let key = body[scope.len()..].to_vec();
        if matches!(&next, Next::Run { last, .. } if key > *last) {
            // The key is past that stored run: the run being built must not span it.
            run.close(scope, out);
            next = Next::Unknown;
        }
        if matches!(next, Next::Unknown) {
            if seeks == MAX_SEEKS {
                out.singles.push((body, entry));
                continue;
            }
            seeks += 1;
            next = match run_at_or_after(runs, &body)? {
                Some((k, _, first)) => Next::Run {
                    first,
                    last: k[1 + scope.len()..].to_vec(),
                },
                None => Next::None,
            };
        }
        match &next {
            Next::Run { first, .. } if key >= *first => {
                // Inside a stored run's range: only a record of its own can hold it.
                run.close(scope, out);
                out.singles.push((body, entry));
            }
            _ => {
                if !run.takes(&key) {
                    run.close(scope, out);
                }
                run.push(key, entry);
            }
        }
    }
    run.close(scope, out);
    Ok(())
}

#[derive(Default)]
struct RunBuilder {
    entries: Vec<(Vec<u8>, DedupEntry)>,
    bytes: usize,
}

impl RunBuilder {
    fn push(&mut self, key: Vec<u8>, entry: DedupEntry) {
        self.bytes += key.len();
        self.entries.push((key, entry));
    }

    /// Whether `key` may join this run: it has room, and the key is like its first.
    fn takes(&self, key: &[u8]) -> bool {
        match self.entries.first() {
            None => true,
            Some((first, _)) => {
                self.entries.len() < MAX_RUN_KEYS
                    && self.bytes + key.len() <= MAX_RUN_BYTES
                    && similar(first, key)
            }
        }
    }

    /// Ends the run being built and hands it to `out`: a run of one key is stored as a `K`
    /// record instead, which covers no range that could catch a later key.
    fn close(&mut self, scope: &[u8], out: &mut Placement) {
        let mut entries = std::mem::take(&mut self.entries);
        self.bytes = 0;
        if entries.len() == 1 {
            if let Some((key, entry)) = entries.pop() {
                let mut body = scope.to_vec();
                body.extend_from_slice(&key);
                out.singles.push((body, entry));
            }
            return;
        }
        let (Some((first, _)), Some((last, _))) = (entries.first(), entries.last()) else {
            return;
        };
        let mut body = scope.to_vec();
        body.extend_from_slice(last);
        let first = first.clone();
        out.runs.push((body, DedupRun { first, entries }));
    }
}

/// A run's newest entry time: the time retention waits for before it deletes the run.
pub(super) fn newest(run: &DedupRun) -> u64 {
    run.entries.iter().map(|(_, e)| e.ts).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::records::encode_dedup;

    fn tree() -> sled::Tree {
        let db = sled::Config::new().temporary(true).open().unwrap();
        db.open_tree("outbox").unwrap()
    }

    fn entry(id: u64) -> DedupEntry {
        DedupEntry {
            id,
            ts: 1000 + id,
            recipients: 1,
            fp: 7,
        }
    }

    fn batch(scope: &str, keys: &[&str]) -> BTreeMap<Vec<u8>, DedupEntry> {
        keys.iter()
            .enumerate()
            .map(|(i, k)| (keys::dedup_body(scope, k), entry(i as u64 + 1)))
            .collect()
    }

    /// Places `new` and writes the result to the tree, as the writer does.
    fn store(t: &sled::Tree, new: BTreeMap<Vec<u8>, DedupEntry>) -> Placement {
        let p = place(&Runs::load(t).unwrap(), new).unwrap();
        for (body, e) in &p.singles {
            t.insert(keys::dedup(body), encode_dedup(e).unwrap())
                .unwrap();
        }
        for (body, run) in &p.runs {
            t.insert(keys::dedup_run(body), encode_dedup(run).unwrap())
                .unwrap();
        }
        p
    }

    /// What a lookup finds, from either form.
    fn lookup(t: &sled::Tree, scope: &str, key: &str) -> Option<u64> {
        let body = keys::dedup_body(scope, key);
        let single = t
            .get(keys::dedup(&body))
            .unwrap()
            .map(|v| decode_dedup::<DedupEntry>(b"K", &v).unwrap());
        single
            .or(find(
                &Runs::load(t).unwrap(),
                &crate::store::bodies::Inline,
                &body,
            )
            .unwrap())
            .map(|e| e.id)
    }

    fn runs_of(p: &Placement) -> Vec<(String, usize)> {
        p.runs
            .iter()
            .map(|(b, r)| (String::from_utf8_lossy(b).into_owned(), r.entries.len()))
            .collect()
    }

    #[test]
    fn a_key_above_its_scopes_greatest_single_record_skips_the_read() {
        let t = tree();
        let body = |scope: &str, key: &str| keys::dedup_body(scope, key);
        // A `K` record stored before the writer's map was made (as after a restart).
        let k5 = IVec::from(keys::dedup(&body("p", "k5")));
        t.insert(&k5, encode_dedup(&entry(1)).unwrap()).unwrap();
        let mut runs = Runs::load(&t).unwrap();
        assert!(runs.may_hold_single(&t, &body("p", "k1")).unwrap());
        assert!(runs.may_hold_single(&t, &body("p", "k5")).unwrap());
        assert!(!runs.may_hold_single(&t, &body("p", "k6")).unwrap());
        // Another scope holds none; one whose name extends this one's is a scope of its own.
        assert!(!runs.may_hold_single(&t, &body("q", "k1")).unwrap());
        assert!(!runs.may_hold_single(&t, &body("pp", "k1")).unwrap());

        // Written through the writer's notes: the bound rises, and only for its scope.
        let k8 = IVec::from(keys::dedup(&body("p", "k8")));
        t.insert(&k8, encode_dedup(&entry(2)).unwrap()).unwrap();
        runs.note(&k8, Some(&IVec::from(&b"e"[..])));
        assert!(runs.may_hold_single(&t, &body("p", "k6")).unwrap());
        assert!(!runs.may_hold_single(&t, &body("p", "k9")).unwrap());
        assert!(!runs.may_hold_single(&t, &body("q", "k1")).unwrap());

        // Removed: looked at anew, so the bound falls back to what is left.
        t.remove(&k8).unwrap();
        runs.note(&k8, None);
        assert!(!runs.may_hold_single(&t, &body("p", "k6")).unwrap());

        // The same through a group's writes, beside a run record.
        let q3 = IVec::from(keys::dedup(&body("q", "k3")));
        let r = IVec::from(keys::dedup_run(&body("r", "k1")));
        t.insert(&q3, encode_dedup(&entry(3)).unwrap()).unwrap();
        let mut writes = Writes::new();
        writes.insert(k8.clone(), Some(IVec::from(&b"e"[..])));
        writes.insert(q3.clone(), Some(IVec::from(&b"e"[..])));
        writes.insert(r, Some(IVec::from(&b"r"[..])));
        runs.note_all(&writes);
        assert!(runs.may_hold_single(&t, &body("p", "k7")).unwrap());
        assert!(runs.may_hold_single(&t, &body("q", "k2")).unwrap());
        assert!(!runs.may_hold_single(&t, &body("q", "k4")).unwrap());
        assert_eq!(runs.len(), 1);
    }

    #[test]
    fn numbered_keys_of_a_group_become_one_run_under_their_last() {
        let t = tree();
        let p = store(&t, batch("pub", &["a-01", "a-02", "a-03"]));
        assert!(p.singles.is_empty());
        assert_eq!(runs_of(&p), [("\x03puba-03".to_string(), 3)]);
        assert_eq!(lookup(&t, "pub", "a-02"), Some(2));
        assert_eq!(lookup(&t, "pub", "a-04"), None);
        assert_eq!(lookup(&t, "pub", "a-00"), None);
        assert_eq!(lookup(&t, "other", "a-02"), None, "another scope's key");
        // The next group's keys lie above: one more run.
        let p = store(&t, batch("pub", &["a-04", "a-05"]));
        assert_eq!(runs_of(&p).len(), 1);
        assert_eq!(lookup(&t, "pub", "a-05"), Some(2));
        assert_eq!(lookup(&t, "pub", "a-03"), Some(3));
    }

    #[test]
    fn a_key_inside_a_stored_runs_range_gets_a_record_of_its_own() {
        let t = tree();
        store(&t, batch("p", &["b", "d", "f"]));
        let p = store(&t, batch("p", &["a", "c", "e", "g", "h"]));
        // "a" lies below the stored run (alone, so a record of its own), "c" and "e" inside
        // it, "g" and "h" above it.
        let mut singles: Vec<String> = p
            .singles
            .iter()
            .map(|(b, _)| String::from_utf8_lossy(&b[2..]).into_owned())
            .collect();
        singles.sort();
        assert_eq!(singles, ["a", "c", "e"]);
        assert_eq!(runs_of(&p), [("\x01ph".to_string(), 2)]);
        for (k, id) in [("a", 1), ("b", 1), ("c", 2), ("d", 2), ("e", 3), ("f", 3)] {
            assert_eq!(lookup(&t, "p", k), Some(id), "key {k}");
        }
        assert_eq!(lookup(&t, "p", "h"), Some(5));
        assert_eq!(lookup(&t, "p", "i"), None);
    }

    #[test]
    fn runs_of_one_scope_never_overlap_whatever_the_keys() {
        use proptest::prelude::*;
        proptest!(ProptestConfig::with_cases(64), |(groups in proptest::collection::vec(
            proptest::collection::btree_set("[a-d]{1,3}", 1..20), 1..8))| {
            let t = tree();
            let mut all = BTreeMap::new();
            let mut id = 0u64;
            for g in groups {
                let mut new = BTreeMap::new();
                for k in g {
                    if lookup(&t, "s", &k).is_some() {
                        continue;
                    }
                    id += 1;
                    all.insert(k.clone(), id);
                    new.insert(keys::dedup_body("s", &k), entry(id));
                }
                store(&t, new);
                let ranges: Vec<(Vec<u8>, Vec<u8>)> = t
                    .scan_prefix([keys::DEDUP_RUN])
                    .map(|r| {
                        let (k, v) = r.unwrap();
                        let run: DedupRun = decode_dedup(&k, &v).unwrap();
                        (run.first, k[3..].to_vec())
                    })
                    .collect();
                for w in ranges.windows(2) {
                    prop_assert!(w[0].1 < w[1].0, "runs overlap: {:?}", w);
                }
                for (k, want) in &all {
                    prop_assert_eq!(lookup(&t, "s", k), Some(*want), "key {}", k);
                }
            }
        });
    }

    #[test]
    fn random_keys_get_records_of_their_own_and_numbered_ones_break_where_they_differ_early() {
        let t = tree();
        let p = store(
            &t,
            batch(
                "p",
                &["3f9a0c11d2", "7be41d0a93", "c0ffee1234", "e5a2b7c901"],
            ),
        );
        assert!(p.runs.is_empty(), "{:?}", runs_of(&p));
        assert_eq!(p.singles.len(), 4);
        // Numbered keys: a new run where the prefix before the last four bytes changes.
        let p = store(
            &t,
            batch(
                "p",
                &["n-00019998", "n-00019999", "n-00020000", "n-00020001"],
            ),
        );
        assert_eq!(
            runs_of(&p),
            [
                ("\x01pn-00019999".to_string(), 2),
                ("\x01pn-00020001".to_string(), 2)
            ]
        );
        for k in ["3f9a0c11d2", "c0ffee1234", "n-00019998", "n-00020001"] {
            assert!(lookup(&t, "p", k).is_some(), "key {k}");
        }
        assert_eq!(lookup(&t, "p", "n-00019997"), None);
    }

    #[test]
    fn keys_past_the_seek_limit_get_records_of_their_own() {
        let t = tree();
        let n = MAX_SEEKS + 4;
        for i in 0..n {
            store(
                &t,
                batch("s", &[&format!("k{i:02}0"), &format!("k{i:02}1")]),
            );
        }
        // Two keys in the gap after each stored run: the first gaps become runs, one seek
        // each; after MAX_SEEKS seeks the rest are stored one record each.
        let gaps: Vec<String> = (0..n)
            .flat_map(|i| [format!("k{i:02}5"), format!("k{i:02}6")])
            .collect();
        let refs: Vec<&str> = gaps.iter().map(String::as_str).collect();
        let p = store(&t, batch("s", &refs));
        assert_eq!(p.runs.len(), MAX_SEEKS);
        assert_eq!(p.singles.len(), 2 * (n - MAX_SEEKS));
        for k in &gaps {
            assert!(lookup(&t, "s", k).is_some(), "key {k}");
        }
        assert_eq!(lookup(&t, "s", "k003"), None);
    }

    #[test]
    fn the_runs_in_memory_follow_the_writes_of_the_tree() {
        let t = tree();
        store(&t, batch("p", &["a-1", "a-2"]));
        store(&t, batch("q", &["b-1", "b-2"]));
        let mut runs = Runs::load(&t).unwrap();
        assert_eq!(runs.len(), 2);
        let p_run = keys::dedup_run(&keys::dedup_body("p", "a-2"));
        let single = IVec::from(keys::dedup(&keys::dedup_body("p", "x")));
        let removed: Writes = [
            (IVec::from(p_run.clone()), None),
            (single.clone(), Some(IVec::from(&b"v"[..]))),
        ]
        .into_iter()
        .collect();
        runs.note_all(&removed);
        assert_eq!(
            runs.len(),
            1,
            "the removal is noted, the `K` record ignored"
        );
        let body = keys::dedup_body("p", "a-1");
        assert_eq!(run_at_or_after(&runs, &body).unwrap(), None);
        runs.note(&IVec::from(p_run.clone()), t.get(&p_run).unwrap().as_ref());
        assert!(run_at_or_after(&runs, &body).unwrap().is_some());
    }

    #[test]
    fn a_run_closes_when_full() {
        let t = tree();
        let keys: Vec<String> = (0..MAX_RUN_KEYS + 3).map(|i| format!("k{i:05}")).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let p = store(&t, batch("s", &refs));
        assert_eq!(
            p.runs
                .iter()
                .map(|(_, r)| r.entries.len())
                .collect::<Vec<_>>(),
            [MAX_RUN_KEYS, 3]
        );
        assert_eq!(
            lookup(&t, "s", &keys[MAX_RUN_KEYS]),
            Some(MAX_RUN_KEYS as u64 + 1)
        );
    }
}
