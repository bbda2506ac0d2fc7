//! Quotas: the request of `PUT /v1/volumes/{name}/quota` (docs/api.md, "Quotas"). A clone
//! shows its quota as `quota_bytes`, a source its `default_quota_bytes`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `PUT /v1/volumes/{name}/quota`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct QuotaRequest {
    /// The limit on the clone's unique bytes (`20G`, `512M`, bytes), or `none` to remove it. A
    /// quota below what the clone holds is allowed: writes that add blocks fail until trims or
    /// deletes bring it back under.
    pub quota: String,
}
