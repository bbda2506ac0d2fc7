//! The iSCSI listener: runs the login and the full feature phase of the `forkd-iscsi` crate
//! over each connection and serves every SCSI command from the [`Store`].
//!
//! The life cycle (connection limit, login timeout, span, shutdown and close counting) is
//! [`crate::server::listener`]'s. Each connection runs on its own OS thread with blocking
//! socket I/O, which measured faster than tokio tasks here: each read is decoded into as many
//! PDUs as it holds, the session turns them into commands, the commands run in order against
//! the volume ([`lun`]), and every answer produced by that read goes out in one write
//! ([`full_feature`]). This module is the login and the close reasons.
//!
//! Targets are `iqn.2026-11.dev.forkd:VOLUME` for each clone (LUN 0, read-write) and, when
//! `iscsi_access.snapshots` is set, `…:VOLUME:snap-N` for each snapshot (read-only); who may
//! log in is [`crate::server::iscsi::access`]'s business.
//!
//! Rewind, refresh and delete follow the rule of every export (see [`crate::store::exports`]):
//! the connection answers what it already received, then closes; logins to a fenced target
//! fail with "target not found" for the moment of the switch.
//!
//! Locking: the LUN states (`Shared::luns`) are shared by every session on the same target;
//! a batch of commands holds its LUN's lock while it runs (see [`lun::Batch`]). A session's
//! resets and the end of its I_T nexus change the LUN state before the answer announcing them
//! is sent (see [`full_feature`]). The map's lock is never taken while a LUN's is held.

pub mod access;
mod full_feature;
mod lun;

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iscsi::keys::{SessionParams, SessionType};
use iscsi::login::{ChapNonce, Login, LoginConfig, LoginStep, TargetInfo, Targets};
use iscsi::pdu::decode;
use iscsi::scsi::LunState;
use iscsi::session::Session;
use iscsi::{Digests, Pdu};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use access::{reference_of, AccessRules};
use full_feature::{Export, FullFeature, Input, Out};

use crate::metrics::ConnectionMetrics;
use crate::server::listener::{self, Closed, Cx, Ended, Limits, Protocol, Reason, Socket, Stop, ThreadProtocol};
use crate::store::exports::Denied;
use crate::store::Store;

/// Commands an initiator may have outstanding (the CmdSN window).
const WINDOW: u32 = 128;

/// The iSCSI listener's limits unless the config says otherwise (`[iscsi_limits]`).
pub const DEFAULT_LIMITS: Limits = Limits { max_connections: 256, handshake_timeout: Duration::from_secs(15) };

/// Why an iSCSI connection closed: the `reason` label of
/// `forkd_iscsi_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The life cycle ended it (limit, login timeout, shutdown, setup).
    Ended(Ended),
    /// The initiator hung up (or the read failed) during the login.
    InitiatorClosedDuringLogin,
    /// A PDU during the login that cannot be parsed.
    MalformedLoginPdu,
    /// A PDU after the login machine had finished.
    LoginFinished,
    /// The login was refused (its response says why).
    LoginRefused,
    /// A normal session without a TargetName.
    NoTarget,
    /// The target was deleted between its lookup and the end of the login.
    TargetGone,
    /// The target was being switched (rewind, refresh, delete) at the end of the login.
    TargetFenced,
    /// A PDU that makes the byte stream untrustworthy.
    MalformedPdu,
    /// The session closed it, for this reason (logout, a protocol error, a cold reset).
    Session(&'static str),
    /// A command arrived after the switch it was closed for had gone ahead.
    ExportExpired,
    /// Closed so a rewind, refresh or delete can go ahead.
    ExportSwitched,
    /// Writing to the initiator failed.
    InitiatorWentAway,
    /// The initiator hung up.
    InitiatorClosed,
    /// Reading from the initiator failed.
    ReadFailed,
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
            Close::Ended(Ended::HandshakeTimeout) => "login timed out",
            Close::Ended(Ended::Shutdown) => "daemon shutting down",
            Close::Ended(Ended::SocketSetup) => "socket setup failed",
            Close::Ended(Ended::NoThread) => "cannot start a thread",
            Close::InitiatorClosedDuringLogin => "initiator closed during login",
            Close::MalformedLoginPdu => "malformed PDU during login",
            Close::LoginFinished => "login already finished",
            Close::LoginRefused => "login refused",
            Close::NoTarget => "login without a target",
            Close::TargetGone => "target went away during login",
            Close::TargetFenced => "target fenced",
            Close::MalformedPdu => "malformed PDU",
            Close::Session(why) => why,
            Close::ExportExpired => "export switched",
            Close::ExportSwitched => "export switched (rewind, refresh or delete)",
            Close::InitiatorWentAway => "initiator went away",
            Close::InitiatorClosed => "initiator closed",
            Close::ReadFailed => "read failed",
        }
    }
}

