//! The login state machine driven in memory with byte scripts: normal and discovery sessions,
//! one-way and mutual CHAP, every failure status the issue names, unknown keys, open-iscsi's
//! defaults, and text continued across PDUs with the C bit.

mod common;

use common::*;
use iscsi::digest::{md5, sha256};
use iscsi::keys::{base64_encode, decode_binary, encode_hex, SessionType, IRRELEVANT, NOT_UNDERSTOOD, REJECT};
use iscsi::login::status;
use iscsi::pdu::{NopOut, RESERVED_TAG};
use iscsi::{Digests, IscsiError, LoginConfig, Pdu};
use proptest::prelude::*;

fn first_keys(target: &str, auth: &str) -> Vec<(&'static str, String)> {
    vec![
        ("InitiatorName", INITIATOR.to_owned()),
        ("InitiatorAlias", "client".to_owned()),
        ("SessionType", "Normal".to_owned()),
        ("TargetName", target.to_owned()),
        ("AuthMethod", auth.to_owned()),
    ]
}

fn borrow<'a>(keys: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    keys.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[test]
fn normal_session_without_authentication() {
    let mut login = new_login(LoginConfig::default());
    let keys = first_keys(OPEN, "None");
    let r = one(&mut login, &request(0, 1, true, false, &borrow(&keys)));
    assert_eq!(r.status(), status::SUCCESS);
    assert!(r.resp.transit);
    assert_eq!((r.resp.csg, r.resp.nsg), (0, 1));
    assert_eq!(r.resp.itt, 0x10);
    assert_eq!(r.resp.stat_sn, 1);
    assert_eq!(r.resp.exp_cmd_sn, 5);
    assert_eq!(r.resp.tsih, 0);
    assert_eq!(r.key("AuthMethod"), Some("None"));
    assert_eq!(r.key("TargetPortalGroupTag"), Some("1"));
    assert_eq!(r.key("TargetAlias"), Some("open volume"));

    let r = one(&mut login, &request(1, 3, true, false, OPEN_ISCSI_DEFAULTS));
    assert_eq!(r.status(), status::SUCCESS);
    assert!(r.resp.transit);
    assert_eq!((r.resp.csg, r.resp.nsg), (1, 3));
    assert_eq!(r.resp.tsih, TSIH);
    assert_eq!(r.resp.stat_sn, 2);
    let p = r.params.expect("login done");
    assert_eq!(p.session_type, SessionType::Normal);
    assert_eq!(p.target_name.as_deref(), Some(OPEN));
    assert_eq!(p.initiator_name, INITIATOR);
    assert_eq!(p.initiator_alias.as_deref(), Some("client"));
    assert_eq!(p.tsih, TSIH);
    assert_eq!(p.stat_sn, 3);
    assert_eq!(p.exp_cmd_sn, 5);
    assert_eq!(p.isid, [0x00, 0x02, 0x3d, 0x00, 0x00, 0x01]);

    // After the final response the machine refuses input.
    assert_eq!(exchange(&mut login, &request(1, 3, true, false, &[])).unwrap_err(), IscsiError::LoginFinished);
}

#[test]
fn every_open_iscsi_default_is_accepted() {
    let mut login = new_login(LoginConfig::default());
    let keys = first_keys(OPEN, "None");
    one(&mut login, &request(0, 1, true, false, &borrow(&keys)));
    let r = one(&mut login, &request(1, 3, true, false, OPEN_ISCSI_DEFAULTS));
    for (k, v) in OPEN_ISCSI_DEFAULTS {
        if *k == "MaxRecvDataSegmentLength" {
            // Declarative: the target declares its own instead of answering.
            assert_eq!(r.key(k), Some("262144"));
        } else {
            assert_eq!(r.key(k), Some(*v), "{k}");
        }
    }
    let p = r.params.unwrap();
    assert!(!p.header_digest && !p.data_digest);
    assert!(!p.initial_r2t && p.immediate_data);
    assert_eq!(p.max_burst_length, 16_776_192);
    assert_eq!(p.first_burst_length, 262_144);
    assert_eq!(p.max_xmit_data_segment_length, 262_144);
    assert_eq!(p.max_recv_data_segment_length, 262_144);
    assert_eq!((p.default_time2wait, p.default_time2retain), (2, 0));
    assert_eq!((p.max_outstanding_r2t, p.max_connections, p.error_recovery_level), (1, 1, 0));
    assert!(p.data_pdu_in_order && p.data_sequence_in_order);
}

