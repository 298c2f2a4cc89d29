//! The CLI contract, checked from the clap definitions and from the outside: every command's
//! help has examples that parse and the exit codes; colour and progress follow `NO_COLOR`,
//! `--color` and whether the output is a terminal; results go to stdout, everything else to
//! stderr; every `--json` line matches the schema documented in docs/json.md.

mod common;

use common::json::{match_row, schema_rows};
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

/// The binary with a clean environment: no colour variables, no user config or cache.
fn tool(home: &std::path::Path) -> std::process::Command {
    let mut c = sbcflash();
    for v in [
        "NO_COLOR",
        "CLICOLOR",
        "CLICOLOR_FORCE",
        "RUST_LOG",
        "SBCFLASH_CONFIG",
    ] {
        c.env_remove(v);
    }
    c.env("TERM", "xterm")
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_CACHE_HOME", home.join("cache"))
        .stdin(std::process::Stdio::null());
    c
}

/// Runs the binary on a pseudo-terminal (util-linux `script`): stdout and stderr are both the
/// terminal, so what comes back is everything a user would see. Returns (output, exit code).
fn on_pty(home: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> (String, i32) {
    let quoted: Vec<String> = std::iter::once(env!("CARGO_BIN_EXE_sbcflash"))
        .chain(args.iter().copied())
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect();
    let mut c = std::process::Command::new("script");
    c.args(["-q", "-e", "-c", &quoted.join(" "), "/dev/null"]);
    // `tool` only for its environment: copy it onto `script`, which passes it on.
    let t = tool(home);
    for (k, v) in t.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.stdin(std::process::Stdio::null()).output().unwrap();
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        o.status.code().unwrap_or(-1),
    )
}

/// SGR sequences (colours, bold): what NO_COLOR forbids. Cursor movement is not colour.
fn has_sgr(s: &str) -> bool {
    regex::Regex::new(r"\x1b\[[0-9;]*m").unwrap().is_match(s)
}

/// An 8 MiB disk image: an MBR with one FAT32 (0x0c) partition from 1 MiB to the end, filled
/// with a pattern (the writer refuses sources that are not disk images).
fn small_image(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("small.img");
    let mut data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    data[..512].fill(0);
    let entry = &mut data[446..462];
    entry[4] = 0x0c;
    entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
    entry[12..16].copy_from_slice(&(14u32 * 1024).to_le_bytes());
    data[510..512].copy_from_slice(&[0x55, 0xAA]);
    std::fs::write(&p, data).unwrap();
    p
}

