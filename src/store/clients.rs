//! The writer's copy of every outbox's meta, by name and by client number, with each outbox's
//! live handle (its durable frontier and send counts). The writer changes a meta here and the
//! commit writes the changed ones with its group, so the copy and the disk move together.

use std::collections::HashMap;
use std::sync::Arc;

use super::fresh::Budget;
use super::{Handles, OutboxHandle, StoreError};
use crate::codec::{ClientMeta, CodecError};
use crate::model::ClientId;

/// One outbox as the writer keeps it in memory.
pub(super) struct ClientState {
    pub(super) meta: ClientMeta,
    pub(super) handle: Arc<OutboxHandle>,
}

impl ClientState {
    /// `next_seq` as of the last commit: everything below it is durable and may have been sent;
    /// nothing at or above it has been.
    pub(super) fn durable_next(&self) -> u64 {
        *self.handle.durable.borrow()
    }
}

/// Every outbox's meta, by name and by client number: the writer's copy, written with each
/// group that changes it.
pub(super) struct Clients {
    by_name: HashMap<ClientId, ClientState>,
    by_cid: HashMap<u64, ClientId>,
    /// What the handles' lists of fresh messages may hold together.
    budget: Arc<Budget>,
}

impl Clients {
    pub(super) fn new(budget: Arc<Budget>) -> Clients {
        Clients {
            by_name: HashMap::new(),
            by_cid: HashMap::new(),
            budget,
        }
    }

    pub(super) fn get(&self, name: &ClientId) -> Option<&ClientState> {
        self.by_name.get(name)
    }

    pub(super) fn by_cid(&self, cid: u64) -> Option<&ClientState> {
        self.by_name.get(self.by_cid.get(&cid)?)
    }

    pub(super) fn state_mut(&mut self, cid: u64) -> Option<&mut ClientState> {
        let name = self.by_cid.get(&cid)?;
        self.by_name.get_mut(name)
    }

    pub(super) fn meta_of(&self, cid: u64) -> Result<&ClientMeta, StoreError> {
        self.by_cid(cid)
            .map(|c| &c.meta)
            .ok_or_else(|| StoreError::Corrupt {
                key: format!("client #{cid}"),
                source: CodecError::Empty,
            })
    }

    pub(super) fn len(&self) -> usize {
        self.by_name.len()
    }

    pub(super) fn pending(&self) -> u64 {
        self.by_name.values().map(|c| c.meta.pending).sum()
    }

    /// Forgets the outbox `cid` and its live handle.
    pub(super) fn remove(&mut self, handles: &Handles, cid: u64) {
        if let Some(name) = self.by_cid.remove(&cid) {
            self.by_name.remove(&name);
            handles
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&name);
        }
    }

    /// Adds the outbox `cid` of `name` with `meta`, and its live handle to `handles`.
    pub(super) fn install(
        &mut self,
        handles: &Handles,
        name: ClientId,
        cid: u64,
        meta: ClientMeta,
    ) {
        let handle = Arc::new(OutboxHandle::new(
            cid,
            name.clone(),
            meta.next_seq,
            Arc::clone(&self.budget),
        ));
        handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), Arc::clone(&handle));
        self.by_cid.insert(cid, name.clone());
        self.by_name.insert(name, ClientState { meta, handle });
    }
}
