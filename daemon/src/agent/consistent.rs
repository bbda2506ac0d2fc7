//! `forkd ingest --lvm VG/LV` and `--freeze MOUNTPOINT`: a consistent point in time on the
//! source host.
//!
//! Each step that changes the host (`fsfreeze -f`, `lvcreate -s`) registers its undo
//! (`fsfreeze -u`, `lvremove -y`) in one process-wide list, owned by a [`Guard`]. The undo runs
//! exactly once: when the guard is dropped (success or error), or, on SIGINT/SIGTERM, from a
//! dedicated signal thread that undoes everything still pending and exits with 130/143. The
//! list's lock is held while a step runs, so a signal arriving mid-`lvcreate` waits for it and
//! then removes the snapshot rather than leaking it.
//!
//! With both flags the filesystem is frozen only for the instant of `lvcreate` and the read
//! comes from the snapshot; with `--freeze` alone the whole read happens while frozen.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, Once};

use anyhow::{anyhow, bail};
use nix::sys::signal::{SigSet, Signal};

/// One pending undo: its id, the command, and what to print once it ran.
struct Undo {
    id: u64,
    argv: Vec<String>,
    done: String,
}

/// Undo commands not yet run, in the order their steps ran.
static PENDING: Mutex<Vec<Undo>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static SIGNALS: Once = Once::new();

fn pending() -> MutexGuard<'static, Vec<Undo>> {
    PENDING.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Block SIGINT/SIGTERM in this thread (and so in every thread spawned after it) and wait for
/// them on a dedicated thread that runs the pending undos and exits. Call before spawning
/// other threads.
fn install_signal_thread() -> anyhow::Result<()> {
    let mut err = None;
    SIGNALS.call_once(|| {
        let mut set = SigSet::empty();
        set.add(Signal::SIGINT);
        set.add(Signal::SIGTERM);
        if let Err(e) = set.thread_block() {
            err = Some(anyhow!("cannot block SIGINT/SIGTERM: {e}"));
            return;
        }
        std::thread::spawn(move || {
            let sig = set.wait().unwrap_or(Signal::SIGTERM);
            // Holding the lock until exit: a guard being dropped concurrently waits, so
            // every undo runs exactly once and the process never exits 0 in between.
            let mut list = pending();
            eprintln!("forkd: interrupted by {sig}, cleaning up");
            while let Some(u) = list.pop() {
                run_undo(&u);
            }
            std::process::exit(128 + sig as i32);
        });
    });
    err.map_or(Ok(()), Err)
}

/// Run a command; `Err` is one line: the last line of its stderr, or how it failed. A program
/// file that another process still holds open for writing (ETXTBSY: one forked while it was
/// being written, not yet at its own exec) is tried again for up to about a second.
fn run(argv: &[String]) -> Result<(), String> {
    let (prog, rest) = argv.split_first().ok_or("empty command")?;
    let output = || Command::new(prog).args(rest).stdin(std::process::Stdio::null()).output();
    let mut result = output();
    for attempt in 1..=10 {
        match &result {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(std::time::Duration::from_millis(20 * attempt));
                result = output();
            }
            _ => break,
        }
    }
    match result {
        Err(e) => Err(format!("cannot run {prog}: {e}")),
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr.lines().rev().map(str::trim).find(|l| !l.is_empty());
            Err(match last {
                Some(l) => format!("{prog} failed: {l}"),
                None => format!("{prog} failed with {}", out.status),
            })
        }
    }
}

fn run_undo(u: &Undo) {
    match run(&u.argv) {
        Ok(()) => eprintln!("{}", u.done),
        Err(e) => eprintln!("forkd: warning: `{}`: {e}; undo it by hand", u.argv.join(" ")),
    }
}

/// A step taken on the host; dropping it runs its undo (unless the signal thread did).
#[derive(Debug)]
pub struct Guard {
    id: u64,
}

impl Guard {
    /// Run `step` (printing `done` on success) and register `undo` (printing `undone`), both
    /// under the lock so a signal cannot fall between them.
    fn take(step: &[String], done: String, undo: Vec<String>, undone: String) -> anyhow::Result<Guard> {
        let mut list = pending();
        run(step).map_err(|e| anyhow!("{e}"))?;
        eprintln!("{done}");
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        list.push(Undo { id, argv: undo, done: undone });
        Ok(Guard { id })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut list = pending();
        if let Some(i) = list.iter().position(|u| u.id == self.id) {
            let u = list.remove(i);
            run_undo(&u);
        }
    }
}

