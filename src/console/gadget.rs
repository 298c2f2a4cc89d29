//! The host side of `bootstrap --flash-via`: while U-Boot runs a USB gadget (`ums 0 mmc 0`,
//! `rockusb 0 mmc 0`, `fastboot usb 0`), find what the board became on this host's USB and
//! write the image through sbcflash's own writers, with all their checks.
//!
//! - `ums`: the board's storage becomes a USB disk. A udev monitor is opened *before* the
//!   gadget command is typed, so the disk's `add`/`change` event cannot be missed; the first
//!   whole disk with a non-zero size that matches [`UmsMatch`] and was not already present is
//!   written with the normal block writer ([`crate::target`] policy, O_EXCL, read-back).
//! - `rockusb` / `fastboot`: the board appears as a recovery-protocol device on the USB
//!   [`Bus`]; it is polled for, then written with [`crate::usb::flash`] (which reads rockusb
//!   back; fastboot has no read-back).
//!
//! Ending the gadget (Ctrl-C on the console) and resetting is the caller's job
//! ([`super::bootstrap`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::bootstrap::{FlashVia, Flasher};
use super::ConsoleError;
use crate::exit::{Classify, Exit};
use crate::progress::Reporter;
use crate::usb::discovery::{Bus, Found, Mode, Protocol};
use crate::usb::flash::{self, Outcome, Via, ViaOptions};

fn flash_err(via: FlashVia, msg: impl Into<String>, exit: Exit) -> ConsoleError {
    ConsoleError::Flash {
        via: via.name().to_string(),
        msg: msg.into(),
        exit,
    }
}

/// Which udev block device is the board's UMS gadget. All conditions must hold, and when
/// `ids` is not empty, the device's `ID_VENDOR_ID`/`ID_MODEL_ID` must be one of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UmsMatch {
    /// udev properties (`ID_BUS=usb`).
    pub(crate) props: Vec<(String, String)>,
    /// sysfs attributes (`attr:loop/backing_file=...`, for labs and tests).
    pub(crate) attrs: Vec<(String, String)>,
    /// Accepted USB ids; `None` as product = any product of that vendor.
    pub(crate) ids: Vec<(u16, Option<u16>)>,
}

impl UmsMatch {
    /// The default: a USB disk (`ID_BUS=usb`) with the gadget's id from the descriptor, else
    /// any id U-Boot gadgets are known to use (Rockchip's vendor id, the [`crate::usb::ids`]
    /// gadget table).
    pub(crate) fn default_for(id: Option<(u16, Option<u16>)>) -> UmsMatch {
        let ids = match id {
            Some(i) => vec![i],
            None => {
                let mut v = vec![(crate::usb::ids::VID_ROCKCHIP, None)];
                v.extend(
                    crate::usb::ids::GADGETS
                        .iter()
                        .map(|(vid, pid, _)| (*vid, Some(*pid))),
                );
                v
            }
        };
        UmsMatch {
            props: vec![("ID_BUS".into(), "usb".into())],
            attrs: Vec::new(),
            ids,
        }
    }

    /// `--ums-match` specs, which replace the default: `KEY=VALUE` (a udev property),
    /// `attr:NAME=VALUE` (a sysfs attribute) or `id:VID:PID` (hex; PID may be `*`).
    pub(crate) fn parse(specs: &[String]) -> Result<UmsMatch, String> {
        let mut m = UmsMatch::default();
        for s in specs {
            if let Some(id) = s.strip_prefix("id:") {
                let (v, p) = id
                    .split_once(':')
                    .ok_or_else(|| format!("--ums-match {s:?}: expected id:VID:PID"))?;
                let hex = |x: &str| {
                    u16::from_str_radix(x, 16)
                        .map_err(|e| format!("--ums-match {s:?}: {x:?} is not a hex id: {e}"))
                };
                let pid = if p == "*" { None } else { Some(hex(p)?) };
                m.ids.push((hex(v)?, pid));
                continue;
            }
            let (k, v) = s
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| {
                    format!("--ums-match {s:?}: expected KEY=VALUE, attr:NAME=VALUE or id:VID:PID")
                })?;
            match k.strip_prefix("attr:") {
                Some(a) => m.attrs.push((a.to_string(), v.to_string())),
                None => m.props.push((k.to_string(), v.to_string())),
            }
        }
        if m.props.is_empty() && m.attrs.is_empty() && m.ids.is_empty() {
            return Err("--ums-match: no conditions given".into());
        }
        Ok(m)
    }

    /// Whether a device with these properties and attributes matches.
    pub(crate) fn matches(
        &self,
        prop: &dyn Fn(&str) -> Option<String>,
        attr: &dyn Fn(&str) -> Option<String>,
    ) -> bool {
        let props_ok = self
            .props
            .iter()
            .all(|(k, v)| prop(k).is_some_and(|x| x.trim() == v));
        let attrs_ok = self
            .attrs
            .iter()
            .all(|(k, v)| attr(k).is_some_and(|x| x.trim() == v));
        let hex = |k: &str| prop(k).and_then(|x| u16::from_str_radix(x.trim(), 16).ok());
        let ids_ok = self.ids.is_empty()
            || match (hex("ID_VENDOR_ID"), hex("ID_MODEL_ID")) {
                (Some(v), Some(p)) => self
                    .ids
                    .iter()
                    .any(|(iv, ip)| *iv == v && ip.is_none_or(|ip| ip == p)),
                _ => false,
            };
        props_ok && attrs_ok && ids_ok
    }

    pub(crate) fn describe(&self) -> String {
        let mut v: Vec<String> = self.props.iter().map(|(k, x)| format!("{k}={x}")).collect();
        v.extend(self.attrs.iter().map(|(k, x)| format!("attr:{k}={x}")));
        if !self.ids.is_empty() {
            let ids: Vec<String> = self
                .ids
                .iter()
                .map(|(v, p)| match p {
                    Some(p) => format!("{v:04x}:{p:04x}"),
                    None => format!("{v:04x}:*"),
                })
                .collect();
            v.push(format!("USB id one of {}", ids.join(", ")));
        }
        v.join(", ")
    }
}

