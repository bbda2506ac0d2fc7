//! Hook settings, masking and the `clone_from` policy: request and answer bodies
//! (docs/api.md, "Hooks", "Masking").

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `PUT /v1/hooks/{owner}/{event}`: the script to run at that event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HookRequest {
    /// A file name in the daemon's hooks directory (not a path, not code).
    pub script: String,
    /// Seconds before the script is killed with its process group (default 300, at most 86400).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// One hook setting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Hook {
    /// The volume (or environment) it is set on.
    pub owner: String,
    /// The event.
    pub event: String,
    /// The script's name in the hooks directory.
    pub script: String,
    /// Its timeout in seconds.
    pub timeout_secs: u64,
}

/// `GET /v1/hooks`: hook settings, by owner and event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HookList {
    /// The settings.
    pub hooks: Vec<Hook>,
}

/// The query of `GET /v1/hooks`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HookQuery {
    /// Only this volume's (or environment's) hooks.
    pub owner: Option<String>,
}

/// `POST /v1/mask`: mask a snapshot into a masked volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MaskRequest {
    /// The snapshot to mask (`VOLUME@N`, `@latest`, `@BOOKMARK`, `@TIME`), or an environment's
    /// point in time (`ENV@N`, `ENV@latest`, `ENV@TIME`).
    pub snapshot: String,
    /// The masking script's name in the hooks directory; without it, the `mask` hook set on the
    /// snapshot's volume (for an environment: on each member volume; a member without one is
    /// copied as is, refused if its source's policy is `clone_from = "masked"`).
    #[serde(default)]
    pub script: Option<String>,
    /// The masked volume (created on first use); for an environment, the masked environment
    /// (members `INTO.MEMBER`).
    pub into: String,
    /// Seconds before the script is killed (default 300).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// What a masking run produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MaskAnswer {
    /// The new masked snapshot (`MASKED@N`).
    pub snapshot: String,
    /// The snapshot whose data it masks.
    pub source: String,
    /// The script that masked it.
    pub script: String,
    /// SHA-256 of the script when it ran.
    pub script_sha256: String,
    /// How long the script ran, in milliseconds (for an environment: all members' scripts).
    pub duration_ms: u64,
    /// For an environment: each member's new masked snapshot.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub members: std::collections::BTreeMap<String, String>,
}

/// `PUT /v1/volumes/{name}/policy`: at least one setting; those not given stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyRequest {
    /// `masked`: only masked snapshots of this source may flow downstream; `any`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_from: Option<String>,
    /// The lease a new clone gets when it asks for none (`72h`), or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_lease: Option<String>,
    /// The longest lease, from now, a clone may hold (`30d`), or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lease: Option<String>,
    /// The quota a new clone gets when it asks for none (`20G`), or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_quota: Option<String>,
}
