//! The bodies of the schedule routes (docs/api.md, "Schedules"): `POST /v1/schedules` adds one,
//! `GET /v1/schedules` lists them, `POST /v1/schedules/{name}/run` runs one now and answers
//! with the run, `DELETE /v1/schedules/{name}` removes one. Times are RFC 3339, UTC.
//! Fields in alphabetical order, as everywhere in [`crate::api`].

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The request of `POST /v1/schedules`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    /// `once` (default): a fire time missed while the daemon was down runs once at start-up;
    /// `skip`: it is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<String>,
    /// A 5-field cron expression, UTC (`0 2 * * *`).
    pub cron: String,
    /// The schedule's name.
    pub name: String,
    /// The steps, in order: `ingest SOURCE --from PATH_OR_NBD_URI`,
    /// `mask SNAPSHOT --into VOLUME [--with SCRIPT]`, `snapshot VOLUME_OR_ENV`,
    /// `refresh CLONE_OR_ENV...`, `prune VOLUME` (an environment's name runs its operation).
    pub steps: Vec<String>,
}

/// How a run ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct ScheduleRunInfo {
    /// Why it failed: the failing step and its error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it ended.
    pub finished_at: String,
    /// `ok`, `failed` or `interrupted` (the daemon stopped during the run).
    pub result: String,
    /// When it started.
    pub started_at: String,
}

/// A schedule as the API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Schedule {
    /// `once` or `skip`.
    pub catch_up: String,
    /// The cron expression, UTC.
    pub cron: String,
    /// The last run that ended, if any.
    pub last_run: Option<ScheduleRunInfo>,
    /// When the last successful run ended.
    pub last_success_at: Option<String>,
    /// The name.
    pub name: String,
    /// The next fire time.
    pub next_run: Option<String>,
    /// A run is in progress.
    pub running: bool,
    /// The steps, in order.
    pub steps: Vec<String>,
}

/// The answer of `GET /v1/schedules`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct ScheduleList {
    /// Every schedule, by name.
    pub schedules: Vec<Schedule>,
}

/// The answer of `DELETE /v1/schedules/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct ScheduleDeleted {
    /// The schedule removed.
    pub deleted: String,
}
