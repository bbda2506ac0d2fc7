//! A small blocking NBD client for `forkd ingest --from nbd://HOST:PORT/EXPORT`, written from
//! the NBD protocol spec (`doc/proto.md`): fixed-newstyle handshake, structured replies,
//! `NBD_OPT_SET_META_CONTEXT` for a `qemu:dirty-bitmap:NAME` context, `NBD_OPT_GO`, then
//! `NBD_CMD_READ`, `NBD_CMD_BLOCK_STATUS` and `NBD_CMD_DISC`.
//!
//! One request is in flight at a time. Everything the server sends is checked: a malformed
//! reply is an error, never a panic.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use nbd::consts::{
    IHAVEOPT, NBDMAGIC, NBD_CMD_BLOCK_STATUS, NBD_CMD_DISC, NBD_CMD_READ, NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_INFO_EXPORT, NBD_OPT_ABORT, NBD_OPT_GO,
    NBD_OPT_SET_META_CONTEXT, NBD_OPT_STRUCTURED_REPLY, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_BLOCK_STATUS_EXT, NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_ERROR_OFFSET, NBD_REPLY_TYPE_FLAG_ERROR,
    NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE, NBD_REP_ACK, NBD_REP_FLAG_ERROR,
    NBD_REP_INFO, NBD_REP_MAGIC, NBD_REP_META_CONTEXT, NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
};

/// The IANA port for NBD.
pub const DEFAULT_PORT: u16 = 10809;
/// Largest option reply or reply chunk payload accepted from a server (beyond a read's data).
const MAX_REPLY: u32 = 16 << 20;
/// Largest block status request: 1 GiB.
const STATUS_CHUNK: u64 = 1 << 30;
/// How long to wait on the server before giving up.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A parsed `nbd://HOST[:PORT]/EXPORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUrl {
    pub host: String,
    pub port: u16,
    pub export: String,
}

/// Parse `nbd://HOST[:PORT][/EXPORT]` (IPv6 hosts in brackets; the export name percent-decoded).
pub fn parse_url(url: &str) -> anyhow::Result<NbdUrl> {
    let rest = url.strip_prefix("nbd://").ok_or_else(|| anyhow!("`{url}` is not an nbd:// URL"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.is_empty() {
        bail!("`{url}`: no host (nbd://HOST:PORT/EXPORT)");
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| anyhow!("`{url}`: unterminated [ in the host"))?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':').ok_or_else(|| anyhow!("`{url}`: junk after the host"))?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        bail!("`{url}`: no host (nbd://HOST:PORT/EXPORT)");
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => bail!("`{url}`: `{p}` is not a port number"),
        },
    };
    let export = percent_decode(path).with_context(|| format!("`{url}`: bad export name"))?;
    if export.len() > nbd::consts::MAX_STRING_LEN {
        bail!("`{url}`: the export name is longer than {} bytes", nbd::consts::MAX_STRING_LEN);
    }
    Ok(NbdUrl { host: host.to_string(), port, export })
}

