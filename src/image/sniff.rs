//! "What does this look like?" from the first bytes of a logical image: a disk image (partition
//! table, file system, bootloader) or something else (an archive, text, nothing), so that a
//! `.tar.gz` or a README is refused before a target is touched, and a target file that is
//! itself an image is noticed before it is overwritten.
//!
//! A pure function of a byte head, so it applies to a decoded stream's head as well as to the
//! inner image of a container.

/// How many leading bytes [`sniff`] looks at: covers btrfs's superblock (64 KiB), ISO 9660's
/// volume descriptor (32 KiB) and Allwinner's eGON at 128 KiB.
pub(crate) const SNIFF_LEN: usize = 192 << 10;

/// Something a disk image starts with (or has at its usual offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ImageKind {
    Mbr,
    Gpt,
    Fat,
    Ext,
    Btrfs,
    Squashfs,
    Iso9660,
    RockchipIdb,
    Egon,
    UbootLegacy,
    Fit,
    AndroidBoot,
}

impl ImageKind {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            ImageKind::Mbr => "an MBR partition table",
            ImageKind::Gpt => "a GPT partition table",
            ImageKind::Fat => "a FAT file system",
            ImageKind::Ext => "an ext2/3/4 file system",
            ImageKind::Btrfs => "a btrfs file system",
            ImageKind::Squashfs => "a squashfs file system",
            ImageKind::Iso9660 => "an ISO 9660 file system",
            ImageKind::RockchipIdb => "a Rockchip IDB (sector 64, or 0 in SPI images)",
            ImageKind::Egon => "an Allwinner eGON.BT0 boot header",
            ImageKind::UbootLegacy => "a U-Boot legacy image header",
            ImageKind::Fit => "a U-Boot FIT (flattened device tree)",
            ImageKind::AndroidBoot => "an Android boot image",
        }
    }
}

/// Something that is not a disk image, named so the user knows what they passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OtherKind {
    Empty,
    Zip,
    Tar,
    SevenZip,
    Rar,
    /// A compression layer still inside the decoded data (`.gz.gz`, `.tar.xz` decoded once is
    /// a tar, but a second compression is named as such).
    Compressed(&'static str),
    Qcow2,
    Vmdk,
    Vhdx,
    Elf,
    Pdf,
    Html,
    Text,
    Zeroes,
    Unknown,
}

impl OtherKind {
    pub(crate) fn describe(self) -> String {
        match self {
            OtherKind::Empty => "empty (0 bytes)".into(),
            OtherKind::Zip => "a zip archive".into(),
            OtherKind::Tar => "a tar archive".into(),
            OtherKind::SevenZip => "a 7-Zip archive".into(),
            OtherKind::Rar => "a RAR archive".into(),
            OtherKind::Compressed(c) => format!("{c}-compressed data inside the image"),
            OtherKind::Qcow2 => "a QEMU qcow2 disk (convert it: qemu-img convert -O raw)".into(),
            OtherKind::Vmdk => "a VMware VMDK disk (convert it: qemu-img convert -O raw)".into(),
            OtherKind::Vhdx => "a Hyper-V VHDX disk (convert it: qemu-img convert -O raw)".into(),
            OtherKind::Elf => "an ELF executable".into(),
            OtherKind::Pdf => "a PDF document".into(),
            OtherKind::Html => "an HTML page (a download error page?)".into(),
            OtherKind::Text => "text".into(),
            OtherKind::Zeroes => "all zero bytes at its start".into(),
            OtherKind::Unknown => "unrecognised data".into(),
        }
    }

    /// What to do instead, for archives that usually hold the image.
    pub(crate) fn advice(self) -> Option<&'static str> {
        match self {
            OtherKind::Zip => Some("extract the image first (unzip) and write that"),
            OtherKind::Tar | OtherKind::SevenZip | OtherKind::Rar => {
                Some("extract the image from the archive first and write that")
            }
            _ => None,
        }
    }
}

/// The verdict on a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sniffed {
    Image(ImageKind),
    Other(OtherKind),
}

fn at(head: &[u8], off: usize, magic: &[u8]) -> bool {
    head.get(off..off + magic.len()) == Some(magic)
}

fn le16(head: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(head.get(off..off + 2)?.try_into().ok()?))
}

