//! Snapshot keys: what a commit writes (one key per new or changed snapshot, whatever the
//! number of snapshots), and records of the old form (snapshots in the record) read and moved
//! to their own keys by the first commit that writes them.

use std::sync::{Arc, Mutex};

use blockmap::MetaKv;
use metakv::{Batch, Engine};

use super::*;
use crate::tests::{crc, put};
use crate::{IngestSummary, Retention};

/// One batch's operations: a key and its new value, or `None` for a removal.
type Ops = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// A metadata engine that keeps every batch handed to it.
#[derive(Debug)]
struct Recorder {
    inner: Arc<dyn MetaKv>,
    batches: Mutex<Vec<Ops>>,
}

impl MetaKv for Recorder {
    fn get(&self, key: &[u8]) -> metakv::Result<Option<Vec<u8>>> {
        self.inner.get(key)
    }
    fn scan_prefix(&self, prefix: &[u8], visit: &mut dyn FnMut(&[u8], &[u8])) -> metakv::Result<()> {
        self.inner.scan_prefix(prefix, visit)
    }
    fn apply(&self, batch: &Batch) -> metakv::Result<()> {
        self.batches.lock().unwrap().push(batch.ops().to_vec());
        self.inner.apply(batch)
    }
    fn commit(&self) -> metakv::Result<()> {
        self.inner.commit()
    }
    fn engine(&self) -> Engine {
        self.inner.engine()
    }
}

impl Recorder {
    /// The catalog keys written (`Some`) or removed (`None`) since the last call.
    fn take(&self) -> Ops {
        let batches = std::mem::take(&mut *self.batches.lock().unwrap());
        batches.into_iter().flatten().filter(|(k, _)| k.starts_with(b"c")).collect()
    }
}

fn open_recorded(dir: &std::path::Path) -> (Catalog, Arc<Recorder>) {
    let inner = metakv::open(Engine::DEFAULT, &dir.join("meta")).unwrap();
    let rec = Arc::new(Recorder { inner, batches: Mutex::new(Vec::new()) });
    (Catalog::open(rec.clone()).unwrap(), rec)
}

fn snapshot_keys(ops: &[(Vec<u8>, Option<Vec<u8>>)]) -> Vec<(String, u64, bool)> {
    ops.iter()
        .filter_map(|(k, v)| parse_snapshot_key(k).map(|(name, id)| (name.to_string(), id, v.is_some())))
        .collect()
}

fn records_hold_no_snapshots(ops: &[(Vec<u8>, Option<Vec<u8>>)]) {
    for (k, v) in ops.iter().filter(|(k, _)| k.starts_with(K_VOLUME)) {
        let json: serde_json::Value = serde_json::from_slice(v.as_deref().unwrap_or(b"{}")).unwrap();
        assert!(json.get("snapshots").is_none(), "{} holds its snapshots", String::from_utf8_lossy(k));
    }
}

#[test]
fn a_commit_writes_only_the_snapshot_keys_that_changed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cat, rec) = open_recorded(dir.path());
    cat.create_source("db", 1 << 20).unwrap();
    cat.create_source("db.b", 1 << 20).unwrap(); // its keys must never mix with db's
    for _ in 0..50 {
        cat.snapshot("db", None).unwrap();
    }
    cat.snapshot("db.b", None).unwrap();
    rec.take();
    cat.snapshot("db", None).unwrap();
    let ops = rec.take();
    assert_eq!(snapshot_keys(&ops), vec![("db".into(), 51, true)], "one new key, whatever came before");
    records_hold_no_snapshots(&ops);
    cat.bookmark("db@7", "golden").unwrap();
    assert_eq!(snapshot_keys(&rec.take()), vec![("db".into(), 7, true)]);
    cat.delete("db@8").unwrap();
    assert_eq!(snapshot_keys(&rec.take()), vec![("db".into(), 8, false)]);
    cat.set_retention("db", Some(Retention { keep_last: Some(40), ..Retention::default() })).unwrap();
    assert!(snapshot_keys(&rec.take()).is_empty(), "a setting writes no snapshot");
    let pruned = cat.prune("db", &BTreeSet::new()).unwrap();
    let removed: Vec<(String, u64, bool)> = pruned.iter().map(|p| ("db".into(), p.snapshot.id, false)).collect();
    assert_eq!(removed.len(), 9, "of the 10 oldest past keep-last 40, the bookmarked one stays");
    assert_eq!(snapshot_keys(&rec.take()), removed);
    let before = cat.volume("db").unwrap().snapshots.clone();
    drop((cat, rec));
    let (mut cat, rec) = open_recorded(dir.path());
    assert_eq!(cat.volume("db").unwrap().snapshots, before, "the keys load back, oldest first");
    assert_eq!(cat.volume("db.b").unwrap().snapshots.len(), 1);
    cat.delete("db").unwrap();
    let gone = snapshot_keys(&rec.take());
    assert_eq!(gone.len(), before.len());
    assert!(gone.iter().all(|(name, _, put)| name == "db" && !put), "{gone:?}");
    assert_eq!(cat.volume("db.b").unwrap().snapshots.len(), 1);
}

