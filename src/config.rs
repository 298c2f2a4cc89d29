//! User defaults from `$XDG_CONFIG_HOME/sbcflash/config.toml`, merged with the environment and
//! command-line flags, remembering where every value came from.
//!
//! Precedence, lowest to highest: built-in default < config file < environment variable <
//! command-line flag. The provenance is kept so `sbcflash config show` can answer "why is it
//! using THAT directory?" without the user reading code.
//!
//! The file is strict (unknown keys are errors, reported as `file:line:col`) because a typo in
//! a config key silently falling back to a default is exactly the kind of surprise that writes
//! the wrong image to the wrong card.

use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Environment variable naming an explicit config file (overrides the XDG location).
pub(crate) const ENV_CONFIG: &str = "SBCFLASH_CONFIG";
/// Environment override for the cache directory.
pub(crate) const ENV_CACHE_DIR: &str = "SBCFLASH_CACHE_DIR";
/// Environment override for the default board.
pub(crate) const ENV_BOARD: &str = "SBCFLASH_BOARD";

/// Errors reading the config file. Each names the file and, for syntax/schema errors, the
/// line and column.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{col}: {msg}")]
    Parse {
        path: String,
        line: usize,
        col: usize,
        msg: String,
    },
    #[error("{path}:{line}:{col}: {msg}")]
    Invalid {
        path: String,
        line: usize,
        col: usize,
        msg: String,
    },
    /// A value from an environment variable that cannot be used.
    #[error("${var}: {msg}")]
    InvalidEnv { var: String, msg: String },
}

impl crate::exit::Classify for ConfigError {
    fn exit(&self) -> crate::exit::Exit {
        match self {
            ConfigError::Io { .. } => crate::exit::Exit::Io,
            _ => crate::exit::Exit::BadInput,
        }
    }
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub(crate) enum Source {
    /// Built in; `how` says how the default was derived (e.g. `$XDG_CACHE_HOME/sbcflash`).
    Default { how: String },
    /// The config file, at this line.
    File { path: PathBuf, line: usize },
    /// An environment variable.
    Env { var: String },
    /// A command-line flag.
    Flag { flag: String },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default { how } => write!(f, "default ({how})"),
            Source::File { path, line } => write!(f, "{}:{line}", path.display()),
            Source::Env { var } => write!(f, "environment ${var}"),
            Source::Flag { flag } => write!(f, "flag {flag}"),
        }
    }
}

/// A value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Sourced<T> {
    pub(crate) value: T,
    pub(crate) source: Source,
}

impl<T> Sourced<T> {
    fn default(value: T, how: impl Into<String>) -> Self {
        Self {
            value,
            source: Source::Default { how: how.into() },
        }
    }
}

impl<T> Sourced<T> {
    /// The value of a higher layer, when that layer sets one.
    fn over(self, layer: Option<(T, Source)>) -> Self {
        match layer {
            Some((value, source)) => Sourced { value, source },
            None => self,
        }
    }
}

/// The layers above the defaults, lowest first: file < environment < flag. Each setting is
/// `Sourced::default(..).over(file).over(env).over(flag)`.
struct Layers<'a> {
    /// The file that was read, and its text (for line numbers).
    file: Option<&'a (PathBuf, String)>,
    env: &'a dyn Fn(&str) -> Option<OsString>,
}

