//! forkd's extent map: every volume and snapshot is the root of a copy-on-write pointer tree
//! stored in a metadata engine (`metakv`), whose leaves point at 4 KiB slots in an extent file.
//!
//! Why a shared tree: a snapshot or a clone takes one reference on an existing root, so it costs
//! the same for 1 GiB and 1 TiB; a read walks root-to-leaf (3 levels for 1 GiB, 4 for 1 TiB)
//! whatever the clone depth, because a clone's tree already holds every pointer it inherited.
//! The first write through a shared node copies that one node (at most 256 child ids or 64
//! block entries) and takes a reference on each of its children; block data is never copied,
//! so a 4 KiB write to an inherited block writes 4 KiB of data.
//!
//! Ownership and invariants:
//! - node refcounts (`r` keys) are stored only when above 1; slot refcounts are stored as
//!   extra references per group of 64 slots (`s` keys, absent when all are 0), so copying a
//!   leaf updates one or two keys; a reachable node or slot without a count has one reference;
//! - a slot is in the free list (`f` keys: one 64-bit map per group of 64 slots) exactly when
//!   nothing references it; a slot freed by
//!   a commit becomes reusable only after the next flush made that commit durable and its
//!   bytes were punched out, so a durable pointer never sees another write's data;
//! - unreachable subtrees wait in the garbage queue (`g` keys) and are dismantled in small
//!   atomic steps, so a crash mid-delete neither leaks nor double-frees; the owner runs the
//!   steps one at a time ([`BlockMap::collect_garbage_step`], in `gc`), so a large delete never
//!   holds its lock for long.
//!
//! Transactions and write-back: mutations take `&mut self` and accumulate in a transaction
//! overlay; [`BlockMap::commit`] moves them, atomically, into an in-memory write-back layer,
//! and [`BlockMap::spill`] hands that layer to the engine as one batch (at every flush, and
//! whenever it grows past a cap). Durability is only ever promised at a flush, so this changes
//! nothing that is promised, while a leaf rewritten a thousand times between two flushes
//! reaches the engine once: its log, and with it its space use, grows with distinct changes,
//! not with I/Os. A flush freezes the layer it makes durable ([`BlockMap::begin_flush`]); commits
//! made meanwhile wait in a newer layer, and nothing reaches the engine until that flush's
//! durable commit is done. Reads see the transaction, then the write-back layer, then the
//! frozen layer, then a read cache of the engine's values, then the engine.
//!
//! Rewrites in place: a slot allocated since the last flush began and held by one tree alone
//! may be rewritten with new contents ([`BlockMap::rewritable`]); no durable state points at it.
//!
//! Locking: `BlockMap` is not internally synchronised. The owner serialises writers and keeps
//! readers out while a writer is between calls.
//! The map does no data I/O: it answers with slots, and the caller reads and writes them.

#![forbid(unsafe_code)]

mod diff;
mod gc;
mod node;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

pub use gc::GcStep;
pub use metakv::{KvError, MetaKv};

pub use node::{capacity, height_for, Entry, Node, NodeId, INNER_FANOUT, LEAF_FANOUT, MAX_SLOT, ZERO_SLOT};
use node::{child_index, span, View};

/// Size of a block, the unit of mapping, checksumming and allocation.
pub const BLOCK_SIZE: u64 = 4096;

