//! The full feature phase of one connection (RFC 7143 §3.2-§4, §11): after a successful
//! login, every PDU the initiator sends goes through [`Session::handle`], which answers with
//! [`Event`]s: PDUs to send, SCSI commands ready to run, discovery queries, or a close.
//!
//! What the session owns:
//! - **Numbering**: StatSN (advanced once per status-bearing PDU), the CmdSN window
//!   (ExpCmdSN .. MaxCmdSN, serial-number arithmetic). Non-immediate requests are delivered in
//!   CmdSN order; one ahead of a gap waits (bounded by the window); one outside the window is
//!   silently dropped (§4.2.2.1). Immediate requests are delivered at once.
//! - **Write data**: immediate data, unsolicited Data-Out up to FirstBurstLength (when
//!   InitialR2T=No), then one R2T at a time for MaxBurstLength-sized bursts. Data must arrive
//!   in order (DataPDUInOrder and DataSequenceInOrder are always Yes): a wrong DataSN, a
//!   wrong offset or data past a burst fails the command with ABORTED COMMAND / DATA PHASE
//!   ERROR once its sequence ends, and the connection carries on.
//! - **Residuals**: a write whose CDB asks for more than the Expected Data Transfer Length
//!   writes the whole blocks the initiator sends and reports an overflow (other commands fail
//!   with INVALID FIELD IN INFORMATION UNIT); one asking for less takes the bytes it asked
//!   for and reports an underflow. Reads send at most the EDTL
//!   and report the difference either way.
//! - **Data-In**: split at the initiator's MaxRecvDataSegmentLength, sequences closed (F bit)
//!   every MaxBurstLength, status folded into the last Data-In when it is GOOD.
//! - **Task management**: ABORT TASK and ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET,
//!   TARGET WARM and COLD RESET drop the matching commands still collecting data (commands
//!   that are running finish first: the caller runs them to completion before it handles the
//!   next PDU). CLEAR ACA is not supported (no ACA), TASK REASSIGN needs ErrorRecoveryLevel 2.
//! - NOP-Out pings, text requests (`SendTargets`, continued with the C bit when the answer is
//!   longer than one PDU), logout, and Rejects for SNACK and stray PDUs.
//!
//! Invariants: no input can make it panic; buffered write data is bounded by
//! [`MAX_BUFFERED`] and the writes collecting data by [`MAX_TRANSFERS`] per connection; every
//! non-immediate request inside the window is answered exactly once (or dropped by a task
//! management function, as SAM allows).

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

use crate::keys::{encode_text, parse_text, SessionParams, SessionType};
use crate::pdu::{
    DataIn, LogoutResponse, NopIn, Pdu, R2t, Reject, ScsiCommand, ScsiResponse, TaskMgmtResponse, TextResponse,
};
use crate::scsi::{self, status, ScsiOutcome, Sense};
use crate::{reject_reason, Bhs};

/// The reserved tag value (ITT or TTT "not used").
pub const NO_TAG: u32 = 0xffff_ffff;
/// Largest amount of write data one connection may hold while collecting (256 MiB); past it
/// the connection is closed.
pub const MAX_BUFFERED: usize = 256 << 20;

/// Largest number of writes one connection may have collecting data at once; past it the
/// connection is closed (the CmdSN window moves on when a command arrives, not when it ends).
pub const MAX_TRANSFERS: usize = 1024;

/// Task management function codes (RFC 7143 §11.5.1).
pub mod tmf {
    /// ABORT TASK.
    pub const ABORT_TASK: u8 = 1;
    /// ABORT TASK SET.
    pub const ABORT_TASK_SET: u8 = 2;
    /// CLEAR ACA.
    pub const CLEAR_ACA: u8 = 3;
    /// CLEAR TASK SET.
    pub const CLEAR_TASK_SET: u8 = 4;
    /// LOGICAL UNIT RESET.
    pub const LOGICAL_UNIT_RESET: u8 = 5;
    /// TARGET WARM RESET.
    pub const TARGET_WARM_RESET: u8 = 6;
    /// TARGET COLD RESET.
    pub const TARGET_COLD_RESET: u8 = 7;
    /// TASK REASSIGN.
    pub const TASK_REASSIGN: u8 = 8;

