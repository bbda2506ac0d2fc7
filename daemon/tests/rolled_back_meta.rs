//! A metadata store that comes back at an earlier point than its last completed flush (an
//! older copy of `meta/`, or a damaged log that sled cuts short at recovery) must be refused
//! at start with one clear error, not served silently as an older catalog. Removing
//! `flushed`, as the error says, accepts the loss and opens what `meta/` holds.

use std::path::Path;
use std::process::Command;

use forkd::store::{Store, StoreError};

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status().expect("cp");
    assert!(status.success(), "cp -a {} {}", from.display(), to.display());
}

/// A store with a clone holding data, flushed; then `meta/` is saved to `saved`, and more is
/// done and flushed (a snapshot, a second clone, more data).
fn store_with_history(data_dir: &Path, saved: &Path) {
    {
        let store = Store::open(data_dir).expect("open");
        store.op(|c| c.create_source("src", 16 << 20)).expect("source");
        store.op(|c| c.clone_volume("src", "c")).expect("clone");
        store.write("c", 0, &vec![0x5a; 1 << 20]).expect("write");
        store.flush().expect("flush");
    }
    copy_dir(&data_dir.join("meta"), saved);
    let store = Store::open(data_dir).expect("reopen");
    let snap = store.op(|c| c.snapshot("c", None)).expect("snapshot");
    store.op(|c| c.clone_volume(&snap.to_string(), "c2")).expect("second clone");
    store.write("c", 1 << 20, &vec![0x6b; 1 << 20]).expect("write more");
    store.flush().expect("flush");
}

fn assert_refused_loudly(e: &StoreError) {
    let msg = e.to_string();
    assert!(matches!(e, StoreError::DataDir { .. }), "{msg}");
    assert!(msg.contains("recovered to flush") && msg.contains("had completed"), "says what was found: {msg}");
    assert!(msg.contains("Restore meta/ from a backup") && msg.contains("remove the file `flushed`"), "{msg}");
}

#[test]
fn an_older_metadata_store_is_refused_loudly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("d");
    let saved = dir.path().join("meta.saved");
    store_with_history(&data_dir, &saved);
    copy_dir(&saved, &data_dir.join("meta"));
    let e = Store::open(&data_dir).expect_err("a store whose meta/ went back in time opened");
    assert_refused_loudly(&e);
    // Refused again: the refused start changed nothing.
    assert_refused_loudly(&Store::open(&data_dir).expect_err("a second open was not refused"));
    // Accepting the loss, as the error says: what meta/ holds opens.
    std::fs::remove_file(data_dir.join("flushed")).expect("remove flushed");
    let store = Store::open(&data_dir).expect("open after accepting the loss");
    assert!(store.catalog().volume("c").is_ok());
    assert!(store.catalog().volume("c2").is_err(), "the older meta/ has no second clone");
}

fn forkd(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_forkd")).args(args).arg("--data-dir").arg(dir).output().expect("run forkd")
}

#[test]
fn check_reports_the_loss_and_repair_accepts_it_only_when_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("d");
    let saved = dir.path().join("meta.saved");
    store_with_history(&data_dir, &saved);
    let healthy = forkd::store::check(&data_dir).expect("check a healthy directory");
    assert!(healthy.problems.is_empty() && !healthy.rolled_back(), "{healthy:?}");
    // src@1 (taken by the first clone), c@1.
    assert_eq!((healthy.volumes, healthy.snapshots), (3, 2), "{healthy:?}");
    assert_eq!(healthy.referenced_slots, 512, "two MiB of data in 4 KiB blocks: {healthy:?}");
    assert_eq!(healthy.orphaned_bytes, 0, "{healthy:?}");

    copy_dir(&saved, &data_dir.join("meta"));
    let r = forkd::store::check(&data_dir).expect("check the rolled-back directory");
    assert!(r.rolled_back(), "{r:?}");
    assert_eq!((r.volumes, r.referenced_slots), (2, 256), "the older meta/ knows one clone and 1 MiB: {r:?}");
    assert_eq!(r.orphaned_bytes, 1 << 20, "the second MiB is data the older meta/ does not map: {r:?}");
    let out = forkd(&["check"], &data_dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("recovered to flush") && text.contains("1.0 MiB"), "{text}");

    // Without --accept-loss nothing changes: the daemon is still refused.
    let out = forkd(&["repair"], &data_dir);
    assert!(!out.status.success(), "repair without --accept-loss succeeded");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--accept-loss"));
    assert_refused_loudly(&Store::open(&data_dir).expect_err("still refused"));

    let out = forkd(&["repair", "--accept-loss"], &data_dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let store = Store::open(&data_dir).expect("opens after the loss was accepted");
    assert!(store.catalog().volume("c2").is_err(), "what meta/ holds, nothing more");
    drop(store);
    let after = forkd::store::check(&data_dir).expect("check after the repair");
    assert!(after.problems.is_empty() && after.orphaned_bytes == 0, "the start gave the orphaned data back: {after:?}");
}
