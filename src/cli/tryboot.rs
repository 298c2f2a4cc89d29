//! `sbcflash try`: flags and glue around [`crate::tryboot`].

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::Global;
use crate::board::schema::{Arch, BootSource};
use crate::console::linux::LinuxConfig;
use crate::console::serial::Link;
use crate::console::session::{Session, Transcript};
use crate::exit::Exit;
use crate::image::detect::Format;
use crate::progress::{Event, Level};
use crate::tryboot::inspect::{self, ImageInfo};
use crate::tryboot::qemu::{MachineSpec, Qemu};
use crate::tryboot::{self, Plan, Reached, TryError, TryStage};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  sbcflash try nixos-sd-image.img.zst\n  sbcflash try image.img --check 'systemctl is-active sshd'\n  sbcflash try --board opi5 --kernel-only nixos-opi5.img.zst\n  sbcflash try image.img --expect 'Reached target Multi-User' --transcript boot.log\n\nExit status 0 only when every stage passed (boot, login or --expect, --check)."
)]
pub struct TryArgs {
    /// The image, in any form `write` takes: raw, compressed, with a bmap, Android sparse,
    /// .zip, a pipe, or an https:// URL (downloaded into the cache first, checked against
    /// --source-blake3/--source-sha256 when given).
    #[arg(value_name = "IMAGE")]
    pub(crate) image: PathBuf,
    #[command(flatten)]
    pub(crate) img: super::write::ImageFlags,
    #[command(flatten)]
    pub(crate) stream: super::acquire::StreamArgs,
    /// Architecture of the virt machine (default: from the image's kernel, else --board).
    #[arg(long, value_parser = parse_arch)]
    pub(crate) arch: Option<Arch>,
    /// The board the image is for: its architecture, and whether its boot chain can run
    /// on QEMU's virt machine at all.
    #[arg(long)]
    pub(crate) board: Option<String>,
    /// For board-specific images: skip the board's own bootloader and boot the image's generic
    /// extlinux entry (kernel, initrd, root file system) under virt's U-Boot.
    #[arg(long)]
    pub(crate) kernel_only: bool,
    /// Pass when a console line matches REGEX (instead of a login prompt).
    #[arg(long, value_name = "REGEX")]
    pub(crate) expect: Option<String>,
    /// After logging in on the console, run CMD; it must exit 0. Default on NixOS images:
    /// `systemctl is-system-running --wait` (failed units are listed).
    #[arg(long, value_name = "CMD")]
    pub(crate) check: Option<String>,
    /// Do not log in or run a check, even on NixOS.
    #[arg(long, conflicts_with = "check")]
    pub(crate) no_check: bool,
    /// Console login user.
    #[arg(long, default_value = "root")]
    pub(crate) login_user: String,
    /// Console login password (images without one need none).
    #[arg(long)]
    pub(crate) login_password: Option<String>,
    /// Seconds from power-on to the login prompt (or --expect line).
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub(crate) boot_timeout: u64,
    /// Seconds for the check.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub(crate) check_timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    pub(crate) mem: u32,
    /// Keep the timestamped console transcript here (default: under
    /// $XDG_STATE_HOME/sbcflash/console/).
    #[arg(long, value_name = "FILE")]
    pub(crate) transcript: Option<PathBuf>,
    /// Print the console lines as they arrive.
    #[arg(long)]
    pub(crate) show_console: bool,
    /// Extra QEMU argument, repeatable (e.g. `--qemu-arg=-fw_cfg --qemu-arg=name=opt/x,string=y`).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub(crate) qemu_arg: Vec<String>,
}

fn parse_arch(s: &str) -> Result<Arch, String> {
    match s {
        "aarch64" | "arm64" => Ok(Arch::Aarch64),
        "riscv64" => Ok(Arch::Riscv64),
        _ => Err(format!("{s}: use aarch64 or riscv64")),
    }
}

fn transcript_path(a: &TryArgs) -> PathBuf {
    if let Some(t) = &a.transcript {
        return t.clone();
    }
    dirs::state_dir()
        .or_else(dirs::cache_dir)
        .unwrap_or_else(std::env::temp_dir)
        .join("sbcflash")
        .join("console")
        .join(format!(
            "try-{}.log",
            chrono::Local::now().format("%Y%m%d-%H%M%S")
        ))
}

fn is_plain_raw(o: &crate::image::OpenedImage) -> bool {
    o.formats == [Format::Raw] && o.bmap.is_none() && o.path.is_file()
}

