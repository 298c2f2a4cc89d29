//! Android sparse images: header and chunk parsing through the extent stream. Chunks may claim
//! anything (sizes that overflow, more blocks than the header); the source must stop with an
//! error or produce a gap-free stream that adds up to the header's size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sbcflash::image::sparse::SparseSource;
use sbcflash::image::ExtentSource;

fuzz_target!(|data: &[u8]| {
    let r = Box::new(std::io::Cursor::new(data.to_vec()));
    let Ok(mut s) = SparseSource::new(r, "fuzz.simg", "") else {
        return;
    };
    let hint = s.size_hint();
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = 0u64;
    // Bounded: a header may describe terabytes of Skip/Zero, which is fine as long as it
    // is reported as such; data extents are limited by the input size.
    for _ in 0..100_000 {
        match s.next_extent(&mut buf) {
            Ok(Some(e)) => {
                assert_eq!(e.offset, pos, "gap or overlap in the extent stream");
                pos = e.offset.checked_add(e.len).expect("extent end overflows");
            }
            Ok(None) => {
                if let Some(h) = hint {
                    assert_eq!(pos, h, "stream ended before/after the header's size");
                }
                return;
            }
            Err(_) => return,
        }
    }
});
