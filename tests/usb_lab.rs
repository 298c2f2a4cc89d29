//! Through a real Linux USB stack: the USB lab (tests/harness/usb-lab) boots a QEMU guest whose
//! kernel is both USB host and USB device (dummy_hcd). sbcflash's own device models
//! (`usb::sim`, served over FunctionFS by examples/usb_lab_device.rs) are enumerated there like
//! boards on a port, then
//! - the real host tools (rkdeveloptool, fastboot, sunxi-fel) flash them: the models must agree
//!   with the tools, and each backing file must end byte-identical to what the tool sent;
//! - sbcflash itself, through rusb/libusb, does the same.
//!
//! Inputs and expected results are made here on the host; the guest scripts (tests/usb_lab/*.sh)
//! print `ok NAME` / `FAIL NAME` lines. One guest boot per group: TCG boots cost ~10 s each.
//! Test names contain `qemu` so nextest runs at most two guests at once.

mod common;

use sbcflash::usb::rkloader::{build_merged, CRC32_RK};
use sbcflash::usb::sim::garbage;
use std::path::{Path, PathBuf};
use std::process::Command;

fn lab_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/harness/usb-lab")
}

/// The lab and its peers are installed (scripts/setup-debian.sh); under CI=true a missing lab
/// fails.
fn lab_ready(tools: &[&str]) -> bool {
    let mut all = vec!["qemu-system-x86_64", "busybox", "lsusb"];
    all.extend_from_slice(tools);
    if !common::require(true, &all) {
        return false;
    }
    let cache = std::env::var("USB_LAB_CACHE").unwrap_or_else(|_| "/var/tmp/usb-lab".into());
    let kernel = Path::new(&cache).join("kernel/boot");
    let has_kernel = std::fs::read_dir(&kernel)
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        })
        .unwrap_or(false);
    if has_kernel {
        return true;
    }
    let msg = format!(
        "the USB lab has no guest kernel in {} (run scripts/setup-debian.sh as root)",
        kernel.display()
    );
    if common::in_ci() {
        panic!("{msg}; under CI=true this must not be skipped");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

/// examples/usb_lab_device, built by `cargo test`/nextest next to the test binaries.
fn device_program() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let p = profile_dir.join("examples/usb_lab_device");
    {
        // `cargo test --test usb_lab` alone does not build examples, and would otherwise run a
        // stale one left from an earlier build (a no-op when it is fresh).
        common::run(
            Command::new(env!("CARGO"))
                .args(["build", "--example", "usb_lab_device"])
                .current_dir(env!("CARGO_MANIFEST_DIR")),
        );
    }
    assert!(p.exists(), "{} was not built", p.display());
    p
}

fn work_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("work dir");
    d
}

/// Boot the guest once, run SCRIPT there with ARGS; returns its output. Panics (with the whole
/// output) unless it exited 0 and reported exactly `want_passed` checks, none failed.
fn run_in_guest(script: &str, work: &Path, args: &[&Path], want_passed: usize) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/usb_lab")
        .join(script);
    let out = Command::new(lab_dir().join("usb-lab.sh"))
        .args(["run", "--timeout", "600", "--mem", "1024", "--rw"])
        .arg(work)
        .arg("--")
        .arg("bash")
        .arg(&script)
        .arg(work)
        .args(args)
        .current_dir(work)
        .output()
        .expect("run usb-lab.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    let want = format!("{want_passed} passed, 0 failed");
    assert!(
        out.status.success() && text.contains(&want),
        "guest run of {} failed ({}; want `{want}`):\n{text}",
        script.display(),
        out.status
    );
    // Inputs and backing files are tens of MiB each: kept only when a run fails.
    let _ = std::fs::remove_dir_all(work);
    text
}