    /// Function complete.
    pub const COMPLETE: u8 = 0;
    /// Task does not exist.
    pub const NO_TASK: u8 = 1;
    /// LUN does not exist.
    pub const NO_LUN: u8 = 2;
    /// Task allegiance reassignment not supported.
    pub const REASSIGN_NOT_SUPPORTED: u8 = 4;
    /// Task management function not supported.
    pub const NOT_SUPPORTED: u8 = 5;
}

/// A SCSI command whose data-out has been collected, for the caller to run with
/// [`scsi::execute`] (or to answer at once when `fail` is set) and hand back to
/// [`Session::complete`].
#[derive(Debug, Clone)]
pub struct Command {
    /// Initiator Task Tag.
    pub itt: u32,
    /// LUN (the SAM LUN field decoded to a number).
    pub lun: u64,
    /// The whole CDB.
    pub cdb: Vec<u8>,
    /// The data-out bytes the CDB asked for (or fewer, if the initiator sent fewer).
    pub data_out: Bytes,
    /// Expected Data Transfer Length from the command PDU.
    pub edtl: u32,
    /// The R bit: the initiator accepts Data-In.
    pub read: bool,
    /// Residual of a write: (overflow, count), decided when the command arrived.
    write_residual: Option<(bool, u32)>,
    /// Set when the command fails without running (bad transfer length, CDB refused).
    pub fail: Option<Sense>,
    /// R2Ts sent for this command (the SCSI Response's ExpDataSN).
    r2ts: u32,
}

/// The residual a command reports: more data than the initiator expected (overflow) or
/// less (underflow), and by how many bytes.
#[derive(Debug, Clone, Copy)]
struct Residual {
    overflow: bool,
    underflow: bool,
    count: u32,
}

/// What the caller does next.
#[derive(Debug, Clone)]
pub enum Event {
    /// Send this PDU.
    Send(Pdu),
    /// Run this command, then call [`Session::complete`] and send what it returns.
    Run(Command),
    /// Answer `SendTargets=<query>`: compute the visible targets and call
    /// [`Session::send_targets`].
    SendTargets {
        /// Initiator Task Tag of the Text Request.
        itt: u32,
        /// The value of the key (`All`, a target name or empty).
        query: String,
    },
    /// A LUN or target reset: SPC-2 reservations end.
    Reset,
    /// Close the connection (after sending everything before this event).
    Close(&'static str),
}

/// A write collecting its data.
#[derive(Debug)]
struct Transfer {
    cmd: Command,
    buf: Vec<u8>,
    /// Bytes to collect before running: min(EDTL, bytes the CDB takes), or 0 when failing.
    limit: u32,
    /// Unsolicited Data-Out still to come (the command's F bit was clear).
    unsolicited: bool,
    /// Next expected DataSN in the current sequence.
    data_sn: u32,
    /// The outstanding R2T: its TTT and the end offset of its burst.
    r2t: Option<(u32, u32)>,
    /// A Data-Out was out of sequence: the rest is drained and the command fails.
    broken: bool,
}

/// One connection's full feature phase.
#[derive(Debug)]
pub struct Session {
    params: SessionParams,
    stat_sn: u32,
    exp_cmd_sn: u32,
    window: u32,
    /// Non-immediate requests that arrived ahead of a gap, by CmdSN.
    waiting: BTreeMap<u32, Pdu>,
    transfers: HashMap<u32, Transfer>,
    buffered: usize,
    next_ttt: u32,
    /// A text answer too long for one PDU: ITT, TTT and the rest.
    text_rest: Option<(u32, u32, Bytes)>,
    /// Text of a request continued with the C bit.
    text_in: Vec<u8>,
    /// The LUN behind the session cannot be written.
    read_only: bool,
}

/// The BHS of `pdu` as it was on the wire, lengths included (a Reject returns it whole).
fn wire_header(pdu: &Pdu) -> [u8; 48] {
    let mut h = pdu.bhs.to_bytes();
    let ahs: usize = pdu.ahs.iter().map(|a| (3 + a.data.len()).div_ceil(4)).sum();
    h[4] = u8::try_from(ahs).unwrap_or(u8::MAX);
    let len = u32::try_from(pdu.data.len()).unwrap_or(u32::MAX).min(0x00ff_ffff);
    h[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
    h
}

/// RFC 1982 serial number comparison: `a < b`.
fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < (1 << 31)
}

impl Session {
    /// The full feature phase after a login that ended with `params` (whose `stat_sn` and
    /// `exp_cmd_sn` continue the login's numbering). `window` is the number of commands the
    /// initiator may have outstanding (MaxCmdSN = ExpCmdSN + window - 1).
    pub fn new(params: SessionParams, window: u32) -> Session {
        Session {
            stat_sn: params.stat_sn,
            exp_cmd_sn: params.exp_cmd_sn,
            window: window.max(1),
            params,
            waiting: BTreeMap::new(),
            transfers: HashMap::new(),
            buffered: 0,
            next_ttt: 1,
            text_rest: None,
            text_in: Vec::new(),
            read_only: false,
        }
    }

