//! The server side of the fixed-newstyle handshake ("Newstyle negotiation", "Fixed newstyle
//! negotiation", "Option types" and "Option reply types" in the spec) as a state machine that
//! consumes client bytes and emits the bytes to send back.
//!
//! [`Handshake`] owns the negotiation state of one connection: client flags, whether structured
//! replies or extended headers were acknowledged, the metadata context selection and whether
//! the server is shutting down. It reads export facts through the [`Exports`] trait at the
//! moment an option needs them, and never keeps a reference to the daemon.
//!
//! Invariants:
//! - [`Handshake::feed`] consumes only complete units: the 4-byte client flags, or one option
//!   header plus all of its data. An option whose data exceeds `max_option_len` is the only
//!   thing consumed piecemeal: its data is skipped as it arrives (never buffered) and answered
//!   with `NBD_REP_ERR_TOO_BIG`, so the stream stays in sync. The caller therefore buffers at
//!   most `16 + max_option_len` bytes of one option.
//! - Every option gets exactly one final reply (ACK or an error), so the client never waits.
//! - After `Done` or `Close` (and after any `Err`) the machine is finished and refuses input.
//! - Option data is validated strictly: a length field that disagrees with the option length
//!   is `NBD_REP_ERR_INVALID`, never a panic or a misparse.

use bytes::{Buf, BytesMut};

use crate::consts::*;
use crate::wire::{put_u16, put_u32, put_u64, truncate_str, Cursor};
use crate::NbdError;

/// The daemon's view of its exports, asked during negotiation.
pub trait Exports {
    /// Describes the export the client named; `""` asks for the default export, which the
    /// daemon may map to a volume or refuse. `None` means "no such export".
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// Why an export [`Exports::lookup`] denied is refused, when it exists but policy keeps
    /// this client out (sent with `NBD_REP_ERR_POLICY`); `None` for an unknown export.
    fn refusal(&self, _name: &str) -> Option<String> {
        None
    }
    /// Every export to show in `NBD_OPT_LIST`, as `(name, description)`.
    fn list(&self) -> Vec<(String, String)>;
}

/// What the daemon tells the handshake about one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Canonical name, sent in `NBD_INFO_NAME` and kept in the [`Session`].
    pub name: String,
    /// Human-readable description (`NBD_INFO_DESCRIPTION`).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Writes must be refused; `NBD_FLAG_READ_ONLY` is advertised.
    pub read_only: bool,
    /// Flush and FUA are visible across connections, so `NBD_FLAG_CAN_MULTI_CONN` is advertised.
    pub can_multi_conn: bool,
}

impl ExportInfo {
    /// The transmission flags this server advertises for the export. `chunked` is whether
    /// structured replies or extended headers were negotiated (`NBD_FLAG_SEND_DF` needs them).
    ///
    /// Flush, FUA and cache are always offered. Trim, write zeroes and fast zero are offered
    /// only on writable exports: the spec forbids advertising what the server does not
    /// support, and on a read-only export those commands can only fail with `NBD_EPERM`.
    /// The daemon must answer a `NBD_CMD_FLAG_FAST_ZERO` write-zeroes it cannot do quickly
    /// with `NBD_ENOTSUP`.
    pub fn transmission_flags(&self, chunked: bool) -> u16 {
        let mut flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_CACHE;
        if self.read_only {
            flags |= NBD_FLAG_READ_ONLY;
        } else {
            flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
        }
        if chunked {
            flags |= NBD_FLAG_SEND_DF;
        }
        if self.can_multi_conn {
            flags |= NBD_FLAG_CAN_MULTI_CONN;
        }
        flags
    }
}

/// Limits of one handshake. [`HandshakeConfig::default`] follows the spec's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeConfig {
    /// Longest option data read and parsed (default 4096). Longer data is skipped and answered
    /// with `NBD_REP_ERR_TOO_BIG`.
    pub max_option_len: u32,
    /// Longest option data skipped before the session is aborted as a denial of service
    /// (default 64 KiB). Must be at least `max_option_len`.
    pub max_option_skip: u32,
    /// Minimum block size advertised in `NBD_INFO_BLOCK_SIZE` (default 1): a power of two, at
    /// most 64 KiB.
    pub min_block: u32,
    /// Preferred block size (default 4096): a power of two, at least `max(min_block, 512)`.
    pub preferred_block: u32,
    /// Maximum payload size (default 32 MiB): at least `preferred_block`.
    pub max_block: u32,
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        Self {
            max_option_len: 4096,
            max_option_skip: 64 * 1024,
            min_block: 1,
            preferred_block: 4096,
            max_block: DEFAULT_MAX_PAYLOAD,
        }
    }
}

