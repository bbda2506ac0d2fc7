//! The HTTP API's accept loop (`[api_limits]`): HTTP/1.1 connections served by hyper with a
//! header-read timeout, a bound on open connections, and a drained shutdown.
//!
//! - Header timeout: a client must send a request's whole header within `header_timeout_ms`
//!   of the connection's start or of the previous response; hyper's timer runs while it waits
//!   for a head, so the same bound closes a half-sent request and an idle keep-alive connection.
//! - Connection bound: at most `max_connections` open at once, so the daemon never runs out
//!   of file descriptors on the API. A connection that has not completed a request header yet
//!   counts as a handshake ([`crate::server::admission`]); when the bound is full a new
//!   connection evicts the oldest of those and takes its place, and is closed at once only
//!   when every open connection has sent a request. A flood of half-sent requests thus cannot
//!   hold the API, and a real client still gets through.
//! - Shutdown: stop accepting, let every connection finish the request it runs and close
//!   (hyper's graceful shutdown), and wait for all of them.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::server::admission::{Admission, Handshaking};
use crate::server::listener::Limits;

/// How long a new connection waits for the slot of the connection it evicted.
const EVICT_WAIT: Duration = Duration::from_secs(2);
/// Most API connections that may be configured.
const MAX_CONNECTIONS: usize = 100_000;

/// The API's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time a client has to send a request header (from the connection's start or the
    /// previous response).
    pub header_timeout: Duration,
}

/// The defaults: 512 connections, 10 s.
pub const DEFAULT_API_LIMITS: ApiLimits = ApiLimits { max_connections: 512, header_timeout: Duration::from_secs(10) };

/// `[api_limits]` in the config file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiLimitSettings {
    /// Connections open at once (at least 1).
    pub max_connections: Option<usize>,
    /// Header timeout in milliseconds (at least 1).
    pub header_timeout_ms: Option<u64>,
}

impl ApiLimitSettings {
    /// These settings over the defaults.
    pub fn resolve(&self) -> anyhow::Result<ApiLimits> {
        let max_connections = self.max_connections.unwrap_or(DEFAULT_API_LIMITS.max_connections);
        anyhow::ensure!(
            (1..=MAX_CONNECTIONS).contains(&max_connections),
            "config: api_limits.max_connections must be from 1 to {MAX_CONNECTIONS}"
        );
        let header_timeout = self.header_timeout_ms.map_or(DEFAULT_API_LIMITS.header_timeout, Duration::from_millis);
        anyhow::ensure!(
            !header_timeout.is_zero() && header_timeout <= Duration::from_secs(3600),
            "config: api_limits.header_timeout_ms must be from 1 to 3600000"
        );
        Ok(ApiLimits { max_connections, header_timeout })
    }
}

/// Serve `router` on `listener` until `stop` completes; returns once every connection ended.
pub async fn serve(listener: TcpListener, router: axum::Router, limits: ApiLimits, stop: impl Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let n = limits.max_connections;
    let admission = Admission::new(Limits {
        max_handshakes: n,
        max_handshakes_per_peer: n,
        max_connections_per_peer: n,
        ..Limits::new(n, limits.header_timeout)
    });
    let stopping = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut backoff = Duration::from_millis(5);
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut stop => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(5);
        if slots.available_permits() == 0 && !admission.evict_one() {
            tracing::warn!(%peer, limit = n, "refusing an API connection: connection limit reached");
            continue;
        }
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let Ok(handshaking) = admission.admit(peer.ip(), Some(fd)) else { continue };
        let conn = Conn { stream, peer, handshaking: Arc::new(handshaking), limits, stopping: stopping.clone() };
        tracker.spawn(conn.run(slots.clone(), router.clone()));
    }
    drop(listener);
    stopping.cancel();
    tracker.close();
    tracker.wait().await;
}

/// One accepted API connection.
struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    handshaking: Arc<Handshaking>,
    limits: ApiLimits,
    stopping: CancellationToken,
}

impl Conn {
    async fn run(self, slots: Arc<Semaphore>, router: axum::Router) {
        let Ok(Ok(_slot)) = tokio::time::timeout(EVICT_WAIT, slots.acquire_owned()).await else {
            tracing::warn!(peer = %self.peer, "closing an API connection: no slot freed in time");
            return;
        };
        let (peer, handshaking) = (self.peer, self.handshaking.clone());
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            // A whole request header arrived: no longer a handshake that a newcomer may evict.
            let _ = handshaking.establish();
            let mut router = router.clone();
            async move { Ok::<_, Infallible>(router.call(req).await.unwrap_or_else(|e| match e {})) }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(self.limits.header_timeout);
        let conn = builder.serve_connection(TokioIo::new(self.stream), service).with_upgrades();
        tokio::pin!(conn);
        let evicted = self.handshaking.evicted.clone();
        let result = tokio::select! {
            r = conn.as_mut() => r,
            () = evicted.cancelled() => return,
            () = self.stopping.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "API connection ended");
        }
    }
}
