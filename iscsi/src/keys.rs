//! Text keys (RFC 7143 §6 and §13): parsing and encoding of NUL-separated `key=value` data,
//! value syntax (numbers, booleans, lists, hex and base64 binary values), and the target's half
//! of operational negotiation, with every RFC 7143 key, its default and its result function.
//!
//! [`Negotiation`] owns the parameters negotiated so far and the target's own limits
//! ([`TargetLimits`]); it answers one offered key at a time and ends in [`SessionParams`]. It
//! never offers keys of its own, so a target response never needs an answer from the initiator
//! and the target can always follow the initiator's T bit. Keys the initiator does not offer keep
//! their RFC defaults, which is why every [`TargetLimits`] value must be at least as permissive as
//! the default (checked by [`TargetLimits::validate`]).
//!
//! Security keys (`AuthMethod`, `CHAP_*`) and the identity keys (`InitiatorName`, `TargetName`,
//! `SessionType`, `InitiatorAlias`) are handled by the login state machine, not here.

use crate::IscsiError;

/// Longest key name (RFC 7143 §6.1).
pub const MAX_KEY_LEN: usize = 63;
/// Longest value of an ordinary key (RFC 7143 §6.1).
pub const MAX_VALUE_LEN: usize = 255;
/// Longest string form of a CHAP value: a 1024-byte binary value in hex is 2050 characters;
/// some initiators send long challenges, so allow headroom.
pub const MAX_CHAP_VALUE_LEN: usize = 8192;

/// The value answering a key the responder does not know.
pub const NOT_UNDERSTOOD: &str = "NotUnderstood";
/// The value answering an unacceptable offer.
pub const REJECT: &str = "Reject";
/// The value answering a key that does not apply to this session.
pub const IRRELEVANT: &str = "Irrelevant";

/// Parses text data into `(key, value)` pairs, in order. Empty strings between NULs are
/// skipped and a final pair without its NUL is accepted (some initiators omit it). Errors: a
/// pair that is not UTF-8 or has no `=`, a key with characters outside RFC 7143's set, a key or
/// value over its length limit, and a key given twice.
pub fn parse_text(data: &[u8]) -> Result<Vec<(String, String)>, IscsiError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for item in data.split(|&b| b == 0) {
        if item.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(item).map_err(|_| IscsiError::MalformedText("not UTF-8"))?;
        let (k, v) = s.split_once('=').ok_or(IscsiError::MalformedText("pair without '='"))?;
        if k.is_empty() {
            return Err(IscsiError::MalformedText("empty key"));
        }
        if !k.bytes().all(|c| c.is_ascii_alphanumeric() || b".-+@_".contains(&c)) {
            return Err(IscsiError::MalformedText("invalid character in key"));
        }
        let max = if k.starts_with("CHAP_") { MAX_CHAP_VALUE_LEN } else { MAX_VALUE_LEN };
        if k.len() > MAX_KEY_LEN || v.len() > max {
            return Err(IscsiError::TextTooLong);
        }
        if out.iter().any(|(seen, _)| seen == k) {
            return Err(IscsiError::DuplicateKey(k.to_owned()));
        }
        out.push((k.to_owned(), v.to_owned()));
    }
    Ok(out)
}

/// Encodes pairs as `key=value\0...`.
pub fn encode_text<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref().as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_ref().as_bytes());
        out.push(0);
    }
    out
}

/// A numerical value: decimal, or hex with a `0x`/`0X` prefix.
pub fn parse_number(v: &str) -> Option<u64> {
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if hex.is_empty() || hex.len() > 16 {
            return None;
        }
        u64::from_str_radix(hex, 16).ok()
    } else if !v.is_empty() && v.bytes().all(|c| c.is_ascii_digit()) {
        v.parse().ok()
    } else {
        None
    }
}

/// `Yes` or `No`.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> String {
    (if b { "Yes" } else { "No" }).to_owned()
}

