//! The U-Boot driver: stop autoboot, confirm the prompt, run commands.
//!
//! Rules learnt from the field (see the harness README, and labgrid's and tbot's U-Boot drivers):
//! - Send the interrupt key *repeatedly* until the prompt shows; a single key is lost when
//!   it comes too early (QEMU's pty, boards that flush their UART), and `bootdelay=0`
//!   leaves only one `tstc()` check. Keys start when U-Boot proper's banner or the autoboot
//!   text appears, or when the console has been idle (a board already sitting at `=> `).
//! - Never a bare Enter at the prompt (U-Boot repeats the last command); the idle nudge and
//!   the line clean-up use Ctrl-C.
//! - Never a key at the extlinux menu (`Enter choice:`): it stops the menu's countdown and
//!   waits forever. Seeing the menu while trying to interrupt is reported as a miss.
//! - A second `U-Boot SPL`/`U-Boot 20xx` banner is an unexpected reset; known fatal U-Boot
//!   messages are errors at once.

use std::time::{Duration, Instant};

use super::command::Command;
use super::expect::{Event, Expect};
use super::{ConsoleError, Deadline, Machine, Stage, Step, Tail};

/// How a board's U-Boot wants its autoboot interrupted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterruptKey {
    /// Mainline: any key (we send a space).
    AnyKey,
    /// Rockchip vendor U-Boot and others: Ctrl-C.
    CtrlC,
    /// `AUTOBOOT_KEYED` builds: a string (e.g. a space for "Press SPACE", or "stop").
    Keyed(String),
}

impl InterruptKey {
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            InterruptKey::AnyKey => b" ".to_vec(),
            InterruptKey::CtrlC => vec![0x03],
            InterruptKey::Keyed(s) => s.as_bytes().to_vec(),
        }
    }

    /// Parses `any`, `ctrl-c`, or `string:TEXT`.
    pub fn parse(s: &str) -> Result<InterruptKey, String> {
        match s {
            "any" | "any-key" | "space" => Ok(InterruptKey::AnyKey),
            "ctrl-c" | "ctrlc" | "^C" => Ok(InterruptKey::CtrlC),
            _ => match s.strip_prefix("string:") {
                Some(t) if !t.is_empty() => Ok(InterruptKey::Keyed(t.to_string())),
                _ => Err(format!(
                    "unknown interrupt key {s:?}: use any, ctrl-c or string:TEXT"
                )),
            },
        }
    }
}

impl std::fmt::Display for InterruptKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InterruptKey::AnyKey => write!(f, "any key (space)"),
            InterruptKey::CtrlC => write!(f, "Ctrl-C"),
            InterruptKey::Keyed(s) => write!(f, "the string {s:?}"),
        }
    }
}

/// U-Boot settings a board descriptor provides.
#[derive(Debug, Clone)]
pub struct UBootConfig {
    pub prompt: String,
    pub interrupt: InterruptKey,
    /// Autoboot countdown texts (prefixes) from the descriptor, besides the usual ones.
    pub autoboot: Vec<String>,
    /// Time between interrupt keys.
    pub key_interval: Duration,
    /// Silence after which the console counts as idle (nudge with Ctrl-C).
    pub idle_nudge: Duration,
    /// Overall time to reach the prompt.
    pub timeout: Duration,
    /// Per-command timeout.
    pub command_timeout: Duration,
}

impl Default for UBootConfig {
    fn default() -> Self {
        UBootConfig {
            prompt: "=> ".into(),
            interrupt: InterruptKey::AnyKey,
            autoboot: Vec::new(),
            key_interval: Duration::from_millis(50),
            idle_nudge: Duration::from_secs(3),
            timeout: Duration::from_secs(60),
            command_timeout: Duration::from_secs(30),
        }
    }
}

/// Messages after which U-Boot will not get anywhere useful.
const FATAL: &[&str] = &[
    "### ERROR ### Please RESET the board ###",
    "Synchronous Abort",
    "data abort",
    "prefetch abort",
    "Unhandled exception",
    "Bad Linux ARM64 Image magic",
    "Bad Linux RISCV Image magic",
    "Wrong Image Format for bootm command",
    "Wrong Ramdisk Image Format",
    "Ramdisk image is corrupt or invalid",
    "ERROR: Did not find a cmdline Flattened Device Tree",
    "ERROR: Failed to allocate",
    "Could not find a valid device tree",
    "Bad Data CRC",
    "Bad Header Checksum",
    "Must RESET board to recover",
    "Kernel image is corrupt",
    "Error: Bad gzipped data",
];

