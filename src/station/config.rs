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
pub(crate) struct StationConfig {
    /// Board name (a descriptor name); recorded in the ledger and available to templates.
    #[serde(default)]
    pub(crate) board: Option<String>,
    /// The SQLite ledger; relative paths are relative to the config file. Default: the user
    /// config's `station.ledger` (see `sbcflash config show`). Or a line's central ledger,
    /// `postgresql://user@host/db?sslmode=require`, with the local SQLite ledger (`outbox`) as
    /// its outbox.
    #[serde(default)]
    pub(crate) ledger: Option<String>,
    /// Central ledger only: the local SQLite ledger that is its outbox (default: as `ledger`
    /// would be for a station without one).
    #[serde(default)]
    pub(crate) outbox: Option<PathBuf>,
    /// Central ledger only: this station's name in the line (default: the host name).
    #[serde(default)]
    pub(crate) station_name: Option<String>,
    /// Central ledger only: serials leased per block (default 20): how many units a station
    /// can flash while the database is away.
    #[serde(default)]
    pub(crate) serial_lease: Option<u64>,
    /// Central ledger only: certificates trusted for its TLS, besides the web PKI roots.
    #[serde(default)]
    pub(crate) ledger_ca_file: Option<PathBuf>,
    /// Central ledger only: the file with the role's password (else the systemd credential
    /// `ledger-password`, else SBCFLASH_LEDGER_PASSWORD). Never in this file.
    #[serde(default)]
    pub(crate) ledger_password_file: Option<PathBuf>,
    /// Directory for one log file per slot; none if unset.
    #[serde(default)]
    pub(crate) log_dir: Option<PathBuf>,
    /// `[image]` table, or just the path as a string.
    pub(crate) image: ImageSpec,
    #[serde(default)]
    pub(crate) identity: IdentityConfig,
    #[serde(default)]
    pub(crate) ui: UiConfig,
    /// `[usb]`: how boards on `kind = "usb"` slots are flashed over their recovery protocol.
    #[serde(default)]
    pub(crate) usb: UsbConfig,
    /// Read back and compare after writing (default true; turning it off is recorded).
    #[serde(default = "yes")]
    pub(crate) verify: bool,
    /// After a PASS on a block slot whose disk is a USB card reader (removable media), eject
    /// the card (SCSI START STOP UNIT) so it can be pulled at once; the reader, and so the
    /// slot, stays. Default true.
    #[serde(default = "yes")]
    pub(crate) eject: bool,
    /// Before writing each unit, check the card for fake capacity and blocks that do not read
    /// back (`sbcflash check-card`); a card that fails is FAIL with the reason. Default false.
    #[serde(default)]
    pub(crate) check_card: bool,
    /// Refuse to start unless a trusted key signed the image, its manifest or its bmap
    /// (`[[image.trust]]`, see README "Trust"); checked before any unit is touched.
    #[serde(default)]
    pub(crate) require_signature: bool,
    /// Write only what differs from a card's current contents (`write --delta`): for
    /// re-flashing cards that already hold an earlier build. Default false.
    #[serde(default)]
    pub(crate) delta: bool,
    /// Rewrites of a range that reads back wrong before the unit fails (`write --rewrites`);
    /// each rewritten range is counted in the ledger's `retried_ranges`. Default 1.
    #[serde(default = "one_retry")]
    pub(crate) rewrites: u32,
    /// `[[slot]]` tables (`slots = [...]` also accepted).
    #[serde(rename = "slot", alias = "slots", default)]
    pub(crate) slots: Vec<SlotConfig>,
}

/// `image = "path"` or `[image] ...`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum ImageSpec {
    Path(PathBuf),
    Table(ImageConfig),
}

fn yes() -> bool {
    true
}

fn one_retry() -> u32 {
    1
}

/// Where the image comes from. Exactly one of `path`, `url` (with `blake3`) or a bare
/// `blake3` (looked up in the cache).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ImageConfig {
    #[serde(default)]
    pub(crate) path: Option<PathBuf>,
    #[serde(default)]
    pub(crate) url: Option<String>,
    /// Expected blake3 of the logical image (hex). Checked while writing every unit.
    #[serde(default)]
    pub(crate) blake3: Option<String>,
    /// A signed manifest of the image (its blake3 is then checked before any unit).
    #[serde(default)]
    pub(crate) manifest: Option<PathBuf>,
    /// The detached signature of the manifest or image (default: beside it).
    #[serde(default)]
    pub(crate) signature: Option<PathBuf>,
    /// `[[image.trust]]`: keys trusted to sign the image.
    #[serde(default)]
    pub(crate) trust: Vec<crate::trust::TrustEntry>,
}

