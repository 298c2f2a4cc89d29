//! Which bytes of a partition its file system uses, read from the file system's own
//! allocation maps (ext2/3/4 block bitmaps, the FAT, btrfs's extent tree in `btrfs`), so a capture can leave free space out.
//! Small readers of our own: the few on-disk fields needed are fixed by the formats, and no
//! crate reads ext4 bitmaps or a FAT as a plain allocation map without mounting the volume
//! (`fatfs` walks directories, `ext4` crates read files). Anything not understood is
//! reported as such, so the caller copies the partition whole rather than guess.

use std::ops::Range;

/// Reads `len` bytes at a byte offset relative to the partition start.
pub(crate) trait ReadAt {
    fn read_at(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>>;
}

/// What was found in a partition and how much of it is in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FsMap {
    /// Used byte ranges, relative to the partition start, sorted and merged.
    Used {
        fs: &'static str,
        ranges: Vec<Range<u64>>,
    },
    /// Copy the whole partition: `fs` names what is there (or "unknown"), `why` says why
    /// its allocation map was not used.
    Whole { fs: &'static str, why: String },
}

impl FsMap {
    pub(crate) fn fs(&self) -> &'static str {
        match self {
            FsMap::Used { fs, .. } | FsMap::Whole { fs, .. } => fs,
        }
    }
}

fn le16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}
fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

/// Look at a partition of `size` bytes and map what its file system uses. I/O errors are
/// returned; a file system that is not recognised or not consistent is `Whole`.
pub(crate) fn map(r: &mut dyn ReadAt, size: u64) -> std::io::Result<FsMap> {
    if size < 2048 {
        return Ok(whole("unknown", "smaller than a file system header"));
    }
    let head = r.read_at(0, 2048)?;
    if le16(&head, 1024 + 56) == 0xEF53 {
        return ext(r, size, &head[1024..]);
    }
    if let Some(m) = fat(r, size, &head[..512])? {
        return Ok(m);
    }
    if size >= 0x10048 && r.read_at(0x10040, 8)? == b"_BHRfS_M" {
        return super::btrfs::map(r, size);
    }
    Ok(whole(
        "unknown",
        "no ext2/3/4, FAT or btrfs file system found",
    ))
}

fn whole(fs: &'static str, why: &str) -> FsMap {
    FsMap::Whole {
        fs,
        why: why.to_string(),
    }
}

