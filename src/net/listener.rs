//! The listener: accepts TCP connections, enforces the connection limit, starts the admin API
//! ([`crate::net::admin`]), and runs shutdown.
//!
//! One [`CancellationToken`] is the shutdown signal for every task; one [`TaskTracker`] knows
//! every task (the admin API's too), so shutdown can wait until the last connection has closed
//! (with 1001) and only then let the store's writer make its final commit.
//!
//! On stdout the broker prints `outboxd admin: http://ADDR` (when the admin API is on) and then
//! `outboxd ready: ws://ADDR/ws`: both lines are part of the operator contract. With TLS
//! ([`crate::net::tls`]) they read `wss://ADDR/ws`, and `https://ADDR` when `tls.admin` is set.
//!
//! SIGHUP reloads the TLS certificate and key (a task here, tracked like the others); it never
//! stops the broker.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::broker::registry::Registry;
use crate::broker::Shared;
use crate::config::{Config, ConfigError};
use crate::faults::Faults;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError, StoreOptions};

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install the SIGHUP handler (TLS reload): {0}")]
    Signal(std::io::Error),
    #[error("internal task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("the store refused writes after a storage failure; fix the disk and restart")]
    Latched,
}

/// What a refusal of a listen address says about the bind error.
fn cannot_listen(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        format!("address in use: another process listens there ({e})")
    } else {
        format!("cannot listen there: {e}")
    }
}

/// Opens the store, listens, and serves until `shutdown` is cancelled; then closes every
/// connection with 1001, waits for them, and commits what is queued. `ready` gets the bound
/// address once clients can connect.
pub async fn serve(
    cfg: Config,
    faults: Faults,
    shutdown: CancellationToken,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let addr = cfg.listen_addr()?;
    let admin_addr = cfg.admin_addr()?;
    // Before the store opens: an unusable certificate stops the broker with the key named.
    let tls_settings = cfg.tls.clone();
    let tls = tokio::task::spawn_blocking(move || crate::net::tls::Tls::load(&tls_settings))
        .await?
        .map_err(|e| {
            ServeError::Config(ConfigError::Invalid {
                key: e.key(),
                reason: e.to_string(),
            })
        })?;
    let metrics = Arc::new(Metrics::default());
    let mut opts = StoreOptions::from_config(&cfg);
    opts.faults = faults;
    opts.metrics = Arc::clone(&metrics);
    let (store, writer) = match tokio::task::spawn_blocking(move || Store::open(opts)).await? {
        Ok(opened) => opened,
        Err(StoreError::Unusable { source, .. }) => {
            return Err(ServeError::Config(cfg.refuse(
                "storage.data_dir",
                format!("{:?}", cfg.storage.data_dir.display().to_string()),
                format!("cannot be used: {source}"),
            )))
        }
        Err(StoreError::BadUrl(reason)) => {
            return Err(ServeError::Config(cfg.refuse(
                "postgres.url",
                "(not shown: it may hold a password)".to_string(),
                format!("a libpq URL or key=value string ({reason})"),
            )))
        }
        Err(e) => return Err(e.into()),
    };
    // An address that cannot be bound is a configuration error too (exit status 2).
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        ServeError::Config(cfg.refuse(
            "server.listen",
            format!("{:?}", cfg.server.listen),
            cannot_listen(&e),
        ))
    })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    let admin = match admin_addr {
        Some(a) => match crate::net::admin::bind(a).await {
            Ok(bound) => Some(bound),
            Err(crate::net::admin::AdminStartError::Bind { source, .. }) => {
                return Err(ServeError::Config(cfg.refuse(
                    "server.admin_listen",
                    format!("{:?}", cfg.server.admin_listen),
                    cannot_listen(&source),
                )))
            }
        },
        None => None,
    };
    let limit = Arc::new(Semaphore::new(
        usize::try_from(cfg.server.max_connections).unwrap_or(usize::MAX),
    ));
    match cfg.storage.backend {
        crate::config::Backend::Sled => {
            info!(listen = %local, data_dir = %cfg.storage.data_dir.display(),
            durability = ?cfg.storage.durability, "outboxd serving")
        }
        crate::config::Backend::Postgres => {
            info!(listen = %local, backend = "postgres", "outboxd serving")
        }
    }
    let auth = crate::auth::Verifier::from_config(&cfg.auth).map_err(|e| {
        ServeError::Config(ConfigError::Invalid {
            key: e.key(),
            reason: e.to_string(),
        })
    })?;
    let per_ip = crate::broker::registry::PerIp::new(cfg.server.max_connections_per_ip);
    // Installed before the ready line, so a SIGHUP sent once the broker is ready never meets
    // the default action (which would end the process).
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(ServeError::Signal)?;
    let shared = Arc::new(Shared {
        auth,
        per_ip,
        cfg,
        store,
        registry: Registry::default(),
        shutdown: shutdown.clone(),
        tracker: TaskTracker::new(),
        metrics,
    });
    shared.tracker.spawn(crate::net::tls::reload_on_sighup(
        hangup,
        tls.clone(),
        shutdown.clone(),
    ));
    if let Some(tls) = &tls {
        info!(cert_file = %tls.cert_file().display(), admin = shared.cfg.tls.admin,
              "TLS on; SIGHUP reloads the certificate and key");
    }
    match admin {
        Some((admin, bound)) => {
            crate::net::admin::spawn(admin, tls.clone(), &shared);
            info!(admin = %bound, auth = !shared.cfg.admin.token.is_empty(), "admin API serving");
            // Part of the contract, like the ready line, and printed before it: a supervisor
            // (or the test harness) that waits for the ready line has both.
            let mut out = std::io::stdout().lock();
            let scheme = if shared.cfg.tls.admin {
                "https"
            } else {
                "http"
            };
            let _ = writeln!(out, "outboxd admin: {scheme}://{bound}");
            let _ = out.flush();
        }
        None => info!("admin API off (server.admin_listen is empty)"),
    }
    ready(local);

    let mut backoff = Duration::from_millis(5);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    backoff = Duration::from_millis(5);
                    let permit = Arc::clone(&limit).try_acquire_owned().ok();
                    if permit.is_none() {
                        warn!(%peer, "connection refused: server.max_connections reached");
                    }
                    // Counted here, in accept order, so the cap holds however the tasks run.
                    let ip_slot = shared.per_ip.admit(peer.ip());
                    if ip_slot.is_none() {
                        warn!(%peer, "connection refused: server.max_connections_per_ip reached");
                    }
                    shared.tracker.spawn(crate::net::connection::serve(
                        tcp,
                        peer,
                        permit,
                        ip_slot,
                        tls.clone(),
                        Arc::clone(&shared),
                    ));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
    drop(listener);
    info!(
        connected = shared.registry.connected(),
        "shutting down: closing connections with 1001"
    );
    shared.tracker.close();
    shared.tracker.wait().await;
    drop(shared);
    let latched = tokio::task::spawn_blocking(move || writer.join()).await?;
    if latched {
        error!("shutdown complete, but the store was latched: writes were refused after a storage failure (see above); everything confirmed before it is on disk");
        return Err(ServeError::Latched);
    }
    info!("shutdown complete: every queued write committed");
    Ok(())
}
