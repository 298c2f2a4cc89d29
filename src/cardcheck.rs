//! `sbcflash check-card`: is the card as large as it claims, and does it give back what was
//! written? In seconds rather than f3's hours: one signed 4 KiB block is written at each of
//! a few hundred offsets spread up to the claimed size, all are flushed, then read back with
//! O_DIRECT (the page cache cannot answer). A fake card that wraps its address space shows a
//! lower block holding the signature written at a higher offset; a card that drops writes or
//! fails shows different data or a read error. Probes sit on a power-of-two stride, so a card
//! whose real capacity is a multiple of that stride (fake cards wrap at a power of two) maps
//! every alias onto another probe.
//!
//! Each probed block's previous contents are read first and written back afterwards (in
//! reverse order, so an aliased block ends with its own old contents), so a good card keeps
//! its data; the check still writes, and is confirmed and vetted like a write.

use crate::exit::{Classify, Exit};
use crate::image::buffer::AlignedBuf;
use crate::progress::{Event, Reporter};
use serde::Serialize;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Size of one probe (and its alignment): a page, valid for O_DIRECT on every device.
pub(crate) const PROBE: u64 = 4096;
const MAGIC: &[u8; 16] = b"SBCFLASH-CHECK\0\x01";

/// Probes by default: 4 MiB written and read, seconds on a card.
pub(crate) const DEFAULT_PROBES: usize = 1024;

pub(crate) struct Options {
    /// At most this many probes (spread over the claimed size).
    pub(crate) probes: usize,
    /// A block device opened without O_DIRECT: drop its buffer cache (BLKFLSBUF) before
    /// reading back, so the cache cannot answer for the card.
    pub(crate) flush_cache: bool,
    pub(crate) cancel: Arc<AtomicBool>,
    pub(crate) job: String,
}

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub(crate) enum Problem {
    /// The block at `offset` holds what was written at `written_at` (a higher offset): the
    /// card wraps, and `written_at` is beyond its real capacity.
    Alias {
        offset: u64,
        written_at: u64,
    },
    /// The block reads back different data (`detail`: zeros, 0xff, or other).
    Different {
        offset: u64,
        detail: String,
    },
    ReadError {
        offset: u64,
        error: String,
    },
    WriteError {
        offset: u64,
        error: String,
    },
}

