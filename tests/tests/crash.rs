//! Crash test: a writer hammers a clone with random writes (aligned and unaligned), flushes
//! and snapshots while the daemon is killed with SIGKILL at a random moment, ~30 times.
//!
//! After every restart, each 4 KiB block of the clone must hold either its content at the last
//! acknowledged flush (or snapshot, which makes everything durable) or a content some write
//! issued after that flush gave it (including the write in flight at the kill). Every
//! snapshot whose creation was acknowledged must exist with exactly the content the volume had
//! when it was taken; a snapshot in flight at the kill may exist, and then with that content
//! too. The recovered state is the baseline of the next cycle.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use forkd_tests::{enc, Api, Daemon, BS};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::json;
use xxhash_rust::xxh3::xxh3_64;

const VOL: usize = 16 << 20;
const NBLOCKS: usize = VOL / BS;
const CYCLES: usize = 30;
const TOTAL_TIME: Duration = Duration::from_secs(240);
/// Bounds on one writer run, in case the kill never lands.
const WRITER_MAX_OPS: usize = 100_000;
const WRITER_MAX_TIME: Duration = Duration::from_secs(20);

fn block_hashes(img: &[u8]) -> Vec<u64> {
    img.chunks(BS).map(xxh3_64).collect()
}

/// What a block may hold after the crash, and where each candidate came from.
#[derive(Debug, Clone)]
struct Candidate {
    hash: u64,
    /// Operation number of the write that produced it.
    op: usize,
}

/// The writer's knowledge of the clone.
#[derive(Debug)]
struct Model {
    /// Contents with every acknowledged write applied (what the daemon serves now).
    cur: Vec<u8>,
    /// Hash of every block at the last acknowledged flush or snapshot.
    flushed: Vec<u64>,
    /// Operation number of that flush or snapshot (0: the start of the cycle).
    flushed_op: usize,
    /// Contents given to blocks by writes issued after the last acknowledged flush.
    since: HashMap<usize, Vec<Candidate>>,
    /// Every content given to blocks this cycle (for diagnostics).
    history: HashMap<usize, Vec<Candidate>>,
    /// Acknowledged snapshots: name -> block hashes.
    snapshots: BTreeMap<String, Vec<u64>>,
    /// Snapshots acknowledged in the current cycle.
    new_snapshots: Vec<String>,
    /// A snapshot request in flight at the kill: the block hashes it must have if it exists.
    pending_snapshot: Option<Vec<u64>>,
    /// Statistics of the cycle.
    stats: Stats,
}

#[derive(Debug, Default, Clone)]
struct Stats {
    writes: usize,
    unaligned: usize,
    bytes: usize,
    flushes: usize,
    snapshots: usize,
    in_flight: &'static str,
    /// An HTTP error answer (not a dropped connection): a daemon bug.
    error: Option<String>,
}

impl Model {
    fn new(content: Vec<u8>, snapshots: BTreeMap<String, Vec<u64>>) -> Model {
        Model {
            flushed: block_hashes(&content),
            cur: content,
            flushed_op: 0,
            since: HashMap::new(),
            history: HashMap::new(),
            snapshots,
            new_snapshots: Vec::new(),
            pending_snapshot: None,
            stats: Stats::default(),
        }
    }

    fn durable_now(&mut self, op: usize) {
        self.flushed = block_hashes(&self.cur);
        self.flushed_op = op;
        self.since.clear();
    }
}

