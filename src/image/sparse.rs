//! Android sparse images (`img2simg` output), read as a stream so they also work compressed.
//!
//! Header and chunk-header decoding use `android-sparse-image`; everything it leaves to the
//! caller is checked here, because its sizes come straight from the file: block size a
//! non-zero multiple of 4, each chunk's `total_sz` consistent with its type and block count,
//! chunks never running past the header's block count, and the chunks covering exactly that
//! count. Errors name the file offset of the chunk header at fault.

use super::detect::read_full;
use super::{Extent, ExtentKind, ExtentSource, ImageError};
use android_sparse_image::{
    ChunkHeader, ChunkType, FileHeader, CHUNK_HEADER_BYTES_LEN, FILE_HEADER_BYTES_LEN,
};
use std::io::Read;

enum Current {
    Raw { left: u64 },
    Fill { pattern: [u8; 4], left: u64 },
}

pub struct SparseSource {
    name: String,
    r: Box<dyn Read + Send>,
    block_size: u64,
    total: u64,
    chunks_left: u32,
    chunks: u32,
    /// Offset in the sparse stream (bytes consumed), for messages.
    file_off: u64,
    /// Logical offset reached.
    pos: u64,
    cur: Option<Current>,
    /// CRC32 of the logical bytes so far (Skip as zeroes), checked against CRC32 chunks.
    crc: u32,
    finished: bool,
    outer: String,
}

impl SparseSource {
    /// `outer`: description of the layers around it ("zstd", or "" for a plain file).
    pub fn new(
        mut r: Box<dyn Read + Send>,
        name: &str,
        outer: &str,
    ) -> Result<SparseSource, ImageError> {
        let mut hb = [0u8; FILE_HEADER_BYTES_LEN];
        let n = read_full(r.as_mut(), &mut hb).map_err(|e| io_err(name, e, 0))?;
        let corrupt = |offset: u64, msg: String| ImageError::Corrupt {
            path: name.to_string(),
            offset,
            msg,
        };
        if n < hb.len() {
            return Err(corrupt(
                0,
                format!("Android sparse header truncated ({n} of 28 bytes)"),
            ));
        }
        let h = FileHeader::from_bytes(&hb)
            .map_err(|e| corrupt(0, format!("bad Android sparse header: {e}")))?;
        if h.block_size == 0 || h.block_size % 4 != 0 {
            return Err(corrupt(
                12,
                format!(
                    "Android sparse block size {} is not a non-zero multiple of 4",
                    h.block_size
                ),
            ));
        }
        Ok(SparseSource {
            name: name.to_string(),
            r,
            block_size: u64::from(h.block_size),
            total: u64::from(h.blocks) * u64::from(h.block_size),
            chunks_left: h.chunks,
            chunks: h.chunks,
            file_off: FILE_HEADER_BYTES_LEN as u64,
            pos: 0,
            cur: None,
            crc: 0,
            finished: false,
            outer: outer.to_string(),
        })
    }

    fn corrupt(&self, offset: u64, msg: String) -> ImageError {
        ImageError::Corrupt {
            path: self.name.clone(),
            offset,
            msg,
        }
    }

    fn read_exact_at(&mut self, buf: &mut [u8], what: &str) -> Result<(), ImageError> {
        let at = self.file_off;
        let n = read_full(self.r.as_mut(), buf).map_err(|e| io_err(&self.name, e, at))?;
        self.file_off += n as u64;
        if n < buf.len() {
            return Err(self.corrupt(
                self.file_off,
                format!(
                    "Android sparse image truncated in {what} (needed {} more bytes, got {n})",
                    buf.len()
                ),
            ));
        }
        Ok(())
    }

    fn crc_data(&mut self, b: &[u8]) {
        let mut h = crc32fast::Hasher::new_with_initial(self.crc);
        h.update(b);
        self.crc = h.finalize();
    }

    /// `data` (just read or filled) is the next extent: checksummed, and the position moves on.
    fn data_extent(&mut self, data: &[u8]) -> Extent {
        self.crc_data(data);
        let e = Extent {
            offset: self.pos,
            len: data.len() as u64,
            kind: ExtentKind::Data,
        };
        self.pos += e.len;
        e
    }