/// Accept iSCSI connections until `shutdown` is cancelled; returns once they have closed
/// (each within [`listener::POLL`] of the shutdown, after answering what it had received) and
/// their threads are joined.
pub async fn serve(
    listener: TcpListener,
    store: Arc<Store>,
    rules: AccessRules,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let shared = Shared { store, rules, luns: Mutex::new(HashMap::new()), next_tsih: AtomicU16::new(1) };
    listener::serve_threads(listener, Arc::new(shared), limits, shutdown).await;
}

/// The state (identity, reservations, mode parameters) of one exported LUN, shared by its
/// sessions, and the identity it was made for.
#[derive(Debug)]
struct SharedLun {
    identity: String,
    state: Arc<Mutex<LunState>>,
}

/// What every connection shares.
#[derive(Debug)]
struct Shared {
    store: Arc<Store>,
    rules: AccessRules,
    /// The state of each exported LUN, by reference.
    luns: Mutex<HashMap<String, SharedLun>>,
    next_tsih: AtomicU16,
}

impl Shared {
    /// The state of the LUN exporting `reference`. A volume deleted and created again under
    /// the same name has another identity and gets a fresh state: nothing of the old volume
    /// (serial number, reservations, Software Write Protect) carries over.
    fn lun(&self, reference: &str, identity: &str) -> Arc<Mutex<LunState>> {
        let mut luns = self.luns.lock().unwrap_or_else(|p| p.into_inner());
        match luns.get(reference) {
            Some(lun) if lun.identity == identity => lun.state.clone(),
            _ => {
                let state = Arc::new(Mutex::new(LunState::new(identity)));
                luns.insert(reference.to_string(), SharedLun { identity: identity.to_string(), state: state.clone() });
                state
            }
        }
    }

    fn tsih(&self) -> u16 {
        loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }

    /// Whether `export` (a reference, or a hook's capability name) is an exported target for
    /// this connection right now: the reference it serves and the identity of its LUN.
    fn exported(&self, export: &str) -> Option<(String, String)> {
        let reference = match self.store.admit_export(export) {
            Ok(r) => r,
            Err(Denied::Refused(why)) => {
                tracing::info!(export, reason = %why, "iSCSI target refused");
                return None;
            }
            Err(Denied::Unknown) => return None,
        };
        if self.store.exports.is_fenced(&reference) {
            return None;
        }
        let cat = self.store.catalog();
        let identity = match reference.split_once('@') {
            None => {
                let v = cat.volume(&reference).ok()?;
                (v.kind == catalog::Kind::Clone).then(|| format!("{}:{}", v.name, v.created_at))
            }
            Some(_) if self.rules.snapshots => {
                let t = cat.target(&reference).ok()?;
                let v = cat.volume(reference.split('@').next().unwrap_or(&reference)).ok()?;
                Some(format!("{}:{}", t.name, v.created_at))
            }
            Some(_) => None,
        }?;
        drop(cat);
        Some((reference, identity))
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
        drop(cat);
        out.retain(|r| !self.store.exports.is_fenced(r) && self.store.admit_export(r).is_ok());
        out
    }