/// How units are named and what is written into their FAT partition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IdentityConfig {
    /// Serial pattern, e.g. `OPI5-{date}-{seq:05}`; `{card_serial}` uses the device's own.
    #[serde(default = "default_serial")]
    pub(crate) serial: String,
    /// Hostname pattern; must render to a valid hostname.
    #[serde(default = "default_hostname")]
    pub(crate) hostname: String,
    /// First value of the persistent counter (only used when the ledger has none yet).
    #[serde(default = "one")]
    pub(crate) seq_start: u64,
    /// 1-based partition number of the FAT partition; default: the first FAT partition.
    #[serde(default)]
    pub(crate) fat_partition: Option<u32>,
    /// Path inside the FAT partition for a per-unit ed25519 SSH host key made by the station
    /// (OpenSSH format, `.pub` beside it), e.g. `sbcflash/ssh_host_ed25519_key`; none: no key.
    #[serde(default)]
    pub(crate) host_key: Option<String>,
    #[serde(rename = "file", default)]
    pub(crate) files: Vec<IdentityFile>,
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
            host_key: None,
            files: Vec::new(),
        }
    }
}

/// One file rendered from a template and written into the FAT partition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IdentityFile {
    /// Path inside the FAT partition (`/` separated; directories are created).
    pub(crate) path: String,
    /// Template text inline...
    #[serde(default)]
    pub(crate) template: Option<String>,
    /// ...or from a file (relative to the config file).
    #[serde(default)]
    pub(crate) template_file: Option<PathBuf>,
}

/// Operator feedback.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UiConfig {
    /// Ring the terminal bell on FAIL.
    #[serde(default)]
    pub(crate) bell: bool,
    /// Flash the terminal (reverse video for a moment) on FAIL.
    #[serde(default)]
    pub(crate) flash: bool,
}

/// Boards flashed over USB recovery (`kind = "usb"` slots).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsbConfig {
    /// Rockchip: the loader for boards that arrive in maskrom (one boot_merger file, or the
    /// raw 0x471 + 0x472 pair); relative to the config file.
    #[serde(default)]
    pub(crate) loader: Vec<PathBuf>,
    /// Rockchip storage to write: emmc, sd, spi, spinand (default emmc).
    #[serde(default = "emmc")]
    pub(crate) storage: String,
    /// Reset the board after a PASS so it boots what was written.
    #[serde(default = "yes")]
    pub(crate) reset: bool,
    /// Seconds a board may take to come back after the loader download (Rockchip), or to
    /// start its second stage and then show its storage as a block device (Raspberry Pi).
    #[serde(default = "fifteen")]
    pub(crate) reenumerate_timeout_secs: u64,
    /// Raspberry Pi (CM4/CM5 in usbboot): the rpiboot boot files served to the board, e.g.
    /// usbboot's `mass-storage-gadget64` (`<dir>/<2710|2711|2712>/<file>` first, then that
    /// path inside `<dir>/bootfiles.bin`, then `<dir>/<file>`, as rpiboot looks them up);
    /// relative to the config file.
    #[serde(default, alias = "usbboot-dir")]
    pub usbboot_dir: Option<PathBuf>,
    /// Rockchip: sectors per WRITE_LBA/READ_LBA command (rkdeveloptool's 128 by default;
    /// fewer for loaders or hubs that stall on 64 KiB transfers), as `write --via` uses.
    #[serde(default = "default_spc", alias = "sectors-per-command")]
    pub(crate) sectors_per_command: u16,
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
pub(crate) enum SlotKind {
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
pub(crate) struct SlotConfig {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) kind: SlotKind,
    #[serde(rename = "match")]
    pub(crate) match_: BTreeMap<String, String>,
    /// `[slot.boot]`: after the write, reset the unit and check that it boots.
    #[serde(default)]
    pub(crate) boot: Option<super::boot::BootConfig>,
}

