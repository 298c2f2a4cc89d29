//! The image's own MBR/GPT (read from the head of an untrusted image for the board checks):
//! entries may point anywhere, counts and sizes may be absurd.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sbcflash::board::parttable;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = parttable::parse(data) {
        let _ = t.kind_name();
        for p in t.partitions() {
            let _ = p.end();
            let _ = p.kind.is_fat();
        }
    }
    // Every shipped board's image check on the same head.
    if let Ok(reg) = sbcflash::board::Registry::builtin() {
        for b in reg.boards().iter().take(4) {
            let m = b.default_medium();
            let _ = sbcflash::board::check_image(b, m, data);
        }
    }
});
