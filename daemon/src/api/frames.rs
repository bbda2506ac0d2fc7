//! The ingest stream's frame codec (docs/api.md, "Ingest"), the one place both sides use:
//! the agent encodes frames, the server's receiver (`server::http::ingest`) decodes them.
//!
//! Decoding is two-phase: `Ok(None)` means "need more bytes", `Err` means the stream is
//! malformed. No I/O here.

use bytes::{Buf, Bytes, BytesMut};

/// Largest number of blocks in one data frame (4 MiB).
pub const MAX_FRAME_BLOCKS: u32 = 1024;
const BS: usize = 4096;

/// One frame of an ingest stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// Changed blocks from `first`, with their crc32s.
    Data {
        /// First block index.
        first: u64,
        /// crc32 of each block.
        crcs: Vec<u32>,
        /// `crcs.len() * 4096` bytes.
        data: Bytes,
    },
    /// Blocks that are now zero.
    Zero {
        /// First block index.
        first: u64,
        /// Number of blocks.
        count: u32,
    },
    /// The end, with the agent's counts.
    End {
        /// Bytes of the image read.
        scanned: u64,
        /// Bytes found changed.
        changed: u64,
    },
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Parse one frame from the front of `buf`: `Ok(Some((frame, consumed)))`, `Ok(None)` when
/// more bytes are needed, or `Err` for malformed input. A data frame's `data` is left empty:
/// [`take`] fills it from the buffer without copying.
pub fn parse(buf: &[u8]) -> Result<Option<(Frame, usize)>, String> {
    let Some(&tag) = buf.first() else { return Ok(None) };
    match tag {
        b'D' | b'Z' => {
            if buf.len() < 13 {
                return Ok(None);
            }
            let first = u64_at(buf, 1);
            let count = u32_at(buf, 9);
            if count == 0 || count > MAX_FRAME_BLOCKS {
                return Err(format!("frame of {count} blocks: must be 1 to {MAX_FRAME_BLOCKS}"));
            }
            if tag == b'Z' {
                return Ok(Some((Frame::Zero { first, count }, 13)));
            }
            let n = count as usize;
            let total = 13 + 4 * n + BS * n;
            if buf.len() < total {
                return Ok(None);
            }
            let crcs = (0..n).map(|i| u32_at(buf, 13 + 4 * i)).collect();
            // The data is cut out of the buffer by `take` without copying.
            Ok(Some((Frame::Data { first, crcs, data: Bytes::new() }, total)))
        }
        b'E' => {
            if buf.len() < 17 {
                return Ok(None);
            }
            Ok(Some((Frame::End { scanned: u64_at(buf, 1), changed: u64_at(buf, 9) }, 17)))
        }
        other => Err(format!("unknown frame type 0x{other:02x}")),
    }
}

/// Remove the next frame from `buf`, with a data frame's payload split off uncopied.
pub fn take(buf: &mut BytesMut) -> Result<Option<Frame>, String> {
    let Some((mut frame, used)) = parse(buf)? else { return Ok(None) };
    let mut whole = buf.split_to(used);
    if let Frame::Data { crcs, data, .. } = &mut frame {
        whole.advance(13 + 4 * crcs.len());
        *data = whole.freeze();
    }
    Ok(Some(frame))
}

/// Append a data frame for `blocks` (a multiple of 4096 bytes) starting at block `first`.
pub fn encode_data(first: u64, blocks: &[u8], out: &mut Vec<u8>) {
    let n = blocks.len() / BS;
    out.push(b'D');
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
    for b in blocks.chunks_exact(BS) {
        out.extend_from_slice(&catalog::blockmap::block_crc(b).to_le_bytes());
    }
    out.extend_from_slice(blocks);
}

/// Append a zero frame.
pub fn encode_zero(first: u64, count: u32, out: &mut Vec<u8>) {
    out.push(b'Z');
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
}

/// Append the end frame.
pub fn encode_end(scanned: u64, changed: u64, out: &mut Vec<u8>) {
    out.push(b'E');
    out.extend_from_slice(&scanned.to_le_bytes());
    out.extend_from_slice(&changed.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_need_more() {
        let mut out = Vec::new();
        let blocks: Vec<u8> = (0..2 * BS).map(|i| u8::try_from(i % 251).unwrap_or(0)).collect();
        encode_data(5, &blocks, &mut out);
        encode_zero(9, 3, &mut out);
        encode_end(100, 50, &mut out);
        let (_, used) = parse(&out).unwrap().unwrap();
        for cut in 0..used {
            assert_eq!(parse(&out[..cut]).unwrap(), None, "cut at {cut}");
        }
        let mut buf = BytesMut::from(&out[..]);
        let f = take(&mut buf).unwrap().unwrap();
        assert!(matches!(&f, Frame::Data { first: 5, crcs, data } if crcs.len() == 2 && data[..] == blocks[..]));
        assert_eq!(take(&mut buf).unwrap(), Some(Frame::Zero { first: 9, count: 3 }));
        assert_eq!(take(&mut buf).unwrap(), Some(Frame::End { scanned: 100, changed: 50 }));
        assert_eq!(take(&mut buf).unwrap(), None);
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert!(parse(b"X").is_err());
        let mut z = Vec::new();
        encode_zero(0, 0, &mut z);
        assert!(parse(&z).is_err());
        let mut d = vec![b'D'];
        d.extend_from_slice(&0u64.to_le_bytes());
        d.extend_from_slice(&(MAX_FRAME_BLOCKS + 1).to_le_bytes());
        assert!(parse(&d).is_err());
    }
}
