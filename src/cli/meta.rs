//! The tool describing itself: shell completions and man pages generated from the same clap
//! definitions the parser uses (so they cannot drift), and the merged configuration.

use anyhow::Context;
use clap_complete::Shell;
use std::io::Write;
use std::path::PathBuf;

use super::Global;
use crate::config::{Config, Flags};
use crate::exit::{Exit, ExitError};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  sbcflash completions bash > ~/.local/share/bash-completion/completions/sbcflash
  sbcflash completions zsh --out-dir ~/.zfunc      # writes ~/.zfunc/_sbcflash
  sbcflash completions fish > ~/.config/fish/completions/sbcflash.fish")]
pub struct CompletionsArgs {
    /// The shell to generate completions for.
    #[arg(value_enum)]
    pub(crate) shell: Shell,
    /// Write the file under its conventional name into DIR instead of printing it.
    #[arg(long, value_name = "DIR")]
    pub(crate) out_dir: Option<PathBuf>,
}

pub(crate) fn run_completions(a: CompletionsArgs, g: &Global) -> anyhow::Result<Exit> {
    completions(a, g)
}

fn completions(a: CompletionsArgs, g: &Global) -> anyhow::Result<Exit> {
    let mut cmd = super::help::command();
    match a.out_dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let path = clap_complete::generate_to(a.shell, &mut cmd, "sbcflash", &dir)
                .with_context(|| format!("writing completions into {}", dir.display()))?;
            report_written(g, "completions", &[path])?;
        }
        None => {
            // Generated into memory first: clap_complete panics on write errors (`| head`).
            let mut buf = Vec::new();
            clap_complete::generate(a.shell, &mut cmd, "sbcflash", &mut buf);
            let mut out = super::out::stdout();
            out.write_all(&buf)?;
            out.flush()?;
        }
    }
    Ok(Exit::Ok)
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  sbcflash man | man -l -                  # read the top page now
  sbcflash man write | man -l -            # one subcommand's page
  sbcflash man cache list > sbcflash-cache-list.1
  sbcflash man --out-dir /usr/share/man/man1   # every page: sbcflash.1, sbcflash-write.1, ...")]
pub struct ManArgs {
    /// Subcommand path whose page to print (e.g. `write`, `cache list`); none: the top page.
    #[arg(value_name = "SUBCOMMAND")]
    pub(crate) path: Vec<String>,
    /// Write every page (the top command and each subcommand, recursively) into DIR.
    #[arg(long, value_name = "DIR", conflicts_with = "path")]
    pub(crate) out_dir: Option<PathBuf>,
}

/// The command tree as man pages see it: built (so globals propagate and subcommands get
/// their `sbcflash-sub` display names) and without clap's implicit `help` subcommand.
pub fn man_command() -> clap::Command {
    let mut cmd = super::help::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// Every page `man --out-dir` writes: (file name, command), top first, depth-first.
pub(crate) fn man_pages() -> Vec<(String, clap::Command)> {
    fn walk(cmd: &clap::Command, out: &mut Vec<(String, clap::Command)>) {
        let man = clap_mangen::Man::new(cmd.clone());
        out.push((man.get_filename(), cmd.clone()));
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, out);
        }
    }
    let mut out = Vec::new();
    walk(&man_command(), &mut out);
    out
}

/// clap_mangen's sections, but the help's trailing text split into NOTES and EXAMPLES
/// (verbatim) and the exit codes as an EXIT STATUS list, where man readers look for them.
fn render_man(cmd: clap::Command, w: &mut dyn Write) -> std::io::Result<()> {
    // Every page's footer names the program and its version (clap_mangen would put the
    // subcommand's name and its unset version there).
    let man = clap_mangen::Man::new(cmd.clone())
        .manual("sbcflash manual")
        .source(format!("sbcflash {}", env!("CARGO_PKG_VERSION")));
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(w)?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(w)?;
    }
    let after = cmd
        .get_after_help()
        .map(|h| h.to_string())
        .unwrap_or_default();
    let (mut notes, mut examples) = (Vec::new(), Vec::new());
    let mut inside = false;
    for line in after.lines() {
        if line.trim_end() == super::help::EXAMPLES {
            inside = true;
        } else if inside && line.starts_with(' ') {
            examples.push(line);
        } else {
            inside = false;
            notes.push(line);
        }
    }
    let notes = notes.join("\n");
    if !notes.trim().is_empty() {
        writeln!(w, ".SH NOTES\n.nf\n{}\n.fi", roff_lines(notes.trim()))?;
    }
    if !examples.is_empty() {
        writeln!(
            w,
            ".SH EXAMPLES\n.nf\n{}\n.fi",
            roff_lines(&examples.join("\n"))
        )?;
    }
    writeln!(w, ".SH \"EXIT STATUS\"")?;
    for (code, what) in Exit::TABLE {
        writeln!(w, ".TP\n\\fB{}\\fR\n{}", code.code(), roff_lines(what))?;
    }
    if cmd.get_version().or(cmd.get_long_version()).is_some() {
        man.render_version_section(w)?;
    }
    Ok(())
}

