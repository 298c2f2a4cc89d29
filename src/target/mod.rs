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
//!
//! Three files: `disk` (what a disk is: udev, sysfs, mounts, system disks), `policy` (the
//! rules above) and `open` (the exclusive open and its re-check); their items are re-exported
//! here, so callers name them `target::…`.

mod disk;
pub(crate) mod eject;
mod open;
mod policy;

pub(crate) use disk::{human_size, list_disks, Bus, Disk};
pub use open::{open, open_readonly, OpenTarget};
pub use policy::{file_looks_like_image, inspect, vet, vet_file_target, Policy, TargetInfo};

use crate::exit::{Classify, Exit};
use std::path::Path;

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
