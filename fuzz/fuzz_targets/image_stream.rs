//! Any byte stream as an image (a download, a local file): magic-byte detection, the
//! decompressors (zstd, xz, gzip, bzip2) and Android sparse under them, through the extent
//! pipeline. Must end in Ok or an error, with a gap-free stream; output is bounded so that a
//! decompression bomb only costs time up to the cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sbcflash::image::open::from_reader;

const MAX_LOGICAL: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    let r = Box::new(std::io::Cursor::new(data.to_vec()));
    let Ok(mut s) = from_reader(r, "fuzz.img", None, None) else {
        return;
    };
    let _ = s.describe();
    let mut buf = vec![0u8; 256 * 1024];
    let mut pos = 0u64;
    let mut data_bytes = 0u64;
    loop {
        match s.next_extent(&mut buf) {
            Ok(Some(e)) => {
                assert_eq!(e.offset, pos, "gap or overlap in the extent stream");
                pos = e.offset.checked_add(e.len).expect("extent end overflows");
                if matches!(e.kind, sbcflash::image::ExtentKind::Data) {
                    assert!(e.len as usize <= buf.len());
                    data_bytes += e.len;
                }
                if data_bytes > MAX_LOGICAL || pos > (1 << 50) {
                    return;
                }
            }
            Ok(None) | Err(_) => return,
        }
    }
});
