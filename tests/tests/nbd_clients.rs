//! The NBD target driven by real, widely used clients: libnbd's nbdinfo and nbdcopy, qemu-io
//! and qemu-img, and fio's nbd engine. Checks what a client sees in the handshake (size, flags,
//! block sizes, meta contexts), the export list, block status, that writes through NBD stay
//! private to the clone, that NBD contents equal `forkd dump`, data integrity over several
//! connections, and that rewind, refresh and delete close the connections they affect (and
//! only those), after answering, completely and from before the switch, every request the
//! connection had sent: checked with a raw client that pipelines requests, reads late or keeps
//! sending while the daemon closes.
//!
//! The clients must be installed (`apt-get install -y libnbd-bin qemu-utils fio`, see
//! `/work/shared/TESTING.md`); a missing one fails the test with a message saying so.

use std::process::{Command, Output};
use std::time::Duration;

use forkd_tests::rawnbd::{self, Client};
use forkd_tests::{assert_same_image, run_bounded, Daemon};
use rand::{RngCore, SeedableRng};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
/// Longest any client command may run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on waiting for the server to close a connection.
const CLOSE_WAIT: Duration = Duration::from_secs(30);
/// The close reason of connections closed for a rewind, refresh or delete.
const SWITCH_REASON: &str = "closed for a rewind, refresh or delete";

/// The source image: 0x11 in [0, 1 MiB), 0x22 in [8 MiB, 8 MiB + 12 KiB), 0x33 in
/// [32 MiB, 34 MiB), zeros elsewhere.
fn source_image() -> Vec<u8> {
    let mut img = vec![0u8; usize::try_from(SIZE).expect("size")];
    let m = 1usize << 20;
    img[..m].fill(0x11);
    img[8 * m..8 * m + 12 * 1024].fill(0x22);
    img[32 * m..34 * m].fill(0x33);
    img
}

struct Env {
    d: Daemon,
    tmp: tempfile::TempDir,
}

impl Env {
    fn path(&self, name: &str) -> String {
        self.tmp.path().join(name).to_str().expect("utf-8 path").to_string()
    }

    /// `forkd dump REF FILE` and the file's bytes.
    fn dump(&self, reference: &str, file: &str) -> Vec<u8> {
        self.d.cli_ok(&["dump", reference, file]);
        std::fs::read(file).unwrap_or_else(|e| panic!("read {file}: {e}"))
    }
}

/// A daemon with source `prod` ingested from [`source_image`] (snapshot `prod@1`) and the
/// given clones of `prod@1`.
fn setup(clones: &[&str]) -> Env {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_in(tmp.path());
    let env = Env { d, tmp };
    let img = env.path("src.img");
    std::fs::write(&img, source_image()).expect("write source image");
    env.d.cli_ok(&["source", "create", "prod", "--size", "64M"]);
    env.d.cli_ok(&["ingest", "prod", "--from", &img]);
    for c in clones {
        env.d.cli_ok(&["clone", "prod@1", c]);
    }
    env
}

/// A command for an installed client tool; panics with the package to install if it is missing.
fn tool(name: &str) -> Command {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file())).unwrap_or(false);
    if !found {
        let package = match name {
            "nbdinfo" | "nbdcopy" | "nbdsh" => "libnbd-bin",
            "qemu-io" | "qemu-img" | "qemu-storage-daemon" => "qemu-utils",
            other => other,
        };
        panic!("{name} is not installed: these tests need the real client (apt-get install -y {package}; see /work/shared/TESTING.md)");
    }
    Command::new(name)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Run a client to completion (bounded); it must exit 0. Returns stdout and stderr together.
#[track_caller]
fn run_ok(cmd: &mut Command) -> String {
    let what = format!("{cmd:?}");
    let out = run_bounded(cmd, TOOL_TIMEOUT);
    assert!(out.status.success(), "{what} failed with {}\n{}", out.status, text(&out));
    text(&out)
}

/// Run qemu-io with `cmds` on `uri`; every command must succeed (exit 0, no "failed").
#[track_caller]
fn qemu_io(uri: &str, read_only: bool, cmds: &[&str]) -> String {
    let out = qemu_io_raw(uri, read_only, cmds);
    let t = text(&out);
    assert!(out.status.success() && !t.contains("failed"), "qemu-io {cmds:?} on {uri}: {}\n{t}", out.status);
    t
}

/// Run qemu-io and return its output whatever the outcome.
fn qemu_io_raw(uri: &str, read_only: bool, cmds: &[&str]) -> Output {
    let mut cmd = tool("qemu-io");
    cmd.arg("-f").arg("raw");
    if read_only {
        cmd.arg("-r");
    }
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(uri);
    run_bounded(&mut cmd, TOOL_TIMEOUT)
}

/// qemu-io's `read -P` of `pattern` must FAIL verification (the data is not there).
#[track_caller]
fn qemu_io_pattern_absent(uri: &str, read_only: bool, cmd: &str) {
    let out = qemu_io_raw(uri, read_only, &[cmd]);
    let t = text(&out);
    assert!(
        t.contains("Pattern verification failed"),
        "qemu-io {cmd:?} on {uri} found the pattern ({}):\n{t}",
        out.status
    );
}

