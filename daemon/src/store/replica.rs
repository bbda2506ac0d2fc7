//! Replication's store calls. The source side asks which blocks differ between two snapshots
//! (a walk that skips shared nodes, one bounded range per hold of the read lock) and reads
//! them; the target side writes an incoming snapshot's frames into its staging tree, records
//! how far it got after each one, and makes it a snapshot once the digests agree
//! (`catalog/src/replica.rs`).

use catalog::{CatalogError, IncomingHeader, NodeId, ReplicaOf, SnapshotId};

use super::{Result, Store};

/// One run of blocks that differ: data to send, or blocks that read as zeros now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Changed {
    /// First block.
    pub first: u64,
    /// Number of blocks.
    pub count: u64,
    /// True for data, false for blocks that became zeros.
    pub data: bool,
}

impl Store {
    /// The root of snapshot `id` and its size in blocks, under the lock the caller holds.
    fn snapshot_root(cat: &catalog::Catalog, id: &SnapshotId) -> Result<(NodeId, u64)> {
        let v = cat.volume(&id.volume)?;
        let s = v.snapshots.iter().find(|s| s.id == id.id).ok_or_else(|| {
            CatalogError::UnknownSnapshot(format!("{id} (it was deleted while it was being replicated)"))
        })?;
        Ok((s.root, s.size_bytes / catalog::BLOCK_SIZE))
    }

    /// Runs of blocks of `from..to` that differ between snapshot `base` (none: the empty
    /// volume) and snapshot `snap`, in block order, runs at most `max_run` blocks long.
    /// Both snapshots are looked up again under the same hold of the lock as the walk, so a
    /// snapshot deleted meanwhile is an error, never a walk of freed nodes.
    pub fn changed_runs(
        &self,
        base: Option<&SnapshotId>,
        snap: &SnapshotId,
        from: u64,
        to: u64,
        max_run: u64,
    ) -> Result<Vec<Changed>> {
        let cat = self.catalog();
        let (new, nblocks) = Self::snapshot_root(&cat, snap)?;
        let old = base.map(|b| Self::snapshot_root(&cat, b)).transpose()?.map_or(0, |(r, _)| r);
        let mut runs: Vec<Changed> = Vec::new();
        cat.map().diff_range(old, new, from, to.min(nblocks), &mut |b, _, e| {
            let data = e.is_some();
            match runs.last_mut() {
                Some(r) if r.data == data && r.first + r.count == b && r.count < max_run => r.count += 1,
                _ => runs.push(Changed { first: b, count: 1, data }),
            }
        })?;
        Ok(runs)
    }

    /// The blocks of `runs` (`(first, count)`) of snapshot `snap`, one after the other in one
    /// buffer, read in one submission and checked against their crc32s.
    pub fn read_runs(&self, snap: &SnapshotId, runs: &[(u64, u64)]) -> Result<Vec<u8>> {
        let cat = self.catalog();
        let (root, nblocks) = Self::snapshot_root(&cat, snap)?;
        let mut entries = Vec::new();
        for &(first, count) in runs {
            if first.checked_add(count).is_none_or(|end| end > nblocks) {
                let (offset, length) = (first * catalog::BLOCK_SIZE, count * catalog::BLOCK_SIZE);
                let size = nblocks * catalog::BLOCK_SIZE;
                return Err(CatalogError::OutOfRange { volume: snap.to_string(), offset, length, size }.into());
            }
            entries.extend(cat.map().lookup(root, first, count)?);
        }
        let mut buf = vec![0u8; entries.len() * 4096];
        self.read_blocks(&entries, &mut buf)?;
        let mut at = 0usize;
        for &(first, count) in runs {
            let n = usize::try_from(count).unwrap_or(usize::MAX);
            self.check_crcs(&snap.to_string(), first, &entries[at..at + n], &buf[at * 4096..(at + n) * 4096])?;
            at += n;
        }
        Ok(buf)
    }

    /// The content digest of snapshot `snap`, as the target computes it: from `base`'s digest
    /// (`known`, else the one the base snapshot keeps) and what changed since, reading where the
    /// trees differ only; the whole tree is read when no base digest is known.
    pub fn snapshot_digest(&self, snap: &SnapshotId, base: Option<&SnapshotId>, known: Option<u128>) -> Result<u128> {
        let cat = self.catalog();
        let (root, _) = Self::snapshot_root(&cat, snap)?;
        let from = base.and_then(|b| {
            let s = cat.volume(&b.volume).ok()?.snapshots.iter().find(|s| s.id == b.id)?;
            Some((s.root, known.or_else(|| s.digest_value())?))
        });
        Ok(match from {
            Some((base_root, d)) => d.wrapping_add(cat.map().digest_change(base_root, root)?),
            None => cat.map().content_digest(root)?,
        })
    }

    /// Start or resume receiving a snapshot into `name`; the first block to send.
    pub fn begin_incoming(&self, name: &str, header: &IncomingHeader) -> Result<u64> {
        self.check_pool("replication")?;
        self.op(|cat| cat.begin_incoming(name, header))
    }

    /// Write a batch of received frames into `name`'s incoming snapshot (`data`: runs of
    /// checked blocks; `zeros`: `(first, count)` runs that read as zeros now), as one group
    /// commit, and record that every block below `end` arrived.
    pub fn incoming_batch(
        &self,
        name: &str,
        data: Vec<(u64, bytes::Bytes)>,
        zeros: &[(u64, u64)],
        end: u64,
    ) -> Result<()> {
        self.ingest_data(name, data)?;
        let mut cat = self.catalog_mut();
        for &(first, count) in zeros {
            cat.zero(name, first, count, true)?;
        }
        cat.incoming_progress(name, end)?;
        self.unflushed.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// The incoming snapshot of `name` is complete: check its digest, make it a snapshot
    /// (durable when this returns).
    pub fn finish_incoming(&self, name: &str) -> Result<SnapshotId> {
        self.op(|cat| cat.finish_incoming(name))
    }

    /// Make replica `name` writable here.
    pub fn promote(&self, name: &str) -> Result<ReplicaOf> {
        self.op(|cat| cat.promote(name))
    }
}
