//! The read side: data reads, block status, a volume's extents and a source's digests.
//!
//! Invariants: every data block read is checked against its crc32 before any byte of it is
//! answered; a mismatch is [`StoreError::Checksum`] naming the volume and offset, counted, and
//! its slot registered as damaged (`scrub`), so the next ingest sends that block again.
//! Holes and known zeros read as zeros without touching the extent file.
//!
//! Locking: everything here holds the catalog's read lock through its data reads, so no slot
//! it planned to read can be freed and reused under it (the flush frees slots under the write
//! lock). [`Store::read_target`] is also the write path's read-modify-write, under the write
//! lock its caller holds.

use catalog::{Catalog, Entry, BLOCK_SIZE};

use super::{check_range, runs, slot_offset, usize_of, Result, Store, StoreError};

impl Store {
    /// Read `buf.len()` bytes at `offset` of a volume or snapshot. Any offset and length inside
    /// the volume is allowed.
    pub fn read(&self, reference: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cat = self.catalog();
        let t = cat.target(reference)?;
        self.read_target(&cat, &t.name, t.root, t.size_bytes, offset, buf)
    }

    /// Read `buf.len()` bytes at `offset` of the tree at `root` (named `name`, `size` bytes
    /// long) with the catalog lock the caller holds.
    pub(super) fn read_target(
        &self,
        cat: &Catalog,
        name: &str,
        root: catalog::NodeId,
        size: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let len = buf.len() as u64;
        check_range(name, size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let first = offset / BLOCK_SIZE;
        let last = (offset + len - 1) / BLOCK_SIZE;
        let entries = cat.map().lookup(root, first, last - first + 1)?;
        // Blocks are read whole (to check their crc) into a bounce buffer when the request
        // does not cover them exactly.
        let aligned = offset.is_multiple_of(BLOCK_SIZE) && len.is_multiple_of(BLOCK_SIZE);
        let mut bounce = if aligned { Vec::new() } else { vec![0u8; usize_of(entries.len() as u64 * BLOCK_SIZE)] };
        let whole: &mut [u8] = if aligned { buf } else { &mut bounce };
        self.read_blocks(&entries, whole)?;
        self.check_crcs(name, first, &entries, whole)?;
        if !aligned {
            let skip = usize_of(offset - first * BLOCK_SIZE);
            buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        }
        self.metrics.read_bytes.inc_by(len);
        Ok(())
    }

    /// Fill `whole` (one 4 KiB block per entry) with the blocks `entries` point at: zeros for
    /// holes and known zeros, the rest read from their slots in one submission.
    pub(super) fn read_blocks(&self, entries: &[Option<Entry>], whole: &mut [u8]) -> Result<()> {
        let mut pairs: Vec<(u64, usize)> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            match e {
                Some(e) if e.has_data() => pairs.push((e.slot, i)),
                _ => whole[i * 4096..(i + 1) * 4096].fill(0),
            }
        }
        pairs.sort_unstable();
        let mut rest: &mut [u8] = whole;
        let mut consumed = 0usize;
        let mut ios: Vec<(u64, &mut [u8])> = Vec::new();
        // Split the buffer into runs in block order (pairs sorted by slot, so we sort the
        // runs by block index to carve the buffer front to back).
        let mut rs: Vec<&[(u64, usize)]> = runs(&pairs).collect();
        rs.sort_unstable_by_key(|r| r[0].1);
        for r in rs {
            let start = r[0].1 * 4096;
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(start - consumed);
            let (this, tail) = tail.split_at_mut(r.len() * 4096);
            ios.push((slot_offset(r[0].0), this));
            rest = tail;
            consumed = start + r.len() * 4096;
        }
        self.engine.read_many(&mut ios)?;
        Ok(())
    }

    /// Check every data block in `whole` (block `first` onwards of `name`) against its crc32.
    pub(super) fn check_crcs(&self, name: &str, first: u64, entries: &[Option<Entry>], whole: &[u8]) -> Result<()> {
        for (i, e) in entries.iter().enumerate() {
            let Some(e) = e.filter(Entry::has_data) else { continue };
            if catalog::blockmap::block_crc(&whole[i * 4096..(i + 1) * 4096]) != e.crc {
                let at = (first + i as u64) * BLOCK_SIZE;
                self.metrics.checksum_errors.inc();
                self.note_damage(e.slot);
                tracing::error!(volume = name, offset = at, slot = e.slot, "checksum mismatch: block is damaged");
                return Err(StoreError::Checksum { volume: name.to_string(), offset: at });
            }
        }
        Ok(())
    }

