//! Where the bytes go. A [`Sink`] is anything addressed by byte offset that can be written,
//! zeroed, synced and read back: a block device, a regular file, and (in other modules) a
//! rockusb LBA writer. The pipeline drives exactly one sink from one thread.
//!
//! Zeroing rules (what happens to `Zero` and `Skip` extents):
//! - `Zero` ranges must read back as zeroes afterwards. A block device zeroes them with
//!   BLKZEROOUT when its queue advertises offloaded write-zeroes
//!   (`queue/write_zeroes_max_bytes > 0`), else writes zero buffers. A regular file punches
//!   holes (or writes zeroes where the filesystem cannot punch).
//! - `Skip` ranges (bmap gaps, sparse DONT_CARE) are "don't care": nothing is written. To keep
//!   stale data from confusing filesystems or the kernel, a block device is discarded as a
//!   whole first when it supports discard (`queue/discard_max_bytes > 0`). Discard does not
//!   promise zeroes (SD cards may read 0x00 or 0xFF), so it is never used to claim a range is
//!   zero. On a device with neither discard nor write-zeroes, skipped ranges keep old data:
//!   safe for images whose filesystems never read unallocated blocks (mkfs/ext4/vfat images,
//!   as bmap assumes), and the reason to use `--no-bmap` for images that rely on zeroed holes.
//! - A device larger than the image gets its last MiB zeroed so a backup GPT left by an
//!   earlier image cannot be mistaken for this one's (the image's own backup GPT stays at the
//!   end of the image; growpart/sgdisk -e relocate it on first boot).
//! - A regular file target ends with exactly the image's length, holes where the image has
//!   zeroes or unmapped ranges.

use super::buffer::{AlignedBuf, ALIGN};
use super::WriteError;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;

/// A random-access destination for an image. Offsets are bytes from the start of the target.
/// Implementations may require nothing of alignment: block-device sinks bounce unaligned
/// requests themselves, so callers pass extents as the image describes them.
pub trait Sink: Send {
    /// Name for messages: the device path or file name.
    fn name(&self) -> &str;

    /// Bytes the target can hold; `None` when it grows (a regular file).
    fn capacity(&self) -> Option<u64>;

    /// Called once before the first write, with the logical image size when known. Block
    /// devices discard themselves here and clear a stale backup GPT beyond the image.
    fn prepare(&mut self, image_size: Option<u64>) -> Result<(), WriteError>;

    /// [`Sink::prepare`] for `--delta`: the old contents stay (no discard); only what
    /// differs will be written.
    fn prepare_keeping(&mut self, image_size: Option<u64>) -> Result<(), WriteError> {
        self.prepare(image_size)
    }

    /// Write `data` at `offset`. Errors name the offset that failed.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), WriteError>;

    /// Make `[offset, offset+len)` read back as zeroes (a `Zero` extent).
    fn zero_range(&mut self, offset: u64, len: u64) -> Result<(), WriteError>;

    /// `[offset, offset+len)` is unmapped in the image (a `Skip` extent): its contents do not
    /// matter. Default: leave it alone.
    fn skip_range(&mut self, _offset: u64, _len: u64) -> Result<(), WriteError> {
        Ok(())
    }

    /// True when ranges not written since [`Sink::prepare`] are known to read back as zeroes
    /// (a file's holes, a device zeroed by write-zeroes); then `zero_range` costs nothing.
    fn reads_back_zeroes(&self) -> bool;

    /// Make everything written so far durable (fsync).
    fn sync(&mut self) -> Result<(), WriteError>;

    /// Called once after the last write and sync: set a file's final length, re-read a
    /// device's partition table. Failures to re-read are warnings, not errors.
    fn finalize(&mut self, image_size: u64) -> Result<(), WriteError>;

    /// Read `buf.len()` bytes at `offset` from the medium itself (O_DIRECT on devices, so the
    /// page cache cannot answer for the card).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), WriteError>;

    /// A handle for positioned reads from several threads at once, so read-back can keep
    /// several requests in flight. `None`: read-back goes through [`Sink::read_at`] alone.
    fn medium_reader(&self) -> Option<MediumReader> {
        None
    }

    /// A handle for positioned writes from other threads, so the medium gets more than one
    /// request in flight. `None`: every write goes through [`Sink::write_at`].
    fn medium_writer(&self) -> Option<MediumWriter> {
        None
    }
}

