//! The operation log route's bodies (docs/api.md, "Operation log"): the query of
//! `GET /v1/log` and its answer, one [`LogEntry`] per operation. Field order and leniency
//! follow [`crate::api::volumes`].

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// The query of `GET /v1/log`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// At most this many entries, the newest ones (default 1000).
    pub limit: Option<u64>,
    /// Only entries that started at or after this time: RFC 3339 (`2026-11-21T10:00:00Z`),
    /// or a span back from now (`90s`, `30m`, `1h`, `7d`).
    pub since: Option<String>,
    /// Only entries about this volume or one of its snapshots.
    pub volume: Option<String>,
}

/// One operation: who did what to which volume, when, for how long, and how it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct LogEntry {
    /// When it started, RFC 3339 (UTC, milliseconds).
    pub at: String,
    /// Free text, e.g. a hook's script, exit status and output; null when none.
    pub detail: Option<String>,
    /// Wall time, in milliseconds.
    pub duration_ms: u64,
    /// Why it failed; null when it did not.
    pub error: Option<String>,
    /// `ok` or `failed`.
    pub result: String,
    /// Its number in the log: strictly increasing, never reused.
    pub seq: u64,
    /// The volume, snapshot or environment acted on; null for none (a scrub).
    pub target: Option<String>,
    /// `clone`, `snapshot`, `delete`, `rewind`, `refresh`, `create source`, ...
    pub what: String,
    /// The API client's address (`127.0.0.1:51234`), or `daemon` for the daemon's own work.
    pub who: String,
}

/// The answer of `GET /v1/log`: entries oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct LogEntries {
    /// The entries, oldest first.
    pub entries: Vec<LogEntry>,
}