/// A binary value (RFC 7143 §6.1): hex after `0x`/`0X`, or base64 after `0b`/`0B`.
pub fn decode_binary(v: &str) -> Option<Vec<u8>> {
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        decode_hex(hex)
    } else if let Some(b64) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        base64_decode(b64)
    } else {
        None
    }
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Hex digits (an odd count has an implied leading zero) to bytes.
fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() {
        return None;
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len() / 2 + 1);
    let mut rest = b;
    if b.len() & 1 == 1 {
        out.push(nibble(b[0])?);
        rest = &b[1..];
    }
    for pair in rest.chunks_exact(2) {
        out.push((nibble(pair[0])? << 4) | nibble(pair[1])?);
    }
    Some(out)
}

/// `0x` and lowercase hex digits.
pub fn encode_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn low_byte(x: u32) -> u8 {
    x.to_le_bytes()[0]
}

/// Standard base64 (RFC 4648) with optional `=` padding.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let body = s.trim_end_matches('=');
    if s.len() - body.len() > 2 || body.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for c in body.bytes() {
        let v = B64.iter().position(|&x| x == c)?;
        acc = (acc << 6) | u32::try_from(v).ok()?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(low_byte(acc >> bits));
            acc &= (1 << bits) - 1;
        }
    }
    // A lone trailing character carries fewer than 8 bits: not valid base64.
    (bits < 6).then_some(out)
}

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(char::from(B64[usize::from(low_byte(n >> (18 - 6 * i)) & 0x3f)]));
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Normal or discovery session (`SessionType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionType {
    /// Full access to one target's LUNs (the default).
    #[default]
    Normal,
    /// Only `SendTargets` text requests.
    Discovery,
}

/// What this target accepts; the other side of each negotiation. [`Default`] follows what
/// forkd wants: unsolicited and immediate data allowed, large bursts, digests on offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetLimits {
    /// The MaxRecvDataSegmentLength the target declares (512 to 2^24-1).
    pub max_recv_data_segment_length: u32,
    /// Largest MaxBurstLength accepted.
    pub max_burst_length: u32,
    /// Largest FirstBurstLength accepted.
    pub first_burst_length: u32,
    /// The target's InitialR2T (`false`: unsolicited data welcome).
    pub initial_r2t: bool,
    /// The target's ImmediateData.
    pub immediate_data: bool,
    /// Largest MaxOutstandingR2T accepted.
    pub max_outstanding_r2t: u16,
    /// Largest MaxConnections accepted.
    pub max_connections: u16,
    /// CRC32C header digests may be chosen.
    pub header_digest: bool,
    /// CRC32C data digests may be chosen.
    pub data_digest: bool,
    /// The target's DefaultTime2Wait (result: maximum).
    pub default_time2wait: u16,
    /// The target's DefaultTime2Retain (result: minimum).
    pub default_time2retain: u16,
    /// Highest ErrorRecoveryLevel supported.
    pub error_recovery_level: u8,
}

impl Default for TargetLimits {
    fn default() -> Self {
        TargetLimits {
            max_recv_data_segment_length: 262_144,
            max_burst_length: 16_776_192,
            first_burst_length: 262_144,
            initial_r2t: false,
            immediate_data: true,
            max_outstanding_r2t: 1,
            max_connections: 1,
            header_digest: true,
            data_digest: true,
            default_time2wait: 2,
            default_time2retain: 20,
            error_recovery_level: 0,
        }
    }
}

impl TargetLimits {
    /// Checks that the limits are in range and no stricter than the RFC defaults (a key the
    /// initiator leaves out takes its default, which the target cannot refuse).
    pub fn validate(&self) -> Result<(), &'static str> {
        let d = SessionParams::default();
        if !(512..=MAX_LEN_24).contains(&self.max_recv_data_segment_length) {
            return Err("MaxRecvDataSegmentLength out of range");
        }
        if !(d.max_burst_length..=MAX_LEN_24).contains(&self.max_burst_length) {
            return Err("MaxBurstLength below the default or out of range");
        }
        if !(d.first_burst_length..=self.max_burst_length).contains(&self.first_burst_length) {
            return Err("FirstBurstLength below the default or above MaxBurstLength");
        }
        if self.max_outstanding_r2t == 0 || self.max_connections == 0 {
            return Err("MaxOutstandingR2T and MaxConnections must be at least 1");
        }
        if self.error_recovery_level > 2 || self.default_time2wait > 3600 || self.default_time2retain > 3600 {
            return Err("ErrorRecoveryLevel, DefaultTime2Wait or DefaultTime2Retain out of range");
        }
        Ok(())
    }
}

const MAX_LEN_24: u32 = 0x00ff_ffff;

/// Everything a login settles, with RFC 7143 defaults for keys never negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    /// `SessionType`.
    pub session_type: SessionType,
    /// `InitiatorName`.
    pub initiator_name: String,
    /// `InitiatorAlias`, if declared.
    pub initiator_alias: Option<String>,
    /// The canonical target name (normal sessions).
    pub target_name: Option<String>,
    /// ISID from the Login Request.
    pub isid: [u8; 6],
    /// TSIH the target assigned.
    pub tsih: u16,
    /// Connection ID.
    pub cid: u16,
    /// The next StatSN the target uses on this connection.
    pub stat_sn: u32,
    /// The next CmdSN expected.
    pub exp_cmd_sn: u32,
    /// `HeaderDigest=CRC32C`.
    pub header_digest: bool,
    /// `DataDigest=CRC32C`.
    pub data_digest: bool,
    /// `MaxConnections` (default 1).
    pub max_connections: u16,
    /// `InitialR2T` (default Yes).
    pub initial_r2t: bool,
    /// `ImmediateData` (default Yes).
    pub immediate_data: bool,
    /// The target's declared MaxRecvDataSegmentLength: the decoder limit.
    pub max_recv_data_segment_length: u32,
    /// The initiator's declared MaxRecvDataSegmentLength (default 8192): the largest data
    /// segment the target may send.
    pub max_xmit_data_segment_length: u32,
    /// `MaxBurstLength` (default 262144).
    pub max_burst_length: u32,
    /// `FirstBurstLength` (default 65536).
    pub first_burst_length: u32,
    /// `DefaultTime2Wait` (default 2).
    pub default_time2wait: u16,
    /// `DefaultTime2Retain` (default 20).
    pub default_time2retain: u16,
    /// `MaxOutstandingR2T` (default 1).
    pub max_outstanding_r2t: u16,
    /// `DataPDUInOrder` (default Yes).
    pub data_pdu_in_order: bool,
    /// `DataSequenceInOrder` (default Yes).
    pub data_sequence_in_order: bool,
    /// `ErrorRecoveryLevel` (default 0).
    pub error_recovery_level: u8,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            session_type: SessionType::Normal,
            initiator_name: String::new(),
            initiator_alias: None,
            target_name: None,
            isid: [0; 6],
            tsih: 0,
            cid: 0,
            stat_sn: 0,
            exp_cmd_sn: 0,
            header_digest: false,
            data_digest: false,
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            max_recv_data_segment_length: 8192,
            max_xmit_data_segment_length: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
        }
    }
}

impl SessionParams {
    /// The digests this connection uses in the full feature phase.
    pub fn digests(&self) -> crate::Digests {
        crate::Digests { header: self.header_digest, data: self.data_digest }
    }
}

/// Keys that RFC 7143 marks "Irrelevant when: SessionType=Discovery".
const NORMAL_SESSION_ONLY: [&str; 8] = [
    "MaxConnections",
    "InitialR2T",
    "ImmediateData",
    "MaxBurstLength",
    "FirstBurstLength",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
];

/// The target's side of operational negotiation for one login.
#[derive(Debug, Clone)]
pub struct Negotiation {
    params: SessionParams,
    limits: TargetLimits,
}

impl Negotiation {
    /// Starts from the RFC defaults and the target's declared MaxRecvDataSegmentLength.
    pub fn new(limits: TargetLimits) -> Negotiation {
        let params =
            SessionParams { max_recv_data_segment_length: limits.max_recv_data_segment_length, ..Default::default() };
        Negotiation { params, limits }
    }

    /// The parameters so far.
    pub fn params(&self) -> &SessionParams {
        &self.params
    }

    /// Mutable access for the login machine (identity keys, ISID, sequence numbers).
    pub fn params_mut(&mut self) -> &mut SessionParams {
        &mut self.params
    }

    /// Answers one operational key offered by the initiator. `None`: the key is declarative
    /// and needs no answer (MaxRecvDataSegmentLength). Unknown keys, `X-` extension keys and
    /// the iSER keys are answered `NotUnderstood`.
    pub fn answer(&mut self, key: &str, value: &str) -> Option<String> {
        if self.params.session_type == SessionType::Discovery && NORMAL_SESSION_ONLY.contains(&key) {
            return Some(IRRELEVANT.to_owned());
        }
        if key == "MaxRecvDataSegmentLength" {
            // Declarative: the initiator's receive limit is what this target may send.
            let Some(v) = num_in(value, 512, MAX_LEN_24) else { return Some(REJECT.to_owned()) };
            self.params.max_xmit_data_segment_length = v;
            return None;
        }
        let reply = self
            .answer_digest(key, value)
            .or_else(|| self.answer_boolean(key, value))
            .or_else(|| self.answer_number(key, value))
            .unwrap_or_else(|| answer_other(key, value));
        Some(reply)
    }

    /// HeaderDigest and DataDigest; `None` for any other key.
    fn answer_digest(&mut self, key: &str, value: &str) -> Option<String> {
        let (offered, chosen) = match key {
            "HeaderDigest" => (self.limits.header_digest, &mut self.params.header_digest),
            "DataDigest" => (self.limits.data_digest, &mut self.params.data_digest),
            _ => return None,
        };
        Some(match pick_digest(value, offered) {
            Some(on) => {
                *chosen = on;
                digest_name(on)
            }
            None => REJECT.to_owned(),
        })
    }

    /// The Yes/No keys; `None` for any other key.
    fn answer_boolean(&mut self, key: &str, value: &str) -> Option<String> {
        let l = &self.limits;
        let p = &mut self.params;
        Some(match key {
            "InitialR2T" => parse_bool(value).map_or_else(reject, |v| {
                p.initial_r2t = v || l.initial_r2t;
                yes_no(p.initial_r2t)
            }),
            "ImmediateData" => parse_bool(value).map_or_else(reject, |v| {
                p.immediate_data = v && l.immediate_data;
                yes_no(p.immediate_data)
            }),
            // The target delivers data in order whatever the initiator says, so its own value
            // is Yes and the OR result is Yes.
            "DataPDUInOrder" => parse_bool(value).map_or_else(reject, |_| {
                p.data_pdu_in_order = true;
                yes_no(true)
            }),
            "DataSequenceInOrder" => parse_bool(value).map_or_else(reject, |_| {
                p.data_sequence_in_order = true;
                yes_no(true)
            }),
            _ => return None,
        })
    }

    /// The numeric keys, each clamped to this target's limit; `None` for any other key.
    fn answer_number(&mut self, key: &str, value: &str) -> Option<String> {
        let l = &self.limits;
        let p = &mut self.params;
        Some(match key {
            "MaxConnections" => num_in(value, 1, 65_535).map_or_else(reject, |v: u16| {
                p.max_connections = v.min(l.max_connections);
                p.max_connections.to_string()
            }),
            "MaxBurstLength" => num_in(value, 512, MAX_LEN_24).map_or_else(reject, |v: u32| {
                p.max_burst_length = v.min(l.max_burst_length);
                p.max_burst_length.to_string()
            }),
            "FirstBurstLength" => num_in(value, 512, MAX_LEN_24).map_or_else(reject, |v: u32| {
                p.first_burst_length = v.min(l.first_burst_length);
                p.first_burst_length.to_string()
            }),
            "DefaultTime2Wait" => num_in(value, 0, 3600).map_or_else(reject, |v: u16| {
                p.default_time2wait = v.max(l.default_time2wait);
                p.default_time2wait.to_string()
            }),
            "DefaultTime2Retain" => num_in(value, 0, 3600).map_or_else(reject, |v: u16| {
                p.default_time2retain = v.min(l.default_time2retain);
                p.default_time2retain.to_string()
            }),
            "MaxOutstandingR2T" => num_in(value, 1, 65_535).map_or_else(reject, |v: u16| {
                p.max_outstanding_r2t = v.min(l.max_outstanding_r2t);
                p.max_outstanding_r2t.to_string()
            }),
            "ErrorRecoveryLevel" => num_in(value, 0, 2).map_or_else(reject, |v: u8| {
                p.error_recovery_level = v.min(l.error_recovery_level);
                p.error_recovery_level.to_string()
            }),
            _ => return None,
        })
    }

    /// The final parameters. FirstBurstLength never exceeds MaxBurstLength (RFC 7143 §13.14).
    pub fn finish(&self) -> SessionParams {
        let mut p = self.params.clone();
        p.first_burst_length = p.first_burst_length.min(p.max_burst_length);
        p
    }
}

/// The keys this target does not negotiate: obsolete ones, ones it only declares, and the
/// ones it does not know.
fn answer_other(key: &str, value: &str) -> String {
    match key {
        // RFC 7143 "Obsoleted Keys": markers are obsolete; answer No (never NotUnderstood) to the
        // switches and Reject to the intervals.
        "IFMarker" | "OFMarker" => yes_no(false),
        "IFMarkInt" | "OFMarkInt" => REJECT.to_owned(),
        "TaskReporting" => {
            if value.split(',').any(|v| v == "RFC3720") {
                "RFC3720".to_owned()
            } else {
                REJECT.to_owned()
            }
        }
        // Keys only a target declares, or only valid in a full-feature Text Request.
        "SendTargets" | "TargetAddress" | "TargetPortalGroupTag" | "TargetAlias" => IRRELEVANT.to_owned(),
        // Unknown keys, X- and X# extensions, and the iSER keys (RDMAExtensions,
        // TargetRecvDataSegmentLength, InitiatorRecvDataSegmentLength,
        // MaxOutstandingUnexpectedPDUs): this target does not implement them.
        _ => NOT_UNDERSTOOD.to_owned(),
    }
}

fn reject() -> String {
    REJECT.to_owned()
}

fn digest_name(on: bool) -> String {
    (if on { "CRC32C" } else { "None" }).to_owned()
}

/// The first of the offered digests this target supports (the offer is in preference order).
fn pick_digest(value: &str, allow_crc: bool) -> Option<bool> {
    value.split(',').find_map(|v| match v {
        "None" => Some(false),
        "CRC32C" if allow_crc => Some(true),
        _ => None,
    })
}

fn num_in<T: TryFrom<u64>>(value: &str, min: u32, max: u32) -> Option<T> {
    parse_number(value).filter(|v| (u64::from(min)..=u64::from(max)).contains(v)).and_then(|v| T::try_from(v).ok())
}

/// One target in a `SendTargets` response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetEntry {
    /// The target's IQN.
    pub name: String,
    /// Its portals as `address:port,tpgt` (IPv6 addresses in brackets).
    pub addresses: Vec<String>,
}

/// The text of a Text Response to `SendTargets=<query>` in a discovery or normal session.
/// `All` lists `visible` (only valid in discovery sessions: elsewhere the answer is
/// `Reject`); a target name lists that target if visible; the empty value lists the session's
/// own target (`current`).
pub fn send_targets(query: &str, visible: &[TargetEntry], session_type: SessionType, current: Option<&str>) -> Vec<u8> {
    let chosen: Vec<&TargetEntry> = match query {
        "All" if session_type == SessionType::Discovery => visible.iter().collect(),
        "All" => return encode_text(&[("SendTargets", REJECT)]),
        "" => visible.iter().filter(|t| Some(t.name.as_str()) == current).collect(),
        name => visible.iter().filter(|t| t.name == name).collect(),
    };
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for t in chosen {
        pairs.push(("TargetName", t.name.as_str()));
        for a in &t.addresses {
            pairs.push(("TargetAddress", a.as_str()));
        }
    }
    encode_text(&pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip_and_errors() {
        let data = encode_text(&[("InitiatorName", "iqn.1994-05.com.redhat:x"), ("SessionType", "Normal")]);
        let pairs = parse_text(&data).unwrap();
        assert_eq!(pairs[0].1, "iqn.1994-05.com.redhat:x");
        assert_eq!(pairs.len(), 2);
        assert_eq!(parse_text(b"a=1\0a=2\0"), Err(IscsiError::DuplicateKey("a".into())));
        assert!(parse_text(b"novalue\0").is_err());
        assert!(parse_text(b"bad key=1\0").is_err());
        assert!(parse_text(b"k=\xff\0").is_err());
        let long = format!("k={}\0", "v".repeat(256));
        assert_eq!(parse_text(long.as_bytes()), Err(IscsiError::TextTooLong));
        assert_eq!(parse_text(b"a=1").unwrap(), vec![("a".to_owned(), "1".to_owned())]);
        assert_eq!(parse_text(b"a=\0").unwrap(), vec![("a".to_owned(), String::new())]);
    }

    #[test]
    fn binary_values() {
        assert_eq!(decode_binary("0x0aFF"), Some(vec![0x0a, 0xff]));
        assert_eq!(decode_binary("0xabc"), Some(vec![0x0a, 0xbc]));
        assert_eq!(decode_binary("0bAAEC"), Some(vec![0, 1, 2]));
        assert_eq!(decode_binary("0BAAE="), Some(vec![0, 1]));
        assert_eq!(decode_binary("0bAA=="), Some(vec![0]));
        assert_eq!(decode_binary("0bA"), None);
        assert_eq!(decode_binary("0x"), None);
        assert_eq!(decode_binary("12"), None);
        for len in 0..10u8 {
            let v: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37)).collect();
            if !v.is_empty() {
                assert_eq!(base64_decode(&base64_encode(&v)), Some(v.clone()));
            }
            assert_eq!(decode_binary(&encode_hex(&v)).unwrap_or_default(), v);
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number("262144"), Some(262_144));
        assert_eq!(parse_number("0x10"), Some(16));
        assert_eq!(parse_number("-1"), None);
        assert_eq!(parse_number(""), None);
    }

    #[test]
    fn result_functions() {
        let mut n = Negotiation::new(TargetLimits { max_burst_length: 1 << 20, ..Default::default() });
        assert_eq!(n.answer("MaxBurstLength", "16776192").as_deref(), Some("1048576"));
        assert_eq!(n.answer("FirstBurstLength", "262144").as_deref(), Some("262144"));
        assert_eq!(n.answer("InitialR2T", "No").as_deref(), Some("No"));
        assert_eq!(n.answer("ImmediateData", "No").as_deref(), Some("No"));
        assert_eq!(n.answer("DefaultTime2Wait", "0").as_deref(), Some("2"));
        assert_eq!(n.answer("DefaultTime2Retain", "0").as_deref(), Some("0"));
        assert_eq!(n.answer("MaxOutstandingR2T", "8").as_deref(), Some("1"));
        assert_eq!(n.answer("ErrorRecoveryLevel", "2").as_deref(), Some("0"));
        assert_eq!(n.answer("HeaderDigest", "CRC32C,None").as_deref(), Some("CRC32C"));
        assert_eq!(n.answer("DataDigest", "None,CRC32C").as_deref(), Some("None"));
        assert_eq!(n.answer("MaxRecvDataSegmentLength", "65536"), None);
        assert_eq!(n.answer("MaxBurstLength", "100").as_deref(), Some(REJECT));
        assert_eq!(n.answer("X-com.example.Foo", "1").as_deref(), Some(NOT_UNDERSTOOD));
        assert_eq!(n.answer("RDMAExtensions", "Yes").as_deref(), Some(NOT_UNDERSTOOD));
        assert_eq!(n.answer("OFMarker", "Yes").as_deref(), Some("No"));
        assert_eq!(n.answer("OFMarkInt", "2048").as_deref(), Some(REJECT));
        let p = n.finish();
        assert_eq!(p.max_xmit_data_segment_length, 65_536);
        assert!(p.header_digest && !p.data_digest && !p.immediate_data && !p.initial_r2t);
        assert_eq!(p.digests(), crate::Digests { header: true, data: false });
    }

    #[test]
    fn discovery_makes_session_keys_irrelevant() {
        let mut n = Negotiation::new(TargetLimits::default());
        n.params_mut().session_type = SessionType::Discovery;
        assert_eq!(n.answer("MaxBurstLength", "262144").as_deref(), Some(IRRELEVANT));
        assert_eq!(n.answer("HeaderDigest", "None").as_deref(), Some("None"));
    }

    #[test]
    fn arbitrary_offers_never_panic() {
        let values = [
            "",
            "0",
            "1",
            "512",
            "0x200",
            "16777216",
            "99999999999999999999",
            "Yes",
            "No",
            "None",
            "CRC32C",
            ",",
            "0b",
        ];
        let keys = [
            "HeaderDigest",
            "DataDigest",
            "MaxConnections",
            "InitialR2T",
            "ImmediateData",
            "MaxRecvDataSegmentLength",
            "MaxBurstLength",
            "FirstBurstLength",
            "DefaultTime2Wait",
            "DefaultTime2Retain",
            "MaxOutstandingR2T",
            "DataPDUInOrder",
            "DataSequenceInOrder",
            "ErrorRecoveryLevel",
            "TaskReporting",
            "SendTargets",
        ];
        for k in keys {
            for v in values {
                let mut n = Negotiation::new(TargetLimits::default());
                let answer = n.answer(k, v);
                assert_ne!(answer.as_deref(), Some(NOT_UNDERSTOOD), "{k}");
                let p = n.finish();
                assert!(p.first_burst_length <= p.max_burst_length);
                assert!(p.max_connections >= 1 && p.max_outstanding_r2t >= 1);
            }
        }
    }

    #[test]
    fn default_limits_are_valid() {
        assert_eq!(TargetLimits::default().validate(), Ok(()));
        assert!(TargetLimits { max_burst_length: 4096, ..Default::default() }.validate().is_err());
    }

    #[test]
    fn send_targets_lists() {
        let v = [
            TargetEntry { name: "iqn.a".into(), addresses: vec!["127.0.0.1:3260,1".into()] },
            TargetEntry { name: "iqn.b".into(), addresses: vec![] },
        ];
        let all = parse_text(&send_targets("All", &v, SessionType::Discovery, None));
        // TargetName repeats across targets, so parse_text (which refuses duplicates) fails;
        // check the raw text instead.
        assert!(all.is_err());
        let raw = send_targets("All", &v, SessionType::Discovery, None);
        assert_eq!(raw, b"TargetName=iqn.a\0TargetAddress=127.0.0.1:3260,1\0TargetName=iqn.b\0".to_vec());
        assert_eq!(send_targets("iqn.b", &v, SessionType::Discovery, None), b"TargetName=iqn.b\0".to_vec());
        assert_eq!(send_targets("", &v, SessionType::Normal, Some("iqn.a")), raw[..48].to_vec());
        assert_eq!(send_targets("All", &v, SessionType::Normal, None), b"SendTargets=Reject\0".to_vec());
    }
}
