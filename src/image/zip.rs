//! `.zip` images: one member (stored or deflate, zip64 too) read as a plain byte stream, so the
//! image inside (raw, `.img.xz`, Android sparse, ...) goes through the usual layers.
//!
//! A local file is opened through its central directory (the `zip` crate): members are listed
//! and the one to write is chosen before a byte is read, with sizes and CRC-32 from there. A
//! stream (download, pipe) has its central directory only at its end, so members are taken
//! from their local headers as they arrive; that a second member follows the chosen one is
//! only known after it, and the error then stops the write before the image's first MiB (the
//! partition table) reaches the target.
//!
//! The member's data is inflated here with flate2 instead of by the `zip` crate, which falls
//! short twice: its readers borrow the archive (`ZipFile<'_, R>`), while the image pipeline
//! needs an owned `Read + Send` for its read-ahead thread; and its streaming reader
//! (`read_zipfile_from_stream`) takes the compressed size from the local header, which is 0
//! for members written with a data descriptor (flag bit 3, what `zip -` writes to a pipe), so
//! such a member would read as empty. Deflate data ends by itself: such members are inflated
//! to their end and the descriptor after them is checked. A *stored* member with a data
//! descriptor has no findable end in a stream and is refused (a local file reads it through
//! the central directory).

use super::detect::CountingReader;
use super::ImageError;
use flate2::{Decompress, FlushDecompress, Status};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const LOCAL: u32 = 0x0403_4b50;
const CENTRAL: u32 = 0x0201_4b50;
const EOCD: u32 = 0x0605_4b50;
const EOCD64: u32 = 0x0606_4b50;
const DESCRIPTOR: u32 = 0x0807_4b50;
const STORED: u16 = 0;
const DEFLATE: u16 = 8;
const IN_BUF: usize = 1 << 20;

/// Does `head` start like a zip file (a local header, or the end record of an empty zip)?
pub(crate) fn is_zip(head: &[u8]) -> bool {
    head.len() >= 4 && (head[..4] == LOCAL.to_le_bytes() || head[..4] == EOCD.to_le_bytes())
}

/// Sizes and CRC of a member's data, when known before it is read.
#[derive(Debug, Clone, Copy)]
struct Known {
    crc: u32,
    compressed: u64,
    size: u64,
}

/// One member as its local header (or the central directory) describes it.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    method: u16,
    flags: u16,
    /// `None`: a data descriptor after the data holds them.
    known: Option<Known>,
    /// The local header has a zip64 extra field: descriptor sizes are 8 bytes.
    zip64: bool,
}

impl Entry {
    /// Not a candidate image: a directory, or the resource forks macOS's archiver adds
    /// (`__MACOSX/._image.img`).
    fn ignored(&self) -> bool {
        self.name.ends_with('/') || self.name.starts_with("__MACOSX/")
    }
}

/// The zip's bytes with the offset of the next one, for messages.
struct ZipStream {
    src: BufReader<Box<dyn Read + Send>>,
    off: u64,
    name: String,
}

impl ZipStream {
    fn corrupt(&self, msg: impl Into<String>) -> ImageError {
        ImageError::Corrupt {
            path: self.name.clone(),
            offset: self.off,
            msg: msg.into(),
        }
    }

    fn invalid(&self, msg: impl Into<String>) -> ImageError {
        ImageError::Invalid {
            path: self.name.clone(),
            msg: msg.into(),
        }
    }

