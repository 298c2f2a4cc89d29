//! The README is true: every `sbcflash` command it shows is run here, as written, against real
//! things (a NixOS-like image made by sfdisk/mkfs/zstd, a loop device for `/dev/sdX`, an HTTPS
//! server on 127.0.0.1 for downloads, a pseudo-terminal that answers the question), or is listed
//! with the hardware it needs. Every other command must succeed as written, a new one included.

mod acquire_server;
mod common;

use acquire_server::{Behavior, TestServer};
use common::{require, LoopDev};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

/// Commands that need hardware this test cannot have, and where they are tested instead.
const NEEDS_HARDWARE: &[(&str, &str)] = &[
    (
        "sbcflash bootstrap --board opi5 --port /dev/ttyUSB0 --flake .#opi5-lab",
        "an Orange Pi 5 on a USB-serial cable (tests/console.rs bootstraps QEMU boards)",
    ),
    (
        "sbcflash fel ...",
        "an Allwinner board in FEL mode (tests/usb.rs: a simulated FEL device)",
    ),
    (
        "sbcflash fel",
        "an Allwinner board in FEL mode (tests/usb.rs: a simulated FEL device)",
    ),
    (
        "sbcflash read --via maskrom --loader rk3588_spl_loader.bin --storage emmc my-board",
        "a Rockchip board in maskrom on USB (tests/capture_usb.rs: the simulated rockusb board)",
    ),
    (
        "sbcflash station --config station.toml",
        "card readers in the configured slots, runs until stopped (tests/station.rs: udevd + loop devices)",
    ),
];

/// The `sbcflash ...` commands of the README: lines of its ```sh blocks (comments dropped) and
/// inline code spans, each once, in order.
fn readme_commands() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let mut out: Vec<String> = Vec::new();
    let mut fenced = false;
    let mut push = |c: &str| {
        let c = c.split_whitespace().collect::<Vec<_>>().join(" ");
        if !out.contains(&c) {
            out.push(c);
        }
    };
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            let cmd = line.split(" #").next().unwrap_or_default().trim();
            if cmd.starts_with("sbcflash ") {
                push(cmd);
            }
            continue;
        }
        for span in line.split('`').skip(1).step_by(2) {
            if span.starts_with("sbcflash ") {
                push(span);
            }
        }
    }
    out
}

/// One README command as the user types it, `/dev/sdX` and the placeholders replaced.
struct Ctx {
    dir: PathBuf,
    dev: String,
    config: PathBuf,
    ca_file: PathBuf,
    url: String,
    boot_image: PathBuf,
}

impl Ctx {
    /// The command's words with the README's placeholders replaced by this test's things.
    fn words(&self, cmd: &str) -> Vec<String> {
        cmd.split_whitespace()
            .skip(1)
            .map(|w| match w {
                "/dev/sdX" => self.dev.clone(),
                "IMAGE" => "nixos-sd-image.img.zst".to_string(),
                "ID" => "rpi4".to_string(),
                "DIR" => self.dir.join("man").display().to_string(),
                "https://…/image.img.zst" => self.url.clone(),
                // `try`'s example: the harness's bootable image (real U-Boot, kernel, busybox).
                "sdcard.img" => self.boot_image.display().to_string(),
                w => w.to_string(),
            })
            .collect()
    }

