//! Retention and detach: the plan over a simulated month of hourly snapshots (times set
//! directly, never slept), prune in one commit, and detach followed by deleting the origin.

use std::collections::BTreeSet;

use super::*;
use crate::tests::{crc, open, put};
use crate::{Catalog, CatalogError, IngestSummary, Kind};

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;
/// 2026-11-02T00:00:00Z, a Monday.
const START: i64 = 1_793_577_600_000;

fn snap(id: u64, created_at: i64) -> Snapshot {
    Snapshot {
        id,
        root: 0,
        created_at,
        timeflow: 1,
        size_bytes: 4096,
        allocated_blocks: 0,
        bookmarks: Vec::new(),
        reason: "snapshot".into(),
        ingest: None,
        masked: None,
        guid: None,
        digest: None,
    }
}

/// 30 days of one snapshot an hour at minute 17, plus a second one at 19:45 of day 29
/// (hour 709): ids count up in time order. Returns the snapshots and the id of (hour, extra).
fn month() -> (Vec<Snapshot>, impl Fn(i64, bool) -> u64) {
    let mut out = Vec::new();
    for h in 0..720 {
        out.push(snap(out.len() as u64 + 1, START + h * HOUR + 17 * MIN));
        if h == 709 {
            out.push(snap(out.len() as u64 + 1, START + h * HOUR + 45 * MIN));
        }
    }
    let id = |h: i64, extra: bool| -> u64 {
        let base = u64::try_from(h).unwrap() + 1;
        if h > 709 || (h == 709 && extra) {
            base + 1
        } else {
            base
        }
    };
    (out, id)
}

fn survivors(snaps: &[Snapshot], rules: &Retention, pinned: &BTreeSet<u64>) -> BTreeSet<u64> {
    let gone: BTreeSet<u64> = plan(snaps, rules, pinned).into_iter().map(|(id, _)| id).collect();
    snaps.iter().map(|s| s.id).filter(|id| !gone.contains(id)).collect()
}

#[test]
fn a_month_of_hourly_snapshots_keeps_exactly_what_the_rules_name() {
    let (mut snaps, id) = month();
    snaps[4].bookmarks.push("golden".into()); // hour 4 of day 0
    let pinned: BTreeSet<u64> = [id(100, false)].into();
    let rules = Retention { keep_last: Some(3), keep_hourly: Some(24), keep_daily: Some(7), keep_weekly: Some(4) };
    let mut expected = BTreeSet::new();
    // keep-last 3: hours 717, 718, 719.
    expected.extend((717..720).map(|h| id(h, false)));
    // keep-hourly 24: hours 696..720, the newest of each (hour 709: the 19:45 one).
    expected.extend((696..720).map(|h| id(h, h == 709)));
    // keep-daily 7: days 23..=29, each day's 23:17 snapshot.
    expected.extend((23..30).map(|d| id(d * 24 + 23, false)));
    // keep-weekly 4: weeks start on days 0, 7, 14, 21, 28 (Mondays); the newest four weeks
    // end with days 29 (partial), 27, 20 and 13.
    expected.extend([29, 27, 20, 13].map(|d| id(d * 24 + 23, false)));
    expected.insert(id(4, false)); // bookmarked
    expected.insert(id(100, false)); // pinned
    assert_eq!(survivors(&snaps, &rules, &pinned), expected);
    let reasons: BTreeSet<String> = plan(&snaps, &rules, &pinned).into_iter().map(|(_, r)| r).collect();
    let only: BTreeSet<String> =
        ["kept by none of keep-last 3, keep-hourly 24, keep-daily 7, keep-weekly 4".to_string()].into();
    assert_eq!(reasons, only);
}

#[test]
fn each_rule_alone() {
    let (snaps, id) = month();
    let none = BTreeSet::new();
    let r =
        |keep_last, keep_hourly, keep_daily, keep_weekly| Retention { keep_last, keep_hourly, keep_daily, keep_weekly };
    assert!(plan(&snaps, &Retention::default(), &none).is_empty(), "no rules: nothing goes");
    let daily: BTreeSet<u64> = (0..30).map(|d| id(d * 24 + 23, false)).collect();
    assert_eq!(survivors(&snaps, &r(None, None, Some(100), None), &none), daily, "fewer days than N: one per day");
    let weekly: BTreeSet<u64> = [6, 13, 20, 27, 29].map(|d| id(d * 24 + 23, false)).into();
    assert_eq!(survivors(&snaps, &r(None, None, None, Some(9)), &none), weekly);
    let hourly: BTreeSet<u64> = (718..720).map(|h| id(h, false)).collect();
    assert_eq!(survivors(&snaps, &r(None, Some(2), None, None), &none), hourly);
    // Rules of 0 keep nothing, but the newest stays unless keep-last is explicitly 0.
    let newest: BTreeSet<u64> = [id(719, false)].into();
    assert_eq!(survivors(&snaps, &r(None, Some(0), Some(0), Some(0)), &none), newest);
    let mut bookmarked = snaps.clone();
    bookmarked[0].bookmarks.push("keep".into());
    let first: BTreeSet<u64> = [1].into();
    assert_eq!(survivors(&bookmarked, &r(Some(0), None, None, None), &none), first, "keep-last 0: all but bookmarks");
    assert!(plan(&[], &r(Some(0), None, None, None), &none).is_empty());
}

/// Every slot ever handed out is free (or waiting for a flush to be reused).
fn assert_no_leak(cat: &Catalog) {
    let s = cat.map().stats();
    assert_eq!(s.free_slots + s.pending_free, s.high_water - 1, "slots leaked: {s:?}");
}