/// `nbdinfo --json URI`'s single export.
fn nbdinfo(uri: &str) -> Value {
    let out = run_ok(tool("nbdinfo").arg("--json").arg(uri));
    let json_start = out.find('{').unwrap_or_else(|| panic!("nbdinfo --json {uri}: no JSON:\n{out}"));
    let v: Value = serde_json::from_str(out[json_start..].trim())
        .unwrap_or_else(|e| panic!("nbdinfo --json {uri}: not JSON ({e}):\n{out}"));
    let exports = v["exports"].as_array().unwrap_or_else(|| panic!("nbdinfo --json {uri}: no exports: {v}"));
    assert_eq!(exports.len(), 1, "nbdinfo --json {uri}: {v}");
    exports[0].clone()
}

/// `nbdinfo --map --json URI` as (offset, length, type).
fn nbdmap(uri: &str) -> Vec<(u64, u64, u64)> {
    let out = run_bounded(tool("nbdinfo").arg("--map").arg("--json").arg(uri), TOOL_TIMEOUT);
    assert!(out.status.success(), "nbdinfo --map {uri}: {}\n{}", out.status, text(&out));
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo --map --json {uri}: not JSON ({e}):\n{}", text(&out)));
    v.as_array()
        .unwrap_or_else(|| panic!("nbdinfo --map --json {uri}: not an array: {v}"))
        .iter()
        .map(|e| {
            let f = |k: &str| e[k].as_u64().unwrap_or_else(|| panic!("map entry without {k}: {e}"));
            (f("offset"), f("length"), f("type"))
        })
        .collect()
}

/// The type of the map at byte `at` (the map must cover it).
fn map_type_at(map: &[(u64, u64, u64)], at: u64) -> u64 {
    map.iter().find(|(o, l, _)| *o <= at && at < o + l).unwrap_or_else(|| panic!("map does not cover {at}: {map:?}")).2
}

#[test]
fn nbdinfo_shows_size_flags_block_sizes_list_and_map() {
    let env = setup(&["dev1"]);
    let d = &env.d;

    let e = nbdinfo(&d.nbd_uri("dev1"));
    assert_eq!(e["export-name"], "dev1", "{e}");
    assert_eq!(e["export-size"], SIZE, "{e}");
    for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_fast_zero", "can_cache"] {
        assert_eq!(e[flag], true, "dev1: {flag} in {e}");
    }
    assert_eq!(e["is_read_only"], false, "{e}");
    assert_eq!(e["block_size_minimum"], 1, "{e}");
    assert_eq!(e["block_size_preferred"], 4096, "{e}");
    assert_eq!(e["block_size_maximum"], 33_554_432, "{e}");
    let contexts: Vec<&str> = e["contexts"].as_array().expect("contexts").iter().filter_map(Value::as_str).collect();
    assert!(contexts.contains(&"base:allocation"), "contexts of dev1: {contexts:?}");

    // Snapshot and source exports: read-only, same size and block sizes.
    for export in ["prod@1", "prod"] {
        let e = nbdinfo(&d.nbd_uri(export));
        assert_eq!(e["export-name"], export, "{e}");
        assert_eq!(e["is_read_only"], true, "{export}: {e}");
        assert_eq!(e["export-size"], SIZE, "{e}");
        assert_eq!(e["block_size_maximum"], 33_554_432, "{e}");
        assert_eq!(e["can_trim"], false, "{export} cannot trim: {e}");
        assert_eq!(e["can_zero"], false, "{export} cannot zero: {e}");
    }
    // The unencoded form of the snapshot name works too (libnbd takes '@' in a path).
    let e = nbdinfo(&format!("nbd://127.0.0.1:{}/prod@1", d.nbd_port()));
    assert_eq!(e["is_read_only"], true, "{e}");

    // --list: the clone, the source and its snapshot, nothing else.
    let out = run_ok(tool("nbdinfo").arg("--list").arg("--json").arg(format!("nbd://127.0.0.1:{}", d.nbd_port())));
    let v: Value = serde_json::from_str(&out[out.find('{').expect("JSON")..]).expect("nbdinfo --list --json");
    let mut names: Vec<String> = v["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|x| x["export-name"].as_str().expect("export-name").to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["dev1", "prod", "prod@1"], "nbdinfo --list");

    // --map of a fresh clone: data exactly where the source has it, hole+zero elsewhere.
    let expected = vec![
        (0, MIB, 0),
        (MIB, 7 * MIB, 3),
        (8 * MIB, 12 * 1024, 0),
        (8 * MIB + 12 * 1024, 24 * MIB - 12 * 1024, 3),
        (32 * MIB, 2 * MIB, 0),
        (34 * MIB, 30 * MIB, 3),
    ];
    assert_eq!(nbdmap(&d.nbd_uri("dev1")), expected, "nbdinfo --map of a fresh clone");
    assert_eq!(nbdmap(&d.nbd_uri("prod@1")), expected, "nbdinfo --map of the snapshot");
    // The human-readable map says the same.
    let out = run_ok(tool("nbdinfo").arg("--map").arg(d.nbd_uri("dev1")));
    let rows: Vec<Vec<&str>> =
        out.lines().map(|l| l.split_whitespace().collect()).filter(|r: &Vec<&str>| r.len() >= 4).collect();
    assert_eq!(rows.len(), 6, "nbdinfo --map:\n{out}");
    assert_eq!(rows[1][3], "hole,zero", "nbdinfo --map:\n{out}");
    assert_eq!(rows[0][3], "data", "nbdinfo --map:\n{out}");

    // After zeroing and trimming inside data: those ranges are zero (2), not data.
    qemu_io(
        &d.nbd_uri("dev1"),
        false,
        &["write -z 32M 64k", "discard 33M 64k", "write -P 0x44 16M 8k", "write -z 20M 64k"],
    );
    let map = nbdmap(&d.nbd_uri("dev1"));
    assert_eq!(map_type_at(&map, 32 * MIB), 2, "zeroed data: {map:?}");
    assert_eq!(map_type_at(&map, 32 * MIB + 65535), 2, "zeroed data: {map:?}");
    assert_eq!(map_type_at(&map, 32 * MIB + 65536), 0, "data after the zeroed range: {map:?}");
    assert_eq!(map_type_at(&map, 33 * MIB), 2, "trimmed data: {map:?}");
    assert_eq!(map_type_at(&map, 33 * MIB + 65536), 0, "data after the trimmed range: {map:?}");
    assert_eq!(map_type_at(&map, 16 * MIB), 0, "written hole: {map:?}");
    assert_eq!(map_type_at(&map, 16 * MIB + 8192), 3, "never written: {map:?}");
    assert_ne!(map_type_at(&map, 20 * MIB) & 2, 0, "zeroed hole must read as zero: {map:?}");
    let covered: u64 = map.iter().map(|(_, l, _)| l).sum();
    assert_eq!(covered, SIZE, "the map must cover the export: {map:?}");
    // The snapshot's map is unchanged.
    assert_eq!(nbdmap(&d.nbd_uri("prod@1")), expected, "nbdinfo --map of the snapshot after writes to the clone");
}

