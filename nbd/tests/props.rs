//! Property tests: request header round trips, and no panics on arbitrary input to the
//! handshake, the request decoder, the request checker and the reply encoders.

mod common;

use bytes::BytesMut;
use common::*;
use nbd::consts::*;
use nbd::request::decode;
use nbd::{reply, Command, CommandFlags, Handshake, HandshakeConfig, NbdError, Request, Session, Step};
use proptest::prelude::*;

fn request(cookie: u64, kind: u16, flags: u16, offset: u64, length: u64) -> Request {
    Request {
        cookie,
        command: Command::from_wire(kind),
        flags: CommandFlags::from_bits(flags),
        offset,
        length,
        payload_len: 0,
        too_large: false,
    }
}

/// Feeds `bytes` in the given chunk sizes, answering replies, until the machine stops; panics
/// only if the handshake itself panics. Returns the number of final option replies seen.
fn feed_all(bytes: &[u8], chunks: &[usize]) -> usize {
    let mut hs = Handshake::new(HandshakeConfig::default()).unwrap();
    let mut buf = BytesMut::new();
    let mut rest = bytes;
    let mut chunks = chunks.iter();
    let mut finals = 0;
    loop {
        let take = chunks.next().copied().unwrap_or(rest.len()).min(rest.len());
        buf.extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        loop {
            match hs.feed(&mut buf, &TestExports) {
                Ok(Step::NeedMore) => break,
                Ok(Step::Reply(r)) => finals += parse_replies(&r).iter().filter(|r| r.is_final()).count(),
                Ok(Step::Done { .. } | Step::Close { .. }) | Err(_) => return finals,
            }
        }
        if rest.is_empty() {
            return finals;
        }
    }
}

/// A well-formed option that never ends negotiation, with arbitrary (possibly invalid) data.
fn non_terminal_option() -> impl Strategy<Value = Vec<u8>> {
    let option = prop_oneof![
        Just(NBD_OPT_LIST),
        Just(NBD_OPT_PEEK_EXPORT),
        Just(NBD_OPT_STARTTLS),
        Just(NBD_OPT_INFO),
        Just(NBD_OPT_STRUCTURED_REPLY),
        Just(NBD_OPT_LIST_META_CONTEXT),
        Just(NBD_OPT_SET_META_CONTEXT),
        Just(NBD_OPT_EXTENDED_HEADERS),
        12u32..,
    ];
    let data = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec(any::<u8>(), 4090..4200),
        Just(go_data("vol-a", &[NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE])),
        Just(meta_data("vol-a", &["base:allocation"])),
        Just(meta_data("vol-a", &[])),
    ];
    (option, data).prop_map(|(o, d)| opt(o, &d))
}