    /// Tells the session its LUN is read-only (a snapshot export): write commands then get
    /// the model's WRITE PROTECTED before any check of their data length. Software Write
    /// Protect (set by MODE SELECT, in the LUN's shared state) is the model's alone: under it a
    /// write whose data length does not fit its CDB fails on the length first.
    pub fn set_read_only(&mut self, read_only: bool) {
        self.read_only = read_only;
    }

    /// The negotiated parameters.
    pub fn params(&self) -> &SessionParams {
        &self.params
    }

    /// The I_T nexus name persistent reservations are keyed by: initiator name and ISID.
    pub fn nexus(&self) -> String {
        let isid: String = self.params.isid.iter().map(|b| format!("{b:02x}")).collect();
        format!("{},i,0x{isid}", self.params.initiator_name)
    }

    fn max_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn.wrapping_add(self.window - 1)
    }

    /// Takes the next StatSN.
    fn next_stat(&mut self) -> u32 {
        let s = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        s
    }

    /// Commands still collecting data.
    pub fn pending_transfers(&self) -> usize {
        self.transfers.len()
    }

    /// Handles one PDU from the initiator.
    pub fn handle(&mut self, pdu: Pdu) -> Vec<Event> {
        let mut out = Vec::new();
        let (sn, immediate) = match &pdu.bhs {
            Bhs::ScsiCommand(c) => (Some(c.cmd_sn), c.immediate),
            Bhs::TaskMgmtRequest(t) => (Some(t.cmd_sn), t.immediate),
            Bhs::TextRequest(t) => (Some(t.cmd_sn), t.immediate),
            Bhs::LogoutRequest(l) => (Some(l.cmd_sn), l.immediate),
            Bhs::NopOut(n) if n.itt != NO_TAG => (Some(n.cmd_sn), n.immediate),
            _ => (None, true),
        };
        let Some(sn) = sn else {
            self.deliver(pdu, &mut out);
            return out;
        };
        if immediate {
            self.deliver(pdu, &mut out);
            return out;
        }
        if sn == self.exp_cmd_sn {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            self.deliver(pdu, &mut out);
            // Requests that waited for this one.
            while let Some(next) = self.waiting.remove(&self.exp_cmd_sn) {
                self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
                self.deliver(next, &mut out);
            }
        } else if sn_lt(self.exp_cmd_sn, sn) && !sn_lt(self.max_cmd_sn(), sn) {
            self.waiting.insert(sn, pdu);
        }
        // Otherwise outside the window: silently ignored (RFC 7143 §4.2.2.1).
        out
    }

