//! "Will this image boot on this board from this medium?" — decided from the first MiBs of the
//! logical image, before a byte is written.
//!
//! The check reads the partition table, compares the first partition with the SoC's reserved
//! bootloader region, looks for bootloader signatures at the SoC's offsets, and turns what it
//! finds into concrete advice that depends on where the board gets its bootloader from
//! ([`BootSource`]). Findings are warnings; `--strict` turns warnings into an error
//! ([`ImageReport::into_result`]).

use std::io::Read;

use serde::Serialize;

use super::error::BoardError;
use super::parttable::{self, PartitionTable};
use super::registry::Board;
use super::schema::*;
use crate::image::sniff::rockchip_idb;

/// How many bytes of the logical image the check wants: covers GPT entries, the Rockchip IDB at
/// 32 KiB, Allwinner eGON at 128 KiB, and the start of a partition at 1 MiB.
pub const HEAD_LEN: usize = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Something found, for the record.
    Info,
    /// The image will likely not boot as written; an error under `--strict`.
    Warning,
}

/// One observation about the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// Stable identifier for scripts and tests (`no-bootloader`, `reserved-overlap`, ...).
    pub code: &'static str,
    pub message: String,
}

/// The result of checking one image against one board medium.
#[derive(Debug, Clone, Serialize)]
pub struct ImageReport {
    pub(crate) board: String,
    pub(crate) medium: MediumKind,
    /// `MBR`, `GPT` or `no partition table`.
    pub table: &'static str,
    /// First partition start in sectors, if any.
    pub first_partition_sector: Option<u64>,
    /// Description of the bootloader found in the image, if any.
    pub bootloader: Option<String>,
    pub findings: Vec<Finding>,
}

impl ImageReport {
    pub(crate) fn warnings(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Warning)
    }

    pub(crate) fn has_warnings(&self) -> bool {
        self.warnings().next().is_some()
    }

    /// `Ok(self)` unless `strict` and there are warnings.
    pub fn into_result(self, strict: bool) -> Result<ImageReport, BoardError> {
        if strict && self.has_warnings() {
            return Err(BoardError::ImageMismatch {
                board: self.board.clone(),
                findings: self
                    .warnings()
                    .map(|f| format!("  - {}", f.message))
                    .collect::<Vec<_>>()
                    .join("\n"),
            });
        }
        Ok(self)
    }
}

/// The most [`bytes_wanted`] asks for: the first partition's boot sector within 64 MiB.
pub(crate) const MAX_HEAD_LEN: usize = 64 << 20;

/// How much of the image the check wants once `head` (at least [`HEAD_LEN`] bytes, or the
/// whole image) is known: more when the first partition (whose file system is checked)
/// starts beyond it, as NixOS's FIRMWARE partition at 8 MiB does.
pub(crate) fn bytes_wanted(head: &[u8]) -> usize {
    let first = parttable::parse(head)
        .ok()
        .and_then(|t| t.first().map(|p| p.start * SECTOR + SECTOR));
    match first.and_then(|end| usize::try_from(end).ok()) {
        Some(end) if end > HEAD_LEN && end <= MAX_HEAD_LEN => end,
        _ => HEAD_LEN,
    }
}

