//! Bad input on the NBD port, sent byte by byte over a raw TCP socket with a client written from
//! the protocol spec: malformed handshakes, unknown and over-long export names, out-of-range,
//! overflowing, oversized and read-only requests, truncated requests, junk after a request,
//! clients that vanish mid-payload, silent clients (handshake timeout) and the connection limit.
//!
//! After each scenario the daemon must still be running and serving, and
//! `forkd_nbd_connections_closed_total{reason="..."}` must count the close with the reason the
//! daemon gives for it (the strings are those of `daemon/src/server/nbd/mod.rs`).

use std::time::{Duration, Instant};

use forkd_tests::rawnbd::{self, Client};
use forkd_tests::{metric_value, Daemon};

const MIB: u64 = 1 << 20;
/// Size of every volume here.
const SIZE: u64 = 64 * MIB;
/// The source holds 0x11 in its first MiB and nothing else.
const FILL: u8 = 0x11;
/// Bound on waiting for a counter after the client saw the close.
const METRIC_WAIT: Duration = Duration::from_secs(10);
/// Bound on waiting for the server to close a connection.
const CLOSE_WAIT: Duration = Duration::from_secs(30);
/// The daemon's maximum request payload.
const MAX_PAYLOAD: u32 = 32 << 20;

struct Env {
    d: Daemon,
    _tmp: tempfile::TempDir,
}

/// A daemon with source `prod` (64 MiB, first MiB 0x11) ingested as `prod@1`, and a clone `dev`
/// of `prod@1`.
fn setup() -> Env {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_in(tmp.path());
    let img = tmp.path().join("src.img");
    let mut data = vec![0u8; usize::try_from(SIZE).expect("size")];
    data[..usize::try_from(MIB).expect("mib")].fill(FILL);
    std::fs::write(&img, &data).expect("write source image");
    d.cli_ok(&["source", "create", "prod", "--size", "64M"]);
    d.cli_ok(&["ingest", "prod", "--from", img.to_str().expect("utf-8 path")]);
    d.cli_ok(&["clone", "prod@1", "dev"]);
    Env { d, _tmp: tmp }
}

/// The daemon process runs, its API answers, and a fresh NBD connection reads `dev`.
#[track_caller]
fn assert_alive(d: &mut Daemon) {
    assert!(d.running(), "the daemon process died\n--- log ---\n{}", forkd_tests::tail(&d.log(), 40));
    assert!(d.api().ready(), "the daemon's API does not answer");
    let mut c = Client::open(&d.nbd_addr(), "dev", false);
    let got = c.read(0, 4096).expect("read 4 KiB of dev on a fresh connection");
    assert!(got.iter().all(|&b| b == FILL), "dev no longer reads its content");
    c.disconnect();
}

/// The counter of closes for `reason` reaches exactly `n` (waiting, bounded, for the bump).
#[track_caller]
fn assert_closed(d: &Daemon, reason: &str, n: u64) {
    let v = d.wait_nbd_closed(reason, n, METRIC_WAIT);
    assert_eq!(v, n, "forkd_nbd_connections_closed_total{{reason=\"{reason}\"}}");
}

fn nbd_errors(d: &Daemon, errno: &str) -> f64 {
    metric_value(&d.metrics(), &format!("forkd_nbd_errors_total{{errno=\"{errno}\"}}"))
}

/// Connect, read the greeting and send good client flags.
fn negotiating(addr: &str) -> Client {
    let mut c = Client::connect(addr);
    c.send_flags(rawnbd::C_FIXED_NEWSTYLE | rawnbd::C_NO_ZEROES).expect("send client flags");
    c
}

/// Assert the server closes `c` (bounded) without sending anything.
#[track_caller]
fn assert_closed_silently(c: &mut Client, what: &str) {
    let mut got = Vec::new();
    assert!(
        c.wait_closed_collect(CLOSE_WAIT, &mut got),
        "{what}: the server kept the connection open for {CLOSE_WAIT:?}"
    );
    assert!(
        got.is_empty(),
        "{what}: the server sent {} bytes before closing: {:02x?}",
        got.len(),
        &got[..got.len().min(64)]
    );
}

