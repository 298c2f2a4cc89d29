//! The write pipeline: image extents in, bytes on a [`Sink`] out, verified.
//!
//! ```text
//!  reader thread            calling thread (writer)              hasher thread
//!  source.next_extent() ──► bounded channel ──► sink.write_at ──► blake3 of the logical image
//!  into pooled aligned      (buffers return      zero/skip ranges  + per-range digests that
//!  buffers                   to the pool)        first MiB last    read-back verify compares
//! ```
//!
//! Memory is bounded by the buffer pool (`buffers × buffer_size`, 6 × 4 MiB by default) plus
//! the held-back first MiB, whatever the image size. The first MiB (partition tables) is
//! written only after everything else is written and synced and the digest (when one is
//! expected) matched, so an interrupted or failed write leaves no valid partition table.
//! Read-back verification covers every range that carried data (and small zero gaps inside
//! them); large `Zero` ranges rely on the sink's zeroing (BLKZEROOUT, holes) and are not
//! re-read, and `Skip` ranges have no defined contents.

pub mod buffer;
mod error;
pub mod sink;
mod verify;

pub use error::WriteError;
pub use sink::{BlockDeviceSink, FileSink, Sink};
pub use verify::{compare_with_image, read_back, CompareReport};

use crate::image::{Extent, ExtentKind, ExtentSource, ImageError};
use crate::progress::{Event, Reporter};
use buffer::{AlignedBuf, Pool, Shared};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tunables and policy for one write.
#[derive(Clone)]
pub struct WriteOptions {
    /// Read everything written back from the medium and compare per-range blake3.
    pub verify: bool,
    /// Expected blake3 of the logical image; a mismatch fails the write before the partition
    /// table is written.
    pub expected_blake3: Option<[u8; 32]>,
    /// Size of each pooled buffer (a multiple of 4096).
    pub buffer_size: usize,
    /// Number of pooled buffers: the depth of the reader → writer queue.
    pub buffers: usize,
    /// Bytes at the start of the target written last (the partition table area).
    pub hold_back: u64,
    /// Set from a signal handler or another thread to stop cleanly.
    pub cancel: Arc<AtomicBool>,
    /// `job` name used in progress events (a device path, a station slot).
    pub job: String,
    /// Name of the image for messages.
    pub image_name: String,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            verify: true,
            expected_blake3: None,
            buffer_size: 4 << 20,
            buffers: 6,
            hold_back: 1 << 20,
            cancel: Arc::new(AtomicBool::new(false)),
            job: "write".into(),
            image_name: "image".into(),
        }
    }
}

/// blake3 of one range of the target as written; read-back compares against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeDigest {
    pub offset: u64,
    pub len: u64,
    pub digest: [u8; 32],
}

/// What a finished write did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WriteReport {
    /// Logical size of the image.
    pub image_size: u64,
    /// Data bytes sent to the target (including the held-back head).
    pub bytes_written: u64,
    /// Bytes of `Zero` extents (zeroed by the sink: offload, holes or zero writes).
    pub bytes_zeroed: u64,
    /// Bytes of `Skip` extents (left alone).
    pub bytes_skipped: u64,
    /// blake3 of the logical image, hex.
    pub blake3: String,
    /// The expected digest was given and matched.
    pub digest_checked: bool,
    /// Read-back verification ran and passed; bytes read back.
    pub verified_bytes: Option<u64>,
    pub write_seconds: f64,
    pub verify_seconds: Option<f64>,
    #[serde(skip)]
    pub ranges: Vec<RangeDigest>,
}

impl WriteReport {
    /// One-line human summary.
    pub fn summary_line(&self, target: &str) -> String {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let rate = if self.write_seconds > 0.0 {
            mib(self.image_size) / self.write_seconds
        } else {
            0.0
        };
        let verified = match (self.verified_bytes, self.digest_checked) {
            (Some(_), true) => "read back and digest verified",
            (Some(_), false) => "read back verified",
            (None, true) => "digest verified, not read back",
            (None, false) => "NOT read back (--no-verify)",
        };
        format!(
            "{target}: wrote {:.1} MiB, zeroed {:.1} MiB, skipped {:.1} MiB of {:.1} MiB in {:.2} s ({:.0} MiB/s){}; {verified}; blake3 {}",
            mib(self.bytes_written),
            mib(self.bytes_zeroed),
            mib(self.bytes_skipped),
            mib(self.image_size),
            self.write_seconds,
            rate,
            self.verify_seconds
                .map(|v| format!(", verify {v:.2} s"))
                .unwrap_or_default(),
            self.blake3
        )
    }
}

