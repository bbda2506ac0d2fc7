//! forkd under systemd's protocols, without systemd: a real `forkd serve` and a test that
//! plays the service manager.
//!
//! Notify: the test binds a unix datagram socket, starts the daemon with `NOTIFY_SOCKET` at it
//! and `WATCHDOG_USEC` set, and expects the start-up `STATUS=` lines, `READY=1` with the
//! serving status (the API answers right after it), `WATCHDOG=1` keep-alives, and `STOPPING=1`
//! and the final flush's status on SIGTERM, then a clean exit.
//!
//! Socket activation: `systemd-socket-activate` listens on three ports named `api`, `nbd` and
//! `iscsi` and starts the daemon on the first connection; the daemon's own addresses point at a
//! port the test holds, so binding instead of taking the sockets would fail. The real CLI, a
//! real NBD client (`nbdinfo`) and an iSCSI login are served on the passed sockets. A socket
//! with another name is refused with a message that says how to name it, and an API socket off
//! loopback without a token is refused as a configured one is.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use forkd_tests::iscsi_raw::{target_name, Initiator, LoginOptions};
use forkd_tests::{forkd_bin, free_port, port_in_log, run_bounded, tail, wait_or_kill, Api, CLI_TIMEOUT, STOP_TIMEOUT};

/// Bound on waiting for one expected notification.
const NOTIFY_WAIT: Duration = Duration::from_secs(20);
/// Bound on waiting for `systemd-socket-activate` to listen.
const LISTEN_WAIT: Duration = Duration::from_secs(10);

/// A child process killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigterm(child: &Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
}

/// The notifications received on `socket` until one contains `wanted` (that one included);
/// panics with what came (and the daemon's log) after [`NOTIFY_WAIT`].
fn until(socket: &UnixDatagram, wanted: &str, log: &Path) -> Vec<String> {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    while started.elapsed() < NOTIFY_WAIT {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = msg.lines().any(|l| l == wanted);
                got.push(msg);
                if done {
                    return got;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("recv on the notify socket: {e}"),
        }
    }
    let log = std::fs::read_to_string(log).unwrap_or_default();
    panic!("no {wanted} within {NOTIFY_WAIT:?}; received: {got:#?}\n--- daemon log ---\n{}", tail(&log, 50));
}

fn log_file(path: &Path) -> (Stdio, Stdio) {
    let f = std::fs::File::create(path).expect("log file");
    (Stdio::from(f.try_clone().expect("clone log")), Stdio::from(f))
}

#[test]
fn notify_ready_status_watchdog_and_stopping() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sock_path = tmp.path().join("notify.sock");
    let socket = UnixDatagram::bind(&sock_path).expect("bind the notify socket");
    socket.set_read_timeout(Some(Duration::from_millis(200))).expect("read timeout");
    let port = free_port();
    let log = tmp.path().join("daemon.log");
    let (out, err) = log_file(&log);
    let child = Command::new(forkd_bin())
        .args(["serve", "--data-dir"])
        .arg(tmp.path().join("data"))
        .args(["--api", &format!("127.0.0.1:{port}"), "--nbd", "127.0.0.1:0", "--iscsi", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .env_remove("LISTEN_PID")
        .env("FORKD_LOW_SPACE_THRESHOLD", "0")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start forkd serve");
    let mut child = Guard(child);

    let start = until(&socket, "READY=1", &log);
    let api = Api::new(port);
    let r = api.get("/v1/volumes");
    assert_eq!(r.status, 200, "the API right after READY=1: {}", r.text());
    let lines: Vec<&str> = start.iter().flat_map(|m| m.lines()).collect();
    let position = |l: &str| lines.iter().position(|x| *x == l);
    let (opening, binding, ready) =
        (position("STATUS=opening the store"), position("STATUS=binding the listeners"), position("READY=1"));
    assert!(opening < binding && binding < ready && opening.is_some(), "start-up order: {lines:#?}");
    let serving = lines.iter().find(|l| l.starts_with("STATUS=serving: ")).expect("a serving status");
    assert!(serving.contains(&format!("api 127.0.0.1:{port}, nbd 127.0.0.1:")), "{serving}");
    assert!(!lines.contains(&"WATCHDOG=1") && !lines.contains(&"STOPPING=1"), "before READY: {lines:#?}");

    // Every 0.5 s at WATCHDOG_USEC=1 s: two keep-alives after READY.
    until(&socket, "WATCHDOG=1", &log);
    until(&socket, "WATCHDOG=1", &log);

    sigterm(&child.0);
    let stop = until(&socket, "STOPPING=1", &log);
    assert!(stop.last().is_some_and(|m| m.contains("STATUS=stopping: draining connections")), "{stop:#?}");
    until(&socket, "STATUS=stopping: final flush", &log);
    let (status, exited) = wait_or_kill(&mut child.0, STOP_TIMEOUT, "forkd serve");
    assert!(exited && status.success(), "forkd serve after SIGTERM: {status}");
}

/// `systemd-socket-activate` listening on three free ports named `names` (the first on
/// `first_host`, the others on 127.0.0.1), running `forkd serve` whose own addresses are all
/// `taken` (a port the caller holds).
fn socket_activate(root: &Path, names: &str, taken: u16, first_host: &str) -> (Guard, [u16; 3], PathBuf) {
    let ports = [free_port(), free_port(), free_port()];
    let log = root.join("daemon.log");
    let addr = format!("127.0.0.1:{taken}");
    let mut cmd = Command::new("systemd-socket-activate");
    for (i, p) in ports.into_iter().enumerate() {
        cmd.arg("-l").arg(format!("{}:{p}", if i == 0 { first_host } else { "127.0.0.1" }));
    }
    cmd.arg(format!("--fdname={names}"))
        .arg(forkd_bin())
        .args(["serve", "--data-dir"])
        .arg(root.join("data"))
        .args(["--api", &addr, "--nbd", &addr, "--iscsi", &addr])
        .env("FORKD_LOW_SPACE_THRESHOLD", "0")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(&log).expect("log")))
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run systemd-socket-activate (package systemd)");
    let stderr = child.stderr.take().expect("stderr");
    let child = Guard(child);
    // Its "Listening on ..." lines, then everything else into the log.
    let (tx, rx) = mpsc::channel();
    let log2 = log.clone();
    std::thread::spawn(move || {
        use std::io::Write;
        let mut out = std::fs::OpenOptions::new().append(true).open(&log2).expect("log");
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(out, "{line}");
            let _ = tx.send(line);
        }
    });
    let started = Instant::now();
    let mut listening = 0;
    while listening < 3 {
        let left = LISTEN_WAIT.saturating_sub(started.elapsed());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| panic!("systemd-socket-activate did not listen"));
        listening += usize::from(line.starts_with("Listening on "));
    }
    (child, ports, log)
}

