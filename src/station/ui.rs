//! What the operator sees: one line per slot (bars on a TTY, JSON events otherwise), a
//! per-slot log file, a running count, and a bell or screen flash on FAIL.
//!
//! Jobs report through a [`SlotReporter`], which names every event after its slot, copies it
//! to the slot's log, and forwards it to the station's reporter.

use crate::progress::Phase;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::progress::{Event, Level, Reporter};

/// How results are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// indicatif bars: intermediate `Finish` events are dropped so each slot's line is
    /// replaced by its next phase instead of piling up.
    Bars,
    /// Every event (JSON lines, plain text, tests).
    Stream,
}

/// The station-wide view: counts and the FAIL alert.
pub struct Ui {
    pub(crate) reporter: Arc<dyn Reporter>,
    pub(crate) style: Style,
    /// The terminal view ([`Ui::bars`]): slot lines (idle, PASS, FAIL) are drawn typed.
    bars: Option<Arc<StationBars>>,
    pub(crate) bell: bool,
    pub(crate) flash: bool,
    pass: AtomicU64,
    fail: AtomicU64,
    running: AtomicU64,
    /// Central ledger only: rows waiting in the outbox, and whether the database answers.
    central: Mutex<Option<(u64, bool)>>,
    alert: Mutex<()>,
}

/// Name of the station-wide job in events.
pub(crate) const STATION_JOB: &str = "station";

impl Ui {
    pub fn new(reporter: Arc<dyn Reporter>, style: Style, bell: bool, flash: bool) -> Self {
        Ui {
            reporter,
            style,
            bars: None,
            bell,
            flash,
            pass: AtomicU64::new(0),
            fail: AtomicU64::new(0),
            running: AtomicU64::new(0),
            central: Mutex::new(None),
            alert: Mutex::new(()),
        }
    }

    /// The terminal view: one line per slot drawn by [`StationBars`].
    pub(crate) fn bars(bell: bool, flash: bool) -> Self {
        let bars = Arc::new(StationBars::default());
        Ui {
            bars: Some(bars.clone()),
            ..Ui::new(bars, Style::Bars, bell, flash)
        }
    }

    pub(crate) fn say(&self, level: Level, text: impl Into<String>) {
        self.reporter.report(Event::Message {
            job: STATION_JOB.into(),
            level,
            text: text.into(),
        });
    }

