//! Model-based test of the extent map on its own: random sequences of writes (new data, known
//! zeros and holes; single blocks and ranges across leaf and subtree edges), trims, shares
//! (snapshots and clones), releases, volume growth, commits, rollbacks, spills, flush cycles
//! (whole, or step by step with other operations and commits in between), garbage collection
//! (whole, or in bounded steps until the queue is empty) and restarts run against a real `BlockMap` on the real metadata engine and against a model built
//! from `BTreeMap`s and `BTreeSet`s.
//!
//! After every operation:
//! - every live root reads exactly what the model holds (`lookup` of the whole volume and of a
//!   window, and `for_each`): what was written through that root or inherited before it was
//!   shared, and `None` where nothing was, so copy-on-write isolation holds both ways;
//! - `set_range` reports the model's change in data-holding blocks;
//! - `unique_blocks` counts exactly the slots that releasing the given roots would free;
//! - the allocator agrees with the model's free list, pending list and high-water mark: `alloc`
//!   hands out exactly the slots the model predicts and never one that a live root, a root
//!   waiting for garbage collection or a state that may be durable still references; a flush
//!   releases exactly the slots freed by commits before it began; every slot ever handed out is
//!   referenced, free, or waiting for a flush, and only one of these.
//!
//! At the end every root is released and collected: every slot is free again, the engine holds no
//! node, refcount or garbage record, and a restart finds every slot on the free list.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use blockmap::{BlockMap, BlockMapError, Entry, NodeId, MAX_SLOT, ZERO_SLOT};
use proptest::prelude::*;

/// Volume sizes in blocks: within one leaf, one leaf exactly, just past it (two levels), and past
/// one level-1 subtree of 64 * 256 blocks (three levels).
const SIZES: [u64; 8] = [1, 50, 64, 65, 300, 4_096, 16_385, 20_000];
/// Roots held at once (volumes, snapshots, clones).
const MAX_HANDLES: usize = 8;

/// Where an operation lands in a volume of `n` blocks.
#[derive(Clone, Copy, Debug)]
enum At {
    /// In the first 256 blocks (four leaves), so writes collide and cross leaf edges.
    Head(u64),
    /// In the last 256 blocks.
    Tail(u64),
    /// Around the end of the first level-1 subtree (or the middle of a smaller volume).
    Edge(u64),
    Anywhere(u64),
}

