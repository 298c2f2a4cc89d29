//! Boot acceptance: after a unit's write and identity, reset it (a command: `uhubctl`, a
//! relay or PDU script, or here a QEMU machine on the freshly written card), follow its
//! serial console with the console engine to a login prompt (or `expect`) and the check,
//! and keep the transcript. The unit is PASS only if it booted.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::console::linux::LinuxConfig;
use crate::console::serial::Link;
use crate::console::session::{Session, Transcript};
use crate::tryboot::{self, Plan, Reached, TryStage};

/// `[slot.boot]` as written in station.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BootConfig {
    /// Shell command that power-cycles or resets the unit. It runs with `SBCFLASH_SLOT`,
    /// `SBCFLASH_DEVICE` (the card just written) and `SBCFLASH_SERIAL` set, and must exit 0.
    pub(crate) reset: String,
    /// The unit's serial console. Opened before the reset when it exists (a USB-serial
    /// adapter), else waited for after it (up to 30 s).
    pub(crate) console: PathBuf,
    #[serde(default = "default_baud")]
    pub(crate) baud: u32,
    /// Pass when a console line matches this (instead of a login prompt).
    #[serde(default)]
    pub(crate) expect: Option<String>,
    /// Log in and run this; it must exit 0.
    #[serde(default)]
    pub(crate) check: Option<String>,
    #[serde(default = "default_user")]
    pub(crate) login_user: String,
    #[serde(default)]
    pub(crate) login_password: Option<String>,
    /// Seconds from the reset to the login prompt (or `expect`).
    #[serde(default = "default_timeout")]
    pub(crate) timeout: u64,
    /// Command run after the acceptance, passed or not (power the unit off).
    #[serde(default)]
    pub(crate) off: Option<String>,
}

fn default_baud() -> u32 {
    115200
}
fn default_user() -> String {
    "root".into()
}
fn default_timeout() -> u64 {
    300
}

/// A validated `[slot.boot]`.
#[derive(Debug, Clone)]
pub(crate) struct Acceptance {
    pub(crate) cfg: BootConfig,
    pub(crate) expect: Option<regex::Regex>,
}

impl Acceptance {
    pub(crate) fn new(cfg: BootConfig) -> Result<Acceptance, String> {
        if cfg.reset.trim().is_empty() {
            return Err("`reset` is empty".into());
        }
        let expect = match &cfg.expect {
            Some(r) => Some(regex::Regex::new(r).map_err(|e| format!("`expect`: {e}"))?),
            None => None,
        };
        Ok(Acceptance { cfg, expect })
    }
}

/// What the acceptance found, for the ledger.
#[derive(Debug, Clone)]
pub(crate) struct BootRecord {
    pub(crate) pass: bool,
    /// The stage a failure stopped in, or the last stage reached.
    pub(crate) stage: String,
    /// Time from the first console output to the login prompt (or `expect` line).
    pub(crate) login_seconds: Option<f64>,
    pub(crate) transcript: PathBuf,
    pub(crate) transcript_blake3: Option<String>,
    pub(crate) failure: Option<String>,
}

/// Who the unit is, for the reset command's environment.
pub(crate) struct Unit<'a> {
    pub(crate) slot: &'a str,
    pub(crate) device: &'a str,
    pub(crate) serial: &'a str,
}

fn shell(cmd: &str, unit: &Unit) -> Result<(), String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("SBCFLASH_SLOT", unit.slot)
        .env("SBCFLASH_DEVICE", unit.device)
        .env("SBCFLASH_SERIAL", unit.serial)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("`{cmd}`: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "`{cmd}` failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

fn open(a: &Acceptance) -> Result<Link, String> {
    let mut link = Link::serial(&a.cfg.console, a.cfg.baud).map_err(|e| e.to_string())?;
    link.set_reopen_for(Duration::ZERO);
    Ok(link)
}

/// Runs the acceptance of one unit; `say` gets each stage as a line for the slot's log.
pub(crate) fn accept(
    a: &Acceptance,
    unit: &Unit,
    transcript: &Path,
    say: impl Fn(String) + Send + 'static,
) -> BootRecord {
    let mut rec = BootRecord {
        pass: false,
        stage: "reset".into(),
        login_seconds: None,
        transcript: transcript.to_path_buf(),
        transcript_blake3: None,
        failure: None,
    };
    let r = run(a, unit, transcript, say, &mut rec);
    if let Some(off) = &a.cfg.off {
        if let Err(e) = shell(off, unit) {
            tracing::warn!("{}: power-off command: {e}", unit.slot);
        }
    }
    rec.transcript_blake3 = std::fs::read(transcript)
        .ok()
        .map(|b| blake3::hash(&b).to_hex().to_string());
    match r {
        Ok(()) => rec.pass = true,
        Err(e) => rec.failure = Some(e),
    }
    rec
}

fn run(
    a: &Acceptance,
    unit: &Unit,
    transcript: &Path,
    say: impl Fn(String) + Send + 'static,
    rec: &mut BootRecord,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("async runtime: {e}"))?;
    let _enter = rt.enter();
    // A console that is always there (a USB-serial adapter) is opened first, so the reset's
    // first bytes are seen; one that appears with the unit (a VM's pty) after the reset.
    let mut link = if a.cfg.console.exists() {
        Some(open(a)?)
    } else {
        None
    };
    shell(&a.cfg.reset, unit).map_err(|e| format!("reset: {e}"))?;
    let link = match link.take() {
        Some(l) => l,
        None => {
            let until = Instant::now() + Duration::from_secs(30);
            while !a.cfg.console.exists() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            open(a).map_err(|e| format!("console: {e}"))?
        }
    };
    let mut s = Session::new(link);
    s.transcript = Some(
        Transcript::create(transcript, Instant::now())
            .map_err(|e| format!("transcript {}: {e}", transcript.display()))?,
    );
    let reached = Reached::default();
    {
        let reached = reached.clone();
        s.on_stage(move |t, st| {
            reached.note(t, st);
            say(format!("boot [{:>7.2}s] {st}", t.as_secs_f64()));
        });
    }
    let plan = Plan {
        linux: LinuxConfig {
            boot_timeout: Duration::from_secs(a.cfg.timeout),
            login_user: a.cfg.login_user.clone(),
            login_password: a.cfg.login_password.clone(),
            until: a.expect.clone(),
            ..LinuxConfig::default()
        },
        check: a.cfg.check.clone(),
        list_failed_units: false,
        check_timeout: Duration::from_secs(a.cfg.timeout),
    };
    let r = rt.block_on(tryboot::follow(&mut s, &plan, &reached));
    s.finish();
    let stages = reached.list();
    rec.login_seconds = stages
        .iter()
        .find(|(s, _)| *s == TryStage::Login)
        .map(|(_, t)| t.as_secs_f64());
    rec.stage = reached.current().name().to_string();
    match r {
        Ok(_) => Ok(()),
        Err(e) => {
            if let tryboot::TryError::Boot { stage, .. } = &e {
                rec.stage = stage.name().to_string();
            } else if let tryboot::TryError::Check { .. } = &e {
                rec.stage = TryStage::Check.name().to_string();
            }
            Err(format!("{e}"))
        }
    }
}
