//! Transmission-phase reply encoding ("Simple reply message", "Structured reply chunk
//! message", "Extended reply chunk message" and "Structured reply types" in the spec).
//!
//! Two layers:
//! - free functions that encode one reply or chunk exactly as named: `simple*` for sessions
//!   without structured replies, `structured_*` / [`block_status`] for the 20-byte chunk header,
//!   `extended_*` for the 32-byte extended header (which also echoes the request offset);
//! - [`ReplyWriter`], built from a [`Session`], which picks the framing that was negotiated so
//!   the daemon cannot mix formats, and enforces per-request rules (`NBD_CMD_FLAG_REQ_ONE`, the
//!   2^20-extent limit). Chunk-only replies live on [`ChunkWriter`], which exists only for
//!   sessions that negotiated chunks.
//!
//! Invariants: every encoder produces a well-formed message or an error, never a panic.
//! Content and status chunks that would describe zero bytes are refused
//! ([`NbdError::EmptyChunk`]); lengths that do not fit their field are refused
//! ([`NbdError::ValueTooLarge`]); error messages are cut to 4096 bytes on a character
//! boundary; an error chunk with errno 0 (which would read as success) is sent as `NBD_EIO`.
//! The `*_header` variants return only the header of a data chunk, so the daemon can send the
//! data from its own buffer (vectored write) without copying it.

use crate::consts::*;
use crate::handshake::Session;
use crate::request::{CommandFlags, Request};
use crate::wire::{put_u16, put_u32, put_u64, truncate_str};
use crate::NbdError;

/// Chunk framing: 20-byte structured header, or 32-byte extended header echoing the request
/// offset.
#[derive(Debug, Clone, Copy)]
enum Frame {
    Structured,
    Extended { req_offset: u64 },
}

fn done_flag(done: bool) -> u16 {
    if done {
        NBD_REPLY_FLAG_DONE
    } else {
        0
    }
}

fn chunk_header(frame: Frame, cookie: u64, flags: u16, kind: u16, payload_len: u64) -> Result<Vec<u8>, NbdError> {
    let mut out = Vec::with_capacity(EXTENDED_REPLY_LEN);
    match frame {
        Frame::Structured => {
            let len = u32::try_from(payload_len).map_err(|_| NbdError::ValueTooLarge("reply chunk length"))?;
            put_u32(&mut out, NBD_STRUCTURED_REPLY_MAGIC);
            put_u16(&mut out, flags);
            put_u16(&mut out, kind);
            put_u64(&mut out, cookie);
            put_u32(&mut out, len);
        }
        Frame::Extended { req_offset } => {
            put_u32(&mut out, NBD_EXTENDED_REPLY_MAGIC);
            put_u16(&mut out, flags);
            put_u16(&mut out, kind);
            put_u64(&mut out, cookie);
            put_u64(&mut out, req_offset);
            put_u64(&mut out, payload_len);
        }
    }
    Ok(out)
}

fn read_data_header(frame: Frame, cookie: u64, offset: u64, data_len: u64, done: bool) -> Result<Vec<u8>, NbdError> {
    if data_len == 0 {
        return Err(NbdError::EmptyChunk);
    }
    let payload = data_len.checked_add(8).ok_or(NbdError::ValueTooLarge("read data length"))?;
    let mut out = chunk_header(frame, cookie, done_flag(done), NBD_REPLY_TYPE_OFFSET_DATA, payload)?;
    put_u64(&mut out, offset);
    Ok(out)
}

fn read_data(frame: Frame, cookie: u64, offset: u64, data: &[u8], done: bool) -> Result<Vec<u8>, NbdError> {
    let len = u64::try_from(data.len()).map_err(|_| NbdError::ValueTooLarge("read data length"))?;
    let mut out = read_data_header(frame, cookie, offset, len, done)?;
    out.extend_from_slice(data);
    Ok(out)
}

fn hole(frame: Frame, cookie: u64, offset: u64, len: u32, done: bool) -> Result<Vec<u8>, NbdError> {
    if len == 0 {
        return Err(NbdError::EmptyChunk);
    }
    let mut out = chunk_header(frame, cookie, done_flag(done), NBD_REPLY_TYPE_OFFSET_HOLE, 12)?;
    put_u64(&mut out, offset);
    put_u32(&mut out, len);
    Ok(out)
}