/// What `prepare` set up: the image to read and the guards to hold while reading it.
#[derive(Debug)]
pub struct Consistent {
    /// The path to read: the LVM snapshot's device, else `--from`.
    pub path: PathBuf,
    /// Dropped (last first) once the read is over.
    guards: Vec<Guard>,
}

impl Drop for Consistent {
    fn drop(&mut self) {
        while let Some(g) = self.guards.pop() {
            drop(g);
        }
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// A timestamp for snapshot names: `YYYYMMDDTHHMMSS` (UTC).
fn timestamp() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!("{:04}{:02}{:02}T{:02}{:02}{:02}", t.year(), t.month() as u8, t.day(), t.hour(), t.minute(), t.second())
}

/// Check `VG/LV` and split it.
fn split_vg_lv(lvm: &str) -> anyhow::Result<(&str, &str)> {
    let ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "+_.-".contains(c));
    match lvm.split_once('/') {
        Some((vg, lv)) if ok(vg) && ok(lv) => Ok((vg, lv)),
        _ => bail!("--lvm {lvm:?}: expected VG/LV (a volume group and a logical volume name)"),
    }
}

/// Drop the clean cached pages of a block device before reading it. The filesystem mounted on
/// it writes its data blocks past the device's own page cache, so pages cached by an earlier
/// read (say the previous ingest) can be stale; reading them would give an inconsistent image.
/// Errors (not a device, not there) are left to the read that follows.
fn drop_cached(path: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(f) = std::fs::File::open(path) {
        let _ = nix::fcntl::posix_fadvise(f.as_raw_fd(), 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    }
}

/// Take the consistent point in time `--lvm`/`--freeze` ask for; `from` is `--from`.
/// Without either flag this only returns `from`.
pub fn prepare(
    from: Option<&Path>,
    lvm: Option<&str>,
    freeze: Option<&Path>,
    snapshot_size: &str,
    prefix: &str,
) -> anyhow::Result<Consistent> {
    if lvm.is_none() && freeze.is_none() {
        let path = from.ok_or_else(|| anyhow!("ingest needs --from PATH"))?;
        // A block device may carry a mounted filesystem too (the caller holds a consistent
        // image by other means): never read stale cached pages of it.
        if std::fs::metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type())) {
            drop_cached(path);
        }
        return Ok(Consistent { path: path.to_path_buf(), guards: Vec::new() });
    }
    let lv = lvm.map(split_vg_lv).transpose()?;
    if lv.is_none() && from.is_none() {
        bail!("--freeze needs --from PATH: the device (or image) of the filesystem mounted there");
    }
    if let Some(mnt) = freeze {
        if !mnt.is_dir() {
            bail!("--freeze {}: not a directory (expected the filesystem's mount point)", mnt.display());
        }
    }
    install_signal_thread()?;
    let mut guards = Vec::new();
    if let Some(mnt) = freeze {
        let m = mnt.display().to_string();
        guards.push(Guard::take(
            &strings(&["fsfreeze", "-f", &m]),
            format!("froze {m}"),
            strings(&["fsfreeze", "-u", &m]),
            format!("thawed {m}"),
        )?);
    }
    let Some((vg, lv)) = lv else {
        // --freeze alone: the read itself happens while frozen.
        let path = from.ok_or_else(|| anyhow!("ingest needs --from PATH"))?.to_path_buf();
        drop_cached(&path);
        return Ok(Consistent { path, guards });
    };
    let name = format!("{prefix}-{}", timestamp());
    let snap = format!("{vg}/{name}");
    let origin = format!("{vg}/{lv}");
    let snapshot = Guard::take(
        &strings(&["lvcreate", "-s", "-n", &name, "-L", snapshot_size, &origin]),
        format!("created LVM snapshot {snap} of {origin}"),
        strings(&["lvremove", "-y", &snap]),
        format!("removed LVM snapshot {snap}"),
    )?;
    // Thaw right after lvcreate: the snapshot holds the frozen state.
    guards.clear();
    guards.push(snapshot);
    let dev_dir = std::env::var_os("FORKD_LVM_DEV_DIR").map_or_else(|| PathBuf::from("/dev"), PathBuf::from);
    Ok(Consistent { path: dev_dir.join(vg).join(&name), guards })
}