fn dev_matches(m: &UmsMatch, d: &udev::Device) -> bool {
    let prop = |k: &str| {
        d.property_value(k)
            .map(|v| v.to_string_lossy().into_owned())
    };
    let attr = |k: &str| {
        d.attribute_value(k)
            .map(|v| v.to_string_lossy().into_owned())
    };
    m.matches(&prop, &attr)
}

/// A whole disk with media (size in 512-byte sectors > 0).
fn is_disk_with_media(d: &udev::Device) -> bool {
    let disk = d.devtype().is_some_and(|t| t == "disk");
    let size = d
        .attribute_value("size")
        .and_then(|s| s.to_str())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    disk && size > 0
}

/// Watches udev for the UMS gadget's disk. Open it before the gadget command is sent.
pub(crate) struct UmsWatch {
    socket: crate::uevent::Monitor,
    before: HashSet<PathBuf>,
    m: UmsMatch,
}

impl UmsWatch {
    pub(crate) fn open(m: UmsMatch) -> Result<UmsWatch, ConsoleError> {
        let env = |e: std::io::Error| {
            flash_err(
                FlashVia::Ums,
                format!("udev monitor: {e}"),
                Exit::Environment,
            )
        };
        let socket = crate::uevent::Monitor::open(&["block"]).map_err(|e| {
            let msg = match e {
                crate::uevent::MonitorError::NoUdevd => {
                    format!("{e}: the new USB disk cannot be noticed")
                }
                crate::uevent::MonitorError::Io(_) => e.to_string(),
            };
            flash_err(FlashVia::Ums, msg, Exit::Environment)
        })?;
        // Matching disks already here are not the board's (another board, a stale gadget).
        let mut en = udev::Enumerator::new().map_err(env)?;
        en.match_subsystem("block").map_err(env)?;
        let before = en
            .scan_devices()
            .map_err(env)?
            .filter(|d| is_disk_with_media(d) && dev_matches(&m, d))
            .filter_map(|d| d.devnode().map(Path::to_path_buf))
            .collect();
        Ok(UmsWatch { socket, before, m })
    }

