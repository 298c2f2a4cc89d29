//! The board and SoC descriptor schema (`boards/*.toml`, `boards/soc/*.toml`), version 1.
//!
//! Two kinds of file, so SoC-level facts live once:
//! - a **SoC descriptor** ([`SocDesc`]) holds what every board with that SoC shares: the USB
//!   recovery IDs and protocol, RC4 or not, and the block/SPI layouts the boot ROM imposes
//!   (reserved region, bootloader signatures, where bootloader files go);
//! - a **board descriptor** ([`BoardDesc`]) holds identity, which storage media the board has
//!   and how it boots from each, console, U-Boot behaviour, image sources, recovery entry
//!   instructions and loader files, and the handoff.
//!
//! Every struct denies unknown fields: a typo in a user descriptor is an error with
//! file:line:col, never a silently ignored key. `schema = 1` is required so a future format can
//! be told apart. Facts the research could not confirm from a primary source are tagged
//! `# [hedge]` in the shipped TOML and listed in `unverified`, and a user descriptor with the
//! same id overrides them wholesale.

use serde::{Deserialize, Deserializer, Serialize};

/// The only schema version this build reads.
pub(crate) const SCHEMA_VERSION: u32 = 1;

/// Sector size used by every offset expressed in sectors.
pub(crate) const SECTOR: u64 = 512;

/// CPU architecture of a board (what `nix build` must target).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Aarch64,
    Riscv64,
    Armv7l,
    X86_64,
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Arch::Aarch64 => "aarch64",
            Arch::Riscv64 => "riscv64",
            Arch::Armv7l => "armv7l",
            Arch::X86_64 => "x86_64",
        })
    }
}

// ---------------------------------------------------------------------------------------------
// SoC descriptor
// ---------------------------------------------------------------------------------------------

/// Facts shared by every board built on one SoC (or SoC family with identical boot behaviour).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocDesc {
    /// Must be [`SCHEMA_VERSION`].
    pub(crate) schema: u32,
    /// Key boards use in their `soc = "..."` field, e.g. `rk3588`.
    pub(crate) id: String,
    /// Human names covered by this file ("RK3588", "RK3588S").
    pub names: Vec<String>,
    pub vendor: String,
    pub arch: Arch,
    /// The boot ROM's USB recovery mode, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) usb: Option<SocUsb>,
    /// Layout the boot ROM expects on SD/eMMC (block media it boots from directly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) block: Option<Layout>,
    /// Layout of the SoC's SPI/QSPI boot flash, when it boots from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) spi: Option<Layout>,
    /// Free-form remarks shown by `sbcflash boards show`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) notes: Vec<String>,
}

/// USB recovery protocol spoken by a ROM (or by a vendor loader that replaces it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecoveryProtocol {
    /// Rockchip maskrom/loader (0x471/0x472 control download, then bulk rockusb).
    Rockusb,
    /// Raspberry Pi `rpiboot` (bootcode/firmware server, then mass-storage gadget).
    Rpiboot,
    /// Allwinner FEL.
    Fel,
    /// Android fastboot (T-Head TH1520 ROM, U-Boot gadgets).
    Fastboot,
    /// No USB recovery; recovery is over the UART (e.g. JH7110 XMODEM).
    UartXmodem,
}

impl std::fmt::Display for RecoveryProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecoveryProtocol::Rockusb => "rockusb",
            RecoveryProtocol::Rpiboot => "rpiboot",
            RecoveryProtocol::Fel => "fel",
            RecoveryProtocol::Fastboot => "fastboot",
            RecoveryProtocol::UartXmodem => "uart-xmodem",
        })
    }
}

