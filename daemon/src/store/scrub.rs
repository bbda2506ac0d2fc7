//! Scrub: read every stored data block once and check it against its crc32; what it finds
//! goes into the register of damaged slots (`damaged`).
//!
//! A scrub runs in windows of slots, each in three passes, none holding the catalog lock for
//! long, so reads, writes and catalog operations go on meanwhile:
//! 1. **collect**: the list of trees (every volume's head, every snapshot, every unfinished
//!    ingest's staging tree) is taken once, at the start; each tree is walked in chunks of
//!    [`WALK_CHUNK`] blocks, one hold of the read lock per chunk (the tree re-resolved by name
//!    each time). A node wholly inside a chunk is read once whichever trees share it, so a
//!    hundred snapshots of one source cost little more than one. The result is the sorted
//!    `(slot, crc)` list of the window's referenced slots, each once.
//! 2. **verify**: those slots are read in slot order, [`READ_BATCH`] at a time (runs of
//!    consecutive slots merged into one I/O, one engine submission per batch) under a hold of
//!    the read lock, and checked. A mismatch is only a suspect: the slot may have been freed
//!    and reused for new data since it was collected.
//! 3. **confirm**: only when there are suspects, every tree is walked again to find each of
//!    its references to a suspect slot, and each is read and checked again against the entry
//!    found, under the same hold of the read lock that found it (so the slot cannot change
//!    under the check). What still fails is reported, once per reference: `db@3 offset 8192`,
//!    `clone1 offset 8192`.
//!
//! Blocks written after a scrub started may or may not be checked by it; everything that was
//! stored when it started and is still referenced when its window is checked is.
//!
//! Locking: one scrub at a time (`ScrubState::running`); the register has its own mutex, taken
//! briefly and never while waiting for the catalog lock.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, TryLockError};
use std::time::Instant;

use catalog::{blockmap, Catalog, Entry, NodeId, BLOCK_SIZE};

use super::damaged::{Register, MAX_REGISTERED};
use super::{runs, slot_offset, Result, Store};

/// Blocks of a tree's address space walked per hold of the read lock: 1 GiB, at most 4,096
/// leaves (a few milliseconds).
const WALK_CHUNK: u64 = 1 << 18;
/// Slots read and checked per hold of the read lock: 32 MiB.
const READ_BATCH: usize = 8192;
/// Slots collected per window: bounds the scrub's memory to about 64 MiB (16 GiB of data).
const WINDOW: u64 = 1 << 22;
/// A progress line in the log every this many bytes checked.
const LOG_EVERY: u64 = 4 << 30;
/// Failures a report lists (all are counted).
const MAX_LISTED: usize = 10_000;
const BS: usize = 4096;

/// One reference to a damaged block: the volume or snapshot and the byte offset in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubFailure {
    /// `VOLUME`, `VOLUME@N`, or `VOLUME (unfinished ingest)` for an ingest's staging tree.
    pub reference: String,
    /// Byte offset of the damaged 4 KiB block in it.
    pub offset: u64,
}

/// What a complete scrub found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Distinct stored blocks read and checked.
    pub checked_blocks: u64,
    /// Volumes, snapshots and unfinished ingests whose blocks were checked.
    pub checked_references: u64,
    /// Distinct stored blocks found damaged.
    pub damaged_blocks: u64,
    /// References to damaged blocks, by volume or snapshot and offset (at most 10,000).
    pub failures: Vec<ScrubFailure>,
    /// Every reference to a damaged block, listed or not.
    pub failures_total: u64,
    /// Wall time.
    pub duration_ms: u64,
}

/// How a scrub request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScrubOutcome {
    /// It ran to the end.
    Done(ScrubReport),
    /// Another scrub is running; nothing was done.
    Busy,
    /// The daemon is shutting down: it stopped part-way.
    Stopped,
}

/// The running scrub's progress, or the last one's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScrubProgress {
    /// True while a scrub runs.
    pub running: bool,
    /// Bytes read and checked so far.
    pub checked_bytes: u64,
    /// Bytes the scrub expects to check (the slots in use when it started).
    pub total_bytes: u64,
    /// Damaged blocks confirmed so far.
    pub damaged_blocks: u64,
}

