//! CLI end to end on a real daemon: ingest an image twice, clone both snapshots, dump and
//! compare byte for byte, write to clones, snapshot, clone a clone, rewind, refresh, tree,
//! list, delete, and check the space comes back.

use std::collections::BTreeSet;
use std::path::Path;

use forkd_tests::{allocated_bytes, assert_same_image, disk_usage, Daemon, BS};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;

const MIB: usize = 1 << 20;
const SIZE: usize = 64 * MIB;

fn seed() -> u64 {
    let seed =
        std::env::var("FORKD_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::thread_rng().gen());
    println!("seed {seed} (set FORKD_TEST_SEED to repeat)");
    seed
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

fn nonzero_bytes(img: &[u8]) -> u64 {
    img.chunks(BS).filter(|b| !is_zero(b)).count() as u64 * BS as u64
}

/// `forkd dump REF FILE`, then read FILE back.
fn dump(d: &Daemon, reference: &str, file: &Path) -> Vec<u8> {
    d.cli_ok(&["dump", reference, file.to_str().expect("utf-8 path")]);
    std::fs::read(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()))
}

fn apply(model: &mut [u8], offset: usize, data: &[u8]) {
    model[offset..offset + data.len()].copy_from_slice(data);
}

fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

fn names(list: &Value) -> BTreeSet<String> {
    list["volumes"]
        .as_array()
        .unwrap_or_else(|| panic!("list --json has no volumes array: {list}"))
        .iter()
        .map(|v| v["name"].as_str().expect("volume name").to_string())
        .collect()
}

fn volume<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name} missing from list --json: {list}"))
}

