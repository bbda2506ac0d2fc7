//! Power-cut tests (issue 10): a real `forkd serve` whose data directory is on the
//! `forkd-powercut` filesystem, which forgets at a simulated cut every write that was not made
//! durable by `fsync`/`fdatasync` (and every create or rename whose directory was not fsynced).
//! After the cut the daemon is killed, and a new one starts on what survived: everything
//! acknowledged as flushed must be there, byte for byte.
//!
//! FUSE is required: without `/dev/fuse` (or root) these tests fail, saying so.

use std::fs;
use std::path::{Path, PathBuf};

use forkd_powercut::{fuse_available, Directories, PowerCutFs};
use forkd_tests::{assert_same_image, Daemon};
use rand::{RngCore, SeedableRng};
use serde_json::json;

/// A data directory on a power-cut filesystem, with the daemon log beside it (off the mount).
struct Rig {
    root: tempfile::TempDir,
    fs: PowerCutFs,
}

impl Rig {
    fn new() -> Rig {
        Rig::with(Directories::Strict)
    }

    fn with(directories: Directories) -> Rig {
        if let Err(why) = fuse_available() {
            panic!("FUSE is required for the power-cut tests: {why}");
        }
        let root = tempfile::tempdir().expect("tempdir");
        let mnt = root.path().join("mnt");
        fs::create_dir(&mnt).expect("mkdir");
        let fs = PowerCutFs::mount_with(&mnt, None, directories).expect("mount the power-cut filesystem");
        // The data directory exists, durably, before the daemon starts (as one made at
        // installation would): what the daemon creates in it is the daemon's to make durable.
        fs::create_dir(mnt.join("data")).expect("mkdir data");
        fs::File::open(&mnt).and_then(|d| d.sync_all()).expect("fsync the mount's root");
        Rig { root, fs }
    }

    fn data_dir(&self) -> PathBuf {
        self.fs.mountpoint().join("data")
    }

    fn log(&self) -> PathBuf {
        self.root.path().join("daemon.log")
    }

    /// Cut the power under `daemon`, kill it, and return the directory holding what survived
    /// (the data directory is `survivors/data`) and what the daemon had fsynced (a report).
    fn cut(&mut self, daemon: &mut Daemon) -> (PathBuf, String) {
        self.fs.cut();
        let report: Vec<String> = self.fs.sync_report().iter().map(ToString::to_string).collect();
        daemon.kill9();
        self.fs.unmount().expect("unmount");
        let out = self.root.path().join("survivors");
        fs::create_dir(&out).expect("mkdir");
        self.fs.write_survivors(&out).expect("write the survivors");
        (out, report.join("\n"))
    }
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Start a daemon on `data` and create source `s` (4 MiB) and its clone `c`.
fn daemon_with_clone(data: &Path, log: &Path) -> Daemon {
    let d = Daemon::start(data, log);
    d.api().post_json_ok("/v1/sources", &json!({"name": "s", "size": "4M"}));
    d.api().post_json_ok("/v1/clones", &json!({"from": "s", "name": "c"}));
    d
}

/// forkd runs on the harness: it starts, writes, flushes, reads back and restarts cleanly on
/// the mount (io_uring, sled, `fallocate` of the reserve and punched extents all work there).
#[test]
fn forkd_serves_from_the_power_cut_filesystem() {
    let rig = Rig::new();
    let mut d = daemon_with_clone(&rig.data_dir(), &rig.log());
    let data = random(256 << 10, 1);
    d.api().write("c", 1 << 20, &data);
    d.api().write("c", 1 << 20, &data[..64 << 10]); // an overwrite frees slots, punched at the flush
    d.api().post_json_ok("/v1/volumes/c/flush", &json!({}));
    assert_same_image("read back on the mount", &d.api().read("c", 1 << 20, 256 << 10), &data);
    d.stop();
    d.restart();
    assert_same_image("after a clean restart on the mount", &d.api().read("c", 1 << 20, 256 << 10), &data);
    d.stop();
}

/// Write 256 KiB to clone `c` over HTTP and flush; returns the bytes (at 1 MiB).
fn write_and_flush(d: &Daemon, seed: u64) -> Vec<u8> {
    let data = random(256 << 10, seed);
    d.api().write("c", 1 << 20, &data);
    d.api().post_json_ok("/v1/volumes/c/flush", &json!({}));
    data
}

/// Start a daemon on the survivors in `out` and check that clone `c` holds `data` at 1 MiB.
fn check_survivors(rig: &Rig, out: &Path, report: &str, data: &[u8]) {
    let mut after = Daemon::start(&out.join("data"), &rig.log());
    let volumes = after.api().get_json("/v1/volumes");
    let c = volumes["volumes"].as_array().and_then(|v| v.iter().find(|v| v["name"] == "c"));
    assert!(
        c.is_some(),
        "clone `c`, created and flushed, is gone after the cut: {volumes}\nwhat the daemon had fsynced:\n{report}"
    );
    assert_same_image("the flushed write after the cut", &after.api().read("c", 1 << 20, 256 << 10), data);
    after.stop();
}

/// The harness carries a real daemon's durable state across a cut: after a clean stop (whose
/// final flush closes sled, which fsyncs its log then), everything is there. Directories are
/// journaled here: see the next tests for why.
#[test]
fn a_clean_stop_survives_a_power_cut() {
    let mut rig = Rig::with(Directories::Journaled);
    let mut d = daemon_with_clone(&rig.data_dir(), &rig.log());
    let data = write_and_flush(&d, 2);
    d.stop();
    let (out, report) = rig.cut(&mut d);
    check_survivors(&rig, &out, &report, &data);
}

/// The first power-cut case: an HTTP write acknowledged, then a flush acknowledged,
/// then the power is cut. A daemon restarted on what survived must serve the flushed bytes.
#[test]
#[ignore = "issue 10: fails on today's store: a flush fsyncs extents.0 but neither sled's meta/db \
            (sled 0.34 syncs it with sync_file_range) nor the data directory and meta/ after \
            creating their entries; after the cut the data directory is empty"]
fn a_flushed_write_survives_a_power_cut() {
    let mut rig = Rig::new();
    let mut d = daemon_with_clone(&rig.data_dir(), &rig.log());
    let data = write_and_flush(&d, 3);
    let (out, report) = rig.cut(&mut d);
    check_survivors(&rig, &out, &report, &data);
}

/// The same on a journaling filesystem (directory changes durable at once), which isolates the
/// metadata store: only file contents that were not fsynced are lost.
#[test]
#[ignore = "issue 10: fails on sled 0.34: Store::flush's db.flush() never fsyncs meta/db \
            (sync_file_range only; 0 fsyncs of meta/db after an acknowledged flush), so the \
            catalog comes back empty and the daemon starts silently without clone `c`"]
fn a_flushed_write_survives_a_power_cut_on_a_journaling_filesystem() {
    let mut rig = Rig::with(Directories::Journaled);
    let mut d = daemon_with_clone(&rig.data_dir(), &rig.log());
    let data = write_and_flush(&d, 4);
    let (out, report) = rig.cut(&mut d);
    check_survivors(&rig, &out, &report, &data);
}
