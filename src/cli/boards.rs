//! `sbcflash boards`: list the known boards, show one, check an image against one.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::Global;
use crate::board::{self, Board, MediumKind, Registry, Severity};
use crate::exit::Exit;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  sbcflash boards                      # id, aliases, name, SoC, arch, how it is flashed, baud
  sbcflash boards show opi5            # everything known about one board, and which file won
  sbcflash boards list --json          # machine-readable list
  sbcflash boards check opi5 nixos.img # will this image boot on this board?
  sbcflash --boards-dir ./myboards boards show myboard")]
pub struct BoardsArgs {
    #[command(subcommand)]
    pub(crate) cmd: Option<BoardsCmd>,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum BoardsCmd {
    /// List the known boards (the default).
    List,
    /// Print everything the tool knows about one board (id or alias).
    Show {
        /// Board id or alias.
        board: String,
    },
    /// Check whether an image can boot on a board (partition table, reserved area, bootloader).
    Check {
        /// Board id or alias.
        board: String,
        /// Image file (raw, compressed, bmap-described or Android sparse).
        image: PathBuf,
        /// Medium the image is for (default: the board's default medium).
        #[arg(long, value_name = "MEDIUM")]
        medium: Option<MediumKind>,
        /// Exit 3 (inconsistent input) when the check finds problems.
        #[arg(long)]
        strict: bool,
    },
}

impl clap::ValueEnum for MediumKind {
    fn value_variants<'a>() -> &'a [Self] {
        &[
            MediumKind::Sd,
            MediumKind::Emmc,
            MediumKind::SpiNor,
            MediumKind::SpiNand,
            MediumKind::Nvme,
            MediumKind::Usb,
            MediumKind::Virtio,
        ]
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

/// The registry the CLI uses: shipped boards, the user's config dir, then the config file's
/// `boards-dirs`, then `--boards-dir` (later wins).
pub(crate) fn registry(g: &Global) -> anyhow::Result<Registry> {
    let flags = crate::config::Flags {
        boards_dirs: g.boards_dir.clone(),
        ..Default::default()
    };
    let cfg = crate::config::Config::load(&flags)?;
    // The config lists the highest-precedence directory first; the registry wants it last.
    let mut dirs = cfg.boards_dirs.value;
    dirs.reverse();
    Ok(Registry::load(&dirs)?)
}

pub(crate) fn run(a: BoardsArgs, g: &Global) -> anyhow::Result<Exit> {
    let reg = registry(g)?;
    let mut out = super::out::stdout();
    let r = match a.cmd.unwrap_or(BoardsCmd::List) {
        BoardsCmd::List => list(&reg, g, &mut out),
        BoardsCmd::Show { board } => show(reg.get(&board)?, g, &mut out),
        BoardsCmd::Check {
            board,
            image,
            medium,
            strict,
        } => check(reg.get(&board)?, &image, medium, strict, g, &mut out),
    };
    r
}

/// How the board is usually flashed, for the list.
fn flashed_via(b: &Board) -> String {
    let m = b.default_medium();
    let rec = b
        .usb_recovery()
        .map(|u| match (u.vid, u.pid) {
            (Some(v), Some(p)) => format!(", {} {v:04x}:{p:04x}", u.protocol),
            _ => format!(", {}", u.protocol),
        })
        .unwrap_or_default();
    format!("{}{rec}", m.kind)
}

fn list(reg: &Registry, g: &Global, out: &mut impl Write) -> anyhow::Result<Exit> {
    if g.json {
        let boards: Vec<_> = reg
            .boards()
            .iter()
            .map(|b| {
                serde_json::json!({
                    "id": b.id(),
                    "aliases": b.desc.aliases,
                    "name": b.name(),
                    "vendor": b.desc.vendor,
                    "soc": b.desc.soc,
                    "arch": b.desc.arch,
                    "default_medium": b.default_medium().kind,
                    "recovery": b.usb_recovery().map(|u| serde_json::json!({
                        "protocol": u.protocol, "vid": u.vid, "pid": u.pid })),
                    "baud": b.console().baud,
                    "origin": b.origin,
                })
            })
            .collect();
        let v = serde_json::json!({
            "boards": boards,
        });
        crate::progress::json_line(out, "boards", v)?;
        return Ok(Exit::Ok);
    }
    let rows: Vec<[String; 7]> = reg
        .boards()
        .iter()
        .map(|b| {
            [
                b.id().to_string(),
                b.desc.aliases.join(","),
                b.name().to_string(),
                b.soc.names.join("/"),
                b.desc.arch.to_string(),
                flashed_via(b),
                b.console().baud.to_string(),
            ]
        })
        .collect();
    let header = [
        "ID",
        "ALIASES",
        "NAME",
        "SOC",
        "ARCH",
        "FLASHED VIA",
        "BAUD",
    ];
    let mut w = header.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        s.trim_end().to_string()
    };
    writeln!(out, "{}", line(&header))?;
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        writeln!(out, "{}", line(&cells))?;
    }
    Ok(Exit::Ok)
}

fn show(b: &Board, g: &Global, out: &mut impl Write) -> anyhow::Result<Exit> {
    if g.json {
        let v = serde_json::json!({
            "board": b,
        });
        crate::progress::json_line(out, "board", v)?;
        return Ok(Exit::Ok);
    }
    let d = &b.desc;
    let s = &b.soc;
    writeln!(out, "{} ({})", d.name, d.id)?;
    writeln!(out, "  file:      {}", b.origin)?;
    for o in &b.overrides {
        writeln!(out, "  overrides: {o}")?;
    }
    if !d.aliases.is_empty() {
        writeln!(out, "  aliases:   {}", d.aliases.join(", "))?;
    }
    if let Some(v) = &d.variant_of {
        writeln!(out, "  variant of: {v}")?;
    }
    writeln!(out, "  vendor:    {}", d.vendor)?;
    writeln!(
        out,
        "  SoC:       {} ({}, {}), {}",
        s.names.join("/"),
        s.vendor,
        d.soc,
        d.arch
    )?;
    for n in d.notes.iter().chain(&s.notes) {
        writeln!(out, "  note:      {n}")?;
    }
    show_storage(b, out)?;
    show_boot(b, out)?;
    for i in &d.images {
        let what = i.url.as_deref().or(i.flake.as_deref()).unwrap_or_default();
        let pin = if i.is_unpinned() {
            "unpinned"
        } else {
            "pinned"
        };
        writeln!(out, "image:     {} {what} ({pin})", i.name)?;
        if let Some(n) = &i.note {
            writeln!(out, "           {n}")?;
        }
    }
    writeln!(
        out,
        "handoff:   ssh {}@…, flake attribute {}",
        d.handoff.ssh_user, d.handoff.flake_attr
    )?;
    if !d.unverified.is_empty() {
        writeln!(
            out,
            "unverified (override in your own descriptor if wrong): {}",
            d.unverified.join(", ")
        )?;
    }
    Ok(Exit::Ok)
}

/// The storage media: bootloader source, size, layout and placements.
fn show_storage(b: &Board, out: &mut impl Write) -> std::io::Result<()> {
    let d = &b.desc;
    writeln!(out, "storage:")?;
    for m in &d.storage {
        let mut extra = Vec::new();
        if m.default {
            extra.push("default".to_string());
        }
        extra.push(format!("bootloader: {}", boot_source(m.boot)));
        if let Some(sz) = m.size_mib {
            extra.push(format!("{sz} MiB"));
        }
        if let Some(dev) = &m.uboot_dev {
            extra.push(format!("U-Boot `{dev}`"));
        }
        if let Some(i) = m.rockusb_index {
            extra.push(format!("rockusb storage {i}"));
        }
        writeln!(out, "  {:<9}{}", m.kind.as_str(), extra.join("; "))?;
        if let Some(l) = b.layout(m) {
            if let Some(r) = l.reserved {
                writeln!(out, "           reserved {r}")?;
            }
            if l.table != board::TableKind::Any {
                writeln!(out, "           partition table: {}", l.table)?;
            }
            for p in &l.placements {
                let when = p
                    .table
                    .map(|t| format!(" ({t} images)"))
                    .unwrap_or_default();
                let comb = if p.combined {
                    " (combined, replaces the others)"
                } else {
                    ""
                };
                writeln!(
                    out,
                    "           {} at {}{when}{comb}",
                    p.file,
                    board::check::human_offset(p.offset_bytes())
                )?;
            }
            if let Some(n) = &l.note {
                writeln!(out, "           {n}")?;
            }
        }
        if let Some(n) = &m.note {
            writeln!(out, "           {n}")?;
        }
    }
    Ok(())
}

/// How the board boots and is reached: console, U-Boot, USB recovery.
fn show_boot(b: &Board, out: &mut impl Write) -> std::io::Result<()> {
    let d = &b.desc;
    let c = &d.console;
    writeln!(
        out,
        "console:   {} baud, Linux {}{}",
        c.baud,
        c.linux,
        c.uart
            .as_deref()
            .map(|u| format!(", {u}"))
            .unwrap_or_default()
    )?;
    if let Some(p) = &c.pins {
        writeln!(out, "           {p}")?;
    }
    if let Some(u) = &d.uboot {
        let prompts: Vec<String> = u.prompts.iter().map(|p| format!("{p:?}")).collect();
        writeln!(out, "U-Boot:    prompt {}", prompts.join(" or "))?;
        writeln!(out, "           autoboot {:?}", u.autoboot)?;
        let ints: Vec<String> = u
            .interrupt
            .iter()
            .map(|i| match i {
                board::Interrupt::AnyKey => "any key".to_string(),
                board::Interrupt::CtrlC => "Ctrl-C".to_string(),
                board::Interrupt::Keys { keys } => format!("keys {keys:?}"),
            })
            .collect();
        writeln!(out, "           interrupt with {}", ints.join(", then "))?;
        let cmds = &u.commands;
        for (n, v) in [
            ("ums", &cmds.ums),
            ("rockusb", &cmds.rockusb),
            ("fastboot", &cmds.fastboot),
            ("dfu", &cmds.dfu),
        ] {
            if let Some(v) = v {
                writeln!(out, "           {n}: `{v}`")?;
            }
        }
    }
    match b.usb_recovery() {
        Some(u) => {
            let ids = match (u.vid, u.pid) {
                (Some(v), Some(p)) => format!(" {v:04x}:{p:04x}"),
                _ => String::new(),
            };
            let rc4 = u
                .rc4
                .map(|r| if r { ", RC4" } else { ", no RC4" })
                .unwrap_or("");
            writeln!(out, "recovery:  {}{ids}{rc4}", u.protocol)?;
        }
        None => writeln!(out, "recovery:  none")?,
    }
    if let Some(r) = &d.recovery {
        for (i, step) in r.enter.iter().enumerate() {
            writeln!(out, "           {}. {step}", i + 1)?;
        }
        if let Some(p) = &r.port {
            writeln!(out, "           port: {p}")?;
        }
        for l in &r.loaders {
            let src = l
                .source
                .as_deref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default();
            writeln!(out, "           {}: {}{src}", l.role, l.file)?;
        }
    }
    Ok(())
}

fn boot_source(b: board::BootSource) -> &'static str {
    use board::BootSource::*;
    match b {
        Image => "in the image",
        BoardFlash => "on-board flash or in the image",
        Firmware => "EEPROM firmware + FAT partition",
        External => "provided externally",
        BootloaderOnly => "holds the bootloader only",
    }
}