/// A boot_merger loader with DDR init, usbplug, and the FlashData/FlashBoot pair that
/// `rkdeveloptool ul` builds the IDB from. Returns the file and the IDB size in sectors.
fn loader_with_flash_boot() -> (Vec<u8>, usize) {
    let (data, boot) = (garbage(3000, 3), garbage(20_000, 4));
    let mut f = build_merged(
        "RK3588",
        &garbage(9000, 1),
        &garbage(70_000, 2),
        &[&data, &boot],
    );
    // build_merged names every flash entry FlashData; the second one is the FlashBoot code.
    let name: Vec<u8> = "FlashData"
        .encode_utf16()
        .flat_map(|c| c.to_le_bytes())
        .collect();
    let second = f
        .windows(name.len())
        .enumerate()
        .filter(|(_, w)| *w == &name[..])
        .map(|(i, _)| i)
        .nth(1)
        .expect("two FlashData entries");
    let boot_name: Vec<u8> = "FlashBoot"
        .encode_utf16()
        .flat_map(|c| c.to_le_bytes())
        .collect();
    f[second..second + boot_name.len()].copy_from_slice(&boot_name);
    let body = f.len() - 4;
    let crc = CRC32_RK.checksum(&f[..body]);
    f[body..].copy_from_slice(&crc.to_le_bytes());
    // rkdeveloptool: 4 header sectors + FlashData and FlashBoot, each 2 KiB aligned.
    let sectors = 4 + data.len().div_ceil(2048) * 4 + boot.len().div_ceil(2048) * 4;
    (f, sectors)
}

/// A loader whose DDR-init (0x471) entry is 4094 bytes: with its CRC that is exactly one
/// 4096-byte transfer, so the ROM needs a 1-byte "pend" transfer to see the end.
fn loader_4094() -> Vec<u8> {
    let mut f = build_merged("RK3588", &garbage(4094, 5), &garbage(70_000, 6), &[]);
    // build_merged pads entries to 2 KiB; the first entry (at the 102-byte header) says 4094.
    let size_field = 102 + 49;
    f[size_field..size_field + 4].copy_from_slice(&4094u32.to_le_bytes());
    let body = f.len() - 4;
    let crc = CRC32_RK.checksum(&f[..body]);
    f[body..].copy_from_slice(&crc.to_le_bytes());
    f
}

/// An image with data, zero runs and holes; it ends its first sector with the MBR signature,
/// so `write` takes it as a disk image.
fn image_with_holes(len: usize, seed: u32) -> Vec<u8> {
    let mut v = signed(garbage(len, seed));
    let mib = 1 << 20;
    for (i, chunk) in v.chunks_mut(mib).enumerate() {
        if i % 3 == 1 {
            chunk.fill(0);
        }
    }
    v
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    p
}

/// rkdeveloptool, fastboot and sunxi-fel against the models, in one guest boot.
#[test]
fn qemu_usb_lab_real_host_tools_against_the_models() {
    if !lab_ready(&[
        "rkdeveloptool",
        "fastboot",
        "sunxi-fel",
        "img2simg",
        "simg2img",
    ]) {
        return;
    }
    let dev = device_program();
    let w = work_dir("usb-lab-real-tools");
    let mib = 1usize << 20;

    // Rockchip: 32 MiB eMMC of garbage; `wl 0` writes a 6 MiB image over the start.
    let emmc = garbage(32 * mib, 0x3588);
    write(&w, "rk.emmc", &emmc);
    let img = image_with_holes(6 * mib, 7);
    write(&w, "rk.img", &img);
    let mut expected = emmc.clone();
    expected[..img.len()].copy_from_slice(&img);
    write(&w, "rk.expected", &expected);
    let (loader, idb_sectors) = loader_with_flash_boot();
    write(&w, "loader.bin", &loader);
    write(&w, "idb.sectors", idb_sectors.to_string().as_bytes());
    write(&w, "loader4094.bin", &loader_4094());

    // fastboot: raw 3 MiB (under the 4 MiB max-download-size), then erase and a 24 MiB sparse
    // image whose data alone is over 4 MiB, so fastboot must split it.
    write(&w, "fb.mmc", &garbage(32 * mib, 0xfb));
    write(&w, "fb.raw", &garbage(3 * mib, 0xfc));
    let big = image_with_holes(24 * mib, 0xfd);
    let big_path = write(&w, "fb.big", &big);
    common::run(
        Command::new("img2simg")
            .arg(&big_path)
            .arg(w.join("fb.sparse")),
    );
    let sparse_len = std::fs::metadata(w.join("fb.sparse")).map_or(0, |m| m.len());
    assert!(sparse_len > 4 << 20, "sparse image only {sparse_len} bytes");
    let mut fb_expected = big.clone();
    fb_expected.resize(32 * mib, 0);
    write(&w, "fb.expected", &fb_expected);

    // FEL: 16 MiB DRAM; 1 MiB written at 0x40100000.
    let dram = garbage(16 * mib, 0xd2);
    write(&w, "fel.dram", &dram);
    let bin = garbage(mib, 0xd3);
    write(&w, "fel.bin", &bin);
    let mut fel_expected = dram;
    fel_expected[mib..2 * mib].copy_from_slice(&bin);
    write(&w, "fel.expected", &fel_expected);

    run_in_guest("real-tools.sh", &w, &[&dev], 30);
}

