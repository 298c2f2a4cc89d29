//! Board descriptors: shipped data, malformed files, user overrides, the image-vs-board check on
//! real images made with sfdisk/mkfs, bootloader placement, and the `boards` CLI.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use common::{make_nixos_like_image, require, sbcflash, sh, Table};
use sbcflash::board::check::{check_image, read_head, HEAD_LEN};
use sbcflash::board::parttable::{self, PartitionTable};
use sbcflash::board::registry::{embedded_files, parse_board, parse_soc};
use sbcflash::board::*;

const TOOLS: &[&str] = &["sfdisk", "mkfs.vfat", "mcopy", "mkfs.ext4"];

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn builtin() -> Registry {
    Registry::builtin().unwrap_or_else(|e| panic!("shipped descriptors must load: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Shipped descriptors
// ---------------------------------------------------------------------------------------------

#[test]
fn every_shipped_descriptor_parses_including_the_template() {
    let files = embedded_files();
    assert!(
        files.len() >= 20,
        "expected boards + SoCs, got {}",
        files.len()
    );
    for (path, text) in files {
        let origin = Origin::Builtin(path.to_string());
        if path.starts_with("boards/soc/") {
            parse_soc(&origin, text).unwrap_or_else(|e| panic!("{e}"));
        } else {
            parse_board(&origin, text).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    assert!(files.iter().any(|(p, _)| *p == "boards/_template.toml"));
}

#[test]
fn every_file_in_boards_dir_is_embedded() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("boards");
    let mut on_disk = Vec::new();
    for dir in [root.clone(), root.join("soc")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                on_disk.push(
                    p.strip_prefix(env!("CARGO_MANIFEST_DIR"))
                        .unwrap()
                        .to_string_lossy()
                        .to_string(),
                );
            }
        }
    }
    on_disk.sort();
    let mut embedded: Vec<String> = embedded_files()
        .iter()
        .map(|(p, _)| p.to_string())
        .collect();
    embedded.sort();
    assert_eq!(on_disk, embedded);
}

#[test]
fn scope_boards_exist_with_unique_ids_and_aliases() {
    let reg = builtin();
    for id in [
        "opi5",
        "opi5b",
        "opi5plus",
        "rpi4",
        "rpi5",
        "cm4",
        "vf2",
        "milkv-mars",
        "star64",
        "lpi4a",
        "nezha",
        "qemu-aarch64",
        "qemu-riscv64",
    ] {
        assert_eq!(reg.get(id).unwrap().id(), id);
    }
    let mut seen = std::collections::BTreeSet::new();
    for b in reg.boards() {
        for n in std::iter::once(&b.desc.id).chain(&b.desc.aliases) {
            assert!(seen.insert(n.clone()), "`{n}` used twice");
        }
    }
    assert!(
        reg.get("example-board").is_err(),
        "the template is not a board"
    );
}

#[test]
fn facts_agree_with_the_soc() {
    let reg = builtin();
    for b in reg.boards() {
        assert_eq!(b.desc.arch, b.soc.arch, "{}", b.id());
        let usb = b.usb_recovery();
        match b.soc.vendor.as_str() {
            "Rockchip" => {
                let u = usb.expect("Rockchip boards have maskrom");
                assert_eq!(u.vid, Some(0x2207), "{}", b.id());
                assert_eq!(u.protocol, RecoveryProtocol::Rockusb);
                assert_eq!(u.rc4, Some(false), "RK3588 takes plaintext");
            }
            "Broadcom" => assert_eq!(usb.unwrap().vid, Some(0x0a5c), "{}", b.id()),
            "Allwinner" => assert_eq!(usb.unwrap().vid, Some(0x1f3a), "{}", b.id()),
            "StarFive" => assert_eq!(usb.unwrap().protocol, RecoveryProtocol::UartXmodem),
            "QEMU" => {
                assert!(usb.is_none());
                assert_eq!(b.console().baud, 115200);
                let u = b.uboot().unwrap();
                assert_eq!(u.prompts, vec!["=> ".to_string()]);
                assert_eq!(b.default_medium().uboot_dev.as_deref(), Some("virtio 0"));
            }
            _ => {}
        }
        // Placements sit inside the reserved region, and the region ends by 32 MiB: the first
        // partition offset RK3588 NixOS flakes use (firmwarePartitionOffset = 32).
        for m in &b.desc.storage {
            let Some(l) = b.layout(m) else { continue };
            if let Some(r) = l.reserved {
                assert!(
                    r.end * 512 <= 32 << 20,
                    "{}: reserved ends after 32 MiB",
                    b.id()
                );
                for p in &l.placements {
                    let s = p.offset_bytes() / 512;
                    assert!(
                        r.start <= s && s < r.end,
                        "{}: {} outside {r}",
                        b.id(),
                        p.file
                    );
                }
            }
        }
        // Exactly one default OS medium.
        assert!(b.desc.storage.iter().filter(|m| m.default).count() <= 1);
    }
    let opi5 = reg.get("opi5").unwrap();
    assert_eq!(opi5.console().baud, 1_500_000);
    assert_eq!(opi5.console().linux, "ttyS2");
    assert_eq!(
        opi5.medium(MediumKind::SpiNor).unwrap().rockusb_index,
        Some(9)
    );
}

#[test]
fn shipped_digests_are_absent_or_well_formed() {
    // No published digest is known for any shipped source: all unpinned, none invented.
    for b in builtin().boards() {
        for i in &b.desc.images {
            assert!(
                i.is_unpinned(),
                "{}: {} has a digest; cite its source",
                b.id(),
                i.name
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Malformed descriptors: file:line:col, key, expectation
// ---------------------------------------------------------------------------------------------

const GOOD: &str = r#"schema = 1
id = "myboard"
aliases = ["mine"]
name = "My Board"
vendor = "Me"
soc = "rk3588"
arch = "aarch64"

[[storage]]
kind = "sd"
boot = "image"

[console]
baud = 1500000
linux = "ttyS2"
"#;

fn board_err(text: &str) -> String {
    let dir = tmp();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, text).unwrap();
    let e = Registry::with_dirs(&[dir.path().to_path_buf()]).expect_err("must fail");
    e.to_string()
        .replace(&dir.path().display().to_string(), "DIR")
}

#[test]
fn good_user_descriptor_loads() {
    let dir = tmp();
    std::fs::write(dir.path().join("myboard.toml"), GOOD).unwrap();
    let reg = Registry::with_dirs(&[dir.path().to_path_buf()]).unwrap();
    let b = reg.get("mine").unwrap();
    assert_eq!(b.id(), "myboard");
    assert_eq!(
        b.usb_recovery().unwrap().pid,
        Some(0x350b),
        "SoC facts come from the SoC file"
    );
}

#[test]
fn malformed_unknown_key() {
    let text = GOOD.replace("linux = \"ttyS2\"", "linux = \"ttyS2\"\ncolour = \"red\"");
    assert_eq!(
        board_err(&text),
        "DIR/bad.toml:16:1: `console.colour`: unknown field `colour`, expected one of `uart`, `baud`, `linux`, `pins`"
    );
}

#[test]
fn malformed_wrong_type() {
    let text = GOOD.replace("baud = 1500000", "baud = \"fast\"");
    assert_eq!(
        board_err(&text),
        "DIR/bad.toml:14:8: `console.baud`: invalid type: string \"fast\", expected u32"
    );
}

#[test]
fn malformed_missing_field() {
    let text = GOOD.replace("linux = \"ttyS2\"\n", "");
    assert_eq!(
        board_err(&text),
        "DIR/bad.toml:13:1: `console`: missing field `linux`"
    );
}

#[test]
fn malformed_duplicate_alias_in_one_file() {
    let text = GOOD.replace(
        r#"aliases = ["mine"]"#,
        r#"aliases = ["mine", "yours", "mine"]"#,
    );
    assert_eq!(
        board_err(&text),
        "DIR/bad.toml:3:29: duplicate alias `mine`"
    );
}

#[test]
fn malformed_alias_taken_by_a_shipped_board() {
    let text = GOOD.replace(
        r#"aliases = ["mine"]"#,
        r#"aliases = ["mine", "orangepi5"]"#,
    );
    assert_eq!(
        board_err(&text),
        "DIR/bad.toml:3:20: alias `orangepi5` of board `myboard` is already an alias of board `opi5` (built-in boards/opi5.toml)"
    );
}

#[test]
fn malformed_bad_hex_digest() {
    let text = format!(
        "{GOOD}\n[[image]]\nname = \"x\"\nurl = \"https://example.org/x.img\"\nblake3 = \"zz{}\"\n",
        "0".repeat(62)
    );
    assert_eq!(
        board_err(&text),
        "DIR/bad.toml:20:10: `image.0.blake3`: expected hex digits: Invalid character 'z' at position 0"
    );
    let short = format!(
        "{GOOD}\n[[image]]\nname = \"x\"\nurl = \"https://example.org/x.img\"\nsha256 = \"abcd\"\n"
    );
    assert_eq!(
        board_err(&short),
        "DIR/bad.toml:20:10: `image.0.sha256`: expected 64 hex digits (32-byte digest), got 4 characters"
    );
}

#[test]
fn malformed_schema_version_unknown_soc_and_bad_placement() {
    assert_eq!(
        board_err(&GOOD.replace("schema = 1", "schema = 2")),
        "DIR/bad.toml:1:1: unsupported `schema = 2`: this build reads `schema = 1`"
    );
    assert_eq!(
        board_err(&GOOD.replace("schema = 1\n", "")),
        "DIR/bad.toml:1:1: missing key `schema`: expected `schema = 1` at the top"
    );
    let e = board_err(&GOOD.replace("soc = \"rk3588\"", "soc = \"rk9999\""));
    assert!(
        e.starts_with(
            "DIR/bad.toml:6:1: unknown SoC `rk9999`: expected one of bcm2711, bcm2712, d1,"
        ),
        "{e}"
    );
    let text = GOOD.replace(
        "boot = \"image\"",
        "boot = \"image\"\nlayout = { placements = [{ file = \"spl.bin\" }] }",
    );
    assert_eq!(
        board_err(&text),
        "DIR/bad.toml:12:26: placement of `spl.bin`: expected exactly one of `sector` or `offset`"
    );
    assert_eq!(
        board_err(&GOOD.replace(
            "arch = \"aarch64\"\n",
            "arch = \"aarch64\"\nvariant_of = \"opi9\"\n"
        )),
        "DIR/bad.toml:8:1: `variant_of = \"opi9\"`: no board with that id"
    );
    assert_eq!(
        board_err(&GOOD.replace("arch = \"aarch64\"", "arch = \"riscv64\"")),
        "DIR/bad.toml:7:1: arch `riscv64` contradicts SoC `rk3588` (aarch64, in built-in boards/soc/rk3588.toml)"
    );
}

// ---------------------------------------------------------------------------------------------
// User overrides
// ---------------------------------------------------------------------------------------------

fn opi5_with_baud(baud: u32) -> String {
    let (_, text) = embedded_files()
        .iter()
        .find(|(p, _)| *p == "boards/opi5.toml")
        .unwrap();
    text.replace("baud = 1500000", &format!("baud = {baud}"))
}

#[test]
fn user_file_overrides_shipped_and_later_dirs_win() {
    let a = tmp();
    let b = tmp();
    std::fs::write(a.path().join("opi5.toml"), opi5_with_baud(115200)).unwrap();
    std::fs::write(b.path().join("my-opi5.toml"), opi5_with_baud(9600)).unwrap();
    let reg = Registry::with_dirs(&[a.path().into(), b.path().into()]).unwrap();
    let opi5 = reg.get("orangepi5").unwrap();
    assert_eq!(opi5.console().baud, 9600);
    assert_eq!(opi5.origin, Origin::File(b.path().join("my-opi5.toml")));
    assert_eq!(
        opi5.overrides,
        vec![
            Origin::File(a.path().join("opi5.toml")),
            Origin::Builtin("boards/opi5.toml".into())
        ]
    );
    // Other boards untouched.
    assert_eq!(reg.boards().len(), builtin().boards().len());
}

#[test]
fn cli_show_names_the_winning_file_xdg_then_boards_dir() {
    let xdg = tmp();
    let ub = xdg.path().join("sbcflash/boards");
    std::fs::create_dir_all(&ub).unwrap();
    std::fs::write(ub.join("opi5.toml"), opi5_with_baud(115200)).unwrap();
    let extra = tmp();
    std::fs::write(extra.path().join("opi5.toml"), opi5_with_baud(57600)).unwrap();

    let out = sbcflash()
        .env("XDG_CONFIG_HOME", xdg.path())
        .env_remove("SBCFLASH_CONFIG")
        .args(["boards", "show", "opi5"])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{s}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        s.contains(&format!("file:      {}", ub.join("opi5.toml").display())),
        "{s}"
    );
    assert!(s.contains("overrides: built-in boards/opi5.toml"), "{s}");
    assert!(s.contains("console:   115200 baud"), "{s}");

    let out = sbcflash()
        .env("XDG_CONFIG_HOME", xdg.path())
        .env_remove("SBCFLASH_CONFIG")
        .arg("--boards-dir")
        .arg(extra.path())
        .args(["boards", "show", "opi5"])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        s.contains(&format!(
            "file:      {}",
            extra.path().join("opi5.toml").display()
        )),
        "{s}"
    );
    assert!(
        s.contains(&format!("overrides: {}", ub.join("opi5.toml").display())),
        "{s}"
    );
    assert!(s.contains("console:   57600 baud"), "{s}");
}

#[test]
fn cli_boards_json_and_unknown_board() {
    let xdg = tmp();
    let out = sbcflash()
        .env("XDG_CONFIG_HOME", xdg.path())
        .env_remove("SBCFLASH_CONFIG")
        .args(["boards", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "one JSON object per line");
    common::json::assert_documented(&text);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let boards = v["boards"].as_array().unwrap();
    assert_eq!(boards.len(), 13);
    let opi5 = boards.iter().find(|b| b["id"] == "opi5").unwrap();
    assert_eq!(opi5["recovery"]["vid"], 0x2207);
    assert_eq!(opi5["recovery"]["protocol"], "rockusb");
    assert_eq!(opi5["baud"], 1_500_000);

    let out = sbcflash()
        .env("XDG_CONFIG_HOME", xdg.path())
        .args(["boards", "show", "vf2", "--json"])
        .output()
        .unwrap();
    common::json::assert_documented(&String::from_utf8_lossy(&out.stdout));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["board"]["uboot"]["prompts"][0], "StarFive # ");
    assert_eq!(v["board"]["soc_facts"]["usb"]["protocol"], "uart-xmodem");

    let out = sbcflash()
        .env("XDG_CONFIG_HOME", xdg.path())
        .args(["boards", "show", "orangepi-55"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown board `orangepi-55`; did you mean `orangepi-5` (alias of `opi5`) or `orangepi-5b` (alias of `opi5b`)"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Image-vs-board check on real images
// ---------------------------------------------------------------------------------------------

/// An image partitioned by sfdisk with `script`, with a FAT filesystem made by mkfs.vfat in
/// partition 1 (at `fat_start_mib`) so it is a real disk image, not just a table.
fn make_image(dir: &Path, name: &str, size_mib: u64, script: &str, fat_start_mib: u64) -> PathBuf {
    let img = dir.join(name);
    let d = dir.display();
    sh(&format!(
        r#"
cd "{d}"
truncate -s {size_mib}M "{name}"
printf '{script}' | sfdisk -q "{name}"
truncate -s 16M fat-{name}
mkfs.vfat -n FIRMWARE fat-{name} >/dev/null
dd if=fat-{name} of="{name}" bs=1M seek={fat_start_mib} conv=notrunc,sparse status=none
rm -f fat-{name}
"#
    ));
    img
}

fn head(p: &Path) -> Vec<u8> {
    read_head(std::fs::File::open(p).unwrap()).unwrap()
}

fn poke(p: &Path, offset: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

fn check(board: &str, medium: Option<MediumKind>, img: &Path) -> ImageReport {
    let reg = builtin();
    let b = reg.get(board).unwrap();
    let m = medium.map_or_else(|| b.default_medium(), |k| b.medium(k).unwrap());
    check_image(b, m, &head(img))
}

fn codes(r: &ImageReport, sev: Severity) -> Vec<&'static str> {
    r.findings
        .iter()
        .filter(|f| f.severity == sev)
        .map(|f| f.code)
        .collect()
}

fn message(r: &ImageReport, code: &str) -> String {
    r.findings
        .iter()
        .find(|f| f.code == code)
        .map(|f| f.message.clone())
        .unwrap_or_else(|| panic!("no `{code}` in {:#?}", r.findings))
}

const MBR_32: &str = "label: dos\nstart=32MiB, size=16MiB, type=c\nstart=48MiB, type=83\n";

#[test]
fn check_rockchip_mbr_at_8mib_was_built_for_another_board() {
    if !require(false, TOOLS) {
        return;
    }
    let dir = tmp();
    let img = make_nixos_like_image(dir.path(), "nixos.img", 48, Table::Mbr);
    let r = check("opi5", None, &img);
    assert_eq!(r.table, "MBR");
    assert_eq!(r.first_partition_sector, Some(16384));
    assert_eq!(
        codes(&r, Severity::Warning),
        ["reserved-overlap", "no-bootloader"]
    );
    assert_eq!(
        message(&r, "reserved-overlap"),
        "first partition starts at 8 MiB, inside the Rockchip bootloader area (sectors 64..32767): this image was built for another board, and no bootloader can be added to it without overwriting that partition"
    );
    assert_eq!(
        message(&r, "no-bootloader"),
        "no U-Boot in the image: the Orange Pi 5 boots it from sd only if its SPI flash holds U-Boot — write U-Boot to the SPI flash first: `sbcflash write --board opi5 --spi u-boot-rockchip-spi.bin`, or add it to the card with `--bootloader u-boot-rockchip.bin`"
    );
    let e = r.into_result(true).unwrap_err();
    assert_eq!(
        sbcflash::exit::Classify::exit(&e),
        sbcflash::exit::Exit::BadInput
    );
}

#[test]
fn check_rockchip_mbr_at_32mib_without_and_with_idb() {
    if !require(false, TOOLS) {
        return;
    }
    let dir = tmp();
    let img = make_image(dir.path(), "rk.img", 64, MBR_32, 32);
    let r = check("opi5", None, &img);
    assert_eq!(r.first_partition_sector, Some(65536));
    assert_eq!(codes(&r, Severity::Warning), ["no-bootloader"]);

    // A fake RK35xx IDBlock header at sector 64.
    poke(&img, 64 * 512, b"RKNS\x00\x00\x00\x00");
    let r = check("opi5", None, &img);
    assert!(codes(&r, Severity::Warning).is_empty(), "{:#?}", r.findings);
    assert_eq!(
        r.bootloader.as_deref(),
        Some("Rockchip IDB (RKNS header) at sector 64")
    );
    assert!(r.into_result(true).is_ok());

    // An eMMC board variant where the ROM must find it in the image: same verdict.
    let r = check("opi5b", Some(MediumKind::Emmc), &img);
    assert!(codes(&r, Severity::Warning).is_empty());
}

#[test]
fn check_rockchip_8mib_image_that_carries_its_own_idb_is_only_noted() {
    if !require(false, TOOLS) {
        return;
    }
    let dir = tmp();
    let img = make_nixos_like_image(dir.path(), "nixos.img", 48, Table::Mbr);
    // Legacy IDB header, RC4-scrambled (tag 0x0FF0AA55 xor the Rockchip keystream).
    poke(&img, 64 * 512, &[0x3b, 0x8c, 0xdc, 0xfc]);
    let r = check("opi5", None, &img);
    assert!(codes(&r, Severity::Warning).is_empty(), "{:#?}", r.findings);
    assert!(codes(&r, Severity::Info).contains(&"reserved-overlap-with-bootloader"));
    assert_eq!(
        r.bootloader.as_deref(),
        Some("Rockchip IDB (legacy header, RC4) at sector 64")
    );
}

#[test]
fn check_jh7110_gpt_with_spl_partition() {
    if !require(false, TOOLS) {
        return;
    }
    let dir = tmp();
    let script = "label: gpt\nstart=4096, size=4096, type=2E54B353-1271-4842-806F-E436D6AF6985, name=spl\nstart=8192, size=8192, type=BC13C2FF-59E6-4262-A352-B275FD6F7172, name=uboot\nstart=16384, size=32768, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=boot\nstart=49152, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n";
    let img = make_image(dir.path(), "vf2.img", 48, script, 8);
    let r = check("vf2", None, &img);
    assert_eq!(r.table, "GPT");
    assert!(codes(&r, Severity::Warning).is_empty(), "{:#?}", r.findings);
    assert_eq!(
        r.bootloader.as_deref(),
        Some("SPL partition 1 (type 2E54B353-1271-4842-806F-E436D6AF6985) at sector 4096")
    );
    // The same board with a plain NixOS MBR image: wrong table, no SPL.
    let plain = make_nixos_like_image(dir.path(), "nixos.img", 48, Table::Mbr);
    let r = check("milkv-mars", None, &plain);
    assert_eq!(
        codes(&r, Severity::Warning),
        ["wrong-table", "no-bootloader"]
    );
    assert_eq!(
        message(&r, "wrong-table"),
        "the image has an MBR partition table, but the StarFive boot ROM of the Milk-V Mars expects GPT on sd"
    );
}

#[test]
fn check_allwinner_egon_at_8kib() {
    if !require(false, TOOLS) {
        return;
    }
    let dir = tmp();
    let img = make_nixos_like_image(dir.path(), "nixos.img", 48, Table::Mbr);
    let r = check("nezha", None, &img);
    assert_eq!(codes(&r, Severity::Warning), ["no-bootloader"]);
    assert_eq!(
        message(&r, "no-bootloader"),
        "no bootloader in the image: the Allwinner Nezha D1 boot ROM reads it from the sd itself (eGON.BT0 at 8 KiB or 128 KiB) — add the D1 bootloader with `--bootloader u-boot-sunxi-with-spl.bin` (8 KiB on MBR, 128 KiB on GPT)"
    );
    poke(&img, 8192, b"\x00\x00\x00\x00eGON.BT0");
    let r = check("nezha", None, &img);
    assert!(codes(&r, Severity::Warning).is_empty(), "{:#?}", r.findings);
    assert_eq!(
        r.bootloader.as_deref(),
        Some("Allwinner eGON.BT0 SPL at 8 KiB")
    );
}

#[test]
fn check_raspberry_pi_and_qemu() {
    if !require(false, TOOLS) {
        return;
    }
    let dir = tmp();
    let mbr = make_nixos_like_image(dir.path(), "mbr.img", 48, Table::Mbr);
    let r = check("rpi4", None, &mbr);
    assert!(codes(&r, Severity::Warning).is_empty(), "{:#?}", r.findings);
    let r = check("qemu-aarch64", None, &mbr);
    assert!(codes(&r, Severity::Warning).is_empty(), "{:#?}", r.findings);
    let gpt = make_nixos_like_image(dir.path(), "gpt.img", 48, Table::Gpt);
    let r = check("qemu-riscv64", None, &gpt);
    assert!(codes(&r, Severity::Warning).is_empty());
    let r = check("rpi5", None, &gpt);
    assert_eq!(codes(&r, Severity::Warning), ["wrong-table"]);
    assert!(
        message(&r, "wrong-table").starts_with("the image has a GPT partition table, but"),
        "{}",
        message(&r, "wrong-table")
    );
    // Writing an OS image to the SPI flash of a board is flagged.
    let r = check("opi5", Some(MediumKind::SpiNor), &mbr);
    assert_eq!(
        codes(&r, Severity::Warning),
        ["os-image-on-bootloader-flash"]
    );
}

/// Issue 14, item 12: a type-0c first partition is only a boot partition if it holds a FAT
/// file system; `boards check rpi5` reads its boot sector (at 8 MiB, beyond the first 4 MiB).
#[test]
fn rpi5_check_looks_for_the_fat_file_system_in_the_boot_partition() {
    if !require(false, TOOLS) {
        return;
    }
    let dir = tmp();
    let good = make_image(
        dir.path(),
        "rpi.img",
        48,
        "label: dos\nstart=8MiB, size=16MiB, type=c\nstart=24MiB, type=83\n",
        8,
    );
    let zeroed = dir.path().join("zeroed.img");
    std::fs::copy(&good, &zeroed).unwrap();
    poke(&zeroed, 8 << 20, &vec![0u8; 1 << 20]);
    let run = |img: &Path, strict: bool| {
        sbcflash()
            .env("XDG_CONFIG_HOME", dir.path())
            .args(["boards", "check", "rpi5"])
            .args(strict.then_some("--strict"))
            .arg(img)
            .output()
            .unwrap()
    };
    let out = run(&good, false);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{s}");
    assert!(
        s.contains("ok: ") && s.contains("looks bootable on the Raspberry Pi 5"),
        "{s}"
    );
    let out = run(&zeroed, false);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(!s.contains("looks bootable"), "{s}");
    assert!(
        s.contains("warning: partition 1 has a FAT partition type (0x0c) but holds no FAT file system (no FAT boot sector at 8 MiB)"),
        "{s}"
    );
    let out = run(&zeroed, true);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn parttable_reads_real_gpt_and_rejects_a_corrupt_one() {
    if !require(false, TOOLS) {
        return;
    }
    let dir = tmp();
    let gpt = make_nixos_like_image(dir.path(), "gpt.img", 48, Table::Gpt);
    let h = head(&gpt);
    assert_eq!(h.len(), HEAD_LEN);
    match parttable::parse(&h).unwrap() {
        PartitionTable::Gpt { parts } => {
            assert_eq!(parts.len(), 2);
            assert_eq!(parts[0].start, 16384);
            assert_eq!(parts[0].name.as_deref(), Some("FIRMWARE"));
            assert!(parts[0].kind.is_fat());
        }
        other => panic!("{other:?}"),
    }
    poke(&gpt, 512 + 40, b"\xff");
    let e = parttable::parse(&head(&gpt)).unwrap_err();
    assert_eq!(e, "GPT header at offset 512: CRC32 mismatch");
    let r = check("opi5", None, &gpt);
    assert!(codes(&r, Severity::Warning).contains(&"bad-partition-table"));
}

// ---------------------------------------------------------------------------------------------
// Bootloader placement
// ---------------------------------------------------------------------------------------------

fn random_file(dir: &Path, name: &str, len: usize, prefix: &[u8]) -> PathBuf {
    let p = dir.join(name);
    let mut data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    data[..prefix.len()].copy_from_slice(prefix);
    std::fs::write(&p, data).unwrap();
    p
}

#[test]
fn place_rockchip_bootloader_after_the_image() {
    if !require(false, TOOLS) {
        return;
    }
    let dir = tmp();
    let img = make_image(dir.path(), "rk.img", 64, MBR_32, 32);
    let idb = random_file(dir.path(), "idbloader.img", 200 * 1024, b"RKNS");
    let itb = random_file(dir.path(), "u-boot.itb", 1 << 20, b"\xd0\x0d\xfe\xed");
    let reg = builtin();
    let b = reg.get("opi5").unwrap();
    let m = b.default_medium();
    let table = parttable::parse(&head(&img)).unwrap();
    let plan = place::plan(b, m, &table, &[idb.clone(), itb.clone()]).unwrap();
    assert_eq!(
        plan.iter()
            .map(|p| (p.slot.as_str(), p.offset))
            .collect::<Vec<_>>(),
        [("idbloader.img", 32768), ("u-boot.itb", 8 << 20)]
    );
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut sink = sbcflash::write::FileSink::new(file, img.display().to_string()).unwrap();
    place::write_placed(&mut sink, &plan).unwrap();
    drop(sink);
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(
        &bytes[32768..32768 + 200 * 1024],
        &std::fs::read(&idb).unwrap()[..]
    );
    assert_eq!(
        &bytes[8 << 20..(8 << 20) + (1 << 20)],
        &std::fs::read(&itb).unwrap()[..]
    );
    // The partition table and the FAT in partition 1 are intact, and the check now passes.
    let r = check("opi5", None, &img);
    assert!(codes(&r, Severity::Warning).is_empty(), "{:#?}", r.findings);
    assert_eq!(&bytes[(32 << 20) + 3..(32 << 20) + 8], b"mkfs.");
}

#[test]
fn place_refuses_to_overwrite_a_partition() {
    if !require(false, TOOLS) {
        return;
    }
    let dir = tmp();
    let img = make_nixos_like_image(dir.path(), "nixos.img", 48, Table::Mbr);
    // binman's combined image is ~9 MiB: it runs into partition 1 at 8 MiB.
    let combined = random_file(dir.path(), "u-boot-rockchip.bin", 9 << 20, b"RKNS");
    let reg = builtin();
    let b = reg.get("opi5").unwrap();
    let table = parttable::parse(&head(&img)).unwrap();
    let e = place::plan(
        b,
        b.default_medium(),
        &table,
        std::slice::from_ref(&combined),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string().replace(&dir.path().display().to_string(), "DIR"),
        "bootloader placement: DIR/u-boot-rockchip.bin (9437184 bytes at 32 KiB) would overwrite partition 1 of the image (starts at 8 MiB): the image was not laid out for the Orange Pi 5"
    );
    // sunxi: the GPT variant goes to 128 KiB, the MBR one to 8 KiB.
    let spl = random_file(
        dir.path(),
        "u-boot-sunxi-with-spl.bin",
        600 * 1024,
        b"\0\0\0\0eGON.BT0",
    );
    let nezha = reg.get("nezha").unwrap();
    let plan = place::plan(
        nezha,
        nezha.default_medium(),
        &table,
        std::slice::from_ref(&spl),
    )
    .unwrap();
    assert_eq!(plan[0].offset, 8192);
    let gpt = make_nixos_like_image(dir.path(), "gpt.img", 48, Table::Gpt);
    let gtable = parttable::parse(&head(&gpt)).unwrap();
    let plan = place::plan(nezha, nezha.default_medium(), &gtable, &[spl]).unwrap();
    assert_eq!(plan[0].offset, 131072);
    // A board without raw offsets says so.
    let rpi = reg.get("rpi4").unwrap();
    let e = place::plan(rpi, rpi.default_medium(), &table, &[combined]).unwrap_err();
    assert!(
        e.to_string().contains("has no raw bootloader offsets"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// `sbcflash boards check` through the binary, on a compressed image
// ---------------------------------------------------------------------------------------------

#[test]
fn cli_check_compressed_image_warns_and_strict_refuses() {
    if !require(false, &[TOOLS, &["zstd"]].concat()) {
        return;
    }
    let dir = tmp();
    let img = make_nixos_like_image(dir.path(), "nixos.img", 48, Table::Mbr);
    sh(&format!("zstd -q -k {}", img.display()));
    let zst = dir.path().join("nixos.img.zst");
    let out = sbcflash()
        .env("XDG_CONFIG_HOME", dir.path())
        .args(["boards", "check", "opi5"])
        .arg(&zst)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{s}");
    assert!(
        s.contains("warning: first partition starts at 8 MiB, inside the Rockchip bootloader area"),
        "{s}"
    );
    let out = sbcflash()
        .env("XDG_CONFIG_HOME", dir.path())
        .args(["boards", "check", "--strict", "opi5"])
        .arg(&zst)
        .output()
        .unwrap();
    // An image that does not fit the board is inconsistent input (3), not a target rule (4).
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("image does not fit board `opi5`"), "{err}");
    let out = sbcflash()
        .env("XDG_CONFIG_HOME", dir.path())
        .args(["boards", "check", "rpi4"])
        .arg(&zst)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("ok: ") && s.contains("looks bootable on the Raspberry Pi 4 Model B from sd"),
        "{s}"
    );
}

// ---------------------------------------------------------------------------------------------
// The `write --board` hooks (pre-write check, post-write placement), called as `write` does
// ---------------------------------------------------------------------------------------------

fn quiet_global() -> sbcflash::cli::Global {
    sbcflash::cli::Global {
        verbose: 0,
        json: false,
        quiet: true,
        color: sbcflash::cli::ColorChoice::Never,
        boards_dir: vec![],
    }
}

#[test]
fn write_hooks_check_then_place_bootloader_on_a_loop_device() {
    use sbcflash::cli::boards::{after_write, preflight, BoardWriteArgs};
    if !require(true, &[TOOLS, &["losetup"]].concat()) {
        return;
    }
    let dir = tmp();
    let g = quiet_global();
    let img = make_image(dir.path(), "rk.img", 64, MBR_32, 32);
    let idb = random_file(dir.path(), "idbloader.img", 100 * 1024, b"RKNS");
    let itb = random_file(dir.path(), "u-boot.itb", 300 * 1024, b"\xd0\x0d\xfe\xed");
    let args = BoardWriteArgs {
        board: Some("orangepi5".into()),
        bootloader: vec![idb.clone(), itb.clone()],
        strict: true,
        ..Default::default()
    };
    // Without U-Boot in the image, without --bootloader, and --strict: refused before
    // anything is written.
    let no_bl = BoardWriteArgs {
        bootloader: vec![],
        ..args.clone()
    };
    let e = preflight(&no_bl, &img, &g).unwrap_err();
    assert_eq!(sbcflash::cli::classify(&e), sbcflash::exit::Exit::BadInput);
    assert!(format!("{e:#}").contains("no U-Boot in the image"), "{e:#}");

    let args = BoardWriteArgs {
        strict: false,
        ..args
    };
    let pre = preflight(&args, &img, &g).unwrap().expect("board given");
    assert_eq!(pre.board.id(), "opi5");
    assert_eq!(pre.placements.len(), 2);
    // "Write" the image to a real block device, then place the bootloader on it.
    let target = common::LoopDev::new_sparse(dir.path(), "card.img", 64 << 20);
    sh(&format!(
        "dd if={} of={} bs=1M conv=fsync status=none",
        img.display(),
        target.path().display()
    ));
    let policy = sbcflash::target::Policy {
        image_size: None,
        force: false,
        image_paths: vec![],
    };
    let mut job = sbcflash::job::BlockJob::claim(target.path(), &policy, false).unwrap();
    after_write(&pre, &mut job, &g).unwrap();
    drop(job);
    let dev = std::fs::read(target.path()).unwrap();
    assert_eq!(
        &dev[32768..32768 + 100 * 1024],
        &std::fs::read(&idb).unwrap()[..]
    );
    assert_eq!(
        &dev[8 << 20..(8 << 20) + 300 * 1024],
        &std::fs::read(&itb).unwrap()[..]
    );
    let r = check_image(&pre.board, &pre.medium, &dev[..HEAD_LEN]);
    assert!(codes(&r, Severity::Warning).is_empty(), "{:#?}", r.findings);

    // No board, no config: nothing to do.
    let xdg = tmp();
    std::env::set_var("XDG_CONFIG_HOME", xdg.path());
    std::env::remove_var("SBCFLASH_BOARD");
    std::env::remove_var("SBCFLASH_CONFIG");
    assert!(preflight(&BoardWriteArgs::default(), &img, &g)
        .unwrap()
        .is_none());
}

/// `--bootloader` placement runs on the writer's own claim: the target is opened once, with
/// O_EXCL (never reopened without it), and the bootloader files are written and read back with
/// O_DIRECT, so the medium answers the read-back, not the page cache. The page cache is looked
/// at with mincore(2) through a descriptor this test holds open during the write (so the
/// kernel keeps the device's cache after sbcflash closes it): buffered placement would leave
/// the placed pages cached; O_DIRECT leaves none. Failed before the placement moved onto the
/// claimed sink (plain O_RDWR reopen, cached pages).
#[test]
fn cli_bootloader_placement_uses_the_o_excl_claim_and_bypasses_the_page_cache() {
    use std::os::fd::AsRawFd;
    if !require(true, &[TOOLS, &["losetup", "strace"]].concat()) {
        return;
    }
    let dir = tmp();
    let img = make_image(dir.path(), "rk.img", 64, MBR_32, 32);
    let idb = random_file(dir.path(), "idbloader.img", 100 * 1024, b"RKNS");
    let itb = random_file(dir.path(), "u-boot.itb", 300 * 1024, b"\xd0\x0d\xfe\xed");
    let card = common::LoopDev::new_sparse(dir.path(), "card.img", 64 << 20);
    let dev = card.path().to_path_buf();
    let watch = std::fs::File::open(&dev).unwrap();
    let trace = dir.path().join("trace");
    let out = std::process::Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=open,openat", "-o"])
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_sbcflash"))
        .env("XDG_CONFIG_HOME", dir.path())
        .args(["write", "--board", "opi5", "--yes", "--no-verify"])
        .arg("--bootloader")
        .arg(&idb)
        .arg("--bootloader")
        .arg(&itb)
        .arg(&img)
        .arg(&dev)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("placed "), "{err}");

    let quoted = format!("\"{}\"", dev.display());
    let trace = std::fs::read_to_string(&trace).unwrap();
    let writable: Vec<&str> = trace
        .lines()
        .filter(|l| l.contains(&quoted) && (l.contains("O_RDWR") || l.contains("O_WRONLY")))
        .collect();
    assert_eq!(
        writable.len(),
        1,
        "one writable open of {quoted}: {writable:#?}"
    );
    assert!(
        writable[0].contains("O_EXCL") && writable[0].contains("O_DIRECT"),
        "{}",
        writable[0]
    );

    // Not one page of the placed ranges is in the device's page cache.
    let page = 4096usize;
    for (off, len) in [(32768usize, 100 * 1024usize), (8 << 20, 300 * 1024)] {
        let pages = len.div_ceil(page);
        // SAFETY: a read-only shared mapping of an open block device, unmapped below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * page,
                libc::PROT_READ,
                libc::MAP_SHARED,
                watch.as_raw_fd(),
                off as libc::off_t,
            )
        };
        assert_ne!(map, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        let mut resident = vec![0u8; pages];
        // SAFETY: `resident` holds one byte per page of the mapping.
        let r = unsafe { libc::mincore(map, pages * page, resident.as_mut_ptr()) };
        let e = std::io::Error::last_os_error();
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(map, pages * page) };
        assert_eq!(r, 0, "{e}");
        let cached = resident.iter().filter(|b| **b & 1 == 1).count();
        assert_eq!(
            cached, 0,
            "{cached} page(s) at offset {off} came from the page cache"
        );
    }
    // And the medium holds them.
    let bytes = std::fs::read(&card.backing).unwrap();
    assert_eq!(
        &bytes[32768..32768 + 100 * 1024],
        &std::fs::read(&idb).unwrap()[..]
    );
    assert_eq!(
        &bytes[8 << 20..(8 << 20) + 300 * 1024],
        &std::fs::read(&itb).unwrap()[..]
    );
    drop(watch);
}

#[test]
fn cli_write_board_strict_refuses_and_bootloader_is_placed() {
    if !require(false, TOOLS) {
        return;
    }
    let dir = tmp();
    let bad = make_nixos_like_image(dir.path(), "nixos.img", 48, Table::Mbr);
    let out_img = dir.path().join("out.img");
    let out = sbcflash()
        .env("XDG_CONFIG_HOME", dir.path())
        .args(["write", "--board", "opi5", "--strict", "--yes"])
        .arg(&bad)
        .arg(&out_img)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("inside the Rockchip bootloader area"), "{err}");
    assert!(!out_img.exists(), "nothing may be written when refused");

    let img = make_image(dir.path(), "rk.img", 64, MBR_32, 32);
    let idb = random_file(dir.path(), "idbloader.img", 64 * 1024, b"RKNS");
    let itb = random_file(dir.path(), "u-boot.itb", 256 * 1024, b"\xd0\x0d\xfe\xed");
    let out = sbcflash()
        .env("XDG_CONFIG_HOME", dir.path())
        .args(["write", "--board", "opi5", "--strict", "--yes"])
        .arg("--bootloader")
        .arg(&idb)
        .arg("--bootloader")
        .arg(&itb)
        .arg(&img)
        .arg(&out_img)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // The image lacks U-Boot, but --bootloader adds it: --strict is satisfied.
    assert!(out.status.success(), "{err}");
    assert!(err.contains("placed "), "{err}");
    assert!(
        err.contains("--bootloader adds it (idbloader.img at 32 KiB, u-boot.itb at 8 MiB)"),
        "{err}"
    );
    let bytes = std::fs::read(&out_img).unwrap();
    assert_eq!(
        &bytes[32768..32768 + 64 * 1024],
        &std::fs::read(&idb).unwrap()[..]
    );
    assert_eq!(
        &bytes[8 << 20..(8 << 20) + 256 * 1024],
        &std::fs::read(&itb).unwrap()[..]
    );
    assert_eq!(&bytes[..512], &std::fs::read(&img).unwrap()[..512]);
}

/// An image from a pipe (`zstd -dc x.zst | sbcflash write --board opi5 /dev/stdin ...`) is
/// checked on its head, peeked from the stream: --strict refuses before a byte is written,
/// and without it the warning is printed and the whole stream still reaches the target.
#[test]
fn cli_write_from_a_pipe_is_checked_against_the_board() {
    if !require(false, &["sfdisk", "mkfs.vfat", "mkfs.ext4", "zstd"]) {
        return;
    }
    let dir = tmp();
    let img = make_nixos_like_image(dir.path(), "nixos.img", 48, Table::Mbr);
    let zst = dir.path().join("nixos.img.zst");
    sh(&format!(
        "zstd -q -c '{}' > '{}'",
        img.display(),
        zst.display()
    ));
    let out_img = dir.path().join("out.img");
    let piped_write = |input: &Path, extra: &[&str]| {
        let mut cat = std::process::Command::new("cat")
            .arg(input)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = sbcflash()
            .env("XDG_CONFIG_HOME", dir.path())
            .args(["write", "--board", "opi5", "--yes", "/dev/stdin"])
            .arg(&out_img)
            .args(extra)
            .stdin(cat.stdout.take().unwrap())
            .output()
            .unwrap();
        let _ = cat.wait();
        out
    };
    let out = piped_write(&img, &["--strict"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("inside the Rockchip bootloader area"), "{err}");
    assert!(!out_img.exists(), "nothing may be written when refused");

    let out = piped_write(&zst, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: first partition starts at 8 MiB"),
        "{err}"
    );
    assert!(!err.contains("not a regular file"), "{err}");
    assert!(
        std::fs::read(&out_img).unwrap() == std::fs::read(&img).unwrap(),
        "the whole piped image reached the target"
    );
}
