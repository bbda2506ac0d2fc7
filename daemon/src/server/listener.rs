//! One life cycle for every protocol listener (NBD, iSCSI): what a connection goes through
//! from `accept` to its last byte, whatever the protocol.
//!
//! The life cycle owns:
//! - the accept loop, with exponential backoff on accept errors (out of file descriptors and
//!   the like) instead of spinning;
//! - the connection limit: a semaphore of `max_connections` slots; a connection over it is
//!   closed at once, before a byte is sent, and counted;
//! - the handshake deadline (NBD's option haggling, iSCSI's login), and the shutdown signal
//!   during the handshake;
//! - a tracing span per connection carrying the peer and, once the protocol knows it
//!   ([`Cx::set_export`]), the export;
//! - the connection metrics: the open gauge and the close counter by reason, bumped in
//!   [`count`] only, with the reason a protocol's own enum ([`Reason`]);
//! - the shutdown: stop accepting, tell every connection ([`Cx::shutdown`]), wait until each
//!   has ended (bounded by [`DRAIN_TIMEOUT`]) and join their threads. [`serve_tasks`] and
//!   [`serve_threads`] return only then, so the daemon's final flush comes after every
//!   connection that may still have been writing.
//!
//! How a connection runs is the protocol's choice: a tokio task over async sockets
//! ([`TaskProtocol`], NBD, whose requests run on the blocking pool anyway), or an OS thread
//! with blocking socket I/O ([`ThreadProtocol`], iSCSI: a read, the commands it holds and the
//! write of their answers never change threads, which measured faster). A thread's socket is
//! a [`Socket`], whose reads wake every [`POLL`] to honour the deadline and the shutdown.
//!
//! Invariant: an admitted connection holds its slot, its place in the drain and its share of
//! the open gauge until it ends ([`Admitted`] gives them back when dropped, even on a panic);
//! the close counter is bumped exactly once per connection, refused ones included.

use std::future::Future;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span};

use crate::metrics::ConnectionMetrics;

/// How long a shutdown waits for connections to end before it goes on without them.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a blocked read on a connection thread wakes to look at its deadline and stops.
pub const POLL: Duration = Duration::from_millis(200);
/// First and longest pause after a failed accept.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

/// Limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; more are closed at once.
    pub max_connections: usize,
    /// Time a client has to finish its handshake (NBD) or login (iSCSI).
    pub handshake_timeout: Duration,
}

/// `[nbd_limits]` and `[iscsi_limits]` in the config file; a key left out keeps the
/// protocol's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Connections open at once (at least 1).
    pub max_connections: Option<usize>,
    /// Handshake or login timeout in milliseconds (at least 1).
    pub handshake_timeout_ms: Option<u64>,
}

impl LimitSettings {
    /// These settings over `defaults`; `table` names the config table in errors.
    pub fn resolve(&self, defaults: Limits, table: &str) -> anyhow::Result<Limits> {
        let max_connections = self.max_connections.unwrap_or(defaults.max_connections);
        anyhow::ensure!(max_connections >= 1, "config: {table}.max_connections must be at least 1");
        let handshake_timeout = self.handshake_timeout_ms.map_or(defaults.handshake_timeout, Duration::from_millis);
        anyhow::ensure!(!handshake_timeout.is_zero(), "config: {table}.handshake_timeout_ms must be at least 1");
        Ok(Limits { max_connections, handshake_timeout })
    }
}

/// Why the life cycle itself ended a connection; each protocol's close reason has these too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Refused: `max_connections` were already open.
    ConnectionLimit,
    /// The handshake (login) did not finish in time.
    HandshakeTimeout,
    /// The daemon is shutting down.
    Shutdown,
    /// The accepted socket could not be set up.
    SocketSetup,
    /// No thread could be started for the connection.
    NoThread,
}

/// A protocol's reason for closing a connection.
pub trait Reason: From<Ended> + std::fmt::Debug + Send + 'static {
    /// The `reason` label of `forkd_<protocol>_connections_closed_total` (and of the log line).
    fn label(&self) -> &'static str;
}

/// How a connection ended, and what it did, for the close counter and the log line.
#[derive(Debug)]
pub struct Closed<R> {
    /// Why it closed.
    pub reason: R,
    /// Requests (commands) it received.
    pub requests: u64,
    /// Requests it refused or failed.
    pub errors: u64,
}