/// Text lines safe for roff: backslashes and hyphens escaped, no line read as a request.
fn roff_lines(text: &str) -> String {
    text.lines()
        .map(|l| {
            let l = l.replace('\\', "\\e").replace('-', "\\-");
            if l.starts_with(['.', '\'']) {
                format!("\\&{l}")
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub(crate) fn run_man(a: ManArgs, g: &Global) -> anyhow::Result<Exit> {
    man(a, g)
}

fn man(a: ManArgs, g: &Global) -> anyhow::Result<Exit> {
    if let Some(dir) = a.out_dir {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut written = Vec::new();
        for (name, cmd) in man_pages() {
            let path = dir.join(&name);
            let mut f = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            render_man(cmd, &mut f).with_context(|| format!("writing {}", path.display()))?;
            written.push(path);
        }
        report_written(g, "man", &written)?;
        return Ok(Exit::Ok);
    }
    let mut cmd = man_command();
    for (depth, name) in a.path.iter().enumerate() {
        cmd = match cmd.find_subcommand(name) {
            Some(sub) => sub.clone(),
            None => {
                let known: Vec<&str> = cmd.get_subcommands().map(|s| s.get_name()).collect();
                return Err(ExitError::new(
                    Exit::Usage,
                    format!(
                        "no subcommand `{}`; known here: {}",
                        a.path[..=depth].join(" "),
                        known.join(", ")
                    ),
                )
                .into());
            }
        };
    }
    let mut out = super::out::stdout();
    render_man(cmd, &mut out)?;
    out.flush()?;
    Ok(Exit::Ok)
}

fn report_written(g: &Global, what: &str, paths: &[PathBuf]) -> anyhow::Result<()> {
    let mut out = super::out::stdout();
    if g.json {
        let v = serde_json::json!({
            "what": what, "files": paths,
        });
        crate::progress::json_line(&mut out, "written", v)?;
    } else {
        for p in paths {
            writeln!(out, "{}", p.display())?;
        }
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  sbcflash config show                   # merged defaults and where each came from
  sbcflash config show --json | jq -r '.config[\"cache-dir\"].value'
  SBCFLASH_BOARD=opi5 sbcflash config show --board rpi4   # the flag wins
  sbcflash config example > ~/.config/sbcflash/config.toml
  sbcflash config path")]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub(crate) action: ConfigAction,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum ConfigAction {
    /// Print the merged configuration and the source of every value.
    Show(ShowArgs),
    /// Print the path of the config file that is (or would be) read.
    Path(PathArgs),
    /// Print a commented example config file.
    Example,
}

/// The flags that feed the config merge; the same names other subcommands use.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ConfigFlags {
    /// Read this config file instead of `$XDG_CONFIG_HOME/sbcflash/config.toml` (must exist).
    #[arg(long = "config-file", value_name = "FILE", env = "SBCFLASH_CONFIG")]
    pub(crate) config_file: Option<PathBuf>,
    /// Image cache directory.
    #[arg(long, value_name = "DIR")]
    pub(crate) cache_dir: Option<PathBuf>,
    /// Board to use when a command needs one.
    #[arg(long, value_name = "BOARD")]
    pub(crate) board: Option<String>,
    /// Station ledger file.
    #[arg(long, value_name = "FILE")]
    pub(crate) ledger: Option<PathBuf>,
}

impl ConfigFlags {
    pub(crate) fn to_flags(&self, g: &Global) -> Flags {
        Flags {
            config_file: self.config_file.clone(),
            cache_dir: self.cache_dir.clone(),
            board: self.board.clone(),
            boards_dirs: g.boards_dir.clone(),
            station_config: None,
            ledger: self.ledger.clone(),
        }
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct ShowArgs {
    #[command(flatten)]
    pub(crate) flags: ConfigFlags,
}

#[derive(Debug, clap::Args)]
pub(crate) struct PathArgs {
    #[command(flatten)]
    pub(crate) flags: ConfigFlags,
}

pub(crate) fn run_config(a: ConfigArgs, g: &Global) -> anyhow::Result<Exit> {
    config(a, g)
}

fn config(a: ConfigArgs, g: &Global) -> anyhow::Result<Exit> {
    let mut out = super::out::stdout();
    match a.action {
        ConfigAction::Example => {
            out.write_all(crate::config::EXAMPLE.as_bytes())?;
        }
        ConfigAction::Path(p) => {
            let path = match &p.flags.config_file {
                Some(f) => Some(f.clone()),
                None => crate::config::default_path(&|k| std::env::var_os(k)).map(|(p, _)| p),
            };
            let path = path.ok_or_else(|| {
                ExitError::new(
                    Exit::Environment,
                    "neither $XDG_CONFIG_HOME nor $HOME is set: no config file location",
                )
            })?;
            if g.json {
                let v = serde_json::json!({
                    "path": path, "exists": path.exists(),
                });
                crate::progress::json_line(&mut out, "config-path", v)?;
            } else {
                writeln!(out, "{}", path.display())?;
            }
        }
        ConfigAction::Show(s) => {
            let cfg = Config::load(&s.flags.to_flags(g))?;
            if g.json {
                let v = serde_json::json!({
                    "config": cfg,
                });
                crate::progress::json_line(&mut out, "config", v)?;
            } else {
                write_show(&mut out, &cfg)?;
            }
        }
    }
    out.flush()?;
    Ok(Exit::Ok)
}

/// Human form: valid TOML (paste it into a config file), with the source as a comment.
fn write_show(out: &mut dyn Write, cfg: &Config) -> std::io::Result<()> {
    match &cfg.file {
        Some(f) => writeln!(out, "# config file: {}", f.display())?,
        None => writeln!(out, "# config file: none (built-in defaults)")?,
    }
    let rows = cfg.rows();
    let width = rows
        .iter()
        .map(|(k, v, _)| k.len() + v.len() + 3)
        .max()
        .unwrap_or(0);
    let mut section = "";
    for (key, value, source) in rows {
        let (sec, name) = key.split_once('.').unwrap_or(("", key));
        if sec != section {
            writeln!(out, "\n[{sec}]")?;
            section = sec;
        }
        let line = if value == "(unset)" {
            format!("# {name} =")
        } else {
            format!("{name} = {value}")
        };
        writeln!(out, "{line:width$}  # {source}")?;
    }
    Ok(())
}
