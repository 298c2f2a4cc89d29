//! `sbcflash read` (capture a disk, or a board over rockusb, as an image, [`crate::capture`])
//! and `sbcflash check-card`
//! (fake capacity and failing blocks, [`crate::cardcheck`]): flags and glue.

use super::Global;
use crate::capture::rockusb::BoardStorage;
use crate::capture::{self, Medium, Outputs, Source};
use crate::cardcheck;
use crate::exit::{Exit, ExitError};
use crate::progress::{Event, Level, Reporter};
use crate::target::{self, Policy, TargetInfo};
use crate::usb::discovery::{Bus, RusbBus};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  sbcflash read /dev/sdX card          # card.img.zst + card.img.bmap + card.img.blake3\n  sbcflash read --raw /dev/sdX card    # card.img, a sparse file\n  sbcflash read --json /dev/sdX card   # then: sbcflash write card.img.zst /dev/sdY\n  sbcflash read --via usb --storage emmc board   # a Rockchip board's eMMC over rockusb",
    // `write --via`'s flags, said for reading; fastboot's --partition does not apply.
    mut_arg("via", |a| a
        .help("Read a board in a USB recovery mode instead of DEVICE: `maskrom` (Rockchip: download \
               a loader, then rockusb), `usb` (Rockchip in whatever mode it is in), `usbboot` \
               (Raspberry Pi rpiboot, then the exposed disk). Only OUT is given")
        .long_help(None)
        .hide_possible_values(true)),
    mut_arg("storage", |a| a.help("Storage to read over rockusb: emmc, sd, spi")),
    mut_arg("partition", |a| a.hide(true))
)]
pub struct ReadArgs {
    /// DEVICE OUT: the disk (or image file) to capture, only read, and the output name:
    /// OUT.img.zst (or OUT.img with --raw), OUT.img.bmap, OUT.img.blake3. With --via only
    /// OUT: the board's storage is read.
    #[arg(value_name = "DEVICE|OUT", num_args = 1..=2, required = true)]
    pub(crate) paths: Vec<PathBuf>,
    /// Write a plain sparse OUT.img instead of OUT.img.zst.
    #[arg(long)]
    pub(crate) raw: bool,
    /// Replace existing outputs; read a mounted disk (its file systems may change meanwhile).
    #[arg(long)]
    pub(crate) force: bool,
    /// zstd compression threads (0: one per core).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub(crate) threads: u32,
    /// zstd level (1-19).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19), value_name = "N")]
    pub(crate) level: i32,
    /// --via/--loader/--storage/--usb-port/--no-reset: read a board in a USB recovery mode,
    /// brought up as `write --via` does (fastboot cannot read).
    #[command(flatten)]
    pub(crate) usb: super::usb::ViaArgs,
    /// With --via: the board (its USB ID and loader names, as for `write --via --board`).
    #[arg(long, value_name = "BOARD", requires = "via")]
    pub(crate) board: Option<String>,
    /// With --via: the board's medium to read (picks the rockusb storage, as for `write`).
    #[arg(long, value_name = "MEDIUM", requires = "via")]
    pub(crate) medium: Option<crate::board::schema::MediumKind>,
}

/// Ctrl-C/SIGTERM set the flag; a second one exits at once.
fn install_cancel() -> Arc<AtomicBool> {
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, cancel.clone());
        let _ = signal_hook::flag::register(sig, cancel.clone());
    }
    cancel
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Open the source read-only: O_DIRECT on a device (buffered if it refuses), and O_EXCL
/// unless `--force`, so it cannot be mounted while it is read.
fn open_source(path: &Path, force: bool) -> anyhow::Result<Source> {
    let (resolved, info) = target::inspect(path)?;
    let name = resolved.display().to_string();
    let refuse = |reason: String| -> anyhow::Error {
        ExitError::new(Exit::Refused, format!("refusing to read {name}: {reason}")).into()
    };
    let (size, device) = match &info {
        TargetInfo::Device(d) => {
            if d.mounted() && !force {
                return Err(refuse(format!(
                    "mounted at {} (unmount it first: a mounted file system changes while it is \
                     read; --force reads it anyway)",
                    d.mountpoints.join(", ")
                )));
            }
            (d.size, true)
        }
        TargetInfo::File { exists: false, .. } => {
            return Err(ExitError::new(Exit::Io, format!("{name}: no such file or device")).into())
        }
        TargetInfo::File { size, .. } => (*size, false),
    };
    let open = |direct: bool| {
        let mut flags = libc::O_CLOEXEC;
        if device && !force {
            flags |= libc::O_EXCL;
        }
        if direct {
            flags |= libc::O_DIRECT;
        }
        OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(&resolved)
    };
    let file = match open(device) {
        Err(e) if device && e.raw_os_error() == Some(libc::EINVAL) => open(false),
        r => r,
    };
    let file: File = file.map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => refuse(
            "it is in use (mounted or claimed by another program); --force reads it anyway".into(),
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => ExitError::new(
            Exit::Environment,
            format!("{name}: permission denied opening it for reading; run as root or join the group that owns it"),
        )
        .into(),
        _ => anyhow::Error::new(e).context(format!("opening {name}")),
    })?;
    Ok(Source { file, name, size })
}