#[test]
fn qemu_io_writes_stay_private_to_the_clone() {
    let env = setup(&["dev1", "dev2"]);
    let d = &env.d;
    let dev1 = d.nbd_uri("dev1");
    qemu_io(
        &dev1,
        false,
        &[
            "write -P 0xaa 0 1M",
            "write -P 0x55 100 1000",
            "write -P 0xcc 16M 64k",
            "write -z 32M 64k",
            "discard 33M 64k",
            "write -P 0x66 40M 4097",
            "flush",
        ],
    );
    let written = [
        "read -P 0xaa 0 100",
        "read -P 0x55 100 1000",
        "read -P 0xaa 1100 1047476",
        "read -P 0 1M 1M",
        "read -P 0x22 8M 12k",
        "read -P 0xcc 16M 64k",
        "read -P 0 32M 64k",
        "read -P 0x33 32832k 960k",
        "read -P 0 33M 64k",
        "read -P 0x33 33856k 960k",
        "read -P 0x66 40M 4097",
        "read -P 0 41947137 4095",
    ];
    qemu_io(&dev1, false, &written);

    // Invisible in the snapshot, the source and a sibling clone: they still hold the originals.
    let original = [
        "read -P 0x11 0 1M",
        "read -P 0 1M 7M",
        "read -P 0x22 8M 12k",
        "read -P 0 16M 64k",
        "read -P 0x33 32M 2M",
        "read -P 0 40M 8k",
    ];
    for export in ["prod@1", "prod", "dev2"] {
        let ro = export != "dev2";
        let uri = d.nbd_uri(export);
        qemu_io(&uri, ro, &original);
        qemu_io_pattern_absent(&uri, ro, "read -P 0xaa 0 1M");
        qemu_io_pattern_absent(&uri, ro, "read -P 0x55 100 1000");
        qemu_io_pattern_absent(&uri, ro, "read -P 0xcc 16M 64k");
        qemu_io_pattern_absent(&uri, ro, "read -P 0 32M 64k");
    }
    // A write through qemu to a read-only export fails.
    let out = qemu_io_raw(&d.nbd_uri("prod@1"), false, &["write -P 0x77 0 4k"]);
    assert!(!out.status.success() || text(&out).contains("failed"), "write to prod@1 succeeded:\n{}", text(&out));
    qemu_io(&d.nbd_uri("prod@1"), true, &["read -P 0x11 0 1M"]);

    // Snapshot the clone with the CLI, clone the snapshot: the new clone sees the writes.
    let out = d.cli_ok(&["snapshot", "dev1"]);
    assert!(out.contains("dev1@1"), "forkd snapshot dev1: {out}");
    d.cli_ok(&["clone", "dev1@1", "dev3"]);
    qemu_io(&d.nbd_uri("dev3"), false, &written);
    qemu_io(&d.nbd_uri("dev1@1"), true, &written);
    // The new clone's own writes do not reach dev1 or dev1@1.
    qemu_io(&d.nbd_uri("dev3"), false, &["write -P 0x99 0 64k"]);
    qemu_io_pattern_absent(&d.nbd_uri("dev1"), false, "read -P 0x99 0 64k");
    qemu_io_pattern_absent(&d.nbd_uri("dev1@1"), true, "read -P 0x99 0 64k");
    qemu_io(&d.nbd_uri("dev1"), false, &written);
}