/// A FAT boot sector: a jump instruction, a power-of-two sector size and a non-zero FAT count
/// (the 0x55AA signature alone is an MBR's too).
pub(crate) fn fat_boot_sector(head: &[u8]) -> bool {
    let jump = matches!(head.first(), Some(0xEB) | Some(0xE9));
    let bps = le16(head, 11).unwrap_or(0);
    let fats = head.get(16).copied().unwrap_or(0);
    jump && matches!(bps, 512 | 1024 | 2048 | 4096)
        && fats > 0
        && (at(head, 54, b"FAT") || at(head, 82, b"FAT32"))
}

/// Classify the start of a logical (decompressed) image.
pub(crate) fn sniff(head: &[u8]) -> Sniffed {
    use ImageKind as I;
    use OtherKind as O;
    if head.is_empty() {
        return Sniffed::Other(O::Empty);
    }
    // File systems and bootloaders at their usual offsets first: a FAT boot sector also ends
    // with 0x55AA, and a GPT has a protective MBR.
    if at(head, 512, b"EFI PART") || at(head, 4096, b"EFI PART") {
        return Sniffed::Image(I::Gpt);
    }
    if fat_boot_sector(head) {
        return Sniffed::Image(I::Fat);
    }
    if at(head, 510, &[0x55, 0xAA]) {
        return Sniffed::Image(I::Mbr);
    }
    if at(head, 1024 + 0x38, &[0x53, 0xEF]) {
        return Sniffed::Image(I::Ext);
    }
    if at(head, 0x10040, b"_BHRfS_M") {
        return Sniffed::Image(I::Btrfs);
    }
    if at(head, 0, b"hsqs") {
        return Sniffed::Image(I::Squashfs);
    }
    if at(head, 0x8001, b"CD001") {
        return Sniffed::Image(I::Iso9660);
    }
    // Sector 64 on SD/eMMC images; sector 0 in SPI flash images (u-boot-rockchip-spi.bin).
    if [32768usize, 0]
        .iter()
        .any(|&o| head.get(o..o + 512).and_then(rockchip_idb).is_some())
    {
        return Sniffed::Image(I::RockchipIdb);
    }
    if [0usize, 8 << 10, 128 << 10]
        .iter()
        .any(|o| at(head, o + 4, b"eGON.BT0"))
    {
        return Sniffed::Image(I::Egon);
    }
    if at(head, 0, &[0x27, 0x05, 0x19, 0x56]) {
        return Sniffed::Image(I::UbootLegacy);
    }
    if at(head, 0, &[0xD0, 0x0D, 0xFE, 0xED]) {
        return Sniffed::Image(I::Fit);
    }
    if at(head, 0, b"ANDROID!") {
        return Sniffed::Image(I::AndroidBoot);
    }
    Sniffed::Other(other(head))
}

/// Archive signatures (offset, magic), tried before a compression layer.
const ARCHIVES: &[(usize, &[u8], OtherKind)] = &[
    (0, b"PK\x03\x04", OtherKind::Zip),
    (0, b"PK\x05\x06", OtherKind::Zip),
    (0, b"PK\x07\x08", OtherKind::Zip),
    (257, b"ustar", OtherKind::Tar),
    (0, b"7z\xBC\xAF\x27\x1C", OtherKind::SevenZip),
    (0, b"Rar!\x1A\x07", OtherKind::Rar),
];

/// Virtual disks and other files, tried after a compression layer.
const OTHERS: &[(usize, &[u8], OtherKind)] = &[
    (0, b"QFI\xFB", OtherKind::Qcow2),
    (0, b"KDMV", OtherKind::Vmdk),
    (0, b"# Disk DescriptorFile", OtherKind::Vmdk),
    (0, b"vhdxfile", OtherKind::Vhdx),
    (0, b"\x7FELF", OtherKind::Elf),
    (0, b"%PDF-", OtherKind::Pdf),
];

fn magic(head: &[u8], table: &[(usize, &[u8], OtherKind)]) -> Option<OtherKind> {
    table
        .iter()
        .find(|(off, m, _)| at(head, *off, m))
        .map(|(_, _, k)| *k)
}