    /// `read_exact` that names a short read as a truncated zip and counts the offset.
    fn exact(&mut self, b: &mut [u8], what: &str) -> Result<(), ImageError> {
        match self.src.read_exact(b) {
            Ok(()) => {
                self.off += b.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(self.corrupt(format!(
                "the zip file ends inside {what} (truncated download?)"
            ))),
            Err(source) => Err(ImageError::Io {
                path: self.name.clone(),
                source,
            }),
        }
    }

    fn u32(&mut self, what: &str) -> Result<u32, ImageError> {
        let mut b = [0u8; 4];
        self.exact(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    /// The next member's local header, or `None` where the central directory starts.
    fn next_entry(&mut self) -> Result<Option<Entry>, ImageError> {
        let at = self.off;
        let sig = self.u32("a header")?;
        match sig {
            LOCAL => {}
            CENTRAL | EOCD | EOCD64 => return Ok(None),
            _ => {
                self.off = at;
                return Err(self.corrupt(format!(
                    "expected a zip header, found bytes {:08x}",
                    sig.swap_bytes()
                )));
            }
        }
        let mut h = [0u8; 26];
        self.exact(&mut h, "a local header")?;
        let le16 = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        let le32 = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let (flags, method, crc) = (le16(2), le16(4), le32(10));
        let (mut compressed, mut size) = (u64::from(le32(14)), u64::from(le32(18)));
        let mut name = vec![0u8; usize::from(le16(22))];
        self.exact(&mut name, "a member name")?;
        let mut extra = vec![0u8; usize::from(le16(24))];
        self.exact(&mut extra, "a header's extra fields")?;
        // Zip64: the 8-byte sizes are in extra field 1, for the 32-bit fields that are all ones.
        let mut zip64 = false;
        let mut x = extra.as_slice();
        while x.len() >= 4 {
            let id = u16::from_le_bytes([x[0], x[1]]);
            let len = usize::from(u16::from_le_bytes([x[2], x[3]])).min(x.len() - 4);
            let mut body = &x[4..4 + len];
            if id == 1 {
                zip64 = true;
                for v in [&mut size, &mut compressed] {
                    if *v == 0xFFFF_FFFF && body.len() >= 8 {
                        let (a, rest) = body.split_at(8);
                        *v = u64::from_le_bytes(a.try_into().unwrap_or([0xFF; 8]));
                        body = rest;
                    }
                }
            }
            x = &x[4 + len..];
        }
        Ok(Some(Entry {
            name: String::from_utf8_lossy(&name).into_owned(),
            method,
            flags,
            known: (flags & 8 == 0).then_some(Known {
                crc,
                compressed,
                size,
            }),
            zip64,
        }))
    }

    /// Read past a member that is not the one written.
    fn skip(&mut self, e: &Entry) -> Result<(), ImageError> {
        if let Some(k) = e.known {
            let n = io::copy(&mut (&mut self.src).take(k.compressed), &mut io::sink()).map_err(
                |source| ImageError::Io {
                    path: self.name.clone(),
                    source,
                },
            )?;
            self.off += n;
            if n < k.compressed {
                return Err(self.corrupt(format!(
                    "the zip file ends inside member {} (truncated download?)",
                    e.name
                )));
            }
            return Ok(());
        }
        let mut body = Body::new(self, e)?;
        let mut scratch = vec![0u8; IN_BUF];
        loop {
            match body.read(self, &mut scratch) {
                Ok(0) => return body.finish(self),
                Ok(_) => {}
                Err(e) => return Err(image_error(e).unwrap_or_else(|e| self.io(e))),
            }
        }
    }

    fn io(&self, source: io::Error) -> ImageError {
        ImageError::Io {
            path: self.name.clone(),
            source,
        }
    }
}

/// The decoding state of the member being read.
struct Body {
    member: String,
    deflate: Option<Box<Decompress>>,
    known: Option<Known>,
    zip64: bool,
    data_start: u64,
    crc: crc32fast::Hasher,
    out: u64,
    ended: bool,
}

impl Body {
    fn new(zs: &ZipStream, e: &Entry) -> Result<Body, ImageError> {
        if e.flags & 1 != 0 {
            return Err(zs.invalid(format!(
                "member {} is encrypted; sbcflash reads unencrypted zips only",
                e.name
            )));
        }
        let deflate = match e.method {
            STORED if e.known.is_none() => {
                return Err(zs.invalid(format!(
                    "member {} is stored with its size after the data (a zip written to a pipe): \
                     its end cannot be found while streaming; download the file and write it from disk",
                    e.name
                )))
            }
            STORED => None,
            DEFLATE => Some(Box::new(Decompress::new(false))),
            m => {
                return Err(zs.invalid(format!(
                    "member {} uses compression method {m} ({}); sbcflash reads stored and deflate \
                     members (try `unzip -p {} {} | sbcflash write /dev/stdin TARGET`)",
                    e.name,
                    method_name(m),
                    zs.name,
                    e.name
                )))
            }
        };
        Ok(Body {
            member: e.name.clone(),
            deflate,
            known: e.known,
            zip64: e.zip64,
            data_start: zs.off,
            crc: crc32fast::Hasher::new(),
            out: 0,
            ended: false,
        })
    }

    fn corrupt(&self, zs: &ZipStream, msg: &str) -> io::Error {
        io::Error::other(zs.corrupt(format!(
            "zip member {} is corrupt: {msg} (at byte {} of the member's data)",
            self.member, self.out
        )))
    }

    /// Bytes of the member's data; `Ok(0)` at its end (then call [`Body::finish`]).
    /// Format errors are an [`ImageError`] inside the `io::Error` (see [`image_error`]).
    fn read(&mut self, zs: &mut ZipStream, buf: &mut [u8]) -> io::Result<usize> {
        if self.ended || buf.is_empty() {
            return Ok(0);
        }
        let used_in = zs.off - self.data_start;
        // The central directory's compressed size bounds the input: a corrupt stream cannot
        // run on into the next member.
        let limit = self
            .known
            .map_or(u64::MAX, |k| k.compressed - used_in.min(k.compressed));
        let Some(d) = self.deflate.as_mut() else {
            if limit == 0 {
                self.ended = true;
                return Ok(0);
            }
            let want = buf.len().min(usize::try_from(limit).unwrap_or(usize::MAX));
            let n = loop {
                match zs.src.read(&mut buf[..want]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r?,
                }
            };
            if n == 0 {
                return Err(self.corrupt(zs, "the zip file ends inside it (truncated download?)"));
            }
            zs.off += n as u64;
            self.crc.update(&buf[..n]);
            self.out += n as u64;
            return Ok(n);
        };
        loop {
            let input = zs.src.fill_buf()?;
            let input = &input[..input
                .len()
                .min(usize::try_from(limit).unwrap_or(usize::MAX))];
            let eof = input.is_empty();
            let (i0, o0) = (d.total_in(), d.total_out());
            let st = d.decompress(input, buf, FlushDecompress::None);
            let used = (d.total_in() - i0) as usize;
            let made = (d.total_out() - o0) as usize;
            zs.src.consume(used);
            zs.off += used as u64;
            self.crc.update(&buf[..made]);
            self.out += made as u64;
            match st {
                Err(e) => return Err(self.corrupt(zs, &format!("bad deflate data: {e}"))),
                Ok(Status::StreamEnd) => {
                    self.ended = true;
                    return Ok(made);
                }
                Ok(_) if made > 0 => return Ok(made),
                Ok(_) if eof && limit == 0 => {
                    return Err(self.corrupt(
                        zs,
                        "its deflate data does not end within its compressed size",
                    ))
                }
                Ok(_) if eof => {
                    return Err(
                        self.corrupt(zs, "the zip file ends inside it (truncated download?)")
                    )
                }
                Ok(_) if used == 0 => {
                    return Err(self.corrupt(zs, "the deflate decoder makes no progress"))
                }
                Ok(_) => {}
            }
        }
    }

    /// At the member's end: sizes and CRC-32 against the header, central directory or data
    /// descriptor.
    fn finish(&mut self, zs: &mut ZipStream) -> Result<(), ImageError> {
        let compressed = zs.off - self.data_start;
        let crc = self.crc.clone().finalize();
        let want = match self.known {
            Some(k) => k,
            None => {
                let mut c = zs.u32("a data descriptor")?;
                if c == DESCRIPTOR && crc != DESCRIPTOR {
                    c = zs.u32("a data descriptor")?;
                }
                let wide = self.zip64 || compressed >= 0xFFFF_FFFF || self.out >= 0xFFFF_FFFF;
                let (cs, us) = if wide {
                    let mut b = [0u8; 16];
                    zs.exact(&mut b, "a data descriptor")?;
                    let le = |i: usize| {
                        let mut w = [0u8; 8];
                        w.copy_from_slice(&b[i..i + 8]);
                        u64::from_le_bytes(w)
                    };
                    (le(0), le(8))
                } else {
                    (
                        u64::from(zs.u32("a data descriptor")?),
                        u64::from(zs.u32("a data descriptor")?),
                    )
                };
                Known {
                    crc: c,
                    compressed: cs,
                    size: us,
                }
            }
        };
        let m = &self.member;
        if self.out != want.size || compressed != want.compressed {
            return Err(zs.corrupt(format!(
                "zip member {m} is corrupt: its data is {} bytes ({compressed} compressed), the zip says {} ({} compressed)",
                self.out, want.size, want.compressed
            )));
        }
        if crc != want.crc {
            return Err(zs.corrupt(format!(
                "zip member {m} is corrupt: the CRC-32 of its data is {crc:08x}, the zip says {:08x}",
                want.crc
            )));
        }
        Ok(())
    }
}

fn method_name(m: u16) -> &'static str {
    match m {
        9 => "deflate64",
        12 => "bzip2",
        14 => "lzma",
        93 => "zstd",
        95 => "xz",
        98 => "ppmd",
        99 => "AES encryption",
        _ => "unknown",
    }
}

/// The member as a `Read`: yields its data, then checks it; with `last`, also that no other
/// file member follows (a stream whose members were not listed up front).
struct MemberReader {
    zs: ZipStream,
    body: Body,
    last: bool,
    done: bool,
}

impl Read for MemberReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        let n = self.body.read(&mut self.zs, buf)?;
        if n == 0 {
            self.body.finish(&mut self.zs).map_err(io::Error::other)?;
            if self.last {
                self.check_last().map_err(io::Error::other)?;
            }
            self.done = true;
        }
        Ok(n)
    }
}

