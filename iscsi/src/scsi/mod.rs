//! The SCSI block device model (SBC-3 / SPC-4) behind every forkd LUN, with no I/O: a CDB and
//! its data-out bytes go in, a status, data-in bytes and sense data come out. The data itself
//! moves through the daemon's [`Backend`], one volume per LUN; the transport (the iSCSI full
//! feature phase) owns the PDUs, the task tags and the residual counts.
//!
//! How the transport runs one SCSI command:
//!
//! 1. [`data_out_len`] on the CDB says how many bytes the command takes from the initiator
//!    (write data or a parameter list). An `Err(sense)` there fails the command at once with
//!    CHECK CONDITION and that sense, without soliciting data; so does an `Err` from
//!    [`check_transfer_length`], which refuses a write whose Expected Data Transfer Length
//!    differs from what a COMPARE AND WRITE or WRITE SAME CDB describes.
//! 2. Collect those bytes (immediate, unsolicited and R2T-solicited data) and call
//!    [`execute`] with them, the LUN, the I_T nexus id of the session and the LUN's
//!    [`LunState`]. Send `data_in` (truncated to the initiator's expected length, with the
//!    residual), then the status and, for CHECK CONDITION, `sense.to_fixed()` as the sense
//!    data segment.
//! 3. When a session ends, call [`LunState::nexus_lost`]; on a LUN or target reset,
//!    [`LunState::reset`]. Both end SPC-2 (RESERVE / RELEASE) reservations; a reset also
//!    returns the mode parameters (Software Write Protect) to their defaults. Call them before
//!    the answer that announces the end or the reset (the Logout Response, the Task Management
//!    Response) is sent: an initiator may act on it at once through another session.
//!
//! Commands: TEST UNIT READY, REQUEST SENSE, INQUIRY (VPD 00, 80, 83, B0, B1, B2), MODE
//! SENSE / MODE SELECT (6, 10), START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL, READ CAPACITY
//! (10, 16), REPORT LUNS, REPORT SUPPORTED OPERATION CODES, PERSISTENT RESERVE IN / OUT,
//! RESERVE / RELEASE (6, 10), READ DEFECT DATA (10, 12), READ / WRITE (6, 10, 12, 16), WRITE
//! AND VERIFY and VERIFY (10, 12, 16), COMPARE AND WRITE, ORWRITE (16), WRITE ATOMIC (16),
//! WRITE SAME (10, 16), UNMAP, SANITIZE (BLOCK ERASE, EXIT FAILURE MODE), SYNCHRONIZE CACHE and PRE-FETCH (10, 16), GET LBA STATUS.
//! Not implemented: EXTENDED COPY and RECEIVE COPY RESULTS, SANITIZE OVERWRITE and CRYPTO ERASE, the
//! 32-byte CDBs, protection information, removable-medium behaviour.
//!
//! Geometry: 512-byte logical blocks over 4096-byte physical blocks (READ CAPACITY 16 reports
//! a LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT of 3, the block limits page an optimal
//! granularity of 8 blocks). 512-byte logical blocks because every initiator accepts them
//! (Windows before 8 and ESXi before 6.5 refuse 4Kn LUNs, some boot loaders and partitioning
//! tools assume 512), and a 512e device still tells modern initiators to align to 4 KiB, which
//! is forkd's extent granularity. (libiscsi 1.19's GetLBAStatus.UnmapSingle expects the first
//! GET LBA STATUS descriptor at a physical block boundary rather than at the requested LBA, as
//! SBC-4 requires, so it fails against any 512e LUN; reporting exponent 0 would make it pass
//! but skip five provisioning tests that pass now.) The LUN is thin (LBPME, LBPRZ): UNMAP and
//! WRITE SAME with UNMAP free space, and unmapped blocks read as zeros.
//!
//! Write protection: a read-only backend (a snapshot export) and the control mode page's SWP
//! bit, set with MODE SELECT (see `mode`), protect the medium alike: MODE SENSE reports WP and
//! every command that would change the medium (WRITE, WRITE AND VERIFY, WRITE SAME, UNMAP,
//! COMPARE AND WRITE, ORWRITE, WRITE ATOMIC, SANITIZE BLOCK ERASE) fails with DATA PROTECT /
//! WRITE PROTECTED. SYNCHRONIZE CACHE still runs: it only makes completed writes durable.
//!
//! Concurrency: [`execute`] runs one command to completion against the backend (SANITIZE
//! too: it is synchronous, whatever IMMED says). Reservations and mode parameters live in the
//! [`LunState`], which is shared by every session that sees the LUN: the daemon keeps it
//! behind one lock per LUN and holds it for the whole command, which also makes COMPARE AND
//! WRITE and ORWRITE atomic with respect to every other command on the LUN.
//!
//! Invariant: no CDB or data-out bytes can make [`execute`] or [`data_out_len`] panic or
//! allocate more than [`MAX_TRANSFER_BLOCKS`] blocks at once; every failure is a sense code,
//! chosen in exactly one place (`finish`).

