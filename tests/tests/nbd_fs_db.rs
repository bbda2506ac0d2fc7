//! A real filesystem and a real database on forkd clones over NBD.
//!
//! There is no kernel NBD client here, so a volume is attached as TESTING.md describes:
//! qemu-storage-daemon connects to forkd's NBD export and exposes it as a file through its FUSE
//! export, and a loop device turns the file into a block device. On it: ext4 and PostgreSQL 15
//! loaded by `pgbench -i -s 5` plus some transactions. Then `forkd snapshot` and `forkd clone`
//! give a copy that must hold exactly the same database, whose own changes must not reach the
//! snapshot it came from.
//!
//! Needs root, /dev/fuse, loop devices, qemu-storage-daemon, e2fsprogs and PostgreSQL 15 under
//! /usr/lib/postgresql/15/bin with a `postgres` user; a missing piece fails the test with a
//! message saying what to install. Everything the test sets up (postgres, mounts, loop devices,
//! qemu-storage-daemon, forkd) is torn down by Drop guards, also when it fails.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use forkd_tests::{free_port, run_bounded, run_with_deadline, Daemon};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const GIB: u64 = 1 << 30;
/// Bound for the slow commands (initdb, pgbench -i, mkfs).
const SLOW: Duration = Duration::from_secs(300);
/// Bound for the quick ones (mount, losetup, queries).
const QUICK: Duration = Duration::from_secs(60);
/// Bound on waiting for the FUSE export to appear.
const ATTACH_WAIT: Duration = Duration::from_secs(30);

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Run a command (bounded); it must succeed. Returns stdout.
#[track_caller]
fn run_ok(cmd: &mut Command, timeout: Duration) -> String {
    let what = format!("{cmd:?}");
    let out = run_bounded(cmd, timeout);
    assert!(out.status.success(), "{what} failed with {}\n{}", out.status, text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn in_path(name: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file())).unwrap_or(false)
        || ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].iter().any(|d| Path::new(d).join(name).is_file())
}

/// Everything this test needs, or a panic saying what is missing.
fn preflight() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "nbd_fs_db needs root (loop devices, mount, FUSE)");
    assert!(Path::new("/dev/fuse").exists(), "nbd_fs_db needs FUSE: /dev/fuse is missing");
    assert!(Path::new("/dev/loop-control").exists(), "nbd_fs_db needs loop devices: /dev/loop-control is missing");
    for (bin, package) in [
        ("qemu-storage-daemon", "qemu-utils"),
        ("losetup", "mount"),
        ("mount", "mount"),
        ("umount", "mount"),
        ("mkfs.ext4", "e2fsprogs"),
        ("runuser", "util-linux"),
    ] {
        assert!(in_path(bin), "nbd_fs_db needs {bin}: apt-get install -y {package} (see /work/shared/TESTING.md)");
    }
    for bin in ["initdb", "pg_ctl", "pgbench", "psql"] {
        assert!(
            Path::new(PG_BIN).join(bin).is_file(),
            "nbd_fs_db needs PostgreSQL 15: {PG_BIN}/{bin} is missing (apt-get install -y postgresql-15)"
        );
    }
    let id = run_bounded(Command::new("id").arg("-u").arg("postgres"), QUICK);
    assert!(id.status.success(), "nbd_fs_db needs a `postgres` user: {}", text(&id));
}

fn mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let p = path.to_str().unwrap_or("");
    mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(p))
}

/// A running qemu-storage-daemon exporting an NBD export as a FUSE file.
struct Qsd {
    child: Option<Child>,
    file: PathBuf,
    log: PathBuf,
}

