//! The power-cut filesystem tested through a real mount and plain system calls: what a
//! program does not make durable is gone after a cut, what it fsyncs (and whose directory it
//! fsyncs) is there, byte for byte. Needs `/dev/fuse` and root: without them these tests fail
//! (they are not skipped), saying what is missing.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use forkd_powercut::{fuse_available, PowerCutFs};
use nix::fcntl::{fallocate, FallocateFlags};

/// A mounted filesystem in a fresh temporary directory, and where its survivors go.
/// Fields drop in order: the filesystem is unmounted before its directory is removed.
struct Rig {
    fs: PowerCutFs,
    mnt: PathBuf,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn new() -> Rig {
        if let Err(why) = fuse_available() {
            panic!("FUSE is required for the power-cut harness tests: {why}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (mnt, out) = (dir.path().join("mnt"), dir.path().join("out"));
        fs::create_dir(&mnt).expect("mkdir mnt");
        fs::create_dir(&out).expect("mkdir out");
        let fs = PowerCutFs::mount(&mnt, None).expect("mount the power-cut filesystem");
        Rig { fs, mnt, out, _dir: dir }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    /// Cut, unmount, write the survivors out; returns their directory.
    fn cut(&mut self) -> &Path {
        self.fs.cut();
        self.fs.write_survivors(&self.out).expect("write survivors");
        self.fs.unmount().expect("unmount");
        &self.out
    }
}

fn fsync_dir(dir: &Path) {
    File::open(dir).expect("open dir").sync_all().expect("fsync dir");
}

fn write_file(path: &Path, data: &[u8]) -> File {
    let mut f = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(path).expect("create");
    f.write_all(data).expect("write");
    f
}

#[test]
fn unsynced_writes_are_lost_synced_ones_kept() {
    let mut rig = Rig::new();
    let synced = write_file(&rig.p("synced"), b"durable bytes");
    synced.sync_all().expect("fsync");
    let unsynced = write_file(&rig.p("unsynced"), b"only in the cache");
    fsync_dir(&rig.mnt);
    assert_eq!(fs::read(rig.p("unsynced")).expect("read back"), b"only in the cache", "reads see volatile writes");
    // A later overwrite that is not fsynced is lost too, the fsynced state stays.
    (&synced).write_all(b" and more").expect("append");
    drop((synced, unsynced));
    let report = rig.fs.sync_report();
    let line = |name: &str| report.iter().find(|r| r.path == Path::new(name)).map(|r| (r.fsyncs, r.durable));
    assert_eq!(line(""), Some((1, true)), "the root: {report:?}");
    assert_eq!(line("synced"), Some((1, false)), "fsynced once, appended to since: {report:?}");
    assert_eq!(line("unsynced"), Some((0, false)), "{report:?}");
    let out = rig.cut();
    assert_eq!(fs::read(out.join("synced")).expect("synced survives"), b"durable bytes");
    assert_eq!(fs::read(out.join("unsynced")).expect("entry survives"), b"", "unsynced data is gone");
}

#[test]
fn a_create_needs_its_directory_fsynced() {
    let mut rig = Rig::new();
    fs::create_dir(rig.p("d")).expect("mkdir");
    fsync_dir(&rig.mnt);
    write_file(&rig.p("d/kept"), b"k").sync_all().expect("fsync");
    fsync_dir(&rig.p("d"));
    write_file(&rig.p("d/lost"), b"l").sync_all().expect("fsync");
    write_file(&rig.p("top-lost"), b"t").sync_all().expect("fsync");
    let out = rig.cut();
    assert_eq!(fs::read(out.join("d/kept")).expect("kept"), b"k");
    assert!(!out.join("d/lost").exists(), "a fsynced file whose directory was not fsynced is gone");
    assert!(!out.join("top-lost").exists(), "the same in the root");
}

#[test]
fn unlink_and_rename_without_directory_fsync_are_undone() {
    let mut rig = Rig::new();
    write_file(&rig.p("a"), b"A").sync_all().expect("fsync");
    write_file(&rig.p("b"), b"B").sync_all().expect("fsync");
    write_file(&rig.p("c"), b"C").sync_all().expect("fsync");
    fsync_dir(&rig.mnt);
    fs::rename(rig.p("a"), rig.p("renamed")).expect("rename");
    fs::remove_file(rig.p("b")).expect("unlink");
    fs::create_dir(rig.p("sub")).expect("mkdir");
    fsync_dir(&rig.p("sub"));
    fs::rename(rig.p("c"), rig.p("sub/c")).expect("rename into sub");
    assert!(!rig.p("a").exists() && rig.p("renamed").exists(), "the rename is visible before the cut");
    let out = rig.cut();
    assert_eq!(fs::read(out.join("a")).expect("a is back"), b"A");
    assert!(!out.join("renamed").exists(), "the rename is undone");
    assert_eq!(fs::read(out.join("b")).expect("b is back"), b"B", "the unlink is undone");
    assert!(!out.join("sub").exists(), "the new directory's parent was not fsynced");
    assert_eq!(fs::read(out.join("c")).expect("c stays"), b"C");
}

#[test]
fn a_rename_with_directory_fsync_is_kept() {
    let mut rig = Rig::new();
    write_file(&rig.p("old"), b"replaced").sync_all().expect("fsync");
    write_file(&rig.p("tmp"), b"new contents").sync_all().expect("fsync");
    fsync_dir(&rig.mnt);
    fs::rename(rig.p("tmp"), rig.p("old")).expect("rename over");
    fsync_dir(&rig.mnt);
    let out = rig.cut();
    assert_eq!(fs::read(out.join("old")).expect("old"), b"new contents", "the atomic replace is durable");
    assert!(!out.join("tmp").exists());
}

#[test]
fn punch_hole_and_truncate() {
    let mut rig = Rig::new();
    let f = write_file(&rig.p("f"), &[0xab; 5 * 4096]);
    let g = write_file(&rig.p("g"), &[0xcd; 3 * 4096]);
    f.sync_all().expect("fsync");
    g.sync_all().expect("fsync");
    fsync_dir(&rig.mnt);
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    fallocate(f.as_raw_fd(), punch, 4096 + 100, 2 * 4096).expect("punch a hole");
    f.sync_data().expect("fdatasync");
    fallocate(f.as_raw_fd(), FallocateFlags::empty(), 0, 8 * 4096).expect("allocate past the end");
    assert_eq!(f.metadata().expect("stat").len(), 8 * 4096, "allocation grows the file");
    g.set_len(4096 + 10).expect("truncate");
    g.sync_all().expect("fsync");
    g.set_len(100).expect("truncate, not synced");
    let mut expected = vec![0xab; 5 * 4096];
    expected[4096 + 100..3 * 4096 + 100].fill(0);
    assert_eq!(fs::read(rig.p("f")).expect("read f").len(), 8 * 4096);
    assert_eq!(fs::read(rig.p("g")).expect("read g"), vec![0xcd; 100]);
    drop((f, g));
    let out = rig.cut();
    assert_eq!(fs::read(out.join("f")).expect("f"), expected, "the synced punch, not the unsynced growth");
    assert_eq!(fs::read(out.join("g")).expect("g"), vec![0xcd; 4096 + 10], "the synced truncate");
}

#[test]
fn everything_fails_after_the_cut_and_survivors_mount_again() {
    let mut rig = Rig::new();
    let f = write_file(&rig.p("f"), b"first");
    f.sync_all().expect("fsync");
    fsync_dir(&rig.mnt);
    rig.fs.cut();
    let err = (&f).write_all(b"late").and_then(|()| f.sync_all()).expect_err("a write after the cut");
    assert_ne!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(fs::read(rig.p("f")).is_err(), "reads fail after the cut");
    drop(f);
    let again = rig._dir.path().join("again");
    fs::create_dir(&again).expect("mkdir");
    let next = rig.fs.mount_survivors(&again).expect("mount survivors");
    rig.fs.unmount().expect("unmount");
    assert_eq!(fs::read(again.join("f")).expect("survivor"), b"first");
    let h = write_file(&again.join("h"), b"unsynced in round two");
    drop(h);
    next.cut();
    let out = rig.out.clone();
    next.write_survivors(&out).expect("write");
    let mut names: Vec<_> = fs::read_dir(&out).expect("ls").map(|e| e.expect("entry").file_name()).collect();
    names.sort();
    assert_eq!(names, ["f"], "round two's unsynced create is gone, round one's file stays");
}

#[test]
fn a_directory_loads_as_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (src, mnt, out) = (dir.path().join("src"), dir.path().join("mnt"), dir.path().join("out"));
    for d in [&src, &mnt, &out] {
        fs::create_dir(d).expect("mkdir");
    }
    fs::create_dir(src.join("meta")).expect("mkdir");
    fs::write(src.join("meta/db"), b"log").expect("write");
    let sparse = File::create(src.join("extents.0")).expect("create");
    sparse.set_len(1 << 20).expect("set_len");
    sparse.write_all_at(b"slot", 4096 * 7).expect("write");
    if let Err(why) = fuse_available() {
        panic!("FUSE is required for the power-cut harness tests: {why}");
    }
    let mut pcfs = PowerCutFs::mount(&mnt, Some(&src)).expect("mount");
    assert_eq!(fs::read(mnt.join("meta/db")).expect("read"), b"log");
    pcfs.cut();
    pcfs.write_survivors(&out).expect("write");
    pcfs.unmount().expect("unmount");
    let back = fs::read(out.join("extents.0")).expect("read");
    assert_eq!(back.len(), 1 << 20);
    assert_eq!(&back[4096 * 7..4096 * 7 + 4], b"slot");
    assert_eq!(fs::read(out.join("meta/db")).expect("read"), b"log");
}

#[test]
fn journaled_directories_keep_entries_but_not_contents() {
    if let Err(why) = fuse_available() {
        panic!("FUSE is required for the power-cut harness tests: {why}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (mnt, out) = (dir.path().join("mnt"), dir.path().join("out"));
    fs::create_dir(&mnt).expect("mkdir");
    fs::create_dir(&out).expect("mkdir");
    let mut pcfs = PowerCutFs::mount_with(&mnt, None, forkd_powercut::Directories::Journaled).expect("mount");
    fs::create_dir(mnt.join("d")).expect("mkdir");
    write_file(&mnt.join("d/synced"), b"s").sync_data().expect("fdatasync");
    write_file(&mnt.join("d/unsynced"), b"u");
    write_file(&mnt.join("gone"), b"g");
    fs::remove_file(mnt.join("gone")).expect("unlink");
    pcfs.cut();
    pcfs.write_survivors(&out).expect("write");
    pcfs.unmount().expect("unmount");
    assert_eq!(fs::read(out.join("d/synced")).expect("synced"), b"s");
    assert_eq!(fs::read(out.join("d/unsynced")).expect("the entry stays"), b"", "its contents do not");
    assert!(!out.join("gone").exists(), "the unlink is kept");
}

#[test]
fn a_reordered_cut_keeps_some_unsynced_blocks_whole() {
    let mut rig = Rig::new();
    let f = write_file(&rig.p("f"), &[0xaa; 64 * 4096]);
    f.sync_all().expect("fsync");
    fsync_dir(&rig.mnt);
    f.write_all_at(&[0xbb; 64 * 4096], 0).expect("rewrite");
    f.write_all_at(&[0xcc; 64 * 4096], 64 * 4096).expect("extend");
    drop(f);
    rig.fs.cut_reordered(7);
    let out = rig.cut();
    let back = fs::read(out.join("f")).expect("f");
    assert!(back.len() == 64 * 4096 || back.len() == 128 * 4096, "the old size or the new one: {}", back.len());
    let blocks: Vec<u8> = back
        .chunks(4096)
        .map(|b| {
            assert!(b.iter().all(|&x| x == b[0]), "a block is never torn");
            b[0]
        })
        .collect();
    let (old, new) =
        (blocks[..64].iter().filter(|&&b| b == 0xaa).count(), blocks[..64].iter().filter(|&&b| b == 0xbb).count());
    assert_eq!(old + new, 64, "each block holds its synced or its later contents");
    assert!(old > 0 && new > 0, "some un-synced blocks reach the disk and some do not ({new} of 64 did)");
    assert!(blocks[64..].iter().all(|&b| b == 0xcc || b == 0), "past the old end: written or never written");
}
