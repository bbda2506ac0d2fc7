//! Handshake state-machine tests driven in memory with client byte scripts, no sockets.

mod common;

use bytes::BytesMut;
use common::*;
use nbd::consts::*;
use nbd::request::decode;
use nbd::{Command, CommandFlags, Handshake, HandshakeConfig, NbdError, Request, Step};

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().unwrap())
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn done(outcome: &Outcome) -> &nbd::Session {
    match &outcome.end {
        End::Done(session) => session,
        other => panic!("expected Done, got {other:?}"),
    }
}

fn kinds(replies: &[OptReply]) -> Vec<u32> {
    replies.iter().map(|r| r.kind).collect()
}

// (a)
#[test]
fn go_with_block_size_request() {
    let s = script(&[
        &client_flags(true),
        &opt(NBD_OPT_GO, &go_data("vol-a", &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME, NBD_INFO_DESCRIPTION])),
    ]);
    let out = drive(&s);
    let session = done(&out).clone();
    let replies = parse_replies(&out.sent);
    assert_eq!(kinds(&replies), vec![NBD_REP_INFO, NBD_REP_INFO, NBD_REP_INFO, NBD_REP_INFO, NBD_REP_ACK]);
    assert!(replies.iter().all(|r| r.option == NBD_OPT_GO));

    let export = &replies[0].data;
    assert_eq!((export.len(), be16(export, 0)), (12, NBD_INFO_EXPORT));
    assert_eq!(be64(export, 2), SIZE_A);
    assert_eq!(be16(export, 10), session.flags);

    assert_eq!(be16(&replies[1].data, 0), NBD_INFO_NAME);
    assert_eq!(&replies[1].data[2..], b"vol-a");
    assert_eq!(be16(&replies[2].data, 0), NBD_INFO_DESCRIPTION);
    assert_eq!(&replies[2].data[2..], b"clone of prod");

    let bs = &replies[3].data;
    assert_eq!((bs.len(), be16(bs, 0)), (14, NBD_INFO_BLOCK_SIZE));
    assert_eq!((be32(bs, 2), be32(bs, 6), be32(bs, 10)), (1, 4096, 32 << 20));

    assert_eq!(session.export, "vol-a");
    assert_eq!(session.size, SIZE_A);
    assert!(!session.structured && !session.extended && !session.read_only);
    assert_eq!(session.meta_context, None);
    assert_eq!(session.max_block, 32 << 20);
    let expected = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES
        | NBD_FLAG_SEND_CACHE
        | NBD_FLAG_SEND_FAST_ZERO
        | NBD_FLAG_CAN_MULTI_CONN;
    assert_eq!(session.flags, expected);
    assert!(out.leftover.is_empty());
}

#[test]
fn go_without_requests_still_sends_export_and_block_size() {
    let out = drive(&script(&[&client_flags(false), &opt(NBD_OPT_GO, &go_data("", &[]))]));
    let session = done(&out);
    assert_eq!(session.export, "vol-a", "the empty name is the default export");
    let replies = parse_replies(&out.sent);
    let infos: Vec<u16> = replies.iter().filter(|r| r.kind == NBD_REP_INFO).map(|r| be16(&r.data, 0)).collect();
    assert_eq!(infos, vec![NBD_INFO_EXPORT, NBD_INFO_BLOCK_SIZE]);
}

#[test]
fn read_only_snapshot_flags() {
    let out = drive(&script(&[&client_flags(true), &opt(NBD_OPT_GO, &go_data("vol-a@1", &[]))]));
    let session = done(&out);
    assert!(session.read_only);
    assert_ne!(session.flags & NBD_FLAG_READ_ONLY, 0);
    assert_eq!(session.flags & (NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO), 0);
    assert_eq!(session.flags & NBD_FLAG_CAN_MULTI_CONN, 0);
}

