//! Unit tests of the pointer tree: sharing, copy-on-write isolation and freeing.

use super::*;

fn open() -> (tempfile::TempDir, BlockMap) {
    let dir = tempfile::tempdir().unwrap();
    let kv = metakv::open(metakv::Engine::DEFAULT, &dir.path().join("meta")).unwrap();
    let map = BlockMap::open(kv).unwrap();
    (dir, map)
}

fn data(map: &mut BlockMap, root: &mut NodeId, nblocks: u64, b: u64, tag: u32) {
    let slot = map.alloc(1).unwrap()[0];
    map.set(root, nblocks, b, Some(Entry { slot, crc: tag, digest: u64::from(tag) })).unwrap();
}

fn crcs(map: &BlockMap, root: NodeId, n: u64) -> Vec<Option<u32>> {
    map.lookup(root, 0, n).unwrap().into_iter().map(|e| e.map(|e| e.crc)).collect()
}

#[test]
fn shared_roots_copy_on_write_and_free_exactly() {
    let (_d, mut map) = open();
    let n = 100_000; // height 2
    let mut a = 0;
    for b in [0, 1, 63, 64, 99_999] {
        data(&mut map, &mut a, n, b, 1);
    }
    map.commit().unwrap();
    // snapshot: share the root; the volume keeps writing into a private copy
    let snap = a;
    map.share(snap).unwrap();
    let mut clone = snap;
    map.share(clone).unwrap();
    data(&mut map, &mut a, n, 1, 2);
    data(&mut map, &mut clone, n, 64, 3);
    map.set(&mut clone, n, 0, Some(Entry::ZERO)).unwrap();
    map.commit().unwrap();
    assert_ne!(a, snap);
    assert_ne!(clone, snap);
    let s = crcs(&map, snap, n);
    assert_eq!((s[0], s[1], s[64], s[2]), (Some(1), Some(1), Some(1), None));
    let v = crcs(&map, a, n);
    assert_eq!((v[0], v[1], v[64]), (Some(1), Some(2), Some(1)));
    let c = crcs(&map, clone, n);
    assert_eq!((c[0], c[1], c[64], c[99_999]), (Some(0), Some(1), Some(3), Some(1)));
    // unique: the volume alone owns block 1's new data; the snapshot owns nothing alone.
    assert_eq!(map.unique_blocks(&[a]).unwrap(), 1);
    assert_eq!(map.unique_blocks(&[snap]).unwrap(), 0);
    assert_eq!(map.unique_blocks(&[clone]).unwrap(), 1);
    // releasing everything frees every slot ever handed out
    for r in [a, snap, clone] {
        map.release(r).unwrap();
    }
    map.commit().unwrap();
    map.collect_garbage().unwrap();
    let t = map.begin_flush();
    let freed = map.take_released(t);
    assert_eq!(freed.len() as u64, map.stats().high_water - 1);
    map.make_available(freed);
    assert_eq!(map.alloc(1).unwrap(), vec![1], "lowest freed slot is reused first");
}

#[test]
fn freed_slots_wait_for_a_flush() {
    let (_d, mut map) = open();
    let mut r = 0;
    data(&mut map, &mut r, 64, 0, 1);
    map.commit().unwrap();
    data(&mut map, &mut r, 64, 0, 2);
    map.commit().unwrap();
    assert_eq!(map.stats().pending_free, 1);
    assert_eq!(map.alloc(1).unwrap(), vec![3], "a freed slot is not reused before a flush");
    map.rollback();
    let t = map.begin_flush();
    let s = map.take_released(t);
    assert_eq!(s, vec![1]);
}

#[test]
fn rollback_forgets_everything() {
    let (_d, mut map) = open();
    let mut r = 0;
    data(&mut map, &mut r, 64, 5, 1);
    map.rollback();
    assert!(!map.in_transaction());
    assert_eq!(map.stats().high_water, 1);
    let mut r2 = 0;
    data(&mut map, &mut r2, 64, 5, 1);
    map.commit().unwrap();
    assert_eq!(crcs(&map, r2, 64)[5], Some(1));
}

