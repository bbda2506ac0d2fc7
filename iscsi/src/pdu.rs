//! The iSCSI PDU codec (RFC 7143 §11): the 48-byte Basic Header Segment (BHS) as one typed
//! struct per opcode, additional header segments (AHS), the data segment with its padding to a
//! 4-byte boundary, and the optional CRC32C header and data digests.
//!
//! A [`Pdu`] owns its header, its AHS list and its data. The fields that describe the layout
//! (TotalAHSLength, DataSegmentLength) are not stored: [`decode`] derives them from the bytes
//! and [`Pdu::encode`] from the AHS list and the data, so they can never disagree. Bits the
//! RFC marks reserved, and bits an opcode fixes (the F bit of a NOP-Out, the I bit of a Login
//! Request, the ITT of a Reject), are ignored when decoding and written as the RFC requires when
//! encoding; so `decode(encode(decode(bytes)))` equals `decode(bytes)` for any input. Each
//! header struct's byte layout is its `Layout` impl, right below its fields; [`Bhs::parse`] and
//! [`Bhs::to_bytes`] only dispatch on the opcode.
//!
//! Both directions are decoded and encoded: the target decodes initiator PDUs and encodes its
//! own, and the tests play the initiator with the same code.

use bytes::Bytes;

use crate::digest::{crc32c, Crc32c, Digests};
use crate::IscsiError;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;

/// The largest DataSegmentLength the 24-bit field can carry.
pub const MAX_DATA_SEGMENT: u32 = 0x00ff_ffff;

/// Opcodes (RFC 7143 §11.1.1).
pub mod opcode {
    /// NOP-Out (initiator).
    pub const NOP_OUT: u8 = 0x00;
    /// SCSI Command (initiator).
    pub const SCSI_COMMAND: u8 = 0x01;
    /// SCSI Task Management Function Request (initiator).
    pub const TASK_MGMT_REQUEST: u8 = 0x02;
    /// Login Request (initiator).
    pub const LOGIN_REQUEST: u8 = 0x03;
    /// Text Request (initiator).
    pub const TEXT_REQUEST: u8 = 0x04;
    /// SCSI Data-Out (initiator).
    pub const DATA_OUT: u8 = 0x05;
    /// Logout Request (initiator).
    pub const LOGOUT_REQUEST: u8 = 0x06;
    /// SNACK Request (initiator).
    pub const SNACK_REQUEST: u8 = 0x10;
    /// NOP-In (target).
    pub const NOP_IN: u8 = 0x20;
    /// SCSI Response (target).
    pub const SCSI_RESPONSE: u8 = 0x21;
    /// SCSI Task Management Function Response (target).
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    /// Login Response (target).
    pub const LOGIN_RESPONSE: u8 = 0x23;
    /// Text Response (target).
    pub const TEXT_RESPONSE: u8 = 0x24;
    /// SCSI Data-In (target).
    pub const DATA_IN: u8 = 0x25;
    /// Logout Response (target).
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    /// Ready To Transfer (target).
    pub const R2T: u8 = 0x31;
    /// Reject (target).
    pub const REJECT: u8 = 0x3f;
}

/// AHS type of an extended CDB (RFC 7143 §11.2.2.3).
pub const AHS_EXTENDED_CDB: u8 = 1;
/// AHS type of the bidirectional read expected data transfer length (§11.2.2.4).
pub const AHS_BIDI_READ_LENGTH: u8 = 2;

/// The reserved "no task" tag (0xffffffff), used as ITT or TTT.
pub const RESERVED_TAG: u32 = 0xffff_ffff;

const F_BIT: u8 = 0x80;
const I_BIT: u8 = 0x40;

/// One additional header segment. `data` is the AHS-specific part (AHSLength bytes, starting
/// with the byte after AHSType), without padding.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ahs {
    /// AHSType.
    pub kind: u8,
    /// AHS-specific bytes.
    pub data: Vec<u8>,
}

impl Ahs {
    /// The extended-CDB AHS carrying the CDB bytes beyond the first 16.
    pub fn extended_cdb(tail: &[u8]) -> Ahs {
        let mut data = Vec::with_capacity(tail.len() + 1);
        data.push(0); // reserved
        data.extend_from_slice(tail);
        Ahs { kind: AHS_EXTENDED_CDB, data }
    }
}

fn get16(h: &[u8; BHS_LEN], at: usize) -> u16 {
    u16::from_be_bytes([h[at], h[at + 1]])
}

fn get32(h: &[u8; BHS_LEN], at: usize) -> u32 {
    u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]])
}

fn get64(h: &[u8; BHS_LEN], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[at..at + 8]);
    u64::from_be_bytes(b)
}

