//! The environment routes (docs/api.md, "Environments"): list, show, create, snapshot, clone,
//! rewind, refresh and delete; and the one place a catalog environment becomes the API's
//! [`Environment`].
//!
//! Every handler that changes something parses its request, calls the operation in
//! [`crate::server::env_lifecycle`] (claim, hooks, fences, one catalog operation, undo) on a
//! blocking thread, and answers. Creating an environment runs no hook: it is here.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use catalog::{format_time, SnapshotId};

use super::extract::{ApiPath, ApiQuery, JsonBody, OptionalJson};
use super::{bad, blocking, blocking_api, ApiResult, Hooks, Shared};
use crate::api::environments::{
    CreateEnvironment, EnvCloneRequest, EnvCloned, EnvDeleteQuery, EnvDeleted, EnvMoveRequest, EnvMoved, EnvSnapshot,
    EnvSnapshotRequest, EnvSnapshotTaken, Environment, EnvironmentList, TreeEnvironment,
};
use crate::api::error::ErrorBody;
use crate::api::volumes::Moved;
use crate::server::env_lifecycle;
use crate::store::busy::env_key;
use crate::store::{Store, StoreError};

/// The API's view of a catalog environment.
pub(super) fn environment(e: &catalog::Environment) -> Environment {
    let snapshots = e
        .snapshots
        .iter()
        .map(|s| EnvSnapshot {
            bookmarks: s.bookmarks.clone(),
            created_at: format_time(s.created_at),
            id: s.id,
            members: names(&s.members),
            name: format!("{}@{}", e.name, s.id),
        })
        .collect();
    Environment {
        created_at: format_time(e.created_at),
        lease: e.lease.as_ref().map(super::volumes::lease),
        members: e.members.clone(),
        name: e.name.clone(),
        origin: e.origin.clone(),
        snapshots,
    }
}

/// The tree's view of a catalog environment.
pub(super) fn tree_environment(e: &catalog::Environment) -> TreeEnvironment {
    TreeEnvironment { members: e.members.clone(), name: e.name.clone(), origin: e.origin.clone() }
}

/// Member name to `VOLUME@N`.
fn names(members: &BTreeMap<String, SnapshotId>) -> BTreeMap<String, String> {
    members.iter().map(|(m, s)| (m.clone(), s.to_string())).collect()
}

/// Refuse `clones` as an environment name: `/v1/environments/clones` is the clone route.
fn check_routable(name: &str) -> ApiResult<()> {
    if name == "clones" {
        return Err(bad("`clones` cannot name an environment: /v1/environments/clones is the clone route"));
    }
    Ok(())
}

/// Environment `name` as the API shows it.
fn shown(st: &Store, name: &str) -> Result<Environment, StoreError> {
    Ok(environment(st.catalog().environment(name)?))
}

#[utoipa::path(get, path = "/v1/environments", tag = "environments",
    responses((status = 200, description = "every environment", body = EnvironmentList)))]
pub(super) async fn list(State(s): State<Shared>) -> ApiResult<Json<EnvironmentList>> {
    blocking(&s, |st| {
        let environments = st.catalog().environments().values().map(environment).collect();
        Ok(Json(EnvironmentList { environments }))
    })
    .await
}

#[utoipa::path(get, path = "/v1/environments/{name}", tag = "environments",
    params(("name" = String, Path, description = "environment name")),
    responses((status = 200, description = "the environment, its members and snapshots", body = Environment),
        (status = 404, description = "no such environment", body = ErrorBody)))]
pub(super) async fn show(State(s): State<Shared>, ApiPath(name): ApiPath<String>) -> ApiResult<Json<Environment>> {
    blocking(&s, move |st| Ok(Json(shown(st, &name)?))).await
}

#[utoipa::path(post, path = "/v1/environments", tag = "environments", request_body = CreateEnvironment,
    responses((status = 201, description = "the new environment", body = Environment),
        (status = 400, description = "invalid name or no members", body = ErrorBody),
        (status = 404, description = "a member volume does not exist", body = ErrorBody),
        (status = 409, description = "the name is taken, or a volume is in another environment", body = ErrorBody)))]
pub(super) async fn create(
    State(s): State<Shared>,
    JsonBody(body): JsonBody<CreateEnvironment>,
) -> ApiResult<(StatusCode, Json<Environment>)> {
    let CreateEnvironment { members, name } = body;
    check_routable(&name)?;
    let e = blocking(&s, move |st| {
        let mut keys = vec![env_key(&name)];
        keys.extend(members.values().cloned());
        let _claim = st.claim_busy(&keys)?;
        let e = st.op(|cat| cat.env_create(&name, &members))?;
        Ok(environment(&e))
    })
    .await?;
    Ok((StatusCode::CREATED, Json(e)))
}

#[utoipa::path(post, path = "/v1/environments/{name}/snapshots", tag = "environments",
    params(("name" = String, Path, description = "environment name")),
    request_body(content = Option<EnvSnapshotRequest>, description = "optional: `{\"bookmark\": NAME}`, `{}` or none"),
    responses((status = 201, description = "the environment snapshot and each member's", body = EnvSnapshotTaken),
        (status = 404, description = "no such environment", body = ErrorBody),
        (status = 409, description = "the bookmark is taken, or an operation on it is running", body = ErrorBody)))]
