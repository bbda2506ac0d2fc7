//! Power-cut tests (issue 10): a real `forkd serve` whose data directory is on the
//! `forkd-powercut` filesystem, which forgets at a simulated cut every write that was not made
//! durable by `fsync`/`fdatasync` (and every create or rename whose directory was not fsynced).
//! After the cut the daemon is killed, and a new one starts on what survived: everything
//! acknowledged as flushed must be there, byte for byte.
//!
//! FUSE is required: without `/dev/fuse` (or root) these tests fail, saying so.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use forkd_powercut::{fuse_available, Directories, PowerCutFs};
use forkd_tests::{assert_same_image, enc, run_bounded, Api, Daemon, Http, BS};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::json;
use xxhash_rust::xxh3::xxh3_64;

/// A data directory on a power-cut filesystem, with the daemon log beside it (off the mount).
/// Fields drop in order: the filesystem is unmounted before its directory is removed.
struct Rig {
    fs: PowerCutFs,
    root: tempfile::TempDir,
}

impl Rig {
    fn new() -> Rig {
        Rig::with(Directories::Strict)
    }

    fn with(directories: Directories) -> Rig {
        if let Err(why) = fuse_available() {
            panic!("FUSE is required for the power-cut tests: {why}");
        }
        let root = tempfile::tempdir().expect("tempdir");
        let mnt = root.path().join("mnt");
        fs::create_dir(&mnt).expect("mkdir");
        let fs = PowerCutFs::mount_with(&mnt, None, directories).expect("mount the power-cut filesystem");
        // The data directory exists, durably, before the daemon starts (as one made at
        // installation would): what the daemon creates in it is the daemon's to make durable.
        fs::create_dir(mnt.join("data")).expect("mkdir data");
        fs::File::open(&mnt).and_then(|d| d.sync_all()).expect("fsync the mount's root");
        Rig { fs, root }
    }

    fn data_dir(&self) -> PathBuf {
        self.fs.mountpoint().join("data")
    }

    fn log(&self) -> PathBuf {
        self.root.path().join("daemon.log")
    }

