//! outboxd: a WebSocket message broker that writes every message durably to its recipient's
//! outbox before it is sent or confirmed. See docs/architecture.md for the map.
//!
//! The broker's modules need the `server` feature (on by default). Without it the crate is the
//! Rust client alone: `client`, and the `model` and `protocol` it speaks.

#![forbid(unsafe_code)]
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod broker;
#[cfg(feature = "server")]
pub mod cli;
pub mod client;
#[cfg(feature = "server")]
pub mod codec;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod faults;
#[cfg(feature = "server")]
pub mod metrics;
pub mod model;
#[cfg(feature = "server")]
pub mod net;
pub mod protocol;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod views;