#[test]
fn qemu_img_compare_and_nbdcopy_equal_the_dump() {
    let env = setup(&["dev1", "dev2"]);
    let d = &env.d;
    // Put random data into dev1 over NBD (raw client), plus qemu-io patterns, zeroes and a trim.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0001);
    let mut c = Client::open(&d.nbd_addr(), "dev1", false);
    for (off, len) in [(3 * MIB + 17, 300_001usize), (20 * MIB, 4 << 20), (63 * MIB, 1 << 20)] {
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        c.write(off, &data).expect("write random data to dev1");
    }
    assert_eq!(c.flush(), 0, "flush");
    c.disconnect();
    qemu_io(&d.nbd_uri("dev1"), false, &["write -P 0xab 100k 5k", "write -z 32M 1M", "discard 8M 4k"]);

    let dump1 = env.path("dev1.dump");
    let image = env.dump("dev1", &dump1);
    let out = run_ok(tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(d.nbd_uri("dev1")).arg(&dump1));
    assert!(out.contains("Images are identical"), "qemu-img compare dev1 with its dump:\n{out}");
    // And the comparison can fail: dev2 differs from dev1's dump.
    let out = run_bounded(
        tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(d.nbd_uri("dev2")).arg(&dump1),
        TOOL_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(1), "qemu-img compare dev2 with dev1's dump:\n{}", text(&out));

    // nbdcopy of the clone to a file equals the dump byte for byte.
    let copy1 = env.path("dev1.nbdcopy");
    run_ok(tool("nbdcopy").arg(d.nbd_uri("dev1")).arg(&copy1));
    let copied = std::fs::read(&copy1).expect("read nbdcopy output");
    assert_same_image("nbdcopy of dev1 vs forkd dump dev1", &copied, &image);
    // The same for the snapshot export: equal to the ingested image.
    let copy_snap = env.path("prod1.nbdcopy");
    run_ok(tool("nbdcopy").arg(d.nbd_uri("prod@1")).arg(&copy_snap));
    assert_same_image("nbdcopy of prod@1", &std::fs::read(&copy_snap).expect("read"), &source_image());
    // nbdcopy into a clone over NBD (file → NBD), then compare with qemu-img.
    run_ok(tool("nbdcopy").arg(&copy1).arg(d.nbd_uri("dev2")));
    let out = run_ok(tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(d.nbd_uri("dev2")).arg(&dump1));
    assert!(out.contains("Images are identical"), "dev2 after nbdcopy of dev1 into it:\n{out}");
    assert_same_image("forkd dump dev2 after nbdcopy", &env.dump("dev2", &env.path("dev2.dump")), &image);
}

/// fio over NBD; it runs in `dir` (where it keeps its verify state files).
fn fio_cmd(dir: &std::path::Path, uri: &str, verify_only: bool) -> Command {
    let mut cmd = tool("fio");
    cmd.current_dir(dir);
    cmd.args([
        "--name=nbdjob",
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--numjobs=4",
        "--size=12M",
        "--offset=4M",
        "--offset_increment=14M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randrepeat=1",
    ])
    .arg(format!("--uri={uri}"));
    if verify_only {
        cmd.arg("--verify_only");
    }
    cmd
}

#[test]
fn fio_verify_over_four_connections() {
    let env = setup(&["dev1", "dev2"]);
    let d = &env.d;
    // Four jobs, one NBD connection each, each its own 12 MiB region: randwrite, then verify.
    let out = run_ok(&mut fio_cmd(env.tmp.path(), &d.nbd_uri("dev1"), false));
    assert!(!out.contains("verify:"), "fio reported verify errors:\n{out}");
    assert_eq!(out.matches("err= 0").count(), 4, "fio: four jobs without errors expected:\n{out}");
    assert!(out.matches("connected to NBD server").count() >= 4, "fio: four NBD connections expected:\n{out}");
    // New connections verify what the first run wrote.
    let out = run_ok(&mut fio_cmd(env.tmp.path(), &d.nbd_uri("dev1"), true));
    assert!(!out.contains("verify:"), "fio --verify_only reported errors:\n{out}");
    // The check can fail: the sibling clone does not have that data.
    let out = run_bounded(&mut fio_cmd(env.tmp.path(), &d.nbd_uri("dev2"), true), TOOL_TIMEOUT);
    assert!(
        !out.status.success() && text(&out).contains("verify:"),
        "fio --verify_only on a clone that never got the writes passed:\n{}",
        text(&out)
    );
    // The regions outside the jobs' ranges are untouched: the source's first MiB is intact.
    assert_eq!(d.api().read("dev1", 0, MIB), vec![0x11; 1 << 20]);
    assert_eq!(d.api().read("dev1", 60 * MIB, 4 * MIB), vec![0; 4 << 20]);
}

/// The raw client's connection was closed by the server (bounded wait); panics otherwise.
#[track_caller]
fn assert_server_closed(c: &mut Client, what: &str) {
    assert!(c.wait_closed(CLOSE_WAIT), "{what}: the server kept the connection open for {CLOSE_WAIT:?}");
    // A request on it fails too.
    assert!(c.try_read(0, 4096).is_err(), "{what}: a read on the closed connection was answered");
}

fn fill_of(c: &mut Client, offset: u64) -> u8 {
    let b = c.read(offset, 4096).expect("read 4 KiB");
    assert!(b.iter().all(|&x| x == b[0]), "block at {offset} is not uniform");
    b[0]
}

