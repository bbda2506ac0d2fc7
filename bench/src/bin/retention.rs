//! `forkd-bench-retention`: retention's cost at 100,000 snapshots (issue 12), through the
//! catalog API on a real data directory's metadata engine (the default one, on disk):
//! - one source gets N snapshots; at each mark (1k, 10k, 100k existing) a window of snapshots
//!   is timed one by one, each followed by a durable engine commit as the daemon's flush does,
//!   with the bytes the catalog handed to the engine per snapshot (counted by a wrapper around
//!   the engine), the bytes the process wrote to disk (`/proc/self/io`) and `meta/`'s size;
//! - reopening the catalog (loading every snapshot);
//! - the retention plan alone (the pure function) over the N snapshots, with their real times
//!   and with synthetic times one every 15 minutes, and `prune_plan` through the catalog;
//! - setting the rules, and one `prune` commit (keep-daily 30) that deletes nearly all of them
//!   (their real times all fall on the run's day or two), then a durable commit;
//! - the process's peak resident memory while building, its resident memory once reopened,
//!   and its peak over the whole run (the plan timing holds two more copies of the list).
//!
//! It uses only catalog calls that existed before snapshots got their own keys, so the same
//! file builds against the old layout for the before/after comparison
//! (`bench/retention-bench.sh`). Output: a table on stdout and JSON to `--out`.
//!
//! Usage: `forkd-bench-retention --dir SCRATCH [--snapshots N] [--marks 1000,10000,100000]
//! [--window W] [--out FILE]`.

// Counts and byte sizes here are far below the limits of the types they are converted to.
#![allow(clippy::cast_possible_truncation)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use catalog::{Catalog, Entry, MetaKv, Retention, Snapshot};
use metakv::{Batch, Engine};
use serde_json::{json, Value};

const MIN_MS: i64 = 60_000;

/// The metadata engine, counting what the catalog and the map hand to it.
#[derive(Debug)]
struct CountingKv {
    inner: Arc<dyn MetaKv>,
    /// Bytes of keys and values put, plus keys deleted.
    bytes: AtomicU64,
}

impl MetaKv for CountingKv {
    fn get(&self, key: &[u8]) -> metakv::Result<Option<Vec<u8>>> {
        self.inner.get(key)
    }
    fn scan_prefix(&self, prefix: &[u8], visit: &mut dyn FnMut(&[u8], &[u8])) -> metakv::Result<()> {
        self.inner.scan_prefix(prefix, visit)
    }
    fn apply(&self, batch: &Batch) -> metakv::Result<()> {
        let n: usize = batch.ops().iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len)).sum();
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.inner.apply(batch)
    }
    fn commit(&self) -> metakv::Result<()> {
        self.inner.commit()
    }
    fn engine(&self) -> Engine {
        self.inner.engine()
    }
}

struct Args {
    dir: PathBuf,
    snapshots: u64,
    window: u64,
    /// Numbers of existing snapshots at which a window is timed.
    marks: Vec<u64>,
    out: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let number = |flag: &str, default: u64| -> Result<u64> {
        value(flag).map_or(Ok(default), |v| v.parse().with_context(|| format!("{flag} takes a number")))
    };
    let snapshots = number("--snapshots", 100_000)?;
    let marks = match value("--marks") {
        Some(list) => list
            .split(',')
            .map(|m| m.parse().with_context(|| format!("--marks: `{m}` is not a number")))
            .collect::<Result<Vec<u64>>>()?,
        None => vec![1_000, 10_000, 100_000],
    };
    Ok(Args {
        dir: PathBuf::from(value("--dir").context("--dir SCRATCH is required")?),
        snapshots,
        window: number("--window", 200)?,
        marks: marks.into_iter().filter(|&m| m <= snapshots).collect(),
        out: value("--out").map(PathBuf::from),
    })
}

/// `/proc/self/io`'s `write_bytes`: bytes this process caused to be written to storage.
fn disk_writes() -> u64 {
    proc_field("/proc/self/io", "write_bytes:")
}

/// Peak resident memory (`VmHWM`), KiB.
fn peak_rss_kib() -> u64 {
    proc_field("/proc/self/status", "VmHWM:")
}

/// Resident memory now (`VmRSS`), KiB.
fn rss_kib() -> u64 {
    proc_field("/proc/self/status", "VmRSS:")
}

