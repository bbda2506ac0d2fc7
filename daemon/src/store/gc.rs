//! Garbage collection in the background (issue 13): what a delete (or any operation that
//! drops a tree: a rewind, a refresh, a prune, an aborted ingest) releases is dismantled in
//! bounded steps, each of at most `gc_step_nodes` nodes (default [`catalog::GC_STEP_NODES`])
//! in one atomic commit under the catalog's write lock, which is let go between steps. So a
//! delete returns as soon as its own commit is durable, and reads and writes of every other
//! volume go on while a large delete's trees are taken apart.
//!
//! Who runs the steps: the operation that queued the garbage takes the first one itself, in
//! the same hold of the lock as its commit (`catalog`), which finishes small deletes at once;
//! [`Store::op`] then wakes the collector, a task of the server (`server::collector`) that
//! runs the rest one [`Store::collect_garbage_step`] at a time, and also looks on every tick
//! of the periodic flush (so a queue a crash left is resumed after a start).
//!
//! What stays true: the queue is durable, each step is atomic, so a crash mid-collection
//! resumes without leaks or double frees; a slot a step frees becomes reusable only after a
//! flush, like every other free, and the collector flushes when the queue runs empty
//! ([`Store::settle_collection`]), so the space comes back promptly; what still waits in the
//! queue is unique to no one, and the figures a step may change are counted again
//! (`catalog::unique`). `forkd_gc_queued_nodes` is 0 only when nothing waits and the space of
//! what was collected is back.

use std::sync::atomic::{AtomicBool, Ordering};

use catalog::{Catalog, GcStep};

use super::{Result, Store};

/// What the store keeps for its collector.
#[derive(Debug, Default)]
pub(super) struct Collector {
    /// The collector's wake-up call.
    wake: tokio::sync::Notify,
    /// Steps freed slots that no flush has given back yet.
    unsettled: AtomicBool,
}

impl Store {
    /// Take one step of garbage collection, if any is due: what it freed and whether more
    /// waits (nothing and no when none was due).
    pub fn collect_garbage_step(&self) -> Result<GcStep> {
        self.keep_headroom();
        let step = {
            let mut cat = self.catalog_mut();
            if !cat.garbage_pending() {
                return Ok(GcStep::default());
            }
            let held = std::time::Instant::now();
            let step = cat.collect_garbage_step(self.gc_step_nodes.load(Ordering::Relaxed));
            tracing::debug!(step = ?step.as_ref().ok(), held_us = held.elapsed().as_micros(), "garbage collection step");
            if step.is_err() && cat.map().in_transaction() {
                cat.map_mut().rollback();
            }
            if step.as_ref().is_ok_and(|s| s.freed_nodes > 0) {
                self.gc.unsettled.store(true, Ordering::SeqCst);
                // The slots it freed become reusable at the next flush.
                self.unflushed.store(true, Ordering::SeqCst);
            }
            self.update_garbage_gauge(&cat);
            step
        };
        let step = self.note_enospc(step.map_err(Into::into))?;
        self.metrics.gc.freed_nodes.inc_by(step.freed_nodes);
        Ok(step)
    }

    /// After a collection's steps: flush, so the slots they freed are punched and can be
    /// reused, and only then let `forkd_gc_queued_nodes` say 0.
    pub fn settle_collection(&self) -> Result<()> {
        if self.gc.unsettled.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.flush() {
                self.gc.unsettled.store(true, Ordering::SeqCst);
                return Err(e);
            }
        }
        self.update_garbage_gauge(&self.catalog());
        Ok(())
    }

    /// Collect all garbage, step by step, then settle it.
    pub fn collect_garbage(&self) -> Result<()> {
        while self.collect_garbage_step()?.more {}
        self.settle_collection()
    }

    /// `forkd_gc_queued_nodes`: the nodes the collector knows of while garbage waits, 1 while
    /// what it freed waits for its flush, else 0 (every delete's space is back).
    pub(super) fn update_garbage_gauge(&self, cat: &Catalog) {
        let queued = match (cat.garbage_pending(), self.gc.unsettled.load(Ordering::SeqCst)) {
            (true, _) => cat.map().garbage_known().max(1),
            (false, true) => 1,
            (false, false) => 0,
        };
        self.metrics.gc.queued_nodes.set(i64::try_from(queued).unwrap_or(i64::MAX));
    }

    /// Set how many garbage nodes one step dismantles (`gc_step_nodes`; at least 1): the
    /// collector's steps and the first step an operation takes itself.
    pub fn set_gc_step_nodes(&self, nodes: usize) {
        let nodes = nodes.max(1);
        self.gc_step_nodes.store(nodes, Ordering::Relaxed);
        self.catalog_mut().set_gc_step_nodes(nodes);
    }

    /// Count every volume's unique bytes that are stale (all of them after a start), one volume
    /// per hold of the read lock, so that listing finds them counted (`catalog::unique`).
    pub fn count_unique(&self) {
        let names: Vec<String> = self.catalog().volumes().keys().cloned().collect();
        for name in &names {
            if let Err(e) = self.catalog().volume_unique_bytes(name) {
                tracing::warn!(volume = %name, error = %e, "cannot count the volume's unique bytes");
            }
        }
    }

    /// Whether garbage waits to be collected.
    pub fn garbage_pending(&self) -> bool {
        self.catalog().garbage_pending()
    }

    /// Wake the collector: an operation queued garbage it did not finish.
    pub(super) fn wake_collector(&self) {
        self.gc.wake.notify_one();
    }

    /// Wait until an operation wakes the collector (at once if one did since the last wait).
    pub async fn collector_woken(&self) {
        self.gc.wake.notified().await;
    }
}
