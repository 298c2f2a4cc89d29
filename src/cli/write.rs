//! `sbcflash write`, `list`, `hash`, `verify`: flags and glue over [`crate::image`],
//! [`crate::target`] and [`crate::write`].

use super::Global;
use crate::exit::{Exit, ExitError};
use crate::image::{self, OpenedImage};
use crate::job::BlockJob;
use crate::progress::Phase;
use crate::progress::{Event, Level};
use crate::target::{self, Policy, TargetInfo};
use crate::usb::flash::Via;
use crate::write::{self, WriteOptions};
use anyhow::Context;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Image-selection flags shared by write, hash and verify.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ImageFlags {
    /// Use this bmap file (default: IMAGE.bmap or IMAGE-without-compression-suffix.bmap).
    #[arg(long, value_name = "FILE", conflicts_with = "no_bmap")]
    pub(crate) bmap: Option<PathBuf>,
    /// Ignore any bmap: write every byte of the image (zero blocks still zeroed cheaply).
    #[arg(long)]
    pub(crate) no_bmap: bool,
    /// The member of a .zip image to use, when it holds several (the error lists them).
    #[arg(long, value_name = "NAME")]
    pub(crate) member: Option<String>,
}

impl ImageFlags {
    fn options(&self) -> image::OpenOptions {
        image::OpenOptions {
            bmap: self.bmap.clone(),
            no_bmap: self.no_bmap,
            member: self.member.clone(),
        }
    }

    pub(crate) fn open(&self, path: &Path) -> anyhow::Result<OpenedImage> {
        let md = std::fs::metadata(path).map_err(|source| image::ImageError::Io {
            path: path.display().to_string(),
            source,
        })?;
        if md.is_file() {
            return Ok(image::open_image(path, &self.options())?);
        }
        // A pipe or character device (`<(curl ...)`, a FIFO): stream it, no seeking.
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| image::ImageError::Io {
            path: name.clone(),
            source,
        })?;
        let bmap = match (&self.bmap, self.no_bmap) {
            (Some(b), false) => Some(image::Bmap::load(b)?),
            _ => None,
        };
        let bmap_path = bmap.as_ref().map(|b| b.path.clone());
        let consumed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let reader = image::detect::CountingReader::new(file, consumed.clone());
        let source =
            image::from_reader_member(Box::new(reader), &name, None, bmap, self.member.as_deref())?;
        Ok(OpenedImage {
            description: source.describe(),
            logical_size: source.size_hint(),
            source,
            path: path.to_path_buf(),
            formats: Vec::new(),
            bmap: bmap_path,
            input_consumed: consumed,
        })
    }
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  sbcflash write nixos-sd-image.img.zst /dev/sdb\n  sbcflash write --board opi5 --image nixos.img.zst /dev/sdb --yes\n  sbcflash write image.img out.img            # a regular file target stays sparse\n  sbcflash write --delta new-build.img.zst /dev/sdb   # re-flash: only what differs is written"
)]
pub struct WriteArgs {
    /// IMAGE TARGET (or only TARGET with --image).
    #[arg(value_name = "IMAGE|TARGET", num_args = 1..=2, required = true)]
    pub(crate) paths: Vec<PathBuf>,
    /// The image (long form; then the only positional argument is the target).
    #[arg(long, value_name = "PATH")]
    pub(crate) image: Option<PathBuf>,
    /// --board/--medium/--spi/--strict/--bootloader: check the image against a board's
    /// descriptor before writing, place bootloader files after it (see `sbcflash boards`).
    #[command(flatten)]
    pub(crate) board: super::boards::BoardWriteArgs,
    #[command(flatten)]
    pub(crate) img: ImageFlags,
    /// Expected blake3 of the logical image (default: IMAGE.blake3 sidecar if present).
    #[arg(long, value_name = "HEX")]
    pub(crate) blake3: Option<String>,
    /// Skip reading the target back after writing.
    #[arg(long)]
    pub(crate) no_verify: bool,
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(short, long)]
    pub(crate) yes: bool,
    /// Allow targets that are not removable USB disks, SD cards or loop devices, and an
    /// existing file target that looks like an image (or a block device as the source).
    #[arg(long)]
    pub(crate) force: bool,
    /// Write the source even when it does not look like a disk image (no partition table,
    /// file system or bootloader signature at its start): for raw blobs.
    #[arg(long)]
    pub(crate) raw: bool,
    /// After a successful write, flush the disk and eject it so it can be pulled at once: a
    /// card reader's (removable) medium is ejected, as `eject` does; a plain USB disk is
    /// powered off (its USB device removed from the kernel, as `udisksctl power-off`).
    #[arg(long)]
    pub(crate) eject: bool,
    /// Do not discard the device before writing.
    #[arg(long)]
    pub(crate) no_discard: bool,
    /// Re-flash in proportion to the change: read the target first (4 MiB at a time, in
    /// parallel with the image) and write only what differs; verified as usual. Implies
    /// --no-discard.
    #[arg(long)]
    pub(crate) delta: bool,
    /// A range that reads back wrong is written again up to N times before the write fails
    /// (the image must be a file that can be read again); 0 fails at once. (`--retries` is
    /// the download's.)
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub(crate) rewrites: u32,
    /// IMAGE may be an https:// URL (or absent with --board: the board's default source):
    /// it is downloaded, decompressed and written in one pass.
    #[command(flatten)]
    pub(crate) stream: super::acquire::StreamArgs,
    #[command(flatten)]
    pub(crate) usb: super::usb::ViaArgs,
    /// --trusted-key/--signature/--manifest/--require-signature: who must have signed it.
    #[command(flatten)]
    pub(crate) trust: super::trust::TrustArgs,
}

