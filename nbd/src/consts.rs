//! Wire numbers of the NBD protocol: magics, handshake and transmission flags, option and
//! option-reply types, information types, commands, command flags, reply chunk types and errno
//! values.
//!
//! Names and values follow `doc/proto.md` of the NBD project (sections "Values" and
//! "Reserved Magic values"); the extended-header numbers (`NBD_OPT_EXTENDED_HEADERS`,
//! `NBD_CMD_FLAG_PAYLOAD_LEN`, `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`, the two extended magics) come
//! from the `extension-ext-header` version of that document. Everything here is a plain
//! constant: this module owns no state and has no invariants beyond "the value is the spec's".
//! Flag constants are bit masks, not bit numbers.

// ---------------------------------------------------------------------------------------------
// Magics
// ---------------------------------------------------------------------------------------------

/// `NBDMAGIC`, the first 8 bytes the server sends (`INIT_PASSWD`).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, sent by the server after `NBDMAGIC` and by the client before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic that starts every option reply in fixed newstyle negotiation.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact (28-byte) transmission request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended (32-byte) transmission request.
pub const NBD_EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk (20-byte header).
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk (32-byte header).
pub const NBD_EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---------------------------------------------------------------------------------------------
// Header sizes
// ---------------------------------------------------------------------------------------------

/// Bytes of a compact request header.
pub const COMPACT_REQUEST_LEN: usize = 28;
/// Bytes of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Bytes of an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;
/// Bytes of an option request header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of an option reply header (magic, option, type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Reserved zero bytes after an `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES` was negotiated.
pub const EXPORT_NAME_ZEROES: usize = 124;
/// Longest string the spec allows (export names, descriptions, error messages).
pub const MAX_STRING_LEN: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Handshake flags (server, 16 bits) and client flags (32 bits)
// ---------------------------------------------------------------------------------------------

/// Server supports fixed newstyle negotiation.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server can omit the 124 zero bytes after an `NBD_OPT_EXPORT_NAME` reply.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client asks the server to omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// Transmission flags (16 bits)
// ---------------------------------------------------------------------------------------------

/// Always set.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is supported.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is supported.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// The export behaves like a rotational medium.
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_CMD_TRIM` is supported.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE` are supported.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` is supported (only with structured or extended replies).
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Flush and FUA are visible across all connections to the export.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_RESIZE` (experimental resize extension) is supported.
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
/// `NBD_CMD_CACHE` is understood.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// The payload form of `NBD_CMD_BLOCK_STATUS` is supported (extended headers only).
pub const NBD_FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

/// Choose an export and enter transmission (old style, cannot fail gracefully).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Abort negotiation (soft disconnect).
pub const NBD_OPT_ABORT: u32 = 2;
/// List exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Withdrawn `PEEK_EXPORT` extension; unused.
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
/// Upgrade to TLS.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Describe an export without entering transmission.
pub const NBD_OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Enable structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts for `NBD_CMD_BLOCK_STATUS`.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// Enable extended (32-byte) request and reply headers.
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------------------------------
// Option reply types
// ---------------------------------------------------------------------------------------------

/// Option accepted / list finished.
pub const NBD_REP_ACK: u32 = 1;
/// One export in an `NBD_OPT_LIST` answer.
pub const NBD_REP_SERVER: u32 = 2;
/// One information item in an `NBD_OPT_INFO` / `NBD_OPT_GO` answer.
pub const NBD_REP_INFO: u32 = 3;
/// One metadata context.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks an error reply.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// The option is not supported.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
/// Policy forbids the option.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
/// The option is syntactically or semantically invalid.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
/// The option is not supported on this platform.
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
/// TLS is required first.
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
/// The export does not exist.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
/// The server is shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
/// The client must request `NBD_INFO_BLOCK_SIZE` first.
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
/// The request or its reply is too large.
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;
/// Extended headers are required (or already negotiated and cannot be downgraded).
pub const NBD_REP_ERR_EXT_HEADER_REQD: u32 = NBD_REP_FLAG_ERROR | 10;

// ---------------------------------------------------------------------------------------------
// Information types (NBD_OPT_INFO / NBD_OPT_GO)
// ---------------------------------------------------------------------------------------------

/// Export size and transmission flags.
pub const NBD_INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const NBD_INFO_NAME: u16 = 1;
/// Human-readable export description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Minimum, preferred and maximum block sizes.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// Read.
pub const NBD_CMD_READ: u16 = 0;
/// Write (carries a payload).
pub const NBD_CMD_WRITE: u16 = 1;
/// Disconnect (no reply).
pub const NBD_CMD_DISC: u16 = 2;
/// Flush to stable storage.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Discard.
pub const NBD_CMD_TRIM: u16 = 4;
/// Prefetch hint.
pub const NBD_CMD_CACHE: u16 = 5;
/// Write zeroes without a payload.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Query block status of the selected metadata contexts.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
/// Resize (experimental resize extension; not supported here).
pub const NBD_CMD_RESIZE: u16 = 8;

// ---------------------------------------------------------------------------------------------
// Command flags
// ---------------------------------------------------------------------------------------------

/// Force unit access: persist before replying.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Write zeroes must allocate, not punch a hole.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Don't fragment a structured read reply.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// Block status: at most one extent per context.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Write zeroes only if it is faster than a write, else fail with `NBD_ENOTSUP`.
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers: the length field is a payload length and a payload follows.
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---------------------------------------------------------------------------------------------
// Structured / extended reply chunks
// ---------------------------------------------------------------------------------------------

/// Reply flag: this is the final chunk of the reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// Empty final chunk.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// A run of zeroes at an offset.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Block status descriptors with 32-bit lengths (compact framing only).
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Block status descriptors with 64-bit lengths and status (extended framing only).
pub const NBD_REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Bit 15 marks an error chunk.
pub const NBD_REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// Error for the whole request.
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_FLAG_ERROR | 1;
/// Error at an offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_FLAG_ERROR | 2;

// ---------------------------------------------------------------------------------------------
// Metadata contexts
// ---------------------------------------------------------------------------------------------

/// The only metadata context this crate serves.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The context id this server assigns to `base:allocation` in `NBD_OPT_SET_META_CONTEXT`
/// (the spec leaves the id to the server; it is opaque to the client).
pub const BASE_ALLOCATION_ID: u32 = 1;
/// `base:allocation` status bit: the extent is a hole.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` status bit: the extent reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;
/// Most descriptors a block status chunk should carry.
pub const MAX_BLOCK_STATUS_EXTENTS: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Errno values for replies
// ---------------------------------------------------------------------------------------------

/// Operation not permitted (write to a read-only export).
pub const NBD_EPERM: u32 = 1;
/// Input/output error.
pub const NBD_EIO: u32 = 5;
/// Cannot allocate memory.
pub const NBD_ENOMEM: u32 = 12;
/// Invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// No space left on device (write beyond the end).
pub const NBD_ENOSPC: u32 = 28;
/// Value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// Operation not supported (fast zero that would not be fast).
pub const NBD_ENOTSUP: u32 = 95;
/// The server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------------------------
// Size constraint defaults and limits
// ---------------------------------------------------------------------------------------------

/// Largest minimum block size the spec allows.
pub const MAX_MIN_BLOCK: u32 = 1 << 16;
/// Payload size that the spec says must never be treated as a denial of service.
pub const DEFAULT_MAX_PAYLOAD: u32 = 1 << 25;
