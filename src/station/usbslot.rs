//! USB slots: boards that arrive in a recovery mode on a configured port are flashed over
//! their recovery protocol instead of as a block device.
//!
//! The udev side is the same as for card readers (a `usb_device` event on the slot's port);
//! [`recovery_device`] reads the recovery mode out of the event with the same ID tables and
//! classifier as `sbcflash usb`. The job drives the board through a [`Bus`] (libusb, or the
//! simulated boards in tests), brought up by the same [`bring_up`] as `write --via`: Rockchip maskrom → loader download → re-enumeration on the same
//! port → [`RockusbSink`](crate::usb::rockusb::RockusbSink) through the writer pipeline (hashing, read-back) → identity files
//! into the FAT partition through the same sink → read back → reset. Raspberry Pi CM4/CM5
//! in usbboot: rpiboot (the boot files of `[usb] usbboot-dir`) → the mass-storage gadget's
//! disk on the same port ([`Bus::block_device`]) → the block job ([`super::job::write_block`]).
//! A board already in mass-storage mode when it arrives (rpiboot done elsewhere) goes straight
//! to that last step.
//!
//! A board re-enumerates twice in a normal job (after the loader download, and at the final
//! reset); the job says when that is expected ([`super::job::Cancel::usb_leaving`]) and which
//! bus address it is using, so a removal event for that address at any other time is an
//! unplug and fails the unit.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};

use super::job::{Cancel, Context, PhaseFollower, Step, WriteStats};
use super::slots::DeviceInfo;
use super::ui::SlotReporter;
use crate::usb::discovery::{classify, Bus, Descriptor, Found, InterfaceClass, Protocol};
use crate::usb::flash::{
    bring_up, storage_index, wait_until, Follow, Ready, Via, ViaOptions, WaitEnd,
};
use crate::write::Sink;

/// The port path (`1-2.1`) of a USB device: its sysfs name, the same as libusb's port path.
pub(crate) fn port_of(dev: &DeviceInfo) -> String {
    dev.syspath
        .rsplit('/')
        .next()
        .unwrap_or(&dev.syspath)
        .to_string()
}

fn hex16(s: &str) -> Option<u16> {
    u16::from_str_radix(s.trim(), 16).ok()
}

/// sysfs `version` (" 2.01") as bcdUSB (0x0201).
fn bcd_from_version(v: &str) -> Option<u16> {
    let (maj, min) = v.trim().split_once('.')?;
    Some((hex16(maj)? << 8) | hex16(min)?)
}

