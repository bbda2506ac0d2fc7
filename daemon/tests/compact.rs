//! Giving back the metadata of deleted clones: the daemon's upkeep (`Store::maintain`) compacts
//! `meta/` once a fifth of it could be given back, and `forkd compact` does it with the daemon
//! stopped; either way everything still there reads back.

use std::path::Path;

use forkd::store::{disk_usage, Store};

const MIB: usize = 1 << 20;

/// A source with 16 MiB of data and 20 clones that each rewrite every block.
fn populate(dir: &Path) -> Store {
    let store = Store::open(dir).expect("open");
    store.op(|c| c.create_source("src", 16 << 20)).expect("source");
    store.op(|c| c.begin_ingest("src")).expect("begin ingest");
    store.ingest_blocks("src", 0, Some(&vec![0x11; 16 * MIB]), (16 * MIB / 4096) as u64).expect("ingest");
    store.op(|c| c.finish_ingest("src", Default::default())).expect("finish ingest");
    for i in 0..20 {
        let name = format!("c{i}");
        store.op(|c| c.clone_volume("src@1", &name)).expect("clone");
        for b in 0..(16 * MIB / 4096) as u64 {
            store.write(&name, b * 4096, &[0x22; 4096]).expect("write");
        }
    }
    store.flush().expect("flush");
    store
}

fn delete_clones(store: &Store) {
    for i in 0..20 {
        store.op_freeing(|c| c.delete(&format!("c{i}"))).expect("delete");
    }
    store.flush().expect("flush");
}

fn assert_source_intact(store: &Store) {
    let mut buf = vec![0u8; 16 * MIB];
    store.read("src@1", 0, &mut buf).expect("read");
    assert!(buf.iter().all(|&b| b == 0x11));
    assert_eq!(store.catalog().volumes().len(), 1);
}

#[test]
fn the_upkeep_gives_deleted_metadata_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = populate(dir.path());
    delete_clones(&store);
    let before = disk_usage(&dir.path().join("meta"));
    assert!(store.maintain().expect("maintain"), "a store that lost most of its metadata is compacted");
    let after = disk_usage(&dir.path().join("meta"));
    let live = store.meta_live_bytes().expect("live");
    assert!(after * 2 < before, "meta/ went from {before} to {after} bytes");
    assert!(after as f64 <= 1.5 * live as f64 + 1_048_576.0, "meta/ {after} bytes for {live} live");
    assert!(!store.maintain().expect("maintain"), "nothing more to give back: no second compaction");
    let metrics = store.metrics.render();
    assert!(metrics.contains("forkd_meta_compactions_total 1"), "{metrics}");
    assert!(metrics.contains(&format!("forkd_meta_disk_bytes {after}")), "{metrics}");
    assert_source_intact(&store);
}

#[test]
fn forkd_compact_works_on_a_stopped_daemon_s_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("d");
    delete_clones(&populate(&d));
    let before = disk_usage(&d.join("meta"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(["compact", "--data-dir"])
        .arg(&d)
        .output()
        .expect("run forkd compact");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("meta/ compacted"));
    let after = disk_usage(&d.join("meta"));
    assert!(after * 2 < before, "meta/ went from {before} to {after} bytes");
    assert_source_intact(&Store::open(&d).expect("reopen"));
}
