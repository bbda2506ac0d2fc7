//! forkd's metadata engines behind one small trait: what the extent map and the catalog need
//! from a key-value store, and nothing more.
//!
//! The needs are four (issue 10): point reads, ordered scans of a key prefix, atomic batches
//! (after a crash, all of a batch or none of it) and a durable commit (after it returns, every
//! batch applied before it survives a power cut). [`MetaKv`] is exactly that; the map and the
//! catalog hold an `Arc<dyn MetaKv>` and never see an engine.
//!
//! Engines: redb is the default, chosen by the bake-off (`docs/metadata-engine.md`); sled is
//! always built (data directories written before the engine choice are read through it, to be
//! converted); fjall and RocksDB are cargo features for the bake-off. [`Engine`] names them as
//! the data directory's `format` file records.
//!
//! Invariant every adapter keeps: `commit` returning `Ok` means durable, including the
//! directory entries of files the engine created, on a disk whose volatile cache is lost at a
//! cut (the power-cut suite, `tests/tests/power_cut.rs`, checks it).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

mod sled_kv;
pub use sled_kv::SledKv;

#[cfg(feature = "fjall")]
mod fjall_kv;
#[cfg(feature = "redb")]
mod redb_kv;
#[cfg(feature = "rocksdb")]
mod rocksdb_kv;

/// The key the store keeps its flush generation under (see `daemon/src/store/generation.rs`).
pub const GENERATION_KEY: &[u8] = b"m:flush_generation";

/// Errors of a metadata engine.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The engine failed on a file operation (a full disk is `ENOSPC` here).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The engine refused or found its files damaged.
    #[error("{0}")]
    Engine(String),
}

impl KvError {
    /// True when the error comes from a full disk.
    pub fn is_enospc(&self) -> bool {
        match self {
            KvError::Io(e) => io_is_enospc(e),
            KvError::Engine(s) => s.contains("No space left"),
        }
    }
}

/// True when an I/O error comes from a full disk: `ENOSPC` itself, or an error that wraps it
/// and says so in its message (as some engines' errors do).
pub fn io_is_enospc(e: &std::io::Error) -> bool {
    const ENOSPC: i32 = 28;
    e.raw_os_error() == Some(ENOSPC)
        || e.kind() == std::io::ErrorKind::StorageFull
        || e.to_string().contains("No space left")
}

/// Result of a metadata engine.
pub type Result<T> = std::result::Result<T, KvError>;

/// Changes applied together: after a crash, all of them or none.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    /// Set `key` to `value`.
    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        self.ops.push((key.to_vec(), Some(value.to_vec())));
    }

    /// Remove `key`.
    pub fn delete(&mut self, key: &[u8]) {
        self.ops.push((key.to_vec(), None));
    }

    /// The changes in the order they were added (a later change to a key wins).
    pub fn ops(&self) -> &[(Vec<u8>, Option<Vec<u8>>)] {
        &self.ops
    }

    /// True when the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// What the extent map and the catalog need from a metadata engine.
pub trait MetaKv: Send + Sync + fmt::Debug {
    /// The value stored under `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Call `visit` with every record whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &[u8], visit: &mut dyn FnMut(&[u8], &[u8])) -> Result<()>;

    /// Apply `batch` atomically. Visible to reads at once; durable only after [`MetaKv::commit`].
    fn apply(&self, batch: &Batch) -> Result<()>;

    /// Make every batch applied so far durable, power cut included.
    fn commit(&self) -> Result<()>;

    /// Background upkeep that gives space back (compaction); called by the owner after
    /// changes that freed much metadata. A no-op where the engine does it by itself.
    fn reclaim(&self) -> Result<()> {
        Ok(())
    }

    /// Bytes [`MetaKv::reclaim`] could give back now, when the engine can tell cheaply
    /// (`None`: it cannot; the owner estimates from what it deleted).
    fn reclaimable(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Which engine this is.
    fn engine(&self) -> Engine;
}

/// Every record under `prefix`, collected (for callers that want a `Vec`).
pub fn collect_prefix(kv: &dyn MetaKv, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    kv.scan_prefix(prefix, &mut |k, v| out.push((k.to_vec(), v.to_vec())))?;
    Ok(out)
}

/// The metadata engines forkd can be built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// sled 0.34 (the design card's first choice).
    Sled,
    /// redb: a copy-on-write B-tree in one file.
    Redb,
    /// fjall: an LSM tree in pure Rust.
    Fjall,
    /// RocksDB through the `rocksdb` crate.
    RocksDb,
}

impl Engine {
    /// The engine new data directories get (the bake-off's decision, docs/metadata-engine.md).
    pub const DEFAULT: Engine = Engine::Redb;

    /// Every engine, built or not.
    pub const ALL: [Engine; 4] = [Engine::Sled, Engine::Redb, Engine::Fjall, Engine::RocksDb];

    /// The name the `format` file and the command line use.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Sled => "sled",
            Engine::Redb => "redb",
            Engine::Fjall => "fjall",
            Engine::RocksDb => "rocksdb",
        }
    }

    /// The engine called `name`.
    pub fn from_name(name: &str) -> Option<Engine> {
        Engine::ALL.into_iter().find(|e| e.name() == name)
    }

    /// True when this binary was built with the engine.
    pub fn is_built(self) -> bool {
        match self {
            Engine::Sled => true,
            Engine::Redb => cfg!(feature = "redb"),
            Engine::Fjall => cfg!(feature = "fjall"),
            Engine::RocksDb => cfg!(feature = "rocksdb"),
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Open (creating if needed) the metadata store of `engine` in the directory `path`.
pub fn open(engine: Engine, path: &Path) -> Result<Arc<dyn MetaKv>> {
    let built = |what: &str| KvError::Engine(format!("this forkd was built without the {what} metadata engine"));
    match engine {
        Engine::Sled => Ok(Arc::new(SledKv::open(path)?)),
        #[cfg(feature = "redb")]
        Engine::Redb => Ok(Arc::new(redb_kv::RedbKv::open(path)?)),
        #[cfg(feature = "fjall")]
        Engine::Fjall => Ok(Arc::new(fjall_kv::FjallKv::open(path)?)),
        #[cfg(feature = "rocksdb")]
        Engine::RocksDb => Ok(Arc::new(rocksdb_kv::RocksKv::open(path)?)),
        #[allow(unreachable_patterns)]
        other => Err(built(other.name())),
    }
}
