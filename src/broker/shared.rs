//! The state every connection and the admin API share, behind one `Arc`: configuration, the
//! store, the registry of sessions, the shutdown signal and task tracker, metrics, token checks,
//! and per-address counts. The listener (`net`) builds it; the transports only read it. It holds
//! nothing of a transport: the TLS config stays with the listener, which hands it to each
//! connection's handshake and to the admin API.

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
}
