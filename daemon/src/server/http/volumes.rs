//! The volume routes: list, show, create a source, snapshot, clone, rewind, refresh,
//! bookmark, delete, and the lineage tree; and the one place a catalog volume becomes the
//! API's [`Volume`].

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use catalog::{format_time, Catalog, CatalogError, SnapshotId};

use super::extract::{ApiPath, ApiQuery, JsonBody, OptionalJson};
use super::{bad, blocking, blocking_api, ApiResult, Hooks, Shared};
use crate::api::error::ErrorBody;
use crate::api::leases::LeaseInfo;
use crate::api::volumes::{
    BookmarkRequest, CloneAnswer, CloneRequest, CreateSource, Deleted, Exports, IngestSummary, MaskInfo, MoveRequest,
    Moved, ShowQuery, Size, Snapshot, SnapshotRequest, SnapshotTaken, Tree, TreeSnapshot, TreeVolume, Volume,
    VolumeKind, VolumeList,
};
use crate::server::lifecycle::{self, Move};
use crate::store::StoreError;

/// The API's view of a catalog volume: with its snapshots or only their count, and with space
/// accounting (`unique_bytes`) or null there. A volume's unique bytes are kept by the catalog
/// (a walk only when they went stale); each snapshot's is a walk of what it holds alone, which
/// callers such as the ingest agent do not need.
pub(super) fn volume(
    cat: &Catalog,
    v: &catalog::Volume,
    with_snapshots: bool,
    space: bool,
) -> Result<Volume, StoreError> {
    let unique = |root: catalog::NodeId| -> Result<Option<u64>, StoreError> {
        Ok(if space { Some(cat.unique_bytes(&[root])?) } else { None })
    };
    let (snapshots, snapshot_count) = if with_snapshots {
        let snaps: Result<Vec<Snapshot>, StoreError> =
            v.snapshots.iter().map(|s| Ok(snapshot(&v.name, s, unique(s.root)?))).collect();
        (Some(snaps?), None)
    } else {
        (None, Some(v.snapshots.len() as u64))
    };
    Ok(Volume {
        allocated_bytes: v.allocated_blocks * catalog::BLOCK_SIZE,
        clone_from: v.clone_from_masked.then(|| "masked".to_string()),
        masked_from: v.masked_from.clone(),
        lease: v.lease.as_ref().map(lease),
        default_lease: v.lease_policy.and_then(|p| p.default_ms).map(catalog::format_span),
        max_lease: v.lease_policy.and_then(|p| p.max_ms).map(catalog::format_span),
        quota_bytes: v.quota_bytes,
        default_quota_bytes: v.default_quota,
        created_at: format_time(v.created_at),
        detached_from: v.detached_from.as_ref().map(ToString::to_string),
        environment: cat.environment_of(&v.name).map(|e| e.name.clone()),
        exports: Exports { iscsi: format!("iqn.2026-11.dev.forkd:{}", v.name), nbd: v.name.clone() },
        ingest_pending_bytes: v.staging.as_ref().map(|st| st.allocated_blocks * catalog::BLOCK_SIZE),
        ingest_running: v.staging.is_some(),
        kind: kind(v.kind),
        name: v.name.clone(),
        origin: v.origin.as_ref().map(ToString::to_string),
        retention: v.retention.as_ref().map(super::retention::api_rules),
        size_bytes: v.size_bytes,
        snapshot_count,
        snapshots,
        timeflow: v.timeflow,
        unique_bytes: if space { Some(cat.unique_blocks_of(v)? * catalog::BLOCK_SIZE) } else { None },
        read_only: v.kind == catalog::Kind::Source || v.replica_of.is_some(),
        replica_of: v.replica_of.as_ref().map(|r| super::replicas::replica_of(v, r)),
        replication: None,
    })
}

/// The API's view of a clone's (or an environment's) lease.
pub(super) fn lease(l: &catalog::Lease) -> LeaseInfo {
    LeaseInfo { expires_at: l.expires_at.map(format_time), idle: l.idle_ms.map(catalog::format_span) }
}

