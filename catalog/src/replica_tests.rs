//! Replication between two catalogs on the real metadata engine: snapshots travel as the
//! blocks that differ, clones arrive as clones, refusals, promote and the way back.

use super::tests::{crc, open, put};
use super::*;

/// Send snapshot `reference` of `from` to `to`, as the sender does: the header, the blocks that
/// differ from `base` (every block written with the same crc), progress, finish.
fn send(
    from: &Catalog,
    to: &mut Catalog,
    reference: &str,
    base: Option<&str>,
    origin: Option<&str>,
) -> Result<SnapshotId> {
    let (v, s) = from.snapshot_of(reference).unwrap();
    let guid_of = |r: &str| {
        let (v, s) = from.snapshot_of(r).unwrap();
        from.guid(v, s)
    };
    let base_root = base.map_or(0, |b| from.snapshot_of(b).unwrap().1.root);
    let header = IncomingHeader {
        volume: VolumeMeta {
            site: from.site().to_string(),
            kind: v.kind,
            created_at: v.created_at,
            origin: origin.map(guid_of),
            masked_from: None,
            clone_from_masked: false,
        },
        base: base.map(guid_of),
        snapshot: SnapshotMeta::of(from.guid(v, s), s),
        digest: digest_hex(from.map().content_digest(s.root).unwrap()),
    };
    let name = v.name.clone();
    let next = to.begin_incoming(&name, &header)?;
    let mut changed = Vec::new();
    from.map()
        .diff_range(base_root, s.root, next, s.size_bytes / BLOCK_SIZE, &mut |b, _, e| changed.push((b, e)))
        .unwrap();
    for (b, e) in changed {
        match e {
            Some(e) => put(to, &name, b, e.crc, true),
            None => to.write(&name, b, &[Some(Entry::ZERO)], true).unwrap(),
        }
        to.incoming_progress(&name, b + 1).unwrap();
    }
    to.finish_incoming(&name)
}

/// A volume's name, origin and `(number, time)` of each snapshot.
type Lineage = (String, Option<String>, Vec<(u64, i64)>);

fn tree(cat: &Catalog) -> Vec<Lineage> {
    let vols = cat.volumes().values();
    vols.map(|v| {
        let snaps = v.snapshots.iter().map(|s| (s.id, s.created_at)).collect();
        (v.name.clone(), v.origin.as_ref().map(ToString::to_string), snaps)
    })
    .collect()
}

