//! Unit tests for the commands added on top of the core model (RESERVE / RELEASE, ORWRITE,
//! WRITE ATOMIC, WRITE SAME to the end of the medium, SANITIZE, READ DEFECT DATA, the
//! transfer-length rule and the sense field pointer), each checked against an in-memory oracle
//! disk: the same map-of-written-blocks oracle as `tests/scsi_model.rs` (an integration test
//! cannot share code with a unit test, so it is repeated here).

// Test CDBs are built from small numbers; truncating casts are intended there.
#![allow(clippy::cast_possible_truncation)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use proptest::prelude::*;

use super::{
    check_transfer_length, data_out_len, execute, status, Backend, BackendError, LunState, ScsiOutcome, Sense,
    MAX_ATOMIC_TRANSFER_BLOCKS, MAX_TRANSFER_BLOCKS,
};

const BS: usize = 512;
const A: &str = "iqn.2026-11.test:a,i,0x1";
const B: &str = "iqn.2026-11.test:b,i,0x2";

/// The oracle: a map of written blocks; absent blocks are deallocated and read as zeros.
#[derive(Debug)]
struct MemDisk {
    blocks: RefCell<HashMap<u64, Vec<u8>>>,
    capacity: u64,
    read_only: bool,
    flushes: Cell<u32>,
}

impl MemDisk {
    fn new(capacity: u64) -> MemDisk {
        MemDisk { blocks: RefCell::new(HashMap::new()), capacity, read_only: false, flushes: Cell::new(0) }
    }
    fn mapped(&self, lba: u64) -> bool {
        self.blocks.borrow().contains_key(&lba)
    }
    fn block(&self, lba: u64) -> Vec<u8> {
        self.blocks.borrow().get(&lba).cloned().unwrap_or_else(|| vec![0; BS])
    }
}

