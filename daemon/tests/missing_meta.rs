//! A data directory whose metadata is gone but whose data is not: opening it must be refused
//! with one clear error that says what was found and what to do, and must change nothing
//! (no empty catalog is created beside the data). Moving `extents.0` away, as the error
//! suggests, then starts an empty store.

use forkd::store::{Store, StoreError};

#[test]
fn missing_metadata_beside_data_is_refused_loudly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("d");
    {
        let store = Store::open(&data_dir).expect("open");
        store.op(|c| c.create_source("src", 16 << 20)).expect("source");
        store.op(|c| c.clone_volume("src", "c")).expect("clone");
        store.write("c", 0, &vec![0x5a; 1 << 20]).expect("write");
        store.flush().expect("flush");
    }
    std::fs::remove_dir_all(data_dir.join("meta")).expect("remove meta/");
    let e = Store::open(&data_dir).expect_err("a store without its metadata beside 1 MiB of data opened");
    let msg = e.to_string();
    assert!(matches!(e, StoreError::DataDir { .. }), "{msg}");
    assert!(msg.contains("extents.0 holds") && msg.contains("meta/") && msg.contains("missing"), "{msg}");
    assert!(msg.contains("restore meta/ from a backup") && msg.contains("move extents.0 away"), "{msg}");
    assert!(!data_dir.join("meta").exists(), "the refused open created an empty metadata store");

    // Refused again (nothing changed), and then, with extents.0 moved away, an empty store.
    assert!(Store::open(&data_dir).is_err(), "a second open was not refused");
    std::fs::rename(data_dir.join("extents.0"), dir.path().join("extents.0.saved")).expect("move extents.0 away");
    let store = Store::open(&data_dir).expect("an empty store after moving extents.0 away");
    assert!(store.catalog().volumes().is_empty());
}
