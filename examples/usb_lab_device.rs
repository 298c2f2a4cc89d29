//! Test-only: serves one of sbcflash's simulated boards (`sbcflash::usb::sim`) as a real USB
//! device through Linux FunctionFS, in the USB lab guest (tests/harness/usb-lab). The same
//! model code that answers the in-process unit tests then answers real host tools
//! (rkdeveloptool, fastboot, sunxi-fel) and sbcflash's own rusb transport over a kernel USB
//! stack.
//!
//! An example, not a `[[bin]]`: `cargo build --release`, `cargo install` and the .deb (whose
//! assets name `target/release/sbcflash` only) never build or ship it; `cargo test` and
//! nextest build it next to the test binaries (`target/<profile>/examples/`).
//!
//! ```text
//! usb_lab_device PROTOCOL FFS_DIR GADGET BACKING [--max-download N] [--fault KIND@WHEN]...
//!                [--usbip VUDC:PORT] [--then-ums GADGET] [--files A,B,...]
//!   PROTOCOL  rockusb (RK3588 maskrom, then loader) | fastboot (partition "mmc") | fel (D1,
//!             DRAM at 0x40000000) | usbboot (CM4 boot ROM, then the file server asking for
//!             --files, then mass storage: BACKING.files/ gets what it was sent; `@short` in
//!             --files: short request replies, `@boot`: no Done, the board just boots on)
//!   FFS_DIR   the mounted FunctionFS instance (lab_ffs NAME → /dev/ffs-NAME)
//!   GADGET    the configfs gadget name, for re-enumeration and unplug (its UDC file)
//!   BACKING   the storage (eMMC, partition, DRAM): loaded at start, written back on SIGTERM
//!   KIND      stall | nak (never answers) | short (half an IN reply) | unplug | fail
//!   WHEN      tN: the N-th bulk transfer (0-based); oN: after N bulk OUT bytes
//!   --usbip   plug in through USB/IP instead of dummy_hcd: the gadget binds to usbip-vudc.N
//!             and is attached to vhci_hcd.0's port PORT through a relay that sets the device
//!             descriptor's iSerialNumber to the model's (rpiboot tells the ROM from its second
//!             stage by that index; configfs only ever gives 0 or 3)
//!   --then-ums once the model becomes a mass-storage device, GADGET (a configfs mass-storage
//!             gadget, not bound) takes its place on the same port
//! ```
//! Prints `READY` once the descriptors are in (then `lab_bind GADGET`).

use sbcflash::usb::sim::fastboot::FastbootDevice;
use sbcflash::usb::sim::fel::FelDevice;
use sbcflash::usb::sim::rockusb::{RockchipBoard, EMMC};
use sbcflash::usb::sim::usbboot::RpiBoard;
use sbcflash::usb::sim::{lock, Fault, FaultKind, Faults, SimDevice, Trigger, Xfer};
use sbcflash::usb::TransportError;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Model = Arc<Mutex<dyn SimDevice>>;
/// Copies the model's storage out, for the backing file (None: leave it), with a summary of
/// what it saw.
type Storage = Box<dyn Fn() -> (Option<Vec<u8>>, String) + Send>;

const HAS_FS: u32 = 1;
const HAS_HS: u32 = 2;
const ALL_CTRL_RECIP: u32 = 64;
const EVENT_SETUP: u8 = 4;

fn main() {
    if let Err(e) = run() {
        eprintln!("usb_lab_device: {e}");
        std::process::exit(2);
    }
}

