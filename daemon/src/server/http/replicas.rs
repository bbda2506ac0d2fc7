//! The replication routes (docs/api.md, "Replication").
//!
//! The source's side, driven by `forkd replicate`: `POST /v1/volumes/{name}/replicate` (once,
//! answering when done; or `continuous`, answering at once), `GET` and `DELETE
//! /v1/volumes/{name}/replication` (status; stop). The runs are the
//! [`crate::server::replication::Replicator`]'s.
//!
//! The target's side, called by the source daemon: `GET /v1/replicas/{name}` (what this site
//! holds of the volume), `PUT /v1/replicas/{name}/incoming` (declare a snapshot; answers the
//! block to start at) and `POST /v1/replicas/{name}/incoming` (its frames:
//! [`super::replica_stream`]); and `POST /v1/volumes/{name}/promote` after a failover.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};

use super::extract::{ApiPath, JsonBody};
use super::{bad, blocking, blocking_api, replica_stream, ApiError, ApiResult, Shared};
use crate::api::data::Binary;
use crate::api::error::ErrorBody;
use crate::api::replication::{
    IncomingDone, IncomingStart, Promoted, Receiving, ReplicaOfInfo, ReplicaState, ReplicateRequest, ReplicationStatus,
};
use crate::server::replication::{now_ms, Replication, Replicator, DEFAULT_STALL};

/// The replicator, as handlers receive it.
pub(super) type Rep = Extension<Arc<Replicator>>;

/// A replica's `replica_of` as `show` reports it.
pub(super) fn replica_of(v: &catalog::Volume, r: &catalog::ReplicaOf) -> ReplicaOfInfo {
    let receiving = v
        .staging
        .as_ref()
        .and_then(|s| s.incoming.as_ref())
        .map(|i| Receiving { snapshot: format!("{}@{}", v.name, i.header.snapshot.id), next_block: i.next_block });
    let latest = v.snapshots.last();
    ReplicaOfInfo {
        site: r.site.clone(),
        volume: r.volume.clone(),
        receiving,
        latest: latest.map(|s| format!("{}@{}", v.name, s.id)),
        lag_ms: latest.map(|s| u64::try_from(now_ms() - s.created_at).unwrap_or(0)),
    }
}

fn span(what: &str, text: Option<&str>, default: Duration) -> ApiResult<Duration> {
    match text {
        None => Ok(default),
        Some(t) => match catalog::parse_span(t) {
            Some(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
            _ => Err(bad(format!("{what} `{t}`: give a duration such as 10s, 5m or 500ms"))),
        },
    }
}

#[utoipa::path(post, path = "/v1/volumes/{name}/replicate", tag = "replication",
    params(("name" = String, Path, description = "volume name")), request_body = ReplicateRequest,
    responses((status = 200, description = "the replication: done (once), or started (continuous)", body = ReplicationStatus),
        (status = 400, description = "no target URL, or a bad duration", body = ErrorBody),
        (status = 404, description = "no such volume", body = ErrorBody),
        (status = 409, description = "a replication of this volume is running", body = ErrorBody),
        (status = 502, description = "the run failed (what arrived is kept; run again to resume)", body = ErrorBody)))]
pub(super) async fn replicate(
    State(s): State<Shared>,
    Extension(rep): Rep,
    ApiPath(name): ApiPath<String>,
    JsonBody(body): JsonBody<ReplicateRequest>,
) -> ApiResult<Json<ReplicationStatus>> {
    let to = body.to.trim().trim_end_matches('/').to_string();
    if to.is_empty() {
        return Err(bad("give the target daemon's API URL: `to`"));
    }
    let stall = span("stall_timeout", body.stall_timeout.as_deref(), DEFAULT_STALL)?;
    let refused = |e: anyhow::Error| match e.downcast_ref::<crate::server::replication::Refused>() {
        Some(r) => ApiError(StatusCode::CONFLICT, r.to_string()),
        None => match e.downcast::<crate::store::StoreError>() {
            Ok(e) => e.into(),
            Err(e) => ApiError(StatusCode::BAD_GATEWAY, format!("{e:#}")),
        },
    };
    if let Some(every) = body.continuous.as_deref() {
        let every = span("continuous", Some(every), DEFAULT_STALL)?;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let r = Replication { to, token: body.token, interval_ms: ms(every), stall_ms: ms(stall) };
        let (rep2, n) = (rep.clone(), name.clone());
        blocking_api(&s, move |_| rep2.start_continuous(&n, r, true).map_err(refused)).await?;
    } else {
        let (rep2, n) = (rep.clone(), name.clone());
        blocking_api(&s, move |_| rep2.run_once(&n, &to, body.token, stall).map(|_| ()).map_err(refused)).await?;
    }
    rep.status(&name, now_ms())
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no replication of `{name}`")))
}

#[utoipa::path(get, path = "/v1/volumes/{name}/replication", tag = "replication",
    params(("name" = String, Path, description = "volume name")),
    responses((status = 200, description = "its replication", body = ReplicationStatus),
        (status = 404, description = "no replication of this volume since the daemon started", body = ErrorBody)))]
pub(super) async fn status(Extension(rep): Rep, ApiPath(name): ApiPath<String>) -> ApiResult<Json<ReplicationStatus>> {
    rep.status(&name, now_ms())
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no replication of `{name}` since the daemon started")))
}

#[utoipa::path(delete, path = "/v1/volumes/{name}/replication", tag = "replication",
    params(("name" = String, Path, description = "volume name")),
    responses((status = 200, description = "its continuous replication is stopped", body = ReplicationStatus),
        (status = 409, description = "no continuous replication of this volume runs", body = ErrorBody)))]