/// The store's scrub state: the register, the one-at-a-time lock, the progress counters.
#[derive(Debug)]
pub(super) struct ScrubState {
    pub(super) register: Register,
    running: Mutex<()>,
    /// Set at shutdown: a running scrub stops at its next batch.
    stop: AtomicBool,
    active: AtomicBool,
    checked: AtomicU64,
    total: AtomicU64,
    damaged: AtomicU64,
}

impl ScrubState {
    /// The state of the data directory `dir`, with its register as last written.
    pub(super) fn open(dir: &Path) -> ScrubState {
        ScrubState {
            register: Register::load(dir),
            running: Mutex::new(()),
            stop: AtomicBool::new(false),
            active: AtomicBool::new(false),
            checked: AtomicU64::new(0),
            total: AtomicU64::new(0),
            damaged: AtomicU64::new(0),
        }
    }
}

/// A tree a scrub checks, by name (re-resolved at every chunk: heads move).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tree {
    Head(String),
    Snapshot(String, u64),
    Staging(String),
}

impl Tree {
    fn name(&self) -> String {
        match self {
            Tree::Head(v) => v.clone(),
            Tree::Snapshot(v, n) => format!("{v}@{n}"),
            Tree::Staging(v) => format!("{v} (unfinished ingest)"),
        }
    }

    /// Its root and size now; `None` once it is gone.
    fn resolve(&self, cat: &Catalog) -> Option<(NodeId, u64)> {
        let (Tree::Head(v) | Tree::Snapshot(v, _) | Tree::Staging(v)) = self;
        let vol = cat.volumes().get(v)?;
        match self {
            Tree::Head(_) => Some((vol.root, vol.size_bytes)),
            Tree::Snapshot(_, n) => vol.snapshots.iter().find(|s| s.id == *n).map(|s| (s.root, s.size_bytes)),
            Tree::Staging(_) => vol.staging.as_ref().map(|s| (s.root, vol.size_bytes)),
        }
    }
}

/// Every tree of the catalog, by volume name: its snapshots, its head, its staging tree.
fn trees(cat: &Catalog) -> Vec<Tree> {
    let mut out = Vec::new();
    for v in cat.volumes().values() {
        out.extend(v.snapshots.iter().map(|s| Tree::Snapshot(v.name.clone(), s.id)));
        out.push(Tree::Head(v.name.clone()));
        if v.staging.is_some() {
            out.push(Tree::Staging(v.name.clone()));
        }
    }
    out
}

/// What the confirm passes found, in bounded memory however much is damaged.
#[derive(Debug, Default)]
struct Findings {
    /// The first [`MAX_LISTED`] references to damaged blocks: (tree index, byte offset).
    listed: BTreeSet<(usize, u64)>,
    /// Every reference to a damaged block.
    references: u64,
    /// Distinct damaged slots.
    damaged: u64,
    /// The first [`MAX_REGISTERED`] of them, for the register.
    slots: BTreeSet<u64>,
}

impl Findings {
    fn reference(&mut self, t: usize, offset: u64) {
        self.references += 1;
        self.listed.insert((t, offset));
        if self.listed.len() > MAX_LISTED {
            self.listed.pop_last();
        }
    }

    /// Count the damaged slots one window confirmed.
    fn window(&mut self, slots: HashSet<u64>) {
        self.damaged += slots.len() as u64;
        let room = MAX_REGISTERED.saturating_sub(self.slots.len());
        if slots.len() > room {
            tracing::warn!(damaged = self.damaged, "only the first {MAX_REGISTERED} damaged slots are registered");
        }
        self.slots.extend(slots.into_iter().take(room));
    }
}

