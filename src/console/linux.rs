//! Following Linux on the console: from U-Boot handing over to the kernel, through NixOS
//! stage 1 and 2, to a login prompt or an auto-logged-in shell; logging in; finding the
//! board's IP address.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::command::Command;
use super::expect::{is_printk, Event, Expect};
use super::uboot::{fatal_line, Banner, ResetWatch};
use super::{begin_marker, ConsoleError, Deadline, Machine, Stage, Step, Tail};

/// Settings for the Linux side (descriptor and flags).
#[derive(Debug, Clone)]
pub struct LinuxConfig {
    /// Time from the boot command (or power-on) to the login prompt / shell.
    pub boot_timeout: Duration,
    pub login_user: String,
    pub login_password: Option<String>,
    pub login_timeout: Duration,
    pub command_timeout: Duration,
    /// A console line carrying the IP address, e.g. `SBCFLASH-TEST-IP: (\S+)` or NixOS
    /// units that print it; the first capture group is the address.
    pub ip_marker: Option<regex::Regex>,
    /// Console text quiet for this long while a prompt is expected: press Enter, as a
    /// person at the terminal would.
    pub nudge_after: Duration,
    /// At most this many newlines per wait.
    pub nudges: u32,
    /// Stop following when a console line (kernel lines included) matches: the boot reached
    /// what the caller waits for (`try --expect`), login prompt or not.
    pub until: Option<regex::Regex>,
}

impl Default for LinuxConfig {
    fn default() -> Self {
        LinuxConfig {
            boot_timeout: Duration::from_secs(300),
            login_user: "root".into(),
            login_password: None,
            login_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(30),
            ip_marker: None,
            nudge_after: Duration::from_secs(5),
            nudges: 3,
            until: None,
        }
    }
}

/// Where the boot ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// A `login:` prompt is showing.
    Login,
    /// The console went quiet at something that looks like a shell prompt (autologin).
    Shell,
    /// A line matched [`LinuxConfig::until`] (the line).
    Matched(String),
}

const EMERGENCY: &[&str] = &[
    "An error occurred in stage 1 of the boot process",
    "You are in emergency mode",
    "Entering emergency mode",
    "Give root password for maintenance",
    "Press Enter for maintenance",
    "Cannot open access to console, the root account is locked",
];

/// Follows the boot; fails on panics, emergency shells, resets and U-Boot errors.
pub struct Follow {
    cfg: LinuxConfig,
    resets: ResetWatch,
    deadline: Option<Deadline>,
    kernel: bool,
    stage1: bool,
    stage2: bool,
    init: bool,
    starting: bool,
    /// Newlines sent so far, those since the console last printed a line of text, and when
    /// the last one went out.
    nudged: u32,
    spell_nudges: u32,
    last_nudge: Option<Instant>,
    /// A kernel line was seen: Linux runs, so Enter cannot reach U-Boot.
    linux_seen: bool,
    /// Console text after the kernel banner: userspace runs and may read the console.
    userspace: bool,
    /// IP address seen in a console marker line.
    pub(crate) ip_from_console: Option<Ipv4Addr>,
}

impl Follow {
    pub fn new(cfg: &LinuxConfig, resets: ResetWatch) -> Follow {
        Follow {
            cfg: cfg.clone(),
            resets,
            deadline: None,
            kernel: false,
            stage1: false,
            stage2: false,
            init: false,
            starting: false,
            nudged: 0,
            spell_nudges: 0,
            last_nudge: None,
            linux_seen: false,
            userspace: false,
            ip_from_console: None,
        }
    }
}

/// The program in the kernel's `Run /init as init process` line.
fn init_program(line: &str) -> Option<String> {
    let rest = line.split("] Run ").nth(1)?;
    let prog = rest.strip_suffix(" as init process")?.trim();
    (!prog.is_empty()).then(|| prog.to_string())
}

fn looks_like_shell_prompt(p: &str) -> bool {
    let t = p.trim_end();
    (t.ends_with('$') || t.ends_with('#')) && p.ends_with(' ') && t.len() < 120
}

impl Machine for Follow {
    type Output = (Arrival, Option<Ipv4Addr>);

