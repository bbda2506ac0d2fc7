//! The store: a data directory holding the catalog and extent map (a metadata engine, `metakv`,
//! under `meta/`; its format recorded in `format`) and the extent file (`extents.0`, 4 KiB
//! slots read and written through the io_uring [`Engine`]).
//!
//! It owns the rules that tie metadata to data:
//! - new data goes into freshly allocated slots and is written before the map points at it,
//!   so a committed pointer never sees half-written data, even after `kill -9` (or into a slot
//!   only this tree has held since the last flush began, rewritten in place: `commit`);
//! - a flush is `fdatasync(extents)` then the engine's durable commit: after it returns, every
//!   write answered before it is on disk, and only then are slots freed before it punched and
//!   reused;
//! - every catalog operation is followed by a flush, so it is durable when it returns;
//! - a block whose crc32 does not match is an I/O error naming the volume and offset.
//!
//! Locking: one `RwLock<Catalog>` and a mutation token beside it. Reads hold the lock shared
//! through their data reads (so no slot they planned to read can be freed and reused under
//! them, nor rewritten in place); every change (writes, catalog operations, each step of
//! garbage collection) takes the token, then the lock exclusively. The group commit lets the
//! lock go, keeping the token, while it writes fresh slots no tree points at yet (`commit`).
//! The flush's fsyncs run without the lock.
//!
//! The parts, one concern each, all `impl Store` over the fields declared here:
//! - this file: the [`Store`] itself, [`StoreError`], opening a data directory, catalog
//!   operations ([`Store::op`]) and the helpers the others share;
//! - `read`: reads, block status, extents and digests (shared lock);
//! - `commit`: the write path: the group commit of writes, zeroing, ingest writes;
//! - `flush`: making answered writes durable and freed slots reusable;
//! - `gc`: garbage collection in bounded steps, the lock let go between them;
//! - `generation`: the flush generation that detects a metadata store rolled back at start;
//! - `check`: `forkd check` and `forkd repair` on a stopped daemon's data directory;
//! - `format`: the data directory's format and engine, and converting `meta/` between engines;
//! - `reclaim`: compacting the metadata engine once a fifth of `meta/` could be given back;
//! - `scrub`: checking every stored block; `damaged`: the register of damaged slots, which
//!   poisons their digests so the next ingest sends them again;
//! - `space`: the emergency reserve, the metadata headroom, and what a full disk does;
//! - `engine`: the io_uring data engine (the store's only unsafe code);
//! - `oplog`: the operation log, appended durably and never failing the operation it records;
//! - `exports`: the live connections per export that rewind, refresh and delete fence and
//!   drain before they switch a head;
//! - `pool`: the low-space threshold that refuses new clones and ingests, and the space gauges;
//! - `quota`: the check that refuses a write taking a clone past its quota;
//! - `busy`: the names (environments, their members) an operation is working on, so two
//!   environment operations never overlap.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard};

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use catalog::{Catalog, CatalogError, BLOCK_SIZE};

use crate::metrics::Metrics;
use commit::Pending;
use engine::Engine;

pub mod busy;
mod check;
mod commit;
mod damaged;
#[allow(unsafe_code)] // the store's only unsafe code: io_uring buffers (see its SAFETY notes)
pub mod engine;
pub mod exports;
mod flush;
mod format;
mod gc;
mod generation;
mod oplog;
pub mod pool;
mod quota;
mod read;
mod reclaim;
pub mod replica;
mod scrub;
mod space;
#[cfg(test)]
mod write_tests;

pub use check::{check, compact, repair, CheckReport};
pub use metakv::Engine as MetaEngine;
pub use oplog::now_ms;
pub use read::BlockState;
pub use scrub::{ScrubFailure, ScrubOutcome, ScrubProgress, ScrubReport};
pub(crate) use space::is_enospc;

