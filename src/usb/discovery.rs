//! Finding boards in a USB recovery mode.
//!
//! Devices are recognised by interface class/subclass/protocol first (fastboot and rockusb
//! gadgets reuse the SoC's ROM VID:PID), then by the ID tables in [`super::ids`]. Devices are
//! named by bus and port path (`1-1.3`), which stays stable across the re-enumerations every
//! protocol goes through, unlike the device address.

use super::ids;
use super::transport::{RusbTransport, Transport, TransportError};
use super::Error;
use serde::Serialize;
use std::path::PathBuf;

/// The protocol spoken on the chosen interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Protocol {
    /// Rockchip boot ROM download or rockusb bulk protocol.
    Rockusb,
    /// Raspberry Pi boot ROM / second-stage file server.
    Usbboot,
    Fastboot,
    /// Allwinner FEL.
    Fel,
    /// A USB mass-storage gadget of one of our boards (U-Boot `ums`, rpiboot MSD).
    MassStorage,
}

/// What the board is running right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Rockchip boot ROM: only takes 0x471/0x472 control downloads.
    Maskrom,
    /// Rockchip usbplug / loader / U-Boot rockusb: bulk LBA commands.
    Loader,
    /// Raspberry Pi boot ROM, waiting for the second stage.
    Rom,
    /// Raspberry Pi second stage asking for files.
    FileServer,
    Fastboot,
    Fel,
    MassStorage,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Mode::Maskrom => "maskrom",
            Mode::Loader => "loader",
            Mode::Rom => "ROM",
            Mode::FileServer => "file-server",
            Mode::Fastboot => "fastboot",
            Mode::Fel => "FEL",
            Mode::MassStorage => "mass-storage",
        };
        f.write_str(s)
    }
}

/// The descriptor facts classification needs; filled from libusb or from a simulated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub(crate) bus: u8,
    pub(crate) address: u8,
    /// Port numbers from the root hub down.
    pub(crate) ports: Vec<u8>,
    pub(crate) vid: u16,
    pub(crate) pid: u16,
    /// bcdUSB, e.g. 0x0200 or 0x0201.
    pub(crate) bcd_usb: u16,
    /// Index of the serial-number string descriptor (rpiboot tells its stages apart by it).
    pub serial_index: u8,
    pub interfaces: Vec<InterfaceClass>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterfaceClass {
    pub(crate) number: u8,
    pub class: u8,
    pub subclass: u8,
    pub protocol: u8,
}

impl InterfaceClass {
    fn triple(&self) -> (u8, u8, u8) {
        (self.class, self.subclass, self.protocol)
    }
}

/// A recognised board in a recovery mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Found {
    pub(crate) bus: u8,
    pub(crate) address: u8,
    /// `bus-port.port…`, the same form as sysfs and `rpiboot -p`.
    pub(crate) port_path: String,
    #[serde(serialize_with = "hex4")]
    pub(crate) vid: u16,
    #[serde(serialize_with = "hex4")]
    pub(crate) pid: u16,
    pub(crate) protocol: Protocol,
    pub mode: Mode,
    /// Best guess from the product ID; `None` when the ID is not in our tables.
    pub(crate) soc: Option<String>,
    /// The interface the protocol lives on.
    pub(crate) interface: u8,
    /// True when the mode comes from a heuristic (Rockchip bcdUSB bit 0) that a probe should
    /// confirm before acting on it.
    pub(crate) mode_guessed: bool,
}

fn hex4<S: serde::Serializer>(v: &u16, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:04x}"))
}

impl Found {
    pub fn id(&self) -> String {
        format!("{:04x}:{:04x}", self.vid, self.pid)
    }
}

pub(crate) fn port_path(bus: u8, ports: &[u8]) -> String {
    if ports.is_empty() {
        return format!("{bus}-0");
    }
    let p: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
    format!("{bus}-{}", p.join("."))
}

