//! Connection abuse (issue 15, item 6): floods of sockets that never finish a handshake, a
//! login or an HTTP request must not lock real clients out.
//!
//! Every flood here comes from 127.0.0.1, the real clients' own address, so neither the
//! per-peer limits nor a refusal can be what lets the real client in: it gets through because
//! a new connection evicts the oldest idle handshake. The handshake timeouts are set far beyond
//! the tests' bounds (10 minutes), so a client that gets through did not wait for the flood to
//! time out. Each test prints how long its real clients took. The API's half-sent requests
//! and an idle keep-alive connection must be closed by the daemon (its header timeout).

use std::io::Read;
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkd_tests::{metric_value, run_bounded, tail, Daemon};

/// Size of the volume the real clients open.
const SIZE: u64 = 8 << 20;
/// Handshake and login timeouts far beyond every bound here.
const LONG_HANDSHAKES: &str = "[nbd_limits]\nhandshake_timeout_ms = 600000\n\n\
                               [iscsi_limits]\nhandshake_timeout_ms = 600000\n";
/// Bound on one real client's run.
const CLIENT_BOUND: Duration = Duration::from_secs(60);
/// Bound on waiting for the daemon to have seen a flood.
const FLOOD_WAIT: Duration = Duration::from_secs(60);

struct Env {
    d: Daemon,
    _tmp: tempfile::TempDir,
}

/// A daemon with `config` and a source `prod` cloned as `dev`.
fn setup(config: &str) -> Env {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_with_config(tmp.path(), config);
    let img = tmp.path().join("src.img");
    std::fs::write(&img, vec![0x5au8; usize::try_from(SIZE).expect("size")]).expect("write source image");
    d.cli_ok(&["source", "create", "prod", "--size", "8M"]);
    d.cli_ok(&["ingest", "prod", "--from", img.to_str().expect("utf-8 path")]);
    d.cli_ok(&["clone", "prod@1", "dev"]);
    Env { d, _tmp: tmp }
}

/// `n` idle TCP connections to `addr` (they send nothing).
fn flood(addr: &str, n: usize) -> Vec<TcpStream> {
    (0..n).map(|i| TcpStream::connect(addr).unwrap_or_else(|e| panic!("idle connection {i}: {e}"))).collect()
}

/// Wait (bounded) until the counter `series` reaches `at_least`.
#[track_caller]
fn wait_counter(d: &Daemon, series: &str, at_least: f64) -> f64 {
    let started = Instant::now();
    loop {
        let v = metric_value(&d.metrics(), series);
        if v >= at_least {
            return v;
        }
        assert!(
            started.elapsed() < FLOOD_WAIT,
            "{series} is {v}, expected at least {at_least}\n--- log ---\n{}",
            tail(&d.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `nbdinfo --size` of `dev` succeeds with its size; returns how long it took.
#[track_caller]
fn nbdinfo_ok(d: &Daemon) -> Duration {
    let started = Instant::now();
    let out = run_bounded(Command::new("nbdinfo").arg("--size").arg(d.nbd_uri("dev")), CLIENT_BOUND);
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim() == SIZE.to_string(),
        "nbdinfo failed: {stdout}{}\n--- log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&d.log(), 20)
    );
    took
}

/// Whether the daemon has closed `s` (EOF or a reset within the read timeout).
fn closed_by_daemon(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).expect("read timeout");
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn nbd_a_real_client_gets_through_2000_idle_sockets() {
    let env = setup(LONG_HANDSHAKES);
    let d = &env.d;
    let mut idle = flood(&d.nbd_addr(), 2000);
    // The daemon has taken in the whole flood: all but the last 8 (the per-peer bound) were
    // evicted, none timed out.
    let evicted = r#"forkd_nbd_connections_closed_total{reason="handshake evicted"}"#;
    wait_counter(d, evicted, 1992.0);
    let took = nbdinfo_ok(d);
    println!("nbdinfo after 2000 idle NBD sockets took {took:?}");
    assert_eq!(d.nbd_closed("handshake timeout"), 0);
    assert_eq!(d.nbd_closed("connection limit"), 0);
    // The newest idle sockets still hold their handshake slots.
    let newest = idle.last_mut().expect("a socket");
    assert!(!closed_by_daemon(newest, Duration::from_millis(200)), "the newest idle socket was closed");
}

#[test]
fn nbd_five_real_clients_get_through_a_peer_reconnecting_in_a_loop() {
    let env = setup(LONG_HANDSHAKES);
    let d = &env.d;
    let addr = d.nbd_addr();
    let stop = Arc::new(AtomicBool::new(false));
    // A peer that reconnects in a loop and leaves its last 500 sockets open (more than the
    // 256 connections the daemon serves).
    let looping = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut open = std::collections::VecDeque::new();
            let mut made = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if let Ok(s) = TcpStream::connect(&addr) {
                    open.push_back(s);
                    made += 1;
                }
                if open.len() > 500 {
                    open.pop_front();
                }
            }
            made
        })
    };
    wait_counter(d, r#"forkd_nbd_connections_closed_total{reason="handshake evicted"}"#, 600.0);
    let took: Vec<Duration> = (0..5).map(|_| nbdinfo_ok(d)).collect();
    stop.store(true, Ordering::SeqCst);
    let made = looping.join().expect("the looping peer");
    println!("5 nbdinfo runs while a peer made {made} connections in a loop took {took:?}");
    assert_eq!(d.nbd_closed("connection limit"), 0);
}