/// Read up to [`HEAD_LEN`] bytes of a raw stream (fewer at end of input). For image files in
/// any supported format use `crate::image::open::read_logical_prefix(path, opts, HEAD_LEN)`.
pub fn read_head<R: Read>(mut r: R) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(HEAD_LEN);
    r.by_ref().take(HEAD_LEN as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Check the image head against `board` booting from `medium`.
// Longer than 150 lines on purpose: one check after another against the same head, layout
// and findings list, in the order a reader of the report expects; split, each piece would
// take all of them as arguments.
pub fn check_image(board: &Board, medium: &Medium, head: &[u8]) -> ImageReport {
    let mut findings = Vec::new();
    let mut push = |severity, code, message: String| {
        findings.push(Finding {
            severity,
            code,
            message,
        })
    };
    let name = board.name();
    let id = board.id();

    let table = match parttable::parse(head) {
        Ok(t) => t,
        Err(msg) => {
            push(
                Severity::Warning,
                "bad-partition-table",
                format!("partition table: {msg}"),
            );
            PartitionTable::None
        }
    };
    let first = table.first().cloned();
    let layout = board.layout(medium);

    // Signatures: which bootloader does the image carry?
    let mut bootloader = None;
    if let Some(l) = layout {
        for s in &l.signatures {
            match find_signature(s, head, &table) {
                SigResult::Found(what) => {
                    bootloader = Some(what);
                    break;
                }
                SigResult::BeyondHead(at) => push(
                    Severity::Info,
                    "signature-not-read",
                    format!("bootloader signature at offset {at} lies beyond the bytes checked"),
                ),
                SigResult::Absent => {}
            }
        }
    }
    if let Some(b) = &bootloader {
        push(
            Severity::Info,
            "bootloader-found",
            format!("image carries a bootloader: {b}"),
        );
    }

    if medium.boot == BootSource::BootloaderOnly {
        if !table.partitions().is_empty() {
            push(
                Severity::Warning,
                "os-image-on-bootloader-flash",
                format!(
                    "this looks like an OS image ({} with {} partitions), but the {name}'s {} holds only the bootloader",
                    table.kind_name(),
                    table.partitions().len(),
                    medium.kind
                ),
            );
        }
        return report(board, medium, &table, first, bootloader, findings);
    }

    if matches!(table, PartitionTable::None) && head.len() >= 512 {
        push(
            Severity::Warning,
            "no-partition-table",
            "no MBR or GPT partition table: this is not a disk image".into(),
        );
    }

    if let Some(l) = layout {
        let want = l.table;
        let got = match &table {
            PartitionTable::Mbr { .. } => Some(TableKind::Mbr),
            PartitionTable::Gpt { .. } => Some(TableKind::Gpt),
            PartitionTable::None => None,
        };
        if let Some(got) = got {
            if want != TableKind::Any && want != got {
                push(
                    Severity::Warning,
                    "wrong-table",
                    format!(
                        "the image has {} partition table, but the {} boot ROM of the {name} expects {want} on {}",
                        match got {
                            TableKind::Mbr => "an MBR",
                            _ => "a GPT",
                        },
                        board.soc.vendor, medium.kind
                    ),
                );
            }
        }
        if l.first_partition_fat {
            match &first {
                Some(p) if p.kind.is_fat() => {
                    // The type byte is a claim: the firmware needs a FAT file system there.
                    let at = p.start * SECTOR;
                    match slice(head, at, SECTOR as usize) {
                        None => push(
                            Severity::Info,
                            "boot-fs-not-read",
                            format!(
                                "partition {}'s file system (at {}) lies beyond the bytes checked",
                                p.number,
                                human_offset(at)
                            ),
                        ),
                        Some(b) if crate::image::sniff::fat_boot_sector(b) => {}
                        Some(_) => push(
                            Severity::Warning,
                            "boot-partition-not-fat",
                            format!(
                                "partition {} has a FAT partition type ({}) but holds no FAT file system (no FAT boot sector at {}): the {name} firmware will not find its boot files",
                                p.number,
                                p.kind,
                                human_offset(at)
                            ),
                        ),
                    }
                }
                Some(p) => push(
                    Severity::Warning,
                    "first-partition-not-fat",
                    format!(
                        "partition {} (type {}) comes first, but the {name} firmware loads its files from a FAT first partition",
                        p.number, p.kind
                    ),
                ),
                None => {}
            }
        }
    }

    let overlap = match (layout.and_then(|l| l.reserved), &first) {
        (Some(r), Some(p)) if r.overlaps(p.start, p.end()) => Some((r, p.start)),
        _ => None,
    };
    let at = |sector: u64| human_offset(sector * SECTOR);

    match medium.boot {
        BootSource::Image | BootSource::BoardFlash => {
            if let Some((r, start)) = overlap {
                if bootloader.is_some() {
                    push(
                        Severity::Info,
                        "reserved-overlap-with-bootloader",
                        format!(
                            "first partition starts at {}, inside the {} bootloader area ({r}), but the image carries its own bootloader: assuming it was laid out for this board",
                            at(start),
                            board.soc.vendor
                        ),
                    );
                } else {
                    push(
                        Severity::Warning,
                        "reserved-overlap",
                        format!(
                            "first partition starts at {}, inside the {} bootloader area ({r}): this image was built for another board, and no bootloader can be added to it without overwriting that partition",
                            at(start),
                            board.soc.vendor
                        ),
                    );
                }
            }
            let expects_sig = layout.is_some_and(|l| !l.signatures.is_empty());
            if bootloader.is_none() && expects_sig {
                let hint = medium
                    .bootloader_hint
                    .clone()
                    .unwrap_or_else(|| format!("see `sbcflash boards show {id}`"));
                let msg = if medium.boot == BootSource::BoardFlash {
                    let flash = board
                        .bootloader_flash()
                        .map(|m| describe_flash(m.kind))
                        .unwrap_or("on-board flash");
                    format!(
                        "no U-Boot in the image: the {name} boots it from {} only if its {flash} holds U-Boot — {hint}",
                        medium.kind
                    )
                } else {
                    format!(
                        "no bootloader in the image: the {name} boot ROM reads it from the {} itself ({}) — {hint}",
                        medium.kind,
                        layout.map(describe_signatures).unwrap_or_default()
                    )
                };
                push(Severity::Warning, "no-bootloader", msg);
            }
            if bootloader.is_none() && !expects_sig && medium.boot == BootSource::BoardFlash {
                // e.g. TH1520: U-Boot lives in eMMC boot0, nothing to look for in the image.
                if let Some(hint) = &medium.bootloader_hint {
                    push(
                        Severity::Info,
                        "bootloader-elsewhere",
                        format!("the {name} loads U-Boot from its own flash: {hint}"),
                    );
                }
            }
        }
        BootSource::Firmware => {
            push(
                Severity::Info,
                "firmware-boot",
                format!(
                    "the {name} firmware (EEPROM) loads the boot files from the first FAT partition"
                ),
            );
        }
        BootSource::External => {
            push(
                Severity::Info,
                "external-bootloader",
                format!("the {name} gets its firmware from outside the image (e.g. QEMU -bios)"),
            );
        }
        BootSource::BootloaderOnly => {}
    }

    report(board, medium, &table, first, bootloader, findings)
}

fn report(
    board: &Board,
    medium: &Medium,
    table: &PartitionTable,
    first: Option<parttable::Partition>,
    bootloader: Option<String>,
    findings: Vec<Finding>,
) -> ImageReport {
    ImageReport {
        board: board.id().to_string(),
        medium: medium.kind,
        table: table.kind_name(),
        first_partition_sector: first.map(|p| p.start),
        bootloader,
        findings,
    }
}

fn describe_flash(k: MediumKind) -> &'static str {
    match k {
        MediumKind::SpiNor => "SPI flash",
        MediumKind::SpiNand => "SPI NAND flash",
        MediumKind::Emmc => "eMMC",
        _ => "on-board flash",
    }
}

