//! Whole `sbcflash write --via …` sessions: find the board, bring it into a mode that can
//! write storage, stream the image, verify, reset.
//!
//! Everything goes through a [`Bus`], so the same code runs against libusb and against the
//! simulated boards in `super::sim`.

use super::discovery::{Bus, Found, Mode, Protocol};
use super::fastboot::{Fastboot, SparseEncoder};
use super::rkloader::Loader;
use super::rockusb::{self, RockusbSink, StorageIndex, Timeouts};
use super::usbboot::{self, DirProvider};
use super::{ids, Error};
use crate::exit::Classify;
use crate::image::{Extent, ExtentKind, ExtentSource, ImageError};
use crate::progress::Phase;
use crate::progress::{Event, Level, Reporter};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How to reach the board's storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// Rockchip: download a loader to the boot ROM, then write with rockusb.
    Maskrom,
    /// Rockchip: whatever mode the board is in (download a loader only if in maskrom).
    Usb,
    /// Raspberry Pi: boot the mass-storage gadget with rpiboot, then write the block device.
    Usbboot,
    /// Fastboot `flash` of one partition.
    Fastboot,
}

/// Storage names the CLI accepts, mapped to rockusb storage indices.
pub(crate) fn storage_index(name: &str) -> Result<StorageIndex, Error> {
    Ok(match name {
        "emmc" => StorageIndex::Emmc,
        "sd" => StorageIndex::Sd0,
        // rkbin's RK35xx loaders put SPI NOR at index 9 (rkdeveloptool#106).
        "spi" | "spinor" => StorageIndex::MtdBlkSpiNor,
        "spinand" => StorageIndex::SpiNand,
        other => {
            return Err(Error::Input(format!(
                "unknown storage '{other}' (expected emmc, sd, spi or spinand)"
            )))
        }
    })
}

/// Everything a session needs besides the image. Board descriptors fill most of it.
#[derive(Debug, Clone)]
pub struct ViaOptions {
    pub(crate) via: Via,
    /// Only consider the device on this port path (`1-2.1`).
    pub(crate) port: Option<String>,
    /// Only consider this VID:PID (from the board descriptor).
    pub(crate) id: Option<(u16, u16)>,
    /// `--loader`: one merged boot_merger file, or raw 0x471 + 0x472 blobs.
    pub loader: Vec<PathBuf>,
    pub storage: Option<StorageIndex>,
    pub(crate) verify: bool,
    pub reset: bool,
    pub(crate) sectors_per_command: u16,
    /// How long a board may take to come back after a stage (loader, rpiboot second stage).
    pub reenumerate_timeout: Duration,
    pub usbboot_dir: Option<PathBuf>,
    pub partition: Option<String>,
    pub timeouts: Timeouts,
    /// Name of the job in progress events.
    pub(crate) job: String,
    /// Bootloader files placed after the image through the same rockusb session and read
    /// back (`write --via maskrom|usb --bootloader`); rockusb only.
    pub placements: Vec<crate::board::PlacedFile>,
    /// What to do when a board in maskrom needs a loader and none is given (the station
    /// names its config); `None`: the CLI's flags.
    pub(crate) loader_hint: Option<String>,
    /// `write --delta` over rockusb: read the board's storage first, write what differs.
    pub delta: bool,
}

impl ViaOptions {
    pub fn new(via: Via) -> Self {
        Self {
            via,
            port: None,
            id: None,
            loader: Vec::new(),
            storage: None,
            verify: true,
            reset: true,
            sectors_per_command: rockusb::DEFAULT_SECTORS_PER_COMMAND,
            reenumerate_timeout: Duration::from_secs(15),
            usbboot_dir: None,
            partition: None,
            timeouts: Timeouts::default(),
            job: "usb".into(),
            placements: Vec::new(),
            loader_hint: None,
            delta: false,
        }
    }
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Outcome {
    /// The image is on the board's storage.
    Written {
        device: String,
        image_size: u64,
        bytes_written: u64,
        bytes_skipped: u64,
        verified: bool,
    },
    /// The board now exposes its storage as this block device; the block writer continues.
    BlockDevice { device: String, path: PathBuf },
}

struct Progress<'a> {
    rep: &'a dyn Reporter,
    job: String,
}

