//! Finding and vetting write targets: what a disk is (udev), whether it is in use (mounts,
//! swap, holders), and opening it so it cannot change or be mounted under us (O_EXCL, then a
//! re-check through the fd).
//!
//! Policy, checked before a byte is written (each refusal is a [`TargetError::Refused`] with
//! the reason):
//! - the path must resolve (symlinks followed) to a block device or a regular file (a missing
//!   file is created);
//! - no partition of the disk, nor anything stacked on it (holders: dm, md, loop), may be
//!   mounted or be an active swap; the disk holding `/` is always refused;
//! - the target must be at least as large as the image;
//! - without `--force`: only USB disks that report removable media, SD cards (mmc, type SD),
//!   and loop devices. Loop devices count as virtual, allowed targets: writing one only
//!   overwrites its backing file, and tests need them; a loop device that is mounted, holds
//!   `/` or swap, or is backed by the image itself is still refused. eMMC, NVMe, SATA, virtio,
//!   USB hard disks (non-removable), dm/md and partitions need `--force`;
//! - the target must not be the image (same file, or a loop device backed by it);
//! - an existing regular file is destroyed like a disk ([`vet_file_target`]): without `--force`
//!   it is refused when the source is a block device or the file itself looks like an image
//!   (the arguments were swapped); the CLI confirms it like a disk.
//!
//! Permission denied opening the target is [`TargetError::Permission`] (exit 8), with the fix.

pub mod eject;

use crate::exit::{Classify, Exit};
use crate::write::{BlockDeviceSink, FileSink, Sink, WriteError};
use serde::Serialize;
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Errors about the target. `Refused` is a safety rule; `Io` an OS failure looking at it.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("refusing to write {path}: {reason}")]
    Refused { path: String, reason: String },
    #[error("{path}: {op}: {source}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// EACCES/EPERM opening the target: a setup problem with a known fix, not an I/O error.
    #[error("{path}: permission denied opening it for writing; {fix}")]
    Permission { path: String, fix: String },
}

impl Classify for TargetError {
    fn exit(&self) -> Exit {
        match self {
            TargetError::Refused { .. } => Exit::Refused,
            TargetError::Io { .. } => Exit::Io,
            TargetError::Permission { .. } => Exit::Environment,
        }
    }
}

impl TargetError {
    fn refused(path: &Path, reason: impl Into<String>) -> Self {
        TargetError::Refused {
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }
    fn io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        TargetError::Io {
            path: path.display().to_string(),
            op,
            source,
        }
    }
}

/// How a disk is attached, from udev's ID_BUS and the sysfs path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bus {
    Usb,
    /// SD card (mmc host, card type SD).
    Sd,
    /// eMMC or other MMC card (usually built-in storage).
    Mmc,
    Loop,
    Ata,
    Scsi,
    Nvme,
    Virtio,
    Other,
}

impl std::fmt::Display for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// A partition of a disk and where it is mounted.
#[derive(Debug, Clone, Serialize)]
pub struct Partition {
    pub name: String,
    pub size: u64,
    pub mountpoints: Vec<String>,
}

/// One whole disk as `sbcflash list` shows it and the safety checks see it.
#[derive(Debug, Clone, Serialize)]
pub struct Disk {
    /// /dev/sdX
    pub path: PathBuf,
    pub name: String,
    #[serde(skip)]
    pub devnum: u64,
    pub size: u64,
    pub model: Option<String>,
    pub vendor: Option<String>,
    pub serial: Option<String>,
    pub bus: Bus,
    pub removable: bool,
    pub read_only: bool,
    /// The disk itself is a partition (a target given as /dev/sdX1).
    pub is_partition: bool,
    pub partitions: Vec<Partition>,
    /// Mount points of the disk, its partitions or anything stacked on them.
    pub mountpoints: Vec<String>,
    /// Active swap on the disk, its partitions or holders.
    pub swap: bool,
    /// Holds the root filesystem.
    pub system: bool,
    /// Devices stacked on top (dm-0, md0, ...).
    pub holders: Vec<String>,
    /// For loop devices: the backing file.
    pub backing_file: Option<PathBuf>,
}

impl Disk {
    pub fn mounted(&self) -> bool {
        !self.mountpoints.is_empty()
    }