/// Errors of the extent map.
#[derive(Debug, thiserror::Error)]
pub enum BlockMapError {
    /// The metadata store failed.
    #[error("metadata store: {0}")]
    Store(#[from] KvError),
    /// Stored metadata is not what forkd writes.
    #[error("corrupt metadata in {what}: {why}")]
    Corrupt {
        /// The damaged record.
        what: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A block index beyond what the tree can address.
    #[error("block {block} is beyond the end of the volume ({nblocks} blocks)")]
    OutOfRange {
        /// The block asked for.
        block: u64,
        /// The volume's size in blocks.
        nblocks: u64,
    },
}

type Result<T> = std::result::Result<T, BlockMapError>;

const P_NODE: u8 = b'n';
const P_NODE_RC: u8 = b'r';
const P_SLOT_RC: u8 = b's';
const P_FREE: u8 = b'f';
const P_GARBAGE: u8 = b'g';
const K_HIGH_WATER: &[u8] = b"m:high_water";
const K_NEXT_NODE: &[u8] = b"m:next_node";
/// Committed changes (nodes plus keys) held in memory before they are handed to the engine anyway:
/// about 32 MiB of decoded nodes.
const WRITE_BACK_LIMIT: usize = 16_384;
/// Slots whose refcounts and free bits share one key.
const SLOT_GROUP_LEN: usize = 64;
const SLOT_GROUP: u64 = SLOT_GROUP_LEN as u64;
/// Prefix reserved for the catalog's records, which share the map's atomic batches.
pub const P_CATALOG: u8 = b'c';

fn key(prefix: u8, id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn id_of(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.get(1..9)?.try_into().ok()?))
}

fn decode_u64(what: &str, v: &[u8]) -> Result<u64> {
    v.try_into()
        .map(u64::from_le_bytes)
        .map_err(|_| BlockMapError::Corrupt { what: what.to_string(), why: "not an 8-byte counter" })
}

/// Counters for the metrics endpoint and the architecture notes.
#[derive(Clone, Copy, Debug, Default)]
pub struct MapStats {
    /// Slots handed out so far (the extent file's length in blocks).
    pub high_water: u64,
    /// Slots free for reuse now.
    pub free_slots: u64,
    /// Slots freed but waiting for a flush before reuse.
    pub pending_free: u64,
    /// Tree nodes dismantled by garbage collection since the map was opened (metadata the
    /// engine may now give back).
    pub freed_nodes: u64,
}

/// The extent map. See the module documentation for its invariants.
#[derive(Debug)]
pub struct BlockMap {
    kv: Arc<dyn MetaKv>,
    /// Decoded nodes changed in the open transaction (`None`: deleted).
    dirty: HashMap<NodeId, Option<Node>>,
    /// Committed node changes not yet handed to the engine.
    wb_nodes: HashMap<NodeId, Option<Node>>,
    /// Committed key changes not yet handed to the engine.
    wb_keys: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// The write-back layer as it was when the running flush began (see [`BlockMap::begin_flush`]):
    /// what that flush makes durable, and nothing committed after it.
    frozen_nodes: HashMap<NodeId, Option<Node>>,
    /// Key changes of the frozen layer.
    frozen_keys: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Set from [`BlockMap::begin_flush`] to [`BlockMap::end_flush`]: nothing but the frozen layer
    /// may reach the engine then, or the flush's durable commit would take it along.
    flushing: bool,
    /// Slots allocated by commits since the last flush began: no durable state and no flush in
    /// progress references them, so their bytes may be rewritten in place (see
    /// [`BlockMap::rewritable`]).
    fresh: std::collections::HashSet<u64>,
    /// Blocks of the open transaction rewritten in place (same slot, new contents).
    txn_rewritten: usize,
    /// Other keys changed in the open transaction (`None`: removed).
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Slots nothing references that may be handed out now.
    free: BTreeSet<u64>,
    /// Next never-used slot.
    high_water: u64,
    next_node: NodeId,
    /// Slots taken by the open transaction, and where from (true: the free list).
    txn_allocated: Vec<(u64, bool)>,
    /// Slots freed by the open transaction.
    txn_freed: Vec<u64>,
    /// Nodes known to have exactly one reference in the open transaction (created or already
    /// copied by it), so repeated walks skip their refcount lookups.
    txn_private: std::collections::HashSet<NodeId>,
    /// Allocation state at the start of the open transaction, for rollback.
    txn_start: (u64, NodeId),
    /// Flush generation; frees committed in generation g are released by a flush that began
    /// after g ended.
    generation: u64,
    pending: Vec<(u64, u64)>,
    /// Nodes dismantled since open (see [`MapStats::freed_nodes`]).
    freed_nodes: u64,
    /// What the engine holds for recently used keys, absent ones too (see [`ReadCache`]).
    cache: ReadCache,
    /// The garbage collector's list of queued nodes (`gc`).
    gc: gc::Collector,
}

/// Engine values (nodes, refcounts, free bits) as last read from or handed to the engine, and
/// keys known to be absent: a hot leaf or refcount costs a hash lookup instead of one of the
/// engine's read transactions. Kept exact by [`BlockMap::apply`], the only way this map changes
/// the engine's keys; bounded by bytes, least recently used first out.
type ReadCache = quick_cache::sync::Cache<Vec<u8>, Option<Arc<[u8]>>, CacheWeight>;

/// About 64 MiB of cached values.
const READ_CACHE_BYTES: u64 = 64 << 20;

/// A cached value's weight: its bytes plus a fixed overhead per entry.
#[derive(Clone, Copy, Debug)]
struct CacheWeight;

impl quick_cache::Weighter<Vec<u8>, Option<Arc<[u8]>>> for CacheWeight {
    fn weight(&self, k: &Vec<u8>, v: &Option<Arc<[u8]>>) -> u64 {
        (k.len() + v.as_ref().map_or(0, |v| v.len()) + 64) as u64
    }
}

impl BlockMap {
    /// Open the map stored in `kv`. Slots on the free list are returned by the first
    /// [`BlockMap::take_released`] so the caller can punch them (again) before reuse.
    pub fn open(kv: Arc<dyn MetaKv>) -> Result<BlockMap> {
        let high_water = match kv.get(K_HIGH_WATER)? {
            Some(v) => decode_u64("high water mark", &v)?,
            None => 1,
        };
        let next_node = match kv.get(K_NEXT_NODE)? {
            Some(v) => decode_u64("node counter", &v)?,
            None => 1,
        };
        let mut pending = Vec::new();
        for (k, v) in metakv::collect_prefix(kv.as_ref(), &[P_FREE])? {
            let bad = |why| BlockMapError::Corrupt { what: "free list".into(), why };
            let group = id_of(&k).ok_or(bad("short key"))?;
            let bits = decode_u64("free list", &v)?;
            for i in (0..SLOT_GROUP).filter(|i| bits & (1 << i) != 0) {
                let slot = group * SLOT_GROUP + i;
                if slot == 0 || slot >= high_water {
                    return Err(bad("a free slot outside the extent file"));
                }
                pending.push((0, slot));
            }
        }
        Ok(BlockMap {
            kv,
            dirty: HashMap::new(),
            wb_nodes: HashMap::new(),
            wb_keys: BTreeMap::new(),
            frozen_nodes: HashMap::new(),
            frozen_keys: BTreeMap::new(),
            flushing: false,
            fresh: Default::default(),
            txn_rewritten: 0,
            overlay: BTreeMap::new(),
            free: BTreeSet::new(),
            high_water,
            next_node,
            txn_allocated: Vec::new(),
            txn_freed: Vec::new(),
            txn_private: Default::default(),
            txn_start: (high_water, next_node),
            generation: 1,
            pending,
            freed_nodes: 0,
            cache: ReadCache::with_weighter(1 << 16, READ_CACHE_BYTES, CacheWeight),
            gc: gc::Collector::default(),
        })
    }

