//! forkd's iSCSI protocol core (RFC 7143), target side, with no I/O. Bytes go in, PDUs and
//! bytes come out; the daemon owns the socket, the storage and the clock, and never hands this
//! crate a reference to either.
//!
//! What is here:
//!
//! - [`pdu`]: the codec for every PDU a target sends or receives: the 48-byte Basic Header
//!   Segment as one typed struct per opcode, additional header segments, the padded data
//!   segment and the optional CRC32C header and data digests. [`pdu::decode`] is two-phase:
//!   `Ok(None)` means "not enough bytes yet", malformed input is an [`IscsiError`], and
//!   [`IscsiError::disposition`] says whether the connection answers with a Reject PDU and
//!   carries on, or closes.
//! - [`keys`]: `key=value` text parsing and encoding, value syntax (numbers, booleans, lists,
//!   hex and base64 binary) and the operational negotiation of every RFC 7143 key with its
//!   default and result function, ending in [`SessionParams`].
//! - [`login`]: the target's login state machine: security negotiation (`AuthMethod=None`,
//!   one-way and mutual CHAP with MD5 or SHA-256), operational negotiation, stage transitions
//!   and the C bit, and the login status classes.
//! - [`session`]: the full feature phase of one connection (CmdSN window, write data and R2T,
//!   Data-In, task management, text, logout).
//! - [`digest`]: CRC32C, MD5 and SHA-256.
//! - [`scsi`]: the SCSI block device model (its own module documentation).
//!
//! How the daemon drives one connection: read into a buffer and call [`pdu::decode`] with
//! [`Digests::NONE`] and the login data limit until a Login Request arrives; feed each one to
//! [`login::Login::handle`] and send the Login Response it returns; stop on a failure status or
//! continue into the full feature phase with the [`SessionParams`] the machine returned (and
//! the digests they name): hand every PDU to [`session::Session::handle`], run the commands
//! it returns with [`scsi::execute`] and send what [`session::Session::complete`] makes of
//! their outcomes.
//!
//! Invariants kept by every decoder here: no input can make it panic or allocate more than the
//! configured limits.

#![forbid(unsafe_code)]

pub mod digest;
pub mod keys;
pub mod login;
pub mod pdu;
pub mod scsi;
pub mod session;

pub use digest::Digests;
pub use keys::SessionParams;
pub use login::{Login, LoginConfig, LoginStep, Targets};
pub use pdu::{Bhs, Pdu};

/// Reject reason codes (RFC 7143 §11.17.1) used by [`Disposition::Reject`].
pub mod reject_reason {
    /// Data (payload) digest error; the initiator may retransmit.
    pub const DATA_DIGEST: u8 = 0x02;
    /// SNACK reject.
    pub const SNACK_REJECT: u8 = 0x03;
    /// Protocol error (for example a SNACK when ErrorRecoveryLevel is 0).
    pub const PROTOCOL_ERROR: u8 = 0x04;
    /// Command not supported.
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    /// Immediate command reject: too many immediate commands.
    pub const IMMEDIATE_REJECT: u8 = 0x06;
    /// Task in progress.
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    /// Invalid data ACK.
    pub const INVALID_DATA_ACK: u8 = 0x08;
    /// Invalid PDU field.
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    /// Long operation reject: out of resources generating a Target Transfer Tag.
    pub const LONG_OP_REJECT: u8 = 0x0a;
    /// Waiting for logout.
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// Everything that can go wrong in this crate. Decoding variants say what was wrong with the
/// peer's bytes; [`IscsiError::disposition`] is the one place that maps them to the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IscsiError {
    /// A data segment is longer than the limit in force (MaxRecvDataSegmentLength, or the
    /// login limit before it is negotiated).
    #[error("data segment of {len} bytes exceeds the limit of {max}")]
    DataTooLarge {
        /// DataSegmentLength from the header.
        len: u32,
        /// The limit given to the decoder.
        max: u32,
    },
    /// The header digest did not match. RFC 7143 §7.8: the PDU's lengths cannot be trusted, so
    /// the connection is closed.
    #[error("header digest mismatch: received {received:#010x}, computed {computed:#010x}")]
    HeaderDigest {
        /// Digest found on the wire.
        received: u32,
        /// Digest of the bytes received.
        computed: u32,
    },
    /// The data digest did not match; the PDU is discarded and answered with a Reject
    /// (reason 0x02). The header was sound, so the stream stays in sync.
    #[error("data digest mismatch")]
    DataDigest {
        /// The BHS of the discarded PDU, returned as the Reject's data segment.
        header: Box<[u8; 48]>,
        /// Bytes the whole PDU occupies in the stream, to skip.
        skip: usize,
    },
    /// The opcode is not one this crate knows.
    #[error("unknown opcode {opcode:#04x}")]
    UnknownOpcode {
        /// The 6-bit opcode.
        opcode: u8,
        /// The BHS, for the Reject.
        header: Box<[u8; 48]>,
        /// Bytes the whole PDU occupies in the stream, to skip.
        skip: usize,
    },
    /// The additional header segments do not fill TotalAHSLength exactly, or one is invalid.
    #[error("malformed additional header segment")]
    MalformedAhs {
        /// The BHS, for the Reject.
        header: Box<[u8; 48]>,
        /// Bytes the whole PDU occupies in the stream, to skip.
        skip: usize,
    },
    /// Text data is not a sequence of NUL-terminated UTF-8 `key=value` pairs.
    #[error("malformed text key: {0}")]
    MalformedText(&'static str),
    /// A key appeared twice in one negotiation (RFC 7143 §6.2: a protocol error).
    #[error("key {0} sent more than once")]
    DuplicateKey(String),
    /// A key or value is longer than RFC 7143 §6.1 allows.
    #[error("key or value too long")]
    TextTooLong,
    /// A value given to an encoder does not fit the width of its wire field.
    #[error("{0} does not fit its wire field")]
    ValueTooLarge(&'static str),
    /// [`login::Login::handle`] was called after the login finished or failed.
    #[error("the login is already finished")]
    LoginFinished,
}

/// What the connection does about a decoding error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Send a Reject PDU with this reason whose data segment is `header`, skip `skip` bytes of
    /// input and carry on.
    Reject {
        /// The Reject reason code ([`reject_reason`]).
        reason: u8,
        /// The offending PDU's BHS.
        header: Box<[u8; 48]>,
        /// Bytes to drop from the input.
        skip: usize,
    },
    /// The stream cannot be trusted any more: close the connection.
    Close,
}

impl IscsiError {
    /// The wire consequence of this error; the one place decoding errors meet the protocol.
    pub fn disposition(&self) -> Disposition {
        match self {
            IscsiError::DataDigest { header, skip } => {
                Disposition::Reject { reason: reject_reason::DATA_DIGEST, header: header.clone(), skip: *skip }
            }
            IscsiError::UnknownOpcode { header, skip, .. } => Disposition::Reject {
                reason: reject_reason::COMMAND_NOT_SUPPORTED,
                header: header.clone(),
                skip: *skip,
            },
            IscsiError::MalformedAhs { header, skip } => {
                Disposition::Reject { reason: reject_reason::INVALID_PDU_FIELD, header: header.clone(), skip: *skip }
            }
            _ => Disposition::Close,
        }
    }
}
