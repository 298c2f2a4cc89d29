//! Rockchip merged loader files (`rk3588_spl_loader_v*.bin`, downloaded or user-provided): the
//! header and entry table may point anywhere; parsing must return Ok or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sbcflash::usb::rkloader::Loader;

fuzz_target!(|data: &[u8]| {
    let _ = Loader::from_merged("fuzz_loader.bin", data);
});
