//! A client's door to several brokers: a local port that hands each new connection to the
//! next broker's fault proxy in turn. A client of the library reconnects to the one URL it was
//! given; behind its door that reconnect lands on another broker, which is what a client behind
//! a load balancer sees when its broker dies or its connection breaks.
//!
//! The door only relays bytes; every fault comes from the proxies behind it. An upstream that
//! ends with an error (a proxy's RST, a broker that is down) is passed on as an RST, so the
//! client sees what it would see without the door.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Connections handed to each broker, over every door of a run (shared by the doors).
#[derive(Debug)]
pub struct Handed(Vec<AtomicU64>);

impl Handed {
    pub fn new(brokers: usize) -> Arc<Handed> {
        Arc::new(Handed((0..brokers).map(|_| AtomicU64::new(0)).collect()))
    }

    pub fn counts(&self) -> Vec<u64> {
        self.0.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    fn count(&self, broker: usize) {
        if let Some(c) = self.0.get(broker) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The index of the broker after `previous` among `brokers` (wrapping).
fn next_after(previous: usize, brokers: usize) -> usize {
    (previous + 1) % brokers.max(1)
}

/// A running door. Dropping it does not stop it; call [`Door::stop`].
pub struct Door {
    pub addr: SocketAddr,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Door {
    /// Listens on 127.0.0.1 (port 0). The first connection goes to `upstreams[first]`, each
    /// later one to the next upstream after the one before.
    pub async fn start(
        upstreams: Vec<SocketAddr>,
        first: usize,
        handed: Arc<Handed>,
    ) -> std::io::Result<Door> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let door = Door {
            addr,
            stop: stop.clone(),
            tracker: tracker.clone(),
        };
        let n = upstreams.len().max(1);
        tracker.clone().spawn(async move {
            // The broker the last connection went to; the first goes to `first`.
            let mut last = (first + n - 1) % n;
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => break,
                    a = listener.accept() => a,
                };
                let Ok((client, _)) = accepted else { continue };
                last = next_after(last, n);
                let Some(&to) = upstreams.get(last) else {
                    break;
                };
                handed.count(last);
                tracker.spawn(relay(client, to, stop.clone()));
            }
        });
        Ok(door)
    }

    pub async fn stop(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

async fn relay(mut client: TcpStream, to: SocketAddr, stop: CancellationToken) {
    let mut server = match TcpStream::connect(to).await {
        Ok(s) => s,
        Err(_) => {
            let _ = client.set_zero_linger();
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let copied = tokio::select! {
        _ = stop.cancelled() => return,
        r = tokio::io::copy_bidirectional(&mut client, &mut server) => r,
    };
    if copied.is_err() {
        // The proxy reset the connection (or the client did): reset the other side too.
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers every connection with its own name and closes.
    async fn named(name: u8) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let _ = s.write_all(&[name]).await;
            }
        });
        addr
    }

    async fn who(door: SocketAddr) -> u8 {
        let mut s = TcpStream::connect(door).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(2), s.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        got[0]
    }

    #[test]
    fn the_next_broker_wraps_around() {
        assert_eq!(next_after(0, 3), 1);
        assert_eq!(next_after(2, 3), 0);
        assert_eq!(next_after(0, 1), 0);
    }

    #[tokio::test]
    async fn each_new_connection_goes_to_the_next_broker_starting_at_the_first_given() {
        let upstreams = vec![named(0).await, named(1).await, named(2).await];
        let handed = Handed::new(3);
        let door = Door::start(upstreams, 2, Arc::clone(&handed))
            .await
            .unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(who(door.addr).await);
        }
        assert_eq!(seen, vec![2, 0, 1, 2]);
        assert_eq!(handed.counts(), vec![1, 1, 2]);
        door.stop().await;
    }
}
