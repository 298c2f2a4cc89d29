//! Rockchip loaders: what gets downloaded to a board in maskrom.
//!
//! Two inputs are accepted: a boot_merger file (`BOOT`/`LDR ` tag; parsed with `rockfile`, whose
//! parser does no validation, so the entry bounds, file length and Rockchip CRC32 are checked
//! here), or a raw pair of blobs for 0x471 (DRAM init) and 0x472 (usbplug / U-Boot SPL). Merged
//! files already hold the bytes the ROM wants; raw blobs are RC4-scrambled on the host only for
//! the legacy SoCs flagged in [`super::ids::ROCKCHIP_SOCS`].

use super::Error;
use std::path::Path;

/// CRC-16/CCITT-FALSE (the `crc` crate's IBM-3740): the checksum the boot ROM expects after
/// each 0x471/0x472 blob.
pub const CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_IBM_3740);

/// Rockchip's loader-file CRC32: poly 0x04C10DB7 (not the common 0x04C11DB7), init 0, no
/// reflection, no final XOR. The `crc` crate has no preset for it.
pub(crate) const CRC32_RK_ALG: crc::Algorithm<u32> = crc::Algorithm {
    width: 32,
    poly: 0x04c1_0db7,
    init: 0,
    refin: false,
    refout: false,
    xorout: 0,
    check: 0x889a_9615,
    residue: 0,
};
pub const CRC32_RK: crc::Crc<u32> = crc::Crc::<u32>::new(&CRC32_RK_ALG);

/// Rockchip's fixed RC4 key (boot_merger, rkdeveloptool, xrock).
pub(crate) const RC4_KEY: [u8; 16] = [
    0x7c, 0x4e, 0x03, 0x04, 0x55, 0x05, 0x09, 0x07, 0x2d, 0x2c, 0x7b, 0x38, 0x17, 0x0d, 0x17, 0x11,
];

/// Plain RC4 (KSA + PRGA) over `data` in place, fresh key schedule per call.
pub fn rc4(data: &mut [u8]) {
    let mut s: [u8; 256] = std::array::from_fn(|i| i as u8);
    let mut j: u8 = 0;
    for i in 0..256 {
        j = j
            .wrapping_add(s[i])
            .wrapping_add(RC4_KEY[i % RC4_KEY.len()]);
        s.swap(i, j as usize);
    }
    let (mut i, mut j) = (0u8, 0u8);
    for b in data.iter_mut() {
        i = i.wrapping_add(1);
        j = j.wrapping_add(s[i as usize]);
        s.swap(i as usize, j as usize);
        let k = s[(s[i as usize].wrapping_add(s[j as usize])) as usize];
        *b ^= k;
    }
}

/// Which boot-ROM area a blob goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Area {
    /// 0x471: SRAM, DRAM init; returns to the ROM.
    Ddr = 0x471,
    /// 0x472: DRAM, the usbplug / SPL that becomes the loader.
    Usbplug = 0x472,
}

/// One download step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoaderEntry {
    pub(crate) area: Area,
    pub(crate) name: String,
    pub(crate) data: Vec<u8>,
    /// Pause after the download, as the merged file asks (ms).
    pub(crate) delay_ms: u32,
}

/// A loader ready to download: 0x471 entries first, then 0x472.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loader {
    pub(crate) entries: Vec<LoaderEntry>,
    /// Chip tag from a merged file ("RK3588"), if any.
    pub(crate) chip: Option<String>,
    /// Where it came from, for messages.
    pub(crate) origin: String,
}

const HEADER_LEN: usize = 102;
const ENTRY_LEN: usize = 57;

fn bad(path: &str, msg: impl Into<String>) -> Error {
    Error::BadLoader {
        path: path.into(),
        msg: msg.into(),
    }
}

