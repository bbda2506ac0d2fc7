//! The SCSI model (`iscsi::scsi`) over a small in-memory disk: a sequence of arbitrary CDBs
//! with arbitrary data-out from two initiators (LUN 0, sometimes another LUN), through
//! `data_out_len`, `check_transfer_length`, `set_write_length` and `execute`, one `LunState`
//! for the whole sequence (reservations and mode pages carry over). The disk checks every
//! range the model passes it; sense data comes exactly with CHECK CONDITION.
#![no_main]

use forkd_fuzz::MemDisk;
use iscsi::scsi::{check_transfer_length, data_out_len, execute, set_write_length, status, LunState};
use libfuzzer_sys::fuzz_target;

const INITIATORS: [&str; 2] = ["iqn.2026-11.test:a,i,0x1", "iqn.2026-11.test:b,i,0x2"];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    let disk = MemDisk::new(if mode & 1 != 0 { 16 } else { 2048 }, mode & 2 != 0);
    let mut lun = LunState::new("vol-fuzz");
    // Each command: flags, CDB length, CDB, data length (2 bytes), data.
    while let [flags, cdb_len, tail @ ..] = rest {
        let cdb_len = usize::from(*cdb_len % 33);
        let Some((cdb, tail)) = tail.split_at_checked(cdb_len) else { return };
        let Some((len, tail)) = tail.split_at_checked(2) else { return };
        let len = usize::from(u16::from_be_bytes([len[0], len[1]])).min(tail.len());
        let (data_out, tail) = tail.split_at(len);
        rest = tail;

        let edtl = u32::try_from(data_out.len()).expect("small");
        let _ = data_out_len(cdb);
        let _ = check_transfer_length(cdb, edtl);
        let mut rewritten = cdb.to_vec();
        let _ = set_write_length(&mut rewritten, edtl / 512);
        let who = INITIATORS[usize::from(flags & 1)];
        let lun_no = if flags & 0x80 != 0 { u64::from(flags >> 4 & 7) } else { 0 };
        if flags & 0x40 != 0 {
            lun.nexus_lost(INITIATORS[usize::from(!flags & 1)]);
        }
        if flags & 0x20 != 0 {
            lun.reset();
        }
        let cdb = if flags & 2 != 0 { &rewritten[..] } else { cdb };
        let outcome = execute(cdb, data_out, lun_no, who, &disk, &mut lun);
        assert_eq!(
            outcome.sense.is_some(),
            outcome.status == status::CHECK_CONDITION,
            "sense exactly with CHECK CONDITION"
        );
    }
});