impl MemberReader {
    /// After the member: only the central directory (or directory entries) may follow. If
    /// another file does, read on to list every member in the error.
    fn check_last(&mut self) -> Result<(), ImageError> {
        let mut others = Vec::new();
        while let Some(e) = self.zs.next_entry()? {
            if !e.ignored() {
                others.push(e.name.clone());
            }
            self.zs.skip(&e)?;
        }
        if others.is_empty() {
            return Ok(());
        }
        let mut all = vec![self.body.member.clone()];
        all.extend(others);
        Err(self.zs.invalid(several(&all)))
    }
}

fn several(names: &[String]) -> String {
    format!(
        "the zip has {} members ({}); choose one with --member NAME",
        names.len(),
        names.join(", ")
    )
}

/// The [`ImageError`] a zip reader put inside an `io::Error`, or the `io::Error` itself.
pub(crate) fn image_error(e: io::Error) -> Result<ImageError, io::Error> {
    if !e.get_ref().is_some_and(|i| i.is::<ImageError>()) {
        return Err(e);
    }
    let kind = e.kind();
    match e.into_inner() {
        Some(b) => b
            .downcast::<ImageError>()
            .map(|b| *b)
            .map_err(|b| io::Error::new(kind, b)),
        None => Err(io::Error::from(kind)),
    }
}

