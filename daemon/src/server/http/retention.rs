//! Retention and detach routes (docs/api.md, "Retention and detach"):
//! `PUT /v1/volumes/{name}/retention` sets (or, with no rule, clears) a volume's rules,
//! `POST /v1/volumes/{name}/prune` applies them now ([`crate::server::retention`]), and
//! `POST /v1/volumes/{name}/detach` cuts a clone loose from its origin
//! ([`catalog::Catalog::detach`]); the first and the last answer with the volume.

use axum::extract::State;
use axum::Json;
use catalog::Retention;

use super::extract::{ApiPath, JsonBody};
use super::volumes::volume;
use super::{blocking, ApiResult, Shared};
use crate::api::error::ErrorBody;
use crate::api::retention::{PruneAnswer, PrunedSnapshot, RetentionRules};
use crate::api::volumes::Volume;
use crate::server::retention::apply;

/// The catalog's rules from the API's.
fn rules(r: RetentionRules) -> Retention {
    Retention {
        keep_last: r.keep_last,
        keep_hourly: r.keep_hourly,
        keep_daily: r.keep_daily,
        keep_weekly: r.keep_weekly,
    }
}

/// The API's rules from the catalog's.
pub(super) fn api_rules(r: &Retention) -> RetentionRules {
    RetentionRules {
        keep_daily: r.keep_daily,
        keep_hourly: r.keep_hourly,
        keep_last: r.keep_last,
        keep_weekly: r.keep_weekly,
    }
}

#[utoipa::path(put, path = "/v1/volumes/{name}/retention", tag = "volumes",
    params(("name" = String, Path, description = "volume name")), request_body = RetentionRules,
    responses((status = 200, description = "the volume with its rules (none given: cleared)", body = Volume),
        (status = 404, description = "no such volume", body = ErrorBody)))]
pub(super) async fn set(
    State(s): State<Shared>,
    ApiPath(name): ApiPath<String>,
    JsonBody(body): JsonBody<RetentionRules>,
) -> ApiResult<Json<Volume>> {
    blocking(&s, move |st| {
        st.op(|cat| cat.set_retention(&name, Some(rules(body))))?;
        let cat = st.catalog();
        Ok(Json(volume(&cat, cat.volume(&name)?, true, true)?))
    })
    .await
}

#[utoipa::path(post, path = "/v1/volumes/{name}/prune", tag = "volumes",
    params(("name" = String, Path, description = "volume name")),
    responses((status = 200, description = "the snapshots deleted and why (none without rules)", body = PruneAnswer),
        (status = 404, description = "no such volume", body = ErrorBody)))]
pub(super) async fn prune(State(s): State<Shared>, ApiPath(name): ApiPath<String>) -> ApiResult<Json<PruneAnswer>> {
    blocking(&s, move |st| {
        let pruned = apply(st, &name)?
            .into_iter()
            .map(|p| PrunedSnapshot { rule: p.rule, snapshot: p.snapshot.to_string() })
            .collect();
        Ok(Json(PruneAnswer { pruned, volume: name }))
    })
    .await
}

#[utoipa::path(post, path = "/v1/volumes/{name}/detach", tag = "volumes",
    params(("name" = String, Path, description = "clone name")),
    responses((status = 200, description = "the clone, with `origin` null and `detached_from` set", body = Volume),
        (status = 400, description = "not a clone, or already detached", body = ErrorBody),
        (status = 403, description = "a masked volume, or unmasked data of a clone_from=masked source", body = ErrorBody),
        (status = 404, description = "no such volume", body = ErrorBody)))]
pub(super) async fn detach(State(s): State<Shared>, ApiPath(name): ApiPath<String>) -> ApiResult<Json<Volume>> {
    blocking(&s, move |st| {
        st.op(|cat| cat.detach(&name))?;
        let cat = st.catalog();
        Ok(Json(volume(&cat, cat.volume(&name)?, true, true)?))
    })
    .await
}
