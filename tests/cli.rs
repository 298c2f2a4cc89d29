//! The CLI contract, checked from the clap definitions and from the outside: every command's
//! help has examples that parse and the exit codes; colour and progress follow `NO_COLOR`,
//! `--color` and whether the output is a terminal; results go to stdout, everything else to
//! stderr; every `--json` line matches the schema documented in docs/json.md.

mod common;

use common::sbcflash;
use sbcflash::cli::help;

/// Every command in the decorated tree the binary parses with, with its path (root first).
fn all_commands() -> Vec<(Vec<String>, clap::Command)> {
    fn walk(cmd: &clap::Command, path: &[String], out: &mut Vec<(Vec<String>, clap::Command)>) {
        out.push((path.to_vec(), cmd.clone()));
        for sub in cmd.get_subcommands() {
            if sub.get_name() == "help" || sub.is_hide_set() {
                continue;
            }
            let mut p = path.to_vec();
            p.push(sub.get_name().to_string());
            walk(sub, &p, out);
        }
    }
    let mut out = Vec::new();
    let mut root = help::command();
    root.build();
    walk(&root, &[], &mut out);
    out
}

#[test]
fn every_command_help_has_examples_that_parse_and_the_exit_codes() {
    let all = all_commands();
    assert!(all.len() > 30, "only {} commands found", all.len());
    let mut problems = Vec::new();
    for (path, mut cmd) in all {
        let name = format!("sbcflash {}", path.join(" "));
        let long = cmd.render_long_help().to_string();
        let short = cmd.render_help().to_string();
        if !short.contains(help::EXAMPLES) {
            problems.push(format!("`{name} -h` has no examples"));
        }
        if !long.contains("Exit codes:") {
            problems.push(format!("`{name} --help` has no exit codes"));
        }
        for (code, _) in sbcflash::exit::Exit::TABLE {
            if !long.contains(&format!(" {} ", code.code())) {
                problems.push(format!("`{name} --help` lacks exit code {code}"));
            }
        }
        let examples = help::example_lines(&long);
        if examples.is_empty() {
            problems.push(format!("`{name} --help` has no example lines"));
        }
        for ex in examples {
            let words = help::shell_words(&ex).expect("example_lines only returns commands");
            match help::command().try_get_matches_from(&words) {
                Err(e) => problems.push(format!(
                    "example under `{name}` does not parse: {ex}\n{}",
                    e.render()
                )),
                Ok(_) => {
                    let got = help::example_path(&ex).unwrap_or_default();
                    if !got.starts_with(&path) {
                        problems.push(format!(
                            "example under `{name}` runs `sbcflash {}`: {ex}",
                            got.join(" ")
                        ));
                    }
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn nested_help_from_the_binary_shows_examples_and_exit_codes() {
    for args in [
        &["cache", "list", "--help"][..],
        &["station", "report", "--help"],
        &["help", "config", "show"],
    ] {
        let o = sbcflash().args(args).output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{args:?}: {o:?}");
        assert!(out.contains("Examples:\n  sbcflash "), "{args:?}:\n{out}");
        assert!(out.contains("Exit codes:"), "{args:?}:\n{out}");
        assert!(o.stderr.is_empty(), "{args:?}: {o:?}");
    }
}
