//! Minimal MBR/GPT reader for the image-vs-board check: only what is needed to find partition
//! starts and types in the first MiBs of an image. Sectors are 512 bytes (images, not 4Kn disks).

use super::schema::SECTOR;

/// A partition's type, as stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartType {
    /// MBR type byte (0x0c = FAT32 LBA, 0x83 = Linux).
    Mbr(u8),
    /// GPT type GUID in on-disk (mixed-endian) byte order.
    Gpt([u8; 16]),
}

impl PartType {
    /// True for FAT partition types (MBR 0x01/0x04/0x06/0x0b/0x0c/0x0e/0xef, GPT basic data or
    /// EFI system), used for the Raspberry Pi firmware partition rule.
    pub fn is_fat(&self) -> bool {
        match self {
            PartType::Mbr(t) => matches!(t, 0x01 | 0x04 | 0x06 | 0x0b | 0x0c | 0x0e | 0xef),
            PartType::Gpt(g) => {
                *g == parse_guid("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7").unwrap_or_default()
                    || *g == parse_guid("C12A7328-F81F-11D2-BA4B-00A0C93EC93B").unwrap_or_default()
            }
        }
    }
}

impl std::fmt::Display for PartType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PartType::Mbr(t) => write!(f, "0x{t:02x}"),
            PartType::Gpt(g) => f.write_str(&format_guid(g)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based partition number as Linux names it.
    pub(crate) number: usize,
    /// First sector.
    pub start: u64,
    /// Length in sectors.
    pub(crate) sectors: u64,
    pub kind: PartType,
    /// GPT partition name (UTF-16 on disk).
    pub name: Option<String>,
}

