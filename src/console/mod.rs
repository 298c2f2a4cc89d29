//! Serial console automation: follow a board from power-on through U-Boot and Linux, then
//! hand it to `nixos-rebuild`.
//!
//! Layers, bottom up:
//! - [`serial`]: opening the port (exclusive, 8N1, no flow control), reopening a USB-serial
//!   adapter that vanished, picking the only USB adapter present (udev).
//! - [`expect`]: the sans-IO expect engine (bytes in, lines/prompts out).
//! - [`Machine`]s, also sans-IO: [`uboot`] (interrupt autoboot, framed commands),
//!   [`linux`] (follow the boot, log in, shell commands), [`ymodem`] (file transfer).
//!   Each one looks at the engine and the time and answers with a [`Step`]: send these
//!   bytes, wait until then, report a stage, done, failed.
//! - [`session`]: the one thin executor that runs machines against a real port, keeps the
//!   timestamped transcript and checks for garbage (wrong baud rate).
//! - [`handoff`]: SSH reachability, host key, the `nixos-rebuild` command.

pub mod bootstrap;
pub(crate) mod command;
pub mod expect;
pub mod gadget;
pub(crate) mod handoff;
pub mod hostkeys;
pub mod linux;
pub mod load;
pub mod serial;
pub mod session;
pub mod uboot;
pub mod ymodem;

use std::fmt;
use std::time::{Duration, Instant};

use crate::exit::{Classify, Exit};

/// What a machine wants next. Machines never do I/O themselves.
#[derive(Debug)]
pub enum Step<T> {
    /// Write these bytes to the board.
    Send(Vec<u8>),
    /// A prompt did not come: write these bytes (a newline, Ctrl-C) and say so in the
    /// stage log (`note`), so that every nudge is visible.
    Nudge { bytes: Vec<u8>, note: String },
    /// A stage was reached (printed with its time by the executor); ask again right away.
    Stage(Stage),
    /// Nothing to do until more bytes arrive or this instant passes.
    Wait(Instant),
    /// Finished.
    Done(T),
    /// Failed; the executor returns this error.
    Fail(ConsoleError),
}

/// A sans-IO console state machine.
pub trait Machine {
    type Output;
    /// Look at what arrived so far (`ex`) at time `now` and say what to do next.
    fn step(&mut self, ex: &mut expect::Expect, now: Instant) -> Step<Self::Output>;
}

/// Milestones printed with their time since the board's first output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    FirstOutput,
    UBootBanner(String),
    Autoboot,
    UBootPrompt,
    StartingKernel,
    KernelBanner(String),
    /// The kernel runs the first userspace program (`Run /init as init process`): the
    /// initrd (or the root file system) was found.
    Init(String),
    NixosStage1,
    NixosStage2,
    LoginPrompt,
    LoggedIn,
    Note(String),
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage::FirstOutput => write!(f, "first console output"),
            Stage::UBootBanner(s) => write!(f, "U-Boot: {s}"),
            Stage::Autoboot => write!(f, "U-Boot autoboot countdown"),
            Stage::UBootPrompt => write!(f, "U-Boot prompt (autoboot stopped)"),
            Stage::StartingKernel => write!(f, "U-Boot is starting the kernel"),
            Stage::KernelBanner(s) => write!(f, "kernel: {s}"),
            Stage::Init(s) => write!(f, "kernel runs {s}"),
            Stage::NixosStage1 => write!(f, "NixOS stage 1"),
            Stage::NixosStage2 => write!(f, "NixOS stage 2"),
            Stage::LoginPrompt => write!(f, "login prompt"),
            Stage::LoggedIn => write!(f, "shell on the console"),
            Stage::Note(s) => write!(f, "{s}"),
        }
    }
}

/// The last console lines, shown with every error so that the user sees what the board did.
#[derive(Debug, Clone, Default)]
pub struct Tail(pub Vec<String>);

