//! `nix build` of a flake attribute that produces an SD image, with Nix's log streamed.
//!
//! Uses only what Nix 2.8 (Debian's nix-bin) has: `nix build --json --no-link` (the out
//! path comes from the JSON; `--print-out-paths` is newer). Remote/distributed builders and
//! cross or emulated systems are the user's Nix setup; we pass `--builders`, `--max-jobs`,
//! `--system` and `--option K V` through unchanged, and read Nix's log to say which machine
//! built what and which builder could not be reached.

use super::{AcquireError, Result};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Default attribute path under a flake for a host; `<host>` is replaced.
pub(crate) const DEFAULT_ATTR_TEMPLATE: &str =
    "nixosConfigurations.<host>.config.system.build.sdImage";

/// Lines of Nix's log kept for the error message of a failed build.
const TAIL_LINES: usize = 25;

/// What to build and how to reach builders.
#[derive(Debug, Clone, Default)]
pub(crate) struct NixBuild {
    /// `flakeref#attr.path`.
    pub(crate) installable: String,
    pub(crate) builders: Option<String>,
    pub(crate) max_jobs: Option<String>,
    pub(crate) system: Option<String>,
    pub(crate) options: Vec<(String, String)>,
    /// The `nix` binary (default: `nix` on PATH).
    pub(crate) nix: Option<PathBuf>,
}

/// What a successful build produced, and where it ran.
#[derive(Debug, Clone, Default)]
pub(crate) struct Built {
    /// Out paths from `nix build --json`.
    pub(crate) outs: Vec<PathBuf>,
    /// Derivations Nix built on a remote builder: `(drv path, machine URI)`.
    pub(crate) remote: Vec<(String, String)>,
    /// Builders Nix could not use (then it built elsewhere): `(machine URI, Nix's reason)`.
    pub(crate) unusable: Vec<(String, String)>,
}

/// `building '/nix/store/…drv' on 'ssh://host'...` → `(drv, machine)`.
pub(crate) fn parse_remote_build(line: &str) -> Option<(String, String)> {
    let rest = line.strip_prefix("building '")?;
    let (drv, rest) = rest.split_once("' on '")?;
    let (machine, _) = rest.split_once('\'')?;
    Some((drv.to_string(), machine.to_string()))
}

/// `cannot build on 'ssh://host': error: …` → `(machine, reason)`.
pub(crate) fn parse_builder_failure(line: &str) -> Option<(String, String)> {
    let rest = line.strip_prefix("cannot build on '")?;
    let (machine, reason) = rest.split_once("': ")?;
    let reason = reason.strip_prefix("error: ").unwrap_or(reason);
    Some((machine.to_string(), reason.trim().to_string()))
}

/// The store name of a derivation path, for messages: `/nix/store/abc-name.drv` → `name`.
pub(crate) fn drv_name(drv: &str) -> &str {
    let base = drv.rsplit('/').next().unwrap_or(drv);
    let base = base.strip_suffix(".drv").unwrap_or(base);
    match base.split_once('-') {
        Some((hash, name)) if hash.len() == 32 => name,
        _ => base,
    }
}

/// Turns `REF#host` into `REF#<attr path>` using the board's template; a fragment that already
/// is an attribute path (contains a dot) is used as given.
pub(crate) fn installable(flake: &str, template: Option<&str>) -> Result<String> {
    let (reference, frag) = flake.rsplit_once('#').ok_or_else(|| {
        AcquireError::Usage(format!(
            "--flake {flake:?}: expected FLAKEREF#HOST (e.g. github:me/nixos-config#opi5 or .#opi5)"
        ))
    })?;
    if reference.is_empty() || frag.is_empty() {
        return Err(AcquireError::Usage(format!(
            "--flake {flake:?}: both the flake reference and the host are needed"
        )));
    }
    if frag.contains('.') {
        return Ok(flake.to_string());
    }
    let t = template.unwrap_or(DEFAULT_ATTR_TEMPLATE);
    if !(t.contains("<host>") || t.contains("{host}")) {
        return Err(AcquireError::Usage(format!(
            "attribute template {t:?} has no <host> placeholder"
        )));
    }
    let attr = t.replace("<host>", frag).replace("{host}", frag);
    Ok(format!("{reference}#{attr}"))
}

