//! A trimmed GPT disk loses its backup table (it sits at the end of the disk). The capture
//! gets a new one right after the last partition, and the primary header and protective MBR
//! are patched to match, so the image is a valid GPT disk of its own size (what `sgdisk -e`
//! would do after writing it).

use std::ops::Range;

const SECTOR: u64 = 512;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Sectors that replace what the source holds at their offset.
#[derive(Debug, Clone)]
pub(crate) struct Patch {
    pub(crate) offset: u64,
    pub(crate) data: Vec<u8>,
}

impl Patch {
    pub(crate) fn range(&self) -> Range<u64> {
        self.offset..self.offset + self.data.len() as u64
    }
}

/// Given the disk's first bytes (protective MBR, primary header, entries) and the end of the
/// last partition, the image size and the patches: protective MBR, primary header, backup
/// entries and backup header. `Err` says what is wrong with the table.
pub(crate) fn rebuild(head: &[u8], last_end: u64) -> Result<(u64, Vec<Patch>), String> {
    let h = SECTOR as usize;
    let hdr = head
        .get(h..2 * h)
        .ok_or("the GPT header lies beyond the bytes read")?;
    let hsize = le32(hdr, 12) as usize;
    if !(92..=h).contains(&hsize) {
        return Err(format!("GPT header: bad header size {hsize}"));
    }
    let entries_lba = le64(hdr, 72);
    let count = u64::from(le32(hdr, 80));
    let esize = u64::from(le32(hdr, 84));
    let entry_sectors = (count * esize).div_ceil(SECTOR);
    let start = (entries_lba * SECTOR) as usize;
    let entries = head
        .get(start..start + (entry_sectors * SECTOR) as usize)
        .ok_or("the GPT entry array lies beyond the bytes read")?;
    let last_lba = last_end.div_ceil(SECTOR);
    let alt = last_lba + entry_sectors;
    let image_size = (alt + 1) * SECTOR;
    let crc = |mut s: Vec<u8>| {
        s[16..20].fill(0);
        let c = crc32fast::hash(&s[..hsize]);
        s[16..20].copy_from_slice(&c.to_le_bytes());
        s
    };
    let mut primary = hdr.to_vec();
    primary[32..40].copy_from_slice(&alt.to_le_bytes());
    primary[48..56].copy_from_slice(&(alt - entry_sectors - 1).to_le_bytes());
    let primary = crc(primary);
    let mut backup = primary.clone();
    backup[24..32].copy_from_slice(&alt.to_le_bytes());
    backup[32..40].copy_from_slice(&1u64.to_le_bytes());
    backup[72..80].copy_from_slice(&last_lba.to_le_bytes());
    let backup = crc(backup);
    let mut mbr = head[..h].to_vec();
    for i in 0..4 {
        let e = 446 + i * 16;
        if mbr[e + 4] == 0xEE {
            let sectors = u32::try_from(alt).unwrap_or(u32::MAX);
            mbr[e + 12..e + 16].copy_from_slice(&sectors.to_le_bytes());
        }
    }
    Ok((
        image_size,
        vec![
            Patch {
                offset: 0,
                data: mbr,
            },
            Patch {
                offset: SECTOR,
                data: primary,
            },
            Patch {
                offset: last_lba * SECTOR,
                data: entries.to_vec(),
            },
            Patch {
                offset: alt * SECTOR,
                data: backup,
            },
        ],
    ))
}

/// Apply the patches that overlap `[off, off + buf.len())`.
pub(crate) fn apply(patches: &[Patch], off: u64, buf: &mut [u8]) {
    let end = off + buf.len() as u64;
    for p in patches {
        let r = p.range();
        let (s, e) = (r.start.max(off), r.end.min(end));
        if s < e {
            buf[(s - off) as usize..(e - off) as usize]
                .copy_from_slice(&p.data[(s - r.start) as usize..(e - r.start) as usize]);
        }
    }
}
