//! `fetch`, `cache` and `build`: flags and glue over `crate::acquire`.

use super::Global;
use crate::acquire::cache::{parse_size, Cache, Origin};
use crate::acquire::nix::{find_image, installable, NixBuild};
use crate::acquire::source::{Acquirer, SourceSpec};
use crate::acquire::{AcquireError, DownloadOptions, Pin};
use crate::exit::{Exit, ExitError};
use crate::progress::Phase;
use crate::progress::{Event, Level, Reporter};
use anyhow::Context as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The cache directory: `--cache-dir` / $SBCFLASH_CACHE_DIR, else the config file's
/// `cache-dir`, else $XDG_CACHE_HOME/sbcflash (the config module owns that precedence).
pub(crate) fn cache_dir(explicit: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let flags = crate::config::Flags::default();
    Ok(crate::config::Config::load(&flags)?.cache_dir.value)
}

/// Network, cache and trust options shared by everything that acquires an image.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct AcquireOpts {
    /// Cache directory (default: the config file's cache-dir, else $XDG_CACHE_HOME/sbcflash).
    #[arg(long, value_name = "DIR", env = "SBCFLASH_CACHE_DIR")]
    pub(crate) cache_dir: Option<PathBuf>,
    /// Extra CA certificate(s) (PEM) to trust, for a private mirror; the server's own
    /// self-signed certificate given here is pinned (name and dates still checked), as with
    /// `curl --cacert`.
    #[arg(long, value_name = "PEM")]
    pub(crate) ca_file: Option<PathBuf>,
    /// Give up on a connection after this many seconds without data (then retry).
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub(crate) timeout: f64,
    /// Connect timeout in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 15.0)]
    pub(crate) connect_timeout: f64,
    /// Retries after a failed attempt (resuming where it stopped); 1 MiB of progress resets the count.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub(crate) retries: u32,
    /// Refuse sources without a published digest instead of warning.
    #[arg(long)]
    pub(crate) require_pinned: bool,
}

impl AcquireOpts {
    pub(crate) fn download_options(&self) -> anyhow::Result<DownloadOptions> {
        let secs = |v: f64, what: &str| {
            if v.is_finite() && v > 0.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(ExitError::new(
                    Exit::Usage,
                    format!("--{what} must be a positive number of seconds"),
                ))
            }
        };
        // Mirrors come from the config file only (a lab-wide setting, not a per-run flag).
        let mirrors = crate::config::Config::load(&crate::config::Flags::default())?
            .mirrors
            .value;
        Ok(DownloadOptions {
            ca_file: self.ca_file.clone(),
            mirrors,
            connect_timeout: secs(self.connect_timeout, "connect-timeout")?,
            idle_timeout: secs(self.timeout, "timeout")?,
            retries: self.retries,
            ..DownloadOptions::default()
        })
    }

    pub(crate) fn cache(&self) -> anyhow::Result<Cache> {
        let dir = cache_dir(self.cache_dir.as_deref())?;
        Ok(Cache::open(&dir)?)
    }

    pub(crate) fn acquirer(&self, reporter: Arc<dyn Reporter>) -> anyhow::Result<Acquirer> {
        Ok(Acquirer {
            cache: Arc::new(self.cache()?),
            opts: self.download_options()?,
            require_pinned: self.require_pinned,
            reporter,
        })
    }
}

/// A published digest given on the command line.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct PinArgs {
    /// Published blake3 of the file as downloaded.
    #[arg(long, value_name = "HEX", conflicts_with = "sha256")]
    pub(crate) blake3: Option<String>,
    /// Published sha256 of the file as downloaded.
    #[arg(long, value_name = "HEX")]
    pub(crate) sha256: Option<String>,
}

impl PinArgs {
    pub(crate) fn pin(&self) -> anyhow::Result<Option<Pin>> {
        Ok(match (&self.blake3, &self.sha256) {
            (Some(h), _) => Some(Pin::from_parts("blake3", h)?),
            (None, Some(h)) => Some(Pin::from_parts("sha256", h)?),
            _ => None,
        })
    }
}

