//! One unit on one slot: ledger row → write → verify → identity files → verify → ledger
//! update, on its own thread so a slow or failing card never holds up the other slots.
//!
//! Cancellation (the card was pulled, the station is stopping) is a flag the job checks
//! between buffers (it is the writer's cancel flag) and between steps; whatever happens, a cancelled
//! unit ends as FAIL with the reason, never as PASS.

use crate::progress::Phase;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::config::Station;
use super::fatinject;
use super::identity::UnitFacts;
use super::ledger::{Ledger, NewUnit, Outcome};
use super::slots::DeviceInfo;
use super::ui::{SlotReporter, Ui};
use crate::image::ExtentSource;

/// The image every job writes, resolved once at start.
#[derive(Debug, Clone)]
pub struct ImagePlan {
    pub path: PathBuf,
    /// blake3 of the logical image (given in the config, or computed once at start).
    pub blake3: String,
    pub size: u64,
    pub format: String,
    /// A compressed or sparse image decoded once at start (see [`super::decoded`]); None for
    /// raw images, which jobs read directly.
    pub decoded: Option<super::decoded::Decoded>,
    /// The key that signed the image, its manifest or its bmap (checked at start), for the ledger.
    pub signed_by: Option<String>,
}

impl ImagePlan {
    /// Opens the image at `path`, hashes its logical contents and, unless it is raw, decodes
    /// it once into `cache_dir` (keyed by the file's own blake3) for every job to read. With
    /// no `cache_dir` (a dry run) it only hashes.
    pub fn prepare(
        path: &std::path::Path,
        cache_dir: Option<&std::path::Path>,
        rep: &dyn crate::progress::Reporter,
    ) -> Result<ImagePlan, crate::image::ImageError> {
        let opened = crate::image::open_image(path, &crate::image::OpenOptions::default())?;
        let cache_dir = match cache_dir {
            Some(d) if opened.formats != [crate::image::Format::Raw] => d,
            _ => return Self::hash_only(path, opened, rep),
        };
        Self::decode_once(path, opened, cache_dir, rep)
    }

    fn hash_only(
        path: &std::path::Path,
        mut opened: crate::image::OpenedImage,
        rep: &dyn crate::progress::Reporter,
    ) -> Result<ImagePlan, crate::image::ImageError> {
        use crate::progress::Event;
        let job = super::ui::STATION_JOB;
        rep.report(Event::Start {
            job: job.into(),
            phase: Phase::Hash,
            total: opened.logical_size,
            detail: Some(format!("{}: {}", path.display(), opened.description)),
        });
        let mut buf = crate::write::buffer::AlignedBuf::new(4 << 20);
        let (hash, len) = crate::image::digest::hash_source(opened.source.as_mut(), &mut buf)?;
        rep.report(Event::Finish {
            job: job.into(),
            phase: Phase::Hash,
            summary: serde_json::json!({ "blake3": hash.to_hex().to_string(), "bytes": len }),
        });
        Ok(ImagePlan {
            path: path.to_path_buf(),
            blake3: hash.to_hex().to_string(),
            size: len,
            format: opened.description,
            decoded: None,
            signed_by: None,
        })
    }

    fn decode_once(
        path: &std::path::Path,
        mut opened: crate::image::OpenedImage,
        cache_dir: &std::path::Path,
        rep: &dyn crate::progress::Reporter,
    ) -> Result<ImagePlan, crate::image::ImageError> {
        let job = super::ui::STATION_JOB;
        // Read, not mmap: mapped pages of a large file would count as the station's memory.
        let hash_err = |e: std::io::Error| crate::image::ImageError::Invalid {
            path: path.display().to_string(),
            msg: format!("hash the file: {e}"),
        };
        let mut file_hash = blake3::Hasher::new();
        let mut f = std::fs::File::open(path).map_err(hash_err)?;
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut f, &mut chunk).map_err(hash_err)?;
            if n == 0 {
                break;
            }
            file_hash.update(&chunk[..n]);
        }
        let key = file_hash.finalize().to_hex().to_string();
        let dir = cache_dir.join(crate::acquire::cache::DECODED_SUBDIR);
        let d = super::decoded::materialise(opened.source.as_mut(), &key, &dir, rep, job)?;
        // One decoded image per station: the older ones of other sources go (unless
        // another running station holds them); `cache prune` handles the rest.
        for old in super::decoded::remove_older(&dir, &key)? {
            rep.report(crate::progress::Event::Message {
                job: job.into(),
                level: crate::progress::Level::Info,
                text: format!("removed the decoded image of an older source ({old})"),
            });
        }
        Ok(ImagePlan {
            path: path.to_path_buf(),
            blake3: d.blake3.clone(),
            size: d.size,
            format: opened.description,
            decoded: Some(d),
            signed_by: None,
        })
    }

    /// The files the image is read from (never a target).
    pub(crate) fn all_paths(&self) -> Vec<PathBuf> {
        let mut v = vec![self.path.clone()];
        v.extend(self.decoded.as_ref().map(|d| d.raw.clone()));
        v
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "{} ({}, {} bytes, blake3 {})",
            self.path.display(),
            self.format,
            self.size,
            &self.blake3[..self.blake3.len().min(16)]
        )
    }
}