#[test]
fn info_then_unknown_go_then_go() {
    let s = script(&[
        &client_flags(true),
        &opt(NBD_OPT_INFO, &go_data("vol-a", &[])),
        &opt(NBD_OPT_GO, &go_data("nope", &[])),
        &opt(NBD_OPT_GO, &go_data("vol-a", &[])),
    ]);
    let out = drive(&s);
    done(&out);
    let replies = parse_replies(&out.sent);
    let finals: Vec<(u32, u32)> = replies.iter().filter(|r| r.is_final()).map(|r| (r.option, r.kind)).collect();
    assert_eq!(finals, vec![(NBD_OPT_INFO, NBD_REP_ACK), (NBD_OPT_GO, NBD_REP_ERR_UNKNOWN), (NBD_OPT_GO, NBD_REP_ACK)]);
    let unknown = replies.iter().find(|r| r.kind == NBD_REP_ERR_UNKNOWN).unwrap();
    assert!(String::from_utf8_lossy(&unknown.data).contains("nope"));
}

#[test]
fn go_with_inconsistent_lengths_is_invalid_and_stays_in_sync() {
    let mut bad_name = go_data("vol-a", &[]);
    bad_name[3] = 200; // name length past the option data
    let mut bad_count = go_data("vol-a", &[NBD_INFO_NAME]);
    bad_count.push(0); // a stray byte after the requests
    let short = [0u8, 0, 0]; // not even a name length
    let s = script(&[
        &client_flags(true),
        &opt(NBD_OPT_GO, &bad_name),
        &opt(NBD_OPT_GO, &bad_count),
        &opt(NBD_OPT_INFO, &short),
        &opt(NBD_OPT_GO, &go_data("vol-a\0", &[])),
        &opt(NBD_OPT_GO, &go_data("vol-a", &[])),
    ]);
    let out = drive(&s);
    done(&out);
    let kinds = kinds(&parse_replies(&out.sent));
    assert_eq!(&kinds[..4], &[NBD_REP_ERR_INVALID; 4]);
    assert_eq!(kinds.last(), Some(&NBD_REP_ACK));
}

// (b)
#[test]
fn list_exports() {
    let out = drive(&script(&[&client_flags(true), &opt(NBD_OPT_LIST, &[])]));
    assert_eq!(out.end, End::NeedMore);
    let replies = parse_replies(&out.sent);
    assert_eq!(kinds(&replies), vec![NBD_REP_SERVER, NBD_REP_SERVER, NBD_REP_ACK]);
    let first = &replies[0].data;
    assert_eq!(be32(first, 0), 5);
    assert_eq!(&first[4..9], b"vol-a");
    assert_eq!(&first[9..], b"clone of prod");
    assert_eq!(&replies[1].data[4..], b"vol-a@1");

    let with_data = drive(&script(&[&client_flags(true), &opt(NBD_OPT_LIST, b"x")]));
    assert_eq!(kinds(&parse_replies(&with_data.sent)), vec![NBD_REP_ERR_INVALID]);
}

// (c)
#[test]
fn unknown_option_then_go_stays_in_sync() {
    let s = script(&[
        &client_flags(true),
        &opt(99, b"0123456789"),
        &opt(NBD_OPT_PEEK_EXPORT, &[]),
        &opt(NBD_OPT_STARTTLS, &[]),
        &opt(NBD_OPT_GO, &go_data("vol-a", &[])),
    ]);
    let out = drive(&s);
    done(&out);
    let replies = parse_replies(&out.sent);
    assert_eq!((replies[0].option, replies[0].kind), (99, NBD_REP_ERR_UNSUP));
    assert_eq!((replies[1].option, replies[1].kind), (NBD_OPT_PEEK_EXPORT, NBD_REP_ERR_UNSUP));
    assert_eq!((replies[2].option, replies[2].kind), (NBD_OPT_STARTTLS, NBD_REP_ERR_UNSUP));
    assert_eq!(replies.last().unwrap().kind, NBD_REP_ACK);
}

