//! `PUT /v1/volumes/{name}/lease` and `PUT /v1/environments/{name}/lease` (docs/api.md,
//! "Leases"): one change to a clone's or an environment clone's lease, measured from "now" by
//! the daemon's clock ([`crate::server::clock`]); the lease rules are the catalog's
//! (`catalog/src/lease.rs`, `catalog/src/env_lease.rs`), the expiry the reaper's
//! ([`crate::server::leases`]).

use std::sync::Arc;

use axum::extract::State;
use axum::{Extension, Json};
use catalog::LeaseChange;

use super::extract::{ApiPath, JsonBody};
use super::volumes::volume;
use super::{bad, blocking, ApiError, ApiResult, Shared};
use crate::api::environments::Environment;
use crate::api::error::ErrorBody;
use crate::api::leases::LeaseRequest;
use crate::api::volumes::Volume;
use crate::server::clock::Clock;
use crate::server::leases::span;

/// The daemon's clock, as handlers receive it.
pub(super) type Now = Extension<Arc<Clock>>;

#[utoipa::path(put, path = "/v1/volumes/{name}/lease", tag = "volumes",
    params(("name" = String, Path, description = "clone name")), request_body = LeaseRequest,
    responses((status = 200, description = "the clone with its lease", body = Volume),
        (status = 400, description = "not exactly one change, a time in the past, beyond the source's max_lease, \
            removing a lease the source requires, or not a clone", body = ErrorBody),
        (status = 404, description = "no such volume", body = ErrorBody),
        (status = 409, description = "an environment member", body = ErrorBody)))]
pub(super) async fn set_lease(
    State(s): State<Shared>,
    Extension(clock): Now,
    ApiPath(name): ApiPath<String>,
    JsonBody(body): JsonBody<LeaseRequest>,
) -> ApiResult<Json<Volume>> {
    let change = change(&body)?;
    blocking(&s, move |st| {
        let now = clock.now_ms();
        st.op(|cat| cat.set_lease(&name, change, now))?;
        let cat = st.catalog();
        Ok(Json(volume(&cat, cat.volume(&name)?, true, true)?))
    })
    .await
}

#[utoipa::path(put, path = "/v1/environments/{name}/lease", tag = "environments",
    params(("name" = String, Path, description = "environment name")), request_body = LeaseRequest,
    responses((status = 200, description = "the environment with its lease", body = Environment),
        (status = 400, description = "not exactly one change, a time in the past, beyond a member's source's \
            max_lease, removing a lease a source requires, or an environment of sources", body = ErrorBody),
        (status = 404, description = "no such environment", body = ErrorBody)))]
pub(super) async fn set_env_lease(
    State(s): State<Shared>,
    Extension(clock): Now,
    ApiPath(name): ApiPath<String>,
    JsonBody(body): JsonBody<LeaseRequest>,
) -> ApiResult<Json<Environment>> {
    let change = change(&body)?;
    blocking(&s, move |st| {
        let now = clock.now_ms();
        st.op(|cat| cat.set_env_lease(&name, change, now))?;
        Ok(Json(super::environments::environment(st.catalog().environment(&name)?)))
    })
    .await
}

/// The one change a request asks for.
fn change(body: &LeaseRequest) -> Result<LeaseChange, ApiError> {
    let given = [body.extend.is_some(), body.expires.is_some(), body.none, body.idle.is_some()];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(bad("give exactly one of extend, expires, none or idle"));
    }
    if let Some(t) = &body.extend {
        return Ok(LeaseChange::Extend(span("extend", t).map_err(bad)?));
    }
    if let Some(t) = &body.idle {
        return Ok(LeaseChange::Idle(span("idle", t).map_err(bad)?));
    }
    match &body.expires {
        Some(t) => catalog::parse_time(t)
            .map(LeaseChange::Expires)
            .ok_or_else(|| bad(format!("expires `{t}`: give an RFC 3339 time such as 2026-12-31T18:00:00Z"))),
        None => Ok(LeaseChange::None),
    }
}
