//! `sbcflash try` against the real thing: Debian's U-Boot (and OpenSBI) in qemu-system-aarch64
//! / -riscv64 booting harness images (tests/harness/make-boot-image.sh) with real Debian
//! kernels, followed on the pty by sbcflash's console engine. Broken images are built by the
//! harness script too (a root= that does not exist without an initrd, an init that cannot
//! run); nothing on the console is scripted. Tests that start QEMU have `qemu` in their name
//! (nextest runs at most 2 at once); `try` stops its QEMU by PID itself, and QEMU dies with it.

mod acquire_server;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn need(arch: &str) -> bool {
    let tools = common::try_tools(arch);
    let t: Vec<&str> = tools.iter().map(String::as_str).collect();
    common::require(false, &t)
}

fn image(args: &[&str]) -> PathBuf {
    common::harness_image(Path::new(env!("CARGO_TARGET_TMPDIR")), args)
}

fn b3(p: &Path) -> String {
    blake3::hash(&std::fs::read(p).expect("read image"))
        .to_hex()
        .to_string()
}

fn try_image(img: &Path, extra: &[&str]) -> (Output, String, String) {
    let out = common::sbcflash()
        .arg("try")
        .arg(img)
        .args(["--boot-timeout", "240"])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run sbcflash try");
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    let se = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, so, se)
}

