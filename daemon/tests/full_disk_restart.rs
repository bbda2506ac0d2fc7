//! Restarting on a full disk: the data directory on a small loop-mounted ext4 (the filesystem
//! the issue saw sled fail on), filled through the store, then reopened. The store must open,
//! serve reads, accept trims and deletes, and accept new data once space is freed. Needs root
//! (to mount); fails with a clear message otherwise (`.ci/run` runs as root).

use std::path::{Path, PathBuf};
use std::process::Command;

use forkd::store::{Store, StoreError};

/// A small ext4 filesystem in a loop-mounted image, mounted for the life of the value.
struct LoopFs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    fn mount(mib: u64) -> LoopFs {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("fs.img");
        let f = std::fs::File::create(&img).expect("create image");
        f.set_len(mib << 20).expect("size image");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir");
        let mkfs = Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0"]).arg(&img).output().expect("run mkfs.ext4");
        assert!(mkfs.status.success(), "mkfs.ext4 failed: {mkfs:?}");
        let mount = Command::new("mount").args(["-o", "loop"]).arg(&img).arg(&mnt).output().expect("run mount");
        assert!(
            mount.status.success(),
            "this test needs root to loop-mount an ext4 image (CI runs as root): {}",
            String::from_utf8_lossy(&mount.stderr)
        );
        LoopFs { mnt, _dir: dir }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| u8::try_from(i % 251).unwrap_or(0).wrapping_mul(31) ^ seed | 1).collect()
}

fn is_enospc(e: &StoreError) -> bool {
    matches!(e, StoreError::Io(io) if io.raw_os_error() == Some(libc::ENOSPC))
}

/// Write 1 MiB pieces of `vol` from `off` until the disk is full; returns where it stopped.
fn fill(store: &Store, vol: &str, mut off: u64, end: u64) -> u64 {
    while off < end {
        match store.write(vol, off, &pattern(2, 1 << 20)) {
            Ok(()) => off += 1 << 20,
            Err(e) => {
                assert!(is_enospc(&e), "expected ENOSPC, got: {e}");
                return off;
            }
        }
    }
    panic!("the disk never filled");
}

/// Fill what is left of the filesystem at `dir` with a file, as another program would.
fn fill_with_file(dir: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("other-program")).expect("create filler");
    let chunk = vec![0x5au8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    let mut small = [0x5au8; 4096];
    while f.write_all(&small[..]).is_ok() {
        small[0] ^= 1;
    }
}

/// A store with a source, a clone `c` holding 4 MiB, its snapshot, and a second clone `c2`.
fn populate(store: &Store, first: &[u8]) -> String {
    store.op(|c| c.create_source("src", 256 << 20)).expect("source");
    store.op(|c| c.clone_volume("src", "c")).expect("clone");
    store.write("c", 0, first).expect("first 4 MiB fit");
    let snap = store.op(|c| c.snapshot("c", None)).expect("snapshot");
    store.op(|c| c.clone_volume(&snap.to_string(), "c2")).expect("second clone");
    snap.to_string()
}

/// What a store reopened on a full disk must still do: serve reads, refuse new data, trim and
/// delete, and take new data once that freed space.
fn check_recovers(store: &Store, snap: &str, first: &[u8], stopped: u64) {
    let mut back = vec![0u8; first.len()];
    store.read(snap, 0, &mut back).expect("read the snapshot after the restart");
    assert!(back == first, "earlier data is intact");
    store.zero("c", 4 << 20, stopped - (4 << 20)).expect("trim on a full disk");
    store.flush().expect("flush after the trim");
    store.op(|c| c.delete("c2")).expect("delete on a full disk");
    store.write("c", 4 << 20, &pattern(3, 1 << 20)).expect("a write fits again after freeing space");
    store.flush().expect("flush");
    store.read(snap, 0, &mut back).expect("read the snapshot after recovering");
    assert!(back == first, "earlier data is intact after recovering");
}

#[test]
fn a_store_that_filled_its_disk_restarts_again_and_again() {
    let fs = LoopFs::mount(64);
    let data_dir = fs.mnt.join("d");
    let first = pattern(1, 4 << 20);
    let (snap, stopped) = {
        let store = Store::open(&data_dir).expect("open");
        let snap = populate(&store, &first);
        let stopped = fill(&store, "c", 4 << 20, 256 << 20);
        (snap, stopped)
    };
    for round in 0..3 {
        let store = Store::open(&data_dir).unwrap_or_else(|e| panic!("restart {round} on a full disk: {e}"));
        let e = store.write("c", stopped, &pattern(3, 1 << 20)).expect_err("new data is refused on a full disk");
        assert!(is_enospc(&e), "{e}");
    }
    let store = Store::open(&data_dir).expect("a last restart on a full disk");
    check_recovers(&store, &snap, &first, stopped);
}

#[test]
fn a_store_restarts_when_another_program_filled_the_disk() {
    let fs = LoopFs::mount(64);
    let data_dir = fs.mnt.join("d");
    let first = pattern(1, 4 << 20);
    let snap = {
        let store = Store::open(&data_dir).expect("open");
        let snap = populate(&store, &first);
        store.write("c", 4 << 20, &pattern(2, 16 << 20)).expect("16 MiB more fit");
        snap
    };
    fill_with_file(&fs.mnt);
    let store = Store::open(&data_dir).expect("a store restarts on a disk another program filled");
    let e = store.write("c", 20 << 20, &pattern(3, 1 << 20)).expect_err("new data is refused on a full disk");
    assert!(is_enospc(&e), "{e}");
    check_recovers(&store, &snap, &first, 20 << 20);
}
