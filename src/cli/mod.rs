//! Command-line definitions and wiring only: each subcommand's flags and glue live in the
//! file named after it, and call into the library modules that do the work.

use clap::{FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

use crate::exit::Exit;
use crate::progress;

// First, so its `outln!`/`out!` macros are in scope in every other CLI module.
#[macro_use]
pub(crate) mod out;

pub(crate) mod acquire;
pub mod boards;
pub mod capture;
pub mod classify;
pub(crate) mod console;
pub mod help;
pub mod meta;
pub(crate) mod station;
pub(crate) mod trust;
pub(crate) mod tryboot;
pub mod usb;
pub(crate) mod write;

pub use classify::classify;

const AFTER_HELP: &str = "\
Examples:
  sbcflash list                                   # removable disks only
  sbcflash write --board rpi4 nixos-sd-image.img.zst /dev/sdX
  sbcflash boards show opi5
  sbcflash bootstrap --board opi5 --port /dev/ttyUSB0 --flake .#opi5-lab
  sbcflash station --config station.toml --dry-run

Run 'sbcflash <command> --help' for each command's examples and the exit codes.";

/// The parser's definitions. Parse with [`help::command`] (as `main` does) to get the
/// examples and exit codes on every subcommand's help.
#[derive(Debug, Parser)]
#[command(name = "sbcflash", version, about, long_about = None, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parse `args` as the binary does: the decorated command tree, clap's colours following
    /// `--color`. Prints help/version or a usage error (exit 2) and exits, like `Cli::parse`.
    pub(crate) fn parse_decorated(args: Vec<std::ffi::OsString>) -> Self {
        use clap::error::ErrorKind;
        let color = help::clap_color(&args);
        // Decorating walks the whole tree and parses every example: only worth it for help.
        let plain = <Self as clap::CommandFactory>::command().color(color);
        let cmd = match plain.clone().try_get_matches_from(&args) {
            Ok(m) => {
                return Self::from_arg_matches(&m).unwrap_or_else(|e| e.with_cmd(&plain).exit())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::DisplayHelp | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                ) =>
            {
                help::command().color(color)
            }
            Err(e) => e.exit(),
        };
        let matches = cmd.clone().get_matches_from(args);
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.with_cmd(&cmd).exit())
    }
}

/// Options every subcommand understands.
#[derive(Debug, Clone, clap::Args)]
pub struct Global {
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Machine-readable output: one JSON object per line on stdout, each with `event` and `schema` (docs/json.md).
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bars or notes on stderr (results still go to stdout, errors to stderr).
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// When to use colour (NO_COLOR is honoured by `auto`).
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto, global = true)]
    pub color: ColorChoice,
    /// Extra directory of board descriptors (*.toml); overrides shipped and user boards.
    #[arg(long, value_name = "DIR", global = true)]
    pub boards_dir: Vec<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

impl Global {
    /// Whether to colour what goes to a stream: `--color always|never` wins; `auto` colours a
    /// terminal unless `NO_COLOR` is set to anything non-empty (no-color.org).
    pub(crate) fn color_for(&self, is_terminal: bool) -> bool {
        match self.color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                is_terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
            }
        }
    }
    /// Applies [`Global::color_for`] to everything that styles text through the `console`
    /// crate (indicatif's bars, station UI).
    pub(crate) fn apply_color(&self) {
        use std::io::IsTerminal;
        ::console::set_colors_enabled(self.color_for(std::io::stdout().is_terminal()));
        ::console::set_colors_enabled_stderr(self.color_for(std::io::stderr().is_terminal()));
    }
    pub(crate) fn progress_mode(&self) -> progress::Mode {
        if self.json {
            progress::Mode::Json
        } else if self.quiet {
            progress::Mode::Quiet
        } else {
            progress::Mode::Auto
        }
    }
    pub(crate) fn reporter(&self) -> Box<dyn progress::Reporter> {
        progress::reporter(self.progress_mode())
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write an image to a card, disk, file or a board in USB recovery mode.
    Write(Box<write::WriteArgs>),
    /// List candidate target disks (removable first).
    List(write::ListArgs),
    /// Print the blake3 digest of an image's logical contents.
    Hash(write::HashArgs),
    /// Check a device or file against an image without writing.
    Verify(write::VerifyArgs),
    /// List the known boards, or show one.
    Boards(boards::BoardsArgs),
    /// Download an image into the cache.
    Fetch(acquire::FetchArgs),
    /// Inspect and maintain the image cache.
    Cache(acquire::CacheArgs),
    /// Build a NixOS image with `nix build`.
    Build(acquire::BuildArgs),
    /// Interactive serial terminal with a transcript.
    Console(console::ConsoleArgs),
    /// Follow a board from power-on over its serial console and hand it to nixos-rebuild.
    Bootstrap(console::BootstrapArgs),
    /// Send a file to U-Boot over the serial console (YMODEM) and run a command.
    SerialLoad(console::SerialLoadArgs),
    /// List boards attached in a USB recovery mode.
    Usb(usb::UsbArgs),
    /// Allwinner FEL basics.
    Fel(usb::FelArgs),
    /// Factory provisioning station.
    Station(station::StationArgs),
    /// Boot an image on QEMU's virt machine through U-Boot and check that it comes up.
    Try(tryboot::TryArgs),
    /// Print shell completions.
    Completions(meta::CompletionsArgs),
    /// Print the man page (roff).
    Man(meta::ManArgs),
    /// Show the merged configuration.
    Config(meta::ConfigArgs),
    /// Capture a disk (or a board, --via) as an image: partition table and used blocks only, zstd + bmap + blake3.
    Read(capture::ReadArgs),
    /// Check a card for fake capacity and blocks that do not read back (writes test blocks).
    CheckCard(capture::CheckCardArgs),
}

