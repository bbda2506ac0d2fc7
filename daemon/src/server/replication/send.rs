//! Sending one snapshot to the target: declare it (`PUT /v1/replicas/{name}/incoming`, which
//! answers where to start: 0, or where an interrupted transfer stopped), then stream the blocks
//! that differ from its base as ingest frames, from that block on, and an end frame; the target
//! answers once the snapshot is made and its digest matched.
//!
//! The stream is produced as it is sent ([`DiffStream`]): the walk of the two trees takes one
//! window of address space at a time; runs are gathered into chunks of up to 1 MiB of data,
//! each chunk's data read from the snapshot in one submission (crc32s checked) and framed just
//! before it goes out in one vectored write. Runs are at most [`MAX_RUN`] blocks (1 MiB), so the
//! target records its progress at least every 1 MiB and a cut link costs at most a frame again.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;

use super::plan::Outgoing;
use crate::api::client::Client;
use crate::api::frames;
use crate::api::replication::SentSnapshot;
use crate::api::upload::Chunks;
use crate::store::replica::Changed;
use crate::store::Store;

/// Largest run of blocks in one frame (1 MiB): the target loses at most a few of them when
/// it is killed (`server::http::replica_stream`).
pub(super) const MAX_RUN: u64 = 256;

/// Blocks of address space walked per hold of the catalog's read lock (1 GiB).
const WINDOW: u64 = 1 << 18;

/// Bytes HTTP chunking adds to a chunk (size line and its end), counted as sent.
const CHUNK_OVERHEAD: u64 = 12;

/// The target and how long a stalled link is waited for.
#[derive(Debug, Clone)]
pub(super) struct Link {
    /// A client for the target's API, with the stall timeout on every read and write.
    pub client: Client,
    /// No progress for this long fails the run.
    pub stall: Duration,
}

/// Content digests of snapshots sent, by guid, so the next snapshot's is found from what
/// changed since its base (`Store::snapshot_digest`).
#[derive(Debug, Default)]
pub(super) struct Digests(parking_lot::Mutex<HashMap<String, u128>>);

/// Digests kept at most; beyond, the cache starts afresh (one whole-tree walk per volume).
const DIGESTS_KEPT: usize = 100_000;

impl Digests {
    /// The digest of `out`'s snapshot, remembered for the next one.
    fn of(&self, store: &Store, out: &Outgoing) -> anyhow::Result<String> {
        let known = out.header.base.as_ref().and_then(|g| self.0.lock().get(g).copied());
        let d = store.snapshot_digest(&out.snap, out.base.as_ref(), known)?;
        let mut kept = self.0.lock();
        if kept.len() >= DIGESTS_KEPT {
            kept.clear();
        }
        kept.insert(out.header.snapshot.guid.clone(), d);
        Ok(catalog::digest_hex(d))
    }
}

/// Send `out` to the target; what was sent.
pub(super) fn send(store: &Store, link: &Link, digests: &Digests, mut out: Outgoing) -> anyhow::Result<SentSnapshot> {
    out.header.digest = digests.of(store, &out)?;
    let header = serde_json::to_value(&out.header)?;
    let start = link.client.replica_incoming(&out.snap.volume, &header)?;
    let counts = Counts::default();
    let stream = DiffStream {
        store,
        out: &out,
        next: start.next_block,
        end: out.header.snapshot.size_bytes / catalog::BLOCK_SIZE,
        runs: VecDeque::new(),
        ended: false,
        counts: &counts,
    };
    link.client.replica_send(&out.snap.volume, stream, link.stall)?;
    Ok(SentSnapshot {
        snapshot: out.snap.to_string(),
        base: out.base.as_ref().map(ToString::to_string),
        resumed_from_block: start.next_block,
        changed_blocks: counts.blocks.get(),
        payload_bytes: counts.payload.get(),
        wire_bytes: counts.wire.get(),
    })
}

#[derive(Debug, Default)]
struct Counts {
    blocks: Cell<u64>,
    payload: Cell<u64>,
    wire: Cell<u64>,
}