/// Rewrite volume `name`'s stored form as forkd wrote it before format 3: the snapshots in the
/// record's `snapshots` array, no snapshot keys.
fn make_old_form(kv: &dyn MetaKv, name: &str) {
    let mut prefix = k(K_SNAPSHOT, name);
    prefix.push(0);
    let keys = metakv::collect_prefix(kv, &prefix).unwrap();
    let snaps: Vec<serde_json::Value> = keys.iter().map(|(_, v)| serde_json::from_slice(v).unwrap()).collect();
    let record = kv.get(&k(K_VOLUME, name)).unwrap().unwrap();
    let mut record: serde_json::Value = serde_json::from_slice(&record).unwrap();
    record["snapshots"] = serde_json::Value::Array(snaps);
    let mut batch = Batch::default();
    batch.put(&k(K_VOLUME, name), &serde_json::to_vec(&record).unwrap());
    for (key, _) in &keys {
        batch.delete(key);
    }
    kv.apply(&batch).unwrap();
    kv.commit().unwrap();
}

#[test]
fn an_old_record_is_read_and_moved_by_the_first_commit_that_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cat, rec) = open_recorded(dir.path());
    cat.create_source("db", 1 << 20).unwrap();
    for i in 1..=3 {
        cat.begin_ingest("db").unwrap();
        put(&mut cat, "db", i, u32::try_from(i).unwrap(), true);
        cat.finish_ingest("db", IngestSummary::default()).unwrap();
    }
    cat.clone_volume("db@2", "dev").unwrap();
    cat.snapshot("dev", Some("before")).unwrap();
    cat.snapshot("dev", None).unwrap();
    cat.map_mut().flush_store().unwrap();
    let db = cat.volume("db").unwrap().snapshots.clone();
    let dev = cat.volume("dev").unwrap().snapshots.clone();
    drop(cat);
    make_old_form(rec.inner.as_ref(), "db");
    make_old_form(rec.inner.as_ref(), "dev");
    drop(rec);

    let (mut cat, rec) = open_recorded(dir.path());
    assert_eq!(cat.volume("db").unwrap().snapshots, db, "read from the record");
    assert_eq!(cat.volume("dev").unwrap().snapshots, dev);
    assert_eq!(cat.legacy, ["db".to_string(), "dev".to_string()].into());
    // A write that moves dev's root rewrites its record: every snapshot moves, db stays as it is.
    put(&mut cat, "dev", 9, 90, false);
    cat.map_mut().flush_store().unwrap();
    let ops = rec.take();
    assert_eq!(snapshot_keys(&ops), vec![("dev".into(), 1, true), ("dev".into(), 2, true)]);
    records_hold_no_snapshots(&ops);
    assert!(!ops.iter().any(|(key, _)| key == &k(K_VOLUME, "db")), "db is untouched");
    assert_eq!(cat.legacy, ["db".to_string()].into());
    // Moved: the next write works on a copy without the list, and gives it back.
    put(&mut cat, "dev", 10, 100, false);
    cat.map_mut().flush_store().unwrap();
    assert!(snapshot_keys(&rec.take()).is_empty(), "a write writes no snapshot");
    assert_eq!(cat.volume("dev").unwrap().snapshots, dev);
    // A bookmark on db moves all of db's.
    cat.bookmark("db@2", "golden").unwrap();
    let ops = rec.take();
    assert_eq!(snapshot_keys(&ops).iter().map(|s| s.1).collect::<Vec<_>>(), vec![1, 2, 3]);
    records_hold_no_snapshots(&ops);
    assert!(cat.legacy.is_empty());
    let db = cat.volume("db").unwrap().snapshots.clone();
    drop((cat, rec));
    let (mut cat, _rec) = open_recorded(dir.path());
    assert!(cat.legacy.is_empty());
    assert_eq!(cat.volume("db").unwrap().snapshots, db);
    assert_eq!(cat.volume("dev").unwrap().snapshots, dev);
    assert_eq!(crc(&cat, "dev", 9), Some(90));
    cat.delete("dev").unwrap();
    cat.delete("db").unwrap();
    cat.map_mut().flush_store().unwrap();
    let left = metakv::collect_prefix(cat.map().kv().as_ref(), K_SNAPSHOT).unwrap();
    assert!(left.is_empty(), "deleting volumes removes their snapshot keys");
}

