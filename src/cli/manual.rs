//! What the command line says about itself for the operator's shell and `man`: `outboxd
//! completions SHELL` and `outboxd man`, both generated from the one clap definition of the
//! commands, so they never drift from what the binary accepts.
//!
//! Both render into memory first and then write: the generators give up with a panic on a
//! write error, and a closed pipe (`outboxd man | head`) must end the command with an error
//! message, not a panic.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use clap_complete::Shell;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum, value_name = "SHELL")]
    shell: Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write outboxd.1 and a page per command (outboxd-serve.1, outboxd-inspect-clients.1, ...)
    /// into this directory (created if missing) instead of printing the top page.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// `outboxd completions SHELL`: the script on stdout. Exit 0, or 1 when stdout fails.
pub fn completions(args: CompletionsArgs, mut cmd: clap::Command) -> ExitCode {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "outboxd", &mut script);
    write_stdout(&script)
}

/// `outboxd man [--dir DIR]`: the top page as roff on stdout, or every page into DIR (one
/// path per line on stdout). Exit 0, or 1 when a page cannot be written.
pub fn man(args: ManArgs, cmd: clap::Command) -> ExitCode {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let Some(dir) = args.dir else {
        let mut page = Vec::new();
        if let Err(e) = clap_mangen::Man::new(cmd).render(&mut page) {
            eprintln!("outboxd: cannot render the man page: {e}");
            return ExitCode::from(1);
        }
        return write_stdout(&page);
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("outboxd: cannot create {}: {e}", dir.display());
        return ExitCode::from(1);
    }
    let mut written = Vec::new();
    if let Err(e) = write_pages(&cmd, &dir, &mut written) {
        eprintln!(
            "outboxd: cannot write the man pages into {}: {e}",
            dir.display()
        );
        return ExitCode::from(1);
    }
    let list: String = written
        .iter()
        .map(|p| format!("{}\n", p.display()))
        .collect();
    write_stdout(list.as_bytes())
}

/// The page of `cmd` and of each of its visible commands, depth first, into `dir`.
fn write_pages(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> std::io::Result<()> {
    written.push(clap_mangen::Man::new(cmd.clone()).generate_to(dir)?);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir, written)?;
    }
    Ok(())
}

fn write_stdout(bytes: &[u8]) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outboxd: cannot write to stdout: {e}");
            ExitCode::from(1)
        }
    }
}
