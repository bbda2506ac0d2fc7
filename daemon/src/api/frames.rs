//! The ingest stream's frame codec (docs/api.md, "Ingest"), the one place both sides use:
//! the agent encodes frames, the server's receiver (`server::http::ingest_stream`) decodes them.
//!
//! Decoding streams: [`Decoder::next`] takes the body as it arrives, in pieces of any size, and
//! returns events; `Ok(None)` means "need more bytes", `Err` means the stream is malformed or a
//! block arrived damaged. A data frame's payload is handed out as it arrives
//! ([`Event::Payload`], never more than that frame's payload), so the receiver copies it once,
//! straight to where it is written from. Every block's crc32 is checked as its bytes pass (a
//! piece that completes a damaged block is refused, not handed out), and a frame is complete
//! ([`Event::DataEnd`]) only once all of its blocks matched: a receiver may gather a frame's
//! payload as it comes, but must not use it before that event. No I/O here.

use bytes::Bytes;

/// Largest number of blocks in one data frame (4 MiB).
pub const MAX_FRAME_BLOCKS: u32 = 1024;
const BS: usize = 4096;

/// Bytes of a data or zero frame's fixed head (tag, first block, count).
const HEAD: usize = 13;
/// Bytes of the end frame.
const END: usize = 17;

/// Why a stream cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A frame starts with a byte that is no frame type.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// A data or zero frame's count is 0 or above [`MAX_FRAME_BLOCKS`].
    #[error("frame of {0} blocks: must be 1 to {MAX_FRAME_BLOCKS}")]
    BadCount(u32),
    /// A block's bytes do not match the crc32 its frame carries.
    #[error("block {0} arrived damaged (crc32 mismatch)")]
    Damaged(u64),
}

/// What [`Decoder::next`] found at the front of the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A data frame of `count` blocks from `first` starts; its payload follows as
    /// [`Event::Payload`]s and it ends with [`Event::DataEnd`].
    DataStart {
        /// First block index.
        first: u64,
        /// Number of blocks (1 to [`MAX_FRAME_BLOCKS`]).
        count: u32,
    },
    /// The next bytes of the current data frame's payload, every whole block among them
    /// already checked against its crc32.
    Payload(&'a [u8]),
    /// The current data frame is complete and every one of its blocks matched its crc32.
    DataEnd,
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

/// The payload of the data frame being received.
#[derive(Debug)]
struct Payload {
    first: u64,
    crcs: Vec<u32>,
    /// Payload bytes received so far.
    got: usize,
    /// The crc32 of the part of the current block received so far.
    crc: crc32fast::Hasher,
}

impl Payload {
    fn total(&self) -> usize {
        self.crcs.len() * BS
    }

    /// Take the next bytes of the payload from `input`, checking each block they complete.
    fn take<'a>(&mut self, input: &mut &'a [u8]) -> Result<&'a [u8], FrameError> {
        let n = input.len().min(self.total() - self.got);
        let (piece, rest) = input.split_at(n);
        let mut left = piece;
        while !left.is_empty() {
            let in_block = self.got % BS;
            let (now, later) = left.split_at(left.len().min(BS - in_block));
            self.crc.update(now);
            self.got += now.len();
            if self.got.is_multiple_of(BS) {
                let i = self.got / BS - 1;
                let crc = std::mem::take(&mut self.crc).finalize();
                if crc != self.crcs[i] {
                    return Err(FrameError::Damaged(self.first + i as u64));
                }
            }
            left = later;
        }
        *input = rest;
        Ok(piece)
    }
}

/// The streaming decoder of one ingest stream.
#[derive(Debug, Default)]
pub struct Decoder {
    /// The bytes of a frame head that arrived split across pieces (at most 13 + 4 * 1024).
    head: Vec<u8>,
    /// The data frame whose payload is arriving.
    payload: Option<Payload>,
}

