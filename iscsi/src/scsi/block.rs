//! The SBC-3/4 medium-access commands: READ, WRITE, WRITE AND VERIFY, VERIFY, COMPARE AND
//! WRITE, ORWRITE, WRITE ATOMIC, WRITE SAME, UNMAP, SANITIZE, SYNCHRONIZE CACHE, PRE-FETCH and
//! GET LBA STATUS.
//!
//! Every command checks its CDB fields, then write protection, then the LBA range, and only
//! then calls the backend, so a backend never sees a range past the capacity and a failed
//! check never leaves a partial write behind (UNMAP validates every descriptor first).
//! Buffers are bounded by [`MAX_TRANSFER_BLOCKS`]; WRITE SAME and SANITIZE write (and
//! unmap) in chunks, so neither allocates in proportion to the range.

use super::{
    len32, op, truncate, Backend, Cdb, CmdResult, Failure, Sense, BLOCK, MAX_ATOMIC_TRANSFER_BLOCKS,
    MAX_COMPARE_AND_WRITE_BLOCKS, MAX_TRANSFER_BLOCKS, MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS, MAX_WRITE_SAME_BLOCKS,
};

/// Blocks per backend write while WRITE SAME fills a range (1 MiB).
const WRITE_SAME_CHUNK_BLOCKS: u32 = 2048;
/// Blocks per backend unmap while SANITIZE BLOCK ERASE deallocates the medium (2 GiB).
const ERASE_CHUNK_BLOCKS: u32 = 1 << 22;
/// Most descriptors one GET LBA STATUS returns.
const MAX_LBA_STATUS_DESCRIPTORS: usize = 512;

/// The transfer length of READ (6) / WRITE (6): 0 means 256 blocks.
pub(super) fn rw6_len(c: &Cdb) -> u32 {
    match c.b(4) {
        0 => 256,
        n => u32::from(n),
    }
}

/// LBA and block count of a READ/WRITE/VERIFY/WRITE AND VERIFY CDB of any size.
fn lba_len(c: &Cdb) -> (u64, u32) {
    match c.opcode() {
        op::READ_6 | op::WRITE_6 => (u64::from(c.u24(1) & 0x1F_FFFF), rw6_len(c)),
        op::READ_10
        | op::WRITE_10
        | op::WRITE_AND_VERIFY_10
        | op::VERIFY_10
        | op::PRE_FETCH_10
        | op::SYNCHRONIZE_CACHE_10
        | op::WRITE_SAME_10 => (u64::from(c.u32(2)), u32::from(c.u16(7))),
        op::READ_12 | op::WRITE_12 | op::WRITE_AND_VERIFY_12 | op::VERIFY_12 => (u64::from(c.u32(2)), c.u32(6)),
        op::WRITE_ATOMIC_16 => (c.u64(2), u32::from(c.u16(12))),
        _ => (c.u64(2), c.u32(10)),
    }
}

fn is_6(c: &Cdb) -> bool {
    matches!(c.opcode(), op::READ_6 | op::WRITE_6)
}

/// LOGICAL BLOCK ADDRESS OUT OF RANGE unless `lba` is a valid address and `blocks` from it
/// fit. An LBA at or past the capacity is out of range even with zero blocks.
fn check_range(dev: &dyn Backend, lba: u64, blocks: u64) -> Result<(), Failure> {
    let cap = dev.capacity_blocks();
    match lba.checked_add(blocks) {
        Some(end) if lba < cap && end <= cap => Ok(()),
        _ => Err(Sense::LBA_OUT_OF_RANGE.into()),
    }
}

fn check_writable(dev: &dyn Backend) -> Result<(), Failure> {
    if dev.read_only() {
        return Err(Sense::WRITE_PROTECTED.into());
    }
    Ok(())
}

fn bytes(blocks: u32) -> usize {
    blocks as usize * BLOCK
}

fn read_blocks(dev: &dyn Backend, lba: u64, blocks: u32) -> Result<Vec<u8>, Failure> {
    let mut buf = vec![0u8; bytes(blocks)];
    dev.read(lba, blocks, &mut buf).map_err(Failure::Read)?;
    Ok(buf)
}

