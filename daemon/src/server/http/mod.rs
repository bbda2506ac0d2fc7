//! The HTTP JSON API (docs/api.md): catalog operations, data access, ingest and metrics.
//!
//! Handlers run store calls on tokio's blocking pool (the store does synchronous I/O and
//! fsyncs). Every error leaves through [`ApiError`], the one place that maps store errors to
//! HTTP statuses and counts them.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use catalog::CatalogError;
use serde_json::json;

use crate::store::{Store, StoreError, MAX_IO};
use data::{extents, flush, read_data, write_data, zero};
use ingest::{abort_ingest, digests, digests_in, ingest};
use volumes::{bookmark, clone_volume, create_source, list, refresh, remove, rewind, show, snapshot, tree};

mod data;
mod ingest;
mod resize;
mod volumes;

pub use volumes::{volume_json, volume_json_with};

/// How long a rewind, refresh or delete waits for connected clients to be closed.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Shared state of the API handlers.
pub type Shared = Arc<Store>;

/// An API error: a status and one line of text.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        use CatalogError as C;
        let status = match &e {
            e if crate::store::is_enospc(e) => StatusCode::INSUFFICIENT_STORAGE,
            StoreError::Catalog(c) => match c {
                C::UnknownVolume(_) | C::UnknownSnapshot(_) => StatusCode::NOT_FOUND,
                C::BadReference { .. }
                | C::InvalidName { .. }
                | C::InvalidSize { .. }
                | C::OutOfRange { .. }
                | C::NotAClone(..)
                | C::NotASource(_)
                | C::NotInLineage { .. }
                | C::BeforeFirstSnapshot { .. } => StatusCode::BAD_REQUEST,
                C::ReadOnly(_) => StatusCode::FORBIDDEN,
                C::NameTaken(_)
                | C::BookmarkTaken { .. }
                | C::HasDependents { .. }
                | C::IngestRunning(_)
                | C::NoIngest(_) => StatusCode::CONFLICT,
                C::Map(_) | C::Corrupt(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            StoreError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.0.is_server_error() {
            tracing::error!(status = %self.0, error = %self.1, "request failed");
        } else {
            tracing::debug!(status = %self.0, error = %self.1, "request refused");
        }
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

pub(super) fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

pub(super) type ApiResult<T> = Result<T, ApiError>;

/// Run a store call on the blocking pool.
pub(super) async fn blocking<T: Send + 'static>(
    store: &Shared,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> ApiResult<T> {
    let s = store.clone();
    let r = tokio::task::spawn_blocking(move || f(&s))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("internal task failed: {e}")))?;
    if r.is_err() {
        store.metrics.api_errors.inc();
    }
    Ok(r?)
}

/// Build the router. With `auth`, every request (`/metrics` and unknown paths included) must
/// carry that bearer token (see [`crate::server::auth`]).
pub fn router(store: Shared, auth: Option<Arc<crate::server::auth::Token>>) -> Router {
    let router = Router::new()
        .route("/v1/volumes", get(list))
        .route("/v1/volumes/:name", get(show).delete(remove))
        .route("/v1/sources", post(create_source))
        .route("/v1/volumes/:name/snapshots", post(snapshot))
        .route("/v1/clones", post(clone_volume))
        .route("/v1/volumes/:name/rewind", post(rewind))
        .route("/v1/volumes/:name/refresh", post(refresh))
        .route("/v1/snapshots/:reference/bookmarks", post(bookmark))
        .route("/v1/tree", get(tree))
        .route(
            "/v1/volumes/:name/data",
            get(read_data).put(write_data).layer(DefaultBodyLimit::max(usize::try_from(MAX_IO).unwrap_or(usize::MAX))),
        )
        .route("/v1/volumes/:name/zero", post(zero))
        .route("/v1/volumes/:name/flush", post(flush))
        .route("/v1/volumes/:name/extents", get(extents))
        .route("/v1/sources/:name/digests", get(digests).post(digests_in).layer(DefaultBodyLimit::max(64 << 20)))
        .route("/v1/sources/:name/ingest", post(ingest).layer(DefaultBodyLimit::disable()))
        .route("/v1/sources/:name/ingest", delete(abort_ingest))
        .route("/metrics", get(metrics))
        .merge(resize::routes())
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such API endpoint (see docs/api.md)".into()) })
        .with_state(store);
    match auth {
        Some(token) => router.layer(axum::middleware::from_fn_with_state(token, crate::server::auth::require_token)),
        None => router,
    }
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render())
}

/// Exposed for the ingest receiver and resize.
pub(crate) async fn run_blocking<T: Send + 'static>(
    store: &Shared,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> ApiResult<T> {
    blocking(store, f).await
}
