//! The ingest stream's receiver: from the request body to the staging tree, then the snapshot.
//!
//! Two stages that overlap. The async [`Receiver`] reads the body, decodes it
//! ([`crate::api::frames::Decoder`], which checks every block's crc32 as it passes) and copies
//! each data frame's payload once, into a 4 KiB-aligned buffer from a small per-stream pool;
//! a frame joins the batch being gathered only once all of its blocks matched, and frames of
//! adjacent blocks become one run. One blocking writer ([`write_batches`]) commits each batch
//! it takes as one group commit. The receiver hands a batch over as soon as the writer has
//! nothing to do (at a frame boundary), or when the batch's buffer is full (16 MiB); while
//! the writer writes, the receiver keeps reading, and the slower the store, the larger its
//! commits. At most one full batch waits for the writer; beyond that the receiver stops
//! reading the socket (backpressure), so a stream holds at most a few buffers.
//!
//! The writer runs in the store's streaming mode ([`Store::streaming_writes`]): its large runs
//! go to disk around the page cache, so the end-of-ingest flush has little left to write.
//!
//! The ingest becomes a snapshot only when the `E` frame arrives; any other end keeps what
//! arrived (every complete, checked frame received is still written) for the next stream to
//! resume.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::{Body, BodyDataStream};
use axum::http::StatusCode;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::volumes::summary;
use super::{bad, blocking, ApiError, Shared};
use crate::api::frames::{Decoder, Event};
use crate::api::ingest::IngestAnswer;
use crate::api::pool::{BufferPool, Filling};
use crate::store::{Store, StoreError};

const BS: usize = 4096;

/// Payload bytes gathered into one batch at most (a whole number of the largest frames).
const BATCH: usize = 16 << 20;

/// Alignment of a batch's buffer, so the store can write it around the page cache.
const ALIGN: usize = 4096;

/// Spare buffers a stream keeps (one gathering, one waiting, two being written).
const SPARE: usize = 4;

/// What a complete stream carried: the agent's counts from the `E` frame and ours.
#[derive(Debug, Clone, Copy)]
struct Received {
    /// Bytes of the image the agent read.
    scanned: u64,
    /// Bytes the agent found changed.
    changed: u64,
    /// Block payload bytes written.
    sent: u64,
    /// Every byte of the stream.
    wire: u64,
}

/// Receive an ingest stream into source `name`; answers the new snapshot and its summary.
pub(super) async fn receive(store: Shared, name: String, body: Body) -> Result<IngestAnswer, ApiError> {
    let started = std::time::Instant::now();
    // One stream per source at a time; a stream that breaks leaves its staging tree for the
    // next one to resume.
    let Some(_active) = store.ingests.claim(&name) else {
        return Err(ApiError(StatusCode::CONFLICT, format!("an ingest into `{name}` is already running")));
    };
    let n = name.clone();
    let resumed = blocking(&store, move |st| {
        st.check_pool("ingests")?;
        st.op(|cat| cat.begin_ingest(&n))
    })
    .await?;
    if resumed {
        tracing::info!(source = %name, "resuming an interrupted ingest");
    }
    match receive_frames(&store, &name, body).await {
        Ok(received) => finish(&store, name, received, started, resumed).await,
        Err(e) => {
            // Keep what arrived (made durable here): a re-run resumes it, `forkd ingest --abort`
            // frees it. No snapshot appears either way until an ingest completes.
            tracing::warn!(source = %name, error = %e.1, "ingest interrupted; re-run it to resume, or abort it");
            if let Err(flush) = blocking(&store, |st| st.flush()).await {
                tracing::error!(source = %name, error = %flush.1, "could not flush the interrupted ingest");
            }
            Err(e)
        }
    }
}