mod block;
mod info;
mod mode;
mod pr;
pub mod sense;

pub use sense::{status, Sense};

/// Size in bytes of the logical blocks the initiator addresses.
pub const LOGICAL_BLOCK_SIZE: u32 = 512;
/// log2 of logical blocks per 4096-byte physical block, reported in READ CAPACITY 16.
pub const PHYSICAL_BLOCK_EXPONENT: u8 = 3;
/// Largest READ/WRITE/VERIFY transfer in logical blocks (32 MiB: libiscsi writes 65536 blocks
/// in one WRITE (16) in its WRITE SAME tests); the block limits VPD page
/// reports it, and longer transfers get INVALID FIELD IN CDB.
pub const MAX_TRANSFER_BLOCKS: u32 = 65536;
/// Largest WRITE ATOMIC in logical blocks: any single backend write is atomic, so the same
/// as [`MAX_TRANSFER_BLOCKS`].
pub const MAX_ATOMIC_TRANSFER_BLOCKS: u32 = MAX_TRANSFER_BLOCKS;
/// Largest COMPARE AND WRITE in logical blocks.
pub const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 64;
/// Largest number of logical blocks one UNMAP command may name in total (512 MiB; libiscsi
/// calls an explicit limit over 2^20 insane).
pub const MAX_UNMAP_BLOCKS: u32 = 1 << 20;
/// Largest number of block descriptors in one UNMAP parameter list.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// Largest WRITE SAME in logical blocks (2 GiB).
pub const MAX_WRITE_SAME_BLOCKS: u32 = 1 << 22;
/// Optimal transfer and unmap granularity in logical blocks: one 4 KiB physical block.
pub const OPTIMAL_GRANULARITY_BLOCKS: u16 = 8;

const BLOCK: usize = 512;

/// How a [`Backend`] operation failed. The model turns it into sense data: [`Io`] on a read
/// into MEDIUM ERROR / UNRECOVERED READ ERROR, on a write or flush into MEDIUM ERROR / WRITE
/// ERROR; [`NoSpace`] into DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT; [`ReadOnly`]
/// into DATA PROTECT / WRITE PROTECTED.
///
/// This is the daemon's side of the [`Backend`] contract, not an error of this crate (that is
/// the crate's one error enum); it never reaches a user except as sense data, so it carries
/// no message.
///
/// [`Io`]: BackendError::Io
/// [`NoSpace`]: BackendError::NoSpace
/// [`ReadOnly`]: BackendError::ReadOnly
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendError {
    /// The storage failed.
    Io,
    /// The volume (or the pool under it) has no room for new blocks.
    NoSpace,
    /// The volume cannot be written (for example a snapshot that became read-only).
    ReadOnly,
}

/// The volume behind a LUN, as the daemon exposes it to the model. Addresses and counts are in
/// 512-byte logical blocks; the model checks every range against [`capacity_blocks`] before
/// calling, so a backend never sees an out-of-range request.
///
/// [`capacity_blocks`]: Backend::capacity_blocks
pub trait Backend {
    /// Fills `buf` (exactly `blocks * 512` bytes) with the blocks from `lba`; unmapped blocks
    /// read as zeros.
    fn read(&self, lba: u64, blocks: u32, buf: &mut [u8]) -> Result<(), BackendError>;
    /// Writes `data` (a whole number of blocks) at `lba`, atomically: after a failure or a
    /// crash either all of `data` is there or none of it (WRITE ATOMIC relies on this).
    fn write(&self, lba: u64, data: &[u8]) -> Result<(), BackendError>;
    /// Makes every completed write durable (SYNCHRONIZE CACHE, FUA).
    fn flush(&self) -> Result<(), BackendError>;
    /// Deallocates the `(lba, blocks)` ranges; afterwards they read as zeros (LBPRZ). Ranges
    /// need not be aligned to 4 KiB: the backend zeroes partial physical blocks.
    fn unmap(&self, ranges: &[(u64, u32)]) -> Result<(), BackendError>;
    /// Whether `lba` is mapped, and how many blocks from `lba` on share that status (at least
    /// 1; the model clips it to the capacity). Feeds GET LBA STATUS.
    fn block_status(&self, lba: u64) -> Result<(bool, u64), BackendError>;
    /// Size of the volume in logical blocks.
    fn capacity_blocks(&self) -> u64;
    /// Whether the export is read-only (a snapshot): writes get DATA PROTECT and MODE SENSE
    /// sets WP.
    fn read_only(&self) -> bool;
}

