//! forkd's NBD protocol core: the server side of the fixed-newstyle handshake, transmission
//! request decoding and reply encoding, with no I/O. Bytes go in, events and bytes come out;
//! the daemon owns the socket, the storage and the clock (handshake timeouts), and turns
//! [`Request`]s into its own block operations. It never depends on storage.
//!
//! How the daemon drives one connection:
//!
//! 1. Send [`Handshake::greeting`]. Read from the socket into a `BytesMut` and call
//!    [`Handshake::feed`] until it stops asking for more: send every [`Step::Reply`] and call
//!    `feed` again (the buffer may already hold the next option); on [`Step::Close`] send the
//!    bytes and close; on [`Step::Done`] send the bytes and enter transmission with the
//!    [`Session`]. Bytes left in the buffer after `Done` already belong to transmission.
//!    An `Err` means the client broke the protocol: close without replying.
//! 2. Transmission: [`Session::decode_request`] (or [`request::decode`]) on the buffer. On
//!    `Ok(Some((req, n)))` drop `n` header bytes, then consume exactly `req.payload_len` more
//!    bytes: the write data, or bytes to discard when `req.too_large` is set. Check the request
//!    with [`Request::check`] (an `Err(errno)` is the error to reply with), run it, and encode
//!    the reply with the [`ReplyWriter`] from [`Session::reply_writer`], which picks simple,
//!    structured or extended framing from what was negotiated. [`Command::Disc`] gets no reply.
//!    An `Err` from decoding means the stream cannot be resynchronised: close the connection.
//!
//! Spec: `doc/proto.md` of the NBD project, plus its `extension-ext-header` branch for
//! extended headers. TLS is not implemented: `NBD_OPT_STARTTLS` answers `NBD_REP_ERR_UNSUP`
//! (the NOTLS mode of the spec).
//!
//! Invariants kept by every decoder here: no input can make it panic or allocate more than the
//! configured limits; "not enough bytes yet" is `Ok(None)` / [`Step::NeedMore`] and malformed
//! input is an `Err`.

#![forbid(unsafe_code)]

pub mod consts;
pub mod handshake;
pub mod reply;
pub mod request;
mod wire;

pub use handshake::{ExportInfo, Exports, Handshake, HandshakeConfig, Session, Step};
pub use reply::{ChunkWriter, ReplyWriter};
pub use request::{Command, CommandFlags, Request};

/// Everything that can go wrong in this crate. Handshake and request variants mean the peer
/// broke the protocol and the connection must be closed; the others are misuse by the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NbdError {
    /// The client flags lack `NBD_FLAG_C_FIXED_NEWSTYLE` or carry bits the server did not offer.
    #[error("unsupported client flags {0:#010x}")]
    ClientFlags(u32),
    /// An option did not start with the `IHAVEOPT` magic.
    #[error("bad option magic {0:#018x}")]
    OptionMagic(u64),
    /// Option data is longer than the server will skip, or an `NBD_OPT_EXPORT_NAME` (which
    /// cannot be answered with an error) is longer than the option limit.
    #[error("option {option} carries {len} bytes of data, over the limit")]
    OptionTooLarge {
        /// The option number.
        option: u32,
        /// The data length the client announced.
        len: u32,
    },
    /// The client sent `NBD_OPT_EXPORT_NAME` after negotiating extended headers.
    #[error("NBD_OPT_EXPORT_NAME after extended headers were negotiated")]
    ExportNameWithExtendedHeaders,
    /// [`Handshake::feed`] was called after it returned `Done` or `Close`.
    #[error("the handshake is already finished")]
    HandshakeFinished,
    /// A request did not start with the magic of the negotiated header style.
    #[error("bad request magic {0:#010x}")]
    RequestMagic(u32),
    /// An extended request announced a payload longer than the maximum payload size; the spec
    /// asks the server to disconnect rather than read it.
    #[error("request payload of {len} bytes exceeds the maximum of {max}")]
    PayloadTooLarge {
        /// The payload length the client announced.
        len: u64,
        /// The maximum payload size in force.
        max: u64,
    },
    /// The handshake configuration breaks the spec's size-constraint rules.
    #[error("invalid handshake configuration: {0}")]
    InvalidConfig(&'static str),
    /// A value given to an encoder does not fit the width of its wire field.
    #[error("{0} does not fit its wire field")]
    ValueTooLarge(&'static str),
    /// A content or status chunk would describe zero bytes, which the spec forbids.
    #[error("reply chunk would describe zero bytes")]
    EmptyChunk,
}
