//! The board registry: shipped descriptors (embedded at build time) plus user directories,
//! later layers overriding earlier ones by id.
//!
//! Layers, lowest precedence first: built-in `boards/`, `$XDG_CONFIG_HOME/sbcflash/boards`
//! (`~/.config/...`), then each `--boards-dir` in order. In every layer `*.toml` are boards and
//! `soc/*.toml` are SoCs; files whose name starts with `_` (the template) are not loaded.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::error::{BoardError, Location};
use super::schema::*;
use super::spans::Spans;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded_boards.rs"));
}

/// The shipped descriptor files as (path relative to the crate root, contents).
pub fn embedded_files() -> &'static [(&'static str, &'static str)] {
    embedded::EMBEDDED
}

/// Where a descriptor came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "path", rename_all = "kebab-case")]
pub enum Origin {
    /// Embedded in the binary; the path is relative to the source tree (`boards/opi5.toml`).
    Builtin(String),
    /// A user file.
    File(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Builtin(p) => write!(f, "built-in {p}"),
            Origin::File(p) => write!(f, "{}", p.display()),
        }
    }
}

impl Origin {
    /// Name used in error locations.
    fn file_name(&self) -> String {
        match self {
            Origin::Builtin(p) => p.clone(),
            Origin::File(p) => p.display().to_string(),
        }
    }
}

/// A SoC descriptor and where it came from.
#[derive(Debug, Clone, Serialize)]
pub struct Soc {
    #[serde(flatten)]
    pub(crate) desc: SocDesc,
    pub(crate) origin: Origin,
}

/// A resolved board: its descriptor, its SoC's facts, and provenance.
#[derive(Debug, Clone, Serialize)]
pub struct Board {
    #[serde(flatten)]
    pub desc: BoardDesc,
    /// The SoC this board references (facts shared by all its boards).
    #[serde(rename = "soc_facts")]
    pub soc: SocDesc,
    /// The file that won.
    pub origin: Origin,
    /// Files with the same id that this one overrode (lower layers), most recent first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<Origin>,
}

impl Board {
    pub fn id(&self) -> &str {
        &self.desc.id
    }
    pub fn name(&self) -> &str {
        &self.desc.name
    }
    pub fn console(&self) -> &Console {
        &self.desc.console
    }
    pub fn uboot(&self) -> Option<&UBoot> {
        self.desc.uboot.as_ref()
    }
    /// The SoC's USB (or UART) recovery identity: protocol, VID/PID, interface, RC4.
    pub fn usb_recovery(&self) -> Option<&SocUsb> {
        self.soc.usb.as_ref()
    }
    /// Board-specific recovery steps and loader files.
    pub(crate) fn recovery(&self) -> Option<&Recovery> {
        self.desc.recovery.as_ref()
    }
    pub(crate) fn handoff(&self) -> &Handoff {
        &self.desc.handoff
    }

    /// The medium `--board X` writes an OS image to when none is named: the one marked
    /// `default`, else the first that can hold an OS.
    pub fn default_medium(&self) -> &Medium {
        self.desc
            .storage
            .iter()
            .find(|m| m.default)
            .or_else(|| {
                self.desc
                    .storage
                    .iter()
                    .find(|m| m.boot != BootSource::BootloaderOnly)
            })
            .unwrap_or(&self.desc.storage[0])
    }

