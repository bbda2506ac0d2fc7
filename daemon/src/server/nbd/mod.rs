//! The NBD listener: drives the `nbd` protocol crate over tokio and turns its requests into
//! store operations.
//!
//! The life cycle (connection limit, handshake timeout, span, shutdown and close counting) is
//! [`crate::server::listener`]'s; each connection is a tokio task. This module is the
//! handshake and the close reasons; [`connection`] is a connection in transmission (reader,
//! batches, writer, linger); [`execute`] runs requests against the store and maps every store
//! error to an NBD errno in [`errno_of`], the one place that does so and counts it.
//!
//! In transmission, requests are decoded on the connection's task and executed on tokio's
//! blocking pool (the store does synchronous I/O) in batches, `max_in_flight` at a time, with
//! replies written by a separate writer task as they complete (NBD allows any order). A client
//! that vanishes costs only its own connection: requests it already sent finish, nothing else
//! is touched.
//!
//! Exports: every clone by name (read-write), every source and every snapshot `VOLUME@N`
//! (read-only); other snapshot references (`VOLUME@latest`, `@BOOKMARK`, `@TIME`) resolve to
//! the snapshot they name. A FLUSH flushes the whole store, so it covers writes answered on any
//! connection: CAN_MULTI_CONN is advertised. Before a rewind, refresh or delete the affected
//! connections are closed after answering what they had received (see `exports.rs`).

mod connection;
mod execute;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use nbd::{ExportInfo, Exports, Handshake, HandshakeConfig, Session, Step};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub use execute::errno_of;

use crate::metrics::ConnectionMetrics;
use crate::server::listener::{self, Closed, Cx, Ended, Limits, Protocol, Reason, TaskProtocol};
use crate::store::exports::Denied;
use crate::store::Store;

/// The NBD listener's limits unless the config says otherwise (`[nbd_limits]`).
pub const DEFAULT_LIMITS: Limits = Limits { max_connections: 256, handshake_timeout: Duration::from_secs(10) };

/// Settings of NBD connections in transmission.
#[derive(Debug, Clone)]
pub struct NbdConfig {
    /// Batches of requests one connection may have executing at once (each batch holds every
    /// request that arrived while the previous ones ran).
    pub max_in_flight: usize,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig { max_in_flight: 2 }
    }
}

/// Why an NBD connection closed: the `reason` label of `forkd_nbd_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The life cycle ended it (limit, handshake timeout, shutdown).
    Ended(Ended),
    /// The handshake state machine could not be set up.
    Internal,
    /// Reading from the client failed during the handshake.
    HandshakeRead,
    /// Writing to the client failed during the handshake.
    HandshakeWrite,
    /// The client hung up during the handshake.
    ClientClosedDuringHandshake,
    /// The handshake ended without an export (NBD_OPT_ABORT, or an old-style refusal).
    ClosedDuringHandshake,
    /// The client sent bytes the handshake cannot parse.
    MalformedHandshake,
    /// The export chosen was being switched (rewind, refresh, delete) at that moment.
    ExportSwitching,
    /// A request that cannot be parsed.
    MalformedRequest,
    /// The client said goodbye.
    Disc,
    /// The writer task is gone (the client stopped taking replies).
    WriterFailed,
    /// Closed so a rewind, refresh or delete can go ahead.
    Switched,
    /// The client hung up between requests.
    ClientDisconnected,
    /// The client hung up in the middle of a request.
    VanishedMidRequest,
    /// Reading from the client failed.
    ReadError,
}

impl From<Ended> for Close {
    fn from(e: Ended) -> Self {
        Close::Ended(e)
    }
}

impl Reason for Close {
    fn label(&self) -> &'static str {
        match self {
            Close::Ended(Ended::ConnectionLimit) => "connection limit",
            Close::Ended(Ended::HandshakeTimeout) => "handshake timeout",
            Close::Ended(Ended::Shutdown) => "daemon shutting down",
            Close::Ended(Ended::SocketSetup) => "socket setup failed",
            Close::Ended(Ended::NoThread) => "cannot start a thread",
            Close::Internal => "internal error",
            Close::HandshakeRead => "read error during handshake",
            Close::HandshakeWrite => "write error during handshake",
            Close::ClientClosedDuringHandshake => "client closed during handshake",
            Close::ClosedDuringHandshake => "closed during handshake",
            Close::MalformedHandshake => "malformed handshake",
            Close::ExportSwitching => "export switching",
            Close::MalformedRequest => "malformed request",
            Close::Disc => "client sent NBD_CMD_DISC",
            Close::WriterFailed => "reply writer failed",
            Close::Switched => "closed for a rewind, refresh or delete",
            Close::ClientDisconnected => "client disconnected",
            Close::VanishedMidRequest => "client vanished mid-request",
            Close::ReadError => "read error",
        }
    }
}

