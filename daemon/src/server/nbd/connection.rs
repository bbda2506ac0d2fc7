//! One NBD connection in transmission, in four parts:
//!
//! - the reader ([`Connection`] with its [`Input`]): decodes every complete request in what
//!   the socket gave, answers the refused ones at once and gathers the rest into a batch;
//! - the dispatch ([`Jobs`]): a batch runs as one job on tokio's blocking pool
//!   ([`Executor::run`]), at most `max_in_flight` jobs per connection. While they are busy,
//!   further requests keep joining the next batch, so batches grow with the load instead of
//!   splintering (a batch's writes are one group commit, its replies one send);
//! - the writer ([`Writer`]), a task of its own: sends each job's replies as the job completes
//!   (NBD allows any order), through an unbounded queue so running a request never waits for
//!   the client; the reader stops taking requests while more than [`QUEUE_LIMIT`] bytes of
//!   replies wait, which bounds memory for a client that never reads;
//! - the linger ([`linger`]): after the connection has let go of its export, the replies still
//!   queued are delivered, FIN is sent, and what the client still sends is read and dropped
//!   until it hangs up, so no reply is lost to a connection reset. Bounded by [`LINGER`].
//!
//! The connection ends on the client's DISC or hang-up, on bad bytes, on a shutdown, or when
//! its export is being switched (rewind, refresh, delete: the registry's token). Every request
//! received before the end still runs before the connection lets go of its export, which is
//! what the switch waits for; running never waits for the client, so that is quick.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use nbd::{Command, ReplyWriter, Request, Session};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::execute::{command_name, count_errno, errno_text, Executor, Job, Reply};
use super::{Close, NbdConfig, Negotiated};
use crate::server::listener::{Closed, Cx, Ended};
use crate::store::Store;

/// How long a closed connection keeps delivering replies and waiting for its client to hang up.
const LINGER: Duration = Duration::from_secs(60);

/// Reply bytes a connection may have waiting for its client before it reads no more requests.
const QUEUE_LIMIT: usize = 64 << 20;

/// A batch is dispatched (waiting for a job slot if need be) once it holds this many requests
/// or payload bytes.
const BATCH_LIMIT: (usize, usize) = (256, 32 << 20);

/// Serve a negotiated connection until it ends; the linger goes on in the background.
pub(super) async fn serve(store: Arc<Store>, cfg: &NbdConfig, n: Negotiated, cx: &Cx) -> Closed<Close> {
    let Negotiated { session, rd, wr, buf } = n;
    let (structured, extended) = (session.structured, session.extended);
    tracing::debug!(export = %session.export, structured, extended, "NBD session");
    cx.set_export(&session.export);
    let Some(guard) = store.exports.register(&session.export) else {
        return Close::ExportSwitching.into();
    };
    let (replies, writer) = reply_queue(wr);
    let writer = tokio::spawn(writer.run().instrument(cx.span().clone()));
    let session = Arc::new(session);
    let exec = Executor {
        store: store.clone(),
        session: session.clone(),
        writer: ReplyWriter::new(&session),
        expired: guard.expired.clone(),
    };
    let mut conn = Connection {
        input: Input { rd, buf, stop: guard.token.clone(), shutdown: cx.shutdown.clone() },
        jobs: Jobs::new(cfg.max_in_flight, exec, replies.clone(), cx.span().clone()),
        replies,
        store: store.clone(),
        session,
        requests: 0,
        errors: 0,
    };
    let reason = conn.run().await;
    conn.jobs.drain().await;
    let Connection { input, requests, errors, .. } = conn;
    // Every sender of the reply queue is gone with `conn`: the writer ends once it sent them.
    cx.spawn_after(linger(input.rd, writer, cx.shutdown.clone()));
    drop(guard);
    Closed { reason, requests, errors }
}

/// The reader side of a connection.
struct Connection {
    input: Input,
    jobs: Jobs,
    replies: Replies,
    store: Arc<Store>,
    session: Arc<Session>,
    requests: u64,
    errors: u64,
}

impl Connection {
    /// Take requests until the connection must close; returns why.
    async fn run(&mut self) -> Close {
        loop {
            if let Err(reason) = self.take_requests().await {
                return reason;
            }
            if let Err(reason) = self.next_input().await {
                return reason;
            }
        }
    }

    /// Take every complete request out of the input: refuse the invalid ones at once, gather
    /// the rest into the batch, and dispatch the batch whenever it is full.
    async fn take_requests(&mut self) -> Result<(), Close> {
        while let Some((req, payload)) = self.next_request().await? {
            if req.command == Command::Disc {
                return Err(Close::Disc);
            }
            if let Err(errno) = req.check(&self.session) {
                self.refuse(&req, errno)?;
                continue;
            }
            if self.jobs.push(req, payload) {
                // A full batch waits for a free job slot.
                let slot = self.jobs.slot().await?;
                self.jobs.dispatch(slot);
            }
        }
        Ok(())
    }

