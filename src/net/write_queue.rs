//! The bounded queue between a connection's session loop and its writer task.
//!
//! A connection holds one of these for its whole life, and most connections are idle most of
//! the time, so the queue costs nothing while it is empty: the frames sit in a `VecDeque` that
//! grows with use, and the writer gives the buffer back each time it has written everything
//! queued. (A tokio `mpsc` channel allocates a block of 32 slots and its shared state up front,
//! about 2.3 KiB per connection before the first frame.)
//!
//! The semantics are those of a bounded channel with one sender and one receiver:
//! - [`Sender::try_send`] never waits: it fails with [`TrySendError::Full`] at the bound and
//!   with [`TrySendError::Closed`] once the receiver is gone, and gives the frame back;
//! - a frame frees its slot when the receiver takes it, not when it is written, so
//!   [`Sender::capacity`] never counts frames the writer holds;
//! - dropping the sender closes the queue: the receiver gets everything queued, then `None`;
//! - [`Sender::kill`] hands the writer one frame that jumps the queue (the close frame for a
//!   peer that does not read), and [`Receiver::batch_written`] wakes the sender's
//!   [`Drained`] waiter each time a batch is on the wire.
//!
//! No I/O here; the writer task in [`crate::net::connection`] owns the socket.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

/// Why [`Sender::try_send`] refused a frame; the frame comes back with the error.
#[derive(Debug, thiserror::Error)]
pub enum TrySendError<T> {
    /// The queue holds its bound of frames: the peer does not read fast enough.
    #[error("write queue full")]
    Full(T),
    /// The writer has ended (the socket failed or was closed).
    #[error("write queue closed: the writer has ended")]
    Closed(T),
}

impl<T> TrySendError<T> {
    /// The frame that was not queued.
    pub fn into_inner(self) -> T {
        match self {
            TrySendError::Full(t) | TrySendError::Closed(t) => t,
        }
    }
}

/// Creates a queue that holds at most `bound` frames (at least one).
pub fn channel<T>(bound: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            sender_gone: false,
            receiver_gone: false,
            kill: None,
        }),
        ready: Notify::new(),
        killed: Notify::new(),
        drained: Notify::new(),
    });
    let bound = bound.max(1);
    (
        Sender {
            shared: Arc::clone(&shared),
            bound,
        },
        Receiver { shared },
    )
}

struct Shared<T> {
    // A std mutex, not a tokio one: it is held only for a push or a pop, never across `.await`.
    state: Mutex<State<T>>,
    /// A frame was queued, or the sender is gone.
    ready: Notify,
    /// A kill frame was set.
    killed: Notify,
    /// The writer has written a batch.
    drained: Notify,
}

struct State<T> {
    items: VecDeque<T>,
    sender_gone: bool,
    receiver_gone: bool,
    kill: Option<T>,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding the lock cannot leave the state half-changed (each critical
        // section is one push, pop or flag), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The session loop's end. Dropping it closes the queue.
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
    bound: usize,
}

impl<T> Sender<T> {
    /// Queues `item` without waiting.
    ///
    /// # Errors
    /// [`TrySendError::Closed`] once the receiver is gone, else [`TrySendError::Full`] when the
    /// queue holds its bound.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        {
            let mut st = self.shared.lock();
            if st.receiver_gone {
                return Err(TrySendError::Closed(item));
            }
            if st.items.len() >= self.bound {
                return Err(TrySendError::Full(item));
            }
            st.items.push_back(item);
        }
        self.shared.ready.notify_one();
        Ok(())
    }

    /// How many more frames the queue takes now.
    pub fn capacity(&self) -> usize {
        self.bound.saturating_sub(self.shared.lock().items.len())
    }

    /// Hands the writer `item` ahead of everything queued; the writer sends it and ends. A
    /// later kill replaces an earlier one not yet taken. Does nothing once the receiver is gone.
    pub fn kill(&self, item: T) {
        {
            let mut st = self.shared.lock();
            if st.receiver_gone {
                return;
            }
            st.kill = Some(item);
        }
        self.shared.killed.notify_one();
    }

    /// A handle that waits for the writer's next written batch; it does not borrow the sender.
    pub fn drained(&self) -> Drained<T> {
        Drained {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.shared.lock().sender_gone = true;
        self.shared.ready.notify_one();
    }
}

/// Waits for the writer to finish a batch.
pub struct Drained<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Drained<T> {
    /// Completes after the next [`Receiver::batch_written`], or at once if one happened since
    /// the last wait completed. Cancel-safe: a dropped wait loses no signal.
    pub fn notified(&self) -> Notified<'_> {
        self.shared.drained.notified()
    }
}

