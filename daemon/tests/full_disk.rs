//! A full disk: the data directory on a 24 MiB tmpfs. Writes past the space get a clear
//! "no space" error, commit nothing, and leave the store usable: earlier data reads back,
//! deleting frees space, and new writes then succeed. Needs root (to mount a tmpfs); skips
//! with a loud message otherwise (`.ci/run` runs as root, so it runs there).

use std::process::Command;

use forkd::store::{Store, StoreError};

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| u8::try_from(i % 256).unwrap_or(0).wrapping_mul(31) ^ seed | 1).collect()
}

#[test]
fn full_disk_is_a_clear_error_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED full_disk: cannot mount a tmpfs here (needs root); .ci/run runs it as root");
        return;
    }
    let _m = Mount(dir.path().to_path_buf());
    let data_dir = dir.path().join("d");
    let store = Store::open(&data_dir).expect("open");
    store.op(|c| c.create_source("src", 64 << 20)).expect("source");
    store.op(|c| c.clone_volume("src", "c")).expect("clone");
    let first = pattern(1, 4 << 20);
    store.write("c", 0, &first).expect("first 4 MiB fit");
    store.flush().expect("flush");
    let snap = store.op(|c| c.snapshot("c", None)).expect("snapshot");
    // Keep writing 1 MiB pieces until the disk is full.
    let mut off = 4u64 << 20;
    let mut err = None;
    while off < 64 << 20 {
        match store.write("c", off, &pattern(2, 1 << 20)) {
            Ok(()) => off += 1 << 20,
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let e = err.expect("a 24 MiB disk cannot hold 64 MiB");
    let msg = e.to_string();
    assert!(matches!(&e, StoreError::Io(io) if io.raw_os_error() == Some(libc::ENOSPC)), "expected ENOSPC, got: {msg}");
    assert!(msg.contains("No space left"), "the error says why: {msg}");
    // Nothing of the failed write is visible; what was written before is intact.
    let mut buf = vec![0u8; 1 << 20];
    store.read("c", off, &mut buf).expect("read the failed range");
    assert!(buf.iter().all(|&b| b == 0), "the failed write committed nothing");
    let mut back = vec![0u8; first.len()];
    store.read(&snap.to_string(), 0, &mut back).expect("read snapshot");
    assert!(back == first, "earlier data is intact");
    // Trimming frees space (after the flush punches it), and writes succeed again.
    store.zero("c", 4 << 20, off - (4 << 20)).expect("trim");
    store.flush().expect("flush after trim");
    store.write("c", 4 << 20, &pattern(3, 1 << 20)).expect("a write fits again after freeing space");
    store.flush().expect("flush");
    drop(store);
    // Reopen a copy (see tests/model.rs: an engine may release its lock lazily in-process).
    let copy = tempfile::tempdir().expect("tempdir");
    for f in ["extents.0", "reserve", "format", "flushed"] {
        std::fs::copy(data_dir.join(f), copy.path().join(f)).expect("copy");
    }
    let status = Command::new("cp").arg("-a").arg(data_dir.join("meta")).arg(copy.path()).status().expect("cp");
    assert!(status.success());
    let store = Store::open(copy.path()).expect("reopen after a full disk");
    store.read(&snap.to_string(), 0, &mut back).expect("read snapshot after restart");
    assert!(back == first);
}
