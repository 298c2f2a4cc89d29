//! `serial-load`: send a file into U-Boot's RAM over the console (`loady`/`loadx`), prove
//! it arrived with U-Boot's `crc32`, then run a follow-up command (`sf update`, `mmc write`,
//! `virtio write`). Or, with no U-Boot, XMODEM straight to a boot ROM's UART recovery.

use std::time::{Duration, Instant};

use super::session::Session;
use super::uboot::{self, Interrupt, ResetWatch, UBootConfig};
use super::ymodem::{Protocol, Sender, XStep};
use super::{ConsoleError, Deadline, Machine, Stage, Step, Tail};
use crate::console::expect::Expect;

#[derive(Debug, Clone)]
pub(crate) struct LoadPlan {
    pub(crate) uboot: UBootConfig,
    pub(crate) protocol: Protocol,
    /// Load address; `None` = U-Boot's `$loadaddr`.
    pub(crate) addr: Option<u64>,
    pub(crate) then: Vec<String>,
    /// Talk to a boot ROM (XMODEM receiver already waiting), not to U-Boot.
    pub(crate) raw: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub(crate) addr: Option<u64>,
    pub(crate) bytes: u64,
    pub(crate) crc32: u32,
    pub(crate) seconds: f64,
}

/// Waits for a line containing `needle` (U-Boot's "## Ready for binary" before it sends `C`).
struct AwaitLine {
    needle: &'static str,
    deadline: Option<Deadline>,
    timeout: Duration,
}

impl Machine for AwaitLine {
    type Output = String;
    fn step(&mut self, ex: &mut Expect, now: Instant) -> Step<String> {
        let dl = self
            .deadline
            .get_or_insert_with(|| {
                Deadline::new(
                    now,
                    self.timeout,
                    "serial load",
                    "U-Boot's \"Ready for binary\"",
                )
            })
            .clone();
        while let Some(l) = ex.next_line() {
            if l.contains(self.needle) {
                return Step::Done(l);
            }
            if let Some(e) = uboot::command_alarm(&l) {
                return Step::Fail(e);
            }
            if l.contains("Unknown command") {
                return Step::Fail(ConsoleError::UBootError {
                    line: l,
                    tail: Tail(ex.tail(5)),
                });
            }
        }
        if dl.passed(now) {
            return Step::Fail(dl.error(ex));
        }
        Step::Wait(dl.min(now + Duration::from_millis(100)))
    }
}

/// Waits for the prompt after the transfer, collecting U-Boot's summary lines.
struct AwaitPrompt {
    prompt: String,
    lines: Vec<String>,
    deadline: Option<Deadline>,
}

impl Machine for AwaitPrompt {
    type Output = Vec<String>;
    fn step(&mut self, ex: &mut Expect, now: Instant) -> Step<Vec<String>> {
        let dl = self
            .deadline
            .get_or_insert_with(|| {
                Deadline::new(
                    now,
                    Duration::from_secs(20),
                    "serial load",
                    "the U-Boot prompt after the transfer",
                )
            })
            .clone();
        while let Some(l) = ex.next_line() {
            self.lines.push(l);
        }
        if ex.prompt_quiet(&self.prompt, Duration::from_millis(200), now) {
            return Step::Done(std::mem::take(&mut self.lines));
        }
        if dl.passed(now) {
            return Step::Fail(dl.error(ex));
        }
        Step::Wait(dl.min(now + Duration::from_millis(100)))
    }
}

/// Runs the transfer machine against the session's raw byte stream.
async fn transfer(
    s: &mut Session,
    sender: &mut Sender,
    first: Vec<u8>,
    total: u64,
) -> Result<(), ConsoleError> {
    let mut input = first;
    let mut buf = vec![0u8; 4096];
    let mut last_report = Instant::now();
    loop {
        let now = Instant::now();
        match sender.step(&input, now) {
            XStep::Send(b) => {
                tracing::debug!(len = b.len(), head = ?&b[..b.len().min(3)], "transfer: send");
                input.clear();
                s.send_raw(&b).await?;
            }
            XStep::Wait(t) => {
                let n = s.read_raw(t, &mut buf).await?;
                if n > 0 {
                    tracing::debug!(rx = ?&buf[..n.min(16)], "transfer: received");
                }
                input = buf[..n].to_vec();
            }
            XStep::Progress(done) => {
                input.clear();
                if last_report.elapsed() >= Duration::from_secs(2) {
                    last_report = Instant::now();
                    s.stage(&Stage::Note(format!(
                        "sent {} of {} KiB",
                        done / 1024,
                        total / 1024
                    )));
                }
            }
            XStep::Done => return Ok(()),
            XStep::Fail(e) => return Err(ConsoleError::Transfer(e)),
        }
    }
}

