//! Data I/O engine for the extent file.
//!
//! Every data read and write of the daemon's 4 KiB slots goes through this
//! module. An [`Engine`] owns exactly one thing: the open, read+write
//! [`File`] handle of the (sparse) extent file. The io_uring instances are
//! *not* owned by the engine: there is one ring per OS thread, kept in a
//! `thread_local!` and created lazily on that thread's first I/O, so callers
//! (tokio worker threads, blocking-pool threads) never contend on a lock and
//! one ring may serve several engines.
//!
//! Invariants:
//! * A batch call ([`Engine::read_many`], [`Engine::write_many`],
//!   [`Engine::sync`]) never returns while any entry it submitted is still
//!   owned by the kernel. The caller's buffers are borrowed for the whole call;
//!   on an error the engine stops submitting new work but still reaps every
//!   outstanding completion before returning. Consequently a thread's ring is
//!   always idle (empty SQ and CQ) between calls.
//! * If a ring ever gets into a state where that cannot be proven (an
//!   `io_uring_enter` failure that is not transient), the SQ entries the
//!   kernel never consumed are discarded by dropping the ring (a fresh one is
//!   created on the next call), and the entries it did consume are waited for
//!   first. If even waiting fails, the process aborts: returning would let
//!   the kernel write into memory the caller got back.
//! * At most `sq_entries` (256) operations are in flight per ring; larger
//!   batches are fed through in chunks. The CQ is twice that size, so
//!   completions can never overflow.
//! * Reads past end-of-file yield zeros (the file is sparse); short reads and
//!   writes are continued, `EINTR`/`EAGAIN` completions are retried.
//! * Offsets must fit in an `off_t` (`<= i64::MAX`); a larger offset is
//!   rejected with `EINVAL` rather than being handed to the kernel (where
//!   `-1` would mean "use the file position").
//!
//! Fallback: when io_uring cannot be set up at [`Engine::open`] time (e.g.
//! `EPERM` from `kernel.io_uring_disabled` or seccomp, `ENOSYS` on old or
//! restricted kernels, or a kernel lacking `IORING_OP_READ`/`WRITE`/`FSYNC`),
//! the engine uses plain `pread`/`pwrite`/`fdatasync` instead and says so once
//! per process with `tracing::warn!`. If a ring cannot be created later on a
//! particular thread, that call also uses the synchronous path.
//! [`Engine::open_with`] can force the fallback (for tests).
//!
//! Streaming writes: a thread that holds a [`Streaming`] guard (the ingest writer) writes its
//! large runs ([`DIRECT_MIN`] bytes or more, with buffer, offset and length 4 KiB-aligned)
//! through a second handle opened with `O_DIRECT`, around the page cache: a full ingest then
//! costs no page-cache copy (on some VMs the dearest part of a buffered write) and leaves the
//! next flush nothing to write back but metadata. Durability is unchanged: nothing is promised
//! before [`Engine::sync`], whose `fdatasync` covers the inode whichever handle wrote it
//! (journal commit and cache flush included). Page-cache coherence is the kernel's: a direct
//! write writes back and drops the cached pages it overlaps, and the store never reads a slot
//! while it is being written. Where `O_DIRECT` cannot be opened (tmpfs on older kernels) or a
//! direct write is refused with `EINVAL`, writes stay buffered.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use io_uring::{opcode, squeue, types, IoUring, Probe};
use nix::fcntl::FallocateFlags;

/// Submission queue size of each per-thread ring.
const RING_ENTRIES: u32 = 256;

/// Largest single read/write handed to the kernel (Linux's `MAX_RW_COUNT`).
const MAX_RW_CHUNK: u32 = 0x7fff_f000;

/// `IORING_ENTER_GETEVENTS` (not re-exported by the `io-uring` crate).
const IORING_ENTER_GETEVENTS: u32 = 1;

/// Smallest write that streaming mode sends around the page cache.
pub const DIRECT_MIN: usize = 256 << 10;

/// Alignment `O_DIRECT` needs of buffers, offsets and lengths (the largest logical block size).
const DIRECT_ALIGN: usize = 4096;