impl Progress<'_> {
    fn start(&self, phase: Phase, total: Option<u64>, detail: Option<String>) {
        self.rep.report(Event::Start {
            job: self.job.clone(),
            phase,
            total,
            detail,
        });
    }
    fn at(&self, phase: Phase, done: u64, total: Option<u64>) {
        self.rep.report(Event::Progress {
            job: self.job.clone(),
            phase,
            done,
            total,
        });
    }
    fn finish(&self, phase: Phase, summary: serde_json::Value) {
        self.rep.report(Event::Finish {
            job: self.job.clone(),
            phase,
            summary,
        });
    }
    fn note(&self, text: String) {
        self.rep.report(Event::Message {
            job: self.job.clone(),
            level: Level::Info,
            text,
        });
    }
    fn fail(&self, phase: Phase, e: &Error) {
        self.rep.report(Event::Error {
            job: self.job.clone(),
            phase,
            message: e.to_string(),
            exit_code: e.exit().code(),
        });
    }
}

fn describe_all(list: &[Found]) -> String {
    if list.is_empty() {
        return "no recovery-mode USB devices are attached".into();
    }
    let v: Vec<String> = list
        .iter()
        .map(|f| {
            format!(
                "{} {:?} in {} at {}",
                f.id(),
                f.protocol,
                f.mode,
                f.port_path
            )
        })
        .collect();
    format!("attached: {}", v.join("; "))
}

/// The one device matching `protocol` and the options' filters.
fn find_one(
    bus: &dyn Bus,
    opts: &ViaOptions,
    protocol: Protocol,
    modes: &[Mode],
    port: Option<&str>,
) -> Result<Option<Found>, Error> {
    let all = bus.list()?;
    let mut hits: Vec<Found> = all
        .iter()
        .filter(|f| f.protocol == protocol && modes.contains(&f.mode))
        .filter(|f| port.is_none_or(|p| f.port_path == p))
        .filter(|f| opts.port.as_deref().is_none_or(|p| f.port_path == p))
        .filter(|f| opts.id.is_none_or(|(v, p)| f.vid == v && f.pid == p))
        .cloned()
        .collect();
    match hits.len() {
        0 => Ok(None),
        1 => Ok(hits.pop()),
        _ => Err(Error::Input(format!(
            "several matching boards are attached ({}); choose one with --port",
            describe_all(&hits)
        ))),
    }
}

fn require_one(
    bus: &dyn Bus,
    opts: &ViaOptions,
    protocol: Protocol,
    modes: &[Mode],
    what: &str,
) -> Result<Found, Error> {
    match find_one(bus, opts, protocol, modes, None)? {
        Some(f) => Ok(f),
        None => {
            let all = bus.list()?;
            Err(Error::NotFound(format!(
                "no {what} found ({})",
                describe_all(&all)
            )))
        }
    }
}

/// How a [`wait_until`] ended without its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitEnd {
    TimedOut,
    Cancelled,
}