impl At {
    fn block(self, n: u64) -> u64 {
        match self {
            At::Head(x) => x % n.min(256),
            At::Tail(x) => n - 1 - x % n.min(256),
            At::Edge(x) => {
                let mid = if n > 16_384 { 16_384 } else { n / 2 };
                (mid.saturating_sub(64) + x % 128).min(n - 1)
            }
            At::Anywhere(x) => x % n,
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// A new empty volume.
    Create {
        size: usize,
    },
    /// `set_range` of up to `len` blocks: new data in fresh slots, known zeros or holes, as `mix`
    /// says.
    Write {
        h: usize,
        at: At,
        len: u64,
        mix: u64,
        keep_digests: bool,
    },
    /// `set` of one block: data, a known zero or a hole.
    Set {
        h: usize,
        at: At,
        kind: u8,
    },
    /// Unmap up to `len` blocks (up to a whole volume).
    Trim {
        h: usize,
        at: At,
        len: u64,
    },
    /// A snapshot or clone: a new root sharing the tree.
    Share {
        h: usize,
    },
    /// Delete a volume or snapshot.
    Release {
        h: usize,
    },
    /// Grow a volume to a larger size (the tree grows at its next write).
    Grow {
        h: usize,
        size: usize,
    },
    /// A write past the end is refused and changes nothing.
    PastEnd {
        h: usize,
        len: u64,
    },
    Commit,
    Rollback,
    Spill,
    /// One step of the store's flush cycle: begin, then spill and commit the engine, then release the
    /// slots freed before it began. Other operations (commits included) may run between steps,
    /// as they can while the store syncs its extent file.
    FlushStep,
    /// Run a flush cycle to its end (finishing one in progress first), with or without a
    /// transaction open.
    Flush {
        commit_first: bool,
    },
    /// Commit, then dismantle released roots: at once, or in steps of at most `step` nodes
    /// each (as the daemon's background collector does) until the queue is empty.
    CollectGarbage {
        step: Option<usize>,
    },
    /// Persist what is committed, drop map and database, reopen a copy of the directory. Without
    /// `commit_first`, the open transaction is lost as in a crash.
    Restart {
        commit_first: bool,
    },
}

fn at() -> impl Strategy<Value = At> {
    prop_oneof![
        3 => any::<u64>().prop_map(At::Head),
        1 => any::<u64>().prop_map(At::Tail),
        1 => any::<u64>().prop_map(At::Edge),
        1 => any::<u64>().prop_map(At::Anywhere),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let h = 0..MAX_HANDLES;
    prop_oneof![
        2 => (0..SIZES.len()).prop_map(|size| Op::Create { size }),
        10 => (h.clone(), at(), 1..140u64, any::<u64>(), any::<bool>())
            .prop_map(|(h, at, len, mix, keep_digests)| Op::Write { h, at, len, mix, keep_digests }),
        2 => (h.clone(), at(), 0..3u8).prop_map(|(h, at, kind)| Op::Set { h, at, kind }),
        1 => (h.clone(), at(), 1..25_000u64).prop_map(|(h, at, len)| Op::Trim { h, at, len }),
        3 => h.clone().prop_map(|h| Op::Share { h }),
        2 => h.clone().prop_map(|h| Op::Release { h }),
        1 => (h.clone(), 0..SIZES.len()).prop_map(|(h, size)| Op::Grow { h, size }),
        1 => (h, any::<u64>()).prop_map(|(h, len)| Op::PastEnd { h, len }),
        4 => Just(Op::Commit),
        1 => Just(Op::Rollback),
        1 => Just(Op::Spill),
        2 => any::<bool>().prop_map(|commit_first| Op::Flush { commit_first }),
        2 => Just(Op::FlushStep),
        2 => prop::option::of(1..40usize).prop_map(|step| Op::CollectGarbage { step }),
        1 => any::<bool>().prop_map(|commit_first| Op::Restart { commit_first }),
    ]
}

/// One root as its owner (the catalog) holds it, and what it must read.
#[derive(Clone, Debug)]
struct Handle {
    id: NodeId,
    nblocks: u64,
    blocks: BTreeMap<u64, Entry>,
}

/// The model's view of every root, as of the open transaction or of the last commit.
#[derive(Clone, Debug, Default)]
struct State {
    handles: Vec<Handle>,
    /// Released roots wait in the garbage queue.
    garbage: bool,
    /// Slots the released roots still hold until garbage collection dismantles them.
    garbage_slots: BTreeSet<u64>,
}

fn data_slots(h: &Handle) -> impl Iterator<Item = u64> + '_ {
    h.blocks.values().filter(|e| e.has_data()).map(|e| e.slot)
}

impl State {
    fn live_slots(&self) -> BTreeSet<u64> {
        self.handles.iter().flat_map(data_slots).collect()
    }

    /// Slots something still references: live roots and roots waiting to be collected.
    fn held_slots(&self) -> BTreeSet<u64> {
        let mut s = self.live_slots();
        s.extend(&self.garbage_slots);
        s
    }

    /// Slots that releasing the handles in `of` together would free.
    fn unique(&self, of: &BTreeSet<usize>) -> u64 {
        let (mut inside, mut outside) = (BTreeSet::new(), BTreeSet::new());
        for (i, h) in self.handles.iter().enumerate() {
            if of.contains(&i) { &mut inside } else { &mut outside }.extend(data_slots(h));
        }
        inside.difference(&outside).count() as u64
    }
}

struct Open {
    kv: std::sync::Arc<dyn blockmap::MetaKv>,
    map: BlockMap,
}

fn open_at(path: &Path) -> Open {
    // The daemon's engine; durability only at an explicit commit.
    let kv = metakv::open(metakv::Engine::DEFAULT, &path.join("meta")).expect("open the metadata engine");
    let map = BlockMap::open(kv.clone()).expect("open map");
    Open { kv, map }
}

/// Copy a data directory (files and subdirectories).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).expect("copy");
        }
    }
}

