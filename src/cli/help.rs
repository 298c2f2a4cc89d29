//! What `--help` shows beyond clap's derive output: every command, however deep, ends with
//! its examples and the exit-code table. clap has no inherited `after_help`, so the tree is
//! decorated here once, and the parser, the man pages and the completions all use the result.
//!
//! Examples are written once, in the `Examples:` block of the command that owns them; a
//! nested command (`cache list`) without a block of its own shows the lines of its ancestors'
//! blocks that invoke it, found by parsing each line with the real parser.

use clap::CommandFactory;

use super::Cli;
use crate::exit::Exit;

/// The header every examples block starts with.
pub const EXAMPLES: &str = "Examples:";

/// The command tree the binary parses with: [`Cli::command`] plus, on every command, the
/// inherited examples (`-h` and `--help`) and the exit codes (`--help`).
pub fn command() -> clap::Command {
    let exit = Exit::help_text();
    decorate(Cli::command(), &[], &[], exit.trim_end())
}

fn decorate(
    mut cmd: clap::Command,
    path: &[String],
    inherited: &[String],
    exit: &str,
) -> clap::Command {
    let own_text = cmd
        .get_after_help()
        .map(|h| h.to_string())
        .unwrap_or_default();
    let own = example_lines(&own_text);
    let mut text = own_text.trim_end().to_string();
    if own.is_empty() && !path.is_empty() {
        let mine: Vec<&String> = inherited
            .iter()
            .filter(|l| example_path(l).is_some_and(|p| p.starts_with(path)))
            .collect();
        if !mine.is_empty() {
            if !text.is_empty() {
                text.push_str("\n\n");
            }
            text.push_str(EXAMPLES);
            for l in mine {
                text.push_str("\n  ");
                text.push_str(l);
            }
        }
    }
    if !path.is_empty() {
        cmd = cmd.after_help(text.clone());
    }
    let long = if text.is_empty() {
        exit.to_string()
    } else {
        format!("{text}\n\n{exit}")
    };
    cmd = cmd.after_long_help(long);

    let mut below: Vec<String> = inherited.to_vec();
    below.extend(own);
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for name in names {
        let mut p = path.to_vec();
        p.push(name.clone());
        cmd = cmd.mut_subcommand(&name, |s| decorate(s, &p, &below, exit));
    }
    cmd
}

/// The example command lines of a help text: the indented lines of each `Examples:` block
/// that run `sbcflash` (after optional `VAR=value` assignments), without their comments.
pub fn example_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.trim_end() == EXAMPLES {
            inside = true;
            continue;
        }
        if line.trim().is_empty() || !line.starts_with(' ') {
            inside = false;
            continue;
        }
        if inside && shell_words(line).is_some() {
            out.push(strip_comment(line.trim()).to_string());
        }
    }
    out
}

/// `line` without a trailing `# comment` (a `#` outside quotes after whitespace).
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if prev_space => return line[..i].trim_end(),
            _ => {}
        }
        prev_space = c.is_whitespace();
    }
    line
}

/// The argv an example line runs, as a POSIX shell would split it: `VAR=value` prefixes
/// dropped, single and double quotes honoured, the words up to the first unquoted `|`, `>`,
/// `<`, `;`, `&` or `#`. `None` if the line does not run `sbcflash`.
pub fn shell_words(line: &str) -> Option<Vec<String>> {
    let mut words: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = line.trim().chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) if c == q => quote = None,
            Some('"') if c == '\\' && chars.peek().is_some_and(|n| "\"\\$`".contains(*n)) => {
                cur.extend(chars.next());
            }
            Some(_) => cur.push(c),
            None => match c {
                '\'' | '"' => {
                    quote = Some(c);
                    in_word = true;
                }
                '\\' => {
                    cur.extend(chars.next());
                    in_word = true;
                }
                '|' | '>' | '<' | ';' | '&' => break,
                '#' if !in_word => break,
                c if c.is_whitespace() => {
                    if in_word {
                        words.push(std::mem::take(&mut cur));
                        in_word = false;
                    }
                }
                c => {
                    cur.push(c);
                    in_word = true;
                }
            },
        }
    }
    if quote.is_some() {
        return None;
    }
    if in_word {
        words.push(cur);
    }
    let start = words.iter().position(|w| !is_assignment(w))?;
    let words = words.split_off(start);
    (words.first().map(String::as_str) == Some("sbcflash")).then_some(words)
}