pub(super) async fn stop(
    State(s): State<Shared>,
    Extension(rep): Rep,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<ReplicationStatus>> {
    let (rep2, n) = (rep.clone(), name.clone());
    blocking_api(&s, move |_| rep2.stop(&n).map_err(|e| ApiError(StatusCode::CONFLICT, format!("{e:#}")))).await?;
    rep.status(&name, now_ms())
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no replication of `{name}`")))
}

#[utoipa::path(post, path = "/v1/volumes/{name}/promote", tag = "replication",
    params(("name" = String, Path, description = "replica name")),
    responses((status = 200, description = "the replica is writable on this site", body = Promoted),
        (status = 404, description = "no such volume", body = ErrorBody),
        (status = 409, description = "not a replica", body = ErrorBody)))]
pub(super) async fn promote(State(s): State<Shared>, ApiPath(name): ApiPath<String>) -> ApiResult<Json<Promoted>> {
    blocking(&s, move |st| {
        let was = st.promote(&name)?;
        Ok(Json(Promoted { volume: name, was_replica_of: was.site }))
    })
    .await
}

#[utoipa::path(get, path = "/v1/replicas/{name}", tag = "replication",
    params(("name" = String, Path, description = "volume name")),
    responses((status = 200, description = "what this site holds of the volume (`exists: false` when nothing)", body = ReplicaState)))]
pub(super) async fn held(State(s): State<Shared>, ApiPath(name): ApiPath<String>) -> ApiResult<Json<ReplicaState>> {
    blocking(&s, move |st| Ok(Json(state(&st.catalog(), &name)))).await
}

fn state(cat: &catalog::Catalog, name: &str) -> ReplicaState {
    let h = cat.replica_state(name);
    ReplicaState {
        exists: h.exists,
        replica_of_site: h.replica_of.map(|r| r.site),
        snapshots: h.snapshots,
        receiving: h.receiving.map(|(snapshot, next_block)| Receiving { snapshot, next_block }),
    }
}

/// The body of `PUT /v1/replicas/{name}`.
#[derive(Debug, serde::Deserialize)]
struct Declared {
    volume: catalog::VolumeMeta,
    size_bytes: u64,
}

#[utoipa::path(put, path = "/v1/replicas/{name}", tag = "replication",
    params(("name" = String, Path, description = "volume name")),
    request_body(content = Object, description = "`{\"volume\": {...}, \"size_bytes\": N}` (docs/api.md, \"Replication\")"),
    responses((status = 200, description = "the replica exists (a clone of its origin, no snapshot yet)", body = ReplicaState),
        (status = 400, description = "a malformed description", body = ErrorBody)))]
pub(super) async fn declare_volume(
    State(s): State<Shared>,
    ApiPath(name): ApiPath<String>,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> ApiResult<Json<ReplicaState>> {
    let d: Declared = serde_json::from_value(body).map_err(|e| bad(format!("not a volume description: {e}")))?;
    blocking(&s, move |st| {
        st.op(|cat| cat.ensure_replica(&name, &d.volume, d.size_bytes))?;
        Ok(Json(state(&st.catalog(), &name)))
    })
    .await
}

#[utoipa::path(put, path = "/v1/replicas/{name}/incoming", tag = "replication",
    params(("name" = String, Path, description = "volume name")),
    request_body(content = Object, description = "the snapshot's header (docs/api.md, \"Replication\")"),
    responses((status = 200, description = "where to start sending", body = IncomingStart),
        (status = 400, description = "a malformed header", body = ErrorBody),
        (status = 409, description = "this site cannot take the snapshot (the reason says why)", body = ErrorBody),
        (status = 507, description = "this site is out of space", body = ErrorBody)))]
pub(super) async fn declare(
    State(s): State<Shared>,
    Extension(rep): Rep,
    ApiPath(name): ApiPath<String>,
    JsonBody(header): JsonBody<serde_json::Value>,
) -> ApiResult<Json<IncomingStart>> {
    let header: catalog::IncomingHeader =
        serde_json::from_value(header).map_err(|e| bad(format!("not a snapshot header: {e}")))?;
    let ticket = rep.incoming.take(&name);
    blocking(&s, move |st| {
        let next = ticket.while_newest(|| st.begin_incoming(&name, &header));
        let next = next
            .unwrap_or_else(|| Err(catalog::CatalogError::Replication("a newer transfer took over".into()).into()))?;
        Ok(Json(IncomingStart { next_block: next }))
    })
    .await
}

#[utoipa::path(post, path = "/v1/replicas/{name}/incoming", tag = "replication",
    params(("name" = String, Path, description = "volume name")),
    request_body(content = Binary, content_type = "application/octet-stream",
        description = "the declared snapshot's frames (ingest frames), sent chunked"),
    responses((status = 200, description = "the snapshot arrived whole and its digest matched", body = IncomingDone),
        (status = 400, description = "a malformed or damaged stream, or one that stopped early (what arrived is kept)", body = ErrorBody),
        (status = 409, description = "nothing declared, a newer transfer took over, or the digests differ", body = ErrorBody)))]
pub(super) async fn receive(
    State(s): State<Shared>,
    Extension(rep): Rep,
    ApiPath(name): ApiPath<String>,
    body: Body,
) -> ApiResult<Json<IncomingDone>> {
    let ticket = rep.incoming.take(&name);
    replica_stream::receive(s, ticket, name, body).await.map(Json)
}