/// Panic at the first difference between two lists of present entries.
fn same_entries(what: &str, got: &[(u64, Entry)], want: &[(u64, Entry)]) {
    if got == want {
        return;
    }
    let i = got.iter().zip(want).position(|(g, w)| g != w).unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: differs from the model at its entry #{i}: got {:?}, model has {:?} ({} entries vs {})",
        got.get(i),
        want.get(i),
        got.len(),
        want.len()
    );
}

#[derive(Clone, Copy, Debug)]
enum Flushing {
    /// `begin_flush` returned this ticket.
    Begun(u64),
    /// The write-back layer went to the engine, which committed it.
    Synced(u64),
}

struct Run {
    /// Data directories, the current one last (kept so that they outlive the databases).
    dirs: Vec<tempfile::TempDir>,
    open: Option<Open>,
    /// The model as of the open transaction, and as of the last commit.
    cur: State,
    committed: State,
    // The allocator's model.
    free: BTreeSet<u64>,
    /// Slots freed by a commit, with the flush generation of that commit.
    pending: Vec<(u64, u64)>,
    generation: u64,
    high_water: u64,
    committed_high_water: u64,
    /// Slots handed out in the open transaction, and whether from the free list.
    txn_alloc: Vec<(u64, bool)>,
    /// Slots a state that may be on disk references: the state the last completed flush synced
    /// (or the last restart found) and every state committed since.
    protected: BTreeSet<u64>,
    /// A flush cycle in progress.
    flushing: Option<Flushing>,
    /// Slots the state synced by the flush in progress and every state committed since reference.
    since_sync: BTreeSet<u64>,
    /// Slots held by the committed state when the running flush began (what it makes durable).
    frozen: BTreeSet<u64>,
    writes: u32,
    step: u64,
}

impl Run {
    fn new(first_size: u64) -> Run {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = open_at(dir.path());
        let st = open.map.stats();
        assert_eq!((st.high_water, st.free_slots, st.pending_free), (1, 0, 0), "a new map is empty");
        let cur =
            State { handles: vec![Handle { id: 0, nblocks: first_size, blocks: BTreeMap::new() }], ..State::default() };
        Run {
            dirs: vec![dir],
            open: Some(open),
            committed: cur.clone(),
            cur,
            free: BTreeSet::new(),
            pending: Vec::new(),
            generation: 1,
            high_water: 1,
            committed_high_water: 1,
            txn_alloc: Vec::new(),
            protected: BTreeSet::new(),
            flushing: None,
            since_sync: BTreeSet::new(),
            frozen: BTreeSet::new(),
            writes: 0,
            step: 0,
        }
    }

    fn map(&mut self) -> &mut BlockMap {
        &mut self.open.as_mut().expect("the map is open").map
    }

