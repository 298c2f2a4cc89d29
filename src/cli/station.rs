//! `station` and `station report`: flags and glue over `crate::station`.

use super::Global;
use crate::exit::{Exit, ExitError};
use crate::progress::{Level, Reporter};
use crate::station::{self, config::Station, job::ImagePlan, ledger, ui};
use anyhow::Context as _;
use std::path::PathBuf;
use std::sync::Arc;

const EXAMPLES: &str = "Examples:
  sbcflash station --config /etc/sbcflash/station.toml --dry-run
  sbcflash station --config /etc/sbcflash/station.toml
  sbcflash station --config station.toml --flash-present --exit-after 4 --json
  sbcflash station report --config station.toml --since 2026-11-01 --format csv
  sbcflash station report --config station.toml --known-hosts >> ~/.ssh/known_hosts
  sbcflash station report --ledger postgresql://station@db.lan/line --station line1-a
  sbcflash station status --ledger postgresql://station@db.lan/line

A compressed or sparse image is decoded once into the cache (`decoded/`) for all slots. At
start the station removes decoded images of other sources used before its own, unless another
running station holds them; `sbcflash cache list|verify|prune` cover the rest.";

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, after_help = EXAMPLES)]
pub struct StationArgs {
    #[command(subcommand)]
    pub(crate) command: Option<StationCommand>,
    /// The station's configuration: image, slots, identity (default: `station.config` from
    /// the user config file).
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// The ledger file (default: `ledger` in the station config, else `station.ledger` from
    /// the user config).
    #[arg(long, value_name = "FILE")]
    pub(crate) ledger: Option<PathBuf>,
    /// Also flash cards that are already inserted when the station starts (by default they
    /// are listed and left alone until replaced).
    #[arg(long)]
    pub(crate) flash_present: bool,
    /// Show what would be flashed where, and what is never touched; write nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Stop after this many units have ended (a batch run); default: run until stopped.
    #[arg(long, value_name = "N")]
    pub(crate) exit_after: Option<u64>,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum StationCommand {
    /// Export the ledger (one row per unit and attempt); a central ledger's report covers
    /// every station of the line.
    Report(ReportArgs),
    /// Each station of a line's central ledger: last heartbeat, units today, PASS/FAIL,
    /// rows waiting in its outbox.
    Status(StatusArgs),
}

/// How to reach a central ledger from the command line (report, status).
#[derive(Debug, clap::Args)]
pub(crate) struct CentralArgs {
    /// Certificates trusted for the central ledger's TLS, besides the web PKI roots (default:
    /// the station config's `ledger_ca_file`).
    #[arg(long, value_name = "FILE")]
    pub(crate) ca_file: Option<PathBuf>,
    /// The file with the database role's password (default: the station config's
    /// `ledger_password_file`, the `ledger-password` credential, SBCFLASH_LEDGER_PASSWORD).
    #[arg(long, value_name = "FILE")]
    pub(crate) password_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    /// The station configuration whose central ledger to read.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// The central ledger, `postgresql://user@host/db` (overrides the configuration).
    #[arg(long, value_name = "URL")]
    pub(crate) ledger: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) central: CentralArgs,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ReportArgs {
    /// Only units started on or after this date (YYYY-MM-DD, UTC) or instant (RFC 3339).
    #[arg(long, value_name = "DATE")]
    pub(crate) since: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Csv)]
    pub(crate) format: ReportFormat,
    /// The station configuration whose ledger to read.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// The ledger file to read, or a line's central ledger `postgresql://user@host/db`
    /// (overrides the configuration).
    #[arg(long, value_name = "FILE|URL")]
    pub(crate) ledger: Option<PathBuf>,
    /// Print a known_hosts file instead: each passed unit's station-made SSH host key under
    /// its hostname, the serial as the comment (the latest row per hostname).
    #[arg(long, conflicts_with = "format")]
    pub(crate) known_hosts: bool,
    /// Central ledger only: this station's rows only.
    #[arg(long, value_name = "NAME")]
    pub(crate) station: Option<String>,
    #[command(flatten)]
    pub(crate) central: CentralArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ReportFormat {
    Csv,
    Json,
}

pub(crate) fn run(a: StationArgs, g: &Global) -> anyhow::Result<Exit> {
    match a.command {
        Some(StationCommand::Report(r)) => run_report(r, g.json),
        Some(StationCommand::Status(s)) => run_status(s, g.json),
        None => run_station(a, g),
    }
}

