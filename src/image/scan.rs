//! The scanning source: raw files and byte streams (decompressors, HTTP bodies), optionally
//! described by a bmap. Reads in multi-MiB pieces, finds all-zero blocks, verifies bmap range
//! checksums over the real bytes as they pass.

use super::bmap::{Bmap, ChecksumKind, RangeChecker, RangeHasher};
use super::buffer::{Pool, Pooled, Shared};
use super::detect::{read_full, Format};
use super::zero::{block_end, is_zero, ZERO_BLOCK};
use super::SharedData;
use super::{Extent, ExtentKind, ExtentSource, ImageError};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

/// Size of the internal read buffer: big reads, a multiple of [`ZERO_BLOCK`].
pub(crate) const READ_BUF: usize = 4 << 20;

/// Buffers in the source's pool: what is being read or decompressed, what is being scanned,
/// and what the write pipeline still holds (queued for the writer, the blake3 hasher and the
/// range checker) when it takes extents with [`ExtentSource::next_shared`]. This bounds the
/// source's memory (`POOL × READ_BUF`); pages of buffers never used are never touched.
pub(crate) const POOL: usize = 8;

/// Where bytes come from.
pub(crate) enum Input {
    /// A seekable regular file, read with positioned reads; `consumed` mirrors `pos`.
    File {
        file: File,
        pos: u64,
        consumed: Arc<AtomicU64>,
    },
    /// A forward-only stream, read ahead by a thread (so decompression overlaps with
    /// scanning, hashing and writing) straight into pooled buffers, which are scanned and
    /// lent out as they are: decompressed bytes are never copied again.
    /// `compressed` names the outer format for messages, with its consumed-bytes counter.
    Pipe {
        rx: Chunks,
        closed: Arc<AtomicBool>,
        pos: u64,
        eof: bool,
        compressed: Option<(Format, Arc<AtomicU64>)>,
    },
}

impl Input {
    fn pos(&self) -> u64 {
        match self {
            Input::File { pos, .. } | Input::Pipe { pos, .. } => *pos,
        }
    }