/// The result of one command: the status, the data-in bytes (already truncated to the CDB's
/// allocation length) and, for CHECK CONDITION, the sense data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiOutcome {
    /// [`status::GOOD`], [`status::CHECK_CONDITION`] or [`status::RESERVATION_CONFLICT`].
    pub status: u8,
    /// Bytes for the initiator.
    pub data_in: Vec<u8>,
    /// Set exactly when `status` is CHECK CONDITION.
    pub sense: Option<Sense>,
}

/// Per-LUN state shared by every I_T nexus: the identity reported by INQUIRY, the persistent
/// reservations, the SPC-2 (RESERVE / RELEASE) reservation and the mode parameters (Software
/// Write Protect). Neither reservations nor mode parameters are persisted (APTPL and saving
/// pages are refused), so a daemon restart clears them. The transport must call
/// [`LunState::nexus_lost`] when a session ends and [`LunState::reset`] on a LUN or target
/// reset: an SPC-2 reservation ends with either, and one left behind by a vanished nexus
/// would lock every other initiator out.
#[derive(Debug, Clone)]
pub struct LunState {
    pub(crate) ident: info::Identity,
    pub(crate) pr: pr::PrState,
    pub(crate) mode: mode::ModeParams,
}

impl LunState {
    /// State for a LUN exporting the volume called `volume_id` (its UUID, or a name that stays
    /// the same for the life of the volume): the unit serial number and the NAA and T10 vendor
    /// ID designators are derived from it, so an initiator sees the same identity after a
    /// reconnect or a daemon restart, and multipath tools can tell volumes apart.
    pub fn new(volume_id: &str) -> LunState {
        LunState {
            ident: info::Identity::new(volume_id),
            pr: pr::PrState::default(),
            mode: mode::ModeParams::default(),
        }
    }

    /// The unit serial number reported in VPD page 0x80.
    pub fn serial(&self) -> &str {
        &self.ident.serial
    }

    /// The 8-byte NAA (locally assigned) designator reported in VPD page 0x83.
    pub fn naa(&self) -> [u8; 8] {
        self.ident.naa
    }

    /// Whether Software Write Protect (the control mode page's SWP bit) is set.
    pub fn software_write_protect(&self) -> bool {
        self.mode.swp
    }

    /// The I_T nexus `initiator` (as given to [`execute`]) ended: logout, connection loss or
    /// session reinstatement. Releases its SPC-2 reservation; persistent reservations stay, and
    /// so do the mode parameters (they belong to the logical unit, not to the nexus that set
    /// them).
    pub fn nexus_lost(&mut self, initiator: &str) {
        self.pr.nexus_lost(initiator);
    }

    /// A LOGICAL UNIT RESET, TARGET WARM RESET or TARGET COLD RESET reached the LUN: releases
    /// the SPC-2 reservation (persistent reservations stay, SPC-4 §5.13.11) and returns the
    /// mode parameters to their defaults (no saved values exist), which clears SWP.
    pub fn reset(&mut self) {
        self.pr.reset();
        self.mode = mode::ModeParams::default();
    }
}

/// Internal failure of a command, mapped to the wire by `finish` only.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Failure {
    /// CHECK CONDITION with this sense.
    Check(Sense),
    /// RESERVATION CONFLICT.
    Conflict,
    /// The backend failed while reading (or reporting status).
    Read(BackendError),
    /// The backend failed while writing, unmapping or flushing.
    Write(BackendError),
}

impl From<Sense> for Failure {
    fn from(s: Sense) -> Failure {
        Failure::Check(s)
    }
}

pub(crate) type CmdResult = Result<Vec<u8>, Failure>;

