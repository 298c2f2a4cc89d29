//! `sbcflash usb` (list boards in USB recovery modes, print the udev rules) and `sbcflash fel`.
use super::Global;
use crate::exit::{Exit, ExitError};
use crate::usb::discovery::{Bus, Protocol, RusbBus};
use crate::usb::{fel, udev};
use anyhow::Context;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  sbcflash usb                                  # boards in maskrom/rpiboot/FEL/fastboot\n  sbcflash usb list --json\n  sbcflash usb udev-rules | sudo tee /etc/udev/rules.d/70-sbcflash.rules"
)]
pub struct UsbArgs {
    #[command(subcommand)]
    pub(crate) cmd: Option<UsbCmd>,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum UsbCmd {
    /// List boards attached in a recovery mode (the default).
    List,
    /// Print the udev rules sbcflash ships (generated from its USB ID tables).
    UdevRules,
}

pub(crate) fn run_usb(a: UsbArgs, g: &Global) -> anyhow::Result<Exit> {
    match a.cmd.unwrap_or(UsbCmd::List) {
        UsbCmd::List => list(&RusbBus::new(), g),
        UsbCmd::UdevRules => {
            out!("{}", udev::render());
            Ok(Exit::Ok)
        }
    }
}

/// An empty bus is an empty list, not an error.
pub(crate) fn list(bus: &dyn Bus, g: &Global) -> anyhow::Result<Exit> {
    let found = bus.list()?;
    let mut out = super::out::stdout();
    if g.json {
        let v = serde_json::json!({
            "devices": found,
        });
        crate::progress::json_line(&mut out, "usb-devices", v)?;
        return Ok(Exit::Ok);
    }
    if found.is_empty() {
        if !g.quiet {
            eprintln!("no boards in a USB recovery mode are attached");
        }
        return Ok(Exit::Ok);
    }
    writeln!(
        out,
        "{:<12} {:<10} {:<13} {:<12} SOC",
        "PORT", "ID", "PROTOCOL", "MODE"
    )?;
    for f in found {
        let proto = serde_json::to_value(f.protocol)?;
        let mode = if f.mode_guessed {
            format!("{}?", f.mode)
        } else {
            f.mode.to_string()
        };
        writeln!(
            out,
            "{:<12} {:<10} {:<13} {:<12} {}",
            f.port_path,
            f.id(),
            proto.as_str().unwrap_or("?"),
            mode,
            f.soc.as_deref().unwrap_or("-")
        )?;
    }
    Ok(Exit::Ok)
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  sbcflash fel version\n  sbcflash fel write 0x20000 u-boot-sunxi-spl.bin\n  sbcflash fel exec 0x20000\n  sbcflash fel read 0x20000 256"
)]
pub struct FelArgs {
    /// Board the device should be (for messages; FEL itself identifies the SoC).
    #[arg(long)]
    pub(crate) board: Option<String>,
    /// Use the FEL device on this USB port path (e.g. 1-2.1) when several are attached.
    #[arg(long)]
    pub(crate) port: Option<String>,
    #[command(subcommand)]
    pub(crate) cmd: FelCmd,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum FelCmd {
    /// Show the SoC and boot ROM version.
    Version,
    /// Write FILE to memory at ADDR.
    Write {
        #[arg(value_parser = parse_u32)]
        addr: u32,
        file: PathBuf,
    },
    /// Jump to ADDR.
    Exec {
        #[arg(value_parser = parse_u32)]
        addr: u32,
    },
    /// Read LEN bytes from ADDR (hex dump, or raw to --output).
    Read {
        #[arg(value_parser = parse_u32)]
        addr: u32,
        #[arg(value_parser = parse_u32)]
        len: u32,
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("'{s}' is not a 32-bit number (decimal or 0x hex)"))
}

pub(crate) fn run_fel(a: FelArgs, g: &Global) -> anyhow::Result<Exit> {
    run_fel_on(&RusbBus::new(), a, g)
}

/// `fel` against any bus (the simulated one in tests).
pub fn run_fel_on(bus: &dyn Bus, a: FelArgs, g: &Global) -> anyhow::Result<Exit> {
    let devs: Vec<_> = bus
        .list()?
        .into_iter()
        .filter(|f| f.protocol == Protocol::Fel)
        .filter(|f| a.port.as_deref().is_none_or(|p| p == f.port_path))
        .collect();
    let dev =
        match devs.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(ExitError::new(
                    Exit::Environment,
                    format!(
                    "no Allwinner board in FEL mode found (1f3a:efe8){}; hold the FEL/BOOT key \
                     while connecting the OTG port",
                    a.board.as_deref().map(|b| format!(" for board {b}")).unwrap_or_default()
                ),
                )
                .into())
            }
            _ => {
                return Err(ExitError::new(
                    Exit::BadInput,
                    "several FEL devices are attached; choose one with --port",
                )
                .into())
            }
        };
    let mut t = bus.open(&dev)?;
    let t = &mut *t;
    let mut out = super::out::stdout();
    match a.cmd {
        FelCmd::Version => {
            let v = fel::version(t)?;
            let soc = fel::soc_name(t, &v)?;
            if g.json {
                let j = serde_json::json!({"port": dev.port_path, "soc": soc, "version": v});
                crate::progress::json_line(&mut out, "fel-version", j)?;
            } else {
                writeln!(
                    out,
                    "{} at {}: SoC {soc} (id {:#06x}), firmware {}, protocol {}, scratchpad {:#x}",
                    dev.id(),
                    dev.port_path,
                    v.soc_id,
                    v.firmware,
                    v.protocol,
                    v.scratchpad
                )?;
            }
        }
        FelCmd::Write { addr, file } => {
            let data =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            fel::write(t, addr, &data, &mut |_| {})?;
            if !g.quiet {
                eprintln!("wrote {} bytes to {addr:#010x}", data.len());
            }
        }
        FelCmd::Exec { addr } => {
            fel::exec(t, addr)?;
            if !g.quiet {
                eprintln!("jumped to {addr:#010x}");
            }
        }
        FelCmd::Read { addr, len, output } => {
            let mut buf = vec![0u8; len as usize];
            fel::read(t, addr, &mut buf, &mut |_| {})?;
            match output {
                Some(p) => {
                    std::fs::write(&p, &buf).with_context(|| format!("writing {}", p.display()))?
                }
                None => {
                    for (i, row) in buf.chunks(16).enumerate() {
                        let hex: Vec<String> = row.iter().map(|b| format!("{b:02x}")).collect();
                        writeln!(out, "{:08x}: {}", addr as usize + i * 16, hex.join(" "))?;
                    }
                }
            }
        }
    }
    Ok(Exit::Ok)
}