    /// The next complete request in the input, with its payload; `None` when more bytes are
    /// needed.
    async fn next_request(&mut self) -> Result<Option<Job>, Close> {
        let buf = &self.input.buf;
        let (req, used) = match self.session.decode_request(buf) {
            Err(e) => {
                tracing::debug!(error = %e, head = ?&buf[..buf.len().min(32)], "malformed request");
                return Err(Close::MalformedRequest);
            }
            Ok(Some((req, used))) if req.too_large || buf.len() - used >= payload_len(&req) => (req, used),
            Ok(_) => return Ok(None),
        };
        self.input.buf.advance(used);
        self.requests += 1;
        self.store.metrics.nbd_requests.with_label_values(&[command_name(req.command)]).inc();
        if req.too_large {
            // Refused by its check; its payload is read and dropped so the stream stays in sync.
            self.input.discard(payload_len(&req)).await?;
            return Ok(Some((req, Bytes::new())));
        }
        let payload = self.input.buf.split_to(payload_len(&req)).freeze();
        Ok(Some((req, payload)))
    }

    /// Answer a request that failed its check with `errno`.
    fn refuse(&mut self, req: &Request, errno: u32) -> Result<(), Close> {
        self.errors += 1;
        count_errno(&self.store, errno);
        let msg = format!("request refused: {}", errno_text(errno));
        let reply = self.jobs.exec.writer.error(req, errno, &msg);
        if self.replies.send(vec![reply.into()]) {
            Ok(())
        } else {
            Err(Close::WriterFailed)
        }
    }

    /// Dispatch the batch if a job slot is free; if none is, read more requests into it or
    /// dispatch it as soon as one frees up, whichever comes first. Otherwise wait while too
    /// many replies are queued, then read.
    async fn next_input(&mut self) -> Result<(), Close> {
        if !self.jobs.batch.is_empty() && !self.jobs.try_dispatch() {
            let slot = self.jobs.slots.clone().acquire_owned();
            return tokio::select! {
                slot = slot => {
                    self.jobs.dispatch(slot.map_err(|_| Close::Internal)?);
                    Ok(())
                }
                r = self.input.read_more() => r,
            };
        }
        self.backpressure().await;
        self.input.read_more().await
    }

    /// While too many reply bytes wait for the client, read nothing more.
    async fn backpressure(&self) {
        while self.replies.queued() > QUEUE_LIMIT {
            let wake = self.replies.drained.notified();
            if self.replies.queued() <= QUEUE_LIMIT {
                break;
            }
            tokio::select! {
                _ = wake => {}
                _ = self.input.stop.cancelled() => break,
                _ = self.input.shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }
}

fn payload_len(req: &Request) -> usize {
    usize::try_from(req.payload_len).unwrap_or(usize::MAX)
}

/// The socket's read half and the bytes read from it but not yet decoded.
struct Input {
    rd: OwnedReadHalf,
    buf: BytesMut,
    /// The export registry's close request (rewind, refresh, delete).
    stop: CancellationToken,
    shutdown: CancellationToken,
}

impl Input {
    /// Read more bytes into the buffer, unless the connection must close first.
    async fn read_more(&mut self) -> Result<(), Close> {
        if self.buf.capacity() - self.buf.len() < 64 << 10 {
            self.buf.reserve(1 << 20);
        }
        tokio::select! {
            _ = self.stop.cancelled() => Err(Close::Switched),
            _ = self.shutdown.cancelled() => Err(Close::Ended(Ended::Shutdown)),
            r = self.rd.read_buf(&mut self.buf) => match r {
                Ok(0) if self.buf.is_empty() => Err(Close::ClientDisconnected),
                Ok(0) => Err(Close::VanishedMidRequest),
                Ok(_) => Ok(()),
                Err(_) => Err(Close::ReadError),
            },
        }
    }

    /// Read and drop the next `n` bytes.
    async fn discard(&mut self, mut n: usize) -> Result<(), Close> {
        loop {
            let take = n.min(self.buf.len());
            self.buf.advance(take);
            n -= take;
            if n == 0 {
                return Ok(());
            }
            self.read_more().await?;
        }
    }
}

/// The batch being gathered and the job slots batches run in.
struct Jobs {
    slots: Arc<Semaphore>,
    max_in_flight: usize,
    batch: Vec<Job>,
    bytes: usize,
    exec: Arc<Executor>,
    replies: Replies,
    span: tracing::Span,
}

impl Jobs {
    fn new(max_in_flight: usize, exec: Executor, replies: Replies, span: tracing::Span) -> Jobs {
        Jobs {
            slots: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            batch: Vec::new(),
            bytes: 0,
            exec: Arc::new(exec),
            replies,
            span,
        }
    }

    /// Add a checked request to the batch; true when the batch is full.
    fn push(&mut self, req: Request, payload: Bytes) -> bool {
        self.bytes += payload.len();
        self.batch.push((req, payload));
        self.batch.len() >= BATCH_LIMIT.0 || self.bytes >= BATCH_LIMIT.1
    }

    /// A free job slot, waiting for one.
    async fn slot(&self) -> Result<OwnedSemaphorePermit, Close> {
        self.slots.clone().acquire_owned().await.map_err(|_| Close::Internal)
    }

    /// Dispatch the batch if a job slot is free right now.
    fn try_dispatch(&mut self) -> bool {
        match self.slots.clone().try_acquire_owned() {
            Ok(slot) => {
                self.dispatch(slot);
                true
            }
            Err(_) => false,
        }
    }

    /// Run the batch on the blocking pool in `slot`; its replies go to the writer.
    fn dispatch(&mut self, slot: OwnedSemaphorePermit) {
        let jobs = std::mem::take(&mut self.batch);
        self.bytes = 0;
        let (exec, replies, span) = (self.exec.clone(), self.replies.clone(), self.span.clone());
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            replies.send(exec.run(jobs));
            drop(slot);
        });
    }