    /// Waits up to `timeout` for a new matching disk and returns its device node.
    pub(crate) fn wait(&mut self, timeout: Duration) -> Result<PathBuf, ConsoleError> {
        let deadline = Instant::now() + timeout;
        loop {
            for ev in self.socket.events() {
                let action = ev.action().map(|a| a.to_string_lossy().into_owned());
                if !matches!(action.as_deref(), Some("add" | "change")) {
                    continue;
                }
                if !is_disk_with_media(&ev) || !dev_matches(&self.m, &ev) {
                    continue;
                }
                let Some(node) = ev.devnode().map(Path::to_path_buf) else {
                    continue;
                };
                if !self.before.contains(&node) {
                    return Ok(node);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(flash_err(
                    FlashVia::Ums,
                    format!(
                        "no new USB disk appeared within {}s (matching {}); is the board's USB \
                         device port (OTG) connected to this host? labs with other ids: --ums-match",
                        timeout.as_secs(),
                        self.m.describe()
                    ),
                    Exit::Timeout,
                ));
            }
            // A failed wait only means looking again; the deadline still ends the loop.
            let _ = self
                .socket
                .wait((deadline - now).min(Duration::from_secs(1)));
        }
    }
}

/// What to write and how, for every gadget kind.
pub struct HostFlash {
    pub(crate) image: PathBuf,
    pub(crate) verify: bool,
    /// How long the board may take to show up on this host's USB.
    pub(crate) appear_timeout: Duration,
    pub(crate) ums_match: UmsMatch,
    /// Allow a UMS disk the target policy would refuse as not removable (`--force`).
    pub(crate) force: bool,
    /// Fastboot partition to flash (`mmc0` = the whole eMMC in U-Boot's fastboot).
    pub partition: Option<String>,
    /// The gadget's USB id for rockusb/fastboot, when the descriptor knows it.
    pub(crate) usb_id: Option<(u16, u16)>,
    pub(crate) bus: Box<dyn Bus>,
    pub(crate) reporter: Box<dyn Reporter>,
    watch: Option<UmsWatch>,
    /// One line per finished write, for the caller to print.
    pub written: Vec<String>,
}

impl HostFlash {
    pub fn new(image: PathBuf, bus: Box<dyn Bus>, reporter: Box<dyn Reporter>) -> HostFlash {
        HostFlash {
            image,
            verify: true,
            appear_timeout: Duration::from_secs(30),
            ums_match: UmsMatch::default_for(None),
            force: false,
            partition: None,
            usb_id: None,
            bus,
            reporter,
            watch: None,
            written: Vec::new(),
        }
    }

    fn open_image(&self, via: FlashVia) -> Result<crate::image::open::OpenedImage, ConsoleError> {
        crate::image::open::open_image(&self.image, &Default::default())
            .map_err(|e| flash_err(via, e.to_string(), e.exit()))
    }

    fn write_ums(&mut self, dev: &Path) -> Result<String, ConsoleError> {
        let via = FlashVia::Ums;
        let opened = self.open_image(via)?;
        let expected = {
            let side = crate::image::digest::sidecar_path(&self.image);
            if side.exists() {
                let d = crate::image::digest::read_sidecar(&side, &self.image)
                    .map_err(|e| flash_err(via, e.to_string(), e.exit()))?;
                Some(*d.as_bytes())
            } else {
                None
            }
        };
        let policy = crate::job::policy_for(&self.image, &opened, self.force);
        let mut target = crate::job::BlockJob::claim(dev, &policy, true)
            .map_err(|e| flash_err(via, e.to_string(), e.exit()))?;
        let job = target.name();
        let opts = crate::write::WriteOptions {
            verify: self.verify,
            expected_blake3: expected,
            job: job.clone(),
            image_name: self.image.display().to_string(),
            ..Default::default()
        };
        let report = target
            .write(opened.source, &opts, &*self.reporter)
            .map_err(|e| flash_err(via, format!("writing {job}: {e}"), e.exit()))?;
        Ok(report.summary_line(&job))
    }

    fn find_usb(&self, via: FlashVia) -> Result<Found, ConsoleError> {
        let (protocol, modes): (Protocol, &[Mode]) = match via {
            FlashVia::Rockusb => (Protocol::Rockusb, &[Mode::Loader, Mode::Maskrom]),
            _ => (Protocol::Fastboot, &[Mode::Fastboot]),
        };
        let waited = flash::wait_until(self.appear_timeout, &|| false, || {
            let all = self
                .bus
                .list()
                .map_err(|e| flash_err(via, e.to_string(), e.exit()))?;
            let mut hits: Vec<Found> = all
                .into_iter()
                .filter(|f| f.protocol == protocol && modes.contains(&f.mode))
                .filter(|f| self.usb_id.is_none_or(|(v, p)| f.vid == v && f.pid == p))
                .collect();
            if hits.len() > 1 {
                let v: Vec<String> = hits
                    .iter()
                    .map(|f| format!("{} at {}", f.id(), f.port_path))
                    .collect();
                return Err(flash_err(
                    via,
                    format!(
                        "several {} devices are attached ({}); cannot tell which is this board",
                        via.name(),
                        v.join(", ")
                    ),
                    Exit::BadInput,
                ));
            }
            Ok(hits.pop())
        })?;
        waited.map_err(|_| {
            flash_err(
                via,
                format!(
                    "no {} device appeared on USB within {}s; is the board's USB device port \
                     (OTG) connected to this host?",
                    via.name(),
                    self.appear_timeout.as_secs()
                ),
                Exit::Timeout,
            )
        })
    }

