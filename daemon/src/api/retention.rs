//! The bodies of retention, prune and detach (docs/api.md, "Retention and detach"):
//! `PUT /v1/volumes/{name}/retention`, `POST /v1/volumes/{name}/prune` and
//! `POST /v1/volumes/{name}/detach` (which answers with the [`crate::api::volumes::Volume`]).
//! Fields in alphabetical order, as everywhere in [`crate::api`].

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A volume's retention rules: the request of `PUT .../retention`, and `retention` in a
/// volume. A rule left out (or null) is not set; a request with none clears the rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionRules {
    /// Keep the newest snapshot of each of the N most recent UTC days that have snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent UTC hours that have snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest N snapshots (0: the newest too may go).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent ISO weeks that have snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
}

/// One snapshot retention deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct PrunedSnapshot {
    /// Why: the rules that kept it not (`kept by none of keep-last 3`).
    pub rule: String,
    /// `VOLUME@N`.
    pub snapshot: String,
}

/// The answer of `POST .../prune`: what went, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct PruneAnswer {
    /// The snapshots deleted, each with its reason (empty: nothing to prune).
    pub pruned: Vec<PrunedSnapshot>,
    /// The volume.
    pub volume: String,
}