fn put16(h: &mut [u8; BHS_LEN], at: usize, v: u16) {
    h[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn put32(h: &mut [u8; BHS_LEN], at: usize, v: u32) {
    h[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(h: &mut [u8; BHS_LEN], at: usize, v: u64) {
    h[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn bit(b: u8, mask: u8) -> bool {
    b & mask != 0
}

fn flag(on: bool, mask: u8) -> u8 {
    if on {
        mask
    } else {
        0
    }
}

/// One opcode's BHS layout: its fields to and from the 48 header bytes. `read` ignores the
/// layout fields (bytes 4-7) and reserved bits; `write` expects byte 0 to hold the opcode
/// already and leaves the layout fields zero.
trait Layout {
    /// The fields of a BHS whose opcode is this type's.
    fn read(h: &[u8; BHS_LEN]) -> Self;
    /// Writes the fields into `h`, setting the bits this opcode fixes.
    fn write(&self, h: &mut [u8; BHS_LEN]);
}

/// NOP-Out (§11.18).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NopOut {
    /// I bit.
    pub immediate: bool,
    /// LUN.
    pub lun: u64,
    /// Initiator Task Tag (0xffffffff when answering a NOP-In).
    pub itt: u32,
    /// Target Transfer Tag (copied from the NOP-In it answers, else 0xffffffff).
    pub ttt: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
}

impl Layout for NopOut {
    fn read(h: &[u8; BHS_LEN]) -> NopOut {
        let imm = bit(h[0], I_BIT);
        NopOut {
            immediate: imm,
            lun: get64(h, 8),
            itt: get32(h, 16),
            ttt: get32(h, 20),
            cmd_sn: get32(h, 24),
            exp_stat_sn: get32(h, 28),
        }
    }

    fn write(&self, h: &mut [u8; BHS_LEN]) {
        h[0] |= flag(self.immediate, I_BIT);
        h[1] = F_BIT;
        put64(h, 8, self.lun);
        put32(h, 16, self.itt);
        put32(h, 20, self.ttt);
        put32(h, 24, self.cmd_sn);
        put32(h, 28, self.exp_stat_sn);
    }
}

/// SCSI Command (§11.3).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScsiCommand {
    /// I bit.
    pub immediate: bool,
    /// F bit: no unsolicited Data-Out PDUs follow.
    pub final_pdu: bool,
    /// R bit: data will be read from the target.
    pub read: bool,
    /// W bit: data will be written to the target.
    pub write: bool,
    /// Task attributes (3 bits).
    pub attr: u8,
    /// LUN.
    pub lun: u64,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Expected Data Transfer Length.
    pub expected_length: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// The first 16 bytes of the CDB; the rest is in an extended-CDB AHS (see [`Pdu::cdb`]).
    pub cdb: [u8; 16],
}

impl Layout for ScsiCommand {
    fn read(h: &[u8; BHS_LEN]) -> ScsiCommand {
        let imm = bit(h[0], I_BIT);
        let f = h[1];
        let mut cdb = [0u8; 16];
        cdb.copy_from_slice(&h[32..48]);
        ScsiCommand {
            immediate: imm,
            final_pdu: bit(f, F_BIT),
            read: bit(f, 0x40),
            write: bit(f, 0x20),
            attr: f & 0x07,
            lun: get64(h, 8),
            itt: get32(h, 16),
            expected_length: get32(h, 20),
            cmd_sn: get32(h, 24),
            exp_stat_sn: get32(h, 28),
            cdb,
        }
    }

    fn write(&self, h: &mut [u8; BHS_LEN]) {
        h[0] |= flag(self.immediate, I_BIT);
        h[1] = flag(self.final_pdu, F_BIT) | flag(self.read, 0x40) | flag(self.write, 0x20) | (self.attr & 0x07);
        put64(h, 8, self.lun);
        put32(h, 16, self.itt);
        put32(h, 20, self.expected_length);
        put32(h, 24, self.cmd_sn);
        put32(h, 28, self.exp_stat_sn);
        h[32..48].copy_from_slice(&self.cdb);
    }
}

/// SCSI Task Management Function Request (§11.5).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskMgmtRequest {
    /// I bit.
    pub immediate: bool,
    /// Function (7 bits): 1 ABORT TASK, 2 ABORT TASK SET, 5 LOGICAL UNIT RESET, 6 TARGET WARM
    /// RESET, 7 TARGET COLD RESET, ...
    pub function: u8,
    /// LUN.
    pub lun: u64,
    /// Initiator Task Tag of this request.
    pub itt: u32,
    /// Referenced Task Tag (the task to abort).
    pub referenced_task_tag: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// RefCmdSN.
    pub ref_cmd_sn: u32,
    /// ExpDataSN.
    pub exp_data_sn: u32,
}

impl Layout for TaskMgmtRequest {
    fn read(h: &[u8; BHS_LEN]) -> TaskMgmtRequest {
        let imm = bit(h[0], I_BIT);
        let f = h[1];
        TaskMgmtRequest {
            immediate: imm,
            function: f & 0x7f,
            lun: get64(h, 8),
            itt: get32(h, 16),
            referenced_task_tag: get32(h, 20),
            cmd_sn: get32(h, 24),
            exp_stat_sn: get32(h, 28),
            ref_cmd_sn: get32(h, 32),
            exp_data_sn: get32(h, 36),
        }
    }

    fn write(&self, h: &mut [u8; BHS_LEN]) {
        h[0] |= flag(self.immediate, I_BIT);
        h[1] = F_BIT | (self.function & 0x7f);
        put64(h, 8, self.lun);
        put32(h, 16, self.itt);
        put32(h, 20, self.referenced_task_tag);
        put32(h, 24, self.cmd_sn);
        put32(h, 28, self.exp_stat_sn);
        put32(h, 32, self.ref_cmd_sn);
        put32(h, 36, self.exp_data_sn);
    }
}

/// Login Request (§11.12). Always immediate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoginRequest {
    /// T bit: the initiator is ready to go to `nsg`.
    pub transit: bool,
    /// C bit: the text continues in the next PDU.
    pub cont: bool,
    /// Current stage (0 security, 1 operational, 3 full feature phase).
    pub csg: u8,
    /// Next stage.
    pub nsg: u8,
    /// Version-max.
    pub version_max: u8,
    /// Version-min.
    pub version_min: u8,
    /// Initiator part of the session ID.
    pub isid: [u8; 6],
    /// Target-assigned session handle (0 for a new session).
    pub tsih: u16,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Connection ID.
    pub cid: u16,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
}

impl Layout for LoginRequest {
    fn read(h: &[u8; BHS_LEN]) -> LoginRequest {
        let f = h[1];
        let mut isid = [0u8; 6];
        isid.copy_from_slice(&h[8..14]);
        LoginRequest {
            transit: bit(f, 0x80),
            cont: bit(f, 0x40),
            csg: (f >> 2) & 3,
            nsg: f & 3,
            version_max: h[2],
            version_min: h[3],
            isid,
            tsih: get16(h, 14),
            itt: get32(h, 16),
            cid: get16(h, 20),
            cmd_sn: get32(h, 24),
            exp_stat_sn: get32(h, 28),
        }
    }

    fn write(&self, h: &mut [u8; BHS_LEN]) {
        h[0] |= I_BIT;
        h[1] = flag(self.transit, 0x80) | flag(self.cont, 0x40) | ((self.csg & 3) << 2) | (self.nsg & 3);
        h[2] = self.version_max;
        h[3] = self.version_min;
        h[8..14].copy_from_slice(&self.isid);
        put16(h, 14, self.tsih);
        put32(h, 16, self.itt);
        put16(h, 20, self.cid);
        put32(h, 24, self.cmd_sn);
        put32(h, 28, self.exp_stat_sn);
    }
}

/// Text Request (§11.10).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextRequest {
    /// I bit.
    pub immediate: bool,
    /// F bit.
    pub final_pdu: bool,
    /// C bit.
    pub cont: bool,
    /// LUN.
    pub lun: u64,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag.
    pub ttt: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
}

impl Layout for TextRequest {
    fn read(h: &[u8; BHS_LEN]) -> TextRequest {
        let imm = bit(h[0], I_BIT);
        let f = h[1];
        TextRequest {
            immediate: imm,
            final_pdu: bit(f, 0x80),
            cont: bit(f, 0x40),
            lun: get64(h, 8),
            itt: get32(h, 16),
            ttt: get32(h, 20),
            cmd_sn: get32(h, 24),
            exp_stat_sn: get32(h, 28),
        }
    }

    fn write(&self, h: &mut [u8; BHS_LEN]) {
        h[0] |= flag(self.immediate, I_BIT);
        h[1] = flag(self.final_pdu, 0x80) | flag(self.cont, 0x40);
        put64(h, 8, self.lun);
        put32(h, 16, self.itt);
        put32(h, 20, self.ttt);
        put32(h, 24, self.cmd_sn);
        put32(h, 28, self.exp_stat_sn);
    }
}

/// SCSI Data-Out (§11.7).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataOut {
    /// F bit: last PDU of the sequence.
    pub final_pdu: bool,
    /// LUN.
    pub lun: u64,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag (from the R2T, or 0xffffffff for unsolicited data).
    pub ttt: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// DataSN.
    pub data_sn: u32,
    /// Buffer Offset.
    pub buffer_offset: u32,
}

