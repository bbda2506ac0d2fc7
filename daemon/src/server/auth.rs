//! Bearer-token authentication of the HTTP API (docs/api.md, "Authentication").
//!
//! The daemon reads one shared token from a file (`--token-file` or `token_file` in the
//! config): its content with surrounding whitespace trimmed, at least [`MIN_TOKEN_LEN`]
//! printable ASCII characters. A token is required whenever the API listens on anything but
//! a loopback address, and enforced whenever one is configured. Every request, `/metrics` and
//! unknown paths included, must then carry `Authorization: Bearer TOKEN`; anything else gets
//! `401` with `{"error": "..."}` and a warning in the log naming the peer (never the token).
//!
//! The presented token is compared in constant time ([`constant_time_eq`]), so the time a
//! refusal takes says nothing about how much of a guess was right. The token itself never
//! appears in logs or `Debug` output.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::anyhow;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::error::ErrorBody;
use crate::api::token::{check_token_text, read_token_file};
use crate::server::roles::{self, Named, Role};

/// Fewest characters a token may have.
pub const MIN_TOKEN_LEN: usize = 16;

/// The API token the daemon requires. Never printed: `Debug` shows `Token(<redacted>)`.
pub struct Token(Vec<u8>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// A token from its text (already trimmed): at least [`MIN_TOKEN_LEN`] printable ASCII
    /// characters without spaces. The error says what is wrong, without the token.
    pub fn new(text: &str) -> Result<Token, String> {
        check_token_text(text)?;
        if text.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "it has {} characters; a token needs at least {MIN_TOKEN_LEN} (e.g. `openssl rand -hex 32`)",
                text.len()
            ));
        }
        Ok(Token(text.as_bytes().to_vec()))
    }

    /// Read the token the daemon requires from `path` (see [`read_token_file`]).
    pub fn from_file(path: &Path) -> anyhow::Result<Token> {
        let text = read_token_file(path)?;
        let token = Token::new(&text).map_err(|why| anyhow!("token file {}: {why}", path.display()))?;
        warn_if_readable_by_others(path);
        Ok(token)
    }

    /// The token's text, for the daemon's own client (a schedule's ingest step calls the API).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    /// Whether `presented` is this token, in time that depends only on the lengths.
    pub fn matches(&self, presented: &[u8]) -> bool {
        constant_time_eq(&self.0, presented)
    }
}

/// A token file others can read is worth a warning, not a refusal.
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(md) = std::fs::metadata(path) {
        if md.permissions().mode() & 0o077 != 0 {
            tracing::warn!(file = %path.display(), "the token file is readable by other users: chmod 600 it");
        }
    }
}

/// Compare two byte strings in time that depends only on their lengths, never on where they
/// first differ: every byte is looked at and the differences are OR-ed together.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    // Keep the optimiser from turning the loop into an early exit.
    std::hint::black_box(diff) == 0
}

/// The tokens the daemon accepts, each with a name and a role ([`crate::server::roles`]).
#[derive(Debug)]
pub struct Tokens(pub Vec<Named>);

impl Tokens {
    /// The one shared token of `token_file`: named `token`, role `admin`.
    pub fn single(token: Token) -> Tokens {
        Tokens(vec![Named { name: "token".into(), role: Role::Admin, token }])
    }

    /// The named token `presented` is: every token is compared, whichever matches, so the time
    /// says nothing about which one it is.
    pub fn find(&self, presented: &[u8]) -> Option<&Named> {
        let mut found = None;
        for n in &self.0 {
            if n.token.matches(presented) {
                found = Some(n);
            }
        }
        found
    }

    /// The text of a token with at least `role`, for the daemon's own client (a schedule's
    /// ingest step).
    pub fn text_for(&self, role: Role) -> Option<String> {
        self.0.iter().find(|n| n.role >= role).map(|n| n.token.text())
    }
}

/// The name of the token a request came with (a request extension, for the operation log).
#[derive(Debug, Clone)]
pub struct Caller(pub String);

/// Why a request was refused. The text goes to the client and into the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization` header.
    Missing,
    /// An `Authorization` header that is not `Bearer TOKEN`.
    Malformed,
    /// A bearer token that is not the daemon's.
    Wrong,
}

impl Refusal {
    /// The one-line explanation.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Missing => "this API needs a token: send `Authorization: Bearer TOKEN`",
            Refusal::Malformed => "the Authorization header must be `Bearer TOKEN`",
            Refusal::Wrong => "wrong token",
        }
    }
}

/// Check a request's headers against `tokens`: the named token it carries.
pub fn check<'a>(tokens: &'a Tokens, headers: &HeaderMap) -> Result<&'a Named, Refusal> {
    let value = headers.get(header::AUTHORIZATION).ok_or(Refusal::Missing)?.as_bytes();
    let (scheme, rest) = value.split_at(value.iter().position(|&b| b == b' ').ok_or(Refusal::Malformed)?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(Refusal::Malformed);
    }
    let presented = rest.trim_ascii();
    if presented.is_empty() {
        return Err(Refusal::Malformed);
    }
    tokens.find(presented).ok_or(Refusal::Wrong)
}