    fn deliver(&mut self, pdu: Pdu, out: &mut Vec<Event>) {
        let Pdu { bhs, ahs: _, data } = &pdu;
        match bhs {
            Bhs::ScsiCommand(c) => {
                let cdb = pdu.cdb().unwrap_or_default();
                self.command(c, cdb, data.clone(), out);
            }
            Bhs::DataOut(d) => self.data_out(d, data.clone(), &pdu, out),
            Bhs::NopOut(n) => {
                if n.itt != NO_TAG {
                    let nop = NopIn {
                        lun: n.lun,
                        itt: n.itt,
                        ttt: NO_TAG,
                        stat_sn: self.next_stat(),
                        exp_cmd_sn: self.exp_cmd_sn,
                        max_cmd_sn: self.max_cmd_sn(),
                    };
                    // Echo at most what the initiator declared it can receive (§11.19).
                    let max = usize::try_from(self.params.max_xmit_data_segment_length).unwrap_or(usize::MAX);
                    out.push(Event::Send(Pdu::with_data(nop, data.slice(..data.len().min(max)))));
                }
                // A NOP-Out with the reserved ITT answers a NOP-In ping of ours; nothing to do.
            }
            Bhs::TaskMgmtRequest(t) => {
                let response = self.task_management(t.function & 0x7f, t.lun, t.referenced_task_tag);
                let r = TaskMgmtResponse {
                    response,
                    itt: t.itt,
                    stat_sn: self.next_stat(),
                    exp_cmd_sn: self.exp_cmd_sn,
                    max_cmd_sn: self.max_cmd_sn(),
                };
                if matches!(
                    t.function & 0x7f,
                    tmf::LOGICAL_UNIT_RESET | tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET
                ) && response == tmf::COMPLETE
                {
                    out.push(Event::Reset);
                }
                out.push(Event::Send(Pdu::new(r)));
                if t.function & 0x7f == tmf::TARGET_COLD_RESET && response == tmf::COMPLETE {
                    out.push(Event::Close("target cold reset"));
                }
            }
            Bhs::TextRequest(t) => self.text(t, data, out),
            Bhs::LogoutRequest(l) => {
                // Reason 2 (remove the connection for recovery) needs ErrorRecoveryLevel 2.
                let response = if l.reason & 0x7f == 2 { 2 } else { 0 };
                let r = LogoutResponse {
                    response,
                    itt: l.itt,
                    stat_sn: self.next_stat(),
                    exp_cmd_sn: self.exp_cmd_sn,
                    max_cmd_sn: self.max_cmd_sn(),
                    time2wait: 0,
                    time2retain: 0,
                };
                out.push(Event::Send(Pdu::new(r)));
                if response == 0 {
                    out.push(Event::Close("logout"));
                }
            }
            Bhs::SnackRequest(_) => out.push(self.reject(reject_reason::PROTOCOL_ERROR, &pdu)),
            Bhs::LoginRequest(_) => out.push(self.reject(reject_reason::PROTOCOL_ERROR, &pdu)),
            _ => out.push(self.reject(reject_reason::PROTOCOL_ERROR, &pdu)),
        }
    }

    /// A Reject of `pdu` with `reason`; the connection carries on.
    fn reject(&mut self, reason: u8, pdu: &Pdu) -> Event {
        Event::Send(self.reject_header(reason, &wire_header(pdu)))
    }