#[test]
fn wrong_client_flags_close_the_connection() {
    let mut env = setup();
    let addr = env.d.nbd_addr();
    // Without NBD_FLAG_C_FIXED_NEWSTYLE.
    let mut c = Client::connect(&addr);
    c.send_flags(0).expect("send flags");
    c.send_option(rawnbd::OPT_LIST, &[]).expect("send an option after the bad flags");
    assert_closed_silently(&mut c, "client flags 0");
    // With bits the server did not offer.
    let mut c = Client::connect(&addr);
    c.send_flags(0xffff_ffff).expect("send flags");
    assert_closed_silently(&mut c, "client flags 0xffffffff");
    assert_closed(&env.d, "malformed handshake", 2);
    assert_alive(&mut env.d);
}

#[test]
fn garbage_option_magic_closes_the_connection() {
    let mut env = setup();
    let addr = env.d.nbd_addr();
    let mut c = negotiating(&addr);
    let mut junk = b"IHAVEOPX".to_vec();
    junk.extend_from_slice(&rawnbd::OPT_LIST.to_be_bytes());
    junk.extend_from_slice(&0u32.to_be_bytes());
    c.send(&junk).expect("send junk option");
    assert_closed_silently(&mut c, "option with magic IHAVEOPX");
    // Plain garbage as the first option.
    let mut c = negotiating(&addr);
    c.send(&[0xde; 64]).expect("send garbage");
    assert_closed_silently(&mut c, "64 bytes of 0xde as an option");
    assert_closed(&env.d, "malformed handshake", 2);
    assert_alive(&mut env.d);
}

#[test]
fn unknown_export_is_refused_and_the_session_stays_usable() {
    let mut env = setup();
    let addr = env.d.nbd_addr();
    let mut c = negotiating(&addr);
    for name in ["nope", "dev@9", "prod@99", "dev\u{e9}"] {
        assert_eq!(c.go(name), Err(rawnbd::REP_ERR_UNKNOWN), "NBD_OPT_GO {name:?}");
    }
    // Same session: a good export now works.
    let e = c.go("dev").expect("NBD_OPT_GO dev after refusals");
    assert_eq!(e.size, SIZE);
    assert_eq!(e.flags & rawnbd::FLAG_READ_ONLY, 0, "a clone is writable");
    let got = c.read(0, 8192).expect("read dev");
    assert!(got[..4096].iter().all(|&b| b == FILL) && got[4096..].iter().all(|&b| b == FILL));
    c.disconnect();
    assert_closed(&env.d, "client sent NBD_CMD_DISC", 1);

    // NBD_OPT_EXPORT_NAME cannot carry an error: an unknown name closes the session.
    let mut c = negotiating(&addr);
    c.send_option(rawnbd::OPT_EXPORT_NAME, b"nope").expect("send NBD_OPT_EXPORT_NAME");
    assert_closed_silently(&mut c, "NBD_OPT_EXPORT_NAME nope");
    assert_closed(&env.d, "closed during handshake", 1);
    assert_eq!(env.d.nbd_closed("malformed handshake"), 0);
    assert_alive(&mut env.d);
}