#[test]
fn digests_offered_by_open_iscsi_when_enabled() {
    let mut login = new_login(LoginConfig::default());
    let keys = first_keys(OPEN, "None");
    one(&mut login, &request(0, 1, true, false, &borrow(&keys)));
    let r =
        one(&mut login, &request(1, 3, true, false, &[("HeaderDigest", "CRC32C,None"), ("DataDigest", "CRC32C,None")]));
    assert_eq!(r.key("HeaderDigest"), Some("CRC32C"));
    assert_eq!(r.key("DataDigest"), Some("CRC32C"));
    assert_eq!(r.params.unwrap().digests(), Digests::BOTH);

    // iscsid.conf's commented-out alternative prefers no digests; the initiator's order wins.
    let mut login = new_login(LoginConfig::default());
    one(&mut login, &request(0, 1, true, false, &borrow(&keys)));
    let r =
        one(&mut login, &request(1, 3, true, false, &[("HeaderDigest", "None,CRC32C"), ("DataDigest", "None,CRC32C")]));
    assert_eq!(r.key("HeaderDigest"), Some("None"));
    assert_eq!(r.params.unwrap().digests(), Digests::NONE);
}

#[test]
fn straight_from_security_to_full_feature() {
    let mut login = new_login(LoginConfig::default());
    let keys = first_keys(OPEN, "None");
    let r = one(&mut login, &request(0, 3, true, false, &borrow(&keys)));
    assert_eq!((r.resp.csg, r.resp.nsg), (0, 3));
    assert_eq!(r.key("MaxRecvDataSegmentLength"), Some("262144"));
    let p = r.params.unwrap();
    assert!(p.initial_r2t, "keys never negotiated keep their RFC defaults");
    assert_eq!(p.max_burst_length, 262_144);
}

#[test]
fn discovery_session() {
    let mut login = new_login(LoginConfig::default());
    let r = one(
        &mut login,
        &request(
            0,
            1,
            true,
            false,
            &[("InitiatorName", INITIATOR), ("SessionType", "Discovery"), ("AuthMethod", "None")],
        ),
    );
    assert_eq!(r.status(), status::SUCCESS);
    assert_eq!(r.key("TargetPortalGroupTag"), None);
    let r = one(
        &mut login,
        &request(
            1,
            3,
            true,
            false,
            &[
                ("HeaderDigest", "None"),
                ("DataDigest", "None"),
                ("DefaultTime2Wait", "2"),
                ("DefaultTime2Retain", "0"),
                ("IFMarker", "No"),
                ("OFMarker", "No"),
                ("ErrorRecoveryLevel", "0"),
                ("MaxRecvDataSegmentLength", "32768"),
                ("MaxBurstLength", "262144"),
            ],
        ),
    );
    assert_eq!(r.key("MaxBurstLength"), Some(IRRELEVANT));
    let p = r.params.unwrap();
    assert_eq!(p.session_type, SessionType::Discovery);
    assert_eq!(p.target_name, None);
    assert_eq!(p.max_xmit_data_segment_length, 32_768);
}

