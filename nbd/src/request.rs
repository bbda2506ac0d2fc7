//! Transmission-phase request headers ("Request message" and "Request types" in the spec):
//! decoding compact (28-byte, `NBD_REQUEST_MAGIC`) and extended (32-byte,
//! `NBD_EXTENDED_REQUEST_MAGIC`) headers, encoding them for clients and tests, and checking a
//! decoded request against the negotiated [`Session`].
//!
//! The decoder reads headers only. It never requires the write payload to be present: it
//! reports in [`Request::payload_len`] how many bytes follow the header, and the caller must
//! consume exactly that many before decoding the next header. That rule keeps the stream in
//! sync in every case, including errors.
//!
//! Oversized payloads (more than the maximum payload size, `max_payload`):
//! - compact header, `NBD_CMD_WRITE`: the length field tells exactly how many bytes follow
//!   (at most 4 GiB - 1), so the request is returned with `too_large` set. The caller must read
//!   and drop the `payload_len` bytes without buffering them, then reply `NBD_EINVAL` (which
//!   [`Request::check`] returns). The connection survives; a client that sends that much is
//!   paying the bandwidth itself, so the discard is no denial of service.
//! - extended header with `NBD_CMD_FLAG_PAYLOAD_LEN`: the spec says the server SHOULD
//!   disconnect, and a 64-bit length cannot be discarded in bounded time, so decoding fails
//!   with [`NbdError::PayloadTooLarge`].
//!
//! Any other decode error (wrong magic, an extended write without `NBD_CMD_FLAG_PAYLOAD_LEN`)
//! means the byte stream can no longer be trusted: the caller closes the connection.

use std::fmt;
use std::ops::BitOr;

use crate::consts::*;
use crate::handshake::Session;
use crate::wire::{put_u16, put_u32, put_u64, Cursor};
use crate::NbdError;

/// A request type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_DISC`: finish outstanding requests and close; no reply.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// Any other type (including the experimental `NBD_CMD_RESIZE`); answered `NBD_EINVAL`.
    /// Only holds values that are not one of the variants above.
    Unknown(u16),
}

impl Command {
    /// The command for a wire type.
    pub fn from_wire(kind: u16) -> Self {
        match kind {
            NBD_CMD_READ => Self::Read,
            NBD_CMD_WRITE => Self::Write,
            NBD_CMD_DISC => Self::Disc,
            NBD_CMD_FLUSH => Self::Flush,
            NBD_CMD_TRIM => Self::Trim,
            NBD_CMD_CACHE => Self::Cache,
            NBD_CMD_WRITE_ZEROES => Self::WriteZeroes,
            NBD_CMD_BLOCK_STATUS => Self::BlockStatus,
            other => Self::Unknown(other),
        }
    }

    /// The wire type of the command.
    pub fn to_wire(self) -> u16 {
        match self {
            Self::Read => NBD_CMD_READ,
            Self::Write => NBD_CMD_WRITE,
            Self::Disc => NBD_CMD_DISC,
            Self::Flush => NBD_CMD_FLUSH,
            Self::Trim => NBD_CMD_TRIM,
            Self::Cache => NBD_CMD_CACHE,
            Self::WriteZeroes => NBD_CMD_WRITE_ZEROES,
            Self::BlockStatus => NBD_CMD_BLOCK_STATUS,
            Self::Unknown(other) => other,
        }
    }
}

/// The 16-bit command flags of a request, unknown bits kept as sent.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CommandFlags(u16);

impl CommandFlags {
    /// `NBD_CMD_FLAG_FUA`.
    pub const FUA: Self = Self(NBD_CMD_FLAG_FUA);
    /// `NBD_CMD_FLAG_NO_HOLE`.
    pub const NO_HOLE: Self = Self(NBD_CMD_FLAG_NO_HOLE);
    /// `NBD_CMD_FLAG_DF`.
    pub const DF: Self = Self(NBD_CMD_FLAG_DF);
    /// `NBD_CMD_FLAG_REQ_ONE`.
    pub const REQ_ONE: Self = Self(NBD_CMD_FLAG_REQ_ONE);
    /// `NBD_CMD_FLAG_FAST_ZERO`.
    pub const FAST_ZERO: Self = Self(NBD_CMD_FLAG_FAST_ZERO);
    /// `NBD_CMD_FLAG_PAYLOAD_LEN`.
    pub const PAYLOAD_LEN: Self = Self(NBD_CMD_FLAG_PAYLOAD_LEN);

