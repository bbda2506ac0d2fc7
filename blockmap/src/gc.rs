//! Garbage collection in bounded steps: dismantling the garbage queue (`g` keys) a few nodes at
//! a time, so that the owner can hold its lock for one step and let readers and writers in
//! between steps (issue 13).
//!
//! The queue itself is the truth and is durable: [`BlockMap::release`] queues a root nobody
//! else holds, and each step, in one atomic commit, removes the nodes it dismantles, drops
//! their children's references and slots, and queues the children that lost their last
//! reference. A crash between steps resumes from the queue as the last flush left it, with
//! neither leaks nor double frees; slots a step frees are reusable only after a flush, like
//! every other free.
//!
//! Between steps the collector keeps in memory the queued nodes it knows of ([`Collector`]):
//! the queue as read once from the engine, plus the children its own steps queued. Roots
//! released since that read ([`BlockMap::release`] says so) are found by reading the queue
//! again once that list runs out, so a step costs what it dismantles, not the length of the
//! queue, and the end of a collection reads nothing. A failed step forgets the list: the next
//! one reads the queue again.
//!
//! While nodes wait in the queue they still hold references on what they point at, so a walk
//! of unique blocks ([`BlockMap::unique_blocks`]) counts what they share with live trees as
//! shared; each step can make such blocks unique to the trees left holding them.

use crate::{key, Node, NodeId, Result, P_GARBAGE, P_NODE_RC};

/// Nodes [`BlockMap::collect_garbage`] dismantles per commit.
const FULL_STEP: usize = 512;

/// What the collector remembers between steps.
#[derive(Debug, Default)]
pub(crate) struct Collector {
    /// Queued nodes not dismantled yet, dismantled from the end (depth first).
    work: Vec<NodeId>,
    /// The queue was read since the map was opened (or since a failed step).
    scanned: bool,
    /// A root was released since the queue was last read: it holds nodes `work` lacks.
    released: bool,
}

impl Collector {
    /// [`crate::BlockMap::release`] queued a root.
    pub(crate) fn queued(&mut self) {
        self.released = true;
    }

    /// Whether the queue must be read again to know what it holds.
    fn stale(&self) -> bool {
        self.work.is_empty() && (self.released || !self.scanned)
    }

    /// Forget the list (after a failed step): the queue is read again.
    fn forget(&mut self) {
        self.work.clear();
        self.scanned = false;
    }
}

/// What one step of garbage collection did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStep {
    /// Nodes dismantled by this step.
    pub freed_nodes: u64,
    /// Whether nodes still wait in the queue after it.
    pub more: bool,
}

impl crate::BlockMap {
    /// Dismantle at most `max_nodes` queued nodes in one atomic commit. Must be called with no
    /// open transaction. `more` is exact: when false, the queue is empty. On error nothing of
    /// the step is kept.
    pub fn collect_garbage_step(&mut self, max_nodes: usize) -> Result<GcStep> {
        self.read_queue_if_stale()?;
        let freed = match self.dismantle(max_nodes.max(1)) {
            Ok(n) => n,
            Err(e) => {
                self.rollback();
                self.gc.forget();
                return Err(e);
            }
        };
        if let Err(e) = self.commit() {
            self.gc.forget();
            return Err(e);
        }
        self.freed_nodes += freed;
        self.read_queue_if_stale()?;
        Ok(GcStep { freed_nodes: freed, more: !self.gc.work.is_empty() })
    }

    /// Dismantle the whole queue, one step of [`FULL_STEP`] nodes per commit. Returns the
    /// number of nodes freed. Must be called with no open transaction.
    pub fn collect_garbage(&mut self) -> Result<u64> {
        let mut freed = 0;
        loop {
            let step = self.collect_garbage_step(FULL_STEP)?;
            freed += step.freed_nodes;
            if !step.more {
                return Ok(freed);
            }
        }
    }

    /// Whether anything waits in the garbage queue (reads the queue when the collector knows
    /// of nothing). Must be called with no open transaction.
    pub fn garbage_queued(&mut self) -> Result<bool> {
        self.read_queue_if_stale()?;
        Ok(!self.gc.work.is_empty())
    }

    /// Queued nodes the collector knows of (every queued node after a step or
    /// [`BlockMap::garbage_queued`]; roots released since are not counted).
    pub fn garbage_known(&self) -> usize {
        self.gc.work.len()
    }

    /// Read the queue when the list may lack some of it: never read yet, or roots were
    /// released since and the list ran out.
    fn read_queue_if_stale(&mut self) -> Result<()> {
        if self.gc.stale() {
            self.gc.work = self.queued_garbage()?;
            self.gc.scanned = true;
            self.gc.released = false;
        }
        Ok(())
    }

    /// The queue as stored: its `g` keys in the engine, with what every layer above the engine
    /// adds or removes (a running flush keeps newer layers from the engine), lowest node first.
    fn queued_garbage(&mut self) -> Result<Vec<NodeId>> {
        let mut ids = std::collections::BTreeSet::new();
        let mut bad = false;
        self.kv.scan_prefix(&[P_GARBAGE], &mut |k, _| match crate::id_of(k) {
            Some(id) if id != 0 => {
                ids.insert(id);
            }
            _ => bad = true,
        })?;
        for layer in [&self.frozen_keys, &self.wb_keys, &self.overlay] {
            for (k, v) in layer.range(vec![P_GARBAGE]..vec![P_GARBAGE + 1]) {
                match (crate::id_of(k), v) {
                    (Some(id), Some(_)) if id != 0 => ids.insert(id),
                    (Some(id), None) => ids.remove(&id),
                    _ => std::mem::replace(&mut bad, true),
                };
            }
        }
        if bad {
            return Err(crate::BlockMapError::Corrupt { what: "garbage queue".into(), why: "a key without a node id" });
        }
        Ok(ids.into_iter().collect())
    }

    /// Dismantle up to `max` nodes from the collector's list into the open transaction.
    fn dismantle(&mut self, max: usize) -> Result<u64> {
        let mut freed = 0u64;
        while freed < max as u64 {
            let Some(id) = self.gc.work.pop() else { break };
            self.dismantle_node(id)?;
            freed += 1;
        }
        Ok(freed)
    }

    /// Remove queued node `id`: drop a reference on each of its slots or children, queueing
    /// the children that lose their last one.
    fn dismantle_node(&mut self, id: NodeId) -> Result<()> {
        match self.load(id)? {
            Node::Leaf(entries) => {
                for e in entries.iter().flatten().filter(|e| e.has_data()) {
                    self.slot_dec(e.slot)?;
                }
            }
            Node::Inner { children, .. } => {
                for &c in children.iter().filter(|&&c| c != 0) {
                    let n = self.node_rc(c)?;
                    if n > 1 {
                        self.set_count(P_NODE_RC, c, n - 1);
                    } else {
                        self.put_raw(&key(P_GARBAGE, c), Vec::new());
                        self.gc.work.push(c);
                    }
                }
            }
        }
        self.dirty.insert(id, None);
        self.del_raw(&key(P_NODE_RC, id));
        self.del_raw(&key(P_GARBAGE, id));
        Ok(())
    }
}