/// The `401` answer: `{"error": "..."}` and `WWW-Authenticate: Bearer realm="forkd"`.
pub fn unauthorized(why: Refusal) -> Response {
    let body = ErrorBody { error: why.message().to_string() };
    let mut r = (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"forkd\""));
    r
}

/// The `403` answer of a token whose role is below what the request needs.
fn forbidden(named: &Named, needed: Role) -> Response {
    let error = format!(
        "token `{}` has role {}; this request needs {} (docs/api.md, \"Authentication\")",
        named.name,
        named.role.name(),
        needed.name()
    );
    (StatusCode::FORBIDDEN, Json(ErrorBody { error })).into_response()
}

/// Axum middleware (`axum::middleware::from_fn_with_state(tokens, require_token)`): pass
/// requests with a known bearer token whose role suffices on, with the token's name as a
/// [`Caller`] extension; answer a missing or unknown token with `401`, too small a role with
/// `403`. Every refusal is logged with the peer (and the token's name), never the token.
pub async fn require_token(State(tokens): State<Arc<Tokens>>, mut req: Request, next: Next) -> Response {
    let peer =
        req.extensions().get::<ConnectInfo<SocketAddr>>().map_or_else(|| "unknown".to_string(), |c| c.0.to_string());
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    match check(&tokens, req.headers()) {
        Ok(named) => {
            let needed = roles::required(&method, &path);
            if named.role < needed {
                tracing::warn!(%peer, %method, %path, token = %named.name, "refused an API request: role {} < {}", named.role.name(), needed.name());
                return forbidden(named, needed);
            }
            req.extensions_mut().insert(Caller(named.name.clone()));
            next.run(req).await
        }
        Err(why) => {
            tracing::warn!(%peer, %method, %path, "refused an API request: {}", why.message());
            unauthorized(why)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "0123456789abcdef0123456789abcdef";

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).expect("header"));
        }
        h
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"abc\0", b"abc"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn token_rules() {
        assert!(Token::new(GOOD).is_ok());
        assert!(Token::new("0123456789abcdef").is_ok(), "16 characters are enough");
        let short = Token::new("0123456789abcde").expect_err("15 characters");
        assert!(short.contains("at least 16"), "{short}");
        assert!(Token::new("").is_err());
        assert!(Token::new("0123456789 abcdef").is_err(), "no spaces");
        assert!(Token::new("0123456789abcdéf").is_err(), "ASCII only");
        assert_eq!(format!("{:?}", Token::new(GOOD).expect("token")), "Token(<redacted>)");
    }

    #[test]
    fn token_file_is_trimmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("token");
        std::fs::write(&p, format!("  {GOOD}\n")).expect("write");
        assert_eq!(read_token_file(&p).expect("read"), GOOD);
        assert!(Token::from_file(&p).expect("token").matches(GOOD.as_bytes()));
        std::fs::write(&p, "short\n").expect("write");
        let err = Token::from_file(&p).expect_err("short").to_string();
        assert!(err.contains("at least 16"), "{err}");
        std::fs::write(&p, "\n\n").expect("write");
        assert!(read_token_file(&p).expect_err("empty").to_string().contains("empty"));
        let missing = dir.path().join("nope");
        assert!(Token::from_file(&missing).expect_err("missing").to_string().contains("cannot read token file"));
    }

    #[test]
    fn header_checks() {
        let t = Tokens::single(Token::new(GOOD).expect("token"));
        let check = |h: &HeaderMap| check(&t, h).map(|n| n.name.clone());
        assert_eq!(check(&headers(None)), Err(Refusal::Missing));
        assert_eq!(check(&headers(Some(&format!("Bearer {GOOD}")))), Ok("token".to_string()));
        assert_eq!(check(&headers(Some(&format!("bearer  {GOOD} ")))), Ok("token".to_string()));
        assert_eq!(check(&headers(Some(&format!("Bearer {GOOD}x")))), Err(Refusal::Wrong));
        assert_eq!(check(&headers(Some("Bearer 0123456789abcdef0123456789abcdeF"))), Err(Refusal::Wrong));
        assert_eq!(check(&headers(Some(&format!("Basic {GOOD}")))), Err(Refusal::Malformed));
        assert_eq!(check(&headers(Some("Bearer"))), Err(Refusal::Malformed));
        assert_eq!(check(&headers(Some("Bearer   "))), Err(Refusal::Malformed));
        assert_eq!(check(&headers(Some(GOOD))), Err(Refusal::Malformed));
    }

    #[test]
    fn refusal_is_json_401() {
        let r = unauthorized(Refusal::Wrong);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            r.headers().get(header::WWW_AUTHENTICATE).map(HeaderValue::as_bytes),
            Some(&b"Bearer realm=\"forkd\""[..])
        );
    }
}