/// Whether a request can go to a descriptor as it is: anything without O_DIRECT; with it, an
/// offset, length and buffer aligned to the device's block (and the buffer to [`ALIGN`]).
fn direct_ok(direct: bool, block: u64, off: u64, data: &[u8]) -> bool {
    !direct
        || (off % block == 0
            && data.len() as u64 % block == 0
            && data.as_ptr() as usize % ALIGN == 0)
}

/// Aligned positioned writes to a block device from writer threads (`pwrite` on a shared
/// descriptor, O_DIRECT included). One request at a time (what `dd` does) leaves the device
/// idle while the next request is set up; a second one in flight keeps it busy. Unaligned
/// requests stay with the sink, which bounces them.
pub struct MediumWriter {
    file: File,
    name: String,
    block: u64,
    direct: bool,
    capacity: u64,
}

impl MediumWriter {
    /// Whether this handle can write `data` at `off` (else the sink must).
    pub(crate) fn takes(&self, off: u64, data: &[u8]) -> bool {
        direct_ok(self.direct, self.block, off, data)
    }

    pub(crate) fn write_at(&self, off: u64, data: &[u8]) -> Result<(), WriteError> {
        let end = off.saturating_add(data.len() as u64);
        if end > self.capacity {
            return Err(WriteError::TooLarge {
                target: self.name.clone(),
                end,
                capacity: self.capacity,
            });
        }
        pwrite_all(&self.file, &self.name, data, off)
    }
}

/// Concurrent positioned reads of a target's medium (`pread` on a shared descriptor is
/// thread-safe). With `direct`, requests are widened to `block` boundaries by the caller's
/// buffer ([`MediumReader::read_range`]) instead of being bounced through a scratch buffer.
pub struct MediumReader {
    file: File,
    name: String,
    block: u64,
    direct: bool,
    /// Why reads are not O_DIRECT, when they are not (for the log).
    pub(crate) buffered_reason: Option<String>,
}

impl MediumReader {
    /// Room a buffer needs beyond a range's length for [`MediumReader::read_range`].
    pub(crate) fn slack(&self) -> usize {
        if self.direct {
            2 * self.block.max(ALIGN as u64) as usize
        } else {
            0
        }
    }

    /// Read `[offset, offset+len)` into `buf` (ALIGN-aligned, at least `len + slack()` long);
    /// returns where in `buf` the range starts. O_DIRECT reads cover whole blocks around it.
    pub(crate) fn read_range(
        &self,
        offset: u64,
        len: usize,
        buf: &mut [u8],
    ) -> Result<usize, WriteError> {
        let end = offset + len as u64;
        let (start, stop) = if self.direct {
            (
                offset / self.block * self.block,
                end.div_ceil(self.block) * self.block,
            )
        } else {
            (offset, end)
        };
        let want = (stop - start) as usize;
        if want > buf.len() {
            return Err(WriteError::Internal(format!(
                "read-back buffer of {} bytes for {want} bytes",
                buf.len()
            )));
        }
        let mut got = 0usize;
        let mut at = start;
        // A file's last block may be partial: stop at EOF once the range itself is covered.
        while start + (got as u64) < end {
            match self.file.read_at(&mut buf[got..want], at) {
                Ok(0) => {
                    return Err(WriteError::io(
                        &self.name,
                        "read",
                        at,
                        end - at,
                        std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "end of target"),
                    ))
                }
                Ok(n) => {
                    got += n;
                    at += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(WriteError::io(&self.name, "read", at, end - at, e)),
            }
        }
        Ok((offset - start) as usize)
    }
}

mod ioctl {
    // Linux <linux/fs.h> block ioctls.
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    nix::ioctl_read_bad!(blksszget, 0x1268, libc::c_int);
    nix::ioctl_write_ptr_bad!(blkdiscard, 0x1277, [u64; 2]);
    nix::ioctl_write_ptr_bad!(blkzeroout, 0x127f, [u64; 2]);
    nix::ioctl_none_bad!(blkrrpart, 0x125f);
    nix::ioctl_none_bad!(blkflsbuf, 0x1261);
}

