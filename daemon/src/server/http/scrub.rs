//! `POST /v1/scrub` and `GET /v1/scrub` (docs/api.md, "Scrub"): check every stored block
//! against its crc32 and report the damaged ones by volume or snapshot and offset, and follow
//! the running scrub's progress. The work is the store's (`store::scrub`); one runs at a time.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::{blocking, ApiError, ApiResult, Shared};
use crate::api::error::ErrorBody;
use crate::api::scrub::{ScrubAnswer, ScrubFailure, ScrubStatus};
use crate::store::{ScrubOutcome, ScrubReport};

#[utoipa::path(post, path = "/v1/scrub", tag = "scrub",
    responses((status = 200, description = "what the scrub checked and the references to damaged blocks", body = ScrubAnswer),
        (status = 409, description = "a scrub is already running", body = ErrorBody),
        (status = 500, description = "the extent file or the metadata could not be read", body = ErrorBody),
        (status = 503, description = "the daemon is shutting down: the scrub stopped part-way", body = ErrorBody)))]
pub(super) async fn scrub(State(s): State<Shared>) -> ApiResult<Json<ScrubAnswer>> {
    match blocking(&s, |st| st.scrub()).await? {
        ScrubOutcome::Done(report) => Ok(Json(answer(report))),
        ScrubOutcome::Busy => Err(ApiError(
            StatusCode::CONFLICT,
            "a scrub is already running: wait for it (GET /v1/scrub shows its progress)".into(),
        )),
        ScrubOutcome::Stopped => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down: the scrub stopped before checking everything".into(),
        )),
    }
}

#[utoipa::path(get, path = "/v1/scrub", tag = "scrub",
    responses((status = 200, description = "the running scrub's progress, or the last one's", body = ScrubStatus)))]
pub(super) async fn status(State(s): State<Shared>) -> Json<ScrubStatus> {
    let p = s.scrub_progress();
    Json(ScrubStatus {
        checked_bytes: p.checked_bytes,
        damaged_blocks: p.damaged_blocks,
        running: p.running,
        total_bytes: p.total_bytes,
    })
}

fn answer(r: ScrubReport) -> ScrubAnswer {
    ScrubAnswer {
        checked_blocks: r.checked_blocks,
        checked_bytes: r.checked_blocks.saturating_mul(catalog::BLOCK_SIZE),
        checked_references: r.checked_references,
        damaged_blocks: r.damaged_blocks,
        duration_ms: r.duration_ms,
        failures: r.failures.into_iter().map(|f| ScrubFailure { offset: f.offset, reference: f.reference }).collect(),
        failures_total: r.failures_total,
    }
}
