//! Format detection by magic bytes (never by file name) and the decompressing readers.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A layer of the input: a compression, or the logical content under all compressions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Zstd,
    Xz,
    Gzip,
    Bzip2,
    AndroidSparse,
    /// A `.zip` archive: one member is the image (see [`super::zip`]).
    Zip,
    Raw,
}

impl Format {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Format::Zstd => "zstd",
            Format::Xz => "xz",
            Format::Gzip => "gzip",
            Format::Bzip2 => "bzip2",
            Format::AndroidSparse => "android-sparse",
            Format::Zip => "zip",
            Format::Raw => "raw",
        }
    }

    pub(crate) fn is_compression(self) -> bool {
        matches!(
            self,
            Format::Zstd | Format::Xz | Format::Gzip | Format::Bzip2
        )
    }
}

/// How many leading bytes [`detect`] wants to see.
pub(crate) const MAGIC_LEN: usize = 6;

/// Identify a format from the first bytes of a stream. Fewer than [`MAGIC_LEN`] bytes is fine
/// (a tiny raw image).
pub(crate) fn detect(head: &[u8]) -> Format {
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if head.len() >= 4 {
        let m = le32(head);
        // zstd frame, or a skippable frame (pzstd and seekable zstd start with one).
        if m == 0xFD2F_B528 || (0x184D_2A50..=0x184D_2A5F).contains(&m) {
            return Format::Zstd;
        }
        if m == android_sparse_image::HEADER_MAGIC {
            return Format::AndroidSparse;
        }
        if head.len() >= 6 && head[..6] == [0xFD, b'7', b'z', b'X', b'Z', 0] {
            return Format::Xz;
        }
        if head[..3] == *b"BZh" && (b'1'..=b'9').contains(&head[3]) {
            return Format::Bzip2;
        }
    }
    if head.len() >= 3 && head[..3] == [0x1F, 0x8B, 0x08] {
        return Format::Gzip;
    }
    if super::zip::is_zip(head) {
        return Format::Zip;
    }
    Format::Raw
}

/// Read until `buf` is full or the stream ends; returns the bytes read. Retries EINTR.
pub(crate) fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Counts bytes pulled from the underlying (compressed) file, so progress can be shown against
/// the file size while the logical size is still unknown. The counter is shared with the UI.
pub(crate) struct CountingReader<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> CountingReader<R> {
    pub(crate) fn new(inner: R, count: Arc<AtomicU64>) -> Self {
        CountingReader { inner, count }
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Wrap `r` in the decompressor for `f`. Multi-member gzip and multi-stream bzip2 are decoded
/// to the end (pigz/pbzip2 output), as are concatenated zstd frames and xz streams.
pub(crate) fn decoder(f: Format, r: Box<dyn Read + Send>) -> io::Result<Box<dyn Read + Send>> {
    const IN_BUF: usize = 1 << 20;
    Ok(match f {
        Format::Zstd => {
            let mut d =
                zstd::stream::read::Decoder::with_buffer(io::BufReader::with_capacity(IN_BUF, r))?;
            // Images made with `zstd --long` use windows up to 2 GiB; allow up to 128 MiB
            // (the memory cap matters more than rare huge windows).
            d.window_log_max(27)?;
            Box::new(d)
        }
        Format::Xz => {
            let stream = liblzma::stream::Stream::new_stream_decoder(
                u64::MAX,
                liblzma::stream::CONCATENATED,
            )
            .map_err(io::Error::other)?;
            Box::new(liblzma::bufread::XzDecoder::new_stream(
                io::BufReader::with_capacity(IN_BUF, r),
                stream,
            ))
        }
        Format::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(
            io::BufReader::with_capacity(IN_BUF, r),
        )),
        Format::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(
            io::BufReader::with_capacity(IN_BUF, r),
        )),
        Format::AndroidSparse | Format::Zip | Format::Raw => r,
    })
}

