//! blake3 of the logical image, and the b3sum sidecar format.
//!
//! Rule: the digest of an image is the blake3 of its logical bytes, where `Data` extents are
//! hashed as they are and `Zero` and `Skip` extents are hashed as that many zero bytes. For a
//! raw image whose bmap gaps are holes (what `bmaptool create` describes) this equals
//! `b3sum image.img`, so a digest published next to an image can be checked with stock tools.

use super::zero::{ZEROS, ZEROS_LEN};
use super::{Extent, ExtentKind, ImageError};
use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};
use std::path::{Path, PathBuf};

/// Below this, `update_rayon` costs more in coordination than it gains.
const RAYON_MIN: usize = 256 * 1024;

/// The digest is assembled from subtrees of this size (a power of two of blake3's 1 KiB
/// chunks, so every unit at a multiple of it is a whole subtree of the standard tree).
const UNIT: u64 = 4 << 20;

/// blake3 chaining values of an all-zero [`UNIT`] at unit index 0, 1, 2, ... (the first
/// 32 GiB), made by `examples/zero_unit_cvs.rs` and checked entry by entry by a unit test.
/// A chunk's chaining value depends on its position, so a hole cannot be hashed once and
/// reused; but its units can be looked up: a 4 GiB image with 1.3 GiB mapped then hashes
/// 1.3 GiB, not 4 GiB, and the digest stays the plain blake3 of the logical bytes.
static ZERO_UNITS: &[u8; 262_144] = include_bytes!("zero-units.bin");

fn zero_unit_cv(index: u64) -> Option<ChainingValue> {
    let at = usize::try_from(index).ok()?.checked_mul(32)?;
    ZERO_UNITS.get(at..at + 32)?.try_into().ok()
}

type ChainingValue = [u8; 32];

/// The unit being filled: hashed from bytes, or an all-zero unit taken from the table.
enum Open {
    Hashing(Box<blake3::Hasher>, u64),
    Zero(ChainingValue),
}

/// Hashes an extent stream. Each [`UNIT`] of the logical image is a subtree hashed on its
/// own and merged into the root as blake3's own hasher would; all-zero units of holes come
/// from [`ZERO_UNITS`] (zeroes past the table are hashed, through `update_rayon` unless
/// [`LogicalHasher::single_threaded`]). Equal to `b3sum` of the logical bytes.
pub struct LogicalHasher {
    open: Open,
    /// Chaining values of finished subtrees, merged where whole (blake3's stack).
    stack: Vec<ChainingValue>,
    /// Units pushed onto `stack`.
    units: u64,
    len: u64,
    rayon: bool,
}

impl Default for LogicalHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl LogicalHasher {
    pub fn new() -> Self {
        LogicalHasher {
            open: Open::Hashing(Box::default(), 0),
            stack: Vec::new(),
            units: 0,
            len: 0,
            rayon: true,
        }
    }

    /// A hasher that stays on the calling thread (SIMD only, no rayon): for pipelines that
    /// already keep every core busy (decompression, range checksums, the kernel's I/O), where
    /// rayon's spinning workers only steal time from the critical path.
    pub(crate) fn single_threaded() -> Self {
        LogicalHasher {
            rayon: false,
            ..Self::new()
        }
    }

    /// Feed one extent; `data` is the source's buffer for `Data` extents (`buf[..ext.len]`),
    /// ignored otherwise. Extents must come in order, without gaps.
    pub fn update_extent(&mut self, ext: &Extent, data: &[u8]) {
        debug_assert_eq!(ext.offset, self.len, "extents out of order");
        match ext.kind {
            ExtentKind::Data => self.update(&data[..ext.len as usize]),
            ExtentKind::Zero | ExtentKind::Skip => self.update_zeros(ext.len),
        }
    }

