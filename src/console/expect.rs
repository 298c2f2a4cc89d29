//! The expect engine: a byte sink with no I/O inside. Feed it what the serial port delivered
//! (with the time it arrived) and ask it questions: which whole lines arrived, does the buffer
//! end in a prompt and has the line been quiet long enough, is this garbage?
//!
//! Why no I/O: the same engine serves the real serial port, recorded transcripts in tests
//! and split-at-every-byte tests, and timeouts become plain data (`Instant`s).
//!
//! Normalisation (what a human would see on a terminal, as text lines):
//! - ANSI/VT100 escapes are dropped: CSI (`ESC [ ... final`), OSC (`ESC ] ... BEL|ESC \`),
//!   two-byte escapes (`ESC 7`, `ESC 8`, `ESC c`, ...). busybox ash sends `ESC[6n` after each
//!   prompt and bash `ESC[?2004h`; U-Boot's EFI code sends `ESC7ESC[rESC[999;999HESC[6nESC8`.
//! - `\r\n`, `\n\r`, `\n` end a line; a lone `\r` followed by text on a non-empty line ends it
//!   too (progress spinners), a `\r` at the start of a line is ignored.
//! - Backspace / DEL delete the previous character of the current line (U-Boot's countdown
//!   `Hit any key to stop autoboot:  2\b\b\b 1`).
//! - NUL and other control bytes are dropped (but counted for the garbage check).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How many complete lines are kept for error messages ("last console lines").
const HISTORY: usize = 40;
/// Window for the wrong-baud-rate check.
const GARBAGE_WINDOW: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Esc {
    None,
    /// Saw ESC.
    Start,
    /// Inside `ESC [` ... until a final byte 0x40..=0x7e.
    Csi,
    /// Inside `ESC ]` ... until BEL or `ESC \`.
    Osc,
    /// Inside OSC, saw ESC (maybe the ST terminator).
    OscEscape,
    /// `ESC (` / `ESC )` etc. take one more byte.
    Charset,
}

/// Something a driver reacts to; produced by [`Expect::next_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A complete line (without line ending, escapes removed).
    Line(String),
}

/// The engine. Cheap to create; one per console session.
#[derive(Debug)]
pub struct Expect {
    esc: Esc,
    pending_cr: bool,
    /// The current (incomplete) line.
    partial: Vec<u8>,
    /// Complete lines not yet taken by the driver.
    pending: VecDeque<String>,
    /// Last complete lines, for error messages.
    history: VecDeque<String>,
    last_rx: Option<Instant>,
    first_rx: Option<Instant>,
    /// Ring of "was this byte garbage" flags over the last GARBAGE_WINDOW raw bytes.
    window: VecDeque<bool>,
    garbage_in_window: usize,
    total_bytes: u64,
}

impl Default for Expect {
    fn default() -> Self {
        Self::new()
    }
}

impl Expect {
    pub fn new() -> Self {
        Expect {
            esc: Esc::None,
            pending_cr: false,
            partial: Vec::new(),
            pending: VecDeque::new(),
            history: VecDeque::new(),
            last_rx: None,
            first_rx: None,
            window: VecDeque::with_capacity(GARBAGE_WINDOW),
            garbage_in_window: 0,
            total_bytes: 0,
        }
    }

    /// Feed bytes as they arrived at `now`.
    pub fn feed(&mut self, bytes: &[u8], now: Instant) {
        if bytes.is_empty() {
            return;
        }
        self.last_rx = Some(now);
        self.first_rx.get_or_insert(now);
        for &b in bytes {
            self.total_bytes += 1;
            self.count_garbage(b);
            self.byte(b);
        }
    }

    fn count_garbage(&mut self, b: u8) {
        // Printable ASCII, the usual controls and ESC are fine; anything else in bulk means the
        // line rate is wrong (or the cable carries something that is not a console).
        let bad = !(matches!(b, 0x20..=0x7e | b'\r' | b'\n' | b'\t' | 0x08 | 0x1b | 0x07)
            || (self.esc != Esc::None));
        if self.window.len() == GARBAGE_WINDOW && self.window.pop_front() == Some(true) {
            self.garbage_in_window -= 1;
        }
        self.window.push_back(bad);
        if bad {
            self.garbage_in_window += 1;
        }
    }

