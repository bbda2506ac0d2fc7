//! Model-based test: random sequences of write, trim, flush, snapshot, clone, rewind, refresh,
//! delete and restart run against the real store (sled map, extent file, io_uring) and against
//! a plain in-memory model; every read of every volume and snapshot must agree with the model,
//! catalog refusals must agree too, and once everything is deleted no slot may be leaked.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use forkd::store::Store;
use proptest::prelude::*;

const SIZE: usize = 1 << 20; // 256 blocks: a two-level tree with four leaves
const BS: usize = 4096;

#[derive(Clone, Debug)]
enum Op {
    Write { vol: usize, offset: usize, len: usize, seed: u8 },
    Trim { vol: usize, block: usize, count: usize },
    Flush,
    Snapshot { vol: usize },
    Clone { vol: usize, snap: usize, from_volume: bool },
    Rewind { vol: usize, snap: usize },
    Refresh { vol: usize },
    DeleteSnapshot { vol: usize, snap: usize },
    DeleteVolume { vol: usize },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..8usize, 0..SIZE, 1..3 * BS, any::<u8>()).prop_map(|(vol, offset, len, seed)| Op::Write { vol, offset, len, seed }),
        1 => (0..8usize, 0..SIZE / BS, 1..80usize).prop_map(|(vol, block, count)| Op::Trim { vol, block, count }),
        1 => Just(Op::Flush),
        2 => (0..8usize).prop_map(|vol| Op::Snapshot { vol }),
        2 => (0..8usize, 0..8usize, any::<bool>()).prop_map(|(vol, snap, from_volume)| Op::Clone { vol, snap, from_volume }),
        1 => (0..8usize, 0..8usize).prop_map(|(vol, snap)| Op::Rewind { vol, snap }),
        1 => (0..8usize).prop_map(|vol| Op::Refresh { vol }),
        1 => (0..8usize, 0..8usize).prop_map(|(vol, snap)| Op::DeleteSnapshot { vol, snap }),
        1 => (0..8usize).prop_map(|vol| Op::DeleteVolume { vol }),
        1 => Just(Op::Restart),
    ]
}

#[derive(Clone, Debug)]
struct MVol {
    source: bool,
    data: Vec<u8>,
    origin: Option<String>,
    snaps: BTreeMap<u64, Vec<u8>>,
    next: u64,
}

#[derive(Debug, Default)]
struct Model {
    vols: BTreeMap<String, MVol>,
    made: usize,
}

impl Model {
    fn pick(&self, i: usize) -> Option<String> {
        let n = self.vols.len();
        (n > 0).then(|| self.vols.keys().nth(i % n).cloned()).flatten()
    }

    fn pick_snap(&self, vol: &str, i: usize) -> Option<(String, u64)> {
        let v = self.vols.get(vol)?;
        let n = v.snaps.len();
        (n > 0).then(|| v.snaps.keys().nth(i % n).map(|id| (format!("{vol}@{id}"), *id))).flatten()
    }

    fn snapshot(&mut self, vol: &str) -> String {
        let v = self.vols.get_mut(vol).unwrap_or_else(|| unreachable!());
        let id = v.next;
        v.next += 1;
        v.snaps.insert(id, v.data.clone());
        format!("{vol}@{id}")
    }

    fn snap_data(&self, r: &str) -> Vec<u8> {
        let (v, id) = r.split_once('@').unwrap_or_default();
        self.vols[v].snaps[&id.parse::<u64>().unwrap_or(0)].clone()
    }

    fn dependents(&self, snap: &str) -> bool {
        self.vols.values().any(|v| v.origin.as_deref() == Some(snap))
    }

    fn lineage(&self, vol: &str) -> Vec<String> {
        let mut out = vec![vol.to_string()];
        let mut cur = self.vols[vol].origin.clone();
        while let Some(o) = cur {
            let v = o.split('@').next().unwrap_or_default().to_string();
            cur = self.vols.get(&v).and_then(|x| x.origin.clone());
            out.push(v);
        }
        out
    }
}

fn pattern(seed: u8, offset: usize, len: usize) -> Vec<u8> {
    // Mostly non-zero bytes, with whole zero blocks now and then (they become known zeros).
    if seed.is_multiple_of(7) {
        return vec![0; len];
    }
    (0..len).map(|i| (((offset + i) as u64).wrapping_mul(2_654_435_761) >> 24).to_le_bytes()[0] ^ seed | 1).collect()
}

fn read_all(store: &Store, r: &str) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE];
    store.read(r, 0, &mut buf).unwrap_or_else(|e| panic!("read {r}: {e}"));
    buf
}

