//! Environment operations on the real metadata engine: collisions and refusals, resolution by
//! time for sources fed at different times, one transaction for all members (a failing member
//! changes nothing, also after a restart), rewind, refresh and delete.

use super::*;
use crate::tests::{crc, open, put};
use crate::IngestSummary;

/// An ingest into `src` that writes block 0 with `tag`; waits so the next time differs.
fn ingest(cat: &mut Catalog, src: &str, tag: u32) -> SnapshotId {
    cat.begin_ingest(src).unwrap();
    put(cat, src, 0, tag, true);
    let id = cat.finish_ingest(src, IngestSummary::default()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(3));
    id
}

fn members(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(m, v)| (m.to_string(), v.to_string())).collect()
}

fn time_of(cat: &Catalog, snap: &SnapshotId) -> i64 {
    cat.volume(&snap.volume).unwrap().find(&SnapSel::Id(snap.id)).unwrap().created_at
}

/// What a volume looks like, for "nothing changed" checks.
fn state(cat: &Catalog, vol: &str) -> String {
    let v = cat.volume(vol).unwrap();
    format!("{}:{}:{:?}:{}", v.root, v.timeflow, v.origin, serde_json::to_string(&v.snapshots).unwrap())
}

#[test]
fn names_members_and_collisions_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let mut cat = open(dir.path());
    for v in ["db", "app", "other"] {
        cat.create_source(v, 1 << 20).unwrap();
    }
    let err = |r: Result<Environment>| r.unwrap_err();
    assert!(matches!(err(cat.env_create("shop", &members(&[("db", "nope")]))), CatalogError::UnknownVolume(_)));
    assert!(matches!(err(cat.env_create("shop", &members(&[]))), CatalogError::BadEnvironment(_)));
    assert!(matches!(err(cat.env_create("shop", &members(&[("d.b", "db")]))), CatalogError::InvalidName { .. }));
    let dup = err(cat.env_create("shop", &members(&[("a", "db"), ("b", "db")]))).to_string();
    assert!(dup.contains("given twice"), "{dup}");
    assert!(matches!(err(cat.env_create("db", &members(&[("a", "app")]))), CatalogError::NameTaken(_)));
    cat.env_create("shop", &members(&[("db", "db"), ("app", "app")])).unwrap();
    assert!(matches!(err(cat.env_create("shop", &members(&[("o", "other")]))), CatalogError::EnvironmentTaken(_)));
    let e = err(cat.env_create("shop2", &members(&[("o", "other"), ("db", "db")])));
    assert!(matches!(e, CatalogError::InEnvironment { .. }), "{e}");
    assert!(!cat.environments().contains_key("shop2"), "nothing half-done");
    assert!(matches!(cat.create_source("shop", 4096), Err(CatalogError::EnvironmentTaken(_))));
    let del = cat.delete("db").unwrap_err().to_string();
    assert!(del.contains("environment `shop`"), "{del}");
    assert_eq!(cat.environment_of("app").map(|e| e.name.as_str()), Some("shop"));
    drop(cat);
    let cat = open(dir.path());
    assert_eq!(cat.environment("shop").unwrap().members, members(&[("db", "db"), ("app", "app")]));
}

#[test]
fn clone_by_time_picks_each_members_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut cat = open(dir.path());
    cat.create_source("db", 1 << 20).unwrap();
    cat.create_source("app", 1 << 20).unwrap();
    cat.env_create("src", &members(&[("db", "db"), ("app", "app")])).unwrap();
    let db1 = ingest(&mut cat, "db", 11);
    let e = cat.env_resolve("src@latest").unwrap_err();
    assert!(matches!(&e, CatalogError::MemberWithoutSnapshot { member, .. } if member == "app"), "{e}");
    let app1 = ingest(&mut cat, "app", 21);
    let db2 = ingest(&mut cat, "db", 12);
    // Between app1 and db2: db@1 and app@1.
    let t = format_time(time_of(&cat, &app1));
    let (env, point) = cat.env_clone(&format!("src@{t}"), "dev").unwrap();
    assert_eq!(point.members, [("app".into(), app1.clone()), ("db".into(), db1.clone())].into());
    assert_eq!(env.origin.as_deref(), Some(format!("src@{t}").as_str()));
    assert_eq!((crc(&cat, "dev.db", 0), crc(&cat, "dev.app", 0)), (Some(11), Some(21)));
    assert_eq!(cat.environment_of("dev.db").unwrap().name, "dev");
    // Latest: db@2.
    let (_, point) = cat.env_clone("src", "dev2").unwrap();
    assert_eq!(point.members["db"], db2);
    // A time before app's first snapshot names app.
    let before = format_time(time_of(&cat, &db1));
    let e = cat.env_clone(&format!("src@{before}"), "dev3").unwrap_err();
    assert!(matches!(&e, CatalogError::MemberWithoutSnapshot { member, .. } if member == "app"), "{e}");
    // NEWENV.MEMBER taken: nothing is created.
    cat.create_source("dev4.db", 4096).unwrap();
    assert!(matches!(cat.env_clone("src", "dev4"), Err(CatalogError::NameTaken(n)) if n == "dev4.db"));
    assert!(cat.volume("dev4.app").is_err() && cat.environment("dev4").is_err());
    assert!(matches!(cat.env_clone("src", "db"), Err(CatalogError::NameTaken(_))));
}

