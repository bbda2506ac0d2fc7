//! Running NBD requests against the store: a batch of checked requests in, its replies out.
//!
//! Runs on tokio's blocking pool (the store does synchronous I/O), one batch per job. Runs of
//! plain writes in a batch become one group commit ([`Store::write_many`]); replies keep the
//! order of their requests. Every store error becomes an NBD errno in [`errno_of`], the one
//! mapping, and every errno sent is counted in [`count_errno`].

use std::sync::Arc;

use bytes::Bytes;
use nbd::consts::{
    NBD_EINVAL, NBD_EIO, NBD_ENOSPC, NBD_EOVERFLOW, NBD_EPERM, NBD_ESHUTDOWN, NBD_STATE_HOLE, NBD_STATE_ZERO,
};
use nbd::{Command, CommandFlags, ReplyWriter, Request, Session};
use tokio_util::sync::CancellationToken;

use crate::store::{BlockState, Store, StoreError};

/// Largest block-status answer (callers may ask about a whole disk at once).
const STATUS_LIMIT: u64 = 1 << 30;

/// Bytes to send for one batch: small replies gathered, read data passed along uncopied.
pub(super) type Reply = Vec<Bytes>;

/// A checked request and its payload (empty unless a write).
pub(super) type Job = (Request, Bytes);

/// What running a connection's requests needs; shared by its batches.
#[derive(Debug)]
pub(super) struct Executor {
    pub(super) store: Arc<Store>,
    pub(super) session: Arc<Session>,
    pub(super) writer: ReplyWriter,
    /// Cancelled once a rewind, refresh or delete stopped waiting for this connection and
    /// switched the export: from then on requests are answered `ESHUTDOWN`, never run.
    pub(super) expired: CancellationToken,
}

impl Executor {
    /// Run a batch of checked requests in order; runs of plain writes are committed together.
    /// Returns the replies in order.
    pub(super) fn run(&self, jobs: Vec<Job>) -> Reply {
        let mut out = ReplyBuf::default();
        let mut i = 0;
        while i < jobs.len() {
            if self.expired.is_cancelled() {
                for (req, _) in &jobs[i..] {
                    count_errno(&self.store, NBD_ESHUTDOWN);
                    let msg = "the export is being rewound, refreshed or deleted";
                    out.push(self.writer.error(req, NBD_ESHUTDOWN, msg).into());
                }
                break;
            }
            let plain_write = |r: &Request| r.command == Command::Write && !r.flags.contains(CommandFlags::FUA);
            let run = jobs[i..].iter().take_while(|(r, _)| plain_write(r)).count();
            if run > 1 {
                self.write_run(&jobs[i..i + run], &mut out);
                i += run;
            } else {
                let (req, payload) = &jobs[i];
                for chunk in self.execute(req, payload.clone()) {
                    out.push(chunk);
                }
                i += 1;
            }
        }
        out.finish()
    }

    /// Plain writes committed as one group.
    fn write_run(&self, jobs: &[Job], out: &mut ReplyBuf) {
        let writes = jobs.iter().map(|(r, p)| (self.session.export.clone(), r.offset, p.clone())).collect();
        for ((req, _), result) in jobs.iter().zip(self.store.write_many(writes)) {
            match result {
                Ok(()) => out.push(self.writer.ok(req).into()),
                Err(e) => out.push(self.error_reply(req, &e).into()),
            }
        }
    }

    fn error_reply(&self, req: &Request, e: &StoreError) -> Vec<u8> {
        let errno = errno_of(e);
        count_errno(&self.store, errno);
        tracing::warn!(
            command = command_name(req.command),
            offset = req.offset,
            length = req.length,
            error = %e,
            "NBD request failed"
        );
        self.writer.error(req, errno, &e.to_string())
    }

    /// Run one checked request against the store and encode its reply.
    fn execute(&self, req: &Request, payload: Bytes) -> Reply {
        let (store, writer) = (&*self.store, &self.writer);
        let export = self.session.export.as_str();
        let fua = req.flags.contains(CommandFlags::FUA);
        let flush_if = |r: Result<(), StoreError>| r.and_then(|()| if fua { store.flush() } else { Ok(()) });
        let result: Result<Vec<u8>, StoreError> = match req.command {
            Command::Read => return self.read(req),
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
            Command::BlockStatus => self.status_reply(req),
            Command::Disc | Command::Unknown(_) => Ok(writer.error(req, NBD_EINVAL, "unsupported command")),
        };
        vec![result.unwrap_or_else(|e| self.error_reply(req, &e)).into()]
    }

    /// A read: the header and the data go out as two chunks, so the data is never copied again.
    fn read(&self, req: &Request) -> Reply {
        let mut data = vec![0u8; usize::try_from(req.length).unwrap_or(0)];
        match self.store.read(&self.session.export, req.offset, &mut data) {
            Ok(()) => match self.writer.read_header(req, req.length) {
                Ok(h) => vec![h.into(), data.into()],
                Err(e) => vec![self.writer.error(req, NBD_EIO, &e.to_string()).into()],
            },
            Err(e) => vec![self.error_reply(req, &e).into()],
        }
    }

    fn status_reply(&self, req: &Request) -> Result<Vec<u8>, StoreError> {
        let (session, writer) = (&self.session, &self.writer);
        let (Some(ctx), Some(chunks)) = (session.meta_context, writer.chunked()) else {
            return Ok(writer.error(req, NBD_EINVAL, "no meta context selected"));
        };
        let runs = self.store.block_status(&session.export, req.offset, req.length, STATUS_LIMIT)?;
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
        let reply = chunks.block_status(req, ctx, &extents, true);
        Ok(reply.unwrap_or_else(|e| writer.error(req, NBD_EINVAL, &e.to_string())))
    }
}

/// Collects replies: small ones are appended to one buffer, large ones (read data) are kept
/// as their own chunk so they are never copied.
#[derive(Default)]
struct ReplyBuf {
    chunks: Reply,
    small: Vec<u8>,
}

impl ReplyBuf {
    fn push(&mut self, b: Bytes) {
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

/// The one mapping from store errors to NBD errnos.
pub fn errno_of(e: &StoreError) -> u32 {
    use catalog::CatalogError as C;
    match e {
        e if crate::store::is_enospc(e) => NBD_ENOSPC,
        StoreError::Catalog(C::QuotaExceeded { .. }) => NBD_ENOSPC,
        StoreError::Catalog(C::ReadOnly(_)) => NBD_EPERM,
        StoreError::Catalog(C::OutOfRange { .. } | C::BadReference { .. }) => NBD_EINVAL,
        StoreError::TooLarge(_) => NBD_EOVERFLOW,
        _ => NBD_EIO,
    }
}

/// What a refused request's error message says.
pub(super) fn errno_text(errno: u32) -> &'static str {
    match errno {
        NBD_EPERM => "EPERM (read-only export)",
        NBD_EINVAL => "EINVAL (invalid request)",
        NBD_ENOSPC => "ENOSPC (beyond the end, no space, or past the clone's quota)",
        NBD_EOVERFLOW => "EOVERFLOW (request too large)",
        _ => "EIO",
    }
}

/// Count an error reply in `forkd_nbd_errors_total{errno}`.
pub(super) fn count_errno(store: &Store, errno: u32) {
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

/// The `command` label of `forkd_nbd_requests_total`.
pub(super) fn command_name(c: Command) -> &'static str {
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
