//! Data a bmap leaves out: bytes of the image inside the ranges its bmap calls unmapped.
//!
//! A write through a bmap skips those ranges by design (they were holes when the bmap was
//! made). A digest, though, claims to describe the image: `hash` must not print one that
//! silently treats real data as zeroes because a stale bmap says so.

use super::open::{open_image, OpenOptions};
use super::scan::READ_BUF;
use super::{ExtentKind, ImageError};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Non-zero data found in ranges a bmap marks unmapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unmapped {
    /// Logical offset of the first non-zero byte.
    pub(crate) first: u64,
    /// Bytes in 4 KiB blocks that hold any non-zero byte.
    pub(crate) bytes: u64,
}

/// Looks for non-zero bytes of the logical image `path` inside `skips` (sorted, disjoint
/// `(offset, len)` ranges). A raw file is read only where it has data (holes are skipped with
/// SEEK_DATA); a compressed one is decoded again without its bmap.
pub(crate) fn find(
    path: &Path,
    raw: bool,
    skips: &[(u64, u64)],
) -> Result<Option<Unmapped>, ImageError> {
    if skips.is_empty() {
        return Ok(None);
    }
    let mut found = Found::default();
    if raw {
        let io = |source| ImageError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let mut buf = vec![0u8; READ_BUF];
        for &(start, len) in skips {
            let end = start + len;
            let mut pos = start;
            while pos < end {
                let Some(data) = seek(&file, pos, libc::SEEK_DATA).map_err(io)? else {
                    break;
                };
                if data >= end {
                    break;
                }
                let hole = seek(&file, data, libc::SEEK_HOLE)
                    .map_err(io)?
                    .unwrap_or(end)
                    .min(end);
                let mut at = data;
                while at < hole {
                    let n = ((hole - at) as usize).min(buf.len());
                    file.read_exact_at(&mut buf[..n], at).map_err(io)?;
                    found.scan(at, &buf[..n]);
                    at += n as u64;
                }
                pos = hole;
            }
        }
        return Ok(found.result());
    }
    let mut opened = open_image(
        path,
        &OpenOptions {
            no_bmap: true,
            ..Default::default()
        },
    )?;
    let mut buf = super::buffer::AlignedBuf::new(READ_BUF);
    let mut i = 0;
    while let Some(e) = opened.source.next_extent(&mut buf)? {
        if e.kind != ExtentKind::Data {
            continue;
        }
        while i < skips.len() && skips[i].0 + skips[i].1 <= e.offset {
            i += 1;
        }
        let mut j = i;
        while j < skips.len() && skips[j].0 < e.end() {
            let a = skips[j].0.max(e.offset);
            let b = (skips[j].0 + skips[j].1).min(e.end());
            found.scan(a, &buf[(a - e.offset) as usize..(b - e.offset) as usize]);
            j += 1;
        }
    }
    Ok(found.result())
}

#[derive(Default)]
struct Found {
    first: Option<u64>,
    bytes: u64,
}

impl Found {
    fn scan(&mut self, offset: u64, data: &[u8]) {
        for (k, block) in data.chunks(4096).enumerate() {
            if let Some(p) = block.iter().position(|&b| b != 0) {
                let at = offset + (k * 4096 + p) as u64;
                self.first = Some(self.first.map_or(at, |f| f.min(at)));
                self.bytes += block.len() as u64;
            }
        }
    }

    fn result(&self) -> Option<Unmapped> {
        self.first.map(|first| Unmapped {
            first,
            bytes: self.bytes,
        })
    }
}

/// lseek with SEEK_DATA/SEEK_HOLE; `None` when there is no more data (ENXIO).
fn seek(file: &std::fs::File, pos: u64, whence: i32) -> std::io::Result<Option<u64>> {
    let off = libc::off_t::try_from(pos).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: lseek on a valid fd owned by `file`; no memory is touched.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_data_in_skipped_ranges_of_a_raw_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i.img");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        f.write_all_at(&[0u8; 4096], 64 << 10).unwrap(); // data, but zeroes
        f.write_all_at(b"x", (512 << 10) + 7).unwrap();
        // Mapped: the first 4 KiB. Everything else is "unmapped".
        let skips = [(4096, (1 << 20) - 4096)];
        assert_eq!(
            find(&p, true, &skips).unwrap(),
            Some(Unmapped {
                first: (512 << 10) + 7,
                bytes: 4096
            })
        );
        assert_eq!(find(&p, true, &[(4096, 256 << 10)]).unwrap(), None);
        assert_eq!(
            find(&p, false, &skips).unwrap().map(|u| u.first),
            Some((512 << 10) + 7)
        );
    }
}
