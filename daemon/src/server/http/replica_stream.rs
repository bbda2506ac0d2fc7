//! The target's receiver of a replicated snapshot's frames (`POST /v1/replicas/{name}/incoming`):
//! from the request body into the incoming snapshot's staging tree, then the snapshot.
//!
//! Frames are the ingest stream's ([`crate::api::frames::Decoder`] checks every block's crc32
//! as it passes). Complete frames are gathered into batches of at most [`BATCH`] bytes of data
//! (or [`BATCH_FRAMES`] frames), and each batch is written by one blocking task as one group
//! commit, followed by the mark of how far the transfer got (`Store::incoming_batch`): scattered
//! 4 KiB changes cost one commit per batch, not per block. While a batch is written, the next
//! one is read from the socket. A task first flushes the store when more than [`FLUSH_EVERY`]
//! would otherwise be written since the last flush, so a killed daemon loses at most the batch
//! being written, the one before it, the one being gathered and the frame under way (4 MiB
//! with the sender's 1 MiB frames); the sender resumes at the mark. Only the newest transfer
//! into a volume writes (`IncomingClaims`): an older connection that outlived a cut link is
//! refused at its next batch. A sender that goes quiet for [`IDLE`] is dropped; what arrived
//! stays.

use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::task::JoinHandle;

use super::{bad, blocking_api, ApiError, ApiResult, Shared};
use crate::api::frames::{Decoder, Event};
use crate::api::replication::IncomingDone;
use crate::server::lifecycle::DRAIN;
use crate::server::replication::IncomingTicket;
use crate::store::exports::Scope;

/// Data bytes gathered into one batch at most (a larger frame is a batch alone).
const BATCH: u64 = 1 << 20;

/// Frames gathered into one batch at most (zero frames carry no data).
const BATCH_FRAMES: usize = 1024;

/// Data written since the last flush beyond which a batch flushes first.
const FLUSH_EVERY: u64 = 1 << 20;

/// A sender silent this long is given up on.
const IDLE: Duration = Duration::from_secs(120);

/// Complete frames waiting to be written together.
#[derive(Debug, Default)]
struct Batch {
    data: Vec<(u64, Bytes)>,
    zeros: Vec<(u64, u64)>,
    /// The end of the last frame: every block below it arrived once this batch is written.
    end: u64,
    payload: u64,
    frames: usize,
}

/// What the receiver tracks across batches.
struct Receiver {
    s: Shared,
    ticket: IncomingTicket,
    name: String,
    batch: Batch,
    /// The batch being written, if any.
    writing: Option<JoinHandle<ApiResult<()>>>,
    unflushed: u64,
    payload: u64,
}

/// Receive the frames of the snapshot declared for `name`; answers once it is a snapshot.
pub(super) async fn receive(s: Shared, ticket: IncomingTicket, name: String, body: Body) -> ApiResult<IncomingDone> {
    let mut r = Receiver { s, ticket, name, batch: Batch::default(), writing: None, unflushed: 0, payload: 0 };
    let result = r.frames(body).await;
    // Whatever ended the stream, the batch being written is finished before the answer.
    let written = r.wait_written().await;
    let payload_bytes = result?;
    written?;
    r.finish(payload_bytes).await
}

