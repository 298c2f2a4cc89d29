//! Running one command at a prompt and reading its output and exit status, for U-Boot and
//! for a Linux shell alike: the command is framed with markers that only the output can
//! contain (see [`super::framed`]). Kernel lines never reach the output: the engine sets
//! them aside, also from the middle of a line. An end marker that is there but does not
//! parse is a [`ConsoleError::Garbled`] answer, for the caller to ask again.

use std::time::{Duration, Instant};

use super::expect::Expect;
use super::{
    begin_marker, end_marker, framed, CommandOutput, ConsoleError, Deadline, Machine, Step, Tail,
};

/// Lines that mean the board is gone or broken while a command runs.
pub(crate) type Alarm = fn(&str) -> Option<ConsoleError>;

/// Runs `cmd` framed; done when the end marker arrived and (for U-Boot) the prompt is back.
pub struct Command {
    cmd: String,
    n: u32,
    /// U-Boot: wait for this prompt (quiet) before the next command, so that typing never
    /// races a small UART FIFO. Linux: `None` (the tty buffers typed input).
    prompt: Option<String>,
    quiet: Duration,
    timeout: Duration,
    deadline: Option<Deadline>,
    state: State,
    lines: Vec<String>,
    status: i32,
    alarm: Option<Alarm>,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Start,
    Echo,
    Output,
    Prompt,
}

impl Command {
    pub(crate) fn new(cmd: &str, n: u32, prompt: Option<&str>, timeout: Duration) -> Command {
        Command {
            cmd: cmd.to_string(),
            n,
            prompt: prompt.map(str::to_string),
            quiet: Duration::from_millis(100),
            timeout,
            deadline: None,
            state: State::Start,
            lines: Vec::new(),
            status: 0,
            alarm: None,
        }
    }

    /// Check every received line with `alarm` (known fatal error strings).
    pub(crate) fn with_alarm(mut self, alarm: Alarm) -> Command {
        self.alarm = Some(alarm);
        self
    }
}

impl Machine for Command {
    type Output = CommandOutput;

    fn step(&mut self, ex: &mut Expect, now: Instant) -> Step<CommandOutput> {
        if self.state == State::Start {
            ex.discard_pending();
            self.deadline = Some(Deadline::new(
                now,
                self.timeout,
                &format!("command `{}`", self.cmd),
                "its output and exit status",
            ));
            self.state = State::Echo;
            return Step::Send(format!("{}\r", framed(&self.cmd, self.n)).into_bytes());
        }
        while let Some(line) = ex.next_line() {
            if let Some(err) = self.alarm.and_then(|a| a(&line)) {
                return Step::Fail(err);
            }
            match self.state {
                State::Echo => {
                    if line.trim() == begin_marker(self.n) {
                        self.state = State::Output;
                    }
                }
                State::Output => {
                    if let Some(st) = end_marker(&line, self.n) {
                        self.status = st;
                        self.state = State::Prompt;
                        if self.prompt.is_none() {
                            return self.done();
                        }
                    } else if line.trim_start().starts_with(&format!("RC-{}-", self.n)) {
                        return Step::Fail(ConsoleError::Garbled {
                            cmd: self.cmd.clone(),
                            line,
                            tail: Tail(ex.tail(10)),
                        });
                    } else {
                        self.lines.push(line);
                    }
                }
                State::Prompt | State::Start => {}
            }
        }
        if self.state == State::Prompt {
            if let Some(p) = &self.prompt {
                if ex.prompt_quiet(p, self.quiet, now) {
                    return self.done();
                }
            }
        }
        let Some(dl) = &self.deadline else {
            return Step::Fail(ConsoleError::Timeout {
                stage: "command".into(),
                expected: "a deadline".into(),
                waited: Duration::ZERO,
                tail: Tail::default(),
            });
        };
        if dl.passed(now) {
            return Step::Fail(dl.error(ex));
        }
        Step::Wait(dl.min(now + self.quiet))
    }
}

impl Command {
    fn done(&mut self) -> Step<CommandOutput> {
        Step::Done(CommandOutput {
            cmd: self.cmd.clone(),
            lines: std::mem::take(&mut self.lines),
            status: self.status,
        })
    }
}
