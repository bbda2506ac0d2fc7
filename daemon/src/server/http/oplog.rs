//! Recording API operations in the operation log (`store/oplog.rs`): a middleware around the
//! whole router that, for every request that may change something (any method but GET, HEAD
//! and OPTIONS), writes who (the client's address), what (a short name from the method and
//! route: `clone`, `snapshot`, `delete`, ...), the target (the volume or reference in the path,
//! or the `name` of a new source or clone), when, how long, the result and the error the client
//! was given.
//!
//! Only catalog-level operations are recorded. Data-plane routes (`PUT .../data`,
//! `POST .../zero`, `POST .../flush`) are not, nor is NBD or iSCSI I/O: they are I/O, not
//! operations, a busy host makes thousands a second, and each would cost a log entry and a
//! flush. `POST .../digests` only reads. A route this module does not know (added later) is
//! still recorded, as `METHOD /path`.
//!
//! The entry is written and flushed after the handler built the answer and before the answer
//! leaves, on the blocking pool: one metadata commit and flush, so an answered operation is in
//! the log even after a `kill -9`. A failure to log is a warning and never changes the answer.
//! The body is read only for `POST /v1/sources` and `POST /v1/clones`, and only when it is
//! JSON of a declared length of at most 64 KiB: streams (ingest, data) are never buffered. An
//! error answer's body (small JSON, see `json_errors`) is read to take its `error`.

use std::net::SocketAddr;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use catalog::LogEntry;

use super::Shared;
use crate::api::error::ErrorBody;

/// Largest request or error body read.
const BODY_LIMIT: usize = 64 << 10;

/// What the log says about a request, before it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Operation {
    what: String,
    target: Option<String>,
    /// The target is the `name` of the JSON body.
    name_in_body: bool,
}

impl Operation {
    fn new(what: &str, target: Option<&str>) -> Option<Operation> {
        Some(Operation { what: what.into(), target: target.map(decode), name_in_body: false })
    }

    fn named_in_body(what: &str) -> Option<Operation> {
        Some(Operation { what: what.into(), target: None, name_in_body: true })
    }

    /// The operation `method path` is, or `None` for a request that is not one.
    fn of(method: &Method, path: &str) -> Option<Operation> {
        if [Method::GET, Method::HEAD, Method::OPTIONS].contains(method) {
            return None;
        }
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let m = method.as_str();
        match (m, segments.as_slice()) {
            (_, ["v1", "volumes", _, "data" | "zero" | "flush"]) => None,
            ("POST", ["v1", "sources", _, "digests"]) => None,
            ("POST", ["v1", "sources"]) => Operation::named_in_body("create source"),
            ("POST", ["v1", "clones"]) => Operation::named_in_body("clone"),
            ("POST", ["v1", "volumes", v, "snapshots"]) => Operation::new("snapshot", Some(v)),
            ("POST", ["v1", "volumes", v, "rewind"]) => Operation::new("rewind", Some(v)),
            ("POST", ["v1", "volumes", v, "refresh"]) => Operation::new("refresh", Some(v)),
            ("PUT", ["v1", "volumes", v, "retention"]) => Operation::new("retention set", Some(v)),
            ("POST", ["v1", "volumes", v, "prune"]) => Operation::new("prune", Some(v)),
            ("POST", ["v1", "volumes", v, "detach"]) => Operation::new("detach", Some(v)),
            ("DELETE", ["v1", "volumes", v]) => Operation::new("delete", Some(v)),
            ("POST", ["v1", "snapshots", r, "bookmarks"]) => Operation::new("bookmark", Some(r)),
            ("POST", ["v1", "sources", v, "ingest"]) => Operation::new("ingest", Some(v)),
            ("DELETE", ["v1", "sources", v, "ingest"]) => Operation::new("abort ingest", Some(v)),
            ("POST", ["v1", "sources", v, "resize"]) => Operation::new("resize", Some(v)),
            ("POST", ["v1", "scrub"]) => Operation::new("scrub", None),
            ("POST", ["v1", "schedules"]) => Operation::new("schedule add", None),
            ("POST", ["v1", "schedules", _, "run"]) => Operation::new("schedule run", None),
            ("DELETE", ["v1", "schedules", _]) => Operation::new("schedule delete", None),
            _ => Operation::new(&format!("{m} {path}"), None),
        }
    }
}

