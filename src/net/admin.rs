//! The admin HTTP API on `server.admin_listen`: health, metrics, a live view of the stored
//! outboxes, publishing from a backend, purge and backup. docs/admin-api.md is its contract.
//!
//! It is a thin layer: every read goes through the store's read-only [`Inspector`], every write
//! through the same store calls a WebSocket session uses, and every input is checked by the
//! protocol's own validators ([`crate::model`], [`crate::protocol`]). So an HTTP publish has the
//! WebSocket publish's semantics and durability promise: the answer comes only after the fsync
//! that covers the write.
//!
//! Lifetimes: the server task holds only a [`Weak`] reference to the broker's [`Shared`] state,
//! so an idle keep-alive HTTP connection can never keep the store open after shutdown; a
//! request that finds the broker gone is answered 503. The task runs under the broker's
//! [`TaskTracker`](tokio_util::task::TaskTracker) and stops on the shutdown token (graceful, with
//! a deadline for requests in flight).
//!
//! Authentication: when `admin.token` is set, every endpoint but `/healthz` needs
//! `Authorization: Bearer <token>`, compared in constant time. The config refuses to start a
//! broker whose admin API listens beyond loopback without a token.

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use thiserror::Error;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::broker::registry::Kick;
use crate::broker::{publish_answer, store_error_message, PublishRefusal, Shared};
use crate::metrics::{Metrics, ScrapeGauges};
use crate::model::ClientId;
use crate::model::Target;
use crate::net::tls::Tls;
use crate::protocol::{self, ClientFrame, ErrorCode};
use crate::store::{Inspector, PublishRequest, StoreError};
use crate::views::{ClientView, SortBy};

/// Messages per outbox page when the request names no `limit`.
pub const DEFAULT_PAGE: usize = 100;
/// The largest outbox page one request gets; larger `limit`s are capped.
pub const MAX_PAGE: usize = 1000;
/// How long requests in flight may run on after shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// The fields a `POST /v1/publish` body may have.
const PUBLISH_FIELDS: [&str; 6] = ["to", "payload", "payload_b64", "key", "ttl_ms", "from"];