    /// Gives each slot its line at start, in configuration order, so a slot is always in the
    /// same place on screen (bars only; streams show events, not a screen).
    pub(crate) fn show_slots<'a>(&self, slots: impl Iterator<Item = (&'a str, &'a str)>) {
        let Some(bars) = &self.bars else {
            return;
        };
        for (slot, waiting) in slots {
            bars.slot_line(slot, SlotLine::Idle, waiting);
        }
    }

    pub(crate) fn job_started(&self) {
        self.running.fetch_add(1, Ordering::Relaxed);
    }

    /// A job ended: count it, alert on FAIL, and show the running count.
    pub(crate) fn job_ended(&self, slot: &str, pass: bool) {
        self.running.fetch_sub(1, Ordering::Relaxed);
        if pass {
            self.pass.fetch_add(1, Ordering::Relaxed);
        } else {
            self.fail.fetch_add(1, Ordering::Relaxed);
            self.alert(slot);
        }
        self.say(Level::Info, self.count_line());
    }

    pub(crate) fn counts(&self) -> (u64, u64, u64) {
        (
            self.pass.load(Ordering::Relaxed),
            self.fail.load(Ordering::Relaxed),
            self.running.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn count_line(&self) -> String {
        let (p, f, r) = self.counts();
        let central = match self.central.lock().map(|g| *g) {
            Ok(Some((n, true))) => format!(", backlog {n}"),
            Ok(Some((n, false))) => format!(", backlog {n} (database unreachable)"),
            _ => String::new(),
        };
        format!("count: {p} PASS, {f} FAIL, {r} running{central}")
    }

    /// A unit's row went to the outbox: the status line counts it now, not at the courier's
    /// next round (whether the database answered stays as the courier last saw it).
    pub(crate) fn outbox_rows(&self, rows: u64) {
        if let Ok(mut g) = self.central.lock() {
            if let Some((_, reachable)) = *g {
                *g = Some((rows, reachable));
            }
        }
    }

    /// The outbox's backlog and whether the central ledger answered last time.
    pub(crate) fn set_backlog(&self, rows: u64, reachable: bool) {
        if let Ok(mut g) = self.central.lock() {
            *g = Some((rows, reachable));
        }
    }

    /// Bell and/or a short reverse-video flash, on stderr (never in the JSON stream).
    fn alert(&self, _slot: &str) {
        if !self.bell && !self.flash {
            return;
        }
        let _g = self.alert.lock();
        let mut err = std::io::stderr();
        if self.bell {
            let _ = err.write_all(b"\x07");
        }
        if self.flash && std::io::IsTerminal::is_terminal(&err) {
            let _ = err.write_all(b"\x1b[?5h");
            let _ = err.flush();
            std::thread::sleep(std::time::Duration::from_millis(150));
            let _ = err.write_all(b"\x1b[?5l");
        }
        let _ = err.flush();
    }
}

/// The station's terminal: one line per slot (indicatif), each cut to the terminal's width so
/// long FAIL reasons cannot wrap and break the redraw; results (a `Start` without a total, see
/// [`SlotReporter::result`]) show as a coloured word and the text, nothing else; messages
/// scroll above the bars.
#[derive(Default)]
pub(crate) struct StationBars {
    multi: indicatif::MultiProgress,
    bars: Mutex<std::collections::HashMap<String, indicatif::ProgressBar>>,
}

/// A slot's standing line between jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotLine {
    Idle,
    Pass,
    Fail,
}

impl SlotLine {
    fn word(self) -> &'static str {
        match self {
            SlotLine::Idle => "idle",
            SlotLine::Pass => "PASS",
            SlotLine::Fail => "FAIL",
        }
    }
    fn style(self) -> indicatif::ProgressStyle {
        use crate::progress::style;
        match self {
            SlotLine::Idle => style("{prefix:>12.bold} {wide_msg}"),
            SlotLine::Pass => style("{prefix:>12.bold.green} {wide_msg}"),
            SlotLine::Fail => style("{prefix:>12.bold.red} {wide_msg:.red}"),
        }
    }
}

fn phase_style(total: bool) -> indicatif::ProgressStyle {
    use crate::progress::{style, BYTES_BAR};
    if total {
        style(&format!("{BYTES_BAR} {{wide_msg}}"))
    } else {
        style("{prefix:>12.bold} {wide_msg}")
    }
}

impl StationBars {
    /// A new line for `job`, in the place of its previous one: a slot keeps its place on
    /// screen.
    fn replace(
        &self,
        bars: &mut std::collections::HashMap<String, indicatif::ProgressBar>,
        job: &str,
        total: Option<u64>,
    ) -> indicatif::ProgressBar {
        let new = indicatif::ProgressBar::new(total.unwrap_or(0));
        match bars.remove(job) {
            Some(old) => {
                let pb = self.multi.insert_after(&old, new);
                old.finish_and_clear();
                self.multi.remove(&old);
                pb
            }
            None => self.multi.add(new),
        }
    }

    /// A running phase's line for `job`, in the job's place, titled `prefix`.
    fn phase_line(
        &self,
        bars: &mut std::collections::HashMap<String, indicatif::ProgressBar>,
        job: String,
        prefix: &str,
        total: Option<u64>,
        detail: Option<String>,
    ) {
        let pb = self.replace(bars, &job, total);
        pb.set_style(phase_style(total.is_some()));
        pb.set_prefix(prefix.to_string());
        pb.set_message(detail.unwrap_or_default());
        pb.tick();
        bars.insert(job, pb);
    }

