//! The ingest routes: the source's block digests (what the agent compares against), the
//! ingest stream itself (`POST /v1/sources/{name}/ingest`) and its abort.
//!
//! The receiver parses frames (codec: [`crate::api::frames`]) on the async side and hands
//! them to one blocking writer through a small bounded channel, so receiving and writing
//! overlap. The ingest becomes a snapshot only when the `E` frame arrives; any other end
//! abandons it, which frees every block it wrote.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::BytesMut;
use catalog::IngestSummary;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::{bad, blocking, run_blocking, ApiError, ApiResult, Shared};
use crate::api::frames::{take, Frame};

const BS: usize = 4096;

pub(super) async fn digests(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<Response> {
    let d = blocking(&s, move |st| st.digests(&name)).await?;
    Ok(digest_response(d))
}

/// Digests of only the block ranges in the body: pairs of (first block, count), u64 LE.
pub(super) async fn digests_in(
    State(s): State<Shared>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    if !body.len().is_multiple_of(16) {
        return Err(bad("the body must be pairs of (first block, count), u64 little-endian"));
    }
    let mut ranges: Vec<(u64, u64)> = body
        .chunks_exact(16)
        .map(|c| {
            let (a, b) = c.split_at(8);
            (u64::from_le_bytes(a.try_into().unwrap_or_default()), u64::from_le_bytes(b.try_into().unwrap_or_default()))
        })
        .collect();
    ranges.sort_unstable();
    if ranges.windows(2).any(|w| w[0].0.saturating_add(w[0].1) > w[1].0) {
        return Err(bad("block ranges overlap"));
    }
    let d = blocking(&s, move |st| st.digests_in(&name, &ranges)).await?;
    Ok(digest_response(d))
}

fn digest_response(d: Vec<(u64, u64)>) -> Response {
    let mut out = Vec::with_capacity(d.len() * 16);
    for (b, h) in d {
        out.extend_from_slice(&b.to_le_bytes());
        out.extend_from_slice(&h.to_le_bytes());
    }
    ([(header::CONTENT_TYPE, "application/octet-stream")], out).into_response()
}

pub(super) async fn ingest(State(s): State<Shared>, Path(name): Path<String>, body: Body) -> ApiResult<Json<Value>> {
    let (snapshot, summary) = receive(s, name, body).await?;
    Ok(Json(json!({ "snapshot": snapshot, "summary": summary })))
}

pub(super) async fn abort_ingest(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
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
    blocking(&s, move |st| st.op(|cat| cat.abort_ingest(&name))).await?;
    Ok(Json(json!({})))
}

/// Receive an ingest stream into source `name`; returns the new snapshot and its summary.
pub(crate) async fn receive(store: Shared, name: String, body: Body) -> Result<(String, IngestSummary), ApiError> {
    let started = std::time::Instant::now();
    // One stream per source at a time; a stream that breaks leaves its staging tree for the
    // next one to resume.
    let Some(_active) = store.ingests.claim(&name) else {
        return Err(ApiError(StatusCode::CONFLICT, format!("an ingest into `{name}` is already running")));
    };
    let n = name.clone();
    let resumed = run_blocking(&store, move |st| st.op(|cat| cat.begin_ingest(&n))).await?;
    if resumed {
        tracing::info!(source = %name, "resuming an interrupted ingest");
    }
    let result = receive_frames(&store, &name, body).await;
    match result {
        Ok((scanned, changed, sent, wire)) => {
            let summary = IngestSummary {
                scanned_bytes: scanned,
                changed_bytes: changed,
                sent_bytes: sent,
                wire_bytes: wire,
                duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            };
            let (n, s) = (name.clone(), summary.clone());
            let id = run_blocking(&store, move |st| st.op(|cat| cat.finish_ingest(&n, s))).await?;
            tracing::info!(source = %name, snapshot = %id, scanned, changed, sent, resumed, "ingest complete");
            Ok((id.to_string(), summary))
        }
        Err(e) => {
            // Keep what arrived (made durable here): a re-run resumes it, `forkd ingest --abort`
            // frees it. No snapshot appears either way until an ingest completes.
            tracing::warn!(source = %name, error = %e.1, "ingest interrupted; re-run it to resume, or abort it");
            if let Err(flush) = run_blocking(&store, |st| st.flush()).await {
                tracing::error!(source = %name, error = %flush.1, "could not flush the interrupted ingest");
            }
            Err(e)
        }
    }
}

/// Parse and apply frames until `E`; returns (scanned, changed, payload bytes, stream bytes).
async fn receive_frames(store: &Shared, name: &str, body: Body) -> Result<(u64, u64, u64, u64), ApiError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Frame>(16);
    let (st, n) = (store.clone(), name.to_string());
    let writer = tokio::task::spawn_blocking(move || -> Result<u64, ApiError> {
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
                        for (i, (crc, block)) in crcs.iter().zip(d.chunks_exact(BS)).enumerate() {
                            if catalog::blockmap::block_crc(block) != *crc {
                                return Err(bad(format!(
                                    "block {} arrived damaged (crc32 mismatch)",
                                    first + i as u64
                                )));
                            }
                        }
                        sent += d.len() as u64;
                        data.push((first, d));
                    }
                    Frame::Zero { first, count } => {
                        // Keep the order: what came before is written first.
                        st.ingest_data(&n, std::mem::take(&mut data))?;
                        st.ingest_blocks(&n, first, None, u64::from(count))?;
                    }
                    Frame::End { .. } => {}
                }
            }
            st.ingest_data(&n, data)?;
        }
        Ok(sent)
    });
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    let mut wire = 0u64;
    let mut end = None;
    let mut failure = None;
    'recv: while end.is_none() {
        match stream.next().await {
            Some(Ok(chunk)) => {
                wire += chunk.len() as u64;
                buf.extend_from_slice(&chunk);
            }
            Some(Err(e)) => {
                failure = Some(bad(format!("the ingest stream broke off: {e}")));
                break;
            }
            None => {
                failure = Some(bad("the ingest stream ended before its end frame"));
                break;
            }
        }
        loop {
            match take(&mut buf) {
                Ok(Some(frame)) => {
                    if let Frame::End { scanned, changed } = frame {
                        end = Some((scanned, changed));
                        if !buf.is_empty() || stream.next().await.is_some() {
                            failure = Some(bad("bytes after the end frame"));
                        }
                        break 'recv;
                    }
                    if tx.send(frame).await.is_err() {
                        break 'recv; // the writer failed; its error is reported below
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    failure = Some(bad(format!("malformed ingest stream: {e}")));
                    break 'recv;
                }
            }
        }
    }
    drop(tx);
    let written =
        writer.await.map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("ingest writer failed: {e}")))?;
    let sent = written?;
    if let Some(f) = failure {
        return Err(f);
    }
    let (scanned, changed) = end.ok_or_else(|| bad("the ingest stream ended before its end frame"))?;
    Ok((scanned, changed, sent, wire))
}
