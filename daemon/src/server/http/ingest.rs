//! The ingest routes: the source's block digests (what the agent compares against; blocks
//! known to be damaged get a poisoned digest, see `store::scrub`), the
//! ingest stream itself (`POST /v1/sources/{name}/ingest`) and its abort.
//!
//! The receiver parses frames (codec: [`crate::api::frames`]) on the async side
//! ([`FrameReceiver`]) and hands them to one blocking writer ([`write_frames`]) through a small
//! bounded channel, so receiving and writing overlap. The ingest becomes a snapshot only when
//! the `E` frame arrives; any other end keeps what arrived for the next stream to resume.

use axum::body::{Body, BodyDataStream};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::extract::{ApiPath, RawBody};
use super::volumes::summary;
use super::{bad, blocking, blocking_api, ApiError, ApiResult, Hooks, Shared};
use crate::api::data::{Binary, Empty};
use crate::api::error::ErrorBody;
use crate::api::frames::{take, Frame};
use crate::api::ingest::{decode_pairs, encode_pairs, IngestAnswer};
use crate::server::lifecycle;
use crate::store::Store;

const BS: usize = 4096;

/// Largest block-range list `POST .../digests` takes.
const MAX_RANGES_BODY: usize = 64 << 20;

/// Frames queued between the receiver and the writer.
const QUEUE: usize = 16;

#[utoipa::path(get, path = "/v1/sources/{name}/digests", tag = "ingest",
    params(("name" = String, Path, description = "source name")),
    responses((status = 200, content_type = "application/octet-stream", body = Binary,
            description = "for every block of the latest contents that holds data: block index (u64 LE), xxh3-64 digest (u64 LE); \
                the digest inverted for a block known to be damaged, so the agent sends it again"),
        (status = 404, description = "no such volume", body = ErrorBody)))]
pub(super) async fn digests(State(s): State<Shared>, ApiPath(name): ApiPath<String>) -> ApiResult<Response> {
    let d = blocking(&s, move |st| st.digests(&name)).await?;
    Ok(digest_response(&d))
}

/// Digests of only the block ranges in the body: pairs of (first block, count), u64 LE.
#[utoipa::path(post, path = "/v1/sources/{name}/digests", tag = "ingest",
    params(("name" = String, Path, description = "source name")),
    request_body(content = Binary, content_type = "application/octet-stream",
        description = "pairs of (first block u64 LE, count u64 LE), not overlapping"),
    responses((status = 200, content_type = "application/octet-stream", body = Binary,
            description = "the same format as `GET`, restricted to those block ranges"),
        (status = 400, description = "not pairs of u64, or overlapping ranges", body = ErrorBody),
        (status = 404, description = "no such volume", body = ErrorBody)))]
pub(super) async fn digests_in(
    State(s): State<Shared>,
    ApiPath(name): ApiPath<String>,
    RawBody(body): RawBody<MAX_RANGES_BODY>,
) -> ApiResult<Response> {
    let mut ranges =
        decode_pairs(&body).ok_or_else(|| bad("the body must be pairs of (first block, count), u64 little-endian"))?;
    ranges.sort_unstable();
    if ranges.windows(2).any(|w| w[0].0.saturating_add(w[0].1) > w[1].0) {
        return Err(bad("block ranges overlap"));
    }
    let d = blocking(&s, move |st| st.digests_in(&name, &ranges)).await?;
    Ok(digest_response(&d))
}

fn digest_response(d: &[(u64, u64)]) -> Response {
    ([(header::CONTENT_TYPE, "application/octet-stream")], encode_pairs(d)).into_response()
}

#[utoipa::path(post, path = "/v1/sources/{name}/ingest", tag = "ingest",
    params(("name" = String, Path, description = "source name")),
    request_body(content = Binary, content_type = "application/octet-stream",
        description = "the frame stream (docs/api.md, \"Ingest\"), sent chunked"),
    responses((status = 200, description = "the snapshot the stream became", body = IngestAnswer),
        (status = 400, description = "a malformed or damaged stream, or one that stopped early", body = ErrorBody),
        (status = 404, description = "no such volume", body = ErrorBody),
        (status = 409, description = "an ingest into this source is already running", body = ErrorBody)))]
pub(super) async fn ingest(
    State(s): State<Shared>,
    Extension(ev): Hooks,
    ApiPath(name): ApiPath<String>,
    body: Body,
) -> ApiResult<Json<IngestAnswer>> {
    let answer = receive(s.clone(), name.clone(), body).await?;
    let snapshot = answer.snapshot.clone();
    blocking_api(&s, move |st| {
        lifecycle::post_ingest(st, &ev, &name, &snapshot);
        Ok(())
    })
    .await?;
    Ok(Json(answer))
}

#[utoipa::path(delete, path = "/v1/sources/{name}/ingest", tag = "ingest",
    params(("name" = String, Path, description = "source name")),
    responses((status = 200, description = "the interrupted ingest is abandoned and its blocks freed", body = Empty),
        (status = 404, description = "no such volume", body = ErrorBody),
        (status = 409, description = "no ingest to abandon, or a stream is arriving right now", body = ErrorBody)))]
