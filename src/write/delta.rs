//! `write --delta`: re-flash in proportion to the change.
//!
//! The image's pieces are grouped into units (contiguous data and zero pieces, up to the
//! pipeline's buffer size, 4 MiB by default: an SD card's erase block, and one request for a
//! loop device or a rockusb session). For each unit the target's current contents are read
//! ahead of the writer on the `sbcflash-delta-dev*` threads and compared byte for byte with
//! the image's bytes, which are still in memory (zero pieces: the target must read as zeroes);
//! the writer writes only units that differ. `Skip` ranges have no defined contents and are
//! left alone.
//!
//! Why bytes and not digests of both sides (the first design): the image's bytes are in
//! memory anyway, a comparison is exact and costs a tenth of blake3, and on a 2-core machine
//! hashing both sides (2 × the mapped bytes) made the CPU, not the medium, the limit. Only
//! units that will be written are blake3'd (on `sbcflash-delta-img`), for the read-back.
//!
//! Read-back after a delta write covers the units written (against those digests) and the
//! first MiB when it was rewritten; units found unchanged were read from the medium with
//! O_DIRECT and matched the image already, so they are not read twice.
//!
//! When every unit differs (a different image), comparing would only add reads: after a run
//! of differing units the next ones are written without comparing, for a stretch that
//! doubles with each further differing unit and ends at the first unit found unchanged.
//!
//! Sinks with a [`MediumReader`] (block devices, files) read with O_DIRECT on two threads;
//! others (rockusb) read through [`Sink::read_at`] on the writer's thread when a unit's
//! verdict is needed.

use super::buffer::AlignedBuf;
use super::sink::MediumReader;
use super::{Piece, RangeDigest, Sink, WriteError};
use crate::image::zero::ZEROS;
use crate::image::{Extent, ExtentKind};
use crossbeam_channel::{Receiver, Sender};
use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Units queued ahead of the writer besides the oldest (and the one being filled): with the
/// oldest, one per reader in flight. Each holds up to two of the source's pooled buffers, so
/// more would starve the reader (6-8 buffers).
const AHEAD: usize = 1;
/// Target reads in flight.
const READERS: usize = 2;
/// Differing units in a row after which comparing pauses.
const STREAK: u32 = 3;
/// Longest stretch written without comparing, in units.
const MAX_BLIND: u64 = 64;

/// What `--delta` did, in the write's report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct DeltaReport {
    /// Comparison granularity in bytes.
    pub(crate) unit: u64,
    /// Bytes of the target read and compared with the image (data and zero ranges).
    pub(crate) compared: u64,
    /// Compared bytes found equal: not written.
    pub(crate) unchanged: u64,
    /// Compared bytes found different: written.
    pub(crate) rewritten: u64,
    /// Bytes written without comparing (a run of differing units paused comparing).
    pub(crate) written_uncompared: u64,
    pub(crate) units_compared: u64,
    pub(crate) units_rewritten: u64,
}

/// What the target holds for a unit, as read.
enum DevSide {
    /// Read, and equal to the image's bytes (or not).
    Same(bool),
    /// Could not be read (beyond a file's end, a read error): treated as different.
    Unreadable,
}

/// An image-side job: a unit's pieces, and where its digest goes.
type ImgJob = (Vec<Piece>, Sender<[u8; 32]>);

struct DevJob {
    offset: u64,
    len: u64,
    pieces: Vec<Piece>,
    tx: Sender<DevSide>,
}

enum Verdict {
    /// Compared on the worker threads.
    Threads { dev: Receiver<DevSide> },
    /// Compared on the writer's thread through [`Sink::read_at`].
    Serial,
    /// Written without comparing.
    Blind,
    /// A `Skip` piece: nothing to do.
    Leave,
}

struct Unit {
    pieces: Vec<Piece>,
    offset: u64,
    len: u64,
    verdict: Verdict,
}

/// A unit ready for the writer: its pieces and whether to write them.
pub(super) struct Ready {
    pub(crate) pieces: Vec<Piece>,
    pub(crate) write: bool,
}

/// A written unit's read-back digest: being hashed on `sbcflash-delta-img`, or known.
enum Written {
    Hashing(u64, u64, Receiver<[u8; 32]>),
    Done(RangeDigest),
}

pub(super) struct Delta {
    unit: u64,
    img_tx: Option<Sender<ImgJob>>,
    dev_tx: Option<Sender<DevJob>>,
    threads: Vec<JoinHandle<()>>,
    building: Option<(Vec<Piece>, u64, u64)>,
    queue: VecDeque<Unit>,
    streak: u32,
    blind: u64,
    scratch: Option<AlignedBuf>,
    pub(crate) report: DeltaReport,
    /// Units written: what read-back must check. Units found unchanged were read from the
    /// medium (O_DIRECT) and matched already.
    written: Vec<Written>,
}

