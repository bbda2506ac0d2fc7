//! `forkd ingest --lvm VG/LV` and `--freeze MOUNTPOINT`: the snapshot/freeze is always undone,
//! on success, on a failure half-way, and on SIGTERM/SIGINT.
//!
//! This machine has no device-mapper, so `--lvm` runs against stand-in `lvcreate`/`lvremove`
//! (and, for the `--lvm --freeze` ordering, `fsfreeze`) scripts first on PATH: they log their
//! arguments and `lvcreate` hands back a file under `FORKD_LVM_DEV_DIR`. `--freeze` alone runs
//! the real `fsfreeze` on a real ext4 on a loop device (root only; skipped otherwise).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use forkd_tests::{assert_same_image, Daemon};
use rand::{RngCore, SeedableRng};

const MIB: usize = 1 << 20;

fn utf8(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const LVCREATE: &str = r#"#!/bin/sh
echo "lvcreate $*" >> "$STANDIN_LOG"
if [ "$STANDIN_MODE" = nospace ]; then
    echo "  Volume group \"vg\" has insufficient free space (12 extents): 256 required." >&2
    exit 5
fi
while [ $# -gt 1 ]; do
    case "$1" in
        -n) name=$2; shift 2 ;;
        -L) shift 2 ;;
        *) shift ;;
    esac
