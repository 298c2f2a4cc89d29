//! `sbcflash read`: a disk (or image file) captured as an image of only what it holds: the
//! partition table, the gaps between partitions (bootloaders live there), and inside each
//! partition the blocks its file system marks in use (`fsmap`); everything after the last
//! partition is left out. Output is `OUT.img.zst` (multi-threaded zstd) or a sparse `OUT.img`
//! (`--raw`), plus `OUT.img.bmap` (bmap 2.0) and `OUT.img.blake3` (b3sum of the logical
//! image, the project's image digest).
//!
//! The source is only ever read: a disk or file opened read-only (O_DIRECT on devices, O_EXCL
//! so it cannot be mounted meanwhile), or a board's storage over rockusb READ_LBA (`rockusb`);
//! both are a [`Medium`], so the plan and the capture are the same code for either. A reader
//! thread fills a fixed pool of aligned buffers, the calling thread hashes and compresses
//! them, so memory stays bounded whatever the disk size.

pub(crate) mod bmapout;
pub(crate) mod btrfs;
pub(crate) mod fsmap;
pub(crate) mod gpt;
pub(crate) mod rockusb;

use crate::board::parttable::{self, PartitionTable};
use crate::exit::{Classify, Exit};
use crate::image::buffer::AlignedBuf;
use crate::image::zero::{ZEROS, ZEROS_LEN};
use crate::image::LogicalHasher;
use crate::progress::{Event, Reporter};
use fsmap::{FsMap, ReadAt};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Size of each read (and of each pool buffer).
pub(crate) const CHUNK: usize = 4 << 20;
/// zstd multi-threaded job size (bytes of input per worker job).
const JOB_SIZE: u32 = 2 << 20;
/// Buffers in flight between the reader and the consumer.
const DEPTH: usize = 4;

#[derive(Debug, thiserror::Error)]
pub(crate) enum CaptureError {
    #[error("{path}: reading at offset {offset}: {source}")]
    Read {
        path: String,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Layout { path: String, msg: String },
    #[error("refusing to overwrite {path}: it exists (pass --force to replace it)")]
    Exists { path: String },
    #[error("interrupted; the partial outputs were removed")]
    Interrupted,
}

impl Classify for CaptureError {
    fn exit(&self) -> Exit {
        match self {
            // A USB board that stops answering keeps the timeout's exit class.
            CaptureError::Read { source, .. } if source.kind() == std::io::ErrorKind::TimedOut => {
                Exit::Timeout
            }
            CaptureError::Read { .. } | CaptureError::Write { .. } => Exit::Io,
            CaptureError::Layout { .. } => Exit::BadInput,
            CaptureError::Exists { .. } => Exit::Refused,
            CaptureError::Interrupted => Exit::Interrupted,
        }
    }
}

/// What a capture reads from. Reads are whole 512-byte sectors at sector offsets, into
/// buffers aligned for O_DIRECT; errors name the medium and the offset.
pub(crate) trait Medium: Send {
    fn name(&self) -> &str;
    /// Bytes readable.
    fn size(&self) -> u64;
    fn read_sectors(&mut self, buf: &mut [u8], offset: u64) -> Result<(), CaptureError>;
}

/// A disk or image file, read at any offset through an aligned bounce buffer (O_DIRECT needs
/// aligned offsets, lengths and addresses).
pub(crate) struct Source {
    pub(crate) file: File,
    pub(crate) name: String,
    pub(crate) size: u64,
}

impl Medium for Source {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_sectors(&mut self, buf: &mut [u8], offset: u64) -> Result<(), CaptureError> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    return Err(self.err(
                        offset + done as u64,
                        std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                    ))
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err(offset + done as u64, e)),
            }
        }
        Ok(())
    }
}

impl Source {
    fn err(&self, offset: u64, source: std::io::Error) -> CaptureError {
        CaptureError::Read {
            path: self.name.clone(),
            offset,
            source,
        }
    }
}

const ALIGN: u64 = crate::image::buffer::ALIGN as u64;

/// Partition-relative reads for the file-system readers.
struct PartReader<'a> {
    src: &'a mut dyn Medium,
    start: u64,
}