fn proc_field(path: &str, name: &str) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let line = text.lines().find_map(|l| l.strip_prefix(name)).unwrap_or("0");
    line.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()
}

/// The catalog over a counting engine in `DIR/meta`.
struct Bench {
    cat: Catalog,
    kv: Arc<CountingKv>,
    meta: PathBuf,
}

impl Bench {
    fn open(meta: &Path) -> Result<Bench> {
        let inner = metakv::open(Engine::DEFAULT, meta).context("open the metadata engine")?;
        let kv = Arc::new(CountingKv { inner, bytes: AtomicU64::new(0) });
        let cat = Catalog::open(kv.clone()).context("open the catalog")?;
        Ok(Bench { cat, kv, meta: meta.to_path_buf() })
    }

    /// A source with 16 blocks of data (a real tree root for its snapshots to share).
    fn source(&mut self) -> Result<()> {
        self.cat.create_source("src", 1 << 30)?;
        self.cat.begin_ingest("src")?;
        let slots = self.cat.map_mut().alloc(16)?;
        let entries: Vec<Option<Entry>> = slots.iter().map(|&slot| Some(Entry { slot, crc: 1, digest: 1 })).collect();
        self.cat.write("src", 0, &entries, true)?;
        self.cat.finish_ingest("src", Default::default())?;
        self.cat.map_mut().flush_store()?;
        Ok(())
    }

    fn count(&self) -> u64 {
        self.cat.volume("src").map_or(0, |v| v.snapshots.len() as u64)
    }

    /// Take snapshots up to `n` in all, durably committed every 1,000.
    fn build_to(&mut self, n: u64) -> Result<()> {
        while self.count() < n {
            self.cat.snapshot("src", None)?;
            if self.count().is_multiple_of(1000) {
                self.cat.map_mut().flush_store()?;
            }
        }
        self.cat.map_mut().flush_store()?;
        Ok(())
    }

