//! TLS for the WebSocket listener and (with `tls.admin`) the admin HTTP listener: the
//! certificate chain and key named in `[tls]`, the rustls server config both listeners share,
//! its reload on SIGHUP, and the stream types the listeners hand to their connections. (The
//! client's side of TLS is `client::tls`.)
//!
//! The config in force is one `Arc<ServerConfig>` behind a lock. Each connection takes the
//! current one when its handshake starts and keeps it, so a reload changes what *new*
//! connections get and never touches a connection already accepted. A reload builds a whole
//! new config (and so a new session cache: no session resumes with the certificate it
//! replaced), and a file that does not load, or a key that does not fit the certificate, is
//! logged and the running certificate stays.
//!
//! Handshakes never run in an accept loop (one slow client would stall every accept): the
//! WebSocket connection runs [`accept`] in its own task, under the deadline that also covers
//! the upgrade and the hello; the admin listener hands hyper an [`Incoming`] stream whose
//! handshake runs when hyper first reads it, in that connection's task, under the same length
//! of deadline. A peer that speaks plain TCP (or nothing) to a TLS port only fails its own
//! handshake, logged at debug.
//!
//! rustls with the `ring` provider, chosen explicitly, so the build never depends on which
//! provider features other crates happen to enable. rustls's own `logging` feature stays off:
//! it logs at WARN what any peer can provoke (alerts, malformed messages), and one debug line
//! per failed handshake here says what an operator needs.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::TlsSettings;

/// Why a certificate or key could not be used. Each names the config key of the file at fault.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{} is not valid PEM: {reason}", path.display())]
    Pem {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{} holds no PEM certificate (\"BEGIN CERTIFICATE\")", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)", path.display())]
    NoKey { path: PathBuf },
    /// rustls refused the pair, e.g. a key that does not belong to the certificate.
    #[error("cannot use {} with {}: {source}", cert.display(), key_file.display())]
    Rejected {
        cert: PathBuf,
        key_file: PathBuf,
        source: rustls::Error,
    },
}

impl TlsError {
    /// The config key of the setting at fault.
    pub fn key(&self) -> &'static str {
        match self {
            TlsError::Read { key, .. } | TlsError::Pem { key, .. } => key,
            TlsError::NoCertificate { .. } | TlsError::Rejected { .. } => "tls.cert_file",
            TlsError::NoKey { .. } => "tls.key_file",
        }
    }
}

/// The TLS settings in force, shared by every listener that uses TLS: a cheap `Clone` handle.
#[derive(Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

struct Inner {
    cert_file: PathBuf,
    key_file: PathBuf,
    /// A std lock, not a tokio one: it is held only to clone or replace an `Arc`, never
    /// across an `.await`, and taken once per accepted connection.
    current: RwLock<Arc<ServerConfig>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert_file", &self.inner.cert_file)
            .field("key_file", &self.inner.key_file)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads the certificate chain and key named in `[tls]`; `Ok(None)` when TLS is off
    /// (`tls.cert_file` empty). Reads files: call it where blocking is allowed.
    ///
    /// # Errors
    /// [`TlsError`] naming the file and its config key when a file cannot be read or parsed,
    /// or when the key does not belong to the certificate.
    pub fn load(settings: &TlsSettings) -> Result<Option<Tls>, TlsError> {
        if !settings.enabled() {
            return Ok(None);
        }
        let config = server_config(&settings.cert_file, &settings.key_file)?;
        Ok(Some(Tls {
            inner: Arc::new(Inner {
                cert_file: settings.cert_file.clone(),
                key_file: settings.key_file.clone(),
                current: RwLock::new(config),
            }),
        }))
    }

    /// Reads the certificate and key files again and, when they load, makes them the ones new
    /// connections get. On error nothing changes. Reads files: call it where blocking is
    /// allowed.
    ///
    /// # Errors
    /// As [`Tls::load`]; the certificate in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = server_config(&self.inner.cert_file, &self.inner.key_file)?;
        match self.inner.current.write() {
            Ok(mut current) => *current = fresh,
            // A writer panicked mid-assignment of an `Arc`: the value is whole either way.
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(())
    }

    /// An acceptor with the config in force now; the connection keeps it for its life.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = match self.inner.current.read() {
            Ok(c) => Arc::clone(&c),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        };
        TlsAcceptor::from(config)
    }

    pub fn cert_file(&self) -> &Path {
        &self.inner.cert_file
    }
}

