//! Resumable ingest: an agent killed mid-ingest, or a daemon killed mid-ingest, leaves no
//! snapshot; re-running the ingest completes it without resending what the daemon already
//! had, and the result is byte for byte the image; `forkd ingest --abort` frees the blocks
//! of an interrupted ingest.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use forkd_tests::{assert_same_image, metric_value, Daemon};
use rand::{Rng, SeedableRng};

const SIZE: usize = 96 << 20;

fn image(seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; SIZE];
    rng.fill(&mut v[..]);
    v
}

fn start_ingest(d: &Daemon, name: &str, from: &std::path::Path) -> Child {
    Command::new(d.bin())
        .args(["--api", &d.url(), "ingest", name, "--from"])
        .arg(from)
        .env_remove("FORKD_API")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start forkd ingest")
}

fn written(d: &Daemon) -> f64 {
    metric_value(&d.metrics(), "forkd_written_bytes_total")
}

/// Wait (bounded) until the daemon has received at least `bytes` more than `base`.
fn wait_written(d: &Daemon, base: f64, bytes: f64) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if written(d) >= base + bytes {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

fn snapshots(d: &Daemon, name: &str) -> usize {
    d.cli_json(&["show", name])["snapshots"].as_array().map_or(0, Vec::len)
}

fn last_summary(d: &Daemon, name: &str) -> serde_json::Value {
    let v = d.cli_json(&["show", name]);
    v["snapshots"].as_array().and_then(|s| s.last()).map(|s| s["ingest"].clone()).unwrap_or_default()
}

fn dump(d: &Daemon, reference: &str, dir: &std::path::Path) -> Vec<u8> {
    let f = dir.join(format!("{}.img", reference.replace('@', "-")));
    d.cli_ok(&["dump", reference, f.to_str().expect("path")]);
    std::fs::read(f).expect("read dump")
}

#[test]
fn killed_agent_resumes_without_resending() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_in(dir.path());
    let img = dir.path().join("img");
    std::fs::write(&img, image(1)).expect("write image");
    d.cli_ok(&["source", "create", "prod", "--size", "96M"]);
    d.cli_ok(&["ingest", "prod", "--from", img.to_str().expect("path")]);
    // A new image, different everywhere: the second ingest sends all of it.
    let v2 = image(2);
    std::fs::write(&img, &v2).expect("write image");
    let base = written(&d);
    let mut agent = start_ingest(&d, "prod", &img);
    let got = wait_written(&d, base, 16.0 * 1024.0 * 1024.0);
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(got, "the daemon never received 16 MiB of the second ingest");
    let first_attempt = written(&d) - base;
    assert!(first_attempt < SIZE as f64, "the agent was killed before it finished");
    assert_eq!(snapshots(&d, "prod"), 1, "an interrupted ingest makes no snapshot");
    let v = d.cli_json(&["show", "prod"]);
    assert_eq!(v["ingest_running"], true, "the interrupted ingest is kept for a resume: {v}");
    // The source still shows its latest snapshot, not the partial ingest.
    assert_same_image("prod during the interruption", &dump(&d, "prod", dir.path()), &image(1));
    // Re-run: it completes, and sends less than a full ingest would.
    d.cli_ok(&["ingest", "prod", "--from", img.to_str().expect("path")]);
    assert_eq!(snapshots(&d, "prod"), 2);
    let s = last_summary(&d, "prod");
    let sent = s["sent_bytes"].as_u64().expect("sent_bytes");
    println!("first attempt sent {first_attempt} bytes, the resume sent {sent} of {SIZE}");
    assert!(sent < SIZE as u64, "the resumed ingest resent everything ({sent} bytes)");
    assert!(sent as f64 <= SIZE as f64 - first_attempt + 4096.0 * 1024.0, "the resume resent acknowledged blocks");
    assert_same_image("prod@2 after the resume", &dump(&d, "prod@2", dir.path()), &v2);
    assert_eq!(d.cli_json(&["show", "prod"])["ingest_running"], false);
}

#[test]
fn daemon_killed_mid_ingest_resumes_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = Daemon::start_in(dir.path());
    let img = dir.path().join("img");
    let v1 = image(3);
    std::fs::write(&img, &v1).expect("write image");
    d.cli_ok(&["source", "create", "prod", "--size", "96M"]);
    let base = written(&d);
    let mut agent = start_ingest(&d, "prod", &img);
    assert!(wait_written(&d, base, 16.0 * 1024.0 * 1024.0), "the daemon never received 16 MiB");
    d.kill9();
    let _ = agent.wait();
    d.restart();
    assert_eq!(snapshots(&d, "prod"), 0, "no snapshot after a crash mid-ingest");
    d.cli_ok(&["ingest", "prod", "--from", img.to_str().expect("path")]);
    assert_eq!(snapshots(&d, "prod"), 1);
    assert_same_image("prod@1 after the restart and resume", &dump(&d, "prod@1", dir.path()), &v1);
}

#[test]
fn abort_frees_an_interrupted_ingest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_in(dir.path());
    let img = dir.path().join("img");
    std::fs::write(&img, image(4)).expect("write image");
    d.cli_ok(&["source", "create", "prod", "--size", "96M"]);
    let base = written(&d);
    let mut agent = start_ingest(&d, "prod", &img);
    assert!(wait_written(&d, base, 16.0 * 1024.0 * 1024.0), "the daemon never received 16 MiB");
    let _ = agent.kill();
    let _ = agent.wait();
    let pending = d.cli_json(&["show", "prod"])["ingest_pending_bytes"].as_u64().unwrap_or(0);
    assert!(pending >= 16 << 20, "the interrupted ingest holds what arrived ({pending} bytes)");
    let usage = forkd_tests::allocated_bytes(&d.data_dir().join("extents.0"));
    assert!(usage >= 16 << 20, "the extent file holds the staged data ({usage} bytes)");
    d.cli_ok(&["ingest", "prod", "--abort"]);
    d.wait_for_garbage_collection();
    let v = d.cli_json(&["show", "prod"]);
    assert_eq!(v["ingest_running"], false);
    assert_eq!(v["snapshots"].as_array().map_or(0, Vec::len), 0);
    let after = forkd_tests::allocated_bytes(&d.data_dir().join("extents.0"));
    assert!(after < 1 << 20, "aborting freed the staged blocks on disk ({after} bytes left)");
    // Aborting twice is a clear error.
    let out = d.cli(&["ingest", "prod", "--abort"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no ingest is running"));
}