/// Turn a complete stream into the source's next snapshot.
async fn finish(
    store: &Shared,
    name: String,
    r: Received,
    started: std::time::Instant,
    resumed: bool,
) -> Result<IngestAnswer, ApiError> {
    let done = catalog::IngestSummary {
        scanned_bytes: r.scanned,
        changed_bytes: r.changed,
        sent_bytes: r.sent,
        wire_bytes: r.wire,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    let (n, s) = (name.clone(), done.clone());
    let id = blocking(store, move |st| st.op(|cat| cat.finish_ingest(&n, s))).await?;
    tracing::info!(source = %name, snapshot = %id, r.scanned, r.changed, r.sent, resumed, "ingest complete");
    Ok(IngestAnswer { snapshot: id.to_string(), summary: summary(&done) })
}

/// Receive and write frames until `E`. A writer failure is reported first (it is why the
/// receiver stopped), then a stream failure, then a stream without its end frame.
async fn receive_frames(store: &Shared, name: &str, body: Body) -> Result<Received, ApiError> {
    let (tx, rx) = mpsc::channel::<Batch>(1);
    let outstanding = Arc::new(AtomicUsize::new(0));
    let (st, n, out) = (store.clone(), name.to_string(), outstanding.clone());
    let writer = tokio::task::spawn_blocking(move || write_batches(&st, &n, rx, &out));
    let pool = BufferPool::new(BATCH, ALIGN, SPARE);
    let mut receiver = Receiver {
        stream: body.into_data_stream(),
        decoder: Decoder::new(),
        gathering: Gathering::new(&pool),
        pool,
        frame: None,
        wire: 0,
        tx,
        outstanding,
    };
    let end = receiver.run().await;
    if end.is_err() {
        // Every complete, checked frame that arrived is still written: a resume skips it.
        receiver.hand_over().await;
    }
    let wire = receiver.wire;
    drop(receiver); // closes the channel: the writer finishes what is queued
    let sent = writer
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("ingest writer failed: {e}")))??;
    let (scanned, changed) = end?.ok_or_else(|| bad("the ingest stream ended before its end frame"))?;
    Ok(Received { scanned, changed, sent, wire })
}

/// A batch for the writer: runs of blocks and zeroed ranges, in stream order.
#[derive(Debug)]
struct Batch {
    ops: Vec<Op>,
}

/// One write of a batch.
#[derive(Debug)]
enum Op {
    /// Whole blocks from `first`, their crc32s checked.
    Data { first: u64, data: Bytes },
    /// Blocks that became zero.
    Zero { first: u64, count: u32 },
}

/// A batch being gathered: its buffer, and its writes as ranges of the buffer.
#[derive(Debug)]
struct Gathering {
    buf: Filling,
    ops: Vec<Gathered>,
}

/// A write of the batch being gathered.
#[derive(Debug)]
enum Gathered {
    /// `len` bytes at `at` in the buffer, for the blocks from `first`.
    Data { first: u64, at: usize, len: usize },
    /// Blocks that became zero.
    Zero { first: u64, count: u32 },
}

impl Gathering {
    fn new(pool: &BufferPool) -> Gathering {
        Gathering { buf: pool.take(), ops: Vec::new() }
    }

    /// A checked data frame of the blocks from `first`, whose payload is the buffer from `at`
    /// to its end: a run of its own, or the end of the previous one when it continues it.
    fn push_data(&mut self, first: u64, at: usize) {
        let len = self.buf.len() - at;
        if let Some(Gathered::Data { first: f, at: a, len: l }) = self.ops.last_mut() {
            if *f + (*l / BS) as u64 == first && *a + *l == at {
                *l += len;
                return;
            }
        }
        self.ops.push(Gathered::Data { first, at, len });
    }

    /// The batch, its runs cut out of the buffer without copying.
    fn seal(self) -> Batch {
        let data = self.buf.freeze();
        let ops = self
            .ops
            .into_iter()
            .map(|g| match g {
                Gathered::Data { first, at, len } => Op::Data { first, data: data.slice(at..at + len) },
                Gathered::Zero { first, count } => Op::Zero { first, count },
            })
            .collect();
        Batch { ops }
    }
}

/// The async half of an ingest: reads the body, decodes it, gathers batches and hands them to
/// the writer, until the end frame.
#[derive(Debug)]
struct Receiver {
    stream: BodyDataStream,
    decoder: Decoder,
    pool: BufferPool,
    gathering: Gathering,
    /// The data frame being received: its first block and where its payload starts in the
    /// buffer.
    frame: Option<(u64, usize)>,
    /// Every byte received so far.
    wire: u64,
    tx: mpsc::Sender<Batch>,
    /// Batches handed to the writer and not yet written.
    outstanding: Arc<AtomicUsize>,
}