#[test]
fn socket_activation_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let taken = held.local_addr().expect("addr").port();
    let (mut child, [api, nbd, iscsi], log) = socket_activate(tmp.path(), "api:nbd:iscsi", taken, "127.0.0.1");
    let cli = |args: &[&str]| {
        let mut cmd = Command::new(forkd_bin());
        cmd.arg("--api").arg(format!("http://127.0.0.1:{api}")).args(args).env_remove("FORKD_API");
        let out = run_bounded(&mut cmd, CLI_TIMEOUT);
        assert!(
            out.status.success(),
            "forkd {args:?}: {}\n--- daemon log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&std::fs::read_to_string(&log).unwrap_or_default(), 50)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The first connection starts the daemon; it is answered once the daemon serves.
    cli(&["list"]);
    let img = tmp.path().join("src.img");
    std::fs::write(&img, vec![0x5au8; 4 << 20]).expect("image");
    cli(&["source", "create", "prod", "--size", "4M"]);
    cli(&["ingest", "prod", "--from", img.to_str().expect("utf-8")]);
    cli(&["clone", "prod@1", "dev"]);
    assert!(cli(&["list"]).contains("dev"), "the clone is listed");

    let mut nbdinfo = Command::new("nbdinfo");
    nbdinfo.arg("--size").arg(format!("nbd://127.0.0.1:{nbd}/dev"));
    let out = run_bounded(&mut nbdinfo, CLI_TIMEOUT);
    assert!(out.status.success(), "nbdinfo: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), (4u64 << 20).to_string());

    let opts = LoginOptions::new("iqn.2026-12.dev.forkd.test:systemd", &target_name("dev"));
    Initiator::open(&format!("127.0.0.1:{iscsi}"), &opts).logout();

    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let served = ["api", "nbd", "iscsi"].map(|key| port_in_log(&text, key));
    assert_eq!(served, [Some(api), Some(nbd), Some(iscsi)], "the passed sockets, not {taken}:\n{text}");
    sigterm(&child.0);
    let (status, exited) = wait_or_kill(&mut child.0, STOP_TIMEOUT, "forkd serve");
    assert!(exited && status.success(), "forkd serve after SIGTERM: {status}");
    drop(held);
}

#[test]
fn socket_activation_refuses_an_unknown_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let taken = held.local_addr().expect("addr").port();
    let (mut child, [api, _, _], log) = socket_activate(tmp.path(), "api:nbd:web", taken, "127.0.0.1");
    // Start it: the daemon exits at once, so the connection may be refused or reset.
    let _ = std::net::TcpStream::connect(("127.0.0.1", api));
    let (status, exited) = wait_or_kill(&mut child.0, STOP_TIMEOUT, "forkd serve");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(exited && !status.success(), "forkd serve with a socket named web: {status}\n{text}");
    assert!(text.contains("named \"web\"") && text.contains("FileDescriptorName="), "{text}");
}

#[test]
fn socket_activation_of_an_api_off_loopback_needs_the_token() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let taken = held.local_addr().expect("addr").port();
    // The configured API address is loopback; the socket systemd passes is not.
    let (mut child, [api, _, _], log) = socket_activate(tmp.path(), "api:nbd:iscsi", taken, "0.0.0.0");
    let _ = std::net::TcpStream::connect(("127.0.0.1", api));
    let (status, exited) = wait_or_kill(&mut child.0, STOP_TIMEOUT, "forkd serve");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(exited && !status.success(), "forkd serve with an API socket on 0.0.0.0 and no token: {status}\n{text}");
    assert!(text.contains(&format!("0.0.0.0:{api} is reachable from other hosts")), "{text}");
}