impl Layout for DataOut {
    fn read(h: &[u8; BHS_LEN]) -> DataOut {
        let f = h[1];
        DataOut {
            final_pdu: bit(f, F_BIT),
            lun: get64(h, 8),
            itt: get32(h, 16),
            ttt: get32(h, 20),
            exp_stat_sn: get32(h, 28),
            data_sn: get32(h, 36),
            buffer_offset: get32(h, 40),
        }
    }

    fn write(&self, h: &mut [u8; BHS_LEN]) {
        h[1] = flag(self.final_pdu, F_BIT);
        put64(h, 8, self.lun);
        put32(h, 16, self.itt);
        put32(h, 20, self.ttt);
        put32(h, 28, self.exp_stat_sn);
        put32(h, 36, self.data_sn);
        put32(h, 40, self.buffer_offset);
    }
}

/// Logout Request (§11.14).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogoutRequest {
    /// I bit.
    pub immediate: bool,
    /// Reason code (7 bits): 0 close the session, 1 close the connection, 2 remove the
    /// connection for recovery.
    pub reason: u8,
    /// Initiator Task Tag.
    pub itt: u32,
    /// CID of the connection to close.
    pub cid: u16,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
}

impl Layout for LogoutRequest {
    fn read(h: &[u8; BHS_LEN]) -> LogoutRequest {
        let imm = bit(h[0], I_BIT);
        let f = h[1];
        LogoutRequest {
            immediate: imm,
            reason: f & 0x7f,
            itt: get32(h, 16),
            cid: get16(h, 20),
            cmd_sn: get32(h, 24),
            exp_stat_sn: get32(h, 28),
        }
    }

    fn write(&self, h: &mut [u8; BHS_LEN]) {
        h[0] |= flag(self.immediate, I_BIT);
        h[1] = F_BIT | (self.reason & 0x7f);
        put32(h, 16, self.itt);
        put16(h, 20, self.cid);
        put32(h, 24, self.cmd_sn);
        put32(h, 28, self.exp_stat_sn);
    }
}

/// SNACK Request (§11.16).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnackRequest {
    /// Type (4 bits): 0 Data/R2T, 1 Status, 2 DataACK, 3 R-Data.
    pub kind: u8,
    /// LUN.
    pub lun: u64,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag or SNACK Tag.
    pub ttt: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// BegRun.
    pub beg_run: u32,
    /// RunLength.
    pub run_length: u32,
}

impl Layout for SnackRequest {
    fn read(h: &[u8; BHS_LEN]) -> SnackRequest {
        let f = h[1];
        SnackRequest {
            kind: f & 0x0f,
            lun: get64(h, 8),
            itt: get32(h, 16),
            ttt: get32(h, 20),
            exp_stat_sn: get32(h, 28),
            beg_run: get32(h, 40),
            run_length: get32(h, 44),
        }
    }

    fn write(&self, h: &mut [u8; BHS_LEN]) {
        h[1] = F_BIT | (self.kind & 0x0f);
        put64(h, 8, self.lun);
        put32(h, 16, self.itt);
        put32(h, 20, self.ttt);
        put32(h, 28, self.exp_stat_sn);
        put32(h, 40, self.beg_run);
        put32(h, 44, self.run_length);
    }
}

/// NOP-In (§11.19).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NopIn {
    /// LUN.
    pub lun: u64,
    /// Initiator Task Tag (echoed, or 0xffffffff for a target ping).
    pub itt: u32,
    /// Target Transfer Tag (0xffffffff unless a reply is wanted).
    pub ttt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
}

impl Layout for NopIn {
    fn read(h: &[u8; BHS_LEN]) -> NopIn {
        NopIn {
            lun: get64(h, 8),
            itt: get32(h, 16),
            ttt: get32(h, 20),
            stat_sn: get32(h, 24),
            exp_cmd_sn: get32(h, 28),
            max_cmd_sn: get32(h, 32),
        }
    }

    fn write(&self, h: &mut [u8; BHS_LEN]) {
        h[1] = F_BIT;
        put64(h, 8, self.lun);
        put32(h, 16, self.itt);
        put32(h, 20, self.ttt);
        put32(h, 24, self.stat_sn);
        put32(h, 28, self.exp_cmd_sn);
        put32(h, 32, self.max_cmd_sn);
    }
}

/// SCSI Response (§11.4). The data segment carries SenseLength and sense data (see
/// [`sense_segment`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScsiResponse {
    /// o bit: bidirectional read residual overflow.
    pub bidi_overflow: bool,
    /// u bit: bidirectional read residual underflow.
    pub bidi_underflow: bool,
    /// O bit: residual overflow.
    pub overflow: bool,
    /// U bit: residual underflow.
    pub underflow: bool,
    /// Response (0x00 command completed at target).
    pub response: u8,
    /// SCSI status.
    pub status: u8,
    /// Initiator Task Tag.
    pub itt: u32,
    /// SNACK Tag.
    pub snack_tag: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// ExpDataSN.
    pub exp_data_sn: u32,
    /// Bidirectional Read Residual Count.
    pub bidi_residual_count: u32,
    /// Residual Count.
    pub residual_count: u32,
}