fn snapshot(volume: &str, s: &catalog::Snapshot, unique_bytes: Option<u64>) -> Snapshot {
    Snapshot {
        allocated_bytes: s.allocated_blocks * catalog::BLOCK_SIZE,
        bookmarks: s.bookmarks.clone(),
        created_at: format_time(s.created_at),
        id: s.id,
        ingest: s.ingest.as_ref().map(summary),
        masked: s.masked.is_some(),
        mask: s.masked.as_ref().map(|m| MaskInfo {
            source: m.source.to_string(),
            script: m.script.clone(),
            script_sha256: m.script_sha256.clone(),
        }),
        name: format!("{volume}@{}", s.id),
        reason: s.reason.clone(),
        size_bytes: s.size_bytes,
        timeflow: s.timeflow,
        unique_bytes,
    }
}

fn kind(k: catalog::Kind) -> VolumeKind {
    match k {
        catalog::Kind::Source => VolumeKind::Source,
        catalog::Kind::Clone => VolumeKind::Clone,
    }
}

/// The API's view of what an ingest did.
pub(super) fn summary(s: &catalog::IngestSummary) -> IngestSummary {
    IngestSummary {
        changed_bytes: s.changed_bytes,
        duration_ms: s.duration_ms,
        scanned_bytes: s.scanned_bytes,
        sent_bytes: s.sent_bytes,
        wire_bytes: s.wire_bytes,
    }
}

/// The bytes a request's [`Size`] names; `example` is shown when it is neither a number nor
/// text.
pub(super) fn size_bytes(size: &Size, example: &str) -> ApiResult<u64> {
    match size {
        Size::Bytes(n) => Ok(*n),
        Size::Text(t) => Ok(catalog::parse_size(t).map_err(StoreError::from)?),
        Size::Other(serde_json::Value::Number(_)) => Err(bad("size must be a positive whole number of bytes")),
        Size::Other(_) => Err(bad(format!("size must be a number of bytes or a string such as \"{example}\""))),
    }
}

#[utoipa::path(get, path = "/v1/volumes", tag = "volumes",
    responses((status = 200, description = "every volume, with `snapshot_count`", body = VolumeList)))]
pub(super) async fn list(State(s): State<Shared>) -> ApiResult<Json<VolumeList>> {
    blocking(&s, |st| {
        let cat = st.catalog();
        let volumes: Result<Vec<Volume>, _> = cat.volumes().values().map(|v| volume(&cat, v, false, true)).collect();
        Ok(Json(VolumeList { volumes: volumes? }))
    })
    .await
}

#[utoipa::path(get, path = "/v1/volumes/{name}", tag = "volumes",
    params(("name" = String, Path, description = "volume name"), ShowQuery),
    responses((status = 200, description = "the volume with its snapshots", body = Volume),
        (status = 404, description = "no such volume", body = ErrorBody)))]
pub(super) async fn show(
    State(s): State<Shared>,
    Extension(rep): super::replicas::Rep,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<ShowQuery>,
) -> ApiResult<Json<Volume>> {
    blocking(&s, move |st| {
        let mut shown = {
            let cat = st.catalog();
            volume(&cat, cat.volume(&name)?, true, q.space != Some(false))?
        };
        // A volume that now follows another site reports that (`replica_of`), not the
        // replication it once ran from here.
        if shown.replica_of.is_none() {
            shown.replication = rep.status(&name, crate::server::replication::now_ms());
        }
        Ok(Json(shown))
    })
    .await
}

#[utoipa::path(post, path = "/v1/sources", tag = "volumes", request_body = CreateSource,
    responses((status = 201, description = "the new source", body = Volume),
        (status = 400, description = "invalid name or size", body = ErrorBody),
        (status = 409, description = "the name is taken", body = ErrorBody)))]
pub(super) async fn create_source(
    State(s): State<Shared>,
    JsonBody(body): JsonBody<CreateSource>,
) -> ApiResult<(StatusCode, Json<Volume>)> {
    let size = size_bytes(&body.size, "10G")?;
    let name = body.name;
    let v = blocking(&s, move |st| {
        st.op(|cat| cat.create_source(&name, size))?;
        let cat = st.catalog();
        volume(&cat, cat.volume(&name)?, true, true)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(v)))
}

