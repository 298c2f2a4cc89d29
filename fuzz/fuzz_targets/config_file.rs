//! The user's config file: arbitrary text must give Ok or a located error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = sbcflash::config::check_text(std::path::Path::new("fuzz.toml"), text) {
            // Errors name the file and a line:col.
            let s = e.to_string();
            assert!(s.starts_with("fuzz.toml:"), "{s}");
        }
    }
});
