//! `station.toml`: what the station flashes, where, and how each unit is named.
//!
//! Parsed strictly (unknown keys are errors) because a typo in a factory config must stop the
//! line before it touches a card, not silently flash the wrong thing.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::identity::Template;
use super::slots::SlotMatcher;
use super::StationError;

/// The whole station configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StationConfig {
    /// Board name (a descriptor name); recorded in the ledger and available to templates.
    #[serde(default)]
    pub board: Option<String>,
    /// The SQLite ledger; relative paths are relative to the config file. Default: the user
    /// config's `station.ledger` (see `sbcflash config show`).
    #[serde(default)]
    pub ledger: Option<PathBuf>,
    /// Directory for one log file per slot; none if unset.
    #[serde(default)]
    pub log_dir: Option<PathBuf>,
    /// `[image]` table, or just the path as a string.
    pub image: ImageSpec,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub ui: UiConfig,
    /// `[usb]`: how boards on `kind = "usb"` slots are flashed over their recovery protocol.
    #[serde(default)]
    pub usb: UsbConfig,
    /// Read back and compare after writing (default true; turning it off is recorded).
    #[serde(default = "yes")]
    pub verify: bool,
    /// After a PASS on a block slot whose disk is a USB card reader (removable media), eject
    /// the card (SCSI START STOP UNIT) so it can be pulled at once; the reader, and so the
    /// slot, stays. Default true.
    #[serde(default = "yes")]
    pub eject: bool,
    /// `[[slot]]` tables (`slots = [...]` also accepted).
    #[serde(rename = "slot", alias = "slots", default)]
    pub slots: Vec<SlotConfig>,
}

/// `image = "path"` or `[image] ...`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ImageSpec {
    Path(PathBuf),
    Table(ImageConfig),
}

fn yes() -> bool {
    true
}

/// Where the image comes from. Exactly one of `path`, `url` (with `blake3`) or a bare
/// `blake3` (looked up in the cache).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub url: Option<String>,
    /// Expected blake3 of the logical image (hex). Checked while writing every unit.
    #[serde(default)]
    pub blake3: Option<String>,
}

/// How units are named and what is written into their FAT partition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Serial pattern, e.g. `OPI5-{date}-{seq:05}`; `{card_serial}` uses the device's own.
    #[serde(default = "default_serial")]
    pub serial: String,
    /// Hostname pattern; must render to a valid hostname.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// First value of the persistent counter (only used when the ledger has none yet).
    #[serde(default = "one")]
    pub seq_start: u64,
    /// 1-based partition number of the FAT partition; default: the first FAT partition.
    #[serde(default)]
    pub fat_partition: Option<u32>,
    #[serde(rename = "file", default)]
    pub files: Vec<IdentityFile>,
}

fn default_serial() -> String {
    "UNIT-{date}-{seq:05}".into()
}
fn default_hostname() -> String {
    "{serial_lower}".into()
}
fn one() -> u64 {
    1
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            serial: default_serial(),
            hostname: default_hostname(),
            seq_start: 1,
            fat_partition: None,
            files: Vec::new(),
        }
    }
}

/// One file rendered from a template and written into the FAT partition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    /// Path inside the FAT partition (`/` separated; directories are created).
    pub path: String,
    /// Template text inline...
    #[serde(default)]
    pub template: Option<String>,
    /// ...or from a file (relative to the config file).
    #[serde(default)]
    pub template_file: Option<PathBuf>,
}

/// Operator feedback.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UiConfig {
    /// Ring the terminal bell on FAIL.
    #[serde(default)]
    pub bell: bool,
    /// Flash the terminal (reverse video for a moment) on FAIL.
    #[serde(default)]
    pub flash: bool,
}

/// Boards flashed over USB recovery (`kind = "usb"` slots).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsbConfig {
    /// Rockchip: the loader for boards that arrive in maskrom (one boot_merger file, or the
    /// raw 0x471 + 0x472 pair); relative to the config file.
    #[serde(default)]
    pub loader: Vec<PathBuf>,
    /// Rockchip storage to write: emmc, sd, spi, spinand (default emmc).
    #[serde(default = "emmc")]
    pub storage: String,
    /// Reset the board after a PASS so it boots what was written.
    #[serde(default = "yes")]
    pub reset: bool,
    /// Seconds a board may take to come back after the loader download (Rockchip), or to
    /// start its second stage and then show its storage as a block device (Raspberry Pi).
    #[serde(default = "fifteen")]
    pub reenumerate_timeout_secs: u64,
    /// Raspberry Pi (CM4/CM5 in usbboot): the rpiboot boot files served to the board, e.g.
    /// usbboot's `mass-storage-gadget64` (`<dir>/<2711|2712>/<file>` first, then
    /// `<dir>/<file>`); relative to the config file.
    #[serde(default, alias = "usbboot-dir")]
    pub usbboot_dir: Option<PathBuf>,
    /// Rockchip: sectors per WRITE_LBA/READ_LBA command (rkdeveloptool's 128 by default;
    /// fewer for loaders or hubs that stall on 64 KiB transfers), as `write --via` uses.
    #[serde(default = "default_spc", alias = "sectors-per-command")]
    pub sectors_per_command: u16,
}