fn other(head: &[u8]) -> OtherKind {
    use OtherKind as O;
    if let Some(k) = magic(head, ARCHIVES) {
        return k;
    }
    let f = super::detect::detect(head);
    if f != super::Format::Raw {
        return O::Compressed(f.name());
    }
    if let Some(k) = magic(head, OTHERS) {
        return k;
    }
    if head.iter().all(|&b| b == 0) {
        return O::Zeroes;
    }
    let sample = &head[..head.len().min(8192)];
    let texty = match std::str::from_utf8(sample) {
        Ok(s) => s,
        // A sample cut inside a multi-byte character is still text.
        Err(e) if e.error_len().is_none() => {
            std::str::from_utf8(&sample[..e.valid_up_to()]).unwrap_or_default()
        }
        Err(_) => return O::Unknown,
    };
    if texty
        .chars()
        .all(|c| !c.is_control() || matches!(c, '\n' | '\r' | '\t' | '\x0c'))
    {
        let lower = texty
            .trim_start()
            .get(..64)
            .unwrap_or(texty)
            .to_ascii_lowercase();
        if lower.starts_with("<!doctype html") || lower.starts_with("<html") {
            return O::Html;
        }
        return O::Text;
    }
    O::Unknown
}

/// A bmap file (bmaptool's XML) rather than an image.
pub(crate) fn is_bmap_xml(head: &[u8]) -> bool {
    let s = String::from_utf8_lossy(&head[..head.len().min(4096)]);
    s.trim_start().starts_with("<?xml") && s.contains("<bmap")
}

/// Rockchip's fixed RC4 key for IDBlock sectors and legacy 471/472 payloads.
const RK_RC4_KEY: [u8; 16] = [
    0x7c, 0x4e, 0x03, 0x04, 0x55, 0x05, 0x09, 0x07, 0x2d, 0x2c, 0x7b, 0x38, 0x17, 0x0d, 0x17, 0x11,
];

/// Legacy IDBlock tag (little-endian u32 at the start of the header sector).
const IDB_TAG: u32 = 0x0FF0_AA55;

/// Recognise an IDBlock header sector: RK35xx `RKNS`, or the legacy tag in plain text (RC4 off)
/// or RC4-scrambled (each 512-byte sector is scrambled with a fresh keystream).
pub(crate) fn rockchip_idb(sector: &[u8]) -> Option<&'static str> {
    if sector.len() < 4 {
        return None;
    }
    if &sector[0..4] == b"RKNS" {
        return Some("IDB (RKNS header)");
    }
    let tag = u32::from_le_bytes([sector[0], sector[1], sector[2], sector[3]]);
    if tag == IDB_TAG {
        return Some("IDB (legacy header, RC4 off)");
    }
    let ks = rc4_keystream(&RK_RC4_KEY, 4);
    let dec = [
        sector[0] ^ ks[0],
        sector[1] ^ ks[1],
        sector[2] ^ ks[2],
        sector[3] ^ ks[3],
    ];
    if u32::from_le_bytes(dec) == IDB_TAG {
        return Some("IDB (legacy header, RC4)");
    }
    None
}