    /// A Reject for a PDU the codec refused (`header` is its BHS), such as a data digest
    /// error or an unknown opcode.
    pub fn reject_header(&mut self, reason: u8, header: &[u8; 48]) -> Pdu {
        let r = Reject {
            reason,
            stat_sn: self.next_stat(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            data_sn: 0,
        };
        Pdu::reject(r, header)
    }

    /// A SCSI Command: run it now if it sends no data, else start its write transfer (its
    /// immediate data first, then R2Ts or unsolicited Data-Out for the rest).
    fn command(&mut self, c: &ScsiCommand, cdb: Vec<u8>, immediate: Bytes, out: &mut Vec<Event>) {
        if self.params.session_type == SessionType::Discovery {
            out.push(Event::Close("SCSI command in a discovery session"));
            return;
        }
        let mut cmd = Command {
            itt: c.itt,
            lun: c.lun,
            cdb,
            data_out: Bytes::new(),
            edtl: c.expected_length,
            read: c.read,
            write_residual: None,
            fail: None,
            r2ts: 0,
        };
        let edtl = if c.write { c.expected_length } else { 0 };
        let limit = self.plan_write(&mut cmd, edtl);
        if !c.write || edtl == 0 {
            if !immediate.is_empty() {
                out.push(Event::Close("immediate data with a command that sends none"));
                return;
            }
            out.push(Event::Run(cmd));
            return;
        }
        let limit = if cmd.fail.is_some() { 0 } else { limit.min(edtl) };
        if let Err(why) = self.check_write_data(c, &immediate, edtl) {
            out.push(Event::Close(why));
            return;
        }
        self.buffered += immediate.len();
        let unsolicited = !c.final_pdu;
        let t = Transfer { cmd, buf: immediate.to_vec(), limit, unsolicited, data_sn: 0, r2t: None, broken: false };
        self.transfers.insert(c.itt, t);
        self.advance(c.itt, out);
    }

    /// How many data-out bytes `cmd` will take of the `edtl` the initiator sends: sets its
    /// failure (bad CDB or transfer length) and its write residual, and shortens the CDB to
    /// whole blocks when it asks for more than comes.
    fn plan_write(&self, cmd: &mut Command, edtl: u32) -> u32 {
        let takes = match scsi::data_out_len(&cmd.cdb) {
            Ok(n) => n,
            Err(sense) => {
                cmd.fail = Some(sense);
                0
            }
        };
        // On a read-only LUN the model answers WRITE PROTECTED first, whatever the length.
        if cmd.fail.is_none() && !self.read_only {
            if let Err(sense) = scsi::check_transfer_length(&cmd.cdb, edtl) {
                cmd.fail = Some(sense);
            }
        }
        let mut limit = takes;
        if cmd.fail.is_none() && takes > edtl {
            // The command asks for more than the initiator will send: write only what comes
            // (whole blocks), report the overflow.
            cmd.write_residual = Some((true, takes - edtl));
            let blocks = edtl / scsi::LOGICAL_BLOCK_SIZE;
            if scsi::set_write_length(&mut cmd.cdb, blocks) {
                limit = blocks * scsi::LOGICAL_BLOCK_SIZE;
            } else if self.read_only {
                // The model refuses it as WRITE PROTECTED first.
                limit = edtl;
            } else {
                cmd.fail = Some(Sense::INVALID_FIELD_IN_INFORMATION_UNIT);
            }
        } else if cmd.fail.is_none() && takes < edtl {
            // More data offered than the command takes: it takes what it asked for.
            cmd.write_residual = Some((false, edtl - takes));
        }
        limit
    }

    /// Whether a write command's data may start: its immediate data and unsolicited Data-Out
    /// within what was negotiated, a free task tag, room in the buffers. `Err` is why the
    /// connection closes.
    fn check_write_data(&self, c: &ScsiCommand, immediate: &Bytes, edtl: u32) -> Result<(), &'static str> {
        let first_burst = self.params.first_burst_length.min(edtl);
        if immediate.len() > usize::try_from(first_burst).unwrap_or(usize::MAX)
            || (!self.params.immediate_data && !immediate.is_empty())
        {
            return Err("immediate data beyond FirstBurstLength");
        }
        if !c.final_pdu && self.params.initial_r2t {
            return Err("unsolicited Data-Out with InitialR2T=Yes");
        }
        if self.transfers.contains_key(&c.itt) {
            return Err("a task tag already in use");
        }
        if self.buffered + immediate.len() > MAX_BUFFERED || self.transfers.len() >= MAX_TRANSFERS {
            return Err("too much write data outstanding");
        }
        Ok(())
    }