/// Decode `%XX` escapes; the result must be UTF-8.
fn percent_decode(s: &str) -> anyhow::Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex =
                b.get(i + 1..i + 3).ok_or_else(|| anyhow!("`%` at byte {i} is not followed by two hex digits"))?;
            let hex = std::str::from_utf8(hex).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(hex.ok_or_else(|| anyhow!("`%` at byte {i} is not followed by two hex digits"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| anyhow!("it is not UTF-8 once decoded"))
}

/// The connection, generic so tests can feed canned bytes.
#[derive(Debug)]
struct Conn<S> {
    s: S,
    cookie: u64,
}

impl<S: Read + Write> Conn<S> {
    fn read_n(&mut self, n: usize, what: &str) -> anyhow::Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).with_context(|| format!("NBD server: reading {what}"))?;
        Ok(v)
    }

    fn u16(&mut self, what: &str) -> anyhow::Result<u16> {
        let v = self.read_n(2, what)?;
        Ok(u16::from_be_bytes([v[0], v[1]]))
    }

    fn u32(&mut self, what: &str) -> anyhow::Result<u32> {
        let v = self.read_n(4, what)?;
        Ok(be32(&v, 0))
    }

    fn u64(&mut self, what: &str) -> anyhow::Result<u64> {
        let v = self.read_n(8, what)?;
        Ok(be64(&v, 0))
    }

    fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.s.write_all(bytes).and_then(|()| self.s.flush()).context("NBD server: sending")
    }

    /// The fixed-newstyle greeting; answers with our client flags.
    fn greet(&mut self) -> anyhow::Result<()> {
        if self.u64("the greeting")? != NBDMAGIC {
            bail!("NBD server: bad greeting magic (is this an NBD server?)");
        }
        if self.u64("the greeting")? != IHAVEOPT {
            bail!("NBD server: it speaks the old-style handshake, which is not supported");
        }
        let flags = self.u16("the handshake flags")?;
        if flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
            bail!("NBD server: it does not offer the fixed-newstyle handshake");
        }
        let mut ours = NBD_FLAG_C_FIXED_NEWSTYLE;
        if flags & NBD_FLAG_NO_ZEROES != 0 {
            ours |= NBD_FLAG_C_NO_ZEROES;
        }
        self.send(&ours.to_be_bytes())
    }

    fn send_option(&mut self, opt: u32, data: &[u8]) -> anyhow::Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&len32(data.len())?.to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b)
    }

    /// One option reply: (type, data).
    fn option_reply(&mut self, opt: u32) -> anyhow::Result<(u32, Vec<u8>)> {
        if self.u64("an option reply")? != NBD_REP_MAGIC {
            bail!("NBD server: bad option reply magic");
        }
        let got = self.u32("an option reply")?;
        if got != opt {
            bail!("NBD server: a reply to option {got} while option {opt} was asked");
        }
        let kind = self.u32("an option reply")?;
        let len = self.u32("an option reply")?;
        if len > MAX_REPLY {
            bail!("NBD server: an option reply of {len} bytes");
        }
        let data = self.read_n(len as usize, "an option reply")?;
        Ok((kind, data))
    }

    /// Negotiate structured replies, the dirty-bitmap context (if any), and open `export`:
    /// (size, context id).
    fn negotiate(&mut self, export: &str, bitmap: Option<&str>) -> anyhow::Result<(u64, Option<u32>)> {
        self.greet()?;
        self.send_option(NBD_OPT_STRUCTURED_REPLY, &[])?;
        let (kind, data) = self.option_reply(NBD_OPT_STRUCTURED_REPLY)?;
        let structured = kind == NBD_REP_ACK;
        if !structured && kind & NBD_REP_FLAG_ERROR == 0 {
            bail!("NBD server: unexpected reply {kind} to NBD_OPT_STRUCTURED_REPLY");
        }
        let _ = data;
        let mut ctx = None;
        if let Some(name) = bitmap {
            if !structured {
                bail!("NBD server: it does not support structured replies, so it cannot report dirty bitmap `{name}`");
            }
            let query = format!("qemu:dirty-bitmap:{name}");
            let mut d = Vec::new();
            d.extend_from_slice(&len32(export.len())?.to_be_bytes());
            d.extend_from_slice(export.as_bytes());
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&len32(query.len())?.to_be_bytes());
            d.extend_from_slice(query.as_bytes());
            self.send_option(NBD_OPT_SET_META_CONTEXT, &d)?;
            loop {
                let (kind, data) = self.option_reply(NBD_OPT_SET_META_CONTEXT)?;
                match kind {
                    NBD_REP_ACK => break,
                    NBD_REP_META_CONTEXT => {
                        if data.len() < 4 {
                            bail!("NBD server: a short NBD_REP_META_CONTEXT reply");
                        }
                        if data[4..] == *query.as_bytes() {
                            ctx = Some(be32(&data, 0));
                        }
                    }
                    k if k & NBD_REP_FLAG_ERROR != 0 => {
                        bail!(
                            "NBD server: it refused metadata context {query} on export `{export}` ({}){}",
                            rep_error(k),
                            message(&data)
                        );
                    }
                    k => bail!("NBD server: unexpected reply {k} to NBD_OPT_SET_META_CONTEXT"),
                }
            }
            if ctx.is_none() {
                bail!(
                    "NBD server: export `{export}` has no dirty bitmap `{name}` (context {query} is unknown; for qemu-nbd, serve it with -B {name})"
                );
            }
        }
        let mut d = Vec::new();
        d.extend_from_slice(&len32(export.len())?.to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(NBD_OPT_GO, &d)?;
        let mut size = None;
        loop {
            let (kind, data) = self.option_reply(NBD_OPT_GO)?;
            match kind {
                NBD_REP_ACK => break,
                NBD_REP_INFO => {
                    if data.len() < 2 {
                        bail!("NBD server: a short NBD_REP_INFO reply");
                    }
                    if u16::from_be_bytes([data[0], data[1]]) == NBD_INFO_EXPORT {
                        if data.len() != 12 {
                            bail!("NBD server: NBD_INFO_EXPORT of {} bytes, not 12", data.len());
                        }
                        size = Some(be64(&data, 2));
                    }
                }
                k if k & NBD_REP_FLAG_ERROR != 0 => {
                    bail!("NBD server: cannot open export `{export}` ({}){}", rep_error(k), message(&data));
                }
                k => bail!("NBD server: unexpected reply {k} to NBD_OPT_GO"),
            }
        }
        let size = size.ok_or_else(|| anyhow!("NBD server: NBD_OPT_GO ended without the export's size"))?;
        Ok((size, ctx))
    }

    fn request(&mut self, cmd: u16, offset: u64, length: u32) -> anyhow::Result<u64> {
        self.cookie += 1;
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&length.to_be_bytes());
        self.send(&b)?;
        Ok(self.cookie)
    }

    /// Read the reply header for `cookie`: `None` for a simple reply (its error checked),
    /// else a structured chunk (flags, type, payload length).
    fn reply_header(&mut self, cookie: u64, what: &str) -> anyhow::Result<Option<(u16, u16, u32)>> {
        let magic = self.u32("a reply")?;
        match magic {
            NBD_SIMPLE_REPLY_MAGIC => {
                let err = self.u32("a reply")?;
                let got = self.u64("a reply")?;
                if got != cookie {
                    bail!("NBD server: a reply for cookie {got}, expected {cookie}");
                }
                if err != 0 {
                    bail!("NBD server: {what} failed: {}", errno(err));
                }
                Ok(None)
            }
            NBD_STRUCTURED_REPLY_MAGIC => {
                let flags = self.u16("a reply chunk")?;
                let kind = self.u16("a reply chunk")?;
                let got = self.u64("a reply chunk")?;
                let len = self.u32("a reply chunk")?;
                if got != cookie {
                    bail!("NBD server: a reply chunk for cookie {got}, expected {cookie}");
                }
                Ok(Some((flags, kind, len)))
            }
            m => bail!("NBD server: bad reply magic {m:#010x}"),
        }
    }

    /// Read `buf.len()` bytes at `offset`.
    fn read(&mut self, buf: &mut [u8], offset: u64) -> anyhow::Result<()> {
        let what = format!("reading {} bytes at offset {offset}", buf.len());
        let length = len32(buf.len())?;
        let cookie = self.request(NBD_CMD_READ, offset, length)?;
        let mut covered: Vec<(u64, u64)> = Vec::new();
        loop {
            let Some((flags, kind, len)) = self.reply_header(cookie, &what)? else {
                self.s.read_exact(buf).with_context(|| format!("NBD server: {what}"))?;
                return Ok(());
            };
            let done = flags & NBD_REPLY_FLAG_DONE != 0;
            match kind {
                NBD_REPLY_TYPE_NONE => {
                    if len != 0 {
                        bail!("NBD server: a NONE chunk with {len} bytes of payload");
                    }
                }
                NBD_REPLY_TYPE_OFFSET_DATA => {
                    if len < 8 {
                        bail!("NBD server: a short OFFSET_DATA chunk");
                    }
                    let at = self.u64("an OFFSET_DATA chunk")?;
                    let n = u64::from(len - 8);
                    let rel = in_range(at, n, offset, buf.len())?;
                    self.s.read_exact(&mut buf[rel..rel + (len - 8) as usize]).context("NBD server: reading data")?;
                    covered.push((at, n));
                }
                NBD_REPLY_TYPE_OFFSET_HOLE => {
                    if len != 12 {
                        bail!("NBD server: an OFFSET_HOLE chunk of {len} bytes, not 12");
                    }
                    let at = self.u64("an OFFSET_HOLE chunk")?;
                    let n = self.u32("an OFFSET_HOLE chunk")?;
                    let rel = in_range(at, u64::from(n), offset, buf.len())?;
                    buf[rel..rel + n as usize].fill(0);
                    covered.push((at, u64::from(n)));
                }
                k if k & NBD_REPLY_TYPE_FLAG_ERROR != 0 => return Err(self.error_chunk(k, len, &what)),
                k => bail!("NBD server: unexpected chunk type {k} in the reply to a read"),
            }
            if done {
                break;
            }
        }
        covered.sort_unstable();
        let mut at = offset;
        for (o, n) in covered {
            if o != at || n == 0 {
                bail!("NBD server: the reply to {what} has overlapping, empty or missing chunks");
            }
            at += n;
        }
        if at != offset + buf.len() as u64 {
            bail!("NBD server: the reply to {what} does not cover it all");
        }
        Ok(())
    }

    /// Consume an error chunk's payload and describe it.
    fn error_chunk(&mut self, kind: u16, len: u32, what: &str) -> anyhow::Error {
        if !(6..=MAX_REPLY).contains(&len) || (kind == NBD_REPLY_TYPE_ERROR_OFFSET && len < 14) {
            return anyhow!("NBD server: a malformed error chunk ({len} bytes)");
        }
        let data = match self.read_n(len as usize, "an error chunk") {
            Ok(d) => d,
            Err(e) => return e,
        };
        let err = be32(&data, 0);
        let mlen = usize::from(u16::from_be_bytes([data[4], data[5]]));
        let msg = data.get(6..6 + mlen).map(|m| String::from_utf8_lossy(m).into_owned()).unwrap_or_default();
        let msg = if msg.is_empty() { String::new() } else { format!(": {msg}") };
        match kind {
            NBD_REPLY_TYPE_ERROR | NBD_REPLY_TYPE_ERROR_OFFSET => {
                anyhow!("NBD server: {what} failed: {}{msg}", errno(err))
            }
            k => anyhow!("NBD server: {what} failed with error chunk type {k}: {}{msg}", errno(err)),
        }
    }

    /// Block status of `length` bytes at `offset` for context `ctx`: (length, flags) extents.
    fn block_status(&mut self, ctx: u32, offset: u64, length: u32) -> anyhow::Result<Vec<(u32, u32)>> {
        let what = format!("block status of {length} bytes at offset {offset}");
        let cookie = self.request(NBD_CMD_BLOCK_STATUS, offset, length)?;
        let mut extents = Vec::new();
        loop {
            let Some((flags, kind, len)) = self.reply_header(cookie, &what)? else {
                bail!("NBD server: a simple reply to a block status request");
            };
            match kind {
                NBD_REPLY_TYPE_NONE => {
                    if len != 0 {
                        bail!("NBD server: a NONE chunk with {len} bytes of payload");
                    }
                }
                NBD_REPLY_TYPE_BLOCK_STATUS => {
                    if len < 12 || (len - 4) % 8 != 0 || len > MAX_REPLY {
                        bail!("NBD server: a malformed BLOCK_STATUS chunk of {len} bytes");
                    }
                    let data = self.read_n(len as usize, "a BLOCK_STATUS chunk")?;
                    if be32(&data, 0) == ctx {
                        extents.extend(data[4..].chunks_exact(8).map(|e| (be32(e, 0), be32(e, 4))));
                    }
                }
                NBD_REPLY_TYPE_BLOCK_STATUS_EXT => bail!("NBD server: an extended BLOCK_STATUS chunk, not negotiated"),
                k if k & NBD_REPLY_TYPE_FLAG_ERROR != 0 => return Err(self.error_chunk(k, len, &what)),
                k => bail!("NBD server: unexpected chunk type {k} in the reply to block status"),
            }
            if flags & NBD_REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if extents.is_empty() {
            bail!("NBD server: no extents in the reply to {what}");
        }
        if extents.iter().any(|e| e.0 == 0) {
            bail!("NBD server: an empty extent in the reply to {what}");
        }
        Ok(extents)
    }

    /// The byte ranges of `0..size` whose status (for `ctx`) has bit 0 set, widened to whole
    /// `align`-byte blocks, sorted, merged.
    fn dirty_ranges(&mut self, ctx: u32, size: u64, align: u64) -> anyhow::Result<Vec<(u64, u64)>> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut off = 0u64;
        while off < size {
            let want = (size - off).min(STATUS_CHUNK);
            let extents = self.block_status(ctx, off, u32::try_from(want).unwrap_or(u32::MAX))?;
            let end = off + want;
            for (len, flags) in extents {
                if off >= end {
                    break; // the last extent may run past the request; the rest is asked again
                }
                let n = u64::from(len).min(end - off);
                if flags & 1 != 0 {
                    let s = off / align * align;
                    let e = (off + n).div_ceil(align).saturating_mul(align).min(size);
                    match out.last_mut() {
                        Some(last) if last.0 + last.1 >= s => last.1 = last.1.max(e - last.0),
                        _ => out.push((s, e - s)),
                    }
                }
                off += n;
            }
        }
        Ok(out)
    }
}