impl HandshakeConfig {
    /// Checks the size constraints against the rules of the spec's "Size constraints" section.
    pub fn validate(&self) -> Result<(), NbdError> {
        if !self.min_block.is_power_of_two() || self.min_block > MAX_MIN_BLOCK {
            return Err(NbdError::InvalidConfig("min_block must be a power of two <= 65536"));
        }
        if !self.preferred_block.is_power_of_two() || self.preferred_block < self.min_block.max(512) {
            return Err(NbdError::InvalidConfig("preferred_block must be a power of two >= max(min_block, 512)"));
        }
        if self.max_block < self.preferred_block {
            return Err(NbdError::InvalidConfig("max_block must be >= preferred_block"));
        }
        if self.max_option_skip < self.max_option_len {
            return Err(NbdError::InvalidConfig("max_option_skip must be >= max_option_len"));
        }
        Ok(())
    }
}

/// What transmission needs to know about a finished negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Canonical export name ([`ExportInfo::name`]).
    pub export: String,
    /// Replies use chunks: structured replies or extended headers were negotiated.
    pub structured: bool,
    /// Extended headers were negotiated: 32-byte requests and replies (implies `structured`).
    pub extended: bool,
    /// The context id of `base:allocation`, if the client selected it for this export; without
    /// it `NBD_CMD_BLOCK_STATUS` must fail.
    pub meta_context: Option<u32>,
    /// Export size in bytes.
    pub size: u64,
    /// The export is read-only.
    pub read_only: bool,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// Minimum block size advertised: offsets and lengths must be multiples of it.
    pub min_block: u32,
    /// Maximum payload size advertised.
    pub max_block: u32,
}

/// What [`Handshake::feed`] wants the caller to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Read more bytes into the buffer and call `feed` again.
    NeedMore,
    /// Send these bytes, then call `feed` again (the buffer may hold the next option already).
    Reply(Vec<u8>),
    /// Send these bytes; transmission starts with `session`. Bytes still in the buffer are
    /// the first transmission bytes.
    Done {
        /// The final option reply.
        reply: Vec<u8>,
        /// The negotiated session.
        session: Session,
    },
    /// Send these bytes (possibly none) and close the connection: the client aborted, or it
    /// chose an export with `NBD_OPT_EXPORT_NAME` that cannot be served.
    Close {
        /// The last bytes to send.
        reply: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    Options,
    /// Skipping the data of an oversized option; the reply is sent once it is all consumed.
    Skip {
        option: u32,
        remaining: u32,
    },
    Finished,
}

/// A `NBD_OPT_SET_META_CONTEXT` that selected `base:allocation`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MetaSelection {
    /// The export name exactly as the client sent it; `NBD_OPT_GO` must name the same one.
    export: String,
    id: u32,
}

/// The negotiation state machine of one connection (server side, fixed newstyle, no TLS).
#[derive(Debug, Clone)]
pub struct Handshake {
    cfg: HandshakeConfig,
    state: State,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    meta: Option<MetaSelection>,
    shutting_down: bool,
}