/// U-Boot's own lines that are fatal errors, seen at any time.
pub(crate) fn fatal_line(line: &str) -> Option<&'static str> {
    FATAL.iter().copied().find(|f| line.contains(f))
}

/// Which boot banner a line is, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Banner {
    Spl,
    Proper,
}

pub(crate) fn banner(line: &str) -> Option<Banner> {
    let t = line.trim_start();
    if t.starts_with("U-Boot SPL 20") || t.starts_with("U-Boot TPL 20") {
        Some(Banner::Spl)
    } else if t.starts_with("U-Boot 20") {
        Some(Banner::Proper)
    } else {
        None
    }
}

/// Tracks banners across a whole session: a banner kind seen twice is a reset.
#[derive(Debug, Default, Clone)]
pub struct ResetWatch {
    spl: bool,
    proper: bool,
}

impl ResetWatch {
    /// Returns `Err(line)` on a repeated banner; `Ok(Some(b))` on a first one.
    pub(crate) fn check(&mut self, line: &str) -> Result<Option<Banner>, String> {
        let b = banner(line);
        let repeat = match b {
            Some(Banner::Spl) => self.spl || self.proper,
            Some(Banner::Proper) => self.proper,
            None => line.trim_start().starts_with("resetting ..."),
        };
        if repeat && (b.is_some() || self.proper) {
            return Err(line.to_string());
        }
        match b {
            Some(Banner::Spl) => self.spl = true,
            Some(Banner::Proper) => self.proper = true,
            None => {}
        }
        Ok(b)
    }

    /// After a deliberate `reset`: the next banners are expected.
    pub(crate) fn forget(&mut self) {
        *self = ResetWatch::default();
    }
}

/// Alarm for commands run at the U-Boot prompt: fatal messages, a reset, or the autoboot
/// text (which never appears in a command's output).
pub(crate) fn command_alarm(line: &str) -> Option<ConsoleError> {
    if let Some(f) = fatal_line(line) {
        return Some(ConsoleError::UBootError {
            line: format!("{f} ({line})"),
            tail: Tail(vec![line.to_string()]),
        });
    }
    let t = line.trim_start();
    if t.starts_with("U-Boot SPL 20")
        || t.starts_with("resetting ...")
        || t.contains("Hit any key to stop autoboot")
    {
        return Some(ConsoleError::UnexpectedReset {
            line: line.to_string(),
            tail: Tail(vec![line.to_string()]),
        });
    }
    None
}

/// A command at the U-Boot prompt, with the U-Boot alarms.
pub fn command(cfg: &UBootConfig, cmd: &str, n: u32) -> Command {
    Command::new(cmd, n, Some(&cfg.prompt), cfg.command_timeout).with_alarm(command_alarm)
}

fn is_autoboot_text(s: &str, extra: &[String]) -> bool {
    let l = s.to_ascii_lowercase();
    l.contains("stop autoboot")
        || l.contains("abort autoboot")
        || l.contains("autoboot in")
        || extra
            .iter()
            .any(|e| !e.is_empty() && s.contains(e.as_str()))
}

/// Stops autoboot and ends at a clean, confirmed prompt.
pub struct Interrupt {
    cfg: UBootConfig,
    sync_n: u32,
    resets: ResetWatch,
    deadline: Option<Deadline>,
    state: IState,
    spamming: bool,
    next_key: Option<Instant>,
    last_nudge: Option<Instant>,
    saw_autoboot: bool,
    keys_sent: u32,
    nudges: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IState {
    Start,
    /// Watching the boot, sending keys once spamming.
    Catch,
    /// Prompt seen: wait for the echo of extra keys to settle, then Ctrl-C.
    Settle,
    /// Ctrl-C sent; wait for a quiet prompt.
    Clean,
    /// Marker sent; wait for it.
    Sync,
    /// Marker seen; wait for the prompt after it.
    SyncPrompt,
}

impl Interrupt {
    /// `resets` carries the banner history of the session (so a reset is noticed even
    /// across machines); `sync_n` numbers the confirmation marker.
    pub fn new(cfg: &UBootConfig, resets: ResetWatch, sync_n: u32) -> Interrupt {
        Interrupt {
            cfg: cfg.clone(),
            sync_n,
            resets,
            deadline: None,
            state: IState::Start,
            spamming: false,
            next_key: None,
            last_nudge: None,
            saw_autoboot: false,
            keys_sent: 0,
            nudges: 0,
        }
    }