#[test]
fn option_longer_than_4096_bytes_gets_too_big_and_stays_in_sync() {
    let mut env = setup();
    let addr = env.d.nbd_addr();
    let mut c = negotiating(&addr);
    // A GO whose export name alone is 4097 bytes.
    let long = vec![b'a'; 4097];
    c.send_option(rawnbd::OPT_GO, &Client::go_data(&long)).expect("send long GO");
    let r = c.read_option_reply().expect("reply to the long GO");
    assert_eq!((r.option, r.kind), (rawnbd::OPT_GO, rawnbd::REP_ERR_TOO_BIG), "reply to a 4103-byte GO: {r:?}");
    // An unknown option with 60000 bytes of data: skipped, answered TOO_BIG.
    c.send_option(0x4242, &vec![0x5a; 60_000]).expect("send a 60000-byte option");
    let r = c.read_option_reply().expect("reply to the 60000-byte option");
    assert_eq!((r.option, r.kind), (0x4242, rawnbd::REP_ERR_TOO_BIG), "{r:?}");
    // Exactly 4096 bytes of data is within the limit: an unknown export, not TOO_BIG.
    let name = vec![b'b'; 4096 - 6];
    c.send_option(rawnbd::OPT_GO, &Client::go_data(&name)).expect("send a 4096-byte GO");
    let r = c.read_option_reply().expect("reply to the 4096-byte GO");
    assert_eq!(r.kind, rawnbd::REP_ERR_UNKNOWN, "a 4096-byte GO naming no export: {r:?}");
    // Still in sync: LIST answers with the exports, then GO works.
    c.send_option(rawnbd::OPT_LIST, &[]).expect("send LIST");
    let mut names = Vec::new();
    for _ in 0..100 {
        let r = c.read_option_reply().expect("LIST reply");
        assert_eq!(r.option, rawnbd::OPT_LIST);
        if r.kind == rawnbd::REP_ACK {
            break;
        }
        assert_eq!(r.kind, rawnbd::REP_SERVER, "{r:?}");
        let n = usize::try_from(u32::from_be_bytes([r.data[0], r.data[1], r.data[2], r.data[3]])).expect("len");
        names.push(String::from_utf8_lossy(&r.data[4..4 + n]).into_owned());
    }
    names.sort();
    assert_eq!(names, ["dev", "prod", "prod@1"], "NBD_OPT_LIST after TOO_BIG");
    c.go("dev").expect("GO dev after TOO_BIG");
    assert_eq!(c.read(MIB - 4096, 8192).expect("read"), [vec![FILL; 4096], vec![0; 4096]].concat());
    c.disconnect();
    assert_closed(&env.d, "client sent NBD_CMD_DISC", 1);

    // Beyond what the server will skip (64 KiB): the session is aborted.
    let mut c = negotiating(&addr);
    let mut header = Client::option_bytes(0x4242, &[]);
    header[12..16].copy_from_slice(&(1u32 << 30).to_be_bytes());
    c.send(&header).expect("send a header announcing 1 GiB of option data");
    let _ = c.send(&[0u8; 4096]);
    assert_closed_silently(&mut c, "option announcing 1 GiB of data");
    // An over-long NBD_OPT_EXPORT_NAME cannot be answered with an error: closed.
    let mut c = negotiating(&addr);
    c.send_option(rawnbd::OPT_EXPORT_NAME, &[b'c'; 5000]).expect("send a 5000-byte EXPORT_NAME");
    assert_closed_silently(&mut c, "5000-byte NBD_OPT_EXPORT_NAME");
    assert_closed(&env.d, "malformed handshake", 2);
    assert_alive(&mut env.d);
}

#[test]
fn out_of_range_and_overflowing_reads_get_einval() {
    let mut env = setup();
    let addr = env.d.nbd_addr();
    let mut c = Client::open(&addr, "dev", false);
    let cases: [(u64, u32, &str); 6] = [
        (SIZE, 4096, "read at the end"),
        (SIZE - 2048, 4096, "read across the end"),
        (SIZE, 0, "zero-length read at the end"),
        (u64::MAX - 100, 4096, "offset + length overflows u64"),
        (u64::MAX, 1, "offset u64::MAX"),
        (0, MAX_PAYLOAD + 1, "read of 32 MiB + 1"),
    ];
    for (off, len, what) in cases {
        if len == 0 {
            // A zero-length read at the very end is in range; skip it for EINVAL purposes but
            // it must not break the stream.
            let r = c.read(off, 0);
            assert!(r.is_ok() || r == Err(rawnbd::EINVAL), "{what}: {r:?}");
            continue;
        }
        assert_eq!(c.read(off, len).map(|v| v.len()), Err(rawnbd::EINVAL), "{what} ({off}+{len})");
    }
    // Beyond 32 MiB and beyond the end at once.
    assert_eq!(c.read(SIZE - 4096, 40 << 20).map(|v| v.len()), Err(rawnbd::EINVAL), "40 MiB read across the end");
    // The largest allowed read works and the stream is still in sync.
    let big = c.read(0, MAX_PAYLOAD).expect("a 32 MiB read");
    assert_eq!(big.len(), 32 << 20);
    assert!(big[..1 << 20].iter().all(|&b| b == FILL) && big[1 << 20..].iter().all(|&b| b == 0));
    assert_eq!(c.read(SIZE - 4096, 4096).expect("last block"), vec![0; 4096]);
    c.disconnect();
    assert!(
        nbd_errors(&env.d, "EINVAL") >= 6.0,
        "forkd_nbd_errors_total{{errno=\"EINVAL\"}} did not count the refusals"
    );

    // With structured replies an over-long read is refused with EOVERFLOW (or EINVAL).
    let mut c = Client::open(&addr, "dev", true);
    let r = c.read(0, MAX_PAYLOAD + 4096).map(|v| v.len());
    assert!(r == Err(rawnbd::EOVERFLOW) || r == Err(rawnbd::EINVAL), "structured 32 MiB + 4 KiB read: {r:?}");
    assert_eq!(c.read(SIZE, 4096).map(|v| v.len()), Err(rawnbd::EINVAL), "structured read at the end");
    assert_eq!(c.read(u64::MAX - 100, 4096).map(|v| v.len()), Err(rawnbd::EINVAL), "structured overflowing read");
    let got = c.read(MIB - 4096, 8192).expect("structured read after the refusals");
    assert_eq!(got, [vec![FILL; 4096], vec![0; 4096]].concat());
    c.disconnect();
    assert_closed(&env.d, "client sent NBD_CMD_DISC", 2);
    assert_alive(&mut env.d);
}