/// What every job shares.
pub(crate) struct Context {
    pub(crate) station: Station,
    pub(crate) image: Arc<ImagePlan>,
    pub(crate) ledger: Arc<Mutex<Ledger>>,
    pub(crate) ui: Arc<Ui>,
    /// The USB bus boards on `kind = "usb"` slots are driven through (libusb, or simulated
    /// boards in tests); None when no slot is a USB slot.
    pub(crate) usb: Option<Arc<dyn crate::usb::discovery::Bus + Send + Sync>>,
}

/// Set once by whoever cancels; the first reason wins. The flag is the writer's own cancel
/// flag, so the pipeline stops between buffers.
#[derive(Default)]
pub(crate) struct Cancel {
    flag: Arc<AtomicBool>,
    reason: Mutex<Option<CancelReason>>,
    /// USB jobs: the bus address of the board the job is talking to now.
    usb_address: Mutex<Option<(u8, u8)>>,
    /// USB jobs: the board is expected to leave the bus (loader start, final reset).
    usb_leaving: AtomicBool,
}

/// Why a job was cancelled. The text is what the ledger and the slot's line show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CancelReason {
    /// The station is shutting down (a signal): the unit is stopped, not pulled.
    Stopped,
    /// The medium or board left the slot (`what` names the event and the device).
    Removed(String),
}

impl std::fmt::Display for CancelReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CancelReason::Stopped => f.write_str("station stopped by signal"),
            CancelReason::Removed(what) => f.write_str(what),
        }
    }
}

/// What a udev removal on a slot means for its running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removal {
    /// The job was cancelled: its unit will be FAIL.
    Cancelled,
    /// The board re-enumerates as part of the job (loader start, reset): nothing to do.
    Expected,
    /// An address the job no longer uses (the maskrom device after the loader took over).
    Stale,
}

impl Cancel {
    pub(crate) fn cancel(&self, reason: CancelReason) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert(reason);
        }
        self.flag.store(true, Ordering::SeqCst);
    }
    pub(crate) fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
    pub(crate) fn reason(&self) -> Option<CancelReason> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }
    pub(crate) fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }
    pub(crate) fn set_usb_address(&self, bus: u8, address: u8) {
        if let Ok(mut a) = self.usb_address.lock() {
            *a = Some((bus, address));
        }
    }
    pub(crate) fn usb_leaving(&self, on: bool) {
        self.usb_leaving.store(on, Ordering::SeqCst);
    }
    /// A removal event for this job's slot. `address` is the removed USB device's
    /// BUSNUM/DEVNUM (None for block devices: always an unplug).
    pub(crate) fn removed(&self, address: Option<(u8, u8)>, reason: &str) -> Removal {
        if let Some(a) = address {
            if self.usb_leaving.load(Ordering::SeqCst) {
                return Removal::Expected;
            }
            let current = self.usb_address.lock().ok().and_then(|c| *c);
            if current.is_some_and(|c| c != a) {
                return Removal::Stale;
            }
        }
        self.cancel(CancelReason::Removed(reason.to_string()));
        Removal::Cancelled
    }
}

