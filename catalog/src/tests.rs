//! Catalog operations on the real metadata engine: lineage rules, refusals, restart.

use super::*;

pub(crate) fn open(dir: &std::path::Path) -> Catalog {
    let kv = metakv::open(metakv::Engine::DEFAULT, &dir.join("meta")).unwrap();
    Catalog::open(kv).unwrap()
}

/// Write block `b` of `vol` with crc `tag` (into its running ingest with `staging`).
pub(crate) fn put(cat: &mut Catalog, vol: &str, b: u64, tag: u32, staging: bool) {
    let slot = cat.map_mut().alloc(1).unwrap()[0];
    cat.write(vol, b, &[Some(Entry { slot, crc: tag, digest: u64::from(tag) })], staging).unwrap();
}

pub(crate) fn crc(cat: &Catalog, reference: &str, b: u64) -> Option<u32> {
    let t = cat.target(reference).unwrap();
    cat.map().lookup(t.root, b, 1).unwrap()[0].map(|e| e.crc)
}

#[test]
fn lineage_rewind_refresh_delete() {
    let dir = tempfile::tempdir().unwrap();
    let mut cat = open(dir.path());
    cat.create_source("db", 1 << 20).unwrap();
    assert!(matches!(cat.create_source("db", 4096), Err(CatalogError::NameTaken(_))));
    assert!(matches!(cat.create_source("x", 4095), Err(CatalogError::InvalidSize { .. })));
    cat.begin_ingest("db").unwrap();
    put(&mut cat, "db", 0, 1, true);
    assert_eq!(crc(&cat, "db", 0), None, "staging is invisible until the ingest finishes");
    let s1 = cat.finish_ingest("db", IngestSummary::default()).unwrap();
    assert_eq!(s1.to_string(), "db@1");
    assert!(matches!(cat.write("db", 0, &[None], false), Err(CatalogError::ReadOnly(_))));
    let (dev, from) = cat.clone_volume("db@1", "dev").unwrap();
    assert_eq!((dev.origin.clone(), from), (Some(s1.clone()), s1.clone()));
    put(&mut cat, "dev", 0, 2, false);
    assert_eq!((crc(&cat, "db@1", 0), crc(&cat, "dev", 0)), (Some(1), Some(2)));
    let ds1 = cat.snapshot("dev", Some("before")).unwrap();
    put(&mut cat, "dev", 1, 3, false);
    let (target, kept) = cat.rewind("dev", "@before").unwrap();
    assert_eq!(target, ds1);
    assert_eq!((crc(&cat, "dev", 0), crc(&cat, "dev", 1)), (Some(2), None));
    assert_eq!(crc(&cat, &kept.to_string(), 1), Some(3), "pre-rewind state kept");
    assert_eq!(cat.volume("dev").unwrap().timeflow, 2);
    // a second ingest, then refresh
    cat.begin_ingest("db").unwrap();
    put(&mut cat, "db", 5, 9, true);
    cat.finish_ingest("db", IngestSummary::default()).unwrap();
    let (t, _) = cat.refresh("dev", None).unwrap();
    assert_eq!(t.to_string(), "db@2");
    assert_eq!((crc(&cat, "dev", 0), crc(&cat, "dev", 5)), (Some(1), Some(9)));
    // dependents are named
    let err = cat.delete("db@2").unwrap_err().to_string();
    assert!(err.contains("dev"), "{err}");
    assert!(cat.delete("db").is_err());
    cat.delete("db@1").unwrap();
    assert!(matches!(cat.rewind("dev", "2020-01-01T00:00:00Z"), Err(CatalogError::BeforeFirstSnapshot { .. })));
    assert!(matches!(cat.rewind("db", "db@2"), Err(CatalogError::NotAClone(..))));
    cat.clone_volume("db@2", "other").unwrap();
    assert!(matches!(cat.rewind("dev", "other@latest"), Err(CatalogError::UnknownSnapshot(_))));
    drop(cat);
    // restart: everything is there
    let cat = open(dir.path());
    assert_eq!(crc(&cat, "dev", 5), Some(9));
    assert_eq!(cat.volume("dev").unwrap().snapshots.len(), 3);
    assert_eq!(cat.volume("dev").unwrap().allocated_blocks, 2);
}

