//! The console examples in README.md and docs/*.md, run against the real broker.
//!
//! Every fenced block whose info string is `console` is an example this file runs: each line
//! that starts with `$ ` is a command (run by bash, stdout and stderr together), and the lines
//! after it, up to the next command, are what it must print. Examples that cannot run here
//! (another machine, a failing disk, a Python client) are written as `sh` or `text` blocks
//! instead. The convention is described in docs/architecture.md ("Examples that run").
//!
//! The blocks of one document run in order against one broker of their own, started in a
//! temporary directory that is also the commands' working directory (its data directory is
//! `./data`, the default). An HTML comment on the line before a block changes the broker first:
//! `<!-- broker: stopped -->` stops it (SIGTERM) for offline commands, `<!-- broker: restarted
//! -->` stops it and starts it again on the same data; a block without one wants it running.
//!
//! The commands find the broker the way an operator's shell would: `outboxd` is on `PATH`, the
//! environment has `OUTBOXD_SERVER__LISTEN` and `OUTBOXD_SERVER__ADMIN_LISTEN` (so `pub`, `sub`
//! and a bare `inspect --admin` reach it) and `A=http://ADMIN` (the admin API's base URL the
//! documents use). Values that differ from run to run are compared as placeholders on both
//! sides (see [`normalize`]): epochs, message ids, Unix-ms times, ports, JWTs, the temporary
//! directory. Everything else must match exactly, so a changed output fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{Broker, Opts};

/// One `console` block: where it is, what the broker must be doing, and its commands.
#[derive(Debug)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    broker: Want,
    steps: Vec<Step>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Running,
    Stopped,
    Restarted,
}

#[derive(Debug)]
struct Step {
    /// 1-based line of the `$ ` line.
    line: usize,
    command: String,
    expected: Vec<String>,
}

/// The `console` blocks of a Markdown text, in order.
fn console_blocks(text: &str) -> Result<Vec<Block>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(info) = lines[i].strip_prefix("```") else {
            i += 1;
            continue;
        };
        let open = i;
        let mut end = i + 1;
        while end < lines.len() && lines[end].trim_end() != "```" {
            end += 1;
        }
        if end == lines.len() {
            return Err(format!("line {}: a fence that is never closed", open + 1));
        }
        if info.trim() == "console" {
            let previous = open
                .checked_sub(1)
                .map(|p| lines[p].trim())
                .unwrap_or_default();
            let broker = match previous {
                "<!-- broker: stopped -->" => Want::Stopped,
                "<!-- broker: restarted -->" => Want::Restarted,
                p if p.starts_with("<!-- broker:") => {
                    return Err(format!("line {open}: unknown directive {p}"));
                }
                _ => Want::Running,
            };
            let mut steps: Vec<Step> = Vec::new();
            for (n, l) in lines.iter().enumerate().take(end).skip(open + 1) {
                if let Some(command) = l.strip_prefix("$ ") {
                    steps.push(Step {
                        line: n + 1,
                        command: command.to_string(),
                        expected: Vec::new(),
                    });
                } else if let Some(step) = steps.last_mut() {
                    step.expected.push(l.to_string());
                } else {
                    return Err(format!(
                        "line {}: a console block must start with a `$ ` command",
                        n + 1
                    ));
                }
            }
            blocks.push(Block {
                line: open + 1,
                broker,
                steps,
            });
        }
        i = end + 1;
    }
    Ok(blocks)
}

/// Replaces what differs from run to run with a placeholder: epochs (16 lowercase hex
/// digits), message ids (`"id":"…"`), Unix-ms times (13 digits), the port after `127.0.0.1:`,
/// JWTs (`eyJ…`), and `dir` (the temporary working directory) with `/srv/outboxd`.
fn normalize(line: &str, dir: &str) -> String {
    let line = if dir.is_empty() {
        line.to_string()
    } else {
        line.replace(dir, "/srv/outboxd")
    };
    let mut out = String::with_capacity(line.len());
    let mut rest = line.as_str();
    while let Some(c) = rest.chars().next() {
        if !c.is_ascii_alphanumeric() {
            out.push(c);
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if rest.starts_with("eyJ") {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || "-_.".contains(c)))
                .unwrap_or(rest.len());
            out.push_str("<jwt>");
            rest = &rest[len..];
            continue;
        }
        let len = rest
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(rest.len());
        let word = &rest[..len];
        let digits = word.bytes().all(|b| b.is_ascii_digit());
        let hex = word
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if (out.ends_with("\"id\":\"") || out.ends_with(" id=")) && hex {
            out.push_str("<id>");
        } else if out.ends_with("127.0.0.1:") && digits {
            out.push_str("<port>");
        } else if word.len() == 16 && hex {
            out.push_str("<epoch>");
        } else if word.len() == 13 && digits {
            out.push_str("<ms>");
        } else if is_age(word) {
            out.push_str("<age>");
        } else {
            out.push_str(word);
        }
        rest = &rest[len..];
    }
    // Table columns are as wide as their widest value, and a placeholder hides how wide that
    // was: runs of spaces compare as one gap.
    let mut gaps = String::with_capacity(out.len());
    for (i, part) in out.split("  ").enumerate() {
        if i > 0 && !part.is_empty() && !gaps.ends_with("  ") {
            gaps.push_str("  ");
        }
        gaps.push_str(part.trim_start_matches(' '));
    }
    gaps
}

