//! Detached signatures, recognised by their bytes, verified over a stream (an image may be
//! gigabytes: it is hashed as it is read, never held in memory).

use super::{TrustError, TrustedKey};
use pgp::composed::{Deserializable, DetachedSignature};
use pgp::types::KeyDetails;
use std::io::Read;
use std::path::Path;

/// A detached signature file.
#[derive(Clone)]
pub(crate) enum Signature {
    /// `minisign -S` output; the key ID is read from its signature line.
    Minisign {
        sig: Box<minisign_verify::Signature>,
        key_id: String,
    },
    /// `ssh-keygen -Y sign -n file` output.
    Ssh(Box<ssh_key::SshSig>),
    /// `gpg --detach-sign` (binary) or `--armor` output.
    OpenPgp(Box<DetachedSignature>),
}

/// Who vouched for a file.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Verified {
    /// `minisign`, `ssh` or `openpgp`.
    pub(crate) scheme: &'static str,
    /// The signing key's id, as in [`TrustedKey::id`].
    pub(crate) key_id: String,
    /// The signature file.
    pub(crate) signature: String,
    /// The file it signs.
    pub(crate) file: String,
}

/// The namespace `ssh-keygen -Y sign -n file` uses, the only one accepted.
const SSH_NAMESPACE: &str = "file";

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "signature by {}", self.signer())
    }
}

impl Signature {
    /// Read and recognise `path`, a signature for `file` (named in errors).
    pub(crate) fn read(path: &Path, file: &Path) -> Result<Signature, TrustError> {
        let bytes = std::fs::read(path).map_err(|source| TrustError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let bad = |msg: String| TrustError::Bad {
            file: file.display().to_string(),
            signature: path.display().to_string(),
            msg,
        };
        let text = std::str::from_utf8(&bytes).ok().map(str::trim_start);
        match text {
            Some(t) if t.starts_with("untrusted comment:") => {
                let sig = minisign_verify::Signature::decode(t)
                    .map_err(|e| bad(format!("not a readable minisign signature: {e}")))?;
                let line = t.lines().nth(1).unwrap_or("");
                let key_id = super::keys::minisign_key_id(line)
                    .map(|id| format!("minisign:{id}"))
                    .ok_or_else(|| bad("not a readable minisign signature line".into()))?;
                Ok(Signature::Minisign {
                    sig: Box::new(sig),
                    key_id,
                })
            }
            Some(t) if t.starts_with("-----BEGIN SSH SIGNATURE-----") => {
                ssh_key::SshSig::from_pem(t.trim_end())
                    .map(|s| Signature::Ssh(Box::new(s)))
                    .map_err(|e| bad(format!("not a readable SSH signature: {e}")))
            }
            Some(t) if t.starts_with("-----BEGIN PGP SIGNATURE-----") => {
                DetachedSignature::from_armor_single(std::io::Cursor::new(t.as_bytes()))
                    .map(|(s, _)| Signature::OpenPgp(Box::new(s)))
                    .map_err(|e| bad(format!("not a readable OpenPGP signature: {e}")))
            }
            _ => DetachedSignature::from_bytes(std::io::Cursor::new(&bytes[..]))
                .map(|s| Signature::OpenPgp(Box::new(s)))
                .map_err(|e| {
                    bad(format!(
                        "not a minisign, SSH or OpenPGP signature (as OpenPGP: {e})"
                    ))
                }),
        }
    }

    pub(crate) fn is_openpgp(&self) -> bool {
        matches!(self, Signature::OpenPgp(_))
    }

    /// The signer as the signature names it (for "not trusted" messages).
    fn signer(&self) -> String {
        match self {
            Signature::Minisign { key_id, .. } => key_id.clone(),
            Signature::Ssh(s) => format!(
                "ssh:{}",
                s.public_key().fingerprint(ssh_key::HashAlg::Sha256)
            ),
            Signature::OpenPgp(s) => {
                let fp = s.signature.issuer_fingerprint();
                match fp.first() {
                    Some(f) => format!("openpgp:{f:X}"),
                    None => s
                        .signature
                        .issuer()
                        .first()
                        .map(|k| format!("openpgp key id {k:?}"))
                        .unwrap_or_else(|| "an unnamed OpenPGP key".into()),
                }
            }
        }
    }

    /// Verify `data` (the contents of `file`) against the trusted `keys`.
    pub(crate) fn verify(
        &self,
        mut data: impl Read,
        file: &Path,
        sig_path: &Path,
        keys: &[TrustedKey],
        trusted: &str,
    ) -> Result<Verified, TrustError> {
        let bad = |msg: String| TrustError::Bad {
            file: file.display().to_string(),
            signature: sig_path.display().to_string(),
            msg,
        };
        let read_err = |source: std::io::Error| TrustError::Io {
            path: file.display().to_string(),
            source,
        };
        let untrusted = || TrustError::Untrusted {
            file: file.display().to_string(),
            signature: sig_path.display().to_string(),
            signer: self.signer(),
            trusted: trusted.to_string(),
        };
        let done = |scheme: &'static str, key: &TrustedKey| Verified {
            scheme,
            key_id: key.id().to_string(),
            signature: sig_path.display().to_string(),
            file: file.display().to_string(),
        };
        let mut buf = vec![0u8; 1 << 20];
        match self {
            Signature::Minisign { sig, key_id } => {
                let key = keys
                    .iter()
                    .find(|k| matches!(k, TrustedKey::Minisign { .. }) && k.id() == key_id)
                    .ok_or_else(untrusted)?;
                let TrustedKey::Minisign { key: pk, .. } = key else {
                    return Err(untrusted());
                };
                match pk.verify_stream(sig) {
                    Ok(mut v) => {
                        loop {
                            let n = data.read(&mut buf).map_err(read_err)?;
                            if n == 0 {
                                break;
                            }
                            v.update(&buf[..n]);
                        }
                        v.finalize()
                            .map_err(|e| bad(format!("minisign: {e} (the file was changed after it was signed, or the signature was)")))?;
                    }
                    // A legacy (not prehashed, `minisign -S -l`) signature: small files only.
                    Err(minisign_verify::Error::UnsupportedLegacyMode) => {
                        let mut all = Vec::new();
                        data.take(64 << 20)
                            .read_to_end(&mut all)
                            .map_err(read_err)?;
                        pk.verify(&all, sig, true)
                            .map_err(|e| bad(format!("minisign: {e}")))?;
                    }
                    Err(e) => return Err(bad(format!("minisign: {e}"))),
                }
                Ok(done("minisign", key))
            }
            Signature::Ssh(s) => {
                if s.namespace() != SSH_NAMESPACE {
                    return Err(bad(format!(
                        "SSH signature namespace is {:?}, not {SSH_NAMESPACE:?} (ssh-keygen -Y sign -n file)",
                        s.namespace()
                    )));
                }
                let key = keys
                    .iter()
                    .find(|k| matches!(k, TrustedKey::Ssh { key, .. } if key.key_data() == s.public_key()))
                    .ok_or_else(untrusted)?;
                let hash = ssh_hash(s.hash_alg(), &mut data, &mut buf).map_err(read_err)?;
                let signed = ssh_signed_data(s, &hash);
                use signature::Verifier;
                s.public_key()
                    .verify(&signed, s.signature())
                    .map_err(|e| bad(format!("SSH signature: {e} (the file was changed after it was signed, or the signature was)")))?;
                Ok(done("ssh", key))
            }
            Signature::OpenPgp(s) => {
                // The trusted key (primary or subkey) the signature names as its issuer.
                let named = |fp: &pgp::types::Fingerprint, id: &pgp::types::KeyId| {
                    s.signature.issuer_fingerprint().contains(&fp)
                        || s.signature.issuer().contains(&id)
                };
                let found = keys.iter().find_map(|k| {
                    let TrustedKey::Pgp { key, .. } = k else {
                        return None;
                    };
                    let p = &key.primary_key;
                    if named(&p.fingerprint(), &p.key_id()) {
                        return Some((k, None));
                    }
                    key.public_subkeys
                        .iter()
                        .find(|sk| named(&sk.key.fingerprint(), &sk.key.key_id()))
                        .map(|sk| (k, Some(&sk.key)))
                });
                let Some((k, sub)) = found else {
                    return Err(untrusted());
                };
                let TrustedKey::Pgp { key, .. } = k else {
                    return Err(untrusted());
                };
                // Streamed: an image's own OpenPGP signature never holds the image in memory.
                let mut data = ReadErr::new(data);
                let res = match sub {
                    Some(sk) => s.signature.verify(sk, &mut data),
                    None => s.signature.verify(&key.primary_key, &mut data),
                };
                if let Some(e) = data.err.take() {
                    return Err(read_err(e));
                }
                res.map_err(|e| {
                    bad(format!(
                        "OpenPGP signature does not verify with {} ({e}; the file was changed after it was signed, or the signature was)",
                        k.id()
                    ))
                })?;
                Ok(done("openpgp", k))
            }
        }
    }
}