/// One writer run: random operations until the daemon goes away. Returns the model.
fn writer(api: Api, mut m: Model, seed: u64) -> Model {
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    for op in 1..=WRITER_MAX_OPS {
        if started.elapsed() > WRITER_MAX_TIME {
            m.stats.error = Some(format!("the writer ran {WRITER_MAX_TIME:?} without the daemon being killed"));
            break;
        }
        let r: f64 = rng.gen();
        if r < 0.02 {
            m.pending_snapshot = Some(block_hashes(&m.cur));
            m.stats.in_flight = "snapshot";
            match api.request("POST", "/v1/volumes/c/snapshots", Some(("application/json", b"{}"))) {
                Err(_) => return m,
                Ok(resp) if resp.status == 201 => {
                    let name = resp.json()["snapshot"].as_str().map(str::to_string);
                    let Some(name) = name else {
                        m.stats.error = Some(format!("snapshot answer without a name: {}", resp.text()));
                        return m;
                    };
                    let hashes = m.pending_snapshot.take().expect("pending");
                    if m.snapshots.insert(name.clone(), hashes).is_some() {
                        m.stats.error = Some(format!("snapshot name {name} acknowledged twice"));
                        return m;
                    }
                    m.new_snapshots.push(name);
                    m.stats.snapshots += 1;
                    m.durable_now(op);
                }
                Ok(resp) => {
                    m.stats.error = Some(format!("POST snapshot: HTTP {} {}", resp.status, resp.text()));
                    return m;
                }
            }
        } else if r < 0.12 {
            m.stats.in_flight = "flush";
            match api.request("POST", "/v1/volumes/c/flush", None) {
                Err(_) => return m,
                Ok(resp) if resp.ok() => {
                    m.stats.flushes += 1;
                    m.durable_now(op);
                }
                Ok(resp) => {
                    m.stats.error = Some(format!("POST flush: HTTP {} {}", resp.status, resp.text()));
                    return m;
                }
            }
        } else {
            let unaligned = rng.gen_bool(0.2);
            let (offset, len) = if unaligned {
                let len = rng.gen_range(1..=256 << 10);
                (rng.gen_range(0..=VOL - len), len)
            } else {
                let n = rng.gen_range(1..=64usize);
                let first = rng.gen_range(0..=NBLOCKS - n);
                (first * BS, n * BS)
            };
            let mut data = vec![0u8; len];
            rng.fill_bytes(&mut data);
            // The contents this write gives each block it touches, merged with the current
            // contents at the edges (the daemon applies writes one at a time).
            let first = offset / BS;
            let last = (offset + len - 1) / BS;
            for b in first..=last {
                let mut block = m.cur[b * BS..(b + 1) * BS].to_vec();
                let lo = offset.max(b * BS);
                let hi = (offset + len).min((b + 1) * BS);
                block[lo - b * BS..hi - b * BS].copy_from_slice(&data[lo - offset..hi - offset]);
                let c = Candidate { hash: xxh3_64(&block), op };
                m.since.entry(b).or_default().push(c.clone());
                m.history.entry(b).or_default().push(c);
            }
            m.stats.in_flight = if unaligned { "unaligned write" } else { "write" };
            let path = format!("/v1/volumes/c/data?offset={offset}");
            match api.request("PUT", &path, Some(("application/octet-stream", &data))) {
                Err(_) => return m,
                Ok(resp) if resp.ok() => {
                    m.cur[offset..offset + len].copy_from_slice(&data);
                    m.stats.writes += 1;
                    m.stats.bytes += len;
                    if unaligned {
                        m.stats.unaligned += 1;
                    }
                }
                Ok(resp) => {
                    m.stats.error = Some(format!("PUT {path} ({len} bytes): HTTP {} {}", resp.status, resp.text()));
                    return m;
                }
            }
        }
        m.stats.in_flight = "nothing";
    }
    m
}

/// Compare a snapshot read from the daemon with its recorded block hashes.
fn check_snapshot(api: &Api, name: &str, want: &[u64]) -> Result<(), String> {
    let got = block_hashes(&api.read(name, 0, VOL as u64));
    let bad: Vec<usize> = (0..NBLOCKS).filter(|&b| got[b] != want[b]).collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "snapshot {name}: {} blocks differ from its content when it was taken (first: block {})",
            bad.len(),
            bad[0]
        ))
    }
}

/// Check the recovered clone against the model. Returns (blocks holding post-flush data).
fn check_volume(m: &Model, got: &[u64]) -> Result<usize, String> {
    let mut newer = 0;
    let mut problems = Vec::new();
    for (b, &hash) in got.iter().enumerate() {
        if hash == m.flushed[b] {
            continue;
        }
        if m.since.get(&b).is_some_and(|cs| cs.iter().any(|c| c.hash == hash)) {
            newer += 1;
            continue;
        }
        let known = m.history.get(&b).and_then(|cs| cs.iter().find(|c| c.hash == hash));
        let what = match known {
            Some(c) => format!(
                "the content of write #{} issued before the last acknowledged flush/snapshot (#{}) that later writes replaced",
                c.op, m.flushed_op
            ),
            None if hash == xxh3_64(&[0u8; BS]) => "zeros".to_string(),
            None => "a content no write gave it".to_string(),
        };
        problems.push(format!(
            "block {b} (offset {}) holds {what}; {} contents written since the flush were acceptable",
            b * BS,
            m.since.get(&b).map_or(0, Vec::len)
        ));
    }
    if problems.is_empty() {
        Ok(newer)
    } else {
        let n = problems.len();
        problems.truncate(10);
        Err(format!("{n} blocks of c hold unacceptable data after the crash:\n  {}", problems.join("\n  ")))
    }
}

