//! The data routes: read, write, zero and flush a volume's bytes over HTTP, and its extents.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::extract::{ApiPath, ApiQuery, RawBody};
use super::{bad, blocking, ApiResult, Shared};
use crate::api::data::{Binary, Empty, Extents, Range, Written, Zeroed};
use crate::api::error::ErrorBody;
use crate::store::{StoreError, MAX_IO};

/// [`MAX_IO`] as a body limit.
const MAX_BODY: usize = 64 << 20;
const _: () = assert!(MAX_BODY as u64 == MAX_IO);

#[utoipa::path(get, path = "/v1/volumes/{name}/data", tag = "data",
    params(("name" = String, Path, description = "volume or snapshot reference"), Range),
    responses((status = 200, description = "the raw bytes", content_type = "application/octet-stream", body = Binary),
        (status = 400, description = "no length, or beyond the end", body = ErrorBody),
        (status = 404, description = "no such volume or snapshot", body = ErrorBody),
        (status = 413, description = "more than 64 MiB", body = ErrorBody)))]
pub(super) async fn read_data(
    State(s): State<Shared>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<Range>,
) -> ApiResult<Response> {
    let offset = q.offset.unwrap_or(0);
    let length = q.length.ok_or_else(|| bad("read needs ?offset=O&length=L"))?;
    if length > MAX_IO {
        return Err(StoreError::TooLarge(length).into());
    }
    let data = blocking(&s, move |st| {
        st.catalog().downstream(&name)?;
        let mut buf = vec![0u8; usize::try_from(length).unwrap_or(0)];
        st.exports.touch(&name);
        st.read(&name, offset, &mut buf)?;
        Ok(buf)
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

#[utoipa::path(put, path = "/v1/volumes/{name}/data", tag = "data",
    params(("name" = String, Path, description = "clone name"), Range),
    request_body(content = Binary, content_type = "application/octet-stream", description = "the bytes to write, at most 64 MiB"),
    responses((status = 200, description = "bytes written", body = Written),
        (status = 400, description = "no offset, or beyond the end", body = ErrorBody),
        (status = 403, description = "a source or snapshot (read-only)", body = ErrorBody),
        (status = 404, description = "no such volume", body = ErrorBody),
        (status = 413, description = "more than 64 MiB", body = ErrorBody)))]
pub(super) async fn write_data(
    State(s): State<Shared>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<Range>,
    RawBody(body): RawBody<MAX_BODY>,
) -> ApiResult<Json<Written>> {
    let offset = q.offset.ok_or_else(|| bad("write needs ?offset=O"))?;
    let written = body.len() as u64;
    blocking(&s, move |st| {
        st.catalog().downstream(&name)?;
        st.exports.touch(&name);
        st.write(&name, offset, &body)
    })
    .await?;
    Ok(Json(Written { written }))
}

#[utoipa::path(post, path = "/v1/volumes/{name}/zero", tag = "data",
    params(("name" = String, Path, description = "clone name"), Range),
    responses((status = 200, description = "bytes zeroed", body = Zeroed),
        (status = 400, description = "no length, unaligned, or beyond the end", body = ErrorBody),
        (status = 403, description = "a source or snapshot (read-only)", body = ErrorBody),
        (status = 404, description = "no such volume", body = ErrorBody)))]
pub(super) async fn zero(
    State(s): State<Shared>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<Range>,
) -> ApiResult<Json<Zeroed>> {
    let (offset, length) = (q.offset.unwrap_or(0), q.length.ok_or_else(|| bad("zero needs ?offset=O&length=L"))?);
    blocking(&s, move |st| {
        st.catalog().downstream(&name)?;
        st.exports.touch(&name);
        st.zero(&name, offset, length)
    })
    .await?;
    Ok(Json(Zeroed { zeroed: length }))
}

#[utoipa::path(post, path = "/v1/volumes/{name}/flush", tag = "data",
    params(("name" = String, Path, description = "volume name")),
    responses((status = 200, description = "every write answered before is durable", body = Empty),
        (status = 404, description = "no such volume", body = ErrorBody)))]
pub(super) async fn flush(State(s): State<Shared>, ApiPath(name): ApiPath<String>) -> ApiResult<Json<Empty>> {
    blocking(&s, move |st| {
        st.catalog().volume(&name)?;
        st.flush()
    })
    .await?;
    Ok(Json(Empty {}))
}

#[utoipa::path(get, path = "/v1/volumes/{name}/extents", tag = "data",
    params(("name" = String, Path, description = "volume or snapshot reference")),
    responses((status = 200, description = "the ranges holding data", body = Extents),
        (status = 404, description = "no such volume or snapshot", body = ErrorBody)))]
pub(super) async fn extents(State(s): State<Shared>, ApiPath(name): ApiPath<String>) -> ApiResult<Json<Extents>> {
    let (size_bytes, extents) = blocking(&s, move |st| st.extents(&name)).await?;
    Ok(Json(Extents { extents, size_bytes }))
}