/// A reader that keeps its first I/O error, so a read failure is reported as one and not as
/// a bad signature.
struct ReadErr<R> {
    inner: R,
    err: Option<std::io::Error>,
}

impl<R> ReadErr<R> {
    fn new(inner: R) -> Self {
        ReadErr { inner, err: None }
    }
}

impl<R: Read> Read for ReadErr<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            if self.err.is_none() {
                self.err = Some(std::io::Error::new(e.kind(), e.to_string()));
            }
        })
    }
}

/// The message digest an SSH signature covers, hashed as the data streams past.
fn ssh_hash(
    alg: ssh_key::HashAlg,
    data: &mut impl Read,
    buf: &mut [u8],
) -> std::io::Result<Vec<u8>> {
    use sha2::Digest;
    fn run<D: Digest>(mut d: D, data: &mut impl Read, buf: &mut [u8]) -> std::io::Result<Vec<u8>> {
        loop {
            let n = data.read(buf)?;
            if n == 0 {
                return Ok(d.finalize().to_vec());
            }
            d.update(&buf[..n]);
        }
    }
    match alg {
        ssh_key::HashAlg::Sha256 => run(sha2::Sha256::new(), data, buf),
        _ => run(sha2::Sha512::new(), data, buf),
    }
}

/// The blob an SSH signature signs (PROTOCOL.sshsig): the magic, then namespace, reserved,
/// hash algorithm and the message's hash as SSH strings.
fn ssh_signed_data(s: &ssh_key::SshSig, hash: &[u8]) -> Vec<u8> {
    let mut out = b"SSHSIG".to_vec();
    let alg = s.hash_alg();
    for field in [
        s.namespace().as_bytes(),
        s.reserved(),
        alg.as_str().as_bytes(),
        hash,
    ] {
        out.extend_from_slice(&(field.len() as u32).to_be_bytes());
        out.extend_from_slice(field);
    }
    out
}