pub(crate) fn run_read(a: ReadArgs, g: &Global) -> anyhow::Result<Exit> {
    run_read_on(&RusbBus::new(), a, g)
}

/// `read` with the USB bus to bring a board up on (the simulated one in tests); the bus is
/// only used with `--via`.
pub fn run_read_on(bus: &dyn Bus, a: ReadArgs, g: &Global) -> anyhow::Result<Exit> {
    let usage = |m: &str| -> anyhow::Error { ExitError::new(Exit::Usage, m.to_string()).into() };
    let reporter = g.reporter();
    match (a.usb.via, a.paths.as_slice()) {
        (None, [device, out]) => {
            let mut src = open_source(device, a.force)?;
            read_into(&mut src, out, &a, g, reporter.as_ref(), None)
        }
        (None, _) => Err(usage(
            "give DEVICE and OUT (or --via PROTOCOL and only OUT, for a board over USB)",
        )),
        (Some(via), [out]) => read_via(bus, via, out, &a, g, reporter.as_ref()),
        (Some(_), _) => Err(usage(
            "with --via, give only OUT: the board's storage is what is read",
        )),
    }
}

/// Bring the board up as `write --via` does ([`crate::usb::flash::bring_up`]) and capture its
/// storage: over rockusb READ_LBA, or the block device usbboot exposes.
fn read_via(
    bus: &dyn Bus,
    via: crate::usb::flash::Via,
    out: &Path,
    a: &ReadArgs,
    g: &Global,
    reporter: &dyn Reporter,
) -> anyhow::Result<Exit> {
    use crate::usb::flash::{self, Ready, Via};
    if via == Via::Fastboot {
        return Err(ExitError::new(
            Exit::Usage,
            "read --via fastboot: fastboot cannot read a board's storage; use --via maskrom or \
             usb (Rockchip) or usbboot (Raspberry Pi)",
        )
        .into());
    }
    // Refuse existing outputs before the board is touched.
    Outputs::new(out, a.raw).check(a.force)?;
    let board = super::boards::BoardWriteArgs {
        board: a.board.clone(),
        medium: a.medium,
        ..Default::default()
    };
    let opts = super::usb::ViaPlan::new(via, a.usb.clone(), &board, g)?.options;
    let ready = flash::bring_up(bus, &opts, reporter, &flash::Untracked)?;
    match ready {
        Ready::Block { path } => {
            let mut src = open_source(&path, a.force)?;
            read_into(&mut src, out, a, g, reporter, Some(&opts.job))
        }
        Ready::Rockusb { label, sink } => {
            let Some(mut storage) = BoardStorage::new(sink, label.clone()) else {
                return Err(ExitError::new(
                    Exit::Environment,
                    format!(
                        "{label}: the loader does not report its storage's size (mainline \
                         U-Boot's rockusb?), so where the storage ends is unknown; read it with \
                         a vendor loader (--via maskrom --loader FILE)"
                    ),
                )
                .into());
            };
            let code = read_into(&mut storage, out, a, g, reporter, Some(&opts.job))?;
            if opts.reset {
                storage.into_sink().reset()?;
            }
            Ok(code)
        }
    }
}

