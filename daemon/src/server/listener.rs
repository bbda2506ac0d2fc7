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
//! Invariants: an admitted connection holds its slot, its place in the drain and its share of
//! the open gauge until it ends ([`Admitted`] gives them back when dropped, even on a panic);
//! the close counter is bumped once for every connection that ends, refused ones included (a
//! connection whose task or thread panicked is not counted).

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
/// Most connections a listener may be configured to hold (far beyond file-descriptor limits).
const MAX_CONNECTIONS: usize = 1_000_000;
/// Longest handshake timeout a listener may be configured with.
const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3600);
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
        anyhow::ensure!(
            (1..=MAX_CONNECTIONS).contains(&max_connections),
            "config: {table}.max_connections must be from 1 to {MAX_CONNECTIONS}"
        );
        let handshake_timeout = self.handshake_timeout_ms.map_or(defaults.handshake_timeout, Duration::from_millis);
        anyhow::ensure!(
            !handshake_timeout.is_zero() && handshake_timeout <= MAX_HANDSHAKE_TIMEOUT,
            "config: {table}.handshake_timeout_ms must be from 1 to {}",
            MAX_HANDSHAKE_TIMEOUT.as_millis()
        );
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
    /// Log a connection's end (each protocol keeps the fields its operators and tests know);
    /// `export` is empty when the connection never chose one.
    fn log_closed(closed: &Closed<Self::Close>, export: &str);
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
    export: Arc<std::sync::OnceLock<String>>,
    tracker: TaskTracker,
}

