//! Whatever a serial console sends (line noise, wrong baud rate, escape sequences, a hostile
//! board): the expect engine and the U-Boot/Linux state machines on top must never panic,
//! whatever the bytes and however they are split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sbcflash::console::expect::Expect;
use sbcflash::console::linux::{Follow, LinuxConfig};
use sbcflash::console::uboot::{self, Interrupt, ResetWatch, UBootConfig};
use sbcflash::console::{Machine, Step};
use std::time::{Duration, Instant};

fn drive<M: Machine>(m: &mut M, data: &[u8]) {
    let t0 = Instant::now();
    let mut ex = Expect::new();
    // First byte: chunk size; each chunk arrives 37 ms after the previous one.
    let chunk = 1 + data.first().copied().unwrap_or(0) as usize;
    for (i, c) in data.chunks(chunk).enumerate() {
        let now = t0 + Duration::from_millis(37 * i as u64);
        ex.feed(c, now);
        for _ in 0..8 {
            match m.step(&mut ex, now) {
                Step::Send(_) | Step::Stage(_) | Step::Nudge { .. } => continue,
                Step::Wait(_) => break,
                Step::Done(_) | Step::Fail(_) => return,
            }
        }
    }
    let _ = ex.tail(5);
    let _ = ex.partial();
    let _ = ex.looks_like_garbage();
    let _ = ex.ends_with_prompt("=> ");
}

fuzz_target!(|data: &[u8]| {
    let ucfg = UBootConfig::default();
    drive(&mut Interrupt::new(&ucfg, ResetWatch::default(), 1), data);
    drive(&mut uboot::command(&ucfg, "version", 2), data);
    let lcfg = LinuxConfig {
        ip_marker: regex::Regex::new(r"IP: (\S+)").ok(),
        ..LinuxConfig::default()
    };
    drive(&mut Follow::new(&lcfg, ResetWatch::default()), data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = sbcflash::console::linux::ip_from_text(text);
        let _ = sbcflash::console::linux::ip_from_json(text);
        let _ = sbcflash::console::load::parse_crc32_output(text);
        let _ = sbcflash::console::end_marker(text, 3);
    }
});
