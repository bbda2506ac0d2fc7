//! Bad input on the iSCSI port, sent PDU by PDU over a raw TCP socket by an initiator built on
//! the `forkd-iscsi` codec (`forkd_tests::iscsi_raw`): malformed and truncated PDUs, impossible
//! lengths, digest errors, data beyond the burst limits or out of sequence, refused logins,
//! commands outside the CmdSN window, LBAs beyond the end, initiators that vanish mid-write,
//! and the ordinary NOP-Out, Logout and ABORT TASK exchanges around them; also what a Logout or
//! a LOGICAL UNIT RESET has done to the LUN's shared state (RESERVE (6), Software Write
//! Protect) by the time another session reads its answer.
//!
//! Every test opens a bystander session before the bad input. Afterwards the daemon must still
//! run, the bystander must still answer on its untouched connection, a fresh session must log
//! in and read, and the log must hold no panic. Where the daemon closes a connection,
//! `forkd_iscsi_connections_closed_total{reason="..."}` must count it with the reason the
//! daemon gives (the strings of `daemon/src/server/iscsi/mod.rs` and `iscsi/src/session.rs`).
//!
//! Waiting for "nothing arrives" (the CmdSN window) uses a 1 s read timeout: a protocol check
//! that a PDU is ignored, not a performance assertion.

use std::time::{Duration, Instant};

use forkd_tests::iscsi_raw::{
    read16_cdb, target_name, write16_cdb, Initiator, LoginOptions, ScsiResult, BLOCK, CHECK_CONDITION, GOOD,
};
use forkd_tests::{metric_value, Daemon};
use iscsi::pdu::{opcode, LoginRequest, NopOut, RESERVED_TAG};
use iscsi::scsi::status::RESERVATION_CONFLICT;
use iscsi::session::tmf;
use iscsi::{reject_reason, Bhs, Digests, Pdu};

const MIB: usize = 1 << 20;
/// Size of every volume here.
const SIZE: u64 = 64 << 20;
/// Capacity in 512-byte blocks.
const CAPACITY: u64 = SIZE / 512;
/// The source holds 0x11 in its first MiB and nothing else.
const FILL: u8 = 0x11;
/// The initiator name of every session here.
const INITIATOR: &str = "iqn.2026-11.dev.forkd.test:bad-input";
/// Bound on waiting for the target to close a connection.
const CLOSE_WAIT: Duration = Duration::from_secs(30);
/// Bound on waiting for a counter after the client saw the close.
const METRIC_WAIT: Duration = Duration::from_secs(10);
/// How long "no answer" is watched for.
const QUIET: Duration = Duration::from_secs(1);
/// Sense key ILLEGAL REQUEST.
const ILLEGAL_REQUEST: u8 = 0x05;
/// Sense key ABORTED COMMAND.
const ABORTED_COMMAND: u8 = 0x0b;

struct Env {
    d: Daemon,
    addr: String,
    _tmp: tempfile::TempDir,
}

/// A daemon (with `extra` serve flags) with source `prod` (64 MiB, first MiB 0x11) ingested as
/// `prod@1`, and a clone of `prod@1` for each name in `clones`.
fn setup_with(extra_config: Option<&str>, clones: &[&str]) -> Env {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = match extra_config {
        None => Daemon::start_in(tmp.path()),
        Some(text) => {
            let cfg = tmp.path().join("forkd.toml");
            std::fs::write(&cfg, text).expect("write config");
            Daemon::start_with(tmp.path(), "127.0.0.1", &["--config", cfg.to_str().expect("utf-8 path")])
        }
    };
    let img = tmp.path().join("src.img");
    let mut data = vec![0u8; usize::try_from(SIZE).expect("size")];
    data[..MIB].fill(FILL);
    std::fs::write(&img, &data).expect("write source image");
    d.cli_ok(&["source", "create", "prod", "--size", "64M"]);
    d.cli_ok(&["ingest", "prod", "--from", img.to_str().expect("utf-8 path")]);
    for c in clones {
        d.cli_ok(&["clone", "prod@1", c]);
    }
    let addr = format!("127.0.0.1:{}", d.iscsi_port());
    Env { d, addr, _tmp: tmp }
}

/// [`setup_with`] with the default config and one clone, `dev`.
fn setup() -> Env {
    setup_with(None, &["dev"])
}

/// Login options for `volume`; `isid` tells the sessions of one test apart.
fn opts(volume: &str, isid: u8) -> LoginOptions {
    let mut o = LoginOptions::new(INITIATOR, &target_name(volume));
    o.isid_tail = isid;
    o
}

/// A session on `dev`.
fn open(env: &Env, isid: u8) -> Initiator {
    Initiator::open(&env.addr, &opts("dev", isid))
}

/// The LBA of byte offset `offset`.
fn lba(offset: usize) -> u64 {
    u64::try_from(offset / BLOCK).expect("lba")
}

fn byte(v: usize) -> u8 {
    u8::try_from(v).expect("byte")
}

fn blocks(n: usize) -> u32 {
    u32::try_from(n / BLOCK).expect("blocks")
}

#[track_caller]
fn assert_good(r: &ScsiResult, what: &str) {
    assert_eq!((r.status, r.response), (GOOD, 0), "{what}: status {:#04x}, sense {:02x?}", r.status, r.sense);
}

/// CHECK CONDITION with fixed-format sense data (response code 0x70) carrying `key`, `asc`
/// and `ascq`.
#[track_caller]
fn assert_check(r: &ScsiResult, key: u8, asc: u8, ascq: u8, what: &str) {
    assert_eq!(r.status, CHECK_CONDITION, "{what}: status {:#04x} (sense {:02x?})", r.status, r.sense);
    assert!(r.sense.len() >= 18, "{what}: {} bytes of sense data: {:02x?}", r.sense.len(), r.sense);
    assert_eq!(r.sense[0] & 0x7f, 0x70, "{what}: not fixed-format current sense data: {:02x?}", r.sense);
    assert_eq!(r.key_asc_ascq(), Some((key, asc, ascq)), "{what}: sense {:02x?}", r.sense);
}

/// `c` reads `len` bytes at `offset` (bytes, block-aligned) and finds `expected` in each.
#[track_caller]
fn assert_reads(c: &mut Initiator, offset: usize, len: usize, expected: u8, what: &str) {
    let r = c.read16(u64::try_from(offset / BLOCK).expect("lba"), blocks(len));
    assert_good(&r, what);
    assert_eq!(r.data.len(), len, "{what}: Data-In length");
    if let Some(at) = r.data.iter().position(|&b| b != expected) {
        panic!("{what}: byte {} is {:#04x}, expected {expected:#04x}", offset + at, r.data[at]);
    }
}

/// The bystander still answers on its own connection, the daemon runs, a fresh session reads
/// `dev`, and nothing panicked.
#[track_caller]
fn assert_alive(env: &mut Env, bystander: &mut Initiator) {
    assert!(env.d.running(), "the daemon process died\n--- log ---\n{}", forkd_tests::tail(&env.d.log(), 40));
    assert_reads(bystander, 0, 8192, FILL, "the bystander session");
    let (nop, _) = bystander.ping(b"still there");
    assert_eq!(&nop.data[..], b"still there");
    let mut fresh = open(env, 0x7f);
    assert_reads(&mut fresh, MIB - 4096, 4096, FILL, "a fresh session");
    assert_reads(&mut fresh, MIB, 4096, 0, "a fresh session");
    fresh.logout();
    assert_no_panic(&env.d);
}

#[track_caller]
fn assert_no_panic(d: &Daemon) {
    let log = d.log();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{}", forkd_tests::tail(&log, 60));
}

fn iscsi_closed(d: &Daemon, reason: &str) -> u64 {
    let v = metric_value(&d.metrics(), &format!("forkd_iscsi_connections_closed_total{{reason=\"{reason}\"}}"));
    format!("{v}").parse::<u64>().unwrap_or_else(|_| panic!("counter value {v} is not an integer"))
}

