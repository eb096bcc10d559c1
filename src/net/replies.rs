//! The answers a connection owes its peer for publishes and subscribes, in request order.
//!
//! The store answers one connection's requests in the order they were queued, so only the
//! oldest answer is ever waited on: a queue, not a set of futures polled together (a
//! `FuturesOrdered` cost an allocation and a task of its own, woken and polled, per publish).
//! A publish's answer is made here from the store's outcome (`broker::publish_answer`).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;

use tokio::sync::oneshot;

use crate::broker::publish_answer;
use crate::metrics::Metrics;
use crate::model::ClientId;
use crate::protocol::encode_error;
use crate::store::{PublishOutcome, StoreError};

/// An answer the connection owes its peer, in request order.
pub(super) enum Reply {
    /// A publish the store has taken: its outcome arrives once its group is durable.
    Publish {
        rx: oneshot::Receiver<Result<PublishOutcome, StoreError>>,
        reference: Option<Box<serde_json::value::RawValue>>,
        /// The recipient of a direct publish (a topic's are named by the outcome).
        direct: Option<ClientId>,
    },
    /// Any other request (a subscribe): the frame it answers with, once done.
    Other(Pin<Box<dyn Future<Output = String> + Send>>),
}

/// Replies to publishes and subscribes, in request order.
///
/// The store answers one connection's requests in the order they were queued, so only the
/// oldest reply is ever waited on: a queue, not a set of futures polled together (which cost
/// an allocation and a wake-up of its own per publish).
#[derive(Default)]
pub(super) struct Replies(VecDeque<Reply>);

impl Replies {
    pub(super) fn push_back(&mut self, reply: Reply) {
        self.0.push_back(reply);
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The frame answering the oldest request, once it is done; `None` when none is pending.
    /// Cancel-safe: the reply leaves the queue only when its frame is returned.
    pub(super) async fn next(&mut self, metrics: &Metrics) -> Option<String> {
        let frame = match self.0.front_mut()? {
            Reply::Publish {
                rx,
                reference,
                direct,
            } => {
                let r = rx.await.unwrap_or(Err(StoreError::Closed));
                match publish_answer(direct.as_ref(), r, metrics) {
                    Ok(ok) => ok.encode(reference.as_deref()),
                    Err(refusal) => {
                        encode_error(reference.as_deref(), refusal.code(), &refusal.message())
                    }
                }
            }
            Reply::Other(reply) => reply.await,
        };
        self.0.pop_front();
        Some(frame)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn publish(reference: u64) -> (oneshot::Sender<Result<PublishOutcome, StoreError>>, Reply) {
        let (tx, rx) = oneshot::channel();
        let reference = serde_json::value::RawValue::from_string(reference.to_string()).ok();
        let reply = Reply::Publish {
            rx,
            reference,
            direct: None,
        };
        (tx, reply)
    }

    fn outcome(id: &str) -> Result<PublishOutcome, StoreError> {
        Ok(PublishOutcome {
            id: id.into(),
            recipients: 1,
            duplicate: false,
            full: Vec::new(),
        })
    }

    #[tokio::test]
    async fn answers_go_out_in_request_order_whatever_order_they_are_ready_in() {
        let metrics = Metrics::default();
        let mut replies = Replies::default();
        let (first, r1) = publish(1);
        let (second, r2) = publish(2);
        replies.push_back(r1);
        replies.push_back(r2);
        replies.push_back(Reply::Other(Box::pin(async { "subscribed".to_string() })));
        assert_eq!(replies.len(), 3);

        // The second is ready, the first is not: nothing goes out, and the wait given up
        // loses nothing.
        let _ = second.send(outcome("b"));
        let early = tokio::time::timeout(Duration::from_millis(20), replies.next(&metrics)).await;
        assert!(
            early.is_err(),
            "an answer overtook an earlier one: {early:?}"
        );
        assert_eq!(replies.len(), 3);

        let _ = first.send(outcome("a"));
        let a = replies.next(&metrics).await.unwrap_or_default();
        let b = replies.next(&metrics).await.unwrap_or_default();
        assert!(a.contains(r#""ref":1"#) && a.contains(r#""id":"a""#), "{a}");
        assert!(b.contains(r#""ref":2"#) && b.contains(r#""id":"b""#), "{b}");
        assert_eq!(replies.next(&metrics).await.as_deref(), Some("subscribed"));
        assert!(replies.is_empty());
        assert_eq!(replies.next(&metrics).await, None);
    }

    #[tokio::test]
    async fn a_publish_whose_store_went_away_is_answered_internal() {
        let metrics = Metrics::default();
        let mut replies = Replies::default();
        let (gone, reply) = publish(7);
        replies.push_back(reply);
        drop(gone);
        let frame = replies.next(&metrics).await.unwrap_or_default();
        assert!(
            frame.contains(r#""type":"error""#) && frame.contains(r#""ref":7"#),
            "{frame}"
        );
        assert!(frame.contains("internal"), "{frame}");
    }
}