struct Args {
    protocol: String,
    ffs: PathBuf,
    gadget: String,
    backing: PathBuf,
    max_download: u32,
    faults: Vec<Fault>,
    usbip: Option<(String, u32)>,
    then_ums: Option<String>,
    files: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let v: Vec<String> = std::env::args().skip(1).collect();
    if v.len() < 4 {
        return Err("usage: usb_lab_device PROTOCOL FFS_DIR GADGET BACKING [--max-download N] [--fault KIND@WHEN]...".into());
    }
    let mut a = Args {
        protocol: v[0].clone(),
        ffs: v[1].clone().into(),
        gadget: v[2].clone(),
        backing: v[3].clone().into(),
        max_download: 4 << 20,
        faults: Vec::new(),
        usbip: None,
        then_ums: None,
        files: Vec::new(),
    };
    let mut rest = v[4..].iter();
    while let Some(o) = rest.next() {
        let val = rest.next().ok_or(format!("{o} needs a value"))?;
        match o.as_str() {
            "--max-download" => {
                a.max_download = val.parse().map_err(|e| format!("--max-download: {e}"))?
            }
            "--fault" => a.faults.push(parse_fault(val)?),
            "--usbip" => {
                let (vudc, port) = val
                    .split_once(':')
                    .ok_or(format!("--usbip {val}: want VUDC:PORT"))?;
                let port = port.parse().map_err(|e| format!("--usbip {val}: {e}"))?;
                a.usbip = Some((vudc.to_string(), port));
            }
            "--then-ums" => a.then_ums = Some(val.clone()),
            "--files" => a.files = val.split(',').map(str::to_string).collect(),
            _ => return Err(format!("unknown option {o}")),
        }
    }
    Ok(a)
}

fn parse_fault(s: &str) -> Result<Fault, String> {
    let (kind, when) = s
        .split_once('@')
        .ok_or(format!("fault {s}: want KIND@WHEN"))?;
    let kind = match kind {
        "stall" => FaultKind::Stall,
        "nak" => FaultKind::Timeout,
        "short" => FaultKind::ShortRead,
        "unplug" => FaultKind::Vanish,
        "fail" => FaultKind::FailStatus,
        k => return Err(format!("fault kind {k}: want stall|nak|short|unplug|fail")),
    };
    let num = |t: &str| t.parse::<u64>().map_err(|e| format!("fault {s}: {e}"));
    let at = if let Some(n) = when.strip_prefix('t') {
        Trigger::Transfer(num(n)? as usize)
    } else if let Some(n) = when.strip_prefix('o') {
        Trigger::AfterBulkOut(num(n)?)
    } else {
        return Err(format!("fault {s}: WHEN is tN or oN"));
    };
    Ok(Fault { at, kind })
}

