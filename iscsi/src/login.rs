//! The target's login state machine (RFC 7143 §6 and §11.12-11.13): one [`Login`] per
//! connection, fed Login Request PDUs, answering each with one Login Response.
//!
//! It owns the login's progress: the current stage (security, operational), the
//! authentication exchange, the text of a request continued over several PDUs (C bit), the keys
//! seen so far and the operational [`Negotiation`]. It learns about targets through the
//! [`Targets`] trait at the moment the first request names one, and never keeps a reference
//! to the daemon. Randomness (the CHAP challenge) and the TSIH come from the caller, so a login
//! is deterministic and can be replayed in tests.
//!
//! Invariants:
//! - Every request gets exactly one response. [`LoginStep::Fail`] carries a response with a
//!   non-zero status; after it, or after [`LoginStep::Done`], the machine refuses input.
//! - The target never offers keys of its own (beyond the declarations `TargetPortalGroupTag`,
//!   `TargetAlias` and `MaxRecvDataSegmentLength`), so it can always follow the initiator's
//!   T bit once authentication is complete.
//! - Authentication is never skipped: when the target or discovery configuration has CHAP
//!   secrets, reaching the operational stage or the full feature phase requires a verified
//!   `CHAP_R`.
//! - StatSN starts at [`LoginConfig::initial_stat_sn`] and grows by one per response.

use std::collections::HashSet;
use std::fmt;

use crate::digest::{md5, sha256};
use crate::keys::{
    decode_binary, encode_hex, encode_text, parse_number, parse_text, Negotiation, SessionParams, SessionType,
    TargetLimits, REJECT,
};
use crate::pdu::{Bhs, LoginRequest, LoginResponse, Pdu};
use crate::IscsiError;

/// Login stages (CSG/NSG).
pub mod stage {
    /// Security negotiation.
    pub const SECURITY: u8 = 0;
    /// Login operational negotiation.
    pub const OPERATIONAL: u8 = 1;
    /// Full feature phase.
    pub const FULL_FEATURE: u8 = 3;
}

/// Login status codes, class in the high byte and detail in the low byte (RFC 7143 §11.13.5).
pub mod status {
    /// Login is proceeding OK.
    pub const SUCCESS: u16 = 0x0000;
    /// Initiator error (miscellaneous): a malformed or out-of-sequence request.
    pub const INITIATOR_ERROR: u16 = 0x0200;
    /// Authentication failed (wrong CHAP name or response, or no acceptable method).
    pub const AUTH_FAILURE: u16 = 0x0201;
    /// The initiator is not allowed to access this target.
    pub const AUTHORIZATION_FAILURE: u16 = 0x0202;
    /// The target does not exist.
    pub const NOT_FOUND: u16 = 0x0203;
    /// The target has been removed.
    pub const TARGET_REMOVED: u16 = 0x0204;
    /// The requested iSCSI version range is not supported.
    pub const UNSUPPORTED_VERSION: u16 = 0x0205;
    /// Too many connections on this session.
    pub const TOO_MANY_CONNECTIONS: u16 = 0x0206;
    /// A required key is missing (InitiatorName, or TargetName in a normal session).
    pub const MISSING_PARAMETER: u16 = 0x0207;
    /// The connection cannot be added to the session.
    pub const CANT_INCLUDE_IN_SESSION: u16 = 0x0208;
    /// The session type is not supported.
    pub const SESSION_TYPE_NOT_SUPPORTED: u16 = 0x0209;
    /// The TSIH names no existing session.
    pub const SESSION_DOES_NOT_EXIST: u16 = 0x020a;
    /// The request is not valid during login (a non-login PDU).
    pub const INVALID_DURING_LOGIN: u16 = 0x020b;
    /// Target error (miscellaneous).
    pub const TARGET_ERROR: u16 = 0x0300;
    /// Service unavailable.
    pub const SERVICE_UNAVAILABLE: u16 = 0x0301;
    /// Out of resources.
    pub const OUT_OF_RESOURCES: u16 = 0x0302;
}

/// CHAP hash algorithms (`CHAP_A`, from the IANA PPP authentication algorithms registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChapAlgorithm {
    /// MD5 (5), 16-byte responses.
    Md5,
    /// SHA-256 (7), 32-byte responses.
    Sha256,
}