#[test]
fn interrupted_ingest_waits_to_be_resumed_or_aborted() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut cat = open(dir.path());
        cat.create_source("db", 1 << 20).unwrap();
        assert!(!cat.begin_ingest("db").unwrap());
        put(&mut cat, "db", 3, 1, true);
        cat.map_mut().flush_store().unwrap();
    }
    let mut cat = open(dir.path());
    let v = cat.volume("db").unwrap();
    assert!(v.staging.is_some() && v.snapshots.is_empty(), "no snapshot, the staging tree is kept");
    assert_eq!(crc(&cat, "db", 3), None, "the source shows its latest snapshot");
    let (base, _) = cat.ingest_base("db").unwrap();
    assert_eq!(
        cat.map().lookup(base, 3, 1).unwrap()[0].map(|e| e.crc),
        Some(1),
        "a resume compares with what was staged"
    );
    assert!(cat.begin_ingest("db").unwrap(), "begin resumes");
    cat.abort_ingest("db").unwrap();
    let t = cat.map_mut().begin_flush();
    assert_eq!(cat.map_mut().take_released(t), vec![1], "aborting frees the staged block");
}

#[test]
fn resize_grows_a_source_and_keeps_snapshot_sizes() {
    const KIB: u64 = 1024;
    let dir = tempfile::tempdir().unwrap();
    {
        let mut cat = open(dir.path());
        // 64 blocks: a one-leaf tree; 256 blocks need a level more.
        cat.create_source("db", 256 * KIB).unwrap();
        cat.begin_ingest("db").unwrap();
        put(&mut cat, "db", 0, 1, true);
        put(&mut cat, "db", 63, 2, true);
        cat.finish_ingest("db", IngestSummary::default()).unwrap();
        // refusals change nothing
        assert!(matches!(cat.resize("db", 128 * KIB), Err(CatalogError::InvalidSize { .. })), "shrink");
        let err = cat.resize("db", 128 * KIB).unwrap_err().to_string();
        assert!(err.contains("only grow"), "{err}");
        assert!(matches!(cat.resize("db", 1024 * KIB + 512), Err(CatalogError::InvalidSize { .. })));
        assert!(matches!(cat.resize("db", (1 << 50) + 4096), Err(CatalogError::InvalidSize { .. })));
        assert!(matches!(cat.resize("nope", 1 << 20), Err(CatalogError::UnknownVolume(_))));
        cat.clone_volume("db@1", "dev").unwrap();
        assert!(matches!(cat.resize("dev", 1 << 20), Err(CatalogError::NotASource(_))));
        cat.begin_ingest("db").unwrap();
        assert!(matches!(cat.resize("db", 1 << 20), Err(CatalogError::IngestRunning(_))));
        cat.abort_ingest("db").unwrap();
        assert_eq!(cat.volume("db").unwrap().size_bytes, 256 * KIB);
        // same size: nothing to do; larger: the head grows, db@1 keeps its size
        assert_eq!(cat.resize("db", 256 * KIB).unwrap(), 256 * KIB);
        assert_eq!(cat.resize("db", 1024 * KIB).unwrap(), 256 * KIB);
        assert_eq!(cat.volume("db").unwrap().size_bytes, 1024 * KIB);
        assert_eq!(cat.target("db").unwrap().size_bytes, 1024 * KIB);
        assert_eq!(cat.target("db@1").unwrap().size_bytes, 256 * KIB);
        assert_eq!(crc(&cat, "db", 0), Some(1));
        assert_eq!(crc(&cat, "db", 200), None, "new blocks read as zeros");
        // the next ingest writes past the old end: the tree gains a level
        cat.begin_ingest("db").unwrap();
        put(&mut cat, "db", 200, 3, true);
        put(&mut cat, "db", 0, 4, true);
        let s2 = cat.finish_ingest("db", IngestSummary::default()).unwrap();
        assert_eq!(s2.to_string(), "db@2");
        assert_eq!((crc(&cat, "db@2", 0), crc(&cat, "db@2", 63), crc(&cat, "db@2", 200)), (Some(4), Some(2), Some(3)));
        assert_eq!((crc(&cat, "db@1", 0), crc(&cat, "db@1", 63)), (Some(1), Some(2)), "db@1 unchanged");
        assert_eq!(cat.target("db@2").unwrap().size_bytes, 1024 * KIB);
        // a clone of the old snapshot refreshes to the new size
        cat.refresh("dev", None).unwrap();
        assert_eq!(cat.volume("dev").unwrap().size_bytes, 1024 * KIB);
        assert_eq!(crc(&cat, "dev", 200), Some(3));
    }
    // restart: sizes are durable
    let cat = open(dir.path());
    assert_eq!(cat.volume("db").unwrap().size_bytes, 1024 * KIB);
    assert_eq!(cat.target("db@1").unwrap().size_bytes, 256 * KIB);
    assert_eq!(crc(&cat, "db@2", 200), Some(3));
}
