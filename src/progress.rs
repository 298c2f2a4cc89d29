//! One progress event type for every long operation (write, verify, download, USB flash,
//! station slots). A [`Reporter`] renders it: indicatif bars on a TTY, JSON lines for
//! machines (`--json`), or nothing. Operations never talk to the terminal themselves.

use serde::Serialize;
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Version of the `--json` event schema; bump on any incompatible change.
pub const JSON_SCHEMA_VERSION: u32 = 1;

/// The one writer of `--json` lines: `fields` (an object) with `event` and `schema` set, on
/// one line. Renderers and the CLI's result lines all go through it.
pub(crate) fn json_line<W: Write + ?Sized>(
    w: &mut W,
    event: &str,
    mut fields: serde_json::Value,
) -> std::io::Result<()> {
    if let Some(o) = fields.as_object_mut() {
        o.insert("event".into(), event.into());
        o.insert("schema".into(), JSON_SCHEMA_VERSION.into());
    }
    writeln!(w, "{fields}")
}

/// The steps a job reports, named in `--json` as today's strings (`source-verify`, ...; the
/// table in docs/json.md). Bars show the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Download,
    Hash,
    SourceVerify,
    Write,
    Verify,
    Decode,
    Fetch,
    CacheVerify,
    CachePrune,
    Build,
    /// A Rockchip loader sent to a board in maskrom.
    Loader,
    /// A USB session as a whole (its failure, before a finer phase started).
    Usb,
    /// Boot files served to a Raspberry Pi in usbboot.
    Usbboot,
    /// A disk captured as an image (`sbcflash read`).
    Read,
    /// A card probed for fake capacity and bad blocks (`sbcflash check-card`).
    CheckCard,
}

impl Phase {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Phase::Download => "download",
            Phase::Hash => "hash",
            Phase::SourceVerify => "source-verify",
            Phase::Write => "write",
            Phase::Verify => "verify",
            Phase::Decode => "decode",
            Phase::Fetch => "fetch",
            Phase::CacheVerify => "cache-verify",
            Phase::CachePrune => "cache-prune",
            Phase::Build => "build",
            Phase::Loader => "loader",
            Phase::Usb => "usb",
            Phase::Usbboot => "usbboot",
            Phase::Read => "read",
            Phase::CheckCard => "check-card",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Tests and followers compare a phase with its name.
impl PartialEq<&str> for Phase {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

/// What an operation reports. `job` names the unit of work (a slot, a device path) so that
/// one stream can carry several jobs at once.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A phase begins (`write`, `verify`, `download`, `hash`, ...). `total` in bytes if known.
    Start {
        job: String,
        phase: Phase,
        total: Option<u64>,
        detail: Option<String>,
    },
    /// Bytes done so far in the current phase.
    Progress {
        job: String,
        phase: Phase,
        done: u64,
        total: Option<u64>,
    },
    /// A human-readable note (a warning, a stage reached).
    Message {
        job: String,
        level: Level,
        text: String,
    },
    /// The phase ended successfully; `summary` is free-form structured data.
    Finish {
        job: String,
        phase: Phase,
        summary: serde_json::Value,
    },
    /// The phase failed.
    Error {
        job: String,
        phase: Phase,
        message: String,
        exit_code: u8,
    },
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warn,
}

/// Receives events. Implementations must be cheap: callers report from hot loops, and the
/// reporter (not the caller) rate-limits.
pub trait Reporter: Send + Sync {
    fn report(&self, ev: Event);
}

/// Discards everything (tests, `--quiet`).
pub struct Silent;
impl Reporter for Silent {
    fn report(&self, _ev: Event) {}
}

/// One JSON object per line on stdout; `Progress` at most every 200 ms per job/phase.
pub struct JsonLines {
    state: Mutex<JsonState>,
}

struct JsonState {
    last: std::collections::HashMap<(String, Phase), Instant>,
    out: Box<dyn Write + Send>,
}

impl JsonLines {
    pub(crate) fn stdout() -> Self {
        Self::new(Box::new(std::io::stdout()))
    }
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            state: Mutex::new(JsonState {
                last: Default::default(),
                out,
            }),
        }
    }
}

const JSON_INTERVAL: Duration = Duration::from_millis(200);