#[test]
fn grows_by_adding_levels() {
    let (_d, mut map) = open();
    let mut r = 0;
    data(&mut map, &mut r, 64, 3, 7);
    data(&mut map, &mut r, 1 << 20, (1 << 20) - 1, 8);
    map.commit().unwrap();
    let got = map.lookup(r, 0, 1 << 20).unwrap();
    assert_eq!(got[3].map(|e| e.crc), Some(7));
    assert_eq!(got[(1 << 20) - 1].map(|e| e.crc), Some(8));
    assert!(map.set(&mut r, 64, 64, None).is_err());
}

#[test]
fn walk_range_sees_the_range_and_skips_what_enter_refuses() {
    let (_d, mut map) = open();
    let n = 100_000; // height 2: a root, level-1 nodes of 16,384 blocks, leaves of 64
    let mut a = 0;
    for b in [0, 63, 64, 20_000, 99_999] {
        data(&mut map, &mut a, n, b, 1);
    }
    map.commit().unwrap();
    let walk = |first: u64, end: u64, skip: &[u8]| {
        let mut seen = Vec::new();
        map.walk_range(a, first, end, &mut |_, level, _| !skip.contains(&level), &mut |_, b, _| seen.push(b)).unwrap();
        seen
    };
    assert_eq!(walk(0, n, &[]), vec![0, 63, 64, 20_000, 99_999]);
    assert_eq!(walk(63, 20_001, &[]), vec![63, 64, 20_000]);
    assert_eq!(walk(1, 63, &[]), Vec::<u64>::new());
    assert_eq!(walk(0, n, &[0]), Vec::<u64>::new(), "no leaf entered");
    // Nodes are offered with their level and first block; a shared subtree can be skipped.
    let mut offered = Vec::new();
    map.walk_range(
        a,
        0,
        n,
        &mut |id, level, base| {
            offered.push((level, base));
            id != 0
        },
        &mut |_, _, _| {},
    )
    .unwrap();
    assert!(offered.contains(&(1, 16_384)) && offered.contains(&(0, 64)), "{offered:?}");
    assert_eq!(map.walk_range(0, 0, n, &mut |_, _, _| true, &mut |_, _, _| panic!("empty tree")).ok(), Some(()));
}

#[test]
fn exclusive_blocks_are_what_an_overwrite_frees() {
    let (_d, mut map) = open();
    let n = 100_000;
    let mut a = 0;
    for b in [0, 1, 2, 70, 99_999] {
        data(&mut map, &mut a, n, b, 1);
    }
    map.set(&mut a, n, 3, Some(Entry::ZERO)).unwrap();
    map.commit().unwrap();
    // Nothing shares the tree: every data block in range is exclusive, zeros and holes are not.
    assert_eq!(map.exclusive_blocks(a, 0, 100).unwrap(), 4);
    assert_eq!(map.exclusive_blocks(a, 1, 2).unwrap(), 2);
    assert_eq!(map.exclusive_blocks(a, 3, 60).unwrap(), 0);
    // A snapshot shares the root: nothing is exclusive until the head copies what it writes.
    let snap = a;
    map.share(snap).unwrap();
    assert_eq!(map.exclusive_blocks(a, 0, n).unwrap(), 0);
    data(&mut map, &mut a, n, 1, 2);
    map.commit().unwrap();
    // Block 1's new slot is the head's alone; block 0 is still the snapshot's too (its leaf
    // was copied, so the slot has two references); block 70's leaf is still shared.
    assert_eq!(map.exclusive_blocks(a, 0, n).unwrap(), 1);
    // Checked against what an overwrite of everything really frees.
    let before = map.freed_in_transaction();
    for b in [0, 1, 2, 70, 99_999] {
        map.set(&mut a, n, b, Some(Entry::ZERO)).unwrap();
    }
    assert_eq!(map.freed_in_transaction() - before, 1);
    map.rollback();
}

