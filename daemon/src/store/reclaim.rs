//! Giving metadata space back: the metadata engine's compaction, run when deletes have freed
//! enough of `meta/` to be worth it (issue 10's space goal: `meta/` on disk at most 1.5x the
//! live metadata, also within 60 s of deleting every clone).
//!
//! Garbage collection of deleted trees removes their records from the engine, but engines
//! give the space back only when they compact (fjall, RocksDB) or are compacted (redb), and
//! sled never does. [`Store::maintain`] runs from the daemon's periodic tick and asks the
//! engine to reclaim once what it could give back is at least a fifth of what `meta/` takes
//! on disk. The engine says how much that is when it can tell ([`metakv::MetaKv::reclaimable`]:
//! redb's free pages); otherwise it is estimated from the tree nodes freed since the last
//! reclaim, at about [`NODE_BYTES`] each. So a compaction is paid for only when it gives back
//! at least a fifth of the space: its cost, proportional to the store, is amortised over the
//! changes that made the garbage, and `meta/` stays within 1.25x of what the engine needs.
//!
//! A compaction stops the store's reads and writes while it runs (redb needs the database to
//! itself), and its time grows faster than the store: measured here 0.3 s for a 136 MiB file,
//! 1.4 s for 272 MiB, 3.8 s for 544 MiB. So the daemon compacts on its own only while `meta/`
//! is at most [`AUTO_COMPACT_MAX`]; above that it says once in its log how much could be given
//! back, and `forkd compact` does it with the daemon stopped. (redb reuses its free pages
//! either way: without a compaction `meta/` stays at its high-water mark, it does not grow.)
//!
//! Locking: the counters are atomics; the reclaim runs without the catalog lock (engines
//! compact concurrently with reads and writes, redb's adapter excepted: see its notes).

use std::sync::atomic::Ordering;

use super::{Result, Store};

/// What a tree node takes in the engine, about (a leaf of 64 entries is 1.1 KiB encoded,
/// plus its key, refcount and index overhead).
pub(super) const NODE_BYTES: u64 = 1536;

/// The largest `meta/` the daemon compacts on its own (a stall of about 0.3 s measured).
pub(super) const AUTO_COMPACT_MAX: u64 = 128 << 20;

impl Store {
    /// Periodic upkeep: reclaim metadata space if deletes freed enough of it (see the module
    /// documentation). Returns true if the engine was asked to reclaim.
    pub fn maintain(&self) -> Result<bool> {
        // A compaction writes before it gives back: not in the room kept for deletes and trims.
        if self.low_space.load(Ordering::SeqCst) {
            return Ok(false);
        }
        // Nothing reached the engine since the last upkeep: nothing new to give back.
        let flushes = self.metrics.flushes.get();
        if self.upkept_at.swap(flushes, Ordering::SeqCst) == flushes {
            return Ok(false);
        }
        let freed = self.catalog().map().stats().freed_nodes;
        let since = freed.saturating_sub(self.reclaimed_at.load(Ordering::SeqCst));
        let on_disk = super::disk_usage(&self.dir.join("meta"));
        // Asking the engine costs a walk of its trees (redb), worth it only where the daemon
        // would compact; above that the estimate feeds the advice and the metric.
        let measured = if on_disk <= AUTO_COMPACT_MAX { self.kv.reclaimable()? } else { None };
        let garbage = measured.unwrap_or(since.saturating_mul(NODE_BYTES));
        self.metrics.meta_disk_bytes.set(i64::try_from(on_disk).unwrap_or(i64::MAX));
        self.metrics.meta_reclaimable_bytes.set(i64::try_from(garbage).unwrap_or(i64::MAX));
        if garbage == 0 || garbage < on_disk / 5 {
            return Ok(false);
        }
        if on_disk > AUTO_COMPACT_MAX {
            if !self.compact_advised.swap(true, Ordering::SeqCst) {
                tracing::warn!(
                    reclaimable = garbage,
                    meta = on_disk,
                    "meta/ could give back space, but is too large to compact while serving: run \
                     `forkd compact` while the daemon is stopped"
                );
            }
            return Ok(false);
        }
        self.reclaim_now(freed)?;
        Ok(true)
    }

    /// Ask the engine to give space back now.
    fn reclaim_now(&self, freed: u64) -> Result<()> {
        let t = std::time::Instant::now();
        self.kv.reclaim()?;
        self.reclaimed_at.store(freed, Ordering::SeqCst);
        self.metrics.meta_compactions.inc();
        let on_disk = super::disk_usage(&self.dir.join("meta"));
        self.metrics.meta_disk_bytes.set(i64::try_from(on_disk).unwrap_or(i64::MAX));
        self.metrics.meta_reclaimable_bytes.set(0);
        // Small stores compact in a millisecond and often: only a noticeable stall is logged
        // (every compaction is counted in `forkd_meta_compactions_total`).
        let seconds = t.elapsed().as_secs_f64();
        if seconds >= 0.1 {
            tracing::info!(seconds, "compacted meta/");
        } else {
            tracing::debug!(seconds, "compacted meta/");
        }
        Ok(())
    }

    /// Live metadata: the bytes of every key and value the engine holds (a full scan: for
    /// benchmarks and diagnosis, not for the data path).
    pub fn meta_live_bytes(&self) -> Result<u64> {
        let mut total = 0u64;
        self.kv.scan_prefix(b"", &mut |k, v| total += (k.len() + v.len()) as u64)?;
        Ok(total)
    }
}
