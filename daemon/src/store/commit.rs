//! The write path: every write to a clone's head or a running ingest goes through the group
//! commit here, and so do zeroing (trim, write-zeroes) and ingest's zero runs.
//!
//! Invariants:
//! - data goes into freshly allocated slots and is written before the map points at it; a
//!   failed write or map update rolls the allocation back, so no slot is half-owned. The
//!   exception: a slot only this tree has held since the last flush began is rewritten in place
//!   (`BlockMap::rewritable`), under the write lock, its new checksum committed with it;
//! - all-zero blocks become known zeros and take no slot;
//! - a read-modify-write of an unaligned edge sees every write queued before it, even in the
//!   same batch (the batch is cut into segments where that matters);
//! - every committed write sets `unflushed`, so the periodic flush knows to run.
//!
//! Locking: writers queue under `queue`, then take `committer`; whoever holds it commits the
//! whole queue, in segments of at most [`SEGMENT_BYTES`], holding the mutation token
//! throughout and the catalog's write lock except while fresh slots are written. Each write's
//! outcome is left in its [`Pending`].

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use catalog::{Catalog, CatalogError, Entry, BLOCK_SIZE};
use parking_lot::RwLockWriteGuard;

use super::quota::Admitted;
use super::{check_range, slot_offset, usize_of, Result, Store, StoreError, MAX_IO};

/// A write waiting for a group commit, and its outcome.
#[derive(Debug)]
pub(super) struct Pending {
    volume: String,
    offset: u64,
    data: bytes::Bytes,
    /// Into a source's running ingest rather than a clone's head.
    staging: bool,
    result: Mutex<Option<Result<()>>>,
}

impl Pending {
    fn new(volume: &str, offset: u64, data: bytes::Bytes, staging: bool) -> Pending {
        Pending { volume: volume.to_string(), offset, data, staging, result: Mutex::new(None) }
    }

    fn set(&self, r: Result<()>) {
        *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    }

    fn is_unset(&self) -> bool {
        self.result.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }

    fn take(&self) -> Option<Result<()>> {
        self.result.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// A checked write with its whole blocks assembled.
#[derive(Debug)]
struct Prepared {
    pending: Arc<Pending>,
    /// The tree it goes into (a clone's head or a running ingest's staging tree).
    root: catalog::NodeId,
    first: u64,
    blocks: bytes::Bytes,
}

/// The same error for each write of a failed group commit.
fn replicate(e: &StoreError) -> StoreError {
    let io = |e: &std::io::Error| match e.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::new(e.kind(), e.to_string()),
    };
    match e {
        StoreError::Io(e) => StoreError::Io(io(e)),
        StoreError::Meta(metakv::KvError::Io(e))
        | StoreError::Catalog(CatalogError::Map(catalog::BlockMapError::Store(metakv::KvError::Io(e)))) => {
            StoreError::Io(io(e))
        }
        other => StoreError::Io(std::io::Error::other(other.to_string())),
    }
}

impl Store {
    /// Write `data` at `offset` of a clone. Partial blocks are merged with their current
    /// contents; all-zero blocks are recorded as known zeros and take no space.
    pub fn write(&self, volume: &str, offset: u64, data: &[u8]) -> Result<()> {
        self.write_bytes(volume, offset, bytes::Bytes::copy_from_slice(data))
    }

    /// [`Store::write`] without copying the data.
    pub fn write_bytes(&self, volume: &str, offset: u64, data: bytes::Bytes) -> Result<()> {
        self.check_space()?;
        self.note_enospc(self.submit(Pending::new(volume, offset, data, false)))
    }

    /// Group commit: every writer queues its write, then whoever holds the committer lock
    /// takes the whole queue and commits it as one transaction (one io_uring submission, one
    /// engine batch). Writers whose write a previous committer already took just collect their
    /// result. Under load this turns many small commits into a few large ones.
    fn submit(&self, p: Pending) -> Result<()> {
        self.submit_many(vec![p]).pop().unwrap_or_else(|| Err(StoreError::Io(std::io::Error::other("write lost"))))
    }