/// Data-out shorter than the CDB announced: the transport did not deliver the data.
fn data(data_out: &[u8], len: usize) -> Result<&[u8], Failure> {
    data_out.get(..len).ok_or(Failure::Check(Sense::INVALID_FIELD_IN_INFORMATION_UNIT))
}

/// RDPROTECT/WRPROTECT/VRPROTECT must be zero: the LUN has no protection information.
fn check_protect(c: &Cdb) -> Result<(), Failure> {
    if !is_6(c) && c.b(1) & 0xE0 != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    Ok(())
}

pub(super) fn read(c: &Cdb, dev: &dyn Backend) -> CmdResult {
    check_protect(c)?;
    let (lba, blocks) = lba_len(c);
    if blocks > MAX_TRANSFER_BLOCKS {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    check_range(dev, lba, u64::from(blocks))?;
    if blocks == 0 {
        return Ok(Vec::new());
    }
    read_blocks(dev, lba, blocks)
}

/// WRITE (6/10/12/16) and WRITE AND VERIFY (10/12/16). FUA, and WRITE AND VERIFY (whose data
/// must be on the medium when it completes), flush after the write.
pub(super) fn write(c: &Cdb, data_out: &[u8], dev: &dyn Backend) -> CmdResult {
    check_protect(c)?;
    let (lba, blocks) = lba_len(c);
    let verify = matches!(c.opcode(), op::WRITE_AND_VERIFY_10 | op::WRITE_AND_VERIFY_12 | op::WRITE_AND_VERIFY_16);
    if blocks > MAX_TRANSFER_BLOCKS || (verify && (c.b(1) >> 1) & 3 == 2) {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    check_writable(dev)?;
    check_range(dev, lba, u64::from(blocks))?;
    if blocks == 0 {
        return Ok(Vec::new());
    }
    let payload = data(data_out, bytes(blocks))?;
    dev.write(lba, payload).map_err(Failure::Write)?;
    let fua = !is_6(c) && !verify && c.b(1) & 0x08 != 0;
    if fua || verify {
        dev.flush().map_err(Failure::Write)?;
    }
    Ok(Vec::new())
}

/// Offset of the first byte where `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn miscompare(offset: usize) -> Failure {
    Sense::MISCOMPARE.with_information(u32::try_from(offset).unwrap_or(u32::MAX)).into()
}

/// VERIFY (10/12/16). BYTCHK 0 checks the range only (the backend has no separate medium to
/// verify), 1 compares the data-out with the medium, 3 compares one data-out block with every
/// block of the range; MISCOMPARE carries the offset of the first differing byte.
pub(super) fn verify(c: &Cdb, data_out: &[u8], dev: &dyn Backend) -> CmdResult {
    check_protect(c)?;
    let (lba, blocks) = lba_len(c);
    let bytchk = (c.b(1) >> 1) & 3;
    if blocks > MAX_TRANSFER_BLOCKS || bytchk == 2 {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    check_range(dev, lba, u64::from(blocks))?;
    if blocks == 0 || bytchk == 0 {
        return Ok(Vec::new());
    }
    let medium = read_blocks(dev, lba, blocks)?;
    if bytchk == 1 {
        let expected = data(data_out, bytes(blocks))?;
        if let Some(off) = first_difference(&medium, expected) {
            return Err(miscompare(off));
        }
    } else {
        let expected = data(data_out, BLOCK)?;
        for (i, chunk) in medium.chunks(BLOCK).enumerate() {
            if let Some(off) = first_difference(chunk, expected) {
                return Err(miscompare(i * BLOCK + off));
            }
        }
    }
    Ok(Vec::new())
}

/// COMPARE AND WRITE: the first half of the data-out is compared with the medium, the second
/// half written if they match. Atomic because the daemon holds the LUN lock for the command.
pub(super) fn compare_and_write(c: &Cdb, data_out: &[u8], dev: &dyn Backend) -> CmdResult {
    check_protect(c)?;
    let lba = c.u64(2);
    let n = c.b(13);
    if n > MAX_COMPARE_AND_WRITE_BLOCKS {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    check_writable(dev)?;
    check_range(dev, lba, u64::from(n))?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let blocks = u32::from(n);
    // Exactly the compare and write buffers: a different data-out length means the initiator
    // and the CDB disagree, and guessing which half is which would be unsafe.
    if data_out.len() != 2 * bytes(blocks) {
        return Err(Sense::INVALID_FIELD_IN_INFORMATION_UNIT.into());
    }
    let buf = data_out;
    let (compare, new) = buf.split_at(bytes(blocks));
    let medium = read_blocks(dev, lba, blocks)?;
    if let Some(off) = first_difference(&medium, compare) {
        return Err(miscompare(off));
    }
    dev.write(lba, new).map_err(Failure::Write)?;
    if c.b(1) & 0x08 != 0 {
        dev.flush().map_err(Failure::Write)?;
    }
    Ok(Vec::new())
}

/// SYNCHRONIZE CACHE (10/16): a NUMBER OF BLOCKS of 0 means "to the end"; the whole volume is
/// flushed either way.
pub(super) fn synchronize_cache(c: &Cdb, dev: &dyn Backend) -> CmdResult {
    let (lba, blocks) = lba_len(c);
    check_range(dev, lba, u64::from(blocks))?;
    dev.flush().map_err(Failure::Write)?;
    Ok(Vec::new())
}

/// PRE-FETCH (10/16): nothing to prefetch into; checks the range and completes.
pub(super) fn pre_fetch(c: &Cdb, dev: &dyn Backend) -> CmdResult {
    let (lba, blocks) = lba_len(c);
    check_range(dev, lba, u64::from(blocks))?;
    Ok(Vec::new())
}

/// UNMAP. The parameter list is an 8-byte header (UNMAP DATA LENGTH, UNMAP BLOCK DESCRIPTOR
/// DATA LENGTH) then 16-byte descriptors (LBA, block count). A descriptor length that is not a
/// multiple of 16 drops the partial descriptor (SBC-3 §5.28.2). Every descriptor is checked
/// before anything is unmapped.
pub(super) fn unmap(c: &Cdb, data_out: &[u8], dev: &dyn Backend) -> CmdResult {
    if c.b(1) & 0x01 != 0 {
        // ANCHOR: anchored LBAs are not supported (ANC_SUP = 0 in the provisioning page).
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    let plen = usize::from(c.u16(7));
    if plen == 0 {
        return Ok(Vec::new());
    }
    check_writable(dev)?;
    if plen < 8 {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let list = data_out.get(..plen).ok_or(Failure::Check(Sense::PARAMETER_LIST_LENGTH_ERROR))?;
    let data_len = usize::from(u16::from_be_bytes([list[0], list[1]]));
    let bd_len = usize::from(u16::from_be_bytes([list[2], list[3]]));
    if data_len + 2 > plen || bd_len + 8 > plen {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    if bd_len / 16 > MAX_UNMAP_DESCRIPTORS as usize {
        return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
    }
    let mut ranges = Vec::with_capacity(bd_len / 16);
    let mut total: u64 = 0;
    for d in list[8..8 + bd_len].chunks_exact(16) {
        let lba = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
        let blocks = u32::from_be_bytes([d[8], d[9], d[10], d[11]]);
        if blocks == 0 {
            continue;
        }
        check_range(dev, lba, u64::from(blocks))?;
        total += u64::from(blocks);
        if total > u64::from(MAX_UNMAP_BLOCKS) {
            return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
        }
        ranges.push((lba, blocks));
    }
    if !ranges.is_empty() {
        dev.unmap(&ranges).map_err(Failure::Write)?;
    }
    Ok(Vec::new())
}

/// WRITE SAME (10/16). With UNMAP set and an all-zero block (or NDOB) the range is
/// deallocated, which reads back as zeros because of LBPRZ; otherwise the block is written to
/// every LBA. A NUMBER OF LOGICAL BLOCKS of zero is refused (WSNZ = 1 in the block limits
/// page); no length may exceed [`MAX_WRITE_SAME_BLOCKS`].
pub(super) fn write_same(c: &Cdb, data_out: &[u8], dev: &dyn Backend) -> CmdResult {
    check_protect(c)?;
    let flags = c.b(1);
    let unmap_bit = flags & 0x08 != 0;
    let anchor = flags & 0x10 != 0;
    let ndob = c.opcode() == op::WRITE_SAME_16 && flags & 0x01 != 0;
    let (lba, blocks) = lba_len(c);
    if anchor || blocks > MAX_WRITE_SAME_BLOCKS {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    check_writable(dev)?;
    // The range first: libiscsi expects LBA OUT OF RANGE for zero blocks past the end.
    check_range(dev, lba, u64::from(blocks))?;
    if blocks == 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    // The data-out must be exactly one block: libiscsi checks that a too short or too long
    // buffer fails rather than being cut.
    if !ndob && data_out.len() != BLOCK {
        return Err(Sense::INVALID_FIELD_IN_INFORMATION_UNIT.into());
    }
    let block: Vec<u8> = if ndob { vec![0u8; BLOCK] } else { data_out.to_vec() };
    let zero = block.iter().all(|&b| b == 0);
    if unmap_bit && zero {
        dev.unmap(&[(lba, blocks)]).map_err(Failure::Write)?;
        return Ok(Vec::new());
    }
    fill(dev, &block, lba, u64::from(blocks))?;
    Ok(Vec::new())
}

/// Writes `block` to the `blocks` LBAs from `lba`, a chunk at a time.
fn fill(dev: &dyn Backend, block: &[u8], lba: u64, blocks: u64) -> Result<(), Failure> {
    let chunk_blocks = blocks.min(u64::from(WRITE_SAME_CHUNK_BLOCKS));
    let chunk = block.repeat(usize::try_from(chunk_blocks).unwrap_or(0));
    let mut done: u64 = 0;
    while done < blocks {
        let n = (blocks - done).min(chunk_blocks);
        let len = usize::try_from(n).map_or(chunk.len(), |n| n * BLOCK);
        dev.write(lba + done, &chunk[..len]).map_err(Failure::Write)?;
        done += n;
    }
    Ok(())
}

/// ORWRITE (16): each block of the range becomes the bitwise OR of its current contents and
/// the data-out (SBC-3 §5.9, the OR operation; BMOP and the generation fields exist only in
/// ORWRITE (32), which is not supported). Atomic with respect to other commands because the
/// daemon holds the LUN lock; FUA flushes afterwards.
pub(super) fn orwrite(c: &Cdb, data_out: &[u8], dev: &dyn Backend) -> CmdResult {
    check_protect(c)?;
    let (lba, blocks) = lba_len(c);
    if blocks > MAX_TRANSFER_BLOCKS {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    check_writable(dev)?;
    check_range(dev, lba, u64::from(blocks))?;
    if blocks == 0 {
        return Ok(Vec::new());
    }
    let mask = data(data_out, bytes(blocks))?;
    let mut medium = read_blocks(dev, lba, blocks)?;
    medium.iter_mut().zip(mask).for_each(|(m, d)| *m |= d);
    dev.write(lba, &medium).map_err(Failure::Write)?;
    if c.b(1) & 0x08 != 0 {
        dev.flush().map_err(Failure::Write)?;
    }
    Ok(Vec::new())
}

/// WRITE ATOMIC (16): the range is written all or nothing. One backend write is one atomic
/// commit of the daemon's map (docs/durability.md), so a write of up to
/// [`MAX_ATOMIC_TRANSFER_BLOCKS`] in one call is atomic, at any alignment: the block limits
/// page reports no alignment or granularity requirement and no atomic boundary support, so
/// a non-zero ATOMIC BOUNDARY is refused.
pub(super) fn write_atomic(c: &Cdb, data_out: &[u8], dev: &dyn Backend) -> CmdResult {
    check_protect(c)?;
    let (lba, blocks) = lba_len(c);
    if c.u16(10) != 0 || blocks > MAX_ATOMIC_TRANSFER_BLOCKS {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    check_writable(dev)?;
    check_range(dev, lba, u64::from(blocks))?;
    if blocks == 0 {
        return Ok(Vec::new());
    }
    let payload = data(data_out, bytes(blocks))?;
    dev.write(lba, payload).map_err(Failure::Write)?;
    if c.b(1) & 0x08 != 0 {
        dev.flush().map_err(Failure::Write)?;
    }
    Ok(Vec::new())
}

/// SANITIZE: BLOCK ERASE deallocates the whole medium (it then reads as zeros: WABEREQ = 1 in
/// the block device characteristics page), EXIT FAILURE MODE completes at once (a sanitize that
/// fails reports its error and leaves no failure mode behind). CRYPTO ERASE is not supported:
/// there is no encryption key to change. BLOCK ERASE ends with a flush, so the old data is gone
/// from the medium (its slots freed and punched) when the command completes; the command is
/// synchronous, so IMMED changes nothing and no "sanitize in progress" state is ever seen.
///
/// OVERWRITE is not offered: forkd never writes in place (a write goes to fresh slots), so an
/// overwrite could not reach the old data, and it would allocate the whole volume; BLOCK ERASE
/// is the sanitize that fits a thin, copy-on-write LUN.
pub(super) fn sanitize(c: &Cdb, dev: &dyn Backend) -> CmdResult {
    let plen = usize::from(c.u16(7));
    // Byte 1 bit 6 and bytes 2-6 are reserved.
    if c.b(1) & 0x40 != 0 || (2..7).any(|i| c.b(i) != 0) {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    match c.sa() {
        op::SA_SANITIZE_BLOCK_ERASE | op::SA_SANITIZE_EXIT_FAILURE_MODE if plen != 0 => {
            return Err(Sense::INVALID_FIELD_IN_CDB.in_cdb(7, None).into());
        }
        op::SA_SANITIZE_BLOCK_ERASE => {}
        op::SA_SANITIZE_EXIT_FAILURE_MODE => return Ok(Vec::new()),
        _ => return Err(Sense::INVALID_FIELD_IN_CDB.in_cdb(1, Some(4)).into()),
    }
    check_writable(dev)?;
    let cap = dev.capacity_blocks();
    let mut lba = 0;
    while lba < cap {
        let n = u32::try_from((cap - lba).min(u64::from(ERASE_CHUNK_BLOCKS))).unwrap_or(ERASE_CHUNK_BLOCKS);
        dev.unmap(&[(lba, n)]).map_err(Failure::Write)?;
        lba += u64::from(n);
    }
    dev.flush().map_err(Failure::Write)?;
    Ok(Vec::new())
}

/// GET LBA STATUS: descriptors from the starting LBA on, one per run the backend reports,
/// as many as the allocation length (and a fixed bound) allow. Provisioning status 0 is
/// mapped, 1 deallocated.
pub(super) fn get_lba_status(c: &Cdb, dev: &dyn Backend) -> CmdResult {
    let lba = c.u64(2);
    let alloc = c.u32(10);
    let cap = dev.capacity_blocks();
    if lba >= cap {
        return Err(Sense::LBA_OUT_OF_RANGE.into());
    }
    let room = (alloc as usize).saturating_sub(8) / 16;
    let max = room.clamp(1, MAX_LBA_STATUS_DESCRIPTORS);
    let mut descs: Vec<u8> = Vec::new();
    let mut cur = lba;
    let mut count = 0;
    while count < max && cur < cap {
        let (mapped, run) = dev.block_status(cur).map_err(Failure::Read)?;
        let run = run.clamp(1, cap - cur).min(u64::from(u32::MAX));
        let run32 = u32::try_from(run).unwrap_or(u32::MAX);
        descs.extend_from_slice(&cur.to_be_bytes());
        descs.extend_from_slice(&run32.to_be_bytes());
        descs.push(if mapped { 0 } else { 1 });
        descs.extend_from_slice(&[0, 0, 0]);
        cur += u64::from(run32);
        count += 1;
    }
    let mut out = Vec::with_capacity(8 + descs.len());
    out.extend_from_slice(&len32(descs.len() + 4));
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&descs);
    Ok(truncate(out, alloc))
}