    /// An isolated user: its own config (mirroring hydra.nixos.org to the local server), cache,
    /// state and home.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.current_dir(&self.dir)
            .env("HOME", self.dir.join("home"))
            .env("XDG_CONFIG_HOME", self.dir.join("home/.config"))
            .env("XDG_CACHE_HOME", self.dir.join("home/.cache"))
            .env("XDG_STATE_HOME", self.dir.join("home/.local/state"))
            .env("SBCFLASH_CONFIG", &self.config)
            .env_remove("SBCFLASH_CACHE_DIR")
            .env_remove("SBCFLASH_BOARD")
            .env("NO_COLOR", "1");
        c
    }

    /// Runs it with no terminal.
    fn run(&self, words: &[String]) -> Output {
        self.command(env!("CARGO_BIN_EXE_sbcflash"))
            .args(words)
            .stdin(Stdio::null())
            .output()
            .expect("run sbcflash")
    }

    /// Runs it on a pseudo-terminal (util-linux `script`) and answers its question with `yes`,
    /// as the user at the keyboard does.
    fn run_answering_yes(&self, words: &[String]) -> Output {
        let line = std::iter::once(env!("CARGO_BIN_EXE_sbcflash").to_string())
            .chain(words.iter().cloned())
            .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = self
            .command("script")
            .args(["-q", "-e", "-c", &line, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn script");
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"yes\n").expect("answer");
        // Keep the terminal open until the command is done (EOF would end `script` early).
        let out = child.wait_with_output().expect("wait for script");
        drop(stdin);
        out
    }
}

