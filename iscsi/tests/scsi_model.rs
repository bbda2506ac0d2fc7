//! The SCSI block device model against an in-memory oracle device: every command's normal
//! path and error sense, round trips at every CDB size, thin provisioning (UNMAP, WRITE SAME,
//! GET LBA STATUS), COMPARE AND WRITE, persistent reservations between two initiators,
//! Software Write Protect (MODE SELECT of the control page), and property tests (random
//! writes/unmaps/reads, SWP changes and resets against a plain byte vector; arbitrary CDBs
//! never panic).

// Test CDBs are built from small numbers; truncating casts are intended there.
#![allow(clippy::cast_possible_truncation)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use iscsi::scsi::{
    data_out_len, execute, status, Backend, BackendError, LunState, ScsiOutcome, Sense, MAX_TRANSFER_BLOCKS,
};
use proptest::prelude::*;

const BS: usize = 512;
const A: &str = "iqn.2026-11.test:a,isid=1";
const B: &str = "iqn.2026-11.test:b,isid=2";

/// The oracle: a map of written blocks; absent blocks are deallocated and read as zeros.
#[derive(Debug)]
struct MemDisk {
    blocks: RefCell<HashMap<u64, Vec<u8>>>,
    capacity: u64,
    read_only: bool,
    flushes: Cell<u32>,
    fail: Cell<Option<BackendError>>,
}

