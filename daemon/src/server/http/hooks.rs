//! Hook settings (`/v1/hooks`), masking (`POST /v1/mask`) and a source's policy, `clone_from`
//! and the lease defaults (`PUT /v1/volumes/{name}/policy`): docs/api.md, "Hooks", "Masking"
//! and "Leases".
//!
//! A hook is set by naming a script in the daemon's hooks directory; the script is checked
//! when it is set (and again whenever it runs), so a missing, non-executable or
//! others-writable file, or one outside the directory, is refused here with the reason.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};

use super::extract::{ApiPath, ApiQuery, JsonBody};
use super::volumes::volume;
use super::{blocking, blocking_api, ApiError, ApiResult, Hooks, Shared};
use crate::api::error::ErrorBody;
use crate::api::hooks::{Hook, HookList, HookQuery, HookRequest, MaskAnswer, MaskRequest, PolicyRequest};
use crate::api::volumes::Volume;
use crate::server::hooks::DEFAULT_TIMEOUT;

/// The longest timeout a hook may be given: a day.
const MAX_TIMEOUT_SECS: u64 = 86_400;

#[utoipa::path(get, path = "/v1/hooks", tag = "hooks", params(HookQuery),
    responses((status = 200, description = "hook settings by owner and event", body = HookList),
        (status = 404, description = "no such volume", body = ErrorBody)))]
pub(super) async fn list(State(s): State<Shared>, ApiQuery(q): ApiQuery<HookQuery>) -> ApiResult<Json<HookList>> {
    blocking(&s, move |st| {
        let cat = st.catalog();
        let hooks = match &q.owner {
            Some(owner) => cat.hooks_of(owner)?.iter().map(|(event, h)| hook(owner, event, h)).collect(),
            None => {
                let volumes = cat.volumes().values().map(|v| (&v.name, &v.hooks));
                let envs = cat.environments().values().map(|e| (&e.name, &e.hooks));
                volumes.chain(envs).flat_map(|(o, hs)| hs.iter().map(|(event, h)| hook(o, event, h))).collect()
            }
        };
        Ok(Json(HookList { hooks }))
    })
    .await
}

fn hook(owner: &str, event: &str, h: &catalog::HookSetting) -> Hook {
    Hook { owner: owner.to_string(), event: event.to_string(), script: h.script.clone(), timeout_secs: h.timeout_secs }
}

#[utoipa::path(put, path = "/v1/hooks/{owner}/{event}", tag = "hooks",
    params(("owner" = String, Path, description = "volume or environment name"), ("event" = String, Path, description = "hook event")),
    request_body = HookRequest,
    responses((status = 200, description = "the setting", body = Hook),
        (status = 400, description = "unknown event, a script that cannot be used, or a bad timeout", body = ErrorBody),
        (status = 404, description = "no such volume", body = ErrorBody)))]
pub(super) async fn set(
    State(s): State<Shared>,
    Extension(ev): Hooks,
    ApiPath((owner, event)): ApiPath<(String, String)>,
    JsonBody(body): JsonBody<HookRequest>,
) -> ApiResult<Json<Hook>> {
    let timeout_secs = body.timeout_secs.unwrap_or(DEFAULT_TIMEOUT.as_secs());
    if !(1..=MAX_TIMEOUT_SECS).contains(&timeout_secs) {
        return Err(super::bad(format!("timeout_secs must be 1 to {MAX_TIMEOUT_SECS}")));
    }
    blocking_api(&s, move |st| {
        catalog::check_event(&event)?;
        st.catalog().hooks_of(&owner)?;
        ev.check(&body.script).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
        let setting = catalog::HookSetting { script: body.script, timeout_secs };
        st.op(|cat| cat.set_hook(&owner, &event, setting.clone()))?;
        Ok(Json(hook(&owner, &event, &setting)))
    })
    .await
}

#[utoipa::path(delete, path = "/v1/hooks/{owner}/{event}", tag = "hooks",
    params(("owner" = String, Path, description = "volume or environment name"), ("event" = String, Path, description = "hook event")),
    responses((status = 200, description = "the setting removed", body = Hook),
        (status = 400, description = "unknown event", body = ErrorBody),
        (status = 404, description = "no such volume, or no hook of that event", body = ErrorBody)))]
