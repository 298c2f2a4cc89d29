//! The image manifest: a small TOML file that names an image's digests and boards, signed
//! instead of the image so that a streamed image is checked while it is written.
//!
//! ```toml
//! format = "sbcflash-manifest-1"
//! image = "nixos-sd-image.img.zst"   # informational
//! blake3 = "…"        # of the decompressed (logical) image, as `sbcflash hash` and b3sum print it
//! sha256 = "…"        # optional, of the logical image, for other tools (not checked by sbcflash)
//! size = 4294967296   # optional, logical size in bytes (informational)
//! bmap_sha256 = "…"   # optional: sha256 of the .bmap file, checked before writing
//! boards = ["rpi4"]   # optional: the board ids it is for; another --board is refused
//! ```

use super::TrustError;
use std::path::Path;

pub(crate) const FORMAT: &str = "sbcflash-manifest-1";

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    format: String,
    #[serde(default)]
    image: Option<String>,
    blake3: String,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    bmap_sha256: Option<String>,
    #[serde(default)]
    boards: Option<Vec<String>>,
}

/// A parsed, checked manifest. `image`, `sha256` and `size` are read and checked for form
/// (the format documents them for peers such as sha256sum) but nothing here compares them.
#[derive(Debug, Clone)]
#[allow(dead_code)]
pub(crate) struct Manifest {
    pub(crate) image: Option<String>,
    pub(crate) blake3: [u8; 32],
    pub(crate) sha256: Option<[u8; 32]>,
    pub(crate) size: Option<u64>,
    pub(crate) bmap_sha256: Option<[u8; 32]>,
    pub(crate) boards: Option<Vec<String>>,
}

impl Manifest {
    pub(crate) fn load(path: &Path) -> Result<Manifest, TrustError> {
        let text = std::fs::read_to_string(path).map_err(|source| TrustError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub(crate) fn parse(text: &str, name: &str) -> Result<Manifest, TrustError> {
        let bad = |msg: String| TrustError::Manifest {
            path: name.to_string(),
            msg,
        };
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}: ")
                })
                .unwrap_or_default();
            bad(format!("{at}{}", e.message()))
        })?;
        if raw.format != FORMAT {
            return Err(bad(format!(
                "format is {:?}; this sbcflash reads {FORMAT:?}",
                raw.format
            )));
        }
        let digest = |key: &str, v: &str| -> Result<[u8; 32], TrustError> {
            let mut out = [0u8; 32];
            hex::decode_to_slice(v.trim(), &mut out)
                .map_err(|_| bad(format!("{key} is not 64 hex digits: {v:?}")))?;
            Ok(out)
        };
        Ok(Manifest {
            blake3: digest("blake3", &raw.blake3)?,
            sha256: raw
                .sha256
                .as_deref()
                .map(|v| digest("sha256", v))
                .transpose()?,
            bmap_sha256: raw
                .bmap_sha256
                .as_deref()
                .map(|v| digest("bmap_sha256", v))
                .transpose()?,
            image: raw.image,
            size: raw.size,
            boards: raw.boards,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_manifest_and_names_bad_lines() {
        let b = "ab".repeat(32);
        let m = Manifest::parse(
            &format!("format = \"{FORMAT}\"\nblake3 = \"{b}\"\nboards = [\"rpi4\"]\n"),
            "m.toml",
        )
        .unwrap();
        assert_eq!(m.blake3, [0xab; 32]);
        assert_eq!(m.boards.unwrap(), vec!["rpi4".to_string()]);
        let e = Manifest::parse(
            &format!("format = \"{FORMAT}\"\nblake3 = \"{b}\"\ncolour = 1\n"),
            "m.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("m.toml: line 3"), "{e}");
        let e = Manifest::parse(
            &format!("format = \"{FORMAT}\"\nblake3 = \"12\"\n"),
            "m.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("blake3 is not 64 hex digits"), "{e}");
    }
}
