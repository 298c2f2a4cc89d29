//! `console`, `bootstrap`, `serial-load`: flags and glue around [`crate::console`].

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::Global;
use crate::board::{Board, MediumKind, UBootCommands};
use crate::console::bootstrap::{self, FlashVia, Plan};
use crate::console::gadget::{HostFlash, UmsMatch};
use crate::console::handoff::{self, Rebuild, RebuildPlan};
use crate::console::hostkeys::{self, HostKey, ProofWait};
use crate::console::linux::LinuxConfig;
use crate::console::load::{self, LoadPlan};
use crate::console::serial::{self, Link};
use crate::console::session::{Session, Transcript};
use crate::console::uboot::{InterruptKey, UBootConfig};
use crate::console::ymodem::Protocol;
use crate::console::{ConsoleError, Stage};
use crate::exit::{Exit, ExitError};
use crate::progress::{Event, Level};
use crate::usb::discovery::RusbBus;

/// Port, line settings and transcript, shared by the three commands.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct PortArgs {
    /// Board descriptor name (console baud, U-Boot prompt, interrupt key); flags override it.
    #[arg(long)]
    pub(crate) board: Option<String>,
    /// Serial port; default: the only USB serial adapter present (udev ID_BUS=usb).
    #[arg(long, value_name = "DEV")]
    pub(crate) port: Option<PathBuf>,
    /// Line rate (8N1, no flow control). Default: the descriptor's, else 115200.
    #[arg(long)]
    pub(crate) baud: Option<u32>,
    /// Where to write the timestamped transcript (default: under $XDG_STATE_HOME/sbcflash/console/).
    #[arg(long, value_name = "FILE")]
    pub(crate) transcript: Option<PathBuf>,
    /// How long to wait for a vanished USB serial adapter to come back.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub(crate) reopen_secs: u64,
}

/// U-Boot settings (descriptor values, overridable).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct UBootArgs {
    /// U-Boot's prompt (default: the descriptor's, else `=> `).
    #[arg(long)]
    pub(crate) prompt: Option<String>,
    /// Autoboot interrupt: any (a space), ctrl-c, or string:TEXT (AUTOBOOT_KEYED builds).
    /// Default: the descriptor's first, else any.
    #[arg(long, value_name = "KEY", value_parser = parse_key)]
    pub(crate) interrupt: Option<InterruptKey>,
    /// Seconds to reach the U-Boot prompt.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub(crate) uboot_timeout: u64,
    /// Seconds per U-Boot command.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub(crate) command_timeout: u64,
    /// Type commands in chunks of N bytes (boards that drop characters); 0 = off.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub(crate) tx_chunk: usize,
    /// Pause after each chunk, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5)]
    pub(crate) tx_delay_ms: u64,
}

fn parse_key(s: &str) -> Result<InterruptKey, String> {
    InterruptKey::parse(s)
}

impl UBootArgs {
    /// Flags first, then the board descriptor, then mainline defaults.
    fn config(&self, board: Option<&Board>) -> UBootConfig {
        let ub = board.and_then(|b| b.uboot());
        let prompt = self
            .prompt
            .clone()
            .or_else(|| ub.and_then(|u| u.prompts.first().cloned()))
            .unwrap_or_else(|| "=> ".into());
        // The descriptor lists keys in the order to try; the first is used.
        let interrupt =
            self.interrupt
                .clone()
                .unwrap_or_else(|| match ub.and_then(|u| u.interrupt.first()) {
                    Some(crate::board::Interrupt::CtrlC) => InterruptKey::CtrlC,
                    Some(crate::board::Interrupt::Keys { keys }) => {
                        InterruptKey::Keyed(keys.clone())
                    }
                    _ => InterruptKey::AnyKey,
                });
        UBootConfig {
            prompt,
            interrupt,
            autoboot: ub.map(|u| u.autoboot.clone()).unwrap_or_default(),
            timeout: Duration::from_secs(self.uboot_timeout),
            command_timeout: Duration::from_secs(self.command_timeout),
            ..UBootConfig::default()
        }
    }
}