/// Set once the "io_uring unavailable" warning has been logged.
static FALLBACK_WARNED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread's ring; `None` until first use (or after it was discarded).
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
    /// Whether this thread is in streaming mode (a [`Streaming`] guard is alive on it).
    static STREAMING: Cell<bool> = const { Cell::new(false) };
}

/// Streaming mode for the thread that made it, until dropped (see the module comment).
#[derive(Debug)]
pub struct Streaming {
    was: bool,
    /// Tied to its thread: the mode is a thread-local.
    _thread: std::marker::PhantomData<*const ()>,
}

impl Drop for Streaming {
    fn drop(&mut self) {
        STREAMING.with(|s| s.set(self.was));
    }
}

/// Handle to the extent file; all slot I/O goes through it.
///
/// `Send + Sync`: it holds only the file and a flag; the rings are per thread.
#[derive(Debug)]
pub struct Engine {
    file: File,
    io_uring: bool,
    /// The same file opened with `O_DIRECT`, for streaming writes; `None` where it cannot be.
    direct: Option<File>,
    /// Cleared when a direct write was refused as misaligned: streaming writes stay buffered.
    direct_ok: AtomicBool,
}

impl Engine {
    /// Open (create if missing) the extent file at `path` for read+write.
    pub fn open(path: &Path) -> io::Result<Engine> {
        Self::open_with(path, false)
    }

