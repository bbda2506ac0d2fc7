//! Pointer-tree nodes and their on-disk encoding.
//!
//! A volume's contents are a tree of nodes. Leaves (level 0) hold up to [`LEAF_FANOUT`] block
//! entries; internal nodes (level >= 1) hold up to [`INNER_FANOUT`] child node ids. Both are
//! stored sparsely: only present entries are encoded, so a thin volume costs little.
//!
//! Encoding (all integers little-endian):
//! - leaf: `0u8`, count `u16`, flags `u8` (bit 0: entries carry digests), then per entry
//!   `idx u8, slot u40, crc u32` and, with bit 0, `digest u64` (10 or 18 bytes an entry);
//! - inner: `level u8`, count `u16`, then per child `idx u8, node u64`.
//!
//! Only sources' leaves need digests (ingest compares them); clones' leaves drop them.

use crate::BlockMapError;

/// Entries per leaf: a leaf maps 64 blocks (256 KiB). Small leaves keep the cost of the first
/// write into a shared leaf (copying it and taking a reference on each of its blocks) low.
pub const LEAF_FANOUT: usize = 64;
/// Children per inner node.
pub const INNER_FANOUT: usize = 256;

/// Node ids are allocated from 1; 0 is the empty tree.
pub type NodeId = u64;

/// One mapped block: where its bytes live and what they hash to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// 1-based slot in the extent file; [`ZERO_SLOT`] marks a block known to read as zeros.
    pub slot: u64,
    /// crc32 of the 4 KiB block, checked on every read.
    pub crc: u32,
    /// 64-bit content digest (xxh3), used by ingest to find changed blocks.
    pub digest: u64,
}

/// The slot value of an entry that is known to read as zeros (trimmed or zero-written).
pub const ZERO_SLOT: u64 = 0;

/// Slots are stored in 40 bits: 2^40 slots of 4 KiB is 4 PiB of data.
pub const MAX_SLOT: u64 = (1 << 40) - 1;

/// Bytes of one stored leaf entry.
fn leaf_record(digests: bool) -> usize {
    if digests {
        18
    } else {
        10
    }
}

impl Entry {
    /// A "known zero" entry: written (or trimmed) to zeros, holds no data.
    pub const ZERO: Entry = Entry { slot: ZERO_SLOT, crc: 0, digest: 0 };

    /// True when the entry holds data in the extent file.
    pub fn has_data(&self) -> bool {
        self.slot != ZERO_SLOT
    }
}

/// A decoded node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    /// Level 0: block entries.
    Leaf(Vec<Option<Entry>>),
    /// Level >= 1: child node ids (0 = empty subtree).
    Inner { level: u8, children: Vec<NodeId> },
}

impl Node {
    /// An empty node at `level`.
    pub fn empty(level: u8) -> Node {
        if level == 0 {
            Node::Leaf(vec![None; LEAF_FANOUT])
        } else {
            Node::Inner { level, children: vec![0; INNER_FANOUT] }
        }
    }

    /// This node's level (0 for leaves).
    pub fn level(&self) -> u8 {
        match self {
            Node::Leaf(_) => 0,
            Node::Inner { level, .. } => *level,
        }
    }