    fn submit_many(&self, ps: Vec<Pending>) -> Vec<Result<()>> {
        let ps: Vec<Arc<Pending>> = ps.into_iter().map(Arc::new).collect();
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).extend(ps.iter().cloned());
        let _committer = self.committer.lock().unwrap_or_else(|e| e.into_inner());
        if ps.iter().any(|p| p.is_unset()) {
            let batch = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
            self.commit_batch(batch);
        }
        ps.iter()
            .map(|p| p.take().unwrap_or_else(|| Err(StoreError::Io(std::io::Error::other("write was not committed")))))
            .collect()
    }

    /// Several writes to clones, committed together (see [`Store::write`]); one result each.
    pub fn write_many(&self, writes: Vec<(String, u64, bytes::Bytes)>) -> Vec<Result<()>> {
        if let Err(e) = self.check_space() {
            return writes.iter().map(|_| Err(replicate(&e))).collect();
        }
        let ps = writes.into_iter().map(|(v, off, data)| Pending::new(&v, off, data, false)).collect();
        self.submit_many(ps).into_iter().map(|r| self.note_enospc(r)).collect()
    }

    /// Commit a batch in segments of at most [`SEGMENT_BYTES`] (or where a read-modify-write
    /// must see an earlier write of the batch), holding the mutation token throughout and the
    /// write lock only around each segment's planning, its rewrites in place and its pointers.
    fn commit_batch(&self, batch: Vec<Arc<Pending>>) {
        let _mutation = self.mutation();
        let mut cat = self.catalog.write();
        let mut segment: Vec<Prepared> = Vec::new();
        let mut bytes = 0usize;
        let mut touched: HashSet<(String, u64)> = HashSet::new();
        let mut admitted = Admitted::default();
        for p in batch {
            // A read-modify-write of a block written earlier in this batch must see that
            // write: commit what came before first.
            let len = p.data.len() as u64;
            let unaligned = !p.offset.is_multiple_of(BLOCK_SIZE) || !len.is_multiple_of(BLOCK_SIZE);
            let depends = unaligned
                && len > 0
                && [p.offset / BLOCK_SIZE, (p.offset + len - 1) / BLOCK_SIZE]
                    .iter()
                    .any(|&b| touched.contains(&(p.volume.clone(), b)));
            if depends || bytes >= SEGMENT_BYTES {
                self.commit_segment(&mut cat, std::mem::take(&mut segment));
                touched.clear();
                admitted.clear();
                bytes = 0;
            }
            match self.prepare(&cat, &p, &mut admitted) {
                Ok(Some(prep)) => {
                    for b in prep.first..prep.first + (prep.blocks.len() as u64 / BLOCK_SIZE) {
                        touched.insert((p.volume.clone(), b));
                    }
                    bytes += prep.blocks.len();
                    segment.push(prep);
                }
                Ok(None) => p.set(Ok(())),
                Err(e) => p.set(Err(e)),
            }
        }
        self.commit_segment(&mut cat, segment);
    }

