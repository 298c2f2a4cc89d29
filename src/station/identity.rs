//! Per-unit identity: serial number, hostname and files rendered from templates.
//!
//! Templates use `{name}` or `{name:0N}` placeholders. A `{` that is not followed by a known
//! placeholder name and `}` is literal text, so JSON and shell snippets can be written as they
//! are (`{{` also gives a literal `{`). Unknown names are rejected when the config loads.
//! The sequence number comes from the ledger's counter, allocated in the same transaction as
//! the unit's row, so it is never handed out twice, even across crashes.

use std::collections::BTreeMap;
use std::fmt;

/// Names a template may use, with what they stand for (shown in errors).
pub(crate) const PLACEHOLDERS: &[(&str, &str)] = &[
    ("seq", "the persistent counter (use {seq:05} to zero-pad)"),
    ("date", "today, YYYYMMDD (UTC)"),
    ("time", "now, HHMMSS (UTC)"),
    ("year", "the year, YYYY"),
    ("slot", "the slot name"),
    ("board", "the configured board"),
    (
        "card_serial",
        "the device's own serial (udev ID_SERIAL_SHORT / ID_SERIAL)",
    ),
    ("id_path", "the udev ID_PATH of the device"),
    ("serial", "the unit serial"),
    ("serial_lower", "the unit serial, lower case"),
    ("hostname", "the unit hostname"),
    ("image_blake3", "blake3 of the image"),
    ("station", "this station's host name"),
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    Var { name: String, width: usize },
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    pieces: Vec<Piece>,
}

impl Template {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut rest = s;
        while let Some(i) = rest.find('{') {
            lit.push_str(&rest[..i]);
            rest = &rest[i..];
            if let Some(r) = rest.strip_prefix("{{") {
                lit.push('{');
                rest = r;
                continue;
            }
            // A placeholder is `{ident}` or `{ident:0N}`; anything else is literal.
            let close = rest.find('}');
            let inner = close.map(|c| &rest[1..c]);
            let parsed = inner.and_then(|inner| {
                let (name, fmt) = match inner.split_once(':') {
                    Some((n, f)) => (n, Some(f)),
                    None => (inner, None),
                };
                let ident = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
                    && name.as_bytes()[0].is_ascii_lowercase();
                ident.then_some((name, fmt))
            });
            match (parsed, close) {
                (Some((name, fmt)), Some(c)) => {
                    if !PLACEHOLDERS.iter().any(|(n, _)| *n == name) {
                        let known: Vec<_> = PLACEHOLDERS.iter().map(|(n, _)| *n).collect();
                        return Err(format!(
                            "unknown placeholder {{{name}}} (known: {})",
                            known.join(", ")
                        ));
                    }
                    let width = match fmt {
                        None => 0,
                        Some(f) => {
                            let digits = f.strip_prefix('0').unwrap_or(f);
                            digits
                                .parse::<usize>()
                                .ok()
                                .filter(|w| *w <= 32)
                                .ok_or_else(|| {
                                    format!(
                                        "placeholder {{{name}:{f}}}: format must be 0N, e.g. :05"
                                    )
                                })?
                        }
                    };
                    if !lit.is_empty() {
                        pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                    }
                    pieces.push(Piece::Var {
                        name: name.to_string(),
                        width,
                    });
                    rest = &rest[c + 1..];
                }
                _ => {
                    lit.push('{');
                    rest = &rest[1..];
                }
            }
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            pieces.push(Piece::Lit(lit));
        }
        Ok(Template { pieces })
    }

    /// Whether the template refers to `name`.
    pub(crate) fn uses(&self, name: &str) -> bool {
        self.pieces
            .iter()
            .any(|p| matches!(p, Piece::Var { name: n, .. } if n == name))
    }

    /// Renders with `vars`; a placeholder without a value is an error naming it.
    pub(crate) fn render(&self, vars: &BTreeMap<&str, String>) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Lit(s) => out.push_str(s),
                Piece::Var { name, width } => {
                    let v = vars
                        .get(name.as_str())
                        .filter(|v| !v.is_empty())
                        .ok_or_else(|| format!("no value for {{{name}}} for this unit"))?;
                    if *width > v.len() {
                        // Zero-pad numbers, space-pad anything else.
                        let pad = if v.bytes().all(|b| b.is_ascii_digit()) {
                            '0'
                        } else {
                            ' '
                        };
                        out.extend(std::iter::repeat_n(pad, width - v.len()));
                    }
                    out.push_str(v);
                }
            }
        }
        Ok(out)
    }
}

