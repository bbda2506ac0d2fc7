//! The HTTP JSON API (docs/api.md): catalog operations, data access, ingest and metrics.
//!
//! Handlers run store calls on tokio's blocking pool (the store does synchronous I/O and
//! fsyncs). Every error leaves through [`ApiError`], the one place that maps store errors to
//! HTTP statuses and counts them.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use catalog::{format_time, CatalogError, Volume};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::exports::Scope;
use crate::ingest_proto;
use crate::store::{Store, StoreError, MAX_IO};

/// How long a rewind, refresh or delete waits for connected clients to be closed.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Shared state of the API handlers.
pub type Shared = Arc<Store>;

/// An API error: a status and one line of text.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        use CatalogError as C;
        let status = match &e {
            e if crate::store::is_enospc(e) => StatusCode::INSUFFICIENT_STORAGE,
            StoreError::Catalog(c) => match c {
                C::UnknownVolume(_) | C::UnknownSnapshot(_) => StatusCode::NOT_FOUND,
                C::BadReference { .. }
                | C::InvalidName { .. }
                | C::InvalidSize { .. }
                | C::OutOfRange { .. }
                | C::NotAClone(..)
                | C::NotASource(_)
                | C::NotInLineage { .. }
                | C::BeforeFirstSnapshot { .. } => StatusCode::BAD_REQUEST,
                C::ReadOnly(_) => StatusCode::FORBIDDEN,
                C::NameTaken(_)
                | C::BookmarkTaken { .. }
                | C::HasDependents { .. }
                | C::IngestRunning(_)
                | C::NoIngest(_) => StatusCode::CONFLICT,
                C::Map(_) | C::Corrupt(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            StoreError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.0.is_server_error() {
            tracing::error!(status = %self.0, error = %self.1, "request failed");
        } else {
            tracing::debug!(status = %self.0, error = %self.1, "request refused");
        }
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

type ApiResult<T> = Result<T, ApiError>;

/// Run a store call on the blocking pool.
async fn blocking<T: Send + 'static>(
    store: &Shared,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> ApiResult<T> {
    let s = store.clone();
    let r = tokio::task::spawn_blocking(move || f(&s))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("internal task failed: {e}")))?;
    if r.is_err() {
        store.metrics.api_errors.inc();
    }
    Ok(r?)
}

/// Build the router. With `auth`, every request (`/metrics` and unknown paths included) must
/// carry that bearer token (see [`crate::auth`]).
pub fn router(store: Shared, auth: Option<Arc<crate::auth::Token>>) -> Router {
    let router = Router::new()
        .route("/v1/volumes", get(list))
        .route("/v1/volumes/:name", get(show).delete(remove))
        .route("/v1/sources", post(create_source))
        .route("/v1/volumes/:name/snapshots", post(snapshot))
        .route("/v1/clones", post(clone_volume))
        .route("/v1/volumes/:name/rewind", post(rewind))
        .route("/v1/volumes/:name/refresh", post(refresh))
        .route("/v1/snapshots/:reference/bookmarks", post(bookmark))
        .route("/v1/tree", get(tree))
        .route(
            "/v1/volumes/:name/data",
            get(read_data).put(write_data).layer(DefaultBodyLimit::max(usize::try_from(MAX_IO).unwrap_or(usize::MAX))),
        )
        .route("/v1/volumes/:name/zero", post(zero))
        .route("/v1/volumes/:name/flush", post(flush))
        .route("/v1/volumes/:name/extents", get(extents))
        .route("/v1/sources/:name/digests", get(digests).post(digests_in).layer(DefaultBodyLimit::max(64 << 20)))
        .route("/v1/sources/:name/ingest", post(ingest).layer(DefaultBodyLimit::disable()))
        .route("/v1/sources/:name/ingest", delete(abort_ingest))
        .route("/metrics", get(metrics))
        .merge(crate::api_resize::routes())
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such API endpoint (see docs/api.md)".into()) })
        .with_state(store);
    match auth {
        Some(token) => router.layer(axum::middleware::from_fn_with_state(token, crate::auth::require_token)),
        None => router,
    }
}

/// JSON for a volume, with space accounting and, if asked, its snapshots.
/// JSON for a volume. Without `space`, `unique_bytes` is null: computing it walks whatever the
/// volume holds alone, which callers such as the ingest agent do not need.
pub fn volume_json(cat: &catalog::Catalog, v: &Volume, with_snapshots: bool) -> Result<Value, StoreError> {
    volume_json_with(cat, v, with_snapshots, true)
}

/// [`volume_json`], choosing whether to compute unique bytes.
pub fn volume_json_with(
    cat: &catalog::Catalog,
    v: &Volume,
    with_snapshots: bool,
    space: bool,
) -> Result<Value, StoreError> {
    let unique = |roots: &[catalog::NodeId]| -> Result<Value, StoreError> {
        Ok(if space { json!(cat.unique_bytes(roots)?) } else { Value::Null })
    };
    let mut o = json!({
        "name": v.name,
        "kind": v.kind,
        "size_bytes": v.size_bytes,
        "origin": v.origin.as_ref().map(|o| o.to_string()),
        "created_at": format_time(v.created_at),
        "timeflow": v.timeflow,
        "allocated_bytes": v.allocated_blocks * catalog::BLOCK_SIZE,
        "unique_bytes": unique(&v.roots())?,
        "exports": { "nbd": v.name, "iscsi": format!("iqn.2026-11.dev.forkd:{}", v.name) },
        "ingest_running": v.staging.is_some(),
        "ingest_pending_bytes": v.staging.as_ref().map(|st| st.allocated_blocks * catalog::BLOCK_SIZE),
    });
    if with_snapshots {
        let mut snaps = Vec::new();
        for s in &v.snapshots {
            snaps.push(json!({
                "id": s.id,
                "name": format!("{}@{}", v.name, s.id),
                "created_at": format_time(s.created_at),
                "timeflow": s.timeflow,
                "bookmarks": s.bookmarks,
                "reason": s.reason,
                "size_bytes": s.size_bytes,
                "allocated_bytes": s.allocated_blocks * catalog::BLOCK_SIZE,
                "unique_bytes": unique(&[s.root])?,
                "ingest": s.ingest,
            }));
        }
        o["snapshots"] = Value::Array(snaps);
    } else {
        o["snapshot_count"] = json!(v.snapshots.len());
    }
    Ok(o)
}

async fn list(State(s): State<Shared>) -> ApiResult<Json<Value>> {
    blocking(&s, |st| {
        let cat = st.catalog();
        let vols: Result<Vec<Value>, _> = cat.volumes().values().map(|v| volume_json(&cat, v, false)).collect();
        Ok(Json(json!({ "volumes": vols? })))
    })
    .await
}

#[derive(Deserialize)]
struct ShowQuery {
    space: Option<bool>,
}

async fn show(State(s): State<Shared>, Path(name): Path<String>, Query(q): Query<ShowQuery>) -> ApiResult<Json<Value>> {
    blocking(&s, move |st| {
        let cat = st.catalog();
        let v = cat.volume(&name)?;
        Ok(Json(volume_json_with(&cat, v, true, q.space != Some(false))?))
    })
    .await
}

#[derive(Deserialize)]
struct CreateSource {
    name: String,
    size: Value,
}

async fn create_source(State(s): State<Shared>, body: Json<CreateSource>) -> ApiResult<(StatusCode, Json<Value>)> {
    let size = match &body.size {
        Value::Number(n) => n.as_u64().ok_or_else(|| bad("size must be a positive whole number of bytes"))?,
        Value::String(t) => catalog::parse_size(t).map_err(StoreError::from)?,
        _ => return Err(bad("size must be a number of bytes or a string such as \"10G\"")),
    };
    let name = body.name.clone();
    let v = blocking(&s, move |st| {
        st.op(|cat| cat.create_source(&name, size))?;
        let cat = st.catalog();
        volume_json(&cat, cat.volume(&name)?, true)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(v)))
}

#[derive(Deserialize, Default)]
struct SnapshotBody {
    bookmark: Option<String>,
}

async fn snapshot(
    State(s): State<Shared>,
    Path(name): Path<String>,
    body: Option<Json<SnapshotBody>>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let bookmark = body.and_then(|b| b.0.bookmark);
    let id = blocking(&s, move |st| st.op(|cat| cat.snapshot(&name, bookmark.as_deref()))).await?;
    Ok((StatusCode::CREATED, Json(json!({ "snapshot": id.to_string() }))))
}

#[derive(Deserialize)]
struct CloneBody {
    from: String,
    name: String,
}

async fn clone_volume(State(s): State<Shared>, body: Json<CloneBody>) -> ApiResult<(StatusCode, Json<Value>)> {
    let CloneBody { from, name } = body.0;
    let v = blocking(&s, move |st| {
        let (_, made_from) = st.op(|cat| cat.clone_volume(&from, &name))?;
        let cat = st.catalog();
        let mut v = volume_json(&cat, cat.volume(&name)?, true)?;
        v["made_from"] = json!(made_from.to_string());
        Ok(v)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(v)))
}

#[derive(Deserialize, Default)]
struct MoveBody {
    to: Option<String>,
}

async fn rewind(State(s): State<Shared>, Path(name): Path<String>, body: Json<MoveBody>) -> ApiResult<Json<Value>> {
    let to = body.0.to.ok_or_else(|| bad("rewind needs \"to\": a snapshot or a time"))?;
    blocking(&s, move |st| {
        let _fence = st.exports.fence_and_drain(&name, Scope::Head, DRAIN);
        let (target, kept) = st.op(|cat| cat.rewind(&name, &to))?;
        Ok(Json(json!({ "volume": name, "target": target.to_string(), "kept": kept.to_string() })))
    })
    .await
}

async fn refresh(
    State(s): State<Shared>,
    Path(name): Path<String>,
    body: Option<Json<MoveBody>>,
) -> ApiResult<Json<Value>> {
    let to = body.and_then(|b| b.0.to);
    blocking(&s, move |st| {
        let _fence = st.exports.fence_and_drain(&name, Scope::Head, DRAIN);
        let (target, kept) = st.op(|cat| cat.refresh(&name, to.as_deref()))?;
        Ok(Json(json!({ "volume": name, "target": target.to_string(), "kept": kept.to_string() })))
    })
    .await
}

#[derive(Deserialize)]
struct BookmarkBody {
    name: String,
}

async fn bookmark(
    State(s): State<Shared>,
    Path(reference): Path<String>,
    body: Json<BookmarkBody>,
) -> ApiResult<Json<Value>> {
    let name = body.0.name;
    blocking(&s, move |st| {
        let id = st.op(|cat| cat.bookmark(&reference, &name))?;
        Ok(Json(json!({ "snapshot": id.to_string() })))
    })
    .await
}

async fn remove(State(s): State<Shared>, Path(reference): Path<String>) -> ApiResult<Json<Value>> {
    blocking(&s, move |st| {
        let before = st.metrics.freed_bytes.get();
        let _fence = st.exports.fence_and_drain(&reference, Scope::Volume, DRAIN);
        // `op` flushes: the slots the delete freed are punched and counted by then.
        st.op(|cat| cat.delete(&reference))?;
        Ok(Json(json!({ "deleted": reference, "freed_bytes": st.metrics.freed_bytes.get() - before })))
    })
    .await
}

async fn tree(State(s): State<Shared>) -> ApiResult<Json<Value>> {
    blocking(&s, |st| {
        let cat = st.catalog();
        let vols: Vec<Value> = cat
            .volumes()
            .values()
            .map(|v| {
                let snaps: Vec<Value> = v
                    .snapshots
                    .iter()
                    .map(|s| {
                        json!({
                            "name": format!("{}@{}", v.name, s.id),
                            "created_at": format_time(s.created_at),
                            "bookmarks": s.bookmarks,
                            "timeflow": s.timeflow,
                        })
                    })
                    .collect();
                json!({
                    "name": v.name, "kind": v.kind, "size_bytes": v.size_bytes, "timeflow": v.timeflow,
                    "origin": v.origin.as_ref().map(|o| o.to_string()), "snapshots": snaps,
                })
            })
            .collect();
        Ok(Json(json!({ "volumes": vols })))
    })
    .await
}

#[derive(Deserialize)]
struct Range {
    offset: Option<u64>,
    length: Option<u64>,
}

async fn read_data(State(s): State<Shared>, Path(name): Path<String>, Query(q): Query<Range>) -> ApiResult<Response> {
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

async fn write_data(
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

async fn zero(State(s): State<Shared>, Path(name): Path<String>, Query(q): Query<Range>) -> ApiResult<Json<Value>> {
    let (offset, length) = (q.offset.unwrap_or(0), q.length.ok_or_else(|| bad("zero needs ?offset=O&length=L"))?);
    blocking(&s, move |st| st.zero(&name, offset, length)).await?;
    Ok(Json(json!({ "zeroed": length })))
}

async fn flush(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    blocking(&s, move |st| {
        st.catalog().volume(&name)?;
        st.flush()
    })
    .await?;
    Ok(Json(json!({})))
}

async fn extents(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let (size, ext) = blocking(&s, move |st| st.extents(&name)).await?;
    Ok(Json(json!({ "size_bytes": size, "extents": ext })))
}

async fn digests(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<Response> {
    let d = blocking(&s, move |st| st.digests(&name)).await?;
    Ok(digest_response(d))
}

/// Digests of only the block ranges in the body: pairs of (first block, count), u64 LE.
async fn digests_in(State(s): State<Shared>, Path(name): Path<String>, body: axum::body::Bytes) -> ApiResult<Response> {
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

async fn ingest(State(s): State<Shared>, Path(name): Path<String>, body: Body) -> ApiResult<Json<Value>> {
    let (snapshot, summary) = ingest_proto::receive(s, name, body).await?;
    Ok(Json(json!({ "snapshot": snapshot, "summary": summary })))
}

async fn abort_ingest(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
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

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render())
}

/// Exposed for the ingest receiver.
pub(crate) async fn run_blocking<T: Send + 'static>(
    store: &Shared,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> ApiResult<T> {
    blocking(store, f).await
}