impl Qsd {
    /// Attach `export` of the NBD server on `port` at `file` (created here), writable or not;
    /// waits (bounded) until the FUSE file shows the volume's size.
    fn start(port: u16, export: &str, file: &Path, writable: bool, size: u64) -> Qsd {
        std::fs::write(file, b"").unwrap_or_else(|e| panic!("create {}: {e}", file.display()));
        let log = file.with_extension("qsd.log");
        let out = OpenOptions::new().create(true).append(true).open(&log).expect("qsd log");
        let err = out.try_clone().expect("clone fd");
        let ro = if writable { "" } else { ",read-only=on" };
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=nbd,node-name=n0{ro},server.type=inet,server.host=127.0.0.1,server.port={port},export={export}"
            ))
            .arg("--export")
            .arg(format!(
                "type=fuse,id=e0,node-name=n0,mountpoint={},writable={}",
                file.display(),
                if writable { "on" } else { "off" }
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run qemu-storage-daemon: {e}"));
        let mut q = Qsd { child: Some(child), file: file.to_path_buf(), log };
        let started = Instant::now();
        loop {
            if let Some(st) = q.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                q.child = None;
                panic!(
                    "qemu-storage-daemon for {export} exited with {st}:\n{}",
                    std::fs::read_to_string(&q.log).unwrap_or_default()
                );
            }
            let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
            if mounted(file) && len == size {
                return q;
            }
            assert!(
                started.elapsed() < ATTACH_WAIT,
                "the FUSE export of {export} at {} did not come up within {ATTACH_WAIT:?} (mounted: {}, size {len}):\n{}",
                file.display(),
                mounted(file),
                std::fs::read_to_string(&q.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait (bounded); then make sure the FUSE mount is gone. `true` if it exited
    /// by itself in time.
    fn shutdown(&mut self) -> bool {
        let mut clean = true;
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let started = Instant::now();
            loop {
                match child.try_wait() {
                    Ok(Some(st)) => {
                        clean = st.success();
                        break;
                    }
                    Ok(None) if started.elapsed() < Duration::from_secs(15) => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        clean = false;
                        break;
                    }
                }
            }
        }
        if mounted(&self.file) {
            let _ = run_with_deadline(Command::new("umount").arg("-l").arg(&self.file), QUICK);
        }
        clean
    }

    /// Stop; it must exit cleanly.
    fn stop(mut self) {
        let clean = self.shutdown();
        assert!(
            clean,
            "qemu-storage-daemon did not stop cleanly:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A loop device over a file.
struct Loop {
    dev: Option<String>,
}

impl Loop {
    fn attach(file: &Path, read_only: bool) -> Loop {
        let mut cmd = Command::new("losetup");
        if read_only {
            cmd.arg("-r");
        }
        let dev = run_ok(cmd.arg("-f").arg("--show").arg(file), QUICK).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        Loop { dev: Some(dev) }
    }

    fn dev(&self) -> &str {
        self.dev.as_deref().expect("attached")
    }

    fn detach(mut self) {
        let dev = self.dev.take().expect("attached");
        run_ok(Command::new("losetup").arg("-d").arg(&dev), QUICK);
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Some(dev) = self.dev.take() {
            let _ = run_with_deadline(Command::new("losetup").arg("-d").arg(&dev), QUICK);
        }
    }
}

/// A mounted filesystem.
struct Mount {
    dir: Option<PathBuf>,
}

impl Mount {
    fn new(dev: &str, dir: &Path, options: Option<&str>) -> Mount {
        std::fs::create_dir_all(dir).expect("mountpoint");
        let mut cmd = Command::new("mount");
        if let Some(o) = options {
            cmd.arg("-o").arg(o);
        }
        run_ok(cmd.arg(dev).arg(dir), QUICK);
        Mount { dir: Some(dir.to_path_buf()) }
    }

    fn unmount(mut self) {
        let dir = self.dir.take().expect("mounted");
        run_ok(Command::new("umount").arg(&dir), QUICK);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let ok = run_with_deadline(Command::new("umount").arg(&dir), QUICK).is_ok_and(|o| o.status.success());
            if !ok {
                let _ = run_with_deadline(Command::new("umount").arg("-l").arg(&dir), QUICK);
            }
        }
    }
}

/// A command run as the `postgres` user from `cwd`.
fn as_postgres(bin: &str, cwd: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.arg("-u").arg("postgres").arg("--").arg(Path::new(PG_BIN).join(bin)).current_dir(cwd);
    c
}

/// A running PostgreSQL on a data directory, listening on a unix socket only.
struct Postgres {
    data: PathBuf,
    sock: PathBuf,
    port: u16,
    running: bool,
}

impl Postgres {
    fn start(data: &Path, sock: &Path) -> Postgres {
        let port = free_port();
        let mut pg = Postgres { data: data.to_path_buf(), sock: sock.to_path_buf(), port, running: true };
        let log = sock.join(format!("pg-{port}.log"));
        let out = run_bounded(
            as_postgres("pg_ctl", sock)
                .arg("-D")
                .arg(data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "120"])
                .arg("-o")
                .arg(format!("-k {} -p {port} -c listen_addresses=''", sock.display()))
                .arg("start"),
            SLOW,
        );
        if !out.status.success() {
            let l = std::fs::read_to_string(&log).unwrap_or_default();
            panic!(
                "pg_ctl start on {} failed with {}\n{}\n--- server log ---\n{l}",
                data.display(),
                out.status,
                text(&out)
            );
        }
        pg.running = true;
        pg
    }

    /// One value from psql (`-At`).
    fn query(&self, sql: &str) -> String {
        run_ok(
            as_postgres("psql", &self.sock).arg("-h").arg(&self.sock).arg("-p").arg(self.port.to_string()).args([
                "-U",
                "postgres",
                "-X",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
                "postgres",
            ]),
            QUICK,
        )
        .trim()
        .to_string()
    }

    fn pgbench(&self, args: &[&str]) -> String {
        run_ok(
            as_postgres("pgbench", &self.sock)
                .arg("-h")
                .arg(&self.sock)
                .arg("-p")
                .arg(self.port.to_string())
                .args(["-U", "postgres"])
                .args(args)
                .arg("postgres"),
            SLOW,
        )
    }

    fn pg_ctl_stop(&mut self, mode: &str) -> Result<Output, Output> {
        self.running = false;
        run_with_deadline(
            as_postgres("pg_ctl", &self.sock).arg("-D").arg(&self.data).args(["-m", mode, "-w", "-t", "60", "stop"]),
            Duration::from_secs(90),
        )
    }

    /// Clean shutdown (`-m fast`), which must succeed.
    fn stop(mut self) {
        let out = self.pg_ctl_stop("fast");
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) | Err(o) => panic!("pg_ctl stop failed: {}", text(&o)),
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let ok = self.pg_ctl_stop("immediate").is_ok_and(|o| o.status.success());
        if !ok {
            // Last resort: the postmaster's pid from its pid file.
            let pid = std::fs::read_to_string(self.data.join("postmaster.pid"))
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
            if let Some(pid) = pid {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

/// What the test remembers of a database.
#[derive(Debug, PartialEq, Eq)]
struct DbState {
    accounts: String,
    balance_sum: String,
    history: String,
}

fn db_state(pg: &Postgres) -> DbState {
    DbState {
        accounts: pg.query("select count(*) from pgbench_accounts"),
        balance_sum: pg.query("select sum(abalance) from pgbench_accounts"),
        history: pg.query("select count(*) from pgbench_history"),
    }
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {} {mode:o}: {e}", p.display()));
}

#[test]
fn ext4_and_postgres_on_a_clone_then_on_a_clone_of_its_snapshot() {
    preflight();
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    chmod(root, 0o755); // the postgres user must reach the mounts and the socket directory
    let sock = root.join("sock");
    std::fs::create_dir(&sock).expect("socket dir");
    chmod(&sock, 0o777);
    let d = Daemon::start_in(root);
    let port = d.nbd_port();
    d.cli_ok(&["source", "create", "base", "--size", "1G"]);
    d.cli_ok(&["clone", "base", "pgdata"]);

    // 1. pgdata: ext4, initdb, pgbench -i -s 5 and some transactions.
    let mnt = root.join("mnt-pgdata");
    let pgdir = mnt.join("pg");
    let datadir = pgdir.join("data");
    let original = {
        let qsd = Qsd::start(port, "pgdata", &root.join("pgdata.img"), true, GIB);
        let lo = Loop::attach(&qsd.file, false);
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(lo.dev()), SLOW);
        let m = Mount::new(lo.dev(), &mnt, None);
        std::fs::create_dir(&pgdir).expect("mkdir pg");
        run_ok(Command::new("chown").arg("postgres:").arg(&pgdir), QUICK);
        chmod(&pgdir, 0o700);
        run_ok(as_postgres("initdb", &sock).arg("-D").arg(&datadir).args(["-A", "trust", "-U", "postgres"]), SLOW);
        let pg = Postgres::start(&datadir, &sock);
        pg.pgbench(&["-i", "-s", "5", "-q"]);
        let out = pg.pgbench(&["-n", "-c", "2", "-t", "150"]);
        assert!(out.contains("number of failed transactions: 0"), "pgbench on pgdata:\n{out}");
        let state = db_state(&pg);
        println!("pgdata: {state:?}");
        assert_eq!(state.accounts, "500000", "pgbench -i -s 5 makes 500000 accounts");
        assert_eq!(state.history, "300", "2 clients x 150 transactions");
        pg.query("checkpoint");
        pg.stop();
        m.unmount();
        lo.detach();
        run_ok(&mut Command::new("sync"), QUICK);
        qsd.stop();
        state
    };

    // 2. Snapshot it and clone the snapshot.
    let out = d.cli_ok(&["snapshot", "pgdata"]);
    assert!(out.contains("pgdata@1"), "forkd snapshot pgdata: {out}");
    d.cli_ok(&["clone", "pgdata@1", "pgcopy"]);

    // 3. pgcopy holds the same database; then change it.
    let mnt = root.join("mnt-pgcopy");
    let datadir = mnt.join("pg").join("data");
    {
        let qsd = Qsd::start(port, "pgcopy", &root.join("pgcopy.img"), true, GIB);
        let lo = Loop::attach(&qsd.file, false);
        let m = Mount::new(lo.dev(), &mnt, None);
        let pg = Postgres::start(&datadir, &sock);
        let copy = db_state(&pg);
        assert_eq!(copy, original, "the clone of pgdata@1 holds another database");
        let out = pg.pgbench(&["-n", "-c", "2", "-t", "100"]);
        assert!(out.contains("number of failed transactions: 0"), "pgbench on pgcopy:\n{out}");
        let changed = db_state(&pg);
        println!("pgcopy after pgbench: {changed:?}");
        assert_eq!(changed.accounts, "500000");
        assert_eq!(changed.history, "500", "300 + 2 clients x 100 transactions");
        pg.query("create table only_in_pgcopy(x int)");
        pg.stop();
        m.unmount();
        lo.detach();
        run_ok(&mut Command::new("sync"), QUICK);
        qsd.stop();
    }

    // 4. The snapshot is unaffected: read-only mount of pgdata@1 ...
    let mnt = root.join("mnt-snap");
    {
        let qsd = Qsd::start(port, "pgdata@1", &root.join("pgdata1.img"), false, GIB);
        let lo = Loop::attach(&qsd.file, true);
        let m = Mount::new(lo.dev(), &mnt, Some("ro,noload"));
        let version = std::fs::read_to_string(mnt.join("pg/data/PG_VERSION")).expect("PG_VERSION on pgdata@1");
        assert_eq!(version.trim(), "15");
        assert!(!mnt.join("pg/data/postmaster.pid").exists(), "pgdata@1 was snapshotted with postgres stopped");
        m.unmount();
        lo.detach();
        qsd.stop();
    }
    // ... and a fresh clone of it has the original database, without pgcopy's changes.
    d.cli_ok(&["clone", "pgdata@1", "pgcheck"]);
    let mnt = root.join("mnt-pgcheck");
    let datadir = mnt.join("pg").join("data");
    {
        let qsd = Qsd::start(port, "pgcheck", &root.join("pgcheck.img"), true, GIB);
        let lo = Loop::attach(&qsd.file, false);
        let m = Mount::new(lo.dev(), &mnt, None);
        let pg = Postgres::start(&datadir, &sock);
        assert_eq!(db_state(&pg), original, "pgdata@1 changed after pgbench ran on its clone pgcopy");
        assert_eq!(pg.query("select count(*) from pg_tables where tablename = 'only_in_pgcopy'"), "0");
        pg.stop();
        m.unmount();
        lo.detach();
        qsd.stop();
    }
    assert!(d.api().ready(), "the daemon stopped answering");
    let metrics = d.metrics();
    assert!(metrics.contains("forkd_nbd_connections"), "no NBD metrics:\n{metrics}");
}