    /// After data arrived (or none is coming): send the next R2T or run the command.
    fn advance(&mut self, itt: u32, out: &mut Vec<Event>) {
        let Some(t) = self.transfers.get_mut(&itt) else { return };
        if t.unsolicited || t.r2t.is_some() {
            return;
        }
        let received = u32::try_from(t.buf.len()).unwrap_or(u32::MAX);
        if received < t.limit {
            let len = (t.limit - received).min(self.params.max_burst_length);
            let ttt = self.next_ttt;
            self.next_ttt = self.next_ttt.wrapping_add(1).max(1) & 0x7fff_ffff;
            t.r2t = Some((ttt, received + len));
            t.data_sn = 0;
            let r2t = R2t {
                lun: t.cmd.lun,
                itt,
                ttt,
                stat_sn: self.stat_sn,
                exp_cmd_sn: self.exp_cmd_sn,
                max_cmd_sn: self.exp_cmd_sn.wrapping_add(self.window - 1),
                r2t_sn: t.cmd.r2ts,
                buffer_offset: received,
                desired_length: len,
            };
            t.cmd.r2ts += 1;
            out.push(Event::Send(Pdu::new(r2t)));
            return;
        }
        let Some(mut t) = self.transfers.remove(&itt) else { return };
        self.buffered = self.buffered.saturating_sub(t.buf.len());
        let limit = usize::try_from(t.limit).unwrap_or(usize::MAX);
        t.buf.truncate(limit);
        t.cmd.data_out = Bytes::from(t.buf);
        out.push(Event::Run(t.cmd));
    }

    fn data_out(&mut self, d: &crate::pdu::DataOut, data: Bytes, pdu: &Pdu, out: &mut Vec<Event>) {
        let max_burst = self.params.max_burst_length;
        let first_burst = self.params.first_burst_length;
        let Some(t) = self.transfers.get_mut(&d.itt) else {
            out.push(self.reject(reject_reason::INVALID_PDU_FIELD, pdu));
            return;
        };
        let solicited = d.ttt != NO_TAG;
        let end = match (solicited, t.r2t) {
            (true, Some((ttt, end))) if ttt == d.ttt => Some(end),
            (false, _) if t.unsolicited => Some(first_burst.min(t.cmd.edtl)),
            _ => None,
        };
        let received = u32::try_from(t.buf.len()).unwrap_or(u32::MAX);
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        // A sequence error fails the command (ABORTED COMMAND, DATA PHASE ERROR) but keeps
        // the connection: the rest of the sequence is drained until its F bit.
        let in_sequence = end.is_some_and(|end| {
            d.data_sn == t.data_sn
                && d.buffer_offset == received
                && received.checked_add(len).is_some_and(|e| e <= end)
                && (!solicited || len <= max_burst)
        });
        if !in_sequence {
            t.broken = true;
        }
        if !t.broken {
            if self.buffered + data.len() > MAX_BUFFERED {
                out.push(Event::Close("too much write data outstanding"));
                return;
            }
            self.buffered += data.len();
            t.buf.extend_from_slice(&data);
        }
        t.data_sn = t.data_sn.wrapping_add(1);
        if !d.final_pdu {
            return;
        }
        let short = solicited && end.is_some_and(|end| received + len != end);
        if t.broken || short {
            let Some(mut t) = self.transfers.remove(&d.itt) else { return };
            self.buffered = self.buffered.saturating_sub(t.buf.len());
            t.cmd.fail = Some(Sense::DATA_PHASE_ERROR);
            out.push(Event::Run(t.cmd));
            return;
        }
        if solicited {
            t.r2t = None;
        } else {
            t.unsolicited = false;
        }
        t.data_sn = 0;
        self.advance(d.itt, out);
    }