fn run() -> Result<(), String> {
    let a = parse_args()?;
    let data = std::fs::read(&a.backing).map_err(|e| format!("{}: {e}", a.backing.display()))?;
    let (model, storage): (Model, Storage) = match a.protocol.as_str() {
        "rockusb" => {
            let mut b = RockchipBoard::rk3588(0);
            b.storages.insert(EMMC, data);
            let b = Arc::new(Mutex::new(b));
            let s = b.clone();
            (
                b,
                Box::new(move || {
                    let b = lock(&s);
                    let downloads: Vec<(u16, usize, bool)> = b
                        .downloads
                        .iter()
                        .map(|d| (d.area, d.payload.len(), d.crc_ok))
                        .collect();
                    let summary = format!("downloads: {downloads:?} resets: {:?}", b.resets);
                    (Some(b.storage(EMMC).to_vec()), summary)
                }),
            )
        }
        "fastboot" => {
            let mut d = FastbootDevice::uboot(a.max_download, &[]);
            d.partitions.insert("mmc".into(), data);
            let d = Arc::new(Mutex::new(d));
            let s = d.clone();
            (
                d,
                Box::new(move || {
                    let d = lock(&s);
                    let summary =
                        format!("commands: {:?} downloads: {:?}", d.commands, d.downloads);
                    (
                        Some(d.partitions.get("mmc").cloned().unwrap_or_default()),
                        summary,
                    )
                }),
            )
        }
        "fel" => {
            let mut d = FelDevice::d1(0);
            d.dram = data;
            let d = Arc::new(Mutex::new(d));
            let s = d.clone();
            (
                d,
                Box::new(move || {
                    let d = lock(&s);
                    (Some(d.dram.clone()), format!("executed: {:?}", d.executed))
                }),
            )
        }
        "usbboot" => {
            // `@short`: short file requests; `@boot`: boot on without Done (see RpiBoard).
            let names: Vec<&str> = a
                .files
                .iter()
                .map(String::as_str)
                .filter(|n| !n.starts_with('@'))
                .collect();
            let mut b = RpiBoard::cm4(&names);
            b.short_requests = a.files.iter().any(|f| f == "@short");
            if a.files.iter().any(|f| f == "@boot") {
                b.boot_without_done();
            }
            let d = Arc::new(Mutex::new(b));
            let s = d.clone();
            let out = PathBuf::from(format!("{}.files", a.backing.display()));
            (
                d,
                Box::new(move || {
                    let d = lock(&s);
                    // What the host sent, for the script to compare with the boot files.
                    let _ = std::fs::create_dir_all(&out);
                    if let Some(b) = &d.second_stage {
                        let _ = std::fs::write(out.join("SECOND_STAGE"), b);
                    }
                    for (name, data) in &d.files {
                        if let Some(b) = data {
                            let _ = std::fs::write(out.join(name.replace('/', "_")), b);
                        }
                    }
                    let got: Vec<(&String, Option<usize>)> = d
                        .files
                        .iter()
                        .map(|(n, b)| (n, b.as_ref().map(Vec::len)))
                        .collect();
                    let summary = format!(
                        "stage: {:?} second stage: {:?} sizes: {:?} files: {got:?}",
                        d.stage,
                        d.second_stage.as_ref().map(Vec::len),
                        d.sizes
                    );
                    (None, summary)
                }),
            )
        }
        p => return Err(format!("protocol {p}: want rockusb|fastboot|fel|usbboot")),
    };
    save_on_sigterm(a.backing.clone(), storage)?;

    let desc = lock(&model)
        .descriptor()
        .ok_or("the model starts off the bus")?;
    let iface = desc.interfaces.first().ok_or("model has no interface")?;
    let mut ep0 = OpenOptions::new()
        .read(true)
        .write(true)
        .open(a.ffs.join("ep0"))
        .map_err(|e| format!("{}/ep0: {e}", a.ffs.display()))?;
    // Vendor requests to the device (the Rockchip ROM's 0x40/0x0c) reach us only with
    // ALL_CTRL_RECIP.
    ep0.write_all(&descriptors(
        (iface.class, iface.subclass, iface.protocol),
        ALL_CTRL_RECIP,
    ))
    .and_then(|_| ep0.write_all(&strings()))
    .map_err(|e| format!("writing descriptors: {e}"))?;
    let ep_in = open_ep(&a.ffs, "ep1")?;
    let ep_out = open_ep(&a.ffs, "ep2")?;
    println!("READY");

    let gadget = Gadget::new(&a.gadget, a.usbip.clone(), a.then_ums.clone());
    gadget.set_serial(desc.serial_index);
    if a.usbip.is_some() {
        // Over USB/IP the program plugs itself in (no lab_bind): wait for the descriptors
        // to be taken, then bind to the virtual UDC and attach.
        std::thread::sleep(Duration::from_millis(200));
        gadget.plug();
    }
    let m = model.clone();
    let g = gadget.clone();
    std::thread::spawn(move || control_loop(ep0, m, g));
    let mut faults = Faults::default();
    for f in a.faults {
        faults.add(f);
    }
    bulk_loop(ep_in, ep_out, model, gadget, faults);
    Ok(())
}

fn open_ep(dir: &Path, name: &str) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(name))
        .map_err(|e| format!("{}/{name}: {e}", dir.display()))
}

fn save_on_sigterm(path: PathBuf, storage: Storage) -> Result<(), String> {
    let mut sig = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM])
        .map_err(|e| format!("signals: {e}"))?;
    std::thread::spawn(move || {
        if sig.forever().next().is_some() {
            let (bytes, summary) = storage();
            eprintln!("usb_lab_device: {summary}");
            let Some(bytes) = bytes else {
                std::process::exit(0);
            };
            let rc = match std::fs::write(&path, bytes) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("usb_lab_device: saving {}: {e}", path.display());
                    1
                }
            };
            std::process::exit(rc);
        }
    });
    Ok(())
}

