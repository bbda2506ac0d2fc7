//! Running out of disk: the emergency data reserve and what a full disk does to the store.
//!
//! The data directory holds `reserve`, a preallocated file of 5 % of the filesystem (1 to
//! 64 MiB). When any layer reports ENOSPC, the reserve is released so that trims and deletes can
//! still commit the metadata that frees space; until the reserve can be re-created, new data is
//! refused with ENOSPC (`low_space`), so the freed room goes to metadata, not to more data.
//!
//! Locking: `reserve` is its own mutex, taken only to release or re-create the file;
//! `low_space` is an atomic read on every write.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::Ordering;

use catalog::{CatalogError, BLOCK_SIZE};

use super::{Result, Store, StoreError};

impl Store {
    /// Re-create the space reserve if it was released; false while the disk is still full.
    pub(super) fn restore_reserve(&self) -> bool {
        let f = self.reserve.lock().unwrap_or_else(|p| p.into_inner());
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
                if let Err(e) = f.set_len(0) {
                    tracing::error!(error = %e, "could not release the space reserve");
                }
                self.low_space.store(true, Ordering::SeqCst);
                false
            }
        }
    }

    /// If `r` failed for lack of space, release the reserve so operations that free space
    /// can still commit, and refuse new data until the reserve is back.
    pub(super) fn note_enospc<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if is_enospc(e) && !self.low_space.swap(true, Ordering::SeqCst) {
                tracing::error!("the disk is full: released the space reserve; delete or trim to free space");
                let f = self.reserve.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = f.set_len(0) {
                    tracing::error!(error = %e, "could not release the space reserve");
                }
            }
        }
        r
    }

    /// Refuse new data while the disk is full.
    pub(super) fn check_space(&self) -> Result<()> {
        if self.low_space.load(Ordering::SeqCst) && !self.restore_reserve() {
            return Err(StoreError::Io(std::io::Error::from_raw_os_error(libc::ENOSPC)));
        }
        Ok(())
    }
}

/// True when `e` comes from a full disk, whichever layer saw it.
pub(crate) fn is_enospc(e: &StoreError) -> bool {
    fn io(e: &std::io::Error) -> bool {
        e.raw_os_error() == Some(libc::ENOSPC)
            || e.kind() == std::io::ErrorKind::StorageFull
            || e.get_ref().is_some_and(|inner| inner.to_string().contains("No space left"))
    }
    match e {
        StoreError::Io(e) => io(e),
        StoreError::Meta(sled::Error::Io(e)) => io(e),
        StoreError::Catalog(CatalogError::Map(catalog::BlockMapError::Store(sled::Error::Io(e)))) => io(e),
        _ => false,
    }
}

/// At start, before the metadata store is opened: if the filesystem has less free space than
/// the reserve, release the reserve so that opening (and then trims and deletes) have room.
/// Returns true if the store must start in low-space mode.
pub(super) fn release_if_short(dir: &Path, reserve: &File, reserve_bytes: u64) -> bool {
    let free = nix::sys::statvfs::statvfs(dir).map(|s| s.blocks_available() * s.fragment_size()).unwrap_or(0);
    if free >= reserve_bytes {
        return false;
    }
    tracing::warn!(free, "the disk is short of space at start: released the space reserve");
    if let Err(e) = reserve.set_len(0) {
        tracing::error!(error = %e, "could not release the space reserve");
    }
    true
}

/// Emergency reserve: 5 % of the filesystem, between 1 MiB and 64 MiB.
pub(super) fn reserve_size(dir: &Path) -> u64 {
    let total = nix::sys::statvfs::statvfs(dir).map(|s| s.blocks() * s.fragment_size()).unwrap_or(0);
    (total / 20).clamp(1 << 20, 64 << 20) / BLOCK_SIZE * BLOCK_SIZE
}