/// The writer task's end. Dropping it closes the queue and drops what is still queued.
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// The next frame; `None` once the sender is gone and everything queued was taken.
    /// Cancel-safe: a frame is taken only in the poll that returns it.
    pub async fn recv(&self) -> Option<T> {
        loop {
            {
                let mut st = self.shared.lock();
                if let Some(item) = st.items.pop_front() {
                    return Some(item);
                }
                if st.sender_gone {
                    return None;
                }
            }
            // A frame queued between the check above and this wait stored a permit in
            // `ready`, so the wait ends at once: no wake-up is lost.
            self.shared.ready.notified().await;
        }
    }

    /// The next frame if one is queued now.
    pub fn try_recv(&self) -> Option<T> {
        self.shared.lock().items.pop_front()
    }

    /// The kill frame, once [`Sender::kill`] sets one. Cancel-safe.
    pub async fn killed(&self) -> T {
        loop {
            if let Some(item) = self.shared.lock().kill.take() {
                return item;
            }
            self.shared.killed.notified().await;
        }
    }

    /// Marks a batch as written: wakes the sender's [`Drained`] waiter and, when nothing is
    /// queued, gives the queue's buffer back so an idle connection holds none. Busy connections
    /// pay one small allocation per batch for that.
    pub fn batch_written(&self) {
        let spare = {
            let mut st = self.shared.lock();
            if st.items.is_empty() && st.items.capacity() > 0 {
                Some(std::mem::take(&mut st.items))
            } else {
                None
            }
        };
        drop(spare);
        self.shared.drained.notify_one();
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let (items, kill) = {
            let mut st = self.shared.lock();
            st.receiver_gone = true;
            (std::mem::take(&mut st.items), st.kill.take())
        };
        // Dropped outside the lock: frames own buffers, and freeing them needs no lock.
        drop(items);
        drop(kill);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    fn poll_once<F: Future>(f: F) -> Poll<F::Output> {
        let mut f = pin!(f);
        f.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn try_send_fails_full_at_the_bound_and_gives_the_frame_back() {
        let (tx, _rx) = channel(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        match tx.try_send(3) {
            Err(TrySendError::Full(3)) => {}
            other => panic!("expected Full(3), got {other:?}"),
        }
    }

    #[test]
    fn try_send_fails_closed_once_the_receiver_is_gone() {
        let (tx, rx) = channel(2);
        tx.try_send(1).unwrap();
        drop(rx);
        assert!(matches!(tx.try_send(2), Err(TrySendError::Closed(2))));
    }

    #[test]
    fn closed_wins_over_full() {
        let (tx, rx) = channel(1);
        tx.try_send(1).unwrap();
        drop(rx);
        assert!(matches!(tx.try_send(2), Err(TrySendError::Closed(2))));
    }

    #[test]
    fn capacity_counts_free_slots_and_a_taken_frame_frees_its_slot() {
        let (tx, rx) = channel(3);
        assert_eq!(tx.capacity(), 3);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(tx.capacity(), 1);
        assert_eq!(rx.try_recv(), Some(1));
        assert_eq!(tx.capacity(), 2);
    }

    #[test]
    fn a_zero_bound_holds_one_frame() {
        let (tx, _rx) = channel::<u32>(0);
        assert_eq!(tx.capacity(), 1);
    }

    #[test]
    fn frames_come_out_in_order() {
        let (tx, rx) = channel(8);
        for i in 0..5 {
            tx.try_send(i).unwrap();
        }
        assert_eq!(poll_once(rx.recv()), Poll::Ready(Some(0)));
        let rest: Vec<_> = std::iter::from_fn(|| rx.try_recv()).collect();
        assert_eq!(rest, vec![1, 2, 3, 4]);
        assert_eq!(rx.try_recv(), None);
    }

    #[test]
    fn recv_waits_while_empty_and_a_send_wakes_it() {
        let (tx, rx) = channel(4);
        assert_eq!(poll_once(rx.recv()), Poll::Pending);
        tx.try_send(7).unwrap();
        assert_eq!(poll_once(rx.recv()), Poll::Ready(Some(7)));
    }

    #[test]
    fn dropping_the_sender_delivers_what_is_queued_then_ends() {
        let (tx, rx) = channel(4);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        drop(tx);
        assert_eq!(poll_once(rx.recv()), Poll::Ready(Some(1)));
        assert_eq!(poll_once(rx.recv()), Poll::Ready(Some(2)));
        assert_eq!(poll_once(rx.recv()), Poll::Ready(None));
    }

    #[test]
    fn kill_jumps_the_queue_and_the_last_one_wins() {
        let (tx, rx) = channel(4);
        assert_eq!(poll_once(rx.killed()), Poll::Pending);
        tx.try_send(1).unwrap();
        tx.kill(8);
        tx.kill(9);
        assert_eq!(poll_once(rx.killed()), Poll::Ready(9));
        assert_eq!(poll_once(rx.killed()), Poll::Pending);
        assert_eq!(rx.try_recv(), Some(1));
    }

    #[test]
    fn a_kill_before_the_sender_drops_is_still_delivered() {
        let (tx, rx) = channel(1);
        tx.try_send(1).unwrap();
        tx.kill(9);
        drop(tx);
        assert_eq!(poll_once(rx.killed()), Poll::Ready(9));
    }

    #[test]
    fn a_written_batch_wakes_the_drained_waiter_even_if_it_waits_later() {
        let (tx, rx) = channel::<u32>(4);
        let drained = tx.drained();
        assert_eq!(poll_once(drained.notified()), Poll::Pending);
        rx.batch_written();
        assert_eq!(poll_once(drained.notified()), Poll::Ready(()));
        assert_eq!(poll_once(drained.notified()), Poll::Pending);
    }

    #[test]
    fn an_emptied_queue_gives_its_buffer_back_after_a_batch() {
        let (tx, rx) = channel(256);
        for i in 0..100 {
            tx.try_send(i).unwrap();
        }
        while rx.try_recv().is_some() {}
        assert!(rx.shared.lock().items.capacity() >= 100);
        rx.batch_written();
        assert_eq!(rx.shared.lock().items.capacity(), 0);
    }

    #[test]
    fn a_queue_still_holding_frames_keeps_its_buffer_after_a_batch() {
        let (tx, rx) = channel(8);
        tx.try_send(1).unwrap();
        rx.batch_written();
        assert!(rx.shared.lock().items.capacity() > 0);
        assert_eq!(rx.try_recv(), Some(1));
    }
}