    /// A target the writer accepts without `--force` (see the module docs).
    pub fn is_removable_class(&self) -> bool {
        !self.is_partition
            && match self.bus {
                Bus::Loop | Bus::Sd => true,
                Bus::Usb => self.removable,
                _ => false,
            }
    }

    /// "SanDisk Ultra, 29.7 GiB, usb, 2 partitions"
    pub fn describe(&self) -> String {
        let model = [self.vendor.as_deref(), self.model.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ");
        let model = if model.is_empty() {
            "unknown model".into()
        } else {
            model
        };
        format!(
            "{} ({model}, {}, {}{}, {} partition{})",
            self.path.display(),
            human_size(self.size),
            self.bus,
            if self.removable { ", removable" } else { "" },
            self.partitions.len(),
            if self.partitions.len() == 1 { "" } else { "s" }
        )
    }
}

pub fn human_size(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Mounts and swaps of the running system, keyed by device number.
#[derive(Debug, Default, Clone)]
pub struct Usage {
    /// (major:minor as dev_t, mount point, source path)
    pub mounts: Vec<(u64, String, String)>,
    pub swaps: Vec<u64>,
}

impl Usage {
    /// Read /proc/self/mountinfo and /proc/swaps.
    pub fn current() -> Usage {
        let mut u = Usage::default();
        if let Ok(s) = std::fs::read_to_string("/proc/self/mountinfo") {
            u.mounts = parse_mountinfo(&s);
        }
        if let Ok(s) = std::fs::read_to_string("/proc/swaps") {
            for line in s.lines().skip(1) {
                if let Some(f) = line.split_whitespace().next() {
                    if let Ok(m) = std::fs::metadata(unescape_octal(f)) {
                        if m.file_type().is_block_device() {
                            u.swaps.push(m.rdev());
                        }
                    }
                }
            }
        }
        u
    }

    fn mountpoints_of(&self, devs: &BTreeSet<u64>) -> Vec<String> {
        let mut v: Vec<String> = self
            .mounts
            .iter()
            .filter(|(dev, _, src)| {
                devs.contains(dev)
                    || (src.starts_with('/')
                        && std::fs::metadata(src)
                            .map(|m| m.file_type().is_block_device() && devs.contains(&m.rdev()))
                            .unwrap_or(false))
            })
            .map(|(_, mp, _)| mp.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// (dev_t, mount point, source) for each line of a mountinfo file. Field 3 is major:minor
/// (btrfs reports an anonymous one, hence the source path as well).
pub fn parse_mountinfo(s: &str) -> Vec<(u64, String, String)> {
    let mut out = Vec::new();
    for line in s.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 5 {
            continue;
        }
        let Some((ma, mi)) = fields[2].split_once(':') else {
            continue;
        };
        let (Ok(ma), Ok(mi)) = (ma.parse::<u32>(), mi.parse::<u32>()) else {
            continue;
        };
        let src = fields
            .iter()
            .position(|f| *f == "-")
            .and_then(|i| fields.get(i + 2))
            .map(|s| unescape_octal(s))
            .unwrap_or_default();
        out.push((libc::makedev(ma, mi), unescape_octal(fields[4]), src));
    }
    out
}

/// mountinfo and /proc/swaps escape space, tab, newline and backslash as \ooo.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn sysfs_dir(devnum: u64) -> PathBuf {
    PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(devnum),
        libc::minor(devnum)
    ))
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

fn devnum_of_sysdir(dir: &Path) -> Option<u64> {
    let s = read_trim(&dir.join("dev"))?;
    let (a, b) = s.split_once(':')?;
    Some(libc::makedev(a.parse().ok()?, b.parse().ok()?))
}

/// The disk, its partitions, and everything stacked on any of them (holders, recursively).
fn family(sysdir: &Path) -> (BTreeSet<u64>, Vec<String>, Vec<PathBuf>) {
    let mut devs = BTreeSet::new();
    let mut holders = Vec::new();
    let mut parts = Vec::new();
    let mut todo = vec![sysdir.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(sysdir) {
        for e in rd.flatten() {
            if e.path().join("partition").exists() {
                parts.push(e.path());
                todo.push(e.path());
            }
        }
    }
    let mut seen = BTreeSet::new();
    while let Some(d) = todo.pop() {
        let Ok(canon) = d.canonicalize() else {
            continue;
        };
        if !seen.insert(canon.clone()) {
            continue;
        }
        if let Some(n) = devnum_of_sysdir(&canon) {
            devs.insert(n);
        }
        if let Ok(rd) = std::fs::read_dir(canon.join("holders")) {
            for e in rd.flatten() {
                holders.push(e.file_name().to_string_lossy().into_owned());
                todo.push(e.path());
            }
        }
    }
    parts.sort();
    (devs, holders, parts)
}

/// The device number holding `/` (its mount's major:minor, or its source's).
fn root_devnum(usage: &Usage) -> Option<u64> {
    let (dev, _, src) = usage.mounts.iter().rev().find(|(_, mp, _)| mp == "/")?;
    if let Ok(m) = std::fs::metadata(src) {
        if m.file_type().is_block_device() {
            return Some(m.rdev());
        }
    }
    Some(*dev)
}

/// Devices the root filesystem sits on, down the stack (dm slaves), as whole-disk sysfs dirs.
fn system_disks(usage: &Usage) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let Some(root) = root_devnum(usage) else {
        return out;
    };
    let mut todo = vec![sysfs_dir(root)];
    let mut guard = 0;
    while let Some(d) = todo.pop() {
        guard += 1;
        if guard > 64 {
            break;
        }
        let Ok(c) = d.canonicalize() else { continue };
        let disk = if c.join("partition").exists() {
            c.parent().map(Path::to_path_buf).unwrap_or(c.clone())
        } else {
            c.clone()
        };
        out.insert(disk);
        if let Ok(rd) = std::fs::read_dir(c.join("slaves")) {
            for e in rd.flatten() {
                todo.push(e.path());
            }
        }
    }
    out
}

/// Describe one block device (whole disk or partition) by device number.
pub fn inspect_devnum(devnum: u64, usage: &Usage) -> Result<Disk, TargetError> {
    let sys = sysfs_dir(devnum);
    let canon = sys
        .canonicalize()
        .map_err(|e| TargetError::io(&sys, "resolve sysfs entry", e))?;
    let name = canon
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let is_partition = canon.join("partition").exists();
    let udev_dev = udev::Device::from_syspath(&canon).ok();
    let prop = |k: &str| -> Option<String> {
        udev_dev
            .as_ref()
            .and_then(|d| d.property_value(k))
            .map(|v| v.to_string_lossy().replace("\\x20", " ").trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let disk_dir = if is_partition {
        canon
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or(canon.clone())
    } else {
        canon.clone()
    };
    let attr = |k: &str| read_trim(&disk_dir.join(k));
    let size = read_trim(&canon.join("size"))
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0)
        * 512;
    let devpath = canon.to_string_lossy().into_owned();
    let id_bus = prop("ID_BUS");
    let bus = if name.starts_with("loop") {
        Bus::Loop
    } else if id_bus.as_deref() == Some("usb") || devpath.contains("/usb") {
        Bus::Usb
    } else if name.starts_with("mmcblk") || devpath.contains("/mmc_host/") {
        match read_trim(&disk_dir.join("device/type")).as_deref() {
            Some("SD") => Bus::Sd,
            _ => Bus::Mmc,
        }
    } else if name.starts_with("nvme") {
        Bus::Nvme
    } else if devpath.contains("/virtio") || name.starts_with("vd") {
        Bus::Virtio
    } else {
        match id_bus.as_deref() {
            Some("ata") => Bus::Ata,
            Some("scsi") => Bus::Scsi,
            _ => Bus::Other,
        }
    };
    let (devs, holders, part_dirs) = family(&canon);
    let partitions = part_dirs
        .iter()
        .map(|p| {
            let pd = devnum_of_sysdir(p);
            let (pdevs, _, _) = family(p);
            Partition {
                name: p
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                size: read_trim(&p.join("size"))
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0)
                    * 512,
                mountpoints: if pd.is_some() {
                    usage.mountpoints_of(&pdevs)
                } else {
                    vec![]
                },
            }
        })
        .collect();
    let mountpoints = usage.mountpoints_of(&devs);
    let swap = usage.swaps.iter().any(|s| devs.contains(s));
    let system = system_disks(usage).contains(&disk_dir) || mountpoints.iter().any(|m| m == "/");
    let backing_file = read_trim(&canon.join("loop/backing_file")).map(PathBuf::from);
    Ok(Disk {
        path: udev_dev
            .as_ref()
            .and_then(|d| d.devnode().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from(format!("/dev/{name}"))),
        name,
        devnum,
        size,
        model: prop("ID_MODEL")
            .or_else(|| attr("device/model"))
            .or_else(|| attr("device/name")),
        vendor: prop("ID_VENDOR").or_else(|| attr("device/vendor")),
        serial: prop("ID_SERIAL_SHORT")
            .or_else(|| prop("ID_SERIAL"))
            .or_else(|| attr("device/serial")),
        bus,
        removable: attr("removable").as_deref() == Some("1"),
        read_only: read_trim(&canon.join("ro")).as_deref() == Some("1"),
        is_partition,
        partitions,
        mountpoints,
        swap,
        system,
        holders,
        backing_file,
    })
}

/// Whole disks of this machine, removable-class first. `all` includes system, virtual
/// (zram, ram, dm, md), empty (size 0) and loop devices; otherwise only candidates.
pub fn list_disks(all: bool) -> Result<Vec<Disk>, TargetError> {
    let usage = Usage::current();
    let mut en =
        udev::Enumerator::new().map_err(|e| TargetError::io(Path::new("udev"), "enumerate", e))?;
    en.match_subsystem("block")
        .map_err(|e| TargetError::io(Path::new("udev"), "enumerate", e))?;
    let mut out = Vec::new();
    for d in en
        .scan_devices()
        .map_err(|e| TargetError::io(Path::new("udev"), "enumerate", e))?
    {
        if d.devtype().map(|t| t != "disk").unwrap_or(true) {
            continue;
        }
        let Some(n) = d.devnum() else { continue };
        let Ok(disk) = inspect_devnum(n, &usage) else {
            continue;
        };
        let virt = ["zram", "ram", "dm-", "md", "sr", "fd", "nbd"]
            .iter()
            .any(|p| disk.name.starts_with(p));
        if !all && (disk.size == 0 || virt || disk.bus == Bus::Loop || !disk.is_removable_class()) {
            continue;
        }
        out.push(disk);
    }
    out.sort_by_key(|d| (!d.is_removable_class(), d.system, d.name.clone()));
    Ok(out)
}

/// What a target path turned out to be.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TargetInfo {
    Device(Box<Disk>),
    File {
        path: PathBuf,
        /// Length now (0 when it will be created).
        size: u64,
        exists: bool,
    },
}

impl TargetInfo {
    pub fn describe(&self) -> String {
        match self {
            TargetInfo::Device(d) => d.describe(),
            TargetInfo::File { path, size, exists } => {
                if *exists {
                    format!("regular file {} ({})", path.display(), human_size(*size))
                } else {
                    format!("new regular file {}", path.display())
                }
            }
        }
    }
}

/// What the caller knows and allows.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Logical size of the image (bmap/sparse/raw size) when known.
    pub image_size: Option<u64>,
    /// Allow non-removable, non-USB/SD disks and partitions.
    pub force: bool,
    /// Image files (and sidecars) that must not be the target.
    pub image_paths: Vec<PathBuf>,
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Look at `path` (symlinks followed) without opening it for writing.
pub fn inspect(path: &Path) -> Result<(PathBuf, TargetInfo), TargetError> {
    let resolved = match path.canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A new regular file: its directory must exist.
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let dir = parent
                .canonicalize()
                .map_err(|e| TargetError::io(parent, "resolve directory", e))?;
            if path.to_string_lossy().starts_with("/dev/") {
                return Err(TargetError::refused(
                    path,
                    "no such device (a path under /dev that does not exist would become a plain file)",
                ));
            }
            let p = dir.join(path.file_name().unwrap_or_default());
            return Ok((
                p.clone(),
                TargetInfo::File {
                    path: p,
                    size: 0,
                    exists: false,
                },
            ));
        }
        Err(e) => return Err(TargetError::io(path, "resolve", e)),
    };
    let md = std::fs::metadata(&resolved).map_err(|e| TargetError::io(&resolved, "stat", e))?;
    let ft = md.file_type();
    if ft.is_block_device() {
        let disk = inspect_devnum(md.rdev(), &Usage::current())?;
        Ok((resolved, TargetInfo::Device(Box::new(disk))))
    } else if ft.is_file() {
        Ok((
            resolved.clone(),
            TargetInfo::File {
                path: resolved,
                size: md.len(),
                exists: true,
            },
        ))
    } else {
        Err(TargetError::refused(
            &resolved,
            "it is neither a block device nor a regular file",
        ))
    }
}