    /// No flags.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// The flags as sent, unknown bits included.
    pub const fn from_bits(bits: u16) -> Self {
        Self(bits)
    }

    /// The raw bits.
    pub const fn bits(self) -> u16 {
        self.0
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl BitOr for CommandFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl fmt::Debug for CommandFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(u16, &str); 6] = [
            (NBD_CMD_FLAG_FUA, "FUA"),
            (NBD_CMD_FLAG_NO_HOLE, "NO_HOLE"),
            (NBD_CMD_FLAG_DF, "DF"),
            (NBD_CMD_FLAG_REQ_ONE, "REQ_ONE"),
            (NBD_CMD_FLAG_FAST_ZERO, "FAST_ZERO"),
            (NBD_CMD_FLAG_PAYLOAD_LEN, "PAYLOAD_LEN"),
        ];
        let mut rest = self.0;
        let mut set = f.debug_set();
        for (bit, name) in NAMES {
            if rest & bit != 0 {
                set.entry(&format_args!("{name}"));
                rest &= !bit;
            }
        }
        if rest != 0 {
            set.entry(&format_args!("{rest:#06x}"));
        }
        set.finish()
    }
}

/// One decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Opaque client cookie, echoed in every reply.
    pub cookie: u64,
    /// The request type.
    pub command: Command,
    /// The command flags as sent.
    pub flags: CommandFlags,
    /// Byte offset into the export.
    pub offset: u64,
    /// The header's length field: the effect length (bytes of the export the command covers),
    /// which for a write is also the payload length.
    pub length: u64,
    /// Bytes that follow the header and that the caller must consume before the next header:
    /// write data, or data to discard when `too_large` is set or the command takes no payload.
    pub payload_len: u64,
    /// The payload exceeds the maximum payload size: discard `payload_len` bytes and fail the
    /// request with `NBD_EINVAL`.
    pub too_large: bool,
}

/// Decodes one request header from the front of `buf`.
///
/// `extended` is whether extended headers were negotiated, `max_payload` the maximum payload
/// size advertised. Returns `Ok(None)` until the whole header is present (a wrong magic is
/// reported as soon as its 4 bytes are), else the request and the header length to consume.
/// See the module documentation for oversized payloads and errors.
pub fn decode(buf: &[u8], extended: bool, max_payload: u64) -> Result<Option<(Request, usize)>, NbdError> {
    let mut c = Cursor::new(buf);
    let Some(magic) = c.u32() else { return Ok(None) };
    let (want, header_len) = if extended {
        (NBD_EXTENDED_REQUEST_MAGIC, EXTENDED_REQUEST_LEN)
    } else {
        (NBD_REQUEST_MAGIC, COMPACT_REQUEST_LEN)
    };
    if magic != want {
        return Err(NbdError::RequestMagic(magic));
    }
    let (Some(flags), Some(kind), Some(cookie), Some(offset)) = (c.u16(), c.u16(), c.u64(), c.u64()) else {
        return Ok(None);
    };
    let length = if extended { c.u64() } else { c.u32().map(u64::from) };
    let Some(length) = length else { return Ok(None) };

    let flags = CommandFlags::from_bits(flags);
    let command = Command::from_wire(kind);
    let (payload_len, too_large) = if extended {
        if flags.contains(CommandFlags::PAYLOAD_LEN) {
            if length > max_payload {
                return Err(NbdError::PayloadTooLarge { len: length, max: max_payload });
            }
            (length, false)
        } else if command == Command::Write {
            // A write's payload is its length, with or without the flag (qemu omits it). A
            // 64-bit length beyond the limit cannot be skipped in bounded time: disconnect.
            if length > max_payload {
                return Err(NbdError::PayloadTooLarge { len: length, max: max_payload });
            }
            (length, false)
        } else {
            (0, false)
        }
    } else if command == Command::Write {
        // The compact style carries a payload for writes only, whatever the flags say.
        (length, length > max_payload)
    } else {
        (0, false)
    };
    let request = Request { cookie, command, flags, offset, length, payload_len, too_large };
    Ok(Some((request, header_len)))
}