/// The board descriptor named by `--board`, if any.
fn load_board(p: &PortArgs, g: &Global) -> anyhow::Result<Option<Board>> {
    let Some(name) = &p.board else {
        return Ok(None);
    };
    let reg = super::boards::registry(g)?;
    Ok(Some(reg.get(name)?.clone()))
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Leave with Ctrl-] then q (Ctrl-] twice sends a literal Ctrl-]).\n\nExamples:\n  sbcflash console --board opi5 --port /dev/ttyUSB0"
)]
pub struct ConsoleArgs {
    #[command(flatten)]
    pub(crate) port: PortArgs,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  sbcflash bootstrap --board opi5 --port /dev/ttyUSB0 --flake .#opi5-lab\n  sbcflash bootstrap --port /dev/ttyUSB0 --uboot-cmd 'setenv bootargs ...' --flake ~/lab --host b1 --ssh-user nixos --dry-run"
)]
pub struct BootstrapArgs {
    /// Boxed: this command has many flags, and clap's `Command` enum holds every command's.
    #[command(flatten)]
    pub(crate) opts: Box<BootstrapOpts>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct BootstrapOpts {
    #[command(flatten)]
    pub(crate) port: PortArgs,
    #[command(flatten)]
    pub(crate) uboot: UBootArgs,
    /// Run this at the U-Boot prompt before booting (repeatable; stops autoboot).
    #[arg(long = "uboot-cmd", value_name = "CMD")]
    pub(crate) uboot_cmd: Vec<String>,
    /// Boot with this U-Boot command (stops autoboot; default when stopped: `boot`).
    #[arg(long, value_name = "CMD")]
    pub(crate) boot_cmd: Option<String>,
    /// Stop autoboot even with nothing to run, then `boot`.
    #[arg(long)]
    pub(crate) interrupt_autoboot: bool,
    /// Start a U-Boot USB gadget so that this host can write the board's storage, then reset.
    #[arg(long, value_enum)]
    pub(crate) flash_via: Option<FlashVia>,
    /// The storage the gadget exposes, as U-Boot names it (default: the descriptor's eMMC,
    /// else its default medium, else `mmc 0`).
    #[arg(long, value_name = "DEV")]
    pub(crate) flash_dev: Option<String>,
    /// The exact U-Boot gadget command (overrides the descriptor's).
    #[arg(long, value_name = "CMD")]
    pub(crate) gadget_cmd: Option<String>,
    /// The image to write while the gadget runs (needed with --flash-via).
    #[arg(long, value_name = "FILE", requires = "flash_via")]
    pub(crate) image: Option<PathBuf>,
    /// Fastboot partition to flash (`mmc0`: the whole eMMC in U-Boot's fastboot).
    #[arg(long, value_name = "NAME")]
    pub(crate) flash_partition: Option<String>,
    /// Which new USB disk is the board's UMS gadget, replacing the default (ID_BUS=usb and a
    /// U-Boot gadget's USB id): KEY=VALUE (udev property), attr:NAME=VALUE (sysfs attribute),
    /// id:VID:PID (hex, PID may be *). Repeatable; all must hold.
    #[arg(long, value_name = "SPEC")]
    pub(crate) ums_match: Vec<String>,
    /// Seconds for the board to appear on this host's USB after the gadget command.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub(crate) flash_timeout: u64,
    /// Skip reading the board's storage back after writing.
    #[arg(long)]
    pub(crate) no_verify: bool,
    /// Allow a UMS disk that the writer's policy refuses as not removable.
    #[arg(long)]
    pub(crate) force: bool,
    /// Do not ask before overwriting the board's storage (required without a terminal).
    #[arg(short, long)]
    pub(crate) yes: bool,
    /// Seconds from the boot command to the login prompt.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub(crate) boot_timeout: u64,
    /// Console login user.
    #[arg(long, default_value = "root")]
    pub(crate) login_user: String,
    /// Console login password (prefer images with console autologin).
    #[arg(long, env = "SBCFLASH_LOGIN_PASSWORD", hide_env_values = true)]
    pub(crate) login_password: Option<String>,
    /// A regex whose first group is the board's IPv4 address in a console line (fallback).
    #[arg(long, value_name = "REGEX")]
    pub(crate) ip_marker: Option<String>,
    /// Flake reference, `REF#HOST` (or `REF` with --host).
    #[arg(long)]
    pub(crate) flake: Option<String>,
    /// NixOS configuration name in the flake.
    #[arg(long)]
    pub(crate) host: Option<String>,
    /// SSH user for nixos-rebuild (`--use-remote-sudo` is added when not root); default:
    /// the descriptor's handoff user, else root.
    #[arg(long)]
    pub(crate) ssh_user: Option<String>,
    /// Address to use for SSH instead of the board's own (NAT'd labs, tests).
    #[arg(long)]
    pub(crate) ssh_host: Option<String>,
    /// SSH port (passed to nixos-rebuild as NIX_SSHOPTS="-p PORT").
    #[arg(long, default_value_t = 22)]
    pub(crate) ssh_port: u16,
    /// Seconds to wait for SSH to answer (and again for the board's console to show the
    /// host keys the network offers).
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub(crate) ssh_timeout: u64,
    /// Also append the host keys proven over the console to this known_hosts file.
    #[arg(long, value_name = "FILE")]
    pub(crate) known_hosts: Option<PathBuf>,
    /// The deployer (program and leading arguments).
    #[arg(long, default_value = "nixos-rebuild", value_name = "CMD")]
    pub(crate) rebuild_cmd: String,
    /// Print the nixos-rebuild command instead of running it.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Stop after the console login and IP address (no SSH, no handoff).
    #[arg(long)]
    pub(crate) no_handoff: bool,
    /// Also print every console line on stderr.
    #[arg(long)]
    pub(crate) show_console: bool,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  sbcflash serial-load --port /dev/ttyUSB0 u-boot-rockchip-spi.bin --then 'sf probe' --then 'sf update ${loadaddr} 0 ${filesize}'\n  sbcflash serial-load --port /dev/ttyUSB0 --protocol xmodem --raw u-boot-spl.bin.normal.out"
)]
pub struct SerialLoadArgs {
    #[command(flatten)]
    pub(crate) port: PortArgs,
    #[command(flatten)]
    pub(crate) uboot: UBootArgs,
    /// The file to send.
    pub(crate) file: PathBuf,
    /// Load address (hex); default: U-Boot's $loadaddr.
    #[arg(long, value_parser = parse_addr)]
    pub(crate) addr: Option<u64>,
    /// ymodem (U-Boot `loady`), xmodem (`loadx`, boot ROM recovery) or xmodem1k (1024-byte
    /// blocks, falls back to 128 when the receiver has no CRC).
    #[arg(long, value_enum, default_value_t = ProtocolArg::Ymodem)]
    pub(crate) protocol: ProtocolArg,
    /// No U-Boot: the receiver (a boot ROM) is already waiting; no crc32 check is possible.
    #[arg(long)]
    pub(crate) raw: bool,
    /// U-Boot command to run after the checked transfer (repeatable).
    #[arg(long, value_name = "CMD")]
    pub(crate) then: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ProtocolArg {
    Ymodem,
    Xmodem,
    Xmodem1k,
}

fn parse_addr(s: &str) -> Result<u64, String> {
    let t = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    u64::from_str_radix(t, 16).map_err(|e| format!("bad address {s:?} (hex expected): {e}"))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

fn transcript_path(p: &PortArgs, what: &str) -> PathBuf {
    if let Some(t) = &p.transcript {
        return t.clone();
    }
    let base = dirs::state_dir()
        .or_else(dirs::cache_dir)
        .unwrap_or_else(std::env::temp_dir)
        .join("sbcflash")
        .join("console");
    base.join(format!(
        "{what}-{}.log",
        chrono::Local::now().format("%Y%m%d-%H%M%S")
    ))
}

fn baud(p: &PortArgs, board: Option<&Board>) -> u32 {
    p.baud
        .or_else(|| board.map(|b| b.console().baud))
        .unwrap_or(115_200)
}

/// The gadget command for `via`: `--gadget-cmd`, else the descriptor's template (refusing
/// when the descriptor does not know the build to have it), else the mainline form.
fn gadget_command(
    a: &BootstrapOpts,
    via: FlashVia,
    board: Option<&Board>,
) -> anyhow::Result<String> {
    if let Some(c) = &a.gadget_cmd {
        return Ok(c.clone());
    }
    let dev = a.flash_dev.clone().unwrap_or_else(|| {
        board
            .and_then(|b| {
                b.desc
                    .storage
                    .iter()
                    .find(|m| m.kind == MediumKind::Emmc && m.uboot_dev.is_some())
                    .or(Some(b.default_medium()))
                    .and_then(|m| m.uboot_dev.clone())
            })
            .unwrap_or_else(|| "mmc 0".into())
    });
    let Some(b) = board else {
        return Ok(via.command(&dev));
    };
    let cmds = b.uboot().map(|u| &u.commands);
    let t = match via {
        FlashVia::Ums => cmds.and_then(|c| c.ums.clone()),
        FlashVia::Rockusb => cmds.and_then(|c| c.rockusb.clone()),
        FlashVia::Fastboot => cmds.and_then(|c| c.fastboot.clone()),
    };
    match t {
        Some(t) => Ok(UBootCommands::render(&t, &dev)),
        None => Err(ExitError::new(
            Exit::Refused,
            format!(
                "the descriptor of {} lists no U-Boot command for {via:?} (its U-Boot is not known to have that gadget); pass --gadget-cmd to try anyway",
                b.id()
            ),
        )
        .into()),
    }
}

/// `--port`, else the only USB serial adapter; with several, ask on a terminal (a numbered
/// list, read a number), else fail listing them.
fn choose_port(port: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
    match serial::pick_port(port) {
        Err(ConsoleError::SeveralPorts(_)) if std::io::stdin().is_terminal() => {}
        r => return Ok(r?),
    }
    let ports = serial::usb_port_list()?;
    let n = ports.len();
    eprintln!("several USB serial adapters are connected:");
    for (i, p) in ports.iter().enumerate() {
        eprintln!("  {}) {p}", i + 1);
    }
    let stdin = std::io::stdin();
    loop {
        eprint!("which one? [1-{n}] ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        if stdin.read_line(&mut line)? == 0 {
            return Err(ExitError::new(
                Exit::BadInput,
                "no serial adapter chosen (end of input); pass --port",
            )
            .into());
        }
        match line.trim().parse::<usize>() {
            Ok(k) if (1..=n).contains(&k) => return Ok(ports[k - 1].path.clone()),
            _ => eprintln!("{:?} is not a number from 1 to {n}", line.trim()),
        }
    }
}

/// Opens the port and a session with transcript and a stage printer.
fn open_session(
    p: &PortArgs,
    board: Option<&Board>,
    what: &str,
    g: &Global,
) -> anyhow::Result<Session> {
    let port = choose_port(p.port.as_deref())?;
    let baud = baud(p, board);
    let mut link = Link::serial(&port, baud)?;
    link.set_reopen_for(Duration::from_secs(p.reopen_secs));
    let mut s = Session::new(link);
    let tp = transcript_path(p, what);
    let mut tr = Transcript::create(&tp, Instant::now())
        .with_context(|| format!("create transcript {}", tp.display()))?;
    tr.echo_kernel = g.verbose > 0 && !g.json;
    s.transcript = Some(tr);
    let reporter = g.reporter();
    let json = g.json;
    let quiet = g.quiet;
    let job = port.display().to_string();
    s.on_stage(move |t, st| {
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
    if !g.quiet && !g.json {
        eprintln!(
            "console {} at {baud} baud{}, transcript {}",
            port.display(),
            board
                .map(|b| format!(" ({})", b.name()))
                .unwrap_or_default(),
            tp.display()
        );
    }
    Ok(s)
}

fn with_transcript<T>(s: &mut Session, r: Result<T, ConsoleError>) -> anyhow::Result<T> {
    s.finish();
    let path = s
        .transcript
        .as_ref()
        .map(|t| t.path().display().to_string());
    if r.is_err() {
        if let Some(p) = path {
            eprintln!("console transcript: {p}");
        }
    }
    Ok(r?)
}

/// The writer side of `--flash-via`: the image, its checks, and how to recognise the board
/// on this host's USB. Asks before overwriting (or needs --yes).
fn host_flash(
    a: &BootstrapOpts,
    via: FlashVia,
    board: Option<&Board>,
    g: &Global,
) -> anyhow::Result<HostFlash> {
    let Some(image) = a.image.clone() else {
        return Err(ExitError::new(
            Exit::Usage,
            format!(
                "--flash-via {} needs --image FILE (what to write to the board's storage)",
                via.name()
            ),
        )
        .into());
    };
    let ids = board
        .and_then(|b| b.uboot())
        .and_then(|u| u.commands.gadget_vid.map(|v| (v, u.commands.gadget_pid)));
    let ums_match = if a.ums_match.is_empty() {
        UmsMatch::default_for(ids)
    } else {
        UmsMatch::parse(&a.ums_match).map_err(|e| ExitError::new(Exit::Usage, e))?
    };
    if !a.yes {
        if !std::io::stdin().is_terminal() {
            return Err(ExitError::new(
                Exit::Refused,
                format!(
                    "refusing to overwrite the board's storage through {}: stdin is not a terminal, so there is no one to confirm; pass --yes",
                    via.name()
                ),
            )
            .into());
        }
        eprint!(
            "The board's storage will be OVERWRITTEN with {} through U-Boot's {} gadget. Type 'yes' to continue: ",
            image.display(),
            via.name()
        );
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        if line.trim() != "yes" {
            return Err(ExitError::new(Exit::Refused, "not confirmed; nothing was written").into());
        }
    }
    let mut f = HostFlash::new(image, Box::new(RusbBus::new()), g.reporter());
    f.verify = !a.no_verify;
    f.appear_timeout = Duration::from_secs(a.flash_timeout);
    f.ums_match = ums_match;
    f.force = a.force;
    f.partition = a.flash_partition.clone();
    f.usb_id = ids.and_then(|(v, p)| p.map(|p| (v, p)));
    Ok(f)
}

/// Finds SSH on the network, scans its host keys and proves them against the console
/// (the session is still logged in), then writes the run's known_hosts file `kh` (and
/// appends to `--known-hosts`). Returns the SSH address and the proven keys.
fn handoff_proof(
    rt: &tokio::runtime::Runtime,
    s: &mut Session,
    h: &Handoff,
    linux: &LinuxConfig,
    reached: &bootstrap::Reached,
    kh: &std::path::Path,
) -> Result<(String, Vec<HostKey>), ConsoleError> {
    let host = match (&h.ssh_host, reached.ip) {
        (Some(host), _) => host.clone(),
        (None, Some(ip)) => ip.to_string(),
        (None, None) => {
            return Err(ConsoleError::Handoff(
                "could not find the board's IP address (no `ip` answer, no --ip-marker match); pass --ssh-host".into(),
            ))
        }
    };
    let t = Instant::now();
    let banner = handoff::wait_for_ssh(&host, h.ssh_port, h.ssh_timeout)?;
    s.stage(&Stage::Note(format!(
        "SSH answers on {host}:{} ({banner}) after {:.1}s",
        h.ssh_port,
        t.elapsed().as_secs_f64()
    )));
    let scanned = handoff::keyscan(&host, h.ssh_port)?;
    let network = hostkeys::parse_keyscan(&scanned.lines).map_err(ConsoleError::Handoff)?;
    let addr = format!("{host}:{}", h.ssh_port);
    let wait = ProofWait::new(h.ssh_timeout, Duration::from_secs(2));
    let keys = rt.block_on(bootstrap::prove_host_keys(s, linux, &addr, &network, wait))?;
    for k in &keys {
        let how = if network.contains(k) {
            "proven over the console (the network offers it)"
        } else {
            "shown on the console"
        };
        s.stage(&Stage::Note(format!("host key {how}: {}", k.describe())));
    }
    let lines = hostkeys::known_hosts_lines(&host, h.ssh_port, &keys);
    handoff::write_known_hosts(kh, &lines)?;
    s.stage(&Stage::Note(format!(
        "known_hosts of this run: {}",
        kh.display()
    )));
    if let Some(user) = &h.known_hosts {
        let n = handoff::append_known_hosts(user, &lines)?;
        s.stage(&Stage::Note(format!(
            "{n} key(s) appended to {}",
            user.display()
        )));
    }
    Ok((host, keys))
}

/// `bootstrap`'s flags, the board descriptor and the operator's confirmation, resolved once:
/// after [`BootstrapPlan::new`] nothing reads the flags again.
struct BootstrapPlan {
    /// The serial session: port, baud, transcript.
    port: PortArgs,
    board: Option<Board>,
    /// What the console cores do: U-Boot, the gadget, Linux up to its IP address.
    console: Plan,
    /// The host side of `--flash-via` (already confirmed).
    flasher: Option<HostFlash>,
    show_console: bool,
    tx_chunk: usize,
    tx_delay: Duration,
    /// `None` with `--no-handoff`: stop at the IP address.
    handoff: Option<Handoff>,
}

/// SSH and `nixos-rebuild` once the board is up.
struct Handoff {
    flake: String,
    host: Option<String>,
    ssh_user: String,
    /// `--ssh-host`, else the address the console found.
    ssh_host: Option<String>,
    ssh_port: u16,
    ssh_timeout: Duration,
    rebuild_cmd: String,
    dry_run: bool,
    /// `--known-hosts`: the user's file the proven keys are appended to.
    known_hosts: Option<std::path::PathBuf>,
}

impl BootstrapPlan {
    fn new(a: BootstrapOpts, g: &Global) -> anyhow::Result<BootstrapPlan> {
        let flake = match (&a.flake, a.no_handoff) {
            (_, true) => None,
            (Some(f), false) => Some(f.clone()),
            (None, false) => {
                return Err(ExitError::new(
                    Exit::Usage,
                    "--flake REF#HOST is needed for the handoff (or pass --no-handoff)",
                )
                .into())
            }
        };
        let ip_marker = match &a.ip_marker {
            Some(r) => Some(
                regex::Regex::new(r)
                    .map_err(|e| ExitError::new(Exit::Usage, format!("--ip-marker: {e}")))?,
            ),
            None => None,
        };
        let board = load_board(&a.port, g)?;
        let b = board.as_ref();
        let flash_via = match a.flash_via {
            Some(v) => Some((v, gadget_command(&a, v, b)?)),
            None => None,
        };
        let ssh_user = a
            .ssh_user
            .clone()
            .or_else(|| b.map(|b| b.handoff().ssh_user.clone()))
            .unwrap_or_else(|| "root".into());
        let console = Plan {
            uboot: a.uboot.config(b),
            linux: LinuxConfig {
                boot_timeout: Duration::from_secs(a.boot_timeout),
                login_user: a.login_user.clone(),
                login_password: a.login_password.clone(),
                ip_marker,
                ..LinuxConfig::default()
            },
            force_interrupt: a.interrupt_autoboot,
            uboot_cmds: a.uboot_cmd.clone(),
            boot_cmd: a.boot_cmd.clone(),
            flash_via,
            find_ip: true,
        };
        let flasher = match a.flash_via {
            Some(via) => Some(host_flash(&a, via, b, g)?),
            None => None,
        };
        let handoff = flake.map(|flake| Handoff {
            flake,
            host: a.host.clone(),
            ssh_user,
            ssh_host: a.ssh_host.clone(),
            ssh_port: a.ssh_port,
            ssh_timeout: Duration::from_secs(a.ssh_timeout),
            rebuild_cmd: a.rebuild_cmd.clone(),
            dry_run: a.dry_run,
            known_hosts: a.known_hosts.clone(),
        });
        Ok(BootstrapPlan {
            show_console: a.show_console,
            tx_chunk: a.uboot.tx_chunk,
            tx_delay: Duration::from_millis(a.uboot.tx_delay_ms),
            port: a.port,
            board,
            console,
            flasher,
            handoff,
        })
    }
}

pub(crate) fn run_bootstrap(a: BootstrapArgs, g: &Global) -> anyhow::Result<Exit> {
    let mut p = BootstrapPlan::new(*a.opts, g)?;
    let rt = runtime()?;
    let _enter = rt.enter(); // the serial port registers with the runtime's reactor
    let mut s = open_session(&p.port, p.board.as_ref(), "bootstrap", g)?;
    if let Some(t) = s.transcript.as_mut() {
        t.echo = p.show_console;
    }
    s.tx_chunk = p.tx_chunk;
    s.tx_delay = p.tx_delay;
    let r = rt.block_on(bootstrap::run(
        &mut s,
        &p.console,
        p.flasher.as_mut().map(|f| f as &mut dyn bootstrap::Flasher),
    ));
    let r = match (r, p.handoff.as_ref()) {
        (Ok(reached), Some(h)) => {
            let kh = s
                .transcript
                .as_ref()
                .map(|t| t.path().with_extension("known_hosts"))
                .unwrap_or_else(|| std::env::temp_dir().join("sbcflash-bootstrap.known_hosts"));
            handoff_proof(&rt, &mut s, h, &p.console.linux, &reached, &kh)
                .map(|(host, _)| (reached, Some((host, kh))))
        }
        (Ok(reached), None) => Ok((reached, None)),
        (Err(e), _) => Err(e),
    };
    let (reached, proven) = with_transcript(&mut s, r)?;
    drop(s);
    let (Some(h), Some((host, known_hosts))) = (p.handoff, proven) else {
        if let Some(ip) = reached.ip {
            outln!("{ip}");
        }
        return Ok(Exit::Ok);
    };
    let env_opts = std::env::var("NIX_SSHOPTS").ok();
    let rebuild = Rebuild::plan(&RebuildPlan {
        rebuild_cmd: &h.rebuild_cmd,
        flake: &h.flake,
        host: h.host.as_deref(),
        ssh_user: &h.ssh_user,
        ssh_host: &host,
        ssh_port: h.ssh_port,
        env_sshopts: env_opts.as_deref(),
        known_hosts: Some(&known_hosts),
    })?;
    if h.dry_run {
        outln!("{}", rebuild.display());
        return Ok(Exit::Ok);
    }
    eprintln!("running: {}", rebuild.display());
    let code = rebuild.run()?;
    if code == 0 {
        eprintln!("{} finished successfully", rebuild.program);
        return Ok(Exit::Ok);
    }
    eprintln!("{} exited with status {code}", rebuild.program);
    // Pass the deployer's status through unchanged.
    std::process::exit(code);
}

pub(crate) fn run_serial_load(a: SerialLoadArgs, g: &Global) -> anyhow::Result<Exit> {
    let data = std::fs::read(&a.file).with_context(|| format!("read {}", a.file.display()))?;
    if data.is_empty() {
        return Err(
            ExitError::new(Exit::BadInput, format!("{} is empty", a.file.display())).into(),
        );
    }
    let name = a
        .file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let board = load_board(&a.port, g)?;
    let board = board.as_ref();
    let plan = LoadPlan {
        uboot: a.uboot.config(board),
        protocol: match a.protocol {
            ProtocolArg::Ymodem => Protocol::Ymodem,
            ProtocolArg::Xmodem => Protocol::Xmodem,
            ProtocolArg::Xmodem1k => Protocol::Xmodem1k,
        },
        addr: a.addr,
        then: a.then.clone(),
        raw: a.raw,
    };
    let rt = runtime()?;
    let _enter = rt.enter();
    let mut s = open_session(&a.port, board, "serial-load", g)?;
    let r = rt.block_on(load::run(&mut s, &plan, &name, data));
    let l = with_transcript(&mut s, r)?;
    let rate = l.bytes as f64 / l.seconds.max(0.001) / 1024.0;
    if g.json {
        let v = serde_json::json!({
            "bytes": l.bytes, "crc32": format!("{:08x}", l.crc32),
            "addr": l.addr.map(|x| format!("0x{x:x}")), "seconds": l.seconds,
        });
        crate::progress::json_line(&mut super::out::stdout(), "serial-load", v)?;
    } else {
        outln!(
            "sent {} ({} bytes, crc32 {:08x}){} in {:.1}s ({rate:.1} KiB/s)",
            a.file.display(),
            l.bytes,
            l.crc32,
            l.addr.map(|x| format!(" to 0x{x:x}")).unwrap_or_default(),
            l.seconds
        );
    }
    Ok(Exit::Ok)
}

/// Restores the terminal mode on drop (also on panic).
struct RawMode {
    saved: Option<nix::sys::termios::Termios>,
}

impl RawMode {
    fn enter() -> RawMode {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return RawMode { saved: None };
        }
        let Ok(saved) = tcgetattr(&stdin) else {
            return RawMode { saved: None };
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &raw);
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                t,
            );
        }
    }
}

/// What the escape-key logic decided for a chunk of keyboard input.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum KeyAction {
    Send(Vec<u8>),
    Quit,
}