/// What `write` needs to take a URL (or a board's default source) instead of a file.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct StreamArgs {
    /// Published blake3 of the downloaded file (for `write URL`).
    #[arg(long, value_name = "HEX", conflicts_with = "source_sha256")]
    pub(crate) source_blake3: Option<String>,
    /// Published sha256 of the downloaded file (for `write URL`).
    #[arg(long, value_name = "HEX")]
    pub(crate) source_sha256: Option<String>,
    /// Also keep the downloaded file in the cache (committed only if its digest checks out).
    #[arg(long)]
    pub(crate) keep: bool,
    #[command(flatten)]
    pub(crate) opts: AcquireOpts,
}

impl StreamArgs {
    /// For a write whose image is a local file (`build TARGET`): no source digest, no tee.
    pub(crate) fn local_only() -> StreamArgs {
        StreamArgs {
            source_blake3: None,
            source_sha256: None,
            keep: false,
            opts: AcquireOpts {
                cache_dir: None,
                ca_file: None,
                timeout: 30.0,
                connect_timeout: 15.0,
                retries: 5,
                require_pinned: false,
            },
        }
    }
}

/// For `write`: when IMAGE is a URL, or absent with `--board`, the image is streamed from the
/// network (or the cache) instead of opened from a file. Returns None for a local file.
/// After the write, pass its result to [`crate::acquire::remote::RemoteCheck::finish`].
pub(crate) fn remote_image(
    image: Option<&str>,
    board: Option<&str>,
    s: &StreamArgs,
    member: Option<&str>,
    g: &Global,
    reporter: Arc<dyn Reporter>,
    job: &str,
) -> anyhow::Result<
    Option<(
        crate::image::OpenedImage,
        crate::acquire::remote::RemoteCheck,
    )>,
> {
    let spec = match (image, board) {
        (Some(u), _) if crate::acquire::remote::is_url(u) => SourceSpec {
            url: u.to_string(),
            pin: PinArgs {
                blake3: s.source_blake3.clone(),
                sha256: s.source_sha256.clone(),
            }
            .pin()?,
        },
        (None, Some(b)) => crate::acquire::board_source(&super::boards::registry(g)?, b)?,
        _ => return Ok(None),
    };
    let acq = s.opts.acquirer(reporter)?;
    Ok(Some(crate::acquire::remote::open_for_write(
        acq,
        spec,
        s.keep,
        member,
        job.to_string(),
    )?))
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  sbcflash fetch https://example.org/nixos.img.zst --sha256 9f86…\n  sbcflash fetch --board opi5\n\nPrints `<blake3>  <cached path>` on success."
)]
pub struct FetchArgs {
    /// URL to download (https://; http:// only with a pinned digest).
    #[arg(value_name = "URL", required_unless_present = "board")]
    pub(crate) url: Option<String>,
    /// Fetch the board's default image source.
    #[arg(long, conflicts_with = "url")]
    pub(crate) board: Option<String>,
    #[command(flatten)]
    pub(crate) pin: PinArgs,
    #[command(flatten)]
    pub(crate) opts: AcquireOpts,
}

pub(crate) fn run_fetch(a: FetchArgs, g: &Global) -> anyhow::Result<Exit> {
    let reporter: Arc<dyn Reporter> = Arc::from(g.reporter());
    let src = match (&a.url, &a.board) {
        (Some(url), _) => SourceSpec {
            url: url.clone(),
            pin: a.pin.pin()?,
        },
        (None, Some(b)) => crate::acquire::board_source(&super::boards::registry(g)?, b)?,
        (None, None) => unreachable!("clap requires one"),
    };
    let acq = a.opts.acquirer(reporter.clone())?;
    let f = acq.fetch(&src)?;
    reporter.report(Event::Finish {
        job: src.url.clone(),
        phase: Phase::Fetch,
        summary: serde_json::json!({
            "path": f.entry.path,
            "blake3": f.entry.blake3,
            "sha256": f.entry.sha256,
            "bytes": f.entry.size,
            "pinned": f.pinned,
            "from_cache": f.from_cache,
        }),
    });
    if !g.json {
        outln!("{}  {}", f.entry.blake3, f.entry.path.display());
    }
    Ok(Exit::Ok)
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  sbcflash cache list\n  sbcflash cache verify                         # exit code 6 if an entry was corrupt\n  sbcflash cache prune --older-than 30d --max-size 20G"
)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub(crate) cmd: CacheCmd,
    /// Cache directory (default: the config file's cache-dir, else $XDG_CACHE_HOME/sbcflash).
    #[arg(long, value_name = "DIR", env = "SBCFLASH_CACHE_DIR", global = true)]
    pub(crate) cache_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum CacheCmd {
    /// List cached images, most recently used first, then the station's decoded images.
    List,
    /// Re-hash every entry (decoded images too); remove corrupted ones (exit code 6 if any
    /// were found).
    Verify,
    /// Remove old entries, abandoned partial downloads and the station's decoded images
    /// (derived data; those a running station holds are kept).
    Prune {
        /// Remove entries not used for this long (e.g. 30d, 12h).
        #[arg(long, value_name = "AGE")]
        older_than: Option<humantime::Duration>,
        /// Then remove least recently used entries until the cache is at most this big (e.g. 20G).
        #[arg(long, value_name = "SIZE")]
        max_size: Option<String>,
    },
}

