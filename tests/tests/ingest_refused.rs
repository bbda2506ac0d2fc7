//! An ingest the daemon refuses part-way must tell the user why, in the daemon's words: the
//! agent reads the answer while it is still sending, so "another ingest is running" and "the
//! disk is full" are not reported as a broken pipe. The refused run changes nothing else: the
//! running ingest completes, and the daemon keeps serving.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use forkd_tests::{run_bounded, Daemon};

/// Random bytes, so every block is data.
fn random_image(path: &Path, bytes: usize) {
    let mut data = vec![0u8; bytes];
    rand::Rng::fill(&mut rand::thread_rng(), &mut data[..]);
    std::fs::write(path, data).expect("write image");
}

/// An ingest stream held open by hand: the request head and no frame yet, so the daemon's
/// ingest of `source` is running until this is dropped.
fn open_ingest_stream(d: &Daemon, source: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", d.port())).expect("connect");
    let head = format!(
        "POST /v1/sources/{source}/ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).expect("send head");
    s
}

#[test]
fn a_second_ingest_is_told_the_first_is_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_in(dir.path());
    let img = dir.path().join("img");
    random_image(&img, 64 << 20);
    d.cli_ok(&["source", "create", "prod", "--size", "64M"]);
    let held = open_ingest_stream(&d, "prod");
    // The daemon claims the source when the request arrives; wait until it shows.
    for _ in 0..100 {
        if d.api().get_json("/v1/volumes/prod")["ingest_running"] == true {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = d.cli(&["ingest", "prod", "--from", img.to_str().expect("utf-8")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second ingest succeeded: {stderr}");
    assert!(stderr.contains("an ingest into `prod` is already running"), "{stderr}");
    assert!(!stderr.to_lowercase().contains("broken pipe"), "{stderr}");
    drop(held);
    // The held stream broke off; a full ingest now runs and completes.
    let mut ok = None;
    for _ in 0..100 {
        let out = d.cli(&["ingest", "prod", "--from", img.to_str().expect("utf-8")]);
        if out.status.success() {
            ok = Some(out);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = ok.expect("an ingest after the held stream ended");
    assert!(String::from_utf8_lossy(&out.stdout).contains("into prod@1"), "{out:?}");
}

/// A tmpfs of `size` mounted at `at` for the life of the value.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).expect("mkdir");
        let out = run_bounded(
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at),
            Duration::from_secs(20),
        );
        assert!(out.status.success(), "mount tmpfs needs root (CI runs as root): {out:?}");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn an_ingest_into_a_full_disk_is_told_the_disk_is_full() {
    let dir = tempfile::tempdir().expect("tempdir");
    let small = Tmpfs::mount(&dir.path().join("small"), "48m");
    let mut d = Daemon::start(&small.0.join("data"), &dir.path().join("daemon.log"));
    let img = dir.path().join("img");
    random_image(&img, 128 << 20);
    d.cli_ok(&["source", "create", "prod", "--size", "128M"]);
    let out = d.cli(&["ingest", "prod", "--from", img.to_str().expect("utf-8")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an ingest of 128 MiB into 48 MiB succeeded: {stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(!stderr.to_lowercase().contains("broken pipe"), "{stderr}");
    // The daemon is still there, and gives the space back when the ingest is abandoned.
    d.cli_ok(&["ingest", "prod", "--abort"]);
    let prod = d.api().get("/v1/volumes/prod");
    assert!(prod.ok(), "{}", prod.text());
    assert_eq!(prod.json()["ingest_running"], false);
    assert!(d.stop().success(), "the daemon did not stop cleanly:\n{}", d.log());
}