impl Layout for ScsiResponse {
    fn read(h: &[u8; BHS_LEN]) -> ScsiResponse {
        let f = h[1];
        ScsiResponse {
            bidi_overflow: bit(f, 0x10),
            bidi_underflow: bit(f, 0x08),
            overflow: bit(f, 0x04),
            underflow: bit(f, 0x02),
            response: h[2],
            status: h[3],
            itt: get32(h, 16),
            snack_tag: get32(h, 20),
            stat_sn: get32(h, 24),
            exp_cmd_sn: get32(h, 28),
            max_cmd_sn: get32(h, 32),
            exp_data_sn: get32(h, 36),
            bidi_residual_count: get32(h, 40),
            residual_count: get32(h, 44),
        }
    }

    fn write(&self, h: &mut [u8; BHS_LEN]) {
        h[1] = F_BIT
            | flag(self.bidi_overflow, 0x10)
            | flag(self.bidi_underflow, 0x08)
            | flag(self.overflow, 0x04)
            | flag(self.underflow, 0x02);
        h[2] = self.response;
        h[3] = self.status;
        put32(h, 16, self.itt);
        put32(h, 20, self.snack_tag);
        put32(h, 24, self.stat_sn);
        put32(h, 28, self.exp_cmd_sn);
        put32(h, 32, self.max_cmd_sn);
        put32(h, 36, self.exp_data_sn);
        put32(h, 40, self.bidi_residual_count);
        put32(h, 44, self.residual_count);
    }
}

/// SCSI Task Management Function Response (§11.6).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskMgmtResponse {
    /// Response (0 function complete, 1 task does not exist, ...).
    pub response: u8,
    /// Initiator Task Tag.
    pub itt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
}

impl Layout for TaskMgmtResponse {
    fn read(h: &[u8; BHS_LEN]) -> TaskMgmtResponse {
        TaskMgmtResponse {
            response: h[2],
            itt: get32(h, 16),
            stat_sn: get32(h, 24),
            exp_cmd_sn: get32(h, 28),
            max_cmd_sn: get32(h, 32),
        }
    }

    fn write(&self, h: &mut [u8; BHS_LEN]) {
        h[1] = F_BIT;
        h[2] = self.response;
        put32(h, 16, self.itt);
        put32(h, 24, self.stat_sn);
        put32(h, 28, self.exp_cmd_sn);
        put32(h, 32, self.max_cmd_sn);
    }
}

/// Login Response (§11.13).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoginResponse {
    /// T bit.
    pub transit: bool,
    /// C bit.
    pub cont: bool,
    /// Current stage.
    pub csg: u8,
    /// Next stage.
    pub nsg: u8,
    /// Version-max.
    pub version_max: u8,
    /// Version-active.
    pub version_active: u8,
    /// ISID (echoed).
    pub isid: [u8; 6],
    /// TSIH (assigned in the final response of a new session).
    pub tsih: u16,
    /// Initiator Task Tag (echoed).
    pub itt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// Status-Class.
    pub status_class: u8,
    /// Status-Detail.
    pub status_detail: u8,
}

impl Layout for LoginResponse {
    fn read(h: &[u8; BHS_LEN]) -> LoginResponse {
        let f = h[1];
        let mut isid = [0u8; 6];
        isid.copy_from_slice(&h[8..14]);
        LoginResponse {
            transit: bit(f, 0x80),
            cont: bit(f, 0x40),
            csg: (f >> 2) & 3,
            nsg: f & 3,
            version_max: h[2],
            version_active: h[3],
            isid,
            tsih: get16(h, 14),
            itt: get32(h, 16),
            stat_sn: get32(h, 24),
            exp_cmd_sn: get32(h, 28),
            max_cmd_sn: get32(h, 32),
            status_class: h[36],
            status_detail: h[37],
        }
    }

    fn write(&self, h: &mut [u8; BHS_LEN]) {
        h[1] = flag(self.transit, 0x80) | flag(self.cont, 0x40) | ((self.csg & 3) << 2) | (self.nsg & 3);
        h[2] = self.version_max;
        h[3] = self.version_active;
        h[8..14].copy_from_slice(&self.isid);
        put16(h, 14, self.tsih);
        put32(h, 16, self.itt);
        put32(h, 24, self.stat_sn);
        put32(h, 28, self.exp_cmd_sn);
        put32(h, 32, self.max_cmd_sn);
        h[36] = self.status_class;
        h[37] = self.status_detail;
    }
}

/// Text Response (§11.11).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextResponse {
    /// F bit.
    pub final_pdu: bool,
    /// C bit.
    pub cont: bool,
    /// LUN.
    pub lun: u64,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag.
    pub ttt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
}

impl Layout for TextResponse {
    fn read(h: &[u8; BHS_LEN]) -> TextResponse {
        let f = h[1];
        TextResponse {
            final_pdu: bit(f, 0x80),
            cont: bit(f, 0x40),
            lun: get64(h, 8),
            itt: get32(h, 16),
            ttt: get32(h, 20),
            stat_sn: get32(h, 24),
            exp_cmd_sn: get32(h, 28),
            max_cmd_sn: get32(h, 32),
        }
    }

    fn write(&self, h: &mut [u8; BHS_LEN]) {
        h[1] = flag(self.final_pdu, 0x80) | flag(self.cont, 0x40);
        put64(h, 8, self.lun);
        put32(h, 16, self.itt);
        put32(h, 20, self.ttt);
        put32(h, 24, self.stat_sn);
        put32(h, 28, self.exp_cmd_sn);
        put32(h, 32, self.max_cmd_sn);
    }
}

/// SCSI Data-In (§11.7).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataIn {
    /// F bit.
    pub final_pdu: bool,
    /// A bit: the target asks for a DataACK.
    pub ack: bool,
    /// O bit.
    pub overflow: bool,
    /// U bit.
    pub underflow: bool,
    /// S bit and the SCSI status it carries.
    pub status: Option<u8>,
    /// LUN.
    pub lun: u64,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag.
    pub ttt: u32,
    /// StatSN (meaningful only with status).
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// DataSN.
    pub data_sn: u32,
    /// Buffer Offset.
    pub buffer_offset: u32,
    /// Residual Count.
    pub residual_count: u32,
}

impl Layout for DataIn {
    fn read(h: &[u8; BHS_LEN]) -> DataIn {
        let f = h[1];
        DataIn {
            final_pdu: bit(f, 0x80),
            ack: bit(f, 0x40),
            overflow: bit(f, 0x04),
            underflow: bit(f, 0x02),
            status: if bit(f, 0x01) { Some(h[3]) } else { None },
            lun: get64(h, 8),
            itt: get32(h, 16),
            ttt: get32(h, 20),
            stat_sn: get32(h, 24),
            exp_cmd_sn: get32(h, 28),
            max_cmd_sn: get32(h, 32),
            data_sn: get32(h, 36),
            buffer_offset: get32(h, 40),
            residual_count: get32(h, 44),
        }
    }

