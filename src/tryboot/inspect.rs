//! What is on an image before it is booted: its partitions, the extlinux entry U-Boot's
//! distro boot would pick, the kernel's architecture (from its header), and signs of a
//! board-specific bootloader that QEMU's `virt` machine cannot run.
//!
//! Files are read with the distribution's own tools (`debugfs` for ext2/3/4, `mtype` for
//! FAT) at the partition's byte offset, so nothing is mounted and nothing needs root.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::board::parttable::{self, PartType, PartitionTable};
use crate::board::schema::Arch;
use crate::board::schema::SECTOR;
use crate::image::sniff::rockchip_idb;

use super::TryError;

/// The default boot entry of an extlinux.conf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) label: String,
    /// `LINUX`/`KERNEL` path as written (relative to the conf's directory or absolute).
    pub(crate) kernel: String,
    pub(crate) initrd: Option<String>,
    pub(crate) append: String,
}

/// What [`inspect`] found.
#[derive(Debug, Clone)]
pub(crate) struct ImageInfo {
    /// `ext` or `fat` partition (1-based number) holding extlinux.conf, and the conf's path.
    pub(crate) extlinux: Option<(usize, String)>,
    pub(crate) entry: Option<Entry>,
    /// Architecture from the kernel's header.
    pub(crate) arch: Option<Arch>,
    /// A board-specific first-stage loader found on the image (named).
    pub(crate) vendor_loader: Option<String>,
    /// The EFI removable-media boot file the architecture came from (no extlinux entry).
    pub(crate) efi: Option<String>,
}

impl ImageInfo {
    /// NixOS puts its stage-2 init in the store on the kernel command line.
    pub(crate) fn is_nixos(&self) -> bool {
        self.entry
            .as_ref()
            .is_some_and(|e| e.append.contains("init=/nix/store/"))
    }
}

/// Parses the default entry of an extlinux.conf (`DEFAULT` label, else the first `LABEL`).
pub(crate) fn parse_extlinux(text: &str) -> Option<Entry> {
    let mut default = None;
    let mut entries: Vec<Entry> = Vec::new();
    for raw in text.lines() {
        let l = raw.trim();
        if l.starts_with('#') || l.is_empty() {
            continue;
        }
        let (key, rest) = match l.split_once(char::is_whitespace) {
            Some((k, r)) => (k.to_ascii_uppercase(), r.trim().to_string()),
            None => (l.to_ascii_uppercase(), String::new()),
        };
        match key.as_str() {
            "DEFAULT" => default = Some(rest),
            "LABEL" => entries.push(Entry {
                label: rest,
                kernel: String::new(),
                initrd: None,
                append: String::new(),
            }),
            "LINUX" | "KERNEL" => {
                if let Some(e) = entries.last_mut() {
                    e.kernel = rest;
                }
            }
            "INITRD" => {
                if let Some(e) = entries.last_mut() {
                    e.initrd = Some(rest);
                }
            }
            "APPEND" => {
                if let Some(e) = entries.last_mut() {
                    e.append = rest;
                }
            }
            _ => {}
        }
    }
    let pick = default
        .and_then(|d| entries.iter().position(|e| e.label == d))
        .unwrap_or(0);
    entries
        .into_iter()
        .nth(pick)
        .filter(|e| !e.kernel.is_empty())
}

/// The architecture a kernel image is built for, from its first bytes: the arm64 and
/// RISC-V `Image` headers (magic at offset 56 / 48), or a PE/COFF (EFI stub) machine type.
pub(crate) fn kernel_arch(head: &[u8]) -> Option<Arch> {
    if head.len() >= 60 && &head[56..60] == b"ARM\x64" {
        return Some(Arch::Aarch64);
    }
    if head.len() >= 60 && (&head[48..56] == b"RISCV\0\0\0" || &head[56..60] == b"RSC\x05") {
        return Some(Arch::Riscv64);
    }
    if head.len() >= 0x40 && &head[..2] == b"MZ" {
        let pe = u32::from_le_bytes(head[0x3c..0x40].try_into().ok()?) as usize;
        if head.len() >= pe + 6 && &head[pe..pe + 4] == b"PE\0\0" {
            return match u16::from_le_bytes([head[pe + 4], head[pe + 5]]) {
                0xaa64 => Some(Arch::Aarch64),
                0x5064 => Some(Arch::Riscv64),
                _ => None,
            };
        }
    }
    None
}

