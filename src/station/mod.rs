//! The factory station: udev hotplug on configured slots, one write job per slot in parallel,
//! per-unit identity injected into the FAT partition, and a SQLite ledger that loses nothing.
//!
//! Flow: [`hotplug::Monitor`] events → [`hotplug::Tracker`] (which slot, new medium or gone)
//! → [`job`] threads (ledger row → write → verify → identity files → verify → ledger update)
//! → [`ui`] (one line per slot, running count). Nothing outside a configured slot is touched,
//! and every target still goes through `target`'s safety checks.

pub(crate) mod boot;
pub mod central;
pub mod config;
pub(crate) mod courier;
pub mod decoded;
pub(crate) mod fatinject;
pub mod hotplug;
pub mod identity;
pub mod job;
pub mod ledger;
pub mod outbox;
pub mod slots;
pub mod ui;
pub mod usbslot;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::exit::{Classify, Exit};
use crate::progress::Level;
use hotplug::{Action, Decision};

/// Station errors at the library boundary; each names the file or device concerned.
#[derive(Debug, thiserror::Error)]
pub enum StationError {
    #[error("{path}: {msg}")]
    Config { path: String, msg: String },
    #[error("ledger {path}: {msg}")]
    Ledger { path: String, msg: String },
    #[error(
        "ledger {path} is in use by another station process; refusing to start a second one on it"
    )]
    LedgerBusy { path: String },
    #[error("{0}")]
    Environment(String),
    /// The line's PostgreSQL ledger: `exit` says whether it is setup (credentials, trust,
    /// privileges: 8), bad configuration (3) or the network (5).
    #[error("ledger {url}: {msg}")]
    Central {
        url: String,
        msg: String,
        exit: Exit,
    },
    #[error(transparent)]
    Fat(#[from] fatinject::FatError),
}

impl Classify for StationError {
    fn exit(&self) -> Exit {
        match self {
            StationError::Config { .. } => Exit::BadInput,
            StationError::Ledger { .. } => Exit::Io,
            StationError::LedgerBusy { .. } => Exit::Refused,
            StationError::Environment(_) => Exit::Environment,
            StationError::Central { exit, .. } => *exit,
            StationError::Fat(e) => e.exit(),
        }
    }
}

/// How the station runs.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Flash media already present at start.
    pub flash_present: bool,
    /// Stop after this many units have ended (batch runs, benchmarks); run forever if None.
    pub exit_after: Option<u64>,
}

/// Totals at the end of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    pub pass: u64,
    pub fail: u64,
}

/// What `--dry-run` found for one slot.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct SlotPlan {
    pub(crate) slot: String,
    pub(crate) rules: String,
    /// The disk in the slot now, if any.
    pub(crate) device: Option<String>,
    pub(crate) size: Option<u64>,
    /// What would happen to it.
    pub(crate) verdict: String,
}

/// What `--dry-run` shows: per slot what would be flashed, what is never touched.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Plan {
    pub(crate) image: String,
    pub(crate) ledger: String,
    pub(crate) next_seq: Option<u64>,
    /// The identity the next unit would get, or why it cannot be named
    /// (`example_identity_error`): two plain fields, not a serialized `Result`.
    pub(crate) example_identity: Option<identity::Identity>,
    pub(crate) example_identity_error: Option<String>,
    pub(crate) slots: Vec<SlotPlan>,
    /// Whole disks in no slot: never touched.
    pub(crate) outside: Vec<String>,
}