#[test]
fn writes_to_read_only_exports_get_eperm() {
    let mut env = setup();
    let addr = env.d.nbd_addr();
    for export in ["prod@1", "prod"] {
        let mut c = Client::open(&addr, export, false);
        let flags = c.export.expect("export").flags;
        assert_ne!(flags & rawnbd::FLAG_READ_ONLY, 0, "{export} must be advertised read-only");
        assert_eq!(c.write(0, &[0xee; 4096]), Err(rawnbd::EPERM), "write to {export}");
        assert_eq!(c.write(4096, &[0xee; 100]), Err(rawnbd::EPERM), "unaligned write to {export}");
        // The payloads were consumed: the stream is in sync and nothing changed.
        assert_eq!(c.read(0, 8192).expect("read after EPERM"), vec![FILL; 8192], "{export} changed");
        assert_eq!(c.flush(), 0, "flush on {export}");
        c.disconnect();
    }
    assert!(nbd_errors(&env.d, "EPERM") >= 4.0, "forkd_nbd_errors_total{{errno=\"EPERM\"}} did not count the refusals");
    assert_eq!(env.d.api().read("prod@1", 0, 8192), vec![FILL; 8192]);
    assert_closed(&env.d, "client sent NBD_CMD_DISC", 2);
    assert_alive(&mut env.d);
}

#[test]
fn writes_beyond_the_end_are_refused() {
    let mut env = setup();
    let addr = env.d.nbd_addr();
    let mut c = Client::open(&addr, "dev", false);
    let ok = |r: Result<(), u32>| r == Err(rawnbd::ENOSPC) || r == Err(rawnbd::EINVAL);
    let r = c.write(SIZE, &[0xee; 4096]);
    assert!(ok(r), "write at the end: {r:?}");
    let r = c.write(SIZE - 2048, &[0xee; 4096]);
    assert!(ok(r), "write across the end: {r:?}");
    let r = c.write(u64::MAX - 100, &[0xee; 4096]);
    assert!(ok(r), "write whose offset + length overflows: {r:?}");
    // In sync, and the last block did not change.
    assert_eq!(c.read(SIZE - 4096, 4096).expect("read the last block"), vec![0; 4096]);
    c.write(SIZE - 4096, &[0x77; 4096]).expect("a write of the last block is fine");
    assert_eq!(c.read(SIZE - 4096, 4096).expect("read back"), vec![0x77; 4096]);
    c.disconnect();
    assert_closed(&env.d, "client sent NBD_CMD_DISC", 1);
    assert_alive(&mut env.d);
}

