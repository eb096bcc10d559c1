//! The publish rule both transports share: what a publisher is told about a publish the store
//! answered, the same over the WebSocket (`connection`) and the admin API's HTTP publish
//! (`admin`), and how refusals are counted.

use crate::metrics::Metrics;
use crate::model::ClientId;
use crate::protocol::{self, ErrorCode};
use crate::store::{PublishOutcome, StoreError};

/// A publish confirmed durable: the parts of its `ok`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PublishOk {
    pub id: String,
    pub recipients: u64,
    pub duplicate: bool,
    pub refused: Vec<protocol::Refused>,
}

impl PublishOk {
    /// The `ok` frame (also the admin API's answer, without `ref`).
    pub fn encode(&self, reference: Option<&serde_json::value::RawValue>) -> String {
        protocol::encode_publish_ok(
            reference,
            &self.id,
            self.recipients,
            self.duplicate,
            &self.refused,
        )
    }
}

/// Why a publish was not confirmed.
#[derive(Debug)]
pub(crate) enum PublishRefusal {
    /// A direct publish to a full outbox: nothing was written.
    OutboxFull(ClientId),
    /// The key was named for another message within the dedup window: nothing was written.
    KeyReused(StoreError),
    /// The store failed or refuses writes: nothing was written.
    Store(StoreError),
}

impl PublishRefusal {
    pub fn code(&self) -> ErrorCode {
        match self {
            PublishRefusal::OutboxFull(_) => ErrorCode::OutboxFull,
            PublishRefusal::KeyReused(_) => ErrorCode::KeyReused,
            PublishRefusal::Store(_) => ErrorCode::Internal,
        }
    }

    pub fn message(&self) -> String {
        match self {
            PublishRefusal::OutboxFull(c) => {
                format!("the outbox of {c} is full; nothing was written")
            }
            PublishRefusal::KeyReused(e) => e.to_string(),
            PublishRefusal::Store(e) => store_error_message(e),
        }
    }
}

/// Turns the store's answer to a publish into what the publisher is told, the same over the
/// WebSocket and the admin API: a direct publish that found its outbox full is refused
/// (`outbox_full`); a topic publish is confirmed and lists the subscribers it skipped. Counts
/// refusals in `metrics`. `direct` is the recipient of a direct publish, None for a topic.
pub(crate) fn publish_answer(
    direct: Option<&ClientId>,
    r: Result<PublishOutcome, StoreError>,
    metrics: &Metrics,
) -> Result<PublishOk, PublishRefusal> {
    match r {
        Ok(o) => match direct {
            Some(c) if !o.full.is_empty() => {
                metrics.refused(ErrorCode::OutboxFull);
                Err(PublishRefusal::OutboxFull(c.clone()))
            }
            _ => {
                let refused: Vec<protocol::Refused> = o
                    .full
                    .iter()
                    .map(|c| protocol::Refused {
                        client_id: c.as_str().to_owned(),
                        code: ErrorCode::OutboxFull.as_str().to_owned(),
                    })
                    .collect();
                metrics.refused_n(
                    ErrorCode::OutboxFull,
                    u64::try_from(refused.len()).unwrap_or(u64::MAX),
                );
                Ok(PublishOk {
                    id: o.id,
                    recipients: o.recipients,
                    duplicate: o.duplicate,
                    refused,
                })
            }
        },
        Err(e @ StoreError::KeyReused { .. }) => {
            metrics.refused(ErrorCode::KeyReused);
            Err(PublishRefusal::KeyReused(e))
        }
        Err(e) => {
            metrics.refused(ErrorCode::Internal);
            Err(PublishRefusal::Store(e))
        }
    }
}

/// What a publisher is told about a store failure.
pub(crate) fn store_error_message(e: &StoreError) -> String {
    match e {
        StoreError::Latched(_) => {
            "the broker's store refuses writes after a disk failure; nothing was written"
                .to_string()
        }
        StoreError::Closed => "the broker is shutting down; nothing was written".to_string(),
        StoreError::TooManySubscriptions { .. } => e.to_string(),
        other => format!("store failure: {other}"),
    }
}
