//! The data directory's `format` file (issue 10, item 6): a directory written before formats
//! were recorded opens with everything in it; a newer format or an unknown engine is refused
//! with a message saying so; a conversion of `meta/` interrupted at any step is finished (or
//! its unfinished copy thrown away) at the next start, never half-applied. Directories of
//! formats 1 and 2, whose volume records hold their snapshots, open with every snapshot and are
//! upgraded to format 3 (snapshots under their own keys).

use std::path::Path;

use forkd::store::{MetaEngine, Store};

const MIB: usize = 1 << 20;

/// A store with a source, a clone holding 1 MiB of 0x5a at 0, and a snapshot of the clone.
fn populate(dir: &Path) {
    let store = Store::open(dir).expect("open");
    store.op(|c| c.create_source("src", 16 << 20)).expect("source");
    store.op(|c| c.clone_volume("src", "c")).expect("clone");
    store.write("c", 0, &vec![0x5a; MIB]).expect("write");
    store.op(|c| c.snapshot("c", None)).expect("snapshot");
}

fn assert_intact(store: &Store) {
    let mut buf = vec![0u8; MIB];
    store.read("c@1", 0, &mut buf).expect("read the snapshot");
    assert!(buf.iter().all(|&b| b == 0x5a), "the snapshot's data");
    store.read("c", 0, &mut buf).expect("read the clone");
    assert!(buf.iter().all(|&b| b == 0x5a), "the clone's data");
    assert_eq!(store.catalog().volumes().len(), 2, "source and clone");
}

fn format_text(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("format")).expect("the format file")
}

/// Put every volume's snapshots back into its record (`snapshots` array) and remove their own
/// keys (`cS` + name + `\0` + id), as forkd stored them before format 3.
fn inline_snapshots(dir: &Path, engine: MetaEngine) {
    let kv = metakv::open(engine, &dir.join("meta")).expect("open meta");
    let mut batch = metakv::Batch::default();
    for (key, record) in metakv::collect_prefix(kv.as_ref(), b"cV").expect("scan") {
        let mut prefix = b"cS".to_vec();
        prefix.extend_from_slice(&key[2..]);
        prefix.push(0);
        let snaps = metakv::collect_prefix(kv.as_ref(), &prefix).expect("scan");
        let mut record: serde_json::Value = serde_json::from_slice(&record).expect("record");
        assert!(record.get("snapshots").is_none(), "format 3 records hold no snapshots");
        let list = snaps.iter().map(|(_, v)| serde_json::from_slice(v).expect("snapshot")).collect();
        record["snapshots"] = serde_json::Value::Array(list);
        batch.put(&key, &serde_json::to_vec(&record).expect("json"));
        for (k, _) in &snaps {
            batch.delete(k);
        }
    }
    kv.apply(&batch).expect("apply");
    kv.commit().expect("commit");
}

/// Whether any volume record of `dir` still holds its snapshots.
fn records_hold_snapshots(dir: &Path) -> bool {
    let kv = metakv::open(MetaEngine::DEFAULT, &dir.join("meta")).expect("open meta");
    let records = metakv::collect_prefix(kv.as_ref(), b"cV").expect("scan");
    records
        .iter()
        .any(|(_, v)| serde_json::from_slice::<serde_json::Value>(v).expect("record").get("snapshots").is_some())
}