/// The frames of one snapshot's difference from its base, made as they are sent.
struct DiffStream<'a> {
    store: &'a Store,
    out: &'a Outgoing,
    /// The first block not yet walked.
    next: u64,
    /// The snapshot's size in blocks.
    end: u64,
    /// Runs found and not yet sent.
    runs: VecDeque<Changed>,
    /// The end frame went out.
    ended: bool,
    counts: &'a Counts,
}

/// Data bytes gathered into one chunk at most (a larger run is a chunk alone).
const CHUNK_BYTES: u64 = 1 << 20;

/// Runs gathered into one chunk at most.
const CHUNK_RUNS: usize = 256;

impl DiffStream<'_> {
    /// The next runs to send together: at most [`CHUNK_RUNS`], with at most [`CHUNK_BYTES`] of
    /// data (or one larger run), so scattered blocks cost one read submission and one vectored
    /// write per chunk, not per block.
    fn take_runs(&mut self) -> Vec<Changed> {
        let mut taken: Vec<Changed> = Vec::new();
        let mut bytes = 0;
        while let Some(run) = self.runs.front() {
            let len = if run.data { run.count * catalog::BLOCK_SIZE } else { 0 };
            if !taken.is_empty() && (taken.len() >= CHUNK_RUNS || bytes + len > CHUNK_BYTES) {
                break;
            }
            bytes += len;
            taken.extend(self.runs.pop_front());
        }
        taken
    }

    /// The frames of `runs` as one chunk's pieces: each frame's head, then its slice of the data
    /// read for all of them at once.
    fn frames(&self, runs: &[Changed]) -> std::io::Result<Vec<Bytes>> {
        let wanted: Vec<(u64, u64)> = runs.iter().filter(|r| r.data).map(|r| (r.first, r.count)).collect();
        let data = if wanted.is_empty() {
            Bytes::new()
        } else {
            Bytes::from(self.store.read_runs(&self.out.snap, &wanted).map_err(std::io::Error::other)?)
        };
        let mut pieces = Vec::with_capacity(runs.len() * 2);
        let mut at = 0usize;
        for run in runs {
            let count = u32::try_from(run.count).map_err(std::io::Error::other)?;
            let mut head = Vec::new();
            if run.data {
                let len = usize::try_from(run.count * catalog::BLOCK_SIZE).map_err(std::io::Error::other)?;
                let blocks = data.slice(at..at + len);
                at += len;
                frames::encode_data_head(run.first, &blocks, &mut head);
                self.counts.payload.set(self.counts.payload.get() + len as u64);
                pieces.push(Bytes::from(head));
                pieces.push(blocks);
            } else {
                frames::encode_zero(run.first, count, &mut head);
                pieces.push(Bytes::from(head));
            }
            self.counts.blocks.set(self.counts.blocks.get() + run.count);
        }
        let len: u64 = pieces.iter().map(|p| p.len() as u64).sum();
        self.counts.wire.set(self.counts.wire.get() + len + CHUNK_OVERHEAD);
        Ok(pieces)
    }
}

impl Chunks for DiffStream<'_> {
    fn next_chunk(&mut self) -> std::io::Result<Option<Vec<Bytes>>> {
        loop {
            let runs = self.take_runs();
            if !runs.is_empty() {
                return self.frames(&runs).map(Some);
            }
            if self.ended {
                return Ok(None);
            }
            if self.next >= self.end {
                let mut end = Vec::new();
                frames::encode_end(self.end * catalog::BLOCK_SIZE, self.counts.payload.get(), &mut end);
                self.counts.wire.set(self.counts.wire.get() + end.len() as u64 + CHUNK_OVERHEAD);
                self.ended = true;
                return Ok(Some(vec![Bytes::from(end)]));
            }
            let to = (self.next + WINDOW).min(self.end);
            let found = self.store.changed_runs(self.out.base.as_ref(), &self.out.snap, self.next, to, MAX_RUN);
            self.runs = found.map_err(std::io::Error::other)?.into();
            self.next = to;
        }
    }
}