impl Layers<'_> {
    /// A key of the config file, converted, with its line.
    fn file<X, T>(&self, v: Option<Spanned<X>>, f: impl FnOnce(X) -> T) -> Option<(T, Source)> {
        let v = v?;
        let span = v.span();
        let source = match self.file {
            Some((path, text)) => Source::File {
                path: path.clone(),
                line: line_col(text, span.start).0,
            },
            None => Source::Default { how: String::new() },
        };
        Some((f(v.into_inner()), source))
    }

    /// An environment variable set to a non-empty value, converted.
    fn env<T>(&self, var: &str, f: impl FnOnce(OsString) -> T) -> Option<(T, Source)> {
        let v = (self.env)(var).filter(|v| !v.is_empty())?;
        Some((f(v), Source::Env { var: var.into() }))
    }

    /// A command-line flag that was given.
    fn flag<T: Clone>(v: &Option<T>, flag: &str) -> Option<(T, Source)> {
        let v = v.clone()?;
        Some((v, Source::Flag { flag: flag.into() }))
    }

    /// A bad value in the config file, at the key's line and column.
    fn invalid(&self, span: std::ops::Range<usize>, msg: String) -> ConfigError {
        let (path, text) = match self.file {
            Some((p, t)) => (p.display().to_string(), t.as_str()),
            None => (String::new(), ""),
        };
        let (line, col) = line_col(text, span.start);
        ConfigError::Invalid {
            path,
            line,
            col,
            msg,
        }
    }
}

/// A URL prefix rewrite: downloads whose URL starts with `prefix` are tried at `replace` first
/// (then at the original), so a lab or factory can serve images from a local mirror without
/// editing board descriptors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Mirror {
    pub(crate) prefix: String,
    pub(crate) replace: String,
}

/// The URLs to try for `url`, in order: every matching rewrite in `mirrors`, then `url`.
pub(crate) fn mirror_candidates(mirrors: &[Mirror], url: &str) -> Vec<String> {
    let mut out: Vec<String> = mirrors
        .iter()
        .filter_map(|m| {
            url.strip_prefix(m.prefix.as_str())
                .map(|rest| format!("{}{rest}", m.replace))
        })
        .collect();
    out.push(url.to_string());
    out.dedup();
    out
}

/// Defaults for `sbcflash station`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct StationDefaults {
    /// The station's own configuration (slots, image, identity), used when `--config` is absent.
    pub(crate) config: Sourced<Option<PathBuf>>,
    /// The SQLite ledger file.
    pub(crate) ledger: Sourced<PathBuf>,
    /// Flash devices that are already present when the station starts.
    pub(crate) flash_present: Sourced<bool>,
}

/// The merged configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct Config {
    /// The config file that was read, if any.
    pub(crate) file: Option<PathBuf>,
    /// Content-addressed image cache.
    pub(crate) cache_dir: Sourced<PathBuf>,
    /// Board used when `--board` is not given.
    pub(crate) default_board: Sourced<Option<String>>,
    /// Extra directories of board descriptors (after the shipped and `$XDG_CONFIG_HOME` ones).
    pub(crate) boards_dirs: Sourced<Vec<PathBuf>>,
    /// URL prefix rewrites for downloads.
    pub(crate) mirrors: Sourced<Vec<Mirror>>,
    pub(crate) station: StationDefaults,
    /// `[image]`: trusted signing keys and `require-signature` (key files relative to the file).
    #[serde(skip)]
    pub(crate) image: ImageTrust,
}

/// Values given on the command line; `None`/empty means "not given".
#[derive(Debug, Clone, Default)]
pub(crate) struct Flags {
    /// An explicit config file (`--config`): must exist.
    pub(crate) config_file: Option<PathBuf>,
    pub(crate) cache_dir: Option<PathBuf>,
    pub(crate) board: Option<String>,
    pub(crate) boards_dirs: Vec<PathBuf>,
    pub(crate) station_config: Option<PathBuf>,
    pub(crate) ledger: Option<PathBuf>,
}

// The file's schema. Every key is optional; unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    cache_dir: Option<Spanned<PathBuf>>,
    default_board: Option<Spanned<String>>,
    boards_dirs: Option<Spanned<Vec<PathBuf>>>,
    mirrors: Option<Spanned<Vec<Mirror>>>,
    station: Option<FileStation>,
    image: Option<ImageTrust>,
}