    // ----- raw key access through the overlay -------------------------------------------

    fn get_raw(&self, k: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.overlay.get(k).or_else(|| self.wb_keys.get(k)).or_else(|| self.frozen_keys.get(k)) {
            return Ok(v.clone());
        }
        Ok(self.kv_get(k)?.map(|v| v.to_vec()))
    }

    /// A key as the engine holds it, through the read cache.
    fn kv_get(&self, k: &[u8]) -> Result<Option<Arc<[u8]>>> {
        if let Some(v) = self.cache.get(k) {
            return Ok(v);
        }
        let v: Option<Arc<[u8]>> = self.kv.get(k)?.map(Arc::from);
        self.cache.insert(k.to_vec(), v.clone());
        Ok(v)
    }

    /// Hand a batch to the engine and keep the read cache exact.
    fn apply(&self, batch: &metakv::Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.kv.apply(batch) {
            // What the engine holds now is unknown: forget everything cached.
            self.cache.clear();
            return Err(e.into());
        }
        for (k, v) in batch.ops() {
            self.cache.insert(k.clone(), v.as_deref().map(Arc::from));
        }
        Ok(())
    }

    fn put_raw(&mut self, k: &[u8], v: Vec<u8>) {
        self.overlay.insert(k.to_vec(), Some(v));
    }

    fn del_raw(&mut self, k: &[u8]) {
        self.overlay.insert(k.to_vec(), None);
    }

    /// Read a catalog record (key must start with [`P_CATALOG`]).
    pub fn get_meta(&self, k: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get_raw(k)
    }

    /// Write a catalog record in the open transaction.
    pub fn put_meta(&mut self, k: &[u8], v: Vec<u8>) {
        debug_assert_eq!(k.first(), Some(&P_CATALOG));
        self.put_raw(k, v);
    }

    /// Remove a catalog record in the open transaction.
    pub fn remove_meta(&mut self, k: &[u8]) {
        debug_assert_eq!(k.first(), Some(&P_CATALOG));
        self.del_raw(k);
    }

    /// Catalog records under `prefix` as the engine holds them (neither the open transaction
    /// nor the write-back layer is consulted: call at start-up, before any change).
    pub fn scan_meta(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(metakv::collect_prefix(self.kv.as_ref(), prefix)?)
    }

    /// The metadata engine the map is stored in.
    pub fn kv(&self) -> &Arc<dyn MetaKv> {
        &self.kv
    }

    // ----- nodes and refcounts --------------------------------------------------------

    fn load(&self, id: NodeId) -> Result<Node> {
        if let Some(n) = self.cached(id) {
            return n
                .clone()
                .ok_or(BlockMapError::Corrupt { what: format!("node {id}"), why: "used after it was freed" });
        }
        match self.kv_get(&key(P_NODE, id))? {
            Some(v) => Node::decode(id, &v),
            None => Err(BlockMapError::Corrupt { what: format!("node {id}"), why: "missing" }),
        }
    }

    /// A node as the open transaction, the write-back layer or the frozen layer holds it.
    fn cached(&self, id: NodeId) -> Option<&Option<Node>> {
        self.dirty.get(&id).or_else(|| self.wb_nodes.get(&id)).or_else(|| self.frozen_nodes.get(&id))
    }