/// Image-vs-board checks by the board module: may refuse (`--strict`), and plans the
/// `--bootloader` placements. Runs after the image is opened and before the target is opened
/// or anything is written. The image head is read from a fresh open of the file (pipes are
/// checked on their peeked head in `run_write` instead).
pub(crate) fn board_checks(
    board: Option<&super::boards::BoardPlan>,
    image: &Path,
    member: Option<&str>,
    g: &Global,
) -> anyhow::Result<Option<super::boards::BoardPreflight>> {
    super::boards::check_file(board, image, member, g)
}

fn is_regular_file(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file())
}

/// `--blake3 HEX`, parsed (a usage error names the flag).
fn blake3_flag(flag: Option<&str>) -> anyhow::Result<Option<[u8; 32]>> {
    let Some(h) = flag else { return Ok(None) };
    let d = image::digest::parse_hex(h)
        .map_err(|m| ExitError::new(Exit::Usage, format!("--blake3 {h}: {m}")))?;
    Ok(Some(*d.as_bytes()))
}

/// The expected digest and where it came from: `--blake3`, else the `IMAGE.blake3` sidecar
/// (named in a mismatch, with how to renew it), else none.
fn expected_digest(
    flag: Option<[u8; 32]>,
    image_path: &Path,
) -> anyhow::Result<(Option<[u8; 32]>, Option<String>)> {
    if let Some(d) = flag {
        return Ok((Some(d), Some("--blake3".into())));
    }
    let side = image::digest::sidecar_path(image_path);
    if side.exists() {
        let d = image::digest::read_sidecar(&side, image_path)?;
        tracing::info!("expecting blake3 from {}", side.display());
        let from = format!(
            "the sidecar {}; if the image was rebuilt since, the sidecar is stale: `sbcflash hash --write-sidecar {}` renews it",
            side.display(),
            image_path.display()
        );
        return Ok((Some(*d.as_bytes()), Some(from)));
    }
    Ok((None, None))
}

/// Ctrl-C/SIGTERM set `cancel`; a second Ctrl-C exits at once.
fn install_cancel() -> Arc<AtomicBool> {
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, cancel.clone());
        let _ = signal_hook::flag::register(sig, cancel.clone());
    }
    cancel
}

/// Whether writing `info` destroys something: a disk, or an existing non-empty file. A new (or
/// empty) file needs no question, like `cp`.
fn destroys_contents(info: &TargetInfo) -> bool {
    match info {
        TargetInfo::Device(_) => true,
        TargetInfo::File { exists, size, .. } => *exists && *size > 0,
    }
}

/// Without --yes and without a terminal to ask on, a destructive write is refused.
fn refuse_unconfirmed(info: &TargetInfo, yes: bool) -> anyhow::Result<()> {
    if yes || !destroys_contents(info) || std::io::stdin().is_terminal() {
        return Ok(());
    }
    let (path, what) = match info {
        TargetInfo::Device(d) => (d.path.clone(), "a disk"),
        TargetInfo::File { path, .. } => (
            path.clone(),
            "an existing file whose contents would be replaced",
        ),
    };
    Err(ExitError::new(
        Exit::Refused,
        format!(
            "refusing to write {}: it is {what}, and stdin is not a terminal, so there is no one to confirm; pass --yes",
            path.display()
        ),
    )
    .into())
}