/// picocom-style escape: Ctrl-] then `q` quits, Ctrl-] twice sends one Ctrl-], Ctrl-] then
/// anything else sends both. `armed` carries the state between chunks.
pub(crate) fn escape_keys(input: &[u8], armed: &mut bool) -> Vec<KeyAction> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    for &b in input {
        if *armed {
            *armed = false;
            match b {
                b'q' | b'Q' | 0x11 => {
                    if !cur.is_empty() {
                        out.push(KeyAction::Send(std::mem::take(&mut cur)));
                    }
                    out.push(KeyAction::Quit);
                    return out;
                }
                0x1d => cur.push(0x1d),
                _ => {
                    cur.push(0x1d);
                    cur.push(b);
                }
            }
        } else if b == 0x1d {
            *armed = true;
        } else {
            cur.push(b);
        }
    }
    if !cur.is_empty() {
        out.push(KeyAction::Send(cur));
    }
    out
}

pub(crate) fn run_console(a: ConsoleArgs, g: &Global) -> anyhow::Result<Exit> {
    let board = load_board(&a.port, g)?;
    let baud = baud(&a.port, board.as_ref());
    let rt = runtime()?;
    let _enter = rt.enter();
    let port = choose_port(a.port.port.as_deref())?;
    let mut link = Link::serial(&port, baud)?;
    link.set_reopen_for(Duration::from_secs(a.port.reopen_secs));
    let tp = transcript_path(&a.port, "console");
    let mut tr = Transcript::create(&tp, Instant::now())
        .with_context(|| format!("create transcript {}", tp.display()))?;
    if !g.quiet {
        eprintln!(
            "console {} at {baud} baud; transcript {}; leave with Ctrl-] q\r",
            port.display(),
            tp.display()
        );
    }
    let raw = RawMode::enter();
    // Keyboard on a plain thread (stdin reads block); bytes go over a channel.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<Vec<u8>>>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(n) => {
                    if tx.send(Some(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let r: Result<(), ConsoleError> = rt.block_on(async {
        let mut out = std::io::stdout();
        let mut buf = vec![0u8; 4096];
        let mut armed = false;
        let mut eof_at: Option<tokio::time::Instant> = None;
        loop {
            let until =
                eof_at.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                r = link.read(&mut buf) => {
                    let n = r?;
                    tr.received(&buf[..n], Instant::now());
                    out.write_all(&buf[..n])?;
                    out.flush()?;
                }
                k = rx.recv(), if eof_at.is_none() => {
                    match k.flatten() {
                        None => {
                            // stdin closed (a pipe): show what is still coming, then leave.
                            eof_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                        }
                        Some(bytes) => {
                            for act in escape_keys(&bytes, &mut armed) {
                                match act {
                                    KeyAction::Quit => return Ok(()),
                                    KeyAction::Send(b) => {
                                        tr.sent(&b, Instant::now());
                                        link.write_all(&b).await?;
                                    }
                                }
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(until) => {
                    if eof_at.is_some() {
                        return Ok(());
                    }
                }
            }
            for n in std::mem::take(&mut link.notes) {
                tr.note(&n, Instant::now());
                eprint!("\r\n[sbcflash: {n}]\r\n");
            }
        }
    });
    drop(raw);
    tr.finish();
    if !g.quiet {
        eprintln!("\nconsole closed; transcript {}", tp.display());
    }
    r.map_err(|e| anyhow::Error::new(e).context(format!("console transcript: {}", tp.display())))?;
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequence() {
        let mut armed = false;
        assert_eq!(
            escape_keys(b"ab\x1dq", &mut armed),
            vec![KeyAction::Send(b"ab".to_vec()), KeyAction::Quit]
        );
        let mut armed = false;
        assert_eq!(
            escape_keys(b"x\x1d", &mut armed),
            vec![KeyAction::Send(b"x".to_vec())]
        );
        assert!(armed);
        assert_eq!(
            escape_keys(b"\x1d", &mut armed),
            vec![KeyAction::Send(vec![0x1d])]
        );
        let mut armed = false;
        assert_eq!(
            escape_keys(b"\x1dz", &mut armed),
            vec![KeyAction::Send(vec![0x1d, b'z'])]
        );
    }
}
