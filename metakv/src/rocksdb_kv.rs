//! The RocksDB adapter (the `rocksdb` crate, RocksDB 11.8 built from source with LZ4): the
//! default column family holds every record, in the store's directory.
//!
//! Batches: [`MetaKv::apply`] is one `WriteBatch` written without `sync`: RocksDB appends it
//! to the WAL as one record (its checksum makes it all or nothing at recovery; the default
//! point-in-time recovery stops at the first damaged record) and hands it to the OS, then
//! applies it to the memtable. Within a batch every change gets its own sequence number, so
//! a later change to a key wins.
//!
//! Durability: [`MetaKv::commit`] is `flush_wal(true)`, RocksDB's `FlushWAL(sync=true)` =
//! `SyncWAL()`: `fdatasync` of every live WAL file (`use_fsync` is off; `fdatasync` covers a
//! grown length), then an `fsync` of the WAL directory (the store directory) whenever a WAL
//! file was created since the last directory sync (`wal_dir_synced_`). RocksDB `fsync`s its
//! own directory after writing `CURRENT`, a MANIFEST or a table, but not the directory above
//! it: [`RocksKv::open`] `fsync`s the store directory's parent once (RocksDB creates the store
//! directory).
//!
//! Space: small memtables (4 MiB, two at most: RocksDB's default is 64 MiB), so the WAL, which
//! lives until its memtable is flushed, stays a few MiB (and `max_total_wal_size` caps it at
//! 16 MiB); dynamic leveled compaction (data goes to the last level first, which keeps space
//! amplification near 1.1) with 8 MiB tables and a 32 MiB L1; LZ4 on every level; a bloom
//! filter of 10 bits a key for point reads of absent keys. Files besides the data are kept
//! small: the MANIFEST is rewritten from 1 MiB (RocksDB's default lets it reach 1 GiB) and
//! preallocated by 64 KiB (the default 4 MiB takes blocks even when the MANIFEST is nearly
//! empty); the info `LOG` logs warnings only, without the periodic statistics dump, and at
//! most two old `LOG`s are kept (default 1000). A WAL is preallocated with
//! `fallocate(KEEP_SIZE)` in steps of 1.1 × the memtable size, so its `st_blocks` run ahead of
//! its length (by up to 4.4 MiB here).
//!
//! [`MetaKv::reclaim`] is a manual compaction of the whole key range (`compact_range`, which
//! first flushes the memtable), the last level recompacted too (`ForceOptimized`), so
//! tombstones and overwritten values are dropped; RocksDB deletes the replaced files at once.
//! The C API gives `compact_range` no error to return.
//!
//! An I/O error in a write or a WAL sync (ENOSPC included) stops writes: RocksDB's error
//! handler recovers from a full disk by itself once space is back (its SstFileManager polls);
//! other errors need a reopen.

use std::fmt;
use std::fs::File;
use std::path::Path;
use std::time::Duration;

use rocksdb::{
    BlockBasedOptions, BottommostLevelCompaction, Cache, CompactOptions, DBCompressionType, LogLevel, Options,
    ReadOptions, WriteBatch, WriteOptions, DB,
};

use crate::{Batch, Engine, KvError, MetaKv, Result};

/// Memtable size (the WAL holds about as much).
const MEMTABLE_BYTES: usize = 4 << 20;

/// Block cache.
const CACHE_BYTES: usize = 64 << 20;

/// A RocksDB database.
pub(crate) struct RocksKv {
    db: DB,
}

impl fmt::Debug for RocksKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RocksKv").field("path", &self.db.path()).finish()
    }
}

/// A RocksDB error as a [`KvError`]. RocksDB gives a message only (a full disk says
/// "No space left on device", which [`KvError::is_enospc`] recognizes).
fn err(e: rocksdb::Error) -> KvError {
    KvError::Engine(format!("rocksdb: {}", e.into_string()))
}

/// The database's settings (see the module comment).
fn options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.set_write_buffer_size(MEMTABLE_BYTES);
    o.set_max_write_buffer_number(2);
    o.set_max_total_wal_size(16 << 20);
    o.set_level_compaction_dynamic_level_bytes(true);
    o.set_target_file_size_base(8 << 20);
    o.set_max_bytes_for_level_base(32 << 20);
    o.set_compression_type(DBCompressionType::Lz4);
    o.set_bottommost_compression_type(DBCompressionType::Lz4);
    o.set_max_manifest_file_size(1 << 20);
    o.set_manifest_preallocation_size(64 << 10);
    o.set_log_level(LogLevel::Warn);
    o.set_stats_dump_period_sec(0);
    o.set_keep_log_file_num(2);
    o.set_max_log_file_size(1 << 20);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(&Cache::new_lru_cache(CACHE_BYTES));
    table.set_bloom_filter(10.0, false);
    o.set_block_based_table_factory(&table);
    o
}

impl RocksKv {
    /// Open (creating if needed) the RocksDB store in the directory `path`.
    pub(crate) fn open(path: &Path) -> Result<RocksKv> {
        let db = open_db(path)?;
        let kv = RocksKv { db };
        kv.commit()?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)?.sync_all()?;
        }
        Ok(kv)
    }
}

/// Open RocksDB at `path`. A held `LOCK` can only be this process's previous store still
/// closing (the data directory's own lock keeps other processes out): wait for it briefly.
fn open_db(path: &Path) -> Result<DB> {
    let opts = options();
    let mut tries = 0;
    loop {
        match DB::open(&opts, path) {
            Err(e) if e.as_ref().contains("lock hold by current process") && tries < 250 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r.map_err(err),
        }
    }
}

/// The first key after every key that starts with `prefix`, if there is one.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

impl MetaKv for RocksKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db.get(key).map_err(err)
    }

    fn scan_prefix(&self, prefix: &[u8], visit: &mut dyn FnMut(&[u8], &[u8])) -> Result<()> {
        let mut ro = ReadOptions::default();
        if let Some(end) = prefix_end(prefix) {
            ro.set_iterate_upper_bound(end);
        }
        let mut it = self.db.raw_iterator_opt(ro);
        it.seek(prefix);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !k.starts_with(prefix) {
                break;
            }
            visit(k, v);
            it.next();
        }
        it.status().map_err(err)
    }

    fn apply(&self, batch: &Batch) -> Result<()> {
        let mut b = WriteBatch::default();
        for (k, v) in batch.ops() {
            match v {
                Some(v) => b.put(k, v),
                None => b.delete(k),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        self.db.write_opt(b, &wo).map_err(err)
    }

    fn commit(&self) -> Result<()> {
        self.db.flush_wal(true).map_err(err)
    }

    fn reclaim(&self) -> Result<()> {
        let mut co = CompactOptions::default();
        co.set_bottommost_level_compaction(BottommostLevelCompaction::ForceOptimized);
        self.db.compact_range_opt(None::<&[u8]>, None::<&[u8]>, &co);
        Ok(())
    }

    fn engine(&self) -> Engine {
        Engine::RocksDb
    }
}
