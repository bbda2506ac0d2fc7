//! Shared helpers for the end-to-end tests: find the `forkd` binary, run a real daemon on its
//! own data directory and port, drive it with the real CLI and over HTTP, crash it and restart
//! it.
//!
//! Every wait is bounded in count and time. A [`Daemon`] kills its process when dropped, and
//! prints the daemon's log when it is dropped during a panic (a failing test).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a daemon may take to answer its first request.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful stop may take before the daemon is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest any single CLI command may run.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(120);
/// Block size of every forkd volume.
pub const BS: usize = 4096;

/// The `forkd` binary: `FORKD_BIN`, else `target/release/forkd`, else `target/debug/forkd`.
pub fn forkd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FORKD_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "FORKD_BIN={} is not a file: build the daemon first: cargo build --release", p.display());
        return p;
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for profile in ["release", "debug"] {
        let p = ws.join("target").join(profile).join("forkd");
        if p.is_file() {
            return p;
        }
    }
    panic!("build the daemon first: cargo build --release");
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Percent-encode one URL path segment (`@` becomes `%40`, `:` becomes `%3A`, ...).
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Bytes a directory tree takes on disk: the sum of `st_blocks * 512` (what `du` says).
pub fn disk_usage(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    let own = md.blocks() * 512;
    if md.is_dir() {
        let children: u64 = std::fs::read_dir(p).map(|d| d.flatten().map(|e| disk_usage(&e.path())).sum()).unwrap_or(0);
        own + children
    } else {
        own
    }
}

/// Bytes one file takes on disk (`st_blocks * 512`).
pub fn allocated_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display())).blocks() * 512
}

/// Run a command to completion, killing it (and panicking) after `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    run_with_deadline(cmd, timeout).unwrap_or_else(|out| {
        panic!(
            "{what} did not finish within {timeout:?}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Run a command to completion. If it is still running after `timeout` it is killed and
/// `Err` carries what it printed until then.
pub fn run_with_deadline(cmd: &mut Command, timeout: Duration) -> Result<Output, Output> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = pipe(child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let err = pipe(child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let (status, finished) = wait_or_kill(&mut child, timeout, &what);
    let output = Output { status, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default() };
    if finished {
        Ok(output)
    } else {
        Err(output)
    }
}

/// Wait for `child` (`what`, for messages) to exit: its status and true, or, still running
/// after `timeout`, it is killed: its status and false.
pub fn wait_or_kill(child: &mut Child, timeout: Duration, what: &str) -> (ExitStatus, bool) {
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return (st, true),
            Ok(None) if started.elapsed() < timeout => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                return (child.wait().unwrap_or_else(|e| panic!("waiting for {what}: {e}")), false);
            }
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    }
}

/// A `mask` hook body: replaces every character of every e-mail address in the first 4 KiB at
/// offsets 0 and 1 MiB with `x`, the `@` kept, over the NBD URI it is given (`nbdsh`).
pub const MASK_EMAILS: &str = r#"exec nbdsh -u "$FORKD_NBD_URI" -c '
import re
for off in (0, 1 << 20):
    b = bytes(h.pread(4096, off))
    b = re.sub(rb"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+", lambda m: re.sub(rb"[^@]", b"x", m.group(0)), b)
    h.pwrite(b, off)
h.flush()
'"#;

/// An HTTP answer: status and raw body (for any status, 2xx or not).
#[derive(Debug, Clone)]
pub struct Http {
    /// The HTTP status code.
    pub status: u16,
    /// The whole body.
    pub body: Vec<u8>,
}

impl Http {
    /// The body parsed as JSON (panics with the body if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("HTTP {} body is not JSON ({e}): {}", self.status, String::from_utf8_lossy(&self.body))
        })
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether the status is 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// An HTTP client for one daemon's API.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    agent: ureq::Agent,
}

impl Api {
    /// A client for `http://127.0.0.1:PORT`, with bounded timeouts.
    pub fn new(port: u16) -> Api {
        let agent =
            ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(5)).timeout(Duration::from_secs(60)).build();
        Api { base: format!("http://127.0.0.1:{port}"), agent }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Send a request; `Err` (a description) only for transport errors: daemon unreachable,
    /// connection reset, body cut short. Any HTTP status is an `Ok`.
    pub fn request(&self, method: &str, path: &str, body: Option<(&str, &[u8])>) -> Result<Http, String> {
        self.request_with(method, path, &[], body)
    }