impl Receiver {
    /// Read and write frames until the end frame; the data bytes received.
    async fn frames(&mut self, body: Body) -> ApiResult<u64> {
        let mut stream = body.into_data_stream();
        let mut decoder = Decoder::new();
        let mut frame: Option<(u64, u32, Vec<u8>)> = None;
        loop {
            let chunk = match tokio::time::timeout(IDLE, stream.next()).await {
                Err(_) => {
                    return Err(ApiError(
                        StatusCode::REQUEST_TIMEOUT,
                        "the sender went quiet; what arrived is kept".into(),
                    ))
                }
                Ok(None) => return Err(bad("the stream ended before its end frame; what arrived is kept")),
                Ok(Some(Err(e))) => return Err(bad(format!("the stream broke: {e}; what arrived is kept"))),
                Ok(Some(Ok(c))) => c,
            };
            let mut input: &[u8] = &chunk;
            let bad_frame = |e| bad(format!("{e}; what arrived before it is kept"));
            while let Some(event) = decoder.next(&mut input).map_err(bad_frame)? {
                match event {
                    Event::DataStart { first, count } => {
                        frame = Some((first, count, Vec::with_capacity(count as usize * 4096)))
                    }
                    Event::Payload(p) => frame.as_mut().map_or((), |(_, _, buf)| buf.extend_from_slice(p)),
                    Event::DataEnd => {
                        let (first, count, buf) = frame.take().ok_or_else(|| bad("frame payload without a frame"))?;
                        self.add(first, u64::from(count), Some(Bytes::from(buf))).await?;
                    }
                    Event::Zero { first, count } => self.add(first, u64::from(count), None).await?,
                    Event::End { .. } => {
                        self.submit().await?;
                        return Ok(self.payload);
                    }
                }
            }
        }
    }

    /// Add a complete frame to the batch, writing the batch first if it would grow too large.
    async fn add(&mut self, first: u64, count: u64, data: Option<Bytes>) -> ApiResult<()> {
        let len = data.as_ref().map_or(0, |d| d.len() as u64);
        if self.batch.frames > 0 && (self.batch.payload + len > BATCH || self.batch.frames >= BATCH_FRAMES) {
            self.submit().await?;
        }
        let b = &mut self.batch;
        match data {
            Some(d) => b.data.push((first, d)),
            None => b.zeros.push((first, count)),
        }
        b.end = first + count;
        b.payload += len;
        b.frames += 1;
        self.payload += len;
        Ok(())
    }

    /// Hand the batch to a blocking task once the previous one is written.
    async fn submit(&mut self) -> ApiResult<()> {
        self.wait_written().await?;
        let batch = std::mem::take(&mut self.batch);
        if batch.frames == 0 {
            return Ok(());
        }
        let flush_first = self.unflushed + batch.payload > FLUSH_EVERY;
        self.unflushed = if flush_first { batch.payload } else { self.unflushed + batch.payload };
        let (s, t, n) = (self.s.clone(), self.ticket.clone(), self.name.clone());
        self.writing = Some(tokio::task::spawn_blocking(move || {
            t.while_newest(|| -> ApiResult<()> {
                if flush_first {
                    s.flush()?;
                }
                Ok(s.incoming_batch(&n, batch.data, &batch.zeros, batch.end)?)
            })
            .unwrap_or_else(|| Err(superseded(&n)))
        }));
        Ok(())
    }

    /// Wait for the batch being written, if any.
    async fn wait_written(&mut self) -> ApiResult<()> {
        match self.writing.take() {
            Some(task) => task
                .await
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("internal task failed: {e}")))?,
            None => Ok(()),
        }
    }

    /// Every frame is written: check the digest and make the snapshot.
    async fn finish(&self, payload_bytes: u64) -> ApiResult<IncomingDone> {
        let (t, n) = (self.ticket.clone(), self.name.clone());
        blocking_api(&self.s, move |st| {
            t.while_newest(|| -> ApiResult<IncomingDone> {
                // The head moves to the new snapshot: hosts attached to it are drained first, as
                // for a refresh (attach a snapshot or a clone of one for a view that stays put).
                let snap = {
                    let _fence = st.exports.fence_and_drain(&n, Scope::Head, DRAIN);
                    st.finish_incoming(&n)?
                };
                // A replica may have retention rules of its own, applied as after any snapshot.
                crate::server::retention::after_snapshot(st, &n);
                Ok(IncomingDone { snapshot: snap.to_string(), payload_bytes })
            })
            .unwrap_or_else(|| Err(superseded(&n)))
        })
        .await
    }
}

fn superseded(name: &str) -> ApiError {
    ApiError(StatusCode::CONFLICT, format!("a newer transfer into `{name}` took over from this one"))
}