impl fmt::Display for Tail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return write!(f, "\n  (no console output)");
        }
        write!(f, "\nlast console lines:")?;
        for l in &self.0 {
            write!(f, "\n  | {l}")?;
        }
        Ok(())
    }
}

/// Errors of the console layer; each maps to an exit class.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("timed out after {}s in stage \"{stage}\" waiting for {expected}{tail}", waited.as_secs_f32().round())]
    Timeout {
        stage: String,
        expected: String,
        waited: Duration,
        tail: Tail,
    },
    #[error("the board printed nothing on the console in {}s (stage \"{stage}\"): check that it is powered, that the serial cable is on the right pins (TX/RX swapped? GND connected?), the port and the baud rate ({baud})", waited.as_secs_f32().round())]
    Silent {
        stage: String,
        waited: Duration,
        baud: u32,
    },
    #[error("the console shows garbage ({pct}% non-text bytes): wrong baud rate? the descriptor says {baud}{tail}")]
    Garbage { pct: u32, baud: u32, tail: Tail },
    #[error("the board reset unexpectedly (a second boot banner: {line:?}){tail}")]
    UnexpectedReset { line: String, tail: Tail },
    #[error("U-Boot reported an error: {line:?}{tail}")]
    UBootError { line: String, tail: Tail },
    #[error("kernel panic: {line:?}{tail}")]
    KernelPanic { line: String, tail: Tail },
    #[error("the system dropped to an emergency shell: {line:?}{tail}")]
    Emergency { line: String, tail: Tail },
    #[error(
        "U-Boot's autoboot could not be interrupted ({what}); the interrupt key was {key}{tail}"
    )]
    MissedAutoboot {
        what: String,
        key: String,
        tail: Tail,
    },
    #[error("command `{cmd}` failed with status {status}{}", output_block(output))]
    CommandFailed {
        cmd: String,
        status: i32,
        output: Vec<String>,
    },
    #[error("command `{cmd}`: its answer could not be read cleanly ({line:?}){tail}")]
    Garbled {
        cmd: String,
        line: String,
        tail: Tail,
    },
    #[error("console login failed: {reason}{tail}")]
    Login { reason: String, tail: Tail },
    #[error("serial port {port}: {source}")]
    Open {
        port: String,
        #[source]
        source: std::io::Error,
    },
    #[error("serial port {port} went away and did not come back within {}s", waited.as_secs())]
    PortVanished { port: String, waited: Duration },
    #[error("no USB serial adapter found (udev: subsystem tty, ID_BUS=usb); pass --port")]
    NoPort,
    #[error("several USB serial adapters found and no terminal to ask on; pass --port with one of:{}", .0.iter().map(|p| format!("\n  {p}")).collect::<String>())]
    SeveralPorts(Vec<String>),
    #[error("file transfer failed: {0}")]
    Transfer(String),
    #[error(
        "CRC-32 mismatch after transfer: U-Boot computed {board:08x}, the file has {file:08x}"
    )]
    CrcMismatch { board: u32, file: u32 },
    #[error("{0}")]
    Handoff(String),
    #[error("SSH host key mismatch on {addr}: refusing the handoff (someone else answers on the network, or the board's keys changed)\n  the network offers:{}\n  the board's console shows:{}", fingerprint_block(network), fingerprint_block(console))]
    HostKeyMismatch {
        addr: String,
        network: Vec<String>,
        console: Vec<String>,
    },
    #[error("the board's console showed no SSH host key of {missing} (offered on {addr}) within {}s, so the key cannot be proven; is sshd running and are its keys in /etc/ssh or /etc/dropbear?", waited.as_secs())]
    HostKeyUnproven {
        addr: String,
        missing: String,
        waited: Duration,
    },
    #[error("flashing through U-Boot's {via} gadget: {msg}")]
    Flash {
        via: String,
        msg: String,
        exit: Exit,
    },
    #[error("console I/O: {0}")]
    Io(#[from] std::io::Error),
}

fn fingerprint_block(fps: &[String]) -> String {
    if fps.is_empty() {
        return " no key".into();
    }
    fps.iter().map(|f| format!("\n    {f}")).collect()
}