// (d)
#[test]
fn structured_reply_meta_context_and_go() {
    let s = script(&[
        &client_flags(true),
        &opt(NBD_OPT_STRUCTURED_REPLY, &[]),
        &opt(NBD_OPT_SET_META_CONTEXT, &meta_data("vol-a", &["base:allocation", "qemu:dirty-bitmap:x"])),
        &opt(NBD_OPT_GO, &go_data("vol-a", &[])),
    ]);
    let out = drive(&s);
    let session = done(&out);
    assert!(session.structured && !session.extended);
    assert_eq!(session.meta_context, Some(BASE_ALLOCATION_ID));
    assert_ne!(session.flags & NBD_FLAG_SEND_DF, 0);
    let replies = parse_replies(&out.sent);
    assert_eq!((replies[0].option, replies[0].kind), (NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK));
    let meta = &replies[1];
    assert_eq!((meta.option, meta.kind), (NBD_OPT_SET_META_CONTEXT, NBD_REP_META_CONTEXT));
    assert_eq!(be32(&meta.data, 0), BASE_ALLOCATION_ID);
    assert_eq!(&meta.data[4..], b"base:allocation");
    assert_eq!((replies[2].option, replies[2].kind), (NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK));
}

#[test]
fn set_meta_context_needs_structured_replies() {
    let s = script(&[
        &client_flags(true),
        &opt(NBD_OPT_SET_META_CONTEXT, &meta_data("vol-a", &["base:allocation"])),
        &opt(NBD_OPT_GO, &go_data("vol-a", &[])),
    ]);
    let out = drive(&s);
    assert_eq!(done(&out).meta_context, None);
    assert_eq!(parse_replies(&out.sent)[0].kind, NBD_REP_ERR_INVALID);
}

#[test]
fn meta_context_selection_rules() {
    let structured = opt(NBD_OPT_STRUCTURED_REPLY, &[]);
    let set_a = opt(NBD_OPT_SET_META_CONTEXT, &meta_data("vol-a", &["base:allocation"]));
    // Selected for another export than the one entered.
    let other = drive(&script(&[&client_flags(true), &structured, &set_a, &opt(NBD_OPT_GO, &go_data("vol-a@1", &[]))]));
    assert_eq!(done(&other).meta_context, None);
    // The empty name is compared as sent, not as resolved.
    let default = drive(&script(&[&client_flags(true), &structured, &set_a, &opt(NBD_OPT_GO, &go_data("", &[]))]));
    assert_eq!(done(&default).meta_context, None);
    // A later SET replaces the selection, even with nothing in it.
    let reset = drive(&script(&[
        &client_flags(true),
        &structured,
        &set_a,
        &opt(NBD_OPT_SET_META_CONTEXT, &meta_data("vol-a", &[])),
        &opt(NBD_OPT_GO, &go_data("vol-a", &[])),
    ]));
    assert_eq!(done(&reset).meta_context, None);
    // "base:" selects nothing during SET.
    let wildcard = drive(&script(&[
        &client_flags(true),
        &structured,
        &opt(NBD_OPT_SET_META_CONTEXT, &meta_data("vol-a", &["base:"])),
    ]));
    assert_eq!(kinds(&parse_replies(&wildcard.sent)), vec![NBD_REP_ACK, NBD_REP_ACK]);
    // Unknown export, malformed query.
    let errors = drive(&script(&[
        &client_flags(true),
        &structured,
        &opt(NBD_OPT_SET_META_CONTEXT, &meta_data("nope", &["base:allocation"])),
        &opt(NBD_OPT_SET_META_CONTEXT, &meta_data("vol-a", &["allocation"])),
        &opt(NBD_OPT_LIST_META_CONTEXT, &meta_data("vol-a", &["base:allocation"])[..12]),
    ]));
    assert_eq!(
        kinds(&parse_replies(&errors.sent)),
        vec![NBD_REP_ACK, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_INVALID, NBD_REP_ERR_INVALID]
    );
}

#[test]
fn list_meta_context_queries() {
    let list = |queries: &[&str]| {
        let out = drive(&script(&[&client_flags(true), &opt(NBD_OPT_LIST_META_CONTEXT, &meta_data("vol-a", queries))]));
        parse_replies(&out.sent)
    };
    for queries in [&[][..], &["base:"][..], &["base:allocation"][..], &["x-a:b", "base:", "base:allocation"][..]] {
        let replies = list(queries);
        assert_eq!(kinds(&replies), vec![NBD_REP_META_CONTEXT, NBD_REP_ACK], "{queries:?}");
        assert_eq!(be32(&replies[0].data, 0), 0, "LIST uses the reserved id 0");
        assert_eq!(&replies[0].data[4..], b"base:allocation");
    }
    assert_eq!(kinds(&list(&["qemu:dirty-bitmap:x", "base:other"])), vec![NBD_REP_ACK]);
}