/// The one deadline poll of every USB bring-up (re-enumeration, a gadget appearing, a disk
/// on a port): ask `check` every 100 ms until it answers, `timeout` passes or `cancelled`
/// says stop. `check`'s own errors end the wait; each caller words the timeout itself.
pub(crate) fn wait_until<T, E>(
    timeout: Duration,
    cancelled: &dyn Fn() -> bool,
    mut check: impl FnMut() -> Result<Option<T>, E>,
) -> Result<Result<T, WaitEnd>, E> {
    let deadline = Instant::now() + timeout;
    loop {
        if cancelled() {
            return Ok(Err(WaitEnd::Cancelled));
        }
        if let Some(f) = check()? {
            return Ok(Ok(f));
        }
        if Instant::now() >= deadline {
            return Ok(Err(WaitEnd::TimedOut));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// [`wait_until`] for the bus, with the timeout as [`Error::Timeout`] naming `what`.
fn wait_for<T>(
    timeout: Duration,
    what: &str,
    follow: &dyn Follow,
    check: impl FnMut() -> Result<Option<T>, Error>,
) -> Result<T, Error> {
    match wait_until(timeout, &|| follow.cancelled(), check)? {
        Ok(t) => Ok(t),
        Err(WaitEnd::Cancelled) => Err(Error::Cancelled),
        Err(WaitEnd::TimedOut) => Err(Error::Timeout {
            what: what.into(),
            secs: timeout.as_secs().max(1),
        }),
    }
}

/// What a caller that tracks the board while it is brought up (the station, which must tell
/// an unplug from a re-enumeration) learns, and how it stops a wait. `write --via` tracks
/// nothing: [`Untracked`].
pub(crate) trait Follow {
    /// Stop waiting (the unit was cancelled): the bring-up ends with [`Error::Cancelled`].
    fn cancelled(&self) -> bool {
        false
    }
    /// The board is at this bus address now.
    fn device(&self, _now: &Found) {}
    /// The board is about to leave the bus on purpose (`true`: loader start, rpiboot stages)
    /// or is back for good (`false`).
    fn leaving(&self, _yes: bool) {}
}

/// Follows nothing, never cancelled.
pub(crate) struct Untracked;
impl Follow for Untracked {}

/// A board in recovery mode made ready to take an image.
pub(crate) enum Ready {
    /// A Rockchip board running a loader: its storage as a writer sink ("VID:PID at PORT").
    Rockusb { label: String, sink: RockusbSink },
    /// The board's storage is this block device on the same port (rpiboot's gadget).
    Block { path: PathBuf },
}

/// Bring the board `opts` names (by `port`/`id`) from its recovery mode to [`Ready`]:
/// Rockchip maskrom → loader download → re-enumeration → rockusb sink (storage selected,
/// `sectors_per_command` set); Raspberry Pi usbboot → rpiboot → its mass-storage disk. Shared
/// by `write --via`, `bootstrap --flash-via rockusb` and the station's USB slots.
pub(crate) fn bring_up(
    bus: &dyn Bus,
    opts: &ViaOptions,
    rep: &dyn Reporter,
    follow: &dyn Follow,
) -> Result<Ready, Error> {
    let p = Progress {
        rep,
        job: opts.job.clone(),
    };
    match opts.via {
        Via::Maskrom | Via::Usb => rockchip_ready(bus, opts, &p, follow)
            .map(|(label, sink)| Ready::Rockusb { label, sink }),
        Via::Usbboot => rpiboot(bus, opts, &p, follow).map(|(_, path)| Ready::Block { path }),
        Via::Fastboot => Err(Error::Input(
            "fastboot needs no bring-up: the device is written as it is".into(),
        )),
    }
}

/// Run a whole session. For [`Via::Usbboot`] the image is not touched: the result names the
/// block device the caller writes with the normal block writer.
pub fn write_via(
    bus: &dyn Bus,
    opts: &ViaOptions,
    src: Box<dyn ExtentSource>,
    rep: &dyn Reporter,
) -> Result<Outcome, Error> {
    let p = Progress {
        rep,
        job: opts.job.clone(),
    };
    let r = match opts.via {
        Via::Maskrom | Via::Usb => rockchip_ready(bus, opts, &p, &Untracked)
            .and_then(|(label, sink)| write_rockusb(opts, label, sink, src, &p)),
        Via::Fastboot => {
            let mut src = src;
            fastboot(bus, opts, &mut *src, &p)
        }
        Via::Usbboot => rpiboot(bus, opts, &p, &Untracked)
            .map(|(device, path)| Outcome::BlockDevice { device, path }),
    };
    if let Err(e) = &r {
        p.fail(Phase::Usb, e);
    }
    r
}

fn rockchip_ready(
    bus: &dyn Bus,
    opts: &ViaOptions,
    p: &Progress<'_>,
    follow: &dyn Follow,
) -> Result<(String, RockusbSink), Error> {
    let dev = require_one(
        bus,
        opts,
        Protocol::Rockusb,
        &[Mode::Maskrom, Mode::Loader],
        "Rockchip board in maskrom or loader mode",
    )?;
    follow.device(&dev);
    let label = format!("{} at {}", dev.id(), dev.port_path);
    // bcdUSB is only a hint: ask the device.
    let in_loader = {
        let mut t = bus.open(&dev)?;
        rockusb::probe_loader(&mut *t, &opts.timeouts)
    };
    p.note(format!(
        "found {} ({}) in {} mode at {}",
        dev.id(),
        dev.soc.as_deref().unwrap_or("unknown SoC"),
        if in_loader { "loader" } else { "maskrom" },
        dev.port_path
    ));
    let dev = if in_loader {
        if opts.via == Via::Maskrom {
            return Err(Error::WrongMode(format!(
                "{label} is already in loader mode, but --via maskrom was asked for: a loader \
                 cannot be downloaded now (rkdeveloptool's \"does not support this operation\"). \
                 Use --via usb to write with the running loader, or reset the board into maskrom"
            )));
        }
        dev
    } else {
        start_loader(bus, opts, dev, &label, p, follow)?
    };
    let t = bus.open(&dev)?;
    let mut sink = RockusbSink::open(t, label.clone(), opts.timeouts, opts.storage)?;
    sink.sectors_per_command = opts.sectors_per_command;
    Ok((label, sink))
}

/// Download the loader to a board in maskrom and wait until it answers as a loader on the
/// same port; returns it at its new address.
fn start_loader(
    bus: &dyn Bus,
    opts: &ViaOptions,
    dev: Found,
    label: &str,
    p: &Progress<'_>,
    follow: &dyn Follow,
) -> Result<Found, Error> {
    if opts.loader.is_empty() {
        return Err(Error::WrongMode(match &opts.loader_hint {
            Some(hint) => format!("{label} is in maskrom and needs a loader: {hint}"),
            None => format!(
                "{label} is in maskrom: it needs a loader first (give --loader FILE, a \
                 boot_merger .bin or the raw 0x471/0x472 pair, or a board whose descriptor \
                 names one)"
            ),
        }));
    }
    let rc4 = ids::rockchip_soc(dev.pid).is_some_and(|s| s.rc4);
    let loader = Loader::from_files(&opts.loader, rc4)?;
    if let (Some(lc), Some(soc)) = (&loader.chip, ids::rockchip_soc(dev.pid)) {
        if !soc.name.contains(lc.trim_start_matches("RK")) {
            return Err(Error::BadLoader {
                path: loader.origin.clone(),
                msg: format!("loader is for {lc} but the board is {}", soc.name),
            });
        }
    }
    // The ROM leaves the bus and the loader enumerates at a new address.
    follow.leaving(true);
    let total: u64 = loader.entries.iter().map(|e| e.data.len() as u64).sum();
    p.start(Phase::Loader, Some(total), Some(loader.origin.clone()));
    {
        let mut t = bus.open(&dev)?;
        rockusb::download_loader(&mut *t, &loader, &opts.timeouts, &mut |d, t| {
            p.at(Phase::Loader, d, Some(t))
        })?;
    }
    p.finish(Phase::Loader, serde_json::json!({ "bytes": total }));
    let port = dev.port_path.clone();
    let back = wait_for(
        opts.reenumerate_timeout,
        &format!(
            "the board on port {port} to come back in loader mode after the loader download \
             (wrong loader for this SoC, a loader that does not start USB, or a flaky cable/port)"
        ),
        follow,
        || {
            let modes = [Mode::Maskrom, Mode::Loader];
            let Some(f) = find_one(bus, opts, Protocol::Rockusb, &modes, Some(&port))? else {
                return Ok(None);
            };
            let Ok(mut t) = bus.open(&f) else {
                return Ok(None);
            };
            Ok(rockusb::probe_loader(&mut *t, &opts.timeouts).then_some(f))
        },
    )?;
    follow.device(&back);
    follow.leaving(false);
    Ok(back)
}

/// The image through the writer pipeline onto a ready rockusb sink, then reset.
fn write_rockusb(
    opts: &ViaOptions,
    label: String,
    mut sink: RockusbSink,
    src: Box<dyn ExtentSource>,
    p: &Progress<'_>,
) -> Result<Outcome, Error> {
    p.note(format!(
        "loader running; storage {}",
        crate::write::Sink::capacity(&sink)
            .map_or_else(|| "size unknown".to_string(), |c| format!("{c} bytes"))
    ));
    // The block writer's pipeline: hashing, partition table written last, read-back.
    let wopts = crate::write::WriteOptions {
        verify: opts.verify,
        delta: opts.delta,
        job: opts.job.clone(),
        image_name: src.describe(),
        ..Default::default()
    };
    let report = crate::write::run(src, &mut sink, &wopts, p.rep)?;
    if !opts.placements.is_empty() {
        use crate::board::BoardError as B;
        crate::board::place::write_placed(&mut sink, &opts.placements).map_err(|e| match e {
            B::Target(w) => Error::Write(w),
            B::Placement(m) => Error::Verify(m),
            other => Error::Input(other.to_string()),
        })?;
    }
    if opts.reset {
        sink.reset()?;
    }
    Ok(Outcome::Written {
        device: label,
        image_size: report.image_size,
        // rockusb cannot leave a range unwritten and trust it to read as zeroes: known-zero
        // ranges went over the cable as zeroes, so they count as written, not as skipped (as
        // fastboot's FILL chunks are). written + skipped = image size on every protocol.
        // With --delta, what was found unchanged was skipped too.
        bytes_written: report.bytes_written + report.bytes_zeroed,
        bytes_skipped: report.bytes_skipped + report.bytes_unchanged(),
        verified: report.verified_bytes.is_some(),
    })
}

fn fastboot(
    bus: &dyn Bus,
    opts: &ViaOptions,
    src: &mut dyn ExtentSource,
    p: &Progress<'_>,
) -> Result<Outcome, Error> {
    let part = opts
        .partition
        .as_deref()
        .ok_or_else(|| Error::Input("--via fastboot needs --partition NAME (e.g. root)".into()))?;
    let dev = require_one(
        bus,
        opts,
        Protocol::Fastboot,
        &[Mode::Fastboot],
        "fastboot device",
    )?;
    let label = format!("{} at {}", dev.id(), dev.port_path);
    let mut t = bus.open(&dev)?;
    let mut fb = Fastboot::new(&mut *t);
    let r = flash_partition(&mut fb, part, src, p);
    for m in fb.messages.drain(..) {
        p.note(format!("device: {m}"));
    }
    let (image_size, bytes_written, bytes_skipped) = r?;
    if opts.reset {
        fb.reboot()?;
    }
    Ok(Outcome::Written {
        device: label,
        image_size,
        bytes_written,
        bytes_skipped,
        // Fastboot has no read-back (U-Boot does not implement `upload` of partitions).
        verified: false,
    })
}

/// Flash one partition: raw in one download when it fits, else sparse pieces. Returns
/// (image size, data bytes, skipped bytes).
pub(crate) fn flash_partition(
    fb: &mut Fastboot<'_>,
    part: &str,
    src: &mut dyn ExtentSource,
    p: &dyn ProgressLike,
) -> Result<(u64, u64, u64), Error> {
    let max = fb.max_download_size()?;
    let size = src.size_hint();
    if let (Some(size), Some(psize)) = (size, fb.partition_size(part)?) {
        if size > psize {
            return Err(Error::TooLarge(format!(
                "the image is {size} bytes but partition '{part}' holds {psize} bytes: refusing \
                 to write past its end"
            )));
        }
    }
    p.start_(
        Phase::Write,
        size,
        Some(format!("fastboot partition '{part}'")),
    );
    let mut written = 0u64;
    let mut skipped = 0u64;
    if let Some(n) = size.filter(|&n| n <= max as u64) {
        // Fits: send raw, as `fastboot flash` does (boot ROMs like the TH1520's want raw).
        let mut img = vec![0u8; n as usize];
        let mut buf = vec![0u8; 1 << 20];
        while let Some(x) = src.next_extent(&mut buf)? {
            let end = x.end().min(n) as usize;
            if x.kind == ExtentKind::Data {
                img[x.offset as usize..end].copy_from_slice(&buf[..end - x.offset as usize]);
                written += x.len;
            } else {
                skipped += x.len;
            }
        }
        fb.download(&img, &mut |_| {})?;
        fb.flash(part)?;
        p.at_(Phase::Write, n, size);
        return Ok((n, written, skipped));
    }
    let enc = SparseEncoder::new(max, size)?;
    let mut pieces = 0usize;
    let end = enc.encode(src, &mut |piece| {
        fb.download(&piece.bytes, &mut |_| {})
            .and_then(|_| fb.flash(part))
            .map_err(|e| Error::Interrupted {
                what: format!("fastboot flash of '{part}' (sparse piece {})", pieces + 1),
                done: piece.covers.start,
                total: size.unwrap_or(piece.covers.end),
                source: Box::new(e),
            })?;
        pieces += 1;
        // Image bytes, not the piece's size: its sparse headers are no part of the image (the
        // lab showed 520 header bytes counted as written and missing from skipped).
        written += piece.data_bytes;
        p.at_(Phase::Write, piece.covers.end, size);
        Ok(())
    })?;
    p.note_(format!(
        "sent {pieces} sparse piece(s) under max-download-size {max}"
    ));
    skipped = end.saturating_sub(written.min(end));
    Ok((end, written, skipped))
}

/// Progress sink for [`flash_partition`], so callers without a full session can use it.
pub(crate) trait ProgressLike {
    fn start_(&self, phase: Phase, total: Option<u64>, detail: Option<String>);
    fn at_(&self, phase: Phase, done: u64, total: Option<u64>);
    fn note_(&self, text: String);
}

impl ProgressLike for Progress<'_> {
    fn start_(&self, phase: Phase, total: Option<u64>, detail: Option<String>) {
        self.start(phase, total, detail)
    }
    fn at_(&self, phase: Phase, done: u64, total: Option<u64>) {
        self.at(phase, done, total)
    }
    fn note_(&self, text: String) {
        self.note(text)
    }
}

fn rpiboot(
    bus: &dyn Bus,
    opts: &ViaOptions,
    p: &Progress<'_>,
    follow: &dyn Follow,
) -> Result<(String, PathBuf), Error> {
    let dir = opts.usbboot_dir.clone().ok_or_else(|| {
        Error::Input(
            "--via usbboot needs the boot files: --usbboot-dir DIR (e.g. \
             /usr/share/rpiboot/mass-storage-gadget64)"
                .into(),
        )
    })?;
    let dev = require_one(
        bus,
        opts,
        Protocol::Usbboot,
        &[Mode::Rom, Mode::FileServer],
        "Raspberry Pi in USB boot mode (nRPIBOOT jumper fitted?)",
    )?;
    let port = dev.port_path.clone();
    let label = format!("{} at {}", dev.id(), port);
    let soc_dir = usbboot::soc_prefix(dev.pid).to_string();
    let files = DirProvider {
        dir: dir.clone(),
        soc_dir: Some(soc_dir),
    };
    let dev = if dev.mode == Mode::Rom {
        let name = ids::BROADCOM_ROMS
            .iter()
            .find(|(pid, _, _)| *pid == dev.pid)
            .map_or("bootcode.bin", |(_, _, f)| f);
        let blob = usbboot::FileProvider::get(&files, name).ok_or_else(|| {
            Error::Input(format!(
                "{}: no {name} (the second stage for {}) in this directory",
                dir.display(),
                dev.soc.as_deref().unwrap_or("this SoC")
            ))
        })?;
        p.note(format!(
            "sending {name} ({} bytes) to the boot ROM",
            blob.len()
        ));
        {
            let mut t = bus.open(&dev)?;
            usbboot::boot_rom(&mut *t, &blob)?;
        }
        wait_for(
            opts.reenumerate_timeout,
            &format!("the Raspberry Pi on port {port} to start its second stage"),
            follow,
            || {
                find_one(
                    bus,
                    opts,
                    Protocol::Usbboot,
                    &[Mode::FileServer],
                    Some(&port),
                )
            },
        )?
    } else {
        dev
    };
    let served = {
        let mut t = bus.open(&dev)?;
        usbboot::file_server(&mut *t, &files, |name, size| match size {
            Some(n) => p.note(format!("served {name} ({n} bytes)")),
            None => p.note(format!("device asked for {name}: not in {}", dir.display())),
        })?
    };
    p.finish(
        Phase::Usbboot,
        serde_json::json!({ "files": served.files.iter().map(|(n, s)| serde_json::json!({"name": n, "bytes": s})).collect::<Vec<_>>() }),
    );
    let path = wait_for(
        opts.reenumerate_timeout,
        &format!(
            "the mass-storage gadget on port {port} (the boot files may not be \
             mass-storage-gadget64, or the board's eMMC is not reachable)"
        ),
        follow,
        || Ok(bus.block_device(&port)),
    )?;
    p.note(format!("the board's storage is now {}", path.display()));
    Ok((label, path))
}

/// An in-memory image as an extent stream (data in 1 MiB extents, all-zero blocks as `Zero`).
/// For files that are loaded whole anyway (fastboot `ram` payloads, FEL, tests).
pub struct MemSource {
    data: Vec<u8>,
    pos: usize,
    name: String,
}

impl MemSource {
    pub fn new(name: &str, data: Vec<u8>) -> Self {
        Self {
            data,
            pos: 0,
            name: name.into(),
        }
    }
}

impl ExtentSource for MemSource {
    fn size_hint(&self) -> Option<u64> {
        Some(self.data.len() as u64)
    }
    fn next_extent(&mut self, buf: &mut [u8]) -> Result<Option<Extent>, ImageError> {
        if self.pos >= self.data.len() {
            return Ok(None);
        }
        const BLK: usize = 4096;
        let start = self.pos;
        let is_zero = |o: usize| {
            self.data[o..(o + BLK).min(self.data.len())]
                .iter()
                .all(|&b| b == 0)
        };
        let zero = is_zero(start);
        let stop = if zero {
            self.data.len()
        } else {
            (start + buf.len()).min(self.data.len())
        };
        let mut end = start;
        while end < stop && is_zero(end) == zero {
            end = (end + BLK).min(stop);
        }
        let kind = if zero {
            ExtentKind::Zero
        } else {
            buf[..end - start].copy_from_slice(&self.data[start..end]);
            ExtentKind::Data
        };
        self.pos = end;
        Ok(Some(Extent {
            offset: start as u64,
            len: (end - start) as u64,
            kind,
        }))
    }
    fn describe(&self) -> String {
        format!("{} (in memory)", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn wait_until_answers_stops_on_cancel_times_out_and_passes_errors_on() {
        let calls = Cell::new(0);
        let got = wait_until(Duration::from_secs(60), &|| false, || {
            calls.set(calls.get() + 1);
            Ok::<_, String>((calls.get() == 3).then_some("here"))
        });
        assert_eq!(got, Ok(Ok("here")));
        assert_eq!(calls.get(), 3);
        // Cancelled before the check runs: the bus is not asked again.
        let got = wait_until::<(), String>(Duration::from_secs(60), &|| true, || {
            panic!("checked after cancel")
        });
        assert_eq!(got, Ok(Err(WaitEnd::Cancelled)));
        let got = wait_until(Duration::ZERO, &|| false, || Ok::<Option<()>, String>(None));
        assert_eq!(got, Ok(Err(WaitEnd::TimedOut)));
        let got = wait_until(Duration::from_secs(60), &|| false, || {
            Err::<Option<()>, _>("bus gone".to_string())
        });
        assert_eq!(got, Err("bus gone".to_string()));
    }

    /// The station's view: a cancelled unit ends a bring-up wait with `Error::Cancelled`.
    #[test]
    fn wait_for_maps_cancel_and_timeout_to_usb_errors() {
        struct Stopped;
        impl Follow for Stopped {
            fn cancelled(&self) -> bool {
                true
            }
        }
        let e = wait_for(Duration::from_secs(60), "x", &Stopped, || Ok(None::<()>)).unwrap_err();
        assert!(matches!(e, Error::Cancelled), "{e}");
        let e = wait_for(Duration::ZERO, "the board", &Untracked, || Ok(None::<()>)).unwrap_err();
        assert_eq!(e.to_string(), "timed out after 1 s waiting for the board");
    }
}