    /// Cut the power under `daemon`, kill it, and return the directory holding what survived
    /// (the data directory is `survivors/data`) and what the daemon had fsynced (a report).
    fn cut(&mut self, daemon: &mut Daemon) -> (PathBuf, String) {
        self.fs.cut();
        let report: Vec<String> = self.fs.sync_report().iter().map(ToString::to_string).collect();
        daemon.kill9();
        self.fs.unmount().expect("unmount");
        let out = self.root.path().join("survivors");
        fs::create_dir(&out).expect("mkdir");
        self.fs.write_survivors(&out).expect("write the survivors");
        (out, report.join("\n"))
    }
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Start a daemon on `data` and create source `s` (4 MiB) and its clone `c`.
fn daemon_with_clone(data: &Path, log: &Path) -> Daemon {
    let d = Daemon::start(data, log);
    d.api().post_json_ok("/v1/sources", &json!({"name": "s", "size": "4M"}));
    d.api().post_json_ok("/v1/clones", &json!({"from": "s", "name": "c"}));
    d
}

/// forkd runs on the harness: it starts, writes, flushes, reads back and restarts cleanly on
/// the mount (io_uring, sled, `fallocate` of the reserve and punched extents all work there).
#[test]
fn forkd_serves_from_the_power_cut_filesystem() {
    let rig = Rig::new();
    let mut d = daemon_with_clone(&rig.data_dir(), &rig.log());
    let data = random(256 << 10, 1);
    d.api().write("c", 1 << 20, &data);
    d.api().write("c", 1 << 20, &data[..64 << 10]); // an overwrite frees slots, punched at the flush
    d.api().post_json_ok("/v1/volumes/c/flush", &json!({}));
    assert_same_image("read back on the mount", &d.api().read("c", 1 << 20, 256 << 10), &data);
    d.stop();
    d.restart();
    assert_same_image("after a clean restart on the mount", &d.api().read("c", 1 << 20, 256 << 10), &data);
    d.stop();
}

/// Write 256 KiB to clone `c` over HTTP and flush; returns the bytes (at 1 MiB).
fn write_and_flush(d: &Daemon, seed: u64) -> Vec<u8> {
    let data = random(256 << 10, seed);
    d.api().write("c", 1 << 20, &data);
    d.api().post_json_ok("/v1/volumes/c/flush", &json!({}));
    data
}

/// Start a daemon on the survivors in `out` and check that clone `c` holds `data` at 1 MiB.
fn check_survivors(rig: &Rig, out: &Path, report: &str, data: &[u8]) {
    let mut after = Daemon::start(&out.join("data"), &rig.log());
    let volumes = after.api().get_json("/v1/volumes");
    let c = volumes["volumes"].as_array().and_then(|v| v.iter().find(|v| v["name"] == "c"));
    assert!(
        c.is_some(),
        "clone `c`, created and flushed, is gone after the cut: {volumes}\nwhat the daemon had fsynced:\n{report}"
    );
    assert_same_image("the flushed write after the cut", &after.api().read("c", 1 << 20, 256 << 10), data);
    after.stop();
}

/// The harness carries a real daemon's durable state across a cut: after a clean stop (whose
/// final flush closes sled, which fsyncs its log then), everything is there. Directories are
/// journaled here: see the next tests for why.
#[test]
fn a_clean_stop_survives_a_power_cut() {
    let mut rig = Rig::with(Directories::Journaled);
    let mut d = daemon_with_clone(&rig.data_dir(), &rig.log());
    let data = write_and_flush(&d, 2);
    d.stop();
    let (out, report) = rig.cut(&mut d);
    check_survivors(&rig, &out, &report, &data);
}

/// The first power-cut case: an HTTP write acknowledged, then a flush acknowledged,
/// then the power is cut. A daemon restarted on what survived must serve the flushed bytes.
#[test]
fn a_flushed_write_survives_a_power_cut() {
    let mut rig = Rig::new();
    let mut d = daemon_with_clone(&rig.data_dir(), &rig.log());
    let data = write_and_flush(&d, 3);
    let (out, report) = rig.cut(&mut d);
    check_survivors(&rig, &out, &report, &data);
}

/// The same on a journaling filesystem (directory changes durable at once), which isolates the
/// metadata store: only file contents that were not fsynced are lost.
#[test]
fn a_flushed_write_survives_a_power_cut_on_a_journaling_filesystem() {
    let mut rig = Rig::with(Directories::Journaled);
    let mut d = daemon_with_clone(&rig.data_dir(), &rig.log());
    let data = write_and_flush(&d, 4);
    let (out, report) = rig.cut(&mut d);
    check_survivors(&rig, &out, &report, &data);
}

/// Run qemu-io's `cmds` on `uri`, ending with `abort` so that qemu does not flush at close:
/// what is durable is what the commands made durable. Returns its output.
fn qemu_io_then_abort(uri: &str, cmds: &[&str]) -> String {
    // Line-buffered, or abort() would drop qemu-io's report of what it did; writeback, or
    // qemu-io (writethrough by default) would make every write FUA.
    let mut cmd = std::process::Command::new("stdbuf");
    cmd.arg("-oL").arg("qemu-io").arg("-f").arg("raw").arg("-t").arg("writeback");
    for c in cmds.iter().chain(&["abort"]) {
        cmd.arg("-c").arg(c);
    }
    let out = run_bounded(cmd.arg(uri), Duration::from_secs(30));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("failed"), "qemu-io {cmds:?}: {text}");
    assert_eq!(text.matches("wrote ").count(), cmds.iter().filter(|c| c.starts_with("write")).count(), "{text}");
    text
}

/// NBD: a write followed by FLUSH, and a later write with FUA, each acknowledged, then the
/// cut. Both must be there; the writes after the flush without FUA need not be.
#[test]
fn nbd_flush_and_fua_survive_a_power_cut() {
    let mut rig = Rig::with(Directories::Journaled);
    let mut d = daemon_with_clone(&rig.data_dir(), &rig.log());
    let uri = format!("nbd://127.0.0.1:{}/c", d.nbd_port());
    qemu_io_then_abort(&uri, &["write -P 0xa5 1M 256k", "flush", "write -P 0x33 2M 64k", "write -f -P 0x5a 3M 64k"]);
    let (out, report) = rig.cut(&mut d);
    check_survivors(&rig, &out, &report, &[0xa5; 256 << 10]);
    let mut after = Daemon::start(&out.join("data"), &rig.log());
    assert_same_image("the FUA write after the cut", &after.api().read("c", 3 << 20, 64 << 10), &[0x5a; 64 << 10]);
    after.stop();
}