    /// Allocation status of `len` bytes at `offset`, as consecutive `(length, state)` runs:
    /// `HOLE` for ranges never written in the lineage, `ZERO` for known zeros, 0 for data.
    /// Answers at most `limit` bytes (callers may ask for a whole disk).
    pub fn block_status(&self, reference: &str, offset: u64, len: u64, limit: u64) -> Result<Vec<(u64, BlockState)>> {
        let cat = self.catalog();
        let t = cat.target(reference)?;
        check_range(&t.name, t.size_bytes, offset, len)?;
        let end = offset + len.min(limit.max(BLOCK_SIZE));
        let mut out: Vec<(u64, BlockState)> = Vec::new();
        if end == offset {
            return Ok(out);
        }
        let first = offset / BLOCK_SIZE;
        let last = (end - 1) / BLOCK_SIZE;
        let entries = cat.map().lookup(t.root, first, last - first + 1)?;
        for (i, e) in entries.iter().enumerate() {
            let bstart = (first + i as u64) * BLOCK_SIZE;
            let lo = bstart.max(offset);
            let hi = (bstart + BLOCK_SIZE).min(end);
            let state = match e {
                None => BlockState::Hole,
                Some(e) if !e.has_data() => BlockState::Zero,
                Some(_) => BlockState::Data,
            };
            match out.last_mut() {
                Some((l, s)) if *s == state => *l += hi - lo,
                _ => out.push((hi - lo, state)),
            }
        }
        Ok(out)
    }

    /// `(block, digest)` of the data blocks of a source's latest contents within the block
    /// ranges `(first, count)` (sorted, disjoint), in block order. A block known damaged
    /// carries a poisoned digest, so the agent sends it again (see `scrub`).
    pub fn digests_in(&self, source: &str, ranges: &[(u64, u64)]) -> Result<Vec<(u64, u64)>> {
        let cat = self.catalog();
        let (root, size) = cat.ingest_base(source)?;
        let mut out = self.digest_list();
        for &(first, count) in ranges {
            check_range(source, size, first.saturating_mul(BLOCK_SIZE), count.saturating_mul(BLOCK_SIZE))?;
            for (i, e) in cat.map().lookup(root, first, count)?.into_iter().enumerate() {
                if let Some(e) = e.filter(Entry::has_data) {
                    out.push(first + i as u64, e);
                }
            }
        }
        self.finish_digests(source, out)
    }

    /// `(block, digest)` of every data block of a source's latest contents, in block order,
    /// poisoned for blocks known damaged as in [`Store::digests_in`].
    pub fn digests(&self, source: &str) -> Result<Vec<(u64, u64)>> {
        let cat = self.catalog();
        let (root, _) = cat.ingest_base(source)?;
        let mut out = self.digest_list();
        cat.map().for_each(root, &mut |b, e| {
            if e.has_data() {
                out.push(b, e);
            }
            Ok(())
        })?;
        self.finish_digests(source, out)
    }

    /// Byte ranges of a volume or snapshot that hold data, adjacent ones merged.
    pub fn extents(&self, reference: &str) -> Result<(u64, Vec<(u64, u64)>)> {
        let cat = self.catalog();
        let t = cat.target(reference)?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        cat.map().for_each(t.root, &mut |b, e| {
            if e.has_data() {
                let off = b * BLOCK_SIZE;
                match out.last_mut() {
                    Some((o, l)) if *o + *l == off => *l += BLOCK_SIZE,
                    _ => out.push((off, BLOCK_SIZE)),
                }
            }
            Ok(())
        })?;
        Ok((t.size_bytes, out))
    }
}

/// What a range of a volume holds, for block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Never written anywhere in the lineage (reads as zeros).
    Hole,
    /// Written or trimmed to zeros (reads as zeros, holds no data).
    Zero,
    /// Holds data.
    Data,
}