#[test]
fn snapshots_and_clones_replicate_and_come_back_after_a_promote() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut a, mut b) = (open(da.path()), open(db.path()));
    assert_ne!(a.site(), b.site());
    a.create_source("db", 1 << 20).unwrap();
    a.begin_ingest("db").unwrap();
    put(&mut a, "db", 0, 1, true);
    put(&mut a, "db", 5, 2, true);
    a.finish_ingest("db", IngestSummary::default()).unwrap();
    a.begin_ingest("db").unwrap();
    put(&mut a, "db", 5, 3, true);
    a.zero("db", 0, 1, true).unwrap();
    a.finish_ingest("db", IngestSummary::default()).unwrap();
    a.clone_volume("db@1", "dev").unwrap();
    put(&mut a, "dev", 7, 4, false);
    a.snapshot("dev", Some("mine")).unwrap();

    send(&a, &mut b, "db@1", None, None).unwrap();
    send(&a, &mut b, "db@2", Some("db@1"), None).unwrap();
    send(&a, &mut b, "dev@1", Some("db@1"), Some("db@1")).unwrap();
    assert_eq!(tree(&a), tree(&b), "same volumes, origins, numbers and times");
    assert_eq!((crc(&b, "db@1", 0), crc(&b, "db@2", 0), crc(&b, "db@2", 5)), (Some(1), Some(0), Some(3)));
    assert_eq!((crc(&b, "dev@1", 7), crc(&b, "dev@mine", 0)), (Some(4), Some(1)));
    let (bv, bs) = b.snapshot_of("dev@1").unwrap();
    let (av, asnap) = a.snapshot_of("dev@1").unwrap();
    assert_eq!(b.guid(bv, bs), a.guid(av, asnap), "the guid travels");
    // The target keeps each digest, found from its base's and what changed: the whole tree's.
    for r in ["db@1", "db@2", "dev@1"] {
        let whole = a.map().content_digest(a.snapshot_of(r).unwrap().1.root).unwrap();
        assert_eq!(b.snapshot_of(r).unwrap().1.digest_value(), Some(whole), "{r}'s digest on the target");
    }
    assert!(b.target("dev").unwrap().read_only);
    assert!(matches!(b.write("dev", 0, &[None], false), Err(CatalogError::Replica(_))));
    assert!(matches!(b.snapshot("dev", None), Err(CatalogError::Replica(_))));
    let again = send(&a, &mut b, "dev@1", Some("db@1"), Some("db@1")).unwrap_err().to_string();
    assert!(again.contains("already holds"), "{again}");
    // Clones of a replica's snapshots are ordinary clones.
    b.clone_volume("dev@1", "test").unwrap();
    put(&mut b, "test", 1, 9, false);
    // A volume of the same name with writes of its own never follows a sender.
    a.clone_volume("db@1", "x").unwrap();
    a.snapshot("x", None).unwrap();
    b.clone_volume("db@1", "x").unwrap();
    put(&mut b, "x", 3, 8, false);
    let err = send(&a, &mut b, "x@1", Some("db@1"), Some("db@1")).unwrap_err().to_string();
    assert!(err.contains("writes of its own"), "{err}");
    assert_eq!(crc(&b, "x", 3), Some(8), "its writes stay");

    // Failover: promote at b, write, snapshot, send back: a's dev follows b's.
    assert_eq!(b.promote("dev").unwrap().site, a.site());
    put(&mut b, "dev", 8, 5, false);
    b.snapshot("dev", None).unwrap();
    assert!(b.promote("dev").is_err(), "promoted once");
    send(&b, &mut a, "dev@2", Some("dev@1"), Some("db@1")).unwrap();
    assert_eq!((crc(&a, "dev@2", 8), crc(&a, "dev", 8)), (Some(5), Some(5)));
    assert!(a.target("dev").unwrap().read_only, "the old source now follows the new one");
    assert_eq!(a.volume("dev").unwrap().replica_of.as_ref().map(|r| r.site.clone()), Some(b.site().to_string()));

    // A volume with writes since its latest snapshot does not follow.
    b.promote("db").unwrap();
    a.promote("dev").unwrap();
    put(&mut a, "dev", 9, 6, false);
    b.promote("dev").unwrap_err();
    put(&mut b, "dev", 10, 7, false);
    b.snapshot("dev", None).unwrap();
    let err = send(&b, &mut a, "dev@3", Some("dev@2"), Some("db@1")).unwrap_err().to_string();
    assert!(err.contains("writes since dev@2"), "{err}");
}

#[test]
fn a_digest_mismatch_drops_the_snapshot_and_progress_survives_a_restart() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = open(da.path());
    a.create_source("db", 1 << 20).unwrap();
    a.begin_ingest("db").unwrap();
    for blk in 0..4 {
        put(&mut a, "db", blk, 10 + u32::try_from(blk).unwrap(), true);
    }
    a.finish_ingest("db", IngestSummary::default()).unwrap();
    let (v, s) = a.snapshot_of("db@1").unwrap();
    let header = IncomingHeader {
        volume: VolumeMeta {
            site: a.site().into(),
            kind: Kind::Source,
            created_at: v.created_at,
            origin: None,
            masked_from: None,
            clone_from_masked: false,
        },
        base: None,
        snapshot: SnapshotMeta::of(a.guid(v, s), s),
        digest: digest_hex(a.map().content_digest(s.root).unwrap()),
    };
    {
        let mut b = open(db.path());
        assert_eq!(b.begin_incoming("db", &header).unwrap(), 0);
        put(&mut b, "db", 0, 10, true);
        b.incoming_progress("db", 1).unwrap();
        b.map_mut().flush_store().unwrap();
    }
    let mut b = open(db.path());
    assert_eq!(b.begin_incoming("db", &header).unwrap(), 1, "resumes after the last recorded block");
    assert!(b.begin_ingest("db").is_err(), "no ingest into a replica");
    put(&mut b, "db", 1, 11, true);
    put(&mut b, "db", 2, 99, true); // damaged on the way
    put(&mut b, "db", 3, 13, true);
    let err = b.finish_incoming("db").unwrap_err().to_string();
    assert!(err.contains("digest"), "{err}");
    assert!(b.volume("db").unwrap().staging.is_none() && b.volume("db").unwrap().snapshots.is_empty());
    assert_eq!(b.begin_incoming("db", &header).unwrap(), 0, "starts again from the first block");
}
