//! Finding all-zero blocks quickly, and a static zero buffer for hashing zero runs.

/// Granularity of zero detection while scanning data. Large enough that per-block overhead
/// vanishes and zero extents stay aligned for discards, small enough to catch a filesystem's
/// empty metadata areas.
pub(crate) const ZERO_BLOCK: usize = 64 * 1024;

/// A zeroed buffer living in .bss (no page is touched until read), used to feed zero runs to
/// hashers without allocating.
pub(crate) static ZEROS: [u8; ZEROS_LEN] = [0; ZEROS_LEN];
pub(crate) const ZEROS_LEN: usize = 4 << 20;

/// True if every byte of `b` is zero.
///
/// OR-folds 8-byte lanes over 4 KiB pieces (the loop has no early exit inside a piece, so the
/// compiler vectorizes it) and stops at the first piece that is not zero.
pub(crate) fn is_zero(b: &[u8]) -> bool {
    for piece in b.chunks(4096) {
        let mut acc = 0u64;
        let mut lanes = piece.chunks_exact(8);
        for l in &mut lanes {
            let mut w = [0u8; 8];
            w.copy_from_slice(l);
            acc |= u64::from_ne_bytes(w);
        }
        for &x in lanes.remainder() {
            acc |= u64::from(x);
        }
        if acc != 0 {
            return false;
        }
    }
    true
}

/// End of the zero-detection block that contains `pos` (the next multiple of [`ZERO_BLOCK`]).
pub(crate) fn block_end(pos: u64) -> u64 {
    (pos / ZERO_BLOCK as u64 + 1) * ZERO_BLOCK as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_edges() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 13]));
        let mut v = vec![0u8; 3 * 4096 + 7];
        assert!(is_zero(&v));
        for i in [0, 7, 4095, 4096, 3 * 4096 + 6] {
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
            v[i] = 0;
        }
        assert!(ZEROS.iter().all(|&b| b == 0));
    }

    #[test]
    fn block_ends() {
        assert_eq!(block_end(0), 65536);
        assert_eq!(block_end(65535), 65536);
        assert_eq!(block_end(65536), 131072);
    }
}