/// A validated configuration: templates compiled, paths resolved, slots checked.
#[derive(Debug, Clone)]
pub struct Station {
    pub(crate) path: PathBuf,
    pub(crate) board: Option<String>,
    /// None: use the user config's default ledger. With a central ledger: its outbox.
    pub(crate) ledger: Option<PathBuf>,
    /// The line's PostgreSQL ledger, if any.
    pub(crate) central: Option<super::central::CentralConfig>,
    pub(crate) log_dir: Option<PathBuf>,
    pub(crate) image: ImageConfig,
    pub(crate) serial: Template,
    pub(crate) hostname: Template,
    pub(crate) seq_start: u64,
    pub(crate) fat_partition: Option<u32>,
    pub(crate) files: Vec<(String, Template)>,
    /// Where each unit's station-made SSH host key goes in the FAT partition.
    pub(crate) host_key: Option<String>,
    pub(crate) ui: UiConfig,
    pub usb: UsbConfig,
    pub(crate) verify: bool,
    pub(crate) eject: bool,
    pub(crate) check_card: bool,
    pub(crate) require_signature: bool,
    pub(crate) delta: bool,
    pub(crate) retries: u32,
    pub(crate) slots: Vec<SlotMatcher>,
    /// Boot acceptance per slot name (slots without `[slot.boot]` have none).
    pub(crate) boot: BTreeMap<String, super::boot::Acceptance>,
}