/// Sorted, merged ranges.
pub(crate) fn merge(mut v: Vec<Range<u64>>) -> Vec<Range<u64>> {
    v.retain(|r| r.start < r.end);
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Collects used blocks as ranges, joining neighbours as they come.
struct Runs {
    unit: u64,
    ranges: Vec<Range<u64>>,
}

impl Runs {
    fn new(unit: u64) -> Self {
        Runs {
            unit,
            ranges: Vec::new(),
        }
    }
    /// Blocks `[first, first + n)` in use.
    fn add(&mut self, first: u64, n: u64) {
        let (s, e) = (first * self.unit, (first + n) * self.unit);
        match self.ranges.last_mut() {
            Some(last) if last.end == s => last.end = e,
            _ => self.ranges.push(s..e),
        }
    }
}

const EXT_INCOMPAT_META_BG: u64 = 0x10;
const EXT_INCOMPAT_64BIT: u64 = 0x80;
const EXT_RO_COMPAT_SPARSE_SUPER: u64 = 0x1;
const EXT_RO_COMPAT_GDT_CSUM: u64 = 0x10;
const EXT_RO_COMPAT_BIGALLOC: u64 = 0x200;
const EXT_RO_COMPAT_METADATA_CSUM: u64 = 0x400;
const EXT_COMPAT_SPARSE_SUPER2: u64 = 0x200;
const EXT_BG_BLOCK_UNINIT: u64 = 0x2;

fn is_power_of(mut n: u64, base: u64) -> bool {
    while n > 1 && n % base == 0 {
        n /= base;
    }
    n == 1
}

/// ext2/3/4: every block group's block bitmap; a group whose bitmap was never initialised
/// (`BLOCK_UNINIT`) holds only its own metadata, which is taken from the descriptors.
fn ext(r: &mut dyn ReadAt, size: u64, sb: &[u8]) -> std::io::Result<FsMap> {
    let fs = "ext2/3/4";
    let log = le32(sb, 24);
    if log > 6 {
        return Ok(whole(fs, &format!("implausible block size 2^(10+{log})")));
    }
    let bs = 1024u64 << log;
    let blocks = le32(sb, 4)
        | if le32(sb, 96) & EXT_INCOMPAT_64BIT != 0 {
            le32(sb, 0x150) << 32
        } else {
            0
        };
    let first_data = le32(sb, 20);
    let per_group = le32(sb, 32);
    let compat = le32(sb, 92);
    let incompat = le32(sb, 96);
    let ro_compat = le32(sb, 100);
    if ro_compat & EXT_RO_COMPAT_BIGALLOC != 0 {
        return Ok(whole(
            fs,
            "bigalloc (cluster bitmaps) is not read; copied whole",
        ));
    }
    if per_group == 0 || per_group > bs * 8 || blocks <= first_data {
        return Ok(whole(fs, "inconsistent superblock (blocks per group)"));
    }
    if blocks.checked_mul(bs).is_none_or(|b| b > size) {
        return Ok(whole(
            fs,
            &format!(
                "the file system ({blocks} blocks of {bs} bytes) is larger than its partition \
                 ({size} bytes)"
            ),
        ));
    }
    let desc_size = if incompat & EXT_INCOMPAT_64BIT != 0 {
        le16(sb, 254).max(32)
    } else {
        32
    };
    if !(desc_size.is_power_of_two() && (32..=1024).contains(&desc_size)) {
        return Ok(whole(
            fs,
            &format!("implausible group descriptor size {desc_size}"),
        ));
    }
    let groups = (blocks - first_data).div_ceil(per_group);
    let gdt_bytes = groups * desc_size;
    let gdt_blocks = gdt_bytes.div_ceil(bs);
    let gdt = r.read_at((first_data + 1) * bs, gdt_bytes as usize)?;
    let csum = ro_compat & (EXT_RO_COMPAT_GDT_CSUM | EXT_RO_COMPAT_METADATA_CSUM) != 0;
    let reserved_gdt = le16(sb, 0xCE);
    let backup_bgs = [le32(sb, 0x24C), le32(sb, 0x250)];
    let has_super = |g: u64| -> bool {
        if g == 0 {
            return true;
        }
        if compat & EXT_COMPAT_SPARSE_SUPER2 != 0 {
            return backup_bgs.contains(&g);
        }
        ro_compat & EXT_RO_COMPAT_SPARSE_SUPER == 0
            || g == 1
            || is_power_of(g, 3)
            || is_power_of(g, 5)
            || is_power_of(g, 7)
    };
    let mut runs = Runs::new(bs);
    // Boot block and superblock, whatever the block size.
    runs.add(0, first_data + 1);
    let mut meta: Vec<Range<u64>> = Vec::new();
    for g in 0..groups {
        let d = &gdt[(g * desc_size) as usize..((g + 1) * desc_size) as usize];
        let hi = |at: usize| {
            if desc_size >= 64 {
                le32(d, at) << 32
            } else {
                0
            }
        };
        let block_bitmap = le32(d, 0) | hi(0x20);
        let inode_bitmap = le32(d, 4) | hi(0x24);
        let inode_table = le32(d, 8) | hi(0x28);
        let flags = le16(d, 0x12);
        let inodes_per_group = le32(sb, 40);
        let inode_size = if le32(sb, 76) >= 1 {
            le16(sb, 88).max(128)
        } else {
            128
        };
        let itable_blocks = (inodes_per_group * inode_size).div_ceil(bs);
        for (b, n) in [
            (block_bitmap, 1),
            (inode_bitmap, 1),
            (inode_table, itable_blocks),
        ] {
            if b + n > blocks {
                return Ok(whole(
                    fs,
                    &format!("group {g}: metadata block {b} lies beyond the file system"),
                ));
            }
            meta.push(b * bs..(b + n) * bs);
        }
        let gstart = first_data + g * per_group;
        let gblocks = per_group.min(blocks - gstart);
        if csum && flags & EXT_BG_BLOCK_UNINIT != 0 {
            if has_super(g) {
                if incompat & EXT_INCOMPAT_META_BG != 0 {
                    return Ok(whole(
                        fs,
                        "meta_bg with uninitialised block groups is not read; copied whole",
                    ));
                }
                let n = (1 + gdt_blocks + reserved_gdt).min(gblocks);
                runs.add(gstart, n);
            }
            continue;
        }
        let bitmap = r.read_at(block_bitmap * bs, bs as usize)?;
        let mut i = 0u64;
        while i < gblocks {
            let byte = bitmap[(i / 8) as usize];
            if byte == 0 && i % 8 == 0 {
                i += 8;
                continue;
            }
            if byte & (1 << (i % 8)) != 0 {
                let s = i;
                while i < gblocks && bitmap[(i / 8) as usize] & (1 << (i % 8)) != 0 {
                    i += 1;
                }
                runs.add(gstart + s, i - s);
            } else {
                i += 1;
            }
        }
    }
    let mut all = runs.ranges;
    all.extend(meta);
    Ok(FsMap::Used {
        fs,
        ranges: merge(all),
    })
}

/// A FAT boot sector (not an MBR): a jump, and the file-system type label where FAT12/16
/// or FAT32 put it. GRUB's MBR starts with a jump too, but has no label.
pub(crate) fn is_fat_boot_sector(b: &[u8]) -> bool {
    b.len() >= 512
        && matches!(b[0], 0xEB | 0xE9)
        && (b[54..57] == *b"FAT" || b[82..87] == *b"FAT32")
}

/// FAT12/16/32: reserved sectors, the FATs and the root directory, then every cluster whose
/// FAT entry is not free. `None` if the boot sector is not a FAT one.
fn fat(r: &mut dyn ReadAt, size: u64, bs: &[u8]) -> std::io::Result<Option<FsMap>> {
    if bs[510] != 0x55 || bs[511] != 0xAA || !matches!(bs[0], 0xEB | 0xE9) {
        return Ok(None);
    }
    let bps = le16(bs, 11);
    let spc = u64::from(bs[13]);
    let reserved = le16(bs, 14);
    let nfats = u64::from(bs[16]);
    let root_entries = le16(bs, 17);
    let total = match le16(bs, 19) {
        0 => le32(bs, 32),
        n => n,
    };
    let fat_sectors = match le16(bs, 22) {
        0 => le32(bs, 36),
        n => n,
    };
    if !matches!(bps, 512 | 1024 | 2048 | 4096)
        || !spc.is_power_of_two()
        || reserved == 0
        || nfats == 0
        || fat_sectors == 0
        || total == 0
    {
        return Ok(None);
    }
    let fs = "FAT";
    let root_sectors = (root_entries * 32).div_ceil(bps);
    let data_start = reserved + nfats * fat_sectors + root_sectors;
    if total * bps > size || data_start >= total {
        return Ok(Some(whole(
            fs,
            "the boot sector's sizes do not fit the partition",
        )));
    }
    let clusters = (total - data_start) / spc;
    let bits: u64 = if clusters < 4085 {
        12
    } else if clusters < 65525 {
        16
    } else {
        32
    };
    let fat_bytes = ((clusters + 2) * bits).div_ceil(8);
    if fat_bytes > fat_sectors * bps {
        return Ok(Some(whole(fs, "the FAT is smaller than its cluster count")));
    }
    let table = r.read_at(reserved * bps, fat_bytes as usize)?;
    let entry = |i: u64| -> u64 {
        match bits {
            12 => {
                let at = (i * 3 / 2) as usize;
                let v = le16(&table, at);
                if i % 2 == 0 {
                    v & 0xFFF
                } else {
                    v >> 4
                }
            }
            16 => le16(&table, (i * 2) as usize),
            _ => le32(&table, (i * 4) as usize) & 0x0FFF_FFFF,
        }
    };
    let csize = spc * bps;
    let data0 = data_start * bps;
    let mut ranges: Vec<Range<u64>> = Vec::new();
    ranges.push(0..data0);
    for c in 0..clusters {
        if entry(c + 2) != 0 {
            let s = data0 + c * csize;
            match ranges.last_mut() {
                Some(last) if last.end == s => last.end = s + csize,
                _ => ranges.push(s..s + csize),
            }
        }
    }
    let name = match bits {
        12 => "FAT12",
        16 => "FAT16",
        _ => "FAT32",
    };
    Ok(Some(FsMap::Used {
        fs: name,
        ranges: merge(ranges),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Vec<u8>);
    impl ReadAt for Mem {
        fn read_at(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
            let s = offset as usize;
            self.0
                .get(s..s + len)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
        }
    }

    #[test]
    fn merge_joins_touching_and_overlapping() {
        assert_eq!(merge(vec![5..7, 0..2, 2..3, 6..9, 9..9]), vec![0..3, 5..9]);
    }

    #[test]
    fn unknown_contents_are_copied_whole() {
        let m = map(&mut Mem(vec![0xAB; 1 << 20]), 1 << 20).unwrap();
        assert!(matches!(m, FsMap::Whole { fs: "unknown", .. }), "{m:?}");
    }

    /// A superblock claiming 2^63 blocks (64bit feature, high word set) is copied whole, not
    /// a panic or a giant read.
    #[test]
    fn a_hostile_ext_superblock_is_copied_whole() {
        let mut d = vec![0u8; 1 << 20];
        let sb = 1024;
        d[sb + 56..sb + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
        d[sb + 4..sb + 8].copy_from_slice(&1000u32.to_le_bytes());
        d[sb + 32..sb + 36].copy_from_slice(&8192u32.to_le_bytes());
        d[sb + 96..sb + 100].copy_from_slice(&0x80u32.to_le_bytes());
        d[sb + 0x150..sb + 0x154].copy_from_slice(&0x8000_0000u32.to_le_bytes());
        let m = map(&mut Mem(d), 1 << 20).unwrap();
        assert!(matches!(m, FsMap::Whole { fs: "ext2/3/4", .. }), "{m:?}");
    }

    /// A btrfs magic without a valid superblock behind it is named and copied whole.
    #[test]
    fn btrfs_is_named_and_copied_whole() {
        let mut d = vec![0; 1 << 20];
        d[0x10040..0x10048].copy_from_slice(b"_BHRfS_M");
        let m = map(&mut Mem(d), 1 << 20).unwrap();
        assert!(matches!(m, FsMap::Whole { fs: "btrfs", .. }), "{m:?}");
    }

    /// A hand-made FAT16 volume: clusters 2 and 5 used.
    #[test]
    fn fat16_maps_used_clusters() {
        let bps = 512u64;
        let total = 20000u64; // sectors
        let mut d = vec![0u8; (total * bps) as usize];
        d[0] = 0xEB;
        d[11..13].copy_from_slice(&512u16.to_le_bytes());
        d[13] = 1; // sectors per cluster
        d[14..16].copy_from_slice(&1u16.to_le_bytes()); // reserved
        d[16] = 2; // FATs
        d[17..19].copy_from_slice(&512u16.to_le_bytes()); // root entries: 32 sectors
        d[19..21].copy_from_slice(&(total as u16).to_le_bytes());
        d[22..24].copy_from_slice(&80u16.to_le_bytes()); // sectors per FAT
        d[510] = 0x55;
        d[511] = 0xAA;
        let fat = 512usize;
        d[fat + 4..fat + 6].copy_from_slice(&0xFFFFu16.to_le_bytes()); // cluster 2
        d[fat + 10..fat + 12].copy_from_slice(&0xFFF7u16.to_le_bytes()); // cluster 5 (bad)
        let data0 = (1 + 2 * 80 + 32) * bps;
        let m = map(&mut Mem(d), total * bps).unwrap();
        assert_eq!(
            m,
            FsMap::Used {
                fs: "FAT16",
                ranges: vec![0..data0 + bps, data0 + 3 * bps..data0 + 4 * bps]
            }
        );
    }
}