pub(super) async fn unset(
    State(s): State<Shared>,
    ApiPath((owner, event)): ApiPath<(String, String)>,
) -> ApiResult<Json<Hook>> {
    blocking(&s, move |st| {
        catalog::check_event(&event)?;
        let old = st.catalog().hooks_of(&owner)?.get(&event).cloned();
        let old = old.ok_or_else(|| catalog::CatalogError::NoHook { owner: owner.clone(), event: event.clone() })?;
        st.op(|cat| cat.unset_hook(&owner, &event))?;
        Ok(Json(hook(&owner, &event, &old)))
    })
    .await
}

#[utoipa::path(post, path = "/v1/mask", tag = "hooks", request_body = MaskRequest,
    responses((status = 201, description = "the new masked snapshot", body = MaskAnswer),
        (status = 400, description = "a script that cannot be used, or `into` is another kind of volume", body = ErrorBody),
        (status = 404, description = "no such snapshot", body = ErrorBody),
        (status = 409, description = "another operation on `into` is running", body = ErrorBody),
        (status = 424, description = "the masking script failed, timed out or was killed: nothing changed", body = ErrorBody)))]
pub(super) async fn mask(
    State(s): State<Shared>,
    Extension(ev): Hooks,
    JsonBody(body): JsonBody<MaskRequest>,
) -> ApiResult<(StatusCode, Json<MaskAnswer>)> {
    let answer = blocking_api(&s, move |st| crate::server::masking::mask(st, &ev, &body)).await?;
    Ok((StatusCode::CREATED, Json(answer)))
}

#[utoipa::path(put, path = "/v1/volumes/{name}/policy", tag = "hooks",
    params(("name" = String, Path, description = "source name")), request_body = PolicyRequest,
    responses((status = 200, description = "the source", body = Volume),
        (status = 400, description = "not a source, an unknown policy, a bad duration, default_lease beyond max_lease, or a bad default_quota", body = ErrorBody),
        (status = 404, description = "no such volume", body = ErrorBody)))]
pub(super) async fn policy(
    State(s): State<Shared>,
    ApiPath(name): ApiPath<String>,
    JsonBody(body): JsonBody<PolicyRequest>,
) -> ApiResult<Json<Volume>> {
    let given = [&body.clone_from, &body.default_lease, &body.max_lease, &body.default_quota];
    if given.iter().all(|g| g.is_none()) {
        return Err(super::bad("give clone_from, default_lease, max_lease or default_quota"));
    }
    let masked_only = match body.clone_from.as_deref() {
        None => None,
        Some("masked") => Some(true),
        Some("any") => Some(false),
        Some(other) => return Err(super::bad(format!("clone_from is `masked` or `any`, not `{other}`"))),
    };
    let default_ms = body.default_lease.as_deref().map(|t| lease_setting("default_lease", t)).transpose()?;
    let max_ms = body.max_lease.as_deref().map(|t| lease_setting("max_lease", t)).transpose()?;
    let quota = body.default_quota.as_deref().map(|t| super::quotas::setting("default_quota", t)).transpose()?;
    blocking(&s, move |st| {
        st.op(|cat| {
            let mut p = cat.volume(&name)?.lease_policy.unwrap_or_default();
            p.default_ms = default_ms.unwrap_or(p.default_ms);
            p.max_ms = max_ms.unwrap_or(p.max_ms);
            cat.set_lease_policy(&name, p)?;
            if let Some(q) = quota {
                cat.set_default_quota(&name, q)?;
            }
            match masked_only {
                Some(m) => cat.set_clone_from_masked(&name, m),
                None => Ok(()),
            }
        })?;
        let cat = st.catalog();
        Ok(Json(volume(&cat, cat.volume(&name)?, true, true)?))
    })
    .await
}

/// A lease setting of the policy: a duration, or `none` to remove it.
fn lease_setting(key: &str, text: &str) -> Result<Option<u64>, ApiError> {
    match text {
        "none" => Ok(None),
        t => crate::server::leases::span(key, t).map(Some).map_err(super::bad),
    }
}