    /// The medium of this kind, or an error listing the board's media.
    pub fn medium(&self, kind: MediumKind) -> Result<&Medium, BoardError> {
        self.desc
            .storage
            .iter()
            .find(|m| m.kind == kind)
            .ok_or_else(|| BoardError::UnknownMedium {
                board: self.desc.id.clone(),
                medium: kind.to_string(),
                available: self
                    .desc
                    .storage
                    .iter()
                    .map(|m| m.kind.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The on-board flash that can hold U-Boot (SPI NOR/NAND or eMMC used as bootloader-only).
    pub(crate) fn bootloader_flash(&self) -> Option<&Medium> {
        self.desc
            .storage
            .iter()
            .find(|m| m.boot == BootSource::BootloaderOnly)
    }

    /// The boot-ROM layout that applies to `medium`: its own override, else the SoC's block
    /// layout for SD/eMMC or its SPI layout for SPI flash.
    pub fn layout<'a>(&'a self, medium: &'a Medium) -> Option<&'a Layout> {
        if let Some(l) = &medium.layout {
            return Some(l);
        }
        if medium.kind.is_block_boot() {
            self.soc.block.as_ref()
        } else if medium.kind.is_spi() {
            self.soc.spi.as_ref()
        } else {
            None
        }
    }
}

/// All known boards and SoCs after applying the layers.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    boards: Vec<Board>,
}

/// One descriptor file's text and origin, before parsing.
struct Input {
    origin: Origin,
    text: String,
    is_soc: bool,
}

impl Registry {
    /// Only the descriptors embedded in the binary.
    pub fn builtin() -> Result<Registry, BoardError> {
        Self::from_layers(vec![builtin_layer()])
    }

    /// Built-in descriptors, overridden by each directory in `dirs` in order (no XDG dir).
    pub fn with_dirs(dirs: &[PathBuf]) -> Result<Registry, BoardError> {
        let mut layers = vec![builtin_layer()];
        for d in dirs {
            layers.push(dir_layer(d, true)?);
        }
        Self::from_layers(layers)
    }

    /// What the CLI uses: built-in, then the user's config dir (if it exists), then `extra`
    /// (`--boards-dir`, which must exist).
    pub(crate) fn load(extra: &[PathBuf]) -> Result<Registry, BoardError> {
        let mut layers = vec![builtin_layer()];
        if let Some(u) = user_dir() {
            layers.push(dir_layer(&u, false)?);
        }
        for d in extra {
            layers.push(dir_layer(d, true)?);
        }
        Self::from_layers(layers)
    }

    /// All boards, sorted by id.
    pub fn boards(&self) -> &[Board] {
        &self.boards
    }

    /// Find a board by id or alias (case-insensitive); an unknown name gets suggestions.
    pub fn get(&self, name: &str) -> Result<&Board, BoardError> {
        let want = name.to_ascii_lowercase();
        if let Some(b) = self
            .boards
            .iter()
            .find(|b| b.desc.id == want || b.desc.aliases.contains(&want))
        {
            return Ok(b);
        }
        Err(BoardError::UnknownBoard {
            id: name.to_string(),
            suggestions: self.suggest(&want),
        })
    }

    /// Up to three ids/aliases closest to `name` (Jaro-Winkler, plus substring matches), each
    /// formatted for a message: "`opi5`" or "`orangepi-5` (alias of `opi5`)".
    pub(crate) fn suggest(&self, name: &str) -> Vec<String> {
        let mut scored: Vec<(f64, String)> = Vec::new();
        for b in &self.boards {
            let mut best: Option<(f64, &str)> = None;
            for cand in std::iter::once(&b.desc.id).chain(b.desc.aliases.iter()) {
                let mut s = strsim::jaro_winkler(name, cand);
                if cand.contains(name) || name.contains(cand.as_str()) {
                    s = s.max(0.9);
                }
                if best.is_none_or(|(bs, _)| s > bs) {
                    best = Some((s, cand));
                }
            }
            if let Some((s, cand)) = best {
                if s >= 0.75 {
                    let label = if cand == b.desc.id {
                        format!("`{cand}`")
                    } else {
                        format!("`{cand}` (alias of `{}`)", b.desc.id)
                    };
                    scored.push((s, label));
                }
            }
        }
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        scored.into_iter().take(3).map(|(_, s)| s).collect()
    }

    fn from_layers(layers: Vec<Vec<Input>>) -> Result<Registry, BoardError> {
        // SoCs first: boards of any layer may reference a SoC of any layer.
        let mut socs: BTreeMap<String, Soc> = BTreeMap::new();
        for layer in &layers {
            let mut seen: BTreeMap<String, Origin> = BTreeMap::new();
            for inp in layer.iter().filter(|i| i.is_soc) {
                let desc = parse_soc(&inp.origin, &inp.text)?;
                if let Some(prev) = seen.insert(desc.id.clone(), inp.origin.clone()) {
                    return Err(located(
                        &inp.origin,
                        &inp.text,
                        "id",
                        format!("duplicate SoC id `{}` (also in {prev})", desc.id),
                    ));
                }
                socs.insert(
                    desc.id.clone(),
                    Soc {
                        desc,
                        origin: inp.origin.clone(),
                    },
                );
            }
        }

        // Boards: a later layer replaces an earlier one with the same id.
        let mut boards: BTreeMap<String, (Board, String, usize)> = BTreeMap::new();
        for (layer_no, layer) in layers.iter().enumerate() {
            let mut seen: BTreeMap<String, Origin> = BTreeMap::new();
            for inp in layer.iter().filter(|i| !i.is_soc) {
                let desc = parse_board(&inp.origin, &inp.text)?;
                if let Some(prev) = seen.insert(desc.id.clone(), inp.origin.clone()) {
                    return Err(located(
                        &inp.origin,
                        &inp.text,
                        "id",
                        format!(
                            "duplicate board id `{}` (also in {prev}; one directory may define an id once)",
                            desc.id
                        ),
                    ));
                }
                let Some(soc) = socs.get(&desc.soc) else {
                    let known: Vec<&str> = socs.keys().map(String::as_str).collect();
                    return Err(located(
                        &inp.origin,
                        &inp.text,
                        "soc",
                        format!(
                            "unknown SoC `{}`: expected one of {}",
                            desc.soc,
                            known.join(", ")
                        ),
                    ));
                };
                if soc.desc.arch != desc.arch {
                    return Err(located(
                        &inp.origin,
                        &inp.text,
                        "arch",
                        format!(
                            "arch `{}` contradicts SoC `{}` ({}, in {})",
                            desc.arch, soc.desc.id, soc.desc.arch, soc.origin
                        ),
                    ));
                }
                let mut overrides = Vec::new();
                if let Some((old, _, _)) = boards.remove(&desc.id) {
                    overrides.push(old.origin);
                    overrides.extend(old.overrides);
                }
                let board = Board {
                    soc: soc.desc.clone(),
                    desc,
                    origin: inp.origin.clone(),
                    overrides,
                };
                boards.insert(board.desc.id.clone(), (board, inp.text.clone(), layer_no));
            }
        }

        // Ids and aliases must be unique across the final set. Lower layers claim names first,
        // so a clash is reported in the user's file, not in the shipped one.
        let mut names: BTreeMap<String, String> = BTreeMap::new();
        for id in boards.keys() {
            names.insert(id.clone(), id.clone());
        }
        let mut order: Vec<(&String, &(Board, String, usize))> = boards.iter().collect();
        order.sort_by_key(|(id, (_, _, layer))| (*layer, (*id).clone()));
        for (id, (b, text, _)) in order {
            for (i, a) in b.desc.aliases.iter().enumerate() {
                if let Some(owner) = names.get(a) {
                    let what = if owner == a { "the id" } else { "an alias" };
                    let other = boards
                        .get(owner)
                        .map(|(o, _, _)| o.origin.to_string())
                        .unwrap_or_default();
                    return Err(located(
                        &b.origin,
                        text,
                        &format!("aliases.{i}"),
                        format!(
                            "alias `{a}` of board `{id}` is already {what} of board `{owner}` ({other})"
                        ),
                    ));
                }
                names.insert(a.clone(), id.clone());
            }
        }

        for (b, text, _) in boards.values() {
            if let Some(v) = &b.desc.variant_of {
                if !boards.contains_key(v) {
                    return Err(located(
                        &b.origin,
                        text,
                        "variant_of",
                        format!("`variant_of = \"{v}\"`: no board with that id"),
                    ));
                }
            }
        }

        Ok(Registry {
            boards: boards.into_values().map(|(b, _, _)| b).collect(),
        })
    }
}

/// `$XDG_CONFIG_HOME/sbcflash/boards` (or the platform config dir).
pub(crate) fn user_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(dirs::config_dir)
        .map(|c| c.join("sbcflash").join("boards"))
}

fn is_template(name: &str) -> bool {
    name.rsplit('/').next().is_some_and(|f| f.starts_with('_'))
}

fn builtin_layer() -> Vec<Input> {
    embedded_files()
        .iter()
        .filter(|(p, _)| !is_template(p))
        .map(|(p, t)| Input {
            origin: Origin::Builtin(p.to_string()),
            text: t.to_string(),
            is_soc: p.starts_with("boards/soc/"),
        })
        .collect()
}

fn read_toml_files(dir: &Path, is_soc: bool, out: &mut Vec<Input>) -> Result<(), BoardError> {
    let io = |source| BoardError::Io {
        path: dir.display().to_string(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "toml"))
        .filter(|p| !is_template(&p.file_name().unwrap_or_default().to_string_lossy()))
        .collect();
    paths.sort();
    for p in paths {
        let text = std::fs::read_to_string(&p).map_err(|source| BoardError::Io {
            path: p.display().to_string(),
            source,
        })?;
        out.push(Input {
            origin: Origin::File(p),
            text,
            is_soc,
        });
    }
    Ok(())
}

fn dir_layer(dir: &Path, must_exist: bool) -> Result<Vec<Input>, BoardError> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        if must_exist {
            return Err(BoardError::Io {
                path: dir.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "boards directory does not exist",
                ),
            });
        }
        return Ok(out);
    }
    read_toml_files(dir, false, &mut out)?;
    let soc = dir.join("soc");
    if soc.is_dir() {
        read_toml_files(&soc, true, &mut out)?;
    }
    Ok(out)
}

