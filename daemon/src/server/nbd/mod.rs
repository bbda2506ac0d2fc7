//! The NBD listener: drives the `nbd` protocol crate over tokio and turns its requests into
//! store operations.
//!
//! One task per connection. The handshake runs under a timeout; the daemon caps the number of
//! connections. In transmission, requests are decoded on the connection's task and executed on
//! tokio's blocking pool (the store does synchronous I/O) in batches, `max_in_flight` at a time, with
//! replies written by a separate writer task as they complete (NBD allows any order). A client
//! that vanishes costs only its own connection: requests it already sent finish, nothing else
//! is touched. Every store error is mapped to an NBD errno in [`errno_of`], the one place that
//! does so and counts it.
//!
//! Exports: every clone by name (read-write), every source and every snapshot `VOLUME@N`
//! (read-only); other snapshot references (`VOLUME@latest`, `@BOOKMARK`, `@TIME`) resolve to
//! the snapshot they name. A FLUSH flushes the whole store, so it covers writes answered on any
//! connection: CAN_MULTI_CONN is advertised. Before a rewind, refresh or delete the affected
//! connections are closed after answering what they had received (see `exports.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use nbd::consts::{
    NBD_EINVAL, NBD_EIO, NBD_ENOSPC, NBD_EOVERFLOW, NBD_EPERM, NBD_ESHUTDOWN, NBD_STATE_HOLE, NBD_STATE_ZERO,
};
use nbd::{
    Command, CommandFlags, ExportInfo, Exports, Handshake, HandshakeConfig, ReplyWriter, Request, Session, Step,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::store::{BlockState, Store, StoreError};

/// Limits of the NBD listener.
#[derive(Debug, Clone)]
pub struct NbdConfig {
    /// Connections the daemon accepts at once; more are closed at once.
    pub max_connections: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Batches of requests one connection may have executing at once (each batch holds every
    /// request that arrived while the previous ones ran).
    pub max_in_flight: usize,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig { max_connections: 256, handshake_timeout: Duration::from_secs(10), max_in_flight: 2 }
    }
}

/// How long a closed connection keeps delivering replies and waiting for its client to hang up.
const LINGER: Duration = Duration::from_secs(60);

/// Reply bytes a connection may have waiting for its client before it reads no more requests.
const QUEUE_LIMIT: usize = 64 << 20;

/// Largest block-status answer (callers may ask about a whole disk at once).
const STATUS_LIMIT: u64 = 1 << 30;

struct StoreExports<'a>(&'a Store);

impl Exports for StoreExports<'_> {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        if name.is_empty() || self.0.exports.is_fenced(name) {
            return None;
        }
        let cat = self.0.catalog();
        let t = cat.target(name).ok()?;
        let description = if t.read_only { "forkd read-only volume" } else { "forkd clone" };
        Some(ExportInfo {
            name: t.name,
            description: description.into(),
            size: t.size_bytes,
            read_only: t.read_only,
            can_multi_conn: true,
        })
    }

    fn list(&self) -> Vec<(String, String)> {
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

/// Accept NBD connections until `shutdown` is cancelled, then let connections drain.
pub async fn serve(listener: TcpListener, store: Arc<Store>, cfg: NbdConfig, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "NBD accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            store.metrics.nbd_closed.with_label_values(&["connection limit"]).inc();
            tracing::warn!(%peer, limit = cfg.max_connections, "refusing NBD connection: connection limit reached");
            drop(stream);
            continue;
        };
        let (store, cfg, token) = (store.clone(), cfg.clone(), shutdown.child_token());
        let span = tracing::info_span!("nbd", %peer);
        tokio::spawn(
            async move {
                store.metrics.nbd_active.inc();
                let stats = connection(stream, peer, &store, &cfg, token).await;
                store.metrics.nbd_active.dec();
                store.metrics.nbd_closed.with_label_values(&[stats.reason]).inc();
                tracing::info!(
                    export = %stats.export,
                    reason = stats.reason,
                    requests = stats.requests,
                    errors = stats.errors,
                    "NBD connection closed"
                );
                drop(permit);
            }
            .instrument(span),
        );
    }
    // Ask every connection to finish and wait for them (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while slots.available_permits() < cfg.max_connections && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a connection did, for the log line at its end.
