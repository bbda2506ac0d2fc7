//! The ingest stream's frame decoder (`forkd::api::frames`). Raw mode: arbitrary bytes decoded
//! whole and in arbitrary pieces (and byte by byte, up to 1 KiB) must give the same frames or
//! the same error. Built mode: the input describes data, zero and end frames, which are encoded
//! with the codec's encoders and must decode, in arbitrary pieces, to exactly those frames
//! (data frames carry valid crc32s here, which random bytes almost never do).
#![no_main]

use bytes::Bytes;
use forkd::api::frames::{decode_all, encode_data, encode_end, encode_zero, Decoder, Frame};
use libfuzzer_sys::fuzz_target;

const BS: usize = 4096;

/// Frames described by `spec`: 10 bytes each (kind, first, count, fill), at most 4 frames.
fn build(spec: &[u8]) -> Vec<Frame> {
    spec.chunks_exact(10)
        .take(4)
        .map(|c| {
            let first = u64::from(u32::from_le_bytes([c[1], c[2], c[3], c[4]]));
            match c[0] % 3 {
                0 => {
                    let blocks = 1 + usize::from(c[5] % 2);
                    let mut data = vec![c[6]; blocks * BS];
                    let at = usize::from(c[7]) * 16 % data.len();
                    data[at] = c[8];
                    data[blocks * BS - 1] = c[9];
                    Frame::Data { first, data: Bytes::from(data) }
                }
                1 => Frame::Zero { first, count: 1 + u32::from(u16::from_le_bytes([c[5], c[6]])) % 1024 },
                _ => Frame::End { scanned: first, changed: u64::from(c[5]) },
            }
        })
        .collect()
}

fn encode(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        match f {
            Frame::Data { first, data } => encode_data(*first, data, &mut out),
            Frame::Zero { first, count } => encode_zero(*first, *count, &mut out),
            Frame::End { scanned, changed } => encode_end(*scanned, *changed, &mut out),
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [mode, seed, rest @ ..] = data else { return };
    if mode & 1 == 0 {
        let whole = decode_all([rest]);
        let split = decode_all(forkd_fuzz::pieces(*seed, rest));
        assert_eq!(whole, split, "the same bytes in pieces decode differently");
        if rest.len() > 1024 {
            return;
        }
        // The decoder by hand, one byte at a time (short inputs: heads arriving in pieces): it
        // must end where decode_all did.
        let mut dec = Decoder::new();
        let mut failed = false;
        for b in rest.chunks(1) {
            let mut piece = b;
            loop {
                match dec.next(&mut piece) {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                break;
            }
        }
        assert_eq!(failed, whole.is_err(), "byte by byte fails as whole does");
    } else {
        let frames = build(rest);
        let bytes = encode(&frames);
        let decoded = decode_all(forkd_fuzz::pieces(*seed, &bytes)).expect("encoded frames decode");
        assert_eq!(decoded, frames, "encode then decode gives the frames back");
    }
});