/// A zip arriving as a stream: the member named `want`, or the only file member.
/// Returns its data as a reader, and its size when the local header records it.
pub(crate) fn stream_member(
    r: Box<dyn Read + Send>,
    name: &str,
    want: Option<&str>,
) -> Result<(Box<dyn Read + Send>, Option<u64>), ImageError> {
    let mut zs = ZipStream {
        src: BufReader::with_capacity(IN_BUF, r),
        off: 0,
        name: name.to_string(),
    };
    let mut seen = Vec::new();
    while let Some(e) = zs.next_entry()? {
        if e.ignored() {
            zs.skip(&e)?;
            continue;
        }
        seen.push(e.name.clone());
        if want.is_none_or(|w| w == e.name) {
            let body = Body::new(&zs, &e)?;
            let size = e.known.map(|k| k.size);
            return Ok((
                Box::new(MemberReader {
                    zs,
                    body,
                    last: want.is_none(),
                    done: false,
                }),
                size,
            ));
        }
        zs.skip(&e)?;
    }
    Err(zs.invalid(not_found(want, &seen)))
}

fn not_found(want: Option<&str>, names: &[String]) -> String {
    match want {
        Some(w) if names.is_empty() => format!("the zip has no member {w}: it holds no file"),
        Some(w) => format!(
            "the zip has no member {w}; its members: {}",
            names.join(", ")
        ),
        None => "the zip holds no file".into(),
    }
}