/// The user config, with the station flags folded in.
fn user_config(
    config: &Option<PathBuf>,
    ledger: &Option<PathBuf>,
) -> anyhow::Result<crate::config::Config> {
    Ok(crate::config::Config::load(&crate::config::Flags {
        station_config: config.clone(),
        ledger: ledger.clone(),
        ..Default::default()
    })?)
}

fn load_station(cfg: &crate::config::Config) -> anyhow::Result<Station> {
    let path = cfg.station.config.value.clone().ok_or_else(|| {
        ExitError::new(
            Exit::Usage,
            "no station configuration: pass --config FILE (or set station.config in the user config)",
        )
    })?;
    Ok(Station::load(&path)?)
}

/// Flag > station config > user config.
fn ledger_path(
    flag: &Option<PathBuf>,
    st: Option<&Station>,
    cfg: &crate::config::Config,
) -> PathBuf {
    flag.clone()
        .or_else(|| st.and_then(|s| s.ledger.clone()))
        .unwrap_or_else(|| cfg.station.ledger.value.clone())
}

/// `station`'s flags, the user config and the station config, resolved once: after
/// [`StationPlan::new`] nothing reads the flags again.
struct StationPlan {
    cfg: crate::config::Config,
    station: Station,
    /// Flag > station config > user config.
    ledger: PathBuf,
    flash_present: bool,
    dry_run: bool,
    exit_after: Option<u64>,
}

impl StationPlan {
    fn new(a: StationArgs) -> anyhow::Result<StationPlan> {
        let cfg = user_config(&a.config, &a.ledger)?;
        let station = load_station(&cfg)?;
        Ok(StationPlan {
            ledger: ledger_path(&a.ledger, Some(&station), &cfg),
            flash_present: a.flash_present || cfg.station.flash_present.value,
            dry_run: a.dry_run,
            exit_after: a.exit_after,
            cfg,
            station,
        })
    }
}

fn run_station(a: StationArgs, g: &Global) -> anyhow::Result<Exit> {
    let p = StationPlan::new(a)?;
    let (cfg, st, ledger_path, flash_present) = (&p.cfg, &p.station, &p.ledger, p.flash_present);
    let reporter: Arc<dyn Reporter> = Arc::from(g.reporter());
    // A dry run only hashes the image; decoding it into the cache is left to a real start.
    let image = Arc::new(resolve_image(st, cfg, reporter.clone(), !p.dry_run)?);

    if p.dry_run {
        let plan = station::plan(st, &image, ledger_path, flash_present)?;
        print_plan(&plan, g.json)?;
        return Ok(Exit::Ok);
    }

    if a_ledger_is_url(ledger_path) {
        return Err(ExitError::new(
            Exit::Usage,
            "--ledger: a station takes its central ledger from the station config (`ledger = \"postgresql://...\"`); --ledger names the local file",
        )
        .into());
    }
    let (mut ledger, stale) = ledger::Ledger::open(ledger_path)?;
    let style = if g.progress_mode() == crate::progress::Mode::Auto
        && std::io::IsTerminal::is_terminal(&std::io::stderr())
    {
        ui::Style::Bars
    } else {
        ui::Style::Stream
    };
    // On a terminal the station draws its own slot lines (see `ui::StationBars`).
    let ui = Arc::new(match style {
        ui::Style::Bars => ui::Ui::bars(st.ui.bell, st.ui.flash),
        ui::Style::Stream => ui::Ui::new(reporter, style, st.ui.bell, st.ui.flash),
    });
    if stale > 0 {
        ui.say(
            Level::Warn,
            format!(
                "{stale} unit(s) from an earlier run never finished (crash, kill or power loss); recorded as interrupted, not done"
            ),
        );
    }
    let courier = match &st.central {
        Some(c) => {
            let (courier, started) = station::courier::Courier::start(
                c,
                ledger_path,
                st.seq_start,
                st.scheme().needs_seq(),
                ui.clone(),
            )?;
            ledger.use_leased_serials(courier.refill());
            ui.say(
                Level::Info,
                format!(
                    "central ledger {} (schema {}), station {:?}, outbox {}: {} row(s) delivered at start{}",
                    station::central::redact(&c.url),
                    started.schema_version,
                    c.station,
                    ledger_path.display(),
                    started.delivered,
                    if started.abandoned > 0 {
                        format!(
                            ", {} serial block(s) of an earlier run abandoned (never reused)",
                            started.abandoned
                        )
                    } else {
                        String::new()
                    }
                ),
            );
            Some(courier)
        }
        None => None,
    };
    let totals = station::run(
        st,
        image,
        ledger,
        ui.clone(),
        &station::RunOptions {
            flash_present,
            exit_after: p.exit_after,
        },
    );
    if let Some(courier) = courier {
        match courier.shutdown() {
            Ok(0) => ui.say(Level::Info, "central ledger: every row delivered, unused serials returned"),
            Ok(n) => ui.say(
                Level::Warn,
                format!("central ledger: {n} row(s) still in the outbox; delivered at the next start"),
            ),
            Err(e) => ui.say(
                Level::Warn,
                format!("{e}; the outbox is delivered and the leased serials abandoned at the next start"),
            ),
        }
    }
    let totals = totals?;
    Ok(if totals.fail == 0 { Exit::Ok } else { Exit::Io })
}