#[test]
fn a_flush_makes_durable_only_what_was_committed_before_it_began() {
    let (_d, mut map) = open();
    let mut r = 0;
    data(&mut map, &mut r, 64, 0, 1);
    map.commit().unwrap();
    let ticket = map.begin_flush();
    // Committed while the flush syncs the extent file: its data may have missed the sync.
    data(&mut map, &mut r, 64, 1, 2);
    map.commit().unwrap();
    map.spill().unwrap(); // a spill while the flush runs keeps the newer layer in memory
    map.spill_frozen().unwrap();
    map.end_flush();
    assert_eq!(map.take_released(ticket), Vec::<u64>::new());
    let engine = BlockMap::open(map.kv().clone()).unwrap();
    assert_eq!(crcs(&engine, r, 2), vec![Some(1), None], "the engine holds only the frozen layer");
    assert_eq!(crcs(&map, r, 2), vec![Some(1), Some(2)], "the map still reads the newer layer");
    map.flush_store().unwrap();
    let engine = BlockMap::open(map.kv().clone()).unwrap();
    assert_eq!(crcs(&engine, r, 2), vec![Some(1), Some(2)]);
}

#[test]
fn only_slots_no_flush_and_no_other_tree_has_seen_are_rewritable() {
    let (_d, mut map) = open();
    let mut r = 0;
    data(&mut map, &mut r, 64, 3, 1);
    assert_eq!(map.rewritable(r, 0, 8).unwrap(), vec![None; 8], "not before the commit");
    map.commit().unwrap();
    let slot = map.lookup(r, 3, 1).unwrap()[0].unwrap().slot;
    let mut want = vec![None; 8];
    want[3] = Some(slot);
    assert_eq!(map.rewritable(r, 0, 8).unwrap(), want);
    // Rewritten in place: same slot, new checksum; nothing freed, nothing allocated.
    let high = map.stats().high_water;
    map.set(&mut r, 64, 3, Some(Entry { slot, crc: 7, digest: 0 })).unwrap();
    assert_eq!(map.rewritten_in_transaction(), 1);
    map.commit().unwrap();
    assert_eq!((map.stats().pending_free, map.stats().high_water), (0, high));
    assert_eq!(crcs(&map, r, 4)[3], Some(7));
    // A snapshot shares the tree: the slot is no longer this tree's alone.
    let snap = r;
    map.share(snap).unwrap();
    map.commit().unwrap();
    assert_eq!(map.rewritable(r, 0, 8).unwrap(), vec![None; 8]);
    map.release(snap).unwrap();
    map.commit().unwrap();
    assert_eq!(map.rewritable(r, 0, 8).unwrap(), want);
    // Once a flush began, a durable state may point at it.
    map.begin_flush();
    assert_eq!(map.rewritable(r, 0, 8).unwrap(), vec![None; 8]);
}

/// Fresh data in every block of `first..end` of the tree at `root`.
fn fill(map: &mut BlockMap, root: &mut NodeId, nblocks: u64, first: u64, end: u64, tag: u32) {
    let slots = map.alloc(usize::try_from(end - first).unwrap()).unwrap();
    let es: Vec<Option<Entry>> = slots.into_iter().map(|slot| Some(Entry { slot, crc: tag, digest: 0 })).collect();
    map.set_range(root, nblocks, first, &es, true).unwrap();
}