    /// A normal session past its login: register with its target, serve it, let go.
    fn normal(&self, sock: Socket, input: Input, params: SessionParams, cx: &Cx) -> Closed<Close> {
        let Some(export) = params.target_name.as_deref().and_then(reference_of) else {
            return Close::NoTarget.into();
        };
        let Some((reference, identity)) = self.exported(&export) else {
            cx.set_export(&export);
            return Close::TargetGone.into();
        };
        cx.set_export(&reference);
        let Some(guard) = self.store.exports.register(&reference) else { return Close::TargetFenced.into() };
        let lun = self.lun(&reference, &identity);
        let export = Export { reference, lun, close: guard.token.clone(), expired: guard.expired.clone() };
        let mut session = Session::new(params, WINDOW);
        session.set_read_only(self.store.catalog().target(&export.reference).map_or(true, |t| t.read_only));
        // The session ends its I_T nexus itself, before its last answers leave.
        let closed = FullFeature::new(self, Some(&export), session, cx, &sock).run(sock, input);
        drop(guard);
        closed
    }
}

/// The targets a login may name, as this peer sees them.
struct LoginTargets<'a> {
    shared: &'a Shared,
    peer: IpAddr,
}

impl Targets for LoginTargets<'_> {
    fn lookup(&self, name: &str) -> Option<TargetInfo> {
        let (reference, _) = self.shared.exported(&reference_of(name)?)?;
        Some(self.shared.rules.target_info(&reference, self.peer))
    }
}

/// A connection past its login: what was read beyond it and the negotiated parameters.
#[derive(Debug)]
struct LoggedIn {
    input: Input,
    params: SessionParams,
}

impl Protocol for Shared {
    type Close = Close;
    const NAME: &'static str = "iSCSI";

    fn span(peer: SocketAddr) -> tracing::Span {
        tracing::info_span!("iscsi", %peer, export = tracing::field::Empty)
    }

    fn metrics(&self) -> &ConnectionMetrics {
        &self.store.metrics.iscsi_connections
    }

    fn log_closed(closed: &Closed<Close>, _export: &str) {
        let (why, commands, check_conditions) = (closed.reason.label(), closed.requests, closed.errors);
        tracing::info!(why, commands, check_conditions, "iSCSI connection closed");
    }
}

impl ThreadProtocol for Shared {
    type Session = LoggedIn;

    /// The login: PDUs in, responses out, until the login machine is done.
    fn handshake(&self, sock: &mut Socket, cx: &Cx) -> Result<LoggedIn, Close> {
        let config =
            LoginConfig { cmd_window: WINDOW, discovery_chap: self.rules.discovery_chap.clone(), ..Default::default() };
        let mut login = Login::new(config, self.tsih(), nonce());
        let targets = LoginTargets { shared: self, peer: cx.peer.ip() };
        let mut input = Input::new();
        loop {
            let pdu = login_pdu(&mut input, sock)?;
            match login.handle(&pdu, &targets).map_err(|_| Close::LoginFinished)? {
                LoginStep::Continue(reply) => send_login(sock, &reply)?,
                LoginStep::Done(reply, params) => {
                    send_login(sock, &reply)?;
                    return Ok(LoggedIn { input, params: *params });
                }
                LoginStep::Fail(reply) => {
                    let _ = send_login(sock, &reply);
                    return Err(Close::LoginRefused);
                }
            }
        }
    }

    fn serve(&self, sock: Socket, s: LoggedIn, cx: &Cx) -> Closed<Close> {
        match s.params.session_type {
            SessionType::Discovery => {
                FullFeature::new(self, None, Session::new(s.params, WINDOW), cx, &sock).run(sock, s.input)
            }
            SessionType::Normal => self.normal(sock, s.input, s.params, cx),
        }
    }
}

/// The next login PDU, reading as needed.
fn login_pdu(input: &mut Input, sock: &mut Socket) -> Result<Pdu, Close> {
    loop {
        match decode(input.data(), Digests::NONE, Login::login_max_data()) {
            Ok(Some((pdu, n))) => {
                input.consume(n);
                return Ok(pdu);
            }
            Ok(None) => input.fill(sock, None).map_err(|stop| match stop {
                Stop::Ended(e) => Close::Ended(e),
                Stop::Stopped | Stop::Eof | Stop::Failed(_) => Close::InitiatorClosedDuringLogin,
            })?,
            Err(_) => return Err(Close::MalformedLoginPdu),
        }
    }
}

fn send_login(sock: &mut Socket, reply: &Pdu) -> Result<(), Close> {
    let mut out = Out::default();
    out.push(reply, Digests::NONE);
    out.send(sock.stream()).map_err(|_| Close::InitiatorClosedDuringLogin)
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