#[derive(Debug)]
struct ConnStats {
    export: String,
    reason: &'static str,
    requests: u64,
    errors: u64,
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    store: &Arc<Store>,
    cfg: &NbdConfig,
    shutdown: CancellationToken,
) -> ConnStats {
    let mut stats = ConnStats { export: String::new(), reason: "", requests: 0, errors: 0 };
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = stream.into_split();
    let mut wr = BufWriter::with_capacity(256 << 10, wr);
    let mut buf = BytesMut::with_capacity(1 << 20);
    let handshake = tokio::time::timeout(cfg.handshake_timeout, handshake(&mut rd, &mut wr, &mut buf, store)).await;
    let session = match handshake {
        Err(_) => {
            stats.reason = "handshake timeout";
            return stats;
        }
        Ok(Err(reason)) => {
            stats.reason = reason;
            return stats;
        }
        Ok(Ok(None)) => {
            stats.reason = "closed during handshake";
            return stats;
        }
        Ok(Ok(Some(s))) => s,
    };
    stats.export = session.export.clone();
    tracing::debug!(%peer, export = %session.export, structured = session.structured, extended = session.extended, "NBD session");
    let Some(guard) = store.exports.register(&session.export) else {
        stats.reason = "export switching";
        return stats;
    };
    let session = Arc::new(session);
    let writer = ReplyWriter::new(&session);
    // Replies go to the writer task through an unbounded queue, so running a request never
    // waits for the client to read; the reader stops taking requests while more than
    // `QUEUE_LIMIT` bytes of replies wait, which bounds memory for a client that never reads.
    let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
    let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let drained = Arc::new(tokio::sync::Notify::new());
    let (q, n) = (queued.clone(), drained.clone());
    let write_task = tokio::spawn(async move {
        while let Some(reply) = rx.recv().await {
            let len: usize = reply.iter().map(bytes::Bytes::len).sum();
            for chunk in reply {
                if wr.write_all(&chunk).await.is_err() {
                    return false;
                }
            }
            q.fetch_sub(len, std::sync::atomic::Ordering::Relaxed);
            n.notify_waiters();
            if rx.is_empty() && wr.flush().await.is_err() {
                return false;
            }
        }
        // Every reply is out: send FIN. The socket is closed only once the client hangs up
        // too (see below), so a client still sending cannot make the kernel reset the
        // connection and drop replies it has not read yet.
        wr.flush().await.is_ok() && wr.shutdown().await.is_ok()
    });
    let send = {
        let (tx, queued) = (tx.clone(), queued.clone());
        move |reply: Reply| {
            let len: usize = reply.iter().map(bytes::Bytes::len).sum();
            queued.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
            tx.send(reply).is_ok()
        }
    };
    let in_flight = Arc::new(Semaphore::new(cfg.max_in_flight));
    let stop = guard.token.clone();
    let expired = guard.expired.clone();
    // Complete requests are gathered into a batch that runs as one job on the blocking pool:
    // runs of writes in it become one group commit and its replies leave in one send. At most
    // `max_in_flight` jobs run per connection; while they are busy, further requests keep
    // joining the next batch, so batches grow with the load instead of splintering.
    let mut batch: Vec<(Request, bytes::Bytes)> = Vec::new();
    let mut batch_bytes = 0usize;
    let dispatch = |permit: tokio::sync::OwnedSemaphorePermit, jobs: Vec<(Request, bytes::Bytes)>| {
        let (store, session, writer, send, expired) =
            (store.clone(), session.clone(), writer, send.clone(), expired.clone());
        tokio::task::spawn_blocking(move || {
            let reply = execute_batch(&store, &session, &writer, &expired, jobs);
            send(reply);
            drop(permit);
        });
    };
    stats.reason = 'conn: loop {
        // Take every complete request out of the buffer.
        loop {
            let (req, used) = match session.decode_request(&buf) {
                Err(e) => {
                    tracing::debug!(error = %e, head = ?&buf[..buf.len().min(32)], "malformed request");
                    break 'conn "malformed request";
                }
                Ok(Some((req, used)))
                    if req.too_large || buf.len() - used >= usize::try_from(req.payload_len).unwrap_or(usize::MAX) =>
                {
                    (req, used)
                }
                Ok(_) => break,
            };
            buf.advance(used);
            stats.requests += 1;
            store.metrics.nbd_requests.with_label_values(&[command_name(req.command)]).inc();
            let need = usize::try_from(req.payload_len).unwrap_or(usize::MAX);
            if req.too_large {
                // Refused below; its payload is read and dropped so the stream stays in sync.
                if let Err(reason) = discard(&mut rd, &mut buf, need, &stop, &shutdown).await {
                    break 'conn reason;
                }
            }
            let payload = if req.too_large { bytes::Bytes::new() } else { buf.split_to(need).freeze() };
            if req.command == Command::Disc {
                break 'conn "client sent NBD_CMD_DISC";
            }
            if let Err(errno) = req.check(&session) {
                stats.errors += 1;
                count_errno(store, errno);
                let msg = format!("request refused: {}", errno_text(errno));
                if !send(vec![writer.error(&req, errno, &msg).into()]) {
                    break 'conn "reply writer failed";
                }
                continue;
            }
            batch_bytes += need;
            batch.push((req, payload));
            if batch.len() >= 256 || batch_bytes >= 32 << 20 {
                // A full batch waits for a free job slot.
                let Ok(permit) = in_flight.clone().acquire_owned().await else { break 'conn "internal error" };
                dispatch(permit, std::mem::take(&mut batch));
                batch_bytes = 0;
            }
        }
        if !batch.is_empty() {
            if let Ok(permit) = in_flight.clone().try_acquire_owned() {
                dispatch(permit, std::mem::take(&mut batch));
                batch_bytes = 0;
            } else {
                // Every job slot is busy: read more requests into this batch, or dispatch it
                // as soon as a slot frees up.
                tokio::select! {
                    permit = in_flight.clone().acquire_owned() => {
                        let Ok(permit) = permit else { break 'conn "internal error" };
                        dispatch(permit, std::mem::take(&mut batch));
                        batch_bytes = 0;
                        continue 'conn;
                    }
                    r = read_more(&mut rd, &mut buf, &stop, &shutdown) => {
                        if let Err(reason) = r {
                            break 'conn if reason == "client disconnected" && !buf.is_empty() { "client vanished mid-request" } else { reason };
                        }
                        continue 'conn;
                    }
                }
            }
        }
        // Backpressure: while too many reply bytes wait for the client, read nothing more.
        while queued.load(std::sync::atomic::Ordering::Relaxed) > QUEUE_LIMIT {
            let wake = drained.notified();
            if queued.load(std::sync::atomic::Ordering::Relaxed) <= QUEUE_LIMIT {
                break;
            }
            tokio::select! {
                _ = wake => {}
                _ = stop.cancelled() => break,
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        if let Err(reason) = read_more(&mut rd, &mut buf, &stop, &shutdown).await {
            break 'conn if reason == "client disconnected" && !buf.is_empty() {
                "client vanished mid-request"
            } else {
                reason
            };
        }
    };
    // Requests gathered before the end are still answered (after a close for a switch,
    // with ESHUTDOWN: see `execute_batch`).
    if !batch.is_empty() {
        if let Ok(permit) = in_flight.clone().acquire_owned().await {
            dispatch(permit, std::mem::take(&mut batch));
        }
    }
    // Every request received runs before the connection lets go of its export (a switch
    // waits for this); running never waits for the client, so this is quick.
    let all = u32::try_from(cfg.max_in_flight).unwrap_or(u32::MAX);
    let _ = in_flight.acquire_many(all).await;
    drop(send);
    drop(tx);
    // Then, in the background: deliver the replies, send FIN, and read and drop whatever
    // the client still sends until it hangs up, so no reply is lost to a reset. Bounded, for
    // clients that never read or never close.
    tokio::spawn(async move {
        let linger = tokio::time::Instant::now() + LINGER;
        let reader = tokio::spawn(async move {
            let mut sink = vec![0u8; 64 << 10];
            while let Ok(Ok(n)) = tokio::time::timeout_at(linger, rd.read(&mut sink)).await {
                if n == 0 {
                    break;
                }
            }
        });
        let abort = write_task.abort_handle();
        if tokio::time::timeout_at(linger, write_task).await.is_err() {
            abort.abort();
        }
        let _ = reader.await;
    });
    drop(guard);
    stats
}

async fn handshake(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    wr: &mut BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    buf: &mut BytesMut,
    store: &Store,
) -> Result<Option<Session>, &'static str> {
    let mut hs = Handshake::new(HandshakeConfig::default()).map_err(|_| "internal error")?;
    send(wr, &hs.greeting()).await?;
    loop {
        match hs.feed(buf, &StoreExports(store)) {
            Ok(Step::NeedMore) => {
                if rd.read_buf(buf).await.map_err(|_| "read error during handshake")? == 0 {
                    return Err("client closed during handshake");
                }
            }
            Ok(Step::Reply(b)) => send(wr, &b).await?,
            Ok(Step::Close { reply }) => {
                send(wr, &reply).await?;
                return Ok(None);
            }
            Ok(Step::Done { reply, session }) => {
                send(wr, &reply).await?;
                return Ok(Some(session));
            }
            Err(e) => {
                tracing::debug!(error = %e, "malformed handshake");
                return Err("malformed handshake");
            }
        }
    }
}

async fn send(wr: &mut BufWriter<tokio::net::tcp::OwnedWriteHalf>, b: &[u8]) -> Result<(), &'static str> {
    wr.write_all(b).await.map_err(|_| "write error during handshake")?;
    wr.flush().await.map_err(|_| "write error during handshake")
}