    /// Serialize sparsely.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Node::Leaf(entries) => {
                let present: Vec<(usize, &Entry)> =
                    entries.iter().enumerate().filter_map(|(i, e)| e.as_ref().map(|e| (i, e))).collect();
                let digests = present.iter().any(|(_, e)| e.digest != 0);
                let mut out = Vec::with_capacity(4 + present.len() * leaf_record(digests));
                out.push(0);
                out.extend_from_slice(&u16::try_from(present.len()).unwrap_or(u16::MAX).to_le_bytes());
                out.push(u8::from(digests));
                for (i, e) in present {
                    out.push(u8::try_from(i).unwrap_or(u8::MAX));
                    out.extend_from_slice(&e.slot.to_le_bytes()[..5]);
                    out.extend_from_slice(&e.crc.to_le_bytes());
                    if digests {
                        out.extend_from_slice(&e.digest.to_le_bytes());
                    }
                }
                out
            }
            Node::Inner { level, children } => {
                let present: Vec<(usize, NodeId)> =
                    children.iter().copied().enumerate().filter(|(_, c)| *c != 0).collect();
                let mut out = Vec::with_capacity(3 + present.len() * 9);
                out.push(*level);
                out.extend_from_slice(&u16::try_from(present.len()).unwrap_or(u16::MAX).to_le_bytes());
                for (i, c) in present {
                    out.push(u8::try_from(i).unwrap_or(u8::MAX));
                    out.extend_from_slice(&c.to_le_bytes());
                }
                out
            }
        }
    }

    /// Parse a stored node; any inconsistency is reported as corruption of node `id`.
    pub fn decode(id: NodeId, bytes: &[u8]) -> Result<Node, BlockMapError> {
        let bad = |why: &'static str| BlockMapError::Corrupt { what: format!("node {id}"), why };
        if bytes.len() < 3 {
            return Err(bad("shorter than its header"));
        }
        let level = bytes[0];
        let count = usize::from(u16::from_le_bytes([bytes[1], bytes[2]]));
        let body = &bytes[3..];
        if level == 0 {
            let view = View::raw(id, bytes)?;
            let mut entries = vec![None; LEAF_FANOUT];
            view.for_entries(|i, e| entries[i] = Some(e));
            Ok(Node::Leaf(entries))
        } else {
            if count > INNER_FANOUT || body.len() != count * 9 {
                return Err(bad("inner node length does not match its child count"));
            }
            let mut children = vec![0; INNER_FANOUT];
            for rec in body.chunks_exact(9) {
                let child = u64::from_le_bytes(rec[1..9].try_into().map_err(|_| bad("child"))?);
                children[usize::from(rec[0])] = child;
            }
            Ok(Node::Inner { level, children })
        }
    }
}

/// Blocks covered by one child slot of a node at `level` (1 for a leaf's entries).
pub(crate) fn span(level: u8) -> u64 {
    if level == 0 {
        1
    } else {
        LEAF_FANOUT as u64 * (INNER_FANOUT as u64).pow(u32::from(level) - 1)
    }
}

/// Blocks addressable by a tree whose root is at `level`.
pub fn capacity(level: u8) -> u64 {
    let fan = if level == 0 { LEAF_FANOUT } else { INNER_FANOUT };
    span(level).saturating_mul(fan as u64)
}

/// The root level a volume of `nblocks` blocks needs.
pub fn height_for(nblocks: u64) -> u8 {
    let mut level = 0;
    while capacity(level) < nblocks {
        level += 1;
    }
    level
}

/// Index of block `b` within a node at `level`.
pub(crate) fn child_index(level: u8, b: u64) -> usize {
    let fan = if level == 0 { LEAF_FANOUT } else { INNER_FANOUT } as u64;
    usize::try_from((b / span(level)) % fan).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let mut leaf = Node::empty(0);
        if let Node::Leaf(e) = &mut leaf {
            e[3] = Some(Entry { slot: 7, crc: 9, digest: 11 });
            e[63] = Some(Entry::ZERO);
        }
        assert_eq!(Node::decode(1, &leaf.encode()).unwrap(), leaf);
        let mut inner = Node::empty(2);
        if let Node::Inner { children, .. } = &mut inner {
            children[0] = 5;
            children[255] = 6;
        }
        assert_eq!(Node::decode(1, &inner.encode()).unwrap(), inner);
        assert!(Node::decode(1, &[0, 1, 0]).is_err());
        assert!(Node::decode(1, &[]).is_err());
    }

    #[test]
    fn heights() {
        assert_eq!(height_for(1), 0);
        assert_eq!(height_for(64), 0);
        assert_eq!(height_for(65), 1);
        assert_eq!(height_for(1 << 18), 2); // 1 GiB
        assert_eq!(height_for(1 << 28), 3); // 1 TiB
        assert_eq!(child_index(1, 64), 1);
        assert_eq!(child_index(0, 65), 1);
    }
}