/// Decides the architecture and refuses what virt cannot boot, before anything starts.
fn decide(a: &TryArgs, info: &ImageInfo, g: &Global) -> anyhow::Result<Arch> {
    let what = a.image.display();
    let board = match &a.board {
        Some(b) => Some(super::boards::registry(g)?.get(b)?.clone()),
        None => None,
    };
    if let Some(b) = &board {
        if b.default_medium().boot != BootSource::External && !a.kernel_only {
            return Err(TryError::Unsupported(format!(
                "{} ({}) boots through its own boot ROM and bootloader, which QEMU's virt machine cannot run; pass --kernel-only to boot the image's generic extlinux entry (kernel, initrd, root file system) on virt instead",
                b.name(),
                b.desc.soc
            ))
            .into());
        }
    }
    if let (Some(l), false) = (&info.vendor_loader, a.kernel_only) {
        return Err(TryError::Unsupported(format!(
            "{what} carries {l}: a board-specific bootloader that QEMU's virt machine cannot run; pass --kernel-only to boot the image's generic extlinux entry (kernel, initrd, root file system) on virt instead"
        ))
        .into());
    }
    if a.kernel_only && info.entry.is_none() {
        return Err(TryError::Unsupported(format!(
            "{what}: --kernel-only needs a generic extlinux entry (/boot/extlinux/extlinux.conf), and the image has none"
        ))
        .into());
    }
    let arch = a
        .arch
        .or(info.arch)
        .or(board.as_ref().map(|b| b.desc.arch))
        .ok_or_else(|| {
            TryError::Unsupported(format!(
                "{what}: cannot tell the architecture (no extlinux entry with a known kernel header); pass --arch aarch64|riscv64"
            ))
        })?;
    if let (Some(want), Some(has)) = (a.arch.or(board.as_ref().map(|b| b.desc.arch)), info.arch) {
        if want != has {
            return Err(TryError::Unsupported(format!(
                "{what}: its kernel is built for {has}, not {want}"
            ))
            .into());
        }
    }
    Ok(arch)
}

