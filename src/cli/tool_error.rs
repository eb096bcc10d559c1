//! What the commands on the stored state (`inspect`, `backup`, `restore`, `client`, `repair`,
//! `migrate`, `import`) fail with, and the exit status each failure ends the process with: one
//! enum, so every one of them reports a failure the same way.

use std::process::ExitCode;

use thiserror::Error;

use crate::config::ConfigError;
use crate::store::StoreError;

#[derive(Debug, Error)]
pub enum ToolError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("admin API at {url}: {message}")]
    Admin { url: String, message: String },
    #[error("no client {0:?} has an outbox here")]
    NoSuchClient(String),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

impl ToolError {
    fn exit_code(&self) -> ExitCode {
        match self {
            ToolError::Config(_) => ExitCode::from(2),
            ToolError::NoSuchClient(_) => ExitCode::from(3),
            ToolError::Store(StoreError::Damaged { .. }) => ExitCode::from(DAMAGED_EXIT),
            _ => ExitCode::from(1),
        }
    }
}

/// The exit status of every command that finds the store damaged (`serve` included).
pub const DAMAGED_EXIT: u8 = 4;

pub(super) fn finish(r: Result<(), ToolError>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(ToolError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outboxd: {e}");
            e.exit_code()
        }
    }
}
