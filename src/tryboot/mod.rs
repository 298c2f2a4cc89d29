//! `sbcflash try`: boot an image on QEMU's `virt` machine before it goes to a batch of cards.
//!
//! The image is booted as a board would boot it: the distribution's U-Boot (with OpenSBI on
//! riscv64) runs its stock distro boot, finds the image's extlinux.conf and starts the kernel.
//! The serial console is followed by the same console engine and machines as `bootstrap`
//! ([`crate::console`]); this module only names the stages, logs in, runs the check and
//! says where a failed boot stopped. [`inspect`] looks at the image first (architecture,
//! extlinux entry, board-specific loaders), [`qemu`] runs the machine on a copy-on-write
//! overlay, so the image is never written.

pub(crate) mod inspect;
pub(crate) mod qemu;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::console::linux::{self, Arrival, Follow, LinuxConfig, Login};
use crate::console::session::Session;
use crate::console::uboot::ResetWatch;
use crate::console::{CommandOutput, ConsoleError, Stage};
use crate::exit::{Classify, Exit};

/// The stages of a boot, in order; each is "reached" when its first sign shows on the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum TryStage {
    /// Anything at all on the console (OpenSBI, U-Boot SPL).
    Firmware,
    /// U-Boot proper's banner.
    UBoot,
    /// U-Boot starts the kernel; the kernel's banner.
    Kernel,
    /// The kernel runs the initrd's (or root file system's) init; NixOS stage 1.
    Initrd,
    /// NixOS stage 2 (systemd); not shown by systems without it.
    Stage2,
    /// A login prompt or shell (or the `--expect` line).
    Login,
    /// The command run after logging in.
    Check,
}

impl TryStage {
    pub(crate) fn name(self) -> &'static str {
        match self {
            TryStage::Firmware => "firmware",
            TryStage::UBoot => "U-Boot",
            TryStage::Kernel => "kernel",
            TryStage::Initrd => "initrd",
            TryStage::Stage2 => "stage 2",
            TryStage::Login => "login",
            TryStage::Check => "check",
        }
    }

    /// The stage a console milestone belongs to.
    pub(crate) fn of(s: &Stage) -> Option<TryStage> {
        Some(match s {
            Stage::FirstOutput => TryStage::Firmware,
            Stage::UBootBanner(_) | Stage::Autoboot | Stage::UBootPrompt => TryStage::UBoot,
            Stage::StartingKernel | Stage::KernelBanner(_) => TryStage::Kernel,
            Stage::Init(_) | Stage::NixosStage1 => TryStage::Initrd,
            Stage::NixosStage2 => TryStage::Stage2,
            Stage::LoginPrompt | Stage::LoggedIn => TryStage::Login,
            Stage::Note(_) => return None,
        })
    }
}

impl fmt::Display for TryStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Stages reached so far with their time since the first console output; fed by the
/// session's stage callback.
#[derive(Debug, Clone, Default)]
pub(crate) struct Reached(Arc<Mutex<Vec<(TryStage, Duration)>>>);

impl Reached {
    /// Records `s` at `t` if it starts a later stage than the last one.
    pub(crate) fn note(&self, t: Duration, s: &Stage) {
        let Some(st) = TryStage::of(s) else {
            return;
        };
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if v.last().is_none_or(|(last, _)| st > *last) {
            v.push((st, t));
        }
    }

    fn mark(&self, st: TryStage, t: Duration) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if v.last().is_none_or(|(last, _)| st > *last) {
            v.push((st, t));
        }
    }

    pub(crate) fn list(&self) -> Vec<(TryStage, Duration)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The stage in progress: the last one reached (firmware when nothing came).
    pub(crate) fn current(&self) -> TryStage {
        self.list()
            .last()
            .map(|(s, _)| *s)
            .unwrap_or(TryStage::Firmware)
    }
}

/// Errors of `try`, each naming what to look at.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TryError {
    #[error("{tool}: {msg}")]
    Tool { tool: String, msg: String },
    #[error("{path}: {msg}")]
    Image { path: String, msg: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("the boot failed in stage \"{stage}\"{hint}: {source}")]
    Boot {
        stage: TryStage,
        hint: String,
        #[source]
        source: ConsoleError,
    },
    #[error(
        "stage \"check\" failed: `{cmd}` exited with status {status}{}{}",
        lines_block("output", output),
        lines_block("failed units", failed_units)
    )]
    Check {
        cmd: String,
        status: i32,
        output: Vec<String>,
        failed_units: Vec<String>,
    },
}

fn lines_block(what: &str, lines: &[String]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut s = format!("\n{what}:");
    for l in lines {
        s.push_str("\n  | ");
        s.push_str(l);
    }
    s
}

impl Classify for TryError {
    fn exit(&self) -> Exit {
        match self {
            TryError::Tool { .. } => Exit::Environment,
            TryError::Image { .. } | TryError::Unsupported(_) => Exit::BadInput,
            TryError::Boot { source, .. } => source.exit(),
            TryError::Check { .. } => Exit::Failure,
        }
    }
}

