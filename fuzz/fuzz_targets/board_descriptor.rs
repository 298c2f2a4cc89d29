//! Board and SoC descriptors (user files in ~/.config/sbcflash/boards, --boards-dir): parse
//! must return Ok or a located error, never panic; an accepted descriptor's file names must not
//! escape a directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sbcflash::board::registry::{parse_board, parse_soc};
use sbcflash::board::Origin;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let origin = Origin::File("fuzz.toml".into());
    if let Err(e) = parse_board(&origin, text) {
        assert!(e.to_string().contains("fuzz.toml"), "{e}");
    }
    if let Err(e) = parse_soc(&origin, text) {
        assert!(e.to_string().contains("fuzz.toml"), "{e}");
    }
});