fn errno_io(e: nix::errno::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

/// Size of a block device in bytes (BLKGETSIZE64).
pub(crate) fn block_device_size(f: &File) -> std::io::Result<u64> {
    let mut sz = 0u64;
    // SAFETY: the ioctl writes one u64 into `sz`.
    unsafe { ioctl::blkgetsize64(f.as_raw_fd(), &mut sz) }.map_err(errno_io)?;
    Ok(sz)
}

/// Logical block size of a block device (BLKSSZGET): the O_DIRECT granularity.
pub(crate) fn logical_block_size(f: &File) -> std::io::Result<u64> {
    let mut sz: libc::c_int = 0;
    // SAFETY: the ioctl writes one int into `sz`.
    unsafe { ioctl::blksszget(f.as_raw_fd(), &mut sz) }.map_err(errno_io)?;
    Ok(sz.max(512) as u64)
}

/// Ask the kernel to re-read the partition table (BLKRRPART).
pub(crate) fn reread_partitions(f: &File) -> std::io::Result<()> {
    // SAFETY: no argument.
    unsafe { ioctl::blkrrpart(f.as_raw_fd()) }
        .map(|_| ())
        .map_err(errno_io)
}

/// Queue limits that decide the zeroing strategy, read from sysfs for the device's queue
/// (a partition uses its disk's queue).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct QueueLimits {
    pub(crate) discard_max_bytes: u64,
    pub(crate) write_zeroes_max_bytes: u64,
}

impl QueueLimits {
    pub(crate) fn of_rdev(rdev: u64) -> Self {
        let (maj, min) = (libc::major(rdev), libc::minor(rdev));
        let base = format!("/sys/dev/block/{maj}:{min}");
        let read = |name: &str| -> u64 {
            for dir in [format!("{base}/queue"), format!("{base}/../queue")] {
                if let Ok(s) = std::fs::read_to_string(format!("{dir}/{name}")) {
                    return s.trim().parse().unwrap_or(0);
                }
            }
            0
        };
        Self {
            discard_max_bytes: read("discard_max_bytes"),
            write_zeroes_max_bytes: read("write_zeroes_max_bytes"),
        }
    }
}

fn pread_exact(f: &File, name: &str, mut buf: &mut [u8], mut off: u64) -> Result<(), WriteError> {
    while !buf.is_empty() {
        match f.read_at(buf, off) {
            Ok(0) => {
                return Err(WriteError::io(
                    name,
                    "read",
                    off,
                    buf.len() as u64,
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "end of target"),
                ))
            }
            Ok(n) => {
                buf = &mut buf[n..];
                off += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WriteError::io(name, "read", off, buf.len() as u64, e)),
        }
    }
    Ok(())
}

fn pwrite_all(f: &File, name: &str, mut buf: &[u8], mut off: u64) -> Result<(), WriteError> {
    while !buf.is_empty() {
        match f.write_at(buf, off) {
            Ok(0) => {
                return Err(WriteError::io(
                    name,
                    "write",
                    off,
                    buf.len() as u64,
                    std::io::Error::new(std::io::ErrorKind::WriteZero, "device accepted no bytes"),
                ))
            }
            Ok(n) => {
                buf = &buf[n..];
                off += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WriteError::io(name, "write", off, buf.len() as u64, e)),
        }
    }
    Ok(())
}

/// How a block device turns a `Zero` extent into zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroMode {
    /// BLKZEROOUT, offloaded by the device (write-zeroes / unmap with guaranteed zeroes).
    Offload,
    /// Write buffers of zeroes.
    Write,
}

/// A whole disk (or partition) opened by [`crate::target`]: O_DIRECT writes and reads with
/// aligned buffers, discard first, BLKZEROOUT where offloaded, BLKRRPART at the end.
pub struct BlockDeviceSink {
    file: File,
    name: String,
    capacity: u64,
    block: u64,
    direct: bool,
    limits: QueueLimits,
    zero_mode: ZeroMode,
    /// Allow discarding the whole device in `prepare`.
    pub(crate) discard: bool,
    scratch: Option<AlignedBuf>,
    zeroes: Option<AlignedBuf>,
}

/// Bounce buffer for unaligned requests and zero writes.
const SCRATCH: usize = 1 << 20;
const ZERO_BUF: usize = 4 << 20;