#[test]
fn rewind_closes_the_clones_connections_and_new_ones_see_the_rewound_content() {
    let env = setup(&["dev1", "dev2"]);
    let d = &env.d;
    let addr = d.nbd_addr();
    let mut a = Client::open(&addr, "dev1", false);
    a.write(0, &[0xab; 4096]).expect("write 0xab");
    assert_eq!(a.flush(), 0);
    let out = d.cli_ok(&["snapshot", "dev1"]);
    assert!(out.contains("dev1@1"), "{out}");
    a.write(0, &[0xcd; 4096]).expect("write 0xcd");
    a.write(MIB, &[0xce; 4096]).expect("write 0xce");
    assert_eq!(fill_of(&mut a, 0), 0xcd);
    // Bystanders: the sibling clone and the snapshot export of dev1.
    let mut sib = Client::open(&addr, "dev2", false);
    let mut snap = Client::open(&addr, "dev1@1", false);
    let before = d.nbd_closed(SWITCH_REASON);

    let out = d.cli_ok(&["rewind", "dev1", "--to", "dev1@1"]);
    assert!(out.contains("dev1@1"), "forkd rewind: {out}");
    assert_server_closed(&mut a, "dev1's connection after a rewind");
    assert_eq!(d.wait_nbd_closed(SWITCH_REASON, before + 1, Duration::from_secs(10)), before + 1);
    // New connections see the rewound content; the bystanders were not closed.
    let mut b = Client::open(&addr, "dev1", false);
    assert_eq!(fill_of(&mut b, 0), 0xab, "dev1 after the rewind to dev1@1");
    assert_eq!(fill_of(&mut b, MIB), 0, "dev1 after the rewind: a write after dev1@1 survived");
    assert_eq!(fill_of(&mut sib, 0), 0x11, "the sibling's connection");
    assert_eq!(fill_of(&mut snap, 0), 0xab, "the snapshot export's connection");
    qemu_io(&d.nbd_uri("dev1"), false, &["read -P 0xab 0 4k", "read -P 0x11 4k 1020k", "read -P 0 1M 4k"]);

    // The kept pre-rewind state is a snapshot and can be rewound to, again closing b.
    let v = d.cli_json(&["show", "dev1"]);
    let kept: Vec<String> = v["snapshots"]
        .as_array()
        .expect("snapshots")
        .iter()
        .map(|s| s["name"].as_str().expect("name").to_string())
        .collect();
    assert!(kept.len() >= 2, "the pre-rewind state was not kept: {v}");
    let pre = kept.last().expect("kept").clone();
    d.cli_ok(&["rewind", "dev1", "--to", &pre]);
    assert_server_closed(&mut b, "dev1's second connection after a rewind");
    let mut c = Client::open(&addr, "dev1", false);
    assert_eq!(fill_of(&mut c, 0), 0xcd, "dev1 after rewinding to the kept state {pre}");
    assert_eq!(fill_of(&mut c, MIB), 0xce);
    // Rewind to the origin snapshot.
    d.cli_ok(&["rewind", "dev1", "--to", "prod@1"]);
    assert_server_closed(&mut c, "dev1's third connection after a rewind");
    qemu_io(&d.nbd_uri("dev1"), false, &["read -P 0x11 0 1M", "read -P 0 1M 4k"]);
    assert_eq!(d.wait_nbd_closed(SWITCH_REASON, before + 3, Duration::from_secs(10)), before + 3);
    sib.disconnect();
    snap.disconnect();
}

#[test]
fn refresh_closes_the_clones_connections_and_new_ones_see_the_new_source() {
    let env = setup(&["dev1"]);
    let d = &env.d;
    // A second ingest: the first MiB becomes 0x44.
    let mut img = source_image();
    img[..1 << 20].fill(0x44);
    let path = env.path("src2.img");
    std::fs::write(&path, &img).expect("write image");
    d.cli_ok(&["ingest", "prod", "--from", &path]);
    let addr = d.nbd_addr();
    let mut a = Client::open(&addr, "dev1", false);
    assert_eq!(fill_of(&mut a, 0), 0x11);
    a.write(2 * MIB, &[0x5a; 4096]).expect("write");
    let mut old = Client::open(&addr, "prod@1", false);
    let before = d.nbd_closed(SWITCH_REASON);

    d.cli_ok(&["refresh", "dev1"]);
    assert_server_closed(&mut a, "dev1's connection after a refresh");
    assert_eq!(d.wait_nbd_closed(SWITCH_REASON, before + 1, Duration::from_secs(10)), before + 1);
    let mut b = Client::open(&addr, "dev1", false);
    assert_eq!(fill_of(&mut b, 0), 0x44, "dev1 after the refresh to prod@2");
    assert_eq!(fill_of(&mut b, 2 * MIB), 0, "dev1's own write survived the refresh");
    assert_eq!(fill_of(&mut old, 0), 0x11, "prod@1's connection is not affected");
    b.disconnect();
    old.disconnect();
    qemu_io(&d.nbd_uri("dev1"), false, &["read -P 0x44 0 1M"]);
}

