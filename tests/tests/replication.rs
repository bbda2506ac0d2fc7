//! Replication between two sites, each a real daemon in its own network namespace joined by a
//! veth pair (`forkd_tests::twosite`), driven by the real CLI: `forkd replicate VOLUME --to
//! URL` on the source site, `forkd promote` on the target.
//!
//! - `two_sites_harness_works` checks the harness itself: both daemons answer, data ingested
//!   on A dumps back, what A's CLI says to B's API crosses the link and is counted there with
//!   little overhead, a cut link stops it and a restored one carries it again, A keeps its
//!   data across a SIGKILL, and nothing is left behind.
//! - `tree_replicates_thin_and_identical`: a source with five ingests and a tree of clones
//!   (a clone of a clone among them) arrives snapshot by snapshot, each as the diff from one
//!   the target has: every snapshot dumps the same on both sites, `forkd tree` prints the
//!   same, the target holds as many bytes as the source, and the link carries little more
//!   than the changed bytes; then the source fails over: promoted on the target, fed by
//!   ingest there, and replicated back.
//! - `resume_after_cut_link_and_kills`: a run interrupted by a cut link, a SIGKILL of the
//!   target and a SIGKILL of the source fails, keeps what arrived, and the next run resumes
//!   (at most 4 MiB sent again per interruption).
//! - `continuous_follows_a_writer_and_fails_over`: `--continuous 2s` keeps the lag of a clone
//!   written a thousand times a second under 10 s; after `promote` on the target, replicating
//!   back sends only what changed there.
//! - `masked_only_policy_never_sends_unmasked`: with `clone_from=masked`, only masked snapshots
//!   reach the target, and no byte of the unmasked data is found in its extent file.
//! - `a_full_target_disk_keeps_what_arrived`: the target's data directory on a small loop-mounted
//!   filesystem fills up mid-transfer: the run fails saying so, what arrived stays, and once
//!   space is back the next run resumes there.
//!
//! The tests take turns (`serial`): each runs two daemons, and the lag bound should not
//! depend on what another test does meanwhile.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use forkd_tests::twosite::{assert_success, file_contains, namespaces, Background, Side, Site, TwoSites};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// Block size of every forkd volume.
const BS: u64 = 4096;

static SERIAL: Mutex<()> = Mutex::new(());

/// One test of this file at a time (a failed one does not stop the others).
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn us(x: u64) -> usize {
    usize::try_from(x).expect("fits in usize")
}

/// A `size`-byte image: zeros, with `data` random bytes (from `seed`) at its start.
fn sparse_image(path: &Path, size: u64, data: u64, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut img = vec![0u8; us(size)];
    rng.fill(&mut img[..us(data)]);
    std::fs::write(path, &img).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    img
}

/// How many 4 KiB blocks differ between two equally long buffers.
fn changed_blocks(old: &[u8], new: &[u8]) -> u64 {
    old.chunks(us(BS)).zip(new.chunks(us(BS))).filter(|(a, b)| a != b).count() as u64
}

/// A disk image the tests change and ingest again, kept in memory and in a file.
struct Image {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl Image {
    /// `size` bytes of zeros, to be saved at `path`.
    fn new(path: PathBuf, size: u64) -> Image {
        Image { path, bytes: vec![0u8; us(size)] }
    }

    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Random bytes over `[off, off + len)`; returns how many blocks changed.
    fn randomize(&mut self, rng: &mut StdRng, off: u64, len: u64) -> u64 {
        let range = us(off)..us(off + len);
        let old = self.bytes[range.clone()].to_vec();
        rng.fill(&mut self.bytes[range.clone()]);
        changed_blocks(&old, &self.bytes[range])
    }

    /// Random bytes in `pieces` pieces of `piece` bytes at distinct random piece-aligned
    /// offsets; returns how many blocks changed.
    fn scatter(&mut self, rng: &mut StdRng, pieces: u64, piece: u64) -> u64 {
        distinct(rng, pieces, self.size() / piece).into_iter().map(|i| self.randomize(rng, i * piece, piece)).sum()
    }

    /// `data` at `off`.
    fn put(&mut self, off: u64, data: &[u8]) {
        self.bytes[us(off)..us(off) + data.len()].copy_from_slice(data);
    }