/// The decompressed size of a zstd file, from its frame headers (the zstd CLI records it
/// when compressing a file): walks every frame, skipping block by block, so that
/// multi-frame files (pzstd, `cat a.zst b.zst`) add up. `None` if any frame does not record
/// its size or the walk does not end exactly at the end of the file; the decoder then
/// reports what is wrong. The size is a claim of the file: the stream is checked against
/// it at its end.
pub(crate) fn zstd_content_size(f: &std::fs::File) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let len = f.metadata().ok()?.len();
    let read = |off: u64, b: &mut [u8]| f.read_exact_at(b, off).ok();
    let mut off = 0u64;
    let mut total = 0u64;
    while off < len {
        let mut m = [0u8; 4];
        read(off, &mut m)?;
        let magic = u32::from_le_bytes(m);
        if (0x184D_2A50..=0x184D_2A5F).contains(&magic) {
            let mut sz = [0u8; 4];
            read(off + 4, &mut sz)?;
            off = off.checked_add(8 + u64::from(u32::from_le_bytes(sz)))?;
            continue;
        }
        if magic != 0xFD2F_B528 {
            return None;
        }
        let mut d = [0u8; 1];
        read(off + 4, &mut d)?;
        let fhd = d[0];
        let single = fhd & 0x20 != 0;
        let checksum = fhd & 0x04 != 0;
        let did_len = [0u64, 1, 2, 4][usize::from(fhd & 3)];
        let fcs_len = match fhd >> 6 {
            0 if single => 1,
            0 => return None, // size not recorded
            1 => 2,
            2 => 4,
            _ => 8,
        };
        let fcs_off = off + 5 + u64::from(!single) + did_len;
        let mut v = [0u8; 8];
        read(fcs_off, &mut v[..fcs_len as usize])?;
        let mut size = u64::from_le_bytes(v);
        if fcs_len == 2 {
            size += 256;
        }
        total = total.checked_add(size)?;
        off = fcs_off + fcs_len;
        loop {
            let mut h = [0u8; 3];
            read(off, &mut h)?;
            let bh = u32::from(h[0]) | u32::from(h[1]) << 8 | u32::from(h[2]) << 16;
            let last = bh & 1 != 0;
            let bsize = u64::from(bh >> 3);
            off += 3 + match (bh >> 1) & 3 {
                0 | 2 => bsize,
                1 => 1,
                _ => return None,
            };
            if last {
                break;
            }
        }
        if checksum {
            off += 4;
        }
    }
    (off == len).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics() {
        assert_eq!(detect(&[0x28, 0xB5, 0x2F, 0xFD, 0, 0]), Format::Zstd);
        assert_eq!(detect(&[0x50, 0x2A, 0x4D, 0x18, 0, 0]), Format::Zstd);
        assert_eq!(detect(b"\xFD7zXZ\0"), Format::Xz);
        assert_eq!(detect(&[0x1F, 0x8B, 0x08, 0, 0, 0]), Format::Gzip);
        assert_eq!(detect(b"BZh91A"), Format::Bzip2);
        assert_eq!(detect(b"BZh0"), Format::Raw);
        assert_eq!(
            detect(&[0x3A, 0xFF, 0x26, 0xED, 1, 0]),
            Format::AndroidSparse
        );
        assert_eq!(detect(b"PK\x03\x04\x14\0"), Format::Zip);
        assert_eq!(detect(b"PK\x05\x06\0\0"), Format::Zip);
        assert_eq!(detect(b"PK\x01\x02\0\0"), Format::Raw);
        assert_eq!(detect(&[0; 6]), Format::Raw);
        assert_eq!(detect(&[0x1F]), Format::Raw);
        assert_eq!(detect(&[]), Format::Raw);
    }

    #[test]
    fn zstd_sizes_from_frame_headers() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.zst");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut z = zstd::bulk::compress(&data, 3).unwrap();
        // A streamed frame (no recorded size) makes the total unknown.
        let streamed = zstd::encode_all(&data[..], 3).unwrap();
        std::fs::write(&p, &streamed).unwrap();
        assert_eq!(zstd_content_size(&std::fs::File::open(&p).unwrap()), None);
        std::fs::write(&p, &z).unwrap();
        assert_eq!(
            zstd_content_size(&std::fs::File::open(&p).unwrap()),
            Some(300_000)
        );
        // Two frames, with a skippable frame between them.
        z.extend_from_slice(&[0x50, 0x2A, 0x4D, 0x18, 2, 0, 0, 0, 9, 9]);
        z.extend(zstd::bulk::compress(b"tail", 1).unwrap());
        std::fs::write(&p, &z).unwrap();
        assert_eq!(
            zstd_content_size(&std::fs::File::open(&p).unwrap()),
            Some(300_004)
        );
        // Truncated: unknown.
        z.truncate(z.len() - 3);
        std::fs::write(&p, &z).unwrap();
        assert_eq!(zstd_content_size(&std::fs::File::open(&p).unwrap()), None);
    }
}
