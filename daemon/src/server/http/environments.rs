//! The environment routes (docs/api.md, "Environments"): list, show, create, snapshot, clone,
//! rewind, refresh and delete; and the one place a catalog environment becomes the API's
//! [`Environment`].
//!
//! Every handler that changes something is the same short sequence: claim the environment
//! and its member volumes ([`Store::claim_busy`]: a second operation on them is refused with
//! 409 until the first answered), run the environment's `pre-*` hook, fence and drain the
//! member exports it switches (rewind, refresh, delete), run ONE catalog operation (all
//! members in one transaction), run `configure-clone` (clone, rewind, refresh: the members
//! open to the hook alone; a failure undoes the operation) and `post-*`, answer.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use catalog::{format_time, Catalog, CatalogError, MemberMove, SnapshotId};

use super::extract::{ApiPath, ApiQuery, JsonBody, OptionalJson};
use super::{bad, blocking, blocking_api, ApiResult, Hooks, Shared};
use crate::api::environments::{
    CreateEnvironment, EnvCloneRequest, EnvCloned, EnvDeleteQuery, EnvDeleted, EnvMoveRequest, EnvMoved, EnvSnapshot,
    EnvSnapshotRequest, EnvSnapshotTaken, Environment, EnvironmentList, TreeEnvironment,
};
use crate::api::error::ErrorBody;
use crate::api::volumes::Moved;
use crate::server::events::{Events, Facts, Member};
use crate::server::lifecycle::{self, Move, DRAIN};
use crate::store::busy::{env_key, BusyGuard};
use crate::store::exports::{Fence, HookGate, Scope};
use crate::store::{Store, StoreError};

/// The API's view of a catalog environment.
fn environment(e: &catalog::Environment) -> Environment {
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

/// Claim environment `env` and its member volumes, plus `more` names. Returns the claim and
/// the member volumes.
fn claim<'a>(st: &'a Store, env: &str, more: &[String]) -> Result<(BusyGuard<'a>, Vec<String>), StoreError> {
    let volumes: Vec<String> = st.catalog().environment(env)?.members.values().cloned().collect();
    let mut keys = vec![env_key(env)];
    keys.extend(volumes.iter().cloned());
    keys.extend(more.iter().cloned());
    Ok((st.claim_busy(&keys)?, volumes))
}

/// Fence and drain the exports of every volume in `volumes` (all fenced before any switch).
fn fence_all<'a>(st: &'a Store, volumes: &[String], scope: Scope) -> Vec<Fence<'a>> {
    volumes.iter().map(|v| st.exports.fence_and_drain(v, scope, DRAIN)).collect()
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
        let _claim = claim(st, &name, &[])?;
        let mut facts = env_facts(st, &name, &[])?;
        ev.fire(st, "pre-snapshot", &facts)?;
        let point = st.op(|cat| cat.env_snapshot(&name, bookmark.as_deref()))?;
        facts.snapshot = Some(point.label.clone());
        lifecycle::post(&ev, st, "post-snapshot", &facts);
        for member in point.members.values() {
            crate::server::retention::after_snapshot(st, &member.volume);
        }
        Ok(EnvSnapshotTaken { members: names(&point.members), snapshot: point.label })
    })
    .await?;
    Ok((StatusCode::CREATED, Json(taken)))
}

#[utoipa::path(post, path = "/v1/environments/clones", tag = "environments", request_body = EnvCloneRequest,
    responses((status = 201, description = "the new environment, and what each member was cloned from", body = EnvCloned),
        (status = 400, description = "invalid name or reference, or a member without a snapshot then", body = ErrorBody),
        (status = 404, description = "no such environment or snapshot", body = ErrorBody),
        (status = 409, description = "a name is taken, or an operation on it is running", body = ErrorBody)))]
