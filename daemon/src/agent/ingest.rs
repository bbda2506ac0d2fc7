//! `forkd ingest NAME --from PATH`: the agent side of ingest.
//!
//! It reads the image front to back, hashes every 4 KiB block, compares it with the digest the
//! daemon holds for the source's latest snapshot (fetched once, in block order, and walked in
//! step with the image) and streams only the changed blocks, each with its crc32. Reading and
//! hashing run on their own thread, sending on the caller's: the two overlap through a small
//! bounded queue of encoded frames. Zero blocks are never sent; a block that became zero is
//! sent as a zero frame without payload.
//!
//! With `--changed-blocks FILE` (see [`crate::agent::changed_blocks`]) only the listed ranges are read,
//! still compared block by block with the daemon's digests, so a listed block that did not
//! change is not sent either.
//!
//! With `--from nbd://HOST:PORT/EXPORT` the image is read through [`crate::nbd_client`]; adding
//! `--dirty-bitmap NAME` reads only the ranges qemu's dirty bitmap NAME marks (NBD block status),
//! fed to the same ranges-only scan as `--changed-blocks`. The scan reads through [`ReadAt`].

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::json;

use super::IngestArgs;
use crate::agent::changed_blocks;
use crate::api::client::{enc, Client};
use crate::api::frames::{encode_data, encode_end, encode_zero, MAX_FRAME_BLOCKS};
use crate::units::humanize;

const BS: usize = 4096;
/// Bytes read from the image at a time.
const CHUNK: usize = 4 << 20;

/// Progress shared between the reader thread and the reporter.
#[derive(Debug, Default)]
struct Progress {
    scanned: AtomicU64,
    changed: AtomicU64,
}

/// Frames queued for sending, as a `Read` for the HTTP body.
struct FrameReader {
    rx: Receiver<anyhow::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for FrameReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(Ok(buf)) => {
                    self.cur = buf;
                    self.pos = 0;
                }
                // A read error ends the body early; the daemon then abandons the ingest.
                Ok(Err(e)) => return Err(std::io::Error::other(e.to_string())),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Size of a file or block device.
fn image_size(f: &File, path: &Path) -> anyhow::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f.try_clone()?;
    f.seek(SeekFrom::End(0)).with_context(|| format!("cannot find the size of {}", path.display()))
}

/// Where the scan reads the image from: a file or block device, or an NBD export.
pub trait ReadAt: Send {
    /// Fill `buf` from byte `off` of the image.
    fn read_at_exact(&self, buf: &mut [u8], off: u64) -> std::io::Result<()>;
}

impl ReadAt for File {
    fn read_at_exact(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.read_exact_at(buf, off)
    }
}

impl ReadAt for crate::agent::nbd_source::NbdClient {
    fn read_at_exact(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.read_at(buf, off).map_err(|e| std::io::Error::other(format!("{e:#}")))
    }
}

