//! The scan: read the image's ranges, hash every block, compare it with the daemon's digest
//! and encode the changed ones as frames ([`crate::api::frames`]). It runs on its own thread and
//! hands whole buffers of frames to the sender through a bounded channel, so reading and
//! sending overlap and memory stays bounded (8 buffers of about 4 MiB).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender};

use anyhow::Context;

use super::report::Progress;
use super::BS;
use crate::api::frames::{encode_data, encode_end, encode_zero, MAX_FRAME_BLOCKS};

/// Bytes read from the image at a time.
const CHUNK: usize = 4 << 20;

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

/// Frames queued for sending, as a `Read` for the HTTP body.
pub(super) struct FrameReader {
    rx: Receiver<anyhow::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
}

impl FrameReader {
    /// The body that yields what the scan sends on `rx`, and ends when the scan is done.
    pub(super) fn new(rx: Receiver<anyhow::Result<Vec<u8>>>) -> FrameReader {
        FrameReader { rx, cur: Vec::new(), pos: 0 }
    }
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
                Ok(Err(e)) => return Err(std::io::Error::other(format!("{e:#}"))),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
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
    fn step(&mut self, i: usize, kind: Kind, first: u64, chunk: &[u8], out: &mut Vec<u8>) -> u64 {
        let full = |s: usize| i - s >= MAX_FRAME_BLOCKS as usize;
        let mut changed = 0;
        if let Some(s) = self.data.filter(|&s| kind != Kind::Changed || full(s)) {
            encode_data(first + s as u64, &chunk[s * BS..i * BS], out);
            changed += ((i - s) * BS) as u64;
            self.data = None;
        }
        if let Some(s) = self.zero.filter(|&s| kind != Kind::Zeroed || full(s)) {
            encode_zero(first + s as u64, u32::try_from(i - s).unwrap_or(u32::MAX), out);
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
fn encode_chunk(chunk: &[u8], off: u64, digests: &mut Digests<'_>, out: &mut Vec<u8>) -> u64 {
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

/// Read the image's `ranges` ((offset, length) in bytes, whole blocks, sorted, disjoint), find
/// changed blocks, queue frames, and end with the end frame. Runs on its own thread.
pub(super) fn scan<R: ReadAt + ?Sized>(
    file: &R,
    ranges: &[(u64, u64)],
    old: &[(u64, u64)],
    p: &Progress,
    tx: &SyncSender<anyhow::Result<Vec<u8>>>,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut digests = Digests { old, at: 0 };
    let mut out = Vec::with_capacity(CHUNK + CHUNK / 256);
    let (mut scanned, mut changed) = (0u64, 0u64);
    for &(start, len) in ranges {
        digests.seek(start / BS as u64);
        let end = start.saturating_add(len);
        let mut off = start;
        while off < end {
            let want = usize::try_from((end - off).min(CHUNK as u64)).unwrap_or(CHUNK);
            let chunk = &mut buf[..want];
            file.read_at_exact(chunk, off).with_context(|| format!("reading the image at offset {off}"))?;
            changed += encode_chunk(chunk, off, &mut digests, &mut out);
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
