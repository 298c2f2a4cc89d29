//! After a write: saying when a removable disk may be pulled, and `--eject`, which flushes the
//! disk and then either ejects its medium (a card reader or other removable-media USB disk:
//! SCSI START STOP UNIT with LoEj, as `eject` does; the reader stays, so a station slot does
//! not vanish) or removes its USB device from the kernel, as `udisksctl power-off` does (a
//! plain USB disk: the kernel stops talking to it; it reappears when replugged).

use super::{Bus, Disk, TargetError};
use std::path::{Path, PathBuf};

/// A disk the user pulls out by hand: a removable USB disk or an SD card.
pub(crate) fn is_pullable(d: &Disk) -> bool {
    !d.is_partition && (d.bus == Bus::Sd || (d.bus == Bus::Usb && d.removable))
}

/// The USB device (not interface) a block device hangs off: the nearest sysfs ancestor of
/// `sys_disk` (a canonical `/sys/devices/...` path) with `busnum`, `devnum` and a `remove`
/// attribute, e.g. `.../usb1/1-2` for `.../usb1/1-2/1-2:1.0/host6/.../block/sdb`.
pub(crate) fn usb_device_dir(sys_disk: &Path) -> Option<PathBuf> {
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

/// How a disk is ejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Removable media (card reader): eject the medium; the reader stays on the bus.
    Medium,
    /// A plain USB disk: remove this USB device (its sysfs dir) from the kernel.
    PowerOff(PathBuf),
}

impl Plan {
    /// What the user is told once it is done.
    pub(crate) fn done(&self, job: &str) -> String {
        match self {
            Plan::Medium => {
                format!("{job}: the medium was flushed and ejected: remove the card now")
            }
            Plan::PowerOff(usb) => format!(
                "{job} was flushed and powered off (USB device {}): remove it now",
                usb.display()
            ),
        }
    }
}

/// Why `--eject` cannot apply to `d` (checked before writing), or how it will be done.
pub(crate) fn plan(d: &Disk) -> Result<Plan, TargetError> {
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
    if d.removable {
        return Ok(Plan::Medium);
    }
    let sys = super::disk::sysfs_dir(d.devnum)
        .canonicalize()
        .map_err(|e| TargetError::Io {
            path: d.path.display().to_string(),
            op: "resolve sysfs entry",
            source: e,
        })?;
    match usb_device_dir(&sys) {
        Some(u) => Ok(Plan::PowerOff(u)),
        None => refuse(format!(
            "no USB device with a `remove` attribute above {}",
            sys.display()
        )),
    }
}

/// Flush `dev` (fsync and the kernel's buffer cache), then eject it as `plan` says.
pub(crate) fn eject(dev: &Path, plan: &Plan) -> Result<(), TargetError> {
    match plan {
        Plan::Medium => eject_medium(dev, None),
        Plan::PowerOff(usb) => power_off(dev, usb),
    }
}

/// Station slots: after a PASS, eject the card if `dev` is a USB removable-media disk (a card
/// reader) still holding the medium the job wrote (`diskseq`, so a card inserted meanwhile is
/// never ejected). Returns whether it ejected; other disks are left as they are.
pub(crate) fn eject_card(dev: &Path, diskseq: Option<u64>) -> Result<bool, TargetError> {
    match super::inspect(dev)? {
        (_, super::TargetInfo::Device(d)) if d.bus == Bus::Usb && d.removable => {
            eject_medium(dev, diskseq).map(|_| true)
        }
        _ => Ok(false),
    }
}

/// Ioctls: <linux/fs.h> BLKGETDISKSEQ, <scsi/sg.h> SG_IO.
mod ioctl {
    nix::ioctl_read!(blkgetdiskseq, 0x12, 128, u64);
    nix::ioctl_readwrite_bad!(sg_io, 0x2285, super::SgIoHdr);
}

/// `struct sg_io_hdr` of <scsi/sg.h> (the SG_IO v3 interface).
#[repr(C)]
pub(crate) struct SgIoHdr {
    interface_id: libc::c_int,
    dxfer_direction: libc::c_int,
    cmd_len: u8,
    mx_sb_len: u8,
    iovec_count: u16,
    dxfer_len: u32,
    dxferp: *mut libc::c_void,
    cmdp: *const u8,
    sbp: *mut u8,
    timeout: u32,
    flags: u32,
    pack_id: libc::c_int,
    usr_ptr: *mut libc::c_void,
    status: u8,
    masked_status: u8,
    msg_status: u8,
    sb_len_wr: u8,
    host_status: u16,
    driver_status: u16,
    resid: libc::c_int,
    duration: u32,
    info: u32,
}