impl Handshake {
    /// A handshake waiting for the client flags. Fails if `cfg` breaks the size-constraint
    /// rules ([`HandshakeConfig::validate`]).
    pub fn new(cfg: HandshakeConfig) -> Result<Self, NbdError> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            state: State::ClientFlags,
            no_zeroes: false,
            structured: false,
            extended: false,
            meta: None,
            shutting_down: false,
        })
    }

    /// The 18 bytes the server sends first: `NBDMAGIC`, `IHAVEOPT` and the handshake flags
    /// `NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES`.
    pub fn greeting(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(18);
        put_u64(&mut out, NBDMAGIC);
        put_u64(&mut out, IHAVEOPT);
        put_u16(&mut out, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        out
    }

    /// From now on every option but `NBD_OPT_ABORT` is answered with
    /// `NBD_REP_ERR_SHUTDOWN` (and `NBD_OPT_EXPORT_NAME` closes), as the spec asks of a server
    /// that is shutting down.
    pub fn shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// Whether `Done`, `Close` or an error ended the handshake.
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// Consumes complete units from `buf` and says what to do next. Stops at the first reply
    /// so the caller can send it; call again while it returns [`Step::Reply`]. `Err` means the
    /// client broke the protocol: close the connection without replying.
    pub fn feed(&mut self, buf: &mut BytesMut, exports: &dyn Exports) -> Result<Step, NbdError> {
        let result = self.feed_inner(buf, exports);
        if result.is_err() {
            self.state = State::Finished;
        }
        result
    }

    fn feed_inner(&mut self, buf: &mut BytesMut, exports: &dyn Exports) -> Result<Step, NbdError> {
        loop {
            match self.state {
                State::Finished => return Err(NbdError::HandshakeFinished),
                State::ClientFlags => {
                    let Some(flags) = Cursor::new(buf).u32() else {
                        return Ok(Step::NeedMore);
                    };
                    buf.advance(4);
                    let known = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
                    if flags & NBD_FLAG_C_FIXED_NEWSTYLE == 0 || flags & !known != 0 {
                        return Err(NbdError::ClientFlags(flags));
                    }
                    self.no_zeroes = flags & NBD_FLAG_C_NO_ZEROES != 0;
                    self.state = State::Options;
                }
                State::Skip { option, remaining } => {
                    let take = buf.len().min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    buf.advance(take);
                    let left = u32::try_from(take).map_or(0, |t| remaining.saturating_sub(t));
                    if left > 0 {
                        self.state = State::Skip { option, remaining: left };
                        return Ok(Step::NeedMore);
                    }
                    self.state = State::Options;
                    return Ok(self.after_skip(option));
                }
                State::Options => {
                    let mut header = Cursor::new(buf);
                    let (Some(magic), Some(option), Some(len)) = (header.u64(), header.u32(), header.u32()) else {
                        return Ok(Step::NeedMore);
                    };
                    if magic != IHAVEOPT {
                        return Err(NbdError::OptionMagic(magic));
                    }
                    if len > self.cfg.max_option_len {
                        // EXPORT_NAME cannot be answered with an error, so it cannot be skipped.
                        if option == NBD_OPT_EXPORT_NAME || len > self.cfg.max_option_skip {
                            return Err(NbdError::OptionTooLarge { option, len });
                        }
                        buf.advance(OPTION_HEADER_LEN);
                        self.state = State::Skip { option, remaining: len };
                        continue;
                    }
                    // len <= max_option_len (a u32), so this cannot overflow on 32/64-bit.
                    let total = OPTION_HEADER_LEN.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
                    if buf.len() < total {
                        return Ok(Step::NeedMore);
                    }
                    let unit = buf.split_to(total);
                    let data = unit.get(OPTION_HEADER_LEN..).unwrap_or(&[]);
                    return self.option(option, data, exports);
                }
            }
        }
    }

    fn after_skip(&mut self, option: u32) -> Step {
        let mut out = Vec::new();
        if option == NBD_OPT_ABORT {
            // The spec asks the server to ignore any data sent with ABORT.
            rep(&mut out, option, NBD_REP_ACK, &[]);
            self.state = State::Finished;
            return Step::Close { reply: out };
        }
        rep_err(&mut out, option, NBD_REP_ERR_TOO_BIG, "option data too long");
        Step::Reply(out)
    }

    fn option(&mut self, option: u32, data: &[u8], exports: &dyn Exports) -> Result<Step, NbdError> {
        let mut out = Vec::new();
        if self.shutting_down && option != NBD_OPT_ABORT {
            if option == NBD_OPT_EXPORT_NAME {
                self.state = State::Finished;
                return Ok(Step::Close { reply: out });
            }
            rep_err(&mut out, option, NBD_REP_ERR_SHUTDOWN, "server is shutting down");
            return Ok(Step::Reply(out));
        }
        match option {
            NBD_OPT_EXPORT_NAME => return self.export_name(data, exports),
            NBD_OPT_ABORT => {
                rep(&mut out, option, NBD_REP_ACK, &[]);
                self.state = State::Finished;
                return Ok(Step::Close { reply: out });
            }
            NBD_OPT_LIST => list(&mut out, data, exports),
            NBD_OPT_STARTTLS => rep_err(&mut out, option, NBD_REP_ERR_UNSUP, "TLS is not supported"),
            NBD_OPT_INFO | NBD_OPT_GO => {
                if let Some(session) = self.info_go(&mut out, option, data, exports) {
                    self.state = State::Finished;
                    return Ok(Step::Done { reply: out, session });
                }
            }
            NBD_OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    rep_err(&mut out, option, NBD_REP_ERR_INVALID, "option takes no data");
                } else if self.extended {
                    // Extended headers take precedence; structured replies cannot replace them.
                    rep_err(&mut out, option, NBD_REP_ERR_EXT_HEADER_REQD, "extended headers already negotiated");
                } else {
                    self.structured = true;
                    rep(&mut out, option, NBD_REP_ACK, &[]);
                }
            }
            NBD_OPT_EXTENDED_HEADERS => {
                if data.is_empty() {
                    self.extended = true;
                    rep(&mut out, option, NBD_REP_ACK, &[]);
                } else {
                    rep_err(&mut out, option, NBD_REP_ERR_INVALID, "option takes no data");
                }
            }
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => self.meta_context(&mut out, option, data, exports),
            _ => rep_err(&mut out, option, NBD_REP_ERR_UNSUP, "option not supported"),
        }
        Ok(Step::Reply(out))
    }

    fn export_name(&mut self, data: &[u8], exports: &dyn Exports) -> Result<Step, NbdError> {
        if self.extended {
            return Err(NbdError::ExportNameWithExtendedHeaders);
        }
        self.state = State::Finished;
        let Some((name, info)) = parse_string(data).and_then(|n| Some((n, exports.lookup(n)?))) else {
            // This option cannot carry an error: the spec says to terminate the session.
            return Ok(Step::Close { reply: Vec::new() });
        };
        let session = self.session(name, info);
        let mut reply = Vec::with_capacity(10 + EXPORT_NAME_ZEROES);
        put_u64(&mut reply, session.size);
        put_u16(&mut reply, session.flags);
        if !self.no_zeroes {
            reply.resize(reply.len() + EXPORT_NAME_ZEROES, 0);
        }
        Ok(Step::Done { reply, session })
    }

    /// Answers `NBD_OPT_INFO` / `NBD_OPT_GO` into `out`; returns the session when a GO succeeded.
    fn info_go(&mut self, out: &mut Vec<u8>, option: u32, data: &[u8], exports: &dyn Exports) -> Option<Session> {
        let Some((name, requests)) = parse_info_request(data) else {
            rep_err(out, option, NBD_REP_ERR_INVALID, "malformed export request");
            return None;
        };
        let Some(name) = parse_string(name) else {
            rep_err(out, option, NBD_REP_ERR_INVALID, "export name is not a valid string");
            return None;
        };
        let Some(info) = exports.lookup(name) else {
            match exports.refusal(name) {
                Some(why) => rep_err(out, option, NBD_REP_ERR_POLICY, &why),
                None => rep_err(out, option, NBD_REP_ERR_UNKNOWN, &format!("unknown export {name:?}")),
            }
            return None;
        };
        let session = self.session(name, info.clone());

        let mut item = Vec::with_capacity(14);
        put_u16(&mut item, NBD_INFO_EXPORT);
        put_u64(&mut item, session.size);
        put_u16(&mut item, session.flags);
        rep(out, option, NBD_REP_INFO, &item);

        if requests.contains(&NBD_INFO_NAME) && info.name.len() <= MAX_STRING_LEN {
            item.clear();
            put_u16(&mut item, NBD_INFO_NAME);
            item.extend_from_slice(info.name.as_bytes());
            rep(out, option, NBD_REP_INFO, &item);
        }
        if requests.contains(&NBD_INFO_DESCRIPTION) {
            item.clear();
            put_u16(&mut item, NBD_INFO_DESCRIPTION);
            item.extend_from_slice(truncate_str(&info.description, MAX_STRING_LEN).as_bytes());
            rep(out, option, NBD_REP_INFO, &item);
        }
        // Sent whether or not it was asked for: the spec lets the server volunteer it, and a
        // client that did ask has promised to honour it.
        item.clear();
        put_u16(&mut item, NBD_INFO_BLOCK_SIZE);
        put_u32(&mut item, self.cfg.min_block);
        put_u32(&mut item, self.cfg.preferred_block);
        put_u32(&mut item, self.cfg.max_block);
        rep(out, option, NBD_REP_INFO, &item);

        rep(out, option, NBD_REP_ACK, &[]);
        (option == NBD_OPT_GO).then_some(session)
    }

    fn meta_context(&mut self, out: &mut Vec<u8>, option: u32, data: &[u8], exports: &dyn Exports) {
        let set = option == NBD_OPT_SET_META_CONTEXT;
        if set {
            // The spec: SET replaces the previous selection even when it fails.
            self.meta = None;
            if !(self.structured || self.extended) {
                rep_err(out, option, NBD_REP_ERR_INVALID, "negotiate structured replies or extended headers first");
                return;
            }
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            rep_err(out, option, NBD_REP_ERR_INVALID, "malformed metadata context request");
            return;
        };
        if exports.lookup(name).is_none() {
            rep_err(out, option, NBD_REP_ERR_UNKNOWN, &format!("unknown export {name:?}"));
            return;
        }
        let matched = if set {
            // "base:" selects nothing during SET; unknown leaves and namespaces are ignored.
            queries.contains(&BASE_ALLOCATION)
        } else {
            queries.is_empty() || queries.iter().any(|q| *q == "base:" || *q == BASE_ALLOCATION)
        };
        if matched {
            // LIST replies carry a reserved id of zero.
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let mut item = Vec::with_capacity(4 + BASE_ALLOCATION.len());
            put_u32(&mut item, id);
            item.extend_from_slice(BASE_ALLOCATION.as_bytes());
            rep(out, option, NBD_REP_META_CONTEXT, &item);
            if set {
                self.meta = Some(MetaSelection { export: name.to_owned(), id });
            }
        }
        rep(out, option, NBD_REP_ACK, &[]);
    }

    /// The session entering transmission with `info`, reached through the name `requested`.
    fn session(&self, requested: &str, info: ExportInfo) -> Session {
        let structured = self.structured || self.extended;
        Session {
            flags: info.transmission_flags(structured),
            export: info.name,
            structured,
            extended: self.extended,
            meta_context: self.meta.as_ref().filter(|m| m.export == requested).map(|m| m.id),
            size: info.size,
            read_only: info.read_only,
            min_block: self.cfg.min_block,
            max_block: self.cfg.max_block,
        }
    }
}

