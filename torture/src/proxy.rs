//! A TCP fault proxy in the spirit of toxiproxy: clients connect to it, it relays to the
//! broker, and the toxics in force change what the relay does to the bytes.
//!
//! Toxics (any combination, per direction where it makes sense): latency with jitter,
//! bandwidth limit, slicer (tiny segments with pauses), blackhole (stop relaying, so the peer
//! sees silence), limit_data (close after N bytes), reset_peer (close with RST at once) and
//! slow_close (delay the close after either side ends). Toxics change while connections are
//! open: each relay loop reads the current set before every chunk.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What the proxy does to one direction of traffic.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DirectionToxics {
    /// Added delay per chunk, and up to this much random extra.
    pub latency: Duration,
    pub jitter: Duration,
    /// Bytes per second; 0 = unlimited.
    pub bandwidth: u64,
    /// Write in segments of at most this many bytes (0 = off), pausing `slice_delay` between.
    pub slice: usize,
    pub slice_delay: Duration,
    /// Drop everything (the receiver sees silence).
    pub blackhole: bool,
    /// Close the connection after this many bytes in this direction (0 = off).
    pub limit_data: u64,
}

/// The toxics in force.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Toxics {
    pub upstream: DirectionToxics,
    pub downstream: DirectionToxics,
    /// Reset every open connection (RST) and every new one at once.
    pub reset_peer: bool,
    /// Delay closing the other side after one side closed.
    pub slow_close: Duration,
}

impl Toxics {
    /// A short human description, for the run log.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (name, d) in [("up", &self.upstream), ("down", &self.downstream)] {
            if !d.latency.is_zero() {
                parts.push(format!("{name}:latency={:?}±{:?}", d.latency, d.jitter));
            }
            if d.bandwidth > 0 {
                parts.push(format!("{name}:bandwidth={}B/s", d.bandwidth));
            }
            if d.slice > 0 {
                parts.push(format!("{name}:slicer={}B/{:?}", d.slice, d.slice_delay));
            }
            if d.blackhole {
                parts.push(format!("{name}:blackhole"));
            }
            if d.limit_data > 0 {
                parts.push(format!("{name}:limit_data={}", d.limit_data));
            }
        }
        if self.reset_peer {
            parts.push("reset_peer".into());
        }
        if !self.slow_close.is_zero() {
            parts.push(format!("slow_close={:?}", self.slow_close));
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(" ")
        }
    }
}

