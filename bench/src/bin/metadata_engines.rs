//! `forkd-bench-engines`: the metadata-engine bake-off of issue 10 (docs/metadata-engine.md).
//! The same workloads through the real `Store` on every engine this build has, in one run:
//! - space: a source, clones rewriting part of it, then every clone deleted: `meta/` on disk
//!   against the live metadata at every step, and for 60 s after the deletes with the daemon's
//!   periodic upkeep (`Store::maintain`) running once a second;
//! - random 4 KiB writes into a clone with a flush every 1,000 writes: writes per second and
//!   `meta/` bytes per write;
//! - flush latency: a 4 KiB write and a flush, p50 and p99;
//! - open: a store with 1,000 clones and 100,000 snapshots (built once, converted to each
//!   engine, which also times the conversion), opened by a real `forkd serve`, then `forkd list`.
//!
//! Usage: `forkd-bench-engines --forkd PATH --dir SCRATCH [--quick] [--out FILE.json]`; built
//! with `--features bakeoff` for every engine (`bench/metadata-engines.sh` does all of it).

// Sizes here are small and the bench runs on 64-bit hosts only.
#![allow(clippy::cast_possible_truncation)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use forkd::store::{disk_usage, MetaEngine, Store};
use forkd_bench::Rng;

const BS: u64 = 4096;
const MIB: u64 = 1 << 20;

/// One measured value of one engine.
type Rows = BTreeMap<String, BTreeMap<String, f64>>;

struct Run {
    scratch: PathBuf,
    forkd: PathBuf,
    quick: bool,
    rows: Rows,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("forkd-bench-engines: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let forkd = PathBuf::from(value("--forkd").context("--forkd PATH is required")?);
    let scratch = PathBuf::from(value("--dir").unwrap_or_else(|| "/tmp/forkd-bench-engines".into()));
    let out = PathBuf::from(value("--out").unwrap_or_else(|| "bench/metadata-engines.json".into()));
    let only: Option<Vec<MetaEngine>> =
        value("--engines").map(|s| s.split(',').filter_map(MetaEngine::from_name).collect());
    let mut r = Run { scratch, forkd, quick: args.iter().any(|a| a == "--quick"), rows: Rows::new() };
    if r.scratch.exists() {
        std::fs::remove_dir_all(&r.scratch)?;
    }
    std::fs::create_dir_all(&r.scratch)?;
    let engines: Vec<MetaEngine> =
        MetaEngine::ALL.into_iter().filter(|e| e.is_built() && only.as_ref().is_none_or(|o| o.contains(e))).collect();
    let (catalog_dir, big) = build_big_catalog(&r)?;
    for &e in &engines {
        eprintln!("== {e}");
        space(&mut r, e)?;
        writes_and_flushes(&mut r, e)?;
        open_big(&mut r, e, &catalog_dir, &big)?;
    }
    let table = markdown(&r.rows, &engines);
    println!("{table}");
    let doc = serde_json::json!({ "quick": r.quick, "rows": r.rows, "markdown": table });
    std::fs::write(&out, serde_json::to_string_pretty(&doc)? + "\n")?;
    eprintln!("results written to {}", out.display());
    Ok(())
}

impl Run {
    fn put(&mut self, metric: &str, e: MetaEngine, v: f64) {
        eprintln!("  {metric}: {v:.3}");
        self.rows.entry(metric.to_string()).or_default().insert(e.name().to_string(), v);
    }