#[utoipa::path(post, path = "/v1/volumes/{name}/snapshots", tag = "volumes",
    params(("name" = String, Path, description = "volume name")),
    request_body(content = Option<SnapshotRequest>, description = "optional: `{\"bookmark\": NAME}`, `{}` or none"),
    responses((status = 201, description = "the new snapshot", body = SnapshotTaken),
        (status = 404, description = "no such volume", body = ErrorBody),
        (status = 409, description = "the bookmark is taken", body = ErrorBody)))]
pub(super) async fn snapshot_volume(
    State(s): State<Shared>,
    Extension(ev): Hooks,
    ApiPath(name): ApiPath<String>,
    OptionalJson(body): OptionalJson<SnapshotRequest>,
) -> ApiResult<(StatusCode, Json<SnapshotTaken>)> {
    let bookmark = body.and_then(|b| b.bookmark);
    let id = blocking_api(&s, move |st| lifecycle::snapshot(st, &ev, &name, bookmark.as_deref())).await?;
    Ok((StatusCode::CREATED, Json(SnapshotTaken { snapshot: id.to_string() })))
}

#[utoipa::path(post, path = "/v1/clones", tag = "volumes", request_body = CloneRequest,
    responses((status = 201, description = "the new clone, plus `made_from`", body = CloneAnswer),
        (status = 400, description = "invalid name or reference, or a lease beyond the source's max_lease", body = ErrorBody),
        (status = 404, description = "no such volume or snapshot", body = ErrorBody),
        (status = 409, description = "the name is taken", body = ErrorBody),
        (status = 507, description = "the pool is below its low-space threshold, or the disk is full", body = ErrorBody)))]
pub(super) async fn clone_volume(
    State(s): State<Shared>,
    Extension(ev): Hooks,
    Extension(clock): super::leases::Now,
    JsonBody(body): JsonBody<CloneRequest>,
) -> ApiResult<(StatusCode, Json<CloneAnswer>)> {
    let CloneRequest { from, name, lease, quota } = body;
    let lease_ms = lease.map(|l| crate::server::leases::span("lease", &l)).transpose().map_err(bad)?;
    let quota_bytes = quota.map(|q| super::quotas::size("quota", &q)).transpose()?;
    let answer = blocking_api(&s, move |st| {
        let ask = lifecycle::CloneAsk { lease_ms, now: clock.now_ms(), quota_bytes };
        let made_from = lifecycle::clone(st, &ev, &from, &name, ask)?;
        let cat = st.catalog();
        Ok(CloneAnswer { volume: volume(&cat, cat.volume(&name)?, true, true)?, made_from: made_from.to_string() })
    })
    .await?;
    Ok((StatusCode::CREATED, Json(answer)))
}

#[utoipa::path(post, path = "/v1/volumes/{name}/rewind", tag = "volumes",
    params(("name" = String, Path, description = "clone name")), request_body = MoveRequest,
    responses((status = 200, description = "where the clone now is", body = Moved),
        (status = 400, description = "no `to`, or not a snapshot of this lineage", body = ErrorBody),
        (status = 404, description = "no such volume or snapshot", body = ErrorBody)))]
pub(super) async fn rewind(
    State(s): State<Shared>,
    Extension(ev): Hooks,
    ApiPath(name): ApiPath<String>,
    JsonBody(body): JsonBody<MoveRequest>,
) -> ApiResult<Json<Moved>> {
    let to = body.to.ok_or_else(|| bad("rewind needs \"to\": a snapshot or a time"))?;
    let step_to = to.clone();
    move_head(&s, ev, name, Move::Rewind, Some(to), move |cat, name| cat.rewind(name, &step_to)).await
}

#[utoipa::path(post, path = "/v1/volumes/{name}/refresh", tag = "volumes",
    params(("name" = String, Path, description = "clone name")),
    request_body(content = Option<MoveRequest>, description = "optional: `{\"to\": SNAPSHOT}`, `{}` or none (the newest snapshot of the origin volume)"),
    responses((status = 200, description = "where the clone now is", body = Moved),
        (status = 400, description = "not a clone, or not a snapshot of its origin", body = ErrorBody),
        (status = 404, description = "no such volume or snapshot", body = ErrorBody)))]
