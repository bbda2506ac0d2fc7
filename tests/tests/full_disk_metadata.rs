//! A full disk never breaks the metadata store (issue 10, item 5), end to end: the data
//! directory on a 256 MiB loop-mounted ext4, filled through NBD (`nbdcopy`) with random data. Then
//! one more write, a snapshot, a clone, an ingest and a new source, which must each fail cleanly
//! ("No space left on device", nothing half-done), a stop and a restart on the full disk, and a recovery by
//! trimming and deleting through the API alone, after which writes, snapshots, a stop and a
//! restart work and every byte written before is intact. Needs root (to mount); fails with a
//! clear message otherwise (CI runs as root).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use forkd_tests::{run_bounded, Daemon, LoopFs};

fn random(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::Rng::fill(&mut rand::thread_rng(), &mut data[..]);
    data
}

/// Fill `vol` through NBD with `nbdcopy` of an image that starts with `kept` and goes on with
/// random bytes to 1 GiB, until the daemon says the disk is full (NBD ENOSPC).
fn fill_through_nbd(d: &Daemon, root: &Path, vol: &str, kept: &[u8]) {
    let img = root.join("img");
    let mut data = kept.to_vec();
    data.extend(random((1 << 30) - kept.len()));
    std::fs::write(&img, data).expect("write the image");
    let out = run_bounded(Command::new("nbdcopy").arg(&img).arg(d.nbd_uri(vol)), Duration::from_secs(300));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "1 GiB fit on a 256 MiB filesystem");
    assert!(stderr.contains("No space left on device"), "nbdcopy: {stderr}");
}

/// HTTP writes of 4 MiB from `offset` until the daemon refuses one with 507. Space can come
/// back after nbdcopy's failure (the filesystem releases what failed writes had reserved), and
/// the daemon rightly takes writes while there is room for them and its reserve: so the test
/// writes on until the disk is full again, and any answer but 200 or 507 fails it. A 4 MiB
/// write is refused when it would not leave the metadata headroom free, which can be while
/// smaller ones still fit: so it goes on with 256 KiB, then 4 KiB writes until one of those is
/// refused too.
fn write_refused(d: &Daemon, vol: &str, offset: u64) {
    for size in [4 << 20, 256 << 10, 4096] {
        if write_until_refused(d, vol, offset, size) {
            continue;
        }
        panic!("64 more writes of {size} bytes fit on a full 256 MiB filesystem");
    }
}

/// Writes of `size` bytes from `offset` on until one is refused with 507: true then.
fn write_until_refused(d: &Daemon, vol: &str, offset: u64, size: usize) -> bool {
    for i in 0..64u64 {
        let at = offset + i * size as u64;
        let r = d.api().put_bytes(&format!("/v1/volumes/{vol}/data?offset={at}"), &random(size));
        if r.status == 507 {
            assert!(r.text().contains("No space left on device"), "{}", r.text());
            return true;
        }
        assert_eq!(r.status, 200, "a write to a nearly full disk: {}", r.text());
    }
    false
}

/// Run a CLI command that must fail because the disk is full.
fn refused(d: &Daemon, args: &[&str]) {
    let out = d.cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "forkd {} succeeded on a full disk", args.join(" "));
    assert!(stderr.contains("No space left on device"), "forkd {}: {stderr}", args.join(" "));
}

fn snapshot_count(d: &Daemon, vol: &str) -> usize {
    d.api().get_json(&format!("/v1/volumes/{vol}"))["snapshots"].as_array().map_or(0, Vec::len)
}

/// No layer below the catalog failed: sled never saw ENOSPC, and every flush succeeded.
fn assert_log_clean(d: &Daemon) {
    let log = d.log();
    for bad in ["final flush failed", "metadata store", "periodic flush failed"] {
        assert!(!log.contains(bad), "the daemon log shows `{bad}`:\n{}", forkd_tests::tail(&log, 40));
    }
}

#[test]
fn a_full_disk_never_breaks_the_metadata_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = LoopFs::mount(dir.path(), 256);
    let mut d = Daemon::start(&fs.mnt.join("data"), &dir.path().join("daemon.log"));
    d.cli_ok(&["source", "create", "src", "--size", "1G"]);
    d.cli_ok(&["clone", "src", "c"]);
    d.cli_ok(&["clone", "src", "spare"]);
    d.cli_ok(&["source", "create", "prod", "--size", "8M"]);
    let kept = random(8 << 20);
    d.api().write("c", 0, &kept);
    d.cli_ok(&["snapshot", "c"]);
    d.api().write("spare", 0, &random(32 << 20));
    fill_through_nbd(&d, dir.path(), "c", &kept);

    // At the full disk: one more write, a snapshot and a clone each fail cleanly.
    write_refused(&d, "c", 1 << 29);
    refused(&d, &["snapshot", "c"]);
    refused(&d, &["clone", "c@1", "c3"]);
    assert_eq!(snapshot_count(&d, "c"), 1, "a refused snapshot left nothing behind");
    assert_eq!(d.api().get("/v1/volumes/c3").status, 404, "a refused clone left nothing behind");
    let img = dir.path().join("prod.img");
    std::fs::write(&img, random(8 << 20)).expect("write the ingest image");
    let img = img.to_str().expect("utf-8");
    refused(&d, &["ingest", "prod", "--from", img]);
    assert_eq!(snapshot_count(&d, "prod"), 0, "a refused ingest left nothing behind");
    refused(&d, &["source", "create", "more", "--size", "8M"]);

    // A stop flushes cleanly, and the daemon restarts on the full disk.
    assert!(d.stop().success(), "the daemon did not stop cleanly:\n{}", d.log());
    d.restart();
    assert_eq!(d.api().read("c@1", 0, kept.len() as u64), kept, "the snapshot reads back after the restart");
    write_refused(&d, "c", 1 << 29);

    // Recover through the API alone: trim, delete, then write and snapshot again.
    let trim = format!("/v1/volumes/c/zero?offset={}&length={}", 8 << 20, (1 << 30) - (8 << 20));
    let r = d.api().request("POST", &trim, None).expect("trim");
    assert!(r.ok(), "a trim on a full disk: HTTP {} {}", r.status, r.text());
    d.cli_ok(&["delete", "spare"]);
    d.api().write("c", 8 << 20, &random(4 << 20));
    d.cli_ok(&["snapshot", "c"]);
    d.cli_ok(&["clone", "c@1", "c3"]);
    assert_eq!(snapshot_count(&d, "c"), 2);
    d.cli_ok(&["ingest", "prod", "--from", img]);
    assert_eq!(snapshot_count(&d, "prod"), 1);
    assert_log_clean(&d);
    assert!(d.stop().success(), "the daemon did not stop cleanly:\n{}", d.log());
    d.restart();
    assert_eq!(d.api().read("c3", 0, kept.len() as u64), kept, "every byte written before is intact");
    assert_eq!(d.api().read("c@2", 0, kept.len() as u64), kept);
    assert_log_clean(&d);
    assert!(d.stop().success(), "the daemon did not stop cleanly:\n{}", d.log());
}