done
vg=${1%%/*}
mkdir -p "$FORKD_LVM_DEV_DIR/$vg"
dev="$FORKD_LVM_DEV_DIR/$vg/$name"
case "$STANDIN_MODE" in
    ok) cp "$STANDIN_IMAGE" "$dev" ;;
    short) head -c 12288 "$STANDIN_IMAGE" > "$dev" ;;
    fifo) mkfifo "$dev" ;;
esac
"#;

const LVREMOVE: &str = r#"#!/bin/sh
echo "lvremove $*" >> "$STANDIN_LOG"
rm -f "$FORKD_LVM_DEV_DIR/$2"
"#;

const FSFREEZE: &str = r#"#!/bin/sh
echo "fsfreeze $*" >> "$STANDIN_LOG"
"#;

/// A daemon, a source `prod` of `size` bytes, an image, and a bin dir of stand-ins.
struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    d: Daemon,
    image: Vec<u8>,
    path: String,
}

impl Setup {
    fn new(size: usize, with_fsfreeze: bool) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let d = Daemon::start_in(&root);
        d.cli_ok(&["source", "create", "prod", "--size", &size.to_string()]);
        let mut image = vec![0u8; size];
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        // Non-zero everywhere, cheaply: random first MiB repeated with a block counter.
        let n = image.len().min(MIB);
        rng.fill_bytes(&mut image[..n]);
        for b in (0..size).step_by(4096) {
            image[b..b + 8].copy_from_slice(&(b as u64 + 1).to_le_bytes());
        }
        std::fs::write(root.join("img.raw"), &image).expect("write image");
        let bin = root.join("bin");
        std::fs::create_dir(&bin).expect("bin dir");
        let mut scripts = vec![("lvcreate", LVCREATE), ("lvremove", LVREMOVE)];
        if with_fsfreeze {
            scripts.push(("fsfreeze", FSFREEZE));
        }
        for (name, body) in scripts {
            let p = bin.join(name);
            std::fs::write(&p, body).expect("write stand-in");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        std::fs::create_dir(root.join("dev")).expect("dev dir");
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        Setup { _dir: dir, root, d, image, path }
    }

    fn env(&self, mode: &'static str) -> Vec<(String, String)> {
        let r = |p: &str| self.root.join(p).display().to_string();
        vec![
            ("PATH".into(), self.path.clone()),
            ("FORKD_LVM_DEV_DIR".into(), r("dev")),
            ("STANDIN_LOG".into(), r("standin.log")),
            ("STANDIN_IMAGE".into(), r("img.raw")),
            ("STANDIN_MODE".into(), mode.into()),
        ]
    }

    fn ingest(&self, mode: &'static str, args: &[&str]) -> Output {
        let env = self.env(mode);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut a = vec!["ingest", "prod"];
        a.extend_from_slice(args);
        self.d.cli_env(&a, &env)
    }

    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(self.root.join("standin.log")).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    /// Files left in the stand-in /dev/vg.
    fn leftovers(&self) -> Vec<String> {
        match std::fs::read_dir(self.root.join("dev/vg")) {
            Ok(rd) => rd.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn snapshots(&self) -> usize {
        let show = self.d.cli_json(&["show", "prod"]);
        show["snapshots"].as_array().map_or(0, Vec::len)
    }
}

/// The snapshot name lvcreate was given (`-n NAME`).
fn created_name(line: &str) -> String {
    let w: Vec<&str> = line.split_whitespace().collect();
    let i = w.iter().position(|&x| x == "-n").unwrap_or_else(|| panic!("no -n in {line:?}"));
    w[i + 1].to_owned()
}

#[test]
fn lvm_snapshot_is_read_and_removed() {
    let s = Setup::new(8 * MIB, false);
    let out = s.ingest("ok", &["--lvm", "vg/data", "--lvm-snapshot-size", "2G", "--lvm-prefix", "nightly"]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "ingest failed: {err}\n{}", text(&out.stdout));
    let log = s.log();
    assert_eq!(log.len(), 2, "expected lvcreate then lvremove: {log:?}");
    assert!(log[0].starts_with("lvcreate -s -n nightly-") && log[0].ends_with(" -L 2G vg/data"), "{log:?}");
    let name = created_name(&log[0]);
    assert_eq!(log[1], format!("lvremove -y vg/{name}"));
    assert!(err.contains(&format!("created LVM snapshot vg/{name} of vg/data")), "{err}");
    assert!(err.contains(&format!("removed LVM snapshot vg/{name}")), "{err}");
    assert!(s.leftovers().is_empty(), "left behind: {:?}", s.leftovers());
    let dump = s.root.join("dump.raw");
    s.d.cli_ok(&["dump", "prod@latest", utf8(&dump)]);
    assert_same_image("snapshot from --lvm", &std::fs::read(&dump).expect("read dump"), &s.image);

    // Defaults: -L 1G and the forkd-ingest prefix.
    let out = s.ingest("ok", &["--lvm", "vg/data"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let log = s.log();
    assert!(log[2].starts_with("lvcreate -s -n forkd-ingest-") && log[2].ends_with(" -L 1G vg/data"), "{log:?}");
    assert_eq!(log[3], format!("lvremove -y vg/{}", created_name(&log[2])));
}

#[test]
fn lvm_with_freeze_thaws_right_after_lvcreate() {
    let s = Setup::new(4 * MIB, true);
    let mnt = s.root.join("mnt");
    std::fs::create_dir(&mnt).expect("mnt");
    let out = s.ingest("ok", &["--lvm", "vg/data", "--freeze", utf8(&mnt)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let log = s.log();
    let m = utf8(&mnt);
    assert_eq!(log.len(), 4, "{log:?}");
    assert_eq!(log[0], format!("fsfreeze -f {m}"));
    assert!(log[1].starts_with("lvcreate -s"), "{log:?}");
    assert_eq!(log[2], format!("fsfreeze -u {m}"), "the freeze must end right after lvcreate: {log:?}");
    assert!(log[3].starts_with("lvremove -y vg/"), "{log:?}");
    let err = text(&out.stderr);
    let (froze, thawed) = (err.find("froze ").expect("froze"), err.find("thawed ").expect("thawed"));
    assert!(froze < thawed && thawed < err.find("removed LVM snapshot").expect("removed"), "{err}");

    // lvcreate fails while frozen: still thawed, nothing to remove.
    let before = s.log().len();
    let out = s.ingest("nospace", &["--lvm", "vg/data", "--freeze", m]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let log = s.log()[before..].to_vec();
    assert_eq!(log.len(), 3, "{log:?}");
    assert_eq!(log[2], format!("fsfreeze -u {m}"), "{log:?}");
}

#[test]
fn lvm_failure_half_way_still_removes_the_snapshot() {
    let s = Setup::new(4 * MIB, false);
    let out = s.ingest("short", &["--lvm", "vg/data"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("forkd: error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {err}");
    assert!(errors[0].contains("12288 bytes"), "{err}");
    let log = s.log();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[1], format!("lvremove -y vg/{}", created_name(&log[0])));
    assert!(s.leftovers().is_empty(), "left behind: {:?}", s.leftovers());
    assert_eq!(s.snapshots(), 0);
}

#[test]
fn lvm_without_free_space_is_one_clear_error() {
    let s = Setup::new(4 * MIB, false);
    let out = s.ingest("nospace", &["--lvm", "vg/data"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("forkd: error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("Volume group \"vg\" has insufficient free space"), "{err}");
    assert!(errors[0].contains("lvcreate"), "{err}");
    let log = s.log();
    assert_eq!(log.len(), 1, "only lvcreate ran: {log:?}");
    assert!(s.leftovers().is_empty());
    assert_eq!(s.snapshots(), 0);
    assert!(!err.contains("removed"), "{err}");
}

#[test]
fn lvm_bad_name_is_refused_before_anything_runs() {
    let s = Setup::new(4 * MIB, false);
    let out = s.ingest("ok", &["--lvm", "data"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("expected VG/LV"), "{}", text(&out.stderr));
    assert!(s.log().is_empty());
}

/// SIGTERM / SIGINT while the agent reads the snapshot (a FIFO no one writes: the open blocks
/// for ever) removes the snapshot and exits 143 / 130.
#[test]
fn lvm_signal_removes_the_snapshot() {
    for (sig, code) in [(nix::sys::signal::Signal::SIGTERM, 143), (nix::sys::signal::Signal::SIGINT, 130)] {
        let s = Setup::new(4 * MIB, false);
        let mut cmd = Command::new(s.d.bin());
        cmd.arg("--api").arg(s.d.url()).args(["ingest", "prod", "--lvm", "vg/data"]);
        for (k, v) in s.env("fifo") {
            cmd.env(k, v);
        }
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let started = Instant::now();
        while !s.log().iter().any(|l| l.starts_with("lvcreate")) {
            assert!(started.elapsed() < Duration::from_secs(30), "lvcreate never ran");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        nix::sys::signal::kill(pid, sig).expect("kill");
        let out = wait_bounded(child, Duration::from_secs(30));
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{sig}: {err}");
        let log = s.log();
        assert_eq!(log.len(), 2, "{sig}: {log:?}\n{err}");
        assert_eq!(log[1], format!("lvremove -y vg/{}", created_name(&log[0])));
        assert!(err.contains("removed LVM snapshot"), "{err}");
        assert!(s.leftovers().is_empty(), "left behind: {:?}", s.leftovers());
        assert_eq!(s.snapshots(), 0);
    }
}

fn wait_bounded(mut child: std::process::Child, timeout: Duration) -> Output {
    let started = Instant::now();
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("agent still running after {timeout:?}: {}", text(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A real ext4 on a loop device, mounted; unmounted and detached on drop.
struct Ext4 {
    dev: String,
    mnt: PathBuf,
}

impl Ext4 {
    fn new(root: &Path, size: usize) -> Option<Ext4> {
        if nix::unistd::geteuid().as_raw() != 0 {
            println!("skipped: not root");
            return None;
        }
        let file = root.join("fs.img");
        std::fs::write(&file, vec![0u8; size]).expect("fs image");
        let ok = |cmd: &mut Command| {
            let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
            assert!(out.status.success(), "{cmd:?}: {}", text(&out.stderr));
            text(&out.stdout).trim().to_owned()
        };
        ok(Command::new("mkfs.ext4").args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]).arg(&file));
        let dev = ok(Command::new("losetup").args(["-f", "--show"]).arg(&file));
        let mnt = root.join("mnt");
        std::fs::create_dir(&mnt).expect("mnt");
        let fs = Ext4 { dev, mnt };
        ok(Command::new("mount").arg(&fs.dev).arg(&fs.mnt));
        Some(fs)
    }

    /// Write a file in the mount, bounded: a frozen filesystem would block it.
    fn write_within(&self, name: &str, data: &'static [u8], timeout: Duration) -> bool {
        let p = self.mnt.join(name);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = std::fs::write(&p, data).and_then(|()| std::fs::File::open(&p)?.sync_all());
            let _ = tx.send(r.is_ok());
        });
        rx.recv_timeout(timeout).unwrap_or(false)
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        // Thaw first in case a test failed while frozen (an error if not frozen: ignored).
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.mnt).output();
        let _ = Command::new("umount").arg(&self.mnt).output();
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).output();
    }
}

#[test]
fn freeze_real_ext4_is_always_thawed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let size = 64 * MIB;
    let Some(fs) = Ext4::new(root, size) else { return };
    assert!(fs.write_within("hello.txt", b"hello from the source\n", Duration::from_secs(10)));
    let d = Daemon::start_in(root);
    d.cli_ok(&["source", "create", "prod", "--size", &size.to_string()]);
    let out = d.cli(&["ingest", "prod", "--from", &fs.dev, "--freeze", utf8(&fs.mnt)]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let m = fs.mnt.display();
    assert!(err.contains(&format!("froze {m}")) && err.contains(&format!("thawed {m}")), "{err}");
    assert!(fs.write_within("after.txt", b"written after the ingest\n", Duration::from_secs(10)), "still frozen");

    // The snapshot is a clean ext4 holding the file written before the ingest.
    let dump = root.join("dump.raw");
    d.cli_ok(&["dump", "prod@latest", utf8(&dump)]);
    let fsck = Command::new("e2fsck").arg("-fn").arg(&dump).output().expect("e2fsck");
    assert!(fsck.status.success(), "e2fsck: {}{}", text(&fsck.stdout), text(&fsck.stderr));
    let cat = Command::new("debugfs").args(["-R", "cat /hello.txt"]).arg(&dump).output().expect("debugfs");
    assert_eq!(text(&cat.stdout), "hello from the source\n");

    // A failing ingest (unreadable --from) still thaws.
    let out = d.cli(&["ingest", "prod", "--from", utf8(&root.join("missing")), "--freeze", utf8(&fs.mnt)]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("thawed {m}")), "{err}");
    assert!(fs.write_within("after2.txt", b"again\n", Duration::from_secs(10)), "still frozen after a failure");

    // SIGTERM while frozen (reading a FIFO no one writes: the open blocks) thaws and exits 143.
    let fifo = root.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let child = Command::new(d.bin())
        .arg("--api")
        .arg(d.url())
        .args(["ingest", "prod", "--from", utf8(&fifo), "--freeze", utf8(&fs.mnt)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    // Frozen once a write blocks; give it a moment either way.
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("kill");
    let out = wait_bounded(child, Duration::from_secs(30));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{err}");
    assert!(err.contains(&format!("froze {m}")) && err.contains(&format!("thawed {m}")), "{err}");
    assert!(fs.write_within("after3.txt", b"and again\n", Duration::from_secs(10)), "still frozen after SIGTERM");
}

/// The daemon goes away in the middle of a `--freeze` ingest: the agent fails with one clear
/// error line, the filesystem is thawed, and after a restart the store shows no snapshot of
/// the broken attempt (it waits to be resumed) while the earlier snapshot is intact.
#[test]
fn daemon_gone_mid_ingest_leaves_the_source_host_as_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let size = 256 * MIB;
    let Some(fs) = Ext4::new(root, size) else { return };
    // Enough data that the ingest takes a while.
    let data: Vec<u8> = (0..200 * MIB).map(|i| u8::try_from((i * 7 + i / 4096) % 251).unwrap_or(0) | 1).collect();
    std::fs::write(fs.mnt.join("big.bin"), &data).expect("write big file");
    let sync = Command::new("sync").status().expect("sync");
    assert!(sync.success());
    let mut d = Daemon::start_in(root);
    d.cli_ok(&["source", "create", "prod", "--size", &size.to_string()]);
    let written = |d: &Daemon| forkd_tests::metric_value(&d.metrics(), "forkd_written_bytes_total");
    let child = Command::new(d.bin())
        .arg("--api")
        .arg(d.url())
        .args(["ingest", "prod", "--from", &fs.dev, "--freeze", utf8(&fs.mnt)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let start = std::time::Instant::now();
    while written(&d) < (16 * MIB) as f64 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(2));
    }
    d.kill9();
    let out = wait_bounded(child, Duration::from_secs(60));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("forkd: error:")).collect();
    assert_eq!(errors.len(), 1, "one clear error line: {err}");
    let m = fs.mnt.display();
    assert!(err.contains(&format!("thawed {m}")), "{err}");
    assert!(fs.write_within("after.txt", b"the source host is as it was\n", Duration::from_secs(10)), "still frozen");
    d.restart();
    let show = d.cli_json(&["show", "prod"]);
    assert_eq!(show["snapshots"].as_array().map_or(0, Vec::len), 0, "no snapshot of the broken ingest: {show}");
    // The interrupted ingest resumes to completion.
    let out = d.cli(&["ingest", "prod", "--from", &fs.dev, "--freeze", utf8(&fs.mnt)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let show = d.cli_json(&["show", "prod"]);
    assert_eq!(show["snapshots"].as_array().map_or(0, Vec::len), 1);
}