/// Operation codes the model implements.
pub(crate) mod op {
    pub(crate) const TEST_UNIT_READY: u8 = 0x00;
    pub(crate) const REQUEST_SENSE: u8 = 0x03;
    pub(crate) const READ_6: u8 = 0x08;
    pub(crate) const WRITE_6: u8 = 0x0A;
    pub(crate) const INQUIRY: u8 = 0x12;
    pub(crate) const MODE_SELECT_6: u8 = 0x15;
    pub(crate) const MODE_SENSE_6: u8 = 0x1A;
    pub(crate) const RESERVE_6: u8 = 0x16;
    pub(crate) const RELEASE_6: u8 = 0x17;
    pub(crate) const START_STOP_UNIT: u8 = 0x1B;
    pub(crate) const PREVENT_ALLOW: u8 = 0x1E;
    pub(crate) const READ_CAPACITY_10: u8 = 0x25;
    pub(crate) const READ_10: u8 = 0x28;
    pub(crate) const WRITE_10: u8 = 0x2A;
    pub(crate) const WRITE_AND_VERIFY_10: u8 = 0x2E;
    pub(crate) const VERIFY_10: u8 = 0x2F;
    pub(crate) const PRE_FETCH_10: u8 = 0x34;
    pub(crate) const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub(crate) const READ_DEFECT_DATA_10: u8 = 0x37;
    pub(crate) const WRITE_SAME_10: u8 = 0x41;
    pub(crate) const UNMAP: u8 = 0x42;
    pub(crate) const SANITIZE: u8 = 0x48;
    pub(crate) const MODE_SELECT_10: u8 = 0x55;
    pub(crate) const RESERVE_10: u8 = 0x56;
    pub(crate) const RELEASE_10: u8 = 0x57;
    pub(crate) const MODE_SENSE_10: u8 = 0x5A;
    pub(crate) const PERSISTENT_RESERVE_IN: u8 = 0x5E;
    pub(crate) const PERSISTENT_RESERVE_OUT: u8 = 0x5F;
    pub(crate) const READ_16: u8 = 0x88;
    pub(crate) const COMPARE_AND_WRITE: u8 = 0x89;
    pub(crate) const WRITE_16: u8 = 0x8A;
    pub(crate) const ORWRITE_16: u8 = 0x8B;
    pub(crate) const WRITE_AND_VERIFY_16: u8 = 0x8E;
    pub(crate) const VERIFY_16: u8 = 0x8F;
    pub(crate) const PRE_FETCH_16: u8 = 0x90;
    pub(crate) const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub(crate) const WRITE_SAME_16: u8 = 0x93;
    pub(crate) const WRITE_ATOMIC_16: u8 = 0x9C;
    pub(crate) const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub(crate) const REPORT_LUNS: u8 = 0xA0;
    pub(crate) const MAINTENANCE_IN: u8 = 0xA3;
    pub(crate) const READ_12: u8 = 0xA8;
    pub(crate) const WRITE_12: u8 = 0xAA;
    pub(crate) const WRITE_AND_VERIFY_12: u8 = 0xAE;
    pub(crate) const VERIFY_12: u8 = 0xAF;
    pub(crate) const READ_DEFECT_DATA_12: u8 = 0xB7;

    /// SERVICE ACTION IN (16): READ CAPACITY (16).
    pub(crate) const SA_READ_CAPACITY_16: u8 = 0x10;
    /// SERVICE ACTION IN (16): GET LBA STATUS.
    pub(crate) const SA_GET_LBA_STATUS: u8 = 0x12;
    /// MAINTENANCE IN: REPORT SUPPORTED OPERATION CODES.
    pub(crate) const SA_REPORT_SUPPORTED_OPCODES: u8 = 0x0C;
    /// SANITIZE: BLOCK ERASE.
    pub(crate) const SA_SANITIZE_BLOCK_ERASE: u8 = 0x02;
    /// SANITIZE: EXIT FAILURE MODE.
    pub(crate) const SA_SANITIZE_EXIT_FAILURE_MODE: u8 = 0x1F;
}

/// How a command interacts with a persistent reservation held through another I_T nexus
/// (SPC-4 table 47, SBC-3 table 13). SPC-2 reservations have their own, stricter rule (see
/// `pr`), and RESERVE / RELEASE handle persistent reservations themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Allowed under every reservation type (INQUIRY, READ CAPACITY, PR IN/OUT...).
    Always,
    /// Reads the medium or its state: conflicts under Exclusive Access types.
    Read,
    /// Changes the medium or its state: conflicts under every type.
    Write,
}

/// A CDB copied into a zero-padded 16-byte array, so field accessors never index out of
/// bounds. Longer CDBs (extended CDB AHS) are cut: the model implements no command over 16.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cdb(pub(crate) [u8; 16]);

