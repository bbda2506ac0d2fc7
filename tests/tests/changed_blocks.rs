//! `forkd ingest --changed-blocks FILE` on a real daemon: only the listed ranges are read (in
//! both formats, `OFFSET LENGTH` lines and `thin_delta` XML), listed blocks that did not change
//! are still not sent, the snapshot equals the image byte for byte, and a bad list fails with
//! its line number and changes nothing.

use std::path::Path;
use std::process::Output;

use forkd_tests::{assert_same_image, Daemon, BS};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;

const MIB: usize = 1 << 20;
const SIZE: usize = 16 * MIB;
/// `thin_delta`'s data block with `data_block_size="128"` (sectors): 64 KiB.
const THIN_BLOCK: usize = 128 * 512;

fn seed() -> u64 {
    let seed =
        std::env::var("FORKD_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::thread_rng().gen());
    println!("seed {seed} (set FORKD_TEST_SEED to repeat)");
    seed
}

fn utf8(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `forkd dump REF FILE`, then read FILE back.
fn dump(d: &Daemon, reference: &str, file: &Path) -> Vec<u8> {
    d.cli_ok(&["dump", reference, utf8(file)]);
    std::fs::read(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()))
}

/// Fill `data` with random bytes that are not all zero.
fn random_nonzero(rng: &mut StdRng, data: &mut [u8]) {
    loop {
        rng.fill_bytes(data);
        if data.iter().any(|&b| b != 0) {
            return;
        }
    }
}

/// The latest snapshot of `name` (from `show --json`) and how many there are.
fn latest_snapshot(d: &Daemon, name: &str) -> (Value, usize) {
    let show = d.cli_json(&["show", name]);
    let snaps = show["snapshots"].as_array().unwrap_or_else(|| panic!("no snapshots: {show:#}"));
    (snaps.last().cloned().unwrap_or_else(|| panic!("{name} has no snapshot: {show:#}")), snaps.len())
}

/// What an ingest of `new` over `old` must report when exactly the blocks in `listed` are read:
/// (scanned, changed, sent) bytes.
fn expected(old: &[u8], new: &[u8], listed: &[bool]) -> (u64, u64, u64) {
    let (mut scanned, mut changed, mut sent) = (0, 0, 0);
    for (b, (o, n)) in old.chunks(BS).zip(new.chunks(BS)).enumerate() {
        if !listed[b] {
            assert_eq!(o, n, "test bug: block {b} changed but is not listed");
            continue;
        }
        scanned += BS as u64;
        if o != n {
            changed += BS as u64;
            if n.iter().any(|&x| x != 0) {
                sent += BS as u64;
            }
        }
    }
    (scanned, changed, sent)
}

/// Mark the 4 KiB blocks that bytes `offset..offset + len` touch.
fn mark(listed: &mut [bool], offset: usize, len: usize) {
    for flag in &mut listed[offset / BS..(offset + len).div_ceil(BS)] {
        *flag = true;
    }
}

/// Add line `text` for bytes `offset..offset + len` to a list.
fn list(lines: &mut String, listed: &mut [bool], text: &str, offset: usize, len: usize) {
    lines.push_str(text);
    lines.push('\n');
    mark(listed, offset, len);
}

/// Ingest `img` into `prod` with `--changed-blocks list` and check the new snapshot: its
/// ingest summary against `expect` (scanned, changed, sent) and its contents against `want`.
fn ingest_and_check(d: &Daemon, root: &Path, list: &Path, expect: (u64, u64, u64), want: &[u8], what: &str) {
    let (_, before) = latest_snapshot(d, "prod");
    let out = d.cli_ok(&["ingest", "prod", "--from", utf8(&root.join("img.raw")), "--changed-blocks", utf8(list)]);
    println!("{what}: {}", out.trim());
    let read = format!(" from {})", list.display());
    assert!(
        out.contains(&read) && out.contains(" range"),
        "{what}: the summary does not say how many ranges were read: {out}"
    );
    let (snap, count) = latest_snapshot(d, "prod");
    assert_eq!(count, before + 1, "{what}: no new snapshot");
    let ingest = &snap["ingest"];
    let got = (
        ingest["scanned_bytes"].as_u64().unwrap_or(u64::MAX),
        ingest["changed_bytes"].as_u64().unwrap_or(u64::MAX),
        ingest["sent_bytes"].as_u64().unwrap_or(u64::MAX),
    );
    assert_eq!(got, expect, "{what}: (scanned, changed, sent) bytes of {snap:#}");
    let name = snap["name"].as_str().expect("snapshot name");
    assert_same_image(what, &dump(d, name, &root.join("dump.raw")), want);
}

#[test]
fn changed_blocks_lines_and_thin_delta_xml() {
    let mut rng = StdRng::seed_from_u64(seed());
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let d = Daemon::start_in(root);
    let img = root.join("img.raw");
    let nblocks = SIZE / BS;

    // v1: random, with MiB 8 zero.
    let mut v1 = vec![0u8; SIZE];
    rng.fill_bytes(&mut v1);
    v1[8 * MIB..9 * MIB].fill(0);
    std::fs::write(&img, &v1).expect("write image");
    d.cli_ok(&["source", "create", "prod", "--size", "16M"]);
    d.cli_ok(&["ingest", "prod", "--from", utf8(&img)]);

    // v2, listed as `OFFSET LENGTH` lines.
    let mut v2 = v1.clone();
    let mut listed = vec![false; nblocks];
    let mut lines = String::from("# changed since prod@1\n\n");
    // Unaligned bytes across three blocks.
    random_nonzero(&mut rng, &mut v2[100_000..110_000]);
    list(&mut lines, &mut listed, "100000 10000", 100_000, 10_000);
    // A block that became zero: a zero frame, not sent.
    v2[1000 * BS..1001 * BS].fill(0);
    list(&mut lines, &mut listed, "0x3e8000 0x1000   # zeroed", 1000 * BS, BS);
    // 1.5 MiB listed as two overlapping lines; only every 7th block changed.
    for b in (5 * MIB / BS..13 * MIB / 2 / BS).step_by(7) {
        random_nonzero(&mut rng, &mut v2[b * BS..(b + 1) * BS]);
    }
    list(&mut lines, &mut listed, "5242880 1048576", 5 * MIB, MIB);
    list(&mut lines, &mut listed, "5767168\t1048576", 5 * MIB + MIB / 2, MIB);
    // A zero block filled, listed by 100 bytes inside it.
    random_nonzero(&mut rng, &mut v2[8 * MIB + 3 * BS..8 * MIB + 4 * BS]);
    list(&mut lines, &mut listed, "8400996 100", 8 * MIB + 3 * BS + 100, 100);
    // Listed, but nothing changed there.
    list(&mut lines, &mut listed, "12582912 65536", 12 * MIB, 64 << 10);
    let list_path = root.join("changed.txt");
    std::fs::write(&list_path, &lines).expect("write list");
    std::fs::write(&img, &v2).expect("write image v2");
    let expect = expected(&v1, &v2, &listed);
    assert!(expect.2 > 0 && expect.1 > expect.2 && expect.0 > expect.1, "test bug: {expect:?}");
    ingest_and_check(&d, root, &list_path, expect, &v2, "lines");

    // v3, listed as thin_delta XML in 64 KiB data blocks.
    let mut v3 = v2.clone();
    let mut listed = vec![false; nblocks];
    let tb = THIN_BLOCK / BS; // 4 KiB blocks per thin block
    for b in [160, 165, 175] {
        random_nonzero(&mut rng, &mut v3[b * BS..(b + 1) * BS]);
    }
    mark(&mut listed, 10 * THIN_BLOCK, 2 * THIN_BLOCK);
    random_nonzero(&mut rng, &mut v3[100 * THIN_BLOCK..101 * THIN_BLOCK]);
    mark(&mut listed, 100 * THIN_BLOCK, THIN_BLOCK);
    v3[200 * THIN_BLOCK..201 * THIN_BLOCK].fill(0);
    mark(&mut listed, 200 * THIN_BLOCK, THIN_BLOCK);
    mark(&mut listed, 230 * THIN_BLOCK, THIN_BLOCK);
    let xml = format!(
        r#"<superblock uuid="" time="4" transaction="9" version="2" data_block_size="128" nr_data_blocks="{}">
  <diff left="1" right="2">
    <same begin="0" length="10"/>
    <different begin="10" length="2"/>
    <same begin="12" length="88"/>
    <right_only begin="100" length="1"/>
    <same begin="101" length="99"/>
    <left_only begin="200" length="1"/>
    <same begin="201" length="29"/>
    <different begin="230" length="1"/>
  </diff>
</superblock>
"#,
        nblocks / tb
    );
    let xml_path = root.join("delta.xml");
    std::fs::write(&xml_path, xml).expect("write xml");
    std::fs::write(&img, &v3).expect("write image v3");
    let expect = expected(&v2, &v3, &listed);
    assert_eq!(expect, (5 * THIN_BLOCK as u64, (3 + 2 * 16) * BS as u64, (3 + 16) * BS as u64), "test bug");
    ingest_and_check(&d, root, &xml_path, expect, &v3, "thin_delta xml");

    // Only the listed ranges are read: a change outside them does not reach the snapshot.
    let mut v4 = v3.clone();
    random_nonzero(&mut rng, &mut v4[2000 * BS..2001 * BS]);
    random_nonzero(&mut rng, &mut v4[2500 * BS..2501 * BS]);
    std::fs::write(&img, &v4).expect("write image v4");
    let mut want = v3.clone();
    want[2000 * BS..2001 * BS].copy_from_slice(&v4[2000 * BS..2001 * BS]);
    let one = root.join("one.txt");
    std::fs::write(&one, format!("{} {BS}\n", 2000 * BS)).expect("write list");
    let b = BS as u64;
    ingest_and_check(&d, root, &one, (b, b, b), &want, "outside the list");
}

/// Exit code 1 and one stderr line starting with `forkd: error:`; returns that line.
fn clean_failure(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        out.status.code() == Some(1) && lines.len() == 1 && lines[0].starts_with("forkd: error:"),
        "{what}: expected exit 1 and one `forkd: error:` line: exit {:?}, stdout {:?}, stderr {stderr:?}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout)
    );
    lines[0].to_string()
}