    /// Look at a node without decoding or copying it.
    fn with_view<R>(&self, id: NodeId, f: impl FnOnce(View<'_>) -> Result<R>) -> Result<R> {
        if let Some(n) = self.cached(id) {
            let n = n
                .as_ref()
                .ok_or(BlockMapError::Corrupt { what: format!("node {id}"), why: "used after it was freed" })?;
            return f(View::Decoded(n));
        }
        let raw = self
            .kv_get(&key(P_NODE, id))?
            .ok_or(BlockMapError::Corrupt { what: format!("node {id}"), why: "missing" })?;
        f(View::raw(id, &raw)?)
    }

    /// A node to change in the open transaction (decoded once, written at commit).
    fn load_mut(&mut self, id: NodeId) -> Result<&mut Node> {
        if !self.dirty.contains_key(&id) {
            let n = self.load(id)?; // from the write-back layer or the engine
            self.dirty.insert(id, Some(n));
        }
        match self.dirty.get_mut(&id) {
            Some(Some(n)) => Ok(n),
            _ => Err(BlockMapError::Corrupt { what: format!("node {id}"), why: "used after it was freed" }),
        }
    }

    fn store(&mut self, id: NodeId, node: Node) {
        self.dirty.insert(id, Some(node));
    }

    fn new_node(&mut self, node: Node) -> NodeId {
        let id = self.next_node;
        self.next_node += 1;
        self.store(id, node);
        self.txn_private.insert(id);
        id
    }

    fn count(&self, prefix: u8, id: u64) -> Result<u32> {
        match self.get_raw(&key(prefix, id))? {
            None => Ok(1),
            Some(v) => v.as_slice().try_into().map(u32::from_le_bytes).map_err(|_| BlockMapError::Corrupt {
                what: format!("refcount {}{id}", prefix as char),
                why: "not 4 bytes",
            }),
        }
    }

    fn set_count(&mut self, prefix: u8, id: u64, n: u32) {
        if n <= 1 {
            self.del_raw(&key(prefix, id));
        } else {
            self.put_raw(&key(prefix, id), n.to_le_bytes().to_vec());
        }
    }

    fn node_rc(&self, id: NodeId) -> Result<u32> {
        self.count(P_NODE_RC, id)
    }

    /// Extra references (beyond the first) of the slots of one group of [`SLOT_GROUP`],
    /// stored together so that copying a leaf touches one key, not 64.
    fn group_refs(&self, group: u64) -> Result<[u32; SLOT_GROUP_LEN]> {
        let mut a = [0u32; SLOT_GROUP_LEN];
        if let Some(v) = self.get_raw(&key(P_SLOT_RC, group))? {
            if v.len() != a.len() * 4 {
                return Err(BlockMapError::Corrupt { what: format!("slot refcounts {group}"), why: "wrong length" });
            }
            for (x, c) in a.iter_mut().zip(v.chunks_exact(4)) {
                *x = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Ok(a)
    }

    fn put_group_refs(&mut self, group: u64, a: &[u32; SLOT_GROUP_LEN]) {
        if a.iter().all(|&x| x == 0) {
            self.del_raw(&key(P_SLOT_RC, group));
        } else {
            self.put_raw(&key(P_SLOT_RC, group), a.iter().flat_map(|x| x.to_le_bytes()).collect());
        }
    }

    /// References held on `slot` (at least 1 while it is mapped).
    fn slot_refs(&self, slot: u64) -> Result<u32> {
        Ok(self.group_refs(slot / SLOT_GROUP)?[usize_of(slot % SLOT_GROUP)] + 1)
    }

    /// One more reference on each of `slots`, one key update per group.
    fn slots_inc(&mut self, mut slots: Vec<u64>) -> Result<()> {
        slots.sort_unstable();
        for run in slots.chunk_by(|a, b| a / SLOT_GROUP == b / SLOT_GROUP) {
            let group = run[0] / SLOT_GROUP;
            let mut a = self.group_refs(group)?;
            for s in run {
                let x = &mut a[usize_of(s % SLOT_GROUP)];
                *x = x
                    .checked_add(1)
                    .ok_or(BlockMapError::Corrupt { what: format!("slot {s}"), why: "refcount overflow" })?;
            }
            self.put_group_refs(group, &a);
        }
        Ok(())
    }

    fn slot_dec(&mut self, slot: u64) -> Result<()> {
        let group = slot / SLOT_GROUP;
        let mut a = self.group_refs(group)?;
        let x = &mut a[usize_of(slot % SLOT_GROUP)];
        if *x == 0 {
            self.set_free(slot, true)?;
            self.txn_freed.push(slot);
        } else {
            *x -= 1;
            self.put_group_refs(group, &a);
        }
        Ok(())
    }

    /// Mark `slot` free or in use in the stored free bitmap of its group.
    fn set_free(&mut self, slot: u64, free: bool) -> Result<()> {
        let group = slot / SLOT_GROUP;
        let mut bits = match self.get_raw(&key(P_FREE, group))? {
            Some(v) => decode_u64("free list", &v)?,
            None => 0,
        };
        let bit = 1u64 << (slot % SLOT_GROUP);
        bits = if free { bits | bit } else { bits & !bit };
        if bits == 0 {
            self.del_raw(&key(P_FREE, group));
        } else {
            self.put_raw(&key(P_FREE, group), bits.to_le_bytes().to_vec());
        }
        Ok(())
    }

    /// Take one more reference on every child of `node` (it is being copied).
    fn inc_children(&mut self, node: &Node) -> Result<()> {
        match node {
            Node::Leaf(entries) => {
                self.slots_inc(entries.iter().flatten().filter(|e| e.has_data()).map(|e| e.slot).collect())?;
            }
            Node::Inner { children, .. } => {
                for &c in children.iter().filter(|&&c| c != 0) {
                    let n = self.node_rc(c)?;
                    self.set_count(P_NODE_RC, c, n + 1);
                    self.txn_private.remove(&c);
                }
            }
        }
        Ok(())
    }

    /// Return a node id that this tree owns alone and that holds `id`'s contents.
    fn make_private(&mut self, id: NodeId) -> Result<NodeId> {
        if self.txn_private.contains(&id) {
            return Ok(id);
        }
        let rc = self.node_rc(id)?;
        if rc <= 1 {
            self.txn_private.insert(id);
            return Ok(id);
        }
        let node = self.load(id)?;
        self.inc_children(&node)?;
        self.set_count(P_NODE_RC, id, rc - 1);
        Ok(self.new_node(node))
    }

    // ----- public tree operations ----------------------------------------------------

    /// Take a reference on `root` (a new snapshot or clone shares it). O(1).
    pub fn share(&mut self, root: NodeId) -> Result<()> {
        self.txn_private.remove(&root);
        if root != 0 {
            let n = self.node_rc(root)?;
            self.set_count(P_NODE_RC, root, n + 1);
        }
        Ok(())
    }

    /// Drop a reference on `root`. A root nobody else holds goes to the garbage queue;
    /// [`BlockMap::collect_garbage`] frees it after the commit.
    pub fn release(&mut self, root: NodeId) -> Result<()> {
        if root == 0 {
            return Ok(());
        }
        let n = self.node_rc(root)?;
        if n > 1 {
            self.set_count(P_NODE_RC, root, n - 1);
        } else {
            self.put_raw(&key(P_GARBAGE, root), Vec::new());
            self.gc.queued();
        }
        Ok(())
    }

    /// Set (or, with `None`, unmap) block `b`. See [`BlockMap::set_range`].
    pub fn set(&mut self, root: &mut NodeId, nblocks: u64, b: u64, new: Option<Entry>) -> Result<i64> {
        self.set_range(root, nblocks, b, &[new], true)
    }

    /// Set `entries.len()` consecutive blocks from `first` (`None` unmaps) in the tree at
    /// `root`, copying shared nodes on the way down, one root-to-leaf walk per leaf touched.
    /// `root` is updated when the root itself had to be copied, created or grown.
    /// Returns the change in data-holding blocks. Without `keep_digests` (trees that are never
    /// an ingest base: clones), every leaf touched drops its digests, which halves its size.
    pub fn set_range(
        &mut self,
        root: &mut NodeId,
        nblocks: u64,
        first: u64,
        entries: &[Option<Entry>],
        keep_digests: bool,
    ) -> Result<i64> {
        let end = first.saturating_add(entries.len() as u64);
        if end > nblocks {
            return Err(BlockMapError::OutOfRange { block: end - 1, nblocks });
        }
        if entries.is_empty() || (*root == 0 && entries.iter().all(Option::is_none)) {
            return Ok(0);
        }
        let want = height_for(nblocks);
        if *root == 0 {
            *root = self.new_node(Node::empty(want));
        } else {
            *root = self.make_private(*root)?;
            // A grown volume gets new levels on top; the old tree becomes child 0.
            let mut level = self.load(*root)?.level();
            while level < want {
                level += 1;
                let mut top = Node::empty(level);
                if let Node::Inner { children, .. } = &mut top {
                    children[0] = *root;
                }
                *root = self.new_node(top);
            }
        }
        let mut delta = 0i64;
        let mut b = first;
        while b < end {
            let leaf_end = ((b / LEAF_FANOUT as u64) + 1) * LEAF_FANOUT as u64;
            let run = &entries[usize_of(b - first)..usize_of(leaf_end.min(end) - first)];
            let all_unmap = run.iter().all(Option::is_none);
            if let Some(leaf) = self.leaf_for(*root, b, !all_unmap)? {
                let mut freed = Vec::new();
                let mut rewritten = 0;
                let Node::Leaf(slots) = self.load_mut(leaf)? else {
                    return Err(BlockMapError::Corrupt { what: format!("node {leaf}"), why: "expected a leaf" });
                };
                if !keep_digests {
                    slots.iter_mut().flatten().for_each(|e| e.digest = 0);
                }
                for (i, new) in run.iter().enumerate() {
                    let idx = child_index(0, b + i as u64);
                    let old = slots[idx];
                    if old == *new {
                        continue;
                    }
                    match (old.filter(Entry::has_data), new.filter(Entry::has_data)) {
                        // Rewritten in place (see `rewritable`): the slot stays, only its checksums change.
                        (Some(o), Some(n)) if o.slot == n.slot => rewritten += 1,
                        (Some(o), _) => freed.push(o.slot),
                        (None, _) => {}
                    }
                    slots[idx] = *new;
                    delta +=
                        i64::from(new.is_some_and(|e| e.has_data())) - i64::from(old.is_some_and(|e| e.has_data()));
                }
                self.txn_rewritten += rewritten;
                for slot in freed {
                    self.slot_dec(slot)?;
                }
            }
            b = leaf_end.min(end);
        }
        Ok(delta)
    }

    /// The private leaf holding block `b` under the private `root`, copying shared nodes and
    /// (with `create`) creating missing ones; `None` when absent and not to be created.
    fn leaf_for(&mut self, root: NodeId, b: u64, create: bool) -> Result<Option<NodeId>> {
        let mut cur = root;
        loop {
            let (level, child) = self.with_view(cur, |v| Ok((v.level(), v.child(child_index(v.level(), b)))))?;
            if level == 0 {
                return Ok(Some(cur));
            }
            let next = if child == 0 {
                if !create {
                    return Ok(None);
                }
                self.new_node(Node::empty(level - 1))
            } else {
                self.make_private(child)?
            };
            if next != child {
                if let Node::Inner { children, .. } = self.load_mut(cur)? {
                    children[child_index(level, b)] = next;
                }
            }
            cur = next;
        }
    }

    /// Look up `count` blocks from `first` in the tree at `root`: `None` is a hole (never
    /// written in this lineage), `Some(Entry::ZERO)` reads as zeros, others hold data.
    pub fn lookup(&self, root: NodeId, first: u64, count: u64) -> Result<Vec<Option<Entry>>> {
        let len = usize::try_from(count).map_err(|_| BlockMapError::OutOfRange { block: first, nblocks: 0 })?;
        let mut out = vec![None; len];
        if root != 0 && count > 0 {
            self.lookup_node(root, 0, first, first + count, &mut out)?;
        }
        Ok(out)
    }

    fn lookup_node(&self, id: NodeId, base: u64, from: u64, to: u64, out: &mut [Option<Entry>]) -> Result<()> {
        let mut below: Vec<(NodeId, u64)> = Vec::new();
        self.with_view(id, |v| {
            let level = v.level();
            if level == 0 {
                v.for_entries(|i, e| {
                    let b = base + i as u64;
                    if b >= from && b < to {
                        out[usize_of(b - from)] = Some(e);
                    }
                });
            } else {
                let sp = span(level);
                v.for_children(|i, c| {
                    let lo = base + i as u64 * sp;
                    if lo + sp > from && lo < to {
                        below.push((c, lo));
                    }
                });
            }
            Ok(())
        })?;
        for (c, lo) in below {
            self.lookup_node(c, lo, from, to, out)?;
        }
        Ok(())
    }

    /// Call `f(block, entry)` for every present entry of the tree at `root`, in block order.
    pub fn for_each(&self, root: NodeId, f: &mut dyn FnMut(u64, Entry) -> Result<()>) -> Result<()> {
        if root == 0 {
            return Ok(());
        }
        let node = self.load(root)?;
        self.walk(&node, 0, f)
    }

    /// Walk the part of the tree at `root` that covers blocks `first..end`, in block order, for
    /// callers that visit many trees sharing subtrees once each (scrub). `enter(id, level,
    /// base)` is asked before a node below the root is read (it covers [`capacity`]`(level)`
    /// blocks from `base`) and skips it with its subtree when it answers false; `entry(leaf,
    /// block, e)` gets the present entries in the range of every leaf read. Read-only.
    pub fn walk_range(
        &self,
        root: NodeId,
        first: u64,
        end: u64,
        enter: &mut dyn FnMut(NodeId, u8, u64) -> bool,
        entry: &mut dyn FnMut(NodeId, u64, Entry),
    ) -> Result<()> {
        if root == 0 || first >= end {
            return Ok(());
        }
        let mut todo = vec![(root, 0u64)];
        while let Some((id, base)) = todo.pop() {
            let below = self.with_view(id, |v| {
                let level = v.level();
                let mut below = Vec::new();
                if level == 0 {
                    v.for_entries(|i, e| {
                        let b = base + i as u64;
                        if b >= first && b < end {
                            entry(id, b, e);
                        }
                    });
                } else {
                    let sp = span(level);
                    v.for_children(|i, c| {
                        let lo = base + i as u64 * sp;
                        if lo + sp > first && lo < end && enter(c, level - 1, lo) {
                            below.push((c, lo));
                        }
                    });
                }
                Ok(below)
            })?;
            // Depth first, lowest blocks first.
            todo.extend(below.into_iter().rev());
        }
        Ok(())
    }

    fn walk(&self, node: &Node, base: u64, f: &mut dyn FnMut(u64, Entry) -> Result<()>) -> Result<()> {
        match node {
            Node::Leaf(entries) => {
                for (i, e) in entries.iter().enumerate() {
                    if let Some(e) = e {
                        f(base + i as u64, *e)?;
                    }
                }
            }
            Node::Inner { level, children } => {
                let sp = span(*level);
                for (i, &c) in children.iter().enumerate().filter(|(_, &c)| c != 0) {
                    let child = self.load(c)?;
                    self.walk(&child, base + i as u64 * sp, f)?;
                }
            }
        }
        Ok(())
    }

    /// Blocks of data that releasing all of `roots` together would free: exactly those
    /// reachable only through them. Cost grows with what is unique, not with volume size.
    pub fn unique_blocks(&self, roots: &[NodeId]) -> Result<u64> {
        let mut node_refs: HashMap<NodeId, u32> = HashMap::new();
        let mut slot_refs: HashMap<u64, u32> = HashMap::new();
        let mut visit: Vec<NodeId> = Vec::new();
        let mut unique = 0;
        let reach = |id: NodeId, visit: &mut Vec<NodeId>, refs: &mut HashMap<NodeId, u32>| -> Result<()> {
            let seen = refs.entry(id).or_insert(0);
            *seen += 1;
            if *seen == self.node_rc(id)? {
                visit.push(id);
            }
            Ok(())
        };
        for &r in roots.iter().filter(|&&r| r != 0) {
            reach(r, &mut visit, &mut node_refs)?;
        }
        while let Some(id) = visit.pop() {
            match self.load(id)? {
                Node::Leaf(entries) => {
                    for e in entries.iter().flatten().filter(|e| e.has_data()) {
                        let seen = slot_refs.entry(e.slot).or_insert(0);
                        *seen += 1;
                        if *seen == self.slot_refs(e.slot)? {
                            unique += 1;
                        }
                    }
                }
                Node::Inner { children, .. } => {
                    for &c in children.iter().filter(|&&c| c != 0) {
                        reach(c, &mut visit, &mut node_refs)?;
                    }
                }
            }
        }
        Ok(unique)
    }

    /// Data-holding blocks of `first..first+count` whose slots rewriting or trimming them in
    /// the tree at `root` would free: those reached through nodes only this tree holds and
    /// held by no other leaf. What a write there gives back before it takes new slots.
    pub fn exclusive_blocks(&self, root: NodeId, first: u64, count: u64) -> Result<u64> {
        Ok(self.exclusive_slots(root, first, count, |_| true)?.len() as u64)
    }

    /// `(block, slot)` for the data-holding blocks of `first..first+count` in the tree at `root`
    /// whose slot `wanted` accepts and that only this tree holds: reached through nodes with
    /// one reference, the slot referenced by one leaf.
    fn exclusive_slots(
        &self,
        root: NodeId,
        first: u64,
        count: u64,
        wanted: impl Fn(u64) -> bool,
    ) -> Result<Vec<(u64, u64)>> {
        if root == 0 || count == 0 || self.node_rc(root)? != 1 {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        let mut failed = None;
        let mut enter = |id: NodeId, _: u8, _: u64| match self.node_rc(id) {
            Ok(n) => n == 1,
            Err(e) => {
                failed = Some(e);
                false
            }
        };
        let mut entry = |_: NodeId, b: u64, e: Entry| {
            if e.has_data() && wanted(e.slot) {
                found.push((b, e.slot));
            }
        };
        self.walk_range(root, first, first.saturating_add(count), &mut enter, &mut entry)?;
        if let Some(e) = failed {
            return Err(e);
        }
        let mut alone = Vec::with_capacity(found.len());
        for (b, slot) in found {
            if self.slot_refs(slot)? == 1 {
                alone.push((b, slot));
            }
        }
        Ok(alone)
    }

    /// Slots freed so far in the open transaction: their last reference went. The difference
    /// across a write is what it gave back.
    pub fn freed_in_transaction(&self) -> usize {
        self.txn_freed.len()
    }

    // ----- slots --------------------------------------------------------------------

    /// Hand out `n` slots for new data, lowest free ones first, then fresh ones (contiguous,
    /// so a long write becomes one large I/O). Part of the open transaction.
    pub fn alloc(&mut self, n: usize) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let Some(slot) = self.free.pop_first() else { break };
            self.txn_allocated.push((slot, true));
            self.set_free(slot, false)?;
            out.push(slot);
        }
        while out.len() < n {
            let slot = self.high_water;
            if slot > MAX_SLOT {
                return Err(BlockMapError::Corrupt { what: "extent file".into(), why: "all 2^40 slots are in use" });
            }
            self.high_water += 1;
            self.txn_allocated.push((slot, false));
            out.push(slot);
        }
        Ok(out)
    }

    // ----- transactions -------------------------------------------------------------

    /// Commit everything since the last commit or rollback, atomically, into the write-back
    /// layer (see the module documentation). Fails, changing nothing, only if the layer was
    /// full and could not be handed to the engine.
    pub fn commit(&mut self) -> Result<()> {
        if !self.flushing && self.wb_nodes.len() + self.wb_keys.len() >= WRITE_BACK_LIMIT {
            if let Err(e) = self.spill() {
                self.rollback();
                return Err(e);
            }
        }
        self.wb_nodes.extend(self.dirty.drain());
        self.wb_keys.extend(std::mem::take(&mut self.overlay));
        if self.high_water != self.txn_start.0 {
            self.wb_keys.insert(K_HIGH_WATER.to_vec(), Some(self.high_water.to_le_bytes().to_vec()));
        }
        if self.next_node != self.txn_start.1 {
            self.wb_keys.insert(K_NEXT_NODE.to_vec(), Some(self.next_node.to_le_bytes().to_vec()));
        }
        let gen = self.generation;
        self.pending.extend(self.txn_freed.drain(..).map(|s| (gen, s)));
        self.fresh.extend(self.txn_allocated.drain(..).map(|(s, _)| s));
        self.txn_rewritten = 0;
        self.txn_private.clear();
        self.txn_start = (self.high_water, self.next_node);
        Ok(())
    }

    /// Hand the committed layers to the engine as one atomic batch (not yet durable: see
    /// [`BlockMap::flush_store`]). While a flush is running it does nothing: only that flush's
    /// frozen layer may reach the engine before its durable commit. On error the layers are kept,
    /// nothing is lost.
    pub fn spill(&mut self) -> Result<()> {
        if self.flushing {
            return Ok(());
        }
        self.spill_frozen()?;
        self.apply(&layer_batch(&self.wb_nodes, &self.wb_keys))?;
        self.wb_nodes.clear();
        self.wb_keys.clear();
        Ok(())
    }

    /// The running flush's step after the extent file was synced: hand the frozen layer, whose
    /// data is all on disk now, to the engine. The flush then commits the engine durably and
    /// calls [`BlockMap::end_flush`].
    pub fn spill_frozen(&mut self) -> Result<()> {
        self.apply(&layer_batch(&self.frozen_nodes, &self.frozen_keys))?;
        self.frozen_nodes.clear();
        self.frozen_keys.clear();
        Ok(())
    }

    /// The running flush committed the engine (or gave up): later commits may reach it again.
    pub fn end_flush(&mut self) {
        self.flushing = false;
    }

    /// Forget everything since the last commit.
    pub fn rollback(&mut self) {
        self.txn_rewritten = 0;
        self.dirty.clear();
        self.overlay.clear();
        self.txn_freed.clear();
        self.rollback_allocations();
    }

    fn rollback_allocations(&mut self) {
        for (slot, from_free) in self.txn_allocated.drain(..) {
            if from_free {
                self.free.insert(slot);
            }
        }
        self.dirty.clear();
        self.overlay.clear();
        self.txn_freed.clear();
        self.txn_private.clear();
        (self.high_water, self.next_node) = self.txn_start;
    }

    /// True while a transaction has uncommitted changes.
    pub fn in_transaction(&self) -> bool {
        !self.dirty.is_empty() || !self.overlay.is_empty() || !self.txn_allocated.is_empty()
    }

    // ----- flush and reuse of freed slots ------------------------------------------

    /// Start a flush: freeze the write-back layer (what this flush makes durable: every commit
    /// so far, whose data the caller wrote before committing, so the extent sync that follows
    /// covers it); frees committed so far become releasable once it completes. Commits made
    /// while the flush runs go to a new layer that stays in memory until the next flush, so the
    /// durable state never points at data written after the sync began. Call with no open
    /// transaction; then [`BlockMap::spill_frozen`], the engine's commit, [`BlockMap::end_flush`].
    pub fn begin_flush(&mut self) -> u64 {
        // A failed flush left its frozen layer: the newer changes go on top of it.
        self.frozen_nodes.extend(self.wb_nodes.drain());
        self.frozen_keys.extend(std::mem::take(&mut self.wb_keys));
        self.flushing = true;
        self.fresh.clear();
        let g = self.generation;
        self.generation += 1;
        g
    }

    /// Slots freed in generations up to `ticket`, now durable: punch them, then hand them to
    /// [`BlockMap::make_available`].
    pub fn take_released(&mut self, ticket: u64) -> Vec<u64> {
        let (done, keep): (Vec<_>, Vec<_>) = self.pending.drain(..).partition(|(g, _)| *g <= ticket);
        self.pending = keep;
        let mut slots: Vec<u64> = done.into_iter().map(|(_, s)| s).collect();
        slots.sort_unstable();
        slots
    }

    /// Let punched slots be allocated again.
    pub fn make_available(&mut self, slots: Vec<u64>) {
        self.free.extend(slots);
    }

    /// Current allocation counters.
    pub fn stats(&self) -> MapStats {
        MapStats {
            high_water: self.high_water,
            free_slots: self.free.len() as u64,
            pending_free: self.pending.len() as u64,
            freed_nodes: self.freed_nodes,
        }
    }

    /// Make every committed change durable in the metadata store.
    pub fn flush_store(&mut self) -> Result<()> {
        self.flushing = false;
        self.spill()?;
        self.kv.commit()?;
        Ok(())
    }

    // ----- rewriting in place ------------------------------------------------------------

    /// For each block of `first..first+count` in the tree at `root`: the slot a new write may
    /// overwrite in place instead of taking a fresh one. That is a slot allocated since the last
    /// flush began (so no durable state, and no flush in progress, points at it) and reached only
    /// through this tree (every node on the way and the slot itself hold one reference): nothing
    /// but this tree's current contents would ever read it. A crash mid-rewrite therefore loses
    /// only writes that were never flushed, and no checksum on disk describes the slot.
    /// The caller must rewrite it and set the new entry (same slot) in one commit, with the
    /// map's owner keeping readers out in between.
    pub fn rewritable(&self, root: NodeId, first: u64, count: u64) -> Result<Vec<Option<u64>>> {
        let mut out = vec![None; usize_of(count)];
        if !self.fresh.is_empty() {
            for (b, slot) in self.exclusive_slots(root, first, count, |s| self.fresh.contains(&s))? {
                out[usize_of(b - first)] = Some(slot);
            }
        }
        Ok(out)
    }

    /// Blocks rewritten in place so far in the open transaction (they took no new slot and
    /// freed none).
    pub fn rewritten_in_transaction(&self) -> usize {
        self.txn_rewritten
    }
}

/// One engine batch holding a layer of node and key changes.
fn layer_batch(nodes: &HashMap<NodeId, Option<Node>>, keys: &BTreeMap<Vec<u8>, Option<Vec<u8>>>) -> metakv::Batch {
    let mut batch = metakv::Batch::default();
    for (id, node) in nodes {
        match node {
            Some(n) => batch.put(&key(P_NODE, *id), &n.encode()),
            None => batch.delete(&key(P_NODE, *id)),
        }
    }
    for (k, v) in keys {
        match v {
            Some(v) => batch.put(k, v),
            None => batch.delete(k),
        }
    }
    batch
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// The crc32 every stored block carries.
pub fn block_crc(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// The content digest ingest compares to find changed blocks.
pub fn block_digest(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

#[cfg(test)]
mod tests;
