//! `outboxd inspect`: the operator's view of the store.
//!
//! Every view comes from one of two sources that answer with the same shapes
//! ([`crate::views`]): a data directory read offline through [`crate::store::Inspector`]
//! (which never writes to it), or a running broker's admin API (see `source`). Printing is
//! separate from fetching (see `render`): human tables (payload previews cut to the terminal
//! width) or `--json` (one JSON document; NDJSON for message dumps).
//!
//! The other commands on the stored state live beside it and share those parts: `backup`
//! (backup and restore), `client`, `repair` and `postgres` (migrate and import).

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::render::{print_clients, print_outbox, print_stats, print_topics, to_json, width};
use super::source::{Source, SourceArgs};
use super::tool_error::{finish, ToolError};
use crate::model::now_ms;
use crate::views::SortBy;

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Print JSON (one document; one JSON object per line for `outbox`).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// Every client with an outbox: pending messages and bytes, positions, oldest unacked age.
    Clients {
        /// Order: most pending messages, most bytes, oldest unacked message first, or by name.
        #[arg(long, default_value = "pending", value_parser = SortBy::NAMES)]
        sort: String,
        /// Show at most N clients (0: all).
        #[arg(long, value_name = "N", default_value_t = 0)]
        limit: usize,
    },
    /// The stored (unacked) messages of one client, in seq order.
    Outbox {
        /// The client id.
        client: String,
        /// Start at this seq.
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        from: u64,
        /// Show at most N messages (0: all).
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: usize,
    },
    /// Topics and their durable subscribers.
    Topics,
    /// Totals: clients, pending messages and bytes, disk use, oldest message, format version.
    Stats,
}

/// Runs `outboxd inspect`.
pub fn inspect(args: InspectArgs) -> ExitCode {
    finish(run_inspect(args))
}

fn run_inspect(args: InspectArgs) -> Result<(), ToolError> {
    let source = Source::open(&args.source)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let now = now_ms();
    match args.what {
        What::Clients { sort, limit } => {
            let sort = SortBy::parse(&sort).unwrap_or(SortBy::Pending);
            let clients = source.clients(sort, limit)?;
            if args.json {
                writeln!(out, "{}", to_json(&clients))?;
            } else {
                print_clients(&mut out, &clients, now)?;
            }
        }
        What::Outbox {
            client,
            from,
            limit,
        } => {
            let page = source.outbox(&client, from, limit)?;
            if args.json {
                for m in &page.messages {
                    writeln!(out, "{}", to_json(m))?;
                }
            } else {
                print_outbox(&mut out, &page, now, width())?;
            }
        }
        What::Topics => {
            let topics = source.topics()?;
            if args.json {
                writeln!(out, "{}", to_json(&topics))?;
            } else {
                print_topics(&mut out, &topics)?;
            }
        }
        What::Stats => {
            let stats = source.stats()?;
            if args.json {
                writeln!(out, "{}", to_json(&stats))?;
            } else {
                print_stats(&mut out, &stats, now)?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// Makes a bare `--admin` in front of an `inspect` subcommand mean the default URL.
///
/// `--admin` takes an optional URL, and clap gives it whatever word follows: in
/// `outboxd inspect --admin stats` that is `stats`, leaving no subcommand. A word after
/// `--admin` that names a subcommand of `inspect` is that subcommand, so the `--admin` is
/// rewritten as `--admin=` (the default URL). URLs (`--admin URL`, `--admin=URL`) and every
/// other command line pass unchanged.
pub(crate) fn bare_admin_before_subcommand(
    args: Vec<std::ffi::OsString>,
    cli: &clap::Command,
) -> Vec<std::ffi::OsString> {
    let is_inspect = args.get(1).is_some_and(|a| a == "inspect");
    let Some(inspect) = cli.find_subcommand("inspect").filter(|_| is_inspect) else {
        return args;
    };
    let names: Vec<&str> = inspect
        .get_subcommands()
        .flat_map(|c| std::iter::once(c.get_name()).chain(c.get_all_aliases()))
        .collect();
    let mut out = Vec::with_capacity(args.len());
    let mut words = args.into_iter().peekable();
    while let Some(word) = words.next() {
        if word == "--" {
            out.push(word);
            out.extend(words);
            break;
        }
        let subcommand_next = words
            .peek()
            .and_then(|w| w.to_str())
            .is_some_and(|w| names.contains(&w));
        if word == "--admin" && subcommand_next {
            out.push("--admin=".into());
        } else {
            out.push(word);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_admin_before_an_inspect_subcommand_means_the_default_url() {
        use clap::CommandFactory as _;
        let cli = crate::cli::Cli::command();
        let fixed = |words: &[&str]| -> Vec<String> {
            let args = words.iter().map(std::ffi::OsString::from).collect();
            bare_admin_before_subcommand(args, &cli)
                .into_iter()
                .map(|w| w.to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            fixed(&["outboxd", "inspect", "--admin", "stats"]),
            ["outboxd", "inspect", "--admin=", "stats"]
        );
        let unchanged: [&[&str]; 4] = [
            &["outboxd", "inspect", "--admin", "http://h:9090", "stats"],
            &["outboxd", "inspect", "--admin=http://h:9090", "stats"],
            &["outboxd", "inspect", "outbox", "--", "--admin", "stats"],
            &["outboxd", "backup", "--admin", "--to", "d"],
        ];
        for words in unchanged {
            assert_eq!(fixed(words), words);
        }
    }
}