/// The first [`board::check::HEAD_LEN`] logical bytes of an image in any supported format
/// (compressed, bmap, Android sparse), via the image module.
pub(crate) fn image_head(path: &Path) -> anyhow::Result<Vec<u8>> {
    image_head_member(path, None)
}

/// [`image_head`] of the member `member` of a zip image (`--member`).
pub(crate) fn image_head_member(path: &Path, member: Option<&str>) -> anyhow::Result<Vec<u8>> {
    let opts = crate::image::open::OpenOptions {
        member: member.map(str::to_string),
        ..Default::default()
    };
    let head = crate::image::open::read_logical_prefix(path, &opts, board::check::HEAD_LEN)?;
    // The first partition's file system may start beyond the first MiBs: read up to it.
    let want = board::check::bytes_wanted(&head);
    if want > head.len() && head.len() == board::check::HEAD_LEN {
        return Ok(crate::image::open::read_logical_prefix(path, &opts, want)?);
    }
    Ok(head)
}

/// Print a check report (text or a JSON line).
pub(crate) fn print_report(
    report: &board::ImageReport,
    g: &Global,
    out: &mut impl Write,
) -> std::io::Result<()> {
    if g.json {
        let v = serde_json::json!({
            "report": report,
        });
        return crate::progress::json_line(out, "image-check", v);
    }
    for f in &report.findings {
        let tag = match f.severity {
            Severity::Info => "note",
            Severity::Warning => "warning",
        };
        writeln!(out, "{tag}: {}", f.message)?;
    }
    Ok(())
}

