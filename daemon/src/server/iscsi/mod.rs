//! The iSCSI listener: accepts connections, runs the login and the full feature phase of the
//! `forkd-iscsi` crate over them, and serves every SCSI command from the [`Store`].
//!
//! One OS thread per connection, blocking socket I/O: each read is decoded into as many PDUs
//! as it holds, the session turns them into commands, the commands run in order against the
//! volume, and every answer produced by that read goes out in one write. Targets are
//! `iqn.2026-11.dev.forkd:VOLUME` for each clone (LUN 0, read-write) and, when
//! `iscsi_access.snapshots` is set, `…:VOLUME:snap-N` for each snapshot (read-only); who may
//! log in is [`crate::server::iscsi::access`]'s business.
//!
//! Rewind, refresh and delete follow the rule of every export (see [`crate::server::exports`]): the
//! connection answers what it already received, then closes; logins to a fenced target fail
//! with "target not found" for the moment of the switch.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use iscsi::keys::{send_targets, SessionType, TargetEntry};
use iscsi::login::{ChapNonce, Login, LoginConfig, LoginStep, TargetInfo, Targets};
use iscsi::pdu::decode;
use iscsi::scsi::{self, Backend, BackendError, LunState, ScsiOutcome};
use iscsi::session::{Command, Event, Session};
use iscsi::{Digests, Disposition, Pdu};
use tokio_util::sync::CancellationToken;

use access::{reference_of, target_name, AccessRules};

pub mod access;
use crate::store::{BlockState, Store, StoreError};

/// Commands an initiator may have outstanding (the CmdSN window).
const WINDOW: u32 = 128;
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 256;
/// Time an initiator has to complete its login.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);
/// How often a blocked read wakes up to look for a close request.
const POLL: Duration = Duration::from_millis(200);

/// What every connection shares.
#[derive(Debug)]
struct Shared {
    store: Arc<Store>,
    rules: AccessRules,
    /// Persistent reservations and identity of each exported LUN, by reference.
    luns: Mutex<HashMap<String, Arc<Mutex<LunState>>>>,
    next_tsih: AtomicU16,
    connections: AtomicUsize,
}

impl Shared {
    fn lun(&self, reference: &str, identity: &str) -> Arc<Mutex<LunState>> {
        let mut luns = self.luns.lock().unwrap_or_else(|p| p.into_inner());
        luns.entry(reference.to_string()).or_insert_with(|| Arc::new(Mutex::new(LunState::new(identity)))).clone()
    }

    fn tsih(&self) -> u16 {
        loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }

    /// Whether `reference` is an exported target right now, and the identity of its LUN.
    fn exported(&self, reference: &str) -> Option<String> {
        if self.store.exports.is_fenced(reference) {
            return None;
        }
        let cat = self.store.catalog();
        match reference.split_once('@') {
            None => {
                let v = cat.volume(reference).ok()?;
                (v.kind == catalog::Kind::Clone).then(|| format!("{}:{}", v.name, v.created_at))
            }
            Some(_) if self.rules.snapshots => {
                let t = cat.target(reference).ok()?;
                let v = cat.volume(reference.split('@').next().unwrap_or(reference)).ok()?;
                Some(format!("{}:{}", t.name, v.created_at))
            }
            Some(_) => None,
        }
    }

    /// Every exported reference, for SendTargets.
    fn all_exports(&self) -> Vec<String> {
        let cat = self.store.catalog();
        let mut out = Vec::new();
        for v in cat.volumes().values() {
            if v.kind == catalog::Kind::Clone {
                out.push(v.name.clone());
            }
            if self.rules.snapshots {
                out.extend(v.snapshots.iter().map(|s| format!("{}@{}", v.name, s.id)));
            }
        }
        out.retain(|r| !self.store.exports.is_fenced(r));
        out
    }
}

struct LoginTargets<'a> {
    shared: &'a Shared,
    peer: IpAddr,
}

impl Targets for LoginTargets<'_> {
    fn lookup(&self, name: &str) -> Option<TargetInfo> {
        let reference = reference_of(name)?;
        self.shared.exported(&reference)?;
        Some(self.shared.rules.target_info(&reference, self.peer))
    }
}