/// `sbcflash write --via …` flags (flattened into `write`).
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct ViaArgs {
    /// Write over a USB recovery protocol instead of to a block device: `maskrom` (Rockchip:
    /// download a loader, then rockusb), `usb` (Rockchip in whatever mode it is in), `usbboot`
    /// (Raspberry Pi rpiboot, then the block write on the exposed eMMC), `fastboot`.
    /// Only IMAGE is given (no TARGET) except with usbboot, where the target is found.
    #[arg(long, value_enum, value_name = "PROTOCOL")]
    pub(crate) via: Option<crate::usb::flash::Via>,
    /// Loader for maskrom: one boot_merger .bin, or the raw 0x471 and 0x472 blobs (twice).
    #[arg(long, value_name = "FILE")]
    pub(crate) loader: Vec<PathBuf>,
    /// Storage to write over rockusb: emmc, sd, spi.
    #[arg(long, value_name = "MEDIUM")]
    pub(crate) storage: Option<String>,
    /// Directory with the rpiboot files (bootcode4.bin, … or mass-storage-gadget64).
    #[arg(long, value_name = "DIR")]
    pub(crate) usbboot_dir: Option<PathBuf>,
    /// Fastboot partition to flash (e.g. root, boot, uboot, ram).
    #[arg(long, value_name = "NAME")]
    pub(crate) partition: Option<String>,
    /// Only use the board on this USB port path (e.g. 1-2.1).
    #[arg(long, value_name = "PATH")]
    pub(crate) usb_port: Option<String>,
    /// Leave the board running its loader instead of resetting it at the end.
    #[arg(long)]
    pub(crate) no_reset: bool,
}