    /// Check one write (its range, and a clone's quota) and assemble its whole blocks (edges of
    /// an unaligned write keep their current bytes). `None` for an empty write.
    fn prepare(&self, cat: &Catalog, p: &Arc<Pending>, admitted: &mut Admitted) -> Result<Option<Prepared>> {
        let (volume, offset, len) = (p.volume.as_str(), p.offset, p.data.len() as u64);
        if len > MAX_IO {
            return Err(StoreError::TooLarge(len));
        }
        if volume.contains('@') {
            // A snapshot reference: it must exist, and it is read-only.
            let t = cat.target(volume)?;
            return Err(CatalogError::ReadOnly(t.name).into());
        }
        let v = cat.volume(volume)?;
        if !p.staging && v.replica_of.is_some() {
            return Err(CatalogError::Replica(v.name.clone()).into());
        }
        let root = match (&v.staging, p.staging, v.kind) {
            (Some(s), true, _) => s.root,
            (None, true, _) => return Err(CatalogError::NoIngest(v.name.clone()).into()),
            (_, false, catalog::Kind::Source) => return Err(CatalogError::ReadOnly(v.name.clone()).into()),
            (_, false, _) => v.root,
        };
        let size = v.size_bytes;
        check_range(volume, size, offset, len)?;
        if len == 0 {
            return Ok(None);
        }
        let first = offset / BLOCK_SIZE;
        let last = (offset + len - 1) / BLOCK_SIZE;
        let nblocks = usize_of(last - first + 1);
        let head = usize_of(offset - first * BLOCK_SIZE);
        let blocks = if head == 0 && len % BLOCK_SIZE == 0 {
            p.data.clone()
        } else {
            let mut whole = vec![0u8; nblocks * 4096];
            let edge = |i: usize| i * 4096..(i + 1) * 4096;
            self.read_target(cat, volume, root, size, first * BLOCK_SIZE, &mut whole[edge(0)])?;
            if nblocks > 1 {
                self.read_target(cat, volume, root, size, last * BLOCK_SIZE, &mut whole[edge(nblocks - 1)])?;
            }
            whole[head..head + p.data.len()].copy_from_slice(&p.data);
            bytes::Bytes::from(whole)
        };
        if !p.staging {
            admitted.admit(cat, volume, root, first, &blocks)?;
        }
        Ok(Some(Prepared { pending: p.clone(), root, first, blocks }))
    }

    /// Allocate, write and map a segment of prepared writes as one transaction; every write
    /// in it gets the outcome. Fresh slots are written with the lock let go (nothing points at
    /// them yet), the mutation token still held; then blocks rewritten in place, under the write
    /// lock (their slots are in the tree readers see); then the pointers are committed.
    fn commit_segment(&self, cat: &mut RwLockWriteGuard<'_, Catalog>, segment: Vec<Prepared>) {
        if segment.is_empty() {
            return;
        }
        let written = self.allocate_segment(cat, &segment).and_then(|(entries, in_place, fresh)| {
            let io = |pairs: &[(u64, usize, usize)]| self.engine.write_many(&segment_ios(&segment, pairs));
            // Fresh slots first: if they fail (a full disk), nothing in place was touched yet.
            let mut done = if fresh.is_empty() { Ok(()) } else { RwLockWriteGuard::unlocked_fair(cat, || io(&fresh)) };
            if done.is_ok() {
                // An error here leaves those blocks' bytes unknown under their old checksum: they
                // read as damaged, never as wrong data (they were never flushed).
                done = io(&in_place);
            }
            if let Err(e) = done {
                cat.map_mut().rollback();
                return Err(StoreError::Io(e));
            }
            Ok(entries)
        });
        let mapped = written.and_then(|entries| {
            let staged = segment
                .iter()
                .zip(&entries)
                .try_for_each(|(prep, es)| cat.stage_write(&prep.pending.volume, prep.first, es, prep.pending.staging));
            staged.and_then(|()| cat.commit_staged()).map_err(|e| {
                cat.rollback_staged();
                StoreError::Catalog(e)
            })
        });
        if let Err(e) = mapped {
            for prep in &segment {
                prep.pending.set(Err(replicate(&e)));
            }
            return;
        }
        self.unflushed.store(true, Ordering::SeqCst);
        for prep in &segment {
            self.metrics.written_bytes.inc_by(prep.pending.data.len() as u64);
            prep.pending.set(Ok(()));
        }
    }

    /// Every block's map entry: known zeros, slots rewritten in place, fresh slots allocated
    /// in the open transaction; with `(slot, write, block)` of the blocks to write in place and
    /// of those to write into fresh slots.
    fn allocate_segment(&self, cat: &mut Catalog, segment: &[Prepared]) -> Result<Allocated> {
        let (mut entries, in_place) = plan_in_place(cat, segment)?;
        let need = entries.iter().flatten().filter(|e| e.is_none()).count();
        // Writes admitted before the disk filled must not eat the metadata store's room.
        self.room_for(need as u64 * BLOCK_SIZE)?;
        let slots = cat.map_mut().alloc(need).inspect_err(|_| cat.map_mut().rollback())?;
        let fresh = fill_slots(segment, &mut entries, slots);
        Ok((entries, in_place, fresh))
    }

