//! Running out of disk: the emergency reserve and what a full disk does to the store.
//!
//! The data directory holds `reserve`, a preallocated file of 5 % of the filesystem (1 to
//! 64 MiB), and the store keeps as much again free beside it (`headroom`) for the metadata
//! store. The rule is that the metadata engine never meets a full disk: in sled, a write that
//! fails with ENOSPC makes every later operation fail until a restart, and no engine is
//! trusted to do better, so trims and deletes could no longer free anything. Hence:
//! - before the metadata can grow (a flush, a catalog operation, a trim, new data) the free
//!   space is checked; below `headroom`, or when any layer reports ENOSPC, the reserve is
//!   released and the store enters low-space mode (`low_space`);
//! - in low-space mode new data and catalog operations that only add metadata (snapshot,
//!   clone, create, ...) are refused with ENOSPC before they change anything; trims, deletes
//!   and abandoned ingests ([`Store::op_freeing`]) still commit, in the room the reserve left;
//! - data is checked twice: when a write arrives, and again by its group commit just before
//!   its blocks are written ([`Store::room_for`]), since a group commit can hold more writes
//!   admitted before the disk filled than the headroom has room for; a commit whose data would
//!   leave less than `headroom` free enters low-space mode and fails its writes with ENOSPC;
//! - the reserve is re-created only when it fits with `headroom` (and 1 MiB of slack) still
//!   free beside it, so re-creating it never takes back that room; a failed attempt gives back
//!   what it allocated;
//! - at start, the reserve is released before the metadata engine is opened if less than
//!   `headroom` is free.
//!
//! Locking: `reserve` is its own mutex, taken only to release or re-create the file;
//! `low_space` is an atomic read on every write; the free space is one `statvfs` call.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::Ordering;

use catalog::{CatalogError, BLOCK_SIZE};

use super::{Result, Store, StoreError};

/// Free space beyond the headroom needed before the released reserve is re-created.
const RESTORE_SLACK: u64 = 1 << 20;

impl Store {
    /// Re-create the space reserve if it was released; false while the disk is still full.
    /// It is re-created only if `headroom` stays free beside it, so that re-creating it never
    /// takes back the room that trims, deletes and the metadata store need.
    pub(super) fn restore_reserve(&self) -> bool {
        let f = self.reserve.lock().unwrap_or_else(|p| p.into_inner());
        let held = f.metadata().map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap_or(0);
        let missing = self.reserve_bytes.saturating_sub(held);
        // Some slack above the headroom, so a write refused for want of room does not see
        // the reserve re-created at once by the next write.
        if missing > 0 && free_bytes(&self.dir) < missing + self.headroom() + RESTORE_SLACK {
            self.low_space.store(true, Ordering::SeqCst);
            return false;
        }
        let len = i64::try_from(self.reserve_bytes).unwrap_or(i64::MAX);
        match nix::fcntl::fallocate(std::os::fd::AsRawFd::as_raw_fd(&*f), nix::fcntl::FallocateFlags::empty(), 0, len) {
            Ok(()) => {
                if self.low_space.swap(false, Ordering::SeqCst) {
                    tracing::info!("space is available again: new data is accepted");
                }
                true
            }
            Err(_) => {
                // A failed fallocate may keep what it did allocate (ext4 does): give it back,
                // or each attempt would eat the room that trims and deletes need.
                release(&f);
                self.low_space.store(true, Ordering::SeqCst);
                false
            }
        }
    }

    /// Enter low-space mode: release the reserve (once) and refuse new data and catalog
    /// operations that only add metadata, until the reserve can be re-created.
    fn enter_low_space(&self, why: &str) {
        if !self.low_space.swap(true, Ordering::SeqCst) {
            tracing::error!(why, "the disk is full: released the space reserve; delete or trim to free space");
            release(&self.reserve.lock().unwrap_or_else(|p| p.into_inner()));
        }
    }

    /// Free space kept for the metadata store beside the reserve: as much as the reserve.
    fn headroom(&self) -> u64 {
        self.reserve_bytes
    }

    /// Before the metadata store may grow (a flush, a catalog operation, new data): if less
    /// than `headroom` is free, release the reserve now, while the engine still has room to
    /// write. sled turns a write that fails with ENOSPC into an error for every later
    /// operation, so the engine must never be the layer that finds the disk full.
    pub(super) fn keep_headroom(&self) {
        if !self.low_space.load(Ordering::SeqCst) && free_bytes(&self.dir) < self.headroom() {
            self.enter_low_space("less free space than the metadata headroom");
        }
    }

