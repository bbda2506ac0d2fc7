//! `forkd-bench`: measures forkd against its performance goals and prints a markdown table
//! (goal next to each figure, PASS/MISS), also written as JSON to `--out`.
//!
//! Benchmarks (select by name, default `all`):
//! - `create`: clone and snapshot creation time through the library (`store.op`, which
//!   includes the durable flush) on a sparse 1 GiB and a sparse 1 TiB source;
//! - `read`: 4 KiB random-read latency through the map at clone depth 1 and depth 64;
//! - `ingest`: full `forkd ingest` into a running `forkd serve` against `cp`, then the bytes an
//!   incremental ingest sends after 1% of the blocks changed;
//! - `space`: disk usage of a source with 20 clones each rewriting 10% of it, and after
//!   deleting them; metadata bytes per GiB of data;
//! - `memory`: the daemon's resident memory with 1000 clones, and the time of `list --json`.
//!
//! Everything runs in a scratch directory on the same disk (`--dir`), deleted afterwards.
//! `--quick` shrinks every size so the whole run fits in about two minutes (CI smoke test).

// Benchmark arithmetic converts between counts, byte sizes and floating-point statistics all
// the time; every value involved is far below the limits of the types it is converted to.
#![allow(clippy::cast_possible_truncation)]

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use forkd::store::{disk_usage, Store};
use forkd_bench::Rng;
use serde::Serialize;
use serde_json::{json, Value};

const BS: u64 = 4096;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

// ----- command line -------------------------------------------------------------------------

/// Benchmarks for forkd, each next to its goal.
#[derive(Debug, Parser)]
#[command(name = "forkd-bench")]
struct Args {
    /// Benchmarks to run: all, create, read, ingest, space, memory
    #[arg(default_value = "all", value_name = "BENCH")]
    benches: Vec<String>,

    /// Small sizes everywhere (CI smoke test, well under two minutes); explicit flags still win
    #[arg(long)]
    quick: bool,

    /// Scratch directory on the disk to measure (created, then deleted)
    #[arg(long, default_value = "/work/bench-scratch")]
    dir: PathBuf,

    /// Where to write the results as JSON
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results.json"))]
    out: PathBuf,

    /// The forkd binary [default: `forkd` next to this binary, i.e. target/release/forkd]
    #[arg(long)]
    forkd: Option<PathBuf>,

    /// Keep the scratch directory afterwards
    #[arg(long)]
    keep: bool,

    /// Exit with status 1 when a goal is missed (failed benchmarks always exit with 2)
    #[arg(long)]
    fail_on_miss: bool,

    /// create: timed operations per kind and source size [50]
    #[arg(long)]
    create_samples: Option<usize>,
    /// create: data ingested into each source, spread over it [64M; quick 16M]
    #[arg(long)]
    create_data: Option<String>,

    /// read: size of the fully written source [256M; quick 32M]
    #[arg(long)]
    read_data: Option<String>,
    /// read: depth of the clone chain [64]
    #[arg(long)]
    read_depth: Option<usize>,
    /// read: random 4 KiB reads per depth and round [20000; quick 5000]
    #[arg(long)]
    reads: Option<usize>,

    /// ingest: size of the image file [4G; quick 256M]
    #[arg(long)]
    ingest_size: Option<String>,
    /// ingest: percent of 4 KiB blocks changed before the incremental ingest [1]
    #[arg(long)]
    ingest_change_pct: Option<f64>,

    /// space: size of the fully written source [1G; quick 128M]
    #[arg(long)]
    space_size: Option<String>,
    /// space: number of clones [20]
    #[arg(long)]
    space_clones: Option<usize>,
    /// space: percent of blocks each clone rewrites [10]
    #[arg(long)]
    space_pct: Option<f64>,

    /// memory: clones created through the HTTP API [1000; quick 200]
    #[arg(long)]
    clones: Option<usize>,
    /// memory: data ingested into the 1 GiB source [64M; quick 16M]
    #[arg(long)]
    memory_data: Option<String>,
}

/// Resolved sizes.
#[derive(Debug, Clone, Serialize)]
struct Params {
    quick: bool,
    create_samples: usize,
    create_data: u64,
    read_data: u64,
    read_depth: usize,
    reads: usize,
    ingest_size: u64,
    ingest_change_pct: f64,
    space_size: u64,
    space_clones: usize,
    space_pct: f64,
    clones: usize,
    memory_data: u64,
}

fn size_arg(v: &Option<String>, full: u64, quick: u64, is_quick: bool, flag: &str) -> Result<u64> {
    match v {
        Some(s) => catalog::parse_size(s).map_err(|e| anyhow!("--{flag}: {e}")),
        None => Ok(if is_quick { quick } else { full }),
    }
}

impl Params {
    fn from(a: &Args) -> Result<Params> {
        let q = a.quick;
        let pick = |v: Option<usize>, full: usize, quick: usize| v.unwrap_or(if q { quick } else { full });
        let p = Params {
            quick: q,
            create_samples: pick(a.create_samples, 50, 50),
            create_data: size_arg(&a.create_data, 64 * MIB, 16 * MIB, q, "create-data")?,
            read_data: size_arg(&a.read_data, 256 * MIB, 32 * MIB, q, "read-data")?,
            read_depth: pick(a.read_depth, 64, 64),
            reads: pick(a.reads, 20_000, 5_000),
            ingest_size: size_arg(&a.ingest_size, 4 * GIB, 256 * MIB, q, "ingest-size")?,
            ingest_change_pct: a.ingest_change_pct.unwrap_or(1.0),
            space_size: size_arg(&a.space_size, GIB, 128 * MIB, q, "space-size")?,
            space_clones: pick(a.space_clones, 20, 20),
            space_pct: a.space_pct.unwrap_or(10.0),
            clones: pick(a.clones, 1000, 200),
            memory_data: size_arg(&a.memory_data, 64 * MIB, 16 * MIB, q, "memory-data")?,
        };
        if p.create_samples == 0 || p.reads == 0 || p.read_depth == 0 || p.clones == 0 {
            bail!("sample counts, depth and clone counts must be at least 1");
        }
        if !(0.0..=100.0).contains(&p.ingest_change_pct) || !(0.0..=100.0).contains(&p.space_pct) {
            bail!("percentages must be between 0 and 100");
        }
        if p.create_data > GIB || p.memory_data > GIB {
            bail!("--create-data and --memory-data must fit in the 1 GiB source");
        }
        Ok(p)
    }
}

// ----- results ------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "lowercase")]
enum Cmp {
    /// value < goal
    Lt,
    /// value <= goal
    Le,
    /// value >= goal
    Ge,
}