/// Error at the key named by a dotted path.
fn located(origin: &Origin, text: &str, path: &str, msg: String) -> BoardError {
    let at = Spans::new(text).locate(path).unwrap_or(0);
    BoardError::Descriptor {
        loc: Location::at(&origin.file_name(), text, at),
        msg,
    }
}

/// A serde/toml error with its span turned into file:line:col and the key path named.
fn de_error(origin: &Origin, text: &str, e: toml::de::Error) -> BoardError {
    let at = e.span().map(|s| s.start).unwrap_or(0);
    let key = e
        .span()
        .and_then(|s| Spans::new(text).path_at(s.start))
        .map(|p| format!("`{p}`: "))
        .unwrap_or_default();
    BoardError::Descriptor {
        loc: Location::at(&origin.file_name(), text, at),
        msg: format!("{key}{}", e.message().trim_end()),
    }
}

/// `schema = 1` is checked before anything else so a newer file gets a clear message.
fn check_schema(origin: &Origin, text: &str) -> Result<(), BoardError> {
    #[derive(serde::Deserialize)]
    struct Head {
        schema: Option<toml::Value>,
    }
    let head: Head = toml::from_str(text).map_err(|e| de_error(origin, text, e))?;
    match head.schema {
        Some(toml::Value::Integer(v)) if v == i64::from(SCHEMA_VERSION) => Ok(()),
        Some(v) => Err(located(
            origin,
            text,
            "schema",
            format!("unsupported `schema = {v}`: this build reads `schema = {SCHEMA_VERSION}`"),
        )),
        None => Err(BoardError::Descriptor {
            loc: Location::at(&origin.file_name(), text, 0),
            msg: format!("missing key `schema`: expected `schema = {SCHEMA_VERSION}` at the top"),
        }),
    }
}