impl ChapAlgorithm {
    /// The `CHAP_A` value.
    pub fn code(self) -> u8 {
        match self {
            ChapAlgorithm::Md5 => 5,
            ChapAlgorithm::Sha256 => 7,
        }
    }

    /// The algorithm with this `CHAP_A` value.
    pub fn from_code(code: u64) -> Option<ChapAlgorithm> {
        match code {
            5 => Some(ChapAlgorithm::Md5),
            7 => Some(ChapAlgorithm::Sha256),
            _ => None,
        }
    }

    /// The challenge length the target sends: the hash length.
    pub fn challenge_len(self) -> usize {
        match self {
            ChapAlgorithm::Md5 => 16,
            ChapAlgorithm::Sha256 => 32,
        }
    }

    /// The CHAP response `H(identifier || secret || challenge)` (RFC 1994 §4.1).
    pub fn response(self, identifier: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
        let mut msg = Vec::with_capacity(1 + secret.len() + challenge.len());
        msg.push(identifier);
        msg.extend_from_slice(secret);
        msg.extend_from_slice(challenge);
        match self {
            ChapAlgorithm::Md5 => md5(&msg).to_vec(),
            ChapAlgorithm::Sha256 => sha256(&msg).to_vec(),
        }
    }
}

/// A CHAP secret; its `Debug` output never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// A CHAP name and secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapCredentials {
    /// CHAP_N.
    pub name: String,
    /// The shared secret.
    pub secret: Secret,
}

/// CHAP settings of a target (or of discovery sessions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapConfig {
    /// What the initiator must prove it knows (one-way CHAP).
    pub initiator: ChapCredentials,
    /// What the target answers with when the initiator asks for mutual CHAP; `None` refuses
    /// mutual CHAP. Must differ from `initiator`'s secret.
    pub target: Option<ChapCredentials>,
}

/// What the daemon tells the login about one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetInfo {
    /// Canonical target name.
    pub name: String,
    /// Sent as `TargetAlias` when set.
    pub alias: Option<String>,
    /// Initiator names allowed to log in (compared case-insensitively, as iSCSI names are);
    /// empty allows every initiator. Address-based rules
    /// are the daemon's: it knows the peer address when it answers [`Targets::lookup`].
    pub allowed_initiators: Vec<String>,
    /// CHAP is required when set.
    pub chap: Option<ChapConfig>,
}

/// The daemon's view of its targets, asked during login.
pub trait Targets {
    /// The target with this name, or `None` (login status 0x0203).
    fn lookup(&self, name: &str) -> Option<TargetInfo>;
}

/// Settings of one login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginConfig {
    /// What operational negotiation accepts.
    pub limits: TargetLimits,
    /// This portal's group tag, declared in the first response of a normal session.
    pub portal_group_tag: u16,
    /// CHAP required for discovery sessions, when set.
    pub discovery_chap: Option<ChapConfig>,
    /// CHAP algorithms accepted; the initiator's order of preference decides among them.
    pub chap_algorithms: Vec<ChapAlgorithm>,
    /// Longest login text accepted, summed over PDUs continued with the C bit.
    pub max_text_len: usize,
    /// The CmdSN window advertised: MaxCmdSN = ExpCmdSN + window - 1.
    pub cmd_window: u32,
    /// StatSN of the first Login Response.
    pub initial_stat_sn: u32,
}

impl Default for LoginConfig {
    fn default() -> Self {
        LoginConfig {
            limits: TargetLimits::default(),
            portal_group_tag: 1,
            discovery_chap: None,
            chap_algorithms: vec![ChapAlgorithm::Sha256, ChapAlgorithm::Md5],
            max_text_len: 64 * 1024,
            cmd_window: 32,
            initial_stat_sn: 1,
        }
    }
}

/// The caller's random bytes for the CHAP challenge: an identifier and up to 32 challenge
/// bytes (the algorithm's hash length is used).
#[derive(Clone, PartialEq, Eq)]
pub struct ChapNonce {
    /// CHAP_I.
    pub identifier: u8,
    /// CHAP_C source bytes.
    pub challenge: [u8; 32],
}

