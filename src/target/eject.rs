//! After a write: saying when a removable disk may be pulled, and `--eject`, which flushes the
//! disk and then removes its USB device from the kernel, as `udisksctl power-off` does (the
//! kernel stops talking to it; the reader or stick can be pulled, and reappears when replugged).

use super::{Bus, Disk, TargetError};
use std::path::{Path, PathBuf};

/// A disk the user pulls out by hand: a removable USB disk or an SD card.
pub fn is_pullable(d: &Disk) -> bool {
    !d.is_partition && (d.bus == Bus::Sd || (d.bus == Bus::Usb && d.removable))
}

/// The USB device (not interface) a block device hangs off: the nearest sysfs ancestor of
/// `sys_disk` (a canonical `/sys/devices/...` path) with `busnum`, `devnum` and a `remove`
/// attribute, e.g. `.../usb1/1-2` for `.../usb1/1-2/1-2:1.0/host6/.../block/sdb`.
pub fn usb_device_dir(sys_disk: &Path) -> Option<PathBuf> {
    sys_disk
        .ancestors()
        .skip(1)
        .take_while(|p| p.starts_with("/sys/devices") || !sys_disk.starts_with("/sys"))
        .find(|p| {
            ["busnum", "devnum", "remove"]
                .iter()
                .all(|f| p.join(f).is_file())
        })
        .map(Path::to_path_buf)
}

/// Why `--eject` cannot apply to `d` (checked before writing), or the USB device to remove.
pub fn plan(d: &Disk) -> Result<PathBuf, TargetError> {
    let refuse = |why: String| {
        Err(TargetError::Refused {
            path: d.path.display().to_string(),
            reason: format!("--eject: {why}"),
        })
    };
    if d.bus != Bus::Usb {
        let hint = if d.bus == Bus::Sd {
            "; an SD card in a built-in slot can be pulled once the write says it is safe"
        } else {
            ""
        };
        return refuse(format!(
            "it is a {} device, and only a USB disk can be powered off{hint}",
            d.bus
        ));
    }
    let sys = super::disk::sysfs_dir(d.devnum)
        .canonicalize()
        .map_err(|e| TargetError::Io {
            path: d.path.display().to_string(),
            op: "resolve sysfs entry",
            source: e,
        })?;
    match usb_device_dir(&sys) {
        Some(u) => Ok(u),
        None => refuse(format!(
            "no USB device with a `remove` attribute above {}",
            sys.display()
        )),
    }
}

/// Flush `dev` (fsync and the kernel's buffer cache), then remove `usb` from the kernel.
pub fn eject(dev: &Path, usb: &Path) -> Result<(), TargetError> {
    let io = |op, e| TargetError::Io {
        path: dev.display().to_string(),
        op,
        source: e,
    };
    let f = std::fs::File::open(dev).map_err(|e| io("open to flush", e))?;
    f.sync_all().map_err(|e| io("fsync", e))?;
    crate::write::sink::flush_buffers(&f).map_err(|e| io("flush buffers (BLKFLSBUF)", e))?;
    drop(f);
    std::fs::write(usb.join("remove"), b"1").map_err(|e| TargetError::Io {
        path: usb.join("remove").display().to_string(),
        op: "remove the USB device",
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sysfs layout of a USB card reader (as on a real machine: usb device `1-2`, its
    /// interface `1-2:1.0`, the SCSI host and disk below) rebuilt in a temp dir, since the
    /// test machines have no USB disk: the walk must stop at the device, not the interface.
    #[test]
    fn the_usb_device_above_a_disk_is_found() {
        let t = tempfile::tempdir().expect("tempdir");
        let usb = t.path().join("devices/pci0000:00/0000:00:14.0/usb1/1-2");
        let disk = usb.join("1-2:1.0/host6/target6:0:0/6:0:0:0/block/sdb");
        std::fs::create_dir_all(&disk).expect("mkdir");
        for f in ["busnum", "devnum", "remove"] {
            std::fs::write(usb.join(f), "1\n").expect("attr");
        }
        // The root hub has them too; the nearest one wins.
        for f in ["busnum", "devnum", "remove"] {
            std::fs::write(usb.parent().expect("hub").join(f), "1\n").expect("attr");
        }
        // An interface has neither busnum nor devnum.
        std::fs::write(usb.join("1-2:1.0/remove"), "").ok();
        assert_eq!(usb_device_dir(&disk), Some(usb.clone()));
        let sata = t
            .path()
            .join("devices/pci0000:00/0000:00:17.0/ata1/host0/block/sda");
        std::fs::create_dir_all(&sata).expect("mkdir");
        assert_eq!(usb_device_dir(&sata), None);
    }
}
