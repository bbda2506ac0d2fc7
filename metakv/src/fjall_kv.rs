//! The fjall 3 adapter: an LSM tree in pure Rust, one keyspace (`forkd`) that holds every
//! record, in the store's directory (journals `N.jnl` at its top, tables under `keyspaces/`).
//!
//! Batches: [`MetaKv::apply`] is one fjall write batch (the last change to each key only:
//! fjall gives every item of a batch the same sequence number): written to the journal as one unit
//! (start marker, items, end marker with a checksum; recovery drops a batch without its end)
//! and handed to the OS (`PersistMode::Buffer`, fjall's default), then applied to the memtable.
//!
//! Durability: [`MetaKv::commit`] is `Database::persist(PersistMode::SyncAll)`: the journal's
//! buffer is written out and the active journal file `fsync`ed. Older journals were
//! `fsync`ed by fjall when it rotated away from them, and fjall `fsync`s the directory after
//! creating a journal, after writing a table (tables, their folder) and after writing a
//! version file. What fjall does not `fsync` is the directory *above* one it creates: the
//! store directory's parent (fjall creates the store directory) and `keyspaces/` (which gets
//! the keyspace's folder when [`FjallKv::open`] creates it). `open` `fsync`s both, once.
//!
//! Space: an LSM tree keeps old versions and tombstones until compaction merges them away,
//! and a journal until every memtable it holds is flushed. Settings, for a store of a few MiB
//! to a few GiB: memtables of 4 MiB (fjall's default is 64 MiB), so flushed tables, and the
//! duplicates of rewritten keys in L0, stay small; leveled compaction with 8 MiB tables
//! (L1 = 32 MiB; fjall's default 64 MiB tables make L1 256 MiB, too coarse for a small store);
//! LZ4 on data blocks at every level (fjall's default compresses only from L2 down); the
//! journals capped at 64 MiB in all (fjall's minimum; default 512 MiB): past it, fjall flushes
//! the memtables that hold the oldest journal. What no setting changes: fjall 3.1 starts a new
//! journal only when the active one is past 64,000,000 bytes (a constant of its flush worker),
//! so up to ~64 MB of journal stays on disk whatever the memtable size or the live data (a
//! store of a few MiB is many times its live bytes there); each journal file is created with
//! `set_len(64 MiB)` (sparse: only what is written takes blocks, but `ls` shows 64 MiB).
//!
//! [`MetaKv::reclaim`] flushes the memtable (so its tombstones reach the tables), runs a major
//! compaction into the last level (where tombstones and overwritten values are dropped), then
//! writes one tombstone ([`RECLAIM_MARK`]) and flushes again: fjall deletes a replaced table
//! only when no kept version names it, and it lets go of versions only at a memtable rotation
//! whose GC watermark is past them; without that second rotation the old tables stay until
//! about 4 MiB more has been written. Journals are not reclaimed (see above).
//!
//! An I/O error on a journal write or persist (ENOSPC included) poisons the database: every
//! later write fails (`Poisoned`) until the store is reopened.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fjall::compaction::Leveled;
use fjall::config::CompressionPolicy;
use fjall::{CompressionType, Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::{Batch, Engine, KvError, MetaKv, Result};

/// Memtable size (what a flush writes as one L0 table).
const MEMTABLE_BYTES: u64 = 4 << 20;

/// Cap of all journals together (fjall's minimum).
const JOURNALS_BYTES: u64 = 64 << 20;

/// Target size of a table.
const TABLE_BYTES: u64 = 8 << 20;

/// Block cache.
const CACHE_BYTES: u64 = 64 << 20;

/// How long [`MetaKv::reclaim`] waits for a memtable flush.
const FLUSH_WAIT: Duration = Duration::from_secs(60);

/// The key [`MetaKv::reclaim`] writes a tombstone for (never a record: the store's keys are
/// printable prefixes, and this one starts with `0xff`).
const RECLAIM_MARK: &[u8] = b"\xffmetakv:fjall-reclaim";

/// A fjall database and its one keyspace.
pub(crate) struct FjallKv {
    db: Database,
    ks: Keyspace,
}

impl fmt::Debug for FjallKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallKv").finish_non_exhaustive()
    }
}