/// The recovery-mode board a udev `usb_device` event describes, if it is one: the event's
/// IDs (ID_VENDOR_ID/ID_MODEL_ID or PRODUCT), interfaces (ID_USB_INTERFACES), address
/// (BUSNUM/DEVNUM), port (sysfs name) and bcdUSB (sysfs `version`) run through the same
/// classifier as `sbcflash usb`.
pub(crate) fn recovery_device(dev: &DeviceInfo) -> Option<Found> {
    if !dev.is_usb_device() {
        return None;
    }
    let product: Vec<&str> = dev.prop("PRODUCT").unwrap_or("").split('/').collect();
    let vid = dev
        .prop("ID_VENDOR_ID")
        .and_then(hex16)
        .or_else(|| product.first().and_then(|v| hex16(v)))?;
    let pid = dev
        .prop("ID_MODEL_ID")
        .and_then(hex16)
        .or_else(|| product.get(1).and_then(|v| hex16(v)))?;
    let (bus, address) = dev.usb_address()?;
    let port = port_of(dev);
    let ports: Vec<u8> = port
        .split_once('-')
        .map(|(_, p)| p.split('.').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default();
    let interfaces = dev
        .prop("ID_USB_INTERFACES")
        .unwrap_or("")
        .split(':')
        .filter(|t| t.len() == 6)
        .enumerate()
        .filter_map(|(i, t)| {
            Some(InterfaceClass {
                number: i as u8,
                class: u8::from_str_radix(&t[0..2], 16).ok()?,
                subclass: u8::from_str_radix(&t[2..4], 16).ok()?,
                protocol: u8::from_str_radix(&t[4..6], 16).ok()?,
            })
        })
        .collect();
    let bcd_usb = dev
        .attrs
        .get("version")
        .and_then(|v| bcd_from_version(v))
        .unwrap_or(0x0200);
    classify(&Descriptor {
        bus,
        address,
        ports,
        vid,
        pid,
        bcd_usb,
        serial_index: 0,
        interfaces,
    })
}

/// The udev `usb_device` event for a board with descriptor `d`, with the properties and
/// attributes systemd-udevd reports for one (DEVPATH under an xHCI controller, BUSNUM,
/// DEVNUM, PRODUCT, ID_VENDOR_ID, ID_MODEL_ID, ID_USB_INTERFACES, ID_PATH). There is no USB
/// bus in CI: simulations and tests feed these to the station in place of the monitor's.
pub fn udev_event_for(d: &Descriptor, serial: &str) -> DeviceInfo {
    let mut chain = format!("usb{}", d.bus);
    for i in 1..=d.ports.len() {
        chain.push('/');
        chain.push_str(&crate::usb::discovery::port_path(d.bus, &d.ports[..i]));
    }
    let devpath = format!("/devices/pci0000:00/0000:00:14.0/{chain}");
    let ifs: String = d
        .interfaces
        .iter()
        .map(|i| format!("{:02x}{:02x}{:02x}:", i.class, i.subclass, i.protocol))
        .collect();
    let devname = format!("/dev/bus/usb/{:03}/{:03}", d.bus, d.address);
    let ports: Vec<String> = d.ports.iter().map(|p| p.to_string()).collect();
    let props: BTreeMap<String, String> = [
        ("DEVPATH", devpath.clone()),
        ("DEVNAME", devname.clone()),
        ("SUBSYSTEM", "usb".into()),
        ("DEVTYPE", "usb_device".into()),
        ("PRODUCT", format!("{:x}/{:x}/100", d.vid, d.pid)),
        ("TYPE", "0/0/0".into()),
        ("BUSNUM", format!("{:03}", d.bus)),
        ("DEVNUM", format!("{:03}", d.address)),
        ("ID_VENDOR_ID", format!("{:04x}", d.vid)),
        ("ID_MODEL_ID", format!("{:04x}", d.pid)),
        ("ID_USB_INTERFACES", format!(":{ifs}")),
        ("ID_SERIAL", serial.to_string()),
        (
            "ID_PATH",
            format!("pci-0000:00:14.0-usb-0:{}", ports.join(".")),
        ),
        (
            "USEC_INITIALIZED",
            format!("{}", 1_000_000 + d.address as u64),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let attrs: BTreeMap<String, String> = [
        (
            "version",
            format!("{:2x}.{:02x}", d.bcd_usb >> 8, d.bcd_usb & 0xff),
        ),
        ("idVendor", format!("{:04x}", d.vid)),
        ("idProduct", format!("{:04x}", d.pid)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    DeviceInfo {
        syspath: format!("/sys{devpath}"),
        devnode: Some(devname),
        subsystem: "usb".into(),
        devtype: Some("usb_device".into()),
        props,
        attrs,
        size: 0,
    }
}

/// The board on `port` speaking `protocol`, as the bus sees it now.
fn on_port(
    bus: &dyn Bus,
    port: &str,
    protocol: Protocol,
) -> Result<Option<Found>, crate::usb::Error> {
    Ok(bus
        .list()?
        .into_iter()
        .find(|f| f.port_path == port && f.protocol == protocol))
}

/// What one USB job works with, handed to each protocol's steps.
#[derive(Clone, Copy)]
struct UsbJob<'a> {
    ctx: &'a Context,
    bus: &'a (dyn Bus + Send + Sync),
    port: &'a str,
    files: &'a [(String, Vec<u8>)],
    cancel: &'a Arc<Cancel>,
    rep: &'a Arc<SlotReporter>,
    set: &'a (dyn Fn(Step) + Sync),
}

/// The job's side of a bring-up: the bus address in use and the expected re-enumerations go
/// to [`Cancel`] (so a removal of that address at any other time is an unplug), a cancelled
/// unit stops the waits, and the step shown moves to `on_leaving` when the board leaves.
struct Tracked<'a> {
    cancel: &'a Cancel,
    set: &'a (dyn Fn(Step) + Sync),
    on_leaving: Option<Step>,
}

impl Follow for Tracked<'_> {
    fn cancelled(&self) -> bool {
        self.cancel.is_set()
    }
    fn device(&self, now: &Found) {
        self.cancel.set_usb_address(now.bus, now.address);
    }
    fn leaving(&self, yes: bool) {
        if let Some(step) = self.on_leaving.filter(|_| yes) {
            (self.set)(step);
        }
        self.cancel.usb_leaving(yes);
    }
}

/// The session options `write --via` would use for the board on `port`, from `[usb]`.
fn via_options(ctx: &Context, port: &str, via: Via) -> ViaOptions {
    let mut opts = ViaOptions::new(via);
    opts.port = Some(port.to_string());
    opts.reenumerate_timeout = Duration::from_secs(ctx.station.usb.reenumerate_timeout_secs);
    opts.job = String::new();
    opts
}

/// Flash the board `dev` (a recovery-mode `usb_device` on a USB slot). Updates `set` as it
/// goes, so a FAIL names the step.
pub(super) fn provision(
    ctx: &Context,
    dev: &DeviceInfo,
    files: &[(String, Vec<u8>)],
    cancel: &Arc<Cancel>,
    rep: &Arc<SlotReporter>,
    set: &(dyn Fn(Step) + Sync),
) -> anyhow::Result<WriteStats> {
    let bus = ctx
        .usb
        .as_deref()
        .ok_or_else(|| anyhow!("no USB bus available to the station"))?;
    let cfg = &ctx.station.usb;
    let port = port_of(dev);
    let seen = recovery_device(dev)
        .ok_or_else(|| anyhow!("the device on port {port} is not in a USB recovery mode"))?;
    let job = UsbJob {
        ctx,
        bus,
        port: &port,
        files,
        cancel,
        rep,
        set,
    };
    if seen.protocol == Protocol::Usbboot {
        return provision_rpi(&job, &seen);
    }
    if seen.protocol == Protocol::MassStorage {
        return provision_gadget(&job, &seen);
    }
    if seen.protocol != Protocol::Rockusb {
        bail!(
            "{} ({:?} in {} mode) on port {port}: station USB slots flash Rockchip boards \
             (maskrom/loader) and Raspberry Pi boards (in usbboot, or already in mass-storage \
             mode) only; use `sbcflash write --via` for this board",
            seen.id(),
            seen.protocol,
            seen.mode
        );
    }
    let mut opts = via_options(ctx, &port, Via::Usb);
    opts.loader = cfg.loader.clone();
    opts.loader_hint = Some(format!(
        "set `loader` in [usb] of {}",
        ctx.station.path.display()
    ));
    opts.storage = Some(storage_index(&cfg.storage)?);
    opts.sectors_per_command = cfg.sectors_per_command;
    let follow = Tracked {
        cancel,
        set,
        on_leaving: Some(Step::Loader),
    };
    let (label, mut sink) = match bring_up(bus, &opts, rep.as_ref(), &follow)? {
        Ready::Rockusb { label, sink } => (label, sink),
        Ready::Block { path, .. } => bail!(
            "port {port}: the board became the block device {} instead of a rockusb loader",
            path.display()
        ),
    };
    set(Step::Write);
    rep.info(format!(
        "loader running; {} storage {}",
        cfg.storage,
        sink.capacity()
            .map_or_else(|| "of unknown size".to_string(), |c| format!("{c} bytes"))
    ));
    let source = ctx.image.open()?;
    let opts = crate::write::WriteOptions {
        verify: ctx.station.verify,
        expected_blake3: crate::write::parse_blake3_hex(&ctx.image.blake3),
        cancel: cancel.flag(),
        job: label.clone(),
        image_name: ctx.image.path.display().to_string(),
        readback_digest: true,
        delta: ctx.station.delta,
        retries: ctx.station.retries,
        reopen: Some({
            let image = ctx.image.clone();
            Arc::new(move || image.open())
        }),
        ..Default::default()
    };
    let follow = PhaseFollower {
        inner: rep.clone(),
        set,
    };
    let report = crate::write::run(source, &mut sink, &opts, &follow)?;
    if cancel.is_set() {
        bail!("cancelled");
    }
    let stats = WriteStats::of(&report);
    if !files.is_empty() {
        set(Step::Identity);
        let name = Path::new(&label);
        let size = sink.capacity().unwrap_or(ctx.image.size);
        let part = super::fatinject::inject_rw(
            SinkIo::new(&mut sink, size),
            name,
            ctx.station.fat_partition,
            files,
        )?;
        rep.info(format!(
            "wrote {} identity file(s) into FAT partition {}",
            files.len(),
            part.number
        ));
        if cancel.is_set() {
            bail!("cancelled");
        }
        if ctx.station.verify {
            set(Step::IdentityVerify);
            // A fresh reader: every sector comes from the board again (READ_LBA).
            super::fatinject::verify_rw(SinkIo::new(&mut sink, size), name, &part, files)?;
            rep.info("identity files read back from the board and match");
        }
    }
    if cfg.reset {
        set(Step::Reset);
        // The board reboots off the bus: that removal is the end of the job, not an unplug.
        cancel.usb_leaving(true);
        sink.reset()
            .with_context(|| format!("reset the board on port {port}"))?;
    }
    Ok(stats)
}

/// A Raspberry Pi (CM4/CM5, BCM2711/2712) in usbboot: rpiboot serves the configured boot
/// files (the mass-storage gadget) exactly as `sbcflash write --via usbboot` does, the board's
/// storage appears as a block device on the same port, and the block job writes it with
/// every safety rule of `write` (`target::open`, read-back, identity files, their read-back).
/// There is no reset: the gadget keeps serving until the operator unplugs the board.
fn provision_rpi(job: &UsbJob, seen: &Found) -> anyhow::Result<WriteStats> {
    let UsbJob {
        ctx,
        bus,
        port,
        cancel,
        rep,
        set,
        ..
    } = *job;
    let cfg = &ctx.station.usb;
    let dir = cfg.usbboot_dir.clone().ok_or_else(|| {
        anyhow!(
            "{} ({}) on port {port} is in usbboot and needs the rpiboot boot files: set \
             `usbboot-dir` in [usb] of {} (e.g. usbboot's mass-storage-gadget64)",
            seen.id(),
            seen.soc.as_deref().unwrap_or("Raspberry Pi"),
            ctx.station.path.display()
        )
    })?;
    set(Step::Usbboot);
    rep.info(format!(
        "{} ({}) in usbboot {} mode on port {port}",
        seen.id(),
        seen.soc.as_deref().unwrap_or("unknown SoC"),
        seen.mode
    ));
    cancel.set_usb_address(seen.bus, seen.address);
    // ROM → second stage → mass-storage gadget: the board leaves the bus twice on its own.
    cancel.usb_leaving(true);
    let mut opts = via_options(ctx, port, Via::Usbboot);
    opts.usbboot_dir = Some(dir);
    let follow = Tracked {
        cancel,
        set,
        on_leaving: None,
    };
    let out = match bring_up(bus, &opts, rep.as_ref(), &follow) {
        Ok(out) => out,
        // Its re-enumerations are expected, so an unplug during rpiboot shows up as a lost
        // or late device: say so when nothing is left on the port.
        Err(e) if bus.list()?.iter().all(|f| f.port_path != port) => {
            bail!("the board left port {port} during rpiboot (unplugged?): {e}")
        }
        Err(e) => return Err(e.into()),
    };
    let Ready::Block { path, .. } = out else {
        bail!("port {port}: rpiboot did not hand back a block device");
    };
    let gadget = on_port(bus, port, Protocol::MassStorage)?
        .ok_or_else(|| anyhow!("port {port}: the board left the bus after rpiboot"))?;
    write_gadget_disk(job, &gadget, &path)
}

/// A board that reaches its slot already in mass-storage mode (a CM4/CM5 whose rpiboot ran
/// before it was plugged here, or a bootloader's UMS gadget): there is nothing to boot, its
/// disk on the same port is the unit, written by the same block job as after rpiboot. The
/// disk may show up a moment after the `usb_device` event: wait for it as rpiboot does.
fn provision_gadget(job: &UsbJob, seen: &Found) -> anyhow::Result<WriteStats> {
    let (port, cancel) = (job.port, job.cancel);
    job.rep.info(format!(
        "{} ({}) already in mass-storage mode on port {port}",
        seen.id(),
        seen.soc.as_deref().unwrap_or("a USB gadget")
    ));
    cancel.set_usb_address(seen.bus, seen.address);
    cancel.usb_leaving(false);
    let secs = job.ctx.station.usb.reenumerate_timeout_secs;
    let waited = wait_until(Duration::from_secs(secs), &|| cancel.is_set(), || {
        Ok::<_, std::convert::Infallible>(job.bus.block_device(port))
    });
    let path = match waited {
        Ok(Ok(p)) => p,
        Ok(Err(WaitEnd::Cancelled)) => bail!("cancelled"),
        Ok(Err(WaitEnd::TimedOut)) => bail!(
            "{} in mass-storage mode on port {port}: no disk appeared for it within {secs} s \
             (no medium behind the gadget, or it is not a disk)",
            seen.id()
        ),
        Err(never) => match never {},
    };
    write_gadget_disk(job, seen, &path)
}

/// The block job on the disk `path` of the mass-storage gadget `gadget` on `port`. From
/// here the gadget is the board: its removal is an unplug.
fn write_gadget_disk(job: &UsbJob, gadget: &Found, path: &Path) -> anyhow::Result<WriteStats> {
    let (port, cancel) = (job.port, job.cancel);
    cancel.set_usb_address(gadget.bus, gadget.address);
    cancel.usb_leaving(false);
    if cancel.is_set() {
        bail!("cancelled");
    }
    job.rep.info(format!(
        "the board's storage on port {port} is {}",
        path.display()
    ));
    super::job::write_block(job.ctx, path, job.files, cancel, job.rep, job.set, true)
}

/// `Read + Write + Seek` over a writer [`Sink`] (its `read_at`/`write_at`), so `fatfs` can
/// work on a board's storage through the same rockusb session that wrote the image. Reads
/// are cached in aligned 64 KiB chunks (fatfs reads FAT entries a few bytes at a time, and
/// each uncached read would be a READ_LBA round trip); writes go straight through and update
/// the cached chunk.
pub(crate) struct SinkIo<'s> {
    sink: &'s mut dyn Sink,
    pos: u64,
    size: u64,
    cache: Vec<u8>,
    cache_at: Option<u64>,
}

const CHUNK: u64 = 64 * 1024;

impl<'s> SinkIo<'s> {
    pub(crate) fn new(sink: &'s mut dyn Sink, size: u64) -> Self {
        SinkIo {
            sink,
            pos: 0,
            size,
            cache: Vec::new(),
            cache_at: None,
        }
    }
}

fn io_other(e: crate::write::WriteError) -> std::io::Error {
    std::io::Error::other(e)
}

impl Read for SinkIo<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || out.is_empty() {
            return Ok(0);
        }
        let base = self.pos / CHUNK * CHUNK;
        if self.cache_at != Some(base) {
            let len = (self.size - base).min(CHUNK) as usize;
            self.cache.resize(len, 0);
            self.cache_at = None;
            self.sink.read_at(base, &mut self.cache).map_err(io_other)?;
            self.cache_at = Some(base);
        }
        let off = (self.pos - base) as usize;
        let n = out.len().min(self.cache.len() - off);
        out[..n].copy_from_slice(&self.cache[off..off + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for SinkIo<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = (data.len() as u64).min(self.size.saturating_sub(self.pos)) as usize;
        if n == 0 && !data.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "write past the end of the storage",
            ));
        }
        self.sink.write_at(self.pos, &data[..n]).map_err(io_other)?;
        if let Some(at) = self.cache_at {
            let (s, e) = (
                self.pos.max(at),
                (self.pos + n as u64).min(at + self.cache.len() as u64),
            );
            if s < e {
                self.cache[(s - at) as usize..(e - at) as usize]
                    .copy_from_slice(&data[(s - self.pos) as usize..(e - self.pos) as usize]);
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.sink.sync().map_err(io_other)
    }
}