    // Longer than 150 lines on purpose: the follower's whole state machine (boot, login,
    // shell, IP address) in one match, as in the other console cores.
    fn step(&mut self, ex: &mut Expect, now: Instant) -> Step<Self::Output> {
        let dl = self
            .deadline
            .get_or_insert_with(|| {
                Deadline::new(
                    now,
                    self.cfg.boot_timeout,
                    "boot",
                    "the kernel, NixOS and a login prompt",
                )
            })
            .clone();
        while let Some(ev) = ex.next_event() {
            let tail = || Tail(ex.tail(20));
            let (line, kernel_line) = match ev {
                Event::Line(l) => (l, false),
                Event::Kernel(l) => (l, true),
            };
            if let Some(re) = &self.cfg.until {
                if re.is_match(&line) {
                    return Step::Done((
                        Arrival::Matched(line.trim().to_string()),
                        self.ip_from_console,
                    ));
                }
            }
            if line.contains("Kernel panic") {
                return Step::Fail(ConsoleError::KernelPanic {
                    line: line.trim().to_string(),
                    tail: tail(),
                });
            }
            if let Some(e) = EMERGENCY.iter().find(|e| line.contains(*e)) {
                return Step::Fail(ConsoleError::Emergency {
                    line: e.to_string(),
                    tail: tail(),
                });
            }
            match self.resets.check(&line) {
                Err(l) => {
                    return Step::Fail(ConsoleError::UnexpectedReset {
                        line: l,
                        tail: tail(),
                    })
                }
                Ok(Some(b)) if self.kernel || self.starting => {
                    let _ = b;
                    return Step::Fail(ConsoleError::UnexpectedReset {
                        line: line.clone(),
                        tail: tail(),
                    });
                }
                Ok(Some(Banner::Proper)) => {
                    return Step::Stage(Stage::UBootBanner(line.trim().to_string()))
                }
                _ => {}
            }
            if !self.kernel {
                if let Some(f) = fatal_line(&line) {
                    return Step::Fail(ConsoleError::UBootError {
                        line: f.to_string(),
                        tail: tail(),
                    });
                }
            }
            if !self.starting && line.contains("Starting kernel") {
                self.starting = true;
                return Step::Stage(Stage::StartingKernel);
            }
            if !self.kernel {
                if let Some(i) = line.find("Linux version ") {
                    self.kernel = true;
                    let v: String = line[i..]
                        .split_whitespace()
                        .take(3)
                        .collect::<Vec<_>>()
                        .join(" ");
                    return Step::Stage(Stage::KernelBanner(v));
                }
            }
            if kernel_line {
                self.linux_seen = true;
                if !self.init {
                    if let Some(prog) = init_program(&line) {
                        self.init = true;
                        return Step::Stage(Stage::Init(prog));
                    }
                }
                continue;
            }
            if !line.trim().is_empty() {
                // the board moved on: a new quiet spell gets its own nudges
                self.spell_nudges = 0;
                self.userspace |= self.kernel;
            }
            if !self.stage1 && line.contains("<<< NixOS Stage 1 >>>") {
                self.stage1 = true;
                return Step::Stage(Stage::NixosStage1);
            }
            if !self.stage2 && line.contains("<<< NixOS Stage 2 >>>") {
                self.stage2 = true;
                return Step::Stage(Stage::NixosStage2);
            }
            if let Some(re) = &self.cfg.ip_marker {
                if let Some(ip) = re
                    .captures(&line)
                    .and_then(|c| c.get(1))
                    .and_then(|m| m.as_str().parse::<Ipv4Addr>().ok())
                {
                    if self.ip_from_console != Some(ip) {
                        self.ip_from_console = Some(ip);
                        return Step::Stage(Stage::Note(format!(
                            "console reports IP address {ip}"
                        )));
                    }
                }
            }
        }
        let partial = ex.partial();
        let quiet = ex.quiet_for(Duration::from_millis(300), now);
        let at_login = partial.trim_end().ends_with("login:");
        // A prompt that answered a nudge is Linux's even when the boot was not seen (the
        // board had booted before the port was opened).
        let linux = self.kernel || self.linux_seen || self.nudged > 0;
        if linux && at_login && quiet {
            return Step::Done((Arrival::Login, self.ip_from_console));
        }
        if linux
            && !is_printk(&partial)
            && looks_like_shell_prompt(&partial)
            && ex.quiet_for(Duration::from_secs(2), now)
        {
            return Step::Done((Arrival::Shell, self.ip_from_console));
        }
        // Press Enter when the console text has been quiet and someone may read it:
        // userspace printed after the kernel banner, or Linux was already running when the
        // port was opened (kernel lines without a banner), or nothing ever came (a board
        // sitting at its prompt). Never while U-Boot may be counting down or showing its
        // menu or prompt, nor while the kernel boots; at most `nudges` per quiet spell.
        let reader = self.userspace || (self.linux_seen && !self.kernel) || ex.total_bytes() == 0;
        let may_nudge = (reader || self.nudged > 0)
            && !partial.contains("Enter choice:")
            && !partial.trim_end().ends_with("=>");
        if may_nudge && self.spell_nudges < self.cfg.nudges {
            let since = ex
                .last_text()
                .unwrap_or(dl.started)
                .max(self.last_nudge.unwrap_or(dl.started));
            if now.saturating_duration_since(since) >= self.cfg.nudge_after {
                self.nudged += 1;
                self.spell_nudges += 1;
                self.last_nudge = Some(now);
                return nudge(
                    "a login prompt or shell",
                    self.cfg.nudge_after,
                    self.spell_nudges,
                    self.cfg.nudges,
                );
            }
        }
        if dl.passed(now) {
            let stage = if self.stage2 {
                "NixOS stage 2"
            } else if self.stage1 {
                "NixOS stage 1"
            } else if self.kernel {
                "kernel boot"
            } else if self.starting {
                "kernel start"
            } else {
                "U-Boot boot"
            };
            if ex.total_bytes() == 0 {
                return Step::Fail(ConsoleError::Silent {
                    stage: stage.into(),
                    waited: dl.at.saturating_duration_since(dl.started),
                    baud: 0,
                });
            }
            let mut d = dl.clone();
            d.stage = stage.into();
            if self.nudged > 0 {
                d.expected = format!("{} (pressed Enter {} times)", d.expected, self.nudged);
            }
            return Step::Fail(d.error(ex));
        }
        Step::Wait(dl.min(now + Duration::from_millis(100)))
    }
}

