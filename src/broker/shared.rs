//! The state every connection and the admin API share, behind one `Arc`: configuration, the
//! store, the registry of sessions, the shutdown signal and task tracker, metrics, token checks,
//! per-address counts and the TLS config. The listener (`net`) builds it; the transports only
//! read it.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::registry::Registry;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::Store;

/// What every connection shares.
pub struct Shared {
    pub cfg: Config,
    pub store: Store,
    pub registry: Registry,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    pub metrics: Arc<Metrics>,
    /// Token checks; None in auth mode "none".
    pub auth: Option<crate::auth::Verifier>,
    /// Open connections per client address (`server.max_connections_per_ip`).
    pub per_ip: crate::broker::registry::PerIp,
    /// The TLS config new connections get; None when TLS is off (`tls.cert_file` empty).
    pub tls: Option<crate::net::tls::Tls>,
}
