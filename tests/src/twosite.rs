//! Two forkd sites joined by one link, for the replication tests: two network namespaces, a
//! veth pair between them (10.X.Y.1/30 on site A, 10.X.Y.2/30 on site B), and one real
//! `forkd serve` in each namespace with its own data directory and API token.
//!
//! The test process stays in the root namespace, which has no route to either site: every
//! process that talks to a daemon runs inside a namespace through `ip netns exec NS ...` (the
//! CLI, the HTTP helper, a writer), so what crosses between the sites crosses the veth pair,
//! where its counters measure it. Each daemon's API listens on its veth address (port
//! [`API_PORT`]; the namespace is fresh, so the port is free) and therefore needs a token;
//! NBD and iSCSI listen on the namespace's own loopback. Plain HTTP requests (the data route,
//! `/metrics`) are made by a small Python script run in the namespace ([`Site::http`]).
//!
//! [`TwoSites::cut_link`] takes site A's end of the pair down: A loses its route to B and B's
//! end loses its carrier, so nothing passes either way until [`TwoSites::restore_link`].
//!
//! Dropping a [`TwoSites`] (also during a panic) kills both daemons and anything else still
//! running in the namespaces, deletes the namespaces (and with them the veth pair) and the
//! temporary directory; during a panic it prints the tail of both daemons' logs. Namespaces
//! left behind by a test process that was killed (its pid is in their names) are removed by
//! the next [`TwoSites::new`].

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{
    forkd_bin, metric_value, read_log, run_bounded, run_with_deadline, tail, Http, CLI_TIMEOUT, READY_TIMEOUT,
};

/// The API port of both daemons (each in its own namespace, where nothing else listens).
pub const API_PORT: u16 = 7480;
/// The NBD port of both daemons, on their namespace's loopback.
pub const NBD_PORT: u16 = 10809;
/// The iSCSI port of both daemons, on their namespace's loopback.
pub const ISCSI_PORT: u16 = 3260;
/// Longest an `ip` command may take.
const IP_TIMEOUT: Duration = Duration::from_secs(30);
/// Prefix of the namespaces' names: `fkA-PID-N`, `fkB-PID-N`.
const NS_PREFIXES: [&str; 2] = ["fkA-", "fkB-"];

/// Which of the two sites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The first site (10.X.Y.1), where the tests keep their sources.
    A,
    /// The second site (10.X.Y.2).
    B,
}

impl Side {
    /// The other site.
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }

    fn index(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
}

/// One site: a network namespace, its end of the veth pair, and its daemon.
#[derive(Debug)]
pub struct Site {
    side: Side,
    ns: String,
    veth: String,
    addr: String,
    bin: PathBuf,
    root: PathBuf,
    child: Option<Child>,
    extra: Vec<String>,
}

/// Two sites and the link between them; see the module note.
#[derive(Debug)]
pub struct TwoSites {
    sites: [Site; 2],
    scratch: PathBuf,
    // Last: removed after the daemons are gone (see `Drop`).
    tmp: tempfile::TempDir,
}