impl MemDisk {
    fn new(capacity: u64) -> MemDisk {
        MemDisk {
            blocks: RefCell::new(HashMap::new()),
            capacity,
            read_only: false,
            flushes: Cell::new(0),
            fail: Cell::new(None),
        }
    }
    fn new_read_only(capacity: u64) -> MemDisk {
        MemDisk { read_only: true, ..MemDisk::new(capacity) }
    }
    fn fail(&self) -> Result<(), BackendError> {
        match self.fail.get() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
    fn mapped(&self, lba: u64) -> bool {
        self.blocks.borrow().contains_key(&lba)
    }
}

impl Backend for MemDisk {
    fn read(&self, lba: u64, blocks: u32, buf: &mut [u8]) -> Result<(), BackendError> {
        self.fail()?;
        assert_eq!(buf.len(), blocks as usize * BS);
        assert!(lba + u64::from(blocks) <= self.capacity, "model passed an out-of-range read");
        let map = self.blocks.borrow();
        for (i, chunk) in buf.chunks_mut(BS).enumerate() {
            match map.get(&(lba + i as u64)) {
                Some(b) => chunk.copy_from_slice(b),
                None => chunk.fill(0),
            }
        }
        Ok(())
    }
    fn write(&self, lba: u64, data: &[u8]) -> Result<(), BackendError> {
        self.fail()?;
        assert_eq!(data.len() % BS, 0);
        assert!(lba + (data.len() / BS) as u64 <= self.capacity, "model passed an out-of-range write");
        let mut map = self.blocks.borrow_mut();
        for (i, chunk) in data.chunks(BS).enumerate() {
            map.insert(lba + i as u64, chunk.to_vec());
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.fail()?;
        self.flushes.set(self.flushes.get() + 1);
        Ok(())
    }
    fn unmap(&self, ranges: &[(u64, u32)]) -> Result<(), BackendError> {
        self.fail()?;
        let mut map = self.blocks.borrow_mut();
        for &(lba, n) in ranges {
            assert!(lba + u64::from(n) <= self.capacity, "model passed an out-of-range unmap");
            for b in lba..lba + u64::from(n) {
                map.remove(&b);
            }
        }
        Ok(())
    }
    fn block_status(&self, lba: u64) -> Result<(bool, u64), BackendError> {
        self.fail()?;
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
    fn read_only(capacity: u64) -> Lun {
        Lun { disk: MemDisk::new_read_only(capacity), state: LunState::new("snap-0001") }
    }
    fn run_as(&mut self, who: &str, cdb: &[u8], data: &[u8]) -> ScsiOutcome {
        execute(cdb, data, 0, who, &self.disk, &mut self.state)
    }
    fn run(&mut self, cdb: &[u8], data: &[u8]) -> ScsiOutcome {
        self.run_as(A, cdb, data)
    }
    fn ok(&mut self, cdb: &[u8], data: &[u8]) -> Vec<u8> {
        let out = self.run(cdb, data);
        assert_eq!(out.status, status::GOOD, "cdb {cdb:02x?} failed: {:?}", out.sense);
        assert!(out.sense.is_none());
        out.data_in
    }
    fn ok_as(&mut self, who: &str, cdb: &[u8], data: &[u8]) -> Vec<u8> {
        let out = self.run_as(who, cdb, data);
        assert_eq!(out.status, status::GOOD, "cdb {cdb:02x?} from {who} failed: {:?}", out.sense);
        out.data_in
    }
    fn fails(&mut self, cdb: &[u8], data: &[u8], sense: Sense) {
        self.fails_as(A, cdb, data, sense);
    }
    fn fails_as(&mut self, who: &str, cdb: &[u8], data: &[u8], sense: Sense) {
        let out = self.run_as(who, cdb, data);
        assert_eq!(out.status, status::CHECK_CONDITION, "cdb {cdb:02x?} passed");
        let got = out.sense.expect("sense with CHECK CONDITION");
        assert_eq!((got.key, got.asc, got.ascq), (sense.key, sense.asc, sense.ascq), "cdb {cdb:02x?}");
    }
}

fn pattern(blocks: usize, seed: u8) -> Vec<u8> {
    (0..blocks * BS).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) | 1).collect()
}

// CDB builders.
fn rw6(op: u8, lba: u32, n: u8) -> Vec<u8> {
    vec![op, ((lba >> 16) & 0x1F) as u8, (lba >> 8) as u8, lba as u8, n, 0]
}
fn rw10(op: u8, flags: u8, lba: u32, n: u16) -> Vec<u8> {
    let mut c = vec![op, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&n.to_be_bytes());
    c.push(0);
    c
}
fn rw12(op: u8, flags: u8, lba: u32, n: u32) -> Vec<u8> {
    let mut c = vec![op, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&n.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}
fn rw16(op: u8, flags: u8, lba: u64, n: u32) -> Vec<u8> {
    let mut c = vec![op, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&n.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}
fn inquiry(evpd: bool, page: u8, alloc: u16) -> Vec<u8> {
    let a = alloc.to_be_bytes();
    vec![0x12, u8::from(evpd), page, a[0], a[1], 0]
}
fn rc16(alloc: u32) -> Vec<u8> {
    let mut c = vec![0x9E, 0x10];
    c.extend_from_slice(&[0; 8]);
    c.extend_from_slice(&alloc.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}
fn get_lba_status(lba: u64, alloc: u32) -> Vec<u8> {
    let mut c = vec![0x9E, 0x12];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&alloc.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}
fn unmap_cdb(plen: u16) -> Vec<u8> {
    let p = plen.to_be_bytes();
    vec![0x42, 0, 0, 0, 0, 0, 0, p[0], p[1], 0]
}
fn unmap_list(ranges: &[(u64, u32)]) -> Vec<u8> {
    let bd = 16 * ranges.len();
    let mut l = ((bd + 6) as u16).to_be_bytes().to_vec();
    l.extend_from_slice(&(bd as u16).to_be_bytes());
    l.extend_from_slice(&[0; 4]);
    for &(lba, n) in ranges {
        l.extend_from_slice(&lba.to_be_bytes());
        l.extend_from_slice(&n.to_be_bytes());
        l.extend_from_slice(&[0; 4]);
    }
    l
}
fn caw(lba: u64, n: u8, flags: u8) -> Vec<u8> {
    let mut c = vec![0x89, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&[0, 0, 0, n, 0, 0]);
    c
}
fn mode_sense6(dbd: bool, pc: u8, page: u8, alloc: u8) -> Vec<u8> {
    vec![0x1A, if dbd { 0x08 } else { 0 }, (pc << 6) | page, 0, alloc, 0]
}
fn mode_sense10(flags: u8, pc: u8, page: u8, sub: u8, alloc: u16) -> Vec<u8> {
    let a = alloc.to_be_bytes();
    vec![0x5A, flags, (pc << 6) | page, sub, 0, 0, 0, a[0], a[1], 0]
}
fn rsoc(options: u8, opcode: u8, sa: u16, alloc: u32) -> Vec<u8> {
    let mut c = vec![0xA3, 0x0C, options, opcode];
    c.extend_from_slice(&sa.to_be_bytes());
    c.extend_from_slice(&alloc.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}
fn report_luns(select: u8, alloc: u32) -> Vec<u8> {
    let mut c = vec![0xA0, 0, select, 0, 0, 0];
    c.extend_from_slice(&alloc.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}
fn prin(sa: u8) -> Vec<u8> {
    vec![0x5E, sa, 0, 0, 0, 0, 0, 0x10, 0x00, 0]
}
fn prout(sa: u8, kind: u8) -> Vec<u8> {
    vec![0x5F, sa, kind, 0, 0, 0, 0, 0, 24, 0]
}
fn prout_data(key: u64, sa_key: u64) -> Vec<u8> {
    let mut d = key.to_be_bytes().to_vec();
    d.extend_from_slice(&sa_key.to_be_bytes());
    d.extend_from_slice(&[0; 8]);
    d
}

#[test]
fn sense_fixed_format() {
    let s = Sense::MISCOMPARE.with_information(0x1234).to_fixed();
    assert_eq!(s.len(), 18);
    assert_eq!(s[0], 0xF0);
    assert_eq!(s[2], 0x0E);
    assert_eq!(&s[3..7], &[0, 0, 0x12, 0x34]);
    assert_eq!(s[7], 10);
    assert_eq!((s[12], s[13]), (0x1D, 0x00));
    let s = Sense::LBA_OUT_OF_RANGE.to_fixed();
    assert_eq!((s[0], s[2], s[12], s[13]), (0x70, 0x05, 0x21, 0x00));
}

#[test]
fn test_unit_ready_start_stop_prevent_allow() {
    let mut lun = Lun::new(64);
    assert!(lun.ok(&[0, 0, 0, 0, 0, 0], &[]).is_empty());
    lun.ok(&[0x1B, 0, 0, 0, 0x01, 0], &[]);
    lun.ok(&[0x1B, 0, 0, 0, 0x00, 0], &[]);
    // Eject of a non-removable medium is refused, unless a power condition overrides it.
    lun.fails(&[0x1B, 1, 0, 0, 0x02, 0], &[], Sense::INVALID_FIELD_IN_CDB);
    lun.ok(&[0x1B, 1, 0, 0, 0x32, 0], &[]);
    lun.ok(&[0x1E, 0, 0, 0, 0, 0], &[]);
    lun.ok(&[0x1E, 0, 0, 0, 1, 0], &[]);
    lun.fails(&[0x1E, 0, 0, 0, 2, 0], &[], Sense::INVALID_FIELD_IN_CDB);
}

#[test]
fn invalid_opcode_and_service_action() {
    let mut lun = Lun::new(64);
    lun.fails(&[0xFF, 0, 0, 0, 0, 0], &[], Sense::INVALID_OPCODE);
    lun.fails(&[], &[], Sense::INVALID_OPCODE);
    lun.fails(&[0x9E, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], Sense::INVALID_FIELD_IN_CDB);
    lun.fails(&[0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], Sense::INVALID_FIELD_IN_CDB);
    assert_eq!(data_out_len(&[0xFF]), Err(Sense::INVALID_OPCODE));
    assert_eq!(data_out_len(&[]), Err(Sense::INVALID_OPCODE));
}

#[test]
fn request_sense_reports_no_sense() {
    let mut lun = Lun::new(64);
    let d = lun.ok(&[0x03, 0, 0, 0, 252, 0], &[]);
    assert_eq!(d.len(), 18);
    assert_eq!((d[0], d[2], d[12]), (0x70, 0, 0));
    lun.fails(&[0x03, 1, 0, 0, 252, 0], &[], Sense::INVALID_FIELD_IN_CDB);
}

#[test]
fn inquiry_standard_data() {
    let mut lun = Lun::new(64);
    let d = lun.ok(&inquiry(false, 0, 255), &[]);
    assert_eq!(d.len(), 74);
    assert_eq!(d[0], 0x00);
    assert_eq!(d[1] & 0x80, 0, "not removable");
    assert_eq!(d[2], 0x06);
    assert_eq!(d[3] & 0x0F, 2);
    assert_eq!(usize::from(d[4]) + 5, d.len());
    assert_eq!(&d[8..16], b"FORKD   ");
    assert_eq!(d[7] & 0x02, 0x02);
    assert_eq!(lun.ok(&inquiry(false, 0, 36), &[]).len(), 36);
    assert_eq!(lun.ok(&inquiry(false, 0, 5), &[]), d[..5].to_vec());
    lun.fails(&inquiry(false, 0x80, 255), &[], Sense::INVALID_FIELD_IN_CDB);
    lun.fails(&[0x12, 0x02, 0, 0, 255, 0], &[], Sense::INVALID_FIELD_IN_CDB);
}

#[test]
fn inquiry_vpd_pages() {
    let mut lun = Lun::new(64);
    let d = lun.ok(&inquiry(true, 0x00, 255), &[]);
    assert_eq!(&d[..4], &[0, 0, 0, 6]);
    assert_eq!(&d[4..], &[0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);
    for &page in &d[4..] {
        let p = lun.ok(&inquiry(true, page, 1024), &[]);
        assert_eq!(p[1], page);
        assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])) + 4, p.len());
    }

    let serial = lun.ok(&inquiry(true, 0x80, 255), &[]);
    assert_eq!(&serial[4..], lun.state.serial().as_bytes());
    assert_eq!(lun.state.serial(), LunState::new("vol-0001").serial());
    assert_ne!(lun.state.serial(), LunState::new("vol-0002").serial());

    let id = lun.ok(&inquiry(true, 0x83, 1024), &[]);
    // First designator: NAA, binary, LU, 8 bytes, NAA nibble 3.
    assert_eq!(&id[4..8], &[0x01, 0x03, 0x00, 8]);
    assert_eq!(&id[8..16], &lun.state.naa());
    assert_eq!(id[8] >> 4, 3);
    // Second: T10 vendor ID, ASCII, with the volume id.
    assert_eq!(&id[16..18], &[0x02, 0x01]);
    let len = usize::from(id[19]);
    assert_eq!(&id[20..20 + len], b"FORKD   vol-0001");

    let bl = lun.ok(&inquiry(true, 0xB0, 255), &[]);
    assert_eq!(bl.len(), 64);
    assert_eq!(bl[4] & 1, 1, "WSNZ");
    assert_eq!(u16::from_be_bytes([bl[6], bl[7]]), 8);
    assert_eq!(u32::from_be_bytes([bl[8], bl[9], bl[10], bl[11]]), MAX_TRANSFER_BLOCKS);
    assert!(u32::from_be_bytes([bl[20], bl[21], bl[22], bl[23]]) > 0, "max unmap LBA count");
    assert!(u32::from_be_bytes([bl[24], bl[25], bl[26], bl[27]]) > 0, "max unmap descriptors");
    assert_eq!(u32::from_be_bytes([bl[28], bl[29], bl[30], bl[31]]), 8, "optimal unmap granularity");

    let bdc = lun.ok(&inquiry(true, 0xB1, 255), &[]);
    assert_eq!(u16::from_be_bytes([bdc[4], bdc[5]]), 1);

    let lbp = lun.ok(&inquiry(true, 0xB2, 255), &[]);
    assert_eq!(lbp[5] & 0x80, 0x80, "LBPU");
    assert_eq!(lbp[5] & 0x40, 0x40, "LBPWS");
    assert_eq!(lbp[5] & 0x20, 0x20, "LBPWS10");
    assert_eq!(lbp[5] & 0x04, 0x04, "LBPRZ");
    assert_eq!(lbp[6] & 0x07, 2, "thin");

    lun.fails(&inquiry(true, 0x86, 255), &[], Sense::INVALID_FIELD_IN_CDB);
    assert_eq!(lun.ok(&inquiry(true, 0x83, 6), &[]).len(), 6);
}

#[test]
fn other_luns_do_not_exist() {
    let mut lun = Lun::new(64);
    let d = execute(&inquiry(false, 0, 96), &[], 1, A, &lun.disk, &mut lun.state);
    assert_eq!(d.status, status::GOOD);
    assert_eq!(d.data_in[0], 0x7F);
    let r = execute(&rw10(0x28, 0, 0, 1), &[], 1, A, &lun.disk, &mut lun.state);
    assert_eq!(r.sense, Some(Sense::LUN_NOT_SUPPORTED));
    let rl = execute(&report_luns(0, 64), &[], 3, A, &lun.disk, &mut lun.state);
    assert_eq!(rl.status, status::GOOD);
}

#[test]
fn read_capacity() {
    let mut lun = Lun::new(1000);
    let d = lun.ok(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(d, [0, 0, 0x03, 0xE7, 0, 0, 0x02, 0x00]);
    lun.fails(&[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0], &[], Sense::INVALID_FIELD_IN_CDB);
    let d = lun.ok(&rc16(32), &[]);
    assert_eq!(d.len(), 32);
    assert_eq!(u64::from_be_bytes(d[0..8].try_into().unwrap()), 999);
    assert_eq!(u32::from_be_bytes(d[8..12].try_into().unwrap()), 512);
    assert_eq!(d[13] & 0x0F, 3, "4096-byte physical blocks");
    assert_eq!(d[14] & 0xC0, 0xC0, "LBPME and LBPRZ");
    assert_eq!(lun.ok(&rc16(12), &[]).len(), 12);

    let mut big = Lun::new(1 << 40);
    let d = big.ok(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(&d[..4], &[0xFF; 4]);
}

#[test]
fn mode_sense_pages() {
    let mut lun = Lun::new(1000);
    let d = lun.ok(&mode_sense6(false, 0, 0x08, 255), &[]);
    assert_eq!(usize::from(d[0]) + 1, d.len());
    assert_eq!(d[2] & 0x80, 0, "not write protected");
    assert_eq!(d[2] & 0x10, 0x10, "DPOFUA");
    assert_eq!(d[3], 8);
    assert_eq!(&d[4..8], &1000u32.to_be_bytes());
    assert_eq!(&d[9..12], &[0, 2, 0]);
    assert_eq!(&d[12..14], &[0x08, 0x12]);
    assert_eq!(d[14] & 0x04, 0x04, "WCE");

    let d = lun.ok(&mode_sense6(true, 0, 0x0A, 255), &[]);
    assert_eq!(d[3], 0);
    assert_eq!(&d[4..6], &[0x0A, 0x0A]);
    assert_eq!(d.len(), 16);

    let all = lun.ok(&mode_sense6(true, 0, 0x3F, 255), &[]);
    assert_eq!(all.len(), 4 + 20 + 12);
    let all_sub = lun.ok(&[0x1A, 0x08, 0x3F, 0xFF, 255, 0], &[]);
    assert_eq!(all, all_sub);

    let ch = lun.ok(&mode_sense6(true, 1, 0x08, 255), &[]);
    assert_eq!(ch[6] & 0x04, 0, "WCE is not changeable");
    let def = lun.ok(&mode_sense6(true, 2, 0x08, 255), &[]);
    assert_eq!(def[6] & 0x04, 0x04);
    lun.fails(&mode_sense6(true, 3, 0x08, 255), &[], Sense::SAVING_PARAMETERS_NOT_SUPPORTED);
    lun.fails(&mode_sense6(true, 0, 0x19, 255), &[], Sense::INVALID_FIELD_IN_CDB);
    lun.fails(&[0x1A, 0x08, 0x08, 0x01, 255, 0], &[], Sense::INVALID_FIELD_IN_CDB);
    assert_eq!(lun.ok(&mode_sense6(false, 0, 0x3F, 4), &[]).len(), 4);

    let d = lun.ok(&mode_sense10(0, 0, 0x08, 0, 1024), &[]);
    assert_eq!(usize::from(u16::from_be_bytes([d[0], d[1]])) + 2, d.len());
    assert_eq!(u16::from_be_bytes([d[6], d[7]]), 8);
    assert_eq!(&d[16..18], &[0x08, 0x12]);
    let d = lun.ok(&mode_sense10(0x10, 0, 0x08, 0, 1024), &[]);
    assert_eq!(d[4] & 1, 1, "LONGLBA");
    assert_eq!(u16::from_be_bytes([d[6], d[7]]), 16);
    assert_eq!(&d[8..16], &1000u64.to_be_bytes());
    let d = lun.ok(&mode_sense10(0x08, 0, 0x3F, 0, 1024), &[]);
    assert_eq!(d.len(), 8 + 32);
    lun.fails(&mode_sense10(0x08, 3, 0x3F, 0, 1024), &[], Sense::SAVING_PARAMETERS_NOT_SUPPORTED);

    let mut ro = Lun::read_only(1000);
    assert_eq!(ro.ok(&mode_sense6(true, 0, 0x3F, 255), &[])[2] & 0x80, 0x80, "WP");
    assert_eq!(ro.ok(&mode_sense10(0x08, 0, 0x3F, 0, 255), &[])[3] & 0x80, 0x80, "WP");
}

#[test]
fn mode_select() {
    let mut lun = Lun::new(1000);
    // What MODE SENSE returned, with the mode data length zeroed, goes back unchanged.
    let mut list = lun.ok(&mode_sense6(false, 0, 0x08, 255), &[]);
    list[0] = 0;
    lun.ok(&[0x15, 0x10, 0, 0, list.len() as u8, 0], &list);
    let mut list10 = lun.ok(&mode_sense10(0x08, 0, 0x3F, 0, 1024), &[]);
    list10[0] = 0;
    list10[1] = 0;
    lun.ok(&[0x55, 0x10, 0, 0, 0, 0, 0, 0, list10.len() as u8, 0], &list10);
    lun.ok(&[0x15, 0x10, 0, 0, 0, 0], &[]);

    let mut wce_off = list.clone();
    wce_off[14] &= !0x04;
    lun.fails(&[0x15, 0x10, 0, 0, wce_off.len() as u8, 0], &wce_off, Sense::INVALID_FIELD_IN_PARAMETER_LIST);
    let mut bad_block = list.clone();
    bad_block[10] = 0x10;
    lun.fails(&[0x15, 0x10, 0, 0, bad_block.len() as u8, 0], &bad_block, Sense::INVALID_FIELD_IN_PARAMETER_LIST);
    let unknown = [0, 0, 0, 0, 0x19, 0x02, 0, 0];
    lun.fails(&[0x15, 0x10, 0, 0, 8, 0], &unknown, Sense::INVALID_FIELD_IN_PARAMETER_LIST);
    lun.fails(&[0x15, 0x11, 0, 0, list.len() as u8, 0], &list, Sense::INVALID_FIELD_IN_CDB);
    lun.fails(&[0x15, 0x10, 0, 0, 3, 0], &list[..3], Sense::PARAMETER_LIST_LENGTH_ERROR);
    lun.fails(&[0x15, 0x10, 0, 0, 16, 0], &list[..16], Sense::PARAMETER_LIST_LENGTH_ERROR);
    lun.fails(&[0x15, 0x10, 0, 0, 32, 0], &list[..8], Sense::PARAMETER_LIST_LENGTH_ERROR);
    assert_eq!(data_out_len(&[0x15, 0x10, 0, 0, 32, 0]), Ok(32));
    assert_eq!(data_out_len(&[0x55, 0x10, 0, 0, 0, 0, 0, 1, 2, 0]), Ok(258));
}

/// The control mode page (DBD, current values) with SWP set to `on`, as a MODE SELECT (6)
/// or (10) parameter list: what the initiator read, with the mode data length zeroed.
fn control_page_list(lun: &mut Lun, who: &str, on: bool, ten: bool) -> (Vec<u8>, Vec<u8>) {
    let (mut list, header) = if ten {
        (lun.ok_as(who, &mode_sense10(0x08, 0, 0x0A, 0, 255), &[]), 8)
    } else {
        (lun.ok_as(who, &mode_sense6(true, 0, 0x0A, 255), &[]), 4)
    };
    list[0] = 0;
    if ten {
        list[1] = 0;
    }
    assert_eq!(&list[header..header + 2], &[0x0A, 0x0A]);
    if on {
        list[header + 4] |= 0x08;
    } else {
        list[header + 4] &= !0x08;
    }
    let cdb = if ten {
        vec![0x55, 0x10, 0, 0, 0, 0, 0, 0, list.len() as u8, 0]
    } else {
        vec![0x15, 0x10, 0, 0, list.len() as u8, 0]
    };
    (cdb, list)
}

fn set_swp(lun: &mut Lun, who: &str, on: bool, ten: bool) {
    let (cdb, list) = control_page_list(lun, who, on, ten);
    lun.ok_as(who, &cdb, &list);
}

/// SWP (byte 4 bit 3 of the control page) and the WP bit of the mode parameter header, as
/// MODE SENSE (6) and (10) report them to `who`.
fn swp_and_wp(lun: &mut Lun, who: &str) -> (bool, bool) {
    let six = lun.ok_as(who, &mode_sense6(true, 0, 0x0A, 255), &[]);
    let ten = lun.ok_as(who, &mode_sense10(0x08, 0, 0x0A, 0, 255), &[]);
    assert_eq!(six[4 + 4] & 0x08, ten[8 + 4] & 0x08, "SWP in MODE SENSE 6 and 10");
    assert_eq!(six[2] & 0x80, ten[3] & 0x80, "WP in MODE SENSE 6 and 10");
    (six[4 + 4] & 0x08 != 0, six[2] & 0x80 != 0)
}

/// Every command that changes the medium, with its data-out.
fn medium_changing_commands() -> Vec<(Vec<u8>, Vec<u8>)> {
    let one = pattern(1, 9);
    let mut erase = vec![0x48, 0x02];
    erase.extend_from_slice(&[0; 8]);
    vec![
        (rw6(0x0A, 0, 1), one.clone()),
        (rw10(0x2A, 0x08, 0, 1), one.clone()),
        (rw12(0xAA, 0, 0, 1), one.clone()),
        (rw16(0x8A, 0, 0, 1), one.clone()),
        (rw10(0x2E, 0, 0, 1), one.clone()),
        (rw12(0xAE, 0, 0, 1), one.clone()),
        (rw16(0x8E, 0, 0, 1), one.clone()),
        (rw10(0x41, 0, 0, 4), one.clone()),
        (rw10(0x41, 0x08, 0, 4), vec![0; 512]),
        (rw16(0x93, 0, 0, 4), one.clone()),
        (rw16(0x93, 0x09, 0, 4), vec![]),
        (unmap_cdb(24), unmap_list(&[(0, 8)])),
        (caw(0, 1, 0), [pattern(1, 1), one.clone()].concat()),
        (rw16(0x8B, 0, 0, 1), one.clone()),
        (rw16(0x9C, 0, 0, 1), one.clone()),
        (erase, vec![]),
    ]
}

#[test]
fn software_write_protect_is_the_one_changeable_bit() {
    let mut lun = Lun::new(100);
    let ch = lun.ok(&mode_sense6(true, 1, 0x0A, 255), &[]);
    assert_eq!(&ch[4..6], &[0x0A, 0x0A]);
    assert_eq!(ch[4 + 4], 0x08, "SWP is changeable");
    let all = lun.ok(&mode_sense6(true, 1, 0x3F, 255), &[]);
    let mut expected = vec![0x08, 0x12];
    expected.resize(20, 0);
    expected.extend_from_slice(&[0x0A, 0x0A, 0, 0, 0x08, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&all[4..], &expected[..], "nothing but SWP is changeable");
    assert_eq!(swp_and_wp(&mut lun, A), (false, false));
    // The default is off, whatever the current value.
    set_swp(&mut lun, A, true, false);
    assert_eq!(lun.ok(&mode_sense6(true, 2, 0x0A, 255), &[])[4 + 4] & 0x08, 0);
    assert!(lun.state.software_write_protect());
}

#[test]
fn software_write_protect_refuses_every_medium_change_from_every_nexus() {
    let mut lun = Lun::new(100);
    lun.ok(&rw10(0x2A, 0, 0, 8), &pattern(8, 4));
    // Set by B through MODE SELECT (10); A sees it and is refused too.
    set_swp(&mut lun, B, true, true);
    assert_eq!(swp_and_wp(&mut lun, A), (true, true));
    assert_eq!(swp_and_wp(&mut lun, B), (true, true));
    let flushes = lun.disk.flushes.get();
    for who in [A, B] {
        for (c, d) in medium_changing_commands() {
            lun.fails_as(who, &c, &d, Sense::WRITE_PROTECTED);
        }
    }
    assert_eq!(lun.disk.flushes.get(), flushes, "nothing was written, nothing flushed");
    assert_eq!(lun.ok(&rw10(0x28, 0, 0, 8), &[]), pattern(8, 4), "the medium is unchanged");
    // Reading, verifying, flushing and the rest still work.
    lun.ok(&rw10(0x2F, 0x02, 0, 8), &pattern(8, 4));
    lun.ok(&rw10(0x35, 0, 0, 0), &[]);
    lun.ok(&rw16(0x91, 0, 0, 0), &[]);
    lun.ok(&rw10(0x34, 0, 0, 8), &[]);
    lun.ok(&get_lba_status(0, 64), &[]);
    lun.ok(&[0; 6], &[]);
    lun.ok(&[0x48, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0], &[]); // SANITIZE EXIT FAILURE MODE changes nothing
                                                        // Cleared by A through MODE SELECT (6): writes work again.
    set_swp(&mut lun, A, false, false);
    assert_eq!(swp_and_wp(&mut lun, B), (false, false));
    for (c, d) in medium_changing_commands() {
        let out = lun.run_as(B, &c, &d);
        assert_ne!(out.sense, Some(Sense::WRITE_PROTECTED), "cdb {c:02x?}");
    }
}

#[test]
fn software_write_protect_outlives_its_nexus_and_ends_with_a_reset() {
    let mut lun = Lun::new(100);
    set_swp(&mut lun, B, true, false);
    lun.state.nexus_lost(B);
    assert_eq!(swp_and_wp(&mut lun, A), (true, true), "a mode parameter of the LU, not of the nexus");
    lun.fails(&rw10(0x2A, 0, 0, 1), &pattern(1, 0), Sense::WRITE_PROTECTED);
    lun.state.reset();
    assert_eq!(swp_and_wp(&mut lun, A), (false, false), "a reset restores the default");
    lun.ok(&rw10(0x2A, 0, 0, 1), &pattern(1, 0));
}

#[test]
fn mode_select_changes_nothing_but_swp() {
    let mut lun = Lun::new(100);
    // Another control page bit along with SWP (D_SENSE, QUEUE ALGORITHM MODIFIER, BUSY TIMEOUT).
    for (at, bits) in [(4 + 2, 0x04u8), (4 + 3, 0x10), (4 + 8, 0x01)] {
        let (cdb, mut list) = control_page_list(&mut lun, A, true, false);
        list[at] ^= bits;
        lun.fails(&cdb, &list, Sense::INVALID_FIELD_IN_PARAMETER_LIST);
        assert!(!lun.state.software_write_protect(), "a refused list changes nothing");
    }
    // A list that sets SWP, then fails on the caching page, changes nothing either.
    let (_, mut list) = control_page_list(&mut lun, A, true, false);
    let caching = lun.ok(&mode_sense6(true, 0, 0x08, 255), &[]);
    let mut caching_page = caching[4..].to_vec();
    caching_page[2] &= !0x04; // WCE off: not changeable
    list.extend_from_slice(&caching_page);
    lun.fails(&[0x15, 0x10, 0, 0, list.len() as u8, 0], &list, Sense::INVALID_FIELD_IN_PARAMETER_LIST);
    assert!(!lun.state.software_write_protect());
    // The same list with the caching page as it is: SWP is set.
    let len = list.len();
    list[len - caching_page.len() + 2] |= 0x04;
    lun.ok(&[0x15, 0x10, 0, 0, list.len() as u8, 0], &list);
    assert!(lun.state.software_write_protect());
    // A page of the wrong length is refused.
    let (cdb, mut short) = control_page_list(&mut lun, A, false, false);
    short[5] = 0x09;
    short.pop();
    let mut cdb = cdb;
    cdb[4] = short.len() as u8;
    lun.fails(&cdb, &short, Sense::INVALID_FIELD_IN_PARAMETER_LIST);
    assert!(lun.state.software_write_protect());
}

#[test]
fn read_only_lun_stays_write_protected_without_swp() {
    let mut lun = Lun::read_only(100);
    assert_eq!(swp_and_wp(&mut lun, A), (false, true));
    set_swp(&mut lun, A, true, false);
    assert_eq!(swp_and_wp(&mut lun, A), (true, true));
    set_swp(&mut lun, A, false, true);
    assert_eq!(swp_and_wp(&mut lun, A), (false, true));
    lun.fails(&rw10(0x2A, 0, 0, 1), &pattern(1, 0), Sense::WRITE_PROTECTED);
}

#[test]
fn report_luns_lists_lun_zero() {
    let mut lun = Lun::new(64);
    let d = lun.ok(&report_luns(0, 64), &[]);
    assert_eq!(d, [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let d = lun.ok(&report_luns(1, 64), &[]);
    assert_eq!(d, [0; 8]);
    lun.fails(&report_luns(0, 15), &[], Sense::INVALID_FIELD_IN_CDB);
    lun.fails(&report_luns(0x10, 64), &[], Sense::INVALID_FIELD_IN_CDB);
}

#[test]
fn read_write_round_trips_at_every_cdb_size() {
    let mut lun = Lun::new(4096);
    let cases: Vec<(Vec<u8>, Vec<u8>, usize)> = vec![
        (rw6(0x0A, 10, 3), rw6(0x08, 10, 3), 3),
        (rw10(0x2A, 0, 100, 8), rw10(0x28, 0, 100, 8), 8),
        (rw12(0xAA, 0, 200, 5), rw12(0xA8, 0, 200, 5), 5),
        (rw16(0x8A, 0, 300, 17), rw16(0x88, 0, 300, 17), 17),
        (rw10(0x2E, 0, 400, 2), rw10(0x28, 0, 400, 2), 2),
        (rw12(0xAE, 0, 500, 2), rw12(0xA8, 0, 500, 2), 2),
        (rw16(0x8E, 0, 600, 2), rw16(0x88, 0, 600, 2), 2),
    ];
    for (i, (w, r, n)) in cases.into_iter().enumerate() {
        let data = pattern(n, i as u8);
        assert_eq!(data_out_len(&w), Ok((n * BS) as u32));
        assert_eq!(data_out_len(&r), Ok(0));
        lun.ok(&w, &data);
        assert_eq!(lun.ok(&r, &[]), data);
    }
    // READ (6) / WRITE (6) with length 0 transfer 256 blocks.
    let data = pattern(256, 9);
    assert_eq!(data_out_len(&rw6(0x0A, 1000, 0)), Ok(256 * 512));
    lun.ok(&rw6(0x0A, 1000, 0), &data);
    assert_eq!(lun.ok(&rw6(0x08, 1000, 0), &[]), data);
    // Zero-length READ/WRITE (10..16) do nothing.
    assert!(lun.ok(&rw10(0x28, 0, 0, 0), &[]).is_empty());
    assert!(lun.ok(&rw16(0x8A, 0, 0, 0), &[]).is_empty());
}

#[test]
fn fua_and_write_and_verify_flush() {
    let mut lun = Lun::new(64);
    lun.ok(&rw10(0x2A, 0, 0, 1), &pattern(1, 1));
    assert_eq!(lun.disk.flushes.get(), 0);
    lun.ok(&rw10(0x2A, 0x08, 0, 1), &pattern(1, 1));
    assert_eq!(lun.disk.flushes.get(), 1);
    lun.ok(&rw16(0x8A, 0x08, 0, 1), &pattern(1, 1));
    lun.ok(&rw12(0xAA, 0x08, 0, 1), &pattern(1, 1));
    assert_eq!(lun.disk.flushes.get(), 3);
    lun.ok(&rw10(0x2E, 0x02, 0, 1), &pattern(1, 1));
    assert_eq!(lun.disk.flushes.get(), 4);
    // DPO and FUA on a read are accepted.
    lun.ok(&rw10(0x28, 0x18, 0, 1), &[]);
}

#[test]
fn read_write_errors() {
    let mut lun = Lun::new(100);
    for c in [
        rw6(0x08, 100, 1),
        rw6(0x08, 99, 2),
        rw10(0x28, 0, 100, 1),
        rw10(0x28, 0, 100, 0),
        rw10(0x28, 0, 95, 6),
        rw12(0xA8, 0, 0, 101),
        rw16(0x88, 0, u64::MAX, 1),
        rw16(0x88, 0, 1 << 63, 1),
        rw16(0x88, 0, 99, 2),
        rw10(0x2A, 0, 100, 1),
        rw12(0xAA, 0, 99, 2),
        rw16(0x8A, 0, u64::MAX, 2),
        rw10(0x2F, 0, 100, 1),
        rw16(0x8F, 0, 100, 0),
        rw10(0x35, 0, 100, 1),
        rw16(0x91, 0, 99, 2),
        rw10(0x34, 0, 100, 1),
        rw16(0x90, 0, 100, 1),
    ] {
        let data = vec![0u8; data_out_len(&c).unwrap() as usize];
        lun.fails(&c, &data, Sense::LBA_OUT_OF_RANGE);
    }
    // Over the maximum transfer length.
    lun.fails(&rw16(0x88, 0, 0, MAX_TRANSFER_BLOCKS + 1), &[], Sense::INVALID_FIELD_IN_CDB);
    assert_eq!(data_out_len(&rw16(0x8A, 0, 0, MAX_TRANSFER_BLOCKS + 1)), Err(Sense::INVALID_FIELD_IN_CDB));
    assert_eq!(data_out_len(&rw16(0x8A, 0, 0, u32::MAX)), Err(Sense::INVALID_FIELD_IN_CDB));
    // No protection information.
    lun.fails(&rw10(0x28, 0x20, 0, 1), &[], Sense::INVALID_FIELD_IN_CDB);
    lun.fails(&rw10(0x2A, 0x20, 0, 1), &pattern(1, 0), Sense::INVALID_FIELD_IN_CDB);
    // Fewer data-out bytes than announced.
    lun.fails(&rw10(0x2A, 0, 0, 2), &pattern(1, 0), Sense::INVALID_FIELD_IN_INFORMATION_UNIT);
}

#[test]
fn read_only_lun_refuses_writes() {
    let mut lun = Lun::read_only(100);
    let one = pattern(1, 3);
    for (c, d) in [
        (rw6(0x0A, 0, 1), one.clone()),
        (rw10(0x2A, 0, 0, 1), one.clone()),
        (rw12(0xAA, 0, 0, 1), one.clone()),
        (rw16(0x8A, 0, 0, 1), one.clone()),
        (rw10(0x2E, 0, 0, 1), one.clone()),
        (rw10(0x41, 0x08, 0, 4), vec![0; 512]),
        (rw16(0x93, 0x09, 0, 4), vec![]),
        (unmap_cdb(24), unmap_list(&[(0, 8)])),
        (caw(0, 1, 0), vec![0; 1024]),
    ] {
        lun.fails(&c, &d, Sense::WRITE_PROTECTED);
    }
    assert_eq!(lun.ok(&rw10(0x28, 0, 0, 1), &[]), vec![0; 512]);
    lun.ok(&rw10(0x35, 0, 0, 0), &[]);
}

#[test]
fn backend_errors_map_to_sense() {
    let mut lun = Lun::new(100);
    lun.disk.fail.set(Some(BackendError::Io));
    lun.fails(&rw10(0x28, 0, 0, 1), &[], Sense::UNRECOVERED_READ_ERROR);
    lun.fails(&rw10(0x2A, 0, 0, 1), &pattern(1, 0), Sense::WRITE_ERROR);
    lun.fails(&rw10(0x35, 0, 0, 0), &[], Sense::WRITE_ERROR);
    lun.fails(&unmap_cdb(24), &unmap_list(&[(0, 8)]), Sense::WRITE_ERROR);
    lun.fails(&get_lba_status(0, 64), &[], Sense::UNRECOVERED_READ_ERROR);
    lun.disk.fail.set(Some(BackendError::NoSpace));
    lun.fails(&rw10(0x2A, 0, 0, 1), &pattern(1, 0), Sense::SPACE_ALLOCATION_FAILED);
    lun.disk.fail.set(Some(BackendError::ReadOnly));
    lun.fails(&rw10(0x2A, 0, 0, 1), &pattern(1, 0), Sense::WRITE_PROTECTED);
    lun.disk.fail.set(None);
    lun.ok(&rw10(0x2A, 0, 0, 1), &pattern(1, 0));
}

#[test]
fn verify() {
    let mut lun = Lun::new(100);
    let data = pattern(4, 5);
    lun.ok(&rw10(0x2A, 0, 10, 4), &data);
    // BYTCHK 0: range check only.
    assert_eq!(data_out_len(&rw10(0x2F, 0, 10, 4)), Ok(0));
    lun.ok(&rw10(0x2F, 0, 10, 4), &[]);
    lun.ok(&rw12(0xAF, 0, 10, 4), &[]);
    lun.ok(&rw16(0x8F, 0, 10, 4), &[]);
    // BYTCHK 1: compare.
    assert_eq!(data_out_len(&rw10(0x2F, 0x02, 10, 4)), Ok(2048));
    lun.ok(&rw10(0x2F, 0x02, 10, 4), &data);
    lun.ok(&rw16(0x8F, 0x02, 10, 4), &data);
    let mut bad = data.clone();
    bad[700] ^= 0xFF;
    let out = lun.run(&rw10(0x2F, 0x02, 10, 4), &bad);
    assert_eq!(out.sense, Some(Sense::MISCOMPARE.with_information(700)));
    // BYTCHK 3: one block against each.
    let same = pattern(1, 8);
    lun.ok(&rw10(0x2A, 0, 20, 1), &same);
    lun.ok(&rw10(0x2A, 0, 21, 1), &same);
    assert_eq!(data_out_len(&rw10(0x2F, 0x06, 20, 2)), Ok(512));
    lun.ok(&rw10(0x2F, 0x06, 20, 2), &same);
    lun.fails(&rw10(0x2F, 0x06, 20, 3), &same, Sense::MISCOMPARE);
    // BYTCHK 2 is reserved.
    lun.fails(&rw10(0x2F, 0x04, 20, 1), &same, Sense::INVALID_FIELD_IN_CDB);
    assert_eq!(data_out_len(&rw10(0x2F, 0x04, 20, 1)), Err(Sense::INVALID_FIELD_IN_CDB));
    lun.fails(&rw10(0x2F, 0x20, 20, 1), &[], Sense::INVALID_FIELD_IN_CDB);
}

#[test]
fn synchronize_cache_and_pre_fetch() {
    let mut lun = Lun::new(100);
    lun.ok(&rw10(0x35, 0, 0, 0), &[]);
    lun.ok(&rw16(0x91, 0x02, 50, 50), &[]);
    assert_eq!(lun.disk.flushes.get(), 2);
    lun.ok(&rw10(0x34, 0, 0, 100), &[]);
    lun.ok(&rw16(0x90, 0, 99, 1), &[]);
}

fn lba_status(lun: &mut Lun, lba: u64) -> Vec<(u64, u32, u8)> {
    let d = lun.ok(&get_lba_status(lba, 4096), &[]);
    let len = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, d.len());
    d[8..]
        .chunks(16)
        .map(|x| {
            (u64::from_be_bytes(x[0..8].try_into().unwrap()), u32::from_be_bytes(x[8..12].try_into().unwrap()), x[12])
        })
        .collect()
}

#[test]
fn unmap_then_get_lba_status_shows_deallocated_and_reads_zeros() {
    let mut lun = Lun::new(64);
    lun.ok(&rw10(0x2A, 0, 0, 64), &pattern(64, 1));
    assert_eq!(lba_status(&mut lun, 0), vec![(0, 64, 0)]);
    let list = unmap_list(&[(8, 8), (32, 16)]);
    assert_eq!(data_out_len(&unmap_cdb(list.len() as u16)), Ok(list.len() as u32));
    lun.ok(&unmap_cdb(list.len() as u16), &list);
    assert_eq!(lba_status(&mut lun, 0), vec![(0, 8, 0), (8, 8, 1), (16, 16, 0), (32, 16, 1), (48, 16, 0)]);
    assert_eq!(lba_status(&mut lun, 10), vec![(10, 6, 1), (16, 16, 0), (32, 16, 1), (48, 16, 0)]);
    assert_eq!(lun.ok(&rw10(0x28, 0, 8, 8), &[]), vec![0; 8 * BS]);
    assert_eq!(lun.ok(&rw16(0x88, 0, 30, 4), &[])[..2 * BS], pattern(64, 1)[30 * BS..32 * BS]);
    assert_eq!(lun.ok(&rw16(0x88, 0, 30, 4), &[])[2 * BS..], vec![0; 2 * BS]);
    // Allocation length truncates; 24 bytes hold one descriptor.
    assert_eq!(lun.ok(&get_lba_status(0, 24), &[]).len(), 24);
    assert_eq!(lun.ok(&get_lba_status(0, 0), &[]).len(), 0);
    lun.fails(&get_lba_status(64, 64), &[], Sense::LBA_OUT_OF_RANGE);
    lun.fails(&get_lba_status(u64::MAX, 64), &[], Sense::LBA_OUT_OF_RANGE);
}

#[test]
fn unmap_errors() {
    let mut lun = Lun::new(64);
    lun.ok(&unmap_cdb(0), &[]);
    // Empty descriptor list and zero-length descriptors are fine.
    lun.ok(&unmap_cdb(8), &unmap_list(&[]));
    lun.ok(&unmap_cdb(24), &unmap_list(&[(63, 0)]));
    lun.fails(&unmap_cdb(24), &unmap_list(&[(60, 8)]), Sense::LBA_OUT_OF_RANGE);
    lun.fails(&unmap_cdb(24), &unmap_list(&[(u64::MAX, 2)]), Sense::LBA_OUT_OF_RANGE);
    lun.fails(&unmap_cdb(6), &[0; 6], Sense::PARAMETER_LIST_LENGTH_ERROR);
    let list = unmap_list(&[(0, 8)]);
    lun.fails(&unmap_cdb(24), &list[..16], Sense::PARAMETER_LIST_LENGTH_ERROR);
    let mut long_bd = list.clone();
    long_bd[3] = 32;
    lun.fails(&unmap_cdb(24), &long_bd, Sense::PARAMETER_LIST_LENGTH_ERROR);
    let many: Vec<(u64, u32)> = (0..300).map(|i| (i % 64, 0)).collect();
    let many = unmap_list(&many);
    lun.fails(&unmap_cdb(many.len() as u16), &many, Sense::INVALID_FIELD_IN_PARAMETER_LIST);
    lun.fails(&[0x42, 1, 0, 0, 0, 0, 0, 0, 24, 0], &list, Sense::INVALID_FIELD_IN_CDB);
    // A failing descriptor leaves the earlier ones untouched.
    lun.ok(&rw10(0x2A, 0, 0, 8), &pattern(8, 2));
    lun.fails(&unmap_cdb(40), &unmap_list(&[(0, 8), (64, 1)]), Sense::LBA_OUT_OF_RANGE);
    assert_eq!(lba_status(&mut lun, 0)[0], (0, 8, 0));
    // A partial trailing descriptor is ignored.
    let mut partial = unmap_list(&[(0, 8)]);
    partial.extend_from_slice(&[0; 8]);
    partial[3] = 24;
    lun.ok(&unmap_cdb(partial.len() as u16), &partial);
    assert_eq!(lba_status(&mut lun, 0)[0], (0, 64, 1));
}

#[test]
fn write_same() {
    let mut lun = Lun::new(8192);
    let block = pattern(1, 4);
    lun.ok(&rw10(0x41, 0, 10, 5), &block);
    assert_eq!(lun.ok(&rw10(0x28, 0, 10, 5), &[]), block.repeat(5));
    // Larger than one internal chunk.
    lun.ok(&rw16(0x93, 0, 100, 5000), &block);
    assert_eq!(lun.ok(&rw16(0x88, 0, 5099, 1), &[]), block);
    assert_eq!(lba_status(&mut lun, 100)[0], (100, 5000, 0));
    // UNMAP with a zero block deallocates.
    lun.ok(&rw10(0x41, 0x08, 100, 1000), &[0; 512]);
    assert_eq!(lba_status(&mut lun, 100)[0], (100, 1000, 1));
    assert_eq!(lun.ok(&rw10(0x28, 0, 100, 4), &[]), vec![0; 4 * BS]);
    // UNMAP with a non-zero block writes it.
    lun.ok(&rw16(0x93, 0x08, 200, 2), &block);
    assert_eq!(lun.ok(&rw10(0x28, 0, 200, 2), &[]), block.repeat(2));
    // NDOB: no data-out, zeros, unmapped with UNMAP.
    assert_eq!(data_out_len(&rw16(0x93, 0x09, 1100, 100)), Ok(0));
    lun.ok(&rw16(0x93, 0x09, 1100, 100), &[]);
    assert_eq!(lba_status(&mut lun, 1100)[0], (1100, 100, 1));
    lun.ok(&rw16(0x93, 0x01, 1100, 2), &[]);
    assert_eq!(lba_status(&mut lun, 1100)[0], (1100, 2, 0));
    assert_eq!(lun.ok(&rw10(0x28, 0, 1100, 2), &[]), vec![0; 2 * BS]);
    // Errors.
    lun.fails(&rw10(0x41, 0, 0, 0), &block, Sense::INVALID_FIELD_IN_CDB);
    lun.fails(&rw10(0x41, 0, 8193, 0), &block, Sense::LBA_OUT_OF_RANGE);
    lun.fails(&rw10(0x41, 0, 8190, 3), &block, Sense::LBA_OUT_OF_RANGE);
    lun.fails(&rw16(0x93, 0, u64::MAX, 1), &block, Sense::LBA_OUT_OF_RANGE);
    lun.fails(&rw16(0x93, 0x10, 0, 1), &block, Sense::INVALID_FIELD_IN_CDB);
    lun.fails(&rw16(0x93, 0, 0, u32::MAX), &block, Sense::INVALID_FIELD_IN_CDB);
    lun.fails(&rw10(0x41, 0, 0, 1), &[], Sense::INVALID_FIELD_IN_INFORMATION_UNIT);
    lun.fails(&rw10(0x41, 0x08, 0, 1), &[0; 256], Sense::INVALID_FIELD_IN_INFORMATION_UNIT);
    lun.fails(&rw10(0x41, 0x08, 0, 1), &[0; 1024], Sense::INVALID_FIELD_IN_INFORMATION_UNIT);
}

#[test]
fn compare_and_write() {
    let mut lun = Lun::new(100);
    let old = pattern(2, 1);
    let new = pattern(2, 2);
    lun.ok(&rw10(0x2A, 0, 50, 2), &old);
    assert_eq!(data_out_len(&caw(50, 2, 0)), Ok(2048));
    let mut buf = old.clone();
    buf.extend_from_slice(&new);
    lun.ok(&caw(50, 2, 0), &buf);
    assert_eq!(lun.ok(&rw10(0x28, 0, 50, 2), &[]), new);
    // Now the compare half no longer matches: MISCOMPARE at offset 0, nothing written.
    let out = lun.run(&caw(50, 2, 0x08), &buf);
    assert_eq!(out.sense, Some(Sense::MISCOMPARE.with_information(0)));
    assert_eq!(lun.ok(&rw10(0x28, 0, 50, 2), &[]), new);
    let mut late = new.clone();
    late[1000] ^= 1;
    late.extend_from_slice(&old);
    assert_eq!(lun.run(&caw(50, 2, 0), &late).sense, Some(Sense::MISCOMPARE.with_information(1000)));
    // FUA flushes.
    let mut ok = new.clone();
    ok.extend_from_slice(&old);
    lun.ok(&caw(50, 2, 0x08), &ok);
    assert_eq!(lun.disk.flushes.get(), 1);
    lun.ok(&caw(50, 0, 0), &[]);
    lun.fails(&caw(99, 2, 0), &[0; 2048], Sense::LBA_OUT_OF_RANGE);
    lun.fails(&caw(0, 255, 0), &[], Sense::INVALID_FIELD_IN_CDB);
    assert_eq!(data_out_len(&caw(0, 255, 0)), Err(Sense::INVALID_FIELD_IN_CDB));
    lun.fails(&caw(0, 1, 0x20), &[0; 1024], Sense::INVALID_FIELD_IN_CDB);
    // The data-out must hold exactly both buffers.
    lun.fails(&caw(0, 1, 0), &[0; 2048], Sense::INVALID_FIELD_IN_INFORMATION_UNIT);
    lun.fails(&caw(0, 3, 0), &[0; 2048], Sense::INVALID_FIELD_IN_INFORMATION_UNIT);
}

#[test]
fn report_supported_operation_codes() {
    let mut lun = Lun::new(100);
    let all = lun.ok(&rsoc(0, 0, 0, 65536), &[]);
    let len = u32::from_be_bytes(all[0..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, all.len());
    assert_eq!(len % 8, 0);
    let descs: Vec<&[u8]> = all[4..].chunks(8).collect();
    assert!(descs.iter().any(|d| d[0] == 0x28 && d[5] & 1 == 0 && d[7] == 10));
    assert!(descs.iter().any(|d| d[0] == 0x9E && d[3] == 0x10 && d[5] & 1 == 1 && d[7] == 16));
    assert!(descs.iter().any(|d| d[0] == 0x89));
    // Every reported command runs (no INVALID COMMAND OPERATION CODE).
    for d in &descs {
        let mut cdb = vec![0u8; 16];
        cdb[0] = d[0];
        cdb[1] = d[3];
        assert_ne!(lun.run(&cdb, &[0; 8192]).sense, Some(Sense::INVALID_OPCODE));
    }
    let timeouts = lun.ok(&rsoc(0x80, 0, 0, 65536), &[]);
    assert_eq!((timeouts.len() - 4) % 20, 0);

    let one = lun.ok(&rsoc(1, 0x2A, 0, 512), &[]);
    assert_eq!(one[1] & 0x07, 3);
    assert_eq!(u16::from_be_bytes([one[2], one[3]]), 10);
    assert_eq!(one[4], 0x2A);
    assert_eq!(one.len(), 14);
    let one = lun.ok(&rsoc(0x81, 0x2A, 0, 512), &[]);
    assert_eq!(one[1] & 0x80, 0x80);
    assert_eq!(one.len(), 26);
    let sa = lun.ok(&rsoc(2, 0x9E, 0x12, 512), &[]);
    assert_eq!(sa[1] & 0x07, 3);
    assert_eq!(sa[4], 0x9E);
    assert_eq!(lun.ok(&rsoc(2, 0x9E, 0x13, 512), &[])[1] & 0x07, 1);
    assert_eq!(lun.ok(&rsoc(1, 0xE0, 0, 512), &[])[1] & 0x07, 1);
    assert_eq!(lun.ok(&rsoc(3, 0x28, 0, 512), &[])[1] & 0x07, 3);
    lun.fails(&rsoc(1, 0x9E, 0, 512), &[], Sense::INVALID_FIELD_IN_CDB);
    lun.fails(&rsoc(2, 0x28, 0, 512), &[], Sense::INVALID_FIELD_IN_CDB);
    lun.fails(&rsoc(7, 0x28, 0, 512), &[], Sense::INVALID_FIELD_IN_CDB);
    assert_eq!(lun.ok(&rsoc(0, 0, 0, 6), &[]).len(), 6);
}

fn keys(lun: &mut Lun) -> (u32, Vec<u64>) {
    let d = lun.ok(&prin(0), &[]);
    let gen = u32::from_be_bytes(d[0..4].try_into().unwrap());
    let len = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
    assert_eq!(len + 8, d.len());
    (gen, d[8..].chunks(8).map(|k| u64::from_be_bytes(k.try_into().unwrap())).collect())
}

fn reservation(lun: &mut Lun) -> Option<(u64, u8)> {
    let d = lun.ok(&prin(1), &[]);
    match u32::from_be_bytes(d[4..8].try_into().unwrap()) {
        0 => None,
        16 => Some((u64::from_be_bytes(d[8..16].try_into().unwrap()), d[21] & 0x0F)),
        n => panic!("bad READ RESERVATION length {n}"),
    }
}

fn pr_ok(lun: &mut Lun, who: &str, sa: u8, kind: u8, key: u64, sa_key: u64) {
    let out = lun.run_as(who, &prout(sa, kind), &prout_data(key, sa_key));
    assert_eq!(out.status, status::GOOD, "PR OUT {sa} from {who}: {:?}", out.sense);
}

fn status_of(lun: &mut Lun, who: &str, cdb: &[u8], data: &[u8]) -> u8 {
    lun.run_as(who, cdb, data).status
}

#[test]
fn persistent_reserve_register_and_read_keys() {
    let mut lun = Lun::new(100);
    assert_eq!(keys(&mut lun), (0, vec![]));
    assert_eq!(reservation(&mut lun), None);
    pr_ok(&mut lun, A, 0, 0, 0, 0xAAAA);
    pr_ok(&mut lun, B, 0, 0, 0, 0xBBBB);
    assert_eq!(keys(&mut lun), (2, vec![0xAAAA, 0xBBBB]));
    // Wrong existing key: conflict.
    assert_eq!(status_of(&mut lun, A, &prout(0, 0), &prout_data(0x1, 0xA1)), status::RESERVATION_CONFLICT);
    // Unregistered nexus with a non-zero key: conflict.
    assert_eq!(status_of(&mut lun, "c", &prout(0, 0), &prout_data(0x1, 0xC)), status::RESERVATION_CONFLICT);
    // Change key, then REGISTER AND IGNORE EXISTING KEY.
    pr_ok(&mut lun, A, 0, 0, 0xAAAA, 0xA2);
    pr_ok(&mut lun, A, 6, 0, 0x999, 0xA3);
    assert_eq!(keys(&mut lun).1, vec![0xA3, 0xBBBB]);
    // Unregister.
    pr_ok(&mut lun, B, 0, 0, 0xBBBB, 0);
    assert_eq!(keys(&mut lun).1, vec![0xA3]);
    // Capabilities.
    let caps = lun.ok(&prin(2), &[]);
    assert_eq!(u16::from_be_bytes([caps[0], caps[1]]), 8);
    assert_eq!(caps[3] & 0x80, 0x80);
    assert_eq!(caps[4], 0xEA);
    assert_eq!(caps[5], 0x01);
    // Bad service actions, lengths and unsupported bits.
    // READ FULL STATUS: one descriptor per registration, with an iSCSI TransportID.
    let full = lun.ok(&prin(3), &[]);
    let len = u32::from_be_bytes(full[4..8].try_into().unwrap()) as usize;
    assert_eq!(len + 8, full.len());
    assert_eq!(u64::from_be_bytes(full[8..16].try_into().unwrap()), 0xA3);
    let tid_len = u32::from_be_bytes(full[28..32].try_into().unwrap()) as usize;
    assert_eq!(24 + tid_len, len);
    assert_eq!(full[32] & 0x3F, 0x05);
    assert_eq!(tid_len % 4, 0);
    assert!(full[36..].starts_with(A.as_bytes()));
    for sa in 4..0x20 {
        lun.fails(&prin(sa), &[], Sense::INVALID_FIELD_IN_CDB);
    }
    lun.fails(&prout(7, 0), &prout_data(0xA3, 0), Sense::INVALID_FIELD_IN_CDB);
    lun.fails(&[0x5F, 0, 0, 0, 0, 0, 0, 0, 20, 0], &[0; 20], Sense::PARAMETER_LIST_LENGTH_ERROR);
    let mut aptpl = prout_data(0xA3, 0xA4);
    aptpl[20] = 0x01;
    lun.fails(&prout(0, 0), &aptpl, Sense::INVALID_FIELD_IN_PARAMETER_LIST);
    assert_eq!(data_out_len(&prout(0, 0)), Ok(24));
}

#[test]
fn persistent_reserve_write_exclusive_conflicts() {
    let mut lun = Lun::new(100);
    pr_ok(&mut lun, A, 0, 0, 0, 0xA);
    pr_ok(&mut lun, B, 0, 0, 0, 0xB);
    pr_ok(&mut lun, A, 1, 1, 0xA, 0);
    assert_eq!(reservation(&mut lun), Some((0xA, 1)));
    // Reserving again with the same type is fine; another type or nexus conflicts.
    pr_ok(&mut lun, A, 1, 1, 0xA, 0);
    assert_eq!(status_of(&mut lun, A, &prout(1, 3), &prout_data(0xA, 0)), status::RESERVATION_CONFLICT);
    assert_eq!(status_of(&mut lun, B, &prout(1, 1), &prout_data(0xB, 0)), status::RESERVATION_CONFLICT);
    let w = rw10(0x2A, 0, 0, 1);
    let r = rw10(0x28, 0, 0, 1);
    let one = pattern(1, 0);
    assert_eq!(status_of(&mut lun, A, &w, &one), status::GOOD);
    assert_eq!(status_of(&mut lun, B, &w, &one), status::RESERVATION_CONFLICT);
    assert_eq!(status_of(&mut lun, "c", &w, &one), status::RESERVATION_CONFLICT);
    assert_eq!(status_of(&mut lun, B, &r, &[]), status::GOOD);
    assert_eq!(status_of(&mut lun, B, &inquiry(false, 0, 96), &[]), status::GOOD);
    assert_eq!(status_of(&mut lun, B, &unmap_cdb(24), &unmap_list(&[(0, 1)])), status::RESERVATION_CONFLICT);
    assert_eq!(status_of(&mut lun, B, &rw10(0x35, 0, 0, 0), &[]), status::RESERVATION_CONFLICT);
    // RELEASE by a non-holder does nothing; with the wrong type it is an invalid release.
    pr_ok(&mut lun, B, 2, 1, 0xB, 0);
    assert_eq!(reservation(&mut lun), Some((0xA, 1)));
    lun.fails(&prout(2, 3), &prout_data(0xA, 0), Sense::INVALID_RELEASE);
    pr_ok(&mut lun, A, 2, 1, 0xA, 0);
    assert_eq!(reservation(&mut lun), None);
    assert_eq!(status_of(&mut lun, B, &w, &one), status::GOOD);
    // Invalid type or scope.
    lun.fails(&prout(1, 2), &prout_data(0xA, 0), Sense::INVALID_FIELD_IN_CDB);
    lun.fails(&prout(1, 0x11), &prout_data(0xA, 0), Sense::INVALID_FIELD_IN_CDB);
}

#[test]
fn persistent_reserve_exclusive_access_and_registrants_types() {
    let w = rw10(0x2A, 0, 0, 1);
    let r = rw10(0x28, 0, 0, 1);
    let one = pattern(1, 0);
    // (type, registered non-holder may read, may write, unregistered may read, may write)
    for (kind, reg_r, reg_w, un_r, un_w) in [
        (3u8, false, false, false, false),
        (5, true, true, true, false),
        (6, true, true, false, false),
        (7, true, true, true, false),
        (8, true, true, false, false),
    ] {
        let mut lun = Lun::new(100);
        pr_ok(&mut lun, A, 0, 0, 0, 0xA);
        pr_ok(&mut lun, B, 0, 0, 0, 0xB);
        pr_ok(&mut lun, A, 1, kind, 0xA, 0);
        let ok = |b: bool| if b { status::GOOD } else { status::RESERVATION_CONFLICT };
        assert_eq!(status_of(&mut lun, A, &r, &[]), status::GOOD, "type {kind}");
        assert_eq!(status_of(&mut lun, A, &w, &one), status::GOOD, "type {kind}");
        assert_eq!(status_of(&mut lun, B, &r, &[]), ok(reg_r), "type {kind}");
        assert_eq!(status_of(&mut lun, B, &w, &one), ok(reg_w), "type {kind}");
        assert_eq!(status_of(&mut lun, "c", &r, &[]), ok(un_r), "type {kind}");
        assert_eq!(status_of(&mut lun, "c", &w, &one), ok(un_w), "type {kind}");
        assert_eq!(status_of(&mut lun, "c", &rc16(32), &[]), status::GOOD);
        let rk = reservation(&mut lun).unwrap();
        assert_eq!(rk, (if kind >= 7 { 0 } else { 0xA }, kind));
    }
}

#[test]
fn persistent_reserve_unregister_releases() {
    // A registrants-only reservation goes when its holder unregisters ...
    let mut lun = Lun::new(100);
    pr_ok(&mut lun, A, 0, 0, 0, 0xA);
    pr_ok(&mut lun, B, 0, 0, 0, 0xB);
    pr_ok(&mut lun, A, 1, 5, 0xA, 0);
    pr_ok(&mut lun, A, 0, 0, 0xA, 0);
    assert_eq!(reservation(&mut lun), None);
    // ... an all-registrants one only with the last registrant.
    pr_ok(&mut lun, A, 0, 0, 0, 0xA);
    pr_ok(&mut lun, A, 1, 7, 0xA, 0);
    pr_ok(&mut lun, A, 0, 0, 0xA, 0);
    assert_eq!(reservation(&mut lun), Some((0, 7)));
    pr_ok(&mut lun, B, 0, 0, 0xB, 0);
    assert_eq!(reservation(&mut lun), None);
}

#[test]
fn persistent_reserve_clear_and_preempt() {
    let mut lun = Lun::new(100);
    pr_ok(&mut lun, A, 0, 0, 0, 0xA);
    pr_ok(&mut lun, B, 0, 0, 0, 0xB);
    pr_ok(&mut lun, A, 1, 3, 0xA, 0);
    // B preempts A: A's registration goes, B holds the reservation.
    pr_ok(&mut lun, B, 4, 1, 0xB, 0xA);
    assert_eq!(keys(&mut lun).1, vec![0xB]);
    assert_eq!(reservation(&mut lun), Some((0xB, 1)));
    assert_eq!(status_of(&mut lun, A, &rw10(0x2A, 0, 0, 1), &pattern(1, 0)), status::RESERVATION_CONFLICT);
    // Preempting a key nobody has: conflict. Key zero without an all-registrants reservation:
    // invalid field.
    assert_eq!(status_of(&mut lun, B, &prout(4, 1), &prout_data(0xB, 0x77)), status::RESERVATION_CONFLICT);
    lun.fails_as(B, &prout(5, 1), &prout_data(0xB, 0), Sense::INVALID_FIELD_IN_PARAMETER_LIST);
    // A non-holder registrant is removed without touching the reservation.
    pr_ok(&mut lun, A, 0, 0, 0, 0xA);
    pr_ok(&mut lun, B, 5, 1, 0xB, 0xA);
    assert_eq!(keys(&mut lun).1, vec![0xB]);
    assert_eq!(reservation(&mut lun), Some((0xB, 1)));
    // An unregistered nexus cannot preempt or clear.
    assert_eq!(status_of(&mut lun, A, &prout(4, 1), &prout_data(0, 0xB)), status::RESERVATION_CONFLICT);
    assert_eq!(status_of(&mut lun, A, &prout(3, 0), &prout_data(0, 0)), status::RESERVATION_CONFLICT);
    // All-registrants: preempting key 0 removes everyone else and takes the reservation.
    pr_ok(&mut lun, A, 0, 0, 0, 0xA);
    pr_ok(&mut lun, B, 2, 1, 0xB, 0);
    pr_ok(&mut lun, B, 1, 8, 0xB, 0);
    pr_ok(&mut lun, A, 4, 3, 0xA, 0);
    assert_eq!(keys(&mut lun).1, vec![0xA]);
    assert_eq!(reservation(&mut lun), Some((0xA, 3)));
    // CLEAR removes everything.
    let generation = keys(&mut lun).0;
    pr_ok(&mut lun, A, 3, 0, 0xA, 0);
    assert_eq!(keys(&mut lun), (generation + 1, vec![]));
    assert_eq!(reservation(&mut lun), None);
}

#[test]
fn data_out_lengths() {
    assert_eq!(data_out_len(&rw10(0x28, 0, 0, 8)), Ok(0));
    assert_eq!(data_out_len(&inquiry(false, 0, 96)), Ok(0));
    assert_eq!(data_out_len(&rw10(0x41, 0, 0, 8)), Ok(512));
    assert_eq!(data_out_len(&rw16(0x93, 0, 0, 8)), Ok(512));
    assert_eq!(data_out_len(&rw12(0xAA, 0, 0, 3)), Ok(1536));
    assert_eq!(data_out_len(&[0x2A]), Ok(0));
}

/// One step of the random model test.
#[derive(Debug, Clone)]
enum Step {
    Write {
        lba: u64,
        blocks: u32,
        seed: u8,
        size: u8,
    },
    Unmap {
        lba: u64,
        blocks: u32,
    },
    WriteSameZero {
        lba: u64,
        blocks: u32,
    },
    Read {
        lba: u64,
        blocks: u32,
        size: u8,
    },
    /// MODE SELECT (10 when `ten`, else 6) of the control page with SWP = `on`.
    Swp {
        on: bool,
        ten: bool,
    },
    /// A logical unit reset.
    Reset,
}

const CAP: u64 = 256;

fn step() -> impl Strategy<Value = Step> {
    let range = (0..CAP + 4, 0u32..40);
    prop_oneof![
        (range.clone(), any::<u8>(), 0u8..4).prop_map(|((lba, blocks), seed, size)| Step::Write {
            lba,
            blocks,
            seed,
            size
        }),
        range.clone().prop_map(|(lba, blocks)| Step::Unmap { lba, blocks }),
        range.clone().prop_map(|(lba, blocks)| Step::WriteSameZero { lba, blocks }),
        (range, 0u8..4).prop_map(|((lba, blocks), size)| Step::Read { lba, blocks, size }),
        (any::<bool>(), any::<bool>()).prop_map(|(on, ten)| Step::Swp { on, ten }),
        Just(Step::Reset),
    ]
}

fn fits(lba: u64, blocks: u32) -> bool {
    lba < CAP && lba + u64::from(blocks) <= CAP
}

fn rw_cdb(read: bool, size: u8, lba: u64, blocks: u32) -> Option<Vec<u8>> {
    let op = |r: u8, w: u8| if read { r } else { w };
    match size {
        0 if blocks > 0 && blocks < 256 && lba < (1 << 21) => Some(rw6(op(0x08, 0x0A), lba as u32, blocks as u8)),
        1 => Some(rw10(op(0x28, 0x2A), 0, lba as u32, blocks as u16)),
        2 => Some(rw12(op(0xA8, 0xAA), 0, lba as u32, blocks)),
        3 => Some(rw16(op(0x88, 0x8A), 0, lba, blocks)),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn random_operations_agree_with_a_byte_vector(steps in prop::collection::vec(step(), 1..40)) {
        let mut lun = Lun::new(CAP);
        let mut model = vec![0u8; CAP as usize * BS];
        // Software Write Protect: every write, unmap and WRITE SAME fails first thing.
        let mut swp = false;
        for s in steps {
            match s {
                Step::Swp { on, ten } => {
                    set_swp(&mut lun, B, on, ten);
                    swp = on;
                }
                Step::Reset => {
                    lun.state.reset();
                    swp = false;
                }
                Step::Write { lba, blocks, seed, size } => {
                    let Some(cdb) = rw_cdb(false, size, lba, blocks) else { continue };
                    let data = pattern(blocks as usize, seed);
                    let out = lun.run(&cdb, &data);
                    if swp {
                        prop_assert_eq!(out.sense, Some(Sense::WRITE_PROTECTED));
                    } else if fits(lba, blocks) {
                        prop_assert_eq!(out.status, status::GOOD);
                        let at = lba as usize * BS;
                        model[at..at + data.len()].copy_from_slice(&data);
                    } else {
                        prop_assert_eq!(out.sense, Some(Sense::LBA_OUT_OF_RANGE));
                    }
                }
                Step::Unmap { lba, blocks } => {
                    let list = unmap_list(&[(lba, blocks)]);
                    let out = lun.run(&unmap_cdb(list.len() as u16), &list);
                    if swp {
                        prop_assert_eq!(out.sense, Some(Sense::WRITE_PROTECTED));
                    } else if blocks == 0 {
                        prop_assert_eq!(out.status, status::GOOD);
                    } else if fits(lba, blocks) {
                        prop_assert_eq!(out.status, status::GOOD);
                        let at = lba as usize * BS;
                        model[at..at + blocks as usize * BS].fill(0);
                    } else {
                        prop_assert_eq!(out.sense, Some(Sense::LBA_OUT_OF_RANGE));
                    }
                }
                Step::WriteSameZero { lba, blocks } => {
                    let out = lun.run(&rw16(0x93, 0x08, lba, blocks), &[0; 512]);
                    if swp {
                        prop_assert_eq!(out.sense, Some(Sense::WRITE_PROTECTED));
                    } else if !fits(lba, blocks) {
                        prop_assert_eq!(out.sense, Some(Sense::LBA_OUT_OF_RANGE));
                    } else if blocks == 0 {
                        prop_assert_eq!(out.sense, Some(Sense::INVALID_FIELD_IN_CDB));
                    } else {
                        prop_assert_eq!(out.status, status::GOOD);
                        let at = lba as usize * BS;
                        model[at..at + blocks as usize * BS].fill(0);
                    }
                }
                Step::Read { lba, blocks, size } => {
                    let Some(cdb) = rw_cdb(true, size, lba, blocks) else { continue };
                    let out = lun.run(&cdb, &[]);
                    if fits(lba, blocks) {
                        prop_assert_eq!(out.status, status::GOOD);
                        let at = lba as usize * BS;
                        prop_assert_eq!(&out.data_in[..], &model[at..at + blocks as usize * BS]);
                    } else {
                        prop_assert_eq!(out.sense, Some(Sense::LBA_OUT_OF_RANGE));
                    }
                }
            }
        }
        // The whole disk, and the provisioning status of every block, at the end.
        let all = lun.run(&rw16(0x88, 0, 0, CAP as u32), &[]);
        prop_assert_eq!(&all.data_in, &model);
        let mut lba = 0;
        while lba < CAP {
            let d = lun.run(&get_lba_status(lba, 24), &[]).data_in;
            let n = u64::from(u32::from_be_bytes(d[16..20].try_into().unwrap()));
            prop_assert!(n >= 1);
            if d[20] == 0 {
                // Mapped blocks are exactly the ones the oracle holds.
                prop_assert!((lba..lba + n).all(|b| lun.disk.mapped(b)));
            } else {
                prop_assert!((lba..lba + n).all(|b| !lun.disk.mapped(b)));
            }
            lba += n;
        }
    }

    #[test]
    fn arbitrary_cdbs_never_panic(
        cdb in prop::collection::vec(any::<u8>(), 0..24),
        data in prop::collection::vec(any::<u8>(), 0..2048),
        lun_no in 0u64..2,
        who in 0u8..3,
        swp in any::<bool>(),
    ) {
        let mut lun = Lun::new(64);
        // Some PR state so the reservation paths run too, and sometimes SWP.
        set_swp(&mut lun, A, swp, false);
        pr_ok(&mut lun, A, 0, 0, 0, 0xA);
        pr_ok(&mut lun, A, 1, 1, 0xA, 0);
        let who = ["a", A, B][who as usize];
        let _ = data_out_len(&cdb);
        let out = execute(&cdb, &data, lun_no, who, &lun.disk, &mut lun.state);
        prop_assert_eq!(out.sense.is_some(), out.status == status::CHECK_CONDITION);
        prop_assert!(out.data_in.len() <= MAX_TRANSFER_BLOCKS as usize * BS);
    }

    #[test]
    fn arbitrary_cdbs_with_a_valid_opcode_never_panic(
        op in prop::sample::select(vec![
            0x00u8, 0x03, 0x08, 0x0A, 0x12, 0x15, 0x1A, 0x1B, 0x1E, 0x25, 0x28, 0x2A, 0x2E, 0x2F, 0x34,
            0x35, 0x41, 0x42, 0x55, 0x5A, 0x5E, 0x5F, 0x88, 0x89, 0x8A, 0x8E, 0x8F, 0x90, 0x91, 0x93,
            0x9E, 0xA0, 0xA3, 0xA8, 0xAA, 0xAE, 0xAF,
        ]),
        rest in prop::collection::vec(any::<u8>(), 0..16),
        data in prop::collection::vec(any::<u8>(), 0..4096),
    ) {
        let mut cdb = vec![op];
        cdb.extend_from_slice(&rest);
        let mut lun = Lun::new(64);
        let _ = data_out_len(&cdb);
        let out = execute(&cdb, &data, 0, A, &lun.disk, &mut lun.state);
        prop_assert_eq!(out.sense.is_some(), out.status == status::CHECK_CONDITION);
        let mut ro = Lun::read_only(64);
        let _ = execute(&cdb, &data, 0, B, &ro.disk, &mut ro.state);
    }
}
