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
use std::time::{Duration, Instant};

use sbcflash::console::expect::Expect;
use sbcflash::console::linux::{self, Arrival, Follow, LinuxConfig};
use sbcflash::console::serial::Link;
use sbcflash::console::session::Session;
use sbcflash::console::uboot::{self, Gadget, Interrupt, InterruptKey, ResetWatch, UBootConfig};
use sbcflash::console::{CommandOutput, ConsoleError, Machine, Stage, Step};

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
            Step::Stage(s) => r.stages.push(s),
            Step::Done(x) => return Ok(x),
            Step::Fail(e) => return Err(e),
            Step::Wait(until) => {
                if let Some(c) = r.next_chunk() {
                    *now += Duration::from_micros(300);
                    ex.feed(&c, *now);
                } else {
                    *now = until.max(*now + Duration::from_micros(1));
                }
            }
        }
    }
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

/// Interrupt + the recorded commands; returns the command outputs.
fn uboot_replay(segs: Vec<Vec<u8>>, chunk: usize, seed: u64, cmds: &[&str]) -> Vec<CommandOutput> {
    let mut r = Replay::new(segs, chunk, seed);
    let mut ex = Expect::new();
    let mut now = Instant::now();
    let c = cfg();
    let mut m = Interrupt::new(&c, ResetWatch::default(), 1);
    drive(&mut m, &mut ex, &mut r, &mut now).expect("interrupt");
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
        let out = loop {
            match m.step(&mut ex, now) {
                Step::Send(b) => r.input(&b),
                Step::Done(o) => break o,
                Step::Fail(e) => panic!("split {split}: {e}"),
                Step::Stage(_) => {}
                Step::Wait(until) => {
                    if let Some(ch) = r.next_chunk() {
                        now += Duration::from_micros(100);
                        ex.feed(&ch, now);
                    } else if !r.segs.is_empty() {
                        r.release();
                    } else {
                        now = until.max(now + Duration::from_micros(1));
                    }
                }
            }
        };
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
        let mut r = Replay::new(vec![body], chunk, seed);
        let mut ex = Expect::new();
        let mut now = Instant::now();
        let lc = LinuxConfig {
            ip_marker: Some(marker.clone()),
            ..LinuxConfig::default()
        };
        let mut m = Follow::new(&lc, ResetWatch::default());
        let (arrival, ip) = drive(&mut m, &mut ex, &mut r, &mut now).expect("follow");
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
        let mut r = Replay::new(vec![text.as_bytes().to_vec()], 5, 9);
        let mut ex = Expect::new();
        let mut now = Instant::now();
        let mut m = Follow::new(&LinuxConfig::default(), ResetWatch::default());
        let err = drive(&mut m, &mut ex, &mut r, &mut now).expect_err(want).to_string();
        assert!(err.to_lowercase().contains(want), "{err}");
        assert!(err.contains("last console lines"), "{err}");
    }
}

#[test]
fn board_that_never_answers_gets_a_clear_error() {
    let mut r = Replay::new(vec![], 1, 1);
    let mut ex = Expect::new();
    let mut now = Instant::now();
    let c = UBootConfig {
        timeout: Duration::from_secs(20),
        ..UBootConfig::default()
    };
    let mut m = Interrupt::new(&c, ResetWatch::default(), 1);
    let err = drive(&mut m, &mut ex, &mut r, &mut now).expect_err("silent board");
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

    // A board that talks but never shows a prompt: timeout naming the stage, last lines.
    let mut r = Replay::new(
        vec![b"U-Boot SPL 2023.01\r\nTrying to boot from MMC1\r\n".to_vec()],
        8,
        1,
    );
    let mut ex = Expect::new();
    let mut m = Interrupt::new(&c, ResetWatch::default(), 1);
    let msg = drive(&mut m, &mut ex, &mut r, &mut now)
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
    let mut r = Replay::new(vec![reset], 7, 1);
    let mut ex = Expect::new();
    let mut now = Instant::now();
    let t0 = now;
    let mut m = Interrupt::new(&c, ResetWatch::default(), 1);
    let err = drive(&mut m, &mut ex, &mut r, &mut now).expect_err("reset");
    assert!(matches!(err, ConsoleError::UnexpectedReset { .. }), "{err}");
    assert!(now - t0 < Duration::from_secs(1), "not at once");

    let abort = b"U-Boot 2023.01 (x)\r\n\"Synchronous Abort\" handler, esr 0x96000004\r\n".to_vec();
    let mut r = Replay::new(vec![abort], 64, 1);
    let mut ex = Expect::new();
    let mut m = Interrupt::new(&c, ResetWatch::default(), 1);
    let err = drive(&mut m, &mut ex, &mut r, &mut now).expect_err("abort");
    assert!(matches!(err, ConsoleError::UBootError { .. }), "{err}");

    // Autoboot not caught: the extlinux menu is reached; no key is sent to it.
    let log = data("qemu-aarch64-uboot-to-login.log");
    let boot_start = find(&log, b"=> boot\r\n").unwrap() + 9;
    let mut missed = log[..find(&log, b"Hit any key").unwrap()].to_vec();
    missed.extend_from_slice(b"Hit any key to stop autoboot:  0 \r\n");
    missed.extend_from_slice(&log[boot_start..find(&log, b"Enter choice: ").unwrap() + 14]);
    let mut r = Replay::new(vec![missed], 4096, 1);
    r.keyed = true; // this board ignores keys
    let mut ex = Expect::new();
    let mut m = Interrupt::new(&c, ResetWatch::default(), 1);
    let err = drive(&mut m, &mut ex, &mut r, &mut now).expect_err("missed");
    assert!(matches!(err, ConsoleError::MissedAutoboot { .. }), "{err}");
}

