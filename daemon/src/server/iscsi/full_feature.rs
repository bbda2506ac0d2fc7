//! The full feature phase of one iSCSI connection, on its own thread.
//!
//! One round per socket read: every PDU the read completed is decoded and handed to the
//! session; the commands it releases run as one [`Batch`] (their writes one group commit);
//! every answer of the round is queued in [`Out`] and leaves in one vectored write. Only then
//! is the socket read again. Answers leave in the order the session produced them, except that
//! a batch's command answers are built when the batch finishes (before any other event of the
//! session is handled, so nothing overtakes them but a Reject of an unreadable PDU).
//!
//! What a session does to its LUN's shared state takes effect before the answer that announces
//! it leaves: a LUN or target reset before its Task Management Response, the end of the I_T
//! nexus ([`LunState::nexus_lost`], which ends its SPC-2 reservation) before the Logout
//! Response. An initiator may act on either answer at once through another session (libiscsi's
//! suite logs out a session holding RESERVE (6) and at once sends PERSISTENT RESERVE IN through
//! another), and that command must not find the old state.

use std::io::Write;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use iscsi::keys::{send_targets, TargetEntry};
use iscsi::pdu::decode;
use iscsi::scsi::LunState;
use iscsi::session::{Event, Session};
use iscsi::{Digests, Disposition, Pdu};
use tokio_util::sync::CancellationToken;

use super::access::target_name;
use super::lun::Batch;
use super::{Close, Shared};
use crate::server::listener::{Closed, Cx, Socket, Stop};

/// A normal session's target.
#[derive(Debug)]
pub(super) struct Export {
    pub(super) reference: String,
    pub(super) lun: Arc<Mutex<LunState>>,
    /// Cancelled when the connection must close for a switch (rewind, refresh, delete).
    pub(super) close: CancellationToken,
    /// Cancelled once the switch stopped waiting: no command may run any more.
    pub(super) expired: CancellationToken,
}

/// A session in its full feature phase: the session machine and what it needs to serve it.
pub(super) struct FullFeature<'a> {
    shared: &'a Shared,
    export: Option<&'a Export>,
    session: Session,
    out: Out,
    digests: Digests,
    max_recv: u32,
    nexus: String,
    peer: IpAddr,
    /// `ADDRESS:PORT,1` of this connection, for SendTargets.
    portal: String,
    commands: u64,
    failed: u64,
    /// [`LunState::nexus_lost`] has been called for this session.
    nexus_ended: bool,
}

