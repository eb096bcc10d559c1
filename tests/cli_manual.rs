//! `outboxd completions SHELL` and `outboxd man` against the real binary: the completion script
//! and the man pages name every command the binary accepts (read from its own `--help`, so a
//! command added later is checked too), bash offers them when the script is loaded, and the
//! man output is roff.

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn outboxd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run outboxd")
}

fn stdout_of(args: &[&str]) -> String {
    let out = outboxd(args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "outboxd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The commands `outboxd --help` lists, without clap's `help`.
fn commands() -> Vec<String> {
    let help = stdout_of(&["--help"]);
    let names: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect();
    for known in ["serve", "inspect", "config", "completions", "man"] {
        assert!(names.iter().any(|n| n == known), "{known} not in {names:?}");
    }
    names
}

/// What bash offers for the last word of `words` (empty: a new word) with the script loaded.
fn bash_offers(script: &Path, words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
    let prev = words.len().checked_sub(2).map_or("outboxd", |i| words[i]);
    let cur = words.last().copied().unwrap_or("");
    let run = format!(
        "source {script:?} && COMP_WORDS=({}) && COMP_CWORD={} && _outboxd outboxd {cur:?} {prev:?} \
         && printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        quoted.join(" "),
        words.len() - 1,
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&run)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "bash: {run}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn bash_completion_offers_every_command() {
    let script = stdout_of(&["completions", "bash"]);
    assert!(script.contains("complete -F _outboxd"), "{script}");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("outboxd.bash");
    std::fs::write(&file, &script).expect("write the script");
    let offered = bash_offers(&file, &["outboxd", ""]);
    for name in commands() {
        assert!(
            offered.contains(&name),
            "bash does not offer {name}: {offered:?}"
        );
    }
    // Commands inside commands complete too.
    let offered = bash_offers(&file, &["outboxd", "config", ""]);
    assert!(offered.iter().any(|w| w == "check"), "{offered:?}");
    let offered = bash_offers(&file, &["outboxd", "inspect", ""]);
    assert!(offered.iter().any(|w| w == "clients"), "{offered:?}");
}

#[test]
fn every_listed_shell_gets_a_script_and_an_unknown_one_is_refused() {
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let script = stdout_of(&["completions", shell]);
        assert!(script.contains("outboxd"), "{shell}: {script}");
        assert!(script.contains("completions"), "{shell}");
    }
    let out = outboxd(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn man_prints_roff_naming_every_command() {
    let page = stdout_of(&["man"]);
    assert!(
        page.contains(".TH outboxd 1"),
        "not a roff man page:\n{page}"
    );
    assert!(page.contains(".SH SYNOPSIS") && page.contains(".SH SUBCOMMANDS"));
    for name in commands() {
        // roff escapes the hyphen.
        assert!(
            page.contains(&format!("outboxd\\-{name}(1)")),
            "the man page does not name {name}"
        );
    }
}

#[test]
fn man_dir_writes_a_page_per_command() {
    let dir = tempfile::tempdir().expect("temp dir");
    let target = dir.path().join("man1");
    let listed = stdout_of(&["man", "--dir", target.to_str().expect("utf-8 path")]);
    let mut expected = vec![
        "outboxd.1".to_string(),
        "outboxd-config-check.1".to_string(),
    ];
    expected.extend(commands().iter().map(|c| format!("outboxd-{c}.1")));
    for page in expected {
        let path = target.join(&page);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH "),
            "{page}: {text}"
        );
        assert!(listed.contains(&path.display().to_string()), "{listed}");
    }
    let check = std::fs::read_to_string(target.join("outboxd-config-check.1")).expect("read");
    assert!(check.contains("\\-\\-json"), "{check}");
}
