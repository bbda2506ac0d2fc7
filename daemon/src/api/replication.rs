//! Replication (docs/api.md, "Replication"): what `forkd replicate` asks of the source
//! daemon and what it answers, and what one forkd asks of another when it sends snapshots
//! (the target's side: what it holds of a volume, the header of an incoming snapshot, the
//! answer once a snapshot arrived). The snapshot's blocks travel as ingest frames
//! ([`crate::api::frames`]).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/volumes/{name}/replicate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplicateRequest {
    /// The target daemon's API URL (`http://HOST:PORT`).
    #[serde(default)]
    pub to: String,
    /// The target's API token, if it requires one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Keep replicating every this long (`10s`, `5m`) in the background; absent: once, and
    /// answer when done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuous: Option<String>,
    /// Fail a run when the link makes no progress for this long (`30s` by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_timeout: Option<String>,
}

/// One snapshot a run sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SentSnapshot {
    /// `VOLUME@N`.
    pub snapshot: String,
    /// The snapshot its blocks are the difference from (on both sites), or null: all of it.
    pub base: Option<String>,
    /// The block the transfer started at: above 0 when it resumed an interrupted one.
    pub resumed_from_block: u64,
    /// Blocks that differ from the base (data and zeroed), from `resumed_from_block` on.
    pub changed_blocks: u64,
    /// Bytes of block data sent.
    pub payload_bytes: u64,
    /// Bytes of the stream sent: payload, frame heads, crc32s, HTTP chunking.
    pub wire_bytes: u64,
}

/// What a replication run did (the answer of a one-shot `replicate`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplicateReport {
    /// The volume named (its clones and theirs travel with it).
    pub volume: String,
    /// The target's URL.
    pub to: String,
    /// Snapshots sent, in order.
    pub snapshots: Vec<SentSnapshot>,
    /// Block data bytes sent in all.
    pub payload_bytes: u64,
    /// Stream bytes sent in all.
    pub wire_bytes: u64,
    /// Wall time, milliseconds.
    pub duration_ms: u64,
}

/// A volume's replication as its source daemon sees it (in `GET /v1/volumes/{name}` as
/// `replication`, and `GET /v1/volumes/{name}/replication`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplicationStatus {
    /// The target's URL.
    pub to: String,
    /// The interval of continuous replication, milliseconds; null for one run.
    pub continuous_ms: Option<u64>,
    /// `running` (a run is sending), `idle` (waiting for the next one, or done), `failed`
    /// (the last run failed: `last_error`; continuous mode tries again).
    pub state: String,
    /// Why the last run failed.
    pub last_error: Option<String>,
    /// The newest snapshot of the volume the target holds, as far as this site knows.
    pub last_sent: Option<String>,
    /// How far the target is behind: 0 when the volume's head has not changed since
    /// `last_sent`, else the time since `last_sent` was taken; null before anything was sent.
    pub lag_ms: Option<u64>,
    /// When the last run ended (RFC 3339), if one did.
    pub last_run_at: Option<String>,
    /// The last run's report.
    pub last_report: Option<ReplicateReport>,
}

/// What the target holds of a volume name (`GET /v1/replicas/{name}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplicaState {
    /// A volume of that name exists on the target.
    pub exists: bool,
    /// The site id it follows, when it is a replica.
    pub replica_of_site: Option<String>,
    /// The guids of its snapshots, oldest first.
    pub snapshots: Vec<String>,
    /// The snapshot being received (guid) and the first block not yet received.
    pub receiving: Option<Receiving>,
}

/// A snapshot half received.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Receiving {
    /// Its guid (target side) or name (in `show`).
    pub snapshot: String,
    /// Every block below this one has arrived.
    pub next_block: u64,
}

/// The answer of `PUT /v1/replicas/{name}/incoming`: where the sender starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IncomingStart {
    /// The first block to send (0, or where an interrupted transfer stopped).
    pub next_block: u64,
}

/// The answer of `POST /v1/replicas/{name}/incoming` once the snapshot is made.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IncomingDone {
    /// The snapshot as the target names it (`VOLUME@N`).
    pub snapshot: String,
    /// Block data bytes received by this stream.
    pub payload_bytes: u64,
}

/// On a replica: what it follows (in `GET /v1/volumes/{name}` as `replica_of`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplicaOfInfo {
    /// The sending site's id.
    pub site: String,
    /// The volume's name there.
    pub volume: String,
    /// A snapshot half received: its number and the first block not yet received.
    pub receiving: Option<Receiving>,
    /// The newest snapshot it holds (`VOLUME@N`).
    pub latest: Option<String>,
    /// How far behind it is at most: the time since `latest` was taken at the sender (the
    /// sender's `lag_ms` is exact: it knows whether the volume changed since).
    pub lag_ms: Option<u64>,
}

/// The answer of `POST /v1/volumes/{name}/promote`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Promoted {
    /// The volume, now writable.
    pub volume: String,
    /// The site it followed until now.
    pub was_replica_of: String,
}
