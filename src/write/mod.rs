//! The write pipeline: image extents in, bytes on a [`Sink`] out, verified.
//!
//! ```text
//!  image-read thread          sbcflash-read thread      calling thread (writer)
//!  decompress/read straight ► scan: zero blocks, bmap ► bounded channel ► data: sbcflash-write0/1
//!  into the source's pooled    gaps; lend slices of      (block devices, [`behind`]) or sink.write_at;
//!  aligned buffers             those buffers (no copy)   zero/skip ranges, first MiB last
//!                                                             │ same Arc'd slices
//!                                          ┌──────────────────┴──────────────┐
//!                               sbcflash-hash: blake3 of the      sbcflash-check: bmap range
//!                               logical image + per-range         sha256/sha1 (when the
//!                               digests for read-back             source hands its checks over)
//! ```
//!
//! Each stage is a thread of its own so that on a small machine (2 cores) the scheduler can
//! spread decompression, sha256 and blake3 over the cores instead of chaining them on one
//! thread; a buffer returns to its pool when the writer and both hashers have dropped it.
//! A failed range checksum fails the write before the held-back head is written.
//!
//! Memory is bounded by the buffer pools (the source's, 8 × 4 MiB, for sources that lend
//! buffers; else ours, `buffers × buffer_size`, 6 × 4 MiB by default; buffers are allocated
//! on first use) plus the held-back first MiB, whatever the image size. The first MiB (partition tables) is
//! written only after everything else is written and synced and the digest (when one is
//! expected) matched, so an interrupted or failed write leaves no valid partition table.
//! Read-back verification covers every range that carried data (and small zero gaps inside
//! them); large `Zero` ranges rely on the sink's zeroing (BLKZEROOUT, holes) and are not
//! re-read, and `Skip` ranges have no defined contents.

/// The pooled aligned buffers live with the image sources, which fill them directly.
pub(crate) use crate::image::buffer;
mod behind;
mod delta;
mod error;
pub(crate) mod sink;
mod verify;

pub(crate) use delta::DeltaReport;
pub(crate) use error::{TargetState, WriteError};
pub use sink::{BlockDeviceSink, FileSink, Sink};
pub use verify::{compare_with_image, read_back, CompareReport};

use crate::exit::Classify;
use crate::image::bmap::RangeChecker;
use crate::image::zero::ZEROS;
use crate::image::{Extent, ExtentKind, ExtentSource, ImageError, LogicalHasher};
use crate::progress::Phase;
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
    /// Where `expected_blake3` came from, for the mismatch message (e.g. the sidecar's path).
    pub expected_from: Option<String>,
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
    /// Also compute the blake3 of the logical image as read back (`WriteReport::readback_blake3`,
    /// for the station's ledger); costs hashing the gaps as zeroes.
    pub readback_digest: bool,
    /// `--delta`: read the target first and write only the units that differ
    /// ([`delta`]); the target is not discarded.
    pub delta: bool,
    /// `--rewrites`: read-back ranges that differ are written again (from a fresh stream of
    /// the image, [`WriteOptions::reopen`]) up to this many times before the write fails.
    pub retries: u32,
    /// Opens the image again, for rewriting ranges that read back wrong; `None` (a pipe, a
    /// download) fails at the first mismatch, as without retries.
    pub reopen: Option<Reopen>,
}

/// Opens a fresh stream of the image being written.
pub(crate) type Reopen = Arc<dyn Fn() -> Result<Box<dyn ExtentSource>, ImageError> + Send + Sync>;

impl WriteOptions {
    /// A progress event of this job's `phase`.
    fn progress(&self, phase: Phase, done: u64, total: Option<u64>) -> Event {
        Event::Progress {
            job: self.job.clone(),
            phase,
            done,
            total,
        }
    }
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            verify: true,
            expected_blake3: None,
            expected_from: None,
            buffer_size: 4 << 20,
            buffers: 6,
            hold_back: 1 << 20,
            cancel: Arc::new(AtomicBool::new(false)),
            job: "write".into(),
            image_name: "image".into(),
            readback_digest: false,
            delta: false,
            retries: 1,
            reopen: None,
        }
    }
}

