//! Scrub: read every stored data block once and check it against its crc32, and the register
//! of damaged slots that makes the next ingest send damaged blocks again.
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
//! The **register** (`damaged-slots` in the data directory, fsynced at every change) holds the
//! slots a scrub or a read found damaged. The digests answered to the ingest agent carry
//! a poisoned digest (its bitwise complement, which no content matching the stored digest can
//! have) for every block in a registered slot that still fails its crc when the route checks
//! it again, so the agent sends that block again and the next snapshot holds a good copy.
//! A registered slot whose data checks out again (freed and reused since) leaves the register
//! there; a complete scrub replaces what it checked with what it found. Kept in its own small
//! file, so it survives a restart without touching the metadata store's format.
//!
//! Locking: one scrub at a time (`ScrubState::running`); the register has its own mutex, taken
//! briefly and never while waiting for the catalog lock.

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::Instant;

use catalog::{blockmap, Catalog, Entry, NodeId, BLOCK_SIZE};

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
/// Damaged slots a scrub registers (4 GiB of data): beyond that, a disk is lost rather than
/// damaged, and the register would only cost memory.
const MAX_REGISTERED: usize = 1 << 20;
/// The register's file in the data directory.
const REGISTER_FILE: &str = "damaged-slots";
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
    register: Register,
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
    fn check_slots(&self, slots: &[(u64, u32)], buf: &mut [u8]) -> Vec<bool> {
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

    /// A list of `(block, digest)` for the ingest agent, for [`Store::finish_digests`].
    pub(super) fn digest_list(&self) -> DigestList {
        DigestList { damaged: self.scrub.register.snapshot(), out: Vec::new(), marked: Vec::new() }
    }

    /// The digests of `list`, each block in a registered damaged slot that fails its crc now
    /// poisoned so the agent sends it again. The caller holds the catalog lock the entries
    /// were found under.
    pub(super) fn finish_digests(&self, source: &str, list: DigestList) -> Result<Vec<(u64, u64)>> {
        let DigestList { mut out, mut marked, .. } = list;
        if marked.is_empty() {
            return Ok(out);
        }
        marked.sort_unstable_by_key(|(i, e)| (e.slot, *i));
        let slots: Vec<(u64, u32)> = marked.iter().map(|(_, e)| (e.slot, e.crc)).collect();
        let mut buf = vec![0u8; slots.len() * BS];
        let bad = self.check_slots(&slots, &mut buf);
        let (mut poisoned, mut healed) = (0u64, Vec::new());
        for ((i, e), bad) in marked.iter().zip(bad) {
            if bad {
                out[*i].1 = !e.digest;
                poisoned += 1;
            } else {
                healed.push(e.slot);
            }
        }
        self.scrub.register.remove(&healed);
        if poisoned > 0 {
            tracing::warn!(source, blocks = poisoned, "damaged blocks offered to the ingest agent for re-sending");
        }
        Ok(out)
    }
}

/// `(block, digest)` pairs being collected for the ingest agent, with the blocks whose slot
/// the register names (checked again by [`Store::finish_digests`]).
#[derive(Debug)]
pub(super) struct DigestList {
    damaged: BTreeSet<u64>,
    out: Vec<(u64, u64)>,
    marked: Vec<(usize, Entry)>,
}

impl DigestList {
    /// Add block `block` holding `e` (a data entry).
    pub(super) fn push(&mut self, block: u64, e: Entry) {
        if !self.damaged.is_empty() && self.damaged.contains(&e.slot) {
            self.marked.push((self.out.len(), e));
        }
        self.out.push((block, e.digest));
    }
}

/// The slots found damaged, in memory and in `damaged-slots`: one decimal slot number a line,
/// appended (and `fdatasync`ed) as reads find damage, rewritten whole (a temporary file, fsync,
/// rename) when slots leave it. A line torn by a crash is skipped when read back (or names a
/// wrong slot, which is checked and dropped like any healed one).
#[derive(Debug)]
struct Register {
    path: PathBuf,
    slots: Mutex<BTreeSet<u64>>,
}

