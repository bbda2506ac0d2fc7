//! `nbd::request::decode` on arbitrary bytes, compact and extended headers, with a small and
//! the default maximum payload: a decoded header encodes back to the bytes it came from, the
//! header length is the style's, and a header is never decoded from fewer bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::request::decode;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, buf)) = data.split_first() else { return };
    let extended = mode & 1 != 0;
    let max_payload: u64 = if mode & 2 != 0 { 4096 } else { 32 << 20 };
    match decode(buf, extended, max_payload) {
        Ok(Some((req, n))) => {
            assert_eq!(n, if extended { 32 } else { 28 }, "header length");
            let encoded = req.encode(extended).expect("a decoded header encodes");
            assert_eq!(encoded, buf[..n], "decode then encode gives the header back");
            assert!(req.payload_len <= req.length, "payload within the length");
            if !req.too_large && extended {
                assert!(req.payload_len <= max_payload, "payload within the maximum");
            }
            if n > 4 {
                assert!(
                    matches!(decode(&buf[..n - 1], extended, max_payload), Ok(None)),
                    "a header short of one byte is incomplete"
                );
            }
        }
        Ok(None) => assert!(buf.len() < if extended { 32 } else { 28 }, "a whole header decodes"),
        Err(_) => {}
    }
});