    /// If `r` failed for lack of space, release the reserve so operations that free space
    /// can still commit, and refuse new data until the reserve is back.
    pub(super) fn note_enospc<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if is_enospc(e) {
                self.enter_low_space("a write found no space");
            }
        }
        r
    }

    /// Give back the space of slots past the map's high-water mark. They hold data of writes
    /// whose pointers never became durable (a crash or power cut between a write and the flush
    /// of its pointers): no durable pointer reaches past the mark, which is committed in the
    /// same batch as the pointers, and those slots will be handed out again as new. Not
    /// fatal: without it only space is lost, until the slots are reused.
    pub(super) fn punch_beyond_high_water(&self) {
        let high_water = self.catalog().map().stats().high_water;
        let start = high_water.saturating_sub(1).saturating_mul(BLOCK_SIZE);
        let len = std::fs::metadata(self.dir.join("extents.0")).map(|m| m.len()).unwrap_or(0);
        if len > start {
            if let Err(e) = self.engine.punch(&[(start, len - start)]) {
                tracing::warn!(error = %e, "could not punch the extents past the high-water mark");
            }
        }
    }

    /// Just before `bytes` of new data are written (a group commit): refuse them if the disk
    /// is full, or if they would leave less than `headroom` free. Every write passed
    /// [`Store::check_space`] when it arrived, but a group commit can hold more than the
    /// headroom of writes admitted before the disk filled; without this they would take the
    /// room the metadata store keeps for the flush that makes them durable.
    pub(super) fn room_for(&self, bytes: u64) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        if !self.low_space.load(Ordering::SeqCst) && free_bytes(&self.dir) < bytes.saturating_add(self.headroom()) {
            self.enter_low_space("a write would leave less free space than the metadata headroom");
        }
        if self.low_space.load(Ordering::SeqCst) {
            return Err(StoreError::Io(std::io::Error::from_raw_os_error(libc::ENOSPC)));
        }
        Ok(())
    }

    /// Refuse new data (and catalog operations that only add metadata) while the disk is full.
    pub(super) fn check_space(&self) -> Result<()> {
        self.keep_headroom();
        if self.low_space.load(Ordering::SeqCst) && !self.restore_reserve() {
            return Err(StoreError::Io(std::io::Error::from_raw_os_error(libc::ENOSPC)));
        }
        Ok(())
    }
}

/// Give the reserve's space back to the filesystem.
fn release(reserve: &File) {
    if let Err(e) = reserve.set_len(0) {
        tracing::error!(error = %e, "could not release the space reserve");
    }
}

/// Free space on the filesystem holding `dir`, as an unprivileged writer sees it.
pub(super) fn free_bytes(dir: &Path) -> u64 {
    nix::sys::statvfs::statvfs(dir).map(|s| s.blocks_available() * s.fragment_size()).unwrap_or(0)
}

/// True when `e` comes from a full disk, whichever layer saw it.
pub(crate) fn is_enospc(e: &StoreError) -> bool {
    match e {
        StoreError::Io(e) => metakv::io_is_enospc(e),
        StoreError::Meta(e) | StoreError::Catalog(CatalogError::Map(catalog::BlockMapError::Store(e))) => e.is_enospc(),
        _ => false,
    }
}

/// At start, before the metadata store is opened: if the filesystem has less free space than
/// the metadata headroom, release the reserve so that opening (and then trims and deletes)
/// have room. Returns true if the store must start in low-space mode.
pub(super) fn release_if_short(dir: &Path, reserve: &File, headroom: u64) -> bool {
    let free = free_bytes(dir);
    if free >= headroom {
        return false;
    }
    tracing::warn!(free, "the disk is short of space at start: released the space reserve");
    release(reserve);
    true
}

/// Emergency reserve: 5 % of the filesystem, between 1 MiB and 64 MiB.
pub(super) fn reserve_size(dir: &Path) -> u64 {
    let total = nix::sys::statvfs::statvfs(dir).map(|s| s.blocks() * s.fragment_size()).unwrap_or(0);
    (total / 20).clamp(1 << 20, 64 << 20) / BLOCK_SIZE * BLOCK_SIZE
}