/// Runs the CHAP exchange up to the challenge and returns (algorithm code, identifier,
/// challenge).
fn chap_challenge(login: &mut iscsi::Login, target: &str, algs: &str) -> (u8, u8, Vec<u8>) {
    let keys = first_keys(target, "CHAP,None");
    let r = one(login, &request(0, 1, true, false, &borrow(&keys)));
    assert_eq!(r.status(), status::SUCCESS);
    assert_eq!(r.key("AuthMethod"), Some("CHAP"));
    assert!(!r.resp.transit, "cannot leave the security stage before authenticating");
    let r = one(login, &request(0, 1, false, false, &[("CHAP_A", algs)]));
    assert_eq!(r.status(), status::SUCCESS);
    let a: u8 = r.key("CHAP_A").unwrap().parse().unwrap();
    let i: u8 = r.key("CHAP_I").unwrap().parse().unwrap();
    let c = decode_binary(r.key("CHAP_C").unwrap()).unwrap();
    (a, i, c)
}

fn md5_response(id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
    let mut m = vec![id];
    m.extend_from_slice(secret);
    m.extend_from_slice(challenge);
    md5(&m).to_vec()
}

fn sha256_response(id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
    let mut m = vec![id];
    m.extend_from_slice(secret);
    m.extend_from_slice(challenge);
    sha256(&m).to_vec()
}

fn finish_operational(login: &mut iscsi::Login) -> iscsi::SessionParams {
    let r = one(login, &request(1, 3, true, false, OPEN_ISCSI_DEFAULTS));
    assert_eq!(r.status(), status::SUCCESS);
    r.params.expect("login done")
}

#[test]
fn one_way_chap_md5() {
    let mut login = new_login(LoginConfig::default());
    let (a, i, c) = chap_challenge(&mut login, CHAP, "5");
    assert_eq!((a, i, c.len()), (5, NONCE_ID, 16));
    let resp = encode_hex(&md5_response(i, SECRET, &c));
    let r = one(&mut login, &request(0, 1, true, false, &[("CHAP_N", USER), ("CHAP_R", resp.as_str())]));
    assert_eq!(r.status(), status::SUCCESS);
    assert!(r.resp.transit);
    assert_eq!(r.key("CHAP_N"), None);
    assert_eq!(finish_operational(&mut login).target_name.as_deref(), Some(CHAP));
}

#[test]
fn one_way_chap_sha256_with_base64_response() {
    let mut login = new_login(LoginConfig::default());
    let (a, i, c) = chap_challenge(&mut login, CHAP, "7,5");
    assert_eq!((a, c.len()), (7, 32));
    let resp = format!("0b{}", base64_encode(&sha256_response(i, SECRET, &c)));
    let r = one(&mut login, &request(0, 1, true, false, &[("CHAP_N", USER), ("CHAP_R", resp.as_str())]));
    assert_eq!(r.status(), status::SUCCESS);
    finish_operational(&mut login);
}

#[test]
fn chap_algorithm_follows_initiator_preference() {
    let mut login = new_login(LoginConfig::default());
    let (a, _, _) = chap_challenge(&mut login, CHAP, "6,5,7");
    assert_eq!(a, 5, "SHA-1 (6) is not supported, MD5 comes first among the rest");
}

#[test]
fn wrong_chap_response_is_auth_failure() {
    let mut login = new_login(LoginConfig::default());
    let (_, i, c) = chap_challenge(&mut login, CHAP, "5");
    let resp = encode_hex(&md5_response(i, b"wrong secret", &c));
    let r = one(&mut login, &request(0, 1, true, false, &[("CHAP_N", USER), ("CHAP_R", resp.as_str())]));
    assert!(r.failed);
    assert_eq!(r.status(), status::AUTH_FAILURE);
    assert!(r.keys.is_empty());
}

#[test]
fn wrong_chap_name_is_auth_failure() {
    let mut login = new_login(LoginConfig::default());
    let (_, i, c) = chap_challenge(&mut login, CHAP, "5");
    let resp = encode_hex(&md5_response(i, SECRET, &c));
    let r = one(&mut login, &request(0, 1, true, false, &[("CHAP_N", "mallory"), ("CHAP_R", resp.as_str())]));
    assert_eq!(r.status(), status::AUTH_FAILURE);
}

#[test]
fn chap_target_refuses_auth_none() {
    let mut login = new_login(LoginConfig::default());
    let keys = first_keys(CHAP, "None");
    let r = one(&mut login, &request(0, 1, true, false, &borrow(&keys)));
    assert!(r.failed);
    assert_eq!(r.status(), status::AUTH_FAILURE);
}