impl BlockDeviceSink {
    /// Wrap an open block device. `direct` says whether it was opened with O_DIRECT.
    pub(crate) fn new(
        file: File,
        name: impl Into<String>,
        direct: bool,
    ) -> Result<Self, WriteError> {
        let name = name.into();
        let capacity =
            block_device_size(&file).map_err(|e| WriteError::io(&name, "BLKGETSIZE64", 0, 0, e))?;
        let block = logical_block_size(&file).unwrap_or(512);
        let rdev = file
            .metadata()
            .map_err(|e| WriteError::io(&name, "fstat", 0, 0, e))?
            .rdev();
        let limits = QueueLimits::of_rdev(rdev);
        let zero_mode = if limits.write_zeroes_max_bytes > 0 {
            ZeroMode::Offload
        } else {
            ZeroMode::Write
        };
        Ok(Self {
            file,
            name,
            capacity,
            block,
            direct,
            limits,
            zero_mode,
            discard: true,
            scratch: None,
            zeroes: None,
        })
    }

    fn aligned(&self, off: u64, data: &[u8]) -> bool {
        direct_ok(self.direct, self.block, off, data)
    }

    fn range_ioctl(&self, zero: bool, off: u64, len: u64) -> std::io::Result<()> {
        let range = [off, len];
        // SAFETY: the ioctl reads two u64s.
        let r = unsafe {
            if zero {
                ioctl::blkzeroout(self.file.as_raw_fd(), &range)
            } else {
                ioctl::blkdiscard(self.file.as_raw_fd(), &range)
            }
        };
        r.map(|_| ()).map_err(errno_io)
    }

    /// Read-modify-write through the scratch buffer for requests O_DIRECT cannot take as is.
    fn write_bounced(&mut self, off: u64, data: &[u8]) -> Result<(), WriteError> {
        let bs = self.block;
        let end = off + data.len() as u64;
        let mut scratch = self
            .scratch
            .take()
            .unwrap_or_else(|| AlignedBuf::new(SCRATCH));
        let mut cur = off / bs * bs;
        let result = (|| {
            while cur < end {
                let chunk_end = (cur + SCRATCH as u64).min(end.div_ceil(bs) * bs);
                let n = (chunk_end - cur) as usize;
                let lo = cur.max(off);
                let hi = chunk_end.min(end);
                if lo > cur || hi < chunk_end {
                    pread_exact(&self.file, &self.name, &mut scratch[..n], cur)?;
                }
                scratch[(lo - cur) as usize..(hi - cur) as usize]
                    .copy_from_slice(&data[(lo - off) as usize..(hi - off) as usize]);
                pwrite_all(&self.file, &self.name, &scratch[..n], cur)?;
                cur = chunk_end;
            }
            Ok(())
        })();
        self.scratch = Some(scratch);
        result
    }

    fn write_zero_buffers(&mut self, off: u64, len: u64) -> Result<(), WriteError> {
        let zeroes = self
            .zeroes
            .take()
            .unwrap_or_else(|| AlignedBuf::new(ZERO_BUF));
        let mut cur = off;
        let end = off + len;
        let mut result = Ok(());
        while cur < end {
            let n = ((end - cur) as usize).min(zeroes.len());
            if let Err(e) = self.write_at(cur, &zeroes[..n]) {
                result = Err(e);
                break;
            }
            cur += n as u64;
        }
        self.zeroes = Some(zeroes);
        result
    }

    fn check_bounds(&self, off: u64, len: u64) -> Result<(), WriteError> {
        if off.saturating_add(len) > self.capacity {
            return Err(WriteError::TooLarge {
                target: self.name.clone(),
                end: off.saturating_add(len),
                capacity: self.capacity,
            });
        }
        Ok(())
    }
}