/// The expected digest for a mismatch message, with where it came from.
pub(crate) fn expected_with_origin(exp: &[u8; 32], opts: &WriteOptions) -> String {
    match &opts.expected_from {
        Some(from) => format!("{} (from {from})", hex::encode(exp)),
        None => hex::encode(exp),
    }
}

/// blake3 of one range of the target as written; read-back compares against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeDigest {
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) digest: [u8; 32],
}

/// What a finished write did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WriteReport {
    /// Logical size of the image.
    pub(crate) image_size: u64,
    /// Data bytes sent to the target (including the held-back head).
    pub(crate) bytes_written: u64,
    /// Bytes of `Zero` extents (zeroed by the sink: offload, holes or zero writes).
    pub(crate) bytes_zeroed: u64,
    /// Bytes of `Skip` extents (left alone).
    pub(crate) bytes_skipped: u64,
    /// blake3 of the logical image, hex.
    pub(crate) blake3: String,
    /// The expected digest was given and matched.
    pub digest_checked: bool,
    /// Read-back verification ran and passed; bytes read back.
    pub verified_bytes: Option<u64>,
    pub(crate) write_seconds: f64,
    pub(crate) verify_seconds: Option<f64>,
    /// blake3 of the logical image as read back from the medium (with `readback_digest`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) readback_blake3: Option<String>,
    /// With `--delta`: what was compared, left unchanged and written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) delta: Option<DeltaReport>,
    /// Ranges that read back wrong and were written again (`--rewrites`); a number above 0
    /// means a flaky card or reader.
    pub(crate) retried_ranges: u64,
    #[serde(skip)]
    pub(crate) ranges: Vec<RangeDigest>,
}

impl WriteReport {
    /// Bytes `--delta` found equal on the target and did not write (0 without `--delta`):
    /// with them, written + zeroed + skipped + unchanged is the image size.
    pub(crate) fn bytes_unchanged(&self) -> u64 {
        self.delta.as_ref().map_or(0, |d| d.unchanged)
    }