    /// Write the file.
    fn save(&self) -> &Path {
        std::fs::write(&self.path, &self.bytes).unwrap_or_else(|e| panic!("write {}: {e}", self.path.display()));
        &self.path
    }
}

/// `n` distinct numbers below `below`, drawn from `rng`.
fn distinct(rng: &mut StdRng, n: u64, below: u64) -> BTreeSet<u64> {
    assert!(n <= below, "{n} distinct numbers below {below}");
    let mut set = BTreeSet::new();
    while (set.len() as u64) < n {
        set.insert(rng.gen_range(0..below));
    }
    set
}

/// Write `pieces` pieces of `piece` random bytes at distinct random piece-aligned offsets
/// (below `size`) of `volume` on `site`, through the HTTP data route; returns how many
/// blocks were written (each one changed: random data).
fn write_random(site: &Site, volume: &str, rng: &mut StdRng, pieces: u64, piece: u64, size: u64) -> u64 {
    for i in distinct(rng, pieces, size / piece) {
        let mut data = vec![0u8; us(piece)];
        rng.fill(&mut data[..]);
        site.write(volume, i * piece, &data);
    }
    pieces * piece / BS
}

/// `forkd replicate VOLUME --to URL --to-token-file FILE EXTRA...`, `URL` and `FILE` those of
/// the other site.
fn replicate_args(ts: &TwoSites, from: Side, volume: &str, extra: &[&str]) -> Vec<String> {
    let to = ts.site(from.other());
    let mut args = vec!["replicate".to_string(), volume.to_string(), "--to".to_string(), to.url()];
    args.push("--to-token-file".to_string());
    args.push(to.token_file().to_str().expect("utf-8 path").to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A one-shot `forkd replicate VOLUME ... --json` run on `from` towards the other site, which
/// must succeed; returns its report after checking it names the volume and the target.
#[track_caller]
fn replicate(ts: &TwoSites, from: Side, volume: &str, extra: &[&str]) -> Value {
    let args = replicate_args(ts, from, volume, extra);
    let r = ts.site(from).cli_json(&strs(&args));
    assert_eq!(r["volume"], volume, "the report names the volume: {r:#}");
    assert_eq!(r["to"].as_str(), Some(ts.url(from.other()).as_str()), "the report names the target: {r:#}");
    r
}

/// [`replicate`] from A, with the bytes A's end of the link sent meanwhile.
#[track_caller]
fn replicate_measured(ts: &TwoSites, volume: &str) -> (Value, u64) {
    let before = ts.tx_bytes(Side::A);
    let r = replicate(ts, Side::A, volume, &[]);
    (r, ts.tx_bytes(Side::A) - before)
}

/// A number in a report, or a panic naming the key and showing the report.
#[track_caller]
fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no number `{key}` in {v:#}"))
}

/// The `(snapshot, base)` pairs a report lists, in its order.
#[track_caller]
fn sent(report: &Value) -> Vec<(String, Option<String>)> {
    let list = report["snapshots"].as_array().unwrap_or_else(|| panic!("no `snapshots` list in {report:#}"));
    list.iter()
        .map(|e| {
            let name = e["snapshot"].as_str().unwrap_or_else(|| panic!("an entry without `snapshot`: {report:#}"));
            (name.to_string(), e["base"].as_str().map(str::to_string))
        })
        .collect()
}

/// The entry of `snapshot` in a report.
#[track_caller]
fn entry<'a>(report: &'a Value, snapshot: &str) -> &'a Value {
    report["snapshots"]
        .as_array()
        .and_then(|l| l.iter().find(|e| e["snapshot"] == snapshot))
        .unwrap_or_else(|| panic!("{snapshot} is not in the report {report:#}"))
}

/// The sum of the entries' `payload_bytes`, checked against the report's total.
#[track_caller]
fn payload_total(report: &Value) -> u64 {
    let sum: u64 = report["snapshots"].as_array().map_or(0, |l| l.iter().map(|e| num(e, "payload_bytes")).sum());
    assert_eq!(num(report, "payload_bytes"), sum, "the total payload is the sum of the snapshots': {report:#}");
    sum
}

/// What one run must have sent: `(snapshot, base, changed blocks)` in this order (oldest
/// first), none resumed, each snapshot's payload at most its changed bytes and a MiB, and
/// over the link (`tx`: A's counter) at most 5 % more than the changed bytes and a MiB per
/// snapshot.
#[track_caller]
fn check_sent(report: &Value, tx: u64, want: &[(&str, Option<&str>, u64)]) {
    let expected: Vec<(String, Option<String>)> =
        want.iter().map(|(s, b, _)| (s.to_string(), b.map(str::to_string))).collect();
    assert_eq!(sent(report), expected, "snapshots sent as (snapshot, base), oldest first: {report:#}");
    let mut changed = 0;
    for (snapshot, _, blocks) in want {
        let e = entry(report, snapshot);
        assert_eq!(num(e, "changed_blocks"), *blocks, "{snapshot}: changed blocks: {report:#}");
        assert_eq!(num(e, "resumed_from_block"), 0, "{snapshot} was not interrupted: {report:#}");
        let payload = num(e, "payload_bytes");
        assert!(
            payload <= blocks * BS + MIB,
            "{snapshot}: {payload} payload bytes for {blocks} changed blocks ({} bytes): {report:#}",
            blocks * BS
        );
        changed += blocks * BS;
    }
    payload_total(report);
    let limit = changed + changed / 20 + MIB * (want.len() as u64).max(1);
    println!("sent {expected:?}: {changed} changed bytes, {tx} bytes over the link (limit {limit})");
    assert!(tx <= limit, "{tx} bytes crossed the link for {changed} changed bytes (limit {limit}): {report:#}");
}

/// The snapshots' `(name, created_at, bookmarks)` of a volume as `show` gives them.
fn snapshot_records(site: &Site, volume: &str) -> Vec<(String, String, String)> {
    let v = site.show(volume);
    v["snapshots"]
        .as_array()
        .map(|l| {
            l.iter().map(|s| (s["name"].to_string(), s["created_at"].to_string(), s["bookmarks"].to_string())).collect()
        })
        .unwrap_or_default()
}

#[test]
fn two_sites_harness_works() {
    let _serial = serial();
    let mut ts = TwoSites::new("harness");
    let names = [ts.a().namespace().to_string(), ts.b().namespace().to_string()];
    for side in [Side::A, Side::B] {
        let l = ts.site(side).cli_json(&["list"]);
        assert!(l["volumes"].as_array().is_some_and(Vec::is_empty), "site {side:?}: a fresh daemon lists {l}");
    }

    // A source ingested on A dumps back byte for byte.
    let img = ts.scratch().join("db.img");
    let data = sparse_image(&img, 64 * MIB, 24 * MIB, 1);
    ts.a().create_source("db", "64M");
    assert_eq!(ts.a().ingest("db", &img), "db@1");
    let dumped = ts.scratch().join("db-1.img");
    ts.a().dump("db@1", &dumped);
    forkd_tests::assert_same_image("db@1 dumped on A", &std::fs::read(&dumped).expect("read dump"), &data);
    std::fs::remove_file(&dumped).expect("rm dump");
    assert!(ts.a().extents_allocated() >= 24 * MIB, "A's extent file holds the ingested data");

    // A's CLI talking to B's API crosses the link, both ways, and the counters see it.
    let (tx_a, rx_b, rx_a) = (ts.tx_bytes(Side::A), ts.rx_bytes(Side::B), ts.rx_bytes(Side::A));
    let out = ts.cli_across(Side::A, Side::B, &["list", "--json"]);
    assert!(out.status.success(), "A's CLI against B's API: {}", String::from_utf8_lossy(&out.stderr));
    assert!(ts.tx_bytes(Side::A) > tx_a && ts.rx_bytes(Side::B) > rx_b, "the request did not cross the link");
    assert!(ts.rx_bytes(Side::A) > rx_a, "the answer did not cross the link");
    // B's own token is what lets A in: A's token is refused.
    let out =
        ts.a().cli_at(&ts.url(Side::B), &ts.a().token_file(), &["list"], Duration::from_secs(30)).expect("bounded");
    assert!(!out.status.success(), "B's API accepted A's token");

    // A bulk transfer over the link is counted with little overhead: an ingest from A's
    // namespace into B. What the replication tests bound by the counters rests on this.
    ts.b().create_source("over", "64M");
    let tx_before = ts.tx_bytes(Side::A);
    let out = ts.cli_across(Side::A, Side::B, &["ingest", "over", "--from", img.to_str().expect("utf-8")]);
    assert!(out.status.success(), "ingest across the link: {}", String::from_utf8_lossy(&out.stderr));
    let tx = ts.tx_bytes(Side::A) - tx_before;
    let shown = ts.b().show("over");
    let wire = shown["snapshots"][0]["ingest"]["wire_bytes"].as_u64().expect("wire_bytes");
    println!("ingest across the link: {wire} bytes on the wire, {tx} counted on A's end of the link");
    assert!(wire >= 24 * MIB && tx >= wire, "the link carried less ({tx}) than the ingest sent ({wire})");
    assert!(tx <= wire + wire / 20 + MIB, "the link counted {tx} bytes for an ingest of {wire}: too much overhead");
    assert_eq!(ts.b().snapshots("over"), ["over@1"], "B's ingested source");
    ts.b().dump("over@1", &dumped);
    forkd_tests::assert_same_image("over@1 dumped on B", &std::fs::read(&dumped).expect("read dump"), &data);

    // A cut link stops the same call (it fails or hangs until killed), both ways; a restored
    // one carries it again.
    ts.cut_link();
    let limit = Duration::from_secs(20);
    for (from, to) in [(Side::A, Side::B), (Side::B, Side::A)] {
        match ts.cli_across_within(from, to, &["list"], limit) {
            Ok(out) => assert!(!out.status.success(), "{from:?} reached {to:?} over a cut link"),
            Err(_) => println!("{from:?} -> {to:?} over the cut link hung until killed after {limit:?}"),
        }
    }
    // Each site still answers locally.
    ts.a().cli_ok(&["list"]);
    ts.b().cli_ok(&["list"]);
    ts.restore_link();
    let started = std::time::Instant::now();
    loop {
        let ok = ts
            .cli_across_within(Side::A, Side::B, &["list"], Duration::from_secs(10))
            .is_ok_and(|o| o.status.success());
        if ok {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the restored link does not carry A's call to B");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = ts.cli_across(Side::B, Side::A, &["list"]);
    assert!(out.status.success(), "B's call to A over the restored link: {}", String::from_utf8_lossy(&out.stderr));

    // A SIGKILL of A's daemon, a restart on the same address and port: A keeps its data.
    ts.kill9(Side::A);
    assert!(!ts.site_mut(Side::A).running(), "A's daemon still runs after a SIGKILL");
    let out = ts.a().cli_within(&["list"], Duration::from_secs(30)).expect("bounded");
    assert!(!out.status.success(), "A answered after a SIGKILL");
    ts.restart(Side::A);
    assert_eq!(ts.a().snapshots("db"), ["db@1"], "A's snapshots after a restart");
    ts.a().dump("db@1", &dumped);
    forkd_tests::assert_same_image("db@1 on A after a restart", &std::fs::read(&dumped).expect("read"), &data);

    // Dropping the sites removes the namespaces.
    drop(ts);
    let left: Vec<String> = namespaces().into_iter().filter(|n| names.contains(n)).collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

/// A source with five ingests and a tree of clones replicates snapshot by snapshot: each
/// arrives as the diff from one the target has (the link carries little more than the changed
/// bytes), dumps the same on both sites, keeps its number, time and bookmarks, and the
/// target holds no more than the source (holes stay holes).
#[test]
fn tree_replicates_thin_and_identical() {
    let _serial = serial();
    let ts = TwoSites::new("tree");
    let (a, b) = (ts.a(), ts.b());
    let mut rng = StdRng::seed_from_u64(11);
    let size = 128 * MIB;
    // Eight 5 MiB islands of data, 88 MiB of holes.
    let mut img = Image::new(ts.scratch().join("db.img"), size);
    let data_blocks: u64 = (0..8).map(|i| img.randomize(&mut rng, i * 16 * MIB, 5 * MIB)).sum();
    a.create_source("db", "128M");
    assert_eq!(a.ingest("db", img.save()), "db@1");

    // The first run sends db@1 whole, without its holes.
    let (r, tx) = replicate_measured(&ts, "db");
    check_sent(&r, tx, &[("db@1", None, data_blocks)]);

    // Four more ingests, each a few MiB at random offsets, each replicated as a diff.
    for k in 2..=5u64 {
        let changed = img.scatter(&mut rng, 16 + 16 * (k % 3), 64 << 10);
        let snap = a.ingest("db", img.save());
        assert_eq!(snap, format!("db@{k}"));
        let (r, tx) = replicate_measured(&ts, "db");
        check_sent(&r, tx, &[(&snap, Some(&format!("db@{}", k - 1)), changed)]);
    }

    // A clone of db@2, written through the HTTP data route and snapshotted with a bookmark.
    a.clone_volume("db@2", "dev");
    let dev = write_random(a, "dev", &mut rng, 12, 256 << 10, size);
    assert_eq!(a.cli_json(&["snapshot", "dev", "--bookmark", "reviewed"])["snapshot"], "dev@1");
    let (r, tx) = replicate_measured(&ts, "db");
    check_sent(&r, tx, &[("dev@1", Some("db@2"), dev)]);

    // A clone of that clone with two snapshots, and a clone of an older snapshot of db: one
    // run sends all three, oldest first.
    a.clone_volume("dev@1", "feat");
    let feat1 = write_random(a, "feat", &mut rng, 8, 256 << 10, size);
    assert_eq!(a.snapshot("feat"), "feat@1");
    let feat2 = write_random(a, "feat", &mut rng, 16, 64 << 10, size);
    assert_eq!(a.snapshot("feat"), "feat@2");
    a.clone_volume("db@4", "qa");
    let qa = write_random(a, "qa", &mut rng, 4, 256 << 10, size);
    assert_eq!(a.snapshot("qa"), "qa@1");
    let (r, tx) = replicate_measured(&ts, "db");
    check_sent(
        &r,
        tx,
        &[("feat@1", Some("dev@1"), feat1), ("feat@2", Some("feat@1"), feat2), ("qa@1", Some("db@4"), qa)],
    );

    // Nothing is left to send.
    let (r, tx) = replicate_measured(&ts, "db");
    check_sent(&r, tx, &[]);
    assert_eq!(num(&r, "payload_bytes"), 0, "a run with nothing to send sent data: {r:#}");

    // The source says where it replicates to, and that nothing is behind.
    let rep = a.show("db")["replication"].clone();
    assert_eq!(rep["to"].as_str(), Some(ts.url(Side::B).as_str()), "show db on A: {rep:#}");
    assert_eq!((rep["state"].as_str(), rep["lag_ms"].as_u64()), (Some("idle"), Some(0)), "show db on A: {rep:#}");
    assert!(rep["continuous_ms"].is_null() && rep["last_error"].is_null(), "show db on A: {rep:#}");

    // The target's volumes are replicas: read-only, saying where they come from.
    let shown = b.show("db");
    assert_eq!(shown["read_only"], true, "db on the target: {shown:#}");
    assert_eq!(shown["replica_of"]["volume"], "db", "db on the target: {shown:#}");
    assert!(shown["replica_of"]["receiving"].is_null(), "nothing is being received: {shown:#}");
    assert_eq!(shown["replica_of"]["latest"], "db@5", "the replica's newest snapshot: {shown:#}");
    assert!(shown["replica_of"]["lag_ms"].is_u64(), "the target's lag bound: {shown:#}");
    let w = b.http("PUT", "/v1/volumes/dev/data?offset=0", Some(&[7u8; 4096]));
    assert!(!w.ok(), "the target accepted a write to the replica dev: HTTP {}", w.status);
    // Hosts attach it read-only (a real NBD client, in B's namespace).
    let info =
        forkd_tests::run_bounded(b.in_ns("nbdinfo").arg("--json").arg(b.nbd_uri("dev")), Duration::from_secs(30));
    assert_success("nbdinfo of the replica dev", &info);
    let info: Value = serde_json::from_slice(&info.stdout).expect("nbdinfo's JSON");
    assert_eq!(info["exports"][0]["is_read_only"], true, "the replica dev over NBD: {info:#}");
    let err = b.cli_fails(&["ingest", "db", "--from", img.path.to_str().expect("utf-8")]);
    println!("ingest into the replica db: {}", err.trim());

    // Same snapshots (numbers, times, bookmarks), same data, same tree.
    for volume in ["db", "dev", "feat", "qa"] {
        let (on_a, on_b) = (snapshot_records(a, volume), snapshot_records(b, volume));
        assert_eq!(on_a, on_b, "{volume}'s snapshots (name, created_at, bookmarks) on A and on B");
        for snap in a.snapshots(volume) {
            ts.assert_same_on_both(&snap);
        }
    }
    let (tree_a, tree_b) = (a.tree(), b.tree());
    assert_eq!(tree_a, tree_b, "forkd tree differs:\n--- A ---\n{tree_a}--- B ---\n{tree_b}");

    // The target holds what the source holds: thin, and shared where the source shares.
    a.wait_for_garbage_collection();
    b.wait_for_garbage_collection();
    let (alloc_a, alloc_b) = (a.extents_allocated(), b.extents_allocated());
    println!("extent files: {alloc_a} bytes on A, {alloc_b} on B");
    assert!(
        alloc_a.abs_diff(alloc_b) <= alloc_a / 50,
        "the target's extent file takes {alloc_b} bytes, the source's {alloc_a}: more than 2 % apart"
    );

    // Failover of the source itself: promoted on B, fed by ingest there (only the change is
    // sent: the replica's digests serve the agent), replicated back: A's db follows B's.
    b.cli_ok(&["promote", "db"]);
    let changed = img.scatter(&mut rng, 8, 64 << 10);
    assert_eq!(b.ingest("db", img.save()), "db@6");
    let shown = b.show("db");
    let last = shown["snapshots"].as_array().and_then(|s| s.last()).expect("db's snapshots on B");
    assert_eq!(num(&last["ingest"], "sent_bytes"), changed * BS, "the ingest on B sent the change only: {last:#}");
    let r = replicate(&ts, Side::B, "db", &[]);
    assert_eq!(sent(&r), [("db@6".to_string(), Some("db@5".to_string()))], "back to A: {r:#}");
    assert_eq!(num(&r, "payload_bytes"), changed * BS, "back to A, only the change: {r:#}");
    assert_eq!(a.show("db")["read_only"], true, "A's db follows B now");
    ts.assert_same_on_both("db@6");
}

/// How a run is interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interruption {
    CutLink,
    KillTarget,
    KillSource,
}

/// Wait (bounded) until A's end of the link has sent `at_least` bytes, panicking with the
/// run's output if it ends first.
fn wait_for_tx(ts: &TwoSites, at_least: u64, mut run: Background) -> Background {
    let started = Instant::now();
    while ts.tx_bytes(Side::A) < at_least {
        if run.try_wait().is_some() {
            let out = run.wait_bounded(Duration::from_secs(10));
            panic!(
                "the replicate run ended ({}) before {at_least} bytes crossed the link\nstdout: {}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{at_least} bytes did not cross the link in 2 min");
        std::thread::sleep(Duration::from_millis(5));
    }
    run
}

/// Replicate `big` (whose newest snapshot `snapshot`, the target lacks, differs from `base`
/// in the `changed` blocks from block `first_block` on), interrupt the run `how` at a random
/// point, check it fails and says why, undo the interruption and run again: the second run
/// resumes, the snapshot is the same on both sites, and at most 4 MiB were sent twice.
fn interrupted_run(
    ts: &mut TwoSites,
    rng: &mut StdRng,
    (snapshot, base): (&str, Option<&str>),
    (first_block, changed): (u64, u64),
    how: Interruption,
) {
    let tx0 = ts.tx_bytes(Side::A);
    let args = replicate_args(ts, Side::A, "big", &["--stall-timeout", "2s", "--json"]);
    let run = ts.a().cli_background(&format!("replicate-{how:?}"), &strs(&args));
    let at = changed * BS * rng.gen_range(20..60u64) / 100;
    let run = wait_for_tx(ts, tx0 + at, run);
    // What the target had written just before it is killed: it may lose what it received after
    // its last flush (at most 2 MiB) and the frame under way, nothing more.
    let mut before_kill = 0;
    match how {
        Interruption::CutLink => ts.cut_link(),
        Interruption::KillTarget => {
            before_kill = ts.b().show("big")["replica_of"]["receiving"]["next_block"].as_u64().unwrap_or(0);
            ts.kill9(Side::B);
        }
        Interruption::KillSource => ts.kill9(Side::A),
    }
    let out = run.wait_bounded(Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{how:?}: the interrupted run succeeded: {}", String::from_utf8_lossy(&out.stdout));
    assert!(!stderr.trim().is_empty(), "{how:?}: the failed run does not say why");
    println!("{how:?} after {at} bytes: the run failed with: {}", stderr.trim());
    let first_payload = serde_json::from_slice::<Value>(&out.stdout).ok().and_then(|v| v["payload_bytes"].as_u64());
    let mut kept = 0;
    match how {
        Interruption::CutLink => {
            let receiving = ts.b().show("big")["replica_of"]["receiving"].clone();
            kept = receiving["next_block"].as_u64().unwrap_or(0);
            assert_eq!(receiving["snapshot"], snapshot, "{how:?}: the target's partial snapshot: {receiving}");
            assert!(
                receiving["next_block"].as_u64().is_some_and(|n| n > 0),
                "{how:?}: the target kept nothing of what arrived: {receiving}"
            );
            ts.restore_link();
        }
        Interruption::KillTarget => ts.restart(Side::B),
        Interruption::KillSource => ts.restart(Side::A),
    }
    let r = replicate(ts, Side::A, "big", &["--stall-timeout", "2s"]);
    let tx = ts.tx_bytes(Side::A) - tx0;
    let expected = vec![(snapshot.to_string(), base.map(str::to_string))];
    assert_eq!(sent(&r), expected, "{how:?}: the second run: {r:#}");
    let e = entry(&r, snapshot);
    let resumed = num(e, "resumed_from_block");
    assert!(resumed > 0, "{how:?}: the second run started {snapshot} over: {r:#}");
    match how {
        // The target stayed up: it resumes exactly where it was.
        Interruption::CutLink => assert_eq!(resumed, kept, "{how:?}: the target had {kept} blocks"),
        Interruption::KillTarget => assert!(
            resumed + 1024 >= before_kill,
            "{how:?}: the target had written up to block {before_kill} and resumed at {resumed}: more than 4 MiB lost"
        ),
        Interruption::KillSource => {}
    }
    let second = payload_total(&r);
    let changed_bytes = changed * BS;
    println!("{how:?}: the target had {kept} (cut) / {before_kill} (before a kill) blocks written");
    println!("{how:?}: resumed at block {resumed}; payload {first_payload:?} + {second}, {tx} bytes over the link, {changed_bytes} changed");
    if let Some(first) = first_payload {
        assert!(
            first + second <= changed_bytes + 4 * MIB,
            "{how:?}: {first} + {second} payload bytes for {changed_bytes} changed: more than 4 MiB sent again"
        );
    }
    // The changed blocks from the one it resumed at on (a block of the volume).
    let left = (first_block + changed).saturating_sub(resumed.max(first_block));
    assert!(
        second <= left * BS + 4 * MIB,
        "{how:?}: the second run sent {second} bytes after resuming at block {resumed}, {left} changed blocks from there"
    );
    // Frame heads, crc32s and TCP/IP headers (0.4 % in the uninterrupted runs), what was sent
    // twice (at most 4 MiB) and what TCP had in flight when the run broke.
    let limit = changed_bytes + changed_bytes / 100 + 5 * MIB;
    assert!(
        tx <= limit,
        "{how:?}: {tx} bytes crossed the link over both runs for {changed_bytes} changed (limit {limit})"
    );
    ts.assert_same_on_both(snapshot);
    let shown = ts.b().show("big");
    assert!(shown["replica_of"]["receiving"].is_null(), "{how:?}: still receiving after the second run: {shown:#}");
}

/// A run interrupted by a cut link, by a SIGKILL of the target and by a SIGKILL of the source
/// resumes where it stopped.
#[test]
fn resume_after_cut_link_and_kills() {
    let _serial = serial();
    let mut ts = TwoSites::new("resume");
    let mut rng = StdRng::seed_from_u64(22);
    let mut img = Image::new(ts.scratch().join("big.img"), 256 * MIB);
    let first = img.randomize(&mut rng, 0, 192 * MIB);
    ts.a().create_source("big", "256M");
    assert_eq!(ts.a().ingest("big", img.save()), "big@1");
    // A paced link (about 4 s for 192 MiB), so that there is a "while it runs".
    ts.limit_rate(Side::A, Some(400));
    interrupted_run(&mut ts, &mut rng, ("big@1", None), (0, first), Interruption::CutLink);

    let second = img.randomize(&mut rng, 64 * MIB, 128 * MIB);
    assert_eq!(ts.a().ingest("big", img.save()), "big@2");
    interrupted_run(&mut ts, &mut rng, ("big@2", Some("big@1")), (64 * MIB / BS, second), Interruption::KillTarget);

    let third = img.randomize(&mut rng, 32 * MIB, 128 * MIB);
    assert_eq!(ts.a().ingest("big", img.save()), "big@3");
    interrupted_run(&mut ts, &mut rng, ("big@3", Some("big@2")), (32 * MIB / BS, third), Interruption::KillSource);

    for snap in ["big@1", "big@2", "big@3"] {
        ts.assert_same_on_both(snap);
    }
}

/// `--continuous 2s` follows a clone written a thousand times a second with a lag under 10 s;
/// after `--stop` and `promote` on the target, the target is written, and replicating back
/// sends only what changed there.
#[test]
fn continuous_follows_a_writer_and_fails_over() {
    let _serial = serial();
    let ts = TwoSites::new("continuous");
    let (a, b) = (ts.a(), ts.b());
    let mut rng = StdRng::seed_from_u64(33);
    let size = 128 * MIB;
    let mut img = Image::new(ts.scratch().join("db.img"), size);
    img.randomize(&mut rng, 0, 32 * MIB);
    a.create_source("db", "128M");
    a.ingest("db", img.save());
    a.clone_volume("db@1", "app");
    replicate(&ts, Side::A, "db", &[]);

    let writer = a.start_writer("app", 1000, 20, 32 * MIB / BS, 7);
    let args = replicate_args(&ts, Side::A, "app", &["--continuous", "2s"]);
    let started = Instant::now();
    a.cli_ok(&strs(&args));
    println!("replicate --continuous returned after {:?}", started.elapsed());

    // While the writer writes: the lag every 500 ms, the replica's snapshots every 2 s.
    let mut writer = writer;
    let (mut max_lag, mut polls, mut seen) = (0u64, 0u64, BTreeSet::new());
    while writer.try_wait().is_none() {
        assert!(started.elapsed() < Duration::from_secs(120), "the writer did not finish");
        let rep = a.show("app")["replication"].clone();
        assert_ne!(rep["state"], "failed", "continuous replication failed: {rep:#}");
        assert_eq!(rep["continuous_ms"], 2000, "show's replication: {rep:#}");
        // Unknown (null) only until the first run has asked the target what it holds.
        if rep["lag_ms"].is_null() {
            assert!(rep["last_run_at"].is_null(), "the lag is unknown after a run: {rep:#}");
        } else {
            max_lag = max_lag.max(num(&rep, "lag_ms"));
        }
        if polls % 4 == 0 && b.cli(&["show", "app"]).status.success() {
            seen.insert(b.snapshots("app").len());
        }
        polls += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = writer.wait_bounded(Duration::from_secs(10));
    assert_success("the writer", &out);
    let w: Value = serde_json::from_slice(&out.stdout).expect("the writer's report");
    println!("writer: {w}; max lag {max_lag} ms over {polls} polls; the replica had {seen:?} snapshots of app");
    assert!(num(&w, "writes") > 0, "the writer wrote nothing: {w}");
    assert!(max_lag < 10_000, "the lag reached {max_lag} ms (bound 10 s)");
    assert!(seen.len() >= 3, "the replica did not advance while the writer wrote: it had {seen:?} snapshots of app");

    // Once the writer stopped, the replica catches up: lag 0, the last snapshot sent.
    let caught_up = Instant::now();
    let rep = loop {
        let rep = a.show("app")["replication"].clone();
        assert_ne!(rep["state"], "failed", "continuous replication failed: {rep:#}");
        if rep["lag_ms"] == 0 && rep["state"] == "idle" {
            break rep;
        }
        assert!(caught_up.elapsed() < Duration::from_secs(60), "the replica did not catch up in a minute: {rep:#}");
        std::thread::sleep(Duration::from_millis(500));
    };
    a.cli_ok(&["replicate", "app", "--stop"]);
    let last = a.latest_snapshot("app").expect("app has snapshots");
    assert_eq!(rep["last_sent"], last.as_str(), "the last snapshot sent: {rep:#}");
    assert_eq!(rep["to"].as_str(), Some(ts.url(Side::B).as_str()), "{rep:#}");
    let stopped = a.show("app")["replication"].clone();
    assert!(stopped["continuous_ms"].is_null(), "--stop left continuous replication on: {stopped:#}");
    assert_eq!(b.latest_snapshot("app").as_deref(), Some(last.as_str()), "the replica's newest snapshot");
    ts.assert_same_on_both(&last);

    // Fail over: B's app becomes writable, is written and snapshotted; replicating back to A
    // sends only that snapshot, as the diff from the last one both have.
    let err = b.http("PUT", "/v1/volumes/app/data?offset=0", Some(&[1u8; 4096]));
    assert!(!err.ok(), "the replica accepted a write before promote");
    b.cli_ok(&["promote", "app"]);
    let shown = b.show("app");
    assert_ne!(shown["read_only"], true, "app after promote: {shown:#}");
    let mut changed = write_random(b, "app", &mut rng, 1, MIB, 32 * MIB);
    for off in distinct(&mut rng, 8, 32 * MIB / BS) {
        let mut block = vec![0u8; us(BS)];
        rng.fill(&mut block[..]);
        b.write("app", 64 * MIB + off * BS, &block);
        changed += 1;
    }
    let snap = b.snapshot("app");
    let before = ts.tx_bytes(Side::B);
    let r = replicate(&ts, Side::B, "app", &[]);
    let tx = ts.tx_bytes(Side::B) - before;
    assert_eq!(sent(&r), vec![(snap.clone(), Some(last.clone()))], "replicating back: {r:#}");
    let payload = payload_total(&r);
    println!("replicating back: {payload} payload bytes, {tx} over the link, {} changed", changed * BS);
    assert!(payload <= changed * BS + MIB, "replicating back sent {payload} bytes for {} changed", changed * BS);
    ts.assert_same_on_both(&snap);
}

/// The mask hook (`forkd_tests::MASK_EMAILS`).
const MASKER: &str = forkd_tests::MASK_EMAILS;

const ADDRESSES: &[u8] = b"alice@example.com,bob.smith@corp.example.org;carol+x@mail.test";
const LATER: &[u8] = b"dave@secret.example,erin@secret.example";
const EARLY: &[u8] = b"early-clone-unmasked-marker-4f1c";

/// With `clone_from=masked` on the source, replicating it sends only masked snapshots: none
/// of the source's, none of a clone made of it before the policy, and not one byte of the
/// unmasked addresses reaches the target's extent file (where the source's holds them).
#[test]
fn masked_only_policy_never_sends_unmasked() {
    let _serial = serial();
    let ts = TwoSites::with_hooks("masked", &[("masker", MASKER)]);
    let (a, b) = (ts.a(), ts.b());
    let mut rng = StdRng::seed_from_u64(44);
    let mut img = Image::new(ts.scratch().join("prod.img"), 64 * MIB);
    img.randomize(&mut rng, 2 * MIB, 6 * MIB);
    img.put(0, ADDRESSES);
    img.put(MIB, ADDRESSES);
    a.create_source("prod", "64M");
    assert_eq!(a.ingest("prod", img.save()), "prod@1");
    a.clone_volume("prod@1", "early");
    a.write("early", 16 * MIB, EARLY);
    assert_eq!(a.snapshot("early"), "early@1");

    a.cli_ok(&["policy", "set", "prod", "clone_from=masked"]);
    let m = a.cli_json(&["mask", "prod@1", "--with", "masker", "--into", "prod-masked"]);
    assert_eq!(m["snapshot"], "prod-masked@1", "{m}");
    assert_eq!(a.read("prod-masked@1", 0, 5), b"xxxxx", "the masker masked prod@1");
    img.put(512, LATER);
    assert_eq!(a.ingest("prod", img.save()), "prod@2");
    let m = a.cli_json(&["mask", "prod@2", "--with", "masker", "--into", "prod-masked"]);
    assert_eq!(m["snapshot"], "prod-masked@2", "{m}");
    let secrets: [&[u8]; 4] = [b"alice@example.com", b"bob.smith@corp.example.org", b"dave@secret.example", EARLY];
    let extents_a = a.data_dir().join("extents.0");
    for s in secrets {
        assert!(file_contains(&extents_a, s), "the source's extent file lacks {}", String::from_utf8_lossy(s));
    }

    let r = replicate(&ts, Side::A, "prod", &[]);
    let names: Vec<String> = sent(&r).into_iter().map(|(s, _)| s).collect();
    assert!(
        !names.iter().any(|n| n.starts_with("prod@") || n.starts_with("early@")),
        "unmasked snapshots were sent: {r:#}"
    );
    let masked: Vec<&String> = names.iter().filter(|n| n.starts_with("prod-masked@")).collect();
    assert_eq!(masked, ["prod-masked@1", "prod-masked@2"], "the masked snapshots, oldest first: {r:#}");
    // Asking for the clone of unmasked data directly sends nothing either.
    let args = replicate_args(&ts, Side::A, "early", &["--json"]);
    let out = a.cli(&strs(&args));
    if out.status.success() {
        let r: Value = serde_json::from_slice(&out.stdout).expect("replicate early --json");
        assert_eq!(sent(&r), vec![], "replicating the unmasked clone sent snapshots: {r:#}");
    }

    for volume in ["prod", "early"] {
        let out = b.cli(&["show", volume, "--json"]);
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).expect("show --json");
            let n = v["snapshots"].as_array().map_or(0, Vec::len);
            assert_eq!(n, 0, "the target has snapshots of {volume}: {v:#}");
        }
    }
    for snap in ["prod-masked@1", "prod-masked@2"] {
        ts.assert_same_on_both(snap);
    }
    let shown = b.show("prod-masked");
    let flags: Vec<&Value> =
        shown["snapshots"].as_array().map(|l| l.iter().map(|s| &s["masked"]).collect()).unwrap_or_default();
    assert_eq!(flags, [&Value::Bool(true), &Value::Bool(true)], "the target's masked snapshots: {shown:#}");
    let extents_b = b.data_dir().join("extents.0");
    for s in secrets {
        assert!(!file_contains(&extents_b, s), "the target's extent file holds {}", String::from_utf8_lossy(s));
    }
}

/// A target whose disk fills up mid-transfer stops the run with a clear error and keeps what
/// arrived; once space is back, the next run resumes there and the snapshot arrives whole.
#[test]
fn a_full_target_disk_keeps_what_arrived() {
    let _serial = serial();
    // Declared before the sites, so it is unmounted after B's daemon is gone.
    let fs_root = tempfile::tempdir().expect("tempdir");
    let fs = forkd_tests::LoopFs::mount(fs_root.path(), 256);
    let mut ts = TwoSites::new("fulldisk");
    // B's data directory on the small filesystem, fresh.
    ts.kill9(Side::B);
    let data = ts.b().data_dir();
    std::fs::remove_dir_all(&data).expect("remove B's data dir");
    std::fs::create_dir(fs.mnt.join("data")).expect("data dir on the small filesystem");
    std::os::unix::fs::symlink(fs.mnt.join("data"), &data).expect("link B's data dir");
    ts.restart(Side::B);
    // B is already busy with 112 MiB of its own: 160 MiB more do not fit.
    let mut rng = StdRng::seed_from_u64(41);
    let mut filler = Image::new(ts.scratch().join("filler.img"), 112 * MIB);
    filler.randomize(&mut rng, 0, 112 * MIB);
    ts.b().create_source("filler", "112M");
    assert_eq!(ts.b().ingest("filler", filler.save()), "filler@1");
    let mut img = Image::new(ts.scratch().join("big.img"), 160 * MIB);
    let changed = img.randomize(&mut rng, 0, 160 * MIB);
    ts.a().create_source("big", "160M");
    assert_eq!(ts.a().ingest("big", img.save()), "big@1");

    let args = replicate_args(&ts, Side::A, "big", &["--json"]);
    let out = ts.a().cli_within(&strs(&args), Duration::from_secs(300)).unwrap_or_else(|o| o);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "160 MiB fit beside 112 MiB on a 256 MiB filesystem");
    assert!(stderr.contains("No space left on device"), "the failed run says why: {stderr}");
    let kept = ts.b().show("big")["replica_of"]["receiving"]["next_block"].as_u64().unwrap_or(0);
    assert!(kept > 0, "the target kept nothing of what arrived: {:#}", ts.b().show("big"));
    println!("full disk: the run failed after {kept} blocks with: {}", stderr.trim());

    // Space comes back: the filler goes. The next run resumes and completes.
    ts.b().cli_ok(&["delete", "filler"]);
    ts.b().wait_for_garbage_collection();
    let r = replicate(&ts, Side::A, "big", &[]);
    let e = entry(&r, "big@1");
    let resumed = num(e, "resumed_from_block");
    println!("full disk: resumed at block {resumed} of {}", changed);
    assert!(resumed > 0 && resumed + 1024 >= kept, "resumed at {resumed}, the target had kept {kept}: {r:#}");
    ts.assert_same_on_both("big@1");
    let log = ts.b().log();
    for bad in ["final flush failed", "periodic flush failed", "metadata store"] {
        assert!(!log.contains(bad), "B's log shows `{bad}`");
    }
}
