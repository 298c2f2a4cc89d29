//! Which bytes of a single-device btrfs are in use, read from its chunk and extent trees.
//!
//! Granularity: the extent tree's own records, mapped through the chunk tree to partition
//! offsets: every EXTENT_ITEM (a data extent, or a tree block on file systems without skinny
//! metadata) and METADATA_ITEM (a tree block). Extents are whole sectors (4 KiB), so the map
//! is exact to the sector; block groups would be far coarser (data chunks are up to 1 GiB
//! and stay allocated, mostly empty, after files are deleted). Always kept besides: the
//! first MiB (primary superblock, and what boot loaders put before it), the superblock
//! mirrors inside the partition, and every tree block read here (chunk, root and extent
//! trees, both copies where DUP). The extent tree records every tree block a mount reads
//! (fs, csum, free-space, device and uuid trees), so nothing a mount or `btrfs check`
//! needs is left out.
//!
//! Only what is understood is mapped: one device; SINGLE or DUP chunks; crc32c or sha256
//! checksums (each tree block read is verified); known feature bits; no tree log waiting
//! to be replayed. Anything else is copied whole with the reason named.

use super::fsmap::{merge, FsMap, ReadAt};
use sha2::{Digest, Sha256};
use std::ops::Range;

const MIB: u64 = 1 << 20;
/// Superblock offsets: primary and the mirrors (kept when inside the partition).
const SUPERS: [u64; 3] = [64 << 10, 64 << 20, 256 << 30];
const SUPER_LEN: usize = 4096;
const MAGIC: &[u8; 8] = b"_BHRfS_M";
const HEADER: usize = 101;
const KEY: usize = 17;
const LEAF_ITEM: usize = KEY + 8;
const KEY_PTR: usize = KEY + 16;
const MAX_LEVEL: u8 = 7;

const CHUNK_ITEM: u8 = 228;
const ROOT_ITEM: u8 = 132;
const EXTENT_ITEM: u8 = 168;
const METADATA_ITEM: u8 = 169;
const EXTENT_TREE: u64 = 2;

/// Block group profile bits; none of them set is SINGLE.
const PROFILE_DUP: u64 = 1 << 5;
const PROFILES: u64 = (0x7F << 3) | (0x3 << 9);

/// Incompat bits whose on-disk effects this reader either handles or does not care about:
/// mixed backrefs, default subvol, mixed groups, lzo, zstd, big metadata, extended iref,
/// raid56 (its chunks are refused below), skinny metadata, no holes, metadata uuid,
/// raid1c34 (refused below), simple quota. Not: zoned, extent tree v2, raid stripe tree.
const INCOMPAT_KNOWN: u64 = 0xFFF | (1 << 16);
const INCOMPAT_METADATA_UUID: u64 = 1 << 10;
/// free space tree (+valid), verity, block group tree.
const COMPAT_RO_KNOWN: u64 = 0xF;

fn le16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}
fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}
fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

enum Fail {
    Io(std::io::Error),
    /// Not understood: copy whole, for this reason.
    Why(String),
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        Fail::Io(e)
    }
}

fn why<T>(msg: String) -> Result<T, Fail> {
    Err(Fail::Why(msg))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Csum {
    Crc32c,
    Sha256,
}

const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

impl Csum {
    /// Whether the checksum at the start of `block` matches the rest of it.
    fn ok(self, block: &[u8]) -> bool {
        match self {
            Csum::Crc32c => CRC32C.checksum(&block[32..]).to_le_bytes() == block[..4],
            Csum::Sha256 => Sha256::digest(&block[32..])[..] == block[..32],
        }
    }
}

/// One chunk: a logical range and where its copies lie in the partition.
#[derive(Debug, Clone)]
struct Chunk {
    logical: u64,
    len: u64,
    stripes: Vec<u64>,
}

struct Fs<'a> {
    r: &'a mut dyn ReadAt,
    size: u64,
    devid: u64,
    nodesize: u64,
    fsid: [u8; 16],
    csum: Csum,
    generation: u64,
    /// Sorted by logical address, not overlapping.
    chunks: Vec<Chunk>,
    /// Partition ranges of the tree blocks read.
    read: Vec<Range<u64>>,
    /// Tree blocks that may still be read: a sound file system has fewer than its partition
    /// holds, so a tree whose pointers repeat (the same subtree many times) ends here.
    budget: u64,
}