/// The SoC's recovery identity on USB (or over UART when `protocol = "uart-xmodem"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocUsb {
    pub protocol: RecoveryProtocol,
    /// USB vendor id (absent for UART-only recovery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vid: Option<u16>,
    /// USB product id in the ROM recovery mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u16>,
    /// Interface class/subclass/protocol that identifies the protocol (PIDs are shared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) interface: Option<InterfaceClass>,
    /// Rockchip only: the ROM expects RC4-scrambled raw 471/472 payloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rc4: Option<bool>,
    /// Allwinner FEL only: SoC id reported by the VERSION request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) fel_soc_id: Option<u32>,
    /// rpiboot only: file names the ROM stage asks for, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) stage_files: Vec<String>,
    /// UART recovery only: baud rate of the ROM's XMODEM receiver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) baud: Option<u32>,
}

/// USB interface class triple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InterfaceClass {
    pub class: u8,
    pub subclass: u8,
    pub protocol: u8,
}

/// Partition table kind an image uses or a layout requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TableKind {
    Mbr,
    Gpt,
    /// Either is fine.
    Any,
}

impl std::fmt::Display for TableKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TableKind::Mbr => "MBR",
            TableKind::Gpt => "GPT",
            TableKind::Any => "MBR or GPT",
        })
    }
}

/// What the boot ROM needs on a medium: where the bootloader lives and what it looks like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    /// Partition table the ROM/SPL can use.
    #[serde(default = "any_table")]
    pub(crate) table: TableKind,
    /// Sectors the bootloader occupies; no partition may overlap them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved: Option<SectorRange>,
    /// How a bootloader already in the image is recognised (any one match = present).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) signatures: Vec<Signature>,
    /// Where bootloader files go when written outside the image (`--bootloader`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placements: Vec<Placement>,
    /// The first partition must be FAT (Raspberry Pi firmware partition).
    #[serde(default, skip_serializing_if = "is_false")]
    pub(crate) first_partition_fat: bool,
    /// Human summary of the layout for `boards show`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) note: Option<String>,
}

fn any_table() -> TableKind {
    TableKind::Any
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Inclusive-exclusive sector range `[start, end)`; `end` is the first free sector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SectorRange {
    pub start: u64,
    pub end: u64,
}

impl SectorRange {
    pub(crate) fn overlaps(&self, start: u64, end: u64) -> bool {
        start < self.end && self.start < end
    }
}

impl std::fmt::Display for SectorRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sectors {}..{}", self.start, self.end.saturating_sub(1))
    }
}

/// A way to recognise a bootloader inside an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) enum Signature {
    /// Rockchip IDBlock at `sector`: `RKNS` (RK35xx) or the legacy `0x0FF0AA55` tag, plain or
    /// RC4-scrambled.
    RockchipIdb { sector: u64 },
    /// Allwinner `eGON.BT0` magic at `offset + 4` for any of `offsets` (bytes).
    Egon { offsets: Vec<u64> },
    /// A GPT partition of this type GUID exists (JH7110 SPL partition).
    GptType { guid: String },
    /// Literal ASCII bytes at a byte offset.
    Magic { offset: u64, ascii: String },
}

/// A bootloader file and where it goes on the medium.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// File name as produced by the bootloader build (`idbloader.img`).
    pub file: String,
    /// Offset in 512-byte sectors (exactly one of `sector`/`offset`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) sector: Option<u64>,
    /// Offset in bytes (exactly one of `sector`/`offset`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) offset: Option<u64>,
    /// Only applies to images with this partition table (sunxi: 8 KiB clashes with GPT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) table: Option<TableKind>,
    /// This one file replaces the others in its layout (e.g. `u-boot-rockchip.bin`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub(crate) combined: bool,
}

