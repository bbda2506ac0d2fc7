//! Leases: the request of `PUT /v1/volumes/{name}/lease` and `PUT /v1/environments/{name}/lease`,
//! and the lease as a volume or an environment shows it (docs/api.md, "Leases").

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `PUT /v1/volumes/{name}/lease` and `PUT /v1/environments/{name}/lease`: exactly one change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LeaseRequest {
    /// Move the expiry this much later (from now if there is none, or it passed): `24h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extend: Option<String>,
    /// Expire at this time (RFC 3339, in the future).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// Remove the lease (refused while the source has a `max_lease`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub none: bool,
    /// Expire after this long with no connection and no I/O: `2h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<String>,
}

/// A clone's or an environment's lease, in `show`: present only where set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LeaseInfo {
    /// When it expires (RFC 3339), or null.
    pub expires_at: Option<String>,
    /// Its idle timeout (`2h`), or null.
    pub idle: Option<String>,
}