impl Reporter for JsonLines {
    fn report(&self, ev: Event) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        if let Event::Progress {
            job,
            phase,
            done,
            total,
        } = &ev
        {
            let key = (job.clone(), *phase);
            let now = Instant::now();
            let last_done = total.is_some_and(|t| *done >= t);
            if let Some(t) = st.last.get(&key) {
                if now.duration_since(*t) < JSON_INTERVAL && !last_done {
                    return;
                }
            }
            st.last.insert(key, now);
        }
        let mut v = match serde_json::to_value(&ev) {
            Ok(v) => v,
            Err(_) => return,
        };
        let event = v["event"].as_str().unwrap_or_default().to_string();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("ts".into(), chrono::Utc::now().to_rfc3339().into());
        }
        // A reader that went away must not stop the operation; the result line says it.
        let _ = json_line(&mut st.out, &event, v);
        let _ = st.out.flush();
    }
}

/// indicatif bars on stderr (a MultiProgress, so station slots stack): one line per running
/// phase, a job's lines kept together. A job can run phases at once (a streamed write downloads
/// and writes together), so bars are keyed by job and phase.
pub(crate) struct Bars {
    multi: indicatif::MultiProgress,
    bars: Mutex<std::collections::HashMap<(String, Phase), indicatif::ProgressBar>>,
}

impl Default for Bars {
    fn default() -> Self {
        Self::new()
    }
}

impl Bars {
    pub(crate) fn new() -> Self {
        Self {
            multi: indicatif::MultiProgress::new(),
            bars: Mutex::new(Default::default()),
        }
    }
}

/// The byte bar every renderer shares (`{msg}` at the end: plain or `wide_msg`).
pub(crate) const BYTES_BAR: &str =
    "{prefix:>12.bold} [{bar:32}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}";

/// An indicatif style from a template (ours are static, so the fallback never shows).
pub(crate) fn style(tpl: &str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(tpl)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ")
}

fn bar_style(known_total: bool) -> indicatif::ProgressStyle {
    if known_total {
        style(&format!("{BYTES_BAR} {{msg}}"))
    } else {
        style("{prefix:>12.bold} {spinner} {bytes} {binary_bytes_per_sec} {msg}")
    }
}

/// The one bar renderer: what every bar view (these bars, the station's slot lines) does with
/// an event. A view says only how its lines are keyed, how a line starts and where a note goes.
pub(crate) mod bar {
    use super::{Event, Level, Phase};
    use std::collections::HashMap;

    /// A terminal view of progress lines, drawn by [`render`].
    pub(crate) trait View {
        /// Which line an event belongs to.
        type Key: Eq + std::hash::Hash;
        fn key(job: String, phase: Phase) -> Self::Key;
        /// A phase starts: a new line for it (replacing the key's old one, if any).
        fn start(
            &self,
            lines: &mut HashMap<Self::Key, indicatif::ProgressBar>,
            job: String,
            phase: Phase,
            total: Option<u64>,
            detail: Option<String>,
        );
        /// A note (already worded by [`note`]) for `job`, above the bars.
        fn message(
            &self,
            lines: &HashMap<Self::Key, indicatif::ProgressBar>,
            job: &str,
            line: String,
        );
    }

    pub(crate) fn render<V: View>(
        view: &V,
        lines: &mut HashMap<V::Key, indicatif::ProgressBar>,
        ev: Event,
    ) {
        match ev {
            Event::Start {
                job,
                phase,
                total,
                detail,
            } => view.start(lines, job, phase, total, detail),
            Event::Progress {
                job,
                phase,
                done,
                total,
            } => {
                if let Some(pb) = lines.get(&V::key(job, phase)) {
                    if let Some(t) = total {
                        pb.set_length(t);
                    }
                    pb.set_position(done);
                }
            }
            Event::Message { job, level, text } => view.message(lines, &job, note(level, text)),
            Event::Finish { job, phase, .. } => {
                if let Some(pb) = lines.remove(&V::key(job, phase)) {
                    pb.finish();
                }
            }
            Event::Error {
                job,
                phase,
                message,
                ..
            } => {
                if let Some(pb) = lines.remove(&V::key(job, phase)) {
                    pb.abandon_with_message(format!("FAILED: {message}"));
                }
            }
        }
    }

    fn note(level: Level, text: String) -> String {
        match level {
            Level::Info => text,
            Level::Warn => format!("warning: {text}"),
        }
    }
}

