//! What differs between two trees, and a digest of what one tree holds: the two questions
//! replication asks of the map.
//!
//! [`BlockMap::diff_range`] walks two trees side by side and never reads a subtree both hold
//! (the same node id): a snapshot and the one before it share every node a write did not
//! copy, so the walk costs what changed, not what the volume holds. Trees of different heights
//! (a source grown between two snapshots) are compared as if the lower root were the first
//! child of a chain of nodes up to the higher one's level, which is what it maps.
//!
//! [`BlockMap::content_digest`] is the wrapping sum, over every block that holds data other than
//! zeros, of a 128-bit hash of its index and crc32: two trees that map the same bytes to the
//! same blocks get the same digest, whichever slots hold them and whether a zero block is a
//! hole, a known-zero entry or stored zeros. Being a sum, it moves by what changed:
//! [`BlockMap::digest_change`] is what to add to one tree's digest to get another's, found by
//! the same walk as the difference, so a snapshot's digest costs what changed since one whose
//! digest is known (the whole tree is read only when none is).

use std::sync::OnceLock;

use crate::node::span;
use crate::{BlockMap, BlockMapError, Entry, Node, NodeId, Result, INNER_FANOUT, LEAF_FANOUT};

/// crc32 of a block of zeros: such a block is left out of digests, as if it were a hole.
fn zero_crc() -> u32 {
    static CRC: OnceLock<u32> = OnceLock::new();
    *CRC.get_or_init(|| crate::block_crc(&[0u8; 4096]))
}

/// A block's share of a digest: 0 for a block that reads as zeros.
fn entry_hash(block: u64, e: Option<Entry>) -> u128 {
    match e {
        Some(e) if e.has_data() && e.crc != zero_crc() => {
            let mut bytes = [0u8; 12];
            bytes[..8].copy_from_slice(&block.to_le_bytes());
            bytes[8..].copy_from_slice(&e.crc.to_le_bytes());
            xxhash_rust::xxh3::xxh3_128(&bytes)
        }
        _ => 0,
    }
}

/// The slot an entry's data lives in, `None` for a block that reads as zeros.
fn data_slot(e: Option<Entry>) -> Option<u64> {
    e.filter(Entry::has_data).map(|e| e.slot)
}

impl BlockMap {
    /// Call `f(block, old, new)`, in block order, for every block of `first..end` whose
    /// contents may differ between the trees at `old` and `new` (0 is the empty tree), with each
    /// tree's entry (`None` when the block reads as zeros there). Blocks held in the same slot
    /// by both are equal; a hole and a known-zero entry are equal. Read-only.
    pub fn diff_range(
        &self,
        old: NodeId,
        new: NodeId,
        first: u64,
        end: u64,
        f: &mut dyn FnMut(u64, Option<Entry>, Option<Entry>),
    ) -> Result<()> {
        let level = self.level_of(old)?.max(self.level_of(new)?);
        self.diff_node(old, new, level, 0, first, end, f)
    }

    /// The digest of the contents of the tree at `root`: see the module note. Reads every leaf.
    pub fn content_digest(&self, root: NodeId) -> Result<u128> {
        let mut sum = 0u128;
        self.for_each(root, &mut |b, e| {
            sum = sum.wrapping_add(entry_hash(b, Some(e)));
            Ok(())
        })?;
        Ok(sum)
    }

    /// What to add (wrapping) to the digest of the tree at `old` to get the digest of the tree at
    /// `new`: read where they differ only.
    pub fn digest_change(&self, old: NodeId, new: NodeId) -> Result<u128> {
        let mut change = 0u128;
        self.diff_range(old, new, 0, u64::MAX, &mut |b, o, n| {
            change = change.wrapping_add(entry_hash(b, n)).wrapping_sub(entry_hash(b, o));
        })?;
        Ok(change)
    }

    fn level_of(&self, id: NodeId) -> Result<u8> {
        if id == 0 {
            return Ok(0);
        }
        self.with_view(id, |v| Ok(v.level()))
    }

    /// The children of `id` seen as a node at `level` (>= 1): a lower node is the first child
    /// of a chain up to `level`.
    fn children_at(&self, id: NodeId, level: u8) -> Result<Vec<NodeId>> {
        let mut out = vec![0; INNER_FANOUT];
        if id == 0 {
            return Ok(out);
        }
        match self.load(id)? {
            Node::Inner { level: l, children } if l == level => Ok(children),
            n if n.level() < level => {
                out[0] = id;
                Ok(out)
            }
            _ => Err(BlockMapError::Corrupt { what: format!("node {id}"), why: "above its parent's level" }),
        }
    }

    fn entries_at(&self, id: NodeId) -> Result<Vec<Option<Entry>>> {
        if id == 0 {
            return Ok(vec![None; LEAF_FANOUT]);
        }
        match self.load(id)? {
            Node::Leaf(entries) => Ok(entries),
            Node::Inner { .. } => {
                Err(BlockMapError::Corrupt { what: format!("node {id}"), why: "inner node at leaf level" })
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn diff_node(
        &self,
        old: NodeId,
        new: NodeId,
        level: u8,
        base: u64,
        first: u64,
        end: u64,
        f: &mut dyn FnMut(u64, Option<Entry>, Option<Entry>),
    ) -> Result<()> {
        let covers = crate::node::capacity(level);
        if old == new || base >= end || base.saturating_add(covers) <= first {
            return Ok(());
        }
        if level == 0 {
            let (a, b) = (self.entries_at(old)?, self.entries_at(new)?);
            for (i, (x, y)) in a.into_iter().zip(b).enumerate() {
                let block = base + i as u64;
                if block >= first && block < end && data_slot(x) != data_slot(y) {
                    f(block, x.filter(Entry::has_data), y.filter(Entry::has_data));
                }
            }
            return Ok(());
        }
        let (a, b) = (self.children_at(old, level)?, self.children_at(new, level)?);
        let sp = span(level);
        for (i, (x, y)) in a.into_iter().zip(b).enumerate() {
            self.diff_node(x, y, level - 1, base + i as u64 * sp, first, end, f)?;
        }
        Ok(())
    }
}
