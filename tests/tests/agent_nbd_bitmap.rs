//! `forkd ingest --from nbd://HOST:PORT/EXPORT [--dirty-bitmap NAME]` against a real `qemu-nbd`
//! serving a qcow2 image: a full read first, then, after writes recorded by a persistent qemu
//! dirty bitmap (`qemu-img bitmap --add`), an ingest that reads only the dirty granules and
//! sends only the written blocks; each snapshot equals `qemu-img convert -O raw` byte for byte.
//! An unknown bitmap and `--dirty-bitmap` without an NBD source fail with exit 1 and change
//! nothing.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use forkd_tests::{assert_same_image, free_port, run_bounded, Daemon, BS};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
/// The bitmap's granularity (given explicitly to `qemu-img bitmap --add`).
const GRANULE: u64 = 64 << 10;
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

fn utf8(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn ix(x: u64) -> usize {
    usize::try_from(x).expect("index fits usize")
}

/// Run a tool that must succeed (bounded in time).
fn tool(program: &str, args: &[&str]) {
    let out = run_bounded(Command::new(program).args(args), TOOL_TIMEOUT);
    assert!(
        out.status.success(),
        "{program} {} failed with {}\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `qemu-nbd` serving an image read-only as export `disk`; killed on drop.
struct QemuNbd {
    child: Child,
    port: u16,
}

impl QemuNbd {
    fn start(img: &Path, bitmap: Option<&str>) -> QemuNbd {
        let mut last = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let mut cmd = Command::new("qemu-nbd");
            cmd.args(["-f", "qcow2", "-x", "disk", "-b", "127.0.0.1", "-p", &port.to_string(), "-t", "-r"]);
            if let Some(b) = bitmap {
                cmd.args(["-B", b]);
            }
            let child = cmd
                .arg(img)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("cannot run qemu-nbd");
            let mut q = QemuNbd { child, port };
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(st)) = q.child.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = q.child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut err);
                    }
                    last = format!("qemu-nbd exited with {st}: {err}");
                    break;
                }
                let out = run_bounded(Command::new("nbdinfo").args(["--size", &q.url()]), Duration::from_secs(10));
                if out.status.success() {
                    return q;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if last.is_empty() {
                last = "qemu-nbd did not answer within 20s".into();
            }
        }
        panic!("could not start qemu-nbd: {last}");
    }

    fn url(&self) -> String {
        format!("nbd://127.0.0.1:{}/disk", self.port)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The latest snapshot of `prod` and how many there are.
fn latest(d: &Daemon) -> (Value, usize) {
    let show = d.cli_json(&["show", "prod"]);
    let snaps = show["snapshots"].as_array().unwrap_or_else(|| panic!("no snapshots: {show:#}"));
    (snaps.last().cloned().unwrap_or(Value::Null), snaps.len())
}

/// (scanned, changed, sent) of a snapshot's ingest summary.
fn summary(snap: &Value) -> (u64, u64, u64) {
    let i = &snap["ingest"];
    let g = |k: &str| i[k].as_u64().unwrap_or_else(|| panic!("no {k} in {snap:#}"));
    (g("scanned_bytes"), g("changed_bytes"), g("sent_bytes"))
}

/// The snapshot's contents must equal the qcow2 image's.
fn check_contents(d: &Daemon, root: &Path, snap: &Value, what: &str) {
    let expected = root.join("expected.raw");
    let _ = std::fs::remove_file(&expected);
    tool("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", utf8(&root.join("src.qcow2")), utf8(&expected)]);
    let dump = root.join("dump.raw");
    let name = snap["name"].as_str().unwrap_or_else(|| panic!("no snapshot name in {snap:#}"));
    d.cli_ok(&["dump", name, utf8(&dump)]);
    let (got, want) = (std::fs::read(&dump).expect("read dump"), std::fs::read(&expected).expect("read expected"));
    assert_same_image(what, &got, &want);
}