/// Finds the image file (path, cache by digest, or download into the cache), checks its
/// pinned digest, and hashes its logical contents once (decoding a compressed image once into
/// the cache for all slots), so every unit's write is checked against that digest and the
/// ledger records what is on the card.
fn resolve_image(
    st: &Station,
    cfg: &crate::config::Config,
    reporter: Arc<dyn Reporter>,
    decode_once: bool,
) -> anyhow::Result<ImagePlan> {
    use crate::acquire::{source::Acquirer, source::SourceSpec, Cache, DownloadOptions, Pin};
    let img = &st.image;
    let pin = img
        .blake3
        .as_deref()
        .map(|h| Pin::from_parts("blake3", h))
        .transpose()?;
    let path = match (&img.path, &img.url, &pin) {
        (Some(p), _, pin) => {
            if let Some(pin) = pin {
                let mut f = std::fs::File::open(p)
                    .with_context(|| format!("open image {}", p.display()))?;
                let d = crate::acquire::digest::hash_reader(&mut f, false)
                    .with_context(|| format!("hash image {}", p.display()))?;
                pin.check(&p.display().to_string(), &d)?;
            }
            p.clone()
        }
        (None, url, Some(pin)) => {
            let cache = Arc::new(Cache::open(&cfg.cache_dir.value)?);
            let acq = Acquirer {
                cache: cache.clone(),
                opts: DownloadOptions {
                    mirrors: cfg.mirrors.value.clone(),
                    ..DownloadOptions::default()
                },
                require_pinned: true,
                reporter: reporter.clone(),
            };
            match url {
                // The downloader tries the config's mirrors first, then the URL itself.
                Some(url) => {
                    acq.fetch(&SourceSpec {
                        url: url.clone(),
                        pin: Some(pin.clone()),
                    })?
                    .entry
                    .path
                }
                None => match acq.lookup(pin)? {
                    Some(e) => e.path,
                    None => {
                        return Err(ExitError::new(
                            Exit::BadInput,
                            format!(
                                "{}: [image] blake3 {} is not in the cache {} (fetch it first: sbcflash fetch URL --blake3 {})",
                                st.path.display(),
                                pin.hex(),
                                cfg.cache_dir.value.display(),
                                pin.hex()
                            ),
                        )
                        .into())
                    }
                },
            }
        }
        _ => anyhow::bail!(
            "{}: [image] needs path, url + blake3, or blake3",
            st.path.display()
        ),
    };
    let mut plan = ImagePlan::prepare(
        &path,
        decode_once.then_some(cfg.cache_dir.value.as_path()),
        reporter.as_ref(),
    )?;
    plan.signed_by = check_trust(st, cfg, &path, &plan, reporter.as_ref())?;
    Ok(plan)
}