    /// A slot's phase starts: its line names the slot and the phase.
    fn slot_phase(&self, slot: &str, phase: Phase, total: Option<u64>, detail: Option<String>) {
        let Ok(mut bars) = self.bars.lock() else {
            return;
        };
        self.phase_line(
            &mut bars,
            slot.to_string(),
            &format!("{slot} {phase}"),
            total,
            detail,
        );
    }

    /// Shows a slot's standing line (idle, PASS, FAIL) with `text`.
    pub(crate) fn slot_line(&self, slot: &str, line: SlotLine, text: &str) {
        let Ok(mut bars) = self.bars.lock() else {
            return;
        };
        let pb = self.replace(&mut bars, slot, None);
        pb.set_style(line.style());
        pb.set_prefix(format!("{slot} {}", line.word()));
        pb.set_message(text.to_string());
        pb.tick();
        bars.insert(slot.to_string(), pb);
    }
}

/// A slot keeps one line whatever it runs: lines are keyed by job (the slot) alone.
impl crate::progress::bar::View for StationBars {
    type Key = String;
    fn key(job: String, _: Phase) -> String {
        job
    }
    fn start(
        &self,
        bars: &mut std::collections::HashMap<String, indicatif::ProgressBar>,
        job: String,
        phase: Phase,
        total: Option<u64>,
        detail: Option<String>,
    ) {
        self.phase_line(bars, job, phase.name(), total, detail)
    }
    fn message(
        &self,
        _: &std::collections::HashMap<String, indicatif::ProgressBar>,
        _: &str,
        line: String,
    ) {
        let _ = self.multi.println(line);
    }
}

impl Reporter for StationBars {
    fn report(&self, ev: Event) {
        if let Ok(mut bars) = self.bars.lock() {
            crate::progress::bar::render(self, &mut bars, ev);
        }
    }
}

/// A slot's view of the UI: events renamed to the slot and copied to its log.
pub(crate) struct SlotReporter {
    slot: String,
    ui: Arc<Ui>,
    log: Option<Mutex<File>>,
    /// Last logged progress decile per phase, so the log gets 10 % steps, not a flood.
    last_decile: Mutex<(Option<Phase>, u64)>,
}

impl SlotReporter {
    /// Opens (appending) `log_dir/<slot>.log` if a log directory is configured.
    pub(crate) fn new(slot: &str, ui: Arc<Ui>, log_dir: Option<&Path>) -> std::io::Result<Self> {
        let log = match log_dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                Some(Mutex::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(d.join(format!("{slot}.log")))?,
                ))
            }
            None => None,
        };
        Ok(SlotReporter {
            slot: slot.to_string(),
            ui,
            log,
            last_decile: Mutex::new((None, u64::MAX)),
        })
    }

    /// A reporter without a log file (when the log directory is unusable).
    pub(crate) fn without_log(slot: &str, ui: Arc<Ui>) -> Self {
        SlotReporter {
            slot: slot.to_string(),
            ui,
            log: None,
            last_decile: Mutex::new((None, u64::MAX)),
        }
    }

    /// Writes one line to the slot's log.
    pub(crate) fn log(&self, line: &str) {
        if let Some(l) = &self.log {
            if let Ok(mut f) = l.lock() {
                let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                let _ = writeln!(f, "{ts} {line}");
            }
        }
    }

    pub(crate) fn info(&self, text: impl Into<String>) {
        self.report(Event::Message {
            job: String::new(),
            level: Level::Info,
            text: text.into(),
        });
    }

    /// Shows the unit's final state on the slot's line and in the stream.
    pub(crate) fn result(&self, pass: bool, text: &str) {
        let line = if pass { SlotLine::Pass } else { SlotLine::Fail };
        let word = line.word();
        self.log(&format!("{word}: {text}"));
        if let Some(bars) = &self.ui.bars {
            if !pass {
                // The slot's line is cut to the terminal's width; the whole reason scrolls
                // above the bars.
                self.ui.reporter.report(Event::Message {
                    job: STATION_JOB.into(),
                    level: Level::Warn,
                    text: format!("{} FAIL: {text}", self.slot),
                });
            }
            // A bar-less line that stays until the slot's next unit replaces it.
            bars.slot_line(&self.slot, line, text);
        } else {
            self.ui.reporter.report(Event::Message {
                job: self.slot.clone(),
                level: if pass { Level::Info } else { Level::Warn },
                text: format!("{word} {text}"),
            });
        }
    }
}