/// `42ms`, `3s`, `10m3s`, `2h5m`, `1d`: an age or a duration as the tables print them.
fn is_age(word: &str) -> bool {
    let mut rest = word;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let Some(unit) = ["ms", "s", "m", "h", "d"]
            .into_iter()
            .find(|u| rest.starts_with(u))
        else {
            return false;
        };
        rest = &rest[unit.len()..];
        parts += 1;
    }
    parts > 0
}

/// Runs the console examples of `doc` (relative to the repository) against a broker of their
/// own; returns a report of every example whose output differs, empty when all match.
fn run_document(doc: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(doc);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let blocks = console_blocks(&text).unwrap_or_else(|e| panic!("{doc}: {e}"));
    assert!(!blocks.is_empty(), "{doc} has no console example to run");

    let mut broker = Broker::start(Opts::new());
    let dir: PathBuf = broker
        .data_dir()
        .parent()
        .expect("the data dir is inside the broker's dir")
        .to_path_buf();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_outboxd"))
        .parent()
        .expect("the binary's directory")
        .to_path_buf();
    let path_var = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut running = true;
    let mut report = String::new();
    for block in &blocks {
        match block.broker {
            Want::Running if !running => broker.restart(),
            Want::Running => {}
            Want::Stopped => {
                if running {
                    broker.sigterm();
                }
            }
            Want::Restarted => {
                if running {
                    broker.sigterm();
                }
                broker.restart();
            }
        }
        running = block.broker != Want::Stopped;
        let admin = broker.admin_addr();
        // One shell per block, so a block's commands share its `export`s and `cd`s, as in a
        // terminal. A separator after each command splits the output; it starts a line of its
        // own even after output without a final newline (curl's JSON).
        let mut script = String::from("exec 2>&1\n");
        for step in &block.steps {
            script.push_str(&step.command);
            script.push_str(&format!("\nprintf '\\n{SEPARATOR}\\n'\n"));
        }
        let mut cmd = Command::new("timeout");
        // Nothing from the developer's shell: only what the example's environment says.
        for (k, _) in std::env::vars() {
            if k.starts_with("OUTBOXD_") {
                cmd.env_remove(&k);
            }
        }
        cmd.arg("120")
            .arg("bash")
            .arg("-c")
            .arg(&script)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .env("PATH", &path_var)
            .env("HOME", dir.join("home"))
            .env("XDG_STATE_HOME", dir.join("state"))
            .env("OUTBOXD_SERVER__LISTEN", broker.addr.to_string())
            .env("OUTBOXD_SERVER__ADMIN_LISTEN", admin.to_string())
            .env("A", format!("http://{admin}"))
            .env_remove("RUST_LOG")
            .env_remove("COLUMNS");
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("run the block at {doc}:{}: {e}", block.line));
        let actual = String::from_utf8_lossy(&out.stdout);
        let dir_text = dir.display().to_string();
        let separator = format!("\n{SEPARATOR}\n");
        let mut outputs = actual.split(separator.as_str());
        for step in &block.steps {
            let printed = outputs
                .next()
                .unwrap_or("(the block ended before this command)");
            let got: Vec<String> = printed.lines().map(|l| normalize(l, &dir_text)).collect();
            let want: Vec<String> = step.expected.iter().map(|l| normalize(l, "")).collect();
            if got != want {
                report.push_str(&format!(
                    "\n{doc}:{}: `{}` printed (normalized):\n{}\n  the document says (normalized):\n{}\n",
                    step.line,
                    step.command,
                    indent(&got),
                    indent(&want),
                ));
            }
        }
    }
    report
}

/// Printed after each command of a block; no example prints it.
const SEPARATOR: &str = "--- outboxd-docs-example-step-end ---";