#[test]
fn cli_end_to_end_on_a_real_daemon() {
    let mut rng = StdRng::seed_from_u64(seed());
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let data_dir = root.join("data");
    let mut d = Daemon::start(&data_dir, &root.join("daemon.log"));
    let img_path = root.join("img.raw");
    let img = img_path.to_str().expect("utf-8");

    // v1: random data with every 8th MiB zero.
    let mut v1 = random_bytes(&mut rng, SIZE);
    for mib in (7..64).step_by(8) {
        v1[mib * MIB..(mib + 1) * MIB].fill(0);
    }
    std::fs::write(&img_path, &v1).expect("write image");

    d.cli_ok(&["source", "create", "prod", "--size", "64M"]);
    d.cli_ok(&["ingest", "prod", "--from", img]);

    // v2: 1% of the blocks changed, a couple turned to zero, a couple of zero ones filled.
    let nblocks = SIZE / BS;
    let to_change = nblocks.div_ceil(100);
    let zero_blocks: Vec<usize> = (0..nblocks).filter(|&b| is_zero(&v1[b * BS..(b + 1) * BS])).collect();
    let data_blocks: Vec<usize> = (0..nblocks).filter(|&b| !is_zero(&v1[b * BS..(b + 1) * BS])).collect();
    let mut changed: BTreeSet<usize> = BTreeSet::new();
    let mut made_zero = BTreeSet::new();
    while made_zero.len() < 2 {
        let b = data_blocks[rng.gen_range(0..data_blocks.len())];
        made_zero.insert(b);
        changed.insert(b);
    }
    let mut filled = 0;
    while filled < 2 {
        let b = zero_blocks[rng.gen_range(0..zero_blocks.len())];
        if changed.insert(b) {
            filled += 1;
        }
    }
    while changed.len() < to_change {
        changed.insert(rng.gen_range(0..nblocks));
    }
    let mut v2 = v1.clone();
    for &b in &changed {
        let block = &mut v2[b * BS..(b + 1) * BS];
        if made_zero.contains(&b) {
            block.fill(0);
        } else {
            loop {
                rng.fill_bytes(block);
                if !is_zero(block) {
                    break;
                }
            }
        }
    }
    let changed_bytes = (changed.len() * BS) as u64;
    assert_eq!(
        v1.chunks(BS).zip(v2.chunks(BS)).filter(|(a, b)| a != b).count(),
        changed.len(),
        "test bug: the change set is not what was changed"
    );
    std::fs::write(&img_path, &v2).expect("write image v2");
    d.cli_ok(&["ingest", "prod", "--from", img]);

    // Two snapshots, with ingest summaries that show only the changes were sent.
    let show = d.cli_json(&["show", "prod"]);
    assert_eq!(show["name"], "prod", "{show:#}");
    assert_eq!(show["kind"], "source", "{show:#}");
    assert_eq!(show["size_bytes"], SIZE as u64, "{show:#}");
    let snaps = show["snapshots"].as_array().unwrap_or_else(|| panic!("no snapshots: {show:#}"));
    assert_eq!(snaps.len(), 2, "prod should have 2 snapshots: {show:#}");
    assert_eq!(snaps[0]["name"], "prod@1", "{show:#}");
    assert_eq!(snaps[1]["name"], "prod@2", "{show:#}");
    let first_sent = snaps[0]["ingest"]["sent_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("prod@1 has no ingest.sent_bytes: {show:#}"));
    let nz = nonzero_bytes(&v1);
    assert!(
        first_sent >= nz && first_sent as f64 <= 1.05 * nz as f64 + MIB as f64,
        "first ingest sent {first_sent} bytes for {nz} bytes of non-zero data"
    );
    let sent = snaps[1]["ingest"]["sent_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("prod@2 has no ingest.sent_bytes: {show:#}"));
    let limit = 1.05 * changed_bytes as f64 + MIB as f64;
    assert!(sent as f64 <= limit, "second ingest sent {sent} bytes for {changed_bytes} changed bytes (limit {limit})");
    // Bytes on the wire: the whole stream (frame headers and crc32s included).
    let wire = snaps[1]["ingest"]["wire_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("prod@2 has no ingest.wire_bytes: {show:#}"));
    assert!(wire >= sent, "the stream carries at least the payload ({wire} < {sent})");
    assert!(
        wire as f64 <= limit,
        "second ingest put {wire} bytes on the wire for {changed_bytes} changed (limit {limit})"
    );
    assert_eq!(
        snaps[1]["ingest"]["changed_bytes"].as_u64(),
        Some(changed_bytes),
        "second ingest's changed_bytes: {show:#}"
    );
    let usage_after_ingests = disk_usage(&data_dir);

    // Clones of both snapshots read back exactly v1 and v2, sparse where zero.
    d.cli_ok(&["clone", "prod@1", "c1"]);
    d.cli_ok(&["clone", "prod@2", "c2"]);
    let f1 = root.join("f1");
    let f2 = root.join("f2");
    assert_same_image("dump c1", &dump(&d, "c1", &f1), &v1);
    assert_same_image("dump c2", &dump(&d, "c2", &f2), &v2);
    let f1_alloc = allocated_bytes(&f1);
    assert!(
        f1_alloc < SIZE as u64 && f1_alloc <= nz + 4 * MIB as u64,
        "dump of c1 is not sparse: {f1_alloc} bytes allocated for {nz} bytes of data in {SIZE}"
    );

    // A write to c1 through the API, then c1@1 and a clone of it.
    let mut c1_model = v1.clone();
    let w1_off = 5 * MIB + 1234;
    let w1 = random_bytes(&mut rng, 100_000);
    d.api().write("c1", w1_off as u64, &w1);
    apply(&mut c1_model, w1_off, &w1);
    assert_eq!(
        d.api().read("c1", w1_off as u64 - 10, w1.len() as u64 + 20),
        c1_model[w1_off - 10..w1_off + w1.len() + 10].to_vec(),
        "reading back the write to c1"
    );
    let snap = d.cli_json(&["snapshot", "c1"]);
    assert_eq!(snap["snapshot"], "c1@1", "snapshot c1: {snap}");
    d.cli_ok(&["clone", "c1@1", "c1b"]);
    let f = root.join("f_c1b");
    assert_same_image("dump c1b (clone of c1@1)", &dump(&d, "c1b", &f), &c1_model);
    assert_same_image("dump prod@1 after writing c1", &dump(&d, "prod@1", &f), &v1);

    // Clone writes that take space: c2 and c1b.
    let mut c2_model = v2.clone();
    let w = random_bytes(&mut rng, 4 * MIB);
    d.api().write("c2", (30 * MIB) as u64, &w);
    apply(&mut c2_model, 30 * MIB, &w);
    let w = random_bytes(&mut rng, 2 * MIB);
    d.api().write("c1b", (40 * MIB) as u64, &w);
    let mut c1b_model = c1_model.clone();
    apply(&mut c1b_model, 40 * MIB, &w);
    assert_same_image("dump c2 after a write", &dump(&d, "c2", &f), &c2_model);
    assert_same_image("dump c1b after a write", &dump(&d, "c1b", &f), &c1b_model);
    assert_same_image("dump c1@1 after writing c1b", &dump(&d, "c1@1", &f), &c1_model);
    assert_same_image("dump prod@2 after writing c2", &dump(&d, "prod@2", &f), &v2);

    // Another write to c1, then rewind to c1@1.
    let mut c1_later = c1_model.clone();
    let w = random_bytes(&mut rng, MIB);
    d.api().write("c1", (20 * MIB) as u64, &w);
    apply(&mut c1_later, 20 * MIB, &w);
    let w = random_bytes(&mut rng, 8192);
    d.api().write("c1", (w1_off + 4000) as u64, &w);
    apply(&mut c1_later, w1_off + 4000, &w);
    assert_same_image("dump c1 after a second write", &dump(&d, "c1", &f), &c1_later);
    d.cli_ok(&["rewind", "c1", "--to", "c1@1"]);
    assert_same_image("dump c1 after rewind to c1@1", &dump(&d, "c1", &f), &c1_model);

    // Refresh: c1 becomes prod's newest snapshot.
    d.cli_ok(&["refresh", "c1"]);
    assert_same_image("dump c1 after refresh", &dump(&d, "c1", &f), &v2);
    let show_c1 = d.cli_json(&["show", "c1"]);
    assert_eq!(show_c1["origin"], "prod@2", "c1 after refresh: {show_c1:#}");

    // tree and list.
    let tree = d.cli_ok(&["tree"]);
    for name in ["prod", "c1", "c2", "c1b"] {
        assert!(tree.lines().any(|l| l.split_whitespace().any(|w| w == name)), "tree does not show {name}:\n{tree}");
    }
    let list = d.cli_json(&["list"]);
    let want: BTreeSet<String> = ["prod", "c1", "c2", "c1b"].iter().map(|s| s.to_string()).collect();
    assert_eq!(names(&list), want, "list --json: {list:#}");
    assert_eq!(volume(&list, "prod")["kind"], "source");
    for c in ["c1", "c2", "c1b"] {
        assert_eq!(volume(&list, c)["kind"], "clone", "{c}: {list:#}");
    }
    assert_eq!(volume(&list, "c2")["origin"], "prod@2", "{list:#}");
    assert_eq!(volume(&list, "c1b")["origin"], "c1@1", "{list:#}");

    // Delete every clone; the space they wrote comes back.
    for c in ["c1b", "c2", "c1"] {
        d.cli_ok(&["delete", c]);
    }
    d.wait_for_garbage_collection();
    let list = d.cli_json(&["list"]);
    let want: BTreeSet<String> = ["prod".to_string()].into_iter().collect();
    assert_eq!(names(&list), want, "list --json after deleting the clones: {list:#}");
    let usage = disk_usage(&data_dir);
    println!("disk usage: {usage_after_ingests} after ingests, {usage} after deleting the clones; second ingest sent {sent} for {changed_bytes} changed");
    assert!(
        usage <= usage_after_ingests + 2 * MIB as u64,
        "data dir uses {usage} bytes after deleting every clone, {usage_after_ingests} after the ingests"
    );

    // Everything left survives a clean restart.
    let st = d.stop();
    assert!(st.success(), "forkd serve exited with {st} after SIGTERM");
    d.restart();
    assert_same_image("dump prod@1 after restart", &dump(&d, "prod@1", &f), &v1);
    assert_same_image("dump prod after restart", &dump(&d, "prod", &f), &v2);
    let show = d.cli_json(&["show", "prod"]);
    assert_eq!(show["snapshots"].as_array().map(Vec::len), Some(2), "{show:#}");
}
