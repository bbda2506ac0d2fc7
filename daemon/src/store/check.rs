//! `forkd check`, `forkd repair` and `forkd compact`: look at a stopped daemon's data
//! directory and say what it holds and what is wrong; only when asked with `--accept-loss`,
//! accept a metadata store that came back older than its last flush (issue 10, item 4); and
//! compact `meta/` when it is too large for the daemon to do it while serving (`reclaim`).
//!
//! The check opens `meta/` with the engine `format` names, without the start-up refusal, reads
//! the flush generation in the engine and in `flushed`, loads the catalog and walks every
//! tree (heads, snapshots, unfinished ingests): every node must be there and decode, and every
//! data slot must lie below the map's high-water mark. Data in `extents.0` past that mark was
//! written by changes the metadata no longer has: it is what a rolled-back store lost, and
//! what the next start gives back to the filesystem. Trees waiting in the garbage queue are
//! reachable from no volume: they are neither walked nor counted as referenced, and not a
//! problem (the daemon's collector dismantles them; the report says how many nodes wait).
//! Nothing is written by a check.
//!
//! Repair changes one thing: it rewrites `flushed` with the engine's generation, so the next
//! start accepts what `meta/` holds. It refuses when the check found damaged trees, since
//! opening those would fail anyway: restoring `meta/` from a backup is then the way.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use catalog::{Catalog, MetaKv, BLOCK_SIZE};

use super::{format, generation, lock_dir, Result, StoreError};

/// What `forkd check` found.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CheckReport {
    /// The metadata engine `meta/` was opened with.
    pub engine: String,
    /// The flush generation the engine holds.
    pub meta_generation: u64,
    /// The generation in `flushed` (absent or unreadable: none).
    pub flushed_generation: Option<u64>,
    /// Volumes and snapshots in the catalog.
    pub volumes: usize,
    /// Snapshots of all volumes.
    pub snapshots: usize,
    /// Distinct data slots referenced by any tree.
    pub referenced_slots: u64,
    /// The map's high-water mark (slots handed out so far, plus one).
    pub high_water: u64,
    /// Bytes `extents.0` holds on disk past the high-water mark.
    pub orphaned_bytes: u64,
    /// Tree nodes waiting in the garbage queue: what deletes released and the daemon's
    /// collector had not dismantled yet. Not a problem: the next start goes on with them.
    pub garbage_nodes: u64,
    /// Everything wrong, one sentence each.
    pub problems: Vec<String>,
}

impl CheckReport {
    /// True when `meta/` came back older than its last completed flush.
    pub fn rolled_back(&self) -> bool {
        self.flushed_generation.is_some_and(|f| f > self.meta_generation)
    }
}

/// Check the data directory `dir` (the daemon must be stopped: its lock is taken).
pub fn check(dir: &Path) -> Result<CheckReport> {
    let (_lock, kv) = open_stopped(dir)?;
    inspect(dir, kv).map_err(|why| bad(dir, why))
}

/// Accept what `meta/` holds after a roll-back: check, then record the engine's generation
/// in `flushed`. Without `accept_loss` nothing is changed and the report says what would be.
pub fn repair(dir: &Path, accept_loss: bool) -> Result<CheckReport> {
    let (_lock, kv) = open_stopped(dir)?;
    let report = inspect(dir, kv).map_err(|why| bad(dir, why))?;
    if !report.rolled_back() || !accept_loss {
        return Ok(report);
    }
    if !report.problems.iter().all(|p| p.starts_with("meta/ recovered")) {
        return Err(bad(
            dir,
            "its trees are damaged, which accepting the loss would not mend: restore meta/ together with \
             extents.0 from a backup"
                .into(),
        ));
    }
    generation::accept(dir, report.meta_generation).map_err(|e| bad(dir, format!("cannot rewrite `flushed`: {e}")))?;
    Ok(report)
}

/// Compact `meta/` (the daemon must be stopped): its size on disk before and after.
pub fn compact(dir: &Path) -> Result<(u64, u64)> {
    let before = super::disk_usage(&dir.join("meta"));
    let (_lock, kv) = open_stopped(dir)?;
    kv.reclaim()?;
    kv.commit()?;
    drop(kv);
    Ok((before, super::disk_usage(&dir.join("meta"))))
}

fn bad(dir: &Path, why: String) -> StoreError {
    StoreError::DataDir { path: dir.to_path_buf(), why }
}