/// Parse a 64-hex-digit blake3 digest.
pub fn parse_blake3_hex(s: &str) -> Option<[u8; 32]> {
    let v = hex::decode(s.trim()).ok()?;
    v.try_into().ok()
}

enum Item {
    Data {
        offset: u64,
        len: usize,
        buf: Shared,
    },
    Gap(Extent),
    End,
    Err(ImageError),
}

enum HashItem {
    Data {
        offset: u64,
        len: usize,
        buf: Shared,
    },
    Gap(Extent),
}

const POLL: Duration = Duration::from_millis(100);

/// Spawn the reader: pulls extents into pooled buffers until the end, an error or `stop`.
fn spawn_reader(
    mut source: Box<dyn ExtentSource>,
    pool: Pool,
    tx: Sender<Item>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("sbcflash-read".into())
        .spawn(move || {
            let mut spare: Option<buffer::Pooled> = None;
            loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let mut buf = match spare.take() {
                    Some(b) => b,
                    None => match pool.get_timeout(POLL) {
                        Some(b) => b,
                        None => continue,
                    },
                };
                let item = match source.next_extent(&mut buf) {
                    Ok(Some(ext)) if ext.kind == ExtentKind::Data => {
                        if ext.len > buf.len() as u64 {
                            Item::Err(ImageError::Invalid {
                                path: source.describe(),
                                msg: format!(
                                    "source returned a data extent of {} bytes at offset {} for a {}-byte buffer",
                                    ext.len,
                                    ext.offset,
                                    buf.len()
                                ),
                            })
                        } else {
                            Item::Data {
                                offset: ext.offset,
                                len: ext.len as usize,
                                buf: Arc::new(buf),
                            }
                        }
                    }
                    Ok(Some(ext)) => {
                        spare = Some(buf);
                        Item::Gap(ext)
                    }
                    Ok(None) => Item::End,
                    Err(e) => Item::Err(e),
                };
                let last = matches!(item, Item::End | Item::Err(_));
                if tx.send(item).is_err() || last {
                    return;
                }
            }
        })
        .expect("spawn reader thread")
}

/// Running per-range digests: contiguous data (and small zero gaps between data) up to
/// `max` bytes per range, so the list stays small and each range is one read-back request.
struct RangeHasher {
    max: u64,
    ranges: Vec<RangeDigest>,
    open: Option<(u64, u64, blake3::Hasher)>,
}

/// Zero gaps up to this size are folded into the surrounding range (and read back).
const MERGE_GAP: u64 = 1 << 20;

impl RangeHasher {
    fn close(&mut self) {
        if let Some((offset, len, h)) = self.open.take() {
            self.ranges.push(RangeDigest {
                offset,
                len,
                digest: *h.finalize().as_bytes(),
            });
        }
    }
    fn data(&mut self, offset: u64, bytes: &[u8]) {
        let len = bytes.len() as u64;
        match &mut self.open {
            Some((o, l, h)) if *o + *l == offset && *l + len <= self.max => {
                h.update(bytes);
                *l += len;
            }
            _ => {
                self.close();
                let mut h = blake3::Hasher::new();
                h.update(bytes);
                self.open = Some((offset, len, h));
            }
        }
    }
    fn gap(&mut self, ext: &Extent, zeroes: &[u8]) {
        match &mut self.open {
            Some((o, l, h))
                if ext.kind == ExtentKind::Zero
                    && ext.len <= MERGE_GAP
                    && *o + *l == ext.offset
                    && *l + ext.len <= self.max =>
            {
                feed_zeroes(h, ext.len, zeroes);
                *l += ext.len;
            }
            _ => self.close(),
        }
    }
}

fn feed_zeroes(h: &mut blake3::Hasher, mut len: u64, zeroes: &[u8]) {
    while len > 0 {
        let n = (len as usize).min(zeroes.len());
        h.update(&zeroes[..n]);
        len -= n as u64;
    }
}

struct HashResult {
    digest: [u8; 32],
    ranges: Vec<RangeDigest>,
}