/// Run `forkd ingest`.
pub fn run(client: &Client, args: &IngestArgs, json_out: bool) -> anyhow::Result<()> {
    let name = &args.name;
    if args.abort {
        client.delete_json(&format!("/v1/sources/{}/ingest", enc(name)))?;
        println!("abandoned the running ingest into {name}");
        return Ok(());
    }
    // --lvm/--freeze: the guards undo the snapshot/freeze when `consistent` is dropped.
    let consistent = crate::agent::consistent::prepare(
        args.from.as_deref(),
        args.lvm.as_deref(),
        args.freeze.as_deref(),
        &args.lvm_snapshot_size,
        &args.lvm_prefix,
    )?;
    let path = consistent.path.clone();
    let path = path.as_path();
    // --from nbd://HOST:PORT/EXPORT reads an NBD export, with --dirty-bitmap only where it changed.
    let nbd_url = path.to_str().filter(|s| s.starts_with("nbd://"));
    if args.dirty_bitmap.is_some() && nbd_url.is_none() {
        bail!(
            "--dirty-bitmap needs --from nbd://HOST:PORT/EXPORT (qemu dirty bitmaps are read over NBD), not {}",
            path.display()
        );
    }
    let (file, size, dirty): (Box<dyn ReadAt>, u64, _) = if let Some(url) = nbd_url {
        let nbd = crate::agent::nbd_source::NbdClient::connect(url, args.dirty_bitmap.as_deref())?;
        let size = nbd.size();
        let dirty = match &args.dirty_bitmap {
            Some(b) => Some(nbd.dirty_ranges(BS as u64).with_context(|| format!("reading dirty bitmap {b} of {url}"))?),
            None => None,
        };
        (Box::new(nbd), size, dirty)
    } else {
        if path.is_dir() {
            bail!("cannot read {}: it is a directory", path.display());
        }
        let file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let size = image_size(&file, path)?;
        (Box::new(file), size, None)
    };
    // The byte ranges to read: those --changed-blocks lists or the dirty bitmap marks, else all.
    let ranges = match (&args.changed_blocks, dirty) {
        (Some(list), _) => read_changed_blocks(list, size)?,
        (None, Some(dirty)) => dirty,
        (None, None) => vec![(0, size)],
    };
    // `space=false`: the agent needs no space accounting, which walks the whole tree.
    let vol = client.get_json(&format!("/v1/volumes/{}?space=false", enc(name)))?;
    if vol["kind"] != "source" {
        bail!("`{name}` is a clone; only sources are fed by ingest");
    }
    if args.changed_blocks.is_some() && vol["snapshots"].as_array().is_some_and(Vec::is_empty) {
        bail!("--changed-blocks lists changes since an earlier ingest, but `{name}` has none: ingest the whole image first");
    }
    if args.dirty_bitmap.is_some() && vol["snapshots"].as_array().is_some_and(Vec::is_empty) {
        bail!("--dirty-bitmap marks changes since an earlier ingest, but `{name}` has none: ingest the whole export first");
    }
    let vol_size = vol["size_bytes"].as_u64().unwrap_or(0);
    if size != vol_size {
        let img = path.display();
        if !size.is_multiple_of(BS as u64) {
            bail!("{img} is {size} bytes, not a multiple of 4096: forkd volumes are whole 4 KiB blocks");
        }
        if size < vol_size {
            bail!("{img} is {size} bytes but source `{name}` is {vol_size} bytes: sizes must match (sources never shrink)");
        }
        if !args.resize {
            bail!(
                "{img} is {size} bytes but source `{name}` is {vol_size} bytes: give --resize to grow the source first"
            );
        }
        client.post_json(&format!("/v1/sources/{}/resize", enc(name)), &json!({ "size": size }))?;
        if json_out {
            println!("{}", json!({"event": "resized", "previous_size_bytes": vol_size, "size_bytes": size}));
        } else {
            println!("grew source {name} from {} to {}", humanize(vol_size), humanize(size));
        }
    }
    // The digests of the latest snapshot, (block, digest) in block order: all of them for a
    // full scan, only those of the ranges to read otherwise (the cost then follows the ranges,
    // not the volume).
    let raw = if ranges.len() == 1 && ranges[0] == (0, size) {
        client.get_bytes(&format!("/v1/sources/{}/digests", enc(name)))?
    } else {
        let body: Vec<u8> = ranges
            .iter()
            .flat_map(|&(off, len)| [off / BS as u64, len / BS as u64])
            .flat_map(u64::to_le_bytes)
            .collect();
        client.post_bytes(&format!("/v1/sources/{}/digests", enc(name)), &body)?
    };
    if raw.len() % 16 != 0 {
        bail!("the daemon sent a malformed digest list");
    }
    let old: Vec<(u64, u64)> = raw
        .chunks_exact(16)
        .map(|c| {
            let (b, d) = c.split_at(8);
            (u64::from_le_bytes(b.try_into().unwrap_or_default()), u64::from_le_bytes(d.try_into().unwrap_or_default()))
        })
        .collect();
    let progress = Arc::new(Progress::default());
    let (tx, rx) = sync_channel::<anyhow::Result<Vec<u8>>>(8);
    let p = progress.clone();
    let (to_scan, nranges) = (ranges.iter().map(|r| r.1).sum::<u64>(), ranges.len());
    let reader = std::thread::spawn(move || {
        if let Err(e) = scan(&*file, &ranges, &old, &p, &tx) {
            let _ = tx.send(Err(e));
        }
    });
    let started = Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reporter = {
        let (p, done) = (progress.clone(), done.clone());
        std::thread::spawn(move || report(&p, size, to_scan, started, &done, json_out))
    };
    let result =
        client.post_stream(&format!("/v1/sources/{}/ingest", enc(name)), FrameReader { rx, cur: Vec::new(), pos: 0 });
    done.store(true, Ordering::Relaxed);
    let _ = reporter.join();
    let _ = reader.join();
    drop(consistent);
    let resp = result?;
    let s = &resp["summary"];
    if json_out {
        let mut done = json!({"event": "done", "snapshot": resp["snapshot"], "summary": s});
        if args.changed_blocks.is_some() || args.dirty_bitmap.is_some() {
            done["ranges"] = json!(nranges);
        }
        println!("{done}");
    } else {
        let plural = if nranges == 1 { "" } else { "s" };
        let read = match (&args.changed_blocks, &args.dirty_bitmap) {
            (Some(list), _) => format!(" ({nranges} range{plural} from {})", list.display()),
            (None, Some(b)) => format!(" ({nranges} range{plural} from dirty bitmap {b})"),
            (None, None) => String::new(),
        };
        println!(
            "ingested {} into {}: scanned {}{read}, changed {}, sent {} in {:.1}s",
            path.display(),
            resp["snapshot"].as_str().unwrap_or("?"),
            humanize(s["scanned_bytes"].as_u64().unwrap_or(0)),
            humanize(s["changed_bytes"].as_u64().unwrap_or(0)),
            humanize(s["sent_bytes"].as_u64().unwrap_or(0)),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Read and parse a `--changed-blocks` file; errors are `FILE:LINE: what is wrong`.
fn read_changed_blocks(list: &Path, size: u64) -> anyhow::Result<Vec<(u64, u64)>> {
    let bytes = std::fs::read(list).with_context(|| format!("cannot read {}", list.display()))?;
    changed_blocks::parse(&String::from_utf8_lossy(&bytes), size)
        .map_err(|e| anyhow!("{}:{}: {}", list.display(), e.line, e.kind))
}

/// Read the image's `ranges` ((offset, length) in bytes, whole blocks, sorted, disjoint), find
/// changed blocks, queue frames. Runs on its own thread.
fn scan<R: ReadAt + ?Sized>(
    file: &R,
    ranges: &[(u64, u64)],
    old: &[(u64, u64)],
    p: &Progress,
    tx: &std::sync::mpsc::SyncSender<anyhow::Result<Vec<u8>>>,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut oi = 0usize; // cursor into `old`
    let mut out = Vec::with_capacity(CHUNK + CHUNK / 256);
    let mut changed = 0u64;
    let mut scanned = 0u64;
    for &(start, len) in ranges {
        // Skip the digests of the blocks before this range.
        oi += old[oi..].partition_point(|d| d.0 < start / BS as u64);
        let end = start.saturating_add(len);
        let mut off = start;
        while off < end {
            let want = usize::try_from((end - off).min(CHUNK as u64)).unwrap_or(CHUNK);
            let chunk = &mut buf[..want];
            file.read_at_exact(chunk, off).with_context(|| format!("reading the image at offset {off}"))?;
            let first = off / BS as u64;
            // Runs of changed data blocks become data frames, blocks that became zero zero frames.
            let mut run_start: Option<usize> = None;
            let mut zero_start: Option<usize> = None;
            let nblocks = want / BS;
            for i in 0..=nblocks {
                let kind = if i == nblocks {
                    0 // flush runs
                } else {
                    let b = first + i as u64;
                    let block = &chunk[i * BS..(i + 1) * BS];
                    while oi < old.len() && old[oi].0 < b {
                        oi += 1;
                    }
                    let prev = (oi < old.len() && old[oi].0 == b).then(|| old[oi].1);
                    if block.iter().all(|&x| x == 0) {
                        if prev.is_some() {
                            2
                        } else {
                            0
                        }
                    } else if prev == Some(catalog::blockmap::block_digest(block)) {
                        0
                    } else {
                        1
                    }
                };
                let full = |s: usize| i - s >= MAX_FRAME_BLOCKS as usize;
                if let Some(s) = run_start.filter(|&s| kind != 1 || full(s)) {
                    encode_data(first + s as u64, &chunk[s * BS..i * BS], &mut out);
                    changed += ((i - s) * BS) as u64;
                    run_start = None;
                }
                if let Some(s) = zero_start.filter(|&s| kind != 2 || full(s)) {
                    encode_zero(first + s as u64, u32::try_from(i - s).unwrap_or(u32::MAX), &mut out);
                    changed += ((i - s) * BS) as u64;
                    zero_start = None;
                }
                match kind {
                    1 if run_start.is_none() => run_start = Some(i),
                    2 if zero_start.is_none() => zero_start = Some(i),
                    _ => {}
                }
            }
            off += want as u64;
            scanned += want as u64;
            p.scanned.store(scanned, Ordering::Relaxed);
            p.changed.store(changed, Ordering::Relaxed);
            if !out.is_empty() {
                let full = std::mem::replace(&mut out, Vec::with_capacity(CHUNK + CHUNK / 256));
                if tx.send(Ok(full)).is_err() {
                    return Ok(()); // the sender stopped; its error is reported there
                }
            }
        }
    }
    encode_end(scanned, changed, &mut out);
    let _ = tx.send(Ok(out));
    Ok(())
}

/// A non-negative rate or duration as a whole number (saturating; NaN is 0).
fn whole(x: f64) -> u64 {
    if x.is_finite() && x > 0.0 {
        // Rates and seconds are far below 2^53, where f64 stops being exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = x.min(u64::MAX as f64) as u64;
        n
    } else {
        0
    }
}

/// Show progress: a status line on a terminal, JSON lines with `--json`, nothing otherwise.
/// `to_scan` is what this run reads: `size`, the image's, unless `--changed-blocks` was given.
fn report(
    p: &Progress,
    size: u64,
    to_scan: u64,
    started: Instant,
    done: &std::sync::atomic::AtomicBool,
    json_out: bool,
) {
    let tty = std::io::stderr().is_terminal();
    if !tty && !json_out {
        return;
    }
    let mut last = Instant::now();
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if last.elapsed() < Duration::from_millis(if json_out { 1000 } else { 250 }) {
            continue;
        }
        last = Instant::now();
        let (scanned, changed) = (p.scanned.load(Ordering::Relaxed), p.changed.load(Ordering::Relaxed));
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let rate = scanned as f64 / secs;
        let eta = if rate > 0.0 { (to_scan.saturating_sub(scanned)) as f64 / rate } else { 0.0 };
        if json_out {
            println!(
                "{}",
                json!({"event": "progress", "scanned_bytes": scanned, "size_bytes": size, "scan_bytes": to_scan, "changed_bytes": changed, "bytes_per_second": whole(rate), "eta_seconds": whole(eta)})
            );
        } else {
            let pct = (scanned * 100).checked_div(to_scan).unwrap_or(100);
            let mut e = std::io::stderr();
            let _ = write!(
                e,
                "\r{pct:3}%  scanned {} of {}  changed {}  {}/s  ETA {:.0}s   ",
                humanize(scanned),
                humanize(to_scan),
                humanize(changed),
                humanize(whole(rate)),
                eta
            );
            let _ = e.flush();
        }
    }
    if tty && !json_out {
        eprintln!();
    }
}