    /// Like [`Engine::open`]; `force_fallback` skips io_uring and uses
    /// `pread`/`pwrite` unconditionally.
    pub fn open_with(path: &Path, force_fallback: bool) -> io::Result<Engine> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path)?;
        let io_uring = if force_fallback {
            tracing::debug!(path = %path.display(), "io_uring disabled by request; using pread/pwrite");
            false
        } else {
            match probe_ring() {
                Ok(ring) => {
                    // Keep the probe ring as this thread's ring if it has none.
                    let _ = RING.try_with(|cell| {
                        if let Ok(mut slot) = cell.try_borrow_mut() {
                            if slot.is_none() {
                                *slot = Some(ring);
                            }
                        }
                    });
                    true
                }
                Err(e) => {
                    warn_fallback(&e);
                    false
                }
            }
        };
        let direct = match OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "no O_DIRECT: streaming writes stay buffered");
                None
            }
        };
        Ok(Engine { file, io_uring, direct, direct_ok: AtomicBool::new(true) })
    }

    /// Streaming mode for the calling thread until the guard is dropped: its large aligned
    /// writes go around the page cache (see the module comment).
    pub fn streaming(&self) -> Streaming {
        let was = STREAMING.with(|s| s.replace(true));
        Streaming { was, _thread: std::marker::PhantomData }
    }

    /// true when io_uring is in use, false when fell back to pread/pwrite.
    pub fn uses_io_uring(&self) -> bool {
        self.io_uring
    }

    /// Read each (offset, buffer) pair fully; all submitted together in one
    /// batch, then waited for. Short reads are continued until the buffer is
    /// full; reading beyond EOF yields zeros (the file is sparse).
    pub fn read_many(&self, ios: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        for (offset, buf) in ios.iter() {
            check_range(*offset, buf.len())?;
        }
        if self.io_uring {
            let mut ops: Vec<Op> =
                ios.iter_mut().map(|(offset, buf)| Op::new(*offset, buf.as_mut_ptr(), buf.len())).collect();
            if let Some(res) = self.with_ring(&self.file, OpKind::Read, &mut ops) {
                res?;
                // The kernel is done with every buffer; fill what lies past EOF.
                for (op, (_, buf)) in ops.iter().zip(ios.iter_mut()) {
                    if let Some(tail) = buf.get_mut(op.done..) {
                        tail.fill(0);
                    }
                }
                return Ok(());
            }
        }
        for (offset, buf) in ios.iter_mut() {
            read_full_at(&self.file, buf, *offset)?;
        }
        Ok(())
    }

    /// Write each (offset, buffer) pair fully, submitted together in one batch
    /// (short writes continued). Overlapping ranges within one batch land in
    /// an unspecified order. Consecutive pairs that lie back to back both in
    /// the file and in memory go to the kernel as one write.
    pub fn write_many(&self, ios: &[(u64, &[u8])]) -> io::Result<()> {
        for (offset, buf) in ios {
            check_range(*offset, buf.len())?;
        }
        let runs = runs_of(ios);
        let streaming = STREAMING.with(Cell::get) && self.io_uring && self.direct_ok.load(Ordering::Relaxed);
        if let Some(direct) = self.direct.as_ref().filter(|_| streaming) {
            let (around, through): (Vec<Run>, Vec<Run>) = runs.into_iter().partition(Run::is_direct);
            if !around.is_empty() {
                match self.write_runs(direct, ios, &around) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        tracing::warn!(error = %e, "a direct write was refused; streaming writes stay buffered");
                        self.direct_ok.store(false, Ordering::Relaxed);
                        self.write_runs(&self.file, ios, &around)?;
                    }
                    other => other?,
                }
            }
            return self.write_runs(&self.file, ios, &through);
        }
        self.write_runs(&self.file, ios, &runs)
    }

    /// Write `runs` of `ios` through `file` (the extent file's buffered or direct handle; the
    /// synchronous fallback always uses the buffered one, pair by pair).
    fn write_runs(&self, file: &File, ios: &[(u64, &[u8])], runs: &[Run]) -> io::Result<()> {
        if runs.is_empty() {
            return Ok(());
        }
        if self.io_uring {
            // A run's op covers exactly the bytes of its pairs' buffers, which lie back to
            // back in memory, all borrowed for this call. `cast_mut` only to share `Op` with
            // reads: a Write entry never lets the kernel store through this pointer.
            let mut ops: Vec<Op> = runs.iter().map(|r| Op::new(r.offset, r.ptr.cast_mut(), r.len)).collect();
            if let Some(res) = self.with_ring(file, OpKind::Write, &mut ops) {
                return res;
            }
        }
        for run in runs {
            for (offset, buf) in &ios[run.ios.clone()] {
                self.file.write_all_at(buf, *offset)?;
            }
        }
        Ok(())
    }

    /// fdatasync the file (through io_uring's Fsync op with the DATASYNC flag
    /// when available, else `fdatasync(2)`).
    pub fn sync(&self) -> io::Result<()> {
        if self.io_uring {
            let mut ops = [Op::new(0, std::ptr::null_mut(), 0)];
            if let Some(res) = self.with_ring(&self.file, OpKind::Fsync, &mut ops) {
                return res;
            }
        }
        // `File::sync_data` is fdatasync(2) on Linux, retried on EINTR.
        self.file.sync_data()
    }

    /// Punch holes (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`) for each
    /// (offset, len) range so the space is returned to the filesystem. The
    /// file size is unchanged; punched ranges read back as zeros.
    /// Zero-length ranges are ignored.
    pub fn punch(&self, ranges: &[(u64, u64)]) -> io::Result<()> {
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        for &(offset, len) in ranges {
            if len == 0 {
                continue;
            }
            let off = i64::try_from(offset).map_err(|_| einval())?;
            let len = i64::try_from(len).map_err(|_| einval())?;
            off.checked_add(len).ok_or_else(einval)?;
            loop {
                match nix::fcntl::fallocate(self.file.as_raw_fd(), mode, off, len) {
                    Ok(()) => break,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(io::Error::from(e)),
                }
            }
        }
        Ok(())
    }

    /// Runs `ops` on this thread's ring. `None` means no ring is usable on
    /// this thread right now; the caller then takes the synchronous path.
    fn with_ring(&self, file: &File, kind: OpKind, ops: &mut [Op]) -> Option<io::Result<()>> {
        let fd = file.as_raw_fd();
        RING.try_with(|cell| {
            // Not re-entrant, but a failed borrow just means "use the fallback".
            let mut slot = cell.try_borrow_mut().ok()?;
            if slot.is_none() {
                match new_ring() {
                    Ok(ring) => *slot = Some(ring),
                    Err(e) => {
                        warn_fallback(&e);
                        return None;
                    }
                }
            }
            let ring = slot.as_mut()?;
            let (res, keep) = drive(ring, fd, kind, ops);
            if !keep {
                // Drops unconsumed SQEs with the ring; nothing is in flight.
                *slot = None;
            }
            Some(res)
        })
        .ok()
        .flatten()
    }
}