fn show(cmd: &str, o: &Output) -> String {
    format!(
        "`{cmd}`: status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn every_readme_command_that_needs_no_hardware_works_as_shown() {
    let mut tools = vec!["losetup", "zstd", "script", "minisign"];
    tools.extend_from_slice(common::IMAGE_TOOLS);
    let try_tools = common::try_tools("aarch64");
    tools.extend(try_tools.iter().map(String::as_str));
    if !require(true, &tools) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("home/.config")).unwrap();
    let img = common::make_nixos_like_image(&dir, "nixos-sd-image.img", 64, common::Table::Mbr);
    common::run(Command::new("zstd").args(["-q", "-f"]).arg(&img));
    let zst = std::fs::read(dir.join("nixos-sd-image.img.zst")).unwrap();
    // The README's "Trust" section: the publisher's minisign key and signature, as it shows.
    common::sh(&format!(
        "cd '{}' && minisign -G -W -p minisign.pub -s minisign.key >/dev/null && minisign -S -s minisign.key -m nixos-sd-image.img.zst >/dev/null",
        dir.display()
    ));
    let lo = LoopDev::new_sparse(&dir, "card.img", 128 << 20);

    // The boards' default download (hydra.nixos.org) and an https:// image, both served on
    // 127.0.0.1 through the config file's mirror rewrite, the way a lab mirror is set up.
    let srv = TestServer::start(&dir);
    let hydra_path = "/job/nixos/trunk-combined/nixos.sd_image.aarch64-linux/latest/download-by-type/file/sd-image";
    srv.add(hydra_path, Arc::new(zst.clone()), Behavior::Normal);
    srv.add("/image.img.zst", Arc::new(zst), Behavior::Normal);
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[[mirrors]]\nprefix = \"https://hydra.nixos.org/\"\nreplace = \"{}\"\n",
            srv.url("/")
        ),
    )
    .unwrap();
    // What a station run leaves for `station report`: a ledger at the default place with one
    // finished unit (the station itself needs card readers; tests/station.rs runs it).
    {
        let path = dir.join("home/.local/state/sbcflash/ledger.sqlite");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        common::ledger_with_one_passed_unit(&path);
    }
    let ctx = Ctx {
        dev: lo.path().display().to_string(),
        url: srv.url("/image.img.zst"),
        ca_file: srv.ca_file.clone(),
        config,
        dir,
        boot_image: common::harness_image(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), &[]),
    };

    let cmds = readme_commands();
    assert!(cmds.len() > 15, "README commands not found: {cmds:?}");
    let mut ran = Vec::new();
    for cmd in &cmds {
        if NEEDS_HARDWARE.iter().any(|(c, _)| c == cmd) {
            continue;
        }
        let words = ctx.words(cmd);
        let w: Vec<&str> = words.iter().map(String::as_str).collect();
        let o = match w.as_slice() {
            // Writes to a disk ask first: answered on a terminal. Downloads trust the test CA.
            ["write", ..] => {
                let mut words = words.clone();
                words.push("--ca-file".into());
                words.push(ctx.ca_file.display().to_string());
                let o = ctx.run_answering_yes(&words);
                let text = String::from_utf8_lossy(&o.stdout);
                assert!(
                    text.contains("Type 'yes'"),
                    "did not ask: {}",
                    show(cmd, &o)
                );
                o
            }
            // The card check writes probe blocks: it asks first, like write.
            ["check-card", ..] => {
                let o = ctx.run_answering_yes(&words);
                let text = String::from_utf8_lossy(&o.stdout);
                assert!(
                    text.contains("Type 'yes'") && text.contains("read back as written"),
                    "{}",
                    show(cmd, &o)
                );
                o
            }
            // The pipe into `sudo tee /etc/...` installs what this prints: the shipped rules.
            ["usb", "udev-rules", "|", ..] => {
                let o = ctx.run(&words[..2]);
                let shipped = std::fs::read_to_string(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/udev-rules/70-sbcflash.rules"
                ))
                .unwrap();
                assert_eq!(String::from_utf8_lossy(&o.stdout), shipped, "{cmd}");
                o
            }
            // A reader that closes the pipe early (the README's `boards | head -1`): a real
            // shell pipe; with pipefail the status is sbcflash's, and it must say nothing.
            [sub @ .., "|", "head", "-1"] => {
                let line = std::iter::once(env!("CARGO_BIN_EXE_sbcflash"))
                    .chain(sub.iter().copied())
                    .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
                    .collect::<Vec<_>>()
                    .join(" ");
                let o = ctx
                    .command("bash")
                    .args(["-o", "pipefail", "-c", &format!("{line} | head -1")])
                    .stdin(Stdio::null())
                    .output()
                    .expect("run bash");
                assert!(o.stderr.is_empty(), "{}", show(cmd, &o));
                assert_eq!(
                    String::from_utf8_lossy(&o.stdout).lines().count(),
                    1,
                    "{}",
                    show(cmd, &o)
                );
                o
            }
            ["completions", shells] => {
                for shell in shells.split('|') {
                    let o = ctx.run(&["completions".to_string(), shell.to_string()]);
                    assert!(
                        o.status.success() && !o.stdout.is_empty(),
                        "{}",
                        show(cmd, &o)
                    );
                }
                ran.push(cmd.clone());
                continue;
            }
            _ => ctx.run(&words),
        };
        assert_eq!(o.status.code(), Some(0), "{}", show(cmd, &o));
        ran.push(cmd.clone());
    }
    // Whatever was written last, the card holds the image the README verifies it against.
    common::assert_same_prefix(&img, lo.path(), 64 << 20);
    for (c, why) in NEEDS_HARDWARE {
        if cmds.contains(&c.to_string()) {
            eprintln!("not run (needs {why}): {c}");
        }
    }
    eprintln!("ran {} README commands: {ran:#?}", ran.len());
}

/// The table of commands that are not run names only commands the README has.
#[test]
fn the_hardware_list_names_only_readme_commands() {
    let cmds = readme_commands();
    for (c, _) in NEEDS_HARDWARE {
        assert!(
            cmds.contains(&c.to_string()),
            "`{c}` is no longer in the README; drop it from NEEDS_HARDWARE"
        );
    }
}

/// Writing with a board but no image takes the board's default download; a board without one
/// is refused with what to do instead and which boards have one (before a byte is written).
#[test]
fn a_board_without_a_default_download_says_which_boards_have_one() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out.img");
    let o = common::sbcflash()
        .args(["write", "--board", "opi5"])
        .arg(&target)
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .env("XDG_CACHE_HOME", dir.path().join("cache"))
        .env_remove("SBCFLASH_CONFIG")
        .env_remove("SBCFLASH_BOARD")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    for want in [
        "board opi5 has no default image to download",
        "github:gnull/nixos-rk3588",
        "boards with a default download: cm4, rpi4",
    ] {
        assert!(err.contains(want), "missing {want:?} in: {err}");
    }
    assert!(!target.exists(), "the target was created");
}
