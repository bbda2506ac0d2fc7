//! `POST /v1/sources/{name}/resize` (docs/api.md): grow a source volume, as
//! `forkd ingest --resize` does when the image it reads has grown.
//!
//! The new size is a number of bytes or a string with a K/M/G/T suffix, a multiple of 4096,
//! at most 1 PiB and not smaller than the current size. Snapshots keep their own sizes; the
//! new blocks read as zeros until an ingest fills them. Refused while an ingest runs.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::extract::{ApiPath, JsonBody};
use super::volumes::{size_bytes, volume};
use super::{blocking, ApiError, Shared};
use crate::api::error::ErrorBody;
use crate::api::ingest::{ResizeAnswer, ResizeRequest};

/// Answers the source as `Volume` JSON plus `"previous_size_bytes"`.
#[utoipa::path(post, path = "/v1/sources/{name}/resize", tag = "ingest",
    params(("name" = String, Path, description = "source name")), request_body = ResizeRequest,
    responses((status = 200, description = "the source, plus its size before", body = ResizeAnswer),
        (status = 400, description = "a clone, or a size that is invalid or smaller", body = ErrorBody),
        (status = 404, description = "no such volume", body = ErrorBody),
        (status = 409, description = "an ingest runs or waits to be resumed", body = ErrorBody)))]
pub(super) async fn resize(
    State(s): State<Shared>,
    ApiPath(name): ApiPath<String>,
    body: Result<JsonBody<ResizeRequest>, ApiError>,
) -> Result<Json<ResizeAnswer>, ApiError> {
    let JsonBody(body) = body.map_err(|e| {
        // A body of the wrong type or size keeps its status; anything else is a bad request.
        let keep = [StatusCode::UNSUPPORTED_MEDIA_TYPE, StatusCode::PAYLOAD_TOO_LARGE];
        let why = if keep.contains(&e.0) { e.0 } else { StatusCode::BAD_REQUEST };
        ApiError(why, format!("resize needs a JSON body such as {{\"size\": \"20G\"}}: {}", e.1))
    })?;
    let size = size_bytes(&body.size, "20G")?;
    let answer = blocking(&s, move |st| {
        let previous = st.op(|cat| cat.resize(&name, size))?;
        if previous != size {
            tracing::info!(source = %name, previous, size, "resized source");
        }
        let cat = st.catalog();
        Ok(ResizeAnswer { volume: volume(&cat, cat.volume(&name)?, true, true)?, previous_size_bytes: previous })
    })
    .await?;
    Ok(Json(answer))
}