pub(super) async fn abort_ingest(State(s): State<Shared>, ApiPath(name): ApiPath<String>) -> ApiResult<Json<Empty>> {
    // An agent that was just killed leaves a stream the daemon sees break a moment later.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    while s.ingests.is_active(&name) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if s.ingests.is_active(&name) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("an ingest into `{name}` is arriving right now: stop its agent first"),
        ));
    }
    blocking(&s, move |st| st.op_freeing(|cat| cat.abort_ingest(&name))).await?;
    Ok(Json(Empty {}))
}

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
async fn receive(store: Shared, name: String, body: Body) -> Result<IngestAnswer, ApiError> {
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

/// Parse and apply frames until `E`. A writer failure is reported first (it is why the
/// receiver stopped), then a stream failure, then a stream without its end frame.
async fn receive_frames(store: &Shared, name: &str, body: Body) -> Result<Received, ApiError> {
    let (tx, rx) = mpsc::channel::<Frame>(QUEUE);
    let (st, n) = (store.clone(), name.to_string());
    let writer = tokio::task::spawn_blocking(move || write_frames(&st, &n, rx));
    let mut receiver = FrameReceiver { stream: body.into_data_stream(), buf: BytesMut::new(), wire: 0, tx };
    let end = receiver.run().await;
    let wire = receiver.wire;
    drop(receiver); // closes the channel: the writer finishes what is queued
    let sent = writer
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("ingest writer failed: {e}")))??;
    let (scanned, changed) = end?.ok_or_else(|| bad("the ingest stream ended before its end frame"))?;
    Ok(Received { scanned, changed, sent, wire })
}

/// The async half of an ingest: reads the body, cuts it into frames and queues them for the
/// writer, until the end frame.
#[derive(Debug)]
struct FrameReceiver {
    stream: BodyDataStream,
    /// Bytes received and not yet a whole frame.
    buf: BytesMut,
    /// Every byte received so far.
    wire: u64,
    tx: mpsc::Sender<Frame>,
}

impl FrameReceiver {
    /// Receive until the end frame: its (scanned, changed), or `None` when the writer stopped
    /// taking frames (its own error says why).
    async fn run(&mut self) -> Result<Option<(u64, u64)>, ApiError> {
        loop {
            self.read_chunk().await?;
            while let Some(frame) = take(&mut self.buf).map_err(|e| bad(format!("malformed ingest stream: {e}")))? {
                if let Frame::End { scanned, changed } = frame {
                    self.expect_nothing_more().await?;
                    return Ok(Some((scanned, changed)));
                }
                if self.tx.send(frame).await.is_err() {
                    return Ok(None);
                }
            }
        }
    }

    /// Append the next chunk of the body to the buffer.
    async fn read_chunk(&mut self) -> Result<(), ApiError> {
        match self.stream.next().await {
            Some(Ok(chunk)) => {
                self.wire += chunk.len() as u64;
                self.buf.extend_from_slice(&chunk);
                Ok(())
            }
            Some(Err(e)) => Err(bad(format!("the ingest stream broke off: {e}"))),
            None => Err(bad("the ingest stream ended before its end frame")),
        }
    }

    /// The end frame must be the last thing in the stream.
    async fn expect_nothing_more(&mut self) -> Result<(), ApiError> {
        if !self.buf.is_empty() || self.stream.next().await.is_some() {
            return Err(bad("bytes after the end frame"));
        }
        Ok(())
    }
}

/// The blocking half of an ingest: write every queued frame, checking each block's crc32;
/// returns the block payload bytes written.
fn write_frames(st: &Store, name: &str, mut rx: mpsc::Receiver<Frame>) -> Result<u64, ApiError> {
    let mut sent = 0u64;
    while let Some(frame) = rx.blocking_recv() {
        // Every frame already queued joins this one in a single group commit.
        let mut frames = vec![frame];
        while let Ok(f) = rx.try_recv() {
            frames.push(f);
        }
        let mut data = Vec::new();
        for frame in frames {
            match frame {
                Frame::Data { first, crcs, data: d } => {
                    check_crcs(first, &crcs, &d)?;
                    sent += d.len() as u64;
                    data.push((first, d));
                }
                Frame::Zero { first, count } => {
                    // Keep the order: what came before is written first.
                    st.ingest_data(name, std::mem::take(&mut data))?;
                    st.ingest_blocks(name, first, None, u64::from(count))?;
                }
                Frame::End { .. } => {}
            }
        }
        st.ingest_data(name, data)?;
    }
    Ok(sent)
}

/// Every block of a data frame must match the crc32 the agent computed.
fn check_crcs(first: u64, crcs: &[u32], data: &[u8]) -> Result<(), ApiError> {
    for (i, (crc, block)) in crcs.iter().zip(data.chunks_exact(BS)).enumerate() {
        if catalog::blockmap::block_crc(block) != *crc {
            return Err(bad(format!("block {} arrived damaged (crc32 mismatch)", first + i as u64)));
        }
    }
    Ok(())
}