    /// Run what was gathered before the end (after a close for a switch it is answered
    /// `ESHUTDOWN`, see [`Executor`]), then wait until every job has run.
    async fn drain(&mut self) {
        if !self.batch.is_empty() {
            if let Ok(slot) = self.slot().await {
                self.dispatch(slot);
            }
        }
        let all = u32::try_from(self.max_in_flight).unwrap_or(u32::MAX);
        let _ = self.slots.acquire_many(all).await;
    }
}

/// The sending side of a connection's reply queue.
#[derive(Clone)]
struct Replies {
    tx: mpsc::UnboundedSender<Reply>,
    /// Bytes queued and not yet written.
    queued: Arc<AtomicUsize>,
    /// Notified whenever the writer took something off the queue.
    drained: Arc<Notify>,
}

impl Replies {
    /// Queue a reply; false once the writer is gone.
    fn send(&self, reply: Reply) -> bool {
        let len: usize = reply.iter().map(Bytes::len).sum();
        self.queued.fetch_add(len, Ordering::Relaxed);
        self.tx.send(reply).is_ok()
    }

    fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// The writer task's side of the reply queue.
struct Writer {
    rx: mpsc::UnboundedReceiver<Reply>,
    wr: BufWriter<OwnedWriteHalf>,
    queued: Arc<AtomicUsize>,
    drained: Arc<Notify>,
}

fn reply_queue(wr: BufWriter<OwnedWriteHalf>) -> (Replies, Writer) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (queued, drained) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
    (Replies { tx, queued: queued.clone(), drained: drained.clone() }, Writer { rx, wr, queued, drained })
}

impl Writer {
    /// Send replies until every sender is gone, then FIN; false if the client stopped taking
    /// them. A flush happens whenever the queue runs empty, so replies gathered while one was
    /// being written leave together.
    async fn run(mut self) -> bool {
        while let Some(reply) = self.rx.recv().await {
            let len: usize = reply.iter().map(Bytes::len).sum();
            for chunk in reply {
                if self.wr.write_all(&chunk).await.is_err() {
                    return false;
                }
            }
            self.queued.fetch_sub(len, Ordering::Relaxed);
            self.drained.notify_waiters();
            if self.rx.is_empty() && self.wr.flush().await.is_err() {
                return false;
            }
        }
        // Every reply is out: send FIN. The socket is closed only once the client hangs up
        // too (see `linger`), so a client still sending cannot make the kernel reset the
        // connection and drop replies it has not read yet.
        self.wr.flush().await.is_ok() && self.wr.shutdown().await.is_ok()
    }
}

/// After the connection let go of its export: let the writer deliver the replies and send
/// FIN, and read and drop whatever the client still sends until it hangs up, so no reply is
/// lost to a reset. Bounded by [`LINGER`] for clients that never read or never close; on a
/// shutdown the client's hang-up is not waited for once the replies are out.
async fn linger(mut rd: OwnedReadHalf, writer: JoinHandle<bool>, shutdown: CancellationToken) {
    let until = tokio::time::Instant::now() + LINGER;
    let (written, replies_out) = tokio::sync::oneshot::channel::<()>();
    let write = async move {
        let abort = writer.abort_handle();
        if tokio::time::timeout_at(until, writer).await.is_err() {
            abort.abort();
        }
        let _ = written.send(());
    };
    let read = async move {
        let mut sink = vec![0u8; 64 << 10];
        let hang_up = async {
            while let Ok(Ok(n)) = tokio::time::timeout_at(until, rd.read(&mut sink)).await {
                if n == 0 {
                    break;
                }
            }
        };
        let shut = async {
            let _ = replies_out.await;
            shutdown.cancelled().await;
        };
        tokio::select! {
            () = hang_up => {}
            () = shut => {}
        }
    };
    tokio::join!(write, read);
}