pub(crate) fn run_cache(a: CacheArgs, g: &Global) -> anyhow::Result<Exit> {
    let dir = cache_dir(a.cache_dir.as_deref())?;
    let cache = Cache::open(&dir)?;
    // The station's decoded images (derived data) live in the cache too.
    let decoded_dir = dir.join(crate::acquire::cache::DECODED_SUBDIR);
    match a.cmd {
        CacheCmd::List => cache_list(&cache, &dir, &decoded_dir, g),
        CacheCmd::Verify => cache_verify(&cache, &dir, &decoded_dir, g),
        CacheCmd::Prune {
            older_than,
            max_size,
        } => cache_prune(&cache, &decoded_dir, older_than, max_size, g),
    }
}

/// `cache list`: source images, then the station's decoded images.
fn cache_list(cache: &Cache, dir: &Path, decoded_dir: &Path, g: &Global) -> anyhow::Result<Exit> {
    let entries = cache.list()?;
    let decoded = crate::station::decoded::list(decoded_dir)?;
    if g.json {
        // One JSON line an item: `event` says which kind.
        let emit =
            |mut v: serde_json::Value, event: &str, path: Option<String>| -> std::io::Result<()> {
                if let (Some(o), Some(p)) = (v.as_object_mut(), path) {
                    o.insert("path".into(), p.into());
                }
                crate::progress::json_line(&mut super::out::stdout(), event, v)
            };
        for e in &entries {
            let path = e.path.display().to_string();
            emit(serde_json::to_value(e)?, "cache-entry", Some(path))?;
        }
        for d in &decoded {
            emit(serde_json::to_value(d)?, "cache-decoded", None)?;
        }
    } else if entries.is_empty() && decoded.is_empty() {
        eprintln!("cache {} is empty", dir.display());
    } else {
        let row = |a: &str, b: &str, c: &str, d: &str| -> std::io::Result<()> {
            outln!("{a:<64}  {b:>10}  {c:<16}  {d}");
            Ok(())
        };
        let when = |t: &chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M").to_string();
        row("BLAKE3", "SIZE", "LAST USED", "SOURCE")?;
        for e in &entries {
            row(
                &e.blake3,
                &crate::target::human_size(e.size),
                &when(&e.last_used),
                e.origin.as_deref().or(e.name.as_deref()).unwrap_or("-"),
            )?;
        }
        if !decoded.is_empty() {
            outln!("\nDecoded by the station (derived from the source file named; safe to prune):");
            row("SOURCE BLAKE3", "ON DISK", "LAST USED", "STATE")?;
        }
        for d in &decoded {
            let state = match (d.in_use, d.size) {
                (true, _) => "in use by a running station",
                (false, None) => "incomplete",
                (false, Some(_)) => "idle",
            };
            row(
                &d.source_blake3,
                &crate::target::human_size(d.disk_bytes),
                &when(&d.last_used),
                state,
            )?;
        }
    }
    Ok(Exit::Ok)
}