fn check(
    b: &Board,
    image: &Path,
    medium: Option<MediumKind>,
    strict: bool,
    g: &Global,
    out: &mut impl Write,
) -> anyhow::Result<Exit> {
    let m = match medium {
        Some(k) => b.medium(k)?,
        None => b.default_medium(),
    };
    let head = image_head(image)?;
    let report = board::check_image(b, m, &head);
    print_report(&report, g, out)?;
    if !report.has_warnings() && !g.json {
        writeln!(
            out,
            "ok: {} looks bootable on the {} from {}",
            image.display(),
            b.name(),
            m.kind
        )?;
    }
    report.into_result(strict)?;
    Ok(Exit::Ok)
}

/// Board flags for `sbcflash write` (flattened into its arguments by the writer).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct BoardWriteArgs {
    /// Board the image is for (id or alias): the image is checked against it before writing.
    /// Defaults to the config file's `default-board` / SBCFLASH_BOARD.
    #[arg(long, value_name = "BOARD")]
    pub board: Option<String>,
    /// Medium of that board being written (default: the board's default medium).
    #[arg(long, value_name = "MEDIUM")]
    pub medium: Option<MediumKind>,
    /// Shorthand for `--medium spi-nor`: the target is the board's SPI flash.
    #[arg(long, conflicts_with = "medium")]
    pub spi: bool,
    /// Refuse to write when the image check finds problems (default: warn); exit 3.
    #[arg(long)]
    pub strict: bool,
    /// Bootloader file(s) to place at the board's offsets after the image (repeatable), e.g.
    /// `--bootloader u-boot-rockchip.bin` or `--bootloader idbloader.img --bootloader u-boot.itb`.
    #[arg(long, value_name = "FILE")]
    pub bootloader: Vec<PathBuf>,
}