/// Largest single read or write the store accepts (bigger requests are split by callers).
pub const MAX_IO: u64 = 64 << 20;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A catalog rule or lookup failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The data directory cannot be used.
    #[error("data directory {path}: {why}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Reading or writing the extent file failed.
    #[error("I/O on the extent file: {0}")]
    Io(#[from] std::io::Error),
    /// Stored data does not match its checksum.
    #[error("checksum mismatch in `{volume}` at offset {offset}: the stored block is damaged")]
    Checksum {
        /// The volume or snapshot read.
        volume: String,
        /// Byte offset of the damaged block.
        offset: u64,
    },
    /// A request larger than [`MAX_IO`].
    #[error("request of {0} bytes is larger than the 64 MiB limit")]
    TooLarge(u64),
    /// The metadata store failed outside a catalog operation.
    #[error("metadata store: {0}")]
    Meta(#[from] metakv::KvError),
    /// Free space is below the low-space threshold: new clones and ingests are refused (`pool`).
    #[error("{}", pool::low_space_message(*free, *threshold, what))]
    LowSpace {
        /// Free bytes on the data directory's filesystem.
        free: u64,
        /// The threshold, in bytes.
        threshold: u64,
        /// What was refused (`clones`, `ingests`).
        what: &'static str,
    },
    /// Another operation is working on this environment or volume (see `busy`).
    #[error("an operation on {0} is running")]
    Busy(String),
}

impl From<catalog::BlockMapError> for StoreError {
    fn from(e: catalog::BlockMapError) -> Self {
        StoreError::Catalog(CatalogError::Map(e))
    }
}

/// Result of the store.
pub type Result<T> = std::result::Result<T, StoreError>;

/// An open data directory.
#[derive(Debug)]
pub struct Store {
    catalog: RwLock<Catalog>,
    engine: Engine,
    /// The metadata engine under the catalog and map (shared with the map).
    kv: Arc<dyn metakv::MetaKv>,
    /// The flush generation, in the engine and in `flushed`: detects a rolled-back `meta/`.
    generation: generation::Generation,
    dir: PathBuf,
    /// Held for the life of the store: one daemon per data directory.
    _lock: nix::fcntl::Flock<File>,
    /// Emergency space (`reserve`): released when the disk fills so that trims and deletes
    /// can still commit the metadata that frees space.
    reserve: Mutex<File>,
    /// The reserve's size, which is also the free space kept beside it for the metadata
    /// store (`space::Store::headroom`).
    reserve_bytes: u64,
    /// Set while the reserve is released: new data is refused until it can be re-created.
    low_space: AtomicBool,
    /// Below this many free bytes, new clones and ingests are refused (`pool`).
    low_space_threshold: AtomicU64,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    /// Live protocol connections per export, for rewind/refresh/delete.
    pub exports: exports::ExportRegistry,
    /// Sources with an ingest stream arriving right now.
    pub ingests: ActiveIngests,
    /// Names an environment operation is working on (`busy`).
    busy: busy::Busy,
    /// Writes waiting for the next group commit.
    queue: Mutex<Vec<Arc<Pending>>>,
    /// Held by the writer committing the queue.
    committer: Mutex<()>,
    /// Held by the running flush (`flush`): flushes never overlap.
    flushing: Mutex<()>,
    /// Held by whoever changes the catalog, from its first look to its commit: taken before the
    /// write lock ([`Store::catalog_mut`]). The group commit keeps it while it writes a segment's
    /// fresh slots without the write lock, so reads go on meanwhile and no other change (an
    /// operation, a trim, a flush) sees its allocation half done.
    mutation: Mutex<()>,
    /// Set by every committed write, cleared by a flush: tells the periodic flush whether
    /// there is anything to make durable.
    unflushed: AtomicBool,
    /// The map's `freed_nodes` at the last reclaim (see `reclaim`).
    reclaimed_at: AtomicU64,
    /// Set once the log has advised `forkd compact` (see `reclaim`).
    compact_advised: AtomicBool,
    /// The flush count at the last upkeep (see `reclaim`).
    upkept_at: AtomicU64,
    /// Scrub progress and the register of damaged slots (`scrub`).
    scrub: scrub::ScrubState,
    /// The garbage collector's wake-up call and state (`gc`).
    gc: gc::Collector,
    /// Garbage nodes per collection step (`gc`).
    gc_step_nodes: std::sync::atomic::AtomicUsize,
}

impl Drop for Store {
    /// A clean close is a full flush: data, the map's write-back layer, the metadata engine.
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "final flush failed");
        }
    }
}

/// The catalog under its write lock and the mutation token (see [`Store::catalog_mut`]).
struct CatalogMut<'a> {
    // Fields drop in order: the write lock is let go before the token.
    cat: RwLockWriteGuard<'a, Catalog>,
    _mutation: MutexGuard<'a, ()>,
}

impl std::ops::Deref for CatalogMut<'_> {
    type Target = Catalog;
    fn deref(&self) -> &Catalog {
        &self.cat
    }
}

impl std::ops::DerefMut for CatalogMut<'_> {
    fn deref_mut(&mut self) -> &mut Catalog {
        &mut self.cat
    }
}

/// Sources with an ingest stream arriving right now (at most one each).
#[derive(Debug, Default)]
pub struct ActiveIngests(Mutex<HashSet<String>>);

/// Held while a stream is received; dropping it frees the source for the next stream.
#[derive(Debug)]
pub struct IngestClaim<'a>(&'a ActiveIngests, String);