impl NixBuild {
    fn command(&self) -> Command {
        let mut c = Command::new(self.nix.as_deref().unwrap_or(Path::new("nix")));
        c.args(["build", "--json", "--no-link", "-L"])
            .args(["--extra-experimental-features", "nix-command flakes"]);
        if let Some(b) = &self.builders {
            c.args(["--builders", b]);
        }
        if let Some(j) = &self.max_jobs {
            c.args(["--max-jobs", j]);
        }
        if let Some(s) = &self.system {
            c.args(["--system", s]);
        }
        for (k, v) in &self.options {
            c.args(["--option", k, v]);
        }
        c.arg(&self.installable);
        c
    }

    /// The command line, for messages and `-v`.
    pub(crate) fn describe(&self) -> String {
        let c = self.command();
        std::iter::once(c.get_program())
            .chain(c.get_args())
            .map(|a| {
                let s = a.to_string_lossy();
                if s.contains(' ') || s.is_empty() {
                    format!("'{s}'")
                } else {
                    s.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs the build; each log line goes to `on_line` as it arrives.
    pub(crate) fn run(&self, on_line: &mut dyn FnMut(&str)) -> Result<Built> {
        let mut child = match self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(AcquireError::NixMissing)
            }
            Err(e) => return Err(AcquireError::io("nix", e)),
        };
        let mut stdout = child.stdout.take().expect("piped");
        let out_thread = std::thread::spawn(move || {
            let mut s = String::new();
            stdout.read_to_string(&mut s).map(|_| s)
        });
        let ansi = regex::Regex::new(r"\x1b\[[0-9;?]*[A-Za-z]").expect("static regex");
        let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES);
        let mut all_errors = String::new();
        let mut built = Built::default();
        let mut no_machine = false;
        if let Some(err) = child.stderr.take() {
            for line in BufReader::new(err).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line);
                let line = ansi
                    .replace_all(line.trim_end_matches('\r'), "")
                    .to_string();
                on_line(&line);
                if let Some(r) = parse_remote_build(&line) {
                    if !built.remote.contains(&r) {
                        built.remote.push(r);
                    }
                }
                if let Some(f) = parse_builder_failure(&line) {
                    if !built.unusable.iter().any(|(m, _)| *m == f.0) {
                        built.unusable.push(f);
                    }
                }
                no_machine |= line.contains("Failed to find a machine for remote build")
                    || line.contains("unable to start any build");
                if line.starts_with("error") || !all_errors.is_empty() {
                    all_errors.push_str(&line);
                    all_errors.push('\n');
                }
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
        let status = child.wait().map_err(|e| AcquireError::io("nix", e))?;
        let stdout = out_thread
            .join()
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or_default();
        let log = tail.iter().cloned().collect::<Vec<_>>().join("\n");
        if !status.success() {
            let missing = all_errors.contains("does not provide attribute")
                || (all_errors.contains("attribute '") && all_errors.contains("missing"));
            if missing {
                return Err(AcquireError::NixAttribute {
                    installable: self.installable.clone(),
                    log,
                });
            }
            // Nix found no machine for a derivation after a builder failed: that builder is
            // the cause, whatever Nix's closing line says.
            if no_machine && !built.unusable.is_empty() {
                return Err(AcquireError::NixBuilderDown {
                    installable: self.installable.clone(),
                    machines: built
                        .unusable
                        .iter()
                        .map(|(m, _)| m.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    reasons: built
                        .unusable
                        .iter()
                        .map(|(m, r)| format!("  {m}: {r}"))
                        .collect::<Vec<_>>()
                        .join("\n"),
                    log,
                });
            }
            return Err(AcquireError::NixFailed {
                installable: self.installable.clone(),
                status: status.to_string(),
                log,
            });
        }
        let outs = parse_build_json(&stdout);
        if outs.is_empty() {
            return Err(AcquireError::NixFailed {
                installable: self.installable.clone(),
                status: "no out path in `nix build --json` output".into(),
                log: format!("{log}\nstdout: {stdout}"),
            });
        }
        built.outs = outs;
        Ok(built)
    }
}

/// Out paths from `nix build --json`: `[{"drvPath": …, "outputs": {"out": "/nix/store/…"}}]`.
pub(crate) fn parse_build_json(s: &str) -> Vec<PathBuf> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(s) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in v.as_array().into_iter().flatten() {
        if let Some(o) = item.get("outputs").and_then(|o| o.as_object()) {
            // "out" first: an sd image derivation's image lives there.
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort_by_key(|k| (k.as_str() != "out", k.as_str().to_string()));
            for k in keys {
                if let Some(p) = o[k].as_str() {
                    out.push(PathBuf::from(p));
                }
            }
        }
    }
    out
}

/// Finds the image in a build output: `sd-image/*.img[.zst|.xz]` (nixos sd-image), then
/// `*.img[.zst|.xz]` or `nixos.img` at the top (make-disk-image), or the out path itself if
/// it is a file.
pub(crate) fn find_image(out: &Path) -> Result<PathBuf> {
    if out.is_file() {
        return Ok(out.to_path_buf());
    }
    let is_image = |p: &Path| {
        let n = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        n.ends_with(".img")
            || n.ends_with(".img.zst")
            || n.ends_with(".img.xz")
            || n.ends_with(".raw")
    };
    for dir in [out.join("sd-image"), out.to_path_buf()] {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut found: Vec<PathBuf> = rd
            .flatten()
            .map(|d| d.path())
            .filter(|p| p.is_file() && is_image(p))
            .collect();
        found.sort();
        if let Some(p) = found.into_iter().next() {
            return Ok(p);
        }
    }
    Err(AcquireError::NoImageInOutput {
        path: out.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installables() {
        assert_eq!(
            installable(".#opi5", None).unwrap(),
            ".#nixosConfigurations.opi5.config.system.build.sdImage"
        );
        assert_eq!(
            installable(
                "github:me/cfg#opi5",
                Some("packages.aarch64-linux.{host}-image")
            )
            .unwrap(),
            "github:me/cfg#packages.aarch64-linux.opi5-image"
        );
        assert_eq!(installable(".#a.b", None).unwrap(), ".#a.b");
        assert!(installable("github:me/cfg", None).is_err());
        assert!(installable("#x", None).is_err());
    }

    #[test]
    fn build_json() {
        let s = r#"[{"drvPath":"/nix/store/a.drv","outputs":{"out":"/nix/store/b-img"}}]"#;
        assert_eq!(parse_build_json(s), vec![PathBuf::from("/nix/store/b-img")]);
        assert!(parse_build_json("garbage").is_empty());
    }

    #[test]
    fn builder_lines() {
        let on = "building '/nix/store/vidq9zvqqx7hb44f0d35dr5aj4rf3y6q-nixos-sd-image-test.drv' on 'ssh://root@127.0.0.1'...";
        let (drv, m) = parse_remote_build(on).unwrap();
        assert_eq!(m, "ssh://root@127.0.0.1");
        assert_eq!(drv_name(&drv), "nixos-sd-image-test");
        // A local build names no machine.
        assert!(parse_remote_build("building '/nix/store/x-a.drv'...").is_none());
        let down = "cannot build on 'ssh://b1': error: cannot connect to 'b1': ssh: connect to host b1 port 22: Connection refused";
        assert_eq!(
            parse_builder_failure(down).unwrap(),
            (
                "ssh://b1".to_string(),
                "cannot connect to 'b1': ssh: connect to host b1 port 22: Connection refused"
                    .to_string()
            )
        );
        assert!(parse_builder_failure("building foo").is_none());
    }

    #[test]
    fn finds_images() {
        let d = tempfile::tempdir().unwrap();
        assert!(find_image(d.path()).is_err());
        std::fs::create_dir(d.path().join("sd-image")).unwrap();
        std::fs::write(d.path().join("sd-image/x.img.zst"), b"z").unwrap();
        std::fs::write(d.path().join("nixos.img"), b"z").unwrap();
        assert_eq!(
            find_image(d.path()).unwrap(),
            d.path().join("sd-image/x.img.zst")
        );
        std::fs::remove_dir_all(d.path().join("sd-image")).unwrap();
        assert_eq!(find_image(d.path()).unwrap(), d.path().join("nixos.img"));
    }
}
