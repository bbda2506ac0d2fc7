//! The HTTP JSON API (docs/api.md): catalog operations, data access, ingest, scrub, metrics and
//! the API's own OpenAPI document.
//!
//! [`routes`] is the one list of routes: the router and the OpenAPI document
//! ([`openapi`]) are both built from it. Request and answer bodies are the types in
//! [`crate::api`]. Handlers run store calls on tokio's blocking pool (the store does
//! synchronous I/O and fsyncs). Every error leaves as `{"error": "..."}`: handlers and the
//! request extractors ([`extract`]) through [`ApiError`], the one place that maps store errors
//! to HTTP statuses, and anything else the router answers through [`json_errors`]. Every
//! operation (not reads, not data I/O) is recorded in the operation log by [`oplog`], inside
//! the token check: a refused request is not an operation.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use catalog::CatalogError;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::error::ErrorBody;
use crate::server::events::{Events, HookFailed};
use crate::store::{Store, StoreError};

mod data;
mod environments;
mod extract;
mod hooks;
mod ingest;
mod ingest_stream;
mod leases;
mod log;
mod openapi;
mod oplog;
mod quotas;
mod replica_stream;
mod replicas;
mod resize;
mod retention;
mod schedules;
mod scrub;
mod volumes;

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
            StoreError::LowSpace { .. } => StatusCode::INSUFFICIENT_STORAGE,
            StoreError::Catalog(c) => match c {
                C::QuotaExceeded { .. } => StatusCode::INSUFFICIENT_STORAGE,
                C::UnknownVolume(_) | C::UnknownSnapshot(_) => StatusCode::NOT_FOUND,
                C::BadReference { .. }
                | C::InvalidName { .. }
                | C::InvalidSize { .. }
                | C::OutOfRange { .. }
                | C::NotAClone(..)
                | C::NotASource(_)
                | C::NotInLineage { .. }
                | C::BeforeFirstSnapshot { .. }
                | C::UnknownEvent(_)
                | C::NotMaskedVolume { .. } => StatusCode::BAD_REQUEST,
                C::NoHook { .. } => StatusCode::NOT_FOUND,
                C::ReadOnly(_)
                | C::Replica(_)
                | C::MaskedVolume(_)
                | C::MaskedOnly { .. }
                | C::MaskedVolumeOp { .. } => StatusCode::FORBIDDEN,
                C::NameTaken(_)
                | C::BookmarkTaken { .. }
                | C::HasDependents { .. }
                | C::IngestRunning(_)
                | C::Replication(_)
                | C::NoIngest(_) => StatusCode::CONFLICT,
                C::Map(_) | C::Corrupt(_) => StatusCode::INTERNAL_SERVER_ERROR,
                C::UnknownEnvironment(_) => StatusCode::NOT_FOUND,
                C::MemberWithoutSnapshot { .. } | C::BadEnvironment(_) => StatusCode::BAD_REQUEST,
                C::EnvironmentTaken(_) | C::InEnvironment { .. } => StatusCode::CONFLICT,
                C::Detached { .. } | C::BadSchedule(_) => StatusCode::BAD_REQUEST,
                C::UnknownSchedule(_) => StatusCode::NOT_FOUND,
                C::ScheduleTaken(_) => StatusCode::CONFLICT,
                C::LeaseInPast { .. } | C::LeaseTooLong { .. } | C::LeaseRequired { .. } | C::BadLeasePolicy(_) => {
                    StatusCode::BAD_REQUEST
                }
            },
            StoreError::Busy(_) => StatusCode::CONFLICT,
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
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        StoreError::from(e).into()
    }
}

impl From<HookFailed> for ApiError {
    fn from(e: HookFailed) -> Self {
        ApiError(StatusCode::FAILED_DEPENDENCY, e.0)
    }
}

/// The daemon's hook events, for handlers (an `Extension`).
pub(super) type Hooks = Extension<Arc<Events>>;

pub(super) fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

pub(super) type ApiResult<T> = Result<T, ApiError>;

/// Run `f`, which may run hooks and several store calls, on the blocking pool.
pub(super) async fn blocking_api<T: Send + 'static>(
    store: &Shared,
    f: impl FnOnce(&Store) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let s = store.clone();
    let r = tokio::task::spawn_blocking(move || f(&s))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("internal task failed: {e}")))?;
    if r.is_err() {
        store.metrics.api_errors.inc();
    }
    r
}

/// Run a store call on the blocking pool.
pub(super) async fn blocking<T: Send + 'static>(
    store: &Shared,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> ApiResult<T> {
    blocking_api(store, move |s| Ok(f(s)?)).await
}