#[test]
fn nbd_full_then_dirty_bitmap() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let img = root.join("src.qcow2");
    tool("qemu-img", &["create", "-q", "-f", "qcow2", utf8(&img), "16M"]);
    tool("qemu-io", &["-f", "qcow2", "-c", "write -q -P 0x11 0 16M", utf8(&img)]);
    let d = Daemon::start_in(root);
    d.cli_ok(&["source", "create", "prod", "--size", "16M"]);

    // Full read over NBD.
    {
        let q = QemuNbd::start(&img, None);
        let out = d.cli_ok(&["ingest", "prod", "--from", &q.url()]);
        println!("full: {}", out.trim());
        let (snap, n) = latest(&d);
        assert_eq!(n, 1);
        assert_eq!(summary(&snap), (SIZE, SIZE, SIZE), "full ingest: {snap:#}");
        check_contents(&d, root, &snap, "full ingest over NBD");
    }

    // A persistent bitmap, then scattered writes it records: (offset, length, pattern or zero).
    tool("qemu-img", &["bitmap", "--add", "-g", &GRANULE.to_string(), utf8(&img), "b0"]);
    let writes: [(u64, u64, Option<u8>); 6] = [
        (0, 4096, Some(0x22)),
        (MIB + 8192, 3 * 4096, Some(0x33)),
        (5 * MIB + 100, 5000, Some(0x44)),
        (10 * MIB, 128 << 10, Some(0x55)),
        (12 * MIB, 64 << 10, None),
        (SIZE - 4096, 4096, Some(0x66)),
    ];
    let (mut granules, mut blocks) = (vec![false; ix(SIZE / GRANULE)], vec![0u8; ix(SIZE / BS as u64)]);
    for &(off, len, pat) in &writes {
        let cmd = match pat {
            Some(p) => format!("write -q -P {p:#x} {off} {len}"),
            None => format!("write -q -z {off} {len}"),
        };
        tool("qemu-io", &["-f", "qcow2", "-c", &cmd, utf8(&img)]);
        for g in off / GRANULE..(off + len).div_ceil(GRANULE) {
            granules[ix(g)] = true;
        }
        for b in off / BS as u64..(off + len).div_ceil(BS as u64) {
            blocks[ix(b)] = if pat.is_some() { 1 } else { 2 };
        }
    }
    let dirty = granules.iter().filter(|&&g| g).count() as u64 * GRANULE;
    let sent = blocks.iter().filter(|&&b| b == 1).count() as u64 * BS as u64;
    let changed = blocks.iter().filter(|&&b| b != 0).count() as u64 * BS as u64;

    let q = QemuNbd::start(&img, Some("b0"));
    // Bad input first: an unknown bitmap, --dirty-bitmap on a file, an unknown export, no
    // server. None changes anything.
    let nobody = format!("nbd://127.0.0.1:{}/disk", free_port());
    let bad: [(Vec<String>, &str); 4] = [
        (vec!["--from".into(), q.url().replace("/disk", "/other")], "unknown export"),
        (vec!["--from".into(), nobody, "--dirty-bitmap".into(), "b0".into()], "cannot connect"),
        (vec!["--from".into(), q.url(), "--dirty-bitmap".into(), "nope".into()], "no dirty bitmap `nope`"),
        (vec!["--from".into(), utf8(&img).into(), "--dirty-bitmap".into(), "b0".into()], "--dirty-bitmap needs"),
    ];
    for (args, msg) in &bad {
        let mut a = vec!["ingest", "prod"];
        a.extend(args.iter().map(String::as_str));
        let out = d.cli(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "forkd {}: {out:?}", a.join(" "));
        assert!(err.contains(msg), "forkd {}: stderr lacks `{msg}`: {err}", a.join(" "));
        assert_eq!(latest(&d).1, 1, "a failed ingest made a snapshot");
    }

    let out = d.cli_ok(&["ingest", "prod", "--from", &q.url(), "--dirty-bitmap", "b0"]);
    println!("bitmap: {}", out.trim());
    assert!(out.contains("from dirty bitmap b0"), "the summary does not name the bitmap: {out}");
    let (snap, n) = latest(&d);
    assert_eq!(n, 2);
    assert_eq!(summary(&snap), (dirty, changed, sent), "bitmap ingest (scanned, changed, sent): {snap:#}");
    assert!(dirty < SIZE / 4, "test bug: the bitmap covers {dirty} bytes");
    drop(q);
    check_contents(&d, root, &snap, "dirty-bitmap ingest over NBD");
}