fn confirm(info: &TargetInfo, image: &OpenedImage, yes: bool) -> anyhow::Result<()> {
    if yes || !destroys_contents(info) {
        return Ok(());
    }
    refuse_unconfirmed(info, yes)?;
    let mut e = std::io::stderr();
    let d = match info {
        TargetInfo::Device(d) => d,
        TargetInfo::File { path, size, .. } => {
            let _ = writeln!(
                e,
                "About to OVERWRITE the existing file {} ({} bytes, {})",
                path.display(),
                size,
                target::human_size(*size)
            );
            let _ = writeln!(e, "with {} ({})", image.path.display(), image.description);
            let _ = write!(e, "Its contents will be lost. Type 'yes' to continue: ");
            return read_yes(&mut e);
        }
    };
    let _ = writeln!(e, "About to OVERWRITE {}", d.describe());
    if let Some(s) = &d.serial {
        let _ = writeln!(e, "  serial: {s}");
    }
    for p in &d.partitions {
        let _ = writeln!(
            e,
            "  {} {}{}",
            p.name,
            target::human_size(p.size),
            if p.mountpoints.is_empty() {
                String::new()
            } else {
                format!(" mounted at {}", p.mountpoints.join(", "))
            }
        );
    }
    let _ = writeln!(e, "with {} ({})", image.path.display(), image.description);
    let _ = write!(
        e,
        "Everything on {} will be lost. Type 'yes' to continue: ",
        d.path.display()
    );
    read_yes(&mut e)
}

fn read_yes(e: &mut std::io::Stderr) -> anyhow::Result<()> {
    let _ = e.flush();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if line.trim() != "yes" {
        return Err(ExitError::new(Exit::Refused, "not confirmed; nothing was written").into());
    }
    Ok(())
}

/// A download failure can replace the writer's error (which said what it left on the
/// target): say it again.
fn still_says_target_state(e: anyhow::Error, state: Option<write::TargetState>) -> anyhow::Error {
    let text = super::error_text(&e);
    match state {
        Some(s) if !text.contains(&s.to_string()) => {
            ExitError::new(crate::cli::classify(&e), format!("{text}; {s}")).into()
        }
        _ => e,
    }
}

/// Refuses a source whose logical head is not a disk image (a zip, a tar, text, nothing), so
/// that a wrong file is named before the target is touched; `--raw` writes it anyway.
fn require_image(head: &[u8], what: &str, raw: bool) -> anyhow::Result<()> {
    use image::sniff::{sniff, Sniffed};
    match sniff(head) {
        Sniffed::Image(k) => {
            tracing::info!("{what}: starts with {}", k.describe());
            Ok(())
        }
        Sniffed::Other(_) if raw => Ok(()),
        Sniffed::Other(k) => Err(image::ImageError::Invalid {
            path: what.to_string(),
            msg: format!(
                "does not look like a disk image: it is {}, with no partition table, file system or \
                 bootloader signature at the start of its contents{}; nothing was written. Pass \
                 --raw to write it anyway",
                k.describe(),
                k.advice().map(|a| format!("; {a}")).unwrap_or_default()
            ),
        }
        .into()),
    }
}

/// Early, image-independent target checks for commands that produce the image first
/// (`build TARGET`): the target exists and may be written, and someone can confirm. The
/// full checks (size, board, confirmation) still run in [`run_write`] once the image exists.
pub(crate) fn precheck_target(target: &Path, force: bool, yes: bool) -> anyhow::Result<()> {
    let (resolved, info) = target::inspect(target)?;
    let policy = Policy {
        image_size: None,
        force,
        image_paths: Vec::new(),
    };
    target::vet(&resolved, &info, &policy)?;
    target::vet_file_target(&info, Path::new(""), force)?;
    refuse_unconfirmed(&info, yes)
}

/// `write`'s flags and config, resolved and validated once (ripgrep's `LowArgs` → `HiArgs`):
/// after [`WritePlan::new`] nothing reads the clap struct again. `build TARGET` makes one too.
#[derive(Debug)]
pub(crate) struct WritePlan {
    /// The image as given: a file, a pipe, an https:// URL; `None` for the default source of
    /// the board named with `--board`.
    pub(crate) image: Option<PathBuf>,
    /// The target; `None` with `--via` (the board itself, or what usbboot exposes).
    pub(crate) target: Option<PathBuf>,
    pub(crate) img: ImageFlags,
    /// The board checked against (`--board`, else the config's default board) and its medium.
    pub(crate) board: Option<super::boards::BoardPlan>,
    /// `--board` as given: only a named board supplies a default image source.
    pub(crate) board_flag: Option<String>,
    /// `--blake3`, parsed (else the sidecar is looked for next to the image).
    pub(crate) blake3: Option<[u8; 32]>,
    pub(crate) checks: Checks,
    pub(crate) stream: super::acquire::StreamArgs,
    pub(crate) via: Option<super::usb::ViaPlan>,
    /// Trusted keys and whether a signature is required (checked before the target is touched).
    pub(crate) trust: crate::trust::TrustPlan,
}