/// `[image]`: who may sign images (`[[image.trust]]`) and whether a signature is required.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct ImageTrust {
    #[serde(default)]
    pub(crate) trust: Vec<crate::trust::TrustEntry>,
    #[serde(default, alias = "require_signature")]
    pub(crate) require_signature: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileStation {
    config: Option<Spanned<PathBuf>>,
    ledger: Option<Spanned<PathBuf>>,
    flash_present: Option<Spanned<bool>>,
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map(|p| p + 1)
        .unwrap_or(0);
    let col = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, col)
}

/// Where the config file is looked for: `$SBCFLASH_CONFIG`, else
/// `$XDG_CONFIG_HOME/sbcflash/config.toml`, else `$HOME/.config/sbcflash/config.toml`.
pub(crate) fn default_path(env: &dyn Fn(&str) -> Option<OsString>) -> Option<(PathBuf, Source)> {
    if let Some(p) = env(ENV_CONFIG).filter(|v| !v.is_empty()) {
        return Some((
            PathBuf::from(p),
            Source::Env {
                var: ENV_CONFIG.into(),
            },
        ));
    }
    xdg_dir(env, "XDG_CONFIG_HOME", ".config").map(|(d, how)| {
        (
            d.join("sbcflash").join("config.toml"),
            Source::Default {
                how: format!("{how}/sbcflash/config.toml"),
            },
        )
    })
}

