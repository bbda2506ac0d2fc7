//! The target's receiver of a replicated snapshot's frames (`POST /v1/replicas/{name}/incoming`):
//! from the request body into the incoming snapshot's staging tree, then the snapshot.
//!
//! Frames are the ingest stream's ([`crate::api::frames::Decoder`] checks every block's crc32
//! as it passes). Each frame is written once it is complete, with the mark of how far the
//! transfer got committed after it (`Store::incoming_frame`), and the store is flushed
//! whenever 2 MiB of data arrived since the last flush: a killed daemon loses at most that
//! (plus the frame under way) of what it had received, and the sender resumes at the mark.
//! Only the newest transfer into a volume writes (`IncomingClaims`): an older connection
//! that outlived a cut link is refused at its next frame. A sender that goes quiet for
//! [`IDLE`] is dropped; what arrived stays.

use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use bytes::Bytes;
use futures_util::StreamExt;

use super::{bad, blocking_api, ApiError, ApiResult, Shared};
use crate::api::frames::{Decoder, Event};
use crate::api::replication::IncomingDone;
use crate::server::lifecycle::DRAIN;
use crate::server::replication::IncomingTicket;
use crate::store::exports::Scope;

/// Data written since the last flush that makes the next frame flush first.
const FLUSH_EVERY: u64 = 2 << 20;

/// A sender silent this long is given up on.
const IDLE: Duration = Duration::from_secs(120);

/// The data frame being gathered: first block, count, payload so far.
type Gathering = (u64, u32, Vec<u8>);

/// Receive the frames of the snapshot declared for `name`; answers once it is a snapshot.
pub(super) async fn receive(s: Shared, ticket: IncomingTicket, name: String, body: Body) -> ApiResult<IncomingDone> {
    let mut stream = body.into_data_stream();
    let mut decoder = Decoder::new();
    let mut frame: Option<Gathering> = None;
    let (mut unflushed, mut payload) = (0u64, 0u64);
    loop {
        let chunk = match tokio::time::timeout(IDLE, stream.next()).await {
            Err(_) => {
                return Err(ApiError(StatusCode::REQUEST_TIMEOUT, "the sender went quiet; what arrived is kept".into()))
            }
            Ok(None) => return Err(bad("the stream ended before its end frame; what arrived is kept")),
            Ok(Some(Err(e))) => return Err(bad(format!("the stream broke: {e}; what arrived is kept"))),
            Ok(Some(Ok(c))) => c,
        };
        let mut input: &[u8] = &chunk;
        while let Some(event) =
            decoder.next(&mut input).map_err(|e| bad(format!("{e}; what arrived before it is kept")))?
        {
            let done = match event {
                Event::DataStart { first, count } => {
                    frame = Some((first, count, Vec::with_capacity(count as usize * 4096)));
                    None
                }
                Event::Payload(p) => {
                    if let Some((_, _, buf)) = frame.as_mut() {
                        buf.extend_from_slice(p);
                    }
                    None
                }
                Event::DataEnd => {
                    let (first, count, buf) = frame.take().ok_or_else(|| bad("frame payload without a frame"))?;
                    let len = buf.len() as u64;
                    let flush = unflushed + len > FLUSH_EVERY;
                    write(&s, &ticket, &name, first, count, Some(Bytes::from(buf)), flush).await?;
                    unflushed = if flush { len } else { unflushed + len };
                    payload += len;
                    None
                }
                Event::Zero { first, count } => {
                    write(&s, &ticket, &name, first, count, None, false).await?;
                    None
                }
                Event::End { .. } => Some(finish(&s, &ticket, &name, payload).await?),
            };
            if let Some(done) = done {
                return Ok(done);
            }
        }
    }
}

/// Write one frame (after flushing what came before it, with `flush_first`), if this
/// transfer is still the newest.
async fn write(
    s: &Shared,
    ticket: &IncomingTicket,
    name: &str,
    first: u64,
    count: u32,
    data: Option<Bytes>,
    flush_first: bool,
) -> ApiResult<()> {
    let (t, n) = (ticket.clone(), name.to_string());
    blocking_api(s, move |st| {
        t.while_newest(|| -> ApiResult<()> {
            if flush_first {
                st.flush()?;
            }
            Ok(st.incoming_frame(&n, first, u64::from(count), data)?)
        })
        .unwrap_or_else(|| Err(superseded(&n)))
    })
    .await
}

async fn finish(s: &Shared, ticket: &IncomingTicket, name: &str, payload_bytes: u64) -> ApiResult<IncomingDone> {
    let (t, n) = (ticket.clone(), name.to_string());
    blocking_api(s, move |st| {
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

fn superseded(name: &str) -> ApiError {
    ApiError(StatusCode::CONFLICT, format!("a newer transfer into `{name}` took over from this one"))
}