/// A running job.
pub(crate) struct Handle {
    cancel: Arc<Cancel>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Handle {
    pub(crate) fn cancel(&self, reason: CancelReason) {
        self.cancel.cancel(reason);
    }
    pub(crate) fn removed(&self, address: Option<(u8, u8)>, reason: &str) -> Removal {
        self.cancel.removed(address, reason)
    }
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancel.is_set()
    }
    pub(crate) fn join(self) {
        if let Some(t) = self.thread {
            let _ = t.join();
        }
    }
}

/// Sent when a job has ended and its ledger row is final.
#[derive(Debug, Clone)]
pub(crate) struct Done {
    pub(crate) slot: String,
    pub(crate) pass: bool,
}

/// Starts the job for `dev` on `slot`.
pub(crate) fn spawn(
    ctx: Arc<Context>,
    slot: String,
    dev: DeviceInfo,
    done: crossbeam_channel::Sender<Done>,
) -> Handle {
    let cancel = Arc::new(Cancel::default());
    let c = cancel.clone();
    let (slot2, done2) = (slot.clone(), done.clone());
    let thread = std::thread::Builder::new()
        .name(format!("slot-{slot}"))
        .spawn(move || {
            // A panic outside the provisioning step (which `run_job` catches itself, to
            // record it in the unit's row) must still reach the station loop, or it would
            // wait for this slot forever.
            let d = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_job(&ctx, &slot, &dev, &c)
            }))
            .unwrap_or_else(|_| Done {
                slot: slot.clone(),
                pass: false,
            });
            if d.pass && ctx.station.eject && !dev.is_usb_device() {
                eject_card(&ctx, &slot, &dev);
            }
            let _ = done.send(d);
        });
    let thread = match thread {
        Ok(t) => Some(t),
        Err(_) => {
            // The host is out of threads: nothing was touched and no row was written.
            let _ = done2.send(Done {
                slot: slot2,
                pass: false,
            });
            None
        }
    };
    Handle { cancel, thread }
}

/// After a PASS (the row is final): eject the card of a USB card reader, so it can be pulled
/// at once while the reader and its slot stay. Only the medium the job wrote (its DISKSEQ).
fn eject_card(ctx: &Context, slot: &str, dev: &DeviceInfo) {
    let Some(node) = dev.devnode.as_deref() else {
        return;
    };
    let seq = dev.prop("DISKSEQ").and_then(|s| s.parse().ok());
    let (level, text) = match crate::target::eject::eject_card(std::path::Path::new(node), seq) {
        Ok(true) => (
            crate::progress::Level::Info,
            format!("{slot}: {node}: card ejected; pull it"),
        ),
        Ok(false) => return,
        Err(e) => (
            crate::progress::Level::Warn,
            format!("{slot}: {node}: the card was written but could not be ejected: {e}"),
        ),
    };
    ctx.ui.say(level, text);
}

/// The message of a caught panic (`panic!` payloads are `&str` or `String`).
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

/// A pulled card makes the write fail (ENOSPC once the kernel has zeroed the disk's capacity,
/// EIO) before udev's removal event reaches the station: a failed block job first looks at its
/// disk and gives that event a moment, so the unit reads "removed", not "No space left on
/// device". Only the failure path waits.
fn pulled(cancel: &Cancel, devnode: &str) -> Option<String> {
    let deadline = Instant::now() + std::time::Duration::from_secs(3);
    loop {
        if let Some(CancelReason::Removed(why)) = cancel.reason() {
            return Some(why);
        }
        if let Some(what) = block_gone(devnode) {
            return Some(format!("{what}: {devnode}"));
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// "device removed" when the disk has left sysfs, "medium removed" when its capacity is 0.
pub(super) fn block_gone(devnode: &str) -> Option<&'static str> {
    let name = std::path::Path::new(devnode).file_name()?;
    match std::fs::read_to_string(
        std::path::Path::new("/sys/class/block")
            .join(name)
            .join("size"),
    ) {
        Err(_) => Some("device removed"),
        Ok(s) if s.trim() == "0" => Some("medium removed"),
        Ok(_) => None,
    }
}

/// Steps of a job, named in FAIL reasons ("removed mid-write").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    Open,
    CardCheck,
    Loader,
    Usbboot,
    Write,
    Verify,
    Identity,
    IdentityVerify,
    Reset,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Open => "open",
            Step::CardCheck => "card-check",
            Step::Loader => "loader",
            Step::Usbboot => "usbboot",
            Step::Reset => "reset",
            Step::Write => "write",
            Step::Verify => "verify",
            Step::Identity => "identity",
            Step::IdentityVerify => "identity-verify",
        }
    }
}