fn error(frame: Frame, cookie: u64, errno: u32, message: &str, offset: Option<u64>, done: bool) -> Vec<u8> {
    let errno = if errno == 0 { NBD_EIO } else { errno };
    let message = truncate_str(message, MAX_STRING_LEN).as_bytes();
    // MAX_STRING_LEN fits in u16, so this conversion cannot fail.
    let message_len = u16::try_from(message.len()).unwrap_or(0);
    let message = message.get(..usize::from(message_len)).unwrap_or(&[]);
    let (kind, tail) = match offset {
        Some(_) => (NBD_REPLY_TYPE_ERROR_OFFSET, 8),
        None => (NBD_REPLY_TYPE_ERROR, 0),
    };
    let payload = 6 + u64::from(message_len) + tail;
    // A payload of at most 6 + 4096 + 8 bytes always fits the 32-bit field.
    let mut out = chunk_header(frame, cookie, done_flag(done), kind, payload).unwrap_or_default();
    put_u32(&mut out, errno);
    put_u16(&mut out, message_len);
    out.extend_from_slice(message);
    if let Some(offset) = offset {
        put_u64(&mut out, offset);
    }
    out
}

fn none(frame: Frame, cookie: u64) -> Vec<u8> {
    // A zero payload always fits.
    chunk_header(frame, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0).unwrap_or_default()
}

/// Largest 32-bit extent length that keeps alignment to any legal minimum block size (2^16).
const MAX_COMPACT_EXTENT: u64 = 0xffff_0000;