/// `open` again while sled's lock on `meta/` is still held: sled lets go of it on a
/// background thread after its last handle is dropped, so opening the same directory again at
/// once (as these tests do, in one process) can find it still locked for a moment.
fn when_unlocked<T, E: std::fmt::Display>(open: impl Fn() -> Result<T, E>) -> Result<T, E> {
    let mut tries = 0;
    loop {
        match open() {
            Err(e) if tries < 100 && e.to_string().contains("could not acquire lock") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Make `dir` look exactly as forkd wrote it before formats were recorded: sled under
/// `meta/`, no `format` file, the flush generation in sled's default tree.
fn make_format_1(dir: &Path, engine: MetaEngine) {
    assert_eq!(engine, MetaEngine::Sled, "format 1 was sled only");
    std::fs::remove_file(dir.join("format")).expect("remove format");
    let db = when_unlocked(|| sled::open(dir.join("meta"))).expect("open sled");
    let tree = db.open_tree("forkd").expect("tree");
    let g = tree.remove(b"m:flush_generation").expect("remove").expect("a generation was stamped");
    db.insert(b"forkd.flush_generation", g).expect("insert");
    db.flush().expect("flush");
}

#[test]
fn a_format_1_directory_opens_with_everything_in_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("data");
    {
        let store = Store::open_with(&d, Some(MetaEngine::Sled)).expect("open");
        drop(store);
    }
    populate(&d);
    inline_snapshots(&d, MetaEngine::Sled);
    make_format_1(&d, MetaEngine::Sled);
    let store = when_unlocked(|| Store::open(&d)).expect("a format-1 directory opens");
    assert_intact(&store);
    assert_eq!(store.meta_engine(), MetaEngine::DEFAULT, "converted to the default engine on first start");
    drop(store);
    let text = format_text(&d);
    assert!(text.contains("format 3") && text.contains(&format!("engine {}", MetaEngine::DEFAULT)), "{text}");
    for leftover in ["meta.new", "meta.old", "converting"] {
        assert!(!d.join(leftover).exists(), "{leftover} is gone after the conversion");
    }
    // The generation moved with it: a restart still checks against `flushed`.
    let store = Store::open(&d).expect("reopen");
    assert_intact(&store);
}

#[test]
fn a_format_2_directory_keeps_its_snapshots_and_moves_them_on_first_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("data");
    populate(&d);
    inline_snapshots(&d, MetaEngine::DEFAULT);
    std::fs::write(d.join("format"), format!("forkd data directory\nformat 2\nengine {}\n", MetaEngine::DEFAULT))
        .expect("write");
    let store = Store::open(&d).expect("a format-2 directory opens");
    assert_intact(&store);
    assert!(format_text(&d).contains("format 3"), "upgraded, so an older forkd refuses it");
    store.op(|c| c.snapshot("c", None)).expect("snapshot");
    store.op(|c| c.snapshot("src", None)).expect("snapshot");
    store.flush().expect("flush");
    drop(store);
    assert!(!records_hold_snapshots(&d), "the first commits moved them to their own keys");
    let store = Store::open(&d).expect("reopen");
    assert_intact(&store);
    let snaps = |v: &str| store.catalog().volume(v).map(|v| v.snapshots.len()).expect("volume");
    assert_eq!((snaps("src"), snaps("c")), (2, 2));
}

#[test]
fn a_newer_format_or_an_unknown_engine_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("data");
    populate(&d);
    std::fs::write(d.join("format"), "forkd data directory\nformat 9\nengine sled\n").expect("write");
    let e = Store::open(&d).expect_err("format 9 is refused").to_string();
    assert!(e.contains("newer forkd") && e.contains("format 9") && e.contains("upgrade"), "{e}");
    std::fs::write(d.join("format"), "forkd data directory\nformat 2\nengine lmdb\n").expect("write");
    let e = Store::open(&d).expect_err("an unknown engine is refused").to_string();
    assert!(e.contains("`lmdb`") && e.contains("unknown"), "{e}");
    std::fs::write(d.join("format"), "garbage\n").expect("write");
    let e = Store::open(&d).expect_err("a damaged format file is refused").to_string();
    assert!(e.contains("damaged"), "{e}");
    std::fs::write(d.join("format"), format!("forkd data directory\nformat 2\nengine {}\n", MetaEngine::DEFAULT))
        .expect("write");
    assert_intact(&Store::open(&d).expect("opens again once the file is right"));
}

fn copy_dir(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().expect("cp");
    assert!(status.success());
}

#[test]
fn an_unfinished_copy_is_thrown_away_and_the_old_metadata_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("data");
    populate(&d);
    // A conversion cut before its copy was complete: meta.new exists, `converting` does not.
    std::fs::create_dir(d.join("meta.new")).expect("mkdir");
    std::fs::write(d.join("meta.new").join("db"), b"half a copy").expect("write");
    let store = Store::open(&d).expect("open");
    assert_intact(&store);
    drop(store);
    assert!(!d.join("meta.new").exists(), "the unfinished copy is removed");
}

/// A step of the switch as a crash leaves it, and its name.
type Step = (&'static str, fn(&Path));

#[test]
fn a_switch_cut_at_any_step_is_finished_at_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base");
    populate(&base);
    let engine = MetaEngine::DEFAULT;
    // The steps of the switch, each as a crash would leave the directory (the complete,
    // durable copy is `meta.new/`, and `converting` names its engine).
    let steps: [Step; 3] = [
        ("copy complete, nothing switched", |_| {}),
        ("meta/ moved to meta.old/", |d| std::fs::rename(d.join("meta"), d.join("meta.old")).expect("rename")),
        ("meta.new/ moved to meta/", |d| {
            std::fs::rename(d.join("meta"), d.join("meta.old")).expect("rename");
            std::fs::rename(d.join("meta.new"), d.join("meta")).expect("rename");
        }),
    ];
    for (i, (what, cut)) in steps.iter().enumerate() {
        let d = dir.path().join(format!("cut{i}"));
        copy_dir(&base, &d);
        copy_dir(&d.join("meta"), &d.join("meta.new"));
        std::fs::write(d.join("converting"), format!("{engine}\n")).expect("marker");
        cut(&d);
        let store = Store::open(&d).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_intact(&store);
        drop(store);
        for leftover in ["meta.new", "meta.old", "converting"] {
            assert!(!d.join(leftover).exists(), "{what}: {leftover} is gone");
        }
        assert!(format_text(&d).contains(&format!("engine {engine}")), "{what}");
    }
}

#[test]
fn a_lost_format_file_beside_a_non_sled_store_is_refused_not_emptied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("data");
    drop(Store::open_with(&d, Some(MetaEngine::Redb)).expect("open"));
    populate(&d);
    let saved = format_text(&d);
    std::fs::remove_file(d.join("format")).expect("remove format");
    let e = Store::open(&d).expect_err("a redb meta/ without `format` is refused").to_string();
    assert!(e.contains("`format` file is missing") && e.contains("meta.redb"), "{e}");
    std::fs::write(d.join("format"), saved).expect("put it back");
    assert_intact(&Store::open(&d).expect("opens with the file back"));
}
