//! Trusted public keys: minisign, SSH (ed25519) and OpenPGP, from a file or inline text, each
//! with the id a person sees in the tool that made it (minisign's key ID, the SSH SHA256
//! fingerprint, the OpenPGP fingerprint), so a ledger row and a message name the same key.

use super::TrustError;
use pgp::composed::{Deserializable, SignedPublicKey};
use pgp::types::KeyDetails;
use std::path::Path;

/// One key someone decided to trust for images.
#[derive(Clone)]
pub(crate) enum TrustedKey {
    Minisign {
        key: minisign_verify::PublicKey,
        id: String,
    },
    Ssh {
        key: ssh_key::PublicKey,
        id: String,
    },
    Pgp {
        key: Box<SignedPublicKey>,
        id: String,
    },
}

impl std::fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.id())
    }
}

impl TrustedKey {
    /// The key's id as its own tool prints it, with the scheme in front.
    pub(crate) fn id(&self) -> &str {
        match self {
            TrustedKey::Minisign { id, .. }
            | TrustedKey::Ssh { id, .. }
            | TrustedKey::Pgp { id, .. } => id,
        }
    }
}

/// A key given as text: an existing file (minisign `.pub`, SSH `.pub`, an OpenPGP public key or
/// keyring, armored or binary, possibly several keys), else the key itself (a minisign base64
/// key `RW...` or an SSH public key line). `origin` names where the text came from in errors.
pub(crate) fn load(spec: &str, origin: &str) -> Result<Vec<TrustedKey>, TrustError> {
    let path = Path::new(spec);
    if path.is_file() {
        let bytes = std::fs::read(path).map_err(|source| TrustError::Io {
            path: spec.to_string(),
            source,
        })?;
        return parse(&bytes, &format!("{origin} {spec}"));
    }
    let t = spec.trim();
    if t.starts_with("RW") || t.starts_with("ssh-") || t.starts_with("untrusted comment:") {
        return parse(t.as_bytes(), origin);
    }
    Err(TrustError::Key {
        what: format!("{origin} {spec}"),
        msg: "is neither a file nor a minisign key (RW...) nor an SSH public key line (ssh-ed25519 AAAA...)".into(),
    })
}

/// Parse key material by what it looks like.
pub(crate) fn parse(bytes: &[u8], what: &str) -> Result<Vec<TrustedKey>, TrustError> {
    let bad = |msg: String| TrustError::Key {
        what: what.to_string(),
        msg,
    };
    let text = std::str::from_utf8(bytes).ok();
    match text.map(str::trim_start) {
        Some(t) if t.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----") => {
            let keys = SignedPublicKey::from_armor_many(std::io::Cursor::new(bytes))
                .map_err(|e| bad(format!("not a readable OpenPGP public key: {e}")))?
                .0
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("not a readable OpenPGP public key: {e}")))?;
            pgp_keys(keys, &bad)
        }
        Some(t) if t.starts_with("untrusted comment:") || t.starts_with("RW") => {
            let key = if t.starts_with("RW") {
                minisign_verify::PublicKey::from_base64(t.lines().next().unwrap_or("").trim())
            } else {
                minisign_verify::PublicKey::decode(t)
            }
            .map_err(|e| bad(format!("not a readable minisign public key: {e}")))?;
            let b64 = t
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with("RW"))
                .unwrap_or("");
            Ok(vec![TrustedKey::Minisign {
                id: format!("minisign:{}", minisign_key_id(b64).unwrap_or_default()),
                key,
            }])
        }
        Some(t) if t.starts_with("ssh-") || t.starts_with("ecdsa-") || t.starts_with("sk-") => t
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let key = ssh_key::PublicKey::from_openssh(l)
                    .map_err(|e| bad(format!("not a readable SSH public key: {e}")))?;
                let id = format!("ssh:{}", key.fingerprint(ssh_key::HashAlg::Sha256));
                Ok(TrustedKey::Ssh { key, id })
            })
            .collect(),
        _ => {
            // A binary OpenPGP keyring (`gpg --export`), one or more keys.
            let as_pgp = |e: pgp::errors::Error| {
                bad(format!(
                    "not a minisign, SSH or OpenPGP public key (as OpenPGP: {e})"
                ))
            };
            let keys = SignedPublicKey::from_bytes_many(std::io::Cursor::new(bytes))
                .map_err(as_pgp)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(as_pgp)?;
            pgp_keys(keys, &bad)
        }
    }
}

fn pgp_keys(
    keys: Vec<SignedPublicKey>,
    bad: &dyn Fn(String) -> TrustError,
) -> Result<Vec<TrustedKey>, TrustError> {
    if keys.is_empty() {
        return Err(bad("holds no OpenPGP public key".into()));
    }
    keys.into_iter()
        .map(|k| {
            k.verify()
                .map_err(|e| bad(format!("OpenPGP key's self-signatures do not verify: {e}")))?;
            let id = format!("openpgp:{:X}", k.primary_key.fingerprint());
            Ok(TrustedKey::Pgp {
                key: Box::new(k),
                id,
            })
        })
        .collect()
}

/// minisign's key ID: the 8 key-number bytes after the "Ed" algorithm tag, printed as the
/// little-endian number in upper-case hex without leading zeros (as `minisign -G` and `-V`
/// print it: `%" PRIX64`), so a user can match the ID to what the tool showed.
pub(crate) fn minisign_key_id(b64: &str) -> Option<String> {
    let raw = decode_b64(b64)?;
    let num = raw.get(2..10)?;
    let mut le = [0u8; 8];
    le.copy_from_slice(num);
    Some(format!("{:X}", u64::from_le_bytes(le)))
}

/// Standard base64 (with padding), enough for key and signature lines.
pub(crate) fn decode_b64(s: &str) -> Option<Vec<u8>> {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim().bytes() {
        if c == b'=' {
            break;
        }
        let v = T.iter().position(|&t| t == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minisign_id_reads_the_key_number_little_endian() {
        // "Ed" + key number 01..08 + 32 key bytes.
        let mut raw = b"Ed".to_vec();
        raw.extend(1u8..=8);
        raw.extend([0u8; 32]);
        let b64 = encode(&raw);
        // minisign prints `%" PRIX64`: no leading zero (0x0807… is shown as 807…).
        assert_eq!(minisign_key_id(&b64).unwrap(), "807060504030201");
    }

    fn encode(b: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for ch in b.chunks(3) {
            let n = (ch[0] as u32) << 16
                | (*ch.get(1).unwrap_or(&0) as u32) << 8
                | *ch.get(2).unwrap_or(&0) as u32;
            for i in 0..=ch.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        s
    }

    #[test]
    fn garbage_is_named() {
        let e = parse(b"hello", "--trusted-key x").unwrap_err().to_string();
        assert!(e.contains("--trusted-key x"), "{e}");
    }
}