pub(super) async fn clone_environment(
    State(s): State<Shared>,
    Extension(ev): Hooks,
    JsonBody(body): JsonBody<EnvCloneRequest>,
) -> ApiResult<(StatusCode, Json<EnvCloned>)> {
    let EnvCloneRequest { from, name } = body;
    check_routable(&name)?;
    let cloned = blocking_api(&s, move |st| {
        // The source is only read (in one transaction): clones of one environment may run at once.
        let _claim = st.claim_busy(&[env_key(&name)])?;
        st.check_pool("clones")?;
        // Every new member is open to the configure-clone hook alone until it succeeded.
        let members: Vec<String> = st.catalog().env_resolve(&from)?.members.into_keys().collect();
        let volumes: Vec<String> = members.iter().map(|m| format!("{name}.{m}")).collect();
        let gates = volumes.iter().map(|v| lifecycle::gate(st, v)).collect::<ApiResult<Vec<_>>>()?;
        let (e, point) = st.op(|cat| cat.env_clone(&from, &name))?;
        let mut facts = env_facts(st, &name, &gates)?;
        (facts.snapshot, facts.origin) = (Some(point.label.clone()), Some(point.label.clone()));
        if let Err(err) = ev.fire(st, "configure-clone", &facts) {
            lifecycle::undo(st, &volumes, |cat| cat.env_delete(&name, false).map(drop));
            return Err(err.into());
        }
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
        let step = |cat: &mut Catalog| cat.env_rewind(&name, &to).map(|(point, moves)| (Some(point.label), moves));
        let (target, moves) = env_move(st, &ev, &name, Some(&to), Move::Rewind, step)?;
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
        let step = |cat: &mut Catalog| cat.env_refresh(&name).map(|moves| (None, moves));
        let (_, moves) = env_move(st, &ev, &name, None, Move::Refresh, step)?;
        Ok(Json(moved(&name, None, &moves)))
    })
    .await
}

/// Rewind or refresh every member of `name` as one operation, between the environment's
/// hooks: `pre-*`; fence, switch (members open to hooks alone), `configure-clone` (on failure
/// every member's record before the switch comes back); `post-*`.
fn env_move(
    st: &Store,
    ev: &Events,
    name: &str,
    to: Option<&str>,
    kind: Move,
    step: impl FnOnce(&mut Catalog) -> Result<(Option<String>, Vec<MemberMove>), CatalogError>,
) -> ApiResult<(Option<String>, Vec<MemberMove>)> {
    let (_claim, volumes) = claim(st, name, &[])?;
    let before: Vec<catalog::Volume> =
        volumes.iter().map(|v| st.catalog().volume(v).cloned()).collect::<Result<_, CatalogError>>()?;
    let mut facts = env_facts(st, name, &[])?;
    facts.snapshot = to.map(str::to_string);
    ev.fire(st, &format!("pre-{}", kind.name()), &facts)?;
    let gates = volumes.iter().map(|v| lifecycle::gate(st, v)).collect::<ApiResult<Vec<_>>>()?;
    let (target, moves) = {
        let _fences = fence_all(st, &volumes, Scope::Head);
        st.op(step)?
    };
    let mut configure = env_facts(st, name, &gates)?;
    configure.snapshot = target.clone();
    if let Err(e) = ev.fire(st, "configure-clone", &configure) {
        lifecycle::undo(st, &volumes, |cat| cat.restore(&before, &[]));
        return Err(e.into());
    }
    drop(gates);
    facts.snapshot = target.clone();
    lifecycle::post(ev, st, &format!("post-{}", kind.name()), &facts);
    Ok((target, moves))
}

/// What environment `name`'s hooks are told: its members, reached through `gates` where the
/// operation holds them (else by their own names).
fn env_facts(st: &Store, name: &str, gates: &[HookGate<'_>]) -> Result<Facts, StoreError> {
    let cat = st.catalog();
    let env = cat.environment(name)?;
    let members = env
        .members
        .iter()
        .map(|(m, v)| {
            let gate = gates.iter().find(|g| g.volume() == v);
            Member { name: m.clone(), volume: v.clone(), export: gate.map_or_else(|| v.clone(), |g| g.export.clone()) }
        })
        .collect();
    Ok(Facts { env: Some(name.to_string()), origin: env.origin.clone(), members, ..Facts::default() })
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
        let (_claim, volumes) = claim(st, &name, &[])?;
        st.catalog().check_env_delete(&name, keep)?;
        ev.fire(st, "pre-delete", &env_facts(st, &name, &[])?)?;
        let before = st.metrics.freed_bytes.get();
        let _fences = if keep { Vec::new() } else { fence_all(st, &volumes, Scope::Volume) };
        let volumes = st.op_freeing(|cat: &mut Catalog| cat.env_delete(&name, keep))?;
        Ok(Json(EnvDeleted { deleted: name, freed_bytes: st.metrics.freed_bytes.get() - before, volumes }))
    })
    .await
}