/// Which opcode a batch uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Read,
    Write,
    Fsync,
}

/// One (offset, buffer) request and its progress.
#[derive(Debug)]
struct Op {
    offset: u64,
    /// Start of the caller's buffer (only read by the kernel for writes).
    ptr: *mut u8,
    len: usize,
    /// Bytes transferred so far (for reads stopped by EOF: bytes before EOF).
    done: usize,
}

impl Op {
    fn new(offset: u64, ptr: *mut u8, len: usize) -> Op {
        Op { offset, ptr, len, done: 0 }
    }
}

/// Consecutive write pairs `ios[ios]` that lie back to back in the file and in memory: one
/// write of `len` bytes from `ptr` at `offset`.
#[derive(Debug, Clone)]
struct Run {
    ios: std::ops::Range<usize>,
    offset: u64,
    ptr: *const u8,
    len: usize,
}

impl Run {
    /// Whether a streaming write of this run goes around the page cache: large, and aligned
    /// as `O_DIRECT` needs.
    fn is_direct(&self) -> bool {
        self.len >= DIRECT_MIN
            && self.len.is_multiple_of(DIRECT_ALIGN)
            && self.offset.is_multiple_of(DIRECT_ALIGN as u64)
            && (self.ptr as usize).is_multiple_of(DIRECT_ALIGN)
    }
}

/// The runs of `ios`, in order (empty pairs left out). Writes that a caller laid out back to
/// back in one buffer (an ingest batch: consecutive frames in freshly allocated, consecutive
/// slots) become one write however many map entries they are.
fn runs_of(ios: &[(u64, &[u8])]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for (i, &(offset, buf)) in ios.iter().enumerate() {
        if buf.is_empty() {
            continue;
        }
        if let Some(r) = runs.last_mut() {
            let next = r.offset.checked_add(r.len as u64);
            if next == Some(offset) && r.ptr.wrapping_add(r.len) == buf.as_ptr() {
                r.ios.end = i + 1;
                r.len += buf.len();
                continue;
            }
        }
        runs.push(Run { ios: i..i + 1, offset, ptr: buf.as_ptr(), len: buf.len() });
    }
    runs
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// Rejects ranges whose end does not fit in an `off_t`, like pread/pwrite do.
fn check_range(offset: u64, len: usize) -> io::Result<()> {
    let len = u64::try_from(len).map_err(|_| einval())?;
    match offset.checked_add(len) {
        Some(end) if i64::try_from(end).is_ok() => Ok(()),
        _ => Err(einval()),
    }
}

fn is_transient(errno: i32) -> bool {
    errno == libc::EINTR || errno == libc::EAGAIN || errno == libc::EBUSY
}

fn warn_fallback(err: &io::Error) {
    if !FALLBACK_WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(error = %err, "io_uring unavailable; falling back to pread/pwrite");
    }
}

fn new_ring() -> io::Result<IoUring> {
    IoUring::new(RING_ENTRIES)
}

/// Creates a ring and checks that the opcodes the engine uses exist.
fn probe_ring() -> io::Result<IoUring> {
    let ring = new_ring()?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for code in [opcode::Read::CODE, opcode::Write::CODE, opcode::Fsync::CODE] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring opcode {code} not supported by the kernel"),
            ));
        }
    }
    Ok(ring)
}

/// Builds the SQE for the remainder of `ops[idx]`.
fn build_entry(fd: RawFd, kind: OpKind, op: &Op, idx: usize) -> io::Result<squeue::Entry> {
    let user_data = u64::try_from(idx).map_err(|_| einval())?;
    let entry = match kind {
        OpKind::Fsync => opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build(),
        OpKind::Read | OpKind::Write => {
            let remaining = op.len - op.done;
            let chunk = u32::try_from(remaining).unwrap_or(MAX_RW_CHUNK).min(MAX_RW_CHUNK);
            let done = u64::try_from(op.done).map_err(|_| einval())?;
            let offset = op.offset.checked_add(done).ok_or_else(einval)?;
            // In bounds: `done <= len`, and `ptr..ptr+len` is one borrowed buffer.
            let ptr = op.ptr.wrapping_add(op.done);
            if kind == OpKind::Read {
                opcode::Read::new(types::Fd(fd), ptr, chunk).offset(offset).build()
            } else {
                opcode::Write::new(types::Fd(fd), ptr.cast_const(), chunk).offset(offset).build()
            }
        }
    };
    Ok(entry.user_data(user_data))
}

