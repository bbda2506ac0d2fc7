//! Every volume's unique blocks: what it holds alone, the blocks deleting it with its
//! snapshots would free. Kept, so that listing a thousand volumes reads a thousand numbers
//! instead of walking a thousand trees (issue 13); quotas check writes against the same
//! figure (`quota`). Also the garbage collection steps, which change it.
//!
//! The figure lives in the volume (`Volume::unique`, in memory only), counted or stale, and
//! is exact whenever it is counted: it equals a fresh walk of the volume's roots
//! ([`blockmap::BlockMap::unique_blocks`]). What keeps it so:
//! - a write to a clone's head or into a source's running ingest adds one block per new data
//!   block and takes away every slot whose last reference it dropped ([`Catalog::count_write`]):
//!   a slot that loses its last reference was the volume's alone, and one that keeps a
//!   reference stays as unique as it was;
//! - the same write copies nodes it shared with the tree its head came from, which can leave
//!   blocks there held by one volume only: the figures of the volume a clone came from (its
//!   origin, or the one it was detached from) are marked stale;
//! - every other catalog operation can change who shares what (a deleted snapshot or relative,
//!   a new clone, a moved head), so after its commit [`Catalog::mark_changed`] marks stale the
//!   volumes it touched, the volumes their clones came from (before and after), and clones
//!   detached from them; a clone's origin snapshot outlives it, so what is done to its origin
//!   volume leaves it alone. A new clone shares everything: its figure is set to 0, counted;
//! - nodes waiting in the garbage queue still hold references, so what they share with live
//!   trees is unique to no one until a collection step dismantles them
//!   ([`Catalog::collect_garbage_step`]): the volumes marked by operations since the queue was
//!   last empty (`gc_affected`, which includes every volume sharing with the queue) are marked
//!   stale again after every step, and forgotten once the queue is empty.
//!
//! A stale figure is counted on its first read ([`Catalog::unique_blocks_of`]), a walk that
//! costs what the volume holds alone, and kept. At open every figure is stale.
//!
//! Locking: reads hold the store's lock shared, so the figure is an atomic that a reader may
//! set; every reader under the same lock counts the same number, and everything that changes
//! the trees or marks figures holds the lock exclusively.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Catalog, GcStep, NodeId, Result, Volume, BLOCK_SIZE};

/// The stored value of a stale figure.
const STALE: u64 = u64::MAX;

/// A volume's unique blocks, kept: counted, or stale until its next read.
#[derive(Debug)]
pub struct Kept(AtomicU64);

impl Default for Kept {
    /// Stale.
    fn default() -> Self {
        Kept(AtomicU64::new(STALE))
    }
}

impl Clone for Kept {
    fn clone(&self) -> Self {
        Kept(AtomicU64::new(self.0.load(Ordering::Relaxed)))
    }
}

impl Kept {
    /// A figure counted as `blocks`.
    fn counted(blocks: u64) -> Kept {
        Kept(AtomicU64::new(blocks.min(STALE - 1)))
    }

    /// The figure, unless stale.
    pub fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Relaxed)).filter(|&n| n != STALE)
    }

    fn set(&self, blocks: u64) {
        self.0.store(blocks.min(STALE - 1), Ordering::Relaxed);
    }

    fn mark_stale(&self) {
        self.0.store(STALE, Ordering::Relaxed);
    }

    /// A counted figure follows a write: `added` new blocks, `freed` slots given back.
    fn follow(&self, added: u64, freed: u64) {
        if let Some(n) = self.get() {
            self.set(n.saturating_add(added).saturating_sub(freed));
        }
    }
}

impl Catalog {
    /// Blocks `v`, a committed volume (as [`Catalog::volumes`] holds it), holds alone: its head,
    /// snapshots and running ingest. The kept figure, or a walk when it is stale, whose result
    /// is then kept.
    pub fn unique_blocks_of(&self, v: &Volume) -> Result<u64> {
        if let Some(n) = v.unique.get() {
            return Ok(n);
        }
        let n = self.map.unique_blocks(&v.roots())?;
        v.unique.set(n);
        Ok(n)
    }

