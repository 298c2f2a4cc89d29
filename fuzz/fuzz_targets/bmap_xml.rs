//! bmap XML (a sidecar file downloaded or given by the user): parse must return Ok or an error
//! naming the file, never panic; what it accepts must be self-consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sbcflash::image::bmap::Bmap;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.bmap");
    match Bmap::parse(data, path) {
        Ok(b) => {
            // Accepted ranges lie inside the image and do not overlap.
            let _ = b.describe();
            let mapped = b.mapped_bytes();
            assert!(mapped <= b.image_size, "maps {mapped} of {}", b.image_size);
            let mut prev_end = 0u64;
            for r in &b.ranges {
                assert!(r.start >= prev_end, "overlapping or unsorted ranges");
                assert!(r.end <= b.image_size, "range past the image");
                prev_end = r.end;
            }
        }
        Err(e) => assert!(e.to_string().contains("fuzz.bmap"), "{e}"),
    }
});
