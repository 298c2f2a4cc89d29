//! `sbcflash read --via` against the simulated Rockchip board (`sbcflash::usb::sim`, the device
//! model the USB tests use; there is no USB bus on CI machines): a board whose eMMC holds a
//! real FAT + ext4 image is brought up from maskrom like `write --via` does, and its capture
//! over rockusb READ_LBA equals the capture of the same image as a file.

mod common;

use clap::Parser;
use sbcflash::exit::Exit;
use sbcflash::usb::rkloader;
use sbcflash::usb::sim::rockusb::{RkMode, RockchipBoard, EMMC};
use sbcflash::usb::sim::{lock, SimBus};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// rockusb opcodes the simulated board records.
const READ_LBA: u8 = 0x14;
const WRITE_LBA: u8 = 0x15;

struct TmpDir(PathBuf);
impl TmpDir {
    fn new(name: &str) -> TmpDir {
        let d = std::env::temp_dir().join(format!("sbcflash-capusb-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TmpDir(d)
    }
}
impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn merged_loader(dir: &Path) -> PathBuf {
    let pat = |n: usize, s: u8| (0..n).map(|i| (i % 251) as u8 ^ s).collect::<Vec<u8>>();
    let file = rkloader::build_merged("RK3588", &pat(9000, 1), &pat(70_000, 2), &[&pat(3000, 3)]);
    let p = dir.join("rk3588_spl_loader.bin");
    std::fs::write(&p, file).unwrap();
    p
}

/// `sbcflash ARGS` parsed and run in-process against `bus`.
fn read_on(bus: &SimBus, args: &[&str]) -> anyhow::Result<Exit> {
    let cli =
        sbcflash::cli::Cli::try_parse_from(std::iter::once("sbcflash").chain(args.iter().copied()))
            .unwrap();
    let sbcflash::cli::Command::Read(a) = cli.command else {
        panic!("not read: {args:?}")
    };
    sbcflash::cli::capture::run_read_on(bus, a, &cli.global)
}

fn first_word(p: &Path) -> String {
    let t = std::fs::read_to_string(p).unwrap();
    t.split_whitespace().next().unwrap_or_default().to_string()
}

/// A board in maskrom whose eMMC (larger than the image, garbage after it) holds a real
/// MBR and a real GPT image in turn: `read --via maskrom` downloads the loader, reads the
/// partition table and the used blocks over READ_LBA, never writes, resets the board, and
/// its capture has the same blake3, the same bmap and the same bytes as `sbcflash read` of
/// the image file.
#[test]
fn read_over_rockusb_equals_the_capture_of_the_same_image_file() {
    if !common::require(
        false,
        &["sfdisk", "mkfs.vfat", "mcopy", "mkfs.ext4", "zstd"],
    ) {
        return;
    }
    for table in [common::Table::Mbr, common::Table::Gpt] {
        let name = format!("{table:?}").to_lowercase();
        let dir = TmpDir::new(&name);
        let w = &dir.0;
        let img = common::make_nixos_like_image(w, "sd.img", 48, table);
        let bytes = std::fs::read(&img).unwrap();
        let mut board = RockchipBoard::rk3588(64 << 20);
        let emmc = board.storages.get_mut(&EMMC).unwrap();
        emmc[..bytes.len()].copy_from_slice(&bytes);
        let before = emmc.clone();
        let board = Arc::new(Mutex::new(board));
        let mut bus = SimBus::new();
        bus.attach(board.clone());

        let loader = merged_loader(w);
        let out = w.join("board");
        let code = read_on(
            &bus,
            &[
                "-q",
                "read",
                "--via",
                "maskrom",
                "--loader",
                loader.to_str().unwrap(),
                "--storage",
                "emmc",
                out.to_str().unwrap(),
            ],
        )
        .unwrap();
        assert_eq!(code, Exit::Ok);
        {
            let b = lock(&board);
            assert!(
                b.downloads.len() == 2 && b.downloads.iter().all(|d| d.crc_ok),
                "{name}: loader downloaded"
            );
            assert!(b.commands.contains(&READ_LBA), "{name}: read over READ_LBA");
            assert!(
                !b.commands.contains(&WRITE_LBA),
                "{name}: a capture never writes"
            );
            assert!(b.storage(EMMC) == &before[..], "{name}: storage changed");
            assert_eq!(b.resets.len(), 1, "{name}: board reset at the end");
        }

        // The same image as a file, captured by the binary.
        common::run(
            common::sbcflash()
                .args(["-q", "read"])
                .arg(&img)
                .arg(w.join("file")),
        );
        let (b, f) = (w.join("board.img"), w.join("file.img"));
        assert_eq!(
            first_word(&b.with_extension("img.blake3")),
            first_word(&f.with_extension("img.blake3")),
            "{name}: blake3"
        );
        assert_eq!(
            std::fs::read_to_string(b.with_extension("img.bmap")).unwrap(),
            std::fs::read_to_string(f.with_extension("img.bmap")).unwrap(),
            "{name}: bmap ranges"
        );
        common::sh(&format!(
            "cd {} && cmp <(zstd -dcq board.img.zst) <(zstd -dcq file.img.zst)",
            w.display()
        ));
    }
}

/// What `read --via` cannot do is refused before the board is touched, with the reason.
#[test]
fn read_via_refuses_fastboot_two_paths_and_a_loader_without_a_size() {
    let dir = TmpDir::new("refuse");
    let w = &dir.0;
    let out = w.join("x");
    let out = out.to_str().unwrap();
    let bus = SimBus::new();
    let e = read_on(&bus, &["read", "--via", "fastboot", out]).unwrap_err();
    assert!(e.to_string().contains("fastboot cannot read"), "{e}");
    assert_eq!(sbcflash::cli::classify(&e), Exit::Usage);
    let e = read_on(&bus, &["read", "--via", "usb", "/dev/null", out]).unwrap_err();
    assert!(e.to_string().contains("give only OUT"), "{e}");
    assert_eq!(sbcflash::cli::classify(&e), Exit::Usage);
    let e = read_on(&bus, &["read", out]).unwrap_err();
    assert!(e.to_string().contains("give DEVICE and OUT"), "{e}");

    // Mainline U-Boot's rockusb (no READ_FLASH_INFO): the end of the storage is unknown.
    let mut board = RockchipBoard::rk3588(8 << 20);
    board.mode = RkMode::Loader;
    board.no_flash_info = true;
    let board = Arc::new(Mutex::new(board));
    let mut bus = SimBus::new();
    bus.attach(board.clone());
    let e = read_on(&bus, &["-q", "read", "--via", "usb", out]).unwrap_err();
    assert!(
        e.to_string().contains("does not report its storage's size"),
        "{e}"
    );
    assert_eq!(sbcflash::cli::classify(&e), Exit::Environment);
    assert!(!lock(&board).commands.contains(&WRITE_LBA));
    assert!(std::fs::read_dir(w).unwrap().next().is_none(), "no outputs");
}

/// A board that leaves the bus or stops answering in the middle of the capture: the error
/// names the board and the offset, the exit code is I/O (5) or timeout, and no output is left
/// behind (the partial image is removed, nothing looks finished).
#[test]
fn read_via_a_board_lost_mid_capture_leaves_no_outputs() {
    use sbcflash::usb::sim::{Fault, FaultKind, SimDevice, Trigger};
    for (kind, exit, says) in [
        (FaultKind::Vanish, Exit::Io, "reading at offset"),
        (FaultKind::Timeout, Exit::Timeout, "timed out"),
    ] {
        let dir = TmpDir::new(&format!("{kind:?}").to_lowercase());
        let w = &dir.0;
        let mut board = RockchipBoard::rk3588(8 << 20);
        board.mode = RkMode::Loader;
        let board = Arc::new(Mutex::new(board));
        lock(&board).faults().add(Fault {
            at: Trigger::AfterBulkIn(5 << 20),
            kind,
        });
        let mut bus = SimBus::new();
        bus.attach(board.clone());
        let out = w.join("cap");
        let e = read_on(&bus, &["-q", "read", "--via", "usb", out.to_str().unwrap()]).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("2207:350b at") && msg.contains(says),
            "{kind:?}: {msg}"
        );
        assert_eq!(sbcflash::cli::classify(&e), exit, "{kind:?}: {msg}");
        assert_eq!(lock(&board).faults().fired, vec![kind]);
        let left: Vec<_> = std::fs::read_dir(w)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{kind:?}: left behind {left:?}");
    }
}