    /// [`Catalog::unique_blocks_of`] of volume `name`, in bytes.
    pub fn volume_unique_bytes(&self, name: &str) -> Result<u64> {
        Ok(self.unique_blocks_of(self.volume(name)?)? * BLOCK_SIZE)
    }

    /// What deleting `reference` (a volume with its snapshots, or one snapshot) would give
    /// back now: its unique bytes. A volume's is kept; a snapshot's is a walk of what it holds
    /// alone.
    pub fn unique_bytes_of_reference(&self, reference: &str) -> Result<u64> {
        match self.check_delete(reference)? {
            crate::Deletion::Volume(v) => self.volume_unique_bytes(&v.name),
            crate::Deletion::Snapshot(_, s) => self.unique_bytes(&[s.root]),
        }
    }

    /// What deleting environment `name` (its members too, unless `keep_volumes`) would give
    /// back now: the sum of its members' unique bytes (blocks only members share among
    /// themselves are freed too, and not counted).
    pub fn env_unique_bytes(&self, name: &str, keep_volumes: bool) -> Result<u64> {
        let mut bytes = 0;
        for m in self.check_env_delete(name, keep_volumes)? {
            bytes += self.volume_unique_bytes(&m.name)?;
        }
        Ok(bytes)
    }

    /// Keep `v`'s figure across a write to its head or running ingest: `added` new data
    /// blocks, `freed` slots whose last reference went. The volume `v` came from may gain
    /// unique blocks (the write stopped sharing nodes with it): its figure goes stale.
    pub(crate) fn count_write(&self, v: &Volume, added: u64, freed: u64) {
        v.unique.follow(added, freed);
        for from in [&v.origin, &v.detached_from].into_iter().flatten() {
            self.mark_stale(&from.volume);
        }
    }

    /// Forget the figure of volume `name`, committed and staged.
    fn mark_stale(&self, name: &str) {
        if let Some(v) = self.volumes.get(name) {
            v.unique.mark_stale();
        }
        if let Some((v, _)) = self.staged.get(name) {
            v.unique.mark_stale();
        }
    }

    /// A new clone's figure, set by the operation that makes it (it shares everything): kept
    /// by [`Catalog::mark_changed`] for that operation.
    pub(crate) fn counted_new(&mut self, v: &mut Volume) {
        v.unique = Kept::counted(0);
        self.counted.insert(v.name.clone());
    }

    /// After a committed operation that changed or removed the volumes `touched`, whose
    /// records before it came from the volumes `before` (origins and detached-from): mark
    /// stale every figure it may have changed (see the module documentation); while garbage
    /// waits, remember them for the collection steps.
    pub(crate) fn mark_changed(&mut self, touched: &BTreeSet<String>, before: &BTreeSet<String>) {
        let counted = std::mem::take(&mut self.counted);
        let parents: BTreeSet<&String> = touched
            .iter()
            .filter_map(|n| self.volumes.get(n))
            .flat_map(|v| [&v.origin, &v.detached_from].into_iter().flatten().map(|o| &o.volume))
            .collect();
        let near = |v: &Volume| {
            touched.contains(&v.name)
                || before.contains(&v.name)
                || parents.contains(&v.name)
                || v.detached_from.as_ref().is_some_and(|o| touched.contains(&o.volume))
        };
        let changed: Vec<String> =
            self.volumes.values().filter(|v| near(v) && !counted.contains(&v.name)).map(|v| v.name.clone()).collect();
        for name in &changed {
            self.mark_stale(name);
        }
        if self.garbage_due {
            self.gc_affected.extend(changed);
        }
    }

    /// Drop the reference a volume, snapshot or ingest held on `root` (in the open
    /// transaction); a root nobody else holds goes to the garbage queue.
    pub(crate) fn drop_root(&mut self, root: NodeId) -> Result<()> {
        self.map.release(root)?;
        self.garbage_due |= root != 0;
        Ok(())
    }

    /// Set the size of the collection step an operation that queued garbage takes itself
    /// (default [`crate::GC_STEP_NODES`]).
    pub fn set_gc_step_nodes(&mut self, nodes: usize) {
        self.gc_step = nodes.max(1);
    }

