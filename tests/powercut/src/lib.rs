//! A FUSE filesystem for power-cut tests (issue 10): it behaves like a disk with a volatile
//! write cache under a strict POSIX filesystem, and at a simulated power cut it forgets every
//! write that was not made durable.
//!
//! - Reads see every write. `fsync`/`fdatasync` of a file makes its contents and size durable;
//!   creates, unlinks and renames become durable only when their directory is fsynced.
//!   `sync_file_range` makes nothing durable (it never reaches a FUSE filesystem).
//! - [`PowerCutFs::cut`] captures the durable state; from then on every operation on the mount
//!   fails with `EIO`, so a process still running cannot make anything else "durable".
//! - [`PowerCutFs::write_survivors`] writes the durable state to a real directory, where a
//!   restarted daemon (or [`PowerCutFs::mount`] with `from`, for the next cut) finds it;
//!   [`PowerCutFs::mount_survivors`] mounts it again without leaving memory.
//! - Variants: [`PowerCutFs::cut_reordered`] lets a random half of the un-synced block writes
//!   reach the disk (a cache writing back out of order; blocks are never torn), and
//!   [`Directories::Journaled`] makes directory changes durable at once (ext4 and XFS in
//!   practice), which separates a missing directory fsync from lost file contents.
//! - [`PowerCutFs::sync_report`] lists what was fsynced and what is durable: the evidence
//!   a failing test prints.
//!
//! Use: mount on an empty directory, point the program at it, [`PowerCutFs::cut`] at any
//! moment, kill the program, [`PowerCutFs::unmount`], [`PowerCutFs::write_survivors`] into
//! an empty directory and restart the program there (`tests/tests/power_cut.rs` does this
//! with `forkd serve`).
//!
//! Everything is kept in memory (files are tens of MiB at most in tests); see `model.rs` for
//! the rules and `fuse.rs` for the kernel side. Mounting needs root (or `fusermount3`) and
//! `/dev/fuse`: [`fuse_available`] says why not.

mod fuse;
mod image;
mod model;

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fuser::{BackgroundSession, MountOption};

use crate::model::Tree;

/// `Ok` when FUSE filesystems can be mounted here, else what is missing.
pub fn fuse_available() -> Result<(), String> {
    OpenOptions::new().read(true).write(true).open("/dev/fuse").map(drop).map_err(|e| {
        format!("cannot open /dev/fuse ({e}): the power-cut tests need FUSE (apt-get install fuse3, and root)")
    })
}

/// When creates, unlinks and renames become durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Directories {
    /// Only at a fsync of the directory (strict POSIX; the default).
    Strict,
    /// At once, as a journaling filesystem (ext4, XFS) behaves in practice: separates a
    /// program that forgets directory fsyncs from one that loses file contents.
    Journaled,
}

/// One line of [`PowerCutFs::sync_report`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncRecord {
    /// The path relative to the mountpoint (empty for its root).
    pub path: PathBuf,
    /// How many times it was fsynced (`fsync`, `fdatasync`, or `fsync` of a directory).
    pub fsyncs: u64,
    /// Whether its current state (contents and size, or entries) is also its durable state.
    pub durable: bool,
}

impl std::fmt::Display for SyncRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = if self.durable { "durable" } else { "NOT durable" };
        write!(f, "/{}: fsynced {} times, {state}", self.path.display(), self.fsyncs)
    }
}

/// A mounted power-cut filesystem. Dropping it unmounts it (lazily, if something still has a
/// file open on it).
#[derive(Debug)]
pub struct PowerCutFs {
    mountpoint: PathBuf,
    tree: Arc<Mutex<Tree>>,
    session: Option<BackgroundSession>,
}

impl PowerCutFs {
    /// Mount a power-cut filesystem on `mountpoint` (an existing empty directory), empty or,
    /// with `from`, holding a copy of that directory's files, all of them durable.
    pub fn mount(mountpoint: &Path, from: Option<&Path>) -> io::Result<PowerCutFs> {
        PowerCutFs::mount_with(mountpoint, from, Directories::Strict)
    }