/// Stats of a finished write.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct WriteStats {
    pub(crate) bytes_written: u64,
    pub(crate) bytes_skipped: u64,
    /// blake3 of the image as read back from the unit (with read-back on).
    pub(crate) readback_blake3: Option<[u8; 32]>,
    /// Ranges written again after reading back wrong (`retries`).
    pub(crate) retried_ranges: u64,
}

impl WriteStats {
    /// What the ledger keeps of a write: zeroed and unchanged bytes count as skipped.
    pub(super) fn of(report: &crate::write::WriteReport) -> WriteStats {
        WriteStats {
            bytes_written: report.bytes_written,
            bytes_skipped: report.bytes_skipped + report.bytes_zeroed + report.bytes_unchanged(),
            readback_blake3: report
                .readback_blake3
                .as_deref()
                .and_then(crate::write::parse_blake3_hex),
            retried_ranges: report.retried_ranges,
        }
    }
}

fn run_job(ctx: &Context, slot: &str, dev: &DeviceInfo, cancel: &Arc<Cancel>) -> Done {
    let st = &ctx.station;
    let devnode = if dev.is_usb_device() {
        format!("usb:{}", super::usbslot::port_of(dev))
    } else {
        dev.devnode.clone().unwrap_or_default()
    };
    let rep = Arc::new(
        SlotReporter::new(slot, ctx.ui.clone(), st.log_dir.as_deref()).unwrap_or_else(|e| {
            tracing::warn!("{slot}: cannot open its log in {:?}: {e}", st.log_dir);
            SlotReporter::without_log(slot, ctx.ui.clone())
        }),
    );
    ctx.ui.job_started();
    let scheme = st.scheme();
    let facts = UnitFacts {
        slot: slot.to_string(),
        board: st.board.clone(),
        card_serial: dev.card_serial(),
        id_path: dev.prop("ID_PATH").map(str::to_string),
        image_blake3: Some(ctx.image.blake3.clone()),
        now: chrono::Utc::now(),
    };
    let usb = dev.is_usb_device();
    let unit = NewUnit {
        slot: slot.to_string(),
        devnode: if usb {
            Some(format!("usb:{}", super::usbslot::port_of(dev)))
        } else {
            dev.devnode.clone()
        },
        id_serial: dev.prop("ID_SERIAL").map(str::to_string),
        id_path: dev.prop("ID_PATH").map(str::to_string),
        diskseq: dev.prop("DISKSEQ").map(str::to_string),
        board: st.board.clone(),
        image: Some(ctx.image.path.display().to_string()),
        image_blake3: Some(ctx.image.blake3.clone()),
        signature_key_id: ctx.image.signed_by.clone(),
    };
    // The row (and the serial) exist before the device is touched.
    let started = {
        let mut l = match ctx.ledger.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        l.start_unit(&unit, scheme.needs_seq(), st.seq_start, |seq| {
            let id = scheme.derive(&facts, seq)?;
            let json = serde_json::to_string(&id).unwrap_or_default();
            Ok((id.serial.clone(), id.hostname.clone(), json, id))
        })
    };
    let unit_row = match started {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(reason)) => Err(format!("identity: {reason}")),
        Err(e) => Err(format!("ledger: {e}")),
    };
    let (row, id) = match unit_row {
        Ok(v) => v,
        Err(reason) => return end(ctx, &rep, slot, None, None, Err(reason), None),
    };
    rep.info(format!(
        "{devnode}: unit {} (hostname {}), {}",
        id.serial,
        id.hostname,
        ctx.image.describe()
    ));
    if let Some(k) = &id.host_key {
        // Recorded before the key goes to the unit; the private half only ever goes there.
        let r = match ctx.ledger.lock() {
            Ok(mut l) => l.record_host_key(row, &k.public, &k.fingerprint),
            Err(p) => p
                .into_inner()
                .record_host_key(row, &k.public, &k.fingerprint),
        };
        if let Err(e) = r {
            return end(
                ctx,
                &rep,
                slot,
                Some(row),
                Some(&id.serial),
                Err(format!("ledger: {e}")),
                None,
            );
        }
        rep.info(format!(
            "{devnode}: SSH host key {} (ed25519)",
            k.fingerprint
        ));
    }

    let t0 = Instant::now();
    let step = Mutex::new(Step::Open);
    // A panic while provisioning (a bug in a transport or the writer) is this unit's FAIL,
    // with the panic message in its ledger row; the other slots carry on.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if usb {
            let set = |s: Step| {
                if let Ok(mut g) = step.lock() {
                    *g = s;
                }
            };
            super::usbslot::provision(ctx, dev, &id.files, cancel, &rep, &set)
        } else {
            provision(ctx, dev, &id.files, cancel, &rep, &step)
        }
    }))
    .unwrap_or_else(|p| {
        Err(anyhow::anyhow!(
            "job thread panicked: {}",
            panic_text(p.as_ref())
        ))
    });
    let secs = t0.elapsed().as_secs_f64();
    let step = match step.lock() {
        Ok(s) => *s,
        Err(p) => *p.into_inner(),
    };
    // A pulled card is never PASS, even if the last write happened to land.
    let result = match (result, cancel.reason()) {
        (_, Some(why @ CancelReason::Stopped)) => {
            Err(format!("stopped mid-{} ({why})", step.name()))
        }
        (_, Some(why @ CancelReason::Removed(_))) => {
            Err(format!("removed mid-{} ({why})", step.name()))
        }
        (Ok(s), None) => Ok(s),
        (Err(e), None) => match (usb, pulled(cancel, &devnode)) {
            (false, Some(why)) => Err(format!("removed mid-{} ({why})", step.name())),
            _ => Err(format!("{} failed: {e:#}", step.name())),
        },
    };
    // Boot acceptance: only a written, identified unit is reset and followed.
    let result = match (result, st.boot.get(slot)) {
        (Ok(stats), Some(acc)) => {
            boot_unit(ctx, acc, slot, &devnode, &id.serial, row, &rep).map(|()| stats)
        }
        (r, _) => r,
    };
    end(
        ctx,
        &rep,
        slot,
        Some(row),
        Some(&id.serial),
        result,
        Some(secs),
    )
}

