//! outboxd: a WebSocket message broker that writes every message durably to its recipient's
//! outbox before it is sent or confirmed. See docs/architecture.md for the map.
//!
//! The public surface is what users use: [`client`] (and the [`model`] and [`protocol`] it
//! speaks), [`config`], [`auth`] (to mint and check tokens) and [`cli::main`], the entry that
//! serves. Everything else is private to the crate. The broker's modules need the `server`
//! feature (on by default); without it the crate is the Rust client alone.

#![forbid(unsafe_code)]
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
mod broker;
#[cfg(feature = "server")]
pub mod cli;
pub mod client;
#[cfg(feature = "server")]
mod codec;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
mod faults;
#[cfg(feature = "server")]
mod metrics;
pub mod model;
#[cfg(feature = "server")]
mod net;
pub mod protocol;
#[cfg(feature = "server")]
mod store;
#[cfg(feature = "server")]
mod views;