// (e)
#[test]
fn extended_headers_then_go() {
    let request = Request {
        cookie: 1,
        command: Command::Read,
        flags: CommandFlags::empty(),
        offset: 0,
        length: 4096,
        payload_len: 0,
        too_large: false,
    };
    let s = script(&[
        &client_flags(true),
        &opt(NBD_OPT_EXTENDED_HEADERS, &[]),
        &opt(NBD_OPT_STRUCTURED_REPLY, &[]),
        &opt(NBD_OPT_SET_META_CONTEXT, &meta_data("vol-a", &["base:allocation"])),
        &opt(NBD_OPT_GO, &go_data("vol-a", &[NBD_INFO_BLOCK_SIZE])),
        // A request pipelined right behind GO stays in the buffer for transmission.
        &request.encode(true).unwrap(),
    ]);
    let out = drive(&s);
    let session = done(&out).clone();
    assert!(session.extended && session.structured);
    assert_eq!(session.meta_context, Some(BASE_ALLOCATION_ID));
    assert_ne!(session.flags & NBD_FLAG_SEND_DF, 0);
    let replies = parse_replies(&out.sent);
    assert_eq!((replies[0].option, replies[0].kind), (NBD_OPT_EXTENDED_HEADERS, NBD_REP_ACK));
    assert_eq!(
        (replies[1].option, replies[1].kind),
        (NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_EXT_HEADER_REQD),
        "extended headers cannot be downgraded"
    );
    let (decoded, n) = session.decode_request(&out.leftover).unwrap().unwrap();
    assert_eq!(n, out.leftover.len());
    assert_eq!(decoded, request);
    assert_eq!(decode(&out.leftover, false, 1 << 25), Err(NbdError::RequestMagic(NBD_EXTENDED_REQUEST_MAGIC)));
}

#[test]
fn export_name_after_extended_headers_is_refused() {
    let s = script(&[&client_flags(true), &opt(NBD_OPT_EXTENDED_HEADERS, &[]), &opt(NBD_OPT_EXPORT_NAME, b"vol-a")]);
    assert_eq!(drive(&s).end, End::Err(NbdError::ExportNameWithExtendedHeaders));
}

#[test]
fn options_that_take_no_data_refuse_data() {
    let s = script(&[
        &client_flags(true),
        &opt(NBD_OPT_STRUCTURED_REPLY, b"x"),
        &opt(NBD_OPT_EXTENDED_HEADERS, b"x"),
        &opt(NBD_OPT_GO, &go_data("vol-a", &[])),
    ]);
    let out = drive(&s);
    let session = done(&out);
    assert!(!session.structured && !session.extended);
    assert_eq!(&kinds(&parse_replies(&out.sent))[..2], &[NBD_REP_ERR_INVALID, NBD_REP_ERR_INVALID]);
}

// (f)
#[test]
fn oversized_option_is_skipped_with_too_big() {
    let big = vec![7u8; 5000];
    let s = script(&[
        &client_flags(true),
        &opt(NBD_OPT_GO, &big),
        &opt(NBD_OPT_LIST, &big),
        &opt(NBD_OPT_GO, &go_data("vol-a", &[])),
    ]);
    for chunks in [&[][..], &[1; 20000][..], &[4, 16, 100, 4000, 900, 3][..]] {
        let out = drive_with(HandshakeConfig::default(), &s, chunks);
        done(&out);
        let replies = parse_replies(&out.sent);
        assert_eq!((replies[0].option, replies[0].kind), (NBD_OPT_GO, NBD_REP_ERR_TOO_BIG));
        assert_eq!((replies[1].option, replies[1].kind), (NBD_OPT_LIST, NBD_REP_ERR_TOO_BIG));
        assert_eq!(replies.last().unwrap().kind, NBD_REP_ACK);
    }
}