/// Builds a server config from a PEM certificate chain (leaf first) and a PEM private key.
fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs("tls.cert_file", cert_file)?;
    let key = read_key(key_file)?;
    let rejected = |source| TlsError::Rejected {
        cert: cert_file.to_owned(),
        key_file: key_file.to_owned(),
        source,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(rejected)?
        .with_no_client_auth()
        // Also checks that the key belongs to the leaf certificate.
        .with_single_cert(certs, key)
        .map_err(rejected)?;
    // Both listeners speak HTTP/1.1 (the WebSocket upgrade, and axum with http1 only).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_file(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

/// The certificates in the PEM file `path`; `key` names the setting it came from.
fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(key, path)?;
    let bad = |e: rustls::pki_types::pem::Error| TlsError::Pem {
        key,
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file("tls.key_file", path)?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(k) => Ok(k),
        Err(rustls::pki_types::pem::Error::NoItemsFound) => Err(TlsError::NoKey {
            path: path.to_owned(),
        }),
        Err(e) => Err(TlsError::Pem {
            key: "tls.key_file",
            path: path.to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// Reloads `tls` each time a SIGHUP arrives, until `shutdown`. With TLS off a SIGHUP is logged
/// and ignored (it never stops the broker). Never fails: a reload that fails is logged at
/// error and the certificate in use stays.
pub async fn reload_on_sighup(
    mut hangup: tokio::signal::unix::Signal,
    tls: Option<Tls>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            got = hangup.recv() => if got.is_none() { return },
        }
        let Some(tls) = tls.clone() else {
            info!("SIGHUP: nothing to reload (TLS is off: tls.cert_file is empty)");
            continue;
        };
        let cert_file = tls.cert_file().display().to_string();
        match tokio::task::spawn_blocking(move || tls.reload()).await {
            Ok(Ok(())) => info!(
                cert_file,
                "SIGHUP: TLS certificate reloaded; new connections use it"
            ),
            Ok(Err(e)) => error!(
                key = e.key(),
                error = %e,
                "SIGHUP: TLS certificate reload failed; keeping the certificate in use"
            ),
            Err(e) => error!(
                error = %e,
                "SIGHUP: TLS certificate reload failed; keeping the certificate in use"
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The WebSocket listener's stream
// ---------------------------------------------------------------------------------------------

/// An accepted connection, after TLS when TLS is on.
pub enum Stream {
    Plain(TcpStream),
    // Boxed: a TLS session is far larger than a socket.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// Why a TLS handshake did not complete.
#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("not finished within the handshake deadline (server.hello_timeout_ms)")]
    TimedOut,
    #[error(transparent)]
    Failed(io::Error),
}

/// Runs the TLS handshake on an accepted socket by `deadline`, with the config in force now;
/// with TLS off it returns the socket as it is. Cancel-safe in the sense that dropping it
/// drops the socket.
///
/// # Errors
/// [`HandshakeError`] when the peer does not complete a TLS handshake in time (a plain-TCP
/// client, a scanner, a client that does not trust the certificate).
pub async fn accept(
    tls: Option<&Tls>,
    tcp: TcpStream,
    deadline: Instant,
) -> Result<Stream, HandshakeError> {
    let Some(tls) = tls else {
        return Ok(Stream::Plain(tcp));
    };
    match tokio::time::timeout_at(deadline, tls.acceptor().accept(tcp)).await {
        Ok(Ok(s)) => Ok(Stream::Tls(Box::new(s))),
        Ok(Err(e)) => Err(HandshakeError::Failed(e)),
        Err(_) => Err(HandshakeError::TimedOut),
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The admin listener
// ---------------------------------------------------------------------------------------------

/// The admin API's listener for axum: plain TCP, or TLS with the handshake deferred to the
/// connection's own task (see [`Incoming`]).
pub struct Listener {
    tcp: TcpListener,
    tls: Option<Tls>,
    handshake_timeout: Duration,
}

impl Listener {
    /// `tls`: `None` for plain HTTP. `handshake_timeout` bounds each TLS handshake.
    pub fn new(tcp: TcpListener, tls: Option<Tls>, handshake_timeout: Duration) -> Self {
        Listener {
            tcp,
            tls,
            handshake_timeout,
        }
    }
}

impl axum::serve::Listener for Listener {
    type Io = Incoming;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Incoming, SocketAddr) {
        let mut backoff = Duration::from_millis(5);
        loop {
            match self.tcp.accept().await {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    let state = match &self.tls {
                        None => State::Ready(Stream::Plain(tcp)),
                        Some(tls) => State::Handshaking {
                            accept: Box::new(tls.acceptor().accept(tcp)),
                            deadline: Box::pin(tokio::time::sleep(self.handshake_timeout)),
                        },
                    };
                    return (Incoming { state, peer }, peer);
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "admin API: accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// An admin connection whose TLS handshake (if any) completes on its first read or write, so
/// it runs in the task hyper gives the connection, not in the accept loop, and by a deadline.
pub struct Incoming {
    state: State,
    peer: SocketAddr,
}

enum State {
    // Boxed, as in `Stream`: a handshake in progress holds a whole TLS session.
    Handshaking {
        accept: Box<tokio_rustls::Accept<TcpStream>>,
        deadline: Pin<Box<Sleep>>,
    },
    Ready(Stream),
    Failed,
}

impl Incoming {
    /// Drives the handshake; `Ready(Ok(()))` once the stream is usable.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let State::Handshaking { accept, deadline } = &mut self.state else {
            return Poll::Ready(match self.state {
                State::Ready(_) => Ok(()),
                _ => Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "TLS handshake failed",
                )),
            });
        };
        match Pin::new(accept.as_mut()).poll(cx) {
            Poll::Ready(Ok(s)) => {
                self.state = State::Ready(Stream::Tls(Box::new(s)));
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                debug!(peer = %self.peer, error = %e, "admin API: TLS handshake failed");
                self.state = State::Failed;
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                ready!(deadline.as_mut().poll(cx));
                debug!(peer = %self.peer, "admin API: TLS handshake not finished in time");
                self.state = State::Failed;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake not finished in time",
                )))
            }
        }
    }

    fn poll_stream(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Pin<&mut Stream>>> {
        ready!(self.poll_handshake(cx))?;
        match &mut self.state {
            State::Ready(s) => Poll::Ready(Ok(Pin::new(s))),
            _ => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "TLS handshake failed",
            ))),
        }
    }
}

impl AsyncRead for Incoming {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(self.get_mut().poll_stream(cx))?.poll_read(cx, buf)
    }
}

impl AsyncWrite for Incoming {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.get_mut().poll_stream(cx))?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.get_mut().poll_stream(cx))?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.state {
            State::Ready(s) => s.is_write_vectored(),
            _ => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.get_mut().poll_stream(cx))?.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            State::Ready(s) => Pin::new(s).poll_shutdown(cx),
            // Nothing was said over TLS yet: dropping the socket is the whole goodbye.
            _ => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path, cert: &str, key: &str) -> TlsSettings {
        let cert_file = dir.join("cert.pem");
        let key_file = dir.join("key.pem");
        std::fs::write(&cert_file, cert).unwrap();
        std::fs::write(&key_file, key).unwrap();
        TlsSettings {
            cert_file,
            key_file,
            admin: false,
        }
    }

    fn self_signed() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    #[test]
    fn tls_is_off_without_a_certificate() {
        assert!(Tls::load(&TlsSettings::default()).unwrap().is_none());
    }

    #[test]
    fn a_certificate_and_its_key_load() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed();
        assert!(Tls::load(&settings(dir.path(), &cert, &key))
            .unwrap()
            .is_some());
    }

    #[test]
    fn errors_name_the_key_of_the_file_at_fault() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed();
        let (_, other_key) = self_signed();
        let e = Tls::load(&settings(dir.path(), "not pem", &key)).unwrap_err();
        assert_eq!(e.key(), "tls.cert_file", "{e}");
        let e = Tls::load(&settings(dir.path(), &cert, "not pem")).unwrap_err();
        assert_eq!(e.key(), "tls.key_file", "{e}");
        // The key file given as the certificate, and the other way round.
        let e = Tls::load(&settings(dir.path(), &key, &cert)).unwrap_err();
        assert_eq!(e.key(), "tls.cert_file", "{e}");
        let e = Tls::load(&settings(dir.path(), &cert, &other_key)).unwrap_err();
        assert!(matches!(e, TlsError::Rejected { .. }), "{e}");
        let mut s = settings(dir.path(), &cert, &key);
        s.key_file = dir.path().join("missing.pem");
        let e = Tls::load(&s).unwrap_err();
        assert_eq!(e.key(), "tls.key_file", "{e}");
        assert!(e.to_string().contains("missing.pem"), "{e}");
    }

    #[test]
    fn a_failed_reload_keeps_the_config_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed();
        let s = settings(dir.path(), &cert, &key);
        let tls = Tls::load(&s).unwrap().unwrap();
        let before = Arc::clone(tls.acceptor().config());
        std::fs::write(&s.cert_file, "garbage").unwrap();
        assert!(tls.reload().is_err());
        assert!(Arc::ptr_eq(&before, tls.acceptor().config()));
        let (cert2, key2) = self_signed();
        std::fs::write(&s.cert_file, cert2).unwrap();
        std::fs::write(&s.key_file, key2).unwrap();
        tls.reload().unwrap();
        assert!(!Arc::ptr_eq(&before, tls.acceptor().config()));
    }
}