    /// Read the next chunk header; returns a gap extent for FILL-zero / DONT_CARE chunks.
    fn next_chunk(&mut self) -> Result<Option<Extent>, ImageError> {
        if self.chunks_left == 0 {
            if self.pos != self.total {
                return Err(self.corrupt(
                    self.file_off,
                    format!(
                        "the {} chunks cover {} bytes but the header says {} blocks ({} bytes)",
                        self.chunks,
                        self.pos,
                        self.total / self.block_size,
                        self.total
                    ),
                ));
            }
            self.finished = true;
            return Ok(None);
        }
        self.chunks_left -= 1;
        let hdr_off = self.file_off;
        let mut cb = [0u8; CHUNK_HEADER_BYTES_LEN];
        self.read_exact_at(&mut cb, "a chunk header")?;
        let c = ChunkHeader::from_bytes(&cb).map_err(|e| {
            self.corrupt(
                hdr_off,
                format!(
                    "bad chunk header (type 0x{:04x}): {e}",
                    u16::from_le_bytes([cb[0], cb[1]])
                ),
            )
        })?;
        let out = u64::from(c.chunk_size) * self.block_size;
        let total_sz = u64::from(c.total_size);
        let hdr = CHUNK_HEADER_BYTES_LEN as u64;
        let lie = |want: u64| {
            self.corrupt(
                hdr_off,
                format!(
                    "{:?} chunk of {} blocks has total_sz {total_sz}, expected {want}",
                    c.chunk_type, c.chunk_size
                ),
            )
        };
        if c.chunk_type != ChunkType::Crc32
            && self.pos.checked_add(out).is_none_or(|e| e > self.total)
        {
            return Err(self.corrupt(
                hdr_off,
                format!(
                    "{:?} chunk of {} blocks at logical offset {} runs past the image end ({} bytes)",
                    c.chunk_type, c.chunk_size, self.pos, self.total
                ),
            ));
        }
        let offset = self.pos;
        match c.chunk_type {
            ChunkType::Raw => {
                if total_sz != hdr + out {
                    return Err(lie(hdr + out));
                }
                if out > 0 {
                    self.cur = Some(Current::Raw { left: out });
                }
                Ok(None)
            }
            ChunkType::Fill => {
                if total_sz != hdr + 4 {
                    return Err(lie(hdr + 4));
                }
                let mut p = [0u8; 4];
                self.read_exact_at(&mut p, "a FILL value")?;
                if out == 0 {
                    return Ok(None);
                }
                if p == [0; 4] {
                    self.pos += out;
                    self.crc = crc32_zeros(self.crc, out);
                    return Ok(Some(Extent {
                        offset,
                        len: out,
                        kind: ExtentKind::Zero,
                    }));
                }
                self.cur = Some(Current::Fill {
                    pattern: p,
                    left: out,
                });
                Ok(None)
            }
            ChunkType::DontCare => {
                if total_sz != hdr {
                    return Err(lie(hdr));
                }
                if out == 0 {
                    return Ok(None);
                }
                self.pos += out;
                self.crc = crc32_zeros(self.crc, out);
                Ok(Some(Extent {
                    offset,
                    len: out,
                    kind: ExtentKind::Skip,
                }))
            }
            ChunkType::Crc32 => {
                if total_sz != hdr + 4 {
                    return Err(lie(hdr + 4));
                }
                let mut v = [0u8; 4];
                self.read_exact_at(&mut v, "a CRC32 value")?;
                let want = u32::from_le_bytes(v);
                if want != self.crc {
                    return Err(self.corrupt(
                        hdr_off,
                        format!(
                            "CRC32 chunk says {want:08x} for the first {} bytes, computed {:08x}",
                            self.pos, self.crc
                        ),
                    ));
                }
                Ok(None)
            }
        }
    }
}