pub(super) async fn refresh(
    State(s): State<Shared>,
    Extension(ev): Hooks,
    ApiPath(name): ApiPath<String>,
    OptionalJson(body): OptionalJson<MoveRequest>,
) -> ApiResult<Json<Moved>> {
    let to = body.and_then(|b| b.to);
    let step_to = to.clone();
    move_head(&s, ev, name, Move::Refresh, to, move |cat, name| cat.refresh(name, step_to.as_deref())).await
}

/// Rewind or refresh (`step`) clone `name` with its hooks (see [`lifecycle::move_head`]); the
/// answer says where the head went and which snapshot kept the state it left.
async fn move_head(
    s: &Shared,
    ev: std::sync::Arc<crate::server::events::Events>,
    name: String,
    kind: Move,
    to: Option<String>,
    step: impl FnOnce(&mut Catalog, &str) -> Result<(SnapshotId, SnapshotId), CatalogError> + Send + 'static,
) -> ApiResult<Json<Moved>> {
    blocking_api(s, move |st| {
        let (target, kept) = lifecycle::move_head(st, &ev, &name, kind, to.as_deref(), step)?;
        Ok(Json(Moved { kept: kept.to_string(), target: target.to_string(), volume: name }))
    })
    .await
}

#[utoipa::path(post, path = "/v1/snapshots/{reference}/bookmarks", tag = "volumes",
    params(("reference" = String, Path, description = "snapshot reference")), request_body = BookmarkRequest,
    responses((status = 200, description = "the snapshot bookmarked", body = SnapshotTaken),
        (status = 404, description = "no such snapshot", body = ErrorBody),
        (status = 409, description = "the bookmark is taken", body = ErrorBody)))]
pub(super) async fn bookmark(
    State(s): State<Shared>,
    ApiPath(reference): ApiPath<String>,
    JsonBody(body): JsonBody<BookmarkRequest>,
) -> ApiResult<Json<SnapshotTaken>> {
    let name = body.name;
    blocking(&s, move |st| {
        let id = st.op(|cat| cat.bookmark(&reference, &name))?;
        Ok(Json(SnapshotTaken { snapshot: id.to_string() }))
    })
    .await
}

#[utoipa::path(delete, path = "/v1/volumes/{name}", tag = "volumes",
    params(("name" = String, Path, description = "a volume (with its snapshots) or one snapshot reference")),
    responses((status = 200, description = "what was deleted and the space it gives back (freed in the background)", body = Deleted),
        (status = 404, description = "no such volume or snapshot", body = ErrorBody),
        (status = 409, description = "clones depend on it", body = ErrorBody)))]
pub(super) async fn remove(
    State(s): State<Shared>,
    Extension(ev): Hooks,
    ApiPath(reference): ApiPath<String>,
) -> ApiResult<Json<Deleted>> {
    blocking_api(&s, move |st| {
        let freed_bytes = lifecycle::delete(st, &ev, &reference)?;
        Ok(Json(Deleted { deleted: reference, freed_bytes }))
    })
    .await
}

#[utoipa::path(get, path = "/v1/tree", tag = "volumes",
    responses((status = 200, description = "every volume with its snapshots, flat", body = Tree)))]
pub(super) async fn tree(State(s): State<Shared>) -> ApiResult<Json<Tree>> {
    blocking(&s, |st| {
        let cat = st.catalog();
        let volumes = cat.volumes().values().map(tree_volume).collect();
        let environments = cat.environments().values().map(super::environments::tree_environment).collect();
        Ok(Json(Tree { environments, volumes }))
    })
    .await
}

fn tree_volume(v: &catalog::Volume) -> TreeVolume {
    let snapshots = v
        .snapshots
        .iter()
        .map(|s| TreeSnapshot {
            bookmarks: s.bookmarks.clone(),
            created_at: format_time(s.created_at),
            name: format!("{}@{}", v.name, s.id),
            timeflow: s.timeflow,
        })
        .collect();
    TreeVolume {
        kind: kind(v.kind),
        name: v.name.clone(),
        origin: v.origin.as_ref().map(ToString::to_string),
        size_bytes: v.size_bytes,
        snapshots,
        timeflow: v.timeflow,
    }
}