/// Why the admin API could not start.
#[derive(Debug, Error)]
pub enum AdminStartError {
    #[error("cannot listen on server.admin_listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Why a request failed; each variant is one HTTP status and one error code.
#[derive(Debug, Error)]
pub enum AdminError {
    /// A malformed request: the protocol's code (`bad_frame`, `bad_client_id`, `bad_topic`,
    /// `payload_too_large`) says which part.
    #[error("{message}")]
    Invalid { code: ErrorCode, message: String },
    #[error("no outbox for client {0}")]
    NoSuchClient(String),
    #[error("client {0} is not subscribed to {1}")]
    NoSuchSubscription(String, String),
    #[error("no such endpoint: {0}")]
    NoRoute(String),
    #[error("method not allowed on this endpoint")]
    Method,
    #[error("a valid `Authorization: Bearer <token>` header is required (admin.token)")]
    Unauthorized,
    #[error("{0}")]
    Conflict(String),
    #[error("the outbox of {0} is full; nothing was written")]
    OutboxFull(ClientId),
    #[error("{0}")]
    KeyReused(String),
    #[error("{}", store_error_message(.0))]
    Store(#[from] StoreError),
    #[error("the broker is shutting down")]
    ShuttingDown,
    #[error("not ready: {0}")]
    NotReady(&'static str),
    #[error("internal task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl AdminError {
    fn invalid(code: ErrorCode, message: impl Into<String>) -> Self {
        AdminError::Invalid {
            code,
            message: message.into(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            AdminError::Invalid {
                code: ErrorCode::PayloadTooLarge,
                ..
            } => StatusCode::PAYLOAD_TOO_LARGE,
            AdminError::Invalid { .. } => StatusCode::BAD_REQUEST,
            AdminError::NoSuchClient(_)
            | AdminError::NoSuchSubscription(..)
            | AdminError::NoRoute(_) => StatusCode::NOT_FOUND,
            AdminError::Method => StatusCode::METHOD_NOT_ALLOWED,
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::Conflict(_) | AdminError::OutboxFull(_) | AdminError::KeyReused(_) => {
                StatusCode::CONFLICT
            }
            AdminError::Store(StoreError::Latched(_) | StoreError::Closed)
            | AdminError::ShuttingDown
            | AdminError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::Store(_) | AdminError::Join(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code: the protocol's, or one of the admin API's own (`not_found`,
    /// `method_not_allowed`, `conflict`).
    fn code(&self) -> &'static str {
        match self {
            AdminError::Invalid { code, .. } => code.as_str(),
            AdminError::NoSuchClient(_)
            | AdminError::NoSuchSubscription(..)
            | AdminError::NoRoute(_) => "not_found",
            AdminError::Method => "method_not_allowed",
            AdminError::Unauthorized => ErrorCode::Unauthorized.as_str(),
            AdminError::Conflict(_) => "conflict",
            AdminError::OutboxFull(_) => ErrorCode::OutboxFull.as_str(),
            AdminError::KeyReused(_) => ErrorCode::KeyReused.as_str(),
            AdminError::Store(_)
            | AdminError::ShuttingDown
            | AdminError::NotReady(_)
            | AdminError::Join(_) => ErrorCode::Internal.as_str(),
        }
    }
}

impl From<PublishRefusal> for AdminError {
    fn from(r: PublishRefusal) -> Self {
        match r {
            PublishRefusal::OutboxFull(c) => AdminError::OutboxFull(c),
            PublishRefusal::KeyReused(e) => AdminError::KeyReused(e.to_string()),
            PublishRefusal::Store(e) => AdminError::Store(e),
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = self.to_string();
        if status.is_server_error() {
            warn!(status = status.as_u16(), error = %message, "admin request failed");
        } else {
            debug!(status = status.as_u16(), error = %message, "admin request refused");
        }
        let body = json!({"error": {"code": self.code(), "message": message}});
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"outboxd admin\""),
            );
        }
        resp
    }
}

/// What every handler shares.
#[derive(Clone)]
struct AdminState {
    shared: Weak<Shared>,
    metrics: Arc<Metrics>,
    /// `None`: no authentication (only allowed on loopback, see the config check).
    token: Option<Arc<[u8]>>,
    max_payload: usize,
}

impl AdminState {
    fn shared(&self) -> Result<Arc<Shared>, AdminError> {
        self.shared.upgrade().ok_or(AdminError::ShuttingDown)
    }
}

/// Binds the admin listener (before the broker says it is ready, so a bad address stops it)
/// and returns it with the address it got (port 0 picks one).
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), AdminStartError> {
    let fail = |source| AdminStartError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(fail)?;
    let bound = listener.local_addr().map_err(fail)?;
    Ok((listener, bound))
}

/// Serves the admin API on `listener` in a task under the broker's tracker, until the
/// shutdown token is cancelled; requests in flight then get [`SHUTDOWN_GRACE`] to finish.
/// With `tls.admin` it speaks HTTPS with the broker's certificate (reloaded with it); each
/// TLS handshake runs in its connection's task and must finish within `server.hello_timeout_ms`.
pub fn spawn(listener: TcpListener, tls: Option<Tls>, shared: &Arc<Shared>) {
    let app = router(shared);
    let shutdown = shared.shutdown.clone();
    let tls = tls.filter(|_| shared.cfg.tls.admin);
    let listener = crate::net::tls::Listener::new(listener, tls, shared.cfg.hello_timeout());
    shared.tracker.spawn(async move {
        let server = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .into_future();
        let grace = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            r = server => if let Err(e) = r {
                warn!(error = %e, "admin API failed");
            },
            _ = grace => warn!(
                grace_s = SHUTDOWN_GRACE.as_secs(),
                "admin API: requests still running after shutdown; dropped"
            ),
        }
        debug!("admin API stopped");
    });
}

/// The routes, with authentication and the body limit (`server.max_frame_bytes`, the same as
/// a WebSocket frame).
fn router(shared: &Arc<Shared>) -> Router {
    let cfg = &shared.cfg;
    let token = cfg.admin.token.as_bytes();
    let state = AdminState {
        shared: Arc::downgrade(shared),
        metrics: Arc::clone(&shared.metrics),
        token: (!token.is_empty()).then(|| Arc::from(token)),
        max_payload: usize::try_from(cfg.limits.max_payload_bytes).unwrap_or(usize::MAX),
    };
    let body_limit = usize::try_from(cfg.server.max_frame_bytes).unwrap_or(usize::MAX);
    let protected = Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/clients", get(clients))
        .route("/v1/clients/{id}", get(client).delete(delete_client))
        .route(
            "/v1/clients/{id}/subscriptions/{topic}",
            axum::routing::delete(unsubscribe),
        )
        .route("/v1/clients/{id}/outbox", get(outbox).delete(purge))
        .route("/v1/topics", get(topics))
        .route("/v1/stats", get(stats))
        .route("/v1/publish", post(publish))
        .route("/v1/backup", post(backup))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(protected)
        .fallback(|req: Request| async move { AdminError::NoRoute(req.uri().path().to_owned()) })
        .method_not_allowed_fallback(|| async { AdminError::Method })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// True when `given` equals `expected`, in time that depends only on `expected`'s length.
fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, e) in expected.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(0) ^ e);
    }
    std::hint::black_box(diff) == 0
}

