//! The in-memory file tree behind the power-cut filesystem: every file and directory has a
//! state that reads see (the "volatile" state, what sits in a disk's write cache) and a state
//! that survives a cut (the "durable" state, what reached the platter).
//!
//! What becomes durable, and when (the model of a disk with a volatile write cache under a
//! strict POSIX filesystem):
//! - a file's contents and size: at `fsync`/`fdatasync` of that file, all at once;
//! - a directory's entries (creates, unlinks, renames in or out of it): at `fsync` of that
//!   directory, all at once. A file created and fsynced but whose directory was never fsynced
//!   is gone after a cut; a rename not followed by a directory fsync is undone.
//!   With `journaled` set, directory changes are durable at once instead (how ext4 and XFS
//!   behave in practice, their journal commits entries with the next fsync of anything): that
//!   separates a program that forgets directory fsyncs from one that loses file contents.
//! - modes and owners are not modelled as volatile (they are kept as they are).
//!
//! A cut may also be "reordered" ([`Tree::cut_reordered`]): each un-synced change of a file
//! (a block written or punched, a new size) reaches the disk or not, at random, as a cache
//! that wrote back part of what it held; 4 KiB blocks are never torn.
//!
//! Nothing here knows about FUSE: the tree is plain data behind one `Mutex` (see `fuse.rs`),
//! so every operation sees and leaves a consistent tree. After [`Tree::cut`] every operation
//! fails with `EIO`, like a disk that lost its power.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::SystemTime;

/// The block size of the in-memory contents (and the size the filesystem reports).
pub(crate) const BLOCK: u64 = 4096;
/// The root directory's inode number (FUSE's fixed root id).
pub(crate) const ROOT: u64 = 1;

/// An errno value, the error of every tree operation.
pub(crate) type Errno = i32;
/// The result of a tree operation.
pub(crate) type Res<T> = Result<T, Errno>;

/// A file's contents: a size and the non-zero blocks (absent blocks read as zeros). Blocks are
/// shared between the volatile and durable copies until one of them writes (`Arc::make_mut`),
/// so making a file durable costs one pointer per block, not a copy of its bytes.
#[derive(Clone, Debug, Default)]
pub(crate) struct Contents {
    pub(crate) size: u64,
    pub(crate) blocks: BTreeMap<u64, Arc<Vec<u8>>>,
}

impl Contents {
    /// Read up to `len` bytes at `off` (short at the end of the file).
    pub(crate) fn read(&self, off: u64, len: u64) -> Vec<u8> {
        let end = off.saturating_add(len).min(self.size);
        let mut out = Vec::with_capacity(usize::try_from(end.saturating_sub(off)).unwrap_or(0));
        let mut pos = off;
        while pos < end {
            let (index, within) = (pos / BLOCK, pos % BLOCK);
            let take = (BLOCK - within).min(end - pos);
            match self.blocks.get(&index) {
                Some(b) => out.extend_from_slice(&b[to_usize(within)..to_usize(within + take)]),
                None => out.resize(out.len() + to_usize(take), 0),
            }
            pos += take;
        }
        out
    }

    /// Write `data` at `off`, growing the file if it ends past the end.
    pub(crate) fn write(&mut self, off: u64, data: &[u8]) {
        let mut done = 0usize;
        while done < data.len() {
            let pos = off + done as u64;
            let (index, within) = (pos / BLOCK, to_usize(pos % BLOCK));
            let take = (to_usize(BLOCK) - within).min(data.len() - done);
            let block = self.blocks.entry(index).or_insert_with(|| Arc::new(vec![0; to_usize(BLOCK)]));
            Arc::make_mut(block)[within..within + take].copy_from_slice(&data[done..done + take]);
            done += take;
        }
        self.size = self.size.max(off + data.len() as u64);
    }

