//! The commands that describe the LUN rather than touch its data: INQUIRY and the VPD pages,
//! READ CAPACITY, REPORT LUNS, REPORT SUPPORTED OPERATION CODES, READ DEFECT DATA and REQUEST
//! SENSE. The identity (serial, designators) is derived once from the volume id. MODE SENSE and
//! MODE SELECT are in `mode`.

use super::{
    len16, len32, op, truncate, Backend, Cdb, CmdResult, Sense, LOGICAL_BLOCK_SIZE, MAX_ATOMIC_TRANSFER_BLOCKS,
    MAX_COMPARE_AND_WRITE_BLOCKS, MAX_TRANSFER_BLOCKS, MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS, MAX_WRITE_SAME_BLOCKS,
    OPTIMAL_GRANULARITY_BLOCKS, PHYSICAL_BLOCK_EXPONENT,
};

const VENDOR: &[u8; 8] = b"FORKD   ";
const PRODUCT: &[u8; 16] = b"forkd volume    ";
const REVISION: &[u8; 4] = b"0001";

/// What INQUIRY reports about the volume, derived from its id.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    /// Unit serial number: 16 hex digits of a hash of the volume id.
    pub(crate) serial: String,
    /// NAA 3 (locally assigned) designator: the hash with the NAA nibble on top.
    pub(crate) naa: [u8; 8],
    /// The volume id as printable ASCII, for the T10 vendor ID designator.
    pub(crate) vendor_specific: Vec<u8>,
}

/// FNV-1a, 64 bits: stable across builds and platforms, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl Identity {
    pub(crate) fn new(volume_id: &str) -> Identity {
        let h = fnv1a(volume_id.as_bytes());
        let naa = ((h & 0x0FFF_FFFF_FFFF_FFFF) | 0x3000_0000_0000_0000).to_be_bytes();
        let mut vendor_specific: Vec<u8> =
            volume_id.bytes().map(|b| if (0x21..0x7F).contains(&b) { b } else { b'_' }).take(200).collect();
        if vendor_specific.is_empty() {
            vendor_specific = format!("{h:016x}").into_bytes();
        }
        Identity { serial: format!("{h:016x}"), naa, vendor_specific }
    }
}

/// Every operation code the model knows (service actions aside).
pub(super) fn is_known_opcode(o: u8) -> bool {
    COMMANDS.iter().any(|cmd| cmd.opcode == o)
}

/// INQUIRY addressed to a LUN that does not exist: peripheral qualifier 011b, type 1Fh.
pub(super) fn inquiry_absent_lun(c: &Cdb) -> CmdResult {
    if c.b(1) & 0x03 != 0 || c.b(2) != 0 {
        return Err(Sense::LUN_NOT_SUPPORTED.into());
    }
    let mut d = standard_inquiry();
    d[0] = 0x7F;
    Ok(truncate(d, u32::from(c.u16(3))))
}

