//! The environment routes' bodies (docs/api.md, "Environments"): the `Environment` object,
//! and the requests and answers of create, snapshot, clone, rewind, refresh and delete.
//!
//! The habits of [`crate::api::volumes`] hold here too: fields in alphabetical order (the
//! order the daemon sends keys in), answers read leniently (`#[serde(default)]`), requests
//! strictly. Members are maps from member name to volume (or snapshot) name.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::api::volumes::Moved;

/// An environment snapshot `ENV@N`: one snapshot of every member, taken at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct EnvSnapshot {
    /// Its bookmark names.
    pub bookmarks: Vec<String>,
    /// When it was taken (RFC 3339, milliseconds, UTC).
    pub created_at: String,
    /// Its number on the environment, counting up from 1.
    pub id: u64,
    /// Member name to the member's snapshot (`VOLUME@N`).
    pub members: BTreeMap<String, String>,
    /// `ENV@ID`.
    pub name: String,
}

/// An environment (docs/api.md, "Environments").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Environment {
    /// When it was created (RFC 3339, milliseconds, UTC).
    pub created_at: String,
    /// An environment clone's lease: present only where set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<crate::api::leases::LeaseInfo>,
    /// Member name to volume name.
    pub members: BTreeMap<String, String>,
    /// Its name.
    pub name: String,
    /// What it was cloned from (`ENV@N`, `ENV@latest`, `ENV@TIME`); null when created.
    pub origin: Option<String>,
    /// Its environment snapshots, oldest first.
    pub snapshots: Vec<EnvSnapshot>,
}

/// `GET /v1/environments`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct EnvironmentList {
    /// Every environment, by name.
    pub environments: Vec<Environment>,
}

/// `POST /v1/environments`: group existing volumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreateEnvironment {
    /// Member name (no `.`) to an existing volume in no other environment.
    pub members: BTreeMap<String, String>,
    /// The new environment's name (not a volume's).
    pub name: String,
}

/// `POST /v1/environments/{name}/snapshots`: the body is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EnvSnapshotRequest {
    /// A bookmark name for the new environment snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bookmark: Option<String>,
}

/// The answer of an environment snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct EnvSnapshotTaken {
    /// Member name to the member snapshot taken (`VOLUME@N`).
    pub members: BTreeMap<String, String>,
    /// `ENV@N`.
    pub snapshot: String,
}

/// `POST /v1/environments/clones`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EnvCloneRequest {
    /// `ENV`, `ENV@N`, `ENV@BOOKMARK`, `ENV@latest` or `ENV@TIME`.
    pub from: String,
    /// Its lease from now (`72h`); without it, the strictest `default_lease` (else
    /// `max_lease`) of its members' sources, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// The new environment's name; its members are `NAME.MEMBER`.
    pub name: String,
}

/// The answer of an environment clone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct EnvCloned {
    /// The new environment.
    pub environment: Environment,
    /// Member name to the snapshot its clone was made from (`VOLUME@N`).
    pub made_from: BTreeMap<String, String>,
}

/// `POST /v1/environments/{name}/rewind` (`to` required).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EnvMoveRequest {
    /// An environment snapshot (`ENV@N`, `@N`, `N`, `@BOOKMARK`) or an RFC 3339 time (the
    /// newest environment snapshot at or before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// The answer of an environment rewind or refresh.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct EnvMoved {
    /// The environment.
    pub environment: String,
    /// Member name to where its volume went.
    pub members: BTreeMap<String, Moved>,
    /// The environment snapshot rewound to; null for a refresh.
    pub target: Option<String>,
}

/// The query of `DELETE /v1/environments/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EnvDeleteQuery {
    /// `true` deletes the environment only and keeps its member volumes.
    pub keep_volumes: Option<bool>,
}

/// The answer of `DELETE /v1/environments/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct EnvDeleted {
    /// The environment deleted.
    pub deleted: String,
    /// Bytes the delete gives back to the file system: what it held alone just before it (its
    /// `unique_bytes`; an environment's: the sum of its members'). Garbage collection frees
    /// them in the background after the answer (docs/api.md).
    pub freed_bytes: u64,
    /// The member volumes deleted with it (none with `keep_volumes`).
    pub volumes: Vec<String>,
}

/// An environment in the lineage tree.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct TreeEnvironment {
    /// Member name to volume name.
    pub members: BTreeMap<String, String>,
    /// Its name.
    pub name: String,
    /// What it was cloned from; null when created.
    pub origin: Option<String>,
}
