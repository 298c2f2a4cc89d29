//! Getting images onto this machine: HTTPS downloads with resume, a content-addressed cache,
//! streaming sources for `write URL`, and `nix build` of a board's flake attribute.
//!
//! Trust rule: a file is only ever called "the image" after its digest checked out. Pinned
//! sources (blake3 or sha256 published next to the URL) are checked; unpinned ones are hashed
//! and the user is told plainly that nothing was checked. Digests are never invented.

pub mod cache;
pub(crate) mod digest;
pub(crate) mod download;
pub(crate) mod nix;
pub(crate) mod remote;
pub(crate) mod source;
pub(crate) mod stream;
pub(crate) mod tls;

pub(crate) use cache::{Cache, CacheEntry};
pub(crate) use digest::{Digests, Pin};
pub(crate) use download::DownloadOptions;

use crate::exit::{Classify, Exit};

/// Errors of this module; each names the URL, file or command it is about.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error("{url}: server answered {status}{}", hint_for_status(*status))]
    Status { url: String, status: u16 },
    #[error("{url}: cannot resolve host: {msg}")]
    Dns { url: String, msg: String },
    #[error("{url}: TLS failure: {msg}")]
    Tls { url: String, msg: String },
    #[error("{url}: cannot connect: {msg}")]
    Connect { url: String, msg: String },
    #[error("{url}: timed out: {msg}")]
    Timeout { url: String, msg: String },
    #[error("{url}: {msg}")]
    Network { url: String, msg: String },
    #[error("{url}: refusing plain HTTP for a source without a pinned digest (use https://, or pin it with --blake3/--sha256)")]
    InsecureUrl { url: String },
    #[error("{what}: no published digest and --require-pinned is set (pin it with --blake3 or --sha256)")]
    Unpinned { what: String },
    #[error("{what}: {algo} mismatch: expected {expected}, got {actual}; nothing was cached")]
    Digest {
        what: String,
        algo: &'static str,
        expected: String,
        actual: String,
    },
    #[error("{what}: {algo} mismatch: expected {expected}, got {actual}; the target now holds a bad image and must not be used")]
    BadImageWritten {
        what: String,
        algo: &'static str,
        expected: String,
        actual: String,
    },
    #[error("{0}")]
    BadDigest(String),
    #[error("cache {path}: {msg}")]
    Cache { path: String, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "`nix` was not found on PATH; install Nix (Debian: apt install nix-bin) to build images"
    )]
    NixMissing,
    #[error("nix build {installable}: the flake has no such attribute:\n{log}")]
    NixAttribute { installable: String, log: String },
    #[error("nix build {installable} failed ({status}); last lines of its log:\n{log}")]
    NixFailed {
        installable: String,
        status: String,
        log: String,
    },
    #[error("nix build {installable}: remote builder {machines} could not be used, and no other machine may build:\n{reasons}\nlast lines of Nix's log:\n{log}")]
    NixBuilderDown {
        installable: String,
        machines: String,
        reasons: String,
        log: String,
    },
    #[error("{path}: no image found in the build output (looked for sd-image/*.img, sd-image/*.img.zst, *.img, *.img.zst, nixos.img)")]
    NoImageInOutput { path: String },
    #[error("{0}")]
    Usage(String),
}

fn hint_for_status(status: u16) -> &'static str {
    match status {
        401 | 403 => " (access denied)",
        404 => " (not found: check the URL or the board descriptor)",
        410 => " (gone)",
        429 => " (rate limited; try again later)",
        500..=599 => " (server error; retried, giving up)",
        _ => "",
    }
}

impl Classify for AcquireError {
    fn exit(&self) -> Exit {
        use AcquireError::*;
        match self {
            Status { .. } | Dns { .. } | Tls { .. } | Connect { .. } | Network { .. } => Exit::Io,
            Timeout { .. } => Exit::Timeout,
            InsecureUrl { .. } | Unpinned { .. } => Exit::Refused,
            Digest { .. } | BadDigest(_) | NoImageInOutput { .. } | NixAttribute { .. } => {
                Exit::BadInput
            }
            BadImageWritten { .. } => Exit::Verify,
            Cache { .. } => Exit::Io,
            Io { source, .. } if source.kind() == std::io::ErrorKind::Interrupted => {
                Exit::Interrupted
            }
            Io { .. } => Exit::Io,
            NixMissing => Exit::Environment,
            NixFailed { .. } => Exit::Failure,
            NixBuilderDown { .. } => Exit::Io,
            Usage(_) => Exit::Usage,
        }
    }
}

impl AcquireError {
    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        AcquireError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

pub(crate) type Result<T, E = AcquireError> = std::result::Result<T, E>;

/// The default image source of a board (`fetch --board`, `write --board` without an image):
/// its first `[[image]]` with a URL, with the digest the descriptor publishes (if any).
/// `reg` is the CLI's registry (shipped boards, config-file dirs, `--boards-dir`), so a board
/// resolves here exactly as in `sbcflash boards`.
pub(crate) fn board_source(
    reg: &crate::board::Registry,
    board: &str,
) -> anyhow::Result<source::SourceSpec> {
    let b = reg.get(board)?;
    let img = b
        .desc
        .images
        .iter()
        .find(|i| i.url.is_some())
        .ok_or_else(|| no_default_source(reg, b))?;
    let pin = match (&img.blake3, &img.sha256) {
        (Some(d), _) => Some(Pin::Blake3(d.0)),
        (None, Some(d)) => Some(Pin::Sha256(d.0)),
        _ => None,
    };
    Ok(source::SourceSpec {
        url: img.url.clone().unwrap_or_default(),
        pin,
    })
}

/// Why a board has no default download, what to do instead, and which boards have one.
fn no_default_source(reg: &crate::board::Registry, b: &crate::board::Board) -> AcquireError {
    let id = b.id();
    let flake = b.desc.images.iter().find_map(|i| i.flake.as_deref());
    let build = match flake {
        Some(f) => {
            format!("build one from {f} with `sbcflash build --board {id} --flake {f}#HOST`")
        }
        None => format!("build one with `sbcflash build --board {id} --flake REF#HOST`"),
    };
    let with: Vec<&str> = reg
        .boards()
        .iter()
        .filter(|o| o.desc.images.iter().any(|i| i.url.is_some()))
        .map(|o| o.id())
        .collect();
    let others = if with.is_empty() {
        "no board has a default download".to_string()
    } else {
        format!("boards with a default download: {}", with.join(", "))
    };
    AcquireError::Usage(format!(
        "board {id} has no default image to download (its descriptor lists no image URL): give the image (a file or an https:// URL), or {build}; {others}"
    ))
}

/// The flake attribute template of a board (`build --board`): the attribute of its first
/// flake `[[image]]` if it names one, else its handoff template.
pub(crate) fn board_flake_template(
    reg: &crate::board::Registry,
    board: &str,
) -> anyhow::Result<String> {
    let b = reg.get(board)?;
    let from_image = b
        .desc
        .images
        .iter()
        .find(|i| i.flake.is_some())
        .and_then(|i| i.attr.clone());
    Ok(from_image.unwrap_or_else(|| b.handoff().flake_attr.clone()))
}
