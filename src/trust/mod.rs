//! Who published an image: detached signatures (minisign, SSH `SshSig`, OpenPGP on a bmap) checked
//! against trusted keys, and signed manifests whose digests the writer then checks while it
//! writes. Everything here runs before the target is opened, so a refusal leaves it unchanged.

pub(crate) mod keys;
pub(crate) mod manifest;
mod sig;

pub(crate) use keys::TrustedKey;
pub(crate) use manifest::Manifest;
pub(crate) use sig::{Signature, Verified};

use crate::exit::{Classify, Exit};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub(crate) enum TrustError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A trusted key that cannot be read.
    #[error("{what}: {msg}")]
    Key { what: String, msg: String },
    /// A manifest that cannot be read or contradicts the rest of the input.
    #[error("{path}: {msg}; nothing was written")]
    Manifest { path: String, msg: String },
    /// A signature that is malformed or does not match the signed file.
    #[error("{signature}: BAD signature for {file}: {msg}; nothing was written")]
    Bad {
        file: String,
        signature: String,
        msg: String,
    },
    /// A good-looking signature made by a key nobody trusted.
    #[error("{signature}: {file} is signed by {signer}, which is not a trusted key (trusted: {trusted}); nothing was written")]
    Untrusted {
        file: String,
        signature: String,
        signer: String,
        trusted: String,
    },
    /// A digest the signed manifest gives differs from the input's.
    #[error("{what}: {msg}; nothing was written")]
    Mismatch { what: String, msg: String },
    /// `--require-signature` and nothing verified.
    #[error("refusing {what}: a signature is required (--require-signature / require_signature) and {why}; nothing was written")]
    Unsigned { what: String, why: String },
}

impl Classify for TrustError {
    fn exit(&self) -> Exit {
        match self {
            TrustError::Io { .. } => Exit::Io,
            TrustError::Key { .. } | TrustError::Manifest { .. } => Exit::BadInput,
            TrustError::Bad { .. } | TrustError::Untrusted { .. } | TrustError::Mismatch { .. } => {
                Exit::Verify
            }
            TrustError::Unsigned { .. } => Exit::Refused,
        }
    }
}

/// What trust applies to one write: the keys, whether a signature is required, and the
/// signature and manifest named on the command line.
#[derive(Debug, Clone, Default)]
pub(crate) struct TrustPlan {
    pub(crate) keys: Vec<TrustedKey>,
    pub(crate) require: bool,
    /// `--signature`: for the manifest when there is one, else for the image file.
    pub(crate) signature: Option<PathBuf>,
    pub(crate) manifest: Option<PathBuf>,
}

/// The input as the writer will read it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Input<'a> {
    /// The image as a local regular file (its bytes as distributed are what a detached image
    /// signature covers); `None` for a URL or a pipe.
    pub(crate) file: Option<&'a Path>,
    /// How to name the image (path or URL).
    pub(crate) name: &'a str,
    /// The bmap the writer uses, if any.
    pub(crate) bmap: Option<&'a Path>,
    /// The board the image is written for, if one is known.
    pub(crate) board: Option<&'a str>,
}

/// The outcome: who signed, and the digest the writer must find while writing.
#[derive(Debug, Clone, Default)]
pub(crate) struct Verdict {
    pub(crate) signed: Option<Verified>,
    /// From a signed manifest: the logical image's blake3, and the words naming its origin.
    pub(crate) expected_blake3: Option<([u8; 32], String)>,
    /// Things a person should know (a signature found but not checked).
    pub(crate) notes: Vec<String>,
}

/// Signature files looked for beside `file`, in order.
pub(crate) fn beside(file: &Path) -> Vec<PathBuf> {
    ["minisig", "sig", "asc"]
        .iter()
        .map(|ext| {
            let mut s = file.as_os_str().to_os_string();
            s.push(".");
            s.push(ext);
            PathBuf::from(s)
        })
        .filter(|p| p.is_file())
        .collect()
}