    /// Room left in the open unit; a full unit is closed first (only now is it known
    /// not to be the last, whose chaining value may have to be the root).
    fn room(&mut self) -> u64 {
        let used = match &self.open {
            Open::Hashing(_, n) => *n,
            Open::Zero(_) => UNIT,
        };
        if used < UNIT {
            return UNIT - used;
        }
        let cv = match &self.open {
            Open::Hashing(h, _) => h.finalize_non_root(),
            Open::Zero(cv) => *cv,
        };
        self.units += 1;
        let (mut cv, mut t) = (cv, self.units);
        while t & 1 == 0 {
            if let Some(left) = self.stack.pop() {
                cv = merge_subtrees_non_root(&left, &cv, Mode::Hash);
            }
            t >>= 1;
        }
        self.stack.push(cv);
        let mut h = Box::<blake3::Hasher>::default();
        h.set_input_offset(self.len);
        self.open = Open::Hashing(h, 0);
        UNIT
    }

    fn hash_into_unit(&mut self, data: &[u8]) {
        if let Open::Hashing(h, n) = &mut self.open {
            if self.rayon && data.len() >= RAYON_MIN {
                h.update_rayon(data);
            } else {
                h.update(data);
            }
            *n += data.len() as u64;
        }
        self.len += data.len() as u64;
    }

    pub(crate) fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = (self.room() as usize).min(data.len());
            self.hash_into_unit(&data[..n]);
            data = &data[n..];
        }
    }

    pub(crate) fn update_zeros(&mut self, mut n: u64) {
        while n > 0 {
            let room = self.room();
            if room == UNIT && n >= UNIT {
                if let Some(cv) = zero_unit_cv(self.len / UNIT) {
                    self.open = Open::Zero(cv);
                    self.len += UNIT;
                    n -= UNIT;
                    continue;
                }
            }
            let k = n.min(room).min(ZEROS_LEN as u64) as usize;
            self.hash_into_unit(&ZEROS[..k]);
            n -= k as u64;
        }
    }

    /// Bytes hashed so far (the logical offset reached).
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub fn finalize(&self) -> blake3::Hash {
        if self.stack.is_empty() {
            // One unit or less: its subtree is the whole tree, finalized as the root.
            return match &self.open {
                Open::Hashing(h, _) => h.finalize(),
                Open::Zero(_) => {
                    let mut h = blake3::Hasher::new();
                    h.update(&ZEROS[..UNIT as usize]);
                    h.finalize()
                }
            };
        }
        // Past the first unit the open one holds at least one byte (units close lazily).
        let mut cv = match &self.open {
            Open::Hashing(h, _) => h.finalize_non_root(),
            Open::Zero(cv) => *cv,
        };
        for left in self.stack[1..].iter().rev() {
            cv = merge_subtrees_non_root(left, &cv, Mode::Hash);
        }
        merge_subtrees_root(&self.stack[0], &cv, Mode::Hash)
    }
}

/// Parse a digest given by a user (`--blake3 HEX`): 64 hex digits, case-insensitive.
pub(crate) fn parse_hex(s: &str) -> Result<blake3::Hash, String> {
    let t = s.trim();
    if t.len() != 64 {
        return Err(format!(
            "a blake3 digest is 64 hex digits, got {} characters: {t:?}",
            t.len()
        ));
    }
    if let Some((i, c)) = t.char_indices().find(|(_, c)| !c.is_ascii_hexdigit()) {
        return Err(format!(
            "not a hex digit at position {}: {c:?} in {t:?}",
            i + 1
        ));
    }
    blake3::Hash::from_hex(t.to_ascii_lowercase()).map_err(|e| format!("{t:?}: {e}"))
}

/// The sidecar path for an image: `IMAGE.blake3`.
pub(crate) fn sidecar_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_os_string();
    s.push(".blake3");
    PathBuf::from(s)
}