/// The close counter for `reason` reaches exactly `n` (waiting, bounded, for the bump).
#[track_caller]
fn assert_closed_count(d: &Daemon, reason: &str, n: u64) {
    let started = Instant::now();
    loop {
        let v = iscsi_closed(d, reason);
        if v >= n || started.elapsed() > METRIC_WAIT {
            let m = d.metrics();
            let lines: Vec<&str> = m.lines().filter(|l| l.starts_with("forkd_iscsi")).collect();
            assert_eq!(
                v,
                n,
                "forkd_iscsi_connections_closed_total{{reason=\"{reason}\"}}\n{}\n--- log ---\n{}",
                lines.join("\n"),
                forkd_tests::tail(&d.log(), 30)
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The target closes `c` (bounded); returns the PDUs it sent first.
#[track_caller]
fn assert_closed(c: &mut Initiator, what: &str) -> Vec<Pdu> {
    let mut got = Vec::new();
    assert!(c.wait_closed_collect(CLOSE_WAIT, &mut got), "{what}: the target kept the connection open: {got:?}");
    got
}

/// The target closes `c` without sending anything.
#[track_caller]
fn assert_closed_silently(c: &mut Initiator, what: &str) {
    let got = assert_closed(c, what);
    assert!(got.is_empty(), "{what}: the target sent {got:?} before closing");
    assert_eq!(c.pending_bytes(), 0, "{what}: the target sent part of a PDU before closing");
}

/// `p` is a Reject with `reason` whose data segment is `header` (the rejected BHS).
#[track_caller]
fn assert_reject(p: &Pdu, reason: u8, header: &[u8], what: &str) {
    assert_reject_fields(p, reason, header, what);
    assert_complete_header(p, header, what);
}

/// `p` is a Reject with `reason` whose data segment is the rejected BHS, compared except for
/// its layout fields (TotalAHSLength and DataSegmentLength, bytes 4 to 7).
#[track_caller]
fn assert_reject_fields(p: &Pdu, reason: u8, header: &[u8], what: &str) {
    let Bhs::Reject(r) = &p.bhs else { panic!("{what}: expected a Reject, got {:?}", p.bhs) };
    assert_eq!(r.reason, reason, "{what}: Reject reason");
    assert_eq!(r.data_sn, 0, "{what}: DataSN/R2TSN of a Reject that is not about a SNACK");
    assert_eq!(p.data.len(), 48, "{what}: the Reject's data segment must be the rejected BHS");
    let strip = |h: &[u8]| [&h[..4], &h[8..48]].concat();
    assert_eq!(strip(&p.data), strip(header), "{what}: the Reject must carry the rejected BHS");
}

/// RFC 7143 §11.17.3: the Reject's data segment is the complete header of the bad PDU, its
/// TotalAHSLength and DataSegmentLength included.
#[track_caller]
fn assert_complete_header(p: &Pdu, header: &[u8], what: &str) {
    assert_eq!(
        &p.data[4..8],
        &header[4..8],
        "{what}: the Reject carries the rejected BHS with TotalAHSLength/DataSegmentLength {:02x?} instead of \
         {:02x?} (RFC 7143 §11.17.3: the complete header of the bad PDU)",
        &p.data[4..8],
        &header[4..8]
    );
}

/// The daemon's resident set in KiB (its process found by its data directory).
fn daemon_rss_kib(d: &Daemon) -> u64 {
    let dir = d.data_dir().to_string_lossy().into_owned();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> = cmd.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.iter().any(|a| a == "serve") && args.contains(&dir) {
            let status = std::fs::read_to_string(e.path().join("status")).expect("status");
            let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
            return line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS value");
        }
    }
    panic!("no forkd process serving {dir}");
}

#[test]
fn unknown_opcode_is_rejected_with_reason_05_and_the_connection_carries_on() {
    let mut env = setup();
    let mut bystander = open(&env, 9);
    let mut c = open(&env, 1);
    for (op, data_len) in [(0x1cu8, 0usize), (0x0f, 100), (0x1e, 4096)] {
        // A NOP-Out whose opcode is replaced: the header is sound, only the opcode is unknown.
        let nop = NopOut {
            immediate: true,
            lun: 0,
            itt: c.itt(),
            ttt: RESERVED_TAG,
            cmd_sn: c.cmd_sn,
            exp_stat_sn: c.exp_stat_sn,
        };
        let mut bytes = c.encode(&Pdu::with_data(nop, vec![0xab; data_len]));
        bytes[0] = 0x40 | op;
        c.send_raw(&bytes).expect("send a PDU with an unknown opcode");
        let p = c.recv().unwrap_or_else(|e| panic!("no answer to opcode {op:#04x}: {e}"));
        assert_reject(&p, reject_reason::COMMAND_NOT_SUPPORTED, &bytes, &format!("opcode {op:#04x}"));
    }
    // The data segments were skipped: the stream is in sync and the CmdSN untouched.
    let (nop, before) = c.ping(b"after unknown opcodes");
    assert!(before.is_empty(), "extra PDUs: {before:?}");
    assert_eq!(&nop.data[..], b"after unknown opcodes");
    assert_good(&c.test_unit_ready(), "TEST UNIT READY after the Rejects");
    assert_reads(&mut c, 0, 4096, FILL, "read after the Rejects");
    c.logout();
    assert_eq!(iscsi_closed(&env.d, "malformed PDU"), 0);
    assert_alive(&mut env, &mut bystander);
}

#[test]
fn login_request_in_the_full_feature_phase_is_rejected() {
    let mut env = setup();
    let mut bystander = open(&env, 9);
    let mut c = open(&env, 1);
    let login = LoginRequest {
        transit: true,
        csg: 1,
        nsg: 3,
        isid: [0x80, 0x12, 0x34, 0x56, 0, 1],
        itt: c.itt(),
        cmd_sn: c.cmd_sn,
        exp_stat_sn: c.exp_stat_sn,
        ..Default::default()
    };
    let pdu = Pdu::with_data(login, iscsi::keys::encode_text(&[("MaxBurstLength", "512")]));
    let bytes = c.encode(&pdu);
    c.send_raw(&bytes).expect("send a Login Request in the full feature phase");
    let p = c.recv().expect("an answer to the Login Request");
    // RFC 7143 §11.17.1: a PDU that is not allowed in this phase is a protocol error.
    let what = "Login Request in the full feature phase";
    assert_reject_fields(&p, reject_reason::PROTOCOL_ERROR, &bytes, what);
    // A SNACK at ErrorRecoveryLevel 0 is a protocol error too (RFC 7143 §11.16).
    let snack =
        iscsi::pdu::SnackRequest { kind: 1, itt: RESERVED_TAG, exp_stat_sn: c.exp_stat_sn, ..Default::default() };
    let snack_bytes = c.encode(&Pdu::new(snack));
    c.send_raw(&snack_bytes).expect("send a Status SNACK");
    let p2 = c.recv().expect("an answer to the SNACK");
    assert_reject(&p2, reject_reason::PROTOCOL_ERROR, &snack_bytes, "SNACK at ErrorRecoveryLevel 0");
    // Nothing was renegotiated, and the connection carries on.
    let (nop, before) = c.ping(&[0x5a; 1000]);
    assert!(before.is_empty(), "extra PDUs: {before:?}");
    assert_eq!(&nop.data[..], &[0x5a; 1000][..]);
    assert_reads(&mut c, 0, 256 << 10, FILL, "a 256 KiB read after the Reject");
    c.logout();
    assert_alive(&mut env, &mut bystander);
    assert_complete_header(&p, &bytes, what);
}

#[test]
fn garbage_before_login_closes_the_connection() {
    let mut env = setup();
    let mut bystander = open(&env, 9);
    // 64 bytes of 0xde: DataSegmentLength 0xdedede is over the login limit.
    let mut c = Initiator::connect(&env.addr);
    c.send_raw(&[0xde; 64]).expect("send garbage");
    assert_closed_silently(&mut c, "64 bytes of 0xde before login");
    // An unknown opcode, lengths 0.
    let mut c = Initiator::connect(&env.addr);
    let mut junk = [0u8; 48];
    junk[0] = 0x1c;
    c.send_raw(&junk).expect("send an unknown opcode");
    assert_closed_silently(&mut c, "unknown opcode before login");
    assert_closed_count(&env.d, "malformed PDU during login", 2);
    // 48 zero bytes are a NOP-Out: a sound PDU, but not a Login Request. RFC 7143 §11.13.5:
    // the login fails with 0x020b (invalid request during login).
    let mut c = Initiator::connect(&env.addr);
    c.send_raw(&[0u8; 48]).expect("send a NOP-Out before login");
    let got = assert_closed(&mut c, "NOP-Out before login");
    assert_eq!(got.len(), 1, "one Login Response, then the close: {got:?}");
    let Bhs::LoginResponse(r) = &got[0].bhs else { panic!("expected a Login Response, got {:?}", got[0].bhs) };
    assert_eq!((r.status_class, r.status_detail), (0x02, 0x0b), "{r:?}");
    assert_closed_count(&env.d, "login refused", 1);
    assert_alive(&mut env, &mut bystander);
}

#[test]
fn truncated_pdus_then_close_leave_the_daemon_unaffected() {
    let mut env = setup();
    let mut bystander = open(&env, 9);
    // Half a READ (16) header in the full feature phase, then gone.
    let mut c = open(&env, 1);
    let pdu = c.command_pdu(&read16_cdb(0, 8), 4096, true, false, &[]);
    let bytes = c.encode(&pdu);
    c.send_raw(&bytes[..30]).expect("send 30 bytes of a BHS");
    drop(c);
    assert_closed_count(&env.d, "initiator closed", 1);
    // A WRITE (16) with 4096 bytes of immediate data of which 1000 arrive, then gone.
    let mut c = open(&env, 2);
    let pdu = c.command_pdu(&write16_cdb(0, 8), 4096, false, true, &[0xee; 4096]);
    let bytes = c.encode(&pdu);
    c.send_raw(&bytes[..48 + 1000]).expect("send a write with part of its immediate data");
    drop(c);
    assert_closed_count(&env.d, "initiator closed", 2);
    // Half a Login Request, then gone.
    let mut c = Initiator::connect(&env.addr);
    let login = LoginRequest { transit: true, csg: 0, nsg: 1, isid: [0x80, 0, 0, 0, 0, 3], ..Default::default() };
    let bytes = c.encode(&Pdu::with_data(login, iscsi::keys::encode_text(&[("InitiatorName", INITIATOR)])));
    c.send_raw(&bytes[..20]).expect("send 20 bytes of a Login Request");
    drop(c);
    assert_closed_count(&env.d, "initiator closed during login", 1);
    assert_eq!(iscsi_closed(&env.d, "malformed PDU"), 0);
    assert_alive(&mut env, &mut bystander);
    // The truncated write wrote nothing.
    assert_reads(&mut bystander, 0, 4096, FILL, "the range of the truncated write");
}

#[test]
fn data_segment_over_max_recv_data_segment_length_closes_the_connection() {
    let mut env = setup();
    let mut bystander = open(&env, 9);
    let mut c = open(&env, 1);
    let mrdsl: usize = c
        .answered("MaxRecvDataSegmentLength")
        .expect("the target declares its MaxRecvDataSegmentLength")
        .parse()
        .expect("a number");
    // Exactly the limit is fine: a ping of MaxRecvDataSegmentLength bytes is echoed.
    let data: Vec<u8> = (0..mrdsl).map(|i| byte(i % 251)).collect();
    let (nop, _) = c.ping(&data);
    assert!(nop.data[..] == data[..], "the {mrdsl}-byte ping came back different");
    // One byte (padded to four) more closes the connection (RFC 7143 §7.1.1: a protocol error).
    let pdu = c.nop_pdu(&vec![0x42; mrdsl + 1]);
    let bytes = c.encode(&pdu);
    let _ = c.send_raw(&bytes); // the target may close before it is all sent
    assert_closed_silently(&mut c, "a data segment of MaxRecvDataSegmentLength + 1 bytes");
    // The largest length the field can hold, header only.
    let mut c = open(&env, 2);
    let pdu = c.nop_pdu(&[]);
    let mut bytes = c.encode(&pdu);
    bytes[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    c.send_raw(&bytes).expect("send a header announcing 16 MiB of data");
    let _ = c.send_raw(&[0u8; 4096]);
    assert_closed_silently(&mut c, "DataSegmentLength 0xffffff");
    assert_closed_count(&env.d, "malformed PDU", 2);
    assert_alive(&mut env, &mut bystander);
}

#[test]
fn ahs_not_filling_total_ahs_length_is_rejected_with_reason_09() {
    let mut env = setup();
    let mut bystander = open(&env, 9);
    let mut c = open(&env, 1);
    // (TotalAHSLength in words, AHS bytes): an AHS announcing 64 bytes in a 4-byte area, and one
    // announcing 6 bytes (12 with its header and padding) in an 8-byte area.
    let cases: [(u8, Vec<u8>); 2] = [(1, vec![0, 64, 1, 0]), (2, vec![0, 6, 1, 0, 0, 0, 0, 0])];
    for (words, ahs) in cases {
        let pdu = c.command_pdu(&[0u8; 6], 0, false, false, &[]);
        // The rejected command's CmdSN is not consumed (RFC 7143 §11.17.1): send the next
        // command with the same one.
        c.cmd_sn = c.cmd_sn.wrapping_sub(1);
        let mut bytes = c.encode(&pdu);
        bytes[4] = words;
        bytes.splice(48..48, ahs);
        c.send_raw(&bytes).expect("send a command with a malformed AHS");
        let p = c.recv().expect("an answer to the malformed AHS");
        assert_reject(&p, reject_reason::INVALID_PDU_FIELD, &bytes, &format!("TotalAHSLength {words}"));
    }
    // The AHS bytes were skipped and the CmdSN gap is plugged by the next command.
    assert_good(&c.test_unit_ready(), "TEST UNIT READY after the Rejects");
    assert_reads(&mut c, 0, 4096, FILL, "read after the Rejects");
    c.logout();
    assert_eq!(iscsi_closed(&env.d, "malformed PDU"), 0);
    assert_alive(&mut env, &mut bystander);
}

#[test]
fn enormous_expected_data_transfer_length_solicits_only_what_the_cdb_takes() {
    let mut env = setup();
    let mut bystander = open(&env, 9);
    let mut c = open(&env, 1);
    let rss_before = daemon_rss_kib(&env.d);
    // A WRITE (16) of 8 blocks announcing 4 GiB - 512: the CDB decides what is transferred.
    let edtl = u32::MAX - 511;
    let at = 2 * MIB;
    let pdu = c.command_pdu(&write16_cdb(lba(at), 8), edtl, false, true, &[]);
    let itt = pdu.bhs.itt();
    c.send(&pdu).expect("send the write");
    let r = c.wait_command(itt, &vec![0x3c; 4096]).expect("the write's outcome");
    assert_eq!(r.r2ts.len(), 1, "R2Ts: {:?}", r.r2ts);
    assert_eq!((r.r2ts[0].buffer_offset, r.r2ts[0].desired_length), (0, 4096), "{:?}", r.r2ts[0]);
    assert_good(&r, "WRITE (16) of 8 blocks with EDTL 4 GiB - 512");
    assert!(r.underflow && !r.overflow, "the response must report an underflow: {r:?}");
    assert_eq!(r.residual, edtl - 4096, "residual count");
    assert_reads(&mut c, at, 4096, 0x3c, "the 8 blocks written");
    // A WRITE (16) of 2^32 - 1 blocks: refused at once, nothing solicited.
    let pdu = c.command_pdu(&write16_cdb(0, u32::MAX), u32::MAX, false, true, &[]);
    let itt = pdu.bhs.itt();
    c.send(&pdu).expect("send the write");
    let r = c.wait_command(itt, &[]).expect("the write's outcome");
    assert!(r.r2ts.is_empty(), "the target solicited data for a 2 TiB write: {:?}", r.r2ts);
    assert_check(&r, ILLEGAL_REQUEST, 0x24, 0x00, "WRITE (16) of 2^32 - 1 blocks");
    // A READ (16) of 8 blocks with EDTL 4 GiB - 512: 4096 bytes and an underflow.
    let r = c.scsi(&read16_cdb(0, 8), edtl, true, &[]);
    assert_good(&r, "READ (16) of 8 blocks with EDTL 4 GiB - 512");
    assert_eq!(r.data, vec![FILL; 4096]);
    assert!(r.underflow && r.residual == edtl - 4096, "{r:?}");
    let rss_after = daemon_rss_kib(&env.d);
    println!("daemon RSS {rss_before} KiB before, {rss_after} KiB after");
    assert!(rss_after < rss_before + 64 * 1024, "the daemon grew from {rss_before} KiB to {rss_after} KiB");
    c.logout();
    assert_alive(&mut env, &mut bystander);
}

#[test]
fn digest_errors_close_on_the_header_and_reject_the_data() {
    let mut env = setup();
    let mut bystander = open(&env, 9);
    let crc = opts("dev", 1).set("HeaderDigest", "CRC32C,None").set("DataDigest", "CRC32C,None");
    let mut c = Initiator::open(&env.addr, &crc);
    assert_eq!((c.answered("HeaderDigest"), c.answered("DataDigest")), (Some("CRC32C"), Some("CRC32C")));
    assert_eq!(c.digests, Digests::BOTH);
    let (nop, _) = c.ping(&[0x77; 1001]);
    assert_eq!(&nop.data[..], &[0x77; 1001][..], "a ping with both digests");

    // Immediate data with a wrong data digest: Reject 0x02, the command is discarded and its
    // CmdSN not consumed (RFC 7143 §7.8); the initiator retries it whole.
    let at = 2 * MIB;
    let pdu = c.command_pdu(&write16_cdb(lba(at), 8), 4096, false, true, &[0x5a; 4096]);
    let good = c.encode(&pdu);
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 1] ^= 0x01;
    c.send_raw(&bad).expect("send a write whose data digest is wrong");
    let p = c.recv().expect("an answer to the data digest error");
    assert_reject(&p, reject_reason::DATA_DIGEST, &good, "immediate data with a wrong data digest");
    c.cmd_sn = c.cmd_sn.wrapping_sub(1); // the gap is plugged by the next command
    assert_reads(&mut c, at, 4096, 0, "nothing written by the rejected command");
    let r = c.scsi(&write16_cdb(lba(at), 8), 4096, false, &[0x5a; 4096]);
    assert_good(&r, "the write, retried");
    assert_reads(&mut c, at, 4096, 0x5a, "the retried write");

    // A solicited Data-Out (not the last) with a wrong data digest: Reject 0x02; the next one
    // is out of sequence, so the command ends with CHECK CONDITION, ABORTED COMMAND.
    let at2 = 3 * MIB;
    let pdu = c.command_pdu(&write16_cdb(lba(at2), 32), 16384, false, true, &[]);
    let itt = pdu.bhs.itt();
    c.send(&pdu).expect("send a 16 KiB write");
    let p = c.recv().expect("the R2T");
    let Bhs::R2t(r2t) = &p.bhs else { panic!("expected an R2T, got {:?}", p.bhs) };
    assert_eq!((r2t.itt, r2t.buffer_offset, r2t.desired_length), (itt, 0, 16384));
    let first = c.encode(&c.data_out_pdu(itt, r2t.ttt, 0, 0, &[0x66; 8192], false));
    let mut bad = first.clone();
    let n = bad.len();
    bad[n - 2] ^= 0x80;
    c.send_raw(&bad).expect("send a Data-Out whose data digest is wrong");
    let p = c.recv().expect("an answer to the data digest error");
    assert_reject(&p, reject_reason::DATA_DIGEST, &first, "Data-Out with a wrong data digest");
    let last = c.data_out_pdu(itt, r2t.ttt, 1, 8192, &[0x66; 8192], true);
    c.send(&last).expect("send the last Data-Out");
    let r = c.wait_command(itt, &[]).expect("the write's outcome");
    assert_eq!(r.status, CHECK_CONDITION, "{r:?}");
    assert_eq!(r.sense_key(), Some(ABORTED_COMMAND), "sense {:02x?}", r.sense);
    // RFC 7143 §7.8 names "protocol service CRC error" (0x47/0x05); a data phase error
    // (0x4b/0x00) from the sequence check says the same to an initiator.
    let asc = r.key_asc_ascq().map(|k| (k.1, k.2));
    assert!(matches!(asc, Some((0x47, 0x05) | (0x4b, 0x00))), "ASC/ASCQ {asc:02x?}");
    assert_reads(&mut c, at2, 16384, 0, "nothing of the failed write");

    // The last Data-Out with a wrong data digest: Reject 0x02; the task waits for data that
    // will not come, and ABORT TASK ends it (RFC 7143 §7.8 allows a task management function).
    let pdu = c.command_pdu(&write16_cdb(lba(at2), 8), 4096, false, true, &[]);
    let (itt, cmd_sn) = match &pdu.bhs {
        Bhs::ScsiCommand(x) => (x.itt, x.cmd_sn),
        _ => unreachable!(),
    };
    c.send(&pdu).expect("send a 4 KiB write");
    let p = c.recv().expect("the R2T");
    let Bhs::R2t(r2t) = &p.bhs else { panic!("expected an R2T, got {:?}", p.bhs) };
    let only = c.encode(&c.data_out_pdu(itt, r2t.ttt, 0, 0, &[0x67; 4096], true));
    let mut bad = only.clone();
    let n = bad.len();
    bad[n - 3] ^= 0x10;
    c.send_raw(&bad).expect("send the only Data-Out with a wrong data digest");
    let p = c.recv().expect("an answer to the data digest error");
    assert_reject(&p, reject_reason::DATA_DIGEST, &only, "last Data-Out with a wrong data digest");
    let tmf = c.tmf_pdu(tmf::ABORT_TASK, itt, cmd_sn);
    let tmf_itt = tmf.bhs.itt();
    c.send(&tmf).expect("send ABORT TASK");
    let p = c.recv().expect("the TMF response");
    match &p.bhs {
        Bhs::TaskMgmtResponse(t) if t.itt == tmf_itt => assert_eq!(t.response, tmf::COMPLETE, "{t:?}"),
        other => panic!("expected the Task Management Function Response, got {other:?}"),
    }
    let (_, before) = c.ping(b"after the abort");
    assert!(before.is_empty(), "PDUs for the aborted task: {before:?}");
    assert_reads(&mut c, at2, 4096, 0, "nothing of the aborted write");

    // A wrong header digest: the lengths cannot be trusted, the connection is closed.
    let pdu = c.nop_pdu(b"bad header digest");
    let mut bytes = c.encode(&pdu);
    bytes[48] ^= 0x01;
    c.send_raw(&bytes).expect("send a NOP-Out whose header digest is wrong");
    assert_closed_silently(&mut c, "a wrong header digest");
    assert_closed_count(&env.d, "malformed PDU", 1);
    assert_alive(&mut env, &mut bystander);
}

#[test]
fn immediate_data_beyond_first_burst_length_closes_the_connection() {
    let mut env = setup();
    let mut bystander = open(&env, 9);
    let mut c = open(&env, 1);
    assert_eq!(c.answered("FirstBurstLength"), Some("65536"));
    assert_eq!(c.answered("ImmediateData"), Some("Yes"));
    // Exactly FirstBurstLength of immediate data is fine.
    let pdu = c.command_pdu(&write16_cdb(4096, 128), 65536, false, true, &[0x21; 65536]);
    let itt = pdu.bhs.itt();
    c.send(&pdu).expect("send a write with 64 KiB of immediate data");
    let r = c.wait_command(itt, &[]).expect("the write's outcome");
    assert!(r.r2ts.is_empty(), "{:?}", r.r2ts);
    assert_good(&r, "a write with 64 KiB of immediate data");
    // 512 bytes more closes the connection; nothing is written.
    let pdu = c.command_pdu(&write16_cdb(0, 256), 131072, false, true, &[0xee; 65536 + 512]);
    c.send(&pdu).expect("send a write with 64.5 KiB of immediate data");
    assert_closed_silently(&mut c, "immediate data beyond FirstBurstLength");
    assert_closed_count(&env.d, "immediate data beyond FirstBurstLength", 1);
    assert_alive(&mut env, &mut bystander);
    assert_reads(&mut bystander, 0, 131072, FILL, "the range of the refused write");
    assert_reads(&mut bystander, 2 * MIB, 65536, 0x21, "the accepted write");
}

#[test]
fn data_out_beyond_the_bursts_or_out_of_sequence_fails_only_the_command() {
    let mut env = setup();
    let mut bystander = open(&env, 9);
    let mut c = open(&env, 1);
    let data = vec![0xee; 512 << 10];

    // Unsolicited Data-Out past FirstBurstLength (64 KiB): 32 KiB, then 36 KiB.
    let mut pdu = c.command_pdu(&write16_cdb(0, 256), 131072, false, true, &[]);
    if let Bhs::ScsiCommand(x) = &mut pdu.bhs {
        x.final_pdu = false; // unsolicited Data-Out follows
    }
    let itt = pdu.bhs.itt();
    let mut bytes = c.encode(&pdu);
    bytes.extend(c.encode(&c.data_out_pdu(itt, RESERVED_TAG, 0, 0, &data[..32768], false)));
    bytes.extend(c.encode(&c.data_out_pdu(itt, RESERVED_TAG, 1, 32768, &data[..36864], true)));
    c.send_raw(&bytes).expect("send a write and 68 KiB of unsolicited data");
    let r = c.wait_command(itt, &data[..131072]).expect("the write's outcome");
    assert!(r.r2ts.is_empty(), "R2Ts after a broken unsolicited burst: {:?}", r.r2ts);
    assert_check(&r, ABORTED_COMMAND, 0x4b, 0x00, "unsolicited Data-Out past FirstBurstLength");

    // A Data-Out past the R2T's desired length: the first R2T of a 512 KiB write asks for
    // MaxBurstLength (256 KiB); 260 KiB arrive.
    let pdu = c.command_pdu(&write16_cdb(0, 1024), 512 << 10, false, true, &[]);
    let itt = pdu.bhs.itt();
    c.send(&pdu).expect("send a 512 KiB write");
    let p = c.recv().expect("the first R2T");
    let Bhs::R2t(r2t) = &p.bhs else { panic!("expected an R2T, got {:?}", p.bhs) };
    assert_eq!((r2t.buffer_offset, r2t.desired_length), (0, 256 << 10), "{r2t:?}");
    let mut bytes = Vec::new();
    for i in 0..4u32 {
        let off = i * 65536;
        bytes.extend(c.encode(&c.data_out_pdu(itt, r2t.ttt, i, off, &data[..65536], false)));
    }
    bytes.extend(c.encode(&c.data_out_pdu(itt, r2t.ttt, 4, 256 << 10, &data[..4096], true)));
    c.send_raw(&bytes).expect("send 260 KiB for a 256 KiB R2T");
    let r = c.wait_command(itt, &data).expect("the write's outcome");
    assert!(r.r2ts.is_empty(), "more R2Ts after a broken burst: {:?}", r.r2ts);
    assert_check(&r, ABORTED_COMMAND, 0x4b, 0x00, "Data-Out past the R2T's desired length");

    // A wrong DataSN: 0, then 2.
    let pdu = c.command_pdu(&write16_cdb(0, 16), 8192, false, true, &[]);
    let itt = pdu.bhs.itt();
    c.send(&pdu).expect("send an 8 KiB write");
    let p = c.recv().expect("the R2T");
    let Bhs::R2t(r2t) = &p.bhs else { panic!("expected an R2T, got {:?}", p.bhs) };
    let mut bytes = c.encode(&c.data_out_pdu(itt, r2t.ttt, 0, 0, &data[..4096], false));
    bytes.extend(c.encode(&c.data_out_pdu(itt, r2t.ttt, 2, 4096, &data[..4096], true)));
    c.send_raw(&bytes).expect("send Data-Out with DataSN 0 then 2");
    let r = c.wait_command(itt, &[]).expect("the write's outcome");
    assert_check(&r, ABORTED_COMMAND, 0x4b, 0x00, "a wrong DataSN");

    // A wrong buffer offset: 0, then 0 again.
    let pdu = c.command_pdu(&write16_cdb(0, 16), 8192, false, true, &[]);
    let itt = pdu.bhs.itt();
    c.send(&pdu).expect("send an 8 KiB write");
    let p = c.recv().expect("the R2T");
    let Bhs::R2t(r2t) = &p.bhs else { panic!("expected an R2T, got {:?}", p.bhs) };
    let mut bytes = c.encode(&c.data_out_pdu(itt, r2t.ttt, 0, 0, &data[..4096], false));
    bytes.extend(c.encode(&c.data_out_pdu(itt, r2t.ttt, 1, 0, &data[..4096], true)));
    c.send_raw(&bytes).expect("send Data-Out at offsets 0 and 0");
    let r = c.wait_command(itt, &[]).expect("the write's outcome");
    assert_check(&r, ABORTED_COMMAND, 0x4b, 0x00, "a wrong buffer offset");

    // The connection carries on, and none of the failed writes left anything.
    let (_, before) = c.ping(b"after four failed writes");
    assert!(before.is_empty(), "extra PDUs: {before:?}");
    assert_reads(&mut c, 0, 512 << 10, FILL, "the range of the failed writes");
    assert_good(&c.write16(0, &[0x31; 8192]), "a good write on the same connection");
    assert_reads(&mut c, 0, 8192, 0x31, "the good write");
    c.logout();
    assert_eq!(iscsi_closed(&env.d, "malformed PDU"), 0);
    // The bystander reads what the good write left.
    assert!(env.d.running());
    assert_reads(&mut bystander, 8192, 8192, FILL, "the bystander session");
    let mut fresh = open(&env, 0x7f);
    assert_reads(&mut fresh, 0, 8192, 0x31, "a fresh session");
    assert_reads(&mut fresh, 8192, 512 << 10, FILL, "a fresh session");
    fresh.logout();
    assert_no_panic(&env.d);
}

#[test]
fn logins_to_unknown_or_forbidden_targets_fail_with_the_right_status() {
    let config = r#"
[iscsi_access.default]
chap = { user = "u1", secret = "secret-one-12" }

[iscsi_access.targets.open]

[iscsi_access.targets.listed]
initiators = ["iqn.2026-11.dev.forkd.test:allowed"]

[iscsi_access.targets.faraway]
addresses = ["192.0.2.0/24"]
"#;
    let env = setup_with(Some(config), &["dev", "open", "listed", "faraway"]);
    let mut bystander = Initiator::open(&env.addr, &opts("open", 9));
    let refused = |o: &LoginOptions, status: u16, what: &str| {
        let mut c = Initiator::connect(&env.addr);
        match c.login(o) {
            Ok(()) => panic!("{what}: the login succeeded"),
            Err(r) => assert_eq!(r.status, status, "{what}: login status {:#06x}: {:?}", r.status, r.response),
        }
        assert_closed_silently(&mut c, what);
    };
    let chap = |o: LoginOptions, user: &str, secret: &[u8]| LoginOptions {
        chap: Some((user.to_string(), secret.to_vec())),
        ..o
    };
    // Unknown targets: 0x0203.
    for name in [
        "iqn.2026-11.dev.forkd:nope",
        "iqn.2026-11.dev.forkd:prod",
        "iqn.2026-11.dev.forkd:prod:snap-1",
        "iqn.2026-11.dev.other:dev",
    ] {
        refused(&LoginOptions::new(INITIATOR, name), 0x0203, name);
    }
    // CHAP required: wrong secret, wrong name, no CHAP at all: 0x0201.
    refused(&chap(opts("dev", 1), "u1", b"secret-two-12"), 0x0201, "dev with a wrong CHAP secret");
    refused(&chap(opts("dev", 1), "u2", b"secret-one-12"), 0x0201, "dev with a wrong CHAP name");
    refused(&opts("dev", 1), 0x0201, "dev with AuthMethod=None");
    // Allow-lists: 0x0202.
    refused(&opts("listed", 1), 0x0202, "listed from an initiator not on its list");
    refused(&opts("faraway", 1), 0x0202, "faraway from 127.0.0.1");
    assert_closed_count(&env.d, "login refused", 9);
    // The right credentials and names get in.
    let mut c = Initiator::open(&env.addr, &chap(opts("dev", 2), "u1", b"secret-one-12"));
    assert_reads(&mut c, 0, 4096, FILL, "dev with the right CHAP secret");
    c.logout();
    let mut c =
        Initiator::open(&env.addr, &LoginOptions::new("iqn.2026-11.dev.forkd.test:allowed", &target_name("listed")));
    assert_reads(&mut c, 0, 4096, FILL, "listed from the allowed initiator");
    c.logout();
    assert_reads(&mut bystander, 0, 4096, FILL, "the bystander session");
    assert_no_panic(&env.d);
}

#[test]
fn commands_outside_the_cmdsn_window_are_ignored() {
    let mut env = setup();
    let mut bystander = open(&env, 9);
    let mut c = open(&env, 1);
    assert_good(&c.test_unit_ready(), "TEST UNIT READY");
    let exp = c.cmd_sn;
    assert_eq!(c.exp_cmd_sn, exp, "ExpCmdSN after one command");
    let max = c.max_cmd_sn;
    assert!(max.wrapping_sub(exp) < 1 << 31, "MaxCmdSN {max} is behind ExpCmdSN {exp}");
    let with_sn = |c: &mut Initiator, mut p: Pdu, sn: u32| {
        match &mut p.bhs {
            Bhs::ScsiCommand(x) => x.cmd_sn = sn,
            Bhs::NopOut(x) => x.cmd_sn = sn,
            _ => unreachable!(),
        }
        c.cmd_sn = c.cmd_sn.wrapping_sub(1); // the builder took a CmdSN this request does not use
        p
    };
    // CmdSN = MaxCmdSN + 1, a CmdSN already used, and one half the number space away.
    let p = c.command_pdu(&[0u8; 6], 0, false, false, &[]);
    let beyond = with_sn(&mut c, p, max.wrapping_add(1));
    let p = c.nop_pdu(b"stale");
    let stale = with_sn(&mut c, p, exp.wrapping_sub(1));
    let p = c.command_pdu(&read16_cdb(0, 8), 4096, true, false, &[]);
    let far = with_sn(&mut c, p, exp.wrapping_add(1 << 31));
    for (p, what) in [(&beyond, "CmdSN = MaxCmdSN + 1"), (&stale, "CmdSN = ExpCmdSN - 1"), (&far, "CmdSN 2^31 away")] {
        c.send(p).expect("send a request outside the window");
        let got = c.recv_within(QUIET).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(got.is_none(), "{what}: the target answered {got:?}");
    }
    // CmdSN == ExpCmdSN is answered, and only it.
    let r = c.test_unit_ready();
    assert_good(&r, "TEST UNIT READY with CmdSN == ExpCmdSN");
    assert_eq!(c.exp_cmd_sn, exp.wrapping_add(1), "ExpCmdSN after the command in the window");
    let got = c.recv_within(QUIET).expect("read");
    assert!(got.is_none(), "a request outside the window was answered late: {got:?}");
    // Inside the window but ahead of ExpCmdSN: held until the gap is filled, then both are
    // answered in CmdSN order (RFC 7143 §3.2.2.1).
    let exp = c.cmd_sn;
    let p = c.command_pdu(&read16_cdb(0, 8), 4096, true, false, &[]);
    let ahead_itt = p.bhs.itt();
    let ahead = with_sn(&mut c, p, exp.wrapping_add(1));
    c.send(&ahead).expect("send a read one ahead of ExpCmdSN");
    let got = c.recv_within(QUIET).expect("read");
    assert!(got.is_none(), "a request ahead of a CmdSN gap was answered before the gap was filled: {got:?}");
    let r = c.test_unit_ready();
    assert_good(&r, "TEST UNIT READY filling the gap");
    c.cmd_sn = exp.wrapping_add(2);
    let r = c.wait_command(ahead_itt, &[]).expect("the read that waited");
    assert_good(&r, "the read that waited for the gap");
    assert_eq!(r.data, vec![FILL; 4096]);
    assert_eq!(c.exp_cmd_sn, exp.wrapping_add(2), "ExpCmdSN after the gap was filled");
    assert_reads(&mut c, 0, 4096, FILL, "read after the ignored requests");
    c.logout();
    assert_alive(&mut env, &mut bystander);
}

#[test]
fn reads_and_writes_beyond_the_end_get_lba_out_of_range() {
    let mut env = setup();
    let mut bystander = open(&env, 9);
    let mut c = open(&env, 1);
    let reads: [(u64, u32, &str); 4] = [
        (CAPACITY, 1, "READ (16) at the capacity"),
        (CAPACITY - 1, 2, "READ (16) across the end"),
        (u64::MAX, 1, "READ (16) at LBA 2^64 - 1"),
        (u64::MAX - 3, 8, "READ (16) whose end overflows"),
    ];
    for (lba, n, what) in reads {
        let edtl = n * 512;
        let r = c.scsi(&read16_cdb(lba, n), edtl, true, &[]);
        assert!(r.data.is_empty(), "{what}: {} bytes of Data-In", r.data.len());
        assert_check(&r, ILLEGAL_REQUEST, 0x21, 0x00, what);
    }
    let writes: [(u64, &str); 3] = [
        (CAPACITY, "WRITE (16) at the capacity"),
        (CAPACITY - 4, "WRITE (16) across the end"),
        (u64::MAX - 3, "WRITE (16) whose end overflows"),
    ];
    for (lba, what) in writes {
        let r = c.write16(lba, &[0xee; 4096]);
        assert_check(&r, ILLEGAL_REQUEST, 0x21, 0x00, what);
    }
    // The last blocks did not change and can be written.
    let last8 = usize::try_from(CAPACITY - 8).expect("lba") * BLOCK;
    assert_reads(&mut c, last8, 4096, 0, "the last 8 blocks");
    assert_good(&c.write16(CAPACITY - 8, &[0x77; 4096]), "WRITE (16) of the last 8 blocks");
    assert_reads(&mut c, last8, 4096, 0x77, "the last 8 blocks");
    c.logout();
    assert_alive(&mut env, &mut bystander);
}

#[test]
fn initiator_vanishing_mid_write_writes_nothing() {
    let mut env = setup();
    let mut bystander = open(&env, 9);
    // A 1 MiB write: two R2T bursts answered in full, half of the third, then gone.
    let mut c = open(&env, 1);
    let data = vec![0xee; MIB];
    let pdu = c.command_pdu(&write16_cdb(0, blocks(MIB)), blocks(MIB) * 512, false, true, &[]);
    let itt = pdu.bhs.itt();
    c.send(&pdu).expect("send a 1 MiB write");
    for n in 0..3 {
        let p = c.recv().expect("an R2T");
        let Bhs::R2t(r2t) = &p.bhs else { panic!("expected an R2T, got {:?}", p.bhs) };
        if n < 2 {
            c.answer_r2t(r2t, &data).expect("send a burst");
        } else {
            let half = usize::try_from(r2t.desired_length / 2).expect("len");
            let off = r2t.buffer_offset;
            c.send(&c.data_out_pdu(itt, r2t.ttt, 0, off, &data[..half], false)).expect("send half a burst");
        }
    }
    drop(c);
    assert_closed_count(&env.d, "initiator closed", 1);
    // Unsolicited data cut short: a 64 KiB write with 16 KiB immediate and 8 of 48 KiB more.
    let mut c = open(&env, 2);
    let mut pdu = c.command_pdu(&write16_cdb(4096, 128), 65536, false, true, &data[..16384]);
    if let Bhs::ScsiCommand(x) = &mut pdu.bhs {
        x.final_pdu = false;
    }
    let itt = pdu.bhs.itt();
    let mut bytes = c.encode(&pdu);
    bytes.extend(c.encode(&c.data_out_pdu(itt, RESERVED_TAG, 0, 16384, &data[..8192], false)));
    c.send_raw(&bytes).expect("send a write and part of its unsolicited data");
    drop(c);
    assert_closed_count(&env.d, "initiator closed", 2);
    assert_alive(&mut env, &mut bystander);
    let mut fresh = open(&env, 3);
    assert_reads(&mut fresh, 0, MIB, FILL, "the range of the 1 MiB write");
    assert_reads(&mut fresh, 2 * MIB, 65536, 0, "the range of the 64 KiB write");
    fresh.logout();
    assert_eq!(env.d.api().read("dev", 0, 1 << 20), vec![FILL; MIB], "the API sees part of a write");
}

#[test]
fn nop_out_ping_is_echoed_and_logout_closes() {
    let mut env = setup();
    let mut bystander = open(&env, 9);
    let mut c = open(&env, 1);
    for len in [0usize, 1, 3, 1001, 8192, 65536] {
        let data: Vec<u8> = (0..len).map(|i| byte(i * 7 % 256)).collect();
        let pdu = c.nop_pdu(&data);
        let itt = pdu.bhs.itt();
        c.send(&pdu).expect("send a NOP-Out");
        let p = c.recv().expect("the NOP-In");
        let Bhs::NopIn(n) = &p.bhs else { panic!("expected a NOP-In, got {:?}", p.bhs) };
        assert_eq!((n.itt, n.ttt, n.lun), (itt, RESERVED_TAG, 0), "{n:?}");
        assert!(p.data[..] == data[..], "a {len}-byte ping came back different");
    }
    // An immediate ping is answered too, without taking a CmdSN.
    let mut pdu = c.nop_pdu(b"immediate");
    c.cmd_sn = c.cmd_sn.wrapping_sub(1);
    if let Bhs::NopOut(x) = &mut pdu.bhs {
        x.immediate = true;
    }
    c.send(&pdu).expect("send an immediate NOP-Out");
    let p = c.recv().expect("the NOP-In");
    assert!(matches!(&p.bhs, Bhs::NopIn(n) if n.itt == pdu.bhs.itt()), "{:?}", p.bhs);
    assert_eq!(&p.data[..], b"immediate");
    assert_good(&c.test_unit_ready(), "TEST UNIT READY after the pings");

    // Logout: answered (response 0, "connection or session closed successfully"), then the
    // target closes.
    let pdu = c.logout_pdu();
    let itt = pdu.bhs.itt();
    c.send(&pdu).expect("send a Logout Request");
    let got = assert_closed(&mut c, "Logout");
    assert_eq!(got.len(), 1, "one Logout Response, then the close: {got:?}");
    match &got[0].bhs {
        Bhs::LogoutResponse(r) => {
            assert_eq!((r.itt, r.response), (itt, 0), "{r:?}");
            assert_eq!(got[0].bhs.opcode(), opcode::LOGOUT_RESPONSE);
        }
        other => panic!("expected a Logout Response, got {other:?}"),
    }
    assert_closed_count(&env.d, "logout", 1);
    assert_alive(&mut env, &mut bystander);

    // RFC 7143 §11.19: the NOP-In duplicates "up to the first MaxRecvDataSegmentLength bytes"
    // of the ping data, the initiator's MaxRecvDataSegmentLength (§13.12: no PDU may carry
    // more than its receiver declared).
    let mut small = Initiator::open(&env.addr, &opts("dev", 2).set("MaxRecvDataSegmentLength", "8192"));
    assert_reads(&mut small, 0, 256 << 10, FILL, "Data-In within MaxRecvDataSegmentLength=8192");
    let data: Vec<u8> = (0..16384).map(|i| byte(i % 253)).collect();
    small.max_recv = iscsi::pdu::MAX_DATA_SEGMENT; // take what comes, to look at it
    let (nop, _) = small.ping(&data);
    assert!(
        nop.data[..] == data[..8192],
        "a 16 KiB ping to a target told MaxRecvDataSegmentLength=8192 came back with {} bytes",
        nop.data.len()
    );
    small.logout();
}

#[test]
fn abort_task_drops_a_write_waiting_for_data_out() {
    let mut env = setup();
    let mut bystander = open(&env, 9);
    let mut c = open(&env, 1);
    let pdu = c.command_pdu(&write16_cdb(0, 16), 8192, false, true, &[]);
    let (itt, cmd_sn) = match &pdu.bhs {
        Bhs::ScsiCommand(x) => (x.itt, x.cmd_sn),
        _ => unreachable!(),
    };
    c.send(&pdu).expect("send an 8 KiB write");
    let p = c.recv().expect("the R2T");
    let Bhs::R2t(r2t) = p.bhs else { panic!("expected an R2T, got {:?}", p.bhs) };
    assert_eq!((r2t.itt, r2t.desired_length), (itt, 8192));
    let tmf = c.tmf_pdu(tmf::ABORT_TASK, itt, cmd_sn);
    let tmf_itt = tmf.bhs.itt();
    c.send(&tmf).expect("send ABORT TASK");
    let p = c.recv().expect("the TMF response");
    match &p.bhs {
        Bhs::TaskMgmtResponse(t) => assert_eq!((t.itt, t.response), (tmf_itt, tmf::COMPLETE), "{t:?}"),
        other => panic!("expected the Task Management Function Response, got {other:?}"),
    }
    // The data the R2T asked for, sent late: the task is gone, so it is refused (Reject 0x09)
    // or ignored, and never written.
    let late = c.data_out_pdu(itt, r2t.ttt, 0, 0, &[0xee; 8192], true);
    let bytes = c.encode(&late);
    c.send_raw(&bytes).expect("send the Data-Out of the aborted task");
    let (_, before) = c.ping(b"after the abort");
    for p in &before {
        match &p.bhs {
            Bhs::Reject(_) => assert_reject_fields(p, reject_reason::INVALID_PDU_FIELD, &bytes, "late Data-Out"),
            other => panic!("the aborted task got an answer: {other:?}"),
        }
    }
    // ABORT TASK of a task that no longer exists.
    let tmf = c.tmf_pdu(tmf::ABORT_TASK, itt, cmd_sn);
    c.send(&tmf).expect("send ABORT TASK again");
    let p = c.recv().expect("the TMF response");
    assert!(
        matches!(&p.bhs, Bhs::TaskMgmtResponse(t) if t.response == tmf::NO_TASK || t.response == tmf::COMPLETE),
        "{:?}",
        p.bhs
    );
    assert_reads(&mut c, 0, 8192, FILL, "the range of the aborted write");
    assert_good(&c.write16(0, &[0x42; 8192]), "the same write, sent again");
    assert_reads(&mut c, 0, 8192, 0x42, "the same write, sent again");
    c.logout();
    assert!(env.d.running());
    assert_reads(&mut bystander, 8192, 4096, FILL, "the bystander session");
    let mut fresh = open(&env, 0x7f);
    assert_reads(&mut fresh, 0, 8192, 0x42, "a fresh session");
    fresh.logout();
    assert_no_panic(&env.d);
    for p in before.iter().filter(|p| matches!(p.bhs, Bhs::Reject(_))) {
        assert_complete_header(p, &bytes, "late Data-Out");
    }
}

/// PERSISTENT RESERVE IN, READ KEYS: refused with RESERVATION CONFLICT while an SPC-2
/// reservation is held, by anyone.
const PRIN_READ_KEYS: [u8; 10] = [0x5E, 0, 0, 0, 0, 0, 0, 0, 64, 0];
const RESERVE_6: [u8; 6] = [0x16, 0, 0, 0, 0, 0];

/// Wait for the answer to an immediate Task Management Function Request.
fn tmf_answered(c: &mut Initiator, pdu: &Pdu, what: &str) {
    let itt = pdu.bhs.itt();
    c.send(pdu).unwrap_or_else(|e| panic!("send {what}: {e}"));
    let p = c.recv().unwrap_or_else(|e| panic!("the answer to {what}: {e}"));
    match &p.bhs {
        Bhs::TaskMgmtResponse(t) => assert_eq!((t.itt, t.response), (itt, tmf::COMPLETE), "{what}: {t:?}"),
        other => panic!("expected the answer to {what}, got {other:?}"),
    }
}

/// The control mode page from MODE SENSE (6) with SWP set to `on`, as a MODE SELECT (6) CDB and
/// parameter list.
fn swp_select(c: &mut Initiator, on: bool) -> ([u8; 6], Vec<u8>) {
    let r = c.scsi(&[0x1A, 0x08, 0x0A, 0, 255, 0], 255, true, &[]);
    assert_good(&r, "MODE SENSE (6) of the control page");
    let mut list = r.data;
    assert_eq!(list.get(4..6), Some(&[0x0A, 0x0A][..]), "the control page: {list:02x?}");
    list[0] = 0;
    list[4 + 4] = if on { list[4 + 4] | 0x08 } else { list[4 + 4] & !0x08 };
    ([0x15, 0x10, 0, 0, u8::try_from(list.len()).expect("short list"), 0], list)
}

#[test]
fn logout_and_lun_reset_take_effect_before_they_are_answered() {
    let mut env = setup();
    let mut bystander = open(&env, 9);
    // A RESERVE (6) held by a session that logs out: the bystander's very next command, sent
    // the moment the Logout Response arrives, must not find it. (Before the fix the
    // reservation was released after the response had gone out, and this lost the race now
    // and then; 50 rounds.)
    for round in 0..50 {
        let mut holder = open(&env, 1);
        assert_good(&holder.scsi(&RESERVE_6, 0, false, &[]), "RESERVE (6)");
        let r = bystander.scsi(&PRIN_READ_KEYS, 64, true, &[]);
        assert_eq!(r.status, RESERVATION_CONFLICT, "round {round}: PR IN under another's RESERVE (6)");
        let pdu = holder.logout_pdu();
        holder.send(&pdu).expect("send a Logout Request");
        let p = holder.recv().expect("the Logout Response");
        assert!(matches!(&p.bhs, Bhs::LogoutResponse(r) if r.response == 0), "{:?}", p.bhs);
        let r = bystander.scsi(&PRIN_READ_KEYS, 64, true, &[]);
        assert_good(&r, &format!("round {round}: PR IN right after the holder's Logout Response"));
    }
    // The same for a LOGICAL UNIT RESET, which also clears Software Write Protect.
    let mut holder = open(&env, 1);
    assert_good(&holder.scsi(&RESERVE_6, 0, false, &[]), "RESERVE (6)");
    let (cdb, list) = swp_select(&mut holder, true);
    assert_good(&holder.scsi(&cdb, u32::from(cdb[4]), false, &list), "MODE SELECT (6) setting SWP");
    let reset = holder.tmf_pdu(tmf::LOGICAL_UNIT_RESET, RESERVED_TAG, 0);
    tmf_answered(&mut holder, &reset, "LOGICAL UNIT RESET");
    assert_good(&bystander.scsi(&PRIN_READ_KEYS, 64, true, &[]), "PR IN right after the LUN reset");
    assert_good(&bystander.write16(lba(2 * MIB), &[0x5a; 4096]), "a write right after the LUN reset");
    // SWP set by one session protects the medium for every session, and outlives the session.
    let (cdb, list) = swp_select(&mut holder, true);
    assert_good(&holder.scsi(&cdb, u32::from(cdb[4]), false, &list), "MODE SELECT (6) setting SWP");
    holder.logout();
    assert_check(&bystander.write16(lba(2 * MIB), &[0x5b; 4096]), 0x07, 0x27, 0x00, "a write under SWP");
    assert_reads(&mut bystander, 2 * MIB, 4096, 0x5a, "the medium under SWP");
    let (cdb, list) = swp_select(&mut bystander, false);
    assert_good(&bystander.scsi(&cdb, u32::from(cdb[4]), false, &list), "MODE SELECT (6) clearing SWP");
    assert_good(&bystander.write16(lba(2 * MIB), &[0x5b; 4096]), "a write once SWP is clear");
    assert_alive(&mut env, &mut bystander);
    assert_no_panic(&env.d);
}

/// An immediate NOP-Out ping (no CmdSN taken): the NOP-In brings the current MaxCmdSN. `Err`
/// when the connection is gone.
fn immediate_ping(c: &mut Initiator) -> std::io::Result<()> {
    let mut pdu = c.nop_pdu(&[]);
    c.cmd_sn = c.cmd_sn.wrapping_sub(1);
    if let Bhs::NopOut(x) = &mut pdu.bhs {
        x.immediate = true;
    }
    let itt = pdu.bhs.itt();
    c.send(&pdu)?;
    loop {
        let p = c.recv()?;
        if matches!(&p.bhs, Bhs::NopIn(n) if n.itt == itt) {
            return Ok(());
        }
    }
}

#[test]
fn immediate_data_of_unfinished_writes_is_bounded_per_connection() {
    let mut env = setup();
    let mut bystander = open(&env, 9);
    let mut c = Initiator::open(&env.addr, &opts("dev", 1).set("FirstBurstLength", "262144"));
    assert_eq!(c.answered("FirstBurstLength"), Some("262144"));
    let rss_before = daemon_rss_kib(&env.d);
    // Writes of 512 KiB, each with 256 KiB of immediate data and announcing unsolicited
    // Data-Out (F=0) that never comes: 1200 of them hold 300 MiB unless something bounds it.
    // The session module bounds buffered write data at MAX_BUFFERED (256 MiB) per connection
    // and closes the connection past it.
    let immediate = vec![0xee; 256 << 10];
    let mut sent = 0usize;
    let mut gone = false;
    for _batch in 0..12 {
        let mut bytes = Vec::new();
        for _ in 0..100 {
            let mut pdu = c.command_pdu(&write16_cdb(0, 1024), 512 << 10, false, true, &immediate);
            if let Bhs::ScsiCommand(x) = &mut pdu.bhs {
                x.final_pdu = false;
            }
            bytes.extend(c.encode(&pdu));
        }
        if c.send_raw(&bytes).is_err() || immediate_ping(&mut c).is_err() {
            gone = true;
            break;
        }
        sent += 100;
    }
    let rss_after = daemon_rss_kib(&env.d);
    println!("{sent} writes held; daemon RSS {rss_before} KiB before, {rss_after} KiB after; closed: {gone}");
    assert!(
        gone,
        "{sent} unfinished writes hold {} MiB of immediate data on one connection and it is still open \
         (daemon RSS {rss_before} KiB -> {rss_after} KiB)",
        sent / 4
    );
    assert_closed_count(&env.d, "too much write data outstanding", 1);
    assert_alive(&mut env, &mut bystander);
}