fn describe_signatures(l: &Layout) -> String {
    l.signatures
        .iter()
        .map(|s| match s {
            Signature::RockchipIdb { sector } => format!("Rockchip IDB at sector {sector}"),
            Signature::Egon { offsets } => format!(
                "eGON.BT0 at {}",
                offsets
                    .iter()
                    .map(|o| human_offset(*o))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
            Signature::GptType { guid } => format!("a GPT partition of type {guid}"),
            Signature::Magic { offset, ascii } => format!("`{ascii}` at offset {offset}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// "8 MiB", "128 KiB", "1536 bytes".
pub(crate) fn human_offset(bytes: u64) -> String {
    if bytes == 0 {
        "offset 0".to_string()
    } else if bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else if bytes % 1024 == 0 {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("byte {bytes}")
    }
}

enum SigResult {
    Found(String),
    Absent,
    BeyondHead(u64),
}

fn find_signature(s: &Signature, head: &[u8], table: &PartitionTable) -> SigResult {
    match s {
        Signature::RockchipIdb { sector } => {
            let at = sector * SECTOR;
            match slice(head, at, SECTOR as usize) {
                None => SigResult::BeyondHead(at),
                Some(b) => match rockchip_idb(b) {
                    Some(kind) => SigResult::Found(format!("Rockchip {kind} at sector {sector}")),
                    None => SigResult::Absent,
                },
            }
        }
        Signature::Egon { offsets } => {
            let mut beyond = None;
            for &o in offsets {
                match slice(head, o + 4, 8) {
                    Some(b) if b == b"eGON.BT0" => {
                        return SigResult::Found(format!(
                            "Allwinner eGON.BT0 SPL at {}",
                            human_offset(o)
                        ))
                    }
                    Some(_) => {}
                    None => beyond = beyond.or(Some(o)),
                }
            }
            beyond.map_or(SigResult::Absent, SigResult::BeyondHead)
        }
        Signature::GptType { guid } => {
            let Some(want) = parttable::parse_guid(guid) else {
                return SigResult::Absent;
            };
            match table
                .partitions()
                .iter()
                .find(|p| p.kind == parttable::PartType::Gpt(want))
            {
                Some(p) => SigResult::Found(format!(
                    "SPL partition {} (type {guid}) at sector {}",
                    p.number, p.start
                )),
                None => SigResult::Absent,
            }
        }
        Signature::Magic { offset, ascii } => match slice(head, *offset, ascii.len()) {
            None => SigResult::BeyondHead(*offset),
            Some(b) if b == ascii.as_bytes() => {
                SigResult::Found(format!("`{ascii}` at offset {offset}"))
            }
            Some(_) => SigResult::Absent,
        },
    }
}

fn slice(head: &[u8], at: u64, len: usize) -> Option<&[u8]> {
    let at = usize::try_from(at).ok()?;
    head.get(at..at.checked_add(len)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_offsets() {
        assert_eq!(human_offset(8 << 20), "8 MiB");
        assert_eq!(human_offset(128 << 10), "128 KiB");
        assert_eq!(human_offset(1536), "byte 1536");
        assert_eq!(human_offset(0), "offset 0");
    }
}
