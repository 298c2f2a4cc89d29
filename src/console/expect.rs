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
//!
//! Kernel lines are not output: a printk line (`[    1.680927] usb 1-1.2: ...`, optionally
//! with a `<N>` log-level prefix) is set aside as [`Event::Kernel`], also when it starts in
//! the middle of a line because the kernel wrote over a prompt or a command's output. The text
//! before it is put back as the current line, so `login: [    1.680927] usb ...` leaves
//! `login: ` waiting and `inet 10.0.[    4.718896] eth0: ...` + `2.15/24` joins to
//! `inet 10.0.2.15/24`. The kernel writes each console record whole (under the port lock),
//! so one split per line suffices. A stamp needs three or more fraction digits; a command's
//! own output that looks like one (`dmesg`) is set aside too.
//! Quiet spells ([`Expect::quiet_for`]) count console text only: kernel lines arriving every
//! 200 ms do not keep a prompt from being "quiet".

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

/// Marks kernel lines in [`Expect::tail`] (error messages) and transcripts.
pub(crate) const KERNEL_MARK: &str = "(kernel) ";

/// Something a driver reacts to; produced by [`Expect::next_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// A complete line of console text (without line ending, escapes removed).
    Line(String),
    /// A kernel printk line, set aside from the text around it.
    Kernel(String),
}