impl fmt::Debug for ChapNonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChapNonce(..)")
    }
}

/// What the caller does after [`Login::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginStep {
    /// Send the response and wait for the next Login Request.
    Continue(Pdu),
    /// Send the response; the connection is in the full feature phase with these parameters.
    Done(Pdu, Box<SessionParams>),
    /// Send the response (its status says why) and close the connection.
    Fail(Pdu),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Auth {
    /// No AuthMethod seen yet.
    Start,
    /// AuthMethod=CHAP chosen; waiting for CHAP_A.
    ChapAlgorithm,
    /// Challenge sent; waiting for CHAP_N and CHAP_R.
    ChapResponse { alg: ChapAlgorithm, id: u8, challenge: Vec<u8> },
    /// Authenticated, or no authentication needed.
    Done,
    /// No acceptable method: the login fails when the initiator tries to leave the stage.
    Refused,
}

/// A failed login: the status to send.
struct Failure(u16);

/// The login state machine of one connection.
#[derive(Debug)]
pub struct Login {
    config: LoginConfig,
    nonce: ChapNonce,
    tsih: u16,
    negotiation: Negotiation,
    /// The stage the next request must be in; `None` before the first request.
    stage: Option<u8>,
    auth: Auth,
    chap: Option<ChapConfig>,
    pending: Vec<u8>,
    seen: HashSet<String>,
    declared_mrdsl: bool,
    /// The identity keys of the first complete request have been processed.
    identified: bool,
    stat_sn: u32,
    finished: bool,
}

impl Login {
    /// A login that assigns `tsih` (non-zero, unique among the daemon's sessions) if it
    /// succeeds, and draws its CHAP challenge from `nonce`.
    pub fn new(config: LoginConfig, tsih: u16, nonce: ChapNonce) -> Login {
        let negotiation = Negotiation::new(config.limits.clone());
        let stat_sn = config.initial_stat_sn;
        Login {
            config,
            nonce,
            tsih,
            negotiation,
            stage: None,
            auth: Auth::Start,
            chap: None,
            pending: Vec::new(),
            seen: HashSet::new(),
            declared_mrdsl: false,
            identified: false,
            stat_sn,
            finished: false,
        }
    }

    /// The largest data segment to accept while logging in: the RFC's 8192-byte default
    /// MaxRecvDataSegmentLength, which applies until the full feature phase.
    pub const fn login_max_data() -> u32 {
        8192
    }

    /// Handles one PDU received during login. Any PDU other than a Login Request fails the
    /// login with 0x020b. `Err` only if called after the login finished.
    pub fn handle(&mut self, pdu: &Pdu, targets: &dyn Targets) -> Result<LoginStep, IscsiError> {
        if self.finished {
            return Err(IscsiError::LoginFinished);
        }
        let Bhs::LoginRequest(req) = &pdu.bhs else {
            let req = LoginRequest { itt: pdu.bhs.itt(), ..Default::default() };
            return Ok(self.fail(&req, status::INVALID_DURING_LOGIN));
        };
        match self.step(req, &pdu.data, targets) {
            Ok(step) => Ok(step),
            Err(Failure(code)) => Ok(self.fail(req, code)),
        }
    }

    /// One Login Request: check where it stands in the sequence, gather its text, answer its
    /// keys, then stay in the stage or move to the next (the full feature phase ends the login).
    fn step(&mut self, req: &LoginRequest, data: &[u8], targets: &dyn Targets) -> Result<LoginStep, Failure> {
        self.check_sequence(req)?;
        let Some(pairs) = self.gather_text(req, data)? else {
            // More text follows (C bit): acknowledge this part with an empty response.
            let resp = self.response(req, false, req.csg, 0);
            return Ok(LoginStep::Continue(Pdu::new(resp)));
        };
        let mut out: Vec<(String, String)> = Vec::new();
        if !self.identified {
            self.identified = true;
            self.identify(&pairs, targets, &mut out)?;
            if req.csg == stage::OPERATIONAL && self.chap.is_some() {
                // Skipping the security stage is only allowed when nothing must be proven.
                return Err(Failure(status::AUTH_FAILURE));
            }
            if req.csg == stage::OPERATIONAL {
                self.auth = Auth::Done;
            }
        }
        self.answer_keys(req, &pairs, &mut out)?;
        if !req.transit {
            let resp = self.response(req, false, req.csg, 0);
            return Ok(LoginStep::Continue(Pdu::with_data(resp, encode_text(&out))));
        }
        self.transit(req, out)
    }

