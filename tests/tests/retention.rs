//! Retention and detach end to end on a real daemon through the CLI: keep-last applied after
//! every snapshot, a bookmarked snapshot survives, each deletion is in the operation log with
//! its rule; a clone detached from its origin reads the same bytes after the origin snapshot
//! and its whole source are deleted, owns all its blocks, and the space comes back once it
//! goes too. (The hourly, daily and weekly rules over a month are the catalog's unit tests:
//! time cannot be injected into a running daemon.)

use forkd_tests::{allocated_bytes, assert_same_image, Daemon, BS};
use serde_json::Value;

const MIB: usize = 1 << 20;
const SIZE: usize = 4 * MIB;

/// A deterministic image: every block non-zero and different, but the last MiB zero.
fn image() -> Vec<u8> {
    let mut img = vec![0u8; SIZE];
    for (i, b) in img[..SIZE - MIB].chunks_mut(BS).enumerate() {
        for (j, x) in b.iter_mut().enumerate() {
            *x = u8::try_from((i * 31 + j * 7) % 251).expect("below 256") + 1;
        }
    }
    img
}

fn snapshot_ids(d: &Daemon, volume: &str) -> Vec<u64> {
    let show = d.cli_json(&["show", volume]);
    let snaps = show["snapshots"].as_array().unwrap_or_else(|| panic!("no snapshots: {show}"));
    snaps.iter().map(|s| s["id"].as_u64().expect("id")).collect()
}

fn dump(d: &Daemon, reference: &str, file: &std::path::Path) -> Vec<u8> {
    d.cli_ok(&["dump", reference, file.to_str().expect("utf-8 path")]);
    std::fs::read(file).expect("read dump")
}

fn stderr_of(d: &Daemon, args: &[&str]) -> String {
    let out = d.cli(args);
    assert!(!out.status.success(), "forkd {} should fail", args.join(" "));
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

fn retention_log(d: &Daemon) -> Vec<Value> {
    let log = d.cli_json(&["log"]);
    let entries = log["entries"].as_array().expect("entries").clone();
    entries.into_iter().filter(|e| e["who"] == "retention").collect()
}

#[test]
fn keep_last_prunes_after_every_snapshot_and_bookmarks_survive() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(&tmp.path().join("data"), &tmp.path().join("daemon.log"));
    d.cli_ok(&["source", "create", "prod", "--size", "4M"]);
    d.cli_ok(&["snapshot", "prod"]);
    let err = stderr_of(&d, &["retention", "set", "prod"]);
    assert!(err.contains("give at least one of --keep-last"), "{err}");
    let v = d.cli_json(&["retention", "set", "prod", "--keep-last", "2"]);
    assert_eq!(v["retention"], serde_json::json!({"keep_last": 2}), "{v}");
    d.cli_ok(&["bookmark", "prod@1", "golden"]);
    for _ in 0..3 {
        d.cli_ok(&["snapshot", "prod"]);
    }
    assert_eq!(snapshot_ids(&d, "prod"), vec![1, 3, 4], "keep-last 2 plus the bookmarked one");
    let pruned = retention_log(&d);
    assert_eq!(pruned.len(), 1, "{pruned:?}");
    assert_eq!((pruned[0]["what"].as_str(), pruned[0]["target"].as_str()), (Some("prune"), Some("prod@2")));
    let detail = pruned[0]["detail"].as_str().unwrap_or_default();
    assert_eq!(detail, "kept by none of keep-last 2");
    // Nothing more to do now; a stricter rule applied by hand lists what went and why.
    assert_eq!(d.cli_json(&["prune", "prod"])["pruned"], serde_json::json!([]));
    d.cli_ok(&["retention", "set", "prod", "--keep-last", "1", "--keep-daily", "1"]);
    let answer = d.cli_json(&["prune", "prod"]);
    assert_eq!(answer["pruned"][0]["snapshot"], "prod@3", "{answer}");
    assert_eq!(answer["pruned"][0]["rule"], "kept by none of keep-last 1, keep-daily 1");
    assert_eq!(snapshot_ids(&d, "prod"), vec![1, 4]);
    // keep-last 0: even the newest goes; the bookmark still stays.
    d.cli_ok(&["retention", "set", "prod", "--keep-last", "0"]);
    d.cli_ok(&["snapshot", "prod"]);
    assert_eq!(snapshot_ids(&d, "prod"), vec![1]);
    let v = d.cli_json(&["retention", "set", "prod", "--none"]);
    assert!(v.get("retention").is_none(), "{v}");
    d.cli_ok(&["snapshot", "prod"]);
    assert_eq!(snapshot_ids(&d, "prod"), vec![1, 6], "no rules: nothing pruned");
}

#[test]
fn detach_then_delete_the_origin_and_everything() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let d = Daemon::start(&root.join("data"), &root.join("daemon.log"));
    let img_path = root.join("img.raw");
    std::fs::write(&img_path, image()).expect("write image");
    d.cli_ok(&["source", "create", "prod", "--size", "4M"]);
    d.cli_ok(&["ingest", "prod", "--from", img_path.to_str().expect("utf-8")]);
    d.cli_ok(&["clone", "prod@1", "dev"]);
    d.api().write("dev", 0, &[0xab; 2 * BS]);
    let before = dump(&d, "dev", &root.join("before.raw"));
    let err = stderr_of(&d, &["delete", "prod@1"]);
    assert!(err.contains("clones depend on it: dev"), "{err}");
    let v = d.cli_json(&["detach", "dev"]);
    assert_eq!((v["origin"].clone(), v["detached_from"].clone()), (Value::Null, Value::from("prod@1")), "{v}");
    let err = stderr_of(&d, &["refresh", "dev"]);
    assert!(err.ends_with("error: `dev` was detached from prod@1: it has no origin to refresh from"), "{err}");
    d.cli_ok(&["delete", "prod@1"]);
    d.cli_ok(&["delete", "prod"]);
    d.wait_for_garbage_collection();
    let after = dump(&d, "dev", &root.join("after.raw"));
    assert_same_image("dev after its origin went", &after, &before);
    // It now holds every one of its blocks alone.
    let show = d.cli_json(&["show", "dev"]);
    assert_eq!(show["origin"], Value::Null);
    assert_eq!(show["detached_from"], "prod@1");
    let allocated = show["allocated_bytes"].as_u64().expect("allocated_bytes");
    assert_eq!(show["unique_bytes"].as_u64(), Some(allocated), "{show}");
    assert_eq!(allocated, (SIZE - MIB) as u64, "3 MiB of data, 2 blocks of it overwritten");
    let extents = root.join("data").join("extents.0");
    assert!(allocated_bytes(&extents) >= allocated, "the data is on disk");
    d.cli_ok(&["delete", "dev"]);
    assert!(d.cli_json(&["list"])["volumes"].as_array().is_some_and(Vec::is_empty));
    d.wait_for_garbage_collection();
    let left = allocated_bytes(&extents);
    assert!(left <= 64 * 1024, "{left} bytes still allocated in extents.0 after deleting everything");
}