#[derive(Debug, Clone, Serialize)]
struct Goal {
    cmp: Cmp,
    limit: f64,
    /// The goal as written in the table.
    text: String,
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    bench: String,
    metric: String,
    value: f64,
    unit: String,
    goal: Option<Goal>,
    pass: Option<bool>,
}

#[derive(Debug, Default)]
struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
    failures: Vec<String>,
}

impl Report {
    fn info(&mut self, bench: &str, metric: &str, value: f64, unit: &str) {
        self.rows.push(Row {
            bench: bench.into(),
            metric: metric.into(),
            value,
            unit: unit.into(),
            goal: None,
            pass: None,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn goal(&mut self, bench: &str, metric: &str, value: f64, unit: &str, cmp: Cmp, limit: f64, text: &str) {
        let pass = match cmp {
            Cmp::Lt => value < limit,
            Cmp::Le => value <= limit,
            Cmp::Ge => value >= limit,
        };
        self.rows.push(Row {
            bench: bench.into(),
            metric: metric.into(),
            value,
            unit: unit.into(),
            goal: Some(Goal { cmp, limit, text: text.into() }),
            pass: Some(pass),
        });
    }

    fn note(&mut self, bench: &str, text: impl Into<String>) {
        let text = text.into();
        eprintln!("[{bench}] note: {text}");
        self.notes.push(format!("{bench}: {text}"));
    }
}

fn fmt_value(v: f64, unit: &str) -> String {
    let num = if v == 0.0 {
        "0".to_string()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    match unit {
        "" | "x" => format!("{num}{unit}"),
        _ => format!("{num} {unit}"),
    }
}

fn markdown(rows: &[Row]) -> String {
    let mut s = String::from("| benchmark | metric | value | goal | result |\n|---|---|---:|---|---|\n");
    for r in rows {
        let goal = r.goal.as_ref().map_or("—".to_string(), |g| g.text.clone());
        let res = match r.pass {
            Some(true) => "PASS",
            Some(false) => "**MISS**",
            None => "info",
        };
        s.push_str(&format!("| {} | {} | {} | {} | {} |\n", r.bench, r.metric, fmt_value(r.value, &r.unit), goal, res));
    }
    s
}

// ----- helpers ------------------------------------------------------------------------------

/// Median, p90 and p99 of samples (nearest rank).
#[derive(Debug, Clone, Copy)]
struct Stats {
    median: f64,
    p90: f64,
    p99: f64,
}

fn stats(samples: &[f64]) -> Stats {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if s.is_empty() {
            return f64::NAN;
        }
        let rank = (q * s.len() as f64).ceil() as usize;
        s[rank.clamp(1, s.len()) - 1]
    };
    Stats { median: at(0.5), p90: at(0.9), p99: at(0.99) }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Group sorted block numbers into runs of consecutive blocks, at most `max` long.
fn runs(blocks: &[u64], max: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((first, n)) if *first + *n == b && *n < max => *n += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

/// Newest modification time of any file under `p`.
fn newest_mtime(p: &Path) -> Option<std::time::SystemTime> {
    let md = std::fs::symlink_metadata(p).ok()?;
    if md.is_dir() {
        std::fs::read_dir(p).ok()?.flatten().filter_map(|e| newest_mtime(&e.path())).max()
    } else {
        md.modified().ok()
    }
}

/// `git describe --always --dirty` of the workspace, if it is a git checkout.
fn git_describe() -> Option<String> {
    let out = Command::new("git")
        .args(["-C", concat!(env!("CARGO_MANIFEST_DIR"), "/.."), "describe", "--always", "--dirty"])
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Clock ticks per second of /proc times.
fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// CPU seconds of a process (all its threads, io_uring workers included) and of its
/// waited-for children: (utime + stime, cutime + cstime).
fn proc_cpu(pid: &str) -> Result<(f64, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime is field 14 of the whole line.
    let rest = s.rsplit_once(')').map(|x| x.1).ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    let f: Vec<f64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    let at = |i: usize| f.get(i - 3).copied().unwrap_or(0.0);
    let tck = clk_tck();
    Ok(((at(14) + at(15)) / tck, (at(16) + at(17)) / tck))
}

/// Whole-machine CPU counters from /proc/stat: (busy, steal, total) in ticks.
fn machine_cpu() -> (f64, f64, f64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> =
        s.lines().next().unwrap_or("").split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0.0)).collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0.0);
    // user nice system idle iowait irq softirq steal
    let idle = get(3) + get(4);
    let steal = get(7);
    let total: f64 = f.iter().take(8).sum();
    (total - idle - steal, steal, total)
}

fn sync_all() -> Result<()> {
    let st = Command::new("sync").status().context("running sync")?;
    if !st.success() {
        bail!("sync failed");
    }
    Ok(())
}

fn fresh_dir(p: &Path) -> Result<()> {
    if p.exists() {
        std::fs::remove_dir_all(p).with_context(|| format!("removing {}", p.display()))?;
    }
    std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))
}

/// True when a virtio balloon with free page reporting (feature bit 5) is bound: freed guest
/// memory goes back to the host and is slow to touch again.
fn free_page_reporting() -> bool {
    let Ok(dir) = std::fs::read_dir("/sys/bus/virtio/drivers/virtio_balloon") else { return false };
    dir.flatten()
        .any(|e| std::fs::read_to_string(e.path().join("features")).is_ok_and(|f| f.as_bytes().get(5) == Some(&b'1')))
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn hsize(b: u64) -> String {
    // Sizes are powers of two: a unit fits when its low bits are clear.
    if b >= TIB && b.trailing_zeros() >= 40 {
        format!("{}T", b / TIB)
    } else if b >= GIB && b.trailing_zeros() >= 30 {
        format!("{}G", b / GIB)
    } else if b.trailing_zeros() >= 20 {
        format!("{}M", b / MIB)
    } else {
        format!("{b}B")
    }
}

/// Ingest `data_bytes` of random data into a new source through the library, in runs of
/// `run_blocks` blocks spread evenly over the volume (or front to back when it is full).
fn library_source(
    store: &Store,
    name: &str,
    size: u64,
    data_bytes: u64,
    run_blocks: u64,
    rng: &mut Rng,
) -> Result<String> {
    store.op(|c| c.create_source(name, size))?;
    store.op(|c| c.begin_ingest(name))?;
    let nblocks = size / BS;
    let data_blocks = (data_bytes / BS).min(nblocks);
    let mut buf = vec![0u8; (run_blocks * BS) as usize];
    if data_blocks == nblocks {
        let mut b = 0;
        while b < nblocks {
            let n = run_blocks.min(nblocks - b);
            let chunk = &mut buf[..(n * BS) as usize];
            rng.fill(chunk);
            store.ingest_blocks(name, b, Some(chunk), n)?;
            b += n;
        }
    } else {
        let nruns = data_blocks.div_ceil(run_blocks).max(1);
        let stride = nblocks / nruns;
        for r in 0..nruns {
            let n = run_blocks.min(stride);
            let first = r * stride + rng.below(stride - n + 1);
            let chunk = &mut buf[..(n * BS) as usize];
            rng.fill(chunk);
            store.ingest_blocks(name, first, Some(chunk), n)?;
        }
    }
    let snap = store.op(|c| c.finish_ingest(name, Default::default()))?;
    Ok(snap.to_string())
}

// ----- the daemon ---------------------------------------------------------------------------

/// A `forkd serve` child process, stopped (SIGTERM, then SIGKILL) when dropped.
struct Daemon {
    child: Child,
    url: String,
    bin: PathBuf,
    log: PathBuf,
    agent: ureq::Agent,
}

impl Daemon {
    fn start(bin: &Path, data_dir: &Path) -> Result<Daemon> {
        let port = free_port()?;
        let (nbd, iscsi) = (free_port()?, free_port()?);
        let log = data_dir.with_extension("log");
        let logf = File::create(&log)?;
        let child = Command::new(bin)
            .env_remove("FORKD_API")
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--api")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--nbd")
            .arg(format!("127.0.0.1:{nbd}"))
            .arg("--iscsi")
            .arg(format!("127.0.0.1:{iscsi}"))
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut d = Daemon {
            child,
            url: format!("http://127.0.0.1:{port}"),
            bin: bin.to_path_buf(),
            log,
            agent: ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(2)).build(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = d.child.try_wait()? {
                bail!("forkd serve exited ({st}) at start-up: {}", d.log_tail());
            }
            if d.agent.get(&format!("{}/v1/volumes", d.url)).call().is_ok() {
                return Ok(d);
            }
            if Instant::now() > deadline {
                bail!("forkd serve did not answer within 30 s: {}", d.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" / ")
    }

    /// Run the CLI against this daemon; returns stdout.
    fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.bin)
            .env_remove("FORKD_API")
            .arg("--api")
            .arg(&self.url)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running forkd {}", args.join(" ")))?;
        if !out.status.success() {
            bail!("forkd {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value> {
        match self.agent.post(&format!("{}{path}", self.url)).send_json(body) {
            Ok(r) => Ok(r.into_json()?),
            Err(ureq::Error::Status(code, r)) => bail!("POST {path}: {code} {}", r.into_string().unwrap_or_default()),
            Err(e) => Err(e.into()),
        }
    }

    fn proc_status(&self, field: &str) -> Result<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let line = s
            .lines()
            .find(|l| l.starts_with(&format!("{field}:")))
            .ok_or_else(|| anyhow!("{field} missing from /proc/PID/status"))?;
        let kb: u64 = line.split_whitespace().nth(1).ok_or_else(|| anyhow!("malformed {field} line"))?.parse()?;
        Ok(kb * 1024)
    }

    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

// ----- 1. create ------------------------------------------------------------------------------

fn bench_create(p: &Params, scratch: &Path, rep: &mut Report) -> Result<()> {
    const B: &str = "create";
    let n = p.create_samples;
    let sizes = [("1G", GIB), ("1T", TIB)];
    let mut rng = Rng::new(1);
    // Both stores stay open and the timed operations alternate between them, so drifting
    // disk or cache state affects both sizes alike.
    let mut stores = Vec::new();
    for (label, size) in sizes {
        let dir = scratch.join(format!("create-{label}"));
        fresh_dir(&dir)?;
        let store = Store::open(&dir)?;
        let t = Instant::now();
        let snap = library_source(&store, "src", size, p.create_data, 16, &mut rng)?;
        eprintln!(
            "[create] {label}: source with {} of data in 64 KiB runs spread over it, {:.1}s",
            hsize(p.create_data),
            t.elapsed().as_secs_f64()
        );
        // A few untimed operations first, to warm up.
        for i in 0..3 {
            store.op(|c| c.clone_volume(&snap, &format!("warm{i}")))?;
        }
        store.op(|c| c.clone_volume(&snap, "w"))?;
        stores.push((label, size, dir, store, snap));
    }
    let mut flush: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
    let mut clones: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
    let mut snaps: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
    let mut block = vec![0u8; BS as usize];
    for i in 0..n {
        for (k, (_, size, _, store, snap)) in stores.iter().enumerate() {
            // The floor every catalog operation pays: fdatasync(extents) + sled flush.
            let t = Instant::now();
            store.flush()?;
            flush[k].push(ms(t.elapsed()));
            // A clone of the source's snapshot.
            let name = format!("c{i}");
            let t = Instant::now();
            store.op(|c| c.clone_volume(snap, &name))?;
            clones[k].push(ms(t.elapsed()));
            // A snapshot of a clone written since its last snapshot (untimed write + flush),
            // the way a developer works: write, snapshot, write, snapshot.
            rng.fill(&mut block);
            store.write("w", rng.below(size / BS) * BS, &block)?;
            store.flush()?;
            let t = Instant::now();
            store.op(|c| c.snapshot("w", None))?;
            snaps[k].push(ms(t.elapsed()));
        }
    }
    let mut clone_med = Vec::new();
    let mut snap_med = Vec::new();
    for (k, (label, ..)) in stores.iter().enumerate() {
        let (f, c, s) = (stats(&flush[k]), stats(&clones[k]), stats(&snaps[k]));
        rep.info(B, &format!("{label} source: empty flush (fsync floor), median"), f.median, "ms");
        rep.goal(B, &format!("{label} source: clone, median of {n}"), c.median, "ms", Cmp::Lt, 20.0, "< 20 ms");
        rep.info(B, &format!("{label} source: clone, p90"), c.p90, "ms");
        rep.goal(B, &format!("{label} source: snapshot, median of {n}"), s.median, "ms", Cmp::Lt, 20.0, "< 20 ms");
        rep.info(B, &format!("{label} source: snapshot, p90"), s.p90, "ms");
        clone_med.push(c.median);
        snap_med.push(s.median);
    }
    rep.goal(B, "clone median 1T / 1G", clone_med[1] / clone_med[0], "x", Cmp::Le, 1.5, "<= 1.5x");
    rep.goal(B, "snapshot median 1T / 1G", snap_med[1] / snap_med[0], "x", Cmp::Le, 1.5, "<= 1.5x");
    let floor = stats(&flush[0]).median;
    rep.note(
        B,
        format!(
            "every catalog operation ends with a durable flush (fdatasync + the metadata engine's durable commit); an empty flush \
             takes {floor:.3} ms on this disk, so on a disk with a slower fdatasync the create figures \
             grow by the difference"
        ),
    );
    for (_, _, dir, store, _) in stores {
        drop(store);
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

// ----- 2. read --------------------------------------------------------------------------------

fn bench_read(p: &Params, scratch: &Path, rep: &mut Report) -> Result<()> {
    const B: &str = "read";
    let dir = scratch.join("read");
    fresh_dir(&dir)?;
    let mut rng = Rng::new(2);
    let store = Store::open(&dir)?;
    let size = p.read_data;
    let nblocks = size / BS;
    let t = Instant::now();
    let mut prev = library_source(&store, "src", size, size, 1024, &mut rng)?;
    // The chain: clone of a snapshot, a few writes, snapshot, clone of that, ...
    let mut block = vec![0u8; BS as usize];
    let deepest = format!("d{}", p.read_depth);
    for d in 1..=p.read_depth {
        let name = format!("d{d}");
        store.op(|c| c.clone_volume(&prev, &name))?;
        for b in rng.sample(nblocks, 16) {
            rng.fill(&mut block);
            store.write(&name, b * BS, &block)?;
        }
        store.flush()?;
        if d < p.read_depth {
            prev = store.op(|c| c.snapshot(&name, None))?.to_string();
        }
    }
    eprintln!(
        "[read] {} source and a chain of {} clones built in {:.1}s",
        hsize(size),
        p.read_depth,
        t.elapsed().as_secs_f64()
    );
    let offsets: Vec<u64> = (0..p.reads).map(|_| rng.below(nblocks) * BS).collect();
    let mut buf = vec![0u8; BS as usize];
    // Warm the page cache and the map cache with exactly the reads to be measured.
    for vol in ["d1", deepest.as_str()] {
        for &o in &offsets {
            store.read(vol, o, &mut buf)?;
        }
    }
    let mut lat: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for _round in 0..2 {
        for vol in ["d1", deepest.as_str()] {
            let v = lat.entry(if vol == "d1" { "d1" } else { "deep" }).or_default();
            for &o in &offsets {
                let t = Instant::now();
                store.read(vol, o, &mut buf)?;
                v.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    let (s1, sd) = (stats(&lat["d1"]), stats(&lat["deep"]));
    let depth = p.read_depth;
    let n = p.reads * 2;
    rep.info(B, &format!("depth 1: 4 KiB random read, median of {n}"), s1.median, "µs");
    rep.info(B, "depth 1: p99", s1.p99, "µs");
    rep.info(B, &format!("depth {depth}: 4 KiB random read, median of {n}"), sd.median, "µs");
    rep.info(B, &format!("depth {depth}: p99"), sd.p99, "µs");
    rep.goal(B, &format!("median depth {depth} / depth 1"), sd.median / s1.median, "x", Cmp::Le, 1.25, "<= 1.25x");
    rep.info(B, &format!("p99 depth {depth} / depth 1"), sd.p99 / s1.p99, "x");
    drop(store);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

// ----- 3. ingest ------------------------------------------------------------------------------

/// Write `size` bytes of random non-zero data to `path`.
fn make_image(path: &Path, size: u64, rng: &mut Rng) -> Result<()> {
    let mut f = File::create(path)?;
    let mut buf = vec![0u8; (4 * MIB) as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(4 * MIB) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn time_cp(from: &Path, to: &Path, then_sync: bool) -> Result<Duration> {
    let t = Instant::now();
    let st = Command::new("cp").arg(from).arg(to).status().context("running cp")?;
    if !st.success() {
        bail!("cp failed");
    }
    if then_sync {
        sync_all()?;
    }
    let d = t.elapsed();
    std::fs::remove_file(to)?;
    sync_all()?;
    Ok(d)
}

fn last_ingest(d: &Daemon, name: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(&d.cli(&["show", name, "--json"])?)?;
    let snaps = v["snapshots"].as_array().ok_or_else(|| anyhow!("show --json has no snapshots"))?;
    let last = snaps.last().ok_or_else(|| anyhow!("{name} has no snapshot"))?;
    Ok(last["ingest"].clone())
}

fn bench_ingest(p: &Params, scratch: &Path, forkd: &Path, rep: &mut Report) -> Result<()> {
    let dir = scratch.join("ingest");
    fresh_dir(&dir)?;
    let size = p.ingest_size;
    let img = dir.join("image");
    let copy = dir.join("image.copy");
    let mut rng = Rng::new(3);
    let t = Instant::now();
    make_image(&img, size, &mut rng)?;
    sync_all()?;
    eprintln!("[ingest] {} image generated and synced in {:.1}s", hsize(size), t.elapsed().as_secs_f64());
    let cp = CpRuns::time(&img, &copy)?;
    let daemon = DaemonIngests::run(p, forkd, &dir, &img, &mut rng)?;
    // Breakdown of the full ingest: the same image (now 1% changed, same size) written
    // (a) with plain pread/pwrite into a new file, no sync: the buffered-write floor;
    // (b) through the library into a fresh store (Store::ingest_blocks, 4 MiB at a time, then
    //     finish_ingest with its durable flush): the store's cost without HTTP and the CLI.
    let floor = copy_floor(&img, &copy, size)?;
    sync_all()?;
    let lib = LibraryIngest::run(&dir, &img, size)?;
    eprintln!(
        "[ingest] breakdown: pread/pwrite {:.2}s; library ingest {:.2}s ({:.2}s in ingest_blocks, {:.2}s final flush)",
        floor.as_secs_f64(),
        lib.total.as_secs_f64(),
        lib.in_store.as_secs_f64(),
        lib.finish.as_secs_f64()
    );
    report_ingest(rep, p, &cp, &daemon, floor, &lib);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// `cp` of the image: twice without sync (the better one counts), then once with sync.
#[derive(Debug)]
struct CpRuns {
    first: Duration,
    second: Duration,
    synced: Duration,
}

impl CpRuns {
    fn time(img: &Path, copy: &Path) -> Result<CpRuns> {
        let first = time_cp(img, copy, false)?;
        let second = time_cp(img, copy, false)?;
        let synced = time_cp(img, copy, true)?;
        eprintln!(
            "[ingest] cp: {:.2}s / {:.2}s, cp + sync: {:.2}s",
            first.as_secs_f64(),
            second.as_secs_f64(),
            synced.as_secs_f64()
        );
        Ok(CpRuns { first, second, synced })
    }

    fn best(&self) -> Duration {
        self.first.min(self.second)
    }
}

/// A full ingest into a fresh daemon, through the real CLI and HTTP API, then an incremental
/// one after changing a percentage of the image's blocks.
#[derive(Debug)]
struct DaemonIngests {
    full: Duration,
    /// CPU seconds of `forkd serve` during the full ingest.
    daemon_cpu: f64,
    /// CPU seconds of the `forkd ingest` client during the full ingest.
    cli_cpu: f64,
    /// The full ingest's summary (`show --json`).
    s1: Value,
    /// Bytes the benchmark changed before the incremental ingest.
    changed: u64,
    /// `show --json` of the source, the CLI's first request.
    show: Duration,
    incr: Duration,
    /// The incremental ingest's summary.
    s2: Value,
    /// The data directory's disk usage after both.
    data_usage: u64,
}

impl DaemonIngests {
    fn run(p: &Params, forkd: &Path, dir: &Path, img: &Path, rng: &mut Rng) -> Result<DaemonIngests> {
        let size = p.ingest_size;
        let data = dir.join("data");
        let mut d = Daemon::start(forkd, &data)?;
        d.cli(&["source", "create", "src", "--size", &size.to_string()])?;
        let img_s = img.to_str().ok_or_else(|| anyhow!("non-UTF-8 scratch path"))?;
        let daemon_cpu0 = proc_cpu(&d.pid().to_string())?.0;
        let cli_cpu0 = proc_cpu("self")?.1;
        let t = Instant::now();
        d.cli(&["ingest", "src", "--from", img_s])?;
        let full = t.elapsed();
        let daemon_cpu = proc_cpu(&d.pid().to_string())?.0 - daemon_cpu0;
        let cli_cpu = proc_cpu("self")?.1 - cli_cpu0;
        let s1 = last_ingest(&d, "src")?;
        eprintln!("[ingest] full ingest: {:.2}s, summary {s1}", full.as_secs_f64());

        let changed = change_blocks(img, size, p.ingest_change_pct, rng)?;
        // What the CLI asks before streaming (GET /v1/volumes/src, which computes unique bytes
        // for the volume and its snapshots), timed on its own.
        let t = Instant::now();
        d.cli(&["show", "src", "--json"])?;
        let show = t.elapsed();
        let t = Instant::now();
        d.cli(&["ingest", "src", "--from", img_s])?;
        let incr = t.elapsed();
        let s2 = last_ingest(&d, "src")?;
        eprintln!("[ingest] incremental ingest: {:.2}s, summary {s2}", incr.as_secs_f64());
        let data_usage = disk_usage(&data);
        d.stop();
        drop(d);
        std::fs::remove_dir_all(&data)?;
        Ok(DaemonIngests { full, daemon_cpu, cli_cpu, s1, changed, show, incr, s2, data_usage })
    }
}

/// Change `pct` percent of the image's 4 KiB blocks (at least one) at random; the bytes changed.
fn change_blocks(img: &Path, size: u64, pct: f64, rng: &mut Rng) -> Result<u64> {
    let nblocks = size / BS;
    let k = ((nblocks as f64 * pct / 100.0).round() as u64).max(1);
    let changed_blocks = rng.sample(nblocks, k);
    let f = OpenOptions::new().write(true).open(img)?;
    let mut block = vec![0u8; BS as usize];
    for &b in &changed_blocks {
        rng.fill(&mut block);
        f.write_all_at(&block, b * BS)?;
    }
    Ok(k * BS)
}

/// The image copied with plain pread/pwrite into a new file, no sync: the buffered-write floor.
fn copy_floor(img: &Path, copy: &Path, size: u64) -> Result<Duration> {
    let src = File::open(img)?;
    let dst = File::create(copy)?;
    let mut buf = vec![0u8; (4 * MIB) as usize];
    let t = Instant::now();
    let mut off = 0;
    while off < size {
        let n = (size - off).min(4 * MIB) as usize;
        src.read_exact_at(&mut buf[..n], off)?;
        dst.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    let d = t.elapsed();
    drop(dst);
    std::fs::remove_file(copy)?;
    Ok(d)
}

/// The image ingested through the library into a fresh store, 4 MiB at a time.
#[derive(Debug)]
struct LibraryIngest {
    total: Duration,
    /// `finish_ingest`, with its durable flush.
    finish: Duration,
    /// Time spent in `Store::ingest_blocks`.
    in_store: Duration,
    /// CPU seconds of this process meanwhile.
    cpu: f64,
}

impl LibraryIngest {
    fn run(dir: &Path, img: &Path, size: u64) -> Result<LibraryIngest> {
        let cpu0 = proc_cpu("self")?.0;
        let sdir = dir.join("lib");
        let store = Store::open(&sdir)?;
        store.op(|c| c.create_source("src", size))?;
        let src = File::open(img)?;
        let mut buf = vec![0u8; (4 * MIB) as usize];
        let t = Instant::now();
        store.op(|c| c.begin_ingest("src"))?;
        let mut in_store = Duration::ZERO;
        let mut off = 0;
        while off < size {
            let n = (size - off).min(4 * MIB) as usize;
            src.read_exact_at(&mut buf[..n], off)?;
            let ts = Instant::now();
            store.ingest_blocks("src", off / BS, Some(&buf[..n]), n as u64 / BS)?;
            in_store += ts.elapsed();
            off += n as u64;
        }
        let tf = Instant::now();
        store.op(|c| c.finish_ingest("src", Default::default()))?;
        let finish = tf.elapsed();
        let total = t.elapsed();
        drop(store);
        std::fs::remove_dir_all(&sdir)?;
        let cpu = proc_cpu("self")?.0 - cpu0;
        Ok(LibraryIngest { total, finish, in_store, cpu })
    }
}

fn report_ingest(rep: &mut Report, p: &Params, cp: &CpRuns, d: &DaemonIngests, floor: Duration, lib: &LibraryIngest) {
    const B: &str = "ingest";
    let size = p.ingest_size;
    let mib = size as f64 / MIB as f64;
    let full = d.full;
    let get = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0) as f64;
    rep.info(B, &format!("cp {}, run 1, no sync", hsize(size)), mib / cp.first.as_secs_f64(), "MiB/s");
    rep.info(B, "cp, run 2, no sync", mib / cp.second.as_secs_f64(), "MiB/s");
    rep.info(B, "cp + sync", mib / cp.synced.as_secs_f64(), "MiB/s");
    rep.info(B, "full forkd ingest (wall, includes its final fsync)", mib / full.as_secs_f64(), "MiB/s");
    rep.info(B, "full ingest: daemon-side duration_ms", get(&d.s1, "duration_ms"), "ms");
    rep.goal(
        B,
        "full ingest throughput / cp (best of 2)",
        cp.best().as_secs_f64() / full.as_secs_f64(),
        "x",
        Cmp::Ge,
        0.8,
        ">= 0.8x",
    );
    rep.info(
        B,
        "full ingest throughput / slower cp run",
        cp.first.max(cp.second).as_secs_f64() / full.as_secs_f64(),
        "x",
    );
    rep.info(B, "full ingest throughput / (cp + sync)", cp.synced.as_secs_f64() / full.as_secs_f64(), "x");
    let gib4 = size as f64 / GIB as f64;
    rep.info(B, "full ingest: CPU of forkd serve per GiB", d.daemon_cpu / gib4, "s/GiB");
    rep.info(B, "full ingest: CPU of the forkd ingest client per GiB", d.cli_cpu / gib4, "s/GiB");
    rep.info(B, "breakdown: library ingest CPU per GiB", lib.cpu / gib4, "s/GiB");
    rep.info(B, "breakdown: pread + pwrite into a new file, no sync", mib / floor.as_secs_f64(), "MiB/s");
    rep.info(B, "breakdown: library ingest (Store::ingest_blocks + finish)", mib / lib.total.as_secs_f64(), "MiB/s");
    rep.info(B, "breakdown: library ingest, time in ingest_blocks", ms(lib.in_store), "ms");
    rep.info(B, "breakdown: library ingest, finish_ingest (durable flush)", ms(lib.finish), "ms");
    rep.info(B, "data dir after full + incremental ingest", d.data_usage as f64 / MIB as f64, "MiB");
    rep.info(B, &format!("incremental ingest ({}% of blocks changed), wall", p.ingest_change_pct), ms(d.incr), "ms");
    rep.info(B, "incremental: daemon-side duration_ms", get(&d.s2, "duration_ms"), "ms");
    rep.info(B, "show --json of the source (the CLI's first request)", ms(d.show), "ms");
    rep.info(B, "incremental: bytes changed (by the benchmark)", d.changed as f64 / MIB as f64, "MiB");
    rep.info(B, "incremental: changed_bytes (reported)", get(&d.s2, "changed_bytes") / MIB as f64, "MiB");
    let sent = get(&d.s2, "sent_bytes");
    let limit = 1.05 * d.changed as f64 + MIB as f64;
    rep.goal(
        B,
        "incremental: sent_bytes",
        sent / MIB as f64,
        "MiB",
        Cmp::Le,
        limit / MIB as f64,
        &format!("<= 1.05 x changed + 1 MiB = {:.2} MiB", limit / MIB as f64),
    );
    if free_page_reporting() {
        rep.note(
            B,
            "this machine is a VM with virtio-balloon free page reporting: buffered writes into \
             new page-cache pages (cp, the extent file) vary several-fold from run to run",
        );
    }
    rep.note(
        B,
        "cp is timed without sync (its data may still be in the page cache when it returns), while \
         forkd ingest ends with a durable flush (fdatasync of the extent file + the metadata engine's durable commit); \
         'cp + sync' is shown for comparison",
    );
}

/// Live bytes (keys + values) in the store's metadata engine, by key prefix. The store must be
/// closed: this opens `DIR/meta` directly with `engine`.
fn meta_live(dir: &Path, engine: metakv::Engine) -> Result<BTreeMap<char, (u64, u64)>> {
    let kv = metakv::open(engine, &dir.join("meta"))?;
    let mut out: BTreeMap<char, (u64, u64)> = BTreeMap::new();
    kv.scan_prefix(b"", &mut |k, v| {
        let e = out.entry(k.first().map_or('?', |&c| c as char)).or_default();
        e.0 += 1;
        e.1 += (k.len() + v.len()) as u64;
    })?;
    Ok(out)
}

fn report_meta_live(rep: &mut Report, what: &str, live: &BTreeMap<char, (u64, u64)>, on_disk: u64) {
    const B: &str = "space";
    let total: u64 = live.values().map(|v| v.1).sum();
    let part = |c: char| live.get(&c).copied().unwrap_or_default();
    let mb = |b: u64| b as f64 / MIB as f64;
    rep.info(B, &format!("{what}: live metadata (keys + values)"), mb(total), "MiB");
    rep.info(B, &format!("{what}: of which tree nodes ('n', {} keys)", part('n').0), mb(part('n').1), "MiB");
    rep.info(B, &format!("{what}: of which slot refcounts ('s', {} keys)", part('s').0), mb(part('s').1), "MiB");
    rep.info(B, &format!("{what}: meta/ on disk / live metadata"), on_disk as f64 / total.max(1) as f64, "x");
}

// ----- 4. space -------------------------------------------------------------------------------

fn bench_space(p: &Params, scratch: &Path, rep: &mut Report) -> Result<()> {
    const B: &str = "space";
    let dir = scratch.join("space");
    fresh_dir(&dir)?;
    let mut rng = Rng::new(4);
    let store = Store::open(&dir)?;
    let size = p.space_size;
    let nblocks = size / BS;
    let t = Instant::now();
    let snap = library_source(&store, "src", size, size, 1024, &mut rng)?;
    eprintln!("[space] {} source written in {:.1}s", hsize(size), t.elapsed().as_secs_f64());
    let after_source = disk_usage(&dir);

    let per_clone = (nblocks as f64 * p.space_pct / 100.0).round() as u64;
    let (writes, wt) = rewrite_in_clones(&store, &snap, p, per_clone, &mut rng)?;
    let written = size + p.space_clones as u64 * per_clone * BS;
    let used = disk_usage(&dir);
    let meta = disk_usage(&dir.join("meta"));
    let extents = disk_usage(&dir.join("extents.0"));
    eprintln!(
        "[space] {} clones x {} blocks in {writes} writes, {:.1}s; du {} MiB (meta {} MiB, extents {} MiB)",
        p.space_clones,
        per_clone,
        wt.as_secs_f64(),
        used / MIB,
        meta / MIB,
        extents / MIB
    );
    let gib = |b: u64| b as f64 / GIB as f64;
    rep.info(B, "data written (source + clone rewrites)", gib(written), "GiB");
    rep.info(
        B,
        "clone rewrites: store.write throughput",
        (written - size) as f64 / MIB as f64 / wt.as_secs_f64(),
        "MiB/s",
    );
    rep.info(B, "clone rewrites: writes per second", writes as f64 / wt.as_secs_f64(), "/s");
    rep.info(B, "du of data dir, source only", gib(after_source), "GiB");
    rep.info(B, "du of data dir with clones", gib(used), "GiB");
    rep.goal(B, "du with clones / data written", used as f64 / written as f64, "x", Cmp::Le, 1.05, "<= 1.05x");
    rep.info(B, "extents.0 on disk / data written", extents as f64 / written as f64, "x");
    rep.info(B, "meta/ bytes per GiB of data written", meta as f64 / MIB as f64 / gib(written), "MiB/GiB");
    let engine = store.meta_engine();
    drop(store);
    let live = meta_live(&dir, engine)?;
    report_meta_live(rep, "with clones", &live, meta);
    space_after_delete(p, &dir, rep)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Clone `snap` `p.space_clones` times and rewrite `per_clone` random blocks of each, in runs
/// of up to 64 MiB; then flush. The number of writes, and the time it all took.
fn rewrite_in_clones(store: &Store, snap: &str, p: &Params, per_clone: u64, rng: &mut Rng) -> Result<(u64, Duration)> {
    let nblocks = p.space_size / BS;
    let mut buf = vec![0u8; MIB as usize * 64];
    let t = Instant::now();
    let mut writes = 0u64;
    for i in 0..p.space_clones {
        let name = format!("c{i}");
        store.op(|c| c.clone_volume(snap, &name))?;
        for (first, n) in runs(&rng.sample(nblocks, per_clone), 16384) {
            let chunk = &mut buf[..(n * BS) as usize];
            rng.fill(chunk);
            store.write(&name, first * BS, chunk)?;
            writes += 1;
        }
    }
    store.flush()?;
    Ok((writes, t.elapsed()))
}

/// Delete the clones of the space benchmark (the store in `dir` closed) and report what space
/// comes back, then what a restart leaves.
fn space_after_delete(p: &Params, dir: &Path, rep: &mut Report) -> Result<()> {
    const B: &str = "space";
    let size = p.space_size;
    let gib = |b: u64| b as f64 / GIB as f64;
    let store = Store::open(dir)?;
    let t = Instant::now();
    for i in 0..p.space_clones {
        store.op(|c| c.delete(&format!("c{i}")))?;
    }
    // The daemon's collector does this in the background; the store alone does it here.
    store.collect_garbage()?;
    store.flush()?;
    store.flush()?;
    let dt = t.elapsed();
    let used2 = disk_usage(dir);
    let meta2 = disk_usage(&dir.join("meta"));
    let extents2 = disk_usage(&dir.join("extents.0"));
    eprintln!(
        "[space] deleted the clones in {:.1}s; du {} MiB (meta {} MiB, extents {} MiB)",
        dt.as_secs_f64(),
        used2 / MIB,
        meta2 / MIB,
        extents2 / MIB
    );
    rep.info(B, "delete all clones", ms(dt), "ms");
    rep.info(B, "du after deleting the clones", gib(used2), "GiB");
    rep.goal(B, "du after delete / source size", used2 as f64 / size as f64, "x", Cmp::Le, 1.05, "<= 1.05x");
    rep.info(B, "extents.0 on disk after delete / source size", extents2 as f64 / size as f64, "x");
    rep.info(B, "meta/ after delete", meta2 as f64 / MIB as f64, "MiB");
    let engine = store.meta_engine();
    drop(store);
    let live = meta_live(dir, engine)?;
    report_meta_live(rep, "after delete", &live, meta2);
    // sled may reclaim on reopen: show what a restart leaves.
    let store = Store::open(dir)?;
    store.flush()?;
    drop(store);
    let meta3 = disk_usage(&dir.join("meta"));
    rep.info(B, "meta/ after delete and reopen", meta3 as f64 / MIB as f64, "MiB");
    Ok(())
}

// ----- 5. memory ------------------------------------------------------------------------------

fn bench_memory(p: &Params, scratch: &Path, forkd: &Path, rep: &mut Report) -> Result<()> {
    const B: &str = "memory";
    let dir = scratch.join("memory");
    fresh_dir(&dir)?;
    let mut rng = Rng::new(5);
    // A sparse 1 GiB image with data in 64 KiB runs spread over it.
    let img = dir.join("image");
    {
        let f = File::create(&img)?;
        f.set_len(GIB)?;
        let run = 16u64;
        let nruns = (p.memory_data / BS).div_ceil(run).max(1);
        let stride = GIB / BS / nruns;
        let mut buf = vec![0u8; (run * BS) as usize];
        for r in 0..nruns {
            rng.fill(&mut buf);
            f.write_all_at(&buf, (r * stride + rng.below(stride - run + 1)) * BS)?;
        }
    }
    let mut d = Daemon::start(forkd, &dir.join("data"))?;
    d.cli(&["source", "create", "src", "--size", "1G"])?;
    d.cli(&["ingest", "src", "--from", img.to_str().ok_or_else(|| anyhow!("non-UTF-8 scratch path"))?])?;
    let rss0 = d.proc_status("VmRSS")?;
    let mut lat = Vec::with_capacity(p.clones);
    let t = Instant::now();
    for i in 0..p.clones {
        let t = Instant::now();
        d.post("/v1/clones", &json!({"from": "src@1", "name": format!("m{i}")}))?;
        lat.push(ms(t.elapsed()));
    }
    let total = t.elapsed();
    let rss = d.proc_status("VmRSS")?;
    let hwm = d.proc_status("VmHWM")?;
    let t = Instant::now();
    let out = d.cli(&["list", "--json"])?;
    let list_t = t.elapsed();
    let n = serde_json::from_str::<Value>(&out)?["volumes"].as_array().map_or(0, Vec::len);
    if n != p.clones + 1 {
        bail!("list --json returned {n} volumes, expected {}", p.clones + 1);
    }
    let rss_after_list = d.proc_status("VmRSS")?;
    d.stop();
    drop(d);
    let c = stats(&lat);
    let mb = |b: u64| b as f64 / MIB as f64;
    rep.info(B, "daemon VmRSS after ingest, before clones", mb(rss0), "MiB");
    rep.info(B, &format!("clone over HTTP, median of {}", p.clones), c.median, "ms");
    rep.info(B, "clone over HTTP, p90", c.p90, "ms");
    rep.info(B, &format!("{} clones created in", p.clones), total.as_secs_f64(), "s");
    rep.goal(B, &format!("daemon VmRSS with {} clones", p.clones), mb(rss), "MiB", Cmp::Le, 256.0, "<= 256 MiB");
    rep.info(B, "daemon VmHWM (peak RSS)", mb(hwm), "MiB");
    rep.info(B, &format!("forkd list --json with {} volumes (wall, incl. process start)", n), ms(list_t), "ms");
    rep.info(B, "daemon VmRSS after list", mb(rss_after_list), "MiB");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

// ----- main -----------------------------------------------------------------------------------

const ALL: [&str; 5] = ["create", "read", "ingest", "space", "memory"];

fn main() {
    if let Err(e) = run() {
        eprintln!("forkd-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args = Args::parse();
    let p = Params::from(&args)?;
    let selected = select(&args.benches)?;
    let needs_daemon = selected.iter().any(|b| *b == "ingest" || *b == "memory");
    let forkd = match &args.forkd {
        Some(f) => f.clone(),
        None => std::env::current_exe()?.with_file_name("forkd"),
    };
    if needs_daemon && !forkd.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p forkd-daemon) or pass --forkd PATH",
            forkd.display()
        );
    }
    let stale_note = if needs_daemon { stale_binary(&forkd) } else { None };
    let scratch = args.dir.clone();
    prepare_scratch(&scratch)?;

    let started = Instant::now();
    let mut rep = Report::default();
    if let Some(n) = stale_note {
        rep.note("setup", n);
    }
    for b in &selected {
        run_bench(b, &p, &scratch, &forkd, &mut rep);
    }
    if !args.keep {
        let _ = std::fs::remove_dir_all(&scratch);
    }

    let table = markdown(&rep.rows);
    let misses = print_results(&rep, &table, started);
    let doc = json!({
        "params": p,
        "benches": selected,
        "host": host_info(),
        "scratch": scratch,
        "elapsed_s": started.elapsed().as_secs_f64(),
        "rows": rep.rows,
        "notes": rep.notes,
        "failures": rep.failures,
        "markdown": table,
    });
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("results written to {}", args.out.display());
    if !rep.failures.is_empty() {
        std::process::exit(2);
    }
    if args.fail_on_miss && misses > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// The benchmarks named on the command line, in order, each once (`all` is every one).
fn select(benches: &[String]) -> Result<Vec<&'static str>> {
    let mut selected: Vec<&'static str> = Vec::new();
    for b in benches {
        match b.as_str() {
            "all" => selected.extend(ALL),
            x if ALL.contains(&x) => selected.push(ALL[ALL.iter().position(|a| *a == x).unwrap_or(0)]),
            x => bail!("unknown benchmark `{x}`: use all, {}", ALL.join(", ")),
        }
    }
    selected.dedup();
    Ok(selected)
}

/// `cargo run -p forkd-bench` rebuilds the library but not the `forkd` binary: a warning
/// (printed, and returned for the report) when a source file of the crates it is built from is
/// newer than it.
fn stale_binary(forkd: &Path) -> Option<String> {
    let bin = std::fs::metadata(forkd).and_then(|m| m.modified()).ok()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let newest = ["daemon", "catalog", "blockmap", "nbd"]
        .iter()
        .filter_map(|c| newest_mtime(&root.join(c).join("src")))
        .max()?;
    if bin >= newest {
        return None;
    }
    let text = format!(
        "{} is older than the daemon's sources: it may not match the library measured \
         here; rebuild it with cargo build --release -p forkd-daemon",
        forkd.display()
    );
    eprintln!("warning: {text}");
    Some(text)
}

/// Empty the scratch directory (refusing one this tool did not create) and mark it as ours.
fn prepare_scratch(scratch: &Path) -> Result<()> {
    if scratch.exists() {
        let empty = std::fs::read_dir(scratch)?.next().is_none();
        if !empty && !scratch.join(".forkd-bench").exists() {
            bail!("{} exists and is not a forkd-bench scratch directory; choose another --dir", scratch.display());
        }
        std::fs::remove_dir_all(scratch)?;
    }
    std::fs::create_dir_all(scratch)?;
    File::create(scratch.join(".forkd-bench"))?;
    Ok(())
}

/// Run one benchmark, with how busy the rest of the machine was meanwhile; a failure is
/// recorded in the report, not returned.
fn run_bench(b: &str, p: &Params, scratch: &Path, forkd: &Path, rep: &mut Report) {
    eprintln!("[{b}] running");
    let t = Instant::now();
    let (busy0, steal0, total0) = machine_cpu();
    let (own0, kids0) = proc_cpu("self").unwrap_or_default();
    let r = match b {
        "create" => bench_create(p, scratch, rep),
        "read" => bench_read(p, scratch, rep),
        "ingest" => bench_ingest(p, scratch, forkd, rep),
        "space" => bench_space(p, scratch, rep),
        "memory" => bench_memory(p, scratch, forkd, rep),
        _ => unreachable!(),
    };
    let (busy1, steal1, total1) = machine_cpu();
    let (own1, kids1) = proc_cpu("self").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
    let wall_ticks = (total1 - total0).max(1.0) / cores;
    let tck = clk_tck();
    let ours = (own1 - own0 + kids1 - kids0) * tck;
    let others = ((busy1 - busy0) - ours).max(0.0) / wall_ticks;
    rep.info(b, &format!("machine: CPU cores busy with other processes meanwhile (of {cores})"), others, "");
    if steal1 > steal0 {
        rep.info(b, "machine: CPU stolen by the hypervisor (cores)", (steal1 - steal0) / wall_ticks, "");
    }
    match r {
        Ok(()) => eprintln!("[{b}] done in {:.1}s", t.elapsed().as_secs_f64()),
        Err(e) => {
            eprintln!("[{b}] FAILED: {e:#}");
            rep.failures.push(format!("{b}: {e:#}"));
        }
    }
}

/// Print the table, the notes, the failures and the tally; the number of goals missed.
fn print_results(rep: &Report, table: &str, started: Instant) -> usize {
    println!("{table}");
    for n in &rep.notes {
        println!("- {n}");
    }
    for f in &rep.failures {
        println!("- FAILED {f}");
    }
    let misses = rep.rows.iter().filter(|r| r.pass == Some(false)).count();
    let passes = rep.rows.iter().filter(|r| r.pass == Some(true)).count();
    println!(
        "\n{passes} goals met, {misses} missed, {} benchmarks failed; {:.0}s",
        rep.failures.len(),
        started.elapsed().as_secs_f64()
    );
    misses
}

/// The machine the results come from.
fn host_info() -> Value {
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "balloon_free_page_reporting": free_page_reporting(),
        "git": git_describe(),
    })
}