/// A node read in place: either decoded (changed in the open transaction) or its stored
/// bytes, parsed lazily so that a lookup allocates nothing.
#[derive(Debug, Clone, Copy)]
pub(crate) enum View<'a> {
    Decoded(&'a Node),
    Raw(&'a [u8]),
}

impl<'a> View<'a> {
    /// Check a stored node's framing once, so the accessors below can trust it.
    pub(crate) fn raw(id: NodeId, bytes: &'a [u8]) -> Result<View<'a>, BlockMapError> {
        let bad = |why: &'static str| BlockMapError::Corrupt { what: format!("node {id}"), why };
        if bytes.len() < 3 || (bytes[0] == 0 && bytes.len() < 4) {
            return Err(bad("shorter than its header"));
        }
        let count = usize::from(u16::from_le_bytes([bytes[1], bytes[2]]));
        let (head, rec, fan) = if bytes[0] == 0 {
            if bytes[3] > 1 {
                return Err(bad("unknown leaf flags"));
            }
            (4, leaf_record(bytes[3] == 1), LEAF_FANOUT)
        } else {
            (3, 9, INNER_FANOUT)
        };
        if count > fan || bytes.len() != head + count * rec {
            return Err(bad("length does not match its entry count"));
        }
        if bytes[head..].chunks_exact(rec).any(|r| usize::from(r[0]) >= fan) {
            return Err(bad("entry index out of range"));
        }
        Ok(View::Raw(bytes))
    }

    pub(crate) fn level(&self) -> u8 {
        match self {
            View::Decoded(n) => n.level(),
            View::Raw(b) => b[0],
        }
    }

    /// The child at `idx` of an inner node (0 if none, or if this is a leaf).
    pub(crate) fn child(&self, idx: usize) -> NodeId {
        match self {
            View::Decoded(Node::Inner { children, .. }) => children.get(idx).copied().unwrap_or(0),
            View::Decoded(Node::Leaf(_)) => 0,
            View::Raw(b) if b[0] == 0 => 0,
            View::Raw(b) => b[3..]
                .chunks_exact(9)
                .find(|r| usize::from(r[0]) == idx)
                .map_or(0, |r| u64::from_le_bytes([r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]])),
        }
    }

    /// Present children `(idx, id)` of an inner node, in index order.
    pub(crate) fn for_children(&self, mut f: impl FnMut(usize, NodeId)) {
        match self {
            View::Decoded(Node::Inner { children, .. }) => {
                children.iter().enumerate().filter(|(_, &c)| c != 0).for_each(|(i, &c)| f(i, c));
            }
            View::Decoded(Node::Leaf(_)) => {}
            View::Raw(b) if b[0] == 0 => {}
            View::Raw(b) => b[3..].chunks_exact(9).for_each(|r| {
                f(usize::from(r[0]), u64::from_le_bytes([r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]]));
            }),
        }
    }

    /// Present entries `(idx, entry)` of a leaf, in index order.
    pub(crate) fn for_entries(&self, mut f: impl FnMut(usize, Entry)) {
        match self {
            View::Decoded(Node::Leaf(entries)) => {
                entries.iter().enumerate().for_each(|(i, e)| {
                    if let Some(e) = e {
                        f(i, *e);
                    }
                });
            }
            View::Decoded(Node::Inner { .. }) => {}
            View::Raw(b) if b[0] != 0 => {}
            View::Raw(b) => {
                let digests = b[3] == 1;
                b[4..].chunks_exact(leaf_record(digests)).for_each(|r| {
                    let slot = u64::from_le_bytes([r[1], r[2], r[3], r[4], r[5], 0, 0, 0]);
                    let crc = u32::from_le_bytes([r[6], r[7], r[8], r[9]]);
                    let digest = if digests {
                        u64::from_le_bytes([r[10], r[11], r[12], r[13], r[14], r[15], r[16], r[17]])
                    } else {
                        0
                    };
                    f(usize::from(r[0]), Entry { slot, crc, digest });
                });
            }
        }
    }
}