/// Decide whether a device is one of ours, which protocol and mode. Pure: tested directly.
pub(crate) fn classify(d: &Descriptor) -> Option<Found> {
    let mk = |protocol, mode, soc: Option<&str>, interface, guessed| Found {
        bus: d.bus,
        address: d.address,
        port_path: port_path(d.bus, &d.ports),
        vid: d.vid,
        pid: d.pid,
        protocol,
        mode,
        soc: soc.map(str::to_string),
        interface,
        mode_guessed: guessed,
    };
    let by_class = |t: (u8, u8, u8)| d.interfaces.iter().find(|i| i.triple() == t);

    // Class first: fastboot gadgets reuse ROM IDs (e.g. U-Boot fastboot on 2207:350b).
    if let Some(i) = by_class(ids::CLASS_FASTBOOT) {
        let soc = match d.vid {
            ids::VID_ROCKCHIP => ids::rockchip_soc(d.pid).map(|s| s.name),
            ids::VID_THEAD if d.pid == ids::PID_TH1520_BROM => Some("TH1520"),
            _ => None,
        };
        return Some(mk(Protocol::Fastboot, Mode::Fastboot, soc, i.number, false));
    }
    match d.vid {
        ids::VID_ROCKCHIP => {
            let soc = ids::rockchip_soc(d.pid).map(|s| s.name);
            if let Some(i) = by_class(ids::CLASS_MASS_STORAGE) {
                return Some(mk(
                    Protocol::MassStorage,
                    Mode::MassStorage,
                    soc,
                    i.number,
                    false,
                ));
            }
            // rkdeveloptool: any PID with a non-zero high byte is a rockusb device.
            if d.pid >> 8 == 0 {
                return None;
            }
            let iface = by_class(ids::CLASS_ROCKUSB)
                .or_else(|| d.interfaces.iter().find(|i| i.class == 0xff))?;
            // bcdUSB bit 0 is only a hint (wrong on RK3066 maskrom and RK3576 SPL loaders).
            let mode = if d.bcd_usb & 1 == 0 {
                Mode::Maskrom
            } else {
                Mode::Loader
            };
            Some(mk(Protocol::Rockusb, mode, soc, iface.number, true))
        }
        ids::VID_BROADCOM => {
            let (_, soc, _) = ids::BROADCOM_ROMS.iter().find(|(p, _, _)| *p == d.pid)?;
            // BCM2837 parts expose two interfaces; the boot protocol is on the second.
            let iface = if d.interfaces.len() > 1 { 1 } else { 0 };
            let mode = if d.serial_index == 0 || d.serial_index == 3 {
                Mode::Rom
            } else {
                Mode::FileServer
            };
            Some(mk(Protocol::Usbboot, mode, Some(soc), iface, false))
        }
        ids::VID_ALLWINNER if d.pid == ids::PID_FEL => {
            Some(mk(Protocol::Fel, Mode::Fel, None, 0, false))
        }
        ids::VID_THEAD if d.pid == ids::PID_TH1520_BROM => Some(mk(
            Protocol::Fastboot,
            Mode::Fastboot,
            Some("TH1520"),
            d.interfaces.first().map_or(0, |i| i.number),
            false,
        )),
        _ => {
            let gadget = ids::GADGETS
                .iter()
                .any(|(v, p, _)| *v == d.vid && *p == d.pid);
            let i = by_class(ids::CLASS_MASS_STORAGE).filter(|_| gadget)?;
            Some(mk(
                Protocol::MassStorage,
                Mode::MassStorage,
                None,
                i.number,
                false,
            ))
        }
    }
}

/// Where devices come from: the real bus (libusb) or a simulated one in tests.
pub trait Bus {
    /// Every recognised device, in a stable order.
    fn list(&self) -> Result<Vec<Found>, Error>;
    /// Claim the protocol interface of `dev`.
    fn open(&self, dev: &Found) -> Result<Box<dyn Transport>, Error>;
    /// The block device a mass-storage gadget on `port_path` became, if any.
    fn block_device(&self, port_path: &str) -> Option<PathBuf>;
}

/// The real bus through libusb.
pub struct RusbBus {
    ctx: Option<rusb::Context>,
}

impl RusbBus {
    /// A machine without usbfs (containers, this CI) has no USB bus: that is an empty list,
    /// not an error, so `sbcflash usb` answers "nothing attached".
    pub fn new() -> Self {
        match rusb::Context::new() {
            Ok(ctx) => Self { ctx: Some(ctx) },
            Err(e) => {
                tracing::info!("libusb unavailable ({e}); treating as no USB devices");
                Self { ctx: None }
            }
        }
    }

