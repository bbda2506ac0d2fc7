//! Property tests of the PDU codec: decode → encode → decode is the identity for every opcode,
//! with and without digests; AHS lists round trip; input arriving in pieces is `Ok(None)` until
//! complete; arbitrary bytes never panic.

use iscsi::pdu::{decode, opcode, Ahs, Bhs, Pdu, ScsiCommand, BHS_LEN};
use iscsi::{Digests, IscsiError};
use proptest::prelude::*;

const OPCODES: [u8; 17] = [
    opcode::NOP_OUT,
    opcode::SCSI_COMMAND,
    opcode::TASK_MGMT_REQUEST,
    opcode::LOGIN_REQUEST,
    opcode::TEXT_REQUEST,
    opcode::DATA_OUT,
    opcode::LOGOUT_REQUEST,
    opcode::SNACK_REQUEST,
    opcode::NOP_IN,
    opcode::SCSI_RESPONSE,
    opcode::TASK_MGMT_RESPONSE,
    opcode::LOGIN_RESPONSE,
    opcode::TEXT_RESPONSE,
    opcode::DATA_IN,
    opcode::LOGOUT_RESPONSE,
    opcode::R2T,
    opcode::REJECT,
];

fn digests() -> impl Strategy<Value = Digests> {
    (any::<bool>(), any::<bool>()).prop_map(|(header, data)| Digests { header, data })
}

/// A well-formed PDU on the wire built from random header bytes: every field of the typed
/// header is random, only the opcode and the layout fields are fixed up.
fn wire_pdu(mut h: Vec<u8>, op: u8, data: &[u8]) -> Vec<u8> {
    h[0] = (h[0] & 0x40) | op;
    h[4] = 0;
    let len = u32::try_from(data.len()).unwrap().to_be_bytes();
    h[5..8].copy_from_slice(&len[1..]);
    let mut out = h;
    out.extend_from_slice(data);
    while out.len() & 3 != 0 {
        out.push(0);
    }
    out
}

proptest! {
    #[test]
    fn every_opcode_round_trips(
        h in proptest::collection::vec(any::<u8>(), BHS_LEN),
        op in prop::sample::select(OPCODES.to_vec()),
        data in proptest::collection::vec(any::<u8>(), 0..300),
        d in digests(),
    ) {
        let wire = wire_pdu(h, op, &data);
        let (pdu, n) = decode(&wire, Digests::NONE, 1 << 16).unwrap().expect("complete");
        prop_assert_eq!(n, wire.len());
        prop_assert_eq!(pdu.bhs.opcode(), op);
        prop_assert_eq!(&pdu.data[..], &data[..]);
        let again = pdu.encode(d).unwrap();
        let (back, m) = decode(&again, d, 1 << 16).unwrap().expect("complete");
        prop_assert_eq!(m, again.len());
        prop_assert_eq!(&back, &pdu);
        // Encoding is canonical: a second pass gives the same bytes.
        prop_assert_eq!(back.encode(d).unwrap(), again);
    }

    #[test]
    fn ahs_round_trips(
        ahs in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..40)), 0..5),
        d in digests(),
        itt in any::<u32>(),
    ) {
        let cmd = ScsiCommand { itt, final_pdu: true, write: true, ..Default::default() };
        let pdu = Pdu {
            bhs: cmd.into(),
            ahs: ahs.into_iter().map(|(kind, data)| Ahs { kind, data }).collect(),
            data: bytes::Bytes::from_static(b"xyz"),
        };
        let wire = pdu.encode(d).unwrap();
        let (back, n) = decode(&wire, d, 16).unwrap().expect("complete");
        prop_assert_eq!(n, wire.len());
        prop_assert_eq!(back, pdu);
    }

    #[test]
    fn prefixes_need_more(
        data in proptest::collection::vec(any::<u8>(), 0..64),
        d in digests(),
    ) {
        let pdu = Pdu::with_data(iscsi::pdu::DataOut { final_pdu: true, ..Default::default() }, data);
        let wire = pdu.encode(d).unwrap();
        for n in 0..wire.len() {
            prop_assert_eq!(decode(&wire[..n], d, 1024).unwrap(), None);
        }
        // Trailing bytes of the next PDU are left alone.
        let mut more = wire.clone();
        more.extend_from_slice(&[0xff; 7]);
        let (_, n) = decode(&more, d, 1024).unwrap().unwrap();
        prop_assert_eq!(n, wire.len());
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..2000),
        d in digests(),
        max in 0u32..4096,
    ) {
        match decode(&bytes, d, max) {
            Ok(Some((pdu, n))) => {
                prop_assert!(n <= bytes.len());
                prop_assert!(pdu.data.len() <= usize::try_from(max).unwrap());
                let _ = pdu.encode(d);
            }
            Ok(None) => {}
            Err(e) => {
                let _ = e.disposition();
            }
        }
    }

    #[test]
    fn corrupted_digests_are_caught(
        data in proptest::collection::vec(any::<u8>(), 1..64),
        flip in any::<usize>(),
        bit in 0u8..8,
    ) {
        let pdu = Pdu::with_data(iscsi::pdu::DataOut { final_pdu: true, ..Default::default() }, data);
        let mut wire = pdu.encode(Digests::BOTH).unwrap();
        let i = flip % wire.len();
        wire[i] ^= 1 << bit;
        match decode(&wire, Digests::BOTH, 1 << 16) {
            // A flip in a length field may make the PDU look longer or too large.
            Ok(None) | Err(IscsiError::DataTooLarge { .. }) => prop_assert!((4..8).contains(&i)),
            Err(IscsiError::HeaderDigest { .. }) => prop_assert!(i < BHS_LEN + 4),
            Err(IscsiError::DataDigest { skip, .. }) => {
                prop_assert!(i >= BHS_LEN + 4);
                prop_assert_eq!(skip, wire.len());
            }
            // Flips in padding are outside both digests' reach only if padding were excluded;
            // the data digest covers padding, so no corruption may pass.
            other => return Err(TestCaseError::fail(format!("corruption at {i} not caught: {other:?}"))),
        }
    }
}

#[test]
fn reject_carries_the_header() {
    let h = [7u8; BHS_LEN];
    let reject = iscsi::pdu::Reject { reason: iscsi::reject_reason::DATA_DIGEST, stat_sn: 3, ..Default::default() };
    let wire = Pdu::reject(reject, &h).encode(Digests::NONE).unwrap();
    assert_eq!(wire[0], 0x3f);
    assert_eq!(&wire[16..20], &[0xff; 4]);
    let (back, _) = decode(&wire, Digests::NONE, 48).unwrap().unwrap();
    assert!(matches!(back.bhs, Bhs::Reject(_)));
    assert_eq!(&back.data[..], &h[..]);
}