#[test]
fn snapshot_rewind_refresh_delete() {
    let dir = tempfile::tempdir().unwrap();
    let mut cat = open(dir.path());
    cat.create_source("db", 1 << 20).unwrap();
    cat.create_source("app", 1 << 20).unwrap();
    cat.env_create("src", &members(&[("db", "db"), ("app", "app")])).unwrap();
    ingest(&mut cat, "db", 1);
    ingest(&mut cat, "app", 2);
    cat.env_clone("src@latest", "dev").unwrap();
    put(&mut cat, "dev.db", 1, 100, false);
    let s1 = cat.env_snapshot("dev", Some("golden")).unwrap();
    assert_eq!(s1.label, "dev@1");
    assert!(matches!(cat.env_snapshot("dev", Some("golden")), Err(CatalogError::BookmarkTaken { .. })));
    put(&mut cat, "dev.db", 1, 101, false);
    put(&mut cat, "dev.app", 1, 201, false);
    let (point, moves) = cat.env_rewind("dev", "@golden").unwrap();
    assert_eq!(point.label, "dev@1");
    assert_eq!(moves.len(), 2);
    assert_eq!((crc(&cat, "dev.db", 1), crc(&cat, "dev.app", 1)), (Some(100), None));
    assert_eq!(cat.volume("dev.db").unwrap().timeflow, 2);
    // and back to the kept state, by number
    let kept = cat.environment("dev").unwrap().snapshots.len();
    assert_eq!(kept, 1, "rewind keeps member snapshots, not environment snapshots");
    cat.env_rewind("dev", "1").unwrap();
    assert!(matches!(cat.env_rewind("dev", "2020-01-01T00:00:00Z"), Err(CatalogError::BeforeFirstSnapshot { .. })));
    assert!(matches!(cat.env_rewind("dev", "src@1"), Err(CatalogError::BadEnvironment(_))));
    // refresh after a new ingest of db
    ingest(&mut cat, "db", 3);
    let moves = cat.env_refresh("dev").unwrap();
    assert_eq!(moves.iter().map(|m| m.target.to_string()).collect::<Vec<_>>(), ["app@1", "db@2"]);
    assert_eq!(crc(&cat, "dev.db", 0), Some(3));
    // delete: refused while a clone outside depends on a member; keep_volumes keeps them
    cat.clone_volume("dev.db", "outsider").unwrap();
    let e = cat.env_delete("dev", false).unwrap_err().to_string();
    assert!(e.contains("outsider"), "{e}");
    cat.delete("outsider").unwrap();
    assert_eq!(cat.env_delete("dev", false).unwrap(), ["dev.app", "dev.db"]);
    assert!(cat.volume("dev.db").is_err() && cat.environment("dev").is_err());
    assert!(cat.env_delete("src", true).unwrap().is_empty());
    assert!(cat.volume("db").is_ok() && cat.environment_of("db").is_none());
    cat.delete("db").unwrap();
}

#[test]
fn a_failing_member_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let before;
    {
        let mut cat = open(dir.path());
        cat.create_source("db", 1 << 20).unwrap();
        ingest(&mut cat, "db", 1);
        cat.clone_volume("db@1", "a").unwrap();
        cat.clone_volume("db@1", "b").unwrap();
        cat.env_create("mixed", &members(&[("a", "a"), ("src", "db")])).unwrap();
        cat.env_create("ok", &members(&[("a", "b")])).unwrap();
        cat.env_snapshot("ok", None).unwrap();
        before = (state(&cat, "a"), state(&cat, "b"), state(&cat, "db"));
        // a source member: rewind and refresh refused, nothing changes
        assert!(matches!(cat.env_refresh("mixed"), Err(CatalogError::NotAClone(..))));
        assert!(cat.env_snapshot("mixed", Some("1")).is_err(), "a numeric bookmark");
        // a failure inside the transaction, after the first member moved
        let targets: BTreeMap<String, SnapshotId> = [
            ("a".to_string(), SnapshotId { volume: "db".into(), id: 1 }),
            ("src".to_string(), SnapshotId { volume: "db".into(), id: 99 }),
        ]
        .into();
        let mut cat2 = cat;
        cat2.environments.get_mut("mixed").unwrap().members.insert("src".into(), "b".into());
        assert!(cat2.env_move("mixed", &targets, "rewind").is_err());
        cat2.environments.get_mut("mixed").unwrap().members.insert("src".into(), "db".into());
        assert_eq!((state(&cat2, "a"), state(&cat2, "b"), state(&cat2, "db")), before);
        cat2.map_mut().flush_store().unwrap();
    }
    let cat = open(dir.path());
    assert_eq!((state(&cat, "a"), state(&cat, "b"), state(&cat, "db")), before, "after a restart");
    assert_eq!(cat.environment("ok").unwrap().snapshots.len(), 1);
    assert!(cat.environment("mixed").unwrap().snapshots.is_empty());
}