impl Partition {
    pub fn end(&self) -> u64 {
        self.start + self.sectors
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionTable {
    /// No valid MBR signature at all.
    None,
    Mbr {
        disk_id: u32,
        parts: Vec<Partition>,
    },
    Gpt {
        parts: Vec<Partition>,
    },
}

impl PartitionTable {
    pub fn partitions(&self) -> &[Partition] {
        match self {
            PartitionTable::None => &[],
            PartitionTable::Mbr { parts, .. } | PartitionTable::Gpt { parts } => parts,
        }
    }

    /// The partition with the lowest start sector.
    pub(crate) fn first(&self) -> Option<&Partition> {
        self.partitions().iter().min_by_key(|p| p.start)
    }

    pub fn kind_name(&self) -> &'static str {
        match self {
            PartitionTable::None => "no partition table",
            PartitionTable::Mbr { .. } => "MBR",
            PartitionTable::Gpt { .. } => "GPT",
        }
    }
}

fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64le(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Parse the partition table from the first bytes of an image. `head` should cover at least the
/// first 34 sectors (17 KiB) for GPT. Errors say what is wrong and at which byte offset.
pub fn parse(head: &[u8]) -> Result<PartitionTable, String> {
    if head.len() < 512 {
        return Err(format!(
            "image is {} bytes, shorter than one sector",
            head.len()
        ));
    }
    if head[510] != 0x55 || head[511] != 0xaa {
        return Ok(PartitionTable::None);
    }
    let mut mbr_parts = Vec::new();
    let mut protective = false;
    for i in 0..4 {
        let e = 446 + i * 16;
        let ty = head[e + 4];
        let start = u64::from(u32le(head, e + 8));
        let sectors = u64::from(u32le(head, e + 12));
        if ty == 0 || sectors == 0 {
            continue;
        }
        if ty == 0xee {
            protective = true;
            continue;
        }
        mbr_parts.push(Partition {
            number: i + 1,
            start,
            sectors,
            kind: PartType::Mbr(ty),
            name: None,
        });
    }
    if protective {
        return parse_gpt(head).map(|parts| PartitionTable::Gpt { parts });
    }
    Ok(PartitionTable::Mbr {
        disk_id: u32le(head, 440),
        parts: mbr_parts,
    })
}

fn parse_gpt(head: &[u8]) -> Result<Vec<Partition>, String> {
    let h = SECTOR as usize;
    if head.len() < 2 * h {
        return Err("protective MBR but the image ends before the GPT header".into());
    }
    let hdr = &head[h..2 * h];
    if &hdr[0..8] != b"EFI PART" {
        return Err(format!(
            "protective MBR but no `EFI PART` GPT header at offset {h}"
        ));
    }
    let hsize = u32le(hdr, 12) as usize;
    if !(92..=h).contains(&hsize) {
        return Err(format!("GPT header at offset {h}: bad header size {hsize}"));
    }
    let mut copy = hdr[..hsize].to_vec();
    copy[16..20].fill(0);
    if crc32fast::hash(&copy) != u32le(hdr, 16) {
        return Err(format!("GPT header at offset {h}: CRC32 mismatch"));
    }
    let entries_lba = u64le(hdr, 72);
    let count = u32le(hdr, 80) as usize;
    let esize = u32le(hdr, 84) as usize;
    if esize < 128 || count > 4096 {
        return Err(format!(
            "GPT header at offset {h}: implausible entry array ({count} × {esize} bytes)"
        ));
    }
    let start = usize::try_from(entries_lba * SECTOR).map_err(|_| "GPT entries offset")?;
    let end = start + count * esize;
    if head.len() < end {
        return Err(format!(
            "GPT entry array at offset {start}..{end} lies beyond the {} bytes read",
            head.len()
        ));
    }
    let arr = &head[start..end];
    if crc32fast::hash(arr) != u32le(hdr, 88) {
        return Err(format!("GPT entry array at offset {start}: CRC32 mismatch"));
    }
    let mut parts = Vec::new();
    for i in 0..count {
        let e = &arr[i * esize..(i + 1) * esize];
        let mut ty = [0u8; 16];
        ty.copy_from_slice(&e[0..16]);
        if ty == [0u8; 16] {
            continue;
        }
        let first = u64le(e, 32);
        let last = u64le(e, 40);
        let units: Vec<u16> = e[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&c| c != 0)
            .collect();
        parts.push(Partition {
            number: i + 1,
            start: first,
            sectors: last.saturating_sub(first) + 1,
            kind: PartType::Gpt(ty),
            name: Some(String::from_utf16_lossy(&units)),
        });
    }
    Ok(parts)
}

/// Parse a textual GUID into on-disk byte order (first three fields little-endian).
pub(crate) fn parse_guid(s: &str) -> Option<[u8; 16]> {
    let parts: Vec<&str> = s.split('-').collect();
    if parts.len() != 5
        || [8, 4, 4, 4, 12] != [0, 1, 2, 3, 4].map(|i| parts[i].len())
        || !s.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
    {
        return None;
    }
    let hexs: String = parts.concat();
    let mut b = [0u8; 16];
    hex::decode_to_slice(&hexs, &mut b).ok()?;
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    Some(b)
}

/// Inverse of [`parse_guid`], upper case.
pub(crate) fn format_guid(g: &[u8; 16]) -> String {
    let mut b = *g;
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    let h = hex::encode_upper(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_roundtrip_and_byte_order() {
        let g = parse_guid("2E54B353-1271-4842-806F-E436D6AF6985").unwrap();
        assert_eq!(g[0..4], [0x53, 0xb3, 0x54, 0x2e]);
        assert_eq!(g[8..10], [0x80, 0x6f]);
        assert_eq!(format_guid(&g), "2E54B353-1271-4842-806F-E436D6AF6985");
        assert!(parse_guid("2E54B353-1271-4842-806F").is_none());
        assert!(parse_guid("ZZ54B353-1271-4842-806F-E436D6AF6985").is_none());
    }

    #[test]
    fn mbr_entries() {
        let mut s = vec![0u8; 512];
        s[510] = 0x55;
        s[511] = 0xaa;
        s[440..444].copy_from_slice(&0x2178694eu32.to_le_bytes());
        let e = 446;
        s[e + 4] = 0x0b;
        s[e + 8..e + 12].copy_from_slice(&16384u32.to_le_bytes());
        s[e + 12..e + 16].copy_from_slice(&32768u32.to_le_bytes());
        let t = parse(&s).unwrap();
        match &t {
            PartitionTable::Mbr { disk_id, parts } => {
                assert_eq!(*disk_id, 0x2178694e);
                assert_eq!(parts.len(), 1);
                assert_eq!(parts[0].start, 16384);
                assert!(parts[0].kind.is_fat());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse(&[0u8; 512]).unwrap(), PartitionTable::None));
        assert!(parse(&[0u8; 100]).is_err());
    }

    #[test]
    fn protective_mbr_without_header_is_an_error() {
        let mut s = vec![0u8; 1024];
        s[510] = 0x55;
        s[511] = 0xaa;
        s[446 + 4] = 0xee;
        s[446 + 12] = 1;
        let e = parse(&s).unwrap_err();
        assert!(e.contains("EFI PART"), "{e}");
    }
}