/// An XDG base directory: the variable if it is set to an absolute path (the spec says relative
/// values are invalid and must be ignored), else `$HOME/<fallback>`.
fn xdg_dir(
    env: &dyn Fn(&str) -> Option<OsString>,
    var: &str,
    fallback: &str,
) -> Option<(PathBuf, String)> {
    if let Some(v) = env(var).map(PathBuf::from).filter(|p| p.is_absolute()) {
        return Some((v, format!("${var}")));
    }
    env("HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .map(|h| (h.join(fallback), format!("$HOME/{fallback}")))
}

impl Config {
    /// Load with the process environment.
    pub(crate) fn load(flags: &Flags) -> Result<Config, ConfigError> {
        Self::load_with(flags, &|k| std::env::var_os(k))
    }

    /// Load with an injected environment (tests pass a map).
    // Longer than 150 lines on purpose: one short block per setting, each the same
    // default < file < env < flag layering through `Layers`, read top to bottom.
    pub(crate) fn load_with(
        flags: &Flags,
        env: &dyn Fn(&str) -> Option<OsString>,
    ) -> Result<Config, ConfigError> {
        // An explicit file must exist; the default location may be absent.
        let (path, must_exist) = match &flags.config_file {
            Some(p) => (Some(p.clone()), true),
            None => match default_path(env) {
                Some((p, Source::Env { .. })) => (Some(p), true),
                Some((p, _)) => (Some(p), false),
                None => (None, false),
            },
        };
        let mut file_cfg = FileConfig::default();
        let mut file_used = None;
        if let Some(path) = path {
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    file_cfg = parse_file(&path, &text)?;
                    file_used = Some((path, text));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {}
                Err(e) => {
                    return Err(ConfigError::Io {
                        path: path.display().to_string(),
                        source: e,
                    })
                }
            }
        }
        let layers = Layers {
            file: file_used.as_ref(),
            env,
        };
        let base = file_used.as_ref().map(|f| f.0.as_path());

        let cache_dir = match xdg_dir(env, "XDG_CACHE_HOME", ".cache") {
            Some((d, how)) => Sourced::default(d.join("sbcflash"), format!("{how}/sbcflash")),
            None => Sourced::default(
                std::env::temp_dir().join("sbcflash-cache"),
                "no $HOME: temporary directory",
            ),
        }
        .over(layers.file(file_cfg.cache_dir, |p| resolve_relative(base, p)))
        .over(layers.env(ENV_CACHE_DIR, PathBuf::from))
        .over(Layers::flag(&flags.cache_dir, "--cache-dir"));

        let default_board_span = file_cfg.default_board.as_ref().map(|v| v.span());
        let default_board = Sourced::default(None, "not set")
            .over(layers.file(file_cfg.default_board, Some))
            .over(layers.env(ENV_BOARD, |v| Some(v.to_string_lossy().into_owned())))
            .over(Layers::flag(&flags.board.clone().map(Some), "--board"));

        // boards_dirs: flags add to (and take precedence over) the file's list.
        if let Some(v) = &file_cfg.boards_dirs {
            let bad = v
                .get_ref()
                .iter()
                .map(|p| resolve_relative(base, p.clone()))
                .find(|d| !d.is_dir());
            if let Some(bad) = bad {
                let msg = format!("boards-dirs: {} is not a directory", bad.display());
                return Err(layers.invalid(v.span(), msg));
            }
        }
        let mut boards_dirs = Sourced::default(Vec::new(), "not set").over(layers.file(
            file_cfg.boards_dirs,
            |dirs| {
                dirs.into_iter()
                    .map(|p| resolve_relative(base, p))
                    .collect()
            },
        ));
        if !flags.boards_dirs.is_empty() {
            let mut v = flags.boards_dirs.clone();
            v.extend(std::mem::take(&mut boards_dirs.value));
            boards_dirs = boards_dirs.over(Layers::flag(&Some(v), "--boards-dir"));
        }

        if let Some(v) = &file_cfg.mirrors {
            let is_url = |u: &str| u.starts_with("https://") || u.starts_with("http://");
            let list = v.get_ref();
            let msg = if let Some(bad) = list
                .iter()
                .find(|m| m.prefix.is_empty() || m.replace.is_empty())
            {
                Some(format!(
                    "mirror entry with an empty prefix or replacement: {:?} -> {:?}",
                    bad.prefix, bad.replace
                ))
            } else {
                list.iter()
                    .find(|m| !is_url(&m.prefix) || !is_url(&m.replace))
                    .map(|bad| {
                        format!(
                            "mirrors: prefix and replace must be http(s):// URLs: {:?} -> {:?}",
                            bad.prefix, bad.replace
                        )
                    })
            };
            if let Some(msg) = msg {
                return Err(layers.invalid(v.span(), msg));
            }
        }
        let mirrors =
            Sourced::default(Vec::new(), "not set").over(layers.file(file_cfg.mirrors, |m| m));

        let fs = file_cfg.station.unwrap_or_default();
        let st_config = Sourced::default(None, "not set: pass --config")
            .over(layers.file(fs.config, |p| Some(resolve_relative(base, p))))
            .over(Layers::flag(
                &flags.station_config.clone().map(Some),
                "--config",
            ));
        let ledger = match xdg_dir(env, "XDG_STATE_HOME", ".local/state") {
            Some((d, how)) => Sourced::default(
                d.join("sbcflash").join("ledger.sqlite"),
                format!("{how}/sbcflash/ledger.sqlite"),
            ),
            None => Sourced::default(
                PathBuf::from("/var/lib/sbcflash/ledger.sqlite"),
                "no $HOME: system state directory",
            ),
        }
        .over(layers.file(fs.ledger, |p| resolve_relative(base, p)))
        .over(Layers::flag(&flags.ledger, "--ledger"));
        let flash_present =
            Sourced::default(false, "false").over(layers.file(fs.flash_present, |b| b));

        // The default board must be one the registry knows (with this config's boards-dirs), or
        // every command that uses it fails later without naming where the name came from.
        if let Some(name) = &default_board.value {
            let mut dirs = boards_dirs.value.clone();
            dirs.reverse();
            // A registry that does not load is reported by the commands that use it.
            if let Ok(reg) = crate::board::Registry::load(&dirs) {
                if let Err(e) = reg.get(name) {
                    match (&default_board.source, default_board_span) {
                        (Source::File { .. }, Some(span)) => {
                            return Err(
                                layers.invalid(span, format!("default-board = {name:?}: {e}"))
                            );
                        }
                        (Source::Env { var }, _) => {
                            return Err(ConfigError::InvalidEnv {
                                var: var.clone(),
                                msg: format!("{name:?}: {e}"),
                            });
                        }
                        _ => {}
                    }
                }
            }
        }

        let mut image = file_cfg.image.unwrap_or_default();
        for e in &mut image.trust {
            e.key_file = e.key_file.take().map(|p| resolve_relative(base, p));
        }
        Ok(Config {
            image,
            file: file_used.map(|f| f.0),
            cache_dir,
            default_board,
            boards_dirs,
            mirrors,
            station: StationDefaults {
                config: st_config,
                ledger,
                flash_present,
            },
        })
    }

    /// The URLs to try for `url`, in order: every matching mirror rewrite, then the original.
    #[cfg(test)] // only the unit tests use it
    pub(crate) fn mirror_candidates(&self, url: &str) -> Vec<String> {
        mirror_candidates(&self.mirrors.value, url)
    }

    /// `(key, value as TOML, source)` rows for `config show`, in file order.
    pub(crate) fn rows(&self) -> Vec<(&'static str, String, &Source)> {
        fn tv<T: Serialize + ?Sized>(v: &T) -> String {
            toml::Value::try_from(v)
                .map(|v| v.to_string())
                .unwrap_or_else(|_| "(unset)".into())
        }
        fn opt<T: Serialize>(v: &Option<T>) -> String {
            v.as_ref()
                .map(|v| tv(v))
                .unwrap_or_else(|| "(unset)".into())
        }
        vec![
            (
                "cache-dir",
                tv(&self.cache_dir.value),
                &self.cache_dir.source,
            ),
            (
                "default-board",
                opt(&self.default_board.value),
                &self.default_board.source,
            ),
            (
                "boards-dirs",
                tv(&self.boards_dirs.value),
                &self.boards_dirs.source,
            ),
            ("mirrors", tv(&self.mirrors.value), &self.mirrors.source),
            (
                "station.config",
                opt(&self.station.config.value),
                &self.station.config.source,
            ),
            (
                "station.ledger",
                tv(&self.station.ledger.value),
                &self.station.ledger.source,
            ),
            (
                "station.flash-present",
                tv(&self.station.flash_present.value),
                &self.station.flash_present.source,
            ),
        ]
    }
}