/// FunctionFS v2 descriptors: one interface (the model's class triple), bulk IN 0x81 + OUT 0x02
/// at full and high speed.
fn descriptors(class: (u8, u8, u8), flags: u32) -> Vec<u8> {
    let intf = [9, 4, 0, 0, 2, class.0, class.1, class.2, 1];
    let bulk = |addr: u8, mps: u16| {
        let m = mps.to_le_bytes();
        [7u8, 5, addr, 2, m[0], m[1], 0]
    };
    let mut body = Vec::new();
    body.extend_from_slice(&3u32.to_le_bytes());
    body.extend_from_slice(&3u32.to_le_bytes());
    for mps in [64, 512] {
        body.extend_from_slice(&intf);
        body.extend_from_slice(&bulk(0x81, mps));
        body.extend_from_slice(&bulk(0x02, mps));
    }
    let mut out = Vec::new();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(12 + body.len() as u32).to_le_bytes());
    out.extend_from_slice(&(HAS_FS | HAS_HS | flags).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn strings() -> Vec<u8> {
    let s = b"sbcflash sim\0";
    let mut out = Vec::new();
    out.extend_from_slice(&2u32.to_le_bytes());
    out.extend_from_slice(&(16 + 2 + s.len() as u32).to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&0x0409u16.to_le_bytes());
    out.extend_from_slice(s);
    out
}

/// The gadget's configfs UDC file: how the model leaves and re-joins the bus.
#[derive(Clone)]
struct Gadget {
    udc_file: PathBuf,
    udc: Arc<Mutex<Option<String>>>,
    /// Set from the model's re-enumeration until the gadget is back: a real ROM stops
    /// answering at once, while unplugging the gadget takes a moment (in-process, a handle
    /// opened before a re-enumeration sees the device gone at once, too).
    off: Arc<AtomicBool>,
    /// (usbip-vudc.N, vhci_hcd.0 port): plugged in through USB/IP.
    usbip: Option<(String, u32)>,
    /// The mass-storage gadget that takes over once the model is a USB disk.
    then_ums: Option<String>,
    /// The model's iSerialNumber index, for the USB/IP relay.
    serial: Arc<AtomicU8>,
}

const VHCI: &str = "/sys/devices/platform/vhci_hcd.0";

impl Gadget {
    fn new(name: &str, usbip: Option<(String, u32)>, then_ums: Option<String>) -> Self {
        Self {
            udc_file: udc_file(name),
            udc: Arc::new(Mutex::new(usbip.as_ref().map(|(v, _)| v.clone()))),
            off: Arc::new(AtomicBool::new(false)),
            usbip,
            then_ums,
            serial: Arc::new(AtomicU8::new(0)),
        }
    }
    fn set_serial(&self, index: u8) {
        self.serial.store(index, Ordering::SeqCst);
    }
    /// The model became a USB disk: from now on the mass-storage gadget is plugged.
    fn become_ums(&mut self) {
        if let Some(g) = self.then_ums.take() {
            eprintln!("usb_lab_device: {g} takes the port (mass storage)");
            self.udc_file = udc_file(&g);
        }
    }
    fn unplug(&self) {
        if let Some((_, port)) = &self.usbip {
            if let Err(e) = std::fs::write(Path::new(VHCI).join("detach"), port.to_string()) {
                eprintln!("usb_lab_device: vhci detach: {e}");
            }
        }
        if let Ok(u) = std::fs::read_to_string(&self.udc_file) {
            if !u.trim().is_empty() {
                *lock(&self.udc) = Some(u.trim().to_string());
            }
        }
        if let Err(e) = std::fs::write(&self.udc_file, "\n") {
            eprintln!("usb_lab_device: unplug: {e}");
        }
    }
    fn plug(&self) {
        let udc = lock(&self.udc).clone();
        if let Some(u) = udc {
            if let Err(e) = std::fs::write(&self.udc_file, &u) {
                eprintln!("usb_lab_device: plug: {e}");
            }
        }
        if let Some((vudc, port)) = &self.usbip {
            if let Err(e) = usbip_attach(vudc, *port, self.serial.clone()) {
                eprintln!("usb_lab_device: usbip attach: {e}");
            }
        }
    }
    /// The board re-enumerates (ROM → loader, reboot): off the bus, then back on the same port
    /// (as the mass-storage gadget when `to_ums`).
    fn reenumerate(&self, back: bool, to_ums: bool) {
        self.off.store(true, Ordering::SeqCst);
        let mut g = self.clone();
        std::thread::spawn(move || {
            // Let the host finish the transfer that made the board go (its status stage).
            std::thread::sleep(Duration::from_millis(100));
            g.unplug();
            if to_ums {
                g.become_ums();
            }
            if back {
                std::thread::sleep(Duration::from_millis(300));
                g.plug();
                g.off.store(false, Ordering::SeqCst);
            }
        });
    }
}

/// After a transfer (with the model still locked, so the bulk loop cannot answer for the board
/// in between): follow the model off the bus or through a re-enumeration.
fn follow<D: SimDevice + ?Sized>(d: &D, gen_before: u32, gadget: &Gadget) {
    if d.generation() != gen_before || d.descriptor().is_none() {
        let desc = d.descriptor();
        let back = desc.is_some();
        eprintln!("usb_lab_device: re-enumerating (back on the bus: {back})");
        if let Some(d) = &desc {
            gadget.set_serial(d.serial_index);
        }
        let to_ums = desc
            .and_then(|d| d.interfaces.first().map(|i| i.class == 0x08))
            .unwrap_or(false);
        gadget.reenumerate(back, to_ums);
    }
}

fn control_loop(mut ep0: File, model: Model, gadget: Gadget) {
    let mut buf = [0u8; 12 * 4];
    loop {
        let n = match ep0.read(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("usb_lab_device: ep0: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        for ev in buf[..n].chunks_exact(12) {
            if ev[8] != EVENT_SETUP {
                continue;
            }
            let (rt, req) = (ev[0], ev[1]);
            let value = u16::from_le_bytes([ev[2], ev[3]]);
            let index = u16::from_le_bytes([ev[4], ev[5]]);
            let len = u16::from_le_bytes([ev[6], ev[7]]) as usize;
            // rpiboot's ReadFile data may still sit in the bulk thread when its next request
            // arrives: let it reach the model first (bounded: a host that gave up goes on).
            for _ in 0..2000 {
                if !lock(&model).bulk_due() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let gen = lock(&model).generation();
            if rt & 0x80 != 0 {
                let mut data = vec![0u8; len];
                let r = {
                    let mut d = lock(&model);
                    let r = d.control_in(rt, req, value, index, &mut data);
                    follow(&*d, gen, &gadget);
                    r
                };
                match r {
                    Ok(k) => {
                        let _ = ep0.write(&data[..k]);
                    }
                    // Reading on an IN request halts ep0: the stall.
                    Err(_) => {
                        let _ = ep0.read(&mut []);
                    }
                }
            } else {
                let mut data = vec![0u8; len];
                let got = if len == 0 {
                    ep0.read(&mut []).map(|_| 0)
                } else {
                    ep0.read(&mut data)
                };
                match got {
                    Ok(k) => {
                        let mut d = lock(&model);
                        if let Err(e) = d.control_out(rt, req, value, index, &data[..k]) {
                            eprintln!(
                                "usb_lab_device: control OUT {rt:#04x}/{req:#04x} idx {index:#x}: {e} (data already taken)"
                            );
                        }
                        follow(&*d, gen, &gadget);
                    }
                    Err(e) => eprintln!("usb_lab_device: ep0 data: {e}"),
                }
            }
        }
    }
}

fn bulk_loop(mut ep_in: File, mut ep_out: File, model: Model, gadget: Gadget, mut faults: Faults) {
    loop {
        let (want_in, want_out, gen) = {
            let d = lock(&model);
            if gadget.off.load(Ordering::SeqCst) {
                (None, 0, 0)
            } else {
                (d.wire_in_len(), d.wire_out_len(), d.generation())
            }
        };
        if let Some(n) = want_in {
            let fault = faults.check(Xfer::BulkIn);
            if apply_common(fault, &model, &gadget) {
                continue;
            }
            let mut buf = vec![0u8; n];
            let r = {
                let mut d = lock(&model);
                let r = d.bulk_in(&mut buf);
                follow(&*d, gen, &gadget);
                r
            };
            match r {
                Ok(mut k) => {
                    if fault == Some(FaultKind::ShortRead) {
                        k /= 2;
                    }
                    if fault == Some(FaultKind::Stall) {
                        let _ = ep_in.read(&mut []);
                    } else if let Err(e) = ep_in.write_all(&buf[..k]) {
                        eprintln!("usb_lab_device: bulk IN: {e}");
                    }
                    faults.count(Xfer::BulkIn, k);
                }
                Err(TransportError::Stall) => {
                    let _ = ep_in.read(&mut []);
                }
                Err(e) => eprintln!("usb_lab_device: model bulk IN: {e}"),
            }
            continue;
        }
        if want_out == 0 {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        let fault = faults.check(Xfer::BulkOut);
        if apply_common(fault, &model, &gadget) {
            continue;
        }
        if fault == Some(FaultKind::Stall) {
            // Writing on an OUT endpoint halts it: the host's transfer stalls.
            let _ = ep_out.write(&[]);
            continue;
        }
        let mut buf = vec![0u8; want_out];
        let n = match ep_out.read(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                // Unbound (re-enumeration, unplug): wait for the host to come back.
                eprintln!("usb_lab_device: bulk OUT: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if n == 0 {
            continue;
        }
        faults.count(Xfer::BulkOut, n);
        let r = {
            let mut d = lock(&model);
            let r = d.bulk_out(&buf[..n]);
            follow(&*d, gen, &gadget);
            r
        };
        if let Err(e) = r {
            eprintln!("usb_lab_device: model rejected a {n}-byte bulk OUT: {e}");
            if e == TransportError::Stall {
                let _ = ep_out.write(&[]);
            }
        }
    }
}

/// Faults that do not depend on the direction. Returns true when the transfer must not happen.
fn apply_common(fault: Option<FaultKind>, model: &Model, gadget: &Gadget) -> bool {
    match fault {
        Some(FaultKind::Timeout) => {
            eprintln!("usb_lab_device: fault: never answering again");
            loop {
                std::thread::park();
            }
        }
        Some(FaultKind::Vanish) => {
            eprintln!("usb_lab_device: fault: unplugged");
            lock(model).vanish();
            gadget.unplug();
            loop {
                std::thread::park();
            }
        }
        Some(FaultKind::FailStatus) => {
            lock(model).fail_next_status();
            false
        }
        _ => false,
    }
}

fn udc_file(gadget: &str) -> PathBuf {
    Path::new("/sys/kernel/config/usb_gadget")
        .join(gadget)
        .join("UDC")
}

/// Export the gadget bound to `vudc` over USB/IP and attach it to vhci_hcd.0's `port`, with a
/// relay in between that sets the device descriptor's iSerialNumber to `serial` (the only
/// change: every other byte passes as the gadget sent it).
fn usbip_attach(vudc: &str, port: u32, serial: Arc<AtomicU8>) -> Result<(), String> {
    let (dev_side, relay_dev) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let (relay_host, host_side) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let sockfd = Path::new("/sys/devices/platform")
        .join(vudc)
        .join("usbip_sockfd");
    // After an unplug the vUDC takes a moment to become available again.
    let mut tries = 0;
    while let Err(e) = std::fs::write(&sockfd, dev_side.as_raw_fd().to_string()) {
        tries += 1;
        if tries > 100 {
            return Err(format!("{}: {e}", sockfd.display()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // port, socket, devid (bus 1, device port+2: any unique value), high speed
    let line = format!(
        "{port} {} {} 3",
        host_side.as_raw_fd(),
        (1 << 16) | (port + 2)
    );
    std::fs::write(Path::new(VHCI).join("attach"), &line)
        .map_err(|e| format!("{VHCI}/attach {line}: {e}"))?;
    // The kernel holds its own references to the two outer ends now.
    drop((dev_side, host_side));
    let pending: Arc<Mutex<HashMap<u32, (bool, bool)>>> = Arc::default();
    let (h_in, d_out) = (
        relay_host.try_clone().map_err(|e| e.to_string())?,
        relay_dev.try_clone().map_err(|e| e.to_string())?,
    );
    let p = pending.clone();
    std::thread::spawn(move || {
        let r = relay_commands(h_in, d_out, &p);
        eprintln!("usb_lab_device: usbip relay host→device ended: {r:?}");
    });
    std::thread::spawn(move || {
        let r = relay_replies(relay_dev, relay_host, &pending, &serial);
        eprintln!("usb_lab_device: usbip relay device→host ended: {r:?}");
    });
    Ok(())
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Bytes of ISO packet descriptors after a header (none for control and bulk transfers).
fn iso_len(h: &[u8]) -> usize {
    let n = be32(h, 32);
    if n == 0 || n == u32::MAX {
        0
    } else {
        n as usize * 16
    }
}

const CMD_SUBMIT: u32 = 1;
const RET_SUBMIT: u32 = 3;

/// vhci → gadget: USBIP_CMD_SUBMIT (48-byte header, OUT data) and CMD_UNLINK (header).
fn relay_commands(
    mut from: UnixStream,
    mut to: UnixStream,
    pending: &Mutex<HashMap<u32, (bool, bool)>>,
) -> std::io::Result<()> {
    let r = (|| loop {
        let mut h = [0u8; 48];
        from.read_exact(&mut h)?;
        let mut msg = h.to_vec();
        if be32(&h, 0) == CMD_SUBMIT {
            let is_in = be32(&h, 12) == 1;
            // GET_DESCRIPTOR(DEVICE) on ep0
            let dev_desc = be32(&h, 16) == 0 && h[40..44] == [0x80, 0x06, 0x00, 0x01];
            lock(pending).insert(be32(&h, 4), (is_in, dev_desc));
            let data = if is_in { 0 } else { be32(&h, 24) as usize };
            let mut rest = vec![0u8; data + iso_len(&h)];
            from.read_exact(&mut rest)?;
            msg.extend_from_slice(&rest);
        }
        to.write_all(&msg)?;
    })();
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
    r
}

/// gadget → vhci: USBIP_RET_SUBMIT (header, IN data) and RET_UNLINK (header); the device
/// descriptor gets the model's iSerialNumber.
fn relay_replies(
    mut from: UnixStream,
    mut to: UnixStream,
    pending: &Mutex<HashMap<u32, (bool, bool)>>,
    serial: &AtomicU8,
) -> std::io::Result<()> {
    let r = (|| loop {
        let mut h = [0u8; 48];
        from.read_exact(&mut h)?;
        let mut msg = h.to_vec();
        if be32(&h, 0) == RET_SUBMIT {
            let (is_in, dev_desc) = lock(pending).remove(&be32(&h, 4)).unwrap_or((false, false));
            let data = if is_in { be32(&h, 24) as usize } else { 0 };
            let mut rest = vec![0u8; data + iso_len(&h)];
            from.read_exact(&mut rest)?;
            if dev_desc && data > 16 {
                rest[16] = serial.load(Ordering::SeqCst);
            }
            msg.extend_from_slice(&rest);
        }
        to.write_all(&msg)?;
    })();
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
    r
}