/// Take a stopped daemon's lock and open its `meta/` as it is, with the engine it records:
/// no conversion, no start-up refusal.
fn open_stopped(dir: &Path) -> Result<(nix::fcntl::Flock<std::fs::File>, Arc<dyn MetaKv>)> {
    let meta = dir.join("meta");
    // Checked before the lock is taken: taking it would create a missing directory.
    if !meta.exists() {
        return Err(bad(dir, "it has no meta/: there is nothing to check or compact".into()));
    }
    let lock = lock_dir(dir)?;
    let engine = format::existing_engine(dir).map_err(|why| bad(dir, why))?;
    let kv =
        metakv::open(engine, &meta).map_err(|e| bad(dir, format!("cannot open its metadata store ({engine}): {e}")))?;
    Ok((lock, kv))
}

fn inspect(dir: &Path, kv: Arc<dyn MetaKv>) -> std::result::Result<CheckReport, String> {
    let mut r = CheckReport { engine: kv.engine().to_string(), ..CheckReport::default() };
    r.meta_generation = generation::in_meta(kv.as_ref())?;
    r.flushed_generation = generation::read_file(dir);
    if r.rolled_back() {
        r.problems.push(format!(
            "meta/ recovered to flush {}, but flush {} had completed: the changes of the flushes in between \
             are lost from it",
            r.meta_generation,
            r.flushed_generation.unwrap_or_default()
        ));
    }
    let cat = Catalog::open(kv).map_err(|e| format!("cannot load its catalog: {e}"))?;
    r.garbage_nodes = cat.map().garbage_known() as u64;
    let extents = std::fs::metadata(dir.join("extents.0")).map(|m| m.len()).unwrap_or(0);
    walk_trees(&cat, extents / BLOCK_SIZE + 1, &mut r);
    let mark = r.high_water.saturating_sub(1) * BLOCK_SIZE;
    r.orphaned_bytes = orphaned(&dir.join("extents.0"), mark, extents);
    Ok(r)
}

/// Walk every tree of the catalog, counting distinct slots and noting damage; a subtree
/// shared by several trees is read once. `file_slots` bounds the slots a pointer may name
/// (the extent file's length), whatever a damaged high-water mark says.
fn walk_trees(cat: &Catalog, file_slots: u64, r: &mut CheckReport) {
    r.high_water = cat.map().stats().high_water;
    if r.high_water > file_slots {
        r.problems.push(format!(
            "the map has handed out {} slots, but extents.0 holds only {}",
            r.high_water - 1,
            file_slots - 1
        ));
    }
    let limit = r.high_water.min(file_slots);
    let mut seen = vec![0u64; usize::try_from(limit / 64 + 1).unwrap_or(0)];
    let mut read: HashSet<catalog::NodeId> = HashSet::new();
    for v in cat.volumes().values() {
        r.volumes += 1;
        r.snapshots += v.snapshots.len();
        let mut beyond = 0u64;
        for root in v.roots() {
            let mut enter = |id, _, _| read.insert(id);
            let mut entry = |_, _, e: catalog::Entry| {
                if e.has_data() {
                    match seen.get_mut(usize::try_from(e.slot / 64).unwrap_or(usize::MAX)) {
                        Some(w) if e.slot < limit => *w |= 1 << (e.slot % 64),
                        _ => beyond += 1,
                    }
                }
            };
            if let Err(e) = cat.map().walk_range(root, 0, v.nblocks(), &mut enter, &mut entry) {
                r.problems.push(format!("a tree of `{}` is damaged: {e}", v.name));
            }
        }
        if beyond > 0 {
            r.problems.push(format!("`{}` points at {beyond} blocks past the end of the map", v.name));
        }
    }
    r.referenced_slots = seen.iter().map(|w| u64::from(w.count_ones())).sum();
}

/// Bytes allocated on disk in `path` from `from` to `len`, found with SEEK_DATA/SEEK_HOLE.
fn orphaned(path: &Path, from: u64, len: u64) -> u64 {
    use std::os::unix::io::AsRawFd;
    let Ok(f) = std::fs::File::open(path) else { return 0 };
    let fd = f.as_raw_fd();
    let (mut pos, mut total) = (from, 0u64);
    while pos < len {
        let Ok(start) = nix::unistd::lseek(fd, pos as i64, nix::unistd::Whence::SeekData) else { break };
        let start = start as u64;
        let end = nix::unistd::lseek(fd, start as i64, nix::unistd::Whence::SeekHole).map_or(len, |e| e as u64);
        total += end.min(len).saturating_sub(start);
        pos = end;
    }
    total
}