    fn pick(&self, i: usize) -> Option<usize> {
        let n = self.cur.handles.len();
        (n > 0).then(|| i % n)
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Create { size } => {
                if self.cur.handles.len() < MAX_HANDLES {
                    self.cur.handles.push(Handle { id: 0, nblocks: SIZES[size], blocks: BTreeMap::new() });
                }
            }
            Op::Write { h, at, len, mix, keep_digests } => {
                let Some(h) = self.pick(h) else { return };
                let n = self.cur.handles[h].nblocks;
                let first = at.block(n);
                let len = len.min(n - first);
                // 0: data, 1: known zero, 2: hole.
                let mut x = mix | 1;
                let kinds: Vec<u8> = (0..len)
                    .map(|_| match mix % 8 {
                        0 => 1,
                        1 => 2,
                        _ => {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            [0, 0, 0, 0, 0, 0, 1, 2][usize::from(x.to_le_bytes()[0] % 8)]
                        }
                    })
                    .collect();
                let entries = self.new_entries(&kinds);
                self.set(h, first, &entries, keep_digests, false);
            }
            Op::Set { h, at, kind } => {
                let Some(h) = self.pick(h) else { return };
                let b = at.block(self.cur.handles[h].nblocks);
                let entries = self.new_entries(&[kind]);
                self.set(h, b, &entries, true, true);
            }
            Op::Trim { h, at, len } => {
                let Some(h) = self.pick(h) else { return };
                let n = self.cur.handles[h].nblocks;
                let first = at.block(n);
                let count = len.min(n - first);
                let entries = vec![None; usize::try_from(count).expect("small")];
                self.set(h, first, &entries, true, false);
            }
            Op::Share { h } => {
                let Some(h) = self.pick(h) else { return };
                if self.cur.handles.len() < MAX_HANDLES {
                    let copy = self.cur.handles[h].clone();
                    self.map().share(copy.id).expect("share");
                    self.cur.handles.push(copy);
                }
            }
            Op::Release { h } => {
                let Some(h) = self.pick(h) else { return };
                let gone = self.cur.handles.remove(h);
                self.map().release(gone.id).expect("release");
                if gone.id != 0 && !self.cur.handles.iter().any(|o| o.id == gone.id) {
                    // The last reference: the tree waits in the garbage queue, holding its slots.
                    self.cur.garbage = true;
                    self.cur.garbage_slots.extend(data_slots(&gone));
                }
            }
            Op::Grow { h, size } => {
                let Some(h) = self.pick(h) else { return };
                let hd = &mut self.cur.handles[h];
                hd.nblocks = hd.nblocks.max(SIZES[size]);
            }
            Op::PastEnd { h, len } => {
                let Some(h) = self.pick(h) else { return };
                let Handle { id, nblocks: n, .. } = self.cur.handles[h];
                let first = n - 1 - len % n.min(64);
                let count = n - first + 1 + len % 64;
                let entries = vec![Some(Entry::ZERO); usize::try_from(count).expect("small")];
                let map = self.map();
                let was = map.in_transaction();
                let mut root = id;
                let r = map.set_range(&mut root, n, first, &entries, true);
                assert!(matches!(r, Err(BlockMapError::OutOfRange { .. })), "a write past the end: {r:?}");
                assert_eq!(root, id, "a refused write keeps the root");
                assert_eq!(map.in_transaction(), was, "a refused write changes nothing");
            }
            Op::Commit => self.commit(),
            Op::Rollback => {
                self.map().rollback();
                self.forget_transaction();
                assert!(!self.map().in_transaction());
            }
            Op::Spill => self.map().spill().expect("spill"),
            Op::FlushStep => self.flush_step(),
            Op::Flush { commit_first } => self.flush(commit_first),
            Op::CollectGarbage { step } => self.collect_garbage(step),
            Op::Restart { commit_first } => self.restart(commit_first),
        }
    }

    /// Entries for one write: fresh slots for data, tagged so that every read can be checked.
    fn new_entries(&mut self, kinds: &[u8]) -> Vec<Option<Entry>> {
        self.writes += 1;
        let tag = self.writes;
        let mut slots = self.alloc(kinds.iter().filter(|&&k| k == 0).count()).into_iter();
        kinds
            .iter()
            .zip(1u64..)
            .map(|(k, i)| match k {
                0 => Some(Entry {
                    slot: slots.next().expect("one slot per data block"),
                    crc: tag,
                    digest: (u64::from(tag) << 32) | i,
                }),
                1 => Some(Entry::ZERO),
                _ => None,
            })
            .collect()
    }

    /// `alloc` against the model: the lowest free slots first, then fresh ones; never a slot
    /// that anything still references or that a durable state may reference.
    fn alloc(&mut self, n: usize) -> Vec<u64> {
        let got = self.map().alloc(n).expect("alloc");
        let mut want = Vec::with_capacity(n);
        while want.len() < n {
            let Some(s) = self.free.pop_first() else { break };
            self.txn_alloc.push((s, true));
            want.push(s);
        }
        while want.len() < n {
            want.push(self.high_water);
            self.txn_alloc.push((self.high_water, false));
            self.high_water += 1;
        }
        let held = self.cur.held_slots();
        for s in &got {
            assert!(*s != ZERO_SLOT && *s <= MAX_SLOT, "alloc handed out slot {s}");
            assert!(!held.contains(s), "alloc handed out slot {s}, which a root still references");
            assert!(
                !self.protected.contains(s),
                "alloc handed out slot {s}, which a state that may be durable references"
            );
        }
        assert_eq!(got, want, "alloc({n}): the lowest free slots first, then fresh ones");
        got
    }

    /// Write `entries` from `first` through handle `h`, with `set` or `set_range`.
    fn set(&mut self, h: usize, first: u64, entries: &[Option<Entry>], keep_digests: bool, one: bool) {
        let Handle { id, nblocks, .. } = self.cur.handles[h];
        let mut root = id;
        let map = self.map();
        let delta = if one {
            map.set(&mut root, nblocks, first, entries[0])
        } else {
            map.set_range(&mut root, nblocks, first, entries, keep_digests)
        }
        .unwrap_or_else(|e| panic!("write {} blocks at {first} of root {id} ({nblocks} blocks): {e}", entries.len()));
        let hd = &mut self.cur.handles[h];
        let end = first + entries.len() as u64;
        if !keep_digests {
            // Every leaf the write touches drops the digests it holds; new entries keep theirs.
            let (lo, hi) = (first / 64 * 64, end.div_ceil(64) * 64);
            hd.blocks.range_mut(lo..hi).for_each(|(_, e)| e.digest = 0);
        }
        let mut want = 0i64;
        for (b, new) in (first..end).zip(entries) {
            let old = match new {
                Some(e) => hd.blocks.insert(b, *e),
                None => hd.blocks.remove(&b),
            };
            want += i64::from(new.is_some_and(|e| e.has_data())) - i64::from(old.is_some_and(|e| e.has_data()));
        }
        assert_eq!(delta, want, "change in data blocks of a write of {} blocks at {first}", entries.len());
        assert!(root != 0 || hd.blocks.is_empty(), "a root holding entries is not the empty tree");
        hd.id = root;
    }

    /// The model's side of a commit: what the transaction freed waits for a flush.
    fn model_commit(&mut self) {
        let mut before = self.committed.held_slots();
        before.extend(self.txn_alloc.iter().map(|(s, _)| *s));
        let after = self.cur.held_slots();
        self.pending.extend(before.difference(&after).map(|&s| (self.generation, s)));
        self.protected.extend(&after);
        self.since_sync.extend(&after);
        self.committed = self.cur.clone();
        self.committed_high_water = self.high_water;
        self.txn_alloc.clear();
    }

    fn commit(&mut self) {
        self.map().commit().expect("commit");
        self.model_commit();
        assert!(!self.map().in_transaction());
    }

    /// The model's side of a rollback (or of a crash losing the open transaction).
    fn forget_transaction(&mut self) {
        self.cur = self.committed.clone();
        for (s, from_free) in self.txn_alloc.drain(..) {
            if from_free {
                self.free.insert(s);
            }
        }
        self.high_water = self.committed_high_water;
    }

    /// The store's flush cycle (`daemon/src/store/flush.rs`, `flush_inner`), from its beginning
    /// to its end, after finishing one in progress.
    fn flush(&mut self, commit_first: bool) {
        if commit_first {
            self.commit();
        }
        while self.flushing.is_some() {
            self.flush_step();
        }
        self.flush_step();
        while self.flushing.is_some() {
            self.flush_step();
        }
    }

    /// One step of the flush cycle.
    fn flush_step(&mut self) {
        let open = self.open.as_mut().expect("the map is open");
        match self.flushing.take() {
            None => {
                let ticket = open.map.begin_flush();
                assert_eq!(ticket, self.generation, "flush ticket");
                self.generation += 1;
                // What the flush makes durable: the commits before it began.
                self.frozen = self.committed.held_slots();
                self.flushing = Some(Flushing::Begun(ticket));
            }
            Some(Flushing::Begun(ticket)) => {
                open.map.spill_frozen().expect("spill the frozen layer");
                open.kv.commit().expect("commit the metadata engine");
                open.map.end_flush();
                self.since_sync = std::mem::take(&mut self.frozen);
                self.flushing = Some(Flushing::Synced(ticket));
            }
            Some(Flushing::Synced(ticket)) => {
                let released = open.map.take_released(ticket);
                let (done, keep): (Vec<_>, Vec<_>) = self.pending.drain(..).partition(|(g, _)| *g <= ticket);
                self.pending = keep;
                let mut want: Vec<u64> = done.into_iter().map(|(_, s)| s).collect();
                want.sort_unstable();
                assert_eq!(released, want, "a flush releases exactly the slots freed by commits before it began");
                let mut held = self.cur.held_slots();
                held.extend(self.committed.held_slots());
                for s in &released {
                    assert!(!held.contains(s), "slot {s} released while still referenced");
                    assert!(!self.since_sync.contains(s), "slot {s} released while a state on disk references it");
                }
                open.map.make_available(released.clone());
                self.free.extend(released);
                self.protected = std::mem::take(&mut self.since_sync);
            }
        }
    }

    fn collect_garbage(&mut self, step: Option<usize>) {
        self.commit();
        let had = self.committed.garbage;
        let freed = match step {
            None => self.map().collect_garbage().expect("collect garbage"),
            Some(max) => self.collect_in_steps(max),
        };
        if had {
            assert!(freed > 0, "released roots were waiting, none was collected");
        } else {
            assert_eq!(freed, 0, "nothing was released, yet nodes were collected");
        }
        assert!(!self.map().in_transaction(), "collect_garbage commits what it did");
        self.cur.garbage = false;
        self.cur.garbage_slots.clear();
        self.model_commit();
    }

    /// Steps of at most `max` nodes until none is left; the nodes freed in all.
    fn collect_in_steps(&mut self, max: usize) -> u64 {
        let mut freed = 0;
        loop {
            let step = self.map().collect_garbage_step(max).expect("collect garbage step");
            assert!(step.freed_nodes <= max as u64, "a step of at most {max} nodes freed {}", step.freed_nodes);
            assert!(!self.map().in_transaction(), "each step commits what it did");
            freed += step.freed_nodes;
            if !step.more {
                assert!(!self.map().garbage_queued().expect("queued"), "no more, yet the queue holds nodes");
                return freed;
            }
            assert!(step.freed_nodes > 0, "more is left, yet the step freed nothing");
        }
    }

    fn restart(&mut self, commit_first: bool) {
        if commit_first {
            self.commit();
        } else {
            self.forget_transaction();
        }
        let mut open = self.open.take().expect("the map is open");
        open.map.flush_store().expect("flush store");
        drop(open);
        // an engine can release its file lock lazily (sled's epoch-deferred cleanup may run in another
        // thread), so reopening the same directory in-process is flaky; reopen a copy instead:
        // it holds exactly what a restarted daemon would find.
        let next = tempfile::tempdir().expect("tempdir");
        copy_dir(self.dirs.last().expect("a directory").path(), next.path());
        self.open = Some(open_at(next.path()));
        self.dirs.push(next);
        // Every slot on the stored free list waits for the first flush, to be punched again.
        self.pending = self.pending.drain(..).map(|(_, s)| (0, s)).chain(self.free.iter().map(|&s| (0, s))).collect();
        self.free.clear();
        self.generation = 1;
        self.flushing = None;
        self.protected = self.committed.held_slots();
        assert!(!self.map().in_transaction());
    }

    fn check(&self) {
        let map = &self.open.as_ref().expect("the map is open").map;
        let step = self.step;
        for (i, h) in self.cur.handles.iter().enumerate() {
            let what = format!("handle {i} (root {}, {} blocks)", h.id, h.nblocks);
            let want: Vec<(u64, Entry)> = h.blocks.iter().map(|(b, e)| (*b, *e)).collect();
            let got = map.lookup(h.id, 0, h.nblocks).unwrap_or_else(|e| panic!("{what}: lookup: {e}"));
            assert_eq!(got.len() as u64, h.nblocks);
            let present: Vec<(u64, Entry)> = (0u64..).zip(&got).filter_map(|(b, e)| e.map(|e| (b, e))).collect();
            same_entries(&format!("{what}, lookup"), &present, &want);
            let mut walked = Vec::new();
            map.for_each(h.id, &mut |b, e| {
                walked.push((b, e));
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{what}: for_each: {e}"));
            same_entries(&format!("{what}, for_each"), &walked, &want);
            // A window that starts and ends anywhere.
            let first = (step * 97 + i as u64 * 31) % h.nblocks;
            let count = (h.nblocks - first).min(1 + step * 13 % 200);
            let got = map.lookup(h.id, first, count).unwrap_or_else(|e| panic!("{what}: lookup: {e}"));
            assert_eq!(got.len() as u64, count);
            let present: Vec<(u64, Entry)> = (first..).zip(&got).filter_map(|(b, e)| e.map(|e| (b, e))).collect();
            let want: Vec<(u64, Entry)> = h.blocks.range(first..first + count).map(|(b, e)| (*b, *e)).collect();
            same_entries(&format!("{what}, lookup of {count} from {first}"), &present, &want);
        }
        // Released roots still hold references until they are collected, so exact uniqueness
        // holds only when none waits.
        if !self.cur.garbage {
            let ids = |of: &BTreeSet<usize>| -> Vec<NodeId> { of.iter().map(|&i| self.cur.handles[i].id).collect() };
            let n = self.cur.handles.len();
            let mut sets: Vec<BTreeSet<usize>> = (0..n).map(|i| BTreeSet::from([i])).collect();
            sets.push((0..n).collect());
            let bits = step.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            sets.push((0..n).filter(|&i| (bits >> (i % 64)) & 1 == 1).collect());
            for of in sets {
                let got = map.unique_blocks(&ids(&of)).expect("unique_blocks");
                assert_eq!(got, self.cur.unique(&of), "unique blocks of handles {of:?}");
            }
        }
        // Every slot handed out is referenced (or was freed by the open transaction), free, or
        // waiting for a flush, and only one of these.
        let st = map.stats();
        assert_eq!(st.high_water, self.high_water, "high-water mark");
        assert_eq!(st.free_slots, self.free.len() as u64, "free slots");
        assert_eq!(st.pending_free, self.pending.len() as u64, "slots waiting for a flush");
        let mut used = self.cur.held_slots();
        used.extend(self.committed.held_slots());
        used.extend(self.txn_alloc.iter().map(|(s, _)| *s));
        let pending: BTreeSet<u64> = self.pending.iter().map(|(_, s)| *s).collect();
        assert_eq!(pending.len(), self.pending.len(), "a slot waits twice");
        assert!(used.is_disjoint(&self.free) && used.is_disjoint(&pending) && pending.is_disjoint(&self.free));
        assert_eq!(used.len() + self.free.len() + pending.len(), usize::try_from(self.high_water - 1).expect("small"));
    }

    /// Release everything, collect, flush: nothing may stay allocated, on disk or in memory.
    fn finish(&mut self) {
        while !self.cur.handles.is_empty() {
            self.apply(&Op::Release { h: 0 });
        }
        self.collect_garbage(None);
        self.flush(true);
        self.check();
        let st = self.map().stats();
        assert_eq!((st.free_slots, st.pending_free), (st.high_water - 1, 0), "every slot is free again: {st:?}");
        // Only free-list bitmaps and counters may remain in the engine, and the bitmaps cover exactly
        // the slots handed out. (Key prefixes as in `blockmap/src/lib.rs`.)
        let mut free = BTreeSet::new();
        let kv = self.open.as_ref().expect("the map is open").kv.as_ref();
        for (k, v) in metakv::collect_prefix(kv, b"").expect("scan") {
            match k.first() {
                Some(b'f') => {
                    let group = u64::from_be_bytes(k[1..9].try_into().expect("free-list key"));
                    let bits = u64::from_le_bytes(v[..].try_into().expect("free-list bitmap"));
                    free.extend((0..64).filter(|i| (bits >> i) & 1 == 1).map(|i| group * 64 + i));
                }
                Some(b'm') => {}
                _ => panic!("record {:?} left over after everything was released", String::from_utf8_lossy(&k)),
            }
        }
        assert_eq!(free, (1..st.high_water).collect::<BTreeSet<u64>>(), "the stored free list");
        // A restart finds all of them on the free list, waiting for the first flush.
        self.restart(true);
        self.check();
        self.flush(true);
        let st = self.map().stats();
        assert_eq!((st.free_slots, st.pending_free), (st.high_water - 1, 0), "after a restart: {st:?}");
    }
}

fn run(first_size: usize, ops: &[Op]) {
    let mut r = Run::new(SIZES[first_size]);
    for op in ops {
        r.step += 1;
        r.apply(op);
        r.check();
    }
    r.finish();
}

proptest! {
    // The number of cases is proptest's default, or PROPTEST_CASES.
    #![proptest_config(ProptestConfig { max_shrink_iters: 4_000, ..ProptestConfig::default() })]

    #[test]
    fn block_map_agrees_with_model(first_size in 0..SIZES.len(), ops in proptest::collection::vec(op(), 1..100)) {
        run(first_size, &ops);
    }
}