fn list(out: &mut Vec<u8>, data: &[u8], exports: &dyn Exports) {
    if !data.is_empty() {
        rep_err(out, NBD_OPT_LIST, NBD_REP_ERR_INVALID, "option takes no data");
        return;
    }
    for (name, description) in exports.list() {
        // A truncated name would name another export; leave over-long ones out instead.
        let Ok(name_len) = u32::try_from(name.len()) else { continue };
        if name.len() > MAX_STRING_LEN {
            continue;
        }
        let description = truncate_str(&description, MAX_STRING_LEN);
        let mut item = Vec::with_capacity(4 + name.len() + description.len());
        put_u32(&mut item, name_len);
        item.extend_from_slice(name.as_bytes());
        item.extend_from_slice(description.as_bytes());
        rep(out, NBD_OPT_LIST, NBD_REP_SERVER, &item);
    }
    rep(out, NBD_OPT_LIST, NBD_REP_ACK, &[]);
}

/// Appends one option reply. Callers bound `data` to a few KiB (strings are capped at 4096
/// bytes), so its length always fits the 32-bit field.
fn rep(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    put_u64(out, NBD_REP_MAGIC);
    put_u32(out, option);
    put_u32(out, kind);
    put_u32(out, u32::try_from(data.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(data);
}

/// Appends an error reply with a human-readable message.
fn rep_err(out: &mut Vec<u8>, option: u32, kind: u32, message: &str) {
    rep(out, option, kind, truncate_str(message, MAX_STRING_LEN).as_bytes());
}

/// A protocol string: UTF-8 without NUL (the 4096-byte cap is enforced by the option limit).
fn parse_string(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok().filter(|s| !s.contains('\0'))
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data: name length, name, count, `count` info types, and
/// nothing after them.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let mut c = Cursor::new(data);
    let name_len = usize::try_from(c.u32()?).ok()?;
    let name = c.bytes(name_len)?;
    let count = c.u16()?;
    // Each request is read before it is stored, so the vector is bounded by the data length.
    let mut requests = Vec::new();
    for _ in 0..count {
        requests.push(c.u16()?);
    }
    (c.remaining() == 0).then_some((name, requests))
}

/// `NBD_OPT_{LIST,SET}_META_CONTEXT` data: export name, query count and queries, each a
/// length-prefixed string that starts with a namespace and a colon; nothing may follow.
fn parse_meta_request(data: &[u8]) -> Option<(&str, Vec<&str>)> {
    let mut c = Cursor::new(data);
    let name_len = usize::try_from(c.u32()?).ok()?;
    let name = parse_string(c.bytes(name_len)?)?;
    let count = c.u32()?;
    // Every query consumes at least 4 bytes, so a huge count fails fast at the data's end.
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = usize::try_from(c.u32()?).ok()?;
        let query = parse_string(c.bytes(len)?)?;
        if !query.contains(':') {
            return None;
        }
        queries.push(query);
    }
    (c.remaining() == 0).then_some((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(read_only: bool, multi: bool) -> ExportInfo {
        ExportInfo { name: "vol".into(), description: "d".into(), size: 1 << 20, read_only, can_multi_conn: multi }
    }

    #[test]
    fn transmission_flags_follow_the_export() {
        let rw = export(false, false).transmission_flags(false);
        assert_eq!(rw & NBD_FLAG_HAS_FLAGS, NBD_FLAG_HAS_FLAGS);
        assert_eq!(rw & NBD_FLAG_READ_ONLY, 0);
        assert_ne!(rw & NBD_FLAG_SEND_TRIM, 0);
        assert_ne!(rw & NBD_FLAG_SEND_WRITE_ZEROES, 0);
        assert_ne!(rw & NBD_FLAG_SEND_FAST_ZERO, 0);
        assert_eq!(rw & NBD_FLAG_SEND_DF, 0, "DF needs structured replies");
        assert_eq!(rw & NBD_FLAG_CAN_MULTI_CONN, 0);

        let ro = export(true, true).transmission_flags(true);
        assert_ne!(ro & NBD_FLAG_READ_ONLY, 0);
        assert_eq!(ro & (NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO), 0);
        assert_ne!(ro & NBD_FLAG_SEND_DF, 0);
        assert_ne!(ro & NBD_FLAG_CAN_MULTI_CONN, 0);
        assert_ne!(ro & NBD_FLAG_SEND_FLUSH, 0);
    }

    #[test]
    fn default_config_is_valid_and_bad_ones_are_refused() {
        assert!(HandshakeConfig::default().validate().is_ok());
        let bad = [
            HandshakeConfig { min_block: 3, ..Default::default() },
            HandshakeConfig { min_block: 1 << 17, preferred_block: 1 << 17, ..Default::default() },
            HandshakeConfig { preferred_block: 256, ..Default::default() },
            HandshakeConfig { min_block: 8192, ..Default::default() },
            HandshakeConfig { max_block: 1024, ..Default::default() },
            HandshakeConfig { max_option_skip: 100, ..Default::default() },
        ];
        for cfg in bad {
            assert!(matches!(Handshake::new(cfg), Err(NbdError::InvalidConfig(_))), "{cfg:?}");
        }
    }

    #[test]
    fn greeting_is_the_fixed_newstyle_preamble() {
        let hs = Handshake::new(HandshakeConfig::default()).unwrap();
        let g = hs.greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn info_request_parsing_is_strict() {
        // name "ab", two requests
        let good = [0, 0, 0, 2, b'a', b'b', 0, 2, 0, 3, 0, 1];
        let (name, reqs) = parse_info_request(&good).unwrap();
        assert_eq!(name, b"ab");
        assert_eq!(reqs, vec![3, 1]);
        // trailing byte
        assert!(parse_info_request(&[0, 0, 0, 0, 0, 0, 9]).is_none());
        // name longer than the data
        assert!(parse_info_request(&[0, 0, 0, 9, b'a', 0, 0]).is_none());
        // count says 2, one present
        assert!(parse_info_request(&[0, 0, 0, 0, 0, 2, 0, 3]).is_none());
        assert!(parse_info_request(&[]).is_none());
    }

    #[test]
    fn meta_request_parsing_is_strict() {
        let mut data = vec![0, 0, 0, 1, b'v', 0, 0, 0, 2];
        for q in ["base:", "x-y:z"] {
            data.extend_from_slice(&u32::try_from(q.len()).unwrap().to_be_bytes());
            data.extend_from_slice(q.as_bytes());
        }
        let (name, queries) = parse_meta_request(&data).unwrap();
        assert_eq!(name, "v");
        assert_eq!(queries, vec!["base:", "x-y:z"]);
        // A query without a namespace colon is invalid.
        assert!(parse_meta_request(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, b'a']).is_none());
        // A huge query count with no queries fails instead of looping.
        assert!(parse_meta_request(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_none());
        // Export name that is not UTF-8.
        assert!(parse_meta_request(&[0, 0, 0, 1, 0xff, 0, 0, 0, 0]).is_none());
    }

    #[test]
    fn strings_reject_nul_and_bad_utf8() {
        assert_eq!(parse_string(b"vol"), Some("vol"));
        assert_eq!(parse_string(b""), Some(""));
        assert_eq!(parse_string(b"a\0b"), None);
        assert_eq!(parse_string(&[0xc3]), None);
    }
}
