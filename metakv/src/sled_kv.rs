//! The sled 0.34 adapter: one tree (`forkd`) holds every record.
//!
//! Durability: sled's `flush` makes its log stable with `sync_file_range`, which flushes
//! neither the disk's volatile write cache nor the file's own metadata (a grown log), and
//! nothing in sled fsyncs the directories its files were created in. The power-cut harness
//! (`tests/powercut`) showed every acknowledged flush lost at a cut without more. So
//! [`SledKv::commit`] follows sled's flush with `fdatasync` of its log (`db`) and `fsync` of
//! the directories that name its files (the store's parent directory, the store, `blobs/`).
//! sled writes `conf` once, when it creates the store: that is made durable at open only.

use std::fs::File;
use std::path::Path;

use crate::{Batch, Engine, KvError, MetaKv, Result, GENERATION_KEY};

/// Where data directories written before issue 10 keep the flush generation: sled's default
/// tree. [`SledKv::open`] moves it into the `forkd` tree, beside every other record.
const LEGACY_GENERATION: &[u8] = b"forkd.flush_generation";

/// A sled database and the files that make its flush durable.
#[derive(Debug)]
pub struct SledKv {
    db: sled::Db,
    tree: sled::Tree,
    log: File,
    dirs: Vec<File>,
}

impl From<sled::Error> for KvError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(e) => KvError::Io(e),
            other => KvError::Engine(other.to_string()),
        }
    }
}

impl SledKv {
    /// Open (creating if needed) the sled store in `path`.
    pub fn open(path: &Path) -> Result<SledKv> {
        let db = open_db(path)?;
        let tree = db.open_tree("forkd")?;
        if let Some(g) = db.get(LEGACY_GENERATION)? {
            if tree.get(GENERATION_KEY)?.is_none() {
                tree.insert(GENERATION_KEY, g)?;
            }
            db.remove(LEGACY_GENERATION)?;
        }
        let conf = path.join("conf");
        if conf.exists() {
            File::open(conf)?.sync_data()?;
        }
        let log = File::open(path.join("db"))?;
        let mut dirs = vec![File::open(path)?];
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            dirs.push(File::open(parent)?);
        }
        let blobs = path.join("blobs");
        if blobs.is_dir() {
            dirs.push(File::open(blobs)?);
        }
        let kv = SledKv { db, tree, log, dirs };
        kv.commit()?;
        Ok(kv)
    }
}

/// Open sled at `path`. A busy sled lock can only be this process's previous store still
/// shutting down its threads (the data directory's own lock keeps other processes out): wait
/// for it briefly.
fn open_db(path: &Path) -> sled::Result<sled::Db> {
    let mut tries = 0;
    loop {
        let r = sled::Config::new().path(path).cache_capacity(64 << 20).flush_every_ms(None).open();
        match r {
            Err(sled::Error::Io(e)) if is_busy(&e) && tries < 250 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// sled's "could not acquire lock" (sometimes `WouldBlock`, sometimes wrapped in `Other`).
fn is_busy(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

impl MetaKv for SledKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, prefix: &[u8], visit: &mut dyn FnMut(&[u8], &[u8])) -> Result<()> {
        for kv in self.tree.scan_prefix(prefix) {
            let (k, v) = kv?;
            visit(&k, &v);
        }
        Ok(())
    }

    fn apply(&self, batch: &Batch) -> Result<()> {
        let mut b = sled::Batch::default();
        for (k, v) in batch.ops() {
            match v {
                Some(v) => b.insert(k.as_slice(), v.as_slice()),
                None => b.remove(k.as_slice()),
            }
        }
        Ok(self.tree.apply_batch(b)?)
    }

    fn commit(&self) -> Result<()> {
        self.db.flush()?;
        self.log.sync_data()?;
        for d in &self.dirs {
            d.sync_all()?;
        }
        Ok(())
    }

    fn engine(&self) -> Engine {
        Engine::Sled
    }
}