/// Resets the unit and follows its console to the check; records the result in the row.
fn boot_unit(
    ctx: &Context,
    acc: &super::boot::Acceptance,
    slot: &str,
    devnode: &str,
    serial: &str,
    row: i64,
    rep: &Arc<SlotReporter>,
) -> Result<(), String> {
    let dir = match &ctx.station.log_dir {
        Some(d) => d.clone(),
        None => {
            let l = match ctx.ledger.lock() {
                Ok(l) => l,
                Err(p) => p.into_inner(),
            };
            l.path()
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_default()
        }
    };
    let transcript = dir.join("boot").join(format!("{serial}.log"));
    rep.info(format!("resetting the unit: {}", acc.cfg.reset));
    let r2 = rep.clone();
    let unit = super::boot::Unit {
        slot,
        device: devnode,
        serial,
    };
    let rec = super::boot::accept(acc, &unit, &transcript, move |l| r2.info(l));
    {
        let mut l = match ctx.ledger.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        if let Err(e) = l.record_boot(row, &rec) {
            rep.log(&format!("could not record the boot result: {e}"));
        }
    }
    match (&rec.failure, rec.pass) {
        (None, true) => {
            rep.info(format!(
                "booted: login after {:.1} s (transcript {})",
                rec.login_seconds.unwrap_or_default(),
                transcript.display()
            ));
            Ok(())
        }
        (f, _) => Err(format!(
            "boot failed in stage \"{}\": {} (transcript {})",
            rec.stage,
            f.as_deref().unwrap_or("unknown"),
            transcript.display()
        )),
    }
}

