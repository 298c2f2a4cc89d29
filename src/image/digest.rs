//! blake3 of the logical image, and the b3sum sidecar format.
//!
//! Rule: the digest of an image is the blake3 of its logical bytes, where `Data` extents are
//! hashed as they are and `Zero` and `Skip` extents are hashed as that many zero bytes. For a
//! raw image whose bmap gaps are holes (what `bmaptool create` describes) this equals
//! `b3sum image.img`, so a digest published next to an image can be checked with stock tools.

use super::zero::{ZEROS, ZEROS_LEN};
use super::{Extent, ExtentKind, ImageError};
use std::path::{Path, PathBuf};

/// Below this, `update_rayon` costs more in coordination than it gains.
const RAYON_MIN: usize = 256 * 1024;

/// Hashes an extent stream. Zero runs dominate for sparse images (a 4 GiB image with 1.3 GiB
/// mapped hashes 2.7 GiB of zeroes), so they are fed from a static zero buffer through
/// blake3's multi-threaded `update_rayon`.
pub struct LogicalHasher {
    h: blake3::Hasher,
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
            h: blake3::Hasher::new(),
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

    pub(crate) fn update(&mut self, data: &[u8]) {
        if self.rayon && data.len() >= RAYON_MIN {
            self.h.update_rayon(data);
        } else {
            self.h.update(data);
        }
        self.len += data.len() as u64;
    }

    pub(crate) fn update_zeros(&mut self, mut n: u64) {
        while n > 0 {
            let k = n.min(ZEROS_LEN as u64) as usize;
            self.update(&ZEROS[..k]);
            n -= k as u64;
        }
    }

    /// Bytes hashed so far (the logical offset reached).
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub fn finalize(&self) -> blake3::Hash {
        self.h.finalize()
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