/// Size of the clone the random-cut test writes.
const VOL: usize = 4 << 20;
const NBLOCKS: usize = VOL / BS;
/// Cuts in one run of the random-cut test: a few in CI, more with `FORKD_POWER_CUTS=N` (the
/// issue's soak of 100 belongs in `bench/`).
fn cuts() -> usize {
    std::env::var("FORKD_POWER_CUTS").ok().and_then(|v| v.parse().ok()).unwrap_or(4)
}
/// Bounds on one writer run, in case the cut never stops it.
const WRITER_MAX_OPS: usize = 20_000;
const WRITER_MAX_TIME: Duration = Duration::from_secs(20);

fn block_hashes(img: &[u8]) -> Vec<u64> {
    img.chunks(BS).map(xxh3_64).collect()
}

/// Snapshots or clones by name, with their block hashes.
type Volumes = BTreeMap<String, Vec<u64>>;

/// The catalog operation in flight at the cut, if any: it may or may not have happened.
#[derive(Debug, Default)]
enum Pending {
    #[default]
    Nothing,
    /// A snapshot of `c` (its name is not known before the answer, so it is not checked).
    Snapshot,
    /// A clone of that name, with these block hashes.
    Clone(String, Vec<u64>),
    /// The delete of that clone.
    Delete(String),
    /// A rewind of `c` to these block hashes.
    Rewind(Vec<u64>),
}

/// What the writer knows: clone `c` (what was acknowledged as durable, and what else a block
/// may hold after the cut), its snapshots, and the clones made from them.
#[derive(Debug)]
struct Model {
    /// Contents with every acknowledged write applied.
    cur: Vec<u8>,
    /// Block hashes at the last acknowledged flush or catalog operation.
    durable: Vec<u64>,
    /// Block hashes at the start of the round (for the failure message).
    start: Vec<u64>,
    /// Hashes given to blocks by writes issued after that point (one may have landed).
    since: HashMap<usize, Vec<u64>>,
    /// Acknowledged snapshots: name -> block hashes.
    snapshots: Volumes,
    /// The newest snapshot taken this round and its bytes (what clones and rewinds use).
    newest: Option<(String, Vec<u8>)>,
    /// Acknowledged clones of snapshots of `c` (never written): name -> block hashes.
    clones: Volumes,
    /// Clones whose delete was acknowledged.
    deleted: Vec<String>,
    pending: Pending,
    /// Acknowledged writes, flushes and catalog operations, for the failure message.
    acks: (usize, usize, usize),
    /// An error answer before the cut: a daemon bug, not a power cut.
    error: Option<String>,
}

impl Model {
    fn new(cur: Vec<u8>, snapshots: Volumes, clones: Volumes) -> Model {
        let durable = block_hashes(&cur);
        Model {
            cur,
            start: durable.clone(),
            durable,
            since: HashMap::new(),
            snapshots,
            newest: None,
            clones,
            deleted: Vec::new(),
            pending: Pending::Nothing,
            acks: (0, 0, 0),
            error: None,
        }
    }

    /// An acknowledged flush or catalog operation: everything answered so far is durable.
    fn durable_now(&mut self) {
        self.durable = block_hashes(&self.cur);
        self.since.clear();
        self.pending = Pending::Nothing;
    }
}

/// An answer: `Err` when the request got no answer (the daemon is gone), `Ok(Err)` when it was
/// refused.
type Answer = Result<Result<(), String>, String>;

/// One writer run: random aligned writes, flushes, snapshots, clones, deletes and rewinds over
/// HTTP until the daemon stops answering (the cut). An error answer before `cut` is set is
/// recorded as a bug.
fn writer(api: Api, mut m: Model, seed: u64, cut: &AtomicBool) -> Model {
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    for _ in 0..WRITER_MAX_OPS {
        if started.elapsed() > WRITER_MAX_TIME {
            m.error = Some(format!("the writer ran {WRITER_MAX_TIME:?} without being cut off"));
            break;
        }
        let r: f64 = rng.gen();
        let answer = match (r, m.newest.is_some()) {
            (r, _) if r < 0.03 => snapshot(&api, &mut m),
            (r, true) if r < 0.05 => clone(&api, &mut m, rng.gen()),
            (r, _) if r < 0.06 && !m.clones.is_empty() => delete(&api, &mut m, rng.gen()),
            (r, true) if r < 0.07 => rewind(&api, &mut m),
            (r, _) if r < 0.2 => api.request("POST", "/v1/volumes/c/flush", None).map(|resp| {
                resp.ok().then_some(()).ok_or(format!("POST flush: HTTP {} {}", resp.status, resp.text()))?;
                m.acks.1 += 1;
                m.durable_now();
                Ok(())
            }),
            _ => write(&api, &mut m, &mut rng),
        };
        match answer {
            Ok(Ok(())) => continue,
            Ok(Err(why)) if !cut.load(Ordering::SeqCst) => m.error = Some(why),
            _ => {}
        }
        break;
    }
    m
}