impl Request {
    /// Encodes the header as a client sends it (for clients, tests and benchmarks); the
    /// payload, if any, is not included. `payload_len` and `too_large` are ignored: they are
    /// the server's reading of the header. Fails if `length` does not fit a compact header.
    pub fn encode(&self, extended: bool) -> Result<Vec<u8>, NbdError> {
        let mut out = Vec::with_capacity(EXTENDED_REQUEST_LEN);
        if extended {
            put_u32(&mut out, NBD_EXTENDED_REQUEST_MAGIC);
        } else {
            put_u32(&mut out, NBD_REQUEST_MAGIC);
        }
        put_u16(&mut out, self.flags.bits());
        put_u16(&mut out, self.command.to_wire());
        put_u64(&mut out, self.cookie);
        put_u64(&mut out, self.offset);
        if extended {
            put_u64(&mut out, self.length);
        } else {
            let length = u32::try_from(self.length).map_err(|_| NbdError::ValueTooLarge("request length"))?;
            put_u32(&mut out, length);
        }
        Ok(out)
    }

    /// Checks the request against the session the way the spec's "Error values" section asks,
    /// and returns the errno to reply with if it must fail. `NBD_CMD_DISC` always passes (it
    /// gets no reply). The daemon still owns storage errors (`NBD_EIO`, `NBD_ENOSPC` when full).
    ///
    /// In order: unknown command or a flag not valid for the command (or not advertised) →
    /// `NBD_EINVAL`; oversized write payload → `NBD_EINVAL`; write, trim or write zeroes on a
    /// read-only export → `NBD_EPERM`; block status without a selected context → `NBD_EINVAL`;
    /// a range past the end → `NBD_ENOSPC` for writes and write zeroes, `NBD_EINVAL` otherwise;
    /// a range not aligned to the minimum block size → `NBD_EINVAL`; a read longer than the
    /// maximum payload → `NBD_EOVERFLOW` with chunked replies (the spec allows rejecting large
    /// reads with it), `NBD_EINVAL` with simple replies.
    pub fn check(&self, session: &Session) -> Result<(), u32> {
        let advertised = |flag: u16| session.flags & flag != 0;
        let mut allowed = NBD_CMD_FLAG_FUA;
        let writes = match self.command {
            Command::Disc => return Ok(()),
            Command::Unknown(_) => return Err(NBD_EINVAL),
            Command::Read => {
                if advertised(NBD_FLAG_SEND_DF) {
                    allowed |= NBD_CMD_FLAG_DF;
                }
                false
            }
            Command::Write => {
                if session.extended {
                    allowed |= NBD_CMD_FLAG_PAYLOAD_LEN;
                }
                true
            }
            Command::Flush | Command::Cache => false,
            Command::Trim => true,
            Command::WriteZeroes => {
                allowed |= NBD_CMD_FLAG_NO_HOLE;
                if advertised(NBD_FLAG_SEND_FAST_ZERO) {
                    allowed |= NBD_CMD_FLAG_FAST_ZERO;
                }
                true
            }
            Command::BlockStatus => {
                allowed |= NBD_CMD_FLAG_REQ_ONE;
                false
            }
        };
        if !advertised(NBD_FLAG_SEND_FUA) {
            allowed &= !NBD_CMD_FLAG_FUA;
        }
        if self.flags.bits() & !allowed != 0 || self.too_large {
            return Err(NBD_EINVAL);
        }
        if writes && (session.read_only || advertised(NBD_FLAG_READ_ONLY)) {
            return Err(NBD_EPERM);
        }
        let needed = match self.command {
            Command::Flush => NBD_FLAG_SEND_FLUSH,
            Command::Trim => NBD_FLAG_SEND_TRIM,
            Command::WriteZeroes => NBD_FLAG_SEND_WRITE_ZEROES,
            _ => 0,
        };
        if needed != 0 && !advertised(needed) {
            return Err(NBD_EINVAL);
        }
        match self.command {
            Command::Flush => return Ok(()),
            Command::BlockStatus if session.meta_context.is_none() => return Err(NBD_EINVAL),
            _ => {}
        }
        let in_bounds = self.offset.checked_add(self.length).is_some_and(|end| end <= session.size);
        if !in_bounds {
            return Err(match self.command {
                Command::Write | Command::WriteZeroes => NBD_ENOSPC,
                _ => NBD_EINVAL,
            });
        }
        // Block status lengths are only a hint, so they are not held to alignment.
        if self.command != Command::BlockStatus {
            let block = u64::from(session.min_block);
            let misaligned = |v: u64| v.checked_rem(block).is_some_and(|r| r != 0);
            if misaligned(self.offset) || misaligned(self.length) {
                return Err(NBD_EINVAL);
            }
        }
        if self.command == Command::Read && self.length > u64::from(session.max_block) {
            return Err(if session.structured { NBD_EOVERFLOW } else { NBD_EINVAL });
        }
        Ok(())
    }
}

