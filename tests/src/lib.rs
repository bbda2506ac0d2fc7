//! Shared helpers for the end-to-end tests: find the `forkd` binary, run a real daemon on its
//! own data directory and port, drive it with the real CLI and over HTTP, crash it and restart
//! it.
//!
//! Every wait is bounded in count and time. A [`Daemon`] kills its process when dropped, and
//! prints the daemon's log when it is dropped during a panic (a failing test).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::net::TcpListener;
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
    let started = Instant::now();
    let (status, finished) = loop {
        match child.try_wait() {
            Ok(Some(st)) => break (st, true),
            Ok(None) if started.elapsed() < timeout => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let st = child.wait().unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
                break (st, false);
            }
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    };
    let output = Output { status, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default() };
    if finished {
        Ok(output)
    } else {
        Err(output)
    }
}

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
        let req = self.agent.request(method, &format!("{}{path}", self.base));
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
        let mut last_err = String::new();
        for attempt in 0..10 {
            match self.try_spawn() {
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