    /// Make `[off, off+len)` read as zeros without changing the size (a punched hole).
    pub(crate) fn zero(&mut self, off: u64, len: u64) {
        let end = off.saturating_add(len);
        let first_whole = off.div_ceil(BLOCK);
        let last_whole = end / BLOCK; // exclusive
        if first_whole < last_whole {
            let doomed: Vec<u64> = self.blocks.range(first_whole..last_whole).map(|(k, _)| *k).collect();
            for k in doomed {
                self.blocks.remove(&k);
            }
        }
        // The partial blocks at either end.
        for index in [off / BLOCK, end.saturating_sub(1) / BLOCK] {
            let (start, stop) = ((index * BLOCK).max(off), ((index + 1) * BLOCK).min(end));
            if start >= stop {
                continue;
            }
            if let Some(b) = self.blocks.get_mut(&index) {
                let base = index * BLOCK;
                Arc::make_mut(b)[to_usize(start - base)..to_usize(stop - base)].fill(0);
            }
        }
    }

    /// Truncate or extend to `size`; bytes past a shrink are gone (zeros if it grows again).
    pub(crate) fn set_size(&mut self, size: u64) {
        if size < self.size {
            self.size = size;
            self.clip();
        }
        self.size = size;
    }

    /// Forget every byte past the end (so that growing the file again shows zeros there).
    fn clip(&mut self) {
        let keep = self.size.div_ceil(BLOCK);
        let doomed: Vec<u64> = self.blocks.range(keep..).map(|(k, _)| *k).collect();
        for k in doomed {
            self.blocks.remove(&k);
        }
        // The tail of a partial last block (written out as part of the block, so kept zero).
        let tail = to_usize(self.size % BLOCK);
        if let Some(b) = self.blocks.get_mut(&(self.size / BLOCK)).filter(|_| tail > 0) {
            Arc::make_mut(b)[tail..].fill(0);
        }
    }

    /// Let each change of `now` not yet in `self` (a written, punched or dropped block, a new
    /// size) become durable anyway, each independently with probability 1/2: a cache that
    /// wrote back part of what it held, in no particular order. A block is never torn.
    fn leak_from(&mut self, now: &Contents, rng: &mut StdRng) {
        for (k, b) in &now.blocks {
            let same = self.blocks.get(k).is_some_and(|d| Arc::ptr_eq(d, b));
            if !same && rng.gen_bool(0.5) {
                self.blocks.insert(*k, b.clone());
            }
        }
        let gone: Vec<u64> = self.blocks.keys().filter(|k| !now.blocks.contains_key(k)).copied().collect();
        for k in gone {
            if rng.gen_bool(0.5) {
                self.blocks.remove(&k);
            }
        }
        if now.size != self.size && rng.gen_bool(0.5) {
            self.size = now.size;
        }
        self.clip();
    }
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// What an inode is, with both of its states.
#[derive(Clone, Debug)]
pub(crate) enum Node {
    File { now: Contents, durable: Contents },
    Dir { now: BTreeMap<OsString, u64>, durable: BTreeMap<OsString, u64> },
}

/// One inode: its node and the metadata reads report.
#[derive(Clone, Debug)]
pub(crate) struct Inode {
    pub(crate) node: Node,
    pub(crate) perm: u16,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mtime: SystemTime,
}

impl Inode {
    fn new(node: Node, perm: u16, uid: u32, gid: u32) -> Inode {
        Inode { node, perm, uid, gid, mtime: SystemTime::now() }
    }

    pub(crate) fn is_dir(&self) -> bool {
        matches!(self.node, Node::Dir { .. })
    }
}

/// The durable state captured at a cut: every inode reachable from the root through durable
/// entries, with its durable contents or entries.
#[derive(Clone, Debug, Default)]
pub(crate) struct Survivors {
    pub(crate) inodes: HashMap<u64, Inode>,
}

/// The whole tree. Inodes are never reused and never freed (files here are small and few), so
/// an unlinked file that a durable entry still names keeps its durable contents.
#[derive(Debug)]
pub(crate) struct Tree {
    inodes: HashMap<u64, Inode>,
    next: u64,
    survivors: Option<Survivors>,
    /// How many times each inode was fsynced (evidence for a failing test: what a program
    /// did and did not make durable).
    syncs: HashMap<u64, u64>,
    /// Directory changes are durable at once (a journaling filesystem as it behaves in
    /// practice), instead of only at a fsync of the directory (strict POSIX, the default).
    pub(crate) journaled: bool,
}

impl Tree {
    /// An empty tree: a root directory, durable and empty.
    pub(crate) fn new(uid: u32, gid: u32) -> Tree {
        let root = Inode::new(Node::Dir { now: BTreeMap::new(), durable: BTreeMap::new() }, 0o755, uid, gid);
        Tree {
            inodes: HashMap::from([(ROOT, root)]),
            next: ROOT + 1,
            survivors: None,
            syncs: HashMap::new(),
            journaled: false,
        }
    }