    /// Positioned read from a file input (pipes are refilled by swapping buffers).
    fn read_file(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        let Input::File {
            file,
            pos,
            consumed,
        } = self
        else {
            return Err(io::Error::other("not a file input"));
        };
        let mut n = 0;
        while n < dst.len() {
            match file.read_at(&mut dst[n..], *pos + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        *pos += n as u64;
        consumed.store(*pos, Ordering::Relaxed);
        Ok(n)
    }
}

/// Buffers filled by the read-ahead thread, with the bytes filled (0 marks the end).
type Chunks = Receiver<io::Result<(Pooled, usize)>>;

/// Start the read-ahead thread: it fills `READ_BUF` buffers from the pool with `r` (the
/// decompressor writes into them directly) and sends them; a buffer comes back to the pool
/// when the scanner and every pipeline stage holding a slice of it are done. It stops when
/// the source is dropped (`closed`), even while waiting for a free buffer.
fn spawn_pipe(
    mut r: Box<dyn Read + Send>,
    pool: Pool,
    closed: Arc<AtomicBool>,
) -> io::Result<Chunks> {
    let (tx, rx) = sync_channel::<io::Result<(Pooled, usize)>>(1);
    std::thread::Builder::new()
        .name("image-read".into())
        .spawn(move || loop {
            let mut b = loop {
                if closed.load(Ordering::Relaxed) {
                    return;
                }
                if let Some(b) = pool.get_timeout(POLL) {
                    break b;
                }
            };
            match read_full(r.as_mut(), &mut b[..READ_BUF]) {
                Ok(n) => {
                    if tx.send(Ok((b, n))).is_err() || n == 0 {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        })?;
    Ok(rx)
}

const POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// How the logical image is cut into regions to scan and ranges not to read.
enum Plan {
    /// Raw regular file of `size` bytes: holes (SEEK_HOLE) become `Zero`.
    Holes { size: u64 },
    /// A stream read to its end; `expected` is its logical size if known beforehand.
    Whole {
        expected: Option<u64>,
        started: bool,
    },
    /// Mapped bmap ranges are scanned and checksummed; gaps are `Skip`.
    Bmap { bmap: Box<Bmap>, next: usize },
}

struct Region {
    end: Option<u64>,
    /// The range checksum being computed, with the bmap range index.
    check: Option<(RangeHasher, usize)>,
}

pub(crate) struct ScanSource {
    name: String,
    desc: String,
    input: Input,
    plan: Plan,
    /// Buffers for reads (files) and decompressed data (pipes); `ibuf` is the current one.
    pool: Pool,
    ibuf: Shared,
    lo: usize,
    hi: usize,
    /// Logical offset of `ibuf[lo]`: the next byte to hand out.
    pos: u64,
    region: Option<Region>,
    finished: bool,
    /// Range checksums were handed to the caller ([`ExtentSource::take_range_checker`]).
    checks_handed_out: bool,
}

impl ScanSource {
    /// A raw regular file, optionally with a bmap (its ImageSize must match the file size).
    pub(crate) fn raw_file(
        file: File,
        name: &str,
        bmap: Option<Bmap>,
        consumed: Arc<AtomicU64>,
    ) -> Result<ScanSource, ImageError> {
        let size = file
            .metadata()
            .map_err(|source| ImageError::Io {
                path: name.to_string(),
                source,
            })?
            .len();
        let plan = match bmap {
            Some(b) => {
                check_bmap_size(&b, size, name)?;
                Plan::Bmap {
                    bmap: Box::new(b),
                    next: 0,
                }
            }
            None => Plan::Holes { size },
        };
        Ok(Self::new(
            name,
            Input::File {
                file,
                pos: 0,
                consumed,
            },
            plan,
        ))
    }

    /// A stream of raw logical bytes. `expected`: the logical size if known (checked at the
    /// end); a bmap overrides it with its ImageSize.
    pub(crate) fn stream(
        r: Box<dyn Read + Send>,
        name: &str,
        expected: Option<u64>,
        bmap: Option<Bmap>,
        compressed: Option<(Format, Arc<AtomicU64>)>,
    ) -> Result<ScanSource, ImageError> {
        let plan = match bmap {
            Some(b) => {
                if let Some(e) = expected {
                    check_bmap_size(&b, e, name)?;
                }
                Plan::Bmap {
                    bmap: Box::new(b),
                    next: 0,
                }
            }
            None => Plan::Whole {
                expected,
                started: false,
            },
        };
        let pool = Pool::new(POOL, READ_BUF);
        let closed = Arc::new(AtomicBool::new(false));
        let rx = spawn_pipe(r, pool.clone(), closed.clone()).map_err(|source| ImageError::Io {
            path: name.to_string(),
            source,
        })?;
        Ok(Self::with_pool(
            name,
            pool,
            Input::Pipe {
                rx,
                closed,
                pos: 0,
                eof: false,
                compressed,
            },
            plan,
        ))
    }

    fn new(name: &str, input: Input, plan: Plan) -> ScanSource {
        Self::with_pool(name, Pool::new(POOL, READ_BUF), input, plan)
    }

    fn with_pool(name: &str, pool: Pool, input: Input, plan: Plan) -> ScanSource {
        let desc = match (&input, &plan) {
            (_, Plan::Bmap { bmap, .. }) => format!("raw, {}", bmap.describe()),
            (Input::File { .. }, _) => "raw".to_string(),
            (Input::Pipe { .. }, _) => "raw stream".to_string(),
        };
        ScanSource {
            name: name.to_string(),
            desc,
            input,
            plan,
            pool,
            ibuf: Arc::new(Pooled::empty()),
            lo: 0,
            hi: 0,
            pos: 0,
            region: None,
            finished: false,
            checks_handed_out: false,
        }
    }

    fn read_err(&self, e: io::Error, logical: u64) -> ImageError {
        // A zip member's own error (offset in the zip, CRC, several members) as it is.
        let e = match super::zip::image_error(e) {
            Ok(ie) => return ie,
            Err(e) => e,
        };
        match &self.input {
            Input::Pipe {
                compressed: Some((fmt, consumed)),
                ..
            } if e.raw_os_error().is_none() => ImageError::Corrupt {
                path: self.name.clone(),
                offset: logical,
                msg: format!(
                    "{} data is corrupt or truncated (after {} bytes of the compressed file): {e}",
                    fmt.name(),
                    consumed.load(Ordering::Relaxed)
                ),
            },
            _ => ImageError::Io {
                path: self.name.clone(),
                source: io::Error::new(
                    e.kind(),
                    format!("reading at logical offset {logical}: {e}"),
                ),
            },
        }
    }

    fn truncated(&self, expected: u64, why: &str) -> ImageError {
        ImageError::Corrupt {
            path: self.name.clone(),
            offset: self.input.pos(),
            msg: format!(
                "image ends at offset {} but {why} says it is {expected} bytes (truncated?)",
                self.input.pos()
            ),
        }
    }

    /// Move the input forward to logical offset `to` without handing the bytes out.
    fn skip_input(&mut self, to: u64) -> Result<(), ImageError> {
        if let Input::File { pos, consumed, .. } = &mut self.input {
            debug_assert!(self.lo == self.hi);
            *pos = to;
            consumed.store(to, Ordering::Relaxed);
            self.pos = to;
            return Ok(());
        }
        loop {
            let avail = (self.hi - self.lo) as u64;
            if self.pos + avail >= to {
                self.lo += (to - self.pos) as usize;
                self.pos = to;
                return Ok(());
            }
            self.pos += avail;
            self.lo = self.hi;
            if self.refill(None)? == 0 {
                return Err(self.truncated(to, "the bmap"));
            }
        }
    }

    /// After the last extent of a stream: there must be nothing more.
    fn expect_stream_end(&mut self, size: u64, why: &str) -> Result<(), ImageError> {
        if let Input::Pipe { .. } = self.input {
            if self.lo == self.hi && self.refill(None)? == 0 {
                return Ok(());
            }
            return Err(ImageError::Corrupt {
                path: self.name.clone(),
                offset: size,
                msg: format!("image is larger than the {size} bytes {why} says"),
            });
        }
        Ok(())
    }

    /// Pick the next region; may hand out a gap extent (`Zero` hole, `Skip` bmap gap).
    fn next_region(&mut self) -> Result<Option<Extent>, ImageError> {
        let pos = self.pos;
        match &mut self.plan {
            Plan::Holes { size } => {
                let size = *size;
                if pos >= size {
                    self.finished = true;
                    return Ok(None);
                }
                let Input::File { file, .. } = &self.input else {
                    unreachable!("holes plan is only built over files")
                };
                let fd = file.as_raw_fd();
                let data = match seek(fd, pos, libc::SEEK_DATA) {
                    Ok(Some(d)) => d.min(size),
                    Ok(None) => size,
                    Err(_) => pos, // no SEEK_DATA support: everything is data
                };
                if data > pos {
                    self.skip_input(data)?;
                    return Ok(Some(Extent {
                        offset: pos,
                        len: data - pos,
                        kind: ExtentKind::Zero,
                    }));
                }
                let hole = match seek(fd, pos, libc::SEEK_HOLE) {
                    Ok(Some(h)) if h > pos => h.min(size),
                    _ => size,
                };
                self.region = Some(Region {
                    end: Some(hole),
                    check: None,
                });
                Ok(None)
            }
            Plan::Whole { expected, started } => {
                if *started {
                    if let Some(e) = *expected {
                        self.expect_stream_end(e, "the caller")?;
                    }
                    self.finished = true;
                    return Ok(None);
                }
                *started = true;
                self.region = Some(Region {
                    end: *expected,
                    check: None,
                });
                Ok(None)
            }
            Plan::Bmap { bmap, next } => {
                if let Some(r) = bmap.ranges.get(*next) {
                    if pos < r.start {
                        let to = r.start;
                        self.skip_input(to)?;
                        return Ok(Some(Extent {
                            offset: pos,
                            len: to - pos,
                            kind: ExtentKind::Skip,
                        }));
                    }
                    let check = r
                        .checksum
                        .as_ref()
                        .filter(|_| !self.checks_handed_out)
                        .map(|_| (RangeHasher::new(bmap.checksum), *next));
                    self.region = Some(Region {
                        end: Some(r.end),
                        check,
                    });
                    *next += 1;
                    return Ok(None);
                }
                let size = bmap.image_size;
                if pos < size {
                    self.skip_input(size)?;
                    return Ok(Some(Extent {
                        offset: pos,
                        len: size - pos,
                        kind: ExtentKind::Skip,
                    }));
                }
                self.expect_stream_end(size, "the bmap's ImageSize")?;
                self.finished = true;
                Ok(None)
            }
        }
    }

    /// Refill the internal buffer; returns bytes now buffered (0 at the end of the input,
    /// or of the region for files). A pipe's buffer may run past the region end; file reads
    /// stop at it.
    fn refill(&mut self, end: Option<u64>) -> Result<usize, ImageError> {
        debug_assert!(self.lo == self.hi);
        self.lo = 0;
        self.hi = 0;
        let start = self.pos;
        // Let go of the current buffer first: it may be the one the pool is waiting for.
        self.ibuf = Arc::new(Pooled::empty());
        if let Input::Pipe { rx, pos, eof, .. } = &mut self.input {
            if *eof {
                return Ok(0);
            }
            let got = rx.recv();
            let at = *pos;
            match got {
                Ok(Ok((b, n))) => {
                    *pos += n as u64;
                    *eof = n == 0;
                    self.ibuf = Arc::new(b);
                    self.hi = n;
                    return Ok(n);
                }
                Ok(Err(e)) => {
                    *eof = true;
                    return Err(self.read_err(e, at));
                }
                Err(_) => {
                    *eof = true;
                    return Err(self.read_err(
                        io::Error::other("the reading thread stopped unexpectedly"),
                        at,
                    ));
                }
            }
        }
        let mut want = READ_BUF as u64;
        if let Some(e) = end {
            want = want.min(e.saturating_sub(start));
        }
        // End reads on zero-block boundaries so no block straddles two refills.
        let stop = start + want;
        if end != Some(stop) {
            let aligned = stop / ZERO_BLOCK as u64 * ZERO_BLOCK as u64;
            if aligned > start {
                want = aligned - start;
            }
        }
        let mut b = loop {
            if let Some(b) = self.pool.get_timeout(POLL) {
                break b;
            }
        };
        let n = match self.input.read_file(&mut b[..want as usize]) {
            Ok(n) => n,
            Err(e) => return Err(self.read_err(e, start)),
        };
        self.ibuf = Arc::new(b);
        self.hi = n;
        Ok(n)
    }

    /// Length of the block at `lo` (bounded by the zero-block grid, region end, buffer).
    fn block_len(&self, end: Option<u64>) -> usize {
        let mut b = block_end(self.pos);
        if let Some(e) = end {
            b = b.min(e);
        }
        ((b - self.pos) as usize).min(self.hi - self.lo)
    }

    /// Hand out `n` bytes from `lo`: feed the range checksum, verify it at the range end.
    fn consume(&mut self, n: usize) -> Result<(), ImageError> {
        let bytes = &self.ibuf[self.lo..self.lo + n];
        self.lo += n;
        self.pos += n as u64;
        let Some(region) = self.region.as_mut() else {
            return Ok(());
        };
        if let Some((h, _)) = region.check.as_mut() {
            h.update(bytes);
        }
        if region.end == Some(self.pos) {
            if let Some((h, idx)) = region.check.take() {
                self.verify_range(h, idx)?;
            }
        }
        Ok(())
    }

    fn verify_range(&self, h: RangeHasher, idx: usize) -> Result<(), ImageError> {
        let Plan::Bmap { bmap, .. } = &self.plan else {
            return Ok(());
        };
        let r = &bmap.ranges[idx];
        let got = h.finish_hex();
        match &r.checksum {
            Some(want) if *want != got => Err(ImageError::RangeChecksum {
                path: self.name.clone(),
                bmap: bmap.path.display().to_string(),
                start: r.start,
                end: r.end,
                expected: format!("{want} (blocks {}-{})", r.first_block, r.last_block),
                actual: got,
            }),
            _ => Ok(()),
        }
    }

    /// Scan the current region; `Ok(None)` when it has ended. `Data` bytes are copied into
    /// `out`, or with `out == None` lent as a slice of the current buffer (then a `Data`
    /// extent never runs past the buffer's end).
    fn scan(
        &mut self,
        mut out: Option<&mut [u8]>,
    ) -> Result<Option<(Extent, Option<SharedData>)>, ImageError> {
        let end = self.region.as_ref().and_then(|r| r.end);
        if end == Some(self.pos) {
            self.region = None;
            return Ok(None);
        }
        if self.lo == self.hi && self.refill(end)? == 0 {
            if let Some(e) = end {
                if self.pos < e {
                    let why = match self.plan {
                        Plan::Bmap { .. } => "the bmap",
                        Plan::Holes { .. } => "its size at open",
                        Plan::Whole { .. } => "the caller",
                    };
                    let total = match &self.plan {
                        Plan::Bmap { bmap, .. } => bmap.image_size,
                        Plan::Holes { size } => *size,
                        Plan::Whole { .. } => e,
                    };
                    return Err(self.truncated(total, why));
                }
            }
            self.region = None;
            return Ok(None);
        }
        let start = self.pos;
        let blen = self.block_len(end);
        if is_zero(&self.ibuf[self.lo..self.lo + blen]) {
            self.consume(blen)?;
            loop {
                if end == Some(self.pos) {
                    break;
                }
                if self.lo == self.hi && self.refill(end)? == 0 {
                    break;
                }
                let blen = self.block_len(end);
                if !is_zero(&self.ibuf[self.lo..self.lo + blen]) {
                    break;
                }
                self.consume(blen)?;
            }
            return Ok(Some((
                Extent {
                    offset: start,
                    len: self.pos - start,
                    kind: ExtentKind::Zero,
                },
                None,
            )));
        }
        let mut filled = 0usize;
        let mut blen = blen;
        let lent_from = self.lo;
        let cap = out.as_ref().map_or(usize::MAX, |b| b.len());
        loop {
            let room = cap - filled;
            if room == 0 || (blen > room && filled > 0) {
                break;
            }
            let n = blen.min(room);
            if let Some(buf) = out.as_deref_mut() {
                buf[filled..filled + n].copy_from_slice(&self.ibuf[self.lo..self.lo + n]);
            }
            filled += n;
            self.consume(n)?;
            if end == Some(self.pos) || filled == cap {
                break;
            }
            if self.lo == self.hi {
                if out.is_none() {
                    break; // lent extents stay within one buffer
                }
                if self.refill(end)? == 0 {
                    break;
                }
            }
            blen = self.block_len(end);
            if is_zero(&self.ibuf[self.lo..self.lo + blen]) {
                break;
            }
        }
        let ext = Extent {
            offset: start,
            len: filled as u64,
            kind: ExtentKind::Data,
        };
        let lent = out.is_none().then(|| SharedData {
            buf: self.ibuf.clone(),
            start: lent_from,
        });
        Ok(Some((ext, lent)))
    }

    fn next(
        &mut self,
        mut out: Option<&mut [u8]>,
    ) -> Result<Option<(Extent, Option<SharedData>)>, ImageError> {
        loop {
            if self.finished {
                return Ok(None);
            }
            if self.region.is_none() {
                if let Some(e) = self.next_region()? {
                    return Ok(Some((e, None)));
                }
                continue;
            }
            if let Some(e) = self.scan(out.as_deref_mut())? {
                return Ok(Some(e));
            }
        }
    }
}

fn check_bmap_size(b: &Bmap, size: u64, name: &str) -> Result<(), ImageError> {
    if b.image_size != size {
        return Err(ImageError::Invalid {
            path: name.to_string(),
            msg: format!(
                "the bmap {} describes a {}-byte image but the image is {size} bytes",
                b.path.display(),
                b.image_size
            ),
        });
    }
    Ok(())
}

/// lseek with SEEK_DATA/SEEK_HOLE; `Ok(None)` for ENXIO (no data at or after `pos`).
fn seek(fd: i32, pos: u64, whence: i32) -> io::Result<Option<u64>> {
    let off = i64::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a valid, owned descriptor has no memory effects.
    let r = unsafe { libc::lseek(fd, off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

impl Drop for ScanSource {
    fn drop(&mut self) {
        if let Input::Pipe { closed, .. } = &self.input {
            closed.store(true, Ordering::Relaxed);
        }
    }
}

impl ExtentSource for ScanSource {
    fn size_hint(&self) -> Option<u64> {
        match &self.plan {
            Plan::Holes { size } => Some(*size),
            Plan::Whole { expected, .. } => *expected,
            Plan::Bmap { bmap, .. } => Some(bmap.image_size),
        }
    }

    fn next_extent(&mut self, buf: &mut [u8]) -> Result<Option<Extent>, ImageError> {
        Ok(self.next(Some(buf))?.map(|(e, _)| e))
    }

    fn shares_buffers(&self) -> bool {
        true
    }

    fn next_shared(&mut self) -> Result<Option<(Extent, Option<SharedData>)>, ImageError> {
        self.next(None)
    }

    fn describe(&self) -> String {
        self.desc.clone()
    }

    fn take_range_checker(&mut self) -> Option<RangeChecker> {
        let Plan::Bmap { bmap, next: 0 } = &self.plan else {
            return None;
        };
        if self.checks_handed_out || self.pos != 0 || bmap.checksum == ChecksumKind::None {
            return None;
        }
        self.checks_handed_out = true;
        Some(RangeChecker::new(&self.name, bmap))
    }
}

/// Also the test helpers other modules' tests share (bmaps over in-memory images).
#[cfg(test)]
pub(crate) mod tests {
    use super::super::bmap::{BmapRange, ChecksumKind};
    use super::*;
    use sha2::Digest as _;

    /// Hands out at most `step` bytes per read, like a decompressor or a socket.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            let n = b.len().min(self.step).min(self.data.len() - self.at);
            b[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    /// An image with data, aligned and unaligned zero runs, and an odd length.
    fn sample() -> Vec<u8> {
        let mut v = vec![0u8; 5 * ZERO_BLOCK + 3 * 4096 + 17];
        let mut x = 0x9e37_79b9u32;
        for (i, b) in v.iter_mut().enumerate() {
            let blk = i / ZERO_BLOCK;
            if blk == 0 || blk == 2 || (blk == 4 && i % ZERO_BLOCK < 100) || i >= 5 * ZERO_BLOCK {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                *b = (x >> 24) as u8 | 1;
            }
        }
        v
    }

    fn expand(s: &mut dyn ExtentSource, buf_len: usize) -> Result<(Vec<u8>, u64), ImageError> {
        let mut buf = vec![0u8; buf_len];
        let mut out = Vec::new();
        let mut zero = 0;
        while let Some(e) = s.next_extent(&mut buf)? {
            assert_eq!(e.offset, out.len() as u64);
            assert!(e.len > 0);
            match e.kind {
                ExtentKind::Data => {
                    assert!(e.len as usize <= buf_len);
                    out.extend_from_slice(&buf[..e.len as usize]);
                }
                ExtentKind::Zero => {
                    zero += e.len;
                    out.resize(out.len() + e.len as usize, 0)
                }
                ExtentKind::Skip => out.resize(out.len() + e.len as usize, 0),
            }
        }
        Ok((out, zero))
    }

    fn stream(data: &[u8], step: usize, expected: Option<u64>, bmap: Option<Bmap>) -> ScanSource {
        let r = Trickle {
            data: data.to_vec(),
            at: 0,
            step,
        };
        ScanSource::stream(Box::new(r), "t", expected, bmap, None).unwrap()
    }

    #[test]
    fn streams_expand_exactly_whatever_the_read_and_buffer_sizes() {
        let v = sample();
        for step in [1 << 20, 4096, 1000] {
            for buf_len in [ZERO_BLOCK, 3 * ZERO_BLOCK, 5000, 1 << 20] {
                let mut s = stream(&v, step, None, None);
                let (out, zero) = expand(&mut s, buf_len).unwrap();
                assert_eq!(out, v, "step {step} buf {buf_len}");
                // Blocks 1 and 3 are all zero and must be found.
                assert!(zero >= 2 * ZERO_BLOCK as u64, "step {step} buf {buf_len}");
            }
        }
        let mut s = stream(&v, 4096, Some(v.len() as u64), None);
        assert_eq!(expand(&mut s, 1 << 20).unwrap().0, v);
        let mut s = stream(&v, 4096, Some(v.len() as u64 - 1), None);
        assert!(expand(&mut s, 1 << 20)
            .unwrap_err()
            .to_string()
            .contains("larger"));
        let mut s = stream(&[], 4096, None, None);
        assert_eq!(expand(&mut s, 4096).unwrap().0.len(), 0);
    }

    /// A bmap (format 2.0, sha256) mapping `ranges` (inclusive block numbers, 4 KiB blocks)
    /// of `v`.
    pub(crate) fn bmap_for(v: &[u8], ranges: &[(u64, u64)]) -> Bmap {
        let bs = 4096u64;
        let size = v.len() as u64;
        let ranges: Vec<BmapRange> = ranges
            .iter()
            .map(|&(a, b)| {
                let start = a * bs;
                let end = ((b + 1) * bs).min(size);
                BmapRange {
                    first_block: a,
                    last_block: b,
                    start,
                    end,
                    checksum: Some(hex::encode(sha2::Sha256::digest(
                        &v[start as usize..end as usize],
                    ))),
                }
            })
            .collect();
        Bmap {
            path: "t.bmap".into(),
            version: "2.0".into(),
            image_size: size,
            checksum: ChecksumKind::Sha256,
            ranges,
        }
    }

    /// What writing `v` through bmap `b` leaves on a zeroed target: the mapped ranges only.
    pub(crate) fn mapped_only(v: &[u8], b: &Bmap) -> Vec<u8> {
        let mut masked = vec![0u8; v.len()];
        for r in &b.ranges {
            let (a, e) = (r.start as usize, r.end as usize);
            masked[a..e].copy_from_slice(&v[a..e]);
        }
        masked
    }

    #[test]
    fn bmap_over_streams_and_files() {
        let v = sample();
        let last = (v.len() as u64).div_ceil(4096) - 1;
        // Mapped: first blocks, a range covering a zero block, the partial last block.
        let ranges = [(0, 3), (10, 40), (70, 75), (last - 1, last)];
        let b = bmap_for(&v, &ranges);
        let masked = mapped_only(&v, &b);
        for step in [1 << 20, 3000] {
            let mut s = stream(&v, step, None, Some(b.clone()));
            assert_eq!(expand(&mut s, 8192).unwrap().0, masked);
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.img");
        std::fs::write(&p, &v).unwrap();
        let f = File::open(&p).unwrap();
        let mut s = ScanSource::raw_file(f, "t.img", Some(b.clone()), Arc::default()).unwrap();
        assert_eq!(expand(&mut s, 1 << 20).unwrap().0, masked);

        // A corrupted byte inside range 2 is reported as that range, never Ok.
        let mut bad = v.clone();
        bad[11 * 4096] ^= 0xff;
        let mut s = stream(&bad, 1 << 20, None, Some(b.clone()));
        let e = expand(&mut s, 1 << 20).unwrap_err();
        assert!(
            matches!(e, ImageError::RangeChecksum { start, end, .. } if start == 10 * 4096 && end == 41 * 4096),
            "{e}"
        );
        // Stream shorter than the bmap's ImageSize.
        let mut s = stream(&v[..v.len() - 10], 4096, None, Some(b.clone()));
        assert!(expand(&mut s, 1 << 20).is_err());
        // File whose size differs from ImageSize: refused at open.
        let f = File::open(&p).unwrap();
        let mut b2 = b.clone();
        b2.image_size += 1;
        assert!(ScanSource::raw_file(f, "t.img", Some(b2), Arc::default()).is_err());
    }

    #[test]
    fn raw_file_holes_become_zero_extents() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("h.img");
        let v = sample();
        {
            let f = File::create(&p).unwrap();
            f.set_len(64 << 20).unwrap();
            f.write_all_at(&v, 8 << 20).unwrap();
            f.write_all_at(b"end", (64 << 20) - 3).unwrap();
        }
        let mut want = vec![0u8; 64 << 20];
        want[8 << 20..(8 << 20) + v.len()].copy_from_slice(&v);
        want[(64 << 20) - 3..].copy_from_slice(b"end");
        let f = File::open(&p).unwrap();
        let consumed = Arc::new(AtomicU64::new(0));
        let mut s = ScanSource::raw_file(f, "h.img", None, consumed.clone()).unwrap();
        assert_eq!(s.size_hint(), Some(64 << 20));
        let (out, zero) = expand(&mut s, 1 << 20).unwrap();
        assert!(out == want);
        assert!(zero > 60 << 20);
        assert_eq!(consumed.load(Ordering::Relaxed), 64 << 20);
    }
}