impl Seek for SinkIo<'_> {
    fn seek(&mut self, p: SeekFrom) -> std::io::Result<u64> {
        self.pos = super::fatinject::seek_in_window(self.pos, self.size, p)?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usb::discovery::Mode;

    fn rk(address: u8, bcd: u16) -> Descriptor {
        Descriptor {
            bus: 1,
            address,
            ports: vec![2, 1],
            vid: 0x2207,
            pid: 0x350b,
            bcd_usb: bcd,
            serial_index: 0,
            interfaces: vec![InterfaceClass {
                number: 0,
                class: 0xff,
                subclass: 0x06,
                protocol: 0x05,
            }],
        }
    }

    #[test]
    fn udev_shaped_event_round_trips_through_the_classifier() {
        let ev = udev_event_for(&rk(5, 0x0200), "");
        assert_eq!(port_of(&ev), "1-2.1");
        assert!(ev.syspath.ends_with("/usb1/1-2/1-2.1"), "{}", ev.syspath);
        assert_eq!(ev.usb_address(), Some((1, 5)));
        let f = recovery_device(&ev).unwrap();
        assert_eq!(f.port_path, "1-2.1");
        assert_eq!((f.protocol, f.mode), (Protocol::Rockusb, Mode::Maskrom));
        assert_eq!(f.soc.as_deref(), Some("RK3588"));
        let f = recovery_device(&udev_event_for(&rk(6, 0x0201), "")).unwrap();
        assert_eq!(f.mode, Mode::Loader);
        // A keyboard on the same port is not a recovery device.
        let mut kb = rk(7, 0x0200);
        kb.vid = 0x046d;
        kb.interfaces[0].class = 3;
        assert!(recovery_device(&udev_event_for(&kb, "")).is_none());
    }

    #[test]
    fn sink_io_reads_what_it_wrote_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, vec![7u8; 200_000]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let mut sink = crate::write::sink::FileSink::new(f, p.display().to_string()).unwrap();
        let mut io = SinkIo::new(&mut sink, 200_000);
        let mut b = [0u8; 10];
        io.seek(SeekFrom::Start(65_530)).unwrap();
        io.read_exact(&mut b).unwrap();
        assert_eq!(b, [7; 10]);
        io.seek(SeekFrom::Start(65_532)).unwrap();
        io.write_all(&[1, 2, 3, 4, 5, 6]).unwrap();
        io.seek(SeekFrom::Start(65_530)).unwrap();
        io.read_exact(&mut b).unwrap();
        assert_eq!(b, [7, 7, 1, 2, 3, 4, 5, 6, 7, 7]);
        assert!(io.seek(SeekFrom::End(0)).unwrap() == 200_000);
        assert_eq!(io.read(&mut b).unwrap(), 0);
    }
}