/// What the station knows about a unit before its identity exists.
#[derive(Debug, Clone, Default)]
pub(crate) struct UnitFacts {
    pub(crate) slot: String,
    pub(crate) board: Option<String>,
    pub(crate) card_serial: Option<String>,
    pub(crate) id_path: Option<String>,
    pub(crate) image_blake3: Option<String>,
    pub(crate) now: chrono::DateTime<chrono::Utc>,
}

/// A unit's identity, as recorded in the ledger and written to its FAT partition.
#[derive(Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Identity {
    pub(crate) serial: String,
    pub(crate) hostname: String,
    pub(crate) seq: Option<u64>,
    /// The public half of the unit's station-made SSH host key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) host_key: Option<UnitHostKey>,
    /// (path inside the FAT partition, contents); may hold a private host key, so it is
    /// never serialized and its Debug shows paths and sizes only.
    #[serde(skip)]
    pub(crate) files: Vec<(String, Vec<u8>)>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("serial", &self.serial)
            .field("hostname", &self.hostname)
            .field("seq", &self.seq)
            .field("host_key", &self.host_key)
            .field(
                "files",
                &self
                    .files
                    .iter()
                    .map(|(p, b)| format!("{p} ({} bytes)", b.len()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A station-made host key as the ledger records it: never the private half.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UnitHostKey {
    /// `ssh-ed25519 BASE64` (no comment).
    pub public: String,
    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
}

/// Makes an ed25519 host key in-process (no `ssh-keygen` per unit): the private key in
/// OpenSSH format (what sshd and `dropbearconvert` read) and the public line, both with
/// `comment`.
pub fn make_host_key(comment: &str) -> Result<(UnitHostKey, Vec<u8>, String), String> {
    use ssh_key::{rand_core::OsRng, Algorithm, HashAlg, LineEnding, PrivateKey};
    let mut k =
        PrivateKey::random(&mut OsRng, Algorithm::Ed25519).map_err(|e| format!("host key: {e}"))?;
    k.set_comment(comment);
    let private = k
        .to_openssh(LineEnding::LF)
        .map_err(|e| format!("host key: {e}"))?;
    let public = k.public_key();
    let line = public.to_openssh().map_err(|e| format!("host key: {e}"))?;
    let bare = line
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    Ok((
        UnitHostKey {
            public: bare,
            fingerprint: public.fingerprint(HashAlg::Sha256).to_string(),
        },
        private.as_bytes().to_vec(),
        format!("{line}\n"),
    ))
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.serial, self.hostname)
    }
}

/// The recipe for identities: the config's templates.
#[derive(Debug, Clone)]
pub(crate) struct Scheme {
    pub(crate) serial: Template,
    pub(crate) hostname: Template,
    pub(crate) files: Vec<(String, Template)>,
    /// FAT path of a per-unit SSH host key ([`make_host_key`]), if the station makes them.
    pub(crate) host_key: Option<String>,
}

impl Scheme {
    /// Whether a counter value must be allocated for each unit.
    pub(crate) fn needs_seq(&self) -> bool {
        self.serial.uses("seq")
            || self.hostname.uses("seq")
            || self.files.iter().any(|(_, t)| t.uses("seq"))
    }

    /// Derives a unit's identity from the facts and (if the scheme uses it) `seq`.
    pub(crate) fn derive(&self, facts: &UnitFacts, seq: Option<u64>) -> Result<Identity, String> {
        let mut vars: BTreeMap<&str, String> = BTreeMap::new();
        if let Some(s) = seq {
            vars.insert("seq", s.to_string());
        }
        vars.insert("date", facts.now.format("%Y%m%d").to_string());
        vars.insert("time", facts.now.format("%H%M%S").to_string());
        vars.insert("year", facts.now.format("%Y").to_string());
        vars.insert("slot", facts.slot.clone());
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        vars.insert("board", opt(&facts.board));
        vars.insert("card_serial", opt(&facts.card_serial));
        vars.insert("id_path", opt(&facts.id_path));
        vars.insert("image_blake3", opt(&facts.image_blake3));
        vars.insert("station", host_name().unwrap_or_default());
        let serial = self
            .serial
            .render(&vars)
            .map_err(|e| format!("serial: {e}"))?;
        check_serial(&serial)?;
        vars.insert("serial_lower", serial.to_ascii_lowercase());
        vars.insert("serial", serial.clone());
        let hostname = self
            .hostname
            .render(&vars)
            .map_err(|e| format!("hostname: {e}"))?;
        check_hostname(&hostname)?;
        vars.insert("hostname", hostname.clone());
        let mut files = Vec::new();
        for (path, t) in &self.files {
            let body = t.render(&vars).map_err(|e| format!("file {path}: {e}"))?;
            files.push((path.clone(), body.into_bytes()));
        }
        let host_key = match &self.host_key {
            Some(path) => {
                let (k, private, public) = make_host_key(&format!("root@{hostname}"))?;
                files.push((path.clone(), private));
                files.push((format!("{path}.pub"), public.into_bytes()));
                Some(k)
            }
            None => None,
        };
        Ok(Identity {
            serial,
            hostname,
            seq,
            host_key,
            files,
        })
    }
}

/// This machine's host name (the kernel's UTS name).
pub(crate) fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn check_serial(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "serial {s:?} must be 1-64 printable characters without spaces"
        ));
    }
    Ok(())
}