fn end(
    ctx: &Context,
    rep: &SlotReporter,
    slot: &str,
    row: Option<i64>,
    serial: Option<&str>,
    result: Result<WriteStats, String>,
    secs: Option<f64>,
) -> Done {
    let pass = result.is_ok();
    let (stats, reason) = match &result {
        Ok(s) => (*s, None),
        Err(e) => (WriteStats::default(), Some(e.clone())),
    };
    let throughput = secs
        .filter(|s| *s > 0.0 && pass)
        .map(|s| (stats.bytes_written + stats.bytes_skipped) as f64 / s);
    if let Some(row) = row {
        let mut l = match ctx.ledger.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        let o = Outcome {
            pass,
            failure_reason: reason.clone(),
            bytes_written: stats.bytes_written,
            bytes_skipped: stats.bytes_skipped,
            throughput_bps: throughput,
            readback_blake3: stats.readback_blake3.map(hex::encode),
            retried_ranges: stats.retried_ranges,
        };
        if let Err(e) = l.finish_unit(row, &o) {
            rep.log(&format!("could not record the result: {e}"));
            tracing::error!("{slot}: could not record the result: {e}");
        }
        if let Ok(n) = l.backlog() {
            ctx.ui.outbox_rows(n);
        }
    }
    let text = match (&reason, serial) {
        (None, Some(s)) => format!(
            "{s}{}",
            throughput
                .map(|t| format!(", {:.1} MiB/s", t / (1024.0 * 1024.0)))
                .unwrap_or_default()
        ),
        (Some(r), Some(s)) => format!("{s}: {r}"),
        (Some(r), None) => r.clone(),
        (None, None) => String::new(),
    };
    rep.result(pass, &text);
    ctx.ui.job_ended(slot, pass);
    Done {
        slot: slot.to_string(),
        pass,
    }
}

/// Write, verify, inject, verify. Updates `step` as it goes so failures name the step.
fn provision(
    ctx: &Context,
    dev: &DeviceInfo,
    files: &[(String, Vec<u8>)],
    cancel: &Arc<Cancel>,
    rep: &Arc<SlotReporter>,
    step: &Mutex<Step>,
) -> anyhow::Result<WriteStats> {
    let set = |s: Step| {
        if let Ok(mut g) = step.lock() {
            *g = s;
        }
    };
    let devnode = PathBuf::from(
        dev.devnode
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("{} has no device node", dev.syspath))?,
    );
    write_block(ctx, &devnode, files, cancel, rep, &set, false)
}

/// The block job on `devnode` (a card in a reader, or a board's storage exposed as a
/// mass-storage gadget): `target::open` with every safety rule, the writer pipeline with
/// read-back, identity files into the FAT partition, their read-back. `board_disk`: the disk
/// is the one that appeared on a USB slot's port after the job booted the board there (its
/// storage by construction), so the removable-class rule does not apply to it.
pub(super) fn write_block(
    ctx: &Context,
    devnode: &std::path::Path,
    files: &[(String, Vec<u8>)],
    cancel: &Arc<Cancel>,
    rep: &Arc<SlotReporter>,
    set: &(dyn Fn(Step) + Sync),
    board_disk: bool,
) -> anyhow::Result<WriteStats> {
    use anyhow::Context as _;
    // The writer's safety rules, unchanged: never --force from the station, except the
    // removable-class rule for a board's own disk (a gadget's LUN need not be removable).
    let policy = crate::target::Policy {
        image_size: Some(ctx.image.size),
        force: board_disk,
        image_paths: ctx.image.all_paths(),
    };
    // The claim (O_EXCL) holds through identity injection and its read-back.
    let mut target = crate::job::BlockJob::claim(devnode, &policy, true)?;
    let direct = target.direct;
    if ctx.station.check_card {
        set(Step::CardCheck);
        let size = match &target.info {
            crate::target::TargetInfo::Device(d) => d.size,
            crate::target::TargetInfo::File { size, .. } => *size,
        };
        let opts = crate::cardcheck::Options {
            probes: crate::cardcheck::DEFAULT_PROBES,
            cancel: cancel.flag(),
            job: devnode.display().to_string(),
            flush_cache: !direct,
        };
        let name = devnode.display().to_string();
        let r = crate::cardcheck::check(target.file(), &name, size, &opts, rep.as_ref())?;
        rep.info(format!("card check: {}", r.reason()));
        if cancel.is_set() {
            anyhow::bail!("cancelled");
        }
    }
    let source = ctx.image.open()?;
    let image = ctx.image.clone();
    let opts = crate::write::WriteOptions {
        verify: ctx.station.verify,
        expected_blake3: crate::write::parse_blake3_hex(&ctx.image.blake3),
        cancel: cancel.flag(),
        job: devnode.display().to_string(),
        image_name: ctx.image.path.display().to_string(),
        readback_digest: true,
        delta: ctx.station.delta,
        retries: ctx.station.retries,
        reopen: Some(Arc::new(move || image.open())),
        ..Default::default()
    };
    set(Step::Write);
    // The pipeline reports "write" then "verify"; follow it for FAIL reasons.
    let follow = PhaseFollower {
        inner: rep.clone(),
        set,
    };
    let report = target.write(source, &opts, &follow)?;
    let held = target.file();
    if cancel.is_set() {
        anyhow::bail!("cancelled");
    }
    let stats = WriteStats::of(&report);
    if !files.is_empty() {
        set(Step::Identity);
        fatinject::set_direct(held, false)
            .with_context(|| format!("{}: switch to buffered I/O", devnode.display()))?;
        let part = fatinject::inject(held, devnode, ctx.station.fat_partition, files)?;
        rep.info(format!(
            "wrote {} identity file(s) into FAT partition {}",
            files.len(),
            part.number
        ));
        if cancel.is_set() {
            anyhow::bail!("cancelled");
        }
        if ctx.station.verify {
            set(Step::IdentityVerify);
            if direct {
                fatinject::set_direct(held, true)
                    .with_context(|| format!("{}: switch to O_DIRECT", devnode.display()))?;
            } else {
                // Without O_DIRECT only BLKFLSBUF keeps the page cache from answering for the
                // card, and it needs CAP_SYS_ADMIN: refuse rather than verify the cache.
                crate::write::sink::flush_buffers(held).with_context(|| {
                    format!(
                        "{}: no O_DIRECT and cannot drop the page cache to read back",
                        devnode.display()
                    )
                })?;
            }
            fatinject::verify(held, devnode, &part, files)?;
            rep.info("identity files read back and match");
        }
    }
    Ok(stats)
}