/// Plan and capture `src` into OUT's three files; the result line. `job`: the bring-up's job
/// name with `--via`, so its events and the capture's are one job (else the source's name).
fn read_into(
    src: &mut dyn Medium,
    out: &Path,
    a: &ReadArgs,
    g: &Global,
    reporter: &dyn Reporter,
    job: Option<&str>,
) -> anyhow::Result<Exit> {
    let outputs = Outputs::new(out, a.raw);
    for p in [&outputs.image, &outputs.bmap, &outputs.blake3] {
        if same_file(p, Path::new(src.name())) {
            return Err(ExitError::new(
                Exit::Refused,
                format!("refusing to write {}: it is the source itself", p.display()),
            )
            .into());
        }
    }
    outputs.check(a.force)?;
    let job = job.unwrap_or(src.name()).to_string();
    let plan = capture::plan(src)?;
    for p in &plan.partitions {
        let text = match &p.whole_because {
            None => format!(
                "partition {}: {} of {} used ({})",
                p.number,
                target::human_size(p.used),
                target::human_size(p.size),
                p.fs
            ),
            Some(why) => format!(
                "partition {}: {} copied whole ({}): {why}",
                p.number,
                target::human_size(p.size),
                p.fs
            ),
        };
        let level = if p.whole_because.is_some() {
            Level::Warn
        } else {
            Level::Info
        };
        reporter.report(Event::Message {
            job: job.clone(),
            level,
            text,
        });
    }
    let opts = capture::Options {
        threads: a.threads,
        level: a.level,
        cancel: install_cancel(),
        job: job.clone(),
    };
    let report = capture::capture(src, plan, &outputs, &opts, reporter)?;
    if g.json {
        let v = serde_json::json!({ "job": job, "ok": true, "report": report });
        crate::progress::json_line(&mut super::out::stdout(), "result", v)?;
    } else {
        outln!(
            "{}: {} of {} captured into {} ({} bytes), {}, {}; blake3 {}",
            report.source,
            target::human_size(report.mapped_bytes),
            target::human_size(report.image_size),
            report.outputs.image.display(),
            report.output_bytes,
            report.outputs.bmap.display(),
            report.outputs.blake3.display(),
            report.blake3
        );
    }
    Ok(Exit::Ok)
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  sbcflash check-card /dev/sdX          # asks, writes ~1024 probe blocks, reads them back\n  sbcflash check-card --yes --json /dev/sdX"
)]
pub struct CheckCardArgs {
    /// The card (block device) to check; an existing file works too.
    pub(crate) device: PathBuf,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub(crate) yes: bool,
    /// Allow non-removable disks and partitions.
    #[arg(long)]
    pub(crate) force: bool,
    /// How many probe blocks to spread over the claimed size (at most).
    #[arg(long, default_value_t = cardcheck::DEFAULT_PROBES as u32, value_parser = clap::value_parser!(u32).range(2..=1_000_000), value_name = "N")]
    pub(crate) probes: u32,
}

fn confirm_check(info: &TargetInfo, yes: bool) -> anyhow::Result<()> {
    if yes {
        return Ok(());
    }
    let what = info.describe();
    if !std::io::stdin().is_terminal() {
        return Err(ExitError::new(
            Exit::Refused,
            format!(
                "refusing to check {what}: it writes test blocks, and stdin is not a terminal, so \
                 there is no one to confirm; pass --yes"
            ),
        )
        .into());
    }
    let mut e = std::io::stderr();
    let _ = writeln!(e, "About to WRITE test blocks across {what}");
    let _ = writeln!(
        e,
        "(each block's old contents are read first and written back afterwards; an interrupted \
         or failing card may keep test blocks)"
    );
    let _ = write!(e, "Type 'yes' to continue: ");
    let _ = e.flush();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if line.trim() != "yes" {
        return Err(ExitError::new(Exit::Refused, "not confirmed; nothing was written").into());
    }
    Ok(())
}

pub(crate) fn run_check_card(a: CheckCardArgs, g: &Global) -> anyhow::Result<Exit> {
    let reporter = g.reporter();
    let (resolved, info) = target::inspect(&a.device)?;
    if let TargetInfo::File {
        exists: false,
        path,
        ..
    } = &info
    {
        return Err(ExitError::new(
            Exit::Io,
            format!("{}: no such file or device", path.display()),
        )
        .into());
    }
    let policy = Policy {
        force: a.force,
        ..Default::default()
    };
    target::vet(&resolved, &info, &policy)?;
    confirm_check(&info, a.yes)?;
    let t = target::open(&resolved, &policy)?;
    let size = match &t.info {
        TargetInfo::Device(d) => d.size,
        TargetInfo::File { size, .. } => *size,
    };
    let job = t.path.display().to_string();
    let opts = cardcheck::Options {
        probes: a.probes as usize,
        // Only a device has a medium the cache could answer for.
        flush_cache: !t.direct && matches!(t.info, TargetInfo::Device(_)),
        cancel: install_cancel(),
        job: job.clone(),
    };
    let result = cardcheck::check(&t.file, &job, size, &opts, reporter.as_ref());
    let report = match &result {
        Ok(r) => r.clone(),
        Err(cardcheck::CheckError::Failed { report, .. }) => (**report).clone(),
        Err(_) => return Ok(result.map(|_| Exit::Ok)?),
    };
    if g.json {
        let v = serde_json::json!({ "job": job, "ok": report.ok, "report": report });
        crate::progress::json_line(&mut super::out::stdout(), "result", v)?;
    } else {
        outln!("{job}: {}", report.reason());
        const SHOWN: usize = 10;
        for p in report.problems.iter().take(SHOWN) {
            outln!("  {}", p.describe());
        }
        if report.problems.len() > SHOWN {
            outln!(
                "  ... and {} more (--json lists all)",
                report.problems.len() - SHOWN
            );
        }
        if !report.restored {
            outln!("  not every probed block's old contents could be written back");
        }
    }
    result?;
    Ok(Exit::Ok)
}
