//! Reading the target back. Two ways: against the per-range digests recorded while writing
//! (after `write`), and against an image streamed again (`sbcflash verify IMAGE TARGET`).
//! Reads go through the sink, which uses O_DIRECT on devices so the page cache cannot answer
//! for the medium; several reads are kept in flight (one per worker, each hashing its own
//! range) so a device with latency is never left idle while a range is hashed.

use super::buffer::{AlignedBuf, Pool, Pooled};
use super::sink::MediumReader;
use super::{RangeDigest, Sink, WriteError, WriteOptions, POLL};
use crate::image::{ExtentKind, ExtentSource, LogicalHasher};
use crate::progress::Phase;
use crate::progress::{Event, Reporter};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Requests in flight during read-back: enough to keep a card's or a loop device's queue
/// busy while earlier ranges are hashed, few enough to bound memory (each holds one range
/// buffer, 4 MiB by default).
pub(crate) const READ_BACK_DEPTH: usize = 4;

/// Read every range back and compare its blake3. Returns the number of bytes read back, or
/// [`WriteError::Mismatch`] naming the first range (lowest offset) that differs.
///
/// With a [`super::sink::MediumReader`] (block devices, files), [`READ_BACK_DEPTH`] workers
/// each read a range (O_DIRECT where the target allows it), hash it and take the next, so
/// several reads are in flight and hashing overlaps them. Ranges are handed out in order and
/// a worker finishes the range it holds, so after the first mismatch every lower range has
/// been checked too: the lowest bad range is the one reported.
pub fn read_back(
    sink: &mut dyn Sink,
    ranges: &[RangeDigest],
    opts: &WriteOptions,
    reporter: &dyn Reporter,
) -> Result<u64, WriteError> {
    let (n, bad) = read_back_some(sink, ranges, opts, reporter, 1, None)?;
    match bad.first() {
        Some(&i) => Err(mismatch(sink.name(), &ranges[i])),
        None => Ok(n),
    }
}

/// Most ranges rewritten in one pass (4 MiB each by default): more bad ranges than this
/// mean a failing medium, and rewriting them would hold too much of the image in memory.
pub(crate) const MAX_REWRITE: usize = 8;

/// What a read-back found: bytes read back, ranges written again, and (when asked for) the
/// blake3 of the logical image as read back from the medium.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadBack {
    pub(crate) verified: u64,
    pub(crate) retried: u64,
    pub(crate) digest: Option<[u8; 32]>,
}

/// [`read_back`] with `opts.retries`: ranges that read back wrong are written again from a
/// fresh stream of the image (`opts.reopen`), synced, and read back again, up to
/// `opts.retries` times.
///
/// With `image_size`, also the blake3 of the logical image as read back: the data ranges as
/// read, the gaps (`Zero`/`Skip`) hashed as zeroes, as the image digest defines them. It equals
/// the image's blake3 exactly when every range came back equal; the ledger records it beside
/// the image digest that was verified. After a rewrite the first pass's digest covered bad
/// bytes, so the whole image is read back once more for it.
pub(crate) fn read_back_retrying(
    sink: &mut dyn Sink,
    ranges: &[RangeDigest],
    opts: &WriteOptions,
    reporter: &dyn Reporter,
    image_size: Option<u64>,
) -> Result<ReadBack, WriteError> {
    let can = opts.retries > 0 && opts.reopen.is_some();
    let limit = if can { MAX_REWRITE + 1 } else { 1 };
    let chain = image_size.map(|_| Chain::default());
    let (verified, mut bad) = read_back_some(sink, ranges, opts, reporter, limit, chain.as_ref())?;
    let mut check: Vec<RangeDigest> = ranges.to_vec();
    let mut retried = 0u64;
    let mut attempt = 0u32;
    while let Some(&first) = bad.first() {
        let lowest = check[first];
        let (Some(reopen), true, true) = (
            &opts.reopen,
            attempt < opts.retries,
            bad.len() <= MAX_REWRITE,
        ) else {
            if retried > 0 {
                tracing::warn!(
                    target = sink.name(),
                    "{retried} range(s) were written again and still read back wrong"
                );
            }
            return Err(mismatch(sink.name(), &lowest));
        };
        attempt += 1;
        let todo: Vec<RangeDigest> = bad.iter().map(|&i| check[i]).collect();
        reporter.report(Event::Message {
            job: opts.job.clone(),
            level: crate::progress::Level::Warn,
            text: format!(
                "{}: {} range(s) read back wrong (first at offset {}); writing them again (attempt {attempt} of {})",
                sink.name(),
                todo.len(),
                lowest.offset,
                opts.retries
            ),
        });
        rewrite(sink, reopen, &todo, opts)?;
        retried += todo.len() as u64;
        let (_, again) = read_back_some(sink, &todo, opts, reporter, limit, None)?;
        bad = again;
        check = todo;
    }
    let digest = match (chain, image_size) {
        (Some(c), Some(size)) if retried == 0 => Some(c.finish(size)),
        (Some(_), Some(size)) => {
            let again = Chain::default();
            let (_, bad) = read_back_some(sink, ranges, opts, reporter, 1, Some(&again))?;
            if let Some(&i) = bad.first() {
                return Err(mismatch(sink.name(), &ranges[i]));
            }
            Some(again.finish(size))
        }
        _ => None,
    };
    Ok(ReadBack {
        verified,
        retried,
        digest,
    })
}

