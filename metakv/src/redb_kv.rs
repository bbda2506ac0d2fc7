//! The redb 5 adapter: one copy-on-write B-tree file, `meta.redb` in the store's directory,
//! with one table (`forkd`) that holds every record.
//!
//! Batches: [`MetaKv::apply`] is one write transaction committed with `Durability::None`:
//! visible to every later read at once, atomic (redb flips to the new root or it does not),
//! but not written to stable storage. redb documents that such commits "will not be persisted
//! to disk unless followed by a commit with `Durability::Immediate`"; that later durable
//! commit makes every earlier non-durable one durable with it (it publishes the latest root,
//! and the pages of those commits were written before its flush).
//!
//! Durability: [`MetaKv::commit`] commits an empty write transaction with
//! `Durability::Immediate`. redb writes its dirty pages and the new header, then calls
//! `File::sync_data` (`fdatasync`) on the file, which also covers a grown or shrunk length;
//! with the default one-phase commit the header's checksums tell a torn commit at recovery.
//! redb never fsyncs a directory: the file is created once, by [`RedbKv::open`], which then
//! fsyncs the store's directory and its parent (so the file's entry survives a cut before any
//! commit can report success).
//!
//! Space: redb reuses freed pages, and at each durable commit gives back the file's tail when
//! at least half of the last region is free (halving that free tail each time), but pages in the
//! middle of the file stay allocated to the file. [`MetaKv::reclaim`] therefore runs
//! `Database::compact(CompactionMode::Maximum)`: it packs partly filled pages and moves pages
//! toward the start, then truncates the file. Compaction needs `&mut Database` and refuses to run
//! while a transaction is open, so the database sits behind an `RwLock`: every transaction of
//! this adapter lives under the read lock, and reclaim takes the write lock (reads and batches
//! wait for the compaction). If redb still reports a transaction or savepoint in the way,
//! reclaim does nothing and the next call tries again.
//!
//! Settings: a 64 MiB page cache (redb's default is 1 GiB; sled is given 64 MiB too), 4 KiB
//! pages (the only size redb offers outside its own tests: a leaf holding one record of more
//! than about 2 KiB has no room for a second, so such records take twice their size), no
//! quick-repair (after a crash, open verifies the checksums and rebuilds the allocator state by
//! walking the file, which the store's open-time scans do anyway, rather than every commit
//! saving the allocator state). A write that fails with an I/O error (ENOSPC included) latches
//! redb: every later write transaction fails (`PreviousIo`) until the store is reopened.

use std::fmt;
use std::fs::File;
use std::path::Path;
use std::sync::{PoisonError, RwLock};

use redb::{CompactionError, CompactionMode, Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::{Batch, Engine, KvError, MetaKv, Result};

/// The one table: keys and values are raw bytes, keys in byte order.
const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("forkd");

/// The database file, inside the store's directory.
const FILE: &str = "meta.redb";

/// Page cache of the database.
const CACHE_BYTES: usize = 64 << 20;

/// A redb database. Every transaction is opened and finished under the read lock;
/// compaction takes the write lock, so none is open while it runs.
pub(crate) struct RedbKv {
    db: RwLock<Database>,
    /// The database file, for its length.
    file: std::path::PathBuf,
}

impl fmt::Debug for RedbKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbKv").finish_non_exhaustive()
    }
}

/// A redb error as a [`KvError`]: its I/O errors stay I/O errors (so ENOSPC is seen).
fn err(e: impl Into<redb::Error>) -> KvError {
    match e.into() {
        redb::Error::Io(e) => KvError::Io(e),
        other => KvError::Engine(format!("redb: {other}")),
    }
}

impl RedbKv {
    /// Open (creating if needed) the redb store in the directory `path`.
    pub(crate) fn open(path: &Path) -> Result<RedbKv> {
        std::fs::create_dir_all(path)?;
        let db = redb::Builder::new().set_cache_size(CACHE_BYTES).create(path.join(FILE)).map_err(err)?;
        let txn = db.begin_write().map_err(err)?;
        txn.open_table(TABLE).map_err(err)?;
        txn.commit().map_err(err)?;
        // The file's entry (and the store directory's, if it was just made).
        File::open(path)?.sync_all()?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)?.sync_all()?;
        }
        Ok(RedbKv { db: RwLock::new(db), file: path.join(FILE) })
    }
}

impl MetaKv for RedbKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let txn = db.begin_read().map_err(err)?;
        let table = txn.open_table(TABLE).map_err(err)?;
        let value = table.get(key).map_err(err)?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    fn scan_prefix(&self, prefix: &[u8], visit: &mut dyn FnMut(&[u8], &[u8])) -> Result<()> {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let txn = db.begin_read().map_err(err)?;
        let table = txn.open_table(TABLE).map_err(err)?;
        for kv in table.range(prefix..).map_err(err)? {
            let (k, v) = kv.map_err(err)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            visit(k.value(), v.value());
        }
        Ok(())
    }

    fn apply(&self, batch: &Batch) -> Result<()> {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let mut txn = db.begin_write().map_err(err)?;
        txn.set_durability(Durability::None).map_err(err)?;
        {
            let mut table = txn.open_table(TABLE).map_err(err)?;
            for (k, v) in batch.ops() {
                match v {
                    Some(v) => table.insert(k.as_slice(), v.as_slice()).map_err(err)?,
                    None => table.remove(k.as_slice()).map_err(err)?,
                };
            }
        }
        // Dropped uncommitted (an error above), the transaction is aborted.
        txn.commit().map_err(err)
    }

    fn commit(&self) -> Result<()> {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let mut txn = db.begin_write().map_err(err)?;
        txn.set_durability(Durability::Immediate).map_err(err)?;
        txn.commit().map_err(err)
    }

    fn reclaim(&self) -> Result<()> {
        let mut db = self.db.write().unwrap_or_else(PoisonError::into_inner);
        match db.compact(CompactionMode::Maximum) {
            Ok(_) => Ok(()),
            Err(
                e @ (CompactionError::TransactionInProgress
                | CompactionError::EphemeralSavepointExists
                | CompactionError::PersistentSavepointExists),
            ) => {
                tracing::debug!(error = %e, "redb compaction cannot run now; the next reclaim retries");
                Ok(())
            }
            Err(e) => Err(err(e)),
        }
    }

    /// The file's pages that hold nothing (free pages in the middle, which only a compaction
    /// gives back): the file's length less the pages redb reports allocated. redb's stats walk
    /// its trees' branch pages, which the page cache holds.
    fn reclaimable(&self) -> Result<Option<u64>> {
        let len = std::fs::metadata(&self.file)?.len();
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let txn = db.begin_write().map_err(err)?;
        let stats = txn.stats().map_err(err)?;
        txn.abort().map_err(err)?;
        let used = stats.allocated_pages().saturating_mul(stats.page_size() as u64);
        Ok(Some(len.saturating_sub(used)))
    }

    fn engine(&self) -> Engine {
        Engine::Redb
    }
}