fn spawn_img(rx: Receiver<ImgJob>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("sbcflash-delta-img".into())
        .spawn(move || {
            for (pieces, tx) in rx {
                let _ = tx.send(unit_digest(&pieces));
            }
        })
}

/// blake3 of a unit's bytes as they go to the target (zero pieces as zeroes).
fn unit_digest(pieces: &[Piece]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for p in pieces {
        match p.parts() {
            (_, Some(bytes)) => {
                h.update(bytes);
            }
            (ext, None) => super::feed_zeroes(&mut h, ext.len, &ZEROS),
        }
    }
    *h.finalize().as_bytes()
}

fn spawn_dev(
    i: usize,
    reader: Arc<MediumReader>,
    rx: Receiver<DevJob>,
    chunk: usize,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("sbcflash-delta-dev{i}"))
        .spawn(move || {
            let mut buf = AlignedBuf::new(chunk + reader.slack());
            for job in rx {
                let side = read_side(
                    &job,
                    |off, n, buf: &mut AlignedBuf| {
                        reader.read_range(off, n, buf).map(|at| at..at + n)
                    },
                    &mut buf,
                    chunk,
                );
                let _ = job.tx.send(side);
            }
        })
}

/// Read a unit's range in `chunk`-sized reads and compare it with the unit's pieces.
fn read_side(
    job: &DevJob,
    mut read: impl FnMut(u64, usize, &mut AlignedBuf) -> Result<std::ops::Range<usize>, WriteError>,
    buf: &mut AlignedBuf,
    chunk: usize,
) -> DevSide {
    let mut off = job.offset;
    let end = job.offset + job.len;
    while off < end {
        let n = ((end - off) as usize).min(chunk);
        let range = match read(off, n, buf) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(
                    "delta: reading the target at {off} failed ({e}); writing the range"
                );
                return DevSide::Unreadable;
            }
        };
        if !same_bytes(&job.pieces, off, &buf[range]) {
            return DevSide::Same(false);
        }
        off += n as u64;
    }
    DevSide::Same(true)
}

/// Whether `target`, read at `at`, equals what `pieces` put there.
fn same_bytes(pieces: &[Piece], at: u64, target: &[u8]) -> bool {
    let end = at + target.len() as u64;
    pieces.iter().all(|p| {
        let (ext, bytes) = p.parts();
        let (from, to) = (ext.offset.max(at), ext.end().min(end));
        if from >= to {
            return true;
        }
        let t = &target[(from - at) as usize..(to - at) as usize];
        match bytes {
            Some(b) => b[(from - ext.offset) as usize..(to - ext.offset) as usize] == *t,
            None => crate::image::zero::is_zero(t),
        }
    })
}

impl Delta {
    /// Start the comparing threads; `unit` is the comparison granularity.
    pub(crate) fn new(reader: Option<MediumReader>, unit: u64) -> Result<Delta, WriteError> {
        let spawn_err =
            |e: std::io::Error| WriteError::Internal(format!("spawn delta thread: {e}"));
        let mut threads = Vec::new();
        let (img_tx, img_rx) = crossbeam_channel::unbounded();
        threads.push(spawn_img(img_rx).map_err(spawn_err)?);
        let dev_tx = match reader {
            Some(reader) => {
                let reader = Arc::new(reader);
                let (tx, rx) = crossbeam_channel::unbounded();
                for i in 0..READERS {
                    let h = spawn_dev(i, reader.clone(), rx.clone(), unit as usize);
                    threads.push(h.map_err(spawn_err)?);
                }
                Some(tx)
            }
            None => None,
        };
        Ok(Delta {
            unit,
            img_tx: Some(img_tx),
            dev_tx,
            threads,
            building: None,
            queue: VecDeque::new(),
            streak: 0,
            blind: 0,
            scratch: None,
            report: DeltaReport {
                unit,
                ..Default::default()
            },
            written: Vec::new(),
        })
    }

    /// Take the next piece of the image (in order).
    pub(crate) fn push(&mut self, piece: Piece) {
        let (ext, data) = piece.parts();
        match (ext.kind, data) {
            (ExtentKind::Skip, _) => {
                self.close();
                self.queue.push_back(Unit {
                    pieces: vec![piece],
                    offset: ext.offset,
                    len: ext.len,
                    verdict: Verdict::Leave,
                });
            }
            (_, Some(_)) => {
                if self
                    .building
                    .as_ref()
                    .is_some_and(|b| b.2 + ext.len > self.unit)
                {
                    self.close();
                }
                let b = self
                    .building
                    .get_or_insert_with(|| (Vec::new(), ext.offset, 0));
                b.0.push(piece);
                b.2 += ext.len;
            }
            (_, None) => {
                // A zero range: split so that units stay within `unit` bytes.
                let mut off = ext.offset;
                while off < ext.end() {
                    let used = self.building.as_ref().map_or(0, |b| b.2);
                    if used >= self.unit {
                        self.close();
                        continue;
                    }
                    let n = (ext.end() - off).min(self.unit - used);
                    let b = self.building.get_or_insert_with(|| (Vec::new(), off, 0));
                    b.0.push(Piece::Gap(Extent {
                        offset: off,
                        len: n,
                        kind: ExtentKind::Zero,
                    }));
                    b.2 += n;
                    off += n;
                }
            }
        }
    }

