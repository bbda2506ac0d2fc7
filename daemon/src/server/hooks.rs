//! Hook scripts (issue 11, first part): finding a script in the daemon's `hooks_dir` by name and
//! running it safely. Which hook runs at which event of which volume is not wired yet.
//!
//! A hook is named, never given as code or a path: [`HookRunner::resolve`] accepts a plain file
//! name and refuses a name with a `/`, `.` or `..`, a file that is missing, not a regular
//! file, not executable, writable by others, or (through a symlink) outside `hooks_dir`, and a
//! `hooks_dir` writable by others. The check is made when a hook is set and again at every
//! run, because the file can change in between.
//!
//! [`HookRunner::run`] starts the script with a clean environment: `PATH` and the event's
//! `FORKD_*` variables only. It runs in its own process group, as `hook_user` when the daemon
//! runs as root, with stdin from `/dev/null`, and `hooks_dir` as its working directory. Its
//! stdout and stderr are read as they come, so a chatty script never blocks. The first
//! [`OUTPUT_LIMIT`] bytes of each are kept; the rest is counted and dropped. At the timeout
//! the whole process group is killed. When the script exits, the rest of its group is killed
//! too, so a child that would outlive it (a daemon it forgot to detach, a `sleep &`) cannot
//! hold the output pipes open or run on unsupervised.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::{Pid, User};

/// Bytes of stdout, and of stderr, kept from one run.
pub const OUTPUT_LIMIT: usize = 64 << 10;
/// A hook's timeout when none is set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Why a hook could not be set or run.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The name is not a plain file name.
    #[error("hook `{0}`: give the name of a script in the hooks directory, not a path")]
    BadName(String),
    /// The script is not there, or not usable.
    #[error("hook `{name}`: {why}")]
    Refused {
        /// The script's name.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// The script could not be started.
    #[error("hook `{name}` could not be started: {source}")]
    Spawn {
        /// The script's name.
        name: String,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// What one run of a hook did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HookRun {
    /// The script's name.
    pub script: String,
    /// Its exit code, if it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// True if it was killed at its timeout.
    pub timed_out: bool,
    /// Wall time, in milliseconds.
    pub duration_ms: u64,
    /// The first [`OUTPUT_LIMIT`] bytes of its stdout, lossily decoded.
    pub stdout: String,
    /// The first [`OUTPUT_LIMIT`] bytes of its stderr.
    pub stderr: String,
    /// Output bytes dropped past the limits.
    pub dropped_bytes: u64,
}

impl HookRun {
    /// True when the hook exited 0 in time.
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }

    /// One line saying how it ended, for errors and the log.
    pub fn outcome(&self) -> String {
        match (self.timed_out, self.exit_code, self.signal) {
            (true, ..) => format!("timed out after {} ms and was killed", self.duration_ms),
            (false, Some(0), _) => "succeeded".into(),
            (false, Some(c), _) => format!("exited with status {c}"),
            (false, None, Some(s)) => format!("was killed by signal {s}"),
            (false, None, None) => "ended without a status".into(),
        }
    }
}

/// Finds and runs hook scripts of one hooks directory.
#[derive(Debug, Clone)]
pub struct HookRunner {
    dir: PathBuf,
    /// The user hooks run as (when the daemon is root).
    user: Option<(u32, u32)>,
}

impl HookRunner {
    /// Hooks from `dir`, run as `hook_user` when the daemon runs as root (an unknown user is an
    /// error; `None` picks `nobody` where it exists).
    pub fn new(dir: &Path, hook_user: Option<&str>) -> Result<HookRunner, String> {
        let user = if nix::unistd::geteuid().is_root() {
            let name = hook_user.unwrap_or("nobody");
            match User::from_name(name) {
                Ok(Some(u)) => Some((u.uid.as_raw(), u.gid.as_raw())),
                Ok(None) if hook_user.is_none() => None,
                _ => return Err(format!("hook_user `{name}` is not a user on this host")),
            }
        } else {
            None
        };
        Ok(HookRunner { dir: dir.to_path_buf(), user })
    }