#[test]
fn delete_closes_connections_and_the_exports_disappear() {
    let env = setup(&["dev1", "dev2"]);
    let d = &env.d;
    let addr = d.nbd_addr();
    let mut head = Client::open(&addr, "dev1", false);
    head.write(0, &[0x71; 4096]).expect("write");
    d.cli_ok(&["snapshot", "dev1"]);
    let mut snap = Client::open(&addr, "dev1@1", false);
    let mut sib = Client::open(&addr, "dev2", false);
    let mut sib_snap = {
        d.cli_ok(&["snapshot", "dev2"]);
        Client::open(&addr, "dev2@1", false)
    };
    let before = d.nbd_closed(SWITCH_REASON);

    // Deleting one snapshot closes only that snapshot's connections.
    d.cli_ok(&["delete", "dev2@1"]);
    assert_server_closed(&mut sib_snap, "dev2@1's connection after deleting dev2@1");
    assert_eq!(fill_of(&mut sib, 0), 0x11, "dev2's connection after deleting dev2@1");
    let mut c = Client::connect(&addr);
    c.send_flags(rawnbd::C_FIXED_NEWSTYLE | rawnbd::C_NO_ZEROES).expect("flags");
    assert_eq!(c.go("dev2@1"), Err(rawnbd::REP_ERR_UNKNOWN), "deleted snapshot export");
    c.go("dev2").expect("dev2 is still exported");
    c.disconnect();

    // Deleting the volume closes its head and snapshot connections.
    d.cli_ok(&["delete", "dev1"]);
    assert_server_closed(&mut head, "dev1's connection after deleting dev1");
    assert_server_closed(&mut snap, "dev1@1's connection after deleting dev1");
    assert_eq!(d.wait_nbd_closed(SWITCH_REASON, before + 3, Duration::from_secs(10)), before + 3);
    let mut c = Client::connect(&addr);
    c.send_flags(rawnbd::C_FIXED_NEWSTYLE | rawnbd::C_NO_ZEROES).expect("flags");
    assert_eq!(c.go("dev1"), Err(rawnbd::REP_ERR_UNKNOWN), "deleted volume export");
    assert_eq!(c.go("dev1@1"), Err(rawnbd::REP_ERR_UNKNOWN), "deleted volume's snapshot export");
    c.go("dev2").expect("the sibling is still exported");
    assert_eq!(fill_of(&mut c, 0), 0x11);
    c.disconnect();
    let out = run_bounded(tool("nbdinfo").arg(d.nbd_uri("dev1")), TOOL_TIMEOUT);
    assert!(!out.status.success(), "nbdinfo on a deleted export succeeded:\n{}", text(&out));
    assert_eq!(fill_of(&mut sib, 0), 0x11, "the sibling's connection survived both deletes");
    sib.disconnect();
    let list = run_ok(tool("nbdinfo").arg("--list").arg(format!("nbd://127.0.0.1:{}", d.nbd_port())));
    assert!(!list.contains("export=\"dev1\"") && !list.contains("dev1@1"), "nbdinfo --list after delete:\n{list}");
    assert!(list.contains("export=\"dev2\""), "nbdinfo --list after delete:\n{list}");
}

/// Read exactly `buf.len()` bytes. `Ok((n, reset))`: `n` < len only when the stream ended, by
/// EOF or by a connection reset (`reset`).
fn read_full(s: &mut std::net::TcpStream, buf: &mut [u8]) -> std::io::Result<(usize, bool)> {
    use std::io::Read;
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Ok((got, false)),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok((got, true)),
            Err(e) => return Err(e),
        }
    }
    Ok((got, false))
}

/// What the reader of a pipelined connection saw.
#[derive(Debug, Default)]
struct Pipelined {
    /// Cookies of writes answered with success.
    writes_ok: Vec<u64>,
    /// Reads answered with success.
    reads_ok: usize,
    /// Reads whose data was not the pre-rewind content.
    reads_wrong: usize,
    /// Error replies (cookie, errno).
    errors: Vec<(u64, u32)>,
    /// How the stream ended.
    end: String,
    /// Bytes of a reply cut short by the close (0: it ended at a reply boundary).
    partial: usize,
}

/// The `requests=N` of the last "NBD connection closed" log line of `export` with `reason`.
fn logged_requests(log: &str, export: &str, reason: &str) -> Option<u64> {
    let log = forkd_tests::strip_ansi(log);
    let line = log.lines().rev().find(|l| {
        l.contains("NBD connection closed")
            && l.contains(&format!("export={export} "))
            && l.contains(&format!("reason=\"{reason}\""))
    })?;
    line.split(" requests=").nth(1)?.split_whitespace().next()?.parse().ok()
}