/// Every route of the API, each with its OpenAPI description (`#[utoipa::path]` on its
/// handler): the one list both the router and the document come from.
fn routes() -> OpenApiRouter<Shared> {
    OpenApiRouter::with_openapi(<openapi::ApiDoc as utoipa::OpenApi>::openapi())
        .routes(routes!(volumes::list))
        .routes(routes!(volumes::show, volumes::remove))
        .routes(routes!(volumes::create_source))
        .routes(routes!(volumes::snapshot_volume))
        .routes(routes!(volumes::clone_volume))
        .routes(routes!(volumes::rewind))
        .routes(routes!(volumes::refresh))
        .routes(routes!(volumes::bookmark))
        .routes(routes!(volumes::tree))
        .routes(routes!(retention::set))
        .routes(routes!(retention::prune))
        .routes(routes!(retention::detach))
        .routes(routes!(environments::list, environments::create))
        .routes(routes!(environments::show, environments::remove))
        .routes(routes!(environments::snapshot))
        .routes(routes!(environments::clone_environment))
        .routes(routes!(environments::rewind))
        .routes(routes!(environments::refresh))
        .routes(routes!(data::read_data, data::write_data))
        .routes(routes!(data::zero))
        .routes(routes!(data::flush))
        .routes(routes!(data::extents))
        .routes(routes!(ingest::digests, ingest::digests_in))
        .routes(routes!(ingest::ingest, ingest::abort_ingest))
        .routes(routes!(resize::resize))
        .routes(routes!(scrub::scrub, scrub::status))
        .routes(routes!(hooks::list))
        .routes(routes!(hooks::set, hooks::unset))
        .routes(routes!(hooks::mask))
        .routes(routes!(hooks::policy))
        .routes(routes!(leases::set_lease))
        .routes(routes!(leases::set_env_lease))
        .routes(routes!(quotas::set_quota))
        .routes(routes!(replicas::replicate))
        .routes(routes!(replicas::status, replicas::stop))
        .routes(routes!(replicas::promote))
        .routes(routes!(replicas::held, replicas::declare_volume))
        .routes(routes!(replicas::declare, replicas::receive))
        .routes(routes!(log::log))
        .routes(routes!(schedules::list, schedules::add))
        .routes(routes!(schedules::run))
        .routes(routes!(schedules::remove))
        .routes(routes!(metrics))
        .routes(routes!(openapi::document))
}

/// The API's OpenAPI 3 document, as `GET /v1/openapi.json` serves it.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    let (_, mut doc) = routes().split_for_parts();
    openapi::finish(&mut doc);
    doc
}

/// Build the router. With `auth`, every request (`/metrics`, the document and unknown paths
/// included) must carry that bearer token (see [`crate::server::auth`]).
pub fn router(
    store: Shared,
    auth: Option<Arc<crate::server::auth::Tokens>>,
    events: Arc<Events>,
    clock: Arc<crate::server::clock::Clock>,
    scheduler: Arc<crate::server::scheduler::Scheduler>,
    replicator: Arc<crate::server::replication::Replicator>,
) -> Router {
    let (router, mut doc) = routes().split_for_parts();
    openapi::finish(&mut doc);
    let routed = router
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such API endpoint (see docs/api.md)".into()) })
        .layer(Extension(openapi::Document::render(&doc)))
        .layer(Extension(events))
        .layer(Extension(clock))
        .layer(Extension(scheduler))
        .layer(Extension(replicator))
        .with_state(store.clone());
    // Around the whole router, not each route: a 405 gets its `Allow` header only on the way
    // out of the route's method router.
    let router = Router::new()
        .fallback_service(routed)
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::middleware::from_fn_with_state(store.clone(), oplog::record));
    match auth {
        Some(token) => router.layer(axum::middleware::from_fn_with_state(token, crate::server::auth::require_token)),
        None => router,
    }
}

#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "Prometheus text format (`forkd_*` counters and gauges)",
        content_type = "text/plain", body = String)))]
async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    s.update_space_metrics();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render())
}

/// The last guard of the one error shape: an error the router itself answered in plain text
/// or with no body (405 for a method a path does not take, a rejection no extractor in
/// [`extract`] wraps) leaves as `{"error": "..."}`, with its status and headers (`Allow`).
async fn json_errors(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(resp.headers()) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let message = if status == StatusCode::METHOD_NOT_ALLOWED {
        let allowed = parts.headers.get(header::ALLOW).and_then(|v| v.to_str().ok()).unwrap_or("");
        format!("{path} does not take {method}; it takes {}", allowed.replace(',', ", "))
    } else {
        let text = axum::body::to_bytes(body, 64 << 10).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let line = text.lines().map(str::trim).find(|l| !l.is_empty());
        line.map_or_else(|| status.canonical_reason().unwrap_or("request failed").to_string(), str::to_string)
    };
    let json = ApiError(status, message).into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    Response::from_parts(parts, json.into_body())
}

fn is_json(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|t| t.starts_with("application/json"))
}