/// What `write` checks and does around the pipeline.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Checks {
    pub(crate) verify: bool,
    pub(crate) yes: bool,
    pub(crate) force: bool,
    pub(crate) raw: bool,
    pub(crate) eject: bool,
    pub(crate) discard: bool,
    /// `--delta`: write only what differs from the target's contents.
    pub(crate) delta: bool,
    /// `--rewrites`: rewrites of a range that reads back wrong.
    pub(crate) retries: u32,
}

impl WritePlan {
    /// Validate the flag combinations and resolve the board, medium, digest and `--via`.
    pub(crate) fn new(a: WriteArgs, g: &Global) -> anyhow::Result<WritePlan> {
        let usage = |m: &str| -> anyhow::Error { ExitError::new(Exit::Usage, m).into() };
        let (image, target) = match (&a.usb.via, a.image, a.paths.as_slice()) {
            (Some(_), Some(i), []) => (Some(i), None),
            (Some(_), None, [i]) => (Some(i.clone()), None),
            (Some(_), ..) => return Err(usage("with --via, give only the IMAGE")),
            (None, Some(i), [t]) => (Some(i), Some(t.clone())),
            (None, None, [i, t]) => (Some(i.clone()), Some(t.clone())),
            // Only TARGET with --board: the board's default image source, streamed.
            (None, None, [t]) if a.board.board.is_some() => (None, Some(t.clone())),
            (None, Some(_), _) => return Err(usage("with --image, give only the TARGET")),
            (None, None, _) => return Err(usage("give IMAGE and TARGET")),
        };
        let blake3 = blake3_flag(a.blake3.as_deref())?;
        // A USB recovery write that ends on the board checks nothing against a configured
        // board; usbboot continues as a block write, which does.
        let direct_usb = a
            .usb
            .via
            .is_some_and(|v| v != crate::usb::flash::Via::Usbboot);
        let board = match direct_usb && a.board.bootloader.is_empty() {
            true => None,
            false => a.board.plan(g)?,
        };
        let trust = super::trust::plan(&a.trust, board.as_ref().map(|b| &b.board), g)?;
        let via = match a.usb.via {
            Some(v) => Some(super::usb::ViaPlan::new(v, a.usb, &a.board, g)?),
            None => None,
        };
        Ok(WritePlan {
            image,
            target,
            img: a.img,
            board,
            board_flag: a.board.board,
            blake3,
            checks: Checks {
                verify: !a.no_verify,
                yes: a.yes,
                force: a.force,
                raw: a.raw,
                eject: a.eject,
                discard: !a.no_discard && !a.delta,
                delta: a.delta,
                retries: a.rewrites,
            },
            stream: a.stream,
            via,
            trust,
        })
    }
}

pub(crate) fn run_write(a: WriteArgs, g: &Global) -> anyhow::Result<Exit> {
    run_plan(WritePlan::new(a, g)?, g)
}