/// A client pipelines requests and does not read its replies, so the daemon's replies back up
/// and the client's further requests queue in the socket; a rewind starts; the client then
/// reads everything. The daemon must answer every request it received, completely, before it
/// closes (the count it logs is the count the client must see), and all of them before the
/// rewind changes the clone: reads show the old content, acknowledged writes are in the kept
/// snapshot and not in the rewound clone.
#[test]
fn rewind_answers_every_request_it_received_before_closing() {
    use std::io::Write;

    const READS: u64 = 64; // 1 MiB each: far more than the socket buffers hold
    const WRITES: u64 = 8192; // 4 KiB each, to [16 MiB, 48 MiB)
    const WBASE: u64 = 16 * MIB;
    let env = setup(&["dev1"]);
    let d = &env.d;
    let addr = d.nbd_addr();
    let mut a = Client::open(&addr, "dev1", false);
    a.write(0, &[0xab; 4096]).expect("write 0xab");
    d.cli_ok(&["snapshot", "dev1"]);
    a.write(0, &[0xcd; 4096]).expect("write 0xcd");
    let mut before = source_image()[..1 << 20].to_vec();
    before[..4096].fill(0xcd);
    let pattern = |k: u64| u8::try_from(k % 250).expect("byte") + 1;

    let mut tx = a.stream.try_clone().expect("clone socket");
    let mut rx = a.stream.try_clone().expect("clone socket");
    let sender = std::thread::spawn(move || {
        let mut sent = 0u64;
        for k in 0..READS {
            if tx.write_all(&Client::request_bytes(rawnbd::CMD_READ, 0, k, 0, 1 << 20)).is_err() {
                return sent;
            }
            sent += 1;
        }
        for w in 0..WRITES {
            let k = READS + w;
            let mut b = Client::request_bytes(rawnbd::CMD_WRITE, 0, k, WBASE + w * 4096, 4096);
            b.extend_from_slice(&[pattern(k); 4096]);
            if tx.write_all(&b).is_err() {
                return sent;
            }
            sent += 1;
        }
        sent
    });
    // Start the rewind without reading any reply; wait (bounded) until the daemon has asked the
    // connection to close, then read everything.
    let api = d.url();
    let bin = d.bin().to_path_buf();
    let rewind = std::thread::spawn(move || {
        let mut cmd = Command::new(bin);
        cmd.args(["--api", &api, "rewind", "dev1", "--to", "dev1@1"]).env_remove("FORKD_API");
        run_bounded(&mut cmd, TOOL_TIMEOUT)
    });
    let started = std::time::Instant::now();
    while !d.log().contains("closing connections before the switch") {
        assert!(started.elapsed() < CLOSE_WAIT, "the rewind did not start closing connections");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut p = Pipelined::default();
    loop {
        let mut h = [0u8; 16];
        let (n, reset) = read_full(&mut rx, &mut h).expect("read a reply header");
        if n < 16 {
            p.partial = n;
            p.end = if reset { "connection reset".into() } else { "EOF".into() };
            break;
        }
        assert_eq!(u32::from_be_bytes([h[0], h[1], h[2], h[3]]), rawnbd::SIMPLE_REPLY_MAGIC, "reply magic: {h:02x?}");
        let errno = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let mut c = [0u8; 8];
        c.copy_from_slice(&h[8..16]);
        let cookie = u64::from_be_bytes(c);
        if errno != 0 {
            p.errors.push((cookie, errno));
        } else if cookie >= READS {
            p.writes_ok.push(cookie);
        } else {
            let mut data = vec![0u8; 1 << 20];
            let (n, reset) = read_full(&mut rx, &mut data).expect("read reply data");
            if n < data.len() {
                p.partial = 16 + n;
                p.end = format!("{} inside the data of a read reply", if reset { "connection reset" } else { "EOF" });
                break;
            }
            p.reads_ok += 1;
            if data != before {
                p.reads_wrong += 1;
            }
        }
    }
    let sent = sender.join().expect("sender thread");
    let out = rewind.join().expect("rewind thread");
    assert!(out.status.success(), "forkd rewind failed: {}", text(&out));
    d.wait_nbd_closed(SWITCH_REASON, 1, Duration::from_secs(10));
    let logged = logged_requests(&d.log(), "dev1", SWITCH_REASON).expect("the close is logged with requests=N");
    let received = logged - 2; // the two writes before the pipeline
    let answered = p.reads_ok as u64 + p.writes_ok.len() as u64 + p.errors.len() as u64;
    println!(
        "sent {sent} requests; the daemon received {received}; complete replies: {} reads, {} writes, {} errors; \
         the stream ended by {} with {} bytes of a reply",
        p.reads_ok,
        p.writes_ok.len(),
        p.errors.len(),
        p.end,
        p.partial
    );
    assert!(p.errors.is_empty(), "error replies: {:?}", &p.errors[..p.errors.len().min(10)]);
    assert_eq!(p.reads_wrong, 0, "reads answered on the old connection saw other than the pre-rewind content");
    assert_eq!(
        (answered, p.partial),
        (received, 0),
        "the daemon received {received} requests (its log says) but the client got {answered} complete replies and \
         then {} bytes of one more before the stream ended by {}",
        p.partial,
        p.end
    );
    // Acknowledged writes ran before the rewind: in the kept snapshot, not in the clone.
    let kept = d.cli_json(&["show", "dev1"])["snapshots"].as_array().expect("snapshots").last().expect("kept snapshot")
        ["name"]
        .as_str()
        .expect("name")
        .to_string();
    let span = WRITES * 4096;
    let kept_img = d.api().read(&kept, WBASE, span);
    for &k in &p.writes_ok {
        let at = usize::try_from((k - READS) * 4096).expect("offset");
        assert!(
            kept_img[at..at + 4096].iter().all(|&x| x == pattern(k)),
            "acknowledged write {k} is missing from the kept snapshot {kept}"
        );
    }
    let base = usize::try_from(WBASE).expect("base");
    let src = &source_image()[base..base + usize::try_from(span).expect("span")];
    assert_same_image("dev1 after the rewind, over the pipelined writes", &d.api().read("dev1", WBASE, span), src);
    let mut b = Client::open(&addr, "dev1", false);
    assert_eq!(fill_of(&mut b, 0), 0xab);
    b.disconnect();
}

/// Shrink a socket's receive buffer (so replies back up in the server's send queue).
fn set_rcvbuf(s: &std::net::TcpStream, bytes: i32) {
    let r = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::RcvBuf, &usize::try_from(bytes).expect("size"));
    assert!(r.is_ok(), "setsockopt SO_RCVBUF: {r:?}");
}