    fn byte(&mut self, b: u8) {
        match self.esc {
            Esc::Start => {
                self.esc = match b {
                    b'[' => Esc::Csi,
                    b']' => Esc::Osc,
                    b'(' | b')' | b'*' | b'+' | b'#' | b'%' => Esc::Charset,
                    _ => Esc::None,
                };
                return;
            }
            Esc::Csi => {
                if (0x40..=0x7e).contains(&b) {
                    self.esc = Esc::None;
                }
                return;
            }
            Esc::Osc => {
                if b == 0x07 {
                    self.esc = Esc::None;
                } else if b == 0x1b {
                    self.esc = Esc::OscEscape;
                }
                return;
            }
            Esc::OscEscape => {
                self.esc = if b == b'\\' { Esc::None } else { Esc::Osc };
                return;
            }
            Esc::Charset => {
                self.esc = Esc::None;
                return;
            }
            Esc::None => {}
        }
        if self.pending_cr {
            self.pending_cr = false;
            match b {
                b'\n' => {
                    self.end_line();
                    return;
                }
                b'\r' => {
                    self.pending_cr = true;
                    return;
                }
                _ => {
                    if !self.partial.is_empty() {
                        self.end_line();
                    }
                }
            }
        }
        match b {
            0x1b => self.esc = Esc::Start,
            b'\r' => self.pending_cr = true,
            b'\n' => self.end_line(),
            0x08 | 0x7f => {
                self.partial.pop();
            }
            b'\t' => self.partial.push(b' '),
            0x00..=0x1f => {}
            _ => self.partial.push(b),
        }
    }

    fn end_line(&mut self) {
        let line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(line.clone());
        self.pending.push_back(line);
    }

    /// The next complete line the driver has not seen yet.
    pub fn next_line(&mut self) -> Option<String> {
        self.pending.pop_front()
    }

    /// The next event (currently: complete lines).
    pub fn next_event(&mut self) -> Option<Event> {
        self.next_line().map(Event::Line)
    }

    /// Drop all unread lines (e.g. before sending a command whose echo we want to frame).
    pub fn discard_pending(&mut self) {
        self.pending.clear();
    }

    /// Text after the last line break, escapes removed (a prompt, a countdown).
    pub fn partial(&self) -> String {
        String::from_utf8_lossy(&self.partial).into_owned()
    }

    /// Forget the current partial line (after acting on it, so it does not match twice).
    pub fn clear_partial(&mut self) {
        self.partial.clear();
    }

    /// True when the current partial line ends with `prompt` and nothing arrived for `quiet`.
    /// This is how prompts are recognised: they have no newline, and a prompt-like string in
    /// the middle of output is followed by more bytes quickly.
    pub fn prompt_quiet(&self, prompt: &str, quiet: Duration, now: Instant) -> bool {
        self.ends_with_prompt(prompt) && self.quiet_for(quiet, now)
    }

    /// True when the current partial line ends with `prompt` (trailing blanks are tolerated
    /// on either side, since a prompt's trailing space is sometimes eaten by a terminal).
    pub fn ends_with_prompt(&self, prompt: &str) -> bool {
        let p = self.partial();
        p.ends_with(prompt)
            || (!prompt.trim_end().is_empty() && p.trim_end().ends_with(prompt.trim_end()))
    }

    /// Nothing arrived for `quiet` (or nothing ever arrived and `quiet` passed since `since`).
    pub fn quiet_for(&self, quiet: Duration, now: Instant) -> bool {
        match self.last_rx {
            Some(t) => now.saturating_duration_since(t) >= quiet,
            None => true,
        }
    }

    pub fn last_rx(&self) -> Option<Instant> {
        self.last_rx
    }

