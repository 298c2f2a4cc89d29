//! Writing identity files into the image's FAT partition on the target, without mounting.
//!
//! The partition is found from the target's own partition table (MBR or GPT, 512-byte
//! sectors, as NixOS sd images use), and `fatfs` works over a window of the opened device
//! (`fscommon::StreamSlice`), so the host's kernel never mounts a half-provisioned card and no
//! loop/mount privileges are needed. Reading back goes through O_DIRECT, so verification sees
//! what the medium holds, not the page cache.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

/// Errors while finding the partition or writing/reading files; each names the device.
#[derive(Debug, thiserror::Error)]
pub enum FatError {
    #[error("{dev}: {msg}")]
    Layout { dev: String, msg: String },
    #[error("{dev}: {what}: {source}")]
    Io {
        dev: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{dev}: injected file {path} reads back differently ({detail})")]
    Mismatch {
        dev: String,
        path: String,
        detail: String,
    },
}

impl crate::exit::Classify for FatError {
    fn exit(&self) -> crate::exit::Exit {
        use crate::exit::Exit;
        match self {
            FatError::Layout { .. } => Exit::BadInput,
            FatError::Io { .. } => Exit::Io,
            FatError::Mismatch { .. } => Exit::Verify,
        }
    }
}

/// A FAT partition on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FatPartition {
    /// 1-based partition number.
    pub(crate) number: u32,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

const SECTOR: u64 = 512;

fn io_err<'a>(dev: &'a Path, what: &str) -> impl Fn(std::io::Error) -> FatError + 'a {
    let what = what.to_string();
    move |source| FatError::Io {
        dev: dev.display().to_string(),
        what: what.clone(),
        source,
    }
}

fn read_at(f: &mut (impl Read + Seek), off: u64, buf: &mut [u8]) -> std::io::Result<()> {
    f.seek(SeekFrom::Start(off))?;
    f.read_exact(buf)
}

/// Whether `bs` looks like a FAT boot sector (jump, signature, sane BPB).
fn is_fat_boot_sector(bs: &[u8]) -> bool {
    if bs.len() < 512 || bs[510] != 0x55 || bs[511] != 0xaa {
        return false;
    }
    let jump = bs[0] == 0xeb || bs[0] == 0xe9;
    let bps = u16::from_le_bytes([bs[11], bs[12]]);
    let spc = bs[13];
    let fats = bs[16];
    jump && matches!(bps, 512 | 1024 | 2048 | 4096)
        && spc.is_power_of_two()
        && (1..=2).contains(&fats)
}

/// Lists partitions as (number, offset, len, type says FAT) from the MBR or GPT at the start
/// of `f`, using the board module's reader (512-byte sectors, as NixOS images use).
pub(crate) fn partitions(
    f: &mut (impl Read + Seek),
    dev: &Path,
) -> Result<Vec<(u32, u64, u64, bool)>, FatError> {
    use crate::board::parttable::{parse, PartitionTable};
    // Enough for an MBR, or a GPT header and a 128-entry array right after it.
    let mut head = vec![0u8; 64 * 1024];
    f.seek(SeekFrom::Start(0))
        .map_err(io_err(dev, "read partition table"))?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(dev, "read partition table")(e)),
        }
    }
    head.truncate(n);
    let layout = |msg: String| FatError::Layout {
        dev: dev.display().to_string(),
        msg,
    };
    let table = parse(&head).map_err(layout)?;
    if table == PartitionTable::None {
        return Err(layout(
            "no partition table (no MBR signature at offset 510)".into(),
        ));
    }
    Ok(table
        .partitions()
        .iter()
        .map(|p| {
            (
                p.number as u32,
                p.start * SECTOR,
                p.sectors * SECTOR,
                p.kind.is_fat(),
            )
        })
        .collect())
}