/// A newline for a prompt that did not come, with the words for the stage log. The machine
/// returns it as one `Send`; the note goes with it so that the log says why.
fn nudge<T>(what: &str, after: Duration, n: u32, max: u32) -> Step<T> {
    Step::Nudge {
        bytes: b"\r".to_vec(),
        note: format!(
            "waited {}s of quiet console for {what}: pressed Enter ({n}/{max})",
            after.as_secs_f32()
        ),
    }
}

/// Logs in at a `login:` prompt (or just confirms an autologin shell) and ends with a
/// shell that answered a framed marker. A prompt that does not come within a quiet spell
/// gets a newline (bounded by `nudges`); after one, the machine looks at what the console
/// shows again (login, password or shell prompt) instead of assuming.
pub struct Login {
    cfg: LinuxConfig,
    arrival: Arrival,
    sync_n: u32,
    state: LState,
    deadline: Option<Deadline>,
    /// When the last thing was typed (user, password, marker, newline).
    typed_at: Option<Instant>,
    user_sent: bool,
    nudged: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LState {
    Start,
    /// After a nudge: read the prompt the console shows now.
    Look,
    UserSent,
    PasswordSent,
    SyncSent,
}

impl Login {
    pub fn new(cfg: &LinuxConfig, arrival: Arrival, sync_n: u32) -> Login {
        Login {
            cfg: cfg.clone(),
            arrival,
            sync_n,
            state: LState::Start,
            deadline: None,
            typed_at: None,
            user_sent: false,
            nudged: 0,
        }
    }

    fn sync(&mut self, ex: &mut Expect, now: Instant) -> Step<()> {
        ex.discard_pending();
        self.state = LState::SyncSent;
        self.typed_at = Some(now);
        Step::Send(format!("echo SY\"\"NC-{}\r", self.sync_n).into_bytes())
    }