impl Receiver {
    /// Receive until the end frame: its (scanned, changed), or `None` when the writer stopped
    /// taking batches (its own error says why).
    async fn run(&mut self) -> Result<Option<(u64, u64)>, ApiError> {
        loop {
            let chunk = self.next_chunk().await?;
            let mut input = &chunk[..];
            while let Some(event) =
                self.decoder.next(&mut input).map_err(|e| bad(format!("malformed ingest stream: {e}")))?
            {
                let go_on = match event {
                    Event::DataStart { first, count } => self.start_frame(first, count).await,
                    Event::Payload(piece) => {
                        // `start_frame` made room for the whole payload.
                        if !self.gathering.buf.extend(piece) {
                            return Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, "ingest batch overflow".into()));
                        }
                        true
                    }
                    Event::DataEnd => {
                        if let Some((first, at)) = self.frame.take() {
                            self.gathering.push_data(first, at);
                        }
                        self.hand_over_if_idle().await
                    }
                    Event::Zero { first, count } => {
                        self.gathering.ops.push(Gathered::Zero { first, count });
                        self.hand_over_if_idle().await
                    }
                    Event::End { scanned, changed } => {
                        if !input.is_empty() {
                            return Err(bad("bytes after the end frame"));
                        }
                        self.expect_nothing_more().await?;
                        return Ok(self.hand_over().await.then_some((scanned, changed)));
                    }
                };
                if !go_on {
                    return Ok(None);
                }
            }
        }
    }

    /// A data frame of `count` blocks from `first` starts: make room for its payload.
    async fn start_frame(&mut self, first: u64, count: u32) -> bool {
        let go_on = self.gathering.buf.room() >= count as usize * BS || self.hand_over().await;
        self.frame = Some((first, self.gathering.buf.len()));
        go_on
    }

    /// Hand the batch gathered so far to the writer when it has nothing to do.
    async fn hand_over_if_idle(&mut self) -> bool {
        self.outstanding.load(Ordering::Acquire) > 0 || self.hand_over().await
    }

    /// Hand the batch gathered so far to the writer (waiting while another one already waits
    /// for it) and start a new one; false when the writer stopped. Only called between
    /// frames, or when the stream is over: a frame cut short stays behind, unwritten.
    async fn hand_over(&mut self) -> bool {
        if self.gathering.ops.is_empty() {
            return true;
        }
        let batch = std::mem::replace(&mut self.gathering, Gathering::new(&self.pool)).seal();
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        self.tx.send(batch).await.is_ok()
    }

    /// The next chunk of the body.
    async fn next_chunk(&mut self) -> Result<Bytes, ApiError> {
        match self.stream.next().await {
            Some(Ok(chunk)) => {
                self.wire += chunk.len() as u64;
                Ok(chunk)
            }
            Some(Err(e)) => Err(bad(format!("the ingest stream broke off: {e}"))),
            None => Err(bad("the ingest stream ended before its end frame")),
        }
    }

    /// The end frame must be the last thing in the stream.
    async fn expect_nothing_more(&mut self) -> Result<(), ApiError> {
        while let Some(chunk) = self.stream.next().await {
            match chunk {
                Ok(c) if c.is_empty() => {}
                _ => return Err(bad("bytes after the end frame")),
            }
        }
        Ok(())
    }
}

/// The blocking half of an ingest: write every batch handed over (a batch that waited joins
/// the one taken before it in the same group commit); returns the block payload bytes written.
fn write_batches(
    st: &Store,
    name: &str,
    mut rx: mpsc::Receiver<Batch>,
    outstanding: &AtomicUsize,
) -> Result<u64, ApiError> {
    let _streaming = st.streaming_writes();
    let mut sent = 0u64;
    while let Some(batch) = rx.blocking_recv() {
        let mut ops = batch.ops;
        let mut taken = 1;
        while let Ok(more) = rx.try_recv() {
            ops.extend(more.ops);
            taken += 1;
        }
        let written = write_ops(st, name, ops);
        outstanding.fetch_sub(taken, Ordering::AcqRel);
        sent += written?;
    }
    Ok(sent)
}

/// Write one batch's runs, each zeroed range in its place; returns the payload bytes written.
fn write_ops(st: &Store, name: &str, ops: Vec<Op>) -> Result<u64, StoreError> {
    let (mut runs, mut sent) = (Vec::new(), 0u64);
    for op in ops {
        match op {
            Op::Data { first, data } => {
                sent += data.len() as u64;
                runs.push((first, data));
            }
            Op::Zero { first, count } => {
                // Keep the order: what came before is written first.
                st.ingest_data(name, std::mem::take(&mut runs))?;
                st.ingest_blocks(name, first, None, u64::from(count))?;
            }
        }
    }
    st.ingest_data(name, runs)?;
    Ok(sent)
}
