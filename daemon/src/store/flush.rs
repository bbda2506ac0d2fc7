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
    pub fn flush(&self) -> Result<()> {
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
        let to_punch = self.keep_warm(ticket);
        if !to_punch.is_empty() {
            let pairs: Vec<(u64, usize)> = to_punch.iter().enumerate().map(|(i, &s)| (s, i)).collect();
            let ranges: Vec<(u64, u64)> =
                runs(&pairs).map(|r| (slot_offset(r[0].0), r.len() as u64 * BLOCK_SIZE)).collect();
            if let Err(e) = self.engine.punch(&ranges) {
                // Not fatal: the slots are reused either way, only the space is not returned yet.
                tracing::warn!(error = %e, "could not punch freed extents");
            }
            self.catalog_mut().map_mut().make_available(to_punch);
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

    /// Take the slots this flush released: keep up to [`warm_budget`] of them (and of those
    /// kept before) unpunched for the next writes, and return the rest, to be punched.
    fn keep_warm(&self, ticket: u64) -> Vec<u64> {
        let mut cat = self.catalog_mut();
        let map = cat.map_mut();
        let mut released = map.take_released(ticket);
        self.metrics.freed_bytes.inc_by(released.len() as u64 * BLOCK_SIZE);
        let stats = map.stats();
        let idle = stats.free_slots + stats.pending_free + released.len() as u64;
        let used = stats.high_water.saturating_sub(1 + idle);
        let low = self.low_space.load(Ordering::SeqCst);
        let budget = if low { 0 } else { warm_budget(used) };
        let room = usize::try_from(budget.saturating_sub(stats.warm_slots)).unwrap_or(usize::MAX);
        let warm = released.split_off(released.len().saturating_sub(room));
        map.make_warm(warm);
        let over = usize::try_from(map.stats().warm_slots.saturating_sub(budget)).unwrap_or(usize::MAX);
        released.extend(map.take_warm(over));
        released.sort_unstable();
        released
    }
}

/// How many released slots stay unpunched for reuse, given `used` slots holding data: an eighth
/// of the data stored, at most 1 GiB. Overwrites then land on blocks the filesystem and the
/// page cache already hold (measured: writing into cached pages is several times faster than
/// into fresh ones: bench/datapath-results.md), while `du` stays within an eighth of the data
/// and deleting everything gives everything back.
fn warm_budget(used: u64) -> u64 {
    (used / 8).min(WARM_MAX_BYTES / BLOCK_SIZE)
}

/// The most released space kept unpunched.
const WARM_MAX_BYTES: u64 = 1 << 30;

#[cfg(test)]
mod tests {
    #[test]
    fn the_warm_pool_is_an_eighth_of_the_data_and_at_most_a_gib() {
        assert_eq!(super::warm_budget(0), 0);
        assert_eq!(super::warm_budget(800), 100);
        assert_eq!(super::warm_budget(u64::MAX), 262_144);
    }
}