fn default_spc() -> u16 {
    crate::usb::rockusb::DEFAULT_SECTORS_PER_COMMAND
}

fn emmc() -> String {
    "emmc".into()
}
fn fifteen() -> u64 {
    15
}

impl Default for UsbConfig {
    fn default() -> Self {
        Self {
            loader: Vec::new(),
            storage: emmc(),
            reset: true,
            reenumerate_timeout_secs: 15,
            usbboot_dir: None,
            sectors_per_command: default_spc(),
        }
    }
}

/// What sits in a slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotKind {
    /// A card reader / disk: udev `block` whole disks.
    #[default]
    Block,
    /// A board in a USB recovery mode: udev `usb` devices (`usb_device`), matched by port
    /// (`DEVPATH`, or `ID_PATH` where the rules set it).
    Usb,
}

/// One physical socket. `match` maps udev keys to glob patterns; all must match. Keys are
/// udev properties (`ID_PATH`), or sysfs attributes with an `attr:` prefix
/// (`attr:loop/backing_file`), so loop devices (which have no ID_PATH) can stand in for
/// card readers in tests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotConfig {
    pub name: String,
    #[serde(default)]
    pub kind: SlotKind,
    #[serde(rename = "match")]
    pub match_: BTreeMap<String, String>,
}

/// A validated configuration: templates compiled, paths resolved, slots checked.
#[derive(Debug, Clone)]
pub struct Station {
    pub path: PathBuf,
    pub board: Option<String>,
    /// None: use the user config's default ledger.
    pub ledger: Option<PathBuf>,
    pub log_dir: Option<PathBuf>,
    pub image: ImageConfig,
    pub serial: Template,
    pub hostname: Template,
    pub seq_start: u64,
    pub fat_partition: Option<u32>,
    pub files: Vec<(String, Template)>,
    pub ui: UiConfig,
    pub usb: UsbConfig,
    pub verify: bool,
    pub eject: bool,
    pub slots: Vec<SlotMatcher>,
}

