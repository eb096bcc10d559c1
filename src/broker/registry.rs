//! Which connection currently speaks for each client, and the takeover rule.
//!
//! A newer connection with the same client id replaces the older one. That happens here, in
//! one place: attaching cancels the previous holder's token (its connection then closes with
//! 4000) and records the new session generation. Detaching only removes the entry when it still
//! belongs to the same generation, so a replaced connection cannot unregister its successor.
//! An operator can also end a client's connection ([`Registry::kick`]), for instance after
//! purging its outbox; the connection learns why from its [`Ticket`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio_util::sync::CancellationToken;

use crate::model::ClientId;

/// Identifies one connection of a client, distinct across takeovers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionGen(pub u64);

/// Why a connection was told to end by someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// A newer connection with the same client id took over.
    Replaced,
    /// An operator purged the client's outbox.
    Purged,
}

/// What a connection holds while it is the client's current one.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub gen: SessionGen,
    /// Cancelled when the connection must end; [`Ticket::why`] says why.
    pub token: CancellationToken,
    why: Arc<OnceLock<Kick>>,
}

impl Ticket {
    fn new(gen: SessionGen) -> Self {
        Ticket {
            gen,
            token: CancellationToken::new(),
            why: Arc::new(OnceLock::new()),
        }
    }

    fn kick(&self, why: Kick) {
        let _ = self.why.set(why);
        self.token.cancel();
    }

    /// Why the token was cancelled (the first reason given wins).
    pub fn why(&self) -> Kick {
        self.why.get().copied().unwrap_or(Kick::Replaced)
    }
}

#[derive(Debug, Default)]
pub struct Registry {
    // A std Mutex: held for a map operation only, never across an `.await`.
    sessions: Mutex<HashMap<ClientId, Ticket>>,
    next: AtomicU64,
}

impl Registry {
    /// Makes a new connection the client's current one. Returns its ticket and whether an
    /// older connection was replaced.
    pub fn attach(&self, client: &ClientId) -> (Ticket, bool) {
        let gen = SessionGen(self.next.fetch_add(1, Ordering::Relaxed) + 1);
        let ticket = Ticket::new(gen);
        let previous = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(client.clone(), ticket.clone());
        let replaced = match previous {
            Some(old) => {
                old.kick(Kick::Replaced);
                true
            }
            None => false,
        };
        (ticket, replaced)
    }

    /// Ends the client's current connection, if it has one. Returns whether it had.
    pub fn kick(&self, client: &ClientId, why: Kick) -> bool {
        let map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(client) {
            Some(t) => {
                t.kick(why);
                true
            }
            None => false,
        }
    }

    /// Whether the client has a connection now.
    pub fn is_connected(&self, client: &ClientId) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(client)
    }

    /// Forgets the connection, unless a newer one already replaced it.
    pub fn detach(&self, client: &ClientId, gen: SessionGen) {
        let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(client).is_some_and(|t| t.gen == gen) {
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

/// Counts open connections per client address, for `server.max_connections_per_ip`.
#[derive(Debug, Default)]
pub struct PerIp {
    limit: u32,
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

/// One counted connection; uncounted when dropped.
#[derive(Debug)]
pub struct IpSlot {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl PerIp {
    /// `limit` = 0: no per-address limit.
    pub fn new(limit: u32) -> Self {
        PerIp {
            limit,
            open: Arc::default(),
        }
    }

    /// Counts a connection from `ip`, or None when that address is at the limit.
    pub fn admit(&self, ip: IpAddr) -> Option<IpSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if self.limit > 0 && *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            ip,
            open: Arc::clone(&self.open),
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_connection_cancels_the_older_one() {
        let r = Registry::default();
        let alice = ClientId::new("alice").unwrap();
        let (t1, replaced1) = r.attach(&alice);
        let (t2, replaced2) = r.attach(&alice);
        let (g1, g2) = (t1.gen, t2.gen);
        assert!(!replaced1 && replaced2);
        assert!(t1.token.is_cancelled());
        assert_eq!(t1.why(), Kick::Replaced);
        assert!(!t2.token.is_cancelled());
        assert_ne!(g1, g2);
        // The replaced connection leaving must not unregister its successor.
        r.detach(&alice, g1);
        assert_eq!(r.connected(), 1);
        r.detach(&alice, g2);
        assert_eq!(r.connected(), 0);
    }

    #[test]
    fn kick_ends_the_current_connection_and_says_why() {
        let r = Registry::default();
        let bob = ClientId::new("bob").unwrap();
        assert!(!r.kick(&bob, Kick::Purged));
        let (t, _) = r.attach(&bob);
        assert!(r.is_connected(&bob));
        assert!(r.kick(&bob, Kick::Purged));
        assert!(t.token.is_cancelled());
        assert_eq!(t.why(), Kick::Purged);
    }

    #[test]
    fn per_ip_limit_counts_open_connections_and_frees_on_drop() {
        let p = PerIp::new(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let a = p.admit(ip).unwrap();
        let _b = p.admit(ip).unwrap();
        assert!(p.admit(ip).is_none());
        assert!(p.admit(other).is_some());
        drop(a);
        assert!(p.admit(ip).is_some());
        assert!(PerIp::new(0).admit(ip).is_some());
    }
}