    /// Whether garbage may wait in the queue: a step ([`Catalog::collect_garbage_step`]) is due.
    pub fn garbage_pending(&self) -> bool {
        self.garbage_due
    }

    /// Dismantle at most `max_nodes` queued nodes in one atomic commit (see
    /// [`blockmap::BlockMap::collect_garbage_step`]); the figures the step may change go stale.
    /// Must be called with no open transaction.
    pub fn collect_garbage_step(&mut self, max_nodes: usize) -> Result<GcStep> {
        let step = self.map.collect_garbage_step(max_nodes)?;
        for name in &self.gc_affected {
            if let Some(v) = self.volumes.get(name) {
                v.unique.mark_stale();
            }
        }
        if !step.more {
            self.gc_affected.clear();
            self.garbage_due = false;
        }
        Ok(step)
    }

    /// Dismantle the whole garbage queue, step by step. Returns the nodes freed.
    pub fn collect_garbage(&mut self) -> Result<u64> {
        let mut freed = 0;
        loop {
            let step = self.collect_garbage_step(crate::GC_STEP_NODES)?;
            freed += step.freed_nodes;
            if !step.more {
                return Ok(freed);
            }
        }
    }

    /// At open: garbage a crash left in the queue may share with any volume.
    pub(crate) fn garbage_at_open(&mut self) -> Result<()> {
        self.garbage_due = self.map.garbage_queued()?;
        if self.garbage_due {
            self.gc_affected = self.volumes.keys().cloned().collect();
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{Entry, IngestSummary, GC_STEP_NODES};

    /// Every volume's kept figure, where counted, equals a fresh walk; stale ones are counted
    /// (as a read would). Returns how many were counted already.
    pub(crate) fn check_all(cat: &Catalog) -> usize {
        let mut kept = 0;
        for v in cat.volumes().values() {
            let walk = cat.map().unique_blocks(&v.roots()).unwrap();
            if let Some(n) = v.unique.get() {
                assert_eq!(n, walk, "{}: kept figure against a walk", v.name);
                kept += 1;
            }
            assert_eq!(cat.unique_blocks_of(v).unwrap(), walk, "{}", v.name);
        }
        kept
    }

    /// Fresh data in blocks `first..first+n` of a clone's head, or of a source's ingest.
    fn write(cat: &mut Catalog, volume: &str, first: u64, n: u64) {
        let staging = cat.volume(volume).unwrap().kind == crate::Kind::Source;
        let slots = cat.map_mut().alloc(usize::try_from(n).unwrap()).unwrap();
        let es: Vec<Option<Entry>> = slots.into_iter().map(|slot| Some(Entry { slot, crc: 1, digest: 0 })).collect();
        cat.write(volume, first, &es, staging).unwrap();
    }

    fn blocks(cat: &Catalog, v: &str) -> u64 {
        cat.volume_unique_bytes(v).unwrap() / BLOCK_SIZE
    }

    /// An ingest of `n` blocks from `first` into source `db`, finished.
    fn ingest(cat: &mut Catalog, first: u64, n: u64) {
        cat.begin_ingest("db").unwrap();
        write(cat, "db", first, n);
        cat.finish_ingest("db", IngestSummary::default()).unwrap();
    }

    /// One operation of a test sequence.
    type Step = Box<dyn Fn(&mut Catalog)>;

    #[test]
    fn every_volume_keeps_its_unique_blocks_exact() {
        let dir = tempfile::tempdir().unwrap();
        let mut cat = crate::tests::open(dir.path());
        cat.create_source("db", 1024 * BLOCK_SIZE).unwrap();
        ingest(&mut cat, 0, 256);
        check_all(&cat);
        assert_eq!(blocks(&cat, "db"), 256);
        cat.clone_volume("db@1", "a").unwrap();
        cat.clone_volume("db@1", "b").unwrap();
        assert_eq!(check_all(&cat), 2, "a new clone is counted (it shares everything); db is stale");
        assert_eq!(blocks(&cat, "db"), 0);
        let mut steps: Vec<(&str, Step)> = vec![
            ("a overwrites 8 inherited blocks", Box::new(|c| write(c, "a", 0, 8))),
            ("b too: db holds those 8 alone now", Box::new(|c| write(c, "b", 0, 8))),
            ("a snapshot of a", Box::new(|c| drop(c.snapshot("a", None).unwrap()))),
            ("a overwrites its own", Box::new(|c| write(c, "a", 2, 4))),
            ("a trims", Box::new(|c| c.zero("a", 0, 6, false).unwrap())),
            ("c from a's snapshot", Box::new(|c| drop(c.clone_volume("a@1", "c").unwrap()))),
            ("c writes", Box::new(|c| write(c, "c", 100, 10))),
            ("c detached", Box::new(|c| drop(c.detach("c").unwrap()))),
            ("c writes again", Box::new(|c| write(c, "c", 0, 3))),
            ("a@1 deleted", Box::new(|c| c.delete("a@1").unwrap())),
            ("a rewound to db@1", Box::new(|c| drop(c.rewind("a", "db@1").unwrap()))),
            ("an ingest into db", Box::new(|c| ingest(c, 200, 100))),
            ("b refreshed", Box::new(|c| drop(c.refresh("b", None).unwrap()))),
            ("b writes", Box::new(|c| write(c, "b", 250, 20))),
            (
                "an aborted ingest",
                Box::new(|c| {
                    c.begin_ingest("db").unwrap();
                    write(c, "db", 0, 30);
                    c.abort_ingest("db").unwrap();
                }),
            ),
            ("the snapshot a's rewind kept, deleted", Box::new(|c| c.delete("a@2").unwrap())),
            ("b deleted", Box::new(|c| c.delete("b").unwrap())),
            ("c deleted", Box::new(|c| c.delete("c").unwrap())),
        ];
        for (what, step) in steps.drain(..) {
            step(&mut cat);
            let kept = check_all(&cat);
            assert!(kept >= 1, "{what}: nothing was kept");
        }
        assert!(cat.volume("a").unwrap().unique.get().is_some());
    }

    fn big_counted(cat: &Catalog) -> bool {
        cat.volume("big").unwrap().unique.get().is_some()
    }

    #[test]
    fn figures_stay_exact_while_garbage_is_collected_in_steps() {
        let dir = tempfile::tempdir().unwrap();
        let mut cat = crate::tests::open(dir.path());
        let leaves = 3 * GC_STEP_NODES as u64;
        cat.create_source("db", leaves * 64 * BLOCK_SIZE).unwrap();
        ingest(&mut cat, 0, 64);
        cat.clone_volume("db@1", "big").unwrap();
        write(&mut cat, "big", 0, leaves * 64);
        cat.snapshot("big", None).unwrap();
        cat.clone_volume("big@1", "other").unwrap();
        write(&mut cat, "other", 0, 64);
        // big's head moves on from most of its snapshot; deleting the snapshot queues more
        // garbage than one step dismantles, whose first leaves big's head still shares: the
        // node holding them is dismantled last (depth first, from the end).
        write(&mut cat, "big", 8 * 64, (leaves - 8) * 64);
        cat.delete("other").unwrap();
        cat.delete("big@1").unwrap();
        assert!(cat.garbage_pending(), "one step does not dismantle {leaves} leaves");
        check_all(&cat);
        let mut steps = 0;
        while cat.garbage_pending() {
            // A write between steps, counted from a figure counted under pending garbage.
            write(&mut cat, "big", leaves * 64 - 1, 1);
            assert!(big_counted(&cat), "big stays counted across a write");
            check_all(&cat);
            cat.collect_garbage_step(GC_STEP_NODES / 4).unwrap();
            check_all(&cat);
            steps += 1;
            if steps == 2 {
                // Interrupted: a restart finds the rest of the queue and counts afresh.
                cat.map_mut().flush_store().unwrap();
                drop(cat);
                cat = crate::tests::open(dir.path());
                assert!(cat.garbage_pending());
                assert_eq!(check_all(&cat), 0, "every figure is stale at open");
            }
        }
        assert!(steps > 4, "{steps} steps");
        assert_eq!(blocks(&cat, "big"), leaves * 64, "big holds every block alone once the queue is empty");
        check_all(&cat);
    }
}
