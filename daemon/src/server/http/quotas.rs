//! `PUT /v1/volumes/{name}/quota` (docs/api.md, "Quotas"): set or remove a clone's quota on its
//! unique bytes. The limit is kept by the catalog (`catalog/src/quota.rs`) and checked on every
//! write by the store (`store/quota.rs`).

use axum::extract::State;
use axum::Json;

use super::extract::{ApiPath, JsonBody};
use super::volumes::volume;
use super::{bad, blocking, ApiError, ApiResult, Shared};
use crate::api::error::ErrorBody;
use crate::api::quotas::QuotaRequest;
use crate::api::volumes::Volume;

#[utoipa::path(put, path = "/v1/volumes/{name}/quota", tag = "volumes",
    params(("name" = String, Path, description = "clone name")), request_body = QuotaRequest,
    responses((status = 200, description = "the clone with its quota", body = Volume),
        (status = 400, description = "not a size or `none`, or not a clone", body = ErrorBody),
        (status = 404, description = "no such volume", body = ErrorBody)))]
pub(super) async fn set_quota(
    State(s): State<Shared>,
    ApiPath(name): ApiPath<String>,
    JsonBody(body): JsonBody<QuotaRequest>,
) -> ApiResult<Json<Volume>> {
    let quota = setting("quota", &body.quota)?;
    blocking(&s, move |st| {
        // Removing a quota frees nothing, so it works on a full disk too.
        st.op_freeing(|cat| cat.set_quota(&name, quota))?;
        let cat = st.catalog();
        Ok(Json(volume(&cat, cat.volume(&name)?, true, true)?))
    })
    .await
}

/// A quota setting: a size, or `none` to remove it.
pub(super) fn setting(key: &str, text: &str) -> Result<Option<u64>, ApiError> {
    match text.trim() {
        "none" => Ok(None),
        t => size(key, t).map(Some),
    }
}

/// A quota size: `20G`, `512M`, or bytes; at least one 4 KiB block.
pub(super) fn size(key: &str, text: &str) -> Result<u64, ApiError> {
    match catalog::parse_size(text.trim()) {
        Ok(n) if n >= catalog::BLOCK_SIZE => Ok(n),
        _ => Err(bad(format!("{key} `{text}`: give a size such as 20G, 512M or 1048576 (at least 4096 bytes)"))),
    }
}
