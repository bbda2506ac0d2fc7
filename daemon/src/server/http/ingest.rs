//! The ingest routes: the source's block digests (what the agent compares against; blocks
//! known to be damaged get a poisoned digest, see `store::scrub`), the
//! ingest stream (`POST /v1/sources/{name}/ingest`, received by [`super::ingest_stream`]) and
//! its abort.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::extract::{ApiPath, RawBody};
use super::{bad, blocking, blocking_api, ingest_stream, ApiError, ApiResult, Hooks, Shared};
use crate::api::data::{Binary, Empty};
use crate::api::error::ErrorBody;
use crate::api::ingest::{decode_pairs, encode_pairs, IngestAnswer};
use crate::server::lifecycle;

/// Largest block-range list `POST .../digests` takes.
const MAX_RANGES_BODY: usize = 64 << 20;

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
    let answer = ingest_stream::receive(s.clone(), name.clone(), body).await?;
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