/// Map a partition whose superblock carries the btrfs magic.
pub(crate) fn map(r: &mut dyn ReadAt, size: u64) -> std::io::Result<FsMap> {
    match used(r, size) {
        Ok(ranges) => Ok(FsMap::Used {
            fs: "btrfs",
            ranges,
        }),
        Err(Fail::Io(e)) => Err(e),
        Err(Fail::Why(w)) => Ok(FsMap::Whole {
            fs: "btrfs",
            why: format!("{w}; copied whole"),
        }),
    }
}

fn used(r: &mut dyn ReadAt, size: u64) -> Result<Vec<Range<u64>>, Fail> {
    if size < SUPERS[0] + SUPER_LEN as u64 {
        return why("smaller than its superblock".into());
    }
    let sb = r.read_at(SUPERS[0], SUPER_LEN)?;
    if &sb[0x40..0x48] != MAGIC {
        return why("no btrfs superblock".into());
    }
    let csum = match le16(&sb, 0xC4) {
        0 => Csum::Crc32c,
        2 => Csum::Sha256,
        1 => return why("checksum type xxhash64 is not verified here".into()),
        3 => return why("checksum type blake2b is not verified here".into()),
        t => return why(format!("unknown checksum type {t}")),
    };
    if !csum.ok(&sb) {
        return why("the superblock's checksum does not match".into());
    }
    let devices = le64(&sb, 0x88);
    if devices != 1 {
        return why(format!(
            "a file system of {devices} devices (only single-device btrfs is mapped)"
        ));
    }
    let incompat = le64(&sb, 0xBC);
    if incompat & !INCOMPAT_KNOWN != 0 {
        return why(format!(
            "incompat feature bits {:#x} are not understood",
            incompat & !INCOMPAT_KNOWN
        ));
    }
    let compat_ro = le64(&sb, 0xB4);
    if compat_ro & !COMPAT_RO_KNOWN != 0 {
        return why(format!(
            "compat_ro feature bits {:#x} are not understood",
            compat_ro & !COMPAT_RO_KNOWN
        ));
    }
    if le64(&sb, 0x60) != 0 {
        return why("a tree log is waiting to be replayed (not cleanly unmounted)".into());
    }
    let sectorsize = le32(&sb, 0x90);
    let nodesize = le32(&sb, 0x94);
    if !(sectorsize.is_power_of_two()
        && (4096..=65536).contains(&sectorsize)
        && nodesize.is_power_of_two()
        && (sectorsize..=65536).contains(&nodesize))
    {
        return why(format!(
            "implausible sector size {sectorsize} or node size {nodesize}"
        ));
    }
    let dev_bytes = le64(&sb, 0xD1);
    if dev_bytes > size {
        return why(format!(
            "the device item says {dev_bytes} bytes, more than the partition's {size}"
        ));
    }
    let mut fsid = [0u8; 16];
    let at = if incompat & INCOMPAT_METADATA_UUID != 0 {
        0x23B
    } else {
        0x20
    };
    fsid.copy_from_slice(&sb[at..at + 16]);
    let mut fs = Fs {
        r,
        size,
        devid: le64(&sb, 0xC9),
        nodesize,
        fsid,
        csum,
        generation: le64(&sb, 0x48),
        chunks: Vec::new(),
        read: Vec::new(),
        budget: size / nodesize,
    };

    // The system chunks needed to read the chunk tree.
    let sys_len = le32(&sb, 0xA0) as usize;
    if sys_len > 2048 {
        return why(format!(
            "system chunk array of {sys_len} bytes (at most 2048)"
        ));
    }
    let sys = &sb[0x32B..0x32B + sys_len];
    let mut at = 0;
    while at < sys_len {
        if at + KEY > sys_len || sys[at + 8] != CHUNK_ITEM {
            return why(format!("system chunk array: bad key at byte {at}"));
        }
        let logical = le64(sys, at + 9);
        let n = fs.chunk(logical, &sys[at + KEY..], "system chunk array")?;
        at += KEY + n;
    }

    // The chunk tree: every chunk.
    let (root, level) = (le64(&sb, 0x58), sb[0xC7]);
    fs.walk(root, level, &mut |fs, key, item| {
        if key.1 == CHUNK_ITEM {
            fs.chunk(key.2, item, "chunk tree")?;
        }
        Ok(())
    })?;

    // The root tree: where the extent tree is.
    let mut extent_root = None;
    let (root, level) = (le64(&sb, 0x50), sb[0xC6]);
    fs.walk(root, level, &mut |_, key, item| {
        if key.0 == EXTENT_TREE && key.1 == ROOT_ITEM {
            if item.len() < 239 {
                return why(format!("extent tree root item of {} bytes", item.len()));
            }
            extent_root = Some((le64(item, 176), item[238]));
        }
        Ok(())
    })?;
    let Some((root, level)) = extent_root else {
        return why("the root tree has no extent tree".into());
    };

    // The extent tree: every allocated extent, joined while walking (keys come sorted).
    let mut logical: Vec<Range<u64>> = Vec::new();
    let nodesize = fs.nodesize;
    fs.walk(root, level, &mut |_, key, _| {
        let len = match key.1 {
            EXTENT_ITEM => key.2,
            METADATA_ITEM => nodesize,
            _ => return Ok(()),
        };
        let Some(end) = key.0.checked_add(len) else {
            return why(format!("extent at {} of {len} bytes overflows", key.0));
        };
        match logical.last_mut() {
            Some(last) if key.0 <= last.end => last.end = last.end.max(end),
            _ => logical.push(key.0..end),
        }
        Ok(())
    })?;

    let mut out: Vec<Range<u64>> = Vec::new();
    out.push(0..MIB.min(size));
    for s in SUPERS {
        if s + SUPER_LEN as u64 <= size {
            out.push(s..s + SUPER_LEN as u64);
        }
    }
    for l in &logical {
        fs.physical(l.clone(), &mut out)?;
    }
    out.append(&mut fs.read);
    Ok(merge(out))
}

