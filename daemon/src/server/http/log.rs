//! `GET /v1/log` (docs/api.md, "Operation log"): the operation log, filtered by volume and
//! start time, newest `limit` entries, oldest first. What is recorded, and when, is
//! `http/oplog.rs` and `store/oplog.rs`.

use axum::extract::State;
use axum::Json;

use super::extract::ApiQuery;
use super::{bad, blocking, ApiResult, Shared};
use crate::api::error::ErrorBody;
use crate::api::log::{LogEntries, LogEntry, LogQuery};

/// Entries answered when the query gives no `limit`.
const DEFAULT_LIMIT: u64 = 1000;

#[utoipa::path(get, path = "/v1/log", tag = "meta", params(LogQuery),
    responses((status = 200, description = "the entries, oldest first", body = LogEntries),
        (status = 400, description = "a `since` that is neither a time nor a span", body = ErrorBody)))]
pub(super) async fn log(State(s): State<Shared>, ApiQuery(q): ApiQuery<LogQuery>) -> ApiResult<Json<LogEntries>> {
    let query = catalog::LogQuery {
        volume: q.volume,
        since: q.since.as_deref().map(since).transpose()?,
        limit: Some(usize::try_from(q.limit.unwrap_or(DEFAULT_LIMIT)).unwrap_or(usize::MAX)),
    };
    let entries = blocking(&s, move |st| st.operation_log(&query)).await?;
    Ok(Json(LogEntries { entries: entries.into_iter().map(entry).collect() }))
}

/// `since` as unix milliseconds: an RFC 3339 time, or a span back from now.
fn since(text: &str) -> ApiResult<i64> {
    if let Some(t) = catalog::parse_time(text) {
        return Ok(t);
    }
    let span = catalog::parse_span(text).and_then(|ms| i64::try_from(ms).ok()).ok_or_else(|| {
        bad(format!("since `{text}` is neither a time such as 2026-11-21T10:00:00Z nor a span such as 30m or 1h"))
    })?;
    Ok(crate::store::now_ms().saturating_sub(span))
}

fn entry(e: catalog::LogEntry) -> LogEntry {
    LogEntry {
        at: catalog::format_time(e.at),
        detail: e.detail,
        duration_ms: e.duration_ms,
        error: e.error,
        result: e.result,
        seq: e.seq,
        target: e.target,
        what: e.what,
        who: e.who,
    }
}