fn standard_inquiry() -> Vec<u8> {
    let mut d = vec![0u8; 74];
    d[0] = 0x00; // connected, direct access block device
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HISUP, response data format 2
    d[4] = 74 - 5;
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(VENDOR);
    d[16..32].copy_from_slice(PRODUCT);
    d[32..36].copy_from_slice(REVISION);
    // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
    for (i, v) in [0x00A0u16, 0x0960, 0x0460, 0x04C0].iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

pub(super) fn inquiry(c: &Cdb, state: &super::LunState) -> CmdResult {
    let evpd = c.b(1) & 0x01 != 0;
    let alloc = u32::from(c.u16(3));
    if c.b(1) & 0x02 != 0 || (!evpd && c.b(2) != 0) {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    if !evpd {
        return Ok(truncate(standard_inquiry(), alloc));
    }
    let page = vpd_page(c.b(2), &state.ident).ok_or(Sense::INVALID_FIELD_IN_CDB)?;
    let mut d = vec![0x00, c.b(2)];
    d.extend_from_slice(&len16(page.len()));
    d.extend_from_slice(&page);
    Ok(truncate(d, alloc))
}

const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2];

/// The payload (after the 4-byte header) of a VPD page.
fn vpd_page(code: u8, id: &Identity) -> Option<Vec<u8>> {
    let page = match code {
        0x00 => VPD_PAGES.to_vec(),
        0x80 => id.serial.as_bytes().to_vec(),
        0x83 => {
            let mut p = Vec::new();
            // NAA, binary, associated with the logical unit.
            p.extend_from_slice(&[0x01, 0x03, 0x00, 8]);
            p.extend_from_slice(&id.naa);
            // T10 vendor ID, ASCII, logical unit: vendor then the volume id.
            let len = VENDOR.len() + id.vendor_specific.len();
            p.extend_from_slice(&[0x02, 0x01, 0x00, u8::try_from(len).unwrap_or(u8::MAX)]);
            p.extend_from_slice(VENDOR);
            p.extend_from_slice(&id.vendor_specific);
            // Relative target port identifier 1, associated with the target port.
            p.extend_from_slice(&[0x01, 0x14, 0x00, 4, 0, 0, 0, 1]);
            p
        }
        0xB0 => {
            let mut p = vec![0u8; 60];
            // WSNZ = 1: WRITE SAME needs a block count. (With 0 meaning "to the end of the
            // medium", libiscsi's WriteSame10.UnmapUntilEnd expects a non-zero block sent with
            // UNMAP to read back as zeros, which SBC does not allow.)
            p[0] = 0x01;
            p[1] = MAX_COMPARE_AND_WRITE_BLOCKS;
            p[2..4].copy_from_slice(&OPTIMAL_GRANULARITY_BLOCKS.to_be_bytes());
            p[4..8].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
            p[8..12].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
            p[12..16].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
            p[16..20].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
            p[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
            p[24..28].copy_from_slice(&u32::from(OPTIMAL_GRANULARITY_BLOCKS).to_be_bytes());
            p[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
            p[32..40].copy_from_slice(&u64::from(MAX_WRITE_SAME_BLOCKS).to_be_bytes());
            // MAXIMUM ATOMIC TRANSFER LENGTH; ATOMIC ALIGNMENT, ATOMIC TRANSFER LENGTH
            // GRANULARITY and the atomic boundary limits stay 0 (none).
            p[40..44].copy_from_slice(&MAX_ATOMIC_TRANSFER_BLOCKS.to_be_bytes());
            p
        }
        0xB1 => {
            let mut p = vec![0u8; 60];
            p[1] = 0x01; // MEDIUM ROTATION RATE 1: non-rotating
            p[3] = 0x40; // WABEREQ 01b: reads after SANITIZE BLOCK ERASE succeed (zeros)
            p
        }
        // LBPU, LBPWS, LBPWS10, LBPRZ; provisioning type 2: thin.
        0xB2 => vec![0x00, 0xE4, 0x02, 0x00],
        _ => return None,
    };
    Some(page)
}

pub(super) fn read_capacity_10(c: &Cdb, dev: &dyn Backend) -> CmdResult {
    // PMI = 0 requires a zero LBA field.
    if c.b(8) & 0x01 == 0 && c.u32(2) != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    let last = dev.capacity_blocks().saturating_sub(1);
    let last32 = u32::try_from(last).unwrap_or(u32::MAX);
    let mut d = last32.to_be_bytes().to_vec();
    d.extend_from_slice(&LOGICAL_BLOCK_SIZE.to_be_bytes());
    Ok(d)
}

pub(super) fn read_capacity_16(c: &Cdb, dev: &dyn Backend) -> CmdResult {
    let mut d = vec![0u8; 32];
    d[0..8].copy_from_slice(&dev.capacity_blocks().saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&LOGICAL_BLOCK_SIZE.to_be_bytes());
    d[13] = PHYSICAL_BLOCK_EXPONENT;
    d[14] = 0xC0; // LBPME, LBPRZ; lowest aligned LBA 0
    Ok(truncate(d, c.u32(10)))
}

pub(super) fn report_luns(c: &Cdb) -> CmdResult {
    let alloc = c.u32(6);
    if alloc < 16 {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    let luns: &[u8] = match c.b(2) {
        0x00 | 0x02 => &[0; 8],
        0x01 => &[],
        _ => return Err(Sense::INVALID_FIELD_IN_CDB.into()),
    };
    let mut d = len32(luns.len()).to_vec();
    d.extend_from_slice(&[0; 4]);
    d.extend_from_slice(luns);
    Ok(truncate(d, alloc))
}

/// READ DEFECT DATA (10/12): a volume has no defects, so the lists asked for (REQ_PLIST,
/// REQ_GLIST) are reported valid and empty, in the requested format. The reserved formats
/// (001b, 010b, 111b) are INVALID FIELD IN CDB; the 12-byte form's ADDRESS DESCRIPTOR INDEX
/// has nothing to index and is ignored.
pub(super) fn read_defect_data(c: &Cdb) -> CmdResult {
    let ten = c.opcode() == op::READ_DEFECT_DATA_10;
    let flags = if ten { c.b(2) } else { c.b(1) };
    let format = flags & 0x07;
    if matches!(format, 1 | 2 | 7) || flags & 0xE0 != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB.in_cdb(if ten { 2 } else { 1 }, None).into());
    }
    // PLISTV / GLISTV mirror REQ_PLIST / REQ_GLIST; the list length is 0.
    let d = if ten { vec![0, flags & 0x1F, 0, 0] } else { vec![0, flags & 0x1F, 0, 0, 0, 0, 0, 0] };
    let alloc = if ten { u32::from(c.u16(7)) } else { c.u32(6) };
    Ok(truncate(d, alloc))
}

/// REQUEST SENSE: sense is always delivered with the failing command (autosense), so there is
/// never a pending condition to report.
pub(super) fn request_sense(c: &Cdb) -> CmdResult {
    if c.b(1) & 0x01 != 0 {
        // DESC: descriptor-format sense is not supported.
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    Ok(truncate(Sense::NO_SENSE.to_fixed().to_vec(), u32::from(c.b(4))))
}

/// One row of REPORT SUPPORTED OPERATION CODES: the CDB usage data (its length is the CDB
/// length, its first byte the opcode, then the bits the model looks at).
#[derive(Debug)]
struct Command {
    opcode: u8,
    sa: Option<u8>,
    usage: &'static [u8],
}

const fn cmd(opcode: u8, sa: Option<u8>, usage: &'static [u8]) -> Command {
    Command { opcode, sa, usage }
}

const COMMANDS: &[Command] = &[
    cmd(op::TEST_UNIT_READY, None, &[0x00, 0, 0, 0, 0, 0]),
    cmd(op::REQUEST_SENSE, None, &[0x03, 0x01, 0, 0, 0xFF, 0]),
    cmd(op::READ_6, None, &[0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0]),
    cmd(op::WRITE_6, None, &[0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0]),
    cmd(op::INQUIRY, None, &[0x12, 0x01, 0xFF, 0xFF, 0xFF, 0]),
    cmd(op::MODE_SELECT_6, None, &[0x15, 0x11, 0, 0, 0xFF, 0]),
    cmd(op::MODE_SENSE_6, None, &[0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0]),
    cmd(op::RESERVE_6, None, &[0x16, 0, 0, 0, 0, 0]),
    cmd(op::RELEASE_6, None, &[0x17, 0, 0, 0, 0, 0]),
    cmd(op::START_STOP_UNIT, None, &[0x1B, 0x01, 0, 0x0F, 0xF7, 0]),
    cmd(op::PREVENT_ALLOW, None, &[0x1E, 0, 0, 0, 0x03, 0]),
    cmd(op::READ_CAPACITY_10, None, &[0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, 0]),
    cmd(op::READ_10, None, &[0x28, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0]),
    cmd(op::WRITE_10, None, &[0x2A, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0]),
    cmd(op::WRITE_AND_VERIFY_10, None, &[0x2E, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0]),
    cmd(op::VERIFY_10, None, &[0x2F, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0]),
    cmd(op::PRE_FETCH_10, None, &[0x34, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0]),
    cmd(op::SYNCHRONIZE_CACHE_10, None, &[0x35, 0x06, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0]),
    cmd(op::READ_DEFECT_DATA_10, None, &[0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0]),
    cmd(op::WRITE_SAME_10, None, &[0x41, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0]),
    cmd(op::UNMAP, None, &[0x42, 0x01, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, 0]),
    cmd(op::SANITIZE, Some(op::SA_SANITIZE_BLOCK_ERASE), &[0x48, 0xBF, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]),
    cmd(op::SANITIZE, Some(op::SA_SANITIZE_EXIT_FAILURE_MODE), &[0x48, 0xBF, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]),
    cmd(op::MODE_SELECT_10, None, &[0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]),
    cmd(op::RESERVE_10, None, &[0x56, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]),
    cmd(op::RELEASE_10, None, &[0x57, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]),
    cmd(op::MODE_SENSE_10, None, &[0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0]),
    cmd(op::PERSISTENT_RESERVE_IN, Some(0x00), &[0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]),
    cmd(op::PERSISTENT_RESERVE_IN, Some(0x01), &[0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]),
    cmd(op::PERSISTENT_RESERVE_IN, Some(0x02), &[0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]),
    cmd(op::PERSISTENT_RESERVE_IN, Some(0x03), &[0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]),
    cmd(op::PERSISTENT_RESERVE_OUT, Some(0x00), &[0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]),
    cmd(op::PERSISTENT_RESERVE_OUT, Some(0x01), &[0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]),
    cmd(op::PERSISTENT_RESERVE_OUT, Some(0x02), &[0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]),
    cmd(op::PERSISTENT_RESERVE_OUT, Some(0x03), &[0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]),
    cmd(op::PERSISTENT_RESERVE_OUT, Some(0x04), &[0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]),
    cmd(op::PERSISTENT_RESERVE_OUT, Some(0x05), &[0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]),
    cmd(op::PERSISTENT_RESERVE_OUT, Some(0x06), &[0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]),
    cmd(
        op::READ_16,
        None,
        &[0x88, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
    ),
    cmd(
        op::COMPARE_AND_WRITE,
        None,
        &[0x89, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0x1F, 0],
    ),
    cmd(
        op::WRITE_16,
        None,
        &[0x8A, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
    ),
    cmd(
        op::ORWRITE_16,
        None,
        &[0x8B, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
    ),
    cmd(
        op::WRITE_AND_VERIFY_16,
        None,
        &[0x8E, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
    ),
    cmd(
        op::VERIFY_16,
        None,
        &[0x8F, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
    ),
    cmd(
        op::PRE_FETCH_16,
        None,
        &[0x90, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
    ),
    cmd(
        op::SYNCHRONIZE_CACHE_16,
        None,
        &[0x91, 0x06, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
    ),
    cmd(
        op::WRITE_SAME_16,
        None,
        &[0x93, 0xF9, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
    ),
    cmd(
        op::WRITE_ATOMIC_16,
        None,
        &[0x9C, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
    ),
    cmd(
        op::SERVICE_ACTION_IN_16,
        Some(op::SA_READ_CAPACITY_16),
        &[0x9E, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0],
    ),
    cmd(
        op::SERVICE_ACTION_IN_16,
        Some(op::SA_GET_LBA_STATUS),
        &[0x9E, 0x1F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0],
    ),
    cmd(op::REPORT_LUNS, None, &[0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0]),
    cmd(
        op::MAINTENANCE_IN,
        Some(op::SA_REPORT_SUPPORTED_OPCODES),
        &[0xA3, 0x1F, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0],
    ),
    cmd(op::READ_12, None, &[0xA8, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0]),
    cmd(op::WRITE_12, None, &[0xAA, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0]),
    cmd(op::WRITE_AND_VERIFY_12, None, &[0xAE, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0]),
    cmd(op::VERIFY_12, None, &[0xAF, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0]),
    cmd(op::READ_DEFECT_DATA_12, None, &[0xB7, 0x1F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0]),
];

/// The 12-byte command timeouts descriptor (no timeouts are advertised).
const TIMEOUTS: [u8; 12] = [0x00, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// REPORT SUPPORTED OPERATION CODES, reporting options 0 (all), 1 (by opcode), 2 (by opcode
/// and service action) and 3 (either).
pub(super) fn report_supported_opcodes(c: &Cdb) -> CmdResult {
    let rctd = c.b(2) & 0x80 != 0;
    let options = c.b(2) & 0x07;
    let opcode = c.b(3);
    let sa = c.u16(4);
    let alloc = c.u32(6);
    let has_sa = COMMANDS.iter().any(|k| k.opcode == opcode && k.sa.is_some());
    // The field pointer names REPORTING OPTIONS: the request does not fit the opcode (or the
    // option is reserved), which initiators must not mistake for RSOC being unsupported.
    let bad_options = Sense::INVALID_FIELD_IN_CDB.in_cdb(2, Some(2));
    let found = match options {
        0 => {
            let mut list = Vec::new();
            for k in COMMANDS {
                list.push(k.opcode);
                list.push(0);
                list.extend_from_slice(&u16::from(k.sa.unwrap_or(0)).to_be_bytes());
                list.push(0);
                list.push(u8::from(k.sa.is_some()) | if rctd { 0x02 } else { 0 });
                list.extend_from_slice(&len16(k.usage.len()));
                if rctd {
                    list.extend_from_slice(&TIMEOUTS);
                }
            }
            let mut d = len32(list.len()).to_vec();
            d.extend_from_slice(&list);
            return Ok(truncate(d, alloc));
        }
        1 if has_sa => return Err(bad_options.into()),
        1 => COMMANDS.iter().find(|k| k.opcode == opcode && k.sa.is_none()),
        2 if !has_sa && is_known_opcode(opcode) => return Err(bad_options.into()),
        2 | 3 if has_sa => COMMANDS.iter().find(|k| k.opcode == opcode && k.sa.map(u16::from) == Some(sa)),
        3 => COMMANDS.iter().find(|k| k.opcode == opcode && k.sa.is_none()),
        2 => None,
        _ => return Err(bad_options.into()),
    };
    let d = match found {
        Some(k) => {
            let mut d = vec![0, if rctd { 0x83 } else { 0x03 }];
            d.extend_from_slice(&len16(k.usage.len()));
            d.extend_from_slice(k.usage);
            if rctd {
                d.extend_from_slice(&TIMEOUTS);
            }
            d
        }
        // SUPPORT 001b: not supported.
        None => vec![0, 0x01, 0, 0],
    };
    Ok(truncate(d, alloc))
}
