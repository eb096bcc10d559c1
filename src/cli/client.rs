//! `outboxd client`: an operator's change to one client (delete its outbox, purge it, end a
//! subscription), made by a running broker through its admin API, after a confirmation of what
//! cannot be undone.

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::source::{Source, SourceArgs};
use super::tool_error::{finish, ToolError};
use crate::config::ConfigError;

#[derive(Debug, Args)]
pub struct ClientArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Do not ask before a destructive change (required when stdin is not a terminal).
    #[arg(long, global = true)]
    yes: bool,
    /// Print the broker's answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    action: ClientAction,
}

#[derive(Debug, Subcommand)]
enum ClientAction {
    /// Delete a client's outbox and everything under it (stored messages, tombstones,
    /// subscriptions). A connected client is closed with 4002; if it comes back it gets a new,
    /// empty outbox with a new epoch, and is told its position no longer holds.
    Delete {
        /// The client id.
        client: String,
    },
    /// Remove every stored message of a client; its outbox moves to a new epoch and the client
    /// sees the removed messages in `missed` at its next connect (closed with 4002 if connected).
    Purge {
        /// The client id.
        client: String,
    },
    /// End one durable subscription of a client (a mistyped topic, say).
    Unsubscribe {
        /// The client id.
        client: String,
        /// The topic.
        topic: String,
    },
}

/// Runs `outboxd client`: an operator's change to one client, made by a running broker
/// through its admin API.
pub fn client(args: ClientArgs) -> ExitCode {
    finish(run_client(args))
}

fn run_client(args: ClientArgs) -> Result<(), ToolError> {
    let mut source = args.source.clone();
    // The change is the running broker's to make: the admin API, at its default address
    // when no URL is given.
    source.admin.get_or_insert_with(String::new);
    source.data = None;
    let Source::Online(admin) = Source::open(&source)? else {
        return Err(ToolError::Admin {
            url: String::new(),
            message: "`outboxd client` needs a running broker's admin API (--admin URL)".into(),
        });
    };
    let (question, path, who) = match &args.action {
        ClientAction::Delete { client } => (
            Some(format!(
                "Delete client {client} and every message stored for it? This cannot be undone."
            )),
            format!("/v1/clients/{client}"),
            client,
        ),
        ClientAction::Purge { client } => (
            Some(format!(
                "Remove every stored message of {client}? It will be told how many it missed."
            )),
            format!("/v1/clients/{client}/outbox"),
            client,
        ),
        ClientAction::Unsubscribe { client, topic } => (
            None,
            format!("/v1/clients/{client}/subscriptions/{topic}"),
            client,
        ),
    };
    if let Some(q) = question.filter(|_| !args.yes) {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            return Err(ToolError::Config(ConfigError::Invalid {
                key: "--yes",
                reason: format!("{q} Pass --yes to confirm (stdin is not a terminal)"),
            }));
        }
        eprint!("{q} [y/N] ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("outboxd client: nothing changed");
            return Ok(());
        }
    }
    let v = admin.delete(&path, who)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{v}")?;
        return Ok(());
    }
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    let connected = v.get("disconnected").and_then(|d| d.as_bool()) == Some(true);
    let closed = if connected {
        " (its connection was closed with 4002)"
    } else {
        ""
    };
    match &args.action {
        ClientAction::Delete { client } => writeln!(
            out,
            "deleted client {client}: {} stored messages removed{closed}",
            n("removed")
        )?,
        ClientAction::Purge { client } => writeln!(
            out,
            "purged {client}: {} messages removed, new epoch {}{closed}",
            n("removed"),
            v.get("epoch").and_then(|e| e.as_str()).unwrap_or("?")
        )?,
        ClientAction::Unsubscribe { client, topic } => {
            writeln!(out, "{client} is no longer subscribed to {topic}")?
        }
    }
    Ok(())
}