/// Submits every op in `ops` (at most a ring's worth in flight at a time),
/// continuing short transfers and retrying transient errors, and returns only
/// once nothing submitted is still in the kernel.
///
/// Returns the batch result and whether the ring may be kept (`false`: the
/// SQ still holds entries the kernel never consumed, so the caller must drop
/// the ring instead of submitting anything else on it).
fn drive(ring: &mut IoUring, fd: RawFd, kind: OpKind, ops: &mut [Op]) -> (io::Result<()>, bool) {
    let cap = usize::try_from(ring.params().sq_entries()).unwrap_or(1).max(1);
    let mut queue: VecDeque<usize> = (0..ops.len()).filter(|&i| kind == OpKind::Fsync || ops[i].len > 0).collect();
    // Entries pushed to the SQ whose completion has not been reaped yet.
    let mut in_flight = 0usize;
    let mut error: Option<io::Error> = None;

    loop {
        if error.is_none() {
            let mut sq = ring.submission();
            while in_flight < cap {
                let Some(idx) = queue.pop_front() else { break };
                let entry = match build_entry(fd, kind, &ops[idx], idx) {
                    Ok(entry) => entry,
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                };
                // SAFETY: the entry points into the caller's buffer
                // `ops[idx].ptr[done..len]` (nothing for Fsync), which is
                // borrowed (`&mut` for reads, `&` for writes) by the public
                // method for its whole duration, and `fd` is kept open by
                // the `&File` (one of the engine's handles) `with_ring`
                // borrows for the whole call. This function does not return until the entry's
                // completion has been reaped (`in_flight` reaches 0 below,
                // including on error paths), or — if the kernel never consumed
                // it — until the caller has dropped the ring, so the kernel
                // cannot touch the buffer after the borrow ends.
                if unsafe { sq.push(&entry) }.is_err() {
                    queue.push_front(idx);
                    break;
                }
                in_flight += 1;
            }
        }
        if in_flight == 0 {
            break;
        }

        match ring.submit_and_wait(in_flight) {
            Ok(_) => {}
            Err(e) if e.raw_os_error().is_some_and(is_transient) => {}
            Err(e) => {
                tracing::error!(error = %e, "io_uring_enter failed; draining in-flight I/O");
                let keep = abandon(ring, ops, kind, &mut in_flight);
                return (Err(error.unwrap_or(e)), keep);
            }
        }
        reap(ring, ops, kind, &mut in_flight, &mut queue, &mut error);
    }
    (error.map_or(Ok(()), Err), true)
}

/// Processes every available completion: records progress, queues
/// continuations/retries, keeps the first hard error.
fn reap(
    ring: &mut IoUring,
    ops: &mut [Op],
    kind: OpKind,
    in_flight: &mut usize,
    queue: &mut VecDeque<usize>,
    error: &mut Option<io::Error>,
) {
    for cqe in ring.completion() {
        let Some(idx) = usize::try_from(cqe.user_data()).ok().filter(|&i| i < ops.len()) else {
            // Cannot happen: the ring is idle between calls and every entry we
            // push carries an index into `ops`.
            tracing::error!(user_data = cqe.user_data(), "unexpected io_uring completion");
            continue;
        };
        *in_flight = in_flight.saturating_sub(1);
        let res = cqe.result();
        let op = &mut ops[idx];
        if res < 0 {
            if -res == libc::EINTR || -res == libc::EAGAIN {
                queue.push_back(idx);
            } else {
                error.get_or_insert_with(|| io::Error::from_raw_os_error(-res));
            }
            continue;
        }
        let n = usize::try_from(res).unwrap_or(0);
        match kind {
            OpKind::Fsync => {}
            OpKind::Read if n == 0 => {
                // EOF: the rest of the buffer is zero-filled by the caller.
            }
            OpKind::Write if n == 0 => {
                error.get_or_insert_with(|| io::Error::new(io::ErrorKind::WriteZero, "io_uring write returned 0"));
            }
            OpKind::Read | OpKind::Write => {
                op.done = op.done.saturating_add(n).min(op.len);
                if op.done < op.len {
                    queue.push_back(idx);
                }
            }
        }
    }
}