/// `--via`: the USB recovery path runs first; usbboot hands back a block device to write,
/// the others finish on the board (`None`). Without `--via`: the plan's image and target.
fn via_first(p: &WritePlan, g: &Global) -> anyhow::Result<Option<(PathBuf, PathBuf)>> {
    Ok(match (&p.via, &p.image, &p.target) {
        (Some(via), Some(i), _) => {
            // A named medium (--spi, --medium) may well be a bootloader flash: blobs are normal.
            if is_regular_file(i) && via.medium.is_none() {
                let head =
                    image::read_logical_prefix(i, &p.img.options(), image::sniff::SNIFF_LEN)?;
                require_image(&head, &i.display().to_string(), p.checks.raw)?;
            }
            // `--bootloader` over rockusb: checked and planned on the image like a block
            // write, placed through the same session after the image.
            let pre = match via.options.via {
                Via::Usbboot => None,
                _ if p.board.as_ref().is_some_and(|b| !b.bootloader.is_empty()) => {
                    board_checks(p.board.as_ref(), i, p.img.member.as_deref(), g)?
                }
                _ => None,
            };
            let img = p.img.open(i)?;
            let name = i.display().to_string();
            let verdict = p.trust.check(crate::trust::Input {
                file: is_regular_file(i).then_some(i.as_path()),
                name: &name,
                bmap: img.bmap.as_deref(),
                board: p.board.as_ref().map(|b| b.board.id()),
            })?;
            if verdict.expected_blake3.is_some() {
                // The USB writers take no expected digest: a manifest's digest would go unchecked.
                return Err(ExitError::new(
                    Exit::Usage,
                    "--manifest is not supported with --via yet: write through a block device, or sign the image file itself",
                )
                .into());
            }
            super::trust::report(&verdict, &name, g.reporter().as_ref());
            let placements = pre
                .as_ref()
                .map(|b| b.placements.clone())
                .unwrap_or_default();
            let dev =
                super::usb::write_via(via, img, p.checks.verify, p.checks.delta, placements, g)?;
            if let Some(pre) = &pre {
                super::boards::say_placed(pre, g)?;
            }
            dev.map(|dev| (i.clone(), dev))
        }
        (_, i, Some(t)) => Some((i.clone().unwrap_or_default(), t.clone())),
        _ => return Err(ExitError::new(Exit::Usage, "give IMAGE and TARGET").into()),
    })
}