impl Placement {
    /// Byte offset on the medium. Validation guarantees one of the two is set.
    pub fn offset_bytes(&self) -> u64 {
        match (self.sector, self.offset) {
            (Some(s), _) => s * SECTOR,
            (None, Some(o)) => o,
            (None, None) => 0,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Board descriptor
// ---------------------------------------------------------------------------------------------

/// One board, as written in `boards/<id>.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardDesc {
    /// Must be [`SCHEMA_VERSION`].
    pub(crate) schema: u32,
    /// Primary id used on the command line (`--board opi5`): lowercase, digits, `-`.
    pub id: String,
    /// Other accepted ids (`orangepi5`, `orange-pi-5`).
    #[serde(default)]
    pub aliases: Vec<String>,
    pub(crate) name: String,
    pub(crate) vendor: String,
    /// Id of a SoC descriptor in `boards/soc/`.
    pub(crate) soc: String,
    pub arch: Arch,
    /// This board is a variant of another (shown by `boards`; no inheritance of fields).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) variant_of: Option<String>,
    /// Storage media, in the order the user most likely wants them.
    pub storage: Vec<Medium>,
    /// Serial console.
    pub(crate) console: Console,
    /// U-Boot behaviour on the console (absent when the board boots without U-Boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) uboot: Option<UBoot>,
    /// Board-specific recovery facts (the SoC file has the USB ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) recovery: Option<Recovery>,
    /// Known image sources (prebuilt downloads or flakes).
    #[serde(default, rename = "image", skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageSource>,
    /// How the board is handed to `nixos-rebuild` after first boot.
    #[serde(default)]
    pub(crate) handoff: Handoff,
    /// Dotted keys whose values are not confirmed from a primary source (`[hedge]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) unverified: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) notes: Vec<String>,
}

/// Kind of storage medium.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MediumKind {
    Sd,
    Emmc,
    SpiNor,
    SpiNand,
    Nvme,
    Usb,
    /// QEMU virtio block device.
    Virtio,
}

impl MediumKind {
    /// Block media the ROM reads with the SoC's `block` layout.
    pub(crate) fn is_block_boot(self) -> bool {
        matches!(self, MediumKind::Sd | MediumKind::Emmc)
    }
    pub(crate) fn is_spi(self) -> bool {
        matches!(self, MediumKind::SpiNor | MediumKind::SpiNand)
    }
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            MediumKind::Sd => "sd",
            MediumKind::Emmc => "emmc",
            MediumKind::SpiNor => "spi-nor",
            MediumKind::SpiNand => "spi-nand",
            MediumKind::Nvme => "nvme",
            MediumKind::Usb => "usb",
            MediumKind::Virtio => "virtio",
        }
    }
}

impl std::fmt::Display for MediumKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for MediumKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "sd" | "microsd" => MediumKind::Sd,
            "emmc" => MediumKind::Emmc,
            "spi-nor" | "spi" => MediumKind::SpiNor,
            "spi-nand" => MediumKind::SpiNand,
            "nvme" => MediumKind::Nvme,
            "usb" => MediumKind::Usb,
            "virtio" => MediumKind::Virtio,
            _ => {
                return Err(format!(
                "unknown medium `{s}`: expected sd, emmc, spi-nor, spi-nand, nvme, usb or virtio"
            ))
            }
        })
    }
}

/// Where the board gets its bootloader when the OS is on this medium.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum BootSource {
    /// The ROM reads the bootloader from this medium: the image (or `--bootloader`) must carry it.
    Image,
    /// The board's own flash (SPI NOR, eMMC boot0) may hold U-Boot, which then loads the OS
    /// from this medium; an image without a bootloader boots only if that flash is programmed.
    BoardFlash,
    /// Vendor firmware (EEPROM) loads files from the image's FAT partition (Raspberry Pi).
    Firmware,
    /// Something outside the medium provides firmware (QEMU `-bios`).
    External,
    /// This medium holds only the bootloader (SPI flash), never the OS image.
    BootloaderOnly,
}

/// One storage medium of a board.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Medium {
    pub kind: MediumKind,
    /// The medium `--board X` writes to when none is named.
    #[serde(default, skip_serializing_if = "is_false")]
    pub default: bool,
    pub(crate) boot: BootSource,
    /// Size when fixed on the board (SPI flash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) size_mib: Option<u64>,
    /// U-Boot device for `ums`/`load` (`mmc 1`, `virtio 0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uboot_dev: Option<String>,
    /// Rockusb storage index to switch to before writing (SPI NOR on RK3588 = 9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rockusb_index: Option<u32>,
    /// Replaces the SoC's layout for this medium.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) layout: Option<Layout>,
    /// What to tell the user when the image lacks a bootloader this medium needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) bootloader_hint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) note: Option<String>,
}