fn io_err(name: &str, e: std::io::Error, at: u64) -> ImageError {
    if e.raw_os_error().is_none() {
        // Errors without an OS code come from a decompressor around the sparse stream.
        ImageError::Corrupt {
            path: name.to_string(),
            offset: at,
            msg: format!("compressed data is corrupt or truncated (at sparse offset {at}): {e}"),
        }
    } else {
        ImageError::Io {
            path: name.to_string(),
            source: std::io::Error::new(e.kind(), format!("reading at offset {at}: {e}")),
        }
    }
}

impl ExtentSource for SparseSource {
    fn size_hint(&self) -> Option<u64> {
        Some(self.total)
    }

    fn next_extent(&mut self, buf: &mut [u8]) -> Result<Option<Extent>, ImageError> {
        loop {
            if self.finished {
                return Ok(None);
            }
            match self.cur.take() {
                None => {
                    if let Some(e) = self.next_chunk()? {
                        return Ok(Some(e));
                    }
                }
                Some(Current::Raw { left }) => {
                    let n = left.min(buf.len() as u64) as usize;
                    self.read_exact_at(&mut buf[..n], "RAW chunk data")?;
                    let e = self.data_extent(&buf[..n]);
                    if left > n as u64 {
                        self.cur = Some(Current::Raw {
                            left: left - n as u64,
                        });
                    }
                    return Ok(Some(e));
                }
                Some(Current::Fill { pattern, left }) => {
                    // Whole 4-byte patterns only: the chunk starts block-aligned and blocks
                    // are multiples of 4, so the pattern phase is always 0.
                    let cap = (buf.len() & !3).max(4).min(buf.len());
                    let n = left.min(cap as u64) as usize;
                    for (i, b) in buf[..n].iter_mut().enumerate() {
                        *b = pattern[i & 3];
                    }
                    let e = self.data_extent(&buf[..n]);
                    if left > n as u64 {
                        self.cur = Some(Current::Fill {
                            pattern,
                            left: left - n as u64,
                        });
                    }
                    return Ok(Some(e));
                }
            }
        }
    }

    fn describe(&self) -> String {
        if self.outer.is_empty() {
            "android-sparse".into()
        } else {
            format!("{} → android-sparse", self.outer)
        }
    }
}

/// CRC32 (IEEE, as crc32fast and libsparse compute it) of the data so far followed by `n`
/// zero bytes, in O(log n): appending zeroes multiplies the CRC register by x^(8n) modulo
/// the polynomial (the method of zlib's crc32_combine).
pub(crate) fn crc32_zeros(crc: u32, n: u64) -> u32 {
    !multmodp(x2nmodp(n, 3), !crc)
}

const POLY: u32 = 0xedb8_8320;

const fn multmodp(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut p = 0u32;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                break;
            }
        }
        m >>= 1;
        if m == 0 {
            break;
        }
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
    p
}

/// x^(n * 2^k) modulo the CRC polynomial.
fn x2nmodp(mut n: u64, mut k: u32) -> u32 {
    let mut p = 1u32 << 31; // x^0
    while n != 0 {
        if n & 1 != 0 {
            p = multmodp(X2N[(k & 63) as usize], p);
        }
        n >>= 1;
        k += 1;
    }
    p
}

