//! The data routes: read, write, zero and flush a volume's bytes over HTTP, and its extents.

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{bad, blocking, ApiResult, Shared};
use crate::store::{StoreError, MAX_IO};

#[derive(Deserialize)]
pub(super) struct Range {
    offset: Option<u64>,
    length: Option<u64>,
}

pub(super) async fn read_data(
    State(s): State<Shared>,
    Path(name): Path<String>,
    Query(q): Query<Range>,
) -> ApiResult<Response> {
    let offset = q.offset.unwrap_or(0);
    let length = q.length.ok_or_else(|| bad("read needs ?offset=O&length=L"))?;
    if length > MAX_IO {
        return Err(StoreError::TooLarge(length).into());
    }
    let data = blocking(&s, move |st| {
        let mut buf = vec![0u8; usize::try_from(length).unwrap_or(0)];
        st.read(&name, offset, &mut buf)?;
        Ok(buf)
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

pub(super) async fn write_data(
    State(s): State<Shared>,
    Path(name): Path<String>,
    Query(q): Query<Range>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let offset = q.offset.ok_or_else(|| bad("write needs ?offset=O"))?;
    let n = body.len();
    blocking(&s, move |st| st.write(&name, offset, &body)).await?;
    Ok(Json(json!({ "written": n })))
}

pub(super) async fn zero(
    State(s): State<Shared>,
    Path(name): Path<String>,
    Query(q): Query<Range>,
) -> ApiResult<Json<Value>> {
    let (offset, length) = (q.offset.unwrap_or(0), q.length.ok_or_else(|| bad("zero needs ?offset=O&length=L"))?);
    blocking(&s, move |st| st.zero(&name, offset, length)).await?;
    Ok(Json(json!({ "zeroed": length })))
}

pub(super) async fn flush(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    blocking(&s, move |st| {
        st.catalog().volume(&name)?;
        st.flush()
    })
    .await?;
    Ok(Json(json!({})))
}

pub(super) async fn extents(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let (size, ext) = blocking(&s, move |st| st.extents(&name)).await?;
    Ok(Json(json!({ "size_bytes": size, "extents": ext })))
}
