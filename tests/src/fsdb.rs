//! Shared by the tests that put a filesystem and PostgreSQL on forkd volumes: attaching a
//! volume through qemu-storage-daemon's FUSE export and a loop device (there is no kernel NBD
//! client here, see TESTING.md), mounting, and running PostgreSQL 15 as user `postgres`. Every
//! piece is torn down by its Drop guard, also when a test fails.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, run_bounded, run_with_deadline};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
pub const GIB: u64 = 1 << 30;
/// Bound for the slow commands (initdb, pgbench -i, mkfs).
pub const SLOW: Duration = Duration::from_secs(300);
/// Bound for the quick ones (mount, losetup, queries).
pub const QUICK: Duration = Duration::from_secs(60);
/// Bound on waiting for the FUSE export to appear.
pub const ATTACH_WAIT: Duration = Duration::from_secs(30);

pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Run a command (bounded); it must succeed. Returns stdout.
#[track_caller]
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> String {
    let what = format!("{cmd:?}");
    let out = run_bounded(cmd, timeout);
    assert!(out.status.success(), "{what} failed with {}\n{}", out.status, text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn in_path(name: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file())).unwrap_or(false)
        || ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].iter().any(|d| Path::new(d).join(name).is_file())
}

/// Everything this test needs, or a panic saying what is missing.
pub fn preflight(test: &str) {
    let euid = nix::unistd::geteuid().as_raw();
    assert_eq!(euid, 0, "{test} needs root (loop devices, mount, FUSE)");
    assert!(Path::new("/dev/fuse").exists(), "{test} needs FUSE: /dev/fuse is missing");
    assert!(Path::new("/dev/loop-control").exists(), "{test} needs loop devices: /dev/loop-control is missing");
    for (bin, package) in [
        ("qemu-storage-daemon", "qemu-utils"),
        ("losetup", "mount"),
        ("mount", "mount"),
        ("umount", "mount"),
        ("mkfs.ext4", "e2fsprogs"),
        ("runuser", "util-linux"),
    ] {
        assert!(in_path(bin), "{test} needs {bin}: apt-get install -y {package} (see /work/shared/TESTING.md)");
    }
    for bin in ["initdb", "pg_ctl", "pgbench", "psql"] {
        assert!(
            Path::new(PG_BIN).join(bin).is_file(),
            "{test} needs PostgreSQL 15: {PG_BIN}/{bin} is missing (apt-get install -y postgresql-15)"
        );
    }
    let id = run_bounded(Command::new("id").arg("-u").arg("postgres"), QUICK);
    assert!(id.status.success(), "{test} needs a `postgres` user: {}", text(&id));
}

pub fn mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let p = path.to_str().unwrap_or("");
    mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(p))
}

/// A running qemu-storage-daemon exporting an NBD export as a FUSE file.
#[derive(Debug)]
pub struct Qsd {
    pub child: Option<Child>,
    pub file: PathBuf,
    pub log: PathBuf,
}

impl Qsd {
    /// Attach `export` of the NBD server on `port` at `file` (created here), writable or not;
    /// waits (bounded) until the FUSE file shows the volume's size.
    pub fn start(port: u16, export: &str, file: &Path, writable: bool, size: u64) -> Qsd {
        let ro = if writable { "" } else { ",read-only=on" };
        let blockdev = format!(
            "driver=nbd,node-name=n0{ro},server.type=inet,server.host=127.0.0.1,server.port={port},export={export}"
        );
        Qsd::spawn(&blockdev, export, file, writable, size)
    }

    /// Attach iSCSI target `target` (LUN 0) of the portal `127.0.0.1:port` through qemu's
    /// iSCSI driver (qemu-block-extra) at `file`, like [`Qsd::start`]. `options` are appended
    /// to the blockdev (e.g. `,discard=unmap`). A read-only attach sets `read-only=on`, which
    /// qemu needs for a write-protected LUN.
    pub fn start_iscsi(port: u16, target: &str, file: &Path, writable: bool, size: u64, options: &str) -> Qsd {
        let ro = if writable { "" } else { ",read-only=on" };
        let blockdev = format!(
            "driver=iscsi,node-name=n0{ro},transport=tcp,portal=127.0.0.1:{port},target={target},lun=0{options}"
        );
        Qsd::spawn(&blockdev, target, file, writable, size)
    }