/// Called after a non-transient `io_uring_enter` failure. Waits for every
/// entry the kernel consumed; returns `false` if unconsumed entries
/// remain in the SQ (the ring must then be dropped so they are never
/// submitted). Aborts the process if the wait itself keeps failing, since
/// returning would hand the caller back buffers the kernel may still write.
fn abandon(ring: &mut IoUring, ops: &mut [Op], kind: OpKind, in_flight: &mut usize) -> bool {
    let mut sink_queue = VecDeque::new();
    let mut sink_error = None;
    loop {
        reap(ring, ops, kind, in_flight, &mut sink_queue, &mut sink_error);
        let unconsumed = ring.submission().len();
        let outstanding = in_flight.saturating_sub(unconsumed);
        if outstanding == 0 {
            return unconsumed == 0;
        }
        let want = u32::try_from(outstanding).unwrap_or(u32::MAX);
        // SAFETY: `to_submit = 0`, so no new SQE is handed to the kernel; this
        // only waits for completions of entries already consumed. No `arg`
        // pointer is passed.
        let res = unsafe { ring.submitter().enter::<libc::sigset_t>(0, want, IORING_ENTER_GETEVENTS, None) };
        if let Err(e) = res {
            if !e.raw_os_error().is_some_and(is_transient) {
                tracing::error!(error = %e, "cannot wait for in-flight io_uring I/O; aborting");
                std::process::abort();
            }
        }
    }
}