/// The read-back digest, fed range by range in image order while reads stay in flight: a
/// worker that read range `i` waits (holding its buffer) until ranges before it are fed. A
/// range that read back wrong is passed over (`skip`), which spoils the digest.
#[derive(Default)]
struct Chain {
    state: Mutex<ChainState>,
    fed: std::sync::Condvar,
}

#[derive(Default)]
struct ChainState {
    hasher: blake3::Hasher,
    /// Logical offset hashed so far.
    pos: u64,
    /// Index of the next range to feed.
    next: usize,
    /// A range was passed over: the digest is not the medium's.
    spoilt: bool,
}

fn hash_zeros(h: &mut blake3::Hasher, mut n: u64) {
    use crate::image::zero::ZEROS;
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

impl Chain {
    /// Feed range `i` (`data` read back at `r.offset`, or `None` for a range that read back
    /// wrong) once every earlier range is fed; gives up (false) when `stop` is set meanwhile.
    fn feed(&self, i: usize, r: &RangeDigest, data: Option<&[u8]>, stop: &AtomicBool) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.next != i {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            st = self
                .fed
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        match data {
            Some(data) => {
                let gap = r.offset.saturating_sub(st.pos);
                hash_zeros(&mut st.hasher, gap);
                st.hasher.update(data);
                st.pos = r.offset + r.len;
            }
            None => st.spoilt = true,
        }
        st.next += 1;
        self.fed.notify_all();
        true
    }

    fn finish(self, size: u64) -> [u8; 32] {
        let mut st = self.state.into_inner().unwrap_or_else(|p| p.into_inner());
        debug_assert!(!st.spoilt, "a spoilt read-back digest is never finished");
        let tail = size.saturating_sub(st.pos);
        hash_zeros(&mut st.hasher, tail);
        *st.hasher.finalize().as_bytes()
    }
}

/// Write `todo` again with the image's bytes, taken from a fresh stream of the image and
/// checked against the ranges' digests first (the image file may have changed since).
fn rewrite(
    sink: &mut dyn Sink,
    reopen: &super::Reopen,
    todo: &[RangeDigest],
    opts: &WriteOptions,
) -> Result<(), WriteError> {
    let mut source = reopen()?;
    let bs = opts.buffer_size.max(super::buffer::ALIGN);
    let mut img = AlignedBuf::new(bs);
    let mut bufs: Vec<AlignedBuf> = todo
        .iter()
        .map(|r| AlignedBuf::new(r.len as usize))
        .collect();
    let last = todo.iter().map(|r| r.offset + r.len).max().unwrap_or(0);
    while let Some(ext) = source.next_extent(&mut img)? {
        if ext.kind == ExtentKind::Data {
            for (r, buf) in todo.iter().zip(bufs.iter_mut()) {
                let lo = ext.offset.max(r.offset);
                let hi = ext.end().min(r.offset + r.len);
                if lo < hi {
                    buf[(lo - r.offset) as usize..(hi - r.offset) as usize].copy_from_slice(
                        &img[(lo - ext.offset) as usize..(hi - ext.offset) as usize],
                    );
                }
            }
        }
        // Zero and skip pieces stay zero in the fresh buffers, as they were hashed.
        if ext.end() >= last {
            break;
        }
    }
    for (r, buf) in todo.iter().zip(&bufs) {
        if blake3::hash(buf).as_bytes() != &r.digest {
            return Err(WriteError::Stream {
                image: opts.image_name.clone(),
                offset: r.offset,
                msg: format!(
                    "the range of {} bytes to write again differs from what was written: the image changed during the write",
                    r.len
                ),
            });
        }
        sink.write_at(r.offset, buf)?;
    }
    sink.sync()
}

fn mismatch(target: &str, r: &RangeDigest) -> WriteError {
    WriteError::Mismatch {
        target: target.to_string(),
        offset: r.offset,
        len: r.len,
    }
}

/// [`read_back`] that goes on after a mismatch until `limit` bad ranges are found: returns
/// the bytes read back and the indices of the bad ranges, lowest first (every range below
/// the last one returned was checked).
fn read_back_some(
    sink: &mut dyn Sink,
    ranges: &[RangeDigest],
    opts: &WriteOptions,
    reporter: &dyn Reporter,
    limit: usize,
    chain: Option<&Chain>,
) -> Result<(u64, Vec<usize>), WriteError> {
    let limit = limit.max(1);
    match sink.medium_reader() {
        Some(reader) => {
            read_back_parallel(&reader, sink.name(), ranges, opts, reporter, limit, chain)
        }
        None => read_back_serial(sink, ranges, opts, reporter, limit, chain),
    }
}

fn read_back_parallel(
    reader: &MediumReader,
    target: &str,
    ranges: &[RangeDigest],
    opts: &WriteOptions,
    reporter: &dyn Reporter,
    limit: usize,
    chain: Option<&Chain>,
) -> Result<(u64, Vec<usize>), WriteError> {
    let max = ranges.iter().map(|r| r.len).max().unwrap_or(0) as usize;
    if max == 0 {
        return Ok((0, Vec::new()));
    }
    if let Some(why) = &reader.buffered_reason {
        tracing::info!(target, "read-back without O_DIRECT: {why}");
    }
    let total: u64 = ranges.iter().map(|r| r.len).sum();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    // Bad ranges found, lowest failed read (index, error).
    let bad = Mutex::new(Vec::<usize>::new());
    let failed = Mutex::new(None::<(usize, WriteError)>);
    let workers = READ_BACK_DEPTH.min(ranges.len());
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for w in 0..workers {
            let (next, stop, done, bad, failed) = (&next, &stop, &done, &bad, &failed);
            let h = std::thread::Builder::new()
                .name(format!("sbcflash-verify{w}"))
                .spawn_scoped(scope, move || {
                    let mut buf = AlignedBuf::new(max + reader.slack());
                    while !stop.load(Ordering::Relaxed) && !opts.cancel.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(r) = ranges.get(i) else { break };
                        let len = r.len as usize;
                        match reader.read_range(r.offset, len, &mut buf) {
                            Ok(at) => {
                                let good = blake3::hash(&buf[at..at + len]).as_bytes() == &r.digest;
                                if !good {
                                    let mut b = bad.lock().unwrap_or_else(|p| p.into_inner());
                                    b.push(i);
                                    if b.len() >= limit {
                                        stop.store(true, Ordering::Relaxed);
                                    }
                                }
                                if let Some(c) = chain {
                                    let data = good.then_some(&buf[at..at + len]);
                                    if !c.feed(i, r, data, stop) {
                                        break;
                                    }
                                }
                            }
                            Err(e) => {
                                let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                                if f.as_ref().is_none_or(|(j, _)| i < *j) {
                                    *f = Some((i, e));
                                }
                                stop.store(true, Ordering::Relaxed);
                            }
                        }
                        done.fetch_add(r.len, Ordering::Relaxed);
                    }
                });
            match h {
                Ok(h) => handles.push(h),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                    *f = Some((0, WriteError::Internal(format!("spawn verify thread: {e}"))));
                    break;
                }
            }
        }
        while !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(50));
            reporter.report(opts.progress(
                Phase::Verify,
                done.load(Ordering::Relaxed).min(total),
                Some(total),
            ));
        }
    });
    let mut bad = bad.into_inner().unwrap_or_else(|p| p.into_inner());
    bad.sort_unstable();
    // Workers finish the range they hold after a stop: keep the lowest `limit`, so that
    // every range below the last one kept was checked.
    bad.truncate(limit);
    let failed = failed.into_inner().unwrap_or_else(|p| p.into_inner());
    match (bad.first(), failed) {
        // A failed read below the first bad range comes first; otherwise the mismatches.
        (Some(&i), Some((j, e))) if j < i => Err(e),
        (Some(_), _) => Ok((done.load(Ordering::Relaxed).min(total), bad)),
        (None, Some((_, e))) => Err(e),
        (None, None) if done.load(Ordering::Relaxed) < total => Err(WriteError::Interrupted {
            target: target.to_string(),
            done: done.load(Ordering::Relaxed),
        }),
        (None, None) => Ok((total, bad)),
    }
}