/// A regular-file target grows to the image's logical size. An image whose header claims more
/// than the whole filesystem holding the file (an Android sparse header can describe ~16 EiB in
/// 44 bytes) is refused before writing, rather than filling the disk until ENOSPC/EFBIG.
fn vet_file_size(path: &Path, image_size: Option<u64>) -> Result<(), TargetError> {
    let Some(size) = image_size else {
        return Ok(());
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let fs = nix::sys::statvfs::statvfs(dir)
        .map_err(|e| TargetError::io(dir, "statvfs", std::io::Error::from(e)))?;
    let fs_size = (fs.blocks() as u64).saturating_mul(fs.fragment_size() as u64);
    if size > fs_size {
        return Err(TargetError::refused(
            path,
            format!(
                "the image claims {size} bytes ({}), more than the whole filesystem holding the \
                 file ({fs_size} bytes, {})",
                human_size(size),
                human_size(fs_size)
            ),
        ));
    }
    Ok(())
}

/// What an existing regular file looks like when it is recognisably an image (partition
/// table, file system or bootloader signature, compression or Android sparse magic, a zip, a
/// bmap): such a target is more likely the user's image than a scratch file.
pub fn file_looks_like_image(path: &Path) -> Option<String> {
    use crate::image::{detect, sniff};
    use std::io::Read;
    let mut head = Vec::with_capacity(sniff::SNIFF_LEN);
    File::open(path)
        .ok()?
        .take(sniff::SNIFF_LEN as u64)
        .read_to_end(&mut head)
        .ok()?;
    let outer = detect::detect(&head);
    if outer == detect::Format::AndroidSparse {
        return Some("an Android sparse image".into());
    }
    if outer.is_compression() {
        return Some(format!("{}-compressed", outer.name()));
    }
    if sniff::is_bmap_xml(&head) {
        return Some("a bmap file".into());
    }
    match sniff::sniff(&head) {
        sniff::Sniffed::Image(k) => Some(format!("it has {}", k.describe())),
        sniff::Sniffed::Other(sniff::OtherKind::Zip) => Some("a zip archive".into()),
        sniff::Sniffed::Other(_) => None,
    }
}

/// The rules for an existing regular file as the target, whose contents are destroyed like a
/// disk's: refused without `force` when the source is a block device (`write /dev/sdb
/// my.img`: the arguments are swapped) or the file is itself recognisably an image.
pub fn vet_file_target(info: &TargetInfo, image: &Path, force: bool) -> Result<(), TargetError> {
    let TargetInfo::File {
        path,
        size,
        exists: true,
    } = info
    else {
        return Ok(());
    };
    if force {
        return Ok(());
    }
    let source_is_device = std::fs::metadata(image).is_ok_and(|m| m.file_type().is_block_device());
    let why = if source_is_device {
        Some(format!(
            "{} is a block device and {} an existing file ({})",
            image.display(),
            path.display(),
            human_size(*size)
        ))
    } else if *size > 0 {
        file_looks_like_image(path).map(|what| {
            format!(
                "{} is an existing file that looks like an image ({what}, {})",
                path.display(),
                human_size(*size)
            )
        })
    } else {
        None
    };
    match why {
        Some(why) => Err(TargetError::refused(
            path,
            format!(
                "did you swap IMAGE and TARGET? {why}; the order is `sbcflash write IMAGE \
                 TARGET`. Pass --force to overwrite the file anyway"
            ),
        )),
        None => Ok(()),
    }
}

/// Apply the safety policy to an inspected target. Returns the first reason to refuse.
pub fn vet(path: &Path, info: &TargetInfo, policy: &Policy) -> Result<(), TargetError> {
    for img in &policy.image_paths {
        if same_file(path, img) {
            return Err(TargetError::refused(
                path,
                format!("it is the image itself ({})", img.display()),
            ));
        }
    }
    let d = match info {
        TargetInfo::File { path: p, .. } => return vet_file_size(p, policy.image_size),
        TargetInfo::Device(d) => d,
    };
    if d.system {
        return Err(TargetError::refused(
            path,
            "it holds the running system's root filesystem",
        ));
    }
    if d.mounted() {
        return Err(TargetError::refused(
            path,
            format!("mounted at {} (unmount it first)", d.mountpoints.join(", ")),
        ));
    }
    if d.swap {
        return Err(TargetError::refused(
            path,
            "it holds an active swap area (swapoff first)",
        ));
    }
    if !d.holders.is_empty() {
        return Err(TargetError::refused(
            path,
            format!(
                "it is in use by {} (device-mapper, RAID or similar)",
                d.holders.join(", ")
            ),
        ));
    }
    if d.read_only {
        return Err(TargetError::refused(
            path,
            "the device is read-only (write-protect switch?)",
        ));
    }
    if let Some(b) = &d.backing_file {
        for img in &policy.image_paths {
            if same_file(b, img) {
                return Err(TargetError::refused(
                    path,
                    format!(
                        "it is a loop device backed by the image itself ({})",
                        img.display()
                    ),
                ));
            }
        }
    }
    if let Some(sz) = policy.image_size {
        if d.size < sz {
            return Err(TargetError::refused(
                path,
                format!(
                    "the image ({sz} bytes, {}) is larger than the target ({} bytes, {})",
                    human_size(sz),
                    d.size,
                    human_size(d.size)
                ),
            ));
        }
    }
    if !policy.force && !d.is_removable_class() {
        let why = if d.is_partition {
            "it is a partition, not a whole disk".to_string()
        } else {
            format!(
                "it is a {} disk{} and not a removable USB disk, SD card or loop device",
                d.bus,
                if d.removable { "" } else { ", not removable," }
            )
        };
        return Err(TargetError::refused(
            path,
            format!("{why}; pass --force if you really mean it"),
        ));
    }
    Ok(())
}

/// An opened, vetted target. The fd is held for the whole run, so the device cannot be
/// mounted or swapped to meanwhile (O_EXCL), and the checks were re-done through the fd.
pub struct OpenTarget {
    pub path: PathBuf,
    pub info: TargetInfo,
    pub file: File,
    /// Opened with O_DIRECT.
    pub direct: bool,
}

impl OpenTarget {
    /// The sink that writes this target (devices are discarded before writing).
    pub fn into_sink(self) -> Result<Box<dyn Sink>, WriteError> {
        self.into_sink_with(true)
    }

    /// As [`OpenTarget::into_sink`]; `discard: false` keeps a device from being discarded.
    pub fn into_sink_with(self, discard: bool) -> Result<Box<dyn Sink>, WriteError> {
        let name = self.path.display().to_string();
        Ok(match self.info {
            TargetInfo::Device(_) => {
                let mut s = BlockDeviceSink::new(self.file, name, self.direct)?;
                s.discard = discard;
                Box::new(s)
            }
            TargetInfo::File { .. } => Box::new(FileSink::new(self.file, name)?),
        })
    }
}

/// Resolve, inspect, vet, open (block devices O_EXCL|O_DIRECT) and re-check through the fd.
pub fn open(path: &Path, policy: &Policy) -> Result<OpenTarget, TargetError> {
    let (resolved, info) = inspect(path)?;
    vet(&resolved, &info, policy)?;
    open_vetted(resolved, info, true)
}

/// Open a target for reading only (`sbcflash verify`): no policy beyond the file type.
pub fn open_readonly(path: &Path) -> Result<OpenTarget, TargetError> {
    let (resolved, info) = inspect(path)?;
    if let TargetInfo::File { exists: false, .. } = info {
        return Err(TargetError::io(
            &resolved,
            "open",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    open_vetted(resolved, info, false)
}

fn open_vetted(
    resolved: PathBuf,
    info: TargetInfo,
    write: bool,
) -> Result<OpenTarget, TargetError> {
    match &info {
        TargetInfo::Device(d) => {
            let open = |direct: bool| {
                let mut flags = libc::O_CLOEXEC;
                if write {
                    flags |= libc::O_EXCL;
                }
                if direct {
                    flags |= libc::O_DIRECT;
                }
                OpenOptions::new()
                    .read(true)
                    .write(write)
                    .custom_flags(flags)
                    .open(&resolved)
            };
            let (file, direct) = match open(true) {
                Ok(f) => (f, true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(
                        "{}: O_DIRECT not supported, using buffered I/O",
                        resolved.display()
                    );
                    let e = |e| match write {
                        true => open_err(&resolved, e),
                        false => TargetError::io(&resolved, "open", e),
                    };
                    (open(false).map_err(e)?, false)
                }
                Err(e) if write => return Err(open_err(&resolved, e)),
                Err(e) => return Err(TargetError::io(&resolved, "open", e)),
            };
            let md = file
                .metadata()
                .map_err(|e| TargetError::io(&resolved, "fstat", e))?;
            if !md.file_type().is_block_device() || md.rdev() != d.devnum {
                return Err(TargetError::refused(
                    &resolved,
                    "the device changed between the checks and opening it",
                ));
            }
            Ok(OpenTarget {
                path: resolved,
                info,
                file,
                direct,
            })
        }
        TargetInfo::File { .. } => {
            let file = OpenOptions::new()
                .read(true)
                .write(write)
                .create(write)
                .truncate(false)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&resolved)
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::EACCES) | Some(libc::EPERM) if write => open_err(&resolved, e),
                    _ => TargetError::io(&resolved, "open", e),
                })?;
            let md = file
                .metadata()
                .map_err(|e| TargetError::io(&resolved, "fstat", e))?;
            if !md.file_type().is_file() {
                return Err(TargetError::refused(
                    &resolved,
                    "it is no longer a regular file",
                ));
            }
            Ok(OpenTarget {
                path: resolved,
                info,
                file,
                direct: false,
            })
        }
    }
}