async fn read_more(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut BytesMut,
    stop: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<(), &'static str> {
    if buf.capacity() - buf.len() < 64 << 10 {
        buf.reserve(1 << 20);
    }
    tokio::select! {
        _ = stop.cancelled() => Err("closed for a rewind, refresh or delete"),
        _ = shutdown.cancelled() => Err("daemon shutting down"),
        r = rd.read_buf(buf) => match r {
            Ok(0) => Err("client disconnected"),
            Ok(_) => Ok(()),
            Err(_) => Err("read error"),
        },
    }
}

async fn discard(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut BytesMut,
    mut n: usize,
    stop: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<(), &'static str> {
    loop {
        let take = n.min(buf.len());
        buf.advance(take);
        n -= take;
        if n == 0 {
            return Ok(());
        }
        read_more(rd, buf, stop, shutdown).await?;
    }
}

/// Bytes to send for one batch: small replies gathered, read data passed along uncopied.
type Reply = Vec<bytes::Bytes>;

/// Collects replies: small ones are appended to one buffer, large ones (read data) are kept
/// as their own chunk so they are never copied.
#[derive(Default)]
struct ReplyBuf {
    chunks: Reply,
    small: Vec<u8>,
}

impl ReplyBuf {
    fn push(&mut self, b: bytes::Bytes) {
        if b.len() < 16 << 10 {
            self.small.extend_from_slice(&b);
        } else {
            if !self.small.is_empty() {
                self.chunks.push(std::mem::take(&mut self.small).into());
            }
            self.chunks.push(b);
        }
    }