/// Read the digest for `image` from a b3sum-format file (`HEX  NAME` lines, `HEX *NAME` for
/// binary mode, `#` comments). A line whose name matches the image's file name wins; a file
/// with a single line is taken whatever its name (images get renamed after download).
pub(crate) fn read_sidecar(sidecar: &Path, image: &Path) -> Result<blake3::Hash, ImageError> {
    let name = sidecar.display().to_string();
    let text = std::fs::read_to_string(sidecar).map_err(|source| ImageError::Io {
        path: name.clone(),
        source,
    })?;
    let want = image.file_name().map(|n| n.to_string_lossy().to_string());
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim_end();
        if l.trim().is_empty() || l.trim_start().starts_with('#') {
            continue;
        }
        let bad = |msg: String| ImageError::Invalid {
            path: name.clone(),
            msg: format!("line {}: {msg}", i + 1),
        };
        let (hex, rest) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
        let hash = parse_hex(hex).map_err(bad)?;
        let file = rest.trim_start().trim_start_matches('*').to_string();
        entries.push((hash, file));
    }
    if let Some(w) = &want {
        for (h, f) in &entries {
            let base = Path::new(f)
                .file_name()
                .map(|n| n.to_string_lossy().to_string());
            if base.as_deref() == Some(w.as_str()) {
                return Ok(*h);
            }
        }
    }
    match entries.as_slice() {
        [(h, _)] => Ok(*h),
        [] => Err(ImageError::Invalid {
            path: name,
            msg: "no digest line found".into(),
        }),
        _ => Err(ImageError::Invalid {
            path: name,
            msg: format!(
                "{} digest lines and none names {}",
                entries.len(),
                want.unwrap_or_default()
            ),
        }),
    }
}

/// One b3sum line for `image` (its file name, as `b3sum` prints for a relative path).
pub(crate) fn sidecar_line(hash: &blake3::Hash, image: &Path) -> String {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| image.display().to_string());
    format!("{}  {}\n", hash.to_hex(), name)
}

/// Write `IMAGE.blake3` next to the image (atomically: temp file then rename).
pub(crate) fn write_sidecar(hash: &blake3::Hash, image: &Path) -> Result<PathBuf, ImageError> {
    let path = sidecar_path(image);
    let tmp = {
        let mut s = path.as_os_str().to_os_string();
        s.push(".tmp");
        PathBuf::from(s)
    };
    let io = |source| ImageError::Io {
        path: path.display().to_string(),
        source,
    };
    std::fs::write(&tmp, sidecar_line(hash, image)).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(path)
}