/// A key (objectid, type, offset).
type Key = (u64, u8, u64);
/// Called for every leaf item of a tree.
type Visit<'v, 'a> = dyn FnMut(&mut Fs<'a>, Key, &[u8]) -> Result<(), Fail> + 'v;

impl<'a> Fs<'a> {
    /// Parse a chunk item for the chunk at `logical`; returns the item's length.
    fn chunk(&mut self, logical: u64, item: &[u8], from: &str) -> Result<usize, Fail> {
        if item.len() < 48 {
            return why(format!("{from}: chunk item at {logical} is truncated"));
        }
        let len = le64(item, 0);
        let kind = le64(item, 24);
        let stripes = le16(item, 44) as usize;
        let n = 48 + 32 * stripes;
        if stripes == 0 || item.len() < n {
            return why(format!(
                "{from}: chunk item at {logical} with {stripes} stripes is truncated"
            ));
        }
        let profile = kind & PROFILES;
        let want = match profile {
            0 => 1,
            PROFILE_DUP => 2,
            _ => {
                return why(format!(
                    "chunk at logical {logical} has RAID profile bits {profile:#x}"
                ))
            }
        };
        if stripes != want || len == 0 || logical.checked_add(len).is_none() {
            return why(format!(
                "chunk at logical {logical}: {stripes} stripes of {len} bytes"
            ));
        }
        let mut offs = Vec::with_capacity(stripes);
        for i in 0..stripes {
            let s = &item[48 + 32 * i..];
            let (devid, off) = (le64(s, 0), le64(s, 8));
            if devid != self.devid {
                return why(format!(
                    "chunk at logical {logical} lies on device {devid}, not this one ({})",
                    self.devid
                ));
            }
            if off.checked_add(len).is_none_or(|e| e > self.size) {
                return why(format!(
                    "chunk at logical {logical} ({len} bytes at {off}) lies beyond the partition"
                ));
            }
            offs.push(off);
        }
        let i = self.chunks.partition_point(|c| c.logical < logical);
        match self.chunks.get(i) {
            Some(c) if c.logical == logical => {
                if c.len != len || c.stripes != offs {
                    return why(format!(
                        "chunk at logical {logical} differs between the superblock and the \
                         chunk tree"
                    ));
                }
            }
            _ => {
                let overlaps = i
                    .checked_sub(1)
                    .and_then(|p| self.chunks.get(p))
                    .is_some_and(|p| p.logical + p.len > logical)
                    || self
                        .chunks
                        .get(i)
                        .is_some_and(|c| logical.saturating_add(len) > c.logical);
                if overlaps {
                    return why(format!("chunk at logical {logical} overlaps another"));
                }
                self.chunks.insert(
                    i,
                    Chunk {
                        logical,
                        len,
                        stripes: offs,
                    },
                );
            }
        }
        Ok(n)
    }

    /// Append the partition ranges holding logical range `l` (every copy).
    fn physical(&self, l: Range<u64>, out: &mut Vec<Range<u64>>) -> Result<(), Fail> {
        let mut pos = l.start;
        while pos < l.end {
            let i = self.chunks.partition_point(|c| c.logical + c.len <= pos);
            let Some(c) = self.chunks.get(i).filter(|c| c.logical <= pos) else {
                return why(format!("logical address {pos} is in no chunk"));
            };
            let end = l.end.min(c.logical + c.len);
            for s in &c.stripes {
                out.push(s + (pos - c.logical)..s + (end - c.logical));
            }
            pos = end;
        }
        Ok(())
    }

    /// Read and verify the tree block at `logical`, trying each copy.
    fn block(&mut self, logical: u64, level: u8) -> Result<Vec<u8>, Fail> {
        let Some(end) = logical.checked_add(self.nodesize) else {
            return why(format!("tree block at logical {logical} overflows"));
        };
        let mut at = Vec::new();
        self.physical(logical..end, &mut at)?;
        if at.len() > 2 || at.iter().any(|r| r.end - r.start != self.nodesize) {
            return why(format!("tree block at logical {logical} spans chunks"));
        }
        if self.budget == 0 {
            return why(format!(
                "more tree blocks than the partition holds (at logical {logical}): a tree that \
                 points into itself"
            ));
        }
        self.budget -= 1;
        let mut bad = String::new();
        for p in &at {
            let b = self.r.read_at(p.start, self.nodesize as usize)?;
            match self.check(&b, logical, level) {
                Ok(()) => {
                    self.read.extend(at.iter().cloned());
                    return Ok(b);
                }
                Err(e) => {
                    bad = format!("tree block at logical {logical} (offset {}): {e}", p.start)
                }
            }
        }
        why(bad)
    }

    fn check(&self, b: &[u8], logical: u64, level: u8) -> Result<(), String> {
        if !self.csum.ok(b) {
            return Err("checksum does not match".into());
        }
        if le64(b, 0x30) != logical {
            return Err(format!("header says it is at {}", le64(b, 0x30)));
        }
        if b[0x20..0x30] != self.fsid {
            return Err("belongs to another file system".into());
        }
        if b[0x64] != level {
            return Err(format!("level {} where {level} was expected", b[0x64]));
        }
        if le64(b, 0x50) > self.generation {
            return Err("newer than the superblock".into());
        }
        let per = if level == 0 { LEAF_ITEM } else { KEY_PTR };
        if le32(b, 0x60) as usize > (b.len() - HEADER) / per {
            return Err(format!("{} items do not fit", le32(b, 0x60)));
        }
        Ok(())
    }

    /// Visit every leaf item of the tree rooted at `root`, in key order.
    fn walk(&mut self, root: u64, level: u8, visit: &mut Visit<'_, 'a>) -> Result<(), Fail> {
        if level > MAX_LEVEL {
            return why(format!("tree at logical {root} claims level {level}"));
        }
        let b = self.block(root, level)?;
        let n = le32(&b, 0x60) as usize;
        let key = |at: usize| (le64(&b, at), b[at + 8], le64(&b, at + 9));
        for i in 0..n {
            if level == 0 {
                let at = HEADER + i * LEAF_ITEM;
                let (off, len) = (le32(&b, at + KEY) as usize, le32(&b, at + KEY + 4) as usize);
                let Some(item) = b.get(HEADER + off..HEADER + off + len) else {
                    return why(format!(
                        "leaf at logical {root}: item {i} lies outside the block"
                    ));
                };
                visit(self, key(at), item)?;
            } else {
                let at = HEADER + i * KEY_PTR;
                self.walk(le64(&b, at + KEY), level - 1, visit)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    struct FileAt(File);
    impl ReadAt for FileAt {
        fn read_at(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
            let mut v = vec![0; len];
            self.0.read_exact_at(&mut v, offset)?;
            Ok(v)
        }
    }

    /// A real btrfs made by mkfs.btrfs from a directory (no mount, no root needed).
    fn mkfs(dir: &Path, name: &str, args: &[&str]) -> Option<std::path::PathBuf> {
        let tool = std::process::Command::new("mkfs.btrfs")
            .arg("--version")
            .output();
        if tool.is_err() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "mkfs.btrfs is missing (btrfs-progs) and CI=true"
            );
            eprintln!("skipped: mkfs.btrfs (btrfs-progs) is not installed");
            return None;
        }
        let root = dir.join(format!("{name}-root"));
        std::fs::create_dir_all(&root).unwrap();
        // 5 MB of incompressible-looking data (a byte pattern xorshift generates).
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let data: Vec<u8> = (0..5_000_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(root.join("big"), &data).unwrap();
        std::fs::write(root.join("small"), b"hello").unwrap();
        let img = dir.join(format!("{name}.img"));
        let f = File::create(&img).unwrap();
        f.set_len(256 << 20).unwrap();
        let o = std::process::Command::new("mkfs.btrfs")
            .args(["-q", "-f"])
            .args(args)
            .arg("--rootdir")
            .arg(&root)
            .arg(&img)
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        Some(img)
    }

    /// A scratch directory, removed on drop (a failed test too).
    struct Tmp(std::path::PathBuf);
    impl std::ops::Deref for Tmp {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(name: &str) -> Tmp {
        let d = std::env::temp_dir().join(format!("sbcflash-btrfs-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Tmp(d)
    }

    fn mapped(img: &Path) -> FsMap {
        let f = File::open(img).unwrap();
        let size = f.metadata().unwrap().len();
        super::super::fsmap::map(&mut FileAt(f), size).unwrap()
    }

    /// The map holds the file's data, far less than the 256 MiB partition, and is the
    /// same for DUP metadata (both copies) as for SINGLE.
    #[test]
    fn real_mkfs_output_is_mapped_to_its_extents() {
        let d = dir("map");
        for (name, args) in [
            ("single", &["-m", "single", "-d", "single"][..]),
            ("dup", &["-m", "dup", "-d", "single"][..]),
            ("sha256", &["--csum", "sha256"][..]),
        ] {
            let Some(img) = mkfs(&d, name, args) else {
                return;
            };
            let m = mapped(&img);
            let FsMap::Used { fs, ranges } = &m else {
                panic!("{name}: {m:?}");
            };
            assert_eq!(*fs, "btrfs");
            let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
            assert!(
                total > 5_000_000,
                "{name}: {total} bytes mapped: {ranges:?}"
            );
            assert!(total < 24 * MIB, "{name}: {total} bytes mapped: {ranges:?}");
            assert!(
                ranges.iter().any(|r| r.contains(&(64 << 20))),
                "{name}: mirror"
            );
            // Every 4 KiB block of the file's data is found on disk (by content; extents
            // are sector-aligned) inside a mapped range.
            let disk = std::fs::read(&img).unwrap();
            let data = std::fs::read(d.join(format!("{name}-root/big"))).unwrap();
            let blocks: std::collections::HashMap<&[u8], usize> = data
                .chunks_exact(4096)
                .enumerate()
                .map(|(i, b)| (b, i))
                .collect();
            let mut found = vec![false; blocks.len()];
            for (at, b) in disk.chunks_exact(4096).enumerate() {
                if let Some(&i) = blocks.get(b) {
                    let at = at as u64 * 4096;
                    assert!(
                        ranges.iter().any(|r| r.start <= at && at + 4096 <= r.end),
                        "{name}: file block {i} at {at} not mapped: {ranges:?}"
                    );
                    found[i] = true;
                }
            }
            assert!(found.iter().all(|f| *f), "{name}: file blocks not on disk");
            std::fs::remove_file(&img).unwrap();
        }
    }

    /// A damaged extent tree, an unverified checksum type and a second device are each
    /// copied whole, with the reason.
    #[test]
    fn what_is_not_understood_is_copied_whole_with_the_reason() {
        let d = dir("whole");
        let Some(img) = mkfs(&d, "x", &[]) else {
            return;
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let s = 64u64 << 10;
        let mut sb = vec![0u8; 4096];
        f.read_exact_at(&mut sb, s).unwrap();
        let reason = || match mapped(&img) {
            FsMap::Whole { fs: "btrfs", why } => why,
            other => panic!("{other:?}"),
        };
        // Flip a byte in every tree block of the extent tree (owner 2), both DUP copies.
        let ns = le32(&sb, 0x94) as usize;
        let size = f.metadata().unwrap().len();
        let mut b = vec![0u8; ns];
        let mut hit = 0;
        for off in (0..size).step_by(ns) {
            f.read_exact_at(&mut b, off).unwrap();
            if b[0x20..0x30] == sb[0x20..0x30] && le64(&b, 0x58) == EXTENT_TREE {
                f.write_all_at(&[b[200] ^ 0xFF], off + 200).unwrap();
                hit += 1;
            }
        }
        assert!(hit > 0);
        let w = reason();
        assert!(w.contains("checksum does not match"), "{w}");

        // Two devices claimed (superblock re-checksummed so only that differs).
        let mut two = sb.clone();
        two[0x88..0x90].copy_from_slice(&2u64.to_le_bytes());
        let c = CRC32C.checksum(&two[32..]);
        two[..4].copy_from_slice(&c.to_le_bytes());
        f.write_all_at(&two, s).unwrap();
        let w = reason();
        assert!(w.contains("2 devices"), "{w}");

        let mut xx = sb;
        xx[0xC4] = 1;
        f.write_all_at(&xx, s).unwrap();
        let w = reason();
        assert!(w.contains("xxhash64"), "{w}");
    }

    /// A root tree made to point at one leaf through two levels of repeated pointers (the
    /// csum and fs tree roots' blocks overwritten with the crafted nodes): the walk stops at
    /// the partition's worth of tree blocks instead of reading 240 000 of them.
    #[test]
    fn a_tree_that_points_into_itself_is_copied_whole() {
        let d = dir("loop");
        let Some(img) = mkfs(&d, "l", &["-m", "single"]) else {
            return;
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let s = 64u64 << 10;
        let mut sb = vec![0u8; 4096];
        f.read_exact_at(&mut sb, s).unwrap();
        let ns = le32(&sb, 0x94) as usize;
        let size = f.metadata().unwrap().len();
        // Where each tree block lies (the newest copy of each logical address).
        let mut at: std::collections::HashMap<u64, (u64, u64)> = Default::default();
        let mut b = vec![0u8; ns];
        for off in (0..size).step_by(ns) {
            f.read_exact_at(&mut b, off).unwrap();
            if b[0x20..0x30] == sb[0x20..0x30] && CRC32C.checksum(&b[32..]).to_le_bytes() == b[..4]
            {
                let (logical, gen) = (le64(&b, 0x30), le64(&b, 0x50));
                if at.get(&logical).is_none_or(|&(_, g)| g < gen) {
                    at.insert(logical, (off, gen));
                }
            }
        }
        let root = le64(&sb, 0x50);
        let mut leaf = vec![0u8; ns];
        f.read_exact_at(&mut leaf, at[&root].0).unwrap();
        assert_eq!(leaf[0x64], 0, "root tree is one leaf");
        let tree_root = |id: u64| {
            (0..le32(&leaf, 0x60) as usize)
                .map(|i| HEADER + i * LEAF_ITEM)
                .find(|&p| le64(&leaf, p) == id && leaf[p + 8] == ROOT_ITEM)
                .map(|p| le64(&leaf, HEADER + le32(&leaf, p + KEY) as usize + 176))
                .unwrap()
        };
        let (a, bb) = (tree_root(5), tree_root(7));
        let node = |me: u64, level: u8, child: u64| {
            let mut n = vec![0u8; ns];
            n[..HEADER].copy_from_slice(&leaf[..HEADER]);
            n[0x30..0x38].copy_from_slice(&me.to_le_bytes());
            n[0x64] = level;
            let count = (ns - HEADER) / KEY_PTR;
            n[0x60..0x64].copy_from_slice(&(count as u32).to_le_bytes());
            for i in 0..count {
                let p = HEADER + i * KEY_PTR + KEY;
                n[p..p + 8].copy_from_slice(&child.to_le_bytes());
                n[p + 8..p + 16].copy_from_slice(&leaf[0x50..0x58]);
            }
            let c = CRC32C.checksum(&n[32..]);
            n[..4].copy_from_slice(&c.to_le_bytes());
            n
        };
        f.write_all_at(&node(a, 2, bb), at[&a].0).unwrap();
        f.write_all_at(&node(bb, 1, root), at[&bb].0).unwrap();
        sb[0x50..0x58].copy_from_slice(&a.to_le_bytes());
        sb[0xC6] = 2;
        let c = CRC32C.checksum(&sb[32..]);
        sb[..4].copy_from_slice(&c.to_le_bytes());
        f.write_all_at(&sb, s).unwrap();
        match mapped(&img) {
            FsMap::Whole { fs: "btrfs", why } => {
                assert!(why.contains("points into itself"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// Every metadata block of a real file system (and its superblock) with bytes changed at
    /// many places and the checksum made to match again, so the parser reads the damage: it
    /// never panics, and a map it still returns keeps the superblock.
    #[test]
    fn damaged_metadata_with_valid_checksums_never_panics() {
        let d = dir("mutate");
        let Some(img) = mkfs(&d, "m", &["-m", "single"]) else {
            return;
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let size = f.metadata().unwrap().len();
        let mut sb = vec![0u8; 4096];
        f.read_exact_at(&mut sb, 64 << 10).unwrap();
        let ns = le32(&sb, 0x94) as usize;
        let mut blocks = vec![(64u64 << 10, 4096usize)];
        let mut b = vec![0u8; ns];
        for off in (0..size).step_by(ns) {
            f.read_exact_at(&mut b, off).unwrap();
            if b[0x20..0x30] == sb[0x20..0x30] && CRC32C.checksum(&b[32..]).to_le_bytes() == b[..4]
            {
                blocks.push((off, ns));
            }
        }
        assert!(blocks.len() > 4, "{blocks:?}");
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut used, mut whole) = (0, 0);
        for &(off, len) in &blocks {
            let mut orig = vec![0u8; len];
            f.read_exact_at(&mut orig, off).unwrap();
            // Where the parsed fields are: the header and the first items, or anywhere.
            let hot = if len == 4096 {
                0x32B + 512
            } else {
                HEADER + 40 * LEAF_ITEM
            };
            for round in 0..60 {
                let mut m = orig.clone();
                for _ in 0..1 + round % 4 {
                    let at = 32 + (rnd() as usize) % (if round % 2 == 0 { hot } else { len } - 32);
                    m[at] = match round % 3 {
                        0 => rnd() as u8,
                        1 => 0xFF,
                        _ => 0,
                    };
                }
                let c = CRC32C.checksum(&m[32..]);
                m[..4].copy_from_slice(&c.to_le_bytes());
                f.write_all_at(&m, off).unwrap();
                match mapped(&img) {
                    FsMap::Used { ranges, .. } => {
                        assert!(ranges[0].start == 0 && ranges[0].end >= MIB, "{ranges:?}");
                        used += 1;
                    }
                    FsMap::Whole { .. } => whole += 1,
                }
            }
            f.write_all_at(&orig, off).unwrap();
        }
        eprintln!("{used} damaged file systems still mapped, {whole} copied whole");
        assert!(whole > 0);
    }
}