#[test]
fn a_deleted_old_record_and_a_record_with_both_forms() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cat, rec) = open_recorded(dir.path());
    cat.create_source("db", 1 << 20).unwrap();
    cat.snapshot("db", None).unwrap();
    cat.create_source("other", 1 << 20).unwrap();
    cat.snapshot("other", None).unwrap();
    cat.map_mut().flush_store().unwrap();
    drop(cat);
    let kv = rec.inner.clone();
    drop(rec);
    make_old_form(kv.as_ref(), "db");
    // A snapshot key beside a record that holds the snapshots: refused, not merged.
    let mut batch = Batch::default();
    batch.put(&snapshot_key("db", 5), br#"{}"#);
    kv.apply(&batch).unwrap();
    let e = Catalog::open(kv.clone()).unwrap_err().to_string();
    assert!(e.contains("db@5"), "{e}");
    let mut batch = Batch::default();
    batch.delete(&snapshot_key("db", 5));
    kv.apply(&batch).unwrap();
    let mut cat = Catalog::open(kv).unwrap();
    cat.delete("db").unwrap();
    assert!(cat.legacy.is_empty());
    assert_eq!(cat.volume("other").unwrap().snapshots.len(), 1);
}

#[test]
fn snapshot_keys_parse_back_and_sort_by_id() {
    for (name, id) in [("db", 1), ("a.b-c_9", u64::MAX), ("x", 256)] {
        assert_eq!(parse_snapshot_key(&snapshot_key(name, id)), Some((name, id)));
    }
    assert!(snapshot_key("db", 255) < snapshot_key("db", 256));
    assert!(snapshot_key("db", u64::MAX) < snapshot_key("db.b", 0), "a longer name sorts after");
    for bad in [&b"cSdb"[..], b"cSdb\0\0\0", b"cV\0\0\0\0\0\0\0\0\0", b"cS\xff\0\0\0\0\0\0\0\0\0"] {
        assert_eq!(parse_snapshot_key(bad), None);
    }
}

#[test]
fn diff_finds_added_changed_and_gone_in_any_order() {
    let snap = |id: u64, reason: &str| Snapshot {
        id,
        root: 0,
        created_at: 0,
        timeflow: 1,
        size_bytes: 4096,
        allocated_blocks: 0,
        bookmarks: Vec::new(),
        reason: reason.into(),
        ingest: None,
        masked: None,
        guid: None,
        digest: None,
    };
    let old = vec![snap(1, "a"), snap(2, "a"), snap(4, "a")];
    let new = vec![snap(2, "b"), snap(3, "a"), snap(4, "a"), snap(5, "a")];
    let ids = |put: Vec<&Snapshot>| put.into_iter().map(|s| s.id).collect::<Vec<_>>();
    let (put, gone) = diff(&old, &new);
    assert_eq!((ids(put), gone), (vec![2, 3, 5], vec![1]));
    let shuffled: Vec<Snapshot> = new.iter().rev().cloned().collect();
    let (put, gone) = diff(&old, &shuffled);
    assert_eq!((ids(put), gone), (vec![5, 3, 2], vec![1]));
    assert_eq!(diff(&new, &[]).1, vec![2, 3, 4, 5]);
    assert!(diff(&new, &new).0.is_empty());
}

#[test]
fn an_old_record_moves_on_a_snapshot_or_an_ingest() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cat, rec) = open_recorded(dir.path());
    for name in ["a", "b"] {
        cat.create_source(name, 1 << 20).unwrap();
        cat.snapshot(name, Some("first")).unwrap();
        cat.snapshot(name, None).unwrap();
    }
    cat.map_mut().flush_store().unwrap();
    drop(cat);
    make_old_form(rec.inner.as_ref(), "a");
    make_old_form(rec.inner.as_ref(), "b");
    drop(rec);
    let (mut cat, rec) = open_recorded(dir.path());
    assert!(matches!(cat.snapshot("a", Some("first")), Err(CatalogError::BookmarkTaken { .. })));
    cat.snapshot("a", None).unwrap();
    let ops = rec.take();
    assert_eq!(snapshot_keys(&ops).iter().map(|s| s.1).collect::<Vec<_>>(), vec![1, 2, 3]);
    records_hold_no_snapshots(&ops);
    cat.begin_ingest("b").unwrap();
    put(&mut cat, "b", 0, 5, true);
    cat.finish_ingest("b", IngestSummary { changed_bytes: 4096, ..IngestSummary::default() }).unwrap();
    let ops = rec.take();
    assert_eq!(snapshot_keys(&ops).iter().map(|s| s.1).collect::<Vec<_>>(), vec![1, 2, 3]);
    records_hold_no_snapshots(&ops);
    assert!(cat.legacy.is_empty());
    let before: Vec<Vec<Snapshot>> = ["a", "b"].map(|n| cat.volume(n).unwrap().snapshots.clone()).into();
    drop((cat, rec));
    let (cat, _rec) = open_recorded(dir.path());
    let after: Vec<Vec<Snapshot>> = ["a", "b"].map(|n| cat.volume(n).unwrap().snapshots.clone()).into();
    assert_eq!(after, before);
    assert_eq!(after[1][2].ingest.as_ref().map(|i| i.changed_bytes), Some(4096));
    assert_eq!(crc(&cat, "b@3", 0), Some(5));
}