impl ActiveIngests {
    /// Claim `source`, unless a stream into it is already arriving.
    pub fn claim(&self, source: &str) -> Option<IngestClaim<'_>> {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        set.insert(source.to_string()).then(|| IngestClaim(self, source.to_string()))
    }

    /// True while a stream into `source` is arriving.
    pub fn is_active(&self, source: &str) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).contains(source)
    }
}

impl Drop for IngestClaim<'_> {
    fn drop(&mut self) {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
    }
}

fn slot_offset(slot: u64) -> u64 {
    (slot - 1) * BLOCK_SIZE
}

/// Group sorted `(slot, index)` pairs into runs of consecutive slots.
fn runs(pairs: &[(u64, usize)]) -> impl Iterator<Item = &[(u64, usize)]> {
    pairs.chunk_by(|a, b| a.0 + 1 == b.0 && a.1 + 1 == b.1)
}

impl Store {
    /// Open (creating if needed) the data directory `dir`, with the engine it records (a new
    /// directory gets the default engine; see `format`).
    pub fn open(dir: &Path) -> Result<Store> {
        Store::open_with(dir, None)
    }

    /// [`Store::open`], asking for metadata engine `engine`: a new directory is created with it,
    /// an existing one converted to it.
    pub fn open_with(dir: &Path, engine: Option<metakv::Engine>) -> Result<Store> {
        let bad = |why: String| StoreError::DataDir { path: dir.to_path_buf(), why };
        let lock = lock_dir(dir)?;
        let meta = dir.join("meta");
        format::finish_conversion(dir).map_err(bad)?;
        check_complete(dir).map_err(bad)?;
        // The reserve is opened, and released if the disk is short of space, before the metadata
        // engine is: opening it writes, and on a full disk the reserve is the only room there is.
        let reserve = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("reserve"))
            .map_err(|e| bad(format!("cannot open its space reserve: {e}")))?;
        let reserve_bytes = space::reserve_size(dir);
        // The metadata store's own room (as large as the reserve): new data is refused (and the
        // reserve released) when less than this is free, so the engine never meets a full disk.
        let short = space::release_if_short(dir, &reserve, reserve_bytes);
        let fresh = !meta.exists();
        let kv = format::open_meta(dir, engine).map_err(bad)?;
        let generation = generation::Generation::open(dir, kv.as_ref(), fresh).map_err(bad)?;
        let catalog = Catalog::open(kv.clone()).map_err(|e| bad(format!("cannot load its catalog: {e}")))?;
        // FORKD_NO_IO_URING=1 forces the pread/pwrite fallback (diagnosis, old kernels).
        let no_uring = std::env::var_os("FORKD_NO_IO_URING").is_some_and(|v| v == "1");
        let engine = Engine::open_with(&dir.join("extents.0"), no_uring)?;
        if !engine.uses_io_uring() {
            tracing::warn!("io_uring is not available; data I/O falls back to pread/pwrite");
        }
        // The names of the files just created (extents.0, reserve, flushed) must survive a power
        // cut before anything is written into them and acknowledged.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| bad(format!("cannot make its directory entries durable: {e}")))?;
        let store = Store {
            catalog: RwLock::new(catalog),
            engine,
            kv,
            generation,
            dir: dir.to_path_buf(),
            _lock: lock,
            reserve: Mutex::new(reserve),
            reserve_bytes,
            low_space: AtomicBool::new(short),
            low_space_threshold: AtomicU64::new(0),
            metrics: Metrics::new(),
            exports: Default::default(),
            ingests: Default::default(),
            busy: Default::default(),
            queue: Mutex::new(Vec::new()),
            committer: Mutex::new(()),
            flushing: Mutex::new(()),
            mutation: Mutex::new(()),
            unflushed: AtomicBool::new(false),
            reclaimed_at: AtomicU64::new(0),
            compact_advised: AtomicBool::new(false),
            upkept_at: AtomicU64::new(u64::MAX),
            scrub: scrub::ScrubState::open(dir),
            gc: Default::default(),
            gc_step_nodes: std::sync::atomic::AtomicUsize::new(catalog::GC_STEP_NODES),
        };
        if !store.restore_reserve() {
            tracing::warn!("the disk is full: new data is refused until deletes or trims free space");
        }
        // Slots on the free list may not have been punched before a crash: do it now.
        store.flush()?;
        store.punch_beyond_high_water();
        store.metrics.update_volumes(&store.catalog());
        store.update_garbage_gauge(&store.catalog());
        store.set_low_space_threshold(pool::Threshold::default());
        Ok(store)
    }

    /// The metadata engine holding `meta/`.
    pub fn meta_engine(&self) -> metakv::Engine {
        self.kv.engine()
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Shared access to the catalog (for listing, resolving, planning reads).
    pub fn catalog(&self) -> RwLockReadGuard<'_, Catalog> {
        self.catalog.read()
    }

    /// Exclusive access to the catalog for a change: the mutation token, then the write lock.
    fn catalog_mut(&self) -> CatalogMut<'_> {
        let mutation = self.mutation();
        CatalogMut { cat: self.catalog.write(), _mutation: mutation }
    }

    /// The mutation token alone (see [`Store::mutation`]'s field): held by the group commit
    /// across a segment, whose data is written without the write lock.
    fn mutation(&self) -> MutexGuard<'_, ()> {
        self.mutation.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Streaming mode for the calling thread until the guard is dropped (the ingest writer):
    /// its large aligned runs go to disk around the page cache ([`engine`], "Streaming
    /// writes"). What is promised, and when, does not change.
    pub fn streaming_writes(&self) -> engine::Streaming {
        self.engine.streaming()
    }

    /// Run a catalog operation and make it durable before returning. On a full disk it is
    /// refused before it changes anything: it would only add metadata. Operations that free
    /// space use [`Store::op_freeing`].
    pub fn op<T>(&self, f: impl FnOnce(&mut Catalog) -> std::result::Result<T, CatalogError>) -> Result<T> {
        self.check_space()?;
        self.note_enospc(self.op_inner(f))
    }

    /// [`Store::op`] for an operation that gives space back (delete, abandoning an ingest):
    /// it runs on a full disk too, committing its metadata in the room the reserve left.
    pub fn op_freeing<T>(&self, f: impl FnOnce(&mut Catalog) -> std::result::Result<T, CatalogError>) -> Result<T> {
        self.keep_headroom();
        self.note_enospc(self.op_inner(f))
    }

    fn op_inner<T>(&self, f: impl FnOnce(&mut Catalog) -> std::result::Result<T, CatalogError>) -> Result<T> {
        let out = {
            let mut cat = self.catalog_mut();
            let out = f(&mut cat);
            if out.is_err() && cat.map().in_transaction() {
                cat.map_mut().rollback();
            }
            out?
        };
        // Garbage the operation's own first step left: the collector takes it from here (`gc`).
        if self.garbage_pending() {
            self.wake_collector();
        }
        self.flush()?;
        let cat = self.catalog();
        self.metrics.update_volumes(&cat);
        self.update_garbage_gauge(&cat);
        Ok(out)
    }
}