    /// Make mapped blocks in a block-aligned range of a clone read as zeros, freeing what
    /// only they held. Holes stay holes.
    pub fn zero(&self, volume: &str, offset: u64, len: u64) -> Result<()> {
        // A trim frees space, so it runs on a full disk too; only make sure the metadata
        // store keeps its room.
        self.keep_headroom();
        let mut cat = self.catalog_mut();
        if volume.contains('@') {
            let t = cat.target(volume)?;
            return Err(CatalogError::ReadOnly(t.name).into());
        }
        let v = cat.volume(volume)?;
        if v.replica_of.is_some() {
            return Err(CatalogError::Replica(v.name.clone()).into());
        }
        if v.kind != catalog::Kind::Clone {
            return Err(CatalogError::ReadOnly(v.name.clone()).into());
        }
        check_range(volume, v.size_bytes, offset, len)?;
        if !offset.is_multiple_of(BLOCK_SIZE) || !len.is_multiple_of(BLOCK_SIZE) {
            return Err(CatalogError::BadReference {
                reference: format!("{volume}+{offset}+{len}"),
                why: "zeroing needs a 4096-aligned offset and length".into(),
            }
            .into());
        }
        let r = cat.zero(volume, offset / BLOCK_SIZE, len / BLOCK_SIZE, false).map_err(StoreError::from);
        drop(cat);
        self.unflushed.store(true, Ordering::SeqCst);
        self.note_enospc(r)
    }

    /// Zero any byte range of a clone: whole blocks become known zeros (freeing what only
    /// they held), partial edge blocks are rewritten with zeros.
    pub fn zero_range(&self, volume: &str, offset: u64, len: u64) -> Result<()> {
        let end = offset.checked_add(len).ok_or_else(|| {
            StoreError::from(CatalogError::OutOfRange { volume: volume.into(), offset, length: len, size: 0 })
        })?;
        let a = offset.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        let b = end / BLOCK_SIZE * BLOCK_SIZE;
        if a >= b {
            return self.write(volume, offset, &vec![0u8; usize_of(len)]);
        }
        if offset < a {
            self.write(volume, offset, &vec![0u8; usize_of(a - offset)])?;
        }
        if b < end {
            self.write(volume, b, &vec![0u8; usize_of(end - b)])?;
        }
        self.zero(volume, a, b - a)
    }

    // ----- ingest ---------------------------------------------------------------------

    /// Write runs of whole blocks `(first block, data)` into a running ingest, committed
    /// together. Their crc32s were checked by the caller.
    pub fn ingest_data(&self, source: &str, runs: Vec<(u64, bytes::Bytes)>) -> Result<()> {
        if runs.is_empty() {
            return Ok(());
        }
        self.check_space()?;
        let ps = runs.into_iter().map(|(first, d)| Pending::new(source, first * BLOCK_SIZE, d, true)).collect();
        for r in self.submit_many(ps) {
            self.note_enospc(r)?;
        }
        Ok(())
    }

    /// Write whole blocks into a running ingest. `data` holds `count` blocks whose crc32s
    /// were checked by the caller; `None` marks blocks that became zero.
    pub fn ingest_blocks(&self, source: &str, first: u64, data: Option<&[u8]>, count: u64) -> Result<()> {
        match data {
            Some(d) => {
                self.check_space()?;
                let p = Pending::new(source, first * BLOCK_SIZE, bytes::Bytes::copy_from_slice(d), true);
                self.note_enospc(self.submit(p))
            }
            None => Ok(self.catalog_mut().zero(source, first, count, true)?),
        }
    }
}

/// Each write's map entries (see [`plan_in_place`]), and `(slot, write, block)` per block
/// written in place.
type Planned = (Vec<Vec<Option<Entry>>>, Vec<(u64, usize, usize)>);