    /// The script called `name`, checked (see the module documentation).
    pub fn resolve(&self, name: &str) -> Result<PathBuf, HookError> {
        if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
            return Err(HookError::BadName(name.to_string()));
        }
        let refuse = |why: String| HookError::Refused { name: name.to_string(), why };
        let dir = std::fs::canonicalize(&self.dir)
            .map_err(|e| refuse(format!("the hooks directory {} cannot be used: {e}", self.dir.display())))?;
        let dm = std::fs::metadata(&dir).map_err(|e| refuse(format!("the hooks directory: {e}")))?;
        if dm.permissions().mode() & 0o002 != 0 {
            return Err(refuse(format!("the hooks directory {} is writable by others", dir.display())));
        }
        let path = std::fs::canonicalize(dir.join(name))
            .map_err(|_| refuse(format!("there is no such script in {}", dir.display())))?;
        if path.parent() != Some(dir.as_path()) {
            return Err(refuse(format!("it leads outside {}", dir.display())));
        }
        let m = std::fs::metadata(&path).map_err(|e| refuse(e.to_string()))?;
        let mode = m.permissions().mode();
        if !m.is_file() {
            return Err(refuse("it is not a regular file".into()));
        }
        if mode & 0o111 == 0 {
            return Err(refuse("it is not executable".into()));
        }
        if mode & 0o002 != 0 {
            return Err(refuse("it is writable by others".into()));
        }
        if m.uid() != 0 && m.uid() != nix::unistd::geteuid().as_raw() {
            return Err(refuse("it belongs neither to root nor to the daemon's user".into()));
        }
        Ok(path)
    }

    /// Run the script `name` with the variables `vars` (names without checks: the caller sets
    /// only `FORKD_*`), killing it and its process group at `timeout`.
    pub fn run(&self, name: &str, vars: &[(String, String)], timeout: Duration) -> Result<HookRun, HookError> {
        let path = self.resolve(name)?;
        let mut cmd = Command::new(&path);
        cmd.env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|source| HookError::Spawn { name: name.to_string(), source })?;
        let out = child.stdout.take().map(read_bounded);
        let err = child.stderr.take().map(read_bounded);
        let (status, timed_out) = wait_or_kill(&mut child, timeout);
        // Whatever the script left behind in its group goes with it (and lets the pipes close).
        let _ = killpg(Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX)), Signal::SIGKILL);
        let (stdout, d1) = join(out);
        let (stderr, d2) = join(err);
        Ok(HookRun {
            script: name.to_string(),
            exit_code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            timed_out,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            stdout,
            stderr,
            dropped_bytes: d1 + d2,
        })
    }
}

/// Wait for `child` until `timeout`; then kill its process group and reap it.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> (Option<std::process::ExitStatus>, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return (Some(status), false),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = killpg(Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX)), Signal::SIGKILL);
                return (child.wait().ok(), true);
            }
        }
    }
}

/// Read a pipe to its end on a thread, keeping the first [`OUTPUT_LIMIT`] bytes.
fn read_bounded(mut r: impl Read + Send + 'static) -> JoinHandle<(Vec<u8>, u64)> {
    std::thread::spawn(move || {
        let (mut kept, mut dropped) = (Vec::new(), 0u64);
        let mut buf = [0u8; 8192];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            let room = OUTPUT_LIMIT.saturating_sub(kept.len()).min(n);
            kept.extend_from_slice(&buf[..room]);
            dropped += (n - room) as u64;
        }
        (kept, dropped)
    })
}

fn join(h: Option<JoinHandle<(Vec<u8>, u64)>>) -> (String, u64) {
    match h.map(JoinHandle::join) {
        Some(Ok((kept, dropped))) => (String::from_utf8_lossy(&kept).into_owned(), dropped),
        _ => (String::new(), 0),
    }
}