impl Cdb {
    pub(crate) fn new(cdb: &[u8]) -> Cdb {
        let mut c = [0u8; 16];
        let n = cdb.len().min(16);
        c[..n].copy_from_slice(&cdb[..n]);
        Cdb(c)
    }
    pub(crate) fn opcode(&self) -> u8 {
        self.0[0]
    }
    pub(crate) fn sa(&self) -> u8 {
        self.0[1] & 0x1F
    }
    pub(crate) fn b(&self, i: usize) -> u8 {
        self.0.get(i).copied().unwrap_or(0)
    }
    pub(crate) fn u16(&self, i: usize) -> u16 {
        u16::from_be_bytes([self.b(i), self.b(i + 1)])
    }
    pub(crate) fn u24(&self, i: usize) -> u32 {
        u32::from_be_bytes([0, self.b(i), self.b(i + 1), self.b(i + 2)])
    }
    pub(crate) fn u32(&self, i: usize) -> u32 {
        u32::from_be_bytes([self.b(i), self.b(i + 1), self.b(i + 2), self.b(i + 3)])
    }
    pub(crate) fn u64(&self, i: usize) -> u64 {
        (u64::from(self.u32(i)) << 32) | u64::from(self.u32(i + 4))
    }
}

/// Bytes of data-out the command takes from the initiator: write data, the compare-and-write
/// buffer, or a parameter list (its length from the CDB). `Err` for an unknown operation code
/// or a CDB whose transfer is invalid on its face (over [`MAX_TRANSFER_BLOCKS`], reserved
/// BYTCHK); the transport then answers CHECK CONDITION with that sense and solicits nothing.
/// [`execute`] checks the CDB again, fully.
pub fn data_out_len(cdb: &[u8]) -> Result<u32, Sense> {
    if cdb.is_empty() {
        return Err(Sense::INVALID_OPCODE);
    }
    let c = Cdb::new(cdb);
    let blocks = |n: u32| -> Result<u32, Sense> {
        if n > MAX_TRANSFER_BLOCKS {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        Ok(n * LOGICAL_BLOCK_SIZE)
    };
    let verify = |n: u32| -> Result<u32, Sense> {
        match (c.b(1) >> 1) & 3 {
            0 => Ok(0),
            1 => blocks(n),
            3 => Ok(LOGICAL_BLOCK_SIZE),
            _ => Err(Sense::INVALID_FIELD_IN_CDB),
        }
    };
    match c.opcode() {
        op::WRITE_6 => blocks(block::rw6_len(&c)),
        op::WRITE_10 | op::WRITE_AND_VERIFY_10 => blocks(u32::from(c.u16(7))),
        op::WRITE_12 | op::WRITE_AND_VERIFY_12 => blocks(c.u32(6)),
        op::WRITE_16 | op::WRITE_AND_VERIFY_16 | op::ORWRITE_16 => blocks(c.u32(10)),
        op::WRITE_ATOMIC_16 => blocks(u32::from(c.u16(12))),
        op::VERIFY_10 => verify(u32::from(c.u16(7))),
        op::VERIFY_12 => verify(c.u32(6)),
        op::VERIFY_16 => verify(c.u32(10)),
        op::COMPARE_AND_WRITE => {
            if c.b(13) > MAX_COMPARE_AND_WRITE_BLOCKS {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            Ok(2 * u32::from(c.b(13)) * LOGICAL_BLOCK_SIZE)
        }
        op::WRITE_SAME_10 => Ok(LOGICAL_BLOCK_SIZE),
        op::WRITE_SAME_16 => Ok(if c.b(1) & 1 != 0 { 0 } else { LOGICAL_BLOCK_SIZE }),
        op::UNMAP | op::SANITIZE | op::RESERVE_10 | op::RELEASE_10 => Ok(u32::from(c.u16(7))),
        op::MODE_SELECT_6 => Ok(u32::from(c.b(4))),
        op::MODE_SELECT_10 => Ok(u32::from(c.u16(7))),
        op::PERSISTENT_RESERVE_OUT => Ok(c.u32(5)),
        o if info::is_known_opcode(o) => Ok(0),
        _ => Err(Sense::INVALID_OPCODE),
    }
}

/// Whether `edtl`, the initiator's Expected Data Transfer Length for a write, is acceptable for
/// this CDB. COMPARE AND WRITE and WRITE SAME need exactly the bytes their CDB describes (the
/// two buffers; the one block): with any other amount the initiator and the CDB disagree about
/// what the data is, so the transport fails the command with this sense and runs nothing.
/// Every other command takes `min(edtl, data_out_len)` and reports the residual. A COMPARE AND
/// WRITE of zero blocks that comes with data is INVALID FIELD IN CDB: zero transfers nothing,
/// so the NUMBER OF LOGICAL BLOCKS field is what is wrong (libiscsi sends 256 blocks that
/// way, the count wrapped to 0 in its one-byte field).
pub fn check_transfer_length(cdb: &[u8], edtl: u32) -> Result<(), Sense> {
    let c = Cdb::new(cdb);
    let exact = matches!(c.opcode(), op::COMPARE_AND_WRITE | op::WRITE_SAME_10 | op::WRITE_SAME_16);
    match data_out_len(cdb) {
        Ok(n) if exact && n != edtl => {
            if c.opcode() == op::COMPARE_AND_WRITE && n == 0 {
                Err(Sense::INVALID_FIELD_IN_CDB.in_cdb(13, None))
            } else {
                Err(Sense::INVALID_FIELD_IN_INFORMATION_UNIT)
            }
        }
        _ => Ok(()),
    }
}

/// Rewrites the transfer length of a write command (WRITE 6/10/12/16, WRITE AND VERIFY
/// 10/12/16) to `blocks`, so that it writes only what the initiator sends: iSCSI's rule when a
/// command asks for more data than the Expected Data Transfer Length (the data beyond it is
/// neither requested nor written, the response reports the overflow). `false` for other
/// commands, and for WRITE (6) with 0 blocks (its 0 means 256).
pub fn set_write_length(cdb: &mut [u8], blocks: u32) -> bool {
    let Some(&opcode) = cdb.first() else { return false };
    let (at, width) = match opcode {
        op::WRITE_6 if (1..=255).contains(&blocks) && cdb.len() > 4 => {
            cdb[4] = u8::try_from(blocks).unwrap_or(0);
            return true;
        }
        op::WRITE_10 | op::WRITE_AND_VERIFY_10 => (7, 2),
        op::WRITE_12 | op::WRITE_AND_VERIFY_12 => (6, 4),
        op::WRITE_16 | op::WRITE_AND_VERIFY_16 => (10, 4),
        _ => return false,
    };
    let Some(field) = cdb.get_mut(at..at + width) else { return false };
    let bytes = blocks.to_be_bytes();
    if width == 2 && blocks > u32::from(u16::MAX) {
        return false;
    }
    field.copy_from_slice(&bytes[4 - width..]);
    true
}

/// Runs one SCSI command against `dev` for the I_T nexus `initiator` (any string that is
/// unique per I_T nexus, such as the initiator name, the ISID and the target portal group
/// tag; persistent reservations are keyed by it). `lun` is the LUN number decoded from the
/// SAM LUN field; only LUN 0 exists, other LUNs answer INQUIRY with "not connected" and
/// everything else with LOGICAL UNIT NOT SUPPORTED. `data_out` holds the bytes
/// [`data_out_len`] asked for, or everything the initiator sent if that differs: fewer
/// bytes fail the command; extra bytes are ignored, except by WRITE SAME and COMPARE AND
/// WRITE, which fail unless the length is exact.
pub fn execute(
    cdb: &[u8],
    data_out: &[u8],
    lun: u64,
    initiator: &str,
    dev: &dyn Backend,
    state: &mut LunState,
) -> ScsiOutcome {
    finish(run(cdb, data_out, lun, initiator, dev, state))
}

/// The outcome of a command whose write failed after [`execute`] returned: for a transport
/// that commits writes later (in groups) than the command ran. The same sense as a write that
/// failed inside the command.
pub fn failed_write(e: BackendError) -> ScsiOutcome {
    finish(Err(Failure::Write(e)))
}

/// The one place where failures become a status and sense data.
fn finish(result: CmdResult) -> ScsiOutcome {
    let check = |sense: Sense| ScsiOutcome { status: status::CHECK_CONDITION, data_in: Vec::new(), sense: Some(sense) };
    match result {
        Ok(data_in) => ScsiOutcome { status: status::GOOD, data_in, sense: None },
        Err(Failure::Check(sense)) => check(sense),
        Err(Failure::Conflict) => {
            ScsiOutcome { status: status::RESERVATION_CONFLICT, data_in: Vec::new(), sense: None }
        }
        Err(Failure::Read(e) | Failure::Write(e)) if e == BackendError::NoSpace => {
            check(Sense::SPACE_ALLOCATION_FAILED)
        }
        Err(Failure::Read(e) | Failure::Write(e)) if e == BackendError::ReadOnly => check(Sense::WRITE_PROTECTED),
        Err(Failure::Read(_)) => check(Sense::UNRECOVERED_READ_ERROR),
        Err(Failure::Write(_)) => check(Sense::WRITE_ERROR),
    }
}

fn run(cdb: &[u8], data_out: &[u8], lun: u64, initiator: &str, dev: &dyn Backend, state: &mut LunState) -> CmdResult {
    if cdb.is_empty() {
        return Err(Sense::INVALID_OPCODE.into());
    }
    let c = Cdb::new(cdb);
    let access = access(&c)?;
    if lun != 0 {
        match c.opcode() {
            op::INQUIRY => return info::inquiry_absent_lun(&c),
            op::REPORT_LUNS | op::REQUEST_SENSE => {}
            _ => return Err(Sense::LUN_NOT_SUPPORTED.into()),
        }
    }
    if state.pr.conflicts(initiator, &c, access) {
        return Err(Failure::Conflict);
    }
    let protected = WriteProtected { dev, software: state.mode.swp };
    let dev: &dyn Backend = &protected;
    match c.opcode() {
        op::TEST_UNIT_READY => Ok(Vec::new()),
        // LOEJ (eject) makes no sense for non-removable media; a power condition other than
        // 0 makes the device ignore START and LOEJ (SBC-3 §5.25), and there is nothing to
        // start or stop.
        op::START_STOP_UNIT if c.b(4) & 0xF0 == 0 && c.b(4) & 0x02 != 0 => Err(Sense::INVALID_FIELD_IN_CDB.into()),
        op::START_STOP_UNIT => Ok(Vec::new()),
        op::REQUEST_SENSE => info::request_sense(&c),
        op::PREVENT_ALLOW => match c.b(4) & 3 {
            0 | 1 => Ok(Vec::new()),
            _ => Err(Sense::INVALID_FIELD_IN_CDB.into()),
        },
        op::INQUIRY => info::inquiry(&c, state),
        op::READ_CAPACITY_10 => info::read_capacity_10(&c, dev),
        op::MODE_SENSE_6 | op::MODE_SENSE_10 => mode::mode_sense(&c, dev, &state.mode),
        op::MODE_SELECT_6 | op::MODE_SELECT_10 => mode::mode_select(&c, data_out, &mut state.mode),
        op::REPORT_LUNS => info::report_luns(&c),
        op::MAINTENANCE_IN => info::report_supported_opcodes(&c),
        op::SERVICE_ACTION_IN_16 => match c.sa() {
            op::SA_READ_CAPACITY_16 => info::read_capacity_16(&c, dev),
            _ => block::get_lba_status(&c, dev),
        },
        op::PERSISTENT_RESERVE_IN => state.pr.reserve_in(&c),
        op::PERSISTENT_RESERVE_OUT => state.pr.reserve_out(&c, data_out, initiator),
        op::RESERVE_6 | op::RESERVE_10 => state.pr.reserve_spc2(&c, initiator),
        op::RELEASE_6 | op::RELEASE_10 => state.pr.release_spc2(&c, initiator),
        op::READ_DEFECT_DATA_10 | op::READ_DEFECT_DATA_12 => info::read_defect_data(&c),
        op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => block::read(&c, dev),
        op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => block::write(&c, data_out, dev),
        op::WRITE_AND_VERIFY_10 | op::WRITE_AND_VERIFY_12 | op::WRITE_AND_VERIFY_16 => block::write(&c, data_out, dev),
        op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => block::verify(&c, data_out, dev),
        op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => block::synchronize_cache(&c, dev),
        op::PRE_FETCH_10 | op::PRE_FETCH_16 => block::pre_fetch(&c, dev),
        op::UNMAP => block::unmap(&c, data_out, dev),
        op::WRITE_SAME_10 | op::WRITE_SAME_16 => block::write_same(&c, data_out, dev),
        op::COMPARE_AND_WRITE => block::compare_and_write(&c, data_out, dev),
        op::ORWRITE_16 => block::orwrite(&c, data_out, dev),
        op::WRITE_ATOMIC_16 => block::write_atomic(&c, data_out, dev),
        op::SANITIZE => block::sanitize(&c, dev),
        _ => Err(Sense::INVALID_OPCODE.into()),
    }
}

/// The backend as the commands see it: write protected when the export is read-only or SWP is
/// set. The commands check [`Backend::read_only`] before they change anything (and MODE SENSE
/// reports it as WP); writing and unmapping are refused here too, so no command can get
/// round it.
struct WriteProtected<'a> {
    dev: &'a dyn Backend,
    /// Software Write Protect is set.
    software: bool,
}

impl Backend for WriteProtected<'_> {
    fn read(&self, lba: u64, blocks: u32, buf: &mut [u8]) -> Result<(), BackendError> {
        self.dev.read(lba, blocks, buf)
    }
    fn write(&self, lba: u64, data: &[u8]) -> Result<(), BackendError> {
        if self.software {
            return Err(BackendError::ReadOnly);
        }
        self.dev.write(lba, data)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.dev.flush()
    }
    fn unmap(&self, ranges: &[(u64, u32)]) -> Result<(), BackendError> {
        if self.software {
            return Err(BackendError::ReadOnly);
        }
        self.dev.unmap(ranges)
    }
    fn block_status(&self, lba: u64) -> Result<(bool, u64), BackendError> {
        self.dev.block_status(lba)
    }
    fn capacity_blocks(&self) -> u64 {
        self.dev.capacity_blocks()
    }
    fn read_only(&self) -> bool {
        self.software || self.dev.read_only()
    }
}