impl Station {
    /// The sysfs attributes any slot rule refers to.
    pub fn attr_keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self
            .slots
            .iter()
            .flat_map(|s| s.attr_keys().map(str::to_string))
            .collect();
        if self.has_usb_slots() {
            // bcdUSB: the Rockchip maskrom/loader hint.
            k.push("version".into());
        }
        k.sort();
        k.dedup();
        k
    }

    pub fn has_usb_slots(&self) -> bool {
        self.slots.iter().any(|s| s.kind == SlotKind::Usb)
    }

    /// The identity recipe.
    pub fn scheme(&self) -> super::identity::Scheme {
        super::identity::Scheme {
            serial: self.serial.clone(),
            hostname: self.hostname.clone(),
            files: self.files.clone(),
        }
    }

    /// Reads and validates a config file; every error names the file (and the key).
    pub fn load(path: &Path) -> Result<Self, StationError> {
        let text = std::fs::read_to_string(path).map_err(|e| StationError::Config {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        // Absolute, so relative paths inside resolve against the file's real directory.
        let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        Self::parse(&path, &text)
    }

    // Longer than 150 lines on purpose: one section of the station file after another,
    // each validated where it is read so that an error names its section and key.
    pub fn parse(path: &Path, text: &str) -> Result<Self, StationError> {
        let bad = |msg: String| StationError::Config {
            path: path.display().to_string(),
            msg,
        };
        let raw: StationConfig = toml::from_str(text).map_err(|e| {
            let msg = e.to_string();
            // serde's untagged-enum message does not say what was wrong; say what is allowed.
            bad(msg.replace(
                "data did not match any variant of untagged enum ImageSpec",
                "`image` must be a path string or a table with only `path`, `url`, `blake3`",
            ))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };

        let img = match &raw.image {
            ImageSpec::Table(t) => t.clone(),
            ImageSpec::Path(p) => ImageConfig {
                path: Some(p.clone()),
                url: None,
                blake3: None,
            },
        };
        let img = &img;
        match (&img.path, &img.url, &img.blake3) {
            (Some(_), Some(_), _) => {
                return Err(bad("[image]: give either `path` or `url`, not both".into()))
            }
            (None, Some(_), None) => {
                return Err(bad(
                    "[image]: `url` needs `blake3` so every unit can be checked".into(),
                ))
            }
            (None, None, None) => {
                return Err(bad(
                    "[image]: give `path`, `url` + `blake3`, or a cached `blake3`".into(),
                ))
            }
            _ => {}
        }
        if let Some(d) = &img.blake3 {
            if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!(
                    "[image] blake3: expected 64 hex digits, got {d:?}"
                )));
            }
        }
        let image = ImageConfig {
            path: img.path.as_deref().map(resolve),
            url: img.url.clone(),
            blake3: img.blake3.as_ref().map(|s| s.to_ascii_lowercase()),
        };

        if raw.slots.is_empty() {
            return Err(bad(
                "no [[slot]] configured: the station would touch nothing".into(),
            ));
        }
        let mut slots = Vec::new();
        for (i, s) in raw.slots.iter().enumerate() {
            if s.name.is_empty()
                || !s
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            {
                return Err(bad(format!(
                    "slot {}: name {:?} must be non-empty and use only letters, digits, '-', '_', '.'",
                    i + 1,
                    s.name
                )));
            }
            if slots.iter().any(|m: &SlotMatcher| m.name == s.name) {
                return Err(bad(format!("slot name {:?} used twice", s.name)));
            }
            let m = SlotMatcher::new(&s.name, &s.match_)
                .map_err(|e| bad(format!("slot {:?}: {e}", s.name)))?
                .with_kind(s.kind);
            slots.push(m);
        }
        for (i, a) in slots.iter().enumerate() {
            for b in &slots[i + 1..] {
                if a.same_rules(b) {
                    return Err(bad(format!(
                        "slots {:?} and {:?} have the same match rules",
                        a.name, b.name
                    )));
                }
            }
        }

        let id = &raw.identity;
        let serial =
            Template::parse(&id.serial).map_err(|e| bad(format!("[identity] serial: {e}")))?;
        if serial.uses("serial") || serial.uses("serial_lower") || serial.uses("hostname") {
            return Err(bad(
                "[identity] serial: cannot refer to {serial} or {hostname}".into(),
            ));
        }
        let hostname =
            Template::parse(&id.hostname).map_err(|e| bad(format!("[identity] hostname: {e}")))?;
        if hostname.uses("hostname") {
            return Err(bad("[identity] hostname: cannot refer to itself".into()));
        }
        let mut files = Vec::new();
        for f in &id.files {
            if f.path.is_empty() || f.path.split('/').any(|c| c == ".." || c == ".") {
                return Err(bad(format!(
                    "[[identity.file]] path {:?}: must be a plain relative path",
                    f.path
                )));
            }
            let text = match (&f.template, &f.template_file) {
                (Some(t), None) => t.clone(),
                (None, Some(p)) => {
                    let p = resolve(p);
                    std::fs::read_to_string(&p).map_err(|e| {
                        bad(format!(
                            "[[identity.file]] {}: template_file {}: {e}",
                            f.path,
                            p.display()
                        ))
                    })?
                }
                _ => {
                    return Err(bad(format!(
                        "[[identity.file]] {}: give exactly one of `template`, `template_file`",
                        f.path
                    )))
                }
            };
            let t = Template::parse(&text)
                .map_err(|e| bad(format!("[[identity.file]] {}: {e}", f.path)))?;
            files.push((f.path.trim_start_matches('/').to_string(), t));
        }

        Ok(Station {
            path: path.to_path_buf(),
            board: raw.board,
            ledger: raw.ledger.as_deref().map(resolve),
            log_dir: raw.log_dir.as_deref().map(resolve),
            image,
            serial,
            hostname,
            seq_start: id.seq_start,
            fat_partition: id.fat_partition,
            files,
            ui: raw.ui,
            usb: usb_config(&raw.usb, &resolve, &bad)?,
            verify: raw.verify,
            eject: raw.eject,
            slots,
        })
    }
}