/// RFC 1123 host label: what a NixOS `networking.hostName` accepts.
fn check_hostname(h: &str) -> Result<(), String> {
    let ok = !h.is_empty()
        && h.len() <= 63
        && h.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !h.starts_with('-')
        && !h.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "hostname {h:?} is not a valid host name (1-63 of a-z, 0-9, '-', not at the ends); use {{serial_lower}}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> UnitFacts {
        UnitFacts {
            slot: "s1".into(),
            board: Some("orangepi-5".into()),
            now: chrono::DateTime::parse_from_rfc3339("2026-11-22T01:02:03Z")
                .unwrap()
                .into(),
            ..Default::default()
        }
    }

    #[test]
    fn serial_pattern_with_padding() {
        let s = Scheme {
            serial: Template::parse("OPI5-{date}-{seq:05}").unwrap(),
            hostname: Template::parse("{serial_lower}").unwrap(),
            files: vec![],
            host_key: None,
        };
        assert!(s.needs_seq());
        let id = s.derive(&facts(), Some(42)).unwrap();
        assert_eq!(id.serial, "OPI5-20261122-00042");
        assert_eq!(id.hostname, "opi5-20261122-00042");
    }

    #[test]
    fn json_braces_are_literal() {
        let t = Template::parse(r#"{"serial": "{serial}", "n": {seq}}"#).unwrap();
        let mut v = BTreeMap::new();
        v.insert("serial", "A-1".to_string());
        v.insert("seq", "7".to_string());
        assert_eq!(t.render(&v).unwrap(), r#"{"serial": "A-1", "n": 7}"#);
        let t = Template::parse("a {{serial} b").unwrap();
        assert_eq!(t.render(&v).unwrap(), "a {serial} b");
    }

    #[test]
    fn unknown_and_missing_values_are_errors() {
        assert!(Template::parse("{sreial}").unwrap_err().contains("sreial"));
        assert!(Template::parse("{seq:x}").is_err());
        let s = Scheme {
            serial: Template::parse("{card_serial}").unwrap(),
            hostname: Template::parse("{serial_lower}").unwrap(),
            files: vec![],
            host_key: None,
        };
        assert!(s
            .derive(&facts(), None)
            .unwrap_err()
            .contains("card_serial"));
    }

    #[test]
    fn host_keys_are_per_unit_and_the_private_half_stays_in_the_files() {
        let s = Scheme {
            serial: Template::parse("U{seq}").unwrap(),
            hostname: Template::parse("{serial_lower}").unwrap(),
            files: vec![],
            host_key: Some("sbcflash/ssh_host_ed25519_key".into()),
        };
        let a = s.derive(&facts(), Some(1)).unwrap();
        let b = s.derive(&facts(), Some(2)).unwrap();
        let (ka, kb) = (a.host_key.clone().unwrap(), b.host_key.clone().unwrap());
        assert_ne!(ka, kb);
        assert!(ka.public.starts_with("ssh-ed25519 AAAA") && ka.fingerprint.starts_with("SHA256:"));
        let private = String::from_utf8(a.files[0].1.clone()).unwrap();
        assert_eq!(a.files[0].0, "sbcflash/ssh_host_ed25519_key");
        assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
        // the private key parses back to the recorded public key
        let back = ssh_key::PrivateKey::from_openssh(&private).unwrap();
        assert_eq!(
            back.public_key().to_openssh().unwrap(),
            format!("{} root@u1", ka.public)
        );
        assert_eq!(
            a.files[1].1,
            format!("{} root@u1\n", ka.public).into_bytes()
        );
        // neither the ledger's JSON nor Debug carries it
        let body: String = private
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let json = serde_json::to_string(&a).unwrap();
        let dbg = format!("{a:?}");
        for l in private.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!json.contains(l) && !dbg.contains(l), "{l}");
        }
        assert!(!body.is_empty() && json.contains(&ka.public));
    }

    #[test]
    fn bad_hostname_is_refused() {
        let s = Scheme {
            serial: Template::parse("OPI5_{seq}").unwrap(),
            hostname: Template::parse("{serial}").unwrap(),
            files: vec![],
            host_key: None,
        };
        assert!(s
            .derive(&facts(), Some(1))
            .unwrap_err()
            .contains("host name"));
    }
}
