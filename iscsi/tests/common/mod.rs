//! Initiator-side helpers for driving the target's login machine in memory: a fixed target
//! table, Login Request encoders and a driver that pushes each request through the real codec
//! (encode, decode), hands it to the machine and decodes the response bytes it would send.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use iscsi::keys::parse_text;
use iscsi::login::{ChapConfig, ChapCredentials, ChapNonce, Secret, TargetInfo};
use iscsi::pdu::{decode, LoginRequest, LoginResponse};
use iscsi::{Bhs, Digests, IscsiError, Login, LoginConfig, LoginStep, Pdu, SessionParams, Targets};

pub(crate) const OPEN: &str = "iqn.2026-11.dev.forkd:open";
pub(crate) const CHAP: &str = "iqn.2026-11.dev.forkd:chap";
pub(crate) const MUTUAL: &str = "iqn.2026-11.dev.forkd:mutual";
pub(crate) const ACL: &str = "iqn.2026-11.dev.forkd:acl";
pub(crate) const INITIATOR: &str = "iqn.1994-05.com.redhat:client";
pub(crate) const USER: &str = "alice";
pub(crate) const SECRET: &[u8] = b"initiator-secret";
pub(crate) const TARGET_USER: &str = "forkd";
pub(crate) const TARGET_SECRET: &[u8] = b"target-secret-1";
pub(crate) const TSIH: u16 = 0x1234;
pub(crate) const NONCE_ID: u8 = 42;

/// Four targets: open, one-way CHAP, mutual CHAP, and one only `INITIATOR` may use.
#[derive(Debug)]
pub(crate) struct TestTargets;

fn creds(name: &str, secret: &[u8]) -> ChapCredentials {
    ChapCredentials { name: name.to_owned(), secret: Secret(secret.to_vec()) }
}

impl Targets for TestTargets {
    fn lookup(&self, name: &str) -> Option<TargetInfo> {
        let mut t = TargetInfo { name: name.to_owned(), alias: None, allowed_initiators: Vec::new(), chap: None };
        match name {
            OPEN => t.alias = Some("open volume".to_owned()),
            CHAP => t.chap = Some(ChapConfig { initiator: creds(USER, SECRET), target: None }),
            MUTUAL => {
                t.chap =
                    Some(ChapConfig { initiator: creds(USER, SECRET), target: Some(creds(TARGET_USER, TARGET_SECRET)) })
            }
            ACL => t.allowed_initiators = vec!["iqn.1994-05.com.redhat:other".to_owned()],
            _ => return None,
        }
        Some(t)
    }
}

pub(crate) fn nonce() -> ChapNonce {
    let mut challenge = [0u8; 32];
    for (i, b) in challenge.iter_mut().enumerate() {
        *b = u8::try_from(i * 7 + 1).unwrap();
    }
    ChapNonce { identifier: NONCE_ID, challenge }
}

pub(crate) fn new_login(config: LoginConfig) -> Login {
    Login::new(config, TSIH, nonce())
}

/// The bytes of one Login Request.
pub(crate) fn request(csg: u8, nsg: u8, transit: bool, cont: bool, keys: &[(&str, &str)]) -> Vec<u8> {
    let req = LoginRequest {
        transit,
        cont,
        csg,
        nsg,
        isid: [0x00, 0x02, 0x3d, 0x00, 0x00, 0x01],
        itt: 0x10,
        cid: 0,
        cmd_sn: 5,
        exp_stat_sn: 0,
        ..Default::default()
    };
    let data = iscsi::keys::encode_text(keys);
    Pdu::with_data(req, data).encode(Digests::NONE).unwrap()
}

/// What the target answered to one request.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) resp: LoginResponse,
    pub(crate) keys: Vec<(String, String)>,
    pub(crate) params: Option<SessionParams>,
    pub(crate) failed: bool,
}

impl Reply {
    pub(crate) fn status(&self) -> u16 {
        u16::from_be_bytes([self.resp.status_class, self.resp.status_detail])
    }

    pub(crate) fn key(&self, k: &str) -> Option<&str> {
        self.keys.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
    }
}

/// Decodes `bytes` (one or more whole requests), feeds each to the machine and returns the
/// decoded responses.
pub(crate) fn exchange(login: &mut Login, bytes: &[u8]) -> Result<Vec<Reply>, IscsiError> {
    let mut rest = bytes;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let Some((pdu, n)) = decode(rest, Digests::NONE, Login::login_max_data())? else { break };
        rest = &rest[n..];
        let step = login.handle(&pdu, &TestTargets)?;
        let (pdu, params, failed) = match step {
            LoginStep::Continue(p) => (p, None, false),
            LoginStep::Done(p, params) => (p, Some(*params), false),
            LoginStep::Fail(p) => (p, None, true),
        };
        let wire = pdu.encode(Digests::NONE)?;
        let (back, n) = decode(&wire, Digests::NONE, 1 << 20)?.expect("whole response");
        assert_eq!(n, wire.len());
        assert_eq!(back, pdu);
        let Bhs::LoginResponse(resp) = back.bhs else { panic!("not a login response") };
        let keys = parse_text(&back.data)?;
        out.push(Reply { resp, keys, params, failed });
    }
    Ok(out)
}

/// One request, one reply.
pub(crate) fn one(login: &mut Login, bytes: &[u8]) -> Reply {
    let mut replies = exchange(login, bytes).unwrap();
    assert_eq!(replies.len(), 1);
    replies.remove(0)
}

/// What open-iscsi's default iscsid.conf makes the Linux initiator propose in the
/// operational stage of a normal session.
pub(crate) const OPEN_ISCSI_DEFAULTS: &[(&str, &str)] = &[
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"),
    ("IFMarker", "No"),
    ("OFMarker", "No"),
    ("ErrorRecoveryLevel", "0"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("MaxBurstLength", "16776192"),
    ("FirstBurstLength", "262144"),
    ("MaxOutstandingR2T", "1"),
    ("MaxConnections", "1"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
    ("MaxRecvDataSegmentLength", "262144"),
];
