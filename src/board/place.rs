//! Writing bootloader files outside the image, at the offsets the SoC's boot ROM expects
//! (Rockchip idbloader at sector 64 and u-boot.itb at 16384, sunxi SPL at 8/128 KiB, ...).
//!
//! Planning is separate from writing so `write` can refuse before touching the target: a
//! placement that would overwrite the partition table or any partition of the image is an
//! error, never a silent corruption.

use std::path::PathBuf;

use super::check::human_offset;
use super::error::BoardError;
use super::parttable::PartitionTable;
use super::registry::Board;
use super::schema::*;
use crate::write::buffer::AlignedBuf;
use crate::write::sink::Sink;

/// One file to write at one byte offset of the target.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PlacedFile {
    pub path: PathBuf,
    /// Byte offset on the target medium.
    pub offset: u64,
    pub len: u64,
    /// The descriptor entry it matched (`u-boot-rockchip.bin`).
    pub slot: String,
}

/// Decide where each of `files` goes for `board` on `medium`, given the image's partition table.
///
/// A file matches the placement with the same file name. A single file whose name matches no
/// placement is accepted when exactly one placement applies (or the layout has a `combined`
/// one), so `--bootloader ./result/u-boot.bin` still works for a one-file layout.
pub fn plan(
    board: &Board,
    medium: &Medium,
    table: &PartitionTable,
    files: &[PathBuf],
) -> Result<Vec<PlacedFile>, BoardError> {
    let layout = board.layout(medium).ok_or_else(|| {
        BoardError::Placement(format!(
            "the {} has no bootloader layout for {} (the bootloader does not live on this medium)",
            board.name(),
            medium.kind
        ))
    })?;
    let image_table = match table {
        PartitionTable::Mbr { .. } => Some(TableKind::Mbr),
        PartitionTable::Gpt { .. } => Some(TableKind::Gpt),
        PartitionTable::None => None,
    };
    let applicable: Vec<&Placement> = layout
        .placements
        .iter()
        .filter(|p| match (p.table, image_table) {
            (None | Some(TableKind::Any), _) => true,
            (Some(want), Some(got)) => want == got,
            (Some(_), None) => true,
        })
        .collect();
    if applicable.is_empty() {
        return Err(BoardError::Placement(format!(
            "the {} layout for {} has no raw bootloader offsets{}",
            board.name(),
            medium.kind,
            layout
                .note
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        )));
    }
    let expected = applicable
        .iter()
        .map(|p| format!("{} at {}", p.file, human_offset(p.offset_bytes())))
        .collect::<Vec<_>>()
        .join(", ");

    let mut out: Vec<PlacedFile> = Vec::new();
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let by_name = applicable.iter().find(|p| p.file == name);
        let chosen = match by_name {
            Some(p) => *p,
            None if files.len() == 1 => {
                let combined: Vec<_> = applicable.iter().filter(|p| p.combined).collect();
                match (combined.as_slice(), applicable.as_slice()) {
                    ([one], _) => **one,
                    ([], [only]) => *only,
                    _ => {
                        return Err(BoardError::Placement(format!(
                            "{}: cannot tell where this file goes on the {}; name it as one of: {expected}",
                            f.display(),
                            board.name()
                        )))
                    }
                }
            }
            None => {
                return Err(BoardError::Placement(format!(
                    "{}: not a bootloader file of the {} (expected {expected})",
                    f.display(),
                    board.name()
                )))
            }
        };
        let len = std::fs::metadata(f)
            .map_err(|source| BoardError::Io {
                path: f.display().to_string(),
                source,
            })?
            .len();
        if len == 0 {
            return Err(BoardError::Placement(format!(
                "{}: empty file",
                f.display()
            )));
        }
        out.push(PlacedFile {
            path: f.clone(),
            offset: chosen.offset_bytes(),
            len,
            slot: chosen.file.clone(),
        });
    }
    if out
        .iter()
        .any(|p| applicable.iter().any(|a| a.combined && a.file == p.slot))
        && out.len() > 1
    {
        return Err(BoardError::Placement(format!(
            "a combined bootloader image replaces the separate files; give either it alone or the separate files ({expected})"
        )));
    }
    check_overlaps(board, &out, table)?;
    Ok(out)
}

/// Refuse placements that overlap each other, the partition table, or a partition.
fn check_overlaps(
    board: &Board,
    files: &[PlacedFile],
    table: &PartitionTable,
) -> Result<(), BoardError> {
    let table_end = match table {
        PartitionTable::Gpt { .. } => 34 * SECTOR,
        PartitionTable::Mbr { .. } => SECTOR,
        PartitionTable::None => 0,
    };
    for (i, f) in files.iter().enumerate() {
        let end = f.offset + f.len;
        if f.offset < table_end {
            return Err(BoardError::Placement(format!(
                "{} at {} would overwrite the image's partition table",
                f.path.display(),
                human_offset(f.offset)
            )));
        }
        for p in table.partitions() {
            let (ps, pe) = (p.start * SECTOR, p.end() * SECTOR);
            if f.offset < pe && ps < end {
                return Err(BoardError::Placement(format!(
                    "{} ({} bytes at {}) would overwrite partition {} of the image (starts at {}): the image was not laid out for the {}",
                    f.path.display(),
                    f.len,
                    human_offset(f.offset),
                    p.number,
                    human_offset(ps),
                    board.name()
                )));
            }
        }
        for g in &files[..i] {
            if f.offset < g.offset + g.len && g.offset < end {
                return Err(BoardError::Placement(format!(
                    "{} and {} overlap at {}",
                    g.path.display(),
                    f.path.display(),
                    human_offset(f.offset.max(g.offset))
                )));
            }
        }
    }
    Ok(())
}

/// Write the planned files through `sink` (the target's own claimed sink: O_EXCL and O_DIRECT
/// on a block device, LBAs over rockusb) and read each back from the medium. Call after the
/// image is written. The read-back goes through the sink's medium reader where it has one
/// (O_DIRECT on a device or a file that allows it), so the page cache cannot answer for the
/// medium; a sink without one (rockusb) reads its LBAs back.
pub fn write_placed(sink: &mut dyn Sink, files: &[PlacedFile]) -> Result<(), BoardError> {
    for f in files {
        let data = std::fs::read(&f.path).map_err(|source| BoardError::Io {
            path: f.path.display().to_string(),
            source,
        })?;
        sink.write_at(f.offset, &data)?;
    }
    sink.sync()?;
    let reader = sink.medium_reader();
    for f in files {
        let data = std::fs::read(&f.path).map_err(|source| BoardError::Io {
            path: f.path.display().to_string(),
            source,
        })?;
        let same = match &reader {
            Some(r) => {
                let mut buf = AlignedBuf::new(data.len() + r.slack());
                let at = r.read_range(f.offset, data.len(), &mut buf)?;
                buf[at..at + data.len()] == data[..]
            }
            None => {
                let mut buf = AlignedBuf::new(data.len());
                sink.read_at(f.offset, &mut buf[..data.len()])?;
                buf[..data.len()] == data[..]
            }
        };
        if !same {
            return Err(BoardError::Placement(format!(
                "{}: read-back at {} differs from the file",
                f.path.display(),
                human_offset(f.offset)
            )));
        }
    }
    Ok(())
}
