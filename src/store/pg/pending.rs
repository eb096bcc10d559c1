//! The answers a commit group holds back until the COMMIT that covers them, and how they are
//! given: the outcome once the group committed, the group's error (or the latch) when it did
//! not. Kept in one place so every command's answer follows one rule: nothing is confirmed
//! before its commit.

use crate::model::ClientId;
use crate::store::writer::{Command, Reply};
use crate::store::{HelloOutcome, PublishOutcome, PurgeOutcome, ResumeRefused, StoreError};

/// An answer held back until the commit that covers it.
pub(super) enum Pending {
    Hello(Reply<HelloOutcome>, Result<HelloDone, StoreError>),
    Publish(Reply<PublishOutcome>, Result<PublishOutcome, StoreError>),
    Subscribe(Reply<()>, Result<(), StoreError>),
    Purge(
        Reply<Option<PurgeOutcome>>,
        Result<Option<Purged>, StoreError>,
    ),
    Delete(Reply<Option<u64>>, Result<Option<Deleted>, StoreError>),
    Forget(Reply<bool>, Result<Option<Deleted>, StoreError>),
    Settle(Reply<()>),
}

/// A hello as the transaction left it; the handle is made once it committed.
pub(super) struct HelloDone {
    pub(super) cid: u64,
    pub(super) name: ClientId,
    pub(super) epoch: String,
    pub(super) resumed: bool,
    pub(super) reason: Option<ResumeRefused>,
    pub(super) last_seq: u64,
    pub(super) next_seq: u64,
    pub(super) pending: u64,
    pub(super) missed: u64,
    pub(super) generation: u64,
    /// The broker that held the client before, when another one: it is told to let go.
    pub(super) previous: Option<String>,
    /// Whether any broker ever served this client before.
    pub(super) ever_connected: bool,
}

pub(super) struct Purged {
    pub(super) cid: u64,
    pub(super) outcome: PurgeOutcome,
    /// The broker that last held the client's connection, and the generation that ends it.
    pub(super) holder: Option<String>,
    pub(super) generation: u64,
}

/// A delete as the transaction left it.
pub(super) struct Deleted {
    pub(super) cid: u64,
    pub(super) name: ClientId,
    pub(super) removed: u64,
    pub(super) holder: Option<String>,
    pub(super) generation: u64,
}

pub(super) fn latched_error() -> StoreError {
    StoreError::Latched("a commit was not confirmed by the synchronous standby".into())
}

/// Commands not applied, as answers to refuse.
pub(super) fn work_into_pending(cmds: Vec<Command>) -> Vec<Pending> {
    let mut out = Vec::new();
    for cmd in cmds {
        match cmd {
            Command::Hello { reply, .. } => {
                out.push(Pending::Hello(reply, Err(StoreError::Closed)))
            }
            Command::Publish { reply, .. } => {
                out.push(Pending::Publish(reply, Err(StoreError::Closed)))
            }
            Command::Subscribe { reply, .. } => {
                out.push(Pending::Subscribe(reply, Err(StoreError::Closed)))
            }
            Command::Purge { reply, .. } => {
                out.push(Pending::Purge(reply, Err(StoreError::Closed)))
            }
            Command::Delete { reply, .. } => {
                out.push(Pending::Delete(reply, Err(StoreError::Closed)))
            }
            Command::Forget { reply, .. } => {
                out.push(Pending::Forget(reply, Err(StoreError::Closed)))
            }
            Command::Settle { reply } => out.push(Pending::Settle(reply)),
            Command::Ack { .. } | Command::Backup { .. } => {}
        }
    }
    out
}

impl Pending {
    pub(super) fn send(self) {
        match self {
            Pending::Hello(tx, r) => {
                // Only reached for a refused hello: a done one is answered with its handle.
                let _ = tx.send(r.and(Err(StoreError::Closed)));
            }
            Pending::Publish(tx, r) => drop(tx.send(r)),
            Pending::Subscribe(tx, r) => drop(tx.send(r)),
            Pending::Purge(tx, r) => drop(tx.send(r.map(|p| p.map(|p| p.outcome)))),
            Pending::Delete(tx, r) => drop(tx.send(r.map(|d| d.map(|d| d.removed)))),
            Pending::Forget(tx, r) => drop(tx.send(r.map(|d| d.is_some()))),
            Pending::Settle(tx) => drop(tx.send(Ok(()))),
        }
    }

    /// Nothing of the group is confirmed: every answer is `err`.
    pub(super) fn fail(self, err: &StoreError) {
        let e = || match err {
            StoreError::Latched(s) => StoreError::Latched(s.clone()),
            other => StoreError::Database(other.to_string()),
        };
        match self {
            Pending::Hello(tx, _) => drop(tx.send(Err(e()))),
            Pending::Publish(tx, _) => drop(tx.send(Err(e()))),
            Pending::Subscribe(tx, _) => drop(tx.send(Err(e()))),
            Pending::Purge(tx, _) => drop(tx.send(Err(e()))),
            Pending::Delete(tx, _) => drop(tx.send(Err(e()))),
            Pending::Forget(tx, _) => drop(tx.send(Err(e()))),
            // Nothing of the group is visible: the barrier is passed all the same.
            Pending::Settle(tx) => drop(tx.send(Ok(()))),
        }
    }
}