    /// The PDUs answering a command the caller ran (`outcome` from [`scsi::execute`]; ignored
    /// when `cmd.fail` is set).
    pub fn complete(&mut self, cmd: Command, outcome: Option<ScsiOutcome>) -> Vec<Pdu> {
        let outcome = match (cmd.fail, outcome) {
            (Some(_), _) | (None, None) => ScsiOutcome {
                status: status::CHECK_CONDITION,
                data_in: Vec::new(),
                sense: Some(cmd.fail.unwrap_or(Sense::INVALID_OPCODE)),
            },
            (None, Some(o)) => o,
        };
        let data = Bytes::from(outcome.data_in);
        let edtl_in = if cmd.read { usize::try_from(cmd.edtl).unwrap_or(usize::MAX) } else { 0 };
        let send = data.len().min(edtl_in);
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let residual = match cmd.write_residual {
            Some((over, n)) => Residual { overflow: over, underflow: !over, count: n },
            None if data.len() > edtl_in => {
                Residual { overflow: true, underflow: false, count: count(data.len() - edtl_in) }
            }
            None if data.len() < edtl_in => {
                Residual { overflow: false, underflow: true, count: count(edtl_in - data.len()) }
            }
            None => Residual { overflow: false, underflow: false, count: 0 },
        };
        let good = outcome.status == status::GOOD && outcome.sense.is_none();
        let mut pdus = Vec::new();
        if send > 0 {
            // A good status rides on the last Data-In; otherwise a SCSI Response follows.
            let with_status = good.then_some((outcome.status, residual));
            pdus = self.data_in(&cmd, &data.slice(..send), with_status);
            if good {
                return pdus;
            }
        }
        let data_sn = count(pdus.len());
        let sense = match &outcome.sense {
            Some(s) => crate::pdu::sense_segment(&s.to_fixed()).unwrap_or_default(),
            None => Vec::new(),
        };
        let r = ScsiResponse {
            bidi_overflow: false,
            bidi_underflow: false,
            overflow: residual.overflow,
            underflow: residual.underflow,
            response: 0,
            status: outcome.status,
            itt: cmd.itt,
            snack_tag: 0,
            stat_sn: self.next_stat(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            exp_data_sn: if cmd.read { data_sn } else { cmd.r2ts },
            bidi_residual_count: 0,
            residual_count: residual.count,
        };
        pdus.push(Pdu::with_data(r, sense));
        pdus
    }

    /// The Data-In PDUs carrying `data`, within MaxXmitDataSegmentLength each and never across
    /// a MaxBurstLength boundary. The last one carries `with_status` when given.
    fn data_in(&mut self, cmd: &Command, data: &Bytes, with_status: Option<(u8, Residual)>) -> Vec<Pdu> {
        let send = data.len();
        let seg = usize::try_from(self.params.max_xmit_data_segment_length).unwrap_or(8192).max(512);
        let burst = usize::try_from(self.params.max_burst_length).unwrap_or(usize::MAX).max(seg);
        let mut pdus = Vec::new();
        let mut data_sn = 0u32;
        let mut off = 0usize;
        while off < send {
            // A PDU never crosses a burst boundary; the last one of each burst has F.
            let burst_end = ((off / burst) + 1) * burst;
            let n = seg.min(send - off).min(burst_end - off);
            let last = off + n == send;
            let final_pdu = last || off + n == burst_end;
            let status = with_status.filter(|_| last);
            let residual = status.map(|(_, r)| r);
            let di = DataIn {
                final_pdu,
                ack: false,
                overflow: residual.is_some_and(|r| r.overflow),
                underflow: residual.is_some_and(|r| r.underflow),
                status: status.map(|(s, _)| s),
                lun: cmd.lun,
                itt: cmd.itt,
                ttt: NO_TAG,
                stat_sn: if status.is_some() { self.next_stat() } else { 0 },
                exp_cmd_sn: self.exp_cmd_sn,
                max_cmd_sn: self.max_cmd_sn(),
                data_sn,
                buffer_offset: u32::try_from(off).unwrap_or(u32::MAX),
                residual_count: residual.map_or(0, |r| r.count),
            };
            pdus.push(Pdu::with_data(di, data.slice(off..off + n)));
            data_sn += 1;
            off += n;
        }
        pdus
    }

    fn task_management(&mut self, function: u8, lun: u64, rtt: u32) -> u8 {
        match function {
            tmf::ABORT_TASK => {
                if lun != 0 {
                    return tmf::NO_LUN;
                }
                match self.transfers.remove(&rtt) {
                    Some(t) => {
                        self.buffered = self.buffered.saturating_sub(t.buf.len());
                        tmf::COMPLETE
                    }
                    None => tmf::NO_TASK,
                }
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET | tmf::LOGICAL_UNIT_RESET => {
                if lun != 0 {
                    return tmf::NO_LUN;
                }
                self.drop_transfers();
                tmf::COMPLETE
            }
            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                self.drop_transfers();
                tmf::COMPLETE
            }
            tmf::TASK_REASSIGN => tmf::REASSIGN_NOT_SUPPORTED,
            _ => tmf::NOT_SUPPORTED,
        }
    }

    fn drop_transfers(&mut self) {
        self.transfers.clear();
        self.waiting.retain(|_, p| !matches!(p.bhs, Bhs::ScsiCommand(_)));
        self.buffered = 0;
    }

    fn text(&mut self, t: &crate::pdu::TextRequest, data: &Bytes, out: &mut Vec<Event>) {
        // The continuation of a long answer: an empty request with our TTT.
        if t.ttt != NO_TAG {
            match self.text_rest.take() {
                Some((itt, ttt, rest)) if ttt == t.ttt && itt == t.itt => {
                    let pdu = self.text_chunk(itt, rest);
                    out.push(Event::Send(pdu));
                }
                _ => out.push(Event::Close("Text Request with an unknown target transfer tag")),
            }
            return;
        }
        self.text_rest = None;
        if self.text_in.len() + data.len() > 64 * 1024 {
            out.push(Event::Close("text request too long"));
            return;
        }
        self.text_in.extend_from_slice(data);
        if t.cont {
            // More text follows: acknowledge with an empty response.
            let r = TextResponse {
                final_pdu: false,
                cont: false,
                lun: t.lun,
                itt: t.itt,
                ttt: self.next_ttt,
                stat_sn: self.next_stat(),
                exp_cmd_sn: self.exp_cmd_sn,
                max_cmd_sn: self.max_cmd_sn(),
            };
            out.push(Event::Send(Pdu::new(r)));
            return;
        }
        let text = std::mem::take(&mut self.text_in);
        let pairs = match parse_text(&text) {
            Ok(p) => p,
            Err(_) => {
                let pdu = Pdu::with_data(t.clone(), text);
                out.push(self.reject(reject_reason::PROTOCOL_ERROR, &pdu));
                return;
            }
        };
        let mut answer: Vec<(String, String)> = Vec::new();
        for (k, v) in pairs {
            match k.as_str() {
                "SendTargets" => {
                    out.push(Event::SendTargets { itt: t.itt, query: v });
                    return;
                }
                "MaxRecvDataSegmentLength" => match crate::keys::parse_number(&v) {
                    Some(n) if (512..=0x00ff_ffff).contains(&n) => {
                        self.params.max_xmit_data_segment_length = u32::try_from(n).unwrap_or(8192);
                        answer.push((k, self.params.max_recv_data_segment_length.to_string()));
                    }
                    _ => answer.push((k, "Reject".into())),
                },
                _ => answer.push((k, "NotUnderstood".into())),
            }
        }
        let pdu = self.text_chunk(t.itt, Bytes::from(encode_text(&answer)));
        out.push(Event::Send(pdu));
    }

    /// The Text Response to `SendTargets` with `text` (from [`crate::keys::send_targets`]).
    pub fn send_targets(&mut self, itt: u32, text: Vec<u8>) -> Pdu {
        self.text_chunk(itt, Bytes::from(text))
    }

    /// One Text Response: all of `text`, or as much as fits with the C bit and a TTT to
    /// continue.
    fn text_chunk(&mut self, itt: u32, text: Bytes) -> Pdu {
        let max = usize::try_from(self.params.max_xmit_data_segment_length).unwrap_or(8192).max(512);
        let (now, rest) = if text.len() > max { (text.slice(..max), Some(text.slice(max..))) } else { (text, None) };
        let ttt = match rest {
            Some(rest) => {
                let ttt = self.next_ttt;
                self.next_ttt = self.next_ttt.wrapping_add(1).max(1) & 0x7fff_ffff;
                self.text_rest = Some((itt, ttt, rest));
                ttt
            }
            None => NO_TAG,
        };
        let r = TextResponse {
            final_pdu: ttt == NO_TAG,
            cont: ttt != NO_TAG,
            lun: 0,
            itt,
            ttt,
            stat_sn: self.next_stat(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
        };
        Pdu::with_data(r, now)
    }
}