/// A plain-words reason for well-known kernel failures.
fn hint(e: &ConsoleError) -> String {
    let line = match e {
        ConsoleError::KernelPanic { line, .. } => line.as_str(),
        _ => return String::new(),
    };
    if line.contains("Unable to mount root fs") || line.contains("VFS:") {
        " (the kernel found no root file system: check root= on the kernel command line and that the kernel has the storage driver, or the initrd)".into()
    } else if line.contains("No working init found") || line.contains("Requested init") {
        " (no init program could run: check init= and the initrd's /init)".into()
    } else {
        String::new()
    }
}

/// What to do once the board runs.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub linux: LinuxConfig,
    /// Log in and run this after the boot.
    pub(crate) check: Option<String>,
    /// NixOS: list failed units when the check fails.
    pub(crate) list_failed_units: bool,
    pub(crate) check_timeout: Duration,
}

/// What a passed boot showed.
#[derive(Debug, Clone)]
pub(crate) struct Passed {
    pub(crate) arrival: Arrival,
    pub(crate) check: Option<CommandOutput>,
}

/// The systemd check NixOS images get by default.
pub(crate) const NIXOS_CHECK: &str = "systemctl is-system-running --wait";

/// Follows the boot on `s` (the machine already running) to the login prompt, shell or
/// `--expect` line, then logs in and runs the check. `reached` must be the recorder the
/// session's stage callback feeds.
pub(crate) async fn follow(
    s: &mut Session,
    plan: &Plan,
    reached: &Reached,
) -> Result<Passed, TryError> {
    let fail = |reached: &Reached, e: ConsoleError| TryError::Boot {
        stage: reached.current(),
        hint: hint(&e),
        source: e,
    };
    let mut f = Follow::new(&plan.linux, ResetWatch::default());
    let (mut arrival, _) = s.run(&mut f).await.map_err(|e| fail(reached, e))?;
    match &arrival {
        Arrival::Login => s.stage(&Stage::LoginPrompt),
        Arrival::Shell => s.stage(&Stage::LoggedIn),
        Arrival::Matched(l) => {
            s.stage(&Stage::Note(format!("expected line: {l}")));
            let t = s.since_first_output(std::time::Instant::now());
            reached.mark(TryStage::Login, t);
        }
    }
    let Some(cmd) = &plan.check else {
        return Ok(Passed {
            arrival,
            check: None,
        });
    };
    if let Arrival::Matched(_) = arrival {
        // The check needs a shell: follow on to the login prompt.
        let linux = LinuxConfig {
            until: None,
            ..plan.linux.clone()
        };
        let mut f = Follow::new(&linux, ResetWatch::default());
        arrival = s.run(&mut f).await.map_err(|e| fail(reached, e))?.0;
    }
    let n = s.next_n();
    s.run(&mut Login::new(&plan.linux, arrival.clone(), n))
        .await
        .map_err(|e| fail(reached, e))?;
    s.stage(&Stage::LoggedIn);
    let n = s.next_n();
    // Kernel messages off the console (fewer of them in the check's output).
    match s
        .run(&mut linux::command(&plan.linux, "dmesg -n 1", n))
        .await
    {
        Ok(_) | Err(ConsoleError::Garbled { .. }) => {}
        Err(e) => return Err(fail(reached, e)),
    }
    let cfg = LinuxConfig {
        command_timeout: plan.check_timeout,
        ..plan.linux.clone()
    };
    let n = s.next_n();
    let out = s
        .run(&mut linux::command(&cfg, cmd, n))
        .await
        .map_err(|e| TryError::Boot {
            stage: TryStage::Check,
            hint: String::new(),
            source: e,
        })?;
    if out.status != 0 {
        let mut failed_units = Vec::new();
        if plan.list_failed_units {
            let n = s.next_n();
            if let Ok(u) = s
                .run(&mut linux::command(
                    &plan.linux,
                    "systemctl --failed --no-legend --plain",
                    n,
                ))
                .await
            {
                failed_units = u
                    .lines
                    .into_iter()
                    .filter(|l| !l.trim().is_empty())
                    .collect();
            }
        }
        return Err(TryError::Check {
            cmd: cmd.clone(),
            status: out.status,
            output: out.lines,
            failed_units,
        });
    }
    let t = s.since_first_output(std::time::Instant::now());
    reached.mark(TryStage::Check, t);
    Ok(Passed {
        arrival,
        check: Some(out),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_only_move_forward() {
        let r = Reached::default();
        r.note(Duration::from_secs(0), &Stage::FirstOutput);
        r.note(
            Duration::from_secs(1),
            &Stage::UBootBanner("U-Boot 2023.01".into()),
        );
        r.note(Duration::from_secs(3), &Stage::StartingKernel);
        r.note(
            Duration::from_secs(4),
            &Stage::KernelBanner("Linux version 6.1".into()),
        );
        r.note(Duration::from_secs(5), &Stage::Note("x".into()));
        assert_eq!(r.current(), TryStage::Kernel);
        let l = r.list();
        assert_eq!(l.len(), 3);
        assert_eq!(l[2], (TryStage::Kernel, Duration::from_secs(3)));
    }
}