#[test]
fn bad_changed_blocks_lists_fail_and_change_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let d = Daemon::start_in(root);
    let img = root.join("img.raw");
    let mut v1 = vec![0u8; MIB];
    StdRng::seed_from_u64(11).fill_bytes(&mut v1);
    std::fs::write(&img, &v1).expect("write image");
    d.cli_ok(&["source", "create", "prod", "--size", "1M"]);
    d.cli_ok(&["source", "create", "fresh", "--size", "1M"]);
    d.cli_ok(&["ingest", "prod", "--from", utf8(&img)]);
    // A changed image, so a successful ingest would change something.
    v1[..BS].fill(0xAB);
    std::fs::write(&img, &v1).expect("write image v2");

    let state = || (d.cli_json(&["list"]), d.cli_json(&["show", "prod"]), d.cli_json(&["show", "fresh"]));
    // (source, list contents, what the error must contain)
    let cases: Vec<(&str, &str, &str)> = vec![
        ("prod", "0 4096\n# comment\n4096 banana\n", ":3: `4096 banana`"),
        ("prod", "0 4096 8192\n", ":1:"),
        ("prod", "\n\n0 0\n", ":3:"),
        ("prod", "0 4096\n1044480 8192\n", ":2: the range of 8192 bytes at offset 1044480 ends past the end"),
        ("prod", "<superblock data_block_size=\"128\">\n<diff>\n<different begin=\"1\" length=\"1\"/>\n", ":3: malformed XML"),
        ("prod", "<superblock data_block_size=\"128\">\n<diff>\n<right_only begin=\"15\" length=\"2\"/>\n</diff>\n</superblock>\n", ":3:"),
        ("prod", "<superblock>\n</superblock>\n", ":1:"),
        ("fresh", "0 4096\n", "ingest the whole image first"),
    ];
    for (i, (source, text, needle)) in cases.iter().enumerate() {
        let list = root.join(format!("bad-{i}.txt"));
        std::fs::write(&list, text).expect("write list");
        let before = state();
        let out = d.cli(&["ingest", source, "--from", utf8(&img), "--changed-blocks", utf8(&list)]);
        let what = format!("case {i} ({text:?})");
        let line = clean_failure(&out, &what);
        println!("{what}\n    {line}");
        assert!(line.contains(needle), "{what}: the error does not contain {needle:?}: {line}");
        if needle.starts_with(':') {
            assert!(line.contains(&format!("{}{needle}", list.display())), "{what}: not FILE:LINE: {line}");
        }
        assert_eq!(state(), before, "{what}: changed the catalog");
    }
    let missing = root.join("missing.txt");
    let out = d.cli(&["ingest", "prod", "--from", utf8(&img), "--changed-blocks", utf8(&missing)]);
    let line = clean_failure(&out, "missing list");
    assert!(line.contains("missing.txt"), "{line}");
    let (_, count) = latest_snapshot(&d, "prod");
    assert_eq!(count, 1, "a refused ingest made a snapshot");
}