#[test]
fn garbage_collection_steps_resume_after_a_restart_without_leaks() {
    let dir = tempfile::tempdir().unwrap();
    let reopen = || BlockMap::open(metakv::open(metakv::Engine::DEFAULT, &dir.path().join("meta")).unwrap()).unwrap();
    let mut map = reopen();
    // `big`: 300 leaves under two level-1 nodes. `keep` shares it, then rewrites the first
    // 200 leaves: those are big's alone, the other 100 stay shared.
    let n = 300 * 64;
    let mut big = 0;
    fill(&mut map, &mut big, n, 0, n, 1);
    map.commit().unwrap();
    let mut keep = big;
    map.share(keep).unwrap();
    fill(&mut map, &mut keep, n, 0, 200 * 64, 2);
    map.commit().unwrap();
    let high = map.stats().high_water;
    map.release(big).unwrap();
    map.commit().unwrap();
    // What waits in the queue is unique to no one: `keep` still shares 100 leaves with it,
    // until the step that dismantles big's root and first level-1 node.
    assert_eq!(map.unique_blocks(&[keep]).unwrap(), 200 * 64);
    let step = map.collect_garbage_step(7).unwrap();
    assert_eq!(step, GcStep { freed_nodes: 7, more: true });
    assert_eq!(map.unique_blocks(&[keep]).unwrap(), n);
    // Interrupted: what the step did is durable, the rest waits in the queue.
    map.flush_store().unwrap();
    drop(map);
    let mut map = reopen();
    assert!(map.garbage_queued().unwrap());
    let (mut steps, mut freed) = (0, 7);
    loop {
        let step = map.collect_garbage_step(7).unwrap();
        assert!(step.freed_nodes <= 7);
        (steps, freed) = (steps + 1, freed + step.freed_nodes);
        if !step.more {
            break;
        }
    }
    assert!(steps > 20, "{steps} steps");
    assert_eq!(freed, 202, "the root, the first level-1 node and the 200 leaves keep does not share");
    assert!(!map.garbage_queued().unwrap());
    assert_eq!(map.unique_blocks(&[keep]).unwrap(), n, "keep holds every block alone");
    assert_eq!(crcs(&map, keep, n)[200 * 64..], vec![Some(1); 100 * 64][..], "keep still reads big's blocks");
    // Every slot is freed exactly once: big's 200 rewritten leaves before or after the
    // restart (the free list), the rest when keep goes too.
    map.release(keep).unwrap();
    map.commit().unwrap();
    map.collect_garbage().unwrap();
    let t = map.begin_flush();
    let released = map.take_released(t);
    assert_eq!(released, (1..high).collect::<Vec<u64>>(), "every slot freed once");
    map.flush_store().unwrap();
    let left: Vec<u8> = metakv::collect_prefix(map.kv().as_ref(), b"").unwrap().iter().map(|(k, _)| k[0]).collect();
    assert!(left.iter().all(|&p| p == P_FREE || p == b'm'), "only the free list and counters are left: {left:?}");
}

/// What differs between two trees, by looking every block up: the oracle `diff_range` is
/// checked against.
fn diff_oracle(map: &BlockMap, old: NodeId, new: NodeId, n: u64) -> Vec<(u64, Option<u64>)> {
    let (a, b) = (map.lookup(old, 0, n).unwrap(), map.lookup(new, 0, n).unwrap());
    let slot = |e: Option<Entry>| e.filter(Entry::has_data).map(|e| e.slot);
    (0..n).filter(|&i| slot(a[usize_of(i)]) != slot(b[usize_of(i)])).map(|i| (i, slot(b[usize_of(i)]))).collect()
}

fn diff_of(map: &BlockMap, old: NodeId, new: NodeId, first: u64, end: u64) -> Vec<(u64, Option<u64>)> {
    let mut out = Vec::new();
    map.diff_range(old, new, first, end, &mut |b, _, e| out.push((b, e.map(|e| e.slot)))).unwrap();
    out
}