fn write(api: &Api, m: &mut Model, rng: &mut StdRng) -> Answer {
    let n = rng.gen_range(1..=16usize);
    let first = rng.gen_range(0..=NBLOCKS - n);
    let mut data = vec![0u8; n * BS];
    rng.fill_bytes(&mut data);
    for (i, block) in data.chunks(BS).enumerate() {
        m.since.entry(first + i).or_default().push(xxh3_64(block));
    }
    let path = format!("/v1/volumes/c/data?offset={}", first * BS);
    let resp = api.request("PUT", &path, Some(("application/octet-stream", &data)))?;
    if !resp.ok() {
        return Ok(Err(format!("PUT {path}: HTTP {} {}", resp.status, resp.text())));
    }
    m.cur[first * BS..(first + n) * BS].copy_from_slice(&data);
    m.acks.0 += 1;
    Ok(Ok(()))
}

/// Take a snapshot of `c`; returns its name when acknowledged.
fn snapshot_of_c(api: &Api) -> Result<Result<String, String>, String> {
    let resp = api.request("POST", "/v1/volumes/c/snapshots", Some(("application/json", b"{}")))?;
    if resp.status != 201 {
        return Ok(Err(format!("POST snapshot: HTTP {} {}", resp.status, resp.text())));
    }
    Ok(resp.json()["snapshot"].as_str().map(str::to_string).ok_or(format!("no snapshot name: {}", resp.text())))
}

fn snapshot(api: &Api, m: &mut Model) -> Answer {
    let hashes = block_hashes(&m.cur);
    m.pending = Pending::Snapshot;
    Ok(snapshot_of_c(api)?.map(|name| {
        m.snapshots.insert(name.clone(), hashes);
        m.newest = Some((name, m.cur.clone()));
        m.acks.2 += 1;
        m.durable_now();
    }))
}

fn clone(api: &Api, m: &mut Model, id: u32) -> Answer {
    let Some((from, bytes)) = &m.newest else { return Ok(Ok(())) };
    let (name, hashes) = (format!("k{id:08x}"), block_hashes(bytes));
    m.pending = Pending::Clone(name.clone(), hashes.clone());
    let resp = api.request(
        "POST",
        "/v1/clones",
        Some(("application/json", json!({"from": from, "name": name}).to_string().as_bytes())),
    )?;
    if !resp.ok() {
        return Ok(Err(format!("POST clone of {from}: HTTP {} {}", resp.status, resp.text())));
    }
    m.clones.insert(name, hashes);
    m.acks.2 += 1;
    m.durable_now();
    Ok(Ok(()))
}

fn delete(api: &Api, m: &mut Model, pick: usize) -> Answer {
    let Some(name) = m.clones.keys().nth(pick % m.clones.len().max(1)).cloned() else { return Ok(Ok(())) };
    m.pending = Pending::Delete(name.clone());
    let resp = api.request("DELETE", &format!("/v1/volumes/{}", enc(&name)), None)?;
    if !resp.ok() {
        return Ok(Err(format!("DELETE {name}: HTTP {} {}", resp.status, resp.text())));
    }
    m.clones.remove(&name);
    m.deleted.push(name);
    m.acks.2 += 1;
    m.durable_now();
    Ok(Ok(()))
}

/// Rewind `c` to the newest snapshot; the state it leaves is kept as a new snapshot.
fn rewind(api: &Api, m: &mut Model) -> Answer {
    let Some((to, bytes)) = m.newest.clone() else { return Ok(Ok(())) };
    let before = block_hashes(&m.cur);
    m.pending = Pending::Rewind(block_hashes(&bytes));
    let body = json!({ "to": to }).to_string();
    let resp = api.request("POST", "/v1/volumes/c/rewind", Some(("application/json", body.as_bytes())))?;
    if !resp.ok() {
        return Ok(Err(format!("POST rewind to {to}: HTTP {} {}", resp.status, resp.text())));
    }
    let Some(kept) = resp.json()["kept"].as_str().map(str::to_string) else {
        return Ok(Err(format!("rewind answer without `kept`: {}", resp.text())));
    };
    m.snapshots.insert(kept, before);
    m.cur = bytes;
    m.acks.2 += 1;
    m.durable_now();
    Ok(Ok(()))
}