    fn write(&self, h: &mut [u8; BHS_LEN]) {
        h[1] = flag(self.final_pdu, 0x80)
            | flag(self.ack, 0x40)
            | flag(self.overflow, 0x04)
            | flag(self.underflow, 0x02)
            | flag(self.status.is_some(), 0x01);
        h[3] = self.status.unwrap_or(0);
        put64(h, 8, self.lun);
        put32(h, 16, self.itt);
        put32(h, 20, self.ttt);
        put32(h, 24, self.stat_sn);
        put32(h, 28, self.exp_cmd_sn);
        put32(h, 32, self.max_cmd_sn);
        put32(h, 36, self.data_sn);
        put32(h, 40, self.buffer_offset);
        put32(h, 44, self.residual_count);
    }
}

/// Logout Response (§11.15).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogoutResponse {
    /// Response (0 closed successfully, 1 CID not found, ...).
    pub response: u8,
    /// Initiator Task Tag.
    pub itt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// Time2Wait.
    pub time2wait: u16,
    /// Time2Retain.
    pub time2retain: u16,
}

impl Layout for LogoutResponse {
    fn read(h: &[u8; BHS_LEN]) -> LogoutResponse {
        LogoutResponse {
            response: h[2],
            itt: get32(h, 16),
            stat_sn: get32(h, 24),
            exp_cmd_sn: get32(h, 28),
            max_cmd_sn: get32(h, 32),
            time2wait: get16(h, 40),
            time2retain: get16(h, 42),
        }
    }

    fn write(&self, h: &mut [u8; BHS_LEN]) {
        h[1] = F_BIT;
        h[2] = self.response;
        put32(h, 16, self.itt);
        put32(h, 24, self.stat_sn);
        put32(h, 28, self.exp_cmd_sn);
        put32(h, 32, self.max_cmd_sn);
        put16(h, 40, self.time2wait);
        put16(h, 42, self.time2retain);
    }
}

/// Ready To Transfer (§11.8).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct R2t {
    /// LUN.
    pub lun: u64,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag.
    pub ttt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// R2TSN.
    pub r2t_sn: u32,
    /// Buffer Offset.
    pub buffer_offset: u32,
    /// Desired Data Transfer Length.
    pub desired_length: u32,
}

impl Layout for R2t {
    fn read(h: &[u8; BHS_LEN]) -> R2t {
        R2t {
            lun: get64(h, 8),
            itt: get32(h, 16),
            ttt: get32(h, 20),
            stat_sn: get32(h, 24),
            exp_cmd_sn: get32(h, 28),
            max_cmd_sn: get32(h, 32),
            r2t_sn: get32(h, 36),
            buffer_offset: get32(h, 40),
            desired_length: get32(h, 44),
        }
    }

    fn write(&self, h: &mut [u8; BHS_LEN]) {
        h[1] = F_BIT;
        put64(h, 8, self.lun);
        put32(h, 16, self.itt);
        put32(h, 20, self.ttt);
        put32(h, 24, self.stat_sn);
        put32(h, 28, self.exp_cmd_sn);
        put32(h, 32, self.max_cmd_sn);
        put32(h, 36, self.r2t_sn);
        put32(h, 40, self.buffer_offset);
        put32(h, 44, self.desired_length);
    }
}

/// Reject (§11.17). The ITT is always 0xffffffff; the data segment is the rejected BHS.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reject {
    /// Reason ([`crate::reject_reason`]).
    pub reason: u8,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// DataSN/R2TSN (for a rejected SNACK).
    pub data_sn: u32,
}

impl Layout for Reject {
    fn read(h: &[u8; BHS_LEN]) -> Reject {
        Reject {
            reason: h[2],
            stat_sn: get32(h, 24),
            exp_cmd_sn: get32(h, 28),
            max_cmd_sn: get32(h, 32),
            data_sn: get32(h, 36),
        }
    }

    fn write(&self, h: &mut [u8; BHS_LEN]) {
        h[1] = F_BIT;
        h[2] = self.reason;
        put32(h, 16, RESERVED_TAG);
        put32(h, 24, self.stat_sn);
        put32(h, 28, self.exp_cmd_sn);
        put32(h, 32, self.max_cmd_sn);
        put32(h, 36, self.data_sn);
    }
}

/// The Basic Header Segment of any PDU this crate knows, by opcode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bhs {
    /// 0x00.
    NopOut(NopOut),
    /// 0x01.
    ScsiCommand(ScsiCommand),
    /// 0x02.
    TaskMgmtRequest(TaskMgmtRequest),
    /// 0x03.
    LoginRequest(LoginRequest),
    /// 0x04.
    TextRequest(TextRequest),
    /// 0x05.
    DataOut(DataOut),
    /// 0x06.
    LogoutRequest(LogoutRequest),
    /// 0x10.
    SnackRequest(SnackRequest),
    /// 0x20.
    NopIn(NopIn),
    /// 0x21.
    ScsiResponse(ScsiResponse),
    /// 0x22.
    TaskMgmtResponse(TaskMgmtResponse),
    /// 0x23.
    LoginResponse(LoginResponse),
    /// 0x24.
    TextResponse(TextResponse),
    /// 0x25.
    DataIn(DataIn),
    /// 0x26.
    LogoutResponse(LogoutResponse),
    /// 0x31.
    R2t(R2t),
    /// 0x3f.
    Reject(Reject),
}

macro_rules! from_struct {
    ($($t:ident),*) => {
        $(impl From<$t> for Bhs {
            fn from(v: $t) -> Bhs {
                Bhs::$t(v)
            }
        })*
    };
}
from_struct!(
    NopOut,
    ScsiCommand,
    TaskMgmtRequest,
    LoginRequest,
    TextRequest,
    DataOut,
    LogoutRequest,
    SnackRequest,
    NopIn,
    ScsiResponse,
    TaskMgmtResponse,
    LoginResponse,
    TextResponse,
    DataIn,
    LogoutResponse,
    R2t,
    Reject
);

