//! The volume routes: list, show, create a source, snapshot, clone, rewind, refresh,
//! bookmark, delete, and the lineage tree; and the one place a volume becomes JSON.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use catalog::{format_time, Volume};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{bad, blocking, ApiResult, Shared, DRAIN};
use crate::server::exports::Scope;
use crate::store::StoreError;

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

pub(super) async fn list(State(s): State<Shared>) -> ApiResult<Json<Value>> {
    blocking(&s, |st| {
        let cat = st.catalog();
        let vols: Result<Vec<Value>, _> = cat.volumes().values().map(|v| volume_json(&cat, v, false)).collect();
        Ok(Json(json!({ "volumes": vols? })))
    })
    .await
}

#[derive(Deserialize)]
pub(super) struct ShowQuery {
    space: Option<bool>,
}

pub(super) async fn show(
    State(s): State<Shared>,
    Path(name): Path<String>,
    Query(q): Query<ShowQuery>,
) -> ApiResult<Json<Value>> {
    blocking(&s, move |st| {
        let cat = st.catalog();
        let v = cat.volume(&name)?;
        Ok(Json(volume_json_with(&cat, v, true, q.space != Some(false))?))
    })
    .await
}

#[derive(Deserialize)]
pub(super) struct CreateSource {
    name: String,
    size: Value,
}

pub(super) async fn create_source(
    State(s): State<Shared>,
    body: Json<CreateSource>,
) -> ApiResult<(StatusCode, Json<Value>)> {
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
pub(super) struct SnapshotBody {
    bookmark: Option<String>,
}

pub(super) async fn snapshot(
    State(s): State<Shared>,
    Path(name): Path<String>,
    body: Option<Json<SnapshotBody>>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let bookmark = body.and_then(|b| b.0.bookmark);
    let id = blocking(&s, move |st| st.op(|cat| cat.snapshot(&name, bookmark.as_deref()))).await?;
    Ok((StatusCode::CREATED, Json(json!({ "snapshot": id.to_string() }))))
}

#[derive(Deserialize)]
pub(super) struct CloneBody {
    from: String,
    name: String,
}

pub(super) async fn clone_volume(
    State(s): State<Shared>,
    body: Json<CloneBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
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
pub(super) struct MoveBody {
    to: Option<String>,
}

pub(super) async fn rewind(
    State(s): State<Shared>,
    Path(name): Path<String>,
    body: Json<MoveBody>,
) -> ApiResult<Json<Value>> {
    let to = body.0.to.ok_or_else(|| bad("rewind needs \"to\": a snapshot or a time"))?;
    blocking(&s, move |st| {
        let _fence = st.exports.fence_and_drain(&name, Scope::Head, DRAIN);
        let (target, kept) = st.op(|cat| cat.rewind(&name, &to))?;
        Ok(Json(json!({ "volume": name, "target": target.to_string(), "kept": kept.to_string() })))
    })
    .await
}

pub(super) async fn refresh(
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
pub(super) struct BookmarkBody {
    name: String,
}

pub(super) async fn bookmark(
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

pub(super) async fn remove(State(s): State<Shared>, Path(reference): Path<String>) -> ApiResult<Json<Value>> {
    blocking(&s, move |st| {
        let before = st.metrics.freed_bytes.get();
        let _fence = st.exports.fence_and_drain(&reference, Scope::Volume, DRAIN);
        // `op` flushes: the slots the delete freed are punched and counted by then.
        st.op(|cat| cat.delete(&reference))?;
        Ok(Json(json!({ "deleted": reference, "freed_bytes": st.metrics.freed_bytes.get() - before })))
    })
    .await
}

pub(super) async fn tree(State(s): State<Shared>) -> ApiResult<Json<Value>> {
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
