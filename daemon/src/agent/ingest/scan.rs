//! The scan: read the image's ranges, hash every block, compare it with the daemon's digest
//! and encode the changed ones as frames ([`crate::api::frames`]).
//!
//! The ranges are cut into jobs of at most 4 MiB; a few worker threads (up to the machine's
//! cores, at most [`WORKERS`]) read and hash jobs at once, worker `k` taking jobs `k`, `k + n`,
//! ... and sending each job's frames, as one chunk of the body, on its own bounded channel.
//! The sender takes the chunks round-robin from the workers, so the stream keeps the image's
//! order, reading overlaps hashing and sending, and memory stays bounded (4 chunks per worker
//! in the channels). The sender itself adds the end frame once every job's chunk arrived.
//!
//! The image is read into buffers from a pool ([`crate::api::pool`]); a large data frame goes
//! out as its head followed by a slice of the buffer it was read into, so its payload is not
//! copied between the read and the socket. Small frames (scattered changed blocks) are copied
//! next to their heads instead.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use bytes::Bytes;

use super::report::Progress;
use super::BS;
use crate::api::frames::{encode_data_head, encode_end, encode_zero, MAX_FRAME_BLOCKS};
use crate::api::pool::BufferPool;
use crate::api::upload::Chunks;

/// Bytes of the image one job reads at most (one largest data frame).
const CHUNK: usize = MAX_FRAME_BLOCKS as usize * BS;

/// Scan workers at most (fewer on a machine with fewer cores).
const WORKERS: usize = 4;

/// Chunks each worker may have waiting for the sender.
const QUEUE: usize = 4;

/// A data frame with a payload smaller than this is copied next to its head rather than sent
/// as a slice of its read buffer (which it would keep from being reused).
const INLINE: usize = 64 << 10;

/// One chunk of the body: its pieces, sent together.
pub(super) type Chunk = Vec<Bytes>;

/// A job: pieces `(offset, length)` of the ranges to read, in order, [`CHUNK`] bytes at most.
type Job = Vec<(u64, u64)>;