/// The station's trust rules, checked once at start before any unit: keys from the station
/// config's and the user config's `[[image.trust]]` (and the board's image sources), a signed
/// manifest's digest against the image's (hashed at start in full), `require_signature`.
fn check_trust(
    st: &Station,
    cfg: &crate::config::Config,
    path: &std::path::Path,
    plan: &ImagePlan,
    reporter: &dyn Reporter,
) -> anyhow::Result<Option<String>> {
    let origin = format!("[[image.trust]] in {}", st.path.display());
    let mut keys = Vec::new();
    for e in &st.image.trust {
        keys.extend(e.load(&origin)?);
    }
    for e in &cfg.image.trust {
        keys.extend(e.load("[[image.trust]] in the user config")?);
    }
    if let Some(b) = &st.board {
        let mut dirs = cfg.boards_dirs.value.clone();
        dirs.reverse();
        if let Ok(reg) = crate::board::Registry::load(&dirs) {
            if let Ok(board) = reg.get(b) {
                for src in &board.desc.images {
                    for e in &src.trust {
                        keys.extend(e.load(&format!("[[image.trust]] of board {b}"))?);
                    }
                }
            }
        }
    }
    let trust = crate::trust::TrustPlan {
        keys,
        require: st.require_signature || cfg.image.require_signature,
        signature: st.image.signature.clone(),
        manifest: st.image.manifest.clone(),
    };
    let name = path.display().to_string();
    // The bmap the station's open uses (beside the image), for bmaptool-style signatures.
    let bmap = crate::image::open_image(path, &crate::image::OpenOptions::default())?.bmap;
    let verdict = trust.check(crate::trust::Input {
        file: Some(path),
        name: &name,
        bmap: bmap.as_deref(),
        board: st.board.as_deref(),
    })?;
    super::trust::report(&verdict, ui::STATION_JOB, reporter);
    if let Some((want, from)) = &verdict.expected_blake3 {
        if hex::encode(want) != plan.blake3 {
            return Err(crate::trust::TrustError::Mismatch {
                what: name,
                msg: format!(
                    "blake3 of the image is {}, but {from} gives {}; no unit was touched",
                    plan.blake3,
                    hex::encode(want)
                ),
            }
            .into());
        }
    }
    Ok(verdict.signed.map(|s| s.key_id))
}

fn print_plan(plan: &station::Plan, json: bool) -> anyhow::Result<()> {
    if json {
        // One more JSON line in the event stream, tagged like the events.
        let v = serde_json::to_value(plan)?;
        crate::progress::json_line(&mut super::out::stdout(), "dry-run", v)?;
        return Ok(());
    }
    outln!("image:  {}", plan.image);
    outln!("ledger: {}", plan.ledger);
    match (&plan.example_identity, &plan.example_identity_error) {
        (Some(id), _) => outln!(
            "next unit: {} (hostname {}){}",
            id.serial,
            id.hostname,
            plan.next_seq
                .map(|s| format!(", counter at {s}"))
                .unwrap_or_default()
        ),
        (None, e) => outln!(
            "next unit: cannot be named: {}",
            e.as_deref().unwrap_or("unknown")
        ),
    }
    outln!("slots:");
    for s in &plan.slots {
        outln!(
            "  {:<10} [{}]\n             {}: {}",
            s.slot,
            s.rules,
            s.device.as_deref().unwrap_or("-"),
            s.verdict
        );
    }
    if plan.outside.is_empty() {
        outln!("no other disks");
    } else {
        outln!("never touched (in no slot): {}", plan.outside.join(", "));
    }
    outln!("(dry run: nothing was written)");
    Ok(())
}

/// The central ledger named by `--ledger URL` or the station config, connected; None for a
/// SQLite ledger.
fn central_db(
    flag: &Option<PathBuf>,
    config: &Option<PathBuf>,
    a: &CentralArgs,
) -> anyhow::Result<Option<(station::central::Db, postgres::Client)>> {
    let url_flag = flag
        .as_deref()
        .and_then(|p| p.to_str())
        .filter(|s| station::central::is_url(s));
    let from_config = match (flag, config) {
        (None, Some(_)) => {
            let cfg = user_config(config, flag)?;
            load_station(&cfg)?.central
        }
        _ => None,
    };
    let (url, ca, pw) = match (url_flag, &from_config) {
        (Some(u), c) => (
            u.to_string(),
            a.ca_file
                .clone()
                .or(c.as_ref().and_then(|c| c.ca_file.clone())),
            a.password_file
                .clone()
                .or(c.as_ref().and_then(|c| c.password_file.clone())),
        ),
        (None, Some(c)) => (
            c.url.clone(),
            a.ca_file.clone().or(c.ca_file.clone()),
            a.password_file.clone().or(c.password_file.clone()),
        ),
        (None, None) => return Ok(None),
    };
    let db = station::central::Db::new(&url, ca.as_deref(), pw.as_deref())?;
    let client = db.connect()?;
    Ok(Some((db, client)))
}