    /// The first request opens the login (version, a new session, a valid stage); every later
    /// one must stay in the current stage with the same ISID and CID.
    fn check_sequence(&mut self, req: &LoginRequest) -> Result<(), Failure> {
        if self.stage.is_none() {
            if req.version_min > 0 {
                return Err(Failure(status::UNSUPPORTED_VERSION));
            }
            if req.tsih != 0 {
                // Adding a connection to, or reinstating, an existing session is not
                // supported (MaxConnections=1 and ErrorRecoveryLevel=0).
                return Err(Failure(status::SESSION_DOES_NOT_EXIST));
            }
            if req.csg != stage::SECURITY && req.csg != stage::OPERATIONAL {
                return Err(Failure(status::INITIATOR_ERROR));
            }
            let p = self.negotiation.params_mut();
            p.isid = req.isid;
            p.cid = req.cid;
        } else {
            let p = self.negotiation.params();
            if Some(req.csg) != self.stage || req.isid != p.isid || req.cid != p.cid {
                return Err(Failure(status::INITIATOR_ERROR));
            }
        }
        self.negotiation.params_mut().exp_cmd_sn = req.cmd_sn;
        Ok(())
    }

    /// Adds this request's data to the text gathered so far. `None` while more follows (C
    /// bit); else the whole text's key=value pairs, each key new to this login.
    fn gather_text(&mut self, req: &LoginRequest, data: &[u8]) -> Result<Option<Vec<(String, String)>>, Failure> {
        if self.pending.len().saturating_add(data.len()) > self.config.max_text_len {
            return Err(Failure(status::OUT_OF_RESOURCES));
        }
        self.pending.extend_from_slice(data);
        if req.cont {
            if req.transit {
                return Err(Failure(status::INITIATOR_ERROR));
            }
            self.stage = Some(req.csg);
            return Ok(None);
        }
        let text = std::mem::take(&mut self.pending);
        let pairs = parse_text(&text).map_err(|_| Failure(status::INITIATOR_ERROR))?;
        for (k, _) in &pairs {
            if !self.seen.insert(k.clone()) {
                return Err(Failure(status::INITIATOR_ERROR));
            }
        }
        self.stage = Some(req.csg);
        Ok(Some(pairs))
    }

    /// Answers the security keys (only in the security stage) and the negotiated ones.
    fn answer_keys(
        &mut self,
        req: &LoginRequest,
        pairs: &[(String, String)],
        out: &mut Vec<(String, String)>,
    ) -> Result<(), Failure> {
        let security: Vec<&(String, String)> =
            pairs.iter().filter(|(k, _)| k == "AuthMethod" || k.starts_with("CHAP_")).collect();
        if !security.is_empty() {
            if req.csg != stage::SECURITY {
                return Err(Failure(status::INITIATOR_ERROR));
            }
            self.authenticate(&security, out)?;
        }
        for (k, v) in pairs {
            match k.as_str() {
                "InitiatorName" | "TargetName" | "SessionType" => {}
                "AuthMethod" => {}
                k if k.starts_with("CHAP_") => {}
                "InitiatorAlias" => self.negotiation.params_mut().initiator_alias = Some(v.clone()),
                "MaxRecvDataSegmentLength" => {
                    if let Some(answer) = self.negotiation.answer(k, v) {
                        out.push((k.to_owned(), answer));
                    } else {
                        self.declare_mrdsl(out);
                    }
                }
                _ => {
                    if let Some(answer) = self.negotiation.answer(k, v) {
                        out.push((k.clone(), answer));
                    }
                }
            }
        }
        Ok(())
    }