pub(super) async fn snapshot(
    State(s): State<Shared>,
    Extension(ev): Hooks,
    ApiPath(name): ApiPath<String>,
    OptionalJson(body): OptionalJson<EnvSnapshotRequest>,
) -> ApiResult<(StatusCode, Json<EnvSnapshotTaken>)> {
    let bookmark = body.and_then(|b| b.bookmark);
    let taken = blocking_api(&s, move |st| {
        let point = env_lifecycle::snapshot(st, &ev, &name, bookmark.as_deref())?;
        Ok(EnvSnapshotTaken { members: names(&point.members), snapshot: point.label })
    })
    .await?;
    Ok((StatusCode::CREATED, Json(taken)))
}

#[utoipa::path(post, path = "/v1/environments/clones", tag = "environments", request_body = EnvCloneRequest,
    responses((status = 201, description = "the new environment, and what each member was cloned from", body = EnvCloned),
        (status = 400, description = "invalid name or reference, a member without a snapshot then, \
            or a lease beyond a member's source's max_lease", body = ErrorBody),
        (status = 404, description = "no such environment or snapshot", body = ErrorBody),
        (status = 409, description = "a name is taken, or an operation on it is running", body = ErrorBody)))]
pub(super) async fn clone_environment(
    State(s): State<Shared>,
    Extension(ev): Hooks,
    Extension(clock): super::leases::Now,
    JsonBody(body): JsonBody<EnvCloneRequest>,
) -> ApiResult<(StatusCode, Json<EnvCloned>)> {
    let EnvCloneRequest { from, lease, name } = body;
    check_routable(&name)?;
    let lease_ms = lease.map(|l| crate::server::leases::span("lease", &l)).transpose().map_err(bad)?;
    let cloned = blocking_api(&s, move |st| {
        let (e, point) = env_lifecycle::clone(st, &ev, &from, &name, lease_ms, clock.now_ms())?;
        Ok(EnvCloned { environment: environment(&e), made_from: names(&point.members) })
    })
    .await?;
    Ok((StatusCode::CREATED, Json(cloned)))
}

#[utoipa::path(post, path = "/v1/environments/{name}/rewind", tag = "environments",
    params(("name" = String, Path, description = "environment name")), request_body = EnvMoveRequest,
    responses((status = 200, description = "where every member now is", body = EnvMoved),
        (status = 400, description = "no `to`, a member is not a clone, or not one of its snapshots", body = ErrorBody),
        (status = 404, description = "no such environment or snapshot", body = ErrorBody),
        (status = 409, description = "an operation on it is running", body = ErrorBody)))]
pub(super) async fn rewind(
    State(s): State<Shared>,
    Extension(ev): Hooks,
    ApiPath(name): ApiPath<String>,
    JsonBody(body): JsonBody<EnvMoveRequest>,
) -> ApiResult<Json<EnvMoved>> {
    let to = body.to.ok_or_else(|| bad("rewind needs \"to\": an environment snapshot or a time"))?;
    blocking_api(&s, move |st| {
        let (target, moves) = env_lifecycle::rewind(st, &ev, &name, &to)?;
        Ok(Json(moved(&name, target, &moves)))
    })
    .await
}

#[utoipa::path(post, path = "/v1/environments/{name}/refresh", tag = "environments",
    params(("name" = String, Path, description = "environment name")),
    responses((status = 200, description = "where every member now is", body = EnvMoved),
        (status = 400, description = "a member is not a clone", body = ErrorBody),
        (status = 404, description = "no such environment, or an origin without snapshots", body = ErrorBody),
        (status = 409, description = "an operation on it is running", body = ErrorBody)))]
pub(super) async fn refresh(
    State(s): State<Shared>,
    Extension(ev): Hooks,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<EnvMoved>> {
    blocking_api(&s, move |st| {
        let moves = env_lifecycle::refresh(st, &ev, &name)?;
        Ok(Json(moved(&name, None, &moves)))
    })
    .await
}

/// The answer of a rewind or refresh.
fn moved(env: &str, target: Option<String>, moves: &[catalog::MemberMove]) -> EnvMoved {
    let members = moves
        .iter()
        .map(|m| {
            let one = Moved { kept: m.kept.to_string(), target: m.target.to_string(), volume: m.volume.clone() };
            (m.member.clone(), one)
        })
        .collect();
    EnvMoved { environment: env.to_string(), members, target }
}

#[utoipa::path(delete, path = "/v1/environments/{name}", tag = "environments",
    params(("name" = String, Path, description = "environment name"), EnvDeleteQuery),
    responses((status = 200, description = "what was deleted and the space it gave back", body = EnvDeleted),
        (status = 404, description = "no such environment", body = ErrorBody),
        (status = 409, description = "clones outside it depend on a member, or an operation on it is running", body = ErrorBody)))]
pub(super) async fn remove(
    State(s): State<Shared>,
    Extension(ev): Hooks,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<EnvDeleteQuery>,
) -> ApiResult<Json<EnvDeleted>> {
    let keep = q.keep_volumes == Some(true);
    blocking_api(&s, move |st| {
        let (volumes, freed_bytes) = env_lifecycle::delete(st, &ev, &name, keep)?;
        Ok(Json(EnvDeleted { deleted: name, freed_bytes, volumes }))
    })
    .await
}