impl Session {
    /// [`decode`] with this session's header style and maximum payload size.
    pub fn decode_request(&self, buf: &[u8]) -> Result<Option<(Request, usize)>, NbdError> {
        decode(buf, self.extended, u64::from(self.max_block))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 1 << 25;

    fn req(command: Command, flags: CommandFlags, offset: u64, length: u64) -> Request {
        Request { cookie: 0xfeed, command, flags, offset, length, payload_len: 0, too_large: false }
    }

    fn session(read_only: bool, structured: bool, extended: bool) -> Session {
        let info = crate::ExportInfo {
            name: "v".into(),
            description: String::new(),
            size: 1 << 20,
            read_only,
            can_multi_conn: false,
        };
        Session {
            export: "v".into(),
            structured: structured || extended,
            extended,
            meta_context: None,
            size: info.size,
            read_only,
            flags: info.transmission_flags(structured || extended),
            min_block: 1,
            max_block: 1 << 25,
        }
    }

    #[test]
    fn compact_read_decodes() {
        let bytes = req(Command::Read, CommandFlags::FUA, 4096, 512).encode(false).unwrap();
        assert_eq!(bytes.len(), COMPACT_REQUEST_LEN);
        let (r, n) = decode(&bytes, false, MAX).unwrap().unwrap();
        assert_eq!(n, COMPACT_REQUEST_LEN);
        assert_eq!(r.command, Command::Read);
        assert_eq!(r.cookie, 0xfeed);
        assert_eq!((r.offset, r.length, r.payload_len), (4096, 512, 0));
        assert!(r.flags.contains(CommandFlags::FUA));
    }

    #[test]
    fn compact_write_reports_its_payload_without_needing_it() {
        let mut bytes = req(Command::Write, CommandFlags::empty(), 0, 8).encode(false).unwrap();
        let (r, n) = decode(&bytes, false, MAX).unwrap().unwrap();
        assert_eq!((n, r.payload_len, r.too_large), (28, 8, false));
        bytes.extend_from_slice(&[1; 4]); // part of the payload: irrelevant to the header
        assert_eq!(decode(&bytes, false, MAX).unwrap().unwrap().1, 28);
    }

    #[test]
    fn partial_headers_need_more() {
        let bytes = req(Command::Trim, CommandFlags::empty(), 0, 8).encode(true).unwrap();
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut], true, MAX).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn wrong_magic_is_an_error_as_soon_as_it_is_seen() {
        assert_eq!(decode(&[0xde, 0xad, 0xbe, 0xef], false, MAX), Err(NbdError::RequestMagic(0xdead_beef)));
        // A compact header on an extended session is wrong too.
        let compact = req(Command::Read, CommandFlags::empty(), 0, 1).encode(false).unwrap();
        assert_eq!(decode(&compact, true, MAX), Err(NbdError::RequestMagic(NBD_REQUEST_MAGIC)));
        assert_eq!(decode(&[0x25, 0x60, 0x95], false, MAX), Ok(None));
    }