/// `--spi`/`--medium` name the board's medium; over rockusb that picks the loader's storage
/// (an explicit `--storage` wins). usbboot and fastboot only reach block storage.
fn storage_for_medium(
    via: crate::usb::flash::Via,
    medium: Option<crate::board::schema::MediumKind>,
) -> Result<Option<crate::usb::rockusb::StorageIndex>, ExitError> {
    use crate::board::schema::MediumKind as M;
    use crate::usb::flash::Via;
    use crate::usb::rockusb::StorageIndex as S;
    Ok(match (via, medium) {
        (Via::Maskrom | Via::Usb, Some(M::SpiNor)) => Some(S::MtdBlkSpiNor),
        (Via::Maskrom | Via::Usb, Some(M::SpiNand)) => Some(S::SpiNand),
        (Via::Maskrom | Via::Usb, Some(M::Emmc)) => Some(S::Emmc),
        (Via::Maskrom | Via::Usb, Some(M::Sd)) => Some(S::Sd0),
        (Via::Usbboot | Via::Fastboot, Some(M::SpiNor | M::SpiNand)) => {
            return Err(ExitError::new(
                Exit::Usage,
                "--spi/--medium spi-*: SPI flash is written over rockusb (--via maskrom or usb) \
                 or with `serial-load --then 'sf update ...'`; --via usbboot and fastboot write \
                 the board's block storage",
            ))
        }
        _ => None,
    })
}

/// `write --via`'s part of the [`super::write::WritePlan`]: the recovery options, checked
/// against the board named with `--board` (its protocol, its USB ID, its loader).
#[derive(Debug)]
pub(crate) struct ViaPlan {
    pub(crate) options: crate::usb::flash::ViaOptions,
    /// `--medium`/`--spi` as given (a bootloader flash takes raw blobs).
    pub(crate) medium: Option<crate::board::schema::MediumKind>,
}

