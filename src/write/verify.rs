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
pub const READ_BACK_DEPTH: usize = 4;

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
    match sink.medium_reader() {
        Some(reader) => read_back_parallel(&reader, sink.name(), ranges, opts, reporter),
        None => read_back_serial(sink, ranges, opts, reporter),
    }
}

fn read_back_parallel(
    reader: &MediumReader,
    target: &str,
    ranges: &[RangeDigest],
    opts: &WriteOptions,
    reporter: &dyn Reporter,
) -> Result<u64, WriteError> {
    let max = ranges.iter().map(|r| r.len).max().unwrap_or(0) as usize;
    if max == 0 {
        return Ok(0);
    }
    if let Some(why) = &reader.buffered_reason {
        tracing::info!(target, "read-back without O_DIRECT: {why}");
    }
    let total: u64 = ranges.iter().map(|r| r.len).sum();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    // Lowest bad range, lowest failed read (index, error).
    let bad = Mutex::new(None::<usize>);
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
                                if blake3::hash(&buf[at..at + len]).as_bytes() != &r.digest {
                                    let mut b = bad.lock().unwrap_or_else(|p| p.into_inner());
                                    *b = Some(b.map_or(i, |j| j.min(i)));
                                    stop.store(true, Ordering::Relaxed);
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
    let bad = bad.into_inner().unwrap_or_else(|p| p.into_inner());
    let failed = failed.into_inner().unwrap_or_else(|p| p.into_inner());
    match (bad, failed) {
        // A failed read below the first bad range comes first; otherwise the mismatch.
        (Some(i), Some((j, e))) if j < i => Err(e),
        (Some(i), _) => Err(WriteError::Mismatch {
            target: target.to_string(),
            offset: ranges[i].offset,
            len: ranges[i].len,
        }),
        (None, Some((_, e))) => Err(e),
        (None, None) if done.load(Ordering::Relaxed) < total => Err(WriteError::Interrupted {
            target: target.to_string(),
            done: done.load(Ordering::Relaxed),
        }),
        (None, None) => Ok(total),
    }
}

/// One read at a time through [`Sink::read_at`], hashing on a second thread: for sinks
/// without a [`MediumReader`].
fn read_back_serial(
    sink: &mut dyn Sink,
    ranges: &[RangeDigest],
    opts: &WriteOptions,
    reporter: &dyn Reporter,
) -> Result<u64, WriteError> {
    let target = sink.name().to_string();
    let max = ranges.iter().map(|r| r.len).max().unwrap_or(0) as usize;
    if max == 0 {
        return Ok(0);
    }
    let pool = Pool::new(opts.buffers.clamp(2, 4), max);
    let (tx, rx) = crossbeam_channel::bounded::<(usize, Pooled)>(4);
    let checker = std::thread::Builder::new()
        .name("sbcflash-verify".into())
        .spawn({
            let ranges = ranges.to_vec();
            move || -> Option<usize> {
                for (i, buf) in rx {
                    let r = &ranges[i];
                    if blake3::hash(&buf[..r.len as usize]).as_bytes() != &r.digest {
                        return Some(i);
                    }
                }
                None
            }
        })
        .expect("spawn verify thread");
    let total: u64 = ranges.iter().map(|r| r.len).sum();
    let mut done = 0u64;
    let mut read_err = None;
    for (i, r) in ranges.iter().enumerate() {
        if opts.cancel.load(Ordering::Relaxed) {
            read_err = Some(WriteError::Interrupted {
                target: target.clone(),
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
    if let Some(i) = bad {
        return Err(WriteError::Mismatch {
            target,
            offset: ranges[i].offset,
            len: ranges[i].len,
        });
    }
    if let Some(e) = read_err {
        return Err(e);
    }
    Ok(total)
}

/// Result of comparing a target with an image without writing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CompareReport {
    pub image_size: u64,
    /// Bytes read from the target and compared (data and zero ranges).
    pub bytes_compared: u64,
    /// Bytes of unmapped ranges not compared.
    pub bytes_skipped: u64,
    /// blake3 of the logical image, hex.
    pub blake3: String,
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