#[test]
fn on_a_terminal_progress_shows_and_colour_follows_no_color_and_color_flag() {
    if !common::require(false, &["script"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = small_image(dir.path());
    let img = img.to_str().unwrap();
    let write = |n: usize, env: &[(&str, &str)], extra: &[&str]| {
        let out = dir.path().join(format!("out{n}.img"));
        let mut args = extra.to_vec();
        args.extend(["write", img, out.to_str().unwrap(), "--yes"]);
        let (text, code) = on_pty(dir.path(), env, &args);
        assert_eq!(code, 0, "{args:?}: {text}");
        assert!(
            text.contains("MiB"),
            "no progress bar on a terminal: {text:?}"
        );
        text
    };
    // The control: bars are styled by default, so the checks below can see colour.
    assert!(has_sgr(&write(0, &[], &[])), "no styling to detect");
    assert!(!has_sgr(&write(1, &[("NO_COLOR", "1")], &[])));
    assert!(!has_sgr(&write(2, &[], &["--color", "never"])));
    assert!(!has_sgr(&write(3, &[], &["--color=never"])));

    // An existing non-empty file is destroyed like a disk: on a terminal it is shown and the
    // user asked (no answer here: refused, the file unchanged).
    let notes = dir.path().join("notes.bin");
    let noise: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&notes, &noise).unwrap();
    let (text, code) = on_pty(dir.path(), &[], &["write", img, notes.to_str().unwrap()]);
    assert_eq!(code, 4, "{text}");
    assert!(
        text.contains("About to OVERWRITE the existing file") && text.contains("Type 'yes'"),
        "{text}"
    );
    assert_eq!(std::fs::read(&notes).unwrap(), noise);

    let (help, _) = on_pty(dir.path(), &[], &["cache", "list", "--help"]);
    assert!(has_sgr(&help), "clap styles help on a terminal: {help:?}");
    for (env, args) in [
        (&[("NO_COLOR", "1")][..], &["cache", "list", "--help"][..]),
        (&[], &["--color", "never", "cache", "list", "--help"]),
        (&[], &["--color", "never", "--bogus"]),
    ] {
        let (text, _) = on_pty(dir.path(), env, args);
        assert!(text.contains("sbcflash"), "{args:?}: {text}");
        assert!(!has_sgr(&text), "{env:?} {args:?}: {text:?}");
    }
}

struct Run {
    stdout: String,
    stderr: String,
    code: i32,
}

fn piped(home: &std::path::Path, args: &[&str]) -> Run {
    let o = tool(home).args(args).output().unwrap();
    Run {
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        code: o.status.code().unwrap_or(-1),
    }
}

#[test]
fn piped_results_go_to_stdout_alone_and_progress_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let img = small_image(dir.path());
    let img = img.to_str().unwrap();
    let h = dir.path();
    let no_noise = |r: &Run, what: &str| {
        assert_eq!(r.code, 0, "{what}: {}", r.stderr);
        for s in [&r.stdout, &r.stderr] {
            assert!(!s.contains('\x1b') && !s.contains('\r'), "{what}: {s:?}");
        }
    };

    let r = piped(h, &["hash", img]);
    no_noise(&r, "hash");
    assert!(r.stderr.is_empty(), "hash: {}", r.stderr);
    // b3sum's sidecar format: the file name, so the line still checks after a move.
    let want = format!(
        "{}  small.img\n",
        blake3::hash(&std::fs::read(img).unwrap()).to_hex()
    );
    assert_eq!(r.stdout, want);

    // Even with --color always: colour on a pipe when asked, but never progress.
    let out = dir.path().join("out.img");
    let r = piped(
        h,
        &[
            "--color",
            "always",
            "write",
            img,
            out.to_str().unwrap(),
            "--yes",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        !r.stderr.contains('\r') && !r.stderr.contains("MiB/s"),
        "{:?}",
        r.stderr
    );
    assert_eq!(
        r.stdout.lines().count(),
        1,
        "one summary line: {:?}",
        r.stdout
    );
    // -q silences progress and notes, never the result on stdout.
    let out_q = dir.path().join("out-q.img");
    let r = piped(h, &["-q", "write", img, out_q.to_str().unwrap(), "--yes"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.is_empty(), "-q: {}", r.stderr);
    assert!(
        r.stdout.contains("read back verified"),
        "-q: {:?}",
        r.stdout
    );
    let r = piped(h, &["-q", "verify", img, out_q.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("matches"), "-q verify: {:?}", r.stdout);

    for args in [
        &["boards", "list"][..],
        &["boards", "show", "opi5"],
        &["config", "show"],
        &["usb", "udev-rules"],
    ] {
        let r = piped(h, args);
        no_noise(&r, &args.join(" "));
        assert!(r.stderr.is_empty(), "{args:?}: {}", r.stderr);
        assert!(!r.stdout.is_empty(), "{args:?}");
    }
    for args in [
        &["--json", "list", "--all"][..],
        &["--json", "boards", "list"],
        &["--json", "boards", "show", "rpi4"],
        &["--json", "config", "show"],
        &["--json", "config", "path"],
    ] {
        let r = piped(h, args);
        no_noise(&r, &args.join(" "));
        assert!(r.stderr.is_empty(), "{args:?}: {}", r.stderr);
        assert_eq!(r.stdout.lines().count(), 1, "{args:?}: {}", r.stdout);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(v["schema"], 1, "{args:?}: {v}");
    }
    // `hash` is a long operation: progress events, then the result line last.
    let r = piped(h, &["--json", "hash", img]);
    no_noise(&r, "--json hash");
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    let last: serde_json::Value =
        serde_json::from_str(r.stdout.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(last["event"], "result", "{}", r.stdout);
    assert!(r.stdout.contains(r#""phase":"hash""#), "{}", r.stdout);
    // An empty cache: nothing on stdout (a script sees no entries), the note on stderr.
    let r = piped(h, &["cache", "list"]);
    no_noise(&r, "cache list");
    assert_eq!(r.stdout, "");
    assert!(r.stderr.contains("is empty"), "{}", r.stderr);
    let r = piped(h, &["--json", "cache", "list"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, ""), "{}", r.stderr);
}

#[test]
fn errors_go_to_stderr_with_the_documented_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let h = dir.path();
    let missing = h.join("missing.img");
    let missing = missing.to_str().unwrap();
    let garbage = h.join("garbage.img.zst");
    std::fs::write(&garbage, b"\x28\xb5\x2f\xfdnot really zstd").unwrap();
    let bad_cfg = h.join("bad.toml");
    std::fs::write(&bad_cfg, "cache-dir = [\n").unwrap();
    let cases: &[(&[&str], u8, &str)] = &[
        (&["--color", "bogus", "list"], 2, "invalid value 'bogus'"),
        (&["write"], 2, "required"),
        (&["hash", missing], 5, missing),
        (&["hash", garbage.to_str().unwrap()], 3, "garbage.img.zst"),
        (
            &["config", "show", "--config-file", bad_cfg.to_str().unwrap()],
            3,
            "bad.toml",
        ),
    ];
    for (args, code, needle) in cases {
        let r = piped(h, args);
        assert_eq!(r.code, i32::from(*code), "{args:?}: {}", r.stderr);
        assert_eq!(r.stdout, "", "{args:?}: results only on stdout");
        assert!(r.stderr.contains(needle), "{args:?}: {}", r.stderr);
        assert!(!r.stderr.contains('\x1b'), "{args:?}: {:?}", r.stderr);
        // A cause is named once, not once per layer that quoted it.
        let first = r.stderr.lines().next().unwrap_or_default();
        for part in first.split(": ").filter(|p| p.len() > 12) {
            assert_eq!(first.matches(part).count(), 1, "{args:?}: {first}");
        }
        // With --json, the same error is also a JSON line on stdout (clap's usage errors
        // happen before --json is known, so they stay plain).
        if *code != 2 {
            let mut j = vec!["--json"];
            j.extend_from_slice(args);
            let r = piped(h, &j);
            assert_eq!(r.code, i32::from(*code));
            // Progress events may come first; the error is the last line.
            let last = r.stdout.lines().last().unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(last).unwrap();
            assert_eq!(v["event"], "error");
            assert_eq!(v["exit_code"], *code);
            assert!(r.stderr.starts_with("error: "), "{}", r.stderr);
        }
    }
}

/// A `Write` whose bytes the test can read after the reporter is done with it.
#[derive(Clone, Default)]
struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
impl std::io::Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One of every progress event; the match makes a new variant a compile error here.
fn every_progress_event() -> Vec<sbcflash::progress::Event> {
    use sbcflash::progress::{Event, Level, Phase};
    let (job, phase) = ("/dev/sdz".to_string(), Phase::Write);
    let all = vec![
        Event::Start {
            job: job.clone(),
            phase,
            total: Some(1 << 20),
            detail: None,
        },
        Event::Progress {
            job: job.clone(),
            phase,
            done: 1 << 20,
            total: Some(1 << 20),
        },
        Event::Message {
            job: job.clone(),
            level: Level::Warn,
            text: "careful".into(),
        },
        Event::Finish {
            job: job.clone(),
            phase,
            summary: serde_json::json!({"bytes": 1}),
        },
        Event::Error {
            job,
            phase,
            message: "boom".into(),
            exit_code: 5,
        },
    ];
    for e in &all {
        match e {
            Event::Start { .. }
            | Event::Progress { .. }
            | Event::Message { .. }
            | Event::Finish { .. }
            | Event::Error { .. } => {}
        }
    }
    all
}

#[test]
fn json_lines_match_the_documented_schema() {
    let rows = schema_rows();
    let dir = tempfile::tempdir().unwrap();
    let h = dir.path();
    let mut problems = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut check = |what: &str, text: &str| -> Vec<String> {
        let mut events = Vec::new();
        for line in text.lines() {
            match match_row(&rows, line) {
                Ok(i) => {
                    seen.insert(i);
                    events.push(rows[i].event.clone());
                }
                Err(e) => problems.push(format!("{what}: {e}")),
            }
        }
        events
    };

    // Every event kind the progress reporter can emit, through the real JSON writer.
    let buf = Shared::default();
    let json = sbcflash::progress::JsonLines::new(Box::new(buf.clone()));
    for ev in every_progress_event() {
        sbcflash::progress::Reporter::report(&json, ev);
    }
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert_eq!(text.lines().count(), 5, "{text}");
    check("progress::JsonLines", &text);

    // The writer, end to end: a file target, then verify it.
    let img = small_image(h);
    let img = img.to_str().unwrap();
    let out = h.join("out.img");
    let out = out.to_str().unwrap();
    let r = piped(h, &["--json", "write", img, out, "--yes"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let kinds = check("write", &r.stdout);
    for k in ["message", "start", "progress", "finish", "result"] {
        assert!(
            kinds.iter().any(|e| e == k),
            "write emitted no `{k}`: {kinds:?}"
        );
    }
    assert_eq!(kinds.last().map(String::as_str), Some("result"));

    // A cache with one entry in it.
    let cache_dir = h.join("cache-dir");
    let cache = sbcflash::acquire::cache::Cache::open(&cache_dir).unwrap();
    cache
        .ingest(
            &mut std::fs::File::open(img).unwrap(),
            true,
            Default::default(),
            &|_| Ok(()),
        )
        .unwrap();
    let cache_dir = cache_dir.to_str().unwrap();
    let man_dir = h.join("man");
    let man_dir = man_dir.to_str().unwrap();
    let missing = h.join("missing.img");
    let missing = missing.to_str().unwrap();
    let capture = h.join("capture");
    let capture = capture.to_str().unwrap();
    // A station ledger with one finished unit.
    let ledger = h.join("ledger.sqlite");
    common::ledger_with_one_passed_unit(&ledger);
    let ledger = ledger.to_str().unwrap();
    // A station whose one slot matches no disk: its plan names the next unit.
    let station_cfg = h.join("station.toml");
    std::fs::write(
        &station_cfg,
        format!(
            "board = \"rpi4\"\nledger = \"st-ledger.sqlite\"\nimage = \"{img}\"\n[identity]\nserial = \"U-{{seq:05}}\"\nhostname = \"{{serial_lower}}\"\n[[slot]]\nname = \"s1\"\nmatch = {{ \"attr:loop/backing_file\" = \"/nonexistent/card\" }}\n"
        ),
    )
    .unwrap();
    let station_cfg = station_cfg.to_str().unwrap();

    for (args, code) in [
        (&["station", "report", "--ledger", ledger][..], 0),
        (&["station", "--dry-run", "--config", station_cfg], 0),
        (&["verify", img, out][..], 0),
        (&["hash", img], 0),
        (&["list", "--all"], 0),
        (&["boards", "list"], 0),
        (&["boards", "show", "opi5"], 0),
        (&["boards", "check", "rpi4", img], 0),
        (&["cache", "list", "--cache-dir", cache_dir], 0),
        (&["config", "show"], 0),
        (&["config", "path"], 0),
        (&["man", "--out-dir", man_dir], 0),
        (&["usb", "list"], 0),
        (&["hash", missing], 5),
        (&["read", out, capture], 0),
        (&["check-card", "--yes", "--probes", "16", out], 0),
    ] {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let r = piped(h, &a);
        assert_eq!(r.code, code, "{a:?}: {}", r.stderr);
        assert!(!r.stdout.is_empty(), "{a:?} printed nothing");
        check(&args.join(" "), &r.stdout);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    let unseen: Vec<String> = rows
        .iter()
        .enumerate()
        .filter(|(i, _)| !seen.contains(i))
        .map(|(_, r)| format!("{} ({})", r.event, r.by))
        .collect();
    // What needs hardware or root (USB devices, a station, a board's serial console) is
    // covered by those suites' own tests of the same lines; everything else is seen here.
    // A central ledger's rows and `station status` need a PostgreSQL server (tests/station_pg.rs
    // checks those lines against this table).
    let need_more = [
        "bootloader-placed",
        "fel-version",
        "serial-load",
        "result",
        "ledger-row",
        "station-status",
    ];
    for u in &unseen {
        assert!(
            need_more.iter().any(|n| u.starts_with(&format!("{n} "))),
            "documented but not emitted by any command run here: {u}"
        );
    }
    eprintln!("documented events not exercised here: {unseen:?}");
}

#[test]
fn a_reader_that_closes_stdout_early_is_not_an_error() {
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("small.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let img = img.to_str().unwrap();
    for args in [
        &["usb", "udev-rules"][..],
        &["boards", "list"],
        &["boards", "list", "--json"],
        &["config", "example"],
        &["--help"],
        &["man"],
        &["completions", "bash"],
        &["hash", img],
        &["hash", "--json", img],
    ] {
        // A pipe whose read end is closed before the tool writes: every write is EPIPE.
        let (r, w) = nix::unistd::pipe().unwrap();
        drop(r);
        let o = tool(dir.path())
            .args(args)
            .stdout(Stdio::from(w))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// The schema check sees Rust types that serde lets through (`Result`, `Option` wrappers, enum
/// variants as keys), wherever they are nested; ordinary keys and values pass.
#[test]
fn the_schema_check_catches_rust_types_in_json() {
    for leak in [
        r#"{"event":"dry-run","example_identity":{"Ok":{"serial":"U-1"}}}"#,
        r#"{"a":{"Err":"no slot"}}"#,
        r#"{"a":[{"Some":1}]}"#,
        r#"{"a":{"None":null}}"#,
        r#"{"recovery":{"Rockusb":{"vid":8711}}}"#,
    ] {
        let v: serde_json::Value = serde_json::from_str(leak).unwrap();
        assert!(
            !common::json::rust_type_leaks(&v).is_empty(),
            "not caught: {leak}"
        );
    }
    let fine: serde_json::Value =
        serde_json::from_str(r#"{"event":"x","ID_PATH":"p","v":"Ok","k":[{"a1":"Some"}]}"#)
            .unwrap();
    assert_eq!(common::json::rust_type_leaks(&fine), Vec::<String>::new());
}
