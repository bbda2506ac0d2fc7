//! The scrub routes' bodies (docs/api.md, "Scrub"): the answer of a scrub, which lists every
//! reference to a damaged block by volume or snapshot and byte offset, and the progress of the
//! running one. Field order and leniency follow [`crate::api::volumes`].

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One reference to a damaged block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct ScrubFailure {
    /// Byte offset of the damaged 4 KiB block in the volume or snapshot.
    pub offset: u64,
    /// `VOLUME`, `VOLUME@N`, or `VOLUME (unfinished ingest)` for an ingest's staging tree.
    pub reference: String,
}

/// The answer of `POST /v1/scrub`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct ScrubAnswer {
    /// Distinct stored blocks read and checked (a block shared by clones and snapshots once).
    pub checked_blocks: u64,
    /// Their bytes.
    pub checked_bytes: u64,
    /// Volumes, snapshots and unfinished ingests whose blocks were checked.
    pub checked_references: u64,
    /// Distinct stored blocks found damaged.
    pub damaged_blocks: u64,
    /// Wall time, in milliseconds.
    pub duration_ms: u64,
    /// Every reference to a damaged block (a block shared by several volumes and snapshots
    /// once for each), by reference then offset; at most 10,000 are listed.
    pub failures: Vec<ScrubFailure>,
    /// How many references to damaged blocks there are, listed or not.
    pub failures_total: u64,
}

/// The answer of `GET /v1/scrub`: the running scrub's progress, or the last one's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct ScrubStatus {
    /// Bytes read and checked so far.
    pub checked_bytes: u64,
    /// Damaged blocks confirmed so far.
    pub damaged_blocks: u64,
    /// True while a scrub runs.
    pub running: bool,
    /// Bytes it expects to check: the stored blocks in use when it started.
    pub total_bytes: u64,
}
