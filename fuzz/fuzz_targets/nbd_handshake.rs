//! The NBD handshake fed arbitrary client bytes, whole and in arbitrary pieces: both must send
//! the same bytes and end the same way (a unit is consumed only once complete). When the
//! handshake finishes, the bytes after it go to the transmission phase's request decoder, and
//! every decoded header must encode back to the bytes it came from.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nbd::{ExportInfo, Exports, Handshake, HandshakeConfig, Session, Step};

/// A writable default export and a read-only snapshot, as in the crate's tests.
struct TwoExports;

impl Exports for TwoExports {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        match name {
            "" | "vol-a" => Some(ExportInfo {
                name: "vol-a".into(),
                description: "clone of prod".into(),
                size: 64 << 20,
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

    fn refusal(&self, name: &str) -> Option<String> {
        (name == "secret").then(|| "not for you".to_string())
    }

    fn list(&self) -> Vec<(String, String)> {
        vec![("vol-a".into(), "clone of prod".into()), ("vol-a@1".into(), String::new())]
    }
}

/// What the server sent and how the handshake ended.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    sent: Vec<u8>,
    end: End,
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    NeedMore,
    Done(Session),
    Close,
    Error,
}

/// Runs the handshake over `pieces`; with `transmit`, decodes what follows a finished one.
fn run(pieces: &[&[u8]], transmit: bool) -> Outcome {
    let mut hs = Handshake::new(HandshakeConfig::default()).expect("default config");
    let mut sent = hs.greeting();
    let mut buf = BytesMut::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match hs.feed(&mut buf, &TwoExports) {
                Ok(Step::NeedMore) => break,
                Ok(Step::Reply(r)) => sent.extend_from_slice(&r),
                Ok(Step::Done { reply, session }) => {
                    sent.extend_from_slice(&reply);
                    if transmit {
                        transmission(&session, &buf);
                    }
                    return Outcome { sent, end: End::Done(session) };
                }
                Ok(Step::Close { reply }) => {
                    sent.extend_from_slice(&reply);
                    return Outcome { sent, end: End::Close };
                }
                Err(_) => {
                    assert!(hs.is_finished(), "an error ends the handshake");
                    return Outcome { sent, end: End::Error };
                }
            }
        }
    }
    Outcome { sent, end: End::NeedMore }
}

/// The transmission phase: headers, each checked against the session, payloads skipped.
fn transmission(session: &Session, mut rest: &[u8]) {
    while let Ok(Some((req, n))) = session.decode_request(rest) {
        let _ = req.check(session);
        let encoded = req.encode(session.extended).expect("a decoded header encodes");
        assert_eq!(encoded, rest[..n], "decode then encode gives the header back");
        rest = &rest[n..];
        let skip = usize::try_from(req.payload_len).unwrap_or(usize::MAX).min(rest.len());
        rest = &rest[skip..];
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, script)) = data.split_first() else { return };
    let whole = run(&[script], true);
    let split = run(&forkd_fuzz::pieces(seed, script), false);
    assert_eq!(whole, split, "the same bytes in pieces end differently");
});