/// Create `dir` if needed and take its `LOCK`: one daemon per data directory.
fn lock_dir(dir: &Path) -> Result<nix::fcntl::Flock<File>> {
    let bad = |why: String| StoreError::DataDir { path: dir.to_path_buf(), why };
    std::fs::create_dir_all(dir).map_err(|e| bad(format!("cannot create it: {e}")))?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))
        .map_err(|e| bad(format!("cannot open its lock file: {e}")))?;
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| bad("another forkd daemon is using it".into()))
}

/// Refuse a data directory that has one of its two halves without the other: metadata
/// without `extents.0`, or data in `extents.0` without `meta/` (opening would start an empty
/// catalog beside it, and the data would be lost for good once new writes reuse its slots).
fn check_complete(dir: &Path) -> std::result::Result<(), String> {
    let extents = dir.join("extents.0");
    match (dir.join("meta").exists(), std::fs::metadata(&extents)) {
        (true, Err(_)) => Err("its metadata exists but extents.0 is missing: the directory is incomplete".into()),
        (false, Ok(m)) if std::os::unix::fs::MetadataExt::blocks(&m) > 0 => {
            let held = std::os::unix::fs::MetadataExt::blocks(&m) * 512;
            Err(format!(
                "extents.0 holds {held} bytes ({:.1} MiB) of data but meta/, the metadata that maps it, is \
                 missing: restore meta/ from a backup, or move extents.0 away to start with an empty store",
                held as f64 / f64::from(1u32 << 20)
            ))
        }
        _ => Ok(()),
    }
}

/// Bytes a path takes on disk (st_blocks * 512, recursively), like `du -sB1`.
pub fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::symlink_metadata(path) else { return 0 };
    let own = m.blocks() * 512;
    if !m.is_dir() {
        return own;
    }
    let entries = std::fs::read_dir(path).into_iter().flatten().flatten();
    own + entries.map(|e| disk_usage(&e.path())).sum::<u64>()
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

fn check_range(name: &str, size: u64, offset: u64, len: u64) -> Result<()> {
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(CatalogError::OutOfRange { volume: name.to_string(), offset, length: len, size }.into());
    }
    Ok(())
}