/// What `write` carries from the pre-write check to the post-write bootloader placement.
#[derive(Debug, Clone)]
pub struct BoardPreflight {
    pub board: Board,
    pub medium: board::Medium,
    /// Bootloader files and their offsets, already checked against the image's partitions.
    pub placements: Vec<board::PlacedFile>,
}

/// The board to check against: `--board`, else the config's default board, else none.
fn board_name(a: &BoardWriteArgs, g: &Global) -> anyhow::Result<Option<String>> {
    let name = Some(match &a.board {
        Some(b) => b.clone(),
        None => {
            let flags = crate::config::Flags {
                boards_dirs: g.boards_dir.clone(),
                ..Default::default()
            };
            match crate::config::Config::load(&flags)?.default_board.value {
                Some(b) => b,
                None if !a.bootloader.is_empty() || a.strict || a.spi => {
                    return Err(crate::exit::ExitError::new(
                        Exit::Usage,
                        "--bootloader, --strict and --spi need --board (or a default-board in the config)",
                    )
                    .into())
                }
                None => return Ok(None),
            }
        }
    });
    Ok(name)
}

/// The board side of a write, resolved once from the flags and the config: which board,
/// which of its media, and what to do with the check's findings and bootloader files.
#[derive(Debug, Clone)]
pub(crate) struct BoardPlan {
    pub(crate) board: Board,
    pub(crate) medium: board::Medium,
    pub(crate) strict: bool,
    pub(crate) bootloader: Vec<PathBuf>,
}

impl BoardWriteArgs {
    /// `--spi` is `--medium spi-nor`.
    pub(crate) fn medium_kind(&self) -> Option<MediumKind> {
        if self.spi {
            Some(MediumKind::SpiNor)
        } else {
            self.medium
        }
    }

    /// Resolve the board (`--board`, else the config's default board) and its medium once.
    /// `None` when no board was given or configured.
    pub(crate) fn plan(&self, g: &Global) -> anyhow::Result<Option<BoardPlan>> {
        let Some(name) = board_name(self, g)? else {
            return Ok(None);
        };
        let b = registry(g)?.get(&name)?.clone();
        let medium = match self.medium_kind() {
            Some(k) => b.medium(k)?.clone(),
            None => b.default_medium().clone(),
        };
        Ok(Some(BoardPlan {
            board: b,
            medium,
            strict: self.strict,
            bootloader: self.bootloader.clone(),
        }))
    }
}

/// Before a byte is written: resolve the board, check the image against it (warnings printed to
/// stderr, or a JSON line on stdout with `--json`; an error under `--strict`), and plan any
/// `--bootloader` files. Returns `None` when no board was given or configured.
pub fn preflight(
    a: &BoardWriteArgs,
    image: &Path,
    g: &Global,
) -> anyhow::Result<Option<BoardPreflight>> {
    check_file(a.plan(g)?.as_ref(), image, None, g)
}

