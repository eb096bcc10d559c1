//! outboxd: a WebSocket message broker that writes every message durably to its recipient's
//! outbox before it is sent or confirmed. See docs/architecture.md for the map.

#![forbid(unsafe_code)]
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod admin;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod connection;
pub mod inspect;
pub mod metrics;
pub mod model;
pub mod protocol;
pub mod registry;
pub mod report;
pub mod server;
pub mod session;
pub mod store;
pub mod tls;
pub mod tools;
pub mod write_queue;