#[test]
fn diff_finds_exactly_the_changed_blocks_and_skips_shared_nodes() {
    let (_d, mut map) = open();
    let n = 70_000; // height 2
    let mut head = 0;
    for b in (0..n).step_by(97) {
        data(&mut map, &mut head, n, b, 1);
    }
    map.commit().unwrap();
    let snap = head;
    map.share(snap).unwrap();
    // Overwrites, a known zero over data, a known zero over a hole, a new block.
    for b in [0, 97, 194, 69_999 - 69_999 % 97, 5_000] {
        data(&mut map, &mut head, n, b, 2);
    }
    map.set(&mut head, n, 291, Some(Entry::ZERO)).unwrap();
    map.set(&mut head, n, 1, Some(Entry::ZERO)).unwrap();
    map.commit().unwrap();
    let want = diff_oracle(&map, snap, head, n);
    assert_eq!(want.len(), 6, "five writes and one block zeroed; a zero over a hole is no change: {want:?}");
    assert!(want.contains(&(291, None)));
    assert_eq!(diff_of(&map, snap, head, 0, n), want);
    assert_eq!(diff_of(&map, head, snap, 0, n), diff_oracle(&map, head, snap, n), "the other way round");
    assert_eq!(diff_of(&map, 0, snap, 0, n), diff_oracle(&map, 0, snap, n), "from the empty tree");
    assert_eq!(diff_of(&map, snap, 0, 0, n), diff_oracle(&map, snap, 0, n), "to the empty tree");
    assert!(diff_of(&map, snap, snap, 0, n).is_empty());
    // A range: only what lies in it, so a resumed transfer starts where it stopped.
    let part: Vec<_> = want.iter().copied().filter(|(b, _)| (100..6_000).contains(b)).collect();
    assert_eq!(diff_of(&map, snap, head, 100, 6_000), part);
}

#[test]
fn diff_compares_trees_of_different_heights() {
    let (_d, mut map) = open();
    let small = 1_000; // height 1
    let big = 200_000; // height 2
    let mut a = 0;
    for b in [3, 64, 999] {
        data(&mut map, &mut a, small, b, 1);
    }
    map.commit().unwrap();
    let mut grown = a;
    map.share(grown).unwrap();
    data(&mut map, &mut grown, big, 150_000, 2);
    data(&mut map, &mut grown, big, 64, 3);
    map.commit().unwrap();
    assert_eq!(diff_of(&map, a, grown, 0, big), diff_oracle(&map, a, grown, big));
    assert_eq!(diff_of(&map, grown, a, 0, big), diff_oracle(&map, grown, a, big));
    assert_eq!(diff_of(&map, a, grown, 0, big).len(), 2);
}

#[test]
fn content_digest_depends_on_contents_not_on_slots_or_zero_forms() {
    let (_d, mut map) = open();
    let n = 10_000;
    let zero = crate::block_crc(&[0u8; 4096]);
    let put = |map: &mut BlockMap, root: &mut NodeId, b: u64, crc: u32| {
        let slot = map.alloc(1).unwrap()[0];
        map.set(root, n, b, Some(Entry { slot, crc, digest: 0 })).unwrap();
    };
    let (mut a, mut b) = (0, 0);
    put(&mut map, &mut a, 5, 11);
    put(&mut map, &mut a, 700, 12);
    put(&mut map, &mut b, 700, 12);
    put(&mut map, &mut b, 5, 11);
    map.set(&mut b, n, 9, Some(Entry::ZERO)).unwrap();
    put(&mut map, &mut b, 10, zero);
    map.commit().unwrap();
    assert_eq!(map.content_digest(a).unwrap(), map.content_digest(b).unwrap());
    put(&mut map, &mut b, 700, 13);
    map.commit().unwrap();
    assert_ne!(map.content_digest(a).unwrap(), map.content_digest(b).unwrap(), "a changed crc changes it");
    let empty = map.content_digest(0).unwrap();
    assert_eq!(empty, 0);
    put(&mut map, &mut a, 6, 11);
    map.commit().unwrap();
    assert_ne!(map.content_digest(a).unwrap(), empty);
    // A digest moves by what changed: from a snapshot's, the next one's follows.
    let snap = a;
    map.share(snap).unwrap();
    put(&mut map, &mut a, 700, 14);
    put(&mut map, &mut a, 9_000, 15);
    map.set(&mut a, n, 5, Some(Entry::ZERO)).unwrap();
    put(&mut map, &mut a, 6, zero);
    map.commit().unwrap();
    let (d0, d1) = (map.content_digest(snap).unwrap(), map.content_digest(a).unwrap());
    assert_ne!(d0, d1);
    assert_eq!(d0.wrapping_add(map.digest_change(snap, a).unwrap()), d1);
    assert_eq!(d1.wrapping_add(map.digest_change(a, snap).unwrap()), d0);
    assert_eq!(map.digest_change(0, a).unwrap(), d1, "from nothing: the whole digest");
}