/// Percent-decode a path segment (`prod%403` is `prod@3`); invalid escapes stay as they are.
fn decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The middleware (`axum::middleware::from_fn_with_state(store, record)`).
pub(super) async fn record(State(store): State<Shared>, req: Request, next: Next) -> Response {
    let Some(mut op) = Operation::of(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map_or_else(|| "unknown".into(), |c| c.0.to_string());
    // With named tokens, who is the token's name at the client's address.
    let who = match req.extensions().get::<crate::server::auth::Caller>() {
        Some(c) => format!("{}@{peer}", c.0),
        None => peer,
    };
    let (at, started) = (crate::store::now_ms(), Instant::now());
    let (req, detail) = if op.name_in_body {
        let (req, name, detail) = read_name(req).await;
        op.target = name;
        (req, detail)
    } else {
        (req, None)
    };
    let (resp, error) = error_of(next.run(req).await).await;
    let entry = LogEntry {
        seq: 0,
        at,
        who,
        what: op.what,
        target: op.target,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        result: if error.is_none() { "ok" } else { "failed" }.into(),
        error,
        detail,
    };
    if let Err(e) = tokio::task::spawn_blocking(move || store.log_operation(entry)).await {
        tracing::warn!(error = %e, "the operation log task failed");
    }
    resp
}

/// Read a small JSON body for its `name` (and, for a clone, `from`, as the detail), and put
/// it back. Anything else passes untouched, with no name.
async fn read_name(req: Request) -> (Request, Option<String>, Option<String>) {
    let headers = req.headers();
    let json = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|t| t.contains("json"));
    let length = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    if !json || length.is_none_or(|n: usize| n > BODY_LIMIT) {
        return (req, None, None);
    }
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, BODY_LIMIT).await.unwrap_or_default();
    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let text = |key: &str| value.get(key).and_then(|v| v.as_str()).map(str::to_string);
    let detail = text("from").map(|f| format!("from {f}"));
    (Request::from_parts(parts, Body::from(bytes)), text("name"), detail)
}

/// The answer, and the error it gives (its `{"error": ...}`, or its status's reason), if any.
async fn error_of(resp: Response) -> (Response, Option<String>) {
    let status = resp.status();
    if status.is_success() || status.is_informational() || status.is_redirection() {
        return (resp, None);
    }
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, BODY_LIMIT).await.unwrap_or_else(|_| Bytes::new());
    let error = serde_json::from_slice::<ErrorBody>(&bytes).map(|b| b.error).unwrap_or_else(|_| reason(status));
    (Response::from_parts(parts, Body::from(bytes)), Some(error))
}

fn reason(status: StatusCode) -> String {
    status.canonical_reason().unwrap_or("request failed").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(method: Method, path: &str) -> Option<(String, Option<String>, bool)> {
        Operation::of(&method, path).map(|o| (o.what, o.target, o.name_in_body))
    }

    fn named(what: &str, target: &str) -> Option<(String, Option<String>, bool)> {
        Some((what.into(), Some(target.into()), false))
    }

    #[test]
    fn operations_from_routes() {
        assert_eq!(op(Method::POST, "/v1/clones"), Some(("clone".into(), None, true)));
        assert_eq!(op(Method::POST, "/v1/sources"), Some(("create source".into(), None, true)));
        assert_eq!(op(Method::POST, "/v1/volumes/db/snapshots"), named("snapshot", "db"));
        assert_eq!(op(Method::DELETE, "/v1/volumes/db%403"), named("delete", "db@3"));
        assert_eq!(op(Method::POST, "/v1/volumes/dev/rewind"), named("rewind", "dev"));
        assert_eq!(op(Method::POST, "/v1/volumes/dev/refresh"), named("refresh", "dev"));
        assert_eq!(op(Method::POST, "/v1/snapshots/db%40latest/bookmarks"), named("bookmark", "db@latest"));
        assert_eq!(op(Method::POST, "/v1/sources/db/ingest"), named("ingest", "db"));
        assert_eq!(op(Method::DELETE, "/v1/sources/db/ingest"), named("abort ingest", "db"));
        assert_eq!(op(Method::POST, "/v1/sources/db/resize"), named("resize", "db"));
        assert_eq!(op(Method::POST, "/v1/scrub"), Some(("scrub".into(), None, false)));
        assert_eq!(op(Method::PATCH, "/v1/x/y"), Some(("PATCH /v1/x/y".into(), None, false)));
    }

    #[test]
    fn reads_and_data_are_not_operations() {
        for (m, p) in [
            (Method::GET, "/v1/volumes"),
            (Method::GET, "/v1/log"),
            (Method::HEAD, "/v1/volumes/db"),
            (Method::PUT, "/v1/volumes/dev/data"),
            (Method::POST, "/v1/volumes/dev/zero"),
            (Method::POST, "/v1/volumes/dev/flush"),
            (Method::POST, "/v1/sources/db/digests"),
        ] {
            assert_eq!(op(m.clone(), p), None, "{m} {p}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(decode("prod%402026-11-21T10%3A00%3A00Z"), "prod@2026-11-21T10:00:00Z");
        assert_eq!(decode("a%2"), "a%2");
        assert_eq!(decode("a%zz"), "a%zz");
        assert_eq!(decode("%C3%A9"), "é");
    }
}