/// Synchronous fallback: `pread` until full; EOF yields zeros.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let off = offset.checked_add(u64::try_from(done).map_err(|_| einval())?).ok_or_else(einval)?;
        match file.read_at(&mut buf[done..], off) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const SLOT: usize = 4096;

    fn pattern(seed: u64) -> Vec<u8> {
        (0..SLOT).map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8).collect()
    }

    fn scattered_roundtrip(force_fallback: bool) {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open_with(&dir.path().join("extents"), force_fallback).unwrap();
        if force_fallback {
            assert!(!engine.uses_io_uring());
        }
        let slots: [u64; 5] = [0, 3, 17, 1000, 4096 + 5];
        let data: Vec<Vec<u8>> = slots.iter().map(|&s| pattern(s)).collect();
        let writes: Vec<(u64, &[u8])> =
            slots.iter().zip(&data).map(|(&s, d)| (s * SLOT as u64, d.as_slice())).collect();
        engine.write_many(&writes).unwrap();
        engine.sync().unwrap();

        let mut bufs = vec![vec![0xAAu8; SLOT]; slots.len()];
        let mut reads: Vec<(u64, &mut [u8])> =
            slots.iter().zip(bufs.iter_mut()).map(|(&s, b)| (s * SLOT as u64, b.as_mut_slice())).collect();
        engine.read_many(&mut reads).unwrap();
        assert_eq!(bufs, data);

        // Untouched slot inside the file (a hole) reads as zeros.
        let mut hole = vec![0xAAu8; SLOT];
        engine.read_many(&mut [(5 * SLOT as u64, &mut hole[..])]).unwrap();
        assert!(hole.iter().all(|&b| b == 0));
    }

    #[test]
    fn roundtrip_scattered() {
        scattered_roundtrip(false);
    }

    #[test]
    fn roundtrip_scattered_fallback() {
        scattered_roundtrip(true);
    }

    #[test]
    fn reports_io_uring_state() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(&dir.path().join("extents")).unwrap();
        eprintln!("engine uses io_uring: {}", engine.uses_io_uring());
    }

    fn beyond_eof(force_fallback: bool) {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open_with(&dir.path().join("extents"), force_fallback).unwrap();
        let data = pattern(9);
        engine.write_many(&[(0, &data[..])]).unwrap();
        // Entirely past EOF.
        let mut past = vec![0xAAu8; SLOT];
        // Straddling EOF: the first half is data, the rest zeros.
        let mut straddle = vec![0xAAu8; SLOT];
        engine.read_many(&mut [(10 * SLOT as u64, &mut past[..]), (SLOT as u64 / 2, &mut straddle[..])]).unwrap();
        assert!(past.iter().all(|&b| b == 0));
        assert_eq!(&straddle[..SLOT / 2], &data[SLOT / 2..]);
        assert!(straddle[SLOT / 2..].iter().all(|&b| b == 0));
    }

    #[test]
    fn read_beyond_eof_is_zero() {
        beyond_eof(false);
    }

    #[test]
    fn read_beyond_eof_is_zero_fallback() {
        beyond_eof(true);
    }

    fn punch_frees(force_fallback: bool) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("extents");
        let engine = Engine::open_with(&path, force_fallback).unwrap();
        let mib = vec![0x5Au8; 1 << 20];
        let chunks: Vec<(u64, &[u8])> = mib.chunks(SLOT).enumerate().map(|(i, c)| ((i * SLOT) as u64, c)).collect();
        engine.write_many(&chunks).unwrap();
        engine.sync().unwrap();
        let before = std::fs::metadata(&path).unwrap();

        engine.punch(&[(0, 512 << 10), (700 << 10, 0)]).unwrap();
        engine.sync().unwrap();
        let after = std::fs::metadata(&path).unwrap();
        assert_eq!(after.len(), before.len(), "KEEP_SIZE");
        // st_blocks is in 512-byte units; 512 KiB = 1024 blocks.
        assert!(after.blocks() + 1000 <= before.blocks(), "blocks {} -> {}", before.blocks(), after.blocks());

        let mut punched = vec![0xAAu8; SLOT];
        let mut kept = vec![0u8; SLOT];
        engine.read_many(&mut [(8 * SLOT as u64, &mut punched[..]), ((512 << 10) as u64, &mut kept[..])]).unwrap();
        assert!(punched.iter().all(|&b| b == 0));
        assert!(kept.iter().all(|&b| b == 0x5A));
    }

    #[test]
    fn punch_returns_space() {
        punch_frees(false);
    }

    #[test]
    fn punch_returns_space_fallback() {
        punch_frees(true);
    }

    fn big_batch(force_fallback: bool) {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open_with(&dir.path().join("extents"), force_fallback).unwrap();
        let n = 1000usize;
        // Interleaved order so neighbouring ios are not adjacent on disk.
        let slot_of = |i: usize| ((i * 7919) % 4001) as u64;
        let data: Vec<Vec<u8>> = (0..n).map(|i| pattern(slot_of(i))).collect();
        let writes: Vec<(u64, &[u8])> = (0..n).map(|i| (slot_of(i) * SLOT as u64, data[i].as_slice())).collect();
        engine.write_many(&writes).unwrap();

        let mut bufs = vec![vec![0u8; SLOT]; n];
        let mut reads: Vec<(u64, &mut [u8])> =
            bufs.iter_mut().enumerate().map(|(i, b)| (slot_of(i) * SLOT as u64, b.as_mut_slice())).collect();
        engine.read_many(&mut reads).unwrap();
        assert!(bufs == data);
    }

    #[test]
    fn batch_larger_than_ring() {
        big_batch(false);
    }

    #[test]
    fn batch_larger_than_ring_fallback() {
        big_batch(true);
    }

    #[test]
    fn large_single_io_and_empty_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(&dir.path().join("extents")).unwrap();
        engine.write_many(&[]).unwrap();
        engine.read_many(&mut []).unwrap();
        engine.write_many(&[(0, &[][..])]).unwrap();
        engine.punch(&[]).unwrap();
        let big: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i % 253) as u8).collect();
        engine.write_many(&[(SLOT as u64, &big[..])]).unwrap();
        let mut back = vec![0u8; big.len()];
        engine.read_many(&mut [(SLOT as u64, &mut back[..])]).unwrap();
        assert!(back == big);
    }

    #[test]
    fn rejects_offsets_beyond_off_t() {
        let dir = tempfile::tempdir().unwrap();
        for fallback in [false, true] {
            let engine = Engine::open_with(&dir.path().join("extents"), fallback).unwrap();
            let mut buf = vec![0u8; SLOT];
            let err = engine.read_many(&mut [(u64::MAX, &mut buf[..])]).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
            let err = engine.write_many(&[(i64::MAX as u64, &buf[..])]).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
            let err = engine.punch(&[(u64::MAX - 1, 10)]).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        }
    }

    #[test]
    fn io_error_is_reported_after_draining() {
        // A read-only fd makes every write fail with EBADF; the batch must
        // still drain and the ring stay usable afterwards.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("extents");
        let engine = Engine::open(&path).unwrap();
        let ro = Engine {
            file: File::open(&path).unwrap(),
            io_uring: engine.uses_io_uring(),
            direct: None,
            direct_ok: AtomicBool::new(false),
        };
        let data = pattern(1);
        let writes: Vec<(u64, &[u8])> = (0..600).map(|i| (i * SLOT as u64, &data[..])).collect();
        let err = ro.write_many(&writes).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        engine.write_many(&[(0, &data[..])]).unwrap();
        let mut back = vec![0u8; SLOT];
        engine.read_many(&mut [(0, &mut back[..])]).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn back_to_back_pairs_become_one_run() {
        let buf = vec![7u8; 4 * SLOT];
        let other = vec![8u8; SLOT];
        let ios: Vec<(u64, &[u8])> = vec![
            (0, &buf[..SLOT]),
            (SLOT as u64, &buf[SLOT..2 * SLOT]),
            (2 * SLOT as u64, &[][..]),
            (2 * SLOT as u64, &buf[2 * SLOT..3 * SLOT]),
            (10 * SLOT as u64, &buf[3 * SLOT..]), // next in memory, not in the file
            (11 * SLOT as u64, &other[..]),       // next in the file, not in memory
        ];
        let runs: Vec<(std::ops::Range<usize>, u64, usize)> =
            runs_of(&ios).into_iter().map(|r| (r.ios, r.offset, r.len)).collect();
        assert_eq!(runs, vec![(0..4, 0, 3 * SLOT), (4..5, 10 * SLOT as u64, SLOT), (5..6, 11 * SLOT as u64, SLOT)]);
    }

    #[test]
    fn streaming_writes_land_whether_direct_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(&dir.path().join("extents")).unwrap();
        // An aligned buffer of 1 MiB written as 4 KiB pairs (one direct run), an unaligned
        // one and a small one (buffered), all in streaming mode.
        let mut big = vec![0u8; (1 << 20) + 4096];
        let at = big.as_ptr().align_offset(4096);
        for (i, b) in big[at..at + (1 << 20)].iter_mut().enumerate() {
            *b = u8::try_from(i % 251).unwrap_or(0);
        }
        let aligned = &big[at..at + (1 << 20)];
        let odd = vec![3u8; 2 * SLOT + 1];
        let mut ios: Vec<(u64, &[u8])> =
            aligned.chunks(SLOT).enumerate().map(|(i, c)| ((i * SLOT) as u64, c)).collect();
        ios.push(((1 << 20) + SLOT as u64, &odd[1..]));
        ios.push(((4 << 20) as u64, &odd[..SLOT]));
        {
            let _streaming = engine.streaming();
            engine.write_many(&ios).unwrap();
        }
        assert!(!STREAMING.with(Cell::get), "the guard ends streaming mode");
        engine.sync().unwrap();
        for (off, want) in ios {
            let mut back = vec![0u8; want.len()];
            engine.read_many(&mut [(off, &mut back[..])]).unwrap();
            assert!(back == want, "at {off}");
        }
    }

    #[test]
    fn usable_from_many_threads() {
        let dir = tempfile::tempdir().unwrap();
        let engine = std::sync::Arc::new(Engine::open(&dir.path().join("extents")).unwrap());
        let handles: Vec<_> = (0..8u64)
            .map(|t| {
                let engine = engine.clone();
                std::thread::spawn(move || {
                    for round in 0..20u64 {
                        let slot = t * 100 + round;
                        let data = pattern(slot);
                        engine.write_many(&[(slot * SLOT as u64, &data[..])]).unwrap();
                        let mut back = vec![0u8; SLOT];
                        engine.read_many(&mut [(slot * SLOT as u64, &mut back[..])]).unwrap();
                        assert_eq!(back, data);
                    }
                    engine.sync().unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }
}