impl TrustPlan {
    fn trusted_ids(&self) -> String {
        if self.keys.is_empty() {
            return "none: give --trusted-key or [[image.trust]]".into();
        }
        self.keys
            .iter()
            .map(TrustedKey::id)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Check everything signed about `input` before anything is written.
    pub(crate) fn check(&self, input: Input<'_>) -> Result<Verdict, TrustError> {
        let mut v = Verdict::default();
        if let Some(m) = &self.manifest {
            self.check_manifest(m, input, &mut v)?;
        } else if let Some(s) = &self.signature {
            let Some(file) = input.file else {
                return Err(TrustError::Unsigned {
                    what: input.name.to_string(),
                    why: format!(
                        "{} signs the image file, which is streamed here and cannot be checked before it is written; sign a manifest instead and give it with --manifest",
                        s.display()
                    ),
                });
            };
            v.signed = Some(self.verify_file(file, s)?);
        } else if let Some(file) = input.file {
            for s in beside(file) {
                if self.keys.is_empty() {
                    v.notes.push(format!(
                        "{} not checked: no trusted key is given (--trusted-key or [[image.trust]])",
                        s.display()
                    ));
                    continue;
                }
                let sig = Signature::read(&s, file)?;
                if sig.is_openpgp() && !self.has_pgp() {
                    v.notes.push(format!(
                        "{} (OpenPGP) not checked: no OpenPGP key is trusted",
                        s.display()
                    ));
                    continue;
                }
                v.signed = Some(self.verify_with(file, &s, &sig)?);
                break;
            }
        }
        if let Some(bmap) = input.bmap {
            self.check_bmap(bmap, &mut v)?;
        }
        if self.require && v.signed.is_none() {
            let looked = match (&self.manifest, input.file) {
                (Some(m), _) => format!("the manifest {} has no signature beside it", m.display()),
                (None, Some(f)) => format!(
                    "there is no signature for it (looked for {0}.minisig, {0}.sig, {0}.asc{1}; or give --manifest)",
                    f.display(),
                    input.bmap.map(|b| format!(", {0}.asc, {0}.sig", b.display())).unwrap_or_default()
                ),
                (None, None) => "a streamed image can be trusted only through a signed manifest (--manifest FILE, signed as FILE.minisig or FILE.sig)".into(),
            };
            // A signature that was there but could not be checked says why.
            let why = match v.notes.is_empty() {
                true => looked,
                false => v.notes.join("; "),
            };
            return Err(TrustError::Unsigned {
                what: input.name.to_string(),
                why,
            });
        }
        Ok(v)
    }

    fn has_pgp(&self) -> bool {
        self.keys
            .iter()
            .any(|k| matches!(k, TrustedKey::Pgp { .. }))
    }

    fn verify_file(&self, file: &Path, sig_path: &Path) -> Result<Verified, TrustError> {
        let sig = Signature::read(sig_path, file)?;
        self.verify_with(file, sig_path, &sig)
    }

    fn verify_with(
        &self,
        file: &Path,
        sig_path: &Path,
        sig: &Signature,
    ) -> Result<Verified, TrustError> {
        let data = std::fs::File::open(file).map_err(|source| TrustError::Io {
            path: file.display().to_string(),
            source,
        })?;
        sig.verify(
            std::io::BufReader::with_capacity(1 << 20, data),
            file,
            sig_path,
            &self.keys,
            &self.trusted_ids(),
        )
    }

    fn check_manifest(
        &self,
        m: &Path,
        input: Input<'_>,
        v: &mut Verdict,
    ) -> Result<(), TrustError> {
        let sig_path = match &self.signature {
            Some(s) => Some(s.clone()),
            None => beside(m).into_iter().next(),
        };
        match sig_path {
            Some(s) => v.signed = Some(self.verify_file(m, &s)?),
            None if self.require => {}
            None => v.notes.push(format!(
                "the manifest {} is not signed: its digests are checked, but nothing says who made it",
                m.display()
            )),
        }
        let man = Manifest::load(m)?;
        if let (Some(want), Some(board)) = (&man.boards, input.board) {
            if !want.iter().any(|b| b == board) {
                return Err(TrustError::Manifest {
                    path: m.display().to_string(),
                    msg: format!(
                        "the image is for the boards {}, not {board}",
                        want.join(", ")
                    ),
                });
            }
        }
        if let (Some(want), Some(bmap)) = (&man.bmap_sha256, input.bmap) {
            let have = sha256_file(bmap)?;
            if &have != want {
                return Err(TrustError::Mismatch {
                    what: bmap.display().to_string(),
                    msg: format!(
                        "sha256 {} differs from {} in the manifest {}",
                        hex::encode(have),
                        hex::encode(want),
                        m.display()
                    ),
                });
            }
        }
        let from = match &v.signed {
            Some(s) => format!("the manifest {} signed by {}", m.display(), s.key_id),
            None => format!("the unsigned manifest {}", m.display()),
        };
        v.expected_blake3 = Some((man.blake3, from));
        Ok(())
    }

    /// bmaptool 3.x: a `.bmap.asc` or `.bmap.sig` beside the bmap is an OpenPGP signature of it
    /// (its range checksums are then checked while writing, as bmaptool does).
    fn check_bmap(&self, bmap: &Path, v: &mut Verdict) -> Result<(), TrustError> {
        for s in beside(bmap) {
            let sig = Signature::read(&s, bmap)?;
            if self.keys.is_empty() || (sig.is_openpgp() && !self.has_pgp()) {
                v.notes.push(format!(
                    "{} not checked: no {}key is trusted (--trusted-key)",
                    s.display(),
                    if sig.is_openpgp() { "OpenPGP " } else { "" }
                ));
                continue;
            }
            let ok = self.verify_with(bmap, &s, &sig)?;
            if v.signed.is_none() {
                v.signed = Some(ok);
            }
            break;
        }
        Ok(())
    }
}

fn sha256_file(p: &Path) -> Result<[u8; 32], TrustError> {
    use sha2::Digest;
    let bytes = std::fs::read(p).map_err(|source| TrustError::Io {
        path: p.display().to_string(),
        source,
    })?;
    Ok(sha2::Sha256::digest(&bytes).into())
}

/// One `[[image.trust]]` entry (config file, board descriptor image source, station config):
/// the key itself or a file holding it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TrustEntry {
    /// A minisign key (`RW...`) or an SSH public key line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) key: Option<String>,
    /// A key file (minisign .pub, SSH .pub, OpenPGP public key or keyring).
    #[serde(default, alias = "key-file", skip_serializing_if = "Option::is_none")]
    pub(crate) key_file: Option<PathBuf>,
    /// Who the key belongs to (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) name: Option<String>,
}

impl TrustEntry {
    /// The keys this entry names; `origin` says where the entry is, for errors.
    pub(crate) fn load(&self, origin: &str) -> Result<Vec<TrustedKey>, TrustError> {
        let mut out = Vec::new();
        if let Some(k) = &self.key {
            out.extend(keys::parse(k.trim().as_bytes(), origin)?);
        }
        if let Some(f) = &self.key_file {
            out.extend(keys::load(&f.display().to_string(), origin)?);
        }
        if out.is_empty() {
            return Err(TrustError::Key {
                what: origin.to_string(),
                msg: "an entry needs key or key_file".into(),
            });
        }
        Ok(out)
    }
}