/// Passes events on and notes the writer's phase, so a removal mid-verify says so.
pub(super) struct PhaseFollower<'a> {
    pub(super) inner: Arc<SlotReporter>,
    pub(super) set: &'a (dyn Fn(Step) + Sync),
}

impl crate::progress::Reporter for PhaseFollower<'_> {
    fn report(&self, ev: crate::progress::Event) {
        if let crate::progress::Event::Start { phase, .. } = &ev {
            match phase {
                Phase::Write => (self.set)(Step::Write),
                Phase::Verify => (self.set)(Step::Verify),
                _ => {}
            }
        }
        self.inner.report(ev);
    }
}

impl ImagePlan {
    /// A fresh extent stream over the image, for one job.
    pub(crate) fn open(&self) -> Result<Box<dyn ExtentSource>, crate::image::ImageError> {
        if let Some(d) = &self.decoded {
            let name = self.path.display().to_string();
            return Ok(Box::new(super::decoded::MapSource::open(d, &name)?));
        }
        crate::image::open_image(&self.path, &crate::image::OpenOptions::default())
            .map(|o| o.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usb_removals_cancel_only_unplugs() {
        let c = Cancel::default();
        c.set_usb_address(1, 5);
        c.usb_leaving(true);
        assert_eq!(c.removed(Some((1, 5)), "gone"), Removal::Expected);
        c.set_usb_address(1, 6);
        c.usb_leaving(false);
        assert_eq!(c.removed(Some((1, 5)), "late event"), Removal::Stale);
        assert!(!c.is_set());
        assert_eq!(
            c.removed(Some((1, 6)), "device removed"),
            Removal::Cancelled
        );
        assert!(c.is_set());
        assert_eq!(
            c.reason(),
            Some(CancelReason::Removed("device removed".into()))
        );
        // The first reason stays: a stop after an unplug is still an unplug.
        c.cancel(CancelReason::Stopped);
        assert_eq!(
            c.reason().map(|r| r.to_string()).as_deref(),
            Some("device removed")
        );
        // Block devices: any removal is an unplug.
        let b = Cancel::default();
        assert_eq!(b.removed(None, "medium removed"), Removal::Cancelled);
    }
}