fn is_assignment(w: &str) -> bool {
    w.split_once('=').is_some_and(|(k, _)| {
        !k.is_empty()
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !k.starts_with(|c: char| c.is_ascii_digit())
    })
}

/// The subcommand path an example line invokes (`["cache", "list"]`), by parsing it with the
/// real parser; `None` if it does not parse.
pub fn example_path(line: &str) -> Option<Vec<String>> {
    let words = shell_words(line)?;
    let m = Cli::command().try_get_matches_from(words).ok()?;
    let mut path = Vec::new();
    let mut cur = &m;
    while let Some((name, sub)) = cur.subcommand() {
        path.push(name.to_string());
        cur = sub;
    }
    Some(path)
}

/// clap's own colouring (help, usage errors) must follow `--color` too, but clap renders
/// those before our flags are parsed: look for the flag in the raw arguments.
pub(crate) fn clap_color(args: &[std::ffi::OsString]) -> clap::ColorChoice {
    let mut choice = clap::ColorChoice::Auto;
    let mut it = args.iter().skip(1).map(|a| a.to_string_lossy());
    while let Some(a) = it.next() {
        let value = match a.as_ref() {
            "--" => break,
            "--color" => it.next().map(|v| v.into_owned()),
            s => s.strip_prefix("--color=").map(str::to_string),
        };
        match value.as_deref() {
            Some("always") => choice = clap::ColorChoice::Always,
            Some("never") => choice = clap::ColorChoice::Never,
            Some(_) => choice = clap::ColorChoice::Auto,
            None => {}
        }
    }
    choice
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_split_like_sh() {
        let w = |s: &str| shell_words(s).unwrap();
        assert_eq!(
            w("sbcflash config show --json | jq -r '.config[\"x\"]'"),
            ["sbcflash", "config", "show", "--json"]
        );
        assert_eq!(
            w("SBCFLASH_BOARD=opi5 sbcflash config show --board rpi4   # the flag wins"),
            ["sbcflash", "config", "show", "--board", "rpi4"]
        );
        assert_eq!(
            w("sbcflash serial-load --then 'sf update ${loadaddr} 0' x"),
            [
                "sbcflash",
                "serial-load",
                "--then",
                "sf update ${loadaddr} 0",
                "x"
            ]
        );
        assert_eq!(
            w(r#"sbcflash a "b \"c\"" d\ e f#g > out"#),
            ["sbcflash", "a", "b \"c\"", "d e", "f#g"]
        );
        assert_eq!(shell_words("cat x | sbcflash hash -"), None);
        assert_eq!(shell_words("sbcflash 'unterminated"), None);
    }

    #[test]
    fn example_lines_take_only_the_examples_block() {
        let text = "Leave with Ctrl-].\n\nExamples:\n  sbcflash a   # note\n  more text\n  X=1 sbcflash b 'c # d'\n\nPrints sbcflash x.";
        assert_eq!(
            example_lines(text),
            ["sbcflash a", "X=1 sbcflash b 'c # d'"]
        );
    }

    #[test]
    fn color_flag_is_found_before_parsing() {
        let a = |v: &[&str]| clap_color(&v.iter().map(Into::into).collect::<Vec<_>>());
        assert_eq!(
            a(&["x", "--color", "never", "--help"]),
            clap::ColorChoice::Never
        );
        assert_eq!(
            a(&["x", "hash", "--color=always"]),
            clap::ColorChoice::Always
        );
        assert_eq!(a(&["x", "--", "--color=always"]), clap::ColorChoice::Auto);
        assert_eq!(a(&["x", "hash"]), clap::ColorChoice::Auto);
    }
}