#[test]
fn write_larger_than_32_mib_is_refused_and_its_payload_skipped() {
    let mut env = setup();
    let addr = env.d.nbd_addr();
    let mut c = Client::open(&addr, "dev", false);
    let big = vec![0xee; usize::try_from(MAX_PAYLOAD).expect("max") + 4096];
    assert_eq!(c.write(0, &big), Err(rawnbd::EINVAL), "write of 32 MiB + 4 KiB");
    // The payload was skipped: the next request is read correctly and nothing was written.
    assert_eq!(c.read(0, 8192).expect("read after the refused write"), vec![FILL; 8192]);
    assert_eq!(c.read(MIB, 4096).expect("read"), vec![0; 4096]);
    c.write(32 * MIB, &vec![0x66; 32 << 20]).expect("a 32 MiB write is within the limit");
    assert_eq!(c.read(SIZE - 4096, 4096).expect("read"), vec![0x66; 4096]);
    assert_eq!(c.read(32 * MIB - 4096, 4096).expect("read"), vec![0; 4096]);
    c.disconnect();
    assert_closed(&env.d, "client sent NBD_CMD_DISC", 1);
    assert_alive(&mut env.d);
}

#[test]
fn truncated_requests_leave_the_daemon_unaffected() {
    let mut env = setup();
    let addr = env.d.nbd_addr();
    // Half a request header, then gone.
    let mut c = Client::open(&addr, "dev", false);
    let req = Client::request_bytes(rawnbd::CMD_READ, 0, 7, 0, 4096);
    c.send(&req[..14]).expect("send half a header");
    drop(c);
    assert_closed(&env.d, "client vanished mid-request", 1);
    assert_alive(&mut env.d);
    // Half an option header during the handshake, then gone.
    let mut c = negotiating(&addr);
    c.send(&Client::option_bytes(rawnbd::OPT_GO, &Client::go_data(b"dev"))[..10]).expect("send half an option");
    drop(c);
    assert_closed(&env.d, "client closed during handshake", 1);
    // Half the client flags.
    let mut c = Client::connect(&addr);
    c.send(&[0, 0]).expect("send half the flags");
    drop(c);
    assert_closed(&env.d, "client closed during handshake", 2);
    assert_alive(&mut env.d);
}

#[test]
fn junk_after_a_valid_request_answers_it_then_closes() {
    let mut env = setup();
    let addr = env.d.nbd_addr();
    let mut c = Client::open(&addr, "dev", false);
    let mut bytes = Client::request_bytes(rawnbd::CMD_READ, 0, 0x1234, MIB - 4096, 8192);
    bytes.extend_from_slice(&[0xa5; 28]);
    c.send(&bytes).expect("send a read and 28 bytes of junk");
    let (errno, cookie, data) = c.read_simple_reply(8192).expect("the valid read is answered before the close");
    assert_eq!((errno, cookie), (0, 0x1234));
    assert_eq!(data, [vec![FILL; 4096], vec![0; 4096]].concat());
    let mut extra = Vec::new();
    assert!(c.wait_closed_collect(CLOSE_WAIT, &mut extra), "the server did not close after junk");
    assert!(
        extra.is_empty(),
        "the server answered the junk with {} bytes: {:02x?}",
        extra.len(),
        &extra[..extra.len().min(64)]
    );
    assert_closed(&env.d, "malformed request", 1);

    // A write followed by junk: the write is answered (and done), then the close.
    let mut c = Client::open(&addr, "dev", false);
    let mut bytes = Client::request_bytes(rawnbd::CMD_WRITE, 0, 0x99, 2 * MIB, 4096);
    bytes.extend_from_slice(&[0x42; 4096]);
    bytes.extend_from_slice(&0x2560_9514u32.to_be_bytes());
    bytes.extend_from_slice(&[0; 24]);
    c.send(&bytes).expect("send a write and a header with a wrong magic");
    let (errno, cookie, _) = c.read_simple_reply(0).expect("the write is answered before the close");
    assert_eq!((errno, cookie), (0, 0x99));
    assert!(c.wait_closed(CLOSE_WAIT), "the server did not close after a bad request magic");
    assert_closed(&env.d, "malformed request", 2);
    assert_eq!(env.d.api().read("dev", 2 * MIB, 4096), vec![0x42; 4096], "the answered write is not visible");
    assert_alive(&mut env.d);
}