#[test]
fn iscsi_a_real_login_gets_through_400_idle_connections() {
    let env = setup(LONG_HANDSHAKES);
    let d = &env.d;
    let _idle = flood(&format!("127.0.0.1:{}", d.iscsi_port()), 400);
    wait_counter(d, r#"forkd_iscsi_connections_closed_total{reason="login evicted"}"#, 392.0);
    let started = Instant::now();
    let out = run_bounded(Command::new("iscsi-inq").arg(d.iscsi_url("dev")), CLIENT_BOUND);
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("FORKD"),
        "iscsi-inq failed: {stdout}{}\n--- log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&d.log(), 20)
    );
    println!("iscsi-inq after 400 idle iSCSI connections took {took:?}");
    assert_eq!(d.iscsi_closed("login timed out"), 0);
    assert_eq!(d.iscsi_closed("connection limit"), 0);
}

#[test]
fn api_a_real_client_gets_through_1100_half_sent_requests_which_are_closed() {
    let env = setup("");
    let d = &env.d;
    let addr = format!("127.0.0.1:{}", d.port());
    // A keep-alive connection that made one request and then stays idle.
    let mut idle = TcpStream::connect(&addr).expect("connect");
    std::io::Write::write_all(&mut idle, b"GET /v1/volumes HTTP/1.1\r\nHost: x\r\n\r\n").expect("send a request");
    let mut answer = [0u8; 12];
    idle.read_exact(&mut answer).expect("an answer");
    assert_eq!(&answer, b"HTTP/1.1 200", "the idle connection's request");
    let mut half_sent: Vec<TcpStream> = (0..1100)
        .map(|i| {
            let mut s = TcpStream::connect(&addr).unwrap_or_else(|e| panic!("API connection {i}: {e}"));
            std::io::Write::write_all(&mut s, b"GET / HTTP/1.1\r\nHost: x\r\n").expect("send half a request");
            s
        })
        .collect();
    let started = Instant::now();
    let out = d.cli_ok(&["list"]);
    let took = started.elapsed();
    assert!(out.contains("dev"), "forkd list during the flood:\n{out}");
    println!("forkd list after 1100 half-sent API requests took {took:?}");
    // Every half-sent request is closed by the daemon (evicted, or at the 10 s header
    // timeout), within a bound well past that timeout.
    let bound = Instant::now() + Duration::from_secs(60);
    for (i, s) in half_sent.iter_mut().enumerate() {
        let left = bound.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        assert!(closed_by_daemon(s, left), "half-sent request {i} still open after the bound");
    }
    println!("all 1100 half-sent requests closed {:?} after forkd list", started.elapsed());
    assert!(closed_by_daemon(&mut idle, Duration::from_secs(60)), "the idle keep-alive connection is still open");
    assert!(d.api().ready(), "the API answers after the flood");
}
