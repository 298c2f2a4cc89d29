//! Process exit codes: one per class of failure, so scripts and stations can react without
//! parsing messages. Documented in the README and in `--help`. A leaf: it imports no other
//! module of the crate.

use std::fmt;

/// Exit status classes. The numbers are part of the CLI contract: never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Exit {
    /// Everything worked.
    Ok = 0,
    /// Unclassified failure (a bug, or an error with no better class).
    Failure = 1,
    /// Command-line usage error (clap uses 2 as well).
    Usage = 2,
    /// The input (image, bmap, descriptor, config, loader file) is malformed or inconsistent:
    /// also a source that is not a disk image, and an image that does not fit the board
    /// (`--strict`).
    BadInput = 3,
    /// The target was refused by a safety rule (mounted, system disk, too small, not removable).
    Refused = 4,
    /// An I/O error on the target, the source, a device or the network.
    Io = 5,
    /// Read-back or digest verification failed: the target must not be trusted.
    Verify = 6,
    /// Interrupted by a signal (Ctrl-C): the target is incomplete.
    Interrupted = 130,
    /// A timeout waiting for a board, a device or a peer.
    Timeout = 7,
    /// A required external tool or permission is missing (nix, udev rules, root).
    Environment = 8,
}

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Table used by `--help` and the README.
    pub const TABLE: &'static [(Exit, &'static str)] = &[
        (Exit::Ok, "success"),
        (Exit::Failure, "unexpected failure"),
        (Exit::Usage, "bad command-line usage"),
        (
            Exit::BadInput,
            "malformed or inconsistent input (image, bmap, descriptor, config); not a disk image (--raw); an image that does not fit the board (--strict)",
        ),
        (
            Exit::Refused,
            "target refused by a safety rule (use --force/--yes only if you mean it); an image no trusted key signed, under --require-signature",
        ),
        (Exit::Io, "I/O error on target, source, device or network"),
        (
            Exit::Verify,
            "verification failed: the target does not hold the image; a signature or signed digest does not match the image, manifest or bmap",
        ),
        (
            Exit::Timeout,
            "timed out waiting for a board, device or peer",
        ),
        (
            Exit::Environment,
            "missing tool, permission or system setup",
        ),
        (
            Exit::Interrupted,
            "interrupted (Ctrl-C): the target is incomplete",
        ),
    ];

    /// Text block appended to `--help`.
    pub(crate) fn help_text() -> String {
        let mut s = String::from("Exit codes:\n");
        for (e, what) in Self::TABLE {
            s.push_str(&format!("  {:>3}  {what}\n", e.code()));
        }
        s
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code())
    }
}

/// Implemented by each library error type where it is defined, so the CLI can pick an exit
/// code without string matching. The CLI's `cli::classify` lists the types it looks for; this
/// module imports no other, so every module can depend on it without a cycle.
pub trait Classify {
    fn exit(&self) -> Exit;
}

/// An error that carries its exit class explicitly; for the CLI edges.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub(crate) struct ExitError {
    pub(crate) exit: Exit,
    pub(crate) msg: String,
}

impl ExitError {
    pub(crate) fn new(exit: Exit, msg: impl Into<String>) -> Self {
        Self {
            exit,
            msg: msg.into(),
        }
    }
}

impl Classify for ExitError {
    fn exit(&self) -> Exit {
        self.exit
    }
}