impl ReadAt for PartReader<'_> {
    fn read_at(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let abs = self.start + offset;
        let a = abs / ALIGN * ALIGN;
        let end = (abs + len as u64).div_ceil(ALIGN) * ALIGN;
        let end = end.min(self.src.size());
        let mut buf = AlignedBuf::new((end - a) as usize);
        let want = (end - a) as usize;
        self.src
            .read_sectors(&mut buf[..want], a)
            .map_err(|e| match e {
                CaptureError::Read { source, .. } => source,
                other => std::io::Error::other(other.to_string()),
            })?;
        let s = (abs - a) as usize;
        buf.get(s..s + len).map(<[u8]>::to_vec).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("read of {len} bytes at {abs} beyond the end"),
            )
        })
    }
}

/// One partition and what was taken from it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PartReport {
    pub(crate) number: usize,
    /// Byte offset and length on the disk.
    pub(crate) start: u64,
    pub(crate) size: u64,
    pub(crate) fs: &'static str,
    /// Bytes captured from inside it.
    pub(crate) used: u64,
    /// Why it was copied whole, if it was.
    pub(crate) whole_because: Option<String>,
}

/// What will be read: the image size (end of the last partition) and the mapped ranges.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Plan {
    pub(crate) table: &'static str,
    pub(crate) image_size: u64,
    pub(crate) source_size: u64,
    pub(crate) partitions: Vec<PartReport>,
    #[serde(skip)]
    pub(crate) mapped: Vec<Range<u64>>,
    pub(crate) mapped_bytes: u64,
    /// GPT: the backup table was rebuilt after the last partition (primary header and
    /// protective MBR patched to match).
    #[serde(skip)]
    pub(crate) patches: Vec<gpt::Patch>,
}

/// MBR extended containers: their logical partitions are not parsed, so they are copied whole.
fn is_extended(t: &parttable::PartType) -> bool {
    matches!(t, parttable::PartType::Mbr(0x05 | 0x0f | 0x85))
}

/// Read the partition table and every file system's allocation map.
pub(crate) fn plan(src: &mut dyn Medium) -> Result<Plan, CaptureError> {
    let name = src.name().to_string();
    let src_size = src.size();
    let layout = |msg: String| CaptureError::Layout {
        path: name.clone(),
        msg,
    };
    let head_len = (1u64 << 20).min(src_size / 512 * 512);
    let mut head = AlignedBuf::new(head_len as usize);
    src.read_sectors(&mut head[..head_len as usize], 0)?;
    // A FAT boot sector also ends in 0x55AA: a disk formatted without a partition table
    // ("superfloppy") must not have its boot code read as partition entries.
    let table = if fsmap::is_fat_boot_sector(&head[..512]) {
        PartitionTable::None
    } else {
        parttable::parse(&head[..head_len as usize])
            .map_err(|m| layout(format!("partition table: {m}")))?
    };
    let mut parts: Vec<(usize, u64, u64, bool)> = table
        .partitions()
        .iter()
        .map(|p| {
            (
                p.number,
                p.start.saturating_mul(512),
                p.sectors.saturating_mul(512),
                is_extended(&p.kind),
            )
        })
        .collect();
    parts.sort_by_key(|p| p.1);
    let whole_disk = matches!(table, PartitionTable::None) || parts.is_empty();
    if whole_disk {
        // No partition table: a file system on the whole disk, or unknown data.
        parts = vec![(0, 0, src_size, false)];
    }
    let mut mapped = Vec::new();
    let mut reports = Vec::new();
    let mut cursor = 0u64;
    let min_end = match table {
        PartitionTable::Gpt { .. } => 34 * 512,
        _ => 512,
    };
    for (number, start, size, extended) in parts {
        let end = start.saturating_add(size);
        if end > src_size {
            return Err(layout(format!(
                "partition {number} ends at byte {end}, beyond the end of the disk ({src_size} bytes)"
            )));
        }
        if start < cursor {
            return Err(layout(format!(
                "partition {number} at byte {start} overlaps the one before it (ending at {cursor})"
            )));
        }
        mapped.push(cursor..start);
        let m = if extended {
            FsMap::Whole {
                fs: "extended",
                why: "logical partitions in an MBR extended partition are not read; copied whole"
                    .into(),
            }
        } else {
            fsmap::map(
                &mut PartReader {
                    src: &mut *src,
                    start,
                },
                size,
            )
            .map_err(|source| CaptureError::Read {
                path: name.clone(),
                offset: start,
                source,
            })?
        };
        let (used, why) = match &m {
            FsMap::Used { ranges, .. } => {
                let mut u = 0;
                for r in ranges {
                    let (s, e) = (start + r.start, (start + r.end).min(end));
                    mapped.push(s..e);
                    u += e.saturating_sub(s);
                }
                (u, None)
            }
            FsMap::Whole { why, .. } => {
                mapped.push(start..end);
                (size, Some(why.clone()))
            }
        };
        reports.push(PartReport {
            number,
            start,
            size,
            fs: m.fs(),
            used,
            whole_because: why,
        });
        cursor = end;
    }
    let (image_size, patches) = match table {
        PartitionTable::Gpt { .. } if !whole_disk => {
            let (size, patches) = gpt::rebuild(&head[..head_len as usize], cursor)
                .map_err(|m| layout(format!("partition table: {m}")))?;
            mapped.extend(patches.iter().map(gpt::Patch::range));
            (size, patches)
        }
        _ => (cursor.max(min_end), Vec::new()),
    };
    // Whole blocks of the bmap's size, clipped to the image's end.
    let mapped: Vec<Range<u64>> = fsmap::merge(
        mapped
            .into_iter()
            .map(|r| {
                r.start / bmapout::BLOCK * bmapout::BLOCK
                    ..(r.end.div_ceil(bmapout::BLOCK) * bmapout::BLOCK).min(image_size)
            })
            .collect(),
    );
    let mapped_bytes = mapped.iter().map(|r| r.end - r.start).sum();
    Ok(Plan {
        table: if whole_disk {
            "none"
        } else {
            table.kind_name()
        },
        image_size,
        source_size: src_size,
        partitions: reports,
        mapped,
        mapped_bytes,
        patches,
    })
}

