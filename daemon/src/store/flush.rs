//! The flush: what makes every answered write durable, and the only place freed slots become
//! reusable.
//!
//! Order matters, and is the whole point: the map's write-back layer is frozen (every commit so
//! far, whose data was written before it was committed), then `fdatasync(extents)`, then the
//! frozen layer is handed to the metadata engine, the next flush generation is stamped into it, the
//! engine commits durably (`MetaKv::commit`: for each engine, which calls make what durable is
//! in its adapter under `metakv/src/`, checked by the power-cut suite `tests/tests/power_cut.rs`),
//! and only then is the generation recorded in `flushed` (see `generation`). A slot released
//! before the flush began is punched and put back on the free list only after all of it, so
//! no durable pointer can lead to a slot that was reused. Commits made while the flush runs stay
//! in a newer layer in memory (`BlockMap::begin_flush`): their data may have missed the sync, so
//! the engine's durable commit must not take them along; the next flush does.
//!
//! Locking: the catalog's write lock is taken briefly for each map step (begin, spill the frozen
//! layer, end, take the released slots, make them available); the fsyncs themselves run without it, so reads and
//! writes go on during a flush.

use std::sync::atomic::Ordering;

use catalog::BLOCK_SIZE;

use super::{runs, slot_offset, Result, Store};

impl Store {
    /// Make every write answered so far durable, then let slots freed before it be reused.
    /// Flushes run one at a time: a second one merging newer commits into the layer a first one
    /// is syncing data for would let that one make pointers durable whose data it never synced.
    pub fn flush(&self) -> Result<()> {
        let _one = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        self.note_enospc(self.flush_inner())
    }

    /// Flush if anything was written since the last flush (the daemon's periodic flush).
    pub fn flush_if_needed(&self) -> Result<bool> {
        if !self.unflushed.load(Ordering::SeqCst) {
            return Ok(false);
        }
        self.flush().map(|()| true)
    }

    fn flush_inner(&self) -> Result<()> {
        self.keep_headroom();
        self.unflushed.store(false, Ordering::SeqCst);
        let ticket = self.catalog_mut().map_mut().begin_flush();
        let durable = self.commit_frozen();
        self.catalog_mut().map_mut().end_flush();
        durable?;
        let released = self.catalog_mut().map_mut().take_released(ticket);
        if !released.is_empty() {
            let pairs: Vec<(u64, usize)> = released.iter().enumerate().map(|(i, &s)| (s, i)).collect();
            let ranges: Vec<(u64, u64)> =
                runs(&pairs).map(|r| (slot_offset(r[0].0), r.len() as u64 * BLOCK_SIZE)).collect();
            if let Err(e) = self.engine.punch(&ranges) {
                // Not fatal: the slots are reused either way, only the space is not returned yet.
                tracing::warn!(error = %e, "could not punch freed extents");
            }
            self.metrics.freed_bytes.inc_by(released.len() as u64 * BLOCK_SIZE);
            self.catalog_mut().map_mut().make_available(released);
        }
        self.metrics.flushes.inc();
        Ok(())
    }

    /// Data first, then the pointers to it: fsync the extents, hand the map's frozen layer (the
    /// commits before the flush began, whose data the sync covers) to the metadata engine, commit
    /// it durably. Commits made meanwhile wait in memory for the next flush.
    fn commit_frozen(&self) -> Result<()> {
        self.engine.sync()?;
        self.catalog_mut().map_mut().spill_frozen()?;
        let generation = self.generation.stamp(self.kv.as_ref())?;
        self.kv.commit()?;
        self.generation.completed(generation)?;
        Ok(())
    }
}