    pub fn first_rx(&self) -> Option<Instant> {
        self.first_rx
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// The last complete lines plus the partial one, for error messages.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let mut v: Vec<String> = self
            .history
            .iter()
            .skip(self.history.len().saturating_sub(n))
            .cloned()
            .collect();
        let p = self.partial();
        if !p.is_empty() {
            v.push(p);
        }
        v
    }

    /// Share of non-printable bytes in the recent window, once enough bytes arrived.
    /// `Some(ratio)` only when at least 64 bytes were seen.
    pub fn garbage_ratio(&self) -> Option<f64> {
        if self.window.len() < 64 {
            return None;
        }
        Some(self.garbage_in_window as f64 / self.window.len() as f64)
    }

    /// The wrong-baud-rate heuristic: more than a third of recent bytes are not text.
    pub fn looks_like_garbage(&self) -> bool {
        self.garbage_ratio().is_some_and(|r| r > 0.33)
    }
}

/// True for lines that look like kernel printk output (`[   12.345678] ...`), which can
/// interleave with shell output on a console and must not be taken as command output.
pub fn is_printk(line: &str) -> bool {
    let t = line.trim_start();
    let Some(rest) = t.strip_prefix('[') else {
        return false;
    };
    let Some(end) = rest.find(']') else {
        return false;
    };
    let stamp = rest[..end].trim();
    let mut parts = stamp.splitn(2, '.');
    let secs = parts.next().unwrap_or("");
    let frac = parts.next().unwrap_or("");
    !secs.is_empty()
        && secs.bytes().all(|b| b.is_ascii_digit())
        && frac.len() >= 3
        && frac.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(e: &mut Expect) -> Vec<String> {
        std::iter::from_fn(|| e.next_line()).collect()
    }

    #[test]
    fn crlf_mixes_and_escapes() {
        let mut e = Expect::new();
        let t = Instant::now();
        e.feed(b"a\r\nb\n\rc\nd\r\r\ne\x1b[6n\x1b[?2004hf\r\n=> ", t);
        assert_eq!(lines(&mut e), ["a", "b", "c", "d", "ef"]);
        assert_eq!(e.partial(), "=> ");
        e.feed(
            b"\x1b7\x1b[r\x1b[999;999H\x1b[6n\x1b8\x1b]0;title\x07ok\r\n",
            t,
        );
        assert_eq!(lines(&mut e), ["=> ok"]);
    }

    #[test]
    fn backspaces_edit_the_countdown() {
        let mut e = Expect::new();
        let t = Instant::now();
        e.feed(b"Hit any key to stop autoboot:  2 \x08\x08\x08 1 ", t);
        assert_eq!(e.partial(), "Hit any key to stop autoboot:  1 ");
    }

    #[test]
    fn lone_cr_ends_a_nonempty_line() {
        let mut e = Expect::new();
        let t = Instant::now();
        e.feed(b"10%\r20%\r\n", t);
        assert_eq!(lines(&mut e), ["10%", "20%"]);
    }

    #[test]
    fn prompt_needs_quiet() {
        let mut e = Expect::new();
        let t = Instant::now();
        e.feed(b"x\r\n=> ", t);
        assert!(!e.prompt_quiet("=> ", Duration::from_millis(100), t));
        assert!(e.prompt_quiet(
            "=> ",
            Duration::from_millis(100),
            t + Duration::from_millis(100)
        ));
    }

    #[test]
    fn garbage_detection() {
        let mut e = Expect::new();
        let t = Instant::now();
        let junk: Vec<u8> = (0..600u32).map(|i| (i * 37 % 256) as u8 | 0x80).collect();
        e.feed(&junk, t);
        assert!(e.looks_like_garbage());
        let mut ok = Expect::new();
        ok.feed(&b"U-Boot 2023.01 (Jan 01 2023)\r\n".repeat(20), t);
        assert!(!ok.looks_like_garbage());
    }

    #[test]
    fn printk_lines() {
        assert!(is_printk("[    3.123456] virtio_net virtio1: up"));
        assert!(is_printk("[12345.123] x"));
        assert!(!is_printk("[nixos@nixos:~]$ "));
        assert!(!is_printk("SYNC-1"));
    }
}