impl bar::View for Bars {
    /// A job can run phases at once (download and write): a line per job and phase.
    type Key = (String, Phase);
    fn key(job: String, phase: Phase) -> Self::Key {
        (job, phase)
    }
    fn start(
        &self,
        bars: &mut std::collections::HashMap<Self::Key, indicatif::ProgressBar>,
        job: String,
        phase: Phase,
        total: Option<u64>,
        detail: Option<String>,
    ) {
        let new = indicatif::ProgressBar::new(total.unwrap_or(0));
        // Below the job's other running line, if it has one: one group per job.
        let pb = match bars.iter().find(|((j, _), _)| *j == job) {
            Some((_, sibling)) => self.multi.insert_after(sibling, new),
            None => self.multi.add(new),
        };
        pb.set_style(bar_style(total.is_some()));
        pb.set_prefix(phase.name());
        if let Some(d) = detail {
            pb.set_message(d);
        }
        if let Some(old) = bars.insert((job, phase), pb) {
            old.finish_and_clear();
        }
    }
    fn message(
        &self,
        bars: &std::collections::HashMap<Self::Key, indicatif::ProgressBar>,
        job: &str,
        line: String,
    ) {
        match bars.iter().find(|((j, _), _)| j == job) {
            Some((_, pb)) => pb.println(line),
            None => {
                let _ = self.multi.println(line);
            }
        }
    }
}

impl Reporter for Bars {
    fn report(&self, ev: Event) {
        if let Ok(mut bars) = self.bars.lock() {
            bar::render(self, &mut bars, ev);
        }
    }
}

#[cfg(test)]
mod bar_tests {
    use super::*;

    fn start(job: &str, phase: Phase) -> Event {
        Event::Start {
            job: job.into(),
            phase,
            total: Some(100),
            detail: None,
        }
    }

    #[test]
    fn concurrent_phases_of_one_job_keep_their_own_bars() {
        let b = Bars::new();
        b.multi
            .set_draw_target(indicatif::ProgressDrawTarget::hidden());
        b.report(start("/dev/loop7", Phase::Download));
        b.report(start("/dev/loop7", Phase::Write));
        b.report(Event::Progress {
            job: "/dev/loop7".into(),
            phase: Phase::Download,
            done: 60,
            total: Some(100),
        });
        b.report(Event::Progress {
            job: "/dev/loop7".into(),
            phase: Phase::Write,
            done: 10,
            total: Some(100),
        });
        {
            let bars = b.bars.lock().unwrap();
            assert_eq!(
                bars.len(),
                2,
                "the write did not replace the download's line"
            );
            let pos = |p: Phase| bars[&("/dev/loop7".to_string(), p)].position();
            assert_eq!((pos(Phase::Download), pos(Phase::Write)), (60, 10));
        }
        b.report(Event::Finish {
            job: "/dev/loop7".into(),
            phase: Phase::Download,
            summary: serde_json::Value::Null,
        });
        let bars = b.bars.lock().unwrap();
        assert_eq!(bars.len(), 1);
        assert!(bars.contains_key(&("/dev/loop7".to_string(), Phase::Write)));
    }
}

/// Plain text for a non-TTY without `--json`: messages and finishes only, nothing animated.
pub(crate) struct Plain;
impl Reporter for Plain {
    fn report(&self, ev: Event) {
        match ev {
            Event::Message {
                level: Level::Warn,
                text,
                ..
            } => eprintln!("warning: {text}"),
            Event::Message { text, .. } => eprintln!("{text}"),
            _ => {}
        }
    }
}

/// How the user asked for output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Json,
    Quiet,
    Auto,
}

/// Pick the reporter: JSON if asked, bars only when stderr is a terminal.
pub(crate) fn reporter(mode: Mode) -> Box<dyn Reporter> {
    match mode {
        Mode::Json => Box::new(JsonLines::stdout()),
        Mode::Quiet => Box::new(Silent),
        Mode::Auto => {
            if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                Box::new(Bars::new())
            } else {
                Box::new(Plain)
            }
        }
    }
}

/// Collects events in memory; for tests of code that reports progress.
#[derive(Default)]
pub struct Recorder(pub Mutex<Vec<Event>>);
impl Reporter for Recorder {
    fn report(&self, ev: Event) {
        if let Ok(mut v) = self.0.lock() {
            v.push(ev);
        }
    }
}