/// Board-specific first-stage loaders on the image head (at least 1 MiB of it).
pub(crate) fn vendor_loader(head: &[u8], table: Option<&PartitionTable>) -> Option<String> {
    // Rockchip: the idbloader at sector 64 (RC4-scrambled or not).
    if head.len() >= 64 * 512 + 512 {
        if let Some(what) = rockchip_idb(&head[64 * 512..65 * 512]) {
            return Some(format!("a Rockchip {what} at sector 64"));
        }
    }
    // Allwinner: the boot0/SPL eGON header at 8 KiB (or 128 KiB on newer SoCs).
    for off in [8192usize, 128 * 1024] {
        if head.len() >= off + 12 && &head[off + 4..off + 12] == b"eGON.BT0" {
            return Some(format!(
                "an Allwinner eGON boot header at {} KiB",
                off / 1024
            ));
        }
    }
    // StarFive JH7110 (VisionFive 2, Star64, Mars): a GPT partition of the SPL type.
    const JH7110_SPL: &str = "2E54B353-1271-4842-806F-E436D6AF6985";
    if let Some(PartitionTable::Gpt { parts }) = table {
        for p in parts {
            if matches!(p.kind, PartType::Gpt(g) if parttable::format_guid(&g).eq_ignore_ascii_case(JH7110_SPL))
            {
                return Some(format!(
                    "a StarFive JH7110 SPL partition (GPT partition {})",
                    p.number
                ));
            }
        }
    }
    None
}

fn run_tool(mut c: Command, what: &str) -> Result<Option<Vec<u8>>, TryError> {
    let out = c
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| TryError::Tool {
            tool: what.to_string(),
            msg: e.to_string(),
        })?;
    Ok((out.status.success() && !out.stdout.is_empty()).then_some(out.stdout))
}

/// Reads `path` from the file system at byte `offset` of `img` (ext via debugfs, FAT via mtype).
fn read_file(img: &Path, offset: u64, fat: bool, path: &str) -> Result<Option<Vec<u8>>, TryError> {
    if fat {
        let mut c = Command::new("mtype");
        c.arg("-i")
            .arg(format!("{}@@{offset}", img.display()))
            .arg(format!("::{path}"));
        // mtype converts nothing without -t; keep the bytes.
        return run_tool(c, "mtype (mtools)");
    }
    let mut c = Command::new("debugfs");
    c.arg("-R")
        .arg(format!("cat {path}"))
        .arg(format!("{}?offset={offset}", img.display()));
    let got = run_tool(c, "debugfs (e2fsprogs)")?;
    Ok(got)
}

/// Resolves an extlinux path against the conf's directory (`/boot/extlinux`).
fn resolve(conf_dir: &str, p: &str) -> String {
    if p.starts_with('/') {
        return p.to_string();
    }
    let mut parts: Vec<&str> = conf_dir.split('/').filter(|s| !s.is_empty()).collect();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    format!("/{}", parts.join("/"))
}

fn looks_fat(img: &mut std::fs::File, offset: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 512];
    if img.read_exact_at(&mut b, offset).is_err() {
        return false;
    }
    b[510] == 0x55
        && b[511] == 0xaa
        && (&b[54..59] == b"FAT12" || &b[54..59] == b"FAT16" || &b[82..87] == b"FAT32")
}

