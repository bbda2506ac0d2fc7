//! `forkd::agent::changed_blocks::parse`, both formats (thin_delta XML when the text starts
//! with `<`, else `OFFSET LENGTH` lines), for an image size chosen by the first byte. What it
//! returns must be what it promises: ranges sorted, apart (adjacent ones merged), whole 4 KiB
//! blocks, none empty, none past the end; every error names a line from 1.
#![no_main]

use forkd::agent::changed_blocks::{parse, BLOCK};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let image_size = match mode % 4 {
        0 => 1 << 20,
        1 => 64 << 30,
        2 => u64::MAX / BLOCK * BLOCK,
        _ => u64::from(mode) * BLOCK,
    };
    let text = String::from_utf8_lossy(rest);
    match parse(&text, image_size) {
        Ok(ranges) => {
            let mut previous_end = None;
            for &(offset, length) in &ranges {
                assert!(length > 0, "an empty range");
                assert_eq!(offset % BLOCK, 0, "offset in whole blocks");
                assert_eq!(length % BLOCK, 0, "length in whole blocks");
                let end = offset.checked_add(length).expect("end fits");
                assert!(end <= image_size, "a range past the end");
                if let Some(p) = previous_end {
                    assert!(offset > p, "ranges sorted and apart");
                }
                previous_end = Some(end);
            }
        }
        Err(e) => assert!(e.line >= 1, "lines count from 1"),
    }
});