pub(crate) fn run_try(a: TryArgs, g: &Global) -> anyhow::Result<Exit> {
    let reporter = g.reporter();
    let job = a.image.display().to_string();
    let say = |text: String| {
        if g.json {
            reporter.report(Event::Message {
                job: job.clone(),
                level: Level::Info,
                text,
            });
        } else if !g.quiet {
            eprintln!("{text}");
        }
    };
    let expect = match &a.expect {
        Some(r) => Some(
            regex::Regex::new(r)
                .map_err(|e| crate::exit::ExitError::new(Exit::Usage, format!("--expect: {e}")))?,
        ),
        None => None,
    };
    let work = tempfile::Builder::new()
        .prefix("sbcflash-try-")
        .tempdir()
        .context("create a work directory for the overlay")?;
    let url = a.image.to_string_lossy().into_owned();
    let local = if crate::acquire::remote::is_url(&url) {
        // Booting needs the whole image at once: into the cache, digest checked, then boot it.
        let spec = crate::acquire::source::SourceSpec {
            url: url.clone(),
            pin: super::acquire::PinArgs {
                blake3: a.stream.source_blake3.clone(),
                sha256: a.stream.source_sha256.clone(),
            }
            .pin()?,
        };
        let acq = a.stream.opts.acquirer(std::sync::Arc::from(g.reporter()))?;
        acq.fetch(&spec)?.entry.path
    } else {
        a.image.clone()
    };
    let mut opened = a.img.open(&local)?;
    let raw = if is_plain_raw(&opened) {
        opened.path.clone()
    } else {
        // Compressed, sparse, bmap'd or piped: decoded once into a hole-preserving raw file
        // next to the overlay (deleted at the end).
        let d = crate::station::decoded::materialise(
            opened.source.as_mut(),
            "image",
            &work.path().join("decoded"),
            reporter.as_ref(),
            &job,
        )?;
        d.raw
    };
    let info = inspect::inspect(&raw)?;
    let arch = decide(&a, &info, g)?;
    let check = match (&a.check, a.no_check) {
        (_, true) => None,
        (Some(c), _) => Some(c.clone()),
        (None, _) if info.is_nixos() => Some(tryboot::NIXOS_CHECK.to_string()),
        _ => None,
    };
    if let Some(e) = &info.entry {
        say(format!(
            "{}: {arch}, extlinux entry {:?} (kernel {}), booting on QEMU virt through U-Boot's distro boot{}",
            a.image.display(),
            e.label,
            e.kernel,
            if a.kernel_only { " (--kernel-only: not the board's own bootloader)" } else { "" }
        ));
    }
    if let (None, Some(efi)) = (&info.entry, &info.efi) {
        say(format!(
            "{}: {arch} (EFI boot file {efi}, no extlinux entry), booting on QEMU virt through U-Boot's distro boot",
            a.image.display()
        ));
    }
    let spec = MachineSpec {
        arch,
        image: raw.clone(),
        mem_mib: a.mem,
        extra: a.qemu_arg.clone(),
    };
    let mut q = Qemu::start(&spec, work.path())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let _enter = rt.enter();
    let mut link = Link::serial(&q.pty, 115200)?;
    link.set_reopen_for(Duration::ZERO);
    let mut s = Session::new(link);
    let tp = transcript_path(&a);
    let mut tr = Transcript::create(&tp, Instant::now())
        .with_context(|| format!("create transcript {}", tp.display()))?;
    tr.echo = a.show_console && !g.json;
    s.transcript = Some(tr);
    let reached = Reached::default();
    {
        let reached = reached.clone();
        let reporter = g.reporter();
        let (json, quiet, job) = (g.json, g.quiet, job.clone());
        s.on_stage(move |t, st| {
            reached.note(t, st);
            let text = format!("[{:>7.2}s] {st}", t.as_secs_f64());
            if json {
                reporter.report(Event::Message {
                    job: job.clone(),
                    level: Level::Info,
                    text,
                });
            } else if !quiet {
                eprintln!("{text}");
            }
        });
    }
    let plan = Plan {
        linux: LinuxConfig {
            boot_timeout: Duration::from_secs(a.boot_timeout),
            login_user: a.login_user.clone(),
            login_password: a.login_password.clone(),
            until: expect,
            ..LinuxConfig::default()
        },
        check: check.clone(),
        list_failed_units: info.is_nixos(),
        check_timeout: Duration::from_secs(a.check_timeout),
    };
    let started = Instant::now();
    q.resume()?;
    let r = rt.block_on(tryboot::follow(&mut s, &plan, &reached));
    s.finish();
    drop(s);
    q.stop();
    let stages = reached.list();
    let line = stages
        .iter()
        .map(|(st, t)| format!("{st} {:.2} s", t.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ");
    let failed = r.as_ref().err().map(|e| match e {
        TryError::Boot { stage, .. } => *stage,
        TryError::Check { .. } => TryStage::Check,
        _ => reached.current(),
    });
    if g.json {
        let v = serde_json::json!({
            "image": a.image.display().to_string(),
            "arch": arch.to_string(),
            "ok": r.is_ok(),
            "stages": stages.iter().map(|(st, t)| serde_json::json!({"stage": st.name(), "seconds": t.as_secs_f64()})).collect::<Vec<_>>(),
            "failed_stage": failed.map(|s| s.name()),
            "check": check,
            "transcript": tp.display().to_string(),
        });
        crate::progress::json_line(&mut super::out::stdout(), "result", v)?;
    }
    match r {
        Ok(p) => {
            let end = match p.arrival {
                crate::console::linux::Arrival::Matched(_) => "the expected line",
                _ => "login",
            };
            if !g.json {
                outln!(
                    "PASS {}: booted to {end} in {:.1} s ({line}{})",
                    a.image.display(),
                    started.elapsed().as_secs_f64(),
                    p.check
                        .as_ref()
                        .map(|c| format!("; check `{}` passed", c.cmd))
                        .unwrap_or_default()
                );
            }
            Ok(Exit::Ok)
        }
        Err(e) => {
            if !g.quiet && !g.json {
                eprintln!(
                    "stages reached: {}",
                    if line.is_empty() { "none".into() } else { line }
                );
                eprintln!("console transcript: {}", tp.display());
            }
            Err(e.into())
        }
    }
}

/// `build --try`: the built image through `try` with its defaults (and the build's board).
pub(crate) fn try_built(
    image: &std::path::Path,
    board: Option<String>,
    g: &Global,
) -> anyhow::Result<()> {
    let a = TryArgs {
        image: image.to_path_buf(),
        img: super::write::ImageFlags {
            bmap: None,
            no_bmap: false,
            member: None,
        },
        arch: None,
        board,
        kernel_only: false,
        expect: None,
        check: None,
        no_check: false,
        login_user: "root".into(),
        login_password: None,
        boot_timeout: 300,
        check_timeout: 300,
        mem: 1024,
        transcript: None,
        show_console: false,
        qemu_arg: Vec::new(),
        stream: super::acquire::StreamArgs::local_only(),
    };
    run_try(a, g).map(|_| ())
}