/// Accept NBD connections until `shutdown` is cancelled; returns once they have drained.
pub async fn serve(
    listener: TcpListener,
    store: Arc<Store>,
    cfg: NbdConfig,
    limits: Limits,
    shutdown: CancellationToken,
) {
    listener::serve_tasks(listener, Arc::new(Nbd { store, cfg }), limits, shutdown).await;
}

/// The NBD protocol over the store.
#[derive(Debug)]
struct Nbd {
    store: Arc<Store>,
    cfg: NbdConfig,
}

/// A connection past its handshake: the session negotiated, the socket's halves and what was
/// read beyond the handshake.
#[derive(Debug)]
struct Negotiated {
    session: Session,
    rd: OwnedReadHalf,
    wr: BufWriter<OwnedWriteHalf>,
    buf: BytesMut,
}

impl Protocol for Nbd {
    type Close = Close;
    const NAME: &'static str = "NBD";

    fn span(peer: SocketAddr) -> tracing::Span {
        tracing::info_span!("nbd", %peer, export = tracing::field::Empty)
    }

    fn metrics(&self) -> &ConnectionMetrics {
        &self.store.metrics.nbd_connections
    }

    fn log_closed(closed: &Closed<Close>, export: &str) {
        let (reason, requests, errors) = (closed.reason.label(), closed.requests, closed.errors);
        tracing::info!(export = %export, reason, requests, errors, "NBD connection closed");
    }
}

impl TaskProtocol for Nbd {
    type Session = Negotiated;

    async fn handshake(&self, stream: TcpStream, _cx: &Cx) -> Result<Negotiated, Close> {
        let _ = stream.set_nodelay(true);
        let (mut rd, wr) = stream.into_split();
        let mut wr = BufWriter::with_capacity(256 << 10, wr);
        let mut buf = BytesMut::with_capacity(1 << 20);
        let mut hs = Handshake::new(HandshakeConfig::default()).map_err(|_| Close::Internal)?;
        send(&mut wr, &hs.greeting()).await?;
        loop {
            match hs.feed(&mut buf, &StoreExports(&self.store)) {
                Ok(Step::NeedMore) => {
                    if rd.read_buf(&mut buf).await.map_err(|_| Close::HandshakeRead)? == 0 {
                        return Err(Close::ClientClosedDuringHandshake);
                    }
                }
                Ok(Step::Reply(b)) => send(&mut wr, &b).await?,
                Ok(Step::Close { reply }) => {
                    send(&mut wr, &reply).await?;
                    return Err(Close::ClosedDuringHandshake);
                }
                Ok(Step::Done { reply, session }) => {
                    send(&mut wr, &reply).await?;
                    return Ok(Negotiated { session, rd, wr, buf });
                }
                Err(e) => {
                    tracing::debug!(error = %e, "malformed handshake");
                    return Err(Close::MalformedHandshake);
                }
            }
        }
    }

    async fn serve(&self, negotiated: Negotiated, cx: &Cx) -> Closed<Close> {
        connection::serve(self.store.clone(), &self.cfg, negotiated, cx).await
    }
}

async fn send(wr: &mut BufWriter<OwnedWriteHalf>, b: &[u8]) -> Result<(), Close> {
    wr.write_all(b).await.map_err(|_| Close::HandshakeWrite)?;
    wr.flush().await.map_err(|_| Close::HandshakeWrite)
}

/// The store's volumes and snapshots as the handshake's export list.
struct StoreExports<'a>(&'a Store);

impl Exports for StoreExports<'_> {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        if name.is_empty() {
            return None;
        }
        let reference = self.0.admit_export(name).ok()?;
        if self.0.exports.is_fenced(&reference) {
            return None;
        }
        let cat = self.0.catalog();
        let t = cat.target(&reference).ok()?;
        let description = if t.read_only { "forkd read-only volume" } else { "forkd clone" };
        Some(ExportInfo {
            name: t.name,
            description: description.into(),
            size: t.size_bytes,
            read_only: t.read_only,
            can_multi_conn: true,
        })
    }

    fn refusal(&self, name: &str) -> Option<String> {
        match self.0.admit_export(name) {
            Err(Denied::Refused(why)) => {
                tracing::info!(export = name, reason = %why, "NBD export refused");
                Some(why)
            }
            _ => None,
        }
    }

    fn list(&self) -> Vec<(String, String)> {
        let mut out = self.all();
        out.retain(|(name, _)| self.0.admit_export(name).is_ok());
        out
    }
}

impl StoreExports<'_> {
    /// Every volume and snapshot, before admission (see [`Store::admit_export`]).
    fn all(&self) -> Vec<(String, String)> {
        let cat = self.0.catalog();
        let mut out = Vec::new();
        for v in cat.volumes().values() {
            let what = match &v.origin {
                Some(o) => format!("clone of {o}"),
                None => "source (read-only)".to_string(),
            };
            out.push((v.name.clone(), what));
            for s in &v.snapshots {
                out.push((format!("{}@{}", v.name, s.id), "snapshot (read-only)".to_string()));
            }
        }
        out
    }
}
