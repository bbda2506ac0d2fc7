//! The listener life cycle both protocols share, against a real daemon: the connection limit
//! and the handshake (login) timeout of `[nbd_limits]` and `[iscsi_limits]`, and a shutdown
//! with NBD and iSCSI clients connected.
//!
//! Limits: with `max_connections = 2`, two clients past their handshake are served, a third
//! connection is closed at once without a byte and counted as "connection limit"; once one of
//! the two has gone, a new client gets in. Timeout: a client that connects and says nothing is
//! closed and counted ("handshake timeout", "login timed out").
//!
//! Shutdown: SIGTERM while an NBD client and an iSCSI initiator sit idle after acknowledged
//! (unflushed) writes and another of each is mid-handshake. The daemon must close all of them
//! ("daemon shutting down"), before its final flush, exit 0 (within the test helper's bound),
//! and the acknowledged writes must be there after a restart.

use std::time::{Duration, Instant};

use forkd_tests::iscsi_raw::{target_name, Initiator, LoginOptions, BLOCK, GOOD};
use forkd_tests::rawnbd::{self, Client};
use forkd_tests::{metric_value, strip_ansi, tail, Daemon};

/// Size of every volume here.
const SIZE: u64 = 64 << 20;
/// The source holds this byte in its first MiB.
const FILL: u8 = 0x11;
/// The initiator name of every iSCSI session here.
const INITIATOR: &str = "iqn.2026-11.dev.forkd.test:listeners";
/// Bound on waiting for the daemon to close a connection.
const CLOSE_WAIT: Duration = Duration::from_secs(30);
/// Bound on waiting for a metric to reach its value.
const METRIC_WAIT: Duration = Duration::from_secs(10);

/// Small limits for both listeners.
const LIMITS: &str = "[nbd_limits]\nmax_connections = 2\nhandshake_timeout_ms = 5000\n\n\
                      [iscsi_limits]\nmax_connections = 2\nhandshake_timeout_ms = 5000\n";

struct Env {
    d: Daemon,
    _tmp: tempfile::TempDir,
}

/// A daemon (with `config`, if any) with source `prod` (64 MiB, first MiB 0x11) ingested as
/// `prod@1` and a clone `dev` of it.
fn setup(config: Option<&str>) -> Env {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = match config {
        Some(c) => Daemon::start_with_config(tmp.path(), c),
        None => Daemon::start_in(tmp.path()),
    };
    let img = tmp.path().join("src.img");
    let mut data = vec![0u8; usize::try_from(SIZE).expect("size")];
    data[..1 << 20].fill(FILL);
    std::fs::write(&img, &data).expect("write source image");
    d.cli_ok(&["source", "create", "prod", "--size", "64M"]);
    d.cli_ok(&["ingest", "prod", "--from", img.to_str().expect("utf-8 path")]);
    d.cli_ok(&["clone", "prod@1", "dev"]);
    Env { d, _tmp: tmp }
}

fn iscsi_addr(d: &Daemon) -> String {
    format!("127.0.0.1:{}", d.iscsi_port())
}

fn login(d: &Daemon, isid_tail: u8) -> Initiator {
    let opts = LoginOptions { isid_tail, ..LoginOptions::new(INITIATOR, &target_name("dev")) };
    Initiator::open(&iscsi_addr(d), &opts)
}