/// Resolves loader paths and checks the storage name, so a typo stops the station at start.
fn usb_config(
    u: &UsbConfig,
    resolve: &dyn Fn(&Path) -> PathBuf,
    bad: &dyn Fn(String) -> StationError,
) -> Result<UsbConfig, StationError> {
    crate::usb::flash::storage_index(&u.storage).map_err(|e| bad(format!("[usb] storage: {e}")))?;
    if u.sectors_per_command == 0 {
        return Err(bad("[usb] sectors_per_command: must be at least 1".into()));
    }
    Ok(UsbConfig {
        loader: u.loader.iter().map(|p| resolve(p)).collect(),
        usbboot_dir: u.usbboot_dir.as_deref().map(resolve),
        ..u.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
board = "orangepi-5"
ledger = "ledger.sqlite"
[image]
path = "img.raw"
[identity]
serial = "OPI5-{date}-{seq:05}"
hostname = "opi5-{seq}"
[[identity.file]]
path = "sbcflash/identity.json"
template = '{"serial": "{serial}"}'
[[slot]]
name = "s1"
match = { ID_PATH = "pci-0000:00:14.0-usb-0:1:1.0-scsi-0:0:0:0" }
[[slot]]
name = "s2"
match = { "attr:loop/backing_file" = "/tmp/*/s2.img" }
"#;

    #[test]
    fn parses_and_resolves_relative_paths() {
        let s = Station::parse(Path::new("/etc/sbcflash/station.toml"), GOOD).unwrap();
        assert_eq!(
            s.ledger.as_deref(),
            Some(Path::new("/etc/sbcflash/ledger.sqlite"))
        );
        assert_eq!(
            s.image.path.as_deref(),
            Some(Path::new("/etc/sbcflash/img.raw"))
        );
        assert_eq!(s.slots.len(), 2);
        assert_eq!(s.files[0].0, "sbcflash/identity.json");
        assert!(s.eject, "card readers eject after PASS unless turned off");
        let off = Station::parse(Path::new("/x.toml"), &format!("eject = false\n{GOOD}")).unwrap();
        assert!(!off.eject);
    }

    #[test]
    fn unknown_key_is_an_error_naming_the_file() {
        let e = Station::parse(Path::new("x.toml"), &format!("{GOOD}\nbogus = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.toml") && e.contains("bogus"), "{e}");
    }

    #[test]
    fn shipped_sample_parses() {
        let text = include_str!("../../packaging/station.toml");
        let s = Station::parse(Path::new("/etc/sbcflash/station.toml"), text).unwrap();
        assert_eq!(s.slots.len(), 4);
        assert_eq!(s.files.len(), 2);
    }

    /// The sample's commented USB section, uncommented, is a valid config (usbboot-dir
    /// resolved, Rockchip keys alongside).
    #[test]
    fn shipped_usb_example_parses_when_uncommented() {
        let text = include_str!("../../packaging/station.toml");
        let at = text.find("# [usb]").unwrap();
        let usb: String = text[at..]
            .lines()
            .map(|l| l.strip_prefix("# ").or(l.strip_prefix('#')).unwrap_or(l))
            .map(|l| format!("{l}\n"))
            .collect();
        let t = format!("image = \"/srv/i.img\"\n{usb}");
        let s = Station::parse(Path::new("/etc/sbcflash/station.toml"), &t).unwrap();
        assert_eq!(
            s.usb.usbboot_dir.as_deref(),
            Some(Path::new("/usr/share/rpiboot/mass-storage-gadget64"))
        );
        assert!(s.has_usb_slots());
    }

    #[test]
    fn short_forms_are_accepted() {
        let t = "image = \"/srv/i.img\"\nslots = [ { name = \"A\", match = { ID_PATH = \"pci-1\" } } ]\n";
        let s = Station::parse(Path::new("/x.toml"), t).unwrap();
        assert_eq!(s.image.path.as_deref(), Some(Path::new("/srv/i.img")));
        assert_eq!(s.slots[0].name, "A");
    }

    #[test]
    fn no_slots_is_refused() {
        let t = "ledger = \"l\"\n[image]\npath = \"i\"\n";
        let e = Station::parse(Path::new("x.toml"), t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no [[slot]]"), "{e}");
    }

    #[test]
    fn unknown_placeholder_is_an_error() {
        let t = GOOD.replace("opi5-{seq}", "opi5-{nope}");
        let e = Station::parse(Path::new("x.toml"), &t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hostname") && e.contains("nope"), "{e}");
    }
}