/// The bearer token of an `Authorization` header (scheme name case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

async fn require_token(State(st): State<AdminState>, req: Request, next: Next) -> Response {
    if let Some(expected) = &st.token {
        let ok = bearer(req.headers()).is_some_and(|t| constant_time_eq(t.as_bytes(), expected));
        if !ok {
            st.metrics.admin_unauthorized.inc();
            return AdminError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// Runs a store read off the async runtime (a scan, or a walk of the data directory).
/// An inspector that sees every ack the broker has received before this request: the store's
/// writer holds acks back to batch them, and a view read past them would show stale counts.
async fn settled(shared: &Shared) -> Result<Inspector, AdminError> {
    shared.store.settle().await?;
    Ok(shared.store.inspector())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, AdminError> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

fn client_id(path: Result<Path<String>, PathRejection>) -> Result<ClientId, AdminError> {
    let Path(id) = path.map_err(|e| AdminError::invalid(ErrorCode::BadFrame, e.body_text()))?;
    ClientId::new(&id).map_err(|e| AdminError::invalid(ErrorCode::BadClientId, e.to_string()))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, AdminError> {
    q.map(|Query(t)| t)
        .map_err(|e| AdminError::invalid(ErrorCode::BadFrame, e.body_text()))
}

fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, AdminError> {
    b.map_err(|e| {
        let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ErrorCode::PayloadTooLarge
        } else {
            ErrorCode::BadFrame
        };
        AdminError::invalid(
            code,
            format!(
                "cannot read the request body: {} (the limit is server.max_frame_bytes)",
                e.body_text()
            ),
        )
    })
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// 200 while the store is open and accepts writes; 503 once it latched or shutdown began.
async fn readyz(State(st): State<AdminState>) -> Result<Json<serde_json::Value>, AdminError> {
    let shared = st.shared()?;
    if shared.shutdown.is_cancelled() {
        return Err(AdminError::ShuttingDown);
    }
    if shared.store.is_latched() {
        return Err(AdminError::NotReady(
            "the store refuses writes since a write or fsync failed; \
             fix the disk and restart the broker",
        ));
    }
    if shared.store.is_unavailable() {
        return Err(AdminError::NotReady(
            "the broker cannot reach its database: nothing is confirmed until it is back",
        ));
    }
    Ok(Json(json!({"status": "ready"})))
}

async fn metrics(State(st): State<AdminState>) -> Result<Response, AdminError> {
    let shared = st.shared()?;
    let store = shared.store.clone();
    let totals = store.outbox_totals().await?;
    let gauges = ScrapeGauges {
        outboxes: totals.outboxes,
        sessions: u64::try_from(shared.registry.connected()).unwrap_or(u64::MAX),
        pending_messages: totals.pending_messages,
        pending_bytes: totals.pending_bytes,
        max_pending_messages: totals.max_pending_messages,
        max_pending_bytes: totals.max_pending_bytes,
        latched: shared.store.is_latched(),
    };
    let text = st.metrics.render(&gauges);
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response())
}

/// How `GET /v1/clients` orders its list (`?sort=`, default by name).
fn sort_by(s: Option<&str>) -> Result<SortBy, AdminError> {
    match s {
        None | Some("") => Ok(SortBy::Name),
        Some(name) => SortBy::parse(name).ok_or_else(|| {
            AdminError::invalid(
                ErrorCode::BadFrame,
                format!("sort must be pending, bytes, age or name, got {name:?}"),
            )
        }),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientsQuery {
    sort: Option<String>,
    /// 0 or absent: every client.
    limit: Option<usize>,
}

fn mark_connected(shared: &Shared, view: &mut ClientView) {
    view.connected =
        Some(ClientId::new(&view.client_id).is_ok_and(|id| shared.registry.is_connected(&id)));
}

async fn clients(
    State(st): State<AdminState>,
    q: Result<Query<ClientsQuery>, QueryRejection>,
) -> Result<Json<Vec<ClientView>>, AdminError> {
    let q = query(q)?;
    let by = sort_by(q.sort.as_deref())?;
    let shared = st.shared()?;
    let inspector = settled(&shared).await?;
    let mut list: Vec<ClientView> = blocking(move || inspector.clients())
        .await?
        .into_iter()
        .map(ClientView::from)
        .collect();
    by.sort(&mut list);
    if let Some(n) = q.limit.filter(|n| *n > 0) {
        list.truncate(n);
    }
    for view in &mut list {
        mark_connected(&shared, view);
    }
    Ok(Json(list))
}

async fn client(
    State(st): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<ClientView>, AdminError> {
    let id = client_id(path)?;
    let shared = st.shared()?;
    let inspector = settled(&shared).await?;
    let name = id.as_str().to_owned();
    let mut view = blocking(move || inspector.client(&name))
        .await?
        .map(ClientView::from)
        .ok_or_else(|| AdminError::NoSuchClient(id.to_string()))?;
    mark_connected(&shared, &mut view);
    Ok(Json(view))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutboxQuery {
    from: Option<u64>,
    limit: Option<usize>,
}

async fn outbox(
    State(st): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
    q: Result<Query<OutboxQuery>, QueryRejection>,
) -> Result<Response, AdminError> {
    let id = client_id(path)?;
    let q = query(q)?;
    let limit = match q.limit {
        None => DEFAULT_PAGE,
        Some(0) => {
            return Err(AdminError::invalid(
                ErrorCode::BadFrame,
                format!("limit must be 1 to {MAX_PAGE}"),
            ))
        }
        Some(n) => n.min(MAX_PAGE),
    };
    let from = q.from.unwrap_or(0);
    let shared = st.shared()?;
    let inspector = settled(&shared).await?;
    let name = id.as_str().to_owned();
    let mut page = blocking(move || inspector.outbox(&name, from, limit))
        .await?
        .map(crate::views::OutboxPage::from)
        .ok_or_else(|| AdminError::NoSuchClient(id.to_string()))?;
    // How often this process has sent each message (0 when never, or not since it started).
    let handle = shared.store.outbox(&id);
    for m in &mut page.messages {
        m.deliveries = Some(handle.as_ref().map_or(0, |h| u64::from(h.sends_of(m.seq))));
    }
    Ok(Json(page).into_response())
}

async fn purge(
    State(st): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, AdminError> {
    let id = client_id(path)?;
    let shared = st.shared()?;
    let outcome = shared
        .store
        .purge(id.clone())
        .await?
        .ok_or_else(|| AdminError::NoSuchClient(id.to_string()))?;
    st.metrics.purged.add(outcome.removed);
    // After the commit: the session must not outlive the epoch it was serving.
    let disconnected = shared.registry.kick(&id, Kick::Purged);
    info!(client = %id, disconnected, "purge requested through the admin API");
    Ok(Json(json!({
        "client_id": id.as_str(),
        "removed": outcome.removed,
        "epoch": outcome.epoch,
        "disconnected": disconnected,
    })))
}

/// `DELETE /v1/clients/{id}`: the outbox and everything under it (messages, tombstones,
/// subscriptions) is deleted; a connected client is closed with 4002, and its next hello makes
/// a new outbox with a new epoch.
async fn delete_client(
    State(st): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, AdminError> {
    let id = client_id(path)?;
    let shared = st.shared()?;
    let removed = shared
        .store
        .delete(id.clone())
        .await?
        .ok_or_else(|| AdminError::NoSuchClient(id.to_string()))?;
    st.metrics.purged.add(removed);
    let disconnected = shared.registry.kick(&id, Kick::Purged);
    warn!(client = %id, removed, disconnected, "client deleted through the admin API");
    Ok(Json(json!({
        "client_id": id.as_str(),
        "deleted": true,
        "removed": removed,
        "disconnected": disconnected,
    })))
}

/// `DELETE /v1/clients/{id}/subscriptions/{topic}`: ends one durable subscription.
async fn unsubscribe(
    State(st): State<AdminState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<serde_json::Value>, AdminError> {
    let Path((id, topic)) =
        path.map_err(|e| AdminError::invalid(ErrorCode::BadFrame, e.body_text()))?;
    let id = ClientId::new(&id)
        .map_err(|e| AdminError::invalid(ErrorCode::BadClientId, e.to_string()))?;
    let topic = crate::model::Topic::new(&topic)
        .map_err(|e| AdminError::invalid(ErrorCode::BadTopic, e.to_string()))?;
    let shared = st.shared()?;
    let inspector = settled(&shared).await?;
    let name = id.as_str().to_owned();
    let view = blocking(move || inspector.client(&name))
        .await?
        .ok_or_else(|| AdminError::NoSuchClient(id.to_string()))?;
    if !view.subscriptions.iter().any(|t| t == topic.as_str()) {
        return Err(AdminError::NoSuchSubscription(
            id.to_string(),
            topic.to_string(),
        ));
    }
    shared
        .store
        .subscribe(id.clone(), topic.clone(), false)
        .await?;
    info!(client = %id, topic = %topic, "subscription ended through the admin API");
    Ok(Json(json!({
        "client_id": id.as_str(),
        "topic": topic.as_str(),
        "subscribed": false,
    })))
}

async fn topics(
    State(st): State<AdminState>,
) -> Result<Json<Vec<crate::views::TopicView>>, AdminError> {
    let shared = st.shared()?;
    let inspector = settled(&shared).await?;
    let topics = blocking(move || inspector.topics()).await?;
    Ok(Json(topics.into_iter().map(Into::into).collect()))
}

async fn stats(State(st): State<AdminState>) -> Result<Json<crate::views::StatsView>, AdminError> {
    let shared = st.shared()?;
    let inspector = settled(&shared).await?;
    Ok(Json(blocking(move || inspector.stats()).await?.into()))
}

/// Turns a `POST /v1/publish` body into the store's request, with the WebSocket protocol's
/// own parser: the body's fields (less `from`) become a `publish` frame, so the checks, the
/// error codes and the verbatim JSON payload are exactly those of a WebSocket publish.
fn parse_publish(body: &[u8], max_payload: usize) -> Result<PublishRequest, AdminError> {
    let bad = |m: String| AdminError::invalid(ErrorCode::BadFrame, m);
    let mut fields: BTreeMap<String, Box<RawValue>> =
        serde_json::from_slice(body).map_err(|e| {
            match serde_json::from_slice::<serde_json::Value>(body) {
                Err(_) => bad(format!("the body is not JSON: {e}")),
                Ok(_) => bad("the body must be a JSON object".into()),
            }
        })?;
    if let Some(unknown) = fields
        .keys()
        .find(|k| !PUBLISH_FIELDS.contains(&k.as_str()))
    {
        return Err(bad(format!(
            "unknown field {unknown:?}; a publish has to, payload or payload_b64, and optionally key, ttl_ms, from"
        )));
    }
    let from =
        match fields.remove("from") {
            None => None,
            Some(raw) => match serde_json::from_str::<Option<String>>(raw.get()) {
                Ok(None) => None,
                Ok(Some(s)) => Some(ClientId::new(&s).map_err(|e| {
                    AdminError::invalid(ErrorCode::BadClientId, format!("from: {e}"))
                })?),
                Err(_) => return Err(bad("`from` must be a client id string".into())),
            },
        };
    let mut frame = String::with_capacity(body.len() + 24);
    frame.push_str(r#"{"type":"publish""#);
    for (k, v) in &fields {
        // Keys are from PUBLISH_FIELDS: plain ASCII, nothing to escape.
        frame.push_str(",\"");
        frame.push_str(k);
        frame.push_str("\":");
        frame.push_str(v.get());
    }
    frame.push('}');
    match protocol::parse_client_frame(&frame, max_payload) {
        Ok(ClientFrame::Publish(p)) => Ok(PublishRequest {
            from,
            to: p.to,
            payload: p.payload,
            key: p.key,
            ttl_ms: p.ttl_ms,
        }),
        Ok(_) => Err(bad("not a publish".into())),
        Err(e) => Err(AdminError::invalid(e.code, e.message)),
    }
}

async fn publish(
    State(st): State<AdminState>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, AdminError> {
    let req = match body(b).and_then(|b| parse_publish(&b, st.max_payload)) {
        Ok(r) => r,
        Err(e) => {
            if let AdminError::Invalid { code, .. } = &e {
                st.metrics.refused(*code);
            }
            return Err(e);
        }
    };
    let shared = st.shared()?;
    let direct = match &req.to {
        Target::Client(c) => Some(c.clone()),
        Target::Topic(_) => None,
    };
    // Answers only after the commit (fsync) that covers the write, as over the WebSocket.
    // If the HTTP client goes away meanwhile, the publish still completes: it retries with
    // the same `key`.
    let r = shared.store.publish(req).await;
    let ok = publish_answer(direct.as_ref(), r, &st.metrics)?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        ok.encode(None),
    )
        .into_response())
}

/// A target inside the data directory is a bad request (400), not a store failure.
fn backup_refusal(e: StoreError) -> AdminError {
    match e {
        e @ StoreError::BackupInsideDataDir { .. } => {
            AdminError::invalid(ErrorCode::BadFrame, e.to_string())
        }
        other => AdminError::Store(other),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupBody {
    to: PathBuf,
}

async fn backup(
    State(st): State<AdminState>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, AdminError> {
    let b = body(b)?;
    let BackupBody { to } = serde_json::from_slice(&b).map_err(|e| {
        AdminError::invalid(
            ErrorCode::BadFrame,
            format!("the body must be {{\"to\": \"/absolute/dir\"}}: {e}"),
        )
    })?;
    if !to.is_absolute() {
        return Err(AdminError::invalid(
            ErrorCode::BadFrame,
            format!(
                "`to` must be an absolute path on the broker's machine, got {}",
                to.display()
            ),
        ));
    }
    let shared = st.shared()?;
    let target = to.clone();
    let checked = Arc::clone(&shared);
    // Path resolution and a directory read: file system calls, off the runtime.
    let (inside, occupied) = tokio::task::spawn_blocking(move || {
        let inside = checked.store.check_backup_target(&target);
        let occupied = std::fs::read_dir(&target).is_ok_and(|mut d| d.next().is_some());
        (inside, occupied)
    })
    .await?;
    inside.map_err(backup_refusal)?;
    if occupied {
        return Err(AdminError::Conflict(format!(
            "the backup target {} exists and is not empty; pick a new directory",
            to.display()
        )));
    }
    let outcome = shared
        .store
        .backup(to.clone())
        .await
        .map_err(backup_refusal)?;
    info!(to = %to.display(), records = outcome.records, bytes = outcome.bytes,
          "backup written through the admin API");
    Ok(Json(json!({
        "records": outcome.records,
        "bytes": outcome.bytes,
        "to": to.display().to_string(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Payload;

    #[test]
    fn token_comparison_needs_the_exact_token() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cre", b"s3cret"));
        assert!(!constant_time_eq(b"s3cretx", b"s3cret"));
        assert!(!constant_time_eq(b"", b"s3cret"));
        assert!(!constant_time_eq(b"S3cret", b"s3cret"));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_other_schemes_are_not_tokens() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.remove(header::AUTHORIZATION);
        assert_eq!(bearer(&h), None);
    }

    fn code(body: &str) -> &'static str {
        match parse_publish(body.as_bytes(), 100) {
            Err(e) => e.code(),
            Ok(r) => panic!("expected a refusal for {body}, got {r:?}"),
        }
    }

    #[test]
    fn http_publish_keeps_the_json_payload_verbatim() {
        let r = parse_publish(
            br#"{"to":"client:bob","payload":{"a": [1, 2.50]},"key":"k1","ttl_ms":5,"from":"backend"}"#,
            100,
        )
        .unwrap();
        assert_eq!(r.payload, Payload::Json(r#"{"a": [1, 2.50]}"#.into()));
        assert_eq!(r.key.as_deref(), Some("k1"));
        assert_eq!(r.ttl_ms, Some(5));
        assert_eq!(r.from.unwrap().as_str(), "backend");
        let r =
            parse_publish(br#"{"to":"topic:t","payload_b64":"AP8=","from":null}"#, 100).unwrap();
        assert_eq!(r.payload, Payload::Binary(vec![0, 255]));
        assert!(r.from.is_none());
    }

    #[test]
    fn http_publish_refusals_use_the_protocol_codes() {
        assert_eq!(code("nope"), "bad_frame");
        assert_eq!(code("[1]"), "bad_frame");
        assert_eq!(code(r#"{"to":"client:bob"}"#), "bad_frame");
        assert_eq!(code(r#"{"to":"queue:x","payload":1}"#), "bad_frame");
        assert_eq!(code(r#"{"to":"client:a b","payload":1}"#), "bad_client_id");
        assert_eq!(code(r#"{"to":"topic:a#","payload":1}"#), "bad_topic");
        assert_eq!(
            code(r#"{"to":"client:b","payload":1,"from":"x y"}"#),
            "bad_client_id"
        );
        assert_eq!(
            code(r#"{"to":"client:b","payload":1,"from":7}"#),
            "bad_frame"
        );
        assert_eq!(
            code(r#"{"to":"client:b","payload":1,"type":"ack"}"#),
            "bad_frame"
        );
        assert_eq!(
            code(r#"{"to":"client:b","payload":1,"key":""}"#),
            "bad_frame"
        );
        let big = format!(r#"{{"to":"client:b","payload":"{}"}}"#, "x".repeat(200));
        assert_eq!(code(&big), "payload_too_large");
    }

    #[test]
    fn error_statuses_follow_the_documented_table() {
        let s = |e: AdminError| e.status().as_u16();
        assert_eq!(s(AdminError::invalid(ErrorCode::BadTopic, "x")), 400);
        assert_eq!(s(AdminError::invalid(ErrorCode::PayloadTooLarge, "x")), 413);
        assert_eq!(s(AdminError::NoSuchClient("a".into())), 404);
        assert_eq!(s(AdminError::Unauthorized), 401);
        assert_eq!(s(AdminError::OutboxFull(ClientId::new("a").unwrap())), 409);
        assert_eq!(s(AdminError::Store(StoreError::Latched("x".into()))), 503);
        assert_eq!(s(AdminError::Store(StoreError::Closed)), 503);
        assert_eq!(
            s(AdminError::Store(StoreError::Io(std::io::Error::other(
                "x"
            )))),
            500
        );
    }

    #[test]
    fn clients_sort_by_age_puts_empty_outboxes_last() {
        let view = |name: &str, pending: u64, ts: Option<u64>| ClientView {
            client_id: name.into(),
            epoch: "e".into(),
            pending,
            bytes: pending * 10,
            next_seq: 1,
            acked: 0,
            oldest_unacked_ts: ts,
            last_seen: None,
            connected: None,
            subscriptions: vec![],
        };
        let mut list = vec![
            view("a", 0, None),
            view("b", 2, Some(20)),
            view("c", 5, Some(10)),
        ];
        SortBy::Age.sort(&mut list);
        let names: Vec<_> = list.iter().map(|c| c.client_id.as_str()).collect();
        assert_eq!(names, ["c", "b", "a"]);
        SortBy::Pending.sort(&mut list);
        let names: Vec<_> = list.iter().map(|c| c.client_id.as_str()).collect();
        assert_eq!(names, ["c", "b", "a"]);
        SortBy::Name.sort(&mut list);
        let names: Vec<_> = list.iter().map(|c| c.client_id.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert!(sort_by(Some("size")).is_err());
    }
}