#[test]
fn chap_target_refuses_skipping_security() {
    let mut login = new_login(LoginConfig::default());
    let keys = [("InitiatorName", INITIATOR), ("TargetName", CHAP)];
    let r = one(&mut login, &request(1, 3, true, false, &keys));
    assert_eq!(r.status(), status::AUTH_FAILURE);
}

#[test]
fn open_target_allows_skipping_security() {
    let mut login = new_login(LoginConfig::default());
    let mut keys = vec![("InitiatorName", INITIATOR), ("TargetName", OPEN)];
    keys.extend_from_slice(OPEN_ISCSI_DEFAULTS);
    let r = one(&mut login, &request(1, 3, true, false, &keys));
    assert_eq!(r.status(), status::SUCCESS);
    assert_eq!(r.key("TargetPortalGroupTag"), Some("1"));
    assert!(r.params.is_some());
}

#[test]
fn mutual_chap() {
    let mut login = new_login(LoginConfig::default());
    let (_, i, c) = chap_challenge(&mut login, MUTUAL, "5");
    let resp = encode_hex(&md5_response(i, SECRET, &c));
    let my_challenge: Vec<u8> = (100u8..116).collect();
    let my_challenge_hex = encode_hex(&my_challenge);
    let r = one(
        &mut login,
        &request(
            0,
            1,
            true,
            false,
            &[("CHAP_N", USER), ("CHAP_R", resp.as_str()), ("CHAP_I", "77"), ("CHAP_C", my_challenge_hex.as_str())],
        ),
    );
    assert_eq!(r.status(), status::SUCCESS);
    assert!(r.resp.transit);
    assert_eq!(r.key("CHAP_N"), Some(TARGET_USER));
    let target_r = decode_binary(r.key("CHAP_R").unwrap()).unwrap();
    assert_eq!(target_r, md5_response(77, TARGET_SECRET, &my_challenge));
    finish_operational(&mut login);
}

#[test]
fn mutual_chap_refused_without_target_secret() {
    let mut login = new_login(LoginConfig::default());
    let (_, i, c) = chap_challenge(&mut login, CHAP, "5");
    let resp = encode_hex(&md5_response(i, SECRET, &c));
    let r = one(
        &mut login,
        &request(
            0,
            1,
            true,
            false,
            &[("CHAP_N", USER), ("CHAP_R", resp.as_str()), ("CHAP_I", "1"), ("CHAP_C", "0x0102")],
        ),
    );
    assert_eq!(r.status(), status::AUTH_FAILURE);
}

#[test]
fn mutual_chap_refuses_reflected_challenge() {
    let mut login = new_login(LoginConfig::default());
    let (_, i, c) = chap_challenge(&mut login, MUTUAL, "5");
    let resp = encode_hex(&md5_response(i, SECRET, &c));
    let reflected = encode_hex(&c);
    let r = one(
        &mut login,
        &request(
            0,
            1,
            true,
            false,
            &[("CHAP_N", USER), ("CHAP_R", resp.as_str()), ("CHAP_I", "1"), ("CHAP_C", reflected.as_str())],
        ),
    );
    assert_eq!(r.status(), status::AUTH_FAILURE);
}

#[test]
fn discovery_chap_is_enforced_when_configured() {
    use iscsi::login::{ChapConfig, ChapCredentials, Secret};
    let config = LoginConfig {
        discovery_chap: Some(ChapConfig {
            initiator: ChapCredentials { name: USER.to_owned(), secret: Secret(SECRET.to_vec()) },
            target: None,
        }),
        ..Default::default()
    };
    let mut login = new_login(config);
    let r = one(
        &mut login,
        &request(
            0,
            1,
            true,
            false,
            &[("InitiatorName", INITIATOR), ("SessionType", "Discovery"), ("AuthMethod", "None")],
        ),
    );
    assert_eq!(r.status(), status::AUTH_FAILURE);
}

