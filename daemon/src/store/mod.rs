//! The store: a data directory holding the catalog and extent map (sled, under `meta/`) and the
//! extent file (`extents.0`, 4 KiB slots read and written through the io_uring [`Engine`]).
//!
//! It owns the rules that tie metadata to data:
//! - new data goes into freshly allocated slots and is written before the map points at it,
//!   so a committed pointer never sees half-written data, even after `kill -9`;
//! - a flush is `fdatasync(extents)` then `sled flush`: after it returns, every write answered
//!   before it is on disk, and only then are slots freed before it punched and reused;
//! - every catalog operation is followed by a flush, so it is durable when it returns;
//! - a block whose crc32 does not match is an I/O error naming the volume and offset.
//!
//! Locking: one `RwLock<Catalog>`. Reads hold it shared through their data reads (so no slot
//! they planned to read can be freed and reused under them); writes and catalog operations
//! hold it exclusively. The flush's fsyncs run without the lock.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use catalog::{Catalog, CatalogError, Entry, BLOCK_SIZE};

use crate::metrics::Metrics;
use engine::Engine;

#[allow(unsafe_code)] // the only unsafe code in the crate: io_uring buffers (see its SAFETY notes)
pub mod engine;

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
    Meta(#[from] sled::Error),
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
    db: sled::Db,
    dir: PathBuf,
    /// Held for the life of the store: one daemon per data directory.
    _lock: nix::fcntl::Flock<File>,
    /// Emergency space (`reserve`): released when the disk fills so that trims and deletes
    /// can still commit the metadata that frees space.
    reserve: Mutex<File>,
    reserve_bytes: u64,
    /// Set while the reserve is released: new data is refused until it can be re-created.
    low_space: AtomicBool,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    /// Live protocol connections per export, for rewind/refresh/delete.
    pub exports: crate::server::exports::ExportRegistry,
    /// Sources with an ingest stream arriving right now.
    pub ingests: ActiveIngests,
    /// Writes waiting for the next group commit.
    queue: Mutex<Vec<Arc<Pending>>>,
    /// Held by the writer committing the queue.
    committer: Mutex<()>,
    /// Set by every committed write, cleared by a flush: tells the periodic flush whether
    /// there is anything to make durable.
    unflushed: AtomicBool,
}

impl Drop for Store {
    /// A clean close is a full flush: data, the map's write-back layer, sled.
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "final flush failed");
        }
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

/// A write waiting for a group commit, and its outcome.
#[derive(Debug)]
struct Pending {
    volume: String,
    offset: u64,
    data: bytes::Bytes,
    /// Into a source's running ingest rather than a clone's head.
    staging: bool,
    result: Mutex<Option<Result<()>>>,
}

impl Pending {
    fn new(volume: &str, offset: u64, data: bytes::Bytes, staging: bool) -> Pending {
        Pending { volume: volume.to_string(), offset, data, staging, result: Mutex::new(None) }
    }

    fn set(&self, r: Result<()>) {
        *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    }

    fn is_unset(&self) -> bool {
        self.result.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }

    fn take(&self) -> Option<Result<()>> {
        self.result.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// A checked write with its whole blocks assembled.
#[derive(Debug)]
struct Prepared {
    pending: Arc<Pending>,
    first: u64,
    blocks: bytes::Bytes,
}

/// The same error for each write of a failed group commit.
fn replicate(e: &StoreError) -> StoreError {
    let io = |e: &std::io::Error| match e.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::new(e.kind(), e.to_string()),
    };
    match e {
        StoreError::Io(e) => StoreError::Io(io(e)),
        StoreError::Meta(sled::Error::Io(e)) => StoreError::Io(io(e)),
        StoreError::Catalog(CatalogError::Map(catalog::BlockMapError::Store(sled::Error::Io(e)))) => {
            StoreError::Io(io(e))
        }
        other => StoreError::Io(std::io::Error::other(other.to_string())),
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
    /// Open (creating if needed) the data directory `dir`.
    pub fn open(dir: &Path) -> Result<Store> {
        let bad = |why: String| StoreError::DataDir { path: dir.to_path_buf(), why };
        std::fs::create_dir_all(dir).map_err(|e| bad(format!("cannot create it: {e}")))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(|e| bad(format!("cannot open its lock file: {e}")))?;
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| bad("another forkd daemon is using it".into()))?;
        let meta = dir.join("meta");
        let fresh = !meta.exists();
        if !fresh && !dir.join("extents.0").exists() {
            return Err(bad("its metadata exists but extents.0 is missing: the directory is incomplete".into()));
        }
        // We hold LOCK, so a busy sled lock can only be this process's previous store still
        // shutting down its threads: wait for it briefly.
        let mut tries = 0;
        let db = loop {
            let r = sled::Config::new().path(&meta).cache_capacity(64 << 20).flush_every_ms(None).open();
            match r {
                Err(sled::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock && tries < 250 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => break r.map_err(|e| bad(format!("cannot open its metadata store: {e}")))?,
            }
        };
        let tree = db.open_tree("forkd")?;
        let catalog = Catalog::open(tree).map_err(|e| bad(format!("cannot load its catalog: {e}")))?;
        // FORKD_NO_IO_URING=1 forces the pread/pwrite fallback (diagnosis, old kernels).
        let no_uring = std::env::var_os("FORKD_NO_IO_URING").is_some_and(|v| v == "1");
        let engine = Engine::open_with(&dir.join("extents.0"), no_uring)?;
        let reserve = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("reserve"))
            .map_err(|e| bad(format!("cannot open its space reserve: {e}")))?;
        let reserve_bytes = reserve_size(dir);
        if !engine.uses_io_uring() {
            tracing::warn!("io_uring is not available; data I/O falls back to pread/pwrite");
        }
        let store = Store {
            catalog: RwLock::new(catalog),
            engine,
            db,
            dir: dir.to_path_buf(),
            _lock: lock,
            reserve: Mutex::new(reserve),
            reserve_bytes,
            low_space: AtomicBool::new(false),
            metrics: Metrics::new(),
            exports: Default::default(),
            ingests: Default::default(),
            queue: Mutex::new(Vec::new()),
            committer: Mutex::new(()),
            unflushed: AtomicBool::new(false),
        };
        if !store.restore_reserve() {
            tracing::warn!("the disk is full: new data is refused until deletes or trims free space");
        }
        // Slots on the free list may not have been punched before a crash: do it now.
        store.flush()?;
        store.metrics.update_volumes(&store.catalog());
        Ok(store)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Shared access to the catalog (for listing, resolving, planning reads).
    pub fn catalog(&self) -> RwLockReadGuard<'_, Catalog> {
        self.catalog.read().unwrap_or_else(|p| p.into_inner())
    }

    fn catalog_mut(&self) -> RwLockWriteGuard<'_, Catalog> {
        self.catalog.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Run a catalog operation and make it durable before returning.
    pub fn op<T>(&self, f: impl FnOnce(&mut Catalog) -> std::result::Result<T, CatalogError>) -> Result<T> {
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
        self.flush()?;
        self.metrics.update_volumes(&self.catalog());
        Ok(out)
    }

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
        self.unflushed.store(false, Ordering::SeqCst);
        let ticket = self.catalog_mut().map_mut().begin_flush();
        // Data first, then the pointers to it: fsync the extents, hand the map's write-back
        // layer to sled, fsync sled.
        self.engine.sync()?;
        self.catalog_mut().map_mut().spill()?;
        self.db.flush()?;
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

    /// Re-create the space reserve if it was released; false while the disk is still full.
    fn restore_reserve(&self) -> bool {
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
                self.low_space.store(true, Ordering::SeqCst);
                false
            }
        }
    }

    /// If `r` failed for lack of space, release the reserve so operations that free space
    /// can still commit, and refuse new data until the reserve is back.
    fn note_enospc<T>(&self, r: Result<T>) -> Result<T> {
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
    fn check_space(&self) -> Result<()> {
        if self.low_space.load(Ordering::SeqCst) && !self.restore_reserve() {
            return Err(StoreError::Io(std::io::Error::from_raw_os_error(libc::ENOSPC)));
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset` of a volume or snapshot. Any offset and length inside
    /// the volume is allowed.
    pub fn read(&self, reference: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cat = self.catalog();
        let t = cat.target(reference)?;
        self.read_target(&cat, &t.name, t.root, t.size_bytes, offset, buf)
    }

    fn read_target(
        &self,
        cat: &Catalog,
        name: &str,
        root: catalog::NodeId,
        size: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let len = buf.len() as u64;
        check_range(name, size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let first = offset / BLOCK_SIZE;
        let last = (offset + len - 1) / BLOCK_SIZE;
        let entries = cat.map().lookup(root, first, last - first + 1)?;
        // Blocks are read whole (to check their crc) into a bounce buffer when the request
        // does not cover them exactly.
        let aligned = offset.is_multiple_of(BLOCK_SIZE) && len.is_multiple_of(BLOCK_SIZE);
        let mut bounce = if aligned { Vec::new() } else { vec![0u8; usize_of(entries.len() as u64 * BLOCK_SIZE)] };
        let whole: &mut [u8] = if aligned { buf } else { &mut bounce };
        let mut pairs: Vec<(u64, usize)> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            match e {
                Some(e) if e.has_data() => pairs.push((e.slot, i)),
                _ => whole[i * 4096..(i + 1) * 4096].fill(0),
            }
        }
        pairs.sort_unstable();
        {
            let mut rest: &mut [u8] = whole;
            let mut consumed = 0usize;
            let mut ios: Vec<(u64, &mut [u8])> = Vec::new();
            // Split the buffer into runs in block order (pairs sorted by slot, so we sort the
            // runs by block index to carve the buffer front to back).
            let mut rs: Vec<&[(u64, usize)]> = runs(&pairs).collect();
            rs.sort_unstable_by_key(|r| r[0].1);
            for r in rs {
                let start = r[0].1 * 4096;
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(start - consumed);
                let (this, tail) = tail.split_at_mut(r.len() * 4096);
                ios.push((slot_offset(r[0].0), this));
                rest = tail;
                consumed = start + r.len() * 4096;
            }
            self.engine.read_many(&mut ios)?;
        }
        for (i, e) in entries.iter().enumerate() {
            if let Some(e) = e.filter(Entry::has_data) {
                if catalog::blockmap::block_crc(&whole[i * 4096..(i + 1) * 4096]) != e.crc {
                    let at = (first + i as u64) * BLOCK_SIZE;
                    self.metrics.checksum_errors.inc();
                    tracing::error!(volume = name, offset = at, slot = e.slot, "checksum mismatch: block is damaged");
                    return Err(StoreError::Checksum { volume: name.to_string(), offset: at });
                }
            }
        }
        if !aligned {
            let skip = usize_of(offset - first * BLOCK_SIZE);
            buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        }
        self.metrics.read_bytes.inc_by(len);
        Ok(())
    }

    /// Write `data` at `offset` of a clone. Partial blocks are merged with their current
    /// contents; all-zero blocks are recorded as known zeros and take no space.
    pub fn write(&self, volume: &str, offset: u64, data: &[u8]) -> Result<()> {
        self.write_bytes(volume, offset, bytes::Bytes::copy_from_slice(data))
    }

    /// [`Store::write`] without copying the data.
    pub fn write_bytes(&self, volume: &str, offset: u64, data: bytes::Bytes) -> Result<()> {
        self.check_space()?;
        self.note_enospc(self.submit(Pending::new(volume, offset, data, false)))
    }

    /// Group commit: every writer queues its write, then whoever holds the committer lock
    /// takes the whole queue and commits it as one transaction (one io_uring submission, one
    /// sled batch). Writers whose write a previous committer already took just collect their
    /// result. Under load this turns many small commits into a few large ones.
    fn submit(&self, p: Pending) -> Result<()> {
        self.submit_many(vec![p]).pop().unwrap_or_else(|| Err(StoreError::Io(std::io::Error::other("write lost"))))
    }

    fn submit_many(&self, ps: Vec<Pending>) -> Vec<Result<()>> {
        let ps: Vec<Arc<Pending>> = ps.into_iter().map(Arc::new).collect();
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).extend(ps.iter().cloned());
        let _committer = self.committer.lock().unwrap_or_else(|e| e.into_inner());
        if ps.iter().any(|p| p.is_unset()) {
            let batch = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
            self.commit_batch(batch);
        }
        ps.iter()
            .map(|p| p.take().unwrap_or_else(|| Err(StoreError::Io(std::io::Error::other("write was not committed")))))
            .collect()
    }

    /// Several writes to clones, committed together (see [`Store::write`]); one result each.
    pub fn write_many(&self, writes: Vec<(String, u64, bytes::Bytes)>) -> Vec<Result<()>> {
        if let Err(e) = self.check_space() {
            return writes.iter().map(|_| Err(replicate(&e))).collect();
        }
        let ps = writes.into_iter().map(|(v, off, data)| Pending::new(&v, off, data, false)).collect();
        self.submit_many(ps).into_iter().map(|r| self.note_enospc(r)).collect()
    }

    fn commit_batch(&self, batch: Vec<Arc<Pending>>) {
        let mut cat = self.catalog_mut();
        let mut segment: Vec<Prepared> = Vec::new();
        let mut touched: HashSet<(String, u64)> = HashSet::new();
        for p in batch {
            // A read-modify-write of a block written earlier in this batch must see that
            // write: commit what came before first.
            let len = p.data.len() as u64;
            let unaligned = !p.offset.is_multiple_of(BLOCK_SIZE) || !len.is_multiple_of(BLOCK_SIZE);
            if unaligned && len > 0 {
                let edges = [p.offset / BLOCK_SIZE, (p.offset + len - 1) / BLOCK_SIZE];
                if edges.iter().any(|&b| touched.contains(&(p.volume.clone(), b))) {
                    self.commit_segment(&mut cat, std::mem::take(&mut segment));
                    touched.clear();
                }
            }
            match self.prepare(&cat, &p) {
                Ok(Some(prep)) => {
                    for b in prep.first..prep.first + (prep.blocks.len() as u64 / BLOCK_SIZE) {
                        touched.insert((p.volume.clone(), b));
                    }
                    segment.push(prep);
                }
                Ok(None) => p.set(Ok(())),
                Err(e) => p.set(Err(e)),
            }
        }
        self.commit_segment(&mut cat, segment);
    }

    /// Check one write and assemble its whole blocks (edges of an unaligned write keep their
    /// current bytes). `None` for an empty write.
    fn prepare(&self, cat: &Catalog, p: &Arc<Pending>) -> Result<Option<Prepared>> {
        let (volume, offset, len) = (p.volume.as_str(), p.offset, p.data.len() as u64);
        if len > MAX_IO {
            return Err(StoreError::TooLarge(len));
        }
        if volume.contains('@') {
            // A snapshot reference: it must exist, and it is read-only.
            let t = cat.target(volume)?;
            return Err(CatalogError::ReadOnly(t.name).into());
        }
        let v = cat.volume(volume)?;
        let root = match (&v.staging, p.staging, v.kind) {
            (Some(s), true, _) => s.root,
            (None, true, _) => return Err(CatalogError::NoIngest(v.name.clone()).into()),
            (_, false, catalog::Kind::Source) => return Err(CatalogError::ReadOnly(v.name.clone()).into()),
            (_, false, _) => v.root,
        };
        let size = v.size_bytes;
        check_range(volume, size, offset, len)?;
        if len == 0 {
            return Ok(None);
        }
        let first = offset / BLOCK_SIZE;
        let last = (offset + len - 1) / BLOCK_SIZE;
        let nblocks = usize_of(last - first + 1);
        let head = usize_of(offset - first * BLOCK_SIZE);
        let blocks = if head == 0 && len % BLOCK_SIZE == 0 {
            p.data.clone()
        } else {
            let mut whole = vec![0u8; nblocks * 4096];
            let edge = |i: usize| i * 4096..(i + 1) * 4096;
            self.read_target(cat, volume, root, size, first * BLOCK_SIZE, &mut whole[edge(0)])?;
            if nblocks > 1 {
                self.read_target(cat, volume, root, size, last * BLOCK_SIZE, &mut whole[edge(nblocks - 1)])?;
            }
            whole[head..head + p.data.len()].copy_from_slice(&p.data);
            bytes::Bytes::from(whole)
        };
        Ok(Some(Prepared { pending: p.clone(), first, blocks }))
    }

    /// Allocate, write and map a segment of prepared writes as one transaction; every write
    /// in it gets the outcome.
    fn commit_segment(&self, cat: &mut Catalog, segment: Vec<Prepared>) {
        if segment.is_empty() {
            return;
        }
        let fail = |segment: &[Prepared], e: &StoreError| {
            for prep in segment {
                prep.pending.set(Err(replicate(e)));
            }
        };
        // Entries: all-zero blocks become known zeros, the rest get fresh slots.
        let mut entries: Vec<Vec<Option<Entry>>> = Vec::with_capacity(segment.len());
        let mut need = 0usize;
        for prep in &segment {
            let es: Vec<Option<Entry>> = prep
                .blocks
                .chunks_exact(4096)
                .map(|b| if b.iter().all(|&x| x == 0) { Some(Entry::ZERO) } else { None })
                .collect();
            need += es.iter().filter(|e| e.is_none()).count();
            entries.push(es);
        }
        let slots = match cat.map_mut().alloc(need) {
            Ok(s) => s,
            Err(e) => {
                cat.map_mut().rollback();
                fail(&segment, &StoreError::from(e));
                return;
            }
        };
        let mut next = slots.into_iter();
        let mut pairs: Vec<(u64, usize, usize)> = Vec::with_capacity(need); // (slot, write, block)
        for (w, (prep, es)) in segment.iter().zip(entries.iter_mut()).enumerate() {
            for (i, e) in es.iter_mut().enumerate() {
                if e.is_none() {
                    let Some(slot) = next.next() else { break };
                    let b = &prep.blocks[i * 4096..(i + 1) * 4096];
                    // Only sources are ever compared by digest (ingest): host writes to clones
                    // skip hashing it.
                    let digest = if prep.pending.staging { catalog::blockmap::block_digest(b) } else { 0 };
                    *e = Some(Entry { slot, crc: catalog::blockmap::block_crc(b), digest });
                    pairs.push((slot, w, i));
                }
            }
        }
        let ios: Vec<(u64, &[u8])> = pairs
            .chunk_by(|a, b| a.0 + 1 == b.0 && a.1 == b.1 && a.2 + 1 == b.2)
            .map(|r| {
                let (slot, w, i) = r[0];
                (slot_offset(slot), &segment[w].blocks[i * 4096..(i + r.len()) * 4096])
            })
            .collect();
        if let Err(e) = self.engine.write_many(&ios) {
            cat.map_mut().rollback();
            fail(&segment, &StoreError::Io(e));
            return;
        }
        let staged = segment
            .iter()
            .zip(&entries)
            .try_for_each(|(prep, es)| cat.stage_write(&prep.pending.volume, prep.first, es, prep.pending.staging));
        if let Err(e) = staged.and_then(|()| cat.commit_staged()) {
            cat.rollback_staged();
            fail(&segment, &StoreError::Catalog(e));
            return;
        }
        self.unflushed.store(true, Ordering::SeqCst);
        for prep in &segment {
            self.metrics.written_bytes.inc_by(prep.pending.data.len() as u64);
            prep.pending.set(Ok(()));
        }
    }

    /// Make mapped blocks in a block-aligned range of a clone read as zeros, freeing what
    /// only they held. Holes stay holes.
    pub fn zero(&self, volume: &str, offset: u64, len: u64) -> Result<()> {
        let mut cat = self.catalog_mut();
        if volume.contains('@') {
            let t = cat.target(volume)?;
            return Err(CatalogError::ReadOnly(t.name).into());
        }
        let v = cat.volume(volume)?;
        if v.kind != catalog::Kind::Clone {
            return Err(CatalogError::ReadOnly(v.name.clone()).into());
        }
        check_range(volume, v.size_bytes, offset, len)?;
        if !offset.is_multiple_of(BLOCK_SIZE) || !len.is_multiple_of(BLOCK_SIZE) {
            return Err(CatalogError::BadReference {
                reference: format!("{volume}+{offset}+{len}"),
                why: "zeroing needs a 4096-aligned offset and length".into(),
            }
            .into());
        }
        let r = cat.zero(volume, offset / BLOCK_SIZE, len / BLOCK_SIZE, false).map_err(StoreError::from);
        drop(cat);
        self.unflushed.store(true, Ordering::SeqCst);
        self.note_enospc(r)
    }

    /// Zero any byte range of a clone: whole blocks become known zeros (freeing what only
    /// they held), partial edge blocks are rewritten with zeros.
    pub fn zero_range(&self, volume: &str, offset: u64, len: u64) -> Result<()> {
        let end = offset.checked_add(len).ok_or_else(|| {
            StoreError::from(CatalogError::OutOfRange { volume: volume.into(), offset, length: len, size: 0 })
        })?;
        let a = offset.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        let b = end / BLOCK_SIZE * BLOCK_SIZE;
        if a >= b {
            return self.write(volume, offset, &vec![0u8; usize_of(len)]);
        }
        if offset < a {
            self.write(volume, offset, &vec![0u8; usize_of(a - offset)])?;
        }
        if b < end {
            self.write(volume, b, &vec![0u8; usize_of(end - b)])?;
        }
        self.zero(volume, a, b - a)
    }

    /// Allocation status of `len` bytes at `offset`, as consecutive `(length, state)` runs:
    /// `HOLE` for ranges never written in the lineage, `ZERO` for known zeros, 0 for data.
    /// Answers at most `limit` bytes (callers may ask for a whole disk).
    pub fn block_status(&self, reference: &str, offset: u64, len: u64, limit: u64) -> Result<Vec<(u64, BlockState)>> {
        let cat = self.catalog();
        let t = cat.target(reference)?;
        check_range(&t.name, t.size_bytes, offset, len)?;
        let end = offset + len.min(limit.max(BLOCK_SIZE));
        let mut out: Vec<(u64, BlockState)> = Vec::new();
        if end == offset {
            return Ok(out);
        }
        let first = offset / BLOCK_SIZE;
        let last = (end - 1) / BLOCK_SIZE;
        let entries = cat.map().lookup(t.root, first, last - first + 1)?;
        for (i, e) in entries.iter().enumerate() {
            let bstart = (first + i as u64) * BLOCK_SIZE;
            let lo = bstart.max(offset);
            let hi = (bstart + BLOCK_SIZE).min(end);
            let state = match e {
                None => BlockState::Hole,
                Some(e) if !e.has_data() => BlockState::Zero,
                Some(_) => BlockState::Data,
            };
            match out.last_mut() {
                Some((l, s)) if *s == state => *l += hi - lo,
                _ => out.push((hi - lo, state)),
            }
        }
        Ok(out)
    }

    // ----- ingest ---------------------------------------------------------------------

    /// Write runs of whole blocks `(first block, data)` into a running ingest, committed
    /// together. Their crc32s were checked by the caller.
    pub fn ingest_data(&self, source: &str, runs: Vec<(u64, bytes::Bytes)>) -> Result<()> {
        if runs.is_empty() {
            return Ok(());
        }
        self.check_space()?;
        let ps = runs.into_iter().map(|(first, d)| Pending::new(source, first * BLOCK_SIZE, d, true)).collect();
        for r in self.submit_many(ps) {
            self.note_enospc(r)?;
        }
        Ok(())
    }

    /// Write whole blocks into a running ingest. `data` holds `count` blocks whose crc32s
    /// were checked by the caller; `None` marks blocks that became zero.
    pub fn ingest_blocks(&self, source: &str, first: u64, data: Option<&[u8]>, count: u64) -> Result<()> {
        match data {
            Some(d) => {
                self.check_space()?;
                let p = Pending::new(source, first * BLOCK_SIZE, bytes::Bytes::copy_from_slice(d), true);
                self.note_enospc(self.submit(p))
            }
            None => Ok(self.catalog_mut().zero(source, first, count, true)?),
        }
    }

    /// `(block, digest)` of the data blocks of a source's latest contents within the block
    /// ranges `(first, count)` (sorted, disjoint), in block order.
    pub fn digests_in(&self, source: &str, ranges: &[(u64, u64)]) -> Result<Vec<(u64, u64)>> {
        let cat = self.catalog();
        let (root, size) = cat.ingest_base(source)?;
        let mut out = Vec::new();
        for &(first, count) in ranges {
            check_range(source, size, first.saturating_mul(BLOCK_SIZE), count.saturating_mul(BLOCK_SIZE))?;
            for (i, e) in cat.map().lookup(root, first, count)?.into_iter().enumerate() {
                if let Some(e) = e.filter(Entry::has_data) {
                    out.push((first + i as u64, e.digest));
                }
            }
        }
        Ok(out)
    }

    /// `(block, digest)` of every data block of a source's latest contents, in block order.
    pub fn digests(&self, source: &str) -> Result<Vec<(u64, u64)>> {
        let cat = self.catalog();
        let (root, _) = cat.ingest_base(source)?;
        let mut out = Vec::new();
        cat.map().for_each(root, &mut |b, e| {
            if e.has_data() {
                out.push((b, e.digest));
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Byte ranges of a volume or snapshot that hold data, adjacent ones merged.
    pub fn extents(&self, reference: &str) -> Result<(u64, Vec<(u64, u64)>)> {
        let cat = self.catalog();
        let t = cat.target(reference)?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        cat.map().for_each(t.root, &mut |b, e| {
            if e.has_data() {
                let off = b * BLOCK_SIZE;
                match out.last_mut() {
                    Some((o, l)) if *o + *l == off => *l += BLOCK_SIZE,
                    _ => out.push((off, BLOCK_SIZE)),
                }
            }
            Ok(())
        })?;
        Ok((t.size_bytes, out))
    }
}

/// What a range of a volume holds, for block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Never written anywhere in the lineage (reads as zeros).
    Hole,
    /// Written or trimmed to zeros (reads as zeros, holds no data).
    Zero,
    /// Holds data.
    Data,
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

/// Emergency reserve: 5 % of the filesystem, between 1 MiB and 64 MiB.
fn reserve_size(dir: &Path) -> u64 {
    let total = nix::sys::statvfs::statvfs(dir).map(|s| s.blocks() * s.fragment_size()).unwrap_or(0);
    (total / 20).clamp(1 << 20, 64 << 20) / BLOCK_SIZE * BLOCK_SIZE
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