/// A compressed image (decoded to a temporary raw file first) boots to its login prompt on a
/// noisy console, the check runs in the shell, every stage is named with its time, the JSON
/// lines are the documented ones, and the image file is untouched.
#[test]
fn qemu_try_compressed_image_boots_to_login_and_check_on_a_noisy_console() {
    if !need("aarch64") || !common::require(false, &["zstd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(&[]);
    let zst = dir.path().join("sdcard.img.zst");
    common::run(Command::new("zstd").arg("-q").arg(&img).arg("-o").arg(&zst));
    let before = (b3(&img), b3(&zst));
    let tr = dir.path().join("boot.log");
    let (out, so, se) = try_image(
        &zst,
        &[
            "--json",
            "--check",
            "grep sbcflash-test /etc/hostname",
            "--transcript",
            tr.to_str().unwrap(),
            "--qemu-arg=-fw_cfg",
            "--qemu-arg=name=opt/sbcflash/noise,string=rate=5 login-burst=60",
        ],
    );
    let ctx = format!("stdout:\n{so}\nstderr:\n{se}");
    assert!(out.status.success(), "{ctx}");
    common::json::assert_documented(&so);
    let result: serde_json::Value = so
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "result")
        .unwrap_or_else(|| panic!("no result line\n{ctx}"));
    assert_eq!(result["ok"], true, "{ctx}");
    assert_eq!(result["arch"], "aarch64");
    assert_eq!(result["failed_stage"], serde_json::Value::Null);
    let stages: Vec<&str> = result["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        ["firmware", "U-Boot", "kernel", "initrd", "login", "check"],
        "{ctx}"
    );
    for m in [
        "kernel runs /init",
        "kernel: Linux version 6.1",
        "login prompt",
    ] {
        assert!(so.contains(m), "stage message {m:?} missing\n{ctx}");
    }
    let t = std::fs::read_to_string(&tr).expect("transcript kept");
    assert!(
        t.contains("SBCFLASH-TEST-NOISE: rate=5"),
        "the console was noisy"
    );
    assert!(
        t.contains("k| ") && t.contains("(noise "),
        "noise set aside"
    );
    assert!(t.contains("sbcflash-test login:") && t.contains(">> "));
    assert_eq!((b3(&img), b3(&zst)), before, "the image was not modified");
}

/// Human output: PASS with the stage times on stdout; the raw image is used in place
/// (copy-on-write overlay) and stays byte-for-byte the same.
#[test]
fn qemu_try_raw_image_passes_and_is_not_modified() {
    if !need("aarch64") {
        return;
    }
    let img = image(&[]);
    let before = b3(&img);
    let (out, so, se) = try_image(&img, &[]);
    assert!(out.status.success(), "stdout:\n{so}\nstderr:\n{se}");
    assert!(so.starts_with("PASS "), "{so}");
    for s in ["firmware", "U-Boot", "kernel", "initrd", "login"] {
        assert!(so.contains(&format!("{s} ")), "{s} in {so}");
    }
    assert!(se.contains("booting on QEMU virt through U-Boot's distro boot"));
    assert_eq!(b3(&img), before, "the image was not modified");
}

#[test]
fn qemu_try_broken_root_fails_in_the_kernel_stage() {
    if !need("aarch64") {
        return;
    }
    let img = image(&[
        "--no-initrd",
        "--append",
        "console=ttyAMA0,115200n8 root=/dev/vdz9 panic=-1",
    ]);
    let (out, so, se) = try_image(&img, &[]);
    let ctx = format!("stdout:\n{so}\nstderr:\n{se}");
    assert_eq!(out.status.code(), Some(1), "{ctx}");
    assert!(so.is_empty(), "no PASS line\n{ctx}");
    assert!(
        se.contains("the boot failed in stage \"kernel\"")
            && se.contains("check root= on the kernel command line")
            && se.contains("VFS: Unable to mount root fs"),
        "{ctx}"
    );
    assert!(
        se.contains("last console lines:") && se.contains("Starting kernel"),
        "{ctx}"
    );
    assert!(se.contains("stages reached: firmware"), "{ctx}");
}

#[test]
fn qemu_try_missing_init_fails_in_the_initrd_stage() {
    if !need("aarch64") {
        return;
    }
    let img = image(&["--broken-init"]);
    let (out, so, se) = try_image(&img, &["--json"]);
    let ctx = format!("stdout:\n{so}\nstderr:\n{se}");
    assert_eq!(out.status.code(), Some(1), "{ctx}");
    common::json::assert_documented(&so);
    assert!(
        se.contains("the boot failed in stage \"initrd\"")
            && se.contains("No working init found")
            && se.contains("check init= and the initrd's /init"),
        "{ctx}"
    );
    assert!(
        so.contains("\"failed_stage\":\"initrd\"") && so.contains("\"ok\":false"),
        "{ctx}"
    );
}

#[test]
fn qemu_try_failing_check_fails_in_the_check_stage() {
    if !need("aarch64") {
        return;
    }
    let img = image(&[]);
    let (out, so, se) = try_image(
        &img,
        &[
            "--check",
            "cat /etc/sbcflash-provisioned && echo provisioned",
        ],
    );
    let ctx = format!("stdout:\n{so}\nstderr:\n{se}");
    assert_eq!(out.status.code(), Some(1), "{ctx}");
    assert!(
        se.contains("stage \"check\" failed: `cat /etc/sbcflash-provisioned && echo provisioned` exited with status 1")
            && se.contains("No such file or directory"),
        "the check's own output is shown\n{ctx}"
    );
    assert!(
        se.contains("stages reached: firmware") && se.contains("login"),
        "{ctx}"
    );
}

/// riscv64: OpenSBI, U-Boot (S-mode) and a Debian 13 riscv64 kernel.
#[test]
fn qemu_try_riscv64_image_boots_to_login_and_check() {
    if !need("riscv64") {
        return;
    }
    let img = image(&["--arch", "riscv64"]);
    let (out, so, se) = try_image(&img, &["--check", "uname -m | grep -x riscv64"]);
    let ctx = format!("stdout:\n{so}\nstderr:\n{se}");
    assert!(out.status.success(), "{ctx}");
    assert!(so.starts_with("PASS ") && so.contains("check "), "{ctx}");
    assert!(se.contains("riscv64, extlinux entry"), "{ctx}");
    assert!(se.contains("kernel: Linux version 6.12"), "{ctx}");
}

/// A Rockchip-style image (idbloader at sector 64) gets the plain refusal, as does a board
/// whose boot ROM virt cannot run; `--kernel-only` then boots its generic extlinux entry.
#[test]
fn qemu_try_board_specific_image_is_refused_then_boots_kernel_only() {
    if !need("aarch64") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("rockchip.img");
    common::run(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(image(&[]))
            .arg(&img),
    );
    common::sh(&format!(
        "printf 'RKNS\\0\\0\\0\\0' | dd of={} bs=512 seek=64 conv=notrunc status=none",
        img.display()
    ));
    let (out, so, se) = try_image(&img, &[]);
    assert_eq!(out.status.code(), Some(3), "{se}");
    assert!(so.is_empty());
    assert!(
        se.contains("carries a Rockchip")
            && se.contains("QEMU's virt machine cannot run")
            && se.contains("--kernel-only"),
        "{se}"
    );
    let (out, _, se) = try_image(&img, &["--board", "opi5"]);
    assert_eq!(out.status.code(), Some(3), "{se}");
    assert!(
        se.contains("Orange Pi 5 (rk3588) boots through its own boot ROM"),
        "{se}"
    );
    let (out, so, se) = try_image(&img, &["--board", "opi5", "--kernel-only"]);
    assert!(out.status.success(), "stdout:\n{so}\nstderr:\n{se}");
    assert!(
        se.contains("--kernel-only: not the board's own bootloader"),
        "{se}"
    );
}

/// Bad input is named before any QEMU starts.
#[test]
fn try_refuses_what_it_cannot_boot() {
    if !common::require(false, &["debugfs", "mtype"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let blank = dir.path().join("blank.img");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let (out, _, se) = try_image(&blank, &[]);
    assert_eq!(out.status.code(), Some(3), "{se}");
    assert!(
        se.contains("blank.img: cannot tell the architecture") && se.contains("--arch"),
        "{se}"
    );
    let (out, _, se) = try_image(&blank, &["--kernel-only"]);
    assert_eq!(out.status.code(), Some(3), "{se}");
    assert!(
        se.contains("--kernel-only needs a generic extlinux entry"),
        "{se}"
    );
    let (out, _, se) = try_image(&dir.path().join("missing.img"), &[]);
    assert_ne!(out.status.code(), Some(0));
    assert!(se.contains("missing.img"), "{se}");
}

/// An https:// image (zstd, served on 127.0.0.1) is downloaded into the cache, its published
/// blake3 checked, then booted; a wrong digest stops before any QEMU starts.
#[test]
fn qemu_try_url_is_fetched_checked_and_booted() {
    if !need("aarch64") || !common::require(false, &["zstd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(&[]);
    let zst = dir.path().join("sdcard.img.zst");
    common::run(Command::new("zstd").arg("-q").arg(&img).arg("-o").arg(&zst));
    let body = std::fs::read(&zst).unwrap();
    let digest = blake3::hash(&body).to_hex().to_string();
    let srv = acquire_server::TestServer::start(dir.path());
    srv.add(
        "/sdcard.img.zst",
        std::sync::Arc::new(body),
        acquire_server::Behavior::Normal,
    );
    let url = srv.url("/sdcard.img.zst");
    let cache = dir.path().join("cache");
    let run = |pin: &str| {
        common::sbcflash()
            .args(["try", &url, "--boot-timeout", "240", "--source-blake3", pin])
            .arg("--ca-file")
            .arg(&srv.ca_file)
            .env("SBCFLASH_CACHE_DIR", &cache)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = run(&"0".repeat(64));
    let se = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0), "{se}");
    assert!(
        !se.contains("first console output"),
        "no boot on a bad digest: {se}"
    );
    let o = run(&digest);
    let (so, se) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "stdout:\n{so}\nstderr:\n{se}");
    assert!(so.starts_with("PASS ") && so.contains("login"), "{so}");
}

/// `--expect`: a console line (here the initramfs' ready marker, before any login prompt)
/// is the goal; the stage list ends at "login" with that line named.
#[test]
fn qemu_try_expect_line_passes_without_a_login() {
    if !need("aarch64") {
        return;
    }
    let img = image(&[]);
    let (out, so, se) = try_image(&img, &["--expect", r"^SBCFLASH-TEST-READY \(console"]);
    let ctx = format!("stdout:\n{so}\nstderr:\n{se}");
    assert!(out.status.success(), "{ctx}");
    assert!(so.contains("booted to the expected line"), "{ctx}");
    assert!(
        se.contains("expected line: SBCFLASH-TEST-READY (console"),
        "{ctx}"
    );
    assert!(
        !se.contains("login prompt"),
        "stopped at the line, before getty\n{ctx}"
    );
}

/// An image without extlinux.conf whose kernel is the FAT partition's EFI removable-media
/// boot file: the architecture comes from that file, U-Boot boots it through EFI, and with no
/// initrd or root= it stops in the kernel stage.
#[test]
fn qemu_try_efi_only_image_is_detected_and_booted_through_efi() {
    if !need("aarch64") {
        return;
    }
    let img = image(&["--efi-only"]);
    let (out, so, se) = try_image(&img, &[]);
    let ctx = format!("stdout:\n{so}\nstderr:\n{se}");
    assert_eq!(out.status.code(), Some(1), "{ctx}");
    assert!(
        se.contains(
            "aarch64 (EFI boot file /EFI/BOOT/BOOTAA64.EFI on partition 1, no extlinux entry)"
        ),
        "{ctx}"
    );
    assert!(se.contains("kernel: Linux version 6.1"), "{ctx}");
    assert!(
        se.contains("the boot failed in stage \"kernel\"")
            && se.contains("Unable to mount root fs"),
        "{ctx}"
    );
}