    fn user(&mut self, ex: &mut Expect, now: Instant) -> Step<()> {
        ex.clear_partial();
        self.state = LState::UserSent;
        self.user_sent = true;
        self.typed_at = Some(now);
        Step::Send(format!("{}\r", self.cfg.login_user).into_bytes())
    }

    fn since_typed(&self, now: Instant) -> Duration {
        self.typed_at
            .map(|t| now.saturating_duration_since(t))
            .unwrap_or_default()
    }
}

impl Machine for Login {
    type Output = ();

    fn step(&mut self, ex: &mut Expect, now: Instant) -> Step<()> {
        if self.state == LState::Start {
            self.deadline = Some(Deadline::new(
                now,
                self.cfg.login_timeout,
                "console login",
                "a shell answering after the login",
            ));
            ex.discard_pending();
            if self.arrival == Arrival::Shell {
                return self.sync(ex, now);
            }
            return self.user(ex, now);
        }
        while let Some(line) = ex.next_line() {
            if line.contains("Login incorrect") {
                return Step::Fail(ConsoleError::Login {
                    reason: format!("\"Login incorrect\" for user {:?}", self.cfg.login_user),
                    tail: Tail(ex.tail(10)),
                });
            }
            if self.state == LState::SyncSent && line.trim() == begin_marker(self.sync_n) {
                return Step::Done(());
            }
        }
        let partial = ex.partial();
        let settled = ex.quiet_for(Duration::from_millis(300), now);
        let password = partial.trim_end().ends_with("assword:");
        if password && matches!(self.state, LState::UserSent | LState::Look) && self.user_sent {
            let Some(pw) = self.cfg.login_password.clone() else {
                return Step::Fail(ConsoleError::Login {
                    reason: format!(
                        "user {:?} needs a password; pass --login-password (or use an image with console autologin)",
                        self.cfg.login_user
                    ),
                    tail: Tail(ex.tail(10)),
                });
            };
            ex.clear_partial();
            self.state = LState::PasswordSent;
            self.typed_at = Some(now);
            return Step::Send(format!("{pw}\r").into_bytes());
        }
        if self.state == LState::Look && settled {
            if partial.trim_end().ends_with("login:") {
                return self.user(ex, now);
            }
            if looks_like_shell_prompt(&partial) {
                return self.sync(ex, now);
            }
        }
        // The answer to what was typed came and settled: ask the shell. Nothing at all came
        // (not even the echo: getty flushed the name)? Then the marker would become a user
        // name; the nudge below shows the prompt again instead.
        let answered = ex
            .last_text()
            .zip(self.typed_at)
            .is_some_and(|(r, t)| r > t);
        if matches!(self.state, LState::UserSent | LState::PasswordSent)
            && answered
            && ex.quiet_for(Duration::from_millis(700), now)
            && self.since_typed(now) >= Duration::from_millis(700)
        {
            return self.sync(ex, now);
        }
        // Nothing we can act on for a quiet spell: press Enter and look again.
        if self.nudged < self.cfg.nudges
            && ex.quiet_for(self.cfg.nudge_after, now)
            && self.since_typed(now) >= self.cfg.nudge_after
        {
            self.nudged += 1;
            ex.clear_partial();
            ex.discard_pending();
            self.state = LState::Look;
            self.typed_at = Some(now);
            return nudge(
                "answer to the login",
                self.cfg.nudge_after,
                self.nudged,
                self.cfg.nudges,
            );
        }
        let Some(dl) = self.deadline.clone() else {
            return Step::Wait(now);
        };
        if dl.passed(now) {
            let mut d = dl;
            if self.nudged > 0 {
                d.expected = format!("{} (pressed Enter {} times)", d.expected, self.nudged);
            }
            return Step::Fail(d.error(ex));
        }
        Step::Wait(dl.min(now + Duration::from_millis(100)))
    }
}

/// A framed command in a Linux shell (printk lines are left out of the output).
pub fn command(cfg: &LinuxConfig, cmd: &str, n: u32) -> Command {
    Command::new(cmd, n, None, cfg.command_timeout)
}

/// The first global IPv4 address in `ip -4 -j addr` JSON output.
pub fn ip_from_json(text: &str) -> Option<Ipv4Addr> {
    let v: serde_json::Value = serde_json::from_str(text.trim()).ok()?;
    for ifc in v.as_array()? {
        if ifc.get("ifname").and_then(|n| n.as_str()) == Some("lo") {
            continue;
        }
        for a in ifc.get("addr_info")?.as_array()? {
            if a.get("family").and_then(|f| f.as_str()).unwrap_or("inet") != "inet" {
                continue;
            }
            if a.get("scope").and_then(|s| s.as_str()) == Some("host") {
                continue;
            }
            if let Some(ip) = a
                .get("local")
                .and_then(|l| l.as_str())
                .and_then(|l| l.parse().ok())
            {
                let ip: Ipv4Addr = ip;
                if !ip.is_loopback() {
                    return Some(ip);
                }
            }
        }
    }
    None
}

/// Reads a query's answer: `Err` for an unclean one (asked again), `Ok(None)` for no address.
pub(crate) type IpParser = fn(&str) -> Result<Option<Ipv4Addr>, String>;

/// [`ip_from_json`] for a query: output that is not the JSON `ip -j` prints is an unclean
/// answer (`Err`), no global address is `Ok(None)`.
pub fn parse_ip_json(text: &str) -> Result<Option<Ipv4Addr>, String> {
    serde_json::from_str::<serde_json::Value>(text.trim())
        .map_err(|e| format!("not JSON: {e}"))?
        .as_array()
        .ok_or("not a JSON list of interfaces")?;
    Ok(ip_from_json(text))
}

/// [`ip_from_text`] for a query: every `inet` line must carry an address, else the answer
/// is unclean (`Err`).
pub fn parse_ip_text(text: &str) -> Result<Option<Ipv4Addr>, String> {
    for l in text.lines() {
        if let Some(rest) = l.trim_start().strip_prefix("inet ") {
            let addr = rest.split(['/', ' ']).next().unwrap_or("");
            if addr.parse::<Ipv4Addr>().is_err() || !rest.contains('/') {
                return Err(format!("unreadable line {:?}", l.trim()));
            }
        }
    }
    Ok(ip_from_text(text))
}

/// The first non-loopback address in plain `ip -4 addr` output (busybox `ip` has no `-j`).
pub fn ip_from_text(text: &str) -> Option<Ipv4Addr> {
    text.lines().find_map(|l| {
        let rest = l.trim_start().strip_prefix("inet ")?;
        let addr = rest.split(['/', ' ']).next()?;
        let ip: Ipv4Addr = addr.parse().ok()?;
        (!ip.is_loopback()).then_some(ip)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_json() {
        let j = r#"[{"ifindex":1,"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},{"ifindex":2,"ifname":"end0","addr_info":[{"family":"inet","local":"192.168.1.23","prefixlen":24,"scope":"global","dynamic":true}]}]"#;
        assert_eq!(ip_from_json(j), Some(Ipv4Addr::new(192, 168, 1, 23)));
        assert_eq!(ip_from_json("ip: unknown option -j"), None);
    }

    #[test]
    fn ip_text() {
        let t = "1: lo: <LOOPBACK,UP> mtu 65536\n    inet 127.0.0.1/8 scope host lo\n2: eth0: <UP>\n    inet 10.0.2.15/24 brd 10.0.2.255 scope global eth0\n";
        assert_eq!(ip_from_text(t), Some(Ipv4Addr::new(10, 0, 2, 15)));
    }

    #[test]
    fn init_line() {
        assert_eq!(
            init_program("[    4.420000] Run /init as init process").as_deref(),
            Some("/init")
        );
        assert_eq!(init_program("[    4.42] Run it"), None);
    }

    #[test]
    fn shell_prompts() {
        assert!(looks_like_shell_prompt("[nixos@nixos:~]$ "));
        assert!(looks_like_shell_prompt("~ # "));
        assert!(!looks_like_shell_prompt("sbcflash-test login: "));
    }
}