impl Problem {
    pub(crate) fn describe(&self) -> String {
        match self {
            Problem::Alias { offset, written_at } => format!(
                "the block at byte {offset} holds the data written at byte {written_at}: the card \
                 wraps around (fake capacity)"
            ),
            Problem::Different { offset, detail } => {
                format!("the block at byte {offset} reads back different data ({detail})")
            }
            Problem::ReadError { offset, error } => format!("reading byte {offset}: {error}"),
            Problem::WriteError { offset, error } => format!("writing byte {offset}: {error}"),
        }
    }
    /// The block that was read (or written).
    pub(crate) fn offset(&self) -> u64 {
        match self {
            Problem::Alias { offset, .. }
            | Problem::Different { offset, .. }
            | Problem::ReadError { offset, .. }
            | Problem::WriteError { offset, .. } => *offset,
        }
    }
    fn is_io(&self) -> bool {
        matches!(self, Problem::ReadError { .. } | Problem::WriteError { .. })
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub(crate) device: String,
    pub(crate) claimed_size: u64,
    pub(crate) probes: usize,
    pub(crate) stride: u64,
    /// Every probe below this offset gave back what was written (the claimed size if all did).
    pub(crate) usable_size: u64,
    pub(crate) ok: bool,
    pub(crate) problems: Vec<Problem>,
    /// Whether every probed block's old contents were written back.
    pub(crate) restored: bool,
    pub(crate) seconds: f64,
}

impl Report {
    /// One line for people and the ledger.
    pub(crate) fn reason(&self) -> String {
        if self.ok {
            return format!(
                "{} probes up to {} bytes read back as written",
                self.probes, self.claimed_size
            );
        }
        let first = self
            .problems
            .first()
            .map(Problem::describe)
            .unwrap_or_default();
        let fake = self
            .problems
            .iter()
            .any(|p| matches!(p, Problem::Alias { .. }));
        format!(
            "{}: usable {} of {} claimed bytes ({} of {}); {} problem(s), first: {first}",
            if fake {
                "fake capacity"
            } else {
                "card failed the check"
            },
            self.usable_size,
            self.claimed_size,
            crate::target::human_size(self.usable_size),
            crate::target::human_size(self.claimed_size),
            self.problems.len()
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CheckError {
    #[error("{device}: {reason}")]
    Failed {
        device: String,
        reason: String,
        io: bool,
        report: Box<Report>,
    },
    #[error("{device}: {msg}")]
    Unusable { device: String, msg: String },
    #[error("{device}: interrupted; {restored}")]
    Interrupted { device: String, restored: String },
}

impl Classify for CheckError {
    fn exit(&self) -> Exit {
        match self {
            CheckError::Failed { io: true, .. } => Exit::Io,
            CheckError::Failed { .. } => Exit::Verify,
            CheckError::Unusable { .. } => Exit::BadInput,
            CheckError::Interrupted { .. } => Exit::Interrupted,
        }
    }
}

/// The lowest offset that is not real storage. Probes that alias each other share one
/// physical block: in each such class only the lowest offset is real (several higher probes
/// may land on one block, and the block then holds the last one written). Any other problem
/// is bad at its own offset.
pub(crate) fn usable_below(problems: &[Problem], size: u64) -> u64 {
    let mut class: std::collections::BTreeMap<u64, u64> = Default::default();
    fn root(c: &std::collections::BTreeMap<u64, u64>, mut x: u64) -> u64 {
        while let Some(&p) = c.get(&x) {
            if p == x {
                break;
            }
            x = p;
        }
        x
    }
    let mut bad = size;
    for p in problems {
        match p {
            Problem::Alias { offset, written_at } => {
                for x in [*offset, *written_at] {
                    class.entry(x).or_insert(x);
                }
                let (a, b) = (root(&class, *offset), root(&class, *written_at));
                // The lower root stays the class's representative (its lowest member).
                let (lo, hi) = (a.min(b), a.max(b));
                class.insert(hi, lo);
            }
            other => bad = bad.min(other.offset()),
        }
    }
    for (&x, _) in class.iter() {
        if root(&class, x) != x {
            bad = bad.min(x);
        }
    }
    bad
}

/// Probe offsets: multiples of a power-of-two stride below `size`, and the last block.
pub(crate) fn probe_offsets(size: u64, max: usize) -> (u64, Vec<u64>) {
    let last = size / PROBE * PROBE - PROBE;
    let want = (max.max(2) - 1) as u64;
    let stride = size.div_ceil(want).next_power_of_two().max(PROBE);
    let mut v: Vec<u64> = (0..)
        .map(|k| k * stride)
        .take_while(|&o| o <= last)
        .collect();
    if v.last() != Some(&last) {
        v.push(last);
    }
    (stride, v)
}

/// The signed block for `offset` in the run `nonce`: magic, nonce, offset, then blake3 XOF
/// of both, so no two offsets (or runs) share contents.
fn signature(nonce: &[u8; 32], offset: u64, out: &mut [u8]) {
    out[..16].copy_from_slice(MAGIC);
    out[16..48].copy_from_slice(nonce);
    out[48..56].copy_from_slice(&offset.to_le_bytes());
    let mut h = blake3::Hasher::new_keyed(nonce);
    h.update(&offset.to_le_bytes());
    h.finalize_xof().fill(&mut out[56..PROBE as usize]);
}

fn classify_block(
    nonce: &[u8; 32],
    offset: u64,
    got: &[u8],
    scratch: &mut [u8],
) -> Option<Problem> {
    signature(nonce, offset, scratch);
    if got == scratch {
        return None;
    }
    if &got[..16] == MAGIC && &got[16..48] == nonce {
        let mut o = [0u8; 8];
        o.copy_from_slice(&got[48..56]);
        let other = u64::from_le_bytes(o);
        signature(nonce, other, scratch);
        if other != offset && got == scratch {
            return Some(Problem::Alias {
                offset,
                written_at: other,
            });
        }
    }
    let detail = if got.iter().all(|&b| b == 0) {
        "all zeros: the write was lost"
    } else if got.iter().all(|&b| b == 0xff) {
        "all 0xff: the write was lost"
    } else {
        "not what was written"
    };
    Some(Problem::Different {
        offset,
        detail: detail.into(),
    })
}

/// Run the check on an opened device or file (O_DIRECT where possible) of `size` bytes.
pub(crate) fn check(
    file: &File,
    device: &str,
    size: u64,
    opts: &Options,
    reporter: &dyn Reporter,
) -> Result<Report, CheckError> {
    let t0 = Instant::now();
    if size < 2 * PROBE {
        return Err(CheckError::Unusable {
            device: device.into(),
            msg: format!("{size} bytes is too small to check"),
        });
    }
    let (stride, offsets) = probe_offsets(size, opts.probes);
    let nonce: [u8; 32] = {
        let mut h = blake3::Hasher::new();
        h.update(device.as_bytes());
        h.update(&std::process::id().to_le_bytes());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        h.update(&now.as_nanos().to_le_bytes());
        *h.finalize().as_bytes()
    };
    let n = offsets.len();
    let total = 3 * n as u64 * PROBE;
    let job = opts.job.clone();
    reporter.report(Event::Start {
        job: job.clone(),
        phase: crate::progress::Phase::CheckCard,
        total: Some(total),
        detail: Some(format!(
            "{n} probes of {PROBE} bytes every {} up to {size} bytes",
            crate::target::human_size(stride)
        )),
    });
    let mut done = 0u64;
    let step = |done: &mut u64| {
        *done += PROBE;
        reporter.report(Event::Progress {
            job: job.clone(),
            phase: crate::progress::Phase::CheckCard,
            done: *done,
            total: Some(total),
        });
    };
    let mut buf = AlignedBuf::new(PROBE as usize);
    let mut scratch = vec![0u8; PROBE as usize];
    let mut saved: Vec<Option<AlignedBuf>> = Vec::with_capacity(n);
    let mut problems = Vec::new();
    let io = |e: std::io::Error| e.to_string();
    let cancelled = |saved: &[Option<AlignedBuf>]| -> CheckError {
        let restored = match restore(file, &offsets, saved) {
            true => "the probed blocks' old contents were written back".to_string(),
            false => "some probed blocks could not be written back".to_string(),
        };
        CheckError::Interrupted {
            device: device.into(),
            restored,
        }
    };
    // 1. Save and write.
    for &off in &offsets {
        if opts.cancel.load(Ordering::Relaxed) {
            return Err(cancelled(&saved));
        }
        let mut old = AlignedBuf::new(PROBE as usize);
        let kept = match read_full(file, &mut old, off) {
            Ok(()) => Some(old),
            Err(_) => None,
        };
        saved.push(kept);
        signature(&nonce, off, &mut buf);
        if let Err(e) = write_full(file, &buf, off) {
            problems.push(Problem::WriteError {
                offset: off,
                error: io(e),
            });
        }
        step(&mut done);
    }
    if let Err(e) = file.sync_data() {
        problems.push(Problem::WriteError {
            offset: 0,
            error: format!("flush: {e}"),
        });
    }
    if opts.flush_cache {
        crate::write::sink::flush_buffers(file).map_err(|e| CheckError::Unusable {
            device: device.into(),
            msg: format!("no O_DIRECT and the buffer cache cannot be dropped to read back: {e}"),
        })?;
    }
    // 2. Read back.
    for &off in &offsets {
        if opts.cancel.load(Ordering::Relaxed) {
            return Err(cancelled(&saved));
        }
        if problems
            .iter()
            .any(|p| matches!(p, Problem::WriteError { offset, .. } if *offset == off))
        {
            step(&mut done);
            continue;
        }
        match read_full(file, &mut buf, off) {
            Ok(()) => {
                if let Some(p) = classify_block(&nonce, off, &buf, &mut scratch) {
                    problems.push(p);
                }
            }
            Err(e) => problems.push(Problem::ReadError {
                offset: off,
                error: io(e),
            }),
        }
        step(&mut done);
    }
    // 3. Put the old contents back.
    let restored = restore(file, &offsets, &saved);
    done = total;
    reporter.report(Event::Progress {
        job: job.clone(),
        phase: crate::progress::Phase::CheckCard,
        done,
        total: Some(total),
    });
    problems.sort_by_key(Problem::offset);
    let usable_size = usable_below(&problems, size);
    let report = Report {
        device: device.into(),
        claimed_size: size,
        probes: n,
        stride,
        usable_size,
        ok: problems.is_empty(),
        problems,
        restored,
        seconds: t0.elapsed().as_secs_f64(),
    };
    if !report.ok {
        let io = report.problems.first().is_some_and(Problem::is_io);
        reporter.report(Event::Error {
            job,
            phase: crate::progress::Phase::CheckCard,
            message: report.reason(),
            exit_code: if io { Exit::Io } else { Exit::Verify }.code(),
        });
        return Err(CheckError::Failed {
            device: device.into(),
            reason: report.reason(),
            io,
            report: Box::new(report),
        });
    }
    reporter.report(Event::Finish {
        job,
        phase: crate::progress::Phase::CheckCard,
        summary: serde_json::json!({
            "claimed_size": report.claimed_size,
            "usable_size": report.usable_size,
            "probes": report.probes,
            "restored": report.restored,
            "seconds": report.seconds,
        }),
    });
    Ok(report)
}

/// Writes saved blocks back, highest offset first (an aliased lower block is written last,
/// so it ends with its own old contents). False if any could not be saved or written.
fn restore(file: &File, offsets: &[u64], saved: &[Option<AlignedBuf>]) -> bool {
    let mut all = saved.len() == offsets.len();
    for (off, old) in offsets.iter().zip(saved).rev() {
        match old {
            Some(b) => all &= write_full(file, b, *off).is_ok(),
            None => all = false,
        }
    }
    all & file.sync_data().is_ok()
}

fn read_full(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_full(f: &File, buf: &[u8], off: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.write_at(&buf[done..], off + done as u64) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_cover_the_claimed_size_on_a_power_of_two_stride() {
        let (stride, v) = probe_offsets(256 << 20, 256);
        assert_eq!(stride, 2 << 20);
        assert_eq!(v.first(), Some(&0));
        assert_eq!(v.last(), Some(&((256 << 20) - PROBE)));
        assert!(v.len() <= 256 + 1 && v.len() > 128, "{}", v.len());
        // The upper half's probes alias onto lower ones when the card wraps at half.
        assert!(v.contains(&(128 << 20)));
    }

    /// A file whose upper half is the lower half again (what a fake card does), simulated by
    /// classifying what such a card returns.
    #[test]
    fn a_block_holding_a_higher_probe_is_an_alias() {
        let nonce = [7u8; 32];
        let mut got = vec![0u8; PROBE as usize];
        let mut scratch = vec![0u8; PROBE as usize];
        signature(&nonce, 1 << 20, &mut got);
        let p = classify_block(&nonce, 0, &got, &mut scratch);
        assert_eq!(
            p,
            Some(Problem::Alias {
                offset: 0,
                written_at: 1 << 20
            })
        );
        signature(&nonce, 0, &mut got);
        assert_eq!(classify_block(&nonce, 0, &got, &mut scratch), None);
        // A card of 1 MiB claiming 4: offsets 1, 2 and 3 MiB all land on 0, which holds 3's.
        let alias = |o: u64, w: u64| Problem::Alias {
            offset: o << 20,
            written_at: w << 20,
        };
        let ps = [alias(0, 3), alias(1, 3), alias(2, 3)];
        assert_eq!(usable_below(&ps, 4 << 20), 1 << 20);
        assert_eq!(usable_below(&[], 4 << 20), 4 << 20);
        let p = classify_block(&nonce, 0, &vec![0; PROBE as usize], &mut scratch);
        assert!(matches!(p, Some(Problem::Different { .. })));
    }
}