/// Read volume or snapshot `name` whole, as block hashes; `None` if it is not there.
fn hashes_of(api: &Api, name: &str) -> Option<Vec<u64>> {
    let resp = api.request("GET", &format!("/v1/volumes/{}/data?offset=0&length={VOL}", enc(name)), None);
    resp.ok().filter(Http::ok).map(|r| block_hashes(&r.body))
}

/// The survivors' snapshots and clones against the model: what is missing or changed, and
/// what exists (the next round's baseline).
fn check_catalog(api: &Api, m: &Model) -> (Vec<String>, Volumes, Volumes) {
    let (mut wrong, mut snapshots, mut clones) = (Vec::new(), BTreeMap::new(), BTreeMap::new());
    for (name, want) in &m.snapshots {
        match hashes_of(api, name) {
            Some(h) if &h == want => drop(snapshots.insert(name.clone(), h)),
            _ => wrong.push(format!("snapshot {name}")),
        }
    }
    for (name, want) in &m.clones {
        let pending_delete = matches!(&m.pending, Pending::Delete(d) if d == name);
        match hashes_of(api, name) {
            Some(h) if &h == want => drop(clones.insert(name.clone(), h)),
            None if pending_delete => {}
            _ => wrong.push(format!("clone {name}")),
        }
    }
    if let Pending::Clone(name, want) = &m.pending {
        match hashes_of(api, name) {
            Some(h) if &h == want => drop(clones.insert(name.clone(), h)),
            None => {}
            Some(_) => wrong.push(format!("clone {name} (in flight at the cut) with other contents")),
        }
    }
    wrong
        .extend(m.deleted.iter().filter(|n| hashes_of(api, n).is_some()).map(|n| format!("deleted clone {n} is back")));
    (wrong, snapshots, clones)
}

/// Check what a daemon on the survivors serves against the model; returns the new baseline
/// (`c`'s contents, the snapshots and the clones that exist).
fn check_cut(api: &Api, m: &Model, report: &str) -> (Vec<u8>, Volumes, Volumes) {
    let volumes = api.get_json("/v1/volumes");
    let has_c = volumes["volumes"].as_array().is_some_and(|v| v.iter().any(|v| v["name"] == "c"));
    let (w, f, o) = m.acks;
    let context = format!(
        "after {w} writes, {f} flushes and {o} catalog operations acknowledged\nfsyncs before the cut:\n{report}"
    );
    assert!(has_c, "clone `c` is gone after the cut: {volumes}\n{context}");
    let got = api.read("c", 0, VOL as u64);
    let hashes = block_hashes(&got);
    let rewound = match &m.pending {
        Pending::Rewind(target) => Some(target),
        _ => None,
    };
    let lost: Vec<usize> = (0..NBLOCKS)
        .filter(|&b| hashes[b] != m.durable[b] && !m.since.get(&b).is_some_and(|c| c.contains(&hashes[b])))
        .filter(|&b| rewound.is_none_or(|t| t[b] != hashes[b]))
        .collect();
    let rolled_back = lost.iter().filter(|&&b| hashes[b] == m.start[b]).count();
    let (wrong, snapshots, clones) = check_catalog(api, m);
    assert!(
        lost.is_empty() && wrong.is_empty(),
        "{} blocks of `c` hold neither their flushed contents nor a later write's (first at byte {}; {rolled_back} \
         of them hold what they held before the round); acknowledged but gone or changed: {wrong:?} of {} \
         snapshots and {} clones\n{context}",
        lost.len(),
        lost.first().map_or(0, |b| b * BS),
        m.snapshots.len(),
        m.clones.len(),
    );
    (got, snapshots, clones)
}