/// Wait (bounded) until the metric `series` is `value`.
#[track_caller]
fn wait_metric(d: &Daemon, series: &str, value: f64) {
    let started = Instant::now();
    loop {
        let m = d.metrics();
        let v = metric_value(&m, series);
        if v == value {
            return;
        }
        assert!(
            started.elapsed() < METRIC_WAIT,
            "{series} is {v}, expected {value} within {METRIC_WAIT:?}\n--- log ---\n{}",
            tail(&d.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh NBD client reads `dev`.
#[track_caller]
fn nbd_serves(d: &Daemon) -> Client {
    let mut c = Client::open(&d.nbd_addr(), "dev", false);
    assert_eq!(c.read(0, 4096).expect("read dev"), vec![FILL; 4096]);
    c
}

/// A fresh iSCSI session reads `dev`.
#[track_caller]
fn iscsi_serves(d: &Daemon, isid_tail: u8) -> Initiator {
    let mut c = login(d, isid_tail);
    let r = c.read16(0, 8);
    assert_eq!((r.status, &r.data[..]), (GOOD, &[FILL; 8 * BLOCK][..]), "READ (16) of dev");
    c
}

#[test]
fn nbd_connection_limit_refuses_counts_and_recovers() {
    let env = setup(Some(LIMITS));
    let d = &env.d;
    let a = nbd_serves(d);
    let mut b = nbd_serves(d);
    let mut extra = Client::connect_raw(&d.nbd_addr());
    let mut got = Vec::new();
    assert!(extra.wait_closed_collect(CLOSE_WAIT, &mut got), "the third connection was kept open");
    assert!(got.is_empty(), "the third connection got {} bytes (a greeting?)", got.len());
    assert_eq!(d.wait_nbd_closed("connection limit", 1, METRIC_WAIT), 1);
    // The two admitted clients are still served.
    assert_eq!(b.read(4096, 4096).expect("read on an admitted connection"), vec![FILL; 4096]);
    a.disconnect();
    wait_metric(d, "forkd_nbd_connections", 1.0);
    nbd_serves(d).disconnect();
    b.disconnect();
    assert_eq!(d.nbd_closed("connection limit"), 1);
}

#[test]
fn nbd_handshake_timeout_closes_a_silent_client() {
    let env = setup(Some(LIMITS));
    let d = &env.d;
    let mut silent = Client::connect(&d.nbd_addr());
    let mut got = Vec::new();
    assert!(silent.wait_closed_collect(CLOSE_WAIT, &mut got), "a silent client is still connected");
    assert!(got.is_empty(), "the daemon sent {} bytes to a silent client", got.len());
    assert_eq!(d.wait_nbd_closed("handshake timeout", 1, METRIC_WAIT), 1);
    nbd_serves(d).disconnect();
}

#[test]
fn iscsi_connection_limit_refuses_counts_and_recovers() {
    let env = setup(Some(LIMITS));
    let d = &env.d;
    let a = iscsi_serves(d, 1);
    let mut b = iscsi_serves(d, 2);
    let mut extra = Initiator::connect(&iscsi_addr(d));
    let mut got = Vec::new();
    assert!(extra.wait_closed_collect(CLOSE_WAIT, &mut got), "the third connection was kept open");
    assert!(got.is_empty(), "the third connection got {got:?}");
    assert_eq!(d.wait_iscsi_closed("connection limit", 1, METRIC_WAIT), 1);
    assert_eq!(b.test_unit_ready().status, GOOD, "an admitted session is still served");
    a.logout();
    wait_metric(d, "forkd_iscsi_connections", 1.0);
    iscsi_serves(d, 3).logout();
    b.logout();
    assert_eq!(d.iscsi_closed("connection limit"), 1);
}

#[test]
fn iscsi_login_timeout_closes_a_silent_initiator() {
    let env = setup(Some(LIMITS));
    let d = &env.d;
    let mut silent = Initiator::connect(&iscsi_addr(d));
    let mut got = Vec::new();
    assert!(silent.wait_closed_collect(CLOSE_WAIT, &mut got), "a silent initiator is still connected");
    assert!(got.is_empty(), "the target sent {got:?} to a silent initiator");
    assert_eq!(d.wait_iscsi_closed("login timed out", 1, METRIC_WAIT), 1);
    iscsi_serves(d, 1).logout();
}

#[test]
fn limits_in_the_config_are_checked_at_start_up() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = tmp.path().join("forkd.toml");
    std::fs::write(&cfg, "[iscsi_limits]\nmax_connections = 0\n").expect("write config");
    let data = tmp.path().join("data");
    let out = forkd_tests::run_forkd(
        &[
            "serve",
            "--config",
            cfg.to_str().expect("utf-8 path"),
            "--data-dir",
            data.to_str().expect("utf-8 path"),
            "--api",
            "127.0.0.1:0",
            "--nbd",
            "127.0.0.1:0",
            "--iscsi",
            "127.0.0.1:0",
        ],
        Duration::from_secs(30),
    )
    .unwrap_or_else(|o| panic!("forkd serve started with max_connections = 0: {}", String::from_utf8_lossy(&o.stderr)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "forkd serve accepted max_connections = 0");
    assert!(stderr.contains("iscsi_limits.max_connections"), "{stderr}");
}

#[test]
fn sigterm_drains_both_listeners_flushes_and_keeps_acknowledged_writes() {
    let mut env = setup(None);
    let d = &mut env.d;
    // NBD: a 64 KiB write at 4 MiB, acknowledged, never flushed.
    let mut nbd = Client::open(&d.nbd_addr(), "dev", false);
    nbd.write(4 << 20, &[0xa1; 65536]).expect("NBD write acknowledged");
    // iSCSI: a 64 KiB write at 8 MiB, acknowledged, never synchronised.
    let mut iscsi = login(d, 1);
    assert_eq!(iscsi.write16((8 << 20) / BLOCK as u64, &[0xb2; 65536]).status, GOOD, "WRITE (16)");
    // And one of each still in its handshake.
    let mut nbd_handshaking = Client::connect(&d.nbd_addr());
    nbd_handshaking.send_flags(rawnbd::C_FIXED_NEWSTYLE | rawnbd::C_NO_ZEROES).expect("send client flags");
    let mut iscsi_handshaking = Initiator::connect(&iscsi_addr(d));
    wait_metric(d, "forkd_nbd_connections", 2.0);
    wait_metric(d, "forkd_iscsi_connections", 2.0);

    let status = d.stop();
    assert!(status.success(), "forkd exited with {status} after SIGTERM\n--- log ---\n{}", tail(&d.log(), 40));
    assert!(nbd.wait_closed(CLOSE_WAIT), "the NBD client was not closed");
    assert!(nbd_handshaking.wait_closed(CLOSE_WAIT), "the NBD client in its handshake was not closed");
    let mut got = Vec::new();
    assert!(iscsi.wait_closed_collect(CLOSE_WAIT, &mut got), "the iSCSI session was not closed");
    assert!(iscsi_handshaking.wait_closed_collect(CLOSE_WAIT, &mut got), "the iSCSI login was not closed");

    // Every connection was closed for the shutdown before the final flush.
    let log = strip_ansi(&d.log());
    let stopped = log.find("forkd stopped cleanly").expect("the daemon did not log a clean stop");
    let before = &log[..stopped];
    let closes = |protocol: &str, reason: &str| {
        before.lines().filter(|l| l.contains(&format!("{protocol} connection closed")) && l.contains(reason)).count()
    };
    assert_eq!(closes("NBD", "reason=\"daemon shutting down\""), 2, "NBD closes before the stop:\n{before}");
    assert_eq!(closes("iSCSI", "why=\"daemon shutting down\""), 2, "iSCSI closes before the stop:\n{before}");

    d.restart();
    assert_eq!(d.api().read("dev", 4 << 20, 65536), vec![0xa1; 65536], "the NBD write is lost");
    assert_eq!(d.api().read("dev", 8 << 20, 65536), vec![0xb2; 65536], "the iSCSI write is lost");
    assert_eq!(d.api().read("dev", 0, 4096), vec![FILL; 4096]);
}