    fn at_prompt(&self, s: &str) -> bool {
        let p = self.cfg.prompt.trim_end();
        !p.is_empty() && s.trim_start().starts_with(p)
    }

    fn missed(&self, what: &str, ex: &Expect) -> ConsoleError {
        ConsoleError::MissedAutoboot {
            what: what.to_string(),
            key: self.cfg.interrupt.to_string(),
            tail: Tail(ex.tail(15)),
        }
    }
}

impl Machine for Interrupt {
    type Output = ResetWatch;

    fn step(&mut self, ex: &mut Expect, now: Instant) -> Step<ResetWatch> {
        if self.state == IState::Start {
            self.deadline = Some(Deadline::new(
                now,
                self.cfg.timeout,
                "U-Boot autoboot interrupt",
                &format!("the U-Boot prompt {:?}", self.cfg.prompt),
            ));
            self.last_nudge = Some(now);
            self.state = IState::Catch;
        }
        // Whole lines first: banners, errors, signs that the boot went on without us.
        while let Some(ev) = ex.next_event() {
            let line = match ev {
                Event::Line(l) => l,
                Event::Kernel(k) => {
                    if k.contains("Linux version") {
                        return Step::Fail(self.missed("U-Boot went on to start the kernel", ex));
                    }
                    continue;
                }
            };
            match self.resets.check(&line) {
                Err(l) => {
                    return Step::Fail(ConsoleError::UnexpectedReset {
                        line: l,
                        tail: Tail(ex.tail(15)),
                    })
                }
                Ok(Some(Banner::Proper)) => {
                    if self.state == IState::Catch {
                        self.spamming = true;
                    }
                    return Step::Stage(Stage::UBootBanner(line.trim().to_string()));
                }
                Ok(Some(Banner::Spl)) => {
                    return Step::Stage(Stage::UBootBanner(line.trim().to_string()))
                }
                Ok(None) => {}
            }
            if let Some(f) = fatal_line(&line) {
                return Step::Fail(ConsoleError::UBootError {
                    line: f.to_string(),
                    tail: Tail(ex.tail(15)),
                });
            }
            if line.contains("Starting kernel") || line.contains("Linux version") {
                return Step::Fail(self.missed("U-Boot went on to start the kernel", ex));
            }
            if line.contains("Retrieving file:") && self.state == IState::Catch {
                return Step::Fail(self.missed("distro boot is already loading extlinux.conf", ex));
            }
            if self.state == IState::Catch {
                if !self.saw_autoboot && is_autoboot_text(&line, &self.cfg.autoboot) {
                    self.saw_autoboot = true;
                    self.spamming = true;
                }
                if self.at_prompt(&line) {
                    self.state = IState::Settle;
                }
            } else if self.state == IState::Sync && line.trim() == super::begin_marker(self.sync_n)
            {
                self.state = IState::SyncPrompt;
            }
        }
        let partial = ex.partial();
        if partial.contains("Enter choice:") {
            // The extlinux menu: never touch it.
            return Step::Fail(self.missed("the extlinux menu is showing", ex));
        }
        match self.state {
            IState::Catch => {
                if !self.saw_autoboot && is_autoboot_text(&partial, &self.cfg.autoboot) {
                    self.saw_autoboot = true;
                    self.spamming = true;
                    return Step::Stage(Stage::Autoboot);
                }
                if self.at_prompt(&partial) {
                    self.state = IState::Settle;
                    return Step::Stage(Stage::UBootPrompt);
                }
            }
            IState::Settle => {
                if ex.quiet_for(Duration::from_millis(150), now) {
                    ex.discard_pending();
                    ex.clear_partial();
                    self.state = IState::Clean;
                    return Step::Send(vec![0x03]);
                }
            }
            IState::Clean => {
                if ex.prompt_quiet(&self.cfg.prompt, Duration::from_millis(150), now) {
                    ex.discard_pending();
                    self.state = IState::Sync;
                    return Step::Send(format!("echo SY\"\"NC-{}\r", self.sync_n).into_bytes());
                }
            }
            IState::SyncPrompt => {
                if ex.prompt_quiet(&self.cfg.prompt, Duration::from_millis(100), now) {
                    return Step::Done(self.resets.clone());
                }
            }
            IState::Sync | IState::Start => {}
        }
        let Some(dl) = self.deadline.clone() else {
            return Step::Wait(now);
        };
        if dl.passed(now) {
            if ex.total_bytes() == 0 {
                return Step::Fail(ConsoleError::Silent {
                    stage: dl.stage.clone(),
                    waited: now.saturating_duration_since(dl.started),
                    baud: 0,
                });
            }
            return Step::Fail(dl.error(ex));
        }
        if self.state == IState::Catch {
            // Idle console: maybe the board already sits at the prompt. Ctrl-C, not Enter.
            let idle_since = ex
                .last_rx()
                .unwrap_or(dl.started)
                .max(self.last_nudge.unwrap_or(dl.started));
            if !self.spamming && now.saturating_duration_since(idle_since) >= self.cfg.idle_nudge {
                self.last_nudge = Some(now);
                self.nudges += 1;
                return Step::Nudge {
                    bytes: vec![0x03],
                    note: format!(
                        "no U-Boot output for {}s: pressed Ctrl-C (never Enter) in case it sits at its prompt ({})",
                        self.cfg.idle_nudge.as_secs_f32(),
                        self.nudges
                    ),
                };
            }
            if self.spamming && self.next_key.is_none_or(|t| now >= t) {
                self.next_key = Some(now + self.cfg.key_interval);
                self.keys_sent += 1;
                return Step::Send(self.cfg.interrupt.bytes());
            }
            let mut wake = dl.at.min(idle_since + self.cfg.idle_nudge);
            if let Some(k) = self.next_key.filter(|_| self.spamming) {
                wake = wake.min(k);
            }
            return Step::Wait(wake.max(now));
        }
        Step::Wait(dl.min(now + Duration::from_millis(50)))
    }
}

/// Sends a command that does not come back to the prompt (`boot`, `run bootcmd`, `reset`).
pub(crate) struct Fire {
    cmd: String,
    sent: bool,
}

impl Fire {
    pub(crate) fn new(cmd: &str) -> Fire {
        Fire {
            cmd: cmd.to_string(),
            sent: false,
        }
    }
}

impl Machine for Fire {
    type Output = ();
    fn step(&mut self, ex: &mut Expect, _now: Instant) -> Step<()> {
        if self.sent {
            return Step::Done(());
        }
        self.sent = true;
        ex.discard_pending();
        Step::Send(format!("{}\r", self.cmd).into_bytes())
    }
}

/// Starts a USB gadget command (`ums 0 mmc 0`, `rockusb 0 mmc 0`, `fastboot usb 0`), which
/// keeps running until Ctrl-C. Done when it has run for `settle` without an error or the
/// prompt coming back; an error (unknown command, no USB controller) fails at once.
pub struct Gadget {
    cmd: String,
    prompt: String,
    settle: Duration,
    started: Option<Instant>,
    seen: Vec<String>,
}

impl Gadget {
    pub fn new(cmd: &str, prompt: &str, settle: Duration) -> Gadget {
        Gadget {
            cmd: cmd.to_string(),
            prompt: prompt.to_string(),
            settle,
            started: None,
            seen: Vec::new(),
        }
    }
}

impl Machine for Gadget {
    type Output = Vec<String>;
    fn step(&mut self, ex: &mut Expect, now: Instant) -> Step<Vec<String>> {
        let Some(t0) = self.started else {
            self.started = Some(now);
            ex.discard_pending();
            ex.clear_partial();
            return Step::Send(format!("{}\r", self.cmd).into_bytes());
        };
        while let Some(line) = ex.next_line() {
            let l = line.trim();
            if l.is_empty() || l.ends_with(self.cmd.as_str()) {
                continue;
            }
            if l.contains("Unknown command")
                || l.contains("Usage:")
                || l.to_ascii_lowercase().contains("error")
                || l.contains("failed")
                || l.contains("No USB device")
                || l.contains("not found")
            {
                return Step::Fail(ConsoleError::UBootError {
                    line: format!("`{}`: {l}", self.cmd),
                    tail: Tail(ex.tail(10)),
                });
            }
            self.seen.push(l.to_string());
        }
        if now.saturating_duration_since(t0) >= self.settle {
            if ex.ends_with_prompt(&self.prompt) && ex.partial().trim() == self.prompt.trim() {
                return Step::Fail(ConsoleError::UBootError {
                    line: format!("`{}` returned to the prompt at once", self.cmd),
                    tail: Tail(ex.tail(10)),
                });
            }
            return Step::Done(std::mem::take(&mut self.seen));
        }
        Step::Wait(t0 + self.settle)
    }
}