impl Cx {
    /// Record the export the connection serves, in its span (every later log line carries it)
    /// and for the log line at its end. Only the first call counts.
    pub fn set_export(&self, export: &str) {
        if self.export.set(export.to_string()).is_ok() {
            self.span.record("export", export);
        }
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
/// drain and its share of the open gauge, all given back when dropped, in that order (fields
/// drop in declaration order): once the gauge shows a connection gone its slot is free, and
/// once the drain sees it gone the gauge is right.
#[derive(Debug)]
struct Admitted<P: Protocol> {
    proto: Arc<P>,
    cx: Cx,
    deadline: Instant,
    _slot: OwnedSemaphorePermit,
    _open: Open,
    _tracked: TaskTrackerToken,
}

/// One connection's share of the open gauge.
#[derive(Debug)]
struct Open(prometheus::IntGauge);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl<P: Protocol> Admitted<P> {
    fn new(proto: Arc<P>, cx: Cx, slot: OwnedSemaphorePermit, limits: &Limits) -> Admitted<P> {
        let open = proto.metrics().open.clone();
        open.inc();
        let _tracked = cx.tracker.token();
        let deadline = Instant::now() + limits.handshake_timeout;
        Admitted { proto, cx, deadline, _slot: slot, _tracked, _open: Open(open) }
    }

    /// Count and log how the connection ended; dropping `self` then frees its slot.
    fn close(self, closed: &Closed<P::Close>) {
        count(&*self.proto, &closed.reason);
        P::log_closed(closed, self.cx.export.get().map_or("", String::as_str));
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
        let cx = Cx { peer, shutdown: shutdown.child_token(), span, export: Arc::default(), tracker: tracker.clone() };
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
    /// Join the threads that have finished (at most a moment after their connection ended:
    /// joining them does not hold up the accept loop).
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

#[cfg(test)]
mod tests {
    //! The life cycle with a small echo protocol over real loopback sockets, run both as tasks
    //! and as threads: the client sends one byte as its handshake and gets `+`, then every byte
    //! it sends comes back.

    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Bound on waiting for anything in these tests (a hang fails instead of blocking).
    const WAIT: Duration = Duration::from_secs(20);

    #[derive(Debug)]
    enum EchoClose {
        Ended(Ended),
        Gone,
    }

    impl From<Ended> for EchoClose {
        fn from(e: Ended) -> Self {
            EchoClose::Ended(e)
        }
    }

    impl Reason for EchoClose {
        fn label(&self) -> &'static str {
            match self {
                EchoClose::Ended(Ended::ConnectionLimit) => "connection limit",
                EchoClose::Ended(Ended::HandshakeTimeout) => "handshake timeout",
                EchoClose::Ended(Ended::Shutdown) => "shutting down",
                EchoClose::Ended(Ended::SocketSetup) => "socket setup failed",
                EchoClose::Ended(Ended::NoThread) => "no thread",
                EchoClose::Gone => "client gone",
            }
        }
    }

    fn stopped(s: Stop) -> EchoClose {
        match s {
            Stop::Ended(e) => EchoClose::Ended(e),
            Stop::Stopped | Stop::Eof | Stop::Failed(_) => EchoClose::Gone,
        }
    }

    struct Echo {
        metrics: ConnectionMetrics,
        /// Connection threads whose thread-local state has been destroyed (the thread ended).
        exited: Arc<AtomicUsize>,
    }

    /// Counts its thread's end when the thread's locals are destroyed.
    struct OnExit(Arc<AtomicUsize>);

    impl Drop for OnExit {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    thread_local! {
        static ON_EXIT: std::cell::RefCell<Option<OnExit>> = const { std::cell::RefCell::new(None) };
    }

    impl Protocol for Echo {
        type Close = EchoClose;
        const NAME: &'static str = "echo";

        fn span(peer: SocketAddr) -> Span {
            tracing::info_span!("echo", %peer, export = tracing::field::Empty)
        }

        fn metrics(&self) -> &ConnectionMetrics {
            &self.metrics
        }

        fn log_closed(closed: &Closed<EchoClose>, export: &str) {
            tracing::info!(export, reason = closed.reason.label(), "echo connection closed");
        }
    }

    impl TaskProtocol for Echo {
        type Session = TcpStream;

        async fn handshake(&self, mut stream: TcpStream, cx: &Cx) -> Result<TcpStream, EchoClose> {
            let mut b = [0u8; 1];
            if stream.read(&mut b).await.map_err(|_| EchoClose::Gone)? == 0 {
                return Err(EchoClose::Gone);
            }
            cx.set_export("echo");
            stream.write_all(b"+").await.map_err(|_| EchoClose::Gone)?;
            Ok(stream)
        }

        async fn serve(&self, mut stream: TcpStream, cx: &Cx) -> Closed<EchoClose> {
            let mut b = [0u8; 64];
            loop {
                let n = tokio::select! {
                    _ = cx.shutdown.cancelled() => return EchoClose::Ended(Ended::Shutdown).into(),
                    r = stream.read(&mut b) => r,
                };
                match n {
                    Ok(n) if n > 0 && stream.write_all(&b[..n]).await.is_ok() => {}
                    _ => return EchoClose::Gone.into(),
                }
            }
        }
    }

    impl ThreadProtocol for Echo {
        type Session = ();

        fn handshake(&self, sock: &mut Socket, _cx: &Cx) -> Result<(), EchoClose> {
            sock.read(&mut [0u8; 1], None).map_err(stopped)?;
            sock.stream().write_all(b"+").map_err(|_| EchoClose::Gone)
        }

        fn serve(&self, mut sock: Socket, (): (), _cx: &Cx) -> Closed<EchoClose> {
            ON_EXIT.with(|e| *e.borrow_mut() = Some(OnExit(self.exited.clone())));
            let mut b = [0u8; 64];
            loop {
                match sock.read(&mut b, None) {
                    Ok(n) if sock.stream().write_all(&b[..n]).is_ok() => {}
                    Ok(_) => return EchoClose::Gone.into(),
                    Err(s) => return stopped(s).into(),
                }
            }
        }
    }

    /// A running echo listener.
    struct Running {
        addr: SocketAddr,
        echo: Arc<Echo>,
        shutdown: CancellationToken,
        served: tokio::task::JoinHandle<()>,
    }

    impl Running {
        async fn start(threads: bool, limits: Limits) -> Running {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("local address");
            let metrics = crate::metrics::Metrics::new().nbd_connections;
            let echo = Arc::new(Echo { metrics, exited: Arc::default() });
            let shutdown = CancellationToken::new();
            let served = if threads {
                tokio::spawn(serve_threads(listener, echo.clone(), limits, shutdown.clone()))
            } else {
                tokio::spawn(serve_tasks(listener, echo.clone(), limits, shutdown.clone()))
            };
            Running { addr, echo, shutdown, served }
        }

        fn closed(&self, reason: &str) -> u64 {
            self.echo.metrics.closed.with_label_values(&[reason]).get()
        }

        fn open(&self) -> i64 {
            self.echo.metrics.open.get()
        }

        /// A connection past its handshake.
        async fn admitted(&self) -> TcpStream {
            let mut s = TcpStream::connect(self.addr).await.expect("connect");
            s.write_all(b"h").await.expect("send the handshake");
            let mut b = [0u8; 1];
            let n = tokio::time::timeout(WAIT, s.read(&mut b)).await.expect("handshake answer in time");
            assert_eq!((n.expect("read the handshake answer"), b[0]), (1, b'+'));
            s
        }

        /// Stop the listener and wait (bounded) until it has drained.
        async fn stop(self) -> Arc<Echo> {
            self.shutdown.cancel();
            tokio::time::timeout(WAIT, self.served).await.expect("the listener drained in time").expect("no panic");
            self.echo
        }
    }

    /// Wait (bounded) until `cond` holds.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        let started = Instant::now();
        while !cond() {
            assert!(started.elapsed() < WAIT, "{what}: not within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The server closes `s` without sending anything.
    async fn assert_closed_silently(s: &mut TcpStream, what: &str) {
        let mut b = [0u8; 16];
        match tokio::time::timeout(WAIT, s.read(&mut b)).await {
            Ok(Ok(0) | Err(_)) => {}
            Ok(Ok(n)) => panic!("{what}: got {n} bytes instead of a close"),
            Err(_) => panic!("{what}: still open after {WAIT:?}"),
        }
    }

    const LIMITS: Limits = Limits { max_connections: 2, handshake_timeout: Duration::from_secs(30) };

    async fn limit_refuses_counts_and_recovers(threads: bool) {
        let l = Running::start(threads, LIMITS).await;
        let (mut a, mut b) = (l.admitted().await, l.admitted().await);
        let mut c = TcpStream::connect(l.addr).await.expect("connect a third");
        assert_closed_silently(&mut c, "the connection over the limit").await;
        until("the refusal is counted", || l.closed("connection limit") == 1).await;
        assert_eq!(l.open(), 2);
        // The two admitted ones still work; when one goes, a new one gets in.
        for s in [&mut a, &mut b] {
            s.write_all(b"x").await.expect("send");
            let mut got = [0u8; 1];
            s.read_exact(&mut got).await.expect("echo");
        }
        drop(a);
        until("the hung-up connection is counted", || l.closed("client gone") == 1).await;
        let _d = l.admitted().await;
        assert_eq!(l.closed("connection limit"), 1);
        drop(b);
        l.stop().await;
    }

    async fn handshake_timeout_closes_silent_clients(threads: bool) {
        let limits = Limits { handshake_timeout: Duration::from_millis(1000), ..LIMITS };
        let l = Running::start(threads, limits).await;
        let mut silent = TcpStream::connect(l.addr).await.expect("connect");
        assert_closed_silently(&mut silent, "a client that sends nothing").await;
        until("the timeout is counted", || l.closed("handshake timeout") == 1).await;
        // Past its handshake, a connection is not subject to the timeout.
        let mut s = l.admitted().await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        s.write_all(b"y").await.expect("send");
        let mut got = [0u8; 1];
        s.read_exact(&mut got).await.expect("echo after the handshake timeout passed");
        assert_eq!(l.closed("handshake timeout"), 1);
        l.stop().await;
    }

    async fn shutdown_drains_and_joins(threads: bool) {
        let l = Running::start(threads, LIMITS).await;
        let mut serving = l.admitted().await;
        let mut handshaking = TcpStream::connect(l.addr).await.expect("connect");
        until("both connections are open", || l.open() == 2).await;
        let echo = l.stop().await;
        // `stop` returned: every connection ended and was counted, every thread joined.
        assert_eq!(echo.metrics.open.get(), 0);
        assert_eq!(echo.metrics.closed.with_label_values(&["shutting down"]).get(), 2);
        if threads {
            assert_eq!(echo.exited.load(Ordering::SeqCst), 1, "the serving thread was not joined");
        }
        assert_closed_silently(&mut serving, "a serving connection after the shutdown").await;
        assert_closed_silently(&mut handshaking, "a handshaking connection after the shutdown").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tasks_limit() {
        limit_refuses_counts_and_recovers(false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn threads_limit() {
        limit_refuses_counts_and_recovers(true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tasks_handshake_timeout() {
        handshake_timeout_closes_silent_clients(false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn threads_handshake_timeout() {
        handshake_timeout_closes_silent_clients(true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tasks_shutdown() {
        shutdown_drains_and_joins(false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn threads_shutdown() {
        shutdown_drains_and_joins(true).await;
    }

    #[test]
    fn limit_settings_fall_back_to_the_defaults_and_refuse_zero_and_extremes() {
        let defaults = Limits { max_connections: 256, handshake_timeout: Duration::from_secs(15) };
        assert_eq!(LimitSettings::default().resolve(defaults, "x").expect("defaults"), defaults);
        let s = LimitSettings { max_connections: Some(3), handshake_timeout_ms: None };
        assert_eq!(s.resolve(defaults, "x").expect("limit").max_connections, 3);
        assert_eq!(s.resolve(defaults, "x").expect("limit").handshake_timeout, defaults.handshake_timeout);
        let zero = LimitSettings { max_connections: Some(0), handshake_timeout_ms: None };
        let err = zero.resolve(defaults, "nbd_limits").expect_err("zero connections").to_string();
        assert!(err.contains("nbd_limits.max_connections"), "{err}");
        let zero = LimitSettings { max_connections: None, handshake_timeout_ms: Some(0) };
        assert!(zero.resolve(defaults, "x").is_err());
        // Values that would make the listener panic later are refused up front.
        let huge = LimitSettings { max_connections: Some(usize::MAX), handshake_timeout_ms: None };
        assert!(huge.resolve(defaults, "x").expect_err("too many").to_string().contains("from 1 to 1000000"));
        let endless = LimitSettings { max_connections: None, handshake_timeout_ms: Some(u64::MAX) };
        assert!(endless.resolve(defaults, "x").expect_err("too long").to_string().contains("from 1 to 3600000"));
    }
}