impl Backend for MemDisk {
    fn read(&self, lba: u64, blocks: u32, buf: &mut [u8]) -> Result<(), BackendError> {
        assert_eq!(buf.len(), blocks as usize * BS);
        assert!(lba + u64::from(blocks) <= self.capacity, "model passed an out-of-range read");
        for (i, chunk) in buf.chunks_mut(BS).enumerate() {
            chunk.copy_from_slice(&self.block(lba + i as u64));
        }
        Ok(())
    }
    fn write(&self, lba: u64, data: &[u8]) -> Result<(), BackendError> {
        assert_eq!(data.len() % BS, 0);
        assert!(lba + (data.len() / BS) as u64 <= self.capacity, "model passed an out-of-range write");
        let mut map = self.blocks.borrow_mut();
        for (i, chunk) in data.chunks(BS).enumerate() {
            map.insert(lba + i as u64, chunk.to_vec());
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.flushes.set(self.flushes.get() + 1);
        Ok(())
    }
    fn unmap(&self, ranges: &[(u64, u32)]) -> Result<(), BackendError> {
        let mut map = self.blocks.borrow_mut();
        for &(lba, n) in ranges {
            assert!(lba + u64::from(n) <= self.capacity, "model passed an out-of-range unmap");
            map.retain(|&b, _| b < lba || b >= lba + u64::from(n));
        }
        Ok(())
    }
    fn block_status(&self, lba: u64) -> Result<(bool, u64), BackendError> {
        let mapped = self.mapped(lba);
        let mut run = 1;
        while lba + run < self.capacity && self.mapped(lba + run) == mapped {
            run += 1;
        }
        Ok((mapped, run))
    }
    fn capacity_blocks(&self) -> u64 {
        self.capacity
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
}

struct Lun {
    disk: MemDisk,
    state: LunState,
}

impl Lun {
    fn new(capacity: u64) -> Lun {
        Lun { disk: MemDisk::new(capacity), state: LunState::new("vol-0001") }
    }
    fn run_as(&mut self, who: &str, cdb: &[u8], data: &[u8]) -> ScsiOutcome {
        execute(cdb, data, 0, who, &self.disk, &mut self.state)
    }
    fn ok_as(&mut self, who: &str, cdb: &[u8], data: &[u8]) -> Vec<u8> {
        let out = self.run_as(who, cdb, data);
        assert_eq!(out.status, status::GOOD, "cdb {cdb:02x?} from {who} failed: {:?}", out.sense);
        out.data_in
    }
    fn ok(&mut self, cdb: &[u8], data: &[u8]) -> Vec<u8> {
        self.ok_as(A, cdb, data)
    }
    fn fails(&mut self, cdb: &[u8], data: &[u8], sense: Sense) {
        let out = self.run_as(A, cdb, data);
        assert_eq!(out.status, status::CHECK_CONDITION, "cdb {cdb:02x?} should fail");
        assert_eq!(out.sense, Some(sense), "cdb {cdb:02x?}");
    }
    fn conflicts(&mut self, who: &str, cdb: &[u8], data: &[u8]) {
        let out = self.run_as(who, cdb, data);
        assert_eq!(out.status, status::RESERVATION_CONFLICT, "cdb {cdb:02x?} from {who}: {:?}", out.sense);
    }
    /// `(lba, blocks, provisioning status)` of the first GET LBA STATUS descriptor at `lba`.
    fn lba_status(&mut self, lba: u64) -> (u64, u32, u8) {
        let mut cdb = vec![0x9E, 0x12];
        cdb.extend_from_slice(&lba.to_be_bytes());
        cdb.extend_from_slice(&24u32.to_be_bytes());
        cdb.extend_from_slice(&[0, 0]);
        let d = self.ok(&cdb, &[]);
        let at = u64::from_be_bytes(d[8..16].try_into().unwrap());
        (at, u32::from_be_bytes(d[16..20].try_into().unwrap()), d[20])
    }
}

fn pattern(blocks: usize, seed: u8) -> Vec<u8> {
    (0..blocks * BS).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// A 16-byte CDB with the LBA at bytes 2-9 and a 32-bit length at 10-13 (WRITE/READ/ORWRITE
/// (16), WRITE SAME (16)).
fn cdb16(op: u8, flags: u8, lba: u64, n: u32) -> Vec<u8> {
    let mut c = vec![op, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&n.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

fn write_atomic(flags: u8, lba: u64, boundary: u16, n: u16) -> Vec<u8> {
    let mut c = vec![0x9C, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&boundary.to_be_bytes());
    c.extend_from_slice(&n.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

fn write_same10(flags: u8, lba: u32, n: u16) -> Vec<u8> {
    let mut c = vec![0x41, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&n.to_be_bytes());
    c.push(0);
    c
}

fn sanitize(byte1: u8, plen: u16) -> Vec<u8> {
    let mut c = vec![0x48, byte1, 0, 0, 0, 0, 0];
    c.extend_from_slice(&plen.to_be_bytes());
    c.push(0);
    c
}

fn overwrite_list(head: u8, pattern: &[u8]) -> Vec<u8> {
    let mut l = vec![head, 0];
    l.extend_from_slice(&(pattern.len() as u16).to_be_bytes());
    l.extend_from_slice(pattern);
    l
}

fn read16(lun: &mut Lun, lba: u64, n: u32) -> Vec<u8> {
    lun.ok(&cdb16(0x88, 0, lba, n), &[])
}

fn rsoc(options: u8, opcode: u8, sa: u16) -> Vec<u8> {
    let mut c = vec![0xA3, 0x0C, options, opcode];
    c.extend_from_slice(&sa.to_be_bytes());
    c.extend_from_slice(&65535u32.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

const TUR: [u8; 6] = [0, 0, 0, 0, 0, 0];
const RESERVE6: [u8; 6] = [0x16, 0, 0, 0, 0, 0];
const RELEASE6: [u8; 6] = [0x17, 0, 0, 0, 0, 0];
const RESERVE10: [u8; 10] = [0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const RELEASE10: [u8; 10] = [0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const INQUIRY: [u8; 6] = [0x12, 0, 0, 0, 96, 0];
const MODE_SENSE6: [u8; 6] = [0x1A, 0, 0x3F, 0, 255, 0];
const PRIN_READ_KEYS: [u8; 10] = [0x5E, 0, 0, 0, 0, 0, 0, 1, 0, 0];

fn prout(sa: u8, kind: u8, key: u64, sa_key: u64) -> (Vec<u8>, Vec<u8>) {
    let cdb = vec![0x5F, sa, kind, 0, 0, 0, 0, 0, 24, 0];
    let mut data = key.to_be_bytes().to_vec();
    data.extend_from_slice(&sa_key.to_be_bytes());
    data.extend_from_slice(&[0; 8]);
    (cdb, data)
}

fn pr(lun: &mut Lun, who: &str, sa: u8, kind: u8, key: u64, sa_key: u64) {
    let (cdb, data) = prout(sa, kind, key, sa_key);
    lun.ok_as(who, &cdb, &data);
}

#[test]
fn sense_carries_the_field_pointer() {
    let s = Sense::INVALID_FIELD_IN_CDB.in_cdb(2, Some(2)).to_fixed();
    assert_eq!(&s[15..18], &[0xCA, 0x00, 0x02]);
    let s = Sense::INVALID_FIELD_IN_CDB.in_cdb(0x107, None).to_fixed();
    assert_eq!(&s[15..18], &[0xC0, 0x01, 0x07]);
    assert_eq!(&Sense::INVALID_FIELD_IN_CDB.to_fixed()[15..18], &[0, 0, 0]);
}

#[test]
fn orwrite_ors_the_data_into_the_medium() {
    let mut lun = Lun::new(1000);
    let old = pattern(4, 1);
    let mask = pattern(4, 77);
    lun.ok(&cdb16(0x8A, 0, 10, 4), &old);
    assert_eq!(data_out_len(&cdb16(0x8B, 0, 10, 4)), Ok(4 * BS as u32));
    lun.ok(&cdb16(0x8B, 0, 10, 4), &mask);
    let expected: Vec<u8> = old.iter().zip(&mask).map(|(a, b)| a | b).collect();
    assert_eq!(read16(&mut lun, 10, 4), expected);
    // On unmapped (zero) blocks it writes the data as is; neighbours stay untouched.
    lun.ok(&cdb16(0x8B, 0, 500, 1), &mask[..BS]);
    assert_eq!(lun.disk.block(500), mask[..BS]);
    assert!(!lun.disk.mapped(501));
    // FUA flushes; zero blocks is a no-op; DPO is accepted.
    lun.ok(&cdb16(0x8B, 0x18, 10, 1), &mask[..BS]);
    assert_eq!(lun.disk.flushes.get(), 1);
    lun.ok(&cdb16(0x8B, 0, 0, 0), &[]);
    // Errors, and nothing written by them.
    lun.fails(&cdb16(0x8B, 0, 999, 2), &[0xFF; 2 * BS], Sense::LBA_OUT_OF_RANGE);
    lun.fails(&cdb16(0x8B, 0, 1001, 0), &[], Sense::LBA_OUT_OF_RANGE);
    lun.fails(&cdb16(0x8B, 0, u64::MAX, 1), &[0xFF; BS], Sense::LBA_OUT_OF_RANGE);
    lun.fails(&cdb16(0x8B, 0x20, 0, 1), &[0xFF; BS], Sense::INVALID_FIELD_IN_CDB);
    lun.fails(&cdb16(0x8B, 0, 0, MAX_TRANSFER_BLOCKS + 1), &[], Sense::INVALID_FIELD_IN_CDB);
    lun.fails(&cdb16(0x8B, 0, 0, 2), &[0xFF; BS], Sense::INVALID_FIELD_IN_INFORMATION_UNIT);
    assert!(!lun.disk.mapped(0) && !lun.disk.mapped(999));
    let mut ro = Lun::new(10);
    ro.disk.read_only = true;
    ro.fails(&cdb16(0x8B, 0, 0, 1), &[0xFF; BS], Sense::WRITE_PROTECTED);
}

#[test]
fn write_atomic_writes_the_whole_range() {
    let mut lun = Lun::new(1000);
    let data = pattern(3, 9);
    assert_eq!(data_out_len(&write_atomic(0, 5, 0, 3)), Ok(3 * BS as u32));
    lun.ok(&write_atomic(0, 5, 0, 3), &data);
    assert_eq!(read16(&mut lun, 5, 3), data);
    lun.ok(&write_atomic(0x08, 997, 0, 3), &data);
    assert_eq!(lun.disk.flushes.get(), 1);
    lun.ok(&write_atomic(0, 0, 0, 0), &[]);
    lun.fails(&write_atomic(0, 998, 0, 3), &data, Sense::LBA_OUT_OF_RANGE);
    lun.fails(&write_atomic(0, 1000 + 8, 0, 0), &[], Sense::LBA_OUT_OF_RANGE);
    lun.fails(&write_atomic(0, u64::MAX - 7, 0, 1), &data[..BS], Sense::LBA_OUT_OF_RANGE);
    // No atomic boundaries, no protection information.
    lun.fails(&write_atomic(0, 0, 1, 1), &data[..BS], Sense::INVALID_FIELD_IN_CDB);
    lun.fails(&write_atomic(0x40, 0, 0, 1), &data[..BS], Sense::INVALID_FIELD_IN_CDB);
    // The block limits page advertises the limit, within the maximum transfer length.
    let bl = lun.ok(&[0x12, 1, 0xB0, 0, 64, 0], &[]);
    let max_atomic = u32::from_be_bytes(bl[44..48].try_into().unwrap());
    assert_eq!(max_atomic, MAX_ATOMIC_TRANSFER_BLOCKS);
    assert!(max_atomic <= u32::from_be_bytes(bl[8..12].try_into().unwrap()));
    assert_eq!(&bl[48..64], &[0; 16], "no alignment, granularity or boundary");
}

#[test]
fn write_same_with_zero_blocks_is_refused() {
    let mut lun = Lun::new(4096);
    let bl = lun.ok(&[0x12, 1, 0xB0, 0, 64, 0], &[]);
    assert_eq!(bl[4] & 1, 1, "WSNZ");
    let block = pattern(1, 3);
    lun.fails(&cdb16(0x93, 0, 4000, 0), &block, Sense::INVALID_FIELD_IN_CDB);
    lun.fails(&write_same10(0x08, 4090, 0), &[0; BS], Sense::INVALID_FIELD_IN_CDB);
    assert!(!lun.disk.mapped(4000) && !lun.disk.mapped(4095));
    // Past the end, even with zero blocks: the range is checked first.
    lun.fails(&cdb16(0x93, 0, 4096, 0), &block, Sense::LBA_OUT_OF_RANGE);
    lun.fails(&write_same10(0, u32::MAX, 0), &block, Sense::LBA_OUT_OF_RANGE);
    // UNMAP with a non-zero block writes it (reads must return what was sent).
    lun.ok(&write_same10(0x08, 4095, 1), &block);
    assert_eq!(lun.disk.block(4095), block);
}

#[test]
fn sanitize_block_erase_deallocates_everything() {
    let mut lun = Lun::new(3000);
    lun.ok(&cdb16(0x8A, 0, 0, 8), &pattern(8, 1));
    lun.ok(&cdb16(0x8A, 0, 2990, 10), &pattern(10, 2));
    assert_eq!(data_out_len(&sanitize(0x02, 0)), Ok(0));
    lun.ok(&sanitize(0x02, 0), &[]);
    assert!(lun.disk.blocks.borrow().is_empty());
    assert_eq!(lun.lba_status(0), (0, 3000, 1));
    assert_eq!(read16(&mut lun, 2990, 10), vec![0; 10 * BS]);
    assert_eq!(lun.disk.flushes.get(), 1, "the erase is made durable");
    // IMMED and AUSE are accepted (the command is synchronous anyway).
    lun.ok(&sanitize(0xA2, 0), &[]);
    // WABEREQ = 1 in the block device characteristics page: reads after it succeed.
    let bdc = lun.ok(&[0x12, 1, 0xB1, 0, 64, 0], &[]);
    assert_eq!(bdc[7] >> 6, 1);
    // A parameter list, reserved bits and bytes, unknown or unsupported service actions.
    lun.fails(&sanitize(0x02, 8), &[0; 8], Sense::INVALID_FIELD_IN_CDB.in_cdb(7, None));
    lun.fails(&sanitize(0x42, 0), &[], Sense::INVALID_FIELD_IN_CDB);
    for byte in 2..7 {
        let mut c = sanitize(0x02, 0);
        c[byte] = byte as u8;
        lun.fails(&c, &[], Sense::INVALID_FIELD_IN_CDB);
    }
    for sa in (0..0x1F).filter(|&sa| sa != 2) {
        lun.fails(&sanitize(sa, 0), &[], Sense::INVALID_FIELD_IN_CDB.in_cdb(1, Some(4)));
    }
    // EXIT FAILURE MODE: never in failure mode, so it just completes; no parameter list.
    lun.ok(&sanitize(0x1F, 0), &[]);
    lun.fails(&sanitize(0x1F, 8), &[0; 8], Sense::INVALID_FIELD_IN_CDB.in_cdb(7, None));
}

#[test]
fn sanitize_overwrite_is_not_offered() {
    let mut lun = Lun::new(100);
    lun.ok(&cdb16(0x8A, 0, 0, 1), &pattern(1, 1));
    let list = overwrite_list(0x01, &[1, 2, 3, 4]);
    lun.fails(&sanitize(0x01, list.len() as u16), &list, Sense::INVALID_FIELD_IN_CDB.in_cdb(1, Some(4)));
    assert_eq!(lun.disk.block(0), pattern(1, 1), "nothing written");
}

#[test]
fn sanitize_is_refused_on_read_only_and_reserved_luns() {
    let mut ro = Lun::new(100);
    ro.disk.read_only = true;
    ro.fails(&sanitize(0x02, 0), &[], Sense::WRITE_PROTECTED);

    let mut lun = Lun::new(100);
    lun.ok(&cdb16(0x8A, 0, 0, 1), &pattern(1, 1));
    lun.ok_as(B, &RESERVE6, &[]);
    lun.conflicts(A, &sanitize(0x02, 0), &[]);
    lun.ok_as(B, &RELEASE6, &[]);
    pr(&mut lun, B, 0x00, 0, 0, 7);
    pr(&mut lun, B, 0x01, 0x01, 7, 0); // Write Exclusive
    lun.conflicts(A, &sanitize(0x02, 0), &[]);
    assert!(lun.disk.mapped(0));
}

#[test]
fn reserve_and_release_between_two_initiators() {
    let mut lun = Lun::new(100);
    lun.ok(&RESERVE6, &[]);
    lun.ok(&RESERVE6, &[]); // re-reserving is allowed
    lun.conflicts(B, &RESERVE6, &[]);
    lun.conflicts(B, &RESERVE10, &[]);
    lun.ok_as(B, &RELEASE6, &[]); // a no-op from a non-holder
    lun.ok(&MODE_SENSE6, &[]);
    lun.conflicts(B, &MODE_SENSE6, &[]);
    lun.conflicts(B, &TUR, &[]);
    lun.conflicts(B, &cdb16(0x88, 0, 0, 1), &[]);
    lun.conflicts(B, &cdb16(0x8A, 0, 0, 1), &[0; BS]);
    lun.ok_as(B, &INQUIRY, &[]);
    lun.ok_as(B, &[0x03, 0, 0, 0, 18, 0], &[]);
    lun.ok_as(B, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], &[]);
    lun.ok_as(B, &[0x1E, 0, 0, 0, 0, 0], &[]);
    lun.conflicts(B, &[0x1E, 0, 0, 0, 1, 0], &[]);
    // Persistent reservation commands conflict for everyone while it is held.
    lun.conflicts(A, &PRIN_READ_KEYS, &[]);
    let (cdb, data) = prout(0, 0, 0, 5);
    lun.conflicts(B, &cdb, &data);
    // The holder reads and writes.
    lun.ok(&cdb16(0x8A, 0, 0, 1), &pattern(1, 1));
    lun.ok(&RELEASE6, &[]);
    lun.ok_as(B, &RESERVE10, &[]);
    lun.conflicts(A, &TUR, &[]);
    lun.ok_as(B, &RELEASE10, &[]);
    lun.ok(&TUR, &[]);
    lun.ok(&PRIN_READ_KEYS, &[]);
}

#[test]
fn reservations_end_with_the_nexus_and_with_a_reset() {
    let mut lun = Lun::new(100);
    lun.ok(&RESERVE6, &[]);
    lun.state.nexus_lost(B); // someone else's nexus: nothing changes
    lun.conflicts(B, &RESERVE6, &[]);
    lun.state.nexus_lost(A);
    lun.ok_as(B, &RESERVE6, &[]);
    lun.state.reset();
    lun.ok(&RESERVE6, &[]);
    lun.ok(&RELEASE6, &[]);
    // Persistent reservations survive both.
    pr(&mut lun, A, 0x00, 0, 0, 7);
    pr(&mut lun, A, 0x01, 0x03, 7, 0); // Exclusive Access
    lun.state.nexus_lost(A);
    lun.state.reset();
    lun.conflicts(B, &cdb16(0x88, 0, 0, 1), &[]);
    lun.ok(&cdb16(0x88, 0, 0, 1), &[]);
}

#[test]
fn reserve_and_release_under_persistent_reservations() {
    let mut lun = Lun::new(100);
    // Registrations without a reservation: RESERVE / RELEASE conflict for everyone.
    pr(&mut lun, A, 0x00, 0, 0, 7);
    lun.conflicts(A, &RESERVE6, &[]);
    lun.conflicts(B, &RESERVE6, &[]);
    lun.conflicts(B, &RELEASE6, &[]);
    // The holder's RESERVE / RELEASE complete and change nothing.
    pr(&mut lun, A, 0x01, 0x01, 7, 0); // Write Exclusive
    lun.ok(&RESERVE6, &[]);
    lun.ok(&RELEASE10, &[]);
    lun.ok_as(B, &MODE_SENSE6, &[]); // no SPC-2 reservation was made
    lun.conflicts(B, &RESERVE6, &[]);
    pr(&mut lun, B, 0x00, 0, 0, 9);
    lun.conflicts(B, &RESERVE6, &[]); // registered, but not the holder of this type
                                      // Registrants-only: every registrant may; the reservation is still A's.
    pr(&mut lun, A, 0x02, 0x01, 7, 0);
    pr(&mut lun, A, 0x01, 0x05, 7, 0);
    lun.ok_as(B, &RESERVE6, &[]);
    lun.ok_as(B, &RELEASE6, &[]);
    let d = lun.ok(&[0x5E, 0x01, 0, 0, 0, 0, 0, 0, 32, 0], &[]);
    assert_eq!(d[21] & 0x0F, 0x05);
    // Without any registration left, SPC-2 rules apply again.
    pr(&mut lun, A, 0x03, 0, 7, 0); // CLEAR
    lun.ok_as(B, &RESERVE6, &[]);
    lun.conflicts(A, &RESERVE6, &[]);
}

#[test]
fn reserve_and_release_cdb_checks() {
    let mut lun = Lun::new(100);
    // 3RDPTY, LONGID, EXTENT and the obsolete fields are refused; the SCSI-1 LUN bits ignored.
    for (i, v) in [(1, 0x10), (1, 0x02), (1, 0x01), (2, 0x01)] {
        let mut c = RESERVE10;
        c[i] = v;
        lun.fails(&c, &[], Sense::INVALID_FIELD_IN_CDB);
    }
    for (i, v) in [(1, 0x01), (1, 0x1E), (2, 1), (4, 8)] {
        let mut c = RESERVE6;
        c[i] = v;
        lun.fails(&c, &[], Sense::INVALID_FIELD_IN_CDB);
        c[0] = 0x17;
        lun.fails(&c, &[], Sense::INVALID_FIELD_IN_CDB);
    }
    lun.ok(&[0x16, 0xE0, 0, 0, 0, 0], &[]);
    lun.conflicts(B, &TUR, &[]);
    // RESERVE (10) takes its parameter list length from the CDB (and ignores the list).
    let mut c = RESERVE10;
    c[8] = 8;
    assert_eq!(data_out_len(&c), Ok(8));
    lun.ok(&c, &[0; 8]);
}

#[test]
fn read_defect_data_reports_empty_lists() {
    let mut lun = Lun::new(100);
    assert_eq!(lun.ok(&[0x37, 0, 0x18, 0, 0, 0, 0, 0, 32, 0], &[]), vec![0, 0x18, 0, 0]);
    assert_eq!(lun.ok(&[0x37, 0, 0x05, 0, 0, 0, 0, 0, 32, 0], &[]), vec![0, 0x05, 0, 0]);
    assert_eq!(lun.ok(&[0x37, 0, 0x10, 0, 0, 0, 0, 0, 2, 0], &[]), vec![0, 0x10]);
    let d = lun.ok(&[0xB7, 0x0B, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], &[]);
    assert_eq!(d, vec![0, 0x0B, 0, 0, 0, 0, 0, 0]);
    lun.fails(&[0x37, 0, 0x01, 0, 0, 0, 0, 0, 32, 0], &[], Sense::INVALID_FIELD_IN_CDB.in_cdb(2, None));
    lun.fails(&[0xB7, 0x07, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], &[], Sense::INVALID_FIELD_IN_CDB.in_cdb(1, None));
}

#[test]
fn report_supported_operation_codes_lists_the_new_commands() {
    let mut lun = Lun::new(100);
    let all = lun.ok(&rsoc(0, 0, 0), &[]);
    let descs: Vec<(u8, u16, bool)> =
        all[4..].chunks(8).map(|d| (d[0], u16::from_be_bytes([d[2], d[3]]), d[5] & 1 == 1)).collect();
    for op in [0x16, 0x17, 0x37, 0x56, 0x57, 0x8B, 0x9C, 0xB7] {
        assert!(descs.contains(&(op, 0, false)), "opcode {op:#04x}");
    }
    for sa in [2, 0x1F] {
        assert!(descs.contains(&(0x48, sa, true)), "SANITIZE {sa:#04x}");
    }
    assert!(!descs.iter().any(|&(op, sa, _)| op == 0x48 && sa == 1), "no OVERWRITE");
    assert!(!descs.iter().any(|&(op, sa, _)| op == 0x48 && sa == 3), "no CRYPTO ERASE");
    // DPO and FUA are honoured, so the usage data of ORWRITE and WRITE ATOMIC shows them.
    for op in [0x8B, 0x9C] {
        let one = lun.ok(&rsoc(1, op, 0), &[]);
        assert_eq!(one[1] & 0x07, 3);
        assert_eq!(one[4], op);
        assert_eq!(one[5] & 0x18, 0x18);
    }
    assert_eq!(lun.ok(&rsoc(2, 0x48, 3), &[])[1] & 0x07, 1);
    // A reporting option that does not fit the opcode points at REPORTING OPTIONS, so that
    // it cannot be mistaken for an unsupported command.
    let bad = Sense::INVALID_FIELD_IN_CDB.in_cdb(2, Some(2));
    lun.fails(&rsoc(2, 0x28, 0), &[], bad);
    lun.fails(&rsoc(1, 0x48, 1), &[], bad);
    lun.fails(&rsoc(5, 0x28, 0), &[], bad);
    // Every listed command is implemented: none answers INVALID COMMAND OPERATION CODE.
    for &(op, sa, _) in &descs {
        let mut cdb = vec![0u8; 16];
        cdb[0] = op;
        cdb[1] = sa as u8;
        assert_ne!(lun.run_as(A, &cdb, &[0; 8192]).sense, Some(Sense::INVALID_OPCODE));
        lun.state.reset();
    }
}

#[test]
fn transfer_length_must_match_for_compare_and_write_and_write_same() {
    let caw = |n: u8| {
        let mut c = cdb16(0x89, 0, 0, 0);
        c[13] = n;
        c
    };
    assert_eq!(check_transfer_length(&caw(2), 2048), Ok(()));
    assert_eq!(check_transfer_length(&caw(1), 2048), Err(Sense::INVALID_FIELD_IN_INFORMATION_UNIT));
    assert_eq!(check_transfer_length(&caw(3), 2048), Err(Sense::INVALID_FIELD_IN_INFORMATION_UNIT));
    assert_eq!(check_transfer_length(&caw(0), 0), Ok(()));
    assert_eq!(check_transfer_length(&caw(0), 1024), Err(Sense::INVALID_FIELD_IN_CDB.in_cdb(13, None)));
    for ws in [write_same10(0, 0, 1), cdb16(0x93, 0x08, 0, 1)] {
        assert_eq!(check_transfer_length(&ws, 512), Ok(()));
        assert_eq!(check_transfer_length(&ws, 256), Err(Sense::INVALID_FIELD_IN_INFORMATION_UNIT));
        assert_eq!(check_transfer_length(&ws, 1024), Err(Sense::INVALID_FIELD_IN_INFORMATION_UNIT));
    }
    assert_eq!(check_transfer_length(&cdb16(0x93, 0x09, 0, 1), 0), Ok(()));
    // Other commands take min(EDTL, what the CDB asks); the transport reports the residual.
    assert_eq!(check_transfer_length(&cdb16(0x8A, 0, 0, 2), 512), Ok(()));
    assert_eq!(check_transfer_length(&cdb16(0x8B, 0, 0, 1), 4096), Ok(()));
    let sanitize_padded = sanitize(0x01, 9);
    assert_eq!(check_transfer_length(&sanitize_padded, 12), Ok(()));
    // Invalid CDBs are left to data_out_len.
    assert_eq!(check_transfer_length(&caw(255), 0), Ok(()));
    assert_eq!(check_transfer_length(&[], 0), Ok(()));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary CDBs of the added opcodes, from two nexuses, with arbitrary data-out, never
    /// panic, never touch the backend out of range (the oracle asserts it) and never ask for
    /// more data-out than one maximal transfer.
    #[test]
    fn added_commands_never_panic(
        op in prop::sample::select(vec![0x16u8, 0x17, 0x37, 0x48, 0x56, 0x57, 0x8B, 0x9C, 0xB7, 0x41, 0x93]),
        rest in prop::collection::vec(any::<u8>(), 0..16),
        data in prop::collection::vec(any::<u8>(), 0..1100),
        second in any::<bool>(),
    ) {
        let mut lun = Lun::new(64);
        let mut cdb = vec![op];
        cdb.extend_from_slice(&rest);
        if let Ok(n) = data_out_len(&cdb) {
            prop_assert!(n <= MAX_TRANSFER_BLOCKS * BS as u32);
        }
        let _ = check_transfer_length(&cdb, data.len() as u32);
        let out = lun.run_as(if second { B } else { A }, &cdb, &data);
        prop_assert_eq!(out.sense.is_some(), out.status == status::CHECK_CONDITION);
        let _ = lun.run_as(A, &cdb, &data);
    }
}