fn indent(lines: &[String]) -> String {
    if lines.is_empty() {
        return "    (nothing)".into();
    }
    lines
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The documents with console examples, each run by one test below.
const DOCUMENTS: [&str; 3] = ["README.md", "docs/admin-api.md", "docs/operations.md"];

fn check(doc: &str) {
    let report = run_document(doc);
    assert!(
        report.is_empty(),
        "console examples that no longer match the broker:{report}"
    );
}

#[test]
fn readme_console_examples_print_what_the_readme_shows() {
    check("README.md");
}

#[test]
fn admin_api_console_examples_print_what_the_document_shows() {
    check("docs/admin-api.md");
}

#[test]
fn operations_console_examples_print_what_the_document_shows() {
    check("docs/operations.md");
}

#[test]
fn every_document_with_console_examples_is_run_by_a_test() {
    // Catches a new document (or a new console block in one) whose examples nothing runs.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut docs = vec!["README.md".to_string()];
    for entry in std::fs::read_dir(root.join("docs")).expect("read docs/") {
        let name = entry.expect("docs/ entry").file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".md") {
            docs.push(format!("docs/{name}"));
        }
    }
    for doc in docs {
        let text = std::fs::read_to_string(root.join(&doc)).expect("read a document");
        let blocks = console_blocks(&text).unwrap_or_else(|e| panic!("{doc}: {e}"));
        assert!(
            blocks.is_empty() || DOCUMENTS.contains(&doc.as_str()),
            "{doc} has console examples but no test runs them: add it to DOCUMENTS"
        );
    }
}

#[test]
fn the_examples_cover_the_commands_operators_type_first() {
    // Catches an example turned into an unchecked block (or deleted) for a command the
    // documents must keep showing as it really behaves.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut commands = Vec::new();
    for doc in DOCUMENTS {
        let text = std::fs::read_to_string(root.join(doc)).expect("read a document");
        for block in console_blocks(&text).unwrap_or_else(|e| panic!("{doc}: {e}")) {
            commands.extend(block.steps.into_iter().map(|s| s.command));
        }
    }
    for needle in [
        "outboxd --help",
        "outboxd pub ",
        "outboxd sub ",
        "outboxd inspect ",
        "outboxd inspect --admin",
        "outboxd token ",
        "curl -s $A/",
        "curl -s -X POST $A/v1/publish",
    ] {
        assert!(
            commands.iter().any(|c| c.starts_with(needle)),
            "no checked console example runs `{needle}`"
        );
    }
}

#[test]
fn normalize_hides_what_changes_between_runs_and_nothing_else() {
    let dir = "/tmp/outboxd-test-x1";
    assert_eq!(
        normalize(
            r#"{"epoch":"3dc63954ef5bd0ea","id":"1e8480","ts":1795716937451,"seq":3}"#,
            dir
        ),
        r#"{"epoch":"<epoch>","id":"<id>","ts":<ms>,"seq":3}"#
    );
    assert_eq!(
        normalize("ws://127.0.0.1:41234/ws in /tmp/outboxd-test-x1/data", dir),
        "ws://127.0.0.1:<port>/ws in /srv/outboxd/data"
    );
    assert_eq!(normalize("eyJhbGciOi.eyJzdWIi.sig-_x", dir), "<jwt>");
    // Seqs, counts and words stay as they are, so a changed one is seen.
    assert_eq!(normalize("#3 from alice: 42", dir), "#3 from alice: 42");
    assert_eq!(normalize("badcafe", dir), "badcafe");
    assert_eq!(
        normalize(
            "bob    2163373c703db4e3  0 B  10m3s ago  ok the message id=3",
            dir
        ),
        "bob  <epoch>  0 B  <age> ago  ok the message id=<id>"
    );
    assert_eq!(normalize("a  b", dir), normalize("a      b", dir));
    assert_ne!(normalize("a b", dir), normalize("a  b", dir));
}

#[test]
fn console_blocks_split_commands_from_their_output_and_read_the_directive() {
    let doc = "text\n<!-- broker: stopped -->\n```console\n$ a\none\ntwo\n$ b\n```\n```sh\n$ not run\n```\n";
    let blocks = console_blocks(doc).expect("parse");
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].broker, Want::Stopped);
    assert_eq!(blocks[0].line, 3);
    let steps: Vec<(&str, Vec<String>)> = blocks[0]
        .steps
        .iter()
        .map(|s| (s.command.as_str(), s.expected.clone()))
        .collect();
    assert_eq!(
        steps,
        vec![("a", vec!["one".into(), "two".into()]), ("b", vec![])]
    );
    assert!(console_blocks("```console\nno prompt\n```\n").is_err());
}