impl Register {
    /// The register as last written; an unreadable file is reported and starts empty (the next
    /// scrub finds the damage again).
    fn load(dir: &Path) -> Register {
        let path = dir.join(REGISTER_FILE);
        let slots = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let (slots, bad) = parse_register(&text);
                if bad > 0 {
                    tracing::warn!(path = %path.display(), lines = bad, "skipping malformed lines of the register of damaged slots");
                }
                slots
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the register of damaged slots");
                BTreeSet::new()
            }
        };
        if !slots.is_empty() {
            tracing::warn!(
                slots = slots.len(),
                "slots were found damaged before: `forkd scrub` lists what still references them"
            );
        }
        Register { path, slots: Mutex::new(slots) }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeSet<u64>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshot(&self) -> BTreeSet<u64> {
        self.lock().clone()
    }

    fn add(&self, slots: &[u64]) {
        let mut set = self.lock();
        let new: Vec<u64> = slots.iter().copied().filter(|&s| set.insert(s)).collect();
        if !new.is_empty() {
            if let Err(e) = append_register(&self.path, &new) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot write the register of damaged slots");
            }
        }
    }

    fn remove(&self, slots: &[u64]) {
        let mut set = self.lock();
        let before = set.len();
        slots.iter().for_each(|s| {
            set.remove(s);
        });
        if set.len() != before {
            self.save(&set);
        }
    }

    /// After a complete scrub: the slots registered when it started that it did not find
    /// damaged leave, those it found stay (and whatever reads added meanwhile).
    fn replace_checked(&self, before: &BTreeSet<u64>, found: &BTreeSet<u64>) {
        let mut set = self.lock();
        let old = set.clone();
        set.retain(|s| !before.contains(s) || found.contains(s));
        set.extend(found);
        if *set != old {
            self.save(&set);
        }
    }

    /// Write the register durably (a temporary file, fsync, rename, fsync of the directory).
    /// A failure is logged: the register is a help for repair, the damage itself is found again.
    fn save(&self, set: &BTreeSet<u64>) {
        if let Err(e) = write_register(&self.path, set) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the register of damaged slots");
        }
    }
}

/// The slots a register file names, and how many of its lines are not slot numbers.
fn parse_register(text: &str) -> (BTreeSet<u64>, usize) {
    let (mut slots, mut bad) = (BTreeSet::new(), 0);
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        match line.parse() {
            Ok(s) => {
                slots.insert(s);
            }
            Err(_) => bad += 1,
        }
    }
    (slots, bad)
}

const REGISTER_HEADER: &str = "# forkd: slots of extents.0 found damaged (see `forkd scrub`)\n";

fn slot_lines(text: &mut String, slots: impl IntoIterator<Item = u64>) {
    for s in slots {
        text.push_str(&s.to_string());
        text.push('\n');
    }
}

/// Append `slots` to the register file (created with its header if missing), durably.
fn append_register(path: &Path, slots: &[u64]) -> std::io::Result<()> {
    let created = !path.exists();
    let mut f = std::fs::OpenOptions::new().read(true).create(true).append(true).open(path)?;
    let mut text = if created { REGISTER_HEADER.to_string() } else { String::new() };
    // After a line torn by a crash, start a new line rather than extend it.
    let len = f.metadata()?.len();
    let mut last = [b'\n'];
    if len > 0 {
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut last, len - 1)?;
    }
    if last[0] != b'\n' {
        text.push('\n');
    }
    slot_lines(&mut text, slots.iter().copied());
    f.write_all(text.as_bytes())?;
    f.sync_data()?;
    if created {
        std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()?;
    }
    Ok(())
}

fn write_register(path: &Path, set: &BTreeSet<u64>) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if set.is_empty() {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    } else {
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        let mut text = REGISTER_HEADER.to_string();
        slot_lines(&mut text, set.iter().copied());
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
    }
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_round_trips_and_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Register::load(dir.path());
        assert!(r.snapshot().is_empty());
        r.add(&[7, 3, 7]);
        assert_eq!(Register::load(dir.path()).snapshot(), BTreeSet::from([3, 7]));
        // A scrub that found 9 and not 3 (registered before it) keeps 7 only if a read added it
        // meanwhile: here 7 was registered before too, so it leaves.
        r.replace_checked(&BTreeSet::from([3, 7]), &BTreeSet::from([9]));
        assert_eq!(Register::load(dir.path()).snapshot(), BTreeSet::from([9]));
        r.remove(&[9]);
        assert!(!dir.path().join(REGISTER_FILE).exists());
        assert!(Register::load(dir.path()).snapshot().is_empty());
    }

    #[test]
    fn malformed_lines_of_a_register_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(REGISTER_FILE), "# header\n12\nnot a slot\n\n5\n4x").expect("write");
        assert_eq!(Register::load(dir.path()).snapshot(), BTreeSet::from([5, 12]));
        // What is appended after a torn line starts a line of its own.
        let r = Register::load(dir.path());
        r.add(&[12, 99]);
        let text = std::fs::read_to_string(dir.path().join(REGISTER_FILE)).expect("read");
        assert!(text.ends_with("\n4x\n99\n"), "{text:?}");
        assert_eq!(Register::load(dir.path()).snapshot(), BTreeSet::from([5, 12, 99]));
    }

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