#[test]
fn unknown_target_is_not_found() {
    let mut login = new_login(LoginConfig::default());
    let keys = first_keys("iqn.2026-11.dev.forkd:nope", "None");
    let r = one(&mut login, &request(0, 1, true, false, &borrow(&keys)));
    assert!(r.failed);
    assert_eq!(r.status(), status::NOT_FOUND);
    assert_eq!((r.resp.status_class, r.resp.status_detail), (0x02, 0x03));
}

#[test]
fn initiator_not_on_allow_list_is_not_authorized() {
    let mut login = new_login(LoginConfig::default());
    let keys = first_keys(ACL, "None");
    let r = one(&mut login, &request(0, 1, true, false, &borrow(&keys)));
    assert_eq!(r.status(), status::AUTHORIZATION_FAILURE);
}

#[test]
fn missing_names_are_missing_parameters() {
    let mut login = new_login(LoginConfig::default());
    let r = one(&mut login, &request(0, 1, true, false, &[("TargetName", OPEN), ("AuthMethod", "None")]));
    assert_eq!(r.status(), status::MISSING_PARAMETER);
    let mut login = new_login(LoginConfig::default());
    let r = one(&mut login, &request(0, 1, true, false, &[("InitiatorName", INITIATOR), ("AuthMethod", "None")]));
    assert_eq!(r.status(), status::MISSING_PARAMETER);
}

#[test]
fn unknown_keys_are_not_understood() {
    let mut login = new_login(LoginConfig::default());
    let keys = first_keys(OPEN, "None");
    one(&mut login, &request(0, 1, true, false, &borrow(&keys)));
    let r = one(
        &mut login,
        &request(
            1,
            3,
            true,
            false,
            &[
                ("X-com.example.Thing", "1"),
                ("FancyNewKey", "Yes"),
                ("RDMAExtensions", "Yes"),
                ("OFMarkInt", "2048~8192"),
                ("MaxBurstLength", "12"),
            ],
        ),
    );
    assert_eq!(r.status(), status::SUCCESS);
    assert_eq!(r.key("X-com.example.Thing"), Some(NOT_UNDERSTOOD));
    assert_eq!(r.key("FancyNewKey"), Some(NOT_UNDERSTOOD));
    assert_eq!(r.key("RDMAExtensions"), Some(NOT_UNDERSTOOD));
    assert_eq!(r.key("OFMarkInt"), Some(REJECT));
    assert_eq!(r.key("MaxBurstLength"), Some(REJECT));
}

#[test]
fn text_continued_across_pdus() {
    let mut login = new_login(LoginConfig::default());
    let keys = first_keys(OPEN, "None");
    let text = iscsi::keys::encode_text(&borrow(&keys));
    // Split in the middle of a key.
    let (a, b) = text.split_at(20);
    let mut req = iscsi::pdu::LoginRequest {
        cont: true,
        csg: 0,
        nsg: 1,
        isid: [0x00, 0x02, 0x3d, 0x00, 0x00, 0x01],
        itt: 0x10,
        cmd_sn: 5,
        ..Default::default()
    };
    let first = Pdu::with_data(req.clone(), a.to_vec()).encode(Digests::NONE).unwrap();
    req.cont = false;
    req.transit = true;
    let second = Pdu::with_data(req, b.to_vec()).encode(Digests::NONE).unwrap();
    let mut script = first;
    script.extend_from_slice(&second);
    let replies = exchange(&mut login, &script).unwrap();
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[0].status(), status::SUCCESS);
    assert!(replies[0].keys.is_empty() && !replies[0].resp.transit);
    assert_eq!(replies[1].status(), status::SUCCESS);
    assert!(replies[1].resp.transit);
    assert_eq!(replies[1].key("AuthMethod"), Some("None"));
    assert_eq!(replies[1].resp.stat_sn, replies[0].resp.stat_sn + 1);
    finish_operational(&mut login);
}