    fn describe(dev: &rusb::Device<rusb::Context>) -> Option<Descriptor> {
        let dd = dev.device_descriptor().ok()?;
        let v = dd.usb_version();
        let bcd = ((v.major() as u16) << 8) | ((v.minor() as u16) << 4) | v.sub_minor() as u16;
        let mut interfaces = Vec::new();
        if let Ok(cfg) = dev
            .active_config_descriptor()
            .or_else(|_| dev.config_descriptor(0))
        {
            for i in cfg.interfaces() {
                if let Some(alt) = i.descriptors().next() {
                    interfaces.push(InterfaceClass {
                        number: alt.interface_number(),
                        class: alt.class_code(),
                        subclass: alt.sub_class_code(),
                        protocol: alt.protocol_code(),
                    });
                }
            }
        }
        Some(Descriptor {
            bus: dev.bus_number(),
            address: dev.address(),
            ports: dev.port_numbers().unwrap_or_default(),
            vid: dd.vendor_id(),
            pid: dd.product_id(),
            bcd_usb: bcd,
            serial_index: dd.serial_number_string_index().unwrap_or(0),
            interfaces,
        })
    }

    fn devices(&self) -> Vec<rusb::Device<rusb::Context>> {
        use rusb::UsbContext;
        let Some(ctx) = &self.ctx else {
            return Vec::new();
        };
        // libusb keeps a context's device list current from udevd's events. Without a running
        // udevd (containers, minimal systems) a long-lived context never sees a board that
        // re-enumerated (maskrom → loader): a fresh context enumerates sysfs as it is now.
        let fresh;
        let ctx = if udevd_running() {
            ctx
        } else {
            match rusb::Context::new() {
                Ok(c) => {
                    fresh = c;
                    &fresh
                }
                Err(_) => ctx,
            }
        };
        match ctx.devices() {
            Ok(list) => list.iter().collect(),
            Err(e) => {
                tracing::info!("cannot list USB devices ({e}); treating as none");
                Vec::new()
            }
        }
    }
}

impl Default for RusbBus {
    fn default() -> Self {
        Self::new()
    }
}

impl Bus for RusbBus {
    fn list(&self) -> Result<Vec<Found>, Error> {
        let mut out: Vec<Found> = self
            .devices()
            .iter()
            .filter_map(Self::describe)
            .filter_map(|d| classify(&d))
            .collect();
        out.sort_by(|a, b| a.port_path.cmp(&b.port_path));
        Ok(out)
    }

    fn open(&self, dev: &Found) -> Result<Box<dyn Transport>, Error> {
        let d = self
            .devices()
            .into_iter()
            .find(|d| d.bus_number() == dev.bus && d.address() == dev.address)
            .ok_or_else(|| Error::NotFound(format!("{} at {}", dev.id(), dev.port_path)))?;
        match RusbTransport::open(&d, dev.interface) {
            Ok(t) => Ok(Box::new(t)),
            Err(TransportError::Access) => Err(Error::Permission {
                device: format!("{} at {}", dev.id(), dev.port_path),
            }),
            Err(e) => Err(Error::Transport {
                during: format!("opening {} at {}", dev.id(), dev.port_path),
                source: e,
            }),
        }
    }

    fn block_device(&self, port_path: &str) -> Option<PathBuf> {
        // /sys/bus/usb/devices/<port_path>/<port_path>:1.0/host*/target*/*/block/<name>
        let root = PathBuf::from("/sys/bus/usb/devices").join(port_path);
        find_block(&root, 6).map(|name| PathBuf::from("/dev").join(name))
    }
}

/// udevd's control socket exists while it runs (the same test as `udevadm`'s).
fn udevd_running() -> bool {
    std::path::Path::new("/run/udev/control").exists()
}