fn spawn_hasher(
    rx: Receiver<HashItem>,
    ranges: bool,
    max_range: u64,
) -> std::thread::JoinHandle<HashResult> {
    std::thread::Builder::new()
        .name("sbcflash-hash".into())
        .spawn(move || {
            let zeroes = vec![0u8; 1 << 20];
            let mut logical = blake3::Hasher::new();
            let mut rh = RangeHasher {
                max: max_range,
                ranges: Vec::new(),
                open: None,
            };
            for item in rx {
                match item {
                    HashItem::Data { offset, len, buf } => {
                        let bytes = &buf[..len];
                        logical.update(bytes);
                        if ranges {
                            rh.data(offset, bytes);
                        }
                    }
                    HashItem::Gap(ext) => {
                        feed_zeroes(&mut logical, ext.len, &zeroes);
                        if ranges {
                            rh.gap(&ext, &zeroes);
                        }
                    }
                }
            }
            rh.close();
            HashResult {
                digest: *logical.finalize().as_bytes(),
                ranges: rh.ranges,
            }
        })
        .expect("spawn hasher thread")
}

/// Write `source` to `sink`: the whole job, from prepare to read-back verification.
///
/// On any failure the held-back first MiB is not written, so the target has no valid
/// partition table. `Interrupted` is returned when `opts.cancel` is set.
pub fn run(
    source: Box<dyn ExtentSource>,
    sink: &mut dyn Sink,
    opts: &WriteOptions,
    reporter: &dyn Reporter,
) -> Result<WriteReport, WriteError> {
    let job = opts.job.clone();
    let size_hint = source.size_hint();
    let detail = source.describe();
    reporter.report(Event::Start {
        job: job.clone(),
        phase: "write".into(),
        total: size_hint,
        detail: Some(detail),
    });
    let result = write_inner(source, sink, opts, reporter, size_hint);
    let mut report = match result {
        Ok(r) => r,
        Err(e) => {
            reporter.report(Event::Error {
                job,
                phase: "write".into(),
                message: e.to_string(),
                exit_code: e.exit().code(),
            });
            return Err(e);
        }
    };
    reporter.report(Event::Finish {
        job: job.clone(),
        phase: "write".into(),
        summary: serde_json::to_value(&report).unwrap_or_default(),
    });
    if opts.verify {
        let t = Instant::now();
        let total: u64 = report.ranges.iter().map(|r| r.len).sum();
        reporter.report(Event::Start {
            job: job.clone(),
            phase: "verify".into(),
            total: Some(total),
            detail: None,
        });
        match read_back(sink, &report.ranges, opts, reporter) {
            Ok(n) => {
                report.verified_bytes = Some(n);
                report.verify_seconds = Some(t.elapsed().as_secs_f64());
                reporter.report(Event::Finish {
                    job,
                    phase: "verify".into(),
                    summary: serde_json::json!({ "bytes": n, "seconds": t.elapsed().as_secs_f64() }),
                });
            }
            Err(e) => {
                reporter.report(Event::Error {
                    job,
                    phase: "verify".into(),
                    message: e.to_string(),
                    exit_code: e.exit().code(),
                });
                return Err(e);
            }
        }
    }
    Ok(report)
}