impl Decoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// The next event from the front of `input`, which is advanced past what it used;
    /// `Ok(None)` once `input` is used up without completing one.
    pub fn next<'a>(&mut self, input: &mut &'a [u8]) -> Result<Option<Event<'a>>, FrameError> {
        if let Some(p) = &mut self.payload {
            if p.got == p.total() {
                self.payload = None;
                return Ok(Some(Event::DataEnd));
            }
            if input.is_empty() {
                return Ok(None);
            }
            return p.take(input).map(|piece| Some(Event::Payload(piece)));
        }
        let head = if self.head.is_empty() {
            // The common case: the whole head is in `input`, read in place.
            match head_len(input)? {
                Some(len) if input.len() >= len => {
                    let (h, rest) = input.split_at(len);
                    *input = rest;
                    h
                }
                _ => return self.gather(input),
            }
        } else {
            return self.gather(input);
        };
        Ok(Some(self.start(head)))
    }

    /// Collect a head that arrives in pieces; the event it starts once it is whole.
    fn gather<'a>(&mut self, input: &mut &'a [u8]) -> Result<Option<Event<'a>>, FrameError> {
        loop {
            // Until the count is known, ask for the fixed part only.
            let want = head_len(&self.head)?.unwrap_or(if self.head.first() == Some(&b'E') { END } else { HEAD });
            if self.head.len() == want {
                let head = std::mem::take(&mut self.head);
                return Ok(Some(self.start(&head)));
            }
            if input.is_empty() {
                return Ok(None);
            }
            let n = (want - self.head.len()).min(input.len());
            self.head.extend_from_slice(&input[..n]);
            *input = &input[n..];
        }
    }

    /// Act on a whole, checked head (`head_len(head) == Some(head.len())`).
    fn start<'a>(&mut self, head: &[u8]) -> Event<'a> {
        match head[0] {
            b'E' => Event::End { scanned: u64_at(head, 1), changed: u64_at(head, 9) },
            b'Z' => Event::Zero { first: u64_at(head, 1), count: u32_at(head, 9) },
            _ => {
                let (first, count) = (u64_at(head, 1), u32_at(head, 9));
                let crcs = head[HEAD..].chunks_exact(4).map(|c| u32_at(c, 0)).collect();
                self.payload = Some(Payload { first, crcs, got: 0, crc: crc32fast::Hasher::new() });
                Event::DataStart { first, count }
            }
        }
    }

    /// Whether the decoder is between frames (nothing of a frame received and not finished).
    pub fn at_frame_boundary(&self) -> bool {
        self.head.is_empty() && self.payload.is_none()
    }
}

