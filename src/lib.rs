//! outboxd: a WebSocket message broker that writes every message durably to its recipient's
//! outbox before it is sent or confirmed. See docs/architecture.md for the map.

#![forbid(unsafe_code)]
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod auth;
pub mod broker;
pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod metrics;
pub mod model;
pub mod net;
pub mod protocol;
pub mod store;
pub mod views;
