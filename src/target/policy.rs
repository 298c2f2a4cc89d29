//! The safety rules a target must pass before a byte is written (listed in the module docs of
//! [`super`]).

use super::disk::*;
use super::TargetError;
use serde::Serialize;
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

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
    pub(crate) fn describe(&self) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

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