/// One read at a time through [`Sink::read_at`], hashing on a second thread: for sinks
/// without a [`MediumReader`].
fn read_back_serial(
    sink: &mut dyn Sink,
    ranges: &[RangeDigest],
    opts: &WriteOptions,
    reporter: &dyn Reporter,
    limit: usize,
    chain: Option<&Chain>,
) -> Result<(u64, Vec<usize>), WriteError> {
    let max = ranges.iter().map(|r| r.len).max().unwrap_or(0) as usize;
    if max == 0 {
        return Ok((0, Vec::new()));
    }
    let pool = Pool::new(opts.buffers.clamp(2, 4), max);
    let (tx, rx) = crossbeam_channel::bounded::<(usize, Pooled)>(4);
    let checker = std::thread::Builder::new()
        .name("sbcflash-verify".into())
        .spawn({
            let ranges = ranges.to_vec();
            move || -> Vec<usize> {
                let mut bad = Vec::new();
                for (i, buf) in rx {
                    let r = &ranges[i];
                    if blake3::hash(&buf[..r.len as usize]).as_bytes() != &r.digest {
                        bad.push(i);
                        if bad.len() >= limit {
                            break;
                        }
                    }
                }
                bad
            }
        })
        .expect("spawn verify thread");
    let total: u64 = ranges.iter().map(|r| r.len).sum();
    let mut done = 0u64;
    let mut read_err = None;
    for (i, r) in ranges.iter().enumerate() {
        if opts.cancel.load(Ordering::Relaxed) {
            read_err = Some(WriteError::Interrupted {
                target: sink.name().to_string(),
                done,
            });
            break;
        }
        let mut buf = loop {
            if let Some(b) = pool.get_timeout(POLL) {
                break b;
            }
            if checker.is_finished() {
                break Pooled::empty();
            }
        };
        if buf.is_empty() {
            break; // the checker stopped at a mismatch
        }
        if let Err(e) = sink.read_at(r.offset, &mut buf[..r.len as usize]) {
            read_err = Some(e);
            break;
        }
        if let Some(c) = chain {
            // Fed in order on this thread, before the checker has judged the range: a range
            // that reads back wrong fails the read-back or is rewritten, and after a rewrite
            // the digest is taken again (`read_back_retrying`).
            c.feed(i, r, Some(&buf[..r.len as usize]), &AtomicBool::new(false));
        }
        if tx.send((i, buf)).is_err() {
            break;
        }
        done += r.len;
        reporter.report(opts.progress(Phase::Verify, done, Some(total)));
    }
    drop(tx);
    let bad = checker
        .join()
        .map_err(|_| WriteError::Internal("verify thread panicked".into()))?;
    match (bad.first(), read_err) {
        (Some(_), _) => Ok((done, bad)),
        (None, Some(e)) => Err(e),
        (None, None) => Ok((total, bad)),
    }
}

