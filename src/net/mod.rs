//! The transports: everything that touches a socket. The listener accepts connections and runs
//! shutdown; a WebSocket connection speaks the v1 protocol for one client; the admin API is the
//! operator's HTTP door; TLS wraps either. The rules they apply live in [`crate::broker`], the
//! durable state in [`crate::store`], so nothing here decides what a message's fate is.

pub mod admin;
pub mod connection;
mod listener;
mod read_ahead;
mod replies;
pub mod tls;
pub mod write_queue;

pub use listener::{serve, ServeError};
