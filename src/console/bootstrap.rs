//! The headless path after power-on, as one plan: catch U-Boot (when anything has to be done
//! there), run its commands, boot, follow Linux, log in, find the IP address. The handoff to
//! `nixos-rebuild` is done by the caller with [`super::handoff`] so that it can print and
//! ask first.

use std::net::Ipv4Addr;
use std::time::Duration;

use super::hostkeys::{self, HostKey, Next, ProofWait};
use super::linux::{self, Arrival, Follow, LinuxConfig, Login};
use super::session::Session;
use super::uboot::{self, Fire, Gadget, Interrupt, ResetWatch, UBootConfig};
use super::{ConsoleError, Stage};

/// Which U-Boot USB gadget to start for flashing the board's storage from this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FlashVia {
    /// USB mass storage (`ums 0 mmc 0`): the eMMC shows up as a disk on this host.
    Ums,
    /// Rockchip rockusb (`rockusb 0 mmc 0`).
    Rockusb,
    /// Android fastboot (`fastboot usb 0`).
    Fastboot,
}

impl FlashVia {
    /// The U-Boot command for `dev` (e.g. `mmc 0`).
    pub(crate) fn command(self, dev: &str) -> String {
        match self {
            FlashVia::Ums => format!("ums 0 {dev}"),
            FlashVia::Rockusb => format!("rockusb 0 {dev}"),
            FlashVia::Fastboot => "fastboot usb 0".to_string(),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            FlashVia::Ums => "ums",
            FlashVia::Rockusb => "rockusb",
            FlashVia::Fastboot => "fastboot",
        }
    }

    /// What this host does while the gadget runs.
    pub(crate) fn hint(self) -> &'static str {
        match self {
            FlashVia::Ums => "waiting for the board's storage to appear as a USB disk on this host",
            FlashVia::Rockusb => "waiting for the board's rockusb device on this host's USB",
            FlashVia::Fastboot => "waiting for the board's fastboot device on this host's USB",
        }
    }
}

/// The host side of a gadget: [`super::gadget::HostFlash`] writes the image with sbcflash's
/// writers; tests plug in the same type over a simulated USB bus.
pub trait Flasher {
    /// Called before U-Boot starts the gadget: check the inputs, start watching (udev), so
    /// that the board's appearance cannot be missed.
    fn prepare(&mut self, via: FlashVia) -> Result<(), ConsoleError>;
    /// Called while the gadget runs: find the board on USB, write, verify. Returns a summary.
    fn flash(&mut self, via: FlashVia) -> Result<String, ConsoleError>;
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub uboot: UBootConfig,
    pub linux: LinuxConfig,
    /// Stop autoboot even when there is nothing to run (`--interrupt-only` debugging).
    pub force_interrupt: bool,
    pub uboot_cmds: Vec<String>,
    /// The command that boots once U-Boot was interrupted (default `boot`).
    pub boot_cmd: Option<String>,
    /// The gadget and the exact U-Boot command that starts it.
    pub flash_via: Option<(FlashVia, String)>,
    /// Shell commands to find the address, tried in order; then the console marker.
    pub find_ip: bool,
}

impl Plan {
    fn needs_uboot(&self) -> bool {
        self.force_interrupt
            || !self.uboot_cmds.is_empty()
            || self.boot_cmd.is_some()
            || self.flash_via.is_some()
    }
}

/// Result of [`run`].
#[derive(Debug, Clone)]
pub struct Reached {
    pub ip: Option<Ipv4Addr>,
}

/// Runs U-Boot command `c`, which must succeed, and notes it with its last output line.
pub(crate) async fn uboot_command_ok(
    s: &mut Session,
    cfg: &UBootConfig,
    c: &str,
) -> Result<(), ConsoleError> {
    let n = s.next_n();
    let out = s.run(&mut uboot::command(cfg, c, n)).await?.ok()?;
    s.stage(&Stage::Note(format!(
        "U-Boot `{c}`: ok{}",
        out.lines
            .last()
            .map(|l| format!(" ({})", l.trim()))
            .unwrap_or_default()
    )));
    Ok(())
}

/// How often a query whose answer could not be read cleanly is asked.
const ASKS: u32 = 3;