/// Inspects a raw image file.
pub(crate) fn inspect(img: &Path) -> Result<ImageInfo, TryError> {
    let mut f = std::fs::File::open(img).map_err(|e| TryError::Image {
        path: img.display().to_string(),
        msg: e.to_string(),
    })?;
    let mut head = Vec::new();
    (&mut f)
        .take(4 << 20)
        .read_to_end(&mut head)
        .map_err(|e| TryError::Image {
            path: img.display().to_string(),
            msg: e.to_string(),
        })?;
    let table = parttable::parse(&head).ok();
    let mut info = ImageInfo {
        extlinux: None,
        entry: None,
        arch: None,
        vendor_loader: vendor_loader(&head, table.as_ref()),
        efi: None,
    };
    let Some(table) = table else {
        return Ok(info);
    };
    for p in table.partitions() {
        let start = p.start * SECTOR;
        let fat = looks_fat(&mut f, start);
        for conf in ["/boot/extlinux/extlinux.conf", "/extlinux/extlinux.conf"] {
            let Some(text) = read_file(img, start, fat, conf)? else {
                continue;
            };
            let text = String::from_utf8_lossy(&text).into_owned();
            info.extlinux = Some((p.number, conf.to_string()));
            info.entry = parse_extlinux(&text);
            if let Some(e) = &info.entry {
                let dir = conf.rsplit_once('/').map(|(d, _)| d).unwrap_or("/");
                let k = resolve(dir, &e.kernel);
                if let Some(bytes) = read_file(img, start, fat, &k)? {
                    info.arch = kernel_arch(&bytes).or_else(|| {
                        // A gzip'd kernel (Image.gz): its header is inside.
                        let mut d = flate2::read::GzDecoder::new(&bytes[..]);
                        let mut h = vec![0u8; 4096];
                        d.read_exact(&mut h).ok()?;
                        kernel_arch(&h)
                    });
                }
            }
            return Ok(info);
        }
    }
    // No extlinux entry: U-Boot's distro boot falls back to the EFI removable-media path.
    for p in table.partitions() {
        let start = p.start * SECTOR;
        if !looks_fat(&mut f, start) {
            continue;
        }
        for efi in ["/EFI/BOOT/BOOTAA64.EFI", "/EFI/BOOT/BOOTRISCV64.EFI"] {
            if let Some(bytes) = read_file(img, start, true, efi)? {
                info.arch = kernel_arch(&bytes);
                info.efi = Some(format!("{efi} on partition {}", p.number));
                return Ok(info);
            }
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extlinux_default_entry() {
        let t = "# x\nDEFAULT b\nTIMEOUT 10\nLABEL a\n  LINUX /a\nLABEL b\n  LINUX ../nixos/k-Image\n  INITRD ../nixos/k-initrd\n  APPEND init=/nix/store/x-nixos-system/init console=ttyS0\n";
        let e = parse_extlinux(t).unwrap();
        assert_eq!(e.label, "b");
        assert_eq!(resolve("/boot/extlinux", &e.kernel), "/boot/nixos/k-Image");
        assert_eq!(e.initrd.as_deref(), Some("../nixos/k-initrd"));
        assert!(e.append.starts_with("init=/nix/store/"));
        let info = ImageInfo {
            extlinux: Some((2, "/boot/extlinux/extlinux.conf".into())),
            entry: Some(e),
            arch: None,
            vendor_loader: None,
            efi: None,
        };
        assert!(info.is_nixos(), "NixOS: the default check is systemd's");
        assert_eq!(parse_extlinux("LABEL x\n"), None);
    }

    #[test]
    fn kernel_headers() {
        let mut a = vec![0u8; 64];
        a[56..60].copy_from_slice(b"ARM\x64");
        assert_eq!(kernel_arch(&a), Some(Arch::Aarch64));
        let mut r = vec![0u8; 64];
        r[48..56].copy_from_slice(b"RISCV\0\0\0");
        assert_eq!(kernel_arch(&r), Some(Arch::Riscv64));
        assert_eq!(kernel_arch(&[0u8; 64]), None);
    }

    #[test]
    fn allwinner_header_is_a_vendor_loader() {
        let mut h = vec![0u8; 1 << 20];
        h[8196..8204].copy_from_slice(b"eGON.BT0");
        assert!(vendor_loader(&h, None).unwrap().contains("Allwinner"));
        assert_eq!(vendor_loader(&vec![0u8; 1 << 20], None), None);
    }
}