/// [`preflight`] with a resolved plan, for the member `member` of a zip image (`--member`).
pub(crate) fn check_file(
    plan: Option<&BoardPlan>,
    image: &Path,
    member: Option<&str>,
    g: &Global,
) -> anyhow::Result<Option<BoardPreflight>> {
    let Some(p) = plan else {
        return Ok(None);
    };
    if !std::fs::metadata(image).is_ok_and(|m| m.is_file()) {
        // Reading a pipe's head here would steal it from the writer.
        if p.strict || !p.bootloader.is_empty() {
            return Err(crate::exit::ExitError::new(
                Exit::Usage,
                format!(
                    "{}: not a regular file, so it cannot be checked against board `{}` (--strict/--bootloader need a file)",
                    image.display(),
                    p.board.id()
                ),
            )
            .into());
        }
        if !g.quiet {
            eprintln!(
                "warning: {} is not a regular file: not checked against board `{}`",
                image.display(),
                p.board.id()
            );
        }
        return Ok(None);
    }
    let head = image_head_member(image, member)?;
    check_head(p, &image.display().to_string(), &head, g).map(Some)
}

/// [`check_file`] for an image that is streamed (`write URL`, `write --board X` from the
/// board's source, a pipe): `head` is the start of the logical image, taken from the stream
/// before any byte was written. `what` names the image in messages.
pub(crate) fn check_stream(
    plan: Option<&BoardPlan>,
    what: &str,
    head: &[u8],
    g: &Global,
) -> anyhow::Result<Option<BoardPreflight>> {
    plan.map(|p| check_head(p, what, head, g)).transpose()
}

fn check_head(
    p: &BoardPlan,
    what: &str,
    head: &[u8],
    g: &Global,
) -> anyhow::Result<BoardPreflight> {
    let (b, medium) = (&p.board, &p.medium);
    let mut report = board::check_image(b, medium, head);
    let placements = if p.bootloader.is_empty() {
        Vec::new()
    } else {
        // A bad table was already reported; placing files blind would be worse.
        let table = board::parttable::parse(head).map_err(|m| {
            board::BoardError::Placement(format!("{what}: cannot place a bootloader: {m}"))
        })?;
        board::place::plan(b, medium, &table, &p.bootloader)?
    };
    if !placements.is_empty() {
        // The bootloader the image lacks is about to be added: no longer a problem.
        for f in report
            .findings
            .iter_mut()
            .filter(|f| f.code == "no-bootloader")
        {
            f.severity = Severity::Info;
            f.message = format!(
                "the image carries no bootloader; --bootloader adds it ({})",
                placements
                    .iter()
                    .map(|p| format!("{} at {}", p.slot, board::check::human_offset(p.offset)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    if g.json {
        print_report(&report, g, &mut super::out::stdout())?;
    } else if !g.quiet || report.has_warnings() {
        print_report(&report, g, &mut std::io::stderr().lock())?;
    }
    report.into_result(p.strict)?;
    Ok(BoardPreflight {
        board: b.clone(),
        medium: medium.clone(),
        placements,
    })
}

/// After the image is written and verified: write the planned bootloader files through the
/// job's claimed target at their offsets, sync, and read them back from the medium.
pub fn after_write(
    p: &BoardPreflight,
    target: &mut crate::job::BlockJob,
    g: &Global,
) -> anyhow::Result<()> {
    if p.placements.is_empty() {
        return Ok(());
    }
    target.place(&p.placements)?;
    say_placed(p, g)?;
    Ok(())
}

/// One line (or JSON event) per placed bootloader file.
pub(crate) fn say_placed(p: &BoardPreflight, g: &Global) -> std::io::Result<()> {
    for f in &p.placements {
        let msg = format!(
            "placed {} ({} bytes) at {} for the {}",
            f.path.display(),
            f.len,
            board::check::human_offset(f.offset),
            p.board.name()
        );
        if g.json {
            let v = serde_json::json!({
                "path": f.path, "offset": f.offset, "len": f.len, "board": p.board.id(),
            });
            crate::progress::json_line(&mut super::out::stdout(), "bootloader-placed", v)?;
        } else if !g.quiet {
            eprintln!("{msg}");
        }
    }
    Ok(())
}