/// One SCSI command without data through SG_IO; a failure names the command and the sense.
fn scsi_no_data(f: &std::fs::File, cdb: &[u8; 6], what: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut sense = [0u8; 32];
    let mut h = SgIoHdr {
        interface_id: b'S' as libc::c_int,
        dxfer_direction: -1, // SG_DXFER_NONE
        cmd_len: cdb.len() as u8,
        mx_sb_len: sense.len() as u8,
        iovec_count: 0,
        dxfer_len: 0,
        dxferp: std::ptr::null_mut(),
        cmdp: cdb.as_ptr(),
        sbp: sense.as_mut_ptr(),
        timeout: 20_000,
        flags: 0,
        pack_id: 0,
        usr_ptr: std::ptr::null_mut(),
        status: 0,
        masked_status: 0,
        msg_status: 0,
        sb_len_wr: 0,
        host_status: 0,
        driver_status: 0,
        resid: 0,
        duration: 0,
        info: 0,
    };
    // SAFETY: `h` points at `cdb` and `sense`, which outlive the call; no data buffer.
    unsafe { ioctl::sg_io(f.as_raw_fd(), &mut h) }
        .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
    if h.status == 0 && h.host_status == 0 && h.driver_status & 0x0f == 0 {
        return Ok(());
    }
    let (key, asc, ascq) = match sense[0] & 0x7f {
        0x72 | 0x73 => (sense[1] & 0x0f, sense[2], sense[3]),
        _ => (sense[2] & 0x0f, sense[12], sense[13]),
    };
    Err(std::io::Error::other(format!(
        "{what} failed: SCSI status {:#04x}, host {:#x}, driver {:#x}, sense key {key:#x} \
         ASC/ASCQ {asc:#04x}/{ascq:#04x}",
        h.status, h.host_status, h.driver_status
    )))
}

/// Flush `dev`, then allow medium removal and eject the medium (SCSI PREVENT ALLOW MEDIUM
/// REMOVAL, then START STOP UNIT with LoEj=1), as `eject` does. Opened O_EXCL: a mounted
/// or claimed disk is not ejected under its user.
pub(crate) fn eject_medium(dev: &Path, diskseq: Option<u64>) -> Result<(), TargetError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |op, e| TargetError::Io {
        path: dev.display().to_string(),
        op,
        source: e,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_EXCL | libc::O_NONBLOCK)
        .open(dev)
        .map_err(|e| io("open to eject", e))?;
    if let Some(want) = diskseq {
        let mut seq = 0u64;
        // SAFETY: the ioctl writes one u64 into `seq`.
        unsafe { ioctl::blkgetdiskseq(f.as_raw_fd(), &mut seq) }
            .map_err(|e| io("BLKGETDISKSEQ", std::io::Error::from_raw_os_error(e as i32)))?;
        if seq != want {
            return Err(TargetError::Refused {
                path: dev.display().to_string(),
                reason: format!(
                    "not ejecting: it holds another medium now (DISKSEQ {seq}, written {want})"
                ),
            });
        }
    }
    f.sync_all().map_err(|e| io("fsync", e))?;
    crate::write::sink::flush_buffers(&f).map_err(|e| io("flush buffers (BLKFLSBUF)", e))?;
    scsi_no_data(
        &f,
        &[0x1e, 0, 0, 0, 0, 0],
        "PREVENT ALLOW MEDIUM REMOVAL (allow)",
    )
    .map_err(|e| io("allow medium removal", e))?;
    scsi_no_data(&f, &[0x1b, 0, 0, 0, 0x02, 0], "START STOP UNIT (LoEj)")
        .map_err(|e| io("eject the medium", e))
}

/// Flush `dev` (fsync and the kernel's buffer cache), then remove `usb` from the kernel.
fn power_off(dev: &Path, usb: &Path) -> Result<(), TargetError> {
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
