//! `forkd scrub` on a real daemon with real files: no false positives on a clean store or an
//! empty one; damage injected into `extents.0` of a stopped daemon (found by searching the file
//! for each block's distinctive data) is found for every block, and reported for every volume,
//! snapshot and clone that references it with the right offset; after a restart, `forkd
//! ingest` from the intact image sends exactly the damaged blocks of the source's head again
//! and the new snapshot reads back correctly; a damaged block found by a read (no scrub) is
//! re-sent too, after a restart; reads and writes go on while a scrub runs.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use forkd_tests::{assert_same_image, metric_value, Daemon, BS};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;

fn seed() -> u64 {
    let seed =
        std::env::var("FORKD_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::thread_rng().gen());
    println!("seed {seed} (set FORKD_TEST_SEED to repeat)");
    seed
}

fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

fn block(img: &[u8], b: usize) -> &[u8] {
    &img[b * BS..(b + 1) * BS]
}

/// Flip a few bytes of the one slot of `extents.0` that holds `data` (the daemon is stopped).
fn damage(data_dir: &Path, data: &[u8]) {
    let path = data_dir.join("extents.0");
    let extents = std::fs::read(&path).expect("read extents.0");
    let slots: Vec<usize> = extents.chunks_exact(BS).enumerate().filter(|(_, s)| *s == data).map(|(i, _)| i).collect();
    assert_eq!(slots.len(), 1, "the block must be stored exactly once in extents.0");
    let at = (slots[0] * BS + 1000) as u64;
    let f = OpenOptions::new().write(true).open(&path).expect("open extents.0");
    f.write_all_at(&[!data[1000], !data[1001], !data[1002]], at).expect("damage extents.0");
    f.sync_all().expect("sync extents.0");
}

/// `forkd scrub --json`: its answer and whether it exited 0.
fn scrub(d: &Daemon) -> (Value, bool) {
    let out = d.cli(&["scrub", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!("scrub --json is not JSON ({e}): {text}\nstderr: {}", String::from_utf8_lossy(&out.stderr))
    });
    (v, out.status.success())
}

/// The failures of a scrub answer as (reference, offset).
fn failures(v: &Value) -> BTreeSet<(String, u64)> {
    v["failures"]
        .as_array()
        .unwrap_or_else(|| panic!("no failures array: {v}"))
        .iter()
        .map(|f| (f["reference"].as_str().expect("reference").to_string(), f["offset"].as_u64().expect("offset")))
        .collect()
}

fn expect(list: &[(&str, u64)]) -> BTreeSet<(String, u64)> {
    list.iter().map(|(r, b)| (r.to_string(), b * BS as u64)).collect()
}

fn read_status(d: &Daemon, reference: &str, block: u64) -> u16 {
    let path = format!("/v1/volumes/{}/data?offset={}&length={BS}", forkd_tests::enc(reference), block * BS as u64);
    d.api().get(&path).status
}

/// The contents: a source `db` ingested twice (v1 then v2, blocks 10 and 20 changed), a clone
/// of `db@1` with a block written before its snapshot `clone1@1` and one after.
struct Contents {
    v1: Vec<u8>,
    v2: Vec<u8>,
    before_snapshot: Vec<u8>,
    after_snapshot: Vec<u8>,
}

const NBLOCKS: usize = 1024;

fn build(d: &Daemon, root: &Path, rng: &mut StdRng) -> Contents {
    let v1 = random_bytes(rng, NBLOCKS * BS);
    let mut v2 = v1.clone();
    for b in [10, 20] {
        v2[b * BS..(b + 1) * BS].copy_from_slice(&random_bytes(rng, BS));
    }
    let img = root.join("img.raw");
    let img_s = img.to_str().expect("utf-8");
    std::fs::write(&img, &v1).expect("write v1");
    d.cli_ok(&["source", "create", "db", "--size", &(NBLOCKS * BS).to_string()]);
    d.cli_ok(&["ingest", "db", "--from", img_s]);
    std::fs::write(&img, &v2).expect("write v2");
    d.cli_ok(&["ingest", "db", "--from", img_s]);
    d.cli_ok(&["clone", "db@1", "clone1"]);
    let before_snapshot = random_bytes(rng, BS);
    d.api().write("clone1", 100 * BS as u64, &before_snapshot);
    d.cli_ok(&["snapshot", "clone1"]);
    let after_snapshot = random_bytes(rng, BS);
    d.api().write("clone1", 101 * BS as u64, &after_snapshot);
    Contents { v1, v2, before_snapshot, after_snapshot }
}

#[test]
fn scrub_finds_every_damaged_block_and_reingest_repairs_the_source() {
    let mut rng = StdRng::seed_from_u64(seed());
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut d = Daemon::start_in(tmp.path());
    let s = build(&d, tmp.path(), &mut rng);

    // A clean store: every stored block once (v1, the two changed in v2, the clone's two), no damage.
    let (clean, ok) = scrub(&d);
    assert!(ok, "a clean store: {clean}");
    assert_eq!(clean["checked_blocks"], NBLOCKS as u64 + 4, "{clean}");
    assert_eq!(clean["checked_bytes"], (NBLOCKS as u64 + 4) * BS as u64, "{clean}");
    assert_eq!(clean["checked_references"], 5, "db@1 db@2 db clone1@1 clone1: {clean}");
    assert_eq!((clean["damaged_blocks"].as_u64(), clean["failures_total"].as_u64()), (Some(0), Some(0)), "{clean}");
    assert!(failures(&clean).is_empty());

    // Damage five blocks with the daemon stopped: one shared by everything, one of db@1 only
    // (and the clone), the clone's block in its snapshot, db's changed block, the clone's newest.
    d.stop();
    for data in [block(&s.v1, 2), block(&s.v1, 10), &s.before_snapshot, block(&s.v2, 20), &s.after_snapshot] {
        damage(d.data_dir(), data);
    }
    d.restart();
    let (found, ok) = scrub(&d);
    assert!(!ok, "damage makes forkd scrub fail: {found}");
    let want = expect(&[
        ("db@1", 2),
        ("db@2", 2),
        ("db", 2),
        ("clone1@1", 2),
        ("clone1", 2),
        ("db@1", 10),
        ("clone1@1", 10),
        ("clone1", 10),
        ("clone1@1", 100),
        ("clone1", 100),
        ("db@2", 20),
        ("db", 20),
        ("clone1", 101),
    ]);
    assert_eq!(failures(&found), want, "{found}");
    assert_eq!((found["damaged_blocks"].as_u64(), found["failures_total"].as_u64()), (Some(5), Some(13)), "{found}");
    assert_eq!(found["checked_blocks"], NBLOCKS as u64 + 4, "{found}");
    let metrics = d.api().get("/metrics").text();
    assert_eq!(metric_value(&metrics, "forkd_scrub_damaged_blocks"), 5.0, "{metrics}");
    assert!(metric_value(&metrics, "forkd_checksum_errors_total") >= 5.0, "{metrics}");
    let status = d.api().get_json("/v1/scrub");
    assert_eq!(status["running"], false, "{status}");
    assert_eq!(status["damaged_blocks"], 5, "{status}");

    // The text form names every reference; the error line says what to do.
    let out = d.cli(&["scrub"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(": 5 damaged blocks in 13 references\n"), "{text}");
    for (r, off) in &want {
        assert!(text.contains(&format!("\n  {r} offset {off}\n")), "{r} {off} missing: {text}");
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("scrub found 5 damaged blocks (13 references)") && err.contains("re-ingest"), "{err}");
    assert_eq!(read_status(&d, "db", 2), 500, "a damaged block reads as an error");

    // After a restart (what the scrub found must survive it), ingest from the intact image
    // sends db's two damaged blocks again, and only them; the new snapshot reads back right.
    d.stop();
    d.restart();
    let img = tmp.path().join("img.raw");
    let ingest = d.cli_json(&["ingest", "db", "--from", img.to_str().expect("utf-8")]);
    assert_eq!(ingest["snapshot"], "db@3", "{ingest}");
    assert_eq!(ingest["summary"]["sent_bytes"], 2 * BS as u64, "exactly the two damaged blocks: {ingest}");
    assert_same_image("db@3 after the repair", &d.api().read("db@3", 0, (NBLOCKS * BS) as u64), &s.v2);
    assert_same_image("db after the repair", &d.api().read("db", 0, (NBLOCKS * BS) as u64), &s.v2);

    // The older snapshots and the clone still hold the damaged copies; db and db@3 no longer do.
    let (after, ok) = scrub(&d);
    assert!(!ok);
    let mut still = want.clone();
    still.retain(|(r, _)| r != "db");
    assert_eq!(failures(&after), still, "{after}");
    assert_eq!(after["damaged_blocks"], 5, "{after}");
    // A second ingest finds nothing to send: the head is whole again.
    let again = d.cli_json(&["ingest", "db", "--from", img.to_str().expect("utf-8")]);
    assert_eq!(again["summary"]["sent_bytes"], 0, "{again}");
    assert_eq!(read_status(&d, "db@2", 2), 500);
    assert_eq!(read_status(&d, "db@4", 2), 200);
}

#[test]
fn damage_found_by_a_read_is_sent_again_by_the_next_ingest_after_a_restart() {
    let mut rng = StdRng::seed_from_u64(seed());
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut d = Daemon::start_in(tmp.path());
    let img = random_bytes(&mut rng, 256 * BS);
    let img_path = tmp.path().join("img.raw");
    std::fs::write(&img_path, &img).expect("write image");
    let img_s = img_path.to_str().expect("utf-8");
    d.cli_ok(&["source", "create", "src", "--size", "1M"]);
    d.cli_ok(&["ingest", "src", "--from", img_s]);
    d.stop();
    damage(d.data_dir(), block(&img, 7));
    d.restart();
    // Before anything found the damage, its digest is trusted: nothing would be sent.
    assert_eq!(read_status(&d, "src@1", 7), 500, "the read finds the damage");
    assert!(d.log().contains("checksum mismatch"), "the read logs it");
    d.stop();
    d.restart();
    let ingest = d.cli_json(&["ingest", "src", "--from", img_s]);
    assert_eq!(ingest["summary"]["sent_bytes"], BS as u64, "the damaged block, found by the read: {ingest}");
    assert_same_image("src@2", &d.api().read("src@2", 0, 256 * BS as u64), &img);
}

#[test]
fn scrub_of_an_empty_store() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_in(tmp.path());
    let (v, ok) = scrub(&d);
    assert!(ok, "{v}");
    for field in ["checked_blocks", "checked_bytes", "checked_references", "damaged_blocks", "failures_total"] {
        assert_eq!(v[field], 0, "{field}: {v}");
    }
    assert!(failures(&v).is_empty());
    let text = d.cli_ok(&["scrub"]);
    assert!(
        text.starts_with("scrubbed 0 B (0 blocks) of 0 volumes and snapshots in ") && text.ends_with(": no damage\n"),
        "{text}"
    );
    // A source that was never ingested, and a clone of an empty snapshot, hold no block either.
    d.cli_ok(&["source", "create", "empty", "--size", "1G"]);
    d.cli_ok(&["clone", "empty", "c"]);
    let (v, ok) = scrub(&d);
    assert!(ok && v["checked_blocks"] == 0 && v["checked_references"] == 3, "{v}");
}

#[test]
fn reads_and_writes_go_on_while_a_scrub_runs() {
    let mut rng = StdRng::seed_from_u64(seed());
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_in(tmp.path());
    // 256 MiB of data, so a scrub lasts long enough for writes to land while it runs.
    let size = 256usize << 20;
    let img = random_bytes(&mut rng, size);
    let img_path = tmp.path().join("img.raw");
    std::fs::write(&img_path, &img).expect("write image");
    d.cli_ok(&["source", "create", "big", "--size", &size.to_string()]);
    d.cli_ok(&["ingest", "big", "--from", img_path.to_str().expect("utf-8")]);
    d.cli_ok(&["clone", "big@1", "dev"]);
    let mut model = img.clone();
    let mut overlapped = 0;
    for round in 0..20 {
        let api = d.api().clone();
        let scrubber = std::thread::spawn(move || api.request("POST", "/v1/scrub", None));
        let mut writes = 0u64;
        while !scrubber.is_finished() && writes < 10_000 {
            let running = d.api().get_json("/v1/scrub")["running"] == true;
            // Rewrite a few blocks over and over and flush, so that slots are freed and reused
            // under the scrub.
            let b = rng.gen_range(0..256);
            let data = random_bytes(&mut rng, BS);
            d.api().write("dev", (b * BS) as u64, &data);
            model[b * BS..(b + 1) * BS].copy_from_slice(&data);
            assert_eq!(d.api().read("dev", (b * BS) as u64, BS as u64), data, "read back block {b}");
            if writes.is_multiple_of(8) {
                assert!(d.api().post_json("/v1/volumes/dev/flush", &Value::Null).ok());
            }
            if running && d.api().get_json("/v1/scrub")["running"] == true {
                overlapped += 1;
            }
            writes += 1;
        }
        let answer = scrubber.join().expect("scrub thread").expect("scrub request");
        assert_eq!(answer.status, 200, "{}", answer.text());
        let v = answer.json();
        assert_eq!(v["damaged_blocks"], 0, "no false positive while blocks are rewritten and reused: {v}");
        println!("round {round}: {writes} writes during the scrub, {overlapped} inside it so far");
        if overlapped > 0 {
            break;
        }
    }
    assert!(overlapped > 0, "no write completed while a scrub was running in 20 rounds");
    assert_same_image("dev after the scrubs", &d.api().read("dev", 0, size as u64), &model);
    let (v, ok) = scrub(&d);
    assert!(ok && v["damaged_blocks"] == 0, "{v}");
}