#[test]
fn unreasonably_large_options_abort() {
    let mut header = client_flags(true);
    header.extend_from_slice(&IHAVEOPT.to_be_bytes());
    header.extend_from_slice(&NBD_OPT_LIST.to_be_bytes());
    header.extend_from_slice(&(1u32 << 20).to_be_bytes());
    assert_eq!(drive(&header).end, End::Err(NbdError::OptionTooLarge { option: NBD_OPT_LIST, len: 1 << 20 }));

    // EXPORT_NAME cannot be answered with TOO_BIG, so a long one aborts at once.
    let long = drive(&script(&[&client_flags(true), &opt(NBD_OPT_EXPORT_NAME, &[b'a'; 5000])]));
    assert_eq!(long.end, End::Err(NbdError::OptionTooLarge { option: NBD_OPT_EXPORT_NAME, len: 5000 }));
}

#[test]
fn abort_with_oversized_data_is_still_acknowledged() {
    let out = drive(&script(&[&client_flags(true), &opt(NBD_OPT_ABORT, &[0; 5000])]));
    assert_eq!(out.end, End::Close);
    assert_eq!(kinds(&parse_replies(&out.sent)), vec![NBD_REP_ACK]);
}

// (g)
#[test]
fn export_name_old_style() {
    for no_zeroes in [true, false] {
        let out = drive(&script(&[&client_flags(no_zeroes), &opt(NBD_OPT_EXPORT_NAME, b"vol-a")]));
        let session = done(&out);
        let expected_len = if no_zeroes { 10 } else { 10 + 124 };
        assert_eq!(out.sent.len(), expected_len);
        assert_eq!(be64(&out.sent, 0), SIZE_A);
        assert_eq!(be16(&out.sent, 8), session.flags);
        assert!(out.sent[10..].iter().all(|&b| b == 0));
        assert_eq!(session.export, "vol-a");
    }
    // The default export.
    let default = drive(&script(&[&client_flags(true), &opt(NBD_OPT_EXPORT_NAME, b"")]));
    assert_eq!(done(&default).export, "vol-a");
}

#[test]
fn export_name_of_unknown_export_closes_silently() {
    for name in [&b"nope"[..], &[0xff, 0xfe][..], &b"vol\0a"[..]] {
        let out = drive(&script(&[&client_flags(true), &opt(NBD_OPT_EXPORT_NAME, name)]));
        assert_eq!(out.end, End::Close);
        assert!(out.sent.is_empty());
    }
}

#[test]
fn export_name_keeps_structured_and_meta_context() {
    let out = drive(&script(&[
        &client_flags(true),
        &opt(NBD_OPT_STRUCTURED_REPLY, &[]),
        &opt(NBD_OPT_SET_META_CONTEXT, &meta_data("vol-a", &["base:allocation"])),
        &opt(NBD_OPT_EXPORT_NAME, b"vol-a"),
    ]));
    let session = done(&out);
    assert!(session.structured);
    assert_eq!(session.meta_context, Some(BASE_ALLOCATION_ID));
}

// (h)
#[test]
fn abort_acks_and_closes() {
    let out = drive(&script(&[&client_flags(true), &opt(NBD_OPT_ABORT, &[]), &opt(NBD_OPT_LIST, &[])]));
    assert_eq!(out.end, End::Close);
    let replies = parse_replies(&out.sent);
    assert_eq!(replies, vec![OptReply { option: NBD_OPT_ABORT, kind: NBD_REP_ACK, data: vec![] }]);
}

#[test]
fn feeding_a_finished_handshake_is_an_error() {
    let mut hs = Handshake::new(HandshakeConfig::default()).unwrap();
    let mut buf = BytesMut::from(&script(&[&client_flags(true), &opt(NBD_OPT_ABORT, &[])])[..]);
    assert!(matches!(hs.feed(&mut buf, &TestExports), Ok(Step::Close { .. })));
    assert!(hs.is_finished());
    assert_eq!(hs.feed(&mut buf, &TestExports), Err(NbdError::HandshakeFinished));
}

