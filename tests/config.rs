//! config.toml values are checked when the file is read, and a bad one is named by file, key and
//! line (as a syntax error is), by every command: `config show` as much as `write`.

mod common;

use common::sbcflash;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// `sbcflash ARGS` for a user whose config file is `config` (no other config, no env board).
fn with_config(home: &Path, config: &Path, args: &[&str]) -> Command {
    let mut c = sbcflash();
    c.args(args)
        .current_dir(home)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("xdg-config"))
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("SBCFLASH_CONFIG", config)
        .env_remove("SBCFLASH_BOARD")
        .env_remove("SBCFLASH_CACHE_DIR")
        .stdin(Stdio::null());
    c
}

fn out(c: &mut Command) -> (Option<i32>, String) {
    let o: Output = c.output().expect("run sbcflash");
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn an_unknown_default_board_is_named_by_file_key_and_line() {
    if !common::require(false, common::IMAGE_TOOLS) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("config.toml");
    std::fs::write(&cfg, "# lab defaults\n\ndefault-board = \"rpi3\"\n").unwrap();
    common::make_nixos_like_image(d.path(), "a.img", 40, common::Table::Mbr);
    let at = format!(
        "{}:3:17: default-board = \"rpi3\": unknown board `rpi3`",
        cfg.display()
    );
    for args in [
        &["config", "show"][..],
        &["--json", "config", "show"],
        &["write", "a.img", "out.img", "--yes"],
        &["boards", "check", "rpi4", "a.img"],
    ] {
        let (code, text) = out(&mut with_config(d.path(), &cfg, args));
        assert_eq!(code, Some(3), "{args:?}: {text}");
        assert!(text.contains(&at), "{args:?}: missing {at:?} in {text}");
        assert!(text.contains("`rpi4`"), "{args:?}: no suggestion: {text}");
    }
    assert!(!d.path().join("out.img").exists(), "write went ahead");

    // The environment variable is named the same way.
    let ok = d.path().join("ok.toml");
    std::fs::write(&ok, "").unwrap();
    let (code, text) =
        out(with_config(d.path(), &ok, &["config", "show"]).env("SBCFLASH_BOARD", "rpi3"));
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains("$SBCFLASH_BOARD: \"rpi3\": unknown board `rpi3`"),
        "{text}"
    );
}

#[test]
fn a_default_board_from_the_configs_own_boards_dir_is_valid() {
    let d = tempfile::tempdir().unwrap();
    let boards = d.path().join("boards");
    std::fs::create_dir_all(&boards).unwrap();
    let rpi4 =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/boards/rpi4.toml")).unwrap();
    let rpi3 = rpi4
        .replace("id = \"rpi4\"", "id = \"rpi3\"")
        .lines()
        .map(|l| {
            if l.starts_with("aliases") {
                "aliases = []"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(boards.join("rpi3.toml"), rpi3).unwrap();
    let cfg = d.path().join("config.toml");
    std::fs::write(
        &cfg,
        "default-board = \"rpi3\"\nboards-dirs = [\"boards\"]\n",
    )
    .unwrap();
    let (code, text) = out(&mut with_config(d.path(), &cfg, &["config", "show"]));
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("default-board = \"rpi3\""), "{text}");
}

#[test]
fn other_bad_values_are_named_by_file_key_and_line() {
    let d = tempfile::tempdir().unwrap();
    let cases = [
        (
            "cache-dir = \"/tmp\"\nboards-dirs = [\"no-such-dir\"]\n",
            "config.toml:2:15: boards-dirs: ",
            "no-such-dir is not a directory",
        ),
        (
            "\n[[mirrors]]\nprefix = \"hydra.nixos.org\"\nreplace = \"https://mirror.lab/\"\n",
            "config.toml:2:1: mirrors: ",
            "must be http(s):// URLs",
        ),
    ];
    for (toml, at, what) in cases {
        let cfg = d.path().join("config.toml");
        std::fs::write(&cfg, toml).unwrap();
        let (code, text) = out(&mut with_config(d.path(), &cfg, &["config", "show"]));
        assert_eq!(code, Some(3), "{toml}: {text}");
        assert!(
            text.contains(at) && text.contains(what),
            "{toml}: missing {at:?} / {what:?} in {text}"
        );
    }
}
