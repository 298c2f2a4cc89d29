//! Format detection by magic bytes (never by file name) and the decompressing readers.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A layer of the input: a compression, or the logical content under all compressions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Zstd,
    Xz,
    Gzip,
    Bzip2,
    AndroidSparse,
    Raw,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Zstd => "zstd",
            Format::Xz => "xz",
            Format::Gzip => "gzip",
            Format::Bzip2 => "bzip2",
            Format::AndroidSparse => "android-sparse",
            Format::Raw => "raw",
        }
    }

    pub fn is_compression(self) -> bool {
        matches!(
            self,
            Format::Zstd | Format::Xz | Format::Gzip | Format::Bzip2
        )
    }
}

/// How many leading bytes [`detect`] wants to see.
pub const MAGIC_LEN: usize = 6;

/// Identify a format from the first bytes of a stream. Fewer than [`MAGIC_LEN`] bytes is fine
/// (a tiny raw image).
pub fn detect(head: &[u8]) -> Format {
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
    Format::Raw
}

/// Read until `buf` is full or the stream ends; returns the bytes read. Retries EINTR.
pub fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
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
pub struct CountingReader<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> CountingReader<R> {
    pub fn new(inner: R, count: Arc<AtomicU64>) -> Self {
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
pub fn decoder(f: Format, r: Box<dyn Read + Send>) -> io::Result<Box<dyn Read + Send>> {
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
        Format::AndroidSparse | Format::Raw => r,
    })
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
        assert_eq!(detect(&[0; 6]), Format::Raw);
        assert_eq!(detect(&[0x1F]), Format::Raw);
        assert_eq!(detect(&[]), Format::Raw);
    }
}