    /// The initiator asks to leave the current stage (T bit): check the next stage and that
    /// authentication allows it, then move on, or finish the login at the full feature phase.
    fn transit(&mut self, req: &LoginRequest, mut out: Vec<(String, String)>) -> Result<LoginStep, Failure> {
        let next_ok = match req.csg {
            stage::SECURITY => req.nsg == stage::OPERATIONAL || req.nsg == stage::FULL_FEATURE,
            _ => req.nsg == stage::FULL_FEATURE,
        };
        if !next_ok {
            return Err(Failure(status::INITIATOR_ERROR));
        }
        if req.csg == stage::SECURITY {
            match self.auth.clone() {
                Auth::Done => {}
                Auth::Start if self.chap.is_none() => self.auth = Auth::Done,
                Auth::ChapAlgorithm | Auth::ChapResponse { .. } => {
                    // Authentication is still under way: stay in this stage (T=0).
                    let resp = self.response(req, false, req.csg, 0);
                    return Ok(LoginStep::Continue(Pdu::with_data(resp, encode_text(&out))));
                }
                Auth::Start | Auth::Refused => return Err(Failure(status::AUTH_FAILURE)),
            }
        }
        if req.nsg == stage::FULL_FEATURE {
            self.declare_mrdsl(&mut out);
            let mut resp = self.response(req, true, req.csg, req.nsg);
            resp.tsih = self.tsih;
            self.finished = true;
            let mut params = self.negotiation.finish();
            params.tsih = self.tsih;
            params.stat_sn = self.stat_sn;
            return Ok(LoginStep::Done(Pdu::with_data(resp, encode_text(&out)), Box::new(params)));
        }
        self.stage = Some(req.nsg);
        let resp = self.response(req, true, req.csg, req.nsg);
        Ok(LoginStep::Continue(Pdu::with_data(resp, encode_text(&out))))
    }

    /// The identity keys of the first request: who is logging in, to what, and how.
    fn identify(
        &mut self,
        pairs: &[(String, String)],
        targets: &dyn Targets,
        out: &mut Vec<(String, String)>,
    ) -> Result<(), Failure> {
        let get = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        let initiator = get("InitiatorName").filter(|v| !v.is_empty()).ok_or(Failure(status::MISSING_PARAMETER))?;
        let session_type = match get("SessionType").unwrap_or("Normal") {
            "Normal" => SessionType::Normal,
            "Discovery" => SessionType::Discovery,
            _ => return Err(Failure(status::SESSION_TYPE_NOT_SUPPORTED)),
        };
        let p = self.negotiation.params_mut();
        p.initiator_name = initiator.to_owned();
        p.session_type = session_type;
        match session_type {
            SessionType::Discovery => self.chap = self.config.discovery_chap.clone(),
            SessionType::Normal => {
                let name = get("TargetName").filter(|v| !v.is_empty()).ok_or(Failure(status::MISSING_PARAMETER))?;
                let target = targets.lookup(name).ok_or(Failure(status::NOT_FOUND))?;
                if !target.allowed_initiators.is_empty()
                    && !target.allowed_initiators.iter().any(|i| i.eq_ignore_ascii_case(initiator))
                {
                    return Err(Failure(status::AUTHORIZATION_FAILURE));
                }
                p.target_name = Some(target.name.clone());
                if let Some(alias) = &target.alias {
                    out.push(("TargetAlias".to_owned(), alias.clone()));
                }
                out.push(("TargetPortalGroupTag".to_owned(), self.config.portal_group_tag.to_string()));
                self.chap = target.chap;
            }
        }
        Ok(())
    }