    /// Time `w` snapshots one by one, each made durable, with what they wrote.
    fn window(&mut self, w: u64) -> Result<Value> {
        let existing = self.count();
        let (bytes0, disk0, size0) = (self.kv.bytes.load(Ordering::Relaxed), disk_writes(), dir_size(&self.meta));
        let mut op_us = Vec::new();
        let mut durable_us = Vec::new();
        for _ in 0..w {
            let t = Instant::now();
            self.cat.snapshot("src", None)?;
            let op = t.elapsed();
            self.cat.map_mut().flush_store()?;
            op_us.push(op.as_secs_f64() * 1e6);
            durable_us.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let per = |x: u64| x as f64 / w as f64;
        Ok(json!({
            "existing": existing,
            "snapshot_us_mean": mean(&op_us),
            "snapshot_durable_us_mean": mean(&durable_us),
            "snapshot_durable_us_p99": percentile(&mut durable_us, 0.99),
            "engine_bytes_per_snapshot": per(self.kv.bytes.load(Ordering::Relaxed) - bytes0),
            "disk_bytes_per_snapshot": per(disk_writes() - disk0),
            "meta_growth_bytes_per_snapshot": (dir_size(&self.meta) as f64 - size0 as f64) / w as f64,
            "meta_bytes": dir_size(&self.meta),
        }))
    }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(((xs.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0)
}

/// Median milliseconds of `runs` calls of `f`.
fn median_ms(runs: usize, mut f: impl FnMut() -> usize) -> (f64, usize) {
    let mut times = Vec::new();
    let mut out = 0;
    for _ in 0..runs {
        let t = Instant::now();
        out = f();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    (percentile(&mut times, 0.5), out)
}

/// The plan alone over the source's snapshots: real times, and times one every 15 minutes.
fn plan_times(snaps: &[Snapshot], rules: &Retention) -> Value {
    let none = BTreeSet::new();
    let (real_ms, real_n) = median_ms(5, || catalog::retention_plan(snaps, rules, &none).len());
    let start = snaps.first().map_or(0, |s| s.created_at);
    let spread: Vec<Snapshot> = snaps
        .iter()
        .enumerate()
        .map(|(i, s)| Snapshot { created_at: start + i as i64 * 15 * MIN_MS, ..s.clone() })
        .collect();
    let (spread_ms, spread_n) = median_ms(5, || catalog::retention_plan(&spread, rules, &none).len());
    json!({
        "plan_real_times_ms": real_ms, "plan_real_times_deletes": real_n,
        "plan_15min_apart_ms": spread_ms, "plan_15min_apart_deletes": spread_n,
    })
}

fn run(args: &Args) -> Result<Value> {
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)?;
    }
    std::fs::create_dir_all(&args.dir)?;
    let meta = args.dir.join("meta");
    let mut b = Bench::open(&meta)?;
    b.source()?;
    let mut windows = Vec::new();
    let t = Instant::now();
    for &m in &args.marks {
        b.build_to(m)?;
        eprintln!("{m} snapshots after {:.1} s", t.elapsed().as_secs_f64());
        windows.push(b.window(args.window)?);
    }
    b.build_to(args.snapshots)?;
    let build_s = t.elapsed().as_secs_f64();
    let n = b.count();
    let build_peak = peak_rss_kib();
    drop(b);
    let t = Instant::now();
    let mut b = Bench::open(&meta)?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let open_rss = rss_kib();
    let rules = Retention { keep_daily: Some(30), ..Retention::default() };
    let snaps = b.cat.volume("src")?.snapshots.clone();
    let plans = plan_times(&snaps, &rules);
    let t = Instant::now();
    b.cat.set_retention("src", Some(rules))?;
    b.cat.map_mut().flush_store()?;
    let set_ms = t.elapsed().as_secs_f64() * 1e3;
    let none = BTreeSet::new();
    let (prune_plan_ms, _) = median_ms(3, || b.cat.prune_plan("src", &none).map_or(0, |p| p.len()));
    let (bytes0, disk0) = (b.kv.bytes.load(Ordering::Relaxed), disk_writes());
    let t = Instant::now();
    let pruned = b.cat.prune("src", &none)?.len();
    // The daemon collects what a prune released in the background; measured here with it, as
    // before collection moved there (bench/retention-results.md).
    b.cat.collect_garbage()?;
    let prune_ms = t.elapsed().as_secs_f64() * 1e3;
    b.cat.map_mut().flush_store()?;
    let prune_durable_ms = t.elapsed().as_secs_f64() * 1e3;
    Ok(json!({
        "engine": Engine::DEFAULT.to_string(),
        "snapshots": n,
        "build_seconds": build_s,
        "windows": windows,
        "open_ms": open_ms,
        "peak_rss_building_kib": build_peak,
        "rss_after_open_kib": open_rss,
        "plan": plans,
        "set_retention_durable_ms": set_ms,
        "prune_plan_ms": prune_plan_ms,
        "prune_deleted": pruned,
        "prune_commit_ms": prune_ms,
        "prune_durable_ms": prune_durable_ms,
        "prune_engine_bytes": b.kv.bytes.load(Ordering::Relaxed) - bytes0,
        "prune_disk_bytes": disk_writes() - disk0,
        "left": b.count(),
        "meta_bytes_after": dir_size(&meta),
        "peak_rss_kib": peak_rss_kib(),
    }))
}

fn print_table(r: &Value) {
    println!("| existing snapshots | snapshot (catalog) | + durable commit, mean | p99 | engine bytes/snapshot | disk bytes/snapshot |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for w in r["windows"].as_array().into_iter().flatten() {
        println!(
            "| {} | {:.0} us | {:.0} us | {:.0} us | {:.0} | {:.0} |",
            w["existing"],
            w["snapshot_us_mean"].as_f64().unwrap_or(0.0),
            w["snapshot_durable_us_mean"].as_f64().unwrap_or(0.0),
            w["snapshot_durable_us_p99"].as_f64().unwrap_or(0.0),
            w["engine_bytes_per_snapshot"].as_f64().unwrap_or(0.0),
            w["disk_bytes_per_snapshot"].as_f64().unwrap_or(0.0),
        );
    }
    println!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
}

fn main() {
    let result = parse_args().and_then(|args| {
        let r = run(&args)?;
        print_table(&r);
        if let Some(out) = &args.out {
            std::fs::write(out, serde_json::to_string_pretty(&r)?)?;
        }
        if args.dir.exists() {
            std::fs::remove_dir_all(&args.dir)?;
        }
        Ok(())
    });
    if let Err(e) = result {
        eprintln!("forkd-bench-retention: error: {e:#}");
        std::process::exit(1);
    }
}