/// `cache verify`: rehash every entry, remove the bad ones.
fn cache_verify(cache: &Cache, dir: &Path, decoded_dir: &Path, g: &Global) -> anyhow::Result<Exit> {
    let reporter = g.reporter();
    let mut started = |name: &str, size| {
        reporter.report(Event::Start {
            job: name.to_string(),
            phase: Phase::CacheVerify,
            total: Some(size),
            detail: None,
        });
    };
    let (ok, mut problems) = cache.verify(&mut started)?;
    let (dec_ok, dec_problems) = crate::station::decoded::verify(decoded_dir, &mut started)?;
    let ok = ok + dec_ok;
    problems.extend(dec_problems);
    for p in &problems {
        reporter.report(Event::Message {
            job: p.entry.clone(),
            level: Level::Warn,
            text: format!(
                "{}: {}; {}",
                p.entry,
                p.problem,
                if p.removed {
                    "removed"
                } else {
                    "could NOT be removed"
                }
            ),
        });
    }
    reporter.report(Event::Finish {
        job: "cache".into(),
        phase: Phase::CacheVerify,
        summary: serde_json::json!({ "ok": ok, "problems": problems }),
    });
    if !g.json {
        outln!(
            "{ok} entries ok, {} problem(s) found and removed",
            problems.len()
        );
    }
    if problems.is_empty() {
        Ok(Exit::Ok)
    } else {
        Err(ExitError::new(
            Exit::Verify,
            format!(
                "cache {}: {} corrupted or foreign entr{} found and removed",
                dir.display(),
                problems.len(),
                if problems.len() == 1 { "y" } else { "ies" }
            ),
        )
        .into())
    }
}