fn parse_hex(s: &str) -> Option<u64> {
    let t = s.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    u64::from_str_radix(t, 16).ok()
}

/// U-Boot's `crc32` prints `crc32 for 40200000 ... 4023ffff ==> 1a2b3c4d`.
pub fn parse_crc32_output(text: &str) -> Option<u32> {
    let i = text.rfind("==> ")?;
    let h: String = text[i + 4..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    u32::from_str_radix(&h, 16).ok()
}

pub(crate) async fn run(
    s: &mut Session,
    plan: &LoadPlan,
    name: &str,
    data: Vec<u8>,
) -> Result<Loaded, ConsoleError> {
    let len = data.len() as u64;
    let crc = crc32fast::hash(&data);
    let t0 = Instant::now();
    if plan.raw {
        let mut sender = Sender::new(plan.protocol, name, data);
        transfer(s, &mut sender, Vec::new(), len).await?;
        return Ok(Loaded {
            addr: None,
            bytes: len,
            crc32: crc,
            seconds: t0.elapsed().as_secs_f64(),
        });
    }
    let n = s.next_n();
    s.run(&mut Interrupt::new(&plan.uboot, ResetWatch::default(), n))
        .await?;
    let addr = match plan.addr {
        Some(a) => a,
        None => {
            let n = s.next_n();
            let out = s
                .run(&mut uboot::command(&plan.uboot, "printenv loadaddr", n))
                .await?;
            out.lines
                .iter()
                .find_map(|l| l.trim().strip_prefix("loadaddr=").and_then(parse_hex))
                .ok_or_else(|| ConsoleError::UBootError {
                    line: "U-Boot has no $loadaddr; pass --addr".into(),
                    tail: Tail(out.lines.clone()),
                })?
        }
    };
    let verb = match plan.protocol {
        Protocol::Ymodem => "loady",
        // U-Boot's xyzModem takes 1K (STX) blocks in `loadx` too.
        Protocol::Xmodem | Protocol::Xmodem1k => "loadx",
    };
    s.ex.discard_pending();
    s.send(format!("{verb} 0x{addr:x}\r").as_bytes()).await?;
    s.run(&mut AwaitLine {
        needle: "## Ready for binary",
        deadline: None,
        timeout: Duration::from_secs(10),
    })
    .await?;
    // A `C` may already sit in the partial line; hand it to the sender.
    let first = s.ex.partial().into_bytes();
    s.ex.clear_partial();
    s.stage(&Stage::Note(format!(
        "{verb}: sending {} ({} bytes) to 0x{addr:x}",
        name, len
    )));
    let mut sender = Sender::new(plan.protocol, name, data);
    transfer(s, &mut sender, first, len).await?;
    let summary = s
        .run(&mut AwaitPrompt {
            prompt: plan.uboot.prompt.clone(),
            lines: Vec::new(),
            deadline: None,
        })
        .await?;
    let secs = t0.elapsed().as_secs_f64();
    if let Some(total) = summary.iter().find(|l| l.contains("Total Size")) {
        s.stage(&Stage::Note(format!("U-Boot: {}", total.trim())));
    }
    let n = s.next_n();
    let out = s
        .run(&mut uboot::command(
            &plan.uboot,
            &format!("crc32 0x{addr:x} 0x{len:x}"),
            n,
        ))
        .await?
        .ok()?;
    let board = parse_crc32_output(&out.text()).ok_or_else(|| ConsoleError::UBootError {
        line: "no result from `crc32`".into(),
        tail: Tail(out.lines.clone()),
    })?;
    if board != crc {
        return Err(ConsoleError::CrcMismatch { board, file: crc });
    }
    s.stage(&Stage::Note(format!("crc32 {crc:08x} matches")));
    for c in &plan.then {
        super::bootstrap::uboot_command_ok(s, &plan.uboot, c).await?;
    }
    Ok(Loaded {
        addr: Some(addr),
        bytes: len,
        crc32: crc,
        seconds: secs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_output() {
        assert_eq!(
            parse_crc32_output("crc32 for 40200000 ... 40245fff ==> 7a3c9d12"),
            Some(0x7a3c9d12)
        );
        assert_eq!(parse_crc32_output("nothing"), None);
        assert_eq!(parse_hex("0x40200000"), Some(0x4020_0000));
    }
}
