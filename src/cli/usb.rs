//! `sbcflash usb` (list boards in USB recovery modes, print the udev rules) and `sbcflash fel`.
use super::Global;
use crate::exit::{Exit, ExitError};
use crate::usb::discovery::{Bus, Protocol, RusbBus};
use crate::usb::{fel, udev};
use anyhow::Context;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct UsbArgs {
    #[command(subcommand)]
    pub cmd: Option<UsbCmd>,
}

#[derive(Debug, clap::Subcommand)]
pub enum UsbCmd {
    /// List boards attached in a recovery mode (the default).
    List,
    /// Print the udev rules sbcflash ships (generated from its USB ID tables).
    UdevRules,
}

pub fn run_usb(a: UsbArgs, g: &Global) -> anyhow::Result<Exit> {
    match a.cmd.unwrap_or(UsbCmd::List) {
        UsbCmd::List => list(&RusbBus::new(), g),
        UsbCmd::UdevRules => {
            print!("{}", udev::render());
            Ok(Exit::Ok)
        }
    }
}

/// An empty bus is an empty list, not an error.
pub fn list(bus: &dyn Bus, g: &Global) -> anyhow::Result<Exit> {
    let found = bus.list()?;
    let mut out = std::io::stdout().lock();
    if g.json {
        let v = serde_json::json!({
            "schema": crate::progress::JSON_SCHEMA_VERSION,
            "devices": found,
        });
        writeln!(out, "{v}")?;
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
pub struct FelArgs {
    /// Board the device should be (for messages; FEL itself identifies the SoC).
    #[arg(long)]
    pub board: Option<String>,
    /// Use the FEL device on this USB port path (e.g. 1-2.1) when several are attached.
    #[arg(long)]
    pub port: Option<String>,
    #[command(subcommand)]
    pub cmd: FelCmd,
}

#[derive(Debug, clap::Subcommand)]
pub enum FelCmd {
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

pub fn run_fel(a: FelArgs, g: &Global) -> anyhow::Result<Exit> {
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
    let mut out = std::io::stdout().lock();
    match a.cmd {
        FelCmd::Version => {
            let v = fel::version(t)?;
            let soc = fel::soc_name(t, &v)?;
            if g.json {
                let j = serde_json::json!({"schema": crate::progress::JSON_SCHEMA_VERSION,
                    "port": dev.port_path, "soc": soc, "version": v});
                writeln!(out, "{j}")?;
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