/// `v` with the MBR signature at 510 (what `write` checks before taking a source as an image).
fn signed(mut v: Vec<u8>) -> Vec<u8> {
    v[510..512].copy_from_slice(&[0x55, 0xaa]);
    v
}

/// A file with real holes (SEEK_HOLE sees them): data MiBs, and every third MiB left unwritten.
fn sparse_file(dir: &Path, name: &str, len: usize, seed: u32) -> (PathBuf, Vec<u8>) {
    use std::os::unix::fs::FileExt;
    let img = image_with_holes(len, seed);
    let p = dir.join(name);
    let f = std::fs::File::create(&p).expect("create image");
    f.set_len(len as u64).expect("size image");
    for (i, chunk) in img.chunks(1 << 20).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            f.write_all_at(chunk, (i << 20) as u64)
                .expect("write image");
        }
    }
    (p, img)
}

/// sbcflash through rusb: `usb --json`, `write --via maskrom|fastboot|usbboot`, `fel`, unplug;
/// the CM4 (usbboot, then its eMMC as a USB disk on the same port) on a station slot; the
/// udev rules for every model and Raspberry Pi boot ROM id (tests/usb_lab/usbboot.sh).
#[test]
fn qemu_usb_lab_sbcflash_through_a_real_usb_stack() {
    if !lab_ready(&["python3"]) {
        return;
    }
    let dev = device_program();
    let sbc = PathBuf::from(env!("CARGO_BIN_EXE_sbcflash"));
    let w = work_dir("usb-lab-sbcflash");
    let mib = 1usize << 20;

    let (_, img) = sparse_file(&w, "img.raw", 24 * mib, 11);
    let emmc = garbage(32 * mib, 0x3588);
    write(&w, "rk.emmc", &emmc);
    let mut rk_expected = emmc;
    rk_expected[..img.len()].copy_from_slice(&img);
    write(&w, "rk.expected", &rk_expected);
    write(&w, "loader.bin", &loader_with_flash_boot().0);
    write(&w, "loader4094.bin", &loader_4094());
    write(&w, "small.img", &signed(garbage(mib, 0x94)));

    let mmc = garbage(32 * mib, 0xfb);
    write(&w, "fb.mmc", &mmc);
    let mut fb_expected = mmc;
    fb_expected[..img.len()].copy_from_slice(&img);
    write(&w, "fb.expected", &fb_expected);

    let dram = garbage(16 * mib, 0xd2);
    write(&w, "fel.dram", &dram);
    let bin = garbage(mib, 0xd3);
    write(&w, "fel.bin", &bin);
    let mut fel_expected = dram;
    fel_expected[mib..2 * mib].copy_from_slice(&bin);
    write(&w, "fel.expected", &fel_expected);

    run_in_guest("sbcflash.sh", &w, &[&dev, &sbc], 51);
}