impl Loader {
    /// Parse a boot_merger file. `path` is only for messages.
    pub fn from_merged(path: &str, bytes: &[u8]) -> Result<Self, Error> {
        let tag = bytes.get(..4).unwrap_or_default();
        if tag != b"BOOT" && tag != b"LDR " {
            return Err(bad(
                path,
                format!(
                    "not a boot_merger loader file (starts with {:02x?}, expected \"BOOT\" or \"LDR \"); \
                     this looks like a raw blob such as rkbin's *_miniloader_*/*_ddr_*/*_usbplug_* — \
                     build a merged loader with `boot_merger RKBOOT/<SOC>MINIALL.ini`, or pass the raw \
                     DRAM-init and usbplug blobs as two --loader files (0x471 first, then 0x472)",
                    tag
                ),
            ));
        }
        let hdr: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| bad(path, format!("truncated header: {} bytes", bytes.len())))?;
        let header = rockfile::boot::RkBootHeader::from_bytes(hdr)
            .ok_or_else(|| bad(path, "unreadable loader header"))?;
        if bytes.len() < HEADER_LEN + 4 {
            return Err(bad(path, "file too short for a CRC32"));
        }
        let (body, crc_bytes) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
        let computed = CRC32_RK.checksum(body);
        if stored != computed {
            return Err(bad(
                path,
                format!(
                    "loader CRC32 mismatch: file says {stored:#010x}, contents give {computed:#010x} \
                     (corrupted or truncated download? re-fetch the loader)"
                ),
            ));
        }
        let mut entries = Vec::new();
        let mut last_end = 0u64;
        for (table, area) in [
            (&header.entry_471, Some(Area::Ddr)),
            (&header.entry_472, Some(Area::Usbplug)),
            (&header.entry_loader, None),
        ] {
            if table.count > 0 && (table.size as usize) < ENTRY_LEN {
                return Err(bad(path, format!("entry size {} < 57", table.size)));
            }
            for n in 0..table.count as usize {
                let off = table.offset as usize + n * table.size as usize;
                let raw: &[u8; ENTRY_LEN] = bytes
                    .get(off..off + ENTRY_LEN)
                    .and_then(|e| e.try_into().ok())
                    .ok_or_else(|| bad(path, format!("entry at offset {off} is past the end")))?;
                let e = rockfile::boot::RkBootEntry::from_bytes(raw);
                let start = e.data_offset as usize;
                let end = start + e.data_size as usize;
                let data = body.get(start..end).ok_or_else(|| {
                    bad(
                        path,
                        format!("entry data {start}..{end} is outside the file (offset {off})"),
                    )
                })?;
                last_end = last_end.max(end as u64);
                let name = String::from_utf16_lossy(&e.name)
                    .trim_end_matches('\0')
                    .to_string();
                if let Some(area) = area {
                    entries.push(LoaderEntry {
                        area,
                        name,
                        data: data.to_vec(),
                        delay_ms: e.data_delay,
                    });
                }
            }
        }
        if last_end != body.len() as u64 {
            return Err(bad(
                path,
                format!(
                    "file length {} does not match its entries (data ends at {last_end}, plus 4 CRC bytes)",
                    bytes.len()
                ),
            ));
        }
        if !entries.iter().any(|e| e.area == Area::Usbplug) {
            return Err(bad(path, "loader has no 0x472 (usbplug) entry"));
        }
        // Modern chips store the 4 chars after "RK" byte-reversed ("8853" for RK3588);
        // rockfile already reads them back in order.
        let chip: String = header
            .supported_chip
            .iter()
            .filter(|b| b.is_ascii_alphanumeric())
            .map(|&b| b as char)
            .collect();
        Ok(Loader {
            entries,
            chip: (!chip.is_empty()).then(|| format!("RK{chip}")),
            origin: path.to_string(),
        })
    }

    /// A raw 0x471 + 0x472 pair (U-Boot's `u-boot-rockchip-usb471.bin`/`usb472.bin`, or rkbin's
    /// ddr + usbplug). `rc4` scrambles them for legacy boot ROMs.
    pub fn from_raw(ddr: (&str, Vec<u8>), usbplug: (&str, Vec<u8>), rc4_needed: bool) -> Self {
        let mk = |area, (name, mut data): (&str, Vec<u8>)| {
            if rc4_needed {
                rc4(&mut data);
            }
            LoaderEntry {
                area,
                name: name.to_string(),
                data,
                delay_ms: 1,
            }
        };
        Loader {
            origin: format!("{} + {}", ddr.0, usbplug.0),
            entries: vec![mk(Area::Ddr, ddr), mk(Area::Usbplug, usbplug)],
            chip: None,
        }
    }

    /// Load from the user's `--loader` files: one merged file, or the raw 0x471/0x472 pair.
    pub(crate) fn from_files(
        files: &[std::path::PathBuf],
        rc4_needed: bool,
    ) -> Result<Self, Error> {
        let read =
            |p: &Path| std::fs::read(p).map_err(|e| bad(&p.display().to_string(), e.to_string()));
        match files {
            [one] => Self::from_merged(&one.display().to_string(), &read(one)?),
            [ddr, plug] => {
                let (d, u) = (read(ddr)?, read(plug)?);
                for (p, b) in [(ddr, &d), (plug, &u)] {
                    if b.starts_with(b"BOOT") || b.starts_with(b"LDR ") {
                        return Err(bad(
                            &p.display().to_string(),
                            "this is a merged boot_merger file; pass it alone as --loader",
                        ));
                    }
                    if b.is_empty() {
                        return Err(bad(&p.display().to_string(), "empty file"));
                    }
                }
                Ok(Self::from_raw(
                    (&ddr.display().to_string(), d),
                    (&plug.display().to_string(), u),
                    rc4_needed,
                ))
            }
            _ => Err(Error::Input(format!(
                "expected one merged loader file or two raw blobs (0x471 then 0x472), got {} files",
                files.len()
            ))),
        }
    }
}

