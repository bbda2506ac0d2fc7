//! Quotas on the write path: a write that would take a clone past its quota on unique bytes
//! fails for that clone alone (NBD ENOSPC, SCSI SPACE ALLOCATION FAILED, HTTP 507), before
//! anything is allocated; trims and writes that add nothing always pass.
//!
//! What a write adds is counted before it is committed: one block per non-zero block written,
//! less the blocks of its range that only the clone's head holds (an overwrite frees them).
//! Writes admitted earlier in the same group commit count too. The count never comes out below
//! what the commit then takes (a block written twice in one group commit counts twice), so a
//! clone never passes its quota; the catalog keeps the exact figure after each commit
//! (`catalog::quota`). Clones without a quota cost one map lookup per write.

use std::collections::HashMap;

use catalog::{Catalog, NodeId, BLOCK_SIZE};

use super::{usize_of, Result};

/// Unique blocks added by writes admitted in the open group commit, by clone.
#[derive(Debug, Default)]
pub(super) struct Admitted(HashMap<String, u64>);

impl Admitted {
    /// Forget what was admitted: the group commit it belonged to was committed.
    pub(super) fn clear(&mut self) {
        self.0.clear();
    }

    /// Admit a write of whole `blocks` from block `first` into `volume`'s head at `root`, or
    /// refuse it if it would take the clone past its quota.
    pub(super) fn admit(&mut self, cat: &Catalog, volume: &str, root: NodeId, first: u64, blocks: &[u8]) -> Result<()> {
        let Some(quota) = cat.quota_use(volume)? else { return Ok(()) };
        let data = blocks.chunks_exact(usize_of(BLOCK_SIZE)).filter(|b| b.iter().any(|&x| x != 0)).count() as u64;
        let earlier = self.0.get(volume).copied().unwrap_or(0);
        let adds = if quota.admits(earlier + data) {
            data
        } else {
            // Close to the limit: what the write frees in its own range counts against it.
            let count = blocks.len() as u64 / BLOCK_SIZE;
            data.saturating_sub(cat.map().exclusive_blocks(root, first, count)?)
        };
        quota.check(volume, earlier + adds)?;
        self.0.insert(volume.to_string(), earlier + adds);
        Ok(())
    }
}