/// A zip that is a local file: the member is chosen from the central directory (all members
/// are known before anything is written). Returns its data as a reader and its size;
/// `consumed` follows the position in the file.
pub(crate) fn file_member(
    file: File,
    name: &str,
    want: Option<&str>,
    consumed: Arc<AtomicU64>,
) -> Result<(Box<dyn Read + Send>, u64), ImageError> {
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bad = |offset: u64, e: ::zip::result::ZipError| ImageError::Corrupt {
        path: name.to_string(),
        offset,
        msg: format!("not a readable zip file: {e} (truncated or corrupt?)"),
    };
    let mut members = Vec::new();
    let mut ar = ::zip::ZipArchive::new(&file).map_err(|e| bad(len, e))?;
    for i in 0..ar.len() {
        let f = ar.by_index_raw(i).map_err(|e| bad(0, e))?;
        let method = match f.compression() {
            ::zip::CompressionMethod::Stored => STORED,
            ::zip::CompressionMethod::Deflated => DEFLATE,
            // The crate knows no other method without its features: take the number from the
            // local header (read again below) for the message.
            _ => u16::MAX,
        };
        members.push((
            Entry {
                name: f.name().to_string(),
                method,
                flags: u16::from(f.encrypted()),
                known: Some(Known {
                    crc: f.crc32(),
                    compressed: f.compressed_size(),
                    size: f.size(),
                }),
                zip64: false,
            },
            f.header_start(),
            f.data_start(),
        ));
    }
    drop(ar);
    let files: Vec<_> = members.iter().filter(|m| !m.0.ignored()).collect();
    let names: Vec<String> = files.iter().map(|m| m.0.name.clone()).collect();
    let pick = match want {
        Some(w) => files.iter().find(|m| m.0.name == w),
        None if files.len() > 1 => {
            return Err(ImageError::Invalid {
                path: name.to_string(),
                msg: several(&names),
            })
        }
        None => files.first(),
    };
    let Some(m) = pick else {
        return Err(ImageError::Invalid {
            path: name.to_string(),
            msg: not_found(want, &names),
        });
    };
    let (mut entry, header_start, data_start) = (m.0.clone(), m.1, m.2);
    let mut file = file;
    let io = |source| ImageError::Io {
        path: name.to_string(),
        source,
    };
    if entry.method == u16::MAX {
        // The method number, from the local header, for the refusal.
        let mut h = [0u8; 10];
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut h, header_start).map_err(io)?;
        entry.method = u16::from_le_bytes([h[8], h[9]]);
    }
    file.seek(SeekFrom::Start(data_start)).map_err(io)?;
    consumed.store(data_start, Ordering::Relaxed);
    let size = entry.known.map_or(0, |k| k.size);
    let zs = ZipStream {
        src: BufReader::with_capacity(IN_BUF, Box::new(CountingReader::new(file, consumed))),
        off: data_start,
        name: name.to_string(),
    };
    let body = Body::new(&zs, &entry)?;
    Ok((
        Box::new(MemberReader {
            zs,
            body,
            last: false,
            done: false,
        }),
        size,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A zip as `zip -` writes to a pipe: deflate, sizes in a data descriptor.
    fn descriptor_zip(name: &str, data: &[u8], wide: bool) -> Vec<u8> {
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        let comp = enc.finish().unwrap();
        let mut z = Vec::new();
        z.extend(LOCAL.to_le_bytes());
        z.extend([20, 0, 8, 0, 8, 0, 0, 0, 0, 0]);
        z.extend([0u8; 12]);
        z.extend((name.len() as u16).to_le_bytes());
        let extra: Vec<u8> = if wide {
            [1u8, 0, 16, 0].into_iter().chain([0u8; 16]).collect()
        } else {
            Vec::new()
        };
        z.extend((extra.len() as u16).to_le_bytes());
        z.extend(name.as_bytes());
        z.extend(&extra);
        z.extend(&comp);
        z.extend(DESCRIPTOR.to_le_bytes());
        z.extend(crc32fast::hash(data).to_le_bytes());
        if wide {
            z.extend((comp.len() as u64).to_le_bytes());
            z.extend((data.len() as u64).to_le_bytes());
        } else {
            z.extend((comp.len() as u32).to_le_bytes());
            z.extend((data.len() as u32).to_le_bytes());
        }
        z.extend(CENTRAL.to_le_bytes());
        z
    }

    fn read_all(z: Vec<u8>, want: Option<&str>) -> Result<Vec<u8>, ImageError> {
        let (mut r, _) = stream_member(Box::new(io::Cursor::new(z)), "t.zip", want)?;
        let mut out = Vec::new();
        r.read_to_end(&mut out)
            .map_err(|e| image_error(e).unwrap_or_else(|e| panic!("{e}")))?;
        Ok(out)
    }

    #[test]
    fn data_descriptor_members_stream() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i / 7 % 253) as u8).collect();
        for wide in [false, true] {
            assert_eq!(
                read_all(descriptor_zip("a.img", &data, wide), None).unwrap(),
                data
            );
        }
        // Two descriptor members: the second is skipped by inflating it; then it is listed.
        let mut two = descriptor_zip("a.img", &data, false);
        two.truncate(two.len() - 4);
        two.extend(descriptor_zip("b.img", b"bbb", false));
        assert_eq!(read_all(two.clone(), Some("b.img")).unwrap(), b"bbb");
        let e = read_all(two, None).unwrap_err().to_string();
        assert!(e.contains("2 members (a.img, b.img)"), "{e}");
    }

    #[test]
    fn bad_descriptor_crc_is_corrupt() {
        let data = vec![5u8; 100_000];
        let mut z = descriptor_zip("a.img", &data, false);
        let at = z.len() - 16;
        z[at] ^= 1;
        let e = read_all(z, None).unwrap_err().to_string();
        assert!(
            e.contains("t.zip: at offset") && e.contains("CRC-32"),
            "{e}"
        );
    }
}
