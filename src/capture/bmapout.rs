//! Writing a bmap 2.0 file (the format `bmaptool create` writes and `bmaptool copy` and our
//! own parser read): sha256 per mapped range, and the file's own sha256 computed with its
//! checksum field zeroed, as bmaptool checks it.

use sha2::{Digest, Sha256};
use std::fmt::Write;

/// One mapped range in blocks, inclusive, with the sha256 of its bytes (clipped to the
/// image size on the last block).
pub(crate) struct MappedRange {
    pub(crate) first: u64,
    pub(crate) last: u64,
    pub(crate) sha256: [u8; 32],
}

pub(crate) const BLOCK: u64 = 4096;

/// The bmap text for an image of `size` bytes.
pub(crate) fn render(size: u64, ranges: &[MappedRange]) -> String {
    let blocks = size.div_ceil(BLOCK);
    let mapped: u64 = ranges.iter().map(|r| r.last - r.first + 1).sum();
    let zeros = "0".repeat(64);
    let mut s = String::new();
    let _ = writeln!(s, "<?xml version=\"1.0\" ?>");
    let _ = writeln!(
        s,
        "<!-- Written by sbcflash read: the blocks the partition table, the gaps between \
         partitions and the file systems use; everything else is a hole. -->"
    );
    let _ = writeln!(s, "<bmap version=\"2.0\">");
    let _ = writeln!(s, "    <ImageSize> {size} </ImageSize>");
    let _ = writeln!(s, "    <BlockSize> {BLOCK} </BlockSize>");
    let _ = writeln!(s, "    <BlocksCount> {blocks} </BlocksCount>");
    let _ = writeln!(s, "    <MappedBlocksCount> {mapped} </MappedBlocksCount>");
    let _ = writeln!(s, "    <ChecksumType> sha256 </ChecksumType>");
    let _ = writeln!(s, "    <BmapFileChecksum> {zeros} </BmapFileChecksum>");
    let _ = writeln!(s, "    <BlockMap>");
    for r in ranges {
        let span = if r.first == r.last {
            r.first.to_string()
        } else {
            format!("{}-{}", r.first, r.last)
        };
        let _ = writeln!(
            s,
            "        <Range chksum=\"{}\"> {span} </Range>",
            hex::encode(r.sha256)
        );
    }
    let _ = writeln!(s, "    </BlockMap>");
    let _ = writeln!(s, "</bmap>");
    let own = hex::encode(Sha256::digest(s.as_bytes()));
    s.replacen(&zeros, &own, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our own parser (which checks the file checksum and every field) reads what we write.
    #[test]
    fn rendered_bmap_parses_and_its_checksum_holds() {
        let data = vec![7u8; 4096 * 3];
        let r = vec![
            MappedRange {
                first: 0,
                last: 1,
                sha256: Sha256::digest(&data[..8192]).into(),
            },
            MappedRange {
                first: 5,
                last: 5,
                sha256: Sha256::digest(&data[..1000]).into(),
            },
        ];
        let text = render(5 * 4096 + 1000, &r);
        let b = crate::image::Bmap::parse(text.as_bytes(), std::path::Path::new("x.bmap"))
            .expect("parses");
        assert_eq!(b.mapped_bytes(), 8192 + 1000);
        let tampered = text.replace("<BlocksCount> 6 ", "<BlocksCount> 7 ");
        assert!(
            crate::image::Bmap::parse(tampered.as_bytes(), std::path::Path::new("x.bmap")).is_err()
        );
    }
}