/// `--dry-run`'s line for a board found in a recovery mode on a USB slot.
fn usb_dry_run_verdict(
    f: &crate::usb::discovery::Found,
    station: &config::Station,
    flash_present: bool,
) -> String {
    use crate::usb::discovery::Protocol;
    let left_alone = |what: &str| {
        format!("{what}: present at start, left alone (pass --flash-present to flash it)")
    };
    let soc = f.soc.as_deref().unwrap_or("unknown SoC");
    match f.protocol {
        Protocol::Rockusb => {
            let what = format!("{} ({soc}) in {} mode on port {}", f.id(), f.mode, f.port_path);
            if flash_present {
                format!("would be flashed now over rockusb: {what}")
            } else {
                left_alone(&what)
            }
        }
        Protocol::Usbboot => {
            let what = format!(
                "{} ({soc}) in usbboot {} mode on port {}",
                f.id(),
                f.mode,
                f.port_path
            );
            match (&station.usb.usbboot_dir, flash_present) {
                (None, _) => format!("{what}: would FAIL, no `usbboot-dir` in [usb]"),
                (Some(d), true) => format!(
                    "would be flashed now: rpiboot from {}, then its storage as a block device",
                    d.display()
                ),
                (Some(_), false) => left_alone(&what),
            }
        }
        Protocol::MassStorage => {
            let what = format!("{} already in mass-storage mode on port {}", f.id(), f.port_path);
            if flash_present {
                format!("would be flashed now: {what}, its disk on that port as a block device")
            } else {
                left_alone(&what)
            }
        }
        _ => format!(
            "{} ({:?} in {} mode): would FAIL, station USB slots flash Rockchip boards and Raspberry Pi boards (usbboot or mass-storage) only",
            f.id(),
            f.protocol,
            f.mode
        ),
    }
}

/// Works out what the station would do now, touching nothing (no ledger lock, no writes).
pub(crate) fn plan(
    station: &config::Station,
    image: &job::ImagePlan,
    ledger_path: &std::path::Path,
    flash_present: bool,
) -> Result<Plan, StationError> {
    let scheme = station.scheme();
    // With a central ledger the serials come from its leases at start: not known offline, so
    // the example shows the format with the first counter value.
    let next_seq = if scheme.needs_seq() && station.central.is_none() {
        Some(ledger::peek_seq_readonly(ledger_path, station.seq_start)?)
    } else {
        None
    };
    let example_seq =
        next_seq.or((scheme.needs_seq() && station.central.is_some()).then_some(station.seq_start));
    let devs = hotplug::enumerate(&station.attr_keys())?;
    let mut slots_out = Vec::new();
    let mut claimed = std::collections::BTreeSet::new();
    let example = |dev: Option<&slots::DeviceInfo>, slot: &str| {
        scheme.derive(
            &identity::UnitFacts {
                slot: slot.to_string(),
                board: station.board.clone(),
                card_serial: dev.and_then(|d| d.card_serial()),
                id_path: dev.and_then(|d| d.prop("ID_PATH").map(str::to_string)),
                image_blake3: Some(image.blake3.clone()),
                now: chrono::Utc::now(),
            },
            example_seq,
        )
    };
    let mut example_identity = Err("no slot".to_string());
    for s in &station.slots {
        let present: Vec<&slots::DeviceInfo> = devs
            .iter()
            .filter(|d| s.matches(d) && (d.size > 0 || usbslot::recovery_device(d).is_some()))
            .collect();
        let (device, size, verdict) = match present.as_slice() {
            [d] if d.is_usb_device() => {
                claimed.insert(d.syspath.clone());
                let verdict = match usbslot::recovery_device(d) {
                    Some(f) => usb_dry_run_verdict(&f, station, flash_present),
                    None => "not in a recovery mode".to_string(),
                };
                (Some(format!("usb:{}", usbslot::port_of(d))), None, verdict)
            }
            [] => (
                None,
                None,
                match s.kind {
                    config::SlotKind::Block => "empty: waiting for a card".to_string(),
                    config::SlotKind::Usb => {
                        "waiting for a board in recovery mode on this port".to_string()
                    }
                },
            ),
            [d] => {
                claimed.insert(d.syspath.clone());
                let node = d.devnode.clone().unwrap_or_default();
                let policy = crate::target::Policy {
                    image_size: Some(image.size),
                    force: false,
                    image_paths: image.all_paths(),
                };
                let safety = crate::target::inspect(std::path::Path::new(&node))
                    .and_then(|(p, info)| crate::target::vet(&p, &info, &policy));
                let verdict = match safety {
                    Err(e) => format!("would be REFUSED: {e}"),
                    Ok(()) if flash_present => format!("would be flashed now with {}", image.path.display()),
                    Ok(()) => "present at start: left alone (pass --flash-present to flash it); a new card is flashed".to_string(),
                };
                (Some(node), Some(d.size), verdict)
            }
            many => {
                for d in many {
                    claimed.insert(d.syspath.clone());
                }
                (
                    None,
                    None,
                    format!(
                        "{} disks match this slot ({}): left alone; make the rules precise",
                        many.len(),
                        many.iter()
                            .filter_map(|d| d.devnode.clone())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            }
        };
        if example_identity.is_err() {
            example_identity = example(present.first().copied(), &s.name);
        }
        slots_out.push(SlotPlan {
            slot: s.name.clone(),
            rules: s.describe(),
            device,
            size,
            verdict,
        });
    }
    let outside = devs
        .iter()
        .filter(|d| d.size > 0 && !claimed.contains(&d.syspath))
        .filter_map(|d| d.devnode.clone())
        .collect();
    Ok(Plan {
        image: image.describe(),
        ledger: match &station.central {
            Some(c) => format!(
                "{} (station {:?}, outbox {}; serials leased from it at start)",
                central::redact(&c.url),
                c.station,
                ledger_path.display()
            ),
            None => ledger_path.display().to_string(),
        },
        next_seq,
        example_identity_error: example_identity.as_ref().err().cloned(),
        example_identity: example_identity.ok(),
        slots: slots_out,
        outside,
    })
}

/// Runs the station until SIGINT/SIGTERM (or `exit_after` units). Jobs still running at a
/// signal are cancelled and recorded as FAIL; a crash leaves them "started" in the ledger.
pub(crate) fn run(
    station: &config::Station,
    image: Arc<job::ImagePlan>,
    ledger: ledger::Ledger,
    ui: Arc<ui::Ui>,
    opts: &RunOptions,
) -> Result<Totals, StationError> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // First signal: cancel jobs and record them; a second one exits at once (the ledger
        // then shows those units as started, and the next start marks them interrupted).
        signal_hook::flag::register_conditional_shutdown(
            sig,
            Exit::Interrupted.code() as i32,
            stop.clone(),
        )
        .and_then(|_| signal_hook::flag::register(sig, stop.clone()))
        .map_err(|e| StationError::Environment(format!("install signal handler: {e}")))?;
    }
    let mut monitor = hotplug::Monitor::open(station.attr_keys())?;
    // libusb only when a slot needs it (a card-reader station works without usbfs).
    let usb: Option<Arc<dyn crate::usb::discovery::Bus + Send + Sync>> = station
        .has_usb_slots()
        .then(|| Arc::new(crate::usb::discovery::RusbBus::new()) as _);
    run_with(station, image, ledger, ui, opts, &mut monitor, usb, stop)
}