/// `cache prune`: by age, then by size (source images before decoded ones).
fn cache_prune(
    cache: &Cache,
    decoded_dir: &Path,
    older_than: Option<humantime::Duration>,
    max_size: Option<String>,
    g: &Global,
) -> anyhow::Result<Exit> {
    let reporter = g.reporter();
    if older_than.is_none() && max_size.is_none() {
        return Err(ExitError::new(
            Exit::Usage,
            "cache prune: give --older-than and/or --max-size",
        )
        .into());
    }
    let max = max_size.as_deref().map(parse_size).transpose()?;
    let older_than: Option<std::time::Duration> = older_than.map(Into::into);
    // Age first for both kinds; then the size budget is spent on source images
    // before decoded ones (derived data, cheaper to rebuild than to download).
    let mut rep = cache.prune(older_than, None)?;
    let dec = crate::station::decoded::prune(
        decoded_dir,
        older_than,
        max.map(|m| m.saturating_sub(rep.kept_bytes)),
    )?;
    if let Some(m) = max {
        let sized = cache.prune(None, Some(m.saturating_sub(dec.kept_bytes)))?;
        rep.removed.extend(sized.removed);
        rep.freed_bytes += sized.freed_bytes;
        rep.kept = sized.kept;
        rep.kept_bytes = sized.kept_bytes;
    }
    rep.removed.extend(dec.removed);
    rep.freed_bytes += dec.freed_bytes;
    rep.kept += dec.kept;
    rep.kept_bytes += dec.kept_bytes;
    reporter.report(Event::Finish {
        job: "cache".into(),
        phase: Phase::CachePrune,
        summary: serde_json::to_value(&rep)?,
    });
    if !g.json {
        outln!(
            "removed {} item(s), freed {}; {} entries ({}) kept",
            rep.removed.len(),
            crate::target::human_size(rep.freed_bytes),
            rep.kept,
            crate::target::human_size(rep.kept_bytes)
        );
    }
    Ok(Exit::Ok)
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  sbcflash build --board opi5 --flake github:me/nixos-config#opi5 /dev/sdb\n  sbcflash build --board opi5 --flake .#opi5      # build and cache only\n  sbcflash build --flake .#opi5 --builders 'ssh://builder aarch64-linux' --max-jobs 0\n\nWith a TARGET, the built image is written to it like `sbcflash write` does (target checks,\nconfirmation or --yes, the board check, read-back verification). Without one, prints\n`<blake3>  <cached path>` of the image."
)]
pub struct BuildArgs {
    /// Where to write the built image (a card, disk or file); without it, only build and cache.
    #[arg(value_name = "TARGET")]
    pub(crate) target: Option<PathBuf>,
    /// FLAKEREF#HOST (attribute path from the board's template) or FLAKEREF#attr.path.
    #[arg(long, value_name = "REF#HOST")]
    pub(crate) flake: String,
    /// --board: whose attribute template to use (default template:
    /// nixosConfigurations.<host>.config.system.build.sdImage); with a TARGET, also
    /// --medium/--spi/--strict/--bootloader as for `sbcflash write`.
    #[command(flatten)]
    pub(crate) board: super::boards::BoardWriteArgs,
    /// With a TARGET: do not ask for confirmation (required when stdin is not a terminal).
    #[arg(short, long, requires = "target")]
    pub(crate) yes: bool,
    /// With a TARGET: allow targets that are not removable USB disks, SD cards or loop devices.
    #[arg(long, requires = "target")]
    pub(crate) force: bool,
    /// With a TARGET: skip reading it back after writing.
    #[arg(long, requires = "target")]
    pub(crate) no_verify: bool,
    /// With a TARGET: do not discard the device before writing.
    #[arg(long, requires = "target")]
    pub(crate) no_discard: bool,
    /// Attribute template overriding the board's; `<host>` is replaced.
    #[arg(long, value_name = "TEMPLATE", conflicts_with = "image_variant")]
    pub(crate) attr_template: Option<String>,
    /// Build a NixOS 25.05+ image variant (`system.build.images.<NAME>`, as
    /// `nixos-rebuild build-image --image-variant NAME`), e.g. `sd-card`, instead of
    /// `system.build.sdImage`.
    #[arg(long, value_name = "NAME")]
    pub(crate) image_variant: Option<String>,
    /// Boot-test the built image first (`sbcflash try`: QEMU virt, U-Boot distro boot, login,
    /// the check); the TARGET is written only if it passed.
    #[arg(long = "try")]
    pub(crate) try_boot: bool,
    /// Passed to nix: remote builders (as in nix.buildMachines); which one built what is
    /// reported, and an unreachable one is named (exit 5). ssh options: NIX_SSHOPTS.
    #[arg(long, value_name = "SPEC")]
    pub(crate) builders: Option<String>,
    /// Passed to nix: local build jobs (0 = only remote builders).
    #[arg(long, value_name = "N")]
    pub(crate) max_jobs: Option<String>,
    /// Passed to nix: the system to build for (e.g. aarch64-linux via binfmt/emulation).
    #[arg(long, value_name = "SYSTEM")]
    pub(crate) system: Option<String>,
    /// Passed to nix as `--option NAME VALUE` (repeatable).
    #[arg(long = "option", value_names = ["NAME", "VALUE"], num_args = 2, action = clap::ArgAction::Append)]
    pub(crate) nix_option: Vec<String>,
    /// The nix binary to run.
    #[arg(long, value_name = "PATH", hide = true)]
    pub(crate) nix: Option<PathBuf>,
    /// Cache directory (default: the config file's cache-dir, else $XDG_CACHE_HOME/sbcflash).
    #[arg(long, value_name = "DIR", env = "SBCFLASH_CACHE_DIR")]
    pub(crate) cache_dir: Option<PathBuf>,
}

pub(crate) fn run_build(a: BuildArgs, g: &Global) -> anyhow::Result<Exit> {
    let reporter: Arc<dyn Reporter> = Arc::from(g.reporter());
    let Some(target) = a.target.clone() else {
        let (entry, img) = build_image(&a, g, &reporter)?;
        if a.try_boot {
            super::tryboot::try_built(&img, a.board.board.clone(), g)?;
        }
        if !g.json {
            outln!("{}  {}", entry.blake3, entry.path.display());
        }
        return Ok(Exit::Ok);
    };
    // A build can take hours: refuse a target that can never be written before starting it.
    super::write::precheck_target(&target, a.force, a.yes)?;
    let (entry, img) = build_image(&a, g, &reporter)?;
    if a.try_boot {
        // Nothing is written unless the image booted.
        super::tryboot::try_built(&img, a.board.board.clone(), g)
            .context("the built image did not pass `try`; the target was not changed")?;
    }
    tracing::info!(
        "built {} (cached as {})",
        img.display(),
        entry.path.display()
    );
    // The rest is `sbcflash write IMAGE TARGET` with the same flags: every check it makes.
    let w = super::write::WriteArgs {
        paths: vec![img, target],
        image: None,
        board: a.board.clone(),
        img: super::write::ImageFlags {
            bmap: None,
            no_bmap: false,
            member: None,
        },
        blake3: None,
        trust: Default::default(),
        no_verify: a.no_verify,
        yes: a.yes,
        force: a.force,
        raw: false,
        eject: false,
        no_discard: a.no_discard,
        delta: false,
        rewrites: 1,
        stream: StreamArgs::local_only(),
        usb: Default::default(),
    };
    super::write::run_write(w, g)
}