impl<'a> FullFeature<'a> {
    pub(super) fn new(
        shared: &'a Shared,
        export: Option<&'a Export>,
        session: Session,
        cx: &Cx,
        sock: &Socket,
    ) -> FullFeature<'a> {
        let params = session.params();
        let (digests, max_recv) = (params.digests(), params.max_recv_data_segment_length);
        let portal = sock.local_addr().map(|a| format!("{a},1")).unwrap_or_default();
        let nexus = session.nexus();
        FullFeature {
            shared,
            export,
            session,
            out: Out::default(),
            digests,
            max_recv,
            nexus,
            peer: cx.peer.ip(),
            portal,
            commands: 0,
            failed: 0,
            nexus_ended: false,
        }
    }

    /// Serve the session until the connection must close.
    pub(super) fn run(mut self, mut sock: Socket, mut input: Input) -> Closed<Close> {
        let stop = self.export.map(|x| &x.close);
        let reason = loop {
            let closing = self.round(&mut input);
            if closing.is_some() {
                // The answers about to leave may end the session (a Logout Response, a cold
                // reset's Task Management Response): the nexus goes first.
                self.end_nexus();
            }
            if !self.out.is_empty() && self.out.send(sock.stream()).is_err() {
                break Close::InitiatorWentAway;
            }
            if let Some(why) = closing {
                break why;
            }
            if let Err(stop) = input.fill(&mut sock, stop) {
                break match stop {
                    Stop::Stopped => Close::ExportSwitched,
                    Stop::Ended(e) => Close::Ended(e),
                    Stop::Eof => Close::InitiatorClosed,
                    Stop::Failed(_) => Close::ReadFailed,
                };
            }
        };
        self.end_nexus();
        Closed { reason, requests: self.commands, errors: self.failed }
    }

    /// The I_T nexus is gone: its SPC-2 reservation ends (once; a later session of the same
    /// initiator and ISID has the same nexus name, so a second call could end its reservation).
    fn end_nexus(&mut self) {
        if let Some(x) = self.export.filter(|_| !self.nexus_ended) {
            x.lun.lock().unwrap_or_else(|p| p.into_inner()).nexus_lost(&self.nexus);
        }
        self.nexus_ended = true;
    }

    /// Handle every complete PDU in the input, run the commands they release and queue every
    /// answer; `Some` when the connection must close after sending them.
    fn round(&mut self, input: &mut Input) -> Option<Close> {
        let shared: &'a Shared = self.shared;
        let mut batch = Batch::new(&shared.store, self.export);
        let closing = self.take_pdus(input, &mut batch);
        self.finish(&mut batch);
        closing
    }

    fn take_pdus(&mut self, input: &mut Input, batch: &mut Batch<'a>) -> Option<Close> {
        loop {
            let pdu = match decode(input.data(), self.digests, self.max_recv) {
                Ok(Some((pdu, n))) => {
                    input.consume(n);
                    pdu
                }
                Ok(None) => return None,
                Err(e) => match e.disposition() {
                    Disposition::Reject { reason, header, skip } => {
                        input.consume(skip);
                        let r = self.session.reject_header(reason, &header);
                        self.out.push(&r, self.digests);
                        continue;
                    }
                    Disposition::Close => return Some(Close::MalformedPdu),
                },
            };
            for ev in self.session.handle(pdu) {
                if let Some(why) = self.event(ev, batch) {
                    return Some(why);
                }
            }
        }
    }

    /// Handle one event of the session; `Some` when the connection must close.
    fn event(&mut self, ev: Event, batch: &mut Batch<'a>) -> Option<Close> {
        if !matches!(ev, Event::Run(_)) {
            // Whatever the event says goes out after the answers of the commands before it.
            self.finish(batch);
        }
        match ev {
            Event::Send(p) => self.out.push(&p, self.digests),
            Event::Run(cmd) => {
                if cmd.fail.is_none() && self.export.is_some_and(|x| x.expired.is_cancelled()) {
                    return Some(Close::ExportExpired);
                }
                self.commands += 1;
                batch.run(cmd, &self.nexus);
            }
            Event::SendTargets { itt, query } => self.send_targets(itt, &query),
            Event::Reset => {
                if let Some(x) = self.export {
                    x.lun.lock().unwrap_or_else(|p| p.into_inner()).reset();
                }
            }
            Event::Close(why) => return Some(Close::Session(why)),
        }
        None
    }

    /// Commit the batch's writes and queue its answers.
    fn finish(&mut self, batch: &mut Batch<'a>) {
        self.failed += batch.finish(&mut self.session, &mut self.out, self.digests);
    }

    /// Answer `SendTargets=<query>` with the targets this initiator may see.
    fn send_targets(&mut self, itt: u32, query: &str) {
        let (shared, initiator) = (self.shared, &self.session.params().initiator_name);
        let visible: Vec<TargetEntry> = shared
            .all_exports()
            .into_iter()
            .filter(|r| shared.rules.visible(r, initiator, self.peer))
            .map(|r| TargetEntry { name: target_name(&r), addresses: vec![self.portal.clone()] })
            .collect();
        let current = self.export.map(|x| target_name(&x.reference));
        let text = send_targets(query, &visible, self.session.params().session_type, current.as_deref());
        let p = self.session.send_targets(itt, text);
        self.out.push(&p, self.digests);
    }
}

/// Bytes read from the socket: `buf[start..end]` is not yet decoded. The buffer is zeroed once
/// and reused, growing only for a PDU larger than it.
#[derive(Debug)]
pub(super) struct Input {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Input {
    pub(super) fn new() -> Input {
        Input { buf: vec![0; 1 << 20], start: 0, end: 0 }
    }

    /// Read more from the socket (see [`Socket::read`] for when it gives up).
    pub(super) fn fill(&mut self, sock: &mut Socket, stop: Option<&CancellationToken>) -> Result<(), Stop> {
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
        self.end += sock.read(&mut self.buf[self.end..], stop)?;
        Ok(())
    }

    /// The bytes not yet decoded.
    pub(super) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Mark `n` bytes as decoded.
    pub(super) fn consume(&mut self, n: usize) {
        self.start += n;
    }
}

/// PDUs waiting to be sent: headers and small data are copied together, large data segments
/// (read data) are queued as they are and go out with one vectored write.
#[derive(Debug, Default)]
pub(super) struct Out {
    parts: Vec<Bytes>,
    small: Vec<u8>,
}

impl Out {
    pub(super) fn push(&mut self, p: &Pdu, digests: Digests) {
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
    pub(super) fn send(&mut self, sock: &mut std::net::TcpStream) -> std::io::Result<()> {
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