/// Parse and validate one SoC descriptor.
pub fn parse_soc(origin: &Origin, text: &str) -> Result<SocDesc, BoardError> {
    check_schema(origin, text)?;
    let d: SocDesc = toml::from_str(text).map_err(|e| de_error(origin, text, e))?;
    let err = |path: &str, msg: String| located(origin, text, path, msg);
    check_id(&d.id).map_err(|m| err("id", m))?;
    for (name, l) in [("block", &d.block), ("spi", &d.spi)] {
        if let Some(l) = l {
            check_layout(l, name).map_err(|(p, m)| err(&p, m))?;
        }
    }
    if let Some(u) = &d.usb {
        for (i, f) in u.stage_files.iter().enumerate() {
            check_file_name(f).map_err(|m| err(&format!("usb.stage_files.{i}"), m))?;
        }
        let needs_ids = u.protocol != RecoveryProtocol::UartXmodem;
        if needs_ids && (u.vid.is_none() || u.pid.is_none()) {
            return Err(err(
                "usb",
                format!(
                    "`usb.vid` and `usb.pid` are required for protocol `{}`",
                    u.protocol
                ),
            ));
        }
    }
    Ok(d)
}

/// Parse and validate one board descriptor (cross-file checks happen in the registry).
pub fn parse_board(origin: &Origin, text: &str) -> Result<BoardDesc, BoardError> {
    check_schema(origin, text)?;
    let d: BoardDesc = toml::from_str(text).map_err(|e| de_error(origin, text, e))?;
    let err = |path: &str, msg: String| located(origin, text, path, msg);
    check_id(&d.id).map_err(|m| err("id", m))?;
    for (i, a) in d.aliases.iter().enumerate() {
        check_id(a).map_err(|m| err(&format!("aliases.{i}"), m))?;
        if *a == d.id {
            return Err(err(
                &format!("aliases.{i}"),
                format!("alias `{a}` repeats the board's own id"),
            ));
        }
        if d.aliases[..i].contains(a) {
            return Err(err(
                &format!("aliases.{i}"),
                format!("duplicate alias `{a}`"),
            ));
        }
    }
    if d.storage.is_empty() {
        return Err(err(
            "storage",
            "expected at least one `[[storage]]` medium".into(),
        ));
    }
    let defaults: Vec<usize> = (0..d.storage.len())
        .filter(|&i| d.storage[i].default)
        .collect();
    if defaults.len() > 1 {
        return Err(err(
            &format!("storage.{}.default", defaults[1]),
            "only one medium may be `default = true`".into(),
        ));
    }
    for (i, m) in d.storage.iter().enumerate() {
        if let Some(l) = &m.layout {
            check_layout(l, &format!("storage.{i}.layout")).map_err(|(p, m)| err(&p, m))?;
        }
        if m.default && m.boot == BootSource::BootloaderOnly {
            return Err(err(
                &format!("storage.{i}.default"),
                "a `boot = \"bootloader-only\"` medium cannot be the default OS medium".into(),
            ));
        }
    }
    if let Some(r) = &d.recovery {
        for (i, l) in r.loaders.iter().enumerate() {
            check_file_name(&l.file).map_err(|m| err(&format!("recovery.loaders.{i}.file"), m))?;
        }
    }
    if d.console.baud == 0 {
        return Err(err("console.baud", "expected a baud rate > 0".into()));
    }
    if let Some(u) = &d.uboot {
        if u.prompts.is_empty() {
            return Err(err(
                "uboot.prompts",
                "expected at least one prompt string".into(),
            ));
        }
        if u.interrupt.is_empty() {
            return Err(err(
                "uboot.interrupt",
                "expected at least one way to interrupt autoboot".into(),
            ));
        }
    }
    for (i, s) in d.images.iter().enumerate() {
        match (&s.url, &s.flake) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(err(
                    &format!("image.{i}"),
                    "expected exactly one of `url` or `flake`".into(),
                ))
            }
            _ => {}
        }
        if s.url.is_some() && s.attr.is_some() {
            return Err(err(
                &format!("image.{i}.attr"),
                "`attr` only applies to `flake` sources".into(),
            ));
        }
    }
    if !d.handoff.flake_attr.contains("<host>") {
        return Err(err(
            "handoff.flake_attr",
            "expected a template containing `<host>`".into(),
        ));
    }
    Ok(d)
}