/// Run a [`WritePlan`]: `--via` first (its USB part), then the image (file, pipe or stream)
/// checked against the target and the board, confirmation, the [`BlockJob`], the result.
pub(crate) fn run_plan(p: WritePlan, g: &Global) -> anyhow::Result<Exit> {
    let Some((image_path, target_path)) = via_first(&p, g)? else {
        return Ok(Exit::Ok);
    };
    // One reporter for the whole run: a streamed image's download and its write show as one
    // job (the target) with two phases, in one group of progress lines.
    let reporter: Arc<dyn crate::progress::Reporter> = Arc::from(g.reporter());
    // The writer's job is the opened target's resolved path; name the download the same.
    let job_name = target_path
        .canonicalize()
        .unwrap_or_else(|_| target_path.clone());
    let image_arg = (!image_path.as_os_str().is_empty()).then(|| image_path.to_string_lossy());
    let remote = super::acquire::remote_image(
        image_arg.as_deref(),
        p.board_flag.as_deref(),
        &p.stream,
        p.img.member.as_deref(),
        g,
        reporter.clone(),
        &job_name.display().to_string(),
    )?;
    let (mut opened, remote, image_path) = match remote {
        Some((o, check)) => {
            let p = o.path.clone();
            (o, Some(check), p)
        }
        None => (p.img.open(&image_path)?, None, image_path.clone()),
    };
    let (expected, expected_from) = expected_digest(p.blake3, &image_path)?;
    // Signatures and a signed manifest, before the target is looked at.
    let trust_name = image_arg
        .as_deref()
        .map(str::to_string)
        .unwrap_or_else(|| image_path.display().to_string());
    let verdict = p.trust.check(crate::trust::Input {
        file: (remote.is_none() && is_regular_file(&image_path)).then_some(image_path.as_path()),
        name: &trust_name,
        bmap: opened.bmap.as_deref(),
        board: p.board.as_ref().map(|b| b.board.id()),
    })?;
    super::trust::report(&verdict, &job_name.display().to_string(), reporter.as_ref());
    let (expected, expected_from) = match (&verdict.expected_blake3, expected) {
        (Some((m, from)), Some(e)) if *m != e => {
            return Err(crate::trust::TrustError::Mismatch {
                what: trust_name.clone(),
                msg: format!(
                    "{from} gives blake3 {}, but {} gives {}",
                    hex::encode(m),
                    expected_from.unwrap_or_default(),
                    hex::encode(e)
                ),
            }
            .into())
        }
        (Some((m, from)), _) => (Some(*m), Some(from.clone())),
        (None, e) => (e, expected_from),
    };

    let (resolved, info) = target::inspect(&target_path)?;
    // With --via usbboot the target is the disk that appeared on the board's own USB port
    // after our boot files ran: the board's storage by construction, so the removable-class
    // rule (which keeps a host's internal disks safe) does not apply; every other rule does.
    // Seen through a real USB stack: a mass-storage gadget's LUN need not be removable.
    let board_disk = p.via.is_some();
    let policy = crate::job::policy_for(&image_path, &opened, p.checks.force || board_disk);
    target::vet(&resolved, &info, &policy)?;
    target::vet_file_target(&info, &image_path, p.checks.force)?;
    // --eject that cannot be done is refused now, not after the write.
    let eject = match (&info, p.checks.eject) {
        (_, false) => None,
        (TargetInfo::Device(d), true) => Some(target::eject::plan(d)?),
        (TargetInfo::File { path, .. }, true) => {
            return Err(ExitError::new(
                Exit::Usage,
                format!("--eject: {} is a regular file, not a disk", path.display()),
            )
            .into())
        }
    };
    // A pipe, FIFO or device cannot be read twice: peek its head through the opened source.
    let peeked = match &remote {
        None if !is_regular_file(&image_path) => {
            let want = if p.board.is_some() {
                crate::board::check::HEAD_LEN
            } else {
                image::sniff::SNIFF_LEN
            };
            let (src, head) = image::HeadPeek::new(opened.source, want)?;
            opened.source = Box::new(src);
            Some(head)
        }
        _ => None,
    };
    let what = image_arg
        .as_deref()
        .map(str::to_string)
        .unwrap_or_else(|| image_path.display().to_string());
    // A streamed image is checked on its head, read from the stream before any write.
    let board_pre = match (&remote, &peeked) {
        (Some(r), _) => super::boards::check_stream(p.board.as_ref(), &r.spec.url, r.head(), g)?,
        (None, Some(head)) => super::boards::check_stream(p.board.as_ref(), &what, head, g)?,
        (None, None) => board_checks(p.board.as_ref(), &image_path, p.img.member.as_deref(), g)?,
    };
    // Is it a disk image at all? Decided on the logical head, before the target is touched.
    // A board medium that holds only a bootloader (SPI flash, eMMC boot area) takes blobs.
    let blob_ok = p.checks.raw
        || board_pre
            .as_ref()
            .is_some_and(|p| p.medium.boot == crate::board::schema::BootSource::BootloaderOnly);
    match (&remote, &peeked) {
        (Some(r), _) => require_image(r.head(), &what, blob_ok)?,
        (None, Some(head)) => require_image(head, &what, blob_ok)?,
        (None, None) => {
            let head =
                image::read_logical_prefix(&image_path, &p.img.options(), image::sniff::SNIFF_LEN)
                    .map_err(|e| {
                        still_says_target_state(e.into(), Some(write::TargetState::Untouched))
                    })?;
            require_image(&head, &what, blob_ok)?
        }
    }
    confirm(&info, &opened, p.checks.yes)?;
    // Re-inspects, re-vets, opens O_EXCL and re-checks through the fd.
    let mut claimed = BlockJob::claim(&target_path, &policy, p.checks.discard)?;
    let opened_path = claimed.path.clone();
    let cancel = install_cancel();
    let job = claimed.name();
    reporter.report(Event::Message {
        job: job.clone(),
        level: Level::Info,
        text: format!(
            "writing {} ({}) to {}",
            image_path.display(),
            opened.description,
            info.describe()
        ),
    });
    // A file can be read again for --rewrites; a stream cannot.
    let reopen: Option<write::Reopen> = match (&remote, is_regular_file(&image_path)) {
        (None, true) => {
            let (path, options) = (image_path.clone(), p.img.options());
            Some(Arc::new(move || {
                image::open_image(&path, &options).map(|o| o.source)
            }))
        }
        _ => None,
    };
    let opts = WriteOptions {
        verify: p.checks.verify,
        expected_blake3: expected,
        expected_from,
        cancel,
        job: job.clone(),
        image_name: image_path.display().to_string(),
        delta: p.checks.delta,
        retries: p.checks.retries,
        reopen,
        ..Default::default()
    };
    let result = claimed.write(opened.source, &opts, reporter.as_ref());
    let state = match &result {
        Err(write::WriteError::Failed { state, .. }) => Some(*state),
        _ => None,
    };
    // A streamed image is only good once its download's digest checked out.
    let result = match remote {
        Some(check) => check.finish(result),
        None => result.map_err(anyhow::Error::from),
    };
    let result = result.map_err(|e| still_says_target_state(e, state));
    let report = result.with_context(|| format!("writing {} to {job}", image_path.display()))?;
    // Bootloader files go through the same claimed descriptor, read back from the medium.
    if let Some(pre) = &board_pre {
        super::boards::after_write(pre, &mut claimed, g)?;
    }
    drop(claimed);
    finish(
        &job,
        &opened_path,
        &info,
        eject.as_ref(),
        Done {
            report: &report,
            signed: verdict.signed.as_ref(),
        },
        reporter.as_ref(),
        g,
    )?;
    Ok(Exit::Ok)
}