/// The engine. Cheap to create; one per console session.
#[derive(Debug)]
pub struct Expect {
    esc: Esc,
    pending_cr: bool,
    /// The current (incomplete) line.
    partial: Vec<u8>,
    /// Complete lines not yet taken by the driver.
    pending: VecDeque<Event>,
    /// Last complete text lines and, apart, last kernel lines (marked), each with its
    /// number among all lines: a noisy kernel does not push the last text out.
    history: VecDeque<(u64, String)>,
    kernel_history: VecDeque<(u64, String)>,
    lines_seen: u64,
    last_rx: Option<Instant>,
    /// Last time console text (not kernel lines) arrived.
    last_text: Option<Instant>,
    /// Length of the text part of `partial` after the previous feed.
    text_len: usize,
    /// A text line was completed during the current feed.
    text_line: bool,
    kernel_lines: u64,
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
            kernel_history: VecDeque::new(),
            lines_seen: 0,
            last_rx: None,
            last_text: None,
            text_len: 0,
            text_line: false,
            kernel_lines: 0,
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
        self.text_line = false;
        for &b in bytes {
            self.total_bytes += 1;
            self.count_garbage(b);
            self.byte(b);
        }
        let len = text_part(&self.partial).len();
        if self.text_line || len != self.text_len {
            self.last_text = Some(now);
        }
        self.text_len = len;
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
        match printk_start(&line) {
            Some(i) if !line[..i].trim().is_empty() => {
                // The kernel wrote into a line: its record goes aside, the text before it
                // is the current line again (a prompt still waiting, half a result).
                self.partial.extend_from_slice(&line.as_bytes()[..i]);
                self.push(Event::Kernel(line[i..].to_string()));
            }
            Some(i) => self.push(Event::Kernel(line[i..].to_string())),
            None => {
                self.text_line = true;
                self.push(Event::Line(line));
            }
        }
    }

    fn push(&mut self, e: Event) {
        let (h, text) = match &e {
            Event::Line(l) => (&mut self.history, l.clone()),
            Event::Kernel(k) => {
                self.kernel_lines += 1;
                (&mut self.kernel_history, format!("{KERNEL_MARK}{k}"))
            }
        };
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back((self.lines_seen, text));
        self.lines_seen += 1;
        self.pending.push_back(e);
    }

    /// The next complete line of console text the driver has not seen yet (kernel lines
    /// are skipped: they stay in the history and the transcript).
    pub fn next_line(&mut self) -> Option<String> {
        while let Some(e) = self.pending.pop_front() {
            if let Event::Line(l) = e {
                return Some(l);
            }
        }
        None
    }

    /// The next event, kernel lines included (for drivers that watch the kernel itself:
    /// its banner, panics).
    pub(crate) fn next_event(&mut self) -> Option<Event> {
        self.pending.pop_front()
    }

    /// How many kernel lines were set aside so far.
    pub fn kernel_lines(&self) -> u64 {
        self.kernel_lines
    }

    /// Drop all unread lines (e.g. before sending a command whose echo we want to frame).
    pub(crate) fn discard_pending(&mut self) {
        self.pending.clear();
    }

    /// Text after the last line break, escapes removed (a prompt, a countdown), without a
    /// kernel line that is still arriving after it.
    pub fn partial(&self) -> String {
        String::from_utf8_lossy(text_part(&self.partial)).into_owned()
    }

    /// The whole current line, a kernel line arriving in it included.
    pub(crate) fn raw_partial(&self) -> String {
        String::from_utf8_lossy(&self.partial).into_owned()
    }

    /// Forget the current partial line (after acting on it, so it does not match twice).
    pub(crate) fn clear_partial(&mut self) {
        self.partial.clear();
        self.text_len = 0;
    }

    /// True when the current partial line ends with `prompt` and nothing arrived for `quiet`.
    /// This is how prompts are recognised: they have no newline, and a prompt-like string in
    /// the middle of output is followed by more bytes quickly.
    pub(crate) fn prompt_quiet(&self, prompt: &str, quiet: Duration, now: Instant) -> bool {
        self.ends_with_prompt(prompt) && self.quiet_for(quiet, now)
    }

    /// True when the current partial line ends with `prompt` (trailing blanks are tolerated
    /// on either side, since a prompt's trailing space is sometimes eaten by a terminal).
    pub fn ends_with_prompt(&self, prompt: &str) -> bool {
        let p = self.partial();
        p.ends_with(prompt)
            || (!prompt.trim_end().is_empty() && p.trim_end().ends_with(prompt.trim_end()))
    }

    /// No console text arrived for `quiet` (kernel lines do not count; nothing ever
    /// arrived counts as quiet).
    pub(crate) fn quiet_for(&self, quiet: Duration, now: Instant) -> bool {
        match self.last_text {
            Some(t) => now.saturating_duration_since(t) >= quiet,
            None => true,
        }
    }

    /// Last time any byte arrived (kernel lines included).
    pub(crate) fn last_rx(&self) -> Option<Instant> {
        self.last_rx
    }

    /// Last time console text arrived (kernel lines excluded).
    pub(crate) fn last_text(&self) -> Option<Instant> {
        self.last_text
    }

    pub(crate) fn first_rx(&self) -> Option<Instant> {
        self.first_rx
    }

    pub(crate) fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// The last complete lines plus the partial one, for error messages: at most half of
    /// them kernel lines (marked), so that the last console text shows even on a noisy
    /// console, with a count of the kernel lines left out.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let kernel = self.kernel_history.len().min((n / 2).max(1));
        let text = self.history.len().min(n.saturating_sub(kernel));
        let mut v: Vec<&(u64, String)> = self
            .history
            .iter()
            .skip(self.history.len() - text)
            .chain(
                self.kernel_history
                    .iter()
                    .skip(self.kernel_history.len() - kernel),
            )
            .collect();
        v.sort_by_key(|(seq, _)| *seq);
        let mut out: Vec<String> = v.iter().map(|(_, l)| l.clone()).collect();
        // every text line after the first one shown is shown; the rest were kernel lines
        if let Some((first, _)) = v.first() {
            let left_out = (self.lines_seen - first - 1) - (v.len() as u64 - 1);
            if left_out > 0 {
                out.push(format!(
                    "{KERNEL_MARK}... {left_out} more kernel lines in between (see the transcript)"
                ));
            }
        }
        let p = self.raw_partial();
        if !p.is_empty() {
            out.push(p);
        }
        out
    }

    /// Share of non-printable bytes in the recent window, once enough bytes arrived.
    /// `Some(ratio)` only when at least 64 bytes were seen.
    pub(crate) fn garbage_ratio(&self) -> Option<f64> {
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

/// True for lines that are kernel printk output (`[   12.345678] ...`, `<4>[ 1.000] ...`),
/// which interleave with shell output on a console and are never a command's output.
pub fn is_printk(line: &str) -> bool {
    printk_start(line.trim_start()) == Some(0)
}

/// Where a printk record starts in `line`: the first `[ secs.micros]` stamp (at least three
/// fraction digits), or the `<N>` log-level prefix right before it.
pub(crate) fn printk_start(line: &str) -> Option<usize> {
    let b = line.as_bytes();
    (0..b.len())
        .find(|&i| stamp_len(&b[i..], false).is_some())
        .map(|i| level_prefix_start(b, i))
}

/// `i` moved back over a `<N>` directly before it.
fn level_prefix_start(b: &[u8], i: usize) -> usize {
    if i >= 3 && b[i - 1] == b'>' {
        let mut j = i - 1;
        while j > 0 && b[j - 1].is_ascii_digit() {
            j -= 1;
        }
        if j > 0 && j < i - 1 && b[j - 1] == b'<' {
            return j - 1;
        }
    }
    i
}

/// Length of a complete printk stamp at the start of `b`; with `partial`, a stamp that the
/// end of `b` cut short counts too (its length is then `b.len()`).
fn stamp_len(b: &[u8], partial: bool) -> Option<usize> {
    if b.first() != Some(&b'[') {
        return None;
    }
    let mut i = 1;
    while b.get(i) == Some(&b' ') {
        i += 1;
    }
    let d0 = i;
    while b.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    if i == b.len() && partial {
        return Some(i);
    }
    if i == d0 || b.get(i) != Some(&b'.') {
        return None;
    }
    i += 1;
    let f0 = i;
    while b.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    if i == b.len() && partial {
        return Some(i);
    }
    (i - f0 >= 3 && b.get(i) == Some(&b']')).then_some(i + 1)
}

/// `partial` without a kernel record that started in it (complete stamp, or a stamp still
/// arriving at its end).
fn text_part(partial: &[u8]) -> &[u8] {
    let cut = (0..partial.len()).find(|&i| stamp_len(&partial[i..], true).is_some());
    match cut {
        Some(i) => &partial[..level_prefix_start(partial, i)],
        None => partial,
    }
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
        assert!(is_printk("<4>[    3.123456] usb 1-1: reset"));
        assert!(!is_printk("[nixos@nixos:~]$ "));
        assert!(!is_printk("[ 1.0] two fraction digits are not a stamp"));
        assert!(!is_printk("SYNC-1"));
        assert_eq!(printk_start("login: [    1.680927] usb"), Some(7));
        assert_eq!(printk_start("x<3>[ 1.000] y"), Some(1));
        assert_eq!(printk_start("a [b] [1.2]"), None);
    }

    fn events(e: &mut Expect) -> Vec<Event> {
        std::iter::from_fn(|| e.next_event()).collect()
    }

    /// The console: a kernel line appended to the login prompt.
    #[test]
    fn kernel_line_after_a_prompt_leaves_the_prompt_waiting() {
        let mut e = Expect::new();
        let t = Instant::now();
        e.feed(b"\r\nsbcflash-test login: ", t);
        let k = b"[    1.680927] usb 1-1.2: device descriptor read/64, error -71\r\n";
        for (i, b) in k.iter().enumerate() {
            e.feed(&[*b], t + Duration::from_millis(200 + i as u64));
            // while the kernel line arrives, the prompt is still what the text says
            assert_eq!(e.partial(), "sbcflash-test login: ", "at byte {i}");
        }
        assert_eq!(
            events(&mut e),
            [
                Event::Line(String::new()),
                Event::Kernel(
                    "[    1.680927] usb 1-1.2: device descriptor read/64, error -71".into()
                )
            ]
        );
        assert!(e.ends_with_prompt("login: "));
        // quiet counts console text only: the kernel line does not restart it
        let after = t + Duration::from_millis(300 + k.len() as u64);
        assert!(e.prompt_quiet("login: ", Duration::from_millis(300), after));
        assert!(!e.quiet_for(Duration::from_millis(300), t + Duration::from_millis(100)));
        assert_eq!(e.kernel_lines(), 1);
        let tail = e.tail(5);
        assert_eq!(
            tail[1],
            format!("{KERNEL_MARK}[    1.680927] usb 1-1.2: device descriptor read/64, error -71")
        );
        assert_eq!(tail[2], "sbcflash-test login: ");
    }

    #[test]
    fn kernel_line_inside_output_is_cut_out_and_the_line_joined() {
        let mut e = Expect::new();
        let t = Instant::now();
        e.feed(
            b"    inet 10.0.[    4.718896] eth0: link is not ready\r\n2.15/24 scope global eth0\r\n",
            t,
        );
        e.feed(
            b"<3>[    4.8] too short\r\n<3>[    4.800000] level prefix\r\nRC-4-0\r\n",
            t,
        );
        assert_eq!(
            events(&mut e),
            [
                Event::Kernel("[    4.718896] eth0: link is not ready".into()),
                Event::Line("    inet 10.0.2.15/24 scope global eth0".into()),
                Event::Line("<3>[    4.8] too short".into()),
                Event::Kernel("<3>[    4.800000] level prefix".into()),
                Event::Line("RC-4-0".into()),
            ]
        );
        // next_line skips kernel lines
        e.feed(b"a\r\n[    5.000000] k\r\nb\r\n", t);
        assert_eq!(lines(&mut e), ["a", "b"]);
    }

    #[test]
    fn the_tail_keeps_the_last_text_on_a_noisy_console() {
        let mut e = Expect::new();
        let t = Instant::now();
        e.feed(b"SBCFLASH-TEST-READY\r\nlast words\r\n", t);
        for i in 0..100 {
            e.feed(format!("[ {i:>4}.000000] usb 1-1: reset\r\n").as_bytes(), t);
        }
        e.feed(b"~ # ", t);
        let tail = e.tail(6);
        assert_eq!(
            tail,
            [
                "SBCFLASH-TEST-READY".to_string(),
                "last words".into(),
                format!("{KERNEL_MARK}[   97.000000] usb 1-1: reset"),
                format!("{KERNEL_MARK}[   98.000000] usb 1-1: reset"),
                format!("{KERNEL_MARK}[   99.000000] usb 1-1: reset"),
                format!("{KERNEL_MARK}... 97 more kernel lines in between (see the transcript)"),
                "~ # ".into(),
            ]
        );
        // a quiet console: just the last lines
        let mut q = Expect::new();
        q.feed(b"a\r\nb\r\nc\r\n", t);
        assert_eq!(q.tail(2), ["b", "c"]);
    }

    #[test]
    fn a_bracket_in_text_is_not_a_kernel_line() {
        let mut e = Expect::new();
        let t = Instant::now();
        e.feed(b"[nixos@nixos:~]$ ", t);
        assert_eq!(e.partial(), "[nixos@nixos:~]$ ");
        e.feed(b"x [1] [2.5]\r\n", t);
        assert_eq!(lines(&mut e), ["[nixos@nixos:~]$ x [1] [2.5]"]);
    }
}