/// Runs the build and puts its image in the cache; returns the entry and the image's path in
/// the Nix store.
pub(crate) fn build_image(
    a: &BuildArgs,
    g: &Global,
    reporter: &Arc<dyn Reporter>,
) -> anyhow::Result<(crate::acquire::CacheEntry, PathBuf)> {
    let template = match (&a.attr_template, &a.board.board) {
        (Some(t), _) => Some(t.clone()),
        (None, _) if a.image_variant.is_some() => Some(format!(
            "nixosConfigurations.<host>.config.system.build.images.{}",
            a.image_variant.as_deref().unwrap_or_default()
        )),
        (None, Some(b)) => Some(crate::acquire::board_flake_template(
            &super::boards::registry(g)?,
            b,
        )?),
        _ => None,
    };
    let inst = installable(&a.flake, template.as_deref())?;
    let options = a
        .nix_option
        .chunks(2)
        .map(|c| (c[0].clone(), c.get(1).cloned().unwrap_or_default()))
        .collect();
    let nb = NixBuild {
        installable: inst.clone(),
        builders: a.builders.clone(),
        max_jobs: a.max_jobs.clone(),
        system: a.system.clone(),
        options,
        nix: a.nix.clone(),
    };
    let job = "nix-build".to_string();
    reporter.report(Event::Start {
        job: job.clone(),
        phase: Phase::Build,
        total: None,
        detail: Some(inst.clone()),
    });
    tracing::info!("running {}", nb.describe());
    let verbose = g.verbose > 0;
    let json = g.json;
    let built = nb.run(&mut |line| {
        if verbose && !json {
            eprintln!("    {line}");
        } else if verbose {
            reporter.report(Event::Message {
                job: job.clone(),
                level: Level::Info,
                text: line.to_string(),
            });
        }
    })?;
    for (m, why) in &built.unusable {
        reporter.report(Event::Message {
            job: job.clone(),
            level: Level::Warn,
            text: format!("remote builder {m} could not be used: {why}"),
        });
    }
    for (drv, m) in &built.remote {
        reporter.report(Event::Message {
            job: job.clone(),
            level: Level::Info,
            text: format!("built {} on {m}", crate::acquire::nix::drv_name(drv)),
        });
    }
    let built_on: Vec<serde_json::Value> = built
        .remote
        .iter()
        .map(|(drv, m)| serde_json::json!({"drv": drv, "machine": m}))
        .collect();
    let mut found = None;
    let mut last_err = None;
    for o in &built.outs {
        match find_image(o) {
            Ok(p) => {
                found = Some(p);
                break;
            }
            Err(e) => last_err = Some(e),
        }
    }
    let img = match (found, last_err) {
        (Some(p), _) => p,
        (None, Some(e)) => return Err(e.into()),
        (None, None) => return Err(AcquireError::NoImageInOutput { path: inst }.into()),
    };
    let cache = Cache::open(&cache_dir(a.cache_dir.as_deref())?)?;
    let mut f = std::fs::File::open(&img).with_context(|| format!("open {}", img.display()))?;
    let entry = cache.ingest(
        &mut f,
        false,
        Origin {
            name: img.file_name().map(|n| n.to_string_lossy().to_string()),
            origin: Some(inst.clone()),
            pinned: None,
        },
        &|_| Ok(()),
    )?;
    reporter.report(Event::Finish {
        job,
        phase: Phase::Build,
        summary: serde_json::json!({
            "installable": inst,
            "image": img,
            "path": entry.path,
            "blake3": entry.blake3,
            "bytes": entry.size,
            "built_on": built_on,
        }),
    });
    Ok((entry, img))
}