    /// One-line human summary.
    pub(crate) fn summary_line(&self, target: &str) -> String {
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
        let delta = self
            .delta
            .as_ref()
            .map(|d| {
                format!(
                    " (delta: compared {:.1} MiB, {:.1} MiB unchanged and not written, {:.1} MiB differed, {:.1} MiB written without comparing)",
                    mib(d.compared),
                    mib(d.unchanged),
                    mib(d.rewritten),
                    mib(d.written_uncompared)
                )
            })
            .unwrap_or_default();
        let retried = match self.retried_ranges {
            0 => String::new(),
            n => format!("; {n} range(s) read back wrong and were written again"),
        };
        format!(
            "{target}: wrote {:.1} MiB, zeroed {:.1} MiB, skipped {:.1} MiB of {:.1} MiB in {:.2} s ({:.0} MiB/s){}{delta}; {verified}{retried}; blake3 {}",
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
pub(crate) fn parse_blake3_hex(s: &str) -> Option<[u8; 32]> {
    let v = hex::decode(s.trim()).ok()?;
    v.try_into().ok()
}

/// What the reader hands the writer.
enum Item {
    Piece(Piece),
    End,
    Err(ImageError),
}

/// One piece of the logical image, in order. The writer writes it and hands the same piece
/// (the lent buffer slice, no copy) to the blake3 and range-check threads.
#[derive(Clone)]
enum Piece {
    /// `buf[start..start + len]` holds the bytes at `offset`.
    Data {
        offset: u64,
        len: usize,
        buf: Shared,
        start: usize,
    },
    /// A zero or skip extent.
    Gap(Extent),
}

impl Piece {
    /// The piece as an extent and, for data, its bytes (`None` for a gap).
    fn parts(&self) -> (Extent, Option<&[u8]>) {
        match self {
            Piece::Data {
                offset,
                len,
                buf,
                start,
            } => (
                Extent {
                    offset: *offset,
                    len: *len as u64,
                    kind: ExtentKind::Data,
                },
                Some(&buf[*start..*start + *len]),
            ),
            Piece::Gap(ext) => (*ext, None),
        }
    }
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
            let lend = source.shares_buffers();
            loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                if lend {
                    // The source's own buffers, lent: no copy into the pool's.
                    let item = match source.next_shared() {
                        Ok(Some((ext, Some(d)))) if ext.kind == ExtentKind::Data => {
                            Item::Piece(Piece::Data {
                                offset: ext.offset,
                                len: ext.len as usize,
                                buf: d.buf,
                                start: d.start,
                            })
                        }
                        Ok(Some((ext, _))) if ext.kind == ExtentKind::Data => {
                            Item::Err(ImageError::Invalid {
                                path: source.describe(),
                                msg: format!("data extent at {} came without its bytes", ext.offset),
                            })
                        }
                        Ok(Some((ext, _))) => Item::Piece(Piece::Gap(ext)),
                        Ok(None) => Item::End,
                        Err(e) => Item::Err(e),
                    };
                    let last = matches!(item, Item::End | Item::Err(_));
                    if tx.send(item).is_err() || last {
                        return;
                    }
                    continue;
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
                            Item::Piece(Piece::Data {
                                offset: ext.offset,
                                len: ext.len as usize,
                                buf: Arc::new(buf),
                                start: 0,
                            })
                        }
                    }
                    Ok(Some(ext)) => {
                        spare = Some(buf);
                        Item::Piece(Piece::Gap(ext))
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

/// The loop both hashing threads run: each piece in order as its extent and, for data, its
/// bytes (`None` for a zero or skip gap); stops at the first error `f` returns.
fn consume<E>(
    rx: Receiver<Piece>,
    mut f: impl FnMut(&Extent, Option<&[u8]>) -> Result<(), E>,
) -> Result<(), E> {
    for piece in rx {
        let (ext, bytes) = piece.parts();
        f(&ext, bytes)?;
    }
    Ok(())
}

/// The blake3 thread: the digest of the logical image ([`LogicalHasher`], the same hasher
/// `sbcflash hash` uses) and, for read-back, per-range digests.
fn spawn_hasher(
    rx: Receiver<Piece>,
    ranges: bool,
    max_range: u64,
) -> std::thread::JoinHandle<HashResult> {
    std::thread::Builder::new()
        .name("sbcflash-hash".into())
        .spawn(move || {
            let mut logical = LogicalHasher::single_threaded();
            let mut rh = RangeHasher {
                max: max_range,
                ranges: Vec::new(),
                open: None,
            };
            let Ok(()) = consume(rx, |ext, bytes| {
                match bytes {
                    Some(bytes) => {
                        logical.update(bytes);
                        if ranges {
                            rh.data(ext.offset, bytes);
                        }
                    }
                    None => {
                        logical.update_zeros(ext.len);
                        if ranges {
                            rh.gap(ext, &ZEROS[..MERGE_GAP as usize]);
                        }
                    }
                }
                Ok::<(), std::convert::Infallible>(())
            });
            rh.close();
            HashResult {
                digest: *logical.finalize().as_bytes(),
                ranges: rh.ranges,
            }
        })
        .expect("spawn hasher thread")
}

/// The range-checksum thread (bmap sha256/sha1): fed the same extents as the hasher, so
/// neither the reader nor the blake3 thread waits for it. It stops at the first bad range;
/// the writer notices (its sends fail) and fails the write before the head is written.
fn spawn_checker(
    rx: Receiver<Piece>,
    mut checker: RangeChecker,
) -> std::thread::JoinHandle<Result<(), ImageError>> {
    std::thread::Builder::new()
        .name("sbcflash-check".into())
        .spawn(move || {
            consume(rx, |ext, bytes| {
                checker.update_extent(ext, bytes.unwrap_or_default())
            })?;
            checker.finish()
        })
        .expect("spawn checker thread")
}

/// Collect the range checker's verdict: `Ok` only when it ran to the end without a mismatch.
fn checker_result(h: std::thread::JoinHandle<Result<(), ImageError>>) -> Result<(), WriteError> {
    match h.join() {
        Ok(r) => r.map_err(WriteError::from),
        Err(_) => Err(WriteError::Internal("range checker thread panicked".into())),
    }
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
        phase: Phase::Write,
        total: size_hint,
        detail: Some(detail),
    });
    // Every failure is also an `Error` event of the phase it ended.
    let failed = |phase: Phase, e: WriteError| {
        reporter.report(Event::Error {
            job: job.clone(),
            phase,
            message: e.to_string(),
            exit_code: e.exit().code(),
        });
        e
    };
    let mut state = TargetState::Untouched;
    let mut report = write_inner(source, sink, opts, reporter, size_hint, &mut state)
        .map_err(|e| failed(Phase::Write, e.with_state(state)))?;
    reporter.report(Event::Finish {
        job: job.clone(),
        phase: Phase::Write,
        summary: serde_json::to_value(&report).unwrap_or_default(),
    });
    if opts.verify {
        let t = Instant::now();
        let total: u64 = report.ranges.iter().map(|r| r.len).sum();
        reporter.report(Event::Start {
            job: job.clone(),
            phase: Phase::Verify,
            total: Some(total),
            detail: None,
        });
        let size = opts.readback_digest.then_some(report.image_size);
        let back = verify::read_back_retrying(sink, &report.ranges, opts, reporter, size)
            .map_err(|e| failed(Phase::Verify, e.with_state(TargetState::Unverified)))?;
        report.verified_bytes = Some(back.verified);
        report.retried_ranges = back.retried;
        report.readback_blake3 = back.digest.map(hex::encode);
        report.verify_seconds = Some(t.elapsed().as_secs_f64());
        reporter.report(Event::Finish {
            job: job.clone(),
            phase: Phase::Verify,
            summary: serde_json::json!({ "bytes": back.verified, "seconds": t.elapsed().as_secs_f64() }),
        });
    }
    Ok(report)
}

/// Refuses an image whose known size is larger than the target, before anything is written.
fn fits(size_hint: Option<u64>, sink: &dyn Sink) -> Result<(), WriteError> {
    match (size_hint, sink.capacity()) {
        (Some(end), Some(capacity)) if end > capacity => Err(WriteError::TooLarge {
            target: sink.name().to_string(),
            end,
            capacity,
        }),
        _ => Ok(()),
    }
}

// Longer than 150 lines on purpose: the order of a write is its safety (target state
// changes, range checks before the head, the head last), and it reads top to bottom here.
fn write_inner(
    mut source: Box<dyn ExtentSource>,
    sink: &mut dyn Sink,
    opts: &WriteOptions,
    reporter: &dyn Reporter,
    size_hint: Option<u64>,
    state: &mut TargetState,
) -> Result<WriteReport, WriteError> {
    let start = Instant::now();
    let target = sink.name().to_string();
    fits(size_hint, sink)?;
    if opts.cancel.load(Ordering::Relaxed) {
        return Err(WriteError::Interrupted { target, done: 0 });
    }
    let mut delta = match opts.delta {
        // Nothing is discarded or written until a unit differs: the target stays as it was.
        true => {
            sink.prepare_keeping(size_hint)?;
            Some(delta::Delta::new(
                sink.medium_reader(),
                opts.buffer_size.max(buffer::ALIGN) as u64,
            )?)
        }
        false => {
            // From here on (a discard, a truncation) the old contents are gone.
            *state = TargetState::Incomplete;
            sink.prepare(size_hint)?;
            None
        }
    };

    let buffer_size = opts.buffer_size.max(buffer::ALIGN);
    let pool = Pool::new(opts.buffers.max(2), buffer_size);
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = crossbeam_channel::bounded::<Item>(opts.buffers.max(2) * 2);
    let checks = source.take_range_checker();
    let reader = spawn_reader(source, pool, tx, stop.clone());
    let (htx, hrx) = crossbeam_channel::unbounded::<Piece>();
    // With --delta the read-back ranges are the units written, digested by `delta`.
    let hasher = spawn_hasher(hrx, opts.verify && !opts.delta, buffer_size as u64);
    let (mut ctx, mut checker) = match checks {
        Some(c) => {
            let (ctx, crx) = crossbeam_channel::unbounded::<Piece>();
            (Some(ctx), Some(spawn_checker(crx, c)))
        }
        None => (None, None),
    };
    // Send to the range checker; a failed send means it stopped at a bad range: its error.
    let mut to_checker = |item: Piece| -> Result<(), WriteError> {
        if let Some(tx) = &ctx {
            if tx.send(item).is_err() {
                ctx = None;
                if let Some(h) = checker.take() {
                    checker_result(h)?;
                }
                return Err(WriteError::Internal("range checker stopped early".into()));
            }
        }
        Ok(())
    };

    // Stop the reader however we leave; it may be blocked in a slow source, so it is never
    // joined on the error paths (it exits at its next poll).
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop_guard = StopOnDrop(stop);
    // Data pieces go to two writer threads where the sink allows (block devices).
    let mut behind = match (&delta, sink.medium_writer()) {
        (None, Some(w)) => Some(behind::WriteBehind::spawn(w)?),
        _ => None,
    };

    let hold = opts.hold_back;
    let mut head = AlignedBuf::new(hold.max(1) as usize);
    let mut pos = 0u64; // next expected logical offset
    let (mut written, mut zeroed, mut skipped) = (0u64, 0u64, 0u64);
    let stream_err = |offset: u64, msg: String| WriteError::Stream {
        image: opts.image_name.clone(),
        offset,
        msg,
    };

    // With --delta (units written through `put`), the head is cleared before the first
    // differing unit is written, and written last: an interrupted delta write leaves no
    // valid partition table either.
    let mut head_cleared = false;
    let mut put = |sink: &mut dyn Sink,
                   state: &mut TargetState,
                   pieces: &[Piece]|
     -> Result<(u64, u64), WriteError> {
        if !head_cleared {
            let n = size_hint.unwrap_or(hold).min(hold);
            *state = TargetState::Incomplete;
            sink.zero_range(0, n)?;
            sink.sync()?;
            head_cleared = true;
        }
        let (mut data, mut zero) = (0, 0);
        for p in pieces {
            let (ext, bytes) = p.parts();
            let from = ext.offset.max(hold);
            match bytes {
                Some(bytes) => {
                    if from < ext.end() {
                        sink.write_at(from, &bytes[(from - ext.offset) as usize..])?;
                    }
                    data += ext.len;
                }
                None if from < ext.end() => match ext.kind {
                    ExtentKind::Zero => {
                        sink.zero_range(from, ext.end() - from)?;
                        zero += ext.len;
                    }
                    _ => sink.skip_range(from, ext.end() - from)?,
                },
                None if ext.kind == ExtentKind::Zero => zero += ext.len,
                None => {}
            }
        }
        Ok((data, zero))
    };
    // Takes compared units off the delta queue: `all` at the end, else while it is full.
    let mut drain = |delta: &mut Option<delta::Delta>,
                     sink: &mut dyn Sink,
                     state: &mut TargetState,
                     all: bool,
                     counts: &mut (u64, u64, u64)|
     -> Result<(), WriteError> {
        let Some(d) = delta else { return Ok(()) };
        while (all && d.queued() > 0) || d.full() {
            let Some(ready) = d.next(sink)? else { break };
            if ready.write {
                let (w, z) = put(sink, state, &ready.pieces)?;
                counts.0 += w;
                counts.1 += z;
            } else {
                for p in &ready.pieces {
                    if let (ext, None) = p.parts() {
                        if ext.kind == ExtentKind::Skip {
                            counts.2 += ext.len;
                        }
                    }
                }
            }
        }
        Ok(())
    };
    let mut counts = (0u64, 0u64, 0u64);
    loop {
        if opts.cancel.load(Ordering::Relaxed) {
            let _ = sink.sync();
            return Err(WriteError::Interrupted { target, done: pos });
        }
        let item = match rx.recv_timeout(POLL) {
            Ok(i) => i,
            Err(RecvTimeoutError::Timeout) => {
                // The reader may wait for buffers the queued units hold: hand them on.
                if let Some(d) = &mut delta {
                    d.close();
                }
                drain(&mut delta, sink, state, true, &mut counts)?;
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(WriteError::Internal(
                    "reader thread ended unexpectedly".into(),
                ))
            }
        };
        let piece = match item {
            Item::Piece(p) => p,
            Item::End => break,
            Item::Err(e) => return Err(e.into()),
        };
        let (ext, bytes) = piece.parts();
        if ext.offset != pos {
            let what = if bytes.is_some() {
                "data extent"
            } else {
                "extent"
            };
            return Err(stream_err(
                ext.offset,
                format!("{what} starts at {}, expected {pos}", ext.offset),
            ));
        }
        to_checker(piece.clone())?;
        let _ = htx.send(piece.clone());
        if let Some(d) = &mut delta {
            // The head is kept whatever the verdict: written last if anything differed.
            if let Some(data) = bytes {
                if ext.offset < hold {
                    let h_end = ext.end().min(hold);
                    head[ext.offset as usize..h_end as usize]
                        .copy_from_slice(&data[..(h_end - ext.offset) as usize]);
                }
            }
            pos = ext.end();
            d.push(piece);
            drain(&mut delta, sink, state, false, &mut counts)?;
            reporter.report(Event::Progress {
                job: opts.job.clone(),
                phase: crate::progress::Phase::Write,
                done: pos,
                total: size_hint,
            });
            continue;
        }
        match bytes {
            Some(data) => {
                let (offset, len) = (ext.offset, data.len());
                let end = offset + len as u64;
                let mut from = offset;
                if offset < hold {
                    let h_end = end.min(hold);
                    head[offset as usize..h_end as usize]
                        .copy_from_slice(&data[..(h_end - offset) as usize]);
                    from = h_end;
                }
                if from < end {
                    let skip = (from - offset) as usize;
                    let handed = match &mut behind {
                        Some(b) => b.send(from, &piece, skip)?,
                        None => false,
                    };
                    if !handed {
                        sink.write_at(from, &data[skip..])?;
                    }
                }
                written += len as u64;
                pos = end;
            }
            None => {
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
        }
        reporter.report(opts.progress(Phase::Write, pos, size_hint));
    }
    if let Some(b) = &mut behind {
        b.finish()?;
    }
    if let Some(d) = &mut delta {
        d.close();
    }
    drain(&mut delta, sink, state, true, &mut counts)?;
    written += counts.0;
    zeroed += counts.1;
    skipped += counts.2;
    let (delta_report, delta_ranges) = match delta {
        Some(mut d) => {
            let ranges = d.take_written()?;
            let r = d.report.clone();
            d.finish();
            (Some(r), Some(ranges))
        }
        None => (None, None),
    };
    drop(htx);
    drop(ctx);
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
    // Every bmap range checksum must have passed before the head is written.
    if let Some(h) = checker.take() {
        checker_result(h)?;
    }
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
                expected: expected_with_origin(&exp, opts),
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
    // Everything else is on the medium: now the partition table area (with --delta, only
    // when something differed and the head was cleared for it).
    let head_len = hold.min(image_size) as usize;
    let unchanged = delta_report.is_some() && *state == TargetState::Untouched;
    if !unchanged {
        *state = TargetState::IncompleteHead;
        if head_len > 0 {
            sink.write_at(0, &head[..head_len])?;
            sink.sync()?;
        }
        *state = TargetState::Unverified;
    }
    sink.finalize(image_size)?;
    let ranges = match delta_ranges {
        Some(mut written) => {
            if !unchanged && head_len > 0 {
                written.push(RangeDigest {
                    offset: 0,
                    len: head_len as u64,
                    digest: *blake3::hash(&head[..head_len]).as_bytes(),
                });
                written.sort_by_key(|r| r.offset);
            }
            written
        }
        None => hashed.ranges,
    };
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
        readback_blake3: None,
        delta: delta_report,
        retried_ranges: 0,
        ranges,
    })
}

#[cfg(test)]
mod tests;