/// X2N[k] = x^(2^k) modulo the polynomial, computed at compile time by repeated squaring.
const X2N: [u32; 64] = {
    let mut t = [0u32; 64];
    let mut p = 1u32 << 30; // x^1
    let mut k = 0;
    while k < 64 {
        t[k] = p;
        p = multmodp(p, p);
        k += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made sparse image (block size 8): RAW, nonzero FILL, DONT_CARE, zero FILL,
    /// then a CRC32 chunk over everything before it.
    fn handmade(crc_fix: Option<u32>) -> (Vec<u8>, Vec<u8>) {
        let bs = 8u32;
        let mut logical = Vec::new();
        let mut body = Vec::new();
        let chunk = |body: &mut Vec<u8>, t: u16, blocks: u32, total: u32| {
            body.extend_from_slice(&t.to_le_bytes());
            body.extend_from_slice(&[0, 0]);
            body.extend_from_slice(&blocks.to_le_bytes());
            body.extend_from_slice(&total.to_le_bytes());
        };
        chunk(&mut body, 0xcac1, 1, 12 + 8);
        body.extend_from_slice(b"rawdata!");
        logical.extend_from_slice(b"rawdata!");
        chunk(&mut body, 0xcac2, 2, 16);
        body.extend_from_slice(&[1, 2, 3, 4]);
        logical.extend_from_slice(&[1, 2, 3, 4].repeat(4));
        chunk(&mut body, 0xcac3, 1, 12);
        logical.extend_from_slice(&[0; 8]);
        chunk(&mut body, 0xcac2, 3, 16);
        body.extend_from_slice(&[0; 4]);
        logical.extend_from_slice(&[0; 24]);
        chunk(&mut body, 0xcac4, 0, 16);
        let crc = crc_fix.unwrap_or_else(|| crc32fast::hash(&logical));
        body.extend_from_slice(&crc.to_le_bytes());
        let h = FileHeader {
            block_size: bs,
            blocks: (logical.len() / 8) as u32,
            chunks: 5,
            checksum: 0,
        };
        let mut f = h.to_bytes().to_vec();
        f.extend_from_slice(&body);
        (f, logical)
    }

    fn expand(img: Vec<u8>, buf_len: usize) -> Result<(Vec<u8>, Vec<ExtentKind>), ImageError> {
        let mut s = SparseSource::new(Box::new(std::io::Cursor::new(img)), "t.simg", "")?;
        let mut buf = vec![0u8; buf_len];
        let mut out = Vec::new();
        let mut kinds = Vec::new();
        while let Some(e) = s.next_extent(&mut buf)? {
            assert_eq!(e.offset, out.len() as u64);
            match e.kind {
                ExtentKind::Data => out.extend_from_slice(&buf[..e.len as usize]),
                _ => out.resize(out.len() + e.len as usize, 0),
            }
            kinds.push(e.kind);
        }
        Ok((out, kinds))
    }

    #[test]
    fn handmade_image_with_all_chunk_types() {
        let (img, logical) = handmade(None);
        // A small buffer forces RAW and FILL chunks to be split across extents.
        for buf_len in [6, 8, 4096] {
            let (out, kinds) = expand(img.clone(), buf_len).unwrap();
            assert_eq!(out, logical, "buf {buf_len}");
            assert!(kinds.contains(&ExtentKind::Skip) && kinds.contains(&ExtentKind::Zero));
        }
        let (img, _) = handmade(Some(0x1234_5678));
        let e = expand(img, 4096).unwrap_err().to_string();
        assert!(e.contains("CRC32") && e.contains("12345678"), "{e}");
    }

    #[test]
    fn lying_fill_and_dont_care_sizes() {
        let (mut img, _) = handmade(None);
        // FILL chunk header at 28 + 20: total_sz 16 -> 20.
        img[28 + 20 + 8] = 20;
        let e = expand(img, 4096).unwrap_err().to_string();
        assert!(e.contains("offset 48") && e.contains("total_sz 20"), "{e}");
        let (mut img, _) = handmade(None);
        // DONT_CARE header at 48 + 16 = 64: total_sz 12 -> 16.
        img[64 + 8] = 16;
        let e = expand(img, 4096).unwrap_err().to_string();
        assert!(e.contains("offset 64"), "{e}");
        let e = SparseSource::new(
            Box::new(std::io::Cursor::new(vec![0x3a, 0xff, 0x26, 0xed])),
            "t",
            "",
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("header truncated"), "{e}");
    }

    #[test]
    fn crc_zero_extension_matches_crc32fast() {
        for (pre, n) in [
            (&b""[..], 0u64),
            (b"abc", 1),
            (b"abc", 4096),
            (b"", 100_000),
            (b"x", 1 << 20),
        ] {
            let mut h = crc32fast::Hasher::new();
            h.update(pre);
            let c = h.clone().finalize();
            h.update(&vec![0u8; n as usize]);
            assert_eq!(crc32_zeros(c, n), h.finalize(), "{pre:?} + {n}");
        }
    }
}