    #[test]
    fn oversized_compact_write_is_marked_for_discard() {
        let bytes = req(Command::Write, CommandFlags::empty(), 0, MAX + 1).encode(false).unwrap();
        let (r, _) = decode(&bytes, false, MAX).unwrap().unwrap();
        assert!(r.too_large);
        assert_eq!(r.payload_len, MAX + 1, "the caller must still consume the payload");
        assert_eq!(r.check(&session(false, false, false)), Err(NBD_EINVAL));
    }

    #[test]
    fn extended_payloads_follow_the_payload_len_flag() {
        let write = req(Command::Write, CommandFlags::PAYLOAD_LEN, 0, 4096).encode(true).unwrap();
        let (r, n) = decode(&write, true, MAX).unwrap().unwrap();
        assert_eq!((n, r.payload_len, r.too_large), (32, 4096, false));

        let big = req(Command::Write, CommandFlags::PAYLOAD_LEN, 0, MAX + 1).encode(true).unwrap();
        assert_eq!(decode(&big, true, MAX), Err(NbdError::PayloadTooLarge { len: MAX + 1, max: MAX }));

        // qemu sends extended writes without the flag: the length is the payload.
        let bare = req(Command::Write, CommandFlags::empty(), 0, 4096).encode(true).unwrap();
        let (r, _) = decode(&bare, true, MAX).unwrap().unwrap();
        assert_eq!((r.payload_len, r.too_large), (4096, false));
        let big = req(Command::Write, CommandFlags::empty(), 0, MAX + 1).encode(true).unwrap();
        assert_eq!(decode(&big, true, MAX), Err(NbdError::PayloadTooLarge { len: MAX + 1, max: MAX }));

        // A 64-bit effect length without a payload.
        let zero = req(Command::WriteZeroes, CommandFlags::empty(), 0, 1 << 40).encode(true).unwrap();
        let (r, _) = decode(&zero, true, MAX).unwrap().unwrap();
        assert_eq!((r.length, r.payload_len), (1 << 40, 0));

        // A payload on a command that takes none is consumed, then refused.
        let bs = req(Command::BlockStatus, CommandFlags::PAYLOAD_LEN, 0, 12).encode(true).unwrap();
        let (r, _) = decode(&bs, true, MAX).unwrap().unwrap();
        assert_eq!(r.payload_len, 12);
        let mut s = session(false, true, true);
        s.meta_context = Some(1);
        assert_eq!(r.check(&s), Err(NBD_EINVAL));
    }

    #[test]
    fn compact_encode_refuses_64_bit_lengths() {
        let r = req(Command::Trim, CommandFlags::empty(), 0, 1 << 32);
        assert_eq!(r.encode(false), Err(NbdError::ValueTooLarge("request length")));
    }

    #[test]
    fn command_numbers_round_trip() {
        for kind in 0..=20u16 {
            assert_eq!(Command::from_wire(kind).to_wire(), kind);
        }
        assert_eq!(Command::from_wire(NBD_CMD_RESIZE), Command::Unknown(8));
    }

    #[test]
    fn flags_debug_names_bits() {
        let f = CommandFlags::FUA | CommandFlags::from_bits(0x8000);
        assert_eq!(format!("{f:?}"), "{FUA, 0x8000}");
    }