#[test]
fn garbage_on_the_line_hints_at_the_baud_rate() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
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
        let c = cfg();
        let err = s
            .run(&mut Interrupt::new(&c, ResetWatch::default(), 1))
            .await
            .expect_err("garbage");
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
    fn start(args: &[&str]) -> Target {
        let state = tempfile::Builder::new()
            .prefix("sbcflash-qemu-")
            .tempdir()
            .expect("state dir");
        let out = Command::new(harness().join("uboot-target.sh"))
            .arg("start")
            .arg("--state")
            .arg(state.path())
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
            let _ = Command::new(harness().join("uboot-target.sh"))
                .arg("cont")
                .arg("--state")
                .arg(st)
                .status();
        })
    }

    fn stop(&self) {
        let _ = Command::new(harness().join("uboot-target.sh"))
            .arg("stop")
            .arg("--state")
            .arg(self.state.path())
            .stdout(Stdio::null())
            .status();
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

/// The harness boot image, built once per script version (keyed by the script's hash) and
/// shared by all tests of a run; a lock file keeps parallel tests from building it twice.
fn boot_image() -> PathBuf {
    let script = harness().join("make-boot-image.sh");
    let text = std::fs::read(&script).expect("read make-boot-image.sh");
    let key = &blake3::hash(&text).to_hex()[..16];
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sbcflash-harness");
    std::fs::create_dir_all(&root).expect("harness cache dir");
    let lock = std::fs::File::create(root.join("build.lock")).expect("lock file");
    let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("flock");
    let out = root.join(key);
    let img = out.join("sdcard.img");
    if !img.exists() {
        let st = Command::new("bash")
            .arg(&script)
            .arg("--ssh")
            .arg("--out")
            .arg(&out)
            .arg("--cache")
            .arg(root.join("debs"))
            .status()
            .expect("run make-boot-image.sh");
        assert!(st.success(), "make-boot-image.sh failed");
    }
    img
}

fn open_session(rt: &tokio::runtime::Runtime, t: &Target) -> Session {
    let _e = rt.enter();
    Session::new(Link::serial(&t.tty(), 115_200).expect("open the pty"))
}

fn run_uboot_commands(arch: &str) {
    let t = Target::start(&["--arch", arch]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut s = open_session(&rt, &t);
    let h = t.cont();
    let c = cfg();
    rt.block_on(async {
        s.run(&mut Interrupt::new(&c, ResetWatch::default(), 1))
            .await
            .expect("interrupt autoboot");
        let v = s.run(&mut uboot::command(&c, "version", 2)).await.unwrap();
        assert_eq!(v.status, 0);
        assert!(v.lines[0].starts_with("U-Boot 20"), "{v:?}");
        assert!(
            v.text().contains(&format!("{arch}-linux-gnu-gcc"))
                || v.text().contains("linux-gnu-gcc")
        );
        let e = s
            .run(&mut uboot::command(&c, "echo one; echo two", 3))
            .await
            .unwrap();
        assert_eq!(e.lines, vec!["one".to_string(), "two".to_string()]);
        let f = s.run(&mut uboot::command(&c, "false", 4)).await.unwrap();
        assert_eq!(f.status, 1);
        let u = s
            .run(&mut uboot::command(&c, "nosuchcommand", 5))
            .await
            .unwrap();
        assert_eq!(u.status, 1);
        assert!(u.text().contains("Unknown command"), "{u:?}");
        // --flash-via on a U-Boot without the gadget: a clear error at once.
        let g = s
            .run(&mut Gadget::new(
                "ums 0 virtio 0",
                "=> ",
                Duration::from_secs(2),
            ))
            .await
            .expect_err("no ums in QEMU's U-Boot");
        assert!(g.to_string().contains("Unknown command 'ums'"), "{g}");
    });
    h.join().unwrap();
}

#[test]
fn qemu_uboot_aarch64_interrupt_and_commands() {
    if !need_qemu("aarch64") {
        return;
    }
    run_uboot_commands("aarch64");
}

#[test]
fn qemu_uboot_riscv64_interrupt_and_commands() {
    if !need_qemu("riscv64") {
        return;
    }
    run_uboot_commands("riscv64");
}

#[test]
fn qemu_uboot_bootdelay_zero_from_persistent_env_is_still_caught() {
    if !need_qemu("aarch64") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("envflash.img");
    let envs = env.to_str().unwrap();
    let c = cfg();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    {
        let t = Target::start(&["--env-flash", envs]);
        let mut s = open_session(&rt, &t);
        let h = t.cont();
        rt.block_on(async {
            s.run(&mut Interrupt::new(&c, ResetWatch::default(), 1))
                .await
                .unwrap();
            s.run(&mut uboot::command(&c, "setenv bootdelay 0", 2))
                .await
                .unwrap()
                .ok()
                .unwrap();
            s.run(&mut uboot::command(&c, "saveenv", 3))
                .await
                .unwrap()
                .ok()
                .unwrap();
        });
        h.join().unwrap();
    }
    let t = Target::start(&["--env-flash", envs]);
    let mut s = open_session(&rt, &t);
    let h = t.cont();
    rt.block_on(async {
        s.run(&mut Interrupt::new(&c, ResetWatch::default(), 1))
            .await
            .expect("bootdelay=0 still interrupted");
        let o = s
            .run(&mut uboot::command(&c, "printenv bootdelay", 2))
            .await
            .unwrap();
        assert_eq!(o.lines, vec!["bootdelay=0".to_string()]);
    });
    h.join().unwrap();
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

    let t = Target::start(&["--disk", disk.to_str().unwrap(), "--ssh-port", "0"]);
    let port = t.ssh_port();
    let standin = dir.path().join("nixos-rebuild-standin");
    std::fs::write(&standin, STANDIN).unwrap();
    common::run(Command::new("chmod").arg("755").arg(&standin));
    let log = dir.path().join("standin.log");
    let transcript = dir.path().join("transcript.log");
    let sshopts = format!(
        "-i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR -o ConnectTimeout=20",
        key.display()
    );
    let child = common::sbcflash()
        .args(["bootstrap", "--board", "qemu-aarch64", "--port"])
        .arg(t.tty())
        .args([
            "--uboot-cmd",
            "printenv bootcmd",
            "--flake",
            "/nonexistent/flake#lab-board",
        ])
        .args(["--ssh-host", "127.0.0.1", "--ssh-port", &port.to_string()])
        .args([
            "--ip-marker",
            r"SBCFLASH-TEST-IP: (\S+)",
            "--boot-timeout",
            "120",
        ])
        .arg("--rebuild-cmd")
        .arg(&standin)
        .arg("--transcript")
        .arg(&transcript)
        .env("NIX_SSHOPTS", &sshopts)
        .env("STANDIN_LOG", &log)
        .env("STANDIN_EXIT", "42")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Child(child);
    wait_until_open(child.0.id(), &t.tty());
    let h = t.cont();
    let (code, out, err) = wait_child(&mut child, 240);
    h.join().unwrap();
    let rec = std::fs::read_to_string(&log).unwrap_or_default();
    let ctx = format!("exit {code}\nstdout:\n{out}\nstderr:\n{err}\nstand-in log:\n{rec}");
    assert_eq!(code, 42, "the deployer's status is passed through\n{ctx}");
    for stage in [
        "U-Boot prompt",
        "U-Boot `printenv bootcmd`: ok",
        "U-Boot is starting the kernel",
        "kernel: Linux version 6.1",
        "login prompt",
        "shell on the console",
        "board IP address 10.0.2.15",
        "SSH answers on 127.0.0.1",
        "host keys",
        "SHA256:",
        "running: NIX_SSHOPTS=",
    ] {
        assert!(err.contains(stage), "missing {stage:?}\n{ctx}");
    }
    assert!(
        rec.contains(
            "args: switch --flake /nonexistent/flake#lab-board --target-host root@127.0.0.1"
        ),
        "{ctx}"
    );
    assert!(
        rec.contains(&format!("NIX_SSHOPTS: {sshopts} -p {port}")),
        "{ctx}"
    );
    assert!(
        rec.contains("ssh: aarch64"),
        "SSH with the deployer's options reached the board\n{ctx}"
    );
    let tr = std::fs::read_to_string(&transcript).unwrap();
    assert!(
        tr.contains("sbcflash-test login:") && tr.contains(">> "),
        "transcript has both directions"
    );
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
    let child = common::sbcflash()
        .args(["serial-load", "--port"])
        .arg(t.tty())
        .arg(&file)
        .args(["--then", "virtio scan"])
        .args([
            "--then",
            &format!("virtio write ${{loadaddr}} 0x800 0x{blocks:x}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Child(child);
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
        for _ in 0..100 {
            if a.exists() && b.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(a.exists() && b.exists(), "socat made no ptys");
        PtyPair {
            _socat: Child(child),
            a,
            b,
        }
    }

    /// The board's end: a writer, and a thread collecting what sbcflash sends.
    fn board(&self) -> (std::fs::File, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
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
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (mut r, g) = (f.try_clone().unwrap(), got.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                g.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        (f, got)
    }
}

fn wait_for(got: &std::sync::Mutex<Vec<u8>>, want: &[u8]) {
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
    if !common::require(false, &["socat", "stty"]) {
        return;
    }
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let pair = PtyPair::start(dir.path());
    let transcript = dir.path().join("console.log");
    let child = common::sbcflash()
        .args(["console", "--reopen-secs", "20", "--port"])
        .arg(&pair.a)
        .arg("--transcript")
        .arg(&transcript)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Child(child);
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
