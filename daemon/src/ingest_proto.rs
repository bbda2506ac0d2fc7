//! The ingest stream (docs/api.md, "Ingest"): frame codec and the daemon's receiver.
//!
//! Decoding is two-phase: `Ok(None)` means "need more bytes", `Err` means the stream is
//! malformed. The receiver parses frames on the async side and hands them to one blocking
//! writer through a small bounded channel, so receiving and writing overlap. The ingest
//! becomes a snapshot only when the `E` frame arrives; any other end abandons it, which frees
//! every block it wrote.

use axum::body::Body;
use axum::http::StatusCode;
use bytes::{Buf, Bytes, BytesMut};
use catalog::IngestSummary;
use futures_util::StreamExt;

use crate::api::{run_blocking, ApiError, Shared};

/// Largest number of blocks in one data frame (4 MiB).
pub const MAX_FRAME_BLOCKS: u32 = 1024;
const BS: usize = 4096;

/// One frame of an ingest stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// Changed blocks from `first`, with their crc32s.
    Data {
        /// First block index.
        first: u64,
        /// crc32 of each block.
        crcs: Vec<u32>,
        /// `crcs.len() * 4096` bytes.
        data: Bytes,
    },
    /// Blocks that are now zero.
    Zero {
        /// First block index.
        first: u64,
        /// Number of blocks.
        count: u32,
    },
    /// The end, with the agent's counts.
    End {
        /// Bytes of the image read.
        scanned: u64,
        /// Bytes found changed.
        changed: u64,
    },
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Parse one frame from the front of `buf`: `Ok(Some((frame, consumed)))`, `Ok(None)` when
/// more bytes are needed, or `Err` for malformed input. A data frame's `data` is left empty:
/// [`take`] fills it from the buffer without copying.
pub fn parse(buf: &[u8]) -> Result<Option<(Frame, usize)>, String> {
    let Some(&tag) = buf.first() else { return Ok(None) };
    match tag {
        b'D' | b'Z' => {
            if buf.len() < 13 {
                return Ok(None);
            }
            let first = u64_at(buf, 1);
            let count = u32_at(buf, 9);
            if count == 0 || count > MAX_FRAME_BLOCKS {
                return Err(format!("frame of {count} blocks: must be 1 to {MAX_FRAME_BLOCKS}"));
            }
            if tag == b'Z' {
                return Ok(Some((Frame::Zero { first, count }, 13)));
            }
            let n = count as usize;
            let total = 13 + 4 * n + BS * n;
            if buf.len() < total {
                return Ok(None);
            }
            let crcs = (0..n).map(|i| u32_at(buf, 13 + 4 * i)).collect();
            // The data is cut out of the buffer by `take` without copying.
            Ok(Some((Frame::Data { first, crcs, data: Bytes::new() }, total)))
        }
        b'E' => {
            if buf.len() < 17 {
                return Ok(None);
            }
            Ok(Some((Frame::End { scanned: u64_at(buf, 1), changed: u64_at(buf, 9) }, 17)))
        }
        other => Err(format!("unknown frame type 0x{other:02x}")),
    }
}

/// Remove the next frame from `buf`, with a data frame's payload split off uncopied.
pub fn take(buf: &mut BytesMut) -> Result<Option<Frame>, String> {
    let Some((mut frame, used)) = parse(buf)? else { return Ok(None) };
    let mut whole = buf.split_to(used);
    if let Frame::Data { crcs, data, .. } = &mut frame {
        whole.advance(13 + 4 * crcs.len());
        *data = whole.freeze();
    }
    Ok(Some(frame))
}

/// Append a data frame for `blocks` (a multiple of 4096 bytes) starting at block `first`.
pub fn encode_data(first: u64, blocks: &[u8], out: &mut Vec<u8>) {
    let n = blocks.len() / BS;
    out.push(b'D');
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
    for b in blocks.chunks_exact(BS) {
        out.extend_from_slice(&catalog::blockmap::block_crc(b).to_le_bytes());
    }
    out.extend_from_slice(blocks);
}

/// Append a zero frame.
pub fn encode_zero(first: u64, count: u32, out: &mut Vec<u8>) {
    out.push(b'Z');
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
}

/// Append the end frame.
pub fn encode_end(scanned: u64, changed: u64, out: &mut Vec<u8>) {
    out.push(b'E');
    out.extend_from_slice(&scanned.to_le_bytes());
    out.extend_from_slice(&changed.to_le_bytes());
}

fn bad(msg: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg)
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
                failure = Some(bad("the ingest stream ended before its end frame".into()));
                break;
            }
        }
        loop {
            match take(&mut buf) {
                Ok(Some(frame)) => {
                    if let Frame::End { scanned, changed } = frame {
                        end = Some((scanned, changed));
                        if !buf.is_empty() || stream.next().await.is_some() {
                            failure = Some(bad("bytes after the end frame".into()));
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
    let (scanned, changed) = end.ok_or_else(|| bad("the ingest stream ended before its end frame".into()))?;
    Ok((scanned, changed, sent, wire))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_need_more() {
        let mut out = Vec::new();
        let blocks: Vec<u8> = (0..2 * BS).map(|i| u8::try_from(i % 251).unwrap_or(0)).collect();
        encode_data(5, &blocks, &mut out);
        encode_zero(9, 3, &mut out);
        encode_end(100, 50, &mut out);
        let (_, used) = parse(&out).unwrap().unwrap();
        for cut in 0..used {
            assert_eq!(parse(&out[..cut]).unwrap(), None, "cut at {cut}");
        }
        let mut buf = BytesMut::from(&out[..]);
        let f = take(&mut buf).unwrap().unwrap();
        assert!(matches!(&f, Frame::Data { first: 5, crcs, data } if crcs.len() == 2 && data[..] == blocks[..]));
        assert_eq!(take(&mut buf).unwrap(), Some(Frame::Zero { first: 9, count: 3 }));
        assert_eq!(take(&mut buf).unwrap(), Some(Frame::End { scanned: 100, changed: 50 }));
        assert_eq!(take(&mut buf).unwrap(), None);
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert!(parse(b"X").is_err());
        let mut z = Vec::new();
        encode_zero(0, 0, &mut z);
        assert!(parse(&z).is_err());
        let mut d = vec![b'D'];
        d.extend_from_slice(&0u64.to_le_bytes());
        d.extend_from_slice(&(MAX_FRAME_BLOCKS + 1).to_le_bytes());
        assert!(parse(&d).is_err());
    }
}