/// The reservation class of a command, or the sense for an unknown operation code or service
/// action.
fn access(c: &Cdb) -> Result<Access, Failure> {
    let a = match c.opcode() {
        op::TEST_UNIT_READY
        | op::REQUEST_SENSE
        | op::INQUIRY
        | op::READ_CAPACITY_10
        | op::REPORT_LUNS
        | op::PERSISTENT_RESERVE_IN
        | op::PERSISTENT_RESERVE_OUT
        | op::RESERVE_6
        | op::RESERVE_10
        | op::RELEASE_6
        | op::RELEASE_10 => Access::Always,
        op::MAINTENANCE_IN => match c.sa() {
            op::SA_REPORT_SUPPORTED_OPCODES => Access::Always,
            _ => return Err(Sense::INVALID_FIELD_IN_CDB.into()),
        },
        op::SERVICE_ACTION_IN_16 => match c.sa() {
            op::SA_READ_CAPACITY_16 => Access::Always,
            op::SA_GET_LBA_STATUS => Access::Read,
            _ => return Err(Sense::INVALID_FIELD_IN_CDB.into()),
        },
        op::READ_6
        | op::READ_10
        | op::READ_12
        | op::READ_16
        | op::VERIFY_10
        | op::VERIFY_12
        | op::VERIFY_16
        | op::PRE_FETCH_10
        | op::PRE_FETCH_16
        | op::MODE_SENSE_6
        | op::MODE_SENSE_10
        | op::READ_DEFECT_DATA_10
        | op::READ_DEFECT_DATA_12 => Access::Read,
        op::PREVENT_ALLOW if c.b(4) & 3 == 0 => Access::Always,
        op::WRITE_6
        | op::WRITE_10
        | op::WRITE_12
        | op::WRITE_16
        | op::WRITE_AND_VERIFY_10
        | op::WRITE_AND_VERIFY_12
        | op::WRITE_AND_VERIFY_16
        | op::SYNCHRONIZE_CACHE_10
        | op::SYNCHRONIZE_CACHE_16
        | op::WRITE_SAME_10
        | op::WRITE_SAME_16
        | op::UNMAP
        | op::COMPARE_AND_WRITE
        | op::ORWRITE_16
        | op::WRITE_ATOMIC_16
        | op::SANITIZE
        | op::MODE_SELECT_6
        | op::MODE_SELECT_10
        | op::START_STOP_UNIT
        | op::PREVENT_ALLOW => Access::Write,
        _ => return Err(Sense::INVALID_OPCODE.into()),
    };
    Ok(a)
}

/// `data` cut to the CDB's allocation length.
pub(crate) fn truncate(mut data: Vec<u8>, alloc: u32) -> Vec<u8> {
    data.truncate(usize::try_from(alloc).unwrap_or(usize::MAX));
    data
}

/// `n` as a big-endian u16 length field, saturating (the model never builds anything longer).
pub(crate) fn len16(n: usize) -> [u8; 2] {
    u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes()
}

/// `n` as a big-endian u32 length field, saturating.
pub(crate) fn len32(n: usize) -> [u8; 4] {
    u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes()
}

#[cfg(test)]
mod tests;