/// Item 2's first cuts: HTTP writes, flushes, snapshots, clones, deletes and rewinds run while
/// the power is cut at a random moment (every other cut reordered: part of the un-synced
/// writes reach the disk); a daemon on the survivors must serve every acknowledged flush,
/// snapshot and clone byte for byte (a block may also hold a write issued after the last
/// flush), and no acknowledged delete may come back. The survivors are the next cut's start.
/// At the end every volume is deleted, and the extent file must hold nothing: no space leaks
/// through a cut.
#[test]
fn random_cuts_keep_every_acknowledged_flush() {
    if let Err(why) = fuse_available() {
        panic!("FUSE is required for the power-cut tests: {why}");
    }
    let root = tempfile::tempdir().expect("tempdir");
    let log = root.path().join("daemon.log");
    let seed: u64 = rand::random();
    let mut rng = StdRng::seed_from_u64(seed);
    eprintln!("random_cuts_keep_every_acknowledged_flush: seed {seed}");
    // The first state: a data directory with clone `c`, made on a real filesystem.
    let mut from = root.path().join("start");
    fs::create_dir(&from).expect("mkdir");
    let mut d = Daemon::start(&from.join("data"), &log);
    d.api().post_json_ok("/v1/sources", &json!({"name": "s", "size": "4M"}));
    d.api().post_json_ok("/v1/clones", &json!({"from": "s", "name": "c"}));
    d.stop();
    let (mut content, mut snapshots, mut clones) = (vec![0u8; VOL], BTreeMap::new(), BTreeMap::new());
    for round in 0..cuts() {
        let mnt = root.path().join(format!("mnt{round}"));
        fs::create_dir(&mnt).expect("mkdir");
        let mut pcfs = PowerCutFs::mount_with(&mnt, Some(&from), Directories::Journaled).expect("mount");
        let mut d = Daemon::start(&mnt.join("data"), &log);
        let cut = AtomicBool::new(false);
        let model = Model::new(content, snapshots, clones);
        let writer_seed = rng.gen();
        let delay = Duration::from_millis(rng.gen_range(20..400));
        let model = std::thread::scope(|scope| {
            let api = Api::new(d.port());
            let w = scope.spawn(|| writer(api, model, writer_seed, &cut));
            std::thread::sleep(delay);
            cut.store(true, Ordering::SeqCst);
            // Every other cut also lets a random half of the un-synced writes reach the disk.
            if round % 2 == 1 {
                pcfs.cut_reordered(writer_seed);
            } else {
                pcfs.cut();
            }
            w.join().expect("writer thread")
        });
        let report: Vec<String> = pcfs.sync_report().iter().map(ToString::to_string).collect();
        d.kill9();
        pcfs.unmount().expect("unmount");
        if let Some(e) = &model.error {
            panic!("round {round}: the daemon failed before the cut: {e}");
        }
        from = root.path().join(format!("survivors{round}"));
        fs::create_dir(&from).expect("mkdir");
        pcfs.write_survivors(&from).expect("write the survivors");
        let mut after = Daemon::start(&from.join("data"), &log);
        (content, snapshots, clones) = check_cut(after.api(), &model, &report.join("\n"));
        after.stop();
    }
    let mut last = Daemon::start(&from.join("data"), &log);
    assert_nothing_leaks(&last, &from.join("data"));
    last.stop();
}

/// Delete every volume that survived the cuts (clones before what they came from) and check
/// that the extent file then holds no data: no slot leaked through any of the cuts.
fn assert_nothing_leaks(d: &Daemon, data: &Path) {
    for _pass in 0..64 {
        let volumes = d.api().get_json("/v1/volumes");
        let names: Vec<String> = volumes["volumes"]
            .as_array()
            .map(|v| v.iter().filter_map(|v| v["name"].as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        if names.is_empty() {
            break;
        }
        // A volume others were cloned from is refused (409) until its clones are gone.
        for name in names {
            let r = d.api().delete(&format!("/v1/volumes/{}", enc(&name)));
            assert!(r.ok() || r.status == 409, "delete {name}: {} {}", r.status, r.text());
        }
    }
    let left = d.api().get_json("/v1/volumes");
    assert_eq!(left["volumes"].as_array().map(Vec::len), Some(0), "volumes left: {left}");
    // What the deletes released is collected in the background, then flushed by the collector.
    d.wait_for_garbage_collection();
    let held = forkd_tests::allocated_bytes(&data.join("extents.0"));
    let len = fs::metadata(data.join("extents.0")).map(|m| m.len()).unwrap_or(0);
    let slots = forkd_tests::metric_value(&d.api().get("/metrics").text(), "forkd_extent_slots");
    assert_eq!(
        held, 0,
        "extents.0 still holds {held} bytes after every volume was deleted (length {len}, {slots} slots handed out)"
    );
}