/// Depth-limited search for a `block/<name>` directory under a USB device's sysfs node.
fn find_block(dir: &std::path::Path, depth: u32) -> Option<String> {
    if depth == 0 {
        return None;
    }
    let entries = std::fs::read_dir(dir).ok()?;
    for e in entries.flatten() {
        let p = e.path();
        if e.file_name() == "block" {
            let first = std::fs::read_dir(&p).ok()?.flatten().next()?;
            return first.file_name().to_str().map(str::to_string);
        }
        if p.is_dir() && !p.is_symlink() {
            if let Some(n) = find_block(&p, depth - 1) {
                return Some(n);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(vid: u16, pid: u16, bcd: u16, ifs: &[(u8, u8, u8)]) -> Descriptor {
        Descriptor {
            bus: 3,
            address: 9,
            ports: vec![1, 4],
            vid,
            pid,
            bcd_usb: bcd,
            serial_index: 0,
            interfaces: ifs
                .iter()
                .enumerate()
                .map(|(n, t)| InterfaceClass {
                    number: n as u8,
                    class: t.0,
                    subclass: t.1,
                    protocol: t.2,
                })
                .collect(),
        }
    }

    #[test]
    fn rockchip_mode_from_bcd_is_marked_as_a_guess() {
        let f = classify(&desc(0x2207, 0x350b, 0x0200, &[ids::CLASS_ROCKUSB])).unwrap();
        assert_eq!((f.protocol, f.mode), (Protocol::Rockusb, Mode::Maskrom));
        assert!(f.mode_guessed);
        assert_eq!(f.soc.as_deref(), Some("RK3588"));
        assert_eq!(f.port_path, "3-1.4");
        let f = classify(&desc(0x2207, 0x350b, 0x0201, &[ids::CLASS_ROCKUSB])).unwrap();
        assert_eq!(f.mode, Mode::Loader);
    }

    #[test]
    fn class_beats_product_id() {
        // U-Boot fastboot on the RK3588 ROM's VID:PID is fastboot, not rockusb.
        let f = classify(&desc(0x2207, 0x350b, 0x0200, &[ids::CLASS_FASTBOOT])).unwrap();
        assert_eq!(f.protocol, Protocol::Fastboot);
        // Same for ums.
        let f = classify(&desc(0x2207, 0x350b, 0x0200, &[ids::CLASS_MASS_STORAGE])).unwrap();
        assert_eq!(f.protocol, Protocol::MassStorage);
        // Fastboot on an unknown VID is still fastboot.
        let f = classify(&desc(0x1234, 0x5678, 0x0200, &[ids::CLASS_FASTBOOT])).unwrap();
        assert_eq!(f.protocol, Protocol::Fastboot);
        // A random USB stick is not ours.
        assert!(classify(&desc(0x0781, 0x5567, 0x0200, &[ids::CLASS_MASS_STORAGE])).is_none());
        // Rockchip MSC-firmware PIDs (high byte zero) are not rockusb.
        assert!(classify(&desc(0x2207, 0x0010, 0x0200, &[(0xff, 0, 0)])).is_none());
    }

    #[test]
    fn rpiboot_stage_from_serial_index() {
        let mut d = desc(0x0a5c, 0x2711, 0x0200, &[(0xff, 0, 0)]);
        assert_eq!(classify(&d).unwrap().mode, Mode::Rom);
        d.serial_index = 3;
        assert_eq!(classify(&d).unwrap().mode, Mode::Rom);
        d.serial_index = 1;
        assert_eq!(classify(&d).unwrap().mode, Mode::FileServer);
        let two = desc(0x0a5c, 0x2764, 0x0200, &[(0xff, 0, 0), (0xff, 0, 0)]);
        assert_eq!(classify(&two).unwrap().interface, 1);
    }

    #[test]
    fn fel_and_th1520() {
        let f = classify(&desc(0x1f3a, 0xefe8, 0x0200, &[(0xff, 0xff, 0xff)])).unwrap();
        assert_eq!((f.protocol, f.mode), (Protocol::Fel, Mode::Fel));
        let f = classify(&desc(0x2345, 0x7654, 0x0200, &[(0xff, 0, 0)])).unwrap();
        assert_eq!(f.protocol, Protocol::Fastboot);
        assert_eq!(f.soc.as_deref(), Some("TH1520"));
    }
}