    fn finish(mut self) -> Reply {
        if !self.small.is_empty() {
            self.chunks.push(self.small.into());
        }
        self.chunks
    }
}

/// Run a batch of checked requests in order; runs of plain writes are committed together.
/// Returns the replies in order.
///
/// Once `expired` is cancelled (a rewind, refresh or delete stopped waiting for this
/// connection and switched the export), requests not yet run are answered `ESHUTDOWN`: no
/// request may run against what it switched to.
fn execute_batch(
    store: &Store,
    session: &Session,
    writer: &ReplyWriter,
    expired: &CancellationToken,
    jobs: Vec<(Request, bytes::Bytes)>,
) -> Reply {
    let mut out = ReplyBuf::default();
    let mut i = 0;
    while i < jobs.len() {
        if expired.is_cancelled() {
            for (req, _) in &jobs[i..] {
                count_errno(store, NBD_ESHUTDOWN);
                out.push(writer.error(req, NBD_ESHUTDOWN, "the export is being rewound, refreshed or deleted").into());
            }
            break;
        }
        let plain_write = |r: &Request| r.command == Command::Write && !r.flags.contains(CommandFlags::FUA);
        let run = jobs[i..].iter().take_while(|(r, _)| plain_write(r)).count();
        if run > 1 {
            let writes = jobs[i..i + run].iter().map(|(r, p)| (session.export.clone(), r.offset, p.clone())).collect();
            for ((req, _), result) in jobs[i..i + run].iter().zip(store.write_many(writes)) {
                match result {
                    Ok(()) => out.push(writer.ok(req).into()),
                    Err(e) => out.push(error_reply(store, writer, req, &e).into()),
                }
            }
            i += run;
        } else {
            let (req, payload) = &jobs[i];
            for chunk in execute(store, session, writer, req, payload.clone()) {
                out.push(chunk);
            }
            i += 1;
        }
    }
    out.finish()
}

fn error_reply(store: &Store, writer: &ReplyWriter, req: &Request, e: &StoreError) -> Vec<u8> {
    let errno = errno_of(e);
    count_errno(store, errno);
    tracing::warn!(command = command_name(req.command), offset = req.offset, length = req.length, error = %e, "NBD request failed");
    writer.error(req, errno, &e.to_string())
}