/// File names in descriptors are matched against, or looked up in, directories the user
/// chose (`--bootloader`, `--loader-dir`, what a USB boot ROM asks for): a name must stay a
/// plain name, never a path that escapes the directory (hostile or careless user descriptors).
/// A directory is named with one trailing `/` (`mass-storage-gadget64/`).
fn check_file_name(full: &str) -> Result<(), String> {
    let name = full.strip_suffix('/').unwrap_or(full);
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.contains(['/', '\\'])
        || name.chars().any(char::is_control);
    if bad {
        Err(format!(
            "invalid file name {full:?}: expected a plain file or directory name (no `/` inside, no `..`, no control characters)"
        ))
    } else {
        Ok(())
    }
}

fn check_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !id.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid id `{id}`: expected lowercase letters, digits and `-`"
        ))
    }
}

fn check_layout(l: &Layout, path: &str) -> Result<(), (String, String)> {
    if let Some(r) = &l.reserved {
        if r.end <= r.start {
            return Err((
                format!("{path}.reserved"),
                format!("expected start < end, got {}..{}", r.start, r.end),
            ));
        }
    }
    for (i, p) in l.placements.iter().enumerate() {
        check_file_name(&p.file).map_err(|m| (format!("{path}.placements.{i}.file"), m))?;
        if p.sector.is_some() == p.offset.is_some() {
            return Err((
                format!("{path}.placements.{i}"),
                format!(
                    "placement of `{}`: expected exactly one of `sector` or `offset`",
                    p.file
                ),
            ));
        }
    }
    for (i, s) in l.signatures.iter().enumerate() {
        if let Signature::GptType { guid } = s {
            if super::parttable::parse_guid(guid).is_none() {
                return Err((
                    format!("{path}.signatures.{i}.guid"),
                    format!("invalid GUID `{guid}`: expected XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_registry_loads_and_resolves_aliases() {
        let reg = Registry::builtin().unwrap_or_else(|e| panic!("{e}"));
        let b = reg.get("orangepi5").unwrap();
        assert_eq!(b.id(), "opi5");
        assert_eq!(b.usb_recovery().and_then(|u| u.vid), Some(0x2207));
        assert!(reg.get("example-board").is_err(), "template must not load");
    }

    #[test]
    fn unknown_board_suggests() {
        let reg = Registry::builtin().unwrap();
        let e = reg.get("opi6").unwrap_err().to_string();
        assert!(e.contains("did you mean `opi5`"), "{e}");
    }
}
