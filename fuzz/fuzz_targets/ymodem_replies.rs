//! What a YMODEM/XMODEM receiver (U-Boot's loady/loadx) answers: any byte sequence must end the
//! transfer with Done or Fail, never a panic or a send of data outside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sbcflash::console::ymodem::{Protocol, Sender, XStep};
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let proto = if data[0] & 1 == 0 { Protocol::Ymodem } else { Protocol::Xmodem };
    let file: Vec<u8> = (0..(data[0] as usize * 37)).map(|i| i as u8).collect();
    let mut s = Sender::new(proto, "fuzz.bin", file);
    let t0 = Instant::now();
    for (i, c) in data[1..].chunks(3).enumerate() {
        let now = t0 + Duration::from_millis(10 * i as u64);
        match s.step(c, now) {
            XStep::Done | XStep::Fail(_) => return,
            _ => {}
        }
    }
});