/// Finds the FAT partition: `want` (1-based) if given, else the first partition whose type
/// says FAT and whose first sector is a FAT boot sector.
pub(crate) fn find_fat(
    f: &mut (impl Read + Seek),
    dev: &Path,
    want: Option<u32>,
) -> Result<FatPartition, FatError> {
    let parts = partitions(f, dev)?;
    let layout = |msg: String| FatError::Layout {
        dev: dev.display().to_string(),
        msg,
    };
    for (n, off, len, fat_type) in &parts {
        if want.is_some_and(|w| w != *n) || (want.is_none() && !fat_type) {
            continue;
        }
        let mut bs = [0u8; 512];
        read_at(f, *off, &mut bs).map_err(io_err(dev, "read boot sector"))?;
        if is_fat_boot_sector(&bs) {
            return Ok(FatPartition {
                number: *n,
                offset: *off,
                len: *len,
            });
        }
        if want.is_some() {
            return Err(layout(format!(
                "partition {n} (at byte {off}) holds no FAT file system"
            )));
        }
    }
    Err(layout(match want {
        Some(w) => format!("no partition {w} in the partition table"),
        None => format!(
            "no FAT partition found among {} partition(s) to put the identity files in",
            parts.len()
        ),
    }))
}

fn is_block_device(f: &File) -> bool {
    f.metadata()
        .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
        .unwrap_or(false)
}

/// Turns O_DIRECT on or off on an open descriptor. The station keeps the writer's O_EXCL
/// descriptor for the whole job (so nothing can claim or mount the card between steps) and
/// switches it: buffered for fatfs's small unaligned writes, direct for reading back.
pub(crate) fn set_direct(f: &File, on: bool) -> std::io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL take no pointers.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let new = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: as above.
    if new != flags && unsafe { libc::fcntl(fd, libc::F_SETFL, new) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn fs_over<'f>(
    f: &'f File,
    p: &FatPartition,
    dev: &Path,
) -> Result<fatfs::FileSystem<fscommon::StreamSlice<&'f File>>, FatError> {
    let slice = fscommon::StreamSlice::new(f, p.offset, p.offset + p.len)
        .map_err(io_err(dev, "seek to the FAT partition"))?;
    fatfs::FileSystem::new(slice, fatfs::FsOptions::new()).map_err(io_err(
        dev,
        &format!("open FAT file system in partition {}", p.number),
    ))
}

/// Writes `files` into the FAT partition of the open target `f` (buffered, read-write;
/// directories are created, files replaced), then flushes them to the medium. `dev` names
/// the target in errors. Returns the partition used.
pub(crate) fn inject(
    f: &File,
    dev: &Path,
    want: Option<u32>,
    files: &[(String, Vec<u8>)],
) -> Result<FatPartition, FatError> {
    if is_block_device(f) {
        // Direct writes already invalidate cached pages of the ranges they cover; dropping the
        // whole cache too needs CAP_SYS_ADMIN, which a station running as its own user lacks.
        let _ = crate::write::sink::flush_buffers(f);
    }
    let mut r = f;
    let part = find_fat(&mut r, dev, want)?;
    {
        let fs = fs_over(f, &part, dev)?;
        write_files(&fs, dev, files)?;
        fs.unmount().map_err(io_err(dev, "finish FAT updates"))?;
    }
    f.sync_all()
        .map_err(io_err(dev, "flush identity files to the medium"))?;
    Ok(part)
}

/// [`inject`] over any storage that reads and writes (a board's storage through its rockusb
/// session, see `usbslot::SinkIo`). Returns the partition used.
pub(crate) fn inject_rw<T: Read + Write + Seek>(
    mut io: T,
    dev: &Path,
    want: Option<u32>,
    files: &[(String, Vec<u8>)],
) -> Result<FatPartition, FatError> {
    let part = find_fat(&mut io, dev, want)?;
    {
        let fs = fs_over_rw(io, &part, dev)?;
        write_files(&fs, dev, files)?;
        fs.unmount().map_err(io_err(dev, "finish FAT updates"))?;
    }
    Ok(part)
}