fn open_err(path: &Path, e: std::io::Error) -> TargetError {
    if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)) {
        return TargetError::Permission {
            path: path.display().to_string(),
            fix: permission_fix(path),
        };
    }
    if e.raw_os_error() == Some(libc::EBUSY) {
        TargetError::refused(
            path,
            "the kernel reports it busy (mounted, swapped to, or opened exclusively by another program)",
        )
    } else {
        TargetError::io(path, "open", e)
    }
}

/// What to do about EACCES on `path`: run as root, or join the group that may write it.
fn permission_fix(path: &Path) -> String {
    let md = std::fs::metadata(path).ok();
    let group = md.as_ref().and_then(|m| {
        nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(m.gid()))
            .ok()
            .flatten()
            .map(|g| g.name)
    });
    let group_writes = md.as_ref().is_some_and(|m| m.mode() & 0o020 != 0);
    let mut fix = "run sbcflash as root (sudo)".to_string();
    match group {
        Some(g) if group_writes && g != "root" => fix.push_str(&format!(
            ", or join the group `{g}` that owns it (sudo usermod -aG {g} $USER, then log in \
             again)"
        )),
        _ => {}
    }
    if md.is_some_and(|m| m.file_type().is_block_device()) {
        fix.push_str(
            "; boards in USB recovery mode (`write --via`) need the udev rules instead: \
             sbcflash usb udev-rules | sudo tee /etc/udev/rules.d/70-sbcflash.rules",
        );
    }
    fix
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parsing_reads_devnum_mountpoint_and_source() {
        let s = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                 40 22 7:3 / /mnt/my\\040dir rw shared:5 - vfat /dev/loop3 rw\n\
                 41 22 0:40 / /data rw - btrfs /dev/sdb2 rw\n";
        let m = parse_mountinfo(s);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0], (libc::makedev(254, 0), "/".into(), "/dev/vda".into()));
        assert_eq!(m[1].1, "/mnt/my dir");
        assert_eq!(m[1].0, libc::makedev(7, 3));
        assert_eq!(m[2].2, "/dev/sdb2");
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(64 << 20), "64.0 MiB");
        assert_eq!(human_size(31_914_983_424), "29.7 GiB");
    }

    #[test]
    fn a_fifo_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("fifo");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        let err = inspect(&p).expect_err("fifo must be refused");
        assert!(matches!(err, TargetError::Refused { .. }), "{err}");
        assert!(err
            .to_string()
            .contains("neither a block device nor a regular file"));
    }

    #[test]
    fn the_image_itself_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("img");
        std::fs::write(&p, b"x").expect("write");
        let (r, info) = inspect(&p).expect("inspect");
        let pol = Policy {
            image_paths: vec![p.clone()],
            ..Default::default()
        };
        assert!(vet(&r, &info, &pol).is_err());
    }
}