fn write_inner(
    source: Box<dyn ExtentSource>,
    sink: &mut dyn Sink,
    opts: &WriteOptions,
    reporter: &dyn Reporter,
    size_hint: Option<u64>,
) -> Result<WriteReport, WriteError> {
    let start = Instant::now();
    let target = sink.name().to_string();
    if let (Some(sz), Some(cap)) = (size_hint, sink.capacity()) {
        if sz > cap {
            return Err(WriteError::TooLarge {
                target,
                end: sz,
                capacity: cap,
            });
        }
    }
    if opts.cancel.load(Ordering::Relaxed) {
        return Err(WriteError::Interrupted { target, done: 0 });
    }
    sink.prepare(size_hint)?;

    let buffer_size = opts.buffer_size.max(buffer::ALIGN);
    let pool = Pool::new(opts.buffers.max(2), buffer_size);
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = crossbeam_channel::bounded::<Item>(opts.buffers.max(2) * 2);
    let reader = spawn_reader(source, pool, tx, stop.clone());
    let (htx, hrx) = crossbeam_channel::unbounded::<HashItem>();
    let hasher = spawn_hasher(hrx, opts.verify, buffer_size as u64);

    // Stop the reader however we leave; it may be blocked in a slow source, so it is never
    // joined on the error paths (it exits at its next poll).
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop_guard = StopOnDrop(stop);

    let hold = opts.hold_back;
    let mut head = AlignedBuf::new(hold.max(1) as usize);
    let mut pos = 0u64; // next expected logical offset
    let (mut written, mut zeroed, mut skipped) = (0u64, 0u64, 0u64);
    let stream_err = |offset: u64, msg: String| WriteError::Stream {
        image: opts.image_name.clone(),
        offset,
        msg,
    };

    loop {
        if opts.cancel.load(Ordering::Relaxed) {
            let _ = sink.sync();
            return Err(WriteError::Interrupted { target, done: pos });
        }
        let item = match rx.recv_timeout(POLL) {
            Ok(i) => i,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => {
                return Err(WriteError::Internal(
                    "reader thread ended unexpectedly".into(),
                ))
            }
        };
        match item {
            Item::Data { offset, len, buf } => {
                if offset != pos {
                    return Err(stream_err(
                        offset,
                        format!("data extent starts at {offset}, expected {pos}"),
                    ));
                }
                let _ = htx.send(HashItem::Data {
                    offset,
                    len,
                    buf: buf.clone(),
                });
                let end = offset + len as u64;
                let mut from = offset;
                if offset < hold {
                    let h_end = end.min(hold);
                    head[offset as usize..h_end as usize]
                        .copy_from_slice(&buf[..(h_end - offset) as usize]);
                    from = h_end;
                }
                if from < end {
                    sink.write_at(from, &buf[(from - offset) as usize..len])?;
                }
                written += len as u64;
                pos = end;
            }
            Item::Gap(ext) => {
                if ext.offset != pos {
                    return Err(stream_err(
                        ext.offset,
                        format!("extent starts at {}, expected {pos}", ext.offset),
                    ));
                }
                let _ = htx.send(HashItem::Gap(ext));
                let from = ext.offset.max(hold);
                if from < ext.end() {
                    match ext.kind {
                        ExtentKind::Zero => sink.zero_range(from, ext.end() - from)?,
                        _ => sink.skip_range(from, ext.end() - from)?,
                    }
                }
                match ext.kind {
                    ExtentKind::Zero => zeroed += ext.len,
                    _ => skipped += ext.len,
                }
                pos = ext.end();
            }
            Item::End => break,
            Item::Err(e) => return Err(e.into()),
        }
        reporter.report(Event::Progress {
            job: opts.job.clone(),
            phase: "write".into(),
            done: pos,
            total: size_hint,
        });
    }
    drop(htx);
    let _ = reader.join();
    if let Some(sz) = size_hint {
        if pos != sz {
            return Err(stream_err(
                pos,
                format!("image ended at {pos} bytes but announced {sz}"),
            ));
        }
    }
    let image_size = pos;
    sink.sync()?;
    let hashed = hasher
        .join()
        .map_err(|_| WriteError::Internal("hasher thread panicked".into()))?;
    let actual = hex::encode(hashed.digest);
    if let Some(exp) = opts.expected_blake3 {
        if exp != hashed.digest {
            return Err(WriteError::Digest {
                image: opts.image_name.clone(),
                target,
                expected: hex::encode(exp),
                actual,
                head_written: false,
            });
        }
    }
    if opts.cancel.load(Ordering::Relaxed) {
        return Err(WriteError::Interrupted {
            target,
            done: image_size,
        });
    }
    // Everything else is on the medium: now the partition table area.
    let head_len = hold.min(image_size) as usize;
    if head_len > 0 {
        sink.write_at(0, &head[..head_len])?;
        sink.sync()?;
    }
    sink.finalize(image_size)?;
    Ok(WriteReport {
        image_size,
        bytes_written: written,
        bytes_zeroed: zeroed,
        bytes_skipped: skipped,
        blake3: actual,
        digest_checked: opts.expected_blake3.is_some(),
        verified_bytes: None,
        write_seconds: start.elapsed().as_secs_f64(),
        verify_seconds: None,
        ranges: hashed.ranges,
    })
}

#[cfg(test)]
mod tests;
