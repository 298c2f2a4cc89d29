//! Trust flags of `write`: which keys are trusted (flags, config, board descriptor), and whether
//! a signature is required. The checking itself is [`crate::trust`].

use super::Global;
use crate::progress::{Event, Level};
use crate::trust::{self, TrustPlan, TrustedKey};
use std::path::PathBuf;

#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct TrustArgs {
    /// A key trusted to sign images, manifests and bmaps (repeatable): a file (minisign .pub,
    /// SSH .pub, OpenPGP public key or keyring) or the key itself (RW... or "ssh-ed25519 AAAA...").
    #[arg(long, value_name = "KEY")]
    pub(crate) trusted_key: Vec<String>,
    /// Detached signature of the manifest (with --manifest) or of the image file (default:
    /// FILE.minisig, FILE.sig or FILE.asc beside it).
    #[arg(long, value_name = "FILE")]
    pub(crate) signature: Option<PathBuf>,
    /// A signed manifest (TOML: the image's blake3, bmap digest, boards; see README "Trust"):
    /// it is verified first, then the image is checked against it while it is written.
    #[arg(long, value_name = "FILE")]
    pub(crate) manifest: Option<PathBuf>,
    /// Refuse an image that no trusted key signed (also `require-signature = true` under
    /// `[image]` in the config) before the target is touched.
    #[arg(long)]
    pub(crate) require_signature: bool,
}

/// Keys and rules from the flags, the config file's `[image]` and the board's `[[image.trust]]`.
pub(crate) fn plan(
    a: &TrustArgs,
    board: Option<&crate::board::Board>,
    g: &Global,
) -> anyhow::Result<TrustPlan> {
    let flags = crate::config::Flags {
        boards_dirs: g.boards_dir.clone(),
        ..Default::default()
    };
    let cfg = crate::config::Config::load(&flags)?;
    let mut keys: Vec<TrustedKey> = Vec::new();
    for k in &a.trusted_key {
        keys.extend(trust::keys::load(k, "--trusted-key")?);
    }
    for e in &cfg.image.trust {
        keys.extend(e.load(&format!(
            "[[image.trust]] in the config {}",
            cfg.file.as_deref().unwrap_or(std::path::Path::new("")).display()
        ))?);
    }
    if let Some(b) = board {
        for src in &b.desc.images {
            for e in &src.trust {
                keys.extend(e.load(&format!(
                    "[[image.trust]] of the image source {:?} of board {}",
                    src.name,
                    b.id()
                ))?);
            }
        }
    }
    Ok(TrustPlan {
        keys,
        require: a.require_signature || cfg.image.require_signature,
        signature: a.signature.clone(),
        manifest: a.manifest.clone(),
    })
}

/// Say what the check found (who signed; signatures seen but not checked).
pub(crate) fn report(v: &trust::Verdict, job: &str, reporter: &dyn crate::progress::Reporter) {
    for n in &v.notes {
        reporter.report(Event::Message {
            job: job.to_string(),
            level: Level::Warn,
            text: n.clone(),
        });
    }
    if let Some(s) = &v.signed {
        reporter.report(Event::Message {
            job: job.to_string(),
            level: Level::Info,
            text: format!(
                "{}: good {} signature by {} ({})",
                s.file, s.scheme, s.key_id, s.signature
            ),
        });
    }
}