impl Bhs {
    /// The 6-bit opcode.
    pub fn opcode(&self) -> u8 {
        use opcode::*;
        match self {
            Bhs::NopOut(_) => NOP_OUT,
            Bhs::ScsiCommand(_) => SCSI_COMMAND,
            Bhs::TaskMgmtRequest(_) => TASK_MGMT_REQUEST,
            Bhs::LoginRequest(_) => LOGIN_REQUEST,
            Bhs::TextRequest(_) => TEXT_REQUEST,
            Bhs::DataOut(_) => DATA_OUT,
            Bhs::LogoutRequest(_) => LOGOUT_REQUEST,
            Bhs::SnackRequest(_) => SNACK_REQUEST,
            Bhs::NopIn(_) => NOP_IN,
            Bhs::ScsiResponse(_) => SCSI_RESPONSE,
            Bhs::TaskMgmtResponse(_) => TASK_MGMT_RESPONSE,
            Bhs::LoginResponse(_) => LOGIN_RESPONSE,
            Bhs::TextResponse(_) => TEXT_RESPONSE,
            Bhs::DataIn(_) => DATA_IN,
            Bhs::LogoutResponse(_) => LOGOUT_RESPONSE,
            Bhs::R2t(_) => R2T,
            Bhs::Reject(_) => REJECT,
        }
    }

    /// Whether an initiator sends this PDU (a target must reject the others).
    pub fn from_initiator(&self) -> bool {
        self.opcode() < opcode::NOP_IN
    }

    /// The Initiator Task Tag.
    pub fn itt(&self) -> u32 {
        match self {
            Bhs::NopOut(p) => p.itt,
            Bhs::ScsiCommand(p) => p.itt,
            Bhs::TaskMgmtRequest(p) => p.itt,
            Bhs::LoginRequest(p) => p.itt,
            Bhs::TextRequest(p) => p.itt,
            Bhs::DataOut(p) => p.itt,
            Bhs::LogoutRequest(p) => p.itt,
            Bhs::SnackRequest(p) => p.itt,
            Bhs::NopIn(p) => p.itt,
            Bhs::ScsiResponse(p) => p.itt,
            Bhs::TaskMgmtResponse(p) => p.itt,
            Bhs::LoginResponse(p) => p.itt,
            Bhs::TextResponse(p) => p.itt,
            Bhs::DataIn(p) => p.itt,
            Bhs::LogoutResponse(p) => p.itt,
            Bhs::R2t(p) => p.itt,
            Bhs::Reject(_) => RESERVED_TAG,
        }
    }

    /// Parses a BHS; `None` for an unknown opcode. Layout fields (bytes 4-7) are ignored.
    pub fn parse(h: &[u8; BHS_LEN]) -> Option<Bhs> {
        use opcode::*;
        Some(match h[0] & 0x3f {
            NOP_OUT => Bhs::NopOut(NopOut::read(h)),
            SCSI_COMMAND => Bhs::ScsiCommand(ScsiCommand::read(h)),
            TASK_MGMT_REQUEST => Bhs::TaskMgmtRequest(TaskMgmtRequest::read(h)),
            LOGIN_REQUEST => Bhs::LoginRequest(LoginRequest::read(h)),
            TEXT_REQUEST => Bhs::TextRequest(TextRequest::read(h)),
            DATA_OUT => Bhs::DataOut(DataOut::read(h)),
            LOGOUT_REQUEST => Bhs::LogoutRequest(LogoutRequest::read(h)),
            SNACK_REQUEST => Bhs::SnackRequest(SnackRequest::read(h)),
            NOP_IN => Bhs::NopIn(NopIn::read(h)),
            SCSI_RESPONSE => Bhs::ScsiResponse(ScsiResponse::read(h)),
            TASK_MGMT_RESPONSE => Bhs::TaskMgmtResponse(TaskMgmtResponse::read(h)),
            LOGIN_RESPONSE => Bhs::LoginResponse(LoginResponse::read(h)),
            TEXT_RESPONSE => Bhs::TextResponse(TextResponse::read(h)),
            DATA_IN => Bhs::DataIn(DataIn::read(h)),
            LOGOUT_RESPONSE => Bhs::LogoutResponse(LogoutResponse::read(h)),
            R2T => Bhs::R2t(R2t::read(h)),
            REJECT => Bhs::Reject(Reject::read(h)),
            _ => return None,
        })
    }

    /// Writes the BHS with TotalAHSLength and DataSegmentLength left zero.
    pub fn to_bytes(&self) -> [u8; BHS_LEN] {
        let mut h = [0u8; BHS_LEN];
        h[0] = self.opcode();
        match self {
            Bhs::NopOut(p) => p.write(&mut h),
            Bhs::ScsiCommand(p) => p.write(&mut h),
            Bhs::TaskMgmtRequest(p) => p.write(&mut h),
            Bhs::LoginRequest(p) => p.write(&mut h),
            Bhs::TextRequest(p) => p.write(&mut h),
            Bhs::DataOut(p) => p.write(&mut h),
            Bhs::LogoutRequest(p) => p.write(&mut h),
            Bhs::SnackRequest(p) => p.write(&mut h),
            Bhs::NopIn(p) => p.write(&mut h),
            Bhs::ScsiResponse(p) => p.write(&mut h),
            Bhs::TaskMgmtResponse(p) => p.write(&mut h),
            Bhs::LoginResponse(p) => p.write(&mut h),
            Bhs::TextResponse(p) => p.write(&mut h),
            Bhs::DataIn(p) => p.write(&mut h),
            Bhs::LogoutResponse(p) => p.write(&mut h),
            Bhs::R2t(p) => p.write(&mut h),
            Bhs::Reject(p) => p.write(&mut h),
        }
        h
    }
}

/// One PDU: header, additional header segments and data segment (without padding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    /// The Basic Header Segment.
    pub bhs: Bhs,
    /// Additional header segments, in order.
    pub ahs: Vec<Ahs>,
    /// The data segment, without padding.
    pub data: Bytes,
}

impl Pdu {
    /// A PDU with no AHS and no data.
    pub fn new(bhs: impl Into<Bhs>) -> Pdu {
        Pdu { bhs: bhs.into(), ahs: Vec::new(), data: Bytes::new() }
    }

    /// A PDU with no AHS and the given data segment.
    pub fn with_data(bhs: impl Into<Bhs>, data: impl Into<Bytes>) -> Pdu {
        Pdu { bhs: bhs.into(), ahs: Vec::new(), data: data.into() }
    }

    /// A Reject whose data segment is the rejected PDU's BHS.
    pub fn reject(reject: Reject, header: &[u8; BHS_LEN]) -> Pdu {
        Pdu::with_data(reject, header.to_vec())
    }