    /// `GET path`, panicking on transport errors.
    pub fn get(&self, path: &str) -> Http {
        self.request("GET", path, None).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// `DELETE path`, panicking on transport errors.
    pub fn delete(&self, path: &str) -> Http {
        self.request("DELETE", path, None).unwrap_or_else(|e| panic!("DELETE {path}: {e}"))
    }

    /// `POST path` with a JSON body, panicking on transport errors.
    pub fn post_json(&self, path: &str, body: &Value) -> Http {
        let bytes = serde_json::to_vec(body).expect("json");
        self.request("POST", path, Some(("application/json", &bytes))).unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// `PUT path` with raw bytes, panicking on transport errors.
    pub fn put_bytes(&self, path: &str, body: &[u8]) -> Http {
        self.request("PUT", path, Some(("application/octet-stream", body)))
            .unwrap_or_else(|e| panic!("PUT {path}: {e}"))
    }

    /// `GET path` expecting 2xx and a JSON body.
    pub fn get_json(&self, path: &str) -> Value {
        let r = self.get(path);
        assert!(r.ok(), "GET {path}: HTTP {} {}", r.status, r.text());
        r.json()
    }

    /// `POST path` expecting 2xx and a JSON body.
    pub fn post_json_ok(&self, path: &str, body: &Value) -> Value {
        let r = self.post_json(path, body);
        assert!(r.ok(), "POST {path} {body}: HTTP {} {}", r.status, r.text());
        r.json()
    }

    /// Write `data` at `offset` of volume `name`, expecting 2xx.
    pub fn write(&self, name: &str, offset: u64, data: &[u8]) {
        let path = format!("/v1/volumes/{}/data?offset={offset}", enc(name));
        let r = self.put_bytes(&path, data);
        assert!(r.ok(), "PUT {path} ({} bytes): HTTP {} {}", data.len(), r.status, r.text());
    }

    /// Read `length` bytes at `offset` of a volume or snapshot, expecting 2xx. Reads larger
    /// than 64 MiB are split.
    pub fn read(&self, reference: &str, offset: u64, length: u64) -> Vec<u8> {
        const PIECE: u64 = 32 << 20;
        let mut out = Vec::with_capacity(usize::try_from(length).expect("length"));
        let mut off = offset;
        while off < offset + length {
            let n = PIECE.min(offset + length - off);
            let path = format!("/v1/volumes/{}/data?offset={off}&length={n}", enc(reference));
            let r = self.get(&path);
            assert!(r.ok(), "GET {path}: HTTP {} {}", r.status, r.text());
            assert_eq!(r.body.len() as u64, n, "GET {path}: wrong body length");
            out.extend_from_slice(&r.body);
            off += n;
        }
        out
    }

    /// Whether the daemon answers `GET /v1/volumes` with 200.
    pub fn ready(&self) -> bool {
        matches!(self.request("GET", "/v1/volumes", None), Ok(r) if r.status == 200)
    }
}

/// The low-space threshold of the tests' daemons (a `--low-space-threshold` flag overrides it):
/// none, so that how full the machine's disk is (builds share it) decides no test. The tests of
/// the threshold set their own.
const LOW_SPACE_THRESHOLD: &str = "0";

/// A running (or stopped) `forkd serve` on one data directory and one API port.
#[derive(Debug)]
pub struct Daemon {
    bin: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    port: u16,
    child: Option<Child>,
    api: Api,
}

impl Daemon {
    /// Start a daemon on `data_dir` (created by the daemon if missing) on a free port, logging
    /// to `log` (appended to across restarts). Waits until it answers.
    pub fn start(data_dir: &Path, log: &Path) -> Daemon {
        let bin = forkd_bin();
        let mut last_err = String::new();
        for _attempt in 0..8 {
            let port = free_port();
            let mut d = Daemon {
                bin: bin.clone(),
                data_dir: data_dir.to_path_buf(),
                log: log.to_path_buf(),
                port,
                child: None,
                api: Api::new(port),
            };
            match d.try_spawn() {
                Ok(()) => return d,
                Err(e) => last_err = e,
            }
        }
        panic!("could not start forkd: {last_err}\n--- daemon log ---\n{}", read_log(log));
    }

    /// Start a daemon in `root`: data in `root/data`, log in `root/daemon.log`.
    pub fn start_in(root: &Path) -> Daemon {
        Daemon::start(&root.join("data"), &root.join("daemon.log"))
    }

    /// Spawn the daemon and wait for readiness. `Err` if it exited early (e.g. the port was
    /// taken) or never answered.
    fn try_spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "daemon already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open log {}: {e}", self.log.display()));
        let log2 = log.try_clone().expect("clone log fd");
        let child = Command::new(&self.bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--api")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--nbd")
            .arg("127.0.0.1:0")
            .arg("--iscsi")
            .arg("127.0.0.1:0")
            .env_remove("FORKD_API")
            .env("FORKD_LOW_SPACE_THRESHOLD", LOW_SPACE_THRESHOLD)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        let started = Instant::now();
        for _ in 0..2000 {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(format!("forkd serve exited early with {st}"));
            }
            if self.api.ready() {
                // Make sure it is our daemon that answered, not one that took the port.
                std::thread::sleep(Duration::from_millis(20));
                if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    self.child = None;
                    return Err(format!("forkd serve exited early with {st}"));
                }
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        Err(format!("forkd serve did not answer within {READY_TIMEOUT:?}"))
    }

    /// Start the daemon again on the same data directory and port (after a stop or a kill).
    pub fn restart(&mut self) {
        self.respawn(Daemon::try_spawn);
    }

    /// Spawn again with `spawn`, retrying with a growing pause (the port may still be held by
    /// the daemon that just went), panicking with the log after ten tries.
    fn respawn(&mut self, mut spawn: impl FnMut(&mut Daemon) -> Result<(), String>) {
        let mut last_err = String::new();
        for attempt in 0..10 {
            match spawn(self) {
                Ok(()) => return,
                Err(e) => last_err = e,
            }
            std::thread::sleep(Duration::from_millis(100 * (attempt + 1)));
        }
        panic!(
            "could not restart forkd on port {}: {last_err}\n--- daemon log ---\n{}",
            self.port,
            read_log(&self.log)
        );
    }

    /// Stop gracefully: SIGTERM, then wait (bounded; SIGKILL and panic if it hangs).
    pub fn stop(&mut self) -> ExitStatus {
        let Some(mut child) = self.child.take() else {
            panic!("stop: daemon not running");
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let started = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(st)) => return st,
                Ok(None) if started.elapsed() < STOP_TIMEOUT => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "forkd did not stop within {STOP_TIMEOUT:?} of SIGTERM\n--- daemon log ---\n{}",
                        read_log(&self.log)
                    );
                }
            }
        }
    }

    /// Kill with SIGKILL and reap the process.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The `forkd` binary this daemon runs.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The API port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The HTTP client.
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// Everything the daemon has logged so far (all runs).
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// Run `forkd --api URL ARGS...` (bounded in time).
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--api").arg(self.url()).args(args).env_remove("FORKD_API");
        run_bounded(&mut cmd, CLI_TIMEOUT)
    }

    /// Run a CLI command that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "forkd {} failed with {}\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run a CLI command with `--json` that must succeed; returns its parsed stdout.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let text = self.cli_ok(&a);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("forkd {}: stdout is not JSON ({e}): {text}", a.join(" ")))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "--- forkd log ({}) ---\n{}\n--- end of forkd log ---",
                self.log.display(),
                tail(&read_log(&self.log), 200)
            );
        }
    }
}