    /// Close the unit being filled and start comparing it.
    pub(crate) fn close(&mut self) {
        let Some((pieces, offset, len)) = self.building.take() else {
            return;
        };
        let verdict = if self.blind > 0 {
            self.blind -= 1;
            Verdict::Blind
        } else {
            match &self.dev_tx {
                Some(dtx) => {
                    let (tx, dev) = crossbeam_channel::bounded(1);
                    let _ = dtx.send(DevJob {
                        offset,
                        len,
                        pieces: pieces.clone(),
                        tx,
                    });
                    Verdict::Threads { dev }
                }
                None => Verdict::Serial,
            }
        };
        self.queue.push_back(Unit {
            pieces,
            offset,
            len,
            verdict,
        });
    }

    /// Units queued (compared or being compared) ahead of the writer.
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// True when the writer should take a unit before reading more of the image.
    pub(crate) fn full(&self) -> bool {
        self.queue.len() > AHEAD
    }

    /// The oldest unit with its verdict (waits for its comparison).
    pub(crate) fn next(&mut self, sink: &mut dyn Sink) -> Result<Option<Ready>, WriteError> {
        let Some(u) = self.queue.pop_front() else {
            return Ok(None);
        };
        let lost = || WriteError::Internal("delta comparison thread stopped".into());
        let dev = match &u.verdict {
            Verdict::Leave => {
                return Ok(Some(Ready {
                    pieces: u.pieces,
                    write: false,
                }))
            }
            Verdict::Blind => {
                self.report.written_uncompared += u.len;
                self.will_write(&u);
                return Ok(Some(Ready {
                    pieces: u.pieces,
                    write: true,
                }));
            }
            Verdict::Threads { dev } => dev.recv().map_err(|_| lost())?,
            Verdict::Serial => {
                let mut scratch = self
                    .scratch
                    .take()
                    .unwrap_or_else(|| AlignedBuf::new(self.unit as usize));
                let job = DevJob {
                    offset: u.offset,
                    len: u.len,
                    pieces: u.pieces.clone(),
                    tx: crossbeam_channel::bounded(1).0,
                };
                let dev = read_side(
                    &job,
                    |off, n, buf: &mut AlignedBuf| sink.read_at(off, &mut buf[..n]).map(|()| 0..n),
                    &mut scratch,
                    self.unit as usize,
                );
                self.scratch = Some(scratch);
                dev
            }
        };
        let same = matches!(dev, DevSide::Same(true));
        self.report.compared += u.len;
        self.report.units_compared += 1;
        if same {
            self.report.unchanged += u.len;
            self.streak = 0;
            self.blind = 0;
        } else {
            self.will_write(&u);
            self.report.rewritten += u.len;
            self.report.units_rewritten += 1;
            self.streak += 1;
            if self.streak >= STREAK {
                self.blind = (1u64 << (self.streak - STREAK + 1).min(6)).min(MAX_BLIND);
            }
        }
        Ok(Some(Ready {
            pieces: u.pieces,
            write: !same,
        }))
    }

    /// Record a unit about to be written; its digest (for read-back) is made on
    /// `sbcflash-delta-img`, or here for a unit of zeroes.
    fn will_write(&mut self, u: &Unit) {
        let all_zero = u.pieces.iter().all(|p| p.parts().1.is_none());
        let w = match &self.img_tx {
            Some(itx) if !all_zero => {
                let (tx, rx) = crossbeam_channel::bounded(1);
                let _ = itx.send((u.pieces.clone(), tx));
                Written::Hashing(u.offset, u.len, rx)
            }
            _ => Written::Done(RangeDigest {
                offset: u.offset,
                len: u.len,
                digest: unit_digest(&u.pieces),
            }),
        };
        self.written.push(w);
    }

    /// The units written, with their digests: what read-back must check.
    pub(crate) fn take_written(&mut self) -> Result<Vec<RangeDigest>, WriteError> {
        std::mem::take(&mut self.written)
            .into_iter()
            .map(|w| match w {
                Written::Done(r) => Ok(r),
                Written::Hashing(offset, len, rx) => rx
                    .recv()
                    .map(|digest| RangeDigest {
                        offset,
                        len,
                        digest,
                    })
                    .map_err(|_| WriteError::Internal("delta digest thread stopped".into())),
            })
            .collect()
    }

    /// Stop the threads (they end when their queues close).
    pub(crate) fn finish(mut self) {
        self.img_tx = None;
        self.dev_tx = None;
        self.queue.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