/// A client that has sent requests and not yet read all its replies (its receive window is
/// small and full) when a rewind closes its connection, and that sends one more request, as a
/// pipelining client does. The daemon answered every request it received (its log says how
/// many); the client must be able to read every one of those replies before the end of the
/// stream. A server that closes its socket while the client is still sending makes the kernel
/// abort the connection and throw away replies still queued for sending.
#[test]
fn rewind_close_delivers_every_answer_to_a_client_that_is_still_sending() {
    const M: u64 = 2000;
    let env = setup(&["dev1"]);
    let d = &env.d;
    let addr = d.nbd_addr();
    let mut a = Client::open(&addr, "dev1", false);
    set_rcvbuf(&a.stream, 4096);
    d.cli_ok(&["snapshot", "dev1"]);
    for k in 0..M {
        let mut b = Client::request_bytes(rawnbd::CMD_WRITE, 0, k, 16 * MIB + k * 4096, 4096);
        b.extend_from_slice(&[0x5c; 4096]);
        a.send(&b).expect("send a write");
    }
    // The daemon has received all M requests once it counts them.
    let started = std::time::Instant::now();
    while forkd_tests::metric_value(&d.metrics(), "forkd_nbd_requests_total{command=\"write\"}") < M as f64 {
        assert!(started.elapsed() < CLOSE_WAIT, "the daemon did not receive {M} writes");
        std::thread::sleep(Duration::from_millis(5));
    }
    d.cli_ok(&["rewind", "dev1", "--to", "dev1@1"]);
    d.wait_nbd_closed(SWITCH_REASON, 1, Duration::from_secs(10));
    let logged = logged_requests(&d.log(), "dev1", SWITCH_REASON).expect("the close is logged with requests=N");
    assert_eq!(logged, M, "the daemon's count of requests on the connection");
    // A pipelining client's next request, sent before it has noticed the close.
    let _ = a.send(&Client::request_bytes(rawnbd::CMD_READ, 0, M, 0, 4096));
    let mut replies = 0u64;
    let (end, partial) = loop {
        let mut h = [0u8; 16];
        let (n, reset) = read_full(&mut a.stream, &mut h).expect("read a reply");
        if n < 16 {
            break (if reset { "a connection reset" } else { "EOF" }, n);
        }
        let errno = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        assert_eq!(errno, 0, "error reply to a write: {h:02x?}");
        replies += 1;
    };
    println!("the daemon received {logged} requests; the client read {replies} replies, then {end} ({partial} bytes)");
    assert_eq!(
        (replies, partial),
        (M, 0),
        "the daemon answered {M} writes before closing for the rewind, but the client could read only {replies} \
         complete replies (then {partial} bytes of one more) before {end}"
    );
}

/// A client that pipelines reads and then does not read its replies for a while keeps its
/// connection busy past the daemon's drain time. Whatever the daemon does then (wait, or go on
/// with the rewind), a request it received on the connection it was closing must not be served
/// from the rewound clone: every read answered on that connection shows the pre-rewind content.
/// And, as always, every request it received is answered completely before the stream ends.
#[test]
fn a_slow_reader_never_gets_rewound_data_on_its_old_connection() {
    use std::io::Write;

    const BIG: u64 = 64; // 1 MiB reads: more than the socket buffers hold
    const SMALL: u64 = 20_000; // then 4 KiB reads: more batches than the daemon runs ahead
    let env = setup(&["dev1"]);
    let d = &env.d;
    let addr = d.nbd_addr();
    let mut a = Client::open(&addr, "dev1", false);
    a.write(0, &[0xab; 4096]).expect("write 0xab");
    d.cli_ok(&["snapshot", "dev1"]);
    a.write(0, &[0xcd; 4096]).expect("write 0xcd");
    let mut tx = a.stream.try_clone().expect("clone socket");
    let sender = std::thread::spawn(move || {
        for k in 0..BIG + SMALL {
            let len = if k < BIG { 1 << 20 } else { 4096 };
            if tx.write_all(&Client::request_bytes(rawnbd::CMD_READ, 0, k, 0, len)).is_err() {
                return k;
            }
        }
        BIG + SMALL
    });
    // The rewind runs while the client reads nothing; it must finish (bounded) on its own.
    let out = run_bounded(
        Command::new(d.bin()).args(["--api", &d.url(), "rewind", "dev1", "--to", "dev1@1"]).env_remove("FORKD_API"),
        TOOL_TIMEOUT,
    );
    assert!(out.status.success(), "forkd rewind failed: {}", text(&out));
    // Now read everything the old connection answers.
    let (mut old, mut new, mut errors) = (0u64, 0u64, 0u64);
    let end = loop {
        let mut h = [0u8; 16];
        let (n, reset) = read_full(&mut a.stream, &mut h).expect("read a reply header");
        if n < 16 {
            break format!("{} after {n} bytes of a header", if reset { "reset" } else { "EOF" });
        }
        let errno = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let mut c = [0u8; 8];
        c.copy_from_slice(&h[8..16]);
        let cookie = u64::from_be_bytes(c);
        if errno != 0 {
            errors += 1;
            continue;
        }
        let mut data = vec![0u8; if cookie < BIG { 1 << 20 } else { 4096 }];
        let (n, reset) = read_full(&mut a.stream, &mut data).expect("read reply data");
        if n < data.len() {
            break format!("{} inside a read reply", if reset { "reset" } else { "EOF" });
        }
        match data[0] {
            0xcd => old += 1,
            0xab => new += 1,
            other => panic!("read {cookie} of block 0 returned {other:#04x}"),
        }
    };
    let sent = sender.join().expect("sender thread");
    let log = forkd_tests::strip_ansi(&d.log());
    let closed: Vec<&str> =
        log.lines().filter(|l| l.contains("NBD connection closed") || l.contains("closing")).collect();
    println!(
        "sent {sent} reads; answered {old} with the old content, {new} with the rewound content, {errors} errors; \
         then {end}\n{}",
        closed.join("\n")
    );
    assert_eq!(
        new, 0,
        "{new} reads received on the connection the rewind was closing were answered from the rewound clone \
         (after {old} answered before it)"
    );
    // And every request the daemon received on it was answered completely before the end.
    d.wait_nbd_closed(SWITCH_REASON, 1, Duration::from_secs(10));
    let logged = logged_requests(&d.log(), "dev1", SWITCH_REASON).expect("the close is logged with requests=N");
    assert_eq!(
        old + new + errors,
        logged - 2,
        "the daemon received {} reads on the connection (its log says) but the client could read only {} complete \
         replies before {end}",
        logged - 2,
        old + new + errors
    );
    let mut b = Client::open(&addr, "dev1", false);
    assert_eq!(fill_of(&mut b, 0), 0xab);
    b.disconnect();
}
