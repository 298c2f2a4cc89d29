//! Shared helpers for integration tests: real tools, real loop devices, cleanup by name.
//!
//! Tests that need root or a Debian tool call [`require`]: outside CI they skip with a message;
//! under `CI=true` a missing requirement fails the test, so CI never silently skips.
#![allow(dead_code)]

pub mod json;
pub mod pg;
pub mod station;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub fn have_tool(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Returns false (skip) when a requirement is missing outside CI; panics in CI.
pub fn require(root: bool, tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    if root && !is_root() {
        missing.push("root".to_string());
    }
    for t in tools {
        if !have_tool(t) {
            missing.push(format!("tool `{t}`"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "test needs {} (run scripts/setup-debian.sh as root)",
        missing.join(", ")
    );
    if in_ci() {
        panic!("{msg}; under CI=true this must not be skipped");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

/// Run a command, panic with its stderr on failure.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// A finished command's exit status and output, for failure messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn sh(script: &str) -> Output {
    run(Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(script))
}

/// The sbcflash binary built for this test run.
pub fn sbcflash() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sbcflash"))
}

/// A loop device over a backing file; detached (by its own name) on drop, even on panic.
pub struct LoopDev {
    pub dev: PathBuf,
    pub backing: PathBuf,
}

impl LoopDev {
    /// Attach `backing` with extra `losetup` flags (e.g. `--direct-io=on`).
    pub fn attach(backing: &Path, extra: &[&str]) -> LoopDev {
        let out = run(Command::new("losetup")
            .args(["--find", "--show"])
            .args(extra)
            .arg(backing));
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup gave {dev:?}");
        LoopDev {
            dev: PathBuf::from(dev),
            backing: backing.to_path_buf(),
        }
    }

    /// A fresh all-hole backing file of `size` bytes in `dir`, attached.
    pub fn new_sparse(dir: &Path, name: &str, size: u64) -> LoopDev {
        let p = dir.join(name);
        let f = std::fs::File::create(&p).expect("create backing file");
        f.set_len(size).expect("size backing file");
        Self::attach(&p, &[])
    }

    pub fn path(&self) -> &Path {
        &self.dev
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        // Unmount anything a test mounted from it, then detach this device only.
        let _ = Command::new("umount").arg(&self.dev).output();
        for _ in 0..20 {
            let ok = Command::new("losetup").arg("-d").arg(&self.dev).output();
            if ok.map(|o| o.status.success()).unwrap_or(false) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("warning: could not detach {}", self.dev.display());
    }
}

/// Partition table kind for [`make_nixos_like_image`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    Mbr,
    Gpt,
}

/// Builds a NixOS-sd-image-like raw image with real tools, unprivileged: partition 1 FAT
/// "FIRMWARE" at 8 MiB (16 MiB), partition 2 ext4 "NIXOS_SD" to the end, a few files with
/// pseudo-random content. Mostly empty, so the file is sparse. Returns the image path.
pub fn make_nixos_like_image(dir: &Path, name: &str, size_mib: u64, table: Table) -> PathBuf {
    assert!(size_mib >= 40, "image too small for the layout");
    let img = dir.join(name);
    let root_start = 24u64; // MiB
    let root_mib = size_mib - root_start;
    let label = match table {
        Table::Mbr => "label: dos\nlabel-id: 0x2178694e\nstart=8MiB, size=16MiB, type=b\nstart=24MiB, type=83, bootable\n".to_string(),
        Table::Gpt => format!("label: gpt\nstart=8MiB, size=16MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=FIRMWARE\nstart=24MiB, size={}MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=NIXOS_SD\n", root_mib - 1),
    };
    let d = dir.display();
    sh(&format!(
        r#"
cd "{d}"
rm -f "{name}" fw.img root.img
truncate -s {size_mib}M "{name}"
printf '{label}' | sfdisk -q "{name}"
mkdir -p tree-{name}/boot/extlinux tree-{name}/nix/store/abc-hello/bin
head -c 3000000 /dev/urandom > tree-{name}/nix/store/abc-hello/bin/hello
head -c 2000000 < <(yes "nixos sd image test line") > tree-{name}/nix/store/abc-hello/README
printf 'DEFAULT nixos\nLABEL nixos\n  LINUX ../nixos/Image\n' > tree-{name}/boot/extlinux/extlinux.conf
truncate -s 16M fw.img
mkfs.vfat -n FIRMWARE fw.img >/dev/null
head -c 200000 /dev/urandom > config.txt
mcopy -i fw.img config.txt ::config.txt
dd if=fw.img of="{name}" bs=1M seek=8 conv=notrunc,sparse status=none
rm -f fw.img config.txt
mkfs.ext4 -q -L NIXOS_SD -d tree-{name} -E offset=$((24*1024*1024)) "{name}" {root_mib}M
rm -rf tree-{name}
"#
    ));
    img
}

/// Byte-for-byte comparison of the first `len` bytes of two files/devices.
pub fn assert_same_prefix(a: &Path, b: &Path, len: u64) {
    use std::io::Read;
    let mut fa = std::fs::File::open(a).expect("open a");
    let mut fb = std::fs::File::open(b).expect("open b");
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(ba.len());
        fa.read_exact(&mut ba[..n]).expect("read a");
        fb.read_exact(&mut bb[..n]).expect("read b");
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            panic!(
                "{} and {} differ at offset {}",
                a.display(),
                b.display(),
                off + i as u64
            );
        }
        off += n as u64;
    }
}

/// The tools [`make_nixos_like_image`] runs, for a test's [`require`] list.
pub const IMAGE_TOOLS: &[&str] = &["sfdisk", "mkfs.vfat", "mkfs.ext4", "mcopy"];

/// The tools that make every input format from a raw image (compressors, bmap, Android sparse).
pub const FORMAT_TOOLS: &[&str] = &["zstd", "xz", "gzip", "bzip2", "bmaptool", "img2simg"];

/// Does a systemd-udevd answer?
pub fn udevd_answers() -> bool {
    Command::new("udevadm")
        .args(["control", "--ping", "--timeout=2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// systemd-udevd for a test: started unless one already answers, stopped by its own PID on
/// drop (one that was already running is left alone).
pub struct Udevd(Option<std::process::Child>);

impl Udevd {
    pub fn start() -> Udevd {
        if udevd_answers() {
            return Udevd(None);
        }
        let c = Command::new("/lib/systemd/systemd-udevd")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn systemd-udevd");
        let u = Udevd(Some(c));
        for _ in 0..100 {
            if udevd_answers() {
                return u;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("systemd-udevd did not answer `udevadm control --ping`");
    }

    /// Waits until udevd has handled the events queued so far (new loop devices, rules).
    pub fn settle() {
        run(Command::new("udevadm").args(["settle", "--timeout=30"]));
    }
}

impl Drop for Udevd {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }
}

/// A udev rule file of this test process in /run/udev/rules.d (udevd reloaded); removed, and
/// udevd reloaded, on drop or [`UdevRule::remove`].
pub struct UdevRule(Option<PathBuf>);

impl UdevRule {
    /// Installs `text` as `61-sbcflash-test-<name>-<pid>.rules`.
    pub fn install(name: &str, text: &str) -> UdevRule {
        let dir = Path::new("/run/udev/rules.d");
        std::fs::create_dir_all(dir).expect("create /run/udev/rules.d");
        let p = dir.join(format!(
            "61-sbcflash-test-{name}-{}.rules",
            std::process::id()
        ));
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        run(Command::new("udevadm").args(["control", "--reload"]));
        UdevRule(Some(p))
    }

    pub fn remove(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(&p);
            let _ = Command::new("udevadm")
                .args(["control", "--reload"])
                .status();
        }
    }
}

impl Drop for UdevRule {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A station ledger at `path` with one finished, passed unit (slot `s1`): what `station report`
/// reads, without running a station.
pub fn ledger_with_one_passed_unit(path: &Path) {
    use sbcflash::station::ledger::{Ledger, NewUnit, Outcome};
    let (mut l, _) = Ledger::open(path).expect("open ledger");
    let unit = NewUnit {
        slot: "s1".into(),
        ..Default::default()
    };
    let (id, ()) = l
        .start_unit(&unit, true, 1, |seq| {
            Ok((format!("U{seq:?}"), "h1".into(), "{}".into(), ()))
        })
        .expect("start unit")
        .expect("unit started");
    let done = Outcome {
        pass: true,
        ..Default::default()
    };
    l.finish_unit(id, &done).expect("finish unit");
}

/// A boot image from tests/harness/make-boot-image.sh built with `args` (`--arch riscv64`,
/// `--no-initrd`, ...), once per (script, args) for the whole test run under
/// `$CARGO_TARGET_TMPDIR` (a lock keeps parallel tests from building it twice).
pub fn harness_image(tmpdir: &Path, args: &[&str]) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/harness/make-boot-image.sh");
    let mut text = std::fs::read(&script).expect("read make-boot-image.sh");
    text.extend(args.join("\0").as_bytes());
    let key = &blake3::hash(&text).to_hex()[..16];
    let root = tmpdir.join("sbcflash-harness");
    std::fs::create_dir_all(&root).expect("harness cache dir");
    let lock = std::fs::File::create(root.join("build.lock")).expect("lock file");
    let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("flock");
    let out = root.join(format!("try-{key}"));
    let img = out.join("sdcard.img");
    if !img.exists() {
        let st = Command::new("bash")
            .arg(&script)
            .args(args)
            .arg("--out")
            .arg(&out)
            .arg("--cache")
            .arg(root.join("debs"))
            .status()
            .expect("run make-boot-image.sh");
        assert!(st.success(), "make-boot-image.sh {args:?} failed");
    }
    img
}

/// What `sbcflash try` needs besides QEMU for `arch`.
pub fn try_tools(arch: &str) -> Vec<String> {
    [
        format!("qemu-system-{arch}"),
        "qemu-img".into(),
        "debugfs".into(),
        "mtype".into(),
        "apt-get".into(),
        "mkfs.ext4".into(),
        "mcopy".into(),
    ]
    .to_vec()
}