impl Station {
    /// The sysfs attributes any slot rule refers to.
    pub(crate) fn attr_keys(&self) -> Vec<String> {
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

    pub(crate) fn has_usb_slots(&self) -> bool {
        self.slots.iter().any(|s| s.kind == SlotKind::Usb)
    }

    /// The identity recipe.
    pub(crate) fn scheme(&self) -> super::identity::Scheme {
        super::identity::Scheme {
            serial: self.serial.clone(),
            hostname: self.hostname.clone(),
            files: self.files.clone(),
            host_key: self.host_key.clone(),
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
    pub(crate) fn parse(path: &Path, text: &str) -> Result<Self, StationError> {
        let bad = |msg: String| StationError::Config {
            path: path.display().to_string(),
            msg,
        };
        let raw: StationConfig = toml::from_str(text).map_err(|e| {
            let msg = e.to_string();
            // serde's untagged-enum message does not say what was wrong; say what is allowed.
            bad(msg.replace(
                "data did not match any variant of untagged enum ImageSpec",
                "`image` must be a path string or a table with only `path`, `url`, `blake3`, `manifest`, `signature`, `[[image.trust]]`",
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
                manifest: None,
                signature: None,
                trust: Vec::new(),
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
            manifest: img.manifest.as_deref().map(resolve),
            signature: img.signature.as_deref().map(resolve),
            trust: img
                .trust
                .iter()
                .map(|t| crate::trust::TrustEntry {
                    key_file: t.key_file.as_deref().map(resolve),
                    ..t.clone()
                })
                .collect(),
        };

        if raw.slots.is_empty() {
            return Err(bad(
                "no [[slot]] configured: the station would touch nothing".into(),
            ));
        }
        let mut slots = Vec::new();
        let mut boot = BTreeMap::new();
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
            if let Some(b) = &s.boot {
                let a = super::boot::Acceptance::new(b.clone())
                    .map_err(|e| bad(format!("slot {:?} [slot.boot]: {e}", s.name)))?;
                boot.insert(s.name.clone(), a);
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
        let plain = |p: &str| !p.is_empty() && !p.split('/').any(|c| c == ".." || c == ".");
        if let Some(k) = &id.host_key {
            if !plain(k) || k.ends_with('/') {
                return Err(bad(format!(
                    "[identity] host_key {k:?}: must be a plain relative file path"
                )));
            }
            let pubp = format!("{}.pub", k.trim_start_matches('/'));
            if let Some(f) = id.files.iter().find(|f| {
                [k.trim_start_matches('/'), pubp.as_str()].contains(&f.path.trim_start_matches('/'))
            }) {
                return Err(bad(format!(
                    "[[identity.file]] {}: is where [identity] host_key goes",
                    f.path
                )));
            }
        }
        let mut files = Vec::new();
        for f in &id.files {
            if !plain(&f.path) {
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

        let (ledger, central) = central_config(&raw, &resolve, &bad)?;
        Ok(Station {
            path: path.to_path_buf(),
            board: raw.board,
            ledger,
            central,
            log_dir: raw.log_dir.as_deref().map(resolve),
            image,
            serial,
            hostname,
            seq_start: id.seq_start,
            fat_partition: id.fat_partition,
            files,
            host_key: id
                .host_key
                .as_deref()
                .map(|k| k.trim_start_matches('/').to_string()),
            ui: raw.ui,
            usb: usb_config(&raw.usb, &resolve, &bad)?,
            verify: raw.verify,
            eject: raw.eject,
            check_card: raw.check_card,
            require_signature: raw.require_signature,
            delta: raw.delta,
            retries: raw.rewrites,
            slots,
            boot,
        })
    }
}

/// `ledger`: a SQLite path, or a PostgreSQL URL with its outbox, name, lease and secrets.
#[allow(clippy::type_complexity)]
fn central_config(
    raw: &StationConfig,
    resolve: &dyn Fn(&Path) -> PathBuf,
    bad: &dyn Fn(String) -> StationError,
) -> Result<(Option<PathBuf>, Option<super::central::CentralConfig>), StationError> {
    let url = raw.ledger.as_deref().filter(|l| super::central::is_url(l));
    let Some(url) = url else {
        let only_central = [
            ("outbox", raw.outbox.is_some()),
            ("station_name", raw.station_name.is_some()),
            ("serial_lease", raw.serial_lease.is_some()),
            ("ledger_ca_file", raw.ledger_ca_file.is_some()),
            ("ledger_password_file", raw.ledger_password_file.is_some()),
        ];
        if let Some((k, _)) = only_central.iter().find(|(_, set)| *set) {
            return Err(bad(format!(
                "`{k}` is for a central ledger (`ledger = \"postgresql://...\"`)"
            )));
        }
        return Ok((raw.ledger.as_deref().map(|l| resolve(Path::new(l))), None));
    };
    if raw.serial_lease == Some(0) {
        return Err(bad("serial_lease: must be at least 1".into()));
    }
    // Checked here so a typo or a password in the URL stops the station at start.
    super::central::Db::new(url, None, None).map_err(|e| match e {
        StationError::Central { msg, .. } => bad(format!("ledger: {msg}")),
        e => e,
    })?;
    let station = match raw.station_name.clone().or_else(super::identity::host_name) {
        Some(s) if !s.is_empty() => s,
        _ => return Err(bad("station_name: not set and the host has no name".into())),
    };
    Ok((
        raw.outbox.as_deref().map(resolve),
        Some(super::central::CentralConfig {
            url: url.to_string(),
            ca_file: raw.ledger_ca_file.as_deref().map(resolve),
            password_file: raw.ledger_password_file.as_deref().map(resolve),
            station,
            serial_lease: raw.serial_lease.unwrap_or(20),
        }),
    ))
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
    fn host_key_path_is_checked() {
        let with = |k: &str| {
            Station::parse(
                Path::new("/etc/sbcflash/station.toml"),
                &GOOD.replace(
                    "[[identity.file]]",
                    &format!("host_key = {k:?}\n[[identity.file]]"),
                ),
            )
        };
        let s = with("sbcflash/ssh_host_ed25519_key").unwrap();
        assert_eq!(s.host_key.as_deref(), Some("sbcflash/ssh_host_ed25519_key"));
        assert!(s.scheme().host_key.is_some());
        assert!(Station::parse(Path::new("/s.toml"), GOOD)
            .unwrap()
            .host_key
            .is_none());
        for bad in ["../k", "a/./k", "", "dir/"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(
                e.contains("host_key") && e.contains("/etc/sbcflash/station.toml"),
                "{e}"
            );
        }
        // an identity file in the key's place would overwrite it
        let e = with("sbcflash/identity.json").unwrap_err().to_string();
        assert!(e.contains("is where [identity] host_key goes"), "{e}");
    }

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
    fn delta_and_rewrites_default_off_and_one_and_are_read() {
        let s = Station::parse(Path::new("/x.toml"), GOOD).unwrap();
        assert!(!s.delta);
        assert_eq!(s.retries, 1);
        let t = format!("delta = true\nrewrites = 3\n{GOOD}");
        let s = Station::parse(Path::new("/x.toml"), &t).unwrap();
        assert!(s.delta);
        assert_eq!(s.retries, 3);
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
