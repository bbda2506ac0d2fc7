//! The catalog routes' bodies (docs/api.md, "Objects" and "Catalog operations"): the `Volume`
//! object, the lineage tree, and the requests and answers of create, snapshot, clone, rewind,
//! refresh, bookmark and delete.
//!
//! Both sides use these types: `server::http` builds its answers from them and the CLI reads
//! them, so renaming a field breaks the build, not a user. Two habits keep the wire exactly
//! what it has always been:
//! - fields are declared in alphabetical order, the order the daemon has always sent keys in
//!   (`serde_json` maps sort them), so `--json` output stays byte-for-byte the same;
//! - answers read leniently where a gap only changes what is shown (`#[serde(default)]`: a
//!   field a daemon of another version did not send reads as empty, a volume kind it invented
//!   as [`VolumeKind::Unknown`]), and strictly where a client acts on the value: a `Volume`
//!   without its `name`, `kind` or `size_bytes` is an error, never a zero the agent would
//!   compare an image with. Requests read strictly; a missing required field is refused
//!   with 422.
//!
//! An `Option` field of an answer is always present, as `null` when empty, unless it says
//! otherwise (`snapshots` and `snapshot_count`, of which a volume carries exactly one).

use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type};
use utoipa::openapi::RefOr;
use utoipa::{IntoParams, PartialSchema, ToSchema};

/// Whether a volume is fed by ingest (`source`) or written by hosts (`clone`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeKind {
    /// Fed only by ingest; read-only to hosts.
    Source,
    /// A writable copy of a snapshot.
    Clone,
    /// A kind this client does not know (sent by a newer daemon); the daemon never sends it.
    #[default]
    #[serde(other)]
    Unknown,
}

impl VolumeKind {
    /// The wire name, `-` for [`VolumeKind::Unknown`].
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeKind::Source => "source",
            VolumeKind::Clone => "clone",
            VolumeKind::Unknown => "-",
        }
    }
}

impl PartialSchema for VolumeKind {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .enum_values(Some(["source", "clone"]))
            .description(Some("`source` (fed by ingest, read-only to hosts) or `clone` (writable)"))
            .into()
    }
}

impl ToSchema for VolumeKind {}

/// Where a volume is served: its NBD export name and its iSCSI target name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Exports {
    /// iSCSI target name, `iqn.2026-11.dev.forkd:NAME`.
    pub iscsi: String,
    /// NBD export name (the volume's name).
    pub nbd: String,
}

/// What an ingest did, kept on the snapshot it produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct IngestSummary {
    /// Bytes found different from the previous snapshot.
    pub changed_bytes: u64,
    /// Wall time of the ingest, in milliseconds.
    pub duration_ms: u64,
    /// Bytes of the source image read.
    pub scanned_bytes: u64,
    /// Payload bytes received (block data).
    pub sent_bytes: u64,
    /// Every byte of the ingest stream received: payload, crc32s and frame headers.
    pub wire_bytes: u64,
}

/// What a masked snapshot was made from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MaskInfo {
    /// The snapshot whose data was masked.
    pub source: String,
    /// The masking script's name.
    pub script: String,
    /// SHA-256 of the script when it ran.
    pub script_sha256: String,
}

/// A snapshot as `GET /v1/volumes/{name}` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Snapshot {
    /// Bytes holding data in it.
    pub allocated_bytes: u64,
    /// Its bookmark names.
    pub bookmarks: Vec<String>,
    /// When it was taken (RFC 3339, milliseconds, UTC).
    pub created_at: String,
    /// Its number on its volume, counting up from 1.
    pub id: u64,
    /// Set (else null) when an ingest produced it.
    pub ingest: Option<IngestSummary>,
    /// Present and true on a masked snapshot (the only kind a masked volume has).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub masked: bool,
    /// On a masked snapshot: what it masks and with which script.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask: Option<MaskInfo>,
    /// `VOLUME@ID`.
    pub name: String,
    /// Why it was taken: `ingest`, `snapshot`, `clone`, `rewind` or `refresh`.
    pub reason: String,
    /// Its size in bytes.
    pub size_bytes: u64,
    /// The volume's timeflow when it was taken.
    pub timeflow: u32,
    /// Bytes only it holds; null when space was not computed (`?space=false`).
    pub unique_bytes: Option<u64>,
}