/// The station loop over any event source and USB bus (the udev monitor and libusb in
/// [`run`]; udev-shaped events and simulated boards in tests). Stops when `stop` is set
/// (jobs are cancelled and recorded) or after `exit_after` units.
#[allow(clippy::too_many_arguments)]
// Longer than 150 lines on purpose: the station's event loop (one arm per hotplug decision,
// then the wait for events, finished jobs and stop), sharing the slots, jobs and ledger it owns.
pub fn run_with(
    station: &config::Station,
    image: Arc<job::ImagePlan>,
    ledger: ledger::Ledger,
    ui: Arc<ui::Ui>,
    opts: &RunOptions,
    monitor: &mut dyn hotplug::EventSource,
    usb: Option<Arc<dyn crate::usb::discovery::Bus + Send + Sync>>,
    stop: Arc<AtomicBool>,
) -> Result<Totals, StationError> {
    let mut tracker = hotplug::Tracker::new(station.slots.clone());
    let ledger_path = ledger.path().to_path_buf();
    let ledger = Arc::new(Mutex::new(ledger));
    let ctx = Arc::new(job::Context {
        station: station.clone(),
        image,
        ledger: ledger.clone(),
        ui: ui.clone(),
        usb,
    });
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<job::Done>();
    let mut running: BTreeMap<String, job::Handle> = BTreeMap::new();
    let mut pending: BTreeMap<String, slots::DeviceInfo> = BTreeMap::new();
    let mut ended = 0u64;
    let mut totals = Totals::default();

    ui.show_slots(station.slots.iter().map(|s| {
        (
            s.name.as_str(),
            match s.kind {
                config::SlotKind::Block => "waiting for a card",
                config::SlotKind::Usb => "waiting for a board in recovery mode",
            },
        )
    }));

    let handle = |d: Decision,
                  running: &mut BTreeMap<String, job::Handle>,
                  pending: &mut BTreeMap<String, slots::DeviceInfo>| {
        match d {
            Decision::Start { slot, dev } => {
                let same_board = dev.is_usb_device()
                    && running.get(&slot).is_some_and(|h| !h.is_cancelled());
                if same_board {
                    // A board on a USB slot re-enumerates during its job (maskrom → loader):
                    // a new board cannot arrive without a removal, which cancels the job.
                    ui.say(
                        Level::Info,
                        format!(
                            "{slot}: board re-enumerated as {}; its job continues",
                            dev.devnode.as_deref().unwrap_or(&dev.syspath)
                        ),
                    );
                } else if running.contains_key(&slot) {
                    ui.say(
                        Level::Info,
                        format!("{slot}: new medium; waiting for the previous job to stop"),
                    );
                    pending.insert(slot, dev);
                } else {
                    running.insert(slot.clone(), job::spawn(ctx.clone(), slot, dev, done_tx.clone()));
                }
            }
            Decision::LeftAlone { slot, dev } => ui.say(
                Level::Info,
                format!(
                    "{slot}: {} was present at start; not flashed (use --flash-present, or replace it)",
                    dev.devnode.as_deref().unwrap_or(&dev.syspath)
                ),
            ),
            Decision::Removed {
                slot,
                devnode,
                reason,
                usb_address,
            } => {
                pending.remove(&slot);
                if let Some(h) = running.get(&slot) {
                    match h.removed(usb_address, &format!("{reason}: {devnode}")) {
                        job::Removal::Cancelled => ui.say(
                            Level::Warn,
                            format!("{slot}: {devnode} {reason}; cancelling its job"),
                        ),
                        job::Removal::Expected | job::Removal::Stale => ui.say(
                            Level::Info,
                            format!("{slot}: {devnode} left the bus as the job expects"),
                        ),
                    }
                } else {
                    ui.say(Level::Info, format!("{slot}: {devnode} {reason}; slot idle"));
                }
            }
            Decision::Refused { msg } => ui.say(Level::Warn, msg),
        }
    };

    for dev in monitor.enumerate()? {
        for d in tracker.on_event(Action::Present, &dev, opts.flash_present) {
            handle(d, &mut running, &mut pending);
        }
    }
    // Ready once the disks present at start are sorted out: a medium inserted from now on
    // arrives as an event, never half-seen by the enumeration.
    ui.say(
        Level::Info,
        format!(
            "station ready: {} slot(s), ledger {}, image {}",
            station.slots.len(),
            ledger_path.display(),
            ctx.image.describe()
        ),
    );

    let mut stopping = false;
    loop {
        while let Ok(done) = done_rx.try_recv() {
            if let Some(h) = running.remove(&done.slot) {
                h.join();
            }
            ended += 1;
            if done.pass {
                totals.pass += 1;
            } else {
                totals.fail += 1;
            }
            if let Some(dev) = pending.remove(&done.slot) {
                if !stopping {
                    running.insert(
                        done.slot.clone(),
                        job::spawn(ctx.clone(), done.slot.clone(), dev, done_tx.clone()),
                    );
                }
            }
        }
        if stop.load(Ordering::Relaxed) && !stopping {
            stopping = true;
            ui.say(
                Level::Warn,
                format!("stopping: cancelling {} running job(s)", running.len()),
            );
            for h in running.values() {
                h.cancel(job::CancelReason::Stopped);
            }
        }
        let batch_done = opts.exit_after.is_some_and(|n| ended >= n);
        if (stopping || batch_done) && running.is_empty() {
            break;
        }
        let events = monitor.poll(Duration::from_millis(200))?;
        if stopping {
            continue;
        }
        for (action, dev) in events {
            for d in tracker.on_event(action, &dev, opts.flash_present) {
                handle(d, &mut running, &mut pending);
            }
        }
    }
    ui.say(Level::Info, format!("station stopped; {}", ui.count_line()));
    Ok(totals)
}