/// Runs query `cmd` and parses its output with `parse`; an answer that does not parse
/// cleanly (a garbled end marker, an address that is not one) is asked again, never
/// guessed. `None`: the command failed (not available here) or never answered cleanly.
pub async fn ask<T>(
    s: &mut Session,
    cfg: &LinuxConfig,
    cmd: &str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<Option<T>, ConsoleError> {
    for attempt in 1..=ASKS {
        let n = s.next_n();
        let why = match s.run(&mut linux::command(cfg, cmd, n)).await {
            Ok(out) if out.status != 0 => return Ok(None),
            Ok(out) => match parse(&out.text()) {
                Ok(v) => return Ok(Some(v)),
                Err(e) => e,
            },
            Err(ConsoleError::Garbled { line, .. }) => format!("end marker {line:?}"),
            Err(e) => return Err(e),
        };
        s.stage(&Stage::Note(format!(
            "`{cmd}`: answer not clean ({why}){}",
            if attempt < ASKS {
                format!(", asking again ({}/{ASKS})", attempt + 1)
            } else {
                format!("; gave up after {ASKS} tries")
            }
        )));
    }
    Ok(None)
}

/// Runs the plan. `flasher` is needed when the plan has `flash_via`.
pub async fn run(
    s: &mut Session,
    plan: &Plan,
    flasher: Option<&mut dyn Flasher>,
) -> Result<Reached, ConsoleError> {
    let mut resets = ResetWatch::default();
    if plan.needs_uboot() {
        let n = s.next_n();
        let mut m = Interrupt::new(&plan.uboot, resets, n);
        resets = s.run(&mut m).await?;
        for c in &plan.uboot_cmds {
            uboot_command_ok(s, &plan.uboot, c).await?;
        }
        if let Some((via, cmd)) = &plan.flash_via {
            let via = *via;
            let Some(flasher) = flasher else {
                return Err(ConsoleError::Flash {
                    via: via.name().into(),
                    msg: "nothing to write the board with (no image given)".into(),
                    exit: crate::exit::Exit::Usage,
                });
            };
            flasher.prepare(via)?;
            let cmd = cmd.clone();
            let mut g = Gadget::new(&cmd, &plan.uboot.prompt, Duration::from_secs(2));
            s.run(&mut g).await?;
            s.stage(&Stage::Note(format!("U-Boot runs `{cmd}`: {}", via.hint())));
            // The write blocks this thread; nothing needs the console meanwhile (the gadget
            // prints at most a spinner, which the kernel buffers or the UART drops).
            let written = flasher.flash(via);
            // Ctrl-C ends the gadget in every case, so the board is back at its prompt.
            s.send(&[0x03]).await?;
            s.settle(Duration::from_millis(500), Duration::from_secs(5))
                .await?;
            let summary = written?;
            s.stage(&Stage::Note(format!("{}: {summary}", via.name())));
            // Reset into what was written.
            s.run(&mut Fire::new("reset")).await?;
            resets.forget();
            s.stage(&Stage::Note("U-Boot `reset` sent".into()));
        } else {
            let boot = plan.boot_cmd.clone().unwrap_or_else(|| "boot".into());
            s.run(&mut Fire::new(&boot)).await?;
            s.stage(&Stage::Note(format!("U-Boot `{boot}` sent")));
        }
    }
    let mut follow = Follow::new(&plan.linux, resets);
    let (arrival, console_ip) = s.run(&mut follow).await?;
    if arrival == Arrival::Login {
        s.stage(&Stage::LoginPrompt);
    }
    let n = s.next_n();
    s.run(&mut Login::new(&plan.linux, arrival.clone(), n))
        .await?;
    s.stage(&Stage::LoggedIn);
    // Keep kernel messages off the console from here on (fewer of them interleave with
    // output; boards booted with `ignore_loglevel` keep printing, which the engine handles).
    let n = s.next_n();
    match s
        .run(&mut linux::command(&plan.linux, "dmesg -n 1", n))
        .await
    {
        // Nothing is read from its answer: a garbled one is no reason to stop.
        Ok(_) | Err(ConsoleError::Garbled { .. }) => {}
        Err(e) => return Err(e),
    }
    let mut ip = None;
    if plan.find_ip {
        let mut from = String::new();
        for (cmd, parse) in [
            (
                "ip -4 -j addr show",
                linux::parse_ip_json as linux::IpParser,
            ),
            ("ip -4 addr show", linux::parse_ip_text),
        ] {
            if let Some(Some(a)) = ask(s, &plan.linux, cmd, parse).await? {
                ip = Some(a);
                from = format!("`{cmd}`");
                break;
            }
        }
        if ip.is_none() {
            ip = console_ip;
            from = "the console marker".into();
        }
        if let Some(a) = ip {
            s.stage(&Stage::Note(format!("board IP address {a} (from {from})")));
        }
    }
    Ok(Reached { ip })
}

/// The board's SSH host keys as its console shows them ([`hostkeys::CONSOLE_QUERY`]); an
/// unclean answer is asked again, a failed query is no keys.
pub(crate) async fn console_host_keys(
    s: &mut Session,
    cfg: &LinuxConfig,
) -> Result<Vec<HostKey>, ConsoleError> {
    Ok(
        ask(s, cfg, hostkeys::CONSOLE_QUERY, hostkeys::parse_console)
            .await?
            .unwrap_or_default(),
    )
}

/// Proves the keys the network offered at `addr` against the console: asks the console
/// until it shows keys of every offered algorithm (first boot: sshd may still be making
/// them) or `wait` runs out; a different key is refused at once.
pub async fn prove_host_keys(
    s: &mut Session,
    cfg: &LinuxConfig,
    addr: &str,
    network: &[HostKey],
    mut wait: ProofWait,
) -> Result<Vec<HostKey>, ConsoleError> {
    loop {
        let console = console_host_keys(s, cfg).await?;
        let v = hostkeys::compare(&console, network);
        let waiting_for = match &v {
            hostkeys::Verdict::NotYet(m) => m.join(", "),
            _ => String::new(),
        };
        match wait.next(v, tokio::time::Instant::now().into_std()) {
            Next::Trust(k) => return Ok(k),
            Next::Refuse { network, console } => {
                return Err(ConsoleError::HostKeyMismatch {
                    addr: addr.to_string(),
                    network: network.iter().map(HostKey::describe).collect(),
                    console: console.iter().map(HostKey::describe).collect(),
                })
            }
            Next::GiveUp(missing) => {
                return Err(ConsoleError::HostKeyUnproven {
                    addr: addr.to_string(),
                    missing: missing.join(", "),
                    waited: wait.timeout(),
                })
            }
            Next::AskAt(t) => {
                s.stage(&Stage::Note(format!(
                    "no SSH host key on the console yet for {waiting_for}: asking again"
                )));
                tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await;
            }
        }
    }
}