/// Where the scan reads the image from: a file or block device, or an NBD export. Shared by
/// the scan's workers.
pub trait ReadAt: Send + Sync {
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

/// What the scan reads and compares with.
pub(super) struct Input {
    /// The image.
    pub(super) reader: Arc<dyn ReadAt>,
    /// Byte ranges to read: whole blocks, sorted, disjoint.
    pub(super) ranges: Vec<(u64, u64)>,
    /// (block, digest) of what the daemon holds in those ranges, in block order.
    pub(super) old: Arc<Vec<(u64, u64)>>,
}

/// Start the scan's workers; returns the body they produce and their threads (which end
/// once the body is read to its end or dropped).
pub(super) fn start(input: Input, p: &Arc<Progress>) -> (FrameChunks, Vec<JoinHandle<()>>) {
    let jobs = Arc::new(jobs(&input.ranges));
    let scanned = input.ranges.iter().map(|r| r.1).sum();
    let n = std::thread::available_parallelism().map_or(1, usize::from).clamp(1, WORKERS).min(jobs.len().max(1));
    let pool = BufferPool::new(CHUNK, 64, n * (QUEUE + 2));
    let (mut rxs, mut workers) = (Vec::new(), Vec::new());
    for k in 0..n {
        let (tx, rx) = sync_channel(QUEUE);
        let (jobs, reader, old, p, pool) =
            (jobs.clone(), input.reader.clone(), input.old.clone(), p.clone(), pool.clone());
        workers.push(std::thread::spawn(move || {
            for job in jobs.iter().skip(k).step_by(n) {
                let chunk = scan_job(&*reader, job, &old, &p, &pool);
                let failed = chunk.is_err();
                if tx.send(chunk).is_err() || failed {
                    return; // the sender stopped (its error is reported there), or this did
                }
            }
        }));
        rxs.push(rx);
    }
    let body = FrameChunks { rxs, jobs: jobs.len(), next: 0, scanned, progress: p.clone(), ended: false };
    (body, workers)
}

/// Cut `ranges` into jobs of at most [`CHUNK`] bytes (a large range into several, small
/// ranges gathered into one).
fn jobs(ranges: &[(u64, u64)]) -> Vec<Job> {
    let (mut jobs, mut job, mut bytes): (Vec<Job>, Job, u64) = (Vec::new(), Vec::new(), 0);
    for &(start, len) in ranges {
        let end = start.saturating_add(len);
        let mut off = start;
        while off < end {
            if bytes == CHUNK as u64 {
                jobs.push(std::mem::take(&mut job));
                bytes = 0;
            }
            let n = (end - off).min(CHUNK as u64 - bytes);
            job.push((off, n));
            bytes += n;
            off += n;
        }
    }
    if !job.is_empty() {
        jobs.push(job);
    }
    jobs
}

/// Read, hash, compare and encode one job; returns its frames as one chunk of the body.
fn scan_job(
    file: &dyn ReadAt,
    job: &Job,
    old: &[(u64, u64)],
    p: &Progress,
    pool: &BufferPool,
) -> anyhow::Result<Chunk> {
    let mut buf = pool.take();
    for &(off, len) in job {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        file.read_at_exact(buf.unfilled(len), off).with_context(|| format!("reading the image at offset {off}"))?;
        buf.advance(len);
    }
    let data = buf.freeze();
    let (mut out, mut digests, mut at) = (Out::default(), Digests { old, at: 0 }, 0);
    let (mut scanned, mut changed) = (0, 0);
    for &(off, len) in job {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        digests.seek(off / BS as u64);
        changed += encode_chunk(&data.slice(at..at + len), off, &mut digests, &mut out);
        at += len;
        scanned += len as u64;
    }
    p.scanned.fetch_add(scanned, Ordering::Relaxed);
    p.changed.fetch_add(changed, Ordering::Relaxed);
    Ok(out.take())
}

/// The body: the workers' chunks in job order, then the end frame.
pub(super) struct FrameChunks {
    /// Worker `k`'s chunks: jobs `k`, `k + n`, ...
    rxs: Vec<Receiver<anyhow::Result<Chunk>>>,
    jobs: usize,
    /// The next job to send.
    next: usize,
    /// Bytes of the image the jobs read.
    scanned: u64,
    progress: Arc<Progress>,
    ended: bool,
}

impl Chunks for FrameChunks {
    fn next_chunk(&mut self) -> std::io::Result<Option<Chunk>> {
        if self.next == self.jobs {
            if std::mem::replace(&mut self.ended, true) {
                return Ok(None);
            }
            // Every job's chunk arrived: the workers' counts are complete.
            let mut end = Vec::new();
            encode_end(self.scanned, self.progress.changed.load(Ordering::Relaxed), &mut end);
            return Ok(Some(vec![Bytes::from(end)]));
        }
        match self.rxs[self.next % self.rxs.len()].recv() {
            Ok(Ok(chunk)) => {
                self.next += 1;
                Ok(Some(chunk))
            }
            // A read error ends the body early; the daemon then keeps what arrived.
            Ok(Err(e)) => Err(std::io::Error::other(format!("{e:#}"))),
            Err(_) => Err(std::io::Error::other("the scan stopped before the end of the image")),
        }
    }
}

/// Encoded frames not sent yet: heads and small payloads in `inline`, large payloads as
/// slices of read buffers, in stream order.
#[derive(Debug, Default)]
struct Out {
    inline: Vec<u8>,
    /// Each large payload, after the first `.0` bytes of `inline`.
    slices: Vec<(usize, Bytes)>,
    /// Bytes in all.
    bytes: usize,
}

impl Out {
    /// Append a data frame for `blocks` (whole blocks) from block `first`.
    fn data(&mut self, first: u64, blocks: Bytes) {
        let before = self.inline.len();
        encode_data_head(first, &blocks, &mut self.inline);
        if blocks.len() < INLINE {
            self.inline.extend_from_slice(&blocks);
        } else {
            self.bytes += blocks.len();
            self.slices.push((self.inline.len(), blocks));
        }
        self.bytes += self.inline.len() - before;
    }

    /// Append what `encode` writes (a zero or end frame).
    fn other(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        let before = self.inline.len();
        encode(&mut self.inline);
        self.bytes += self.inline.len() - before;
    }