/// Result of comparing a target with an image without writing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CompareReport {
    pub(crate) image_size: u64,
    /// Bytes read from the target and compared (data and zero ranges).
    pub(crate) bytes_compared: u64,
    /// Bytes of unmapped ranges not compared.
    pub(crate) bytes_skipped: u64,
    /// blake3 of the logical image, hex.
    pub(crate) blake3: String,
}

/// Stream `source` and compare every `Data` and `Zero` range with the target's contents
/// (`Skip` ranges have no defined contents). Fails with [`WriteError::Mismatch`] at the first
/// differing block, or [`WriteError::Digest`] when `opts.expected_blake3` does not match.
pub fn compare_with_image(
    mut source: Box<dyn ExtentSource>,
    sink: &mut dyn Sink,
    opts: &WriteOptions,
    reporter: &dyn Reporter,
) -> Result<CompareReport, WriteError> {
    let target = sink.name().to_string();
    let size_hint = source.size_hint();
    super::fits(size_hint, sink)?;
    reporter.report(Event::Start {
        job: opts.job.clone(),
        phase: Phase::Verify,
        total: size_hint,
        detail: Some(source.describe()),
    });
    let bs = opts.buffer_size.max(super::buffer::ALIGN);
    let pool = Pool::new(2, bs);
    let (Some(mut img), Some(mut dev)) = (pool.get_timeout(POLL), pool.get_timeout(POLL)) else {
        return Err(WriteError::Internal("buffer pool empty".into()));
    };
    let mut logical = LogicalHasher::new();
    let (mut pos, mut compared, mut skipped) = (0u64, 0u64, 0u64);
    let mismatch = |offset: u64, len: u64| WriteError::Mismatch {
        target: target.clone(),
        offset,
        len,
    };
    while let Some(ext) = source.next_extent(&mut img)? {
        if opts.cancel.load(Ordering::Relaxed) {
            return Err(WriteError::Interrupted {
                target: target.clone(),
                done: pos,
            });
        }
        if ext.offset != pos {
            return Err(WriteError::Stream {
                image: opts.image_name.clone(),
                offset: ext.offset,
                msg: format!("extent starts at {}, expected {pos}", ext.offset),
            });
        }
        match ext.kind {
            ExtentKind::Data => {
                let n = ext.len as usize;
                logical.update(&img[..n]);
                sink.read_at(ext.offset, &mut dev[..n])?;
                if img[..n] != dev[..n] {
                    let i = img[..n]
                        .iter()
                        .zip(&dev[..n])
                        .position(|(a, b)| a != b)
                        .unwrap_or(0) as u64;
                    let at = (ext.offset + i) / 4096 * 4096;
                    return Err(mismatch(at.max(ext.offset), ext.end() - at.max(ext.offset)));
                }
                compared += ext.len;
            }
            ExtentKind::Zero => {
                let mut off = ext.offset;
                while off < ext.end() {
                    let n = ((ext.end() - off) as usize).min(dev.len());
                    logical.update_zeros(n as u64);
                    sink.read_at(off, &mut dev[..n])?;
                    if let Some(i) = dev[..n].iter().position(|&b| b != 0) {
                        let at = (off + i as u64) / 4096 * 4096;
                        return Err(mismatch(at.max(off), ext.end() - at.max(off)));
                    }
                    off += n as u64;
                }
                compared += ext.len;
            }
            ExtentKind::Skip => {
                logical.update_zeros(ext.len);
                skipped += ext.len;
            }
        }
        pos = ext.end();
        reporter.report(opts.progress(Phase::Verify, pos, size_hint));
    }
    let digest = *logical.finalize().as_bytes();
    let actual = hex::encode(digest);
    if let Some(exp) = opts.expected_blake3 {
        if exp != digest {
            return Err(WriteError::Digest {
                image: opts.image_name.clone(),
                target,
                expected: super::expected_with_origin(&exp, opts),
                actual,
                head_written: true,
            });
        }
    }
    let report = CompareReport {
        image_size: pos,
        bytes_compared: compared,
        bytes_skipped: skipped,
        blake3: actual,
    };
    reporter.report(Event::Finish {
        job: opts.job.clone(),
        phase: Phase::Verify,
        summary: serde_json::to_value(&report).unwrap_or_default(),
    });
    Ok(report)
}
