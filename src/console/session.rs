//! The executor: runs sans-IO [`Machine`]s against a [`Link`], feeds the expect engine,
//! keeps the timestamped transcript, reports stages with their time since the board's first
//! output, and turns a console full of garbage into a "wrong baud rate?" error.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::expect::{Event, Expect};
use super::serial::Link;
use super::{ConsoleError, Machine, Stage, Step, Tail};

/// Timestamped transcript: every received line and every sent chunk, with the time since
/// the session started (kernel lines marked `k|`). Written as it goes, so it survives a crash.
pub(crate) struct Transcript {
    file: File,
    path: PathBuf,
    lines: Expect,
    start: Instant,
    /// Also print received lines to stderr (`--show-console`).
    pub(crate) echo: bool,
    /// Print the kernel lines the engine set aside to stderr (`-v`).
    pub(crate) echo_kernel: bool,
}

impl Transcript {
    pub(crate) fn create(path: &Path, start: Instant) -> std::io::Result<Transcript> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)?;
            }
        }
        Ok(Transcript {
            file: File::create(path)?,
            path: path.to_path_buf(),
            lines: Expect::new(),
            start,
            echo: false,
            echo_kernel: false,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn stamp(&self, now: Instant) -> String {
        format!(
            "[{:>10.3}]",
            now.saturating_duration_since(self.start).as_secs_f64()
        )
    }

    pub(crate) fn received(&mut self, bytes: &[u8], now: Instant) {
        self.lines.feed(bytes, now);
        // Kernel lines set aside by the engine are kept, marked `k|`.
        while let Some(e) = self.lines.next_event() {
            let s = self.stamp(now);
            let (mark, l) = match &e {
                Event::Line(l) => ("", l),
                Event::Kernel(l) => ("k| ", l),
            };
            let _ = writeln!(self.file, "{s} {mark}{l}");
            if self.echo || (self.echo_kernel && !mark.is_empty()) {
                eprintln!("  |{} {l}", if mark.is_empty() { "" } else { "k" });
            }
        }
    }

    pub(crate) fn sent(&mut self, bytes: &[u8], now: Instant) {
        let s = self.stamp(now);
        let _ = writeln!(self.file, "{s} >> {:?}", String::from_utf8_lossy(bytes));
    }

    pub(crate) fn note(&mut self, text: &str, now: Instant) {
        let s = self.stamp(now);
        let _ = writeln!(self.file, "{s} == {text}");
    }

    /// Write out the incomplete last line too (at the end of a run).
    pub(crate) fn finish(&mut self) {
        let p = self.lines.raw_partial();
        if !p.is_empty() {
            let _ = writeln!(self.file, "{} {p}", self.stamp(Instant::now()));
        }
        let _ = self.file.flush();
    }
}

type StageFn = Box<dyn FnMut(Duration, &Stage) + Send>;

/// One console session on one link.
pub struct Session {
    pub(crate) link: Link,
    pub(crate) ex: Expect,
    pub(crate) transcript: Option<Transcript>,
    on_stage: StageFn,
    seq: u32,
    /// Split typed text into chunks of this size with `tx_delay` between them (boards that
    /// drop characters at high rates); 0 = no pacing.
    pub(crate) tx_chunk: usize,
    pub(crate) tx_delay: Duration,
}

impl Session {
    pub fn new(link: Link) -> Session {
        Session {
            link,
            ex: Expect::new(),
            transcript: None,
            on_stage: Box::new(|_, _| {}),
            seq: 0,
            tx_chunk: 0,
            tx_delay: Duration::ZERO,
        }
    }

    pub(crate) fn on_stage(&mut self, f: impl FnMut(Duration, &Stage) + Send + 'static) {
        self.on_stage = Box::new(f);
    }

    /// A fresh number for framing markers.
    pub(crate) fn next_n(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    /// Time since the board's first byte ("power-on" as far as the console can tell).
    pub(crate) fn since_first_output(&self, now: Instant) -> Duration {
        self.ex
            .first_rx()
            .map(|t| now.saturating_duration_since(t))
            .unwrap_or_default()
    }

    pub(crate) fn stage(&mut self, s: &Stage) {
        let now = Instant::now();
        let t = self.since_first_output(now);
        if let Some(tr) = self.transcript.as_mut() {
            tr.note(&s.to_string(), now);
        }
        (self.on_stage)(t, s);
    }

    /// Runs `m` to completion.
    pub async fn run<M: Machine>(&mut self, m: &mut M) -> Result<M::Output, ConsoleError> {
        let mut buf = vec![0u8; 4096];
        loop {
            let now = Instant::now();
            if self.ex.looks_like_garbage() {
                return Err(ConsoleError::Garbage {
                    pct: (self.ex.garbage_ratio().unwrap_or(0.0) * 100.0).round() as u32,
                    baud: self.link.baud(),
                    tail: Tail(self.ex.tail(5)),
                });
            }
            match m.step(&mut self.ex, now) {
                Step::Send(b) => self.send(&b).await?,
                Step::Nudge { bytes, note } => {
                    self.stage(&Stage::Note(note));
                    self.send(&bytes).await?;
                }
                Step::Stage(s) => self.stage(&s),
                Step::Done(x) => return Ok(x),
                Step::Fail(ConsoleError::Silent { stage, waited, .. }) => {
                    return Err(ConsoleError::Silent {
                        stage,
                        waited,
                        baud: self.link.baud(),
                    })
                }
                Step::Fail(e) => return Err(e),
                Step::Wait(until) => {
                    self.read_until(until, &mut buf).await?;
                }
            }
        }
    }

    /// Reads until bytes arrive or `until` passes; returns the number of bytes fed.
    pub(crate) async fn read_until(
        &mut self,
        until: Instant,
        buf: &mut [u8],
    ) -> Result<usize, ConsoleError> {
        match self.read_by(until, buf).await? {
            Some(n) => {
                self.received(&buf[..n], Instant::now());
                Ok(n)
            }
            None => Ok(0),
        }
    }

    /// Raw read for binary protocols: bytes go to the transcript but not to the engine.
    pub(crate) async fn read_raw(
        &mut self,
        until: Instant,
        buf: &mut [u8],
    ) -> Result<usize, ConsoleError> {
        Ok(self.read_by(until, buf).await?.unwrap_or(0))
    }

    /// One read from the link, `None` when `until` passes first; the link's notes become
    /// stages either way.
    async fn read_by(
        &mut self,
        until: Instant,
        buf: &mut [u8],
    ) -> Result<Option<usize>, ConsoleError> {
        let r = tokio::time::timeout_at(until.into(), self.link.read(buf)).await;
        self.flush_notes();
        match r {
            Err(_) => Ok(None),
            Ok(r) => r.map(Some),
        }
    }

    fn received(&mut self, bytes: &[u8], now: Instant) {
        let first = self.ex.total_bytes() == 0;
        self.ex.feed(bytes, now);
        if first && !bytes.is_empty() {
            self.stage(&Stage::FirstOutput);
        }
        if let Some(tr) = self.transcript.as_mut() {
            tr.received(bytes, now);
        }
    }

    fn flush_notes(&mut self) {
        let notes = std::mem::take(&mut self.link.notes);
        for n in notes {
            self.stage(&Stage::Note(n));
        }
    }

    /// Typed text (paced if configured).
    pub(crate) async fn send(&mut self, bytes: &[u8]) -> Result<(), ConsoleError> {
        if let Some(tr) = self.transcript.as_mut() {
            tr.sent(bytes, Instant::now());
        }
        if self.tx_chunk == 0 || bytes.len() <= self.tx_chunk {
            return self.link.write_all(bytes).await;
        }
        for c in bytes.chunks(self.tx_chunk) {
            self.link.write_all(c).await?;
            tokio::time::sleep(self.tx_delay).await;
        }
        Ok(())
    }

    /// Binary data, never paced, logged as a size only.
    pub(crate) async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ConsoleError> {
        self.link.write_all(bytes).await
    }

    /// Swallow input until the console has been quiet for `quiet` (or `max` passed).
    pub(crate) async fn settle(
        &mut self,
        quiet: Duration,
        max: Duration,
    ) -> Result<(), ConsoleError> {
        let end = Instant::now() + max;
        let mut buf = vec![0u8; 4096];
        loop {
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            let n = self.read_until((now + quiet).min(end), &mut buf).await?;
            if n == 0 {
                return Ok(());
            }
        }
    }

    pub(crate) fn finish(&mut self) {
        if let Some(tr) = self.transcript.as_mut() {
            tr.finish();
        }
    }
}
