//! The flush: what makes every answered write durable, and the only place freed slots become
//! reusable.
//!
//! Order matters, and is the whole point: `fdatasync(extents)` first, then the map's write-back
//! layer is handed to sled, the next flush generation is stamped into sled, sled is flushed,
//! sled's files are made durable ([`MetaSync`]), and only then is the generation recorded in
//! `flushed` (see `generation`). A slot released before the flush began is punched and put
//! back on the free list only after all of it, so no durable pointer can lead to a slot that
//! was reused.
//!
//! Why [`MetaSync`]: sled 0.34's `flush` makes its log stable with `sync_file_range`, which
//! flushes neither the disk's volatile write cache nor the file's own metadata (a grown log),
//! and nothing in sled or the store fsyncs the directories its files were created in. The
//! power-cut harness (`tests/powercut`, `tests/tests/power_cut.rs`) showed every acknowledged
//! flush lost at a cut without it. So after sled's flush the store itself calls `fdatasync` on
//! sled's files and `fsync` on the directories that name them (issue 10).
//!
//! Locking: the catalog's write lock is taken briefly for each map step (begin, spill, take the
//! released slots, make them available); the fsyncs themselves run without it, so reads and
//! writes go on during a flush.

use std::fs::File;
use std::io;
use std::path::Path;
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
        // Data first, then the pointers to it: fsync the extents, hand the map's write-back
        // layer to sled, fsync sled.
        self.engine.sync()?;
        self.catalog_mut().map_mut().spill()?;
        let generation = self.generation.stamp(&self.db)?;
        self.db.flush()?;
        self.meta_sync.sync()?;
        self.generation.completed(generation)?;
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
}

/// What makes a sled flush durable beyond sled's own `sync_file_range`: `fdatasync` of its
/// log (`meta/db`) and `fsync` of the directories that name its files (the data directory,
/// `meta/`, `meta/blobs/`), so new files and a grown log survive a power cut too. sled
/// writes `meta/conf` once, when it creates the store: that is made durable at open only.
#[derive(Debug)]
pub(super) struct MetaSync {
    log: File,
    dirs: Vec<File>,
}

impl MetaSync {
    /// Open sled's files under `meta` and the directories to fsync, and make what exists now
    /// durable (the files and directories sled and the store just created).
    pub(super) fn open(dir: &Path, meta: &Path) -> io::Result<MetaSync> {
        let conf = meta.join("conf");
        if conf.exists() {
            File::open(conf)?.sync_data()?;
        }
        let log = File::open(meta.join("db"))?;
        let mut dirs = vec![File::open(dir)?, File::open(meta)?];
        let blobs = meta.join("blobs");
        if blobs.is_dir() {
            dirs.push(File::open(blobs)?);
        }
        let sync = MetaSync { log, dirs };
        sync.sync()?;
        Ok(sync)
    }

    /// `fdatasync` the log, then `fsync` every directory.
    pub(super) fn sync(&self) -> io::Result<()> {
        self.log.sync_data()?;
        for d in &self.dirs {
            d.sync_all()?;
        }
        Ok(())
    }
}
