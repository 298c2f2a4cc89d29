//! Regenerates `src/image/zero-units.bin`: the blake3 chaining values of 4 MiB all-zero
//! subtrees at each 4 MiB-aligned offset of the first 32 GiB, which let the logical digest
//! take a hole's units from a table instead of hashing its zeroes (see `image/digest.rs`).
//!
//! `cargo run --release --example zero_unit_cvs > src/image/zero-units.bin`
//! (`cargo test --lib image::digest` checks every entry against blake3.)

use blake3::hazmat::HasherExt;
use std::io::Write;

const UNIT: usize = 4 << 20;
const UNITS: u64 = 8192;

fn main() -> std::io::Result<()> {
    let zeros = vec![0u8; UNIT];
    let mut out = std::io::stdout().lock();
    for i in 0..UNITS {
        let mut h = blake3::Hasher::new();
        h.set_input_offset(i * UNIT as u64);
        h.update(&zeros);
        out.write_all(&h.finalize_non_root())?;
    }
    out.flush()
}