/// Serial console facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Console {
    /// SoC UART name (`UART2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) uart: Option<String>,
    /// Baud rate used by ROM/U-Boot/Linux (8N1 assumed).
    pub baud: u32,
    /// Linux console device name without `/dev/` (`ttyS2`), for `console=` and the follower.
    pub linux: String,
    /// Where the pins are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) pins: Option<String>,
}

/// How U-Boot behaves on the console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UBoot {
    /// Prompt strings, any of which means "at the prompt" (`=> `, `U-Boot> `).
    pub prompts: Vec<String>,
    /// Autoboot countdown messages (prefixes; the countdown digit follows).
    pub(crate) autoboot: Vec<String>,
    /// How to stop autoboot, in the order to try.
    pub(crate) interrupt: Vec<Interrupt>,
    /// Default `bootdelay` in seconds, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) bootdelay: Option<u32>,
    /// Commands for useful gadget modes, templated with `{dev}` = the medium's `uboot_dev`.
    #[serde(default)]
    pub(crate) commands: UBootCommands,
}

/// A way to interrupt U-Boot's autoboot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) enum Interrupt {
    /// Any key (mainline default).
    AnyKey,
    /// Ctrl-C (vendor Rockchip U-Boot, `CONFIG_AUTOBOOT_KEYED` with ctrl-c).
    CtrlC,
    /// A specific string (`CONFIG_AUTOBOOT_KEYED` + `AUTOBOOT_STOP_STR`).
    Keys { keys: String },
}

impl Interrupt {
    /// Bytes to send on the serial line.
    #[cfg(test)] // only the unit tests use it
    pub(crate) fn bytes(&self) -> Vec<u8> {
        match self {
            // A space is harmless if it lands at the prompt afterwards.
            Interrupt::AnyKey => b" ".to_vec(),
            Interrupt::CtrlC => vec![0x03],
            Interrupt::Keys { keys } => keys.as_bytes().to_vec(),
        }
    }
}

/// U-Boot commands for gadget modes; `None` when the build is not known to have them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UBootCommands {
    /// USB mass storage, e.g. `ums 0 {dev}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ums: Option<String>,
    /// Rockusb gadget, e.g. `rockusb 0 {dev}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) rockusb: Option<String>,
    /// Fastboot gadget, e.g. `fastboot usb 0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) fastboot: Option<String>,
    /// DFU gadget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) dfu: Option<String>,
    /// VID/PID the U-Boot gadget enumerates with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) gadget_vid: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) gadget_pid: Option<u16>,
}

impl UBootCommands {
    /// Expand `{dev}` in a command template.
    pub(crate) fn render(template: &str, dev: &str) -> String {
        template.replace("{dev}", dev)
    }
}

/// Board-specific recovery facts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Recovery {
    /// Steps for the user to enter the recovery mode.
    #[serde(default)]
    pub(crate) enter: Vec<String>,
    /// Which connector to plug into the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) port: Option<String>,
    /// Loader/payload files the recovery flow needs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) loaders: Vec<LoaderFile>,
}

/// A loader file for a recovery flow (the file itself is never shipped with sbcflash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoaderFile {
    /// What it is for: `usb-loader` (rockusb `db`), `spl`, `uboot`, `xmodem`, ...
    pub(crate) role: String,
    /// File name or glob as published (`rk3588_spl_loader_v*.bin`).
    pub(crate) file: String,
    /// Where it comes from (rkbin, a nixpkgs attribute, vendor download).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) source: Option<String>,
}