fn check_all(store: &Store, m: &Model) {
    for (name, v) in &m.vols {
        assert!(read_all(store, name) == v.data, "volume {name} differs from the model");
        for (id, data) in &v.snaps {
            let r = format!("{name}@{id}");
            assert!(read_all(store, &r) == *data, "snapshot {r} differs from the model");
        }
    }
    assert_eq!(store.catalog().volumes().len(), m.vols.len());
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

/// The store under test, reopened from a copy of its directory at each restart.
struct Harness {
    /// Declared first so it closes before the directories below are removed.
    store: Option<Store>,
    /// The first data directory.
    dir: PathBuf,
    /// The copies restarts made; the last one is in use.
    dirs: Vec<tempfile::TempDir>,
}

impl Harness {
    fn store(&self) -> &Store {
        self.store.as_ref().unwrap_or_else(|| unreachable!())
    }

    /// Restart from what is on disk. sled can release its file lock lazily (its
    /// epoch-deferred cleanup may sit in another thread), so a same-process reopen of the same
    /// directory is flaky; the daemon never does that. Reopen a copy of the directory instead:
    /// it holds exactly what a restarted daemon would find.
    fn restart(&mut self) {
        drop(self.store.take());
        let next = tempfile::tempdir().expect("tempdir");
        copy_dir(&self.dirs.last().map(|d| d.path().to_path_buf()).unwrap_or_else(|| self.dir.clone()), next.path());
        self.store = Some(Store::open(next.path()).expect("reopen"));
        self.dirs.push(next);
    }
}

fn run(dir: &Path, ops: Vec<Op>) {
    let mut h = Harness { store: Some(Store::open(dir).expect("open")), dir: dir.to_path_buf(), dirs: Vec::new() };
    let mut m = Model::default();
    seed_source(h.store(), &mut m);
    for op in ops {
        apply(&mut h, &mut m, op);
    }
    let s = h.store();
    check_all(s, &m);
    // Delete everything, leaves first: nothing may stay allocated.
    while !m.vols.is_empty() {
        let leaf = m
            .vols
            .keys()
            .find(|n| {
                !m.vols
                    .iter()
                    .any(|(o, v)| o != *n && v.origin.as_ref().is_some_and(|x| x.split('@').next() == Some(n.as_str())))
            })
            .cloned()
            .unwrap_or_else(|| unreachable!("the lineage is a forest"));
        s.op(|c| c.delete(&leaf)).unwrap_or_else(|e| panic!("final delete {leaf}: {e}"));
        m.vols.remove(&leaf);
    }
    s.flush().expect("flush");
    let st = s.catalog().map().stats();
    assert_eq!(st.free_slots, st.high_water - 1, "every slot is free again: {st:?}");
    assert_eq!(st.pending_free, 0);
}

/// The source every sequence starts from: its first half ingested, one snapshot.
fn seed_source(s: &Store, m: &mut Model) {
    s.op(|c| c.create_source("src", SIZE as u64)).expect("create source");
    s.op(|c| c.begin_ingest("src")).expect("begin ingest");
    let data = pattern(3, 0, SIZE / 2);
    s.ingest_blocks("src", 0, Some(&data), (SIZE / 2 / BS) as u64).expect("ingest");
    s.op(|c| c.finish_ingest("src", Default::default())).expect("finish");
    let mut full = data;
    full.resize(SIZE, 0);
    m.vols.insert(
        "src".into(),
        MVol { source: true, data: full.clone(), origin: None, snaps: BTreeMap::from([(1, full)]), next: 2 },
    );
}

/// Run one operation on the store and the model, checking that they agree.
fn apply(h: &mut Harness, m: &mut Model, op: Op) {
    match op {
        Op::Write { vol, offset, len, seed } => write(h.store(), m, vol, offset, len, seed),
        Op::Trim { vol, block, count } => trim(h.store(), m, vol, block, count),
        Op::Flush => h.store().flush().expect("flush"),
        Op::Snapshot { vol } => {
            let Some(name) = m.pick(vol) else { return };
            let id = h.store().op(|c| c.snapshot(&name, None)).expect("snapshot");
            assert_eq!(id.to_string(), m.snapshot(&name));
        }
        Op::Clone { vol, snap, from_volume } => clone(h.store(), m, vol, snap, from_volume),
        Op::Rewind { vol, snap } => rewind(h.store(), m, vol, snap),
        Op::Refresh { vol } => refresh(h.store(), m, vol),
        Op::DeleteSnapshot { vol, snap } => delete_snapshot(h.store(), m, vol, snap),
        Op::DeleteVolume { vol } => delete_volume(h.store(), m, vol),
        Op::Restart => h.restart(),
    }
}

fn write(s: &Store, m: &mut Model, vol: usize, offset: usize, len: usize, seed: u8) {
    let Some(name) = m.pick(vol) else { return };
    let len = len.min(SIZE - offset);
    let data = pattern(seed, offset, len);
    let r = s.write(&name, offset as u64, &data);
    let v = m.vols.get_mut(&name).unwrap_or_else(|| unreachable!());
    if v.source {
        assert!(r.is_err(), "write to source {name} must be refused");
    } else {
        r.unwrap_or_else(|e| panic!("write {name}: {e}"));
        v.data[offset..offset + len].copy_from_slice(&data);
    }
}

fn trim(s: &Store, m: &mut Model, vol: usize, block: usize, count: usize) {
    let Some(name) = m.pick(vol) else { return };
    let count = count.min(SIZE / BS - block);
    let r = s.zero(&name, (block * BS) as u64, (count * BS) as u64);
    let v = m.vols.get_mut(&name).unwrap_or_else(|| unreachable!());
    if v.source {
        assert!(r.is_err());
    } else {
        r.unwrap_or_else(|e| panic!("zero {name}: {e}"));
        v.data[block * BS..(block + count) * BS].fill(0);
    }
}

fn clone(s: &Store, m: &mut Model, vol: usize, snap: usize, from_volume: bool) {
    let Some(name) = m.pick(vol) else { return };
    m.made += 1;
    let new = format!("c{}", m.made);
    let from = if from_volume {
        name.clone()
    } else {
        match m.pick_snap(&name, snap) {
            Some((r, _)) => r,
            None => return,
        }
    };
    let (_, made_from) = s.op(|c| c.clone_volume(&from, &new)).expect("clone");
    let origin = if from_volume { m.snapshot(&name) } else { from };
    assert_eq!(made_from.to_string(), origin);
    let data = m.snap_data(&origin);
    m.vols.insert(new, MVol { source: false, data, origin: Some(origin), snaps: BTreeMap::new(), next: 1 });
}

fn rewind(s: &Store, m: &mut Model, vol: usize, snap: usize) {
    let Some(name) = m.pick(vol) else { return };
    // target: one of its own snapshots or of a volume up its lineage
    let lineage = m.lineage(&name);
    let owner = &lineage[snap % lineage.len()];
    let Some((target, _)) = m.pick_snap(owner, snap) else { return };
    let r = s.op(|c| c.rewind(&name, &target));
    if m.vols[&name].source {
        assert!(r.is_err());
        return;
    }
    let (t, kept) = r.unwrap_or_else(|e| panic!("rewind {name} to {target}: {e}"));
    assert_eq!(t.to_string(), target);
    assert_eq!(kept.to_string(), m.snapshot(&name));
    let data = m.snap_data(&target);
    let v = m.vols.get_mut(&name).unwrap_or_else(|| unreachable!());
    v.data = data;
    if owner != &name {
        v.origin = Some(target);
    }
}

fn refresh(s: &Store, m: &mut Model, vol: usize) {
    let Some(name) = m.pick(vol) else { return };
    let r = s.op(|c| c.refresh(&name, None));
    let v = &m.vols[&name];
    let Some(origin) = v.origin.clone().filter(|_| !v.source) else {
        assert!(r.is_err());
        return;
    };
    let ov = origin.split('@').next().unwrap_or_default().to_string();
    let Some((&latest, _)) = m.vols[&ov].snaps.last_key_value() else { unreachable!() };
    let target = format!("{ov}@{latest}");
    let (t, kept) = r.unwrap_or_else(|e| panic!("refresh {name}: {e}"));
    assert_eq!(t.to_string(), target);
    assert_eq!(kept.to_string(), m.snapshot(&name));
    let data = m.snap_data(&target);
    let v = m.vols.get_mut(&name).unwrap_or_else(|| unreachable!());
    v.data = data;
    v.origin = Some(target);
}

fn delete_snapshot(s: &Store, m: &mut Model, vol: usize, snap: usize) {
    let Some(name) = m.pick(vol) else { return };
    let Some((r, id)) = m.pick_snap(&name, snap) else { return };
    let res = s.op(|c| c.delete(&r));
    if m.dependents(&r) {
        assert!(res.is_err(), "deleting {r} with dependents must be refused");
    } else {
        res.unwrap_or_else(|e| panic!("delete {r}: {e}"));
        m.vols.get_mut(&name).unwrap_or_else(|| unreachable!()).snaps.remove(&id);
    }
}

fn delete_volume(s: &Store, m: &mut Model, vol: usize) {
    let Some(name) = m.pick(vol) else { return };
    let res = s.op(|c| c.delete(&name));
    let has_deps = m
        .vols
        .iter()
        .any(|(n, v)| n != &name && v.origin.as_ref().is_some_and(|o| o.split('@').next() == Some(name.as_str())));
    if has_deps {
        assert!(res.is_err(), "deleting {name} with dependents must be refused");
    } else {
        res.unwrap_or_else(|e| panic!("delete {name}: {e}"));
        m.vols.remove(&name);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        max_shrink_iters: 200,
        .. ProptestConfig::default()
    })]

    #[test]
    fn store_agrees_with_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().expect("tempdir");
        run(dir.path(), ops);
    }
}