impl Sink for BlockDeviceSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn capacity(&self) -> Option<u64> {
        Some(self.capacity)
    }

    fn prepare(&mut self, image_size: Option<u64>) -> Result<(), WriteError> {
        if let Some(sz) = image_size {
            self.check_bounds(0, sz)?;
        }
        if self.discard && self.limits.discard_max_bytes > 0 {
            // Best effort: a failed discard only means stale data may remain in Skip ranges.
            match self.range_ioctl(false, 0, self.capacity) {
                Ok(()) => tracing::info!(target = %self.name, "discarded the whole device"),
                Err(e) => {
                    tracing::warn!(target = %self.name, "BLKDISCARD failed ({e}); stale data may remain in unmapped ranges")
                }
            }
        }
        // Clear a stale backup GPT from an earlier, larger-or-different image: the last MiB.
        if let Some(sz) = image_size {
            if self.capacity > sz {
                let start = sz.max(self.capacity.saturating_sub(1 << 20)) / self.block * self.block;
                let start = start.max(sz.div_ceil(self.block) * self.block);
                if start < self.capacity {
                    self.zero_range(start, self.capacity - start)?;
                }
            }
        }
        Ok(())
    }

    fn prepare_keeping(&mut self, image_size: Option<u64>) -> Result<(), WriteError> {
        let discard = std::mem::replace(&mut self.discard, false);
        let r = self.prepare(image_size);
        self.discard = discard;
        r
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), WriteError> {
        self.check_bounds(offset, data.len() as u64)?;
        if self.aligned(offset, data) {
            pwrite_all(&self.file, &self.name, data, offset)
        } else {
            self.write_bounced(offset, data)
        }
    }

    fn zero_range(&mut self, offset: u64, len: u64) -> Result<(), WriteError> {
        if len == 0 {
            return Ok(());
        }
        self.check_bounds(offset, len)?;
        let bs = self.block;
        if self.zero_mode == ZeroMode::Offload {
            // BLKZEROOUT needs block-aligned ranges: zero the aligned middle, write the edges.
            let a0 = offset.div_ceil(bs) * bs;
            let a1 = (offset + len) / bs * bs;
            if a1 > a0 {
                match self.range_ioctl(true, a0, a1 - a0) {
                    Ok(()) => {
                        if a0 > offset {
                            self.write_zero_buffers(offset, a0 - offset)?;
                        }
                        if offset + len > a1 {
                            self.write_zero_buffers(a1, offset + len - a1)?;
                        }
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!(target = %self.name, "BLKZEROOUT failed at offset {a0} ({e}); writing zeroes instead");
                        self.zero_mode = ZeroMode::Write;
                    }
                }
            }
        }
        self.write_zero_buffers(offset, len)
    }

    fn reads_back_zeroes(&self) -> bool {
        false
    }

    fn sync(&mut self) -> Result<(), WriteError> {
        self.file
            .sync_all()
            .map_err(|e| WriteError::io(&self.name, "fsync", 0, self.capacity, e))
    }

    fn finalize(&mut self, _image_size: u64) -> Result<(), WriteError> {
        if let Err(e) = reread_partitions(&self.file) {
            // Loop devices without partition scanning and busy disks refuse; not fatal.
            tracing::info!(target = %self.name, "re-reading the partition table failed: {e}");
        }
        Ok(())
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), WriteError> {
        let bs = self.block;
        let direct_ok = !self.direct
            || (offset % bs == 0
                && buf.len() as u64 % bs == 0
                && buf.as_ptr() as usize % ALIGN == 0);
        if direct_ok {
            return pread_exact(&self.file, &self.name, buf, offset);
        }
        let mut scratch = self
            .scratch
            .take()
            .unwrap_or_else(|| AlignedBuf::new(SCRATCH));
        let end = offset + buf.len() as u64;
        let mut cur = offset / bs * bs;
        let result = (|| {
            while cur < end {
                let chunk_end = (cur + SCRATCH as u64).min(end.div_ceil(bs) * bs);
                let n = (chunk_end - cur) as usize;
                pread_exact(&self.file, &self.name, &mut scratch[..n], cur)?;
                let lo = cur.max(offset);
                let hi = chunk_end.min(end);
                buf[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&scratch[(lo - cur) as usize..(hi - cur) as usize]);
                cur = chunk_end;
            }
            Ok(())
        })();
        self.scratch = Some(scratch);
        result
    }

    fn medium_writer(&self) -> Option<MediumWriter> {
        Some(MediumWriter {
            file: self.file.try_clone().ok()?,
            name: self.name.clone(),
            block: self.block,
            direct: self.direct,
            capacity: self.capacity,
        })
    }

    fn medium_reader(&self) -> Option<MediumReader> {
        // A dup shares the open file description, O_DIRECT included.
        let file = self.file.try_clone().ok()?;
        Some(MediumReader {
            file,
            name: self.name.clone(),
            block: self.block,
            direct: self.direct,
            buffered_reason: (!self.direct).then(|| "device refused O_DIRECT at open".into()),
        })
    }
}

/// A regular file target: plain writes, holes for zero and unmapped ranges (punched where the
/// file had old contents), final length equal to the image's.
pub struct FileSink {
    file: File,
    name: String,
    /// Length before we started: only ranges below it can hold old data worth punching.
    old_len: u64,
    can_punch: bool,
    zeroes: Option<Vec<u8>>,
}