fn run_status(s: StatusArgs, json_lines: bool) -> anyhow::Result<Exit> {
    let Some((db, mut c)) = central_db(&s.ledger, &s.config, &s.central)? else {
        return Err(ExitError::new(
            Exit::Usage,
            "station status needs a central ledger: --ledger postgresql://... or a station config with one",
        )
        .into());
    };
    let rows = station::central::status(&db, &mut c)?;
    let mut out = super::out::stdout();
    use std::io::Write;
    if json_lines {
        for r in &rows {
            crate::progress::json_line(&mut out, "station-status", serde_json::to_value(r)?)?;
        }
        return Ok(Exit::Ok);
    }
    writeln!(
        out,
        "{:<16} {:<8} {:<21} {:>9} {:>6} {:>6} {:>6} {:>8}",
        "STATION", "STATE", "LAST HEARTBEAT", "AGE", "TODAY", "PASS", "FAIL", "BACKLOG"
    )?;
    for r in &rows {
        writeln!(
            out,
            "{:<16} {:<8} {:<21} {:>8.0}s {:>6} {:>6} {:>6} {:>8}",
            r.station,
            r.state,
            r.last_heartbeat,
            r.heartbeat_age_secs,
            r.units_today,
            r.pass_today,
            r.fail_today,
            r.backlog
        )?;
    }
    Ok(Exit::Ok)
}

fn run_report(r: ReportArgs, json_lines: bool) -> anyhow::Result<Exit> {
    let since = r.since.as_deref().map(parse_since).transpose()?;
    if let Some((db, mut c)) = central_db(&r.ledger, &r.config, &r.central)? {
        let rows = station::central::report(&db, &mut c, since.as_deref(), r.station.as_deref())?;
        if r.known_hosts {
            let units: Vec<ledger::Row> = rows.into_iter().map(|l| l.row).collect();
            return print_known_hosts(&units);
        }
        return print_rows(&rows, json_lines, r.format, true, |row| row.csv_fields());
    }
    if r.station.is_some() {
        return Err(ExitError::new(
            Exit::Usage,
            "--station filters a central ledger's report (a SQLite ledger holds one station)",
        )
        .into());
    }
    let cfg = user_config(&r.config, &r.ledger)?;
    let st = match (&r.ledger, &cfg.station.config.value) {
        (None, Some(_)) => Some(load_station(&cfg)?),
        _ => None,
    };
    let path = ledger_path(&r.ledger, st.as_ref(), &cfg);
    let rows = ledger::report(&path, since.as_deref())?;
    if r.known_hosts {
        return print_known_hosts(&rows);
    }
    print_rows(&rows, json_lines, r.format, false, |row| row.csv_fields())
}

/// `--known-hosts`: each passed unit's station-made host key under its hostname.
fn print_known_hosts(rows: &[ledger::Row]) -> anyhow::Result<Exit> {
    use std::io::Write;
    let mut out = super::out::stdout();
    for l in ledger::known_hosts(rows) {
        writeln!(out, "{l}")?;
    }
    Ok(Exit::Ok)
}

/// A report's rows as `ledger-row` JSON lines, one JSON array, or CSV (the central ledger's
/// with the station's columns last).
fn print_rows<R: serde::Serialize>(
    rows: &[R],
    json_lines: bool,
    format: ReportFormat,
    line: bool,
    fields: impl Fn(&R) -> Vec<String>,
) -> anyhow::Result<Exit> {
    let mut out = super::out::stdout();
    use std::io::Write;
    if json_lines {
        // The global --json: the rows as the other commands' JSON lines (docs/json.md).
        for row in rows {
            crate::progress::json_line(&mut out, "ledger-row", serde_json::to_value(row)?)?;
        }
        return Ok(Exit::Ok);
    }
    match format {
        ReportFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &rows)?;
            writeln!(out)?;
        }
        ReportFormat::Csv => {
            let extra = if line {
                station::central::LINE_COLUMNS
            } else {
                &[]
            };
            let header: Vec<String> = ledger::COLUMNS
                .iter()
                .chain(extra)
                .map(|c| c.to_string())
                .collect();
            writeln!(out, "{}", ledger::csv_line(&header))?;
            for row in rows {
                writeln!(out, "{}", ledger::csv_line(&fields(row)))?;
            }
        }
    }
    Ok(Exit::Ok)
}

fn a_ledger_is_url(p: &std::path::Path) -> bool {
    p.to_str().is_some_and(station::central::is_url)
}

/// `YYYY-MM-DD` (UTC midnight) or RFC 3339, as the ledger's UTC timestamp prefix.
fn parse_since(s: &str) -> anyhow::Result<String> {
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.format("%Y-%m-%d").to_string());
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t
            .with_timezone(&chrono::Utc)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    }
    Err(ExitError::new(
        Exit::Usage,
        format!("--since {s:?}: expected YYYY-MM-DD or an RFC 3339 time"),
    )
    .into())
}