/// A volume (docs/api.md, "Objects").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Volume {
    /// Bytes holding data in its head.
    #[serde(default)]
    pub allocated_bytes: u64,
    /// When it was created (RFC 3339, milliseconds, UTC).
    #[serde(default)]
    pub created_at: String,
    /// On a detached clone: the snapshot it was cut loose from (`VOLUME@ID`); absent else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detached_from: Option<String>,
    /// The environment it is a member of: present only where set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// Where it is served.
    #[serde(default)]
    pub exports: Exports,
    /// `masked` on a source whose policy lets only masked data flow downstream; absent else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_from: Option<String>,
    /// On a masked volume: the source whose data it masks; absent else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked_from: Option<String>,
    /// A clone's lease: present only where set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<crate::api::leases::LeaseInfo>,
    /// A source's `default_lease` (`72h`): present only where set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_lease: Option<String>,
    /// A source's `max_lease` (`30d`): present only where set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lease: Option<String>,
    /// A clone's quota on its unique bytes: present only where set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_bytes: Option<u64>,
    /// A source's `default_quota`, the quota its new clones get, in bytes: present only where set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_quota_bytes: Option<u64>,
    /// Bytes a running or interrupted ingest has staged; null when there is none.
    #[serde(default)]
    pub ingest_pending_bytes: Option<u64>,
    /// Whether an ingest is running or waits to be resumed.
    #[serde(default)]
    pub ingest_running: bool,
    /// Source or clone.
    pub kind: VolumeKind,
    /// Its name.
    pub name: String,
    /// The snapshot a clone derives from (`VOLUME@ID`); null for a source.
    #[serde(default)]
    pub origin: Option<String>,
    /// Its retention rules: present only where set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<crate::api::retention::RetentionRules>,
    /// Its size in bytes.
    pub size_bytes: u64,
    /// How many snapshots it has: present (instead of `snapshots`) in `GET /v1/volumes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_count: Option<u64>,
    /// Its snapshots, oldest first: present (instead of `snapshot_count`) everywhere else.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<Vec<Snapshot>>,
    /// Its current timeflow; a rewind or refresh starts the next.
    #[serde(default)]
    pub timeflow: u32,
    /// Bytes only it holds; null when space was not computed (`?space=false`).
    #[serde(default)]
    pub unique_bytes: Option<u64>,
    /// True when hosts cannot write it: a source (fed by ingest) or a replica.
    #[serde(default)]
    pub read_only: bool,
    /// On a replica: the site and volume it follows; absent else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_of: Option<crate::api::replication::ReplicaOfInfo>,
    /// Its replication to another site, as this (source) daemon runs it: present in
    /// `GET /v1/volumes/{name}` once one was started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<crate::api::replication::ReplicationStatus>,
}

impl Volume {
    /// How many snapshots it has, whichever way it was shown.
    pub fn snapshot_total(&self) -> u64 {
        self.snapshot_count.unwrap_or_else(|| self.snapshots.as_ref().map_or(0, |s| s.len() as u64))
    }
}

/// `GET /v1/volumes`: every volume, with `snapshot_count` instead of `snapshots`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct VolumeList {
    /// The volumes, by name.
    pub volumes: Vec<Volume>,
}

/// The query of `GET /v1/volumes/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ShowQuery {
    /// `false` skips computing `unique_bytes` (null then), which walks what the volume holds
    /// alone.
    pub space: Option<bool>,
}

/// A volume size as a request gives it: bytes as a number, or a string with a K/M/G/T/P
/// suffix. It must be a multiple of 4096, at most 1 PiB.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Size {
    /// A number of bytes.
    Bytes(u64),
    /// Text such as `10G`, parsed by the daemon.
    Text(String),
    /// Anything else (a negative or fractional number, `true`...): refused with a 400 that
    /// says what a size is.
    Other(serde_json::Value),
}

impl Size {
    /// A size typed by a person: a plain number is sent as bytes, anything else as text for
    /// the daemon to parse (and explain, if it is wrong).
    pub fn from_text(text: &str) -> Size {
        match text.trim().parse::<u64>() {
            Ok(n) => Size::Bytes(n),
            Err(_) => Size::Text(text.to_string()),
        }
    }
}

impl PartialSchema for Size {
    fn schema() -> RefOr<Schema> {
        let bytes = ObjectBuilder::new().schema_type(SchemaType::Type(Type::Integer)).minimum(Some(4096));
        let text = ObjectBuilder::new().schema_type(SchemaType::Type(Type::String)).examples(["10G"]);
        OneOfBuilder::new()
            .item(bytes)
            .item(text)
            .description(Some(
                "bytes as a number, or a string with a K/M/G/T/P suffix; a multiple of 4096, at most 1 PiB",
            ))
            .into()
    }
}

impl ToSchema for Size {}

/// `POST /v1/sources`: create an empty source volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreateSource {
    /// The new source's name.
    pub name: String,
    /// Its size.
    pub size: Size,
}

/// `POST /v1/volumes/{name}/snapshots`: the body is optional (`{}` or none at all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotRequest {
    /// A bookmark name to attach to the new snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bookmark: Option<String>,
}

/// The answer of snapshot and bookmark: the snapshot made or bookmarked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct SnapshotTaken {
    /// `VOLUME@ID`.
    pub snapshot: String,
}

/// `POST /v1/clones`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CloneRequest {
    /// A snapshot reference, or a volume (snapshotted first).
    pub from: String,
    /// The new clone's name.
    pub name: String,
    /// Its lease from now (`72h`); without it, the source's `default_lease`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// Its quota on unique bytes (`20G`); without it, the source's `default_quota`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<String>,
}

