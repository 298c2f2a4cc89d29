//! What a disk is: udev and sysfs properties, its partitions and holders, what the running
//! system mounts or swaps on it, and which disks hold the system.

use super::TargetError;
use serde::Serialize;
use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// How a disk is attached, from udev's ID_BUS and the sysfs path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Bus {
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
pub(crate) struct Partition {
    pub name: String,
    pub(crate) size: u64,
    pub(crate) mountpoints: Vec<String>,
}

/// One whole disk as `sbcflash list` shows it and the safety checks see it.
#[derive(Debug, Clone, Serialize)]
pub struct Disk {
    /// /dev/sdX
    pub(crate) path: PathBuf,
    pub(crate) name: String,
    #[serde(skip)]
    pub devnum: u64,
    pub(crate) size: u64,
    pub(crate) model: Option<String>,
    pub(crate) vendor: Option<String>,
    pub(crate) serial: Option<String>,
    pub(crate) bus: Bus,
    pub(crate) removable: bool,
    pub(crate) read_only: bool,
    /// The disk itself is a partition (a target given as /dev/sdX1).
    pub(crate) is_partition: bool,
    pub(crate) partitions: Vec<Partition>,
    /// Mount points of the disk, its partitions or anything stacked on them.
    pub(crate) mountpoints: Vec<String>,
    /// Active swap on the disk, its partitions or holders.
    pub(crate) swap: bool,
    /// Holds the root filesystem.
    pub(crate) system: bool,
    /// Devices stacked on top (dm-0, md0, ...).
    pub(crate) holders: Vec<String>,
    /// For loop devices: the backing file.
    pub(crate) backing_file: Option<PathBuf>,
}

impl Disk {
    pub(crate) fn mounted(&self) -> bool {
        !self.mountpoints.is_empty()
    }

    /// A target the writer accepts without `--force` (see the module docs).
    pub(crate) fn is_removable_class(&self) -> bool {
        !self.is_partition
            && match self.bus {
                Bus::Loop | Bus::Sd => true,
                Bus::Usb => self.removable,
                _ => false,
            }
    }

    /// "SanDisk Ultra, 29.7 GiB, usb, 2 partitions"
    pub(crate) fn describe(&self) -> String {
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

pub(crate) fn human_size(b: u64) -> String {
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
pub(crate) struct Usage {
    /// (major:minor as dev_t, mount point, source path)
    pub(crate) mounts: Vec<(u64, String, String)>,
    pub(crate) swaps: Vec<u64>,
}

impl Usage {
    /// Read /proc/self/mountinfo and /proc/swaps.
    pub(crate) fn current() -> Usage {
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
pub(crate) fn parse_mountinfo(s: &str) -> Vec<(u64, String, String)> {
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

pub(super) fn sysfs_dir(devnum: u64) -> PathBuf {
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
pub(crate) fn inspect_devnum(devnum: u64, usage: &Usage) -> Result<Disk, TargetError> {
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
pub(crate) fn list_disks(all: bool) -> Result<Vec<Disk>, TargetError> {
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
}