/// Run `ip ARGS...`, bounded; panics with its stderr when it fails.
fn ip(args: &[&str]) -> String {
    let out = run_bounded(Command::new("ip").args(args), IP_TIMEOUT);
    assert!(
        out.status.success(),
        "ip {} failed with {}: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run `ip ARGS...`, bounded, ignoring the outcome (for clean-up).
fn ip_quiet(args: &[&str]) {
    let _ = run_with_deadline(Command::new("ip").args(args), IP_TIMEOUT);
}

/// The names of the network namespaces that exist (`ip netns list`).
pub fn namespaces() -> Vec<String> {
    ip(&["netns", "list"]).lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect()
}

/// SIGKILL every process in namespace `ns` (`ip netns pids`), then delete the namespace.
fn remove_namespace(ns: &str) {
    if let Ok(out) = run_with_deadline(Command::new("ip").args(["netns", "pids", ns]), IP_TIMEOUT) {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    ip_quiet(&["netns", "del", ns]);
}

/// Remove the namespaces of earlier test processes that are gone (killed before their
/// `TwoSites` could clean up): `fkA-PID-N`/`fkB-PID-N` whose PID no longer runs.
fn remove_stale_namespaces() {
    for ns in namespaces() {
        let Some(rest) = NS_PREFIXES.iter().find_map(|p| ns.strip_prefix(p)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            remove_namespace(&ns);
        }
    }
}

/// The Python 3 interpreter: the system's, else the first `python3` on `PATH`.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// The HTTP helper run in a namespace. `req HOST PORT TOKEN_FILE METHOD PATH [BODY_FILE]`
/// prints the status on one line, then the body. `writer HOST PORT TOKEN_FILE VOLUME RATE
/// SECONDS BLOCKS SEED` writes 4 KiB of random bytes at a random block below BLOCKS (offsets
/// from SEED) RATE times a second for SECONDS over one kept-alive connection, stopping at
/// the first refused write, and prints `{"writes": N, "seconds": S}` (exit 1 on a refusal).
const HTTP_PY: &str = r#"
import http.client, json, os, random, sys, time
mode, host, port, token_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
token = open(token_file).read().strip()
auth = {"Authorization": "Bearer " + token}
conn = http.client.HTTPConnection(host, port, timeout=60)
if mode == "req":
    method, path = sys.argv[5], sys.argv[6]
    headers = dict(auth)
    body = None
    if len(sys.argv) > 7:
        body = open(sys.argv[7], "rb").read()
        headers["Content-Type"] = "application/octet-stream"
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    sys.stdout.buffer.write(b"%d\n" % r.status + data)
elif mode == "writer":
    vol, rate, secs, blocks, seed = sys.argv[5], float(sys.argv[6]), float(sys.argv[7]), int(sys.argv[8]), int(sys.argv[9])
    rng = random.Random(seed)
    headers = dict(auth)
    headers["Content-Type"] = "application/octet-stream"
    n, start = 0, time.monotonic()
    while time.monotonic() - start < secs:
        pause = start + n / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        off = rng.randrange(blocks) * 4096
        conn.request("PUT", "/v1/volumes/%s/data?offset=%d" % (vol, off), body=os.urandom(4096), headers=headers)
        r = conn.getresponse()
        text = r.read()
        if r.status // 100 != 2:
            print("write %d at %d: HTTP %d %s" % (n, off, r.status, text[:300]), file=sys.stderr)
            print(json.dumps({"writes": n, "seconds": time.monotonic() - start}))
            sys.exit(1)
        n += 1
    print(json.dumps({"writes": n, "seconds": time.monotonic() - start}))
else:
    sys.exit("unknown mode " + mode)
"#;

/// A process running in the background (a CLI run, a writer), its output going to files.
/// Dropping it kills it.
#[derive(Debug)]
pub struct Background {
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
    what: String,
}

impl Background {
    /// Start `cmd` with stdin closed and stdout/stderr in `dir/NAME.out`/`.err`.
    fn spawn(mut cmd: Command, dir: &Path, name: &str) -> Background {
        let what = format!("{cmd:?}");
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        let open = |p: &Path| File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(open(&stdout)))
            .stderr(Stdio::from(open(&stderr)))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        Background { child: Some(child), stdout, stderr, what }
    }

    /// Its exit status, if it has exited (`None` while it runs).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap_or_else(|e| panic!("waiting for {}: {e}", self.what)))
    }

    /// Wait until it exits: `Ok` with what it printed, or, still running after `timeout`, it
    /// is killed and `Err` carries what it printed.
    pub fn wait(mut self, timeout: Duration) -> Result<Output, Output> {
        let mut child = self.child.take().expect("a background process is waited for once");
        let (status, finished) = crate::wait_or_kill(&mut child, timeout, &self.what);
        let read = |p: &Path| std::fs::read(p).unwrap_or_default();
        let out = Output { status, stdout: read(&self.stdout), stderr: read(&self.stderr) };
        if finished {
            Ok(out)
        } else {
            Err(out)
        }
    }

    /// [`Background::wait`], panicking when it is still running after `timeout`.
    pub fn wait_bounded(self, timeout: Duration) -> Output {
        let what = self.what.clone();
        self.wait(timeout).unwrap_or_else(|out| {
            panic!(
                "{what} did not finish within {timeout:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// SIGKILL it (if it still runs) and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Panic unless `out` is a success, showing what `what` printed.
#[track_caller]
pub fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Compare two files byte for byte (streamed); `Err` names the first differing offset, or the
/// sizes when they differ.
pub fn compare_files(a: &Path, b: &Path) -> Result<(), String> {
    let open = |p: &Path| File::open(p).map_err(|e| format!("open {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let (la, lb) = (fa.metadata().map_err(|e| e.to_string())?.len(), fb.metadata().map_err(|e| e.to_string())?.len());
    if la != lb {
        return Err(format!("{} has {la} bytes, {} has {lb}", a.display(), b.display()));
    }
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < la {
        let n = usize::try_from((la - at).min(1 << 20)).expect("piece");
        fa.read_exact(&mut ba[..n]).map_err(|e| format!("read {}: {e}", a.display()))?;
        fb.read_exact(&mut bb[..n]).map_err(|e| format!("read {}: {e}", b.display()))?;
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            let blocks = ba[..n].chunks(crate::BS).zip(bb[..n].chunks(crate::BS)).filter(|(x, y)| x != y).count();
            return Err(format!(
                "{} and {} differ first at offset {} ({blocks} blocks of 4 KiB differ in that MiB)",
                a.display(),
                b.display(),
                at + i as u64
            ));
        }
        at += n as u64;
    }
    Ok(())
}

/// [`compare_files`], panicking with `what` when they differ.
#[track_caller]
pub fn assert_same_files(what: &str, a: &Path, b: &Path) {
    if let Err(e) = compare_files(a, b) {
        panic!("{what}: {e}");
    }
}

/// Whether the file at `p` holds the bytes `needle` anywhere (streamed, in pieces that
/// overlap by the needle's length).
pub fn file_contains(p: &Path, needle: &[u8]) -> bool {
    assert!(!needle.is_empty(), "an empty needle is everywhere");
    let mut f = File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut buf = vec![0u8; (4 << 20) + needle.len()];
    let mut keep = 0usize;
    loop {
        let n = f.read(&mut buf[keep..]).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        if n == 0 {
            return false;
        }
        let filled = keep + n;
        if buf[..filled].windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        keep = (needle.len() - 1).min(filled);
        buf.copy_within(filled - keep..filled, 0);
    }
}

impl TwoSites {
    /// Two sites with empty hook directories; `tag` names the temporary directory.
    pub fn new(tag: &str) -> TwoSites {
        TwoSites::with_hooks(tag, &[])
    }

    /// Two sites whose daemons run hooks from a directory holding `scripts` (name, shell
    /// body: see [`crate::hooks_dir`]) as root.
    pub fn with_hooks(tag: &str, scripts: &[(&str, &str)]) -> TwoSites {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        assert!(
            nix::unistd::geteuid().is_root(),
            "two sites need root: network namespaces and veth pairs (CI runs as root)"
        );
        remove_stale_namespaces();
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        // The addresses only exist inside the two namespaces; pid and counter keep them apart
        // anyway, so that two pairs never look alike in a log.
        let (x, y) = (100 + n % 100, pid % 250);
        let tmp = tempfile::Builder::new().prefix(&format!("forkd-twosite-{tag}-")).tempdir().expect("tempdir");
        let scratch = tmp.path().join("scratch");
        std::fs::create_dir_all(&scratch).expect("scratch dir");
        let bin = forkd_bin();
        let make = |side: Side| {
            let (letter, host) = match side {
                Side::A => ("A", 1),
                Side::B => ("B", 2),
            };
            let root = tmp.path().join(letter);
            std::fs::create_dir_all(&root).expect("site dir");
            crate::hooks_dir(&root, scripts);
            let token: String = (0..32).map(|_| format!("{:x}", rand::random::<u8>() % 16)).collect();
            let token_file = root.join("token");
            std::fs::write(&token_file, format!("{token}\n")).expect("token file");
            std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("chmod token file");
            Site {
                side,
                ns: format!("fk{letter}-{pid}-{n}"),
                veth: format!("fk{}{pid}n{n}", letter.to_lowercase()),
                addr: format!("10.{x}.{y}.{host}"),
                bin: bin.clone(),
                root,
                child: None,
                extra: Vec::new(),
            }
        };
        let mut ts = TwoSites { sites: [make(Side::A), make(Side::B)], scratch, tmp };
        ts.build_network();
        for s in &mut ts.sites {
            s.respawn();
        }
        ts
    }

    /// The namespaces, the veth pair, addresses, links up. Nothing else talks on the link:
    /// no IPv6 addresses are generated on it (no neighbour discovery chatter).
    fn build_network(&self) {
        let [a, b] = &self.sites;
        for s in [a, b] {
            ip(&["netns", "add", &s.ns]);
        }
        ip(&["link", "add", &a.veth, "type", "veth", "peer", "name", &b.veth]);
        for s in [a, b] {
            ip(&["link", "set", &s.veth, "netns", &s.ns]);
            ip(&["-n", &s.ns, "link", "set", &s.veth, "addrgenmode", "none"]);
            ip(&["-n", &s.ns, "addr", "add", &format!("{}/30", s.addr), "dev", &s.veth]);
            ip(&["-n", &s.ns, "link", "set", "lo", "up"]);
            ip(&["-n", &s.ns, "link", "set", &s.veth, "up"]);
        }
    }

    /// One site.
    pub fn site(&self, side: Side) -> &Site {
        &self.sites[side.index()]
    }

    /// One site, to kill or restart its daemon.
    pub fn site_mut(&mut self, side: Side) -> &mut Site {
        &mut self.sites[side.index()]
    }

    /// Site A.
    pub fn a(&self) -> &Site {
        self.site(Side::A)
    }

    /// Site B.
    pub fn b(&self) -> &Site {
        self.site(Side::B)
    }

    /// The temporary directory holding both sites' directories (`A/`, `B/`: data, log,
    /// token, hooks) and the scratch directory.
    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// A directory for images and dumps, removed with everything else.
    pub fn scratch(&self) -> &Path {
        &self.scratch
    }

    /// The API URL of `side` as the other site reaches it (`http://10.X.Y.N:PORT`).
    pub fn url(&self, side: Side) -> String {
        self.site(side).url()
    }

    /// Take site A's end of the link down: A has no route to B, B's end has no carrier.
    pub fn cut_link(&self) {
        let a = self.a();
        ip(&["-n", &a.ns, "link", "set", &a.veth, "down"]);
    }

    /// Bring site A's end of the link up again (its address and route come back with it).
    pub fn restore_link(&self) {
        let a = self.a();
        ip(&["-n", &a.ns, "link", "set", &a.veth, "up"]);
    }

    /// Limit what `side` sends over the link to `mbit` Mbit/s (a token bucket with a burst
    /// large enough that segmentation offload stays whole, so the counters keep counting
    /// large packets); `None` removes the limit.
    pub fn limit_rate(&self, side: Side, mbit: Option<u32>) {
        let s = self.site(side);
        match mbit {
            Some(m) => {
                let rate = format!("{m}mbit");
                let args = ["qdisc", "replace", "dev", &s.veth, "root", "tbf", "rate", &rate, "burst", "1mb"];
                let out = run_bounded(s.in_ns("tc").args(args).args(["latency", "200ms"]), IP_TIMEOUT);
                assert_success("tc qdisc replace ... tbf", &out);
            }
            None => {
                let out = run_bounded(s.in_ns("tc").args(["qdisc", "del", "dev", &s.veth, "root"]), IP_TIMEOUT);
                assert_success("tc qdisc del", &out);
            }
        }
    }

    /// Bytes `side`'s end of the link has sent (its `tx_bytes` counter).
    pub fn tx_bytes(&self, side: Side) -> u64 {
        self.site(side).link_counter("tx")
    }

    /// Bytes `side`'s end of the link has received (its `rx_bytes` counter).
    pub fn rx_bytes(&self, side: Side) -> u64 {
        self.site(side).link_counter("rx")
    }

    /// Kill `side`'s daemon with SIGKILL.
    pub fn kill9(&mut self, side: Side) {
        self.site_mut(side).kill9();
    }

    /// Start `side`'s daemon again: same data directory, address, port and token.
    pub fn restart(&mut self, side: Side) {
        self.site_mut(side).restart();
    }

    /// Run the CLI in `from`'s namespace against `to`'s API (with `to`'s token): what it sends
    /// and receives crosses the link. Bounded by [`CLI_TIMEOUT`].
    pub fn cli_across(&self, from: Side, to: Side, args: &[&str]) -> Output {
        let t = self.site(to);
        run_bounded(&mut self.site(from).cli_command_at(&t.url(), &t.token_file(), args), CLI_TIMEOUT)
    }

    /// [`TwoSites::cli_across`] with a deadline: `Err` (what it printed) when it was still
    /// running after `timeout` and was killed.
    pub fn cli_across_within(&self, from: Side, to: Side, args: &[&str], timeout: Duration) -> Result<Output, Output> {
        let t = self.site(to);
        run_with_deadline(&mut self.site(from).cli_command_at(&t.url(), &t.token_file(), args), timeout)
    }

    /// Dump `reference` on both sites into the scratch directory, compare the images byte
    /// for byte, and delete them. Panics naming the first difference.
    #[track_caller]
    pub fn assert_same_on_both(&self, reference: &str) {
        let tag = reference.replace(['@', '/'], "-");
        let fa = self.scratch.join(format!("cmp-A-{tag}.img"));
        let fb = self.scratch.join(format!("cmp-B-{tag}.img"));
        self.a().dump(reference, &fa);
        self.b().dump(reference, &fb);
        let same = compare_files(&fa, &fb);
        let _ = std::fs::remove_file(&fa);
        let _ = std::fs::remove_file(&fb);
        if let Err(e) = same {
            panic!("{reference} is not the same on both sites: {e}");
        }
    }
}

impl Drop for TwoSites {
    fn drop(&mut self) {
        for s in &mut self.sites {
            s.kill9();
        }
        if std::thread::panicking() {
            for s in &self.sites {
                eprintln!(
                    "--- forkd log of site {:?} ({}) ---\n{}\n--- end of site {:?}'s log ---",
                    s.side,
                    s.log_path().display(),
                    tail(&s.log(), 150),
                    s.side
                );
            }
        }
        for s in &self.sites {
            remove_namespace(&s.ns);
        }
    }
}

impl Site {
    /// Which site this is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// Its network namespace.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// Its end of the veth pair.
    pub fn veth(&self) -> &str {
        &self.veth
    }

    /// Its address on the link.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `http://ADDR:PORT`, its API as both sites reach it.
    pub fn url(&self) -> String {
        format!("http://{}:{API_PORT}", self.addr)
    }

    /// The file holding the token its API requires.
    pub fn token_file(&self) -> PathBuf {
        self.root.join("token")
    }

    /// Its data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// Its hooks directory.
    pub fn hooks_dir(&self) -> PathBuf {
        self.root.join("hooks")
    }

    /// Bytes its extent file takes on disk.
    pub fn extents_allocated(&self) -> u64 {
        crate::allocated_bytes(&self.data_dir().join("extents.0"))
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`, for NBD clients run in its namespace ([`Site::in_ns`]).
    pub fn nbd_uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{NBD_PORT}/{}", crate::enc(export))
    }

    fn log_path(&self) -> PathBuf {
        self.root.join("daemon.log")
    }

    /// Everything its daemon has logged (all runs).
    pub fn log(&self) -> String {
        read_log(&self.log_path())
    }

    /// `PROGRAM` to be run in its namespace: `ip netns exec NS PROGRAM`.
    pub fn in_ns(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }

    /// `forkd --api URL --token-file TOKEN ARGS...` in its namespace, `FORKD_API` and
    /// `FORKD_TOKEN` removed from its environment.
    fn cli_command_at(&self, url: &str, token_file: &Path, args: &[&str]) -> Command {
        let mut cmd = self.in_ns(&self.bin);
        cmd.arg("--api").arg(url).arg("--token-file").arg(token_file).args(args);
        cmd.env_remove("FORKD_API").env_remove("FORKD_TOKEN");
        cmd
    }

    /// The CLI against its own daemon, in its namespace.
    fn cli_command(&self, args: &[&str]) -> Command {
        self.cli_command_at(&self.url(), &self.token_file(), args)
    }

    /// Run `forkd ARGS...` against its daemon (bounded by [`CLI_TIMEOUT`]).
    pub fn cli(&self, args: &[&str]) -> Output {
        run_bounded(&mut self.cli_command(args), CLI_TIMEOUT)
    }

    /// Run `forkd ARGS...` against its daemon; `Err` (what it printed) when it was still
    /// running after `timeout` and was killed.
    pub fn cli_within(&self, args: &[&str], timeout: Duration) -> Result<Output, Output> {
        run_with_deadline(&mut self.cli_command(args), timeout)
    }

    /// Run `forkd ARGS...` in its namespace against the API at `url` with the token in
    /// `token_file`; `Err` (what it printed) when it was still running after `timeout`.
    pub fn cli_at(&self, url: &str, token_file: &Path, args: &[&str], timeout: Duration) -> Result<Output, Output> {
        run_with_deadline(&mut self.cli_command_at(url, token_file, args), timeout)
    }

    /// Start `forkd ARGS...` against its daemon in the background; its output goes to files
    /// named after `name` in the site's directory.
    pub fn cli_background(&self, name: &str, args: &[&str]) -> Background {
        Background::spawn(self.cli_command(args), &self.root, name)
    }

    /// Run a CLI command that must succeed; returns its stdout.
    #[track_caller]
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert_success(&format!("forkd {} on site {:?}", args.join(" "), self.side), &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run a CLI command with `--json` that must succeed; returns its parsed stdout.
    #[track_caller]
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let text = self.cli_ok(&a);
        serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("forkd {} on site {:?}: stdout is not JSON ({e}): {text}", a.join(" "), self.side)
        })
    }

    /// Run a CLI command that must fail; returns its stderr.
    #[track_caller]
    pub fn cli_fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "forkd {} on site {:?} should have failed\nstdout: {}",
            args.join(" "),
            self.side,
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// An HTTP request to its API from inside its namespace, with its token; `body` is sent
    /// as `application/octet-stream`. Panics when the request cannot be made at all.
    pub fn http(&self, method: &str, path: &str, body: Option<&[u8]>) -> Http {
        let mut cmd = self.in_ns(python());
        cmd.args(["-c", HTTP_PY, "req", &self.addr, &API_PORT.to_string()]).arg(self.token_file()).args([method, path]);
        let body_file = body.map(|b| {
            let f = tempfile::NamedTempFile::new_in(&self.root).expect("body file");
            std::fs::write(f.path(), b).expect("write body file");
            f
        });
        if let Some(f) = &body_file {
            cmd.arg(f.path());
        }
        let out = run_bounded(&mut cmd, CLI_TIMEOUT);
        assert_success(&format!("{method} {path} on site {:?}", self.side), &out);
        let nl = out.stdout.iter().position(|&c| c == b'\n').expect("the helper prints the status first");
        let status = std::str::from_utf8(&out.stdout[..nl]).ok().and_then(|s| s.parse().ok()).expect("status");
        Http { status, body: out.stdout[nl + 1..].to_vec() }
    }

    /// `GET path` expecting 2xx and JSON.
    #[track_caller]
    pub fn get_json(&self, path: &str) -> Value {
        let r = self.http("GET", path, None);
        assert!(r.ok(), "GET {path} on site {:?}: HTTP {} {}", self.side, r.status, r.text());
        r.json()
    }

    /// Write `data` at `offset` of volume `name` through the HTTP data route, expecting 2xx.
    #[track_caller]
    pub fn write(&self, name: &str, offset: u64, data: &[u8]) {
        let path = format!("/v1/volumes/{}/data?offset={offset}", crate::enc(name));
        let r = self.http("PUT", &path, Some(data));
        assert!(r.ok(), "PUT {path} ({} bytes) on site {:?}: HTTP {} {}", data.len(), self.side, r.status, r.text());
    }

    /// Read `length` bytes at `offset` of a volume or snapshot through the HTTP data route.
    #[track_caller]
    pub fn read(&self, reference: &str, offset: u64, length: u64) -> Vec<u8> {
        let path = format!("/v1/volumes/{}/data?offset={offset}&length={length}", crate::enc(reference));
        let r = self.http("GET", &path, None);
        assert!(r.ok(), "GET {path} on site {:?}: HTTP {} {}", self.side, r.status, r.text());
        assert_eq!(r.body.len() as u64, length, "GET {path} on site {:?}: wrong body length", self.side);
        r.body
    }

    /// `GET /metrics` as text.
    pub fn metrics(&self) -> String {
        let r = self.http("GET", "/metrics", None);
        assert!(r.ok(), "GET /metrics on site {:?}: HTTP {} {}", self.side, r.status, r.text());
        r.text()
    }

    /// Wait (at most a minute) until garbage collection has emptied its queue and flushed
    /// (`forkd_gc_queued_nodes` is 0), as [`crate::Daemon::wait_for_garbage_collection`].
    pub fn wait_for_garbage_collection(&self) {
        let started = Instant::now();
        while metric_value(&self.metrics(), "forkd_gc_queued_nodes") != 0.0 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "garbage collection on site {:?} did not finish within a minute\n{}",
                self.side,
                tail(&self.log(), 40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Start a writer in its namespace: 4 KiB of random bytes at a random block (from
    /// `seed`) below `blocks` of `volume`, `rate` times a second for `seconds`, through the
    /// HTTP data route. Its stdout, once it exits, is `{"writes": N, "seconds": S}`.
    pub fn start_writer(&self, volume: &str, rate: u32, seconds: u32, blocks: u64, seed: u64) -> Background {
        let mut cmd = self.in_ns(python());
        cmd.args(["-c", HTTP_PY, "writer", &self.addr, &API_PORT.to_string()]).arg(self.token_file()).args([
            &crate::enc(volume),
            &rate.to_string(),
            &seconds.to_string(),
            &blocks.to_string(),
            &seed.to_string(),
        ]);
        Background::spawn(cmd, &self.root, &format!("writer-{volume}"))
    }

    /// `forkd source create NAME --size SIZE`.
    pub fn create_source(&self, name: &str, size: &str) {
        self.cli_ok(&["source", "create", name, "--size", size]);
    }

    /// `forkd ingest NAME --from IMAGE` (the agent in its namespace); returns the snapshot
    /// the ingest made (`NAME@N`).
    pub fn ingest(&self, name: &str, image: &Path) -> String {
        self.cli_ok(&["ingest", name, "--from", image.to_str().expect("utf-8 path")]);
        self.latest_snapshot(name)
            .unwrap_or_else(|| panic!("ingest into {name} on site {:?} made no snapshot", self.side))
    }

    /// `forkd snapshot VOLUME`; returns the snapshot's name.
    pub fn snapshot(&self, volume: &str) -> String {
        let v = self.cli_json(&["snapshot", volume]);
        v["snapshot"].as_str().unwrap_or_else(|| panic!("snapshot {volume}: no name in {v}")).to_string()
    }

    /// `forkd clone FROM NAME`.
    pub fn clone_volume(&self, from: &str, name: &str) {
        self.cli_ok(&["clone", from, name]);
    }

    /// `forkd show VOLUME --json`.
    pub fn show(&self, volume: &str) -> Value {
        self.cli_json(&["show", volume])
    }

    /// The names of a volume's snapshots, oldest first (none when it has none).
    pub fn snapshots(&self, volume: &str) -> Vec<String> {
        let v = self.show(volume);
        v["snapshots"]
            .as_array()
            .map(|s| s.iter().filter_map(|x| x["name"].as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    }

    /// The name of a volume's newest snapshot.
    pub fn latest_snapshot(&self, volume: &str) -> Option<String> {
        self.snapshots(volume).pop()
    }

    /// `forkd dump REFERENCE FILE`.
    pub fn dump(&self, reference: &str, file: &Path) {
        self.cli_ok(&["dump", reference, file.to_str().expect("utf-8 path")]);
    }

    /// `forkd tree` as text.
    pub fn tree(&self) -> String {
        self.cli_ok(&["tree"])
    }

    /// `side`'s `tx` or `rx` byte counter of its end of the link (`ip -s -j link show`).
    fn link_counter(&self, dir: &str) -> u64 {
        let text = ip(&["-n", &self.ns, "-s", "-j", "link", "show", "dev", &self.veth]);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("ip -j link show: {e}: {text}"));
        v[0]["stats64"][dir]["bytes"].as_u64().unwrap_or_else(|| panic!("no {dir} bytes in {text}"))
    }

    /// Whether its daemon runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Kill its daemon with SIGKILL and reap it (`ip netns exec` execs the daemon, so the
    /// child is the daemon itself).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stop its daemon gracefully (SIGTERM, bounded wait); returns its exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap_or_else(|| panic!("site {:?}: daemon not running", self.side));
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let started = Instant::now();
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st;
            }
            if started.elapsed() > crate::STOP_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "site {:?}: forkd did not stop within {:?} of SIGTERM\n{}",
                    self.side,
                    crate::STOP_TIMEOUT,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start its daemon again (after a kill or stop): same data directory, address, port,
    /// token and flags.
    pub fn restart(&mut self) {
        self.respawn();
    }

    /// Start its daemon again with `extra` `serve` flags from now on (kept across restarts).
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.respawn();
    }

    /// Spawn with retries (the port may be held a moment by the daemon that just went).
    fn respawn(&mut self) {
        let mut last = String::new();
        for attempt in 0..10u64 {
            match self.try_spawn() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100 * (attempt + 1)));
        }
        panic!("site {:?}: could not start forkd: {last}\n--- daemon log ---\n{}", self.side, tail(&self.log(), 60));
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "site {:?}: daemon already running", self.side);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log_path().display()));
        let log2 = log.try_clone().expect("clone log fd");
        let mut cmd = self.in_ns(&self.bin);
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--api")
            .arg(format!("{}:{API_PORT}", self.addr))
            .args(["--nbd", &format!("127.0.0.1:{NBD_PORT}"), "--iscsi", &format!("127.0.0.1:{ISCSI_PORT}")])
            .arg("--token-file")
            .arg(self.token_file())
            .arg("--hooks-dir")
            .arg(self.hooks_dir())
            .args(["--hook-user", "root"])
            .args(&self.extra)
            .env_remove("FORKD_API")
            .env_remove("FORKD_TOKEN")
            .env("FORKD_LOW_SPACE_THRESHOLD", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let child = cmd.spawn().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < READY_TIMEOUT {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(format!("forkd serve exited early with {st}"));
            }
            if matches!(self.cli_within(&["list"], Duration::from_secs(5)), Ok(o) if o.status.success()) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
        Err(format!("forkd serve did not answer within {READY_TIMEOUT:?}"))
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.kill9();
    }
}
