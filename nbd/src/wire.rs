//! Big-endian reading and writing helpers shared by the handshake, request and reply code.
//!
//! `Cursor` reads fields off a borrowed byte slice and answers `None` instead of panicking when
//! the slice is too short, so every parser built on it is safe on arbitrary input. It owns no
//! data; its only invariant is `pos <= buf.len()`. The `put_*` helpers append to a `Vec<u8>`.

/// A forward-only reader over a byte slice; every read is bounds-checked.
#[derive(Debug, Clone)]
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes not yet read.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Takes the next `n` bytes, or `None` (consuming nothing) if fewer remain.
    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N).and_then(|b| b.try_into().ok())
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }
}

pub(crate) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// The longest prefix of `s` that is at most `max` bytes and ends on a character boundary.
pub(crate) fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_reads_big_endian_and_stops_at_the_end() {
        let data = [0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3, 9];
        let mut c = Cursor::new(&data);
        assert_eq!(c.u16(), Some(1));
        assert_eq!(c.u32(), Some(2));
        assert_eq!(c.u64(), Some(3));
        assert_eq!(c.remaining(), 1);
        assert_eq!(c.u16(), None);
        assert_eq!(c.remaining(), 1, "a failed read consumes nothing");
        assert_eq!(c.bytes(1), Some(&[9u8][..]));
        assert_eq!(c.bytes(usize::MAX), None);
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate_str("abc", 5), "abc");
        assert_eq!(truncate_str("abc", 2), "ab");
        // 'é' is two bytes: cutting in its middle backs off to before it.
        assert_eq!(truncate_str("aé", 2), "a");
        assert_eq!(truncate_str("é", 0), "");
    }

    #[test]
    fn put_helpers_write_big_endian() {
        let mut v = Vec::new();
        put_u16(&mut v, 0x0102);
        put_u32(&mut v, 0x0304_0506);
        put_u64(&mut v, 0x0708_090a_0b0c_0d0e);
        assert_eq!(v, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
    }
}