/// [`verify`] over any storage that reads: the caller makes sure reads reach the medium.
pub(crate) fn verify_rw<T: Read + Write + Seek>(
    io: T,
    dev: &Path,
    part: &FatPartition,
    files: &[(String, Vec<u8>)],
) -> Result<(), FatError> {
    let fs = fs_over_rw(io, part, dev)?;
    compare_files(&fs, dev, files)
}

fn fs_over_rw<T: Read + Write + Seek>(
    io: T,
    p: &FatPartition,
    dev: &Path,
) -> Result<fatfs::FileSystem<fscommon::StreamSlice<T>>, FatError> {
    let slice = fscommon::StreamSlice::new(io, p.offset, p.offset + p.len)
        .map_err(io_err(dev, "seek to the FAT partition"))?;
    fatfs::FileSystem::new(slice, fatfs::FsOptions::new()).map_err(io_err(
        dev,
        &format!("open FAT file system in partition {}", p.number),
    ))
}

fn write_files<T: fatfs::ReadWriteSeek>(
    fs: &fatfs::FileSystem<T>,
    dev: &Path,
    files: &[(String, Vec<u8>)],
) -> Result<(), FatError> {
    let root = fs.root_dir();
    for (path, body) in files {
        let what = format!("write {path}");
        let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        for i in 1..comps.len() {
            let d = comps[..i].join("/");
            root.create_dir(&d)
                .map_err(io_err(dev, &format!("create directory {d}")))?;
        }
        let mut file = root
            .create_file(&comps.join("/"))
            .map_err(io_err(dev, &what))?;
        file.truncate().map_err(io_err(dev, &what))?;
        file.write_all(body).map_err(io_err(dev, &what))?;
        file.flush().map_err(io_err(dev, &what))?;
    }
    Ok(())
}

/// Read-only, aligned access to an O_DIRECT descriptor for fatfs: reads go to the medium in
/// 64 KiB aligned chunks (one cached), writes are refused.
struct DirectReader<'f> {
    f: &'f File,
    pos: u64,
    size: u64,
    buf: crate::write::buffer::AlignedBuf,
    buf_at: Option<u64>,
    buf_len: usize,
}

const CHUNK: usize = 64 * 1024;

impl<'f> DirectReader<'f> {
    fn new(f: &'f File) -> std::io::Result<Self> {
        let size = crate::write::sink::block_device_size(f)?;
        Ok(DirectReader {
            f,
            pos: 0,
            size,
            buf: crate::write::buffer::AlignedBuf::new(CHUNK),
            buf_at: None,
            buf_len: 0,
        })
    }
}