impl<R> From<R> for Closed<R> {
    fn from(reason: R) -> Self {
        Closed { reason, requests: 0, errors: 0 }
    }
}

/// A protocol served through this life cycle.
pub trait Protocol: Send + Sync + 'static {
    /// Why its connections close.
    type Close: Reason;
    /// Its name in log lines ("NBD", "iSCSI").
    const NAME: &'static str;
    /// The span of one connection, with fields `peer` and `export` (empty until
    /// [`Cx::set_export`]). Each protocol names its own: tracing's span names are static.
    fn span(peer: SocketAddr) -> Span;
    /// Its connection gauge and close counter.
    fn metrics(&self) -> &ConnectionMetrics;
}

/// A protocol whose connections are tokio tasks.
pub trait TaskProtocol: Protocol {
    /// A connection past its handshake.
    type Session: Send + 'static;
    /// Run the handshake. The life cycle bounds it by the handshake timeout and the shutdown:
    /// when either fires first, the future (and the socket in it) is dropped.
    fn handshake(&self, stream: TcpStream, cx: &Cx) -> impl Future<Output = Result<Self::Session, Self::Close>> + Send;
    /// Serve requests until the connection ends; it must end soon after [`Cx::shutdown`].
    fn serve(&self, session: Self::Session, cx: &Cx) -> impl Future<Output = Closed<Self::Close>> + Send;
}

/// A protocol whose connections each run on their own OS thread with blocking I/O.
pub trait ThreadProtocol: Protocol {
    /// A connection past its handshake.
    type Session;
    /// Run the handshake; reads through `sock` fail with [`Stop::Ended`] at the deadline or a
    /// shutdown.
    fn handshake(&self, sock: &mut Socket, cx: &Cx) -> Result<Self::Session, Self::Close>;
    /// Serve requests until the connection ends; reads through `sock` fail with
    /// [`Stop::Ended`] on a shutdown.
    fn serve(&self, sock: Socket, session: Self::Session, cx: &Cx) -> Closed<Self::Close>;
}

/// What a connection gets from the life cycle.
#[derive(Debug, Clone)]
pub struct Cx {
    /// The client's address.
    pub peer: SocketAddr,
    /// Cancelled when the daemon shuts down: take no more requests, answer those received,
    /// close.
    pub shutdown: CancellationToken,
    span: Span,
    tracker: TaskTracker,
}

impl Cx {
    /// Record the export in the connection's span (every later log line carries it).
    pub fn set_export(&self, export: &str) {
        self.span.record("export", export);
    }

    /// The connection's span, for work it hands to other tasks or threads.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// Run `work` in the background after the connection has ended (NBD's linger), in the
    /// connection's span; the shutdown waits for it like for a connection.
    pub fn spawn_after(&self, work: impl Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(work.instrument(self.span.clone()));
    }
}

/// An admitted connection's hold on the listener: its slot under the limit, its place in the
/// drain and its share of the open gauge, all given back when dropped.
#[derive(Debug)]
struct Admitted<P: Protocol> {
    proto: Arc<P>,
    cx: Cx,
    deadline: Instant,
    _slot: OwnedSemaphorePermit,
    _tracked: TaskTrackerToken,
}

impl<P: Protocol> Admitted<P> {
    fn new(proto: Arc<P>, cx: Cx, slot: OwnedSemaphorePermit, limits: &Limits) -> Admitted<P> {
        proto.metrics().open.inc();
        let _tracked = cx.tracker.token();
        Admitted { proto, cx, deadline: Instant::now() + limits.handshake_timeout, _slot: slot, _tracked }
    }

    /// Count and log how the connection ended; dropping `self` then frees its slot.
    fn close(self, closed: &Closed<P::Close>) {
        count(&*self.proto, &closed.reason);
        tracing::info!(
            reason = closed.reason.label(),
            requests = closed.requests,
            errors = closed.errors,
            "{} connection closed",
            P::NAME
        );
    }
}

impl<P: Protocol> Drop for Admitted<P> {
    fn drop(&mut self) {
        self.proto.metrics().open.dec();
    }
}

/// The one place a close is counted.
fn count<P: Protocol>(proto: &P, reason: &P::Close) {
    proto.metrics().closed.with_label_values(&[reason.label()]).inc();
}

/// Serve `proto` on `listener`, each connection a tokio task, until `shutdown`; returns once
/// every connection has ended (or [`DRAIN_TIMEOUT`] passed).
pub async fn serve_tasks<P: TaskProtocol>(
    listener: TcpListener,
    proto: Arc<P>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    serve(listener, Tasks(proto), limits, shutdown).await;
}