    /// The pieces of the chunk, in order.
    fn take(&mut self) -> Chunk {
        let Out { inline, slices, .. } = std::mem::take(self);
        let inline = Bytes::from(inline);
        let mut pieces = Vec::with_capacity(2 * slices.len() + 1);
        let mut at = 0;
        for (cut, slice) in slices {
            if cut > at {
                pieces.push(inline.slice(at..cut));
                at = cut;
            }
            pieces.push(slice);
        }
        if at < inline.len() {
            pieces.push(inline.slice(at..));
        }
        pieces
    }
}

/// What a block is, compared with the daemon's copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Unchanged (or zero on both sides): not sent.
    Same,
    /// New data: sent in a data frame.
    Changed,
    /// Held data before, all zeros now: sent as a zero frame, without payload.
    Zeroed,
}

/// Walks the daemon's digests in step with the image (both in block order).
#[derive(Debug)]
struct Digests<'a> {
    old: &'a [(u64, u64)],
    at: usize,
}

impl Digests<'_> {
    /// Skip the digests of the blocks before `block`.
    fn seek(&mut self, block: u64) {
        self.at += self.old[self.at..].partition_point(|d| d.0 < block);
    }

    /// Compare block number `b` (ascending from call to call) with the daemon's copy.
    fn kind(&mut self, b: u64, block: &[u8]) -> Kind {
        while self.old.get(self.at).is_some_and(|d| d.0 < b) {
            self.at += 1;
        }
        let prev = self.old.get(self.at).filter(|d| d.0 == b).map(|d| d.1);
        match prev {
            _ if block.iter().all(|&x| x == 0) => {
                if prev.is_some() {
                    Kind::Zeroed
                } else {
                    Kind::Same
                }
            }
            Some(d) if d == catalog::blockmap::block_digest(block) => Kind::Same,
            _ => Kind::Changed,
        }
    }
}

/// Turns one chunk's blocks into frames: runs of changed blocks become data frames, runs of
/// zeroed blocks zero frames, each at most [`MAX_FRAME_BLOCKS`] long.
#[derive(Debug, Default)]
struct Runs {
    data: Option<usize>,
    zero: Option<usize>,
}

impl Runs {
    /// Block `i` of `chunk` (first block number `first`) is of `kind`: close the runs it ends,
    /// open the one it starts. Returns the bytes of changed blocks encoded.
    fn step(&mut self, i: usize, kind: Kind, first: u64, chunk: &Bytes, out: &mut Out) -> u64 {
        let full = |s: usize| i - s >= MAX_FRAME_BLOCKS as usize;
        let mut changed = 0;
        if let Some(s) = self.data.filter(|&s| kind != Kind::Changed || full(s)) {
            out.data(first + s as u64, chunk.slice(s * BS..i * BS));
            changed += ((i - s) * BS) as u64;
            self.data = None;
        }
        if let Some(s) = self.zero.filter(|&s| kind != Kind::Zeroed || full(s)) {
            out.other(|o| encode_zero(first + s as u64, u32::try_from(i - s).unwrap_or(u32::MAX), o));
            changed += ((i - s) * BS) as u64;
            self.zero = None;
        }
        match kind {
            Kind::Changed if self.data.is_none() => self.data = Some(i),
            Kind::Zeroed if self.zero.is_none() => self.zero = Some(i),
            _ => {}
        }
        changed
    }
}