    /// The whole CDB of a SCSI Command: the 16 bytes in the BHS followed by any extended-CDB
    /// AHS (whose first byte is reserved). `None` for other opcodes.
    pub fn cdb(&self) -> Option<Vec<u8>> {
        let Bhs::ScsiCommand(cmd) = &self.bhs else { return None };
        let mut cdb = cmd.cdb.to_vec();
        for a in self.ahs.iter().filter(|a| a.kind == AHS_EXTENDED_CDB) {
            cdb.extend_from_slice(a.data.get(1..).unwrap_or(&[]));
        }
        Some(cdb)
    }

    /// The bytes of this PDU on the wire, with padding and the requested digests.
    pub fn encode(&self, digests: Digests) -> Result<Vec<u8>, IscsiError> {
        let (head, data, tail) = self.encode_parts(digests)?;
        let mut out = Vec::with_capacity(head.len() + data.len() + tail.len());
        out.extend_from_slice(&head);
        out.extend_from_slice(&data);
        out.extend_from_slice(&tail);
        Ok(out)
    }

    /// [`Pdu::encode`] in three parts, so a sender can write the data segment without copying
    /// it: the header (BHS, AHS, header digest), the data segment itself, and what follows it
    /// (padding and data digest; empty when there is no data).
    pub fn encode_parts(&self, digests: Digests) -> Result<(Vec<u8>, Bytes, Vec<u8>), IscsiError> {
        let mut h = self.bhs.to_bytes();
        let mut ahs = Vec::new();
        for a in &self.ahs {
            let len = u16::try_from(a.data.len()).map_err(|_| IscsiError::ValueTooLarge("AHSLength"))?;
            ahs.extend_from_slice(&len.to_be_bytes());
            ahs.push(a.kind);
            ahs.extend_from_slice(&a.data);
            while ahs.len() & 3 != 0 {
                ahs.push(0);
            }
        }
        h[4] = u8::try_from(ahs.len() / 4).map_err(|_| IscsiError::ValueTooLarge("TotalAHSLength"))?;
        let dlen = u32::try_from(self.data.len())
            .ok()
            .filter(|&l| l <= MAX_DATA_SEGMENT)
            .ok_or(IscsiError::ValueTooLarge("DataSegmentLength"))?;
        h[5..8].copy_from_slice(&dlen.to_be_bytes()[1..]);

        let mut head = Vec::with_capacity(BHS_LEN + ahs.len() + 4);
        head.extend_from_slice(&h);
        head.extend_from_slice(&ahs);
        if digests.header {
            let d = crc32c(&head);
            head.extend_from_slice(&d.to_le_bytes());
        }
        let mut tail = Vec::new();
        if !self.data.is_empty() {
            let pad = (4 - self.data.len() % 4) % 4;
            tail.resize(pad, 0);
            if digests.data {
                let mut c = crate::digest::Crc32c::new();
                c.update(&self.data);
                c.update(&tail);
                tail.extend_from_slice(&c.finish().to_le_bytes());
            }
        }
        Ok((head, self.data.clone(), tail))
    }
}

/// The data segment of a SCSI Response carrying sense data: SenseLength then the sense bytes.
pub fn sense_segment(sense: &[u8]) -> Result<Vec<u8>, IscsiError> {
    let len = u16::try_from(sense.len()).map_err(|_| IscsiError::ValueTooLarge("SenseLength"))?;
    let mut out = Vec::with_capacity(sense.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(sense);
    Ok(out)
}

fn pad4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

fn parse_ahs(bytes: &[u8]) -> Option<Vec<Ahs>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let head = bytes.get(pos..pos + 3)?;
        let len = usize::from(u16::from_be_bytes([head[0], head[1]]));
        let data = bytes.get(pos + 3..pos + 3 + len)?;
        out.push(Ahs { kind: head[2], data: data.to_vec() });
        pos += pad4(3 + len);
    }
    (pos == bytes.len()).then_some(out)
}

