//! Request extractors that refuse bad input in the API's one error shape. axum's own
//! extractors answer a bad body, query or path with plain text; these wrap the same parsing
//! and answer `{"error": "..."}` with a line that says what to fix:
//!
//! - [`JsonBody`]: a JSON body, whose `Content-Type` may be absent or JSON (`application/json`,
//!   `application/*+json`); any other type is 415. Not JSON is 400, JSON of the wrong shape
//!   422, more than [`JSON_LIMIT`] 413. [`OptionalJson`] also takes an empty body.
//! - [`RawBody`]: raw bytes, at most `MAX` (413 past that).
//! - [`ApiQuery`], [`ApiPath`]: the query string and path parameters (400).
//!
//! Whatever else could still leave the router as plain text (a rejection not wrapped here, an
//! empty 405) is caught by [`super::json_errors`].

use axum::async_trait;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use super::ApiError;
use crate::units::humanize;

/// Largest JSON body a route takes (what axum allowed before these extractors).
pub(super) const JSON_LIMIT: usize = 2 << 20;

/// A JSON request body.
#[derive(Debug)]
pub(super) struct JsonBody<T>(pub(super) T);

/// A JSON request body that may also be left out (an empty body).
#[derive(Debug)]
pub(super) struct OptionalJson<T>(pub(super) Option<T>);

/// A raw request body of at most `MAX` bytes.
#[derive(Debug)]
pub(super) struct RawBody<const MAX: usize>(pub(super) Bytes);

/// The query string, deserialized.
#[derive(Debug)]
pub(super) struct ApiQuery<T>(pub(super) T);

/// The path parameters, deserialized.
#[derive(Debug)]
pub(super) struct ApiPath<T>(pub(super) T);

#[async_trait]
impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let OptionalJson(value) = OptionalJson::from_request(req, _state).await?;
        value.map(JsonBody).ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, "this request needs a JSON body".into()))
    }
}

#[async_trait]
impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        // An empty body is no body, whatever type it claims.
        let declared = json_content_type(req.headers());
        let bytes = read_body(req.into_body(), JSON_LIMIT).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(None));
        }
        declared?;
        parse_json(&bytes).map(|v| OptionalJson(Some(v)))
    }
}

#[async_trait]
impl<S: Send + Sync, const MAX: usize> FromRequest<S> for RawBody<MAX> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        read_body(req.into_body(), MAX).await.map(RawBody)
    }
}

#[async_trait]
impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        Query::try_from_uri(&parts.uri)
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad query string: {}", inner_text(&e))))
    }
}

#[async_trait]
impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::from_request_parts(parts, state)
            .await
            .map(|Path(p)| ApiPath(p))
            .map_err(|e| ApiError(e.status(), format!("bad path: {}", inner_text(&e))))
    }
}

/// Whether a body may be read as JSON: its type is JSON or not given; 415 for any other type.
fn json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else { return Ok(()) };
    let text = value.to_str().map_err(|_| wrong_content_type())?;
    let essence = text.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let is_json = essence
        .strip_prefix("application/")
        .is_some_and(|sub| sub == "json" || sub.rsplit_once('+').is_some_and(|(_, suffix)| suffix == "json"));
    if is_json {
        Ok(())
    } else {
        Err(wrong_content_type())
    }
}

fn wrong_content_type() -> ApiError {
    ApiError(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "this request takes a JSON body: send `Content-Type: application/json` or none".into(),
    )
}

/// Parse a JSON body: 400 when it is not JSON, 422 when it does not have this route's shape
/// (naming the field at fault).
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data if field == "." => {
                ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("the JSON body does not fit this request: {inner}"))
            }
            serde_json::error::Category::Data => ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("the JSON body does not fit this request: `{field}`: {inner}"),
            ),
            _ => not_json(&inner),
        }
    })?;
    de.end().map_err(|e| not_json(&e))?;
    Ok(value)
}

fn not_json(e: &serde_json::Error) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, format!("the body is not valid JSON: {e}"))
}

/// Read a whole body of at most `max` bytes: 413 as soon as more has come, 400 when the stream
/// breaks. Memory is bounded by `max` whatever length the request declares.
pub(super) async fn read_body(body: Body, max: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        let limit = humanize(max as u64);
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than the {limit} this endpoint takes"),
        )
    };
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("the request body broke off: {e}")))?;
        if buf.len() + chunk.len() > max {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// The message of an axum rejection without its generic prefix ("Failed to deserialize ...:").
fn inner_text(e: &(impl std::error::Error + 'static)) -> String {
    let mut deepest: &dyn std::error::Error = e;
    while let Some(next) = deepest.source() {
        deepest = next;
    }
    deepest.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_type(t: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = t {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(t).expect("header"));
        }
        h
    }

    #[test]
    fn content_types() {
        for ok in
            [None, Some("application/json"), Some("Application/JSON; charset=utf-8"), Some("application/merge+json")]
        {
            assert!(json_content_type(&with_type(ok)).is_ok(), "{ok:?}");
        }
        for bad in ["text/plain", "application/octet-stream", "application/jsonx", "json"] {
            let e = json_content_type(&with_type(Some(bad))).expect_err(bad);
            assert_eq!(e.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        }
    }

    #[test]
    fn json_errors_are_classified() {
        #[derive(serde::Deserialize, Debug)]
        struct Named {
            #[allow(dead_code)]
            name: String,
        }
        assert_eq!(parse_json::<Named>(b"{").expect_err("syntax").0, StatusCode::BAD_REQUEST);
        let e = parse_json::<Named>(b"{}").expect_err("shape");
        assert_eq!(e.0, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e.1.contains("missing field `name`"), "{}", e.1);
        let e = parse_json::<Named>(br#"{"name": 7}"#).expect_err("type");
        assert!(e.1.contains("`name`: invalid type"), "{}", e.1);
        assert_eq!(parse_json::<Named>(br#"{"name": "a"} x"#).expect_err("trailing").0, StatusCode::BAD_REQUEST);
    }
}
