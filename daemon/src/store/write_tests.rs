//! Tests of the write path's slot choices against a real data directory: rewrites in place
//! only where nothing else can see the slot.

use super::Store;

const MIB: u64 = 1 << 20;

/// A store with clone `c` (1 MiB) of an empty source's snapshot.
fn store_with_clone() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    store.op(|c| c.create_source("src", MIB).map(|_| ())).expect("source");
    store.op(|c| c.snapshot("src", None).map(|_| ())).expect("snapshot");
    store.op(|c| c.clone_volume("src@1", "c").map(|_| ())).expect("clone");
    (dir, store)
}

fn high_water(store: &Store) -> u64 {
    store.catalog().map().stats().high_water
}

fn block(store: &Store, reference: &str) -> u8 {
    let mut buf = vec![0u8; 4096];
    store.read(reference, 0, &mut buf).expect("read");
    assert!(buf.iter().all(|&b| b == buf[0]), "{reference}: a block written whole reads back whole");
    buf[0]
}

#[test]
fn a_slot_is_rewritten_in_place_only_while_this_tree_alone_has_held_it_since_the_last_flush() {
    let (_d, store) = store_with_clone();
    store.write("c", 0, &[1u8; 4096]).expect("write 1");
    let first = high_water(&store);
    store.write("c", 0, &[2u8; 4096]).expect("write 2");
    assert_eq!(high_water(&store), first, "the second write reused the first one's slot");
    assert_eq!(block(&store, "c"), 2);
    // A snapshot now shares the block: the next write takes a fresh slot and the snapshot keeps 2.
    store.op(|c| c.snapshot("c", None).map(|_| ())).expect("snapshot c");
    store.write("c", 0, &[3u8; 4096]).expect("write 3");
    assert_eq!(high_water(&store), first + 1);
    assert_eq!((block(&store, "c@1"), block(&store, "c")), (2, 3));
    // Once a flush made the block durable, a rewrite in place could tear what a crash keeps.
    store.flush().expect("flush");
    let before = high_water(&store);
    store.write("c", 0, &[4u8; 4096]).expect("write 4");
    assert_eq!(high_water(&store), before + 1, "nothing was freed, so a new slot");
    assert_eq!((block(&store, "c@1"), block(&store, "c")), (2, 4));
}
