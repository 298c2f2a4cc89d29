//! Console tests.
//!
//! Part 1 drives the sans-IO engine and machines with *recorded* QEMU transcripts
//! (tests/data/console/*.log, the raw bytes U-Boot and Linux printed) on a virtual clock:
//! clean, with noise injected, split at every byte boundary, and with boards that never
//! answer, reset, or report errors. Part 2 runs the real peers: Debian's U-Boot in
//! qemu-system-aarch64 / -riscv64 on a pty, booting the harness image (tests/harness/).
//! Tests that start QEMU have `qemu` in their name (nextest runs at most 2 at once).

mod common;

use std::collections::VecDeque;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sbcflash::console::expect::Expect;
use sbcflash::console::linux::{self, Arrival, Follow, LinuxConfig};
use sbcflash::console::serial::Link;
use sbcflash::console::session::Session;
use sbcflash::console::uboot::{self, Gadget, Interrupt, InterruptKey, ResetWatch, UBootConfig};
use sbcflash::console::{CommandOutput, ConsoleError, Machine, Stage, Step};
use sbcflash::usb::sim::{SimBus, SimDevice};

fn data(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/console")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

// ------------------------------------------------------------------ replay on a virtual clock

/// Replays a recorded console: the bytes up to the autoboot countdown come at once; after
/// that, every input event the board would react to (the first interrupt key, Ctrl-C, a
/// carriage return) releases the next recorded segment (segments end after each `=> `).
/// `chunk` limits the size of each read (noise: small, odd reads).
struct Replay {
    segs: VecDeque<Vec<u8>>,
    out: VecDeque<u8>,
    keyed: bool,
    seed: u64,
    chunk: usize,
    /// Release the next segment whenever the machine waits with nothing left to read.
    release_when_idle: bool,
    stages: Vec<Stage>,
    sent: Vec<u8>,
}

impl Replay {
    fn new(segs: Vec<Vec<u8>>, chunk: usize, seed: u64) -> Replay {
        let mut segs: VecDeque<Vec<u8>> = segs.into();
        let first = segs.pop_front().unwrap_or_default();
        Replay {
            segs,
            out: first.into(),
            keyed: false,
            seed: seed | 1,
            chunk,
            release_when_idle: false,
            stages: Vec::new(),
            sent: Vec::new(),
        }
    }

    fn rand(&mut self) -> u64 {
        // xorshift64: deterministic noise
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        self.seed
    }

    fn release(&mut self) {
        if let Some(s) = self.segs.pop_front() {
            self.out.extend(s);
        }
    }

    fn input(&mut self, bytes: &[u8]) {
        self.sent.extend_from_slice(bytes);
        for &b in bytes {
            match b {
                b' ' | 0x03 if !self.keyed => {
                    self.keyed = true;
                    self.release();
                }
                0x03 | b'\r' => self.release(),
                _ => {}
            }
        }
    }

    fn next_chunk(&mut self) -> Option<Vec<u8>> {
        if self.out.is_empty() {
            return None;
        }
        let n = 1 + (self.rand() as usize % self.chunk.max(1));
        let n = n.min(self.out.len());
        Some(self.out.drain(..n).collect())
    }
}

/// Splits a recorded U-Boot session into replay segments.
fn uboot_segments(log: &[u8]) -> Vec<Vec<u8>> {
    let cut = b"stop autoboot:  2 ";
    let i = find(log, cut).expect("countdown in the recording") + cut.len();
    let mut segs = vec![log[..i].to_vec()];
    let mut rest = &log[i..];
    while let Some(j) = find(rest, b"=> ") {
        segs.push(rest[..j + 3].to_vec());
        rest = &rest[j + 3..];
    }
    if !rest.is_empty() {
        segs.push(rest.to_vec());
    }
    segs
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Runs a machine against the replay on a virtual clock.
fn drive<M: Machine>(
    m: &mut M,
    ex: &mut Expect,
    r: &mut Replay,
    now: &mut Instant,
) -> Result<M::Output, ConsoleError> {
    let limit = *now + Duration::from_secs(3600);
    loop {
        assert!(*now < limit, "virtual clock ran away");
        match m.step(ex, *now) {
            Step::Send(b) => r.input(&b),
            Step::Nudge { bytes, note } => {
                r.stages.push(Stage::Note(note));
                r.input(&bytes);
            }
            Step::Stage(s) => r.stages.push(s),
            Step::Done(x) => return Ok(x),
            Step::Fail(e) => return Err(e),
            Step::Wait(until) => {
                if let Some(c) = r.next_chunk() {
                    *now += Duration::from_micros(300);
                    ex.feed(&c, *now);
                } else if r.release_when_idle && !r.segs.is_empty() {
                    r.release();
                } else {
                    *now = until.max(*now + Duration::from_micros(1));
                }
            }
        }
    }
}

/// Runs a machine against replay `r` with a line buffer of its own; returns its result and
/// the replay (what was sent, the stages seen).
fn play<M: Machine>(
    m: &mut M,
    mut r: Replay,
    now: &mut Instant,
) -> (Result<M::Output, ConsoleError>, Replay) {
    let res = drive(m, &mut Expect::new(), &mut r, now);
    (res, r)
}

/// Noise a real console adds: escape sequences anywhere (not inside CR LF), CR LF turned
/// into LF or LF CR, NUL bytes, kernel printk lines between lines.
fn noisy(seg: &[u8], seed: u64) -> Vec<u8> {
    let mut r = Replay::new(vec![], 1, seed);
    let mut v = Vec::with_capacity(seg.len() * 2);
    let mut i = 0;
    while i < seg.len() {
        let b = seg[i];
        if b == b'\r' && seg.get(i + 1) == Some(&b'\n') {
            match r.rand() % 4 {
                0 => v.extend_from_slice(b"\n"),
                1 => v.extend_from_slice(b"\n\r"),
                _ => v.extend_from_slice(b"\r\n"),
            }
            if r.rand() % 5 == 0 {
                v.extend_from_slice(b"[   12.345678] random: crng init done\r\n");
            }
            i += 2;
            continue;
        }
        match r.rand() % 23 {
            0 => v.extend_from_slice(b"\x1b[6n"),
            1 => v.extend_from_slice(b"\x1b[?2004h"),
            2 => v.push(0),
            3 => v.extend_from_slice(b"\x1b]0;title\x07"),
            _ => {}
        }
        v.push(b);
        i += 1;
    }
    v
}

fn cfg() -> UBootConfig {
    UBootConfig {
        timeout: Duration::from_secs(30),
        ..UBootConfig::default()
    }
}

/// The autoboot interrupt, the first machine of every U-Boot session.
fn interrupt(c: &UBootConfig) -> Interrupt {
    Interrupt::new(c, ResetWatch::default(), 1)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Interrupt + the recorded commands; returns the command outputs.
fn uboot_replay(segs: Vec<Vec<u8>>, chunk: usize, seed: u64, cmds: &[&str]) -> Vec<CommandOutput> {
    let mut r = Replay::new(segs, chunk, seed);
    let mut ex = Expect::new();
    let mut now = Instant::now();
    let c = cfg();
    drive(&mut interrupt(&c), &mut ex, &mut r, &mut now).expect("interrupt");
    assert!(r.stages.contains(&Stage::UBootPrompt), "{:?}", r.stages);
    // Keys stop at the prompt; the line is cleaned with Ctrl-C, never a bare Enter.
    assert!(!r.sent.windows(2).any(|w| w == b"\r\r"));
    assert!(r.sent.contains(&0x03));
    let mut outs = Vec::new();
    for (i, cmd) in cmds.iter().enumerate() {
        let mut m = uboot::command(&c, cmd, i as u32 + 2);
        outs.push(drive(&mut m, &mut ex, &mut r, &mut now).expect(cmd));
    }
    outs
}

const AARCH64_CMDS: &[&str] = &[
    "version",
    "printenv bootdelay",
    "ls virtio 0:2 /boot/extlinux",
];

fn check_aarch64_outputs(outs: &[CommandOutput]) {
    assert_eq!(outs[0].status, 0);
    assert!(
        outs[0].lines[0].starts_with("U-Boot 2023.01"),
        "{:?}",
        outs[0]
    );
    assert_eq!(
        outs[0].lines.last().map(String::as_str),
        Some("GNU ld (GNU Binutils for Debian) 2.40")
    );
    assert_eq!(outs[1].lines, vec!["bootdelay=2".to_string()]);
    assert!(outs[2].text().contains("extlinux.conf"));
}

#[test]
fn uboot_driver_replays_recorded_aarch64_session() {
    let log = data("qemu-aarch64-uboot-to-login.log");
    let outs = uboot_replay(uboot_segments(&log), 4096, 1, AARCH64_CMDS);
    check_aarch64_outputs(&outs);
}

#[test]
fn uboot_driver_replays_recorded_riscv64_session_with_a_failing_command() {
    let log = data("qemu-riscv64-uboot.log");
    let outs = uboot_replay(uboot_segments(&log), 4096, 2, &["version", "false"]);
    assert!(outs[0].text().contains("riscv64-linux-gnu-gcc"));
    assert_eq!(outs[1].status, 1);
    assert!(outs[1].lines.is_empty());
    assert!(outs[1].clone().ok().is_err());
}

#[test]
fn uboot_driver_survives_noise_and_tiny_reads() {
    let log = data("qemu-aarch64-uboot-to-login.log");
    for seed in 1..=12u64 {
        let segs: Vec<Vec<u8>> = uboot_segments(&log)
            .iter()
            .enumerate()
            .map(|(i, s)| noisy(s, seed * 100 + i as u64))
            .collect();
        let outs = uboot_replay(segs, 1 + seed as usize % 7, seed, AARCH64_CMDS);
        check_aarch64_outputs(&outs);
    }
}

#[test]
fn command_output_is_the_same_for_every_split_point() {
    let log = data("qemu-aarch64-uboot-to-login.log");
    let segs = uboot_segments(&log);
    // segs: [boot, after key, after Ctrl-C, sync, version, printenv, ls, boot...]
    let version = &segs[4];
    let c = cfg();
    let mut reference: Option<CommandOutput> = None;
    for split in 0..=version.len() {
        let mut ex = Expect::new();
        ex.feed(b"=> ", Instant::now());
        let mut now = Instant::now() + Duration::from_secs(1);
        let mut m = uboot::command(&c, "version", 2);
        let mut r = Replay::new(
            vec![
                Vec::new(),
                version[..split].to_vec(),
                version[split..].to_vec(),
            ],
            1 << 20,
            3,
        );
        // the `\r` of the command releases the first part; feed the second after it
        r.keyed = true;
        r.release_when_idle = true;
        let out = drive(&mut m, &mut ex, &mut r, &mut now)
            .unwrap_or_else(|e| panic!("split {split}: {e}"));
        match &reference {
            None => reference = Some(out),
            Some(want) => assert_eq!(&out, want, "split at byte {split}"),
        }
    }
    assert_eq!(reference.map(|o| o.status), Some(0));
}

#[test]
fn expect_lines_do_not_depend_on_read_boundaries() {
    let log = data("qemu-riscv64-uboot.log");
    let t = Instant::now();
    let lines_of = |parts: &[&[u8]]| {
        let mut e = Expect::new();
        for p in parts {
            e.feed(p, t);
        }
        let mut v: Vec<String> = std::iter::from_fn(|| e.next_line()).collect();
        v.push(e.partial());
        v
    };
    let whole = lines_of(&[&log]);
    assert!(whole.iter().any(|l| l == "RC-3-1"), "{whole:?}");
    for i in 0..=log.len() {
        assert_eq!(lines_of(&[&log[..i], &log[i..]]), whole, "split at {i}");
    }
    // Noise changes nothing but adds printk lines, which commands leave out.
    let noisy_lines: Vec<String> = lines_of(&[&noisy(&log, 7)])
        .into_iter()
        .filter(|l| !sbcflash::console::expect::is_printk(l))
        .collect();
    let clean: Vec<String> = whole.into_iter().filter(|l| !l.is_empty()).collect();
    let noisy_lines: Vec<String> = noisy_lines.into_iter().filter(|l| !l.is_empty()).collect();
    assert_eq!(noisy_lines, clean);
}

#[test]
fn linux_follower_reaches_login_on_the_recorded_boot() {
    let log = data("qemu-aarch64-uboot-to-login.log");
    let start = find(&log, b"=> boot\r\n").expect("boot in recording");
    let end = find(&log, b"login: ").expect("login prompt") + 7;
    let marker = regex::Regex::new(r"SBCFLASH-TEST-IP: (\S+)").unwrap();
    for (seed, chunk) in [(1u64, 4096usize), (2, 3), (3, 17)] {
        let body = if seed == 1 {
            log[start..end].to_vec()
        } else {
            noisy(&log[start..end], seed)
        };
        let lc = LinuxConfig {
            ip_marker: Some(marker.clone()),
            ..LinuxConfig::default()
        };
        let mut m = Follow::new(&lc, ResetWatch::default());
        let (res, r) = play(
            &mut m,
            Replay::new(vec![body], chunk, seed),
            &mut Instant::now(),
        );
        let (arrival, ip) = res.expect("follow");
        assert_eq!(arrival, Arrival::Login);
        assert_eq!(ip, None, "the recording has no network (\"none\")");
        assert!(r.stages.contains(&Stage::StartingKernel), "{:?}", r.stages);
        assert!(r
            .stages
            .iter()
            .any(|s| matches!(s, Stage::KernelBanner(v) if v.contains("6.1.0"))));
        assert!(
            r.sent.is_empty(),
            "the follower never types (extlinux menu!)"
        );
    }
}

#[test]
fn linux_follower_reports_panic_and_emergency() {
    for (text, want) in [
        ("Linux version 6.1\r\n[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root fs\r\n", "kernel panic"),
        ("Linux version 6.1\r\n<<< NixOS Stage 1 >>>\r\nAn error occurred in stage 1 of the boot process, which must mount the root filesystem\r\n", "emergency"),
        ("U-Boot 2023.01 (x)\r\nLinux version 6.1\r\nU-Boot 2023.01 (x)\r\n", "reset"),
    ] {
        let mut m = Follow::new(&LinuxConfig::default(), ResetWatch::default());
        let r = Replay::new(vec![text.as_bytes().to_vec()], 5, 9);
        let err = play(&mut m, r, &mut Instant::now()).0.expect_err(want).to_string();
        assert!(err.to_lowercase().contains(want), "{err}");
        assert!(err.contains("last console lines"), "{err}");
    }
}

#[test]
fn board_that_never_answers_gets_a_clear_error() {
    let mut now = Instant::now();
    let c = UBootConfig {
        timeout: Duration::from_secs(20),
        ..UBootConfig::default()
    };
    let (res, r) = play(&mut interrupt(&c), Replay::new(vec![], 1, 1), &mut now);
    let err = res.expect_err("silent board");
    let msg = err.to_string();
    assert!(matches!(err, ConsoleError::Silent { .. }), "{msg}");
    assert!(
        msg.contains("printed nothing") && msg.contains("TX/RX") && msg.contains("powered"),
        "{msg}"
    );
    // Ctrl-C nudges only (never Enter) while waiting for a board that may sit at the prompt.
    assert!(
        !r.sent.is_empty() && r.sent.iter().all(|&b| b == 0x03),
        "{:?}",
        r.sent
    );
    // each one said in the stage log
    assert_eq!(notes(&r).len(), r.sent.len());
    assert!(
        notes(&r)[0].contains("pressed Ctrl-C (never Enter)"),
        "{:?}",
        notes(&r)
    );

    // A board that talks but never shows a prompt: timeout naming the stage, last lines.
    let r = Replay::new(
        vec![b"U-Boot SPL 2023.01\r\nTrying to boot from MMC1\r\n".to_vec()],
        8,
        1,
    );
    let msg = play(&mut interrupt(&c), r, &mut now)
        .0
        .expect_err("no prompt")
        .to_string();
    assert!(
        msg.contains("U-Boot autoboot interrupt") && msg.contains("Trying to boot from MMC1"),
        "{msg}"
    );
}

#[test]
fn second_banner_and_fatal_errors_fail_at_once() {
    let c = cfg();
    let reset = b"U-Boot SPL 2023.01\r\nU-Boot 2023.01 (x)\r\nDRAM: 1 GiB\r\nresetting ...\r\nU-Boot SPL 2023.01\r\n".to_vec();
    let mut now = Instant::now();
    let t0 = now;
    let r = Replay::new(vec![reset], 7, 1);
    let err = play(&mut interrupt(&c), r, &mut now).0.expect_err("reset");
    assert!(matches!(err, ConsoleError::UnexpectedReset { .. }), "{err}");
    assert!(now - t0 < Duration::from_secs(1), "not at once");

    let abort = b"U-Boot 2023.01 (x)\r\n\"Synchronous Abort\" handler, esr 0x96000004\r\n".to_vec();
    let r = Replay::new(vec![abort], 64, 1);
    let err = play(&mut interrupt(&c), r, &mut now).0.expect_err("abort");
    assert!(matches!(err, ConsoleError::UBootError { .. }), "{err}");

    // Autoboot not caught: the extlinux menu is reached; no key is sent to it.
    let log = data("qemu-aarch64-uboot-to-login.log");
    let boot_start = find(&log, b"=> boot\r\n").unwrap() + 9;
    let mut missed = log[..find(&log, b"Hit any key").unwrap()].to_vec();
    missed.extend_from_slice(b"Hit any key to stop autoboot:  0 \r\n");
    missed.extend_from_slice(&log[boot_start..find(&log, b"Enter choice: ").unwrap() + 14]);
    let mut r = Replay::new(vec![missed], 4096, 1);
    r.keyed = true; // this board ignores keys
    let err = play(&mut interrupt(&c), r, &mut now).0.expect_err("missed");
    assert!(matches!(err, ConsoleError::MissedAutoboot { .. }), "{err}");
}

#[test]
fn garbage_on_the_line_hints_at_the_baud_rate() {
    runtime().block_on(async {
        let (board, host) = tokio::io::duplex(1 << 16);
        let mut s = Session::new(Link::stream(Box::new(host), 1_500_000));
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut board = board;
            // what 115200-baud text looks like to a 1.5 Mbaud receiver: mostly high bytes
            let junk: Vec<u8> = (0..4000u32)
                .map(|i| (0x80 | (i.wrapping_mul(2654435761) >> 7)) as u8)
                .collect();
            board.write_all(&junk).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let err = s.run(&mut interrupt(&cfg())).await.expect_err("garbage");
        let msg = err.to_string();
        assert!(
            msg.contains("wrong baud rate? the descriptor says 1500000"),
            "{msg}"
        );
        writer.abort();
    });
}

#[test]
fn interrupt_key_kinds() {
    assert_eq!(InterruptKey::parse("any").unwrap().bytes(), b" ");
    assert_eq!(InterruptKey::parse("ctrl-c").unwrap().bytes(), [3]);
    assert_eq!(InterruptKey::parse("string:stop").unwrap().bytes(), b"stop");
    assert!(InterruptKey::parse("enter").is_err());
}

// ------------------------------------------------------------------ QEMU: the real peers

fn harness() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/harness")
}

/// One QEMU "board" with its own state dir; stopped by the PID in its state dir on drop.
struct Target {
    state: tempfile::TempDir,
}

impl Target {
    /// `uboot-target.sh <action> --state <this target's state dir>`.
    fn script(state: &Path, action: &str) -> Command {
        let mut c = Command::new(harness().join("uboot-target.sh"));
        c.arg(action).arg("--state").arg(state);
        c
    }

    fn start(args: &[&str]) -> Target {
        let state = tempfile::Builder::new()
            .prefix("sbcflash-qemu-")
            .tempdir()
            .expect("state dir");
        let out = Self::script(state.path(), "start")
            .arg("--paused")
            .args(args)
            .output()
            .expect("run uboot-target.sh");
        let t = Target { state };
        assert!(
            out.status.success(),
            "uboot-target.sh start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        t
    }

    fn tty(&self) -> PathBuf {
        self.state.path().join("tty")
    }

    fn ssh_port(&self) -> u16 {
        std::fs::read_to_string(self.state.path().join("ssh-port"))
            .expect("ssh-port")
            .trim()
            .parse()
            .expect("port number")
    }

    /// Resume the CPUs (after the harness's settle time) from a thread.
    fn cont(&self) -> std::thread::JoinHandle<()> {
        let st = self.state.path().to_path_buf();
        std::thread::spawn(move || {
            let _ = Self::script(&st, "cont").status();
        })
    }

    fn stop(&self) {
        let _ = Self::script(self.state.path(), "stop")
            .stdout(Stdio::null())
            .status();
    }

    /// `uboot-target.sh wait-for REGEX` on this target's serial log (it takes its regex
    /// before `--state`).
    fn wait_for(&self, regex: &str, timeout_secs: u32) -> std::process::Output {
        Command::new(harness().join("uboot-target.sh"))
            .args([
                "wait-for",
                regex,
                "--timeout",
                &timeout_secs.to_string(),
                "--state",
            ])
            .arg(self.state.path())
            .output()
            .unwrap()
    }

    fn serial_log(&self) -> String {
        String::from_utf8_lossy(
            &std::fs::read(self.state.path().join("serial.log")).unwrap_or_default(),
        )
        .into_owned()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = self.serial_log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- serial.log (last 40 lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

fn need_qemu(arch: &str) -> bool {
    let q = format!("qemu-system-{arch}");
    common::require(false, &[q.as_str(), "socat"])
}

/// The harness boot image with SSH, built once per script version for the whole test run.
fn boot_image() -> PathBuf {
    common::harness_image(Path::new(env!("CARGO_TARGET_TMPDIR")), &["--ssh"])
}

/// A session on a QEMU target's console at U-Boot's prompt: autoboot interrupted as the
/// target resumes. Commands are numbered in the order they run.
struct UBootConsole {
    // before `rt`: the serial link is dropped while its runtime still runs
    s: Session,
    rt: tokio::runtime::Runtime,
    c: UBootConfig,
    next: u32,
}

impl UBootConsole {
    fn attach(t: &Target) -> UBootConsole {
        Self::attach_at(t, 115_200)
    }

    fn attach_at(t: &Target, baud: u32) -> UBootConsole {
        let rt = runtime();
        let mut s = {
            let _e = rt.enter();
            Session::new(Link::serial(&t.tty(), baud).expect("open the pty"))
        };
        let c = cfg();
        let h = t.cont();
        rt.block_on(s.run(&mut interrupt(&c)))
            .expect("interrupt autoboot");
        h.join().unwrap();
        UBootConsole { s, rt, c, next: 2 }
    }

    fn run<M: Machine>(&mut self, m: &mut M) -> Result<M::Output, ConsoleError> {
        self.rt.block_on(self.s.run(m))
    }

    fn cmd(&mut self, line: &str) -> CommandOutput {
        let mut m = uboot::command(&self.c, line, self.next);
        self.next += 1;
        self.run(&mut m)
            .unwrap_or_else(|e| panic!("U-Boot `{line}`: {e}"))
    }
}

fn run_uboot_commands(arch: &str, baud: u32) {
    let t = Target::start(&["--arch", arch]);
    let mut u = UBootConsole::attach_at(&t, baud);
    let v = u.cmd("version");
    assert_eq!(v.status, 0);
    assert!(v.lines[0].starts_with("U-Boot 20"), "{v:?}");
    assert!(
        v.text().contains(&format!("{arch}-linux-gnu-gcc")) || v.text().contains("linux-gnu-gcc")
    );
    let e = u.cmd("echo one; echo two");
    assert_eq!(e.lines, vec!["one".to_string(), "two".to_string()]);
    assert_eq!(u.cmd("false").status, 1);
    let unknown = u.cmd("nosuchcommand");
    assert_eq!(unknown.status, 1);
    assert!(unknown.text().contains("Unknown command"), "{unknown:?}");
    // --flash-via on a U-Boot without the gadget: a clear error at once.
    let g = u
        .run(&mut Gadget::new(
            "ums 0 virtio 0",
            "=> ",
            Duration::from_secs(2),
        ))
        .expect_err("no ums in QEMU's U-Boot");
    assert!(g.to_string().contains("Unknown command 'ums'"), "{g}");
}

#[test]
fn qemu_uboot_aarch64_interrupt_and_commands() {
    if !need_qemu("aarch64") {
        return;
    }
    run_uboot_commands("aarch64", 115_200);
}

#[test]
fn qemu_uboot_riscv64_interrupt_and_commands() {
    if !need_qemu("riscv64") {
        return;
    }
    // The baud variant of riscv64 (the pty carries any rate; this checks the settings path).
    run_uboot_commands("riscv64", 1_500_000);
}

#[test]
fn qemu_uboot_bootdelay_zero_from_persistent_env_is_still_caught() {
    if !need_qemu("aarch64") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("envflash.img");
    let envs = env.to_str().unwrap();
    {
        let t = Target::start(&["--env-flash", envs]);
        let mut u = UBootConsole::attach(&t);
        u.cmd("setenv bootdelay 0").ok().unwrap();
        u.cmd("saveenv").ok().unwrap();
    }
    let t = Target::start(&["--env-flash", envs]);
    // bootdelay=0 is still interrupted
    let mut u = UBootConsole::attach(&t);
    let o = u.cmd("printenv bootdelay");
    assert_eq!(o.lines, vec!["bootdelay=0".to_string()]);
    assert!(t.serial_log().contains("Hit any key to stop autoboot:  0"));
}

/// Waits until process `pid` has `path` (a pty) open, so that resuming QEMU loses nothing.
fn wait_until_open(pid: u32, path: &Path) {
    let want = std::fs::canonicalize(path).expect("pty path");
    for _ in 0..200 {
        if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for e in rd.flatten() {
                if std::fs::read_link(e.path())
                    .map(|l| l == want)
                    .unwrap_or(false)
                {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("sbcflash never opened {}", want.display());
}

/// A child process killed by its PID on drop.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` with `stdin` and piped stdout and stderr (read by [`wait_child`]).
fn spawn(cmd: &mut Command, stdin: Stdio) -> Child {
    let c = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    Child(c)
}

/// Bytes gathered by a thread of their own (what a peer received, a child's output).
type Gathered = Arc<Mutex<Vec<u8>>>;

/// Everything `r` yields from now on, gathered by a thread until it ends.
fn gather(mut r: impl Read + Send + 'static) -> Gathered {
    let got = Gathered::default();
    let g = got.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            g.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    got
}

/// Waits until every one of `paths` exists (a pty link socat makes).
fn wait_exists(paths: &[&Path]) {
    for _ in 0..100 {
        if paths.iter().all(|p| p.exists()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("never appeared: {paths:?}");
}

fn wait_child(c: &mut Child, secs: u64) -> (i32, String, String) {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(st) = c.0.try_wait().unwrap() {
            let mut out = String::new();
            let mut err = String::new();
            if let Some(mut o) = c.0.stdout.take() {
                o.read_to_string(&mut out).unwrap();
            }
            if let Some(mut e) = c.0.stderr.take() {
                e.read_to_string(&mut err).unwrap();
            }
            return (st.code().unwrap_or(-1), out, err);
        }
        assert!(Instant::now() < end, "sbcflash did not finish in {secs}s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const STANDIN: &str = r#"#!/bin/sh
# nixos-rebuild stand-in: records its arguments and environment, then proves that the
# target it was given works by running a command over SSH with the same options.
log="$STANDIN_LOG"
echo "args: $*" >> "$log"
echo "NIX_SSHOPTS: $NIX_SSHOPTS" >> "$log"
target=""
while [ $# -gt 0 ]; do
  [ "$1" = "--target-host" ] && target="$2"
  shift
done
# shellcheck disable=SC2086
out="$(ssh $NIX_SSHOPTS "$target" uname -m 2>&1)"
echo "ssh: $out" >> "$log"
exit "${STANDIN_EXIT:-0}"
"#;

/// The handoff's files in a test's directory: the nixos-rebuild stand-in (executable), where
/// it logs, and where `bootstrap` keeps its transcript and the user's known_hosts.
struct Handoff {
    standin: PathBuf,
    log: PathBuf,
    transcript: PathBuf,
    known_hosts: PathBuf,
}

impl Handoff {
    fn new(dir: &Path) -> Handoff {
        let standin = dir.join("nixos-rebuild-standin");
        std::fs::write(&standin, STANDIN).unwrap();
        common::run(Command::new("chmod").arg("755").arg(&standin));
        Handoff {
            standin,
            log: dir.join("standin.log"),
            transcript: dir.join("transcript.log"),
            known_hosts: dir.join("user_known_hosts"),
        }
    }

    /// `bootstrap` of the QEMU board `t` (the lab flake, its IP marker), handing off over SSH
    /// to 127.0.0.1:`ssh_port` through the stand-in.
    fn bootstrap(&self, t: &Target, ssh_port: u16) -> Command {
        let mut c = common::sbcflash();
        c.args(["bootstrap", "--board", "qemu-aarch64", "--port"])
            .arg(t.tty())
            .args(["--flake", "/nonexistent/flake#lab-board"])
            .args([
                "--ssh-host",
                "127.0.0.1",
                "--ssh-port",
                &ssh_port.to_string(),
            ])
            .args([
                "--ip-marker",
                r"SBCFLASH-TEST-IP: (\S+)",
                "--boot-timeout",
                "120",
            ])
            .arg("--rebuild-cmd")
            .arg(&self.standin)
            .arg("--transcript")
            .arg(&self.transcript)
            .arg("--known-hosts")
            .arg(&self.known_hosts)
            .env("STANDIN_LOG", &self.log);
        c
    }
}

#[test]
fn qemu_bootstrap_full_chain_write_boot_login_ssh_handoff() {
    if !need_qemu("aarch64")
        || !common::require(
            false,
            &["ssh", "ssh-keyscan", "apt-get", "mkfs.ext4", "mcopy"],
        )
    {
        return;
    }
    let img = boot_image();
    let key = img.with_file_name("id_ed25519");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("card.img");
    // The writer puts the image on the "card" (a file here).
    let w = common::sbcflash()
        .arg("write")
        .arg(&img)
        .arg(&disk)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let werr = String::from_utf8_lossy(&w.stderr);
    assert!(w.status.success(), "sbcflash write: {werr}");
    common::assert_same_prefix(&img, &disk, std::fs::metadata(&img).unwrap().len());

    // A noisy console (see make-boot-image.sh): kernel lines from early userspace on, a
    // burst that lands on the login prompt's line, and one inside every line `ip` prints.
    let t = Target::start(&[
        "--disk",
        disk.to_str().unwrap(),
        "--ssh-port",
        "0",
        "--noise",
        "rate=5 login-burst=100 ip-burst=1",
    ]);
    let port = t.ssh_port();
    let hand = Handoff::new(dir.path());
    // --known-hosts appends to the user's file and keeps what it held.
    std::fs::write(&hand.known_hosts, "other.example ssh-ed25519 AAAAold\n").unwrap();
    // The user's own options say "trust anything"; the proven keys' options come first,
    // and ssh takes the first value of an option: the handoff is strict all the same.
    let sshopts = format!(
        "-i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR -o ConnectTimeout=20",
        key.display()
    );
    let mut child = hand.bootstrap(&t, port);
    child
        .args(["--uboot-cmd", "printenv bootcmd"])
        .env("NIX_SSHOPTS", &sshopts)
        .env("STANDIN_EXIT", "42");
    let mut child = spawn(&mut child, Stdio::null());
    wait_until_open(child.0.id(), &t.tty());
    let h = t.cont();
    let (code, out, err) = wait_child(&mut child, 240);
    h.join().unwrap();
    let rec = std::fs::read_to_string(&hand.log).unwrap_or_default();
    let ctx = format!("exit {code}\nstdout:\n{out}\nstderr:\n{err}\nstand-in log:\n{rec}");
    assert_eq!(code, 42, "the deployer's status is passed through\n{ctx}");
    for stage in [
        "U-Boot prompt",
        "U-Boot `printenv bootcmd`: ok",
        "U-Boot is starting the kernel",
        "kernel: Linux version 6.1",
        "login prompt",
        "shell on the console",
        // parsed from `ip` despite a kernel line in the middle of each of its lines
        "board IP address 10.0.2.15 (from `ip -4 addr show`)",
        "SSH answers on 127.0.0.1",
        "host key proven over the console (the network offers it): SHA256:",
        "known_hosts of this run:",
        "running: NIX_SSHOPTS=",
    ] {
        assert!(err.contains(stage), "missing {stage:?}\n{ctx}");
    }
    // The run's known_hosts holds the board's keys as dropbear shows them on the console.
    let run_kh = hand.transcript.with_extension("known_hosts");
    let kh = std::fs::read_to_string(&run_kh).unwrap_or_default();
    let host_field = format!("[127.0.0.1]:{port} ");
    assert!(
        !kh.is_empty() && kh.lines().all(|l| l.starts_with(&host_field)),
        "{kh}\n{ctx}"
    );
    assert!(kh.contains(" ssh-ed25519 AAAA"), "{kh}\n{ctx}");
    let user = std::fs::read_to_string(&hand.known_hosts).unwrap();
    assert!(
        user.starts_with("other.example ssh-ed25519 AAAAold\n") && user.ends_with(&kh),
        "{user}"
    );
    assert!(
        rec.contains(
            "args: switch --flake /nonexistent/flake#lab-board --target-host root@127.0.0.1"
        ),
        "{ctx}"
    );
    assert!(
        rec.contains(&format!(
            "NIX_SSHOPTS: -o StrictHostKeyChecking=yes -o UserKnownHostsFile={} -o GlobalKnownHostsFile=/dev/null {sshopts} -p {port}",
            run_kh.display()
        )),
        "{ctx}"
    );
    assert!(
        rec.contains("ssh: aarch64"),
        "SSH with the deployer's options reached the board\n{ctx}"
    );
    let tr = std::fs::read_to_string(&hand.transcript).unwrap();
    assert!(
        tr.contains("sbcflash-test login:") && tr.contains(">> "),
        "transcript has both directions"
    );
    let log = t.serial_log();
    assert!(
        log.contains("sbcflash-test login: ["),
        "a kernel line landed on the login prompt's line (the issue's console)\n{log}"
    );
    assert_noise_was_set_aside(&log, &tr);
}

/// A second SSH server (Debian's dropbear, its own host key) on 127.0.0.1, standing where
/// the handoff goes: a man in the middle. Killed by its PID on drop.
struct Mitm {
    _child: Child,
    port: u16,
    fingerprint: String,
}

fn start_mitm(dir: &Path) -> Mitm {
    let key = dir.join("mitm_ed25519");
    common::run(
        Command::new("dropbearkey")
            .args(["-t", "ed25519", "-f"])
            .arg(&key),
    );
    let public = Command::new("dropbearkey")
        .arg("-y")
        .arg("-f")
        .arg(&key)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&public.stdout).to_string();
    let line = text
        .lines()
        .find(|l| l.starts_with("ssh-ed25519 "))
        .unwrap_or_else(|| panic!("dropbearkey -y: {text}"));
    let pubfile = dir.join("mitm.pub");
    std::fs::write(&pubfile, format!("{line}\n")).unwrap();
    let fp = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(&pubfile)
        .output()
        .unwrap();
    let fingerprint = String::from_utf8_lossy(&fp.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("ssh-keygen -lf {}", pubfile.display()))
        .to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Child(
        Command::new("dropbear")
            .args(["-F", "-E", "-s", "-r"])
            .arg(&key)
            .arg("-P")
            .arg(dir.join("mitm.pid"))
            .args(["-p", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dropbear"),
    );
    Mitm {
        _child: child,
        port,
        fingerprint,
    }
}

#[test]
fn qemu_bootstrap_refuses_a_man_in_the_middle_on_the_handoff_port() {
    if !need_qemu("aarch64")
        || !common::require(
            false,
            &[
                "ssh-keyscan",
                "ssh-keygen",
                "dropbear",
                "dropbearkey",
                "apt-get",
                "mkfs.ext4",
                "mcopy",
            ],
        )
    {
        return;
    }
    let img = boot_image();
    let dir = tempfile::tempdir().unwrap();
    let t = Target::start(&[
        "--disk",
        img.to_str().unwrap(),
        "--snapshot",
        "--ssh-port",
        "0",
    ]);
    // The board's own SSH is forwarded to t.ssh_port(); the handoff is pointed at the
    // other server instead, as a hijacked address on a lab network would be.
    let mitm = start_mitm(dir.path());
    let hand = Handoff::new(dir.path());
    let mut child = hand.bootstrap(&t, mitm.port);
    child.env(
        "NIX_SSHOPTS",
        "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
    );
    let mut child = spawn(&mut child, Stdio::null());
    wait_until_open(child.0.id(), &t.tty());
    let h = t.cont();
    let (code, out, err) = wait_child(&mut child, 240);
    h.join().unwrap();
    let ctx = format!("exit {code}\nstdout:\n{out}\nstderr:\n{err}");
    assert_eq!(code, 4, "refused (exit 4)\n{ctx}");
    assert!(
        err.contains(&format!(
            "SSH host key mismatch on 127.0.0.1:{}: refusing the handoff (someone else answers on the network, or the board's keys changed)\n  the network offers:\n    {} (ssh-ed25519)\n  the board's console shows:\n    SHA256:",
            mitm.port, mitm.fingerprint
        )),
        "{ctx}"
    );
    // the board's key, as its console shows it, is named too (and is another one)
    let board = err
        .split("the board's console shows:\n    ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no console fingerprint\n{ctx}"));
    assert!(
        board.starts_with("SHA256:") && board != mitm.fingerprint,
        "{ctx}"
    );
    assert!(!hand.log.exists(), "the deployer never ran\n{ctx}");
    assert!(
        !hand.known_hosts.exists(),
        "nothing was appended to --known-hosts\n{ctx}"
    );
    assert!(
        !hand.transcript.with_extension("known_hosts").exists(),
        "no known_hosts of this run\n{ctx}"
    );
}

/// The noise really happened where it hurts (on the board's side: `serial.log`) and every
/// kernel line is in the transcript, marked as set aside.
fn assert_noise_was_set_aside(log: &str, tr: &str) {
    let mid_line = |needle: &str| {
        log.lines().any(|l| {
            l.find(needle)
                .and_then(|i| l[..i].rfind('['))
                .is_some_and(|b| !l[..b].trim().is_empty())
        })
    };
    assert!(
        mid_line("(noise 1001)"),
        "a kernel line inside `ip`'s output\n{log}"
    );
    let noise_on_board = log.matches("(noise ").count();
    let marked: Vec<&str> = tr.lines().filter(|l| l.contains("] k| [")).collect();
    assert!(
        marked
            .iter()
            .any(|l| l.contains("eth0: link is not ready (noise 100")),
        "kernel lines from inside `ip`'s output are marked in the transcript\n{tr}"
    );
    // every noise line the board printed while sbcflash listened is in the transcript, marked
    let in_tr = marked.iter().filter(|l| l.contains("(noise ")).count();
    assert!(
        in_tr > 10 && in_tr <= noise_on_board,
        "{in_tr} of {noise_on_board}"
    );
    assert!(
        !tr.lines()
            .any(|l| !l.contains("] k| ") && !l.contains(" >> ") && l.contains("(noise ")),
        "a kernel line in the transcript is not marked\n{tr}"
    );
}

/// A board that booted before the port was opened sits at its login prompt, with kernel
/// lines (20/s) going on: the prompt never shows again until someone presses Enter. At
/// 1500000 baud on both sides.
#[test]
fn qemu_bootstrap_noisy_board_already_at_login_is_nudged_at_1500000_baud() {
    if !need_qemu("aarch64") || !common::require(false, &["apt-get", "mkfs.ext4", "mcopy"]) {
        return;
    }
    let img = boot_image();
    let t = Target::start(&[
        "--disk",
        img.to_str().unwrap(),
        "--snapshot",
        "--net",
        "--noise",
        "rate=20 ip-burst=1 baud=1500000",
    ]);
    t.cont().join().unwrap();
    let w = t.wait_for("sbcflash-test login: ", 120);
    assert!(
        w.status.success(),
        "no login prompt in serial.log: {}",
        String::from_utf8_lossy(&w.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let transcript = dir.path().join("transcript.log");
    let mut child = common::sbcflash();
    child
        .args([
            "bootstrap",
            "--board",
            "qemu-aarch64",
            "--baud",
            "1500000",
            "--port",
        ])
        .arg(t.tty())
        .args(["--no-handoff", "--boot-timeout", "60", "--transcript"])
        .arg(&transcript);
    let mut child = spawn(&mut child, Stdio::null());
    let (code, out, err) = wait_child(&mut child, 180);
    let tr = std::fs::read_to_string(&transcript).unwrap_or_default();
    let ctx = format!("exit {code}\nstdout:\n{out}\nstderr:\n{err}\ntranscript:\n{tr}");
    assert_eq!(code, 0, "{ctx}");
    assert_eq!(out.trim(), "10.0.2.15", "{ctx}");
    for stage in [
        "at 1500000 baud",
        "waited 5s of quiet console for a login prompt or shell: pressed Enter (1/3)",
        "login prompt",
        "shell on the console",
        "board IP address 10.0.2.15 (from `ip -4 addr show`)",
    ] {
        assert!(err.contains(stage), "missing {stage:?}\n{ctx}");
    }
    assert!(
        tr.contains("pressed Enter (1/3)"),
        "the nudge is in the transcript\n{ctx}"
    );
    assert_noise_was_set_aside(&t.serial_log(), &tr);
}

#[test]
fn qemu_serial_load_ymodem_crc32_then_virtio_write() {
    if !need_qemu("aarch64") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("blank.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    // 200 KiB that are not a multiple of the 1 KiB block: exercises padding and truncation.
    let payload: Vec<u8> = (0..200 * 1024 + 123u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let file = dir.path().join("payload.bin");
    std::fs::write(&file, &payload).unwrap();
    let blocks = payload.len().div_ceil(512);
    let t = Target::start(&["--disk", disk.to_str().unwrap()]);
    let mut child = spawn(
        common::sbcflash()
            .args(["serial-load", "--port"])
            .arg(t.tty())
            .arg(&file)
            .args(["--then", "virtio scan"])
            .args([
                "--then",
                &format!("virtio write ${{loadaddr}} 0x800 0x{blocks:x}"),
            ]),
        Stdio::null(),
    );
    wait_until_open(child.0.id(), &t.tty());
    let h = t.cont();
    let (code, out, err) = wait_child(&mut child, 240);
    h.join().unwrap();
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("matches"), "{err}");
    assert!(out.contains(&format!("{} bytes", payload.len())), "{out}");
    t.stop(); // flush and release the disk before reading it from the host
    let mut f = std::fs::File::open(&disk).unwrap();
    let mut got = vec![0u8; payload.len()];
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0x800 * 512)).unwrap();
    f.read_exact(&mut got).unwrap();
    assert!(
        got == payload,
        "the bytes U-Boot wrote to the disk differ from the file"
    );
}

#[test]
fn linux_ip_parsing_from_busybox_and_iproute2() {
    assert_eq!(
        linux::ip_from_text("    inet 10.0.2.15/24 brd 10.0.2.255 scope global eth0"),
        Some([10, 0, 2, 15].into())
    );
}

// ------------------------------------------------------------------ `console` on a real pty pair

/// Tests on a pty pair need socat and stty.
fn need_ptys() -> bool {
    common::require(false, &["socat", "stty"])
}

/// `socat` linking two ptys: sbcflash opens one end, the test plays the board on the other.
struct PtyPair {
    _socat: Child,
    a: PathBuf,
    b: PathBuf,
}

impl PtyPair {
    fn start(dir: &Path) -> PtyPair {
        let a = dir.join("host-end");
        let b = dir.join("board-end");
        let child = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", a.display()))
            .arg(format!("pty,raw,echo=0,link={}", b.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat");
        let socat = Child(child);
        wait_exists(&[&a, &b]);
        PtyPair {
            _socat: socat,
            a,
            b,
        }
    }

    /// The board's end, opened raw, for a peer that reads it itself.
    fn board_raw(&self) -> std::fs::File {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.b)
            .expect("open board end");
        common::run(
            Command::new("stty")
                .arg("-F")
                .arg(&self.b)
                .args(["raw", "-echo"]),
        );
        f
    }

    /// The board's end: a writer, and what sbcflash sends, gathered.
    fn board(&self) -> (std::fs::File, Gathered) {
        let f = self.board_raw();
        let got = gather(f.try_clone().expect("clone board end"));
        (f, got)
    }
}

fn wait_for(got: &Mutex<Vec<u8>>, want: &[u8]) {
    for _ in 0..200 {
        if find(&got.lock().unwrap(), want).is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "the board never received {:?}; got {:?}",
        String::from_utf8_lossy(want),
        String::from_utf8_lossy(&got.lock().unwrap())
    );
}

#[test]
fn console_terminal_relays_both_ways_survives_a_replug_and_leaves_on_ctrl_bracket_q() {
    if !need_ptys() {
        return;
    }
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let pair = PtyPair::start(dir.path());
    let transcript = dir.path().join("console.log");
    let mut child = spawn(
        common::sbcflash()
            .args(["console", "--reopen-secs", "20", "--port"])
            .arg(&pair.a)
            .arg("--transcript")
            .arg(&transcript),
        Stdio::piped(),
    );
    wait_until_open(child.0.id(), &pair.a);
    let (mut board, got) = pair.board();
    board.write_all(b"U-Boot 2023.01\r\n=> ").unwrap();
    let mut stdin = child.0.stdin.take().unwrap();
    stdin.write_all(b"version\r").unwrap();
    stdin.flush().unwrap();
    wait_for(&got, b"version\r");
    // Unplug: the pty pair goes away (socat stopped by its PID) and comes back under the
    // same name; sbcflash reopens it and keeps relaying.
    drop(board);
    drop(pair);
    std::thread::sleep(Duration::from_millis(500));
    let pair = PtyPair::start(dir.path());
    let (mut board, got) = pair.board();
    // sbcflash retries every 250 ms; wait until it holds the new pty.
    wait_until_open(child.0.id(), &pair.a);
    board.write_all(b"after replug\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stdin.write_all(b"x\x1dq").unwrap();
    stdin.flush().unwrap();
    let (code, out, err) = wait_child(&mut child, 30);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains("U-Boot 2023.01") && out.contains("after replug"),
        "{out}"
    );
    wait_for(&got, b"x");
    assert_eq!(
        got.lock().unwrap().as_slice(),
        b"x",
        "Ctrl-] q is not sent to the board"
    );
    let tr = std::fs::read_to_string(&transcript).unwrap();
    assert!(
        tr.contains("U-Boot 2023.01")
            && tr.contains(">> \"version\\r\"")
            && tr.contains("reopened"),
        "{tr}"
    );
}

// ------------------------------------------------ `bootstrap --flash-via`: a scripted board

/// What the scripted board's USB side does when U-Boot starts or ends a gadget.
enum GadgetEvent {
    Start(String),
    Stop,
}

type GadgetHook = Box<dyn FnMut(GadgetEvent) + Send>;

/// A scripted board on the far end of a pty pair, standing in for what the QEMU peer cannot
/// give: a U-Boot whose USB gadget commands (`ums`, `rockusb`, `fastboot`) make the board's
/// storage appear on this host's USB. QEMU's U-Boot has no USB device controller, and this
/// machine has no USB bus. It speaks the console protocol sbcflash relies on, byte for byte
/// as U-Boot and a NixOS shell do: autoboot countdown, echo, Ctrl-C, hush-style `echo` and
/// `$?`, `reset` with a fresh banner, kernel and NixOS stage lines, `login:`, a root shell
/// answering `ip -4 -j addr show`. What stands in for the USB side is `hook`: for `ums` it
/// attaches a loop device (a real udev event fires), for rockusb/fastboot it puts a simulated
/// USB device on the simulated bus. It runs on the board end of a fresh pty pair in `dir`
/// (sbcflash opens `pair.a`) until the pair goes; returns the pair and everything sbcflash
/// sent.
fn scripted_board(dir: &Path, mut hook: GadgetHook) -> (PtyPair, Gathered) {
    use std::io::Write;
    let pair = PtyPair::start(dir);
    let f = pair.board_raw();
    let got = Gathered::default();
    let g = got.clone();
    std::thread::spawn(move || {
        #[derive(PartialEq)]
        enum St {
            Countdown,
            UBoot,
            Gadget,
            Login,
            Shell,
        }
        let mut w = f.try_clone().unwrap();
        let mut r = f;
        let mut out = |s: &str| {
            let _ = w.write_all(s.as_bytes());
        };
        out("\r\nU-Boot 2024.01 (scripted board)\r\n\r\nDRAM:  4 GiB\r\nHit any key to stop autoboot:  3 ");
        let mut st = St::Countdown;
        let mut line = String::new();
        let framed =
            regex::Regex::new(r#"^echo SY""NC-(\d+)(?:; (.*); echo RC""-\d+-\$\?)?$"#).unwrap();
        let mut buf = [0u8; 512];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            g.lock().unwrap().extend_from_slice(&buf[..n]);
            for &b in &buf[..n] {
                match st {
                    St::Countdown => {
                        st = St::UBoot;
                        out("\x08\x08\x08 0 \r\n=> ");
                    }
                    St::Gadget => {
                        if b == 0x03 {
                            hook(GadgetEvent::Stop);
                            out("\r\nCTRL+C - Operation aborted\r\n=> ");
                            st = St::UBoot;
                        }
                    }
                    St::UBoot | St::Shell | St::Login => {
                        let prompt = if st == St::Shell {
                            "[root@nixos:~]# "
                        } else {
                            "=> "
                        };
                        if b == 0x03 {
                            line.clear();
                            out(if st == St::Shell {
                                "^C\r\n"
                            } else {
                                "<INTERRUPT>\r\n"
                            });
                            out(prompt);
                            continue;
                        }
                        if b != b'\r' {
                            line.push(b as char);
                            out(&(b as char).to_string());
                            continue;
                        }
                        out("\r\n");
                        let cmd = std::mem::take(&mut line);
                        let cmd = cmd.trim();
                        if st == St::Login {
                            out("\r\n[root@nixos:~]# ");
                            st = St::Shell;
                            continue;
                        }
                        let (n, inner) = match framed.captures(cmd) {
                            Some(c) => (Some(c[1].to_string()), c.get(2).map(|m| m.as_str())),
                            None => (None, Some(cmd)),
                        };
                        if let Some(n) = &n {
                            out(&format!("SYNC-{n}\r\n"));
                        }
                        let Some(inner) = inner else {
                            out(prompt);
                            continue;
                        };
                        let status = match (st == St::Shell, inner) {
                            (false, "") => 0,
                            (false, c)
                                if c.starts_with("ums ")
                                    || c.starts_with("rockusb ")
                                    || c.starts_with("fastboot ") =>
                            {
                                if c.starts_with("ums ") {
                                    out("UMS: LUN 0, dev mmc 0, hwpart 0, sector 0x0, count 0x1d5a000\r\n");
                                }
                                hook(GadgetEvent::Start(c.to_string()));
                                st = St::Gadget;
                                continue;
                            }
                            (false, "reset") => {
                                out("resetting ...\r\n\r\nU-Boot 2024.01 (scripted board)\r\n\r\nDRAM:  4 GiB\r\nHit any key to stop autoboot:  0 \r\n");
                                out("Retrieving file: /boot/extlinux/extlinux.conf\r\nStarting kernel ...\r\n\r\n");
                                out("[    0.000000] Linux version 6.6.0 (nixbld@localhost) (gcc 13.2.0) #1-NixOS SMP\r\n");
                                out("<<< NixOS Stage 1 >>>\r\n\r\n<<< NixOS Stage 2 >>>\r\n\r\n");
                                out("<<< Welcome to NixOS 24.05 (aarch64) - ttyS0 >>>\r\n\r\nnixos login: ");
                                st = St::Login;
                                continue;
                            }
                            (false, c) => {
                                out(&format!("Unknown command '{c}' - try 'help'\r\n"));
                                1
                            }
                            (true, "dmesg -n 1") => 0,
                            (true, "ip -4 -j addr show") => {
                                out(
                                    r#"[{"ifindex":1,"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},{"ifindex":2,"ifname":"end0","addr_info":[{"family":"inet","local":"10.0.2.15","prefixlen":24,"scope":"global"}]}]"#,
                                );
                                out("\r\n");
                                0
                            }
                            (true, c) => {
                                out(&format!("-bash: {c}: command not found\r\n"));
                                127
                            }
                        };
                        if let Some(n) = &n {
                            if inner != cmd {
                                out(&format!("RC-{n}-{status}\r\n"));
                            }
                        }
                        out(prompt);
                    }
                }
            }
        }
    });
    (pair, got)
}

/// Tests that watch udev run one at a time (nextest's `udevd` group; this lock under plain
/// `cargo test`): each one's new disk would otherwise be another's.
static UDEVD_TESTS: Mutex<()> = Mutex::new(());

/// A test's turn with udev: a running udevd, and no other udev test of this binary at once.
struct UdevTurn {
    // dropped in this order: udevd stopped, then the next test's turn
    _udevd: common::Udevd,
    _turn: std::sync::MutexGuard<'static, ()>,
}

fn udev_turn() -> UdevTurn {
    let turn = UDEVD_TESTS.lock().unwrap_or_else(|p| p.into_inner());
    UdevTurn {
        _udevd: common::Udevd::start(),
        _turn: turn,
    }
}

/// A udev rule that makes the loop device over `backing` look like U-Boot's UMS gadget on
/// a Rockchip board (ID_BUS=usb, 2207:350b), so sbcflash's default match is what finds it.
fn gadget_rule(backing: &Path) -> common::UdevRule {
    common::UdevRule::install(
        "ums",
        &format!(
            "SUBSYSTEM==\"block\", KERNEL==\"loop*\", ATTR{{loop/backing_file}}==\"{}\", ENV{{ID_BUS}}=\"usb\", ENV{{ID_VENDOR_ID}}=\"2207\", ENV{{ID_MODEL_ID}}=\"350b\", ENV{{ID_USB_DRIVER}}=\"usb-storage\"\n",
            backing.display()
        ),
    )
}

/// `sbcflash bootstrap --flash-via ums --yes --no-handoff` of `img` through `port`, with a
/// transcript in `dir` and `extra` options.
fn bootstrap_ums(port: &Path, img: &Path, dir: &Path, extra: &[&str]) -> Child {
    spawn(
        common::sbcflash()
            .args(["bootstrap", "--flash-via", "ums", "--yes", "--no-handoff"])
            .arg("--port")
            .arg(port)
            .arg("--image")
            .arg(img)
            .arg("--transcript")
            .arg(dir.join("bootstrap.log"))
            .args(extra),
        Stdio::null(),
    )
}

/// `bootstrap --flash-via ums`, all of it: U-Boot interrupted, `ums 0 mmc 0` typed, the board's
/// "eMMC" (a loop device over a garbage-filled file) appears through a real udev event, the
/// normal writer writes and reads it back, Ctrl-C ends the gadget, `reset`, the boot is
/// followed to a shell and the IP address. Then the eMMC is compared byte for byte.
#[test]
fn udevd_bootstrap_flash_via_ums_writes_the_disk_the_gadget_exposes() {
    if !common::require(
        true,
        &[
            common::IMAGE_TOOLS,
            &["socat", "stty", "losetup", "udevadm"],
        ]
        .concat(),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = common::make_nixos_like_image(dir.path(), "nixos.img", 40, common::Table::Mbr);
    let emmc = dir.path().join("board-emmc.bin");
    common::sh(&format!("head -c 48M /dev/urandom > '{}'", emmc.display()));
    let emmc = std::fs::canonicalize(&emmc).unwrap();
    let _turn = udev_turn();
    let _rule = gadget_rule(&emmc);
    common::run(Command::new("udevadm").args(["settle", "--timeout=30"]));
    let attached: Arc<Mutex<Vec<common::LoopDev>>> = Default::default();
    let events: Arc<Mutex<Vec<String>>> = Default::default();
    let (a2, e2, backing) = (attached.clone(), events.clone(), emmc.clone());
    let hook: GadgetHook = Box::new(move |ev| match ev {
        GadgetEvent::Start(c) => {
            e2.lock().unwrap().push(format!("start {c}"));
            a2.lock()
                .unwrap()
                .push(common::LoopDev::attach(&backing, &[]));
        }
        GadgetEvent::Stop => {
            e2.lock().unwrap().push("stop".into());
            // The gadget ends: the disk leaves this host (detached by its own name).
            a2.lock().unwrap().clear();
        }
    });
    let (pair, got) = scripted_board(dir.path(), hook);
    let mut child = bootstrap_ums(
        &pair.a,
        &img,
        dir.path(),
        &[
            "--uboot-timeout",
            "60",
            "--boot-timeout",
            "60",
            "--flash-timeout",
            "60",
        ],
    );
    let (code, out, err) = wait_child(&mut child, 240);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert_eq!(out.trim(), "10.0.2.15", "stderr: {err}");
    assert_eq!(
        *events.lock().unwrap(),
        vec!["start ums 0 mmc 0".to_string(), "stop".to_string()]
    );
    assert!(attached.lock().unwrap().is_empty());
    let sent = String::from_utf8_lossy(&got.lock().unwrap()).into_owned();
    let (ums, ctrl_c, reset) = (
        sent.find("ums 0 mmc 0\r").expect("ums typed"),
        sent.rfind('\x03').expect("Ctrl-C sent"),
        sent.find("reset\r").expect("reset typed"),
    );
    assert!(ums < ctrl_c && ctrl_c < reset, "{sent:?}");
    assert!(
        err.contains("ums: /dev/loop") && err.contains("read back verified"),
        "{err}"
    );
    let len = std::fs::metadata(&img).unwrap().len();
    common::assert_same_prefix(&img, &emmc, len);
    let tr = std::fs::read_to_string(dir.path().join("bootstrap.log")).unwrap();
    assert!(
        tr.contains("UMS: LUN 0") && tr.contains("NixOS Stage 2"),
        "{tr}"
    );
}

/// Without a disk appearing, the chain stops with a timeout naming what it waited for, and
/// the gadget is still ended with Ctrl-C (the board is back at its prompt, not reset).
#[test]
fn udevd_bootstrap_flash_via_ums_times_out_when_no_disk_appears() {
    if !common::require(true, &["socat", "stty", "udevadm"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("small.img");
    std::fs::write(&img, vec![0x5a; 1 << 20]).unwrap();
    let _turn = udev_turn();
    let (pair, got) = scripted_board(dir.path(), Box::new(|_| {}));
    let mut child = bootstrap_ums(&pair.a, &img, dir.path(), &["--flash-timeout", "2"]);
    let (code, out, err) = wait_child(&mut child, 120);
    assert_eq!(code, 7, "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains("no new USB disk appeared within 2s") && err.contains("ID_BUS=usb"),
        "{err}"
    );
    let sent = String::from_utf8_lossy(&got.lock().unwrap()).into_owned();
    let ums = sent.find("ums 0 mmc 0\r").expect("ums typed");
    assert!(sent[ums..].contains('\x03'), "gadget not ended: {sent:?}");
    assert!(!sent.contains("reset\r"), "{sent:?}");
}

/// What one in-process `bootstrap --flash-via` did: its result, the writer's summaries,
/// everything typed at the board, and the image it was given.
struct SimRun {
    result: Result<sbcflash::console::bootstrap::Reached, ConsoleError>,
    written: Vec<String>,
    sent: String,
    image: Vec<u8>,
}

impl SimRun {
    fn reached(&self) -> &sbcflash::console::bootstrap::Reached {
        match &self.result {
            Ok(r) => r,
            Err(e) => panic!("{e}\nsent: {:?}", self.sent),
        }
    }
}

/// Runs `bootstrap::run` in-process against the scripted board with a 3 MiB image (data, a
/// zero run and a tail that is not a sector multiple of 1 MiB), with the gadget's USB side on
/// a simulated bus (there is no USB here; the simulated devices speak rockusb/fastboot byte
/// for byte behind the same Transport trait as libusb).
fn bootstrap_over_sim_bus(
    via: sbcflash::console::bootstrap::FlashVia,
    cmd: &str,
    bus: SimBus,
    hook: GadgetHook,
    partition: Option<&str>,
) -> SimRun {
    use sbcflash::console::bootstrap::{self, Plan};
    use sbcflash::console::gadget::HostFlash;
    let dir = tempfile::tempdir().unwrap();
    let mut image: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    image[1 << 20..(1 << 20) + 300_000].fill(0);
    let img = dir.path().join("patterned.img");
    std::fs::write(&img, &image).unwrap();
    let (pair, got) = scripted_board(dir.path(), hook);
    let rt = runtime();
    let _e = rt.enter();
    let mut s = Session::new(Link::serial(&pair.a, 115_200).unwrap());
    let plan = Plan {
        uboot: cfg(),
        linux: LinuxConfig {
            boot_timeout: Duration::from_secs(60),
            ..LinuxConfig::default()
        },
        force_interrupt: false,
        uboot_cmds: Vec::new(),
        boot_cmd: None,
        flash_via: Some((via, cmd.to_string())),
        find_ip: true,
    };
    let mut f = HostFlash::new(img, Box::new(bus), Box::new(sbcflash::progress::Silent));
    f.partition = partition.map(str::to_string);
    let result = rt.block_on(bootstrap::run(
        &mut s,
        &plan,
        Some(&mut f as &mut dyn bootstrap::Flasher),
    ));
    let sent = String::from_utf8_lossy(&got.lock().unwrap()).into_owned();
    SimRun {
        result,
        written: f.written,
        sent,
        image,
    }
}

/// `dev`, shared, on a simulated bus of its own.
fn on_sim_bus<D: SimDevice + 'static>(dev: D) -> (Arc<Mutex<D>>, SimBus) {
    let dev = Arc::new(Mutex::new(dev));
    let mut bus = SimBus::new();
    bus.attach(dev.clone());
    (dev, bus)
}

#[test]
fn bootstrap_flash_via_rockusb_writes_the_simulated_gadget_then_boots() {
    use sbcflash::console::bootstrap::FlashVia;
    use sbcflash::usb::sim::rockusb::{RkMode, RockchipBoard, EMMC};
    if !need_ptys() {
        return;
    }
    let mut rk = RockchipBoard::rk3588(8 << 20);
    rk.mode = RkMode::Off; // not on USB until U-Boot starts the gadget
    rk.no_flash_info = true; // mainline U-Boot's rockusb
    let (rk, bus) = on_sim_bus(rk);
    let events: Arc<Mutex<Vec<String>>> = Default::default();
    let (r2, e2) = (rk.clone(), events.clone());
    let hook: GadgetHook = Box::new(move |ev| {
        let mut b = r2.lock().unwrap();
        match ev {
            GadgetEvent::Start(c) => {
                e2.lock().unwrap().push(c);
                b.mode = RkMode::Loader;
            }
            GadgetEvent::Stop => b.mode = RkMode::Off,
        }
    });
    let run = bootstrap_over_sim_bus(FlashVia::Rockusb, "rockusb 0 mmc 0", bus, hook, None);
    assert_eq!(run.reached().ip, Some("10.0.2.15".parse().unwrap()));
    assert_eq!(*events.lock().unwrap(), vec!["rockusb 0 mmc 0".to_string()]);
    let (written, sent, data) = (&run.written, &run.sent, &run.image);
    assert_eq!(written.len(), 1);
    assert!(
        written[0].contains("verified by reading back"),
        "{written:?}"
    );
    let b = rk.lock().unwrap();
    assert!(
        b.storage(EMMC)[..data.len()] == data[..],
        "eMMC differs from the image"
    );
    assert!(
        b.resets.is_empty(),
        "the console resets the board, not rockusb"
    );
    let ums = sent.find("rockusb 0 mmc 0\r").unwrap();
    assert!(sent[ums..].find('\x03').unwrap() < sent[ums..].find("reset\r").unwrap());
}

#[test]
fn bootstrap_flash_via_fastboot_writes_the_simulated_gadget_then_boots() {
    use sbcflash::console::bootstrap::FlashVia;
    use sbcflash::usb::sim::fastboot::FastbootDevice;
    if !need_ptys() {
        return;
    }
    // A download buffer smaller than the image: the writer must split it (sparse pieces).
    let mut fb = FastbootDevice::uboot(1 << 20, &[("mmc0", 8 << 20)]);
    fb.present = false;
    let (fb, bus) = on_sim_bus(fb);
    let f2 = fb.clone();
    let hook: GadgetHook = Box::new(move |ev| {
        f2.lock().unwrap().present = matches!(ev, GadgetEvent::Start(_));
    });
    let run = bootstrap_over_sim_bus(
        FlashVia::Fastboot,
        "fastboot usb 0",
        bus,
        hook,
        Some("mmc0"),
    );
    assert_eq!(run.reached().ip, Some("10.0.2.15".parse().unwrap()));
    assert!(
        run.written[0].contains("not read back"),
        "{:?}",
        run.written
    );
    let d = fb.lock().unwrap();
    assert!(
        d.partitions["mmc0"][..run.image.len()] == run.image[..],
        "mmc0 differs"
    );
    assert!(
        d.downloads.len() > 1,
        "expected sparse pieces: {:?}",
        d.downloads
    );
    assert!(!d.commands.iter().any(|c| c.starts_with("reboot")));
}

/// Fastboot without a partition name is refused before anything is typed at U-Boot.
#[test]
fn bootstrap_flash_via_fastboot_without_partition_is_refused_first() {
    use sbcflash::console::bootstrap::FlashVia;
    if !need_ptys() {
        return;
    }
    let run = bootstrap_over_sim_bus(
        FlashVia::Fastboot,
        "fastboot usb 0",
        SimBus::new(),
        Box::new(|_| panic!("no gadget may start")),
        None,
    );
    let e = run.result.as_ref().unwrap_err();
    assert!(e.to_string().contains("--flash-partition"), "{e}");
    assert!(!run.sent.contains("fastboot usb 0"), "{:?}", run.sent);
}

// ------------------------------------------- no --port and several USB serial adapters

/// Two of this machine's real tty devices (virtual consoles) tagged by a udev rule as USB
/// serial adapters (`ID_BUS=usb`, an FTDI serial): sbcflash's real udev enumeration lists
/// them. There is no USB bus here, so no real adapter can appear; this rule is the only
/// stand-in. The rule is removed and the devices re-triggered on drop.
struct FakeAdapters {
    rule: common::UdevRule,
    syspaths: Vec<String>,
    pub nodes: Vec<PathBuf>,
}

impl FakeAdapters {
    fn install() -> FakeAdapters {
        let mut names: Vec<u32> = std::fs::read_dir("/sys/class/tty")
            .unwrap()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("tty")?
                    .parse::<u32>()
                    .ok()
            })
            .filter(|n| *n >= 2)
            .collect();
        names.sort();
        let pick: Vec<String> = names
            .iter()
            .rev()
            .take(2)
            .rev()
            .map(|n| format!("tty{n}"))
            .collect();
        assert_eq!(pick.len(), 2, "need two tty devices in /sys/class/tty");
        let rule = common::UdevRule::install(
            "serial",
            &format!(
                "SUBSYSTEM==\"tty\", KERNEL==\"{}|{}\", ENV{{ID_BUS}}=\"usb\", ENV{{ID_SERIAL}}=\"FTDI_FT232R_USB_UART_TEST%k\", ENV{{ID_PATH}}=\"pci-0000:00:14.0-usb-0:%n\"\n",
                pick[0], pick[1]
            ),
        );
        let syspaths: Vec<String> = pick.iter().map(|k| format!("/sys/class/tty/{k}")).collect();
        let a = FakeAdapters {
            rule,
            nodes: pick
                .iter()
                .map(|k| PathBuf::from(format!("/dev/{k}")))
                .collect(),
            syspaths,
        };
        // A udevd started a moment ago may not have the new rule or the event yet when the
        // first trigger settles (seen once in CI): trigger again until the rule shows.
        for _ in 0..40 {
            a.retrigger();
            if a.missing().is_none() {
                return a;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        if let Some(s) = a.missing() {
            panic!("udev did not apply the test rule to {s}");
        }
        a
    }

    /// The first device the rule has not reached yet, if any.
    fn missing(&self) -> Option<&str> {
        self.syspaths.iter().map(String::as_str).find(|s| {
            let o = common::run(
                Command::new("udevadm")
                    .args(["info", "-q", "property"])
                    .arg(s),
            );
            !String::from_utf8_lossy(&o.stdout).contains("ID_BUS=usb")
        })
    }

    fn retrigger(&self) {
        let _ = Command::new("udevadm")
            .args(["control", "--reload"])
            .status();
        // --settle waits for these very events (a plain settle can return before udevd has
        // even received them).
        let _ = Command::new("udevadm")
            .args(["trigger", "--settle", "--action=change"])
            .args(&self.syspaths)
            .status();
        let _ = Command::new("udevadm")
            .args(["settle", "--timeout=30"])
            .status();
    }
}

impl Drop for FakeAdapters {
    fn drop(&mut self) {
        self.rule.remove();
        self.retrigger();
    }
}

#[test]
fn udevd_several_serial_adapters_without_a_terminal_are_listed_as_bad_input() {
    if !common::require(true, &["udevadm"]) {
        return;
    }
    let _turn = udev_turn();
    let fake = FakeAdapters::install();
    let dir = tempfile::tempdir().unwrap();
    let o = common::sbcflash()
        .args(["console", "--transcript"])
        .arg(dir.path().join("t.log"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("several USB serial adapters"), "{err}");
    for n in &fake.nodes {
        let name = n.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            err.contains(&format!("{} (FTDI FT232R USB UART TEST{name}", n.display())),
            "{err}"
        );
    }
}

/// On a terminal, sbcflash lists the adapters, re-asks after a bad answer and opens the one
/// chosen. sbcflash runs in a private mount namespace where the chosen adapter's node is a
/// bind mount of a pty whose other end the test holds, so the test sees that it is the one
/// opened (and no virtual console of this machine is touched).
#[test]
fn udevd_several_serial_adapters_on_a_terminal_asks_which_one() {
    if !common::require(true, &["udevadm", "unshare", "mount", "socat", "stty"]) {
        return;
    }
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let _turn = udev_turn();
    let fake = FakeAdapters::install();
    let dir = tempfile::tempdir().unwrap();
    let pair = PtyPair::start(dir.path());
    let (mut board, got) = pair.board();
    let pts = std::fs::canonicalize(&pair.a).unwrap();
    let chosen = &fake.nodes[1];
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = |fd: &OwnedFd| {
        // SAFETY: dup gives a new descriptor owned by the Stdio.
        unsafe { Stdio::from_raw_fd(libc::dup(fd.as_raw_fd())) }
    };
    let child = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$1\" \"$2\" && shift 2 && exec \"$@\"")
        .arg("sh")
        .arg(&pts)
        .arg(chosen)
        .arg(env!("CARGO_BIN_EXE_sbcflash"))
        .args(["console", "--transcript"])
        .arg(dir.path().join("t.log"))
        .stdin(slave(&pty.slave))
        .stderr(slave(&pty.slave))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Child(child);
    drop(pty.slave);
    let stdout = gather(child.0.stdout.take().unwrap());
    let mut w = std::fs::File::from(pty.master);
    let seen = gather(w.try_clone().unwrap());
    wait_for(&seen, b"which one? [1-");
    let shown = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    assert!(
        shown.contains(&format!("1) {}", fake.nodes[0].display()))
            && shown.contains(&format!("2) {}", chosen.display())),
        "{shown}"
    );
    w.write_all(b"7\n").unwrap();
    wait_for(&seen, b"\"7\" is not a number from 1 to");
    w.write_all(b"2\n").unwrap();
    wait_for(&seen, b"leave with Ctrl-] q");
    w.write_all(b"x").unwrap();
    wait_for(&got, b"x");
    board
        .write_all(b"hello from the chosen adapter\r\n")
        .unwrap();
    wait_for(&stdout, b"hello from the chosen adapter");
    w.write_all(b"\x1dq").unwrap();
    let (code, _, _) = wait_child(&mut child, 30);
    let shown = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    assert_eq!(code, 0, "{shown}");
    assert!(
        shown.contains(&format!("console {} at 115200", chosen.display())),
        "{shown}"
    );
    assert_eq!(got.lock().unwrap().as_slice(), b"x");
}

// ------------------------------------- XMODEM / YMODEM against lrzsz's receivers on a pty

/// All 256 byte values, including the protocol's own (SOH, STX, EOT, ACK, NAK, CAN, SUB)
/// and XON/XOFF, in a non-repeating order.
fn transfer_payload(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 11) as u8
        })
        .collect()
}

/// `sbcflash serial-load --raw` on a pty (what it would open for a USB serial adapter); on
/// the other side socat runs an lrzsz receiver (`rx`/`rb`, the stand-in for a boot ROM's or
/// U-Boot's receiver) on its stdin/stdout. The receiver talks to socat over a socketpair,
/// not a second pty: observed here, lrzsz 0.12.21 on a pty sometimes loses its final ACK of
/// the EOT when it exits and resets its terminal (more often with `-q` or under load), and
/// the sender then retries EOT until it gives up. Returns the receiver's directory and
/// sbcflash's stdout.
fn send_to_lrzsz(protocol: &str, data: &[u8], receiver: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payload.bin");
    std::fs::write(&file, data).unwrap();
    let recv = dir.path().join("recv");
    std::fs::create_dir(&recv).unwrap();
    let host = dir.path().join("host-end");
    let socat = Command::new("socat")
        .arg(format!("pty,raw,echo=0,link={}", host.display()))
        .arg(format!("EXEC:{receiver}"))
        .current_dir(&recv)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut socat = Child(socat);
    wait_exists(&[&host]);
    let mut child = spawn(
        common::sbcflash()
            .args(["serial-load", "--raw", "--protocol", protocol, "--port"])
            .arg(&host)
            .arg("--transcript")
            .arg(dir.path().join("t.log"))
            .arg(&file),
        Stdio::null(),
    );
    let (code, out, err) = wait_child(&mut child, 120);
    assert_eq!(code, 0, "sbcflash: {out}\n{err}");
    // socat ends when the receiver does.
    let (scode, _, serr) = wait_child(&mut socat, 60);
    assert_eq!(scode, 0, "socat/{receiver}: {serr}");
    (dir, out)
}

/// What an lrzsz receiver got, what was sent, and sbcflash's stdout.
struct Received {
    data: Vec<u8>,
    got: Vec<u8>,
    stdout: String,
}

/// [`transfer_payload`] of `len` bytes sent with `protocol` to `receiver` (a command line),
/// read back from `received` in its directory. `None` (skip) without socat or the receiver.
fn lrzsz_receives(protocol: &str, len: usize, receiver: &str, received: &str) -> Option<Received> {
    let tool = receiver.split_whitespace().next().unwrap_or_default();
    if !common::require(false, &["socat", tool]) {
        return None;
    }
    let data = transfer_payload(len);
    let (dir, stdout) = send_to_lrzsz(protocol, &data, receiver);
    let got = std::fs::read(dir.path().join("recv").join(received)).unwrap();
    Some(Received { data, got, stdout })
}

fn assert_xmodem_file(got: &[u8], data: &[u8]) {
    assert_padded(got, data, data.len().div_ceil(128) * 128);
}

/// `got` is `data` padded with SUB (0x1a) to `len` bytes, as XMODEM receivers keep it.
fn assert_padded(got: &[u8], data: &[u8], len: usize) {
    assert_eq!(got.len(), len, "XMODEM pads to whole blocks");
    assert!(
        got[..data.len()] == *data,
        "received bytes differ from the file"
    );
    assert!(
        got[data.len()..].iter().all(|&b| b == 0x1a),
        "the padding is not SUB (0x1a)"
    );
}

/// Plain XMODEM with the 8-bit checksum: `rx` without `-c` starts with NAK.
#[test]
fn xmodem_checksum_to_lrzsz_rx_arrives_byte_for_byte() {
    let Some(r) = lrzsz_receives("xmodem", 100_001, "rx -b out.bin", "out.bin") else {
        return;
    };
    assert_xmodem_file(&r.got, &r.data);
    assert!(r.stdout.contains("100001 bytes"), "{}", r.stdout);
}

/// XMODEM-CRC (what the VisionFive 2's UART recovery asks for): `rx -c` starts with `C`.
#[test]
fn xmodem_crc_to_lrzsz_rx_arrives_byte_for_byte() {
    let Some(r) = lrzsz_receives("xmodem", 65_536, "rx -b -c out.bin", "out.bin") else {
        return;
    };
    assert_xmodem_file(&r.got, &r.data);
}

/// XMODEM-1K: 1024-byte STX blocks while more than 128 bytes remain, then a 128-byte block;
/// `rx` accepts both and keeps the SUB padding.
#[test]
fn xmodem_1k_to_lrzsz_rx_arrives_byte_for_byte() {
    // 64 full 1K blocks, then 300 bytes (a padded 1K block), then nothing: 66560 bytes.
    let Some(r) = lrzsz_receives("xmodem1k", 65_536 + 300, "rx -b -c out.bin", "out.bin") else {
        return;
    };
    // The 300-byte tail went in one padded 1K block.
    assert_padded(&r.got, &r.data, 65_536 + 1024);
}

/// YMODEM (U-Boot's `loady`): 1024-byte blocks, block 0 with name and size so that `rb`
/// truncates the padding, and the closing empty block 0.
#[test]
fn ymodem_1k_blocks_to_lrzsz_rb_arrives_byte_for_byte() {
    // rb names the file as block 0 announced it
    let Some(r) = lrzsz_receives("ymodem", 300 * 1024 + 77, "rb -b", "payload.bin") else {
        return;
    };
    assert_eq!(
        r.got.len(),
        r.data.len(),
        "rb did not truncate to the announced size"
    );
    assert!(r.got == r.data, "received bytes differ from the file");
}

// ------------------------------------------------------------------ noise, nudges, re-asking

/// A kernel line as the console shows it.
fn klog(t: f32, msg: &str) -> String {
    format!("[{t:>12.6}] {msg}\r\n")
}

fn notes(r: &Replay) -> Vec<String> {
    r.stages
        .iter()
        .filter_map(|s| match s {
            Stage::Note(n) => Some(n.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn linux_follower_presses_enter_for_a_board_sitting_at_its_prompt() {
    // Nothing comes (the prompt was printed before the port was opened); Enter brings it.
    for first in [
        String::new(),
        klog(812.5, "usb 1-1.2: device descriptor read/64, error -71"),
    ] {
        let segs = vec![
            first.clone().into_bytes(),
            format!(
                "\r\n{}sbcflash-test login: ",
                klog(813.0, "random: crng init done")
            )
            .into_bytes(),
        ];
        let mut m = Follow::new(&LinuxConfig::default(), ResetWatch::default());
        let mut now = Instant::now();
        let t0 = now;
        let (res, r) = play(&mut m, Replay::new(segs, 7, 3), &mut now);
        assert_eq!(res.expect("login").0, Arrival::Login);
        assert_eq!(r.sent, b"\r");
        assert_eq!(
            notes(&r),
            ["waited 5s of quiet console for a login prompt or shell: pressed Enter (1/3)"]
        );
        assert!(now - t0 >= Duration::from_secs(5));
    }
}

/// Follows `text` followed by kernel lines every 200 ms (virtual clock) until the boot
/// timeout; returns what was typed, the notes and the error.
fn follow_through_kernel_noise(text: &str) -> (Vec<u8>, Vec<String>, ConsoleError) {
    let mut noise = String::from(text);
    for i in 0..600 {
        noise.push_str(&klog(
            1.0 + i as f32 * 0.2,
            "usb 1-1.2: device descriptor read/64, error -71",
        ));
    }
    let lc = LinuxConfig {
        boot_timeout: Duration::from_secs(60),
        ..LinuxConfig::default()
    };
    let mut r = Replay::new(vec![noise.into_bytes()], 64, 5);
    let mut now = Instant::now();
    let mut ex = Expect::new();
    let mut m = Follow::new(&lc, ResetWatch::default());
    let err = loop {
        match m.step(&mut ex, now) {
            Step::Nudge { bytes, note } => {
                r.sent.extend_from_slice(&bytes);
                r.stages.push(Stage::Note(note));
            }
            Step::Send(b) => r.sent.extend_from_slice(&b),
            Step::Stage(s) => r.stages.push(s),
            Step::Done(x) => panic!("done: {x:?}"),
            Step::Fail(e) => break e,
            Step::Wait(until) => {
                // about one kernel line per 200 ms
                let next = now + Duration::from_millis(50);
                if let Some(c) = r.next_chunk() {
                    ex.feed(&c, next.min(until.max(now)));
                }
                now = next.min(until.max(now + Duration::from_millis(1)));
            }
        }
    };
    let n = notes(&r);
    (r.sent, n, err)
}

#[test]
fn linux_follower_nudges_are_bounded_and_the_timeout_says_what_it_saw() {
    // Userspace printed, then only kernel lines: they are no prompt and no activity; three
    // newlines, then the boot timeout names them and shows the last text.
    let (sent, notes, err) =
        follow_through_kernel_noise("Linux version 6.1.0 (x)\r\nSBCFLASH-TEST-READY\r\n");
    assert_eq!(sent, b"\r\r\r", "three newlines, no more");
    assert_eq!(notes.len(), 3);
    assert!(notes[2].ends_with("pressed Enter (3/3)"));
    let msg = err.to_string();
    assert!(matches!(err, ConsoleError::Timeout { .. }), "{msg}");
    assert!(
        msg.contains("stage \"kernel boot\"")
            && msg.contains("the kernel, NixOS and a login prompt (pressed Enter 3 times)")
            && msg.contains("| SBCFLASH-TEST-READY")
            && msg.contains("| (kernel) [")
            && msg.contains("device descriptor read/64")
            && msg.contains("more kernel lines in between"),
        "{msg}"
    );
    // While the kernel boots (banner, no userspace text yet) nobody reads the console.
    let (sent, notes, _) = follow_through_kernel_noise("Linux version 6.1.0 (x)\r\n");
    assert!(sent.is_empty() && notes.is_empty(), "{notes:?}");
    // Attached to a running Linux (kernel lines, no banner seen): Enter is safe.
    let (sent, _, _) = follow_through_kernel_noise("");
    assert_eq!(sent, b"\r\r\r");
}

#[test]
fn no_newline_into_uboot_countdown_menu_or_prompt() {
    // Before the kernel, a quiet console is U-Boot's: Enter would stop the countdown, pick
    // a menu entry or repeat the last command. The follower waits instead.
    for text in [
        "U-Boot 2023.01 (x)\r\nHit any key to stop autoboot:  2 ",
        "U-Boot 2023.01 (x)\r\nEnter choice: ",
        "U-Boot 2023.01 (x)\r\n=> ",
    ] {
        let lc = LinuxConfig {
            boot_timeout: Duration::from_secs(30),
            ..LinuxConfig::default()
        };
        let mut m = Follow::new(&lc, ResetWatch::default());
        let r = Replay::new(vec![text.as_bytes().to_vec()], 5, 1);
        let (res, r) = play(&mut m, r, &mut Instant::now());
        let msg = res.expect_err(text).to_string();
        assert!(r.sent.is_empty(), "{text:?}: sent {:?}", r.sent);
        assert!(
            msg.contains("U-Boot boot") && !msg.contains("pressed Enter"),
            "{msg}"
        );
    }
}

fn login_cfg() -> LinuxConfig {
    LinuxConfig {
        login_timeout: Duration::from_secs(60),
        ..LinuxConfig::default()
    }
}

#[test]
fn login_through_kernel_lines_in_the_echo_and_the_prompt() {
    let k = |t| klog(t, "mmc1: Timeout waiting for hardware interrupt.");
    let segs = vec![
        String::new(),
        // user name echo split by a kernel line, prompt followed by one
        format!("ro{}ot\r\n~ # {}", k(5.1), k(5.2)),
        format!("echo SY\"\"NC-2{}\r\nSYN{}C-2\r\n~ # ", k(5.3), k(5.4)),
    ];
    let mut r = Replay::new(segs.into_iter().map(String::into_bytes).collect(), 3, 11);
    r.keyed = true; // spaces in typed text release nothing
    let mut m = linux::Login::new(&login_cfg(), Arrival::Login, 2);
    let (res, r) = play(&mut m, r, &mut Instant::now());
    res.expect("login");
    assert_eq!(r.sent, b"root\recho SY\"\"NC-2\r");
    assert!(notes(&r).is_empty());
}

#[test]
fn login_presses_enter_when_the_user_name_was_lost_and_reads_the_prompt_again() {
    // getty flushed the typed name: nothing comes. Enter shows the prompt again, the name
    // is typed again (not the marker: that would become a user name).
    let segs = vec![
        String::new(),
        String::new(),
        format!(
            "\r\n{}sbcflash-test login: ",
            klog(9.0, "random: crng init done")
        ),
        "root\r\n~ # ".to_string(),
        "echo SY\"\"NC-4\r\nSYNC-4\r\n~ # ".to_string(),
    ];
    let lc = LinuxConfig {
        nudge_after: Duration::from_secs(3),
        ..login_cfg()
    };
    let mut m = linux::Login::new(&lc, Arrival::Login, 4);
    let mut r = Replay::new(segs.into_iter().map(String::into_bytes).collect(), 5, 2);
    r.keyed = true; // spaces in typed text release nothing
    let (res, r) = play(&mut m, r, &mut Instant::now());
    res.expect("login");
    // root (no echo), (3 s quiet) Enter, root again, (700 ms quiet) marker
    assert_eq!(
        String::from_utf8_lossy(&r.sent),
        "root\r\rroot\recho SY\"\"NC-4\r"
    );
    assert_eq!(
        notes(&r),
        ["waited 3s of quiet console for answer to the login: pressed Enter (1/3)"]
    );
}

#[test]
fn command_output_with_kernel_lines_mid_line_parses_and_a_garbled_marker_is_not_guessed() {
    let k = |t| klog(t, "eth0: link is not ready");
    let body = format!(
        "echo SY\"\"NC-7; ip -4 addr show; echo RC\"\"-7-$?\r\nSY{}NC-7\r\n    inet 10.0.{}2.15/24 brd 10.0.2.255 scope global eth0\r\nRC-7{}-0\r\n~ # ",
        k(1.0),
        k(1.1),
        k(1.2)
    );
    let mut m = linux::command(&login_cfg(), "ip -4 addr show", 7);
    let mut r = Replay::new(vec![Vec::new(), body.into_bytes()], 4, 3);
    r.keyed = true;
    let (res, _) = play(&mut m, r, &mut Instant::now());
    let out = res.expect("ip");
    assert_eq!(out.status, 0);
    assert_eq!(
        linux::parse_ip_text(&out.text()),
        Ok(Some([10, 0, 2, 15].into()))
    );

    // A `\r` rewrote the end marker: the answer is garbled, the caller asks again.
    let body = "echo SY\"\"NC-8; ip -4 addr show; echo RC\"\"-8-$?\r\nSYNC-8\r\n    inet 10.0.2.15/24\r\nRC-8-\r0\r\n~ # ";
    let mut m = linux::command(&login_cfg(), "ip -4 addr show", 8);
    let mut r = Replay::new(vec![Vec::new(), body.as_bytes().to_vec()], 4, 3);
    r.keyed = true;
    let err = play(&mut m, r, &mut Instant::now()).0.expect_err("garbled");
    assert!(matches!(err, ConsoleError::Garbled { .. }), "{err}");
    assert!(err.to_string().contains("\"RC-8-\""), "{err}");
    // Unclean text answers are errors, not a first guess.
    assert!(linux::parse_ip_text("    inet 10.0.2/24 scope global eth0").is_err());
    assert!(linux::parse_ip_json("[{\"ifname\": \"eth0\", \"addr_in").is_err());
    assert_eq!(linux::parse_ip_text("2: eth0: <UP>"), Ok(None));
}

/// Every Linux wait of `bootstrap` (boot to login, login, `dmesg -n 1`, both IP queries)
/// on a recorded noisy console: the raw bytes of a QEMU boot with
/// `--noise "rate=5 login-burst=100 ip-burst=1"` (kernel lines on the login prompt's line,
/// inside the echo of typed text and inside every line `ip` printed). Each segment is
/// released by what the machines type, at several read sizes.
#[test]
fn linux_waits_replay_a_recorded_noisy_boot_login_and_ip_query() {
    let log = data("qemu-aarch64-noisy-boot-to-ip.log");
    let boot = find(&log, b"=> boot\r\n").expect("boot in recording");
    // The U-Boot waits of the same run (U-Boot itself prints no kernel lines; `noisy` adds
    // some between its lines anyway): interrupt, `printenv bootcmd`.
    for (chunk, seed) in [(4096usize, 1u64), (1, 2), (5, 3)] {
        for segs in [
            uboot_segments(&log[..boot + 3]),
            uboot_segments(&log[..boot + 3])
                .iter()
                .map(|seg| noisy(seg, seed))
                .collect(),
        ] {
            let outs = uboot_replay(segs, chunk, seed, &["printenv bootcmd"]);
            assert_eq!(outs[0].lines, ["bootcmd=run distro_bootcmd"], "{outs:?}");
        }
    }
    let body = &log[boot..];
    let login = find(body, b"sbcflash-test login: ").expect("login prompt");
    assert!(
        body[login..].starts_with(b"sbcflash-test login: ["),
        "the recording has a kernel line on the prompt's line"
    );
    // Cut before the echo of each thing bootstrap typed.
    // (The tty may echo a command typed ahead once more when the shell reads it.)
    let mut cuts = vec![login + find(&body[login..], b"root\r\n").expect("user echo")];
    for n in 3..=6 {
        let echo = format!("echo SY\"\"NC-{n}");
        let at = *cuts.last().unwrap();
        cuts.push(at + find(&body[at..], echo.as_bytes()).expect("echo in recording"));
    }
    let mut segs = vec![body[..cuts[0]].to_vec()];
    for w in cuts.windows(2) {
        segs.push(body[w[0]..w[1]].to_vec());
    }
    segs.push(body[cuts[4]..].to_vec());
    let lc = LinuxConfig {
        ip_marker: Some(regex::Regex::new(r"SBCFLASH-TEST-IP: (\S+)").unwrap()),
        ..LinuxConfig::default()
    };
    for (chunk, seed) in [(4096usize, 1u64), (1, 2), (3, 3), (61, 4)] {
        let mut r = Replay::new(segs.clone(), chunk, seed);
        r.keyed = true; // spaces in typed text release nothing
        let mut ex = Expect::new();
        let mut now = Instant::now();
        let mut follow = Follow::new(&lc, ResetWatch::default());
        let (arrival, ip) = drive(&mut follow, &mut ex, &mut r, &mut now).expect("follow");
        assert_eq!(arrival, Arrival::Login);
        assert_eq!(ip, Some([10, 0, 2, 15].into()));
        let mut login = linux::Login::new(&lc, arrival, 3);
        drive(&mut login, &mut ex, &mut r, &mut now).expect("login");
        let run = |cmd: &str, n: u32, ex: &mut Expect, r: &mut Replay, now: &mut Instant| {
            drive(&mut linux::command(&lc, cmd, n), ex, r, now).expect(cmd)
        };
        assert_eq!(run("dmesg -n 1", 4, &mut ex, &mut r, &mut now).status, 0);
        let j = run("ip -4 -j addr show", 5, &mut ex, &mut r, &mut now);
        assert_eq!(j.status, 1, "busybox ip has no -j: {j:?}");
        assert!(j.text().contains("BusyBox v1.35.0"), "{j:?}");
        let t = run("ip -4 addr show", 6, &mut ex, &mut r, &mut now);
        assert_eq!(t.status, 0);
        assert!(
            t.lines.iter().all(|l| !l.contains("noise")),
            "kernel lines left in the output: {t:?}"
        );
        assert_eq!(
            linux::parse_ip_text(&t.text()),
            Ok(Some([10, 0, 2, 15].into())),
            "{t:?}"
        );
        assert!(
            !notes(&r).iter().any(|n| n.contains("pressed Enter")),
            "no nudge was needed: {:?}",
            notes(&r)
        );
        assert!(ex.kernel_lines() > 20, "{}", ex.kernel_lines());
    }
}

/// A shell whose first answer to `ip -4 addr show` has its end marker rewritten by a `\r`
/// (and a kernel line in its output): the query is asked again and the second, clean
/// answer is used; an answer that never reads cleanly gives no address, not a guess.
#[test]
fn a_query_whose_answer_is_not_clean_is_asked_again() {
    for (garbled, want) in [(1usize, Some([10u8, 0, 2, 15].into())), (3, None)] {
        runtime().block_on(async {
            let (board, host) = tokio::io::duplex(1 << 16);
            let mut s = Session::new(Link::stream(Box::new(host), 115_200));
            let mut answered = 0;
            let shell = shell_replying(board, move |line, n| {
                answered += 1;
                let end = if answered <= garbled {
                    format!("RC-{n}-\r0")
                } else {
                    format!("RC-{n}-0")
                };
                format!(
                    "{line}\r\nSYNC-{n}\r\n    inet 10.0.[   42.000001] usb 1-1: reset\r\n2.15/24 scope global eth0\r\n{end}\r\n~ # "
                )
            });
            let got = sbcflash::console::bootstrap::ask(
                &mut s,
                &LinuxConfig::default(),
                "ip -4 addr show",
                linux::parse_ip_text,
            )
            .await
            .expect("ask");
            assert_eq!(got.flatten(), want, "garbled {garbled}");
            drop(s);
            let asked = shell.await.unwrap();
            assert_eq!(asked, garbled.min(2) + 1, "asked {asked} times");
        });
    }
}

/// Every file under `dir` (ledger, its WAL, slot logs), read whole.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                out.push((p, b));
            }
        }
    }
    out
}

#[test]
fn qemu_station_host_key_boots_and_strict_ssh_with_the_exported_known_hosts_works() {
    if !need_qemu("aarch64")
        || !common::require(
            true,
            &[
                "ssh",
                "ssh-keygen",
                "losetup",
                "udevadm",
                "mtype",
                "apt-get",
                "mkfs.ext4",
            ],
        )
    {
        return;
    }
    let img = boot_image();
    let key = img.with_file_name("id_ed25519");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The station's state (ledger, logs) in its own directory: everything in it is searched
    // for the private key below.
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let card = dir.join("card.img");
    std::fs::File::create(&card)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let cfg = state.join("station.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"board = "qemu-aarch64"
ledger = "ledger.sqlite"
log_dir = "logs"
image = "{}"
[identity]
serial = "QEMU-{{seq:03}}"
hostname = "{{serial_lower}}"
host_key = "sbcflash/ssh_host_ed25519_key"
[[slot]]
name = "s1"
match = {{ "attr:loop/backing_file" = "{}" }}
"#,
            img.display(),
            card.display()
        ),
    )
    .unwrap();
    let station = {
        let _udevd = common::Udevd::start();
        let _card = common::LoopDev::attach(&card, &[]);
        common::run(Command::new("udevadm").args(["settle", "--timeout=30"]));
        let mut c = common::sbcflash();
        c.env("SBCFLASH_CACHE_DIR", dir.join("cache"))
            .args(["station", "--json", "--config"])
            .arg(&cfg)
            .args(["--flash-present", "--exit-after", "1"]);
        let mut child = spawn(&mut c, Stdio::null());
        let (code, out, err) = wait_child(&mut child, 300);
        assert_eq!(code, 0, "station\nstdout:\n{out}\nstderr:\n{err}");
        format!("{out}\n{err}")
    };
    // What the station put on the card's FAT partition (p1 at 8 MiB).
    let mtype = |p: &str| {
        let o = Command::new("mtype")
            .arg("-i")
            .arg(format!("{}@@8M", card.display()))
            .arg(format!("::{p}"))
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string(),
        )
    };
    let (ok, private) = mtype("sbcflash/ssh_host_ed25519_key");
    assert!(
        ok && private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"),
        "{private}"
    );
    let body: Vec<&str> = private
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .collect();
    assert!(!body.is_empty());

    let report = |args: &[&str]| {
        let o = common::run(
            common::sbcflash()
                .args(["station", "report", "--config"])
                .arg(&cfg)
                .args(args),
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let kh_text = report(&["--known-hosts"]);
    let rows: serde_json::Value = serde_json::from_str(&report(&["--format", "json"])).unwrap();
    let row = &rows[0];
    let host = row["hostname"].as_str().unwrap().to_string();
    let public = row["host_key"].as_str().unwrap().to_string();
    assert_eq!(row["result"], "pass", "{rows}");
    assert_eq!(
        kh_text,
        format!("{host} {public} {}\n", row["unit_serial"].as_str().unwrap())
    );
    // the ledger's fingerprint is OpenSSH's for the key on the card
    let (_, pubfile) = mtype("sbcflash/ssh_host_ed25519_key.pub");
    std::fs::write(dir.join("unit.pub"), &pubfile).unwrap();
    let fp = common::run(
        Command::new("ssh-keygen")
            .arg("-lf")
            .arg(dir.join("unit.pub")),
    );
    assert!(
        String::from_utf8_lossy(&fp.stdout).contains(row["host_key_fingerprint"].as_str().unwrap()),
        "{rows}"
    );
    // The private key is on the card only: not in the ledger, its WAL, the logs, the
    // station's output or the reports.
    let csv = report(&[]);
    let mut searched = files_under(&state);
    searched.push(("station output".into(), station.into_bytes()));
    searched.push(("report csv".into(), csv.into_bytes()));
    searched.push(("report json".into(), rows.to_string().into_bytes()));
    assert!(searched
        .iter()
        .any(|(_, b)| String::from_utf8_lossy(b).contains(&public)));
    for (p, b) in &searched {
        let text = String::from_utf8_lossy(b);
        for l in &body {
            assert!(!text.contains(l), "{} holds private key text", p.display());
        }
    }

    let t = Target::start(&["--disk", card.to_str().unwrap(), "--ssh-port", "0"]);
    t.cont().join().unwrap();
    let w = t.wait_for("SBCFLASH-TEST-READY", 180);
    assert!(
        w.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&w.stderr),
        t.serial_log()
    );
    assert!(
        t.serial_log()
            .contains("SBCFLASH-TEST-HOSTKEY: installed from the FAT partition"),
        "{}",
        t.serial_log()
    );
    let exported = dir.join("exported_known_hosts");
    std::fs::write(&exported, &kh_text).unwrap();
    let ssh = |known: &Path| {
        Command::new("ssh")
            .arg("-i")
            .arg(&key)
            .args(["-p", &t.ssh_port().to_string()])
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known.display()))
            .args(["-o", "GlobalKnownHostsFile=/dev/null"])
            .arg("-o")
            .arg(format!("HostKeyAlias={host}"))
            .args(["-o", "ConnectTimeout=30", "root@127.0.0.1", "hostname"])
            .output()
            .unwrap()
    };
    let o = ssh(&exported);
    assert!(
        o.status.success(),
        "strict ssh with the exported known_hosts: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        t.serial_log()
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "sbcflash-test");
    // Control: the same strict ssh with another key under that name is refused, so the
    // success above is the exported key's doing.
    let other = dir.join("other_known_hosts");
    let (k, _, _) = sbcflash::station::identity::make_host_key("x").unwrap();
    std::fs::write(&other, format!("{host} {}\n", k.public)).unwrap();
    let o = ssh(&other);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("REMOTE HOST IDENTIFICATION HAS CHANGED"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    t.stop();
    // The key left the FAT partition on first boot.
    assert!(!mtype("sbcflash/ssh_host_ed25519_key").0);
}

/// A shell on the board's end of a duplex link: each framed command line it reads (with its
/// sync number) is answered with what `reply(line, number)` makes of it. Returns how many
/// commands it answered.
fn shell_replying(
    board: tokio::io::DuplexStream,
    mut reply: impl FnMut(&str, &str) -> String + Send + 'static,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut rd, mut wr) = tokio::io::split(board);
        let mut typed = Vec::new();
        let mut answered = 0;
        let mut buf = [0u8; 1024];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
            typed.extend_from_slice(&buf[..n]);
            while let Some(i) = typed.iter().position(|&b| b == b'\r') {
                let line = String::from_utf8_lossy(&typed[..i]).into_owned();
                typed.drain(..=i);
                let n = line
                    .split("SY\"\"NC-")
                    .nth(1)
                    .and_then(|r| r.split(';').next())
                    .unwrap_or("0")
                    .to_string();
                answered += 1;
                wr.write_all(reply(&line, &n).as_bytes()).await.unwrap();
            }
        }
        answered
    })
}

/// A session (115200 baud) on a duplex link whose board end is a shell answering the n-th
/// framed command with `answers[n]` (the last one again after that), and that shell.
fn scripted_shell(answers: Vec<String>) -> (Session, tokio::task::JoinHandle<usize>) {
    let (board, host) = tokio::io::duplex(1 << 16);
    let s = Session::new(Link::stream(Box::new(host), 115_200));
    let mut asked = 0;
    let shell = shell_replying(board, move |line, n| {
        let a = &answers[asked.min(answers.len() - 1)];
        asked += 1;
        format!("{line}\r\nSYNC-{n}\r\n{a}RC-{n}-0\r\n~ # ")
    });
    (s, shell)
}

#[test]
fn host_keys_not_on_the_console_yet_are_asked_for_again_until_the_deadline() {
    use sbcflash::console::hostkeys::{HostKey, ProofWait};
    let (k, _, public) = sbcflash::station::identity::make_host_key("root@b").unwrap();
    let key = HostKey::parse(&public).unwrap();
    let network = vec![key.clone()];
    // dropbearkey's answer, with a kernel message in the middle of the key line
    let (head, tail) = k.public.split_at(30);
    let shown = format!(
        "Public key portion is:\r\n{head}[   42.000001] usb 1-1: reset\r\n{tail} root@b\r\nFingerprint: {}\r\n",
        k.fingerprint
    );
    /// `prove_host_keys` for `network` (deadline `deadline`) against a shell answering
    /// `answers`: its result, and how many times the shell was asked.
    async fn prove(
        answers: Vec<String>,
        network: &[HostKey],
        deadline: Duration,
    ) -> (Result<Vec<HostKey>, ConsoleError>, usize) {
        let (mut s, shell) = scripted_shell(answers);
        let wait = ProofWait::new(deadline, Duration::from_millis(10));
        let got = sbcflash::console::bootstrap::prove_host_keys(
            &mut s,
            &LinuxConfig::default(),
            "10.0.0.5:22",
            network,
            wait,
        )
        .await;
        drop(s);
        (got, shell.await.unwrap())
    }
    runtime().block_on(async {
        // no key on the first two asks (sshd still making it), then the key
        let answers = vec![String::new(), String::new(), shown.clone()];
        let (got, asked) = prove(answers, &network, Duration::from_secs(120)).await;
        assert_eq!(got.expect("proven"), network);
        assert_eq!(asked, 3);

        // never a key: the deadline ends it, as a timeout naming the key type
        let (got, asked) = prove(vec![String::new()], &network, Duration::from_millis(200)).await;
        let e = got.expect_err("never shown");
        assert!(matches!(e, ConsoleError::HostKeyUnproven { .. }), "{e}");
        assert!(
            e.to_string().contains("no SSH host key of ssh-ed25519"),
            "{e}"
        );
        use sbcflash::exit::Classify;
        assert_eq!(e.exit(), sbcflash::exit::Exit::Timeout);
        assert!(asked >= 2);
    });
}