    /// [`PowerCutFs::mount`] with a choice of when directory changes become durable.
    pub fn mount_with(mountpoint: &Path, from: Option<&Path>, directories: Directories) -> io::Result<PowerCutFs> {
        let mut tree = match from {
            Some(dir) => image::load(dir)?,
            None => {
                let meta = std::fs::metadata(mountpoint)?;
                Tree::new(std::os::unix::fs::MetadataExt::uid(&meta), std::os::unix::fs::MetadataExt::gid(&meta))
            }
        };
        tree.journaled = directories == Directories::Journaled;
        PowerCutFs::mount_tree(mountpoint, tree)
    }

    fn mount_tree(mountpoint: &Path, tree: Tree) -> io::Result<PowerCutFs> {
        let tree = Arc::new(Mutex::new(tree));
        let fs = fuse::PowerCutFuse { tree: tree.clone() };
        let options = [MountOption::FSName("forkd-powercut".into()), MountOption::RW];
        let session = fuser::spawn_mount2(fs, mountpoint, &options)?;
        Ok(PowerCutFs { mountpoint: mountpoint.to_path_buf(), tree, session: Some(session) })
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Cut the power now: what is durable at this instant is what survives, and every later
    /// operation on the mount fails with `EIO`. A second cut changes nothing.
    pub fn cut(&self) {
        self.tree.lock().unwrap_or_else(|p| p.into_inner()).cut();
    }

    /// Every file and directory on the mount now (by path relative to the mountpoint), with how
    /// many times it was fsynced and whether its current state is durable: evidence for what a
    /// program under test did and did not make durable. Works after a cut too.
    pub fn sync_report(&self) -> Vec<SyncRecord> {
        let tree = self.tree.lock().unwrap_or_else(|p| p.into_inner());
        tree.sync_report().into_iter().map(|(path, fsyncs, durable)| SyncRecord { path, fsyncs, durable }).collect()
    }

    /// Cut the power, but first let a random half (chosen by `seed`) of the file changes not
    /// yet made durable reach the disk anyway, each 4 KiB block or size change on its own: a
    /// cache that wrote back part of what it held, in no particular order. Directory entries
    /// still follow their rule. After a cut, this changes nothing.
    pub fn cut_reordered(&self, seed: u64) {
        self.tree.lock().unwrap_or_else(|p| p.into_inner()).cut_reordered(seed);
    }

    /// Write what survived the cut (cutting now if not yet cut) into `dir`, an existing empty
    /// directory on a real filesystem.
    pub fn write_survivors(&self, dir: &Path) -> io::Result<()> {
        let survivors = self.tree.lock().unwrap_or_else(|p| p.into_inner()).cut().clone();
        image::write(&survivors, dir)
    }

    /// Mount what survived the cut (cutting now if not yet cut) on `mountpoint`, as a new
    /// power-cut filesystem where all of it is durable: the next round of a multi-cut test.
    pub fn mount_survivors(&self, mountpoint: &Path) -> io::Result<PowerCutFs> {
        let survivors = self.tree.lock().unwrap_or_else(|p| p.into_inner()).cut().clone();
        let mut tree = Tree::from_survivors(survivors);
        tree.journaled = self.tree.lock().unwrap_or_else(|p| p.into_inner()).journaled;
        PowerCutFs::mount_tree(mountpoint, tree)
    }

    /// Unmount. Processes using the mount should be gone first (kill them after the cut); if
    /// one is not, the mount is detached lazily and goes away when its last file is closed.
    pub fn unmount(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let detached = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        // fuser's own unmount finds the mount gone and only ends its session thread.
        drop(session);
        detached.map_err(io::Error::from)
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        let _ = self.unmount();
    }
}