/// Decodes one PDU from the front of `buf`. `Ok(None)`: not enough bytes yet (nothing is
/// consumed). `Ok(Some((pdu, n)))`: the PDU and the `n` bytes it occupied. `max_data` bounds
/// DataSegmentLength (the MaxRecvDataSegmentLength this side declared), so a caller buffers at
/// most `48 + 1020 + 4 + max_data + 3 + 4` bytes. For errors, see
/// [`IscsiError::disposition`].
pub fn decode(buf: &[u8], digests: Digests, max_data: u32) -> Result<Option<(Pdu, usize)>, IscsiError> {
    let Some(head) = buf.get(..BHS_LEN) else { return Ok(None) };
    let mut h = [0u8; BHS_LEN];
    h.copy_from_slice(head);
    let ahs_len = usize::from(h[4]) * 4;
    let data_len = u32::from_be_bytes([0, h[5], h[6], h[7]]);
    if data_len > max_data {
        return Err(IscsiError::DataTooLarge { len: data_len, max: max_data });
    }
    let data_len = usize::try_from(data_len).map_err(|_| IscsiError::DataTooLarge { len: data_len, max: max_data })?;
    let header_end = BHS_LEN + ahs_len;
    let data_start = header_end + if digests.header { 4 } else { 0 };
    let data_end = data_start + pad4(data_len);
    let total = data_end + if digests.data && data_len > 0 { 4 } else { 0 };
    let Some(pdu_bytes) = buf.get(..total) else { return Ok(None) };

    if digests.header {
        let computed = crc32c(&pdu_bytes[..header_end]);
        let d = &pdu_bytes[header_end..data_start];
        let received = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
        if received != computed {
            return Err(IscsiError::HeaderDigest { received, computed });
        }
    }
    if digests.data && data_len > 0 {
        let mut c = Crc32c::new();
        c.update(&pdu_bytes[data_start..data_end]);
        let d = &pdu_bytes[data_end..total];
        if u32::from_le_bytes([d[0], d[1], d[2], d[3]]) != c.finish() {
            return Err(IscsiError::DataDigest { header: Box::new(h), skip: total });
        }
    }
    let Some(bhs) = Bhs::parse(&h) else {
        return Err(IscsiError::UnknownOpcode { opcode: h[0] & 0x3f, header: Box::new(h), skip: total });
    };
    let Some(ahs) = parse_ahs(&pdu_bytes[BHS_LEN..header_end]) else {
        return Err(IscsiError::MalformedAhs { header: Box::new(h), skip: total });
    };
    let data = Bytes::copy_from_slice(&pdu_bytes[data_start..data_start + data_len]);
    Ok(Some((Pdu { bhs, ahs, data }, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login() -> LoginRequest {
        LoginRequest {
            transit: true,
            csg: 1,
            nsg: 3,
            isid: [0x80, 1, 2, 3, 4, 5],
            itt: 7,
            cid: 1,
            cmd_sn: 9,
            exp_stat_sn: 0,
            ..Default::default()
        }
    }

    #[test]
    fn login_request_layout() {
        let pdu = Pdu::with_data(login(), b"a=b\0".to_vec());
        let bytes = pdu.encode(Digests::NONE).unwrap();
        assert_eq!(bytes.len(), 52);
        assert_eq!(bytes[0], 0x43);
        assert_eq!(bytes[1], 0x87);
        assert_eq!(&bytes[5..8], &[0, 0, 4]);
        assert_eq!(decode(&bytes, Digests::NONE, 8192).unwrap(), Some((pdu, 52)));
    }

    #[test]
    fn partial_input_needs_more() {
        let bytes = Pdu::with_data(login(), b"abcde".to_vec()).encode(Digests::BOTH).unwrap();
        assert_eq!(bytes.len(), 48 + 4 + 8 + 4);
        for n in 0..bytes.len() {
            assert_eq!(decode(&bytes[..n], Digests::BOTH, 8192).unwrap(), None);
        }
        assert!(decode(&bytes, Digests::BOTH, 8192).unwrap().is_some());
    }

    #[test]
    fn digest_errors_are_distinct() {
        let mut bytes = Pdu::with_data(login(), b"abcd".to_vec()).encode(Digests::BOTH).unwrap();
        let mut bad_header = bytes.clone();
        bad_header[20] ^= 1;
        assert!(matches!(decode(&bad_header, Digests::BOTH, 8192), Err(IscsiError::HeaderDigest { .. })));
        assert_eq!(decode(&bad_header, Digests::BOTH, 8192).unwrap_err().disposition(), crate::Disposition::Close);
        bytes[53] ^= 1;
        let err = decode(&bytes, Digests::BOTH, 8192).unwrap_err();
        match err.disposition() {
            crate::Disposition::Reject { reason, skip, .. } => {
                assert_eq!(reason, crate::reject_reason::DATA_DIGEST);
                assert_eq!(skip, bytes.len());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn data_over_limit_is_an_error() {
        let bytes = Pdu::with_data(login(), vec![0u8; 100]).encode(Digests::NONE).unwrap();
        assert_eq!(decode(&bytes, Digests::NONE, 99), Err(IscsiError::DataTooLarge { len: 100, max: 99 }));
    }

    #[test]
    fn extended_cdb() {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x7f;
        let cmd = ScsiCommand { final_pdu: true, read: true, itt: 1, cdb, ..Default::default() };
        let tail: Vec<u8> = (0u8..16).collect();
        let pdu = Pdu { bhs: cmd.into(), ahs: vec![Ahs::extended_cdb(&tail)], data: Bytes::new() };
        let bytes = pdu.encode(Digests::NONE).unwrap();
        assert_eq!(bytes[4], 5); // 3 + 17 bytes, padded to 20
        let (back, _) = decode(&bytes, Digests::NONE, 0).unwrap().unwrap();
        assert_eq!(back.cdb().unwrap().len(), 32);
        assert_eq!(back, pdu);
    }

    #[test]
    fn target_pdu_layouts() {
        let din = DataIn {
            final_pdu: true,
            status: Some(0),
            lun: 0,
            itt: 5,
            ttt: RESERVED_TAG,
            stat_sn: 9,
            data_sn: 1,
            buffer_offset: 4096,
            ..Default::default()
        };
        let b = Pdu::with_data(din, vec![0xaa; 512]).encode(Digests::NONE).unwrap();
        assert_eq!(&b[..8], &[0x25, 0x81, 0, 0, 0, 0, 0x02, 0x00]);
        assert_eq!(&b[16..28], &[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 9]);
        assert_eq!(&b[36..44], &[0, 0, 0, 1, 0, 0, 0x10, 0]);
        assert_eq!(b.len(), 48 + 512);

        let r2t = R2t { itt: 1, ttt: 2, r2t_sn: 3, buffer_offset: 4, desired_length: 0x10000, ..Default::default() };
        let b = Pdu::new(r2t).encode(Digests::NONE).unwrap();
        assert_eq!(&b[..2], &[0x31, 0x80]);
        assert_eq!(&b[36..48], &[0, 0, 0, 3, 0, 0, 0, 4, 0, 1, 0, 0]);

        let rsp = ScsiResponse { underflow: true, status: 0x02, residual_count: 7, ..Default::default() };
        let sense = sense_segment(&[0x70, 0, 0x05]).unwrap();
        let b = Pdu::with_data(rsp, sense).encode(Digests::NONE).unwrap();
        assert_eq!(&b[..8], &[0x21, 0x82, 0x00, 0x02, 0, 0, 0, 5]);
        assert_eq!(&b[48..56], &[0, 3, 0x70, 0, 0x05, 0, 0, 0]);
        assert_eq!(&b[44..48], &[0, 0, 0, 7]);

        let lr = LoginResponse { status_class: 2, status_detail: 3, itt: 1, ..Default::default() };
        let b = Pdu::new(lr).encode(Digests::NONE).unwrap();
        assert_eq!(&b[36..38], &[2, 3]);
        assert_eq!(b[0], 0x23);
    }

    #[test]
    fn oversized_values_do_not_encode() {
        let big = Pdu::with_data(NopIn::default(), vec![0u8; 1 << 24]);
        assert_eq!(big.encode(Digests::NONE), Err(IscsiError::ValueTooLarge("DataSegmentLength")));
        let many = Pdu {
            bhs: ScsiCommand::default().into(),
            ahs: vec![Ahs { kind: 1, data: vec![0; 1000] }; 2],
            data: Bytes::new(),
        };
        assert_eq!(many.encode(Digests::NONE), Err(IscsiError::ValueTooLarge("TotalAHSLength")));
    }

    #[test]
    fn unknown_opcode_is_rejected() {
        let mut bytes = Pdu::new(login()).encode(Digests::NONE).unwrap();
        bytes[0] = 0x1c;
        let err = decode(&bytes, Digests::NONE, 0).unwrap_err();
        assert!(matches!(err, IscsiError::UnknownOpcode { opcode: 0x1c, skip: 48, .. }));
    }
}