/// Serve `proto` on `listener`, each connection on its own thread, until `shutdown`; returns
/// once every connection has ended and its thread is joined (or [`DRAIN_TIMEOUT`] passed).
pub async fn serve_threads<P: ThreadProtocol>(
    listener: TcpListener,
    proto: Arc<P>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    serve(listener, Threads { proto, running: Vec::new() }, limits, shutdown).await;
}

/// How connections run: [`Tasks`] or [`Threads`].
trait Model {
    type Protocol: Protocol;
    fn protocol(&self) -> &Arc<Self::Protocol>;
    /// Run one admitted connection to its end.
    fn start(&mut self, stream: TcpStream, conn: Admitted<Self::Protocol>);
    /// After the drain (`drained`: every connection ended): join what is left.
    async fn join(self, drained: bool);
}

async fn serve<M: Model>(listener: TcpListener, mut model: M, limits: Limits, shutdown: CancellationToken) {
    let name = <M::Protocol as Protocol>::NAME;
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    let mut backoff = BACKOFF.0;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "{name} accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF.1);
                continue;
            }
        };
        backoff = BACKOFF.0;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            count(&**model.protocol(), &Ended::ConnectionLimit.into());
            tracing::warn!(%peer, limit = limits.max_connections, "refusing {name} connection: connection limit reached");
            continue;
        };
        let span = M::Protocol::span(peer);
        let cx = Cx { peer, shutdown: shutdown.child_token(), span, tracker: tracker.clone() };
        model.start(stream, Admitted::new(model.protocol().clone(), cx, slot, &limits));
    }
    // New connections are refused from here on; the open ones finish.
    drop(listener);
    tracker.close();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait()).await.is_ok();
    if !drained {
        tracing::warn!(
            open = tracker.len(),
            "{name} connections still open after {DRAIN_TIMEOUT:?}; not waiting longer"
        );
    }
    model.join(drained).await;
    tracing::info!("{name} listener stopped");
}

/// Connections as tokio tasks.
struct Tasks<P>(Arc<P>);

impl<P: TaskProtocol> Model for Tasks<P> {
    type Protocol = P;

    fn protocol(&self) -> &Arc<P> {
        &self.0
    }

    fn start(&mut self, stream: TcpStream, conn: Admitted<P>) {
        let span = conn.cx.span.clone();
        tokio::spawn(
            async move {
                let closed = run_task(&*conn.proto, stream, &conn).await;
                conn.close(&closed);
            }
            .instrument(span),
        );
    }

    async fn join(self, _drained: bool) {}
}

async fn run_task<P: TaskProtocol>(proto: &P, stream: TcpStream, conn: &Admitted<P>) -> Closed<P::Close> {
    let deadline = tokio::time::Instant::from_std(conn.deadline);
    let session = tokio::select! {
        _ = conn.cx.shutdown.cancelled() => return P::Close::from(Ended::Shutdown).into(),
        r = tokio::time::timeout_at(deadline, proto.handshake(stream, &conn.cx)) => match r {
            Err(_) => return P::Close::from(Ended::HandshakeTimeout).into(),
            Ok(Err(reason)) => return reason.into(),
            Ok(Ok(s)) => s,
        },
    };
    proto.serve(session, &conn.cx).await
}

/// Connections on OS threads; `running` holds the threads not joined yet.
struct Threads<P> {
    proto: Arc<P>,
    running: Vec<JoinHandle<()>>,
}

impl<P> Threads<P> {
    /// Join the threads that have finished.
    fn reap(&mut self) {
        let (done, running) = std::mem::take(&mut self.running).into_iter().partition(JoinHandle::is_finished);
        self.running = running;
        join_all(done);
    }
}

/// Join threads that have finished or are about to (their connection has ended).
fn join_all(threads: Vec<JoinHandle<()>>) {
    for t in threads {
        if t.join().is_err() {
            tracing::error!("a connection thread panicked");
        }
    }
}

impl<P: ThreadProtocol> Model for Threads<P> {
    type Protocol = P;

    fn protocol(&self) -> &Arc<P> {
        &self.proto
    }