proptest! {
    #[test]
    fn compact_requests_round_trip(
        cookie in any::<u64>(),
        kind in any::<u16>(),
        flags in any::<u16>(),
        offset in any::<u64>(),
        length in any::<u32>(),
        max in any::<u32>(),
    ) {
        let sent = request(cookie, kind, flags, offset, u64::from(length));
        let bytes = sent.encode(false).unwrap();
        prop_assert_eq!(bytes.len(), COMPACT_REQUEST_LEN);
        let (got, n) = decode(&bytes, false, u64::from(max)).unwrap().unwrap();
        prop_assert_eq!(n, COMPACT_REQUEST_LEN);
        let is_write = got.command == Command::Write;
        let expected = Request {
            payload_len: if is_write { u64::from(length) } else { 0 },
            too_large: is_write && length > max,
            ..sent
        };
        prop_assert_eq!(got, expected);
        prop_assert_eq!(got.command.to_wire(), kind);
        prop_assert_eq!(got.encode(false).unwrap(), bytes);
    }

    #[test]
    fn extended_requests_round_trip(
        cookie in any::<u64>(),
        kind in any::<u16>(),
        flags in any::<u16>(),
        offset in any::<u64>(),
        length in any::<u64>(),
        max in any::<u32>(),
    ) {
        let sent = request(cookie, kind, flags, offset, length);
        let bytes = sent.encode(true).unwrap();
        prop_assert_eq!(bytes.len(), EXTENDED_REQUEST_LEN);
        let max = u64::from(max);
        let has_payload = flags & NBD_CMD_FLAG_PAYLOAD_LEN != 0 || Command::from_wire(kind) == Command::Write;
        match decode(&bytes, true, max) {
            Ok(Some((got, n))) => {
                prop_assert_eq!(n, EXTENDED_REQUEST_LEN);
                prop_assert!(!has_payload || length <= max);
                let expected = Request { payload_len: if has_payload { length } else { 0 }, ..sent };
                prop_assert_eq!(got, expected);
                prop_assert_eq!(got.encode(true).unwrap(), bytes);
            }
            Err(NbdError::PayloadTooLarge { len, max: m }) => {
                prop_assert!(has_payload && len == length && length > max && m == max);
            }
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }

    #[test]
    fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64), extended in any::<bool>(), max in any::<u64>()) {
        if let Ok(Some((req, n))) = decode(&bytes, extended, max) {
            prop_assert!(n <= bytes.len());
            prop_assert_eq!(n, if extended { EXTENDED_REQUEST_LEN } else { COMPACT_REQUEST_LEN });
            prop_assert!(req.payload_len == 0 || req.payload_len == req.length);
        }
    }

    #[test]
    fn decode_with_a_valid_magic_never_panics(tail in prop::collection::vec(any::<u8>(), 0..40), extended in any::<bool>()) {
        let magic = if extended { NBD_EXTENDED_REQUEST_MAGIC } else { NBD_REQUEST_MAGIC };
        let mut bytes = magic.to_be_bytes().to_vec();
        bytes.extend_from_slice(&tail);
        let header = if extended { EXTENDED_REQUEST_LEN } else { COMPACT_REQUEST_LEN };
        match decode(&bytes, extended, 1 << 25) {
            Ok(None) => prop_assert!(bytes.len() < header),
            Ok(Some((_, n))) => prop_assert_eq!(n, header),
            Err(_) => prop_assert!(extended && bytes.len() >= header),
        }
    }

    #[test]
    fn handshake_never_panics_on_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..300),
        chunks in prop::collection::vec(1usize..40, 0..20),
    ) {
        feed_all(&bytes, &chunks);
    }

    #[test]
    fn handshake_never_panics_on_arbitrary_options(
        option in any::<u32>(),
        data in prop::collection::vec(any::<u8>(), 0..200),
        len_override in proptest::option::of(any::<u32>()),
        no_zeroes in any::<bool>(),
    ) {
        let mut bytes = client_flags(no_zeroes);
        bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
        bytes.extend_from_slice(&option.to_be_bytes());
        let len = len_override.unwrap_or_else(|| u32::try_from(data.len()).unwrap());
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(&data);
        feed_all(&bytes, &[]);
        feed_all(&bytes, &[1; 8]);
    }

    #[test]
    fn every_non_terminal_option_gets_exactly_one_final_reply(
        options in prop::collection::vec(non_terminal_option(), 0..8),
        chunks in prop::collection::vec(1usize..700, 0..40),
    ) {
        let mut bytes = client_flags(true);
        for o in &options {
            bytes.extend_from_slice(o);
        }
        prop_assert_eq!(feed_all(&bytes, &chunks), options.len());
    }

    #[test]
    fn check_never_panics(
        kind in any::<u16>(),
        flags in any::<u16>(),
        offset in any::<u64>(),
        length in any::<u64>(),
        too_large in any::<bool>(),
        size in any::<u64>(),
        tflags in any::<u16>(),
        min_block in any::<u32>(),
        max_block in any::<u32>(),
        structured in any::<bool>(),
        extended in any::<bool>(),
        meta in proptest::option::of(any::<u32>()),
    ) {
        let req = Request { too_large, ..request(1, kind, flags, offset, length) };
        let session = Session {
            export: String::new(),
            structured,
            extended,
            meta_context: meta,
            size,
            read_only: tflags & NBD_FLAG_READ_ONLY != 0,
            flags: tflags,
            min_block,
            max_block,
        };
        if let Err(errno) = req.check(&session) {
            prop_assert!([NBD_EPERM, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW].contains(&errno));
        }
    }

    #[test]
    fn reply_encoders_never_panic(
        extents in prop::collection::vec((any::<u64>(), any::<u32>()), 0..50),
        message in ".{0,50}",
        errno in any::<u32>(),
        data in prop::collection::vec(any::<u8>(), 0..64),
        offset in any::<u64>(),
        hole in any::<u32>(),
        done in any::<bool>(),
        req_flags in any::<u16>(),
        req_length in any::<u64>(),
    ) {
        let nonzero = extents.iter().filter(|(l, _)| *l > 0).count();
        match reply::block_status(1, 1, &extents, done) {
            Ok(b) => {
                let len = u32::from_be_bytes(b[16..20].try_into().unwrap());
                prop_assert_eq!(usize::try_from(len).unwrap() + STRUCTURED_REPLY_LEN, b.len());
                prop_assert!(nonzero > 0);
            }
            Err(e) => prop_assert!(nonzero == 0 && e == NbdError::EmptyChunk),
        }
        match reply::extended_block_status(1, offset, 1, &extents, done) {
            Ok(b) => {
                let len = u64::from_be_bytes(b[24..32].try_into().unwrap());
                prop_assert_eq!(usize::try_from(len).unwrap() + EXTENDED_REPLY_LEN, b.len());
                prop_assert_eq!(usize::try_from(len).unwrap(), 8 + 16 * nonzero);
            }
            Err(e) => prop_assert!(nonzero == 0 && e == NbdError::EmptyChunk),
        }
        let e = reply::structured_error(1, errno, &message, done);
        prop_assert_eq!(e.len(), STRUCTURED_REPLY_LEN + 6 + message.len());
        let _ = reply::extended_offset_error(1, offset, errno, &message, offset, done);
        let _ = reply::structured_read_data(1, offset, &data, done);
        let _ = reply::extended_hole(1, offset, offset, hole, done);
        let _ = reply::simple(1, errno, &data);

        for (structured, extended) in [(false, false), (true, false), (true, true)] {
            let session = Session {
                export: String::new(),
                structured,
                extended,
                meta_context: Some(1),
                size: u64::MAX,
                read_only: false,
                flags: NBD_FLAG_HAS_FLAGS,
                min_block: 1,
                max_block: 1 << 25,
            };
            let req = Request {
                command: Command::BlockStatus,
                ..request(9, NBD_CMD_BLOCK_STATUS, req_flags, offset, req_length)
            };
            let w = session.reply_writer();
            let _ = w.ok(&req);
            let _ = w.error(&req, errno, &message);
            let _ = w.read(&req, &data);
            let _ = w.read_header(&req, req_length);
            if let Some(c) = w.chunked() {
                let _ = c.block_status(&req, 1, &extents, done);
                let _ = c.hole(&req, offset, hole, done);
                let _ = c.offset_error(&req, errno, &message, offset, done);
            }
        }
    }
}