/// Relative paths in the file are relative to the file's directory, not to wherever the tool
/// happens to be started (a systemd unit's working directory is `/`).
fn resolve_relative(base_file: Option<&Path>, p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        return p;
    }
    if let Some(rest) = p.to_str().and_then(|s| s.strip_prefix("~/")) {
        if let Some(home) = std::env::var_os("HOME") {
            return PathBuf::from(home).join(rest);
        }
    }
    match base_file.and_then(|f| f.parent()) {
        Some(dir) => dir.join(p),
        None => p,
    }
}

/// Check a config file's text without reading the environment: the schema, and the rules the
/// loader applies (used by `config show` through [`Config::load`], and by the fuzz target).
pub fn check_text(path: &Path, text: &str) -> Result<(), ConfigError> {
    let f = parse_file(path, text)?;
    if let Some(m) = f.mirrors {
        let span = m.span();
        if m.get_ref()
            .iter()
            .any(|m| m.prefix.is_empty() || m.replace.is_empty())
        {
            let (line, col) = line_col(text, span.start);
            return Err(ConfigError::Invalid {
                path: path.display().to_string(),
                line,
                col,
                msg: "mirror entry with an empty prefix or replacement".into(),
            });
        }
    }
    Ok(())
}

fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str::<FileConfig>(text).map_err(|e| {
        let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        ConfigError::Parse {
            path: path.display().to_string(),
            line,
            col,
            msg: e.message().trim().to_string(),
        }
    })
}