/// What a finished write reports: the pipeline's report and who signed the image.
struct Done<'a> {
    report: &'a write::WriteReport,
    signed: Option<&'a crate::trust::Verified>,
}

/// After the write (and any placement): eject or say the disk may be pulled, then the result
/// line (stdout whatever -q says; -q silences progress and notes only).
fn finish(
    job: &str,
    opened_path: &Path,
    info: &TargetInfo,
    eject: Option<&target::eject::Plan>,
    done: Done<'_>,
    reporter: &dyn crate::progress::Reporter,
    g: &Global,
) -> anyhow::Result<()> {
    let Done { report, signed } = done;
    // Everything is written, read back and flushed: say when the disk may be pulled.
    let pulled = match (info, eject) {
        (_, Some(plan)) => {
            target::eject::eject(opened_path, plan)?;
            Some(plan.done(job))
        }
        (TargetInfo::Device(d), None) if target::eject::is_pullable(d) => Some(format!(
            "{job} can be removed safely now: everything was written and flushed"
        )),
        _ => None,
    };
    if let Some(text) = pulled {
        reporter.report(Event::Message {
            job: job.to_string(),
            level: Level::Info,
            text,
        });
    }
    if !g.json {
        outln!("{}", report.summary_line(job));
    }
    if g.json {
        let mut v = serde_json::json!({
            "job": job, "ok": true, "report": report,
        });
        if let Some(s) = signed {
            v["signature"] = serde_json::json!(s);
        }
        crate::progress::json_line(&mut super::out::stdout(), "result", v)?;
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  sbcflash list                 # removable USB disks and SD cards\n  sbcflash list --all --json    # every disk, for scripts"
)]
pub struct ListArgs {
    /// Also show non-removable, system, virtual and loop devices.
    #[arg(long)]
    pub(crate) all: bool,
}

pub(crate) fn run_list(a: ListArgs, g: &Global) -> anyhow::Result<Exit> {
    let disks = target::list_disks(a.all)?;
    if g.json {
        let v = serde_json::json!({
            "disks": disks,
        });
        crate::progress::json_line(&mut super::out::stdout(), "list", v)?;
        return Ok(Exit::Ok);
    }
    if disks.is_empty() {
        eprintln!(
            "no removable USB disks or SD cards found{}",
            if a.all {
                ""
            } else {
                " (--all shows every disk)"
            }
        );
        return Ok(Exit::Ok);
    }
    outln!(
        "{:<16} {:>10} {:<7} {:<9} {:<28} MOUNTED",
        "DEVICE",
        "SIZE",
        "BUS",
        "REMOVABLE",
        "MODEL"
    );
    for d in &disks {
        let model = [d.vendor.as_deref(), d.model.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ");
        let mounted = if d.system {
            "system".to_string()
        } else if d.mounted() {
            d.mountpoints.join(",")
        } else if d.swap {
            "swap".to_string()
        } else {
            "no".to_string()
        };
        outln!(
            "{:<16} {:>10} {:<7} {:<9} {:<28} {}",
            d.path.display(),
            target::human_size(d.size),
            d.bus.to_string(),
            if d.removable { "yes" } else { "no" },
            if model.is_empty() { "-".into() } else { model },
            mounted
        );
    }
    Ok(Exit::Ok)
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  sbcflash hash nixos-sd-image.img.zst          # blake3 of the decompressed image\n  sbcflash hash image.img --write-sidecar       # also writes image.img.blake3"
)]
pub struct HashArgs {
    /// The image (any supported format; the digest is of its logical contents).
    pub(crate) image: PathBuf,
    #[command(flatten)]
    pub(crate) img: ImageFlags,
    /// Also write IMAGE.blake3 (b3sum format).
    #[arg(long)]
    pub(crate) write_sidecar: bool,
}