#[test]
fn client_vanishing_mid_write_payload_writes_nothing() {
    let mut env = setup();
    let addr = env.d.nbd_addr();
    let mut c = Client::open(&addr, "dev", false);
    let mut bytes = Client::request_bytes(rawnbd::CMD_WRITE, 0, 5, 0, 1 << 20);
    bytes.extend_from_slice(&vec![0xee; 512 << 10]);
    c.send(&bytes).expect("send a write header and half its payload");
    drop(c);
    assert_closed(&env.d, "client vanished mid-request", 1);
    assert_alive(&mut env.d);
    // Nothing of the half-sent write is visible, over NBD or the API.
    let mut c = Client::open(&addr, "dev", false);
    assert_eq!(c.read(0, 1 << 20).expect("read back"), vec![FILL; 1 << 20], "part of an incomplete write is visible");
    c.disconnect();
    assert_eq!(env.d.api().read("dev", 0, MIB), vec![FILL; 1 << 20]);
    // Also: a complete write followed by half of another one. The first is kept.
    let mut c = Client::open(&addr, "dev", false);
    let mut bytes = Client::request_bytes(rawnbd::CMD_WRITE, 0, 6, 4 * MIB, 4096);
    bytes.extend_from_slice(&[0x31; 4096]);
    bytes.extend_from_slice(&Client::request_bytes(rawnbd::CMD_WRITE, 0, 7, 5 * MIB, 65536));
    bytes.extend_from_slice(&[0x32; 1000]);
    c.send(&bytes).expect("send one write and a half");
    let (errno, cookie, _) = c.read_simple_reply(0).expect("the complete write is answered");
    assert_eq!((errno, cookie), (0, 6));
    drop(c);
    assert_closed(&env.d, "client vanished mid-request", 2);
    assert_eq!(env.d.api().read("dev", 4 * MIB, 4096), vec![0x31; 4096]);
    assert_eq!(env.d.api().read("dev", 5 * MIB, 65536), vec![0; 65536], "part of an incomplete write is visible");
    assert_alive(&mut env.d);
}

#[test]
fn silent_client_is_closed_by_the_handshake_timeout() {
    let mut env = setup();
    let addr = env.d.nbd_addr();
    // Connected, greeting read, then nothing; and one that stops after its client flags (the
    // timeout covers the whole handshake). Both wait at once.
    let mut silent = Client::connect(&addr);
    let mut flags_only = negotiating(&addr);
    let started = Instant::now();
    let waiter = std::thread::spawn(move || {
        let closed = flags_only.wait_closed(CLOSE_WAIT);
        (closed, started.elapsed())
    });
    let mut got = Vec::new();
    assert!(
        silent.wait_closed_collect(CLOSE_WAIT, &mut got),
        "a client that sends nothing is still connected after {CLOSE_WAIT:?}"
    );
    println!("silent client closed after {:?}", started.elapsed());
    assert!(got.is_empty(), "the server sent {} bytes to a silent client", got.len());
    let (closed, after) = waiter.join().expect("waiter thread");
    assert!(closed, "a client that stops after its flags is still connected after {CLOSE_WAIT:?}");
    println!("client that sent only its flags closed after {after:?}");
    assert_closed(&env.d, "handshake timeout", 2);
    assert_alive(&mut env.d);
}

#[test]
fn connections_beyond_256_are_refused_and_the_daemon_recovers() {
    let mut env = setup();
    let addr = env.d.nbd_addr();
    let mut held = Vec::new();
    // Each has read its greeting, so the daemon accepted it and counts it.
    for _ in 0..256 {
        held.push(Client::connect(&addr));
    }
    let mut extra = Client::connect_raw(&addr);
    let mut got = Vec::new();
    assert!(extra.wait_closed_collect(CLOSE_WAIT, &mut got), "connection 257 was kept open");
    assert!(got.is_empty(), "connection 257 got {} bytes (a greeting?)", got.len());
    assert_closed(&env.d, "connection limit", 1);
    drop(held);
    // They close as "client closed during handshake" (or, on a very slow machine, some may have
    // hit the handshake timeout first).
    let started = Instant::now();
    loop {
        let n = env.d.nbd_closed("client closed during handshake") + env.d.nbd_closed("handshake timeout");
        if n >= 256 {
            break;
        }
        assert!(started.elapsed() < METRIC_WAIT, "only {n} of the 256 held connections were counted closed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_alive(&mut env.d);
    assert_eq!(env.d.nbd_closed("connection limit"), 1);
}