/// Hash a whole extent source (used by `sbcflash hash`). `buf` is the Data buffer to use.
pub(crate) fn hash_source(
    src: &mut dyn super::ExtentSource,
    buf: &mut [u8],
) -> Result<(blake3::Hash, u64), ImageError> {
    let mut h = LogicalHasher::new();
    while let Some(e) = src.next_extent(buf)? {
        h.update_extent(&e, buf);
    }
    Ok((h.finalize(), h.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_hash_like_zero_bytes() {
        let n = ZEROS_LEN as u64 * 2 + 12345;
        let mut h = LogicalHasher::new();
        h.update(b"abc");
        h.update_zeros(n);
        h.update(b"xyz");
        let mut v = b"abc".to_vec();
        v.resize(3 + n as usize, 0);
        v.extend_from_slice(b"xyz");
        assert_eq!(h.finalize(), blake3::hash(&v));
        assert_eq!(h.len(), v.len() as u64);
    }

    /// Feeds `parts` (`Ok(bytes)` or `Err(zero count)`) to a hasher and compares with
    /// blake3 of the same bytes laid out flat.
    fn same_as_flat(parts: &[Result<Vec<u8>, u64>], rayon: bool) {
        let mut h = if rayon {
            LogicalHasher::new()
        } else {
            LogicalHasher::single_threaded()
        };
        let mut flat = Vec::new();
        for p in parts {
            match p {
                Ok(b) => {
                    h.update(b);
                    flat.extend_from_slice(b);
                }
                Err(n) => {
                    h.update_zeros(*n);
                    flat.resize(flat.len() + *n as usize, 0);
                }
            }
        }
        assert_eq!(h.len(), flat.len() as u64);
        let lens: Vec<String> = parts
            .iter()
            .map(|p| match p {
                Ok(b) => format!("data {}", b.len()),
                Err(n) => format!("zeros {n}"),
            })
            .collect();
        assert_eq!(h.finalize(), blake3::hash(&flat), "{lens:?}");
    }

    #[test]
    fn units_and_table_zeros_hash_like_flat_bytes() {
        let u = UNIT as usize;
        let data = |n: usize| -> Vec<u8> { (0..n).map(|i| (i * 7 + n) as u8 | 1).collect() };
        let cases: Vec<Vec<Result<Vec<u8>, u64>>> = vec![
            vec![],
            vec![Ok(data(1))],
            vec![Ok(data(1024))],
            vec![Ok(data(1025))],
            vec![Ok(data(u - 1))],
            vec![Ok(data(u))],
            vec![Ok(data(u + 1))],
            vec![Err(UNIT)],
            vec![Err(UNIT - 1)],
            vec![Err(UNIT + 1)],
            vec![Err(3 * UNIT)],
            vec![Err(2 * UNIT), Ok(data(5))],
            vec![Ok(data(5)), Err(3 * UNIT)],
            vec![Ok(data(u)), Err(UNIT)],
            vec![Ok(data(u)), Err(UNIT), Ok(data(u)), Err(4 * UNIT + 4096)],
            vec![Err(UNIT / 2), Ok(data(u)), Err(5 * UNIT / 2), Ok(data(3))],
            vec![Ok(data(3 * u + 100)), Err(7 * UNIT - 100), Ok(data(u))],
        ];
        for c in &cases {
            same_as_flat(c, false);
            same_as_flat(c, true);
        }
    }

    /// Every table entry is the chaining value of that all-zero unit (32 GiB of blake3: the
    /// table is data in the binary, and a wrong entry would be a wrong digest).
    #[test]
    fn zero_unit_table_is_blake3_of_zero_units() {
        let n = ZERO_UNITS.len() as u64 / 32;
        assert_eq!(n, 8192);
        let check = |from: u64, to: u64| {
            for i in from..to {
                let mut h = blake3::Hasher::new();
                h.set_input_offset(i * UNIT);
                h.update(&ZEROS[..UNIT as usize]);
                assert_eq!(Some(h.finalize_non_root()), zero_unit_cv(i), "entry {i}");
            }
        };
        std::thread::scope(|s| {
            let half = n / 2;
            s.spawn(move || check(0, half));
            check(half, n);
        });
        assert_eq!(zero_unit_cv(n), None);
    }

    #[test]
    fn hex_parsing() {
        let h = blake3::hash(b"x");
        assert_eq!(parse_hex(&h.to_hex()).unwrap(), h);
        assert_eq!(parse_hex(&h.to_hex().to_uppercase()).unwrap(), h);
        assert!(parse_hex("abc").unwrap_err().contains("64 hex digits"));
        let mut bad = h.to_hex().to_string();
        bad.replace_range(10..11, "g");
        assert!(parse_hex(&bad).unwrap_err().contains("position 11"));
    }

    #[test]
    fn sidecar_roundtrip_and_selection() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("a.img");
        let h = blake3::hash(b"a");
        let p = write_sidecar(&h, &img).unwrap();
        assert_eq!(p, d.path().join("a.img.blake3"));
        assert_eq!(read_sidecar(&p, &img).unwrap(), h);
        // Renamed image, single line: still accepted.
        assert_eq!(read_sidecar(&p, &d.path().join("b.img")).unwrap(), h);
        // Several lines: the matching name wins, otherwise an error naming the file.
        let h2 = blake3::hash(b"b");
        let multi = d.path().join("SUMS");
        std::fs::write(
            &multi,
            format!("# sums\n{}  x/a.img\n{} *b.img\n", h.to_hex(), h2.to_hex()),
        )
        .unwrap();
        assert_eq!(read_sidecar(&multi, &d.path().join("b.img")).unwrap(), h2);
        let e = read_sidecar(&multi, &d.path().join("c.img")).unwrap_err();
        assert!(e.to_string().contains("SUMS"), "{e}");
        std::fs::write(&multi, "zz  a.img\n").unwrap();
        let e = read_sidecar(&multi, &img).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }
}