/// A source `db` with `n` ingests, ingest `i` writing block `i` with crc `i`.
fn source_with_ingests(cat: &mut Catalog, n: u32) {
    cat.create_source("db", 1 << 20).unwrap();
    for i in 1..=n {
        cat.begin_ingest("db").unwrap();
        put(cat, "db", u64::from(i), i, true);
        cat.finish_ingest("db", IngestSummary::default()).unwrap();
    }
}

#[test]
fn prune_deletes_in_one_commit_and_keeps_what_it_must() {
    let dir = tempfile::tempdir().unwrap();
    let mut cat = open(dir.path());
    source_with_ingests(&mut cat, 6);
    cat.bookmark("db@2", "golden").unwrap();
    cat.clone_volume("db@3", "dev").unwrap();
    let none = BTreeSet::new();
    assert!(cat.prune("db", &none).unwrap().is_empty(), "no rules: nothing goes");
    let rules = Retention { keep_last: Some(1), ..Retention::default() };
    cat.set_retention("db", Some(rules)).unwrap();
    let pinned: BTreeSet<SnapshotId> = [SnapshotId { volume: "db".into(), id: 5 }].into();
    let gone = cat.prune("db", &pinned).unwrap();
    let ids: Vec<u64> = gone.iter().map(|p| p.snapshot.id).collect();
    assert_eq!(ids, vec![1, 4], "bookmarked 2, dependent 3, pinned 5 and newest 6 stay");
    assert_eq!(gone[0].rule, "kept by none of keep-last 1");
    assert_eq!(crc(&cat, "db@6", 1), Some(1), "data of pruned snapshots still read through later ones");
    drop(cat);
    let mut cat = open(dir.path());
    let v = cat.volume("db").unwrap();
    assert_eq!(v.snapshots.iter().map(|s| s.id).collect::<Vec<_>>(), vec![2, 3, 5, 6]);
    assert_eq!(v.retention, Some(rules), "rules survive a restart");
    assert_eq!(cat.prune("db", &none).unwrap().len(), 1, "unpinned, 5 goes");
    cat.set_retention("db", None).unwrap();
    assert_eq!(cat.volume("db").unwrap().retention, None);
    cat.delete("dev").unwrap();
    cat.delete("db").unwrap();
    assert_no_leak(&cat);
}

#[test]
fn detach_then_delete_the_origin_keeps_the_clone_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut cat = open(dir.path());
    source_with_ingests(&mut cat, 3);
    cat.clone_volume("db@2", "dev").unwrap();
    put(&mut cat, "dev", 7, 70, false);
    put(&mut cat, "dev", 1, 10, false);
    cat.snapshot("dev", None).unwrap();
    put(&mut cat, "dev", 8, 80, false);
    let before: Vec<Option<u32>> = (0..16).map(|b| crc(&cat, "dev", b)).collect();
    let snap_before: Vec<Option<u32>> = (0..16).map(|b| crc(&cat, "dev@1", b)).collect();
    assert!(matches!(cat.delete("db@2"), Err(CatalogError::HasDependents { .. })));
    assert!(matches!(cat.detach("db"), Err(CatalogError::NotAClone(..))));
    let v = cat.detach("dev").unwrap();
    assert_eq!((v.origin.clone(), v.detached_from.clone()), (None, Some(SnapshotId { volume: "db".into(), id: 2 })));
    assert_eq!(v.kind, Kind::Clone);
    let again = cat.detach("dev").unwrap_err().to_string();
    assert_eq!(again, "`dev` was detached from db@2: it has no origin to detach from");
    let refresh = cat.refresh("dev", None).unwrap_err().to_string();
    assert_eq!(refresh, "`dev` was detached from db@2: it has no origin to refresh from");
    assert!(matches!(cat.rewind("dev", "db@1"), Err(CatalogError::NotInLineage { .. })));
    // The origin and its whole volume go; the clone reads the same bytes.
    cat.delete("db@2").unwrap();
    cat.delete("db").unwrap();
    drop(cat);
    let mut cat = open(dir.path());
    assert_eq!((0..16).map(|b| crc(&cat, "dev", b)).collect::<Vec<_>>(), before);
    assert_eq!((0..16).map(|b| crc(&cat, "dev@1", b)).collect::<Vec<_>>(), snap_before);
    assert_eq!(cat.volume("dev").unwrap().detached_from.as_ref().map(ToString::to_string).as_deref(), Some("db@2"));
    // Rewinding to its own snapshot still works; then nothing leaks once it goes too.
    cat.rewind("dev", "@1").unwrap();
    assert_eq!(crc(&cat, "dev", 8), None);
    cat.delete("dev").unwrap();
    assert_no_leak(&cat);
}

#[test]
fn detach_keeps_masked_data_fail_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut cat = open(dir.path());
    source_with_ingests(&mut cat, 1);
    cat.clone_volume("db@1", "dev").unwrap();
    cat.clone_volume("db@1", "qa").unwrap();
    cat.detach("qa").unwrap();
    cat.set_clone_from_masked("db", true).unwrap();
    assert!(matches!(cat.detach("dev"), Err(CatalogError::MaskedOnly { .. })), "unmasked data stays attached");
    assert!(matches!(cat.downstream("qa"), Err(CatalogError::MaskedOnly { .. })), "detached earlier: still refused");
    cat.mask_begin("db@1", "db-masked").unwrap();
    assert!(matches!(cat.detach("db-masked"), Err(CatalogError::MaskedVolumeOp { .. })));
}