impl Read for DirectReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || out.is_empty() {
            return Ok(0);
        }
        let base = self.pos / CHUNK as u64 * CHUNK as u64;
        if self.buf_at != Some(base) {
            let want = ((self.size - base) as usize).min(CHUNK);
            let mut got = 0;
            while got < want {
                let n = std::os::unix::fs::FileExt::read_at(
                    self.f,
                    &mut self.buf[got..CHUNK],
                    base + got as u64,
                )?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            self.buf_at = Some(base);
            self.buf_len = got.min(want);
        }
        let off = (self.pos - base) as usize;
        if off >= self.buf_len {
            return Ok(0);
        }
        let n = out.len().min(self.buf_len - off);
        out[..n].copy_from_slice(&self.buf[off..off + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

/// The new position of a window of `size` bytes at `pos` after `p` (for `Seek` impls).
pub(crate) fn seek_in_window(pos: u64, size: u64, p: SeekFrom) -> std::io::Result<u64> {
    match p {
        SeekFrom::Start(x) => Some(x),
        SeekFrom::Current(d) => pos.checked_add_signed(d),
        SeekFrom::End(d) => size.checked_add_signed(d),
    }
    .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

impl Seek for DirectReader<'_> {
    fn seek(&mut self, p: SeekFrom) -> std::io::Result<u64> {
        self.pos = seek_in_window(self.pos, self.size, p)?;
        Ok(self.pos)
    }
}

impl Write for DirectReader<'_> {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "verification is read-only",
        ))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads `files` back from the medium and compares them byte for byte. On a block device
/// the descriptor must be O_DIRECT (see [`set_direct`]), so the page cache cannot answer for
/// the card; regular files (tests) are read normally.
pub(crate) fn verify(
    f: &File,
    dev: &Path,
    part: &FatPartition,
    files: &[(String, Vec<u8>)],
) -> Result<(), FatError> {
    if is_block_device(f) {
        let r = DirectReader::new(f).map_err(io_err(dev, "size of the device"))?;
        let slice = fscommon::StreamSlice::new(r, part.offset, part.offset + part.len)
            .map_err(io_err(dev, "seek to the FAT partition"))?;
        let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new()).map_err(io_err(
            dev,
            &format!("read back FAT file system in partition {}", part.number),
        ))?;
        compare_files(&fs, dev, files)
    } else {
        let fs = fs_over(f, part, dev)?;
        compare_files(&fs, dev, files)
    }
}

fn compare_files<T: fatfs::ReadWriteSeek>(
    fs: &fatfs::FileSystem<T>,
    dev: &Path,
    files: &[(String, Vec<u8>)],
) -> Result<(), FatError> {
    let root = fs.root_dir();
    for (path, want) in files {
        let mut got = Vec::new();
        root.open_file(path)
            .and_then(|mut file| file.read_to_end(&mut got))
            .map_err(io_err(dev, &format!("read back {path}")))?;
        if &got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b);
            return Err(FatError::Mismatch {
                dev: dev.display().to_string(),
                path: path.clone(),
                detail: match at {
                    Some(i) => format!("first difference at byte {i}"),
                    None => format!("{} bytes, expected {}", got.len(), want.len()),
                },
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(p: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap()
    }

    /// An MBR image with one FAT16 partition at 1 MiB, formatted by fatfs itself.
    fn image(dir: &Path) -> std::path::PathBuf {
        let p = dir.join("img");
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(40 << 20).unwrap();
        let mut mbr = [0u8; 512];
        mbr[446 + 4] = 0x0e;
        mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        mbr[446 + 12..446 + 16].copy_from_slice(&((32u32 << 20) / 512).to_le_bytes());
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        f.write_all(&mbr).unwrap();
        let slice = fscommon::StreamSlice::new(&f, 1 << 20, 33 << 20).unwrap();
        fatfs::format_volume(slice, fatfs::FormatVolumeOptions::new()).unwrap();
        p
    }

    #[test]
    fn inject_then_verify_and_detect_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path());
        let files = vec![
            (
                "sbcflash/identity.json".to_string(),
                b"{\"serial\":\"X\"}".to_vec(),
            ),
            ("hostname".to_string(), b"x-1\n".to_vec()),
        ];
        let f = rw(&img);
        let part = inject(&f, &img, None, &files).unwrap();
        assert_eq!(part.number, 1);
        assert_eq!(part.offset, 1 << 20);
        verify(&f, &img, &part, &files).unwrap();
        // Injecting again replaces (shorter content truncates).
        let files2 = vec![("hostname".to_string(), b"y\n".to_vec())];
        inject(&f, &img, Some(1), &files2).unwrap();
        verify(&f, &img, &part, &files2).unwrap();
        let e = verify(&f, &img, &part, &files).unwrap_err();
        assert!(matches!(e, FatError::Mismatch { .. }), "{e}");
    }

    #[test]
    fn no_fat_partition_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("blank");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let e = inject(&rw(&p), &p, None, &[]).unwrap_err().to_string();
        assert!(e.contains("no partition table"), "{e}");
    }
}