/// A running proxy. Dropping it does not stop it; call [`Proxy::stop`].
pub struct Proxy {
    pub addr: SocketAddr,
    toxics: watch::Sender<Toxics>,
    upstream: watch::Sender<SocketAddr>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Proxy {
    /// Listens on 127.0.0.1 (port 0) and relays to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (toxics, _) = watch::channel(Toxics::default());
        let (up_tx, _) = watch::channel(upstream);
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let p = Proxy {
            addr,
            toxics,
            upstream: up_tx,
            stop,
            tracker,
        };
        let toxics_rx = p.toxics.subscribe();
        let up_rx = p.upstream.subscribe();
        let stop = p.stop.clone();
        let tracker = p.tracker.clone();
        p.tracker.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => break,
                    a = listener.accept() => a,
                };
                let Ok((client, _)) = accepted else { continue };
                let to = *up_rx.borrow();
                tracker.spawn(relay(client, to, toxics_rx.clone(), stop.clone()));
            }
        });
        Ok(p)
    }

    /// Points new connections at another upstream (the broker's port changes on restart).
    pub fn set_upstream(&self, to: SocketAddr) {
        self.upstream.send_replace(to);
    }

    pub fn set(&self, t: Toxics) {
        self.toxics.send_replace(t);
    }

    pub async fn stop(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    toxics: watch::Receiver<Toxics>,
    stop: CancellationToken,
) {
    if toxics.borrow().reset_peer {
        reset(client);
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        reset(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let done = CancellationToken::new();
    let up = pump(cr, sw, toxics.clone(), true, done.clone());
    let down = pump(sr, cw, toxics.clone(), false, done.clone());
    let ((cr, sw), (sr, cw)) = tokio::select! {
        _ = stop.cancelled() => return,
        r = async { tokio::join!(up, down) } => r,
    };
    // Either side ending ends both; under reset_peer the close is an RST.
    if toxics.borrow().reset_peer {
        if let Ok(c) = cr.reunite(cw) {
            reset(c);
        }
        if let Ok(s) = sr.reunite(sw) {
            reset(s);
        }
    }
}

type Halves = (OwnedReadHalf, OwnedWriteHalf);

/// Relays one direction until either side ends, applying the toxics of that direction, and
/// hands the halves back so the caller can turn the close into an RST.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut toxics: watch::Receiver<Toxics>,
    upstream: bool,
    done: CancellationToken,
) -> Halves {
    let mut buf = vec![0u8; 16 * 1024];
    let mut sent: u64 = 0;
    loop {
        // A blackhole stops reading, like a network that drops every packet: TCP stalls, the
        // peer hears nothing, and nothing already sent is lost unless the connection dies.
        if !wait_open(&mut toxics, upstream, &done).await {
            if toxics.borrow().reset_peer {
                done.cancel();
                return (from, to);
            }
            break;
        }
        let n = tokio::select! {
            _ = done.cancelled() => break,
            _ = toxics.changed() => {
                if toxics.borrow().reset_peer {
                    done.cancel();
                    return (from, to);
                }
                continue;
            }
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
        };
        let t = toxics.borrow().clone();
        if t.reset_peer {
            done.cancel();
            return (from, to);
        }
        if !wait_open(&mut toxics, upstream, &done).await {
            if toxics.borrow().reset_peer {
                done.cancel();
                return (from, to);
            }
            break;
        }
        let t = toxics.borrow().clone();
        let d = if upstream { &t.upstream } else { &t.downstream };
        if !d.latency.is_zero() || !d.jitter.is_zero() {
            let jitter = if d.jitter.is_zero() {
                Duration::ZERO
            } else {
                d.jitter.mul_f64(fastrand::f64())
            };
            tokio::time::sleep(d.latency + jitter).await;
        }
        let mut chunk = &buf[..n];
        if d.limit_data > 0 && sent + n as u64 >= d.limit_data {
            let keep = usize::try_from(d.limit_data.saturating_sub(sent)).unwrap_or(0);
            let _ = to.write_all(&chunk[..keep.min(n)]).await;
            break;
        }
        while !chunk.is_empty() {
            let step = if d.slice > 0 {
                d.slice.min(chunk.len())
            } else {
                chunk.len()
            };
            if to.write_all(&chunk[..step]).await.is_err() {
                done.cancel();
                return (from, to);
            }
            if d.bandwidth > 0 {
                tokio::time::sleep(Duration::from_secs_f64(step as f64 / d.bandwidth as f64)).await;
            }
            if d.slice > 0 && !d.slice_delay.is_zero() {
                tokio::time::sleep(d.slice_delay).await;
            }
            chunk = &chunk[step..];
        }
        sent += n as u64;
    }
    let slow = toxics.borrow().slow_close;
    if !slow.is_zero() {
        tokio::time::sleep(slow).await;
    }
    let _ = to.shutdown().await;
    done.cancel();
    (from, to)
}

/// Waits while this direction is blackholed. False when the relay must end instead (the other
/// direction ended, or a reset toxic came on).
async fn wait_open(
    toxics: &mut watch::Receiver<Toxics>,
    upstream: bool,
    done: &CancellationToken,
) -> bool {
    loop {
        {
            let t = toxics.borrow();
            if t.reset_peer {
                return false;
            }
            let d = if upstream { &t.upstream } else { &t.downstream };
            if !d.blackhole {
                return true;
            }
        }
        tokio::select! {
            _ = done.cancelled() => return false,
            r = toxics.changed() => if r.is_err() { return false },
        }
    }
}

/// Closes with RST: linger 0, then drop.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server; returns its address.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, data: &[u8], wait: Duration) -> Option<Vec<u8>> {
        s.write_all(data).await.ok()?;
        let mut buf = vec![0u8; data.len()];
        match tokio::time::timeout(wait, s.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Some(buf),
            _ => None,
        }
    }

    #[tokio::test]
    async fn blackhole_stalls_like_a_dead_network_and_loses_nothing() {
        let p = Proxy::start(echo().await).await.unwrap();
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        assert_eq!(
            roundtrip(&mut s, b"hello", Duration::from_secs(2))
                .await
                .as_deref(),
            Some(&b"hello"[..])
        );
        let mut t = Toxics::default();
        t.upstream.blackhole = true;
        p.set(t);
        // Silence while it lasts...
        assert_eq!(
            roundtrip(&mut s, b"held", Duration::from_millis(300)).await,
            None
        );
        // ...and afterwards the held bytes arrive first, in order, like TCP retransmits would.
        p.set(Toxics::default());
        assert_eq!(
            roundtrip(&mut s, b"back", Duration::from_secs(2))
                .await
                .as_deref(),
            Some(&b"held"[..])
        );
        let mut rest = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&rest, b"back");
        p.stop().await;
    }

    #[tokio::test]
    async fn limit_data_closes_after_the_limit_and_reset_peer_resets() {
        let p = Proxy::start(echo().await).await.unwrap();
        let mut t = Toxics::default();
        t.downstream.limit_data = 3;
        p.set(t);
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"abcdef").await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut got)).await;
        assert_eq!(got, b"abc");

        p.set(Toxics {
            reset_peer: true,
            ..Toxics::default()
        });
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        let mut buf = [0u8; 8];
        let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        p.stop().await;
    }

    #[tokio::test]
    async fn slicer_and_latency_still_deliver_everything_in_order() {
        let p = Proxy::start(echo().await).await.unwrap();
        let mut t = Toxics::default();
        t.upstream.slice = 3;
        t.downstream.latency = Duration::from_millis(20);
        p.set(t);
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        let data: Vec<u8> = (0..200u8).collect();
        assert_eq!(
            roundtrip(&mut s, &data, Duration::from_secs(5)).await,
            Some(data)
        );
        p.stop().await;
    }
}