/// Entry point used by `main.rs`.
pub fn main() -> ExitCode {
    let cli = Cli::parse_decorated(std::env::args_os().collect());
    cli.global.apply_color();
    init_logging(&cli.global);
    let json = cli.global.json;
    match run(cli) {
        Ok(code) => ExitCode::from(code.code()),
        // The reader of stdout went away (`| head`): it got what it wanted.
        Err(err) if out::is_stdout_closed(&err) => ExitCode::SUCCESS,
        Err(err) => {
            let code = classify(&err);
            let message = error_text(&err);
            if json {
                let ev = serde_json::json!({ "message": message, "exit_code": code.code() });
                // Best effort: the message goes to stderr below in any case.
                let _ = progress::json_line(&mut out::stdout(), "error", ev);
            }
            eprintln!("error: {message}");
            ExitCode::from(code.code())
        }
    }
}

/// The error chain on one line, like `{:#}`, but a cause whose text its parent already
/// quoted (`"{path}: {source}"` with `#[source]`) is not printed twice.
pub(crate) fn error_text(err: &anyhow::Error) -> String {
    let mut s = String::new();
    for cause in err.chain() {
        let t = cause.to_string();
        if s.contains(&t) {
            continue;
        }
        if !s.is_empty() {
            s.push_str(": ");
        }
        s.push_str(&t);
    }
    s
}

fn run(cli: Cli) -> anyhow::Result<Exit> {
    let g = &cli.global;
    match cli.command {
        Command::Write(a) => write::run_write(*a, g),
        Command::List(a) => write::run_list(a, g),
        Command::Hash(a) => write::run_hash(a, g),
        Command::Verify(a) => write::run_verify(a, g),
        Command::Boards(a) => boards::run(a, g),
        Command::Fetch(a) => acquire::run_fetch(a, g),
        Command::Cache(a) => acquire::run_cache(a, g),
        Command::Build(a) => acquire::run_build(a, g),
        Command::Console(a) => console::run_console(a, g),
        Command::Bootstrap(a) => console::run_bootstrap(a, g),
        Command::SerialLoad(a) => console::run_serial_load(a, g),
        Command::Usb(a) => usb::run_usb(a, g),
        Command::Fel(a) => usb::run_fel(a, g),
        Command::Station(a) => station::run(a, g),
        Command::Try(a) => tryboot::run_try(a, g),
        Command::Completions(a) => meta::run_completions(a, g),
        Command::Man(a) => meta::run_man(a, g),
        Command::Config(a) => meta::run_config(a, g),
        Command::Read(a) => capture::run_read(a, g),
        Command::CheckCard(a) => capture::run_check_card(a, g),
    }
}

fn init_logging(g: &Global) {
    use tracing_subscriber::EnvFilter;
    let default = match g.verbose {
        // fatfs warns about harmless BPB quirks of mkfs.vfat volumes on every open.
        0 => "warn,fatfs=error",
        1 => "sbcflash=info",
        2 => "sbcflash=debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let ansi = g.color_for(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}
