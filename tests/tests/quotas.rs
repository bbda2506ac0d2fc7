//! Quotas on clones' unique bytes and the pool's low-space threshold, with a real daemon and
//! real clients: qemu-io over NBD and qemu-io's libiscsi driver over iSCSI fail past a clone's
//! quota with the documented errors (ENOSPC; DATA PROTECT / SPACE ALLOCATION FAILED WRITE
//! PROTECT, which qemu reports as ENOSPC), while another clone keeps writing; a trim brings the
//! clone back under; a quota below current use is allowed and only adding fails; the limit
//! holds across a restart; the gauges and `show` report it; a source's `default_quota` reaches
//! new clones. The low-space threshold refuses new clones and ingests on a real, nearly full
//! filesystem (a loop-mounted ext4: needs root, as CI runs) and lets them again once a delete
//! frees space.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use forkd_tests::{metric_value, run_bounded, Daemon, LoopFs};
use serde_json::Value;

const M: u64 = 1 << 20;
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

fn qemu_io(url: &str, cmd: &str) -> Output {
    run_bounded(Command::new("qemu-io").args(["-f", "raw", "-c", cmd, url]), TOOL_TIMEOUT)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// qemu-io's `cmd` on `url` must succeed.
#[track_caller]
fn io_ok(url: &str, cmd: &str) {
    let out = qemu_io(url, cmd);
    let t = text(&out);
    assert!(out.status.success() && !t.contains("failed"), "qemu-io {cmd} on {url}:\n{t}");
}

/// qemu-io's `cmd` on `url` must fail with "No space left on device".
#[track_caller]
fn io_enospc(url: &str, cmd: &str) {
    let t = text(&qemu_io(url, cmd));
    assert!(t.contains("failed") && t.contains("No space left on device"), "qemu-io {cmd} on {url}:\n{t}");
}

fn show(d: &Daemon, name: &str) -> Value {
    d.cli_json(&["show", name])
}

fn unique(d: &Daemon, name: &str) -> u64 {
    show(d, name)["unique_bytes"].as_u64().expect("unique_bytes")
}

/// A 64 MiB source `prod` of bytes 0x07, ingested.
fn source(d: &Daemon, root: &Path) {
    let img = root.join("prod.img");
    std::fs::write(&img, vec![7u8; 64 << 20]).expect("image");
    d.cli_ok(&["source", "create", "prod", "--size", "64M"]);
    d.cli_ok(&["ingest", "prod", "--from", img.to_str().expect("utf-8")]);
}

#[test]
fn writes_past_a_quota_fail_for_that_clone_alone_and_trims_bring_it_back() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut d = Daemon::start_in(root.path());
    source(&d, root.path());
    let made = d.cli_json(&["clone", "prod@1", "dev", "--quota", "4M"]);
    assert_eq!(made["quota_bytes"], 4 * M, "{made}");
    d.cli_ok(&["clone", "prod@1", "other"]);
    let dev = d.nbd_uri("dev");

    // 3 MiB of new data fits; 2 MiB more does not, and nothing of it lands.
    io_ok(&dev, "write -P 0x11 0 3M");
    assert_eq!(unique(&d, "dev"), 3 * M);
    io_enospc(&dev, "write -P 0x22 8M 2M");
    io_ok(&dev, "read -P 0x07 8M 2M");
    assert_eq!(unique(&d, "dev"), 3 * M);
    // Overwriting its own blocks adds nothing: allowed at the limit.
    io_ok(&dev, "write -P 0x33 0 3M");
    // Exactly up to the limit is allowed.
    io_ok(&dev, "write -P 0x44 3M 1M");
    assert_eq!(unique(&d, "dev"), 4 * M);

    // The same clone over iSCSI through qemu's libiscsi driver: refused the same way.
    io_enospc(&d.iscsi_url("dev"), "write -P 0x55 16M 64k");
    let checks = d.metrics();
    assert!(
        metric_value(&checks, "forkd_iscsi_check_conditions_total{sense_key=\"0x07\"}") >= 1.0,
        "no DATA PROTECT sense counted:\n{checks}"
    );

    // Another clone of the same snapshot keeps writing.
    io_ok(&d.nbd_uri("other"), "write -P 0x66 0 16M");

    // The gauges and show report use and limit.
    let m = d.metrics();
    assert_eq!(metric_value(&m, "forkd_quota_used_bytes{volume=\"dev\"}"), (4 * M) as f64, "{m}");
    assert_eq!(metric_value(&m, "forkd_quota_limit_bytes{volume=\"dev\"}"), (4 * M) as f64, "{m}");
    assert!(!m.contains("forkd_quota_used_bytes{volume=\"other\"}"), "a clone without a quota has no gauge");
    assert!(d.cli_ok(&["show", "dev"]).contains("quota"), "show names the quota");

    // A trim brings it back under; then it writes again.
    io_ok(&dev, "discard 0 2M");
    assert_eq!(unique(&d, "dev"), 2 * M);
    io_ok(&dev, "write -P 0x77 8M 2M");
    io_enospc(&dev, "write -P 0x77 12M 4k");

    // A quota below current use is allowed: adding fails, trims still work.
    d.cli_ok(&["quota", "dev", "1M"]);
    io_enospc(&dev, "write -P 0x88 20M 4k");
    io_ok(&dev, "discard 8M 2M");
    io_ok(&dev, "discard 2M 1M");
    assert_eq!(unique(&d, "dev"), M);
    io_ok(&dev, "read -P 0 0 3M");
    // The limit and the figure hold across a restart.
    d.stop();
    d.restart();
    let dev = d.nbd_uri("dev");
    assert_eq!(show(&d, "dev")["quota_bytes"], M);
    io_enospc(&dev, "write -P 0x99 30M 4k");
    // Removing the quota lifts the limit.
    assert!(d.cli_ok(&["quota", "dev", "--none"]).contains("no quota"));
    io_ok(&dev, "write -P 0x99 30M 8M");
    assert!(show(&d, "dev").get("quota_bytes").is_none());
}