pub(crate) fn run_hash(a: HashArgs, g: &Global) -> anyhow::Result<Exit> {
    let mut opened = a.img.open(&a.image)?;
    let mut buf = write::buffer::AlignedBuf::new(4 << 20);
    // Progress like every long operation: a bar on a terminal, events under --json.
    let reporter = g.reporter();
    let job = a.image.display().to_string();
    reporter.report(Event::Start {
        job: job.clone(),
        phase: Phase::Hash,
        total: opened.logical_size,
        detail: Some(opened.description.clone()),
    });
    let mut h = image::LogicalHasher::new();
    // Ranges the bmap calls unmapped: hashed as zeroes, so checked for data afterwards.
    let mut skips: Vec<(u64, u64)> = Vec::new();
    let hashed: Result<(), image::ImageError> = (|| {
        while let Some(e) = opened.source.next_extent(&mut buf)? {
            if e.kind == image::ExtentKind::Skip {
                skips.push((e.offset, e.len));
            }
            h.update_extent(&e, &buf);
            reporter.report(Event::Progress {
                job: job.clone(),
                phase: Phase::Hash,
                done: h.len(),
                total: opened.logical_size,
            });
        }
        Ok(())
    })();
    // The CLI reports the error itself (one error line, also under --json).
    hashed?;
    if let Some(bmap) = opened.bmap.as_ref().filter(|_| !skips.is_empty()) {
        if !is_regular_file(&a.image) {
            // A pipe cannot be read twice: say what the digest stands for.
            tracing::warn!(
                "{}: the digest hashes the {} unmapped bytes of the bmap {} as zeroes; they were not read",
                a.image.display(),
                skips.iter().map(|s| s.1).sum::<u64>(),
                bmap.display()
            );
        }
        let raw = opened.formats == [image::Format::Raw];
        let found = match is_regular_file(&a.image) {
            true => image::unmapped::find(&a.image, raw, &skips)?,
            false => None,
        };
        if let Some(u) = found {
            return Err(image::ImageError::Invalid {
                path: a.image.display().to_string(),
                msg: format!(
                    "the bmap {} does not match the image: it marks as unmapped {} bytes that hold data (the first non-zero byte at offset {}), so a digest through it would leave that data out; recreate the bmap (bmaptool create) or hash every byte with --no-bmap",
                    bmap.display(),
                    u.bytes,
                    u.first
                ),
            }
            .into());
        }
    }
    let (hash, len) = (h.finalize(), h.len());
    reporter.report(Event::Finish {
        job,
        phase: Phase::Hash,
        summary: serde_json::json!({ "blake3": hash.to_hex().to_string(), "bytes": len }),
    });
    drop(reporter);
    if a.write_sidecar {
        let p = image::digest::write_sidecar(&hash, &a.image)?;
        tracing::info!("wrote {}", p.display());
    }
    if g.json {
        let v = serde_json::json!({
            "image": a.image, "blake3": hash.to_hex().to_string(), "logical_size": len,
        });
        crate::progress::json_line(&mut super::out::stdout(), "result", v)?;
    } else {
        out!("{}", image::digest::sidecar_line(&hash, &a.image));
    }
    Ok(Exit::Ok)
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  sbcflash verify nixos-sd-image.img.zst /dev/sdb\n  sbcflash verify image.img /dev/sdb --blake3 \"$(cut -d' ' -f1 image.img.blake3)\""
)]
pub struct VerifyArgs {
    /// The image the target should hold.
    pub(crate) image: PathBuf,
    /// The device or file to check (read only).
    pub(crate) target: PathBuf,
    #[command(flatten)]
    pub(crate) img: ImageFlags,
    /// Expected blake3 of the logical image (default: IMAGE.blake3 sidecar if present).
    #[arg(long, value_name = "HEX")]
    pub(crate) blake3: Option<String>,
}

pub(crate) fn run_verify(a: VerifyArgs, g: &Global) -> anyhow::Result<Exit> {
    let reporter = g.reporter();
    let opened = a.img.open(&a.image)?;
    let (expected, expected_from) = expected_digest(blake3_flag(a.blake3.as_deref())?, &a.image)?;
    let t = target::open_readonly(&a.target)?;
    let job = t.path.display().to_string();
    let mut sink = t.into_sink()?;
    let opts = WriteOptions {
        expected_blake3: expected,
        expected_from,
        cancel: install_cancel(),
        job: job.clone(),
        image_name: a.image.display().to_string(),
        ..Default::default()
    };
    let rep = write::compare_with_image(opened.source, sink.as_mut(), &opts, reporter.as_ref())
        .with_context(|| format!("verifying {job} against {}", a.image.display()))?;
    if g.json {
        let v = serde_json::json!({
            "job": job, "ok": true, "report": rep,
        });
        crate::progress::json_line(&mut super::out::stdout(), "result", v)?;
    } else {
        outln!(
            "{job}: matches {} ({} bytes compared, {} unmapped bytes not compared); blake3 {}{}",
            a.image.display(),
            rep.bytes_compared,
            rep.bytes_skipped,
            rep.blake3,
            if expected.is_some() {
                " (expected digest matched)"
            } else {
                ""
            }
        );
    }
    Ok(Exit::Ok)
}