#[test]
fn crash_test() {
    let seed: u64 =
        std::env::var("FORKD_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::thread_rng().gen());
    println!("seed {seed} (set FORKD_TEST_SEED to repeat)");
    let mut rng = StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut d = Daemon::start(&tmp.path().join("data"), &tmp.path().join("daemon.log"));
    d.api().post_json_ok("/v1/sources", &json!({"name": "s", "size": "16M"}));
    let clone = d.api().post_json_ok("/v1/clones", &json!({"from": "s", "name": "c"}));
    assert_eq!(clone["size_bytes"], VOL as u64, "{clone}");

    let started = Instant::now();
    let mut model = Model::new(vec![0u8; VOL], BTreeMap::new());
    let mut cycles = 0;
    let mut totals = Stats::default();
    while cycles < CYCLES && started.elapsed() < TOTAL_TIME {
        cycles += 1;
        let api = d.api().clone();
        let wseed = rng.gen();
        let writer = std::thread::spawn(move || writer(api, model, wseed));
        let delay = rng.gen_range(50..=800u64);
        std::thread::sleep(Duration::from_millis(delay));
        d.kill9();
        let m = writer.join().expect("writer thread panicked");
        let s = m.stats.clone();
        if let Some(e) = &s.error {
            panic!("cycle {cycles}: {e}");
        }
        d.restart();

        // Snapshots: every acknowledged one exists with its content; at most the one in
        // flight is new.
        let vol = d.api().get_json("/v1/volumes/c");
        let present: Vec<String> = vol["snapshots"]
            .as_array()
            .unwrap_or_else(|| panic!("no snapshots array: {vol}"))
            .iter()
            .map(|s| s["name"].as_str().expect("snapshot name").to_string())
            .collect();
        let mut snapshots = m.snapshots.clone();
        for name in snapshots.keys() {
            assert!(
                present.contains(name),
                "cycle {cycles}: acknowledged snapshot {name} is gone after the crash (present: {present:?})"
            );
        }
        let unknown: Vec<&String> = present.iter().filter(|n| !snapshots.contains_key(*n)).collect();
        match (&unknown[..], &m.pending_snapshot) {
            ([], _) => {}
            ([name], Some(want)) => {
                check_snapshot(d.api(), name, want)
                    .unwrap_or_else(|e| panic!("cycle {cycles}: the snapshot in flight at the kill: {e}"));
                snapshots.insert((*name).clone(), want.clone());
            }
            (names, _) => panic!(
                "cycle {cycles}: unexpected snapshots after the crash: {names:?} (in flight: {})",
                m.pending_snapshot.is_some()
            ),
        }
        let mut to_check: Vec<&String> = m.new_snapshots.iter().collect();
        let older: Vec<&String> = snapshots.keys().filter(|n| !m.new_snapshots.contains(n)).collect();
        for _ in 0..3.min(older.len()) {
            to_check.push(older[rng.gen_range(0..older.len())]);
        }
        for name in to_check {
            check_snapshot(d.api(), name, &snapshots[name]).unwrap_or_else(|e| panic!("cycle {cycles}: {e}"));
        }

        // The volume: flushed content or content written since.
        let content = d.api().read("c", 0, VOL as u64);
        let got = block_hashes(&content);
        let newer = check_volume(&m, &got).unwrap_or_else(|e| {
            panic!(
                "cycle {cycles} (killed {delay} ms in, {} in flight, {} writes / {} flushes / {} snapshots acknowledged): {e}",
                s.in_flight, s.writes, s.flushes, s.snapshots
            )
        });
        let ext = d.api().get_json(&format!("/v1/volumes/{}/extents", enc("s")));
        assert_eq!(ext["extents"], json!([]), "cycle {cycles}: the source s gained data: {ext}");

        println!(
            "cycle {cycles:2}: killed after {delay:3} ms with {:15} in flight; acknowledged {:4} writes ({:4} unaligned, {:6} KiB), {:3} flushes, {} snapshots; {newer} blocks kept post-flush data",
            s.in_flight,
            s.writes,
            s.unaligned,
            s.bytes >> 10,
            s.flushes,
            s.snapshots
        );
        totals.writes += s.writes;
        totals.flushes += s.flushes;
        totals.snapshots += s.snapshots;
        model = Model::new(content, snapshots);
    }
    println!(
        "{cycles} cycles in {:.1}s: {} writes, {} flushes, {} snapshots acknowledged",
        started.elapsed().as_secs_f64(),
        totals.writes,
        totals.flushes,
        totals.snapshots
    );
    assert!(totals.writes > 0, "no write was ever acknowledged");
    let st = d.stop();
    assert!(st.success(), "forkd serve exited with {st} after SIGTERM");
}