/// The length of the head that starts `prefix`: `None` until enough of it is there to tell.
fn head_len(prefix: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(&tag) = prefix.first() else { return Ok(None) };
    match tag {
        b'E' => Ok(Some(END)),
        b'D' | b'Z' if prefix.len() < HEAD => Ok(None),
        b'D' | b'Z' => {
            let count = u32_at(prefix, 9);
            if count == 0 || count > MAX_FRAME_BLOCKS {
                return Err(FrameError::BadCount(count));
            }
            Ok(Some(if tag == b'Z' { HEAD } else { HEAD + 4 * count as usize }))
        }
        other => Err(FrameError::UnknownType(other)),
    }
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

/// Append the head of a data frame for `blocks` (a multiple of 4096 bytes, at most
/// [`MAX_FRAME_BLOCKS`] blocks) starting at block `first`: everything but the payload, which
/// must follow it on the wire.
pub fn encode_data_head(first: u64, blocks: &[u8], out: &mut Vec<u8>) {
    let n = blocks.len() / BS;
    out.reserve(HEAD + 4 * n);
    out.push(b'D');
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
    for b in blocks.chunks_exact(BS) {
        out.extend_from_slice(&catalog::blockmap::block_crc(b).to_le_bytes());
    }
}

/// Append a whole data frame (head and payload) for `blocks`, starting at block `first`.
pub fn encode_data(first: u64, blocks: &[u8], out: &mut Vec<u8>) {
    encode_data_head(first, blocks, out);
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

/// A frame as a whole, for tests and tools: what [`decode_all`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Changed blocks from `first`, their crc32s checked.
    Data {
        /// First block index.
        first: u64,
        /// `count * 4096` bytes.
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

/// Decode a stream that arrives in `pieces` into whole frames (the frames completed before the
/// pieces ran out).
pub fn decode_all<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<Frame>, FrameError> {
    let (mut dec, mut out, mut data, mut first) = (Decoder::new(), Vec::new(), Vec::new(), 0);
    for mut piece in pieces {
        while let Some(ev) = dec.next(&mut piece)? {
            match ev {
                Event::DataStart { first: f, .. } => first = f,
                Event::Payload(p) => data.extend_from_slice(p),
                Event::DataEnd => out.push(Frame::Data { first, data: Bytes::from(std::mem::take(&mut data)) }),
                Event::Zero { first, count } => out.push(Frame::Zero { first, count }),
                Event::End { scanned, changed } => out.push(Frame::End { scanned, changed }),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stream() -> (Vec<u8>, Vec<Frame>) {
        let blocks: Vec<u8> = (0..2 * BS).map(|i| u8::try_from(i % 251).unwrap_or(0)).collect();
        let mut out = Vec::new();
        encode_data(5, &blocks, &mut out);
        encode_zero(9, 3, &mut out);
        encode_data(12, &blocks[..BS], &mut out);
        encode_end(100, 50, &mut out);
        let frames = vec![
            Frame::Data { first: 5, data: Bytes::from(blocks.clone()) },
            Frame::Zero { first: 9, count: 3 },
            Frame::Data { first: 12, data: Bytes::copy_from_slice(&blocks[..BS]) },
            Frame::End { scanned: 100, changed: 50 },
        ];
        (out, frames)
    }

    #[test]
    fn frames_round_trip_whole_and_byte_by_byte() {
        let (out, frames) = stream();
        assert_eq!(decode_all([&out[..]]).unwrap(), frames);
        assert_eq!(decode_all(out.chunks(1)).unwrap(), frames);
        // Cut anywhere, the frames before the cut come out and nothing else.
        for cut in 0..out.len() {
            let got = decode_all([&out[..cut]]).unwrap();
            assert!(frames.starts_with(&got), "cut at {cut}");
        }
    }

    proptest! {
        #[test]
        fn any_split_decodes_the_same(cuts in proptest::collection::vec(0usize..20_000, 0..12)) {
            let (out, frames) = stream();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (out.len() + 1)).collect();
            cuts.sort_unstable();
            let mut pieces = Vec::new();
            let mut at = 0;
            for c in cuts.into_iter().chain([out.len()]) {
                pieces.push(&out[at..c]);
                at = c;
            }
            prop_assert_eq!(decode_all(pieces).unwrap(), frames);
        }
    }

    #[test]
    fn a_damaged_block_is_refused_before_its_bytes_are_handed_out() {
        let (mut out, _) = stream();
        out[13 + 8 + BS + 7] ^= 1; // a byte of block 6 (the first frame's second block)
        let mut dec = Decoder::new();
        let mut input = &out[..];
        let mut payload = 0;
        let err = loop {
            match dec.next(&mut input) {
                Ok(Some(Event::Payload(p))) => payload += p.len(),
                Ok(Some(_)) => {}
                Ok(None) => panic!("the damage went unnoticed"),
                Err(e) => break e,
            }
        };
        assert_eq!(err, FrameError::Damaged(6));
        assert_eq!(payload, 0, "the piece holding the damaged block was not handed out");
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert_eq!(decode_all([&b"X"[..]]), Err(FrameError::UnknownType(b'X')));
        let mut z = Vec::new();
        encode_zero(0, 0, &mut z);
        assert_eq!(decode_all([&z[..]]), Err(FrameError::BadCount(0)));
        let mut d = vec![b'D'];
        d.extend_from_slice(&0u64.to_le_bytes());
        d.extend_from_slice(&(MAX_FRAME_BLOCKS + 1).to_le_bytes());
        assert_eq!(decode_all(d.chunks(3)), Err(FrameError::BadCount(MAX_FRAME_BLOCKS + 1)));
    }
}