    fn fresh(&self, name: &str) -> Result<PathBuf> {
        let d = self.scratch.join(name);
        if d.exists() {
            std::fs::remove_dir_all(&d)?;
        }
        Ok(d)
    }
}

/// A source of `size` bytes, all written, snapshotted by its ingest: returns `NAME@1`.
fn source(store: &Store, name: &str, size: u64, rng: &mut Rng) -> Result<String> {
    store.op(|c| c.create_source(name, size))?;
    store.op(|c| c.begin_ingest(name))?;
    let mut buf = vec![0u8; (16 * MIB) as usize];
    let mut b = 0;
    while b < size / BS {
        let n = (size / BS - b).min(buf.len() as u64 / BS);
        let chunk = &mut buf[..(n * BS) as usize];
        rng.fill(chunk);
        store.ingest_blocks(name, b, Some(chunk), n)?;
        b += n;
    }
    store.op(|c| c.finish_ingest(name, Default::default()))?;
    Ok(format!("{name}@1"))
}

/// `meta/` on disk over the live metadata, recorded as the worst seen so far.
fn ratio(store: &Store, dir: &Path, worst: &mut f64) -> Result<f64> {
    let x = disk_usage(&dir.join("meta")) as f64 / store.meta_live_bytes()?.max(1) as f64;
    *worst = worst.max(x);
    Ok(x)
}

fn space(r: &mut Run, e: MetaEngine) -> Result<()> {
    let dir = r.fresh("space")?;
    let store = Store::open_with(&dir, Some(e))?;
    let size = if r.quick { 256 * MIB } else { 1024 * MIB };
    let (clones, per_clone) = (20u64, size / BS / 10);
    let mut rng = Rng::new(1);
    let snap = source(&store, "src", size, &mut rng)?;
    let mut worst = 0.0f64;
    ratio(&store, &dir, &mut worst)?;
    let mut buf = vec![0u8; BS as usize];
    for i in 0..clones {
        let name = format!("c{i}");
        store.op(|c| c.clone_volume(&snap, &name))?;
        for _ in 0..per_clone {
            rng.fill(&mut buf);
            store.write(&name, rng.below(size / BS) * BS, &buf)?;
        }
        store.flush()?;
        // The daemon's periodic upkeep (every 5 s; a clone's writes take about as long).
        store.maintain()?;
        ratio(&store, &dir, &mut worst)?;
    }
    r.put("space: meta/ / live, worst while cloning", e, worst);
    for i in 0..clones {
        store.op_freeing(|c| c.delete(&format!("c{i}")))?;
    }
    store.flush()?;
    let mut w = 0.0;
    let right_after = ratio(&store, &dir, &mut w)?;
    r.put("space: meta/ / live, right after deleting the clones", e, right_after);
    let t = Instant::now();
    let mut last = right_after;
    while t.elapsed() < Duration::from_secs(60) && last > 1.5 {
        std::thread::sleep(Duration::from_secs(1));
        store.flush_if_needed()?;
        store.maintain()?;
        last = ratio(&store, &dir, &mut w)?;
    }
    r.put("space: meta/ / live, 60 s after (upkeep each second)", e, last);
    r.put("space: seconds until meta/ / live <= 1.5 (60: never)", e, t.elapsed().as_secs_f64().min(60.0));
    let du = disk_usage(&dir);
    r.put("space: du after delete / source", e, du as f64 / size as f64);
    let reserve = disk_usage(&dir.join("reserve"));
    r.put(
        "space: du after delete without the fixed reserve / source",
        e,
        du.saturating_sub(reserve) as f64 / size as f64,
    );
    r.put("space: live metadata after delete (MiB)", e, store.meta_live_bytes()? as f64 / MIB as f64);
    drop(store);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn writes_and_flushes(r: &mut Run, e: MetaEngine) -> Result<()> {
    let dir = r.fresh("writes")?;
    let store = Store::open_with(&dir, Some(e))?;
    let size = 256 * MIB;
    let mut rng = Rng::new(2);
    let snap = source(&store, "src", size, &mut rng)?;
    store.op(|c| c.clone_volume(&snap, "w"))?;
    let meta0 = disk_usage(&dir.join("meta"));
    let n = if r.quick { 20_000u64 } else { 100_000 };
    let mut buf = vec![0u8; BS as usize];
    let t = Instant::now();
    for i in 0..n {
        rng.fill(&mut buf);
        store.write("w", rng.below(size / BS) * BS, &buf)?;
        if i % 1000 == 999 {
            store.flush()?;
        }
    }
    store.flush()?;
    r.put("writes: random 4 KiB writes per second (flush every 1,000)", e, n as f64 / t.elapsed().as_secs_f64());
    let grown = disk_usage(&dir.join("meta")).saturating_sub(meta0);
    r.put("writes: meta/ growth per write (bytes)", e, grown as f64 / n as f64);
    let mut lat = Vec::new();
    for _ in 0..500 {
        rng.fill(&mut buf);
        store.write("w", rng.below(size / BS) * BS, &buf)?;
        let t = Instant::now();
        store.flush()?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    r.put("flush after a 4 KiB write: p50 (ms)", e, lat[lat.len() / 2]);
    r.put("flush after a 4 KiB write: p99 (ms)", e, lat[lat.len() * 99 / 100]);
    drop(store);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// 1,000 clones with 100 snapshots each (100,000 snapshots), written through the catalog on
/// sled in one go (a flush per operation would take minutes per engine), in a data directory
/// the store created.
fn build_big_catalog(r: &Run) -> Result<(PathBuf, String)> {
    let dir = r.fresh("catalog")?;
    drop(Store::open_with(&dir, Some(MetaEngine::Sled))?);
    let t = Instant::now();
    let kv = metakv::open(MetaEngine::Sled, &dir.join("meta"))?;
    let mut cat = catalog::Catalog::open(kv)?;
    cat.create_source("src", 64 << 30)?;
    cat.begin_ingest("src")?;
    cat.finish_ingest("src", Default::default())?;
    let (clones, snaps) = if r.quick { (200, 100) } else { (1000, 100) };
    for i in 0..clones {
        let name = format!("clone{i:04}");
        cat.clone_volume("src@1", &name)?;
        for _ in 0..snaps {
            cat.snapshot(&name, None)?;
        }
    }
    cat.map_mut().flush_store()?;
    eprintln!("built {clones} clones x {snaps} snapshots in {:.1}s", t.elapsed().as_secs_f64());
    Ok((dir, format!("{clones} clones, {} snapshots", clones * snaps)))
}

fn open_big(r: &mut Run, e: MetaEngine, built: &Path, big: &str) -> Result<()> {
    let dir = r.fresh("open")?;
    copy_dir(built, &dir)?;
    let t = Instant::now();
    drop(Store::open_with(&dir, Some(e))?);
    r.put(&format!("open ({big}): convert from sled (s)"), e, t.elapsed().as_secs_f64());
    let t = Instant::now();
    drop(Store::open(&dir)?);
    r.put(&format!("open ({big}): Store::open (s)"), e, t.elapsed().as_secs_f64());
    let (mut child, api) = serve(&r.forkd, &dir)?;
    let t = Instant::now();
    let ready = wait_ready(&r.forkd, &api, &mut child);
    r.put(&format!("open ({big}): forkd serve start until the API answers (s)"), e, t.elapsed().as_secs_f64());
    let listed = ready.and_then(|()| {
        let t = Instant::now();
        let out = cli(&r.forkd, &api, &["list"])?;
        Ok((t.elapsed().as_secs_f64(), out.lines().count()))
    });
    let _ = child.kill();
    let _ = child.wait();
    let (secs, lines) = listed?;
    eprintln!("  forkd list printed {lines} lines");
    r.put(&format!("open ({big}): forkd list (s)"), e, secs);
    r.put(&format!("open ({big}): meta/ on disk (MiB)"), e, disk_usage(&dir.join("meta")) as f64 / MIB as f64);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn serve(forkd: &Path, dir: &Path) -> Result<(std::process::Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let api = format!("127.0.0.1:{port}");
    let child = Command::new(forkd)
        .env_remove("FORKD_API")
        .args(["serve", "--nbd", "127.0.0.1:0", "--iscsi", "127.0.0.1:0", "--api", &api, "--data-dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", forkd.display()))?;
    Ok((child, api))
}

fn wait_ready(forkd: &Path, api: &str, child: &mut std::process::Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait()? {
            bail!("forkd serve exited at start ({st})");
        }
        if std::net::TcpStream::connect(api).is_ok() && cli(forkd, api, &["show", "src"]).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("forkd serve did not answer within 120 s")
}

fn cli(forkd: &Path, api: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(forkd).env_remove("FORKD_API").args(["--api", api]).args(args).output()?;
    if !out.status.success() {
        bail!("forkd {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else if e.file_name() != "LOCK" {
            std::fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}

fn markdown(rows: &Rows, engines: &[MetaEngine]) -> String {
    let mut s = format!(
        "| metric | {} |\n|---|{}\n",
        engines.iter().map(|e| e.name()).collect::<Vec<_>>().join(" | "),
        "---:|".repeat(engines.len())
    );
    for (metric, by) in rows {
        let cells: Vec<String> =
            engines.iter().map(|e| by.get(e.name()).map_or("-".into(), |v| format!("{v:.3}"))).collect();
        s += &format!("| {metric} | {} |\n", cells.join(" | "));
    }
    s
}