    fn write_usb(&mut self, via: FlashVia) -> Result<String, ConsoleError> {
        let found = self.find_usb(via)?;
        let mut o = ViaOptions::new(match via {
            FlashVia::Rockusb => Via::Usb,
            _ => Via::Fastboot,
        });
        o.port = Some(found.port_path.clone());
        o.verify = self.verify;
        // The console ends the gadget and resets; a USB reset would cut U-Boot short.
        o.reset = false;
        o.partition = self.partition.clone();
        o.job = format!("{} {}", via.name(), found.port_path);
        let opened = self.open_image(via)?;
        let out = flash::write_via(&*self.bus, &o, opened.source, &*self.reporter)
            .map_err(|e| flash_err(via, e.to_string(), e.exit()))?;
        Ok(match out {
            Outcome::Written {
                device,
                bytes_written,
                verified,
                ..
            } => format!(
                "wrote {bytes_written} bytes to {device}{}",
                if verified {
                    ", verified by reading back"
                } else {
                    " (not read back: the protocol cannot)"
                }
            ),
            Outcome::BlockDevice { path, .. } => {
                format!("the board became {}", path.display())
            }
        })
    }
}

impl Flasher for HostFlash {
    fn prepare(&mut self, via: FlashVia) -> Result<(), ConsoleError> {
        // Fail before touching the board when the image is unreadable.
        drop(self.open_image(via)?);
        if via == FlashVia::Fastboot && self.partition.is_none() {
            return Err(flash_err(
                via,
                "fastboot needs --flash-partition NAME (U-Boot's `mmc0` is the whole eMMC with CONFIG_FASTBOOT_MMC_USER_SUPPORT, or a GPT partition name)",
                Exit::Usage,
            ));
        }
        if via == FlashVia::Ums {
            self.watch = Some(UmsWatch::open(self.ums_match.clone())?);
        }
        Ok(())
    }

    fn flash(&mut self, via: FlashVia) -> Result<String, ConsoleError> {
        let line = match via {
            FlashVia::Ums => {
                let mut w = match self.watch.take() {
                    Some(w) => w,
                    None => UmsWatch::open(self.ums_match.clone())?,
                };
                let dev = w.wait(self.appear_timeout)?;
                self.reporter.report(crate::progress::Event::Message {
                    job: "ums".into(),
                    level: crate::progress::Level::Info,
                    text: format!("the board's storage appeared as {}", dev.display()),
                });
                self.write_ums(&dev)?
            }
            FlashVia::Rockusb | FlashVia::Fastboot => self.write_usb(via)?,
        };
        self.written.push(line.clone());
        Ok(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(kv: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| kv.iter().find(|(x, _)| *x == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn default_match_wants_a_usb_disk_with_a_gadget_id() {
        let none = |_: &str| None;
        let m = UmsMatch::default_for(None);
        let rk = lookup(&[
            ("ID_BUS", "usb"),
            ("ID_VENDOR_ID", "2207"),
            ("ID_MODEL_ID", "0010"),
        ]);
        assert!(m.matches(&rk, &none));
        let stick = lookup(&[
            ("ID_BUS", "usb"),
            ("ID_VENDOR_ID", "0781"),
            ("ID_MODEL_ID", "5567"),
        ]);
        assert!(!m.matches(&stick, &none), "a USB stick is not the board");
        let sata = lookup(&[
            ("ID_BUS", "ata"),
            ("ID_VENDOR_ID", "2207"),
            ("ID_MODEL_ID", "0010"),
        ]);
        assert!(!m.matches(&sata, &none));
        let pinned = UmsMatch::default_for(Some((0x1f3a, Some(0x1010))));
        assert!(!pinned.matches(&rk, &none));
    }

    #[test]
    fn override_specs() {
        let m = UmsMatch::parse(&[
            "ID_BUS=usb".into(),
            "attr:loop/backing_file=/x/emmc.img".into(),
            "id:0525:*".into(),
        ])
        .unwrap();
        assert_eq!(m.props, vec![("ID_BUS".into(), "usb".into())]);
        assert_eq!(
            m.attrs,
            vec![("loop/backing_file".into(), "/x/emmc.img".into())]
        );
        assert_eq!(m.ids, vec![(0x0525, None)]);
        let p = lookup(&[
            ("ID_BUS", "usb"),
            ("ID_VENDOR_ID", "0525"),
            ("ID_MODEL_ID", "a4a5"),
        ]);
        let a = lookup(&[("loop/backing_file", "/x/emmc.img\n")]);
        assert!(m.matches(&p, &a));
        assert!(UmsMatch::parse(&["nonsense".into()]).is_err());
        assert!(UmsMatch::parse(&["id:zz:1".into()]).is_err());
        assert!(UmsMatch::parse(&["=x".into()]).is_err());
    }
}