/// The three files a capture writes, from the `OUT` argument (a trailing `.img` or
/// `.img.zst` is not doubled).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Outputs {
    pub(crate) image: PathBuf,
    pub(crate) bmap: PathBuf,
    pub(crate) blake3: PathBuf,
    pub(crate) raw: bool,
}

impl Outputs {
    pub(crate) fn new(out: &Path, raw: bool) -> Self {
        let s = out.as_os_str().to_string_lossy().to_string();
        let base = s
            .strip_suffix(".img.zst")
            .or_else(|| s.strip_suffix(".img"))
            .unwrap_or(&s)
            .to_string();
        let img = format!("{base}.img");
        Outputs {
            image: PathBuf::from(if raw {
                img.clone()
            } else {
                format!("{img}.zst")
            }),
            bmap: PathBuf::from(format!("{img}.bmap")),
            blake3: PathBuf::from(format!("{img}.blake3")),
            raw,
        }
    }

    fn all(&self) -> [&Path; 3] {
        [&self.image, &self.bmap, &self.blake3]
    }

    /// Refuses existing outputs unless `force`.
    pub(crate) fn check(&self, force: bool) -> Result<(), CaptureError> {
        if force {
            return Ok(());
        }
        for p in self.all() {
            if p.symlink_metadata().is_ok() {
                return Err(CaptureError::Exists {
                    path: p.display().to_string(),
                });
            }
        }
        Ok(())
    }
}

fn part_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_os_string();
    s.push(".part");
    PathBuf::from(s)
}

pub(crate) struct Options {
    /// zstd worker threads (0: one per core).
    pub(crate) threads: u32,
    pub(crate) level: i32,
    pub(crate) cancel: Arc<AtomicBool>,
    pub(crate) job: String,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub(crate) source: String,
    pub(crate) blake3: String,
    pub(crate) image_size: u64,
    pub(crate) mapped_bytes: u64,
    pub(crate) output_bytes: u64,
    pub(crate) seconds: f64,
    pub(crate) outputs: Outputs,
    pub(crate) plan: Plan,
}