/// Clears the running flag when a scrub ends, however it ends.
#[derive(Debug)]
struct Active<'a>(&'a AtomicBool);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Store {
    /// Check every stored data block against its crc32 (see the module documentation).
    pub fn scrub(&self) -> Result<ScrubOutcome> {
        let _running = match self.scrub.running.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(ScrubOutcome::Busy),
        };
        let started = Instant::now();
        let (trees, high_water) = {
            let cat = self.catalog();
            let s = cat.map().stats();
            let in_use = s.high_water.saturating_sub(1 + s.free_slots + s.pending_free);
            self.scrub_begin(in_use * BLOCK_SIZE);
            (trees(&cat), s.high_water)
        };
        let _active = Active(&self.scrub.active);
        tracing::info!(trees = trees.len(), bytes = self.scrub.total.load(Ordering::Relaxed), "scrub started");
        let before = self.scrub.register.snapshot();
        let mut found = Findings::default();
        let mut checked = 0u64;
        let mut lo = 1;
        while lo < high_water {
            let hi = lo.saturating_add(WINDOW).min(high_water);
            let slots = self.collect(&trees, lo, hi)?;
            let suspects = self.verify(&slots, &mut checked);
            if self.scrub.stop.load(Ordering::SeqCst) {
                tracing::warn!(checked_bytes = checked * BLOCK_SIZE, "scrub stopped: the daemon is shutting down");
                return Ok(ScrubOutcome::Stopped);
            }
            if !suspects.is_empty() {
                self.confirm(&trees, &suspects, &mut found)?;
            }
            lo = hi;
        }
        self.scrub.register.replace_checked(&before, &found.slots);
        Ok(ScrubOutcome::Done(self.scrub_report(&trees, &found, checked, started)))
    }

    /// Progress of the running scrub, or of the last one.
    pub fn scrub_progress(&self) -> ScrubProgress {
        let s = &self.scrub;
        ScrubProgress {
            running: s.active.load(Ordering::SeqCst),
            checked_bytes: s.checked.load(Ordering::Relaxed),
            total_bytes: s.total.load(Ordering::Relaxed),
            damaged_blocks: s.damaged.load(Ordering::Relaxed),
        }
    }

    /// Make a running scrub stop at its next batch, and any later one at its first (shutdown).
    pub fn stop_scrub(&self) {
        self.scrub.stop.store(true, Ordering::SeqCst);
    }

    /// Record that `slot` holds damaged data (a read found it), for the next ingest's digests.
    pub(super) fn note_damage(&self, slot: u64) {
        self.scrub.register.add(&[slot]);
    }

    fn scrub_begin(&self, total: u64) {
        let s = &self.scrub;
        s.active.store(true, Ordering::SeqCst);
        s.checked.store(0, Ordering::Relaxed);
        s.damaged.store(0, Ordering::Relaxed);
        s.total.store(total, Ordering::Relaxed);
    }

    /// The report of a complete scrub; logs it and updates the metrics.
    fn scrub_report(&self, trees: &[Tree], found: &Findings, checked: u64, started: Instant) -> ScrubReport {
        let failures: Vec<ScrubFailure> =
            found.listed.iter().map(|&(t, offset)| ScrubFailure { reference: trees[t].name(), offset }).collect();
        let report = ScrubReport {
            checked_blocks: checked,
            checked_references: trees.len() as u64,
            damaged_blocks: found.damaged,
            failures,
            failures_total: found.references,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        self.metrics.scrub_damaged_blocks.set(i64::try_from(report.damaged_blocks).unwrap_or(i64::MAX));
        let fields = (report.checked_blocks * BLOCK_SIZE, report.damaged_blocks, report.failures_total);
        if report.damaged_blocks == 0 {
            tracing::info!(checked_bytes = fields.0, duration_ms = report.duration_ms, "scrub complete: no damage");
        } else {
            tracing::error!(
                checked_bytes = fields.0,
                damaged_blocks = fields.1,
                references = fields.2,
                "scrub complete: damaged blocks found; re-ingest sources to repair their newest snapshot"
            );
        }
        report
    }

    /// Pass 1: the sorted `(slot, crc)` of every data block in slots `lo..hi` that `trees`
    /// reference, each once.
    fn collect(&self, trees: &[Tree], lo: u64, hi: u64) -> Result<Vec<(u64, u32)>> {
        let mut seen: HashSet<NodeId> = HashSet::new();
        let mut out = Vec::new();
        for tree in trees {
            if self.scrub.stop.load(Ordering::SeqCst) {
                break;
            }
            self.walk_tree(tree, &mut |cat, root, first, end| {
                let mut enter = |id: NodeId, level: u8, base: u64| {
                    // A node wholly inside this chunk is read once, whichever trees share it.
                    let whole = base >= first && base.saturating_add(blockmap::capacity(level)) <= end;
                    !whole || seen.insert(id)
                };
                let mut entry = |_: NodeId, _: u64, e: Entry| {
                    if e.has_data() && (lo..hi).contains(&e.slot) {
                        out.push((e.slot, e.crc));
                    }
                };
                cat.map().walk_range(root, first, end, &mut enter, &mut entry)?;
                Ok(())
            })?;
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Walk `tree` in chunks of [`WALK_CHUNK`] blocks: `f(catalog, root, first, end)` runs for
    /// each under its own hold of the read lock, with the tree's root at that moment.
    fn walk_tree(&self, tree: &Tree, f: &mut dyn FnMut(&Catalog, NodeId, u64, u64) -> Result<()>) -> Result<()> {
        let mut first = 0u64;
        loop {
            let cat = self.catalog();
            let Some((root, size)) = tree.resolve(&cat) else { return Ok(()) };
            let nblocks = size / BLOCK_SIZE;
            if first >= nblocks {
                return Ok(());
            }
            let end = first.saturating_add(WALK_CHUNK).min(nblocks);
            f(&cat, root, first, end)?;
            drop(cat);
            first = end;
        }
    }

    /// Pass 2: read `slots` in batches and check them; returns the slots that failed.
    fn verify(&self, slots: &[(u64, u32)], checked: &mut u64) -> HashSet<u64> {
        let mut buf = vec![0u8; READ_BATCH.min(slots.len()) * BS];
        let mut suspects = HashSet::new();
        for batch in slots.chunks(READ_BATCH) {
            if self.scrub.stop.load(Ordering::SeqCst) {
                break;
            }
            let bad = {
                let _cat = self.catalog();
                self.check_slots(batch, &mut buf)
            };
            suspects.extend(batch.iter().zip(bad).filter(|(_, bad)| *bad).map(|(&(slot, _), _)| slot));
            let before = *checked * BLOCK_SIZE / LOG_EVERY;
            *checked += batch.len() as u64;
            let bytes = *checked * BLOCK_SIZE;
            self.scrub.checked.store(bytes, Ordering::Relaxed);
            if bytes / LOG_EVERY > before {
                let total = self.scrub.total.load(Ordering::Relaxed);
                tracing::info!(checked_bytes = bytes, total_bytes = total, suspects = suspects.len(), "scrub progress");
            }
        }
        suspects
    }

    /// Read the sorted `slots` into `buf` and tell which fail their crc. A batch the disk
    /// cannot read is read again slot by slot, and a slot that still cannot be read fails (a
    /// media error is damage too). The caller holds the catalog lock.
    pub(super) fn check_slots(&self, slots: &[(u64, u32)], buf: &mut [u8]) -> Vec<bool> {
        let mut unreadable = vec![false; slots.len()];
        if let Err(e) = self.read_slots(slots, buf) {
            tracing::warn!(error = %e, "a batch of stored blocks cannot be read: reading them one by one");
            for (i, one) in slots.iter().enumerate() {
                if let Err(e) = self.read_slots(std::slice::from_ref(one), &mut buf[i * BS..(i + 1) * BS]) {
                    tracing::error!(slot = one.0, error = %e, "a stored block cannot be read");
                    unreadable[i] = true;
                }
            }
        }
        let crc_of = |i: usize| blockmap::block_crc(&buf[i * BS..(i + 1) * BS]);
        slots.iter().enumerate().map(|(i, &(_, crc))| unreadable[i] || crc_of(i) != crc).collect()
    }

    /// Read the sorted `slots` into `buf` (one block each, in order), consecutive slots as one
    /// I/O, all in one engine submission. The caller holds the catalog lock.
    fn read_slots(&self, slots: &[(u64, u32)], buf: &mut [u8]) -> Result<()> {
        let pairs: Vec<(u64, usize)> = slots.iter().enumerate().map(|(i, &(s, _))| (s, i)).collect();
        let mut rest = &mut buf[..slots.len() * BS];
        let mut ios: Vec<(u64, &mut [u8])> = Vec::new();
        for run in runs(&pairs) {
            let (this, tail) = std::mem::take(&mut rest).split_at_mut(run.len() * BS);
            ios.push((slot_offset(run[0].0), this));
            rest = tail;
        }
        self.engine.read_many(&mut ios)?;
        Ok(())
    }

    /// Pass 3: find every reference to a `suspects` slot and check it again under the lock
    /// that found it; what still fails goes into `found`.
    fn confirm(&self, trees: &[Tree], suspects: &HashSet<u64>, found: &mut Findings) -> Result<()> {
        // Leaves already read that hold no suspect: shared leaves are read once. (A leaf changed
        // in place after that only gains freshly written slots, never a damaged one.)
        let mut clean: HashSet<NodeId> = HashSet::new();
        let mut damaged: HashSet<u64> = HashSet::new();
        for (t, tree) in trees.iter().enumerate() {
            self.walk_tree(tree, &mut |cat, root, first, end| {
                let mut hits: Vec<(u64, Entry)> = Vec::new();
                let (mut read, mut dirty) = (HashSet::new(), HashSet::new());
                let mut enter = |id: NodeId, level: u8, _: u64| level > 0 || !clean.contains(&id);
                let mut entry = |leaf: NodeId, b: u64, e: Entry| {
                    read.insert(leaf);
                    if e.has_data() && suspects.contains(&e.slot) {
                        hits.push((b, e));
                        dirty.insert(leaf);
                    }
                };
                cat.map().walk_range(root, first, end, &mut enter, &mut entry)?;
                clean.extend(read.difference(&dirty));
                for (b, slot) in self.still_damaged(hits) {
                    let offset = b * BLOCK_SIZE;
                    if damaged.insert(slot) {
                        self.metrics.checksum_errors.inc();
                        self.scrub.damaged.store(found.damaged + damaged.len() as u64, Ordering::Relaxed);
                    }
                    if found.references < MAX_LISTED as u64 {
                        tracing::error!(reference = %tree.name(), offset, slot, "scrub: checksum mismatch: block is damaged");
                    }
                    found.reference(t, offset);
                }
                Ok(())
            })?;
        }
        found.window(damaged);
        Ok(())
    }

    /// The `(block, slot)` of `hits` whose data fails its entry's crc when read now. The caller
    /// holds the catalog lock the entries were found under.
    fn still_damaged(&self, mut hits: Vec<(u64, Entry)>) -> Vec<(u64, u64)> {
        if hits.is_empty() {
            return Vec::new();
        }
        hits.sort_unstable_by_key(|(b, e)| (e.slot, *b));
        let slots: Vec<(u64, u32)> = hits.iter().map(|(_, e)| (e.slot, e.crc)).collect();
        let mut buf = vec![0u8; slots.len() * BS];
        let bad = self.check_slots(&slots, &mut buf);
        let mut out: Vec<(u64, u64)> =
            hits.iter().zip(bad).filter(|(_, bad)| *bad).map(|((b, e), _)| (*b, e.slot)).collect();
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_list_the_first_references_and_count_all() {
        let mut f = Findings::default();
        for i in (0..MAX_LISTED as u64 + 5).rev() {
            f.reference(usize::from(i % 2 == 0), i * 4096);
        }
        assert_eq!((f.references, f.listed.len()), (MAX_LISTED as u64 + 5, MAX_LISTED));
        assert_eq!(f.listed.first(), Some(&(0, 4096)), "sorted by tree, then offset");
        f.window(HashSet::from([3, 4]));
        f.window(HashSet::from([9]));
        assert_eq!((f.damaged, f.slots.len()), (3, 3));
    }

    #[test]
    fn tree_names() {
        assert_eq!(Tree::Head("db".into()).name(), "db");
        assert_eq!(Tree::Snapshot("db".into(), 3).name(), "db@3");
        assert_eq!(Tree::Staging("db".into()).name(), "db (unfinished ingest)");
    }
}