    /// AuthMethod and the CHAP exchange (RFC 7143 §12.1.3).
    fn authenticate(&mut self, keys: &[&(String, String)], out: &mut Vec<(String, String)>) -> Result<(), Failure> {
        let get = |key: &str| keys.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        if let Some(methods) = get("AuthMethod") {
            if self.auth != Auth::Start {
                return Err(Failure(status::INITIATOR_ERROR));
            }
            let offered: Vec<&str> = methods.split(',').collect();
            let (answer, next) = if self.chap.is_some() {
                if offered.contains(&"CHAP") {
                    ("CHAP", Auth::ChapAlgorithm)
                } else {
                    (REJECT, Auth::Refused)
                }
            } else if offered.contains(&"None") {
                ("None", Auth::Done)
            } else {
                (REJECT, Auth::Refused)
            };
            out.push(("AuthMethod".to_owned(), answer.to_owned()));
            self.auth = next;
        }
        if let Some(algs) = get("CHAP_A") {
            if self.auth != Auth::ChapAlgorithm {
                return Err(Failure(status::AUTH_FAILURE));
            }
            let alg = algs
                .split(',')
                .filter_map(|a| parse_number(a).and_then(ChapAlgorithm::from_code))
                .find(|a| self.config.chap_algorithms.contains(a))
                .ok_or(Failure(status::AUTH_FAILURE))?;
            let id = self.nonce.identifier;
            let challenge = self.nonce.challenge[..alg.challenge_len()].to_vec();
            out.push(("CHAP_A".to_owned(), alg.code().to_string()));
            out.push(("CHAP_I".to_owned(), id.to_string()));
            out.push(("CHAP_C".to_owned(), encode_hex(&challenge)));
            self.auth = Auth::ChapResponse { alg, id, challenge };
        }
        let (name, response) = (get("CHAP_N"), get("CHAP_R"));
        if name.is_none() && response.is_none() {
            if get("CHAP_I").is_some() || get("CHAP_C").is_some() {
                return Err(Failure(status::AUTH_FAILURE));
            }
            return Ok(());
        }
        let Auth::ChapResponse { alg, id, challenge } = self.auth.clone() else {
            return Err(Failure(status::AUTH_FAILURE));
        };
        let chap = self.chap.clone().ok_or(Failure(status::AUTH_FAILURE))?;
        let (Some(name), Some(response)) = (name, response) else { return Err(Failure(status::AUTH_FAILURE)) };
        let response = decode_binary(response).ok_or(Failure(status::AUTH_FAILURE))?;
        let expected = alg.response(id, &chap.initiator.secret.0, &challenge);
        if name != chap.initiator.name || !constant_time_eq(&response, &expected) {
            return Err(Failure(status::AUTH_FAILURE));
        }
        match (get("CHAP_I"), get("CHAP_C")) {
            (None, None) => {}
            (Some(their_id), Some(their_challenge)) => {
                let target = chap.target.as_ref().ok_or(Failure(status::AUTH_FAILURE))?;
                let their_id =
                    parse_number(their_id).and_then(|v| u8::try_from(v).ok()).ok_or(Failure(status::AUTH_FAILURE))?;
                let their_challenge = decode_binary(their_challenge).ok_or(Failure(status::AUTH_FAILURE))?;
                // A challenge equal to ours would let the initiator reflect our own response
                // back at us (RFC 7143 §12.1.3).
                if their_challenge == challenge || their_challenge.is_empty() {
                    return Err(Failure(status::AUTH_FAILURE));
                }
                out.push(("CHAP_N".to_owned(), target.name.clone()));
                let r = alg.response(their_id, &target.secret.0, &their_challenge);
                out.push(("CHAP_R".to_owned(), encode_hex(&r)));
            }
            _ => return Err(Failure(status::AUTH_FAILURE)),
        }
        self.auth = Auth::Done;
        Ok(())
    }

    fn declare_mrdsl(&mut self, out: &mut Vec<(String, String)>) {
        if !self.declared_mrdsl {
            self.declared_mrdsl = true;
            let ours = self.config.limits.max_recv_data_segment_length;
            out.push(("MaxRecvDataSegmentLength".to_owned(), ours.to_string()));
        }
    }

    fn response(&mut self, req: &LoginRequest, transit: bool, csg: u8, nsg: u8) -> LoginResponse {
        let stat_sn = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        LoginResponse {
            transit,
            cont: false,
            csg,
            nsg,
            version_max: 0,
            version_active: 0,
            isid: req.isid,
            tsih: 0,
            itt: req.itt,
            stat_sn,
            exp_cmd_sn: req.cmd_sn,
            max_cmd_sn: req.cmd_sn.wrapping_add(self.config.cmd_window.max(1) - 1),
            status_class: 0,
            status_detail: 0,
        }
    }

    fn fail(&mut self, req: &LoginRequest, code: u16) -> LoginStep {
        self.finished = true;
        let mut resp = self.response(req, false, req.csg, 0);
        let [class, detail] = code.to_be_bytes();
        resp.status_class = class;
        resp.status_detail = detail;
        LoginStep::Fail(Pdu::new(resp))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