/// [`Planned`] with the fresh slots' `(slot, write, block)` too.
type Allocated = (Vec<Vec<Option<Entry>>>, Vec<(u64, usize, usize)>, Vec<(u64, usize, usize)>);

/// Data a segment holds before it is committed and the write lock let go between segments:
/// bounds how long readers wait for rewrites in place and for planning.
const SEGMENT_BYTES: usize = 4 << 20;

/// The I/Os writing `(slot, write, block)` pairs: runs of consecutive slots holding
/// consecutive blocks of one write become one I/O.
fn segment_ios<'a>(segment: &'a [Prepared], pairs: &[(u64, usize, usize)]) -> Vec<(u64, &'a [u8])> {
    let mut pairs = pairs.to_vec();
    pairs.sort_unstable();
    pairs
        .chunk_by(|a, b| a.0 + 1 == b.0 && a.1 == b.1 && a.2 + 1 == b.2)
        .map(|r| {
            let (slot, w, i) = r[0];
            (slot_offset(slot), &segment[w].blocks[i * 4096..(i + r.len()) * 4096])
        })
        .collect()
}

/// The map entries of a segment's blocks: all-zero blocks become known zeros; blocks whose
/// slot only this tree has held since the last flush began are rewritten in place
/// (`BlockMap::rewritable`: no durable state points there, so this keeps every promise of a
/// fresh slot while the page cache keeps its pages); the rest are left `None` to get fresh
/// slots. Also returns `(slot, write, block)` for the blocks rewritten in place. A slot is
/// rewritten once per segment: a second write of the block in it takes a fresh slot, so no two
/// writes of one submission go to the same place.
fn plan_in_place(cat: &Catalog, segment: &[Prepared]) -> std::result::Result<Planned, catalog::BlockMapError> {
    let mut entries: Vec<Vec<Option<Entry>>> = Vec::with_capacity(segment.len());
    let mut pairs = Vec::new();
    let mut claimed = HashSet::new();
    for (w, prep) in segment.iter().enumerate() {
        let n = prep.blocks.len() as u64 / BLOCK_SIZE;
        let in_place = cat.map().rewritable(prep.root, prep.first, n)?;
        let mut es = Vec::with_capacity(in_place.len());
        for (i, (b, slot)) in prep.blocks.chunks_exact(4096).zip(in_place).enumerate() {
            es.push(if b.iter().all(|&x| x == 0) {
                Some(Entry::ZERO)
            } else if let Some(slot) = slot.filter(|s| claimed.insert(*s)) {
                pairs.push((slot, w, i));
                Some(entry(prep, slot, b))
            } else {
                None
            });
        }
        entries.push(es);
    }
    Ok((entries, pairs))
}

/// The map entry of block `b` of a write stored in `slot`, with its checksums. Only sources are
/// ever compared by digest (ingest): host writes to clones skip hashing it.
fn entry(prep: &Prepared, slot: u64, b: &[u8]) -> Entry {
    let digest = if prep.pending.staging { catalog::blockmap::block_digest(b) } else { 0 };
    Entry { slot, crc: catalog::blockmap::block_crc(b), digest }
}

/// Give each block still without an entry the next of `slots`, with its checksums; returns
/// `(slot, write, block)` for every block to write, in allocation order.
fn fill_slots(segment: &[Prepared], entries: &mut [Vec<Option<Entry>>], slots: Vec<u64>) -> Vec<(u64, usize, usize)> {
    let mut next = slots.into_iter();
    let mut pairs: Vec<(u64, usize, usize)> = Vec::with_capacity(next.len());
    for (w, (prep, es)) in segment.iter().zip(entries.iter_mut()).enumerate() {
        for (i, e) in es.iter_mut().enumerate() {
            if e.is_some() {
                continue;
            }
            let Some(slot) = next.next() else { break };
            *e = Some(entry(prep, slot, &prep.blocks[i * 4096..(i + 1) * 4096]));
            pairs.push((slot, w, i));
        }
    }
    pairs
}
