//! Opening a vetted target so it cannot change under us: O_EXCL, then the checks again
//! through the descriptor; permission errors name their fix.

use super::policy::*;
use super::TargetError;
use crate::write::{BlockDeviceSink, FileSink, Sink, WriteError};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// An opened, vetted target. The fd is held for the whole run, so the device cannot be
/// mounted or swapped to meanwhile (O_EXCL), and the checks were re-done through the fd.
pub struct OpenTarget {
    pub(crate) path: PathBuf,
    pub info: TargetInfo,
    pub file: File,
    /// Opened with O_DIRECT.
    pub(crate) direct: bool,
}

impl OpenTarget {
    /// The sink that writes this target (devices are discarded before writing).
    pub fn into_sink(self) -> Result<Box<dyn Sink>, WriteError> {
        self.into_sink_with(true)
    }

    /// As [`OpenTarget::into_sink`]; `discard: false` keeps a device from being discarded.
    pub(crate) fn into_sink_with(self, discard: bool) -> Result<Box<dyn Sink>, WriteError> {
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