fn status(frame: Frame, cookie: u64, context_id: u32, extents: &[(u64, u32)], done: bool) -> Result<Vec<u8>, NbdError> {
    // Zero-length descriptors are forbidden and describe nothing, so dropping them keeps the
    // rest consecutive. A compact descriptor holds 32 bits: a longer extent is cut to an
    // aligned length and ends the list, since the server may describe less than was asked.
    let mut descriptors: Vec<(u64, u32)> = Vec::new();
    for &(len, flags) in extents.iter().filter(|(len, _)| *len > 0) {
        if descriptors.len() == MAX_BLOCK_STATUS_EXTENTS {
            break;
        }
        if matches!(frame, Frame::Structured) && len > u64::from(u32::MAX) {
            descriptors.push((MAX_COMPACT_EXTENT, flags));
            break;
        }
        descriptors.push((len, flags));
    }
    if descriptors.is_empty() {
        return Err(NbdError::EmptyChunk);
    }
    // At most 2^20 descriptors: the counts and sizes below fit their fields.
    let count = u32::try_from(descriptors.len()).map_err(|_| NbdError::ValueTooLarge("extent count"))?;
    let mut out = match frame {
        Frame::Structured => {
            let payload = 4 + 8 * u64::from(count);
            let mut out = chunk_header(frame, cookie, done_flag(done), NBD_REPLY_TYPE_BLOCK_STATUS, payload)?;
            put_u32(&mut out, context_id);
            out
        }
        Frame::Extended { .. } => {
            let payload = 8 + 16 * u64::from(count);
            let mut out = chunk_header(frame, cookie, done_flag(done), NBD_REPLY_TYPE_BLOCK_STATUS_EXT, payload)?;
            put_u32(&mut out, context_id);
            put_u32(&mut out, count);
            out
        }
    };
    for (len, flags) in descriptors {
        match frame {
            Frame::Structured => {
                let len = u32::try_from(len).map_err(|_| NbdError::ValueTooLarge("extent length"))?;
                put_u32(&mut out, len);
                put_u32(&mut out, flags);
            }
            Frame::Extended { .. } => {
                put_u64(&mut out, len);
                put_u64(&mut out, u64::from(flags));
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Simple replies
// ---------------------------------------------------------------------------------------------

/// The 16-byte simple reply header; for a successful read the data follows it.
pub fn simple_header(cookie: u64, errno: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0; SIMPLE_REPLY_LEN];
    let magic = NBD_SIMPLE_REPLY_MAGIC.to_be_bytes();
    let errno = errno.to_be_bytes();
    let cookie = cookie.to_be_bytes();
    for (dst, src) in out.iter_mut().zip(magic.iter().chain(&errno).chain(&cookie)) {
        *dst = *src;
    }
    out
}

/// A simple reply. `data` is sent only when `errno` is 0 (the spec forbids a payload after an
/// error); pass the read data for successful reads and nothing otherwise.
pub fn simple(cookie: u64, errno: u32, data: &[u8]) -> Vec<u8> {
    let mut out = simple_header(cookie, errno).to_vec();
    if errno == 0 {
        out.extend_from_slice(data);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Structured (20-byte header) chunks
// ---------------------------------------------------------------------------------------------

/// `NBD_REPLY_TYPE_OFFSET_DATA`: `data` read at `offset`. Fails on empty data or data longer
/// than the 32-bit length field allows.
pub fn structured_read_data(cookie: u64, offset: u64, data: &[u8], done: bool) -> Result<Vec<u8>, NbdError> {
    read_data(Frame::Structured, cookie, offset, data, done)
}

/// The header (and offset) of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk whose `data_len` bytes of
/// data the caller sends right after it.
pub fn structured_read_data_header(cookie: u64, offset: u64, data_len: u64, done: bool) -> Result<Vec<u8>, NbdError> {
    read_data_header(Frame::Structured, cookie, offset, data_len, done)
}

/// `NBD_REPLY_TYPE_OFFSET_HOLE`: `len` bytes of zeroes at `offset`; `len` must be nonzero.
pub fn structured_hole(cookie: u64, offset: u64, len: u32, done: bool) -> Result<Vec<u8>, NbdError> {
    hole(Frame::Structured, cookie, offset, len, done)
}

/// `NBD_REPLY_TYPE_ERROR` with a human-readable message.
pub fn structured_error(cookie: u64, errno: u32, message: &str, done: bool) -> Vec<u8> {
    error(Frame::Structured, cookie, errno, message, None, done)
}

/// `NBD_REPLY_TYPE_ERROR_OFFSET`: an error at `offset` inside the request's range.
pub fn structured_offset_error(cookie: u64, errno: u32, message: &str, offset: u64, done: bool) -> Vec<u8> {
    error(Frame::Structured, cookie, errno, message, Some(offset), done)
}

/// `NBD_REPLY_TYPE_NONE` with `NBD_REPLY_FLAG_DONE`: the end of a reply.
pub fn structured_none(cookie: u64) -> Vec<u8> {
    none(Frame::Structured, cookie)
}

/// `NBD_REPLY_TYPE_BLOCK_STATUS` for one context: consecutive `(length, status flags)` extents.
/// Zero-length extents are dropped; an extent longer than 32 bits is cut to 0xffff0000 bytes
/// and ends the list; at most 2^20 extents are sent. Fails if no extent remains.
pub fn block_status(cookie: u64, context_id: u32, extents: &[(u64, u32)], done: bool) -> Result<Vec<u8>, NbdError> {
    status(Frame::Structured, cookie, context_id, extents, done)
}

// ---------------------------------------------------------------------------------------------
// Extended (32-byte header) chunks; `req_offset` is the offset of the request being answered
// ---------------------------------------------------------------------------------------------

/// Extended-header `NBD_REPLY_TYPE_OFFSET_DATA`.
pub fn extended_read_data(
    cookie: u64,
    req_offset: u64,
    offset: u64,
    data: &[u8],
    done: bool,
) -> Result<Vec<u8>, NbdError> {
    read_data(Frame::Extended { req_offset }, cookie, offset, data, done)
}

/// Extended-header `NBD_REPLY_TYPE_OFFSET_DATA` header; `data_len` data bytes follow it.
pub fn extended_read_data_header(
    cookie: u64,
    req_offset: u64,
    offset: u64,
    data_len: u64,
    done: bool,
) -> Result<Vec<u8>, NbdError> {
    read_data_header(Frame::Extended { req_offset }, cookie, offset, data_len, done)
}

/// Extended-header `NBD_REPLY_TYPE_OFFSET_HOLE` (hole sizes stay 32-bit, as in the spec).
pub fn extended_hole(cookie: u64, req_offset: u64, offset: u64, len: u32, done: bool) -> Result<Vec<u8>, NbdError> {
    hole(Frame::Extended { req_offset }, cookie, offset, len, done)
}

/// Extended-header `NBD_REPLY_TYPE_ERROR`.
pub fn extended_error(cookie: u64, req_offset: u64, errno: u32, message: &str, done: bool) -> Vec<u8> {
    error(Frame::Extended { req_offset }, cookie, errno, message, None, done)
}

/// Extended-header `NBD_REPLY_TYPE_ERROR_OFFSET`.
pub fn extended_offset_error(
    cookie: u64,
    req_offset: u64,
    errno: u32,
    message: &str,
    offset: u64,
    done: bool,
) -> Vec<u8> {
    error(Frame::Extended { req_offset }, cookie, errno, message, Some(offset), done)
}

/// Extended-header `NBD_REPLY_TYPE_NONE` with `NBD_REPLY_FLAG_DONE`.
pub fn extended_none(cookie: u64, req_offset: u64) -> Vec<u8> {
    none(Frame::Extended { req_offset }, cookie)
}

/// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`: 64-bit extent lengths, 64-bit status (the upper 32 bits
/// zero, as `base:` contexts require). Zero-length extents are dropped, at most 2^20 are sent;
/// fails if none remains.
pub fn extended_block_status(
    cookie: u64,
    req_offset: u64,
    context_id: u32,
    extents: &[(u64, u32)],
    done: bool,
) -> Result<Vec<u8>, NbdError> {
    status(Frame::Extended { req_offset }, cookie, context_id, extents, done)
}

// ---------------------------------------------------------------------------------------------
// Session-aware writers
// ---------------------------------------------------------------------------------------------

/// Encodes replies in the framing a session negotiated: simple replies, structured chunks or
/// extended chunks. Built only from a [`Session`], so formats cannot be mixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyWriter {
    /// No structured replies: one simple reply per request.
    Simple,
    /// Structured replies or extended headers: replies are chunks.
    Chunked(ChunkWriter),
}

impl ReplyWriter {
    /// The writer for `session`.
    pub fn new(session: &Session) -> Self {
        if session.structured || session.extended {
            Self::Chunked(ChunkWriter { extended: session.extended })
        } else {
            Self::Simple
        }
    }

    /// The chunk writer, if the session negotiated chunks.
    pub fn chunked(&self) -> Option<ChunkWriter> {
        match self {
            Self::Simple => None,
            Self::Chunked(w) => Some(*w),
        }
    }

    /// Success without data: every command but a non-empty read (`NBD_CMD_DISC` gets no reply).
    pub fn ok(&self, req: &Request) -> Vec<u8> {
        match self {
            Self::Simple => simple(req.cookie, 0, &[]),
            Self::Chunked(w) => w.none(req),
        }
    }

    /// The whole reply is this error (errno 0 is sent as `NBD_EIO`). The message reaches the
    /// client only with chunked replies.
    pub fn error(&self, req: &Request, errno: u32, message: &str) -> Vec<u8> {
        match self {
            Self::Simple => simple(req.cookie, if errno == 0 { NBD_EIO } else { errno }, &[]),
            Self::Chunked(w) => w.error(req, errno, message, true),
        }
    }

    /// A successful read answered in one message: all `data`, starting at the request offset.
    pub fn read(&self, req: &Request, data: &[u8]) -> Result<Vec<u8>, NbdError> {
        match self {
            Self::Simple => Ok(simple(req.cookie, 0, data)),
            Self::Chunked(w) if data.is_empty() => Ok(w.none(req)),
            Self::Chunked(w) => w.read_data(req, req.offset, data, true),
        }
    }

    /// The header of [`ReplyWriter::read`] without the data: send it, then exactly `len` bytes
    /// of data read at the request offset. With chunks and `len == 0` this is a complete
    /// `NBD_REPLY_TYPE_NONE` and no data follows.
    pub fn read_header(&self, req: &Request, len: u64) -> Result<Vec<u8>, NbdError> {
        match self {
            Self::Simple => Ok(simple_header(req.cookie, 0).to_vec()),
            Self::Chunked(w) if len == 0 => Ok(w.none(req)),
            Self::Chunked(w) => w.read_data_header(req, req.offset, len, true),
        }
    }
}

/// Chunk replies (structured or extended framing, as negotiated) for sessions that have them.
/// Each method takes the request being answered: its cookie, and with extended headers its
/// offset, go into every chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkWriter {
    extended: bool,
}

impl ChunkWriter {
    /// Whether chunks use the 32-byte extended header.
    pub fn is_extended(&self) -> bool {
        self.extended
    }

    fn frame(&self, req: &Request) -> Frame {
        if self.extended {
            Frame::Extended { req_offset: req.offset }
        } else {
            Frame::Structured
        }
    }

    /// `NBD_REPLY_TYPE_OFFSET_DATA`: `data` read at `offset` (inside the request's range).
    pub fn read_data(&self, req: &Request, offset: u64, data: &[u8], done: bool) -> Result<Vec<u8>, NbdError> {
        read_data(self.frame(req), req.cookie, offset, data, done)
    }

    /// The header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk; `len` bytes of data follow it.
    pub fn read_data_header(&self, req: &Request, offset: u64, len: u64, done: bool) -> Result<Vec<u8>, NbdError> {
        read_data_header(self.frame(req), req.cookie, offset, len, done)
    }

    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: `len` (nonzero) bytes of zeroes at `offset`.
    pub fn hole(&self, req: &Request, offset: u64, len: u32, done: bool) -> Result<Vec<u8>, NbdError> {
        hole(self.frame(req), req.cookie, offset, len, done)
    }

    /// `NBD_REPLY_TYPE_ERROR`.
    pub fn error(&self, req: &Request, errno: u32, message: &str, done: bool) -> Vec<u8> {
        error(self.frame(req), req.cookie, errno, message, None, done)
    }

    /// `NBD_REPLY_TYPE_ERROR_OFFSET`: an error at `offset` inside the request's range.
    pub fn offset_error(&self, req: &Request, errno: u32, message: &str, offset: u64, done: bool) -> Vec<u8> {
        error(self.frame(req), req.cookie, errno, message, Some(offset), done)
    }

    /// `NBD_REPLY_TYPE_NONE` with `NBD_REPLY_FLAG_DONE`.
    pub fn none(&self, req: &Request) -> Vec<u8> {
        none(self.frame(req), req.cookie)
    }

    /// The block status chunk of one context, in the type the framing requires
    /// (`NBD_REPLY_TYPE_BLOCK_STATUS` or `_EXT`). Extents are consecutive
    /// `(length, status flags)` from the request offset. With `NBD_CMD_FLAG_REQ_ONE` only the
    /// first extent is sent, cut to the request length. Fails if no nonzero extent is given.
    pub fn block_status(
        &self,
        req: &Request,
        context_id: u32,
        extents: &[(u64, u32)],
        done: bool,
    ) -> Result<Vec<u8>, NbdError> {
        if req.flags.contains(CommandFlags::REQ_ONE) {
            let Some(&(len, flags)) = extents.iter().find(|(len, _)| *len > 0) else {
                return Err(NbdError::EmptyChunk);
            };
            let len = if req.length > 0 { len.min(req.length) } else { len };
            return status(self.frame(req), req.cookie, context_id, &[(len, flags)], done);
        }
        status(self.frame(req), req.cookie, context_id, extents, done)
    }
}

impl Session {
    /// The reply writer for this session's negotiated framing.
    pub fn reply_writer(&self) -> ReplyWriter {
        ReplyWriter::new(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Command;

    fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn be16(b: &[u8], at: usize) -> u16 {
        u16::from_be_bytes(b[at..at + 2].try_into().unwrap())
    }
    fn be64(b: &[u8], at: usize) -> u64 {
        u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
    }

    fn request(flags: CommandFlags, offset: u64, length: u64) -> Request {
        Request { cookie: 7, command: Command::BlockStatus, flags, offset, length, payload_len: 0, too_large: false }
    }

    fn session(structured: bool, extended: bool) -> Session {
        Session {
            export: "v".into(),
            structured,
            extended,
            meta_context: None,
            size: 1 << 20,
            read_only: false,
            flags: NBD_FLAG_HAS_FLAGS,
            min_block: 1,
            max_block: 1 << 25,
        }
    }

    #[test]
    fn simple_replies() {
        let ok = simple(0x0102_0304_0506_0708, 0, b"abc");
        assert_eq!(ok.len(), 19);
        assert_eq!(be32(&ok, 0), NBD_SIMPLE_REPLY_MAGIC);
        assert_eq!(be32(&ok, 4), 0);
        assert_eq!(be64(&ok, 8), 0x0102_0304_0506_0708);
        assert_eq!(&ok[16..], b"abc");
        let err = simple(1, NBD_EIO, b"ignored");
        assert_eq!(err.len(), 16, "no payload after an error");
        assert_eq!(be32(&err, 4), NBD_EIO);
    }

    #[test]
    fn structured_chunks_have_the_20_byte_layout() {
        let d = structured_read_data(9, 4096, b"xy", true).unwrap();
        assert_eq!(be32(&d, 0), NBD_STRUCTURED_REPLY_MAGIC);
        assert_eq!(be16(&d, 4), NBD_REPLY_FLAG_DONE);
        assert_eq!(be16(&d, 6), NBD_REPLY_TYPE_OFFSET_DATA);
        assert_eq!(be64(&d, 8), 9);
        assert_eq!(be32(&d, 16), 10);
        assert_eq!(be64(&d, 20), 4096);
        assert_eq!(&d[28..], b"xy");

        let h = structured_hole(9, 0, 512, false).unwrap();
        assert_eq!((be16(&h, 4), be16(&h, 6), be32(&h, 16), be32(&h, 28)), (0, NBD_REPLY_TYPE_OFFSET_HOLE, 12, 512));
        assert_eq!(h.len(), 32);

        let e = structured_error(9, NBD_EINVAL, "bad", true);
        assert_eq!((be16(&e, 6), be32(&e, 16), be32(&e, 20), be16(&e, 24)), (NBD_REPLY_TYPE_ERROR, 9, NBD_EINVAL, 3));
        assert_eq!(&e[26..], b"bad");

        let o = structured_offset_error(9, NBD_EIO, "", 77, true);
        assert_eq!((be16(&o, 6), be32(&o, 16), be64(&o, 26)), (NBD_REPLY_TYPE_ERROR_OFFSET, 14, 77));

        let n = structured_none(9);
        assert_eq!(
            (n.len(), be16(&n, 4), be16(&n, 6), be32(&n, 16)),
            (20, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0)
        );
    }

    #[test]
    fn extended_chunks_have_the_32_byte_layout() {
        let d = extended_read_data(9, 4096, 8192, b"xy", false).unwrap();
        assert_eq!(be32(&d, 0), NBD_EXTENDED_REPLY_MAGIC);
        assert_eq!((be16(&d, 4), be16(&d, 6)), (0, NBD_REPLY_TYPE_OFFSET_DATA));
        assert_eq!((be64(&d, 8), be64(&d, 16), be64(&d, 24)), (9, 4096, 10));
        assert_eq!(be64(&d, 32), 8192);
        assert_eq!(&d[40..], b"xy");
        let n = extended_none(9, 4096);
        assert_eq!((n.len(), be64(&n, 16), be64(&n, 24)), (32, 4096, 0));
        let e = extended_error(9, 1, 0, "m", true);
        assert_eq!(be32(&e, 32), NBD_EIO, "errno 0 becomes EIO");
        let o = extended_offset_error(9, 1, NBD_EIO, "m", 5, true);
        assert_eq!((be64(&o, 24), be64(&o, 39)), (15, 5));
        let h = extended_hole(9, 1, 2, 3, true).unwrap();
        assert_eq!((be64(&h, 24), be64(&h, 32), be32(&h, 40)), (12, 2, 3));
    }

    #[test]
    fn block_status_compact_and_extended() {
        let b = block_status(3, 1, &[(4096, NBD_STATE_HOLE), (0, 9), (512, 0)], true).unwrap();
        assert_eq!(be16(&b, 6), NBD_REPLY_TYPE_BLOCK_STATUS);
        assert_eq!(be32(&b, 16), 4 + 16, "the zero-length extent is dropped");
        assert_eq!((be32(&b, 20), be32(&b, 24), be32(&b, 28), be32(&b, 32), be32(&b, 36)), (1, 4096, 1, 512, 0));

        let big = block_status(3, 1, &[(1 << 40, NBD_STATE_ZERO), (512, 0)], true).unwrap();
        assert_eq!(be32(&big, 16), 12, "a 64-bit extent ends a compact list");
        assert_eq!(be32(&big, 24), 0xffff_0000);

        let x = extended_block_status(3, 100, 1, &[(1 << 40, NBD_STATE_ZERO), (512, 0)], true).unwrap();
        assert_eq!(be16(&x, 6), NBD_REPLY_TYPE_BLOCK_STATUS_EXT);
        assert_eq!((be64(&x, 16), be64(&x, 24)), (100, 8 + 32));
        assert_eq!((be32(&x, 32), be32(&x, 36)), (1, 2));
        assert_eq!((be64(&x, 40), be64(&x, 48), be64(&x, 56), be64(&x, 64)), (1 << 40, 2, 512, 0));

        assert_eq!(block_status(3, 1, &[], true), Err(NbdError::EmptyChunk));
        assert_eq!(block_status(3, 1, &[(0, 1)], true), Err(NbdError::EmptyChunk));
    }

    #[test]
    fn block_status_caps_the_extent_count() {
        let many = vec![(512u64, 0u32); MAX_BLOCK_STATUS_EXTENTS + 5];
        let b = block_status(1, 1, &many, true).unwrap();
        assert_eq!(b.len(), STRUCTURED_REPLY_LEN + 4 + 8 * MAX_BLOCK_STATUS_EXTENTS);
    }

    #[test]
    fn empty_content_chunks_are_refused() {
        assert_eq!(structured_read_data(1, 0, &[], true), Err(NbdError::EmptyChunk));
        assert_eq!(structured_hole(1, 0, 0, true), Err(NbdError::EmptyChunk));
        assert_eq!(
            structured_read_data_header(1, 0, u64::from(u32::MAX), true),
            Err(NbdError::ValueTooLarge("reply chunk length"))
        );
        assert!(extended_read_data_header(1, 0, 0, u64::from(u32::MAX), true).is_ok());
    }

    #[test]
    fn long_messages_are_cut_to_the_string_limit() {
        let msg = "é".repeat(3000); // 6000 bytes
        let e = structured_error(1, NBD_EIO, &msg, true);
        assert_eq!(usize::from(be16(&e, 24)), 4096);
        assert!(std::str::from_utf8(&e[26..]).is_ok());
    }

    #[test]
    fn writer_picks_the_negotiated_framing() {
        let req = request(CommandFlags::empty(), 4096, 512);
        let simple_w = session(false, false).reply_writer();
        assert_eq!(simple_w, ReplyWriter::Simple);
        assert_eq!(be32(&simple_w.ok(&req), 0), NBD_SIMPLE_REPLY_MAGIC);
        assert_eq!(be32(&simple_w.error(&req, 0, "x"), 4), NBD_EIO);
        assert_eq!(simple_w.read(&req, b"ab").unwrap().len(), 18);
        assert_eq!(simple_w.read_header(&req, 2).unwrap().len(), 16);
        assert!(simple_w.chunked().is_none());

        let s = session(true, false).reply_writer();
        assert_eq!(be32(&s.ok(&req), 0), NBD_STRUCTURED_REPLY_MAGIC);
        assert_eq!(be16(&s.read(&req, &[]).unwrap(), 6), NBD_REPLY_TYPE_NONE);
        let r = s.read(&req, b"ab").unwrap();
        assert_eq!((be16(&r, 4), be64(&r, 20)), (NBD_REPLY_FLAG_DONE, 4096));
        assert!(!s.chunked().unwrap().is_extended());

        let x = session(true, true).reply_writer();
        let r = x.read_header(&req, 512).unwrap();
        assert_eq!((r.len(), be32(&r, 0), be64(&r, 16), be64(&r, 24)), (40, NBD_EXTENDED_REPLY_MAGIC, 4096, 520));
        assert_eq!(be32(&x.error(&req, NBD_EPERM, "ro"), 0), NBD_EXTENDED_REPLY_MAGIC);
        assert!(x.chunked().unwrap().is_extended());
    }

    #[test]
    fn req_one_sends_one_extent_within_the_request() {
        let w = session(true, false).reply_writer().chunked().unwrap();
        let req = request(CommandFlags::REQ_ONE, 0, 1000);
        let b = w.block_status(&req, 1, &[(0, 0), (4096, NBD_STATE_HOLE), (4096, 0)], true).unwrap();
        assert_eq!(be32(&b, 16), 12);
        assert_eq!((be32(&b, 24), be32(&b, 28)), (1000, NBD_STATE_HOLE));
        let all = w.block_status(&request(CommandFlags::empty(), 0, 1000), 1, &[(4096, 1), (4096, 0)], true).unwrap();
        assert_eq!(be32(&all, 16), 20);
        assert_eq!(w.block_status(&req, 1, &[(0, 0)], true), Err(NbdError::EmptyChunk));
    }

    #[test]
    fn simple_header_matches_simple() {
        assert_eq!(simple_header(42, 5).to_vec(), simple(42, 5, &[]));
    }
}
