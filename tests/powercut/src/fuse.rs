//! The FUSE side: each kernel request becomes one operation on the shared [`Tree`] under its
//! mutex, and the answer (or errno) goes straight back. fuser runs these on one session
//! thread, the mutex only guards against the test thread cutting at the same moment.
//!
//! No write-back cache is asked of the kernel, so every `write(2)` reaches the tree before it
//! returns and every `fsync(2)` reaches [`Tree::sync`]; `sync_file_range(2)` never reaches a
//! FUSE filesystem at all, which is exactly what a disk with a volatile cache does with it.

use std::ffi::OsStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileType, Filesystem, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};

use crate::model::{Inode, Node, Res, Tree, BLOCK};

/// How long the kernel may cache names and attributes. The tree changes only through this
/// mount, so the kernel's own view stays right; after a cut the mount is thrown away.
const TTL: Duration = Duration::from_secs(1);
/// The size the filesystem reports to `statfs` (the daemon sizes its reserve from it).
const REPORTED_BYTES: u64 = 1 << 30;

/// The fuser filesystem: a handle on the shared tree.
#[derive(Debug)]
pub(crate) struct PowerCutFuse {
    pub(crate) tree: Arc<Mutex<Tree>>,
}

impl PowerCutFuse {
    fn tree(&self) -> MutexGuard<'_, Tree> {
        // A panic under the lock leaves a consistent tree (operations check before changing).
        self.tree.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attr_of(&self, ino: u64) -> Res<FileAttr> {
        self.tree().inode(ino).map(|i| attr(ino, i))
    }
}

/// The attributes the kernel sees for inode `ino`.
fn attr(ino: u64, inode: &Inode) -> FileAttr {
    let (kind, size, blocks, nlink) = match &inode.node {
        Node::File { now, .. } => (FileType::RegularFile, now.size, now.blocks.len() as u64 * (BLOCK / 512), 1),
        Node::Dir { now, .. } => (FileType::Directory, now.len() as u64, 0, 2),
    };
    FileAttr {
        ino,
        size,
        blocks,
        atime: inode.mtime,
        mtime: inode.mtime,
        ctime: inode.mtime,
        crtime: inode.mtime,
        kind,
        perm: inode.perm,
        nlink,
        uid: inode.uid,
        gid: inode.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn offset(off: i64) -> Res<u64> {
    u64::try_from(off).map_err(|_| libc::EINVAL)
}

fn perm(mode: u32, umask: u32) -> u16 {
    u16::try_from(mode & !umask & 0o7777).unwrap_or(0o644)
}

/// Apply `fallocate` mode `mode` to `[off, off+len)` of file `ino`: plain allocation (only
/// the size can change, allocation is not modelled), `KEEP_SIZE`, `PUNCH_HOLE|KEEP_SIZE` and
/// `ZERO_RANGE`; anything else is `EOPNOTSUPP`.
fn fallocate(tree: &mut Tree, ino: u64, off: u64, len: u64, mode: i32) -> Res<()> {
    let end = off.checked_add(len).ok_or(libc::EFBIG)?;
    let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
    let op = mode & !libc::FALLOC_FL_KEEP_SIZE;
    let supported = op == 0 || op == libc::FALLOC_FL_ZERO_RANGE || (op == libc::FALLOC_FL_PUNCH_HOLE && keep);
    if !supported {
        return Err(libc::EOPNOTSUPP);
    }
    tree.change(ino, |c| {
        if op != 0 {
            c.zero(off, len);
        }
        if !keep && end > c.size {
            c.size = end;
        }
    })
}

impl Filesystem for PowerCutFuse {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let found = self.tree().lookup(parent, name);
        match found.and_then(|ino| self.attr_of(ino)) {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.attr_of(ino) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let done = {
            let mut t = self.tree();
            let p = mode.map(|m| perm(m, 0));
            t.set_meta(ino, p, uid, gid)
                .and_then(|()| size.map_or(Ok(()), |s| t.change(ino, |c| c.set_size(s))))
                .and_then(|()| t.inode(ino).map(|i| attr(ino, i)))
        };
        match done {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let made = self.tree().create(parent, name, true, perm(mode, umask), (req.uid(), req.gid()));
        match made.and_then(|ino| self.attr_of(ino)) {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let made = self.tree().create(parent, name, false, perm(mode, umask), (req.uid(), req.gid()));
        match made.and_then(|ino| self.attr_of(ino)) {
            Ok(a) => reply.created(&TTL, &a, 0, 0, 0),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.tree().remove(parent, name, false));
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.tree().remove(parent, name, true));
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.tree().rename(parent, name, newparent, newname));
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        off: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        match offset(off).and_then(|o| self.tree().read(ino, o, u64::from(size))) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        off: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let done = offset(off).and_then(|o| self.tree().change(ino, |c| c.write(o, data)));
        match (done, u32::try_from(data.len())) {
            (Ok(()), Ok(n)) => reply.written(n),
            (Err(e), _) => reply.error(e),
            (_, Err(_)) => reply.error(libc::EINVAL),
        }
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        empty(reply, self.tree().sync(ino));
    }

    fn fsyncdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        empty(reply, self.tree().sync(ino));
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, off: i64, mut reply: ReplyDirectory) {
        let listing: Res<Vec<(u64, FileType, std::ffi::OsString)>> = {
            let t = self.tree();
            t.entries(ino).map(|entries| {
                let mut v = vec![(ino, FileType::Directory, ".".into()), (ino, FileType::Directory, "..".into())];
                for (name, &child) in entries {
                    let kind = match t.inode(child).map(|i| i.is_dir()) {
                        Ok(true) => FileType::Directory,
                        _ => FileType::RegularFile,
                    };
                    v.push((child, kind, name.clone()));
                }
                v
            })
        };
        let listing = match (listing, offset(off)) {
            (Ok(l), Ok(o)) => l.into_iter().skip(usize::try_from(o).unwrap_or(usize::MAX)),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        for (i, (child, kind, name)) in listing.enumerate() {
            let next = off.saturating_add(1).saturating_add(i64::try_from(i).unwrap_or(i64::MAX));
            if reply.add(child, next, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let blocks = REPORTED_BYTES / BLOCK;
        reply.statfs(blocks, blocks / 2, blocks / 2, 1 << 20, 1 << 19, 4096, 255, 4096);
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        off: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let (Ok(off), Ok(len)) = (offset(off), offset(length)) else {
            return reply.error(libc::EINVAL);
        };
        empty(reply, fallocate(&mut self.tree(), ino, off, len, mode));
    }
}

fn empty(reply: ReplyEmpty, r: Res<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}