/// The answer of `POST /v1/clones`: the new clone, plus the snapshot it was made from (among
/// the volume's keys in sorted order, as every answer has them: see [`with_field`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, ToSchema)]
pub struct CloneAnswer {
    /// The new clone.
    #[serde(flatten)]
    pub volume: Volume,
    /// The snapshot it was made from (`VOLUME@ID`).
    #[serde(default)]
    pub made_from: String,
}

impl Serialize for CloneAnswer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        with_field(&self.volume, "made_from", &self.made_from, s)
    }
}

/// Serialize `base`'s fields plus `key`, all in sorted key order. A flattened struct would
/// put `key` last; every other answer has its keys sorted (the order the daemon has always
/// sent), so an answer that extends another goes through a JSON map, which sorts.
pub(crate) fn with_field<S: serde::Serializer>(
    base: &impl Serialize,
    key: &str,
    value: &impl Serialize,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::Error;
    let mut map = match serde_json::to_value(base).map_err(S::Error::custom)? {
        serde_json::Value::Object(map) => map,
        _ => return Err(S::Error::custom("an answer that extends another must extend an object")),
    };
    map.insert(key.to_string(), serde_json::to_value(value).map_err(S::Error::custom)?);
    map.serialize(s)
}

/// `POST /v1/volumes/{name}/rewind` (`to` required) and `.../refresh` (`to` optional, body
/// optional: the newest snapshot of the origin volume).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MoveRequest {
    /// A snapshot (`dev1@2`, `@2`, `2`, `@BOOKMARK`, an origin snapshot) or an RFC 3339 time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// The answer of rewind and refresh.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Moved {
    /// The snapshot that keeps the state the volume had before (`VOLUME@ID`).
    pub kept: String,
    /// The snapshot the volume now shows.
    pub target: String,
    /// The volume moved.
    pub volume: String,
}

/// `POST /v1/snapshots/{ref}/bookmarks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BookmarkRequest {
    /// The bookmark name.
    pub name: String,
}

/// The answer of `DELETE /v1/volumes/{ref}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Deleted {
    /// What was deleted, as given.
    pub deleted: String,
    /// Bytes the delete gives back to the file system: what it held alone just before it (its
    /// `unique_bytes`; an environment's: the sum of its members'). Garbage collection frees
    /// them in the background after the answer (docs/api.md).
    pub freed_bytes: u64,
}

/// A snapshot in the lineage tree.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct TreeSnapshot {
    /// Its bookmark names.
    pub bookmarks: Vec<String>,
    /// When it was taken.
    pub created_at: String,
    /// `VOLUME@ID`: the clones whose `origin` this is hang below it.
    pub name: String,
    /// The volume's timeflow when it was taken.
    pub timeflow: u32,
}

/// A volume in the lineage tree.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct TreeVolume {
    /// Source or clone.
    pub kind: VolumeKind,
    /// Its name.
    pub name: String,
    /// The snapshot it derives from; null for the roots.
    pub origin: Option<String>,
    /// Its size in bytes.
    pub size_bytes: u64,
    /// Its snapshots, oldest first.
    pub snapshots: Vec<TreeSnapshot>,
    /// Its current timeflow.
    pub timeflow: u32,
}

/// `GET /v1/tree`: flat, so any number of clone generations fits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Tree {
    /// Every environment with its members.
    pub environments: Vec<crate::api::environments::TreeEnvironment>,
    /// Every volume.
    pub volumes: Vec<TreeVolume>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ingest::ResizeAnswer;

    /// The keys of a JSON object as serialized, in order.
    fn keys(text: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut depth = 0;
        for (i, c) in text.char_indices() {
            match c {
                '{' | '[' => depth += 1,
                '}' | ']' => depth -= 1,
                '"' if depth == 1 && text[..i].ends_with([',', '{']) => {
                    let rest = &text[i + 1..];
                    keys.push(rest[..rest.find('"').unwrap_or(0)].to_string());
                }
                _ => {}
            }
        }
        keys
    }

    #[test]
    fn answers_that_extend_a_volume_keep_every_key_in_sorted_order() {
        let volume = Volume { name: "dev1".into(), snapshots: Some(Vec::new()), ..Volume::default() };
        let clone = CloneAnswer { volume: volume.clone(), made_from: "prod@1".into() };
        let text = serde_json::to_string(&clone).expect("serialize");
        let k = keys(&text);
        let mut sorted = k.clone();
        sorted.sort();
        assert_eq!(k, sorted, "{text}");
        assert!(k.contains(&"made_from".to_string()) && k.contains(&"snapshots".to_string()), "{text}");
        let back: CloneAnswer = serde_json::from_str(&text).expect("read back");
        assert_eq!(back, clone);

        let resize = ResizeAnswer { volume, previous_size_bytes: 4096 };
        let text = serde_json::to_string(&resize).expect("serialize");
        let k = keys(&text);
        let mut sorted = k.clone();
        sorted.sort();
        assert_eq!(k, sorted, "{text}");
        assert_eq!(serde_json::from_str::<ResizeAnswer>(&text).expect("read back"), resize);
    }
}
