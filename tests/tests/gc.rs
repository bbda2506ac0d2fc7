//! Deletes collect their garbage in the background (issue 13), on a real daemon whose
//! collector takes one tree node per step, 3 ms apart (`--gc-step-nodes 1 --gc-step-pause
//! 3ms`), so a collection of a thousand nodes lasts seconds whatever the machine: the
//! delete answers what it gives back before its trees are taken apart; a read, a write and a
//! flush of another clone complete while the collection is still in progress (seen in
//! `forkd_gc_queued_nodes` before and after them, never in durations); `forkd check` on a
//! daemon killed mid-collection reports the queue and no problem; the restarted daemon
//! finishes it, and the space comes back with nothing leaked.

use std::path::Path;
use std::process::Command;

use forkd_tests::{allocated_bytes, metric_value, Daemon};
use serde_json::Value;

const M: u64 = 1 << 20;
/// What the deleted clone holds alone: 1,024 leaves, so a thousand one-node steps.
const BIG: u64 = 256 * M;

fn queued(d: &Daemon) -> f64 {
    metric_value(&d.metrics(), "forkd_gc_queued_nodes")
}

/// `forkd check --json` of the stopped daemon's data directory.
fn check(d: &Daemon, data: &Path) -> Value {
    let out = Command::new(d.bin()).args(["check", "--json", "--data-dir"]).arg(data).output().expect("forkd check");
    assert!(out.status.success(), "forkd check: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("check report")
}

/// A source `prod` of 256 MiB, its first MiB ingested; clones `big` (256 MiB of its own data)
/// and `other` (one block of its own).
fn setup(d: &Daemon, root: &Path) {
    let img = root.join("prod.img");
    std::fs::write(&img, [7u8; 4096].repeat(256)).expect("image");
    std::fs::File::options().write(true).open(&img).and_then(|f| f.set_len(BIG)).expect("size image");
    d.cli_ok(&["source", "create", "prod", "--size", "256M"]);
    d.cli_ok(&["ingest", "prod", "--from", img.to_str().expect("utf-8")]);
    d.cli_ok(&["clone", "prod@1", "big"]);
    d.cli_ok(&["clone", "prod@1", "other"]);
    for i in 0..BIG / (32 * M) {
        let chunk: Vec<u8> = (0..32 * M).map(|b| (b / 4096 + i * 8192).to_le_bytes()[0] | 1).collect();
        d.api().write("big", i * 32 * M, &chunk);
    }
    d.api().write("other", 0, &[0x5a; 4096]);
    d.api().post_json_ok("/v1/volumes/big/flush", &serde_json::json!({}));
}

#[test]
fn a_large_delete_is_collected_in_the_background_while_other_clones_are_read_and_written() {
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let mut d = Daemon::start_with(root.path(), "127.0.0.1", &["--gc-step-nodes", "1", "--gc-step-pause", "3ms"]);
    setup(&d, root.path());
    let extents = data.join("extents.0");
    let before = allocated_bytes(&extents);
    let unique = d.cli_json(&["show", "big"])["unique_bytes"].as_u64().expect("unique_bytes");
    assert_eq!(unique, BIG, "big holds its data alone");

    // The delete answers the bytes it gives back: what big held alone.
    let answer = d.api().delete("/v1/volumes/big");
    assert!(answer.ok(), "delete: {} {}", answer.status, answer.text());
    assert_eq!(answer.json()["freed_bytes"].as_u64(), Some(BIG), "{}", answer.text());
    assert!(queued(&d) > 0.0, "the delete answered before its garbage was collected");

    // A read, a write and a flush of another clone complete while the collection goes on.
    assert!(d.api().read("other", 0, 8192) == [[0x5a; 4096], [7; 4096]].concat(), "other before its write");
    d.api().write("other", 4096, &[0xa5; 4096]);
    assert!(d.api().read("other", 4096, 4096) == [0xa5; 4096], "other after its write");
    d.api().post_json_ok("/v1/volumes/other/flush", &serde_json::json!({}));
    assert!(queued(&d) > 0.0, "the collection ended before the read, the write and the flush did");

    // Killed mid-collection: the queue is on disk, and `forkd check` calls it no problem.
    d.kill9();
    let report = check(&d, &data);
    assert_eq!(report["problems"], serde_json::json!([]), "{report:#}");
    assert!(report["garbage_nodes"].as_u64().is_some_and(|n| n > 0), "{report:#}");

    // The restarted daemon finishes it; the space comes back, nothing leaks.
    d.restart();
    d.wait_for_garbage_collection();
    let after = allocated_bytes(&extents);
    assert!(before - after >= BIG - 8 * M, "extents.0 gave back {} of {BIG} bytes", before - after);
    assert!(d.api().read("other", 0, 8192) == [[0x5a; 4096], [0xa5; 4096]].concat(), "other after the restart");
    let listed = d.cli_json(&["list"]);
    assert!(listed["volumes"].as_array().is_some_and(|v| v.len() == 2), "{listed}");
    assert!(metric_value(&d.metrics(), "forkd_gc_freed_nodes_total") > 0.0);
    d.stop();
    let report = check(&d, &data);
    assert_eq!((report["problems"].clone(), report["garbage_nodes"].as_u64()), (serde_json::json!([]), Some(0)));
    // prod's first MiB, shared by other, and other's two blocks.
    assert_eq!(report["referenced_slots"].as_u64(), Some(M / 4096 + 2), "{report:#}");
}
