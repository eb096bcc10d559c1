//! Which connection currently speaks for each client, and the takeover rule.
//!
//! A newer connection with the same client id replaces the older one. That happens here, in
//! one place: attaching cancels the previous holder's token (its connection then closes with
//! 4000) and records the new session generation. Detaching only removes the entry when it still
//! belongs to the same generation, so a replaced connection cannot unregister its successor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

use crate::ids::ClientId;

/// Identifies one connection of a client, distinct across takeovers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionGen(pub u64);

#[derive(Debug, Default)]
pub struct Registry {
    // A std Mutex: held for a map operation only, never across an `.await`.
    sessions: Mutex<HashMap<ClientId, (SessionGen, CancellationToken)>>,
    next: AtomicU64,
}

impl Registry {
    /// Makes a new connection the client's current one. Returns its generation and the token
    /// that is cancelled when a newer connection takes over.
    pub fn attach(&self, client: &ClientId) -> (SessionGen, CancellationToken, bool) {
        let gen = SessionGen(self.next.fetch_add(1, Ordering::Relaxed) + 1);
        let token = CancellationToken::new();
        let previous = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(client.clone(), (gen, token.clone()));
        let replaced = match previous {
            Some((_, old)) => {
                old.cancel();
                true
            }
            None => false,
        };
        (gen, token, replaced)
    }

    /// Forgets the connection, unless a newer one already replaced it.
    pub fn detach(&self, client: &ClientId, gen: SessionGen) {
        let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(client).is_some_and(|(g, _)| *g == gen) {
            map.remove(client);
        }
    }

    /// Clients connected right now.
    pub fn connected(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_connection_cancels_the_older_one() {
        let r = Registry::default();
        let alice = ClientId::new("alice").unwrap();
        let (g1, t1, replaced1) = r.attach(&alice);
        let (g2, t2, replaced2) = r.attach(&alice);
        assert!(!replaced1 && replaced2);
        assert!(t1.is_cancelled());
        assert!(!t2.is_cancelled());
        assert_ne!(g1, g2);
        // The replaced connection leaving must not unregister its successor.
        r.detach(&alice, g1);
        assert_eq!(r.connected(), 1);
        r.detach(&alice, g2);
        assert_eq!(r.connected(), 0);
    }
}