/// `at..at + n` must lie in `base..base + len`: the position relative to `base`.
fn in_range(at: u64, n: u64, base: u64, len: usize) -> anyhow::Result<usize> {
    let end = base + len as u64;
    if at < base || at.checked_add(n).is_none_or(|e| e > end) {
        bail!("NBD server: a chunk at {at}+{n} outside the request {base}+{len}");
    }
    usize::try_from(at - base).map_err(|_| anyhow!("offset overflow"))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn len32(n: usize) -> anyhow::Result<u32> {
    u32::try_from(n).map_err(|_| anyhow!("{n} bytes is too long for one NBD message"))
}

fn message(data: &[u8]) -> String {
    if data.is_empty() {
        String::new()
    } else {
        format!(": {}", String::from_utf8_lossy(data))
    }
}

fn rep_error(kind: u32) -> String {
    let name = match kind & !NBD_REP_FLAG_ERROR {
        1 => "unsupported",
        2 => "refused by policy",
        3 => "invalid",
        4 => "not on this platform",
        5 => "TLS required",
        6 => "unknown export",
        7 => "shutting down",
        8 => "block size required",
        9 => "too big",
        _ => "error",
    };
    format!("{name}, reply {:#x}", kind)
}

fn errno(e: u32) -> String {
    let name = match e {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "error",
    };
    format!("{name} ({e})")
}

/// A connected NBD export, ready for reads and block status queries. Requests go one at a time
/// (the connection sits behind a mutex so reads can take `&self`).
#[derive(Debug)]
pub struct NbdClient {
    conn: Mutex<Conn<TcpStream>>,
    size: u64,
    ctx: Option<u32>,
}

impl NbdClient {
    /// Connect to `url` (`nbd://HOST[:PORT]/EXPORT`) and open the export; with `bitmap`, also
    /// negotiate the `qemu:dirty-bitmap:BITMAP` context (an error if the server lacks it).
    pub fn connect(url: &str, bitmap: Option<&str>) -> anyhow::Result<NbdClient> {
        let u = parse_url(url)?;
        let s = TcpStream::connect((u.host.as_str(), u.port))
            .with_context(|| format!("cannot connect to the NBD server at {}:{}", u.host, u.port))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        let _ = s.set_nodelay(true);
        let mut conn = Conn { s, cookie: 0 };
        let (size, ctx) = match conn.negotiate(&u.export, bitmap) {
            Ok(v) => v,
            Err(e) => {
                // Say goodbye politely (best effort) so the server does not log a broken handshake.
                let _ = conn.send_option(NBD_OPT_ABORT, &[]);
                return Err(e.context(url.to_string()));
            }
        };
        Ok(NbdClient { conn: Mutex::new(conn), size, ctx })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Read `buf.len()` bytes at `offset` (split into requests of at most 32 MiB).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> anyhow::Result<()> {
        let mut c = self.conn.lock().map_err(|_| anyhow!("NBD connection poisoned"))?;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(32 << 20);
            c.read(&mut buf[done..done + n], offset + done as u64)?;
            done += n;
        }
        Ok(())
    }

    /// The ranges the dirty bitmap marks, widened to whole `align`-byte blocks (sorted,
    /// disjoint). An error if no bitmap was negotiated.
    pub fn dirty_ranges(&self, align: u64) -> anyhow::Result<Vec<(u64, u64)>> {
        let ctx = self.ctx.ok_or_else(|| anyhow!("no dirty bitmap was negotiated"))?;
        let mut c = self.conn.lock().map_err(|_| anyhow!("NBD connection poisoned"))?;
        c.dirty_ranges(ctx, self.size, align.max(1))
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        if let Ok(c) = self.conn.get_mut() {
            let _ = c.request(NBD_CMD_DISC, 0, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// Canned server bytes in, client bytes out.
    struct Fake {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Fake {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(b)
        }
    }

    impl Write for Fake {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.output.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn conn(input: Vec<u8>) -> Conn<Fake> {
        Conn { s: Fake { input: Cursor::new(input), output: Vec::new() }, cookie: 0 }
    }

    fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        b.extend_from_slice(payload);
        b
    }

    fn opt_reply(opt: u32, kind: u32, data: &[u8]) -> Vec<u8> {
        let mut b = NBD_REP_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        b.extend_from_slice(data);
        b
    }

    fn greeting() -> Vec<u8> {
        let mut b = NBDMAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
        b
    }

    #[test]
    fn urls() {
        let u = parse_url("nbd://127.0.0.1:10810/disk").unwrap();
        assert_eq!(u, NbdUrl { host: "127.0.0.1".into(), port: 10810, export: "disk".into() });
        let u = parse_url("nbd://host/my%20disk%2Fa").unwrap();
        assert_eq!((u.port, u.export.as_str()), (DEFAULT_PORT, "my disk/a"));
        let u = parse_url("nbd://[::1]:99/").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.export.as_str()), ("::1", 99, ""));
        assert_eq!(parse_url("nbd://h").unwrap().export, "");
        for bad in [
            "nbd:///x",
            "nbd://h:0/x",
            "nbd://h:port/x",
            "nbd://h:70000/x",
            "nbd://h/%zz",
            "nbd://h/%4",
            "/dev/x",
            "nbd://[::1/x",
            "nbd://:5/x",
            "nbd://h/%ff",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn handshake_with_bitmap() {
        let mut s = greeting();
        s.extend(opt_reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[]));
        let mut ctx = 7u32.to_be_bytes().to_vec();
        ctx.extend_from_slice(b"qemu:dirty-bitmap:b0");
        s.extend(opt_reply(NBD_OPT_SET_META_CONTEXT, NBD_REP_META_CONTEXT, &ctx));
        s.extend(opt_reply(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK, &[]));
        let mut info = NBD_INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&(16u64 << 20).to_be_bytes());
        info.extend_from_slice(&3u16.to_be_bytes());
        s.extend(opt_reply(NBD_OPT_GO, NBD_REP_INFO, &info));
        s.extend(opt_reply(NBD_OPT_GO, NBD_REP_ACK, &[]));
        let mut c = conn(s);
        assert_eq!(c.negotiate("disk", Some("b0")).unwrap(), (16 << 20, Some(7)));
        assert_eq!(c.s.output[..4], (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes());
    }

    #[test]
    fn unknown_bitmap_and_bad_greeting() {
        let mut s = greeting();
        s.extend(opt_reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[]));
        s.extend(opt_reply(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK, &[]));
        let e = conn(s).negotiate("disk", Some("nope")).unwrap_err().to_string();
        assert!(e.contains("no dirty bitmap `nope`"), "{e}");
        let e = conn(b"NBDMAGIX".to_vec()).negotiate("disk", None).unwrap_err().to_string();
        assert!(e.contains("greeting"), "{e}");
        let mut s = greeting();
        s.extend(opt_reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[]));
        s.extend(opt_reply(NBD_OPT_GO, nbd::consts::NBD_REP_ERR_UNKNOWN, b"no such export"));
        let e = conn(s).negotiate("x", None).unwrap_err().to_string();
        assert!(e.contains("unknown export") && e.contains("no such export"), "{e}");
        // Truncated in the middle of an option reply.
        let mut s = greeting();
        s.extend(&opt_reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[])[..10]);
        assert!(conn(s).negotiate("x", None).is_err());
    }

    #[test]
    fn structured_read() {
        let mut data = 4u64.to_be_bytes().to_vec();
        data.extend_from_slice(&[9, 9, 9, 9]);
        let mut hole = 0u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&4u32.to_be_bytes());
        let mut s = chunk(0, NBD_REPLY_TYPE_OFFSET_DATA, 1, &data);
        s.extend(chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_HOLE, 1, &hole));
        let mut c = conn(s);
        let mut buf = [1u8; 8];
        c.read(&mut buf, 0).unwrap();
        assert_eq!(buf, [0, 0, 0, 0, 9, 9, 9, 9]);
        // A simple reply.
        let mut s = NBD_SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        s.extend_from_slice(&0u32.to_be_bytes());
        s.extend_from_slice(&1u64.to_be_bytes());
        s.extend_from_slice(&[5, 6]);
        let mut buf = [0u8; 2];
        conn(s).read(&mut buf, 100).unwrap();
        assert_eq!(buf, [5, 6]);
    }

    #[test]
    fn malformed_reads() {
        let mut buf = [0u8; 8];
        // Data outside the request.
        let mut data = 6u64.to_be_bytes().to_vec();
        data.extend_from_slice(&[1, 2, 3, 4]);
        let e = conn(chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 1, &data)).read(&mut buf, 0).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
        // Missing part.
        let mut data = 0u64.to_be_bytes().to_vec();
        data.extend_from_slice(&[1, 2, 3, 4]);
        let e = conn(chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 1, &data)).read(&mut buf, 0).unwrap_err();
        assert!(e.to_string().contains("cover"), "{e}");
        // Error chunk.
        let mut err = 5u32.to_be_bytes().to_vec();
        err.extend_from_slice(&3u16.to_be_bytes());
        err.extend_from_slice(b"bad");
        let e = conn(chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 1, &err)).read(&mut buf, 0).unwrap_err();
        assert!(e.to_string().contains("EIO") && e.to_string().contains("bad"), "{e}");
        // Wrong cookie, bad magic, truncated, short error chunk.
        let e = conn(chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 2, &[])).read(&mut buf, 0).unwrap_err();
        assert!(e.to_string().contains("cookie"), "{e}");
        assert!(conn(vec![0; 40]).read(&mut buf, 0).unwrap_err().to_string().contains("magic"));
        assert!(conn(chunk(0, NBD_REPLY_TYPE_OFFSET_DATA, 1, &[0; 3])).read(&mut buf, 0).is_err());
        assert!(conn(chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 1, &[0; 2])).read(&mut buf, 0).is_err());
        let mut t = chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 1, &data);
        t.truncate(t.len() - 2);
        assert!(conn(t).read(&mut buf, 0).is_err());
    }

    fn status(ctx: u32, extents: &[(u32, u32)]) -> Vec<u8> {
        let mut p = ctx.to_be_bytes().to_vec();
        for &(l, f) in extents {
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        p
    }

    #[test]
    fn dirty_ranges_from_block_status() {
        const K: u32 = 1024;
        // 1 MiB export, answered in two requests (the first reply stops at 512 KiB).
        let mut s =
            chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, 1, &status(3, &[(64 * K, 1), (448 * K, 0)]));
        s.extend(chunk(0, NBD_REPLY_TYPE_BLOCK_STATUS, 2, &status(9, &[(512 * K, 1)])));
        s.extend(chunk(0, NBD_REPLY_TYPE_BLOCK_STATUS, 2, &status(3, &[(100, 0), (10, 1), (600 * K, 1)])));
        s.extend(chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 2, &[]));
        let mut c = conn(s);
        let r = c.dirty_ranges(3, 1 << 20, 4096).unwrap();
        assert_eq!(r, vec![(0, 64 << 10), (512 << 10, 512 << 10)]);
        // Malformed: a zero-length extent, a payload that is not whole descriptors, no extents.
        let s = chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, 1, &status(3, &[(0, 1)]));
        assert!(conn(s).dirty_ranges(3, 1 << 20, 4096).is_err());
        let mut p = status(3, &[(4096, 1)]);
        p.push(0);
        assert!(conn(chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, 1, &p))
            .dirty_ranges(3, 4096, 4096)
            .is_err());
        let s = chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 1, &[]);
        assert!(conn(s).dirty_ranges(3, 4096, 4096).is_err());
    }
}