enum Sink {
    Zst(zstd::stream::write::Encoder<'static, std::io::BufWriter<File>>),
    Raw(File),
}

/// Read the plan's ranges from `src` and write the outputs (to `.part` files renamed at the
/// end, so an interrupted or failed capture leaves nothing that looks finished).
pub(crate) fn capture(
    src: &mut dyn Medium,
    plan: Plan,
    out: &Outputs,
    opts: &Options,
    reporter: &dyn Reporter,
) -> Result<Report, CaptureError> {
    let t0 = Instant::now();
    let source = src.name().to_string();
    let tmp_image = part_path(&out.image);
    let result = capture_into(src, &plan, out, &tmp_image, opts, reporter);
    let (hash, ranges) = match result {
        Ok(x) => x,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp_image);
            return Err(e);
        }
    };
    let werr = |p: &Path| {
        let path = p.display().to_string();
        move |source| CaptureError::Write { path, source }
    };
    let bmap = bmapout::render(plan.image_size, &ranges);
    let tmp_bmap = part_path(&out.bmap);
    std::fs::write(&tmp_bmap, bmap).map_err(werr(&tmp_bmap))?;
    let raw_name = out.image.with_extension("");
    let logical = if out.raw { &out.image } else { &raw_name };
    let tmp_b3 = part_path(&out.blake3);
    std::fs::write(&tmp_b3, crate::image::digest::sidecar_line(&hash, logical))
        .map_err(werr(&tmp_b3))?;
    for (tmp, fin) in [
        (&tmp_image, &out.image),
        (&tmp_bmap, &out.bmap),
        (&tmp_b3, &out.blake3),
    ] {
        std::fs::rename(tmp, fin).map_err(werr(fin))?;
    }
    let output_bytes = std::fs::metadata(&out.image).map(|m| m.len()).unwrap_or(0);
    let report = Report {
        source,
        blake3: hash.to_hex().to_string(),
        image_size: plan.image_size,
        mapped_bytes: plan.mapped_bytes,
        output_bytes,
        seconds: t0.elapsed().as_secs_f64(),
        outputs: out.clone(),
        plan,
    };
    reporter.report(Event::Finish {
        job: opts.job.clone(),
        phase: crate::progress::Phase::Read,
        summary: serde_json::json!({
            "blake3": report.blake3,
            "image_size": report.image_size,
            "mapped_bytes": report.mapped_bytes,
            "output_bytes": report.output_bytes,
            "seconds": report.seconds,
        }),
    });
    Ok(report)
}

type Chunk = Result<(u64, usize, AlignedBuf), CaptureError>;