/// A fjall error as a [`KvError`]: its I/O errors stay I/O errors (so ENOSPC is seen).
fn err(e: impl Into<fjall::Error>) -> KvError {
    match e.into() {
        fjall::Error::Io(e) | fjall::Error::Storage(fjall::LsmError::Io(e)) => KvError::Io(e),
        other => KvError::Engine(other.to_string()),
    }
}

/// The keyspace's settings (see the module comment).
fn keyspace_options() -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default()
        .max_memtable_size(MEMTABLE_BYTES)
        .data_block_compression_policy(CompressionPolicy::all(CompressionType::Lz4))
        .compaction_strategy(Arc::new(Leveled::default().with_table_target_size(TABLE_BYTES)))
}

impl FjallKv {
    /// Open (creating if needed) the fjall store in the directory `path`.
    pub(crate) fn open(path: &Path) -> Result<FjallKv> {
        let db = open_db(path)?;
        let ks = db.keyspace("forkd", keyspace_options).map_err(err)?;
        db.persist(PersistMode::SyncAll).map_err(err)?;
        File::open(path.join("keyspaces"))?.sync_all()?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)?.sync_all()?;
        }
        Ok(FjallKv { db, ks })
    }

    /// Seal the memtable and wait until fjall's workers have written every sealed memtable to
    /// a table. Like fjall's own `rotate_memtable_and_wait`, but bounded, and failing rather
    /// than waiting forever once a failed worker has poisoned the database.
    fn flush_memtable(&self) -> Result<()> {
        self.ks.rotate_memtable().map_err(err)?;
        let start = Instant::now();
        while self.ks.sealed_memtable_count() > 0 {
            // Fails with `Poisoned` once a worker has failed (it then flushes nothing more).
            self.db.persist(PersistMode::Buffer).map_err(err)?;
            if start.elapsed() > FLUSH_WAIT {
                return Err(KvError::Engine(format!("fjall: a memtable flush took more than {FLUSH_WAIT:?}")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

/// Open fjall at `path`. A locked database can only be this process's previous store, its
/// last handles still being dropped (the data directory's own lock keeps other processes
/// out): wait for it briefly.
fn open_db(path: &Path) -> Result<Database> {
    let mut tries = 0;
    loop {
        let r = Database::builder(path).cache_size(CACHE_BYTES).max_journaling_size(JOURNALS_BYTES).open();
        match r {
            Err(fjall::Error::Locked) if tries < 250 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r.map_err(err),
        }
    }
}

/// The last change of `batch` to each key. Every item of a fjall batch gets the batch's one
/// sequence number, so two changes to one key would tie; [`Batch`] says the later one wins.
fn last_change_per_key(batch: &Batch) -> BTreeMap<&[u8], Option<&[u8]>> {
    batch.ops().iter().map(|(k, v)| (k.as_slice(), v.as_deref())).collect()
}

impl MetaKv for FjallKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.ks.get(key).map_err(err)?.map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, prefix: &[u8], visit: &mut dyn FnMut(&[u8], &[u8])) -> Result<()> {
        for guard in self.ks.prefix(prefix) {
            let (k, v) = guard.into_inner().map_err(err)?;
            visit(&k, &v);
        }
        Ok(())
    }

    fn apply(&self, batch: &Batch) -> Result<()> {
        let mut b = self.db.batch();
        for (k, v) in last_change_per_key(batch) {
            match v {
                Some(v) => b.insert(&self.ks, k, v),
                None => b.remove(&self.ks, k),
            }
        }
        b.commit().map_err(err)
    }

    fn commit(&self) -> Result<()> {
        self.db.persist(PersistMode::SyncAll).map_err(err)
    }

    fn reclaim(&self) -> Result<()> {
        // Tombstones in the memtable cover nothing in the tables: flush them first.
        self.flush_memtable()?;
        self.ks.major_compact().map_err(err)?;
        // The replaced tables are deleted once no kept version names them, and versions are
        // let go of only when a memtable is rotated with the GC watermark past them: write a
        // tombstone (the watermark moves past the compaction's version) and rotate again.
        self.ks.remove(RECLAIM_MARK).map_err(err)?;
        self.flush_memtable()
    }

    fn engine(&self) -> Engine {
        Engine::Fjall
    }
}