// (i)
#[test]
fn garbage_is_an_error() {
    let mut bad_magic = client_flags(true);
    bad_magic.extend_from_slice(b"GARBAGE!\0\0\0\x07\0\0\0\0");
    assert_eq!(drive(&bad_magic).end, End::Err(NbdError::OptionMagic(u64::from_be_bytes(*b"GARBAGE!"))));

    // Client flags: fixed newstyle missing, or unknown bits.
    assert_eq!(drive(&[0, 0, 0, 0]).end, End::Err(NbdError::ClientFlags(0)));
    assert_eq!(drive(&[0, 0, 0, 2]).end, End::Err(NbdError::ClientFlags(2)));
    assert_eq!(drive(&[0x80, 0, 0, 1]).end, End::Err(NbdError::ClientFlags(0x8000_0001)));

    // An error finishes the machine.
    let mut hs = Handshake::new(HandshakeConfig::default()).unwrap();
    let mut buf = BytesMut::from(&[0u8, 0, 0, 0][..]);
    assert!(hs.feed(&mut buf, &TestExports).is_err());
    assert_eq!(hs.feed(&mut buf, &TestExports), Err(NbdError::HandshakeFinished));
}

#[test]
fn shutdown_errors_options_but_honours_abort() {
    let mut hs = Handshake::new(HandshakeConfig::default()).unwrap();
    hs.shutdown();
    let mut buf = BytesMut::from(
        &script(&[&client_flags(true), &opt(NBD_OPT_GO, &go_data("vol-a", &[])), &opt(NBD_OPT_ABORT, &[])])[..],
    );
    let Ok(Step::Reply(bytes)) = hs.feed(&mut buf, &TestExports) else { panic!("expected a reply") };
    assert_eq!(kinds(&parse_replies(&bytes)), vec![NBD_REP_ERR_SHUTDOWN]);
    assert!(matches!(hs.feed(&mut buf, &TestExports), Ok(Step::Close { .. })));
}

// (j)
#[test]
fn every_split_point_gives_the_same_result() {
    let scripts = [
        script(&[
            &client_flags(true),
            &opt(99, b"zz"),
            &opt(NBD_OPT_LIST, &[]),
            &opt(NBD_OPT_STRUCTURED_REPLY, &[]),
            &opt(NBD_OPT_LIST_META_CONTEXT, &meta_data("vol-a", &[])),
            &opt(NBD_OPT_SET_META_CONTEXT, &meta_data("vol-a", &["base:allocation"])),
            &opt(NBD_OPT_INFO, &go_data("vol-a", &[NBD_INFO_NAME])),
            &opt(NBD_OPT_GO, &go_data("vol-a", &[NBD_INFO_BLOCK_SIZE])),
            b"trailing transmission bytes",
        ]),
        script(&[&client_flags(false), &opt(NBD_OPT_GO, &[1; 4100]), &opt(NBD_OPT_EXPORT_NAME, b"vol-a")]),
        script(&[&client_flags(true), &opt(NBD_OPT_EXTENDED_HEADERS, &[]), &opt(NBD_OPT_ABORT, &[])]),
    ];
    for s in &scripts {
        let whole = drive(s);
        assert!(matches!(whole.end, End::Done(_) | End::Close), "{:?}", whole.end);
        let bytewise = drive_with(HandshakeConfig::default(), s, &vec![1; s.len()]);
        assert_eq!(bytewise, whole, "one byte at a time");
        for split in 0..=s.len() {
            let two = drive_with(HandshakeConfig::default(), s, &[split]);
            assert_eq!(two, whole, "split at {split}");
        }
    }
}

#[test]
fn smaller_option_limit_is_honoured() {
    let cfg = HandshakeConfig { max_option_len: 16, max_option_skip: 64, ..Default::default() };
    let s = script(&[
        &client_flags(true),
        &opt(NBD_OPT_GO, &go_data("vol-a-with-a-long-name", &[])),
        &opt(NBD_OPT_GO, &go_data("vol-a", &[])),
    ]);
    let out = drive_with(cfg, &s, &[]);
    done(&out);
    assert_eq!(parse_replies(&out.sent)[0].kind, NBD_REP_ERR_TOO_BIG);
    let abort = drive_with(cfg, &script(&[&client_flags(true), &opt(NBD_OPT_LIST, &[0; 65])]), &[]);
    assert_eq!(abort.end, End::Err(NbdError::OptionTooLarge { option: NBD_OPT_LIST, len: 65 }));
}