#[test]
fn continue_with_transit_is_an_error() {
    let mut login = new_login(LoginConfig::default());
    let r = one(&mut login, &request(0, 1, true, true, &[("InitiatorName", INITIATOR)]));
    assert_eq!(r.status(), status::INITIATOR_ERROR);
}

#[test]
fn key_repeated_in_a_later_pdu_is_an_error() {
    let mut login = new_login(LoginConfig::default());
    let keys = first_keys(OPEN, "None");
    one(&mut login, &request(0, 1, true, false, &borrow(&keys)));
    let r = one(&mut login, &request(1, 3, false, false, &[("MaxBurstLength", "262144")]));
    assert_eq!(r.status(), status::SUCCESS);
    let r = one(&mut login, &request(1, 3, true, false, &[("MaxBurstLength", "262144")]));
    assert_eq!(r.status(), status::INITIATOR_ERROR);
}

#[test]
fn wrong_stage_and_version_and_tsih() {
    let mut login = new_login(LoginConfig::default());
    let keys = first_keys(OPEN, "None");
    one(&mut login, &request(0, 1, true, false, &borrow(&keys)));
    // The target moved to the operational stage; a request still in security is out of order.
    let r = one(&mut login, &request(0, 1, true, false, &[]));
    assert_eq!(r.status(), status::INITIATOR_ERROR);

    let mut login = new_login(LoginConfig::default());
    let mut bytes = request(0, 1, true, false, &borrow(&keys));
    bytes[3] = 1; // Version-min
    assert_eq!(one(&mut login, &bytes).status(), status::UNSUPPORTED_VERSION);

    let mut login = new_login(LoginConfig::default());
    let mut bytes = request(0, 1, true, false, &borrow(&keys));
    bytes[15] = 9; // TSIH of a session this target never created
    assert_eq!(one(&mut login, &bytes).status(), status::SESSION_DOES_NOT_EXIST);

    let mut login = new_login(LoginConfig::default());
    let r = one(&mut login, &request(0, 2, true, false, &borrow(&keys)));
    assert_eq!(r.status(), status::INITIATOR_ERROR);
}

#[test]
fn non_login_pdu_is_invalid_during_login() {
    let mut login = new_login(LoginConfig::default());
    let nop = NopOut { itt: 3, ttt: RESERVED_TAG, ..Default::default() };
    let r = one(&mut login, &Pdu::new(nop).encode(Digests::NONE).unwrap());
    assert_eq!(r.status(), status::INVALID_DURING_LOGIN);
    assert_eq!(r.resp.itt, 3);
}

proptest! {
    /// Arbitrary request sequences never panic, and every request gets one response until the
    /// machine finishes.
    #[test]
    fn arbitrary_requests_never_panic(
        reqs in proptest::collection::vec(
            (0u8..4, 0u8..4, any::<bool>(), any::<bool>(),
             proptest::collection::vec(
                 (prop::sample::select(vec!["InitiatorName", "TargetName", "SessionType", "AuthMethod",
                      "CHAP_A", "CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C", "MaxBurstLength", "HeaderDigest",
                      "X-y", "InitialR2T"]),
                  prop::sample::select(vec!["None", "CHAP", "5", "0x00", "0bAA==", OPEN, CHAP, "Discovery",
                      "Yes", "No", "", "CRC32C,None", "7,5", "alice", "4294967296"])),
                 0..6)),
            1..6)
    ) {
        let mut login = new_login(LoginConfig::default());
        for (csg, nsg, t, c, keys) in reqs {
            match exchange(&mut login, &request(csg, nsg, t, c, &keys)) {
                Ok(replies) => prop_assert_eq!(replies.len(), 1),
                Err(IscsiError::LoginFinished) => break,
                Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
            }
        }
    }

    /// Arbitrary bytes as login data never panic.
    #[test]
    fn arbitrary_login_text_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut login = new_login(LoginConfig::default());
        let req = iscsi::pdu::LoginRequest { transit: true, nsg: 1, ..Default::default() };
        let bytes = Pdu::with_data(req, data).encode(Digests::NONE).unwrap();
        let _ = exchange(&mut login, &bytes);
    }
}