/// Run one checked request against the store and encode its reply.
fn execute(store: &Store, session: &Session, writer: &ReplyWriter, req: &Request, payload: bytes::Bytes) -> Reply {
    let export = session.export.as_str();
    let fua = req.flags.contains(CommandFlags::FUA);
    let flush_if = |r: Result<(), StoreError>| r.and_then(|()| if fua { store.flush() } else { Ok(()) });
    if req.command == Command::Read {
        // The header and the data go out as two chunks: the data is never copied again.
        let mut data = vec![0u8; usize::try_from(req.length).unwrap_or(0)];
        return match store.read(export, req.offset, &mut data) {
            Ok(()) => match writer.read_header(req, req.length) {
                Ok(h) => vec![h.into(), data.into()],
                Err(e) => vec![writer.error(req, NBD_EIO, &e.to_string()).into()],
            },
            Err(e) => vec![error_reply(store, writer, req, &e).into()],
        };
    }
    let result: Result<Vec<u8>, StoreError> = match req.command {
        Command::Read => Ok(Vec::new()),
        Command::Write => flush_if(store.write_bytes(export, req.offset, payload)).map(|()| writer.ok(req)),
        Command::Flush => store.flush().map(|()| writer.ok(req)),
        Command::Trim => {
            // Trim is advisory: whole blocks inside the range are freed, edges are left alone.
            let a = req.offset.div_ceil(4096) * 4096;
            let b = (req.offset + req.length) / 4096 * 4096;
            let r = if a < b { store.zero(export, a, b - a) } else { Ok(()) };
            flush_if(r).map(|()| writer.ok(req))
        }
        Command::WriteZeroes => flush_if(store.zero_range(export, req.offset, req.length)).map(|()| writer.ok(req)),
        Command::Cache => Ok(writer.ok(req)),
        Command::BlockStatus => status_reply(store, session, writer, req),
        Command::Disc | Command::Unknown(_) => Ok(writer.error(req, NBD_EINVAL, "unsupported command")),
    };
    vec![result.unwrap_or_else(|e| error_reply(store, writer, req, &e)).into()]
}

fn status_reply(store: &Store, session: &Session, writer: &ReplyWriter, req: &Request) -> Result<Vec<u8>, StoreError> {
    let (Some(ctx), Some(chunks)) = (session.meta_context, writer.chunked()) else {
        return Ok(writer.error(req, NBD_EINVAL, "no meta context selected"));
    };
    let runs = store.block_status(&session.export, req.offset, req.length, STATUS_LIMIT)?;
    let extents: Vec<(u64, u32)> = runs
        .into_iter()
        .map(|(len, s)| {
            let flags = match s {
                BlockState::Hole => NBD_STATE_HOLE | NBD_STATE_ZERO,
                BlockState::Zero => NBD_STATE_ZERO,
                BlockState::Data => 0,
            };
            (len, flags)
        })
        .collect();
    Ok(chunks.block_status(req, ctx, &extents, true).unwrap_or_else(|e| writer.error(req, NBD_EINVAL, &e.to_string())))
}

/// The one mapping from store errors to NBD errnos.
pub fn errno_of(e: &StoreError) -> u32 {
    use catalog::CatalogError as C;
    match e {
        e if crate::store::is_enospc(e) => NBD_ENOSPC,
        StoreError::Catalog(C::ReadOnly(_)) => NBD_EPERM,
        StoreError::Catalog(C::OutOfRange { .. } | C::BadReference { .. }) => NBD_EINVAL,
        StoreError::TooLarge(_) => NBD_EOVERFLOW,
        _ => NBD_EIO,
    }
}

fn errno_text(errno: u32) -> &'static str {
    match errno {
        NBD_EPERM => "EPERM (read-only export)",
        NBD_EINVAL => "EINVAL (invalid request)",
        NBD_ENOSPC => "ENOSPC (beyond the end or no space)",
        NBD_EOVERFLOW => "EOVERFLOW (request too large)",
        _ => "EIO",
    }
}

fn count_errno(store: &Store, errno: u32) {
    let label = match errno {
        NBD_EPERM => "EPERM",
        NBD_EINVAL => "EINVAL",
        NBD_ENOSPC => "ENOSPC",
        NBD_EOVERFLOW => "EOVERFLOW",
        NBD_ESHUTDOWN => "ESHUTDOWN",
        _ => "EIO",
    };
    store.metrics.nbd_errors.with_label_values(&[label]).inc();
}

fn command_name(c: Command) -> &'static str {
    match c {
        Command::Read => "read",
        Command::Write => "write",
        Command::Disc => "disc",
        Command::Flush => "flush",
        Command::Trim => "trim",
        Command::Cache => "cache",
        Command::WriteZeroes => "write_zeroes",
        Command::BlockStatus => "block_status",
        Command::Unknown(_) => "unknown",
    }
}