fn read_log(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(p) {
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        s = String::from_utf8_lossy(&buf).into_owned();
    }
    s
}

/// The last `n` lines of `s`.
/// A hooks directory `root/hooks` (mode 755) holding `scripts` (name, shell body), each made
/// an executable `#!/bin/sh` script.
pub fn hooks_dir(root: &Path, scripts: &[(&str, &str)]) -> PathBuf {
    let dir = root.join("hooks");
    std::fs::create_dir_all(&dir).expect("hooks dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod hooks dir");
    for (name, body) in scripts {
        write_script(&dir, name, body);
    }
    dir
}

/// Write `dir/name` as `#!/bin/sh` followed by `body`, mode 755.
pub fn write_script(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod script");
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Index of the first differing byte of two buffers (or of the shorter length), if any.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Assert two images are equal, reporting the first differing offset and how many 4 KiB
/// blocks differ.
#[track_caller]
pub fn assert_same_image(what: &str, actual: &[u8], expected: &[u8]) {
    if actual.len() != expected.len() {
        panic!("{what}: {} bytes, expected {}", actual.len(), expected.len());
    }
    if let Some(at) = first_difference(actual, expected) {
        let blocks = actual.chunks(BS).zip(expected.chunks(BS)).filter(|(a, b)| a != b).count();
        panic!(
            "{what}: differs from the expected image at offset {at} (block {}); {blocks} blocks of 4 KiB differ",
            at / BS
        );
    }
}

// ---------------------------------------------------------------------------------------------
// NBD helpers: where a daemon's NBD listener is, its metrics, and a minimal raw NBD client
// written from the protocol spec (fixed newstyle handshake, simple and structured replies), for
// tests that must send exact bytes.
// ---------------------------------------------------------------------------------------------

/// Remove ANSI escape sequences (`ESC [ ... letter`) from log text.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The NBD port in the last `forkd serving ... nbd=HOST:PORT` line of a daemon log.
pub fn nbd_port_in_log(log: &str) -> Option<u16> {
    port_in_log(log, "nbd")
}

/// The port of listener `key` (`nbd`, `iscsi`) in the last `forkd serving ... KEY=HOST:PORT`
/// line of a daemon log.
pub fn port_in_log(log: &str, key: &str) -> Option<u16> {
    let log = strip_ansi(log);
    let pat = format!(" {key}=");
    let line = log.lines().rev().find(|l| l.contains("forkd serving") && l.contains(&pat))?;
    let value = line.split(&pat).nth(1)?.split_whitespace().next()?;
    value.rsplit(':').next()?.parse().ok()
}

/// The value of one Prometheus sample (`name{labels}` exactly as rendered, or a bare name) in
/// a `/metrics` text; 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.trim().parse::<f64>().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// How long [`Daemon::nbd_port`] waits for the daemon to log its NBD address.
pub const NBD_PORT_TIMEOUT: Duration = Duration::from_secs(10);

impl Daemon {
    /// The port the daemon's NBD listener is bound to (it is started with `--nbd 127.0.0.1:0`;
    /// the address is read from its `forkd serving` log line of the current run).
    pub fn nbd_port(&self) -> u16 {
        self.listener_port("nbd")
    }

    /// The port the daemon's iSCSI listener is bound to (started with `--iscsi 127.0.0.1:0`).
    pub fn iscsi_port(&self) -> u16 {
        self.listener_port("iscsi")
    }

    /// The port of listener `key` from the daemon's `forkd serving ... KEY=ADDR` log line.
    fn listener_port(&self, key: &str) -> u16 {
        let started = Instant::now();
        loop {
            if let Some(p) = port_in_log(&self.log(), key) {
                return p;
            }
            assert!(
                started.elapsed() < NBD_PORT_TIMEOUT,
                "the daemon did not log its {key} address (a `forkd serving ... {key}=ADDR` line; is FORKD_LOG \
                 hiding info lines?)\n--- daemon log ---\n{}",
                tail(&self.log(), 50)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `iscsi://127.0.0.1:PORT/iqn.2026-11.dev.forkd:VOLUME/0` (libiscsi and qemu URL form).
    pub fn iscsi_url(&self, volume: &str) -> String {
        format!("iscsi://127.0.0.1:{}/iqn.2026-11.dev.forkd:{volume}/0", self.iscsi_port())
    }

    /// `127.0.0.1:NBD_PORT`.
    pub fn nbd_addr(&self) -> String {
        format!("127.0.0.1:{}", self.nbd_port())
    }

    /// `nbd://127.0.0.1:NBD_PORT/EXPORT` with the export name percent-encoded (`@` as `%40`).
    pub fn nbd_uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.nbd_port(), enc(export))
    }

    /// `GET /metrics` as text.
    pub fn metrics(&self) -> String {
        let r = self.api.get("/metrics");
        assert!(r.ok(), "GET /metrics: HTTP {} {}", r.status, r.text());
        r.text()
    }

    /// Wait (at most a minute) until background garbage collection has emptied the garbage
    /// queue and flushed (`forkd_gc_queued_nodes` is 0): the slots it freed are punched and
    /// reusable, so what deletes gave back is back on disk.
    pub fn wait_for_garbage_collection(&self) {
        wait_until(self, "garbage collection", Duration::from_secs(60), || {
            metric_value(&self.metrics(), "forkd_gc_queued_nodes") == 0.0
        });
    }

    /// `forkd_nbd_connections_closed_total{reason="REASON"}` right now.
    pub fn nbd_closed(&self, reason: &str) -> u64 {
        let v = metric_value(&self.metrics(), &format!("forkd_nbd_connections_closed_total{{reason=\"{reason}\"}}"));
        format!("{v}").parse::<u64>().unwrap_or_else(|_| panic!("counter value {v} is not an integer"))
    }

    /// Wait (bounded by `timeout`) until `forkd_nbd_connections_closed_total{reason="REASON"}`
    /// reaches `at_least`; panics with the metrics and the log if it does not. The counter is
    /// bumped just after the socket closes, so a client may see the close a moment earlier.
    pub fn wait_nbd_closed(&self, reason: &str, at_least: u64, timeout: Duration) -> u64 {
        let started = Instant::now();
        loop {
            let v = self.nbd_closed(reason);
            if v >= at_least {
                return v;
            }
            if started.elapsed() > timeout {
                let m = self.metrics();
                let lines: Vec<&str> = m.lines().filter(|l| l.starts_with("forkd_nbd")).collect();
                panic!(
                    "forkd_nbd_connections_closed_total{{reason=\"{reason}\"}} is {v}, expected at least {at_least} \
                     within {timeout:?}\n--- NBD metrics ---\n{}\n--- daemon log ---\n{}",
                    lines.join("\n"),
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A minimal raw NBD client (fixed newstyle, no TLS) for tests that send exact bytes.
/// Filesystems and PostgreSQL on forkd volumes (FUSE + loop attach, mounts, postgres).
pub mod fsdb;
/// A raw iSCSI initiator built on the `forkd-iscsi` codec, for tests that send exact PDUs.
pub mod iscsi_raw;
/// Two sites in network namespaces joined by a veth pair, a daemon in each (replication).
pub mod twosite;

pub mod rawnbd {
    use std::io::{ErrorKind, Read, Write};
    use std::net::{Shutdown, TcpStream};
    use std::time::{Duration, Instant};

    /// `NBDMAGIC`.
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    /// `IHAVEOPT`.
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    /// Option reply magic.
    pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
    /// Request magic (compact headers).
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    /// Simple reply magic.
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    /// Structured reply magic.
    pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
    /// Client flag `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub const C_FIXED_NEWSTYLE: u32 = 1;
    /// Client flag `NBD_FLAG_C_NO_ZEROES`.
    pub const C_NO_ZEROES: u32 = 2;
    /// `NBD_OPT_EXPORT_NAME`.
    pub const OPT_EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT`.
    pub const OPT_ABORT: u32 = 2;
    /// `NBD_OPT_LIST`.
    pub const OPT_LIST: u32 = 3;
    /// `NBD_OPT_INFO`.
    pub const OPT_INFO: u32 = 6;
    /// `NBD_OPT_GO`.
    pub const OPT_GO: u32 = 7;
    /// `NBD_OPT_STRUCTURED_REPLY`.
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    /// `NBD_REP_ACK`.
    pub const REP_ACK: u32 = 1;
    /// `NBD_REP_SERVER`.
    pub const REP_SERVER: u32 = 2;
    /// `NBD_REP_INFO`.
    pub const REP_INFO: u32 = 3;
    /// `NBD_REP_ERR_UNKNOWN`.
    pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
    /// `NBD_REP_ERR_TOO_BIG`.
    pub const REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;
    /// `NBD_CMD_READ`.
    pub const CMD_READ: u16 = 0;
    /// `NBD_CMD_WRITE`.
    pub const CMD_WRITE: u16 = 1;
    /// `NBD_CMD_DISC`.
    pub const CMD_DISC: u16 = 2;
    /// `NBD_CMD_FLUSH`.
    pub const CMD_FLUSH: u16 = 3;
    /// `NBD_FLAG_READ_ONLY` (transmission flags).
    pub const FLAG_READ_ONLY: u16 = 1 << 1;
    /// `NBD_EPERM`.
    pub const EPERM: u32 = 1;
    /// `NBD_EINVAL`.
    pub const EINVAL: u32 = 22;
    /// `NBD_ENOSPC`.
    pub const ENOSPC: u32 = 28;
    /// `NBD_EOVERFLOW`.
    pub const EOVERFLOW: u32 = 75;
    /// `NBD_REPLY_FLAG_DONE`.
    pub const REPLY_FLAG_DONE: u16 = 1;
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
    /// Longest any single socket read or write may block.
    pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

    /// One option reply.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct OptReply {
        /// The option it answers.
        pub option: u32,
        /// `NBD_REP_*`.
        pub kind: u32,
        /// The reply data.
        pub data: Vec<u8>,
    }

    /// A structured reply chunk.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Chunk {
        /// Chunk flags (`NBD_REPLY_FLAG_DONE`).
        pub flags: u16,
        /// Chunk type.
        pub kind: u16,
        /// The cookie it answers.
        pub cookie: u64,
        /// The chunk payload.
        pub data: Vec<u8>,
    }

    impl Chunk {
        /// The errno of an error chunk (`type` with bit 15 set), if it is one.
        pub fn errno(&self) -> Option<u32> {
            (self.kind & 0x8000 != 0 && self.data.len() >= 4).then(|| be32(&self.data[..4]))
        }
    }

    /// What the transmission phase negotiated.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Export {
        /// Export size in bytes.
        pub size: u64,
        /// Transmission flags.
        pub flags: u16,
    }

    fn be16(b: &[u8]) -> u16 {
        u16::from_be_bytes([b[0], b[1]])
    }

    fn be32(b: &[u8]) -> u32 {
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    fn be64(b: &[u8]) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        u64::from_be_bytes(a)
    }

    /// One connection to an NBD server.
    #[derive(Debug)]
    pub struct Client {
        /// The socket (public so tests can send arbitrary bytes).
        pub stream: TcpStream,
        /// Structured replies were negotiated.
        pub structured: bool,
        /// The export entered, once transmission started.
        pub export: Option<Export>,
        next_cookie: u64,
    }

    impl Client {
        /// Connect to `addr` (bounded by [`IO_TIMEOUT`]) without reading anything.
        pub fn connect_raw(addr: &str) -> Client {
            let sa: std::net::SocketAddr = addr.parse().unwrap_or_else(|e| panic!("address {addr}: {e}"));
            let stream = TcpStream::connect_timeout(&sa, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("connect to NBD {addr}: {e}"));
            stream.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
            stream.set_write_timeout(Some(IO_TIMEOUT)).expect("write timeout");
            let _ = stream.set_nodelay(true);
            Client { stream, structured: false, export: None, next_cookie: 1 }
        }

        /// Connect and read the 18-byte greeting, checking it is fixed newstyle.
        pub fn connect(addr: &str) -> Client {
            let mut c = Client::connect_raw(addr);
            let g = c.read_exact_vec(18).unwrap_or_else(|e| panic!("reading the NBD greeting from {addr}: {e}"));
            assert_eq!(be64(&g[0..8]), NBDMAGIC, "greeting magic: {g:02x?}");
            assert_eq!(be64(&g[8..16]), IHAVEOPT, "greeting is not newstyle: {g:02x?}");
            assert_eq!(be16(&g[16..18]) & 1, 1, "server is not fixed newstyle: {g:02x?}");
            c
        }

        /// Connect, send client flags (`FIXED_NEWSTYLE | NO_ZEROES`), optionally negotiate
        /// structured replies, then `NBD_OPT_GO` into `export`; panics if any step fails.
        pub fn open(addr: &str, export: &str, structured: bool) -> Client {
            let mut c = Client::connect(addr);
            c.send_flags(C_FIXED_NEWSTYLE | C_NO_ZEROES).expect("send client flags");
            if structured {
                c.send_option(OPT_STRUCTURED_REPLY, &[]).expect("send NBD_OPT_STRUCTURED_REPLY");
                let r = c.read_option_reply().expect("reply to NBD_OPT_STRUCTURED_REPLY");
                assert_eq!(r.kind, REP_ACK, "NBD_OPT_STRUCTURED_REPLY refused: {r:?}");
                c.structured = true;
            }
            match c.go(export) {
                Ok(_) => c,
                Err(kind) => panic!("NBD_OPT_GO {export:?} refused with reply type {kind:#x}"),
            }
        }

        /// Read exactly `n` bytes.
        pub fn read_exact_vec(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
            let mut v = vec![0u8; n];
            self.stream.read_exact(&mut v)?;
            Ok(v)
        }

        /// Send raw bytes.
        pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            self.stream.write_all(bytes)
        }

        /// Send the 4-byte client flags.
        pub fn send_flags(&mut self, flags: u32) -> std::io::Result<()> {
            self.send(&flags.to_be_bytes())
        }

        /// The bytes of one option: `IHAVEOPT`, option, length, data.
        pub fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
            let mut b = Vec::with_capacity(16 + data.len());
            b.extend_from_slice(&IHAVEOPT.to_be_bytes());
            b.extend_from_slice(&option.to_be_bytes());
            b.extend_from_slice(&u32::try_from(data.len()).expect("option length").to_be_bytes());
            b.extend_from_slice(data);
            b
        }

        /// Send one option.
        pub fn send_option(&mut self, option: u32, data: &[u8]) -> std::io::Result<()> {
            self.send(&Client::option_bytes(option, data))
        }

        /// The data of `NBD_OPT_GO`/`NBD_OPT_INFO` for `export`, asking for no info items.
        pub fn go_data(export: &[u8]) -> Vec<u8> {
            let mut d = Vec::with_capacity(6 + export.len());
            d.extend_from_slice(&u32::try_from(export.len()).expect("name length").to_be_bytes());
            d.extend_from_slice(export);
            d.extend_from_slice(&0u16.to_be_bytes());
            d
        }

        /// Read one option reply (header checked for the reply magic).
        pub fn read_option_reply(&mut self) -> std::io::Result<OptReply> {
            let h = self.read_exact_vec(20)?;
            if be64(&h[0..8]) != REP_MAGIC {
                return Err(std::io::Error::new(ErrorKind::InvalidData, format!("bad option reply magic: {h:02x?}")));
            }
            let len = be32(&h[16..20]);
            if len > 1 << 20 {
                return Err(std::io::Error::new(ErrorKind::InvalidData, format!("option reply of {len} bytes")));
            }
            let data = self.read_exact_vec(usize::try_from(len).expect("len"))?;
            Ok(OptReply { option: be32(&h[8..12]), kind: be32(&h[12..16]), data })
        }

        /// Send `NBD_OPT_GO` for `export` and read its replies. `Ok` (transmission started)
        /// after `NBD_REP_ACK`, `Err(reply type)` after an error reply (still negotiating).
        pub fn go(&mut self, export: &str) -> Result<Export, u32> {
            self.send_option(OPT_GO, &Client::go_data(export.as_bytes())).expect("send NBD_OPT_GO");
            let mut found = None;
            for _ in 0..64 {
                let r = self.read_option_reply().unwrap_or_else(|e| panic!("reading the reply to NBD_OPT_GO: {e}"));
                assert_eq!(r.option, OPT_GO, "reply to another option: {r:?}");
                match r.kind {
                    REP_INFO => {
                        if r.data.len() >= 12 && be16(&r.data[0..2]) == 0 {
                            found = Some(Export { size: be64(&r.data[2..10]), flags: be16(&r.data[10..12]) });
                        }
                    }
                    REP_ACK => {
                        let e = found.expect("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT");
                        self.export = Some(e);
                        return Ok(e);
                    }
                    k if k & (1 << 31) != 0 => return Err(k),
                    k => panic!("unexpected reply type {k:#x} to NBD_OPT_GO"),
                }
            }
            panic!("more than 64 replies to one NBD_OPT_GO");
        }

        /// The 28 bytes of a compact request header.
        pub fn request_bytes(command: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
            let mut b = Vec::with_capacity(28);
            b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            b.extend_from_slice(&flags.to_be_bytes());
            b.extend_from_slice(&command.to_be_bytes());
            b.extend_from_slice(&cookie.to_be_bytes());
            b.extend_from_slice(&offset.to_be_bytes());
            b.extend_from_slice(&length.to_be_bytes());
            b
        }

        /// A fresh cookie.
        pub fn cookie(&mut self) -> u64 {
            self.next_cookie += 1;
            self.next_cookie
        }

        /// Read one simple reply; `data_len` bytes of data follow it when it is a success.
        /// Returns (errno, cookie, data).
        pub fn read_simple_reply(&mut self, data_len: usize) -> std::io::Result<(u32, u64, Vec<u8>)> {
            let h = self.read_exact_vec(16)?;
            if be32(&h[0..4]) != SIMPLE_REPLY_MAGIC {
                return Err(std::io::Error::new(ErrorKind::InvalidData, format!("not a simple reply: {h:02x?}")));
            }
            let errno = be32(&h[4..8]);
            let cookie = be64(&h[8..16]);
            let data = if errno == 0 { self.read_exact_vec(data_len)? } else { Vec::new() };
            Ok((errno, cookie, data))
        }

        /// Read one structured reply chunk.
        pub fn read_chunk(&mut self) -> std::io::Result<Chunk> {
            let h = self.read_exact_vec(20)?;
            if be32(&h[0..4]) != STRUCTURED_REPLY_MAGIC {
                return Err(std::io::Error::new(ErrorKind::InvalidData, format!("not a structured reply: {h:02x?}")));
            }
            let len = be32(&h[16..20]);
            if len > 64 << 20 {
                return Err(std::io::Error::new(ErrorKind::InvalidData, format!("chunk of {len} bytes")));
            }
            let data = self.read_exact_vec(usize::try_from(len).expect("len"))?;
            Ok(Chunk { flags: be16(&h[4..6]), kind: be16(&h[6..8]), cookie: be64(&h[8..16]), data })
        }

        /// Read structured chunks up to and including the one with `NBD_REPLY_FLAG_DONE`.
        pub fn read_chunks(&mut self) -> std::io::Result<Vec<Chunk>> {
            let mut out = Vec::new();
            for _ in 0..100_000 {
                let c = self.read_chunk()?;
                let done = c.flags & REPLY_FLAG_DONE != 0;
                out.push(c);
                if done {
                    return Ok(out);
                }
            }
            Err(std::io::Error::new(ErrorKind::InvalidData, "too many chunks without NBD_REPLY_FLAG_DONE"))
        }

        /// `NBD_CMD_READ`: the data, or the errno of the error reply. Transport errors panic
        /// ([`Client::try_read`] reports them instead).
        pub fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>, u32> {
            self.try_read(offset, length).unwrap_or_else(|e| panic!("NBD read {offset}+{length}: {e}"))
        }

        /// `NBD_CMD_READ` with transport errors reported: `Ok(Ok(data))`, `Ok(Err(errno))`
        /// or `Err(io error)`.
        pub fn try_read(&mut self, offset: u64, length: u32) -> std::io::Result<Result<Vec<u8>, u32>> {
            let cookie = self.cookie();
            self.send(&Client::request_bytes(CMD_READ, 0, cookie, offset, length))?;
            self.read_reply_data(cookie, offset, length)
        }

        /// Read the reply to a read request already sent with `cookie`.
        pub fn read_reply_data(
            &mut self,
            cookie: u64,
            offset: u64,
            length: u32,
        ) -> std::io::Result<Result<Vec<u8>, u32>> {
            let len = usize::try_from(length).expect("length");
            if !self.structured {
                let (errno, got, data) = self.read_simple_reply(len)?;
                assert_eq!(got, cookie, "reply to another request");
                return Ok(if errno == 0 { Ok(data) } else { Err(errno) });
            }
            let mut data = vec![0u8; len];
            let mut error = None;
            for c in self.read_chunks()? {
                assert_eq!(c.cookie, cookie, "chunk for another request");
                if let Some(e) = c.errno() {
                    error = Some(e);
                    continue;
                }
                match c.kind {
                    REPLY_TYPE_OFFSET_DATA => {
                        let at = usize::try_from(be64(&c.data[0..8]) - offset).expect("offset");
                        data[at..at + c.data.len() - 8].copy_from_slice(&c.data[8..]);
                    }
                    REPLY_TYPE_OFFSET_HOLE => {
                        let at = usize::try_from(be64(&c.data[0..8]) - offset).expect("offset");
                        let n = usize::try_from(be32(&c.data[8..12])).expect("hole");
                        data[at..at + n].fill(0);
                    }
                    _ => {}
                }
            }
            Ok(match error {
                Some(e) => Err(e),
                None => Ok(data),
            })
        }

        /// Read the reply to a request without data (write, flush...): 0 or the errno.
        pub fn read_status_reply(&mut self, cookie: u64) -> std::io::Result<u32> {
            if !self.structured {
                let (errno, got, _) = self.read_simple_reply(0)?;
                assert_eq!(got, cookie, "reply to another request");
                return Ok(errno);
            }
            let mut errno = 0;
            for c in self.read_chunks()? {
                assert_eq!(c.cookie, cookie, "chunk for another request");
                if let Some(e) = c.errno() {
                    errno = e;
                }
            }
            Ok(errno)
        }

        /// `NBD_CMD_WRITE`: `Ok` or the errno of the error reply (panics on transport errors).
        pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), u32> {
            self.try_write(offset, data).unwrap_or_else(|e| panic!("NBD write {offset}+{}: {e}", data.len()))
        }

        /// `NBD_CMD_WRITE` with transport errors reported.
        pub fn try_write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<Result<(), u32>> {
            let cookie = self.cookie();
            let mut b = Client::request_bytes(CMD_WRITE, 0, cookie, offset, u32::try_from(data.len()).expect("len"));
            b.extend_from_slice(data);
            self.send(&b)?;
            let errno = self.read_status_reply(cookie)?;
            Ok(if errno == 0 { Ok(()) } else { Err(errno) })
        }

        /// `NBD_CMD_FLUSH`: 0 or the errno.
        pub fn flush(&mut self) -> u32 {
            let cookie = self.cookie();
            self.send(&Client::request_bytes(CMD_FLUSH, 0, cookie, 0, 0)).expect("send flush");
            self.read_status_reply(cookie).expect("flush reply")
        }

        /// Send `NBD_CMD_DISC` and shut the socket down.
        pub fn disconnect(mut self) {
            let cookie = self.cookie();
            let _ = self.send(&Client::request_bytes(CMD_DISC, 0, cookie, 0, 0));
            let _ = self.stream.shutdown(Shutdown::Write);
            let _ = self.wait_closed(Duration::from_secs(10));
        }

        /// Wait (bounded) until the server closes the connection: `true` on EOF or a reset,
        /// `false` if it is still open after `timeout`. Any bytes that arrive are returned
        /// through `received` and discarded.
        pub fn wait_closed_collect(&mut self, timeout: Duration, received: &mut Vec<u8>) -> bool {
            let started = Instant::now();
            let mut buf = [0u8; 65536];
            while started.elapsed() < timeout {
                let left = timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(10));
                let _ = self.stream.set_read_timeout(Some(left.min(Duration::from_millis(500))));
                match self.stream.read(&mut buf) {
                    Ok(0) => return true,
                    Ok(n) => received.extend_from_slice(&buf[..n]),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return true,
                }
            }
            let _ = self.stream.set_read_timeout(Some(IO_TIMEOUT));
            false
        }

        /// [`Client::wait_closed_collect`], ignoring what arrives.
        pub fn wait_closed(&mut self, timeout: Duration) -> bool {
            let mut sink = Vec::new();
            self.wait_closed_collect(timeout, &mut sink)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Daemons started with more `serve` flags (an API token, the API on every address), CLI runs
// with a chosen environment, and HTTP requests with extra headers.
// ---------------------------------------------------------------------------------------------

impl Daemon {
    /// Start a daemon in `root` (data in `root/data`, log in `root/daemon.log`) whose API
    /// listens on `api_host:PORT` with a free PORT (always reached on 127.0.0.1), with `extra`
    /// flags after `serve` (e.g. `--token-file FILE`). It counts as ready when its API answers
    /// at all, `401` included. [`Daemon::restart`] would start it without `extra`, on loopback.
    pub fn start_with(root: &Path, api_host: &str, extra: &[&str]) -> Daemon {
        Daemon::start_at(&root.join("data"), &root.join("daemon.log"), api_host, extra)
    }

    /// [`Daemon::start_with`] on the data directory `data_dir`, logging to `log`.
    pub fn start_at(data_dir: &Path, log: &Path, api_host: &str, extra: &[&str]) -> Daemon {
        let bin = forkd_bin();
        let (data_dir, log) = (data_dir.to_path_buf(), log.to_path_buf());
        let mut last_err = String::new();
        for _attempt in 0..8 {
            let port = free_port();
            let mut d = Daemon {
                bin: bin.clone(),
                data_dir: data_dir.clone(),
                log: log.clone(),
                port,
                child: None,
                api: Api::new(port),
            };
            match d.try_spawn_with(api_host, extra) {
                Ok(()) => return d,
                Err(e) => last_err = e,
            }
        }
        panic!("could not start forkd: {last_err}\n--- daemon log ---\n{}", read_log(&log));
    }

    /// Start a daemon made by [`Daemon::start_with`] again, on the same port, with `extra`.
    pub fn restart_with(&mut self, api_host: &str, extra: &[&str]) {
        self.respawn(|d| d.try_spawn_with(api_host, extra));
    }

    fn try_spawn_with(&mut self, api_host: &str, extra: &[&str]) -> Result<(), String> {
        assert!(self.child.is_none(), "daemon already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open log {}: {e}", self.log.display()));
        let log2 = log.try_clone().expect("clone log fd");
        let child = Command::new(&self.bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--api")
            .arg(format!("{api_host}:{}", self.port))
            .args(["--nbd", "127.0.0.1:0", "--iscsi", "127.0.0.1:0"])
            .args(extra)
            .env_remove("FORKD_API")
            .env("FORKD_LOW_SPACE_THRESHOLD", LOW_SPACE_THRESHOLD)
            .env_remove("FORKD_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < READY_TIMEOUT {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(format!("forkd serve exited early with {st}"));
            }
            if self.api.request("GET", "/v1/volumes", None).is_ok() {
                // Make sure it is our daemon that answered, not one that took the port.
                std::thread::sleep(Duration::from_millis(20));
                if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    self.child = None;
                    return Err(format!("forkd serve exited early with {st}"));
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        Err(format!("forkd serve did not answer within {READY_TIMEOUT:?}"))
    }

    /// Run `forkd --api URL ARGS...` (bounded in time) with `FORKD_API` and `FORKD_TOKEN`
    /// removed from its environment, then `env` set.
    pub fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--api").arg(self.url()).args(args).env_remove("FORKD_API").env_remove("FORKD_TOKEN");
        for (k, v) in env {
            cmd.env(k, v);
        }
        run_bounded(&mut cmd, CLI_TIMEOUT)
    }
}

/// Run `forkd ARGS...` with `FORKD_API` and `FORKD_TOKEN` removed from its environment. `Err`
/// carries what it printed when it was still running after `timeout` (and was killed), e.g. a
/// `forkd serve` that did start.
pub fn run_forkd(args: &[&str], timeout: Duration) -> Result<Output, Output> {
    let mut cmd = Command::new(forkd_bin());
    cmd.args(args).env_remove("FORKD_API").env_remove("FORKD_TOKEN");
    run_with_deadline(&mut cmd, timeout)
}

impl Api {
    /// Send a request with extra headers (e.g. `Authorization`); like [`Api::request`], `Err`
    /// only for transport errors.
    pub fn request_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, &[u8])>,
    ) -> Result<Http, String> {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let result = match body {
            Some((ctype, bytes)) => req.set("Content-Type", ctype).send_bytes(bytes),
            None => req.call(),
        };
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => return Err(t.to_string()),
        };
        let status = resp.status();
        let mut buf = Vec::new();
        resp.into_reader().take(256 << 20).read_to_end(&mut buf).map_err(|e| format!("reading the body: {e}"))?;
        Ok(Http { status, body: buf })
    }

    /// `GET path` with extra headers, panicking on transport errors.
    pub fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Http {
        self.request_with("GET", path, headers, None).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }
}

// ---------------------------------------------------------------------------------------------
// iSCSI helpers (used by iscsi_clients.rs and iscsi_fs_db.rs): target names, the iSCSI close
// counters, and daemons started with a config file.
// ---------------------------------------------------------------------------------------------

/// The prefix of every forkd iSCSI target name.
pub const IQN_PREFIX: &str = "iqn.2026-11.dev.forkd:";

/// The iSCSI target name of a clone (`dev1`) or snapshot (`dev1@3` → `...:dev1:snap-3`).
pub fn iscsi_target(reference: &str) -> String {
    match reference.split_once('@') {
        Some((v, n)) => format!("{IQN_PREFIX}{v}:snap-{n}"),
        None => format!("{IQN_PREFIX}{reference}"),
    }
}

impl Daemon {
    /// Start a daemon in `root` with `--config FILE`, the file holding `config` (TOML).
    pub fn start_with_config(root: &Path, config: &str) -> Daemon {
        let file = root.join("forkd.toml");
        std::fs::write(&file, config).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
        let file = file.to_str().expect("utf-8 path").to_string();
        Daemon::start_with(root, "127.0.0.1", &["--config", &file])
    }

    /// `forkd_iscsi_connections_closed_total{reason="REASON"}` right now.
    pub fn iscsi_closed(&self, reason: &str) -> u64 {
        let v = metric_value(&self.metrics(), &format!("forkd_iscsi_connections_closed_total{{reason=\"{reason}\"}}"));
        format!("{v}").parse::<u64>().unwrap_or_else(|_| panic!("counter value {v} is not an integer"))
    }

    /// Wait (bounded by `timeout`) until `forkd_iscsi_connections_closed_total{reason="REASON"}`
    /// reaches `at_least`; panics with the iSCSI metrics and the log if it does not.
    pub fn wait_iscsi_closed(&self, reason: &str, at_least: u64, timeout: Duration) -> u64 {
        let started = Instant::now();
        loop {
            let v = self.iscsi_closed(reason);
            if v >= at_least {
                return v;
            }
            if started.elapsed() > timeout {
                let m = self.metrics();
                let lines: Vec<&str> = m.lines().filter(|l| l.starts_with("forkd_iscsi")).collect();
                panic!(
                    "forkd_iscsi_connections_closed_total{{reason=\"{reason}\"}} is {v}, expected at least {at_least} \
                     within {timeout:?}\n--- iSCSI metrics ---\n{}\n--- daemon log ---\n{}",
                    lines.join("\n"),
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A small ext4 filesystem in a loop-mounted image, mounted for the life of the value.
#[derive(Debug)]
pub struct LoopFs {
    /// Where it is mounted.
    pub mnt: PathBuf,
}

impl LoopFs {
    /// Make a `mib` MiB ext4 image in `root` and mount it on `root/mnt`. Needs root.
    pub fn mount(root: &Path, mib: u64) -> LoopFs {
        let img = root.join("fs.img");
        let f = std::fs::File::create(&img).expect("create image");
        f.set_len(mib << 20).expect("size image");
        let mnt = root.join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir");
        let limit = Duration::from_secs(60);
        let mkfs = run_bounded(Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0"]).arg(&img), limit);
        assert!(mkfs.status.success(), "mkfs.ext4 failed: {mkfs:?}");
        let mount = run_bounded(Command::new("mount").args(["-o", "loop"]).arg(&img).arg(&mnt), limit);
        assert!(
            mount.status.success(),
            "this test needs root to loop-mount an ext4 image (CI runs as root): {}",
            String::from_utf8_lossy(&mount.stderr)
        );
        LoopFs { mnt }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

/// The clock file of a daemon started with `--clock-file` (its "now"), for tests of
/// time-driven features (leases, schedules) that never sleep for hours.
#[derive(Debug, Clone)]
pub struct TestClock {
    file: PathBuf,
}

impl TestClock {
    /// One hour in milliseconds.
    pub const H: i64 = 3_600_000;
    /// The tests' "now" at the start: 2027-01-15T08:00:00Z.
    pub const T0: i64 = 1_800_000_000_000;

    /// A clock file at `file`, set to [`TestClock::T0`].
    pub fn new(file: &Path) -> TestClock {
        let c = TestClock { file: file.to_path_buf() };
        c.at(0);
        c
    }

    /// The file to give `--clock-file`.
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// Set the daemon's time to `T0 + offset` (milliseconds), in one rename.
    pub fn at(&self, offset: i64) {
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{}\n", TestClock::T0 + offset)).expect("clock");
        std::fs::rename(&tmp, &self.file).expect("clock");
    }
}

/// Wait (at most `limit`) until `cond` holds, polling; fails naming `what`, with the log of `d`.
pub fn wait_until(d: &Daemon, what: &str, limit: Duration, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what} did not happen within {limit:?}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}