    #[test]
    fn check_enforces_the_spec_errors() {
        let rw = session(false, false, false);
        let ro = session(true, false, false);
        let ok = |r: Request, s: &Session| r.check(s);
        let none = CommandFlags::empty();

        assert_eq!(ok(req(Command::Read, none, 0, 4096), &rw), Ok(()));
        assert_eq!(ok(req(Command::Unknown(42), none, 0, 0), &rw), Err(NBD_EINVAL));
        assert_eq!(ok(req(Command::Disc, CommandFlags::from_bits(0xffff), 9, 9), &rw), Ok(()));
        assert_eq!(ok(req(Command::Write, none, 0, 512), &ro), Err(NBD_EPERM));
        assert_eq!(ok(req(Command::Trim, none, 0, 512), &ro), Err(NBD_EPERM));
        assert_eq!(ok(req(Command::WriteZeroes, none, 0, 512), &ro), Err(NBD_EPERM));
        assert_eq!(ok(req(Command::Read, none, 0, 512), &ro), Ok(()));
        assert_eq!(ok(req(Command::Flush, none, 0, 0), &ro), Ok(()));
        // Ranges past the end.
        assert_eq!(ok(req(Command::Write, none, 1 << 20, 1), &rw), Err(NBD_ENOSPC));
        assert_eq!(ok(req(Command::Read, none, u64::MAX, 2), &rw), Err(NBD_EINVAL));
        assert_eq!(ok(req(Command::Trim, none, 1 << 20, 0), &rw), Ok(()));
        // Flags.
        assert_eq!(ok(req(Command::Read, CommandFlags::DF, 0, 1), &rw), Err(NBD_EINVAL), "DF needs SEND_DF");
        let chunked = session(false, true, false);
        assert_eq!(ok(req(Command::Read, CommandFlags::DF, 0, 1), &chunked), Ok(()));
        assert_eq!(ok(req(Command::Write, CommandFlags::NO_HOLE, 0, 1), &rw), Err(NBD_EINVAL));
        assert_eq!(ok(req(Command::WriteZeroes, CommandFlags::NO_HOLE | CommandFlags::FAST_ZERO, 0, 1), &rw), Ok(()));
        assert_eq!(ok(req(Command::Write, CommandFlags::PAYLOAD_LEN, 0, 1), &rw), Err(NBD_EINVAL));
        assert_eq!(ok(req(Command::Read, CommandFlags::from_bits(1 << 9), 0, 1), &rw), Err(NBD_EINVAL));
        // Block status needs a selected context.
        assert_eq!(ok(req(Command::BlockStatus, CommandFlags::REQ_ONE, 0, 1), &chunked), Err(NBD_EINVAL));
        let mut meta = chunked.clone();
        meta.meta_context = Some(BASE_ALLOCATION_ID);
        assert_eq!(ok(req(Command::BlockStatus, CommandFlags::REQ_ONE, 0, 1), &meta), Ok(()));
        // Alignment.
        let mut aligned = rw.clone();
        aligned.min_block = 512;
        assert_eq!(ok(req(Command::Read, none, 512, 1024), &aligned), Ok(()));
        assert_eq!(ok(req(Command::Read, none, 1, 512), &aligned), Err(NBD_EINVAL));
        assert_eq!(ok(req(Command::Write, none, 0, 100), &aligned), Err(NBD_EINVAL));
        // Reads beyond the maximum payload.
        let mut small = rw.clone();
        small.max_block = 4096;
        small.size = 1 << 30;
        assert_eq!(ok(req(Command::Read, none, 0, 8192), &small), Err(NBD_EINVAL));
        let mut small_chunked = chunked.clone();
        small_chunked.max_block = 4096;
        assert_eq!(ok(req(Command::Read, none, 0, 8192), &small_chunked), Err(NBD_EOVERFLOW));
        // Trims may exceed the maximum payload.
        assert_eq!(ok(req(Command::Trim, none, 0, 8192), &small), Ok(()));
    }

    #[test]
    fn check_survives_a_zero_min_block() {
        let mut s = session(false, false, false);
        s.min_block = 0;
        assert_eq!(req(Command::Read, CommandFlags::empty(), 3, 5).check(&s), Ok(()));
    }
}