fn output_block(lines: &[String]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut s = String::from("\noutput:");
    for l in lines {
        s.push_str("\n  | ");
        s.push_str(l);
    }
    s
}

impl Classify for ConsoleError {
    fn exit(&self) -> Exit {
        match self {
            ConsoleError::Timeout { .. } | ConsoleError::Silent { .. } => Exit::Timeout,
            ConsoleError::Open { .. } | ConsoleError::PortVanished { .. } | ConsoleError::Io(_) => {
                Exit::Io
            }
            ConsoleError::NoPort => Exit::Environment,
            // The user has to say which one: a missing input, like a missing argument.
            ConsoleError::SeveralPorts(_) => Exit::BadInput,
            ConsoleError::CrcMismatch { .. } => Exit::Verify,
            ConsoleError::Transfer(_) => Exit::Io,
            ConsoleError::Flash { exit, .. } => *exit,
            ConsoleError::HostKeyMismatch { .. } => Exit::Refused,
            ConsoleError::HostKeyUnproven { .. } => Exit::Timeout,
            _ => Exit::Failure,
        }
    }
}

/// Text of a command's run: output lines (framing removed) and exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    pub(crate) cmd: String,
    pub lines: Vec<String>,
    pub status: i32,
}

impl CommandOutput {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
    /// Turn a non-zero status into [`ConsoleError::CommandFailed`].
    pub fn ok(self) -> Result<CommandOutput, ConsoleError> {
        if self.status == 0 {
            Ok(self)
        } else {
            Err(ConsoleError::CommandFailed {
                cmd: self.cmd,
                status: self.status,
                output: self.lines,
            })
        }
    }
}

/// Builds the framed form of `cmd`: the begin and end markers are split with empty quotes
/// so that the echo of what we type never contains them; only the shell's output does.
/// Works in U-Boot's hush (which has no `$((..))`) and in POSIX shells alike.
pub(crate) fn framed(cmd: &str, n: u32) -> String {
    format!("echo SY\"\"NC-{n}; {cmd}; echo RC\"\"-{n}-$?")
}

/// The marker line that starts framed output number `n`.
pub(crate) fn begin_marker(n: u32) -> String {
    format!("SYNC-{n}")
}

/// Parses the end marker line `RC-<n>-<status>`.
pub fn end_marker(line: &str, n: u32) -> Option<i32> {
    let rest = line.trim().strip_prefix(&format!("RC-{n}-"))?;
    rest.parse().ok()
}

/// A deadline with the words used when it passes.
#[derive(Debug, Clone)]
pub(crate) struct Deadline {
    pub(crate) at: Instant,
    pub(crate) started: Instant,
    pub(crate) stage: String,
    pub(crate) expected: String,
}

impl Deadline {
    pub(crate) fn new(now: Instant, after: Duration, stage: &str, expected: &str) -> Deadline {
        Deadline {
            at: now + after,
            started: now,
            stage: stage.to_string(),
            expected: expected.to_string(),
        }
    }
    pub(crate) fn passed(&self, now: Instant) -> bool {
        now >= self.at
    }
    pub(crate) fn error(&self, ex: &expect::Expect) -> ConsoleError {
        ConsoleError::Timeout {
            stage: self.stage.clone(),
            expected: self.expected.clone(),
            waited: self.at.saturating_duration_since(self.started),
            tail: Tail(ex.tail(15)),
        }
    }
    /// The earlier of this deadline and `other`, for `Step::Wait`.
    pub(crate) fn min(&self, other: Instant) -> Instant {
        self.at.min(other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_markers_do_not_appear_in_the_echo() {
        let f = framed("version", 7);
        assert!(!f.contains(&begin_marker(7)));
        assert!(!f.contains("RC-7-"));
        assert_eq!(end_marker("RC-7-0", 7), Some(0));
        assert_eq!(end_marker("RC-7-1\r", 7), Some(1));
        assert_eq!(end_marker("RC-8-1", 7), None);
    }
}
