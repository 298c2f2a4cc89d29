//! Published digests ("pins") and the hashes computed over downloaded bytes.
//!
//! Pins are of the file as published (usually compressed), not of the logical image: that is
//! what upstreams publish next to their URLs, and it can be checked before decompressing.

use super::{AcquireError, Result};
use sha2::Digest as _;
use std::io::Read;

/// A digest published for a source: what its bytes must hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pin {
    Blake3([u8; 32]),
    Sha256([u8; 32]),
}

impl Pin {
    /// Parses `blake3:HEX`, `sha256:HEX`, or bare hex with the algorithm given separately.
    #[cfg(test)] // only the unit tests use it
    pub(crate) fn parse(s: &str) -> Result<Pin> {
        let s = s.trim();
        let (algo, hex) = match s.split_once(':') {
            Some((a, h)) => (a.to_ascii_lowercase(), h),
            None => {
                return Err(AcquireError::BadDigest(format!(
                    "digest {s:?}: expected blake3:HEX or sha256:HEX"
                )))
            }
        };
        Self::from_parts(&algo, hex)
    }

    pub(crate) fn from_parts(algo: &str, hex: &str) -> Result<Pin> {
        let bytes = parse_hex32(hex).ok_or_else(|| {
            AcquireError::BadDigest(format!(
                "{algo} digest {hex:?}: expected 64 hexadecimal characters"
            ))
        })?;
        match algo {
            "blake3" | "b3" => Ok(Pin::Blake3(bytes)),
            "sha256" => Ok(Pin::Sha256(bytes)),
            other => Err(AcquireError::BadDigest(format!(
                "digest algorithm {other:?} is not supported (use blake3 or sha256)"
            ))),
        }
    }

    pub(crate) fn algo(&self) -> &'static str {
        match self {
            Pin::Blake3(_) => "blake3",
            Pin::Sha256(_) => "sha256",
        }
    }

    pub(crate) fn hex(&self) -> String {
        match self {
            Pin::Blake3(b) | Pin::Sha256(b) => hex::encode(b),
        }
    }

    /// The value the same algorithm produced over the actual bytes.
    pub(crate) fn actual_hex(&self, d: &Digests) -> String {
        match self {
            Pin::Blake3(_) => d.blake3_hex(),
            Pin::Sha256(_) => d.sha256.map(hex::encode).unwrap_or_default(),
        }
    }

    pub(crate) fn matches(&self, d: &Digests) -> bool {
        match self {
            Pin::Blake3(b) => *b == d.blake3,
            Pin::Sha256(b) => Some(*b) == d.sha256,
        }
    }

    /// The mismatch error for a downloaded file (nothing cached).
    pub(crate) fn check(&self, what: &str, d: &Digests) -> Result<()> {
        if self.matches(d) {
            return Ok(());
        }
        Err(AcquireError::Digest {
            what: what.to_string(),
            algo: self.algo(),
            expected: self.hex(),
            actual: self.actual_hex(d),
        })
    }
}

impl std::fmt::Display for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.algo(), self.hex())
    }
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let v = hex::decode(s.trim()).ok()?;
    v.try_into().ok()
}

/// Digests of one byte stream. blake3 always (it is the cache key); sha256 when a pin needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digests {
    pub(crate) blake3: [u8; 32],
    pub(crate) sha256: Option<[u8; 32]>,
    pub(crate) len: u64,
}

impl Digests {
    pub(crate) fn blake3_hex(&self) -> String {
        hex::encode(self.blake3)
    }
}

/// Incremental hashing of a stream: blake3 plus sha256 only when asked for.
pub(crate) struct Hasher {
    b3: blake3::Hasher,
    sha: Option<sha2::Sha256>,
    len: u64,
    /// Bytes not yet given to blake3, so that it only ever sees whole, aligned blocks.
    stage: Vec<u8>,
}

/// blake3 hashes many 1 KiB chunks at once (SIMD) only when its input is chunk-aligned and
/// large; network chunks need be neither (in a micro-benchmark, 16400-byte updates hashed at
/// half the speed of 64 KiB ones, 1000-byte updates at a fifth). Staging costs one memcpy of
/// the unaligned parts.
const B3_BLOCK: usize = 64 << 10;

impl Hasher {
    pub(crate) fn new(with_sha256: bool) -> Self {
        Self {
            b3: blake3::Hasher::new(),
            sha: with_sha256.then(sha2::Sha256::new),
            len: 0,
            stage: Vec::with_capacity(B3_BLOCK),
        }
    }

    fn update_b3(&mut self, mut buf: &[u8]) {
        if !self.stage.is_empty() {
            let n = (B3_BLOCK - self.stage.len()).min(buf.len());
            self.stage.extend_from_slice(&buf[..n]);
            buf = &buf[n..];
            if self.stage.len() < B3_BLOCK {
                return;
            }
            self.b3.update(&self.stage);
            self.stage.clear();
        }
        let whole = buf.len() - buf.len() % B3_BLOCK;
        if whole > 0 {
            self.b3.update(&buf[..whole]);
        }
        self.stage.extend_from_slice(&buf[whole..]);
    }

    pub(crate) fn for_pin(pin: Option<&Pin>) -> Self {
        Self::new(matches!(pin, Some(Pin::Sha256(_))))
    }

    pub(crate) fn update(&mut self, buf: &[u8]) {
        // blake3 is much faster than one stream of network bytes; multi-threading it would only
        // pay for local files, which `hash_file` handles.
        self.update_b3(buf);
        if let Some(s) = &mut self.sha {
            s.update(buf);
        }
        self.len += buf.len() as u64;
    }

    pub(crate) fn finish(mut self) -> Digests {
        self.b3.update(&self.stage);
        Digests {
            blake3: *self.b3.finalize().as_bytes(),
            sha256: self.sha.map(|s| s.finalize().into()),
            len: self.len,
        }
    }
}

/// Hashes a whole reader (a cache file, a partial download) with 1 MiB reads.
pub(crate) fn hash_reader(r: &mut dyn Read, with_sha256: bool) -> std::io::Result<Digests> {
    let mut h = Hasher::new(with_sha256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks_pins() {
        let d = {
            let mut h = Hasher::new(true);
            h.update(b"abc");
            h.finish()
        };
        // Known sha256("abc").
        let sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let p = Pin::parse(&format!("sha256:{sha}")).unwrap();
        assert!(p.matches(&d));
        let b3 = Pin::parse(&format!("blake3:{}", blake3::hash(b"abc").to_hex())).unwrap();
        assert!(b3.matches(&d));
        let wrong = Pin::parse(&format!("blake3:{}", blake3::hash(b"abd").to_hex())).unwrap();
        assert!(matches!(
            wrong.check("x", &d),
            Err(AcquireError::Digest { .. })
        ));
        assert!(Pin::parse("md5:00").is_err());
        // Staging for blake3 does not change the digest, whatever the update sizes.
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 1000) as u8).collect();
        for sizes in [
            &[1usize][..],
            &[16_400],
            &[65_536],
            &[100, 70_000, 5, 200_000],
        ] {
            let mut h = Hasher::new(false);
            let mut rest = &data[..];
            for n in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let n = (*n).min(rest.len());
                h.update(&rest[..n]);
                rest = &rest[n..];
            }
            assert_eq!(
                h.finish().blake3,
                *blake3::hash(&data).as_bytes(),
                "{sizes:?}"
            );
        }
        assert!(Pin::parse("sha256:zz").is_err());
        assert!(Pin::parse("abc").is_err());
    }
}