    fn start(&mut self, stream: TcpStream, conn: Admitted<P>) {
        self.reap();
        let sock = match Socket::new(stream, &conn) {
            Ok(s) => s,
            Err(e) => {
                let span = conn.cx.span.clone();
                let _entered = span.enter();
                tracing::warn!(error = %e, "{} connection setup failed", P::NAME);
                conn.close(&P::Close::from(Ended::SocketSetup).into());
                return;
            }
        };
        let spawned = std::thread::Builder::new().name(format!("forkd-{}", P::NAME.to_lowercase())).spawn(move || {
            let _entered = conn.cx.span.clone().entered();
            let closed = run_thread(&*conn.proto, sock, &conn);
            conn.close(&closed);
        });
        match spawned {
            Ok(t) => self.running.push(t),
            Err(e) => {
                // The closure (and the connection's hold on the listener) is gone with the error.
                tracing::warn!(error = %e, "cannot start a {} connection thread", P::NAME);
                count(&*self.proto, &Ended::NoThread.into());
            }
        }
    }

    async fn join(self, drained: bool) {
        let threads = self.running;
        let name = P::NAME;
        // After a full drain every connection has ended: its thread is exiting, joining it is
        // immediate. Otherwise only the finished ones are joined; the rest are left running.
        let (done, stuck): (Vec<_>, Vec<_>) = threads.into_iter().partition(|t| drained || t.is_finished());
        if !stuck.is_empty() {
            tracing::warn!(threads = stuck.len(), "{name} connection threads still running; not joined");
        }
        let joined = done.len();
        if tokio::task::spawn_blocking(move || join_all(done)).await.is_err() {
            tracing::error!("joining the {name} connection threads failed");
        }
        tracing::debug!(threads = joined, "{name} connection threads joined");
    }
}

fn run_thread<P: ThreadProtocol>(proto: &P, mut sock: Socket, conn: &Admitted<P>) -> Closed<P::Close> {
    let session = match proto.handshake(&mut sock, &conn.cx) {
        Ok(s) => s,
        Err(reason) => return reason.into(),
    };
    sock.deadline = None;
    proto.serve(sock, session, &conn.cx)
}

/// A connection's socket on its own thread: blocking I/O, with reads that wake every [`POLL`]
/// to give up at the handshake deadline, on a shutdown, or when the caller's stop token is
/// cancelled.
#[derive(Debug)]
pub struct Socket {
    stream: std::net::TcpStream,
    /// The handshake deadline, until the handshake is done.
    deadline: Option<Instant>,
    shutdown: CancellationToken,
}

/// Why a read on a [`Socket`] returned no data.
#[derive(Debug)]
pub enum Stop {
    /// The handshake deadline passed, or the daemon is shutting down.
    Ended(Ended),
    /// The stop token given to [`Socket::read`] was cancelled.
    Stopped,
    /// The peer closed the connection.
    Eof,
    /// The read failed.
    Failed(std::io::Error),
}

impl Socket {
    fn new<P: Protocol>(stream: TcpStream, conn: &Admitted<P>) -> std::io::Result<Socket> {
        let stream = stream.into_std()?;
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(POLL))?;
        let _ = stream.set_nodelay(true);
        Ok(Socket { stream, deadline: Some(conn.deadline), shutdown: conn.cx.shutdown.clone() })
    }

    /// Read what has arrived into `buf` (at least one byte), blocking until something does.
    /// Before every wait it gives up, in this order, at the handshake deadline, when `stop` is
    /// cancelled, or on a shutdown.
    pub fn read(&mut self, buf: &mut [u8], stop: Option<&CancellationToken>) -> Result<usize, Stop> {
        loop {
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Stop::Ended(Ended::HandshakeTimeout));
            }
            if stop.is_some_and(CancellationToken::is_cancelled) {
                return Err(Stop::Stopped);
            }
            if self.shutdown.is_cancelled() {
                return Err(Stop::Ended(Ended::Shutdown));
            }
            match self.stream.read(buf) {
                Ok(0) => return Err(Stop::Eof),
                Ok(n) => return Ok(n),
                Err(e) if is_wakeup(&e) => {}
                Err(e) => return Err(Stop::Failed(e)),
            }
        }
    }

    /// The socket, for writing.
    pub fn stream(&mut self) -> &mut std::net::TcpStream {
        &mut self.stream
    }

    /// The local address the client connected to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.stream.local_addr()
    }
}

/// A read that returned only because [`POLL`] passed (or a signal arrived).
fn is_wakeup(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(e.kind(), K::WouldBlock | K::TimedOut | K::Interrupted)
}