    /// Fail with `EIO` once the power is cut.
    fn alive(&self) -> Res<()> {
        if self.survivors.is_some() {
            return Err(libc::EIO);
        }
        Ok(())
    }

    pub(crate) fn inode(&self, ino: u64) -> Res<&Inode> {
        self.alive()?;
        self.inodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn inode_mut(&mut self, ino: u64) -> Res<&mut Inode> {
        self.alive()?;
        self.inodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn entries_mut(&mut self, dir: u64) -> Res<&mut BTreeMap<OsString, u64>> {
        match &mut self.inode_mut(dir)?.node {
            Node::Dir { now, .. } => Ok(now),
            Node::File { .. } => Err(libc::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Res<&mut Inode> {
        let inode = self.inode_mut(ino)?;
        match inode.node {
            Node::File { .. } => Ok(inode),
            Node::Dir { .. } => Err(libc::EISDIR),
        }
    }

    /// The current entries of directory `dir`.
    pub(crate) fn entries(&self, dir: u64) -> Res<&BTreeMap<OsString, u64>> {
        match &self.inode(dir)?.node {
            Node::Dir { now, .. } => Ok(now),
            Node::File { .. } => Err(libc::ENOTDIR),
        }
    }

    pub(crate) fn lookup(&self, dir: u64, name: &OsStr) -> Res<u64> {
        self.entries(dir)?.get(name).copied().ok_or(libc::ENOENT)
    }

    /// Create a file (or, with `dir`, a directory) named `name` in `parent`: volatile until
    /// `parent` is fsynced.
    pub(crate) fn create(&mut self, parent: u64, name: &OsStr, dir: bool, perm: u16, owner: (u32, u32)) -> Res<u64> {
        if self.entries(parent)?.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let node = if dir {
            Node::Dir { now: BTreeMap::new(), durable: BTreeMap::new() }
        } else {
            Node::File { now: Contents::default(), durable: Contents::default() }
        };
        let ino = self.next;
        self.next += 1;
        self.inodes.insert(ino, Inode::new(node, perm, owner.0, owner.1));
        self.entries_mut(parent)?.insert(name.to_os_string(), ino);
        self.journal(parent);
        Ok(ino)
    }

    /// Remove the entry `name` from `parent` (`rmdir` when `dir`): volatile until `parent`
    /// is fsynced.
    pub(crate) fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Res<()> {
        let ino = self.lookup(parent, name)?;
        let target = self.inode(ino)?;
        match (&target.node, dir) {
            (Node::Dir { .. }, false) => return Err(libc::EISDIR),
            (Node::File { .. }, true) => return Err(libc::ENOTDIR),
            (Node::Dir { now, .. }, true) if !now.is_empty() => return Err(libc::ENOTEMPTY),
            _ => {}
        }
        self.entries_mut(parent)?.remove(name);
        self.journal(parent);
        Ok(())
    }

    /// Move entry `name` of `parent` to `new_name` in `new_parent`, replacing a file there (or
    /// an empty directory, for a directory): volatile until both directories are fsynced.
    pub(crate) fn rename(&mut self, parent: u64, name: &OsStr, new_parent: u64, new_name: &OsStr) -> Res<()> {
        let ino = self.lookup(parent, name)?;
        let moving_dir = self.inode(ino)?.is_dir();
        if let Ok(old) = self.lookup(new_parent, new_name) {
            if old == ino {
                return Ok(());
            }
            match &self.inode(old)?.node {
                Node::Dir { now, .. } if !moving_dir => {
                    return Err(if now.is_empty() { libc::EISDIR } else { libc::ENOTEMPTY })
                }
                Node::Dir { now, .. } if !now.is_empty() => return Err(libc::ENOTEMPTY),
                Node::File { .. } if moving_dir => return Err(libc::ENOTDIR),
                _ => {}
            }
        }
        if moving_dir && self.is_ancestor(ino, new_parent)? {
            return Err(libc::EINVAL);
        }
        self.entries_mut(parent)?.remove(name);
        self.entries_mut(new_parent)?.insert(new_name.to_os_string(), ino);
        self.journal(parent);
        self.journal(new_parent);
        Ok(())
    }

    /// With journaled directories, make `dir`'s entries durable now (not counted as a fsync).
    fn journal(&mut self, dir: u64) {
        if !self.journaled {
            return;
        }
        if let Some(Inode { node: Node::Dir { now, durable }, .. }) = self.inodes.get_mut(&dir) {
            *durable = now.clone();
        }
    }

    /// Whether directory `dir` is `of` or contains it (through current entries).
    fn is_ancestor(&self, dir: u64, of: u64) -> Res<bool> {
        let mut todo = vec![dir];
        while let Some(d) = todo.pop() {
            if d == of {
                return Ok(true);
            }
            if let Node::Dir { now, .. } = &self.inode(d)?.node {
                todo.extend(now.values().copied());
            }
        }
        Ok(false)
    }

    pub(crate) fn read(&self, ino: u64, off: u64, len: u64) -> Res<Vec<u8>> {
        match &self.inode(ino)?.node {
            Node::File { now, .. } => Ok(now.read(off, len)),
            Node::Dir { .. } => Err(libc::EISDIR),
        }
    }

    /// Apply `change` to the volatile contents of file `ino`.
    pub(crate) fn change(&mut self, ino: u64, change: impl FnOnce(&mut Contents)) -> Res<()> {
        let inode = self.file_mut(ino)?;
        inode.mtime = SystemTime::now();
        if let Node::File { now, .. } = &mut inode.node {
            change(now);
        }
        Ok(())
    }

    /// Set the permission bits and owner (kept as they are: not modelled as volatile).
    pub(crate) fn set_meta(&mut self, ino: u64, perm: Option<u16>, uid: Option<u32>, gid: Option<u32>) -> Res<()> {
        let inode = self.inode_mut(ino)?;
        inode.perm = perm.unwrap_or(inode.perm);
        inode.uid = uid.unwrap_or(inode.uid);
        inode.gid = gid.unwrap_or(inode.gid);
        Ok(())
    }

    /// `fsync` of a file (its contents and size) or of a directory (its entries).
    pub(crate) fn sync(&mut self, ino: u64) -> Res<()> {
        match &mut self.inode_mut(ino)?.node {
            Node::File { now, durable } => *durable = now.clone(),
            Node::Dir { now, durable } => *durable = now.clone(),
        }
        *self.syncs.entry(ino).or_default() += 1;
        Ok(())
    }

    /// Every file and directory reachable now, by path from the root ("" for the root), with
    /// how many times it was fsynced and whether its current state is durable. Works after a
    /// cut too.
    pub(crate) fn sync_report(&self) -> Vec<(PathBuf, u64, bool)> {
        let mut out = Vec::new();
        let mut todo = vec![(ROOT, PathBuf::new())];
        while let Some((ino, path)) = todo.pop() {
            let Some(inode) = self.inodes.get(&ino) else { continue };
            let settled = match &inode.node {
                Node::File { now, durable } => now.size == durable.size && now.blocks == durable.blocks,
                Node::Dir { now, durable } => {
                    todo.extend(now.iter().filter(|(_, &c)| c != ino).map(|(n, &c)| (c, path.join(n))));
                    now == durable
                }
            };
            out.push((path, self.syncs.get(&ino).copied().unwrap_or(0), settled));
            if out.len() > 100_000 {
                break;
            }
        }
        out.sort();
        out
    }

    /// Cut the power after letting a random part of what was not made durable reach the
    /// disk anyway (file contents and sizes only; directory entries follow their rule).
    pub(crate) fn cut_reordered(&mut self, seed: u64) -> &Survivors {
        if self.survivors.is_none() {
            let mut rng = StdRng::seed_from_u64(seed);
            // Inodes in a fixed order, so that a seed always leaks the same writes.
            let mut inos: Vec<u64> = self.inodes.keys().copied().collect();
            inos.sort_unstable();
            for ino in inos {
                if let Some(Inode { node: Node::File { now, durable }, .. }) = self.inodes.get_mut(&ino) {
                    durable.leak_from(now, &mut rng);
                }
            }
        }
        self.cut()
    }

    /// Cut the power: capture the durable state; from now on every operation fails with EIO.
    /// Cutting twice keeps the first capture.
    pub(crate) fn cut(&mut self) -> &Survivors {
        if self.survivors.is_none() {
            self.survivors = Some(self.durable_image());
        }
        self.survivors.get_or_insert_with(Survivors::default)
    }

    /// Every inode reachable from the root through durable entries, in its durable state.
    fn durable_image(&self) -> Survivors {
        let mut out = HashMap::new();
        let mut todo = vec![ROOT];
        while let Some(ino) = todo.pop() {
            if out.contains_key(&ino) {
                continue;
            }
            let Some(inode) = self.inodes.get(&ino) else { continue };
            let node = match &inode.node {
                Node::File { durable, .. } => Node::File { now: durable.clone(), durable: durable.clone() },
                Node::Dir { durable, .. } => {
                    todo.extend(durable.values().copied());
                    Node::Dir { now: durable.clone(), durable: durable.clone() }
                }
            };
            out.insert(ino, Inode { node, ..inode.clone() });
        }
        Survivors { inodes: out }
    }

    /// A tree whose every inode is `survivors`' (all durable): the state a restarted machine
    /// finds.
    pub(crate) fn from_survivors(survivors: Survivors) -> Tree {
        let next = survivors.inodes.keys().max().copied().unwrap_or(ROOT) + 1;
        Tree { inodes: survivors.inodes, next, survivors: None, syncs: HashMap::new(), journaled: false }
    }

    /// Insert an inode that is durable as given (used to load a directory from disk).
    pub(crate) fn insert_durable(&mut self, parent: u64, name: &OsStr, node: Node, meta: (u16, u32, u32)) -> Res<u64> {
        let node = match node {
            Node::File { now, .. } => Node::File { durable: now.clone(), now },
            Node::Dir { now, .. } => Node::Dir { durable: now.clone(), now },
        };
        let ino = self.next;
        self.next += 1;
        self.inodes.insert(ino, Inode::new(node, meta.0, meta.1, meta.2));
        self.entries_mut(parent)?.insert(name.to_os_string(), ino);
        self.sync(parent)?;
        Ok(ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_write_read_zero_truncate() {
        let mut c = Contents::default();
        c.write(4000, &[7; 200]);
        assert_eq!(c.size, 4200);
        assert_eq!(c.read(3990, 300).len(), 210);
        assert_eq!(&c.read(3999, 3), &[0, 7, 7]);
        c.zero(4001, 100);
        assert_eq!(&c.read(4000, 3), &[7, 0, 0]);
        assert_eq!(c.read(4101, 1), vec![7]);
        c.write(10 * BLOCK, &[1; 10]);
        c.zero(BLOCK, 10 * BLOCK);
        assert_eq!(c.blocks.len(), 1, "whole blocks of a punched range are dropped");
        assert_eq!(c.size, 10 * BLOCK + 10, "a punch keeps the size");
        c.set_size(4050);
        assert_eq!(c.read(4000, 100), [vec![7], vec![0; 49]].concat());
        c.set_size(9000);
        assert_eq!(c.read(4050, 100), vec![0; 100], "a regrown file reads zeros past the old end");
    }

    #[test]
    fn durable_state_follows_fsync_only() {
        let mut t = Tree::new(0, 0);
        let f = t.create(ROOT, OsStr::new("f"), false, 0o644, (0, 0)).unwrap();
        t.change(f, |c| c.write(0, b"one")).unwrap();
        t.sync(f).unwrap();
        t.sync(ROOT).unwrap();
        t.change(f, |c| c.write(0, b"two and more")).unwrap();
        let g = t.create(ROOT, OsStr::new("g"), false, 0o644, (0, 0)).unwrap();
        t.sync(g).unwrap();
        let s = t.cut().clone();
        assert_eq!(t.read(f, 0, 10), Err(libc::EIO), "a cut tree answers nothing");
        let mut after = Tree::from_survivors(s);
        assert_eq!(after.read(f, 0, 100).unwrap(), b"one");
        assert_eq!(after.lookup(ROOT, OsStr::new("g")), Err(libc::ENOENT));
        assert!(after.sync(ROOT).is_ok());
    }
}