/// A known image source. Exactly one of `url` / `flake`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSource {
    /// Short name (`nixos-hydra`, `community`).
    pub name: String,
    /// Download URL of a prebuilt image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) url: Option<String>,
    /// Flake reference to build from (`github:gnull/nixos-rk3588`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) flake: Option<String>,
    /// Attribute to build within the flake; `<host>` is replaced by the host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) attr: Option<String>,
    /// Published blake3 digest of the (compressed) download; absent = unpinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) blake3: Option<Digest>,
    /// Published sha256 digest of the download; absent = unpinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) sha256: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) note: Option<String>,
    /// Keys trusted to sign this source's images (`[[image.trust]]`); trusted for any write
    /// with this board.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) trust: Vec<crate::trust::TrustEntry>,
}

impl ImageSource {
    /// True when no digest is published: acquisition must treat the download as unpinned.
    pub fn is_unpinned(&self) -> bool {
        self.blake3.is_none() && self.sha256.is_none()
    }
}

/// A 32-byte digest written as 64 hex digits; rejected at parse time otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Digest(pub(crate) [u8; 32]);

impl Digest {
    pub(crate) fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub(crate) fn parse(s: &str) -> Result<Digest, String> {
        if s.len() != 64 {
            return Err(format!(
                "expected 64 hex digits (32-byte digest), got {} characters",
                s.len()
            ));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|e| format!("expected hex digits: {e}"))?;
        Ok(Digest(out))
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Handing a booted board over to `nixos-rebuild --target-host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Handoff {
    /// SSH user on the freshly booted image.
    #[serde(default = "default_ssh_user")]
    pub(crate) ssh_user: String,
    /// Flake attribute template for the image; `<host>` is replaced by the host name.
    #[serde(default = "default_flake_attr")]
    pub(crate) flake_attr: String,
}

fn default_ssh_user() -> String {
    "root".into()
}

/// nixpkgs' sd-image module output, the common case for SBCs.
pub(crate) const DEFAULT_FLAKE_ATTR: &str =
    "nixosConfigurations.<host>.config.system.build.sdImage";

fn default_flake_attr() -> String {
    DEFAULT_FLAKE_ATTR.into()
}

impl Default for Handoff {
    fn default() -> Self {
        Handoff {
            ssh_user: default_ssh_user(),
            flake_attr: default_flake_attr(),
        }
    }
}

impl Handoff {
    /// The flake attribute for `host`.
    #[cfg(test)] // only the unit tests use it
    pub(crate) fn flake_attr_for(&self, host: &str) -> String {
        self.flake_attr.replace("<host>", host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_bytes_and_command_templates() {
        assert_eq!(Interrupt::AnyKey.bytes(), b" ");
        assert_eq!(Interrupt::CtrlC.bytes(), [0x03]);
        assert_eq!(
            Interrupt::Keys {
                keys: "stop".into()
            }
            .bytes(),
            b"stop"
        );
        assert_eq!(UBootCommands::render("ums 0 {dev}", "mmc 1"), "ums 0 mmc 1");
        let h = Handoff::default();
        assert_eq!(
            h.flake_attr_for("pi"),
            "nixosConfigurations.pi.config.system.build.sdImage"
        );
    }

    #[test]
    fn digest_parsing() {
        let hex64 = "ab".repeat(32);
        assert_eq!(Digest::parse(&hex64).unwrap().to_hex(), hex64);
        assert!(Digest::parse("abc").unwrap_err().contains("64 hex digits"));
        assert!(Digest::parse(&"g".repeat(64))
            .unwrap_err()
            .contains("hex digits"));
    }

    #[test]
    fn medium_names_round_trip() {
        for k in [
            MediumKind::Sd,
            MediumKind::Emmc,
            MediumKind::SpiNor,
            MediumKind::SpiNand,
            MediumKind::Nvme,
            MediumKind::Usb,
            MediumKind::Virtio,
        ] {
            assert_eq!(k.as_str().parse::<MediumKind>().unwrap(), k);
        }
        assert!("floppy".parse::<MediumKind>().is_err());
    }
}