/// Accept iSCSI connections until `shutdown` is cancelled. Each connection runs on its own
/// thread and closes within [`POLL`] of the shutdown.
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Arc<Store>,
    rules: AccessRules,
    shutdown: CancellationToken,
) {
    let shared = Arc::new(Shared {
        store,
        rules,
        luns: Mutex::new(HashMap::new()),
        next_tsih: AtomicU16::new(1),
        connections: AtomicUsize::new(0),
    });
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "iSCSI accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if shared.connections.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            tracing::warn!(%peer, "iSCSI connection refused: {MAX_CONNECTIONS} connections already");
            continue;
        }
        let sock = match stream.into_std().and_then(|s| s.set_nonblocking(false).map(|()| s)) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "iSCSI connection setup failed");
                continue;
            }
        };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        shared.store.metrics.iscsi_active.inc();
        let (counted, stop) = (shared.clone(), shutdown.clone());
        let spawned = std::thread::Builder::new().name("forkd-iscsi".into()).spawn(move || {
            let why = connection(&counted, sock, peer, &stop);
            tracing::info!(%peer, why, "iSCSI connection closed");
            counted.store.metrics.iscsi_closed.with_label_values(&[why]).inc();
            counted.store.metrics.iscsi_active.dec();
            counted.connections.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            tracing::warn!(%peer, error = %e, "cannot start an iSCSI connection thread");
            shared.store.metrics.iscsi_active.dec();
            shared.connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The socket and its input buffer (`buf[start..end]` is unread input; the buffer is zeroed
/// once and reused, growing only for a PDU larger than it).
struct Conn {
    sock: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Conn {
    fn new(sock: TcpStream) -> Conn {
        Conn { sock, buf: vec![0; 1 << 20], start: 0, end: 0 }
    }

    /// Reads more input; `Ok(false)` on a timeout (nothing arrived within [`POLL`]).
    fn fill(&mut self) -> std::io::Result<bool> {
        const MIN_ROOM: usize = 64 << 10;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        if self.buf.len() - self.end < MIN_ROOM {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
            if self.buf.len() - self.end < MIN_ROOM {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        match self.sock.read(&mut self.buf[self.end..]) {
            Ok(0) => Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                self.end += n;
                Ok(true)
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn input(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

fn nonce() -> ChapNonce {
    let mut bytes = [0u8; 33];
    let filled = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).is_ok();
    if !filled {
        // No /dev/urandom: std's per-process random hash keys (seeded by the OS) still make a
        // challenge nobody can predict or replay.
        use std::hash::{BuildHasher, Hasher};
        let state = std::collections::hash_map::RandomState::new();
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            let mut h = state.build_hasher();
            h.write_usize(i);
            h.write_u128(Instant::now().elapsed().as_nanos());
            let v = h.finish().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    let mut challenge = [0u8; 32];
    challenge.copy_from_slice(&bytes[1..]);
    ChapNonce { identifier: bytes[0], challenge }
}

/// One connection, from login to close; returns why it closed.
fn connection(shared: &Shared, sock: TcpStream, peer: SocketAddr, shutdown: &CancellationToken) -> &'static str {
    let _ = sock.set_nodelay(true);
    if sock.set_read_timeout(Some(POLL)).is_err() {
        return "socket setup failed";
    }
    let local = sock.local_addr().ok();
    let mut conn = Conn::new(sock);
    let config =
        LoginConfig { cmd_window: WINDOW, discovery_chap: shared.rules.discovery_chap.clone(), ..Default::default() };
    let mut login = Login::new(config, shared.tsih(), nonce());
    let targets = LoginTargets { shared, peer: peer.ip() };
    let deadline = Instant::now() + LOGIN_TIMEOUT;
    let params = loop {
        let pdu = match decode(conn.input(), Digests::NONE, Login::login_max_data()) {
            Ok(Some((pdu, n))) => {
                conn.start += n;
                pdu
            }
            Ok(None) => {
                if Instant::now() > deadline {
                    return "login timed out";
                }
                if shutdown.is_cancelled() {
                    return "daemon shutting down";
                }
                match conn.fill() {
                    Ok(_) => continue,
                    Err(_) => return "initiator closed during login",
                }
            }
            Err(_) => return "malformed PDU during login",
        };
        let step = match login.handle(&pdu, &targets) {
            Ok(s) => s,
            Err(_) => return "login already finished",
        };
        let (reply, done) = match step {
            LoginStep::Continue(r) => (r, None),
            LoginStep::Done(r, p) => (r, Some(p)),
            LoginStep::Fail(r) => {
                let mut out = Out::default();
                out.push(&r, Digests::NONE);
                let _ = out.send(&mut conn.sock);
                return "login refused";
            }
        };
        let mut out = Out::default();
        out.push(&reply, Digests::NONE);
        if out.send(&mut conn.sock).is_err() {
            return "initiator closed during login";
        }
        if let Some(p) = done {
            break *p;
        }
    };
    let portal = local.map(|a| format!("{a},1")).unwrap_or_default();
    match params.session_type {
        SessionType::Discovery => {
            full_feature(shared, conn, Session::new(params, WINDOW), None, peer, &portal, shutdown)
        }
        SessionType::Normal => {
            let Some(reference) = params.target_name.as_deref().and_then(reference_of) else {
                return "login without a target";
            };
            let Some(identity) = shared.exported(&reference) else { return "target went away during login" };
            let Some(guard) = shared.store.exports.register(&reference) else { return "target fenced" };
            let lun = shared.lun(&reference, &identity);
            let export = Export { reference, lun, close: guard.token.clone(), expired: guard.expired.clone() };
            let mut session = Session::new(params, WINDOW);
            session.set_read_only(shared.store.catalog().target(&export.reference).map_or(true, |t| t.read_only));
            let nexus = session.nexus();
            let lun = export.lun.clone();
            let why = full_feature(shared, conn, session, Some(export), peer, &portal, shutdown);
            lun.lock().unwrap_or_else(|p| p.into_inner()).nexus_lost(&nexus);
            drop(guard);
            why
        }
    }
}

/// A normal session's target.
struct Export {
    reference: String,
    lun: Arc<Mutex<LunState>>,
    close: CancellationToken,
    expired: CancellationToken,
}

fn full_feature(
    shared: &Shared,
    mut conn: Conn,
    mut session: Session,
    export: Option<Export>,
    peer: SocketAddr,
    portal: &str,
    shutdown: &CancellationToken,
) -> &'static str {
    let digests = session.params().digests();
    let max_recv = session.params().max_recv_data_segment_length;
    let nexus = session.nexus();
    let mut out = Out::default();
    loop {
        let mut closing: Option<&'static str> = None;
        let mut batch = Batch::new(&shared.store, export.as_ref());
        loop {
            let (pdu, n) = match decode(conn.input(), digests, max_recv) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => match e.disposition() {
                    Disposition::Reject { reason, header, skip } => {
                        conn.start += skip;
                        let r = session.reject_header(reason, &header);
                        out.push(&r, digests);
                        continue;
                    }
                    Disposition::Close => {
                        closing = Some("malformed PDU");
                        break;
                    }
                },
            };
            conn.start += n;
            for ev in session.handle(pdu) {
                if !matches!(ev, Event::Run(_)) {
                    batch.finish(&mut session, &mut out, digests);
                }
                match ev {
                    Event::Send(p) => out.push(&p, digests),
                    Event::Run(cmd) => {
                        if let Some(x) = &export {
                            if cmd.fail.is_none() && x.expired.is_cancelled() {
                                closing = Some("export switched");
                                break;
                            }
                        }
                        batch.run(cmd, &nexus);
                    }
                    Event::SendTargets { itt, query } => {
                        let visible: Vec<TargetEntry> = shared
                            .all_exports()
                            .into_iter()
                            .filter(|r| shared.rules.visible(r, &session.params().initiator_name, peer.ip()))
                            .map(|r| TargetEntry { name: target_name(&r), addresses: vec![portal.to_string()] })
                            .collect();
                        let current = export.as_ref().map(|x| target_name(&x.reference));
                        let text = send_targets(&query, &visible, session.params().session_type, current.as_deref());
                        let p = session.send_targets(itt, text);
                        out.push(&p, digests);
                    }
                    Event::Reset => {
                        if let Some(x) = &export {
                            x.lun.lock().unwrap_or_else(|p| p.into_inner()).reset();
                        }
                    }
                    Event::Close(why) => {
                        closing = Some(why);
                        break;
                    }
                }
            }
            if closing.is_some() {
                break;
            }
        }
        batch.finish(&mut session, &mut out, digests);
        drop(batch);
        if !out.is_empty() && out.send(&mut conn.sock).is_err() {
            return "initiator went away";
        }
        if let Some(why) = closing {
            return why;
        }
        if export.as_ref().is_some_and(|x| x.close.is_cancelled()) {
            return "export switched (rewind, refresh or delete)";
        }
        if shutdown.is_cancelled() {
            return "daemon shutting down";
        }
        match conn.fill() {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return "initiator closed",
            Err(_) => return "read failed",
        }
    }
}

/// PDUs waiting to be sent: headers and small data are copied together, large data segments
/// (read data) are queued as they are and go out with one vectored write.
#[derive(Default)]
struct Out {
    parts: Vec<Bytes>,
    small: Vec<u8>,
}

impl Out {
    fn push(&mut self, p: &Pdu, digests: Digests) {
        match p.encode_parts(digests) {
            Ok((head, data, tail)) => {
                self.small.extend_from_slice(&head);
                if data.len() >= 4096 {
                    self.parts.push(Bytes::from(std::mem::take(&mut self.small)));
                    self.parts.push(data);
                } else {
                    self.small.extend_from_slice(&data);
                }
                self.small.extend_from_slice(&tail);
            }
            Err(e) => tracing::error!(error = %e, "cannot encode an iSCSI PDU"),
        }
    }

    fn is_empty(&self) -> bool {
        self.parts.is_empty() && self.small.is_empty()
    }

    /// Writes everything queued, then empties the queue.
    fn send(&mut self, sock: &mut TcpStream) -> std::io::Result<()> {
        if !self.small.is_empty() {
            self.parts.push(Bytes::from(std::mem::take(&mut self.small)));
        }
        let mut slices: Vec<std::io::IoSlice<'_>> = self.parts.iter().map(|b| std::io::IoSlice::new(b)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = sock.write_vectored(rest)?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            std::io::IoSlice::advance_slices(&mut rest, n);
        }
        drop(slices);
        self.parts.clear();
        Ok(())
    }
}

/// The commands of one read from the socket: they run in order under the LUN's lock, their
/// writes are committed together (one group commit) before anything else touches the volume,
/// and their answers are built once those writes are done, so a failed write still fails its
/// command.
struct Batch<'a> {
    store: &'a Store,
    export: Option<&'a Export>,
    dev: Option<VolumeLun<'a>>,
    state: Option<std::sync::MutexGuard<'a, LunState>>,
    pending: Vec<(Command, Option<ScsiOutcome>, std::ops::Range<usize>)>,
}

impl<'a> Batch<'a> {
    fn new(store: &'a Store, export: Option<&'a Export>) -> Batch<'a> {
        Batch { store, export, dev: None, state: None, pending: Vec::new() }
    }

    fn run(&mut self, cmd: Command, nexus: &str) {
        let Some(x) = self.export.filter(|_| cmd.fail.is_none()) else {
            self.pending.push((cmd, None, 0..0));
            return;
        };
        let dev = self.dev.get_or_insert_with(|| VolumeLun::new(self.store, &x.reference));
        let state = self.state.get_or_insert_with(|| x.lun.lock().unwrap_or_else(|p| p.into_inner()));
        let start = dev.writes();
        let o = scsi::execute(&cmd.cdb, &cmd.data_out, cmd.lun, nexus, dev, state);
        let end = dev.writes();
        self.pending.push((cmd, Some(o), start..end));
    }

    /// Commits the batch's writes and appends every pending command's answer to `out`.
    fn finish(&mut self, session: &mut Session, out: &mut Out, digests: Digests) {
        if let Some(dev) = &self.dev {
            let _ = dev.commit();
        }
        for (cmd, mut outcome, writes) in self.pending.drain(..) {
            if let Some(e) = self.dev.as_ref().and_then(|d| d.failure(writes)) {
                outcome = Some(scsi::failed_write(e));
            }
            if let Some(sense) = outcome.as_ref().and_then(|o| o.sense.as_ref()) {
                let key = format!("{:#04x}", sense.key);
                self.store.metrics.iscsi_check_conditions.with_label_values(&[&key]).inc();
            }
            for p in session.complete(cmd, outcome) {
                out.push(&p, digests);
            }
        }
        self.state = None;
    }
}

/// A volume or snapshot as the SCSI model's [`Backend`]. Writes are queued and committed
/// together ([`VolumeLun::commit`]) before any other operation, so the model always sees its
/// own writes.
struct VolumeLun<'a> {
    store: &'a Store,
    reference: &'a str,
    blocks: u64,
    read_only: bool,
    queued: RefCell<Vec<(String, u64, Bytes)>>,
    /// One entry per committed write: its error, if it failed.
    results: RefCell<Vec<Option<BackendError>>>,
}

impl<'a> VolumeLun<'a> {
    fn new(store: &'a Store, reference: &'a str) -> VolumeLun<'a> {
        let (blocks, read_only) = match store.catalog().target(reference) {
            Ok(t) => (t.size_bytes / u64::from(scsi::LOGICAL_BLOCK_SIZE), t.read_only),
            Err(_) => (0, true),
        };
        VolumeLun { store, reference, blocks, read_only, queued: RefCell::default(), results: RefCell::default() }
    }

    /// Writes queued or committed so far (indexes for [`VolumeLun::failure`]).
    fn writes(&self) -> usize {
        self.results.borrow().len() + self.queued.borrow().len()
    }

    /// Commits the queued writes as one group; `Err` if any of them failed.
    fn commit(&self) -> Result<(), BackendError> {
        let queued = std::mem::take(&mut *self.queued.borrow_mut());
        if queued.is_empty() {
            return Ok(());
        }
        let mut first = None;
        let mut results = self.results.borrow_mut();
        for r in self.store.write_many(queued) {
            let e = r.err().map(|e| backend_error(&e));
            first = first.or(e);
            results.push(e);
        }
        first.map_or(Ok(()), Err)
    }

    /// The first failure among the writes with these indexes.
    fn failure(&self, writes: std::ops::Range<usize>) -> Option<BackendError> {
        self.results.borrow().get(writes).and_then(|r| r.iter().flatten().next().copied())
    }
}

fn backend_error(e: &StoreError) -> BackendError {
    match e {
        e if crate::store::is_enospc(e) => BackendError::NoSpace,
        StoreError::Catalog(catalog::CatalogError::ReadOnly(_)) => BackendError::ReadOnly,
        _ => {
            tracing::warn!(error = %e, "iSCSI I/O failed");
            BackendError::Io
        }
    }
}

const LB: u64 = scsi::LOGICAL_BLOCK_SIZE as u64;

impl Backend for VolumeLun<'_> {
    fn read(&self, lba: u64, _blocks: u32, buf: &mut [u8]) -> Result<(), BackendError> {
        // A failed queued write fails its own command; the read goes on.
        let _ = self.commit();
        self.store.read(self.reference, lba * LB, buf).map_err(|e| backend_error(&e))
    }

    fn write(&self, lba: u64, data: &[u8]) -> Result<(), BackendError> {
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        self.queued.borrow_mut().push((self.reference.to_string(), lba * LB, Bytes::copy_from_slice(data)));
        Ok(())
    }

    fn flush(&self) -> Result<(), BackendError> {
        self.commit()?;
        self.store.flush().map_err(|e| backend_error(&e))
    }

    fn unmap(&self, ranges: &[(u64, u32)]) -> Result<(), BackendError> {
        let _ = self.commit();
        for &(lba, blocks) in ranges {
            self.store.zero_range(self.reference, lba * LB, u64::from(blocks) * LB).map_err(|e| backend_error(&e))?;
        }
        Ok(())
    }

    fn block_status(&self, lba: u64) -> Result<(bool, u64), BackendError> {
        let _ = self.commit();
        let off = lba * LB;
        let len = (self.blocks - lba.min(self.blocks)) * LB;
        let runs = self.store.block_status(self.reference, off, len, 1 << 30).map_err(|e| backend_error(&e))?;
        let Some(&(run, state)) = runs.first() else { return Ok((false, 1)) };
        Ok((state == BlockState::Data, (run / LB).max(1)))
    }

    fn capacity_blocks(&self) -> u64 {
        self.blocks
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
}