/// A commented example, printed by `sbcflash config example` and shipped in `packaging/`.
pub const EXAMPLE: &str = r#"# sbcflash defaults: $XDG_CONFIG_HOME/sbcflash/config.toml (or $SBCFLASH_CONFIG).
# Every key is optional; unknown keys are errors. Flags and environment variables override.

# Content-addressed image cache (default: $XDG_CACHE_HOME/sbcflash). $SBCFLASH_CACHE_DIR overrides.
# cache-dir = "/srv/sbcflash/cache"

# Board used when --board is not given. $SBCFLASH_BOARD overrides.
# default-board = "rpi4"

# Extra directories of board descriptors (relative paths are relative to this file).
# boards-dirs = ["boards"]

# Try a local mirror before the upstream URL.
# [[mirrors]]
# prefix = "https://hydra.nixos.org/"
# replace = "https://mirror.lab.example/hydra/"

[station]
# The station's slot/image/identity file, used when --config is not given.
# config = "/etc/sbcflash/station.toml"
# The ledger (default: $XDG_STATE_HOME/sbcflash/ledger.sqlite).
# ledger = "/var/lib/sbcflash-station/ledger.sqlite"
# Flash cards that are already inserted when the station starts.
# flash-present = false

# Who may sign images (README "Trust"); `write --trusted-key` adds more.
# [image]
# require-signature = true
# [[image.trust]]
# name = "release"
# key-file = "release.pub"          # minisign/SSH .pub, OpenPGP key or keyring; or key = "RW..."
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let m: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn write_cfg(dir: &Path, text: &str) -> PathBuf {
        let d = dir.join("sbcflash");
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("config.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn defaults_follow_xdg() {
        let env = env_of(&[
            ("HOME", "/home/u"),
            ("XDG_CACHE_HOME", "/xc"),
            ("XDG_CONFIG_HOME", "/nonexistent-xdg"),
        ]);
        let c = Config::load_with(&Flags::default(), &env).unwrap();
        assert_eq!(c.file, None);
        assert_eq!(c.cache_dir.value, PathBuf::from("/xc/sbcflash"));
        assert_eq!(
            c.station.ledger.value,
            PathBuf::from("/home/u/.local/state/sbcflash/ledger.sqlite")
        );
        assert!(matches!(c.cache_dir.source, Source::Default { .. }));
    }

    #[test]
    fn relative_xdg_is_ignored() {
        let env = env_of(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "rel/cache")]);
        let c = Config::load_with(&Flags::default(), &env).unwrap();
        assert_eq!(c.cache_dir.value, PathBuf::from("/home/u/.cache/sbcflash"));
    }

    #[test]
    fn file_env_flag_precedence_and_provenance() {
        let t = tempfile::tempdir().unwrap();
        let p = write_cfg(
            t.path(),
            "# comment\ncache-dir = \"/from/file\"\ndefault-board = \"opi5\"\n\n[station]\nledger = \"l.sqlite\"\n",
        );
        let xdg = t.path().to_str().unwrap();
        let env = env_of(&[("HOME", "/h"), ("XDG_CONFIG_HOME", xdg)]);
        let c = Config::load_with(&Flags::default(), &env).unwrap();
        assert_eq!(c.file.as_deref(), Some(p.as_path()));
        assert_eq!(c.cache_dir.value, PathBuf::from("/from/file"));
        assert_eq!(
            c.cache_dir.source,
            Source::File {
                path: p.clone(),
                line: 2
            }
        );
        assert_eq!(c.default_board.value.as_deref(), Some("opi5"));
        assert_eq!(
            c.station.ledger.value,
            p.parent().unwrap().join("l.sqlite"),
            "relative to the file"
        );
        assert_eq!(
            c.station.ledger.source,
            Source::File {
                path: p.clone(),
                line: 6
            }
        );

        let env = env_of(&[
            ("HOME", "/h"),
            ("XDG_CONFIG_HOME", xdg),
            (ENV_CACHE_DIR, "/from/env"),
            (ENV_BOARD, "rpi4"),
        ]);
        let c = Config::load_with(&Flags::default(), &env).unwrap();
        assert_eq!(c.cache_dir.value, PathBuf::from("/from/env"));
        assert_eq!(c.default_board.value.as_deref(), Some("rpi4"));
        assert!(matches!(c.cache_dir.source, Source::Env { .. }));

        let flags = Flags {
            cache_dir: Some("/from/flag".into()),
            board: Some("bpi".into()),
            ..Flags::default()
        };
        let c = Config::load_with(&flags, &env).unwrap();
        assert_eq!(c.cache_dir.value, PathBuf::from("/from/flag"));
        assert_eq!(c.default_board.value.as_deref(), Some("bpi"));
        assert!(matches!(c.default_board.source, Source::Flag { .. }));
    }

    #[test]
    fn unknown_key_names_file_line_col() {
        let t = tempfile::tempdir().unwrap();
        let p = write_cfg(
            t.path(),
            "cache-dir = \"/x\"\n\n[station]\n  ledgr = \"x\"\n",
        );
        let env = env_of(&[("XDG_CONFIG_HOME", t.path().to_str().unwrap())]);
        let e = Config::load_with(&Flags::default(), &env).unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with(&format!("{}:4:3:", p.display())), "{s}");
        assert!(s.contains("ledgr"), "{s}");
        assert_eq!(crate::exit::Classify::exit(&e), crate::exit::Exit::BadInput);
    }

    #[test]
    fn wrong_type_and_syntax_errors_are_located() {
        let t = tempfile::tempdir().unwrap();
        let p = write_cfg(t.path(), "default-board = 5\n");
        let env = env_of(&[("XDG_CONFIG_HOME", t.path().to_str().unwrap())]);
        let s = Config::load_with(&Flags::default(), &env)
            .unwrap_err()
            .to_string();
        assert!(s.starts_with(&format!("{}:1:", p.display())), "{s}");
        write_cfg(t.path(), "a = \n[[[\n");
        let s = Config::load_with(&Flags::default(), &env)
            .unwrap_err()
            .to_string();
        assert!(s.contains(":1:"), "{s}");
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let flags = Flags {
            config_file: Some("/nonexistent/sbcflash.toml".into()),
            ..Flags::default()
        };
        let e = Config::load_with(&flags, &env_of(&[])).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/sbcflash.toml"));
        let e = Config::load_with(
            &Flags::default(),
            &env_of(&[(ENV_CONFIG, "/nonexistent/x.toml")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.toml"));
    }

    #[test]
    fn mirrors_rewrite_in_order_then_original() {
        let t = tempfile::tempdir().unwrap();
        write_cfg(
            t.path(),
            "[[mirrors]]\nprefix = \"https://up.example/\"\nreplace = \"https://m1.lan/\"\n[[mirrors]]\nprefix = \"https://up.example/img/\"\nreplace = \"http://m2.lan/\"\n",
        );
        let env = env_of(&[("XDG_CONFIG_HOME", t.path().to_str().unwrap())]);
        let c = Config::load_with(&Flags::default(), &env).unwrap();
        assert_eq!(
            c.mirror_candidates("https://up.example/img/a.zst"),
            vec![
                "https://m1.lan/img/a.zst",
                "http://m2.lan/a.zst",
                "https://up.example/img/a.zst"
            ]
        );
        assert_eq!(
            c.mirror_candidates("https://other/x"),
            vec!["https://other/x"]
        );
    }

    #[test]
    fn example_parses() {
        let uncommented: String = EXAMPLE
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|r| r.contains('=') || r.starts_with('['))
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        parse_file(Path::new("example"), EXAMPLE).unwrap();
        parse_file(Path::new("example"), &uncommented).unwrap();
    }

    #[test]
    fn line_col_counts_chars() {
        assert_eq!(line_col("ab\ncé d", 7), (2, 4));
        assert_eq!(line_col("", 5), (1, 1));
    }
}