/// Plain RC4 keystream (KSA + PRGA); tiny, and not worth a dependency for 4 bytes.
pub(crate) fn rc4_keystream(key: &[u8], n: usize) -> Vec<u8> {
    let mut s: [u8; 256] = std::array::from_fn(|i| i as u8);
    let mut j: u8 = 0;
    for i in 0..256 {
        j = j.wrapping_add(s[i]).wrapping_add(key[i % key.len()]);
        s.swap(i, j as usize);
    }
    let (mut i, mut j) = (0u8, 0u8);
    (0..n)
        .map(|_| {
            i = i.wrapping_add(1);
            j = j.wrapping_add(s[i as usize]);
            s.swap(i as usize, j as usize);
            s[(s[i as usize].wrapping_add(s[j as usize])) as usize]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rc4_keystream_matches_reference_vector() {
        // The key rkdeveloptool and xrock use; its keystream starts 6e262cf3be9f9d51ea3034ce20511f98.
        assert_eq!(
            hex::encode(rc4_keystream(&RK_RC4_KEY, 16)),
            "6e262cf3be9f9d51ea3034ce20511f98"
        );
    }

    #[test]
    fn idb_variants_recognised() {
        let mut s = [0u8; 512];
        assert_eq!(rockchip_idb(&s), None);
        s[0..4].copy_from_slice(b"RKNS");
        assert_eq!(rockchip_idb(&s), Some("IDB (RKNS header)"));
        s[0..4].copy_from_slice(&IDB_TAG.to_le_bytes());
        assert_eq!(rockchip_idb(&s), Some("IDB (legacy header, RC4 off)"));
        let ks = rc4_keystream(&RK_RC4_KEY, 4);
        for i in 0..4 {
            s[i] ^= ks[i];
        }
        assert_eq!(&s[0..4], &[0x3b, 0x8c, 0xdc, 0xfc]);
        assert_eq!(rockchip_idb(&s), Some("IDB (legacy header, RC4)"));
    }

    fn put(v: &mut Vec<u8>, off: usize, b: &[u8]) {
        if v.len() < off + b.len() {
            v.resize(off + b.len(), 0);
        }
        v[off..off + b.len()].copy_from_slice(b);
    }

    #[test]
    fn disk_image_signatures_at_their_offsets() {
        let mut mbr = vec![0u8; 512];
        put(&mut mbr, 510, &[0x55, 0xAA]);
        assert_eq!(sniff(&mbr), Sniffed::Image(ImageKind::Mbr));
        let mut gpt = mbr.clone();
        put(&mut gpt, 512, b"EFI PART");
        assert_eq!(sniff(&gpt), Sniffed::Image(ImageKind::Gpt));
        let mut fat = mbr.clone();
        fat[0] = 0xEB;
        put(&mut fat, 11, &512u16.to_le_bytes());
        fat[16] = 2;
        put(&mut fat, 82, b"FAT32   ");
        assert_eq!(sniff(&fat), Sniffed::Image(ImageKind::Fat));
        let mut ext = vec![0u8; 2048];
        put(&mut ext, 1024 + 0x38, &[0x53, 0xEF]);
        assert_eq!(sniff(&ext), Sniffed::Image(ImageKind::Ext));
        let mut btrfs = vec![0u8; 0x10100];
        put(&mut btrfs, 0x10040, b"_BHRfS_M");
        assert_eq!(sniff(&btrfs), Sniffed::Image(ImageKind::Btrfs));
        let mut iso = vec![0u8; 0x9000];
        put(&mut iso, 0x8001, b"CD001");
        assert_eq!(sniff(&iso), Sniffed::Image(ImageKind::Iso9660));
        let mut idb = vec![0u8; 40 << 10];
        put(&mut idb, 32768, b"RKNS");
        assert_eq!(sniff(&idb), Sniffed::Image(ImageKind::RockchipIdb));
        let mut spi = vec![0u8; 4096];
        put(&mut spi, 0, b"RKNS");
        assert_eq!(sniff(&spi), Sniffed::Image(ImageKind::RockchipIdb));
        let mut egon = vec![0u8; 200 << 10];
        put(&mut egon, (128 << 10) + 4, b"eGON.BT0");
        assert_eq!(sniff(&egon), Sniffed::Image(ImageKind::Egon));
        for (m, k) in [
            (&b"hsqs"[..], ImageKind::Squashfs),
            (&[0x27, 0x05, 0x19, 0x56], ImageKind::UbootLegacy),
            (&[0xD0, 0x0D, 0xFE, 0xED], ImageKind::Fit),
            (b"ANDROID!", ImageKind::AndroidBoot),
        ] {
            let mut v = m.to_vec();
            v.resize(4096, 0);
            assert_eq!(sniff(&v), Sniffed::Image(k), "{k:?}");
        }
    }

    #[test]
    fn non_images_are_named() {
        assert_eq!(sniff(b""), Sniffed::Other(OtherKind::Empty));
        assert_eq!(sniff(b"hello\nworld\n"), Sniffed::Other(OtherKind::Text));
        assert_eq!(
            sniff(b"<!DOCTYPE html><html>404</html>"),
            Sniffed::Other(OtherKind::Html)
        );
        assert_eq!(sniff(b"PK\x03\x04rest"), Sniffed::Other(OtherKind::Zip));
        let mut tar = vec![b'a'; 512];
        put(&mut tar, 257, b"ustar\0");
        assert_eq!(sniff(&tar), Sniffed::Other(OtherKind::Tar));
        assert_eq!(sniff(&[0u8; 4096]), Sniffed::Other(OtherKind::Zeroes));
        assert_eq!(
            sniff(&[0x1F, 0x8B, 0x08, 0, 0, 0, 1, 2]),
            Sniffed::Other(OtherKind::Compressed("gzip"))
        );
        let noise: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(sniff(&noise), Sniffed::Other(OtherKind::Unknown));
    }

    #[test]
    fn bmap_files_are_recognised() {
        assert!(is_bmap_xml(
            b"<?xml version=\"1.0\" ?>\n<!-- comment -->\n<bmap version=\"2.0\">"
        ));
        assert!(!is_bmap_xml(b"<?xml version=\"1.0\"?><svg/>"));
    }
}