impl ViaPlan {
    pub(crate) fn new(
        via: crate::usb::flash::Via,
        a: ViaArgs,
        board_args: &super::boards::BoardWriteArgs,
        g: &Global,
    ) -> anyhow::Result<ViaPlan> {
        use crate::usb::flash::{self, Via, ViaOptions};
        if via == Via::Fastboot && !board_args.bootloader.is_empty() {
            return Err(ExitError::new(
                Exit::Usage,
                "--bootloader with --via fastboot: fastboot cannot read the files back; \
                 write them with --via maskrom/usb or to the block device",
            )
            .into());
        }
        let board = board_args.board.as_deref();
        let medium = board_args.medium_kind();
        let mut o = ViaOptions::new(via);
        o.loader = a.loader;
        o.storage = a.storage.as_deref().map(flash::storage_index).transpose()?;
        if o.storage.is_none() {
            o.storage = storage_for_medium(via, medium)?;
        }
        o.usbboot_dir = a.usbboot_dir;
        o.partition = a.partition;
        o.port = a.usb_port;
        o.reset = !a.no_reset;
        if let Some(b) = board {
            let reg = super::boards::registry(g)?;
            let board = reg.get(b)?;
            if let Some(usb) = board.usb_recovery() {
                use crate::board::schema::RecoveryProtocol as P;
                let fits = matches!(
                    (via, usb.protocol),
                    (Via::Maskrom | Via::Usb, P::Rockusb)
                        | (Via::Usbboot, P::Rpiboot)
                        | (Via::Fastboot, P::Fastboot)
                );
                if !fits {
                    return Err(ExitError::new(
                        Exit::Usage,
                        format!(
                            "board {b} recovers over {} over USB, not --via {}",
                            usb.protocol,
                            format!("{via:?}").to_lowercase()
                        ),
                    )
                    .into());
                }
                // Gadgets (fastboot in U-Boot) may use other IDs than the ROM: only pin the ROM's.
                if via != Via::Fastboot {
                    o.id = usb.vid.zip(usb.pid);
                }
            }
            if via == Via::Maskrom && o.loader.is_empty() {
                let names: Vec<String> = board
                    .recovery()
                    .map(|r| {
                        r.loaders
                            .iter()
                            .filter(|l| l.role == "usb-loader")
                            .map(|l| match &l.source {
                                Some(s) => format!("{} ({s})", l.file),
                                None => l.file.clone(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                return Err(ExitError::new(
                    Exit::Usage,
                    format!(
                        "--via maskrom needs --loader FILE; sbcflash does not ship loaders. For {b}: {}",
                        if names.is_empty() {
                            "see the board's documentation".to_string()
                        } else {
                            names.join(" or ")
                        }
                    ),
                )
                .into());
            }
        }
        Ok(ViaPlan { options: o, medium })
    }
}

/// Run the USB part of `write --via`. Returns the block device to continue with (usbboot),
/// or `None` when the image is already on the board.
pub(crate) fn write_via(
    p: &ViaPlan,
    image: crate::image::open::OpenedImage,
    verify: bool,
    delta: bool,
    placements: Vec<crate::board::PlacedFile>,
    g: &Global,
) -> anyhow::Result<Option<PathBuf>> {
    use crate::usb::flash::{self, Outcome};
    let mut o = p.options.clone();
    o.verify = verify;
    o.delta = delta;
    o.placements = placements;
    let reporter = g.reporter();
    let out = flash::write_via(&RusbBus::new(), &o, image.source, &*reporter)?;
    match out {
        Outcome::BlockDevice { path, .. } => Ok(Some(path)),
        Outcome::Written {
            device,
            image_size,
            bytes_written,
            bytes_skipped,
            verified,
        } => {
            if g.json {
                let j = serde_json::json!({"device": device, "image_size": image_size, "bytes_written": bytes_written,
                    "bytes_skipped": bytes_skipped, "verified": verified});
                crate::progress::json_line(&mut super::out::stdout(), "result", j)?;
            } else {
                // The result line, like `write`'s summary: stdout, also under -q.
                outln!(
                    "{device}: wrote {bytes_written} bytes ({bytes_skipped} skipped) of a {image_size}-byte image; {}",
                    if verified { "read back and verified" } else { "not read back" }
                );
            }
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::storage_for_medium;
    use crate::board::schema::MediumKind as M;
    use crate::usb::flash::Via;
    use crate::usb::rockusb::StorageIndex as S;

    #[test]
    fn medium_picks_the_rockusb_storage_and_refuses_spi_elsewhere() {
        assert_eq!(
            storage_for_medium(Via::Maskrom, Some(M::SpiNor)).ok(),
            Some(Some(S::MtdBlkSpiNor))
        );
        assert_eq!(
            storage_for_medium(Via::Usb, Some(M::Emmc)).ok(),
            Some(Some(S::Emmc))
        );
        assert_eq!(storage_for_medium(Via::Usb, None).ok(), Some(None));
        let e = storage_for_medium(Via::Fastboot, Some(M::SpiNor)).unwrap_err();
        assert!(e.msg.contains("rockusb"), "{}", e.msg);
        assert_eq!(
            storage_for_medium(Via::Usbboot, Some(M::Emmc)).ok(),
            Some(None)
        );
    }
}
