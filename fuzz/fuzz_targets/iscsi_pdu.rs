//! The iSCSI PDU decoder on an arbitrary byte stream (digests and MaxRecvDataSegmentLength
//! chosen by the first byte), every decoded PDU encoded and decoded again to the same PDU,
//! `Bhs::parse` on every 48-byte header, and the decoded PDUs handed to a full-feature
//! `Session` whose commands run against the SCSI model over a small in-memory disk.
#![no_main]

use forkd_fuzz::MemDisk;
use iscsi::keys::{send_targets, SessionType, TargetEntry};
use iscsi::pdu::{decode, BHS_LEN};
use iscsi::scsi::{execute, LunState};
use iscsi::session::{Event, Session};
use iscsi::{Bhs, Digests, SessionParams};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    let digests = Digests { header: mode & 1 != 0, data: mode & 2 != 0 };
    let max_data = if mode & 4 != 0 { 512 } else { 8192 };
    if let Some(head) = rest.get(..BHS_LEN) {
        let h: &[u8; BHS_LEN] = head.try_into().expect("48 bytes");
        if let Some(bhs) = Bhs::parse(h) {
            let _ = (bhs.opcode(), bhs.from_initiator(), bhs.itt());
            assert_eq!(Bhs::parse(&bhs.to_bytes()), Some(bhs), "a parsed BHS parses again the same");
        }
    }
    let mut session = Session::new(SessionParams::default(), 8);
    session.set_read_only(mode & 8 != 0);
    let disk = MemDisk::new(64, false);
    let mut lun = LunState::new("vol-fuzz");
    let targets = [TargetEntry { name: "iqn.2026-11.test:vol".into(), addresses: vec!["127.0.0.1:3260,1".into()] }];
    while let Ok(Some((pdu, n))) = decode(rest, digests, max_data) {
        assert!(n > 0 && n <= rest.len(), "consumed within the input");
        rest = &rest[n..];
        let _ = pdu.cdb();
        let encoded = pdu.encode(digests).expect("a decoded PDU encodes");
        let again = decode(&encoded, digests, max_data).expect("an encoded PDU decodes");
        assert_eq!(again, Some((pdu.clone(), encoded.len())), "encode then decode gives the PDU back");
        for event in session.handle(pdu) {
            match event {
                Event::Run(cmd) => {
                    let nexus = session.nexus();
                    let outcome = execute(&cmd.cdb, &cmd.data_out, cmd.lun, &nexus, &disk, &mut lun);
                    for p in session.complete(cmd, Some(outcome)) {
                        let _ = p.encode(digests).expect("a response encodes");
                    }
                }
                Event::SendTargets { itt, query } => {
                    let text = send_targets(&query, &targets, SessionType::Normal, Some("iqn.2026-11.test:vol"));
                    let _ = session.send_targets(itt, text).encode(digests).expect("a text response encodes");
                }
                Event::Send(p) => {
                    let _ = p.encode(digests).expect("a response encodes");
                }
                Event::Reset => lun.reset(),
                Event::Close(_) => return,
            }
        }
    }
});
