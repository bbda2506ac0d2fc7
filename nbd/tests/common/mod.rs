//! Client-side helpers for driving the server state machine in memory: option encoders, an
//! option-reply parser, a fixed export table and a driver that feeds a byte script in chosen
//! chunk sizes and records everything the server sent.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use bytes::BytesMut;
use nbd::consts::*;
use nbd::{ExportInfo, Exports, Handshake, HandshakeConfig, NbdError, Session, Step};

pub(crate) const SIZE_A: u64 = 64 << 20;

/// Two exports: `vol-a` (writable, the default export) and `vol-a@1` (a read-only snapshot).
#[derive(Debug)]
pub(crate) struct TestExports;

impl Exports for TestExports {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        match name {
            "" | "vol-a" => Some(ExportInfo {
                name: "vol-a".into(),
                description: "clone of prod".into(),
                size: SIZE_A,
                read_only: false,
                can_multi_conn: true,
            }),
            "vol-a@1" => Some(ExportInfo {
                name: "vol-a@1".into(),
                description: String::new(),
                size: 4096,
                read_only: true,
                can_multi_conn: false,
            }),
            _ => None,
        }
    }

    fn list(&self) -> Vec<(String, String)> {
        vec![("vol-a".into(), "clone of prod".into()), ("vol-a@1".into(), String::new())]
    }
}

pub(crate) fn be_u32(v: usize) -> [u8; 4] {
    u32::try_from(v).unwrap().to_be_bytes()
}

pub(crate) fn client_flags(no_zeroes: bool) -> Vec<u8> {
    let mut flags = NBD_FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        flags |= NBD_FLAG_C_NO_ZEROES;
    }
    flags.to_be_bytes().to_vec()
}

pub(crate) fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = IHAVEOPT.to_be_bytes().to_vec();
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&be_u32(data.len()));
    out.extend_from_slice(data);
    out
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data.
pub(crate) fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut out = be_u32(name.len()).to_vec();
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&u16::try_from(infos.len()).unwrap().to_be_bytes());
    for info in infos {
        out.extend_from_slice(&info.to_be_bytes());
    }
    out
}

/// `NBD_OPT_{LIST,SET}_META_CONTEXT` data.
pub(crate) fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = be_u32(name.len()).to_vec();
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&be_u32(queries.len()));
    for q in queries {
        out.extend_from_slice(&be_u32(q.len()));
        out.extend_from_slice(q.as_bytes());
    }
    out
}

/// One option reply as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OptReply {
    pub(crate) option: u32,
    pub(crate) kind: u32,
    pub(crate) data: Vec<u8>,
}

impl OptReply {
    pub(crate) fn is_final(&self) -> bool {
        self.kind == NBD_REP_ACK || self.kind & NBD_REP_FLAG_ERROR != 0
    }
}

/// Splits server bytes into option replies; panics on anything else.
pub(crate) fn parse_replies(mut bytes: &[u8]) -> Vec<OptReply> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        assert!(bytes.len() >= OPTION_REPLY_HEADER_LEN, "truncated reply header");
        assert_eq!(u64::from_be_bytes(bytes[..8].try_into().unwrap()), NBD_REP_MAGIC);
        let option = u32::from_be_bytes(bytes[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(bytes[12..16].try_into().unwrap());
        let len = usize::try_from(u32::from_be_bytes(bytes[16..20].try_into().unwrap())).unwrap();
        let data = bytes[20..20 + len].to_vec();
        bytes = &bytes[20 + len..];
        out.push(OptReply { option, kind, data });
    }
    out
}

/// How a driven handshake ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// The script ran out while the server waited for more.
    NeedMore,
    Done(Session),
    Close,
    Err(NbdError),
}

/// Everything the server did with one script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// All bytes the server sent after the greeting, in order.
    pub(crate) sent: Vec<u8>,
    pub(crate) end: End,
    /// Bytes left in the buffer when the handshake ended (transmission bytes after `Done`).
    pub(crate) leftover: Vec<u8>,
}

/// Feeds `script` to a fresh handshake in chunks of the given sizes (the last chunk takes the
/// rest), answering every `Reply` by calling `feed` again.
pub(crate) fn drive_with(cfg: HandshakeConfig, script: &[u8], chunks: &[usize]) -> Outcome {
    let mut hs = Handshake::new(cfg).unwrap();
    let mut buf = BytesMut::new();
    let mut sent = Vec::new();
    let mut rest = script;
    let mut chunks = chunks.iter();
    loop {
        let take = chunks.next().copied().unwrap_or(rest.len()).min(rest.len());
        buf.extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        loop {
            match hs.feed(&mut buf, &TestExports) {
                Ok(Step::NeedMore) => break,
                Ok(Step::Reply(bytes)) => sent.extend_from_slice(&bytes),
                Ok(Step::Done { reply, session }) => {
                    sent.extend_from_slice(&reply);
                    return finish(sent, End::Done(session), buf, rest);
                }
                Ok(Step::Close { reply }) => {
                    sent.extend_from_slice(&reply);
                    return finish(sent, End::Close, buf, rest);
                }
                Err(e) => return finish(sent, End::Err(e), buf, rest),
            }
        }
        if rest.is_empty() {
            return finish(sent, End::NeedMore, buf, rest);
        }
    }
}

fn finish(sent: Vec<u8>, end: End, buf: BytesMut, rest: &[u8]) -> Outcome {
    let mut leftover = buf.to_vec();
    leftover.extend_from_slice(rest);
    Outcome { sent, end, leftover }
}

pub(crate) fn drive(script: &[u8]) -> Outcome {
    drive_with(HandshakeConfig::default(), script, &[])
}

/// Concatenates byte pieces into one script.
pub(crate) fn script(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}
