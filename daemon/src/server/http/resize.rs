//! `POST /v1/sources/{name}/resize` (docs/api.md): grow a source volume, as
//! `forkd ingest --resize` does when the image it reads has grown.
//!
//! The new size is a number of bytes or a string with a K/M/G/T suffix, a multiple of 4096,
//! at most 1 PiB and not smaller than the current size. Snapshots keep their own sizes; the
//! new blocks read as zeros until an ingest fills them. Refused while an ingest runs.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{run_blocking, volume_json, ApiError, Shared};
use crate::store::StoreError;

/// The resize route, merged into [`super::router`].
pub(super) fn routes() -> Router<Shared> {
    Router::new().route("/v1/sources/:name/resize", post(resize))
}

#[derive(Deserialize)]
struct ResizeBody {
    size: Value,
}

/// Answers the source as `Volume` JSON plus `"previous_size_bytes"`.
async fn resize(
    State(s): State<Shared>,
    Path(name): Path<String>,
    body: Result<Json<ResizeBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let bad = |msg: String| ApiError(StatusCode::BAD_REQUEST, msg);
    let Json(body) =
        body.map_err(|e| bad(format!("resize needs a JSON body such as {{\"size\": \"20G\"}}: {}", e.body_text())))?;
    let size = match &body.size {
        Value::Number(n) => n.as_u64().ok_or_else(|| bad("size must be a positive whole number of bytes".into()))?,
        Value::String(t) => catalog::parse_size(t).map_err(StoreError::from)?,
        _ => return Err(bad("size must be a number of bytes or a string such as \"20G\"".into())),
    };
    let v = run_blocking(&s, move |st| {
        let previous = st.op(|cat| cat.resize(&name, size))?;
        if previous != size {
            tracing::info!(source = %name, previous, size, "resized source");
        }
        let cat = st.catalog();
        let mut v = volume_json(&cat, cat.volume(&name)?, true)?;
        v["previous_size_bytes"] = json!(previous);
        Ok(v)
    })
    .await?;
    Ok(Json(v))
}