/// USB card readers for real (mass-storage gadgets with a removable LUN): `write --eject`
/// ejects the medium (the reader stays) or powers a plain USB disk off; the station with four
/// card-reader slots matched by ID_PATH, one card pulled mid-write, the others ejected after
/// PASS; the ledger rows; `bootstrap --flash-via ums` whose U-Boot plugs in a real gadget.
#[test]
fn qemu_usb_lab_usb_disks_eject_station_and_ums_bootstrap() {
    if !lab_ready(&["python3", "blockdev", "udevadm", "od"]) {
        return;
    }
    let sbc = PathBuf::from(env!("CARGO_BIN_EXE_sbcflash"));
    let w = work_dir("usb-lab-disks");
    // 32 MiB with holes and an MBR signature; the station writes its first MiB last, so a
    // pulled card has no 0x55AA.
    write(&w, "img.raw", &image_with_holes(32 << 20, 0x57a7));
    run_in_guest("usb-disks.sh", &w, &[&sbc], 28);
}

/// `check-card` against the kernel's fault devices in the guest: a good card behind a real USB
/// mass-storage gadget (passes, data kept), scsi_debug `virtual_gb` (claims 1 GiB, wraps at
/// 64 MiB) and a scsi_debug medium error, dm-linear upper half onto lower half, dm-error and
/// dm-flakey `drop_writes` ranges.
#[test]
fn qemu_usb_lab_check_card_finds_fake_and_failing_cards() {
    if !lab_ready(&["dmsetup", "losetup", "md5sum"]) {
        return;
    }
    let sbc = PathBuf::from(env!("CARGO_BIN_EXE_sbcflash"));
    let w = work_dir("usb-lab-card-check");
    run_in_guest("card-check.sh", &w, &[&sbc], 8);
}

/// `write --rewrites` against a real kernel fault: a dm-flakey segment that drops every write
/// (over a loop device holding garbage) fails the write at once with `--rewrites 0`, after
/// exactly N rewrites with `--rewrites N` while the fault lasts, and succeeds, counting the
/// retried range, when the fault ends during the read-back; `--delta` reads back the unit it
/// wrote into the faulty segment and fails.
#[test]
fn qemu_usb_lab_retries_rewrite_ranges_a_dm_flakey_device_dropped() {
    if !lab_ready(&["dmsetup", "losetup", "blockdev"]) {
        return;
    }
    let sbc = PathBuf::from(env!("CARGO_BIN_EXE_sbcflash"));
    let w = work_dir("usb-lab-retries");
    write(&w, "img.raw", &image_with_holes(48 << 20, 0x2e7));
    run_in_guest("retries.sh", &w, &[&sbc], 11);
}

/// `read --via maskrom` and `read --via usbboot` through rusb and the kernel's USB stack: the
/// rockusb model's and the CM4 model's eMMC hold a real FAT + ext4 image (garbage after it);
/// each board's capture equals the capture of the image file made here (blake3, bmap, bytes),
/// and the eMMC is left as it was.
#[test]
fn qemu_usb_lab_read_captures_rockusb_and_usbboot_boards() {
    if !lab_ready(&[
        "zstd",
        "sfdisk",
        "mkfs.vfat",
        "mcopy",
        "mkfs.ext4",
        "python3",
    ]) {
        return;
    }
    let dev = device_program();
    let sbc = PathBuf::from(env!("CARGO_BIN_EXE_sbcflash"));
    let w = work_dir("usb-lab-capture");
    let img = common::make_nixos_like_image(&w, "sd.img", 48, common::Table::Mbr);
    let bytes = std::fs::read(&img).unwrap();
    let mut emmc = garbage(64 << 20, 0x3588);
    emmc[..bytes.len()].copy_from_slice(&bytes);
    write(&w, "rk.emmc", &emmc);
    write(&w, "loader.bin", &loader_with_flash_boot().0);
    common::run(
        Command::new(&sbc)
            .args(["-q", "read"])
            .arg(&img)
            .arg(w.join("file")),
    );
    run_in_guest("capture.sh", &w, &[&dev, &sbc], 10);
}