    /// SIGKILL, then make sure the FUSE mount is gone: for a qemu-storage-daemon whose target
    /// went away (it retries the login forever and does not stop on SIGTERM).
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.shutdown();
    }

    fn spawn(blockdev: &str, export: &str, file: &Path, writable: bool, size: u64) -> Qsd {
        std::fs::write(file, b"").unwrap_or_else(|e| panic!("create {}: {e}", file.display()));
        let log = file.with_extension("qsd.log");
        let out = OpenOptions::new().create(true).append(true).open(&log).expect("qsd log");
        let err = out.try_clone().expect("clone fd");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(blockdev)
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
    pub fn shutdown(&mut self) -> bool {
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
    pub fn stop(mut self) {
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
#[derive(Debug)]
pub struct Loop {
    pub dev: Option<String>,
}

impl Loop {
    pub fn attach(file: &Path, read_only: bool) -> Loop {
        let mut cmd = Command::new("losetup");
        if read_only {
            cmd.arg("-r");
        }
        let dev = run_ok(cmd.arg("-f").arg("--show").arg(file), QUICK).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        Loop { dev: Some(dev) }
    }

    pub fn dev(&self) -> &str {
        self.dev.as_deref().expect("attached")
    }

    pub fn detach(mut self) {
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
#[derive(Debug)]
pub struct Mount {
    pub dir: Option<PathBuf>,
}

impl Mount {
    pub fn new(dev: &str, dir: &Path, options: Option<&str>) -> Mount {
        std::fs::create_dir_all(dir).expect("mountpoint");
        let mut cmd = Command::new("mount");
        if let Some(o) = options {
            cmd.arg("-o").arg(o);
        }
        run_ok(cmd.arg(dev).arg(dir), QUICK);
        Mount { dir: Some(dir.to_path_buf()) }
    }

    pub fn unmount(mut self) {
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
pub fn as_postgres(bin: &str, cwd: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.arg("-u").arg("postgres").arg("--").arg(Path::new(PG_BIN).join(bin)).current_dir(cwd);
    c
}

/// A running PostgreSQL on a data directory, listening on a unix socket only.
#[derive(Debug)]
pub struct Postgres {
    pub data: PathBuf,
    pub sock: PathBuf,
    pub port: u16,
    pub running: bool,
}

impl Postgres {
    pub fn start(data: &Path, sock: &Path) -> Postgres {
        Postgres::start_on(data, sock, free_port())
    }

    /// [`Postgres::start`] on a chosen port.
    pub fn start_on(data: &Path, sock: &Path, port: u16) -> Postgres {
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
    pub fn query(&self, sql: &str) -> String {
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

    pub fn pgbench(&self, args: &[&str]) -> String {
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

    pub fn pg_ctl_stop(&mut self, mode: &str) -> Result<Output, Output> {
        self.running = false;
        run_with_deadline(
            as_postgres("pg_ctl", &self.sock).arg("-D").arg(&self.data).args(["-m", mode, "-w", "-t", "60", "stop"]),
            Duration::from_secs(90),
        )
    }

    /// Clean shutdown (`-m fast`), which must succeed.
    pub fn stop(mut self) {
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
pub struct DbState {
    pub accounts: String,
    pub balance_sum: String,
    pub history: String,
}

pub fn db_state(pg: &Postgres) -> DbState {
    DbState {
        accounts: pg.query("select count(*) from pgbench_accounts"),
        balance_sum: pg.query("select sum(abalance) from pgbench_accounts"),
        history: pg.query("select count(*) from pgbench_history"),
    }
}

pub fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {} {mode:o}: {e}", p.display()));
}