impl Reporter for SlotReporter {
    fn report(&self, mut ev: Event) {
        let slot = self.slot.clone();
        match &mut ev {
            Event::Start {
                job,
                phase,
                total,
                detail,
            } => {
                *job = slot.clone();
                self.log(&format!(
                    "start {phase}{}",
                    total.map(|t| format!(" ({t} bytes)")).unwrap_or_default()
                ));
                if let Some(bars) = &self.ui.bars {
                    // The bar's prefix names the slot and the phase.
                    bars.slot_phase(&slot, *phase, *total, detail.take());
                    return;
                }
            }
            Event::Progress {
                job,
                phase,
                done,
                total,
            } => {
                *job = slot;
                if let Some(t) = total.filter(|t| *t > 0) {
                    let decile = (*done).min(t) * 10 / t;
                    if let Ok(mut last) = self.last_decile.lock() {
                        if last.0 != Some(*phase) || last.1 != decile {
                            *last = (Some(*phase), decile);
                            self.log(&format!("{phase} {}%", decile * 10));
                        }
                    }
                }
            }
            Event::Message { job, text, .. } => {
                *job = slot;
                self.log(text);
            }
            Event::Finish {
                job,
                phase,
                summary,
            } => {
                *job = slot;
                self.log(&format!("done {phase} {summary}"));
                if self.ui.style == Style::Bars {
                    return;
                }
            }
            Event::Error {
                job,
                phase,
                message,
                ..
            } => {
                *job = slot;
                self.log(&format!("error in {phase}: {message}"));
                if self.ui.style == Style::Bars {
                    // The FAIL line (see `result`) says it; keep the slot on one line.
                    return;
                }
            }
        }
        self.ui.reporter.report(ev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Recorder;

    #[test]
    fn events_are_renamed_logged_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let rec = Arc::new(Recorder::default());
        let ui = Arc::new(Ui::new(rec.clone(), Style::Stream, false, false));
        let r = SlotReporter::new("s1", ui.clone(), Some(dir.path())).unwrap();
        r.report(Event::Start {
            job: "/dev/loop0".into(),
            phase: Phase::Write,
            total: Some(100),
            detail: None,
        });
        for d in [5, 50, 55, 100] {
            r.report(Event::Progress {
                job: "/dev/loop0".into(),
                phase: Phase::Write,
                done: d,
                total: Some(100),
            });
        }
        ui.job_started();
        r.result(false, "removed mid-write");
        ui.job_ended("s1", false);
        let evs = rec.0.lock().unwrap();
        assert!(evs.iter().all(|e| match e {
            Event::Start { job, .. } | Event::Progress { job, .. } => job == "s1",
            Event::Message { job, .. } => job == "s1" || job == STATION_JOB,
            _ => true,
        }));
        let log = std::fs::read_to_string(dir.path().join("s1.log")).unwrap();
        assert!(log.contains("start write (100 bytes)"));
        assert!(log.contains("write 50%") && log.contains("write 100%"));
        assert_eq!(log.matches("write 50%").count(), 1);
        assert!(log.contains("FAIL: removed mid-write"));
        assert_eq!(ui.counts(), (0, 1, 0));
    }
}