impl FileSink {
    pub fn new(file: File, name: impl Into<String>) -> Result<Self, WriteError> {
        let name = name.into();
        let old_len = file
            .metadata()
            .map_err(|e| WriteError::io(&name, "fstat", 0, 0, e))?
            .len();
        Ok(Self {
            file,
            name,
            old_len,
            can_punch: true,
            zeroes: None,
        })
    }

    fn clear(&mut self, offset: u64, len: u64) -> Result<(), WriteError> {
        if offset >= self.old_len || len == 0 {
            return Ok(()); // beyond the old end: already a hole
        }
        let len = len.min(self.old_len - offset);
        if self.can_punch {
            // SAFETY: plain syscall on an owned fd.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(WriteError::io(&self.name, "punch hole", offset, len, e));
            }
            self.can_punch = false;
        }
        let zeroes = self.zeroes.take().unwrap_or_else(|| vec![0u8; 1 << 20]);
        let mut cur = offset;
        let mut result = Ok(());
        while cur < offset + len {
            let n = ((offset + len - cur) as usize).min(zeroes.len());
            if let Err(e) = pwrite_all(&self.file, &self.name, &zeroes[..n], cur) {
                result = Err(e);
                break;
            }
            cur += n as u64;
        }
        self.zeroes = Some(zeroes);
        result
    }
}

impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }
    fn capacity(&self) -> Option<u64> {
        None
    }
    fn prepare(&mut self, image_size: Option<u64>) -> Result<(), WriteError> {
        if let Some(sz) = image_size {
            if sz < self.old_len {
                self.file
                    .set_len(sz)
                    .map_err(|e| WriteError::io(&self.name, "truncate", sz, 0, e))?;
                self.old_len = sz;
            }
        }
        Ok(())
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), WriteError> {
        pwrite_all(&self.file, &self.name, data, offset)
    }
    fn zero_range(&mut self, offset: u64, len: u64) -> Result<(), WriteError> {
        self.clear(offset, len)
    }
    fn skip_range(&mut self, offset: u64, len: u64) -> Result<(), WriteError> {
        self.clear(offset, len)
    }
    fn reads_back_zeroes(&self) -> bool {
        true
    }
    fn sync(&mut self) -> Result<(), WriteError> {
        self.file
            .sync_all()
            .map_err(|e| WriteError::io(&self.name, "fsync", 0, 0, e))
    }
    fn finalize(&mut self, image_size: u64) -> Result<(), WriteError> {
        self.file
            .set_len(image_size)
            .map_err(|e| WriteError::io(&self.name, "set length", image_size, 0, e))?;
        self.sync()?;
        // Drop our cached pages so read-back verification reads the file's storage.
        // SAFETY: plain syscall on an owned fd.
        unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        Ok(())
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), WriteError> {
        pread_exact(&self.file, &self.name, buf, offset)
    }

    /// Read-back of a file target bypasses the page cache where its filesystem supports
    /// O_DIRECT (opened anew through /proc/self/fd, probed with one aligned read); elsewhere
    /// (e.g. an old tmpfs, FUSE) it falls back to buffered reads after the DONTNEED advice of
    /// `finalize`, and says why.
    fn medium_reader(&self) -> Option<MediumReader> {
        let buffered = |reason: String| {
            tracing::info!(target = %self.name, "read-back is buffered, not O_DIRECT: {reason}");
            Some(MediumReader {
                file: self.file.try_clone().ok()?,
                name: self.name.clone(),
                block: 1,
                direct: false,
                buffered_reason: Some(reason),
            })
        };
        use std::os::unix::fs::OpenOptionsExt;
        let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) => return buffered(format!("opening with O_DIRECT failed: {e}")),
        };
        // Probe: an aligned read must work (some filesystems accept the flag, then fail reads).
        let mut probe = AlignedBuf::new(ALIGN);
        if let Err(e) = file.read_at(&mut probe, 0) {
            return buffered(format!("an O_DIRECT read failed: {e}"));
        }
        Some(MediumReader {
            file,
            name: self.name.clone(),
            block: ALIGN as u64,
            direct: true,
            buffered_reason: None,
        })
    }
}

/// Drop a block device's buffer cache (BLKFLSBUF); used before non-O_DIRECT read-back.
pub(crate) fn flush_buffers(f: &File) -> std::io::Result<()> {
    // SAFETY: no argument.
    unsafe { ioctl::blkflsbuf(f.as_raw_fd()) }
        .map(|_| ())
        .map_err(errno_io)
}