#[test]
fn default_quota_reaches_new_clones_and_bad_quotas_are_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_in(root.path());
    source(&d, root.path());
    d.cli_ok(&["policy", "set", "prod", "default_quota=2M"]);
    assert_eq!(show(&d, "prod")["default_quota_bytes"], 2 * M);
    assert_eq!(d.cli_json(&["clone", "prod@1", "a"])["quota_bytes"], 2 * M);
    assert_eq!(d.cli_json(&["clone", "prod@1", "b", "--quota", "8M"])["quota_bytes"], 8 * M);
    // A clone of a clone gets its source's default too.
    assert_eq!(d.cli_json(&["clone", "a", "a2"])["quota_bytes"], 2 * M);
    io_enospc(&d.nbd_uri("a"), "write -P 1 0 3M");
    io_ok(&d.nbd_uri("b"), "write -P 1 0 3M");
    for (args, why) in [
        (vec!["quota", "prod", "1G"], "only clones"),
        (vec!["quota", "ghost", "1G"], "ghost"),
        (vec!["quota", "a", "lots"], "give a size"),
        (vec!["quota", "a", "0"], "at least 4096"),
        (vec!["clone", "prod@1", "c", "--quota=-1G"], "give a size"),
        (vec!["policy", "set", "prod", "default_quota=x"], "give a size"),
        (vec!["policy", "set", "a", "default_quota=1G"], "is a clone"),
    ] {
        let out = d.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "{args:?}: {err}");
    }
    assert!(d.api().get("/v1/volumes/c").status == 404, "a refused clone was not created");
    d.cli_ok(&["policy", "set", "prod", "default_quota=none"]);
    assert!(d.cli_json(&["clone", "prod@1", "d"]).get("quota_bytes").is_none());
}

/// HTTP writes of 4 MiB of random data into `vol` from `offset` until the filesystem under
/// `dir` has less than `free` bytes free.
fn fill_until(d: &Daemon, dir: &Path, vol: &str, free: u64) {
    for i in 0..48u64 {
        if nix::sys::statvfs::statvfs(dir).map(|s| s.blocks_available() * s.fragment_size()).unwrap_or(0) < free {
            return;
        }
        let mut data = vec![0u8; 4 << 20];
        rand::Rng::fill(&mut rand::thread_rng(), &mut data[..]);
        let r = d.api().put_bytes(&format!("/v1/volumes/{vol}/data?offset={}", i * (4 << 20)), &data);
        assert_eq!(r.status, 200, "write {i}: {}", r.text());
        d.api().post_json_ok(&format!("/v1/volumes/{vol}/flush"), &serde_json::json!({}));
    }
    panic!("192 MiB written and the filesystem still has {free} bytes free");
}

#[test]
fn the_low_space_threshold_refuses_new_clones_and_ingests_until_space_is_freed() {
    let root = tempfile::tempdir().expect("tempdir");
    let fs = LoopFs::mount(root.path(), 256);
    let data = fs.mnt.join("data");
    let log = root.path().join("daemon.log");
    let d = Daemon::start_at(&data, &log, "127.0.0.1", &["--low-space-threshold", "96M"]);
    d.cli_ok(&["source", "create", "prod", "--size", "256M"]);
    let img = root.path().join("prod.img");
    std::fs::write(&img, vec![7u8; 1 << 20]).expect("image");
    std::fs::File::options().write(true).open(&img).and_then(|f| f.set_len(256 * M)).expect("size image");
    d.cli_ok(&["ingest", "prod", "--from", img.to_str().expect("utf-8")]);
    d.cli_ok(&["clone", "prod@1", "big"]);
    fill_until(&d, &fs.mnt, "big", 96 * M);

    let refused = d.cli(&["clone", "prod@1", "more"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("low on space") && err.contains("low_space_threshold"), "{err}");
    let refused = d.cli(&["ingest", "prod", "--from", img.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("low on space"), "{err}");
    assert_eq!(d.api().get("/v1/volumes/more").status, 404, "nothing half-done");
    // Writes to an existing clone go on below the threshold.
    d.api().write("big", 0, &[1u8; 4096]);
    let m = d.metrics();
    assert_eq!(metric_value(&m, "forkd_pool_low_space_threshold_bytes"), (96 * M) as f64);
    assert!(metric_value(&m, "forkd_pool_free_bytes") < (96 * M) as f64, "{m}");

    // Deleting the clone frees its space (once collected, after the flush that makes its slots
    // reusable).
    d.cli_ok(&["delete", "big"]);
    d.wait_for_garbage_collection();
    d.cli_ok(&["clone", "prod@1", "more"]);
    d.cli_ok(&["ingest", "prod", "--from", img.to_str().expect("utf-8")]);
}