/// Encode the frames of one chunk read from byte `off`; returns the changed bytes.
fn encode_chunk(chunk: &Bytes, off: u64, digests: &mut Digests<'_>, out: &mut Out) -> u64 {
    let first = off / BS as u64;
    let nblocks = chunk.len() / BS;
    let mut runs = Runs::default();
    let mut changed = 0;
    for (i, block) in chunk.chunks_exact(BS).enumerate() {
        let kind = digests.kind(first + i as u64, block);
        changed += runs.step(i, kind, first, chunk, out);
    }
    // The chunk's end closes every open run.
    changed + runs.step(nblocks, Kind::Same, first, chunk, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::frames::{decode_all, Frame};

    /// Scan `image` against `old` digests and decode what would be sent.
    fn frames_of(image: &[u8], ranges: &[(u64, u64)], old: &[(u64, u64)]) -> Vec<Frame> {
        struct Mem(Vec<u8>);
        impl ReadAt for Mem {
            fn read_at_exact(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
                let off = usize::try_from(off).expect("offset");
                buf.copy_from_slice(&self.0[off..off + buf.len()]);
                Ok(())
            }
        }
        let input =
            Input { reader: Arc::new(Mem(image.to_vec())), ranges: ranges.to_vec(), old: Arc::new(old.to_vec()) };
        let (mut body, workers) = start(input, &Arc::new(Progress::default()));
        let mut chunks: Vec<Chunk> = Vec::new();
        while let Some(c) = body.next_chunk().expect("chunk") {
            chunks.push(c);
        }
        for w in workers {
            w.join().expect("worker");
        }
        decode_all(chunks.iter().flatten().map(|b| &b[..])).expect("decodes")
    }

    #[test]
    fn large_runs_small_runs_and_zeroed_blocks_all_arrive() {
        let n = 2 * MAX_FRAME_BLOCKS as usize + 40;
        let mut image: Vec<u8> = (0..n * BS).map(|i| u8::try_from(i % 249).unwrap_or(0) | 1).collect();
        let digest = |b: usize, img: &[u8]| catalog::blockmap::block_digest(&img[b * BS..(b + 1) * BS]);
        // The daemon holds every block as it is now, except: block 3 and 1030..1033 changed,
        // blocks 10..12 became zero.
        let old: Vec<(u64, u64)> = (0..n).map(|b| (b as u64, digest(b, &image))).collect();
        for b in [3usize, 1030, 1031, 1032] {
            image[b * BS] ^= 0xff;
        }
        image[10 * BS..12 * BS].fill(0);
        let frames = frames_of(&image, &[(0, (n * BS) as u64)], &old);
        let block = |b: usize, k: usize| Bytes::copy_from_slice(&image[b * BS..(b + k) * BS]);
        assert_eq!(
            frames,
            vec![
                Frame::Data { first: 3, data: block(3, 1) },
                Frame::Zero { first: 10, count: 2 },
                Frame::Data { first: 1030, data: block(1030, 3) },
                Frame::End { scanned: (n * BS) as u64, changed: 6 * BS as u64 },
            ]
        );
        // Against nothing, every block is sent, in frames of at most MAX_FRAME_BLOCKS.
        let all = frames_of(&image, &[(0, (n * BS) as u64)], &[]);
        let sent: usize = all.iter().map(|f| if let Frame::Data { data, .. } = f { data.len() } else { 0 }).sum();
        assert_eq!(sent, (n - 2) * BS, "every block but the two zero ones");
        assert!(matches!(&all[0], Frame::Data { first: 0, data } if data.len() == 10 * BS));
        assert!(matches!(&all[1], Frame::Data { first: 12, data } if data.len() == CHUNK - 12 * BS));
        // Scattered ranges, read in jobs that gather several, compare only there.
        let ranges = [(3 * BS as u64, BS as u64), (9 * BS as u64, 4 * BS as u64), (1030 * BS as u64, 2 * BS as u64)];
        let some = frames_of(&image, &ranges, &old);
        assert_eq!(
            some,
            vec![
                Frame::Data { first: 3, data: block(3, 1) },
                Frame::Zero { first: 10, count: 2 },
                Frame::Data { first: 1030, data: block(1030, 2) },
                Frame::End { scanned: 7 * BS as u64, changed: 5 * BS as u64 },
            ]
        );
    }

    #[test]
    fn jobs_cut_large_ranges_and_gather_small_ones() {
        let c = CHUNK as u64;
        assert_eq!(jobs(&[]), Vec::<Job>::new());
        assert_eq!(jobs(&[(0, 2 * c + 4096)]), vec![vec![(0, c)], vec![(c, c)], vec![(2 * c, 4096)]]);
        assert_eq!(
            jobs(&[(0, 4096), (c, c - 4096), (5 * c, 8192)]),
            vec![vec![(0, 4096), (c, c - 4096)], vec![(5 * c, 8192)]]
        );
    }
}
