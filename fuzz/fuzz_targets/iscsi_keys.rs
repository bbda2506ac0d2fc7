//! iSCSI text keys and login: `parse_text` on arbitrary bytes (what it accepts encodes back to
//! the same pairs), the value parsers (`parse_number`, `parse_bool`, `decode_binary`,
//! `base64_decode`, round trips through their encoders), operational negotiation of every
//! pair, `send_targets`, and the login state machine fed a stream of Login Requests (byte 0 of
//! every PDU forced to the Login Request opcode) against a target with CHAP and one without.
#![no_main]

use iscsi::keys::{
    base64_decode, base64_encode, decode_binary, encode_hex, encode_text, parse_bool, parse_number, parse_text,
    send_targets, Negotiation, SessionType, TargetEntry, TargetLimits,
};
use iscsi::login::{ChapConfig, ChapCredentials, ChapNonce, Secret, TargetInfo};
use iscsi::pdu::{decode, BHS_LEN};
use iscsi::{Digests, Login, LoginConfig, LoginStep, Targets};
use libfuzzer_sys::fuzz_target;

/// `iqn.2026-11.test:open` for anyone, `iqn.2026-11.test:chap` behind one-way or mutual CHAP.
struct TwoTargets;

impl Targets for TwoTargets {
    fn lookup(&self, name: &str) -> Option<TargetInfo> {
        match name {
            "iqn.2026-11.test:open" => Some(TargetInfo {
                name: name.into(),
                alias: Some("open".into()),
                allowed_initiators: Vec::new(),
                chap: None,
            }),
            "iqn.2026-11.test:chap" => Some(TargetInfo {
                name: name.into(),
                alias: None,
                allowed_initiators: vec!["iqn.2026-11.test:init".into()],
                chap: Some(ChapConfig {
                    initiator: ChapCredentials { name: "user".into(), secret: Secret(b"initiator-secret".to_vec()) },
                    target: Some(ChapCredentials {
                        name: "target".into(),
                        secret: Secret(b"target-secret-1".to_vec()),
                    }),
                }),
            }),
            _ => None,
        }
    }
}

fn keys(data: &[u8], discovery: bool) {
    let Ok(pairs) = parse_text(data) else { return };
    assert_eq!(parse_text(&encode_text(&pairs)).ok(), Some(pairs.clone()), "encode then parse gives the pairs back");
    let mut negotiation = Negotiation::new(TargetLimits::default());
    if discovery {
        negotiation.params_mut().session_type = SessionType::Discovery;
    }
    for (k, v) in &pairs {
        let _ = (parse_number(v), parse_bool(v));
        if let Some(bytes) = decode_binary(v) {
            assert_eq!(decode_binary(&encode_hex(&bytes)), Some(bytes.clone()), "hex round trip");
            assert_eq!(base64_decode(&base64_encode(&bytes)), Some(bytes), "base64 round trip");
        }
        let _ = base64_decode(v);
        let _ = negotiation.answer(k, v);
        if k == "SendTargets" {
            let visible =
                [TargetEntry { name: "iqn.2026-11.test:open".into(), addresses: vec!["[::1]:3260,1".into()] }];
            let kind = if discovery { SessionType::Discovery } else { SessionType::Normal };
            let _ = send_targets(v, &visible, kind, Some("iqn.2026-11.test:open"));
        }
    }
    let _ = negotiation.finish();
}

fn login(data: &[u8], mode: u8) {
    let mut stream = data.to_vec();
    let mut at = 0;
    let mut login = Login::new(LoginConfig::default(), 7, ChapNonce { identifier: mode, challenge: [mode; 32] });
    while stream.len() >= at + BHS_LEN {
        stream[at] = 0x43; // Login Request, immediate
        let Ok(Some((pdu, n))) = decode(&stream[at..], Digests::default(), Login::login_max_data()) else { return };
        at += n;
        match login.handle(&pdu, &TwoTargets) {
            Ok(LoginStep::Continue(p)) => {
                let _ = p.encode(Digests::default()).expect("a login response encodes");
            }
            Ok(LoginStep::Done(p, _)) | Ok(LoginStep::Fail(p)) => {
                let _ = p.encode(Digests::default()).expect("a login response encodes");
                assert!(login.handle(&pdu, &TwoTargets).is_err(), "a finished login takes no more");
                return;
            }
            Err(_) => panic!("a login that has not finished failed"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        keys(rest, mode & 2 != 0);
    } else {
        login(rest, mode);
    }
});