fn capture_into(
    src: &mut dyn Medium,
    plan: &Plan,
    out: &Outputs,
    tmp: &Path,
    opts: &Options,
    reporter: &dyn Reporter,
) -> Result<(blake3::Hash, Vec<bmapout::MappedRange>), CaptureError> {
    let werr = |source| CaptureError::Write {
        path: tmp.display().to_string(),
        source,
    };
    let file = File::create(tmp).map_err(werr)?;
    let mut sink = if out.raw {
        file.set_len(plan.image_size).map_err(werr)?;
        Sink::Raw(file)
    } else {
        let threads = match opts.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            n => n,
        };
        let mut enc = zstd::stream::write::Encoder::new(
            std::io::BufWriter::with_capacity(1 << 20, file),
            opts.level,
        )
        .map_err(werr)?;
        enc.multithread(threads).map_err(werr)?;
        // zstd's default job size (4 windows) keeps ~15 jobs' buffers alive: ~145 MiB RSS at
        // level 3 on two workers. Small jobs keep the capture near the writer's memory bound.
        enc.set_parameter(zstd::stream::raw::CParameter::JobSize(JOB_SIZE))
            .map_err(werr)?;
        enc.include_checksum(true).map_err(werr)?;
        enc.set_pledged_src_size(Some(plan.image_size))
            .map_err(werr)?;
        Sink::Zst(enc)
    };
    reporter.report(Event::Start {
        job: opts.job.clone(),
        phase: crate::progress::Phase::Read,
        total: Some(plan.mapped_bytes),
        detail: Some(format!(
            "{} of {} ({} table, {} partitions)",
            crate::target::human_size(plan.mapped_bytes),
            crate::target::human_size(plan.image_size),
            plan.table,
            plan.partitions.len()
        )),
    });
    let (tx, rx) = crossbeam_channel::bounded::<Chunk>(DEPTH);
    let (free_tx, free_rx) = crossbeam_channel::bounded::<AlignedBuf>(DEPTH);
    for _ in 0..DEPTH {
        let _ = free_tx.send(AlignedBuf::new(CHUNK));
    }
    let mut hasher = LogicalHasher::single_threaded();
    let mut ranges = Vec::new();
    let mut done = 0u64;
    std::thread::scope(|s| -> Result<(), CaptureError> {
        let mapped = &plan.mapped;
        let cancel = &opts.cancel;
        s.spawn(move || {
            for r in mapped {
                let mut off = r.start;
                while off < r.end {
                    if cancel.load(Ordering::Relaxed) {
                        let _ = tx.send(Err(CaptureError::Interrupted));
                        return;
                    }
                    let Ok(mut buf) = free_rx.recv() else { return };
                    let len = ((r.end - off) as usize).min(CHUNK);
                    // O_DIRECT: read whole sectors; the image end is sector-aligned.
                    // A rebuilt GPT backup may lie past the source's end: zeros there.
                    let rlen =
                        (len.div_ceil(512) * 512).min(src.size().saturating_sub(off) as usize);
                    buf[rlen..len.max(rlen)].fill(0);
                    let msg = src
                        .read_sectors(&mut buf[..rlen], off)
                        .map(|_| (off, len, buf));
                    let failed = msg.is_err();
                    if tx.send(msg).is_err() || failed {
                        return;
                    }
                    off += len as u64;
                }
            }
        });
        let mut pos = 0u64;
        let mut ri = 0usize;
        let mut sha = Sha256::new();
        let result = (|| {
            for msg in rx.iter() {
                let (off, len, mut buf) = msg?;
                gpt::apply(&plan.patches, off, &mut buf[..len]);
                if off > pos {
                    zeros(&mut sink, &mut hasher, off - pos).map_err(werr)?;
                }
                let data = &buf[..len];
                hasher.update(data);
                sha.update(data);
                match &mut sink {
                    Sink::Zst(e) => e.write_all(data).map_err(werr)?,
                    Sink::Raw(f) => f.write_all_at(data, off).map_err(werr)?,
                }
                pos = off + len as u64;
                let r = &plan.mapped[ri];
                if pos == r.end {
                    ranges.push(bmapout::MappedRange {
                        first: r.start / bmapout::BLOCK,
                        last: (r.end - 1) / bmapout::BLOCK,
                        sha256: std::mem::take(&mut sha).finalize().into(),
                    });
                    ri += 1;
                }
                done += len as u64;
                reporter.report(Event::Progress {
                    job: opts.job.clone(),
                    phase: crate::progress::Phase::Read,
                    done,
                    total: Some(plan.mapped_bytes),
                });
                let _ = free_tx.send(buf);
            }
            if pos < plan.image_size {
                zeros(&mut sink, &mut hasher, plan.image_size - pos).map_err(werr)?;
            }
            Ok(())
        })();
        // Unblock the reader if we stopped early.
        drop(rx);
        drop(free_tx);
        result
    })?;
    match sink {
        Sink::Zst(e) => {
            let w = e.finish().map_err(werr)?;
            let f = w.into_inner().map_err(|e| werr(e.into_error()))?;
            f.sync_all().map_err(werr)?;
        }
        Sink::Raw(f) => f.sync_all().map_err(werr)?,
    }
    Ok((hasher.finalize(), ranges))
}

fn zeros(sink: &mut Sink, h: &mut LogicalHasher, n: u64) -> std::io::Result<()> {
    h.update_zeros(n);
    if let Sink::Zst(e) = sink {
        let mut left = n;
        while left > 0 {
            let k = left.min(ZEROS_LEN as u64) as usize;
            e.write_all(&ZEROS[..k])?;
            left -= k as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_do_not_double_the_extension() {
        for arg in ["card", "card.img", "card.img.zst"] {
            let o = Outputs::new(Path::new(arg), false);
            assert_eq!(o.image, Path::new("card.img.zst"), "{arg}");
            assert_eq!(o.bmap, Path::new("card.img.bmap"));
            assert_eq!(o.blake3, Path::new("card.img.blake3"));
        }
        assert_eq!(Outputs::new(Path::new("c"), true).image, Path::new("c.img"));
    }
}