/// Build a boot_merger-format file from blobs. Used to make golden inputs in tests and by the
/// simulated device; mirrors the layout boot_merger writes (entries contiguous after the header,
/// data 2 KiB aligned, CRC32-RK at the end).
pub fn build_merged(chip: &str, ddr: &[u8], usbplug: &[u8], flash: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    out[..4].copy_from_slice(b"LDR ");
    out[4..6].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
    out[6..10].copy_from_slice(&0x0101u32.to_le_bytes());
    out[10..14].copy_from_slice(&0x0103_0000u32.to_le_bytes());
    out[14..16].copy_from_slice(&2026u16.to_le_bytes());
    let tail: Vec<u8> = chip.trim_start_matches("RK").bytes().rev().collect();
    for (i, b) in tail.iter().take(4).enumerate() {
        out[0x15 + i] = *b;
    }
    let blobs: Vec<(u32, &[u8], &str)> = std::iter::once((1u32, ddr, "ddr"))
        .chain(std::iter::once((2u32, usbplug, "usbplug")))
        .chain(flash.iter().map(|f| (4u32, *f, "FlashData")))
        .collect();
    let first_entry = HEADER_LEN as u32;
    let tables = [
        (0x19usize, 1u8, 0u32),
        (0x1f, 1, 1),
        (0x25, flash.len() as u8, 2),
    ];
    for (off, count, idx) in tables {
        out[off] = count;
        out[off + 1..off + 5]
            .copy_from_slice(&(first_entry + idx * ENTRY_LEN as u32).to_le_bytes());
        out[off + 5] = ENTRY_LEN as u8;
    }
    out[0x2c] = 1; // RC4 disabled
    let data_start = HEADER_LEN + blobs.len() * ENTRY_LEN;
    let mut data = Vec::new();
    let mut entries = Vec::new();
    for (ty, blob, name) in &blobs {
        let pad = (data_start + data.len()).div_ceil(2048) * 2048 - data_start - data.len();
        data.extend(std::iter::repeat_n(0u8, pad));
        let offset = (data_start + data.len()) as u32;
        let padded = blob.len().div_ceil(2048) * 2048;
        data.extend_from_slice(blob);
        data.extend(std::iter::repeat_n(0u8, padded - blob.len()));
        let mut e = vec![0u8; ENTRY_LEN];
        e[0] = ENTRY_LEN as u8;
        e[1..5].copy_from_slice(&ty.to_le_bytes());
        for (i, c) in name.encode_utf16().take(20).enumerate() {
            e[5 + 2 * i..7 + 2 * i].copy_from_slice(&c.to_le_bytes());
        }
        e[45..49].copy_from_slice(&offset.to_le_bytes());
        e[49..53].copy_from_slice(&(padded as u32).to_le_bytes());
        e[53..57].copy_from_slice(&1u32.to_le_bytes());
        entries.extend(e);
    }
    out.extend(entries);
    out.extend(data);
    let crc = CRC32_RK.checksum(&out);
    out.extend(crc.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_values() {
        assert_eq!(CRC16.checksum(b"123456789"), 0x29b1);
        assert_eq!(CRC32_RK.checksum(b"123456789"), 0x889a_9615);
        // First table words of Rockchip's MSB-first table: crc of a single byte 1, 2, 3.
        assert_eq!(CRC32_RK.checksum(&[1]), 0x04c1_0db7);
        assert_eq!(CRC32_RK.checksum(&[2]), 0x0982_1b6e);
        assert_eq!(CRC32_RK.checksum(&[3]), 0x0d43_16d9);
    }

    #[test]
    fn rc4_keystream() {
        let mut ks = [0u8; 16];
        rc4(&mut ks);
        assert_eq!(
            ks,
            [
                0x6e, 0x26, 0x2c, 0xf3, 0xbe, 0x9f, 0x9d, 0x51, 0xea, 0x30, 0x34, 0xce, 0x20, 0x51,
                0x1f, 0x98
            ]
        );
    }

    #[test]
    fn merged_roundtrip_and_crc_check() {
        let ddr = vec![0x11u8; 3000];
        let plug = vec![0x22u8; 5000];
        let file = build_merged("RK3588", &ddr, &plug, &[&[0x33u8; 100]]);
        let l = Loader::from_merged("x.bin", &file).unwrap();
        assert_eq!(l.chip.as_deref(), Some("RK3588"));
        assert_eq!(l.entries.len(), 2);
        assert_eq!(l.entries[0].area, Area::Ddr);
        assert_eq!(&l.entries[0].data[..3000], &ddr[..]);
        assert_eq!(l.entries[0].data.len(), 4096); // padded to 2 KiB as boot_merger does
        assert_eq!(l.entries[1].area, Area::Usbplug);

        let mut broken = file.clone();
        broken[2100] ^= 1;
        let e = Loader::from_merged("x.bin", &broken)
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.bin") && e.contains("CRC32 mismatch"), "{e}");

        let e = Loader::from_merged("mini.bin", &[0xea, 0, 0, 0x14, 1, 2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("raw blob") && e.contains("boot_merger"), "{e}");
    }
}
